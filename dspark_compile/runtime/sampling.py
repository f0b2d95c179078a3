"""Host-side token choice for the prefill token, with the same rules the graphs use."""

from __future__ import annotations

import numpy as np

from dspark_compile.plugins.spec_verify.reference import inverse_cdf  # the one draw rule (README there)


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float32) / np.float32(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sample_from_logits(logits: np.ndarray, temperature: float, u: float) -> int:
    """Greedy (first argmax) at temperature 0, else an inverse-CDF draw from softmax(logits / T)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    return inverse_cdf(softmax(logits, temperature), u)
