"""Validate a ``.safetensors`` header before any library touches the file.

The ``safetensors`` library is what reads the tensors (:mod:`dspark_compile.checkpoint.store`), but it trusts
the 8-byte header length it finds at the start of the file: a corrupt or truncated download can make it
allocate gigabytes or fail with an opaque Rust error. This module reads that length and the JSON header
itself, checks every entry against the real file size, and turns each defect into one
:class:`~dspark_compile.errors.CheckpointError` line that names the file and what to do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dspark_compile.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest JSON header accepted (the format itself caps it at 100 MB)."""

DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
"""The safetensors dtypes this package can map to torch, with their element size in bytes."""

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}

_RECOVER = "Re-download or re-export the checkpoint (e.g. `save_pretrained(..., safe_serialization=True)`)."


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype string (``"BF16"``), shape and byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    data_start: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Read and check the header of one safetensors file; return its tensors by name.

    Checks: the file holds at least the 8-byte length; the length is at most 100 MB and fits in the file; the
    header is a UTF-8 JSON object; every entry has a known dtype, a non-negative integer shape and
    ``data_offsets`` whose span equals ``numel * itemsize``; the spans tile the data area exactly (no gap,
    overlap or trailing bytes, as the safetensors format requires) and end inside the file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file: expected at least 8 bytes (the header length), "
                    f"found {size}. {_RECOVER}"
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file: header length is {header_len} bytes, expected at "
                    f"most {MAX_HEADER_BYTES} (100 MB); the file is corrupt or of another format. {_RECOVER}"
                )
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated safetensors file: the header claims {header_len} bytes but the file "
                    f"has only {size - 8} after the length field. {_RECOVER}"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({exc.strerror or exc}).") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: expected a UTF-8 JSON object, found invalid data ({exc}). "
            f"{_RECOVER}"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header: expected a JSON object, found {type(header).__name__}. "
            f"{_RECOVER}"
        )
    data_start = 8 + header_len
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: `__metadata__` must map names to strings, found "
                    f"{entry!r}. {_RECOVER}"
                )
            continue
        begin, end, info = _parse_entry(path, name, entry, data_start)
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor `{name}` needs bytes {begin}..{end} of the data "
                f"area but the file holds only {data_len}. {_RECOVER}"
            )
        spans.append((begin, end, name))
        infos[name] = info
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor `{name}` starts at data byte {begin}, expected "
                f"{cursor} (tensors must be stored back to back without gaps or overlaps). {_RECOVER}"
            )
        cursor = end
    if cursor != data_len:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: the tensors cover {cursor} data bytes but the file holds "
            f"{data_len}. {_RECOVER}"
        )
    return infos


def _parse_entry(path: Path, name: str, entry: Any, data_start: int) -> tuple[int, int, TensorInfo]:
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header: entry `{name}` must be an object, found {entry!r}. "
            f"{_RECOVER}"
        )
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor `{name}` has no dtype. {_RECOVER}")
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(
            f"{path}: tensor `{name}` has unsupported dtype {dtype!r}; expected one of "
            f"{', '.join(DTYPE_BYTES)}. Convert the checkpoint to bf16, fp16 or fp32."
        )
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor `{name}` shape must be a list of non-negative "
            f"integers, found {shape!r}. {_RECOVER}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor `{name}` data_offsets must be [begin, end] with "
            f"0 <= begin <= end, found {offsets!r}. {_RECOVER}"
        )
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != nbytes:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor `{name}` ({dtype} {shape}) needs {nbytes} bytes, "
            f"its data_offsets span {end - begin}. {_RECOVER}"
        )
    info = TensorInfo(name=name, file=path, dtype=dtype, shape=tuple(shape), data_start=data_start + begin,
                      nbytes=nbytes)
    return begin, end, info


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
