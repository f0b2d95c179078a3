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
    ("--quantize", "int4", "'int4' is not one of 'fp8', 'fp8-dynamic'"),
])
def test_bad_values_exit_2(golden_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                           value: str, message: str) -> None:
    pair = golden_dir / "dspark_tiny"
    code, _, err = _cli(["build", "--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out",
                         str(tmp_path / "b"), flag, value], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("flag", ["--quantize-lm-head", "--quantize-draft"])
def test_head_or_draft_flag_without_anything_to_quantize_exits_2(golden_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str], flag: str) -> None:
    """Alone on a full-precision target the flag built a full-precision model without a word."""
    pair = golden_dir / "dspark_tiny"
    out = tmp_path / "b"
    code, _, err = _cli(["build", "--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out",
                         str(out), flag], capsys)
    assert code == 2 and err.strip() == (f"error: {flag}: the target is not an FP8 checkpoint and --quantize is not "
                                         f"set; add --quantize fp8 (or fp8-dynamic), or drop {flag}")
    assert not out.exists()


@pytest.mark.slow  # one ONNX export and two decodes
@pytest.mark.parametrize(("method", "draft"), [("fp8", False), ("fp8-dynamic", False), ("fp8", True)])
def test_build_quantize_fp8_with_acceptance_gate(golden_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], method: str, draft: bool) -> None:
    """fp8-dynamic: each layer's input quantized in the graph too (its scale computed there, a Q/DQ pair at
    scale 1 on the scaled input), and onnxruntime decodes exactly as the torch reference of that model.
    ``--quantize-draft``: the draft's layers, ``fc`` and Markov W2 as DequantizeLinear in the draft's graph."""
    pair = golden_dir / "dspark_tiny"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "build"
    code, stdout, err = _cli(["build", "--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out",
                              str(out), "--quantize", method, "--check-acceptance", str(prompts), "--max-tau-drop",
                              "1", "--json", *(["--quantize-draft"] if draft else [])], capsys)
    assert code == 0, err
    names = [p["name"] for p in json.loads(stdout)["passes"]]
    assert names[names.index("graft") + 1] == "quantize" and names[-2:] == ["check_acceptance", "manifest"]
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    drafted = [n for n in q["layers"] if n.startswith("draft.")]
    assert q["method"] == method and len(q["layers"]) == 28 + len(drafted) and not q["lm_head"]
    assert q["draft"] == draft
    assert ({"draft.fc", "draft.markov_head.markov_w2"} <= set(drafted)) if draft else not drafted
    dynamic = method == "fp8-dynamic"
    assert ("activations e4m3 per row" in q["scheme"]) == dynamic
    assert {e["activation_group"] for e in q["layers"].values()} == ({64, 128} if dynamic else {None})  # K 64 and 128
    assert manifest["spec"]["opset"] == 19
    acc = manifest["acceptance"]
    assert acc["backend"] == "onnxruntime" and acc["prompts"] == 3 and acc["passed"]
    assert set(acc["greedy_agreement"]) == {"token_agreement", "mean_common_prefix", "identical"}
    for graph, dq, inputs in (("target_step", 28, 16), ("draft_propose", len(drafted), 0)):
        ops, fp8 = _ops(out / "onnx" / f"{graph}.onnx")  # q|k|v and gate|up share one input quantization
        assert fp8 == dq and ops["QuantizeLinear"] == (inputs if dynamic else 0)
        assert ops["DequantizeLinear"] == dq + (inputs if dynamic else 0)
    ort = api.run(out, PROMPTS, backend="onnxruntime", max_new_tokens=24, verify="fixed")
    ref = api.run(out, PROMPTS, backend="torch", max_new_tokens=24, verify="fixed")
    assert [r.tokens for r in ort] == [r.tokens for r in ref]
    assert [[x["accepted"] for x in r.rounds] for r in ort] == [[x["accepted"] for x in r.rounds] for r in ref]


@pytest.mark.slow  # one ONNX export and three decodes
@pytest.mark.parametrize(("pair_name", "mode"), [("dspark_tiny", "greedy"), ("dspark_tiny", "sampling"),
                                                  ("dspark_tiny_gemma4", "greedy")])
