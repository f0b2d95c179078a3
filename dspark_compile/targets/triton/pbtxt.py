"""``config.pbtxt`` of the Triton models, built as Triton's ``ModelConfig`` protobuf (well-formed by
construction); :func:`validate_config` parses the written text back and checks what the server would only
report at load time, so a broken repository fails the build, not the deployment. A graph split into segment
engines (issue 14) is served as an ensemble of its segments (:func:`ensemble_config`), whose wiring
:func:`validate_config` checks against the other models of the repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_compile.artifacts import GraphIO, TensorIO
from dspark_compile.errors import BackendUnavailableError, BuildError
from dspark_compile.serving.llm_io import LLM_INPUTS, LLM_OUTPUTS

try:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
except ImportError as exc:  # the [triton] extra is optional for the rest of the compiler
    raise BackendUnavailableError(f"the Triton target needs `tritonclient[grpc]` (for Triton's ModelConfig protobuf): "
                                  f"{exc}; install it with `pip install 'dspark-compile[triton]'`") from exc

PLATFORMS = ("tensorrt_plan", "onnxruntime_onnx")
ENSEMBLE = "ensemble"  # a chain of segment models presented as one graph model (no file of its own)
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")
MODEL_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx", "python": "model.py"}

# ONNX dtype names (GraphIO) -> Triton data types (the subset our graphs can carry).
ONNX_TO_TRITON = {"float": "TYPE_FP32", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
                  "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL", "float16": "TYPE_FP16",
                  "double": "TYPE_FP64", "bfloat16": "TYPE_BF16"}


@dataclass(frozen=True)
class TritonTensor:
    """One input or output as Triton declares it: data type name and full dims (-1 = dynamic; no implicit
    batch dim)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}


def triton_tensors(values: Iterable[TensorIO], where: Path | str) -> tuple[TritonTensor, ...]:
    """A graph's inputs or outputs (:class:`GraphIO`) in Triton's terms; ``where`` names the graph in errors."""
    out = []
    for value in values:
        if value.dtype not in ONNX_TO_TRITON:
            raise BuildError(f"{where}: tensor `{value.name}` has ONNX element type {value.dtype}, which Triton "
                             f"cannot carry; expected one of {', '.join(ONNX_TO_TRITON)}")
        if value.shape is None:
            raise BuildError(f"{where}: tensor `{value.name}` has no shape; re-export with static ranks")
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in value.shape)
        out.append(TritonTensor(value.name, ONNX_TO_TRITON[value.dtype], dims))
    return tuple(out)


def _model(config: Any, inputs: Iterable[TritonTensor], outputs: Iterable[TritonTensor]) -> Any:
    """``config`` with its input and output tensors declared."""
    for field, specs in ((config.input, inputs), (config.output, outputs)):
        for spec in specs:
            message = field.add(name=spec.name, data_type=mc.DataType.Value(spec.data_type), dims=spec.dims)
            if spec.optional:  # an input-only field
                message.optional = True
    return config


def graph_model_config(name: str, io: GraphIO, *, platform: str, instance_kind: str = "KIND_GPU",
                       instances: int = 1) -> Any:
    """A ModelConfig for one of the two graphs, with ``max_batch_size`` 0: the orchestrator batches requests
    itself and the KV caches carry the batch in their third dim."""
    if platform not in PLATFORMS:
        raise BuildError(f"Triton platform {platform!r} is not supported; expected one of "
                         f"{', '.join(PLATFORMS)}")
    if instance_kind not in INSTANCE_KINDS:
        raise BuildError(f"instance kind {instance_kind!r}: expected one of {', '.join(INSTANCE_KINDS)}")
    if platform == "tensorrt_plan" and instance_kind != "KIND_GPU":
        raise BuildError(f"model {name}: TensorRT engines run only on GPU instances; use KIND_GPU")
    config = _model(mc.ModelConfig(name=name, platform=platform, max_batch_size=0,
                                    default_model_filename=MODEL_FILES[platform]),
                    triton_tensors(io.inputs, name), triton_tensors(io.outputs, name))
    config.instance_group.add(kind=mc.ModelInstanceGroup.Kind.Value(instance_kind), count=instances)
    return config


