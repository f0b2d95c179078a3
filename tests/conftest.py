"""Shared fixtures: tiny checkpoint pairs built on the fly, and the authors' golden vectors."""

from __future__ import annotations

import os
from collections.abc import Callable
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
        pytest.skip(f"golden vectors not found at {GOLDEN} (set DSPARK_GOLDEN_DIR or put shared/ beside "
                    "the repository)")
    return GOLDEN
