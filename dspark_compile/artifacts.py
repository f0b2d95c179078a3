"""Handles to what a build produces (graphs, engines, a Triton repository), passed from pass to pass.

The ONNX graphs stay in memory as onnx-ir models from `export_onnx` to `share_weights`, which writes each of
them once; later passes read them from here, never from the files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir

GRAPH_NAMES = ("target_step", "draft_propose")
PORTABLE = "portable"  # standard ONNX ops only: onnxruntime, TensorRT-RTX, any ONNX runtime
PLUGIN = "plugin"  # target_step keeping the dspark::SpecVerify node, for full TensorRT with our plugin


def segment_file(graph: str, index: int, ext: str, variant: str = PORTABLE) -> str:
    """A segment's file of a target split by layer range: ``target_step.seg0.onnx``,
    ``target_step.plugin.seg0.onnx``, ``target_step.seg0.plan`` (one spelling for the pass that writes them,
    the engine build and the Triton repository that find them)."""
    suffix = "" if variant == PORTABLE else f".{variant}"
    return f"{graph}{suffix}.seg{index}.{ext}"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes: what the manifest and the engine metadata record."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomically(path: Path, payload: bytes) -> None:
    """``path`` holds ``payload`` whole or is left as it was: a cut run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def replace_dir(new: Path, out: Path) -> None:
    """Move a finished directory into place; an existing ``out`` is swapped out, then removed."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output: ONNX dtype name (``float``, ``int64``, ``bfloat16``) and dims (a name for a
    dynamic dim, ``None`` for an unnamed one; ``shape`` is ``None`` when the rank is unknown)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}


@dataclass(frozen=True)
class GraphIO:
    """A graph's inputs (weights excluded) and outputs: what the manifest records and Triton and TensorRT check."""

    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    opset: dict[str, int] = field(default_factory=dict)
    nodes: int = 0

    @classmethod
    def of(cls, model: ir.Model) -> GraphIO:
        graph = model.graph
        weights = set(graph.initializers)

        def describe(value: ir.Value) -> TensorIO:
            dtype = value.dtype.name.lower() if value.dtype is not None else "undefined"
            shape = None if value.shape is None else tuple(
                d if isinstance(d, int) else d.value for d in value.shape)
            return TensorIO(value.name or "", dtype, shape)

        return cls(tuple(describe(v) for v in graph.inputs if v.name not in weights),
                   tuple(describe(v) for v in graph.outputs),
                   {domain or "ai.onnx": version for domain, version in model.opset_imports.items()},
                   len(graph))

    @classmethod
    def read(cls, path: Path) -> GraphIO:
        """The I/O of an ONNX file; its external weights are not read."""
        import onnx_ir as ir

        return cls.of(ir.load(path))

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "opset": dict(self.opset), "nodes": self.nodes}


@dataclass(frozen=True)
class OnnxGraphs:
    """The graphs of one build, in memory (``models[name][variant]``), and the directory they are written to."""

    directory: Path
    verify_mode: str
    block_size: int
    models: dict[str, dict[str, ir.Model]] = field(default_factory=dict)

    @property
    def variants(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(by_variant) for name, by_variant in self.models.items()}

    def path(self, name: str, variant: str = PORTABLE) -> Path:
        suffix = "" if variant == PORTABLE else f".{variant}"
        return self.directory / f"{name}{suffix}.onnx"

    def model(self, name: str, variant: str = PORTABLE) -> ir.Model:
        return self.models[name][variant]

    def items(self) -> Iterator[tuple[str, str, ir.Model]]:
        """(name, variant, model) in build order: GRAPH_NAMES, each graph's variants as listed."""
        for name in GRAPH_NAMES:
            for variant, model in self.models.get(name, {}).items():
                yield name, variant, model

    def all_paths(self) -> list[Path]:
        return [self.path(name, variant) for name, variant, _ in self.items()]

    def save(self, directory: Path) -> dict[Path, GraphIO]:
        """Write every graph to ``directory``, each with its own ``.onnx.data`` (what --stop-after and
        --dump-after leave before `share_weights` has put the weights into one file)."""
        import onnx_ir as ir

        directory.mkdir(parents=True, exist_ok=True)
        written = {}
        for name, variant, model in self.items():
            path = directory / self.path(name, variant).name
            data = f"{path.name}.data"
            ir.save(model, path, external_data=data) if model.graph.initializers else ir.save(model, path)
            written[path] = GraphIO.of(model)
        return written


@dataclass(frozen=True)
class Engine:
    graph: str
    plan: Path
    metadata: Path
    inspector: Path
    flavor: str
    precision: str
    uses_plugin: bool
    weight_bytes: int = 0  # the graph's constant weights, which the engine holds (its weight inputs excluded)
    activation_bytes: tuple[int, ...] = ()  # device memory of one execution context, per optimization profile
    activation_source: str = "estimate"  # "tensorrt" (the built engine's own numbers) or "estimate"
    # A target split by layer range (passes/segment_target.py): this engine is segment `segment` of `segments`,
    # run in order; each input is a graph input or an earlier segment's output of the same name.
    segment: int | None = None
    segments: int = 1
    inputs: tuple[str, ...] = ()  # the segment's inputs and outputs by name (weights excluded); set for segments
    outputs: tuple[str, ...] = ()


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