def ensemble_config(name: str, io: GraphIO, steps: Sequence[tuple[str, GraphIO]]) -> Any:
    """An ensemble that runs ``steps`` (model name, its graph's I/O) in order as one model with the I/O ``io``
    of the whole graph, so its callers (the orchestrator's BLS calls) cannot tell it from one engine.

    Ensemble tensors keep the graphs' names: a step's input is an input of the whole graph or the same-named
    output of an earlier step (the segmentation contract); a step output is mapped when the whole graph
    returns it or a later step reads it. A chain that does not compose to ``io`` is refused here, at build
    time, with the tensors at fault."""
    whole_inputs = {t.name for t in io.inputs}
    whole_outputs = [t.name for t in io.outputs]
    read_later = [set().union(*({t.name for t in s.inputs} for _, s in steps[k + 1:])) for k in range(len(steps))]
    produced: set[str] = set()
    read: set[str] = set()
    config = _model(mc.ModelConfig(name=name, platform=ENSEMBLE, max_batch_size=0),
                    triton_tensors(io.inputs, name), triton_tensors(io.outputs, name))
    for k, (model, step_io) in enumerate(steps):
        unknown = [t.name for t in step_io.inputs if t.name not in whole_inputs and t.name not in produced]
        if unknown:
            raise BuildError(f"{name}: step {k} ({model}) reads {', '.join(unknown)}, which neither the whole graph "
                             "nor an earlier step provides; rebuild the segments")
        read.update(t.name for t in step_io.inputs)
        step = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        for t in step_io.inputs:
            step.input_map[t.name] = t.name
        for t in step_io.outputs:
            if t.name in whole_outputs or t.name in read_later[k]:
                step.output_map[t.name] = t.name
                produced.add(t.name)
    problems = []
    if missing := [n for n in whole_outputs if n not in produced]:
        problems.append(f"no step produces the graph output(s) {', '.join(missing)}")
    if unused := sorted(whole_inputs - read):
        problems.append(f"no step reads the graph input(s) {', '.join(unused)}")
    if problems:
        raise BuildError(f"{name}: {'; '.join(problems)}; rebuild the segments")
    return config


# Token ids, plus the TensorRT-LLM ensemble's text names (dspark_compile.serving.llm_io): one of `prompt_ids`
# and `text_input` is required, which the orchestrator checks.
ORCHESTRATOR_INPUTS = (
    TritonTensor("prompt_ids", "TYPE_INT64", (-1,), optional=True),
    TritonTensor("max_new_tokens", "TYPE_INT32", (1,), optional=True),
    TritonTensor("temperature", "TYPE_FP32", (1,), optional=True),
    TritonTensor("seed", "TYPE_INT64", (1,), optional=True),
    *(TritonTensor(name, dtype, dims, optional=True) for name, dtype, dims in LLM_INPUTS),
)
ORCHESTRATOR_OUTPUTS = (
    TritonTensor("tokens", "TYPE_INT64", (-1,)),
    TritonTensor("accepted", "TYPE_INT32", (1,)),
    *(TritonTensor(name, dtype, dims) for name, dtype, dims in LLM_OUTPUTS),
)


def orchestrator_config(name: str, parameters: Mapping[str, str | int | float | Mapping[str, Any]]) -> Any:
    """The decoupled python-backend model that runs the DSpark loop and streams tokens: one CPU instance, which
    holds every request's state and batches them itself."""
    config = _model(mc.ModelConfig(name=name, backend="python", max_batch_size=0), ORCHESTRATOR_INPUTS,
                    ORCHESTRATOR_OUTPUTS)
    config.model_transaction_policy.decoupled = True
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    for key, value in parameters.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, Mapping) else str(value)
        config.parameters[key].string_value = text
    return config


def render(config: Any) -> str:
    return text_format.MessageToString(config, as_utf8=True)


def parse_config(text: str, path: Path) -> Any:
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise BuildError(f"{path}: not a valid Triton ModelConfig: {exc}") from exc
    return config


def validate_config(path: Path) -> Any:
    """Parse ``path`` with Triton's ModelConfig protobuf and check what the server checks at load time (an
    ensemble: against the configs of its step models, which must already be written beside it)."""
    config = parse_config(path.read_text(), path)
    model_dir = path.parent
    problems = list(_config_problems(config, model_dir.name))
    if config.platform == ENSEMBLE:
        problems += _ensemble_problems(config, model_dir.parent)
    if not problems:
        versions = [d for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit()]
        if not versions:
            problems.append("no version directory (expected 1/)")
        if config.platform != ENSEMBLE:  # an ensemble's version directory is empty
            filename = config.default_model_filename or MODEL_FILES.get(config.platform or config.backend, "")
            problems += [f"{v.name}/{filename} is missing" for v in versions if not (v / filename).exists()]
    if problems:
        raise BuildError(f"{path}: {'; '.join(problems)}; this is a bug in the repository writer, please "
                         "report it")
    return config


