"""Build a TensorRT / TensorRT-RTX engine from one ONNX graph, and check an engine before loading it.

What happens, in order:

1. The ONNX file is checked here, without its weights (:mod:`.graph_checks`): corrupt files, custom ops a
   flavor cannot take, dtypes without engine bindings, precision, profiles.
2. Parsing and building run in a child Python process. A native abort inside TensorRT then becomes one
   :class:`~dspark_compile.errors.BuildError` instead of killing the caller, for the price of an interpreter
   start per engine.
3. The network is strongly typed: TensorRT-RTX only has strongly typed networks (``create_network(0)``
   already sets STRONGLY_TYPED, its only creation flag, and it has no FP16/BF16 builder flags); full
   TensorRT gets the flag explicitly. Precision therefore comes from the graph's dtypes; ``precision``
   states what the graph must be and is checked, never a request to convert.
4. The plan, ``<plan>.inspect.json`` (see :mod:`.inspect`) and ``<plan>.json`` (metadata: flavor, version,
   precision, profiles, I/O, layer summary, hashes, where the engine can run) are written to a temporary
   directory beside the plan and renamed into place, metadata last.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspark_compile
from dspark_compile.artifacts import GraphIO, sha256_file
from dspark_compile.errors import BackendUnavailableError, BuildError, UsageError
from dspark_compile.targets.tensorrt import inspect as trt_inspect
from dspark_compile.targets.tensorrt.adapter import GpuInfo, TrtFlavor, flavor_label, load_trt, visible_gpus
from dspark_compile.targets.tensorrt.graph_checks import (
    PRECISIONS,
    ShapeRange,
    check_graph,
    check_profiles,
    read_onnx,
)

log = logging.getLogger(__name__)
trt_log = logging.getLogger(__name__ + ".trt")

METADATA_FORMAT = "dspark-compile/tensorrt-engine"
METADATA_VERSION = 1

# TensorRT's warnings are mostly advice for C++ callers ("make sure output has an Int64 binding"): INFO.
_TRT_LOG_LEVELS = {0: logging.ERROR, 1: logging.ERROR, 2: logging.INFO, 3: logging.DEBUG, 4: logging.DEBUG}
_ADDR_NO_RANDOMIZE = 0x0040000
_CHILD_CODE = (
    "import sys; from dspark_compile.targets.tensorrt.build import _child_main; "
    "sys.exit(_child_main(sys.argv[1]))"
)


def metadata_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + ".json")


def inspector_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + ".inspect.json")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: ``(min, opt, max)`` shapes per dynamic input (static ones may be left out).

    One profile per KV-length bucket, say, each spanning batch 1..max and γ 1..max: build them with
    :meth:`from_dim_ranges` from the graph's symbolic dimension names.
    """

    shapes: dict[str, ShapeRange]

    @classmethod
    def of(cls, value: Profile | Mapping[str, Sequence[Sequence[int]]]) -> Profile:
        if isinstance(value, Profile):
            value = value.shapes
        shapes: dict[str, ShapeRange] = {}
        for name, triple in value.items():
            if len(triple) != 3:
                raise UsageError(f"profile input `{name}`: expected (min, opt, max) shapes, "
                                 f"found {triple!r}.")
            lo, opt, hi = (tuple(int(d) for d in shape) for shape in triple)
            if not len(lo) == len(opt) == len(hi):
                raise UsageError(f"profile input `{name}`: min/opt/max ranks differ: {lo}, {opt}, {hi}.")
            if not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                raise UsageError(f"profile input `{name}`: expected 0 <= min <= opt <= max in every "
                                 f"dimension, found min {lo}, opt {opt}, max {hi}.")
            shapes[name] = (lo, opt, hi)
        return cls(shapes)

    @classmethod
    def from_dim_ranges(cls, onnx_path: Path, ranges: Mapping[str, tuple[int, int, int]]) -> Profile:
        """Shapes from ``{"B": (1, 4, 8), "S": (1, 256, 512)}``: symbolic dims take their range."""
        shapes = {}
        for name, dims in ((t.name, t.shape) for t in GraphIO.of(read_onnx(Path(onnx_path))).inputs):
            if dims is None or all(isinstance(d, int) for d in dims):
                continue
            triple = []
            for which in range(3):
                shape = []
                for axis, dim in enumerate(dims):
                    if isinstance(dim, int):
                        shape.append(dim)
                    elif dim in ranges:
                        shape.append(ranges[dim][which])
                    else:
                        raise UsageError(f"{onnx_path}: input `{name}` axis {axis} is the dynamic dimension "
                                         f"`{dim}`, which has no range; add `{dim}` to the dimension ranges.")
                triple.append(tuple(shape))
            shapes[name] = tuple(triple)
        return cls.of(shapes)

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {
            name: dict(zip(("min", "opt", "max"), map(list, triple), strict=True))
            for name, triple in self.shapes.items()
        }


