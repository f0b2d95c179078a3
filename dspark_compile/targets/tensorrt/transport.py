"""TensorRT engines as a transport of the graph executor (runtime/executor.py). UNVERIFIED on a GPU.

This path has not run against real engines yet (no GPU run was made for it); only its binding logic is
tested, against fake execution contexts. Every input and output is bound with ``set_tensor_address`` to a
torch CUDA tensor the executor owns; an address is set again only when the tensor behind a name changes,
so the cache buffers are bound once per batch composition (the executor rebuilds them only on
admit/select), the shared embedding / LM head buffers (the executor's weight inputs) once for both engines,
and no output is a cache (docs/PROGRAM.md). The optimization profile is the first whose ranges hold every
input's shape: target_step's verification profile of the KV bucket, or its prefill profile.

A graph too large for one engine (issue 14: the builder holds ~2.2x the weights) is a *chain* of segment
engines split by decoder-layer range (``engines/target_step.seg{k}.plan``). ``run`` enqueues the segments in
order on the one stream, so a segment reads what earlier ones wrote without a synchronisation. Intermediates
(hidden states, earlier layers' K/V rows) live in device buffers this transport owns, sized from the shape
TensorRT infers after ``set_input_shape`` and cached per shape, so steady-state decoding allocates nothing. A
buffer replaced on a shape change goes back to torch's caching allocator, which is safe while the engines run
on torch's current stream (the default); with a foreign ``stream``, synchronise it before the batch changes.
Each segment chooses its own profile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dspark_compile.errors import BackendUnavailableError, UsageError
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.executor import GraphExecutor, load_weight_inputs

# TensorRT DataType member name -> torch dtype, for the intermediates this transport allocates.
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


@dataclass
class _Segment:
    """One engine of a graph's chain, its execution context and what is bound to it."""

    engine: Any
    context: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    profile: int | None = None
    bound: dict[str, int] = field(default_factory=dict)  # name -> address set on the context


