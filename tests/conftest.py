"""Shared fixtures: tiny checkpoint pairs built on the fly, and the authors' golden vectors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dspark_compile.examples import make_tiny_pair

GOLDEN = Path(os.environ.get("DSPARK_GOLDEN_DIR") or Path(__file__).resolve().parents[2] / "shared/golden")
"""The golden vectors: ``$DSPARK_GOLDEN_DIR``, else ``../shared/golden`` beside the repository (CI copies
``shared/`` next to the clone)."""

MakePair = Callable[..., tuple[Path, Path]]


@pytest.fixture
def make_pair(tmp_path_factory: pytest.TempPathFactory) -> MakePair:
    """``make_pair(**kwargs) -> (target_dir, draft_dir)``: a fresh :func:`make_tiny_pair` per call."""

    def make(**kwargs: Any) -> tuple[Path, Path]:
        return make_tiny_pair(tmp_path_factory.mktemp("pair"), **kwargs)

    return make


@pytest.fixture
def tiny_pair(make_pair: MakePair) -> tuple[Path, Path]:
    """The default tiny pair (same shapes as the golden checkpoints)."""
    return make_pair()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``shared/golden``; skips the test when it is not there."""
    if not (GOLDEN / "dspark_tiny").is_dir():
        pytest.skip(reason=f"golden vectors not found at {GOLDEN} (set DSPARK_GOLDEN_DIR or put shared/ beside "
                    "the repository)")
    return GOLDEN


def build_golden(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's one ONNX build of ``dspark_tiny`` (same place and recipe as tests/passes/conftest.py)."""
    from dspark_compile import api

    out = tmp_path_factory.getbasetemp() / "golden_build"
    if not out.is_dir():  # the build is renamed into place only when complete
        pair = golden_dir / "dspark_tiny"
        api.build(target=pair / "target", draft=pair / "draft", out=out, dump_after=("export_onnx",), progress=False)
    return out


@pytest.fixture(scope="session")
def golden_build(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden pair compiled once per session (~30 s); tests that write into it copy it first."""
    return build_golden(golden_dir, tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread is faster, and immune to other processes competing for the 2 cores
    (with two threads a decode ran ~10x slower while another process held a core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
