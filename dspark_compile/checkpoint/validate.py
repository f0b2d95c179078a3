"""Check that a target and a draft fit together: tensor names, shapes, dtypes and the DSpark config fields."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

from dspark_compile.checkpoint.fp8 import Fp8Checkpoint
from dspark_compile.checkpoint.load import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    DraftCheckpoint,
    TargetCheckpoint,
)
from dspark_compile.checkpoint.names import (
    WeightSpec,
    draft_weight_name,
    draft_weight_specs,
    target_ignores,
    target_weight_name,
    target_weight_specs,
)
from dspark_compile.checkpoint.store import WeightStore
from dspark_compile.errors import ValidationError
from dspark_compile.model_config import Gemma4Config, TargetConfig

WEIGHT_DTYPES = ("F32", "F16", "BF16")


def validate_pair(target: TargetCheckpoint, draft: DraftCheckpoint) -> list[str]:
    """Every inconsistency of the pair, one line each (file, field, expected, found); ``[]`` if none. Reads
    configs and headers only; differing embedding / LM head copies are warnings (:func:`shared_weights_differ`)."""
    return [
        *_check_tensors(target.weights, target_weight_specs(target.config), "target",
                        lambda name: target_ignores(target.config, name), target.quant),
        *_check_tensors(draft.weights, draft_weight_specs(draft.config), "draft"),
        *_check_configs(target, draft),
    ]


def check_pair(target: TargetCheckpoint, draft: DraftCheckpoint) -> None:
    """Raise :class:`ValidationError` listing every problem of :func:`validate_pair`."""
    problems = validate_pair(target, draft)
    if problems:
        raise ValidationError(problems)


def shared_weights_differ(target: TargetCheckpoint, draft: DraftCheckpoint) -> list[str]:
    """One line per draft ``embed_tokens``/``lm_head`` copy whose values differ from the target's, compared in
    row chunks (absent copies and wrong shapes are :func:`validate_pair`'s business)."""
    embed = target_weight_name("embed_tokens", prefix=target.config.weight_prefix)
    head = target_weight_name("lm_head")
    if head not in target.weights:
        head = embed
    lines = []
    pairs = ((draft_weight_name("embed_tokens"), embed), (draft_weight_name("lm_head"), head))
    for draft_name, target_name in pairs:
        if draft_name not in draft.weights or target_name not in target.weights:
            continue
        if draft.weights.shape(draft_name) != target.weights.shape(target_name):
            continue
        differing, max_delta = _compare(target.weights, target_name, draft.weights, draft_name)
        target.weights.release()  # unmap what the comparison paged in (a vocabulary matrix each)
        draft.weights.release()
        if differing:
            total = math.prod(target.weights.shape(target_name))
            lines.append(f"{draft.weights.file_of(draft_name)}: `{draft_name}` differs from the target's "
                         f"`{target_name}` ({differing} of {total} values, max |diff| {max_delta:.3g}, draft "
                         f"{draft.weights.dtype(draft_name)} vs target {target.weights.dtype(target_name)}); the "
                         "compiled graph uses the target's copy.")
    return lines


def _compare(a: WeightStore, a_name: str, b: WeightStore, b_name: str) -> tuple[int, float]:
    """Count differing values and the largest absolute difference (in float32 when the dtypes differ)."""
    differing, max_delta, row = 0, 0.0, 0
    for a_chunk in a.iter_row_chunks(a_name):
        if a_chunk.dim() < 2:
            b_chunk = b.get(b_name)
        else:
            b_chunk = b.get_rows(b_name, row, row + a_chunk.shape[0])
            row += a_chunk.shape[0]
        if a_chunk.dtype != b_chunk.dtype:
            a_chunk, b_chunk = a_chunk.float(), b_chunk.float()
        count = int((a_chunk != b_chunk).sum())
        if count:
            differing += count
            max_delta = max(max_delta, float((a_chunk.float() - b_chunk.float()).abs().max()))
    return differing, max_delta


def _weights_file(weights: WeightStore) -> Path:
    """The file that lists a checkpoint's tensors: ``model.safetensors``, else the shard index."""
    single = weights.path / SAFETENSORS_FILE
    return single if single.is_file() else weights.path / SAFETENSORS_INDEX


def _check_tensors(weights: WeightStore, specs: dict[str, WeightSpec], role: str,
                   ignored: Callable[[str], bool] = lambda name: False,
                   quant: Fp8Checkpoint | None = None) -> list[str]:
    """``quant``: a pre-quantized target's e4m3 weights are expected, and its scale tensors are not extra."""
    fp8 = quant.tensors if quant is not None else {}
    extra = quant.extra_names() if quant is not None else set()
    problems = []
    where = _weights_file(weights)
    for name, spec in specs.items():
        if name not in weights:
            if spec.required:
                problems.append(f"{where}: {role} tensor `{name}` is missing; expected shape {list(spec.shape)} "
                                f"= {spec.why}. The checkpoint does not match its config.json; re-export it.")
            continue
        shape = weights.shape(name)
        if shape != spec.shape:
            problems.append(f"{weights.file_of(name)}: {role} tensor `{name}` has shape {list(shape)}, expected "
                            f"{list(spec.shape)} = {spec.why} from config.json; re-export the checkpoint or fix "
                            "config.json.")
        if weights.dtype(name) not in WEIGHT_DTYPES and name not in fp8:
            problems.append(f"{weights.file_of(name)}: {role} tensor `{name}` has dtype {weights.dtype(name)}, "
                            f"expected one of {', '.join(WEIGHT_DTYPES)}; convert the checkpoint (quantized weights "
                            f"are not supported).")
    for name in weights.names():
        if name not in specs and not ignored(name) and name not in extra:
            problems.append(f"{weights.file_of(name)}: unexpected {role} tensor `{name}` {list(weights.shape(name))}; "
                            f"config.json does not call for it{_extra_hint(name)}. Fix config.json or remove the "
                            f"tensor.")
    return problems


def _extra_hint(name: str) -> str:
    if name.startswith("markov_head."):
        return " (check `markov_rank` and `markov_head_type`)"
    if name.startswith("confidence_head."):
        return " (check `enable_confidence_head`)"
    if name.startswith(("layers.", "model.layers.")):
        return " (check `num_hidden_layers` and `attention_bias`)"
    return ""


def _shared_fields(cfg: TargetConfig) -> tuple[str, ...]:
    """Config fields a draft copies from its target (a Gemma4 draft's layers are global-attention layers)."""
    if isinstance(cfg, Gemma4Config):
        return ("vocab_size", "hidden_size", "num_attention_heads", "global_kv_heads", "global_head_dim",
                "attention_k_eq_v", "final_logit_softcapping")
    return ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")


def _check_configs(target: TargetCheckpoint, draft: DraftCheckpoint) -> list[str]:
    t, d = target.config, draft.config
    d_file, t_file = draft.path / "config.json", target.path / "config.json"
    problems = []
    if d.base.family != t.family:
        return [f"{d_file}: a {d.base.family} draft ({d.base.architecture}) cannot draft for a {t.family} target "
                f"({t.architecture} in {t_file}); use the draft trained for this target."]
    for field in _shared_fields(t):
        found, expected = getattr(d.base, field), getattr(t, field)
        if found != expected:
            problems.append(f"{d_file}: `{field}` is {found}, expected {expected} (the target's `{field}` in "
                            f"{t_file}); use the draft trained for this target.")
    last = t.num_hidden_layers - 1
    ids = list(d.target_layer_ids)
    for layer_id in ids:
        if layer_id != -1 and not 0 <= layer_id <= last:
            problems.append(f"{d_file}: `target_layer_ids` contains {layer_id}, expected -1 (embeddings) or a target "
                            f"layer in [0, {last}] ({t_file} has num_hidden_layers={t.num_hidden_layers}); fix "
                            "target_layer_ids.")
        elif layer_id == last:
            problems.append(f"{d_file}: `target_layer_ids` contains {layer_id}, the target's last layer, which DSpark "
                            f"does not allow; expected ids in {{-1}} ∪ [0, {last - 1}]. Fix target_layer_ids.")
    if any(b <= a for a, b in itertools.pairwise(ids)):
        problems.append(f"{d_file}: `target_layer_ids` is {ids}, expected strictly increasing ids; fix the list.")
    if d.num_target_layers != t.num_hidden_layers:
        problems.append(f"{d_file}: `num_target_layers` is {d.num_target_layers}, expected {t.num_hidden_layers} (the "
                        f"target's `num_hidden_layers` in {t_file}); use the draft trained for this target.")
    if d.block_size < 1:
        problems.append(f"{d_file}: `block_size` is {d.block_size}, expected >= 1.")
    if not 0 <= d.mask_token_id < t.vocab_size:
        problems.append(f"{d_file}: `mask_token_id` is {d.mask_token_id}, expected a token id in [0, {t.vocab_size}) "
                        "(the target's vocab_size); use the draft trained for this target.")
    return problems
