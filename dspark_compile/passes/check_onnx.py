"""Pass `check_onnx`: the full ONNX checker (with shape inference) on every portable graph.

The plugin variant holds a custom-domain node the checker cannot type; it gets the structural check only,
plus a check of its SpecVerify node against the plugin's schema.
"""

from __future__ import annotations

import onnx

from dspark_compile.errors import BuildError
from dspark_compile.ir import PLUGIN, OnnxGraphs
from dspark_compile.plugins.spec_verify.schema import SPEC_VERIFY


def check_onnx(graphs: OnnxGraphs) -> OnnxGraphs:
    for name, variants in [(n, graphs.variants.get(n, ("portable",))) for n in
                           ("target_prefill", "target_verify", "draft_propose")]:
        for variant in variants:
            path = graphs.path(name, variant)
            try:
                if variant == PLUGIN:
                    onnx.checker.check_model(str(path))
                    model = onnx.load(str(path), load_external_data=False)
                    nodes = [n for n in model.graph.node if SPEC_VERIFY.is_node(n)]
                    if len(nodes) != 1:
                        raise BuildError(f"{path}: expected one {SPEC_VERIFY.plugin_id} node, found {len(nodes)}")
                    SPEC_VERIFY.check_node(nodes[0])
                else:
                    onnx.checker.check_model(str(path), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
                raise BuildError(f"{path}: ONNX checker failed: {' '.join(str(e).split())[:400]}") from e
    return graphs
