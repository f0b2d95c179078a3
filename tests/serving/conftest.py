"""One build of the shipped trained tiny pair (ONNX graphs + Triton repository) for every serving test that
starts a real server: building it takes minutes on 2 CPU cores, so the session builds it once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROWS = 8  # max_batch of the build: the orchestrator's rows
MAX_CONTEXT = 256  # cache slots per row


@pytest.fixture(scope="session")
def trained_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime", reason="the orchestrator runs the ONNX graphs with onnxruntime")
    from dspark_compile import api
    from dspark_compile.examples import trained_tiny_pair

    target, draft = trained_tiny_pair()
    out = tmp_path_factory.mktemp("serving") / "build"
    api.build(target=target, draft=draft, out=out, targets="onnx,triton", max_context=MAX_CONTEXT, max_batch=ROWS,
              progress=False)
    return out


class GreedyJob:
    """A batcher job (``serving.batcher.BatchJob``) that records its tokens: greedy, ends at max_new or EOS."""

    def __init__(self, prompt: list[int], max_new: int) -> None:
        self.spec = type("Spec", (), {"prompt": prompt, "max_new_tokens": max_new, "temperature": 0.0, "seed": 1})
        self.tokens: list[int] = []
        self.finished = False

    def deliver(self, tokens: list[int], accepted: int, eos: tuple[int, ...]) -> None:
        self.tokens += tokens[: self.spec.max_new_tokens - len(self.tokens)]
        if len(self.tokens) >= self.spec.max_new_tokens or (tokens and tokens[-1] in eos):
            self.finished = True

    def end(self, error: str | None = None) -> None:
        assert error is None
        self.finished = True


def drive_greedy(batcher: Any, prompts: list[list[int]], max_new: int, max_steps: int = 500) -> list[GreedyJob]:
    """Queue one greedy job per prompt and step ``batcher`` until all have ended (bounded); the jobs."""
    jobs = [GreedyJob(p, max_new) for p in prompts]
    queue = list(jobs)
    for _ in range(max_steps):
        if all(j.finished for j in jobs):
            return jobs
        take, queue = queue[: batcher.free_rows], queue[batcher.free_rows:]
        batcher.step(take)
    raise AssertionError(f"the batcher did not finish {len(jobs)} jobs in {max_steps} steps")


@pytest.fixture(scope="session")
def drive() -> Callable[..., list[GreedyJob]]:
    """``drive(batcher, prompts, max_new) -> jobs``: see :func:`drive_greedy`."""
    return drive_greedy
