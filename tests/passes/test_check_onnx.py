"""Pass `check_onnx`: the finished graphs pass the ONNX checker; a broken graph is a BuildError naming it."""

from __future__ import annotations

import re
from collections.abc import Callable

import onnx
import pytest

from dspark_compile.errors import BuildError
from dspark_compile.ir import PLUGIN, PORTABLE, OnnxGraphs
from dspark_compile.passes.check_onnx import check_onnx
from dspark_compile.plugins.spec_verify.schema import SPEC_VERIFY


def _edit(graphs: OnnxGraphs, name: str, variant: str, edit: Callable[[onnx.ModelProto], None]) -> str:
    """Apply ``edit`` to one graph file; returns its path as a regex."""
    path = graphs.path(name, variant)
    model = onnx.load(str(path), load_external_data=False)
    edit(model)
    onnx.save(model, str(path))
    return re.escape(str(path))


def test_the_build_passes(built_copy: OnnxGraphs) -> None:
    assert check_onnx(built_copy) == built_copy


def test_dangling_input_is_a_build_error(built_copy: OnnxGraphs) -> None:
    def dangle(model: onnx.ModelProto) -> None:
        model.graph.node[5].input[0] = "no_such_value"

    path = _edit(built_copy, "target_prefill", PORTABLE, dangle)
    with pytest.raises(BuildError, match=rf"^{path}: ONNX checker failed: .*no_such_value"):
        check_onnx(built_copy)


def test_wrong_output_type_is_caught_by_shape_inference(built_copy: OnnxGraphs) -> None:
    def retype(model: onnx.ModelProto) -> None:
        model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT64  # accepted is int64 already
        model.graph.output[2].type.tensor_type.elem_type = onnx.TensorProto.INT64  # taps are float

    path = _edit(built_copy, "target_verify", PORTABLE, retype)
    with pytest.raises(BuildError, match=rf"^{path}: ONNX checker failed"):
        check_onnx(built_copy)


def test_spec_verify_node_is_checked_against_the_schema(built_copy: OnnxGraphs) -> None:
    def drop_uniforms(model: onnx.ModelProto) -> None:
        node = next(n for n in model.graph.node if SPEC_VERIFY.is_node(n))
        del node.input[-1]

    path = _edit(built_copy, "target_verify", PLUGIN, drop_uniforms)
    with pytest.raises(BuildError, match=rf"^{path}: ONNX checker failed: .*mode 'sampling' takes 6 inputs"):
        check_onnx(built_copy)


def test_exactly_one_spec_verify_node(built_copy: OnnxGraphs) -> None:
    def duplicate(model: onnx.ModelProto) -> None:
        twin = onnx.NodeProto()
        twin.CopyFrom(next(n for n in model.graph.node if SPEC_VERIFY.is_node(n)))
        twin.name, twin.output[:] = "twin", ["accepted_twin", "next_token_twin"]
        model.graph.node.append(twin)

    path = _edit(built_copy, "target_verify", PLUGIN, duplicate)
    with pytest.raises(BuildError, match=rf"^{path}: expected one dspark::SpecVerify node, found 2$"):
        check_onnx(built_copy)
