"""Pass `package_triton`: lay the build out as a Triton Inference Server model repository (BUILD/triton).

One model per graph (TensorRT plans when the build has engines, else ONNX) plus the `dspark` python-backend
orchestrator. `triton_mode` picks how the orchestrator reaches the graphs: `bls` (calls the graph models,
for GPU servers) or `onnxruntime_inprocess` (runs the ONNX graphs itself: servers with only the python
backend, such as the one used in CI).
"""

from __future__ import annotations

from pathlib import Path

from dspark_compile.ir import Engines, OnnxGraphs, TritonRepository
from dspark_compile.spec import BuildSpec


def package_triton(build_dir: Path, graphs: OnnxGraphs, engines: Engines | None, spec: BuildSpec) -> TritonRepository:
    from dspark_compile.targets.triton.repository import TritonOptions, write_triton_repository

    del graphs  # found on disk in build_dir/onnx; engines in build_dir/engines
    options = TritonOptions(
        backend_mode=spec.triton_mode,
        platform="auto" if engines is not None else "onnxruntime_onnx",
        max_batch=spec.max_batch,
        max_context=spec.max_context,
        instance_kind="KIND_GPU" if engines is not None else "KIND_CPU",
    )
    return write_triton_repository(build_dir, build_dir, options)
