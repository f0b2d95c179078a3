"""Reference implementations of ``dspark::SpecVerify`` (specification: README.md beside this file).

:func:`spec_verify_reference` (NumPy, one request and position at a time) is the ground truth;
:func:`spec_verify_torch` is the same rules vectorised without data-dependent control flow, so it exports;
:func:`decision_margin` tells tests a real disagreement from a near-tie.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dspark_compile.plugins.spec_verify.op_schema import GREEDY, SAMPLING, check_mode

Q_FLOOR = 1e-8  # draft probabilities are clamped to this before dividing (README, sampling rule 2)
RESIDUAL_FLOOR = 1e-8  # a residual summing to at most this is replaced by p_j (sampling rule 3)


def _as_numpy(x: Any, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # bf16/fp16 -> fp32 is exact, and NumPy has no bf16.
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    return np.asarray(x).astype(dtype)


def _check_args(mode: str, draft_probs: Any, temperature: Any, uniforms: Any) -> None:
    check_mode(mode)
    if mode == SAMPLING and (draft_probs is None or temperature is None or uniforms is None):
        raise ValueError("mode 'sampling' needs draft_probs, temperature and uniforms")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def inverse_cdf(weights: np.ndarray, u: float) -> int:
    """Smallest i with cumsum(w)[i] > u * sum(w); the last positive weight if rounding leaves none."""
    w = weights.astype(np.float32)
    above = np.nonzero(np.cumsum(w, dtype=np.float32) > np.float32(u) * w.sum(dtype=np.float32))[0]
    if above.size:
        return int(above[0])
    return int(np.nonzero(w > 0)[0][-1])


def _sampling_walk(p: np.ndarray, drafts: np.ndarray, q: np.ndarray, u: np.ndarray,
                   ell: int) -> tuple[int, np.ndarray, list[float]]:
    """One sampling request in ``p``'s float dtype: accepted j, the weights of the final draw, and
    |u − threshold| of every acceptance test made."""
    one, j, gaps = p.dtype.type(1.0), 0, []
    while j < ell:
        x = drafts[j]
        threshold = min(one, p[j, x] / max(q[j, x], p.dtype.type(Q_FLOOR)))
        gaps.append(abs(float(u[j]) - float(threshold)))
        if not u[j] < threshold:
            break
        j += 1
    w = p[j]
    if j < ell:
        residual = np.maximum(p[j] - q[j], p.dtype.type(0.0))
        w = p[j] if residual.sum(dtype=p.dtype) <= RESIDUAL_FLOOR else residual
    return j, w, gaps


def _numpy_args(dtype: type, target_logits: Any, draft_tokens: Any, verify_len: Any, draft_probs: Any,
                temperature: Any, uniforms: Any) -> tuple[np.ndarray, ...]:
    drafts = _as_numpy(draft_tokens, np.int64)
    lengths = np.clip(_as_numpy(verify_len, np.int64), 0, drafts.shape[1])
    sampling = [None if x is None else _as_numpy(x, dtype) for x in (draft_probs, temperature, uniforms)]
    return (_as_numpy(target_logits, dtype), drafts, lengths, *sampling)


def spec_verify_reference(target_logits: Any, draft_tokens: Any, verify_len: Any, *, mode: str,
                          draft_probs: Any = None, temperature: Any = None,
                          uniforms: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(accepted, next_token)``, both int64 [B]. Accepts NumPy arrays or (CPU/GPU) torch tensors."""
    _check_args(mode, draft_probs, temperature, uniforms)
    logits, drafts, lengths, q, temps, u = _numpy_args(np.float32, target_logits, draft_tokens, verify_len,
                                                       draft_probs, temperature, uniforms)
    batch, gamma = drafts.shape
    accepted = np.zeros(batch, dtype=np.int64)
    next_token = np.zeros(batch, dtype=np.int64)
    for b in range(batch):
        ell = int(lengths[b])
        if mode == GREEDY or not temps[b] > 0:
            targets = logits[b].argmax(axis=-1)  # first index of the maximum on ties
            j = 0
            while j < ell and drafts[b, j] == targets[j]:
                j += 1
            accepted[b], next_token[b] = j, targets[j]
            continue
        j, w, _ = _sampling_walk(_softmax(logits[b] / temps[b]), drafts[b], q[b], u[b], ell)
        accepted[b], next_token[b] = j, inverse_cdf(w, u[b, gamma])
    return accepted, next_token


def decision_margin(target_logits: Any, draft_tokens: Any, verify_len: Any, *, mode: str, draft_probs: Any = None,
                    temperature: Any = None, uniforms: Any = None) -> np.ndarray:
    """Per request, the smallest |u − threshold| of the reference path's float decisions (float64; inf for
    greedy requests): every acceptance test made, and the final draw's distance to the nearest normalised CDF
    step (conservative: only the two steps around the crossing matter)."""
    _check_args(mode, draft_probs, temperature, uniforms)
    logits, drafts, lengths, q, temps, u = _numpy_args(np.float64, target_logits, draft_tokens, verify_len,
                                                       draft_probs, temperature, uniforms)
    margin = np.full(drafts.shape[0], np.inf)
    if mode == GREEDY:
        return margin
    for b in range(drafts.shape[0]):
        if not temps[b] > 0:
            continue
        _, w, gaps = _sampling_walk(_softmax(logits[b] / temps[b]), drafts[b], q[b], u[b], int(lengths[b]))
        cdf = np.cumsum(w) / w.sum()
        margin[b] = min([*gaps, float(np.min(np.abs(cdf - u[b, drafts.shape[1]])))])
    return margin


