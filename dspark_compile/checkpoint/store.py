"""Lazy name → tensor access over the safetensors files of one checkpoint directory.

safetensors' own ``safe_open`` checks each file (header length, JSON, dtypes, shapes, offsets that tile the
data exactly) before anything is read; its errors are turned into one line that names the file and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dspark_compile.errors import CheckpointError

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}
"""The safetensors dtypes this package reads, as torch dtypes."""

_RECOVER = "Re-download or re-export the checkpoint (e.g. `save_pretrained(..., safe_serialization=True)`)."


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: its file, safetensors dtype string (``"BF16"``), shape and size."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file by name, after safetensors has checked the whole header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            infos = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in entries.items()}
    except SafetensorError as exc:
        reason = str(exc).removeprefix("Error while deserializing header: ")
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({reason}). {_RECOVER}") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({exc.strerror or exc}).") from exc
    out = {}
    for name, (dtype, shape) in infos.items():
        if dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{path}: tensor `{name}` has unsupported dtype {dtype!r}; expected one of "
                                  f"{', '.join(TORCH_DTYPES)}. Convert the checkpoint to bf16, fp16 or fp32.")
        out[name] = TensorInfo(name, path, dtype, shape, math.prod(shape) * TORCH_DTYPES[dtype].itemsize)
    return out


class WeightStore:
    """The tensors of one or more ``.safetensors`` files, read one at a time (or in bounded row chunks) through
    memory maps, so scanning a multi-gigabyte checkpoint never holds more than one chunk."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self._tensors = dict(sorted(tensors.items()))
        self._handles: dict[Path, Any] = {}

    @classmethod
    def from_files(cls, path: Path, files: Sequence[Path]) -> WeightStore:
        """Validate each file's header and index its tensors; a name found in two files is an error."""
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in tensors:
                    raise CheckpointError(f"{file}: tensor `{name}` is also stored in {tensors[name].file.name}; "
                                          f"expected each tensor in exactly one file. Remove the stray file or "
                                          f"re-export the checkpoint.")
                tensors[name] = info
        return cls(path, tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. ``"BF16"``."""
        return self._tensors[name].dtype

    def file_of(self, name: str) -> Path:
        return self._tensors[name].file

    def files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(info.file for info in self._tensors.values()))

    def nbytes(self) -> int:
        return sum(info.nbytes for info in self._tensors.values())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (CPU), optionally cast to ``dtype``."""
        tensor = self._read(name, None)
        return tensor if dtype is None else tensor.to(dtype)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` of a tensor's first dimension only."""
        return self._read(name, (start, stop))

    def iter_row_chunks(self, name: str, max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Yield a tensor as consecutive blocks of its first dimension, each at most ~``max_bytes``."""
        info = self._tensors[name]
        if len(info.shape) < 2:
            yield self._read(name, None)
            return
        rows = info.shape[0]
        row_bytes = max(1, math.prod(info.shape[1:]) * TORCH_DTYPES[info.dtype].itemsize)
        step = max(1, max_bytes // row_bytes)
        for start in range(0, rows, step):
            yield self._read(name, (start, min(rows, start + step)))

    def _read(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        info = self._tensors[name]
        try:
            handle = self._handle(info.file)
            if rows is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[rows[0]:rows[1]]
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor `{name}` ({exc}); the file changed or is damaged. "
                                  "Re-download or re-export the checkpoint.") from exc

    def release(self) -> None:
        """Close the open files. Their memory maps count as resident memory once read through, so a scan over
        every tensor (the NaN check) releases them instead of keeping the whole checkpoint mapped."""
        self._handles.clear()

    def _handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(str(file), framework="pt")
            self._handles[file] = handle
        return handle

    def __repr__(self) -> str:
        return f"WeightStore({str(self.path)!r}, {len(self)} tensors, {self.nbytes()} bytes)"
