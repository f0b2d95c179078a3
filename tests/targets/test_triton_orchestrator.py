"""The orchestrator model (dspark/1/model.py) in-process: request checks, batching, streaming, BLS packing.

``triton_python_backend_utils`` exists only inside Triton's python-backend stub, so these tests install a
fake of the few calls the model uses (``test_fake_pb_utils_*``). The BLS path cannot run for real here (the
bundled server has only the python backend; TensorRT/onnxruntime backends are absent), so its tensor
packing is checked against fake engine models with the stand-in's semantics; the serving tests cover the
real server.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.dlpack
from google.protobuf import json_format
from test_triton_standin import (
    BLOCK,
    MAX_SLOTS,
    VOCAB,
    StandInBackend,
    reference,
    stand_in_graph,
    stand_in_info,
    write_fake_build,
)

from dspark_compile.errors import UsageError
from dspark_compile.runtime.decode import GenerationParams, generate
from dspark_compile.targets.triton import pbtxt
from dspark_compile.targets.triton.repository import TritonOptions, write_triton_repository

# ----------------------------------------------------------------------------------------------------
# A fake of triton_python_backend_utils


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> FakeTensor:
        return cls(name, torch.utils.dlpack.from_dlpack(capsule).numpy())  # a view: nothing copied

    def to_dlpack(self) -> Any:
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(self._array)))


class FakeError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor] | None = None,
                 error: FakeError | None = None) -> None:
        self.tensors = {t.name(): t for t in output_tensors or []}
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> FakeError | None:
        return self._error


FAKE_MODELS: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {}
BLS_CALLS: list[dict[str, Any]] = []


class FakeBlsRequest:
    def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[FakeTensor],
                 preferred_memory: Any = None) -> None:
        self.model_name, self.outputs = model_name, requested_output_names
        self.preferred_memory = preferred_memory
        self.inputs = {t.name(): t.as_numpy() for t in inputs}

    def exec(self) -> FakeResponse:
        call = {"model": self.model_name, "inputs": self.inputs, "memory": self.preferred_memory}
        BLS_CALLS.append(call)
        try:
            out = FAKE_MODELS[self.model_name](self.inputs)
        except Exception as exc:
            return FakeResponse(error=FakeError(str(exc)))
        call["outputs"] = {n: np.asarray(out[n]) for n in self.outputs}
        return FakeResponse([FakeTensor(n, out[n]) for n in self.outputs])


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[FakeResponse | None, int]] = []
        self.done = threading.Event()

    def is_cancelled(self) -> bool:
        return False

    def send(self, response: FakeResponse | None = None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags & 1:
            self.done.set()

    def tokens(self) -> list[int]:
        return [int(t) for r, _ in self.sent if r is not None and not r.has_error()
                for t in r.tensors["tokens"].as_numpy()]

    def error(self) -> str | None:
        return next((r.error().message() for r, _ in self.sent if r is not None and r.has_error()), None)


class FakeIncoming:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = inputs
        self.sender = FakeSender()

    def get_response_sender(self) -> FakeSender:
        return self.sender


def _fake_pb_utils() -> types.ModuleType:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = FakeTensor
    fake.TritonError = FakeError
    fake.InferenceResponse = FakeResponse
    fake.InferenceRequest = FakeBlsRequest
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    fake.TRITONSERVER_MEMORY_CPU = 0
    fake.PreferredMemory = lambda kind, device: ("preferred", kind, device)
    fake.Logger = types.SimpleNamespace(log_error=print, log_info=print, log_warn=print)
    fake.get_input_tensor_by_name = lambda r, n: FakeTensor(n, r.inputs[n]) if n in r.inputs else None
    fake.get_output_tensor_by_name = lambda r, n: r.tensors.get(n)
    fake.using_decoupled_model_transaction_policy = lambda c: c["model_transaction_policy"]["decoupled"]
    return fake


@pytest.fixture(scope="module")
def orch() -> Iterator[types.ModuleType]:
    previous = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = _fake_pb_utils()
    sys.modules.pop("dspark_compile.targets.triton.orchestrator_model", None)
    yield importlib.import_module("dspark_compile.targets.triton.orchestrator_model")
    sys.modules.pop("dspark_compile.targets.triton.orchestrator_model", None)
    if previous is None:
        sys.modules.pop("triton_python_backend_utils", None)
    else:
        sys.modules["triton_python_backend_utils"] = previous


# ----------------------------------------------------------------------------------------------------
# Request checks and batching


def _limits(orch: types.ModuleType, **kw: Any) -> Any:
    return orch.Limits.of(StandInBackend().info, kw.pop("max_context", None), kw.pop("default", 16))


def test_fake_pb_utils_parse_request_accepts_and_defaults(orch: types.ModuleType) -> None:
    spec = orch.parse_request({"prompt_ids": np.array([1, 2, 3])}, _limits(orch))
    assert spec.prompt == [1, 2, 3] and spec.max_new_tokens == 16 and spec.temperature == 0.0
    inputs = {"prompt_ids": np.array([4]), "max_new_tokens": np.array([5], np.int32),
              "temperature": np.array([0.5], np.float32), "seed": np.array([9])}
    spec = orch.parse_request(inputs, _limits(orch))
    assert (spec.max_new_tokens, spec.temperature, spec.seed) == (5, 0.5, 9)


@pytest.mark.parametrize(("inputs", "message"), [
    ({}, "`prompt_ids`.*missing"),
    ({"prompt_ids": np.array([], np.int64)}, "empty"),
    ({"prompt_ids": np.array([1.0, 2.0])}, "must be INT64"),
    ({"prompt_ids": np.array([1, VOCAB])}, "outside the vocabulary"),
    ({"prompt_ids": np.arange(90) % VOCAB}, "cache slots"),
    ({"prompt_ids": np.array([1]), "max_new_tokens": np.array([0], np.int32)}, "max_new_tokens"),
    ({"prompt_ids": np.array([1]), "max_new_tokens": np.array([5], np.int64)}, "max_new_tokens.*int32"),
    ({"prompt_ids": np.array([1]), "temperature": np.array([np.nan], np.float32)}, "temperature"),
    ({"prompt_ids": np.array([1]), "temperature": np.array([-1], np.float32)}, "temperature"),
])
def test_fake_pb_utils_parse_request_rejects(orch: types.ModuleType, inputs: dict[str, np.ndarray],
                                             message: str) -> None:
    with pytest.raises(UsageError, match=message):
        orch.parse_request(inputs, _limits(orch))


class ListStream:
    def __init__(self) -> None:
        self.chunks: list[tuple[list[int], int]] = []
        self.error: str | None = "unfinished"
        self.done = threading.Event()

    def send(self, tokens: list[int], accepted: int) -> None:
        assert not self.done.is_set()
        self.chunks.append((tokens, accepted))

    def finish(self, error: str | None = None) -> None:
        assert not self.done.is_set(), "finished twice"
        self.error = error
        self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for chunk, _ in self.chunks for t in chunk]


def _run_jobs(orch: types.ModuleType, backend: Any, specs: list[Any], max_slots: int | None = None
              ) -> list[ListStream]:
    runner = orch.Orchestrator(backend, max_batch=4, max_slots=max_slots)
    streams = [ListStream() for _ in specs]
    for spec, stream in zip(specs, streams, strict=True):
        runner.submit(orch.Job(spec, stream))  # queued before the worker starts: batching is deterministic
    runner.start()
    for stream in streams:
        assert stream.done.wait(30)
    runner.stop()
    return streams


def test_fake_pb_utils_orchestrator_batches_greedy_and_isolates_sampling(orch: types.ModuleType) -> None:
    backend = StandInBackend()
    specs = [orch.RequestSpec([i + 1, 2 * i], n, 0.0, 0) for i, n in enumerate([3, 9, 20, 1, 7, 12])]
    specs.insert(2, orch.RequestSpec([5, 6], 10, 0.7, 123))
    streams = _run_jobs(orch, backend, specs)
    for spec, stream in zip(specs, streams, strict=True):
        assert stream.error is None
        assert stream.tokens == reference(spec.prompt, spec.max_new_tokens)
        assert all(tokens and 1 <= accepted <= BLOCK + 1 for tokens, accepted in stream.chunks)
    # greedy requests in batches of at most 4, the sampling request alone
    assert backend.batches == [4, 1, 2]


def test_fake_pb_utils_requests_that_fit_alone_but_not_together_run_apart(orch: types.ModuleType) -> None:
    backend = StandInBackend()
    long_prompt = orch.RequestSpec([1] * 80, 8, 0.0, 0)  # 80 + 8 + G + 2 = 94 slots
    long_answer = orch.RequestSpec([2, 3], 80, 0.0, 0)  # 2 + 80 + G + 2 = 88 slots; together 166 > 96
    streams = _run_jobs(orch, backend, [long_prompt, long_answer], max_slots=MAX_SLOTS)
    assert [s.error for s in streams] == [None, None] and backend.batches == [1, 1]
    assert streams[1].tokens == reference([2, 3], 80)


def test_fake_pb_utils_orchestrator_stops_at_eos(orch: types.ModuleType) -> None:
    prompt = [3, 4]
    eos = reference(prompt, 10)[4]
    streams = _run_jobs(orch, StandInBackend(eos_token_ids=(eos,)), [orch.RequestSpec(prompt, 30, 0.0, 0)])
    assert streams[0].tokens == reference(prompt, 10)[:5] and streams[0].error is None


class BrokenStream(ListStream):
    """A client that disconnected after its first response."""

    def send(self, tokens: list[int], accepted: int) -> None:
        if self.chunks:
            raise ConnectionError("client went away")
        super().send(tokens, accepted)


def test_fake_pb_utils_a_failing_stream_does_not_break_its_batch(orch: types.ModuleType) -> None:
    runner = orch.Orchestrator(StandInBackend(), max_batch=4)
    broken, healthy = BrokenStream(), ListStream()
    runner.submit(orch.Job(orch.RequestSpec([1, 2], 20, 0.0, 0), broken))
    runner.submit(orch.Job(orch.RequestSpec([3, 4], 20, 0.0, 0), healthy))
    runner.start()
    assert healthy.done.wait(30) and broken.done.wait(30)
    runner.stop()
    assert healthy.error is None and healthy.tokens == reference([3, 4], 20)
    assert len(broken.chunks) == 1 and broken.error is not None and "client went away" in broken.error


class FlakyBackend(StandInBackend):
    """Fails its first prefill, like an engine running out of memory."""

    def admit(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray) -> Any:
        if len(self.batches) == 1:
            raise RuntimeError("CUDA out of memory")
        return super().admit(input_ids, lengths, temperature, seeds)


def test_fake_pb_utils_backend_failure_is_reported_and_serving_goes_on(orch: types.ModuleType) -> None:
    first, second = _run_jobs(orch, FlakyBackend(), [orch.RequestSpec([1], 4, 0.0, 0),
                                                     orch.RequestSpec([2], 4, 0.5, 1)])
    assert first.error is not None and "CUDA out of memory" in first.error
    assert second.error is None and second.tokens == reference([2], 4)


# ----------------------------------------------------------------------------------------------------
# BLS backend against fake engine models


def _fake_engine_models(models: dict[str, str]) -> dict[str, int]:
    """Register the stand-in's graphs as fake Triton models, checking the caches the executor hands them."""
    calls = {"target": 0, "draft": 0}

    def model(graph: str, counter: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        def run(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            batch = len(x["cache_len"])
            cache = x["draft_kv" if graph == "draft_propose" else "kv_cache"]
            assert cache.shape[2] == batch and cache.shape[4] <= MAX_SLOTS
            assert x["temperature"].shape == (batch,)
            calls[counter] += 1
            return stand_in_graph(graph, x)
        return run

    FAKE_MODELS.clear()
    FAKE_MODELS.update({models["target_step"]: model("target_step", "target"),
                        models["draft_propose"]: model("draft_propose", "draft")})
    return calls


def _bls_executor(orch: types.ModuleType, tmp_path: Path) -> Any:
    repo = write_triton_repository(write_fake_build(tmp_path / "build"), tmp_path / "out",
                                   TritonOptions(backend_mode="bls"))
    config = pbtxt.validate_config(repo.directory / "dspark" / "config.pbtxt")
    return orch.bls_executor(config.parameters["model_info"].string_value, repo.directory)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fake_pb_utils_bls_backend_runs_the_decode_loop(orch: types.ModuleType, tmp_path: Path,
                                                        temperature: float) -> None:
    """The BLS transport hands the executor's tensors to the graph models by DLPack; the stand-in verify graph
    checks that the K/V rows of earlier calls sit in the executor's caches where they belong.

    Only checkable with a fake pb_utils: the bundled server cannot load TensorRT / onnxruntime models.
    """
    backend = _bls_executor(orch, tmp_path)
    assert backend.info == stand_in_info()
    calls = _fake_engine_models(dict(backend.transport.models))
    BLS_CALLS.clear()
    prompts = [[1, 2, 3], [9], [4, 4, 4, 4, 4, 4]]
    lengths = [5, 17, 11]  # different lengths: finished rows leave the batch through select()
    params = GenerationParams(max_new_tokens=max(lengths), temperature=temperature, seed=1)
    results = generate(backend, prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == reference(prompt, max(lengths))
    assert calls["target"] == calls["draft"]  # admit: target_step (prefill) + draft; each round: the same
    # The weight inputs: one tensor (the stand-in's are equal, stored once), bound to both graph models.
    assert backend.weights["embed_tokens"] is backend.weights["lm_head"]
    assert {c["memory"] for c in BLS_CALLS} == {None}  # outputs stay where the engine put them
    assert {c["model"] for c in BLS_CALLS} == set(backend.transport.models.values())


def test_fake_pb_utils_bls_error_names_the_model(orch: types.ModuleType, tmp_path: Path) -> None:
    """A failed BLS call (engine model missing or erroring) surfaces as an error naming that model."""
    backend = _bls_executor(orch, tmp_path)
    FAKE_MODELS.clear()
    FAKE_MODELS["dspark_target"] = lambda x: (_ for _ in ()).throw(RuntimeError("engine not loaded"))
    with pytest.raises(orch.BlsError, match="dspark_target: engine not loaded"):
        generate(backend, [[1]], GenerationParams(max_new_tokens=2))


# ----------------------------------------------------------------------------------------------------
# The Triton entry points


def test_fake_pb_utils_model_streams_and_survives_bad_requests(orch: types.ModuleType,
                                                                tmp_path: Path) -> None:
    repo = write_triton_repository(
        write_fake_build(tmp_path / "build"), tmp_path / "out",
        TritonOptions(backend_mode="factory", backend_factory="test_triton_standin:StandInBackend.load",
                      default_max_new_tokens=6))
    parsed = pbtxt.validate_config(repo.directory / "dspark" / "config.pbtxt")
    config = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
    model = orch.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo.directory / "dspark")})
    try:
        good = [FakeIncoming(prompt_ids=np.array([1, 2, 3])),
                FakeIncoming(prompt_ids=np.array([7]), max_new_tokens=np.array([12], np.int32))]
        bad = [FakeIncoming(), FakeIncoming(prompt_ids=np.array([], np.int64)),
               FakeIncoming(prompt_ids=np.array([1]), temperature=np.array([-2.0], np.float32))]
        model.execute([bad[0], good[0], bad[1], good[1], bad[2]])
        for request in good + bad:
            assert request.sender.done.wait(30)
            assert request.sender.sent[-1][1] == 1 and sum(f for _, f in request.sender.sent) == 1
        assert good[0].sender.tokens() == reference([1, 2, 3], 6) and good[0].sender.error() is None
        assert good[1].sender.tokens() == reference([7], 12)
        assert [r.sender.error() is not None for r in bad] == [True, True, True]
        assert "prompt_ids" in bad[0].sender.error() and "temperature" in bad[2].sender.error()
    finally:
        model.finalize()


