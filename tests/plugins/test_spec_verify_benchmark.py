"""benchmarks/spec_verify_gpu.py runs end to end without a GPU (Triton interpreter, one tiny configuration).

The H100 numbers themselves are produced by running the script there; this only keeps it from rotting.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "spec_verify_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("spec_verify_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_h100_sweep() -> None:
    bench = _load()
    args = bench.parse_args([])
    assert (args.batches, args.gammas, args.vocabs) == ([1, 8, 64], [1, 4, 7, 15], [384, 32000, 151936])
    assert sorted(args.dtypes) == ["bf16", "fp16", "fp32"] and args.name == "spec_verify_h100"
    assert abs(bench.chi2_pvalue(15.0, 15) - 0.45) < 0.05  # median of chi2(15) is about 14.3
    assert bench.chi2_pvalue(60.0, 15) < 1e-6


@pytest.mark.slow  # the benchmark runs the kernels in Triton's interpreter
def test_cpu_interpret_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--cpu-interpret", "--out", str(tmp_path), "--batches", "2",
           "--gammas", "2", "--vocabs", "40", "--dtypes", "bf16", "--reps", "1", "--chi2-samples", "150"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "spec_verify_cpu_interpret.json").read_text())
    assert summary["all_ok"] and len(summary["configs"]) == 2
    assert {c["mode"] for c in summary["configs"]} == {"greedy", "sampling"}
    assert (tmp_path / "spec_verify_cpu_interpret.png").stat().st_size > 0
