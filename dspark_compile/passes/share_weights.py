"""Pass `share_weights`: store every distinct weight tensor once, in `weights.bin`, for all graphs.

Prefill and verify contain the same target weights and the draft graph contains the target's embedding and
LM head (the graft); on disk each is written once and every graph's external-data entries point into the one
file. Tensors are copied one at a time with plain reads (no mapping that would count the whole file as
resident), so peak memory stays at the largest tensor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx

from dspark_compile.ir import OnnxGraphs

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096  # page-aligned offsets let runtimes memory-map tensors


def _external(init: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


def share_weights(graphs: OnnxGraphs) -> OnnxGraphs:
    directory = graphs.directory
    target = directory / WEIGHTS_FILE
    seen: dict[str, tuple[int, int]] = {}
    old_files: set[Path] = set()
    handles: dict[Path, Any] = {}
    with target.open("wb") as out:
        for path in graphs.all_paths():
            model = onnx.load(str(path), load_external_data=False)
            for init in model.graph.initializer:
                if init.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = _external(init)
                src = directory / info["location"]
                if src not in handles:
                    handles[src] = src.open("rb")
                    old_files.add(src)
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else src.stat().st_size - offset
                key = _digest(handles[src], offset, length)
                if key not in seen:
                    pos = out.tell()
                    pad = (-pos) % ALIGN
                    out.write(b"\0" * pad)
                    seen[key] = (pos + pad, length)
                    _copy(handles[src], offset, length, out)
                new_offset, new_length = seen[key]
                del init.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(new_offset)), ("length", str(new_length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save(model, str(path))
    for h in handles.values():
        h.close()
    for f in old_files:
        if f != target:
            f.unlink()
    return graphs


CHUNK = 1 << 24  # tensors are hashed and copied in 16 MiB pieces: memory stays flat whatever their size


def _digest(f: Any, offset: int, length: int) -> str:
    h = hashlib.sha256()
    f.seek(offset)
    left = length
    while left:
        block = f.read(min(CHUNK, left))
        if not block:
            raise OSError(f"{f.name}: external data ends before offset {offset} + {length}")
        h.update(block)
        left -= len(block)
    return f"{h.hexdigest()}:{length}"


def _copy(f: Any, offset: int, length: int, out: Any) -> None:
    f.seek(offset)
    left = length
    while left:
        block = f.read(min(CHUNK, left))
        out.write(block)
        left -= len(block)
