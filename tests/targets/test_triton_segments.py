"""A target_step built as segment engines (issue 14) in the Triton repository: one TensorRT model per segment
and ``dspark_target`` an ensemble of them with the whole graph's I/O, so the orchestrator is unchanged.

The tritonserver available here (pytriton's) has only the python backend: it cannot load ``tensorrt_plan`` or
``ensemble`` models, and no GPU is here to run the engines. So the repository is checked by parsing its
configs with Triton's ModelConfig protobuf: the models written, the ensemble's exact wiring, and that
``validate_config`` rejects a broken ensemble with a message that names the fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import helper
from test_triton_standin import HEAD_DIM, KV_HEADS, SIGNATURES, TAPS, F, write_fake_build

from dspark_compile.artifacts import GraphIO, TensorIO
from dspark_compile.errors import BuildError
from dspark_compile.targets.triton import pbtxt
from dspark_compile.targets.triton.repository import TritonOptions, write_triton_repository

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")

# target_step split by decoder layer (2 layers) as the segmentation pass does: segment 0 embeds and writes layer
# 0's K/V rows, segment 1 layer 1's, segment 2 gathers the rows into kv_new and decides.
TARGET_INPUTS, TARGET_OUTPUTS = SIGNATURES["target_step"]
BY_NAME = {t[0]: t for t in TARGET_INPUTS}
LAYER_ROWS = [1, 2, "B", KV_HEADS, "T", HEAD_DIM]
HIDDEN0, HIDDEN1 = ("hidden0", F, ["B", "T", TAPS]), ("hidden1", F, ["B", "T", TAPS])
ROWS0, ROWS1 = ("kv_rows0", F, LAYER_ROWS), ("kv_rows1", F, LAYER_ROWS)
SEGMENTS = [
    ([BY_NAME["tokens"], BY_NAME["embed_tokens"]], [HIDDEN0, ROWS0]),
    ([HIDDEN0, BY_NAME["kv_cache"], BY_NAME["cache_len"]], [HIDDEN1, ROWS1]),
    ([HIDDEN1, ROWS0, ROWS1, *(t for t in TARGET_INPUTS if t[0] != "tokens")], TARGET_OUTPUTS),
]
SEG_MODELS = [f"dspark_target_seg{k}" for k in range(len(SEGMENTS))]


def write_segmented_build(root: Path) -> Path:
    """A fake build whose target_step has segment engines: ONNX segment graphs (I/O only, not meant to run),
    fake plans, no whole target_step.plan, and the manifest's segmented plan records."""
    write_fake_build(root, engines=True)
    (root / "engines" / "target_step.plan").unlink()
    records: list[dict[str, Any]] = [{"graph": "draft_propose", "plan": "draft_propose.plan"}]
    for k, (inputs, outputs) in enumerate(SEGMENTS):
        values = [[helper.make_tensor_value_info(*t) for t in ts] for ts in (inputs, outputs)]
        graph = helper.make_graph([], f"target_step.seg{k}", *values)
        onnx.save(helper.make_model(graph), root / "onnx" / f"target_step.seg{k}.onnx")
        (root / "engines" / f"target_step.seg{k}.plan").write_bytes(b"not a real engine %d" % k)
        records.append({"graph": "target_step", "plan": f"target_step.seg{k}.plan", "segment": k,
                        "segments": len(SEGMENTS), "inputs": [t[0] for t in inputs],
                        "outputs": [t[0] for t in outputs]})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["engines"] = {"flavor": "tensorrt_rtx", "plans": records}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _load(path: Path) -> Any:
    return pbtxt.parse_config(path.read_text(), path)


