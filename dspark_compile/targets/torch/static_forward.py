"""The grafted program's forward passes over static KV caches written in place.

``models/*.py`` return a new cache from every call (a functional scatter: the form ONNX export needs). A CUDA
graph wants the opposite — caches allocated once, new keys/values written into them where they belong — and
attention over only the slots that can be visible. :class:`StaticProgram` runs the same modules (same weights,
same equations) that way:

* keys/values go straight into the cache slots (``scatter_``, or the fused kernel's store); a row whose slot is
  −1 is not written;
* attention reads a *window* of the cache, slots ``[0, window)``, where the caller rounds the window up to a
  bucket so that graphs are reused (``window`` ≥ every visible slot + 1);
* the draft writes its block's keys/values into its cache just after the context (slots ``p .. p+G−1``,
  p = anchor position) instead of concatenating them: the next round overwrites them, and every slot a query
  sees is either committed context (< p) or the current block, exactly the reference's visibility.

Two ways to compute a layer: ``fused=False`` calls the modules' own methods (the PyTorch reference, bit-equal
on the CPU); ``fused=True`` concatenates q|k|v and gate|up weights (the modules' parameters become views of
the fused tensors: same values, one matrix product instead of three) and uses the Triton kernels of
:mod:`.kernels` for the elementwise work. ``attention="sdpa"`` uses ``scaled_dot_product_attention`` with an
additive mask; ``"reference"`` the float32 ``models.layers.attend``; ``"triton"`` a split-K Triton kernel for
decode-sized queries (SDPA for longer chunks such as prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.layers import attend
from dspark_compile.models.qwen3 import Qwen3Target

ATTENTION = ("sdpa", "reference", "triton")
TRITON_ATTENTION_ROWS = 64  # query rows per KV head (group · T) up to which "triton" uses the split-K kernel


@dataclass(frozen=True)
class _Fused:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor


def _fuse_layer(layer: nn.Module) -> _Fused:
    """Concatenate q|k|v and gate|up; re-point the modules' parameters at views of the fused tensors."""

    def fuse(linears: list[nn.Linear], attr: str) -> torch.Tensor | None:
        parts = [getattr(lin, attr) for lin in linears]
        if parts[0] is None:
            return None
        whole = torch.cat([p.detach() for p in parts])
        start = 0
        for lin, p in zip(linears, parts, strict=True):
            setattr(lin, attr, nn.Parameter(whole[start : start + p.shape[0]], requires_grad=False))
            start += p.shape[0]
        return whole

    a, mlp = layer.self_attn, layer.mlp
    qkv = fuse([a.q_proj, a.k_proj, a.v_proj], "weight")
    qkv_bias = fuse([a.q_proj, a.k_proj, a.v_proj], "bias")
    gate_up = fuse([mlp.gate_proj, mlp.up_proj], "weight")
    assert qkv is not None and gate_up is not None
    return _Fused(qkv, qkv_bias, gate_up)


