"""Lazy name → tensor access over the safetensors files of one checkpoint directory.

safetensors' own ``safe_open`` checks each file (header length, JSON, dtypes, shapes, offsets that tile the
data exactly) before anything is read; its errors are turned into one line that names the file and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


class MappedPages:
    """Gives back the resident pages of tensors that are views of an unwritten memory map of a checkpoint file.

    The modules' weights are views of safetensors' private file maps, so every weight a pass reads stays
    resident: `share_weights` reading the whole checkpoint once left all of it in the build's RSS. Where a map has
    no written (copy-on-write) page (``Anonymous: 0 kB`` in ``/proc/self/smaps``), its pages are exact copies of
    the file, so ``madvise(MADV_DONTNEED)`` drops them and a later read pages the same bytes back in. Anything
    else (a copy, a written map, a system without ``/proc`` or ``madvise``) is left alone.
    """

    MADV_DONTNEED = 4  # Linux

    def __init__(self, suffix: str = ".safetensors") -> None:
        self._maps = [(lo, hi) for lo, hi, path, written in _file_maps() if path.endswith(suffix) and not written]
        self._madvise = None
        if self._maps:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise
        self._page = os.sysconf("SC_PAGE_SIZE") if self._maps else 4096

    def drop(self, data: object) -> bool:
        """Drop the pages under ``data``, a torch tensor (its whole storage) or a contiguous numpy array (the
        optimizer's constants can be numpy views of a weight), rounded outward to whole pages within its map (any
        page of a clean map may go); whether it did."""
        if isinstance(data, torch.Tensor):
            start, size = data.untyped_storage().data_ptr(), data.untyped_storage().nbytes()
        elif isinstance(data, np.ndarray) and (data.flags.c_contiguous or data.flags.f_contiguous):
            start, size = data.ctypes.data, data.nbytes
        else:
            return False
        end = start + size
        for lo, hi in self._maps:
            if lo <= start and end <= hi:
                first = max(lo, start - start % self._page)
                last = min(hi, end + (-end) % self._page)
                assert self._madvise is not None
                return self._madvise(first, last - first, self.MADV_DONTNEED) == 0
        return False


def _file_maps() -> list[tuple[int, int, str, bool]]:
    """(start, end, file, has written pages) of each file map of this process ([] without /proc)."""
    maps: list[tuple[int, int, str, bool]] = []
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    path = head[5].strip() if len(head) == 6 else ""
                    maps.append((lo, hi, path, False))
                elif head[0] == "Anonymous:" and maps and int(head[1]) > 0:
                    maps[-1] = (*maps[-1][:3], True)
    except OSError:
        return []
    return [m for m in maps if m[2].startswith("/")]
