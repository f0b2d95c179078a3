"""The schema object is the single source for node construction, and README.md documents exactly it."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from dspark_compile.plugins.spec_verify import op_schema as schema
from dspark_compile.plugins.spec_verify.op_schema import GREEDY, MODES, SAMPLING, SPEC_VERIFY, make_model, make_node

README = Path(schema.__file__).with_name("README.md")


def test_identity() -> None:
    assert (SPEC_VERIFY.name, SPEC_VERIFY.domain, SPEC_VERIFY.version) == ("SpecVerify", "dspark", "1")
    assert SPEC_VERIFY.plugin_id == "dspark::SpecVerify"
    assert SPEC_VERIFY.opset_import() == onnx.helper.make_opsetid("dspark", 1)
    assert [a.name for a in SPEC_VERIFY.attributes] == ["mode"]
    assert SPEC_VERIFY.attributes[0].allowed == MODES == (GREEDY, SAMPLING)


def test_inputs_per_mode() -> None:
    names = {mode: [s.name for s in SPEC_VERIFY.inputs_for(mode)] for mode in MODES}
    assert names[GREEDY] == ["target_logits", "draft_tokens", "verify_len"]
    assert names[SAMPLING] == names[GREEDY] + ["draft_probs", "temperature", "uniforms"]
    assert [s.name for s in SPEC_VERIFY.outputs] == ["accepted", "next_token"]
    logits = SPEC_VERIFY.inputs[0]
    assert set(logits.dtypes) == {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    assert logits.rank == 3
    with pytest.raises(ValueError):
        SPEC_VERIFY.inputs_for("beam")


@pytest.mark.parametrize("mode", MODES)
def test_make_node_and_model_follow_the_schema(mode: str) -> None:
    specs = SPEC_VERIFY.inputs_for(mode)
    node = make_node(mode, [s.name for s in specs], name="v")
    assert SPEC_VERIFY.is_node(node) and SPEC_VERIFY.check_node(node) == mode
    model = make_model(mode, TensorProto.FLOAT16)
    graph = model.graph
    assert [i.name for i in graph.input] == [s.name for s in specs]
    for value, spec in zip(list(graph.input) + list(graph.output), specs + SPEC_VERIFY.outputs, strict=True):
        assert value.type.tensor_type.elem_type in spec.dtypes
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == list(spec.shape)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), ("dspark", 1)}
    onnx.checker.check_model(model)  # structural check; the custom domain has no registered schema


def test_tensorrt_lookup_attributes() -> None:
    node = make_node(SAMPLING, [s.name for s in SPEC_VERIFY.inputs])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"mode": b"sampling", "plugin_namespace": b"dspark", "plugin_version": b"1"}
    node.attribute[1].s = b"other"
    with pytest.raises(ValueError, match="plugin_namespace"):
        SPEC_VERIFY.check_node(node)


def test_check_node_rejects() -> None:
    node = make_node(GREEDY, ["a", "b", "c"])
    node.attribute.append(onnx.helper.make_attribute("beam_width", 4))
    with pytest.raises(ValueError, match="unknown attribute"):
        SPEC_VERIFY.check_node(node)
    with pytest.raises(ValueError, match="mode"):
        make_node("beam", ["a", "b", "c"])
    with pytest.raises(ValueError, match="6 inputs"):
        make_node(SAMPLING, ["a", "b", "c"])
    with pytest.raises(ValueError, match="outputs"):
        make_node(GREEDY, ["a", "b", "c"], ["only_one"])
    with pytest.raises(ValueError, match="dtype"):
        make_model(GREEDY, TensorProto.DOUBLE)


def test_readme_documents_the_schema() -> None:
    """Every I/O row of the README table names a schema entry with the same shape, in order."""
    rows = [line.split("|") for line in README.read_text().splitlines() if line.startswith("| in ")
            or line.startswith("| out ")]
    documented = [(cells[2].strip().strip("`"), cells[4].strip()) for cells in rows]
    expected = [(s.name, "[" + ", ".join(s.shape) + "]") for s in SPEC_VERIFY.inputs + SPEC_VERIFY.outputs]
    assert documented == expected
