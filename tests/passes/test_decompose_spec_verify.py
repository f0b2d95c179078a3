"""Pass `decompose_spec_verify`: the standard-op graph (onnxruntime) agrees with the NumPy reference.

Greedy must match exactly. Sampling must match exactly on every request whose float decisions are not
near-ties (reference.decision_margin >= MARGIN); near-ties are rare for these sizes and the test requires
that almost all requests are compared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto

from dspark_compile.artifacts import PLUGIN, PORTABLE, OnnxGraphs
from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.passes import decompose_spec_verify as decompose_pass
from dspark_compile.passes.decompose_spec_verify import MIN_OPSET, NODE_PREFIX, decompose_spec_verify
from dspark_compile.plugins.spec_verify.op_schema import GREEDY, SAMPLING, SPEC_VERIFY, make_model, make_node
from dspark_compile.plugins.spec_verify.reference import decision_margin, random_inputs, spec_verify_reference

ort = pytest.importorskip("onnxruntime")

MARGIN = 1e-5
Inputs = dict[str, torch.Tensor]
_ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16}


def _all_accepted(x: Inputs) -> Inputs:
    gamma = x["draft_tokens"].shape[1]
    x["verify_len"].fill_(gamma)
    if "uniforms" in x:
        x["uniforms"][:, :gamma] = 0.0  # u = 0 < ratio whenever p(x) > 0
    else:
        x["draft_tokens"] = x["target_logits"].float().argmax(-1)[:, :gamma]
    return x


def _none_accepted(x: Inputs) -> Inputs:
    gamma = x["draft_tokens"].shape[1]
    x["verify_len"].fill_(gamma)
    targets = x["target_logits"].float().argmax(-1)[:, :gamma]
    if "uniforms" in x:
        # q = 2·p: every ratio is 1/2 and u = 0.9 rejects; the residual max(p - 2p, 0) is 0, so the next token
        # comes from the fallback p_0.
        temps = torch.where(x["temperature"] > 0, x["temperature"], 1.0)
        p = torch.softmax(x["target_logits"].float() / temps[:, None, None], -1)
        x["draft_probs"] = 2 * p[:, :gamma]
        x["uniforms"][:, :gamma] = 0.9
    else:
        x["draft_tokens"] = (targets + 1) % x["target_logits"].shape[-1]
    return x


def _ties(x: Inputs) -> Inputs:
    # Integer logits in a tiny range: many tied maxima. Drafts pick the *last* tied maximum half of the time,
    # which must be rejected (the target token is the first maximum).
    logits = torch.randint(0, 3, x["target_logits"].shape, generator=torch.Generator().manual_seed(1))
    x["target_logits"] = logits.to(x["target_logits"].dtype)
    gamma = x["draft_tokens"].shape[1]
    vocab = logits.shape[-1]
    last_max = vocab - 1 - logits.flip(-1).argmax(-1)
    first_max = logits.argmax(-1)
    x["draft_tokens"] = torch.where(torch.arange(gamma) % 2 == 0, first_max[:, :gamma], last_max[:, :gamma])
    x["verify_len"].fill_(gamma)
    return x


def _clamped_lengths(x: Inputs) -> Inputs:
    gamma = x["draft_tokens"].shape[1]
    x["verify_len"] = torch.tensor([-3, 0, gamma, gamma + 5, 1, 0])[: x["verify_len"].shape[0]]
    return x


CASES: dict[str, tuple[str, dict, Callable[[Inputs], Inputs] | None]] = {
    "greedy_random": (GREEDY, dict(batch=16, gamma=4, vocab=37), None),
    "greedy_all_accepted": (GREEDY, dict(batch=6, gamma=5, vocab=29), _all_accepted),
    "greedy_none_accepted": (GREEDY, dict(batch=6, gamma=5, vocab=29), _none_accepted),
    "greedy_ties": (GREEDY, dict(batch=8, gamma=6, vocab=5), _ties),
    "greedy_ties_wide": (GREEDY, dict(batch=8, gamma=6, vocab=70), _ties),  # ties across kernel tiles
    "greedy_gamma1": (GREEDY, dict(batch=9, gamma=1, vocab=40), None),
    "greedy_lengths_clamped": (GREEDY, dict(batch=6, gamma=3, vocab=17), _clamped_lengths),
    "greedy_fp16": (GREEDY, dict(batch=12, gamma=7, vocab=64, logits_dtype=torch.float16), None),
    "greedy_fp16_ties": (GREEDY, dict(batch=8, gamma=4, vocab=6, logits_dtype=torch.float16), _ties),
    "greedy_bf16": (GREEDY, dict(batch=12, gamma=7, vocab=64, logits_dtype=torch.bfloat16), None),
    "sampling_random": (SAMPLING, dict(batch=32, gamma=4, vocab=37, greedy_row_prob=0.25), None),
    "sampling_all_accepted": (SAMPLING, dict(batch=8, gamma=5, vocab=23), _all_accepted),
    "sampling_none_accepted_fallback": (SAMPLING, dict(batch=8, gamma=5, vocab=23), _none_accepted),
    "sampling_greedy_rows_ties": (SAMPLING, dict(batch=8, gamma=6, vocab=70, greedy_row_prob=1.0), _ties),
    "sampling_gamma1": (SAMPLING, dict(batch=16, gamma=1, vocab=50), None),
    "sampling_lengths_clamped": (SAMPLING, dict(batch=6, gamma=3, vocab=17), _clamped_lengths),
    "sampling_fp16": (SAMPLING, dict(batch=24, gamma=7, vocab=64, logits_dtype=torch.float16,
                                     greedy_row_prob=0.2), None),
    "sampling_bf16": (SAMPLING, dict(batch=24, gamma=7, vocab=64, logits_dtype=torch.bfloat16), None),
    # G = 0: target-only decoding runs through the same verify graph (one token, no drafts).
    "greedy_gamma0": (GREEDY, dict(batch=16, gamma=0, vocab=64), None),
    "sampling_gamma0": (SAMPLING, dict(batch=16, gamma=0, vocab=64, greedy_row_prob=0.2), None),
}


def make_case(name: str, seed: int = 0) -> tuple[str, Inputs]:
    mode, kwargs, edit = CASES[name]
    inputs = random_inputs(mode=mode, generator=torch.Generator().manual_seed(seed), **kwargs)
    return mode, edit(inputs) if edit else inputs


def _ort_feed(inputs: Inputs) -> dict[str, object]:
    feed: dict[str, object] = {}
    for name, value in inputs.items():
        if value.dtype == torch.bfloat16:  # NumPy has no bf16: hand onnxruntime the raw bits
            bits = value.view(torch.int16).numpy().view(np.uint16)
            feed[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, TensorProto.BFLOAT16)
        else:
            feed[name] = value.numpy()
    return feed


def assert_matches_reference(mode: str, inputs: Inputs, accepted: np.ndarray, next_token: np.ndarray) -> None:
    want_accepted, want_next = spec_verify_reference(**inputs, mode=mode)
    compared = decision_margin(**inputs, mode=mode) >= MARGIN
    assert compared.mean() >= 0.9, "too many near-ties: the case does not test much"
    np.testing.assert_array_equal(np.asarray(accepted)[compared], want_accepted[compared])
    np.testing.assert_array_equal(np.asarray(next_token)[compared], want_next[compared])


def _decompose(model: onnx.ModelProto) -> onnx.ModelProto:
    return ir.serde.serialize_model(decompose_spec_verify(ir.serde.deserialize_model(model)))


def _decomposed_session(mode: str, logits_dtype: torch.dtype):
    model = _decompose(make_model(mode, _ONNX_DTYPE[logits_dtype]))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnxruntime_matches_reference(name: str) -> None:
    mode, inputs = make_case(name)
    session = _decomposed_session(mode, inputs["target_logits"].dtype)
    for seed in range(3):  # one graph, several draws: dynamic B/G/V is re-exercised by the other cases
        mode, inputs = make_case(name, seed)
        accepted, next_token = session.run(None, _ort_feed(inputs))
        assert accepted.dtype == next_token.dtype == np.int64
        assert_matches_reference(mode, inputs, accepted, next_token)


def test_cases_cover_the_edges() -> None:
    """The named edge cases really produce what their names say (guards the case builders)."""
    for name, expect in [("greedy_all_accepted", "all"), ("sampling_all_accepted", "all"),
                         ("greedy_none_accepted", "none"), ("sampling_none_accepted_fallback", "none")]:
        mode, inputs = make_case(name)
        accepted, _ = spec_verify_reference(**inputs, mode=mode)
        gamma = inputs["draft_tokens"].shape[1]
        assert (accepted == (gamma if expect == "all" else 0)).all(), name
    mode, inputs = make_case("greedy_ties")
    logits = inputs["target_logits"].float()
    assert ((logits == logits.amax(-1, keepdim=True)).sum(-1) > 1).any()


def test_pass_output_structure() -> None:
    model = _decompose(make_model(SAMPLING))
    assert SPEC_VERIFY.domain not in {o.domain for o in model.opset_import}
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert all(node.name.startswith(NODE_PREFIX + "/") for node in model.graph.node)
    assert {node.op_type for node in model.graph.node}.isdisjoint({"Loop", "If", "Scan"})
    assert [o.name for o in model.graph.output] == [o.name for o in SPEC_VERIFY.outputs]
    onnx.checker.check_model(model, full_check=True)
    model_ir = ir.serde.deserialize_model(model)
    assert decompose_spec_verify(model_ir) is model_ir  # in place; nothing left to rewrite:
    assert [(n.name, n.op_type) for n in model_ir.graph] == [(n.name, n.op_type) for n in model.graph.node]


def test_pass_keeps_the_rest_of_the_graph() -> None:
    """SpecVerify fed by another node, its outputs consumed by another: only the node is replaced."""
    model = make_model(GREEDY)
    graph = model.graph
    graph.input[0].name = "raw_logits"
    graph.node.insert(0, onnx.helper.make_node("Identity", ["raw_logits"], ["target_logits"], name="head"))
    graph.node[1].output[1] = "next_raw"
    graph.node.append(onnx.helper.make_node("Identity", ["next_raw"], ["next_token"], name="tail"))
    decomposed = _decompose(model)
    names = [node.name for node in decomposed.graph.node]
    assert "head" in names and "tail" in names
    mode, inputs = make_case("greedy_random")
    feed = _ort_feed(inputs)
    feed["raw_logits"] = feed.pop("target_logits")
    session = ort.InferenceSession(decomposed.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_matches_reference(mode, inputs, *session.run(None, feed))


@pytest.mark.parametrize("mode", [GREEDY, SAMPLING])
def test_oldest_supported_opset(mode: str) -> None:
    model = _decompose(make_model(mode, opset=MIN_OPSET))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mode, inputs = make_case(f"{mode}_random")
    assert_matches_reference(mode, inputs, *session.run(None, _ort_feed(inputs)))


def test_pass_rejects_malformed_nodes_and_old_opsets() -> None:
    model = make_model(GREEDY)
    model.graph.node[0].attribute[0].s = b"beam"
    with pytest.raises(BuildError, match="mode"):
        _decompose(model)
    model = make_model(SAMPLING)
    del model.graph.node[0].input[5]
    with pytest.raises(BuildError, match="6 inputs"):
        _decompose(model)
    with pytest.raises(BuildError, match="opset"):
        _decompose(make_model(GREEDY, opset=MIN_OPSET - 1))
    with pytest.raises(ValueError, match="3 inputs"):
        make_node(GREEDY, ["a", "b"])


def test_tensorrt_rtx_builds_the_decomposition(tmp_path) -> None:
    """Parse + build with TensorRT-RTX on the CPU, dynamic B, G and V (engines cannot run on the H100)."""
    trt = pytest.importorskip("tensorrt_rtx_bindings")
    ranges = {"B": (1, 4, 64), "G": (1, 7, 15), "G+1": (2, 8, 16), "V": (16, 1024, 151936)}
    for mode in (GREEDY, SAMPLING):
        for dtype in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            model = _decompose(make_model(mode, dtype))
            logger = trt.Logger(trt.Logger.ERROR)
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
            config = builder.create_builder_config()
            profile = builder.create_optimization_profile()
            for spec in SPEC_VERIFY.inputs_for(mode):
                low, opt, high = ([ranges[d][i] for d in spec.shape] for i in range(3))
                profile.set_shape(spec.name, low, opt, high)
            config.add_optimization_profile(profile)
            plan = builder.build_serialized_network(network, config)
            assert plan is not None and plan.nbytes > 0, (mode, dtype)
            outputs = [network.get_output(i) for i in range(network.num_outputs)]
            assert [o.name for o in outputs] == ["accepted", "next_token"]
            assert all(o.dtype == trt.int64 for o in outputs)


def test_pass_keeps_the_exported_graph_as_the_plugin_variant(exported_copy: OnnxGraphs, exported_dir: Path,
                                                              tmp_path: Path) -> None:
    state = BuildState(spec=BuildSpec(Path("t"), Path("d"), tmp_path / "out"), workdir=tmp_path, onnx=exported_copy)
    decompose_pass.run(state)
    graphs = state.onnx
    assert graphs.variants["target_step"] == (PORTABLE, PLUGIN)
    exported = onnx.load(str(exported_dir / "target_step.onnx"), load_external_data=False)
    plugin = ir.to_proto(graphs.model("target_step", PLUGIN))
    assert [n.op_type for n in plugin.graph.node] == [n.op_type for n in exported.graph.node]
    portable = ir.to_proto(graphs.model("target_step", PORTABLE))
    assert SPEC_VERIFY.domain not in {n.domain for n in portable.graph.node}
    assert SPEC_VERIFY.domain not in {o.domain for o in portable.opset_import}
    assert [v.name for v in portable.graph.input] == [v.name for v in exported.graph.input]
    assert [v.name for v in portable.graph.output] == [v.name for v in exported.graph.output]
    kept = [n.name for n in exported.graph.node if not SPEC_VERIFY.is_node(n)]
    assert [n.name for n in portable.graph.node if not n.name.startswith(NODE_PREFIX + "/")] == kept
