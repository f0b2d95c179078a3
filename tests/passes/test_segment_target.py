"""Pass `segment_target`: a target over --max-engine-gb is split by layer range into segment graph files beside
weights.bin, for both variants, recorded in the build state and in `written` (the manifest's signatures); a
target within the limit is left alone."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest

from dspark_compile.artifacts import PLUGIN, PORTABLE, OnnxGraphs
from dspark_compile.build_spec import BuildSpec
from dspark_compile.errors import UsageError
from dspark_compile.passes import segment_target
from dspark_compile.plugins.spec_verify.op_schema import SPEC_VERIFY
from tests.passes.conftest import make_state

OUTPUTS = ["accepted", "next_token", "taps", "kv_new"]


def test_within_the_limit_nothing_is_written(built_copy: OnnxGraphs, tmp_path: Path) -> None:
    before = sorted(p.name for p in built_copy.directory.iterdir())
    state = make_state(tmp_path, built_copy, targets=("onnx", "tensorrt"))  # default 6 GB: the tiny target fits
    segment_target.run(state)
    assert (state.segments, state.written) == ({}, {})
    assert sorted(p.name for p in built_copy.directory.iterdir()) == before


def test_over_the_limit_each_variant_is_split(built_copy: OnnxGraphs, tmp_path: Path) -> None:
    state = make_state(tmp_path, built_copy, targets=("onnx", "tensorrt"), max_engine_gb=0.0004)  # 2 of 4 layers
    segment_target.run(state)
    directory = built_copy.directory
    assert state.segments == {
        PORTABLE: (directory / "target_step.seg0.onnx", directory / "target_step.seg1.onnx"),
        PLUGIN: (directory / "target_step.plugin.seg0.onnx", directory / "target_step.plugin.seg1.onnx")}
    assert set(state.written) == {p for paths in state.segments.values() for p in paths}
    for variant, paths in state.segments.items():
        first, last = (state.written[p] for p in paths)
        assert [t.name for t in first.outputs] == ["target.layers.0.y", "target.layers.1.y", "val_44", "val_46"]
        assert {t.name for t in first.outputs} <= {t.name for t in last.inputs}
        assert [t.name for t in last.outputs] == OUTPUTS
        assert last.nodes > first.nodes  # the last one also verifies
        models = [ir.load(p) for p in paths]
        verify = [sum((n.domain, n.op_type) == (SPEC_VERIFY.domain, SPEC_VERIFY.name) for n in m.graph)
                  for m in models]
        assert verify == ([0, 1] if variant == PLUGIN else [0, 0])
    assert sorted(p.name for p in directory.iterdir() if not p.name.endswith(".onnx")) == ["weights.bin"]


def test_a_second_run_writes_the_same_bytes(built_copy: OnnxGraphs, tmp_path: Path) -> None:
    """Reproducible builds: the segment files depend only on the graph."""
    runs = []
    for name in ("a", "b"):
        state = make_state(tmp_path / name, built_copy, targets=("onnx", "tensorrt"), max_engine_gb=0.0002)
        (tmp_path / name).mkdir()
        segment_target.run(state)
        runs.append([p.read_bytes() for p in state.segments[PORTABLE]])
    assert len(runs[0]) == 4 and runs[0] == runs[1]


@pytest.mark.parametrize("value", [0, -1.5, "big", True, float("inf")])
def test_max_engine_gb_must_be_a_positive_number(value: object) -> None:
    with pytest.raises(UsageError, match=r"^build spec field `max_engine_gb`: expected a number of GB > 0 "
                                         r"\(6 = 6e9 bytes\), found "):
        BuildSpec(Path("t"), Path("d"), Path("o"), max_engine_gb=value)  # type: ignore[arg-type]


def test_a_graph_without_layer_names_stays_whole(built_copy: OnnxGraphs, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A graph export_onnx did not write (every one it writes names its target's layers, Gemma4's too): when
    nothing names a node's or weight's layer there is nowhere known to cut; the target is built whole, with a
    warning."""
    for model in built_copy.models["target_step"].values():
        for i, node in enumerate(model.graph):
            node.name = f"n{i}"
        for i, value in enumerate(list(model.graph.initializers.values())):
            value.name = f"w{i}"
        assert not any(name.startswith("target.layers.") for name in model.graph.initializers)
    state = make_state(tmp_path, built_copy, targets=("onnx", "tensorrt"), max_engine_gb=0.0004)
    with caplog.at_level("WARNING"):
        segment_target.run(state)
    assert (state.segments, state.written) == ({}, {})
    assert "but it is built as one engine: segments: no node is named `target.layers.<i>.`" in caplog.text