@dataclass(frozen=True)
class EngineBuildResult:
    plan_path: Path
    inspector_path: Path
    metadata_path: Path
    flavor: str
    trt_version: str
    precision: str
    profiles: tuple[Profile, ...]
    num_layers: int
    plugin_layers: tuple[str, ...]
    verify_layers: tuple[str, ...]
    plan_bytes: int
    plan_sha256: str
    seconds: float
    device_memory: tuple[int, ...] | None = None  # per profile, from the built engine (None without a GPU)


def build_engine(
    onnx_path: Path,
    out_plan: Path,
    *,
    flavor: TrtFlavor,
    profiles: Sequence[Profile | Mapping[str, Sequence[Sequence[int]]]],
    precision: str = "fp32",
    timing_cache: Path | None = None,
    workspace_mb: int | None = None,
    plugin_modules: Sequence[str] = (),
) -> EngineBuildResult:
    """Build ``out_plan`` from ``onnx_path``; writes ``<plan>.json`` and ``<plan>.inspect.json`` beside it.

    ``plugin_modules`` are Python modules the builder process imports before parsing: the builder is a fresh
    interpreter, so plugins (full TensorRT's ``tensorrt.plugin`` registrations, or a module that loads a
    plugin library) must register there, not in the caller.
    """
    started = time.perf_counter()
    onnx_path, out_plan = Path(onnx_path), Path(out_plan)
    if precision not in PRECISIONS:
        raise UsageError(f"precision: expected one of {', '.join(PRECISIONS)}, found {precision!r}.")
    if not profiles:
        raise UsageError(f"{onnx_path}: at least one optimization profile is needed.")
    if workspace_mb is not None and workspace_mb <= 0:
        raise UsageError(f"workspace_mb: expected a positive number of MiB, found {workspace_mb}.")
    if plugin_modules and not flavor.supports_plugins:
        raise UsageError(f"plugin modules {list(plugin_modules)} given, but {flavor.label} has no plugin "
                         "support; build with --no-plugin instead.")
    normalized = tuple(Profile.of(p) for p in profiles)
    model = read_onnx(onnx_path)
    check_graph(model, onnx_path, flavor, precision)
    check_profiles([p.shapes for p in normalized], GraphIO.of(model), onnx_path)

    cache_note: dict[str, Any] = {"path": str(timing_cache) if timing_cache else None, "used": False}
    if timing_cache is not None and not flavor.supports_timing_cache:
        # TensorRT-RTX would look for a GPU as soon as a timing cache is set; the build stays CPU-only.
        log.warning("%s: timing cache %s not used; %s does not support one without a GPU.",
                    out_plan, timing_cache, flavor.label)
        cache_note["reason"] = f"{flavor.display_name} builds without a timing cache"
        timing_cache = None

    gpus = visible_gpus()
    out_plan.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_plan.parent, prefix=f".{out_plan.name}.") as tmp:
        work = Path(tmp)
        request = {
            "flavor": flavor.name,
            "onnx": str(onnx_path.resolve()),
            "plan": "engine.plan",  # relative: the child runs in `work`
            "profiles": [p.to_json() for p in normalized],
            "timing_cache": str(timing_cache.resolve()) if timing_cache else None,
            "workspace_mb": workspace_mb,
            "plugin_modules": list(plugin_modules),
            "inspect_engine": bool(gpus),
        }
        result = _run_child(request, work, onnx_path, flavor)
        cache_note["used"] = timing_cache is not None

        plan_tmp = work / "engine.plan"
        description = result["network"]
        summary = trt_inspect.summarize(description)
        plan_sha = sha256_file(plan_tmp)
        build_gpu = gpus[0] if gpus else None
        runs_on = flavor.engine_compute_capabilities(build_gpu)
        inspector = {
            "plan": out_plan.name,
            "source": "network definition (pre-fusion); `engine` holds the engine inspector's view when "
                      "a GPU could deserialize the engine",
            **description,
            "plugin_layers": summary["plugin_layers"],
            "verify_layers": summary["verify_layers"],
            "engine": result.get("engine"),
        }
        metadata = {
            "format": METADATA_FORMAT,
            "format_version": METADATA_VERSION,
            "dspark_compile_version": dspark_compile.__version__,
            "flavor": flavor.name,
            "trt_version": flavor.version,
            "onnx_parser_version": result.get("parser_version"),
            "precision": precision,
            "strongly_typed": True,
            "onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
            "plan": {"bytes": plan_tmp.stat().st_size, "sha256": plan_sha},
            "profiles": [p.to_json() for p in normalized],
            "inputs": description["inputs"],
            "outputs": description["outputs"],
            "layers": summary,
            "timing_cache": cache_note,
            "workspace_mb": workspace_mb,
            "plugin_modules": list(plugin_modules),
            "build_gpu": _gpu_json(build_gpu),
            "engine_compute_capabilities": [list(cc) for cc in runs_on] if runs_on is not None else None,
            "build_seconds": round(result["seconds"], 3),
            # Built without address-space randomisation: the same inputs give the same plan bytes, but for the
            # few bytes of shape-symbol numbering that TensorRT-RTX 1.7 orders by its threads' timing.
            "reproducible": result["fixed_addresses"],
        }
        (work / "inspect.json").write_text(trt_inspect.dumps(inspector))
        (work / "metadata.json").write_text(json.dumps(metadata, indent=1))
        # Metadata last (and the old one first away): a half-replaced engine has no metadata, so
        # check_engine_compatible refuses it instead of trusting stale facts.
        metadata_path(out_plan).unlink(missing_ok=True)
        os.replace(plan_tmp, out_plan)
        os.replace(work / "inspect.json", inspector_path(out_plan))
        os.replace(work / "metadata.json", metadata_path(out_plan))

    seconds = time.perf_counter() - started
    log.info("%s: %s engine, %d layers, %.1f MB in %.1f s", out_plan, flavor.label, summary["num_layers"],
             metadata["plan"]["bytes"] / 1e6, seconds)
    return EngineBuildResult(
        plan_path=out_plan,
        inspector_path=inspector_path(out_plan),
        metadata_path=metadata_path(out_plan),
        flavor=flavor.name,
        trt_version=flavor.version,
        precision=precision,
        profiles=normalized,
        num_layers=summary["num_layers"],
        plugin_layers=tuple(summary["plugin_layers"]),
        verify_layers=tuple(summary["verify_layers"]),
        plan_bytes=metadata["plan"]["bytes"],
        plan_sha256=plan_sha,
        seconds=seconds,
        device_memory=tuple(d) if (d := (result.get("engine") or {}).get("device_memory")) else None,
    )


