"""The Gemma4 golden pair through the whole pipeline, one build: ONNX graphs that onnxruntime decodes into the
authors' traces, TensorRT-RTX engines for the three graphs, and the Triton repository serving them.

The target's sliding layers keep only a ring of R = W + G slots (``kv_ring``/``ring_new``, docs/PROGRAM.md); its
global layers and the draft keep full-length caches of their own head shape. Slow: exporting the graphs and
building the engines takes several minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dspark_compile import api
from dspark_compile.artifacts import GraphIO
from dspark_compile.checkpoint import load_target
from dspark_compile.models.gemma4 import Gemma4Target
from dspark_compile.targets.triton import pbtxt

pytest.importorskip("onnxruntime")

PAIR = "dspark_tiny_gemma4"
RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
GRAPHS = ("target_step", "draft_propose")


@pytest.fixture(scope="module")
def gemma4_build(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma4_build") / "build"
    targets = "onnx,tensorrt,triton" if RTX else "onnx"
    api.build(target=golden_dir / PAIR / "target", draft=golden_dir / PAIR / "draft", out=out, targets=targets,
              trt_flavor="rtx", max_batch=4, max_context=128, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("verify", "trace"), [("fixed", "greedy"), ("threshold=0.5", "threshold_0.5")])
def test_onnxruntime_reproduces_the_gemma4_golden(gemma4_build: Path, golden_dir: Path, verify: str,
                                                  trace: str) -> None:
    golden: dict[str, Any] = json.loads((golden_dir / PAIR / "decode_greedy.json").read_text())
    program = json.loads((gemma4_build / "manifest.json").read_text())["program"]
    assert program["family"] == "gemma4"
    # kv_cache: the 2 global layers, unpadded (1 KV head of 32); the 4 sliding ones (2 x 16) in a ring of 16 + 7
    assert (program["kv_heads"], program["head_dim"], program["draft_kv_heads"]) == (1, 32, 1)
    assert [program[k] for k in ("ring_layers", "ring_kv_heads", "ring_slots", "ring_head_dim")] == [4, 2, 23, 16]
    results = api.run(gemma4_build, [e["prompt"] for e in golden[trace]], backend="onnxruntime", max_new_tokens=48,
                      verify=verify)
    for got, want in zip(results, golden[trace], strict=True):
        assert got.tokens == want["tokens"]
        assert [r["accepted"] for r in got.rounds] == want["acceptance_lengths"]
        assert [r["draft"] for r in got.rounds] == [r["draft"] for r in want["rounds"]]


@pytest.mark.slow
@pytest.mark.skipif(not RTX, reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")
def test_rtx_engines_and_triton_repository(gemma4_build: Path) -> None:
    manifest = json.loads((gemma4_build / "manifest.json").read_text())
    engines = manifest["engines"]
    assert engines["flavor"] == "rtx" and [p["graph"] for p in engines["plans"]] == list(GRAPHS)
    for plan in engines["plans"]:
        assert plan["precision"] == "fp32" and plan["plugin"] is False
        path = gemma4_build / "engines" / plan["plan"]
        assert path.stat().st_size > 100_000
        meta = json.loads(path.with_suffix(".plan.json").read_text())
        assert {t["name"] for t in meta["outputs"]} >= ({"kv_new"} if plan["graph"] != "draft_propose"
                                                       else {"draft_kv_new"})
    models = {"target_step": "dspark_target", "draft_propose": "dspark_draft"}
    assert manifest["triton"] == {"models": sorted(["dspark", *models.values()])}
    for graph, model in models.items():
        assert pbtxt.validate_config(gemma4_build / "triton" / model / "config.pbtxt").platform == "tensorrt_plan"
        plan = gemma4_build / "triton" / model / "1" / "model.plan"
        assert plan.read_bytes() == (gemma4_build / "engines" / f"{graph}.plan").read_bytes()


@pytest.mark.slow
def test_the_ring_saves_the_sliding_layers_memory(gemma4_build: Path) -> None:
    """target_step's ring holds R = W + G = 16 + 7 slots per sliding layer whatever the context, and the
    manifest's KV bytes per sequence drop from the padded full-length cache to the ring plus unpadded global
    layers (fp32, max_context 128, max_batch 4)."""
    io = GraphIO.read(gemma4_build / "onnx" / "target_step.onnx")
    shapes = {t.name: list(t.shape or ()) for t in (*io.inputs, *io.outputs)}
    assert shapes["kv_ring"] == [4, 2, "batch", 2, 23, 16]  # sliding layers, K/V, B, KV_s, R, D_s
    assert shapes["ring_new"] == [4, 2, "batch", 2, "step_len", 16]
    assert shapes["kv_cache"] == [2, 2, "batch", 1, "cache_slots", 32]  # the global layers only
    memory = json.loads((gemma4_build / "manifest.json").read_text())["memory"]
    slot, kv_bytes = 2 * 4, memory["kv_cache_bytes"]  # K and V, fp32
    draft = 128 * slot * 2 * 1 * 32
    full_length = 128 * slot * 6 * 2 * 32 + draft  # before: every layer padded to 2 x 32, 128 slots
    ring = 128 * slot * 2 * 1 * 32 + 23 * slot * 4 * 2 * 16 + draft
    assert (full_length, ring) == (458_752, 154_624)
    assert (memory["max_batch"], kv_bytes) == (4, 4 * ring)


@pytest.mark.slow
def test_prompts_longer_than_the_ring_decode_exactly(gemma4_build: Path, golden_dir: Path) -> None:
    """Prompts of 41 and 5 tokens (a prefill longer than the 23-slot ring, beside a short right-padded one)
    with the confidence threshold (partly rejected verify blocks): onnxruntime's graphs and the torch reference
    agree round by round, and the tokens are the target's own greedy continuation computed without any cache."""
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(5, 384, (n,), generator=gen).tolist() for n in (41, 5)]
    runs = {backend: api.run(gemma4_build, prompts, backend=backend, max_new_tokens=40, verify="threshold=0.5")
            for backend in ("onnxruntime", "torch")}
    for got, ref in zip(runs["onnxruntime"], runs["torch"], strict=True):
        assert got.tokens == ref.tokens
        assert [r["accepted"] for r in got.rounds] == [r["accepted"] for r in ref.rounds]
        assert [r["draft"] for r in got.rounds] == [r["draft"] for r in ref.rounds]
    assert any(0 < r["accepted"] < 7 for got in runs["torch"] for r in got.rounds)  # partly rejected blocks
    ckpt = load_target(golden_dir / PAIR / "target")
    target = Gemma4Target.from_weights(ckpt.config, ckpt.weights.get)
    with torch.inference_mode():
        for prompt, got in zip(prompts, runs["torch"], strict=True):
            ids = torch.tensor([prompt])
            for _ in range(len(got.tokens)):
                hidden, _, _ = target(ids, torch.zeros(1, dtype=torch.int64), target.new_cache(1, ids.shape[1]))
                ids = torch.cat((ids, target.logits(hidden[:, -1:]).argmax(-1)), dim=1)
            assert got.tokens == ids[0, len(prompt):].tolist()
