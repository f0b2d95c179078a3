"""Fused OpenAI-Triton kernels of the torch target's decode step.

A decode step of an 8B model is a few hundred matrix-vector products plus, written as plain torch ops, about
60 elementwise kernels per layer (RMSNorm alone is eight). Inside a CUDA graph each still costs a few
microseconds, which at batch 1 is as much as the weights' read time, so the step fuses them:

* :func:`add_rmsnorm` — residual add (in place) + RMSNorm, optionally copying the new residual into a tap slot;
* :func:`add_rmsnorm_deferred` — the same with the division by the RMS left to the product reading it
  (e4m3 products; ``DSPARK_DEFERRED_NORM=0`` turns it off);
* :func:`qk_norm_rope` — per-head q/k RMSNorm + RoPE on the fused q|k|v projection output, q written for
  attention, k and v written straight into the static KV cache at their slots (slot −1: not written);
* :func:`silu_mul` / :func:`gelu_tanh_mul` — SwiGLU's silu(gate) · up (GeGLU's GELU-tanh) on the fused gate|up
  projection output;
* :func:`decode_attention` — split-K attention for decode-sized queries (a batch-1 step is otherwise a
  handful of thread blocks reading the whole cache window);
* :func:`markov_greedy` / :func:`markov_sample` — the draft's Markov sampling, greedy or at temperature T, one
  launch per position instead of about ten (twenty at T > 0).

``add_rmsnorm`` and ``silu_mul`` write their output as the decode GEMM's fp16 product reads it where it runs that
product (:func:`as_gemm_input`).

On Hopper and later, each launch of at most :data:`PDL_TOKENS` token rows (a batch-1 round) uses programmatic
dependent launch (:func:`pdl_options`), as do the decode GEMM and Gemma4's norm kernels.

Each replays the rounding of the torch modules it replaces (``models/layers.py``): every torch op rounds to
the model dtype, so the kernels compute in float32 and round at the same points. Reductions and rsqrt may
differ from torch's by an ulp in float32. The kernels run on CUDA tensors, or on the CPU under
``TRITON_INTERPRET=1`` (how the tests check them).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from dspark_compile.runtime import sampling

PDL_TOKENS = 16
"""Token rows up to which a launch uses programmatic dependent launch: on the H200 it made the batch-1 round
faster and the batch-64 round slower (docs/BENCH.md, "Programmatic dependent launch")."""


def pdl_options(t: torch.Tensor, tokens: int) -> dict[str, object]:
    """Launch keywords for a kernel taking ``PDL`` that works on ``tokens`` token rows of ``t``'s device:
    programmatic dependent launch on Hopper and later for decode-sized launches (``DSPARK_PDL=0``, or
    false/off/no, turns it off, e.g. for a profiler that times kernels one by one). The kernel's blocks are
    dispatched while its predecessor runs and wait (:func:`pdl_enter`) before touching memory, which hides most
    of the launch gap between a decode step's few-microsecond kernels. Launches with and without it mix freely:
    one without waits for its predecessor as any stream-ordered launch does."""
    on = tokens <= PDL_TOKENS and t.is_cuda and _pdl_on(t.device.index)
    return {"PDL": True, "launch_pdl": True} if on else {}


def switched_on(name: str, default: bool = True) -> bool:
    """An environment switch (``DSPARK_PDL``, ``DSPARK_FUSED_PROPOSE``: on by default): 0, false, off or no turn it
    off, anything else on."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "off", "no")


@functools.cache
def _pdl_on(index: int | None) -> bool:
    return switched_on("DSPARK_PDL") and torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Wait until the previous kernel is done (its writes visible), then let the next one be dispatched: these
    kernels are short, so the next one's blocks are resident by the time this one ends."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _round(x, dtype: tl.constexpr):
    """Round float32 ``x`` to ``dtype`` and back: the rounding a torch op in ``dtype`` performs."""
    return x.to(dtype).to(tl.float32)


GEMM_IN_SCALE: tl.constexpr = tl.constexpr(2.0**-8)  # 0f3B800000 in bf16_to_f16_scaled
"""Activations times this become fp16 for the decode GEMM's fp16 product (its conversion 2): exact for bf16
magnitudes in [2⁻⁶, 2²⁴] (bf16's 8 significant bits fit fp16's 11), absolute error ≤ 2⁻¹⁷ below; no overflow under
1.6e7."""


@triton.jit
def bf16_to_f16_scaled(x, ASM: tl.constexpr):
    """bf16 x · GEMM_IN_SCALE as fp16, exactly (through float32). In PTX: Triton would otherwise convert to fp16
    first and scale there, which overflows above 65504 and loses bits below 2⁻¹⁴. ``ASM`` False: the
    interpreter."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b16 l, h;
            .reg .f32 fl, fh;
            mov.b32 {l, h}, $1;
            cvt.f32.bf16 fl, l;
            cvt.f32.bf16 fh, h;
            mul.rn.f32 fl, fl, 0f3B800000;
            mul.rn.f32 fh, fh, 0f3B800000;
            cvt.rn.f16x2.f32 $0, fh, fl;
            }""",
            constraints="=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=2)
    return (x.to(tl.float32) * GEMM_IN_SCALE).to(tl.float16)


@triton.jit
def as_gemm_input(v, dt: tl.constexpr, PRESCALED: tl.constexpr, ASM: tl.constexpr):
    """float32 ``v`` as a product's input: rounded to ``dt``, or (``PRESCALED``, bf16 models only) rounded to bf16
    and converted as the decode GEMM's fp16 product converts it in each K tile (:func:`bf16_to_f16_scaled`, the
    same instructions): written once by the producer, the product's loop skips the conversion. ``ASM`` False: the
    interpreter."""
    if PRESCALED:  # noqa: SIM108 (one return, no ternary: Triton refuses returns of different types, taken or not)
        out = bf16_to_f16_scaled(v.to(tl.bfloat16), ASM)
    else:
        out = v.to(dt)
    return out


@dataclass(frozen=True)
class RowNorm:
    """An RMSNorm whose division by each row's root mean square is left to the product that reads its output
    (:func:`add_rmsnorm_deferred`): the float32 sums of squares of each row's chunks of columns, [M, chunks], which
    the product adds in chunk order (:func:`rstd_of_sums`) to scale its output rows (W·(w ⊙ x)·rsqrt(mean(x²) + eps),
    the norm's value up to rounding). The norm then needs no reduction across its row, so it runs many programs per
    row and can take its input's split-K :class:`Partials`, and the product before it drops its own reduction."""

    sumsq: torch.Tensor
    width: int  # H, the row's length the mean divides by
    eps: float


@dataclass(frozen=True)
class Partials:
    """A split-K product handed over unsummed: the decode GEMM's float32 partials [S, M, N], which the consuming
    kernel (:func:`qk_norm_rope`, :func:`silu_mul`, :func:`add_rmsnorm_deferred`) adds in split order, scales per
    column (and per row: ``norm``) and rounds to ``dtype`` as it loads them (:func:`product_sum`,
    :func:`product_value`): the bits the GEMM would have stored. The GEMM's programs then end at their partial,
    with no arrival count and no last program going over the partials again
    (``decode_gemm.decode_linear(..., handoff=True)``). Consumers with many programs per row only: in
    :func:`add_rmsnorm`'s one program per row, reading every partial of the row was slower (docs/BENCH.md)."""

    part: torch.Tensor
    scale: torch.Tensor | None  # float32, one per column (an [N, 1] per-channel scale); None: nothing to scale
    shift: float  # the power of two the GEMM's conversion folds into the scale (decode_gemm.SHIFTS)
    dtype: torch.dtype
    norm: RowNorm | None = None  # the input's deferred RMSNorm, which the rows are scaled by

    @property
    def shape(self) -> torch.Size:
        return self.part.shape[1:]

    @property
    def device(self) -> torch.device:
        return self.part.device


