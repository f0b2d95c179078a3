"""Pass `decompose_spec_verify`: rewrite every ``dspark::SpecVerify`` node into standard ONNX ops.

onnxruntime and TensorRT-RTX cannot run the custom node, so the exported graph stays as the plugin variant and
its rewrite (an onnxscript rule) is the portable one: ``spec_verify_torch``'s rules with no Loop/If and B, G,
V dynamic. accepted = min(ℓ, leading passes), counted as ``ReduceSum(CumSum(Not(pass)) == 0)``; the
inverse-CDF draw is the count of i with cumsum(w)[i] <= u·sum(w) (V meaning "none": then the last positive
weight, found with a reversed CumSum). Logits are cast to float32 first (exact, keeps ArgMax ties).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from dspark_compile.artifacts import PLUGIN, PORTABLE
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.plugins.spec_verify.op_schema import GREEDY, SAMPLING, SPEC_VERIFY
from dspark_compile.plugins.spec_verify.reference import Q_FLOOR, RESIDUAL_FLOOR

MIN_OPSET = 15  # Shape with start/end (15), ReduceSum axes as an input (13); the compiler exports 18
NODE_PREFIX = "spec_verify"  # name prefix of every node the pass adds


def _i64(op, *values: int) -> ir.Value:
    return op.Constant(value_ints=list(values))


def _i32(op, value: int) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(value, dtype=np.int32)))


def _f32(op, value: float) -> ir.Value:
    return op.Constant(value_float=value)


def _as_float(op, logits: ir.Value) -> ir.Value:
    return logits if logits.dtype == ir.DataType.FLOAT else op.Cast(logits, to=ir.DataType.FLOAT)


def _leading_count(op, passed: ir.Value) -> ir.Value:
    """Leading True values along axis 1 of a [B, G] bool tensor, as [B] int64."""
    failures = op.CumSum(op.Cast(op.Not(passed), to=ir.DataType.INT32), _i64(op, 1))
    return op.ReduceSum(op.Cast(op.Equal(failures, _i32(op, 0)), to=ir.DataType.INT64),
                        _i64(op, 1), keepdims=0)


def _greedy_core(op, logits: ir.Value, drafts: ir.Value, verify_len: ir.Value):
    """Shared by both modes: target argmax, draft matches, ℓ clamped, G as a [1] tensor."""
    targets = op.ArgMax(logits, axis=2, keepdims=0)  # [B, G+1] int64, first maximum on ties
    gamma = op.Shape(drafts, start=1, end=2)
    match = op.Equal(drafts, op.Slice(targets, _i64(op, 0), gamma, _i64(op, 1)))
    lengths = op.Min(op.Max(verify_len, op.Constant(value_int=0)), op.Squeeze(gamma))
    return targets, match, lengths, gamma


def _pick_row(op, x: ir.Value, row: ir.Value) -> ir.Value:
    """x[b, row[b], :] of a [B, R, V] tensor as [B, 1, V]."""
    shape = op.Concat(op.Shape(x, start=0, end=1), _i64(op, 1), op.Shape(x, start=2, end=3), axis=0)
    return op.GatherElements(x, op.Expand(op.Unsqueeze(row, _i64(op, 1, 2)), shape), axis=1)


def _count_where(op, condition: ir.Value) -> ir.Value:
    """Number of True values along axis 2 of [B, 1, V], as [B] int64."""
    return op.ReduceSum(op.Cast(condition, to=ir.DataType.INT64), _i64(op, 1, 2), keepdims=0)


def _inverse_cdf(op, weights: ir.Value, u: ir.Value) -> ir.Value:
    """Inverse-CDF draw from unnormalised weights [B, 1, V] with u [B] (README sampling rule 4)."""
    vocab = op.Shape(weights, start=2, end=3)
    total = op.ReduceSum(weights, _i64(op, 2), keepdims=1)
    threshold = op.Mul(op.Unsqueeze(u, _i64(op, 1, 2)), total)
    first_above = _count_where(op, op.LessOrEqual(op.CumSum(weights, _i64(op, 2)), threshold))
    positive = op.Cast(op.Greater(weights, _f32(op, 0.0)), to=ir.DataType.INT32)
    trailing_zeros = _count_where(op, op.Equal(op.CumSum(positive, _i64(op, 2), reverse=1),
                                               _i32(op, 0)))
    last_positive = op.Sub(op.Sub(vocab, _i64(op, 1)), trailing_zeros)
    return op.Where(op.Less(first_above, vocab), first_above, last_positive)


class _DecomposeGreedy(pattern.RewriteRuleClassBase):
    def pattern(self, op, target_logits, draft_tokens, verify_len):
        return op.SpecVerify(target_logits, draft_tokens, verify_len, mode=GREEDY,
                             _domain=SPEC_VERIFY.domain, _outputs=2)

    def rewrite(self, op, target_logits, draft_tokens, verify_len):
        targets, match, lengths, _ = _greedy_core(op, _as_float(op, target_logits), draft_tokens, verify_len)
        accepted = op.Min(_leading_count(op, match), lengths)
        next_token = op.Squeeze(op.GatherElements(targets, op.Unsqueeze(accepted, _i64(op, 1)), axis=1),
                                _i64(op, 1))
        return accepted, next_token


class _DecomposeSampling(pattern.RewriteRuleClassBase):
    def pattern(self, op, target_logits, draft_tokens, verify_len, draft_probs, temperature, uniforms):
        return op.SpecVerify(target_logits, draft_tokens, verify_len, draft_probs, temperature, uniforms,
                             mode=SAMPLING, _domain=SPEC_VERIFY.domain, _outputs=2)

    def rewrite(self, op, target_logits, draft_tokens, verify_len, draft_probs, temperature, uniforms):
        logits = _as_float(op, target_logits)
        targets, match, lengths, gamma = _greedy_core(op, logits, draft_tokens, verify_len)
        one, axis1 = _f32(op, 1.0), _i64(op, 1)

        greedy_row = op.Not(op.Greater(temperature, _f32(op, 0.0)))  # [B]
        temps = op.Where(greedy_row, one, temperature)
        p = op.Softmax(op.Div(logits, op.Unsqueeze(temps, _i64(op, 1, 2))), axis=2)  # [B, G+1, V]
        picked = op.Unsqueeze(draft_tokens, _i64(op, 2))
        p_x = op.GatherElements(op.Slice(p, _i64(op, 0), gamma, axis1), picked, axis=2)
        q_x = op.Max(op.GatherElements(draft_probs, picked, axis=2), _f32(op, Q_FLOOR))
        ratio = op.Min(op.Squeeze(op.Div(p_x, q_x), _i64(op, 2)), one)
        passed = op.Less(op.Slice(uniforms, _i64(op, 0), gamma, axis1), ratio)
        greedy_cols = op.Unsqueeze(greedy_row, axis1)  # Where on bool is missing in onnxruntime: And/Or
        passed = op.Or(op.And(greedy_cols, match), op.And(op.Not(greedy_cols), passed))
        accepted = op.Min(_leading_count(op, passed), lengths)

        p_j = _pick_row(op, p, accepted)
        # One zero row appended: row j = ℓ (never used as a residual) exists even when G = 0.
        q_padded = op.Pad(draft_probs, _i64(op, 0, 0, 0, 0, 1, 0), _f32(op, 0.0))
        q_j = _pick_row(op, q_padded, accepted)
        residual = op.Max(op.Sub(p_j, q_j), _f32(op, 0.0))
        residual_ok = op.Greater(op.ReduceSum(residual, _i64(op, 1, 2), keepdims=0), _f32(op, RESIDUAL_FLOOR))
        use_residual = op.And(op.Less(accepted, lengths), residual_ok)
        weights = op.Where(op.Unsqueeze(use_residual, _i64(op, 1, 2)), residual, p_j)
        u = op.Squeeze(op.Slice(uniforms, gamma, op.Add(gamma, _i64(op, 1)), axis1), axis1)
        drawn = _inverse_cdf(op, weights, u)
        greedy_next = op.Squeeze(op.GatherElements(targets, op.Unsqueeze(accepted, axis1), axis=1), axis1)
        return accepted, op.Where(greedy_row, greedy_next, drawn)


_RULES = pattern.RewriteRuleSet([_DecomposeGreedy.rule(), _DecomposeSampling.rule()])


def _all_nodes(model: ir.Model) -> list[ir.Node]:
    graphs = [model.graph, *model.functions.values()]
    return [node for graph in graphs for node in ir.traversal.RecursiveGraphIterator(graph)]


def decompose_spec_verify(model: ir.Model) -> ir.Model:
    """Rewrite every ``dspark::SpecVerify`` node of ``model`` (in place) into standard ops; returns ``model``.

    Raises :class:`BuildError` for a malformed SpecVerify node or a default opset below 15.
    """
    nodes = [node for node in _all_nodes(model) if (node.op_type, node.domain) == (SPEC_VERIFY.name,
                                                                                   SPEC_VERIFY.domain)]
    if not nodes:
        return model
    for node in nodes:
        try:
            SPEC_VERIFY.check_node(ir.serde.serialize_node(node))
        except ValueError as exc:
            raise BuildError(f"decompose_spec_verify: {exc}") from exc
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        raise BuildError(f"decompose_spec_verify: the model imports default opset {opset or 'none'}; the decomposition "
                         f"needs >= {MIN_OPSET}. Export the graph with opset_version=18.")
    before = {id(node) for node in _all_nodes(model)}
    count = _RULES.apply_to_model(model)
    # Subgraphs of control-flow nodes are out of scope; fail loudly instead of leaving a node behind.
    if count != len(nodes):
        raise BuildError(f"decompose_spec_verify: rewrote {count} of {len(nodes)} SpecVerify nodes")
    # Engine inspection finds the verification layers by this prefix (targets/tensorrt/inspect.py).
    added = [node for node in _all_nodes(model) if id(node) not in before]
    for index, node in enumerate(added):
        node.name = f"{NODE_PREFIX}/{node.op_type}_{index}"
    if not any(node.domain == SPEC_VERIFY.domain for node in _all_nodes(model)):
        model.opset_imports.pop(SPEC_VERIFY.domain, None)
    return model


def run(state: BuildState) -> None:
    """The exported target_step graph stays as the plugin variant (full TensorRT); its decomposition, which shares
    its weights, is the portable one that everything else runs."""
    assert state.onnx is not None
    plugin = state.onnx.model("target_step", PORTABLE)
    state.onnx.models["target_step"] = {PORTABLE: decompose_spec_verify(plugin.clone()), PLUGIN: plugin}
