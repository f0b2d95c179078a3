"""Pass `check_onnx`: the finished graphs pass the ONNX checker; a broken graph is a BuildError naming it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import pytest

from dspark_compile.artifacts import PLUGIN, PORTABLE, OnnxGraphs
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.passes import check_onnx
from dspark_compile.plugins.spec_verify.op_schema import SPEC_VERIFY


def _edit(graphs: OnnxGraphs, name: str, variant: str, edit: Callable[[ir.Model], None]) -> str:
    """Apply ``edit`` to one in-memory graph; returns its path as a regex."""
    edit(graphs.model(name, variant))
    return re.escape(str(graphs.path(name, variant)))


def _spec_verify(model: ir.Model) -> ir.Node:
    return next(n for n in model.graph if (n.domain, n.op_type) == (SPEC_VERIFY.domain, SPEC_VERIFY.name))


@pytest.fixture
def state(built_copy: OnnxGraphs, tmp_path: Path, state_with: Callable[..., BuildState]) -> BuildState:
    return state_with(tmp_path, built_copy)


def test_the_build_passes(state: BuildState) -> None:
    check_onnx.run(state)


def test_dangling_input_is_a_build_error(state: BuildState) -> None:
    def dangle(model: ir.Model) -> None:
        list(model.graph)[5].replace_input_with(0, ir.Value(name="no_such_value"))

    path = _edit(state.onnx, "draft_propose", PORTABLE, dangle)
    with pytest.raises(BuildError, match=rf"^{path}: ONNX checker failed: .*no_such_value"):
        check_onnx.run(state)


def test_wrong_output_type_is_caught_by_shape_inference(state: BuildState) -> None:
    def retype(model: ir.Model) -> None:
        model.graph.outputs[2].dtype = ir.DataType.INT64  # taps are float

    path = _edit(state.onnx, "target_step", PORTABLE, retype)
    with pytest.raises(BuildError, match=rf"^{path}: ONNX checker failed"):
        check_onnx.run(state)


def test_spec_verify_node_is_checked_against_the_schema(state: BuildState) -> None:
    def drop_uniforms(model: ir.Model) -> None:
        node = _spec_verify(model)
        node.resize_inputs(len(node.inputs) - 1)

    path = _edit(state.onnx, "target_step", PLUGIN, drop_uniforms)
    with pytest.raises(BuildError, match=rf"^{path}: ONNX checker failed: .*mode 'sampling' takes 6 inputs"):
        check_onnx.run(state)


def test_exactly_one_spec_verify_node(state: BuildState) -> None:
    def duplicate(model: ir.Model) -> None:
        node = _spec_verify(model)
        model.graph.append(ir.Node(node.domain, node.op_type, node.inputs, node.attributes.values(),
                                   num_outputs=2, name="twin"))

    path = _edit(state.onnx, "target_step", PLUGIN, duplicate)
    with pytest.raises(BuildError, match=rf"^{path}: expected one dspark::SpecVerify node, found 2$"):
        check_onnx.run(state)
