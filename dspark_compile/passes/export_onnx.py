"""Pass `export_onnx`: trace each partitioned graph with torch.export into an in-memory ONNX model (opset >= 18).

Dynamic axes: batch, prompt/verify/context length and cache slots. The weights stay the modules' own tensors
(no copy); `share_weights` writes them to disk once, for all graphs. The `dspark::spec_verify` op becomes one
`dspark::SpecVerify` node through the exporter's translation table. The exporter's own optimiser is off:
`optimize_onnx` folds and cleans every graph once, after the verification is in (the exporter's pass cost a
third of the export and would fold transposed copies of the weights).

Tracing costs time per operator, not per weight byte, so a large program is traced in worker processes, one
graph each, over modules on the ``meta`` device (no weights loaded there); the parent attaches its real
tensors to the returned graphs by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from dspark_compile.artifacts import PORTABLE, OnnxGraphs
from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.models.layers import Fp8Linear, fp8_onnx_translation
from dspark_compile.passes.layer_template import export_by_layer, name_by_layer
from dspark_compile.passes.layer_template import onnx_translation as layer_translation
from dspark_compile.passes.partition import ExportJob, PartitionedProgram, partition
from dspark_compile.plugins.spec_verify.op import onnx_translation

log = logging.getLogger(__name__)
PARALLEL_BYTES = 256 << 20  # programs with more weight bytes than this are traced in worker processes
_ON_META = "__weights_attached_by_the_parent__"  # external-data location of a weight a worker did not have


def export_graph(gs: ExportJob, opset: int) -> ir.Model:
    """``gs`` as an ONNX model: a Qwen3 target's layers traced once (layer_template), anything else whole, its
    layers' nodes then named as the copies are (``target.layers.{i}.…``: where segment_target cuts)."""
    model = export_by_layer(gs, lambda job: _trace(job, opset))
    if model is None:
        model = _trace(gs, opset)
        name_by_layer(model, gs.module)
    return model


def _trace(gs: ExportJob, opset: int) -> ir.Model:
    # The exporter logs one warning per missing optional op library (torchvision); not our users' concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                gs.module, _distinct(tuple(gs.inputs.values())), input_names=list(gs.inputs),
                output_names=list(gs.outputs),
                # Every input, in order (the exporter pairs these with the inputs by position): {} = static.
                dynamic_axes={name: gs.dynamic.get(name, {}) for name in gs.inputs}, dynamo=True,
                opset_version=opset, verbose=False, optimize=False,
                custom_translation_table=onnx_translation() | fp8_onnx_translation() | layer_translation(),
            )
        except Exception as e:  # the exporter's own errors are long; keep the first line, log the rest
            log.debug("export of %s failed", gs.name, exc_info=True)
            raise BuildError(f"ONNX export of graph {gs.name} failed: {str(e).splitlines()[0]}") from e
    return onnx_program.model


