"""Issue 14: target_step split by decoder-layer range (targets/tensorrt/segments.py). The golden target (4 layers,
about 148 KB of constant weights each) is split into 2, 3 and 4 segments; the segments, run in order with
onnxruntime, compute what the whole graph computes; their files hold graph protos only, every initializer
pointing into the build's one weights.bin. End to end, a build with a tiny --max-engine-gb gets one TensorRT-RTX
engine per segment, recorded in the manifest. The Gemma4 golden target (6 mixed sliding/global layers, traced
whole, with the sliding layers' ring) splits the same way (slow tier: each compiles a Gemma4 pair)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_run import run_graph

from dspark_compile.errors import BuildError
from dspark_compile.passes.share_weights import WEIGHTS_FILE
from dspark_compile.targets.tensorrt.segments import (
    LAYER_PREFIX,
    Segment,
    constant_weight_bytes,
    derived_ranges,
    layer_ranges,
    split,
)

B, SLOTS, VOCAB = 3, 24, 384
SPLITS = {  # how the split is asked for -> the layer ranges it must give
    "2 by bytes": ({"max_bytes": 400_000}, [(0, 1), (2, 3)]),
    "3 by count": ({"count": 3}, [(0, 1), (2, 2), (3, 3)]),
    "4 by bytes": ({"max_bytes": 160_000}, [(0, 0), (1, 1), (2, 2), (3, 3)]),
}


@pytest.fixture(scope="module")
def onnx_dir(golden_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the golden build's graphs and weights.bin: segment files are written beside them."""
    out = tmp_path_factory.mktemp("segments") / "onnx"
    shutil.copytree(golden_build / "onnx", out)
    return out


@pytest.fixture(scope="module")
def whole(onnx_dir: Path) -> ir.Model:
    return ir.load(onnx_dir / "target_step.onnx")


def _write(segments: list[Segment], directory: Path, tag: str) -> list[Path]:
    paths = []
    for s in segments:
        path = directory / f"target_step.{tag}.seg{s.index}.onnx"
        path.write_bytes(s.model.SerializeToString())
        paths.append(path)
    return paths


def _feeds(phase: str, seed: int) -> dict[str, np.ndarray]:
    """Random but valid target_step inputs: a prefill of prompts of 9, 4 and 1 tokens, or a verification of 7
    drafts (verify lengths 7, 6, 3) over caches holding 0, 6 and 13 tokens; random embedding and LM head."""
    rng = np.random.default_rng(seed)
    common = {"kv_cache": rng.normal(size=(4, 2, B, 2, SLOTS, 16)).astype(np.float32),
              "embed_tokens": rng.normal(size=(VOCAB, 64)).astype(np.float32),
              "lm_head": rng.normal(size=(VOCAB, 64)).astype(np.float32),
              "temperature": np.array([0.0, 0.8, 1.5], np.float32)}
    if phase == "prefill":
        return common | {"tokens": rng.integers(0, VOCAB, (B, 9)), "cache_len": np.zeros(B, np.int64),
                         "logit_rows": np.array([[8], [3], [0]]), "verify_len": np.zeros(B, np.int64),
                         "draft_probs": np.zeros((B, 0, VOCAB), np.float32),
                         "uniforms": rng.random((B, 1)).astype(np.float32)}
    q = rng.random((B, 7, VOCAB)).astype(np.float32)
    return common | {"tokens": rng.integers(0, VOCAB, (B, 8)), "cache_len": np.array([0, 6, 13]),
                     "logit_rows": np.tile(np.arange(8), (B, 1)), "verify_len": np.array([7, 6, 3]),
                     "draft_probs": q / q.sum(-1, keepdims=True), "uniforms": rng.random((B, 8)).astype(np.float32)}


@pytest.mark.parametrize("how", list(SPLITS))
def test_layer_ranges(whole: ir.Model, how: str) -> None:
    ask, want = SPLITS[how]
    assert layer_ranges(whole, **ask) == want


