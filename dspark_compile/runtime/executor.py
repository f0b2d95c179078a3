"""One executor of a build's two graphs (docs/PROGRAM.md) with a transport per runtime.

:class:`GraphExecutor` implements :class:`~dspark_compile.runtime.backend.DecodeBackend`: the KV caches, the
pending drafts and their probabilities, anchors, lengths and each row's random stream live on the transport's
device as torch tensors. A graph returns only the K/V rows it wrote; the executor writes them into its caches
in place at ``cache_len + t`` (a Gemma4 target's sliding layers: into their ring at ``(cache_len + t) mod R``,
:func:`write_ring`). The graphs' weight inputs (the embedding and LM head both graphs read) are
held here once and bound to every call. Per call the host hands over O(B) numbers and gets back a :class:`Proposal`
(O(B·G)) with one synchronisation.

A :class:`Transport` runs one graph on tensors that already live on its device: the PyTorch reference
(runtime/torch_backend.py), onnxruntime (runtime/onnxruntime_backend.py), Triton BLS (the orchestrator) and
TensorRT (targets/tensorrt/transport.py). Caches are allocated once per batch composition: ``admit`` and
``select`` rebuild them on the device (the graphs need each cache contiguous over its live rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dspark_compile.runtime.backend import ProgramInfo, Proposal, uniforms_per_call
from dspark_compile.runtime.sampling import counter_uniforms

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Transport(Protocol):
    """Runs one graph of a build on tensors of ``device``: inputs by name, results into the given buffers."""

    device: torch.device

    def has_graph(self, graph: str) -> bool: ...

    def inputs(self, graph: str) -> tuple[str, ...]: ...

    def outputs(self, graph: str) -> tuple[str, ...]: ...

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Run ``graph`` on ``feeds`` (a superset of its inputs) and write its outputs into ``outputs``."""