def _distinct(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs with no two the same tensor: torch.export would fold aliased inputs into one (a tied
    LM head is the embedding: both weight inputs must stay inputs of their own)."""
    seen: set[int] = set()
    out = []
    for arg in args:
        if id(arg) in seen:
            arg = arg.clone()
        seen.add(id(arg))
        out.append(arg)
    return tuple(out)


def export_graphs(parts: PartitionedProgram, spec: BuildSpec, scratch: Path, *,
                  workers: int = 1) -> dict[str, ir.Model]:
    """Every graph of ``parts``, traced here (``workers=1``) or by ``workers`` child interpreters over meta
    modules, which write their graphs (without weights) into ``scratch``."""
    if workers <= 1:
        return {gs.name: export_graph(gs, spec.opset) for gs in parts.graphs}
    # Fresh interpreters (`python -m`), not multiprocessing: a fork would copy the weights and the OpenMP pool,
    # and multiprocessing's spawn re-imports the caller's __main__.
    scratch.mkdir(parents=True, exist_ok=True)
    spec_file = scratch / "spec.json"
    spec_file.write_text(json.dumps(spec.to_json()))
    pending, running, models = list(parts.graphs), [], {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                gs = pending.pop(0)
                cmd = [sys.executable, "-m", __name__, str(spec_file), gs.name, str(scratch / f"{gs.name}.onnx")]
                with (scratch / f"{gs.name}.log").open("w") as log_file:
                    running.append((gs, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file)))
            gs, proc = running[0]
            if proc.wait() != 0:
                err = (scratch / f"{gs.name}.log").read_text().strip()
                last = err.splitlines()[-1] if err else f"exit code {proc.returncode}"
                raise BuildError(last.removeprefix("error: ") if last.startswith("error: ") else
                                 f"ONNX export of graph {gs.name} failed in its worker process: {last}")
            running.pop(0)
            models[gs.name] = _attach(ir.load(scratch / f"{gs.name}.onnx"), gs.module)
    finally:  # an error or an interrupt ends the other workers too
        for _, proc in running:
            proc.kill()
            proc.wait()
    shutil.rmtree(scratch)
    return {gs.name: models[gs.name] for gs in parts.graphs}


def _export_on_meta(spec: BuildSpec, name: str, out: Path) -> None:
    """Worker: trace graph ``name`` of ``spec``'s program built on the meta device and write it to ``out``, each
    weight a placeholder that :func:`_attach` replaces."""
    from dspark_compile.families import family_of
    from dspark_compile.program import DecodeProgram, load_pair, torch_dtype

    torch.set_num_threads(1)
    pair = load_pair(spec.target, spec.draft, allow_nonfinite=True)  # configs and headers only
    assert pair.draft is not None
    tc, dc, dtype = pair.target.config, pair.draft.config, torch_dtype(spec.dtype)
    with torch.device("meta"):  # the same modules as make_program builds, without their weights
        family = family_of(tc)
        target = family.target(tc, dc.target_layer_ids).to(dtype)
        draft = family.draft(dc, target.embed_tokens, target.lm_head).to(dtype)
        target.init_buffers()  # the RoPE tables on meta too, like every input: _attach gives them their values
        draft.init_buffers()
    gs = partition(DecodeProgram(pair, target.eval(), draft.eval(), spec.dtype), spec).graph(name)
    gs = dataclasses.replace(gs, inputs={k: v.to("meta") for k, v in gs.inputs.items()})
    model = export_graph(gs, spec.opset)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not isinstance(tensor.raw, torch.Tensor) or not tensor.raw.is_meta:
            continue
        value.const_value = ir.ExternalTensor(_ON_META, 0, tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape,
                                              name=value.name)
    ir.save(model, out)


def _attach(model: ir.Model, module: torch.nn.Module) -> ir.Model:
    """Give ``model`` the real tensors of ``module`` where a worker left placeholders."""
    state = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.location == _ON_META:
            if value.name not in state:
                raise BuildError(f"ONNX export: weight {value.name} of the traced graph is not a module tensor")
            value.const_value = TorchTensor(state[value.name].detach(), name=value.name)
    return model


def run(state: BuildState) -> None:
    assert state.parts is not None and state.info is not None
    directory = state.workdir / "onnx"
    directory.mkdir(parents=True, exist_ok=True)  # where the graphs will go: a build past this point is exporting
    program = state.parts.program
    weight_bytes = sum(p.numel() * p.element_size() for p in program.target.parameters())
    workers = min(len(state.parts.graphs), os.cpu_count() or 1) if weight_bytes > PARALLEL_BYTES else 1
    if any(isinstance(m, Fp8Linear) for m in program.target.modules()):
        workers = 1  # the workers rebuild the modules from the configs, which do not say which layers are FP8
    models = export_graphs(state.parts, state.spec, state.workdir / "export-workers", workers=workers)
    # Until decompose_spec_verify runs, target_step holds the dspark::SpecVerify node.
    state.onnx = OnnxGraphs(directory, state.spec.verify_mode, state.info.block_size,
                            {name: {PORTABLE: model} for name, model in models.items()})


if __name__ == "__main__":  # the worker of export_graphs: SPEC_JSON GRAPH_NAME OUT_ONNX
    from dspark_compile.build_spec import make_spec
    from dspark_compile.errors import DsparkError

    try:
        _export_on_meta(make_spec(**json.loads(Path(sys.argv[1]).read_text())), sys.argv[2], Path(sys.argv[3]))
    except DsparkError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
