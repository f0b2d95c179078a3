"""Verify-length policies: how many of each request's γ drafts the target verifies this round.

The runtime picks one of these every round; they all return ℓ_r (0 ≤ ℓ_r ≤ γ_r) per request:

- :func:`fixed_lengths` — always γ (the reference decoder) or a fixed cap.
- :func:`threshold_lengths` — DeepSpec's static threshold: cut at the first position whose confidence is
  below the threshold.
- :func:`schedule` — the paper's Algorithm 1 (DSPARK.md §5): global greedy admission of draft prefixes by
  survival probability, stopping at the first admission that does not raise expected throughput.
- :func:`schedule_smoothed` — the same greedy order with a bounded look-ahead so that a step in a measured
  (non-smooth) SPS curve does not end admission early.

All of them are non-anticipating: they see only this round's confidences (computed by the draft, never by
the target), so verification stays lossless whatever they return.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dspark_compile.errors import UsageError

# Θ comparisons treat relative differences below this as ties: Θ = τ·SPS(B) is a product of rounded sums,
# so an admission whose true gain is zero (a = 0, or SPS(B) = k/B with a = 1) can show ±1 ulp.
_TIE_RTOL = 1e-12


@dataclass(frozen=True)
class SpsCurve:
    """Profiled verify steps per second as a function of the verify batch size B (in tokens).

    Between profiled batch sizes the curve is piecewise linear; below the smallest and above the largest
    profiled B it is held constant (the nearest measurement). Constant extrapolation above the table is
    optimistic for a real engine, so profile up to the largest batch the runtime can form (R·(1+γ)).
    """

    batch_sizes: tuple[int, ...]
    steps_per_second: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.batch_sizes or len(self.batch_sizes) != len(self.steps_per_second):
            raise UsageError(
                f"SPS curve: expected equal, non-empty batch-size and SPS lists, found "
                f"{len(self.batch_sizes)} and {len(self.steps_per_second)}; profile at least one batch size"
            )
        if any(b2 <= b1 for b1, b2 in zip(self.batch_sizes[:-1], self.batch_sizes[1:], strict=True)):
            raise UsageError(f"SPS curve: batch sizes must be strictly increasing, found {self.batch_sizes}")
        if self.batch_sizes[0] < 1:
            raise UsageError(f"SPS curve: batch sizes must be ≥ 1 token, found {self.batch_sizes[0]}")
        bad = [s for s in self.steps_per_second if not (math.isfinite(s) and s > 0)]
        if bad:
            raise UsageError(f"SPS curve: steps per second must be finite and > 0, found {bad[0]!r}")

    @classmethod
    def from_mapping(cls, sps: Mapping[int, float] | SpsCurve) -> SpsCurve:
        """Build from ``{batch_size: steps_per_second}`` (any order); an ``SpsCurve`` passes through."""
        if isinstance(sps, SpsCurve):
            return sps
        try:
            points = sorted((int(b), float(s)) for b, s in sps.items())
        except (TypeError, ValueError) as exc:
            raise UsageError(f"SPS curve: expected a mapping of int batch size to SPS ({exc})") from None
        return cls(tuple(b for b, _ in points), tuple(s for _, s in points))

    def __call__(self, batch_size: float | np.ndarray) -> np.ndarray:
        """SPS at ``batch_size`` (scalar or array), interpolated as documented on the class."""
        return np.interp(batch_size, self.batch_sizes, self.steps_per_second)


def _probabilities(confidences: Sequence[Sequence[float]] | np.ndarray) -> list[np.ndarray] | np.ndarray:
    """Per-request acceptance probabilities: a [R, G] array as it is (every request drafted G; one vectorized
    check, the serving hot path), else one array per request."""
    if isinstance(confidences, np.ndarray) and confidences.ndim == 2:
        c = confidences.astype(np.float64, copy=False)
        bad = ~((c >= 0.0) & (c <= 1.0))  # also rejects NaN
        if bad.any():
            r = int(np.argwhere(bad)[0, 0])
            _reject(r, confidences[r].tolist())
        return c
    rows = []
    for r, row in enumerate(confidences):
        c = np.asarray(row, dtype=np.float64).reshape(-1)
        if c.size and not np.all((c >= 0.0) & (c <= 1.0)):  # also rejects NaN
            _reject(r, row)
        rows.append(c)
    return rows


def _reject(r: int, row: Any) -> None:
    raise UsageError(
        f"confidences[{r}]: expected acceptance probabilities in [0, 1], found {row!r}; "
        "pass sigmoid(confidence_logits), not the logits"
    )


def _admission_order(rows: list[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every prefix (r, j) with its survival a_{r,j} = Π_{i≤j} c_{r,i}, in Algorithm 1's admission order.

    Sorted by a descending, ties by request then position. Because c ≤ 1, a rounded product never grows
    with j, so (r, j-1) always precedes (r, j): any prefix of this order is a set of per-request prefixes.
    """
    if isinstance(rows, np.ndarray):  # [R, G]: the same arrays, row-major, without a Python loop
        n, g = rows.shape
        request = np.repeat(np.arange(n, dtype=np.int64), g)
        position = np.tile(np.arange(1, g + 1, dtype=np.int64), n)
        survival = np.cumprod(rows, axis=1).reshape(-1)
        order = np.lexsort((position, request, -survival))
        return request[order], position[order], survival[order]
    request = np.concatenate([np.full(len(c), r, dtype=np.int64) for r, c in enumerate(rows)] + [[]])
    position = np.concatenate([np.arange(1, len(c) + 1, dtype=np.int64) for c in rows] + [[]])
    survival = np.concatenate([np.cumprod(c) for c in rows] + [[]])
    order = np.lexsort((position, request, -survival))  # last key is the primary one
    return request[order].astype(np.int64), position[order].astype(np.int64), survival[order]


