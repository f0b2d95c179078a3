"""Write ``OUT/triton/``: a Triton model repository for a build directory.

    triton/
      dspark_target/{config.pbtxt, 1/model.plan | 1/model.onnx (+ external data)}   graph target_step
      dspark_draft/...                    graph draft_propose (absent for a target-only build)
      dspark/{config.pbtxt, 1/model.py, 1/weights.bin}   decoupled python-backend orchestrator

A target_step built as segment engines (``engines/target_step.seg{k}.plan``, issue 14: too large for one
engine on the build host) is served as models ``dspark_target_seg{k}`` (one engine each) and ``dspark_target``
an ensemble of them with the whole graph's I/O, so the orchestrator calls it as it calls one engine.

The orchestrator holds the graphs' weight inputs (embedding, LM head) once and hands them to both graph models
by DLPack; in the bls mode it reads them from ``dspark/1/weights.bin``, a hard link to the build's weights. The
in-process modes load the build directory, named relative to the repository, so ``OUT`` must move as a whole.
The repository is assembled beside its destination and renamed into place once every config.pbtxt validates.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_compile.artifacts import GraphIO, TritonRepository, replace_dir, segment_file
from dspark_compile.errors import BuildError, UsageError
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.onnxruntime_dtypes import check_onnxruntime_dtype
from dspark_compile.targets.triton import pbtxt

log = logging.getLogger(__name__)

# Graph file stem in BUILD/onnx (and BUILD/engines) -> Triton model name.
GRAPH_MODELS = {"target_step": "dspark_target", "draft_propose": "dspark_draft"}
REQUIRED_GRAPHS = ("target_step",)
ORCHESTRATOR = "dspark"
BACKEND_MODES = ("bls", "onnxruntime_inprocess", "factory")
PLATFORM_CHOICES = ("auto", *pbtxt.PLATFORMS)


@dataclass(frozen=True)
class TritonOptions:
    """How to lay out the repository. ``platform`` ``auto``: TensorRT engines when BUILD/engines holds one per
    graph, else ONNX. ``python_path``: what the orchestrator's interpreter needs for numpy and dspark_compile
    (``None``: this interpreter's site-packages; set it for a server container with another environment)."""

    backend_mode: str = "bls"
    platform: str = "auto"
    instance_kind: str = "KIND_GPU"
    graph_instances: int = 1
    python_path: tuple[str, ...] | None = None
    max_batch: int = 16
    default_max_new_tokens: int = 64
    max_context: int | None = None
    backend_factory: str | None = None
    model_info: ProgramInfo | None = None  # default: the build's (the pipeline's, or BUILD/manifest.json)
    verify: str = "auto"  # fixed | fixed=K | threshold=X | schedule | auto (see runtime.decode.VerifyPolicy.for_build)
    speculative: bool = True  # False: the same graphs decode target-only (baselines from one build)
    batching: str = "continuous"  # or static: a batch runs to its end before queued requests start
    draft_rows: int | str | None = None  # plain rounds over more live rows (VerifyPolicy.draft_rows; "auto": the
    # build's measured draft_rows.json)

    def __post_init__(self) -> None:
        if self.backend_mode not in BACKEND_MODES:
            raise UsageError(f"Triton backend_mode {self.backend_mode!r}: expected one of "
                             f"{', '.join(BACKEND_MODES)}")
        if self.platform not in PLATFORM_CHOICES:
            raise UsageError(f"Triton platform {self.platform!r}: expected one of "
                             f"{', '.join(PLATFORM_CHOICES)}")
        if self.batching not in ("static", "continuous"):
            raise UsageError(f"Triton batching {self.batching!r}: expected static or continuous")
        if (self.backend_mode == "factory") != (self.backend_factory is not None):
            raise UsageError("Triton backend_factory ('module:callable') is needed by, and only by, "
                             "backend_mode factory")
        from dspark_compile.runtime.decode import parse_draft_rows

        parse_draft_rows(self.draft_rows)  # a bad value is one error line, before anything is written
        for name in ("graph_instances", "max_batch", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"Triton option {name} must be >= 1, found {getattr(self, name)}")
        for entry in self.python_path or ():
            if any(c in entry for c in '":\\'):
                raise UsageError(f"python_path entry {entry!r} must not contain '\"', ':' or '\\'")


def write_triton_repository(build_dir: Path, out_dir: Path, options: TritonOptions | None = None, *,
                            graphs: Mapping[str, Path] | None = None, io: Mapping[str, GraphIO] | None = None,
                            weight_inputs: Mapping[str, Mapping[str, Any]] | None = None) -> TritonRepository:
    """Write ``out_dir/triton`` for the graphs in ``build_dir`` (replacing an older one) and validate it. The
    pipeline passes its ``graphs``, their ``io`` and ``weight_inputs``; else BUILD/onnx and the manifest tell."""
    options = options or TritonOptions()
    build_dir = Path(build_dir)
    graphs = dict(graphs) if graphs is not None else _find_graphs(build_dir)
    platform = _choose_platform(build_dir, graphs, options.platform)
    io = dict(io) if io is not None else {g: _read_io(path) for g, path in graphs.items()}
    info = options.model_info or _manifest_info(build_dir, required=options.backend_mode == "bls")
    if weight_inputs is None:
        weight_inputs = _json_field(build_dir / "manifest.json", "weight_inputs") or {}
    if info is not None and (platform == "onnxruntime_onnx" or options.backend_mode == "onnxruntime_inprocess"):
        check_onnxruntime_dtype(info.dtype, "the Triton repository's onnxruntime models")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "triton"
    staging = Path(tempfile.mkdtemp(prefix=".triton-", dir=out_dir))
    try:
        for graph, onnx_path in graphs.items():
            _write_graph_model(staging / GRAPH_MODELS[graph], graph, onnx_path, build_dir, io[graph], platform,
                               options)
        _write_orchestrator(staging / ORCHESTRATOR, build_dir, final, graphs, io, info, options, weight_inputs)
        models = tuple(d.name for d in sorted(staging.iterdir()) if pbtxt.validate_config(d / "config.pbtxt"))
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote Triton repository %s (%s graphs, orchestrator mode %s)", final, platform,
             options.backend_mode)
    return TritonRepository(final, models)


