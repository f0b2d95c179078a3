"""Running one ONNX graph on onnxruntime's CPU provider, shared by the pass and segment tests (importable from
any test directory: tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest


def ort_session(path: Path) -> Any:
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_graph(path: Path, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{output name: array}`` of the graph at ``path``, fed by name from ``values`` (a superset of its inputs:
    a chain of segments feeds each one the graph inputs and every earlier segment's outputs)."""
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: values[i.name] for i in session.get_inputs()}), strict=True))
