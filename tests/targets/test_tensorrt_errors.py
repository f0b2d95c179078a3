"""Graphs TensorRT cannot take give one clear DsparkError, and the calling process lives on."""

from __future__ import annotations

import textwrap
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from dspark_compile.artifacts import GraphIO
from dspark_compile.errors import BuildError, UsageError
from dspark_compile.targets.tensorrt import TrtFlavor, build_engine, graph_checks, load_trt
from dspark_compile.targets.tensorrt import build as trt_build

pytest.importorskip("tensorrt_rtx_bindings")

PROFILE = {"x": ((1, 4), (2, 4), (4, 4))}


@pytest.fixture(scope="module")
def rtx() -> TrtFlavor:
    return load_trt("rtx")


def _model(path: Path, nodes: list, *, x_type: int = TensorProto.FLOAT, y_type: int = TensorProto.FLOAT,
           domains: tuple[str, ...] = ()) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, ["B", 4])],
                              [helper.make_tensor_value_info("y", y_type, ["B", 4])])
    opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _build(rtx: TrtFlavor, onnx_path: Path, **kwargs: object) -> None:
    build_engine(onnx_path, onnx_path.with_suffix(".plan"), flavor=rtx, **{"profiles": [PROFILE], **kwargs})


def _spec_verify(path: Path) -> Path:
    node = helper.make_node("SpecVerify", ["x"], ["y"], name="spec_verify", domain="dspark", mode="greedy")
    return _model(path, [node], domains=("dspark",))


def test_custom_domain_node_is_refused_before_tensorrt_sees_it(tmp_path: Path, rtx: TrtFlavor) -> None:
    with pytest.raises(BuildError, match=r"`spec_verify` \(dspark::SpecVerify\).*--no-plugin") as info:
        _build(rtx, _spec_verify(tmp_path / "verify.onnx"))
    assert info.value.exit_code == 3
    assert not (tmp_path / "verify.plan").exists()


