"""Continuous batching: 32 staggered streams, greedy and sampling mixed, each identical to its solo run; rows are
freed at once by a finished, failed or cancelled stream; admission waits for a free row; a backend failure ends
only the live requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from dspark_compile.examples import trained_tiny_pair
from dspark_compile.runtime.decode import GenerationParams, generate
from dspark_compile.serving.batcher import ContinuousBatcher

SLOTS = 128
ROWS = 8


@dataclass(frozen=True)
class Spec:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    seed: int


@dataclass
class Job:
    """What the orchestrator's Job does: cut at max_new_tokens, end at EOS; ``fail_after`` fakes a disconnect."""

    spec: Spec
    fail_after: int | None = None
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    finished: bool = False
    ended: int = 0

    def deliver(self, tokens: list[int], accepted: int, eos: tuple[int, ...]) -> None:
        if self.finished:
            return
        if self.fail_after is not None and len(self.tokens) >= self.fail_after:
            self.end("client went away")
            return
        tokens = tokens[: self.spec.max_new_tokens - len(self.tokens)]
        self.tokens += tokens
        if len(self.tokens) >= self.spec.max_new_tokens or (tokens and tokens[-1] in eos):
            self.end()

    def end(self, error: str | None = None) -> None:
        if not self.finished:
            self.finished, self.error = True, error
            self.ended += 1


@pytest.fixture(scope="module")
def backend() -> Any:
    from dspark_compile.runtime.torch_backend import TorchBackend

    target, draft = trained_tiny_pair()
    return TorchBackend.from_pair(target, draft)


def _specs(n: int) -> list[Spec]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        prompt = rng.integers(1, 500, size=int(rng.integers(3, 20))).tolist()
        out.append(Spec(prompt, int(rng.integers(4, 28)), 0.0 if i % 2 == 0 else 0.8, 1000 + i))
    return out


def _solo(backend: Any, spec: Spec) -> list[int]:
    params = GenerationParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature)
    return generate(backend, [spec.prompt], params, seeds=[spec.seed])[0].tokens


def _drive(batcher: ContinuousBatcher, jobs: list[Job], arrivals: list[int], max_steps: int = 2000) -> int:
    """Step until every job has ended; job i joins the queue at step arrivals[i]; returns the steps taken."""
    queue: list[Job] = []
    step = 0
    while not all(j.finished for j in jobs):
        assert step < max_steps, "the batcher did not finish"
        queue += [j for j, a in zip(jobs, arrivals, strict=True) if a == step]
        take, queue = queue[: batcher.free_rows], queue[batcher.free_rows:]
        batcher.step(take)
        assert len(batcher.live) <= ROWS
        step += 1
    return step


