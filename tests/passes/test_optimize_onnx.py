"""Pass `optimize_onnx`: fewer (never more) nodes, the same outputs, no per-node trace metadata, and the
external weights neither read nor rewritten."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from dspark_compile.ir import PLUGIN, PORTABLE, OnnxGraphs
from dspark_compile.passes.optimize_onnx import optimize_onnx
from dspark_compile.pipeline import PIPELINE, BuildState
from dspark_compile.spec import BuildSpec


def _signature(model: onnx.ModelProto) -> list[str]:
    return [f"{v.name}: {v.type}" for v in (*model.graph.input, *model.graph.output)]


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.glob("*.data"))}


@pytest.fixture
def decomposed(exported_copy: OnnxGraphs, tmp_path: Path) -> OnnxGraphs:
    """The graphs as the pipeline hands them to optimize_onnx (after decompose_spec_verify)."""
    state = BuildState(spec=BuildSpec(Path("t"), Path("d"), tmp_path / "out"), workdir=tmp_path, onnx=exported_copy)
    next(step for step in PIPELINE if step.name == "decompose_spec_verify").run(state)
    assert state.onnx.variants == {"target_verify": (PORTABLE, PLUGIN)}
    return state.onnx


def test_fewer_nodes_same_outputs_no_metadata(decomposed: OnnxGraphs, tmp_path: Path,
                                              run_onnx: Callable[..., dict[str, np.ndarray]],
                                              feeds_for: Callable[..., dict[str, np.ndarray]]) -> None:
    before_dir = tmp_path / "before"
    shutil.copytree(decomposed.directory, before_dir)
    weights = _digests(decomposed.directory)
    assert len(weights) == 3

    assert optimize_onnx(decomposed) == decomposed
    assert _digests(decomposed.directory) == weights
    assert sorted(p.name for p in decomposed.directory.iterdir()) == sorted(p.name for p in before_dir.iterdir())
    removed = 0
    for path in decomposed.all_paths():
        old = onnx.load(str(before_dir / path.name), load_external_data=False)
        new = onnx.load(str(path), load_external_data=False)
        assert len(new.graph.node) <= len(old.graph.node), path.name
        removed += len(old.graph.node) - len(new.graph.node)
        assert _signature(new) == _signature(old)
        assert not any(v.metadata_props for v in (*new.graph.input, *new.graph.output))
        assert any(n.metadata_props for n in old.graph.node)  # the exporter's stack traces ...
        assert not any(n.metadata_props or n.doc_string for n in new.graph.node)  # ... are gone
    assert removed > 0
    for name in ("target_prefill", "target_verify", "draft_propose"):
        path = decomposed.path(name)
        feeds = feeds_for(path, seed=1)
        old, new = run_onnx(before_dir / path.name, feeds), run_onnx(path, feeds)
        assert old.keys() == new.keys()
        for key, value in old.items():
            if value.dtype == np.int64:
                assert np.array_equal(new[key], value), (name, key)
            else:
                assert np.abs(new[key] - value).max() <= 1e-6, (name, key)
