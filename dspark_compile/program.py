"""The grafted speculative-decode program: a target and a DSpark draft that shares its embedding and LM head."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark_compile.checkpoint import (
    DraftCheckpoint,
    TargetCheckpoint,
    check_pair,
    load_draft,
    load_target,
    shared_weights_differ,
)
from dspark_compile.errors import UsageError
from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.qwen3 import Qwen3Target

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CheckpointPair:
    target: TargetCheckpoint
    draft: DraftCheckpoint | None


@dataclass(frozen=True)
class DecodeProgram:
    """Target + grafted draft as PyTorch modules (one copy of the shared embedding / LM head)."""

    pair: CheckpointPair
    target: Qwen3Target
    draft: DSparkDraft | None
    dtype: str

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.pair.target.config.eos_token_ids


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pair(target_dir: Path, draft_dir: Path | None, *, allow_nonfinite: bool = False) -> CheckpointPair:
    target = load_target(Path(target_dir), allow_nonfinite=allow_nonfinite)
    draft = load_draft(Path(draft_dir), allow_nonfinite=allow_nonfinite) if draft_dir is not None else None
    if draft is not None:
        check_pair(target, draft)
    return CheckpointPair(target, draft)


def graft(pair: CheckpointPair, *, dtype: str = "fp32", device: str = "cpu") -> DecodeProgram:
    """Build the modules; the draft reuses the target's embedding and LM head (warns if its copies differ)."""
    tdt = torch_dtype(dtype)
    t = pair.target
    if pair.draft is not None:
        for line in shared_weights_differ(t, pair.draft):
            log.warning("%s; the graft uses the target's copy", line)
        # The comparison read both embeddings through the files' memory maps; drop those maps before the
        # modules take (memory-mapped) views of their weights, or the draft's unused copies stay resident.
        t.weights.release()
        pair.draft.weights.release()
    draft_cfg = pair.draft.config if pair.draft is not None else None
    taps = draft_cfg.target_layer_ids if draft_cfg is not None else ()
    target = Qwen3Target.from_weights(t.config, t.weights.get, tap_layer_ids=taps, dtype=tdt).to(device)
    draft = None
    if pair.draft is not None:
        draft = DSparkDraft.from_weights(draft_cfg, pair.draft.weights.get, embed_tokens=target.embed_tokens,
                                         lm_head=target.lm_head, dtype=tdt).to(device)
    return DecodeProgram(pair, target, draft, dtype)


def build_program(target_dir: Path, draft_dir: Path | None, *, dtype: str = "fp32", device: str = "cpu",
                  allow_nonfinite: bool = False) -> DecodeProgram:
    return graft(load_pair(target_dir, draft_dir, allow_nonfinite=allow_nonfinite), dtype=dtype, device=device)