def product_args(t: torch.Tensor | Partials) -> tuple[tuple[object, ...], dict[str, object]]:
    """A consumer kernel's arguments for a product input: (values, scale, plane, norm sums, norm width, norm eps)
    and the constexprs of :func:`product_sum` and :func:`product_value`."""
    if isinstance(t, Partials):
        splits, m, n = t.part.shape
        scale = t.part if t.scale is None else t.scale
        norm = t.norm
        args = (t.part, scale, m * n, t.part if norm is None else norm.sumsq, 1 if norm is None else norm.width,
                0.0 if norm is None else norm.eps)
        return args, {"PARTS": splits, "SCALED": t.scale is not None, "SHIFT": t.shift,
                      "NORM": 0 if norm is None else norm.sumsq.shape[1]}
    assert t.is_contiguous()
    return (t, t, t.numel(), t, 1, 0.0), {}


@triton.jit
def rstd_of_sums(sums, width, eps, CHUNKS: tl.constexpr):
    """1 / the root mean square of each row of a :class:`RowNorm`'s chunk sums loaded as a [rows, CHUNKS] tile,
    the chunks added in chunk order (each picked out exactly, by a sum of it and zeros): the same bits whatever the
    caller's tile of rows. The decode GEMM loads its tile before its weight stream and adds it after."""
    chunk = tl.arange(0, CHUNKS)[None, :]
    total = tl.sum(tl.where(chunk == 0, sums, 0.0), axis=1)
    for c in tl.static_range(1, CHUNKS):
        total += tl.sum(tl.where(chunk == c, sums, 0.0), axis=1)
    return tl.rsqrt(total / width + eps)


@triton.jit
def row_rstd(n_ptr, row, width, eps, CHUNKS: tl.constexpr):
    """:func:`rstd_of_sums` of row ``row`` (a scalar) of a :class:`RowNorm`, for a consumer of handed-over
    partials: the same sum in the same order (the interpreter tests hold the two to the same bits), its chunks
    loaded one by one. As a tile, their reduction's shuffles came before the product's loads in the sm_90 SASS,
    two memory round trips in series; one by one, every load of the consumer is issued at its start. (The decode
    GEMM keeps the tile: it loads it before its weight stream and reduces it after.)"""
    total = tl.load(n_ptr + row * CHUNKS)
    for c in tl.static_range(1, CHUNKS):
        total += tl.load(n_ptr + row * CHUNKS + c)
    return tl.rsqrt(total / width + eps)


@triton.jit
def product_sum(ptr, s_ptr, offs, col, mask, plane, PARTS: tl.constexpr, SCALED: tl.constexpr,
                SHIFT: tl.constexpr):
    """A product's values at ``offs`` (column ``col``) as float32: loaded, or (``PARTS`` > 0: that many split-K
    partials) its partials added in split order from zero, times scale · ``SHIFT`` where ``SCALED``. Every load of
    a consumer's products comes first; :func:`product_value` then finishes them. The split count is a constant, so
    the loop unrolls and every partial's load is in flight at once."""
    if PARTS:
        acc = tl.zeros(offs.shape, dtype=tl.float32)
        for sp in tl.static_range(PARTS):
            acc += tl.load(ptr + sp * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
        if SCALED:
            acc *= tl.load(s_ptr + col, mask=mask, other=0.0) * SHIFT
        return acc
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def product_value(acc, r, dt: tl.constexpr, PARTS: tl.constexpr, NORM: tl.constexpr):
    """:func:`product_sum`'s values times the row's factor ``r`` where ``NORM`` (:func:`row_rstd`), rounded to
    ``dt`` where they were partials: the decode GEMM's own last-program sum and store (``decode_gemm._store``), bit
    for bit."""
    if PARTS:
        if NORM:
            acc *= r
        return _round(acc, dt)
    return acc


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, d_scale_ptr, d_plane, d_norm_ptr, d_norm_w, d_norm_eps, w_ptr, out_ptr,
                        tap_ptr, tap_stride, sumsq_ptr, H, eps, out_group, out_stride, HAS_DELTA: tl.constexpr,
                        HAS_TAP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                        PRESCALED: tl.constexpr = False, ASM: tl.constexpr = True, DEFERRED: tl.constexpr = False,
                        PARTS: tl.constexpr = 0, SCALED: tl.constexpr = False, SHIFT: tl.constexpr = 1.0,
                        NORM: tl.constexpr = 0, GROUPED: tl.constexpr = False):
    """Program (row, chunk): ``DEFERRED`` off, one chunk is the whole row; on, the chunk's sum of squares is stored
    instead of the row being divided by its RMS (:class:`RowNorm`). ``GROUPED``: output rows come in groups of
    ``out_group``, ``out_stride`` elements apart."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    dt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # every load before the first store (below)
    if HAS_DELTA:
        d = product_value(product_sum(d_ptr, d_scale_ptr, row * H + offs, offs, mask, d_plane, PARTS, SCALED, SHIFT),
                          1.0, dt, PARTS, 0)  # (a delta never carries a row norm: _add_norm asserts it)
        x = _round(x + d, dt)
        tl.store(x_ptr + row * H + offs, x.to(dt), mask=mask)
    if HAS_TAP:
        tl.store(tap_ptr + row * tap_stride + offs, x.to(tap_ptr.dtype.element_ty), mask=mask)
    if DEFERRED:
        tl.store(sumsq_ptr + row * tl.num_programs(1) + chunk, tl.sum(x * x, axis=0))
        y = x
    else:
        var = tl.sum(x * x, axis=0) / H
        y = _round(x * tl.rsqrt(var + eps), dt)
    dst = (row // out_group) * out_stride + (row % out_group) * H if GROUPED else row * H
    tl.store(out_ptr + dst + offs, as_gemm_input(w * y, dt, PRESCALED, ASM), mask=mask)


NORM_CHUNK = 256
"""Columns per program of :func:`add_rmsnorm_deferred` (16 programs per row of Qwen3-8B's 4096; the count is rounded
up to a power of two, extra programs storing a zero sum)."""


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | Partials | None, weight: torch.Tensor, eps: float,
                tap: torch.Tensor | None = None, *, prescaled: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``x += delta`` in place (when given), ``tap[:] = x`` (when given), return ``weight * rmsnorm(x)``, or
    (``prescaled``) it as the decode GEMM's fp16 product input (:func:`as_gemm_input`). One program per row.

    ``x``/``delta`` are contiguous [M, H]; ``tap`` is an [M, H] column slice of a contiguous tap buffer; ``out``
    [B, M / B, H] (rows contiguous, each group's rows adjacent: a slice of a larger row buffer, as the draft's
    context and block rows share one) is written and returned instead of a new [M, H].
    """
    return _add_norm(x, delta, weight, eps, tap, prescaled, 0, out)[0]


def add_rmsnorm_deferred(x: torch.Tensor, delta: torch.Tensor | Partials | None, weight: torch.Tensor, eps: float,
                         tap: torch.Tensor | None = None, *, prescaled: bool = False,
                         chunk: int | None = None) -> tuple[torch.Tensor, RowNorm]:
    """:func:`add_rmsnorm` with the division by the RMS left to the product reading the result: returns
    ``weight * x`` (rounded as the product's input) and the :class:`RowNorm` that product takes
    (``decode_gemm.decode_linear(..., row_norm=)``). ``chunk`` columns per program (a power of two; default
    :data:`NORM_CHUNK`), whose sums of squares the product adds. ``delta`` may be the previous product's
    :class:`Partials`, summed here in parallel instead of by that product's last program."""
    return _add_norm(x, delta, weight, eps, tap, prescaled, chunk or NORM_CHUNK)  # type: ignore[return-value]


