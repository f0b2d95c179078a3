"""Pre-quantized FP8 targets: the Hugging Face block-wise "-FP8" layout and NVIDIA Model Optimizer's export.

Two layouts exist in the wild and both store each quantized linear weight as ``F8_E4M3`` beside a float32
dequantization scale (``weight ≈ e4m3 · scale``):

* **Hugging Face fine-grained FP8** (Qwen3-8B-FP8, DeepSeek-V3): ``config.json`` ``quantization_config``
  ``{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}``;
  the scale ``<module>.weight_scale_inv`` has one value per 128×128 block (``[ceil(out/128), ceil(in/128)]``;
  despite its name it multiplies).
* **Model Optimizer FP8** (``export_hf_checkpoint``): ``hf_quant_config.json``
  ``{"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "exclude_modules": [...]}}`` and/or
  ``config.json`` ``quantization_config`` ``{"quant_method": "modelopt", "quant_algo": "FP8"}``; per-tensor
  scalars ``<module>.weight_scale`` and ``<module>.input_scale`` (the static activation scale).

Reading stays lazy: only headers are read here, and only the (small) scale tensors are read to check them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dspark_compile.checkpoint.store import WeightStore
from dspark_compile.errors import CheckpointError

HF_QUANT_CONFIG = "hf_quant_config.json"
FP8_DTYPE = "F8_E4M3"
BLOCK_SCALE = "weight_scale_inv"
TENSOR_SCALE = "weight_scale"
INPUT_SCALE = "input_scale"
SUPPORTED = ("fp8 (Hugging Face fine-grained e4m3, weight_block_size)", "modelopt FP8 (per-tensor)")


@dataclass(frozen=True)
class Fp8Layout:
    """How a checkpoint stores its FP8 weights: ``method`` "fp8_block" (HF) or "fp8_tensor" (Model Optimizer)."""

    method: str
    source: Path  # the file that declared it
    block: tuple[int, int] | None = None  # rows, columns of one scale block (fp8_block)
    activation: str = "dynamic"  # "dynamic" (HF: per token group, not replayed here) | "static" (input_scale)


@dataclass(frozen=True)
class Fp8Tensor:
    """One quantized weight: its e4m3 tensor, its scale, and (Model Optimizer) its static input scale."""

    weight: str
    scale: str
    input_scale: str | None = None


@dataclass(frozen=True)
class Fp8Checkpoint:
    """The FP8 part of a target checkpoint: layout and every quantized weight by tensor name."""

    layout: Fp8Layout
    tensors: dict[str, Fp8Tensor]

    def extra_names(self) -> set[str]:
        """The scale tensors: names a bf16 checkpoint would not have."""
        return {n for t in self.tensors.values() for n in (t.scale, t.input_scale) if n is not None}

    def to_json(self) -> dict[str, Any]:
        return {"method": self.layout.method, "block": list(self.layout.block) if self.layout.block else None,
                "activation": self.layout.activation, "source": str(self.layout.source),
                "weights": len(self.tensors)}


def read_layout(directory: Path, config: dict[str, Any]) -> Fp8Layout | None:
    """The declared quantization of a checkpoint, or None; any other declared method is a CheckpointError."""
    config_path = directory / "config.json"
    qc = config.get("quantization_config")
    hf_quant = directory / HF_QUANT_CONFIG
    if hf_quant.is_file():
        return _modelopt_layout(hf_quant, _read(hf_quant).get("quantization"))
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{config_path}: `quantization_config` must be an object, found {qc!r}; fix the file.")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return _block_layout(config_path, qc)
    if method == "modelopt":
        return _modelopt_layout(config_path, qc)
    raise CheckpointError(
        f"{config_path}: `quantization_config.quant_method` is {qc.get('quant_method')!r}, which dspark-compile "
        f"does not read; supported: {'; '.join(SUPPORTED)}. Use the bf16 checkpoint (and `--quantize fp8`)."
    )


def _block_layout(path: Path, qc: dict[str, Any]) -> Fp8Layout:
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise CheckpointError(f"{path}: `quantization_config.fmt` is {qc.get('fmt')!r}; only e4m3 FP8 weights are "
                              "supported. Use an e4m3 checkpoint.")
    block = qc.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{path}: `quantization_config.weight_block_size` must be two positive integers, "
                              f"found {block!r}; fix the file.")
    activation = str(qc.get("activation_scheme", "dynamic")).lower()
    if block is None:  # per-tensor `weight_scale` (+ static `input_scale`), as older fp8 exports write it
        return Fp8Layout("fp8_tensor", path, None, activation)
    return Fp8Layout("fp8_block", path, (block[0], block[1]), activation)


def _modelopt_layout(path: Path, qc: Any) -> Fp8Layout:
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: expected a `quantization` object with `quant_algo`, found {qc!r}; "
                              "re-export with Model Optimizer's export_hf_checkpoint.")
    algo = qc.get("quant_algo")
    if algo != "FP8":
        raise CheckpointError(
            f"{path}: `quant_algo` is {algo!r}, which dspark-compile does not read; supported: "
            f"{'; '.join(SUPPORTED)}. Export the model with quant_algo FP8, or use the bf16 checkpoint."
        )
    kv = qc.get("kv_cache_quant_algo")
    if kv not in (None, "", "NONE"):
        raise CheckpointError(f"{path}: `kv_cache_quant_algo` is {kv!r}; FP8 KV caches are not supported. Export "
                              "without KV-cache quantization.")
    return Fp8Layout("fp8_tensor", path, None, "static")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc}); fix or re-download it.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object; fix the file.")
    return data


def scan(layout: Fp8Layout, weights: WeightStore) -> Fp8Checkpoint:
    """Pair every e4m3 tensor with its scales and check them: shapes, float dtype, finite and positive."""
    tensors = {}
    for name in weights.names():
        if weights.dtype(name) != FP8_DTYPE:
            continue
        if not name.endswith(".weight"):
            raise CheckpointError(f"{weights.file_of(name)}: tensor `{name}` is e4m3 but not a `.weight`; only "
                                  "linear weights may be FP8. Re-export the checkpoint.")
        prefix = name.removesuffix(".weight")
        shape = weights.shape(name)
        if len(shape) != 2:
            raise CheckpointError(f"{weights.file_of(name)}: e4m3 tensor `{name}` has shape {list(shape)}; expected "
                                  "a 2-D linear weight.")
        if layout.method == "fp8_block":
            assert layout.block is not None
            scale = f"{prefix}.{BLOCK_SCALE}"
            expected = tuple(math.ceil(d / b) for d, b in zip(shape, layout.block, strict=True))
            why = f"ceil({list(shape)} / weight_block_size {list(layout.block)})"
            inp = None
        else:
            scale = f"{prefix}.{TENSOR_SCALE}"
            expected, why = (), "a per-tensor scalar"
            inp = f"{prefix}.{INPUT_SCALE}" if f"{prefix}.{INPUT_SCALE}" in weights else None
        _check_scale(weights, name, scale, {expected, (1,)} if not expected else {expected}, why)
        if inp is not None:
            _check_scale(weights, name, inp, {(), (1,)}, "a per-tensor scalar")
        tensors[name] = Fp8Tensor(name, scale, inp)
    if not tensors:
        raise CheckpointError(f"{layout.source}: declares FP8 quantization but no tensor of the checkpoint is "
                              f"{FP8_DTYPE}; fix the quantization config or re-export the checkpoint.")
    orphans = [n for n in weights.names() if n.endswith((f".{BLOCK_SCALE}", f".{TENSOR_SCALE}", f".{INPUT_SCALE}"))
               and n not in {s for t in tensors.values() for s in (t.scale, t.input_scale)}]
    if orphans:
        raise CheckpointError(f"{weights.file_of(orphans[0])}: scale tensor `{orphans[0]}` belongs to no e4m3 "
                              f"weight ({len(orphans)} such); expected {_scale_kind(layout)} scales only. "
                              "Re-export the checkpoint.")
    return Fp8Checkpoint(layout, tensors)


def _scale_kind(layout: Fp8Layout) -> str:
    return f"`{BLOCK_SCALE}`" if layout.method == "fp8_block" else f"`{TENSOR_SCALE}`/`{INPUT_SCALE}`"


def _check_scale(weights: WeightStore, weight: str, scale: str, shapes: set[tuple[int, ...]], why: str) -> None:
    if scale not in weights:
        raise CheckpointError(f"{weights.file_of(weight)}: e4m3 weight `{weight}` has no scale `{scale}`; "
                              "re-export the checkpoint.")
    found = weights.shape(scale)
    if found not in shapes:
        raise CheckpointError(f"{weights.file_of(scale)}: scale `{scale}` has shape {list(found)}, expected "
                              f"{list(min(shapes, key=len))} ({why}); re-export the checkpoint.")
    if weights.dtype(scale) not in ("F32", "BF16", "F16"):
        raise CheckpointError(f"{weights.file_of(scale)}: scale `{scale}` has dtype {weights.dtype(scale)}; "
                              "expected F32. Re-export the checkpoint.")
    values = weights.get(scale, torch.float32)
    if not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
        raise CheckpointError(f"{weights.file_of(scale)}: scale `{scale}` holds non-finite or non-positive values; "
                              "expected finite positive scales. Re-export the checkpoint.")
