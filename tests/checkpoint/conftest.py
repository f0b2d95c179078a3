"""Helpers that damage a tiny checkpoint in one precise way."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

EditConfig = Callable[..., dict[str, Any]]
EditWeights = Callable[[Path, Callable[[dict[str, torch.Tensor]], None]], None]
WriteRaw = Callable[..., None]


def edit_config_file(directory: Path, **changes: Any) -> dict[str, Any]:
    """Set fields of ``directory/config.json`` (``None`` values are written as JSON null)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
    return config


def edit_weights_file(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load ``directory/model.safetensors``, let ``edit`` change the dict in place, write it back."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_raw_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes = b"",
                          header_len: int | None = None) -> None:
    """Write a hand-made safetensors file (possibly inconsistent on purpose)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + raw + data)


@pytest.fixture
def edit_config() -> EditConfig:
    return edit_config_file


@pytest.fixture
def edit_weights() -> EditWeights:
    return edit_weights_file


@pytest.fixture
def write_raw() -> WriteRaw:
    return write_raw_safetensors
