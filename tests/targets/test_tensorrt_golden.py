"""TensorRT-RTX (the real TensorRT-family builder; no GPU needed) builds engines for all three graphs of both
golden pairs, fp32 and fp16, through the compiler's own `build_tensorrt` pass; `package_triton` serves them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dspark_compile import api
from dspark_compile.targets.triton import pbtxt

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                                reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")
GRAPHS = ("target_prefill", "target_verify", "draft_propose")


@pytest.fixture
def rtx_build(request: pytest.FixtureRequest, golden_dir: Path, tmp_path: Path, pair: str, dtype: str) -> Path:
    """fp32 ``dspark_tiny`` is the session's shared build; the other three are built here."""
    if (pair, dtype) == ("dspark_tiny", "fp32"):
        return request.getfixturevalue("golden_rtx_build")
    src = golden_dir / pair
    return api.build(target=src / "target", draft=src / "draft", out=tmp_path / "b", dtype=dtype,
                     targets="onnx,tensorrt", trt_flavor="rtx", max_batch=4, max_context=128, progress=False).out


@pytest.mark.slow  # a build of ~45 s each on 2 cores (fp32 dspark_tiny: the shared one)
@pytest.mark.parametrize("pair", ["dspark_tiny", "dspark_tiny_random"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_rtx_engines_for_every_graph(rtx_build: Path, dtype: str) -> None:
    engines = json.loads((rtx_build / "manifest.json").read_text())["engines"]
    assert engines["flavor"] == "rtx"
    assert [p["graph"] for p in engines["plans"]] == list(GRAPHS)
    for plan in engines["plans"]:
        assert plan["precision"] == dtype and plan["plugin"] is False  # RTX has no plugins: portable verify
        path = rtx_build / "engines" / plan["plan"]
        assert path.stat().st_size > 100_000
        meta = json.loads(path.with_suffix(".plan.json").read_text())
        assert meta["flavor"] == "rtx"
        names = {t["name"] for t in meta["inputs"]}
        want = {"target_prefill": {"input_ids", "input_lengths", "kv_cache"},
                "target_verify": {"tokens", "cache_len", "verify_len", "kv_cache", "draft_probs", "temperature",
                                  "uniforms"},
                "draft_propose": {"anchor", "ctx_taps", "ctx_count", "cache_len", "draft_kv", "temperature",
                                  "uniforms"}}[plan["graph"]]
        assert names == want
        # KV contract: only the new rows come back (build_engine refused any output with `cache_slots`)
        outputs = {t["name"] for t in meta["outputs"]}
        assert outputs == {"target_prefill": {"last_logits", "taps", "kv_new"},
                           "target_verify": {"accepted", "next_token", "taps", "kv_new"},
                           "draft_propose": {"draft_tokens", "confidence_logits", "draft_probs", "draft_kv_new"},
                           }[plan["graph"]]
    inspect = json.loads((rtx_build / "engines" / "target_verify.plan.inspect.json").read_text())
    # The decomposed verification is visible as its own layers (named after the spec_verify/ subgraph).
    assert len(inspect["verify_layers"]) >= 10
    assert all("spec_verify/" in json.dumps(layer) for layer in inspect["verify_layers"])
    assert inspect["plugin_layers"] == []


@pytest.mark.slow  # the shared RTX build, when no test above made it
def test_triton_repository_serves_the_engines(golden_rtx_build: Path) -> None:
    """`package_triton` after `build_tensorrt`: one tensorrt_plan model per graph holding that graph's engine,
    and the BLS orchestrator sized by the build spec."""
    repo = golden_rtx_build / "triton"
    manifest = json.loads((golden_rtx_build / "manifest.json").read_text())
    models = {"target_prefill": "dspark_target_prefill", "target_verify": "dspark_target_verify",
              "draft_propose": "dspark_draft"}
    assert manifest["triton"] == {"models": sorted(["dspark", *models.values()])}
    for graph, model in models.items():
        config = pbtxt.validate_config(repo / model / "config.pbtxt")
        assert config.platform == "tensorrt_plan"
        plan = repo / model / "1" / "model.plan"
        assert plan.read_bytes() == (golden_rtx_build / "engines" / f"{graph}.plan").read_bytes()
    parameters = pbtxt.validate_config(repo / "dspark" / "config.pbtxt").parameters
    assert parameters["backend_mode"].string_value == "bls"
    assert (int(parameters["max_batch"].string_value), int(parameters["max_context"].string_value)) == (4, 128)
