"""Engines built with TensorRT-RTX (on the CPU) from small graphs of the shapes our compiler emits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dspark_compile.errors import BackendUnavailableError, BuildError
from dspark_compile.targets.tensorrt import (
    Profile,
    TrtFlavor,
    build_engine,
    check_engine_compatible,
    load_trt,
    read_engine_metadata,
)
from dspark_compile.targets.tensorrt.adapter import GpuInfo

pytest.importorskip("tensorrt_rtx_bindings")

FLOAT = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
DTYPE_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _const(name: str, values: np.ndarray, precision: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(values.astype(np.float32), name)
    if precision == "fp16":
        tensor = numpy_helper.from_array(values.astype(np.float16), name)
    elif precision == "bf16":
        tensor = helper.make_tensor(name, TensorProto.BFLOAT16, values.shape, values.ravel())
    return tensor


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:
    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def matmul_softmax_argmax(path: Path, precision: str = "fp32") -> Path:
    """Logits → probabilities and greedy token, with dynamic batch `B` and length `L`."""
    f = FLOAT[precision]
    w = np.random.default_rng(0).standard_normal((16, 32))
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"], name="lm_head"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
        helper.make_node("ArgMax", ["logits"], ["token"], name="argmax", axis=-1, keepdims=0),
    ]
    return _save(path, nodes, [helper.make_tensor_value_info("x", f, ["B", "L", 16])],
                 [helper.make_tensor_value_info("probs", f, ["B", "L", 32]),
                  helper.make_tensor_value_info("token", TensorProto.INT64, ["B", "L"])],
                 [_const("W", w, precision)])


def kv_scatter(path: Path, precision: str = "fp32") -> Path:
    """Our KV-cache write, as torch exports `cache.scatter(2, index, new)`: slot cache_len[b] + t."""
    f = FLOAT[precision]
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Shape", ["new"], ["new_shape"]),
        helper.make_node("Gather", ["new_shape", "two"], ["t"], axis=0),
        helper.make_node("Range", ["zero", "t", "one"], ["steps"]),
        helper.make_node("Reshape", ["steps", "step_shape"], ["steps_4d"]),
        helper.make_node("Unsqueeze", ["cache_len", "axes_123"], ["len_4d"]),
        helper.make_node("Add", ["len_4d", "steps_4d"], ["slots"]),
        helper.make_node("Expand", ["slots", "new_shape"], ["index"]),
        helper.make_node("ScatterElements", ["cache", "index", "new"], ["cache_out"], name="kv_write",
                         axis=2),
    ]
    inits = [
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([1, 1, -1, 1], np.int64), "step_shape"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes_123"),
    ]
    inputs = [
        helper.make_tensor_value_info("cache", f, ["B", 2, "S", 8]),
        helper.make_tensor_value_info("new", f, ["B", 2, "T", 8]),
        helper.make_tensor_value_info("cache_len", i64, ["B"]),
    ]
    outputs = [helper.make_tensor_value_info("cache_out", f, ["B", 2, "S", 8])]
    return _save(path, nodes, inputs, outputs, inits)


def rms_norm(path: Path, precision: str = "fp32") -> Path:
    """x / sqrt(mean(x²) + eps) · w, written the way the exporter spells it."""
    f = FLOAT[precision]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="rms_norm/pow"),
        helper.make_node("ReduceMean", ["sq", "last_axis"], ["ms"], name="rms_norm/mean", keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="rms_norm/add_eps"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="rms_norm/sqrt"),
        helper.make_node("Div", ["x", "rms"], ["normed"], name="rms_norm/div"),
        helper.make_node("Mul", ["normed", "weight"], ["y"], name="rms_norm/scale"),
    ]
    inits = [
        _const("two", np.array(2.0), precision),
        _const("eps", np.array(1e-6), precision),
        _const("weight", np.linspace(0.5, 1.5, 64), precision),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
    ]
    return _save(path, nodes, [helper.make_tensor_value_info("x", f, ["B", "L", 64])],
                 [helper.make_tensor_value_info("y", f, ["B", "L", 64])], inits)


GRAPHS = {
    "matmul_softmax_argmax": (matmul_softmax_argmax, [{"B": (1, 2, 8), "L": (1, 16, 32)},
                                                      {"B": (1, 2, 8), "L": (33, 64, 128)}],
                              {"MATRIX_MULTIPLY", "SOFTMAX", "TOPK"}),
    "kv_scatter": (kv_scatter, [{"B": (1, 2, 4), "T": (1, 3, 5), "S": (8, 32, 64)}], {"SCATTER"}),
    "rms_norm": (rms_norm, [{"B": (1, 2, 8), "L": (1, 16, 64)}], {"REDUCE", "UNARY", "ELEMENTWISE"}),
}


@pytest.fixture(scope="module")
def rtx() -> TrtFlavor:
    return load_trt("rtx")


@pytest.fixture(scope="module")
def mm_engine(tmp_path_factory: pytest.TempPathFactory, rtx: TrtFlavor) -> Path:
    work = tmp_path_factory.mktemp("mm")
    onnx_path = matmul_softmax_argmax(work / "mm.onnx")
    ranges = GRAPHS["matmul_softmax_argmax"][1][0]
    return build_engine(onnx_path, work / "mm.plan", flavor=rtx,
                        profiles=[Profile.from_dim_ranges(onnx_path, ranges)]).plan_path


def test_kv_scatter_graph_writes_at_cache_len(tmp_path: Path) -> None:
    """The test graph is our KV write (onnxruntime against NumPy), not just any scatter."""
    ort = pytest.importorskip("onnxruntime")
    path = kv_scatter(tmp_path / "kv.onnx")
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((2, 2, 16, 8)).astype(np.float32)
    new = rng.standard_normal((2, 2, 3, 8)).astype(np.float32)
    cache_len = np.array([0, 5], np.int64)
    (out,) = ort.InferenceSession(str(path)).run(None, {"cache": cache, "new": new, "cache_len": cache_len})
    expected = cache.copy()
    for b, start in enumerate(cache_len):
        expected[b, :, start:start + 3] = new[b]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_build_engine(tmp_path: Path, rtx: TrtFlavor, graph: str, precision: str) -> None:
    make, ranges, layer_types = GRAPHS[graph]
    onnx_path = make(tmp_path / f"{graph}.onnx", precision)
    profiles = [Profile.from_dim_ranges(onnx_path, r) for r in ranges]
    result = build_engine(onnx_path, tmp_path / "out" / "model.plan", flavor=rtx, profiles=profiles,
                          precision=precision)

    plan = result.plan_path.read_bytes()
    assert len(plan) == result.plan_bytes > 100_000
    assert (result.flavor, result.trt_version, result.precision) == ("rtx", rtx.version, precision)
    metadata = read_engine_metadata(result.plan_path)
    assert metadata["plan"] == {"bytes": len(plan), "sha256": result.plan_sha256}
    assert metadata["precision"] == precision and metadata["strongly_typed"]
    assert metadata["profiles"] == [p.to_json() for p in profiles]
    assert len(metadata["profiles"]) == len(ranges)
    # Engine I/O dtypes are the graph's: float tensors in the requested precision, integers stay int64.
    model = onnx.load(str(onnx_path))
    want = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    got = {t["name"]: t["dtype"] for t in [*metadata["inputs"], *metadata["outputs"]]}
    names = {FLOAT[precision]: DTYPE_NAME[precision], TensorProto.INT64: "int64"}
    assert got == {name: names[t] for name, t in want.items()}

    inspector = json.loads(result.inspector_path.read_text())
    types = {layer["type"] for layer in inspector["layers"]}
    assert layer_types <= types, types
    assert len(inspector["layers"]) == result.num_layers == metadata["layers"]["num_layers"]
    layers = inspector["layers"]
    assert any(out["dtype"] == DTYPE_NAME[precision] for layer in layers for out in layer["outputs"])
    assert inspector["plugin_layers"] == [] and result.plugin_layers == ()
    assert {layer["onnx_node"] for layer in layers} >= {n.name for n in model.graph.node if n.name}
    check_engine_compatible(result.plan_path, flavor=rtx)
    assert sorted(p.name for p in result.plan_path.parent.iterdir()) == [
        "model.plan", "model.plan.inspect.json", "model.plan.json"]


def test_bf16_engine(tmp_path: Path, rtx: TrtFlavor) -> None:
    onnx_path = rms_norm(tmp_path / "rms.onnx", "bf16")
    profile = Profile.from_dim_ranges(onnx_path, {"B": (1, 2, 4), "L": (1, 8, 16)})
    result = build_engine(onnx_path, tmp_path / "rms.plan", flavor=rtx, profiles=[profile], precision="bf16")
    assert read_engine_metadata(result.plan_path)["inputs"][0]["dtype"] == "bfloat16"


def test_engine_bytes_are_reproducible_up_to_symbol_numbering(tmp_path: Path, rtx: TrtFlavor) -> None:
    """Builds of the same graph give plans of the same size that differ, if at all, in a few bytes: the
    TensorRT-RTX 1.7 builder numbers its shape symbols in an order that follows its worker threads' timing
    (measured: 3 variants in 12 builds of this graph, 17 bytes apart). Weights, kernels and layers are equal."""
    onnx_path = kv_scatter(tmp_path / "kv.onnx", "fp16")
    profile = Profile.from_dim_ranges(onnx_path, GRAPHS["kv_scatter"][1][0])
    plans = [build_engine(onnx_path, tmp_path / f"{i}.plan", flavor=rtx, profiles=[profile],
                          precision="fp16").plan_path.read_bytes() for i in range(3)]
    for other in plans[1:]:
        assert len(other) == len(plans[0])
        assert sum(a != b for a, b in zip(plans[0], other, strict=True)) <= 64


def test_verify_subgraph_is_reported(tmp_path: Path, rtx: TrtFlavor) -> None:
    """Layers from ONNX nodes named ``spec_verify/...`` (the decomposed verification) are listed as such."""
    nodes = [
        helper.make_node("ArgMax", ["logits"], ["target_tokens"], name="spec_verify/argmax", axis=-1,
                         keepdims=0),
        helper.make_node("Equal", ["target_tokens", "drafts"], ["match"], name="spec_verify/equal"),
        helper.make_node("Cast", ["match"], ["y"], name="cast_out", to=TensorProto.INT64),
    ]
    onnx_path = _save(tmp_path / "verify.onnx", nodes,
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "G", 32]),
                       helper.make_tensor_value_info("drafts", TensorProto.INT64, ["B", "G"])],
                      [helper.make_tensor_value_info("y", TensorProto.INT64, ["B", "G"])], [])
    profile = Profile.from_dim_ranges(onnx_path, {"B": (1, 2, 4), "G": (1, 4, 8)})
    result = build_engine(onnx_path, tmp_path / "verify.plan", flavor=rtx, profiles=[profile])
    inspector = json.loads(result.inspector_path.read_text())
    verify = [layer["onnx_node"] for layer in inspector["layers"] if layer["name"] in result.verify_layers]
    assert {"spec_verify/argmax", "spec_verify/equal"} <= set(verify)
    assert "cast_out" not in verify


def test_timing_cache_is_not_used_with_rtx(
    tmp_path: Path, rtx: TrtFlavor, caplog: pytest.LogCaptureFixture
) -> None:
    """TensorRT-RTX looks for a GPU once a timing cache is set: the build skips it, says so, records it."""
    onnx_path = rms_norm(tmp_path / "rms.onnx")
    profile = Profile.from_dim_ranges(onnx_path, {"B": (1, 1, 2), "L": (1, 4, 8)})
    cache = tmp_path / "timing.cache"
    result = build_engine(onnx_path, tmp_path / "rms.plan", flavor=rtx, profiles=[profile],
                          timing_cache=cache)
    assert "timing cache" in caplog.text
    assert read_engine_metadata(result.plan_path)["timing_cache"]["used"] is False
    assert not cache.exists()


def _rewrite_metadata(plan_path: Path, **changes: object) -> None:
    path = plan_path.with_name(plan_path.name + ".json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_check_engine_compatible_rejects_other_version(mm_engine: Path, rtx: TrtFlavor, tmp_path: Path,
                                                       ) -> None:
    copy = tmp_path / "mm.plan"
    copy.write_bytes(mm_engine.read_bytes())
    (tmp_path / "mm.plan.json").write_text(mm_engine.with_name("mm.plan.json").read_text())
    check_engine_compatible(copy, flavor=rtx)
    _rewrite_metadata(copy, trt_version="1.6.0.0")
    with pytest.raises(BackendUnavailableError, match=r"with TensorRT-RTX 1\.6\.0\.0.*has TensorRT-RTX 1\.7"):
        check_engine_compatible(copy, flavor=rtx)
    _rewrite_metadata(copy, trt_version=rtx.version, flavor="full")
    with pytest.raises(BackendUnavailableError, match="built with TensorRT "):
        check_engine_compatible(copy, flavor=rtx)


def test_check_engine_compatible_rejects_non_rtx_gpu(mm_engine: Path, rtx: TrtFlavor) -> None:
    """A TensorRT-RTX engine never runs on an H100; on an RTX 4090 (8.9) it does. GPUs are passed in."""
    with pytest.raises(BackendUnavailableError, match=r"H100 80GB HBM3 \(9\.0\)"):
        check_engine_compatible(mm_engine, flavor=rtx, gpus=[GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0))])
    check_engine_compatible(mm_engine, flavor=rtx, gpus=[GpuInfo(0, "NVIDIA GeForce RTX 4090", (8, 9))])


def test_check_engine_compatible_rejects_damaged_engine(mm_engine: Path, rtx: TrtFlavor, tmp_path: Path,
                                                        ) -> None:
    plan = tmp_path / "mm.plan"
    data = bytearray(mm_engine.read_bytes())
    plan.write_bytes(data[: len(data) // 2])
    (tmp_path / "mm.plan.json").write_text(mm_engine.with_name("mm.plan.json").read_text())
    with pytest.raises(BuildError, match="modified or truncated"):
        check_engine_compatible(plan, flavor=rtx)
    # A plan whose header is garbage but whose metadata matches: TensorRT-RTX's own header check names it.
    data[:64] = bytes(64)
    plan.write_bytes(data)
    _rewrite_metadata(plan, plan={"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    with pytest.raises(BuildError, match="finds the engine malformed"):
        check_engine_compatible(plan, flavor=rtx)
    plan.with_name("mm.plan.json").unlink()
    with pytest.raises(BuildError, match="metadata not found"):
        check_engine_compatible(plan, flavor=rtx)


def test_precision_comes_from_the_weights(tmp_path: Path, rtx: TrtFlavor) -> None:
    onnx_path = matmul_softmax_argmax(tmp_path / "mm16.onnx", "fp16")
    profile = Profile.from_dim_ranges(onnx_path, GRAPHS["matmul_softmax_argmax"][1][0])
    with pytest.raises(BuildError, match="computes in float16 but precision fp32"):
        build_engine(onnx_path, tmp_path / "mm.plan", flavor=rtx, profiles=[profile], precision="fp32")