@pytest.mark.parametrize("how", list(SPLITS))
def test_chain_computes_the_whole_graph(whole: ir.Model, onnx_dir: Path, how: str) -> None:
    """Tokens equal, floats within 1e-6 (on onnxruntime's CPU provider they come out bit-equal)."""
    want = SPLITS[how][1]
    segments = split(whole, want)
    assert [(s.first, s.last) for s in segments] == want and {s.count for s in segments} == {len(want)}
    paths = _write(segments, onnx_dir, how.replace(" ", "_"))
    for phase, seed in (("prefill", 1), ("verify", 2)):
        _check_chain(onnx_dir / "target_step.onnx", segments, paths, _feeds(phase, seed), phase)


def _check_chain(whole: Path, segments: list[Segment], paths: list[Path], feeds: dict[str, np.ndarray],
                 phase: str) -> None:
    """The segments run in order, each fed by name, make every output of the whole graph: integers equal,
    floats within 1e-6."""
    expected = run_graph(whole, feeds)
    values = dict(feeds)
    for segment, path in zip(segments, paths, strict=True):
        out = run_graph(path, values)
        assert list(out) == list(segment.outputs)
        assert not set(out) & set(values)  # each value is made once
        values |= out
    assert set(expected) <= set(values)
    for name, want_value in expected.items():
        got = values[name]
        assert got.dtype == want_value.dtype and got.shape == want_value.shape, name
        if want_value.dtype == np.int64:
            assert np.array_equal(got, want_value), (phase, name)
        else:
            assert float(np.abs(got - want_value).max()) <= 1e-6, (phase, name)


@pytest.mark.parametrize("how", list(SPLITS))
def test_segments_share_the_weights_file(whole: ir.Model, onnx_dir: Path, how: str) -> None:
    """Graph protos only: every external initializer points into weights.bin at its whole-graph offset; each
    initializer is in exactly the segments whose nodes use it; the segments' weights add up to the graph's,
    plus at most 1% of small constants that several segments use."""
    segments = split(whole, SPLITS[how][1])
    paths = _write(segments, onnx_dir, f"w_{how.replace(' ', '_')}")
    original = onnx.load(str(onnx_dir / "target_step.onnx"), load_external_data=False)
    where = {t.name: list(t.external_data) for t in original.graph.initializer}
    seen: dict[str, int] = {}
    for path in paths:
        model = onnx.load(str(path), load_external_data=False)
        used = {name for node in model.graph.node for name in node.input}
        names = [t.name for t in model.graph.initializer]
        assert set(names) == used & set(where) and len(names) == len(set(names))
        for t in model.graph.initializer:
            assert list(t.external_data) == where[t.name]  # same file, offset and length: no byte copied
            if t.data_location == onnx.TensorProto.EXTERNAL:
                assert {e.key: e.value for e in t.external_data}["location"] == WEIGHTS_FILE
            seen[t.name] = seen.get(t.name, 0) + 1
        onnx.checker.check_model(str(path), full_check=True)  # a valid graph of its own, types inferred
    assert set(seen) == set(where)
    assert sorted(p.name for p in onnx_dir.iterdir() if not p.name.endswith(".onnx")) == [WEIGHTS_FILE]  # no .data
    total = constant_weight_bytes(whole)
    assert total < sum(s.weight_bytes for s in segments) <= 1.01 * total
    big = {name for name, n in seen.items() if n > 1 and name in {v.name for v in whole.graph.initializers.values()
                                                                  if v.const_value.nbytes >= 1024}}
    assert big == set()  # every weight of 1 KiB or more is in one segment only


def test_only_hidden_states_and_kv_rows_cross_segments(whole: ir.Model) -> None:
    """Masks, positions and shape arithmetic are recomputed in each segment; what crosses is each layer's
    output (float [batch, step_len, 64]) and its new KV rows; layer nodes that apply a weight stay in their
    layer's segment."""
    segments = split(whole, [(0, 0), (1, 1), (2, 2), (3, 3)])
    graph_inputs = {v.name for v in whole.graph.inputs}
    for segment in segments:
        io = segment.io()
        crossing = [t for t in io.inputs if t.name not in graph_inputs]
        assert all(t.dtype == "float" for t in crossing)
        assert {t.shape for t in crossing} <= {("batch", "step_len", 64), (1, 2, "batch", 2, "step_len", 16)}
        if segment.index:
            assert f"{LAYER_PREFIX}{segment.index - 1}.y" in {t.name for t in crossing}
        weighted = {n.name.split(".")[2] for n in segment.model.graph.node if n.name.startswith(LAYER_PREFIX)
                    and n.op_type == "MatMul"}
        assert weighted == {str(segment.index)}


