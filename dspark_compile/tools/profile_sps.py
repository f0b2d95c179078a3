"""Post-build tool `profile`: SPS(B), verify steps per second at a verify batch of B tokens.

The scheduler (DSPARK.md §5) maximises τ · SPS(B), so it needs the real cost curve. B counts tokens
(Σ_r 1 + ℓ_r): up to γ+1 one request verifies B tokens, above that ⌈B/(γ+1)⌉ requests of γ+1 each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dspark_compile.runtime.executor import GraphExecutor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpsProfile:
    batch_sizes: tuple[int, ...]
    steps_per_second: tuple[float, ...]
    backend: str
    device: str
    context: int
    block_size: int

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def token_grid(block: int, max_batch: int) -> list[int]:
    small = list(range(1, block + 1))
    return small + [r * (block + 1) for r in range(1, max_batch + 1)]


def shape_for(tokens: int, block: int) -> tuple[int, int]:
    """(requests, tokens per request) for a verify batch of ``tokens`` tokens."""
    if tokens <= block + 1:
        return 1, tokens
    return -(-tokens // (block + 1)), block + 1


def profile_sps(backend: GraphExecutor, *, max_batch: int, context: int = 256, repeats: int = 5,
                backend_name: str = "", device: str = "cpu") -> SpsProfile:
    from dspark_compile.targets.torch.bench import median_seconds

    g = backend.info.block_size
    rng = np.random.default_rng(0)
    points, sps = [], []
    for b_tokens in token_grid(g, max_batch):
        reqs, t = shape_for(b_tokens, g)
        backend.start(reqs, context + t + 2)
        tokens = rng.integers(0, backend.info.vocab_size, size=(reqs, t), dtype=np.int64)
        cache_len = np.full(reqs, context, dtype=np.int64)
        verify_len = np.full(reqs, t - 1, dtype=np.int64)

        def call(tokens: np.ndarray = tokens, cache_len: np.ndarray = cache_len,
                 verify_len: np.ndarray = verify_len) -> None:
            backend.verify_step(tokens, cache_len, verify_len)

        points.append(reqs * t)
        sps.append(1.0 / median_seconds(call, repeats, warmup=1))  # warm-up: allocation, kernel selection
        log.info("SPS(%d) = %.1f steps/s", reqs * t, sps[-1])
    # Points may repeat when rounding requests up; keep the last (largest shape) per B.
    curve = dict(zip(points, sps, strict=True))
    keys = sorted(curve)
    return SpsProfile(tuple(keys), tuple(round(curve[k], 3) for k in keys), backend_name, device, context, g)


def write_profile(profile: SpsProfile, build_dir: Path) -> Path:
    path = build_dir / "sps_profile.json"
    path.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    plot_profile(profile, build_dir / "sps_profile.png")
    return path


def plot_profile(profile: SpsProfile, png: Path) -> None:
    from matplotlib.figure import Figure  # Figure renders with Agg and touches no pyplot global state

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(profile.batch_sizes, profile.steps_per_second, marker="o")
    ax.set(xlabel="verify batch B (tokens)", ylabel="steps / s",
           title=f"SPS(B) — {profile.backend} on {profile.device}, context {profile.context}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
