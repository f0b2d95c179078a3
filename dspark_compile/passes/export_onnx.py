"""Pass `export_onnx`: trace each partitioned graph with torch.export into an in-memory ONNX model (opset >= 18).

Dynamic axes: batch, prompt/verify/context length and cache slots. The weights stay the modules' own tensors
(no copy); `share_weights` writes them to disk once, for all graphs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx_ir as ir
import torch

from dspark_compile.artifacts import PORTABLE, OnnxGraphs
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.passes.partition import GraphSpec

log = logging.getLogger(__name__)


def export_graph(gs: GraphSpec, opset: int) -> ir.Model:
    # The exporter logs one warning per missing optional op library (torchvision); not our users' concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                gs.module, tuple(gs.inputs.values()), input_names=list(gs.inputs), output_names=list(gs.outputs),
                dynamic_axes=gs.dynamic, dynamo=True, opset_version=opset, verbose=False,
            )
        except Exception as e:  # the exporter's own errors are long; keep the first line, log the rest
            log.debug("export of %s failed", gs.name, exc_info=True)
            raise BuildError(f"ONNX export of graph {gs.name} failed: {str(e).splitlines()[0]}") from e
    return onnx_program.model


def run(state: BuildState) -> None:
    assert state.parts is not None and state.info is not None
    models = {gs.name: {PORTABLE: export_graph(gs, state.spec.opset)} for gs in state.parts.graphs}
    # Until insert_spec_verify runs, target_verify ends in raw logits.
    state.onnx = OnnxGraphs(state.workdir / "onnx", state.spec.verify_mode, state.info.block_size, models)
