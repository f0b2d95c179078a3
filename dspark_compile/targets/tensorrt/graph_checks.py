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
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from dspark_compile.errors import BuildError, UsageError
from dspark_compile.targets.tensorrt.adapter import TrtFlavor

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]

_T = onnx.TensorProto
PRECISIONS = {"fp32": _T.FLOAT, "fp16": _T.FLOAT16, "bf16": _T.BFLOAT16}
_FLOAT_TYPES = (_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.DOUBLE)
# Dtypes an engine binding can have. DOUBLE is left out on purpose: the parser would quietly narrow it to
# float32, and the host loop feeds every backend the graph's own dtypes.
_BINDING_TYPES = (_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.INT8, _T.UINT8, _T.INT32, _T.INT64, _T.BOOL)
_STANDARD_DOMAINS = ("", "ai.onnx")
CACHE_INPUTS = ("kv_cache", "draft_kv")  # [layers, 2, B, KV, S, D]; axis 4 is the cache capacity


@dataclass(frozen=True)
class OnnxFacts:
    """What the checks need: graph I/O (``name -> (elem_type, dims or None)``), custom nodes, weights."""

    inputs: dict[str, tuple[int, tuple[int | str | None, ...] | None]]
    outputs: dict[str, tuple[int, tuple[int | str | None, ...] | None]]
    custom_nodes: list[str]
    weight_elements: Counter[int]


def _value_info(value: onnx.ValueInfoProto) -> tuple[int, tuple[int | str | None, ...] | None]:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return tensor.elem_type, None
    dims = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
    )
    return tensor.elem_type, dims


def _custom_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes outside the standard domain, looking inside subgraphs and model-local functions."""
    local = {(f.domain, f.name): f for f in model.functions}
    found: list[str] = []
    visited: set[tuple[str, str]] = set()

    def walk(nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in local:
                if key not in visited:
                    visited.add(key)
                    walk(local[key].node)
            elif node.domain not in _STANDARD_DOMAINS:
                found.append(f"`{node.name or '(unnamed)'}` ({node.domain}::{node.op_type})")
            for attr in node.attribute:
                for graph in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                    walk(graph.node)

    walk(model.graph.node)
    return found


def read_onnx(onnx_path: Path) -> OnnxFacts:
    """The facts the checks need; a BuildError when the file is missing, unreadable or has no graph."""
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path}: ONNX file not found; export the graph first.")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, ValueError) as exc:
        raise BuildError(f"{onnx_path}: not a readable ONNX model ({exc}); re-export it.") from exc
    graph = model.graph
    if not graph.output:
        raise BuildError(f"{onnx_path}: the ONNX model has no graph outputs (empty or truncated file?); "
                         "re-export it.")
    weights = {init.name for init in graph.initializer}
    weight_elements: Counter[int] = Counter()
    for init in graph.initializer:
        weight_elements[init.data_type] += math.prod(init.dims)
    return OnnxFacts(
        inputs={v.name: _value_info(v) for v in graph.input if v.name not in weights},
        outputs={v.name: _value_info(v) for v in graph.output},
        custom_nodes=_custom_nodes(model),
        weight_elements=weight_elements,
    )


def _dtype(elem_type: int) -> str:
    """NumPy-style names, as the engine metadata writes them (``float32``, not ONNX's ``FLOAT``)."""
    special = {_T.FLOAT: "float32", _T.DOUBLE: "float64"}
    return special.get(elem_type) or onnx.helper.tensor_dtype_to_string(elem_type).split(".")[-1].lower()


def check_no_cache_outputs(facts: OnnxFacts, onnx_path: Path) -> None:
    """No output may carry a cache's capacity dimension: that output would be a whole cache (or a slice of
    it as large), copied back every call; a graph returns the new rows only (``kv_new`` [.., T, D])."""
    slot_dims = {dims[4] for name, (_, dims) in facts.inputs.items()
                 if name in CACHE_INPUTS and dims is not None and len(dims) == 6 and isinstance(dims[4], str)}
    for name, (_, dims) in facts.outputs.items():
        hit = sorted(d for d in dims or () if d in slot_dims)
        if hit:
            raise BuildError(f"{onnx_path}: output `{name}` {list(dims or [])} has the cache capacity dimension "
                             f"`{hit[0]}`, i.e. it returns a whole KV cache; graphs must return only the rows "
                             "they wrote (docs/PROGRAM.md, KV contract). Re-export with this version's partition.")


def check_graph(facts: OnnxFacts, onnx_path: Path, flavor: TrtFlavor, precision: str) -> None:
    check_no_cache_outputs(facts, onnx_path)
    if facts.custom_nodes and not flavor.supports_plugins:
        more = f" (+{len(facts.custom_nodes) - 1} more)" if len(facts.custom_nodes) > 1 else ""
        raise BuildError(
            f"{onnx_path}: node {facts.custom_nodes[0]}{more} is a custom op, and {flavor.label} has no "
            "plugin support; rebuild with --no-plugin (the decompose_spec_verify pass writes verification "
            "with standard ONNX ops) or use --trt-flavor full."
        )
    for kind, tensors in (("input", facts.inputs), ("output", facts.outputs)):
        for name, (elem_type, _) in tensors.items():
            if elem_type not in _BINDING_TYPES:
                allowed = ", ".join(_dtype(t) for t in _BINDING_TYPES)
                raise BuildError(f"{onnx_path}: graph {kind} `{name}` is {_dtype(elem_type)}; a TensorRT "
                                 f"engine binding must be one of {allowed}. Change its dtype in the export.")
    # The weights say what the graph computes in. A graph without float weights (e.g. verification alone)
    # may mix float16 logits with float32 probabilities: any of its float input dtypes will do.
    want = PRECISIONS[precision]
    weights = Counter({t: n for t, n in facts.weight_elements.items() if t in _FLOAT_TYPES})
    if weights:
        found = weights.most_common(1)[0][0]
        accepted = {found}
    else:
        accepted = {t for t, _ in facts.inputs.values() if t in _FLOAT_TYPES}
        found = min(accepted, default=want)
    if accepted and want not in accepted:
        raise BuildError(
            f"{onnx_path}: the graph computes in {_dtype(found)} but precision {precision} was asked "
            f"for; networks are strongly typed, so export the graph in {_dtype(want)} "
            f"(or build with the precision the graph has)."
        )


def check_profiles(profiles: Sequence[Mapping[str, ShapeRange]], facts: OnnxFacts, onnx_path: Path) -> None:
    """Each profile (``input -> (min, opt, max)``) against the graph's inputs: names, ranks, fixed dims."""
    names = ", ".join(f"`{n}`" for n in facts.inputs)
    for index, profile in enumerate(profiles):
        where = f"{onnx_path}: optimization profile {index}"
        for name in profile:
            if name not in facts.inputs:
                raise UsageError(f"{where} names input `{name}`; the graph's inputs are {names}.")
        for name, (_, dims) in facts.inputs.items():
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
