"""Typed values that flow between passes (besides `CheckpointPair` / `DecodeProgram` in program.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GRAPH_NAMES = ("target_prefill", "target_verify", "draft_propose")
PORTABLE = "portable"  # standard ONNX ops only: onnxruntime, TensorRT-RTX, any ONNX runtime
PLUGIN = "plugin"  # target_verify keeping the dspark::SpecVerify node, for full TensorRT with our plugin


@dataclass(frozen=True)
class OnnxGraphs:
    """The exported graphs of one build, all in one directory that also holds the shared weights file."""

    directory: Path
    verify_mode: str
    block_size: int
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # graph name -> variants present

    def path(self, name: str, variant: str = PORTABLE) -> Path:
        suffix = "" if variant == PORTABLE else f".{variant}"
        return self.directory / f"{name}{suffix}.onnx"

    def all_paths(self) -> list[Path]:
        return [self.path(n, v) for n in GRAPH_NAMES for v in self.variants.get(n, (PORTABLE,))]


@dataclass(frozen=True)
class Engine:
    graph: str
    plan: Path
    metadata: Path
    inspector: Path
    flavor: str
    precision: str
    uses_plugin: bool


@dataclass(frozen=True)
class Engines:
    directory: Path
    engines: tuple[Engine, ...]
    flavor: str
    trt_version: str


@dataclass(frozen=True)
class TritonRepository:
    directory: Path
    models: tuple[str, ...]
