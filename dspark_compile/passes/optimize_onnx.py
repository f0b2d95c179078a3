"""Pass `optimize_onnx`: constant folding, dead-code removal and CSE with onnxscript's optimizer, in memory.

torch's exporter already optimises what it traced; this pass mainly cleans up what later passes added (the
decomposed verification). It also drops the exporter's per-node stack traces: they hold local paths, so
builds would not be reproducible.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnxscript.optimizer

from dspark_compile.build_state import BuildState

log = logging.getLogger(__name__)


def optimize(model: ir.Model) -> None:
    """Optimise ``model`` in place."""
    # Folding is limited to small tensors, so no weight is copied; initializer deduplication is left to
    # share_weights (it hashes each tensor once, as it writes it).
    onnxscript.optimizer.fold_constants_ir(model, input_size_limit=1024, output_size_limit=1024)
    onnxscript.optimizer.remove_unused_nodes(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    ir.passes.common.RemoveUnusedOpsetsPass()(model)
    ir.passes.common.ClearMetadataAndDocStringPass()(model)
    # The pass leaves the values' metadata (the exporter records where each one was traced): clear it too.
    nodes = ir.traversal.RecursiveGraphIterator(model.graph)
    graph = model.graph
    for value in (*graph.inputs, *graph.initializers.values(), *(out for node in nodes for out in node.outputs)):
        value.metadata_props.clear()


def run(state: BuildState) -> None:
    assert state.onnx is not None
    for name, variant, model in state.onnx.items():
        before = len(model.graph)
        optimize(model)
        log.info("optimize_onnx %s (%s): %d -> %d nodes", name, variant, before, len(model.graph))
