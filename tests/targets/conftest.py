"""Shared helpers of the target tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def triton_interpreter() -> Callable[[str, Path, int], subprocess.CompletedProcess[str]]:
    """Runs a script in a fresh interpreter with TRITON_INTERPRET=1 (the interpreter mode must be set before
    triton is imported, hence the subprocess), the script's one argument being a pair directory."""
    pytest.importorskip("triton")

    def run(script: str, pair: Path, timeout: int) -> subprocess.CompletedProcess[str]:
        env = os.environ | {"TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-c", script, str(pair)], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    return run
