"""Pass `insert_spec_verify`: end target_verify in one `dspark::SpecVerify` node (the plugin variant).

The exported verify graph returns raw logits; this pass adds the verification inputs the plugin declares
(`verify_len`, and for sampling `draft_probs`, `temperature`, `uniforms`), feeds the logits to the node and
replaces the logits output by `accepted` and `next_token`. Input names and order come from the plugin's
own schema object, so graph and plugin cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dspark_compile.artifacts import PLUGIN, PORTABLE
from dspark_compile.build_state import BuildState
from dspark_compile.plugins.spec_verify.schema import SPEC_VERIFY, make_node

# Symbolic dims of the exported graph, so the new inputs share them.
DIMS = {"B": "batch", "G": "draft_len", "G+1": "verify_tokens", "V": None}


def add_spec_verify(model: ir.Model, mode: str, vocab: int) -> None:
    """Edit ``model`` (the exported target_verify) in place."""
    g = model.graph
    logits = next(o for o in g.outputs if o.name == "logits")
    names = ["logits"]
    values = [logits]
    for spec in SPEC_VERIFY.inputs_for(mode)[1:]:
        if spec.name == "draft_tokens":  # the drafts are tokens[:, 1:] of the existing input
            values.append(_draft_tokens(g))
        else:
            dims = [vocab if d == "V" else DIMS[d] for d in spec.shape]
            value = ir.Value(name=spec.name, type=ir.TensorType(ir.DataType(spec.dtypes[0])), shape=ir.Shape(dims))
            g.inputs.append(value)
            values.append(value)
        names.append(spec.name)
    proto = make_node(mode, names, [o.name for o in SPEC_VERIFY.outputs], name="spec_verify")
    node = ir.Node(SPEC_VERIFY.domain, SPEC_VERIFY.name, values, name="spec_verify", num_outputs=2,
                   attributes=[ir.AttrString(a.name, a.s.decode()) for a in proto.attribute])
    for value, spec in zip(node.outputs, SPEC_VERIFY.outputs, strict=True):
        value.name = spec.name
        value.type = ir.TensorType(ir.DataType(spec.dtypes[0]))
        value.shape = ir.Shape([DIMS[d] for d in spec.shape])
    g.append(node)
    keep = [o for o in g.outputs if o.name != "logits"]
    g.outputs.clear()
    g.outputs.extend([*node.outputs, *keep])
    model.opset_imports[SPEC_VERIFY.domain] = SPEC_VERIFY.opset_version


def _draft_tokens(g: ir.Graph) -> ir.Value:
    consts = []
    for name, value in (("sv_start", 1), ("sv_end", 2**62), ("sv_axis", 1)):
        const = ir.Value(name=name, const_value=ir.tensor(np.array([value], np.int64), name=name))
        g.register_initializer(const)
        consts.append(const)
    tokens = next(v for v in g.inputs if v.name == "tokens")
    node = ir.Node("", "Slice", [tokens, *consts], name="draft_tokens_slice")
    node.outputs[0].name = "draft_tokens"
    g.append(node)
    return node.outputs[0]


def run(state: BuildState) -> None:
    assert state.onnx is not None and state.info is not None
    graphs = state.onnx
    model = graphs.models["target_verify"].pop(PORTABLE)
    add_spec_verify(model, graphs.verify_mode, state.info.vocab_size)
    graphs.models["target_verify"][PLUGIN] = model
