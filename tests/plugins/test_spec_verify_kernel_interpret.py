"""The Triton kernel's logic against the reference on the CPU, through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so this runs in a subprocess. It checks the
algorithm (tiling, early exit, online max/sum, the draw), not GPU numerics; benchmarks/spec_verify_gpu.py
checks those on an H100. The cases are the decomposition test's named edge cases; BLOCK_V = 16 makes every
vocabulary span several tiles with a masked tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES_FILE = Path(__file__).resolve().parents[1] / "passes" / "test_decompose_spec_verify.py"

SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("spec_verify_cases", sys.argv[1])
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    from dspark_compile.plugins.spec_verify.kernel import spec_verify_triton
    for name in sorted(cases.CASES):
        mode, inputs = cases.make_case(name)
        accepted, next_token = spec_verify_triton(**inputs, mode=mode, block_v=16)
        try:
            cases.assert_matches_reference(mode, inputs, accepted.numpy(), next_token.numpy())
        except AssertionError as exc:
            raise SystemExit(f"{name}: {exc}")
    print("checked", len(cases.CASES))
    """
)


def test_kernel_matches_reference_in_interpreter() -> None:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(CASES_FILE)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked" in result.stdout
