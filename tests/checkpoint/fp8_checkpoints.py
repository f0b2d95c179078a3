"""Write the two pre-quantized FP8 layouts of a full-precision tiny target (tests only)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(tuple(f"{p}.weight" for p in LINEARS))


def _e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def write_fp8_target(src: Path, dst: Path, layout: str, *, block: tuple[int, int] = (128, 128),
                     input_scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Copy ``src`` to ``dst`` with every decoder linear weight in e4m3: ``layout`` "hf_block" (HF fine-grained,
    ``weight_scale_inv`` per block) or "modelopt" (per-tensor ``weight_scale`` + ``input_scale``, with
    hf_quant_config.json). Returns the dequantized weights (float32) by name."""
    shutil.copytree(src, dst)
    tensors = {k: v.float() for k, v in load_file(str(src / "model.safetensors")).items()}
    out, dequantized = dict(tensors), {}
    for name, w in tensors.items():
        if not _is_linear(name):
            continue
        prefix = name.removesuffix(".weight")
        if layout == "hf_block":
            rows, cols = (math.ceil(d / b) for d, b in zip(w.shape, block, strict=True))
            grid = torch.zeros(rows, cols)
            for i in range(rows):
                for j in range(cols):
                    tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
                    grid[i, j] = tile.abs().max() / FP8_MAX
            full = grid.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
            q = _e4m3(w, full)
            out[name], out[f"{prefix}.weight_scale_inv"] = q, grid
            dequantized[name] = q.float() * full
        else:
            scale = w.abs().max() / FP8_MAX
            q = _e4m3(w, scale)
            out[name], out[f"{prefix}.weight_scale"] = q, scale.reshape(())
            out[f"{prefix}.input_scale"] = torch.tensor(input_scale)
            dequantized[name] = q.float() * scale
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if layout == "hf_block":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(block)}
    else:
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
        (dst / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.31.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized
