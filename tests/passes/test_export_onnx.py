"""Pass `export_onnx`: the two graphs with the I/O names, dtypes and symbolic dimensions of docs/PROGRAM.md,
weights as external data (the shared embedding / LM head as inputs), target_step ending in exactly one
`dspark::SpecVerify` node as the plugin's schema declares it, and dimensions that really are dynamic (run at
sizes other than the trace's)."""

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
from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.passes import decompose_spec_verify
from dspark_compile.passes.export_onnx import export_graph, export_graphs
from dspark_compile.passes.partition import ExportJob, PartitionedProgram, partition
from dspark_compile.plugins.spec_verify.op_schema import SAMPLING, SPEC_VERIFY
from dspark_compile.program import DecodeProgram

CACHE = [4, 2, "batch", 2, "cache_slots", 16]
DRAFT_CACHE = [2, 2, "batch", 2, "cache_slots", 16]
WEIGHTS = [("embed_tokens", "FLOAT", [384, 64]), ("lm_head", "FLOAT", [384, 64])]  # inputs, not constants
SIGNATURES = {  # name -> (inputs, outputs), each (name, dtype, shape)
    "target_step": (
        [("tokens", "INT64", ["batch", "step_len"]), ("cache_len", "INT64", ["batch"]),
         ("kv_cache", "FLOAT", CACHE), ("logit_rows", "INT64", ["batch", "decide_len"]),
         ("verify_len", "INT64", ["batch"]), *WEIGHTS,
         ("draft_probs", "FLOAT", ["batch", "draft_len", 384]), ("temperature", "FLOAT", ["batch"]),
         ("uniforms", "FLOAT", ["batch", "decide_len"])],
        [("accepted", "INT64", ["batch"]), ("next_token", "INT64", ["batch"]),
         ("taps", "FLOAT", ["batch", "step_len", 192]),
         ("kv_new", "FLOAT", [4, 2, "batch", 2, "step_len", 16])],
    ),
    "draft_propose": (
        [("anchor", "INT64", ["batch"]), ("ctx_taps", "FLOAT", ["batch", "ctx_len", 192]),
         ("ctx_count", "INT64", ["batch"]), ("cache_len", "INT64", ["batch"]), ("draft_kv", "FLOAT", DRAFT_CACHE),
         *WEIGHTS, ("temperature", "FLOAT", ["batch"]), ("uniforms", "FLOAT", ["batch", 7])],
        [("draft_tokens", "INT64", ["batch", 7]), ("confidence_logits", "FLOAT", ["batch", 7]),
         ("draft_probs", "FLOAT", ["batch", 7, 384]), ("draft_kv_new", "FLOAT", [2, 2, "batch", 2, "ctx_len", 16])],
    ),
}


