"""Pass `share_weights`: one `weights.bin` holding each distinct tensor once, page-aligned, that every graph of
the build points into; the grafted embedding and LM head are the target's bytes, stored once as the graphs'
weight inputs (no graph holds them)."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx_ir.tensor_adapters import TorchTensor
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from dspark_compile.artifacts import PORTABLE, OnnxGraphs
from dspark_compile.build_state import BuildState
from dspark_compile.checkpoint.store import MappedPages
from dspark_compile.passes import share_weights
from dspark_compile.passes.share_weights import ALIGN, WEIGHTS_FILE
from tests.passes.conftest import make_state

GRAPHS = ("target_step", "draft_propose")
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
    assert sorted(graphs) == ["draft_propose", "target_step", "target_step.plugin"]
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
    inputs = 2 * 384 * 64 * 4  # the weight inputs (embedding, LM head): no graph points at them
    assert len(blob) - sum(n for _, n in regions) - inputs < (len(regions) + 2) * ALIGN  # the rest: padding


def test_both_variants_of_the_target_point_at_the_same_bytes(layout) -> None:
    _, graphs = layout
    regions = {name: {r for _, r, _ in graph.values()} for name, graph in graphs.items()}
    # target_step holds 28 external tensors (4 layers x 7 projections; the embedding and LM head are inputs).
    assert len(regions["target_step"]) == 28
    assert regions["target_step"] == regions["target_step.plugin"]
    assert not regions["target_step"] & regions["draft_propose"]


@pytest.mark.parametrize(("tensor", "name"), [("model.embed_tokens.weight", "embed_tokens"),
                                              ("lm_head.weight", "lm_head")])
def test_grafted_tensors_are_the_targets_bytes_stored_once(layout, golden_build: Path, golden_pair: tuple[Path, Path],
                                                           tensor: str, name: str) -> None:
    blob, graphs = layout
    weight = load_file(str(golden_pair[0] / "model.safetensors"))[tensor]
    record = json.loads((golden_build / "manifest.json").read_text())["weight_inputs"][name]
    assert record["file"] == f"onnx/{WEIGHTS_FILE}" and record["shape"] == list(weight.shape)
    assert blob[record["offset"] : record["offset"] + record["bytes"]] == weight.tobytes()
    layouts = {weight.tobytes(), np.ascontiguousarray(weight.T).tobytes()}
    regions = {r for g in graphs.values() for _, r, _ in g.values()}
    assert not {(o, n) for o, n in regions if blob[o : o + n] in layouts}  # no graph holds a copy, in any layout


def test_pass_writes_each_graph_once_without_changing_outputs(
        exported_copy: OnnxGraphs, exported_dir: Path, tmp_path: Path, state_with: Callable[..., BuildState],
        run_onnx: Callable[..., dict[str, np.ndarray]], feeds_for: Callable[..., dict[str, np.ndarray]]) -> None:
    per_graph = sum(f.stat().st_size for f in exported_dir.glob("*.data"))
    state = state_with(tmp_path, exported_copy)
    share_weights.run(state)
    files = sorted(p.name for p in exported_copy.directory.iterdir())
    assert files == ["draft_propose.onnx", "target_step.onnx", WEIGHTS_FILE]
    assert sorted(state.written) == sorted(exported_copy.all_paths())
    assert (exported_copy.directory / WEIGHTS_FILE).stat().st_size <= per_graph
    for name in ("draft_propose",):  # the exported target_step holds the custom node
        feeds = feeds_for(exported_dir / f"{name}.onnx", seed=2)
        old, new = run_onnx(exported_dir / f"{name}.onnx", feeds), run_onnx(exported_copy.path(name), feeds)
        assert all(np.array_equal(old[k], new[k]) for k in old), name


def _resident(file: Path) -> int:
    """Resident bytes of this process's memory maps of ``file`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5] == str(file)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux memory-map accounting")
def test_checkpoint_pages_are_given_back_with_the_same_bytes_written(tmp_path: Path, monkeypatch) -> None:
    """Module tensors over a checkpoint's memory map: the pass writes the same files with or without giving
    their pages back; without it the whole checkpoint stayed resident, with it none does, and the tensors still
    read the checkpoint's values."""
    gen = torch.Generator().manual_seed(0)
    ckpt, names = tmp_path / "model.safetensors", [f"w{i}" for i in range(4)]
    save_file({n: torch.randn(512, 1024, generator=gen).to(torch.bfloat16) for n in names}, str(ckpt))
    # Copies, not views of a map of the checkpoint (load_file's tensors are): only the builds' maps count.
    reference, size = {n: t.clone() for n, t in load_torch(str(ckpt)).items()}, 4 * 512 * 1024 * 2

    def build(out: Path) -> tuple[bytes, bytes, int]:
        handle = safe_open(str(ckpt), framework="pt")  # a fresh map: nothing of it resident yet
        weights = [handle.get_tensor(n) for n in names]
        # Module tensors, and numpy views of them as the optimizer leaves some (a Gemma4 build: half of them).
        held = [TorchTensor(w, name=n) if i % 2 else ir.Tensor(TorchTensor(w).numpy(), name=n)
                for i, (n, w) in enumerate(zip(names, weights, strict=True))]
        values = [ir.Value(name=n, shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.BFLOAT16),
                           const_value=t) for n, w, t in zip(names, weights, held, strict=True)]
        total = ir.node("Sum", values)
        model = ir.Model(ir.Graph([], total.outputs, nodes=[total], initializers=values, opset_imports={"": 18}),
                         ir_version=10)
        share_weights.run(make_state(out.with_suffix(".work"), OnnxGraphs(out, "sampling", 7,
                                                                           {"draft_propose": {PORTABLE: model}})))
        resident = _resident(ckpt)
        assert all(torch.equal(w, reference[n]) for n, w in zip(names, weights, strict=True))  # paged back in
        return (out / WEIGHTS_FILE).read_bytes(), (out / "draft_propose.onnx").read_bytes(), resident

    with monkeypatch.context() as patch:
        patch.setattr(MappedPages, "drop", lambda self, tensor: False)
        *kept, kept_resident = build(tmp_path / "kept")
    *dropped, dropped_resident = build(tmp_path / "dropped")
    assert dropped == kept  # the same weights.bin and graph, byte for byte
    assert all(kept[0].find(reference[n].view(torch.uint8).numpy().tobytes()) % ALIGN == 0 for n in names)
    assert kept_resident >= size  # every page read stayed...
    assert dropped_resident == 0  # ...or none did


def test_written_checkpoint_maps_are_left_alone(tmp_path: Path) -> None:
    """A map with a written (copy-on-write) page differs from its file: its pages are not dropped."""
    ckpt = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(256, 1024, dtype=torch.bfloat16)}, str(ckpt))
    weight = safe_open(str(ckpt), framework="pt").get_tensor("w")
    weight[0, 0] = 1.0
    assert not MappedPages().drop(weight)
    assert weight[0, 0].item() == 1.0 and weight.sum().item() == 1.0