def _leading_count(passed: torch.Tensor) -> torch.Tensor:
    """Number of leading True values along the last axis (int64)."""
    return torch.cumprod(passed.to(torch.int64), dim=-1).sum(dim=-1)


def inverse_cdf_torch(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`inverse_cdf` over the last axis of ``w`` [..., V] with ``u`` [...]: the one torch draw, used by
    SpecVerify, the draft's Markov sampling and the host's prefill token."""
    above = torch.cumsum(w, dim=-1) > (u * w.sum(dim=-1)).unsqueeze(-1)
    first_above = above.to(torch.int32).argmax(dim=-1)  # first True: argmax returns the first maximum
    positions = torch.arange(w.shape[-1], device=w.device)
    last_positive = torch.where(w > 0, positions, -1).amax(dim=-1)
    return torch.where(above.any(dim=-1), first_above, last_positive)


def spec_verify_torch(target_logits: torch.Tensor, draft_tokens: torch.Tensor, verify_len: torch.Tensor, *,
                      mode: str, draft_probs: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                      uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised :func:`spec_verify_reference`; ``mode`` is static, everything else traced."""
    _check_args(mode, draft_probs, temperature, uniforms)
    logits = target_logits.float()
    gamma = draft_tokens.shape[1]
    targets = logits.argmax(dim=-1)  # [B, G+1]
    lengths = verify_len.clamp(0, gamma)
    match = draft_tokens == targets[:, :gamma]
    if mode == GREEDY:
        # Position tests are independent: "stop at the first failure before ℓ" = min(ℓ, leading passes).
        accepted = torch.minimum(_leading_count(match), lengths)
        return accepted, targets.gather(1, accepted[:, None]).squeeze(1)

    assert draft_probs is not None and temperature is not None and uniforms is not None
    greedy_row = ~(temperature > 0)
    temps = torch.where(greedy_row, torch.ones_like(temperature), temperature)
    p = torch.softmax(logits / temps[:, None, None], dim=-1)  # [B, G+1, V]
    picked = draft_tokens[:, :, None]
    q_x = draft_probs.gather(2, picked).squeeze(2).clamp_min(Q_FLOOR)
    ratio = p[:, :gamma].gather(2, picked).squeeze(2) / q_x
    passed = uniforms[:, :gamma] < ratio.clamp(max=1.0)
    passed = torch.where(greedy_row[:, None], match, passed)
    accepted = torch.minimum(_leading_count(passed), lengths)

    vocab = p.shape[-1]
    p_j = p.gather(1, accepted[:, None, None].expand(-1, 1, vocab)).squeeze(1)
    # Row j = ℓ has no draft distribution (its residual is never used): pad one zero row, so G = 0
    # (target-only decoding through the same graph) needs no special case.
    q_padded = torch.nn.functional.pad(draft_probs, (0, 0, 0, 1))
    q_j = q_padded.gather(1, accepted[:, None, None].expand(-1, 1, vocab)).squeeze(1)
    residual = (p_j - q_j).clamp_min(0.0)
    use_residual = (accepted < lengths) & (residual.sum(dim=-1) > RESIDUAL_FLOOR)
    weights = torch.where(use_residual[:, None], residual, p_j)
    drawn = inverse_cdf_torch(weights, uniforms[:, gamma])
    greedy_next = targets.gather(1, accepted[:, None]).squeeze(1)
    return accepted, torch.where(greedy_row, greedy_next, drawn)


def random_inputs(batch: int, gamma: int, vocab: int, *, mode: str, generator: torch.Generator,
                  device: str | torch.device = "cpu", logits_dtype: torch.dtype = torch.float32,
                  match_prob: float = 0.8, logit_scale: float = 3.0, draft_noise: float = 0.5,
                  greedy_row_prob: float = 0.0) -> dict[str, torch.Tensor]:
    """Keyword arguments for the implementations, on ``device``, with acceptance runs of all lengths: greedy
    drafts match the argmax with probability ``match_prob``, sampling drafts come from the target's logits plus
    ``draft_noise`` Gaussian noise; ``greedy_row_prob`` sets some sampling temperatures to 0."""
    check_mode(mode)
    g = generator

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=device)

    logits = (randn(batch, gamma + 1, vocab) * logit_scale).to(logits_dtype)
    verify_len = torch.randint(0, gamma + 1, (batch,), generator=g, device=device)
    targets = logits.float().argmax(dim=-1)[:, :gamma]
    # A random token that differs from the target: shift by 1..V-1 modulo V.
    other = (targets + torch.randint(1, max(vocab, 2), targets.shape, generator=g, device=device)) % vocab
    greedy_drafts = torch.where(rand(batch, gamma) < match_prob, targets, other)
    inputs = {"target_logits": logits, "verify_len": verify_len}
    if mode == GREEDY:
        return inputs | {"draft_tokens": greedy_drafts}

    temperature = 0.5 + rand(batch)
    temperature = torch.where(rand(batch) < greedy_row_prob, torch.zeros_like(temperature), temperature)
    draft_temps = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    draft_logits = logits[:, :gamma].float() + draft_noise * randn(batch, gamma, vocab)
    draft_probs = torch.softmax(draft_logits / draft_temps[:, None, None], dim=-1)
    sampled = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=g).reshape(batch, gamma)
    drafts = torch.where((temperature > 0)[:, None], sampled, greedy_drafts)
    return inputs | {
        "draft_tokens": drafts,
        "draft_probs": draft_probs,
        "temperature": temperature,
        "uniforms": rand(batch, gamma + 1),
    }
