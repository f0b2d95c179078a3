"""Triton's own ``ptxas`` on a kernel's PTX, without a GPU: its verbose notes say whether the wgmma of a loop are
serialized (note C7515) and how many registers a thread uses. The decode GEMM's candidates are checked this way on
the CPU (benchmarks/wgmma_serialization.py, tests/targets/test_sass_order.py); what it costs is the device's to
measure."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

SERIALIZED = "wgmma.mma_async instructions are serialized"  # ptxas's note C7515


def ptxas_binary() -> Path:
    """The ptxas Triton's wheel ships (it may not exist: callers check)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def ptxas_notes(ptx: str) -> str:
    """What ``ptxas -arch=sm_90a -v`` prints for ``ptx`` (compiled, discarded)."""
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        run = subprocess.run([str(ptxas_binary()), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True)
    return run.stdout + run.stderr
