"""`CudaGraphBackend`: the program as CUDA graphs over static, in-place KV caches.

It is a **DecodeBackend** (runtime/backend.py: admit / round / select): the decode state lives on the device
(`_RoundState`: lengths, anchors, pending drafts and their distributions, taps, seeds and counters). ``admit``
prefills and drafts the first block through admission graphs (up to 8 prompts each, into a scratch cache whose
rows are then copied: one graph serves any rows); ``round`` is **one captured graph** per (batch bucket,
attention window, greedy/sampling, replay, G, plain, width): verify the pending block → SpecVerify → commit (the
caches already hold the rows: rollback is free) → taps → next anchor → draft backbone → Markov sampling → confidence,
with per-row verify lengths, temperatures, seeds and counters (``counter_uniforms``) as device inputs, and its own
bookkeeping (tokens, commit, the draft's inputs, the packed output) in :mod:`.round_kernels`' five launches. One host
sync per round fetches the Proposal; ``launch`` may queue a second round behind the one running
(:data:`ROUNDS_IN_FLIGHT`), so the device never waits for the host between rounds. ``set_replay`` is the
benchmark-only acceptance replay (docs/BENCH.md).
``verify_step`` / ``draft_step`` run one greedy verify or draft graph alone, nothing committed: the units the
per-graph step times (bench.step_times) and the SPS profile (tools/profile_sps) time.

Batch buckets 1, 2, 4, …, 64 (then multiples of 64); capacity rounded up to 256 slots; attention reads slots
``[0, W)`` with W rounded up to ``kv_bucket`` (128) through the split-K Triton kernel. Padding rows have no
live request: nothing to verify, position 0, their own cache rows. On a machine without CUDA,
:meth:`CudaGraphBackend.create` returns the eager TorchBackend (fp32, CPU); the class itself runs on the CPU
with ``graphs=False`` (the same code eagerly), which is how the CPU tests check it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark_compile.errors import BackendUnavailableError
from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.program import program_info
from dspark_compile.runtime.backend import Proposal, uniforms_per_call
from dspark_compile.runtime.sampling import counter_uniforms
from dspark_compile.runtime.scheduler import round_width
from dspark_compile.targets.torch import kernels, round_kernels
from dspark_compile.targets.torch.static_forward import StaticProgram

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SLOT_MULTIPLE = 256
KV_BUCKET = 128
NO_REPLAY, REPLAY, FORCED_REPLAY = 0, 1, 2  # a round graph's replay mode (set_replay), part of its key
REPLAY_KEY = 0x5EED  # replay cuts draw from the stream of seed ^ REPLAY_KEY (never the sampling stream)
WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS handles, Triton compilation)
ADMIT_ROWS = 8  # prompts per admission graph (more are admitted in chunks)
ADMIT_SLOTS = 640  # the admission scratch cache's slots (at most the capacity): longer prompts prefill eagerly
# (0: no admission graphs)
_ROW_COPIED = ("ctx_taps",)  # a large input: only the live rows travel; the rest are left stale

StepFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _uniforms(seeds: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """``runtime.sampling.counter_uniforms``: one kernel on a GPU (``kernels.counter_uniforms``, the same bits),
    the torch ops elsewhere."""
    return kernels.counter_uniforms(seeds, counters, n) if seeds.is_cuda else counter_uniforms(seeds, counters, n)


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


ROUNDS_IN_FLIGHT = 2
"""Rounds :meth:`CudaGraphBackend.launch` may queue before :meth:`~CudaGraphBackend.collect`: the next round waits
on the device behind the one running, so the host's per-round work (~0.3 ms at batch 1 on the H200) never leaves
the GPU idle (docs/BENCH.md)."""


ADMIT_AHEAD_ENV = "DSPARK_ADMIT_AHEAD"
"""On by default: the decode loops launch the rounds sure to run behind an admission before its sync
(``RoundQueue.admit``), so the first round does not wait for the host's turn-around (``ROUNDS_IN_FLIGHT``'s
~0.3-0.6 ms at batch 1, paid once per batch; measured on an H100, docs/BENCH.md). ``0`` turns it off."""


class _Step:
    """Static device inputs with pinned host twins, a step function, and (once captured) its CUDA graph."""

    def __init__(self, fn: StepFn, specs: dict[str, tuple[tuple[int, ...], torch.dtype, np.dtype, float]],
                 device: torch.device, *, capture: bool, pool: _GraphPool, state: _RoundState | None = None) -> None:
        self.fn = fn
        self.state = state  # a round updates it in place: warm-up runs are undone before capture
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
        self.host_out: list[torch.Tensor] = []  # a round's pinned output twins, one per launch slot
        # per launch slot (ROUNDS_IN_FLIGHT rounds may be queued): graph start, graph end, output copied
        self.events = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(3))
                       for _ in range(ROUNDS_IN_FLIGHT)] if cuda else []
        self.copied: dict[str, torch.cuda.Event] = {}  # per input: its last copy from the pinned twin (load)

    def load(self, name: str, array: np.ndarray, rows: int) -> None:
        """Stage ``array`` in the pinned twin and queue its copy. The twin is reused, so the last copy out of it
        must have run first: a call that loads one step several times before it syncs (admission chunks) would
        otherwise hand a queued copy the next chunk's values."""
        copied = self.copied.get(name)
        if copied is not None:
            copied.synchronize()
        host = self.host[name].numpy()
        host[(slice(0, rows), *(slice(0, s) for s in array.shape[1:]))] = array
        if name in _ROW_COPIED:
            self.inputs[name][:rows].copy_(self.host[name][:rows], non_blocking=True)
        else:
            host[rows:] = self.pads[name]
            self.inputs[name].copy_(self.host[name], non_blocking=True)
        if self.device.type == "cuda":
            self.copied.setdefault(name, torch.cuda.Event()).record()

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
        saved = self.state.snapshot() if self.state is not None else None
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):  # in-place cache writes are idempotent: same inputs, same values
                self.fn(self.inputs)
                if saved is not None:  # per-row state is not: restore it (cache rows past it are scratch)
                    self.state.restore(saved)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.handle):
            self.outputs = self.fn(self.inputs)
        self.graph = graph


