"""Typed views of the two checkpoint configs (Hugging Face Qwen3 target, DeepSpec DSpark draft).

Only the fields the compiler uses are kept; parsing normalises the spellings found in the wild (``rope_theta``
+ ``rope_scaling`` of the released Qwen3 configs, ``rope_parameters`` of transformers 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark_compile.errors import CheckpointError

SUPPORTED_TARGET_ARCHITECTURES = ("Qwen3ForCausalLM",)
SUPPORTED_DRAFT_ARCHITECTURES = ("Qwen3DSparkModel",)
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
SUPPORTED_ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0


@dataclass(frozen=True)
class TargetConfig:
    """The Qwen3 fields of a target (and of a draft, which copies them)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    architecture: str = "Qwen3ForCausalLM"
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class DraftConfig:
    """A DSpark draft head: its own Qwen3 layer shapes plus the DSpark fields (DSPARK.md §3)."""

    base: TargetConfig
    block_size: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    mask_token_id: int
    markov_rank: int
    markov_head_type: str | None
    enable_confidence_head: bool
    confidence_head_with_markov: bool
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)


def _need(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in raw:
        raise CheckpointError(f"{path}: field `{key}` is missing; expected a {_kind_name(kind)}. "
                              "Re-export the checkpoint with its original tooling.")
    value = raw[key]
    if isinstance(value, bool) and bool not in _as_tuple(kind):
        raise CheckpointError(f"{path}: field `{key}` must be a {_kind_name(kind)}, found {value!r}.")
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: field `{key}` must be a {_kind_name(kind)}, found {value!r}.")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def parse_rope(raw: dict[str, Any], path: Path) -> RopeConfig:
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta"))
        rope_type = params.get("rope_type", params.get("type", "default"))
        factor = params.get("factor", 1.0)
    else:
        theta = raw.get("rope_theta")
        scaling = raw.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise CheckpointError(f"{path}: field `rope_scaling` must be an object or null, found {scaling!r}.")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        factor = scaling.get("factor", 1.0)
    if theta is None:
        raise CheckpointError(f"{path}: no RoPE base found; expected `rope_theta` or `rope_parameters.rope_theta`.")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise CheckpointError(f"{path}: `rope_theta` must be a positive number, found {theta!r}.")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{path}: RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "use a checkpoint without long-context RoPE scaling."
        )
    return RopeConfig(theta=float(theta), rope_type=str(rope_type), factor=float(factor))


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def parse_target_config(raw: dict[str, Any], path: Path, *, architectures: tuple[str, ...] =
                        SUPPORTED_TARGET_ARCHITECTURES) -> TargetConfig:
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else raw.get("model_type", "<none>")
    if arch not in architectures:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported; expected one of {', '.join(architectures)}."
        )
    hidden = _need(raw, "hidden_size", int, path)
    heads = _need(raw, "num_attention_heads", int, path)
    head_dim = raw.get("head_dim") or (hidden // heads if heads else 0)
    cfg = TargetConfig(
        vocab_size=_need(raw, "vocab_size", int, path),
        hidden_size=hidden,
        intermediate_size=_need(raw, "intermediate_size", int, path),
        num_hidden_layers=_need(raw, "num_hidden_layers", int, path),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=parse_rope(raw, path),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 32768),
        architecture=str(arch),
        eos_token_ids=_eos_ids(raw),
    )
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
        if getattr(cfg, name) <= 0:
            raise CheckpointError(f"{path}: field `{name}` must be positive, found {getattr(cfg, name)}.")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise CheckpointError(
            f"{path}: num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({cfg.num_key_value_heads})."
        )
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{path}: sliding-window attention is not supported; set use_sliding_window=false.")
    return cfg


def parse_draft_config(raw: dict[str, Any], path: Path) -> DraftConfig:
    base = parse_target_config(raw, path, architectures=SUPPORTED_DRAFT_ARCHITECTURES)
    layer_ids = _need(raw, "target_layer_ids", list, path)
    if not layer_ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in layer_ids):
        raise CheckpointError(f"{path}: `target_layer_ids` must be a non-empty list of integers, found {layer_ids!r}.")
    block_size = _need(raw, "block_size", int, path)
    if block_size < 1:
        raise CheckpointError(f"{path}: `block_size` must be >= 1, found {block_size}.")
    markov_rank = int(raw.get("markov_rank", 0) or 0)
    head_type = raw.get("markov_head_type")
    if markov_rank < 0:
        raise CheckpointError(f"{path}: `markov_rank` must be >= 0, found {markov_rank}.")
    if markov_rank > 0:
        head_type = str(head_type).lower() if head_type is not None else None
        if head_type not in MARKOV_HEAD_TYPES:
            raise CheckpointError(
                f"{path}: `markov_head_type` {raw.get('markov_head_type')!r} is not supported; expected one of "
                f"{', '.join(MARKOV_HEAD_TYPES)}."
            )
    else:
        head_type = None
    enable_conf = bool(raw.get("enable_confidence_head", False))
    conf_markov = bool(raw.get("confidence_head_with_markov", False)) and enable_conf
    if conf_markov and markov_rank == 0:
        raise CheckpointError(f"{path}: `confidence_head_with_markov` is true but `markov_rank` is 0.")
    mask = _need(raw, "mask_token_id", int, path)
    known = {"target_layer_ids", "block_size", "markov_rank", "markov_head_type", "enable_confidence_head",
             "confidence_head_with_markov", "mask_token_id", "num_target_layers"}
    return DraftConfig(
        base=base,
        block_size=block_size,
        target_layer_ids=tuple(int(i) for i in layer_ids),
        num_target_layers=int(raw.get("num_target_layers") or 0),
        mask_token_id=mask,
        markov_rank=markov_rank,
        markov_head_type=head_type,
        enable_confidence_head=enable_conf,
        confidence_head_with_markov=conf_markov,
        extra={k: v for k, v in raw.items() if k in ("num_anchors", "layer_types") and k not in known},
    )
