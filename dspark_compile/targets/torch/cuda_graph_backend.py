"""`CudaGraphBackend`: the three graphs of docs/PROGRAM.md as CUDA graphs over static, in-place KV caches.

Same contract and numerics as the eager :class:`~dspark_compile.runtime.torch_backend.TorchBackend` (the host
loop in ``runtime/decode.py`` drives either), built for speed on a GPU:

* **Static caches.** ``start(batch, slots)`` allocates the target and draft caches once per shape: rows for the
  batch bucket (1, 2, 4, …, 64, then multiples of 64), ``slots`` rounded up to a multiple of 256. A later
  ``start`` of the same bucket and capacity reuses them, and the graphs captured over them.
* **One graph per shape bucket**, captured on first use and replayed after: ``target_verify`` per (rows,
  verify tokens T, attention window, greedy/sampling) — T = 1 is target-only decoding, T = G+1 a speculative
  round — and ``draft_propose`` per (rows, window, greedy/sampling) with the context padded to G+1 rows.
  Each graph runs embed → layers → logits → SpecVerify (``spec_verify_triton``) or the draft backbone →
  Markov loop → confidence. Keys/values are written into the caches in place.
* **Attention window.** Attention reads slots ``[0, W)`` with W = the largest slot any query may see, rounded up
  to ``kv_bucket`` (256), not the whole capacity; on CUDA through the split-K Triton kernel (``attention=
  "triton"``: on an H100 it beat SDPA's memory-efficient kernel by 0.85 ms per 8B decode step at batch 1).
* **Padding rows.** Rows between the live batch and its bucket get position 0, nothing to verify and no
  context; they only touch their own cache rows.
* **One host sync per call.** Inputs go through pinned host buffers, outputs come back into pinned memory and
  the call waits once. Prefill, and a draft call whose context is wider than G+1 (the first round after a
  prompt), run the same code eagerly.

On a machine without CUDA, :meth:`CudaGraphBackend.create` returns the eager TorchBackend (fp32, CPU) and
logs a notice when the device was ``"auto"``, and raises :class:`BackendUnavailableError` when ``"cuda"`` was
asked for explicitly. The class itself also runs on the CPU with ``graphs=False`` (the same static-buffer
code, eagerly): that is how the CPU tests check it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark_compile.errors import BackendUnavailableError
from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.runtime.backend import DraftOutput, VerifyOutput
from dspark_compile.runtime.torch_backend import program_info
from dspark_compile.targets.torch.static_forward import StaticProgram

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SLOT_MULTIPLE = 256
KV_BUCKET = 256
WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS handles, Triton compilation)
_ROW_COPIED = ("ctx_taps", "draft_probs")  # large inputs: only the live rows travel; the rest are left stale

StepFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def batch_bucket(rows: int) -> int:
    """The graph batch for ``rows`` live requests: the next of 1, 2, 4, …, 64, then a multiple of 64."""
    if rows < 1:
        raise ValueError(f"batch must be >= 1, found {rows}")
    for b in BATCH_BUCKETS:
        if rows <= b:
            return b
    return round_up(rows, BATCH_BUCKETS[-1])


def slot_capacity(slots: int) -> int:
    """Cache capacity for ``slots`` positions: rounded up to a multiple of 256."""
    return round_up(max(int(slots), 1), SLOT_MULTIPLE)


def attention_window(needed: int, capacity: int, bucket: int | None) -> int:
    """Slots attention reads: ``needed`` rounded up to ``bucket`` (None: the whole cache), at most ``capacity``."""
    if bucket is None:
        return capacity
    return min(capacity, round_up(max(needed, 1), bucket))


class _GraphPool:
    """The memory pool a backend's graphs share. PyTorch cannot capture into a pool whose graphs have all been
    destroyed (its allocator asserts), so the handle is renewed whenever that can have happened."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.handle: Any = None
        self.renew()

    def renew(self) -> None:
        self.handle = torch.cuda.graph_pool_handle() if self.enabled else None


