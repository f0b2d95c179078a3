"""A bf16 build is refused by everything that would run it on onnxruntime: one line naming `--backend torch`
and `--dtype fp32`, exit code 4, before any session is created (onnxruntime's CPU provider would otherwise die
with NOT_IMPLEMENTED for Mul/MatMul). fp32 and fp16 are accepted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_compile import api
from dspark_compile.errors import BackendUnavailableError
from dspark_compile.runtime.onnxruntime_dtypes import check_onnxruntime_dtype

REFUSAL = r"cannot run bf16 graphs .*`--backend torch`, or rebuild with `--dtype fp32`"


@pytest.fixture
def bf16_build(golden_build: Path, tmp_path: Path) -> Path:
    """The golden build with its manifest saying bf16 (what a `--dtype bf16` build records)."""
    copy = tmp_path / "build"
    shutil.copytree(golden_build, copy, ignore=shutil.ignore_patterns("dump"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["program"]["dtype"] = "bf16"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fp32_and_fp16_are_accepted(dtype: str) -> None:
    check_onnxruntime_dtype(dtype)


def test_bf16_is_refused_with_the_alternatives() -> None:
    with pytest.raises(BackendUnavailableError, match=REFUSAL) as info:
        check_onnxruntime_dtype("bf16")
    assert info.value.exit_code == 4


def test_loading_a_bf16_build_is_refused(bf16_build: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=REFUSAL):
        api.load_backend(bf16_build, "onnxruntime")


def test_cli_run_on_a_bf16_build_is_one_line_and_exit_code_4(bf16_build: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dspark_compile.cli", "run", str(bf16_build), "--prompt-ids",
                           "1,2,3", "--max-new-tokens", "2"], capture_output=True, text=True)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: onnxruntime cannot run bf16 graphs")
    assert "--backend torch" in proc.stderr and "Traceback" not in proc.stderr


def test_triton_repository_on_onnxruntime_is_refused(bf16_build: Path, tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc")
    from dspark_compile.targets.triton.repository import TritonOptions, write_triton_repository

    for mode in ("bls", "onnxruntime_inprocess"):
        with pytest.raises(BackendUnavailableError, match=REFUSAL):
            write_triton_repository(bf16_build, tmp_path / "out", TritonOptions(backend_mode=mode))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("targets", "mode"), [("onnx,triton", "bls"), ("onnx,tensorrt,triton",
                                                                        "onnxruntime_inprocess")])
def test_bf16_triton_build_without_engines_is_refused_before_export(golden_dir: Path, tmp_path: Path,
                                                                     targets: str, mode: str) -> None:
    pair = golden_dir / "dspark_tiny"
    with pytest.raises(BackendUnavailableError, match=REFUSAL):
        api.build(target=pair / "target", draft=pair / "draft", out=tmp_path / "out", dtype="bf16",
                  targets=targets, triton_mode=mode, progress=False)
    assert list(tmp_path.iterdir()) == []
