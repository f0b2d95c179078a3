"""TensorRT-RTX (the real TensorRT-family builder; no GPU needed) builds engines for both graphs of both golden
pairs, fp32 and fp16, through the compiler's own `build_tensorrt` pass; `package_triton` serves them. The engines
hold the program's unique weights once: their bytes over the unique weight bytes are reported and bounded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dspark_compile import api
from dspark_compile.targets.triton import pbtxt

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                                reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")
GRAPHS = ("target_step", "draft_propose")
WEIGHTS = {"embed_tokens", "lm_head"}  # graph inputs: held once by the runtime, in no engine


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
        want = {"target_step": {"tokens", "cache_len", "kv_cache", "logit_rows", "verify_len", "draft_probs",
                                "temperature", "uniforms"} | WEIGHTS,
                "draft_propose": {"anchor", "ctx_taps", "ctx_count", "cache_len", "draft_kv", "temperature",
                                  "uniforms"} | WEIGHTS}[plan["graph"]]
        assert names == want
        # KV contract: only the new rows come back (build_engine refused any output with `cache_slots`)
        outputs = {t["name"] for t in meta["outputs"]}
        assert outputs == {"target_step": {"accepted", "next_token", "taps", "kv_new"},
                           "draft_propose": {"draft_tokens", "confidence_logits", "draft_probs", "draft_kv_new"},
                           }[plan["graph"]]
        # One engine for prefill and verification: two profiles (verify, prefill) per KV bucket.
        assert len(meta["profiles"]) == (2 if plan["graph"] == "target_step" else 1)
    inspect = json.loads((rtx_build / "engines" / "target_step.plan.inspect.json").read_text())
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
    models = {"target_step": "dspark_target", "draft_propose": "dspark_draft"}
    assert manifest["triton"] == {"models": sorted(["dspark", *models.values()])}
    for graph, model in models.items():
        config = pbtxt.validate_config(repo / model / "config.pbtxt")
        assert config.platform == "tensorrt_plan"
        plan = repo / model / "1" / "model.plan"
        assert plan.read_bytes() == (golden_rtx_build / "engines" / f"{graph}.plan").read_bytes()
    parameters = pbtxt.validate_config(repo / "dspark" / "config.pbtxt").parameters
    assert parameters["backend_mode"].string_value == "bls"
    assert (int(parameters["max_batch"].string_value), int(parameters["max_context"].string_value)) == (4, 128)


@pytest.mark.slow  # the shared RTX build, when no test above made it
def test_engine_weights_over_unique_weight_bytes(golden_rtx_build: Path, golden_dir: Path) -> None:
    """The engines' constant weights plus the weight inputs hold the program's unique weights once (issue 14:
    2.7x before, goal <= 1.10): the target's checkpoint tensors plus the draft's own (the draft's copies of the
    embedding and LM head are not loaded: the graft uses the target's). The plan files themselves carry
    TensorRT-RTX's kernels too, megabytes per engine, which only a tiny pair notices (printed, not bounded;
    benchmarks/export_memory.py measures the plan bytes at the 0.6B shape)."""
    from safetensors import safe_open

    def nbytes(path: Path, skip: tuple[str, ...] = ()) -> int:
        with safe_open(str(path), "np") as f:
            return sum(f.get_tensor(k).nbytes for k in f.keys() if k not in skip)  # noqa: SIM118

    pair = golden_dir / "dspark_tiny"
    unique = nbytes(pair / "target" / "model.safetensors") + nbytes(
        pair / "draft" / "model.safetensors", ("embed_tokens.weight", "lm_head.weight"))
    manifest = json.loads((golden_rtx_build / "manifest.json").read_text())
    plans = manifest["engines"]["plans"]
    inputs = sum(r["bytes"] for r in manifest["weight_inputs"].values())
    held = sum(p["weight_bytes"] for p in plans) + inputs
    plan_bytes = sum(p["plan_bytes"] for p in plans)
    print(f"engine weights {held} / unique {unique} = {held / unique:.3f}; plan files {plan_bytes} + inputs "
          f"{inputs} / unique = {(plan_bytes + inputs) / unique:.2f}")
    assert inputs == 2 * 384 * 64 * 4  # the untied embedding and LM head, once
    assert unique <= held <= 1.10 * unique
    assert all(p["activation_bytes"] and p["activation_source"] in ("tensorrt", "estimate") for p in plans)
    assert len(plans[0]["activation_bytes"]) == 2  # target_step: the verification and the prefill profile
