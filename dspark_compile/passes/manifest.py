"""Pass `manifest`: `manifest.json` — what went in, what ran, what came out, so CI can tell if a rebuild is needed.

Records sha256 of every input checkpoint file, the versions of every dependency used, each pass with its
duration, the build's ProgramInfo, and every artifact with size, sha256 and (for graphs and engines) its I/O.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import dspark_compile
from dspark_compile.artifacts import PORTABLE
from dspark_compile.build_state import BuildState

DEPENDENCIES = ("torch", "numpy", "safetensors", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "click", "rich",
                "tensorrt", "tensorrt-rtx-cu13-bindings", "triton", "nvidia-pytriton", "tritonclient")


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "dspark-compile": dspark_compile.__version__}
    for dist in DEPENDENCIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def run(state: BuildState) -> None:
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
        if f in state.written:
            entry["signature"] = state.written[f].to_json()
        elif f.suffix == ".plan":
            meta = f.with_suffix(f.suffix + ".json")
            if meta.exists():
                entry["engine"] = json.loads(meta.read_text())
        artifacts.append(entry)
    onnx = state.onnx
    state.manifest = {
        "format": 1,
        "spec": spec.to_json(),
        "inputs": inputs,
        "versions": versions(),
        "passes": [{"name": n, "seconds": round(t, 4)} for n, t in state.timings],
        "program": state.info.to_json() if state.info is not None and onnx is not None else None,
        "graphs": {"verify_mode": onnx.verify_mode, "block_size": onnx.block_size,
                   "variants": {k: list(v) for k, v in onnx.variants.items() if v != (PORTABLE,)}} if onnx else None,
        "engines": None if state.engines is None else {
            "flavor": state.engines.flavor, "tensorrt_version": state.engines.trt_version,
            "plans": [{"graph": e.graph, "plan": e.plan.name, "precision": e.precision, "plugin": e.uses_plugin}
                      for e in state.engines.engines]},
        "triton": None if state.triton is None else {"models": list(state.triton.models)},
        "artifacts": artifacts,
    }
    (state.workdir / "manifest.json").write_text(json.dumps(state.manifest, indent=2) + "\n")
