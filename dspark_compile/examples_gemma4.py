"""Tiny random (Gemma4 target, Gemma4 DSpark draft) pairs in the real on-disk formats (``make_tiny_pair(family=
"gemma4")``): a ``Gemma4ForCausalLM`` text checkpoint as transformers 5.10 writes it (``global_head_dim``,
``num_global_key_value_heads``) and a draft as DeepSpec's ``Gemma4DSparkModel.save_pretrained`` writes it (the
golden ``dspark_tiny_gemma4`` shows both field sets). Every tensor comes from the checkpoint specs
(checkpoint/names.py), so the writer cannot drift from what loading checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dspark_compile.checkpoint.names import draft_weight_specs, target_weight_specs
from dspark_compile.examples import _DTYPE_NAMES, DRAFT_STD, MARKOV_STD, _write_checkpoint, _write_json
from dspark_compile.model_config import parse_draft_config, parse_target_config

TARGET_STD = 0.15  # the golden recipe: large enough that the scaled, sandwich-normed target does not degenerate
NORM_NOISE = 0.2


def gemma4_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                  num_kv_heads: int, head_dim: int, global_kv_heads: int, global_head_dim: int,
                  sliding_window: int, layer_types: tuple[str, ...], attention_k_eq_v: bool,
                  final_logit_softcapping: float | None, tie_word_embeddings: bool,
                  dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "attention_bias": False,
        "attention_dropout": 0.0, "attention_k_eq_v": attention_k_eq_v, "bos_token_id": None,
        "eos_token_id": None, "pad_token_id": None, "dtype": _DTYPE_NAMES[dtype], "enable_moe_block": False,
        "final_logit_softcapping": final_logit_softcapping, "global_head_dim": global_head_dim,
        "head_dim": head_dim, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": hidden_size,
        "hidden_size_per_layer_input": 0, "intermediate_size": intermediate_size, "layer_types": list(layer_types),
        "max_position_embeddings": 512, "num_attention_heads": num_heads,
        "num_global_key_value_heads": global_kv_heads, "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads, "num_kv_shared_layers": 0, "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": sliding_window, "tie_word_embeddings": tie_word_embeddings, "use_cache": True,
        "use_double_wide_mlp": False, "vocab_size": vocab_size, "vocab_size_per_layer_input": vocab_size,
    }


def make_tiny_gemma4_pair(
    out_dir: str | Path, *, vocab_size: int = 384, hidden_size: int = 64, intermediate_size: int = 128,
    num_layers: int = 6, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, global_kv_heads: int = 1,
    global_head_dim: int = 32, sliding_window: int = 16, layer_types: tuple[str, ...] | None = None,
    attention_k_eq_v: bool = True, final_logit_softcapping: float | None = 30.0, draft_layers: int = 2,
    block_size: int = 7, target_layer_ids: tuple[int, ...] = (0, 2, 4), markov_rank: int = 16,
    markov_head_type: str = "vanilla", confidence_head: bool = True, confidence_with_markov: bool = True,
    tie_word_embeddings: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0, sharded: bool = False,
) -> tuple[Path, Path]:
    """Write ``out_dir/target`` and ``out_dir/draft`` (defaults: the golden pair's shapes); return their paths.

    ``layer_types`` defaults to Gemma4's 5 sliding : 1 full pattern with a full last layer.
    """
    out = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    types = layer_types or tuple("full_attention" if (i + 1) % 6 == 0 or i == num_layers - 1 else
                                 "sliding_attention" for i in range(num_layers))
    target_config = gemma4_config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, global_kv_heads=global_kv_heads,
        global_head_dim=global_head_dim, sliding_window=sliding_window, layer_types=types,
        attention_k_eq_v=attention_k_eq_v, final_logit_softcapping=final_logit_softcapping,
        tie_word_embeddings=tie_word_embeddings, dtype=dtype)
    r = markov_rank
    draft_config = {
        **target_config, "architectures": ["Gemma4DSparkModel"], "num_hidden_layers": draft_layers,
        "layer_types": ["full_attention"] * draft_layers, "num_target_layers": num_layers,
        "block_size": block_size, "target_layer_ids": list(target_layer_ids), "mask_token_id": 4,
        "num_anchors": 8, "markov_rank": r, "enable_confidence_head": confidence_head,
        "tie_word_embeddings": False, "target_model_type": "gemma4", "target_text_model_type": "gemma4_text",
    }
    if r > 0:
        draft_config["markov_head_type"] = markov_head_type
    if confidence_head:
        draft_config["confidence_head_with_markov"] = confidence_with_markov and r > 0

    target = _random(target_weight_specs(parse_target_config(target_config, out / "target")), gen, TARGET_STD)
    target["model.norm.weight"] = target["model.norm.weight"] * 4.0  # the golden recipe: peaky logits
    embed = target["model.embed_tokens.weight"]
    draft = _random(draft_weight_specs(parse_draft_config(draft_config, out / "draft")), gen, DRAFT_STD)
    draft["embed_tokens.weight"] = embed.clone()
    draft["lm_head.weight"] = target.get("lm_head.weight", embed).clone()
    target_dir, draft_dir = out / "target", out / "draft"
    _write_checkpoint(target_dir, target_config, target, dtype, sharded)
    _write_json(target_dir / "generation_config.json", {"_from_model_config": True, "use_cache": True})
    _write_checkpoint(draft_dir, draft_config, draft, dtype, sharded)
    return target_dir, draft_dir


def _random(specs: dict[str, Any], gen: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    """Norm scales 1 + 0.2 N(0, 1), ``layer_scalar`` in [0.6, 1.4], Markov tables N(0, 0.2), the rest N(0, std);
    optional tensors (a tied LM head, the draft's copies of the target's) are left out."""
    out = {}
    for name, spec in specs.items():
        if not spec.required:
            continue
        if name.endswith("layer_scalar"):
            out[name] = 0.6 + 0.8 * torch.rand(spec.shape, generator=gen)
        elif name.endswith("norm.weight"):
            out[name] = 1.0 + NORM_NOISE * torch.randn(spec.shape, generator=gen)
        elif name.startswith("markov_head.markov_w"):
            out[name] = MARKOV_STD * torch.randn(spec.shape, generator=gen)
        else:
            out[name] = std * torch.randn(spec.shape, generator=gen)
    return out
