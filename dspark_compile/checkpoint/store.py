"""Lazy name → tensor access over the safetensors files of one checkpoint directory."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dspark_compile.checkpoint.header import DTYPE_BYTES, TORCH_DTYPES, TensorInfo, read_header
from dspark_compile.errors import CheckpointError

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


class WeightStore:
    """The tensors of one or more ``.safetensors`` files, read one at a time through memory maps.

    Building a store reads only the (validated) headers; :meth:`get` reads one tensor and
    :meth:`iter_row_chunks` reads one in bounded row blocks, so scanning a multi-gigabyte checkpoint never
    holds more than one chunk in memory.
    """

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
                    raise CheckpointError(
                        f"{file}: tensor `{name}` is also stored in {tensors[name].file.name}; expected each "
                        "tensor in exactly one file. Remove the stray file or re-export the checkpoint."
                    )
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

    def torch_dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self._tensors[name].dtype]

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
        row_bytes = max(1, math.prod(info.shape[1:]) * DTYPE_BYTES[info.dtype])
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
            raise CheckpointError(
                f"{info.file}: cannot read tensor `{name}` ({exc}); the file changed or is damaged. "
                "Re-download or re-export the checkpoint."
            ) from exc

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