def _write(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
    """cache [B, KV, S, D] ← new [B, KV, T, D] at slots [B, T], in place."""
    b, kv, t, d = new.shape
    cache.scatter_(2, slots.view(b, 1, t, 1).expand(b, kv, t, d), new.to(cache.dtype))


class StaticProgram:
    """Target step (embed → layers → final norm, taps) and draft backbone over in-place static caches."""

    def __init__(self, target: Qwen3Target, draft: DSparkDraft | None, *, fused: bool, attention: str) -> None:
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, found {attention!r}")
        self.target = target
        self.draft = draft
        self.fused = fused
        self.attention = attention
        self._target_weights = [_fuse_layer(layer) for layer in target.layers] if fused else []
        self._draft_weights = [_fuse_layer(layer) for layer in draft.layers] if fused and draft is not None else []
        cfg = target.cfg
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads

    # ------------------------------------------------------------------------------------------------ shared
    def _mask(self, limit: torch.Tensor, window: int) -> torch.Tensor:
        """Query (b, t) sees slots < limit[b, t]: the limits themselves (split-K kernel), bool [B, 1, T, W]
        (reference) or additive [B, 1, g·T, W] (SDPA; also "triton" for prefill-sized chunks)."""
        bsz, t = limit.shape
        if self.attention == "triton" and self.group * t <= TRITON_ATTENTION_ROWS:
            return limit.contiguous()
        visible = torch.arange(window, device=limit.device).view(1, 1, window) < limit.unsqueeze(-1)
        if self.attention == "reference":
            return visible.unsqueeze(1)
        dtype = self.target.embed_tokens.weight.dtype
        bias = torch.zeros(visible.shape, dtype=dtype, device=limit.device).masked_fill(~visible, float("-inf"))
        return bias.unsqueeze(1).expand(bsz, self.group, t, window).reshape(bsz, 1, self.group * t, window)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
        """q [B, Hq, T, D] over k/v [B, KV, W, D] -> [B, T, Hq·D]; ``mask`` as made by :meth:`_mask`."""
        bsz, hq, t, d = q.shape
        if mask.dtype == torch.int64:
            from dspark_compile.targets.torch.kernels import decode_attention

            out = decode_attention(q.contiguous(), k, v, mask, scale)
            return out.transpose(1, 2).reshape(bsz, t, hq * d)
        if mask.dtype == torch.bool:
            return attend(q, k, v, mask, scale)
        kvh = k.shape[1]
        # Grouped-query heads as extra query rows of their KV head (as models.layers.attend): no copy of k/v.
        out = F.scaled_dot_product_attention(q.reshape(bsz, kvh, (hq // kvh) * t, d), k, v, attn_mask=mask,
                                             scale=scale)
        return out.reshape(bsz, hq, t, d).transpose(1, 2).reshape(bsz, t, hq * d)  # SDPA may return it strided

    def _fused_layer(self, layer: nn.Module, fw: _Fused, x: torch.Tensor, delta: torch.Tensor | None,
                     inputs: tuple[torch.Tensor, ...], kv: torch.Tensor, mask: torch.Tensor, window: int,
                     ctx: torch.Tensor | None, tap: torch.Tensor | None) -> torch.Tensor:
        """One decoder layer; ``x`` [M, H] is the residual stream, updated in place. Returns the MLP output
        (added to ``x`` by the next layer's norm kernel). ``ctx`` [B, C, H] (draft): context rows whose k/v
        are written too (KV injection); queries are the block rows only."""
        from dspark_compile.targets.torch.kernels import add_rmsnorm, qk_norm_rope, silu_mul

        cos, sin, slots = inputs
        a = layer.self_attn
        h = add_rmsnorm(x, delta, layer.input_layernorm.weight, layer.input_layernorm.eps, tap)
        rows_in = h
        n_ctx = 0
        bsz = kv.shape[1]
        if ctx is not None:
            n_ctx = ctx.shape[1]
            rows_in = torch.cat((ctx, h.view(bsz, -1, h.shape[-1])), dim=1).view(-1, h.shape[-1])
        qkv = F.linear(rows_in, fw.qkv, fw.qkv_bias)
        t = x.shape[0] // bsz
        q = x.new_empty(bsz, a.num_heads, t, a.head_dim)
        qk_norm_rope(qkv, cos, sin, slots, a.q_norm.weight, a.k_norm.weight, a.q_norm.eps, q, kv[0], kv[1],
                     rows=t + n_ctx, q_start=n_ctx)
        out = self._attend(q, kv[0][:, :, :window], kv[1][:, :, :window], mask, a.scale)
        h = add_rmsnorm(x, a.o_proj(out.view(x.shape[0], -1)), layer.post_attention_layernorm.weight,
                        layer.post_attention_layernorm.eps)
        return layer.mlp.down_proj(silu_mul(F.linear(h, fw.gate_up)))

    # ------------------------------------------------------------------------------------------------ target
    def target_step(self, tokens: torch.Tensor, cache_len: torch.Tensor, kv: torch.Tensor,
                    window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] at positions cache_len[b] + t; kv [L, 2, B, KV, S, D] written in place.

        Returns (hidden after the final norm [B, T, H], taps [B, T, NT·H]) like ``Qwen3Target.forward``.
        """
        tgt = self.target
        bsz, t = tokens.shape
        pos = cache_len.view(bsz, 1) + torch.arange(t, device=tokens.device).view(1, t)
        x = tgt.embed_tokens(tokens)
        cos, sin = tgt.rotary(pos, x.dtype)
        mask = self._mask(pos + 1, window)  # causal over the committed prefix and this chunk
        if self.fused:
            return self._target_fused(x, pos, cos, sin, kv, mask, window)
        taps: dict[int, torch.Tensor] = {-1: x}
        for i, layer in enumerate(tgt.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.query(h, cos, sin)
            k_new, v_new = a.key_value(h, cos, sin)
            _write(kv[i, 0], k_new, pos)
            _write(kv[i, 1], v_new, pos)
            x = x + a.o_proj(self._attend(q, kv[i, 0][:, :, :window], kv[i, 1][:, :, :window], mask, a.scale))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            taps[i] = x
        tapped = [taps[i] for i in tgt.tap_layer_ids]
        return tgt.norm(x), torch.cat(tapped, dim=-1) if tapped else x[..., :0]

    def _target_fused(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      kv: torch.Tensor, mask: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        from dspark_compile.targets.torch.kernels import add_rmsnorm

        tgt = self.target
        bsz, t, hid = x.shape
        m = bsz * t
        x = x.reshape(m, hid)
        ids = tgt.tap_layer_ids
        taps = x.new_empty(m, len(ids) * hid)
        cols = {lid: taps[:, j * hid : (j + 1) * hid] for j, lid in enumerate(ids)}
        if -1 in cols:
            cols[-1].copy_(x)
        inputs = (cos.reshape(m, -1), sin.reshape(m, -1), pos.reshape(m))
        delta = None
        for i, (layer, fw) in enumerate(zip(tgt.layers, self._target_weights, strict=True)):
            delta = self._fused_layer(layer, fw, x, delta, inputs, kv[i], mask, window, None, cols.get(i - 1))
        hidden = add_rmsnorm(x, delta, tgt.norm.weight, tgt.norm.eps, cols.get(len(tgt.layers) - 1))
        return hidden.view(bsz, t, hid), taps.view(bsz, t, len(ids) * hid)

    # ------------------------------------------------------------------------------------------------- draft
    def draft_step(self, anchor: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor,
                   cache_len: torch.Tensor, kv: torch.Tensor, window: int) -> torch.Tensor:
        """The draft backbone (DSparkDraft.backbone) -> block hidden states [B, G, H] after the final norm.

        Context rows ``c < ctx_count[b]`` are written at slot cache_len[b] + c; the block sits at
        p = cache_len + ctx_count and sees slots < p + G.
        """
        d = self.draft
        assert d is not None
        bsz, c, _ = ctx_taps.shape
        g = d.block_size
        dev = anchor.device
        ctx_pos = cache_len.view(bsz, 1) + torch.arange(c, device=dev).view(1, c)
        anchor_pos = cache_len + ctx_count
        blk_pos = anchor_pos.view(bsz, 1) + torch.arange(g, device=dev).view(1, g)
        block_ids = torch.full((bsz, g), d.cfg.mask_token_id, dtype=torch.int64, device=dev)
        block_ids[:, 0] = anchor
        x = d.embed_tokens(block_ids)
        mask = self._mask((anchor_pos + g).view(bsz, 1).expand(bsz, g), window)
        if self.fused:
            return self._draft_fused(x, ctx_taps, ctx_count, ctx_pos, blk_pos, kv, mask, window)
        ctx = d.context_features(ctx_taps)
        rope_blk = d.rotary(blk_pos, x.dtype)
        rope_ctx = d.rotary(ctx_pos, x.dtype)
        for i, layer in enumerate(d.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.query(h, *rope_blk)
            k_ctx, v_ctx = a.key_value(ctx, *rope_ctx)
            _write(kv[i, 0], k_ctx, ctx_pos)  # padding rows (c >= ctx_count) land on block slots: overwritten
            _write(kv[i, 1], v_ctx, ctx_pos)
            k_blk, v_blk = a.key_value(h, *rope_blk)
            _write(kv[i, 0], k_blk, blk_pos)
            _write(kv[i, 1], v_blk, blk_pos)
            x = x + a.o_proj(self._attend(q, kv[i, 0][:, :, :window], kv[i, 1][:, :, :window], mask, a.scale))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return d.norm(x)

    def _draft_fused(self, x: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor, ctx_pos: torch.Tensor,
                     blk_pos: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
        from dspark_compile.targets.torch.kernels import add_rmsnorm

        d = self.draft
        assert d is not None
        bsz, g, hid = x.shape
        c = ctx_taps.shape[1]
        x = x.reshape(bsz * g, hid)
        fc = F.linear(ctx_taps.reshape(bsz * c, -1).to(d.fc.weight.dtype), d.fc.weight)
        ctx = add_rmsnorm(fc, None, d.hidden_norm.weight, d.hidden_norm.eps).view(bsz, c, hid)
        # Rows per batch entry: the C context rows, then the G block rows (the queries).
        pos = torch.cat((ctx_pos, blk_pos), dim=1)
        live = torch.arange(c, device=x.device).view(1, c) < ctx_count.view(bsz, 1)
        slots = torch.cat((torch.where(live, ctx_pos, -1), blk_pos), dim=1)
        cos, sin = d.rotary(pos, x.dtype)
        inputs = (cos.reshape(bsz * (c + g), -1), sin.reshape(bsz * (c + g), -1), slots.reshape(-1))
        delta = None
        for i, (layer, fw) in enumerate(zip(d.layers, self._draft_weights, strict=True)):
            delta = self._fused_layer(layer, fw, x, delta, inputs, kv[i], mask, window, ctx, None)
        return add_rmsnorm(x, delta, d.norm.weight, d.norm.eps).view(bsz, g, hid)
