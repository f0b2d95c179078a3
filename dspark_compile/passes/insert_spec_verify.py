"""Pass `insert_spec_verify`: end target_verify in one `dspark::SpecVerify` node (the plugin variant).

The exported verify graph returns raw logits; this pass adds the verification inputs the plugin declares
(`verify_len`, and for sampling `draft_probs`, `temperature`, `uniforms`), feeds the logits to the node and
replaces the logits output by `accepted` and `next_token`. Input names and order come from the plugin's
own schema object, so graph and plugin cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import helper

from dspark_compile.ir import PLUGIN, OnnxGraphs
from dspark_compile.plugins.spec_verify.schema import SPEC_VERIFY, make_node

# Symbolic dims of the exported graph, so the new inputs share them.
DIMS = {"B": "batch", "G": "draft_len", "G+1": "verify_tokens", "V": None}


def add_spec_verify(model: onnx.ModelProto, mode: str, vocab: int, block: int) -> onnx.ModelProto:
    g = model.graph
    logits = next(o for o in g.output if o.name == "logits")
    specs = SPEC_VERIFY.inputs_for(mode)
    names = ["logits"]
    for spec in specs[1:]:
        if spec.name == "draft_tokens":  # the drafts are tokens[:, 1:] of the existing input
            names.append(_draft_tokens(g))
            continue
        dims = [vocab if d == "V" else DIMS[d] for d in spec.shape]
        g.input.append(helper.make_tensor_value_info(spec.name, spec.dtypes[0], dims))
        names.append(spec.name)
    g.node.append(make_node(mode, names, [o.name for o in SPEC_VERIFY.outputs], name="spec_verify"))
    keep = [o for o in g.output if o.name != "logits"]
    del g.output[:]
    for o in SPEC_VERIFY.outputs:
        g.output.append(helper.make_tensor_value_info(o.name, o.dtypes[0], [DIMS[d] for d in o.shape]))
    g.output.extend(keep)
    del logits
    model.opset_import.append(SPEC_VERIFY.opset_import())
    return model


def _draft_tokens(g: onnx.GraphProto) -> str:
    starts = helper.make_tensor("sv_start", onnx.TensorProto.INT64, [1], [1])
    ends = helper.make_tensor("sv_end", onnx.TensorProto.INT64, [1], [2**62])
    axes = helper.make_tensor("sv_axis", onnx.TensorProto.INT64, [1], [1])
    g.initializer.extend([starts, ends, axes])
    g.node.append(helper.make_node("Slice", ["tokens", "sv_start", "sv_end", "sv_axis"], ["draft_tokens"],
                                   name="draft_tokens_slice"))
    return "draft_tokens"


def insert_spec_verify(graphs: OnnxGraphs, vocab: int) -> OnnxGraphs:
    raw = graphs.path("target_verify")
    model = onnx.load(str(raw), load_external_data=False)
    model = add_spec_verify(model, graphs.verify_mode, vocab, graphs.block_size)
    onnx.save(model, str(graphs.path("target_verify", PLUGIN)))
    raw.unlink()
    return dataclasses.replace(graphs, variants={**graphs.variants, "target_verify": (PLUGIN,)})
