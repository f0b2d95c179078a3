"""Pass `export_onnx`: the three graphs with the I/O names, dtypes and symbolic dimensions of docs/PROGRAM.md,
weights as external data, target_verify ending in exactly one `dspark::SpecVerify` node as the plugin's schema
declares it, and dimensions that really are dynamic (run at sizes other than the trace's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper
from torch import nn

from dspark_compile.artifacts import OnnxGraphs
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.passes import decompose_spec_verify
from dspark_compile.passes import graft as graft_pass
from dspark_compile.passes import load as load_pass
from dspark_compile.passes.export_onnx import export_graph, export_graphs
from dspark_compile.passes.partition import GraphSpec, PartitionedProgram, partition
from dspark_compile.plugins.spec_verify.schema import SAMPLING, SPEC_VERIFY
from dspark_compile.program import CheckpointPair, DecodeProgram
from dspark_compile.spec import BuildSpec

CACHE = [4, 2, "batch", 2, "cache_slots", 16]
DRAFT_CACHE = [2, 2, "batch", 2, "cache_slots", 16]
SIGNATURES = {  # name -> (inputs, outputs), each (name, dtype, shape)
    "target_prefill": (
        [("input_ids", "INT64", ["batch", "prompt_len"]), ("input_lengths", "INT64", ["batch"]),
         ("kv_cache", "FLOAT", CACHE)],
        [("last_logits", "FLOAT", ["batch", 384]), ("taps", "FLOAT", ["batch", "prompt_len", 192]),
         ("kv_new", "FLOAT", [4, 2, "batch", 2, "prompt_len", 16])],
    ),
    "target_verify": (
        [("tokens", "INT64", ["batch", "verify_tokens"]), ("cache_len", "INT64", ["batch"]),
         ("kv_cache", "FLOAT", CACHE), ("verify_len", "INT64", ["batch"]),
         ("draft_probs", "FLOAT", ["batch", "draft_len", 384]), ("temperature", "FLOAT", ["batch"]),
         ("uniforms", "FLOAT", ["batch", "verify_tokens"])],
        [("accepted", "INT64", ["batch"]), ("next_token", "INT64", ["batch"]),
         ("taps", "FLOAT", ["batch", "verify_tokens", 192]),
         ("kv_new", "FLOAT", [4, 2, "batch", 2, "verify_tokens", 16])],
    ),
    "draft_propose": (
        [("anchor", "INT64", ["batch"]), ("ctx_taps", "FLOAT", ["batch", "ctx_len", 192]),
         ("ctx_count", "INT64", ["batch"]), ("cache_len", "INT64", ["batch"]), ("draft_kv", "FLOAT", DRAFT_CACHE),
         ("temperature", "FLOAT", ["batch"]), ("uniforms", "FLOAT", ["batch", 7])],
        [("draft_tokens", "INT64", ["batch", 7]), ("confidence_logits", "FLOAT", ["batch", 7]),
         ("draft_probs", "FLOAT", ["batch", 7, 384]), ("draft_kv_new", "FLOAT", [2, 2, "batch", 2, "ctx_len", 16])],
    ),
}


def load(spec: BuildSpec) -> CheckpointPair:
    """Pass `load` on a fresh build state of ``spec``; what it leaves in the state."""
    state = BuildState(spec=spec, workdir=spec.out.parent)
    load_pass.run(state)
    assert state.pair is not None
    return state.pair


def graft(pair: CheckpointPair, spec: BuildSpec) -> DecodeProgram:
    """Pass `graft` on a state holding ``pair``; the program it leaves."""
    state = BuildState(spec=spec, workdir=spec.out.parent, pair=pair)
    graft_pass.run(state)
    assert state.program is not None
    return state.program


def _describe(values) -> list[tuple[str, str, list]]:
    return [(v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


@pytest.fixture(scope="module")
def parts(golden_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> PartitionedProgram:
    spec = BuildSpec(*golden_pair, tmp_path_factory.mktemp("export") / "out")
    return partition(graft(load(spec), spec), spec)


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_graph_signature_is_documented(exported_dir: Path, name: str) -> None:
    model = onnx.load(str(exported_dir / f"{name}.onnx"), load_external_data=False)
    assert (_describe(model.graph.input), _describe(model.graph.output)) == SIGNATURES[name]
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 18
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert sum(np.prod(i.dims) for i in external) > 50_000  # the weights left the graph file
    assert all((exported_dir / {e.key: e.value for e in i.external_data}["location"]).is_file() for i in external)


@torch.inference_mode()
def test_dynamic_dims_run_at_other_sizes(exported_dir: Path, exported_copy: OnnxGraphs, parts: PartitionedProgram,
                                         tmp_path: Path, run_onnx: Callable[..., dict[str, np.ndarray]]) -> None:
    rng = np.random.default_rng(0)
    # The trace used batch 2, prompt 5, 16 slots and 3 verify rows of 8 tokens; run batch 1 / 3 and 30 slots.
    feeds = {"input_ids": rng.integers(0, 384, (1, 9)), "input_lengths": np.array([9]),
             "kv_cache": np.zeros((4, 2, 1, 2, 30, 16), np.float32)}
    got = run_onnx(exported_dir / "target_prefill.onnx", feeds)
    want = parts.graph("target_prefill").module(*(torch.from_numpy(v) for v in feeds.values()))
    for name, ref in zip(SIGNATURES["target_prefill"][1], want, strict=True):
        assert np.abs(got[name[0]] - ref.numpy()).max() < 1e-4, name[0]

    # target_verify holds the custom node: run its decomposition, batch 3 and 5 verified tokens (G = 4).
    state = BuildState(spec=BuildSpec(Path("t"), Path("d"), tmp_path / "out"), workdir=tmp_path, onnx=exported_copy)
    decompose_spec_verify.run(state)
    exported_copy.save(tmp_path / "graphs")
    q = rng.random((3, 4, 384)).astype(np.float32)
    feeds = {"tokens": rng.integers(0, 384, (3, 5)), "cache_len": np.array([0, 4, 11]),
             "kv_cache": rng.normal(size=(4, 2, 3, 2, 30, 16)).astype(np.float32), "verify_len": np.array([4, 2, 0]),
             "draft_probs": q / q.sum(-1, keepdims=True), "temperature": np.array([0.0, 0.7, 1.2], np.float32),
             "uniforms": rng.random((3, 5)).astype(np.float32)}
    got = run_onnx(tmp_path / "graphs" / "target_verify.onnx", feeds)
    want = parts.graph("target_verify").module(*(torch.from_numpy(v) for v in feeds.values()))
    for name, ref in zip(SIGNATURES["target_verify"][1], want, strict=True):
        assert np.abs(got[name[0]] - ref.numpy()).max() < 1e-4, name[0]


def test_verify_ends_in_one_spec_verify_node(exported_dir: Path) -> None:
    model = onnx.load(str(exported_dir / "target_verify.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == SPEC_VERIFY.domain]
    assert len(nodes) == 1 and SPEC_VERIFY.is_node(nodes[0])
    node = nodes[0]
    assert SPEC_VERIFY.check_node(node) == SAMPLING
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"mode": b"sampling", **{k: v.encode() for k, v in SPEC_VERIFY.tensorrt_lookup.items()}}
    assert (SPEC_VERIFY.domain, SPEC_VERIFY.opset_version) in {(o.domain, o.version) for o in model.opset_import}
    # Fed by the LM head's logits and the drafts tokens[:, 1:]; then the graph's own verification inputs.
    producer = {out: n for n in model.graph.node for out in n.output}
    assert producer[node.input[0]].op_type == "MatMul"
    cut = producer[node.input[1]]
    while cut.op_type == "Slice" and cut.input[0] != "tokens":  # the exporter's optimiser is off: slices chain
        cut = producer[cut.input[0]]
    assert cut.op_type == "Slice" and cut.input[0] == "tokens"
    assert list(node.input[2:]) == [s.name for s in SPEC_VERIFY.inputs_for(SAMPLING)[2:]]
    assert list(node.output) == [o.name for o in SPEC_VERIFY.outputs]


class _Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(x.sum()) > 0:  # data-dependent control flow: torch.export cannot trace it
            return x + 1
        return x - 1


def test_export_failure_is_a_build_error_naming_the_graph() -> None:
    broken = GraphSpec("target_prefill", _Unexportable(), {"x": torch.ones(2, 3)}, ("y",), {"x": {0: "batch"}})
    with pytest.raises(BuildError, match=r"^ONNX export of graph target_prefill failed: "):
        export_graph(broken, 18)


@pytest.mark.slow  # three worker interpreters trace the graphs again (~1 min on 2 free cores)
def test_workers_over_meta_modules_export_what_the_build_exports(
        parts: PartitionedProgram, exported_dir: Path, tmp_path: Path,
        run_onnx: Callable[..., dict[str, np.ndarray]], feeds_for: Callable[..., dict[str, np.ndarray]]) -> None:
    spec = BuildSpec(parts.program.pair.target.path, parts.program.pair.draft.path, tmp_path / "out")
    models = export_graphs(parts, spec, tmp_path / "scratch", workers=2)
    assert not (tmp_path / "scratch").exists()
    for name, model in models.items():
        path = tmp_path / f"{name}.onnx"
        ir.save(model, path, external_data=f"{name}.onnx.data")
        built = onnx.load(str(exported_dir / f"{name}.onnx"), load_external_data=False)
        assert [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node] == [
            n.op_type for n in built.graph.node], name
        if any(n.domain not in ("", "ai.onnx") for n in built.graph.node):
            continue  # the verify graph's dspark::SpecVerify runs on onnxruntime only once decomposed
        feeds = feeds_for(exported_dir / f"{name}.onnx", seed=4)
        old, new = run_onnx(exported_dir / f"{name}.onnx", feeds), run_onnx(path, feeds)
        assert all(np.array_equal(old[k], new[k]) for k in old), name
