"""Pass `share_weights`: one `weights.bin` holding each distinct tensor once, page-aligned, that every graph of
the build points into; the grafted draft's embedding and LM head are the target's bytes."""

from __future__ import annotations

import hashlib
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file

from dspark_compile.ir import OnnxGraphs
from dspark_compile.passes.decompose_spec_verify import decompose_spec_verify_file
from dspark_compile.passes.share_weights import ALIGN, WEIGHTS_FILE, share_weights

GRAPHS = ("target_prefill", "target_verify", "draft_propose")
Region = tuple[int, int]


def _external(path: Path) -> dict[str, tuple[str, Region, tuple[int, ...]]]:
    """initializer name -> (file, (offset, length), dims) of every external tensor of one graph."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            out[init.name] = (info["location"], (int(info["offset"]), int(info["length"])), tuple(init.dims))
    return out


@pytest.fixture(scope="module")
def layout(golden_build: Path) -> tuple[bytes, dict[str, dict[str, tuple[str, Region, tuple[int, ...]]]]]:
    onnx_dir = golden_build / "onnx"
    graphs = {p.name.removesuffix(".onnx"): _external(p) for p in sorted(onnx_dir.glob("*.onnx"))}
    return (onnx_dir / WEIGHTS_FILE).read_bytes(), graphs


def test_each_distinct_tensor_is_stored_once(layout) -> None:
    blob, graphs = layout
    assert sorted(graphs) == ["draft_propose", "target_prefill", "target_verify", "target_verify.plugin"]
    entries = [e for g in graphs.values() for e in g.values()]
    assert {file for file, _, _ in entries} == {WEIGHTS_FILE}
    regions = sorted({region for _, region, _ in entries})
    assert all(offset % ALIGN == 0 for offset, _ in regions)
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(regions))  # no overlap
    assert regions[-1][0] + regions[-1][1] == len(blob)
    contents = [blob[o : o + n] for o, n in regions]
    assert len({hashlib.sha256(c).digest() for c in contents}) == len(regions)  # no two equal regions
    # ... and no region is another one transposed (the same weight in a second layout).
    shapes = {region: dims for _, region, dims in entries}
    matrices = [(o, n) for o, n in regions if len(shapes[(o, n)]) == 2 and min(shapes[(o, n)]) > 1]
    flipped = {np.frombuffer(blob[o : o + n], np.float32).reshape(shapes[(o, n)]).T.tobytes() for o, n in matrices}
    assert not flipped & set(contents)
    per_graph = sum(n for _, (_, n), _ in entries)
    stored = sum(n for _, n in regions)
    # 4 graphs (3 + the plugin variant) reference 2.98 MB of weights; one copy of each is 1.16 MB.
    assert stored < 0.4 * per_graph
    assert len(blob) - stored < len(regions) * ALIGN  # the rest is alignment padding


def test_prefill_and_verify_point_at_the_same_bytes(layout) -> None:
    _, graphs = layout
    regions = {name: {r for _, r, _ in graph.values()} for name, graph in graphs.items()}
    # Both target graphs hold the same 30 external tensors (embedding, 4 x 7 projections, LM head); the
    # exporter names them differently per graph (val_42 / val_40, ...), but they point at the same bytes.
    assert len(regions["target_prefill"]) == 30
    assert regions["target_prefill"] == regions["target_verify"] == regions["target_verify.plugin"]
    assert graphs["target_prefill"]["target.embed_tokens.weight"][1] == graphs["target_verify"][
        "target.embed_tokens.weight"][1]


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "lm_head.weight"])
def test_grafted_tensors_are_the_targets_bytes(layout, golden_pair: tuple[Path, Path], tensor: str) -> None:
    blob, graphs = layout
    weight = load_file(str(golden_pair[0] / "model.safetensors"))[tensor]
    layouts = {weight.tobytes(), np.ascontiguousarray(weight.T).tobytes()}
    regions = {r for g in graphs.values() for _, r, _ in g.values()}
    holding = {(o, n) for o, n in regions if blob[o : o + n] in layouts}
    assert len(holding) == 1  # one copy, in one layout, for the whole build
    for name in GRAPHS:
        assert holding <= {r for _, r, _ in graphs[name].values()}, name


def test_pass_merges_per_graph_files_without_changing_outputs(
        exported_copy: OnnxGraphs, tmp_path: Path, run_onnx: Callable[..., dict[str, np.ndarray]],
        feeds_for: Callable[..., dict[str, np.ndarray]]) -> None:
    exported_copy = decompose_spec_verify_file(exported_copy)  # the graphs as share_weights receives them
    before = tmp_path / "before"
    shutil.copytree(exported_copy.directory, before)
    per_graph = sum(f.stat().st_size for f in before.glob("*.data"))
    assert share_weights(exported_copy) == exported_copy
    files = sorted(p.name for p in exported_copy.directory.iterdir())
    assert files == ["draft_propose.onnx", "target_prefill.onnx", "target_verify.onnx", "target_verify.plugin.onnx",
                     WEIGHTS_FILE]
    assert (exported_copy.directory / WEIGHTS_FILE).stat().st_size < 0.6 * per_graph
    for name in GRAPHS:
        feeds = feeds_for(before / f"{name}.onnx", seed=2)
        old, new = run_onnx(before / f"{name}.onnx", feeds), run_onnx(exported_copy.path(name), feeds)
        assert all(np.array_equal(old[k], new[k]) for k in old), name
