"""Export a Qwen3 target's (or DSpark draft's) decoder layers by tracing one of them, not L (a helper of
`export_onnx`).

Tracing costs time per operator (torch.export's symbolic shapes, the exporter's decomposition re-trace), and a
target is L copies of one layer: 0.6B spent ~170 CPU s tracing 28 layers. So the target graph is traced with
each layer call replaced by one placeholder node (``dspark.layer::DecoderLayer``, the custom op
:func:`decoder_layer`), the first layer is traced once on its own, and each placeholder is then replaced by a
copy of that layer's nodes, over its own layer's weights (named as the full trace names them:
``target.layers.{i}.self_attn.q_proj.weight``). Only where every layer is the same module with the same
weight shapes; otherwise (other families, mixed layers: Gemma4's sliding and global layers) the whole model is
traced as before, and :func:`name_by_layer` gives its layers' nodes the same names the copies get.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor
from torch import nn

from dspark_compile.models.dspark import DraftLayer, DSparkDraft
from dspark_compile.models.layers import RowsCache
from dspark_compile.models.qwen3 import Qwen3Layer, Qwen3Target
from dspark_compile.passes.partition import ExportJob

DOMAIN, OP = "dspark.layer", "DecoderLayer"


@dataclass(frozen=True)
class _Kind:
    """How a host module calls its layers: the call's tensors in a flat order (``names``, with their dynamic
    dimensions, named as partition's graph inputs so the copies' shapes read in the same symbols), and back."""

    host: type[nn.Module]
    layer: type[nn.Module]
    names: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]
    kv_at: int  # the layer's cache input; the new rows are [2, B, KV, rows, D]
    rows_from: int  # the input whose dimension 1 is ``rows``
    flatten: Callable[[tuple[Any, ...], dict[str, Any]], tuple[list[torch.Tensor], dict[str, Any]]]
    call: Callable[[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def _split(kwargs: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in names}


B, T, S, C = "batch", "step_len", "cache_slots", "ctx_len"
KINDS = (
    _Kind(Qwen3Target, Qwen3Layer, ("x", "cos", "sin", "kv", "cache_len", "mask", "positions"),
          {"x": {0: B, 1: T}, "cos": {0: B, 2: T}, "sin": {0: B, 2: T}, "kv": {1: B, 3: S}, "cache_len": {0: B},
           "mask": {0: B, 2: T, 3: S}, "positions": {0: B, 1: T}}, 3, 0,
          lambda a, k: ([*a, k["positions"]], _split(k, "positions")),
          lambda layer, t, k: layer(*t[:6], positions=t[6], **k)),
    # DraftLayer(x, ctx, (cos, sin) of the block, (cos, sin) of the context, kv, cache_len, mask, slots=(ctx, block)).
    _Kind(DSparkDraft, DraftLayer, ("x", "ctx", "blk_cos", "blk_sin", "ctx_cos", "ctx_sin", "kv", "cache_len", "mask",
                                    "ctx_pos", "blk_pos"),
          {"x": {0: B}, "ctx": {0: B, 1: C}, "blk_cos": {0: B}, "blk_sin": {0: B}, "ctx_cos": {0: B, 2: C},
           "ctx_sin": {0: B, 2: C}, "kv": {1: B, 3: S}, "cache_len": {0: B}, "mask": {0: B, 3: "mask_len"},
           "ctx_pos": {0: B, 1: C}, "blk_pos": {0: B}}, 6, 1,
          lambda a, k: ([a[0], a[1], *a[2], *a[3], *a[4:], *k["slots"]], _split(k, "slots")),
          lambda layer, t, k: layer(t[0], t[1], t[2:4], t[4:6], *t[6:9], slots=t[9:11], **k)),
)


@torch.library.custom_op("dspark::decoder_layer", mutates_args=())
def decoder_layer(inputs: list[torch.Tensor], kv_at: int, rows_from: int,
                  index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Marks decoder layer ``index`` in a trace; never runs."""
    raise RuntimeError("dspark::decoder_layer only stands for a layer while export_onnx traces a model")