def test_fake_pb_utils_bls_backend_on_the_golden_graphs(orch: types.ModuleType, golden_dir: Path,
                                                        golden_build: Path, golden_triton: Callable[..., Any]) -> None:
    """The BLS transport against the golden pair's real graphs, each fake BLS model an onnxruntime session on
    the repository's own ``1/model.onnx`` (the bundled server cannot load onnxruntime models itself)."""
    ort = pytest.importorskip("onnxruntime")
    from dspark_compile.runtime.onnxruntime_backend import load_onnxruntime

    repo = golden_triton(backend_mode="bls").directory
    config = pbtxt.validate_config(repo / "dspark" / "config.pbtxt")
    backend = orch.bls_executor(config.parameters["model_info"].string_value, repo)
    assert backend.info == load_onnxruntime(golden_build).info  # both read the build's one ProgramInfo
    # The golden pair's embedding and LM head (untied): the orchestrator holds each once, for both graphs.
    assert sorted(backend.weights) == ["embed_tokens", "lm_head"] and len(backend.transport.models) == 2

    def session_model(name: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"))
        names = [o.name for o in session.get_outputs()]
        return lambda inputs: dict(zip(names, session.run(names, inputs), strict=True))

    FAKE_MODELS.clear()
    FAKE_MODELS.update({name: session_model(name) for name in backend.transport.models.values()})
    golden = json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())["greedy"]
    results = generate(backend, [c["prompt"] for c in golden], GenerationParams(max_new_tokens=48))
    assert [r.tokens for r in results] == [c["tokens"] for c in golden]
    assert [[r["accepted"] for r in res.rounds] for res in results] == [c["acceptance_lengths"] for c in golden]


