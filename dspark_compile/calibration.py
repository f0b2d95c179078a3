"""Sequential Temperature Scaling (STS) of the draft's confidence head (DSPARK.md §5).

The scheduler multiplies per-position confidences into prefix survival probabilities a_k = Π_{i≤k} c_i, so
the product is what must be calibrated: t_k is a grid search minimising the ECE of Π_{i≤k} sigmoid(logit_i /
t_i) against "the first k drafts were accepted", t_1..t_{k-1} fixed. A round that verified ℓ drafts tells
nothing about positions k > ℓ, so it is left out there.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dspark_compile.artifacts import write_atomically
from dspark_compile.errors import UsageError

FORMAT = "dspark-sts-calibration"
METHOD = "sequential temperature scaling; c_k = sigmoid(logit_k / t_k)"
_AGAIN = "run `dspark-compile calibrate` again"
DEFAULT_GRID: tuple[float, ...] = tuple(float(t) for t in np.geomspace(0.05, 20.0, 121))  # 1.0 is on it


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function (tanh form)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def _ece_rows(probs: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of each row of ``probs`` [G, n] against the same ``events`` [n], equal-width bins on [0, 1].

    Σ_b (n_b/n)·|mean_b(p) − mean_b(y)| = Σ_b |Σ_b p − Σ_b y| / n, computed with one bincount per sum.
    """
    n_rows, n = probs.shape
    bins = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1) + n_bins * np.arange(n_rows)[:, None]
    size = n_rows * n_bins
    sum_p = np.bincount(bins.ravel(), weights=probs.ravel(), minlength=size)
    sum_y = np.bincount(bins.ravel(), weights=np.broadcast_to(events, probs.shape).ravel(), minlength=size)
    return np.abs(sum_p - sum_y).reshape(n_rows, n_bins).sum(axis=1) / n


def expected_calibration_error(probs: np.ndarray, events: np.ndarray, n_bins: int = 10) -> float:
    """ECE of predicted probabilities against 0/1 outcomes with ``n_bins`` equal-width bins (p = 1 → last)."""
    p = np.asarray(probs, dtype=np.float64).reshape(1, -1)
    y = np.asarray(events, dtype=np.float64).reshape(-1)
    if p.shape[1] != y.size or y.size == 0:
        raise UsageError(f"ECE: expected equal, non-empty probs and events, found {p.shape[1]} and {y.size}")
    return float(_ece_rows(p, y, n_bins)[0])


