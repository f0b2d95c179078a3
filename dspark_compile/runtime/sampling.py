"""Per-row random numbers for sampling that need no generator state on the host or the device."""

from __future__ import annotations

import torch

# Counter-based uniforms (splitmix64): row b's n-th number depends only on (seed_b, n), on any device and in
# any batch, and needs no generator state beyond one int64 counter per row, so a CUDA graph can replay it.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """[B] int64 seeds and counters -> [B, n] float32 in [0, 1): numbers ``counters[b] .. counters[b]+n-1``."""
    key = _mix(seeds.to(torch.int64) * _GOLDEN + _GOLDEN)
    idx = counters.to(torch.int64).unsqueeze(-1) + torch.arange(n, dtype=torch.int64, device=seeds.device)
    z = _mix(key.unsqueeze(-1) + (idx + 1) * _GOLDEN)
    return _shr(z, 40).to(torch.float32) * (1.0 / (1 << 24))
