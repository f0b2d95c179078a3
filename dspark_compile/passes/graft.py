"""Pass `graft`: build the PyTorch program; the draft shares the target's embedding and LM head."""

from __future__ import annotations

from dspark_compile.build_state import BuildState
from dspark_compile.program import make_program


def run(state: BuildState) -> None:
    assert state.pair is not None
    state.program = make_program(state.pair, dtype=state.spec.dtype, device="cpu")
