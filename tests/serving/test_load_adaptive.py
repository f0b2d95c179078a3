"""Load-adaptive verification: the scheduler decides every round over the whole live batch from the build's SPS
profile; for a backend whose verify cost grows with ℓ, a cost that grows with every token (SPS(B) = k/B, a
compute-bound or loaded device) makes it verify nothing (target-only rounds) and a flat one every draft; a backend
whose round verifies every row's whole block whatever ℓ is (``verifies_whole_block``) gets every draft verified,
since a shorter ℓ would save no time. The orchestrator's default (``verify auto``) is the scheduler whenever the
build has been profiled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dspark_compile.examples import trained_tiny_pair
from dspark_compile.runtime.decode import GenerationParams, VerifyPolicy, generate
from dspark_compile.runtime.scheduler import round_width, schedule
from dspark_compile.serving.batcher import ContinuousBatcher

G = 7
MAX_TOKENS = 8 * (G + 1)
EXPENSIVE = {b: 1000.0 / b for b in range(1, MAX_TOKENS + 1)}  # every verified token costs as much as one step
FLAT = dict.fromkeys(range(1, MAX_TOKENS + 1), 100.0)  # memory-bound: verifying more tokens is free


def test_expensive_curve_verifies_nothing_flat_curve_everything() -> None:
    rng = np.random.default_rng(0)
    for rows in (1, 4, 8):
        conf = rng.uniform(0.5, 0.999, size=(rows, G)).tolist()
        assert schedule(conf, EXPENSIVE) == [0] * rows  # (R + a) / (R + 1) < 1 for every survival a < 1
        assert schedule(conf, FLAT) == [G] * rows


def test_the_decision_is_over_the_whole_batch() -> None:
    """Flat up to 6 tokens, then k/B: the 2 best prefixes of the whole batch are admitted, wherever they are."""
    sps = {b: 100.0 if b <= 6 else 600.0 / b for b in range(1, MAX_TOKENS + 1)}
    conf = [[0.9, 0.9, 0.1, 0, 0, 0, 0], [0.95, 0.2, 0, 0, 0, 0, 0], [0.3] * G, [0.1] * G]
    # Survivals: r0: .9 .81 .081; r1: .95 .19; r2: .3 .09; r3: .1 — B = 4 rows + 2 admissions = 6.
    assert schedule(conf, sps) == [1, 1, 0, 0]


@pytest.fixture(scope="module")
def backend() -> Any:
    from dspark_compile.runtime.torch_backend import TorchBackend

    target, draft = trained_tiny_pair()
    return TorchBackend.from_pair(target, draft)


class _CostGrowsWithL:
    """The same backend declaring a verify cost that grows with ℓ (``verifies_whole_block`` False)."""

    verifies_whole_block = False

    def __init__(self, inner: Any) -> None:
        self.inner, self.info = inner, inner.info

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_whole_block_widths_make_every_draft_worth_verifying() -> None:
    conf = np.random.default_rng(1).uniform(0.05, 0.999, size=(8, G)).tolist()
    assert schedule(conf, EXPENSIVE) == [0] * 8
    assert schedule(conf, EXPENSIVE, verify_width=8 * (G + 1)) == [G] * 8
    assert schedule([[0.9, 0.0, 0.5]], EXPENSIVE, verify_width=4) == [1]  # survival 0: nothing to gain


def test_narrow_rounds_take_the_width_the_curve_pays_for() -> None:
    """A round of R rows × round_width(max ℓ) positions (CudaGraphBackend's ``narrow_rounds``): once a width is
    paid for, every draft below it is free. Flat up to 256 tokens, then compute-bound: 64 rows verify 3 drafts
    each (width 4), one row all G; an expensive curve none; a row takes at most what it drafted."""
    knee = {b: 100.0 if b <= 256 else 25600.0 / b for b in range(1, 64 * (G + 1) + 1)}
    conf = np.random.default_rng(2).uniform(0.6, 0.99, size=(64, G))
    assert schedule(conf, knee, widest=G) == [3] * 64
    assert schedule(conf.tolist(), knee, widest=G) == [3] * 64
    assert schedule(conf[:1], knee, widest=G) == [G]
    assert schedule(conf[:8], EXPENSIVE, widest=G) == [0] * 8
    assert schedule([[0.9] * G, [0.9, 0.9], []], FLAT, widest=G) == [G, 2, 0]
    assert [round_width(ell, G) for ell in range(G + 1)] == [1, 2, 4, 4, 8, 8, 8, 8]


class _Widest(_CostGrowsWithL):
    """The same backend declaring narrow rounds (cost R · round_width(max ℓ))."""

    verifies_widest = True


def test_batcher_narrow_rounds_follow_the_width_and_stay_lossless(backend: Any, drive: Any) -> None:
    knee = {b: 100.0 if b <= 8 else 800.0 / b for b in range(1, MAX_TOKENS + 1)}  # R·width <= 8 pays
    rng = np.random.default_rng(6)
    prompts = [rng.integers(1, 500, size=int(rng.integers(4, 16))).tolist() for _ in range(6)]
    batcher = ContinuousBatcher(_Widest(backend), rows=4, slots=128, policy=VerifyPolicy("schedule", sps=knee))
    jobs = drive(batcher, prompts, 20)
    target_only = generate(backend, prompts, GenerationParams(max_new_tokens=20), speculative=False)
    assert [j.tokens for j in jobs] == [r.tokens for r in target_only]
    c = batcher.counters
    # 4 live rows verify 1 draft each (width 2), 2 rows 3 (width 4), 1 row all G: fewer than every draft
    assert c["row_rounds"] < c["verified_drafts"] < G * c["row_rounds"]


@pytest.mark.parametrize(("sps", "whole_block", "verifies"),
                         [(EXPENSIVE, False, False), (FLAT, False, True), (EXPENSIVE, True, True)])
def test_batcher_rounds_follow_the_curve_and_stay_lossless(backend: Any, drive: Any, sps: dict[int, float],
                                                           whole_block: bool, verifies: bool) -> None:
    assert backend.verifies_whole_block  # the graph executor's round verifies G+1 positions per row
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 500, size=int(rng.integers(4, 16))).tolist() for _ in range(6)]
    batcher = ContinuousBatcher(backend if whole_block else _CostGrowsWithL(backend), rows=4, slots=128,
                                policy=VerifyPolicy("schedule", sps=sps))
    jobs = drive(batcher, prompts, 20)
    target_only = generate(backend, prompts, GenerationParams(max_new_tokens=20), speculative=False)
    assert [j.tokens for j in jobs] == [r.tokens for r in target_only]
    c = batcher.counters
    assert c["rounds"] > 0
    if verifies:
        assert c["verified_drafts"] > 0 and c["accepted_drafts"] > 0 and c["target_only_rounds"] == 0
        if whole_block:
            assert c["verified_drafts"] == G * c["row_rounds"]
    else:
        assert c["verified_drafts"] == 0 and c["target_only_rounds"] == c["rounds"]


def test_the_orchestrator_default_is_the_scheduler_when_profiled(tmp_path: Path) -> None:
    assert VerifyPolicy.for_build(tmp_path, "auto", has_confidence=True).kind == "fixed"
    (tmp_path / "sps_profile.json").write_text(json.dumps({"batch_sizes": [1, 8], "steps_per_second": [9.0, 3.0]}))
    policy = VerifyPolicy.for_build(tmp_path, "auto", has_confidence=True)
    assert policy.kind == "schedule" and policy.sps == {1: 9.0, 8: 3.0}
    assert VerifyPolicy.for_build(tmp_path, "auto", has_confidence=False).kind == "fixed"
