"""DSpark draft training: the multi-anchor training forward and the paper's objective (DSPARK.md §2, §6).

The draft is the package's own :class:`~dspark_compile.models.dspark.DSparkDraft` (so its state dict has the
DeepSpec tensor names); only the forward differs from inference: instead of one block after a cached context,
one pass trains ``num_anchors`` blocks per sequence, each block [x_a, mask, ..., mask] at positions
a..a+G-1 attending the context features of positions < a and its own block (not causal), as DeepSpec's
trainer does. Labels: block position k (1-based) predicts x_{a+k}; the teacher is the target's distribution
at position a+k-1 (teacher-forced); the Markov head and the confidence head read the true previous token.

Loss, as DeepSpec's ``compute_dspark_loss`` computes it, each term a weighted mean over valid positions with
weight exp(-(k-1)/decay):
  0.1 · CE(draft, x_{a+k}) + 0.9 · Σ_v |p_d - p_t| + 1.0 · BCE(c_k, 1 - TV(p_d, p_t)).
The distribution term is DeepSpec's L1 distance Σ|p_d - p_t| = 2·TV; the confidence label 1 - TV is the
expected acceptance probability of token k under rejection sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from dspark_compile.model_config import parse_draft_config
from dspark_compile.models.dspark import DSparkDraft

CE_WEIGHT = 0.1
L1_WEIGHT = 0.9
CONFIDENCE_WEIGHT = 1.0
INIT_STD = 0.02  # DeepSpec's post_init: N(0, initializer_range) for linear and embedding weights


def draft_config(target_config: dict[str, Any], *, layers: int, block_size: int, target_layer_ids: list[int],
                 mask_token_id: int, num_anchors: int, markov_rank: int) -> dict[str, Any]:
    """The target's config plus the DSpark fields, as DeepSpec's ``build_draft_config`` writes them."""
    num_target_layers = int(target_config["num_hidden_layers"])
    if any(not (i == -1 or 0 <= i < num_target_layers - 1) for i in target_layer_ids) or (
            sorted(set(target_layer_ids)) != list(target_layer_ids)):
        raise ValueError(f"target_layer_ids {target_layer_ids} must increase strictly within [-1, "
                         f"{num_target_layers - 2}] (the final layer is not a tap)")
    config = dict(target_config)
    config.update({
        "architectures": ["Qwen3DSparkModel"],
        "num_hidden_layers": layers,
        "num_target_layers": num_target_layers,
        "block_size": block_size,
        "target_layer_ids": list(target_layer_ids),
        "mask_token_id": mask_token_id,
        "num_anchors": num_anchors,
        "markov_rank": markov_rank,
        "enable_confidence_head": True,
        "confidence_head_with_markov": markov_rank > 0,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * layers,
    })
    if markov_rank > 0:
        config["markov_head_type"] = "vanilla"
    return config


def build_draft(config: dict[str, Any], embed_tokens: nn.Embedding, lm_head: nn.Linear) -> DSparkDraft:
    """A freshly initialised draft sharing the (frozen) target embedding and LM head."""
    draft = DSparkDraft(parse_draft_config(config, Path("<draft config>")), embed_tokens, lm_head)
    for name, module in draft.named_modules():
        if name in ("embed_tokens", "lm_head"):
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    return draft


def trainable_parameters(draft: DSparkDraft) -> list[nn.Parameter]:
    return [p for n, p in draft.named_parameters() if not n.startswith(("embed_tokens.", "lm_head."))]


def sample_anchors(batch: int, length: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` distinct anchor positions per sequence in [0, length - 2] (each has a next token), sorted."""
    keys = torch.rand(batch, length - 1, generator=gen)
    return keys.argsort(dim=1)[:, :count].sort(dim=1).values


