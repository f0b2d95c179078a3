"""Pass `manifest`: `manifest.json` — inputs (sha256), versions, passes, ProgramInfo, artifacts with their I/O,
and the GPU memory a server of the build needs; over ``--gpu-memory`` that fails the build (exit 3).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from typing import Any

import dspark_compile
from dspark_compile.artifacts import PORTABLE, Engine, sha256_file
from dspark_compile.build_spec import parse_size
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError

DEPENDENCIES = ("torch", "numpy", "safetensors", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "click", "rich",
                "tensorrt", "tensorrt-rtx-cu13-bindings", "triton", "nvidia-pytriton", "tritonclient")


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
                   "variants": {k: list(v) for k, v in onnx.variants.items() if v != (PORTABLE,)},
                   "repeated_constant_bytes": state.repeated_constant_bytes} if onnx else None,
        "weight_inputs": state.weight_inputs,
        "engines": None if state.engines is None else {
            "flavor": state.engines.flavor, "tensorrt_version": state.engines.trt_version,
            "plans": [plan_record(e) for e in state.engines.engines]},
        "quantization": state.quantization,
        "acceptance": state.acceptance,
        "triton": None if state.triton is None else {"models": list(state.triton.models)},
        "artifacts": artifacts,
    }
    memory = server_memory(state.manifest)
    state.manifest["memory"] = memory
    limit = parse_size(spec.gpu_memory) if spec.gpu_memory is not None else None
    if memory is not None and limit is not None and memory["total_bytes"] > limit:
        raise BuildError(f"--gpu-memory {spec.gpu_memory}: a server of this build needs {gib(memory['total_bytes'])} "
                         f"({gib(memory['weight_bytes'])} weights, {gib(memory['kv_cache_bytes'])} KV caches, "
                         f"{gib(memory['activation_bytes'])} activations at batch {memory['max_batch']} and "
                         f"{memory['max_context']} slots); lower --max-batch or --max-context, or use a larger GPU")
    (state.workdir / "manifest.json").write_text(json.dumps(state.manifest, indent=2) + "\n")


def plan_record(e: Engine) -> dict[str, Any]:
    """One engine in the manifest; a segment of a split target (segment_target) also records its place in the
    chain and its inputs and outputs by name, which is how a runtime wires the chain."""
    record = {"graph": e.graph, "plan": e.plan.name, "precision": e.precision, "plugin": e.uses_plugin,
              "plan_bytes": e.plan.stat().st_size, "weight_bytes": e.weight_bytes,
              "activation_bytes": list(e.activation_bytes), "activation_source": e.activation_source}
    if e.segment is not None:
        record |= {"segment": e.segment, "segments": e.segments, "inputs": list(e.inputs), "outputs": list(e.outputs)}
    return record


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def server_memory(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """GPU memory of a server of the build at its max batch and context: every engine's weights once, the
    graphs' weight inputs once (one buffer bound to both engines), both KV caches full (the sliding layers' ring
    at its fixed slots), one execution context per engine as Triton keeps them (its largest profile; TensorRT's
    own number when a GPU was at the build, else build_tensorrt's estimate) and the executor's per-call buffers
    (taps of a full prompt, draft probabilities). Without engines the weights are the ONNX weights file, plus one
    more copy of a constant per further graph that holds it (each onnxruntime session loads its own), and
    activations are unknown (0)."""
    program, spec = manifest.get("program"), manifest.get("spec") or {}
    if not program:
        return None
    dsize = {"fp32": 4, "fp16": 2, "bf16": 2}[program["dtype"]]
    batch, slots, g = int(spec.get("max_batch", 1)), int(spec.get("max_context", 0)), program["block_size"]
    inputs = {(r["file"], r["offset"]): r["bytes"] for r in (manifest.get("weight_inputs") or {}).values()}
    engines = (manifest.get("engines") or {}).get("plans") or []
    if engines:
        # A split target's segments are engines of their own: their weights add up, and Triton gives each engine
        # model its own execution context, so activations add up too (the in-process TensorRT transport shares
        # one scratch and needs only the largest: this is the upper bound).
        weights = sum(p["weight_bytes"] for p in engines) + sum(inputs.values())
        activations = sum(max(p["activation_bytes"], default=0) for p in engines)
    else:
        weights = next((a["bytes"] for a in manifest.get("artifacts", []) if a["path"] == "onnx/weights.bin"), 0)
        weights += (manifest.get("graphs") or {}).get("repeated_constant_bytes", 0)
        activations = 0
    # A ring (Gemma4's sliding layers) is a fixed ring_slots per sequence; the full-length cache the rest.
    ring = program.get("ring_layers", 0) * program.get("ring_kv_heads", 0) * program.get("ring_head_dim", 0)
    kv = batch * slots * 2 * dsize * ((program["target_layers"] - program.get("ring_layers", 0)) * program["kv_heads"]
                                      * program["head_dim"]
                                      + program["draft_layers"] * program["draft_kv_heads"] * program["draft_head_dim"])
    kv += batch * program.get("ring_slots", 0) * 2 * dsize * ring
    buffers = batch * slots * program["tap_width"] * dsize + 2 * batch * g * program["vocab_size"] * 4
    return {"max_batch": batch, "max_context": slots, "weight_bytes": weights, "kv_cache_bytes": kv,
            "activation_bytes": activations, "buffer_bytes": buffers,
            "activation_source": sorted({p["activation_source"] for p in engines}) or ["unknown (no engines)"],
            "total_bytes": weights + kv + activations + buffers}