def test_a_layer_over_the_limit_is_an_error(whole: ir.Model) -> None:
    with pytest.raises(BuildError, match=r"layer \d alone holds 0\.000 GB of constant weights, more than the "
                                         r"engine limit 0\.000 GB \(--max-engine-gb\); raise the limit"):
        layer_ranges(whole, max_bytes=100_000)


def test_profiles_of_dims_made_inside_the_graph() -> None:
    from dspark_compile.artifacts import GraphIO, TensorIO

    io = GraphIO((TensorIO("x", "float", ("batch", "2*step_len", "decide_len - 1", "other + 1")),), ())
    ranges = {"batch": (1, 2, 4), "step_len": (1, 8, 8), "decide_len": (1, 8, 8)}
    assert derived_ranges(io, ranges) == ranges | {"2*step_len": (2, 16, 16), "decide_len - 1": (0, 7, 7)}


@pytest.mark.slow  # a TensorRT-RTX build of the golden pair (~20 s on 2 cores)
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                    reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")
def test_build_with_a_tiny_engine_limit_builds_segment_engines(golden_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from dspark_compile import api
    from dspark_compile.cli import main

    pair = golden_dir / "dspark_tiny"
    out = api.build(target=pair / "target", draft=pair / "draft", out=tmp_path / "b", targets="onnx,tensorrt",
                    trt_flavor="rtx", max_batch=4, max_context=128, max_engine_gb=0.0004, progress=False).out
    manifest = json.loads((out / "manifest.json").read_text())
    plans = manifest["engines"]["plans"]
    assert [(p["graph"], p["plan"], p.get("segment"), p.get("segments")) for p in plans] == [
        ("target_step", "target_step.seg0.plan", 0, 2), ("target_step", "target_step.seg1.plan", 1, 2),
        ("draft_propose", "draft_propose.plan", None, None)]
    assert not (out / "engines" / "target_step.plan").exists()
    seg0, seg1 = plans[:2]
    assert seg0["inputs"] == ["tokens", "cache_len", "kv_cache", "embed_tokens"]
    assert seg0["outputs"][:2] == ["target.layers.0.y", "target.layers.1.y"]
    assert set(seg0["outputs"]) <= set(seg1["inputs"])
    assert set(seg1["outputs"]) == {"accepted", "next_token", "taps", "kv_new"}
    whole = constant_weight_bytes(ir.load(out / "onnx" / "target_step.onnx"))
    assert whole < seg0["weight_bytes"] + seg1["weight_bytes"] <= 1.01 * whole
    assert max(seg0["weight_bytes"], seg1["weight_bytes"]) <= 400_000
    for plan in plans[:2]:
        meta = json.loads((out / "engines" / plan["plan"]).with_suffix(".plan.json").read_text())
        assert {t["name"] for t in meta["inputs"]} == set(plan["inputs"])
        assert {t["name"] for t in meta["outputs"]} == set(plan["outputs"])
        assert len(meta["profiles"]) == 2 and plan["plan_bytes"] > 100_000  # verification and prefill
    artifacts = {a["path"]: a for a in manifest["artifacts"]}
    for k in range(2):
        assert artifacts[f"onnx/target_step.seg{k}.onnx"]["signature"]["outputs"]
    memory = manifest["memory"]
    assert memory["weight_bytes"] == sum(p["weight_bytes"] for p in plans) + sum(
        r["bytes"] for r in manifest["weight_inputs"].values())
    assert memory["activation_bytes"] == sum(max(p["activation_bytes"]) for p in plans)  # a context each
    main(["inspect", str(out)])  # the human report names each segment
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines if line.strip().startswith("engine ")] == [
        "engine target_step segment 0/2", "engine target_step segment 1/2", "engine draft_propose"]


