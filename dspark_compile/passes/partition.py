"""Pass `partition`: cut the grafted program into the three graphs of docs/PROGRAM.md.

Each graph is a small ``nn.Module`` wrapper over the shared target/draft modules, with example inputs and the
dynamic dimensions the exporter needs. The verify module ends in the ``dspark::spec_verify`` op, which the
exporter writes as one ``dspark::SpecVerify`` node.

KV contract (docs/PROGRAM.md): every graph reads its cache but returns only the rows it wrote (``kv_new``,
``draft_kv_new``), gathered from the cache the model returns; the executor writes them into its own cache in
place at ``cache_len + t``. No graph output has the ``cache_slots`` dimension, so no runtime ever copies a
whole cache back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.plugins.spec_verify.op import spec_verify
from dspark_compile.program import DecodeProgram
from dspark_compile.spec import BuildSpec


def new_rows(cache: torch.Tensor, start: torch.Tensor, count: int) -> torch.Tensor:
    """Rows ``start[b] .. start[b]+count-1`` of a cache [layers, 2, B, KV, S, D] -> [layers, 2, B, KV, count, D]."""
    layers, two, bsz, heads, _, dim = cache.shape
    slots = start.view(1, 1, bsz, 1, 1, 1) + torch.arange(count, device=cache.device).view(1, 1, 1, 1, count, 1)
    return torch.gather(cache, 4, slots.expand(layers, two, bsz, heads, count, dim))


class TargetPrefill(nn.Module):
    def __init__(self, target: Qwen3Target) -> None:
        super().__init__()
        self.target = target

    def forward(self, input_ids: torch.Tensor, input_lengths: torch.Tensor,
                kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zero = torch.zeros_like(input_lengths)
        hidden, taps, kv = self.target(input_ids, zero, kv_cache)
        # Only the last prompt position's logits leave the graph ([B, V], not [B, T, V]). The LM head runs on
        # [B, 1, H] like in target_verify and draft_propose, so the exporter stores its weight in the same
        # (transposed) layout in all three graphs and share_weights keeps one copy; on [B, H] it would emit a
        # Gemm over the untransposed weight, a second copy of the largest tensor.
        idx = (input_lengths - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        last = torch.gather(hidden, 1, idx)
        return self.target.logits(last).squeeze(1), taps, new_rows(kv, zero, input_ids.shape[1])


class TargetVerify(nn.Module):
    """The target over [anchor, drafts], then SpecVerify on its logits and the drafts ``tokens[:, 1:]``."""

    def __init__(self, target: Qwen3Target, mode: str) -> None:
        super().__init__()
        self.target = target
        self.mode = mode

    def forward(self, tokens: torch.Tensor, cache_len: torch.Tensor, kv_cache: torch.Tensor, verify_len: torch.Tensor,
                draft_probs: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, taps, kv = self.target(tokens, cache_len, kv_cache)
        accepted, next_token = spec_verify(self.target.logits(hidden), tokens[:, 1:], verify_len, draft_probs,
                                           temperature, uniforms, mode=self.mode)
        return accepted, next_token, taps, new_rows(kv, cache_len, tokens.shape[1])


class DraftProposeGreedy(nn.Module):
    def __init__(self, draft: DSparkDraft) -> None:
        super().__init__()
        self.draft = draft

    def forward(self, anchor: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor, cache_len: torch.Tensor,
                draft_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, conf, _, kv = self.draft(anchor, ctx_taps, ctx_count, cache_len, draft_kv)
        return tokens, conf, new_rows(kv, cache_len, ctx_taps.shape[1])


class DraftProposeSampling(nn.Module):
    def __init__(self, draft: DSparkDraft) -> None:
        super().__init__()
        self.draft = draft

    def forward(self, anchor: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor, cache_len: torch.Tensor,
                draft_kv: torch.Tensor, temperature: torch.Tensor,
                uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, conf, probs, kv = self.draft(anchor, ctx_taps, ctx_count, cache_len, draft_kv, temperature, uniforms)
        return tokens, conf, probs, new_rows(kv, cache_len, ctx_taps.shape[1])


@dataclass(frozen=True)
class GraphSpec:
    """One graph to export: module, example inputs (by name, in order), output names, dynamic dims."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]