def load_weight_inputs(build_dir: Path, manifest: Mapping[str, Any],
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The graphs' weight inputs of a build (``manifest["weight_inputs"]``), each region read once: a tied LM
    head and the embedding are one tensor on ``device``."""
    records = manifest.get("weight_inputs") or {}
    loaded: dict[tuple[str, int], torch.Tensor] = {}
    out = {}
    for name, rec in records.items():
        key = (rec["file"], int(rec["offset"]))
        if key not in loaded:
            with (Path(build_dir) / rec["file"]).open("rb") as f:
                f.seek(int(rec["offset"]))
                raw = bytearray(f.read(int(rec["bytes"])))
            tensor = torch.frombuffer(raw, dtype=getattr(torch, rec["dtype"])).reshape(rec["shape"])
            loaded[key] = tensor.to(device)
        out[name] = loaded[key]
    return out


def write_rows(cache: torch.Tensor, rows: torch.Tensor, start: torch.Tensor) -> None:
    """Write ``rows`` [layers, 2, B, KV, T, D] into ``cache`` [layers, 2, B, KV, S, D] at slots start[b] + t."""
    layers, two, bsz, heads, count, dim = rows.shape
    slots = start.view(1, 1, bsz, 1, 1, 1) + torch.arange(count, device=cache.device).view(1, 1, 1, 1, count, 1)
    cache.scatter_(4, slots.expand(layers, two, bsz, heads, count, dim), rows.to(cache.dtype))


def write_ring(ring: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> None:
    """Write rows t in [count[b] - R, count[b]) of ``rows`` [layers, 2, B, KV, T, D] into ``ring``
    [layers, 2, B, KV, R, D] at slots (start[b] + t) mod R (models/gemma4.RingWindow).

    ``count`` is T for a verify block (rejected rows included: the ring's R = W + G allows for them) and the
    prompt length for a right-padded prefill, whose padding may lie further beyond the committed length than G
    and so is never written. The K = min(T, R) candidate rows are consecutive positions, so their slots are
    distinct (a deterministic scatter); a candidate before row 0 keeps what its slot held."""
    layers, two, bsz, heads, t, dim = rows.shape
    r = ring.shape[4]
    keep = min(t, r)
    first = count.view(bsz, 1) - keep + torch.arange(keep, device=ring.device).view(1, keep)  # [B, K] row index
    slots = ((start.view(bsz, 1) + first) % r).view(1, 1, bsz, 1, keep, 1).expand(layers, two, bsz, heads, keep, dim)
    index = first.clamp(0, t - 1).view(1, 1, bsz, 1, keep, 1).expand(layers, two, bsz, heads, keep, dim)
    new = torch.gather(rows.to(ring.dtype), 4, index)
    valid = (first >= 0).view(1, 1, bsz, 1, keep, 1)
    ring.scatter_(4, slots, torch.where(valid, new, torch.gather(ring, 4, slots)))


class GraphExecutor:
    """The device-resident decode round of docs/PROGRAM.md over any :class:`Transport`."""

    verifies_whole_block = True  # round() verifies every row's G+1 positions (DecodeBackend)
    takes_plain_rounds = True  # round(..., draft=False): one position per row, verified alone; the draft deferred

    def __init__(self, info: ProgramInfo, transport: Transport,
                 weights: Mapping[str, torch.Tensor] | None = None) -> None:
        self.info = info
        self.transport = transport
        # The graphs' weight inputs (the shared embedding / LM head), on the device once, bound to every call.
        self.weights = dict(weights or {})
        self.device = transport.device
        self.dtype = TORCH_DTYPES[info.dtype]
        self._g = info.block_size
        self._slots = 0
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._empty()

    # ------------------------------------------------------------------------------ state
    def _empty(self) -> None:
        dev, i64 = self.device, torch.int64
        self.kv = self._cache(0, draft=False)
        self.ring = self._ring(0)
        self.draft_kv = self._cache(0, draft=True) if self._g else None
        self.cache_len = torch.zeros(0, dtype=i64, device=dev)  # target cache length = anchor position
        self.anchor = torch.zeros(0, dtype=i64, device=dev)
        self.drafts = torch.zeros(0, self._g, dtype=i64, device=dev)
        self.draft_probs: torch.Tensor | None = None  # [n, G, V] when the graphs sample
        # Plain rounds' taps, not yet read by the draft (_defer): row r's first ``held[r]`` of [n, G + 1, taps]. The
        # counts follow from the calls alone, so the host keeps them (no synchronisation to read them).
        self.held = np.zeros(0, dtype=np.int64)
        self.held_taps = torch.zeros(0, self._g + 1, self.info.tap_width, dtype=self.dtype, device=dev)
        self.temperature = torch.zeros(0, dtype=torch.float32, device=dev)
        self.seeds = torch.zeros(0, dtype=i64, device=dev)
        self.calls = torch.zeros(0, dtype=i64, device=dev)

    def _cache(self, rows: int, *, draft: bool) -> torch.Tensor:
        i = self.info
        layers, heads, dim = ((i.draft_layers, i.draft_kv_heads, i.draft_head_dim) if draft
                              else (i.cache_layers, i.kv_heads, i.head_dim))
        return torch.zeros(layers, 2, rows, heads, self._slots, dim, dtype=self.dtype, device=self.device)

    def _ring(self, rows: int) -> torch.Tensor | None:
        """The sliding layers' ring (ProgramInfo.ring_slots; None without one), a fixed R slots per row."""
        i = self.info
        if not i.ring_slots:
            return None
        return torch.zeros(i.ring_layers, 2, rows, i.ring_kv_heads, i.ring_slots, i.ring_head_dim, dtype=self.dtype,
                           device=self.device)

    @property
    def rows(self) -> int:
        return int(self.cache_len.shape[0])

    def start(self, rows: int, slots: int, *, speculative: bool = True) -> None:
        if self.info.max_slots is not None and slots > self.info.max_slots:
            raise ValueError(f"{slots} cache slots asked for; the build allows {self.info.max_slots}")
        self._g = self.info.block_size if speculative and self.transport.has_graph("draft_propose") else 0
        self._slots = slots
        self._buffers.clear()
        self._empty()

    # ------------------------------------------------------------------------------ graph calls
    def _buffer(self, graph: str, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Preallocated output buffers, reused while the shape stays (outputs are bound, never returned)."""
        buf = self._buffers.get((graph, name))
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self._buffers[(graph, name)] = buf
        return buf

    def _run(self, graph: str, feeds: Mapping[str, torch.Tensor],
             shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        outs = {name: self._buffer(graph, name, *shapes[name]) for name in self.transport.outputs(graph)}
        self.transport.run(graph, {**self.weights, **feeds}, outs)
        return outs

    def _uniforms(self, seeds: torch.Tensor, calls: torch.Tensor) -> torch.Tensor:
        n = uniforms_per_call(self._g)
        return counter_uniforms(seeds, calls * n, n)

    def _kv_shape(self, rows: int, count: int, *, draft: bool) -> tuple[tuple[int, ...], torch.dtype]:
        i = self.info
        layers, heads, dim = ((i.draft_layers, i.draft_kv_heads, i.draft_head_dim) if draft
                              else (i.cache_layers, i.kv_heads, i.head_dim))
        return (layers, 2, rows, heads, count, dim), self.dtype

    def _draft(self, anchor: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor, cache_len: torch.Tensor,
               draft_kv: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One draft_propose call; writes its context rows into ``draft_kv``; -> (drafts, conf, probs)."""
        n, c = ctx_taps.shape[:2]
        g, f32, i64 = self._g, torch.float32, torch.int64
        out = self._run("draft_propose", {
            "anchor": anchor, "ctx_taps": ctx_taps, "ctx_count": ctx_count, "cache_len": cache_len,
            "draft_kv": draft_kv, "temperature": temperature, "uniforms": uniforms,
        }, {"draft_tokens": ((n, g), i64), "confidence_logits": ((n, g), f32),
            "draft_probs": ((n, g, self.info.vocab_size), f32),
            "draft_kv_new": self._kv_shape(n, c, draft=True)})
        write_rows(draft_kv, out["draft_kv_new"], cache_len)
        # Buffers, not copies: each is read (next verify, the Proposal) before the next draft call rewrites it.
        return out["draft_tokens"], out["confidence_logits"], out.get("draft_probs")

    def _proposal(self, accepted: torch.Tensor, next_token: torch.Tensor, drafts: torch.Tensor,
                  confidence: torch.Tensor) -> Proposal:
        """The host's view of a call: one copy of O(B·G) numbers (one synchronisation on a GPU)."""
        tensors = (accepted, next_token, drafts, confidence)
        if self.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors, strict=True):
                h.copy_(t, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            host = [t.to("cpu", copy=True) for t in tensors]
        return Proposal(*(h.numpy() for h in host))

    # ------------------------------------------------------------------------------ the protocol
    def _step(self, tokens: torch.Tensor, cache_len: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor | None,
              logit_rows: torch.Tensor, verify_len: torch.Tensor, draft_probs: torch.Tensor | None,
              temperature: torch.Tensor, uniforms: torch.Tensor,
              count: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One target_step call (prefill or verification); writes its K/V rows into ``kv`` at ``cache_len``
        and the sliding layers' into ``ring`` (:func:`write_ring`; ``count``: each row's real length, default T)."""
        n, t = tokens.shape
        i = self.info
        drafts = logit_rows.shape[1] - 1
        if draft_probs is None and "draft_probs" in self.transport.inputs("target_step"):  # no drafts to verify
            draft_probs = torch.zeros(n, drafts, self.info.vocab_size, dtype=torch.float32, device=self.device)
        feeds = {
            "tokens": tokens, "cache_len": cache_len, "kv_cache": kv, "logit_rows": logit_rows,
            "verify_len": verify_len, "draft_probs": draft_probs, "temperature": temperature,
            "uniforms": uniforms.contiguous(),
        }
        shapes = {"accepted": ((n,), torch.int64), "next_token": ((n,), torch.int64),
                  "taps": ((n, t, self.info.tap_width), self.dtype), "kv_new": self._kv_shape(n, t, draft=False)}
        if ring is not None:
            feeds["kv_ring"] = ring
            shapes["ring_new"] = (i.ring_layers, 2, n, i.ring_kv_heads, t, i.ring_head_dim), self.dtype
        out = self._run("target_step", feeds, shapes)
        write_rows(kv, out["kv_new"], cache_len)  # rejected rows lie beyond the committed length
        if ring is not None:
            write_ring(ring, out["ring_new"], cache_len,
                       count if count is not None else torch.full_like(cache_len, t))
        return out

    @torch.inference_mode()
    def admit(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray) -> Proposal:
        dev, g = self.device, self._g
        ids = torch.as_tensor(np.ascontiguousarray(input_ids, dtype=np.int64), device=dev)
        lens = torch.as_tensor(np.asarray(lengths, dtype=np.int64), device=dev)
        temp = torch.as_tensor(np.asarray(temperature, dtype=np.float32), device=dev)
        seed = torch.as_tensor(np.asarray(seeds, dtype=np.int64), device=dev)
        k = ids.shape[0]
        # Fresh output buffers: the live rows' drafts/draft_probs *are* the last draft call's buffers, which a
        # prefill of as many new rows would otherwise overwrite before they are verified.
        self._buffers.clear()
        calls = torch.zeros(k, dtype=torch.int64, device=dev)
        u = self._uniforms(seed, calls)
        kv, ring = self._cache(k, draft=False), self._ring(k)
        zeros = torch.zeros(k, dtype=torch.int64, device=dev)
        # The first token: SpecVerify on the last prompt position with no drafts (u[0], as verification's last).
        out = self._step(ids, zeros, kv, ring, (lens - 1)[:, None], zeros, None, temp, u[:, :1], count=lens)
        first = out["next_token"]
        if g:
            dkv = self._cache(k, draft=True)
            drafts, conf, probs = self._draft(first, out["taps"], lens, zeros, dkv, temp, u[:, g + 1:].contiguous())
            self.draft_kv = torch.cat((self.draft_kv, dkv), dim=2)
            if probs is not None:
                self.draft_probs = probs if self.draft_probs is None else torch.cat((self.draft_probs, probs))
        else:
            drafts = torch.zeros(k, 0, dtype=torch.int64, device=dev)
            conf = torch.zeros(k, 0, dtype=torch.float32, device=dev)
        self.kv = torch.cat((self.kv, kv), dim=2)
        if ring is not None and self.ring is not None:
            self.ring = torch.cat((self.ring, ring), dim=2)
        self.cache_len = torch.cat((self.cache_len, lens))
        self.anchor = torch.cat((self.anchor, first))
        self.drafts = torch.cat((self.drafts, drafts))
        self.temperature = torch.cat((self.temperature, temp))
        self.seeds = torch.cat((self.seeds, seed))
        self.calls = torch.cat((self.calls, calls + 1))
        self.held = np.concatenate((self.held, np.zeros(k, dtype=np.int64)))
        self.held_taps = torch.cat((self.held_taps, self.held_taps.new_zeros(k, *self.held_taps.shape[1:])))
        self._buffers.clear()  # the batch changed: new shapes
        return self._proposal(zeros, first.clone(), drafts, conf)

    def _verify_rows(self, rows: int, width: int) -> torch.Tensor:
        """``logit_rows`` of verification: rows 0..G of every chunk."""
        return torch.arange(width, device=self.device).repeat(rows, 1)

    @torch.inference_mode()
    def round(self, verify_len: np.ndarray, *, draft: bool = True) -> Proposal:
        """``draft=False`` (VerifyPolicy.draft_rows): the target over the anchor alone, nothing verified (uniform G
        draws the next token, as in every round), and no draft graph: its taps wait for the next one (_defer), and
        the Proposal's drafts are −1, as the CUDA-graph backend's. A row whose context waits verifies nothing in
        the drafting round after (its pending drafts are stale)."""
        n, g, dev = self.rows, self._g, self.device
        width = g + 1 if draft else 1
        # a row whose context waits has stale drafts: it verifies none of them
        vlen = torch.as_tensor(np.where(self.held > 0, 0, verify_len) if draft else np.zeros(n), dtype=torch.int64,
                               device=dev)
        u = self._uniforms(self.seeds, self.calls)
        self.calls += 1
        tokens = torch.cat((self.anchor[:, None], self.drafts), dim=1) if draft else self.anchor[:, None].contiguous()
        probs = self.draft_probs if self.draft_probs is None or draft else self.draft_probs[:, :0]
        out = self._step(tokens, self.cache_len, self.kv, self.ring, self._verify_rows(n, width), vlen, probs,
                         self.temperature, u[:, : g + 1] if draft else u[:, g : g + 1])
        accepted, nxt = out["accepted"], out["next_token"]
        previous = self.cache_len
        self.cache_len = previous + accepted + 1
        self.anchor = nxt
        if not g or not draft:
            if g:
                self._defer(out["taps"], u[:, g + 1:].contiguous())
            conf = torch.zeros(n, g, dtype=torch.float32, device=dev)
            return self._proposal(accepted, nxt, torch.full_like(self.drafts, -1), conf)
        assert self.draft_kv is not None
        taps, count, start = self._with_held(out["taps"], accepted + 1, previous)
        self.drafts, conf, self.draft_probs = self._draft(nxt, taps, count, start, self.draft_kv, self.temperature,
                                                          u[:, g + 1:].contiguous())
        return self._proposal(accepted, nxt, self.drafts, conf)

    def _with_held(self, taps: torch.Tensor, count: torch.Tensor, start: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The draft's context (taps, count a row, first position): each row's held taps, then the first ``count``
        of this call's, left aligned; as given when nothing is held (no extra work in a speculating stretch)."""
        most = int(self.held.max(initial=0))
        if not most:
            return taps, count, start
        held = self._take_held()
        both = torch.cat((self.held_taps[:, :most], taps), dim=1)
        j = torch.arange(both.shape[1], device=self.device)[None, :]
        idx = torch.where(j < held[:, None], j, (j - held[:, None] + most).clamp(max=both.shape[1] - 1))
        return both.gather(1, idx[..., None].expand(-1, -1, both.shape[2])), held + count, start - held

    def _defer(self, taps: torch.Tensor, uniforms: torch.Tensor) -> None:
        """A plain round's one tap a row waits in ``held_taps`` for the next draft call instead of a draft call
        of its own: plain rounds then cost a target step and no draft graph (the draft graph has no context-only
        form). The draft reads at most 2G + 1 context positions in one call (its profiles' optimum is G + 1):
        after G + 1 plain rounds the held taps go to a draft call whose drafts are dropped."""
        dev = self.device
        self.held_taps[torch.arange(self.rows, device=dev), torch.as_tensor(self.held, device=dev)] = taps[:, 0]
        self.held += 1
        if self.held.max(initial=0) <= self._g:
            return
        assert self.draft_kv is not None
        held = self._take_held()
        self.drafts, _, self.draft_probs = self._draft(self.anchor, self.held_taps, held, self.cache_len - held,
                                                       self.draft_kv, self.temperature, uniforms)

    def _take_held(self) -> torch.Tensor:
        """The rows' held-tap counts on the device, zeroed here: the next draft call takes those taps."""
        held = torch.tensor(self.held, device=self.device)  # a copy: on the CPU as_tensor would share the array
        self.held[:] = 0
        return held

    @torch.inference_mode()
    def select(self, rows: np.ndarray) -> None:
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        self.kv = self.kv.index_select(2, idx)
        if self.ring is not None:
            self.ring = self.ring.index_select(2, idx)
        if self.draft_kv is not None:
            self.draft_kv = self.draft_kv.index_select(2, idx)
        self.held = self.held[np.asarray(rows, dtype=np.int64)]
        for name in ("cache_len", "anchor", "drafts", "draft_probs", "temperature", "seeds", "calls", "held_taps"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, idx))
        self._buffers.clear()

    @torch.inference_mode()
    def verify_step(self, tokens: np.ndarray, cache_len: np.ndarray, verify_len: np.ndarray) -> None:
        """One verification call of target_step on zero caches of ``len(tokens)`` rows, nothing committed: the
        SPS profile's unit of work (tools/profile_sps.py). ``start`` must have sized the slots."""
        rows, t = tokens.shape
        dev = self.device
        if self.kv.shape[2] != rows:
            self.kv, self.ring = self._cache(rows, draft=False), self._ring(rows)
        probs = torch.full((rows, t - 1, self.info.vocab_size), 1.0 / self.info.vocab_size, device=dev)
        self._step(torch.as_tensor(tokens, device=dev), torch.as_tensor(cache_len, device=dev), self.kv, self.ring,
                   self._verify_rows(rows, t), torch.as_tensor(verify_len, device=dev), probs,
                   torch.zeros(rows, device=dev), torch.zeros(rows, t, device=dev))


class NumpyTransport:
    """Graphs as Python functions of NumPy arrays (``fn(graph, inputs) -> outputs``): stand-in engines for the
    CPU tests of the executor, the orchestrator and the server. CPU tensors cross as zero-copy views."""

    def __init__(self, fn: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]],
                 signatures: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
        self.fn = fn
        self.signatures = signatures  # graph -> (input names, output names)
        self.device = torch.device("cpu")

    def has_graph(self, graph: str) -> bool:
        return graph in self.signatures

    def inputs(self, graph: str) -> tuple[str, ...]:
        return self.signatures[graph][0]

    def outputs(self, graph: str) -> tuple[str, ...]:
        return self.signatures[graph][1]

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        got = self.fn(graph, {name: feeds[name].numpy() for name in self.inputs(graph)})
        for name, buf in outputs.items():
            buf.copy_(torch.from_numpy(np.asarray(got[name])))
