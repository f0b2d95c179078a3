"""Sequential Temperature Scaling: hand-computed ECE/fits and recovery of a known temperature."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dspark_compile.calibration import (
    DEFAULT_GRID,
    StsCalibration,
    calibrate,
    expected_calibration_error,
    fit_sts,
    reliability_diagram,
    sigmoid,
)
from dspark_compile.errors import UsageError


def simulated_rounds(t_true: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true acceptance probability is sigmoid(logit / t_true[k]); full blocks verified."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, t_true.size))
    accepted = rng.random(logits.shape) < sigmoid(logits / t_true)
    return logits, np.cumprod(accepted, axis=1).sum(axis=1)


def test_ece_hand_computed() -> None:
    # bins: 0.05 → [0, .1); 0.15, 0.12 → [.1, .2); 0.95 and 1.0 → last bin.
    # (|.05 − 0| + |.27 − 1| + |1.95 − 2|) / 5 = 0.83 / 5
    ece = expected_calibration_error(np.array([0.05, 0.15, 0.12, 0.95, 1.0]), np.array([0, 1, 0, 1, 1]))
    assert ece == pytest.approx(0.166)
    assert expected_calibration_error(np.array([0.3, 0.3]), np.array([0, 1]), n_bins=1) == pytest.approx(0.2)


def test_single_position_fit_hand_computed() -> None:
    # Every round has logit 2 and 3 of 5 accepted: ECE(t) = |sigmoid(2/t) − 0.6|.
    # t = 1: 0.2808, t = 2: 0.1311, t = 5: 0.0013 (sigmoid(0.4) = 0.5987), t = 10: 0.0502.
    cal = fit_sts(np.full((5, 1), 2.0), np.array([1, 1, 1, 0, 0]), grid=(1.0, 2.0, 5.0, 10.0))
    assert cal.temperatures == (5.0,)
    assert cal.ece_before[0] == pytest.approx(sigmoid(2.0) - 0.6)
    assert cal.ece_after[0] == pytest.approx(0.6 - sigmoid(0.4))
    assert cal.n_observed == (5,)


def test_unverified_positions_are_unobserved_and_ties_prefer_t_1() -> None:
    # Logit 0 gives c = 0.5 at every temperature, so all grid points tie and t = 1 wins.
    # k = 1: all 4 rounds, events [1, 0, 1, 1], p = .5 → ECE .25.
    # k = 2: only the 2 rounds that verified 2 drafts, events [0, 1], p = .25 → ECE .25.
    # k = 3: no round verified 3 drafts.
    cal = fit_sts(np.zeros((4, 3)), np.array([1, 0, 1, 2]), np.array([1, 1, 2, 2]), grid=(0.5, 1.0, 2.0))
    assert cal.temperatures == (1.0, 1.0, 1.0)
    assert cal.n_observed == (4, 2, 0)
    assert cal.ece_before == pytest.approx((0.25, 0.25, None))
    assert cal.ece_after[2] is None


def test_fit_recovers_known_temperatures_and_lowers_ece() -> None:
    t_true = np.array([0.5, 2.0, 1.0])
    logits, accepted = simulated_rounds(t_true, 20_000, seed=0)
    cal = fit_sts(logits, accepted)
    np.testing.assert_allclose(cal.temperatures, t_true, rtol=0.15)
    assert all(a < b for a, b in zip(cal.ece_after, cal.ece_before, strict=True))
    assert cal.ece_after[0] < 0.01 < 0.05 < cal.ece_before[0]  # t_1 = 0.5: raw logits are far too timid


def test_sequential_fit_conditions_on_earlier_temperatures() -> None:
    # Position 2 is scored on c_1·c_2 with c_1 already at its fitted temperature (0.4, far from 1), and the
    # reported ECE is that of the calibrated product against "2 drafts accepted".
    t_true = np.array([0.4, 1.0])
    logits, accepted = simulated_rounds(t_true, 20_000, seed=1)
    cal = fit_sts(logits, accepted)
    probs = np.cumprod(cal.apply(logits), axis=1)[:, 1]
    assert cal.ece_after[1] == pytest.approx(expected_calibration_error(probs, accepted >= 2))
    assert cal.temperatures[1] == pytest.approx(1.0, rel=0.15)


def test_apply_and_json_round_trip(tmp_path: Path) -> None:
    cal = StsCalibration((2.0, 0.5), (0.3, None), (0.01, None), (10, 0), 10)
    np.testing.assert_allclose(cal.apply(np.array([[2.0, -1.0]])), [[sigmoid(1.0), sigmoid(-2.0)]])
    assert cal.apply(np.array([[2.0, -1.0]]))[0, 0] == pytest.approx(1 / (1 + math.exp(-1)))
    cal.to_json(tmp_path / "calibration.json")
    assert StsCalibration.from_json(tmp_path / "calibration.json") == cal
    with pytest.raises(UsageError, match="last dimension"):
        cal.apply(np.zeros((1, 7)))


def test_bad_inputs_raise_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="verified only"):
        fit_sts(np.zeros((2, 3)), np.array([2, 0]), np.array([1, 3]))
    with pytest.raises(UsageError, match="accepted_drafts"):
        fit_sts(np.zeros((2, 3)), np.array([4, 0]))
    with pytest.raises(UsageError, match="accepted_drafts"):
        fit_sts(np.zeros((2, 3)), np.array([1.0, 0.0]))
    with pytest.raises(UsageError, match="finite"):
        fit_sts(np.full((2, 3), np.nan), np.array([1, 0]))
    with pytest.raises(UsageError, match="grid"):
        fit_sts(np.zeros((2, 3)), np.array([1, 0]), grid=(0.0, 1.0))
    (tmp_path / "c.json").write_text('{"format": "something else"}')
    with pytest.raises(UsageError, match="format"):
        StsCalibration.from_json(tmp_path / "c.json")
    with pytest.raises(UsageError, match="cannot read"):
        StsCalibration.from_json(tmp_path / "missing.json")


def test_calibrate_writes_json_and_reliability_png(tmp_path: Path) -> None:
    from matplotlib.image import imread

    logits, accepted = simulated_rounds(np.array([0.5, 2.0, 1.0]), 2_000, seed=2)
    cal = calibrate(logits, accepted, tmp_path / "out")
    assert StsCalibration.from_json(tmp_path / "out" / "calibration.json") == cal
    image = imread(tmp_path / "out" / "reliability.png")
    assert image.shape[:2] == (420, 1000)  # 10 × 4.2 inches at 100 dpi
    assert image.std() > 0.05  # something was drawn
    reliability_diagram(cal, logits, accepted, tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_default_grid_is_geometric_and_contains_one() -> None:
    assert DEFAULT_GRID[0] == pytest.approx(0.05) and DEFAULT_GRID[-1] == pytest.approx(20.0)
    assert min(abs(t - 1.0) for t in DEFAULT_GRID) < 1e-12
