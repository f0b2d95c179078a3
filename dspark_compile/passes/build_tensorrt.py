"""Pass `build_tensorrt`: one engine per graph with the available TensorRT flavor.

Full TensorRT gets the plugin variant of target_verify (our `dspark::SpecVerify` plugin, registered from
`plugins/spec_verify/trt_plugin.py` inside the build process); TensorRT-RTX, which has no custom plugins,
or `--no-plugin`, gets the portable variant. Optimization profiles cover batch 1..max_batch, verify length
1..γ+1, and one profile per KV-length bucket.
"""

from __future__ import annotations

import logging

from dspark_compile.artifacts import GRAPH_NAMES, PLUGIN, PORTABLE, Engine, Engines
from dspark_compile.build_state import BuildState
from dspark_compile.spec import BuildSpec

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


def dim_ranges(spec: BuildSpec, block: int, slots: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    lo, hi = slots
    b = spec.max_batch
    return {
        "batch": (1, max(1, b // 2), b),
        "cache_slots": (lo, (lo + hi) // 2, hi),
        "prompt_len": (1, min(128, hi), hi),
        "ctx_len": (1, block + 1, hi),
        "verify_tokens": (1, block + 1, block + 1),
        "draft_len": (0, block, block),
    }


def run(state: BuildState) -> None:
    """The engine builder is a separate process that parses the graph files `share_weights` wrote."""
    from dspark_compile.targets.tensorrt import Profile, build_engine, load_trt

    graphs, spec, out_dir = state.onnx, state.spec, state.workdir / "engines"
    assert graphs is not None

    flavor = load_trt(spec.trt_flavor)
    use_plugin = flavor.supports_plugins and not spec.no_plugin
    out_dir.mkdir(parents=True, exist_ok=True)
    engines = []
    for name in GRAPH_NAMES:
        variant = PLUGIN if (use_plugin and name == "target_verify") else PORTABLE
        onnx_path = graphs.path(name, variant)
        profiles = [Profile.from_dim_ranges(onnx_path, dim_ranges(spec, graphs.block_size, bucket))
                    for bucket in kv_buckets(spec)]
        res = build_engine(onnx_path, out_dir / f"{name}.plan", flavor=flavor, profiles=profiles,
                           precision=spec.dtype, plugin_modules=(PLUGIN_MODULE,) if variant == PLUGIN else ())
        log.info("engine %s: %d layers, %.1f MiB, %.1fs", name, res.num_layers, res.plan_bytes / 2**20, res.seconds)
        engines.append(Engine(graph=name, plan=res.plan_path, metadata=res.metadata_path, inspector=res.inspector_path,
                              flavor=res.flavor, precision=res.precision, uses_plugin=variant == PLUGIN))
    state.engines = Engines(out_dir, tuple(engines), flavor.name, flavor.version)
