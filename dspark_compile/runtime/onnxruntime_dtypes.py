"""Which build dtypes onnxruntime can run, checked when a build is loaded (or packaged) for it.

onnxruntime's CPU provider has no bf16 kernels for ops every graph uses (``Mul``, ``MatMul``, ...): a bf16
build would fail at session creation with NOT_IMPLEMENTED. Refusing up front turns that into one line that
says what to do instead. fp32 and fp16 builds run.
"""

from __future__ import annotations

from dspark_compile.errors import BackendUnavailableError

UNSUPPORTED = ("bf16",)


def check_onnxruntime_dtype(dtype: str, what: str = "onnxruntime") -> None:
    """Raise :class:`BackendUnavailableError` (exit code 4) when ``what`` cannot run graphs of ``dtype``
    (a build's ``ProgramInfo.dtype``)."""
    if dtype in UNSUPPORTED:
        raise BackendUnavailableError(
            f"{what} cannot run {dtype} graphs (onnxruntime has no {dtype} CPU kernels for them); "
            "decode this build with `--backend torch`, or rebuild with `--dtype fp32` (or fp16) for onnxruntime")