def test_build_with_e4m3_lm_head(golden_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], pair_name: str,
                                mode: str) -> None:
    """``--quantize-lm-head``: both graphs take the e4m3 head (FLOAT8E4M3FN) and its scales as weight inputs,
    stored once in weights.bin beside the full-precision embedding; onnxruntime decodes exactly as the torch
    reference of the same model, and greedy speculative decoding equals the same graphs' target-only decoding.
    Gemma4: its soft-capped head, the cap applied after the dequantized product."""
    pair = golden_dir / pair_name
    out = tmp_path / "build"
    res = api.build(target=pair / "target", draft=pair / "draft", out=out, quantize="fp8", quantize_lm_head=True,
                    quantize_draft=True, verify_mode=mode, progress=False)
    assert res.manifest["quantization"]["lm_head"]
    code, text, _ = _cli(["inspect", str(out)], capsys)
    assert code == 0 and "  e4m3 weights (fp8, " in text and "): the target's layers, the LM head, the draft" in text
    inputs = res.manifest["weight_inputs"]
    assert {k: (v["dtype"], v["shape"]) for k, v in inputs.items()} == {
        "embed_tokens": ("float32", [384, 64]), "lm_head": ("float8_e4m3fn", [384, 64]),
        "lm_head_scale": ("float32", [384])}
    for graph in ("target_step", "draft_propose"):
        model = onnx.load(str(out / "onnx" / f"{graph}.onnx"), load_external_data=False)
        types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        assert types["lm_head"] == onnx.TensorProto.FLOAT8E4M3FN and types["lm_head_scale"] == onnx.TensorProto.FLOAT
        assert [n.op_type for n in model.graph.node if "lm_head" in n.input] == ["DequantizeLinear"]
    temperature = 0.8 if mode == "sampling" else 0.0
    ort = api.run(out, PROMPTS, backend="onnxruntime", max_new_tokens=24, verify="fixed", temperature=temperature)
    ref = api.run(out, PROMPTS, backend="torch", max_new_tokens=24, verify="fixed", temperature=temperature)
    assert [r.tokens for r in ort] == [r.tokens for r in ref]
    assert [[x["accepted"] for x in r.rounds] for r in ort] == [[x["accepted"] for x in r.rounds] for r in ref]
    if mode == "greedy":
        plain = api.run(out, PROMPTS, backend="onnxruntime", max_new_tokens=24, baseline=True)
        assert [r.tokens for r in ort] == [r.tokens for r in plain]


@pytest.mark.slow  # one ONNX export and two decodes
@pytest.mark.parametrize("head_and_draft", [False, True])
def test_build_of_a_model_optimizer_fp8_checkpoint(golden_dir: Path, tmp_path: Path, head_and_draft: bool) -> None:
    """The checkpoint's layers as they are (static input scales); ``--quantize-lm-head --quantize-draft`` without
    ``--quantize`` quantize the head and the draft (they were ignored), and the torch reference that
    ``api.build_program_of`` rebuilds from the manifest agrees (the torch backend's tokens)."""
    pair = golden_dir / "dspark_tiny"
    write_fp8_target(pair / "target", tmp_path / "fp8", "modelopt")
    out = tmp_path / "build"
    res = api.build(target=tmp_path / "fp8", draft=pair / "draft", out=out, progress=False,
                    quantize_lm_head=head_and_draft, quantize_draft=head_and_draft)
    q = res.manifest["quantization"]
    assert q["method"] == "fp8_tensor" and q["checkpoint"]["activation"] == "static" and q["scheme"] is None
    assert q["lm_head"] is q["draft"] is head_and_draft
    target_layers = {k: v for k, v in q["layers"].items() if k.startswith("target.layers.")}
    assert all(entry["input_scale"] is not None for entry in target_layers.values()) and len(target_layers) == 28
    assert ("target.lm_head" in q["layers"] and "draft.fc" in q["layers"]) is head_and_draft
    ops, fp8 = _ops(out / "onnx" / "target_step.onnx")
    assert ops["QuantizeLinear"] == 28 and ops["DequantizeLinear"] == 56 + head_and_draft and fp8 == 28
    assert res.manifest["weight_inputs"]["lm_head"]["dtype"] == ("float8_e4m3fn" if head_and_draft else "float32")
    ort = api.run(out, PROMPTS, backend="onnxruntime", max_new_tokens=24, verify="fixed")
    ref = api.run(out, PROMPTS, backend="torch", max_new_tokens=24, verify="fixed")
    assert [r.tokens for r in ort] == [r.tokens for r in ref]
    assert [[x["draft"] for x in r.rounds] for r in ort] == [[x["draft"] for x in r.rounds] for r in ref]


def test_fp8_dynamic_on_a_static_w8a8_checkpoint_is_one_clear_error(golden_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A Model Optimizer checkpoint's layers carry static input scales: dynamic ones cannot be added."""
    pair = golden_dir / "dspark_tiny"
    write_fp8_target(pair / "target", tmp_path / "fp8", "modelopt")
    out = tmp_path / "build"
    code, _, err = _cli(["build", "--target", str(tmp_path / "fp8"), "--draft", str(pair / "draft"), "--out",
                         str(out), "--quantize", "fp8-dynamic"], capsys)
    assert code == 2 and "--quantize fp8-dynamic" in err and "static input scales" in err
    assert "use --quantize fp8" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
