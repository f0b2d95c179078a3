"""Pass `share_weights`: write every graph once, and every distinct weight tensor once, in `weights.bin`.

The plugin and portable variants of target_step hold the same weights; on disk each tensor is written once and
every graph's external-data entries point into the one file. The graphs' weight *inputs* (the embedding and LM head
both graphs read, and an e4m3 head's scales: partition.WEIGHT_INPUTS) go into the same file, and
``state.weight_inputs`` (then the manifest) records where, so a runtime loads each of them once and binds it to
both graphs. Tensors are hashed and written one at a time, and each module tensor's checkpoint pages are given back
once written (checkpoint.store.MappedPages): without that, reading every weight here left the whole checkpoint
resident, the build's peak RSS (the graphs plus the loaded bytes); with it, memory stays at the graphs plus the
largest tensor.
"""

from __future__ import annotations

import hashlib

import onnx_ir as ir
import torch

from dspark_compile.artifacts import GraphIO
from dspark_compile.build_state import BuildState
from dspark_compile.checkpoint.store import MappedPages
from dspark_compile.passes.partition import WEIGHT_INPUTS

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096  # page-aligned offsets let runtimes memory-map tensors
# Tensors under 1 KiB (norm scales, small constants) stay in the graph file: there they cost less than a
# 4 KiB-aligned slot, and check_onnx's in-memory checker finds them without the weights file.
INLINE_BYTES = 1024


def run(state: BuildState) -> None:
    assert state.onnx is not None
    directory = state.onnx.directory
    directory.mkdir(parents=True, exist_ok=True)
    seen: dict[str, tuple[int, int]] = {}
    hashed: dict[tuple[object, ...], str] = {}
    pages = MappedPages()
    with (directory / WEIGHTS_FILE).open("wb") as out:

        def store(data: bytes | memoryview) -> tuple[int, int]:
            """Where the bytes ``data`` lie in the file: written at the next aligned offset unless seen."""
            key = f"{hashlib.sha256(data).hexdigest()}:{len(data)}"
            if key not in seen:
                pos = out.tell()
                out.write(b"\0" * ((-pos) % ALIGN))
                seen[key] = (out.tell(), len(data))
                out.write(data)
            return seen[key]

        if state.parts is not None:  # the tensors behind the weight inputs (a tied LM head: one region)
            inputs = {name: tensor for gs in state.parts.graphs for name, tensor in gs.inputs.items()}
            state.weight_inputs = {}
            for name in (n for n in WEIGHT_INPUTS if n in inputs):  # lm_head_scale with an e4m3 head only
                tensor = inputs[name].detach().contiguous()
                offset, length = store(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # no copy
                pages.drop(tensor)
                state.weight_inputs[name] = {"file": f"onnx/{WEIGHTS_FILE}", "offset": offset, "bytes": length,
                                             "dtype": str(tensor.dtype).removeprefix("torch."),
                                             "shape": list(tensor.shape)}
        users: dict[str, set[str]] = {}  # stored tensor -> the graphs holding it as a constant
        for graph, _, model in state.onnx.items():
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                if tensor.nbytes < INLINE_BYTES:
                    if isinstance(tensor, ir.ExternalTensor):  # a graph loaded from a file, not exported
                        value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
                    continue
                # The graphs hold the same module tensors: each one is hashed once, not once per graph.
                raw = getattr(tensor, "raw", None)
                source = (raw.data_ptr(), raw.nbytes, str(raw.dtype), tuple(raw.shape), raw.stride()) if isinstance(
                    raw, torch.Tensor) else None
                key = hashed.get(source) if source is not None else None
                if key is None:
                    data = tensor.tobytes()
                    key = f"{hashlib.sha256(data).hexdigest()}:{len(data)}"
                    if source is not None:
                        hashed[source] = key
                    store(data)
                    del data
                    pages.drop(raw)
                users.setdefault(key, set()).add(graph)
                offset, length = seen[key]
                value.const_value = ir.ExternalTensor(WEIGHTS_FILE, offset, length, dtype=tensor.dtype,
                                                      shape=tensor.shape, name=value.name, base_dir=directory)
    # One file region, but a copy in each graph's session or engine (an e4m3 LM head kept as a constant of both
    # graphs for Triton): the server's memory counts the copies (manifest.server_memory).
    state.repeated_constant_bytes = sum(seen[key][1] * (len(graphs) - 1) for key, graphs in users.items())
    for name, variant, model in state.onnx.items():
        path = state.onnx.path(name, variant)
        ir.save(model, path)
        state.written[path] = GraphIO.of(model)
