"""TensorRT target: engines from the ONNX graphs, with full TensorRT or TensorRT-RTX (see :mod:`.adapter`)."""

from __future__ import annotations

from dspark_compile.targets.tensorrt.adapter import TrtFlavor, load_trt, visible_gpus
from dspark_compile.targets.tensorrt.build import (
    EngineBuildResult,
    Profile,
    build_engine,
    check_engine_compatible,
    read_engine_metadata,
)

__all__ = [
    "EngineBuildResult",
    "Profile",
    "TrtFlavor",
    "build_engine",
    "check_engine_compatible",
    "load_trt",
    "read_engine_metadata",
    "visible_gpus",
]
