"""Pass `partition`: cut the grafted program into the two graphs of docs/PROGRAM.md.

``target_step`` is the target once, for prefill and verification alike: tokens [B, T] (a prompt, or the anchor
and G drafts) and ``logit_rows`` [B, W], the positions whose logits ``dspark::spec_verify`` decides on
(prefill: the last prompt position and no drafts, W = 1; verification: rows 0..G). One graph, so one engine
holds the target's weights (two optimization profiles, build_tensorrt). ``draft_propose`` is the draft.
Each graph is a small ``nn.Module`` wrapper over the shared target/draft modules, with example inputs and the
dynamic dimensions the exporter needs.

The weights both graphs read, the grafted embedding and LM head, are graph *inputs* (:data:`WEIGHT_INPUTS`),
not constants: a runtime holds them once and binds the same buffers to both graphs, so no engine carries them
(a tied LM head is one buffer bound to both inputs). The LM head runs on [rows, H] in both graphs, which the
exporter writes as one ``Gemm(transB=1)`` over the weight as stored: no transposed copy of it, and no
per-call transpose. An e4m3 head (``--quantize-lm-head``) is the input ``lm_head`` in FLOAT8E4M3FN with its
float32 scales ``lm_head_scale``, dequantized by one DequantizeLinear in each graph; it is a copy, so a tied
embedding keeps its full-precision rows in ``embed_tokens``. A build that a Triton repository serves keeps an e4m3
head as a constant of each graph instead (:func:`head_is_input`): Triton has no FP8 data type for a graph model's
input, and two e4m3 copies weigh what one bf16 head does.

Which inputs a graph has varies by build (sampling's, the e4m3 head's scales), so the wrappers are called
positionally in the order of their example inputs (:meth:`GraphModule.take_inputs`) and read them by name.

KV contract (docs/PROGRAM.md): every graph reads its cache but returns only the rows it wrote (``kv_new``,
``draft_kv_new``: the models' ``RowsCache`` output); the executor writes them into its own cache in place at
``cache_len + t``. No graph output has the ``cache_slots`` dimension, so no runtime ever copies a
whole cache back. A Gemma4 target's sliding layers are the one exception to full-length caches
(:class:`RingTargetStep`): a fixed ring ``kv_ring`` whose rows ``ring_new`` the executor writes at
``(cache_len + t) mod R``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.gemma4 import Gemma4Target, RingWindow, uses_ring
from dspark_compile.models.layers import Fp8Linear, RowsCache
from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.plugins.spec_verify.op import spec_verify
from dspark_compile.program import DecodeProgram

WEIGHT_INPUTS = ("embed_tokens", "lm_head", "lm_head_scale")  # graph inputs: module tensors the two graphs share
# (``lm_head_scale`` only with an e4m3 LM head), and the module parameter each one stands for
_PARAMETERS = {"embed_tokens": "embed_tokens.weight", "lm_head": "lm_head.weight",
               "lm_head_scale": "lm_head.weight_scale"}


ROWS = RowsCache()  # the models return the K/V rows they computed, not whole updated caches


def shared_weights(target: Qwen3Target, *, head: bool = True) -> dict[str, torch.Tensor]:
    """The tensors behind :data:`WEIGHT_INPUTS` (the same tensor twice when the LM head is tied and not e4m3);
    ``head=False``: the embedding only, the head a constant of each graph (:func:`head_is_input`)."""
    weights = {"embed_tokens": target.embed_tokens.weight}
    if head:
        weights["lm_head"] = target.lm_head.weight
        if isinstance(target.lm_head, Fp8Linear):
            weights["lm_head_scale"] = target.lm_head.weight_scale
    return weights


def head_is_input(target: Qwen3Target, spec: BuildSpec) -> bool:
    """Whether the LM head is a weight input of the graphs: always, but for an e4m3 head in a build with a Triton
    repository, whose graph models cannot take FP8 inputs; there each graph holds the head as a constant."""
    return not (isinstance(target.lm_head, Fp8Linear) and "triton" in spec.targets)


def _with_weights(fn: Callable[..., Any], module: nn.Module, weights: Mapping[str, torch.Tensor], *args: Any,
                  **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a method of ``module``) reading the shared weights from the graph inputs
    ``weights`` (by :data:`WEIGHT_INPUTS` name) instead of the module's own parameters."""
    with _reparametrize_module(module, {_PARAMETERS[k]: v for k, v in weights.items()}, tie_weights=False):
        return fn(*args, **kwargs)


