"""`BuildSpec`: the one frozen configuration every pass receives.

Read from a TOML (or YAML) file with `--spec`; every field can be overridden by the CLI flag of the same name
(dashes for underscores). The effective spec is saved into the build as ``build_spec.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark_compile.errors import UsageError

DTYPES = ("fp32", "fp16", "bf16")
VERIFY_MODES = ("greedy", "sampling")
TARGETS = ("onnx", "tensorrt", "triton")
TRT_FLAVORS = ("auto", "full", "rtx")
TRITON_MODES = ("bls", "onnxruntime_inprocess")
QUANTIZE = ("fp8", "fp8-dynamic")


class SpecFieldError(UsageError):
    """One field has a bad value; ``field`` lets :func:`make_spec` name where the value came from."""

    def __init__(self, field: str, expected: str, found: Any) -> None:
        self.field = field
        super().__init__(f"build spec field `{field}`: expected {expected}, found {found!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML `true` is not a size


@dataclass(frozen=True)
class BuildSpec:
    target: Path
    draft: Path
    out: Path
    dtype: str = "fp32"
    block_size: int | None = None  # None: the draft's trained block size
    max_batch: int = 8
    max_context: int = 2048  # cache slots the engines are profiled for
    verify_mode: str = "sampling"  # sampling graphs also serve temperature-0 (greedy) requests
    targets: tuple[str, ...] = ("onnx",)
    trt_flavor: str = "auto"
    no_plugin: bool = False
    opset: int = 18
    allow_nonfinite: bool = False
    kv_buckets: tuple[int, ...] = field(default_factory=tuple)  # TensorRT profiles; empty = one up to max_context
    triton_mode: str = "bls"  # bls | onnxruntime_inprocess (servers with only the python backend)
    quantize: str | None = None  # fp8: e4m3 target linear weights (passes/quantize.py)
    quantize_lm_head: bool = False
    quantize_draft: bool = False
    check_acceptance: Path | None = None  # prompts (JSON Lines): decode with the build and the reference
    max_tau_drop: float = 0.03  # check_acceptance fails the build (exit 3) past this relative drop of τ
    gpu_memory: str | None = None  # e.g. "80GiB": the build fails (exit 3) when a server would need more
    max_engine_gb: float = 6.0  # constant weights per TensorRT engine: a larger target is split by layer range

    def __post_init__(self) -> None:
        bad = SpecFieldError
        if self.dtype not in DTYPES:
            raise bad("dtype", " | ".join(DTYPES), self.dtype)
        if self.verify_mode not in VERIFY_MODES:
            raise bad("verify_mode", " | ".join(VERIFY_MODES), self.verify_mode)
        if self.block_size is not None and not (_is_int(self.block_size) and 1 <= self.block_size <= 64):
            raise bad("block_size", "an integer in [1, 64]", self.block_size)
        if not _is_int(self.max_batch) or self.max_batch < 1:
            raise bad("max_batch", "an integer >= 1", self.max_batch)
        if not _is_int(self.max_context) or self.max_context < 16:
            raise bad("max_context", "an integer >= 16", self.max_context)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise bad("targets", f"a comma-separated subset of {', '.join(TARGETS)}", ",".join(self.targets))
        if self.trt_flavor not in TRT_FLAVORS:
            raise bad("trt_flavor", " | ".join(TRT_FLAVORS), self.trt_flavor)
        if self.triton_mode not in TRITON_MODES:
            raise bad("triton_mode", " | ".join(TRITON_MODES), self.triton_mode)
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise bad("quantize", " | ".join(QUANTIZE), self.quantize)
        if isinstance(self.max_tau_drop, bool) or not isinstance(self.max_tau_drop, (int, float)) or not (
                0 <= self.max_tau_drop <= 1):
            raise bad("max_tau_drop", "a fraction in [0, 1] (0.03 = 3%)", self.max_tau_drop)
        if not _is_int(self.opset) or not 18 <= self.opset <= 23:
            raise bad("opset", "an integer in [18, 23]", self.opset)
        if isinstance(self.max_engine_gb, bool) or not isinstance(self.max_engine_gb, (int, float)) or not (
                0 < self.max_engine_gb < math.inf):
            raise bad("max_engine_gb", "a number of GB > 0 (6 = 6e9 bytes)", self.max_engine_gb)
        if self.gpu_memory is not None and parse_size(self.gpu_memory) is None:
            raise bad("gpu_memory", "a size such as 80GiB, 24G or 500MB", self.gpu_memory)

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out


FIELDS = {f.name: f for f in dataclasses.fields(BuildSpec)}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: Any) -> int | None:
    """``"80GiB"`` -> bytes (``G``/``GB`` decimal, ``GiB`` binary); None when it is not a size."""
    value = str(text).strip().lower().replace(" ", "")
    number = value.rstrip("kmgtib")
    try:
        size = float(number)
    except ValueError:
        return None
    unit = _UNITS.get(value[len(number):])
    return int(size * unit) if unit is not None and size > 0 else None


def _coerce(name: str, value: Any) -> Any:
    f = FIELDS[name]
    if name in ("target", "draft", "out", "check_acceptance"):
        return Path(str(value))
    if name in ("targets", "kv_buckets"):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise SpecFieldError(name, "a list", value)
        return tuple(int(i) if name == "kv_buckets" else str(i).strip() for i in items if str(i).strip())
    if f.type in ("bool",) and not isinstance(value, bool):
        raise SpecFieldError(name, "true/false", value)
    return value


def load_spec_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{path}: build spec file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = tomllib.loads(text)
    except Exception as e:  # tomllib / yaml parse errors carry line numbers
        raise UsageError(f"{path}: not a valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'} "
                         f"build spec ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a build spec must be a table of fields")
    raw = raw.get("build", raw)
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise UsageError(f"{path}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(FIELDS)}")
    base = path.parent
    for key in ("target", "draft", "out", "check_acceptance"):
        if key in raw and not Path(str(raw[key])).is_absolute():
            raw[key] = str(base / str(raw[key]))
    return raw


def make_spec(spec_file: Path | None = None, **overrides: Any) -> BuildSpec:
    """Spec file values, then every non-None override; missing target/draft/out is a usage error.

    A bad value is reported with where it came from: the flag (``--max-batch: ...``) or the spec file.
    """
    from_file: dict[str, Any] = load_spec_file(spec_file) if spec_file is not None else {}
    flags = {k: v for k, v in overrides.items() if v is not None}
    raw = from_file | flags
    for key in ("target", "draft", "out"):
        if key not in raw:
            raise UsageError(f"`{key}` is required (flag --{key} or the spec file)")

    def source(name: str) -> str:
        return f"--{name.replace('_', '-')}" if name in flags or spec_file is None else str(spec_file)

    values = {}
    for k, v in raw.items():
        try:
            values[k] = _coerce(k, v) if k in FIELDS else v
        except SpecFieldError as e:
            raise UsageError(f"{source(k)}: {e}") from None
        except (TypeError, ValueError) as e:
            raise UsageError(f"{source(k)}: build spec field `{k}`: {e}") from None
    try:
        return BuildSpec(**values)
    except SpecFieldError as e:
        raise UsageError(f"{source(e.field)}: {e}") from None
    except TypeError as e:  # an unknown keyword from a Python caller
        raise UsageError(f"invalid build spec: {e}") from None


def save_spec(spec: BuildSpec, path: Path) -> None:
    """The effective spec without ``out``: where a build is written is not one of its inputs, and two builds of
    the same inputs must be byte-identical wherever they go."""
    fields = {k: v for k, v in spec.to_json().items() if k != "out"}
    path.write_text(json.dumps(fields, indent=2) + "\n")
