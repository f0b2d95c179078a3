"""Pass `optimize_onnx`: constant folding, dead-code removal and shape inference with onnxscript's optimizer.

torch's exporter already optimises what it traced; this pass mainly cleans up what later passes added (the
decomposed verification). It rewrites only the graph: external weights are referenced, never read or copied.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
import onnxscript.optimizer

from dspark_compile.ir import OnnxGraphs

log = logging.getLogger(__name__)


def optimize_onnx(graphs: OnnxGraphs) -> OnnxGraphs:
    for path in graphs.all_paths():
        proto = onnx.load(str(path), load_external_data=False)
        model = ir.from_proto(proto)
        before = sum(1 for _ in model.graph.all_nodes())
        # Folding is limited to small tensors and initializer deduplication is left to share_weights (it hashes
        # streamed bytes), so no weight is materialised here.
        onnxscript.optimizer.fold_constants_ir(model, input_size_limit=1024, output_size_limit=1024)
        onnxscript.optimizer.remove_unused_nodes(model)
        ir.passes.common.CommonSubexpressionEliminationPass()(model)
        ir.passes.common.RemoveUnusedOpsetsPass()(model)
        after = sum(1 for _ in model.graph.all_nodes())
        proto = ir.to_proto(model)
        _strip_trace_metadata(proto)
        onnx.save(proto, str(path))
        log.info("optimize_onnx %s: %d -> %d nodes", path.name, before, after)
    return graphs


def _strip_trace_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces: they hold local paths, so builds would not be reproducible."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        del value.metadata_props[:]
    model.graph.doc_string = ""
