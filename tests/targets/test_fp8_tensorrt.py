"""FP8 graphs through TensorRT-RTX (engines built on the CPU): the inspector JSON's network shows which matrix
products are FP8 GEMMs (Q/DQ on both inputs: a Model Optimizer W8A8 checkpoint) and which stay in higher
precision (attention, the LM head unless ``--quantize-lm-head`` makes it an e4m3 engine input, the draft; and
every product of a weight-only `--quantize fp8` graph, whose activations carry no Q/DQ, and of an `fp8-dynamic`
graph, whose activations' scales are computed in the graph: TensorRT fuses Q/DQ into an FP8 GEMM only with
constant scales)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dspark_compile import api
from tests.checkpoint.fp8_checkpoints import write_fp8_target


def matmul_precisions(description: dict[str, Any]) -> dict[str, list[str]]:
    """Each MATRIX_MULTIPLY layer by the producers of its inputs (through SHUFFLE layers): DEQUANTIZE on both
    ("fp8": TensorRT's FP8 GEMM form), on one ("weight_only") or on none ("higher")."""
    producer = {o["name"]: layer for layer in description["layers"] for o in layer["outputs"] if o}

    def source(name: str) -> dict[str, Any] | None:
        layer = producer.get(name)
        while layer is not None and layer["type"] == "SHUFFLE":
            layer = producer.get(layer["inputs"][0]["name"])
        return layer

    out: dict[str, list[str]] = {"fp8": [], "weight_only": [], "higher": []}
    for layer in description["layers"]:
        if layer["type"] == "MATRIX_MULTIPLY":
            dq = [(s := source(i["name"])) is not None and s["type"] == "DEQUANTIZE" for i in layer["inputs"] if i]
            out["fp8" if all(dq) else "weight_only" if any(dq) else "higher"].append(layer["onnx_node"])
    return out


@pytest.mark.slow  # four ONNX exports and eleven TensorRT-RTX engine builds
def test_tensorrt_rtx_inspector_shows_fp8_gemms(golden_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")
    pair = golden_dir / "dspark_tiny"
    write_fp8_target(pair / "target", tmp_path / "modelopt", "modelopt")
    found, inputs = {}, {}
    for name, target, extra in (("w8a8", tmp_path / "modelopt", {}), ("w8a16", pair / "target", {"quantize": "fp8"}),
                                ("dynamic", pair / "target", {"quantize": "fp8-dynamic"}),
                                ("head", pair / "target", {"quantize": "fp8", "quantize_lm_head": True})):
        out = tmp_path / name
        api.build(target=target, draft=pair / "draft", out=out, targets="onnx,tensorrt", trt_flavor="rtx",
                  max_batch=4, max_context=128, progress=False, **extra)
        for graph in ("target_step", "draft_propose"):
            desc = json.loads((out / "engines" / f"{graph}.plan.inspect.json").read_text())
            found[name, graph] = {k: len(v) for k, v in matmul_precisions(desc).items()}
            inputs[name, graph] = {i["name"]: i["dtype"] for i in desc["inputs"]}
            if name == "w8a8" and graph == "target_step":
                higher = matmul_precisions(desc)["higher"]
    # 4 layers x 7 products quantized; 4 x 2 attention products and the LM head stay float32
    for graph in ("target_step",):
        assert found["w8a8", graph] == {"fp8": 28, "weight_only": 0, "higher": 9}
        assert found["w8a16", graph] == {"fp8": 0, "weight_only": 28, "higher": 9}
        assert found["dynamic", graph] == {"fp8": 0, "weight_only": 28, "higher": 9}
    assert found["w8a8", "draft_propose"]["fp8"] == found["w8a16", "draft_propose"]["fp8"] == 0
    # --quantize-lm-head: the e4m3 head is an engine input of both graphs, dequantized into their LM head product
    assert found["head", "target_step"] == {"fp8": 0, "weight_only": 29, "higher": 8}
    assert found["head", "draft_propose"]["weight_only"] == found["w8a16", "draft_propose"]["weight_only"] + 1
    for graph in ("target_step", "draft_propose"):
        head = inputs["head", graph]
        assert head["lm_head"] == "float8e4m3fn" and head["lm_head_scale"] == "float32"
        assert inputs["w8a16", graph]["lm_head"] == "float32" and "lm_head_scale" not in inputs["w8a16", graph]
    # the attention products, one layer's copies named under their layer (passes/layer_template.py)
    assert sum(n.rsplit(".", 1)[-1].startswith("node_matmul") for n in higher) == 8
