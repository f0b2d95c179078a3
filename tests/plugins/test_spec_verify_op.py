"""``torch.ops.dspark.spec_verify``: its schema, fake-tensor shapes, CPU results equal to the NumPy reference on
the named edge cases (greedy, sampling, G = 0, ties, ...), and its ONNX translation (one SpecVerify node exactly
as ``op_schema.SPEC_VERIFY`` describes it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest
import torch
from onnx import helper
from torch._subclasses.fake_tensor import FakeTensorMode

from dspark_compile.plugins.spec_verify.op import onnx_translation, spec_verify
from dspark_compile.plugins.spec_verify.op_schema import GREEDY, MODES, SAMPLING, SPEC_VERIFY
from dspark_compile.plugins.spec_verify.reference import random_inputs

_spec = importlib.util.spec_from_file_location(
    "spec_verify_cases", Path(__file__).resolve().parents[1] / "passes" / "test_decompose_spec_verify.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


def test_schema() -> None:
    schema = torch.ops.dspark.spec_verify.default._schema
    assert [a.name for a in schema.arguments] == [s.name for s in SPEC_VERIFY.inputs] + ["mode"]
    assert [str(a.type) for a in schema.arguments] == ["Tensor"] * 3 + ["Optional[Tensor]"] * 3 + ["str"]
    assert len(schema.returns) == len(SPEC_VERIFY.outputs)
    assert not schema.is_mutable


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gamma", [0, 3])
def test_fake_tensor_shapes(mode: str, gamma: int) -> None:
    x = random_inputs(5, gamma, 11, mode=mode, generator=torch.Generator().manual_seed(0))
    with FakeTensorMode() as fake_mode:
        fake = {k: fake_mode.from_tensor(v) for k, v in x.items()}
        accepted, next_token = spec_verify(**fake, mode=mode)
    assert accepted.shape == next_token.shape == (5,)
    assert accepted.dtype == next_token.dtype == torch.int64
    with pytest.raises(ValueError, match="mode"), FakeTensorMode() as fake_mode:
        spec_verify(**{k: fake_mode.from_tensor(v) for k, v in x.items()}, mode="beam")


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_cpu_kernel_matches_reference(name: str) -> None:
    for seed in range(3):
        mode, inputs = cases.make_case(name, seed)
        accepted, next_token = torch.ops.dspark.spec_verify(**inputs, mode=mode)
        assert accepted.dtype == next_token.dtype == torch.int64
        cases.assert_matches_reference(mode, inputs, accepted.numpy(), next_token.numpy())


class _Verify(torch.nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, target_logits: torch.Tensor, draft_tokens: torch.Tensor, verify_len: torch.Tensor,
                draft_probs: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return spec_verify(target_logits * 2.0, draft_tokens, verify_len, draft_probs, temperature, uniforms,
                           mode=self.mode)


@pytest.mark.parametrize("mode", MODES)
def test_onnx_translation_is_the_schema_node(mode: str) -> None:
    x = random_inputs(3, 4, 20, mode=mode, generator=torch.Generator().manual_seed(0))
    names = [s.name for s in SPEC_VERIFY.inputs_for(mode)]
    program = torch.onnx.export(_Verify(mode).eval(), tuple(x[n] for n in names), input_names=names,
                                output_names=[o.name for o in SPEC_VERIFY.outputs], dynamo=True, opset_version=18,
                                custom_translation_table=onnx_translation(), verbose=False)
    model = program.model_proto
    nodes = [n for n in model.graph.node if SPEC_VERIFY.is_node(n)]
    assert len(nodes) == 1
    node = nodes[0]
    assert SPEC_VERIFY.check_node(node) == mode
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"mode": mode.encode(), **{k: v.encode() for k, v in SPEC_VERIFY.tensorrt_lookup.items()}}
    producer = {out: n for n in model.graph.node for out in n.output}
    assert producer[node.input[0]].op_type == "Mul" and list(node.input[1:]) == names[1:]
    assert list(node.output) == [o.name for o in SPEC_VERIFY.outputs]
    assert (SPEC_VERIFY.domain, SPEC_VERIFY.opset_version) in {(o.domain, o.version) for o in model.opset_import}
    onnx.checker.check_model(model)


def test_onnx_op_schema_is_the_schema() -> None:
    schema = SPEC_VERIFY.onnx_op_schema()
    assert (schema.name, schema.domain, schema.since_version) == (SPEC_VERIFY.name, SPEC_VERIFY.domain, 1)
    assert [i.name for i in schema.inputs] == [s.name for s in SPEC_VERIFY.inputs]
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    assert [i.option == optional for i in schema.inputs] == [False] * 3 + [True] * 3
    assert [o.name for o in schema.outputs] == [s.name for s in SPEC_VERIFY.outputs]
    assert set(schema.attributes) == {"mode", *SPEC_VERIFY.tensorrt_lookup}
    assert schema.attributes["mode"].required
    assert not onnx.defs.has(SPEC_VERIFY.name, SPEC_VERIFY.domain)  # never registered process-wide


def test_greedy_and_sampling_agree_at_zero_temperature() -> None:
    x = random_inputs(6, 3, 17, mode=SAMPLING, generator=torch.Generator().manual_seed(2), greedy_row_prob=1.0)
    got = spec_verify(**x, mode=SAMPLING)
    want = spec_verify(x["target_logits"], x["draft_tokens"], x["verify_len"], mode=GREEDY)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
