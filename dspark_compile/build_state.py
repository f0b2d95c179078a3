"""`BuildState`: what the passes of one build have produced so far, in memory.

Every pass is a function ``fn(state) -> None`` that reads the fields earlier passes wrote and writes its own,
so passes hand values to each other, not files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspark_compile.artifacts import Engines, OnnxGraphs, TritonRepository
from dspark_compile.build_spec import BuildSpec
from dspark_compile.runtime.backend import ProgramInfo

if TYPE_CHECKING:
    from dspark_compile.artifacts import GraphIO
    from dspark_compile.passes.partition import PartitionedProgram
    from dspark_compile.program import CheckpointPair, DecodeProgram


@dataclass
class BuildState:
    """Each field is written by exactly one pass (``written`` by whoever writes a graph file)."""

    spec: BuildSpec
    workdir: Path
    pair: CheckpointPair | None = None  # load
    program: DecodeProgram | None = None  # graft
    parts: PartitionedProgram | None = None  # partition
    info: ProgramInfo | None = None  # partition
    quantization: dict[str, Any] | None = None  # quantize
    acceptance_prompts: list[list[int]] | None = None  # validate (--check-acceptance's file, read before the build)
    acceptance: dict[str, Any] | None = None  # check_acceptance
    onnx: OnnxGraphs | None = None  # export_onnx, then each ONNX pass
    weight_inputs: dict[str, dict[str, Any]] | None = None  # share_weights: where each weight input is stored
    repeated_constant_bytes: int = 0  # share_weights: bytes of the copies of constants more than one graph holds
    # segment_target: target_step's layer-range segment files per variant (portable, plugin); empty when the
    # target is one engine
    segments: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    engines: Engines | None = None  # build_tensorrt
    triton: TritonRepository | None = None  # package_triton
    manifest: dict[str, Any] | None = None  # manifest
    written: dict[Path, GraphIO] = field(default_factory=dict)  # every .onnx file of the build, with its I/O
    timings: list[tuple[str, float]] = field(default_factory=list)
