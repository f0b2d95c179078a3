"""Pass `export_onnx`: trace each partitioned graph with torch.export and write ONNX (opset >= 18).

Dynamic axes: batch, prompt/verify/context length and cache slots. Weights go to external data beside each
graph (`share_weights` later merges them into one file, so shared tensors are stored once). The
`dspark::spec_verify` op is written as one `dspark::SpecVerify` node through the exporter's translation table.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from dspark_compile.errors import BuildError
from dspark_compile.ir import OnnxGraphs
from dspark_compile.passes.partition import GraphSpec, PartitionedProgram
from dspark_compile.plugins.spec_verify.op import onnx_translation
from dspark_compile.spec import BuildSpec

log = logging.getLogger(__name__)


def _export_one(gs: GraphSpec, path: Path, opset: int) -> None:
    # The exporter logs one warning per missing optional op library (torchvision); not our users' concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                gs.module, tuple(gs.inputs.values()), input_names=list(gs.inputs), output_names=list(gs.outputs),
                dynamic_axes=gs.dynamic, dynamo=True, opset_version=opset, verbose=False,
                custom_translation_table=onnx_translation(),
            )
        except Exception as e:  # the exporter's own errors are long; keep the first line, log the rest
            log.debug("export of %s failed", gs.name, exc_info=True)
            raise BuildError(f"ONNX export of graph {gs.name} failed: {str(e).splitlines()[0]}") from e
        onnx_program.save(str(path), external_data=True)


def export_onnx(parts: PartitionedProgram, spec: BuildSpec, out_dir: Path) -> OnnxGraphs:
    out_dir.mkdir(parents=True, exist_ok=True)
    for gs in parts.graphs:
        _export_one(gs, out_dir / f"{gs.name}.onnx", spec.opset)
    draft = parts.program.draft
    assert draft is not None
    # Until decompose_spec_verify runs, target_verify.onnx holds the dspark::SpecVerify node.
    return OnnxGraphs(out_dir, spec.verify_mode, draft.block_size)