def _add_norm(x: torch.Tensor, delta: torch.Tensor | Partials | None, weight: torch.Tensor, eps: float,
              tap: torch.Tensor | None, prescaled: bool, chunk: int,
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, RowNorm | None]:
    m, h = x.shape
    assert x.is_contiguous() and (delta is None or isinstance(delta, Partials) or delta.is_contiguous())
    assert not prescaled or x.dtype == torch.bfloat16
    assert not isinstance(delta, Partials) or delta.norm is None
    grouped = out is not None
    if out is None:
        out = torch.empty_like(x, dtype=torch.float16 if prescaled else x.dtype)
    else:
        assert out.dim() == 3 and out.shape[0] * out.shape[1] == m and out.shape[2] == h, out.shape
        assert out.stride(2) == 1 and out.stride(1) == h and out.dtype == (torch.float16 if prescaled else x.dtype)
    assert chunk & (chunk - 1) == 0, f"a norm chunk is a power of two of columns, not {chunk}"
    block = chunk or triton.next_power_of_2(h)
    chunks = triton.next_power_of_2(triton.cdiv(h, block))  # a power of two (the GEMM loads them as one tile):
    # programs past the row's end store a zero sum
    norm = RowNorm(torch.empty(m, chunks, dtype=torch.float32, device=x.device), h, eps) if chunk else None
    tap_stride = tap.stride(0) if tap is not None else 0
    if tap is not None:
        assert tap.stride(1) == 1 and tap.shape == x.shape
    args, parts = product_args(delta if delta is not None else x)
    group, stride = (out.shape[1], out.stride(0)) if grouped else (m, 0)
    _add_rmsnorm_kernel[(m, chunks)](x, *args, weight, out, tap if tap is not None else x, tap_stride,
                                     x if norm is None else norm.sumsq, h, eps, max(group, 1), stride,
                                     HAS_DELTA=delta is not None, HAS_TAP=tap is not None, BLOCK=block,
                                     num_warps=max(1, min(8, block // 512)), PRESCALED=prescaled, ASM=x.is_cuda,
                                     DEFERRED=norm is not None, GROUPED=grouped, **parts, **pdl_options(x, m))
    return out, norm


@triton.jit
def _head_sums(src, s_ptr, start, col, plane, offs, mask, HALF, PARTS: tl.constexpr, SCALED: tl.constexpr,
               SHIFT: tl.constexpr):
    """:func:`product_sum` of one head's two halves of a q|k|v product row, from element ``start`` (column
    ``col``)."""
    return (product_sum(src, s_ptr, start + offs, col + offs, mask, plane, PARTS, SCALED, SHIFT),
            product_sum(src, s_ptr, start + HALF + offs, col + HALF + offs, mask, plane, PARTS, SCALED, SHIFT))


@triton.jit
def _head_norm(x1, x2, w1, w2, HALF, eps, dt: tl.constexpr):
    """The per-head RMSNorm of one head's halves with weight halves w1/w2."""
    var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF)
    r = tl.rsqrt(var + eps)
    return _round(w1 * _round(x1 * r, dt), dt), _round(w2 * _round(x2 * r, dt), dt)


@triton.jit
def _rope(y1, y2, c1, c2, s1, s2, dt: tl.constexpr):
    """x·cos + rotate_half(x)·sin with rotate_half(x) = [−x2, x1], rounding after each op like torch."""
    o1 = _round(_round(y1 * c1, dt) + _round(-y2 * s1, dt), dt)
    o2 = _round(_round(y2 * c2, dt) + _round(y1 * s2, dt), dt)
    return o1, o2


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, p_scale_ptr, p_plane, p_norm_ptr, p_norm_w, p_norm_eps, cos_ptr, sin_ptr,
                         slot_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, R, Q_START, HQ, KVH, HALF, c_sb, c_sh, c_ss,
                         eps, pos_ptr, P, BLOCK: tl.constexpr, PDL: tl.constexpr = False, PARTS: tl.constexpr = 0,
                         SCALED: tl.constexpr = False, SHIFT: tl.constexpr = 1.0, NORM: tl.constexpr = 0,
                         TABLE: tl.constexpr = False):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = m // R
    r = m % R
    d = 2 * HALF
    dt = q_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    row = m * (HQ + 2 * KVH) * d
    at = tl.minimum(tl.load(pos_ptr + m), P - 1) * d if TABLE else m * d  # a table's row: the row's position
    c1 = tl.load(cos_ptr + at + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + at + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + at + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + at + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if h < HQ:
        if r >= Q_START:
            w1 = tl.load(qw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(qw_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            a1, a2 = _head_sums(qkv_ptr, p_scale_ptr, row + h * d, h * d, p_plane, offs, mask, HALF, PARTS, SCALED,
                                SHIFT)
            rf = row_rstd(p_norm_ptr, m, p_norm_w, p_norm_eps, NORM) if NORM else 1.0
            x1, x2 = product_value(a1, rf, dt, PARTS, NORM), product_value(a2, rf, dt, PARTS, NORM)
            y1, y2 = _head_norm(x1, x2, w1, w2, HALF, eps, dt)
            o1, o2 = _rope(y1, y2, c1, c2, s1, s2, dt)
            dst = q_ptr + ((b * HQ + h) * (R - Q_START) + (r - Q_START)) * d
            tl.store(dst + offs, o1.to(dt), mask=mask)
            tl.store(dst + HALF + offs, o2.to(dt), mask=mask)
    else:
        kh = h - HQ
        slot = tl.load(slot_ptr + m)
        if slot >= 0:
            w1 = tl.load(kw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(kw_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            a1, a2 = _head_sums(qkv_ptr, p_scale_ptr, row + (HQ + kh) * d, (HQ + kh) * d, p_plane, offs, mask,
                                HALF, PARTS, SCALED, SHIFT)
            # v loaded with k, before the stores (a load after a store waits for it)
            b1, b2 = _head_sums(qkv_ptr, p_scale_ptr, row + (HQ + KVH + kh) * d, (HQ + KVH + kh) * d, p_plane,
                                offs, mask, HALF, PARTS, SCALED, SHIFT)
            rf = row_rstd(p_norm_ptr, m, p_norm_w, p_norm_eps, NORM) if NORM else 1.0
            x1, x2 = product_value(a1, rf, dt, PARTS, NORM), product_value(a2, rf, dt, PARTS, NORM)
            v1, v2 = product_value(b1, rf, dt, PARTS, NORM), product_value(b2, rf, dt, PARTS, NORM)
            y1, y2 = _head_norm(x1, x2, w1, w2, HALF, eps, dt)
            o1, o2 = _rope(y1, y2, c1, c2, s1, s2, dt)
            cache = b * c_sb + kh * c_sh + slot * c_ss
            cdt = k_ptr.dtype.element_ty
            tl.store(k_ptr + cache + offs, o1.to(cdt), mask=mask)
            tl.store(k_ptr + cache + HALF + offs, o2.to(cdt), mask=mask)
            tl.store(v_ptr + cache + offs, v1.to(cdt), mask=mask)
            tl.store(v_ptr + cache + HALF + offs, v2.to(cdt), mask=mask)


def qk_norm_rope(qkv: torch.Tensor | Partials, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float, q_out: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, *, rows: int, q_start: int,
                 positions: torch.Tensor | None = None) -> None:
    """Normalise/rotate the q|k|v rows of ``qkv`` [B·rows, (Hq+2KV)·D] and store them.

    ``cos``/``sin`` [B·rows, D] per row, or (``positions`` [B·rows] int64) tables [P, D] indexed by each row's
    position (``StaticProgram.rope_table``: no rotary launches per step; a position past the table reads its
    last row, which only a row written nowhere has); ``slots`` [B·rows] int64 cache slot of each row's k/v (−1 =
    skip);
    rows ``r >= q_start`` of each batch entry are queries, written to ``q_out`` [B, Hq, rows − q_start, D];
    ``k_cache``/``v_cache`` are [B, KV, S, D] views with a contiguous last axis. ``qkv`` may be the product's
    :class:`Partials`.
    """
    m = qkv.shape[0]
    _, hq, _, d = q_out.shape
    kvh = k_cache.shape[1]
    args, parts = product_args(qkv)
    assert cos.is_contiguous() and sin.is_contiguous() and q_out.is_contiguous() and qkv.dtype == q_out.dtype
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and d % 2 == 0
    sb, sh, ss, _ = k_cache.stride()
    half = d // 2
    table = positions is not None
    assert not table or (positions.shape == (m,) and positions.dtype == torch.int64)
    _qk_norm_rope_kernel[(m, hq + kvh)](*args, cos, sin, slots, q_norm, k_norm, q_out, k_cache, v_cache, rows,
                                        q_start, hq, kvh, half, sb, sh, ss, eps,
                                        positions if table else slots, cos.shape[0],
                                        BLOCK=triton.next_power_of_2(half), num_warps=1, TABLE=table, **parts,
                                        **pdl_options(q_out, m))


@triton.jit
def glu_value(g, u, dt: tl.constexpr, GELU_TANH: tl.constexpr):
    """act(gate) · up in float32 from gate and up already rounded to ``dt`` (as the product stores them), the
    activation rounded to ``dt`` as torch's op returns it: the one definition :func:`silu_mul`,
    :func:`gelu_tanh_mul` and the decode GEMM's GLU store (``decode_gemm.decode_glu``) share: the same bits."""
    if GELU_TANH:  # torch's GELU(approximate="tanh") in float32; tanh(z) = 1 - 2 / (1 + exp(2z))
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        s = _round(0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * inner))), dt)
    else:
        s = _round(g / (1.0 + tl.exp(-g)), dt)
    return s * u


@triton.jit
def _act_mul_kernel(gu_ptr, p_scale_ptr, p_plane, p_norm_ptr, p_norm_w, p_norm_eps, out_ptr, INTER,
                    GELU_TANH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False, PARTS: tl.constexpr = 0,
                    SCALED: tl.constexpr = False, SHIFT: tl.constexpr = 1.0, PRESCALED: tl.constexpr = False,
                    ASM: tl.constexpr = True, NORM: tl.constexpr = 0, PAIRED: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    dt = tl.bfloat16 if PRESCALED else out_ptr.dtype.element_ty  # prescaled: a bf16 model's fp16 product input
    start = row * 2 * INTER
    g_col = 2 * offs if PAIRED else offs  # PAIRED: gate j and up j side by side (decode_gemm.DecodeWeight.paired)
    u_col = g_col + 1 if PAIRED else INTER + offs
    g = product_sum(gu_ptr, p_scale_ptr, start + g_col, g_col, mask, p_plane, PARTS, SCALED, SHIFT)
    u = product_sum(gu_ptr, p_scale_ptr, start + u_col, u_col, mask, p_plane, PARTS, SCALED, SHIFT)
    r = row_rstd(p_norm_ptr, row, p_norm_w, p_norm_eps, NORM) if NORM else 1.0
    g, u = product_value(g, r, dt, PARTS, NORM), product_value(u, r, dt, PARTS, NORM)
    tl.store(out_ptr + row * INTER + offs, as_gemm_input(glu_value(g, u, dt, GELU_TANH), dt, PRESCALED, ASM),
             mask=mask)


def glu_mul(gate_up: torch.Tensor | Partials, *, gelu_tanh: bool = False, prescaled: bool = False,
            paired: bool = False) -> torch.Tensor:
    """:func:`silu_mul` (``gelu_tanh``: :func:`gelu_tanh_mul`) for callers that serve either GLU (the decode GEMM's
    unfused path, ``static_forward._Linear.glu``)."""
    two_i = gate_up.shape[-1]
    inter = two_i // 2
    args, parts = product_args(gate_up)
    assert not prescaled or gate_up.dtype == torch.bfloat16
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=torch.float16 if prescaled else gate_up.dtype,
                      device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    rows = out.numel() // inter
    _act_mul_kernel[(rows, triton.cdiv(inter, block))](*args, out, inter, GELU_TANH=gelu_tanh, BLOCK=block,
                                                        num_warps=4, PRESCALED=prescaled, ASM=out.is_cuda,
                                                        PAIRED=paired, **parts, **pdl_options(out, rows))
    return out


def silu_mul(gate_up: torch.Tensor | Partials, *, prescaled: bool = False, paired: bool = False) -> torch.Tensor:
    """[..., 2I] (gate | up; a product's :class:`Partials` too) -> silu(gate) · up, [..., I] (SwiGLU: Qwen3);
    ``prescaled``: as the decode GEMM's fp16 product input (:func:`as_gemm_input`); ``paired``: the columns are
    gate 0, up 0, gate 1, up 1, … (a weight in ``decode_gemm.DecodeWeight.paired`` order)."""
    return glu_mul(gate_up, prescaled=prescaled, paired=paired)


def gelu_tanh_mul(gate_up: torch.Tensor | Partials, *, paired: bool = False) -> torch.Tensor:
    """[..., 2I] (gate | up) -> gelu_tanh(gate) · up, [..., I] (GeGLU: Gemma4), the GELU rounded to the dtype first;
    ``paired`` as :func:`silu_mul` takes it."""
    return glu_mul(gate_up, gelu_tanh=True, paired=paired)


@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, limit_ptr, low_ptr, top_ptr, part_o, part_m, part_l, T, GROUP, KVH, W,
                       CHUNK, SPLITS, c_sb, c_sh, c_ss, scale, D: tl.constexpr, DP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LOW: tl.constexpr, RING: tl.constexpr,
                       PDL: tl.constexpr = False):
    pdl_enter(PDL)
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // KVH
    kvh = bh % KVH
    mq = GROUP * T
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's block of query rows
    rmask = rows < mq
    lim = tl.load(limit_ptr + b * T + rows % T, mask=rmask, other=0)  # query row g·T + t sees slots < limit[b, t]
    low = tl.zeros([BLOCK_M], tl.int64)
    if HAS_LOW:
        low = tl.load(low_ptr + b * T + rows % T, mask=rmask, other=0)  # ... and >= low[b, t]
    d = tl.arange(0, DP)  # the head dim padded to a power of two; lanes >= D load zeros and are not stored
    dmask = d < D
    q = tl.load(q_ptr + (bh * mq + rows)[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, W)
    top = 0
    if RING:  # a ring of W slots: slot s holds position top - ((top - s) mod W)
        top = tl.load(top_ptr + b * T)
    if HAS_LOW and not RING:  # skip the tiles below every row's window (a sliding layer reads ~its window)
        first = tl.min(tl.where(rmask, low, W), axis=0)
        start = tl.maximum(start, first // BLOCK_N * BLOCK_N)  # tiles stay on the BLOCK_N grid: the same bits
    base = b * c_sb + kvh * c_sh
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kmask = cols < end
        offs = base + cols[:, None] * c_ss + d[None, :]
        k = tl.load(k_ptr + offs, mask=kmask[:, None] & dmask[None, :], other=0.0)
        # V with K: both tiles in flight at once (a program's time is its loads' latency; measured for Gemma4's
        # wide heads in docs/BENCH.md, "Fourth pass")
        v = tl.load(v_ptr + offs, mask=kmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        held = cols
        if RING:
            held = top - (top - cols + W) % W
            kmask = kmask & (held >= 0)
        vis = (held[None, :] < lim[:, None]) & (held[None, :] >= low[:, None]) & kmask[None, :]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m_i - m_new))
        p = tl.where(vis, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    part = (bh * SPLITS + split) * mq + rows
    tl.store(part_m + part, m_i, mask=rmask)
    tl.store(part_l + part, l_i, mask=rmask)
    tl.store(part_o + part[:, None] * D + d[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _attn_combine_kernel(part_o, part_m, part_l, out_ptr, MQ, SPLITS, T, GROUP, KVH, D: tl.constexpr,
                         DP: tl.constexpr, BLOCK_S: tl.constexpr, TOKEN_MAJOR: tl.constexpr = False,
                         PRESCALED: tl.constexpr = False, ASM: tl.constexpr = True, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    r = tl.program_id(0).to(tl.int64)
    bh = r // MQ
    i = r % MQ  # query row g·T + t of KV head bh % KVH
    dst = r  # [B, Hq, T] order
    if TOKEN_MAJOR:  # [B, T, Hq] order: the heads of a token side by side, as the o projection reads them
        dst = ((bh // KVH) * T + i % T) * (KVH * GROUP) + (bh % KVH) * GROUP + i // T
    s = tl.arange(0, BLOCK_S)
    smask = s < SPLITS
    idx = (bh * SPLITS + s) * MQ + i
    m = tl.load(part_m + idx, mask=smask, other=float("-inf"))
    l_s = tl.load(part_l + idx, mask=smask, other=0.0)
    top = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
    d = tl.arange(0, DP)
    o = tl.load(part_o + idx[:, None] * D + d[None, :], mask=smask[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l_s, axis=0)
    tl.store(out_ptr + dst * D + d, as_gemm_input(out, out_ptr.dtype.element_ty, PRESCALED, ASM), mask=d < D)


def split_chunk(programs: int, processors: int, nominal_window: int = 1024) -> int:
    """Slots per split-K program: about two programs per multiprocessor over a ``nominal_window``-slot window,
    a power of two from 64. At batch 64 the (batch, KV head) pairs alone fill the GPU, and more splits only add
    float32 partials to write and merge (20 % of the 8B verify step there with 64-slot chunks). At batch 1, 128-slot
    splits (two key tiles a program, half the partials to merge) were slower on an H100 (docs/BENCH.md).

    It depends on the batch only, never on the window: slots split the same way whatever window bucket a
    round runs in (trailing splits are fully masked and add exact zeros), so a row's attention output is the
    same bits in any window — what lets a replayed run follow its reference token for token.
    """
    splits = max(1, -(-2 * processors // programs))
    chunk = 64
    while chunk * 2 * splits <= nominal_window:
        chunk *= 2
    return chunk


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, limit: torch.Tensor, scale: float, *,
                     chunk: int | None = None, low: torch.Tensor | None = None,
                     ring_top: torch.Tensor | None = None, token_major: bool = False,
                     prescaled: bool = False) -> torch.Tensor:
    """Split-K ("flash decoding") attention for a few query rows per request.

    q [B, Hq, T, D] contiguous; k/v [B, KV, W, D] cache windows (last axis contiguous, same strides); query
    (b, ·, t) sees slots < limit[b, t] and, given ``low``, >= low[b, t] (a sliding window). Grid: one program
    per (b, KV head, chunk of ``chunk`` slots, default :func:`split_chunk`, block of query rows), so a batch-1
    step still spreads over the GPU; a second kernel merges the chunks' softmax partials.
    The row block is a function of (group · T, D) alone, and 16 rows wherever a tile would pass 64 × 128
    elements (Gemma4's 512-wide global heads: the 16 × 8 rows of a verify block run as eight 16-row blocks, the
    tile a 16-row target-only step uses). Any head dim: lanes are padded to a power of two. Given ``low``, a
    program skips the key tiles below all its rows' windows (exact: a fully masked tile adds nothing).
    ``ring_top`` [B, T] (each row's value at t = 0 is read): k/v are a ring of W slots whose slot s holds position
    ``top - ((top - s) mod W)`` (negative: empty), and ``limit``/``low`` bound positions instead of slots
    (Gemma4's sliding layers in the CUDA-graph target: ``models.gemma4.RingWindow``); no tile is skipped.
    Returns [B, Hq, T, D] in q's dtype, or with ``token_major`` [B, T, Hq, D] (written so by the merge: the o
    projection's input without a transposing copy, 36 launches of a verify step before); ``prescaled`` (bf16
    q): fp16, as the decode GEMM's fp16 product reads it (:func:`as_gemm_input`). Scores and sums in float32.
    """
    bsz, hq, t, dh = q.shape
    kvh, window = k.shape[1], k.shape[2]
    group = hq // kvh
    mq = group * t
    assert q.is_contiguous() and k.stride() == v.stride() and k.stride(-1) == 1 and limit.is_contiguous()
    assert low is None or (low.shape == limit.shape and low.is_contiguous())
    assert ring_top is None or (ring_top.shape == limit.shape and ring_top.is_contiguous())
    if chunk is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        chunk = split_chunk(bsz * kvh, sms)
    splits = triton.cdiv(window, chunk)
    part_o = torch.empty(bsz * kvh, splits, mq, dh, dtype=torch.float32, device=q.device)
    part_m = torch.empty(bsz * kvh, splits, mq, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    sb, sh, ss, _ = k.stride()
    dp = triton.next_power_of_2(dh)
    block_m = max(16, triton.next_power_of_2(mq))
    if block_m * dp > 64 * 128:
        block_m = 16
    block_n = min(64, chunk, max(32, 8192 // dp))  # K and V tiles of 16 KiB, 32 KiB for 512-wide heads (Gemma4's
    # global layers: half the tiles per program; 64 KiB was slower for 256-wide ones, docs/BENCH.md)
    grid = (bsz * kvh, splits, triton.cdiv(mq, block_m))
    _attn_split_kernel[grid](q, k, v, limit, low if low is not None else limit,
                             ring_top if ring_top is not None else limit, part_o, part_m, part_l,
                             t, group, kvh, window, chunk, splits, sb, sh, ss, scale, D=dh, DP=dp,
                             BLOCK_M=block_m, BLOCK_N=block_n, HAS_LOW=low is not None, RING=ring_top is not None,
                             num_warps=4, **pdl_options(q, bsz * t))
    assert not prescaled or q.dtype == torch.bfloat16
    shape = (bsz, t, hq, dh) if token_major else q.shape
    out = q.new_empty(shape, dtype=torch.float16 if prescaled else q.dtype)
    _attn_combine_kernel[(bsz * kvh * mq,)](part_o, part_m, part_l, out, mq, splits, t, group, kvh, D=dh, DP=dp,
                                            BLOCK_S=max(2, triton.next_power_of_2(splits)), TOKEN_MAJOR=token_major,
                                            PRESCALED=prescaled, ASM=q.is_cuda,
                                            num_warps=4 if dp >= 256 else 1,  # wide heads: a warp per row was slow
                                            **pdl_options(q, bsz * t))
    return out


_GOLDEN: tl.constexpr = tl.constexpr(sampling._GOLDEN)  # runtime.sampling's constants, not written again
_M1: tl.constexpr = tl.constexpr(sampling._M1)
_M2: tl.constexpr = tl.constexpr(sampling._M2)


@triton.jit
def _shr64(x, K: tl.constexpr):
    """Logical right shift of int64, as ``runtime.sampling._shr``."""
    return (x >> K) & ((1 << (64 - K)) - 1)


@triton.jit
def _mix64(z):
    """splitmix64's finalizer, as ``runtime.sampling._mix`` (int64 products wrap)."""
    z = (z ^ _shr64(z, 30)) * _M1
    z = (z ^ _shr64(z, 27)) * _M2
    return z ^ _shr64(z, 31)


@triton.jit
def _uniforms_at(seed, counter, j):
    """Numbers ``counter + j`` of the stream ``seed`` (integer scalars, ``j`` a range): ``counter_uniforms``."""
    key = _mix64(seed.to(tl.int64) * _GOLDEN + _GOLDEN)
    z = _mix64(key + (counter.to(tl.int64) + j + 1) * _GOLDEN)
    return _shr64(z, 40).to(tl.float32) * (1.0 / (1 << 24))


@triton.jit
def _counter_uniforms_kernel(seed_ptr, counter_ptr, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    u = _uniforms_at(tl.load(seed_ptr + b), tl.load(counter_ptr + b), j)
    tl.store(out_ptr + b * n + j, u, mask=j < n)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """``runtime.sampling.counter_uniforms`` in one launch, the same bits: as torch ops it is about 30 elementwise
    launches, each a few microseconds of a round graph at small batch (sampling rounds, admission, the benchmark's
    acceptance replay)."""
    assert seeds.shape == counters.shape and seeds.dim() == 1
    out = torch.empty(seeds.shape[0], n, dtype=torch.float32, device=seeds.device)
    if seeds.shape[0]:
        _counter_uniforms_kernel[(seeds.shape[0],)](seeds, counters, out, n, BLOCK=triton.next_power_of_2(max(n, 1)),
                                                    num_warps=1, **pdl_options(out, seeds.shape[0]))
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 counters, zero, for kernels whose last program to finish (an atomic count of arrivals) completes
    the work (the decode GEMM's split-K sum, :func:`markov_greedy`'s argmax). Each such program resets its
    counter, so stream-ordered kernels share one buffer; allocated on a warm-up call, outside graph capture."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        counters = _COUNTERS[device] = torch.zeros(max(1 << 16, n), dtype=torch.int32, device=device)
    return counters


MARKOV_ROWS = 64
"""Batch rows up to which rounds run :func:`markov_greedy` (greedy) or :func:`markov_sample` (sampling), all rows in
one launch (the transition matrix read once per position): faster than the module's loop at every batch measured up
to 64 rows, and than row chunks of 16 at 32 and 64 (greedy, H200; sampling at 64, H100; ``benchmarks/
markov_kernel.py``, docs/BENCH.md); not measured above."""
MARKOV_TAIL_ROWS = 16
"""Rows the kernels' last program works on at a time (its tiles: 4096 elements, rows × blocks or hidden)."""


@triton.jit
def _markov_confidence(hidden_ptr, prev_ptr, prev_stride, w1_ptr, wc_ptr, bc_ptr, conf_ptr, k, B, H, G, stride_hb,
                       R: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                       CONF_MARKOV: tl.constexpr):
    """The confidence head's logit at position ``k``: proj · [h_k, W1[prev]] + b, rounded to the model dtype
    once, ``ROWS`` rows at a time."""
    for r0 in range(0, B, ROWS):
        tr = r0 + tl.arange(0, ROWS)
        tm = tr < B
        acc = tl.zeros((ROWS,), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            hm = hh < H
            x = tl.load(hidden_ptr + tr[:, None].to(tl.int64) * stride_hb + hh[None, :],
                        mask=tm[:, None] & hm[None, :], other=0.0)
            w = tl.load(wc_ptr + hh, mask=hm, other=0.0)
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32)[None, :], axis=1)
        if CONF_MARKOV:
            tp = tl.load(prev_ptr + tr * prev_stride, mask=tm, other=0)
            for j0 in range(0, R, BLOCK_R):
                j = j0 + tl.arange(0, BLOCK_R)
                e = tl.load(w1_ptr + tp[:, None] * R + j[None, :], mask=tm[:, None], other=0.0)
                acc += tl.sum(e.to(tl.float32) * tl.load(wc_ptr + H + j).to(tl.float32)[None, :], axis=1)
        conf = _round(acc + tl.load(bc_ptr).to(tl.float32), wc_ptr.dtype.element_ty)
        tl.store(conf_ptr + tr * G + k, conf, mask=tm)


@triton.jit
def _markov_block_logits(logits_ptr, hidden_ptr, prev_ptr, prev_stride, w1_ptr, w2_ptr, s2_ptr, wc_ptr, bc_ptr,
                         conf_ptr, k, B, V, H, G, stride_lb, stride_hb, pid, R: tl.constexpr,
                         BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                         TAIL_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, HAS_CONF: tl.constexpr,
                         CONF_MARKOV: tl.constexpr, PRECISION: tl.constexpr, W2_SCALED: tl.constexpr,
                         PDL: tl.constexpr):
    """Vocabulary block ``pid`` of position ``k``'s logits for every row, [BLOCK_V, BLOCK_B] float32 (−inf past
    V): base logits + W2·W1[prev], the bias rounded to the model dtype as ``nn.Linear`` returns it. The
    confidence head's logit needs only h_k and the previous token, so program 0 computes it beside its block.
    ``W2_SCALED``: W2 is e4m3 with a scale per vocabulary row, widened to the model dtype as ``Fp8Linear``
    dequantizes it (half the bytes)."""
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    prev = tl.load(prev_ptr + rows * prev_stride, mask=rmask, other=0)
    if HAS_CONF:  # noqa: SIM102 (a compile-time branch around a runtime one)
        if pid == 0:
            _markov_confidence(hidden_ptr, prev_ptr, prev_stride, w1_ptr, wc_ptr, bc_ptr, conf_ptr, k, B, H, G,
                               stride_hb, R, BLOCK_R, TAIL_ROWS, BLOCK_H, CONF_MARKOV)
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = v < V
    dt = w1_ptr.dtype.element_ty  # the product's dtype: its input's, W1[prev] (nn.Linear and Fp8Linear alike)
    if W2_SCALED:
        s2 = tl.load(s2_ptr + v, mask=vmask, other=0.0)
    base = tl.load(logits_ptr + rows[None, :].to(tl.int64) * stride_lb + v[:, None],
                   mask=vmask[:, None] & rmask[None, :], other=0.0)  # before the W2 loop: its latency overlaps it
    bias = tl.zeros((BLOCK_V, BLOCK_B), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        w2 = tl.load(w2_ptr + v[:, None].to(tl.int64) * R + j[None, :], mask=vmask[:, None], other=0.0)
        if W2_SCALED:
            w2 = (w2.to(tl.float32) * s2[:, None]).to(dt)
        e = tl.load(w1_ptr + prev[None, :] * R + j[:, None], mask=rmask[None, :], other=0.0)  # [BLOCK_R, BLOCK_B]
        bias = tl.dot(w2, e, bias, input_precision=PRECISION)
    if PDL:  # the next position's blocks are dispatched once this one's transition rows are read (not earlier:
        gdc_launch_dependents()  # waiting blocks would hold SM slots the stream needs, as for the decode GEMM)
    return tl.where(vmask[:, None], base.to(tl.float32) + _round(bias, dt), float("-inf"))


@triton.jit
def _markov_greedy_kernel(logits_ptr, hidden_ptr, prev_ptr, prev_stride, w1_ptr, w2_ptr, s2_ptr, wc_ptr, bc_ptr,
                          part_v, part_i, count_ptr, tok_ptr, conf_ptr, k, B, V, H, NV, G, stride_lb, stride_hb,
                          R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                          TAIL_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                          HAS_CONF: tl.constexpr, CONF_MARKOV: tl.constexpr, PRECISION: tl.constexpr,
                          W2_SCALED: tl.constexpr = False, PDL: tl.constexpr = False):
    """Position ``k`` of greedy Markov sampling: program v scores vocabulary block v for every row
    (:func:`_markov_block_logits`) and keeps its best; the last program to finish (an atomic counter) takes the
    first maximum over the blocks in order — argmax's choice — and writes the token. The tail works on
    ``TAIL_ROWS`` rows at a time with wide tiles (one load of every block's best at batch 1)."""
    if PDL:
        gdc_wait()
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    s = _markov_block_logits(logits_ptr, hidden_ptr, prev_ptr, prev_stride, w1_ptr, w2_ptr, s2_ptr, wc_ptr, bc_ptr,
                             conf_ptr, k, B, V, H, G, stride_lb, stride_hb, pid, R, BLOCK_V, BLOCK_B, BLOCK_R,
                             TAIL_ROWS, BLOCK_H, HAS_CONF, CONF_MARKOV, PRECISION, W2_SCALED, PDL)
    _block_best(s, v, V, part_v, part_i, rows, rmask, NV, pid)
    tl.debug_barrier()  # every thread's partial is written before the release below publishes it
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == NV - 1:
        for r0 in range(0, B, TAIL_ROWS):
            tr = r0 + tl.arange(0, TAIL_ROWS)
            tm = tr < B
            _, arg = _blocks_argmax(part_v, part_i, tr, tm, V, NV, TAIL_ROWS, BLOCK_C)
            tl.store(tok_ptr + tr * G + k, tl.where(arg == V, 0, arg).to(tl.int64), mask=tm)
        tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _block_best(x, v, V, part_v, part_i, rows, rmask, NV, pid):
    """Block ``pid``'s max and first argmax of ``x`` [BLOCK_V, BLOCK_B] for every row, stored as its partials;
    returns the max."""
    best = tl.max(x, axis=0)
    tl.store(part_v + rows * NV + pid, best, mask=rmask)
    tl.store(part_i + rows * NV + pid, tl.min(tl.where(x == best[None, :], v[:, None], V), axis=0), mask=rmask)
    return best


@triton.jit
def _blocks_argmax(part_v, part_i, tr, tm, V, NV, TAIL_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The first maximum over the blocks' bests in vocabulary order (a later block wins only if strictly
    greater): argmax's choice, and the maximum, for rows ``tr``."""
    top = tl.full((TAIL_ROWS,), float("-inf"), tl.float32)
    arg = tl.full((TAIL_ROWS,), V, tl.int32)
    for c0 in range(0, NV, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = tm[:, None] & (c < NV)[None, :]
        pv = tl.load(part_v + tr[:, None] * NV + c[None, :], mask=cm, other=float("-inf"), cache_modifier=".cg")
        pi = tl.load(part_i + tr[:, None] * NV + c[None, :], mask=cm, other=V, cache_modifier=".cg")
        cb = tl.max(pv, axis=1)
        ci = tl.min(tl.where(pv == cb[:, None], pi, V), axis=1)
        take = cb > top
        arg = tl.where(take, ci, arg)
        top = tl.where(take, cb, top)
    return top, arg


@triton.jit
def _softmax_rows(probs_ptr, stats_ptr, k, B, V, G, pid, BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr):
    """Block ``pid`` of position ``k``'s distribution, stored as z = logits / T: exp(z − max) / Σ, softmax's
    values (the max and the sum are the position's stats)."""
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = (v < V)[:, None] & rmask[None, :]
    m = tl.load(stats_ptr + (rows * G + k) * 2, mask=rmask, other=0.0)
    total = tl.load(stats_ptr + (rows * G + k) * 2 + 1, mask=rmask, other=1.0)
    ptr = probs_ptr + (rows[None, :].to(tl.int64) * G + k) * V + v[:, None]
    z = tl.load(ptr, mask=mk, other=float("-inf"))
    tl.store(ptr, tl.math.div_rn(tl.exp(z - m[None, :]), total[None, :]), mask=mk)


@triton.jit
def _markov_sample_kernel(logits_ptr, hidden_ptr, prev_ptr, prev_stride, w1_ptr, w2_ptr, s2_ptr, wc_ptr, bc_ptr,
                          temp_ptr, unif_ptr, unif_stride, probs_ptr, stats_ptr, part_m, part_s, part_i, count_ptr,
                          tok_ptr, conf_ptr, k, B, V, H, NV, G, stride_lb, stride_hb, R: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                          TAIL_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                          HAS_CONF: tl.constexpr, CONF_MARKOV: tl.constexpr, PRECISION: tl.constexpr,
                          W2_SCALED: tl.constexpr = False, PDL: tl.constexpr = False):
    """Position ``k`` of Markov sampling at temperature T: program v first finishes position k − 1's block v of
    the distribution (its stats are known once that launch's tail ran), then scores its block of position k
    (:func:`_markov_block_logits`), stores z = logits / T there and keeps the block's max, first argmax and
    Σ exp(z − max). The last program to finish takes the position's max and sum, each block's share of the
    mass, and draws by inverse CDF: the first block whose running share passes u · the total, then the first
    index inside it (reading the block's z back); rows at T ≤ 0 take argmax. One launch per position replaces
    the module's ~20 (softmax, cumulative sum, comparisons, argmaxes over the vocabulary)."""
    if PDL:
        gdc_wait()
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    if k > 0:
        _softmax_rows(probs_ptr, stats_ptr, k - 1, B, V, G, pid, BLOCK_V, BLOCK_B)
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    s = _markov_block_logits(logits_ptr, hidden_ptr, prev_ptr, prev_stride, w1_ptr, w2_ptr, s2_ptr, wc_ptr, bc_ptr,
                             conf_ptr, k, B, V, H, G, stride_lb, stride_hb, pid, R, BLOCK_V, BLOCK_B, BLOCK_R,
                             TAIL_ROWS, BLOCK_H, HAS_CONF, CONF_MARKOV, PRECISION, W2_SCALED, PDL)
    t = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    z = s * tl.math.div_rn(1.0, tl.where(t > 0, t, 1.0))[None, :]  # the module's logits · (1 / T); T ≤ 0: 1
    tl.store(probs_ptr + (rows[None, :].to(tl.int64) * G + k) * V + v[:, None], z,
             mask=(v < V)[:, None] & rmask[None, :])
    best = _block_best(z, v, V, part_m, part_i, rows, rmask, NV, pid)
    mass = tl.where(z > float("-inf"), tl.exp(z - best[None, :]), 0.0)  # a block of −inf only: 0, not NaN
    tl.store(part_s + rows * NV + pid, tl.sum(mass, axis=0), mask=rmask)
    tl.debug_barrier()  # every thread's partial is written before the release below publishes it
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == NV - 1:
        for r0 in range(0, B, TAIL_ROWS):
            tr = r0 + tl.arange(0, TAIL_ROWS)
            tm = tr < B
            top, arg = _blocks_argmax(part_m, part_i, tr, tm, V, NV, TAIL_ROWS, BLOCK_C)
            top = tl.where(tm, top, 0.0)
            total = tl.zeros((TAIL_ROWS,), tl.float32)
            for c0 in range(0, NV, BLOCK_C):
                total += tl.sum(_block_mass(part_m, part_s, tr, tm, c0 + tl.arange(0, BLOCK_C), NV, top), axis=1)
            total = tl.where(tm, total, 1.0)
            share_sum = tl.zeros((TAIL_ROWS,), tl.float32)  # Σ of the blocks' shares: the module's Σ probs
            for c0 in range(0, NV, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                share_sum += tl.sum(tl.math.div_rn(_block_mass(part_m, part_s, tr, tm, c, NV, top),
                                                   total[:, None]), axis=1)
            u = tl.load(unif_ptr + tr * unif_stride + k, mask=tm, other=0.0)
            threshold = u * share_sum
            found = tl.full((TAIL_ROWS,), NV, tl.int32)  # the first block whose running share passes it
            before = tl.zeros((TAIL_ROWS,), tl.float32)  # the running share before that block
            last = tl.full((TAIL_ROWS,), -1, tl.int32)  # else the last block with mass (rounding at u ≈ 1)
            carry = tl.zeros((TAIL_ROWS,), tl.float32)
            for c0 in range(0, NV, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                share = tl.math.div_rn(_block_mass(part_m, part_s, tr, tm, c, NV, top), total[:, None])
                run = tl.cumsum(share, axis=1) + carry[:, None]
                hit = tl.min(tl.where(run > threshold[:, None], c[None, :], NV), axis=1)
                first = (found == NV) & (hit < NV)
                before = tl.where(first, tl.sum(tl.where(c[None, :] == hit[:, None], run - share, 0.0), axis=1),
                                  before)
                found = tl.where(first, hit, found)
                last = tl.maximum(last, tl.max(tl.where(share > 0, c[None, :], -1), axis=1))
                carry += tl.sum(share, axis=1)
            crossed = found < NV
            blk = tl.where(crossed, found, tl.maximum(last, 0))
            vv = blk[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
            mv = tm[:, None] & (vv < V)
            zz = tl.load(probs_ptr + (tr[:, None].to(tl.int64) * G + k) * V + vv, mask=mv, other=float("-inf"),
                         cache_modifier=".cg")
            p = tl.math.div_rn(tl.exp(zz - top[:, None]), total[:, None])
            run = tl.cumsum(p, axis=1) + before[:, None]
            inside = tl.min(tl.where((run > threshold[:, None]) & mv & crossed[:, None], vv, V), axis=1)
            positive = tl.max(tl.where((p > 0) & mv, vv, -1), axis=1)
            drawn = tl.where(inside < V, inside, positive)
            drawing = tl.load(temp_ptr + tr, mask=tm, other=0.0) > 0  # T ≤ 0 (or NaN): argmax, as the z above
            tok = tl.where(drawing, drawn, tl.where(arg == V, 0, arg))
            tl.store(tok_ptr + tr * G + k, tok.to(tl.int64), mask=tm)
            tl.store(stats_ptr + (tr * G + k) * 2, top, mask=tm)
            tl.store(stats_ptr + (tr * G + k) * 2 + 1, total, mask=tm)
        tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _block_mass(part_m, part_s, tr, tm, c, NV, top):
    """Blocks ``c``'s probability mass for rows ``tr``, unnormalized: Σ exp(z − top) over each block, from its
    max and Σ exp(z − max)."""
    cm = tm[:, None] & (c < NV)[None, :]
    pm = tl.load(part_m + tr[:, None] * NV + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
    ps = tl.load(part_s + tr[:, None] * NV + c[None, :], mask=cm, other=0.0, cache_modifier=".cg")
    return ps * tl.exp(pm - top[:, None])


@triton.jit
def _softmax_kernel(probs_ptr, stats_ptr, k, B, V, G, BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr,
                    PDL: tl.constexpr = False):
    """The last position's distribution (no launch after it finishes it)."""
    pdl_enter(PDL)
    _softmax_rows(probs_ptr, stats_ptr, k, B, V, G, tl.program_id(0), BLOCK_V, BLOCK_B)


def markov_greedy(base: torch.Tensor, hidden: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, conf_w: torch.Tensor | None, conf_b: torch.Tensor | None,
                  conf_markov: bool, *, w2_scale: torch.Tensor | None = None, block_v: int | None = None,
                  warps: int | None = None, block_r: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy Markov sampling (``DSparkDraft.propose`` at temperature 0, vanilla Markov head) with one kernel per
    position instead of about ten torch ops (embedding, W2 product, cast, add, argmax, concatenation, the
    confidence product and its casts): at batch 1 each of those is a launch of a few microseconds.

    base [B, G, V] the LM head's logits (model dtype), hidden [B, G, H] the backbone's output, anchor [B];
    w1/w2 [V, r] the Markov head's embedding and projection (w2 e4m3 with ``w2_scale`` [V], float32: an
    ``Fp8Linear``'s per-channel scales); conf_w [H (+ r)] and conf_b [1] the confidence head (None: zeros).
    Returns (tokens [B, G] int64, confidence logits [B, G] float32). ``block_v`` (vocabulary rows per program)
    and ``warps``: 128 and 4 below 4 rows, 256 and 8 from 4 (H200, ``benchmarks/markov_kernel.py``: the fastest
    measured at batches 1, 4 and 16, and of three at 32 and 64; every choice gives argmax's tokens); ``block_r``:
    rank columns per step of the W2 loop (default 64; a sweep's knob: smaller steps take fewer registers, 74
    against 116 per thread at 128 × 4 in the sm_90 build)."""
    tokens, conf, _ = _markov(base, hidden, anchor, w1, w2, conf_w, conf_b, conf_markov, None, w2_scale=w2_scale,
                              block_v=block_v, warps=warps, block_r=block_r)
    return tokens, conf


def markov_sample(base: torch.Tensor, hidden: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, conf_w: torch.Tensor | None, conf_b: torch.Tensor | None, conf_markov: bool,
                  temperature: torch.Tensor, uniforms: torch.Tensor, *, probs_out: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, block_v: int | None = None, warps: int | None = None,
                  block_r: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Markov sampling at temperature T (``DSparkDraft.propose`` with uniforms, vanilla Markov head) in one kernel
    per position plus one: the module's loop is about 20 launches a position (softmax, cumulative sum,
    comparisons and argmaxes over the vocabulary), ~135 of a batch-1 sampling round. temperature [B] (T ≤ 0:
    argmax), uniforms [B, G] (column k draws position k). Returns (tokens [B, G] int64, confidence logits [B, G],
    the distributions [B, G, V] float32 the drafts were drawn from, which verification reads), written into
    ``probs_out`` when given (contiguous). The draws are the module's inverse CDF; the sums behind them are
    taken in another order, so a probability or a draw may differ from the module's in the last bits."""
    bsz, g, vocab = base.shape
    assert temperature.shape == (bsz,) and uniforms.shape[0] == bsz and uniforms.shape[1] >= g
    assert uniforms.stride(1) == 1 and temperature.is_contiguous()
    probs = probs_out if probs_out is not None else torch.empty(bsz, g, vocab, dtype=torch.float32,
                                                                device=base.device)
    assert probs.shape == (bsz, g, vocab) and probs.dtype == torch.float32 and probs.is_contiguous()
    return _markov(base, hidden, anchor, w1, w2, conf_w, conf_b, conf_markov, (temperature, uniforms, probs),
                   w2_scale=w2_scale, block_v=block_v, warps=warps, block_r=block_r)


def _markov(base: torch.Tensor, hidden: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            conf_w: torch.Tensor | None, conf_b: torch.Tensor | None, conf_markov: bool,
            sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, *, w2_scale: torch.Tensor | None,
            block_v: int | None, warps: int | None, block_r: int | None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The launches of :func:`markov_greedy` (``sampling`` None) and :func:`markov_sample`."""
    bsz, g, vocab = base.shape
    rank = w2.shape[1]
    hid = hidden.shape[-1]
    assert rank % 16 == 0 and base.stride(-1) == 1 and hidden.stride(-1) == 1
    block_v = block_v or (128 if bsz < 4 else 256)
    warps = warps or (4 if bsz < 4 else 8)
    nv = triton.cdiv(vocab, block_v)
    block_b = max(16, triton.next_power_of_2(bsz))
    block_r = block_r or next(r for r in (64, 32, 16) if rank % r == 0)
    assert rank % block_r == 0, f"block_r {block_r} must divide the Markov rank {rank}"
    tail_rows = min(MARKOV_TAIL_ROWS, triton.next_power_of_2(bsz))
    tokens = torch.empty(bsz, g, dtype=torch.int64, device=base.device)
    has_conf = conf_w is not None  # then every position's confidence is written: no zero fill
    conf = (torch.empty if has_conf else torch.zeros)(bsz, g, dtype=torch.float32, device=base.device)
    part_v = torch.empty(bsz, nv, dtype=torch.float32, device=base.device)
    part_i = torch.empty(bsz, nv, dtype=torch.int32, device=base.device)
    counter = arrival_counters(base.device, 1)
    wc = conf_w if has_conf else w1
    s2 = w2_scale if w2_scale is not None else w1  # a placeholder pointer when W2 has no scales
    bc = conf_b if conf_b is not None else torch.zeros(1, dtype=torch.float32, device=base.device)
    wide = max(256, 4096 // tail_rows)
    consts = dict(R=rank, BLOCK_V=block_v, BLOCK_B=block_b, BLOCK_R=block_r, TAIL_ROWS=tail_rows,
                  BLOCK_H=min(wide, triton.next_power_of_2(hid)), BLOCK_C=min(wide, triton.next_power_of_2(nv)),
                  HAS_CONF=has_conf, CONF_MARKOV=conf_markov,
                  PRECISION="ieee" if w1.dtype == torch.float32 else None, W2_SCALED=w2_scale is not None,
                  num_warps=warps, **pdl_options(base, bsz))
    if sampling is not None:
        temperature, uniforms, probs = sampling
        part_s = torch.empty(bsz, nv, dtype=torch.float32, device=base.device)
        stats = torch.empty(bsz, g, 2, dtype=torch.float32, device=base.device)  # each position's max and sum
    for k in range(g):
        prev, stride = (anchor, anchor.stride(0)) if k == 0 else (tokens[:, k - 1], g)
        head = (base[:, k], hidden[:, k], prev, stride, w1, w2, s2, wc, bc)
        tail = (tokens, conf, k, bsz, vocab, hid, nv, g, base.stride(0), hidden.stride(0))
        if sampling is None:
            _markov_greedy_kernel[(nv,)](*head, part_v, part_i, counter, *tail, **consts)
        else:
            _markov_sample_kernel[(nv,)](*head, temperature, uniforms, uniforms.stride(0), probs, stats, part_v,
                                         part_s, part_i, counter, *tail, **consts)
    if sampling is None:
        return tokens, conf, None
    if g:
        _softmax_kernel[(nv,)](probs, stats, g - 1, bsz, vocab, g, BLOCK_V=block_v, BLOCK_B=block_b,
                               num_warps=warps, **pdl_options(base, bsz))
    return tokens, conf, probs
