"""Tiny (Qwen3 target, DSpark draft) pairs in the real on-disk formats.

:func:`trained_tiny_pair` is the pair shipped inside the package (the CLI demo's): trained by
``examples/tiny_pair/train.py --preset cpu`` on the Python standard library, with its tokenizer, so drafts are
accepted and text comes out. :func:`make_tiny_pair` writes a random pair of any shape (the test suite's
fixture). Only JSON and safetensors are
written (no ``transformers`` import); the target directory is a genuine Hugging Face ``Qwen3ForCausalLM``
checkpoint and the draft matches what DeepSpec's ``Qwen3DSparkModel.save_pretrained`` writes (the golden
``draft/config.json`` shows the field set).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from dspark_compile.checkpoint.load import SAFETENSORS_FILE, SAFETENSORS_INDEX
from dspark_compile.checkpoint.names import LAYER_PARTS, draft_weight_name, target_weight_name
from dspark_compile.config import MARKOV_HEAD_TYPES

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


def make_tiny_pair(
    out_dir: str | Path,
    *,
    vocab_size: int = 384,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    draft_layers: int = 2,
    block_size: int = 7,
    target_layer_ids: tuple[int, ...] = (0, 1, 2),
    markov_rank: int = 16,
    markov_head_type: str = "vanilla",
    confidence_head: bool = True,
    confidence_with_markov: bool = True,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    rope_spelling: Literal["parameters", "theta"] = "parameters",
    sharded: bool = False,
) -> tuple[Path, Path]:
    """Write ``out_dir/target`` and ``out_dir/draft``; return their paths.

    Target weights are N(0, 0.02) with norm weights 1 + small noise (the golden recipe); draft weights are
    N(0, 0.05) so that drafted tokens and confidences vary, and the draft's ``embed_tokens``/``lm_head`` are
    copies of the target's. ``markov_rank=0`` gives a draft without a Markov head (its confidence head then
    reads the hidden state only). ``rope_spelling="theta"`` writes the ``rope_theta``/``torch_dtype``
    spelling of the released Qwen3 configs instead of transformers 5's ``rope_parameters``/``dtype``.
    ``sharded`` splits each weight file in two shards plus an index. Weight files already in the
    directories are replaced.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    if markov_rank > 0 and markov_head_type not in MARKOV_HEAD_TYPES:
        raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {markov_head_type!r}")
    out = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    target_config = _qwen3_config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings, dtype=dtype, rope_spelling=rope_spelling,
    )
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim

    def layer(name: str, i: int) -> dict[str, torch.Tensor]:
        return _random_layer(name, i, gen, hidden_size, intermediate_size, q_size, kv_size, head_dim)

    target: dict[str, torch.Tensor] = {
        target_weight_name("embed_tokens"): _normal(gen, (vocab_size, hidden_size), TARGET_STD),
        target_weight_name("norm"): _norm(gen, hidden_size),
    }
    if not tie_word_embeddings:
        target[target_weight_name("lm_head")] = _normal(gen, (vocab_size, hidden_size), TARGET_STD)
    for i in range(num_layers):
        target.update(layer("target", i))
    lm_head = target.get(target_weight_name("lm_head"), target[target_weight_name("embed_tokens")])

    draft: dict[str, torch.Tensor] = {
        draft_weight_name("embed_tokens"): target[target_weight_name("embed_tokens")].clone(),
        draft_weight_name("lm_head"): lm_head.clone(),
        draft_weight_name("fc"): _normal(gen, (hidden_size, len(target_layer_ids) * hidden_size), DRAFT_STD),
        draft_weight_name("hidden_norm"): _norm(gen, hidden_size),
        draft_weight_name("norm"): _norm(gen, hidden_size),
    }
    for i in range(draft_layers):
        draft.update(layer("draft", i))
    r = markov_rank
    confidence_with_markov = confidence_with_markov and r > 0
    if r > 0:
        draft[draft_weight_name("markov_w1")] = _normal(gen, (vocab_size, r), MARKOV_STD)
        draft[draft_weight_name("markov_w2")] = _normal(gen, (vocab_size, r), MARKOV_STD)
        if markov_head_type == "gated":
            draft[draft_weight_name("markov_gate")] = _normal(gen, (r, hidden_size + r), DRAFT_STD)
            draft[draft_weight_name("markov_gate", suffix="bias")] = _normal(gen, (r,), DRAFT_STD)
        elif markov_head_type == "rnn":
            draft[draft_weight_name("markov_joint")] = _normal(gen, (3 * r, 2 * r + hidden_size), DRAFT_STD)
            draft[draft_weight_name("markov_joint", suffix="bias")] = _normal(gen, (3 * r,), DRAFT_STD)
    if confidence_head:
        width = hidden_size + r if confidence_with_markov else hidden_size
        draft[draft_weight_name("confidence")] = _normal(gen, (1, width), DRAFT_STD)
        draft[draft_weight_name("confidence", suffix="bias")] = _normal(gen, (1,), DRAFT_STD)

    draft_config = {
        **target_config,
        "architectures": ["Qwen3DSparkModel"],
        "num_hidden_layers": draft_layers,
        "num_target_layers": num_layers,
        "block_size": block_size,
        "target_layer_ids": list(target_layer_ids),
        "mask_token_id": vocab_size - 1,
        "num_anchors": 8,
        "markov_rank": r,
        "enable_confidence_head": confidence_head,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * draft_layers,
    }
    if r > 0:
        draft_config["markov_head_type"] = markov_head_type
    if confidence_head:
        draft_config["confidence_head_with_markov"] = confidence_with_markov

    target_dir, draft_dir = out / "target", out / "draft"
    _write_checkpoint(target_dir, target_config, target, dtype, sharded)
    _write_json(target_dir / "generation_config.json", {"_from_model_config": True, "use_cache": True})
    _write_checkpoint(draft_dir, draft_config, draft, dtype, sharded)
    return target_dir, draft_dir


def _qwen3_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                  num_heads: int, num_kv_heads: int, head_dim: int, tie_word_embeddings: bool,
                  dtype: torch.dtype, rope_spelling: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": None,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": TARGET_STD,
        "intermediate_size": intermediate_size,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 512,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pad_token_id": None,
        "rms_norm_eps": 1e-6,
        "sliding_window": None,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
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


def _random_layer(role: str, i: int, gen: torch.Generator, hidden: int, inter: int, q_size: int,
                  kv_size: int, head_dim: int) -> dict[str, torch.Tensor]:
    name = target_weight_name if role == "target" else draft_weight_name
    std = TARGET_STD if role == "target" else DRAFT_STD
    shapes = {
        "q_proj": (q_size, hidden), "k_proj": (kv_size, hidden), "v_proj": (kv_size, hidden),
        "o_proj": (hidden, q_size), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    norms = {"q_norm": head_dim, "k_norm": head_dim,
             "input_layernorm": hidden, "post_attention_layernorm": hidden}
    tensors = {}
    for kind in LAYER_PARTS:
        if kind in shapes:
            tensors[name(kind, i)] = _normal(gen, shapes[kind], std)
        else:
            tensors[name(kind, i)] = _norm(gen, norms[kind])
    return tensors


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _norm(gen: torch.Generator, size: int) -> torch.Tensor:
    return 1.0 + torch.randn((size,), generator=gen) * NORM_NOISE


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
