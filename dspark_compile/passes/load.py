"""Pass `load`: open the target and draft checkpoints (lazy, memory-mapped)."""

from __future__ import annotations

from dspark_compile.checkpoint import load_draft, load_target
from dspark_compile.program import CheckpointPair
from dspark_compile.spec import BuildSpec


def load(spec: BuildSpec) -> CheckpointPair:
    target = load_target(spec.target, allow_nonfinite=spec.allow_nonfinite)
    draft = load_draft(spec.draft, allow_nonfinite=spec.allow_nonfinite)
    return CheckpointPair(target, draft)
