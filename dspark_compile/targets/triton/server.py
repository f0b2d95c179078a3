"""Run the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel, for tests, demos and `serve`.

The wheel's server (python backend only) needs what the wheel does not set up (docs/ENVIRONMENT.md):
``LD_LIBRARY_PATH`` at its bundled libraries, the python-backend stub of our Python version beside the
backend, and explicit addresses and free ports. The backends are copied into a private directory, so the
installed wheel is never modified. pytriton's own ``Triton`` class binds models to Python callables in the
client process; we serve a repository written to disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path
from types import TracebackType

from dspark_compile.errors import BackendUnavailableError, BuildError

log = logging.getLogger(__name__)

PYTRITON_HINT = "install it with `pip install 'dspark-compile[triton]'` (nvidia-pytriton==0.7.0, numpy<2)"


@dataclass(frozen=True)
class PytritonInstall:
    """Where the pieces of the server live inside the installed ``pytriton`` package."""

    binary: Path
    backends: Path
    stub: Path
    libs: Path

    @classmethod
    def locate(cls, python_version: str | None = None) -> PytritonInstall:
        spec = importlib_util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailableError(f"package `pytriton` is not importable; {PYTRITON_HINT}.")
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(binary=root / "bin" / "tritonserver", backends=root / "backends",
                    stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
                    libs=root.parent.parent / "nvidia_pytriton.libs")
        for what, path in (("server binary", found.binary), ("python backend", found.backends / "python"),
                           (f"python {version} backend stub", found.stub), ("bundled libraries", found.libs)):
            if not path.exists():
                raise BackendUnavailableError(f"{path}: the pytriton {what} is missing; {PYTRITON_HINT}.")
        return found


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the server start retries if it is taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TritonServer:
    """A ``tritonserver`` process serving ``repository``; a context manager. Its log is copied into :attr:`log`
    when it stops, so it stays readable after the temporary directory is gone."""

    repository: Path
    startup_timeout_s: float = 120.0
    stop_timeout_s: float = 20.0
    work_dir: Path | None = None
    extra_args: tuple[str, ...] = ()
    log_verbose: int = 0
    host: str = "127.0.0.1"  # the address both endpoints bind (0.0.0.0: every interface)
    ports: tuple[int, int] = (0, 0)  # (http, grpc) wanted; 0 = a free one
    http_port: int = field(default=0, init=False)
    grpc_port: int = field(default=0, init=False)
    pid: int | None = field(default=None, init=False)
    startup_s: float = field(default=0.0, init=False)
    log: str = field(default="", init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _owned_dir: Path | None = field(default=None, init=False, repr=False)

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches the server (a wildcard bind is reachable on loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self._dir / "tritonserver.log"

    @property
    def _dir(self) -> Path:
        if self.work_dir is not None:
            return self.work_dir
        if self._owned_dir is None:
            raise RuntimeError("TritonServer has no working directory before start()")
        return self._owned_dir

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> None:
        """Start the server and wait until it reports ready; retry on a lost port race."""
        install = PytritonInstall.locate()
        if self.work_dir is None:
            self._owned_dir = Path(tempfile.mkdtemp(prefix="dspark-triton-"))
        else:  # resolved: the server runs in it, so relative paths would resolve twice
            self.work_dir = Path(self.work_dir).resolve()
            self.work_dir.mkdir(parents=True, exist_ok=True)
        backends = self._prepare_backends(install)
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            self.http_port, self.grpc_port = (p or free_port() for p in self.ports)
            self._launch(install, backends)
            try:
                self._wait_ready()
            except BuildError:
                text = self.read_log()
                self.stop(keep_dir=True)
                if attempt < attempts and "address already in use" in text.lower() and 0 in self.ports:
                    log.warning("tritonserver port taken, retrying (%d/%d)", attempt, attempts)
                    continue
                raise
            self.startup_s = time.monotonic() - t0
            log.info("tritonserver pid %s ready in %.1f s (http %s, grpc %s)", self.pid, self.startup_s,
                     self.http_url, self.grpc_url)
            return

    def _prepare_backends(self, install: PytritonInstall) -> Path:
        # The python backend looks for the stub (and triton_python_backend_utils.py) in its own directory.
        backends = self._dir / "backends"
        python_dir = backends / "python"
        if not (python_dir / install.stub.name).exists():
            shutil.copytree(install.backends, backends, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(install.stub, python_dir / install.stub.name)
        return backends

    def _launch(self, install: PytritonInstall, backends: Path) -> None:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p)
        args = [
            str(install.binary),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false", "--allow-gpu-metrics=false",
            "--strict-readiness=true", "--exit-on-error=true",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) // 2)}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        log.debug("starting %s", " ".join(args))
        with open(self.log_path, "wb") as sink:
            # A new session makes the server the leader of its own process group, so the python-backend stubs
            # it spawns can be reached through its PID if it has to be killed.
            self._process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                             cwd=self._dir, start_new_session=True)
        self.pid = self._process.pid

    def _wait_ready(self) -> None:
        assert self._process is not None
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BuildError(f"tritonserver exited with code {self._process.returncode} while starting; "
                                 f"see its log {self.log_path}:\n{self._log_tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                    urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
            time.sleep(0.2)
        raise BuildError(f"tritonserver was not ready after {self.startup_timeout_s:.0f} s; see its log "
                         f"{self.log_path}:\n{self._log_tail()}")

    def read_log(self) -> str:
        if self.work_dir is None and self._owned_dir is None:
            return self.log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return self.log

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.read_log().splitlines()[-lines:])

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, keep_dir: bool = False) -> int | None:
        """Stop the server: SIGTERM to its process group (the ``dspark`` model's stub ends its in-flight requests
        at once, so the server unloads it and exits cleanly), then SIGKILL to the group; return its exit code."""
        process, code = self._process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver pid %s ignored SIGTERM; killing its process group", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=self.stop_timeout_s)
            code = process.returncode
            self._process = None
        self.log = self.read_log()
        if self._owned_dir is not None and not keep_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None
        return code
