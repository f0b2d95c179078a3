"""The one place that knows full TensorRT (`tensorrt`) from TensorRT-RTX (`tensorrt_rtx_bindings`).

Both expose the same API family (Builder, OnnxParser, IBuilderConfig, Runtime); what differs is captured as
data on :class:`TrtFlavor` so that the build and inspection code never branch on the flavor's name:

- plugins: full TensorRT runs custom ops (``dspark::SpecVerify``) as plugin layers; TensorRT-RTX 1.7 has no
  plugin layers at all, and its ONNX parser aborts the process when a creator of a custom op is registered.
- timing cache: TensorRT-RTX looks for a GPU as soon as a timing cache is set, so we never give it one.
- where engines run: a full TensorRT engine runs on the GPU it was built on; a TensorRT-RTX engine is built
  without a GPU for every RTX-class compute capability that the library lists and is JIT-specialised at load.
- engine validity: TensorRT-RTX can judge a plan's header (``Runtime.get_engine_validity``).
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from dspark_compile.errors import BackendUnavailableError, UsageError

FlavorName = Literal["full", "rtx"]
FLAVOR_CHOICES = ("auto", "full", "rtx")

ComputeCapability = tuple[int, int]


@dataclass(frozen=True)
class _FlavorSpec:
    module_name: str
    display_name: str
    pip_install: str
    supports_plugins: bool
    supports_timing_cache: bool


_SPECS: dict[str, _FlavorSpec] = {
    "full": _FlavorSpec(
        module_name="tensorrt",
        display_name="TensorRT",
        pip_install="pip install 'tensorrt>=10.10' (from NVIDIA's package index)",
        supports_plugins=True,
        supports_timing_cache=True,
    ),
    "rtx": _FlavorSpec(
        module_name="tensorrt_rtx_bindings",
        display_name="TensorRT-RTX",
        pip_install="pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116",
        supports_plugins=False,
        supports_timing_cache=False,
    ),
}


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: ComputeCapability


@dataclass(frozen=True)
class TrtFlavor:
    name: FlavorName
    module: ModuleType
    version: str
    supports_plugins: bool
    supports_timing_cache: bool
    display_name: str = ""
    pip_install: str = ""

    @property
    def label(self) -> str:
        """``TensorRT-RTX 1.7.1.116``: how messages name what this process has."""
        return f"{self.display_name} {self.version}"

    def engine_compute_capabilities(self, build_gpu: GpuInfo | None) -> list[ComputeCapability] | None:
        """Compute capabilities an engine built now can run on; ``None`` when unknown."""
        if self.name == "rtx":
            # ComputeCapability lists SM75, SM80, ... SM121 (plus NONE/CURRENT, which are not devices).
            return sorted(
                (int(member[2:-1]), int(member[-1]))
                for member in self.module.ComputeCapability.__members__
                if member.startswith("SM")
            )
        return [build_gpu.compute_capability] if build_gpu is not None else None

    def engine_header_problems(self, plan_head: bytes) -> list[str]:
        """What the library finds wrong with a plan's header (TensorRT-RTX only; empty elsewhere).

        Without a GPU, TensorRT-RTX answers INVALID with no diagnostic for a sound plan (it cannot read the
        GPU's properties, and says so at "fatal" severity, hence the silent logger), so only the named
        diagnostics count.
        """
        trt = self.module
        if not hasattr(trt.Runtime, "get_engine_validity"):
            return []

        class SilentLogger(trt.ILogger):  # type: ignore[name-defined,misc]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                pass

        runtime = trt.Runtime(SilentLogger())
        head = plan_head[: runtime.engine_header_size]
        _, diagnostics = runtime.get_engine_validity(head)
        return [
            name.lower().replace("_", " ")
            for name, bit in self.module.EngineInvalidityDiagnostics.__members__.items()
            if int(diagnostics) & int(bit)
        ]


def load_trt(flavor: str = "auto") -> TrtFlavor:
    """Import the TensorRT flavor asked for; ``auto`` prefers full TensorRT and falls back to TensorRT-RTX."""
    if flavor not in FLAVOR_CHOICES:
        raise UsageError(f"--trt-flavor: expected one of {', '.join(FLAVOR_CHOICES)}, found {flavor!r}.")
    names = ["full", "rtx"] if flavor == "auto" else [flavor]
    failures: list[str] = []
    for name in names:
        spec = _SPECS[name]
        try:
            module = importlib.import_module(spec.module_name)
        except (ImportError, OSError) as exc:  # OSError: the bindings import but libnvinfer does not load
            failures.append(f"{spec.display_name} (`import {spec.module_name}`: {exc})")
            continue
        if not hasattr(module, "Builder"):
            # An unfinished install (e.g. the PyPI `tensorrt` sdist that could not fetch its wheel) leaves
            # a package without the bindings.
            failures.append(f"{spec.display_name} (`{spec.module_name}` has no Builder; broken install)")
            continue
        return TrtFlavor(
            name=name,  # type: ignore[arg-type]
            module=module,
            version=str(getattr(module, "__version__", "unknown")),
            supports_plugins=spec.supports_plugins,
            supports_timing_cache=spec.supports_timing_cache,
            display_name=spec.display_name,
            pip_install=spec.pip_install,
        )
    installs = " or ".join(f"`{_SPECS[name].pip_install}`" for name in names)
    raise BackendUnavailableError(
        f"no usable TensorRT for --trt-flavor {flavor}: {'; '.join(failures)}. Install it with {installs}."
    )


def flavor_label(name: str, version: str) -> str:
    """How messages name a flavor recorded in engine metadata (which may not be importable here)."""
    spec = _SPECS.get(name)
    return f"{spec.display_name if spec else name} {version}"


def visible_gpus() -> list[GpuInfo]:
    """CUDA devices this process can see, read from the driver API.

    Why not torch or pynvml: the compiler's torch may be a CPU build and nvidia-ml-py is not a dependency;
    libcuda is what TensorRT itself needs, so asking it directly gives exactly the devices TensorRT would see
    (CUDA_VISIBLE_DEVICES included). No driver, no devices.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return []
    if cuda.cuInit(0) != 0:
        return []
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    gpus = []
    for index in range(count.value):
        device = ctypes.c_int(0)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        name = ctypes.create_string_buffer(256)
        if cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
            continue
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)
        cuda.cuDeviceGetName(name, len(name), device)
        gpus.append(GpuInfo(index, name.value.decode(errors="replace"), (major.value, minor.value)))
    return gpus
