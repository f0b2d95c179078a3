"""Pass `optimize_onnx`: fewer (never more) nodes, the same outputs, no trace metadata on nodes or values, in
memory (the weights are neither copied nor written)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from dspark_compile.artifacts import PLUGIN, PORTABLE, OnnxGraphs
from dspark_compile.build_state import BuildState
from dspark_compile.passes import decompose_spec_verify, optimize_onnx


def _signature(model: onnx.ModelProto) -> list[str]:
    return [f"{v.name}: {v.type}" for v in (*model.graph.input, *model.graph.output)]


@pytest.fixture
def decomposed(exported_copy: OnnxGraphs, tmp_path: Path, state_with: Callable[..., BuildState]) -> BuildState:
    """The state as the pipeline hands it to optimize_onnx (after decompose)."""
    state = state_with(tmp_path, exported_copy)
    decompose_spec_verify.run(state)
    assert exported_copy.variants == {"target_step": (PORTABLE, PLUGIN), "draft_propose": (PORTABLE,)}
    return state


def test_fewer_nodes_same_outputs_no_metadata(decomposed: BuildState, tmp_path: Path,
                                              run_onnx: Callable[..., dict[str, np.ndarray]],
                                              feeds_for: Callable[..., dict[str, np.ndarray]]) -> None:
    graphs = decomposed.onnx
    assert graphs is not None
    before_dir, after_dir = tmp_path / "before", tmp_path / "after"
    graphs.save(before_dir)
    optimize_onnx.run(decomposed)
    assert not graphs.directory.exists()  # nothing written
    graphs.save(after_dir)
    removed = 0
    for path in graphs.all_paths():
        old = onnx.load(str(before_dir / path.name), load_external_data=False)
        new = onnx.load(str(after_dir / path.name), load_external_data=False)
        assert len(new.graph.node) <= len(old.graph.node), path.name
        removed += len(old.graph.node) - len(new.graph.node)
        assert _signature(new) == _signature(old)
        assert not any(v.metadata_props for v in (*new.graph.input, *new.graph.output, *new.graph.value_info))
        assert any(n.metadata_props for n in old.graph.node)  # the exporter's stack traces ...
        assert not any(n.metadata_props or n.doc_string for n in new.graph.node)  # ... are gone
    assert removed > 0
    for name in ("target_step", "draft_propose"):
        path = graphs.path(name)
        feeds = feeds_for(before_dir / path.name, seed=1)
        old, new = run_onnx(before_dir / path.name, feeds), run_onnx(after_dir / path.name, feeds)
        assert old.keys() == new.keys()
        for key, value in old.items():
            if value.dtype == np.int64:
                assert np.array_equal(new[key], value), (name, key)
            else:
                assert np.abs(new[key] - value).max() <= 1e-6, (name, key)