class GraphModule(nn.Module):
    """A graph's wrapper: called with the graph's inputs positionally, in the order :meth:`take_inputs` names
    (the exporter, the layer template and the torch transport pass them so), and reading them by name."""

    def take_inputs(self, names: Sequence[str]) -> GraphModule:
        order = tuple(names)

        def forward(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.compute(**dict(zip(order, tensors, strict=True)))

        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # the exporter's input names
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in order])
        self.forward = forward
        return self

    def compute(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class TargetStep(GraphModule):
    """The target over ``tokens`` at ``cache_len``, then SpecVerify on the logits of ``logit_rows``.

    The drafts are the tokens at the decided rows but the first (``tokens[b, logit_rows[b, 1:]]``): rows 0..G
    verify G drafts; one row (a prompt's last position) decides the first token with none.
    """

    def __init__(self, target: Qwen3Target, mode: str) -> None:
        super().__init__()
        self.target = target
        self.mode = mode

    def compute(self, *, tokens: torch.Tensor, cache_len: torch.Tensor, kv_cache: torch.Tensor,  # type: ignore[override]
                logit_rows: torch.Tensor, verify_len: torch.Tensor, draft_probs: torch.Tensor | None = None,
                temperature: torch.Tensor | None = None, uniforms: torch.Tensor | None = None,
                **weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden, taps, kv = _with_weights(self.target, self.target, weights, tokens, cache_len, kv_cache, cache=ROWS)
        return (*self.verify(hidden, tokens, logit_rows, verify_len, weights, draft_probs, temperature, uniforms),
                taps, kv)

    def verify(self, hidden: torch.Tensor, tokens: torch.Tensor, logit_rows: torch.Tensor, verify_len: torch.Tensor,
               weights: Mapping[str, torch.Tensor], draft_probs: torch.Tensor | None,
               temperature: torch.Tensor | None, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(accepted, next_token): SpecVerify on the LM head's logits of the ``logit_rows`` of ``hidden``."""
        decided = torch.gather(hidden, 1, logit_rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        # The family's LM head (soft-capped for Gemma4) on [B*W, H]: one Gemm(transB=1) over the weight input.
        logits = _with_weights(self.target.logits, self.target, weights, decided.reshape(-1, decided.shape[-1]))
        logits = logits.view(*decided.shape[:2], -1)
        drafts = torch.gather(tokens, 1, logit_rows[:, 1:])
        return spec_verify(logits, drafts, verify_len, draft_probs, temperature, uniforms, mode=self.mode)


class RingTargetStep(TargetStep):
    """:class:`TargetStep` of a target with sliding-window layers (Gemma4): they keep only a ring of R = W + G
    slots (``kv_ring`` [Ls, 2, B, KV_s, R, D_s], models/gemma4.RingWindow) and return their rows as
    ``ring_new`` [Ls, 2, B, KV_s, T, D_s]; ``kv_cache``/``kv_new`` hold the global layers only, unpadded.
    R is fixed in the graph (it is the arithmetic of which slot holds which position), not a cache_slots dim."""

    def compute(self, *, tokens: torch.Tensor, cache_len: torch.Tensor, kv_cache: torch.Tensor,  # type: ignore[override]
                kv_ring: torch.Tensor, logit_rows: torch.Tensor, verify_len: torch.Tensor,
                draft_probs: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None, **weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        window = RingWindow(kv_ring, self.target.cfg.sliding_window, write=False)
        hidden, taps, kv = _with_weights(self.target, self.target, weights, tokens, cache_len, kv_cache, cache=ROWS,
                                         ring=window)
        return (*self.verify(hidden, tokens, logit_rows, verify_len, weights, draft_probs, temperature, uniforms),
                taps, kv, window.new_rows())


class DraftPropose(GraphModule):
    def __init__(self, draft: DSparkDraft) -> None:
        super().__init__()
        self.draft = draft

    def compute(self, *, anchor: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor,  # type: ignore[override]
                cache_len: torch.Tensor, draft_kv: torch.Tensor, temperature: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None, **weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.draft
        hidden, rows = _with_weights(d.backbone, d, weights, anchor, ctx_taps, ctx_count, cache_len, draft_kv,
                                     cache=ROWS)
        tokens, conf, probs = _with_weights(d.propose, d, weights, hidden, anchor, temperature, uniforms)
        return (tokens, conf, probs, rows) if temperature is not None else (tokens, conf, rows)


@dataclass(frozen=True)
class ExportJob:
    """One graph to export: module, example inputs (by name, in order), output names, dynamic dims."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]


@dataclass(frozen=True)
class PartitionedProgram:
    program: DecodeProgram
    graphs: tuple[ExportJob, ...]

    def graph(self, name: str) -> ExportJob:
        return next(g for g in self.graphs if g.name == name)


def partition(program: DecodeProgram, spec: BuildSpec) -> PartitionedProgram:
    if program.draft is None:
        raise ValueError("partition needs a draft")
    block = spec.block_size or program.draft.cfg.block_size
    return PartitionedProgram(program, graph_specs(program.target, program.draft, block, spec.verify_mode,
                                                   head_input=head_is_input(program.target, spec)))


def graph_specs(target: Qwen3Target, draft: DSparkDraft | None, block_size: int, verify_mode: str, *,
                head_input: bool = True) -> tuple[ExportJob, ...]:
    """The graphs of a program (no draft_propose without a draft: target-only); also what the PyTorch
    reference executor runs eagerly (runtime/torch_backend.py). ``head_input=False``: the LM head is a constant
    of each graph (:func:`head_is_input`)."""
    g = block_size
    if draft is not None:
        draft.block_size = g
    dt = target.embed_tokens.weight.dtype
    b, t, s = 2, 5, 16  # example sizes; every one of them is dynamic in the graph
    tap_w = len(target.tap_layer_ids) * target.cfg.hidden_size
    i64 = torch.int64
    cache_dims = {2: "batch", 4: "cache_slots"}
    weights = shared_weights(target, head=head_input)
    # Example: verification of 2 drafts in a chunk of 5 (rows 1..3 and 2..4): every dimension differs.
    ring = uses_ring(target)
    step_inputs = {"tokens": torch.ones(b, t, dtype=i64), "cache_len": torch.tensor([3, 4]),
                   "kv_cache": target.new_global_cache(b, s) if ring else target.new_cache(b, s),
                   "logit_rows": torch.tensor([[1, 2, 3], [2, 3, 4]]), "verify_len": torch.tensor([2, 1]), **weights}
    step_dyn = {"tokens": {0: "batch", 1: "step_len"}, "cache_len": {0: "batch"}, "kv_cache": cache_dims,
                "logit_rows": {0: "batch", 1: "decide_len"}, "verify_len": {0: "batch"}}
    step_outputs: tuple[str, ...] = ("accepted", "next_token", "taps", "kv_new")
    if ring:  # the ring right after kv_cache, in RingTargetStep.forward's order; its slot axis is fixed R
        assert isinstance(target, Gemma4Target)
        step_inputs = {**{k: step_inputs[k] for k in ("tokens", "cache_len", "kv_cache")},
                       "kv_ring": target.new_ring(b, g if draft is not None else 0),
                       **{k: v for k, v in step_inputs.items() if k not in ("tokens", "cache_len", "kv_cache")}}
        step_dyn["kv_ring"] = {2: "batch"}
        step_outputs += ("ring_new",)
    if verify_mode == "sampling":
        vocab = target.cfg.vocab_size
        step_inputs |= {"draft_probs": torch.full((b, 2, vocab), 1.0 / vocab), "temperature": torch.ones(b),
                        "uniforms": torch.full((b, 3), 0.5)}
        step_dyn |= {"draft_probs": {0: "batch", 1: "draft_len"}, "temperature": {0: "batch"},
                     "uniforms": {0: "batch", 1: "decide_len"}}
    step = ExportJob("target_step", (RingTargetStep if ring else TargetStep)(target, verify_mode).take_inputs(
        step_inputs), step_inputs, step_outputs, step_dyn)
    if draft is None:
        return (step,)
    draft_inputs = {
        "anchor": torch.ones(b, dtype=i64), "ctx_taps": torch.zeros(b, 3, tap_w, dtype=dt),
        "ctx_count": torch.tensor([3, 2]), "cache_len": torch.tensor([2, 4]), "draft_kv": draft.new_cache(b, s),
        **weights,
    }
    draft_dyn: dict[str, dict[int, str]] = {
        "anchor": {0: "batch"}, "ctx_taps": {0: "batch", 1: "ctx_len"}, "ctx_count": {0: "batch"},
        "cache_len": {0: "batch"}, "draft_kv": cache_dims,
    }
    outputs = ("draft_tokens", "confidence_logits", "draft_kv_new")
    if verify_mode == "sampling":
        draft_inputs |= {"temperature": torch.ones(b), "uniforms": torch.full((b, g), 0.5)}
        draft_dyn |= {"temperature": {0: "batch"}, "uniforms": {0: "batch"}}
        outputs = ("draft_tokens", "confidence_logits", "draft_probs", "draft_kv_new")
    return step, ExportJob("draft_propose", DraftPropose(draft).take_inputs(draft_inputs), draft_inputs, outputs,
                           draft_dyn)


def run(state: BuildState) -> None:
    """The graphs to export, and the one ProgramInfo of the build (with the block size partition settled)."""
    assert state.program is not None
    state.parts = partition(state.program, state.spec)
    state.info = state.program.info(sampling=state.spec.verify_mode == "sampling", max_slots=state.spec.max_context)
