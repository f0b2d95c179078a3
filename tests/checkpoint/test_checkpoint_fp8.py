"""Pre-quantized FP8 targets: both layouts load lazily, validate, and run; bad ones are refused (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_compile.checkpoint import load_draft, load_target, validate_pair
from dspark_compile.errors import CheckpointError
from dspark_compile.models.layers import Fp8Linear
from dspark_compile.program import build_program
from tests.checkpoint.fp8_checkpoints import write_fp8_target


@torch.no_grad()
def _logits(target_dir: Path, draft_dir: Path, *, activations: bool = True) -> torch.Tensor:
    program = build_program(target_dir, draft_dir, dtype="fp32")
    if not activations:
        for m in program.target.modules():
            if isinstance(m, Fp8Linear):
                m.input_scale = None
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    hidden, _, _ = program.target(ids, torch.zeros(1, dtype=torch.int64), program.target.new_cache(1, 16))
    return program.target.logits(hidden)


def _plain(src: Path, dst: Path, weights: dict[str, torch.Tensor]) -> Path:
    """``src`` with the given (dequantized) weights: the full-precision model an FP8 checkpoint stands for."""
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors")) | weights
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("block", [(128, 128), (32, 16)])
def test_hf_block_fp8_loads_and_equals_its_dequantized_model(golden_dir: Path, tmp_path: Path,
                                                               block: tuple[int, int]) -> None:
    src = golden_dir / "dspark_tiny" / "target"
    draft = golden_dir / "dspark_tiny" / "draft"
    deq = write_fp8_target(src, tmp_path / "fp8", "hf_block", block=block)
    ckpt = load_target(tmp_path / "fp8")
    assert ckpt.quant is not None and ckpt.quant.layout.method == "fp8_block"
    assert ckpt.quant.layout.block == block and len(ckpt.quant.tensors) == 4 * 7
    assert validate_pair(ckpt, load_draft(draft)) == []
    program = build_program(tmp_path / "fp8", draft, dtype="fp32")
    q_proj = program.target.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Fp8Linear) and q_proj.weight.dtype == torch.float8_e4m3fn
    assert not isinstance(program.target.lm_head, Fp8Linear)
    expected = _logits(_plain(src, tmp_path / "plain", deq), draft)
    torch.testing.assert_close(_logits(tmp_path / "fp8", draft), expected, rtol=0, atol=1e-5)


def test_modelopt_fp8_loads_with_input_scales(golden_dir: Path, tmp_path: Path) -> None:
    src = golden_dir / "dspark_tiny" / "target"
    draft = golden_dir / "dspark_tiny" / "draft"
    deq = write_fp8_target(src, tmp_path / "fp8", "modelopt", input_scale=0.02)
    ckpt = load_target(tmp_path / "fp8")
    assert ckpt.quant is not None and ckpt.quant.layout.method == "fp8_tensor"
    assert ckpt.quant.layout.activation == "static"
    assert tmp_path / "fp8" / "hf_quant_config.json" in ckpt.files
    assert validate_pair(ckpt, load_draft(draft)) == []
    program = build_program(tmp_path / "fp8", draft, dtype="fp32")
    down = program.target.layers[3].mlp.down_proj
    assert isinstance(down, Fp8Linear) and down.input_scale is not None
    assert float(down.input_scale) == pytest.approx(0.02)
    plain = _logits(_plain(src, tmp_path / "plain", deq), draft)
    torch.testing.assert_close(_logits(tmp_path / "fp8", draft, activations=False), plain, rtol=0, atol=1e-5)
    w8a8 = _logits(tmp_path / "fp8", draft)  # activations quantized too: close, not equal
    assert not torch.equal(w8a8, plain)
    assert torch.nn.functional.cosine_similarity(w8a8.flatten(), plain.flatten(), dim=0) > 0.95


def _damage(directory: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


SCALE = "model.layers.1.mlp.up_proj.weight_scale_inv"


@pytest.mark.parametrize(("case", "match"), [
    ("nan_scale", "non-finite or non-positive"),
    ("zero_scale", "non-finite or non-positive"),
    ("scale_shape", "has shape \\[2, 1\\], expected \\[1, 1\\]"),
    ("missing_scale", "has no scale"),
    ("method", "'gptq', which dspark-compile does not read"),
    ("fmt", "only e4m3"),
    ("no_config", "no `quantization_config`"),
])
def test_bad_hf_block_checkpoints_are_refused(golden_dir: Path, tmp_path: Path, case: str, match: str) -> None:
    d = tmp_path / "fp8"
    write_fp8_target(golden_dir / "dspark_tiny" / "target", d, "hf_block")
    config = json.loads((d / "config.json").read_text())
    if case == "nan_scale":
        _damage(d, lambda t: t.__setitem__(SCALE, torch.tensor([[float("nan")]])))
    elif case == "zero_scale":
        _damage(d, lambda t: t.__setitem__(SCALE, torch.zeros(1, 1)))
    elif case == "scale_shape":
        _damage(d, lambda t: t.__setitem__(SCALE, torch.ones(2, 1)))
    elif case == "missing_scale":
        _damage(d, lambda t: t.pop(SCALE))
    elif case == "method":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    elif case == "fmt":
        config["quantization_config"]["fmt"] = "e5m2"
    elif case == "no_config":
        del config["quantization_config"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_target(d, allow_nonfinite=True)


def test_modelopt_unsupported_algo_exits_2(golden_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "fp8"
    write_fp8_target(golden_dir / "dspark_tiny" / "target", d, "modelopt")
    (d / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                         "quantization": {"quant_algo": "NVFP4"}}))
    proc = subprocess.run([sys.executable, "-m", "dspark_compile.cli", "inspect", str(d),
                           str(golden_dir / "dspark_tiny" / "draft")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "`quant_algo` is 'NVFP4'" in lines[0] and "hf_quant_config.json" in lines[0]