# Gemma4: sliding and global layers of different shapes, so the target is traced whole and export_onnx names its
# layers' nodes from the exporter's module scopes (layer_template.name_by_layer); the sliding layers read the ring
# (input kv_ring) and give their new rows (output ring_new), the global ones read kv_cache and give kv_new.
G4_PAIR, G4_SLOTS, RING = "dspark_tiny_gemma4", 48, 23
G4_SPLITS = {  # 6 layers (sliding 0, 1, 3, 4; global 2, 5), about 150-175 KB of weights each
    "2 by count": ({"count": 2}, [(0, 2), (3, 5)]),
    "3 by bytes": ({"max_bytes": 400_000}, [(0, 1), (2, 3), (4, 5)]),
}


@pytest.fixture(scope="module")
def gemma4_onnx(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Gemma4 golden pair compiled to ONNX (graphs and weights.bin); segment files are written beside."""
    from dspark_compile import api

    pair = golden_dir / G4_PAIR
    out = tmp_path_factory.mktemp("gemma4_segments") / "build"
    api.build(target=pair / "target", draft=pair / "draft", out=out, progress=False)
    return out / "onnx"


def _gemma4_feeds(phase: str, seed: int) -> dict[str, np.ndarray]:
    """:func:`_feeds` for the Gemma4 target: 2 global layers of 1 KV head x 32 in kv_cache, 4 sliding layers of
    2 x 16 in a ring of 23 slots; the verification's caches hold 0, 17 and 33 tokens (past the ring's size)."""
    rng = np.random.default_rng(seed)
    feeds = _feeds(phase, seed)
    feeds["kv_cache"] = rng.normal(size=(2, 2, B, 1, G4_SLOTS, 32)).astype(np.float32)
    feeds["kv_ring"] = rng.normal(size=(4, 2, B, 2, RING, 16)).astype(np.float32)
    if phase == "verify":
        feeds["cache_len"] = np.array([0, 17, 33])
    return feeds


@pytest.mark.slow  # compiles the Gemma4 pair to ONNX (~25 s on 2 cores)
@pytest.mark.parametrize("how", list(G4_SPLITS))
def test_gemma4_chain_computes_the_whole_graph(gemma4_onnx: Path, how: str) -> None:
    """A Gemma4 target splits at its layers like a Qwen3 one, and the chain computes the whole graph; the
    ring's input goes to every segment holding a sliding layer, its output comes from one segment; every
    weight of 1 KiB or more is in one segment only."""
    ask, want = G4_SPLITS[how]
    whole = ir.load(gemma4_onnx / "target_step.onnx")
    assert layer_ranges(whole, **ask) == want
    segments = split(whole, want)
    assert [(s.first, s.last) for s in segments] == want
    paths = _write(segments, gemma4_onnx, how.replace(" ", "_"))
    for phase, seed in (("prefill", 1), ("verify", 2)):
        _check_chain(gemma4_onnx / "target_step.onnx", segments, paths, _gemma4_feeds(phase, seed), phase)
    assert all("kv_ring" in s.inputs for s in segments)  # each holds sliding layers
    assert [s.index for s in segments if "ring_new" in s.outputs] == [len(segments) - 1]
    assert set(segments[-1].outputs) >= {"accepted", "next_token", "taps", "kv_new", "ring_new"}
    big = {n for n, v in whole.graph.initializers.items() if v.const_value is not None
           and v.const_value.nbytes >= 1024}
    seen = [n for s in segments for n in (t.name for t in s.model.graph.initializer) if n in big]
    assert sorted(seen) == sorted(big)  # each in exactly one segment
    total = constant_weight_bytes(whole)
    assert total < sum(s.weight_bytes for s in segments) <= 1.01 * total


@pytest.mark.slow  # a TensorRT-RTX build of the Gemma4 golden pair
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                    reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")
def test_gemma4_build_with_a_tiny_engine_limit_builds_segment_engines(golden_dir: Path, tmp_path: Path) -> None:
    from dspark_compile import api

    pair = golden_dir / G4_PAIR
    out = api.build(target=pair / "target", draft=pair / "draft", out=tmp_path / "b", targets="onnx,tensorrt",
                    trt_flavor="rtx", max_batch=4, max_context=128, max_engine_gb=0.0004, progress=False).out
    manifest = json.loads((out / "manifest.json").read_text())
    plans = manifest["engines"]["plans"]
    assert [(p["graph"], p["plan"], p.get("segment"), p.get("segments")) for p in plans] == [
        *(("target_step", f"target_step.seg{k}.plan", k, 3) for k in range(3)),
        ("draft_propose", "draft_propose.plan", None, None)]
    assert not (out / "engines" / "target_step.plan").exists()
    segs = plans[:3]
    assert segs[0]["inputs"] == ["tokens", "cache_len", "kv_ring", "embed_tokens"]
    assert "kv_cache" in segs[1]["inputs"]  # global layer 2
    assert set(segs[2]["outputs"]) == {"accepted", "next_token", "taps", "kv_new", "ring_new"}
    made = set(segs[0]["outputs"])
    for plan in segs[1:]:
        assert {n for n in plan["inputs"] if n.startswith(LAYER_PREFIX)} <= made
        made |= set(plan["outputs"])
    whole = constant_weight_bytes(ir.load(out / "onnx" / "target_step.onnx"))
    assert whole < sum(p["weight_bytes"] for p in segs) <= 1.01 * whole
    assert max(p["weight_bytes"] for p in segs) <= 400_000
    for plan in segs:
        meta = json.loads((out / "engines" / plan["plan"]).with_suffix(".plan.json").read_text())
        assert {t["name"] for t in meta["inputs"]} == set(plan["inputs"])
        assert {t["name"] for t in meta["outputs"]} == set(plan["outputs"])
        assert len(meta["profiles"]) == 2 and plan["plan_bytes"] > 100_000  # verification and prefill


@pytest.mark.slow  # compiles a Gemma4 pair to ONNX (~25 s on 2 cores)
def test_gemma4_per_layer_inputs_are_computed_once(golden_dir: Path, tmp_path: Path,
                                                   edit_config: Callable[..., Path],
                                                   edit_weights: Callable[..., Path]) -> None:
    """A target with per-layer inputs (Gemma4 E-series: a [vocab, L x P] embedding and a projection applied
    before the layers) computes them in the first segment, which hands each layer's slice on: the weights
    are in one segment only, not copied into each, and the chain still computes the whole graph."""
    import torch

    from dspark_compile import api

    pair = tmp_path / "pair"
    shutil.copytree(golden_dir / G4_PAIR, pair)
    p, layers = 8, 6
    edit_config(pair / "target", hidden_size_per_layer_input=p, vocab_size_per_layer_input=VOCAB)
    gen = torch.Generator().manual_seed(3)

    def add(tensors: dict[str, torch.Tensor]) -> None:
        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * 0.1

        tensors |= {"model.embed_tokens_per_layer.weight": rand(VOCAB, layers * p),
                    "model.per_layer_model_projection.weight": rand(layers * p, 64),
                    "model.per_layer_projection_norm.weight": torch.ones(p)}
        for i in range(layers):
            tensors |= {f"model.layers.{i}.per_layer_input_gate.weight": rand(p, 64),
                        f"model.layers.{i}.per_layer_projection.weight": rand(64, p),
                        f"model.layers.{i}.post_per_layer_input_norm.weight": torch.ones(64)}

    edit_weights(pair / "target", add)
    out = tmp_path / "build"
    api.build(target=pair / "target", draft=pair / "draft", out=out, progress=False)
    onnx_dir = out / "onnx"
    whole = ir.load(onnx_dir / "target_step.onnx")
    big = {n for n, v in whole.graph.initializers.items() if v.const_value is not None
           and v.const_value.nbytes >= 1024}
    assert "target.embed_tokens_per_layer.weight" in big
    segments = split(whole, layer_ranges(whole, count=3))
    seen = [n for s in segments for n in (t.name for t in s.model.graph.initializer) if n in big]
    assert sorted(seen) == sorted(big)
    assert "target.embed_tokens_per_layer.weight" in {t.name for t in segments[0].model.graph.initializer}
    paths = _write(segments, onnx_dir, "ple")
    for phase, seed in (("prefill", 1), ("verify", 2)):
        _check_chain(onnx_dir / "target_step.onnx", segments, paths, _gemma4_feeds(phase, seed), phase)