class TensorRTTransport:
    """One execution context per engine, on one CUDA stream; a graph is one engine or a chain of segment
    engines run in order. See the module docstring (unverified on a GPU)."""

    def __init__(self, engines: Mapping[str, Any | Sequence[Any]], trt: Any, *, device: torch.device | None = None,
                 stream: Any = None, graph_outputs: Mapping[str, Sequence[str]] | None = None) -> None:
        """``engines``: graph -> engine, or graph -> its segment engines in chain order. ``graph_outputs``:
        names to report as a graph's outputs even when a later segment also reads them (default: the segment
        outputs no later segment reads, which is the whole graph's outputs under the segmentation contract)."""
        self.trt = trt
        self.device = device or torch.device("cuda")
        self.stream = stream
        self._dtypes = {getattr(trt.DataType, k): v for k, v in TORCH_DTYPES.items()
                        if hasattr(getattr(trt, "DataType", None), k)}
        self.chains: dict[str, list[_Segment]] = {}
        for graph, value in engines.items():
            chain = list(value) if isinstance(value, (list, tuple)) else [value]
            if not chain:
                raise UsageError(f"{graph}: no engines given")
            self.chains[graph] = [self._segment(engine) for engine in chain]
        self.scratch = self._share_scratch()
        self._io: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for graph, chain in self.chains.items():
            produced: dict[str, None] = {}
            inputs: dict[str, None] = {}
            for seg in chain:
                inputs.update(dict.fromkeys(n for n in seg.inputs if n not in produced))
                produced.update(dict.fromkeys(seg.outputs))
            consumed = {n for seg in chain for n in seg.inputs}
            wanted = set((graph_outputs or {}).get(graph, ()))
            self._io[graph] = (tuple(inputs), tuple(n for n in produced if n not in consumed or n in wanted))
        self._intermediates: dict[tuple[str, int, str], torch.Tensor] = {}

    def _segment(self, engine: Any) -> _Segment:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = [engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT for n in names]
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        context = (engine.create_execution_context(strategy.USER_MANAGED) if strategy is not None
                   else engine.create_execution_context())
        return _Segment(engine, context,
                        tuple(n for n, i in zip(names, is_input, strict=True) if i),
                        tuple(n for n, i in zip(names, is_input, strict=True) if not i))

    def _share_scratch(self) -> torch.Tensor | None:
        """One activation scratch for every context: the engines run one after another on one stream, so
        their scratch is never live at once, and a server needs the largest engine's, not the sum over a
        segmented target's chain and the draft. None where TensorRT allocates per context (no strategy API)."""
        if getattr(self.trt, "ExecutionContextAllocationStrategy", None) is None:
            return None
        segments = [seg for chain in self.chains.values() for seg in chain]
        size = max(int(seg.engine.device_memory_size_v2) for seg in segments)
        scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        for seg in segments:
            seg.context.set_device_memory(scratch.data_ptr(), scratch.numel())
        return scratch

    def has_graph(self, graph: str) -> bool:
        return graph in self.chains

    def inputs(self, graph: str) -> tuple[str, ...]:
        return self._io[graph][0]

    def outputs(self, graph: str) -> tuple[str, ...]:
        return self._io[graph][1]

    def _choose_profile(self, where: str, seg: _Segment, tensors: Mapping[str, torch.Tensor], stream: int) -> None:
        engine = seg.engine
        dynamic = [n for n in seg.inputs if -1 in tuple(engine.get_tensor_shape(n))]
        for index in range(engine.num_optimization_profiles):
            if all(all(lo <= d <= hi for lo, d, hi in zip(low, tensors[n].shape, high, strict=True))
                   for n in dynamic for low, _, high in [engine.get_tensor_profile_shape(n, index)]):
                if seg.profile != index:
                    seg.context.set_optimization_profile_async(index, stream)
                    seg.profile = index
                    seg.bound.clear()
                return
        shapes = ", ".join(f"{n} {list(tensors[n].shape)}" for n in dynamic)
        raise UsageError(f"{where}: no optimization profile holds the shapes {shapes}; rebuild the engines with "
                         "a --max-batch, --max-context (and --kv-buckets) that covers them")

    @staticmethod
    def _address(seg: _Segment, name: str, tensor: torch.Tensor) -> None:
        if seg.bound.get(name) != tensor.data_ptr():  # caches: once per batch composition
            seg.context.set_tensor_address(name, tensor.data_ptr())
            seg.bound[name] = tensor.data_ptr()

    def _intermediate(self, graph: str, k: int, seg: _Segment, name: str) -> torch.Tensor:
        """The device buffer of a segment output the caller did not ask for, reused while its shape stays."""
        shape = tuple(int(d) for d in seg.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise UsageError(f"{graph} segment {k}: TensorRT cannot infer the shape of `{name}` ({list(shape)}) "
                             "from the input shapes; data-dependent intermediate shapes are not supported")
        dtype = self._dtypes.get(seg.engine.get_tensor_dtype(name))
        if dtype is None:
            raise UsageError(f"{graph} segment {k}: `{name}` has TensorRT type {seg.engine.get_tensor_dtype(name)}, "
                             f"which this transport cannot allocate; expected one of {', '.join(TORCH_DTYPES)}")
        buf = self._intermediates.get((graph, k, name))
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self._intermediates[(graph, k, name)] = buf
        return buf

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Enqueue ``graph``'s engines in chain order: a segment reads the caller's ``feeds`` or what an earlier
        segment wrote; any output named in ``outputs`` is written there, the rest into cached intermediates."""
        stream = self.stream if self.stream is not None else torch.cuda.current_stream(self.device).cuda_stream
        chain = self.chains[graph]
        written: dict[str, torch.Tensor] = {}
        for k, seg in enumerate(chain):
            where = graph if len(chain) == 1 else f"{graph} segment {k}"
            tensors = {name: written[name] if name in written else feeds[name] for name in seg.inputs}
            self._choose_profile(where, seg, tensors, stream)
            for name in seg.inputs:
                seg.context.set_input_shape(name, tuple(tensors[name].shape))
                self._address(seg, name, tensors[name])
            for name in seg.outputs:  # after the input shapes: TensorRT infers the intermediates' shapes
                tensor = outputs[name] if name in outputs else self._intermediate(graph, k, seg, name)
                self._address(seg, name, tensor)
                written[name] = tensor
            if not seg.context.execute_async_v3(stream):
                raise RuntimeError(f"TensorRT could not enqueue engine {where}")


def plan_chains(manifest: Mapping[str, Any]) -> dict[str, list[str]]:
    """graph -> its plan files in chain order, from ``manifest.json`` ``engines.plans`` (a segmented graph's
    records carry ``segment``/``segments``; a graph without segments has one plan)."""
    records = (manifest.get("engines") or {}).get("plans") or []
    chains: dict[str, dict[int, str]] = {}
    counts: dict[str, int] = {}
    for rec in records:
        graph = rec["graph"]
        if "segment" in rec:
            counts[graph] = int(rec["segments"])
            chains.setdefault(graph, {})[int(rec["segment"])] = rec["plan"]
        else:
            chains[graph] = {0: rec["plan"]}
            counts[graph] = 1
    out = {}
    for graph, plans in chains.items():
        if sorted(plans) != list(range(counts[graph])):
            raise UsageError(f"manifest.json: graph {graph} has segment plans {sorted(plans)} of "
                             f"{counts[graph]}; rebuild the engines")
        out[graph] = [plans[k] for k in range(counts[graph])]
    return out


def load_tensorrt(build_dir: Path) -> GraphExecutor:
    """The executor over the plans ``BUILD/manifest.json`` lists (unverified; see the module docstring)."""
    from dspark_compile.artifacts import GraphIO
    from dspark_compile.runtime.onnxruntime_backend import read_manifest
    from dspark_compile.targets.tensorrt.adapter import load_trt

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the TensorRT transport needs a CUDA GPU visible to torch")
    engines_json = manifest.get("engines") or {}
    chains = plan_chains(manifest)
    if "target_step" not in chains:
        raise UsageError(f"{build_dir / 'manifest.json'}: no target_step engine recorded; rebuild with "
                         "`dspark-compile build --targets tensorrt`")
    flavor = load_trt(engines_json.get("flavor", "auto"))
    trt = flavor.module
    if any(p.get("plugin") for p in engines_json.get("plans", [])):
        from dspark_compile.plugins.spec_verify.trt_plugin import register_spec_verify_plugin

        register_spec_verify_plugin(manifest["graphs"]["verify_mode"])
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines: dict[str, list[Any]] = {}
    graph_outputs: dict[str, tuple[str, ...]] = {}
    for graph, plans in chains.items():
        engines[graph] = []
        for name in plans:
            plan = build_dir / "engines" / name
            if not plan.is_file():
                raise UsageError(f"{plan}: missing; rebuild with `dspark-compile build --targets tensorrt`")
            engines[graph].append(runtime.deserialize_cuda_engine(plan.read_bytes()))
        whole = build_dir / "onnx" / f"{graph}.onnx"
        if len(plans) > 1 and whole.is_file():  # the whole graph's outputs (its proto only; weights not read)
            graph_outputs[graph] = tuple(t.name for t in GraphIO.read(whole).outputs)
    prog = manifest["program"]
    info = ProgramInfo.from_json({**prog, "sampling": manifest["graphs"]["verify_mode"] == "sampling",
                                  "max_slots": json.loads((build_dir / "build_spec.json").read_text())
                                  .get("max_context")})
    transport = TensorRTTransport(engines, trt, graph_outputs=graph_outputs)
    return GraphExecutor(info, transport, load_weight_inputs(build_dir, manifest, transport.device))
