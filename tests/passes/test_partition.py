"""Pass `partition`: the three graphs of docs/PROGRAM.md, with the documented names, and modules that compute
what the full program computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dspark_compile.ir import GRAPH_NAMES
from dspark_compile.passes.graft import graft
from dspark_compile.passes.load import load
from dspark_compile.passes.partition import partition
from dspark_compile.plugins.spec_verify.reference import spec_verify_reference
from dspark_compile.spec import BuildSpec

V, H, TAPS, L, LD, KV, D = 384, 64, 192, 4, 2, 2, 16  # the golden pair

PREFILL = (("input_ids", "input_lengths", "kv_cache"), ("last_logits", "taps", "kv_new"))
VERIFY_IN = ("tokens", "cache_len", "kv_cache", "verify_len")  # then SpecVerify's sampling inputs
VERIFY_OUT = ("accepted", "next_token", "taps", "kv_new")
SAMPLING_IN = ("draft_probs", "temperature", "uniforms")
DRAFT_IN = ("anchor", "ctx_taps", "ctx_count", "cache_len", "draft_kv")
DRAFT_OUT_GREEDY = ("draft_tokens", "confidence_logits", "draft_kv_new")
DRAFT_OUT_SAMPLING = ("draft_tokens", "confidence_logits", "draft_probs", "draft_kv_new")


def _spec(pair: tuple[Path, Path], tmp_path: Path, **kwargs) -> BuildSpec:
    return BuildSpec(*pair, tmp_path / "out", **kwargs)


@pytest.mark.parametrize("mode", ["sampling", "greedy"])
def test_names_and_dynamic_dims_are_the_documented_ones(golden_pair: tuple[Path, Path], tmp_path: Path,
                                                        mode: str) -> None:
    spec = _spec(golden_pair, tmp_path, verify_mode=mode)
    parts = partition(graft(load(spec), spec), spec)
    assert tuple(g.name for g in parts.graphs) == GRAPH_NAMES
    prefill, verify, draft = parts.graphs
    assert (tuple(prefill.inputs), prefill.outputs) == PREFILL
    sampling = mode == "sampling"
    assert (tuple(verify.inputs), verify.outputs) == (VERIFY_IN + (SAMPLING_IN if sampling else ()), VERIFY_OUT)
    assert tuple(draft.inputs) == DRAFT_IN + (("temperature", "uniforms") if sampling else ())
    assert draft.outputs == (DRAFT_OUT_SAMPLING if sampling else DRAFT_OUT_GREEDY)
    cache = {2: "batch", 4: "cache_slots"}
    assert prefill.dynamic == {"input_ids": {0: "batch", 1: "prompt_len"}, "input_lengths": {0: "batch"},
                               "kv_cache": cache}
    assert verify.dynamic == {"tokens": {0: "batch", 1: "verify_tokens"}, "cache_len": {0: "batch"},
                              "kv_cache": cache, "verify_len": {0: "batch"}} | ({
        "draft_probs": {0: "batch", 1: "draft_len"}, "temperature": {0: "batch"},
        "uniforms": {0: "batch", 1: "verify_tokens"}} if sampling else {})
    assert draft.dynamic["ctx_taps"] == {0: "batch", 1: "ctx_len"}
    assert draft.dynamic["draft_kv"] == cache
    assert all(draft.dynamic[name] == {0: "batch"} for name in draft.inputs if name not in ("ctx_taps", "draft_kv"))


@torch.inference_mode()
def test_modules_compute_the_program(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    spec = _spec(golden_pair, tmp_path)
    program = graft(load(spec), spec)
    parts = partition(program, spec)
    target = program.target

    prefill = parts.graph("target_prefill")
    last, taps, kv = prefill.module(*prefill.inputs.values())
    ids, lengths = prefill.inputs["input_ids"], prefill.inputs["input_lengths"]
    b, t = ids.shape
    assert (last.shape, taps.shape, kv.shape) == ((b, V), (b, t, TAPS), (L, 2, b, KV, t, D))  # only new rows
    for row in range(b):  # each prompt alone, unpadded: the last position's logits
        n = int(lengths[row])
        hidden, _, _ = target(ids[row : row + 1, :n], torch.zeros(1, dtype=torch.int64), target.new_cache(1, 16))
        assert (last[row] - target.logits(hidden[0, -1])).abs().max() < 1e-5

    verify = parts.graph("target_verify")
    accepted, next_token, vtaps, vkv = verify.module(*verify.inputs.values())
    tokens, cache_len, kv = (verify.inputs[k] for k in ("tokens", "cache_len", "kv_cache"))
    g1 = tokens.shape[1]
    hidden, taps, kv_out = target(tokens, cache_len, kv)
    want = spec_verify_reference(target.logits(hidden), tokens[:, 1:], verify.inputs["verify_len"], mode="sampling",
                                 **{k: verify.inputs[k] for k in SAMPLING_IN})
    assert g1 == 8 and [accepted.tolist(), next_token.tolist()] == [w.tolist() for w in want]
    assert torch.equal(vtaps, taps) and vkv.shape == (L, 2, b, KV, g1, D)
    for row in range(b):  # the new rows are the cache the model wrote, at slots cache_len .. cache_len + G
        start = int(cache_len[row])
        assert torch.equal(vkv[:, :, row], kv_out[:, :, row, :, start : start + g1])

    draft = parts.graph("draft_propose")
    tokens, confidence, probs, dkv = draft.module(*draft.inputs.values())
    assert (tokens.shape, confidence.shape, probs.shape) == ((b, 7), (b, 7), (b, 7, V))
    assert dkv.shape == (LD, 2, b, KV, draft.inputs["ctx_taps"].shape[1], D)
    assert torch.allclose(probs.sum(-1), torch.ones(b, 7), atol=1e-5)
    # The example temperature is 1 and the uniforms 0.5: each token is the median draw of its distribution.
    cdf = probs.cumsum(-1)
    below = torch.gather(cdf, 2, tokens[..., None]).squeeze(-1) - torch.gather(probs, 2, tokens[..., None]).squeeze(-1)
    assert bool((below <= 0.5 + 1e-6).all()) and bool((torch.gather(cdf, 2, tokens[..., None]) > 0.5 - 1e-6).all())


def test_block_size_override_sets_the_verify_width(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    spec = _spec(golden_pair, tmp_path, block_size=4)
    parts = partition(graft(load(spec), spec), spec)
    assert parts.program.draft.block_size == 4
    assert parts.graph("target_verify").inputs["tokens"].shape[1] == 5
    assert parts.graph("draft_propose").inputs["uniforms"].shape[1] == 4
    tokens, *_ = parts.graph("draft_propose").module(*parts.graph("draft_propose").inputs.values())
    assert tokens.shape[1] == 4