def _config_problems(config: Any, dir_name: str) -> Iterable[str]:
    if config.name != dir_name:
        yield f"name {config.name!r} differs from its directory {dir_name!r}"
    if bool(config.platform) == bool(config.backend):
        yield "exactly one of `platform` and `backend` must be set"
    if config.platform and config.platform not in (*PLATFORMS, ENSEMBLE):
        yield f"platform {config.platform!r} is not one of {', '.join((*PLATFORMS, ENSEMBLE))}"
    if config.HasField("ensemble_scheduling") != (config.platform == ENSEMBLE):
        yield "`ensemble_scheduling` belongs to, and only to, platform ensemble"
    if config.platform == ENSEMBLE and config.instance_group:
        yield "an ensemble takes no instance_group (its step models have their own)"
    if config.max_batch_size < 0:
        yield f"max_batch_size {config.max_batch_size} is negative"
    if config.model_transaction_policy.decoupled and config.backend != "python":
        yield "only the python backend model may be decoupled here"
    seen: set[str] = set()
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            yield f"no {kind}s"
        for t in tensors:
            if t.name in seen:
                yield f"tensor name {t.name!r} is used twice"
            seen.add(t.name)
            if t.data_type == mc.TYPE_INVALID:
                yield f"{kind} {t.name!r} has no data_type"
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                yield f"{kind} {t.name!r} has dims {list(t.dims)}; expected a non-empty list of -1 / positive"
    for group in config.instance_group:
        if group.count < 1:
            yield f"instance_group count {group.count} must be >= 1"
        if config.platform == "tensorrt_plan" and group.kind != mc.ModelInstanceGroup.KIND_GPU:
            yield "TensorRT engines need KIND_GPU instances"


def _ensemble_problems(config: Any, repository: Path) -> Iterable[str]:
    """What Triton would refuse in an ensemble's wiring: steps of models not in ``repository``, mapped tensors
    a model does not have, step inputs no ensemble input or earlier step provides, a tensor written twice,
    type mismatches, and ensemble outputs no step produces."""
    steps = config.ensemble_scheduling.step
    if not steps:
        yield "an ensemble with no steps"
    available = {t.name: t.data_type for t in config.input}  # ensemble tensor -> data type
    produced: set[str] = set()
    for k, step in enumerate(steps):
        where = f"ensemble step {k} ({step.model_name})"
        path = repository / step.model_name / "config.pbtxt"
        if not path.is_file():
            yield f"{where}: model {step.model_name!r} is not in the repository"
            model_in: dict[str, Any] | None = None
            model_out: dict[str, Any] = {}
        else:
            try:
                model = parse_config(path.read_text(), path)
            except BuildError as exc:
                yield f"{where}: {exc}"
                continue
            model_in, model_out = {t.name: t for t in model.input}, {t.name: t for t in model.output}
        for key, tensor in step.input_map.items():
            if tensor not in available:
                yield (f"{where}: input {key!r} reads ensemble tensor {tensor!r}, which is neither an ensemble input "
                       "nor an output of an earlier step")
            if model_in is None:
                continue
            if key not in model_in:
                yield f"{where}: input_map names {key!r}, which is not an input of {step.model_name}"
            elif tensor in available and available[tensor] not in (mc.TYPE_INVALID, model_in[key].data_type):
                yield (f"{where}: input {key!r} is {mc.DataType.Name(model_in[key].data_type)} but ensemble tensor "
                       f"{tensor!r} is {mc.DataType.Name(available[tensor])}")
        if model_in is not None:
            unmapped = [n for n, t in model_in.items() if n not in step.input_map and not t.optional]
            if unmapped:
                yield f"{where}: input(s) {', '.join(unmapped)} of {step.model_name} are not mapped"
        for key, tensor in step.output_map.items():
            if model_in is not None and key not in model_out:
                yield f"{where}: output_map names {key!r}, which is not an output of {step.model_name}"
            if tensor in available:
                yield f"{where}: output {key!r} writes ensemble tensor {tensor!r}, which already has a value"
            available[tensor] = model_out[key].data_type if key in model_out else mc.TYPE_INVALID
            produced.add(tensor)
    for t in config.output:
        if t.name not in produced:
            yield f"ensemble output {t.name!r} is produced by no step"
        elif available[t.name] not in (mc.TYPE_INVALID, t.data_type):
            yield (f"ensemble output {t.name!r} is {mc.DataType.Name(t.data_type)} but its step produces "
                   f"{mc.DataType.Name(available[t.name])}")