@dataclass(frozen=True)
class PartitionedProgram:
    program: DecodeProgram
    graphs: tuple[GraphSpec, ...]

    def graph(self, name: str) -> GraphSpec:
        return next(g for g in self.graphs if g.name == name)


def partition(program: DecodeProgram, spec: BuildSpec) -> PartitionedProgram:
    if program.draft is None:
        raise ValueError("partition needs a draft")
    block = spec.block_size or program.draft.cfg.block_size
    return PartitionedProgram(program, graph_specs(program.target, program.draft, block, spec.verify_mode))


def graph_specs(target: Qwen3Target, draft: DSparkDraft | None, block_size: int,
                verify_mode: str) -> tuple[GraphSpec, ...]:
    """The graphs of a program (no draft_propose without a draft: target-only); also what the PyTorch
    reference executor runs eagerly (runtime/torch_backend.py)."""
    g = block_size
    if draft is not None:
        draft.block_size = g
    dt = target.embed_tokens.weight.dtype
    b, t, s = 2, 5, 16  # example sizes; every one of them is dynamic in the graph
    kv = target.new_cache(b, s)
    tap_w = len(target.tap_layer_ids) * target.cfg.hidden_size
    i64 = torch.int64
    cache_dims = {2: "batch", 4: "cache_slots"}
    prefill = GraphSpec(
        "target_prefill", TargetPrefill(target),
        {"input_ids": torch.ones(b, t, dtype=i64), "input_lengths": torch.tensor([t, t - 2]), "kv_cache": kv},
        ("last_logits", "taps", "kv_new"),
        {"input_ids": {0: "batch", 1: "prompt_len"}, "input_lengths": {0: "batch"}, "kv_cache": cache_dims},
    )
    verify_inputs = {"tokens": torch.ones(b, g + 1, dtype=i64), "cache_len": torch.tensor([3, 4]), "kv_cache": kv,
                     "verify_len": torch.tensor([g, 1])}
    verify_dyn = {"tokens": {0: "batch", 1: "verify_tokens"}, "cache_len": {0: "batch"}, "kv_cache": cache_dims,
                  "verify_len": {0: "batch"}}
    if verify_mode == "sampling":
        vocab = target.cfg.vocab_size
        verify_inputs |= {"draft_probs": torch.full((b, g, vocab), 1.0 / vocab), "temperature": torch.ones(b),
                          "uniforms": torch.full((b, g + 1), 0.5)}
        verify_dyn |= {"draft_probs": {0: "batch", 1: "draft_len"}, "temperature": {0: "batch"},
                       "uniforms": {0: "batch", 1: "verify_tokens"}}
    verify = GraphSpec("target_verify", TargetVerify(target, verify_mode), verify_inputs,
                       ("accepted", "next_token", "taps", "kv_new"), verify_dyn)
    if draft is None:
        return prefill, verify
    dkv = draft.new_cache(b, s)
    draft_inputs = {
        "anchor": torch.ones(b, dtype=i64), "ctx_taps": torch.zeros(b, 3, tap_w, dtype=dt),
        "ctx_count": torch.tensor([3, 2]), "cache_len": torch.tensor([2, 4]), "draft_kv": dkv,
    }
    draft_dyn: dict[str, dict[int, str]] = {
        "anchor": {0: "batch"}, "ctx_taps": {0: "batch", 1: "ctx_len"}, "ctx_count": {0: "batch"},
        "cache_len": {0: "batch"}, "draft_kv": cache_dims,
    }
    if verify_mode == "sampling":
        draft_inputs |= {"temperature": torch.ones(b), "uniforms": torch.full((b, g), 0.5)}
        draft_dyn |= {"temperature": {0: "batch"}, "uniforms": {0: "batch"}}
        propose = GraphSpec("draft_propose", DraftProposeSampling(draft), draft_inputs,
                            ("draft_tokens", "confidence_logits", "draft_probs", "draft_kv_new"), draft_dyn)
    else:
        propose = GraphSpec("draft_propose", DraftProposeGreedy(draft), draft_inputs,
                            ("draft_tokens", "confidence_logits", "draft_kv_new"), draft_dyn)
    return prefill, verify, propose
