"""Serve a written repository with the real tritonserver (pytriton's, python backend only) on 127.0.0.1.

The bundled server has no TensorRT / onnxruntime backend, so it loads only the orchestrator (explicit model
control) and the orchestrator runs the graphs in-process: the stand-in engine here, the golden pair's ONNX
graphs with our onnxruntime backend below. Clients: tritonclient gRPC streaming and HTTP ``generate_stream``
(server-sent events; Triton's HTTP ``infer`` refuses decoupled models, so tritonclient.http cannot be used).
"""

from __future__ import annotations

import json
import os
import queue
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_triton_standin import MAX_SLOTS, VOCAB, reference, write_fake_build

from dspark_compile.targets.triton.repository import TritonOptions, default_python_path, write_triton_repository
from dspark_compile.targets.triton.server import TritonServer

pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.serving

LOAD_ORCHESTRATOR_ONLY = ("--model-control-mode=explicit", "--load-model=dspark")


@dataclass
class Reply:
    tokens: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    responses: int = 0
    error: str | None = None


def grpc_generate(url: str, inputs: dict[str, np.ndarray], timeout_s: float = 60.0) -> Reply:
    """One streamed request; returns when the final flag (or an error) arrives."""
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: replies.put((result, error)))
        tensors = []
        for name, value in inputs.items():
            tensor = grpcclient.InferInput(name, list(value.shape), _triton_type(value))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        client.async_stream_infer("dspark", tensors, enable_empty_final_response=True)
        reply = Reply()
        while True:
            result, error = replies.get(timeout=timeout_s)
            if error is not None:
                reply.error = str(error)
                return reply
            response = result.get_response()
            if result.as_numpy("tokens") is not None:
                reply.responses += 1
                reply.tokens += result.as_numpy("tokens").tolist()
                reply.accepted += result.as_numpy("accepted").tolist()
            if response.parameters["triton_final_response"].bool_param:
                return reply
    finally:
        client.stop_stream()
        client.close()


def _triton_type(value: np.ndarray) -> str:
    return {"int64": "INT64", "int32": "INT32", "float32": "FP32"}[value.dtype.name]


def http_generate_stream(url: str, body: dict[str, Any] | bytes, timeout_s: float = 60.0) -> Reply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/dspark/generate_stream", data=data,
                                     headers={"Content-Type": "application/json"})
    reply = Reply()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            events = [json.loads(line[len("data:"):]) for line in response.read().decode().splitlines()
                      if line.startswith("data:")]
    except urllib.error.HTTPError as exc:
        reply.error = f"HTTP {exc.code}: {exc.read().decode()}"
        return reply
    for event in events:
        if "error" in event:
            reply.error = event["error"]
            continue
        reply.responses += 1
        # generate_stream writes one-element tensors as JSON scalars
        reply.tokens += np.atleast_1d(event["tokens"]).tolist()
        reply.accepted += np.atleast_1d(event["accepted"]).tolist()
    return reply


def request(prompt: list[int], max_new_tokens: int | None = None, **extra: np.ndarray) -> dict[str, np.ndarray]:
    inputs = {"prompt_ids": np.asarray(prompt, dtype=np.int64), **extra}
    if max_new_tokens is not None:
        inputs["max_new_tokens"] = np.array([max_new_tokens], dtype=np.int32)
    return inputs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("serving")
    options = TritonOptions(
        backend_mode="factory", backend_factory="test_triton_standin:StandInBackend.load",
        instance_kind="KIND_CPU", default_max_new_tokens=16,
        python_path=(*default_python_path(), str(Path(__file__).resolve().parent)))
    repo = write_triton_repository(write_fake_build(root / "build"), root / "out", options)
    running = TritonServer(repo.directory, extra_args=LOAD_ORCHESTRATOR_ONLY)
    with running:
        pid = running.pid
        yield running
    assert pid is not None and not running.is_running()
    with pytest.raises(ProcessLookupError):  # stopped by its PID and reaped
        os.kill(pid, 0)


PROMPTS = [([1, 2, 3], 9), ([7], 1), ([4, 9, 11, 12, 30, 2, 5], 24), ([0] * 40, 30)]


@pytest.mark.parametrize(("prompt", "max_new_tokens"), PROMPTS)
def test_grpc_stream_matches_reference(server: TritonServer, prompt: list[int], max_new_tokens: int) -> None:
    reply = grpc_generate(server.grpc_url, request(prompt, max_new_tokens))
    assert reply.error is None
    assert reply.tokens == reference(prompt, max_new_tokens)
    assert reply.responses == len(reply.accepted) >= 1  # one response per round, streamed
    assert sum(reply.accepted) >= len(reply.tokens)


@pytest.mark.parametrize(("prompt", "max_new_tokens"), PROMPTS[:2])
def test_http_generate_stream_matches_reference(server: TritonServer, prompt: list[int],
                                                max_new_tokens: int) -> None:
    reply = http_generate_stream(server.http_url, {"prompt_ids": prompt, "max_new_tokens": max_new_tokens})
    assert reply.error is None and reply.tokens == reference(prompt, max_new_tokens)


def test_defaults_and_sampling_parameters(server: TritonServer) -> None:
    reply = grpc_generate(server.grpc_url, request([5, 6]))
    assert reply.tokens == reference([5, 6], 16)  # default_max_new_tokens
    # The stand-in's target is deterministic, so sampling must still give the reference chain.
    reply = grpc_generate(server.grpc_url, request([5, 6], 8, temperature=np.array([0.7], np.float32),
                                                   seed=np.array([42], np.int64)))
    assert reply.error is None and reply.tokens == reference([5, 6], 8)


