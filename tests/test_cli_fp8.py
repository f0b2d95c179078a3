"""The FP8 and acceptance-gate flags end to end: `build --quantize fp8 --check-acceptance` (DequantizeLinear on
e4m3 initializers, the manifest's records, onnxruntime decoding like the torch reference of the same FP8
model), a Model Optimizer checkpoint (QuantizeLinear/DequantizeLinear on activations too), bad flag values."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest

from dspark_compile import api
from tests.checkpoint.fp8_checkpoints import write_fp8_target
from tests.test_cli_build import _cli

PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 1, 2, 3, 4, 5, 6], [31, 41, 59, 26, 53, 58, 97]]


def _ops(path: Path) -> tuple[Counter[str], int]:
    """Op counts of a graph and how many of its initializers are e4m3."""
    model = onnx.load(str(path), load_external_data=False)
    fp8 = sum(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in model.graph.initializer)
    return Counter(n.op_type for n in model.graph.node), fp8


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-tau-drop", "1.5", "--max-tau-drop: build spec field `max_tau_drop`: expected a fraction in [0, 1]"),
    ("--quantize", "int4", "'int4' is not 'fp8'"),
])
def test_bad_values_exit_2(golden_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                           value: str, message: str) -> None:
    pair = golden_dir / "dspark_tiny"
    code, _, err = _cli(["build", "--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out",
                         str(tmp_path / "b"), flag, value], capsys)
    assert code == 2 and message in err


@pytest.mark.slow  # one ONNX export and two decodes
def test_build_quantize_fp8_with_acceptance_gate(golden_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pair = golden_dir / "dspark_tiny"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "build"
    code, stdout, err = _cli(["build", "--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out",
                              str(out), "--quantize", "fp8", "--check-acceptance", str(prompts), "--max-tau-drop",
                              "1", "--json"], capsys)
    assert code == 0, err
    names = [p["name"] for p in json.loads(stdout)["passes"]]
    assert names[names.index("graft") + 1] == "quantize" and names[-2:] == ["check_acceptance", "manifest"]
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["method"] == "fp8" and len(q["layers"]) == 28 and not q["lm_head"] and not q["draft"]
    assert manifest["spec"]["opset"] == 19
    acc = manifest["acceptance"]
    assert acc["backend"] == "onnxruntime" and acc["prompts"] == 3 and acc["passed"]
    assert set(acc["greedy_agreement"]) == {"token_agreement", "mean_common_prefix", "identical"}
    for graph, dq in (("target_step", 28), ("draft_propose", 0)):
        ops, fp8 = _ops(out / "onnx" / f"{graph}.onnx")
        assert ops["DequantizeLinear"] == dq and fp8 == dq and ops["QuantizeLinear"] == 0
    ort = api.run(out, PROMPTS, backend="onnxruntime", max_new_tokens=24, verify="fixed")
    ref = api.run(out, PROMPTS, backend="torch", max_new_tokens=24, verify="fixed")
    assert [r.tokens for r in ort] == [r.tokens for r in ref]
    assert [[x["accepted"] for x in r.rounds] for r in ort] == [[x["accepted"] for x in r.rounds] for r in ref]


@pytest.mark.slow  # one ONNX export and two decodes
def test_build_of_a_model_optimizer_fp8_checkpoint(golden_dir: Path, tmp_path: Path) -> None:
    pair = golden_dir / "dspark_tiny"
    write_fp8_target(pair / "target", tmp_path / "fp8", "modelopt")
    out = tmp_path / "build"
    res = api.build(target=tmp_path / "fp8", draft=pair / "draft", out=out, progress=False)
    q = res.manifest["quantization"]
    assert q["method"] == "fp8_tensor" and q["checkpoint"]["activation"] == "static" and q["scheme"] is None
    assert all(entry["input_scale"] is not None for entry in q["layers"].values()) and len(q["layers"]) == 28
    ops, fp8 = _ops(out / "onnx" / "target_step.onnx")
    assert ops["QuantizeLinear"] == 28 and ops["DequantizeLinear"] == 56 and fp8 == 28
    ort = api.run(out, PROMPTS, backend="onnxruntime", max_new_tokens=24, verify="fixed")
    ref = api.run(out, PROMPTS, backend="torch", max_new_tokens=24, verify="fixed")
    assert [r.tokens for r in ort] == [r.tokens for r in ref]
