"""Gemma4's RMSNorm as one OpenAI-Triton kernel for the CUDA-graph target.

A Gemma4 layer has seven RMSNorms (input, q, k, v, post-attention, pre- and post-feed-forward); written as torch
ops each is about eight kernels (upcast, square, mean, add, power, two products, downcast), and inside a CUDA graph
each kernel still costs a few microseconds at batch 1 — most of the 12B step's time over its byte floor. This
kernel does one norm in one launch and folds in the residual add after a sandwich norm and the ``layer_scalar``
product, rounding where the torch ops round (:class:`~dspark_compile.models.gemma4.GemmaRMSNorm`: normalise and
scale in float32, round once; the add and the product each round to the model dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark_compile.targets.torch.kernels import pdl_enter, pdl_options


@triton.jit
def _gemma_norm_kernel(x_ptr, w_ptr, res_ptr, scale_ptr, cos_ptr, sin_ptr, out_ptr, N, INNER, OUTER_STRIDE, eps,
                       HAS_W: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, ROPE: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dt = out_ptr.dtype.element_ty
    outer = row // INNER
    src = x_ptr + outer * OUTER_STRIDE + (row % INNER) * N  # rows of a head-split projection view
    x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    y = x * r
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = y.to(dt).to(tl.float32)
    if ROPE:  # x·cos + rotate_half(x)·sin, rotate_half(x)[i] = -x[i + N/2] (first half), x[i - N/2] (second)
        half = N // 2
        partner = (offs + half) % N
        yp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32) * r
        if HAS_W:
            yp = yp * tl.load(w_ptr + partner, mask=mask, other=0.0).to(tl.float32)
        yp = tl.where(offs < half, -yp.to(dt).to(tl.float32), yp.to(dt).to(tl.float32))
        c = tl.load(cos_ptr + outer * N + offs, mask=mask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + outer * N + offs, mask=mask, other=0.0).to(tl.float32)
        y = ((y * c).to(dt).to(tl.float32) + (yp * sn).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    if HAS_RES:
        y = (tl.load(res_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32) + y).to(dt).to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr).to(tl.float32)
    tl.store(out_ptr + row * N + offs, y.to(dt), mask=mask)


def gemma_rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, *,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(residual + rmsnorm(x) · weight) · scale`` over the last axis, each part only when given, each step
    rounded to ``x``'s dtype as the torch ops do. ``weight`` is in the model dtype, ``scale`` a 1-element tensor.
    ``rope`` (cos, sin) [B, 1, T, D] with ``x`` [B, T, H, D]: RoPE applied to the norm's output (q/k heads)."""
    n = x.shape[-1]
    rows = x.flatten(0, -3) if x.dim() > 2 else x.reshape(1, -1, n)  # [outer, inner, n]
    if rope is not None:
        assert x.dim() == 4 and rope[0].shape == (x.shape[0], 1, x.shape[1], n)
        rope = (rope[0].contiguous(), rope[1].contiguous())
    if rows.stride(2) != 1 or rows.stride(1) != n:
        rows = rows.contiguous()
    if residual is not None:
        residual = residual.expand(x.shape).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _gemma_norm_kernel[(x.numel() // n,)](rows, weight if weight is not None else out, residual if residual
                                          is not None else out, scale if scale is not None else out,
                                          *(rope if rope is not None else (out, out)), out, n,
                                          rows.shape[1], rows.stride(0), eps,
                                          HAS_W=weight is not None, HAS_RES=residual is not None,
                                          HAS_SCALE=scale is not None, ROPE=rope is not None, BLOCK=block,
                                          num_warps=max(1, min(8, block // 512)), **pdl_options(x, _tokens(x)))
    return out


@triton.jit
def _norm_row(x, w, N, eps, HAS_W: tl.constexpr, dt: tl.constexpr):
    """GemmaRMSNorm of one row held in float32 (masked lanes zero) with weight ``w`` (float32, loaded by the
    caller before any store: a load after a store waits for it), rounded to ``dt`` once, as the torch ops."""
    y = x * (1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps))
    if HAS_W:
        y = y * w
    return y.to(dt).to(tl.float32)


@triton.jit
def _norm_rope_head(src, w_ptr, c, sn, offs, mask, N, eps, dt: tl.constexpr):
    """RoPE(GemmaRMSNorm(head)) of one head at ``src`` (weight ``w_ptr``), each op rounded like the torch ops:
    rotate_half reads the partner lane (i ± N/2) of the normed head, recomputed from a second load."""
    half = N // 2
    partner = (offs + half) % N
    x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    y = (x * r * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
    yp = (xp * r * tl.load(w_ptr + partner, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    yp = tl.where(offs < half, -yp, yp)
    return ((y * c).to(dt).to(tl.float32) + (yp * sn).to(dt).to(tl.float32)).to(dt)


@triton.jit
def _qkv_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, T, HQ, KVH, N,
                      c_sb, c_sh, c_ss, eps, SHARED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)  # row b·T + t
    h = tl.program_id(1)
    b = m // T
    t = m % T
    dt = q_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    row = qkv_ptr + m * (HQ + KVH * (1 if SHARED else 2)) * N
    c = tl.load(cos_ptr + m * N + offs, mask=mask, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + m * N + offs, mask=mask, other=0.0).to(tl.float32)
    if h < HQ:
        out = _norm_rope_head(row + h * N, qw_ptr, c, sn, offs, mask, N, eps, dt)
        tl.store(q_ptr + ((b * HQ + h) * T + t) * N + offs, out, mask=mask)
    else:
        kh = h - HQ
        slot = tl.load(slot_ptr + m)
        cache = b * c_sb + kh * c_sh + slot * c_ss
        cdt = k_ptr.dtype.element_ty
        src = row + (HQ + kh) * N
        v_src = src if SHARED else row + (HQ + KVH + kh) * N
        v = tl.load(v_src + offs, mask=mask, other=0.0).to(tl.float32)  # before the k store: no wait on it
        tl.store(k_ptr + cache + offs, _norm_rope_head(src, kw_ptr, c, sn, offs, mask, N, eps, dt).to(cdt), mask=mask)
        tl.store(v_ptr + cache + offs, _norm_row(v, v, N, eps, False, dt).to(cdt), mask=mask)


def qkv_into_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                   q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float, heads: int, kv_heads: int,
                   kv: torch.Tensor) -> torch.Tensor:
    """Gemma4's q/k/v after the fused q|k(|v) product, in one launch: q = RoPE(q_norm(q)) returned as
    [B, heads, T, d]; k = RoPE(k_norm(k)) and v = v_norm(v) (v = the raw k when the product has no v part:
    K = V layers) written in place into the padded cache ``kv`` [2, B, KV, S, D] at ``slots`` [B, T], in the
    [:kv_heads, :, :d] corner (the rest of the row is never read: :func:`models.gemma4.corner`).
    ``qkv`` [B, T, (heads + kv_heads·(1|2))·d]; ``cos``/``sin`` [B, 1, T, d]."""
    bsz, t, width = qkv.shape
    d = cos.shape[-1]
    shared = width == (heads + kv_heads) * d
    assert shared or width == (heads + 2 * kv_heads) * d
    assert kv[0].stride() == kv[1].stride() and kv.stride(-1) == 1 and slots.shape == (bsz, t)
    qkv, cos, sin, slots = qkv.contiguous(), cos.contiguous(), sin.contiguous(), slots.contiguous()
    q = torch.empty(bsz, heads, t, d, dtype=qkv.dtype, device=qkv.device)
    _, sh, ss, _ = kv[0].stride()
    _qkv_cache_kernel[(bsz * t, heads + kv_heads)](qkv, cos, sin, slots, q_norm, k_norm, q, kv[0], kv[1], t, heads,
                                                   kv_heads, d, kv[0].stride(0), sh, ss, eps, SHARED=shared,
                                                   BLOCK=triton.next_power_of_2(d), num_warps=max(1, d // 256),
                                                   **pdl_options(qkv, bsz * t))
    return q


@triton.jit
def _add_norm_norm_kernel(res_ptr, x_ptr, w1_ptr, w2_ptr, scale_ptr, sum_ptr, out_ptr, N, eps1, eps2,
                          HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(w1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (res + _norm_row(x, w1, N, eps1, True, dt)).to(dt)
    if HAS_SCALE:
        s = (s.to(tl.float32) * tl.load(scale_ptr).to(tl.float32)).to(dt)
    tl.store(sum_ptr + row * N + offs, s, mask=mask)
    tl.store(out_ptr + row * N + offs, _norm_row(s.to(tl.float32), w2, N, eps2, True, dt).to(dt), mask=mask)


def add_norm_norm(residual: torch.Tensor, x: torch.Tensor, first: tuple[torch.Tensor, float],
                  second: tuple[torch.Tensor, float],
                  scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """s = (residual + norm₁(x)) · scale (when given), then (s, norm₂(s)) in one launch: a sandwich norm's
    residual add followed by the next norm (Gemma4's post-attention norm, then the pre-feed-forward norm; the
    post-feed-forward norm with ``layer_scalar``, then the next layer's input norm); (weight, eps) per norm."""
    n = x.shape[-1]
    x, residual = x.contiguous(), residual.expand(x.shape).contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _add_norm_norm_kernel[(x.numel() // n,)](residual, x, first[0], second[0], scale if scale is not None else x,
                                             total, out, n, first[1], second[1], HAS_SCALE=scale is not None,
                                             BLOCK=block, num_warps=max(1, min(8, block // 512)),
                                             **pdl_options(x, _tokens(x)))
    return total, out


def _tokens(x: torch.Tensor) -> int:
    """Token rows of a [B, T, ...] activation (or [M, H] rows)."""
    return x.shape[0] * x.shape[1] if x.dim() >= 3 else x.shape[0]
