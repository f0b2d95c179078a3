"""Pass `graft`: build the PyTorch program; the draft shares the target's embedding and LM head."""

from __future__ import annotations

from dspark_compile.program import CheckpointPair, DecodeProgram
from dspark_compile.program import graft as graft_pair
from dspark_compile.spec import BuildSpec


def graft(pair: CheckpointPair, spec: BuildSpec) -> DecodeProgram:
    return graft_pair(pair, dtype=spec.dtype, device="cpu")
