"""Pass `check_onnx`: the full ONNX checker (with shape inference) on every portable graph, in memory. The
plugin variant's custom node cannot be typed: structural check, plus its SpecVerify node against the schema.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from dspark_compile.artifacts import PLUGIN
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.plugins.spec_verify.op_schema import SPEC_VERIFY


def run(state: BuildState) -> None:
    assert state.onnx is not None
    for name, variant, model in state.onnx.items():
        path = state.onnx.path(name, variant)
        try:
            if variant == PLUGIN:
                ir.passes.common.CheckerPass()(model)
                nodes = [ir.serde.serialize_node(n) for n in model.graph
                         if (n.domain, n.op_type) == (SPEC_VERIFY.domain, SPEC_VERIFY.name)]
                if len(nodes) != 1:
                    raise BuildError(f"{path}: expected one {SPEC_VERIFY.plugin_id} node, found {len(nodes)}")
                SPEC_VERIFY.check_node(nodes[0])
            else:
                ir.passes.common.CheckerPass(full_check=True)(model)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
            raise BuildError(f"{path}: ONNX checker failed: {' '.join(str(e).split())[:400]}") from e
