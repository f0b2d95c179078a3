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
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dspark_compile.errors import DsparkError
from dspark_compile.runtime.backend import DecodeBackend, Proposal
from dspark_compile.runtime.decode import VerifyPolicy

log = logging.getLogger(__name__)


class BatchJob(Protocol):
    spec: Any  # prompt: list[int], max_new_tokens: int, temperature: float, seed: int
    finished: bool

    def deliver(self, tokens: list[int], accepted: int, eos: tuple[int, ...]) -> None: ...

    def end(self, error: str | None = None) -> None: ...


@dataclass
class ContinuousBatcher:
    """Live requests on one backend; :meth:`step` admits new ones and runs one round for all."""

    backend: DecodeBackend
    rows: int
    slots: int
    policy: VerifyPolicy = field(default_factory=VerifyPolicy)
    speculative: bool = True
    on_error: Callable[[str], None] = log.error
    live: list[BatchJob] = field(default_factory=list, init=False)
    _pending: Proposal | None = field(default=None, init=False, repr=False)  # drafts the next round verifies
    _started: bool = field(default=False, init=False, repr=False)

    @property
    def free_rows(self) -> int:
        return self.rows - len(self.live)

    def step(self, incoming: Sequence[BatchJob] = ()) -> None:
        """Admit ``incoming`` (at most :attr:`free_rows`), run one round over every live row, drop finished rows.
        A backend failure ends the live requests with its message and leaves an empty batch."""
        if len(incoming) > self.free_rows:
            raise ValueError(f"{len(incoming)} requests for {self.free_rows} free rows")
        try:
            if not self._started:
                self.backend.start(self.rows, self.slots, speculative=self.speculative)
                self._started = True
            if incoming:
                self._admit(list(incoming))
            self._drop_finished()
            if self.live:
                self._round()
                self._drop_finished()
        except DsparkError as exc:
            self.end_all(exc.one_line())
        except Exception as exc:  # a backend failure must not take the server down with it
            self.on_error(f"dspark: generation failed: {traceback.format_exc()}")
            self.end_all(f"internal error in the DSpark orchestrator: {type(exc).__name__}: {exc}")

    def end_all(self, error: str) -> None:
        """End every live request with ``error``; the next step starts from fresh caches."""
        for job in self.live:
            job.end(error)
        self.live, self._pending, self._started = [], None, False

    def _admit(self, jobs: list[BatchJob]) -> None:
        lengths = np.array([len(j.spec.prompt) for j in jobs], dtype=np.int64)
        ids = np.zeros((len(jobs), int(lengths.max())), dtype=np.int64)
        for i, j in enumerate(jobs):
            ids[i, : len(j.spec.prompt)] = j.spec.prompt
        first = self.backend.admit(ids, lengths, np.array([j.spec.temperature for j in jobs], dtype=np.float32),
                                   np.array([j.spec.seed for j in jobs], dtype=np.int64))
        eos = self.backend.info.eos_token_ids
        for i, j in enumerate(jobs):
            j.deliver([int(first.next_token[i])], 1, eos)
        self.live += jobs
        self._pending = first if self._pending is None else Proposal(
            *(np.concatenate((a, b)) for a, b in zip(_fields(self._pending), _fields(first), strict=True)))

    def _round(self) -> None:
        assert self._pending is not None
        pending = self._pending
        g = pending.drafts.shape[1]
        verify_len = (self.policy.lengths(pending.confidence_logits, g) if g
                      else np.zeros(len(self.live), dtype=np.int64))
        out = self.backend.round(verify_len)
        eos = self.backend.info.eos_token_ids
        for i, job in enumerate(self.live):
            j = int(out.accepted[i])
            job.deliver([int(t) for t in pending.drafts[i, :j]] + [int(out.next_token[i])], j + 1, eos)
        self._pending = out

    def _drop_finished(self) -> None:
        keep = [i for i, job in enumerate(self.live) if not job.finished]
        if len(keep) == len(self.live):
            return
        self.live = [self.live[i] for i in keep]
        if not keep:  # nothing to compact: the next admit starts from an empty batch
            self.backend.select(np.zeros(0, dtype=np.int64))
            self._pending = None
            return
        rows = np.array(keep, dtype=np.int64)
        self.backend.select(rows)
        assert self._pending is not None
        self._pending = Proposal(*(a[rows] for a in _fields(self._pending)))


def _fields(p: Proposal) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return p.accepted, p.next_token, p.drafts, p.confidence_logits
