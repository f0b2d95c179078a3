"""Pass `share_weights`: store every distinct weight tensor once, in `weights.bin`, for all graphs.

Prefill and verify contain the same target weights and the draft graph contains the target's embedding and
LM head (the graft); on disk each is written once and every graph's external-data entries point into the one
file. Tensors are copied one at a time (memory-mapped), so peak memory stays at the largest tensor.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

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
    maps: dict[Path, mmap.mmap] = {}
    with target.open("wb") as out:
        for path in graphs.all_paths():
            model = onnx.load(str(path), load_external_data=False)
            for init in model.graph.initializer:
                if init.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = _external(init)
                src = directory / info["location"]
                if src not in maps:
                    with src.open("rb") as f:
                        maps[src] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    old_files.add(src)
                offset = int(info.get("offset", 0))
                length = int(info.get("length", len(maps[src]) - offset))
                data = maps[src][offset : offset + length]
                key = hashlib.sha256(data).hexdigest()
                if key not in seen:
                    pos = out.tell()
                    pad = (-pos) % ALIGN
                    out.write(b"\0" * pad)
                    seen[key] = (pos + pad, length)
                    out.write(data)
                new_offset, new_length = seen[key]
                del init.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(new_offset)), ("length", str(new_length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save(model, str(path))
    for m in maps.values():
        m.close()
    for f in old_files:
        if f != target:
            f.unlink()
    return graphs
