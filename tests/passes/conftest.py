"""Fixtures of the pass tests: helpers to run single passes on copies of the session's golden build.

Every test reads the one ``golden_build`` of tests/conftest.py (an ONNX export per build dominates the suite's
time). It is made with ``dump_after=("export_onnx",)``: ``dump/after_export_onnx/onnx`` holds the graphs
exactly as exported, the input of every later ONNX pass.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
from onnx_run import ort_session, run_graph

from dspark_compile.artifacts import GRAPH_NAMES, PLUGIN, PORTABLE, OnnxGraphs
from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.passes import graft as graft_pass
from dspark_compile.passes import load as load_pass
from dspark_compile.program import CheckpointPair, DecodeProgram
from dspark_compile.runtime.backend import ProgramInfo

VOCAB, BLOCK, TAP_WIDTH = 384, 7, 192  # the golden pair (tests/data/golden/README.md)


@pytest.fixture(scope="session")
def exported_dir(golden_build: Path) -> Path:
    """The two graphs as `export_onnx` wrote them (per-graph external data, verify ending in logits)."""
    return golden_build / "dump" / "after_export_onnx" / "onnx"


def load_graphs(directory: Path, out: Path, variants: dict[str, tuple[str, ...]] | None = None) -> OnnxGraphs:
    """The graph files in ``directory`` as the in-memory `OnnxGraphs` a pass receives (written to ``out``)."""
    variants = variants or {}
    models = {name: {v: ir.load(directory / OnnxGraphs(directory, "", 0).path(name, v).name)
                     for v in variants.get(name, (PORTABLE,))} for name in GRAPH_NAMES}
    return OnnxGraphs(out, "sampling", BLOCK, models)


def make_state(tmp_path: Path, graphs: OnnxGraphs | None = None, **spec: Any) -> BuildState:
    """A BuildState of the golden pair's shapes holding ``graphs`` (what the earlier passes would have left)."""
    info = ProgramInfo(vocab_size=VOCAB, block_size=BLOCK, tap_width=TAP_WIDTH, has_confidence=True,
                       sampling=spec.get("verify_mode", "sampling") == "sampling")
    return BuildState(spec=BuildSpec(Path("t"), Path("d"), tmp_path / "out", **spec), workdir=tmp_path,
                      info=info, onnx=graphs)


def load_pair(spec: BuildSpec) -> CheckpointPair:
    """Pass `load` on a fresh build state of ``spec``; the pair it leaves."""
    state = BuildState(spec=spec, workdir=spec.out.parent)
    load_pass.run(state)
    assert state.pair is not None
    return state.pair


def graft_program(spec: BuildSpec) -> DecodeProgram:
    """Passes `load` then `graft` on a fresh build state of ``spec``; the program they leave."""
    state = BuildState(spec=spec, workdir=spec.out.parent, pair=load_pair(spec))
    graft_pass.run(state)
    assert state.program is not None
    return state.program


@pytest.fixture
def exported_copy(exported_dir: Path, tmp_path: Path) -> OnnxGraphs:
    """The exported graphs, in memory, as `export_onnx` leaves them (weights read from the session's dump)."""
    return load_graphs(exported_dir, tmp_path / "onnx")


@pytest.fixture
def built_copy(golden_build: Path, tmp_path: Path) -> OnnxGraphs:
    """The finished build's graphs (after share_weights), in memory; ``directory`` is a private copy."""
    directory = tmp_path / "onnx"
    shutil.copytree(golden_build / "onnx", directory)
    return load_graphs(directory, directory, {"target_step": (PORTABLE, PLUGIN)})


def sample_feeds(path: Path, seed: int = 0, slots: int = 24) -> dict[str, np.ndarray]:
    """Valid random inputs (batch 2, ragged lengths, random caches) for any golden graph, raw or final,
    chosen by its input names (docs/PROGRAM.md)."""
    rng = np.random.default_rng(seed)
    session = ort_session(path)
    b = 2
    values: dict[str, Any] = {
        "input_ids": rng.integers(0, VOCAB, (b, 6)), "input_lengths": [6, 3],
        "tokens": rng.integers(0, VOCAB, (b, BLOCK + 1)), "cache_len": [3, 9], "verify_len": [BLOCK, 2],
        "logit_rows": np.tile(np.arange(BLOCK + 1), (b, 1)),
        "temperature": np.array([0.0, 0.9], np.float32), "anchor": rng.integers(0, VOCAB, b),
        "ctx_taps": rng.normal(size=(b, 4, TAP_WIDTH)).astype(np.float32), "ctx_count": [4, 2],
    }
    feeds = {}
    for spec in session.get_inputs():
        dims = [b if d == "batch" else slots if d == "cache_slots" else d for d in spec.shape]
        if spec.name in ("kv_cache", "draft_kv", "embed_tokens", "lm_head"):
            feeds[spec.name] = rng.normal(size=dims).astype(np.float32)
        elif spec.name == "draft_probs":
            q = rng.random((b, BLOCK, VOCAB)).astype(np.float32)
            feeds[spec.name] = q / q.sum(-1, keepdims=True)
        elif spec.name == "uniforms":  # [B, G] for the draft, [B, G+1] for verification
            feeds[spec.name] = rng.random((b, BLOCK if dims[1] == BLOCK else BLOCK + 1)).astype(np.float32)
        else:
            value = np.asarray(values[spec.name])
            feeds[spec.name] = value if value.dtype == np.float32 else value.astype(np.int64)
    return feeds


@pytest.fixture(scope="session")
def run_onnx() -> Callable[[Path, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``run_onnx(path, feeds) -> {output name: array}`` with onnxruntime (CPU)."""
    return run_graph


@pytest.fixture(scope="session")
def feeds_for() -> Callable[..., dict[str, np.ndarray]]:
    """``feeds_for(path, seed=0)``: valid random inputs for a golden graph (see :func:`sample_feeds`)."""
    return sample_feeds


@pytest.fixture(scope="session")
def state_with() -> Callable[..., BuildState]:
    """``state_with(tmp_path, graphs=None, **spec_fields)``: see :func:`make_state`."""
    return make_state


@pytest.fixture(scope="session")
def loaded() -> Callable[[BuildSpec], CheckpointPair]:
    """``loaded(spec) -> CheckpointPair``: see :func:`load_pair`."""
    return load_pair


@pytest.fixture(scope="session")
def grafted() -> Callable[[BuildSpec], DecodeProgram]:
    """``grafted(spec) -> DecodeProgram``: see :func:`graft_program`."""
    return graft_program
