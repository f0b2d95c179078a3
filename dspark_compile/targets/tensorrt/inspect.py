"""What an engine is made of, written as JSON next to it (``<plan>.inspect.json``).

TensorRT's own ``IEngineInspector`` needs a deserialized engine, and deserializing needs a CUDA device
(TensorRT-RTX 1.7 on a CPU-only machine: "CUDA driver version is insufficient"). So the inspector JSON always
describes the *network definition* the parser produced — every layer with its type, the ONNX node it came
from and its input/output dtypes and shapes (in a strongly typed network the dtypes are the precisions) — and
adds the engine's fused-layer view (``engine``) only where a GPU made it available.

The verification step shows up either as plugin layers (``dspark::SpecVerify`` under full TensorRT) or as the
standard-op subgraph of ``decompose_spec_verify``; the latter is recognised by its ONNX node names, which the
pass prefixes with ``spec_verify`` (:data:`VERIFY_NODE_MARKS`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

PLUGIN_LAYER_TYPES = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
VERIFY_NODE_MARKS = ("spec_verify", "specverify")

_ONNX_ORIGIN = re.compile(r"\[ONNX Layer: (.*)\]")


# TensorRT's DataType names → the NumPy-style names the rest of dspark-compile uses (PROGRAM.md, manifests).
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8e4m3fn", "INT4": "int4",
                "FP4": "float4e2m1", "E8M0": "float8e8m0"}


def dtype_name(dtype: Any) -> str:
    """``DataType.HALF`` → ``float16``."""
    name = str(dtype).rsplit(".", 1)[-1]
    return _DTYPE_NAMES.get(name, name.lower())


def _tensor(tensor: Any) -> dict[str, Any] | None:
    if tensor is None:  # optional inputs of some layers
        return None
    return {"name": tensor.name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def describe_network(network: Any) -> dict[str, Any]:
    """Layers and I/O of a parsed ``INetworkDefinition`` (before the builder fuses anything)."""
    layers = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        origin = _ONNX_ORIGIN.search(layer.metadata or "")
        layers.append({
            "index": index,
            "name": layer.name,
            "type": str(layer.type).rsplit(".", 1)[-1],
            "onnx_node": origin.group(1) if origin else None,
            "inputs": [_tensor(layer.get_input(i)) for i in range(layer.num_inputs)],
            "outputs": [_tensor(layer.get_output(i)) for i in range(layer.num_outputs)],
        })
    return {
        "inputs": [_tensor(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [_tensor(network.get_output(i)) for i in range(network.num_outputs)],
        "layers": layers,
    }


def plugin_layers(description: dict[str, Any]) -> list[str]:
    return [layer["name"] for layer in description["layers"] if layer["type"] in PLUGIN_LAYER_TYPES]


def verify_layers(description: dict[str, Any]) -> list[str]:
    """Layers of the decomposed verification subgraph (see the module docstring for how they are found)."""
    found = []
    for layer in description["layers"]:
        names = f"{layer['name']} {layer['onnx_node'] or ''}".lower()
        if any(mark in names for mark in VERIFY_NODE_MARKS):
            found.append(layer["name"])
    return found


def summarize(description: dict[str, Any]) -> dict[str, Any]:
    """The short form kept in the engine metadata: counts by layer type and by output dtype."""
    layers = description["layers"]
    output_dtypes = Counter(
        out["dtype"] for layer in layers for out in layer["outputs"] if out is not None
    )
    return {
        "num_layers": len(layers),
        "by_type": dict(sorted(Counter(layer["type"] for layer in layers).items())),
        "output_dtypes": dict(sorted(output_dtypes.items())),
        "plugin_layers": plugin_layers(description),
        "verify_layers": verify_layers(description),
    }


def engine_information(trt: Any, plan: bytes, logger: Any) -> dict[str, Any] | None:
    """The engine inspector's JSON plus the device memory one execution context needs per optimization profile
    (``device_memory``), or ``None`` where the engine cannot be deserialized (no suitable GPU)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    info = info if isinstance(info, dict) else {"layers": info}
    per_profile = getattr(engine, "get_device_memory_size_for_profile_v2", None)
    if per_profile is not None:
        info["device_memory"] = [int(per_profile(i)) for i in range(engine.num_optimization_profiles)]
    return info


def dumps(document: dict[str, Any]) -> str:
    """JSON with one list item (layer, tensor) per line: greppable and diffable, and small for big models."""
    lines = []
    for key, value in document.items():
        if isinstance(value, list) and value:
            items = ",\n".join(f"  {json.dumps(item)}" for item in value)
            lines.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
