"""Tiny (Qwen3 target, DSpark draft) pairs in the real on-disk formats (JSON and safetensors only).

:func:`trained_tiny_pair` is the pair shipped inside the package (the demo's, trained by
``examples/tiny_pair/train.py --preset cpu``); :func:`make_tiny_pair` writes a random pair of any shape (the
tests' fixture) as a Hugging Face ``Qwen3ForCausalLM`` and what DeepSpec's ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from dspark_compile.checkpoint.load import SAFETENSORS_FILE, SAFETENSORS_INDEX
from dspark_compile.checkpoint.names import (
    WeightSpec,
    draft_weight_name,
    draft_weight_specs,
    target_weight_name,
    target_weight_specs,
)
from dspark_compile.model_config import MARKOV_HEAD_TYPES, parse_draft_config, parse_target_config

TARGET_STD = 0.02
DRAFT_STD = 0.05
MARKOV_STD = 0.2  # large enough that the Markov bias changes which token wins
NORM_NOISE = 0.02
ROPE_THETA = 10000.0

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

TRAINED_PAIR = Path(__file__).with_name("tiny_pair")  # target/, draft/, train_log.json (package data)


def trained_tiny_pair(copy_to: str | Path | None = None) -> tuple[Path, Path]:
    """(target, draft) directories of the shipped trained pair; copied under ``copy_to`` when given."""
    from dspark_compile.errors import CheckpointError

    if not (TRAINED_PAIR / "target" / "config.json").is_file():
        raise CheckpointError(f"{TRAINED_PAIR}: the shipped tiny pair is missing; reinstall dspark-compile (it is "
                              "package data) or train one with examples/tiny_pair/train.py --preset cpu")
    root = TRAINED_PAIR
    if copy_to is not None:
        root = Path(copy_to)
        for part in ("target", "draft"):
            shutil.copytree(TRAINED_PAIR / part, root / part, dirs_exist_ok=True)
    return root / "target", root / "draft"


def make_tiny_pair(out_dir: str | Path, *, vocab_size: int = 384, hidden_size: int = 64, intermediate_size: int = 128,
                   num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                   draft_layers: int = 2, block_size: int = 7, target_layer_ids: tuple[int, ...] = (0, 1, 2),
                   markov_rank: int = 16, markov_head_type: str = "vanilla", confidence_head: bool = True,
                   confidence_with_markov: bool = True, tie_word_embeddings: bool = False,
                   dtype: torch.dtype = torch.float32, seed: int = 0,
                   rope_spelling: Literal["parameters", "theta"] = "parameters",
                   sharded: bool = False) -> tuple[Path, Path]:
    """Write ``out_dir/target`` and ``out_dir/draft`` (replacing their weights); return their paths.

    Target weights follow the golden recipe; draft weights are wider so drafts and confidences vary.
    ``rope_spelling="theta"``: the released Qwen3 configs' ``rope_theta``/``torch_dtype`` spelling.
    ``sharded``: two shards and an index per checkpoint.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    if markov_rank > 0 and markov_head_type not in MARKOV_HEAD_TYPES:
        raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {markov_head_type!r}")
    out = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    target_config = _qwen3_config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                  num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                  head_dim=head_dim, tie_word_embeddings=tie_word_embeddings, dtype=dtype,
                                  rope_spelling=rope_spelling)
    draft_config = {
        **target_config,
        "architectures": ["Qwen3DSparkModel"],
        "num_hidden_layers": draft_layers,
        "num_target_layers": num_layers,
        "block_size": block_size,
        "target_layer_ids": list(target_layer_ids),
        "mask_token_id": vocab_size - 1,
        "num_anchors": 8,
        "markov_rank": markov_rank,
        "enable_confidence_head": confidence_head,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * draft_layers,
    }
    confidence_with_markov = confidence_with_markov and markov_rank > 0
    if markov_rank > 0:
        draft_config["markov_head_type"] = markov_head_type
    if confidence_head:
        draft_config["confidence_head_with_markov"] = confidence_with_markov
    # Every tensor the configs call for (checkpoint/names.py), drawn in that order; the draft's embedding and LM
    # head are copies of the target's.
    target = draw_weights(target_weight_specs(parse_target_config(target_config, out)), gen, TARGET_STD)
    embed = target[target_weight_name("embed_tokens")]
    draft = {draft_weight_name("embed_tokens"): embed.clone(),
             draft_weight_name("lm_head"): target.get(target_weight_name("lm_head"), embed).clone(),
             **draw_weights(draft_weight_specs(parse_draft_config(draft_config, out)), gen, DRAFT_STD)}

    target_dir, draft_dir = out / "target", out / "draft"
    _write_checkpoint(target_dir, target_config, target, dtype, sharded)
    _write_json(target_dir / "generation_config.json", {"_from_model_config": True, "use_cache": True})
    _write_checkpoint(draft_dir, draft_config, draft, dtype, sharded)
    return target_dir, draft_dir


def _qwen3_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                  num_heads: int, num_kv_heads: int, head_dim: int, tie_word_embeddings: bool,
                  dtype: torch.dtype, rope_spelling: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": tie_word_embeddings, "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 512, "max_window_layers": 28, "sliding_window": None, "use_sliding_window": False,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "initializer_range": TARGET_STD,
        "use_cache": True,
    }
    if rope_spelling == "parameters":
        config["rope_parameters"] = {"rope_theta": ROPE_THETA, "rope_type": "default"}
        config["dtype"] = _DTYPE_NAMES[dtype]
    elif rope_spelling == "theta":
        config["rope_theta"] = ROPE_THETA
        config["rope_scaling"] = None
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
    else:
        raise ValueError(f"rope_spelling must be 'parameters' or 'theta', got {rope_spelling!r}")
    return config


def draw_weights(specs: dict[str, WeightSpec], gen: torch.Generator, std: float,
                 norm_noise: float = NORM_NOISE) -> dict[str, torch.Tensor]:
    """Random tensors of the required ``specs``, in their order: norm scales 1 + norm_noise N(0, 1),
    ``layer_scalar`` in [0.6, 1.4], Markov tables N(0, MARKOV_STD), the rest N(0, std)."""
    out = {}
    for name, spec in ((n, s) for n, s in specs.items() if s.required):
        if name.endswith("layer_scalar"):
            out[name] = 0.6 + 0.8 * torch.rand(spec.shape, generator=gen)
        elif name.endswith("norm.weight"):
            out[name] = 1.0 + norm_noise * torch.randn(spec.shape, generator=gen)
        else:
            out[name] = (MARKOV_STD if name.startswith("markov_head.markov_w") else std) * torch.randn(
                spec.shape, generator=gen)
    return out


def _write_checkpoint(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                      dtype: torch.dtype, sharded: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model*.safetensors"), directory / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)
    _write_json(directory / "config.json", config)
    tensors = {name: t.to(dtype).contiguous() for name, t in sorted(tensors.items())}
    metadata = {"format": "pt"}
    if not sharded:
        save_file(tensors, str(directory / SAFETENSORS_FILE), metadata=metadata)
        return
    names = list(tensors)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map = {}
    for k, part in enumerate(halves, start=1):
        shard = f"model-{k:05d}-of-{len(halves):05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / shard), metadata=metadata)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