def test_16_concurrent_clients_get_their_own_answers(server: TritonServer) -> None:
    rng = np.random.default_rng(0)
    jobs = [([int(t) for t in rng.integers(0, VOCAB, size=1 + 3 * i)], 4 + (7 * i) % 29) for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda job: grpc_generate(server.grpc_url, request(*job)), jobs))
    for (prompt, max_new_tokens), reply in zip(jobs, replies, strict=True):
        assert reply.error is None, reply.error
        assert reply.tokens == reference(prompt, max_new_tokens)


MALFORMED = {
    "missing prompt_ids": {"max_new_tokens": np.array([4], np.int32)},
    "wrong dtype": {"prompt_ids": np.array([1, 2], np.int32)},
    "empty prompt": {"prompt_ids": np.zeros(0, np.int64)},
    "over-long prompt": request([1] * MAX_SLOTS, 4),
    "token outside vocabulary": request([1, VOCAB + 5], 4),
    "max_new_tokens 0": request([1], 0),
    "negative temperature": request([1], 4, temperature=np.array([-1.0], np.float32)),
    "max_new_tokens as INT64": {"prompt_ids": np.array([1], np.int64), "max_new_tokens": np.array([4], np.int64)},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_errors_and_serving_goes_on(server: TritonServer, case: str) -> None:
    reply = grpc_generate(server.grpc_url, MALFORMED[case])
    assert reply.error is not None and reply.tokens == []
    assert grpc_generate(server.grpc_url, request([2, 3], 5)).tokens == reference([2, 3], 5)


def test_malformed_http_requests(server: TritonServer) -> None:
    assert "failed to parse the request JSON" in (http_generate_stream(server.http_url, b"{not json").error or "")
    assert http_generate_stream(server.http_url, {"prompt_ids": []}).error is not None
    reply = http_generate_stream(server.http_url, {"prompt_ids": [1] * MAX_SLOTS})
    assert reply.error is not None and "cache slots" in reply.error
    assert http_generate_stream(server.http_url, {"prompt_ids": [3], "max_new_tokens": 3}).tokens == reference(
        [3], 3)
    assert server.is_running()


# ---------------------------------------------------------------------------------------------------------------
# The golden pair, compiled to ONNX and run by the orchestrator with onnxruntime in-process


@pytest.mark.slow
def test_golden_pair_served_with_onnxruntime_inprocess(golden_dir: Path, golden_triton: Callable[..., Any]) -> None:
    pytest.importorskip("dspark_compile.runtime.onnxruntime_backend", reason="waiting for onnxruntime backend")
    repo = golden_triton(backend_mode="onnxruntime_inprocess", max_context=128, default_max_new_tokens=48)
    golden = json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())["greedy"]
    with TritonServer(repo.directory, extra_args=LOAD_ORCHESTRATOR_ONLY) as running:
        for case in golden:
            reply = grpc_generate(running.grpc_url, request(case["prompt"], 48), timeout_s=120)
            assert reply.error is None and reply.tokens == case["tokens"]
        # 16 concurrent clients: every golden prompt with four lengths (greedy: a prefix of the 48 tokens).
        jobs = [(case, n) for n in (5, 17, 33, 48) for case in golden]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            replies = list(pool.map(
                lambda job: grpc_generate(running.grpc_url, request(job[0]["prompt"], job[1]), timeout_s=120), jobs))
        assert [r.tokens for r in replies] == [case["tokens"][:n] for case, n in jobs]
        for bad in (MALFORMED["empty prompt"], request(golden[0]["prompt"], 128), request([384], 4)):
            assert grpc_generate(running.grpc_url, bad).error is not None
        sse = http_generate_stream(running.http_url, {"prompt_ids": golden[0]["prompt"], "max_new_tokens": 48})
        assert sse.tokens == golden[0]["tokens"]


@pytest.mark.slow
def test_e4m3_lm_head_build_served(golden_dir: Path, tmp_path: Path) -> None:
    """``--quantize-lm-head`` with a Triton repository: each graph holds the e4m3 head as a constant (a graph
    model cannot take an FP8 input), stored once in weights.bin and counted twice in the server's memory; the
    server decodes what onnxruntime decodes."""
    from dspark_compile import api

    pair = golden_dir / "dspark_tiny"
    out = tmp_path / "build"
    res = api.build(target=pair / "target", draft=pair / "draft", out=out, targets="onnx,triton",
                    triton_mode="onnxruntime_inprocess", verify_mode="greedy", quantize="fp8", quantize_lm_head=True,
                    max_context=128, progress=False)
    assert res.manifest["quantization"]["lm_head"] and list(res.manifest["weight_inputs"]) == ["embed_tokens"]
    # one region of weights.bin, but each onnxruntime session loads its copy: the server's memory counts both
    head = 384 * 64 + 384 * 4  # e4m3 [V, H] and float32 scales [V]
    assert res.manifest["graphs"]["repeated_constant_bytes"] == head
    assert res.manifest["memory"]["weight_bytes"] == (out / "onnx" / "weights.bin").stat().st_size + head
    prompts = [[5, 17, 42, 99, 3], [250, 7, 1, 2, 3, 4, 5, 6]]
    expected = [r.tokens for r in api.run(out, prompts, backend="onnxruntime", max_new_tokens=24)]
    assert expected == [r.tokens for r in api.run(out, prompts, backend="onnxruntime", max_new_tokens=24,
                                                  baseline=True)]  # lossless: the same graphs target-only
    with TritonServer(out / "triton", extra_args=LOAD_ORCHESTRATOR_ONLY) as running:
        replies = [grpc_generate(running.grpc_url, request(p, 24), timeout_s=120) for p in prompts]
    assert [r.error for r in replies] == [None, None] and [r.tokens for r in replies] == expected
