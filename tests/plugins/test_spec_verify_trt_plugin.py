"""trt_plugin wiring, checked against a stand-in for ``tensorrt.plugin`` (full TensorRT is not installable here).

The stand-in applies the signature rules tensorrt.plugin enforces (as read from its ``_validate.py``):
register takes the input TensorDescs then attributes and returns a tuple of TensorDescs; autotune takes
inputs (+ attributes) then ``outputs``; aot_impl takes inputs (+ attributes), ``outputs``, ``tactic`` and
must annotate a 4-tuple return. It then calls aot_impl like TensorRT would and checks the launch.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("triton")

from dspark_compile.errors import BackendUnavailableError, UsageError
from dspark_compile.plugins.spec_verify import trt_plugin
from dspark_compile.plugins.spec_verify.kernel import compile_ptx
from dspark_compile.plugins.spec_verify.op_schema import GREEDY, MODES, SAMPLING, SPEC_VERIFY


class TensorDesc:
    def __init__(self, shape_expr: tuple[Any, ...], dtype: str) -> None:
        self.shape_expr, self.dtype = shape_expr, dtype


class KernelLaunchParams:
    grid_x: Any = 1
    block_x: Any = 1
    shared_mem: Any = 0


class SymIntExprs(tuple):
    @classmethod
    def from_tuple(cls, items: Any) -> SymIntExprs:
        return cls(items)


def _fake_tensorrt() -> tuple[types.ModuleType, types.ModuleType, dict[str, dict[str, Callable]]]:
    trt = types.ModuleType("tensorrt")
    for name in ("float32", "float16", "bfloat16", "int64"):
        setattr(trt, name, name)
    trtp = types.ModuleType("tensorrt.plugin")
    registry: dict[str, dict[str, Callable]] = {}

    def decorator(kind: str) -> Callable:
        def by_id(plugin_id: str) -> Callable:
            def record(fn: Callable) -> Callable:
                registry.setdefault(plugin_id, {})[kind] = fn
                return fn
            return record
        return by_id

    trtp.register, trtp.autotune, trtp.aot_impl = decorator("register"), decorator("autotune"), decorator("aot")
    trtp.TensorDesc, trtp.KernelLaunchParams, trtp.SymIntExprs = TensorDesc, KernelLaunchParams, SymIntExprs
    trtp.SymInt32 = lambda expr: ("i32", expr)
    trtp.AutoTuneCombination = lambda spec: spec
    trtp.from_shape_expr = lambda shape, dtype: TensorDesc(tuple(shape), dtype)
    trt.plugin = trtp
    return trt, trtp, registry


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Callable]]:
    trt, trtp, registry = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_plugin, "_registered_mode", None)
    return registry


def _check_signatures(fns: dict[str, Callable], mode: str) -> None:
    inputs = [s.name for s in SPEC_VERIFY.inputs_for(mode)]
    register = inspect.signature(fns["register"])
    assert list(register.parameters) == [*inputs, "mode"]
    assert all(register.parameters[n].annotation is TensorDesc for n in inputs)
    assert register.parameters["mode"].annotation is str
    assert typing.get_origin(register.return_annotation) is tuple
    assert typing.get_args(register.return_annotation) == (TensorDesc, TensorDesc)
    assert list(inspect.signature(fns["autotune"]).parameters) == [*inputs, "outputs"]
    aot = inspect.signature(fns["aot"])
    assert list(aot.parameters) == [*inputs, "mode", "outputs", "tactic"]
    assert typing.get_origin(aot.return_annotation) is tuple and len(typing.get_args(aot.return_annotation)) == 4


@pytest.mark.parametrize("mode", MODES)
def test_registration_and_aot_launch(fake_trt: dict[str, dict[str, Callable]], mode: str) -> None:
    trt_plugin.register_spec_verify_plugin(mode)
    trt_plugin.register_spec_verify_plugin(mode)  # idempotent
    fns = fake_trt[SPEC_VERIFY.plugin_id]
    _check_signatures(fns, mode)

    shapes = {"target_logits": ("B", "G+1", "V"), "draft_tokens": ("B", "G"), "verify_len": ("B",),
              "draft_probs": ("B", "G", "V"), "temperature": ("B",), "uniforms": ("B", "G+1")}
    dtypes = {"target_logits": "bfloat16", "draft_tokens": "int64", "verify_len": "int64"}
    descs = [TensorDesc(shapes[s.name], dtypes.get(s.name, "float32")) for s in SPEC_VERIFY.inputs_for(mode)]
    outputs = fns["register"](*descs, mode)
    assert [(o.shape_expr, o.dtype) for o in outputs] == [(("B",), "int64")] * 2
    combination = fns["autotune"](*descs, outputs)[0]
    assert len(combination.split(",")) == len(descs) + 2

    name, ptx, launch, extra = fns["aot"](*descs, mode, outputs, 0)
    assert f".entry {name.decode()}(".encode() in ptx
    assert launch.grid_x == "B" and launch.block_x == 4 * 32
    assert extra == (("i32", "G"), ("i32", "V"))
    assert ptx == compile_ptx(mode, "bf16")["ptx"].encode()  # compiled for the logits dtype TensorRT reported


def test_one_mode_per_process(fake_trt: dict[str, dict[str, Callable]]) -> None:
    trt_plugin.register_spec_verify_plugin(GREEDY)
    with pytest.raises(UsageError, match="separate process"):
        trt_plugin.register_spec_verify_plugin(SAMPLING)
    with pytest.raises(UsageError, match="mode"):
        trt_plugin.register_spec_verify_plugin("beam")


def test_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(trt_plugin, "_registered_mode", None)
    with pytest.raises(BackendUnavailableError, match="decompose_spec_verify"):
        trt_plugin.register_spec_verify_plugin(GREEDY)
