"""Pass `load`: open the target and draft checkpoints (lazy, memory-mapped)."""

from __future__ import annotations

from dspark_compile.build_state import BuildState
from dspark_compile.program import load_pair


def run(state: BuildState) -> None:
    spec = state.spec
    state.pair = load_pair(spec.target, spec.draft, allow_nonfinite=spec.allow_nonfinite)
