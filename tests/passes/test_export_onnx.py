"""Pass `export_onnx`: the three graphs with the I/O names, dtypes and symbolic dimensions of docs/PROGRAM.md,
weights as external data, and dimensions that really are dynamic (run at sizes other than the trace's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dspark_compile.errors import BuildError
from dspark_compile.passes.export_onnx import export_onnx
from dspark_compile.passes.graft import graft
from dspark_compile.passes.load import load
from dspark_compile.passes.partition import GraphSpec, PartitionedProgram, partition
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
         ("kv_cache", "FLOAT", CACHE)],
        [("logits", "FLOAT", ["batch", "verify_tokens", 384]), ("taps", "FLOAT", ["batch", "verify_tokens", 192]),
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


def test_export_failure_is_a_build_error_naming_the_graph(parts: PartitionedProgram, tmp_path: Path) -> None:
    broken = GraphSpec("target_prefill", _Unexportable(), {"x": torch.ones(2, 3)}, ("y",), {"x": {0: "batch"}})
    spec = BuildSpec(Path("t"), Path("d"), tmp_path / "out")
    with pytest.raises(BuildError, match=r"^ONNX export of graph target_prefill failed: "):
        export_onnx(PartitionedProgram(parts.program, (broken,)), spec, tmp_path / "onnx")
