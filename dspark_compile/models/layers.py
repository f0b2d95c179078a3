"""Building blocks shared by the Qwen3 target and the DSpark draft.

Written with plain tensor ops (no data-dependent Python control flow) so the same modules are the PyTorch
reference, the ONNX export source and the torch/CUDA-graph target.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark_compile.config import RopeConfig, TargetConfig


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in float32, scale in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions; computed in float32 like transformers' default RoPE."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if rope.rope_type == "linear":
            inv_freq = inv_freq / rope.factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] int64 -> cos, sin [B, 1, T, D] in ``dtype``."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def write_cache(cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Scatter ``new`` [B, KV, T, D] into ``cache`` [B, KV, S, D] at slots ``start[b] + t``.

    A functional scatter (ONNX ScatterElements), so exported graphs return the updated cache.
    """
    b, kv, t, d = new.shape
    slots = start.view(b, 1, 1, 1) + torch.arange(t, device=new.device).view(1, 1, t, 1)
    return cache.scatter(2, slots.expand(b, kv, t, d), new.to(cache.dtype))


def write_rows(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
    """cache [B, KV, S, D] ← new [B, KV, T, D] at slots [B, T], in place."""
    b, kv, t, d = new.shape
    cache.scatter_(2, slots.view(b, 1, t, 1).expand(b, kv, t, d), new.to(cache.dtype))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, KV, S, D], boolean mask [B, 1, T, S] -> [B, T, Hq*D].

    Grouped-query heads are handled by reshaping q instead of repeating k/v (no copy of the cache).
    Scores and softmax run in float32.
    """
    bsz, hq, t, d = q.shape
    kvh = k.shape[1]
    group = hq // kvh
    qg = q.reshape(bsz, kvh, group * t, d)
    scores = torch.matmul(qg.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * scale
    scores = scores.view(bsz, kvh, group, t, -1)
    scores = scores.masked_fill(~mask.unsqueeze(1), torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).view(bsz, kvh, group * t, -1)
    out = torch.matmul(probs, v.to(torch.float32)).to(q.dtype)  # [B, KV, G*T, D]
    return out.view(bsz, hq, t, d).transpose(1, 2).reshape(bsz, t, hq * d)


# ------------------------------------------------------------------------------------ cache-write strategies
class FunctionalCache:
    """Today's ONNX form: scatter the new rows into a copy of the cache, attend over it, return it whole."""

    in_place = False

    def write(self, kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
              slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """kv [2, B, KV, S, D]; new k/v [B, KV, T, D] at slots start[b] + t (= ``slots``) -> (keys, values
        attended, the layer's cache output)."""
        kc, vc = write_cache(kv[0], k, start), write_cache(kv[1], v, start)
        return kc, vc, self.output(kc, vc, k, v)

    def inject(self, kv: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor], blk: tuple[torch.Tensor, torch.Tensor],
               start: torch.Tensor, ctx_slots: torch.Tensor,
               blk_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """KV injection (draft): context rows are cached, block rows attended after the cache, never cached."""
        kc, vc = write_cache(kv[0], ctx[0], start), write_cache(kv[1], ctx[1], start)
        k = torch.cat((kc, blk[0].to(kc.dtype)), dim=2)
        v = torch.cat((vc, blk[1].to(vc.dtype)), dim=2)
        return k, v, self.output(kc, vc, *ctx)

    def output(self, kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.stack((kc, vc))


class RowsCache(FunctionalCache):
    """Attend as :class:`FunctionalCache`, but output only the new K/V rows [2, B, KV, T, D]: the executor
    owns the cache and writes them (graphs whose outputs never hold a whole cache)."""

    def output(self, kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.stack((k.to(kc.dtype), v.to(vc.dtype)))


class InPlaceCache:
    """Static caches written in place (CUDA graphs): attention reads the window of slots ``[0, window)``.

    The draft's block rows go into its cache just after the context (slots p .. p+G−1): the next round
    overwrites them, and every slot a query sees is committed context or the current block."""

    in_place = True

    def __init__(self, window: int) -> None:
        self.window = window

    def write(self, kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
              slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        write_rows(kv[0], k, slots)
        write_rows(kv[1], v, slots)
        return kv[0][:, :, : self.window], kv[1][:, :, : self.window], None

    def inject(self, kv: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor], blk: tuple[torch.Tensor, torch.Tensor],
               start: torch.Tensor, ctx_slots: torch.Tensor,
               blk_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        self.write(kv, *ctx, start, ctx_slots)  # padding context rows land on block slots: overwritten next
        return self.write(kv, *blk, start, blk_slots)


CacheWrite = FunctionalCache | InPlaceCache
FUNCTIONAL = FunctionalCache()


# ------------------------------------------------------------------------------------- attention strategies
class ReferenceAttention:
    """float32 scores and softmax (:func:`attend`); the exported graphs' and the golden vectors' form.

    ``prepare`` turns a visibility — a boolean mask [B, 1, T, S], or limits [B, T] (query (b, t) sees slots
    < limit[b, t]) with a window — into what ``__call__`` takes, once per forward."""

    def prepare(self, visible: torch.Tensor, window: int | None, group: int, dtype: torch.dtype) -> torch.Tensor:
        if visible.dtype == torch.bool:
            return visible
        assert window is not None
        return (torch.arange(window, device=visible.device).view(1, 1, window) < visible.unsqueeze(-1)).unsqueeze(1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
        return attend(q, k, v, mask, scale)


class SdpaAttention(ReferenceAttention):
    """``scaled_dot_product_attention`` with an additive mask; grouped-query heads as extra query rows."""

    def prepare(self, visible: torch.Tensor, window: int | None, group: int, dtype: torch.dtype) -> torch.Tensor:
        mask = super().prepare(visible, window, group, dtype)  # [B, 1, T, W] bool
        bsz, _, t, w = mask.shape
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        return bias.expand(bsz, group, t, w).reshape(bsz, 1, group * t, w)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
        bsz, hq, t, d = q.shape
        kvh = k.shape[1]
        out = nn.functional.scaled_dot_product_attention(q.reshape(bsz, kvh, (hq // kvh) * t, d), k, v,
                                                         attn_mask=mask, scale=scale)
        return out.reshape(bsz, hq, t, d).transpose(1, 2).reshape(bsz, t, hq * d)  # SDPA may return it strided


REFERENCE = ReferenceAttention()


class AttentionProjections(nn.Module):
    """q/k/v/o projections and per-head q/k RMSNorm of one Qwen3 attention layer."""

    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        return apply_rope(q, cos, sin)

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v
