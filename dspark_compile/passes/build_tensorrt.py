"""Pass `build_tensorrt`: one engine per graph with the available TensorRT flavor.

Full TensorRT gets the plugin variant of target_step (our `dspark::SpecVerify` plugin, registered from
`plugins/spec_verify/trt_plugin.py` inside the build process); TensorRT-RTX, which has no custom plugins,
or `--no-plugin`, gets the portable variant. A target that `segment_target` split by layer range (its weights
over --max-engine-gb) gets one engine per segment, ``target_step.seg{k}.plan``, instead of one. Per KV-length
bucket, target_step has two optimization profiles over its one set of weights — verification (γ+1 tokens, γ+1
decided rows) first, then prefill (a prompt of up to the bucket's length, one decided row) — and draft_propose
one; all cover batch 1..max_batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dspark_compile.artifacts import GRAPH_NAMES, PLUGIN, PORTABLE, Engine, Engines, GraphIO, segment_file
from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.model_config import TargetConfig

log = logging.getLogger(__name__)
PLUGIN_MODULE = "dspark_compile.plugins.spec_verify.trt_plugin"


def kv_buckets(spec: BuildSpec) -> list[tuple[int, int]]:
    """(lo, hi) cache-slot ranges, one TensorRT profile each."""
    edges = sorted({b for b in spec.kv_buckets if 16 <= b <= spec.max_context} | {spec.max_context})
    out, lo = [], 16
    for hi in edges:
        out.append((lo, hi))
        lo = hi + 1
    return out


PHASES = {"target_step": ("verify", "prefill"), "draft_propose": ("draft",)}  # profiles per KV bucket


def dim_ranges(spec: BuildSpec, block: int, slots: tuple[int, int], phase: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic dimension in one profile; ``phase`` is verify, prefill or draft."""
    lo, hi = slots
    b = spec.max_batch
    ranges = {"batch": (1, max(1, b // 2), b), "cache_slots": (lo, (lo + hi) // 2, hi)}
    if phase == "verify":  # γ+1 tokens verifying γ drafts (or fewer: target-only decoding verifies none)
        return ranges | {"step_len": (1, block + 1, block + 1), "decide_len": (1, block + 1, block + 1),
                         "draft_len": (0, block, block)}
    if phase == "prefill":  # a prompt, deciding its first token on its last position
        return ranges | {"step_len": (1, min(128, hi), hi), "decide_len": (1, 1, 1), "draft_len": (0, 0, 0)}
    return ranges | {"ctx_len": (1, block + 1, hi)}


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of a graph's constant weights (what its engine holds; weight inputs are not constants)."""
    from dspark_compile.targets.tensorrt.graph_checks import read_onnx
    from dspark_compile.targets.tensorrt.segments import constant_weight_bytes

    return constant_weight_bytes(read_onnx(onnx_path))


def estimate_activations(cfg: TargetConfig, ranges: dict[str, tuple[int, int, int]], dtype_bytes: int,
                         *, rows: int, vocab: int) -> int:
    """An upper estimate of one execution context's device memory at a profile's largest shapes, used where
    TensorRT cannot say (no GPU at build time): the float32 attention scores and probabilities of a layer over
    the whole cache ([B, heads, T, S], the exported attention is not fused), one layer's cache copy and MLP
    activations, and the decided rows' float32 logits and probabilities (``rows`` per request)."""
    b, s = ranges["batch"][2], ranges["cache_slots"][2]
    t = ranges.get("step_len", ranges.get("ctx_len", (0, 0, 1)))[2]
    if "ctx_len" in ranges:  # the draft's block attends over the cache and itself; its context rows are written
        t, s = rows, s + rows
    scores = 2 * b * cfg.num_attention_heads * t * s * 4 + b * t * s
    layer = 2 * b * cfg.num_key_value_heads * s * cfg.head_dim * dtype_bytes + 3 * b * t * cfg.intermediate_size * (
        dtype_bytes) + 4 * b * t * cfg.hidden_size * dtype_bytes
    return scores + layer + 3 * b * rows * vocab * 4


def run(state: BuildState) -> None:
    """The engine builder is a separate process that parses the graph files `share_weights` wrote."""
    from dspark_compile.targets.tensorrt import Profile, build_engine, load_trt
    from dspark_compile.targets.tensorrt.segments import derived_ranges

    graphs, spec, out_dir = state.onnx, state.spec, state.workdir / "engines"
    assert graphs is not None

    flavor = load_trt(spec.trt_flavor)
    use_plugin = flavor.supports_plugins and not spec.no_plugin
    out_dir.mkdir(parents=True, exist_ok=True)
    engines = []
    dtype_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[spec.dtype]
    assert state.program is not None and state.program.draft is not None
    configs = {"target_step": state.program.target.cfg, "draft_propose": state.program.draft.cfg.base}
    for name in GRAPH_NAMES:
        variant = PLUGIN if (use_plugin and name == "target_step") else PORTABLE
        ranges = [dim_ranges(spec, graphs.block_size, bucket, phase) for bucket in kv_buckets(spec)
                  for phase in PHASES[name]]
        # A target over --max-engine-gb was split by layer range (segment_target): one engine per segment, each
        # with the whole graph's profiles (dims a segment lacks do not apply; dims made inside the graph, e.g.
        # `2*step_len` on a crossing value, take the range their expression gives).
        parts = state.segments.get(variant, ()) if name == "target_step" else ()
        sources = [(graphs.path(name, variant), out_dir / f"{name}.plan", None)] if not parts else [
            (path, out_dir / segment_file(name, k, "plan"), k) for k, path in enumerate(parts)]
        for onnx_path, plan_path, segment in sources:
            io = GraphIO.read(onnx_path)
            profiles = [Profile.from_dim_ranges(onnx_path, derived_ranges(io, r)) for r in ranges]
            res = build_engine(onnx_path, plan_path, flavor=flavor, profiles=profiles, precision=spec.dtype,
                               plugin_modules=(PLUGIN_MODULE,) if variant == PLUGIN else ())
            log.info("engine %s: %d layers, %.1f MiB, %.1fs", plan_path.name, res.num_layers, res.plan_bytes / 2**20,
                     res.seconds)
            block = graphs.block_size
            activations = res.device_memory or tuple(
                estimate_activations(configs[name], r, dtype_bytes, rows=r.get("decide_len", (0, 0, block))[2],
                                     vocab=state.info.vocab_size if state.info else 0) for r in ranges)
            names = {"segment": segment, "segments": len(parts), "inputs": tuple(t.name for t in io.inputs),
                     "outputs": tuple(t.name for t in io.outputs)} if segment is not None else {}
            engines.append(Engine(graph=name, plan=res.plan_path, metadata=res.metadata_path,
                                  inspector=res.inspector_path, flavor=res.flavor, precision=res.precision,
                                  uses_plugin=variant == PLUGIN,
                                  weight_bytes=weight_bytes(onnx_path), activation_bytes=tuple(activations),
                                  activation_source="tensorrt" if res.device_memory else "estimate", **names))
    state.engines = Engines(out_dir, tuple(engines), flavor.name, flavor.version)
