"""The interface every executor of the three graphs implements (docs/PROGRAM.md).

The host loop (:mod:`dspark_compile.runtime.decode`) talks NumPy to a backend; a backend owns the KV caches
of one batch between calls, so the loop never touches device memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    block_size: int
    tap_width: int
    has_confidence: bool
    eos_token_ids: tuple[int, ...] = ()
    max_slots: int | None = None  # cache capacity the graphs were built for (None = unbounded)
    sampling: bool = True  # whether the graphs accept temperature/uniforms


@dataclass(frozen=True)
class DraftOutput:
    tokens: np.ndarray  # [B, G] int64
    confidence_logits: np.ndarray  # [B, G] float32
    probs: np.ndarray | None  # [B, G, V] float32 (sampling only)


@dataclass(frozen=True)
class VerifyOutput:
    accepted: np.ndarray  # [B] int64
    next_token: np.ndarray  # [B] int64
    taps: np.ndarray  # [B, G+1, F]


class Backend(Protocol):
    info: ModelInfo

    def start(self, batch: int, slots: int) -> None:
        """Allocate empty caches for a new batch of ``batch`` requests and ``slots`` positions."""

    def prefill(self, input_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (last_logits [B, V] float32, taps [B, T, F])."""

    def draft(self, anchor: np.ndarray, ctx_taps: np.ndarray, ctx_count: np.ndarray, cache_len: np.ndarray,
              temperature: np.ndarray | None, uniforms: np.ndarray | None) -> DraftOutput: ...

    def verify(self, tokens: np.ndarray, cache_len: np.ndarray, verify_len: np.ndarray,
               draft_probs: np.ndarray | None, temperature: np.ndarray | None,
               uniforms: np.ndarray | None) -> VerifyOutput: ...

    def select(self, rows: np.ndarray) -> None:
        """Keep only these batch rows of the caches (finished requests leave the batch)."""
