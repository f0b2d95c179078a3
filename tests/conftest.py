"""Shared fixtures: tiny checkpoint pairs built on the fly, and the authors' golden vectors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_compile.examples import make_tiny_pair

GOLDEN = Path(os.environ.get("DSPARK_GOLDEN_DIR") or Path(__file__).resolve().parent / "data" / "golden")
"""The authors' golden vectors: ``$DSPARK_GOLDEN_DIR``, else the copy in ``tests/data/golden`` (README there),
so a plain clone's tests stand alone."""

MakePair = Callable[..., tuple[Path, Path]]


@pytest.fixture
def make_pair(tmp_path_factory: pytest.TempPathFactory) -> MakePair:
    """``make_pair(**kwargs) -> (target_dir, draft_dir)``: a fresh :func:`make_tiny_pair` per call."""

    def make(**kwargs: Any) -> tuple[Path, Path]:
        return make_tiny_pair(tmp_path_factory.mktemp("pair"), **kwargs)

    return make


@pytest.fixture
def make_gemma4_pair(tmp_path_factory: pytest.TempPathFactory) -> MakePair:
    """``make_gemma4_pair(**kwargs) -> (target_dir, draft_dir)``: a fresh random Gemma4 pair per call."""
    from dspark_compile.examples_gemma4 import make_tiny_gemma4_pair

    def make(**kwargs: Any) -> tuple[Path, Path]:
        return make_tiny_gemma4_pair(tmp_path_factory.mktemp("gemma4_pair"), **kwargs)

    return make


@pytest.fixture
def tiny_pair(make_pair: MakePair) -> tuple[Path, Path]:
    """The default tiny pair (same shapes as the golden checkpoints)."""
    return make_pair()


def edit_config_file(directory: Path, **changes: Any) -> Path:
    """Set fields of ``directory/config.json`` (``None`` values are written as JSON null); the file."""
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes, indent=2))
    return path


def edit_weights_file(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Load ``directory/model.safetensors``, let ``edit`` change the dict in place, write it back; the file."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def edit_config() -> Callable[..., Path]:
    """``edit_config(directory, **fields) -> config.json``: see :func:`edit_config_file`."""
    return edit_config_file


@pytest.fixture(scope="session")
def edit_weights() -> Callable[[Path, Callable[[dict[str, torch.Tensor]], None]], Path]:
    """``edit_weights(directory, edit) -> model.safetensors``: see :func:`edit_weights_file`."""
    return edit_weights_file


@pytest.fixture(scope="session")
def golden_pair(golden_dir: Path) -> tuple[Path, Path]:
    """The golden ``dspark_tiny`` pair: ``(target_dir, draft_dir)``."""
    return golden_dir / "dspark_tiny" / "target", golden_dir / "dspark_tiny" / "draft"


@pytest.fixture(scope="session")
def golden_trace(golden_dir: Path) -> dict[str, Any]:
    """``dspark_tiny/decode_greedy.json``: the authors' decode traces of the golden pair, by mode."""
    return json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """:data:`GOLDEN`; a wrong ``$DSPARK_GOLDEN_DIR`` fails the test (the copy in the repository is always
    there, so a skip would only hide a broken setup)."""
    if not (GOLDEN / "dspark_tiny").is_dir():
        pytest.fail(f"golden vectors not found at {GOLDEN}: unset DSPARK_GOLDEN_DIR to use tests/data/golden")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_build(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dspark_tiny`` compiled to ONNX once per session, the graphs as exported kept in
    ``dump/after_export_onnx``; read-only: tests that write into a build copy it first."""
    from dspark_compile import api

    pair = golden_dir / "dspark_tiny"
    out = tmp_path_factory.mktemp("golden_build") / "build"
    api.build(target=pair / "target", draft=pair / "draft", out=out, dump_after=("export_onnx",), progress=False)
    return out


@pytest.fixture(scope="session")
def golden_triton(golden_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """``golden_triton(**options) -> TritonRepository``: :func:`golden_build`'s graphs laid out as a Triton
    repository the way `package_triton` lays out an ONNX build for 128 cache slots, ``options`` overriding
    those :class:`TritonOptions`; one repository per distinct options, shared (read-only) by the session."""
    from dspark_compile.targets.triton.repository import TritonOptions, write_triton_repository

    repos: dict[tuple[tuple[str, Any], ...], Any] = {}

    def make(**options: Any) -> Any:
        key = tuple(sorted(options.items()))
        if key not in repos:
            opts = {"platform": "onnxruntime_onnx", "instance_kind": "KIND_CPU", "max_context": 128} | options
            repos[key] = write_triton_repository(golden_build, tmp_path_factory.mktemp("golden_triton"),
                                                 TritonOptions(**opts))
        return repos[key]

    return make


@pytest.fixture(scope="session")
def golden_rtx_build(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dspark_tiny`` through the whole pipeline with TensorRT-RTX engines (fp32, batch <= 4, 128 cache slots)
    and the Triton repository serving them; skips without TensorRT-RTX."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')")
    from dspark_compile import api

    pair = golden_dir / "dspark_tiny"
    out = tmp_path_factory.mktemp("golden_rtx_build") / "build"
    api.build(target=pair / "target", draft=pair / "draft", out=out, targets="onnx,tensorrt,triton", trt_flavor="rtx",
              max_batch=4, max_context=128, progress=False)
    return out


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread is faster, and immune to other processes competing for the 2 cores
    (with two threads a decode ran ~10x slower while another process held a core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