def test_native_abort_in_the_builder_is_a_clear_error(tmp_path: Path, rtx: TrtFlavor,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The real hazard, reproduced: with a SpecVerify plugin creator registered, TensorRT-RTX's parser aborts
    ("terminate called without an active exception"). The builder process dies, the caller gets a BuildError.

    The child is made to register such a creator, and the flavor is told it has plugins so that the Python
    pre-check lets the node through to the parser.
    """
    prelude = tmp_path / "register_spec_verify.py"
    prelude.write_text(textwrap.dedent('''
        import sys
        import tensorrt_rtx_bindings as trt
        from dspark_compile.targets.tensorrt.build import _child_main

        class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
            def __init__(self):
                trt.IPluginV3.__init__(self)
                trt.IPluginV3OneCore.__init__(self)
                trt.IPluginV3OneBuild.__init__(self)
                trt.IPluginV3OneRuntime.__init__(self)
                self.plugin_name, self.plugin_version, self.plugin_namespace = "SpecVerify", "1", ""
                self.num_outputs = 1
            def get_capability_interface(self, kind): return self
            def clone(self): return Plugin()
            def get_output_data_types(self, dtypes): return [trt.float32]
            def get_output_shapes(self, inputs, shape_inputs, exprs): return [inputs[0]]
            def supports_format_combination(self, pos, io, n): return True
            def configure_plugin(self, i, o): pass
            def on_shape_change(self, i, o): pass
            def enqueue(self, *args): pass
            def attach_to_context(self, context): return self.clone()
            def get_fields_to_serialize(self): return trt.PluginFieldCollection([])

        class Creator(trt.IPluginCreatorV3One):
            def __init__(self):
                trt.IPluginCreatorV3One.__init__(self)
                self.name, self.plugin_namespace, self.plugin_version = "SpecVerify", "", "1"
                self.field_names = trt.PluginFieldCollection([])
            def create_plugin(self, name, fields, phase): return Plugin()

        creator = Creator()
        trt.get_plugin_registry().register_creator(creator, "")
        sys.exit(_child_main(sys.argv[1]))
    '''))
    monkeypatch.setattr(trt_build, "_CHILD_CODE", f"import runpy; runpy.run_path({str(prelude)!r})")
    lying = TrtFlavor(**{**rtx.__dict__, "supports_plugins": True})
    with pytest.raises(BuildError, match=r"builder process was killed by SIGABRT.*process is unaffected"):
        _build(lying, _spec_verify(tmp_path / "verify.onnx"))


def test_unknown_standard_op_names_the_node(tmp_path: Path, rtx: TrtFlavor) -> None:
    path = _model(tmp_path / "frob.onnx", [helper.make_node("Frobnicate", ["x"], ["y"], name="frob_1")])
    with pytest.raises(BuildError, match=r"TensorRT-RTX .* does not support op `Frobnicate` \(node #0 "
                                         r"`frob_1`\).*standard ONNX ops"):
        _build(rtx, path)


def test_an_output_that_is_a_whole_cache_is_refused(tmp_path: Path, rtx: TrtFlavor) -> None:
    """The KV contract (docs/PROGRAM.md): `kv_cache_out` [.., cache_slots, D] would travel back every call."""
    cache = ["L", 2, "batch", 2, "cache_slots", 4]
    rows = ["L", 2, "batch", 2, "verify_tokens", 4]

    def graph(out_dims: list) -> Path:
        g = helper.make_graph([helper.make_node("Identity", ["kv_cache"], ["kv_out"])], "g",
                              [helper.make_tensor_value_info("kv_cache", TensorProto.FLOAT, cache)],
                              [helper.make_tensor_value_info("kv_out", TensorProto.FLOAT, out_dims)])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        path = tmp_path / f"kv_{out_dims[4]}.onnx"
        onnx.save(model, path)
        return path

    with pytest.raises(BuildError, match=r"output `kv_out` .* cache capacity dimension `cache_slots`.*only the rows"):
        _build(rtx, graph(cache), profiles=[{"kv_cache": ((1, 2, 1, 2, 16, 4),) * 3}])
    assert not (tmp_path / "kv_cache_slots.plan").exists()
    io = GraphIO.of(graph_checks.read_onnx(graph(rows)))
    graph_checks.check_no_cache_outputs(io, tmp_path / "kv_verify_tokens.onnx")  # new rows only: accepted


def test_the_sliding_ring_is_a_fixed_size_cache_input(tmp_path: Path) -> None:
    """Gemma4's ``kv_ring`` [Ls, 2, B, KV, R, D]: R is fixed in the graph (slot = position mod R), so its rows
    output ``ring_new`` [.., step_len, D] passes, and a ring whose slot axis is dynamic is refused."""
    from dspark_compile.artifacts import TensorIO

    def io(ring_slots: int | str) -> GraphIO:
        return GraphIO((TensorIO("kv_cache", "float", (2, 2, "batch", 1, "cache_slots", 32)),
                        TensorIO("kv_ring", "float", (4, 2, "batch", 2, ring_slots, 16))),
                       (TensorIO("kv_new", "float", (2, 2, "batch", 1, "step_len", 32)),
                        TensorIO("ring_new", "float", (4, 2, "batch", 2, "step_len", 16))))

    assert "kv_ring" in graph_checks.RING_INPUTS
    graph_checks.check_no_cache_outputs(io(23), tmp_path / "target_step.onnx")
    with pytest.raises(BuildError, match=r"input `kv_ring` .* with R fixed"):
        graph_checks.check_no_cache_outputs(io("cache_slots"), tmp_path / "target_step.onnx")


@pytest.mark.parametrize(("elem_type", "name"), [(TensorProto.STRING, "string"), (TensorProto.DOUBLE, "float64"),
                                                 (TensorProto.UINT64, "uint64")])
def test_input_of_a_dtype_without_engine_binding(tmp_path: Path, rtx: TrtFlavor, elem_type: int, name: str,
                                                 ) -> None:
    path = _model(tmp_path / "typed.onnx", [helper.make_node("Identity", ["x"], ["y"])], x_type=elem_type,
                  y_type=elem_type)
    with pytest.raises(BuildError, match=rf"graph input `x` is {name}; a TensorRT engine binding must be"):
        _build(rtx, path)


def test_unsupported_dtype_inside_the_graph(tmp_path: Path, rtx: TrtFlavor) -> None:
    nodes = [helper.make_node("Cast", ["x"], ["s"], name="to_string", to=TensorProto.STRING),
             helper.make_node("Cast", ["s"], ["y"], name="back", to=TensorProto.FLOAT)]
    with pytest.raises(BuildError, match=r"node #0 `to_string` \(Cast\).*Unsupported data type"):
        _build(rtx, _model(tmp_path / "cast.onnx", nodes))


@pytest.mark.parametrize(("content", "message"), [
    (b"\x08garbage, not protobuf \xff\xff", "not a readable ONNX model"),
    (b"", "no graph outputs"),
])
def test_corrupt_onnx_file(tmp_path: Path, rtx: TrtFlavor, content: bytes, message: str) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(BuildError, match=message):
        _build(rtx, path)


def test_missing_onnx_file(tmp_path: Path, rtx: TrtFlavor) -> None:
    with pytest.raises(BuildError, match="ONNX file not found"):
        _build(rtx, tmp_path / "absent.onnx")


def test_precision_must_match_the_graph(tmp_path: Path, rtx: TrtFlavor) -> None:
    """Networks are strongly typed: asking fp16 of an fp32 graph is refused, not silently built in fp32."""
    path = _model(tmp_path / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(BuildError, match=r"computes in float32 but precision fp16.*export the graph in float16"):
        _build(rtx, path, precision="fp16")
    with pytest.raises(UsageError, match="precision: expected one of fp32, fp16, bf16"):
        _build(rtx, path, precision="int8")


@pytest.mark.parametrize(("profile", "message"), [
    ({}, "no .min, opt, max. shapes for the dynamic input `x`"),
    ({"x": ((1, 4), (2, 4), (4, 4)), "z": ((1,), (1,), (1,))}, "names input `z`"),
    ({"x": ((1, 4, 1), (2, 4, 1), (4, 4, 1))}, "has rank 2"),
    ({"x": ((1, 5), (2, 5), (4, 5))}, "axis 1 is fixed at 4"),
    ({"x": ((4, 4), (2, 4), (1, 4))}, "min <= opt <= max"),
])
def test_profile_that_does_not_fit_the_graph(tmp_path: Path, rtx: TrtFlavor, profile: dict, message: str,
                                             ) -> None:
    path = _model(tmp_path / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(UsageError, match=message):
        _build(rtx, path, profiles=[profile])


def test_plugin_modules_are_imported_in_the_builder(tmp_path: Path, rtx: TrtFlavor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder is a fresh interpreter, so plugins register there (full TensorRT); RTX refuses them."""
    (tmp_path / "dspark_test_plugins.py").write_text(
        f"from pathlib import Path\nPath({str(tmp_path / 'imported')!r}).write_text('yes')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    path = _model(tmp_path / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(UsageError, match="has no plugin support"):
        _build(rtx, path, plugin_modules=["dspark_test_plugins"])
    with_plugins = TrtFlavor(**{**rtx.__dict__, "supports_plugins": True})
    _build(with_plugins, path, plugin_modules=["dspark_test_plugins"])
    assert (tmp_path / "imported").read_text() == "yes"
    with pytest.raises(BuildError, match="plugin module `no_such_plugins` cannot be imported"):
        _build(with_plugins, path, plugin_modules=["no_such_plugins"])


def test_python_error_in_the_builder_is_a_clear_error(tmp_path: Path, rtx: TrtFlavor,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_build, "_CHILD_CODE", "raise SystemExit('builder broke: out of disk')")
    path = _model(tmp_path / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(BuildError, match=r"builder process failed \(exit status 1\): builder broke"):
        _build(rtx, path)