class _RoundState:
    """Per-row decode state on the device: what a round reads and updates in place (DecodeBackend)."""

    SMALL = ("length", "draft_len", "anchor", "count", "seed", "counter", "temperature", "live", "drafts", "taps")

    def __init__(self, rows: int, g: int, info: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.rows, self.g, self.vocab = rows, g, info.vocab_size
        i64 = {"dtype": torch.int64, "device": device}
        self.length = torch.zeros(rows, **i64)  # committed target tokens = the anchor's position
        self.draft_len = torch.zeros(rows, **i64)  # draft context cache length
        self.anchor = torch.zeros(rows, **i64)
        self.count = torch.zeros(rows, **i64)  # taps rows the draft has not seen (in ``taps``)
        self.seed = torch.zeros(rows, **i64)
        self.counter = torch.zeros(rows, **i64)
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.live = torch.zeros(rows, dtype=torch.bool, device=device)
        self.drafts = torch.zeros(rows, g, **i64)
        self.taps = torch.zeros(rows, g + 1, max(info.tap_width, 1), dtype=dtype, device=device)
        self.probs: torch.Tensor | None = None  # [rows, G, V] float32, once a sampling row is admitted
        self.device = device

    def ensure_probs(self) -> torch.Tensor:
        if self.probs is None:
            self.probs = torch.zeros(self.rows, self.g, self.vocab, dtype=torch.float32, device=self.device)
        return self.probs

    def probs_like(self, rows: int, g: int) -> torch.Tensor:
        return torch.zeros(rows, g, self.vocab, dtype=torch.float32, device=self.device)

    def view(self, rows: int) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[:rows] for name in self.SMALL}

    def reset(self) -> None:
        for name in self.SMALL:
            getattr(self, name).zero_()

    def snapshot(self) -> dict[str, torch.Tensor]:
        names = self.SMALL + (("probs",) if self.probs is not None else ())
        return {name: getattr(self, name).clone() for name in names}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, value in saved.items():
            getattr(self, name).copy_(value)

    def select(self, idx: torch.Tensor) -> None:
        k = idx.shape[0]
        for name in self.SMALL + (("probs",) if self.probs is not None else ()):
            t = getattr(self, name)
            kept = t.index_select(0, idx)
            t.zero_()
            t[:k] = kept


def _torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}[np.dtype(np_dtype)]