def round_width(longest: int, block: int) -> int:
    """The positions a narrow round verifies per row (CudaGraphBackend's ``narrow_rounds``): the longest ℓ + 1,
    rounded up to a power of two (few graphs), at most G + 1."""
    return min(block + 1, 1 << int(longest).bit_length())


def _throughput(n_requests: int, survival: np.ndarray, curve: SpsCurve, verify_width: int | None) -> np.ndarray:
    """Θ after admitting the first m candidates, m = 0..N: (R + Σ_{≤m} a)·SPS(B), B = R + m tokens, or the
    ``verify_width`` tokens a backend computes whatever ℓ is."""
    tau = n_requests + np.concatenate([[0.0], np.cumsum(survival)])
    batch = n_requests + np.arange(len(survival) + 1) if verify_width is None else verify_width
    return tau * curve(batch)


def _widest_lengths(rows: list[np.ndarray] | np.ndarray, curve: SpsCurve, block: int) -> list[int]:
    """A round that verifies R rows of w positions (:func:`round_width`): once w is paid for, every draft
    below it is free, so each row takes min(w − 1, γ_r); w is the width with the highest (R + Σ survival)·SPS(R·w)."""
    n = len(rows)
    grid = rows if isinstance(rows, np.ndarray) else np.zeros((n, block))
    if grid is not rows:  # ragged γ_r: a missing draft survives with probability 0
        for r, c in enumerate(rows):
            grid[r, : len(c)] = c[:block]
    total = np.concatenate([[0.0], np.cumprod(grid, axis=1).sum(axis=0).cumsum()])  # Σ survival up to each ℓ
    best, best_theta = 1, -1.0
    for width in sorted({round_width(ell, block) for ell in range(block + 1)}):
        theta = (n + float(total[min(width - 1, len(total) - 1)])) * float(curve(n * width))
        if theta > best_theta * (1.0 + _TIE_RTOL):
            best, best_theta = width, theta
    return [min(best - 1, len(c)) for c in rows]


def _lengths(n_requests: int, request: np.ndarray, position: np.ndarray, admitted: int) -> list[int]:
    lengths = np.zeros(n_requests, dtype=np.int64)
    np.maximum.at(lengths, request[:admitted], position[:admitted])
    # Each request's admitted positions are exactly 1..ℓ_r (see _admission_order).
    assert np.array_equal(np.bincount(request[:admitted], minlength=n_requests), lengths)
    return [int(x) for x in lengths]


