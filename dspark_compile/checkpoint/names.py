"""Tensor names and shapes of the two checkpoint formats, derived from their configs.

Target: Hugging Face ``Qwen3ForCausalLM`` (``model.layers.{i}.…``). Draft: DeepSpec ``Qwen3DSparkModel``
(``layers.{i}.…`` plus ``fc``, ``hidden_norm``, ``markov_head.*``, ``confidence_head.proj``), checked
against the golden checkpoints in ``tests/data/golden`` and DeepSpec's ``markov_head.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dspark_compile.config import DraftConfig, TargetConfig

LAYER_PARTS: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}
"""Per-layer module paths, shared by the target (``model.layers.{i}.…``) and the draft (``layers.{i}.…``)."""

TARGET_GLOBALS: dict[str, str] = {
    "embed_tokens": "model.embed_tokens",
    "norm": "model.norm",
    "lm_head": "lm_head",
}

DRAFT_GLOBALS: dict[str, str] = {
    "embed_tokens": "embed_tokens",
    "lm_head": "lm_head",
    "norm": "norm",
    "fc": "fc",
    "hidden_norm": "hidden_norm",
    "markov_w1": "markov_head.markov_w1",
    "markov_w2": "markov_head.markov_w2",
    "markov_gate": "markov_head.gate_proj",
    "markov_joint": "markov_head.joint_proj",
    "confidence": "confidence_head.proj",
}


@dataclass(frozen=True)
class TensorSpec:
    """The shape a tensor must have, how it follows from the config, and whether it may be absent."""

    shape: tuple[int, ...]
    why: str
    required: bool = True


def target_weight_name(kind: str, layer: int | None = None, *, suffix: str = "weight") -> str:
    """Hugging Face Qwen3 tensor name.

    ``target_weight_name("q_proj", 3)`` → ``model.layers.3.self_attn.q_proj.weight``;
    ``target_weight_name("embed_tokens")`` → ``model.embed_tokens.weight``.
    """
    return _name(kind, layer, suffix, TARGET_GLOBALS, "model.layers")


def draft_weight_name(kind: str, layer: int | None = None, *, suffix: str = "weight") -> str:
    """DeepSpec DSpark tensor name.

    ``draft_weight_name("q_proj", 0)`` → ``layers.0.self_attn.q_proj.weight``;
    ``draft_weight_name("markov_gate", suffix="bias")`` → ``markov_head.gate_proj.bias``.
    """
    return _name(kind, layer, suffix, DRAFT_GLOBALS, "layers")


def _name(kind: str, layer: int | None, suffix: str, globals_: dict[str, str], layers: str) -> str:
    if kind in LAYER_PARTS:
        if layer is None:
            raise ValueError(f"tensor kind {kind!r} is per layer; pass layer=")
        return f"{layers}.{layer}.{LAYER_PARTS[kind]}.{suffix}"
    if kind in globals_:
        if layer is not None:
            raise ValueError(f"tensor kind {kind!r} is not per layer")
        return f"{globals_[kind]}.{suffix}"
    raise ValueError(f"unknown tensor kind {kind!r}; expected one of {sorted({*LAYER_PARTS, *globals_})}")


def target_tensor_specs(cfg: TargetConfig) -> dict[str, TensorSpec]:
    """Every tensor a Qwen3 target with this config holds (``lm_head`` optional when embeddings are tied)."""
    v, h = cfg.vocab_size, cfg.hidden_size
    specs = {
        target_weight_name("embed_tokens"): TensorSpec((v, h), "[vocab_size, hidden_size]"),
        target_weight_name("norm"): TensorSpec((h,), "[hidden_size]"),
        target_weight_name("lm_head"): TensorSpec((v, h), "[vocab_size, hidden_size]",
                                                  required=not cfg.tie_word_embeddings),
    }
    for layer in range(cfg.num_hidden_layers):
        specs.update(_layer_specs(cfg, layer, target_weight_name))
    return specs


def draft_tensor_specs(cfg: DraftConfig) -> dict[str, TensorSpec]:
    """Every tensor a DSpark draft with this config holds (DSPARK.md §2-3).

    ``embed_tokens``/``lm_head`` are optional: they are frozen copies of the target's, and the compiled
    graph uses the target's.
    """
    base = cfg.base
    v, h, r = base.vocab_size, base.hidden_size, cfg.markov_rank
    specs = {
        draft_weight_name("embed_tokens"): TensorSpec((v, h), "[vocab_size, hidden_size]", required=False),
        draft_weight_name("lm_head"): TensorSpec((v, h), "[vocab_size, hidden_size]", required=False),
        draft_weight_name("norm"): TensorSpec((h,), "[hidden_size]"),
        draft_weight_name("hidden_norm"): TensorSpec((h,), "[hidden_size]"),
        draft_weight_name("fc"): TensorSpec(
            (h, cfg.num_taps * h), f"[hidden_size, len(target_layer_ids)={cfg.num_taps} * hidden_size]"),
    }
    for layer in range(base.num_hidden_layers):
        specs.update(_layer_specs(base, layer, draft_weight_name))
    if r > 0:
        specs[draft_weight_name("markov_w1")] = TensorSpec((v, r), f"[vocab_size, markov_rank={r}]")
        specs[draft_weight_name("markov_w2")] = TensorSpec((v, r), f"[vocab_size, markov_rank={r}]")
        if cfg.markov_head_type == "gated":
            specs[draft_weight_name("markov_gate")] = TensorSpec(
                (r, h + r), f"[markov_rank={r}, hidden_size + markov_rank] (gated Markov head)")
            specs[draft_weight_name("markov_gate", suffix="bias")] = TensorSpec(
                (r,), f"[markov_rank={r}] (gated Markov head)")
        elif cfg.markov_head_type == "rnn":
            specs[draft_weight_name("markov_joint")] = TensorSpec(
                (3 * r, 2 * r + h),
                f"[3*markov_rank, 2*markov_rank + hidden_size] with markov_rank={r} (rnn head)")
            specs[draft_weight_name("markov_joint", suffix="bias")] = TensorSpec(
                (3 * r,), f"[3*markov_rank] with markov_rank={r} (rnn head)")
    if cfg.enable_confidence_head:
        width = h + r if cfg.confidence_head_with_markov else h
        why = (f"[1, hidden_size + markov_rank={r}] (confidence_head_with_markov)"
               if cfg.confidence_head_with_markov else "[1, hidden_size]")
        specs[draft_weight_name("confidence")] = TensorSpec((1, width), why)
        specs[draft_weight_name("confidence", suffix="bias")] = TensorSpec((1,), "[1]")
    return specs


def _layer_specs(cfg: TargetConfig, layer: int, name: Callable[..., str]) -> dict[str, TensorSpec]:
    h, q, kv, d, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.head_dim, cfg.intermediate_size
    specs = {
        name("q_proj", layer): TensorSpec((q, h), "[num_attention_heads*head_dim, hidden_size]"),
        name("k_proj", layer): TensorSpec((kv, h), "[num_key_value_heads*head_dim, hidden_size]"),
        name("v_proj", layer): TensorSpec((kv, h), "[num_key_value_heads*head_dim, hidden_size]"),
        name("o_proj", layer): TensorSpec((h, q), "[hidden_size, num_attention_heads*head_dim]"),
        name("q_norm", layer): TensorSpec((d,), "[head_dim]"),
        name("k_norm", layer): TensorSpec((d,), "[head_dim]"),
        name("gate_proj", layer): TensorSpec((inter, h), "[intermediate_size, hidden_size]"),
        name("up_proj", layer): TensorSpec((inter, h), "[intermediate_size, hidden_size]"),
        name("down_proj", layer): TensorSpec((h, inter), "[hidden_size, intermediate_size]"),
        name("input_layernorm", layer): TensorSpec((h,), "[hidden_size]"),
        name("post_attention_layernorm", layer): TensorSpec((h,), "[hidden_size]"),
    }
    if cfg.attention_bias:
        for part, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            specs[name(part, layer, suffix="bias")] = TensorSpec(
                (size,), f"[{part} output size] (attention_bias)")
    return specs
