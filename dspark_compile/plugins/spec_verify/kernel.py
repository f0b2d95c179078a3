"""OpenAI Triton kernels for ``dspark::SpecVerify`` (specification: README.md beside this file).

**Split** (the default, the torch / CUDA-graph path) spreads each row's vocabulary over chunk programs so the
whole GPU reads the logits once: per-chunk partials, a combine that walks the acceptance tests, and for
sampling a draw inside the one chunk where the cumulative weight crosses u·sum(w); no host synchronisation.
**Single program** is one program per request with TensorRT's AOT plugin parameter order (``trt_plugin.py``).
Both fold 1/T and log2(e) into one float32 multiplier (a rounding difference the contract allows).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from dspark_compile.plugins.spec_verify.op_schema import GREEDY, SAMPLING, check_mode

DEFAULT_BLOCK_V = 1024  # single-program kernels
DEFAULT_NUM_WARPS = 4  # single-program kernels
SPLIT_CHUNK = 4096  # split path, phase 1: vocabulary elements per program (one tile)
SMALL_CHUNK = 1024  # ... when 4096 would give fewer than MIN_PROGRAMS programs
MIN_PROGRAMS = 1024
_LOG2E = tl.constexpr(1.4426950408889634)
LOGITS_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@triton.jit
def _row_stats(row_ptr, V, inv_temp, BLOCK_V: tl.constexpr, WITH_SUM: tl.constexpr):
    """(max, first argmax, sum of exp(z - max)) of z = row · inv_temp (row itself without WITH_SUM), one pass."""
    offs = tl.arange(0, BLOCK_V)
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    i_vec = tl.zeros([BLOCK_V], tl.int32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        z = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        if WITH_SUM:
            z = z * inv_temp  # exact when inv_temp == 1 (greedy rows); else within an ulp of z / T
        i_vec = tl.where(z > m_vec, idx, i_vec)  # strict: each lane keeps its first maximum
        m_new = tl.maximum(m_vec, z)
        if WITH_SUM:
            # Guards keep lanes that have only seen -inf (padding) at 0 instead of exp(-inf + inf) = nan.
            scale = tl.where(m_vec == m_new, 1.0, tl.exp(m_vec - m_new))
            s_vec = s_vec * scale + tl.where(z == float("-inf"), 0.0, tl.exp(z - m_new))
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    argmax = tl.min(tl.where(m_vec == m, i_vec, V), axis=0)
    s = 0.0
    if WITH_SUM:
        s = tl.sum(tl.where(m_vec == float("-inf"), 0.0, s_vec * tl.exp(m_vec - m)), axis=0)
    return m, argmax, s


@triton.jit
def _greedy_kernel(logits_ptr, draft_ptr, vlen_ptr, G, V, accepted_ptr, next_ptr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ell = tl.minimum(tl.maximum(tl.load(vlen_ptr + b), 0), G).to(tl.int32)
    logits_b = logits_ptr + b * (G + 1) * V
    k = 0
    _, argmax, _ = _row_stats(logits_b, V, 1.0, BLOCK_V, False)
    ok = (k < ell) & (tl.load(draft_ptr + b * G + k, mask=k < ell, other=-1) == argmax)
    while ok:
        k += 1
        _, argmax, _ = _row_stats(logits_b + k * V, V, 1.0, BLOCK_V, False)
        ok = (k < ell) & (tl.load(draft_ptr + b * G + k, mask=k < ell, other=-1) == argmax)
    tl.store(accepted_ptr + b, k.to(tl.int64))
    tl.store(next_ptr + b, argmax.to(tl.int64))


@triton.jit
def _sampling_test(logits_b, draft_ptr, probs_ptr, unif_ptr, b, k, ell, G, V, inv_temp, greedy, m, argmax, s):
    """Whether draft k (< ℓ) is accepted, given row k's stats; False once k reaches ℓ."""
    live = k < ell
    x = tl.load(draft_ptr + b * G + k, mask=live, other=0)
    z = tl.load(logits_b + k * V + x, mask=live, other=0.0).to(tl.float32) * inv_temp
    q = tl.load(probs_ptr + (b * G + k) * V + x, mask=live, other=1.0)
    ratio = (tl.exp(z - m) / s) / tl.maximum(q, 1e-8)
    u = tl.load(unif_ptr + b * (G + 1) + k, mask=live, other=1.0)
    passed = tl.where(greedy, x == argmax, u < tl.minimum(ratio, 1.0))
    return live & passed