def _read_io(path: Path) -> GraphIO:
    try:
        return GraphIO.read(path)
    except Exception as exc:
        raise BuildError(f"{path}: cannot read the ONNX graph ({exc}); rebuild it with `dspark-compile build`") from exc


def _json_field(path: Path, name: str) -> Any:
    """A field of a build's JSON file (None when it cannot be read)."""
    try:
        return json.loads(path.read_text()).get(name)
    except (OSError, ValueError):
        return None


def _manifest_info(build_dir: Path, *, required: bool) -> ProgramInfo | None:
    """The ProgramInfo that `dspark-compile build` recorded in BUILD/manifest.json."""
    path = build_dir / "manifest.json"
    try:
        return ProgramInfo.from_json(json.loads(path.read_text())["program"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not required:
            return None
        raise UsageError(f"{path}: cannot read the build's program description ({type(exc).__name__}: {exc}); "
                         "the bls mode needs it: pass a directory written by `dspark-compile build` (or "
                         "TritonOptions.model_info)") from exc


def _find_graphs(build_dir: Path) -> dict[str, Path]:
    onnx_dir = build_dir / "onnx"
    graphs = {g: onnx_dir / f"{g}.onnx" for g in GRAPH_MODELS if (onnx_dir / f"{g}.onnx").is_file()}
    missing = [g for g in REQUIRED_GRAPHS if g not in graphs]
    if missing:
        raise UsageError(f"{onnx_dir}: {', '.join(f'{g}.onnx' for g in missing)} not found; expected a build "
                         "directory written by `dspark-compile build`")
    return graphs


def segment_plans(build_dir: Path, graph: str) -> list[Path]:
    """The segment engines of ``graph`` in chain order (``engines/{graph}.seg{k}.plan``, k = 0..n-1); empty
    when the graph has one engine (``{graph}.plan``) or none. Read from the files, not the manifest: the
    pipeline writes the repository before the manifest."""
    engines = build_dir / "engines"
    if (engines / f"{graph}.plan").is_file():
        return []
    plans = []
    while (engines / segment_file(graph, len(plans), "plan")).is_file():
        plans.append(engines / segment_file(graph, len(plans), "plan"))
    return plans


def _choose_platform(build_dir: Path, graphs: dict[str, Path], wanted: str) -> str:
    """``tensorrt_plan`` needs every graph's engine: one plan, or a full chain of segment plans."""
    missing = [str(build_dir / "engines" / f"{g}.plan") for g in graphs
               if not (build_dir / "engines" / f"{g}.plan").is_file() and not segment_plans(build_dir, g)]
    if wanted == "auto":
        return "onnxruntime_onnx" if missing else "tensorrt_plan"
    if wanted == "tensorrt_plan" and missing:
        raise UsageError(f"--triton-platform tensorrt_plan: engine(s) {', '.join(missing)} not found; build them "
                         "with --target tensorrt or use --triton-platform onnxruntime_onnx")
    return wanted


def _write_graph_model(model_dir: Path, graph: str, onnx_path: Path, build_dir: Path, io: GraphIO, platform: str,
                       options: TritonOptions) -> None:
    segments = segment_plans(build_dir, graph) if platform == "tensorrt_plan" else []
    if segments:
        _write_segmented_model(model_dir, graph, build_dir, io, segments, options)
        return
    version = model_dir / "1"
    version.mkdir(parents=True)
    if platform == "tensorrt_plan":
        _link_or_copy(build_dir / "engines" / f"{graph}.plan", version / "model.plan")
    else:
        _link_or_copy(onnx_path, version / "model.onnx")
        # External-data locations are relative to the .onnx file and survive its rename to model.onnx.
        for location in external_data_files(onnx_path):
            target = version / location
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(onnx_path.parent / location, target)
    kind = "KIND_GPU" if platform == "tensorrt_plan" else options.instance_kind
    config = pbtxt.graph_model_config(model_dir.name, io, platform=platform, instance_kind=kind,
                                      instances=options.graph_instances)
    (model_dir / "config.pbtxt").write_text(pbtxt.render(config))


def _write_segmented_model(model_dir: Path, graph: str, build_dir: Path, io: GraphIO, plans: list[Path],
                           options: TritonOptions) -> None:
    """``{model}_seg{k}``: one TensorRT model per segment engine, I/O from its ONNX segment graph; ``model``:
    the ensemble that chains them with the whole graph's I/O ``io`` (pbtxt.ensemble_config)."""
    steps = []
    for k, plan in enumerate(plans):
        onnx_path = build_dir / "onnx" / segment_file(graph, k, "onnx")
        if not onnx_path.is_file():
            raise BuildError(f"{onnx_path}: missing beside the segment engine {plan}; the segment models take "
                             "their I/O from it: rebuild with `dspark-compile build`")
        seg_dir = model_dir.parent / f"{model_dir.name}_seg{k}"
        (seg_dir / "1").mkdir(parents=True)
        _link_or_copy(plan, seg_dir / "1" / "model.plan")
        seg_io = _read_io(onnx_path)
        config = pbtxt.graph_model_config(seg_dir.name, seg_io, platform="tensorrt_plan", instance_kind="KIND_GPU",
                                          instances=options.graph_instances)
        (seg_dir / "config.pbtxt").write_text(pbtxt.render(config))
        steps.append((seg_dir.name, seg_io))
    if (build_dir / "onnx" / segment_file(graph, len(plans), "onnx")).is_file():
        raise BuildError(f"{build_dir / 'onnx'}: {graph} has more ONNX segments than the {len(plans)} engines in "
                         f"{build_dir / 'engines'}; rebuild the engines")
    (model_dir / "1").mkdir(parents=True)  # Triton wants a version directory, empty for an ensemble
    (model_dir / "config.pbtxt").write_text(pbtxt.render(pbtxt.ensemble_config(model_dir.name, io, steps)))
    log.info("%s: an ensemble of %d segment engines (one engine launch per segment per call)", model_dir.name,
             len(plans))


def _write_orchestrator(model_dir: Path, build_dir: Path, repository: Path, graphs: Mapping[str, Path],
                        io: Mapping[str, GraphIO], info: ProgramInfo | None, options: TritonOptions,
                        weight_inputs: Mapping[str, Mapping[str, Any]]) -> None:
    (model_dir / "1").mkdir(parents=True)
    shutil.copyfile(Path(__file__).with_name("orchestrator_model.py"), model_dir / "1" / "model.py")
    tokenizer = Path(str(_json_field(build_dir / "build_spec.json", "target") or "")) / "tokenizer.json"
    if tokenizer.is_file():  # text in and out (dspark_compile.serving.llm_io), read by the orchestrator
        shutil.copyfile(tokenizer, model_dir / "tokenizer.json")
    python_path = default_python_path() if options.python_path is None else options.python_path
    parameters: dict[str, Any] = {
        "backend_mode": options.backend_mode,
        "python_path": ":".join(python_path),
        "max_batch": options.max_batch,
        "default_max_new_tokens": options.default_max_new_tokens,
        "verify": options.verify,
        "speculative": str(options.speculative).lower(),
        "batching": options.batching,
    }
    if options.draft_rows is not None:
        parameters["draft_rows"] = options.draft_rows
    max_context = options.max_context or (info.max_slots if info is not None else None)
    if max_context is not None:
        parameters["max_context"] = int(max_context)
    if options.backend_mode == "bls":
        assert info is not None
        weights = {}
        for name, record in weight_inputs.items():  # one hard link per file (all of them: weights.bin)
            linked = f"{ORCHESTRATOR}/1/{Path(record['file']).name}"
            if not (model_dir.parent / linked).exists():
                _link_or_copy(build_dir / record["file"], model_dir.parent / linked)
            weights[name] = {**record, "file": linked}
        parameters["model_info"] = {
            "info": info.to_json(), "weight_inputs": weights,
            "models": {g: GRAPH_MODELS[g] for g in graphs},
            "signatures": {g: {"inputs": [t.to_json() for t in pbtxt.triton_tensors(s.inputs, g)],
                               "outputs": [t.to_json() for t in pbtxt.triton_tensors(s.outputs, g)]}
                           for g, s in io.items()},
        }
    else:
        parameters["build_dir"] = os.path.relpath(build_dir.resolve(), repository.resolve())
    if options.backend_factory is not None:
        parameters["backend_factory"] = options.backend_factory
    config = pbtxt.orchestrator_config(ORCHESTRATOR, parameters)
    (model_dir / "config.pbtxt").write_text(pbtxt.render(config))


def default_python_path() -> tuple[str, ...]:
    """This interpreter's site-packages plus the directory holding dspark_compile (if not installed there)."""
    paths = sysconfig.get_paths()
    package_root = str(Path(__file__).resolve().parents[3])
    return tuple(dict.fromkeys((paths["purelib"], paths["platlib"], package_root)))


def external_data_files(onnx_path: Path) -> list[str]:
    """Relative locations of the external-data files an ONNX model references (weights not loaded)."""
    import onnx_ir as ir

    model = ir.load(onnx_path)
    graphs: dict[ir.Graph, None] = {model.graph: None}
    tensors: list[Any] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):  # subgraphs too
        if isinstance(node.graph, ir.Graph):
            graphs.setdefault(node.graph, None)
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                tensors.append(attr.value)
            elif attr.type == ir.AttributeType.TENSORS:
                tensors.extend(attr.value)
    tensors += [v.const_value for graph in graphs for v in graph.initializers.values()]
    found = dict.fromkeys(t.location for t in tensors if isinstance(t, ir.ExternalTensor))
    for location in found:
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise BuildError(f"{onnx_path}: external data location {location!r} leaves the model directory; "
                             "re-export with relative locations")
        if not (onnx_path.parent / location).is_file():
            raise BuildError(f"{onnx_path}: external data file {location!r} is missing")
    return list(found)


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Hard-link (weights can be GBs) and fall back to a copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
