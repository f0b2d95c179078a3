"""What the CUDA-graph target does differently from ``models/``: fused weights and Triton kernels.

The forward itself is the models' (``Qwen3Target.forward``, ``DSparkDraft.backbone``) with the in-place cache
strategy (``models.layers.InPlaceCache``: keys/values written into static caches, attention over a window of
slots ``[0, window)``) and an attention strategy: ``"reference"`` (float32), ``"sdpa"``, or ``"triton"``
(:class:`TritonAttention`: the split-K kernel for decode-sized queries, SDPA for prefill-sized chunks).

``fused=True`` adds the one thing the modules cannot express: q|k|v and gate|up weights concatenated (the
modules' parameters become views of the fused tensors: same values, one matrix product instead of three) and
the Triton kernels of :mod:`.kernels` for the elementwise work, with the residual add carried into the next
layer's norm kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.layers import InPlaceCache, ReferenceAttention, SdpaAttention
from dspark_compile.models.qwen3 import Qwen3Target

TRITON_ATTENTION_ROWS = 64  # query rows per KV head (group · T) up to which "triton" uses the split-K kernel


class TritonAttention(SdpaAttention):
    """The split-K Triton kernel (kernels.decode_attention) for decode-sized queries, given as limits;
    SDPA for longer chunks (prefill)."""

    def prepare(self, visible: torch.Tensor, window: int | None, group: int, dtype: torch.dtype) -> torch.Tensor:
        if visible.dtype != torch.bool and group * visible.shape[1] <= TRITON_ATTENTION_ROWS:
            return visible.contiguous()
        return super().prepare(visible, window, group, dtype)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
        if mask.dtype != torch.int64:
            return super().__call__(q, k, v, mask, scale)
        from dspark_compile.targets.torch.kernels import decode_attention

        bsz, hq, t, d = q.shape
        out = decode_attention(q.contiguous(), k, v, mask, scale)
        return out.transpose(1, 2).reshape(bsz, t, hq * d)


ATTENTION: dict[str, ReferenceAttention] = {"sdpa": SdpaAttention(), "reference": ReferenceAttention(),
                                            "triton": TritonAttention()}


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


class StaticProgram:
    """Target step (embed → layers → final norm, taps) and draft backbone over in-place static caches."""

    def __init__(self, target: Qwen3Target, draft: DSparkDraft | None, *, fused: bool, attention: str) -> None:
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {tuple(ATTENTION)}, found {attention!r}")
        self.target = target
        self.draft = draft
        self.fused = fused
        self.attention = attention
        self.attn = ATTENTION[attention]
        self._target_weights = [_fuse_layer(layer) for layer in target.layers] if fused else []
        self._draft_weights = [_fuse_layer(layer) for layer in draft.layers] if fused and draft is not None else []
        cfg = target.cfg
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads

    # ------------------------------------------------------------------------------------------------ shared
    def _mask(self, limit: torch.Tensor, window: int) -> torch.Tensor:
        """Query (b, t) sees slots < limit[b, t], in the attention strategy's form."""
        return self.attn.prepare(limit, window, self.group, self.target.embed_tokens.weight.dtype)

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
        out = self.attn(q, kv[0][:, :, :window], kv[1][:, :, :window], mask, a.scale)
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
        if not self.fused:
            hidden, taps, _ = tgt(tokens, cache_len, kv, cache=InPlaceCache(window), attention=self.attn)
            return hidden, taps
        bsz, t = tokens.shape
        pos = cache_len.view(bsz, 1) + torch.arange(t, device=tokens.device).view(1, t)
        x = tgt.embed_tokens(tokens)
        cos, sin = tgt.rotary(pos, x.dtype)
        mask = self._mask(pos + 1, window)  # causal over the committed prefix and this chunk
        return self._target_fused(x, pos, cos, sin, kv, mask, window)

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
        if not self.fused:
            return d.backbone(anchor, ctx_taps, ctx_count, cache_len, kv, cache=InPlaceCache(window),
                              attention=self.attn)[0]
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
        return self._draft_fused(x, ctx_taps, ctx_count, ctx_pos, blk_pos, kv, mask, window)

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
