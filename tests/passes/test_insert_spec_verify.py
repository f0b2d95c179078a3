"""Pass `insert_spec_verify`: target_verify ends in one `dspark::SpecVerify` node exactly as the plugin's schema
object declares it, fed by the exported logits and tokens[:, 1:]; decomposed and run, it decides what the NumPy
reference decides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from dspark_compile.ir import PLUGIN, PORTABLE, OnnxGraphs
from dspark_compile.passes.insert_spec_verify import insert_spec_verify
from dspark_compile.pipeline import PIPELINE, BuildState
from dspark_compile.plugins.spec_verify.reference import spec_verify_reference
from dspark_compile.plugins.spec_verify.schema import GREEDY, MODES, SAMPLING, SPEC_VERIFY
from dspark_compile.spec import BuildSpec

VOCAB, G = 384, 7
SHAPES = {"verify_len": ["batch"], "draft_probs": ["batch", "draft_len", VOCAB], "temperature": ["batch"],
          "uniforms": ["batch", "verify_tokens"]}


def _insert(graphs: OnnxGraphs, mode: str) -> OnnxGraphs:
    return insert_spec_verify(dataclasses.replace(graphs, verify_mode=mode), VOCAB)


@pytest.mark.parametrize("mode", MODES)
def test_node_and_graph_follow_the_schema(exported_copy: OnnxGraphs, mode: str) -> None:
    graphs = _insert(exported_copy, mode)
    assert graphs.variants == {"target_verify": (PLUGIN,)}
    assert not graphs.path("target_verify", PORTABLE).exists()  # the raw graph is replaced, not kept
    model = onnx.load(str(graphs.path("target_verify", PLUGIN)), load_external_data=False)
    nodes = [n for n in model.graph.node if (n.op_type, n.domain) == (SPEC_VERIFY.name, SPEC_VERIFY.domain)]
    assert len(nodes) == 1
    node = nodes[0]
    specs = SPEC_VERIFY.inputs_for(mode)
    assert len(node.input) == len(specs) == (3 if mode == GREEDY else 6)
    assert list(node.output) == [o.name for o in SPEC_VERIFY.outputs]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"mode": mode.encode(), **{k: v.encode() for k, v in SPEC_VERIFY.tensorrt_lookup.items()}}
    assert SPEC_VERIFY.check_node(node) == mode
    assert (SPEC_VERIFY.domain, SPEC_VERIFY.opset_version) in {(o.domain, o.version) for o in model.opset_import}

    # Wiring: the exported logits, then the drafts tokens[:, 1:], then new graph inputs named as in the schema.
    producer = {out: n for n in model.graph.node for out in n.output}
    assert node.input[0] == "logits" and producer["logits"].op_type == "MatMul"
    cut = producer[node.input[1]]
    consts = {i.name: numpy_helper.to_array(i).tolist() for i in model.graph.initializer if i.name in cut.input}
    assert (cut.op_type, cut.input[0], consts[cut.input[1]], consts[cut.input[3]]) == ("Slice", "tokens", [1], [1])
    assert list(node.input[2:]) == [s.name for s in specs[2:]]

    inputs = {v.name: v.type.tensor_type for v in model.graph.input}
    assert list(inputs) == ["tokens", "cache_len", "kv_cache", *(s.name for s in specs[2:])]
    for spec in specs[2:]:
        assert inputs[spec.name].elem_type == spec.dtypes[0]
        assert [d.dim_param or d.dim_value for d in inputs[spec.name].shape.dim] == SHAPES[spec.name]
    assert [o.name for o in model.graph.output] == ["accepted", "next_token", "taps", "kv_new"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.INT64 for o in model.graph.output[:2])


@pytest.mark.parametrize("mode", MODES)
def test_decisions_equal_the_reference(exported_copy: OnnxGraphs, exported_dir: Path, tmp_path: Path, mode: str,
                                       run_onnx: Callable[..., dict[str, np.ndarray]],
                                       feeds_for: Callable[..., dict[str, np.ndarray]]) -> None:
    graphs = _insert(exported_copy, mode)
    state = BuildState(spec=BuildSpec(Path("t"), Path("d"), tmp_path / "out", verify_mode=mode),
                       workdir=tmp_path, onnx=graphs)
    next(step for step in PIPELINE if step.name == "decompose_spec_verify").run(state)
    portable = state.onnx.path("target_verify", PORTABLE)
    feeds = feeds_for(portable, seed=3)
    # Drafts that are the target's own greedy choices: all 7 in row 0, the first 3 in row 1.
    raw = exported_dir / "target_verify.onnx"
    tokens = feeds["tokens"]
    for j in range(G):
        logits = run_onnx(raw, {k: feeds[k] for k in ("tokens", "cache_len", "kv_cache")})["logits"]
        tokens[0, j + 1] = logits[0, j].argmax()
        if j < 3:
            tokens[1, j + 1] = logits[1, j].argmax()
    logits = run_onnx(raw, {k: feeds[k] for k in ("tokens", "cache_len", "kv_cache")})["logits"]
    feeds["verify_len"] = np.array([G, 5])
    got = run_onnx(portable, feeds)
    extra = {k: feeds[k] for k in ("draft_probs", "temperature", "uniforms")} if mode == SAMPLING else {}
    accepted, next_token = spec_verify_reference(logits, tokens[:, 1:], feeds["verify_len"], mode=mode, **extra)
    assert got["accepted"].tolist() == accepted.tolist()
    assert got["next_token"].tolist() == next_token.tolist()
    assert accepted[0] == G  # row 0 is greedy in both modes (temperature 0)
    if mode == GREEDY:
        assert accepted[1] == 3