class _Step:
    """Static device inputs with pinned host twins, a step function, and (once captured) its CUDA graph."""

    def __init__(self, fn: StepFn, specs: dict[str, tuple[tuple[int, ...], torch.dtype, np.dtype, float]],
                 device: torch.device, *, capture: bool, pool: _GraphPool) -> None:
        self.fn = fn
        self.device = device
        cuda = device.type == "cuda"
        self.inputs = {n: torch.zeros(shape, dtype=dt, device=device) for n, (shape, dt, _, _) in specs.items()}
        self.host = {n: torch.zeros(shape, dtype=_torch_dtype(hdt), pin_memory=cuda)
                     for n, (shape, _, hdt, _) in specs.items()}
        self.pads = {n: pad for n, (_, _, _, pad) in specs.items()}
        self.capture = capture
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, torch.Tensor] = {}

    def load(self, name: str, array: np.ndarray, rows: int) -> None:
        host = self.host[name].numpy()
        host[(slice(0, rows), *(slice(0, s) for s in array.shape[1:]))] = array
        if name in _ROW_COPIED:
            self.inputs[name][:rows].copy_(self.host[name][:rows], non_blocking=True)
            return
        host[rows:] = self.pads[name]
        self.inputs[name].copy_(self.host[name], non_blocking=True)

    def run(self) -> dict[str, torch.Tensor]:
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if not self.capture:
            return self.fn(self.inputs)
        try:
            self._capture()
        except RuntimeError as exc:  # reported, and the step keeps working eagerly
            log.warning("CUDA graph capture failed, running this shape eagerly: %s", exc)
            self.capture = False
            self.graph = None
            self.pool.renew()
            return self.fn(self.inputs)
        assert self.graph is not None
        self.graph.replay()
        return self.outputs

    def _capture(self) -> None:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):  # in-place cache writes are idempotent: same inputs, same values
                self.fn(self.inputs)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.handle):
            self.outputs = self.fn(self.inputs)
        self.graph = graph


def _torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}[np.dtype(np_dtype)]


