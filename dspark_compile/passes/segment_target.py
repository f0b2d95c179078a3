"""Pass `segment_target`: split target_step by decoder-layer range when its constant weights exceed
``--max-engine-gb``, so that `build_tensorrt` builds one engine per segment (issue 14).

Why: the TensorRT(-RTX) builder holds about 2.2x an engine's constant weights in anonymous memory while it
builds, so an 8B target as one engine does not build on a 24 GiB machine. Each variant of target_step
(portable, plugin) is split at the same layer ranges into ``onnx/target_step[.plugin].seg{k}.onnx``: graph
files only, their initializers pointing into the build's one ``weights.bin`` (see targets/tensorrt/segments.py).
A target within the limit is left alone: the build is what it was without this pass. Every target this compiler
exports names its layers (Qwen3 through the layer template, Gemma4 through export_onnx's module scopes); a graph
that names none (a foreign or hand-edited one) is built whole too, with a warning.
"""

from __future__ import annotations

import logging

from dspark_compile.artifacts import PORTABLE, segment_file
from dspark_compile.build_state import BuildState

log = logging.getLogger(__name__)
GRAPH = "target_step"


def run(state: BuildState) -> None:
    from dspark_compile.targets.tensorrt.segments import NoLayersError, constant_weight_bytes, layer_ranges, split

    graphs = state.onnx
    assert graphs is not None
    variants = graphs.models.get(GRAPH, {})
    if not variants:
        return
    limit = int(state.spec.max_engine_gb * 1e9)
    portable = variants.get(PORTABLE) or next(iter(variants.values()))
    total = constant_weight_bytes(portable)
    if total <= limit:
        return
    try:
        ranges = layer_ranges(portable, max_bytes=limit)  # the same for every variant: same layers and weights
    except NoLayersError as e:  # built whole, as before this pass; the builder may run out of memory
        log.warning("target_step: %.2f GB of constant weights > --max-engine-gb %g, but it is built as one "
                    "engine: %s", total / 1e9, state.spec.max_engine_gb, e)
        return
    for variant, model in variants.items():
        paths = []
        for segment in split(model, ranges):
            path = graphs.directory / segment_file(GRAPH, segment.index, "onnx", variant)
            path.write_bytes(segment.model.SerializeToString(deterministic=True))
            state.written[path] = segment.io()
            paths.append(path)
            log.info("segment %s: layers %d-%d, %.2f GB of weights", path.name, segment.first, segment.last,
                     segment.weight_bytes / 1e9)
        state.segments[variant] = tuple(paths)
    log.info("target_step: %.2f GB of constant weights > --max-engine-gb %g: %d segments", total / 1e9,
             state.spec.max_engine_gb, len(ranges))