def _gpu_json(gpu: GpuInfo | None) -> dict[str, Any] | None:
    return None if gpu is None else {"name": gpu.name, "compute_capability": list(gpu.compute_capability)}


def _fixed_address_space() -> Callable[[], None] | None:
    """A ``preexec_fn`` that turns off address-space randomisation in the builder process (Linux only).

    Why: TensorRT-RTX 1.7 numbers symbolic dimensions in an order that follows heap addresses, so under
    ASLR two builds of one graph differ in a few bytes (seen: 3 distinct plans in 10 builds); without ASLR,
    12 of 12 builds were identical, also from ONNX files at other paths. The builder only parses graphs our
    exporter wrote. ``personality`` is looked up here, before the fork, so the child runs no loader code.
    """
    if sys.platform != "linux":
        return None
    try:
        personality = ctypes.CDLL(None, use_errno=True).personality
    except (OSError, AttributeError):
        return None
    personality.argtypes = [ctypes.c_ulong]
    personality.restype = ctypes.c_int

    def preexec() -> None:
        current = personality(0xFFFFFFFF)  # 0xffffffff only queries
        if current != -1:
            personality(current | _ADDR_NO_RANDOMIZE)

    return preexec


def _run_child(request: dict[str, Any], work: Path, onnx_path: Path, flavor: TrtFlavor) -> dict[str, Any]:
    """Parse and build in a fresh interpreter; turn every way it can fail into one BuildError."""
    request_path = work / "request.json"
    request_path.write_text(json.dumps(request))
    env = dict(os.environ)
    package_root = str(Path(dspark_compile.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    # The child runs in `work` with relative paths, so its argv and stack do not depend on the temporary
    # directory's name: without address randomisation the plan bytes then depend only on the inputs.
    proc = subprocess.run([sys.executable, "-c", _CHILD_CODE, request_path.name], env=env, cwd=work,
                          capture_output=True, text=True, errors="replace", check=False,
                          preexec_fn=_fixed_address_space())
    result_path = work / "result.json"
    if not result_path.is_file():
        tail = " | ".join(line.strip() for line in proc.stderr.strip().splitlines()[-4:]) or "no output"
        if proc.returncode < 0:
            raise BuildError(
                f"{onnx_path}: the {flavor.label} builder process was killed by "
                f"{signal.Signals(-proc.returncode).name} (a native crash inside TensorRT; the calling process "
                f"is unaffected). Last output: {tail}. Try --no-plugin, a smaller graph to narrow it down, or "
                "another TensorRT version."
            )
        raise BuildError(f"{onnx_path}: the {flavor.label} builder process failed (exit status "
                         f"{proc.returncode}): {tail}")
    result = json.loads(result_path.read_text())
    for severity, message in result["log"]:
        # On failure the BuildError carries TensorRT's last errors; the full log stays available at DEBUG.
        level = _TRT_LOG_LEVELS.get(severity, logging.DEBUG) if result["ok"] else logging.DEBUG
        trt_log.log(level, "%s", message)
    if not result["ok"]:
        raise BuildError(f"{onnx_path}: {result['error']}")
    return result


# ---------------------------------------------------------------------------------------------------------
# Child process side: everything below runs in the interpreter started by _run_child.


def _parser_error_text(flavor: TrtFlavor, errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    code, desc, op = first["code"], first["desc"], first["node_operator"]
    node = f"node #{first['node']} `{first['node_name'] or '(unnamed)'}`" if first["node"] >= 0 else ""
    more = f" (+{len(errors) - 1} more parser error(s))" if len(errors) > 1 else ""
    if "Plugin not found" in desc:
        plugin = " or pass the module that registers its plugin" if flavor.supports_plugins else ""
        return (f"{flavor.label} does not support op `{op}` ({node}): it has no importer and no plugin of "
                f"that name{more}. Write it with standard ONNX ops (see the TensorRT ONNX operator support "
                f"matrix){plugin}.")
    if code == "MODEL_DESERIALIZE_FAILED":
        hint = "the file is not a valid ONNX model; re-export it."
    elif "DATATYPE" in code or "data type" in desc:
        hint = "change that tensor's dtype in the export."
    else:
        hint = "check the op and its attributes against the TensorRT ONNX operator support matrix."
    where = f"{node} ({op})" if node else "the model"
    return f"{flavor.label} cannot parse {where}: {desc} [{code}]{more}; {hint}"


def _addresses_fixed() -> bool:
    try:
        return bool(int(Path("/proc/self/personality").read_text(), 16) & _ADDR_NO_RANDOMIZE)
    except (OSError, ValueError):
        return False


def _child_main(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    result_path = Path(request_path).with_name("result.json")
    started = time.perf_counter()
    flavor = load_trt(request["flavor"])
    trt = flavor.module
    records: list[tuple[int, str]] = []

    class CollectingLogger(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                records.append((int(severity), msg))
                sys.stderr.write(msg + "\n")  # a trail for the parent if TensorRT aborts
                sys.stderr.flush()

    def finish(ok: bool, **fields: Any) -> int:
        result = {"ok": ok, "log": records, "seconds": time.perf_counter() - started, **fields}
        result_path.write_text(json.dumps(result))
        return 0

    def last_errors() -> str:
        errors = [msg for severity, msg in records if severity <= int(trt.ILogger.Severity.ERROR)]
        return " | ".join(errors[-3:]) or "no error message"

    for module in request["plugin_modules"]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return finish(False, error=f"plugin module `{module}` cannot be imported in the builder process "
                                       f"({exc}); make it importable there (installed, or on PYTHONPATH).")
    logger = CollectingLogger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    weights = _map_weights(Path(request["onnx"])) if hasattr(parser, "load_initializer") else None
    if weights is not None:  # the parser reads the weights from the mapped file, not from copies of its own
        ok = parser.load_model_proto(weights.graph, request["onnx"]) and all(
            parser.load_initializer(name, address, size) for name, (address, size) in weights.initializers.items())
        ok = ok and parser.parse_model_proto()
    else:
        ok = parser.parse_from_file(request["onnx"])
    if not ok:
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append({"code": str(err.code()).rsplit(".", 1)[-1], "desc": err.desc(), "node": err.node(),
                           "node_name": err.node_name(), "node_operator": err.node_operator()})
        if not errors:
            return finish(False, error=f"{flavor.label} could not parse the graph: {last_errors()}.")
        return finish(False, error=_parser_error_text(flavor, errors))

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer details for the engine inspector
    if request["workspace_mb"] is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request["workspace_mb"] << 20)
    for index, shapes in enumerate(request["profiles"]):
        profile = builder.create_optimization_profile()
        for name, triple in shapes.items():
            profile.set_shape(name, triple["min"], triple["opt"], triple["max"])
        if config.add_optimization_profile(profile) < 0:
            return finish(False, error=f"{flavor.label} rejected optimization profile {index}: "
                                       f"{last_errors()}.")

    cache = None
    if request["timing_cache"] is not None:
        cache_path = Path(request["timing_cache"])
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    built = _build_to_file(trt, builder, network, config, Path(request["plan"]))
    if not built:
        return finish(False, error=f"{flavor.label} failed to build the engine: {last_errors()}. Check "
                                   "the profiles against the graph and the log (--verbose) for the failing "
                                   "layer.")
    description = trt_inspect.describe_network(network)
    del parser, network, weights  # the weights the network held, before the plan is read back
    if cache is not None:
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        tmp.write_bytes(bytes(memoryview(cache.serialize())))
        os.replace(tmp, cache_path)

    engine = None
    if request["inspect_engine"]:
        import numpy as np

        try:
            engine = trt_inspect.engine_information(trt, np.memmap(request["plan"], mode="r"), logger)
        except (RuntimeError, ValueError, TypeError) as exc:  # inspection is a bonus; the engine itself is fine
            records.append((int(trt.ILogger.Severity.WARNING), f"engine inspector unavailable: {exc}"))
    return finish(True, network=description, engine=engine,
                  parser_version=str(trt.get_nv_onnx_parser_version()), fixed_addresses=_addresses_fixed())


@dataclass
class _MappedWeights:
    graph: bytes  # the ONNX file (its weights are external)
    initializers: dict[str, tuple[int, int]]  # name -> (address in a read-only map of its file, bytes)
    maps: list[Any]


def _map_weights(onnx_path: Path) -> _MappedWeights | None:
    """The graph's external initializers as addresses in read-only memory maps of their files: the parser then
    builds the network over the page cache instead of reading every weight into memory of its own (an 8B
    target is 16 GB). None when the graph keeps its weights inside the file."""
    import numpy as np
    import onnx

    graph = onnx_path.read_bytes()
    model = onnx.load_model_from_string(graph) if graph else None  # external data stays on disk
    if model is None:
        return None
    maps: dict[str, Any] = {}
    out: dict[str, tuple[int, int]] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        location = info["location"]
        if location not in maps:
            maps[location] = np.memmap(onnx_path.parent / location, dtype=np.uint8, mode="r")
        offset = int(info.get("offset", 0))
        size = int(info.get("length", maps[location].size - offset))
        out[init.name] = (maps[location].ctypes.data + offset, size)
    return _MappedWeights(graph, out, list(maps.values())) if out else None


def _build_to_file(trt: Any, builder: Any, network: Any, config: Any, plan_path: Path) -> bool:
    """Build and write the plan; streamed to the file where the flavor can (no second copy of it in memory)."""
    if not hasattr(builder, "build_serialized_network_to_stream"):
        plan = builder.build_serialized_network(network, config)
        if plan is not None:
            with plan_path.open("wb") as f:
                f.write(memoryview(plan))
        return plan is not None

    class FileWriter(trt.IStreamWriter):  # type: ignore[misc]
        def __init__(self, f: Any) -> None:
            trt.IStreamWriter.__init__(self)
            self.f = f

        def write(self, data: Any, size: int | None = None) -> int:
            if not isinstance(data, (bytes, bytearray, memoryview)):  # a capsule around a pointer
                get = ctypes.pythonapi.PyCapsule_GetPointer
                get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
                data = ctypes.string_at(get(data, None), size)
            return self.f.write(data)

    with plan_path.open("wb") as f:
        return bool(builder.build_serialized_network_to_stream(network, config, FileWriter(f)))


# ---------------------------------------------------------------------------------------------------------
# Loading side.


def read_engine_metadata(plan_path: Path) -> dict[str, Any]:
    """The ``<plan>.json`` written by :func:`build_engine`; a clear error when it is missing or foreign."""
    plan_path = Path(plan_path)
    meta_path = metadata_path(plan_path)
    if not plan_path.is_file():
        raise BuildError(f"{plan_path}: engine file not found; build it with `dspark-compile build`.")
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise BuildError(f"{meta_path}: engine metadata not found (engine not built by dspark-compile, or "
                         "its build was interrupted); rebuild the engine.") from exc
    except json.JSONDecodeError as exc:
        raise BuildError(f"{meta_path}: engine metadata is not valid JSON ({exc}); "
                         "rebuild the engine.") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
        raise BuildError(f"{meta_path}: not dspark-compile engine metadata (expected format "
                         f"{METADATA_FORMAT!r}); rebuild the engine.")
    return metadata


def check_engine_compatible(
    plan_path: Path, *, flavor: TrtFlavor, gpus: Sequence[GpuInfo] | None = None
) -> None:
    """Refuse, with one clear error, an engine this process cannot load.

    Checks the metadata beside the plan against this process (flavor, exact TensorRT version: plans are not
    portable across versions), the plan's bytes against the recorded hash, the plan header where the library
    can judge it, and — when a GPU is visible (``gpus``; default: asked from the driver) — CUDA device 0's
    compute capability against those the engine can run on (a TensorRT-RTX engine never runs on an H100).
    """
    plan_path = Path(plan_path)
    metadata = read_engine_metadata(plan_path)
    built = flavor_label(str(metadata.get("flavor")), str(metadata.get("trt_version")))
    if metadata.get("flavor") != flavor.name or metadata.get("trt_version") != flavor.version:
        raise BackendUnavailableError(
            f"{plan_path}: engine was built with {built}, this process has {flavor.label}; engines load only "
            f"in the TensorRT they were built with. Rebuild it here (--trt-flavor {flavor.name}) or install "
            f"{built}."
        )
    plan = metadata.get("plan", {})
    size = plan_path.stat().st_size
    if size != plan.get("bytes") or sha256_file(plan_path) != plan.get("sha256"):
        raise BuildError(f"{plan_path}: engine file differs from the one its metadata describes ({size} "
                         f"bytes, expected {plan.get('bytes')}); it was modified or truncated. "
                         "Rebuild the engine.")
    with plan_path.open("rb") as f:
        head = f.read(4096)
    problems = flavor.engine_header_problems(head)
    if "malformed engine" in problems:
        raise BuildError(f"{plan_path}: {flavor.label} finds the engine malformed; rebuild the engine.")
    gpus = visible_gpus() if gpus is None else list(gpus)
    runs_on = metadata.get("engine_compute_capabilities")
    if gpus and runs_on is not None and list(gpus[0].compute_capability) not in runs_on:
        gpu = gpus[0]
        supported = ", ".join(f"{major}.{minor}" for major, minor in runs_on)
        major, minor = gpu.compute_capability
        raise BackendUnavailableError(
            f"{plan_path}: engine ({built}) runs on GPUs of compute capability {supported}; CUDA device "
            f"{gpu.index} is {gpu.name} ({major}.{minor}). Run it on such a GPU, or build an engine that "
            "targets this one."
        )
    if problems:  # with a GPU: what the library sees wrong with this machine (driver, memory, ...)
        raise BackendUnavailableError(f"{plan_path}: {flavor.label} cannot run the engine here: "
                                      f"{', '.join(problems)}. Fix that, or run it on another machine.")

