"""Choosing between full TensorRT and TensorRT-RTX."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from dspark_compile.errors import BackendUnavailableError, UsageError
from dspark_compile.targets.tensorrt import load_trt
from dspark_compile.targets.tensorrt.adapter import GpuInfo


def _fake_full_tensorrt(version: str = "10.13.0.35", *, with_builder: bool = True) -> ModuleType:
    module = ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    if with_builder:
        module.Builder = object  # type: ignore[attr-defined]
    return module


def test_rtx_flavor() -> None:
    rtx_module = pytest.importorskip("tensorrt_rtx_bindings")
    flavor = load_trt("rtx")
    assert (flavor.name, flavor.module, flavor.version) == ("rtx", rtx_module, rtx_module.__version__)
    assert not flavor.supports_plugins and not flavor.supports_timing_cache
    assert flavor.label == f"TensorRT-RTX {rtx_module.__version__}"
    # RTX engines are built for the RTX-class GPUs TensorRT-RTX lists, whichever machine builds them.
    runs_on = flavor.engine_compute_capabilities(GpuInfo(0, "NVIDIA H100", (9, 0)))
    assert runs_on is not None and (8, 9) in runs_on and (9, 0) not in runs_on


def test_fake_full_tensorrt_is_preferred_by_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE module: full TensorRT cannot be installed here, so a stand-in `tensorrt` module proves the choice
    logic (auto → full when it imports, `rtx` override → TensorRT-RTX). Nothing is built with it."""
    pytest.importorskip("tensorrt_rtx_bindings")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_full_tensorrt())
    auto = load_trt()
    assert (auto.name, auto.version, auto.display_name) == ("full", "10.13.0.35", "TensorRT")
    assert auto.supports_plugins and auto.supports_timing_cache
    assert auto.engine_compute_capabilities(GpuInfo(0, "NVIDIA H100", (9, 0))) == [(9, 0)]
    assert auto.engine_compute_capabilities(None) is None
    assert load_trt("full").name == "full"
    assert load_trt("rtx").name == "rtx"


def test_fake_full_tensorrt_broken_install_falls_back_to_rtx(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAKE module: a `tensorrt` package without bindings, as the PyPI sdist leaves when it cannot fetch the
    real wheel; full TensorRT cannot be installed here, so the stand-in takes its place."""
    pytest.importorskip("tensorrt_rtx_bindings")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_full_tensorrt(with_builder=False))
    assert load_trt().name == "rtx"
    with pytest.raises(BackendUnavailableError, match=r"broken install.*pip install 'tensorrt>=10\.10'"):
        load_trt("full")


def test_no_tensorrt_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import` fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt-rtx-cu13-libs==") as info:
        load_trt()
    assert "tensorrt>=10.10" in str(info.value) and info.value.exit_code == 4
    with pytest.raises(BackendUnavailableError, match="--trt-flavor rtx"):
        load_trt("rtx")


def test_unknown_flavor() -> None:
    with pytest.raises(UsageError, match="--trt-flavor: expected one of auto, full, rtx, found 'lean'"):
        load_trt("lean")
