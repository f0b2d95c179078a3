"""Checks on an ONNX graph before TensorRT sees it, read without its weights.

They catch what would otherwise fail late, vaguely or fatally: a corrupt file, custom-domain nodes for a
flavor without plugins (TensorRT-RTX's parser can abort the whole process on those), graph inputs/outputs of
a dtype TensorRT has no binding for, a graph whose float dtype is not the requested precision (networks are
strongly typed), optimization profiles that do not fit the graph's inputs, and an output that is a whole KV
cache (docs/PROGRAM.md: graphs return only the rows they wrote, so no cache travels back per call).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir
from google.protobuf.message import DecodeError

from dspark_compile.artifacts import GraphIO
from dspark_compile.errors import BuildError, UsageError
from dspark_compile.targets.tensorrt.adapter import TrtFlavor

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]

PRECISIONS = {"fp32": "float", "fp16": "float16", "bf16": "bfloat16"}  # GraphIO's dtype names
_FLOAT_TYPES = ("float", "float16", "bfloat16", "double")
# Dtypes an engine binding can have. DOUBLE is left out on purpose: the parser would quietly narrow it to
# float32, and the host loop feeds every backend the graph's own dtypes.
# float8e4m3fn: an e4m3 LM head's weight input (TensorRT-RTX 1.7 builds it into a DEQUANTIZE layer)
_BINDING_TYPES = ("float", "float16", "bfloat16", "float8e4m3fn", "int8", "uint8", "int32", "int64", "bool")
_STANDARD_DOMAINS = ("", "ai.onnx")
CACHE_INPUTS = ("kv_cache", "draft_kv")  # [layers, 2, B, KV, S, D]; axis 4 is the cache capacity
# The sliding layers' ring (Gemma4): [sliding layers, 2, B, KV, R, D]; axis 4 is R = W + G, fixed in the graph
# (which slot holds which position is arithmetic mod R), so it is no capacity dim and its rows output may not
# have it either.
RING_INPUTS = ("kv_ring",)


def read_onnx(onnx_path: Path) -> ir.Model:
    """The graph without its external weights; a BuildError when the file is missing, unreadable or has no
    graph."""
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path}: ONNX file not found; export the graph first.")
    try:
        model = ir.load(onnx_path)
    except (DecodeError, ValueError) as exc:
        raise BuildError(f"{onnx_path}: not a readable ONNX model ({exc}); re-export it.") from exc
    if not model.graph.outputs:
        raise BuildError(f"{onnx_path}: the ONNX model has no graph outputs (empty or truncated file?); "
                         "re-export it.")
    return model


def custom_nodes(model: ir.Model) -> list[str]:
    """Nodes outside the standard domain, looking inside subgraphs and model-local functions."""
    found: list[str] = []
    visited: set[ir.OperatorIdentifier] = set()

    def walk(graph: ir.Graph | ir.Function) -> None:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            key = node.op_identifier()
            if key in model.functions:
                if key not in visited:
                    visited.add(key)
                    walk(model.functions[key])
            elif node.domain not in _STANDARD_DOMAINS:
                found.append(f"`{node.name or '(unnamed)'}` ({node.domain}::{node.op_type})")

    walk(model.graph)
    return found


def _weight_elements(model: ir.Model) -> Counter[str]:
    """Elements of the weights per dtype name (read from the headers: external data stays unread)."""
    counts: Counter[str] = Counter()
    for value in model.graph.initializers.values():
        if value.dtype is not None and value.shape is not None:
            counts[value.dtype.name.lower()] += math.prod(d if isinstance(d, int) else 0 for d in value.shape)
    return counts


def _dtype(name: str) -> str:
    """NumPy-style names, as the engine metadata writes them (``float32``, not ONNX's ``float``)."""
    return {"float": "float32", "double": "float64"}.get(name, name)


def check_no_cache_outputs(io: GraphIO, onnx_path: Path) -> None:
    """No output may carry a cache's capacity dimension: that output would be a whole cache (or a slice of
    it as large), copied back every call; a graph returns the new rows only (``kv_new`` [.., T, D])."""
    slot_dims = {t.shape[4] for t in io.inputs if t.name in CACHE_INPUTS and t.shape is not None
                 and len(t.shape) == 6 and isinstance(t.shape[4], str)}
    for t in io.inputs:
        if t.name in RING_INPUTS and (t.shape is None or len(t.shape) != 6 or not isinstance(t.shape[4], int)):
            raise BuildError(f"{onnx_path}: input `{t.name}` {list(t.shape or [])} must be [layers, 2, batch, KV, R, "
                             "D] with R fixed (the ring's slots, window + block size); re-export with this version's "
                             "partition.")
    for t in io.outputs:
        hit = sorted(d for d in t.shape or () if d in slot_dims)
        if hit:
            raise BuildError(f"{onnx_path}: output `{t.name}` {list(t.shape or [])} has the cache capacity dimension "
                             f"`{hit[0]}`, i.e. it returns a whole KV cache; graphs must return only the rows "
                             "they wrote (docs/PROGRAM.md, KV contract). Re-export with this version's partition.")


def check_graph(model: ir.Model, onnx_path: Path, flavor: TrtFlavor, precision: str) -> None:
    io = GraphIO.of(model)
    check_no_cache_outputs(io, onnx_path)
    custom = custom_nodes(model)
    if custom and not flavor.supports_plugins:
        more = f" (+{len(custom) - 1} more)" if len(custom) > 1 else ""
        raise BuildError(
            f"{onnx_path}: node {custom[0]}{more} is a custom op, and {flavor.label} has no "
            "plugin support; rebuild with --no-plugin (the decompose_spec_verify pass writes verification "
            "with standard ONNX ops) or use --trt-flavor full."
        )
    for kind, tensors in (("input", io.inputs), ("output", io.outputs)):
        for t in tensors:
            if t.dtype not in _BINDING_TYPES:
                allowed = ", ".join(_dtype(d) for d in _BINDING_TYPES)
                raise BuildError(f"{onnx_path}: graph {kind} `{t.name}` is {_dtype(t.dtype)}; a TensorRT "
                                 f"engine binding must be one of {allowed}. Change its dtype in the export.")
    # The weights say what the graph computes in. A graph without float weights (e.g. verification alone)
    # may mix float16 logits with float32 probabilities: any of its float input dtypes will do.
    want = PRECISIONS[precision]
    weights = Counter({t: n for t, n in _weight_elements(model).items() if t in _FLOAT_TYPES})
    if weights:
        found = weights.most_common(1)[0][0]
        accepted = {found}
    else:
        accepted = {t.dtype for t in io.inputs if t.dtype in _FLOAT_TYPES}
        found = min(accepted, default=want)
    if accepted and want not in accepted:
        raise BuildError(
            f"{onnx_path}: the graph computes in {_dtype(found)} but precision {precision} was asked "
            f"for; networks are strongly typed, so export the graph in {_dtype(want)} "
            f"(or build with the precision the graph has)."
        )


def check_profiles(profiles: Sequence[Mapping[str, ShapeRange]], io: GraphIO, onnx_path: Path) -> None:
    """Each profile (``input -> (min, opt, max)``) against the graph's inputs: names, ranks, fixed dims."""
    inputs = {t.name: t.shape for t in io.inputs}
    names = ", ".join(f"`{n}`" for n in inputs)
    for index, profile in enumerate(profiles):
        where = f"{onnx_path}: optimization profile {index}"
        for name in profile:
            if name not in inputs:
                raise UsageError(f"{where} names input `{name}`; the graph's inputs are {names}.")
        for name, dims in inputs.items():
            dynamic = dims is None or not all(isinstance(d, int) and d > 0 for d in dims)
            if name not in profile:
                if dynamic:
                    raise UsageError(f"{where} has no (min, opt, max) shapes for the dynamic input `{name}` "
                                     f"{list(dims or [])}; add them.")
                continue
            if dims is None:
                continue
            for which, shape in zip(("min", "opt", "max"), profile[name], strict=True):
                if len(shape) != len(dims):
                    raise UsageError(f"{where}: input `{name}` has rank {len(dims)} {list(dims)}, the "
                                     f"{which} shape {list(shape)} has rank {len(shape)}.")
                for axis, (want, got) in enumerate(zip(dims, shape, strict=True)):
                    if isinstance(want, int) and want > 0 and want != got:
                        raise UsageError(f"{where}: input `{name}` axis {axis} is fixed at {want} in the "
                                         f"graph, the {which} shape {list(shape)} has {got}.")
