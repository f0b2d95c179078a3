"""Which build dtypes onnxruntime can run: its CPU provider has no bf16 kernels for ops every graph uses, so a
bf16 build is refused up front with one line instead of failing at session creation.
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
