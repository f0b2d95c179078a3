"""Post-build tool `calibrate`: decode held-out prompts with fixed γ, record each round's confidence logits and
accepted drafts, fit STS (:mod:`dspark_compile.calibration`) and write BUILD/calibration.json + reliability.png.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dspark_compile.calibration import StsCalibration, calibrate
from dspark_compile.errors import UsageError
from dspark_compile.runtime.backend import DecodeBackend
from dspark_compile.runtime.decode import GenerationParams, generate


def record_rounds(backend: DecodeBackend, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                  batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(confidence logits [N, γ], accepted drafts [N]) of every round, all γ drafts verified."""
    g = backend.info.block_size
    logits, accepted = [], []
    for i in range(0, len(prompts), batch):
        for res in generate(backend, prompts[i : i + batch], GenerationParams(max_new_tokens=max_new_tokens)):
            for rnd in res.rounds:
                if len(rnd.get("confidence_logits", [])) == g:
                    logits.append(rnd["confidence_logits"])
                    accepted.append(rnd["accepted"] - 1)
    if not logits:
        raise UsageError("no draft rounds were recorded; give longer prompts or more of them")
    return np.asarray(logits, dtype=np.float64), np.asarray(accepted, dtype=np.int64)


def calibrate_build(backend: DecodeBackend, prompts: Sequence[Sequence[int]], build_dir: Path, *,
                    max_new_tokens: int = 64) -> StsCalibration:
    if not backend.info.has_confidence:
        raise UsageError("the draft has no confidence head; there is nothing to calibrate")
    logits, accepted = record_rounds(backend, prompts, max_new_tokens=max_new_tokens)
    return calibrate(logits, accepted, build_dir)