def test_fake_pb_utils_draft_rows_parameter(orch: types.ModuleType, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's ``draft_rows`` parameter (VerifyPolicy.draft_rows) reaches the orchestrator's policy, and two
    streams over ``draft_rows`` = 0 (every round plain, whenever the streams are admitted) give the stand-in's
    reference tokens; a value that is not a row count, or a backend without plain rounds, fails the model's load with
    one error."""
    import test_triton_standin

    from dspark_compile.errors import UsageError

    repo = write_triton_repository(
        write_fake_build(tmp_path / "build"), tmp_path / "out",
        TritonOptions(backend_mode="factory", backend_factory="test_triton_standin:StandInBackend.load",
                      default_max_new_tokens=6, batching="continuous"))
    parsed = pbtxt.validate_config(repo.directory / "dspark" / "config.pbtxt")
    config = json_format.MessageToDict(parsed, preserving_proto_field_name=True)

    def load(value: str) -> Any:
        model = orch.TritonPythonModel()
        config["parameters"]["draft_rows"] = {"string_value": value}
        model.initialize({"model_config": json.dumps(config), "model_repository": str(repo.directory / "dspark")})
        return model

    with pytest.raises(UsageError, match="draft_rows 'four': expected a whole number"):
        load("four")
    with pytest.raises(UsageError, match=r"--draft-rows auto: .*draft_rows.json is missing; run `dspark-compile bench"):
        load("auto")  # nothing measured for this build
    with monkeypatch.context() as m:
        m.setattr(test_triton_standin.StandInBackend, "takes_plain_rounds", False)
        with pytest.raises(UsageError, match="StandInBackend takes no plain rounds"):
            load("4")
    (tmp_path / "build" / "draft_rows.json").write_text('{"draft_rows": 0}')  # this mode reads the build's
    model = load("auto")
    try:
        assert model.orchestrator.policy.draft_rows == 0
        good = [FakeIncoming(prompt_ids=np.array([1, 2, 3])),
                FakeIncoming(prompt_ids=np.array([7]), max_new_tokens=np.array([12], np.int32))]
        model.execute(good)
        for request in good:
            assert request.sender.done.wait(30) and request.sender.error() is None
        assert good[0].sender.tokens() == reference([1, 2, 3], 6)
        assert good[1].sender.tokens() == reference([7], 12)
        assert model.orchestrator._batcher.counters["plain_rounds"] > 0
    finally:
        model.finalize()
