"""The contracts between the host decode loop and the executors of a build (docs/PROGRAM.md).

Two protocols live here while the executors move over:

* :class:`DecodeBackend` — the device-resident round. The executor owns the KV caches, the taps, the draft
  probabilities and each row's random stream; per call the host sees only O(B·G) numbers (accept counts,
  tokens, the next block's drafts and confidences), fetched with one synchronisation.
* :class:`Backend` — the older per-graph protocol (NumPy in, NumPy out), kept only for
  ``targets/torch/cuda_graph_backend.py`` and ``targets/torch/bench.py`` until they speak
  :class:`DecodeBackend` (every other executor is :class:`~dspark_compile.runtime.executor.GraphExecutor`).

:class:`ProgramInfo` is the one description of a built program that the manifest, the Triton repository and
every executor read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ProgramInfo:
    """What a runtime needs to drive a program without its checkpoints; computed once (partition) per build."""

    vocab_size: int
    block_size: int  # G: drafts per round (0: no draft, target-only)
    tap_width: int  # NT * H
    has_confidence: bool
    eos_token_ids: tuple[int, ...] = ()
    max_slots: int | None = None  # cache capacity the graphs/engines were built for (None = unbounded)
    sampling: bool = True  # whether the graphs take temperature/uniforms (verify mode "sampling")
    dtype: str = "fp32"
    family: str = "qwen3"
    hidden_size: int = 0
    target_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    draft_layers: int = 0
    draft_kv_heads: int = 0
    draft_head_dim: int = 0
    tap_layer_ids: tuple[int, ...] = ()
    markov_head: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["tap_layer_ids"] = list(self.tap_layer_ids)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProgramInfo:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        for key in ("eos_token_ids", "tap_layer_ids"):
            if key in kw:
                kw[key] = tuple(int(t) for t in kw[key])
        return cls(**kw)


# ------------------------------------------------------------------------------------ device-resident round
@dataclass(frozen=True)
class Proposal:
    """The host's view of one device call (prefill or round): O(B·G) numbers, fetched with one sync.

    After ``admit``: ``accepted`` is all zeros and ``next_token`` is the first generated token. After
    ``round``: ``accepted[b]`` drafts of the block verified this round were accepted, and ``next_token[b]`` is
    the target's correction (accepted < verify_len) or bonus token; the round committed
    ``previous.drafts[b, :accepted[b]] + [next_token[b]]``. ``drafts``/``confidence_logits`` are the *next*
    block, drafted in the same call from the context just committed ([B, 0] when decoding target-only).
    """

    accepted: np.ndarray  # [B] int64
    next_token: np.ndarray  # [B] int64
    drafts: np.ndarray  # [B, G] int64
    confidence_logits: np.ndarray  # [B, G] float32


class DecodeBackend(Protocol):
    """Up to ``rows`` concurrent requests whose whole decode state lives where the executor runs.

    Live requests are rows ``0..n-1``, in the order they were admitted: ``admit`` appends rows, ``select``
    keeps some and compacts them (order kept). That is enough for continuous batching: requests join between
    rounds (``admit``) and leave (``select``) while the others keep their caches.

    Random numbers come from :func:`dspark_compile.runtime.sampling.counter_uniforms`: a row draws
    ``uniforms_per_call(G)`` numbers per device call (admit or round), at counter ``calls * uniforms_per_call(G)``
    of the stream keyed by its seed (verification / first token at ``[0, G+1)``, drafts at ``[G+1, 2G+1)``), so
    its output depends on its prompt, temperature and seed, never on which rows share its batch.
    """

    info: ProgramInfo

    def start(self, rows: int, slots: int, *, speculative: bool = True) -> None:
        """Caches for up to ``rows`` requests of up to ``slots`` positions each; no live rows yet.
        ``speculative=False`` decodes target-only (G = 0: no drafts, ``verify_len`` all zero)."""

    def admit(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray) -> Proposal:
        """Prefill ``k`` new requests (prompts [k, T] right-padded, lengths/temperature/seeds [k]) into rows
        ``n..n+k-1``: their first token and first block of drafts."""

    def round(self, verify_len: np.ndarray) -> Proposal:
        """Every live row: verify ``verify_len[b]`` ≤ G pending drafts, commit, draft the next block."""

    def select(self, rows: np.ndarray) -> None:
        """Keep only these live rows (increasing), compacted to ``0..len(rows)-1``; all per-row state moves."""


def uniforms_per_call(block_size: int) -> int:
    """Random numbers one row consumes per device call: G+1 for verification (or the first token), G drafts."""
    return 2 * block_size + 1


# ------------------------------------------------------------------------------------ per-graph (older) protocol
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
    info: ProgramInfo

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
