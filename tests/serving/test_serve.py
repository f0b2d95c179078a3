"""`dspark-compile serve BUILD_DIR`: the bundled tritonserver starts on a build, answers, and stops on a signal.

The build is the shipped trained pair's (bls repository, as `build` writes by default), so this also checks that
`serve` falls back to an in-process repository on the python-only server. One request over HTTP
``generate_stream`` must equal `dspark-compile run` on the same build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pytriton", reason="the bundled tritonserver comes with nvidia-pytriton")
pytest.importorskip("onnxruntime", reason="the orchestrator runs the ONNX graphs with onnxruntime")

pytestmark = [pytest.mark.serving, pytest.mark.slow]  # a full build of the trained pair, then tritonserver

from dspark_compile.serving.text import TextCodec, TextStream  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _generate_stream(http: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{http}/v2/models/dspark/generate_stream", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [json.loads(line[len("data:"):]) for line in response.read().decode().splitlines()
                if line.startswith("data:")]


def _ids(events: list[dict[str, Any]]) -> list[int]:
    """The streamed ids (generate_stream writes a one-element tensor as a JSON scalar)."""
    return [t for e in events for t in ([e["tokens"]] if isinstance(e["tokens"], int) else e["tokens"])]


def _start(build: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dspark_compile.cli", "serve", str(build), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server is ready when the endpoints are printed (bounded by its timeout)
    if not line:
        proc.wait(timeout=30)
        pytest.fail(f"serve exited with {proc.returncode} before printing endpoints: {proc.stderr.read()}")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen[str], signum: int) -> int:
    """The exit code after ``signum``, its pipes drained while it stops; a stop over 60 s fails with its stderr."""
    proc.send_signal(signum)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"serve did not exit within 60 s of signal {signum}; its stderr ends: {err[-3000:]}")
    return proc.returncode


def test_serve_answers_then_stops_on_sigterm(trained_build: Path) -> None:
    from dspark_compile import api

    prompt = [5, 6, 7, 8, 9, 10]
    want = api.run(trained_build, [prompt], max_new_tokens=12)[0].tokens
    proc, endpoints = _start(trained_build)
    try:
        assert endpoints["http"].startswith("http://127.0.0.1:") and endpoints["grpc"].startswith("127.0.0.1:")
        assert endpoints["model"] == "dspark" and "generate_stream" in endpoints["example"]
        events = _generate_stream(endpoints["http"], {"prompt_ids": prompt, "max_new_tokens": 12})
        assert _ids(events) == want
        # Text in, text out (TensorRT-LLM names): the same greedy decode, detokenized.
        codec = TextCodec.load(trained_build / "triton" / "dspark")
        text_want = api.run(trained_build, [codec.encode("def main():")], max_new_tokens=12)[0].tokens
        events = _generate_stream(endpoints["http"], {"text_input": "def main():", "max_tokens": 12, "stream": True})
        assert _ids(events) == text_want
        stream = TextStream(codec, eos_token_ids=(0,))
        assert "".join(e["text_output"] for e in events) == stream.push(text_want) + stream.close()
        assert endpoints["text"] is True
        pid = endpoints["pid"]
    finally:
        code = _stop(proc, signal.SIGTERM)
    assert code == 0
    with pytest.raises(ProcessLookupError):  # the tritonserver went with it
        os.kill(pid, 0)


def test_serve_ctrl_c_exits_130_and_frees_the_port(trained_build: Path) -> None:
    """Also `--draft-rows 0` (every round a plain step, through the in-process repository it writes): a greedy
    stream equals `run`'s speculative tokens."""
    from dspark_compile import api
    from dspark_compile.targets.triton.server import free_port

    port = free_port()
    prompt = [5, 6, 7, 8, 9, 10]
    want = api.run(trained_build, [prompt], max_new_tokens=12)[0].tokens
    proc, endpoints = _start(trained_build, "--http-port", str(port), "--draft-rows", "0")
    assert endpoints["http"] == f"http://127.0.0.1:{port}"
    try:
        assert _ids(_generate_stream(endpoints["http"], {"prompt_ids": prompt, "max_new_tokens": 12})) == want
    finally:
        code = _stop(proc, signal.SIGINT)
    assert code == 130
    deadline = time.monotonic() + 10
    while True:  # nothing is left listening (SO_REUSEADDR: connections in TIME_WAIT do not count)
        try:
            import socket

            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            break
        except OSError:
            assert time.monotonic() < deadline, f"port {port} still in use after serve exited"
            time.sleep(0.2)


def test_serve_rejects_a_busy_port_and_a_missing_build(trained_build: Path, tmp_path: Path) -> None:
    import socket

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "dspark_compile.cli", "serve", str(trained_build),
                              "--http-port", str(busy)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and f"--http-port {busy}" in run.stderr
    run = subprocess.run([sys.executable, "-m", "dspark_compile.cli", "serve", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and "build directory not found" in run.stderr
    # --draft-rows auto on a build that no `bench --plain-rounds` measured: one line before any server starts
    run = subprocess.run([sys.executable, "-m", "dspark_compile.cli", "serve", str(trained_build), "--draft-rows",
                          "auto"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert f"{trained_build / 'draft_rows.json'} is missing" in run.stderr and "--plain-rounds" in run.stderr
