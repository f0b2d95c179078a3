"""`dspark-compile serve BUILD_DIR`: the bundled ``tritonserver`` (nvidia-pytriton) on a build's repository.

The bundled server has only the python backend, so the graph models of a ``bls`` repository (TensorRT or
onnxruntime platforms) cannot load there. For such a build, or one without ``BUILD/triton``, a repository whose
orchestrator runs the build's ONNX graphs in-process (``onnxruntime_inprocess``) is written into a temporary
directory, and only the ``dspark`` model is loaded. A full Triton container serves ``BUILD/triton`` as it is
(README "Serve with Triton").
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_compile.errors import UsageError

log = logging.getLogger(__name__)

MODEL = "dspark"
LOAD_ORCHESTRATOR_ONLY = ("--model-control-mode=explicit", f"--load-model={MODEL}")
IN_PROCESS_MODES = ("onnxruntime_inprocess", "factory")


@dataclass(frozen=True)
class Endpoints:
    """Where a running server answers, and whether its ``dspark`` model takes text (``text_input``)."""

    host: str
    http_port: int
    grpc_port: int
    text: bool
    repository: str
    log: str
    pid: int

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def example_curl(self) -> str:
        url = f"{self.http}/v2/models/{MODEL}/generate_stream"
        body = ({"text_input": "def main():", "max_tokens": 32} if self.text
                else {"prompt_ids": [1, 2, 3], "max_new_tokens": 32})
        return f"curl -N -X POST {url} -d '{json.dumps(body)}'"

    def to_json(self) -> dict[str, Any]:
        return {"http": self.http, "grpc": self.grpc, "model": MODEL, "text": self.text, "pid": self.pid,
                "repository": self.repository, "log": self.log, "example": self.example_curl()}


def orchestrator_mode(repository: Path) -> str | None:
    """The ``backend_mode`` of ``repository/dspark/config.pbtxt``; None when there is no orchestrator."""
    config = repository / MODEL / "config.pbtxt"
    if not config.is_file():
        return None
    found = re.search(r'key:\s*"backend_mode"\s*value\s*\{\s*string_value:\s*"([^"]*)"', config.read_text())
    return found.group(1) if found else None


def serving_repository(build_dir: Path, scratch: Path, *, verify: str | None = None,
                       target_only: bool = False, draft_rows: int | str | None = None) -> Path:
    """``BUILD/triton`` when the bundled server can run it as it is, else an in-process repository under
    ``scratch`` (also when ``verify``/``target_only``/``draft_rows`` override what the build's repository says)."""
    from dspark_compile.targets.triton.repository import TritonOptions, write_triton_repository

    if not (build_dir / "onnx").is_dir() and not (build_dir / "triton").is_dir():
        raise UsageError(f"{build_dir}: not a build directory (no onnx/ or triton/); build one with "
                         "`dspark-compile build --targets onnx,triton ...` or `dspark-compile demo`")
    if verify is not None or draft_rows is not None:  # a bad policy fails here, not inside the server's model load
        from dspark_compile.runtime.decode import VerifyPolicy

        VerifyPolicy.for_build(build_dir, verify or "fixed", has_confidence=True, draft_rows=draft_rows)
    mode = orchestrator_mode(build_dir / "triton")
    if mode in IN_PROCESS_MODES and verify is None and not target_only and draft_rows is None:
        return build_dir / "triton"
    log.info("%s: orchestrator mode %s; serving the ONNX graphs in-process from a repository of its own (the "
             "bundled tritonserver has only the python backend)", build_dir / "triton", mode or "(no repository)")
    spec = json.loads((build_dir / "build_spec.json").read_text()) if (build_dir / "build_spec.json").is_file() else {}
    options = TritonOptions(backend_mode="onnxruntime_inprocess", platform="onnxruntime_onnx",
                            instance_kind="KIND_CPU", max_batch=int(spec.get("max_batch") or 16),
                            max_context=spec.get("max_context"), verify=verify or "auto",
                            speculative=not target_only, draft_rows=draft_rows)
    return write_triton_repository(build_dir, scratch, options).directory


def _check_port(host: str, port: int, flag: str) -> None:
    if port == 0:
        return
    if not 0 < port < 65536:
        raise UsageError(f"{flag} {port}: a TCP port is 1..65535 (0 = pick a free one)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror}); choose another port "
                             "or leave it out for a free one") from None


class Server:
    """A running server over a build; a context manager. ``endpoints`` says where it answers."""

    def __init__(self, build_dir: str | Path, *, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 verify: str | None = None, target_only: bool = False, startup_timeout_s: float = 180.0,
                 draft_rows: int | str | None = None) -> None:
        from dspark_compile.targets.triton.server import TritonServer

        self.build_dir = Path(build_dir)
        if not self.build_dir.is_dir():
            raise UsageError(f"{self.build_dir}: build directory not found; pass the --out of `dspark-compile "
                             "build` (or of `dspark-compile demo`, its build/ directory)")
        _check_port(host, http_port, "--http-port")
        _check_port(host, grpc_port, "--grpc-port")
        self._scratch = Path(tempfile.mkdtemp(prefix="dspark-serve-"))
        try:
            repository = serving_repository(self.build_dir.resolve(), self._scratch, verify=verify,
                                            target_only=target_only, draft_rows=draft_rows)
        except BaseException:
            shutil.rmtree(self._scratch, ignore_errors=True)
            raise
        self.repository = repository
        self.triton = TritonServer(repository, startup_timeout_s=startup_timeout_s,
                                   extra_args=LOAD_ORCHESTRATOR_ONLY, host=host, ports=(http_port, grpc_port),
                                   work_dir=self._scratch / "server")
        self.text = (repository / MODEL / "tokenizer.json").is_file()

    @property
    def endpoints(self) -> Endpoints:
        t = self.triton
        return Endpoints(t.client_host, t.http_port, t.grpc_port, self.text, str(self.repository),
                         str(t.log_path), t.pid or 0)

    def start(self) -> Server:
        """Start and wait until ready; a no-op when running (``with api.serve(...)`` enters a started server)."""
        if self.triton.is_running():
            return self
        try:
            self.triton.start()
        except BaseException:
            self.stop()
            raise
        return self

    def is_running(self) -> bool:
        return self.triton.is_running()

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, bounded wait) and remove the scratch directory; return its exit code."""
        code = self.triton.stop(keep_dir=True)
        shutil.rmtree(self._scratch, ignore_errors=True)
        return code

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

