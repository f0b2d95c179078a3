"""A build's portable ONNX graphs on onnxruntime: the transport of the one :class:`GraphExecutor`.

Inputs and outputs are bound by pointer (IOBinding) to the executor's tensors, so caches are never copied per
call. The CUDA execution provider path (onnxruntime-gpu) is written but unverified; the CPU path is tested.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark_compile.artifacts import GRAPH_NAMES
from dspark_compile.errors import BackendUnavailableError, UsageError
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.executor import GraphExecutor, load_weight_inputs
from dspark_compile.runtime.onnxruntime_dtypes import check_onnxruntime_dtype

log = logging.getLogger(__name__)
# Element types IOBinding takes: numpy's, or ONNX's type number where numpy has none (an e4m3 LM head's weights).
ELEMENT_TYPES: dict[torch.dtype, Any] = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                                         torch.float8_e4m3fn: 17}  # onnx.TensorProto.FLOAT8E4M3FN


def read_manifest(build_dir: Path) -> dict[str, Any]:
    if not build_dir.is_dir():
        raise UsageError(f"{build_dir}: no such build directory; pass the --out directory of `dspark-compile build`")
    path = build_dir / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{build_dir}: no manifest.json; pass the output directory of `dspark-compile build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg}); rebuild the directory") from None
    if not manifest.get("program"):
        raise UsageError(f"{path}: the build has no ONNX graphs (was it stopped early?); rebuild with --targets onnx")
    ran = [p.get("name") for p in manifest.get("passes", [])]
    if "check_onnx" not in ran:  # e.g. --stop-after export_onnx: graphs exist but are not the final ones
        last = next((n for n in reversed(ran) if n != "manifest"), None)
        raise UsageError(f"{path}: the build stopped after pass `{last}`, before its graphs were final; rebuild "
                         "without --stop-after")
    return manifest


class OrtTransport:
    """onnxruntime sessions, one per graph, run through IOBinding on the executor's tensors."""

    def __init__(self, sessions: dict[str, Any], provider: str) -> None:
        self.sessions = sessions
        self.provider = provider
        self.device = torch.device("cuda" if provider == "CUDAExecutionProvider" else "cpu")
        self._inputs = {g: tuple(i.name for i in s.get_inputs()) for g, s in sessions.items()}
        self._outputs = {g: tuple(o.name for o in s.get_outputs()) for g, s in sessions.items()}

    def has_graph(self, graph: str) -> bool:
        return graph in self.sessions

    def inputs(self, graph: str) -> tuple[str, ...]:
        return self._inputs[graph]

    def outputs(self, graph: str) -> tuple[str, ...]:
        return self._outputs[graph]

    def _bind(self, bind: Any, name: str, tensor: torch.Tensor) -> None:
        kind = "cuda" if tensor.is_cuda else "cpu"
        index = tensor.device.index or 0
        if tensor.numel() == 0:  # an empty tensor may have no storage: give onnxruntime a 1-element one
            tensor = torch.empty(1, dtype=tensor.dtype, device=tensor.device)[:0].reshape(tensor.shape)
        bind(name, kind, index, ELEMENT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        session = self.sessions[graph]
        binding = session.io_binding()
        for name in self._inputs[graph]:
            tensor = feeds[name]
            if not tensor.is_contiguous():
                raise RuntimeError(f"{graph}: input `{name}` is not contiguous; the executor must own it whole")
            self._bind(binding.bind_input, name, tensor)
        for name, tensor in outputs.items():
            self._bind(binding.bind_output, name, tensor)
        session.run_with_iobinding(binding)


def load_onnxruntime(build_dir: Path, *, providers: list[str] | None = None,
                     threads: int | None = None) -> GraphExecutor:
    """The executor over a build's ONNX graphs (CUDA execution provider when onnxruntime-gpu has it)."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    info = ProgramInfo.from_json({**manifest["program"], "sampling": manifest["graphs"]["verify_mode"] == "sampling"})
    return ort_executor(build_dir, info, manifest, providers=providers, threads=threads)


def ort_executor(build_dir: Path, info: ProgramInfo, manifest: Mapping[str, Any], *,
                 providers: list[str] | None = None, threads: int | None = None,
                 what: str = "onnxruntime") -> GraphExecutor:
    """onnxruntime sessions on ``build_dir/onnx``'s graphs, with the weight inputs ``manifest`` records."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailableError("onnxruntime is not installed; pip install 'dspark-compile[onnx]'") from e
    check_onnxruntime_dtype(info.dtype, what)
    available = ort.get_available_providers()
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sessions = {}
    for name in GRAPH_NAMES:
        path = build_dir / "onnx" / f"{name}.onnx"
        if not path.is_file():
            raise UsageError(f"{path}: missing; rebuild with `dspark-compile build --targets onnx`")
        sessions[name] = ort.InferenceSession(str(path), opts, providers=providers)
    transport = OrtTransport(sessions, providers[0])
    return GraphExecutor(info, transport, load_weight_inputs(build_dir, manifest, transport.device))
