"""Hand-made safetensors files (the edits of a valid checkpoint are fixtures of tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

WriteRaw = Callable[..., None]


def write_raw_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes = b"",
                          header_len: int | None = None) -> None:
    """Write a hand-made safetensors file (possibly inconsistent on purpose)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + raw + data)


@pytest.fixture
def write_raw() -> WriteRaw:
    return write_raw_safetensors