@decoder_layer.register_fake
def _(inputs: list[torch.Tensor], kv_at: int, rows_from: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The layer output, and RowsCache's new rows [2, B, KV, rows, D].
    kv = inputs[kv_at]
    return torch.empty_like(inputs[0]), kv.new_empty((kv.shape[0], kv.shape[1], kv.shape[2],
                                                      inputs[rows_from].shape[1], kv.shape[4]))


def onnx_translation() -> dict[Any, Any]:
    """The placeholder as one ``dspark.layer::DecoderLayer`` node (``index`` attribute)."""
    from onnxscript.values import Op, Opset

    schema_cls = onnx.defs.OpSchema
    types = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "bool", "int64")]
    schema = schema_cls(
        OP, DOMAIN, 1, inputs=[schema_cls.FormalParameter("inputs", "T", "", is_homogeneous=False,
                                                          param_option=schema_cls.FormalParameterOption.Variadic)],
        outputs=[schema_cls.FormalParameter(n, "T", "") for n in ("y", "rows")], type_constraints=[("T", types, "")],
        attributes=[schema_cls.Attribute("index", schema_cls.AttrType.INT, "layer index", required=True)])
    node_op = Op(Opset(DOMAIN, 1), OP, schema)

    def decoder_layer_onnx(inputs, kv_at: int, rows_from: int, index: int):
        return node_op(*inputs, index=index)

    return {torch.ops.dspark.decoder_layer.default: decoder_layer_onnx}


class _Call(nn.Module):
    """Stands for layer ``index`` in the traced model: the placeholder op, no weights."""

    def __init__(self, index: int, kind: _Kind) -> None:
        super().__init__()
        self.index = index
        self.kind = kind

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tensors, _ = self.kind.flatten(args, kwargs)
        y, rows = decoder_layer(tensors, self.kind.kv_at, self.kind.rows_from, self.index)
        return y, rows


class _Layer(nn.Module):
    """One layer as its host calls it (its cache and attention strategies), over the flat tensors; ``forward``
    has the parameters ``kind.names`` (the exporter maps dynamic axes to them by name)."""

    def __init__(self, layer: nn.Module, kind: _Kind, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.layer = layer

        def forward(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return kind.call(self.layer, tensors, kwargs)

        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in kind.names])
        self.forward = forward


class _Recorded(Exception):
    pass


def _signature(layer: nn.Module) -> tuple[object, ...]:
    return type(layer), tuple((n, t.shape, t.dtype, type(t)) for n, t in layer.state_dict(keep_vars=True).items())


def export_by_layer(gs: ExportJob, export: Callable[[ExportJob], ir.Model]) -> ir.Model | None:
    """``gs`` (a graph over a Qwen3 target or a DSpark draft) exported with one traced layer copied L times, or
    None where that does not apply. ``export`` traces one job."""
    module, inputs = gs.module, gs.inputs
    found = [(name, m, kind) for name, m in module.named_modules() for kind in KINDS if type(m) is kind.host]
    if len(found) != 1:
        return None
    name, host, kind = found[0]
    layers = host.layers
    if not all(type(layer) is kind.layer and _signature(layer) == _signature(layers[0]) for layer in layers):
        return None
    # The first layer's arguments, as the host passes them (its prefix runs eagerly: embedding, RoPE, mask).
    seen: dict[str, Any] = {}

    def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.update(args=args, kwargs=kwargs)
        raise _Recorded

    hook = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            module(*inputs.values())
    except _Recorded:
        pass
    finally:
        hook.remove()
    if not isinstance(seen.get("kwargs", {}).get("cache"), RowsCache):
        return None  # the placeholder's outputs are RowsCache's
    tensors, kwargs = kind.flatten(seen["args"], seen["kwargs"])
    example = dict(zip(kind.names, tensors, strict=True))
    template = export(ExportJob("decoder_layer", _Layer(layers[0], kind, kwargs), example, ("y", "rows"),
                                kind.dynamic))
    host.layers = nn.ModuleList(_Call(i, kind) for i in range(len(layers)))
    try:
        outer = export(gs)
    finally:
        host.layers = layers
    _expand(outer, template, f"{name}.layers." if name else "layers.", layers)
    return outer