def _steps(config: Any) -> list[tuple[str, int, dict[str, str], dict[str, str]]]:
    return [(s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
            for s in config.ensemble_scheduling.step]


def test_segmented_target_is_an_ensemble_of_segment_engines(tmp_path: Path) -> None:
    build = write_segmented_build(tmp_path / "build")
    repo = write_triton_repository(build, tmp_path / "out", TritonOptions(backend_mode="bls"))
    root = repo.directory
    assert sorted(repo.models) == ["dspark", "dspark_draft", "dspark_target", *SEG_MODELS]
    for k, (inputs, outputs) in enumerate(SEGMENTS):
        seg = _load(root / SEG_MODELS[k] / "config.pbtxt")
        assert seg.platform == "tensorrt_plan" and seg.max_batch_size == 0
        assert seg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert [t.name for t in seg.input] == [t[0] for t in inputs]
        assert [t.name for t in seg.output] == [t[0] for t in outputs]
        assert (root / SEG_MODELS[k] / "1" / "model.plan").samefile(build / "engines" / f"target_step.seg{k}.plan")

    target = _load(root / "dspark_target" / "config.pbtxt")
    assert target.platform == "ensemble" and target.max_batch_size == 0 and not target.instance_group
    assert (root / "dspark_target" / "1").is_dir() and not list((root / "dspark_target" / "1").iterdir())
    # Exactly the whole graph's I/O (names, types, dims): the orchestrator calls it as it calls one engine.
    whole = GraphIO.read(build / "onnx" / "target_step.onnx")
    assert [(t.name, t.data_type, list(t.dims)) for t in target.input] == [
        (t.name, mc.DataType.Value(t.data_type), list(t.dims)) for t in pbtxt.triton_tensors(whole.inputs, "")]
    assert [(t.name, t.data_type, list(t.dims)) for t in target.output] == [
        (t.name, mc.DataType.Value(t.data_type), list(t.dims)) for t in pbtxt.triton_tensors(whole.outputs, "")]
    same = lambda *names: {n: n for n in names}  # noqa: E731 - ensemble tensors keep the graphs' names
    assert _steps(target) == [
        ("dspark_target_seg0", -1, same("tokens", "embed_tokens"), same("hidden0", "kv_rows0")),
        ("dspark_target_seg1", -1, same("hidden0", "kv_cache", "cache_len"), same("hidden1", "kv_rows1")),
        ("dspark_target_seg2", -1, same(*(t[0] for t in SEGMENTS[2][0])), same(*(t[0] for t in TARGET_OUTPUTS))),
    ]

    # The orchestrator still calls dspark_target with the whole graph's signature.
    params = {k: v.string_value for k, v in _load(root / "dspark" / "config.pbtxt").parameters.items()}
    info = json.loads(params["model_info"])
    assert info["models"] == {"target_step": "dspark_target", "draft_propose": "dspark_draft"}
    assert [t["name"] for t in info["signatures"]["target_step"]["outputs"]] == [t[0] for t in TARGET_OUTPUTS]
    assert _load(root / "dspark_draft" / "config.pbtxt").platform == "tensorrt_plan"


def test_a_small_build_has_no_segment_models(tmp_path: Path) -> None:
    repo = write_triton_repository(write_fake_build(tmp_path / "build", engines=True), tmp_path / "out",
                                   TritonOptions(backend_mode="bls"))
    assert sorted(repo.models) == ["dspark", "dspark_draft", "dspark_target"]
    assert _load(repo.directory / "dspark_target" / "config.pbtxt").platform == "tensorrt_plan"


def test_onnx_platform_serves_the_whole_graph(tmp_path: Path) -> None:
    """Segments are engines' business: the onnxruntime platform serves the whole target_step.onnx."""
    build = write_segmented_build(tmp_path / "build")
    repo = write_triton_repository(build, tmp_path / "out", TritonOptions(
        backend_mode="bls", platform="onnxruntime_onnx", instance_kind="KIND_CPU"))
    assert sorted(repo.models) == ["dspark", "dspark_draft", "dspark_target"]
    assert (repo.directory / "dspark_target" / "1" / "model.onnx").is_file()


def _break(config: Any, how: str) -> None:
    steps = config.ensemble_scheduling.step
    if how == "missing model":
        steps[1].model_name = "dspark_target_seg9"
    elif how == "unknown tensor":
        steps[1].input_map["hidden0"] = "hidden_0"
    elif how == "reordered":
        first = type(steps[0])()
        first.CopyFrom(steps[0])
        del steps[0]
        steps.add().CopyFrom(first)
    elif how == "output lost":
        del steps[2].output_map["kv_new"]
    elif how == "written twice":
        steps[1].output_map["kv_rows1"] = "kv_rows0"
    elif how == "not an input":
        steps[0].input_map["lm_head"] = "lm_head"
    elif how == "unmapped input":
        del steps[1].input_map["cache_len"]
    elif how == "instance group":
        config.instance_group.add(count=1)


@pytest.mark.parametrize(("how", "problem"), [
    ("missing model", r"step 1 \(dspark_target_seg9\): model 'dspark_target_seg9' is not in the repository"),
    ("unknown tensor", r"step 1 \(dspark_target_seg1\): input 'hidden0' reads ensemble tensor 'hidden_0', which is "
                       "neither an ensemble input nor an output of an earlier step"),
    ("reordered", r"step 0 \(dspark_target_seg1\): input 'hidden0' reads ensemble tensor 'hidden0'"),
    ("output lost", "ensemble output 'kv_new' is produced by no step"),
    ("written twice", r"output 'kv_rows1' writes ensemble tensor 'kv_rows0', which already has a value"),
    ("not an input", r"input_map names 'lm_head', which is not an input of dspark_target_seg0"),
    ("unmapped input", r"input\(s\) cache_len of dspark_target_seg1 are not mapped"),
    ("instance group", "an ensemble takes no instance_group"),
])
def test_validation_rejects_a_broken_ensemble(tmp_path: Path, how: str, problem: str) -> None:
    repo = write_triton_repository(write_segmented_build(tmp_path / "build"), tmp_path / "out",
                                   TritonOptions(backend_mode="bls"))
    path = repo.directory / "dspark_target" / "config.pbtxt"
    pbtxt.validate_config(path)  # as written: valid
    config = _load(path)
    _break(config, how)
    path.write_text(pbtxt.render(config))
    with pytest.raises(BuildError, match=problem):
        pbtxt.validate_config(path)


def test_a_chain_that_does_not_compose_is_refused_at_build_time(tmp_path: Path) -> None:
    whole = GraphIO((TensorIO("x", "float", ("n",)), TensorIO("y", "float", ("n",))),
                    (TensorIO("z", "float", ("n",)),))
    seg0 = GraphIO((TensorIO("x", "float", ("n",)),), (TensorIO("h", "float", ("n",)),))
    seg1 = GraphIO((TensorIO("h", "float", ("n",)), TensorIO("w", "float", ("n",))),
                   (TensorIO("z", "float", ("n",)),))
    with pytest.raises(BuildError, match=r"step 1 \(m_seg1\) reads w, which neither the whole graph"):
        pbtxt.ensemble_config("m", whole, [("m_seg0", seg0), ("m_seg1", seg1)])
    with pytest.raises(BuildError, match="no step produces the graph output.s. z; no step reads the graph "
                                         r"input\(s\) y"):
        pbtxt.ensemble_config("m", whole, [("m_seg0", seg0)])
    # The repository writer: a segment engine without its ONNX graph, and ONNX segments beyond the engines.
    build = write_segmented_build(tmp_path / "build")
    (build / "engines" / "target_step.seg2.plan").unlink()
    with pytest.raises(BuildError, match="more ONNX segments than the 2 engines"):
        write_triton_repository(build, tmp_path / "out", TritonOptions(backend_mode="bls"))
    (build / "onnx" / "target_step.seg1.onnx").unlink()
    with pytest.raises(BuildError, match=r"target_step\.seg1\.onnx: missing beside the segment engine"):
        write_triton_repository(build, tmp_path / "out", TritonOptions(backend_mode="bls"))
    assert not (tmp_path / "out" / "triton").exists()
