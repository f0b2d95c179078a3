"""Which build dtypes onnxruntime can run, checked when a build is loaded (or packaged) for it.

onnxruntime's CPU provider has no bf16 kernels for ops every graph uses (``Mul``, ``MatMul``, ...): a bf16
build would fail at session creation with NOT_IMPLEMENTED. Refusing up front turns that into one line that
says what to do instead. fp32 and fp16 builds run.
"""

from __future__ import annotations

from dspark_compile.errors import BackendUnavailableError
from dspark_compile.runtime.backend import ProgramInfo

UNSUPPORTED = ("bf16",)


def check_onnxruntime_dtype(info: ProgramInfo, what: str = "onnxruntime") -> None:
    """Raise :class:`BackendUnavailableError` (exit code 4) when ``what`` cannot run ``info.dtype`` graphs."""
    if info.dtype in UNSUPPORTED:
        raise BackendUnavailableError(
            f"{what} cannot run {info.dtype} graphs (onnxruntime has no {info.dtype} CPU kernels for them); "
            "decode this build with `--backend torch`, or rebuild with `--dtype fp32` (or fp16) for onnxruntime")
