"""Verify-length policies against hand-computed cases and a literal transcription of Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest

from dspark_compile.errors import UsageError
from dspark_compile.runtime.scheduler import (
    SpsCurve,
    fixed_lengths,
    schedule,
    schedule_smoothed,
    threshold_lengths,
)

# SPS 100 up to 4 tokens, 80 from 5 to 8, 40 from 9 on: a staircase like kernel tiles of 4 tokens.
STAIRCASE = {1: 100.0, 4: 100.0, 5: 80.0, 8: 80.0, 9: 40.0, 64: 40.0}


def algorithm_1(confidences: list[list[float]], sps: dict[int, float]) -> list[int]:
    """The paper's pseudo-code, one admission at a time, as an independent reference."""
    curve = SpsCurve.from_mapping(sps)
    cands = []
    for r, row in enumerate(confidences):
        a = 1.0
        for j, c in enumerate(row, start=1):
            a *= c
            cands.append((-a, r, j))
    cands.sort()
    lengths = [0] * len(confidences)
    batch = tau = float(len(confidences))
    best = tau * float(curve(batch))
    for neg_a, r, j in cands:
        theta = (tau - neg_a) * float(curve(batch + 1))
        if not theta > best:
            break
        assert lengths[r] == j - 1
        lengths[r], batch, tau, best = j, batch + 1, tau - neg_a, theta
    return lengths


def test_sps_curve_interpolates_linearly_and_holds_the_ends() -> None:
    curve = SpsCurve.from_mapping({10: 60.0, 2: 100.0})
    assert curve.batch_sizes == (2, 10)
    np.testing.assert_allclose(curve(np.array([1, 2, 3.5, 6, 10, 500])), [100, 100, 92.5, 80, 60, 60])
    assert SpsCurve.from_mapping(curve) is curve


@pytest.mark.parametrize(
    "sps",
    [{}, {0: 10.0}, {4: 0.0}, {4: float("nan")}, {"x": 1.0}],
)
def test_sps_curve_rejects_bad_tables(sps: dict) -> None:
    with pytest.raises(UsageError):
        SpsCurve.from_mapping(sps)


def test_flat_curve_admits_every_prefix_with_positive_survival() -> None:
    # a: request 0 → 0.9, 0.45, 0 ; request 1 → 0.8, 0 ; request 2 → 1e-6
    conf = [[0.9, 0.5, 0.0, 0.7], [0.8, 0.0], [1e-6]]
    assert schedule(conf, {1: 10.0}) == [2, 1, 1]
    assert schedule_smoothed(conf, {1: 10.0}) == [2, 1, 1]


def test_inverse_curve_admits_nothing() -> None:
    # SPS(B) = k/B: Θ = τ·k/B and every admission adds 1 to B but at most 1 to τ ≥ B.
    inverse = {b: 120.0 / b for b in range(1, 65)}
    conf = [[1.0, 1.0, 0.99], [0.999], [1.0] * 7]
    assert schedule(conf, inverse) == [0, 0, 0]
    assert schedule_smoothed(conf, inverse) == [0, 0, 0]


def test_linear_decline_hand_computed() -> None:
    # SPS(B) = 100 − 5(B − 2). Order: (0,1) .9, (0,2) .72, (1,1) .6, (0,3) .36, (1,2) .3
    # Θ: 2·100 = 200 → 2.9·95 = 275.5 → 3.62·90 = 325.8 → 4.22·85 = 358.7 → 4.58·80 = 366.4
    #    → 4.88·75 = 366.0 (no gain: stop).
    conf = [[0.9, 0.8, 0.5], [0.6, 0.5]]
    assert schedule(conf, {2: 100.0, 10: 60.0}) == [3, 1]


def test_ties_go_to_lower_request_then_lower_position() -> None:
    one_admission = {1: 10.0, 3: 10.0, 4: 1.0}  # Θ: 2·10 → 2.5·10 → 3·1
    assert schedule([[0.5], [0.5]], one_admission) == [1, 0]
    # Equal survival inside a request: prefixes are admitted in position order (Θ 10 → 20 → 30 → 4).
    assert schedule([[1.0, 1.0, 1.0]], one_admission) == [2]


def test_staircase_plain_stops_at_the_step_smoothed_fills_the_tile() -> None:
    # Order alternates (0,j), (1,j) with a = .9, .81, .729, .6561.
    # Θ after m admissions (B = 2 + m): 200, 290, 380, 368.8 (B=5 crosses the step), 433.6, 491.92,
    # 550.24 (B=8, ℓ = [3, 3]), 301.36 (B=9 crosses the next step), 327.61.
    conf = [[0.9] * 4, [0.9] * 4]
    assert schedule(conf, STAIRCASE) == [1, 1]
    assert schedule_smoothed(conf, STAIRCASE) == [3, 3]
    assert schedule_smoothed(conf, STAIRCASE, lookahead=2) == [3, 3]
    assert schedule_smoothed(conf, STAIRCASE, lookahead=1) == [1, 1]


def test_ragged_and_empty_requests() -> None:
    assert schedule([[0.9], [], [0.8, 0.7]], {1: 10.0}) == [1, 0, 2]
    assert schedule([], {1: 10.0}) == []
    assert schedule_smoothed([[], []], STAIRCASE) == [0, 0]


@pytest.mark.parametrize("bad", [[[1.2]], [[-0.1]], [[0.5, float("nan")]]])
def test_rejects_values_that_are_not_probabilities(bad: list[list[float]]) -> None:
    with pytest.raises(UsageError, match="confidences"):
        schedule(bad, {1: 10.0})


def test_rejects_an_empty_lookahead() -> None:
    with pytest.raises(UsageError, match="lookahead"):
        schedule_smoothed([[0.5]], {1: 10.0}, lookahead=0)


def test_matches_literal_algorithm_1_on_random_rounds() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        n_req = int(rng.integers(1, 9))
        conf = [list(rng.beta(2.0, 1.0, size=int(rng.integers(0, 8)))) for _ in range(n_req)]
        knots = np.unique(rng.integers(1, 80, size=5))
        rates = np.sort(rng.uniform(5, 100, knots.size))[::-1]
        sps = {int(b): float(s) for b, s in zip(knots, rates, strict=True)}
        expected = algorithm_1(conf, sps)
        assert schedule(conf, sps) == expected
        assert schedule_smoothed(conf, sps, lookahead=1) == expected
        # The look-ahead continues wherever the plain algorithm does, so it only ever admits more.
        assert all(s >= e for s, e in zip(schedule_smoothed(conf, sps), expected, strict=True))


def test_fixed_and_threshold_lengths() -> None:
    conf = [[0.9, 0.4, 0.9], [0.6, 0.5], [0.2], []]
    drafted = [len(row) for row in conf]
    assert fixed_lengths(drafted, 2).tolist() == [2, 2, 1, 0]
    assert fixed_lengths(drafted, 7).tolist() == [3, 2, 1, 0]
    # c ≥ threshold keeps a position (0.5 at the threshold is kept); the first c < threshold cuts.
    assert threshold_lengths(conf, 0.5) == [1, 2, 0, 0]
    assert threshold_lengths(conf, 0.0) == [3, 2, 1, 0]
    with pytest.raises(UsageError):
        fixed_lengths(drafted, -1)