class CudaGraphBackend:
    """The Backend protocol (runtime/backend.py) over CUDA graphs; see the module docstring."""

    def __init__(self, target: Qwen3Target, draft: DSparkDraft | None, *, block_size: int | None = None,
                 eos_token_ids: tuple[int, ...] = (), graphs: bool | None = None, fused: bool | None = None,
                 attention: str | None = None, kv_bucket: int | None = KV_BUCKET,
                 spec_verify: str | None = None) -> None:
        self.device = target.embed_tokens.weight.device
        cuda = self.device.type == "cuda"
        if graphs and not cuda:
            raise ValueError("graphs=True needs the model on a CUDA device")
        if draft is not None and block_size is not None:
            draft.block_size = int(block_size)
        self.target_model = target
        self.draft_model = draft
        self.graphs = cuda if graphs is None else graphs
        self.kv_bucket = kv_bucket
        self.spec_verify = spec_verify or ("triton" if cuda else "torch")
        self.program = StaticProgram(target, draft, fused=cuda if fused is None else fused,
                                     attention=attention or ("triton" if cuda else "reference"))
        self.info = program_info(target, draft, eos_token_ids)
        self._pool = _GraphPool(self.graphs)
        self._kv: torch.Tensor | None = None
        self._draft_kv: torch.Tensor | None = None
        self._alloc = (0, 0)  # (rows, slots) of the allocated caches
        self._rows = 0
        self._steps: dict[tuple[Any, ...], _Step] = {}
        self._last_probs: tuple[np.ndarray, torch.Tensor] | None = None
        self.stats = {"captures": 0, "replays": 0, "eager_calls": 0}

    @classmethod
    def create(cls, target_dir: str | Path, draft_dir: str | Path | None, *, dtype: str = "bf16",
               device: str = "auto", block_size: int | None = None, allow_nonfinite: bool = False,
               **options: Any) -> Any:
        """The fastest backend this machine has for a checkpoint pair.

        ``device="auto"``: CUDA graphs on ``cuda`` when a GPU is visible, else the eager TorchBackend on the CPU
        in fp32 (a warning says so). ``"cuda"``/``"cuda:N"`` without a GPU raises BackendUnavailableError;
        ``"cpu"`` returns the eager TorchBackend.
        """
        from dspark_compile.program import build_program
        from dspark_compile.runtime.torch_backend import TorchBackend

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if device == "cpu":
                log.warning("no CUDA GPU: using the eager PyTorch backend on the CPU in fp32 (CUDA graphs, bf16 and "
                            "the Triton SpecVerify kernel need a GPU)")
        elif device == "cpu":
            log.info("device 'cpu': the eager PyTorch backend in fp32 (CUDA graphs need a GPU)")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r} was asked for but torch sees no CUDA GPU "
                                          f"(torch {torch.__version__}); use device='auto' or 'cpu'")
        tdir = Path(target_dir)
        ddir = Path(draft_dir) if draft_dir is not None else None
        if device == "cpu":
            return TorchBackend.from_pair(tdir, ddir, dtype="fp32", device="cpu", block_size=block_size,
                                          allow_nonfinite=allow_nonfinite)
        program = build_program(tdir, ddir, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite)
        return cls(program.target, program.draft, block_size=block_size, eos_token_ids=program.eos_token_ids,
                   **options)

    def describe(self) -> dict[str, Any]:
        return {"backend": "torch-cuda-graph" if self.graphs else "torch-static-eager", "device": str(self.device),
                "dtype": str(self.target_model.embed_tokens.weight.dtype).removeprefix("torch."),
                "graphs": self.graphs, "fused": self.program.fused, "attention": self.program.attention,
                "kv_bucket": self.kv_bucket, "spec_verify": self.spec_verify, **self.stats}

    # ------------------------------------------------------------------------------------------- protocol
    @torch.inference_mode()
    def start(self, batch: int, slots: int) -> None:
        alloc = (batch_bucket(batch), slot_capacity(slots))
        if alloc != self._alloc:  # graphs are bound to the cache tensors: drop them with the caches
            self._steps.clear()
            self._pool.renew()
            self._kv = self._draft_kv = None
            self._kv = self.target_model.new_cache(*alloc)
            if self.draft_model is not None:
                self._draft_kv = self.draft_model.new_cache(*alloc)
            self._alloc = alloc
        self._rows = batch
        self._last_probs = None

    @torch.inference_mode()
    def prefill(self, input_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, t = input_ids.shape
        assert self._kv is not None and n == self._rows
        kv = self._kv[:, :, :n]
        window = self._window(t)
        tgt = self.target_model

        def fn(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            ids = inp["input_ids"]
            zero = torch.zeros(n, dtype=torch.int64, device=ids.device)
            hidden, taps = self.program.target_step(ids, zero, kv, window)
            last = hidden[torch.arange(n, device=ids.device), inp["lengths"] - 1]
            return {"logits": tgt.logits(last), "taps": taps.float()}

        step = self._step(fn, {"input_ids": ((n, t), torch.int64, np.int64, 0),
                                "lengths": ((n,), torch.int64, np.int64, 1)}, capture=False)
        step.load("input_ids", input_ids, n)
        step.load("lengths", lengths, n)
        out = self._run(step)
        logits, taps = self._fetch([out["logits"], out["taps"]])
        return logits, taps

    @torch.inference_mode()
    def draft(self, anchor: np.ndarray, ctx_taps: np.ndarray, ctx_count: np.ndarray, cache_len: np.ndarray,
              temperature: np.ndarray | None, uniforms: np.ndarray | None) -> DraftOutput:
        assert self.draft_model is not None and self._draft_kv is not None
        n, c, feat = ctx_taps.shape
        g = self.info.block_size
        sampling = temperature is not None
        window = self._window(int((cache_len + ctx_count).max()) + g)
        graphable = c <= g + 1
        rows = batch_bucket(n) if graphable else n
        width = g + 1 if graphable else c
        key = ("draft", rows, window, sampling)
        step = self._steps.get(key) if graphable else None
        if step is None:
            step = self._draft_step(rows, width, feat, window, sampling, capture=self.graphs and graphable)
            if graphable:
                self._steps[key] = step
        for name, value in (("anchor", anchor), ("ctx_taps", ctx_taps), ("ctx_count", ctx_count),
                            ("cache_len", cache_len), ("temperature", temperature), ("uniforms", uniforms)):
            if value is not None:
                step.load(name, value, n)
        out = self._run(step)
        wanted = [out["tokens"][:n], out["confidence"][:n]] + ([out["probs"][:n]] if sampling else [])
        fetched = self._fetch(wanted)
        probs = None
        if sampling:
            probs = fetched[2]
            probs.flags.writeable = False  # verify() may reuse the device copy when handed this very array
            self._last_probs = (probs, out["probs"])
        return DraftOutput(fetched[0], fetched[1], probs)

    @torch.inference_mode()
    def verify(self, tokens: np.ndarray, cache_len: np.ndarray, verify_len: np.ndarray,
               draft_probs: np.ndarray | None, temperature: np.ndarray | None,
               uniforms: np.ndarray | None) -> VerifyOutput:
        assert self._kv is not None
        n, t = tokens.shape
        sampling = temperature is not None
        rows = batch_bucket(n)
        window = self._window(int(cache_len.max()) + t)
        key = ("verify", rows, t, window, sampling)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._verify_step(rows, t, window, sampling)
        step.load("tokens", tokens, n)
        step.load("cache_len", cache_len, n)
        step.load("verify_len", verify_len, n)
        if sampling:
            assert uniforms is not None
            step.load("temperature", temperature, n)
            step.load("uniforms", uniforms, n)
            if t > 1 and draft_probs is not None:
                last = self._last_probs
                if last is not None and draft_probs is last[0]:  # the draft's own output: no host round trip
                    step.inputs["draft_probs"][:n].copy_(last[1][:n])
                else:
                    step.load("draft_probs", draft_probs, n)
        out = self._run(step)
        decision, taps = self._fetch([out["decision"][:n], out["taps"][:n]])
        return VerifyOutput(decision[:, 0].copy(), decision[:, 1].copy(), taps)

    @torch.inference_mode()
    def select(self, rows: np.ndarray) -> None:
        """Keep these batch rows: moved down in place (increasing ``rows`` never overwrite a source)."""
        rows = np.asarray(rows, dtype=np.int64)
        for cache in (self._kv, self._draft_kv):
            if cache is None:
                continue
            if np.all(np.diff(rows) > 0):
                for i, r in enumerate(rows.tolist()):
                    if r != i:
                        cache[:, :, i].copy_(cache[:, :, r])
            else:
                idx = torch.from_numpy(rows).to(cache.device)
                cache[:, :, : len(rows)] = cache.index_select(2, idx)
        self._rows = len(rows)
        self._last_probs = None

    # -------------------------------------------------------------------------------------------- steps
    def _window(self, needed: int) -> int:
        return attention_window(needed, self._alloc[1], self.kv_bucket)

    def _step(self, fn: StepFn, specs: dict[str, tuple[tuple[int, ...], torch.dtype, Any, float]], *,
              capture: bool) -> _Step:
        return _Step(fn, specs, self.device, capture=capture, pool=self._pool)

    def _run(self, step: _Step) -> dict[str, torch.Tensor]:
        if step.graph is not None:
            self.stats["replays"] += 1
        elif step.capture:
            self.stats["captures"] += 1
        else:
            self.stats["eager_calls"] += 1
        return step.run()

    def _verify_step(self, rows: int, t: int, window: int, sampling: bool) -> _Step:
        from dspark_compile.plugins.spec_verify.reference import spec_verify_torch

        assert self._kv is not None
        kv = self._kv[:, :, :rows]
        tgt = self.target_model
        vocab = self.info.vocab_size
        if self.spec_verify == "triton":
            from dspark_compile.plugins.spec_verify.kernel import spec_verify_triton as spec_verify
        else:
            spec_verify = spec_verify_torch

        def fn(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            tokens = inp["tokens"]
            hidden, taps = self.program.target_step(tokens, inp["cache_len"], kv, window)
            logits = tgt.lm_head(hidden)  # SpecVerify reads the model dtype (exact: fp32 upcasts are exact)
            extra = {}
            if sampling:
                extra = {k: inp[k] for k in ("draft_probs", "temperature", "uniforms")}
            accepted, nxt = spec_verify(logits, tokens[:, 1:], inp["verify_len"],
                                        mode="sampling" if sampling else "greedy", **extra)
            return {"decision": torch.stack((accepted, nxt), dim=1), "taps": taps.float()}

        specs: dict[str, tuple[tuple[int, ...], torch.dtype, Any, float]] = {
            "tokens": ((rows, t), torch.int64, np.int64, 0),
            "cache_len": ((rows,), torch.int64, np.int64, 0),
            "verify_len": ((rows,), torch.int64, np.int64, 0),
        }
        if sampling:
            specs |= {"draft_probs": ((rows, t - 1, vocab), torch.float32, np.float32, 0.0),
                      "temperature": ((rows,), torch.float32, np.float32, 0.0),
                      "uniforms": ((rows, t), torch.float32, np.float32, 0.5)}
        return self._step(fn, specs, capture=self.graphs)

    def _draft_step(self, rows: int, width: int, feat: int, window: int, sampling: bool, *, capture: bool) -> _Step:
        assert self._draft_kv is not None and self.draft_model is not None
        kv = self._draft_kv[:, :, :rows]
        draft = self.draft_model
        g = draft.block_size
        dtype = draft.fc.weight.dtype

        def fn(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            hidden = self.program.draft_step(inp["anchor"], inp["ctx_taps"], inp["ctx_count"], inp["cache_len"], kv,
                                             window)
            tokens, conf, probs = draft.propose(hidden, inp["anchor"], inp.get("temperature"), inp.get("uniforms"))
            out = {"tokens": tokens, "confidence": conf}
            if sampling:
                out["probs"] = probs
            return out

        specs: dict[str, tuple[tuple[int, ...], torch.dtype, Any, float]] = {
            "anchor": ((rows,), torch.int64, np.int64, 0),
            "ctx_taps": ((rows, width, feat), dtype, np.float32, 0.0),
            "ctx_count": ((rows,), torch.int64, np.int64, 0),
            "cache_len": ((rows,), torch.int64, np.int64, 0),
        }
        if sampling:
            specs |= {"temperature": ((rows,), torch.float32, np.float32, 0.0),
                      "uniforms": ((rows, g), torch.float32, np.float32, 0.5)}
        return self._step(fn, specs, capture=capture)

    def _fetch(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Device tensors -> NumPy with one wait: async copies into pinned memory, then a stream sync."""
        if self.device.type != "cuda":
            return [t.detach().clone().numpy() for t in tensors]
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(hosts, tensors, strict=True):
            h.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return [h.numpy() for h in hosts]
