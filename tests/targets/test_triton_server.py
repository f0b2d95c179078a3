"""The pytriton-bundled tritonserver starts, serves a trivial python-backend model over HTTP and gRPC, and
stops by its PID."""

from __future__ import annotations

import os
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dspark_compile.targets.triton.server import TritonServer

pytest.importorskip("pytriton")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.serving

INCREMENT_CONFIG = """\
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# The stub's interpreter is isolated (ignores PYTHONPATH) and imports model.py before anything else, so the
# model puts this environment's site-packages on sys.path itself before importing numpy.
INCREMENT_MODEL = """\
import site
import sys

site.addsitedir({site_packages!r})

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x + 1)]))
        return responses
"""


def write_increment_repository(root: Path) -> Path:
    model = root / "increment"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(INCREMENT_CONFIG)
    source = INCREMENT_MODEL.format(site_packages=sysconfig.get_paths()["purelib"])
    (model / "1" / "model.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = write_increment_repository(tmp_path_factory.mktemp("repo"))
    with TritonServer(repository, startup_timeout_s=90) as running:
        yield running


def test_http_increment(server: TritonServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    x = httpclient.InferInput("x", [3], "INT64")
    x.set_data_from_numpy(np.array([1, 2, 3], dtype=np.int64))
    result = client.infer("increment", [x])
    np.testing.assert_array_equal(result.as_numpy("y"), [2, 3, 4])


def test_grpc_increment(server: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("x", [4], "INT64")
    x.set_data_from_numpy(np.array([10, 20, 30, -1], dtype=np.int64))
    result = client.infer("increment", [x])
    np.testing.assert_array_equal(result.as_numpy("y"), [11, 21, 31, 0])


def test_stops_by_pid(tmp_path: Path) -> None:
    repository = write_increment_repository(tmp_path / "repo")
    server = TritonServer(repository, startup_timeout_s=90)
    with server:
        pid = server.pid
        assert pid is not None and server.is_running()
        assert server.startup_s > 0
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "increment" in server.log and "READY" in server.log
