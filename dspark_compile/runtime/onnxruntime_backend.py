"""Executes a build's portable ONNX graphs with onnxruntime (the same host loop as the PyTorch reference).

The KV caches are NumPy arrays handed from one call's outputs to the next call's inputs. The CUDA execution
provider is picked when onnxruntime-gpu is installed, but the caches still cross to the host between calls:
IO binding of device-resident caches is not implemented yet (onnxruntime-gpu could not be tested here; its
wheels are too large to carry to the GPU machine). For GPU serving use the TensorRT engines or the
CUDA-graph torch target.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dspark_compile.artifacts import GRAPH_NAMES
from dspark_compile.errors import BackendUnavailableError, UsageError
from dspark_compile.runtime.backend import DraftOutput, ProgramInfo, VerifyOutput
from dspark_compile.runtime.onnxruntime_dtypes import check_onnxruntime_dtype

log = logging.getLogger(__name__)
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": None}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError("onnxruntime is not installed; pip install 'dspark-compile[onnx]'") from e
    return onnxruntime


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


class OrtBackend:
    def __init__(self, sessions: dict[str, Any], manifest: dict[str, Any], provider: str) -> None:
        self.sessions = sessions
        self.manifest = manifest
        prog = manifest["program"]
        self.prog = prog
        self.verify_mode = manifest["graphs"]["verify_mode"]
        self.provider = provider
        self.dtype = NP_DTYPES.get(prog["dtype"])
        if self.dtype is None:
            raise BackendUnavailableError("bf16 graphs cannot be fed from NumPy; run them with TensorRT or the "
                                          "torch backend, or build with --dtype fp16/fp32 for onnxruntime")
        self.info = ProgramInfo.from_json(prog)
        self._kv: Any = None
        self._draft_kv: Any = None

    @classmethod
    def load(cls, build_dir: Path, *, providers: list[str] | None = None, threads: int | None = None) -> OrtBackend:
        ort = _import_ort()
        build_dir = Path(build_dir)
        manifest = read_manifest(build_dir)
        check_onnxruntime_dtype(ProgramInfo.from_json(manifest["program"]).dtype)
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
        return cls(sessions, manifest, providers[0])

    def _new_cache(self, layers: int, heads: int, dim: int, batch: int, slots: int) -> np.ndarray:
        return np.zeros((layers, 2, batch, heads, slots, dim), dtype=self.dtype)

    def start(self, batch: int, slots: int) -> None:
        p = self.prog
        self._kv = self._new_cache(p["target_layers"], p["kv_heads"], p["head_dim"], batch, slots)
        self._draft_kv = self._new_cache(p["draft_layers"], p["draft_kv_heads"], p["draft_head_dim"], batch, slots)

    def prefill(self, input_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        last, taps, self._kv = self.sessions["target_prefill"].run(
            None, {"input_ids": input_ids.astype(np.int64), "input_lengths": lengths.astype(np.int64),
                   "kv_cache": self._kv})
        return last, taps

    def draft(self, anchor: np.ndarray, ctx_taps: np.ndarray, ctx_count: np.ndarray, cache_len: np.ndarray,
              temperature: np.ndarray | None, uniforms: np.ndarray | None) -> DraftOutput:
        feeds = {"anchor": anchor, "ctx_taps": ctx_taps.astype(self.dtype), "ctx_count": ctx_count,
                 "cache_len": cache_len, "draft_kv": self._draft_kv}
        if self.verify_mode == "sampling":
            bsz = anchor.shape[0]
            g = self.info.block_size
            feeds["temperature"] = temperature if temperature is not None else np.zeros(bsz, np.float32)
            feeds["uniforms"] = uniforms if uniforms is not None else np.zeros((bsz, g), np.float32)
            tokens, conf, probs, self._draft_kv = self.sessions["draft_propose"].run(None, feeds)
            return DraftOutput(tokens, conf, probs if temperature is not None else None)
        tokens, conf, self._draft_kv = self.sessions["draft_propose"].run(None, feeds)
        return DraftOutput(tokens, conf, None)

    def verify(self, tokens: np.ndarray, cache_len: np.ndarray, verify_len: np.ndarray,
               draft_probs: np.ndarray | None, temperature: np.ndarray | None,
               uniforms: np.ndarray | None) -> VerifyOutput:
        feeds = {"tokens": tokens, "cache_len": cache_len, "verify_len": verify_len, "kv_cache": self._kv}
        if self.verify_mode == "sampling":
            bsz, t = tokens.shape
            g = t - 1
            feeds["draft_probs"] = (draft_probs if draft_probs is not None
                                    else np.zeros((bsz, g, self.info.vocab_size), np.float32))
            feeds["temperature"] = temperature if temperature is not None else np.zeros(bsz, np.float32)
            feeds["uniforms"] = uniforms if uniforms is not None else np.zeros((bsz, t), np.float32)
        accepted, nxt, taps, self._kv = self.sessions["target_verify"].run(
            ["accepted", "next_token", "taps", "kv_cache_out"], feeds)
        return VerifyOutput(accepted, nxt, taps)

    def select(self, rows: np.ndarray) -> None:
        self._kv = np.ascontiguousarray(self._kv[:, :, rows])
        self._draft_kv = np.ascontiguousarray(self._draft_kv[:, :, rows])
