"""The one machine-readable description of the ``dspark::SpecVerify`` node (README.md beside this file).

Not registered in onnx's ``OpSchema`` registry: that is process-global and its checker would then apply it to
every model, coupling unrelated tests and runtimes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

GREEDY = "greedy"
SAMPLING = "sampling"
MODES = (GREEDY, SAMPLING)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, allowed ONNX element types, symbolic shape, modes it is present in."""

    name: str
    dtypes: tuple[int, ...]
    shape: tuple[str, ...]
    modes: tuple[str, ...]
    doc: str

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    allowed: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class OpSchema:
    name: str
    domain: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttributeSpec, ...]

    @property
    def plugin_id(self) -> str:
        """``namespace::name``, the id TensorRT's Quick Deployable Plugins use."""
        return f"{self.domain}::{self.name}"

    @property
    def opset_version(self) -> int:
        return int(self.version)

    @property
    def tensorrt_lookup(self) -> dict[str, str]:
        """Node attributes TensorRT's ONNX parser reads to find a plugin (it ignores the ONNX domain)."""
        return {"plugin_namespace": self.domain, "plugin_version": self.version}

    def inputs_for(self, mode: str) -> tuple[TensorSpec, ...]:
        check_mode(mode)
        return tuple(spec for spec in self.inputs if mode in spec.modes)

    def opset_import(self) -> onnx.OperatorSetIdProto:
        return helper.make_opsetid(self.domain, self.opset_version)

    def onnx_op_schema(self) -> onnx.defs.OpSchema:
        """This schema as an unregistered ``onnx.defs.OpSchema`` (what onnxscript needs to emit the node):
        inputs of one mode only are optional, the TensorRT lookup attributes default to their only values."""
        schema_cls = onnx.defs.OpSchema
        all_modes = set(MODES)

        def param(spec: TensorSpec) -> onnx.defs.OpSchema.FormalParameter:
            option = schema_cls.FormalParameterOption
            return schema_cls.FormalParameter(
                spec.name, f"T_{spec.name}", spec.doc,
                param_option=option.Single if set(spec.modes) == all_modes else option.Optional)

        def constraint(spec: TensorSpec) -> tuple[str, list[str], str]:
            return f"T_{spec.name}", [_TYPE_STRINGS[t] for t in spec.dtypes], spec.doc

        attributes = [schema_cls.Attribute(a.name, schema_cls.AttrType.STRING, a.doc, required=True)
                      for a in self.attributes]
        attributes += [schema_cls.Attribute(name, helper.make_attribute(name, value), "TensorRT plugin lookup")
                       for name, value in self.tensorrt_lookup.items()]
        return schema_cls(
            self.name, self.domain, self.opset_version, inputs=[param(s) for s in self.inputs],
            outputs=[param(s) for s in self.outputs],
            type_constraints=[constraint(s) for s in (*self.inputs, *self.outputs)], attributes=attributes)

    def is_node(self, node: onnx.NodeProto) -> bool:
        return node.op_type == self.name and node.domain == self.domain

    def check_node(self, node: onnx.NodeProto) -> str:
        """Validate a node's attributes and arity against the schema; return its mode."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        where = f"{self.plugin_id} node {node.name!r}"
        if mode not in MODES:
            raise ValueError(f"{where}: attribute mode must be one of {MODES}, found {mode!r}")
        unknown = set(attrs) - {a.name for a in self.attributes} - set(self.tensorrt_lookup)
        if unknown:
            raise ValueError(f"{where}: unknown attribute(s) {sorted(unknown)}")
        for key, want_value in self.tensorrt_lookup.items():
            found = attrs.get(key, want_value.encode())
            if found != want_value.encode():
                raise ValueError(f"{where}: attribute {key} must be {want_value!r}, found {found!r}")
        want = len(self.inputs_for(mode))
        if len(node.input) != want or any(not name for name in node.input):
            raise ValueError(f"{where}: mode {mode!r} takes {want} inputs, found {list(node.input)}")
        if len(node.output) != len(self.outputs):
            raise ValueError(f"{where}: expected {len(self.outputs)} outputs, found {list(node.output)}")
        return mode


_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_I64 = (TensorProto.INT64,)
_F32 = (TensorProto.FLOAT,)
_TYPE_STRINGS = {TensorProto.FLOAT: "tensor(float)", TensorProto.FLOAT16: "tensor(float16)",
                 TensorProto.BFLOAT16: "tensor(bfloat16)", TensorProto.INT64: "tensor(int64)"}

SPEC_VERIFY = OpSchema(
    name="SpecVerify",
    domain="dspark",
    version="1",
    inputs=(
        TensorSpec("target_logits", _FLOATS, ("B", "G+1", "V"), MODES, "target logits per verified position"),
        TensorSpec("draft_tokens", _I64, ("B", "G"), MODES, "drafted tokens x_1..x_G"),
        TensorSpec("verify_len", _I64, ("B",), MODES, "drafts to verify, clamped to [0, G]"),
        TensorSpec("draft_probs", _F32, ("B", "G", "V"), (SAMPLING,), "draft distribution per position"),
        TensorSpec("temperature", _F32, ("B",), (SAMPLING,), "<= 0: greedy for that request"),
        TensorSpec("uniforms", _F32, ("B", "G+1"), (SAMPLING,), "U[0,1): G acceptance tests, then the draw"),
    ),
    outputs=(
        TensorSpec("accepted", _I64, ("B",), MODES, "accepted drafts j <= verify_len"),
        TensorSpec("next_token", _I64, ("B",), MODES, "correction (j < verify_len) or bonus token"),
    ),
    attributes=(AttributeSpec("mode", MODES, "greedy: argmax matching; sampling: rejection sampling"),),
)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, found {mode!r}")


def make_node(mode: str, inputs: Sequence[str], outputs: Sequence[str] = ("accepted", "next_token"),
              name: str | None = None) -> onnx.NodeProto:
    """A ``dspark::SpecVerify`` node, ``inputs`` in schema order, with the TensorRT lookup attributes."""
    node = helper.make_node(SPEC_VERIFY.name, list(inputs), list(outputs), name=name, domain=SPEC_VERIFY.domain,
                            mode=mode, **SPEC_VERIFY.tensorrt_lookup)
    SPEC_VERIFY.check_node(node)
    return node


def make_model(mode: str, logits_dtype: int = TensorProto.FLOAT, opset: int = 18) -> onnx.ModelProto:
    """A model that is one SpecVerify node, graph I/O named as in the schema, every dimension symbolic."""
    specs = SPEC_VERIFY.inputs_for(mode)
    if logits_dtype not in specs[0].dtypes:
        raise ValueError(f"target_logits dtype must be one of {specs[0].dtypes}, found {logits_dtype}")
    dtypes = [logits_dtype] + [spec.dtypes[0] for spec in specs[1:]]
    graph_inputs = [helper.make_tensor_value_info(s.name, d, list(s.shape)) for s, d in zip(specs, dtypes, strict=True)]
    graph_outputs = [helper.make_tensor_value_info(s.name, s.dtypes[0], list(s.shape)) for s in SPEC_VERIFY.outputs]
    node = make_node(mode, [spec.name for spec in specs], [spec.name for spec in SPEC_VERIFY.outputs])
    graph = helper.make_graph([node], f"spec_verify_{mode}", graph_inputs, graph_outputs)
    opsets = [helper.make_opsetid("", opset), SPEC_VERIFY.opset_import()]
    return helper.make_model(graph, opset_imports=opsets, producer_name="dspark_compile")
