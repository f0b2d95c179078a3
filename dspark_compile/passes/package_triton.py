"""Pass `package_triton`: the build as a Triton model repository (BUILD/triton): one model per graph and
the `dspark` orchestrator, which reaches the graphs by `bls` or runs them itself (`onnxruntime_inprocess`).
"""

from __future__ import annotations

from dspark_compile.artifacts import GRAPH_NAMES, PORTABLE
from dspark_compile.build_state import BuildState


def run(state: BuildState) -> None:
    from dspark_compile.targets.triton.repository import TritonOptions, write_triton_repository

    spec, graphs, engines = state.spec, state.onnx, state.engines
    assert graphs is not None and state.info is not None
    options = TritonOptions(backend_mode=spec.triton_mode, max_batch=spec.max_batch, max_context=spec.max_context,
                            platform="auto" if engines is not None else "onnxruntime_onnx",
                            instance_kind="KIND_GPU" if engines is not None else "KIND_CPU", model_info=state.info)
    paths = {name: graphs.path(name, PORTABLE) for name in GRAPH_NAMES if PORTABLE in graphs.models.get(name, {})}
    state.triton = write_triton_repository(state.workdir, state.workdir, options, graphs=paths,
                                           io={name: state.written[path] for name, path in paths.items()},
                                           weight_inputs=state.weight_inputs)
