"""OpenAI Triton kernel for ``dspark::SpecVerify`` (specification: README.md beside this file).

One program per request b. Rows k = 0, 1, ... of the logits are streamed once each, in tiles of ``BLOCK_V``,
and the loop stops at the first rejected draft (or at ℓ): later rows are never read. Per row a single pass
keeps, per lane, the running maximum, the lane's first index of it and (sampling) the running sum of
exp(z − max) rescaled online; lanes are merged at the end of the row. The drafted token's logit and draft
probability are then gathered as scalars. The sampling draw re-reads row j twice (sum of w, then the scan to
the crossing, which stops early).

Kernel parameters follow TensorRT's ahead-of-time plugin convention — input pointers, int32 scalars (G, V),
output pointers — so the same PTX serves ``spec_verify_triton`` and ``trt_plugin.py``. Logits must be
contiguous [B, G+1, V]; the launcher makes them so.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from dspark_compile.plugins.spec_verify.schema import GREEDY, MODES, SAMPLING

DEFAULT_BLOCK_V = 1024
DEFAULT_NUM_WARPS = 4
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
def _sampling_kernel(
    logits_ptr, draft_ptr, vlen_ptr, probs_ptr, temp_ptr, unif_ptr, G, V, accepted_ptr, next_ptr,
    BLOCK_V: tl.constexpr,
):
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


def _kernel_for(mode: str) -> Any:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, found {mode!r}")
    return _greedy_kernel if mode == GREEDY else _sampling_kernel


def spec_verify_triton(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    verify_len: torch.Tensor,
    *,
    mode: str,
    draft_probs: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    block_v: int = DEFAULT_BLOCK_V,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(accepted, next_token)`` int64 [B] on the inputs' CUDA device; same contract as the reference."""
    kernel = _kernel_for(mode)
    if not (target_logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("spec_verify_triton needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    batch, rows, vocab = target_logits.shape
    gamma = draft_tokens.shape[1]
    if rows != gamma + 1:
        raise ValueError(f"target_logits has {rows} rows per request, draft_tokens {gamma}: need G+1")
    block = min(block_v, triton.next_power_of_2(vocab))
    accepted = torch.empty(batch, dtype=torch.int64, device=target_logits.device)
    next_token = torch.empty_like(accepted)
    if target_logits.dtype not in LOGITS_DTYPES.values():
        raise ValueError(f"target_logits must be fp32/fp16/bf16, found {target_logits.dtype}")
    args: list[Any] = [target_logits.contiguous(), draft_tokens.to(torch.int64).contiguous(),
                       verify_len.to(torch.int64).contiguous()]
    if mode == SAMPLING:
        if draft_probs is None or temperature is None or uniforms is None:
            raise ValueError("mode 'sampling' needs draft_probs, temperature and uniforms")
        args += [t.float().contiguous() for t in (draft_probs, temperature, uniforms)]
    kernel[(batch,)](*args, gamma, vocab, accepted, next_token, BLOCK_V=block, num_warps=num_warps)
    return accepted, next_token


def kernel_signature(mode: str, logits_dtype: str) -> dict[str, str]:
    """Triton type string per kernel parameter, in order (pointers, then G/V, then outputs, then BLOCK_V)."""
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {sorted(LOGITS_DTYPES)}, found {logits_dtype!r}")
    sig = {"logits_ptr": f"*{logits_dtype}", "draft_ptr": "*i64", "vlen_ptr": "*i64"}
    if _kernel_for(mode) is _sampling_kernel:
        sig |= {"probs_ptr": "*fp32", "temp_ptr": "*fp32", "unif_ptr": "*fp32"}
    return sig | {"G": "i32", "V": "i32", "accepted_ptr": "*i64", "next_ptr": "*i64", "BLOCK_V": "constexpr"}


def compile_ptx(
    mode: str,
    logits_dtype: str,
    arch: int = 90,
    *,
    block_v: int = DEFAULT_BLOCK_V,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> dict[str, Any]:
    """Compile the kernel for ``sm_{arch}`` without a GPU; returns PTX and what a launcher needs.

    Keys: ``ptx``, ``name`` (entry point), ``shared`` (bytes of dynamic shared memory), ``num_warps``,
    ``block_v``, ``signature``, ``ptx_version`` (the ``.version`` line: the driver must support it),
    ``triton_version``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = kernel_signature(mode, logits_dtype)
    source = ASTSource(_kernel_for(mode), signature=signature, constexprs={"BLOCK_V": block_v})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    meta = compiled.metadata
    # Triton appends scratch-pointer parameters that TensorRT's AOT launch does not pass: only safe unused.
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"{meta.name} needs global scratch memory, which an AOT plugin launch cannot pass")
    ptx = compiled.asm["ptx"]
    version = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".version")), "")
    return {
        "ptx": ptx,
        "name": meta.name,
        "shared": meta.shared,
        "num_warps": meta.num_warps,
        "block_v": block_v,
        "signature": signature,
        "ptx_version": version,
        "triton_version": triton.__version__,
    }
