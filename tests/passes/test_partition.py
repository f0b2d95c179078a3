"""Pass `partition`: the two graphs of docs/PROGRAM.md, with the documented names, and modules that compute
what the full program computes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dspark_compile.artifacts import GRAPH_NAMES
from dspark_compile.build_spec import BuildSpec
from dspark_compile.passes.partition import partition
from dspark_compile.plugins.spec_verify.reference import spec_verify_reference
from dspark_compile.program import DecodeProgram

V, H, TAPS, L, LD, KV, D = 384, 64, 192, 4, 2, 2, 16  # the golden pair

STEP_IN = ("tokens", "cache_len", "kv_cache", "logit_rows", "verify_len", "embed_tokens", "lm_head")
STEP_OUT = ("accepted", "next_token", "taps", "kv_new")
SAMPLING_IN = ("draft_probs", "temperature", "uniforms")
DRAFT_IN = ("anchor", "ctx_taps", "ctx_count", "cache_len", "draft_kv", "embed_tokens", "lm_head")
DRAFT_OUT_GREEDY = ("draft_tokens", "confidence_logits", "draft_kv_new")
DRAFT_OUT_SAMPLING = ("draft_tokens", "confidence_logits", "draft_probs", "draft_kv_new")


def _spec(pair: tuple[Path, Path], tmp_path: Path, **kwargs) -> BuildSpec:
    return BuildSpec(*pair, tmp_path / "out", **kwargs)


@pytest.mark.parametrize("mode", ["sampling", "greedy"])
def test_names_and_dynamic_dims_are_the_documented_ones(golden_pair: tuple[Path, Path], tmp_path: Path,
                                                        mode: str,
                                                        grafted: Callable[[BuildSpec], DecodeProgram]) -> None:
    spec = _spec(golden_pair, tmp_path, verify_mode=mode)
    parts = partition(grafted(spec), spec)
    assert tuple(g.name for g in parts.graphs) == GRAPH_NAMES
    step, draft = parts.graphs
    sampling = mode == "sampling"
    assert (tuple(step.inputs), step.outputs) == (STEP_IN + (SAMPLING_IN if sampling else ()), STEP_OUT)
    assert tuple(draft.inputs) == DRAFT_IN + (("temperature", "uniforms") if sampling else ())
    assert draft.outputs == (DRAFT_OUT_SAMPLING if sampling else DRAFT_OUT_GREEDY)
    cache = {2: "batch", 4: "cache_slots"}
    assert step.dynamic == {"tokens": {0: "batch", 1: "step_len"}, "cache_len": {0: "batch"}, "kv_cache": cache,
                            "logit_rows": {0: "batch", 1: "decide_len"}, "verify_len": {0: "batch"}} | ({
        "draft_probs": {0: "batch", 1: "draft_len"}, "temperature": {0: "batch"},
        "uniforms": {0: "batch", 1: "decide_len"}} if sampling else {})
    assert draft.dynamic["ctx_taps"] == {0: "batch", 1: "ctx_len"}
    assert draft.dynamic["draft_kv"] == cache
    # The weight inputs are the target's own tensors (static shapes), shared by both graphs.
    target = parts.program.target
    for gs in (step, draft):
        assert gs.inputs["embed_tokens"] is target.embed_tokens.weight and gs.inputs["lm_head"] is target.lm_head.weight
        assert "embed_tokens" not in gs.dynamic and "lm_head" not in gs.dynamic
    assert all(draft.dynamic[name] == {0: "batch"} for name in draft.inputs
               if name not in ("ctx_taps", "draft_kv", "embed_tokens", "lm_head"))


@torch.inference_mode()
def test_modules_compute_the_program(golden_pair: tuple[Path, Path], tmp_path: Path,
                                     grafted: Callable[[BuildSpec], DecodeProgram]) -> None:
    spec = _spec(golden_pair, tmp_path)
    program = grafted(spec)
    parts = partition(program, spec)
    target = program.target
    step = parts.graph("target_step")
    weights = {k: step.inputs[k] for k in ("embed_tokens", "lm_head")}

    # Prefill: a whole prompt from slot 0, the first token decided on the last prompt position (greedy rows).
    ids, lengths = torch.tensor([[5, 9, 13, 2, 7], [8, 3, 1, 0, 0]]), torch.tensor([5, 3])
    b, t = ids.shape
    zeros = torch.zeros(b, dtype=torch.int64)
    feeds = {"tokens": ids, "cache_len": zeros, "kv_cache": target.new_cache(b, 16),
             "logit_rows": (lengths - 1)[:, None], "verify_len": zeros, **weights,
             "draft_probs": torch.zeros(b, 0, V), "temperature": torch.zeros(b), "uniforms": torch.full((b, 1), 0.5)}
    accepted, first, taps, kv = step.module(*(feeds[n] for n in step.inputs))
    assert (taps.shape, kv.shape) == ((b, t, TAPS), (L, 2, b, KV, t, D))  # only the new rows
    assert accepted.tolist() == [0, 0]
    for row in range(b):  # each prompt alone, unpadded: the argmax of its last position's logits
        n = int(lengths[row])
        hidden, full_taps, cache = target(ids[row : row + 1, :n], torch.zeros(1, dtype=torch.int64),
                                          target.new_cache(1, 16))
        assert int(first[row]) == int(target.logits(hidden[0, -1]).argmax())
        assert torch.allclose(taps[row, :n], full_taps[0], atol=1e-6)
        assert torch.allclose(kv[:, :, row, :, :n], cache[:, :, 0, :, :n], atol=1e-6)

    # Verification: the example (rows 1..3 of a chunk of 5, 2 drafts) against SpecVerify on the same logits.
    accepted, next_token, vtaps, vkv = step.module(*step.inputs.values())
    tokens, cache_len, kv, rows = (step.inputs[k] for k in ("tokens", "cache_len", "kv_cache", "logit_rows"))
    hidden, taps, kv_out = target(tokens, cache_len, kv)
    logits = target.logits(torch.gather(hidden, 1, rows[..., None].expand(-1, -1, hidden.shape[-1])))
    want = spec_verify_reference(logits, torch.gather(tokens, 1, rows[:, 1:]), step.inputs["verify_len"],
                                 mode="sampling", **{k: step.inputs[k] for k in SAMPLING_IN})
    assert [accepted.tolist(), next_token.tolist()] == [w.tolist() for w in want]
    assert torch.equal(vtaps, taps) and vkv.shape == (L, 2, b, KV, tokens.shape[1], D)
    for row in range(b):  # the new rows are the cache the model wrote, at slots cache_len .. cache_len + T - 1
        start = int(cache_len[row])
        assert torch.equal(vkv[:, :, row], kv_out[:, :, row, :, start : start + tokens.shape[1]])

    draft = parts.graph("draft_propose")
    tokens, confidence, probs, dkv = draft.module(*draft.inputs.values())
    assert (tokens.shape, confidence.shape, probs.shape) == ((b, 7), (b, 7), (b, 7, V))
    assert dkv.shape == (LD, 2, b, KV, draft.inputs["ctx_taps"].shape[1], D)
    assert torch.allclose(probs.sum(-1), torch.ones(b, 7), atol=1e-5)
    # The example temperature is 1 and the uniforms 0.5: each token is the median draw of its distribution.
    cdf = probs.cumsum(-1)
    below = torch.gather(cdf, 2, tokens[..., None]).squeeze(-1) - torch.gather(probs, 2, tokens[..., None]).squeeze(-1)
    assert bool((below <= 0.5 + 1e-6).all()) and bool((torch.gather(cdf, 2, tokens[..., None]) > 0.5 - 1e-6).all())


def test_block_size_override_sets_the_draft_width(golden_pair: tuple[Path, Path], tmp_path: Path,
                                                  grafted: Callable[[BuildSpec], DecodeProgram]) -> None:
    spec = _spec(golden_pair, tmp_path, block_size=4)
    parts = partition(grafted(spec), spec)
    assert parts.program.draft.block_size == 4
    assert parts.graph("draft_propose").inputs["uniforms"].shape[1] == 4
    tokens, *_ = parts.graph("draft_propose").module(*parts.graph("draft_propose").inputs.values())
    assert tokens.shape[1] == 4


@torch.inference_mode()
def test_e4m3_lm_head_is_an_input_with_its_scales_read_by_name(golden_pair: tuple[Path, Path], tmp_path: Path,
                                                                grafted: Callable[[BuildSpec], DecodeProgram]) -> None:
    """``--quantize-lm-head``: both graphs take the e4m3 head and its float32 scales as inputs, after the bf16
    ones and before sampling's, and compute from those inputs, not the module's own tensors. Sampling is the
    case where the scales' position alone would have fed them in as ``draft_probs``. For Triton the head is a
    constant of each graph instead, computing the same outputs."""
    from dspark_compile.passes.quantize import quantize_program

    spec = _spec(golden_pair, tmp_path, verify_mode="sampling", quantize="fp8", quantize_lm_head=True)
    program = grafted(spec)
    quantize_program(program, lm_head=True)
    step, draft = partition(program, spec).graphs
    head = program.target.lm_head
    assert tuple(step.inputs) == (*STEP_IN, "lm_head_scale", *SAMPLING_IN)
    assert tuple(draft.inputs) == (*DRAFT_IN, "lm_head_scale", "temperature", "uniforms")
    outputs = {}
    for gs in (step, draft):
        assert gs.inputs["lm_head"] is head.weight and gs.inputs["lm_head"].dtype == torch.float8_e4m3fn
        assert gs.inputs["lm_head_scale"] is head.weight_scale and gs.inputs["lm_head_scale"].shape == (V,)
        assert gs.inputs["embed_tokens"] is program.target.embed_tokens.weight  # full precision
        got = outputs[gs.name] = gs.module(*gs.inputs.values())
        doubled = dict(gs.inputs, lm_head_scale=2 * head.weight_scale)  # the input, not the module's tensor
        moved = gs.module(*doubled.values())
        if gs is step:  # the head decides next_token: its logits come from the input scales
            assert torch.equal(got[2], moved[2]) and not torch.equal(got[1], moved[1])
        else:  # the draft's probabilities are the head's
            assert not torch.equal(got[2], moved[2])
    # With a Triton repository (no FP8 graph-model inputs) each graph holds the e4m3 head as a constant.
    spec = _spec(golden_pair, tmp_path, verify_mode="sampling", targets=("onnx", "triton"))
    step, draft = partition(program, spec).graphs
    assert tuple(step.inputs) == (*STEP_IN[:-1], *SAMPLING_IN)
    assert tuple(draft.inputs) == (*DRAFT_IN[:-1], "temperature", "uniforms")
    for gs in (step, draft):
        assert all(torch.equal(a, b) for a, b in zip(gs.module(*gs.inputs.values()), outputs[gs.name], strict=True))