@dataclass(frozen=True)
class StsCalibration:
    """Per-position temperatures and ECE of the prefix product before/after scaling, by position k = 1..γ (None
    where no round verified k drafts; its temperature stays 1)."""

    temperatures: tuple[float, ...]
    ece_before: tuple[float | None, ...]
    ece_after: tuple[float | None, ...]
    n_observed: tuple[int, ...]
    n_bins: int = 10

    @property
    def block_size(self) -> int:
        return len(self.temperatures)

    def apply(self, confidence_logits: np.ndarray) -> np.ndarray:
        """Calibrated per-position confidences c_k = sigmoid(logit_k / t_k) for logits shaped [..., γ]."""
        z = np.asarray(confidence_logits, dtype=np.float64)
        if z.ndim == 0 or z.shape[-1] != self.block_size:
            raise UsageError(f"calibration: expected confidence logits with last dimension γ = {self.block_size}, "
                             f"found shape {z.shape}; use the calibration fitted for this draft's block size")
        return sigmoid(z / np.asarray(self.temperatures))

    def to_json(self, path: str | os.PathLike[str]) -> None:
        data = {"format": FORMAT, "version": 1, "method": METHOD, "temperatures": list(self.temperatures),
                "ece_before": list(self.ece_before), "ece_after": list(self.ece_after),
                "n_observed": list(self.n_observed), "n_bins": self.n_bins}
        write_atomically(Path(path), json.dumps(data, indent=2).encode() + b"\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> StsCalibration:
        """Read a calibration.json (`dspark-compile calibrate`), every field checked."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path}: cannot read calibration JSON ({exc}); {_AGAIN}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"{path}: expected a JSON object with format {FORMAT!r}; {_AGAIN}")
        try:
            temps = tuple(float(t) for t in data["temperatures"])
            ece = {k: tuple(None if e is None else float(e) for e in data[k]) for k in ("ece_before", "ece_after")}
            cal = cls(temps, ece["ece_before"], ece["ece_after"], tuple(int(n) for n in data["n_observed"]),
                      int(data["n_bins"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{path}: missing or malformed field ({exc!r}); {_AGAIN}") from None
        if not temps or not all(np.isfinite(temps)) or min(temps) <= 0:
            raise UsageError(f"{path}: temperatures must be finite and > 0, found {list(temps)}")
        return cal


def _rounds(confidence_logits: np.ndarray, accepted_drafts: np.ndarray,
            verify_lengths: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float logits [N, γ], accepted [N] and verify lengths [N] (γ where not given)."""
    z = np.asarray(confidence_logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0 or not np.all(np.isfinite(z)):
        raise UsageError(f"calibration: expected finite confidence logits [rounds, γ], found {z.shape}")
    n, gamma = z.shape
    acc = np.asarray(accepted_drafts)
    vl = np.full(n, gamma) if verify_lengths is None else np.asarray(verify_lengths)
    for name, v in (("accepted_drafts", acc), ("verify_lengths", vl)):
        if v.shape != (n,) or not np.issubdtype(v.dtype, np.integer) or v.min() < 0 or v.max() > gamma:
            raise UsageError(f"calibration: expected {name} as {n} integers in 0..{gamma}, found shape {v.shape}, "
                             f"dtype {v.dtype}, range {v.min() if v.size else None}..{v.max() if v.size else None}")
    if np.any(acc > vl):
        r = int(np.argmax(acc > vl))
        raise UsageError(f"calibration: round {r} accepted {acc[r]} drafts but verified only {vl[r]}")
    return z, acc.astype(np.int64), vl.astype(np.int64)


def fit_sts(confidence_logits: np.ndarray, accepted_drafts: np.ndarray, verify_lengths: np.ndarray | None = None, *,
            grid: Sequence[float] = DEFAULT_GRID, n_bins: int = 10) -> StsCalibration:
    """One temperature per position from held-out rounds: pre-sigmoid ``confidence_logits`` [N, γ], drafts
    accepted [N] (bonus not counted) and verified [N] (γ when None). Grid ties go to the temperature nearest 1."""
    z, acc, vl = _rounds(confidence_logits, accepted_drafts, verify_lengths)
    temps_grid = np.asarray(grid, dtype=np.float64)
    if temps_grid.ndim != 1 or temps_grid.size == 0 or not np.all(np.isfinite(temps_grid) & (temps_grid > 0)):
        raise UsageError(f"fit_sts: expected a non-empty grid of finite temperatures > 0, found {grid!r}")
    if n_bins < 1:
        raise UsageError(f"fit_sts: n_bins must be ≥ 1, found {n_bins}")
    # Ties: prefer the smallest |log t| (stable order keeps the first of equals).
    preference = np.argsort(np.abs(np.log(temps_grid)), kind="stable")
    prefix_raw = np.ones(z.shape[0])
    prefix_fit = np.ones(z.shape[0])
    temps: list[float] = []
    before: list[float | None] = []
    after: list[float | None] = []
    counts: list[int] = []
    for k in range(z.shape[1]):
        seen = vl >= k + 1
        events = (acc[seen] >= k + 1).astype(np.float64)
        prefix_raw = prefix_raw * sigmoid(z[:, k])
        counts.append(int(seen.sum()))
        if not seen.any():
            temps.append(1.0)
            before.append(None)
            after.append(None)
            prefix_fit = prefix_fit * sigmoid(z[:, k])
            continue
        candidates = prefix_fit[seen] * sigmoid(z[seen, k][None, :] / temps_grid[:, None])  # [G, n]
        eces = _ece_rows(candidates, events, n_bins)
        best = preference[int(np.argmin(eces[preference]))]
        temps.append(float(temps_grid[best]))
        before.append(expected_calibration_error(prefix_raw[seen], events, n_bins))
        after.append(float(eces[best]))
        prefix_fit = prefix_fit * sigmoid(z[:, k] / temps_grid[best])
    return StsCalibration(tuple(temps), tuple(before), tuple(after), tuple(counts), n_bins)


def _pooled(cal: StsCalibration | None, z: np.ndarray, acc: np.ndarray,
            vl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All observed (round, k) pairs: predicted prefix survival (raw when ``cal`` is None) and the outcome."""
    c = sigmoid(z) if cal is None else cal.apply(z)
    prefix = np.cumprod(c, axis=1)
    k = np.arange(1, z.shape[1] + 1)[None, :]
    seen = vl[:, None] >= k
    return prefix[seen], (acc[:, None] >= k)[seen].astype(np.float64)


def reliability_diagram(cal: StsCalibration, confidence_logits: np.ndarray, accepted_drafts: np.ndarray,
                        path_png: str | os.PathLike[str], verify_lengths: np.ndarray | None = None) -> None:
    """Reliability diagram of the prefix survival over all positions (before/after) plus per-position ECE."""
    from matplotlib.figure import Figure  # Figure renders with Agg and touches no pyplot global state

    z, acc, vl = _rounds(confidence_logits, accepted_drafts, verify_lengths)
    fig = Figure(figsize=(10, 4.2), dpi=100)
    ax_rel, ax_ece = fig.subplots(1, 2)
    ax_rel.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    for label, which, marker in (("before (t = 1)", None, "o"), ("after STS", cal, "s")):
        probs, events = _pooled(which, z, acc, vl)
        bins = np.minimum((probs * cal.n_bins).astype(np.int64), cal.n_bins - 1)
        count = np.bincount(bins, minlength=cal.n_bins)
        used = count > 0
        mean_p = np.bincount(bins, probs, cal.n_bins)[used] / count[used]
        mean_y = np.bincount(bins, events, cal.n_bins)[used] / count[used]
        ece = expected_calibration_error(probs, events, cal.n_bins)
        ax_rel.plot(mean_p, mean_y, marker=marker, label=f"{label}: ECE {ece:.3f}")
    ax_rel.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(prefix of length k accepted)",
               ylabel="observed frequency", title=f"Prefix survival, all positions ({cal.n_bins} bins)")
    ax_rel.legend(loc="upper left")
    positions = np.arange(1, cal.block_size + 1)
    nan = float("nan")
    ax_ece.bar(positions - 0.2, [nan if e is None else e for e in cal.ece_before], 0.4, label="before")
    ax_ece.bar(positions + 0.2, [nan if e is None else e for e in cal.ece_after], 0.4, label="after")
    ticks = [f"{k}\nt={t:.2g}" for k, t in zip(positions, cal.temperatures, strict=True)]
    ax_ece.set_xticks(positions, ticks)
    ax_ece.set(xlabel="position k (fitted temperature)", ylabel="ECE", title=r"ECE of $\prod_{i\leq k} c_i$")
    ax_ece.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_atomically(Path(path_png), png.getvalue())


def calibrate(confidence_logits: np.ndarray, accepted_drafts: np.ndarray, out_dir: str | os.PathLike[str],
              verify_lengths: np.ndarray | None = None, *, grid: Sequence[float] = DEFAULT_GRID,
              n_bins: int = 10) -> StsCalibration:
    """Fit STS and write ``out_dir/calibration.json`` and ``out_dir/reliability.png``."""
    cal = fit_sts(confidence_logits, accepted_drafts, verify_lengths, grid=grid, n_bins=n_bins)
    out = Path(out_dir)
    cal.to_json(out / "calibration.json")
    reliability_diagram(cal, confidence_logits, accepted_drafts, out / "reliability.png", verify_lengths)
    return cal
