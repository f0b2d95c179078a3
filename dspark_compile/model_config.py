"""Typed views of the two checkpoint configs (Hugging Face target, DeepSpec DSpark draft), one parser per family.

Only the fields the compiler uses are kept; parsing normalises the spellings found in the wild (``rope_theta``
+ ``rope_scaling`` of the released Qwen3 configs, ``rope_parameters`` of transformers 5, Gemma4's nested
``text_config``). :func:`parse_target_config`/:func:`parse_draft_config` pick the family from ``model_type`` /
``architectures`` (:func:`model_family`); Gemma4 fields are read from config.json itself, not through
transformers, whose 5.2x ``Gemma4TextConfig`` no longer keeps ``global_head_dim``/``num_global_key_value_heads``.
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
GEMMA4_TARGET_ARCHITECTURES = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration",
                               "Gemma4UnifiedForCausalLM", "Gemma4UnifiedForConditionalGeneration")
GEMMA4_DRAFT_ARCHITECTURES = ("Gemma4DSparkModel",)
GEMMA4_TEXT_MODEL_TYPES = ("gemma4_text", "gemma4_unified_text")
GEMMA4_MODEL_TYPES = ("gemma4", "gemma4_unified")  # multimodal wrappers: the text model sits in `text_config`
GEMMA4_ROPE_TYPES = ("default", "linear", "proportional")
GEMMA4_ACTIVATIONS = ("gelu_pytorch_tanh",)
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    partial_rotary_factor: float = 1.0  # "proportional": only the first factor·D/2 frequencies rotate


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
    family: str = "qwen3"  # the key of dspark_compile.families.FAMILIES
    weight_prefix: str = "model."  # the decoder's tensor names start with it ("model.language_model." nested)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class Gemma4Config(TargetConfig):
    """A Gemma4 text model (target, or the base of a Gemma4 draft).

    ``num_key_value_heads``/``head_dim`` are the *cache* geometry: the largest over the layer types present, so
    one [L, 2, B, KV, S, D] cache holds every layer (a layer uses its [:kv, :, :d] corner). The per-type shapes
    are ``sliding_*``/``global_*``; ``rope`` is the full-attention RoPE, ``sliding_rope`` the sliding one.
    """

    layer_types: tuple[str, ...] = ()
    sliding_window: int = 0
    sliding_kv_heads: int = 0
    sliding_head_dim: int = 0
    global_kv_heads: int = 0
    global_head_dim: int = 0
    sliding_rope: RopeConfig = RopeConfig(10000.0)
    attention_k_eq_v: bool = False  # full-attention layers: no v_proj, V = K before k_norm
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def attention_shape(self, layer: int) -> tuple[int, int]:
        """(KV heads, head dim) of ``layer``."""
        if self.is_sliding(layer):
            return self.sliding_kv_heads, self.sliding_head_dim
        return self.global_kv_heads, self.global_head_dim

    def shares_kv(self, layer: int) -> bool:
        """Whether ``layer`` has no v_proj (V is K before its norm)."""
        return self.attention_k_eq_v and not self.is_sliding(layer)


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


def _rope_of_type(params: Any, layer_type: str, path: Path) -> RopeConfig:
    """One entry of Gemma4's per-layer-type ``rope_parameters``."""
    where = f"{path}: `rope_parameters.{layer_type}`"
    if not isinstance(params, dict):
        raise CheckpointError(f"{where} must be an object with `rope_theta`, found {params!r}; fix config.json.")
    theta = params.get("rope_theta")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise CheckpointError(f"{where}.rope_theta must be a positive number, found {theta!r}.")
    rope_type = params.get("rope_type", "default")
    if rope_type not in GEMMA4_ROPE_TYPES:
        raise CheckpointError(f"{where}.rope_type {rope_type!r} is not supported (supported: "
                              f"{', '.join(GEMMA4_ROPE_TYPES)}); use a checkpoint without long-context scaling.")
    partial = float(params.get("partial_rotary_factor", 1.0))
    if not 0.0 < partial <= 1.0:
        raise CheckpointError(f"{where}.partial_rotary_factor must be in (0, 1], found {partial}.")
    if partial != 1.0 and rope_type != "proportional":
        raise CheckpointError(f"{where}: partial_rotary_factor {partial} is only supported with rope_type "
                              "'proportional'.")
    return RopeConfig(float(theta), str(rope_type), float(params.get("factor", 1.0) or 1.0), partial)


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def model_family(raw: dict[str, Any]) -> str:
    """``"gemma4"`` for Gemma4 configs (flat text or nested ``text_config``), else ``"qwen3"`` (whose parser
    names the unsupported architecture)."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if model_type in (*GEMMA4_TEXT_MODEL_TYPES, *GEMMA4_MODEL_TYPES):
        return "gemma4"
    if arch in (*GEMMA4_TARGET_ARCHITECTURES, *GEMMA4_DRAFT_ARCHITECTURES):
        return "gemma4"
    return "qwen3"


def parse_target_config(raw: dict[str, Any], path: Path) -> TargetConfig:
    """The target config of whichever family ``raw`` belongs to (:func:`model_family`)."""
    if model_family(raw) == "gemma4":
        return parse_gemma4_config(raw, path, architectures=GEMMA4_TARGET_ARCHITECTURES)
    return parse_qwen3_config(raw, path)


def parse_qwen3_config(raw: dict[str, Any], path: Path, *, architectures: tuple[str, ...] =
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


def parse_gemma4_config(raw: dict[str, Any], path: Path, *, architectures: tuple[str, ...]) -> Gemma4Config:
    """A Gemma4 text config: flat (``gemma4_text``, ``gemma4_unified_text``, DeepSpec drafts) or nested in the
    ``text_config`` of a ``gemma4``/``gemma4_unified`` wrapper (whose decoder tensors are then named
    ``model.language_model.…``). Each architecture feature we do not implement is refused with its own line."""
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else raw.get("model_type", "<none>")
    if arch not in architectures:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported; expected one of {', '.join(architectures)}."
        )
    prefix = "model."
    text = raw
    if raw.get("model_type") in GEMMA4_MODEL_TYPES:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError(f"{path}: model_type {raw.get('model_type')!r} needs a `text_config` object; "
                                  "re-download config.json.")
        prefix = "model.language_model."
    base = parse_qwen3_config({**text, "architectures": [arch], "rope_parameters": None, "rope_scaling": None,
                               "rope_theta": 1.0}, path, architectures=(arch,))
    unsupported = {
        "enable_moe_block": "Mixture-of-Experts blocks",
        "num_kv_shared_layers": "KV-shared layers",
        "attention_bias": "attention biases",
    }
    for key, what in unsupported.items():
        if text.get(key):
            raise CheckpointError(f"{path}: `{key}` is {text[key]!r}: Gemma4 {what} are not supported by "
                                  "dspark-compile; use a dense Gemma4 checkpoint without them.")
    if text.get("use_bidirectional_attention") == "all":
        raise CheckpointError(f"{path}: `use_bidirectional_attention` 'all' (non-causal text attention) is not "
                              "supported; use a causal Gemma4 checkpoint.")
    if text.get("attn_logit_softcapping"):
        raise CheckpointError(f"{path}: `attn_logit_softcapping` is not supported; use a checkpoint without it.")
    activation = text.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in GEMMA4_ACTIVATIONS:
        raise CheckpointError(f"{path}: `hidden_activation` {activation!r} is not supported; expected one of "
                              f"{', '.join(GEMMA4_ACTIVATIONS)}.")
    layers = base.num_hidden_layers
    layer_types = text.get("layer_types") or [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    if not isinstance(layer_types, list) or len(layer_types) != layers or any(
            t not in LAYER_TYPES for t in layer_types):
        raise CheckpointError(f"{path}: `layer_types` must list {layers} entries from {', '.join(LAYER_TYPES)}, "
                              f"found {layer_types!r}.")
    window = int(text.get("sliding_window") or 0)
    if "sliding_attention" in layer_types and window < 1:
        raise CheckpointError(f"{path}: `sliding_window` must be >= 1 with sliding layers, found {window}.")
    ropes = text.get("rope_parameters")
    if not isinstance(ropes, dict):
        raise CheckpointError(f"{path}: `rope_parameters` must map each layer type to its RoPE; fix config.json.")
    present = set(layer_types)
    sliding_rope = _rope_of_type(ropes.get("sliding_attention"), "sliding_attention", path) if (
        "sliding_attention" in present) else RopeConfig(10000.0)
    global_rope = _rope_of_type(ropes.get("full_attention"), "full_attention", path) if (
        "full_attention" in present) else sliding_rope
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    global_dim, global_kv = _global_shape(text, layer_types, k_eq_v, path)
    global_kv = global_kv or base.num_key_value_heads
    sliding_kv, sliding_dim = base.num_key_value_heads, base.head_dim
    for name, heads in (("num_key_value_heads", sliding_kv), ("num_global_key_value_heads", global_kv)):
        if heads <= 0 or base.num_attention_heads % heads:
            raise CheckpointError(f"{path}: num_attention_heads ({base.num_attention_heads}) must be a multiple "
                                  f"of `{name}` ({heads}).")
    shapes = [(sliding_kv, sliding_dim) if t == "sliding_attention" else (global_kv, global_dim)
              for t in layer_types]
    softcap = text.get("final_logit_softcapping")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap <= 0):
        raise CheckpointError(f"{path}: `final_logit_softcapping` must be a positive number or null, "
                              f"found {softcap!r}.")
    per_layer = int(text.get("hidden_size_per_layer_input") or 0)
    return Gemma4Config(
        **{f: getattr(base, f) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "rms_norm_eps", "max_position_embeddings")},
        num_key_value_heads=max(h for h, _ in shapes), head_dim=max(d for _, d in shapes), rope=global_rope,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        architecture=str(arch), eos_token_ids=_eos_ids(text) or _eos_ids(raw), family="gemma4",
        weight_prefix=prefix, layer_types=tuple(layer_types), sliding_window=window,
        sliding_kv_heads=sliding_kv, sliding_head_dim=sliding_dim, global_kv_heads=global_kv,
        global_head_dim=global_dim, sliding_rope=sliding_rope, attention_k_eq_v=k_eq_v,
        final_logit_softcapping=float(softcap) if softcap is not None else None, hidden_activation=activation,
        hidden_size_per_layer_input=per_layer,
        vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or base.vocab_size),
    )


def _global_shape(text: dict[str, Any], layer_types: list[str], k_eq_v: bool,
                  path: Path) -> tuple[int, int | None]:
    """(head dim, KV heads or None = num_key_value_heads) of the full-attention layers: ``global_head_dim`` /
    ``num_global_key_value_heads`` as transformers 5.10 writes them (the heads only count with
    ``attention_k_eq_v``, as in transformers), or the ``per_layer_config`` overrides 5.2x writes instead."""
    per_layer = text.get("per_layer_config")
    if not isinstance(per_layer, dict):
        heads = text.get("num_global_key_value_heads") if k_eq_v else None
        return int(text.get("global_head_dim") or 512), int(heads) if heads else None
    overrides = [per_layer.get(str(i), per_layer.get(i)) or {} for i in range(len(layer_types))]
    full = {_entry_key(o) for o, t in zip(overrides, layer_types, strict=True) if t == "full_attention"}
    sliding = [o for o, t in zip(overrides, layer_types, strict=True) if t == "sliding_attention" and o]
    if len(full) > 1 or sliding:
        raise CheckpointError(f"{path}: `per_layer_config` gives layers of one type different shapes; only one "
                              "shape per layer type is supported.")
    entry = dict(full.pop()) if full else {}
    heads = entry.get("num_key_value_heads")
    return int(entry.get("head_dim") or text.get("head_dim") or 0), int(heads) if heads else None


def _entry_key(entry: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(entry.items()))


def parse_draft_config(raw: dict[str, Any], path: Path) -> DraftConfig:
    if model_family(raw) == "gemma4":
        base: TargetConfig = parse_gemma4_config(raw, path, architectures=GEMMA4_DRAFT_ARCHITECTURES)
        if isinstance(base, Gemma4Config) and base.hidden_size_per_layer_input:
            raise CheckpointError(f"{path}: `hidden_size_per_layer_input` is {base.hidden_size_per_layer_input}; "
                                  "Gemma4 DSpark drafts with per-layer inputs are not supported (set it to 0).")
    else:
        base = parse_qwen3_config(raw, path, architectures=SUPPORTED_DRAFT_ARCHITECTURES)
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