def test_32_staggered_streams_equal_their_solo_runs(backend: Any) -> None:
    specs = _specs(32)
    jobs = [Job(s) for s in specs]
    batcher = ContinuousBatcher(backend, rows=ROWS, slots=SLOTS)
    _drive(batcher, jobs, arrivals=[i // 2 for i in range(32)])  # two new requests per round
    solo = [_solo(backend, s) for s in specs]
    for spec, job, want in zip(specs, jobs, solo, strict=True):
        assert job.error is None and job.ended == 1
        assert job.tokens == want, (spec, job.tokens, want)
    assert any(s.temperature > 0 for s in specs) and any(s.temperature == 0 for s in specs)


def test_failed_stream_frees_its_row_and_others_are_intact(backend: Any) -> None:
    specs = _specs(6)
    jobs = [Job(s, fail_after=2 if i == 1 else None) for i, s in enumerate(specs)]
    batcher = ContinuousBatcher(backend, rows=2, slots=SLOTS)
    queue = list(jobs)
    freed_at = None
    for step in range(500):
        if all(j.finished for j in jobs):
            break
        take, queue = queue[: batcher.free_rows], queue[batcher.free_rows:]
        batcher.step(take)
        if freed_at is not None and step == freed_at + 1:
            assert jobs[1] not in batcher.live  # dropped by the next step, before its round is launched
        if jobs[1].finished and freed_at is None:
            freed_at = step
    assert jobs[1].error == "client went away" and freed_at is not None
    assert 2 <= len(jobs[1].tokens) < specs[1].max_new_tokens
    assert jobs[1].tokens == _solo(backend, specs[1])[: len(jobs[1].tokens)]  # what it got before it went away
    for i, (spec, job) in enumerate(zip(specs, jobs, strict=True)):
        if i != 1:
            assert job.error is None and job.tokens == _solo(backend, spec)


class Flaky:
    """Wraps a backend; its third round raises, like an engine running out of memory."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.info, self.rounds = inner, inner.info, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def round(self, verify_len: np.ndarray) -> Any:
        self.rounds += 1
        if self.rounds == 3:
            raise RuntimeError("CUDA out of memory")
        return self.inner.round(verify_len)


def test_backend_failure_ends_live_requests_and_serving_goes_on(backend: Any) -> None:
    specs = [Spec([5, 6, 7], 20, 0.0, 1), Spec([8, 9], 20, 0.0, 2), Spec([10, 11, 12], 6, 0.8, 3)]
    batcher = ContinuousBatcher(Flaky(backend), rows=2, slots=SLOTS, on_error=lambda msg: None)
    first = [Job(specs[0]), Job(specs[1])]
    batcher.step(first)
    batcher.step()
    batcher.step()  # the failing round
    assert all(j.finished and "CUDA out of memory" in (j.error or "") for j in first)
    assert batcher.live == []
    later = Job(specs[2])
    _drive(batcher, [later], arrivals=[0])
    assert later.error is None and later.tokens == _solo(backend, specs[2])


class Pipelined:
    """Wraps a backend with launch/collect (the CUDA-graph backend's split round) and logs the calls."""

    def __init__(self, inner: Any, log: list[str]) -> None:
        self.inner, self.info, self.log = inner, inner.info, log
        self.verifies_whole_block = inner.verifies_whole_block
        self._out: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def launch(self, verify_len: np.ndarray) -> None:
        assert self._out is None
        self.log.append("launch")
        self._out = self.inner.round(verify_len)

    def collect(self) -> Any:
        self.log.append("collect")
        out, self._out = self._out, None
        return out


class LoggedJob(Job):
    def __init__(self, spec: Spec, log: list[str]) -> None:
        super().__init__(spec)
        self.log = log
        self.late = 0  # deliveries after the job ended: a round its row should not have run

    def deliver(self, tokens: list[int], accepted: int, eos: tuple[int, ...]) -> None:
        self.log.append("deliver")
        self.late += self.finished
        super().deliver(tokens, accepted, eos)


def test_rounds_deliver_the_previous_round_while_the_device_runs(backend: Any) -> None:
    """launch -> the previous round's deliveries -> collect, every round; tokens as without the pipeline, and
    every row whose length the tokens reach is out of the batch before the next launch."""
    specs = _specs(12)
    log: list[str] = []
    batcher = ContinuousBatcher(Pipelined(backend, log), rows=4, slots=SLOTS)
    jobs = [LoggedJob(s, log) for s in specs]
    steps = _drive(batcher, jobs, arrivals=[i // 3 for i in range(12)])
    for spec, job in zip(specs, jobs, strict=True):
        assert job.error is None and job.ended == 1 and job.tokens == _solo(backend, spec)
        assert job.late == 0  # ended by its length or EOS: its row left before the next launch
    calls = "".join("L" if e == "launch" else "C" if e == "collect" else "d" for e in log)
    assert calls.count("L") == calls.count("C") == batcher.counters["rounds"] > 10
    assert calls.count("LC") == 1  # only the first round has no earlier round to deliver while it runs
    assert not batcher.busy and batcher.live == [] and steps > 0


def test_rows_over_draft_rows_decode_plainly_and_every_stream_equals_its_solo_run(backend: Any) -> None:
    """VerifyPolicy(draft_rows=3) on the CUDA-graph backend (CPU, eager) and on the graph executor: 16 greedy
    streams joining two a round into 8 rows. Rounds with more than 3 live rows are plain steps (one token a row);
    the rest speculate; rows join with their admission's drafts and leave. Every stream equals its solo target
    greedy run. A backend without plain rounds refuses the policy when the batcher is made."""
    from dspark_compile.errors import UsageError
    from dspark_compile.program import build_program
    from dspark_compile.runtime.decode import VerifyPolicy
    from dspark_compile.targets.torch import CudaGraphBackend

    prog = build_program(*trained_tiny_pair())
    specs = [Spec(s.prompt, s.max_new_tokens, 0.0, s.seed) for s in _specs(16)]
    solo = [_solo(backend, spec) for spec in specs]
    for be in (CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids), backend):
        jobs = [Job(s) for s in specs]
        batcher = ContinuousBatcher(be, rows=ROWS, slots=SLOTS, policy=VerifyPolicy(draft_rows=3))
        _drive(batcher, jobs, arrivals=[i // 2 for i in range(16)])
        for spec, job, want in zip(specs, jobs, solo, strict=True):
            assert job.error is None and job.tokens == want, (type(be).__name__, spec)
        c = batcher.counters
        assert 0 < c["plain_rounds"] < c["rounds"] and c["accepted_drafts"] > 0, c
    with pytest.raises(UsageError, match="takes no plain rounds"):
        ContinuousBatcher(object(), rows=ROWS, slots=SLOTS, policy=VerifyPolicy(draft_rows=3))