@triton.jit
def _draw(row_ptr, q_ptr, has_q, u, V, inv_temp, m, s, BLOCK_V: tl.constexpr):
    """Inverse-CDF draw from w = residual max(p - q, 0) (if has_q and it sums > 1e-8) or p."""
    offs = tl.arange(0, BLOCK_V)
    p_acc = tl.zeros([BLOCK_V], tl.float32)
    r_acc = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        mask = idx < V
        z = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        p = tl.exp(z - m) / s
        q = tl.load(q_ptr + idx, mask=mask & has_q, other=0.0)
        p_acc += p
        r_acc += tl.maximum(p - q, 0.0)
    use_r = has_q & (tl.sum(r_acc, axis=0) > 1e-8)
    threshold = u * tl.where(use_r, tl.sum(r_acc, axis=0), tl.sum(p_acc, axis=0))

    found = V
    last_positive = -1
    carry = 0.0
    v0 = 0
    while (found == V) & (v0 < V):
        idx = v0 + offs
        mask = idx < V
        z = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        p = tl.exp(z - m) / s
        q = tl.load(q_ptr + idx, mask=mask & use_r, other=0.0)
        w = tl.where(use_r, tl.maximum(p - q, 0.0), p)
        c = tl.cumsum(w, axis=0) + carry
        found = tl.min(tl.where((c > threshold) & mask, idx, V), axis=0)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0, idx, -1), axis=0))
        carry += tl.sum(w, axis=0)
        v0 += BLOCK_V
    return tl.where(found < V, found, last_positive)


