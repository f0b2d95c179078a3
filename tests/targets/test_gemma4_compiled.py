"""The Gemma4 golden pair through the whole pipeline, one build: ONNX graphs that onnxruntime decodes into the
authors' traces, TensorRT-RTX engines for the three graphs, and the Triton repository serving them.

The graphs keep the family-agnostic contract (docs/PROGRAM.md): one padded [L, 2, B, KV, S, D] cache per model,
full length, the sliding window as a mask. Slow: exporting the six graphs and building three engines takes
several minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from dspark_compile import api
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
    assert (program["kv_heads"], program["head_dim"], program["draft_kv_heads"]) == (2, 32, 1)  # padded geometry
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
