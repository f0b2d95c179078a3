"""Pass `manifest`: `manifest.json` — what went in, what ran, what came out, so CI can tell if a rebuild is needed.

Records sha256 of every input checkpoint file, the versions of every dependency used, each pass with its
duration, and every artifact with size, sha256 and (for graphs and engines) its I/O signature.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

import dspark_compile

if TYPE_CHECKING:
    from dspark_compile.pipeline import BuildState

DEPENDENCIES = ("torch", "numpy", "safetensors", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "click", "rich",
                "tensorrt", "tensorrt-rtx-cu13-bindings", "triton", "nvidia-pytriton", "tritonclient")
ONNX_DTYPES = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "dspark-compile": dspark_compile.__version__}
    for dist in DEPENDENCIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def onnx_signature(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path), load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": ONNX_DTYPES.get(v.type.tensor_type.elem_type, "?"),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "nodes": len(model.graph.node)}


def write_manifest(state: BuildState) -> Path:
    spec = state.spec
    inputs = []
    if state.pair is not None:
        for role, ckpt in (("target", state.pair.target), ("draft", state.pair.draft)):
            for f in ckpt.files:
                inputs.append({"role": role, "path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    artifacts = []
    for f in sorted(p for p in state.workdir.rglob("*") if p.is_file()):
        rel = f.relative_to(state.workdir).as_posix()
        if rel == "manifest.json":
            continue
        entry: dict[str, Any] = {"path": rel, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
        if f.suffix == ".onnx":
            entry["signature"] = onnx_signature(f)
        elif f.suffix == ".plan":
            meta = f.with_suffix(f.suffix + ".json")
            if meta.exists():
                entry["engine"] = json.loads(meta.read_text())
        artifacts.append(entry)
    manifest = {
        "format": 1,
        "spec": spec.to_json(),
        "inputs": inputs,
        "versions": versions(),
        "passes": [{"name": n, "seconds": round(t, 4)} for n, t in state.timings],
        "program": _program_info(state),
        "graphs": {"verify_mode": state.onnx.verify_mode, "block_size": state.onnx.block_size,
                   "variants": {k: list(v) for k, v in state.onnx.variants.items()}} if state.onnx else None,
        "engines": None if state.engines is None else {
            "flavor": state.engines.flavor, "tensorrt_version": state.engines.trt_version,
            "plans": [{"graph": e.graph, "plan": e.plan.name, "precision": e.precision, "plugin": e.uses_plugin}
                      for e in state.engines.engines]},
        "triton": None if state.triton is None else {"models": list(state.triton.models)},
        "artifacts": artifacts,
    }
    path = state.workdir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _program_info(state: BuildState) -> dict[str, Any] | None:
    """What a runtime needs to drive the graphs without the checkpoints."""
    if state.pair is None or state.pair.draft is None or state.onnx is None:
        return None
    tc, dc = state.pair.target.config, state.pair.draft.config
    return {
        "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "target_layers": tc.num_hidden_layers,
        "draft_layers": dc.base.num_hidden_layers, "kv_heads": tc.num_key_value_heads, "head_dim": tc.head_dim,
        "draft_kv_heads": dc.base.num_key_value_heads, "draft_head_dim": dc.base.head_dim,
        "block_size": state.onnx.block_size, "tap_layer_ids": list(dc.target_layer_ids),
        "tap_width": dc.num_taps * tc.hidden_size, "has_confidence": dc.enable_confidence_head,
        "markov_head": dc.markov_head_type, "eos_token_ids": list(tc.eos_token_ids), "dtype": state.spec.dtype,
    }
