"""TensorRT engines as a transport of the graph executor (runtime/executor.py). UNVERIFIED on a GPU.

This path has not run against real engines yet (no GPU run was made for it); only its binding logic is
tested, against fake execution contexts. Every input and output is bound with ``set_tensor_address`` to a
torch CUDA tensor the executor owns; an address is set again only when the tensor behind a name changes,
so the cache buffers are bound once per batch composition (the executor rebuilds them only on
admit/select), the shared embedding / LM head buffers (the executor's weight inputs) once for both engines,
and no output is a cache (docs/PROGRAM.md). The optimization profile is the first whose ranges hold every
input's shape: target_step's verification profile of the KV bucket, or its prefill profile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dspark_compile.artifacts import GRAPH_NAMES
from dspark_compile.errors import BackendUnavailableError, UsageError
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.executor import GraphExecutor, load_weight_inputs


class TensorRTTransport:
    """One execution context per engine, on one CUDA stream; see the module docstring (unverified)."""

    def __init__(self, engines: Mapping[str, Any], trt: Any, *, device: torch.device | None = None,
                 stream: Any = None) -> None:
        self.trt = trt
        self.engines = dict(engines)
        self.contexts = {g: e.create_execution_context() for g, e in self.engines.items()}
        self.device = device or torch.device("cuda")
        self.stream = stream
        self._io: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for graph, engine in self.engines.items():
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            is_input = [engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
            self._io[graph] = (tuple(n for n, i in zip(names, is_input, strict=True) if i),
                               tuple(n for n, i in zip(names, is_input, strict=True) if not i))
        self._bound: dict[tuple[str, str], int] = {}
        self._profile: dict[str, int] = {}

    def has_graph(self, graph: str) -> bool:
        return graph in self.engines

    def inputs(self, graph: str) -> tuple[str, ...]:
        return self._io[graph][0]

    def outputs(self, graph: str) -> tuple[str, ...]:
        return self._io[graph][1]

    def _choose_profile(self, graph: str, feeds: Mapping[str, torch.Tensor], stream: int) -> None:
        engine, context = self.engines[graph], self.contexts[graph]
        dynamic = [n for n in self.inputs(graph) if -1 in tuple(engine.get_tensor_shape(n))]
        for index in range(engine.num_optimization_profiles):
            if all(all(lo <= d <= hi for lo, d, hi in zip(low, feeds[n].shape, high, strict=True))
                   for n in dynamic for low, _, high in [engine.get_tensor_profile_shape(n, index)]):
                if self._profile.get(graph) != index:
                    context.set_optimization_profile_async(index, stream)
                    self._profile[graph] = index
                    self._bound = {k: v for k, v in self._bound.items() if k[0] != graph}
                return
        shapes = ", ".join(f"{n} {list(feeds[n].shape)}" for n in dynamic)
        raise UsageError(f"{graph}: no optimization profile holds the shapes {shapes}; rebuild the engines with "
                         "a --max-batch, --max-context (and --kv-buckets) that covers them")

    def _address(self, graph: str, name: str, tensor: torch.Tensor) -> None:
        if self._bound.get((graph, name)) != tensor.data_ptr():  # caches: once per batch composition
            self.contexts[graph].set_tensor_address(name, tensor.data_ptr())
            self._bound[(graph, name)] = tensor.data_ptr()

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        context = self.contexts[graph]
        stream = self.stream if self.stream is not None else torch.cuda.current_stream(self.device).cuda_stream
        self._choose_profile(graph, feeds, stream)
        for name in self.inputs(graph):
            context.set_input_shape(name, tuple(feeds[name].shape))
            self._address(graph, name, feeds[name])
        for name, tensor in outputs.items():
            self._address(graph, name, tensor)
        if not context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT could not enqueue engine {graph}")


def load_tensorrt(build_dir: Path) -> GraphExecutor:
    """The executor over ``BUILD/engines/*.plan`` (unverified; see the module docstring)."""
    from dspark_compile.runtime.onnxruntime_backend import read_manifest
    from dspark_compile.targets.tensorrt.adapter import load_trt

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the TensorRT transport needs a CUDA GPU visible to torch")
    engines_json = manifest.get("engines") or {}
    flavor = load_trt(engines_json.get("flavor", "auto"))
    trt = flavor.module
    if any(p.get("plugin") for p in engines_json.get("plans", [])):
        from dspark_compile.plugins.spec_verify.trt_plugin import register_spec_verify_plugin

        register_spec_verify_plugin(manifest["graphs"]["verify_mode"])
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines = {}
    for graph in GRAPH_NAMES:
        plan = build_dir / "engines" / f"{graph}.plan"
        if not plan.is_file():
            raise UsageError(f"{plan}: missing; rebuild with `dspark-compile build --targets tensorrt`")
        engines[graph] = runtime.deserialize_cuda_engine(plan.read_bytes())
    prog = manifest["program"]
    info = ProgramInfo.from_json({**prog, "sampling": manifest["graphs"]["verify_mode"] == "sampling",
                                  "max_slots": json.loads((build_dir / "build_spec.json").read_text())
                                  .get("max_context")})
    transport = TensorRTTransport(engines, trt)
    return GraphExecutor(info, transport, load_weight_inputs(build_dir, manifest, transport.device))