@dataclass
class BlockOutputs:
    """One training forward over ``A`` anchor blocks of ``G`` positions per sequence."""

    logits: torch.Tensor  # [B, A, G, V] Markov-adjusted draft logits, float32
    confidence_logits: torch.Tensor  # [B, A, G] pre-sigmoid, float32
    labels: torch.Tensor  # [B, A, G] x_{a+k}
    positions: torch.Tensor  # [B, A, G] a + k - 1: where the teacher's distribution is read
    valid: torch.Tensor  # [B, A, G] bool: the label lies inside the sequence


def block_forward(draft: DSparkDraft, ids: torch.Tensor, taps: torch.Tensor, anchors: torch.Tensor) -> BlockOutputs:
    """ids [B, L], taps [B, L, n_taps·H] (target layer outputs), anchors [B, A] -> draft outputs per block."""
    bsz, seq = ids.shape
    n_anchor = anchors.shape[1]
    g = draft.block_size
    dev = ids.device
    offsets = torch.arange(g, device=dev)
    positions = anchors.unsqueeze(-1) + offsets  # [B, A, G]: a .. a+G-1
    label_pos = positions + 1
    valid = label_pos < seq
    labels = ids.gather(1, label_pos.clamp(max=seq - 1).view(bsz, -1)).view(bsz, n_anchor, g)
    anchor_ids = ids.gather(1, anchors)
    block_ids = torch.full((bsz, n_anchor, g), draft.cfg.mask_token_id, dtype=torch.int64, device=dev)
    block_ids[:, :, 0] = anchor_ids

    t = n_anchor * g
    x = draft.embed_tokens(block_ids.view(bsz, t))
    ctx = draft.context_features(taps)
    rope_blk = draft.rotary(positions.view(bsz, t), x.dtype)
    rope_ctx = draft.rotary(torch.arange(seq, device=dev).expand(bsz, seq), x.dtype)
    # Block queries see context positions < their anchor and every position of their own block.
    ctx_visible = torch.arange(seq, device=dev).view(1, 1, seq) < anchors.repeat_interleave(g, dim=1).unsqueeze(-1)
    block_of = torch.arange(t, device=dev) // g
    same_block = (block_of.view(t, 1) == block_of.view(1, t)).expand(bsz, t, t)
    mask = torch.cat((ctx_visible, same_block), dim=2).unsqueeze(1)  # [B, 1, T, L + T]
    group = draft.cfg.base.num_attention_heads // draft.cfg.base.num_key_value_heads
    for layer in draft.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.query(h, *rope_blk)
        k_ctx, v_ctx = attn.key_value(ctx, *rope_ctx)
        k_blk, v_blk = attn.key_value(h, *rope_blk)
        # Keys/values repeated per query head: SDPA's memory-efficient kernel takes a mask but not GQA.
        k = torch.cat((k_ctx, k_blk), dim=2).repeat_interleave(group, dim=1)
        v = torch.cat((v_ctx, v_blk), dim=2).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=attn.scale)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(bsz, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    hidden = draft.norm(x).view(bsz, n_anchor, g, -1)

    logits = draft.lm_head(hidden).float()
    prev = torch.cat((anchor_ids.unsqueeze(-1), labels[..., :-1]), dim=-1)  # teacher-forced x_{k-1}
    features = hidden
    if draft.markov_head is not None:
        logits = logits + draft.markov_head.markov_w2(draft.markov_head.markov_w1(prev)).float()
        if draft.cfg.confidence_head_with_markov:
            features = torch.cat((hidden, draft.markov_head.markov_w1(prev).to(hidden.dtype)), dim=-1)
    confidence = draft.confidence_head(features) if draft.confidence_head is not None else None
    if confidence is None:
        raise ValueError("the training objective needs a confidence head (enable_confidence_head)")
    return BlockOutputs(logits=logits, confidence_logits=confidence, labels=labels, positions=positions, valid=valid)


def position_weights(valid: torch.Tensor, decay: float) -> torch.Tensor:
    """valid [B, A, G] -> weights exp(-(k-1)/decay) on valid positions, 0 elsewhere."""
    k = torch.arange(valid.shape[-1], device=valid.device, dtype=torch.float32)
    return valid.float() * torch.exp(-k / decay)


@dataclass
class LossTerms:
    loss: torch.Tensor  # the weighted sum that is backpropagated
    ce: torch.Tensor
    l1: torch.Tensor
    confidence: torch.Tensor
    accept: torch.Tensor  # [B, A, G] 1 - TV(p_d, p_t): the confidence label


def dspark_loss(out: BlockOutputs, teacher_logits: torch.Tensor, decay: float) -> LossTerms:
    """teacher_logits [B, A, G, V]: the target's logits at ``out.positions``."""
    w = position_weights(out.valid, decay)
    den = w.sum().clamp_min(1e-6)
    ce = F.cross_entropy(out.logits.flatten(0, 2), out.labels.flatten(), reduction="none").view_as(w)
    p_draft = torch.softmax(out.logits, dim=-1)
    p_target = torch.softmax(teacher_logits.float(), dim=-1)
    l1 = (p_draft - p_target).abs().sum(dim=-1)
    accept = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
    conf = F.binary_cross_entropy_with_logits(out.confidence_logits, accept, reduction="none")
    ce_loss, l1_loss, conf_loss = (ce * w).sum() / den, (l1 * w).sum() / den, (conf * w).sum() / den
    loss = CE_WEIGHT * ce_loss + L1_WEIGHT * l1_loss + CONFIDENCE_WEIGHT * conf_loss
    return LossTerms(loss=loss, ce=ce_loss, l1=l1_loss, confidence=conf_loss, accept=accept)


@torch.no_grad()
def block_metrics(out: BlockOutputs, teacher_logits: torch.Tensor, terms: LossTerms) -> dict[str, float]:
    """Loss terms and teacher-forced acceptance estimates per block (bonus token counted, as the decode loop's τ).

    ``tau_greedy``: 1 + leading positions whose draft argmax equals the target argmax; ``tau_prob``:
    1 + Σ_k Π_{i≤k} (1 - TV_i), DeepSpec's ``tau_probabilistic``; ``acc_first``: top-1 agreement at k = 1;
    ``confidence_abs_error``: mean |sigmoid(c_k) - (1 - TV_k)|.
    """
    valid = out.valid.float()
    agree = (out.logits.argmax(-1) == teacher_logits.argmax(-1)).float() * valid
    has_block = valid[..., 0]
    n = has_block.sum().clamp_min(1.0)
    tau_greedy = ((1.0 + agree.cumprod(-1).sum(-1)) * has_block).sum() / n
    tau_prob = ((1.0 + (terms.accept * valid).cumprod(-1).sum(-1)) * has_block).sum() / n
    acc_first = (agree[..., 0] * has_block).sum() / n
    conf_err = ((torch.sigmoid(out.confidence_logits) - terms.accept).abs() * valid).sum() / valid.sum().clamp_min(1)
    values = {"loss": terms.loss, "ce": terms.ce, "l1": terms.l1, "confidence": terms.confidence,
              "tau_greedy": tau_greedy, "tau_prob": tau_prob, "acc_first": acc_first,
              "confidence_abs_error": conf_err}
    return {k: float(v.detach()) for k, v in values.items()}


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [B, L, V], positions [B, A, G] -> [B, A, G, V]."""
    bsz, n_anchor, g = positions.shape
    idx = positions.clamp(max=values.shape[1] - 1).view(bsz, n_anchor * g, 1).expand(-1, -1, values.shape[-1])
    return values.gather(1, idx).view(bsz, n_anchor, g, -1)


def save_draft(draft: DSparkDraft, config: dict[str, Any], directory: Path, dtype: torch.dtype) -> None:
    """``config.json`` + ``model.safetensors`` with DeepSpec's tensor names (embedding/LM head copies included)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {**config, "dtype": str(dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {name: t.detach().to("cpu", dtype).contiguous().clone() for name, t in draft.state_dict().items()}
    save_file(dict(sorted(tensors.items())), str(directory / "model.safetensors"), metadata={"format": "pt"})
