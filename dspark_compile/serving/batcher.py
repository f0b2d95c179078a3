"""Continuous (in-flight) batching over :class:`~dspark_compile.runtime.backend.DecodeBackend`.

Requests join the running batch between rounds (``admit`` prefills them into new rows) and leave it as soon as
they finish, fail to stream or are cancelled (``select`` compacts the rows), so a long request never holds the
queue and a stop string or a disconnect frees its row at once. Greedy and sampling requests share rounds: every
row draws from its own counter-based random stream keyed by its seed, so a request's tokens depend only on its
prompt, temperature and seed. Each row's cache holds ``slots`` positions, the bound every request was checked
against when it was accepted, so admission only waits for a free row and never fails a running request.

Transport-independent: a job is anything with ``spec`` (prompt, max_new_tokens, temperature, seed),
``deliver(tokens, accepted, eos)``, ``end(error)`` and ``finished`` — the Triton orchestrator's ``Job``.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dspark_compile.errors import DsparkError
from dspark_compile.runtime.backend import DecodeBackend, Proposal
from dspark_compile.runtime.decode import VerifyPolicy, round_kwargs, verify_shape

log = logging.getLogger(__name__)
STATS_ENV = "DSPARK_STATS_FILE"  # a path: the Triton orchestrator keeps its stats there (tests, benchmarks)


class BatchJob(Protocol):
    spec: Any  # prompt: list[int], max_new_tokens: int, temperature: float, seed: int
    finished: bool

    def deliver(self, tokens: list[int], accepted: int, eos: tuple[int, ...]) -> None: ...

    def end(self, error: str | None = None) -> None: ...


@dataclass
class ContinuousBatcher:
    """Live requests on one backend; :meth:`step` admits new ones and runs one round for all.

    Rounds are pipelined with their delivery: a step launches this round on the device (``launch``, where the
    backend has it), then delivers the previous round's tokens (detokenizing, streaming: the host's per-row
    work) while the device computes, then collects. Which rows a round's tokens end by length or EOS is known
    from the numbers alone, so those rows leave before the next launch; a row that a stop string or a cancel
    ends at delivery runs one more round, whose tokens are dropped (it stays within its cache: it had not
    reached its length).
    """

    backend: DecodeBackend
    rows: int
    slots: int
    policy: VerifyPolicy = field(default_factory=VerifyPolicy)
    speculative: bool = True
    on_error: Callable[[str], None] = log.error
    live: list[BatchJob] = field(default_factory=list, init=False)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("rounds", "row_rounds", "verified_drafts", "accepted_drafts", "target_only_rounds", "plain_rounds",
         "admitted"), 0),
        init=False)
    # Host seconds per phase of step() (admit: prefill and first tokens; collect: the wait for the device), so a
    # serving run shows where a round's time goes.
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("drop", "admit", "launch", "deliver", "collect"), 0.0), init=False)
    _pending: Proposal | None = field(default=None, init=False, repr=False)  # drafts the next round verifies
    _budget: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), init=False, repr=False)
    _undelivered: tuple[list[BatchJob], list[list[int]], np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False)  # the last round: its jobs, tokens, accepted, rows it ends
    _started: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.policy.check_backend(self.backend)

    @property
    def free_rows(self) -> int:
        """Rows the next step can admit into (those the undelivered round ends are free by then)."""
        ending = int(self._undelivered[3].sum()) if self._undelivered is not None else 0
        return self.rows - len(self.live) + ending

    @property
    def busy(self) -> bool:
        """Rows are live or a round's tokens still wait for delivery: step again without waiting for work."""
        return bool(self.live) or self._undelivered is not None

    def step(self, incoming: Sequence[BatchJob] = ()) -> None:
        """Drop ended rows, admit ``incoming`` (at most :attr:`free_rows`), launch one round over every live row,
        deliver the previous round meanwhile, collect this one. A backend failure ends the live requests (and
        those of the undelivered round) with its message and leaves an empty batch."""
        if len(incoming) > self.free_rows:
            raise ValueError(f"{len(incoming)} requests for {self.free_rows} free rows")
        try:
            if not self._started:
                self.backend.start(self.rows, self.slots, speculative=self.speculative)
                self._started = True
            ending = self._undelivered[3] if self._undelivered is not None else None
            t0 = time.perf_counter()
            self._drop_finished(ending)
            t1 = time.perf_counter()
            if incoming:
                self._admit(list(incoming))
                self._drop_finished(None)
            t2 = time.perf_counter()
            launched = self._launch() if self.live else None
            t3 = time.perf_counter()
            self._deliver()
            t4 = time.perf_counter()
            if launched is not None:
                self._collect(*launched)
            t5 = time.perf_counter()
            for name, a, b in (("drop", t0, t1), ("admit", t1, t2), ("launch", t2, t3), ("deliver", t3, t4),
                               ("collect", t4, t5)):
                self.seconds[name] += b - a
        except DsparkError as exc:
            self.end_all(exc.one_line())
        except Exception as exc:  # a backend failure must not take the server down with it
            self.on_error(f"dspark: generation failed: {traceback.format_exc()}")
            self.end_all(f"internal error in the DSpark orchestrator: {type(exc).__name__}: {exc}")

    def end_all(self, error: str) -> None:
        """End every live request (and any whose last tokens were not delivered) with ``error``; the next step
        starts from fresh caches."""
        for job in [*(self._undelivered[0] if self._undelivered is not None else ()), *self.live]:
            job.end(error)
        self.live, self._pending, self._undelivered, self._started = [], None, None, False
        self._budget = np.zeros(0, dtype=np.int64)

    def _admit(self, jobs: list[BatchJob]) -> None:
        lengths = np.array([len(j.spec.prompt) for j in jobs], dtype=np.int64)
        ids = np.zeros((len(jobs), int(lengths.max())), dtype=np.int64)
        for i, j in enumerate(jobs):
            ids[i, : len(j.spec.prompt)] = j.spec.prompt
        self.counters["admitted"] += len(jobs)
        first = self.backend.admit(ids, lengths, np.array([j.spec.temperature for j in jobs], dtype=np.float32),
                                   np.array([j.spec.seed for j in jobs], dtype=np.int64))
        eos = self.backend.info.eos_token_ids
        for i, j in enumerate(jobs):
            j.deliver([int(first.next_token[i])], 1, eos)
        self.live += jobs
        self._budget = np.concatenate((self._budget, [j.spec.max_new_tokens - 1 for j in jobs])).astype(np.int64)
        self._pending = first if self._pending is None else Proposal(
            *(np.concatenate((a, b)) for a, b in zip(_fields(self._pending), _fields(first), strict=True)))

    def _launch(self) -> tuple[Proposal, np.ndarray, Proposal | None]:
        assert self._pending is not None
        pending = self._pending
        verify_len, draft = self.policy.plan(pending, **verify_shape(self.backend))
        self.counters["plain_rounds"] += int(not draft)
        kw = round_kwargs(draft)
        launch = getattr(self.backend, "launch", None)
        if launch is None:
            return pending, verify_len, self.backend.round(verify_len, **kw)
        launch(verify_len, **kw)
        return pending, verify_len, None

    def _collect(self, pending: Proposal, verify_len: np.ndarray, out: Proposal | None) -> None:
        if out is None:
            out = self.backend.collect()  # type: ignore[attr-defined]
        c = self.counters
        c["rounds"] += 1
        c["row_rounds"] += len(self.live)
        c["verified_drafts"] += int(verify_len.sum())
        c["accepted_drafts"] += int(out.accepted.sum())
        c["target_only_rounds"] += int(not verify_len.any())
        accepted = out.accepted.astype(np.int64)
        tokens = [[*pending.drafts[i, :j].tolist(), int(out.next_token[i])] for i, j in enumerate(accepted.tolist())]
        # What each job's deliver() will conclude from these tokens: its length reached, or its last one EOS.
        count = accepted + 1
        eos = set(self.backend.info.eos_token_ids)
        last = [t[min(int(n), len(t)) - 1] if n > 0 else -1 for t, n in zip(tokens, self._budget.tolist(),
                                                                             strict=True)]
        ends = (count >= self._budget) | np.array([t in eos for t in last], dtype=bool)
        self._budget = np.maximum(self._budget - count, 0)
        self._undelivered = (list(self.live), tokens, accepted, ends)
        self._pending = out

    def _deliver(self) -> None:
        if self._undelivered is None:
            return
        jobs, tokens, accepted, ends = self._undelivered
        self._undelivered = None
        eos = self.backend.info.eos_token_ids
        for job, toks, j, end in zip(jobs, tokens, accepted.tolist(), ends.tolist(), strict=True):
            job.deliver(toks, j + 1, eos)
            if end and not job.finished:  # the batcher has dropped its row: a job must not outlive it
                job.end()

    def _drop_finished(self, ending: np.ndarray | None) -> None:
        keep = [i for i, job in enumerate(self.live) if not job.finished and not (ending is not None and ending[i])]
        if len(keep) == len(self.live):
            return
        self.live = [self.live[i] for i in keep]
        rows = np.array(keep, dtype=np.int64)
        self._budget = self._budget[rows]
        if not keep:  # nothing to compact: the next admit starts from an empty batch
            self.backend.select(np.zeros(0, dtype=np.int64))
            self._pending = None
            return
        self.backend.select(rows)
        assert self._pending is not None
        self._pending = Proposal(*(a[rows] for a in _fields(self._pending)))


def _fields(p: Proposal) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return p.accepted, p.next_token, p.drafts, p.confidence_logits
