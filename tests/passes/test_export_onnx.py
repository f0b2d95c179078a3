"""Pass `export_onnx`: the three graphs with the I/O names, dtypes and symbolic dimensions of docs/PROGRAM.md,
weights as external data, and dimensions that really are dynamic (run at sizes other than the trace's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.passes import graft as graft_pass
from dspark_compile.passes import load as load_pass
from dspark_compile.passes.export_onnx import export_graph, export_graphs
from dspark_compile.passes.partition import GraphSpec, PartitionedProgram, partition
from dspark_compile.program import CheckpointPair, DecodeProgram
from dspark_compile.spec import BuildSpec

CACHE = [4, 2, "batch", 2, "cache_slots", 16]
DRAFT_CACHE = [2, 2, "batch", 2, "cache_slots", 16]
SIGNATURES = {  # name -> (inputs, outputs), each (name, dtype, shape)
    "target_prefill": (
        [("input_ids", "INT64", ["batch", "prompt_len"]), ("input_lengths", "INT64", ["batch"]),
         ("kv_cache", "FLOAT", CACHE)],
        [("last_logits", "FLOAT", ["batch", 384]), ("taps", "FLOAT", ["batch", "prompt_len", 192]),
         ("kv_cache_out", "FLOAT", CACHE)],
    ),
    "target_verify": (
        [("tokens", "INT64", ["batch", "verify_tokens"]), ("cache_len", "INT64", ["batch"]),
         ("kv_cache", "FLOAT", CACHE)],
        [("logits", "FLOAT", ["batch", "verify_tokens", 384]), ("taps", "FLOAT", ["batch", "verify_tokens", 192]),
         ("kv_cache_out", "FLOAT", CACHE)],
    ),
    "draft_propose": (
        [("anchor", "INT64", ["batch"]), ("ctx_taps", "FLOAT", ["batch", "ctx_len", 192]),
         ("ctx_count", "INT64", ["batch"]), ("cache_len", "INT64", ["batch"]), ("draft_kv", "FLOAT", DRAFT_CACHE),
         ("temperature", "FLOAT", ["batch"]), ("uniforms", "FLOAT", ["batch", 7])],
        [("draft_tokens", "INT64", ["batch", 7]), ("confidence_logits", "FLOAT", ["batch", 7]),
         ("draft_probs", "FLOAT", ["batch", 7, 384]), ("draft_kv_out", "FLOAT", DRAFT_CACHE)],
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
def test_dynamic_dims_run_at_other_sizes(exported_dir: Path, parts: PartitionedProgram,
                                         run_onnx: Callable[..., dict[str, np.ndarray]]) -> None:
    rng = np.random.default_rng(0)
    # The trace used batch 2, prompt 5, 16 slots and 3 verify rows of 8 tokens; run batch 1 / 3 and 30 slots.
    feeds = {"input_ids": rng.integers(0, 384, (1, 9)), "input_lengths": np.array([9]),
             "kv_cache": np.zeros((4, 2, 1, 2, 30, 16), np.float32)}
    got = run_onnx(exported_dir / "target_prefill.onnx", feeds)
    want = parts.graph("target_prefill").module(*(torch.from_numpy(v) for v in feeds.values()))
    for name, ref in zip(SIGNATURES["target_prefill"][1], want, strict=True):
        assert np.abs(got[name[0]] - ref.numpy()).max() < 1e-4, name[0]

    feeds = {"tokens": rng.integers(0, 384, (3, 8)), "cache_len": np.array([0, 4, 11]),
             "kv_cache": rng.normal(size=(4, 2, 3, 2, 30, 16)).astype(np.float32)}
    got = run_onnx(exported_dir / "target_verify.onnx", feeds)
    want = parts.graph("target_verify").module(*(torch.from_numpy(v) for v in feeds.values()))
    for name, ref in zip(SIGNATURES["target_verify"][1], want, strict=True):
        assert np.abs(got[name[0]] - ref.numpy()).max() < 1e-4, name[0]


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
        feeds = feeds_for(exported_dir / f"{name}.onnx", seed=4)
        old, new = run_onnx(exported_dir / f"{name}.onnx", feeds), run_onnx(path, feeds)
        assert all(np.array_equal(old[k], new[k]) for k in old), name
