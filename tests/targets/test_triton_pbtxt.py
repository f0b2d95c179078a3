"""config.pbtxt generation and validation, and the repository layout written from a build directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_triton_standin import BLOCK, SIGNATURES, TAPS, VOCAB, stand_in_info, write_fake_build

from dspark_compile.artifacts import GraphIO, TensorIO
from dspark_compile.errors import BuildError, UsageError
from dspark_compile.targets.triton import pbtxt
from dspark_compile.targets.triton.repository import TritonOptions, write_triton_repository

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def test_triton_tensors_keep_static_dims_and_mark_dynamic(tmp_path: Path) -> None:
    build = write_fake_build(tmp_path / "build")
    io = GraphIO.read(build / "onnx" / "target_step.onnx")
    inputs, outputs = pbtxt.triton_tensors(io.inputs, "v"), pbtxt.triton_tensors(io.outputs, "v")
    assert [t.name for t in inputs] == [name for name, _, _ in SIGNATURES["target_step"][0]]
    assert inputs[0] == pbtxt.TritonTensor("tokens", "TYPE_INT64", (-1, -1))
    assert next(t for t in inputs if t.name == "kv_cache").dims == (2, 2, -1, 2, -1, 4)
    assert next(t for t in inputs if t.name == "embed_tokens").dims == (VOCAB, TAPS)  # a weight input: static
    assert next(t for t in outputs if t.name == "taps") == pbtxt.TritonTensor("taps", "TYPE_FP32", (-1, -1, TAPS))


def test_graph_config_round_trips_through_triton_protobuf(tmp_path: Path) -> None:
    build = write_fake_build(tmp_path / "build")
    io = GraphIO.read(build / "onnx" / "draft_propose.onnx")
    text = pbtxt.render(pbtxt.graph_model_config("dspark_draft", io, platform="tensorrt_plan"))
    parsed = pbtxt.parse_config(text, Path("config.pbtxt"))
    assert parsed.platform == "tensorrt_plan" and parsed.max_batch_size == 0
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    probs = next(o for o in parsed.output if o.name == "draft_probs")
    assert probs.data_type == mc.TYPE_FP32 and list(probs.dims) == [-1, BLOCK, VOCAB]


def test_tensorrt_on_cpu_is_refused() -> None:
    io = GraphIO((TensorIO("x", "float", ("n",)),), (TensorIO("y", "float", ("n",)),))
    with pytest.raises(BuildError, match="GPU"):
        pbtxt.graph_model_config("m", io, platform="tensorrt_plan", instance_kind="KIND_CPU")


@pytest.mark.parametrize(("text", "problem"), [
    ('name: "other" backend: "python" input [{name: "a" data_type: TYPE_INT64 dims: [-1]}] '
     'output [{name: "b" data_type: TYPE_INT64 dims: [-1]}]', "differs from its directory"),
    ('name: "m" platform: "pytorch_libtorch" input [{name: "a" data_type: TYPE_INT64 dims: [-1]}] '
     'output [{name: "b" data_type: TYPE_INT64 dims: [-1]}]', "is not one of"),
    ('name: "m" backend: "python" input [{name: "a" data_type: TYPE_INT64 dims: [0]}] '
     'output [{name: "a" data_type: TYPE_INT64 dims: [-1]}]', "used twice"),
    ('name: "m" backend: "python" input [{name: "a" dims: [-1]}] '
     'output [{name: "b" data_type: TYPE_INT64 dims: [-1]}]', "no data_type"),
    ('name: "m" backend: "python" input [{name: "a" data_type: TYPE_INT64 dims: [-1]}] '
     'output [{name: "b" data_type: TYPE_INT64 dims: [-1]}]', "1/model.py is missing"),
    ('name: "m" backend: "python" inputs [{name: "a"}]', "not a valid Triton ModelConfig"),
])
def test_validation_catches_what_the_server_would_reject(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text(text)
    with pytest.raises(BuildError, match=problem):
        pbtxt.validate_config(tmp_path / "m" / "config.pbtxt")


def _load(path: Path) -> object:
    return pbtxt.parse_config(path.read_text(), path)


def test_onnx_repository_layout(tmp_path: Path) -> None:
    build = write_fake_build(tmp_path / "build")
    repo = write_triton_repository(build, tmp_path / "out", TritonOptions(backend_mode="bls"))
    root = tmp_path / "out" / "triton"
    assert repo.directory == root
    assert sorted(repo.models) == ["dspark", "dspark_draft", "dspark_target"]
    for name in ("dspark_target", "dspark_draft"):
        assert (root / name / "1" / "model.onnx").is_file()
        config = _load(root / name / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
    # External weights keep their relative location next to the renamed model.onnx.
    assert (root / "dspark_target" / "1" / "target_step.onnx.data").is_file()
    step = _load(root / "dspark_target" / "config.pbtxt")
    assert [i.name for i in step.input][:5] == ["tokens", "cache_len", "kv_cache", "logit_rows", "verify_len"]
    assert list(step.output[0].dims) == [-1]
    assert not step.HasField("dynamic_batching")

    orchestrator = _load(root / "dspark" / "config.pbtxt")
    assert orchestrator.backend == "python" and orchestrator.model_transaction_policy.decoupled
    assert {i.name: i.optional for i in orchestrator.input} == {  # prompt_ids or text_input: checked per request
        "prompt_ids": True, "max_new_tokens": True, "temperature": True, "seed": True, "text_input": True,
        "max_tokens": True, "stream": True, "random_seed": True, "stop_words": True, "end_id": True, "top_k": True,
        "top_p": True, "beam_width": True}
    assert [o.name for o in orchestrator.output] == ["tokens", "accepted", "text_output"]
    params = {k: v.string_value for k, v in orchestrator.parameters.items()}
    assert params["backend_mode"] == "bls"
    info = json.loads(params["model_info"])
    assert info["models"] == {"target_step": "dspark_target", "draft_propose": "dspark_draft"}
    # The weight inputs: read by the orchestrator from its own hard link of the build's weights file.
    assert {r["file"] for r in info["weight_inputs"].values()} == {"dspark/1/weights.bin"}
    assert (root / "dspark" / "1" / "weights.bin").samefile(build / "onnx" / "weights.bin")
    assert info["info"] == stand_in_info().to_json()  # cache layouts and dtype included: the executor needs them
    assert (root / "dspark" / "1" / "model.py").read_text().startswith('"""The ``dspark`` Triton model')
    assert params["max_context"] == "96"  # the build's ProgramInfo.max_slots, from manifest.json