class CudaGraphBackend:
    """DecodeBackend over CUDA graphs, plus per-graph timing calls; see the module docstring."""

    verifies_whole_block = True  # the round graph runs the target over every row's G+1 positions
    verifies_widest = False  # narrow_rounds: over max ℓ + 1 positions (a power of two) of every row
    takes_plain_rounds = True  # round(..., draft=False): one position per row, the draft's context only (DecodeBackend)

    def __init__(self, target: Qwen3Target, draft: DSparkDraft | None, *, block_size: int | None = None,
                 eos_token_ids: tuple[int, ...] = (), graphs: bool | None = None, fused: bool | None = None,
                 attention: str | None = None, kv_bucket: int | None = KV_BUCKET,
                 spec_verify: str | None = None, narrow_rounds: bool = False,
                 fused_bookkeeping: bool | None = None) -> None:
        """``narrow_rounds``: a round verifies only as many positions as its longest ℓ needs (rounded up to a
        power of two, one graph per width), so a scheduler can trade drafts for time where the verify is
        compute-bound (large batches); the draft still proposes G tokens. Off: every round runs G + 1.
        ``fused_bookkeeping``: a round's own work besides the model (tokens, commit, packed output) as
        :mod:`.round_kernels`' few launches (default: on CUDA, and in the fused program) or as torch ops."""
        self.verifies_whole_block = not narrow_rounds
        self.verifies_widest = narrow_rounds
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
        self.fused_bookkeeping = (cuda or self.program.fused) if fused_bookkeeping is None else fused_bookkeeping
        self.info = program_info(target, draft, eos_token_ids)
        if self.info.vocab_size > 1 << 24:
            raise ValueError(f"vocab_size {self.info.vocab_size} > 2^24: round outputs pack ids in float32")
        self._pool = _GraphPool(self.graphs)
        self._kv: Any = None  # the target's new_static_cache: a tensor, or Gemma4's RingCache (its ring)
        self._draft_kv: torch.Tensor | None = None
        self._scratch: tuple[torch.Tensor, torch.Tensor | None] | None = None  # admission graphs' caches
        self._admits: dict[tuple[Any, ...], _Step] = {}
        self._alloc = (0, 0)  # (rows, slots) of the allocated caches
        self._steps: dict[tuple[Any, ...], _Step] = {}
        self.stats = {"captures": 0, "replays": 0, "eager_calls": 0}
        # DecodeBackend protocol (admit/round/select): device-resident per-row state and one graph per round
        self._state: _RoundState | None = None
        self._states: dict[int, _RoundState] = {}
        self._rounds: dict[tuple[Any, ...], _Step] = {}
        self._g = 0
        self._live = 0
        self._len_host = np.zeros(0, dtype=np.int64)
        self._temp_host = np.zeros(0, dtype=np.float32)
        self.replay: tuple[torch.Tensor, torch.Tensor] | None = None  # benchmark-only (set_replay)
        self.replay_forced = False
        self._replay_source: torch.Tensor | None = None
        self.last_graph_ms = 0.0
        self.last_host_ms: dict[str, float] = {}  # round(): graph launch call, wait for the outputs
        self._inflight: deque[tuple[Any, ...]] = deque()  # launch() -> collect(): (step, rows, G, outputs, t, slot)
        self._launches = 0
        self._admitting: Callable[[], Proposal] | None = None  # admit_queued() -> admitted()

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
    def start(self, batch: int, slots: int, *, speculative: bool = True) -> None:
        """Caches for ``batch`` rows of ``slots`` positions, no live rows yet; ``verify_step``/``draft_step``
        may use all ``batch`` rows."""
        alloc = (batch_bucket(batch), slot_capacity(slots))
        if alloc != self._alloc:  # graphs are bound to the cache tensors: drop them with the caches
            self._steps.clear()
            self._rounds.clear()
            self._admits.clear()
            self._pool.renew()
            self._kv = self._draft_kv = self._scratch = None
            self._state = None
            self._states = {}
            self._kv = self.target_model.new_static_cache(*alloc, self.info.block_size)
            if self.draft_model is not None:
                self._draft_kv = self.draft_model.new_cache(*alloc)
            if isinstance(self._kv, torch.Tensor) and ADMIT_SLOTS > 0:  # admission graphs prefill here (a ring
                # admits eagerly)
                scratch = (min(ADMIT_ROWS, alloc[0]), min(ADMIT_SLOTS, alloc[1]))
                self._scratch = (self.target_model.new_cache(*scratch), self.draft_model.new_cache(*scratch)
                                 if self.draft_model is not None else None)
            self._alloc = alloc
        self._g = self.info.block_size if speculative and self.draft_model is not None else 0
        if self._g not in self._states:  # one per G (target-only, speculative), kept with the caches
            self._states[self._g] = _RoundState(alloc[0], self._g, self.info, self.device,
                                                self.target_model.embed_tokens.weight.dtype)
        self._state = self._states[self._g]
        self._state.reset()
        if self.replay is not None:  # a new batch: row b replays reference row b again
            self.replay[0].copy_(self._replay_source)
        self._live = 0
        self._inflight.clear()
        self._admitting = None
        self._len_host = np.zeros(alloc[0], dtype=np.int64)  # host mirrors: window and graph choice, no sync
        self._temp_host = np.zeros(alloc[0], dtype=np.float32)

    @torch.inference_mode()
    def verify_step(self, tokens: np.ndarray, cache_len: np.ndarray,
                    verify_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One greedy verify graph over the caches as they are, nothing committed: (accepted, next_token).
        Fetches the taps too, as a host loop over separate graphs would."""
        assert self._kv is not None
        n, t = tokens.shape
        rows = batch_bucket(n)
        window = self._window(int(cache_len.max()) + t)
        key = ("verify", rows, t, window)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._verify_step(rows, t, window)
        for name, value in (("tokens", tokens), ("cache_len", cache_len), ("verify_len", verify_len)):
            step.load(name, value, n)
        out = self._run(step)
        decision, _ = self._fetch([out["decision"][:n], out["taps"][:n]])
        return decision[:, 0].copy(), decision[:, 1].copy()

    @torch.inference_mode()
    def draft_step(self, anchor: np.ndarray, ctx_taps: np.ndarray, ctx_count: np.ndarray,
                   cache_len: np.ndarray) -> np.ndarray:
        """One greedy draft graph (``ctx_taps`` of at most G+1 rows), nothing committed: the drafts [n, G]."""
        assert self.draft_model is not None and self._draft_kv is not None
        n, c, feat = ctx_taps.shape
        g = self.info.block_size
        if c > g + 1:
            raise ValueError(f"draft_step takes at most {g + 1} context rows, found {c}")
        rows = batch_bucket(n)
        window = self._window(int((cache_len + ctx_count).max()) + g)
        key = ("draft", rows, window)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._draft_step(rows, g + 1, feat, window)
        for name, value in (("anchor", anchor), ("ctx_taps", ctx_taps), ("ctx_count", ctx_count),
                            ("cache_len", cache_len)):
            step.load(name, value, n)
        out = self._run(step)
        tokens, _ = self._fetch([out["tokens"][:n], out["confidence"][:n]])
        return tokens

    @torch.inference_mode()
    def select(self, rows: np.ndarray) -> None:
        """Keep these rows (increasing), compacted to ``0..len(rows)-1``: caches and per-row state move."""
        assert not self._inflight, "collect() the rounds in flight first"
        rows = np.asarray(rows, dtype=np.int64)
        increasing = bool(np.all(np.diff(rows) > 0))
        for cache in (self._kv, self._draft_kv):
            if cache is None:
                continue
            if increasing:  # moved down in place: increasing rows never overwrite a source
                for i, r in enumerate(rows.tolist()):
                    if r != i:
                        cache[:, :, i].copy_(cache[:, :, r])
            else:
                idx = torch.from_numpy(rows).to(cache.device)
                cache[:, :, : len(rows)] = cache.index_select(2, idx)
        if self._state is not None and self._live:
            idx = torch.from_numpy(rows).to(self.device)
            self._state.select(idx)
            if self.replay is not None:  # the reference follows its request (in place: graphs read it)
                ref = self.replay[0]
                ref[: len(rows)] = ref.index_select(0, idx)
            for host in (self._len_host, self._temp_host):
                kept = host[rows]
                host[:] = 0
                host[: len(rows)] = kept
            self._live = len(rows)

    # ------------------------------------------------------------------------------ DecodeBackend protocol
    @property
    def queues_admission(self) -> bool:
        """Whether the decode loops queue the first rounds behind the admission (:meth:`admit_queued`):
        on unless ``DSPARK_ADMIT_AHEAD=0`` (docs/BENCH.md)."""
        return kernels.switched_on(ADMIT_AHEAD_ENV, default=True)

    def admit(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray) -> Proposal:
        """Prefill ``k`` prompts into rows ``n..n+k-1``: their first token and first draft block (one sync)."""
        self.admit_queued(input_ids, lengths, temperature, seeds)
        return self.admitted()

    def admitted(self) -> Proposal:
        """The Proposal of the admission :meth:`admit_queued` queued: its one host sync."""
        assert self._admitting is not None, "admit_queued() first"
        fetch, self._admitting = self._admitting, None
        return fetch()

    @torch.inference_mode()
    def admit_queued(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
                     seeds: np.ndarray) -> None:
        """:meth:`admit` without its wait: the prefill and the copy of its outputs are queued, and rounds may be
        launched behind them before :meth:`admitted` waits (they read the admitted rows' state on the device), so
        the GPU goes from the prefill into the first round without waiting on the host.

        Prefill ``k`` prompts into rows ``n..n+k-1``, their first token and first draft block.

        Through admission graphs (:meth:`_admit_step`) in chunks of at most ``ADMIT_ROWS`` prompts: an eager
        prefill is launch-bound whatever its size, and continuous batching pays it every round that admits
        (docs/SERVING.md, "Admission graphs"). A chunk prefills into a scratch cache, then its rows are copied
        into the batch's caches. Prompts too long for the scratch, and Gemma4's ring, run the same step eagerly
        straight into the rows."""
        st = self._state
        assert st is not None and self._kv is not None, "start() first"
        assert not self._inflight, "collect() the rounds in flight first"
        assert self._admitting is None, "admitted() first"
        k, t = input_ids.shape
        n = self._live
        if n + k > st.rows:
            raise ValueError(f"admit: {n} live rows + {k} new exceed the {st.rows} rows start() allocated")
        g = st.g
        lengths = np.asarray(lengths, dtype=np.int64)
        if (lengths < 1).any() or (lengths > t).any():
            raise ValueError(f"admit: prompt lengths must be in [1, {t}], found {lengths.tolist()}")
        temperature = np.asarray(temperature, dtype=np.float32)
        sampling = bool((temperature > 0).any())
        replay = REPLAY if self.replay is not None and g > 0 else NO_REPLAY
        tb = self._admit_tokens(int(lengths.max()))
        size = ADMIT_ROWS if tb else k
        confs: list[torch.Tensor] = []
        for lo in range(0, k, size):
            hi = min(k, lo + size)
            m, rows = hi - lo, slice(n + lo, n + hi)
            if tb:
                key = (batch_bucket(m), tb, sampling, replay, g)
                step = self._admits.get(key)
                if step is None:
                    step = self._admits[key] = self._admit_step(key[0], tb, sampling, replay, capture=self.graphs)
            else:  # eagerly, into the rows themselves
                step = self._admit_step(m, t, sampling, replay, capture=False, kv=self._kv[:, :, rows],
                                        dkv=self._draft_kv[:, :, rows] if self._draft_kv is not None else None)
            ids = np.zeros((m, tb or t), dtype=np.int64)
            ids[:, :t] = input_ids[lo:hi]
            for name, value in (("ids", ids), ("lengths", lengths[lo:hi]), ("temperature", temperature[lo:hi]),
                                ("seed", np.asarray(seeds[lo:hi], dtype=np.int64)),
                                ("row", np.arange(n + lo, n + hi, dtype=np.int64))):
                step.load(name, value, m)
            out = self._run(step)
            # Into the rows now, in stream order: the next chunk's replay overwrites the step's buffers.
            if tb:
                self._copy_admitted(rows, tb, g)
            inp = step.inputs
            st.length[rows] = inp["lengths"][:m]
            st.anchor[rows] = out["first"][:m]
            st.seed[rows] = inp["seed"][:m]
            st.temperature[rows] = inp["temperature"][:m]
            st.counter[rows] = uniforms_per_call(g)
            st.live[rows] = True
            st.count[rows] = 0
            if g > 0:
                st.drafts[rows] = out["drafts"][:m]
                st.draft_len[rows] = inp["lengths"][:m]
                confs.append(out["conf"][:m].clone())
                if sampling:
                    st.ensure_probs()[rows] = out["probs"][:m]
        self._len_host[n : n + k] = lengths
        self._temp_host[n : n + k] = temperature
        self._live = n + k
        rows = slice(n, n + k)
        conf = torch.cat(confs) if confs else torch.zeros(k, 0, dtype=torch.float32, device=self.device)
        zero = torch.zeros(k, 1, dtype=torch.int64, device=self.device)
        wait = self._fetch_queued([torch.cat((zero, st.anchor[rows, None], st.drafts[rows]), dim=1), conf])

        def proposal() -> Proposal:
            got = wait()
            return Proposal(got[0][:, 0].copy(), got[0][:, 1].copy(), got[0][:, 2:].copy(), got[1])

        self._admitting = proposal

    def _admit_tokens(self, longest: int) -> int:
        """An admission graph's prompt width for prompts of up to ``longest`` tokens (a power of two, at least
        16, within the scratch cache), or 0: admit eagerly (a ring cache, or too long for the scratch)."""
        if self._scratch is None:
            return 0
        room = self._scratch[0].shape[4] - self.info.block_size - 1
        tb = min(max(16, 1 << (longest - 1).bit_length()), room)
        return tb if longest <= tb else 0

    def _copy_admitted(self, rows: slice, tb: int, g: int) -> None:
        """An admission chunk's cache rows, from the scratch caches into the batch's (one copy per cache)."""
        assert self._scratch is not None and self._kv is not None
        m = rows.stop - rows.start
        scratch, dscratch = self._scratch
        self._kv[:, :, rows, :, :tb].copy_(scratch[:, :, :m, :, :tb])
        if self._draft_kv is not None and dscratch is not None:
            self._draft_kv[:, :, rows, :, : tb + g].copy_(dscratch[:, :, :m, :, : tb + g])

    rounds_in_flight = ROUNDS_IN_FLIGHT  # DecodeBackend.launch

    def round(self, verify_len: np.ndarray, *, draft: bool = True) -> Proposal:
        """Every live row: verify, commit, draft the next block — one CUDA graph replay, one sync.
        ``draft=False``: a plain decoding step (one position per row, nothing verified) that writes only the
        draft's context (``StaticProgram.draft_context``); its Proposal's drafts are −1."""
        self.launch(verify_len, draft=draft)
        return self.collect()

    @torch.inference_mode()
    def launch(self, verify_len: np.ndarray, *, draft: bool = True) -> None:
        """The first half of :meth:`round`: replay its graph and queue the copy of its outputs, without waiting
        (the host may work meanwhile, without touching this backend, until :meth:`collect`)."""
        st = self._state
        assert st is not None and self._live > 0, "admit() first"
        assert len(self._inflight) < ROUNDS_IN_FLIGHT, "collect() a round in flight first"
        n = self._live
        rows = batch_bucket(n)
        g = st.g
        # the rounds still in flight commit at most G + 1 positions each: the window holds whatever they accept
        window = self._window(int(self._len_host[:n].max()) + len(self._inflight) * (g + 1) + 2 * g + 2)
        sampling = bool((self._temp_host[:n] > 0).any())
        replay = NO_REPLAY if self.replay is None or g == 0 else FORCED_REPLAY if self.replay_forced else REPLAY
        plain = g > 0 and not draft
        width = 1 if plain else g + 1
        if self.verifies_widest and g > 0 and not plain:
            width = round_width(int(np.asarray(verify_len[:n]).clip(0, g).max()), g)
        key = (rows, window, sampling, replay, g, plain, width)
        step = self._rounds.get(key)
        if step is None:
            step = self._rounds[key] = self._round_step(rows, window, sampling, replay, width, plain)
        step.load("verify_len", np.asarray(verify_len, dtype=np.int64), n)
        if self.device.type != "cuda":
            self._inflight.append((step, n, g, self._run(step)["packed"][:n].clone().numpy(), 0.0, 0))
            return
        slot = self._launches % ROUNDS_IN_FLIGHT  # queued rounds of one graph keep their own events and twin
        self._launches += 1
        ev0, ev1, ev2 = step.events[slot]
        h0 = time.perf_counter()
        ev0.record()
        out = self._run(step)["packed"]
        ev1.record()
        h1 = time.perf_counter()
        if not step.host_out:  # the pinned twins of the output, allocated once per graph
            step.host_out = [torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                             for _ in range(ROUNDS_IN_FLIGHT)]
        step.host_out[slot].copy_(out, non_blocking=True)
        ev2.record()
        self.last_host_ms = {"launch": 1e3 * (h1 - h0)}
        self._inflight.append((step, n, g, None, h1, slot))

    def collect(self) -> Proposal:
        """The second half of :meth:`round`: wait for the oldest round in flight (its one host sync) and read it."""
        assert self._inflight, "launch() a round first"
        assert self._admitting is None, "admitted() first: the rounds behind an admission commit its drafts"
        step, n, g, packed, h1, slot = self._inflight.popleft()
        if packed is None:
            ev0, ev1, ev2 = step.events[slot]
            ev2.synchronize()  # the one host sync of the round: its outputs copied (a round queued behind runs on)
            self.last_host_ms["wait"] = 1e3 * (time.perf_counter() - h1)
            self.last_graph_ms = ev0.elapsed_time(ev1)
            packed = step.host_out[slot][:n].numpy().copy()
        ints = packed[:, : g + 2].astype(np.int64)
        self._len_host[:n] += ints[:, 0] + 1
        return Proposal(ints[:, 0], ints[:, 1], ints[:, 2:], packed[:, g + 2 :])

    def set_replay(self, reference: np.ndarray | None, profile: np.ndarray | None, *, forced: bool = False) -> None:
        """Benchmark-only acceptance replay: after drafting, row b's proposals become ``reference[b]`` (its
        target-only greedy continuation, indexed by absolute position), cut where the per-position acceptance
        ``profile`` [G] first fails (a draw per position from the row's replay stream). None turns it off.

        ``forced`` (timing only, greedy): each round accepts exactly the replayed prefix and commits the
        reference, whatever the target's verify says. Plain replay needs the batch's target to reproduce the
        reference bit for bit; a bf16 target at batch 64 is not bit-equal to itself at batch 1, so under load a
        row leaves its reference and acceptance collapses. The forced round runs the same kernels with the
        profile's acceptance; its output is the reference, so it checks nothing about losslessness."""
        self.replay_forced = forced
        if reference is None or profile is None:
            self.replay = None
            return
        st = self._state
        assert st is not None
        ref = torch.zeros(st.rows, reference.shape[1], dtype=torch.int64, device=self.device)
        ref[: reference.shape[0]] = torch.from_numpy(np.asarray(reference, dtype=np.int64)).to(self.device)
        prof = torch.from_numpy(np.asarray(profile, dtype=np.float32)).to(self.device)
        self._replay_source = ref.clone()  # select() compacts the live copy; start() restores it
        if self.replay is not None and self.replay[0].shape == ref.shape:
            self.replay[0].copy_(ref)  # the captured graphs read these tensors
            self.replay[1].copy_(prof)
        else:
            self._rounds = {k: v for k, v in self._rounds.items() if not k[3]}
            self._admits = {k: v for k, v in self._admits.items() if not k[3]}
            if not self._rounds and not self._admits and not self._steps:
                self._pool.renew()
            self.replay = (ref, prof)

    def _verify(self, logits: torch.Tensor, drafts: torch.Tensor, vlen: torch.Tensor, temp: torch.Tensor | None,
                uniforms: torch.Tensor | None, probs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        from dspark_compile.plugins.spec_verify.reference import spec_verify_torch

        spec_verify: Any = spec_verify_torch
        if self.spec_verify == "triton":
            from dspark_compile.plugins.spec_verify.kernel import spec_verify_triton as spec_verify
        if temp is None:
            return spec_verify(logits, drafts, vlen, mode="greedy")
        return spec_verify(logits, drafts, vlen, mode="sampling", draft_probs=probs, temperature=temp,
                           uniforms=uniforms)

    def _round_step(self, rows: int, window: int, sampling: bool, replay: int, width: int, plain: bool) -> _Step:
        """verify → SpecVerify → commit → taps → next anchor → draft → Markov sampling → confidence; the target
        runs ``width`` positions per row (the anchor and the first width − 1 drafts). ``plain``: width 1, and the
        draft writes its context rows only (no block, no proposals)."""
        st = self._state
        assert st is not None and self._kv is not None
        g = st.g
        kv = self._kv[:, :, :rows]
        dkv = self._draft_kv[:, :, :rows] if self._draft_kv is not None else None
        v = st.view(rows)
        tgt = self.target_model
        draft = self.draft_model
        per_call = uniforms_per_call(g)
        probs = st.ensure_probs()[:rows] if sampling and g > 0 else None

        in_kernels = self.fused_bookkeeping  # round_kernels' few launches (the same bits), or torch ops
        taps_in_place = self.program.fused and g > 0 and width == g + 1  # the target writes them into the state

        def fn(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            live = v["live"]
            drafts = v["drafts"][:, : width - 1]
            if in_kernels:
                tokens, vlen = round_kernels.round_inputs(v["anchor"], v["drafts"], inp["verify_len"], live, width)
            else:
                tokens = torch.cat((v["anchor"][:, None], drafts), dim=1)  # [R, width]
                vlen = torch.where(live, inp["verify_len"].clamp(0, width - 1), 0)
            hidden, taps = self.program.target_step(tokens, v["length"], kv, window,
                                                    taps_out=v["taps"] if taps_in_place else None)
            logits = tgt.lm_head(hidden)
            # greedy rounds draw nothing: the uniforms' ~30 elementwise launches only where they are read
            u = _uniforms(v["seed"], v["counter"], per_call) if sampling else None
            pr = probs if probs is not None else (st.probs_like(rows, 0) if sampling else None)
            # Uniform j tests draft j and uniform G draws the next token, whatever the width: a row's stream
            # does not depend on the widths its batch chose.
            uv = None if u is None else u[:, : g + 1] if width == g + 1 else torch.cat(
                (u[:, : width - 1], u[:, g : g + 1]), dim=1)
            acc, nxt = self._verify(logits, drafts, vlen, v["temperature"] if sampling else None, uv,
                                    pr if pr is None else pr[:, : width - 1])
            if replay == FORCED_REPLAY:  # timing only (set_replay)
                acc, nxt = self._forced(v, vlen)
            # commit: the caches already hold the accepted rows (rollback is free); count = the rows committed
            if in_kernels:
                round_kernels.commit(acc, nxt, live, v["length"], v["anchor"], v["counter"], v["count"], per_call)
            else:
                step = torch.where(live, acc + 1, 0)
                v["length"].add_(step)
                v["anchor"].copy_(nxt)
                v["counter"].add_(torch.where(live, per_call, 0))
                v["count"].copy_(step)
            new = None
            if g == 0 or plain:  # no confidences (with drafts, propose's replace a zero fill: one launch less)
                conf = torch.zeros(rows, g if plain else 0, dtype=torch.float32, device=tokens.device)
            if plain:
                assert dkv is not None
                self.program.draft_context(taps, v["count"], v["draft_len"], dkv, window)
            elif g > 0:
                assert draft is not None and dkv is not None
                if not taps_in_place:
                    v["taps"][:, :width].copy_(taps)  # rows >= count are not read (ctx_count)
                dh = self.program.draft_step(nxt, v["taps"], v["count"], v["draft_len"], dkv, window)
                new, conf, p = self.program.propose(dh, nxt, v["temperature"] if sampling else None,
                                                    u[:, g + 1:] if u is not None else None, distributions=sampling,
                                                    probs_out=probs)
                if probs is not None and p.data_ptr() != probs.data_ptr():  # the module's loop: a copy
                    probs.copy_(p)
            # One output, one copy to the host: ids < 2^24 are exact in float32 (checked at construction).
            if in_kernels:
                ref = None
                if replay != NO_REPLAY and g > 0:
                    assert self.replay is not None
                    ref = (v["length"], v["seed"], v["counter"], self.replay[0][:rows], self.replay[1],
                           self.info.vocab_size, REPLAY_KEY)
                return {"packed": round_kernels.finish(acc, nxt, v["count"], v["draft_len"], new, v["drafts"],
                                                       conf, replay=None if plain else ref, plain=plain)}
            if plain or new is not None:
                v["draft_len"].add_(v["count"])
            shown = torch.full_like(v["drafts"], -1) if plain else v["drafts"]
            if new is not None:
                if replay:
                    assert self.replay is not None
                    new = self._replayed(v, new, self.replay[0][:rows])
                v["drafts"].copy_(new)
            packed = torch.cat((acc[:, None], nxt[:, None], shown), dim=1).to(torch.float32)
            return {"packed": torch.cat((packed, conf), dim=1)}

        return _Step(fn, {"verify_len": ((rows,), torch.int64, np.int64, 0)}, self.device,
                     capture=self.graphs, pool=self._pool, state=st)

    def _admit_step(self, kb: int, tb: int, sampling: bool, replay: int, *, capture: bool,
                    kv: Any = None, dkv: torch.Tensor | None = None) -> _Step:
        """Prefill ``kb`` prompts of ``tb`` tokens → the first token (SpecVerify with no drafts draws it) →
        the draft over the prompt's taps → the first block. Writes ``kv``/``dkv`` (default: the scratch
        caches) and nothing else: the caller moves its outputs into the rows, so one graph serves any rows."""
        st = self._state
        assert st is not None
        g = st.g
        slots = self._alloc[1]
        if kv is None:  # the scratch caches: their slots, fewer than the capacity maybe, bound the windows
            assert self._scratch is not None
            scratch, dscratch = self._scratch
            kv, dkv = scratch[:, :, :kb], dscratch[:, :, :kb] if dscratch is not None else None
            slots = scratch.shape[4]
        window, dwin = min(self._window(tb + g + 1), slots), min(self._window(tb + g), slots)
        per_call = uniforms_per_call(g)
        tgt, draft = self.target_model, self.draft_model

        def fn(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            lens, temp, seed = inp["lengths"], inp["temperature"], inp["seed"]
            zero = torch.zeros_like(lens)
            u = _uniforms(seed, zero, per_call) if sampling else None
            hidden, taps = self.program.target_step(inp["ids"], zero, kv.with_count(lens) if hasattr(
                kv, "with_count") else kv, window)  # a ring takes only each prompt's real rows (RingCache)
            logits = tgt.lm_head(hidden[torch.arange(kb, device=lens.device), lens - 1])[:, None]  # [kb, 1, V]
            first = self._verify(logits, zero[:, None][:, :0], zero, temp if sampling else None,
                                 u[:, :1] if u is not None else None, st.probs_like(kb, 0) if sampling else None)[1]
            out = {"first": first}
            if g > 0:
                assert draft is not None and dkv is not None
                dh = self.program.draft_step(first, taps, lens, zero, dkv, dwin)
                drafts, conf, probs = self.program.propose(dh, first, temp if sampling else None,
                                                           u[:, g + 1:] if u is not None else None,
                                                           distributions=sampling)
                if replay:
                    assert self.replay is not None
                    v = {"length": lens, "seed": seed, "counter": torch.full_like(lens, per_call)}
                    drafts = self._replayed(v, drafts, self.replay[0].index_select(0, inp["row"]))
                out.update(drafts=drafts, conf=conf, **({"probs": probs} if sampling else {}))
            return out

        last = st.rows - 1
        return _Step(fn, {"ids": ((kb, tb), torch.int64, np.int64, 0),
                          "lengths": ((kb,), torch.int64, np.int64, 1),  # padding rows: one token
                          "temperature": ((kb,), torch.float32, np.float32, 0.0),
                          "seed": ((kb,), torch.int64, np.int64, 0),
                          "row": ((kb,), torch.int64, np.int64, last)},  # the replay reference's row
                     self.device, capture=capture, pool=self._pool)

    def _forced(self, v: dict[str, torch.Tensor], vlen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forced replay's acceptance: the pending drafts' leading run equal to the reference (the replayed
        prefix), within ``vlen``, and the reference token after it as the next anchor."""
        drafts = v["drafts"]
        rows, g = drafts.shape
        assert self.replay is not None
        right = self._reference_after(v["length"], self.replay[0][:rows], g + 1)  # the drafts' positions and one past
        ok = (drafts == right[:, :g]) & (torch.arange(g, device=drafts.device) < vlen[:, None])
        acc = torch.cumprod(ok.to(torch.int64), dim=1).sum(dim=1)
        return acc, right.gather(1, acc[:, None])[:, 0]

    @staticmethod
    def _reference_after(length: torch.Tensor, ref: torch.Tensor, n: int) -> torch.Tensor:
        """The replay reference ``ref`` (one row per request) at the ``n`` positions after each row's anchor."""
        pos = (length[:, None] + 1 + torch.arange(n, device=ref.device)).clamp(max=ref.shape[1] - 1)
        return ref.gather(1, pos)

    def _replayed(self, v: dict[str, torch.Tensor], drafts: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Proposals overwritten by the reference continuation ``ref`` (the rows' references), wrong from the
        drawn cut on (benchmark only)."""
        assert self.replay is not None
        prof = self.replay[1]
        g = drafts.shape[1]
        right = self._reference_after(v["length"], ref, g)
        ur = _uniforms(v["seed"] ^ REPLAY_KEY, v["counter"], g)
        kept = torch.cumprod((ur < prof[:g]).to(torch.int64), dim=1).bool()
        wrong = (right + 1) % self.info.vocab_size
        return torch.where(kept, right, wrong)

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

    def _verify_step(self, rows: int, t: int, window: int) -> _Step:
        assert self._kv is not None
        kv = self._kv[:, :, :rows]

        def fn(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            tokens = inp["tokens"]
            hidden, taps = self.program.target_step(tokens, inp["cache_len"], kv, window)
            logits = self.target_model.lm_head(hidden)  # SpecVerify reads the model dtype (fp32 upcasts are exact)
            accepted, nxt = self._verify(logits, tokens[:, 1:], inp["verify_len"], None, None, None)
            return {"decision": torch.stack((accepted, nxt), dim=1), "taps": taps.float()}

        return self._step(fn, {"tokens": ((rows, t), torch.int64, np.int64, 0),
                               "cache_len": ((rows,), torch.int64, np.int64, 0),
                               "verify_len": ((rows,), torch.int64, np.int64, 0)}, capture=self.graphs)

    def _draft_step(self, rows: int, width: int, feat: int, window: int) -> _Step:
        assert self._draft_kv is not None and self.draft_model is not None
        kv = self._draft_kv[:, :, :rows]
        draft = self.draft_model

        def fn(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            hidden = self.program.draft_step(inp["anchor"], inp["ctx_taps"], inp["ctx_count"], inp["cache_len"], kv,
                                             window)
            tokens, conf, _ = self.program.propose(hidden, inp["anchor"], None, None, distributions=False)
            return {"tokens": tokens, "confidence": conf}

        return self._step(fn, {"anchor": ((rows,), torch.int64, np.int64, 0),
                               "ctx_taps": ((rows, width, feat), draft.hidden_norm.weight.dtype, np.float32, 0.0),
                               "ctx_count": ((rows,), torch.int64, np.int64, 0),
                               "cache_len": ((rows,), torch.int64, np.int64, 0)}, capture=self.graphs)

    def _fetch(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Device tensors -> NumPy with one wait."""
        return self._fetch_queued(tensors)()

    def _fetch_queued(self, tensors: list[torch.Tensor]) -> Callable[[], list[np.ndarray]]:
        """Device tensors -> NumPy: async copies into pinned memory and an event now; the returned call waits for
        that event alone, so work queued after the copies (rounds behind an admission) runs on."""
        if self.device.type != "cuda":
            got = [t.detach().clone().numpy() for t in tensors]
            return lambda: got
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(hosts, tensors, strict=True):
            h.copy_(t, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def wait() -> list[np.ndarray]:
            copied.synchronize()
            return [h.numpy() for h in hosts]

        return wait