def _expand(outer: ir.Model, template: ir.Model, prefix: str, layers: nn.ModuleList) -> None:
    """Replace each placeholder node of ``outer`` by a copy of ``template``'s nodes over its layer's weights."""
    graph = outer.graph
    calls = [node for node in graph if node.domain == DOMAIN and node.op_type == OP]
    if len(calls) != len(layers):
        raise RuntimeError(f"export: {len(calls)} traced layer calls for {len(layers)} layers")
    for node in calls:
        index = node.attributes["index"].as_int()
        state = dict(layers[index].named_parameters(remove_duplicate=False)) | dict(
            layers[index].named_buffers(remove_duplicate=False))
        at = f"{prefix}{index}."
        value_map: dict[ir.Value, ir.Value] = dict(zip(template.graph.inputs, node.inputs, strict=True))
        for init_name, init in template.graph.initializers.items():
            own = init_name.removeprefix("layer.")
            if init_name.startswith("layer.") and own in state:
                tensor: ir.TensorProtocol | None = TorchTensor(state[own].detach(), name=at + own)
            else:  # a constant the exporter lifted: the same value in every copy
                tensor = init.const_value
            copy = ir.Value(name=at + own, shape=init.shape, type=init.type, const_value=tensor)
            graph.register_initializer(copy)
            value_map[init] = copy
        nodes = []
        for t_node in template.graph:
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in t_node.attributes.values()):
                raise RuntimeError("export: a decoder layer with subgraphs cannot be copied")
            new = ir.Node(t_node.domain, t_node.op_type, [None if v is None else value_map[v] for v in t_node.inputs],
                          t_node.attributes.values(), overload=t_node.overload, num_outputs=len(t_node.outputs),
                          version=t_node.version, name=at + (t_node.name or ""))
            for old, out in zip(t_node.outputs, new.outputs, strict=True):
                out.name, out.shape, out.type = at + (old.name or ""), old.shape, old.type
                value_map[old] = out
            nodes.append(new)
        graph.insert_before(node, nodes)
        ir.convenience.replace_all_uses_with(node.outputs, [value_map[v] for v in template.graph.outputs],
                                             replace_graph_outputs=True)
        graph.remove(node, safe=True)
    for domain, version in template.opset_imports.items():
        outer.opset_imports.setdefault(domain, version)
    outer.opset_imports.pop(DOMAIN, None)


SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's record of each node's nn_module_stack (module paths)
_LAYER = re.compile(r"(?:.+\.)?layers\.\d+")


def name_by_layer(model: ir.Model, module: nn.Module) -> int:
    """Prefix the nodes of a whole-model trace that decoder layer ``{host}.layers.{i}`` of ``module`` emitted, and
    their outputs, with ``{host}.layers.{i}.``, as :func:`_expand` names its copies; returns how many it named.

    Why: targets/tensorrt/segments.py cuts target_step at the layers its node names give, and optimize_onnx
    folds each weight's Transpose into a new initializer named after the Transpose's output, so without this a
    traced-whole graph (Gemma4) keeps no layer name, on nodes or weights. The layer is read from the exporter's
    name scopes (torch.export's ``nn_module_stack``) before optimize_onnx clears the metadata. Graph outputs keep
    their names (and a value whose new name is taken keeps its own); only names change, so the graph computes
    what it did."""
    layers = {name for name, _ in module.named_modules() if _LAYER.fullmatch(name)}
    graph = model.graph
    outputs = set(graph.outputs)
    taken = {v.name for v in (*graph.inputs, *graph.initializers.values())} | {
        v.name for node in graph for v in node.outputs}
    named = 0
    for node in graph:
        scopes = node.metadata_props.get(SCOPES)
        if not scopes:
            continue
        owner = next((s for s in reversed(ast.literal_eval(scopes)) if s in layers), None)
        if owner is None:
            continue
        at = f"{owner}."
        node.name = at + (node.name or "")
        for value in node.outputs:
            if value not in outputs and value.name and at + value.name not in taken:
                value.name = at + value.name
                taken.add(value.name)
        named += 1
    return named
