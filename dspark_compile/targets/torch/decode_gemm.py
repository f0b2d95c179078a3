"""The torch target's decode GEMM: few activation rows times a streamed weight, e4m3 (W8A16) or bf16/fp16.

Decode at small batch reads each weight once per step, so the step's floor is the weight bytes: e4m3 halves them.
The kernel computes the product transposed (W·xᵀ): a [BLOCK_N, BLOCK_K] weight tile (e4m3 widened in registers) is
the tensor cores' wide operand, and the few activation rows (16 for decode) the narrow one, with float32
accumulation. K is split until the grid has a few programs per SM, so that every SM streams weights; the last
program of a tile to finish adds the float32 partials in split order (a counter per tile, no second kernel), or the
consuming kernel does as it loads them (``handoff``: ``kernels.Partials``). Per-channel scales multiply the sum
once; HF block-wise scales (groups of 128 columns) each K tile's product. The widening is
:func:`_e4m3_to_bf16_shifted` (one conversion instruction per two values instead of Triton's three), or the product
runs in fp16 (e4m3 → f16 is one instruction per two values, the activations scaled into fp16's range exactly):
which is faster is timed per shape, like the tiles. Where the fp16 product is chosen, the kernel writing the
activations can write them converted (:func:`takes_prescaled`: every K tile's conversion skipped, the same bits).
Full-precision weights take the same kernel when it beats cuBLAS for their shape.

On Hopper each configuration is also tried with its weight tiles loaded by TMA (one bulk copy per tile instead of
per-thread asynchronous copies: the large products then stream at ~0.9 of the copy bandwidth, docs/BENCH.md).
The tile sizes and split are timed once per weight shape on the GPU (or read from the file ``DSPARK_GEMM_CHOICES``
names, where earlier runs on the same GPU kept them) and then fixed for every row count up to
``SMALL_M`` (one M tile of 16 rows): the speculative round (B·(γ+1) rows) and the target-only step (B rows)
give a row the same bits, as each output row's reduction never depends on the other rows. Larger row counts
use wider M tiles: one configuration up to ``WIDE_M`` rows (B = 16's verify, B = 64's step), one up to ``SPLIT_M``
(B = 32 and 64's verifies: 256 and 512 rows, where the product is bound by the tensor cores, not the weight bytes)
and one beyond; full-precision weights use cuBLAS there. A row of B = 64's step and of its verify may therefore
differ in the last bits, as they already did for 3 <= B <= 16 (``row_class``).

Activations stay in the model dtype (W8A16) unless the layer quantizes them (``--quantize fp8-dynamic``: e4m3
per row and K tile of 128, scale amax/448, as HF "-FP8" checkpoints declare): then the product is e4m3 × e4m3 on
the tensor cores (conversion 3), with no widening of the weights at all; above ``SMALL_M`` rows the activations are
quantized once, before the product (:func:`e4m3_rows`), instead of in each column tile's K loop, and on Hopper
cuBLAS's block-scaled e4m3 product (:data:`SCALED_MM`) is one more candidate there, the same products summed in
another order, which the timing picks for most products at 32-512 rows.
Runs on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1`` (tests; no inline PTX there: conversion 1
falls back to Triton's, conversion 2 scales with Triton ops).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.nn import functional as F
from torch.utils.weak import WeakTensorKeyDictionary
from triton.compiler.errors import CompilationError
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from dspark_compile.errors import UsageError
from dspark_compile.models.layers import FRAGMENT_K, to_fragment_order
from dspark_compile.targets.torch.kernels import GEMM_IN_SCALE as X_SCALE
from dspark_compile.targets.torch.kernels import (
    Partials,
    RowNorm,
    arrival_counters,
    as_gemm_input,
    bf16_to_f16_scaled,
    glu_mul,
    glu_value,
    pdl_options,
    rstd_of_sums,
    switched_on,
)


@triton.jit(do_not_specialize=["M"])  # M = 1 compiles as M = 8 does: a row gets the same code
def _decode_gemm_kernel(x_ptr, w_ptr, w_desc, s_ptr, part_ptr, count_ptr, out_ptr, norm_ptr, xs_ptr, M, N, K, KB,
                        GROUP, K_SPLIT, SPLITS, stride_xm, norm_w, norm_eps, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr, EVEN: tl.constexpr,
                        PRECISION: tl.constexpr, FAST_CVT: tl.constexpr, SPLIT_K: tl.constexpr,
                        WIDE: tl.constexpr = False,
                        ASM: tl.constexpr = True, TMA: tl.constexpr = False, PDL: tl.constexpr = False,
                        HANDOFF: tl.constexpr = False, NORM: tl.constexpr = 0, FRAGMENT: tl.constexpr = False,
                        KEEP_ASYNC: tl.constexpr = False, X_E4M3: tl.constexpr = False, GLU: tl.constexpr = False,
                        GLU_PRESCALED: tl.constexpr = False, GLU_GELU: tl.constexpr = False):
    """out[m, n] = Σ_k x[m, k]·w[n, k]·scale, computed transposed (acc [BLOCK_N, BLOCK_M] = W·xᵀ) so that the
    weight tile is the tensor cores' wide operand and the few activation rows the narrow one. Program (n, k, m)
    sums its K split; with several splits the last program of an (n, m) tile to arrive (an atomic counter)
    adds the float32 partials in split order, scales and writes, and resets the counter for the next call.
    ``SPLIT_K``: SPLITS > 1. ``HANDOFF``: every program ends at its partial, which the consumer sums
    (``kernels.Partials``). ``NORM``
    (chunks of a ``kernels.RowNorm``): the input's RMSNorm is finished here, each output row scaled by its factor
    (handed-over partials carry the norm to their consumer instead). ``X_E4M3`` (W8A8): ``x`` is already e4m3,
    quantized by :func:`e4m3_rows`, its scales one per row and K tile at ``xs_ptr``. ``GLU`` (one split, a weight
    :meth:`DecodeWeight.in_pairs`): ``out_ptr`` [M, N / 2] takes silu(gate) · up of each pair instead of the
    product (``GLU_GELU``: gelu_tanh(gate) · up; ``GLU_PRESCALED``: as the fp16 product reads it),
    :func:`decode_glu`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    dt = x_ptr.dtype.element_ty
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K
    x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    if PDL:  # nothing above reads memory another kernel writes
        gdc_wait()
    if NORM:  # the rows' chunk sums, loaded before the weight stream (their latency hides behind it), added after
        sums = tl.load(norm_ptr + offs_m[:, None] * NORM + tl.arange(0, NORM)[None, :], mask=m_mask[:, None],
                       other=0.0)
    if not SPLIT_K:  # the columns' scales, likewise: loaded in the store, they were a memory round trip in series
        col_scale = _col_scale(s_ptr, offs_n, n_mask, PER_CHANNEL, FAST_CVT, WIDE)  # before it (sm_90 SASS)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + rk
        if TMA:  # the tensor memory accelerator: one instruction per tile, out-of-bounds columns read as zero
            w = w_desc.load([pid_n * BLOCK_N, k0])
        elif EVEN:
            w = tl.load(w_rows + offs_k[None, :])
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        xt = tl.load(x_cols + offs_k[:, None], mask=m_mask[None, :] & (offs_k[:, None] < K), other=0.0)
        if FRAGMENT:  # stored in fragment order: back to column order, which the compiler maps onto registers
            w = tl.reshape(tl.permute(tl.reshape(w, (BLOCK_N, BLOCK_K // _FRAGMENT_K, 4, 8, 2)), (0, 1, 3, 2, 4)),
                           (BLOCK_N, BLOCK_K))  # (its 16-byte shared loads are the point: docs/BENCH.md)
        if FAST_CVT == 3:  # W8A8: this K tile is one activation group; e4m3 x e4m3 on the tensor cores
            if X_E4M3:  # quantized once, before the product (e4m3_rows), not by each column tile's program
                xq = xt
                xs = tl.load(xs_ptr + offs_m.to(tl.int64) * (K // BLOCK_K) + k0 // BLOCK_K, mask=m_mask, other=1.0)
            else:
                xq, xs = _e4m3_group(xt, 0, ASM)
            # (the interpreter: e4m3 values in float32, the same products)
            p = tl.dot(w, xq) if ASM else tl.dot(w.to(tl.float32), xq.to(tl.float32), input_precision="ieee")
            if PER_CHANNEL:
                acc += p * xs[None, :]
            else:
                s = tl.load(s_ptr + offs_n.to(tl.int64) * KB + k0 // GROUP, mask=n_mask, other=0.0)
                acc += p * xs[None, :] * s[:, None]
        else:
            if FAST_CVT == 2:  # an fp16 product: e4m3 -> f16 is one instruction per two values; x scaled (or
                if dt != tl.float16:  # already, by its producer: kernels.as_gemm_input)
                    xt = bf16_to_f16_scaled(xt, ASM)
                wt = w.to(tl.float16)
            else:  # WIDE: weights already in the activations' dtype (bf16 layers), streamed as they are
                wt = w if WIDE else _e4m3_to_bf16_shifted(w, 4 if FRAGMENT else 2) if FAST_CVT else w.to(dt)
            if PER_CHANNEL or WIDE:
                acc = tl.dot(wt, xt, acc, input_precision=PRECISION)
            else:
                s = _unshift(tl.load(s_ptr + offs_n.to(tl.int64) * KB + k0 // GROUP, mask=n_mask, other=0.0),
                             FAST_CVT)
                acc += tl.dot(wt, xt, input_precision=PRECISION) * s[:, None]
    if PDL:  # the next kernel's blocks are dispatched while this one reduces and stores (not earlier: waiting
        gdc_launch_dependents()  # blocks would hold SM slots the weight stream needs, docs/BENCH.md)
    rn = rstd_of_sums(sums, norm_w, norm_eps, NORM) if NORM else 1.0
    mask = n_mask[:, None] & m_mask[None, :]
    tile = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    if KEEP_ASYNC:  # the same values stored (masked lanes are not); stored as they left the loop, ptxas serializes
        acc = tl.where(mask, acc, 0.0)  # the loop's wgmma in most tiles (C7515): docs/BENCH.md
    if SPLIT_K:
        tl.static_assert(not GLU, "the SwiGLU store needs one split")
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + tile, acc, mask=mask)
        if not HANDOFF:
            counter = count_ptr + pid_m * tl.num_programs(0) + pid_n
            tl.debug_barrier()  # every thread's partial is written before the release below publishes it
            if tl.atomic_add(counter, 1, sem="acq_rel") == SPLITS - 1:
                col_scale = _col_scale(s_ptr, offs_n, n_mask, PER_CHANNEL, FAST_CVT, WIDE)  # with the partials
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for sp in range(0, SPLITS):
                    acc += tl.load(part_ptr + sp * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(counter, 0)
                _store(out_ptr, col_scale, acc, tile, mask, rn, PER_CHANNEL, WIDE, NORM)
    elif GLU:
        _store_glu(out_ptr, col_scale, acc, offs_m, m_mask, pid_n, N, rn, PER_CHANNEL, WIDE, NORM, GLU_PRESCALED,
                   GLU_GELU, ASM, BLOCK_N, BLOCK_M)
    else:
        _store(out_ptr, col_scale, acc, tile, mask, rn, PER_CHANNEL, WIDE, NORM)


@triton.jit
def _e4m3_group(x, axis: tl.constexpr, ASM: tl.constexpr):
    """Dynamic e4m3 activations of one group along ``axis`` of ``x``: (e4m3 values, scale amax/448 per group), as
    ``models.layers.fp8_group_quantize_dequantize`` computes them (448/amax and amax/448 rounded to nearest, a
    zero group scaled by 1). On the GPU the values are e4m3 (rounded to nearest even); in the interpreter, whose
    float8 rounding is not round-to-nearest-even, float32 holding the same values."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), axis=axis)
    live = amax > 0
    inv = tl.where(live, tl.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax), 1.0)
    xs = tl.where(live, tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
    xc = tl.clamp(xf * tl.expand_dims(inv, axis), -448.0, 448.0)
    q = xc.to(tl.float8e4nv, fp_downcast_rounding="rtne") if ASM else _round_e4m3(xc)
    return q, xs


@triton.jit(do_not_specialize=["M", "stride_sm", "stride_sg"])  # a row count first seen in a capture compiles nothing
def _e4m3_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_sm, stride_sg, ROWS: tl.constexpr,
                      GROUP: tl.constexpr, ASM: tl.constexpr):
    """:func:`_e4m3_group` over a tile of ``ROWS`` rows and one group of columns: e4m3 into ``q_ptr`` [M, K], the
    scales into ``s_ptr`` [M, K / GROUP] (strides ``stride_sm``, ``stride_sg``)."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    offs_k = g * GROUP + tl.arange(0, GROUP)
    rows = offs_m < M
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=rows[:, None], other=0.0)
    q, xs = _e4m3_group(x, 1, ASM)
    tl.store(q_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], q.to(tl.float8e4nv), mask=rows[:, None])
    tl.store(s_ptr + offs_m.to(tl.int64) * stride_sm + g * stride_sg, xs, mask=rows)


def e4m3_rows(x: torch.Tensor, group: int, *, scales_by_group: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] as dynamic e4m3 activations, per row and group of ``group`` columns: (e4m3 [M, K], float32
    scales [M, K / group]), the values the W8A8 product's K loop would compute from ``x``, computed once: in the
    loop, every column tile's program quantized every activation tile again, which made the W8A8 target slower than
    W8A16 at 64 rows (docs/BENCH.md, "W8A8 at 64 rows"). ``scales_by_group``: the scales stored group-major (the
    [M, K / group] view of a [K / group, M] tensor), as cuBLAS's block-scaled product reads them (:data:`SCALED_MM`)."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    if scales_by_group:
        scales = torch.empty(k // group, m, dtype=torch.float32, device=x.device).t()
    else:
        scales = torch.empty(m, k // group, dtype=torch.float32, device=x.device)
    rows = 16  # a program's tile: 16 rows x one group (4 KB of bf16), many programs even at 17-128 rows
    _e4m3_rows_kernel[(triton.cdiv(m, rows), k // group)](x, q, scales, m, k, x.stride(0), *scales.stride(),
                                                          ROWS=rows, GROUP=group, ASM=x.is_cuda)
    return q, scales


@triton.jit
def _col_scale(s_ptr, offs_n, n_mask, PER_CHANNEL: tl.constexpr, FAST_CVT: tl.constexpr, WIDE: tl.constexpr):
    """The output columns' per-channel scales (unused where the scale is per group, applied in the K loop, or the
    weight is wide)."""
    if PER_CHANNEL and not WIDE:
        scale = _unshift(tl.load(s_ptr + offs_n, mask=n_mask, other=0.0), FAST_CVT)
    else:
        scale = tl.full(offs_n.shape, 1.0, tl.float32)
    return scale


@triton.jit
def _store(out_ptr, col_scale, acc, tile, mask, rn, PER_CHANNEL: tl.constexpr, WIDE: tl.constexpr,
           NORM: tl.constexpr):
    """Scale (per channel by ``col_scale``, then by the rows' norm factors ``rn``: ``NORM``, in
    ``kernels.product_value``'s order), round and store."""
    if PER_CHANNEL and not WIDE:
        acc *= col_scale[:, None]
    if NORM:
        acc *= rn[None, :]
    tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_glu(out_ptr, col_scale, acc, offs_m, m_mask, pid_n, N, rn, PER_CHANNEL: tl.constexpr, WIDE: tl.constexpr,
               NORM: tl.constexpr, PRESCALED: tl.constexpr, GELU_TANH: tl.constexpr, ASM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """:func:`_store`'s values (scaled, rounded to the product's dtype) taken as pairs (gate, up) and finished as
    ``kernels.silu_mul`` (``GELU_TANH``: ``gelu_tanh_mul``) finishes them (``kernels.glu_value``,
    ``kernels.as_gemm_input``): the same bits, one launch and the [M, N] round trip fewer per layer."""
    dt = tl.bfloat16 if PRESCALED else out_ptr.dtype.element_ty  # silu_mul's rule
    if PER_CHANNEL and not WIDE:
        acc *= col_scale[:, None]
    if NORM:
        acc *= rn[None, :]
    g, u = tl.split(tl.permute(tl.reshape(acc.to(dt).to(tl.float32), (BLOCK_N // 2, 2, BLOCK_M)), (0, 2, 1)))
    half = N // 2
    j = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(out_ptr + offs_m[None, :].to(tl.int64) * half + j[:, None],
             as_gemm_input(glu_value(g, u, dt, GELU_TANH), dt, PRESCALED, ASM),
             mask=(j < half)[:, None] & m_mask[None, :])


BF16_SHIFT: tl.constexpr = tl.constexpr(2.0**112)
"""What :func:`_e4m3_to_bf16_shifted`'s values are multiplied by to give the e4m3 values back."""
@triton.jit
def _round_e4m3(v):
    """float32 ``v`` (|v| ≤ 448) rounded to nearest-even e4m3, as float32: 3 mantissa bits on the float32 bits
    for e4m3 normals, a multiple of 2⁻⁹ (float32 addition rounds it) below 2⁻⁶. For the interpreter only."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    a = tl.abs(v)
    sub = (a + 16384.0) - 16384.0  # 2^14: its float32 ulp is 2^-9
    return tl.where(a >= 0.015625, normal, tl.where(v < 0, -sub, sub))


SHIFTS = {1: BF16_SHIFT.value, 2: 1.0 / X_SCALE.value}
"""The power of two each conversion folds into the scale (:func:`_unshift`), for a consumer of handed-over
partials (``kernels.Partials``)."""


@triton.jit
def _unshift(s, FAST_CVT: tl.constexpr):
    """The scale with the conversion's power of two folded in (:data:`SHIFTS`)."""
    if FAST_CVT == 1:
        s = s * BF16_SHIFT
    elif FAST_CVT == 2:
        s = s * (1.0 / X_SCALE)
    return s


def _shifted_asm(pairs: int) -> str:
    """PTX of :func:`_e4m3_to_bf16_shifted` for ``pairs`` value pairs in one 32-bit input register."""
    body = []
    for i, half in enumerate(("lo", "hi")[:pairs]):
        body += [f"cvt.rn.f16x2.e4m3x2 a, {half};", "shr.b32 sa, a, 3;", "and.b32 sa, sa, 0x0FFF0FFF;",
                 "and.b32 a, a, 0x80008000;", f"or.b32 ${i}, sa, a;"]
    return "{\n.reg .b16 lo, hi;\n.reg .b32 a, sa;\n" + f"mov.b32 {{lo, hi}}, ${pairs};\n" + "\n".join(body) + "\n}"


_FRAGMENT_K = tl.constexpr(FRAGMENT_K)
_SHIFTED_2 = tl.constexpr(_shifted_asm(1))
_SHIFTED_4 = tl.constexpr(_shifted_asm(2))


@triton.jit
def _e4m3_to_bf16_shifted(w, PACK: tl.constexpr):
    """e4m3 → bf16 in 1.5 integer instructions and half a conversion per value instead of Triton's 1.5
    conversions (e4m3x2 → f16x2, then f16 → bf16 one value at a time): the f16 bits shifted right by 3 are
    the bf16 bits of the value times 2⁻¹¹² (e4m3 has 3 mantissa bits, so no f16 bit is lost; every e4m3
    value, subnormals included, is an f16 normal, so every result is a bf16 normal). The scale carries
    2¹¹² back. PTX, sm_89 and later. ``PACK`` 4 (a weight in fragment order, whose registers hold four
    neighbouring values) takes a register of four values where 2 would cost a byte permute per pair."""
    if PACK == 4:
        return tl.inline_asm_elementwise(asm=_SHIFTED_4, constraints="=r,=r,r", args=[w.to(tl.uint8, bitcast=True)],
                                         dtype=tl.bfloat16, is_pure=True, pack=4)
    return tl.inline_asm_elementwise(asm=_SHIFTED_2, constraints="=r,r", args=[w.to(tl.uint8, bitcast=True)],
                                     dtype=tl.bfloat16, is_pure=True, pack=2)


class GluStore(NamedTuple):
    """:func:`decode_glu`'s store: act(gate) · up of each pair into ``out`` [M, N / 2] (``prescaled``: as the fp16
    product reads it; ``gelu_tanh``: GELU-tanh, else SiLU)."""

    out: torch.Tensor
    prescaled: bool
    gelu_tanh: bool


@dataclass(frozen=True)
class DecodeWeight:
    """A linear layer's weight [N, K] (e4m3, or already in the activations' dtype: ``wide``), its float32
    scale [N, ceil(K/group)] (ones for a wide weight) and optional bias."""

    weight: torch.Tensor
    scale: torch.Tensor
    group: int
    bias: torch.Tensor | None = None
    act_group: int = 0  # > 0: the input is quantized to e4m3 per row and this many columns (W8A8)
    fragment_order: bool = False  # the weight's columns in layers.to_fragment_order's order
    paired: bool = False  # gate|up with its rows as pairs: gate 0, up 0, gate 1, up 1, … (in_pairs)

    @classmethod
    def of(cls, weight: torch.Tensor, scale: torch.Tensor, group: int, bias: torch.Tensor | None,
           act_group: int = 0, *, fragment_order: bool = False) -> DecodeWeight:
        """From an :class:`~dspark_compile.models.layers.Fp8Linear`'s tensors: per-tensor and per-channel scales
        become one group of all K columns."""
        n, k = weight.shape
        if scale.dim() < 2:
            scale, group = scale.to(torch.float32).reshape(-1, 1).expand(n, 1).contiguous(), k
        return cls(weight.contiguous(), scale.to(torch.float32).contiguous(), group, bias, act_group,
                   fragment_order)

    def in_fragment_order(self) -> DecodeWeight:
        """This weight with its columns in the order the kernel reads 16 bytes at a time
        (:func:`~dspark_compile.models.layers.to_fragment_order`: same products, same bits), where the kernel
        takes it: e4m3 weights with model-dtype inputs (conversion 3's e4m3 operand holds other columns), K and
        the scale group multiples of 64 (every candidate's K tile is)."""
        k = self.weight.shape[1]
        if (self.fragment_order or self.wide or self.act_group or k % FRAGMENT_K
                or (self.group < k and self.group % FRAGMENT_K)):
            return self
        return replace(self, weight=to_fragment_order(self.weight), fragment_order=True)

    def in_pairs(self) -> DecodeWeight:
        """A gate|up weight (gate's rows, then up's) with its rows, scales and bias as pairs, gate j then up j: each
        output column's products are unchanged (same bits), and an output tile holds whole pairs, so that the
        product's store can finish SwiGLU itself (:func:`decode_glu`)."""
        n = self.weight.shape[0]
        assert n % 2 == 0 and not self.paired

        def pairs(t: torch.Tensor) -> torch.Tensor:
            return torch.stack((t[: n // 2], t[n // 2 :]), 1).reshape(t.shape).contiguous()

        return replace(self, weight=pairs(self.weight), scale=pairs(self.scale),
                       bias=None if self.bias is None else pairs(self.bias), paired=True)

    @classmethod
    def full(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> DecodeWeight:
        """A bf16/fp16/float32 weight, streamed as it is (no scale: the kernel never reads the placeholder)."""
        n, k = weight.shape
        key = (n, weight.device)
        if key not in _UNSCALED:
            _UNSCALED[key] = torch.ones(n, 1, dtype=torch.float32, device=weight.device)
        return cls(weight.contiguous(), _UNSCALED[key], k, bias)

    @property
    def wide(self) -> bool:
        return self.weight.dtype != torch.float8_e4m3fn

    @staticmethod
    def cat(parts: list[DecodeWeight]) -> DecodeWeight:
        """Row-wise concatenation (q|k|v, gate|up): same K, group and activation group."""
        assert len({(p.weight.shape[1], p.group, p.scale.shape[1], p.act_group, p.fragment_order)
                    for p in parts}) == 1
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])  # type: ignore[misc]
        return DecodeWeight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]),
                            parts[0].group, bias, parts[0].act_group, parts[0].fragment_order)


SMALL_M = 16  # rows up to which one configuration serves every row count (decode: B and B·(γ+1) at B = 1)
WIDE_M = 128
"""Rows above which a product has a configuration of its own (:data:`WIDE_CONFIGS` among its candidates). One
configuration for 17-1024 rows, timed over 64, 128 and 512 rows, ran the H200's 512-row products at about 1.5x
the sweep's best for that row count (610 against 382 µs a layer, ``gemm_rows_sweep_h200.json``): no tile is good
at both a weight-bound 64-row step and a compute-bound 512-row verify (docs/BENCH.md, "Wide products")."""
SPLIT_M = 1024
"""Rows up to which the larger configurations may split K (B = 128's verify); beyond (prefill chunks) the float32
partials would take splits · M · N · 4 bytes, so those row counts never split and form a class of their own."""
SMALL_CONFIGS = ((128, 128, 4, 4, 4, 0), (128, 128, 4, 4, 4, 1), (64, 128, 4, 4, 4, 1), (128, 128, 2, 4, 4, 1),
                 (128, 128, 8, 4, 3, 1), (128, 128, 2, 8, 4, 1), (64, 128, 2, 4, 8, 1), (64, 128, 4, 4, 4, 2),
                 (64, 128, 2, 4, 4, 2), (64, 128, 8, 4, 3, 2), (128, 128, 2, 4, 4, 2), (128, 128, 4, 4, 4, 2),
                 (128, 128, 2, 8, 4, 2), (128, 128, 4, 8, 4, 2), (64, 256, 2, 4, 4, 2), (128, 64, 4, 4, 6, 2),
                 (128, 256, 1, 4, 4, 2), (256, 128, 2, 8, 3, 2), (64, 256, 3, 4, 3, 2), (64, 256, 4, 4, 2, 2),
                 (64, 256, 6, 4, 2, 2), (64, 256, 0, 4, 3, 2), (64, 256, 1, 4, 3, 2), (64, 256, 2, 4, 3, 2),
                 (64, 128, 4, 4, 3, 2), (64, 128, 3, 4, 4, 2), (64, 128, 6, 4, 3, 2))
"""BLOCK_N, BLOCK_K, programs per SM (K is split until the grid has that many; 0: no split), warps, stages,
conversion (0: Triton's e4m3 → bf16; 1: :func:`_e4m3_to_bf16_shifted`; 2: an fp16 product, e4m3 → f16 in one
instruction per two values and the activations scaled into fp16 by :data:`X_SCALE`) for M <= SMALL_M
(BLOCK_M = 16). The first is the reference every other is checked against when timed. Conversion 2 and the
many small programs per SM were added for a kernel thought bound by conversion instructions; with no conversion
at all (W8A8, conversion 3) it measured no faster at small M (docs/BENCH.md, "Dynamic e4m3 activations"). The last
nine (64-row tiles, K tiles of 256, fewer stages, 3 and 6 programs per SM) led a wider sweep of the Qwen3-8B
products on the H200 (docs/BENCH.md, "Where an e4m3 product's time goes")."""
LARGE_CONFIGS = ((128, 64, 128, 0, 4, 4, 0), (128, 64, 128, 0, 4, 4, 1), (128, 64, 128, 1, 4, 4, 1),
                 (128, 64, 128, 2, 4, 4, 1), (128, 128, 128, 1, 8, 3, 1), (256, 64, 128, 1, 8, 3, 1),
                 (64, 128, 128, 0, 4, 3, 1), (64, 128, 64, 0, 4, 4, 1), (128, 64, 128, 1, 4, 3, 1),
                 (64, 128, 128, 1, 4, 3, 1), (64, 128, 64, 1, 4, 3, 1), (256, 64, 64, 0, 8, 4, 2),
                 (256, 128, 128, 0, 8, 3, 1), (64, 128, 64, 0, 4, 3, 1))
"""BLOCK_N, BLOCK_M, BLOCK_K, programs per SM, warps, stages, fast conversion for larger M. The last eight (128-row
tiles, K tiles of 64, 256-column tiles of the fp16 product) led ``gemm_sweep.py --rows`` on the H200 for the Qwen3-8B
products summed over 64, 128 and 512 rows (docs/BENCH.md, "The larger row class")."""
WIDE_CONFIGS = ((128, 256, 64, 0, 8, 3, 1), (128, 256, 64, 0, 8, 4, 1), (64, 256, 64, 0, 4, 3, 1),
                (64, 256, 64, 0, 4, 4, 1), (128, 128, 128, 0, 8, 3, 1))
"""As :data:`LARGE_CONFIGS`, added to them in the wide class (``WIDE_M`` to ``SPLIT_M`` rows): the leaders of
``gemm_sweep.py --rows`` at 512 rows on the H200 (256-row tiles, one program per output tile), which the
17-1024-row class could not take since they waste three quarters of their tensor-core work at 64 rows. A sixth
leader, 128 × 128 × 64 with 8 warps and 4 stages, raced on the H100 with weights in fragment order (Triton 3.6, per
thread copies): some launches wrote inf, others the right product (docs/BENCH.md, "A wide tile that raced"; perhaps
Triton's wgmma wait over more than 4 warps, fixed upstream after 3.6)."""
TIMED_ROWS = {1: (64, 128), 3: (256, 512)}
"""Row counts a class's candidates are timed at (other classes: the call's own), the choice the least sum of
each time over that row count's fastest: one configuration serves every row count of a class (class 1: B = 16's
verify of 128 rows and B = 64's step; class 3: B = 32's and 64's verifies), and on the H200 the fastest at one row
count took up to 1.8x the fastest at another (docs/BENCH.md, "The larger row class")."""
Config = tuple[int, ...]
"""BLOCK_M, BLOCK_N, BLOCK_K, programs per SM, warps, stages, conversion, and optionally 1: the weight tiles
loaded by TMA (Hopper's tensor memory accelerator) instead of per-thread asynchronous copies."""
CUBLAS: Config = (0, 0, 0, 0, 0, 0, 0)
"""Not the kernel: ``F.linear`` (cuBLAS), the reference and a candidate for full-precision weights."""
SCALED_MM: Config = (0, 0, 0, 0, 0, 0, 3)
"""Not the kernel: cuBLAS's e4m3 product (``torch._scaled_mm`` with 1 × 128 block scales on both operands: the
activations' per-(row, group) scales of :func:`e4m3_rows`, the weight's per-channel or per-group scales repeated
per group of 128 columns), a candidate for W8A8 products of more than ``SMALL_M`` rows on Hopper. The same products
as conversion 3, summed in another float32 order. At 512 rows on an H100 it took 0.56-0.86× the kernel's time per
product, 0.68× a layer, 0.92× bf16 cuBLAS's (docs/BENCH.md, "W8A8 through cuBLAS"): the kernel scales every K
tile's product by its activation scales before adding it, which serializes its tensor-core work. Not at up to
``SMALL_M`` rows, whose one configuration must give a row the same bits at every row count (cuBLAS picks its
algorithm by shape: above them a row's last bits may vary with the row count within a class, as between classes).
Never for a weight in fragment order (cuBLAS reads columns in order; ``Fp8Linear.quantize_activations`` restores
it)."""
SCALED_MM_ENV = "DSPARK_SCALED_MM"
"""On (the default; 0 turns it off): :data:`SCALED_MM` is a candidate where it applies. Off, the W8A8 entries of a
choices file made before it hold again (``_identity``'s ``w8a8``)."""
_BLOCK_SCALES = WeakTensorKeyDictionary()
"""A weight scale's [K / 128, N] block-scale form for :data:`SCALED_MM`, made on its first (warm-up) call, never
inside a CUDA-graph capture, and dropped with the scale."""
SMEM_BYTES = 200 * 1024
"""Shared memory the pipeline stages of one program may take (Hopper: 227 KB per block)."""
_CHOSEN: dict[tuple[int, ...], Config] = {}
_UNSCALED: dict[tuple[int, torch.device], torch.Tensor] = {}
"""The never-read scale placeholder of full-precision weights, one per output size and device (allocated on
the warm-up call, never inside a CUDA-graph capture)."""
log = logging.getLogger(__name__)


def row_class(m: int) -> int:
    """0: M <= SMALL_M, 1: up to WIDE_M, 3: up to SPLIT_M, 2: more. One configuration per class and weight shape.
    Class 3 is the newest (the wide products): classes 0-2 keep the numbers that choices files already hold."""
    return 0 if m <= SMALL_M else 1 if m <= WIDE_M else 3 if m <= SPLIT_M else 2


def _candidates(m: int, k: int, group: int, weight_bytes: int = 1, act_group: int = 0) -> list[Config]:
    """Configurations whose K tile lies within one scale group, their stages cut to fit shared memory. A
    full-precision weight (``weight_bytes`` > 1) has cuBLAS first, and only cuBLAS beyond ``SMALL_M`` rows.
    Quantized activations (``act_group``) take conversion 3 with a K tile of exactly one activation group."""
    if act_group:
        base = _candidates(m, k, group, weight_bytes)
        out = list(dict.fromkeys((bm, bn, bk, per_sm, w, st, 3) for bm, bn, bk, per_sm, w, st, _ in base
                                 if bk == act_group))
        return out or [(16 if m <= SMALL_M else 64, 64, act_group, 0, 4, 3, 3)]
    if m <= SMALL_M:
        out = [(16, bn, bk, per_sm, w, st, f) for bn, bk, per_sm, w, st, f in SMALL_CONFIGS]
    elif weight_bytes > 1:
        return [CUBLAS]
    else:
        split = m <= SPLIT_M
        out = list(dict.fromkeys((bm, bn, bk, per_sm if split else 0, w, st, f) for bn, bm, bk, per_sm, w, st, f
                                 in LARGE_CONFIGS + (WIDE_CONFIGS if row_class(m) == 3 else ())))
    if group < k:
        out = [c for c in out if group % c[2] == 0]
    out = out or [(16 if m <= SMALL_M else 64, 64, min(group, 64), 0, 4, 3, 0)]
    fitted = []
    for bm, bn, bk, per_sm, w, st, f in out:
        stage = bn * bk * weight_bytes + bm * bk * 2
        fitted.append((bm, bn, bk, per_sm, w, max(2, min(st, SMEM_BYTES // stage)), f if weight_bytes == 1 else 0))
    fitted = list(dict.fromkeys(fitted))
    return [CUBLAS, *fitted] if weight_bytes > 1 else fitted


def _key(m: int, w: DecodeWeight, dtype: torch.dtype, handoff: bool = False) -> tuple[int, ...]:
    """What a configuration is chosen for: the row class, the weight's shape, scale group and activation group,
    the bytes per activation and per weight value, and whether the consumer sums split-K partials itself."""
    return (row_class(m), *w.weight.shape, w.group, dtype.itemsize, w.weight.dtype.itemsize, w.act_group,
            int(handoff))


def _config(x: torch.Tensor, w: DecodeWeight, handoff: bool = False) -> Config:
    """The configuration of this weight for this row class, timed once per (class, N, K, group) on the GPU
    (outside CUDA-graph capture; the first call of a shape is a warm-up run) and then fixed, so a row gets
    the same bits whatever the batch within its class (the kernel's configurations; cuBLAS, which the classes above
    ``SMALL_M`` may choose, picks its algorithm by shape, and a row's last bits may then vary with the row count,
    as they already do between classes). A candidate that does not compile for this GPU, whose
    result strays from the first's (plain conversion, or cuBLAS) by more than float32 summation order can explain,
    or whose launches disagree (:func:`candidate_error`), is dropped. ``handoff``: candidates are timed as a
    consumer that sums the partials runs them, without the last program's reduction, which costs a split-K
    product 2–3 µs at one row on the H200 (docs/BENCH.md); the choice is kept apart from the same shape's
    self-summing one."""
    m, k = x.shape
    key = _key(m, w, x.dtype, handoff)
    chosen = _CHOSEN.get(key)
    if chosen is None and _load_choices(x.device):
        chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen
    candidates = _candidates(m, k, w.group, w.weight.dtype.itemsize, w.act_group)
    if not x.is_cuda or torch.cuda.is_current_stream_capturing() or len(candidates) == 1:
        return candidates[0]
    candidates = with_scaled_mm(with_tma(candidates, w), m, w)
    reference = _launch(x, w, candidates[0]).float()
    inputs = [x if r == m else torch.randn(r, k, dtype=x.dtype, device=x.device)
              for r in TIMED_ROWS.get(row_class(m), (m,))]
    times: dict[Config, list[float]] = {}
    for cfg in candidates:
        err = runnable_error(lambda cfg=cfg: _launch(x, w, cfg).float(), reference, cfg)
        if err is None:
            continue
        if err > 1e-2:
            log.warning("decode GEMM configuration %s dropped: relative error %.3g against %s", cfg, err,
                        candidates[0])
            continue
        times[cfg] = [candidate_ms(xi, w, cfg, handoff) for xi in inputs]
    best = least_relative_time(times) if times else candidates[0]
    remember(key, best, x.device)
    return best


def runnable_error(launch: Callable[[], torch.Tensor], reference: torch.Tensor, cfg: Config) -> float | None:
    """:func:`candidate_error`, or None for a candidate this GPU or build cannot run: a kernel that does not compile
    or fit (e.g. shared memory of a smaller GPU), or cuBLAS without the block-scaled product (an older torch or
    CUDA: a plain RuntimeError, whose text also starts "CUDA error: CUBLAS_STATUS_..."). An error of the CUDA runtime
    (``torch.AcceleratorError``, e.g. an illegal memory access) is never swallowed: it leaves the context unusable,
    and would surface later, far from its cause."""
    try:
        return candidate_error(launch, reference)
    except (OutOfResources, CompilationError) as exc:
        log.warning("decode GEMM configuration %s dropped: %s", cfg, exc)
    except RuntimeError as exc:
        if cfg != SCALED_MM or isinstance(exc, getattr(torch, "AcceleratorError", ())):  # (torch >= 2.8)
            raise
        log.warning("decode GEMM configuration %s (torch._scaled_mm) dropped: %s", cfg, str(exc).splitlines()[0])
    return None


def candidate_error(launch: Callable[[], torch.Tensor], reference: torch.Tensor, launches: int = 3) -> float:
    """:func:`relative_error` of a candidate's result, infinite unless ``launches`` launches on the same input give
    the same bits: a race need not show in one launch. On the H100 a wide tile gave the right product (0.2 %) in
    one launch and inf in the next two (docs/BENCH.md, "A wide tile that raced"); every other candidate repeats its
    bits exactly, split K included (its last program sums the partials in split order)."""
    first = launch()
    if any(not torch.equal(launch(), first) for _ in range(launches - 1)):
        return math.inf
    return relative_error(first, reference)


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """A candidate's largest error relative to the reference's largest value; NaN anywhere is infinite, so a
    candidate that writes NaN is dropped too (NaN compares false with any bound)."""
    err = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    return err if err == err else math.inf


def least_relative_time(times: dict[Config, list[float]]) -> Config:
    """The configuration whose times (one per :data:`TIMED_ROWS` row count) sum to the least, each relative to
    that row count's fastest candidate: no row count outweighs another by its larger products alone."""
    fastest = [min(t[i] for t in times.values()) for i in range(len(next(iter(times.values()))))]
    return min(times, key=lambda c: sum(t / f for t, f in zip(times[c], fastest, strict=True)))


KEEP_ASYNC_ENV = "DSPARK_GEMM_KEEP_ASYNC"
"""Set (1): the accumulator passes through a select before it is stored, the same values, which keeps ptxas from
serializing the K loop's wgmma instructions (its C7515 "non wgmma instructions defining accumulator registers"):
13 of the 41 candidates serialized without it, none with it, the larger row class's timed choices among them
(docs/BENCH.md, "wgmma serialized by ptxas"). Off: on the H200, the same configurations with it on were no faster
at B = 1 and 1.7 % slower at B = 64 (docs/BENCH.md, "The base half without PDL, ...")."""
E4M3_INPUT_ENV = "DSPARK_E4M3_INPUT"
"""On (the default; 0 turns it off): a W8A8 product of more than ``SMALL_M`` rows takes its activations quantized
once by :func:`e4m3_rows` (one more launch), not in each column tile's K loop; the same bits either way. At up to
``SMALL_M`` rows the products are a few microseconds and the extra launch would cost more than it saves."""
CHOICES_ENV = "DSPARK_GEMM_CHOICES"
"""Names a JSON file of timed choices: read before the first timing, rewritten as each new choice is timed. Runs
that share it run the same kernels, without timing them again: the two halves of an A/B (the choice of near-equal
candidates otherwise differs between runs, docs/BENCH.md), a server's restarts. A file made on another GPU, Triton
or torch build (cuBLAS, a candidate, comes with torch) or candidate set is left alone (neither read nor
written)."""
_LOADED: dict[str, bool] = {}  # choices file -> whether it matched this process's GPU, Triton, torch, candidates


def _identity(device: torch.device) -> dict[str, str]:
    """What a choice holds for: the GPU's name, Triton's and torch's versions (torch's names its CUDA build, whose
    cuBLAS products are candidates: a file from another build could name one this build lacks) and the candidate
    set."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    candidates = hashlib.sha256(repr((SMALL_CONFIGS, LARGE_CONFIGS)).encode()).hexdigest()[:16]
    wide = hashlib.sha256(repr((WIDE_CONFIGS, WIDE_M)).encode()).hexdigest()[:16]
    out = {"gpu": gpu, "triton": triton.__version__, "torch": torch.__version__, "candidates": candidates,
           "wide": wide}
    if scaled_mm_applies(device):  # W8A8 entries timed with cuBLAS among the candidates
        out["w8a8"] = "scaled_mm"
    return out


def _load_choices(device: torch.device) -> bool:
    """Read ``DSPARK_GEMM_CHOICES`` once (a missing file is an empty one); whether it holds for this process."""
    path = os.environ.get(CHOICES_ENV)
    if not path:
        return False
    if path not in _LOADED:
        mine = _identity(device)
        theirs, entries = mine, []
        if Path(path).exists():
            try:
                data = json.loads(Path(path).read_text())
                theirs = dict(data["identity"])
                entries = [(tuple(c["key"]), tuple(c["config"])) for c in data["choices"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{CHOICES_ENV}={path}: not a decode GEMM choices file ({exc}); delete it or "
                                 f"point {CHOICES_ENV} at a new path") from exc
        # A file from before the wide class (no "wide") keeps classes 0-2, whose candidates are unchanged (its class
        # 1 entries were timed over 512 rows as well, and now serve only up to WIDE_M); class 3 entries hold only
        # for the same wide candidates. W8A8 entries (activation group k[6]) above SMALL_M hold only for the same
        # "w8a8" (cuBLAS among the candidates or not).
        same = ({k: v for k, v in theirs.items() if k not in ("wide", "w8a8")}
                == {k: v for k, v in mine.items() if k not in ("wide", "w8a8")})
        wide = theirs.get("wide") == mine["wide"]
        w8a8 = theirs.get("w8a8") == mine.get("w8a8")
        if same:
            _CHOSEN.update((k, c) for k, c in entries
                           if (k[0] != 3 or wide) and (not k[6] or k[0] == 0 or w8a8))
        _LOADED[path] = same
        if not same:
            log.warning("%s=%s holds choices of %s, not of this process (%s): neither read nor written", CHOICES_ENV,
                        path, theirs, mine)
    return _LOADED[path]


def remember(key: tuple[int, ...], cfg: Config, device: torch.device) -> None:
    """Keep ``cfg`` as the choice for ``key``, and in ``DSPARK_GEMM_CHOICES`` where that file holds for this
    process (rewritten whole, atomically: an interrupted run leaves the previous file)."""
    _CHOSEN[key] = cfg
    path = os.environ.get(CHOICES_ENV)
    if not path or not _load_choices(device):
        return
    data = {"identity": _identity(device),
            "choices": [{"key": list(k), "config": list(c)} for k, c in sorted(_CHOSEN.items())]}
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def with_tma(candidates: list[Config], w: DecodeWeight) -> list[Config]:
    """``candidates``, then each kernel configuration again with TMA weight loads, where the GPU has TMA (Hopper
    on) and a tensor map can describe the weight (16-byte aligned base and rows)."""
    weight = w.weight
    aligned = weight.data_ptr() % 16 == 0 and weight.stride(0) * weight.element_size() % 16 == 0
    if not (aligned and weight.is_cuda and torch.cuda.get_device_capability(weight.device)[0] >= 9):
        return candidates
    return candidates + [(*c, 1) for c in candidates if c != CUBLAS]


def scaled_mm_applies(device: torch.device) -> bool:
    """Whether :data:`SCALED_MM` is a candidate on ``device``: a Hopper GPU (torch's 1 × 128 block-scaled product is
    cuBLAS's DeepSeek recipe, built for sm_90 only), unless ``DSPARK_SCALED_MM=0``."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and switched_on(SCALED_MM_ENV))


def with_scaled_mm(candidates: list[Config], m: int, w: DecodeWeight) -> list[Config]:
    """``candidates`` and :data:`SCALED_MM` for a W8A8 product of more than ``SMALL_M`` rows whose activation
    group is 128 columns and whose weight scale groups a multiple of 128 (or per channel), its weight in column
    order, where it applies."""
    k = w.weight.shape[1]
    fits = (w.act_group == 128 and k % 128 == 0 and (w.group >= k or w.group % 128 == 0) and m > SMALL_M
            and not w.fragment_order and w.weight.is_cuda and scaled_mm_applies(w.weight.device))
    return [*candidates, SCALED_MM] if fits else candidates


def _scaled_mm(x: torch.Tensor, w: DecodeWeight, out_dtype: torch.dtype) -> torch.Tensor:
    """:data:`SCALED_MM`'s product: ``x`` quantized by :func:`e4m3_rows` (scales group-major), its rows padded to a
    multiple of 4 (cuBLAS's block-scaled product needs it; a padding row is zeros and is not returned)."""
    m, k = x.shape
    n = w.weight.shape[0]
    if w.fragment_order:  # a configuration read from a choices file for a weight the timing would not offer it
        raise ValueError("cuBLAS's e4m3 product (SCALED_MM) reads a weight in column order; this one is in the "
                         "decode GEMM's fragment order")
    scale_b = _BLOCK_SCALES.get(w.scale)
    if scale_b is None:  # [N, ceil(K / group)] -> [K / 128, N]: each group's scale for each of its 128 columns
        per = w.scale.expand(n, k // 128) if w.group >= k else w.scale.repeat_interleave(w.group // 128, dim=1)
        scale_b = per[:, : k // 128].t().contiguous()
        if not torch.cuda.is_current_stream_capturing():  # made in a capture, its values exist only in replays
            _BLOCK_SCALES[w.scale] = scale_b
    pad = -m % 4
    xq, xs = e4m3_rows(F.pad(x, (0, 0, 0, pad)) if pad else x, 128, scales_by_group=True)
    out = torch._scaled_mm(xq, w.weight.t(), scale_a=xs, scale_b=scale_b, out_dtype=out_dtype)
    return out[:m] if pad else out


ROTATION_BYTES = 256 << 20
"""Weight bytes a candidate is timed over (copies of its weight, launched in turn): five times the H100/H200 L2,
so every launch reads its weight from memory, as a decode step does. A weight of half this or more runs alone
(it streams through L2 on each launch anyway): the copies never take more than this, as the L2 flush buffer of
the timing they replace did."""


def candidate_ms(x: torch.Tensor, w: DecodeWeight, cfg: Config, handoff: bool = False) -> float:
    """GPU milliseconds per launch of ``cfg`` in a decode step's conditions: launches back to back in one CUDA
    graph (no host launch cost), each on its own copy of the weight (cold in L2, no flush traffic). Timing one
    call behind an L2 flush ranked candidates by the flush's write-backs as much as by the kernel: runs picked
    differently among them, and the FP8 step moved by about 0.25 ms between runs (docs/BENCH.md)."""
    weights = [replace(w, weight=c) for c in weight_copies(w.weight)]
    return rotated_ms([lambda c=c: _launch(x, c, cfg, handoff) for c in weights])


def weight_copies(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` and clones of it, :data:`ROTATION_BYTES` in all (at most 16): launches taking them in turn each read
    their bytes from memory."""
    return [t] + [t.clone() for _ in range(max(1, min(16, ROTATION_BYTES // max(1, t.nbytes))) - 1)]


def rotated_ms(launches: list[Callable[[], object]]) -> float:
    """:func:`graph_ms` of one launch per weight copy, repeated to at least four launches (the graph's own start
    is shared)."""
    return graph_ms(launches * -(-4 // len(launches)))


def graph_ms(launches: list[Callable[[], object]], replays: int = 7) -> float:
    """Median GPU milliseconds per launch of ``launches`` captured in turn in one CUDA graph."""
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):  # warm-up off the capture (allocations, lazy initialisation)
        for fn in launches:
            fn()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in launches:
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(launches))
    return float(sorted(times)[len(times) // 2])


def takes_prescaled(m: int, w: DecodeWeight, dtype: torch.dtype, device: torch.device, handoff: bool = False) -> bool:
    """Whether ``w``'s product of ``m`` rows of ``dtype`` runs the fp16 product (conversion 2) on bf16 inputs, so
    that its producer can write the input already converted (``kernels.as_gemm_input``) and the product skip the
    conversion in every K tile (decode_linear's ``prescaled``): the same bits. One answer per row class and
    weight shape, as the configuration (timed here on a stand-in input if this shape was not timed yet);
    ``handoff`` as the product's call passes it."""
    if dtype != torch.bfloat16 or w.wide or w.act_group or device.type != "cuda":
        return False
    handoff = handoff and w.bias is None
    cfg = _CHOSEN.get(_key(m, w, dtype, handoff))
    if cfg is None:
        if torch.cuda.is_current_stream_capturing():  # no stand-in inside a graph; either way gives the same bits
            return False
        cfg = _config(torch.randn(m, w.weight.shape[1], dtype=dtype, device=device), w, handoff)
    return cfg != CUBLAS and cfg[6] == 2


def decode_linear(x: torch.Tensor, w: DecodeWeight, cfg: Config | None = None, *,
                  handoff: bool = False, prescaled: bool = False, row_norm: RowNorm | None = None,
                  glu: GluStore | None = None) -> torch.Tensor | Partials:
    """``x`` [M, K] (row stride may exceed K) @ dequantized ``w``ᵀ (+ bias) -> [M, N] in ``x``'s dtype;
    ``cfg`` overrides the timed configuration (benchmarks). ``handoff`` (a consumer that takes
    :class:`~.kernels.Partials`): a configuration that splits K returns its partials unsummed (no bias).
    ``prescaled``: ``x`` is fp16, a bf16 input already converted for the fp16 product (:func:`takes_prescaled`);
    the result is bf16, bit for bit what the bf16 input gives. ``row_norm``: ``x`` is an RMSNorm's output before
    its division by the RMS (``kernels.add_rmsnorm_deferred``), which the product applies to its rows (or its
    partials carry to the consumer); the kernel only, never cuBLAS. ``glu``: :func:`decode_glu`'s store."""
    assert x.stride(1) == 1 and w.weight.shape[1] == x.shape[1]
    handoff = handoff and w.bias is None
    cfg = cfg or _config(x, w, handoff)  # prescaled: the bf16 input's configuration (same key), by takes_prescaled
    assert not prescaled or (x.dtype == torch.float16 and cfg != CUBLAS and cfg[6] == 2), \
        "a prescaled input needs the fp16 product"
    assert row_norm is None or cfg not in (CUBLAS, SCALED_MM), "a deferred RMSNorm needs the kernel"
    assert glu is None or w.bias is None
    out = _launch(x, w, cfg, handoff=handoff, out_dtype=torch.bfloat16 if prescaled else None, row_norm=row_norm,
                  glu=glu)
    if w.bias is not None:
        out = out + w.bias.to(out.dtype)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a full-precision CUDA weight through :func:`decode_linear` (the kernel where it beats
    cuBLAS for this shape and row class, else cuBLAS): the seam for modules that call their projections. Holds
    no reference to the weight between calls (a cache of them would keep every model it saw alive)."""
    if not x.is_cuda or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    w = DecodeWeight.full(weight)
    rows = x.reshape(-1, x.shape[-1])
    out = decode_linear(rows if rows.stride(-1) == 1 else rows.contiguous(), w).view(*x.shape[:-1], -1)
    return out if bias is None else out + bias


def decode_glu(x: torch.Tensor, w: DecodeWeight, *, handoff: bool = False, prescaled: bool = False,
               row_norm: RowNorm | None = None, out_prescaled: bool = False, gelu_tanh: bool = False) -> torch.Tensor:
    """silu(gate) · up [M, N / 2] of a gate|up weight in pairs (:meth:`DecodeWeight.in_pairs`; ``gelu_tanh``:
    gelu_tanh(gate) · up, Gemma4's GeGLU): where the product's configuration for these rows is the kernel in one
    split, its store finishes the GLU (one launch fewer per layer than the product and ``kernels.silu_mul`` or
    ``gelu_tanh_mul``, the same bits); elsewhere (split K, cuBLAS) the product, then that kernel over the pairs.
    ``handoff``, ``prescaled`` and ``row_norm`` as :func:`decode_linear` takes them; ``out_prescaled``: the result
    as the next product's fp16 product reads it."""
    assert w.paired
    handoff = handoff and w.bias is None
    cfg = _config(x, w, handoff)  # the configuration the product alone runs: one per row class, whichever path
    m, k = x.shape
    n = w.weight.shape[0]
    if cfg in (CUBLAS, SCALED_MM) or w.bias is not None or split_k(n, k, w.group, cfg, _sms(x.device))[1] > 1:
        product = decode_linear(x, w, cfg, handoff=handoff, prescaled=prescaled, row_norm=row_norm)
        return glu_mul(product, gelu_tanh=gelu_tanh, prescaled=out_prescaled, paired=True)
    dtype = torch.bfloat16 if prescaled else x.dtype
    assert not out_prescaled or dtype == torch.bfloat16
    out = torch.empty(m, n // 2, dtype=torch.float16 if out_prescaled else dtype, device=x.device)
    return decode_linear(x, w, cfg, prescaled=prescaled, row_norm=row_norm,
                         glu=GluStore(out, out_prescaled, gelu_tanh))


def split_k(n: int, k: int, group: int, cfg: Config, sms: int) -> tuple[int, int]:
    """(columns per split, splits): K split until the grid has ``cfg``'s programs per SM, in whole K tiles
    and whole scale groups. Depends on the weight and the configuration only, never on M."""
    bn, bk, per_sm = cfg[1:4]
    tiles = triton.cdiv(n, bn)
    splits = max(1, min(triton.cdiv(per_sm * sms, tiles), k // bk)) if per_sm else 1
    k_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    if group < k:  # a scale group never straddles two splits
        k_split = triton.cdiv(k_split, group) * group
    return k_split, triton.cdiv(k, k_split)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _launch(x: torch.Tensor, w: DecodeWeight, cfg: Config, handoff: bool = False,
            out_dtype: torch.dtype | None = None, row_norm: RowNorm | None = None,
            glu: GluStore | None = None) -> torch.Tensor | Partials:
    """One launch of ``cfg``; ``out_dtype`` (bf16) marks an fp16 ``x`` as prescaled for the fp16 product; ``glu``:
    :func:`decode_glu`'s store."""
    if cfg == CUBLAS:
        return F.linear(x, w.weight)
    if cfg == SCALED_MM:
        return _scaled_mm(x, w, out_dtype or x.dtype)
    m, k = x.shape
    n = w.weight.shape[0]
    bm, bn, bk, _, warps, stages, fast = cfg[:7]
    if w.fragment_order and bk % FRAGMENT_K:
        raise ValueError(f"a weight in fragment order needs K tiles of a multiple of {FRAGMENT_K} columns, not {bk}")
    tma = len(cfg) > 7 and cfg[7] == 1 and x.is_cuda
    k_split, splits = split_k(n, k, w.group, cfg, _sms(x.device))
    grid = (triton.cdiv(n, bn), splits, triton.cdiv(m, bm))
    handoff = handoff and splits > 1
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else None
    dtype = out_dtype or x.dtype
    assert glu is None or (splits == 1 and w.paired)
    out = part if handoff else glu.out if glu is not None else torch.empty(m, n, dtype=dtype, device=x.device)
    counters = arrival_counters(x.device, grid[0] * grid[2])
    conversion = 3 if w.act_group else 0 if w.wide or x.dtype != torch.bfloat16 or (
        fast == 1 and not x.is_cuda) else fast
    if out_dtype is not None:  # prescaled: the fp16 product, its conversion of x already done
        conversion = 2
    if conversion == 3 and bk != w.act_group:  # a configuration passed in or read from a choices file
        raise ValueError(f"a W8A8 product needs K tiles of one activation group ({w.act_group} columns), not {bk}")
    precision = "ieee" if x.dtype == torch.float32 else None
    x_scales = None
    if conversion == 3 and m > SMALL_M and switched_on(E4M3_INPUT_ENV):
        x, x_scales = e4m3_rows(x, w.act_group)
    desc = TensorDescriptor.from_tensor(w.weight, [bn, bk]) if tma else w.weight
    _decode_gemm_kernel[grid](x, w.weight, desc, w.scale, out if part is None else part, counters, out,
                              w.scale if row_norm is None else row_norm.sumsq,
                              w.scale if x_scales is None else x_scales, m, n, k, w.scale.shape[1], w.group,
                              k_split, splits, x.stride(0), 1 if row_norm is None else row_norm.width,
                              0.0 if row_norm is None else row_norm.eps, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                              PER_CHANNEL=w.group >= k, TMA=tma,
                              EVEN=n % bn == 0 and k % bk == 0,
                              PRECISION=precision,
                              FAST_CVT=conversion, SPLIT_K=splits > 1,
                              WIDE=w.wide, ASM=x.is_cuda, HANDOFF=handoff,
                              NORM=0 if row_norm is None or handoff else row_norm.sumsq.shape[1],
                              FRAGMENT=w.fragment_order, KEEP_ASYNC=switched_on(KEEP_ASYNC_ENV, default=False),
                              X_E4M3=x_scales is not None, GLU=glu is not None,
                              GLU_PRESCALED=glu is not None and glu.prescaled,
                              GLU_GELU=glu is not None and glu.gelu_tanh,
                              num_warps=warps,
                              num_stages=stages, **pdl_options(x, m))
    if handoff:
        scaled = w.group >= k and not w.wide
        return Partials(part, w.scale if scaled else None, SHIFTS.get(conversion, 1.0), dtype, row_norm)
    return out
