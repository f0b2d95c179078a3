"""Split the target graph by decoder-layer range into segments, one TensorRT engine each (issue 14).

Why: the TensorRT(-RTX) builder holds about 2.2x an engine's constant weights in anonymous memory while it
builds, so an 8B target (16 GB of layer weights) cannot be built as one engine on a 24 GiB machine. Split at
layer boundaries, each segment holds at most a given number of weight bytes; run in order, each segment is fed
the graph inputs it uses and the earlier segments' outputs by name, and the chain computes what the whole graph
does.

Which node goes where:

- *Anchored* nodes are the points where a weight meets the data stream (a node of layer ``i`` — named
  ``target.layers.{i}.`` by passes/layer_template.py, or for a target traced whole such as Gemma4 by
  ``layer_template.name_by_layer`` — with a dynamic input and an input computed from a weight
  initializer of at least :data:`WEIGHT_BYTES`) and everything downstream of them. An anchored layer node runs
  in its layer's segment; an anchored node outside the layers (final norm, LM head, verification, the concats
  of KV rows and taps) runs in the segment of its latest anchored producer, or the first. A node outside the
  layers applying such a weight to data (Gemma4's per-layer-input embedding and projection) is anchored too:
  copied, it would copy its weight into every segment.
- Every other node depends only on graph inputs and constants (shape arithmetic, rotary tables, masks, the
  embedding lookup, whose table is a graph input): it is copied into every segment that needs it, so no mask or
  shape tensor crosses engines (a shape tensor crossing engines would become a data-dependent shape for
  TensorRT).
- A value made in segment ``a`` and used in a later one is an output of ``a`` and an input of each later
  segment using it, under its own name; graph outputs keep their names.

Segments are ONNX ``ModelProto`` graphs whose initializers are the original protos: external ones still point
into the same ``weights.bin`` at the same offsets, so no weight byte is copied.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_ir as ir

from dspark_compile.errors import BuildError, UsageError

if TYPE_CHECKING:
    import onnx

    from dspark_compile.artifacts import GraphIO

LAYER_PREFIX = "target.layers."
# A weight is an initializer of at least this size (share_weights.INLINE_BYTES: the ones in weights.bin); the
# small ones (shape constants, scalars) are often shared by every layer after constant deduplication and must
# not pin a node to a layer.
WEIGHT_BYTES = 1024


class NoLayersError(BuildError):
    """The graph names no decoder layer, on nodes or weights (not a graph export_onnx wrote: it names every
    target's layers): there is nowhere known to cut it."""


@dataclass(frozen=True)
class Segment:
    """One segment: layers ``first..last`` (inclusive) and the graph that runs them."""

    index: int
    count: int
    first: int
    last: int
    model: onnx.ModelProto
    inputs: tuple[str, ...]  # graph inputs and earlier segments' outputs, by name (weights excluded)
    outputs: tuple[str, ...]
    weight_bytes: int  # constant weights of the segment (its initializers)

    def io(self) -> GraphIO:
        """Its inputs and outputs as the manifest records them."""
        from dspark_compile.artifacts import GraphIO

        return GraphIO.of(ir.from_proto(self.model))


def tensor_bytes(value: ir.Value) -> int:
    """Bytes of an initializer from its dtype and shape (its data is not read)."""
    if value.dtype is None or value.shape is None:
        return 0
    return int(value.dtype.itemsize * math.prod(value.shape.numpy()))


def constant_weight_bytes(model: ir.Model) -> int:
    """Bytes of the graph's constant weights: what an engine of it holds (weight inputs are not constants)."""
    return sum(tensor_bytes(v) for v in model.graph.initializers.values())


def _layer_of_name(name: str) -> int | None:
    if not name.startswith(LAYER_PREFIX):
        return None
    index = name[len(LAYER_PREFIX):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def layer_of(node: ir.Node) -> int | None:
    """The decoder layer a node's name places it in (``target.layers.{i}.``), if any."""
    return _layer_of_name(node.name or "")


@dataclass
class _Analysis:
    graph: ir.Graph
    nodes: list[ir.Node]
    layers: int  # number of decoder layers (max index + 1)
    anchored: dict[ir.Node, int | None]  # anchored node -> its layer (None: outside the layers)
    initializers: dict[str, ir.Value]


def _analyse(model: ir.Model) -> _Analysis:
    graph = model.graph
    nodes = list(graph)
    inits = dict(graph.initializers)
    static: set[ir.Value] = set(inits.values())  # values computed from constants only
    # weight values -> the layer owning them (initializer `target.layers.{i}.…`, or a value computed from such)
    weights: dict[ir.Value, int | None] = {v: _layer_of_name(n) for n, v in inits.items()
                                           if tensor_bytes(v) >= WEIGHT_BYTES}
    anchored: dict[ir.Node, int | None] = {}
    layer_ids = set()
    for node in nodes:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise BuildError(f"segments: node `{node.name}` ({node.op_type}) has subgraphs, which the layer "
                             "split does not handle")
        inputs = [v for v in node.inputs if v is not None]
        owners = {weights[v] for v in inputs if v in weights}
        if all(v in static for v in inputs):
            static.update(node.outputs)
            if owners:  # e.g. a dequantized or transposed weight
                weights.update(dict.fromkeys(node.outputs, owners.pop() if len(owners) == 1 else None))
            continue
        # A node's layer is its name's (export_onnx names every node a layer emits); an unnamed node (a graph
        # from elsewhere) is in the layer of the weight it applies, where that weight's name says one.
        layer = layer_of(node)
        if layer is None and owners - {None} and len(owners) == 1:
            layer = next(iter(owners))
        if layer is not None:
            layer_ids.add(layer)
        producers = [v.producer() for v in inputs]
        # A weight applied outside the layers (Gemma4's per-layer-input embedding and projection) anchors its
        # node too, in the first segment unless a producer is later: a copy would copy the weight as well.
        if any(p in anchored for p in producers if p is not None) or owners:
            anchored[node] = layer
    if not layer_ids:
        raise NoLayersError(f"segments: no node is named `{LAYER_PREFIX}<i>.` or applies such a layer's weights; "
                            "the graph has no decoder layers to split at")
    return _Analysis(graph, nodes, max(layer_ids) + 1, anchored, inits)


def _assign(an: _Analysis, ranges: Sequence[tuple[int, int]]) -> tuple[dict[ir.Node, int], list[set[ir.Node]]]:
    """Anchored node -> segment, and each segment's full node set (its anchored nodes and the copies it needs)."""
    seg_of_layer = {layer: k for k, (lo, hi) in enumerate(ranges) for layer in range(lo, hi + 1)}
    where: dict[ir.Node, int] = {}
    for node in an.nodes:
        if node not in an.anchored:
            continue
        before = [where[p] for v in node.inputs if v is not None and (p := v.producer()) in where]
        layer = an.anchored[node]
        if layer is None:
            where[node] = max(before, default=0)
        else:
            where[node] = seg_of_layer[layer]
            if before and max(before) > where[node]:
                raise BuildError(f"segments: node `{node.name}` of layer {layer} uses a value made by a later "
                                 "layer; the graph's layers are not in order")
    members: list[set[ir.Node]] = [set() for _ in ranges]
    for node, k in where.items():
        members[k].add(node)
    last = len(ranges) - 1
    for value in an.graph.outputs:
        producer = value.producer()
        if producer is None:
            raise BuildError(f"segments: graph output `{value.name}` is not computed by a node")
        if producer not in where:
            members[last].add(producer)  # an output of constants and inputs only: computed at the end
    for k, group in enumerate(members):  # copy in the free nodes each segment needs
        stack = list(group)
        while stack:
            node = stack.pop()
            for v in node.inputs:
                p = v.producer() if v is not None else None
                if p is not None and p not in where and p not in group:
                    group.add(p)
                    stack.append(p)
        members[k] = group
    return where, members


def _segment_bytes(an: _Analysis, members: list[set[ir.Node]]) -> list[int]:
    out = []
    for group in members:
        names = {v.name for node in group for v in node.inputs if v is not None and v.name in an.initializers}
        out.append(sum(tensor_bytes(an.initializers[n]) for n in names))
    return out


def _balanced(costs: Sequence[int], count: int) -> list[tuple[int, int]]:
    """Contiguous ranges of ``costs`` in ``count`` parts with the smallest largest sum (front parts fullest)."""
    count = min(count, len(costs))

    def parts(cap: int) -> list[tuple[int, int]] | None:
        out, lo, total = [], 0, 0
        for i, c in enumerate(costs):
            if c > cap:
                return None
            if total + c > cap or len(costs) - i < count - len(out):  # leave a layer for each later part
                out.append((lo, i - 1))
                lo, total = i, 0
            total += c
        out.append((lo, len(costs) - 1))
        return out if len(out) == count else None

    sums = sorted({sum(costs[a:b]) for a in range(len(costs)) for b in range(a + 1, len(costs) + 1)})
    for cap in sums:  # the smallest cap that some split into exactly `count` parts satisfies
        found = parts(cap)
        if found is not None:
            return found
    return [(i, i) for i in range(len(costs))]


def layer_ranges(model: ir.Model, *, max_bytes: int | None = None, count: int | None = None
                 ) -> list[tuple[int, int]]:
    """Inclusive layer ranges, one per segment: the fewest segments of at most ``max_bytes`` constant weights
    each, balanced by weight bytes, or ``count`` balanced segments."""
    an = _analyse(model)
    if (max_bytes is None) == (count is None):
        raise UsageError("layer_ranges: give exactly one of max_bytes and count")
    _, per_layer = _assign(an, [(i, i) for i in range(an.layers)])
    costs = _segment_bytes(an, per_layer)  # each layer with what lands beside it (shared constants counted twice)
    if count is not None:
        if not 1 <= count <= an.layers:
            raise UsageError(f"segments: expected 1 to {an.layers} segments (one per layer at most), found {count}")
        return _balanced(costs, count)
    assert max_bytes is not None
    for n in range(1, an.layers + 1):
        ranges = _balanced(costs, n)
        if max(_segment_bytes(an, _assign(an, ranges)[1])) <= max_bytes:
            return ranges
    worst = max(range(an.layers), key=lambda i: costs[i])
    raise BuildError(f"segments: layer {worst} alone holds {costs[worst] / 1e9:.3f} GB of constant weights, more "
                     f"than the engine limit {max_bytes / 1e9:.3f} GB (--max-engine-gb); raise the limit")


def split(model: ir.Model, ranges: Sequence[tuple[int, int]]) -> list[Segment]:
    """The segments of ``model`` for inclusive layer ``ranges`` (in order, covering every layer)."""
    an = _analyse(model)
    covered = [i for lo, hi in ranges for i in range(lo, hi + 1)]
    if covered != list(range(an.layers)):
        raise UsageError(f"segments: layer ranges {list(ranges)} do not cover layers 0..{an.layers - 1} in order")
    where, members = _assign(an, ranges)
    proto = ir.to_proto(model)
    graph = model.graph
    if len(proto.graph.node) != len(an.nodes):
        raise BuildError("segments: the serialized graph's nodes differ from the in-memory graph's")
    node_proto = dict(zip(an.nodes, proto.graph.node, strict=True))
    init_proto = {t.name: t for t in proto.graph.initializer}
    init_order = {name: i for i, name in enumerate(init_proto)}
    info_proto = {v.name: v for v in proto.graph.value_info}
    input_proto = {v.name: v for v in proto.graph.input}
    output_proto = {v.name: v for v in proto.graph.output}
    graph_outputs = {v.name for v in graph.outputs}
    order = {node: i for i, node in enumerate(an.nodes)}

    # Values crossing segments: made by an anchored node, used by a node of a later segment.
    crossing: dict[ir.Value, list[int]] = {}
    for k, group in enumerate(members):
        for node in group:
            for v in node.inputs:
                p = v.producer() if v is not None else None
                if p is not None and p in where and where[p] != k:
                    assert where[p] < k
                    crossing.setdefault(v, []).append(k)

    if any(v.dtype is None or v.shape is None for v in crossing if v.name not in output_proto):
        import onnx

        # The exporter leaves some values undeclared (an Unsqueeze before the KV rows' concat): ONNX's own
        # inference declares them, from the graph alone (external initializers are not read).
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True).graph.value_info
        output_proto |= {v.name: v for v in inferred if v.name in {c.name for c in crossing}}
    segments = []
    for k, group in enumerate(members):
        ordered = sorted(group, key=order.__getitem__)
        made = {v for node in ordered for v in node.outputs}
        used = {v for node in ordered for v in node.inputs if v is not None}
        inputs = [v.name for v in graph.inputs if v in used and v.name not in init_proto]
        inputs += [v.name for v in sorted((v for v in crossing if k in crossing[v]),
                                          key=lambda v: order[v.producer()])]
        outputs = [v.name for v in sorted((v for v in crossing if where[v.producer()] == k
                                           and v.name not in graph_outputs), key=lambda v: order[v.producer()])]
        outputs += [v.name for v in graph.outputs if v in made and where.get(v.producer(), len(members) - 1) == k]
        by_name = {v.name: v for v in (*made, *used) if v.name}
        inits = sorted({v.name for v in used if v.name in init_proto}, key=init_order.__getitem__)
        seg = _make_model(proto, f"{proto.graph.name}.seg{k}", [node_proto[n] for n in ordered],
                          [init_proto[n] for n in inits],
                          [_info(by_name[n], input_proto | output_proto) for n in inputs],
                          [_info(by_name[n], output_proto) for n in outputs],
                          [info_proto[v.name] for v in made if v.name in info_proto and v.name not in outputs])
        weight = sum(tensor_bytes(an.initializers[n]) for n in inits)
        segments.append(Segment(k, len(members), ranges[k][0], ranges[k][1], seg, tuple(inputs), tuple(outputs),
                                weight))
    return segments


def _info(value: ir.Value, table: Mapping[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    """A segment input's or output's declaration: the graph's own where it is one of the graph's, else made from
    the value's dtype and shape (TensorRT needs both for an engine input)."""
    if value.name in table:
        return table[value.name]
    if value.dtype is None or value.shape is None:
        raise BuildError(f"segments: value `{value.name}` crosses segments but has no dtype or shape; run shape "
                         "inference on the graph first")
    return ir.serde.serialize_value(value)


def _make_model(base: onnx.ModelProto, name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
                infos: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(base)
    model.graph.Clear()
    g = model.graph
    g.name = name
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.input.extend(inputs)
    g.output.extend(outputs)
    g.value_info.extend(sorted(infos, key=lambda v: v.name))
    return model


_OPS: dict[type, Callable[[int, int], int]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                               ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _evaluate(expr: str, values: Mapping[str, int]) -> int:
    """A dimension expression of the exporter (``2*step_len``, ``decide_len - 1``) at the given dim values."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise KeyError(expr)

    return ev(ast.parse(expr, mode="eval"))


def derived_ranges(io: GraphIO, ranges: Mapping[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
    """``ranges`` plus a range for each input dimension that is an expression over them (a segment's input
    made inside the graph can carry one): its value at the min, opt and max of every dimension, which is its
    range where the expression grows with each of them (sums and products of dims, a dim minus a constant).
    Expressions over unknown names are left out, for Profile.from_dim_ranges to name them."""
    out = dict(ranges)
    for tensor in io.inputs:
        for dim in tensor.shape or ():
            if isinstance(dim, str) and dim not in out:
                try:
                    lo, opt, hi = (max(0, _evaluate(dim, {k: r[i] for k, r in ranges.items()})) for i in range(3))
                except (KeyError, SyntaxError, ZeroDivisionError):
                    continue
                out[dim] = (min(lo, hi), min(max(opt, lo), hi), max(lo, hi))
    return out