def test_tensorrt_repository_and_rewrite_replaces_old(tmp_path: Path) -> None:
    build = write_fake_build(tmp_path / "build", engines=True)
    write_triton_repository(build, tmp_path / "out", TritonOptions(backend_mode="bls"))
    (tmp_path / "out" / "triton" / "stale").mkdir()
    repo = write_triton_repository(build, tmp_path / "out", TritonOptions(backend_mode="bls"))
    assert not (repo.directory / "stale").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["triton"]
    config = _load(repo.directory / "dspark_target" / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert (repo.directory / "dspark_target" / "1" / "model.plan").is_file()


def test_inprocess_repository_names_the_build_relative_to_itself(tmp_path: Path) -> None:
    build = write_fake_build(tmp_path / "build", draft=False)
    repo = write_triton_repository(build, tmp_path / "out", TritonOptions(
        backend_mode="onnxruntime_inprocess", instance_kind="KIND_CPU",
        python_path=("/opt/env/site-packages",), max_context=64))
    assert "dspark_draft" not in repo.models
    config = _load(repo.directory / "dspark" / "config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["build_dir"] == "../../build" and params["python_path"] == "/opt/env/site-packages"
    assert params["max_context"] == "64" and "model_info" not in params
    assert (repo.directory / params["build_dir"]).resolve() == build.resolve()


def test_user_mistakes_are_reported(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"target_step\.onnx"):
        write_triton_repository(tmp_path, tmp_path / "out")
    build = write_fake_build(tmp_path / "build")
    with pytest.raises(UsageError, match="engine"):
        write_triton_repository(build, tmp_path / "out", TritonOptions(platform="tensorrt_plan"))
    (build / "manifest.json").unlink()
    with pytest.raises(UsageError, match=r"manifest\.json"):
        write_triton_repository(build, tmp_path / "out", TritonOptions(backend_mode="bls"))
    with pytest.raises(UsageError, match="backend_factory"):
        TritonOptions(backend_mode="factory")
    assert not (tmp_path / "out").exists()  # refused before anything was written
