"""The grafted speculative-decode program: a target and a DSpark draft that shares its embedding and LM head."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dspark_compile.checkpoint import (
    DraftCheckpoint,
    TargetCheckpoint,
    check_pair,
    load_draft,
    load_target,
    shared_weights_differ,
)
from dspark_compile.errors import UsageError
from dspark_compile.families import family_of
from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.gemma4 import Gemma4Target, uses_ring
from dspark_compile.models.layers import Fp8Linear, replace_module
from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.executor import TORCH_DTYPES as DTYPES

log = logging.getLogger(__name__)



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

    def info(self, *, sampling: bool = True, max_slots: int | None = None) -> ProgramInfo:
        """The one description of this program that the manifest, the Triton repository and the executors read."""
        return program_info(self.target, self.draft, self.eos_token_ids, sampling=sampling, max_slots=max_slots)


def program_info(target: Qwen3Target, draft: DSparkDraft | None, eos_token_ids: tuple[int, ...] = (), *,
                 sampling: bool = True, max_slots: int | None = None) -> ProgramInfo:
    """:class:`ProgramInfo` of grafted modules (a build's partition step, and the torch executors)."""
    tc = target.cfg
    dc = draft.cfg if draft is not None else None
    dtype = next(k for k, v in DTYPES.items() if v == target.embed_tokens.weight.dtype)
    block = draft.block_size if draft is not None else 0
    kv_heads, head_dim, ring = tc.num_key_value_heads, tc.head_dim, {}
    if uses_ring(target):  # the graphs' kv_cache: the global layers, unpadded; the sliding ones in kv_ring
        assert isinstance(target, Gemma4Target)
        gc = target.cfg
        kv_heads, head_dim = gc.global_kv_heads, gc.global_head_dim
        ring = {"ring_layers": target.sliding_layers, "ring_kv_heads": gc.sliding_kv_heads,
                "ring_head_dim": gc.sliding_head_dim, "ring_slots": target.ring_slots(block)}
    return ProgramInfo(
        vocab_size=tc.vocab_size, block_size=block,
        tap_width=len(target.tap_layer_ids) * tc.hidden_size,
        has_confidence=draft is not None and draft.confidence_head is not None,
        eos_token_ids=tuple(eos_token_ids), max_slots=max_slots, sampling=sampling, dtype=dtype,
        family=tc.family, hidden_size=tc.hidden_size, target_layers=tc.num_hidden_layers,
        kv_heads=kv_heads,
        head_dim=head_dim, draft_layers=dc.base.num_hidden_layers if dc is not None else 0,
        draft_kv_heads=dc.base.num_key_value_heads if dc is not None else 0,
        draft_head_dim=dc.base.head_dim if dc is not None else 0,
        tap_layer_ids=tuple(target.tap_layer_ids),
        markov_head=dc.markov_head_type if dc is not None else None, **ring,
    )


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pair(target_dir: Path, draft_dir: Path | None, *, allow_nonfinite: bool = False) -> CheckpointPair:
    """Open both checkpoints (lazy, memory-mapped); whether they fit together is :func:`check_pair`'s job."""
    target = load_target(Path(target_dir), allow_nonfinite=allow_nonfinite)
    draft = load_draft(Path(draft_dir), allow_nonfinite=allow_nonfinite) if draft_dir is not None else None
    return CheckpointPair(target, draft)


def make_program(pair: CheckpointPair, *, dtype: str = "fp32", device: str = "cpu") -> DecodeProgram:
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
    family = family_of(t.config)
    target = family.target.from_weights(t.config, _placeholders(t), tap_layer_ids=taps, dtype=tdt)
    if t.quant is not None:
        attach_fp8(target, t)
    target = target.to(device)
    draft = None
    if pair.draft is not None:
        draft = family.draft.from_weights(draft_cfg, pair.draft.weights.get, embed_tokens=target.embed_tokens,
                                         lm_head=target.lm_head, dtype=tdt).to(device)
    return DecodeProgram(pair, target, draft, dtype)


def _placeholders(t: TargetCheckpoint) -> Callable[[str], torch.Tensor]:
    """``get`` for ``from_weights``: an e4m3 weight is a meta placeholder, replaced by :func:`attach_fp8`."""
    fp8 = t.quant.tensors if t.quant is not None else {}

    def get(name: str) -> torch.Tensor:
        return torch.empty(t.weights.shape(name), device="meta") if name in fp8 else t.weights.get(name)

    return get


def attach_fp8(target: Qwen3Target, t: TargetCheckpoint) -> None:
    """Swap each linear layer whose checkpoint weight is e4m3 for an :class:`Fp8Linear` over that weight and its
    scales (block scales expanded over rows to [N, ceil(K/block_cols)])."""
    assert t.quant is not None
    block = t.quant.layout.block
    for name, module in list(target.named_modules()):
        hf = "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"
        entry = t.quant.tensors.get(hf)
        if entry is None or not isinstance(module, nn.Linear):
            continue
        weight = t.weights.get(hf)
        scale = t.weights.get(entry.scale, torch.float32)
        scale = scale.repeat_interleave(block[0], dim=0)[: weight.shape[0]] if block else scale.reshape(())
        inp = t.weights.get(entry.input_scale, torch.float32) if entry.input_scale is not None else None
        bias = None if module.bias is None else module.bias.detach()
        replace_module(target, name, Fp8Linear(weight, scale, bias, group=block[1] if block else 0, input_scale=inp))


def build_program(target_dir: Path, draft_dir: Path | None, *, dtype: str = "fp32", device: str = "cpu",
                  allow_nonfinite: bool = False) -> DecodeProgram:
    pair = load_pair(target_dir, draft_dir, allow_nonfinite=allow_nonfinite)
    if pair.draft is not None:
        check_pair(pair.target, pair.draft)
    return make_program(pair, dtype=dtype, device=device)