def schedule(confidences: Sequence[Sequence[float]] | np.ndarray, sps: Mapping[int, float] | SpsCurve, *,
             verify_width: int | None = None, widest: int | None = None) -> list[int]:
    """Verify lengths ℓ_r by the paper's Algorithm 1 (confidence-scheduled verification).

    ``confidences[r]`` holds request r's calibrated per-position acceptance probabilities c_{r,1..γ_r}
    (requests may have different γ_r, including 0; a [R, G] array when all have G); ``sps`` maps a verify
    batch size in tokens to profiled verify steps per second (see :class:`SpsCurve` for interpolation). Start
    from ℓ_r = 0 for every request (B = R tokens, τ = R, Θ = R·SPS(R)); admit prefixes (r, j) one at a time
    in order of survival a_{r,j} = Π_{i≤j} c_{r,i} (ties: lower r, then lower j), each adding one token to B
    and a_{r,j} to τ; stop at the first admission that does not strictly increase Θ = τ·SPS(B) and do not look past it.

    ``verify_width``: the tokens the backend's verify step computes whatever ℓ is (the CUDA-graph round runs
    every row's whole block, R·(G+1)). Then a round costs the same for every ℓ, so every admission with a
    survival above 0 raises Θ: shortening ℓ would only discard expected tokens, never save time.
    ``widest`` (= G): the round verifies R rows of :func:`round_width` (its longest ℓ) positions
    (:func:`_widest_lengths`).
    """
    rows = _probabilities(confidences)
    if widest is not None and verify_width is None:
        return _widest_lengths(rows, SpsCurve.from_mapping(sps), widest)
    request, position, survival = _admission_order(rows)
    theta = _throughput(len(rows), survival, SpsCurve.from_mapping(sps), verify_width)
    improves = theta[1:] > theta[:-1] * (1.0 + _TIE_RTOL)
    admitted = int(np.argmin(improves)) if not improves.all() else len(survival)
    return _lengths(len(rows), request, position, admitted)


def schedule_smoothed(
    confidences: Sequence[Sequence[float]] | np.ndarray,
    sps: Mapping[int, float] | SpsCurve,
    *,
    lookahead: int = 64,
    verify_width: int | None = None,
    widest: int | None = None,
) -> list[int]:
    """Algorithm 1 with a bounded look-ahead, for measured SPS curves with steps.

    A real verify step costs the same for every batch inside one kernel tile and jumps at tile boundaries,
    so SPS(B) is a staircase. At a jump Θ = τ·SPS(B) drops for the first token of the new tile and only
    recovers once enough of that tile is filled; the plain algorithm stops at the drop although filling the
    tile pays. Here, instead of the single next admission, the next 1..``lookahead`` admissions of the same
    order are scored together: admit up to the one with the highest Θ if that strictly beats the current Θ,
    otherwise stop. This bridges any step up to ``lookahead`` tokens wide (64 covers the M tiles of Hopper
    GEMM kernels) and, since larger batches are reached with real drafts rather than padding, also handles
    curves that are locally faster at a larger B. ``lookahead=1`` is exactly :func:`schedule`. The choice is
    still a prefix of the survival order computed from this round's confidences only (non-anticipating).
    ``verify_width`` and ``widest`` as in :func:`schedule`.
    """
    if lookahead < 1:
        raise UsageError(f"schedule_smoothed: lookahead must be ≥ 1 token, found {lookahead}")
    rows = _probabilities(confidences)
    if widest is not None and verify_width is None:
        return _widest_lengths(rows, SpsCurve.from_mapping(sps), widest)
    request, position, survival = _admission_order(rows)
    theta = _throughput(len(rows), survival, SpsCurve.from_mapping(sps), verify_width)
    admitted = 0
    while admitted < len(survival):
        window = theta[admitted + 1 : admitted + 1 + lookahead]
        best = int(np.argmax(window))
        if not window[best] > theta[admitted] * (1.0 + _TIE_RTOL):
            break
        admitted += best + 1
    return _lengths(len(rows), request, position, admitted)


def fixed_lengths(drafted: Sequence[int] | np.ndarray, gamma: int) -> np.ndarray:
    """Verify min(γ, drafted) tokens of every request — the reference decoder's policy with γ = block size, or
    a cap (``--verify fixed=K``); ``drafted``: each request's drafts."""
    if gamma < 0:
        raise UsageError(f"fixed_lengths: gamma must be ≥ 0 drafts, found {gamma}")
    return np.minimum(np.asarray(drafted, dtype=np.int64), gamma)


def threshold_lengths(confidence_probs: Sequence[Sequence[float]], threshold: float) -> list[int]:
    """DeepSpec's static threshold: ℓ_r = number of leading positions with c_{r,k} ≥ ``threshold``.

    The block is cut at the first position whose confidence is below the threshold (possibly to 0 drafts);
    ``threshold ≤ 0`` verifies the whole block, as in DeepSpec's ``_confident_prefix_length``.
    """
    lengths = []
    for c in _probabilities(confidence_probs):
        below = np.flatnonzero(c < threshold)
        lengths.append(int(below[0]) if below.size else len(c))
    return lengths
