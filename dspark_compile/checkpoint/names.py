"""Tensor names and shapes of the two checkpoint formats, derived from their configs, per model family.

Target: Hugging Face ``Qwen3ForCausalLM`` / Gemma4 (``model.language_model.`` inside a multimodal checkpoint,
whose vision/audio tensors are ignored). Draft: DeepSpec ``Qwen3DSparkModel`` / ``Gemma4DSparkModel``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark_compile.model_config import DraftConfig, Gemma4Config, TargetConfig

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
class WeightSpec:
    """The shape a tensor must have, how it follows from the config, and whether it may be absent."""

    shape: tuple[int, ...]
    why: str
    required: bool = True


def target_weight_name(kind: str, layer: int | None = None, *, suffix: str = "weight",
                       prefix: str = "model.") -> str:
    """Hugging Face target tensor name, e.g. ``("q_proj", 3)`` → ``model.layers.3.self_attn.q_proj.weight``
    (``prefix``: the config's ``weight_prefix``; ``lm_head`` has none)."""
    name = _name(kind, layer, suffix, TARGET_GLOBALS, "model.layers")
    return name if kind == "lm_head" else prefix + name.removeprefix("model.")


def draft_weight_name(kind: str, layer: int | None = None, *, suffix: str = "weight") -> str:
    """DeepSpec DSpark tensor name, e.g. ``("markov_gate", suffix="bias")`` → ``markov_head.gate_proj.bias``."""
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


def target_weight_specs(cfg: TargetConfig) -> dict[str, WeightSpec]:
    """Every tensor a target with this config holds (``lm_head`` optional when embeddings are tied)."""
    v, h, prefix = cfg.vocab_size, cfg.hidden_size, cfg.weight_prefix
    specs = {
        target_weight_name("embed_tokens", prefix=prefix): WeightSpec((v, h), "[vocab_size, hidden_size]"),
        target_weight_name("norm", prefix=prefix): WeightSpec((h,), "[hidden_size]"),
        target_weight_name("lm_head"): WeightSpec((v, h), "[vocab_size, hidden_size]",
                                                  required=not cfg.tie_word_embeddings),
    }
    if isinstance(cfg, Gemma4Config) and cfg.hidden_size_per_layer_input:
        p, n = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
        specs |= {
            f"{prefix}embed_tokens_per_layer.weight": WeightSpec(
                (cfg.vocab_size_per_layer_input, n * p),
                "[vocab_size_per_layer_input, num_hidden_layers * hidden_size_per_layer_input]"),
            f"{prefix}per_layer_model_projection.weight": WeightSpec(
                (n * p, h), "[num_hidden_layers * hidden_size_per_layer_input, hidden_size]"),
            f"{prefix}per_layer_projection_norm.weight": WeightSpec((p,), "[hidden_size_per_layer_input]"),
        }
    for layer in range(cfg.num_hidden_layers):
        specs.update(_layer_specs(cfg, f"{prefix}layers.{layer}.", layer))
    return specs


def target_ignores(cfg: TargetConfig, name: str) -> bool:
    """Tensors of a multimodal checkpoint outside its text decoder (vision/audio towers), which we never read."""
    return cfg.weight_prefix != "model." and not name.startswith(cfg.weight_prefix) and name != "lm_head.weight"


def _gemma4_layer_specs(cfg: Gemma4Config, at: str, layer: int) -> dict[str, WeightSpec]:
    """One Gemma4 layer (``at`` = its name prefix): its head shape depends on its layer type."""
    h, n, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    kv, d = cfg.attention_shape(layer)
    kind = f"{cfg.layer_types[layer]} layer"
    dims = "global_head_dim" if not cfg.is_sliding(layer) else "head_dim"
    specs = {
        f"{at}self_attn.q_proj.weight": WeightSpec((n * d, h), f"[num_attention_heads*{dims}, hidden_size] ({kind})"),
        f"{at}self_attn.k_proj.weight": WeightSpec((kv * d, h), f"[kv_heads*{dims}, hidden_size] ({kind})"),
        f"{at}self_attn.o_proj.weight": WeightSpec((h, n * d), f"[hidden_size, num_attention_heads*{dims}] ({kind})"),
        f"{at}self_attn.q_norm.weight": WeightSpec((d,), f"[{dims}] ({kind})"),
        f"{at}self_attn.k_norm.weight": WeightSpec((d,), f"[{dims}] ({kind})"),
        f"{at}mlp.gate_proj.weight": WeightSpec((inter, h), "[intermediate_size, hidden_size]"),
        f"{at}mlp.up_proj.weight": WeightSpec((inter, h), "[intermediate_size, hidden_size]"),
        f"{at}mlp.down_proj.weight": WeightSpec((h, inter), "[hidden_size, intermediate_size]"),
        f"{at}layer_scalar": WeightSpec((1,), "[1] (layer_scalar)"),
    }
    if not cfg.shares_kv(layer):
        specs[f"{at}self_attn.v_proj.weight"] = WeightSpec((kv * d, h), f"[kv_heads*{dims}, hidden_size] ({kind})")
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        specs[f"{at}{norm}.weight"] = WeightSpec((h,), "[hidden_size]")
    if p := cfg.hidden_size_per_layer_input:
        specs[f"{at}per_layer_input_gate.weight"] = WeightSpec((p, h), "[hidden_size_per_layer_input, hidden_size]")
        specs[f"{at}per_layer_projection.weight"] = WeightSpec((h, p), "[hidden_size, hidden_size_per_layer_input]")
        specs[f"{at}post_per_layer_input_norm.weight"] = WeightSpec((h,), "[hidden_size]")
    return specs


def draft_weight_specs(cfg: DraftConfig) -> dict[str, WeightSpec]:
    """Every tensor a DSpark draft with this config holds (DSPARK.md §2-3); ``embed_tokens``/``lm_head`` are
    optional, frozen copies of the target's (the compiled graph uses the target's)."""
    base = cfg.base
    v, h, r = base.vocab_size, base.hidden_size, cfg.markov_rank
    specs = {
        draft_weight_name("embed_tokens"): WeightSpec((v, h), "[vocab_size, hidden_size]", required=False),
        draft_weight_name("lm_head"): WeightSpec((v, h), "[vocab_size, hidden_size]", required=False),
        draft_weight_name("fc"): WeightSpec(
            (h, cfg.num_taps * h), f"[hidden_size, len(target_layer_ids)={cfg.num_taps} * hidden_size]"),
        draft_weight_name("hidden_norm"): WeightSpec((h,), "[hidden_size]"),
        draft_weight_name("norm"): WeightSpec((h,), "[hidden_size]"),
    }
    for layer in range(base.num_hidden_layers):
        specs.update(_layer_specs(base, f"layers.{layer}.", layer))
    if r > 0:
        specs[draft_weight_name("markov_w1")] = WeightSpec((v, r), f"[vocab_size, markov_rank={r}]")
        specs[draft_weight_name("markov_w2")] = WeightSpec((v, r), f"[vocab_size, markov_rank={r}]")
        if cfg.markov_head_type == "gated":
            specs[draft_weight_name("markov_gate")] = WeightSpec(
                (r, h + r), f"[markov_rank={r}, hidden_size + markov_rank] (gated Markov head)")
            specs[draft_weight_name("markov_gate", suffix="bias")] = WeightSpec(
                (r,), f"[markov_rank={r}] (gated Markov head)")
        elif cfg.markov_head_type == "rnn":
            specs[draft_weight_name("markov_joint")] = WeightSpec(
                (3 * r, 2 * r + h),
                f"[3*markov_rank, 2*markov_rank + hidden_size] with markov_rank={r} (rnn head)")
            specs[draft_weight_name("markov_joint", suffix="bias")] = WeightSpec(
                (3 * r,), f"[3*markov_rank] with markov_rank={r} (rnn head)")
    if cfg.enable_confidence_head:
        width = h + r if cfg.confidence_head_with_markov else h
        why = (f"[1, hidden_size + markov_rank={r}] (confidence_head_with_markov)"
               if cfg.confidence_head_with_markov else "[1, hidden_size]")
        specs[draft_weight_name("confidence")] = WeightSpec((1, width), why)
        specs[draft_weight_name("confidence", suffix="bias")] = WeightSpec((1,), "[1]")
    return specs


def _layer_specs(cfg: TargetConfig, at: str, layer: int) -> dict[str, WeightSpec]:
    """One decoder layer of the config's family (``at``: the layer's name prefix), target and draft alike."""
    if isinstance(cfg, Gemma4Config):
        return _gemma4_layer_specs(cfg, at, layer)
    h, q, kv, d, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.head_dim, cfg.intermediate_size
    shapes = {  # in LAYER_PARTS order
        "q_proj": ((q, h), "[num_attention_heads*head_dim, hidden_size]"),
        "k_proj": ((kv, h), "[num_key_value_heads*head_dim, hidden_size]"),
        "v_proj": ((kv, h), "[num_key_value_heads*head_dim, hidden_size]"),
        "o_proj": ((h, q), "[hidden_size, num_attention_heads*head_dim]"),
        "q_norm": ((d,), "[head_dim]"), "k_norm": ((d,), "[head_dim]"),
        "gate_proj": ((inter, h), "[intermediate_size, hidden_size]"),
        "up_proj": ((inter, h), "[intermediate_size, hidden_size]"),
        "down_proj": ((h, inter), "[hidden_size, intermediate_size]"),
        "input_layernorm": ((h,), "[hidden_size]"), "post_attention_layernorm": ((h,), "[hidden_size]"),
    }
    specs = {f"{at}{LAYER_PARTS[kind]}.weight": WeightSpec(*shape) for kind, shape in shapes.items()}
    if cfg.attention_bias:
        for part, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            specs[f"{at}{LAYER_PARTS[part]}.bias"] = WeightSpec((size,), f"[{part} output size] (attention_bias)")
    return specs