def _describe(values) -> list[tuple[str, str, list]]:
    return [(v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


@pytest.fixture(scope="module")
def parts(golden_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
          grafted: Callable[[BuildSpec], DecodeProgram]) -> PartitionedProgram:
    spec = BuildSpec(*golden_pair, tmp_path_factory.mktemp("export") / "out")
    return partition(grafted(spec), spec)


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_graph_signature_is_documented(exported_dir: Path, name: str) -> None:
    model = onnx.load(str(exported_dir / f"{name}.onnx"), load_external_data=False)
    assert (_describe(model.graph.input), _describe(model.graph.output)) == SIGNATURES[name]
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 18
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert sum(np.prod(i.dims) for i in external) > 50_000  # the weights left the graph file
    assert all((exported_dir / {e.key: e.value for e in i.external_data}["location"]).is_file() for i in external)


@torch.inference_mode()
def test_dynamic_dims_run_at_other_sizes(exported_copy: OnnxGraphs, parts: PartitionedProgram, tmp_path: Path,
                                         run_onnx: Callable[..., dict[str, np.ndarray]]) -> None:
    rng = np.random.default_rng(0)
    target = parts.program.target
    weights = {"embed_tokens": target.embed_tokens.weight.numpy(), "lm_head": target.lm_head.weight.numpy()}
    # target_step holds the custom node: run its decomposition.
    state = BuildState(spec=BuildSpec(Path("t"), Path("d"), tmp_path / "out"), workdir=tmp_path, onnx=exported_copy)
    decompose_spec_verify.run(state)
    exported_copy.save(tmp_path / "graphs")
    step = parts.graph("target_step")
    # The trace used batch 2, a chunk of 5 tokens, 3 decided rows and 16 slots. Prefill: batch 1, a prompt of 9,
    # 30 slots, one decided row (the last position) and no drafts.
    prefill = {"tokens": rng.integers(0, 384, (1, 9)), "cache_len": np.array([0]),
               "kv_cache": np.zeros((4, 2, 1, 2, 30, 16), np.float32), "logit_rows": np.array([[8]]),
               "verify_len": np.array([0]), **weights, "draft_probs": np.zeros((1, 0, 384), np.float32),
               "temperature": np.array([0.0], np.float32), "uniforms": np.array([[0.3]], np.float32)}
    # Verification: batch 3, 5 tokens (G = 4).
    q = rng.random((3, 4, 384)).astype(np.float32)
    verify = {"tokens": rng.integers(0, 384, (3, 5)), "cache_len": np.array([0, 4, 11]),
              "kv_cache": rng.normal(size=(4, 2, 3, 2, 30, 16)).astype(np.float32),
              "logit_rows": np.tile(np.arange(5), (3, 1)), "verify_len": np.array([4, 2, 0]), **weights,
              "draft_probs": q / q.sum(-1, keepdims=True), "temperature": np.array([0.0, 0.7, 1.2], np.float32),
              "uniforms": rng.random((3, 5)).astype(np.float32)}
    for feeds in (prefill, verify):
        got = run_onnx(tmp_path / "graphs" / "target_step.onnx", feeds)
        want = step.module(*(torch.from_numpy(feeds[n]) for n in step.inputs))
        for name, ref in zip(SIGNATURES["target_step"][1], want, strict=True):
            assert np.abs(got[name[0]] - ref.numpy()).max() < 1e-4, name[0]


def test_step_ends_in_one_spec_verify_node(exported_dir: Path) -> None:
    model = onnx.load(str(exported_dir / "target_step.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == SPEC_VERIFY.domain]
    assert len(nodes) == 1 and SPEC_VERIFY.is_node(nodes[0])
    node = nodes[0]
    assert SPEC_VERIFY.check_node(node) == SAMPLING
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"mode": b"sampling", **{k: v.encode() for k, v in SPEC_VERIFY.tensorrt_lookup.items()}}
    assert (SPEC_VERIFY.domain, SPEC_VERIFY.opset_version) in {(o.domain, o.version) for o in model.opset_import}
    # Fed by the LM head (one Gemm over the lm_head input as stored: no transposed copy) and the drafts, the
    # tokens at the decided rows but the first; then the graph's own verification inputs.
    producer = {out: n for n in model.graph.node for out in n.output}
    head = producer[node.input[0]]
    while head.op_type != "Gemm":
        head = producer[head.input[0]]
    assert head.input[1] == "lm_head" and {a.name: a.i for a in head.attribute}.get("transB") == 1
    drafts = producer[node.input[1]]
    assert drafts.op_type == "GatherElements" and drafts.input[0] == "tokens"
    assert list(node.input[2:]) == [s.name for s in SPEC_VERIFY.inputs_for(SAMPLING)[2:]]
    assert list(node.output) == [o.name for o in SPEC_VERIFY.outputs]
    assert not any(n.op_type == "Transpose" and n.input[0] in ("lm_head", "embed_tokens") for n in model.graph.node)


class _Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(x.sum()) > 0:  # data-dependent control flow: torch.export cannot trace it
            return x + 1
        return x - 1


def test_export_failure_is_a_build_error_naming_the_graph() -> None:
    broken = ExportJob("target_step", _Unexportable(), {"x": torch.ones(2, 3)}, ("y",), {"x": {0: "batch"}})
    with pytest.raises(BuildError, match=r"^ONNX export of graph target_step failed: "):
        export_graph(broken, 18)


@pytest.mark.slow  # two worker interpreters trace the graphs again (~1 min on 2 free cores)
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


@pytest.mark.slow  # traces both graphs again (~40 s on this box)
@pytest.mark.parametrize(("name", "host", "layers"), [("target_step", "target", 4), ("draft_propose", "draft", 2)])
def test_layers_are_traced_once_and_copied(parts: PartitionedProgram, name: str, host: str, layers: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """layer_template: one trace of the first layer plus one of the graph, never the L layers; each copy reads its
    own layer's weights (named as the whole-model trace names them)."""
    from dspark_compile.passes import export_onnx

    traced: list[str] = []
    trace = export_onnx._trace
    monkeypatch.setattr(export_onnx, "_trace", lambda gs, opset: (traced.append(gs.name), trace(gs, opset))[1])
    model = export_graph(parts.graph(name), 18)
    assert traced == ["decoder_layer", name]
    assert not [n for n in model.graph if n.domain == "dspark.layer"]
    module = parts.graph(name).module
    for i in range(layers):
        value = model.graph.initializers[f"{host}.layers.{i}.mlp.down_proj.weight"]
        weight = module.get_submodule(f"{host}.layers.{i}.mlp.down_proj").weight
        assert value.const_value.raw.data_ptr() == weight.data_ptr()


class _Mixed(nn.Module):
    """Two layers of different shapes under ``target.layers`` (no layer template applies), a head outside."""

    def __init__(self) -> None:
        super().__init__()
        self.target = nn.Module()
        self.target.layers = nn.ModuleList([nn.Linear(32, 48, bias=False), nn.Linear(48, 32, bias=False)])
        self.head = nn.Linear(32, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.target.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def test_a_graph_traced_whole_names_its_layers() -> None:
    """name_by_layer: a graph traced whole (Gemma4's mixed layers) gets the layer template's names, on nodes
    and values, so that once optimize_onnx folds each weight's Transpose into a new initializer, that one still
    says its layer (targets/tensorrt/segments.py cuts by these names); graph outputs keep theirs."""
    from dspark_compile.passes.optimize_onnx import optimize
    from dspark_compile.targets.tensorrt.segments import layer_of

    torch.manual_seed(0)
    module = _Mixed().eval()
    x = torch.randn(2, 3, 32)  # [batch, tokens, hidden]: each linear a MatMul over its transposed weight
    model = export_graph(ExportJob("mixed", module, {"x": x}, ("y",), {"x": {0: "batch", 1: "step_len"}}), 18)
    optimize(model)
    graph = model.graph
    assert [v.name for v in graph.outputs] == ["y"]
    matmuls = [n for n in graph if n.op_type == "MatMul"]
    assert [layer_of(n) for n in matmuls] == [0, 1, None]
    weights = [next(v.name for v in n.inputs if v is not None and v.name in graph.initializers) for n in matmuls]
    assert [w.split(".")[:3] for w in weights[:2]] == [["target", "layers", "0"], ["target", "layers", "1"]]
    assert not weights[2].startswith("target.layers.")
    assert [layer_of(n) for n in graph if n.op_type == "Relu"] == [None, None]  # the host applies them
    import onnxruntime as ort  # only names changed: the graph still computes the module

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(y, module(x).detach().numpy(), rtol=1e-5, atol=1e-6)