@triton.jit
def _sampling_kernel(logits_ptr, draft_ptr, vlen_ptr, probs_ptr, temp_ptr, unif_ptr, G, V, accepted_ptr, next_ptr,
                     BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ell = tl.minimum(tl.maximum(tl.load(vlen_ptr + b), 0), G).to(tl.int32)
    t_in = tl.load(temp_ptr + b)
    greedy = not (t_in > 0)
    inv_temp = tl.math.div_rn(1.0, tl.where(greedy, 1.0, t_in))
    logits_b = logits_ptr + b * (G + 1) * V
    k = 0
    m, argmax, s = _row_stats(logits_b, V, inv_temp, BLOCK_V, True)
    ok = _sampling_test(logits_b, draft_ptr, probs_ptr, unif_ptr, b, k, ell, G, V, inv_temp, greedy, m, argmax, s)
    while ok:
        k += 1
        m, argmax, s = _row_stats(logits_b + k * V, V, inv_temp, BLOCK_V, True)
        ok = _sampling_test(
            logits_b, draft_ptr, probs_ptr, unif_ptr, b, k, ell, G, V, inv_temp, greedy, m, argmax, s
        )
    token = argmax
    if not greedy:
        u = tl.load(unif_ptr + b * (G + 1) + G)
        q_row = probs_ptr + (b * G + tl.minimum(k, G - 1)) * V  # row ℓ = G has no q; has_q masks it
        token = _draw(logits_b + k * V, q_row, k < ell, u, V, inv_temp, m, s, BLOCK_V)
    tl.store(accepted_ptr + b, k.to(tl.int64))
    tl.store(next_ptr + b, token.to(tl.int64))


@triton.jit
def _log2_scale(temperature):
    """float32 multiplier c with 2^(x·c) = e^(x/T): (1/T)·log2(e); T ≤ 0 (a greedy request) gives log2(e)."""
    inv_temp = tl.math.div_rn(1.0, tl.where(temperature > 0, temperature, 1.0))
    return inv_temp * _LOG2E


@triton.jit(do_not_specialize=["R", "C"])  # V specialised: V % 16 == 0 enables vector loads
def _chunk_stats_kernel(logits_ptr, vlen_ptr, temp_ptr, R, V, C, m_ptr, i_ptr, s_ptr, CHUNK: tl.constexpr,
                        SAMPLING: tl.constexpr):
    """Phase 1, program (b·R + k, c): max, first argmax and (sampling) Σ 2^(x·c2 − max·c2) of chunk c of row k."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = row // R
    ell = tl.minimum(tl.maximum(tl.load(vlen_ptr + b), 0), R - 1)
    if row - b * R <= ell:  # rows past ℓ are never used
        idx = c * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(logits_ptr + row * V + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        out = row * C + c
        tl.store(m_ptr + out, m)
        tl.store(i_ptr + out, tl.min(tl.where(x == m, idx, V), axis=0))  # first maximum of the chunk
        if SAMPLING:
            c2 = _log2_scale(tl.load(temp_ptr + b))
            e = tl.exp2(x * c2 - m * c2)
            tl.store(s_ptr + out, tl.sum(tl.where(x > float("-inf"), e, 0.0), axis=0))


@triton.jit
def _combine_rows(m_ptr, i_ptr, s_ptr, b, G, V, C, ell, c2, R_PAD: tl.constexpr, C_PAD: tl.constexpr,
                  WITH_SUM: tl.constexpr):
    """Per row k ≤ ℓ of request b: (k, max, first argmax, Σ 2^(x·c2 − max·c2)) from the phase-1 partials."""
    k = tl.arange(0, R_PAD)
    cols = tl.arange(0, C_PAD)
    mask = (k[:, None] <= ell) & (cols[None, :] < C)
    off = (b * (G + 1) + k[:, None]) * C + cols[None, :]
    m = tl.load(m_ptr + off, mask=mask, other=float("-inf"))
    a = tl.load(i_ptr + off, mask=mask, other=V)
    row_max = tl.max(m, axis=1)
    # Chunks are in vocabulary order, so the smallest index among the chunks holding the maximum is the first.
    argmax = tl.min(tl.where(mask & (m == row_max[:, None]), a, V), axis=1)
    total = tl.zeros([R_PAD], tl.float32)
    if WITH_SUM:
        s = tl.load(s_ptr + off, mask=mask, other=0.0)
        scaled = s * tl.exp2(m * c2 - (row_max * c2)[:, None])
        total = tl.sum(tl.where(m > float("-inf"), scaled, 0.0), axis=1)
    return k, row_max, argmax, total


@triton.jit(do_not_specialize=["G", "V", "C"])
def _accept_greedy_kernel(draft_ptr, vlen_ptr, G, V, C, m_ptr, i_ptr, accepted_ptr, next_ptr, R_PAD: tl.constexpr,
                          C_PAD: tl.constexpr):
    """Phase 2 (greedy), program b: row argmaxes, leading matches, t_j."""
    b = tl.program_id(0).to(tl.int64)
    ell = tl.minimum(tl.maximum(tl.load(vlen_ptr + b), 0), G).to(tl.int32)
    k, _, argmax, _ = _combine_rows(m_ptr, i_ptr, m_ptr, b, G, V, C, ell, 1.0, R_PAD, C_PAD, False)
    live = k < ell
    ok = live & (tl.load(draft_ptr + b * G + k, mask=live, other=-1) == argmax)
    j = tl.min(tl.where(ok, R_PAD, k), axis=0)  # first failing position; ≤ ℓ since rows ≥ ℓ never pass
    tl.store(accepted_ptr + b, j.to(tl.int64))
    tl.store(next_ptr + b, tl.sum(tl.where(k == j, argmax, 0), axis=0).to(tl.int64))


@triton.jit(do_not_specialize=["G", "C"])
def _accept_sampling_kernel(logits_ptr, draft_ptr, vlen_ptr, probs_ptr, temp_ptr, unif_ptr, G, V, C, m_ptr, i_ptr,
                            s_ptr, r_ptr, stats_ptr, accepted_ptr, next_ptr, CHUNK: tl.constexpr, R_PAD: tl.constexpr,
                            C_PAD: tl.constexpr):
    """Phase 2 (sampling), program (b, c): acceptance walk; chunk c's residual sum of row j when j < ℓ.

    Program c = 0 writes accepted = j, next_token = t_j (final for greedy requests) and (max·c2, sum) of row j.
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    ell = tl.minimum(tl.maximum(tl.load(vlen_ptr + b), 0), G).to(tl.int32)
    t_in = tl.load(temp_ptr + b)
    sampled = t_in > 0
    c2 = _log2_scale(t_in)
    k, row_max, argmax, total = _combine_rows(m_ptr, i_ptr, s_ptr, b, G, V, C, ell, c2, R_PAD, C_PAD, True)
    m2 = row_max * c2
    live = k < ell
    x = tl.load(draft_ptr + b * G + k, mask=live, other=0)
    z = tl.load(logits_ptr + (b * (G + 1) + k) * V + x, mask=live, other=0.0).to(tl.float32)
    q = tl.load(probs_ptr + (b * G + k) * V + x, mask=live, other=1.0)
    u = tl.load(unif_ptr + b * (G + 1) + k, mask=live, other=1.0)
    ratio = (tl.exp2(z * c2 - m2) / total) / tl.maximum(q, 1e-8)
    ok = live & tl.where(sampled, u < tl.minimum(ratio, 1.0), x == argmax)
    j = tl.min(tl.where(ok, R_PAD, k), axis=0)
    m2_j = tl.max(tl.where(k == j, m2, float("-inf")), axis=0)
    s_j = tl.sum(tl.where(k == j, total, 0.0), axis=0)
    if c == 0:
        tl.store(accepted_ptr + b, j.to(tl.int64))
        tl.store(next_ptr + b, tl.sum(tl.where(k == j, argmax, 0), axis=0).to(tl.int64))
        tl.store(stats_ptr + 2 * b, m2_j)
        tl.store(stats_ptr + 2 * b + 1, s_j)
    if sampled & (j < ell):
        idx = c * CHUNK + tl.arange(0, CHUNK)
        valid = idx < V
        zr = tl.load(logits_ptr + (b * (G + 1) + j) * V + idx, mask=valid, other=float("-inf")).to(tl.float32)
        qr = tl.load(probs_ptr + (b * G + j) * V + idx, mask=valid, other=0.0)
        p = tl.exp2(zr * c2 - m2_j) / s_j
        tl.store(r_ptr + b * C + c, tl.sum(tl.maximum(p - qr, 0.0), axis=0))


@triton.jit(do_not_specialize=["G", "C"])
def _draw_kernel(logits_ptr, vlen_ptr, probs_ptr, temp_ptr, unif_ptr, G, V, C, m_ptr, s_ptr, r_ptr, stats_ptr,
                 accepted_ptr, next_ptr, CHUNK: tl.constexpr, C_PAD: tl.constexpr):
    """Phase 3 (sampling), program b: inverse-CDF draw; per-chunk weights locate the chunk, one chunk is scanned."""
    b = tl.program_id(0).to(tl.int64)
    t_in = tl.load(temp_ptr + b)
    if t_in > 0:  # greedy requests keep phase 2's t_j
        ell = tl.minimum(tl.maximum(tl.load(vlen_ptr + b), 0), G).to(tl.int32)
        j = tl.load(accepted_ptr + b)
        c2 = _log2_scale(t_in)
        m2_j = tl.load(stats_ptr + 2 * b)
        s_j = tl.load(stats_ptr + 2 * b + 1)
        cols = tl.arange(0, C_PAD)
        in_row = cols < C
        has_q = j < ell
        r = tl.load(r_ptr + b * C + cols, mask=in_row & has_q, other=0.0)  # written by phase 2 iff has_q
        use_r = has_q & (tl.sum(r, axis=0) > 1e-8)
        row = b * (G + 1) + j
        m = tl.load(m_ptr + row * C + cols, mask=in_row, other=float("-inf"))
        s = tl.load(s_ptr + row * C + cols, mask=in_row, other=0.0)
        p_chunk = tl.where(m > float("-inf"), s * tl.exp2(m * c2 - m2_j), 0.0) / s_j
        w_chunk = tl.where(use_r, r, p_chunk)
        cum = tl.cumsum(w_chunk, axis=0)
        threshold = tl.load(unif_ptr + b * (G + 1) + G) * tl.sum(w_chunk, axis=0)
        first = tl.min(tl.where(in_row & (cum > threshold), cols, C_PAD), axis=0)
        last = tl.max(tl.where(in_row & (w_chunk > 0), cols, 0), axis=0)
        cc = tl.where(first < C_PAD, first, last)  # no crossing (rounding): the last chunk with weight
        carry = tl.sum(tl.where(cols == cc - 1, cum, 0.0), axis=0)

        idx = cc * CHUNK + tl.arange(0, CHUNK)
        valid = idx < V
        z = tl.load(logits_ptr + row * V + idx, mask=valid, other=float("-inf")).to(tl.float32)
        p = tl.exp2(z * c2 - m2_j) / s_j
        q = tl.load(probs_ptr + (b * G + j) * V + idx, mask=valid & use_r, other=0.0)
        w = tl.where(use_r, tl.maximum(p - q, 0.0), p)
        found = tl.min(tl.where(valid & (tl.cumsum(w, axis=0) + carry > threshold), idx, V), axis=0)
        last_positive = tl.max(tl.where(valid & (w > 0), idx, -1), axis=0)
        token = tl.where(found < V, found, last_positive)
        token = tl.where(token >= 0, token, tl.load(next_ptr + b))  # only if every weight underflowed
        tl.store(next_ptr + b, token.to(tl.int64))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def split_config(batch: int, gamma: int, vocab: int, chunk: int | None = None) -> dict[str, int]:
    """Launch constants of the split path: ``chunk`` (elements per phase-1 program), ``n_chunks``, paddings."""
    if chunk is None:
        rows = batch * (gamma + 1)
        chunk = SPLIT_CHUNK if rows * -(-vocab // SPLIT_CHUNK) >= MIN_PROGRAMS else SMALL_CHUNK
    chunk = max(16, min(_next_pow2(chunk), _next_pow2(vocab)))
    r_pad = max(16, _next_pow2(gamma + 1))
    while r_pad * _next_pow2(-(-vocab // chunk)) > 8192:  # phase 2 holds an [R_PAD, C_PAD] tile of partials
        chunk *= 2
    n_chunks = -(-vocab // chunk)
    # Floors keep the number of compiled variants small (R_PAD, C_PAD are compile-time constants).
    return {"chunk": chunk, "n_chunks": n_chunks, "r_pad": r_pad, "c_pad": max(32, _next_pow2(n_chunks))}


def _split_launch(logits: torch.Tensor, drafts: torch.Tensor, vlen: torch.Tensor, sampling_args: list[Any],
                  accepted: torch.Tensor, next_token: torch.Tensor, mode: str, chunk: int | None,
                  num_warps: int | None) -> None:
    batch, rows, vocab = logits.shape
    gamma = rows - 1
    cfg = split_config(batch, gamma, vocab, chunk)
    chunk, n_chunks, r_pad, c_pad = cfg["chunk"], cfg["n_chunks"], cfg["r_pad"], cfg["c_pad"]
    warps = num_warps or max(1, min(8, chunk // 512))  # 4096 -> 8 warps (16 fp32 per thread), 1024 -> 2
    warps_23 = max(4, warps)  # phases 2-3 hold [R_PAD, C_PAD] tiles of partials
    sampling = mode == SAMPLING
    n = -(-batch * rows * n_chunks // 4) * 4  # 16-byte aligned slices (alignment is part of Triton's key)
    nb = -(-batch * n_chunks // 4) * 4
    work = torch.empty((2 * n + nb + 2 * batch) if sampling else n, dtype=torch.float32, device=logits.device)
    m_part = work[:n]
    i_part = torch.empty(n, dtype=torch.int32, device=logits.device)
    if not sampling:
        _chunk_stats_kernel[(batch * rows, n_chunks)](
            logits, vlen, vlen, rows, vocab, n_chunks, m_part, i_part, m_part,
            CHUNK=chunk, SAMPLING=False, num_warps=warps)
        _accept_greedy_kernel[(batch,)](
            drafts, vlen, gamma, vocab, n_chunks, m_part, i_part, accepted, next_token,
            R_PAD=r_pad, C_PAD=c_pad, num_warps=warps_23)
        return
    probs, temp, unif = sampling_args
    s_part, r_part, stats = work[n:2 * n], work[2 * n:2 * n + nb], work[2 * n + nb:]
    _chunk_stats_kernel[(batch * rows, n_chunks)](
        logits, vlen, temp, rows, vocab, n_chunks, m_part, i_part, s_part,
        CHUNK=chunk, SAMPLING=True, num_warps=warps)
    _accept_sampling_kernel[(batch, n_chunks)](
        logits, drafts, vlen, probs, temp, unif, gamma, vocab, n_chunks,
        m_part, i_part, s_part, r_part, stats, accepted, next_token,
        CHUNK=chunk, R_PAD=r_pad, C_PAD=c_pad, num_warps=warps_23)
    _draw_kernel[(batch,)](
        logits, vlen, probs, temp, unif, gamma, vocab, n_chunks, m_part, s_part, r_part, stats,
        accepted, next_token, CHUNK=chunk, C_PAD=c_pad, num_warps=warps_23)


def _kernel_for(mode: str) -> Any:
    check_mode(mode)
    return _greedy_kernel if mode == GREEDY else _sampling_kernel


def spec_verify_triton(target_logits: Tensor, draft_tokens: Tensor, verify_len: Tensor, *, mode: str,
                       draft_probs: Tensor | None = None, temperature: Tensor | None = None,
                       uniforms: Tensor | None = None, single_program: bool = False, chunk: int | None = None,
                       block_v: int = DEFAULT_BLOCK_V, num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """``(accepted, next_token)`` int64 [B] on the inputs' CUDA device; same contract as the reference.

    Split path by default (``chunk``: vocabulary elements per phase-1 program, default :func:`split_config`;
    ``num_warps`` of phase 1); ``single_program=True`` is the kernel the TensorRT plugin embeds (``block_v``).
    """
    kernel = _kernel_for(mode)
    if not (target_logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("spec_verify_triton needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    batch, rows, vocab = target_logits.shape
    gamma = draft_tokens.shape[1]
    if rows != gamma + 1:
        raise ValueError(f"target_logits has {rows} rows per request, draft_tokens {gamma}: need G+1")
    accepted = torch.empty(batch, dtype=torch.int64, device=target_logits.device)
    next_token = torch.empty_like(accepted)
    if target_logits.dtype not in LOGITS_DTYPES.values():
        raise ValueError(f"target_logits must be fp32/fp16/bf16, found {target_logits.dtype}")
    logits = target_logits.contiguous()
    drafts = draft_tokens.to(torch.int64).contiguous()
    vlen = verify_len.to(torch.int64).contiguous()
    sampling_args: list[Any] = []
    if mode == SAMPLING:
        if draft_probs is None or temperature is None or uniforms is None:
            raise ValueError("mode 'sampling' needs draft_probs, temperature and uniforms")
        sampling_args = [t.float().contiguous() for t in (draft_probs, temperature, uniforms)]
    if batch == 0:
        return accepted, next_token
    if not single_program:
        _split_launch(logits, drafts, vlen, sampling_args, accepted, next_token, mode, chunk, num_warps)
        return accepted, next_token
    block = min(block_v, triton.next_power_of_2(vocab))
    kernel[(batch,)](logits, drafts, vlen, *sampling_args, gamma, vocab, accepted, next_token, BLOCK_V=block,
                     num_warps=num_warps or DEFAULT_NUM_WARPS)
    return accepted, next_token


_POINTER_TYPES = {"draft_ptr": "*i64", "vlen_ptr": "*i64", "accepted_ptr": "*i64", "next_ptr": "*i64", "i_ptr": "*i32"}


def _signature(fn: Any, logits_dtype: str, **override: str) -> dict[str, str]:
    """Triton type per parameter of ``fn``, in order: the logits in ``logits_dtype``, token/length/output
    pointers int64, other pointers float32, one-letter sizes int32, other upper-case names constexpr."""
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {sorted(LOGITS_DTYPES)}, found {logits_dtype!r}")

    def kind(name: str) -> str:
        if name.endswith("_ptr"):
            return f"*{logits_dtype}" if name == "logits_ptr" else _POINTER_TYPES.get(name, "*fp32")
        return "i32" if len(name) == 1 else "constexpr"

    return {name: override.get(name, kind(name)) for name in fn.arg_names}


def kernel_signature(mode: str, logits_dtype: str) -> dict[str, str]:
    """The single-program kernel's parameters: input pointers, then G/V, then outputs (TensorRT's AOT order)."""
    return _signature(_kernel_for(mode), logits_dtype)


def _compile(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], arch: int, num_warps: int) -> Any:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def compile_ptx(mode: str, logits_dtype: str, arch: int = 90, *, block_v: int = DEFAULT_BLOCK_V,
                num_warps: int = DEFAULT_NUM_WARPS) -> dict[str, Any]:
    """Compile the single-program kernel for ``sm_{arch}`` without a GPU: ``ptx``, its entry ``name``,
    ``shared`` bytes, ``num_warps``, ``block_v``, ``signature``, ``ptx_version`` (the driver must support it)
    and ``triton_version``."""
    signature = kernel_signature(mode, logits_dtype)
    compiled = _compile(_kernel_for(mode), signature, {"BLOCK_V": block_v}, arch, num_warps)
    meta = compiled.metadata
    # Triton appends scratch-pointer parameters that TensorRT's AOT launch does not pass: only safe unused.
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"{meta.name} needs global scratch memory, which an AOT plugin launch cannot pass")
    ptx = compiled.asm["ptx"]
    version = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".version")), "")
    return {"ptx": ptx, "name": meta.name, "shared": meta.shared, "num_warps": meta.num_warps, "block_v": block_v,
            "signature": signature, "ptx_version": version, "triton_version": triton.__version__}


def split_kernel_signatures(mode: str, logits_dtype: str, *, chunk: int = SPLIT_CHUNK, r_pad: int = 16,
                            c_pad: int = 64) -> list[tuple[Any, dict[str, str], dict[str, Any]]]:
    """(kernel, Triton signature, constexprs) of each split-path launch for ``mode``, in launch order."""
    check_mode(mode)
    sampling = mode == SAMPLING
    greedy_temp = {} if sampling else {"temp_ptr": "*i64"}  # greedy launches pass vlen there
    stats = (_chunk_stats_kernel, _signature(_chunk_stats_kernel, logits_dtype, **greedy_temp),
             {"CHUNK": chunk, "SAMPLING": sampling})
    if not sampling:
        return [stats, (_accept_greedy_kernel, _signature(_accept_greedy_kernel, logits_dtype),
                        {"R_PAD": r_pad, "C_PAD": c_pad})]
    return [stats,
            (_accept_sampling_kernel, _signature(_accept_sampling_kernel, logits_dtype),
             {"CHUNK": chunk, "R_PAD": r_pad, "C_PAD": c_pad}),
            (_draw_kernel, _signature(_draw_kernel, logits_dtype), {"CHUNK": chunk, "C_PAD": c_pad})]


def compile_split_ptx(mode: str, logits_dtype: str, arch: int = 90, *, chunk: int = SPLIT_CHUNK,
                      num_warps: int = 8) -> list[dict[str, Any]]:
    """Compile the split path's kernels for ``sm_{arch}`` without a GPU (a check that they build; the torch
    launcher JIT-compiles them itself). One dict per kernel: ``name``, ``ptx``, ``shared``, ``num_warps``."""
    out = []
    for fn, signature, constexprs in split_kernel_signatures(mode, logits_dtype, chunk=chunk):
        compiled = _compile(fn, signature, constexprs, arch, num_warps)
        out.append({"name": compiled.metadata.name, "ptx": compiled.asm["ptx"], "shared": compiled.metadata.shared,
                    "num_warps": compiled.metadata.num_warps})
    return out
