"""Our Gemma4 text target over the same static cache and strategies as Qwen3 (docs/PROGRAM.md, "Model-family seams").

What differs from Qwen3, each in one place below: sliding-window and full-attention layers with their own head
shapes and RoPE (proportional, partial on the global layers), keys equal to values on the global layers when
``attention_k_eq_v`` (then a scale-less value norm), attention scale 1, embeddings scaled by sqrt(H), sandwich
norms, a per-layer ``layer_scalar``, GELU-tanh MLP, per-layer inputs (when the config has them) and final logit
soft-capping (tied embeddings are the usual case).

Without a ring, all layers share one [L, 2, B, KV, S, D] cache whose KV/D are the largest over the layer types
(:class:`~dspark_compile.model_config.Gemma4Config`); a layer writes its K/V zero-padded and attends over its
[:kv, :, :d] corner, so every cache strategy (the CUDA-graph target's in-place one too) stays family-agnostic.
With a ring (:class:`RingWindow`: the exported graphs' form) the sliding layers keep only their window plus a
verify block, and the cache holds the global layers alone, unpadded: the memory a sliding layer needs no
longer grows with the context.
``transformers`` is only a test oracle; nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dspark_compile.model_config import Gemma4Config
from dspark_compile.models.layers import (
    FUNCTIONAL,
    REFERENCE,
    AttentionProjections,
    CacheWrite,
    CausalTarget,
    Fp8Linear,
    GatedMLP,
    InPlaceCache,
    ReferenceAttention,
    RotaryEmbedding,
    RowsCache,
    apply_rope,
    gelu_tanh,
    load_hf_target,
    ring_positions,
    write_rows,
)

NormKernel = Callable[..., torch.Tensor]
"""(x, weight | None, eps[, residual, scale]) -> (residual + rmsnorm(x) · weight) · scale, as GemmaRMSNorm."""


class GemmaRMSNorm(nn.Module):
    """Gemma4 RMSNorm: normalise and scale in float32, then cast (transformers' order); no weight when
    ``with_scale`` is false (the value norm)."""

    kernel: NormKernel | None = None
    """One fused kernel for the whole norm (the CUDA-graph target sets
    :func:`~dspark_compile.targets.torch.gemma4_kernels.gemma_rmsnorm`); None: the torch ops below."""

    def __init__(self, dim: int, eps: float, *, with_scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps)
        xf = x.to(torch.float32)
        xf = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            xf = xf * self.weight.to(torch.float32)
        return xf.to(x.dtype)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """(residual + self(x)) · scale (when given): a sandwich norm's residual add, in one kernel if set."""
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, residual, scale)
        out = residual + self(x)
        return out if scale is None else out * scale


class ScaledEmbedding(nn.Embedding):
    """Embedding times a constant (sqrt(H) for the tokens), rounded to the weight dtype first as transformers does.

    The constant is a buffer, not a tensor made in ``forward``: no host-to-device copy inside a CUDA-graph capture,
    and a real constant when the module was built on the meta device (``init_buffers`` rebuilds it)."""

    def __init__(self, num: int, dim: int, scale: float) -> None:
        super().__init__(num, dim)
        self.scale = scale
        self.init_buffers()

    def init_buffers(self) -> None:
        self.register_buffer("embed_scale", torch.tensor(self.scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Final logit soft-capping, cap·tanh(logits/cap); None: the logits as they are."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


class SoftcappedHead(nn.Linear):
    """LM head with final logit soft-capping (:func:`softcap`); the draft shares it, so its base logits are
    soft-capped too (as DeepSpec's ``compute_logits``)."""

    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.linear
    """The product: the CUDA-graph target sets the decode GEMM (``targets.torch.static_forward``)."""

    def __init__(self, hidden: int, vocab: int, cap: float | None) -> None:
        super().__init__(hidden, vocab, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(self.linear(x, self.weight), self.cap)

    def quantized(self) -> SoftcappedFp8Head:
        """This head in e4m3 (``--quantize-lm-head``): a copy, so a tied embedding keeps its full-precision rows."""
        head = SoftcappedFp8Head.quantize(self)
        head.cap = self.cap
        return head


class SoftcappedFp8Head(Fp8Linear):
    """:class:`SoftcappedHead` with e4m3 weights (``--quantize-lm-head``): every target step and every draft block
    reads the head, 2 GB in bf16 at gemma-4-12B's 262144 × 3840, a sixth of an FP8 step's bytes there."""

    cap: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(super().forward(x), self.cap)


class Gemma4Attention(AttentionProjections):
    """Gemma4's projections and norms: its head shape per layer type, no v_proj when K = V, a scale-less value
    norm, attention scale 1."""

    qkv: Any = None
    """q|k(|v) as one matrix product: the weights concatenated (:meth:`fuse`), or whatever product ``linear``
    takes (the CUDA-graph target's e4m3 one)."""
    linear: Callable[[torch.Tensor, Any], torch.Tensor] = nn.functional.linear
    """The fused product's matrix multiply, (x, ``qkv``) -> q|k(|v) (the CUDA-graph target sets its decode GEMM)."""

    def __init__(self, cfg: Gemma4Config, kv_heads: int, head_dim: int, shared_kv: bool) -> None:
        super().__init__(cfg, kv_heads, head_dim, norm=GemmaRMSNorm, shared_kv=shared_kv)
        self.scale = 1.0
        self.v_norm = GemmaRMSNorm(head_dim, cfg.rms_norm_eps, with_scale=False)

    def fuse(self) -> None:
        self.qkv = fuse_linears([self.q_proj, self.k_proj] + ([self.v_proj] if self.v_proj is not None else []))

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE(q_norm(q_proj x)) [B, heads, T, d]: the base class's ops, in one kernel when the norm has one
        (the draft's queries; the target's come from :meth:`query_key_value`)."""
        b, t, _ = x.shape
        return norm_rope(self.q_norm, self.q_proj(x).view(b, t, self.num_heads, self.head_dim), cos, sin)

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k = RoPE(k_norm(k_proj x)); v = v_norm(v_proj x), or v_norm(k_proj x) when K and V are shared."""
        return self._norm_key_value(self.k_proj(x), None if self.v_proj is None else self.v_proj(x), cos, sin)

    def query_key_value(self, x: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`query` and :meth:`key_value`, from one matrix product once fused."""
        if self.qkv is None:
            return self.query(x, cos, sin), *self.key_value(x, cos, sin)
        b, t, _ = x.shape
        sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * (1 + (self.v_proj is not None))
        q, k, *v = self.linear(x, self.qkv).split(sizes, -1)
        q = norm_rope(self.q_norm, q.view(b, t, self.num_heads, self.head_dim), cos, sin)
        return q, *self._norm_key_value(k, v[0] if v else None, cos, sin)

    def _norm_key_value(self, k: torch.Tensor, v: torch.Tensor | None, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = k.shape
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = k if v is None else v.view(b, t, self.num_kv_heads, self.head_dim)
        return norm_rope(self.k_norm, k, cos, sin), self.v_norm(v).transpose(1, 2)


def norm_rope(norm: GemmaRMSNorm, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE(norm(x)) [B, heads, T, d] of heads x [B, T, heads, d]; one kernel when the norm has one."""
    if norm.kernel is not None:
        return norm.kernel(x, norm.weight, norm.eps, rope=(cos, sin)).transpose(1, 2)
    return apply_rope(norm(x).transpose(1, 2), cos, sin)


def fuse_linears(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """The linears' weights (no biases) concatenated; each weight re-pointed at its rows (same values, one copy)."""
    whole = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(whole[start : start + rows], requires_grad=False)
        start += rows
    return whole


def pad_heads(x: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """[B, kv, T, d] -> [B, kv_heads, T, head_dim], zero-padded (a layer's rows in the shared cache geometry)."""
    extra_h, extra_d = kv_heads - x.shape[1], head_dim - x.shape[3]
    return nn.functional.pad(x, (0, extra_d, 0, 0, 0, extra_h)) if extra_h or extra_d else x


def corner(x: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """The [:, :kv_heads, :, :head_dim] view of a padded cache [B, KV, S, D]."""
    return x if (x.shape[1], x.shape[3]) == (kv_heads, head_dim) else x[:, :kv_heads, :, :head_dim]


class Gemma4Layer(nn.Module):
    """One Gemma4 decoder layer; sliding or global by ``cfg.layer_types[index]``."""

    gate_up: Any = None
    """gate|up as one matrix product: the weights concatenated (:meth:`fuse`), or whatever product ``glu_kernel``
    takes (the CUDA-graph target's e4m3 one, its rows in pairs)."""
    qkv_kernel: Callable[..., torch.Tensor] | None = None
    """(q|k|v product, cos, sin, slots, q_norm, k_norm, eps, heads, kv_heads, kv) -> q, k/v written into the
    in-place cache, in one launch once fused (the CUDA-graph target sets
    :func:`~dspark_compile.targets.torch.gemma4_kernels.qkv_into_cache`); None: the module ops."""
    glu_kernel: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    """(input, ``gate_up``) -> gelu_tanh(gate) · up: the product, then one launch for the GLU, or the GLU in the
    product's store (the CUDA-graph target's ``static_forward.gelu_glu``); None: ``linear`` and the module ops."""
    add_norm_kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    """A sandwich norm's residual add (and ``layer_scalar``) with the norm that follows it, in one launch
    (``gemma4_kernels.add_norm_norm``): post-attention + pre-feed-forward, post-feed-forward + next input norm."""
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """The matrix multiply of o and down (and of gate|up without ``glu_kernel``) once fused (the CUDA-graph
    target's decode GEMM); None: the modules (and ``nn.functional.linear`` for gate|up)."""
    reads_fused_qkv: bool = True
    """Whether :meth:`forward` reads ``self_attn.qkv`` once fused (a draft layer's projects q, k and v apart)."""

    def __init__(self, cfg: Gemma4Config, index: int) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.sliding = cfg.is_sliding(index)
        self.self_attn = Gemma4Attention(cfg, *cfg.attention_shape(index), cfg.shares_kv(index))
        self.mlp = GatedMLP(h, cfg.intermediate_size, gelu_tanh)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))
        self.per_layer = cfg.hidden_size_per_layer_input
        if self.per_layer:
            self.per_layer_input_gate = nn.Linear(h, self.per_layer, bias=False)
            self.per_layer_projection = nn.Linear(self.per_layer, h, bias=False)
            self.post_per_layer_input_norm = GemmaRMSNorm(h, eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, cache_len: torch.Tensor,
        mask: torch.Tensor, *, positions: torch.Tensor | None = None, per_layer_input: torch.Tensor | None = None,
        cache: CacheWrite = FUNCTIONAL, attention: ReferenceAttention = REFERENCE,
        ring: tuple[RingWindow | RingInPlace, int] | None = None, normed: torch.Tensor | None = None,
        next_norm: GemmaRMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """kv [2, B, KV, S, D] in the shared (padded) geometry; returns the output, the cache strategy's output
        and ``next_norm`` of the output when the fused kernels computed it with the last residual add (else
        None); ``normed``: this layer's input norm of ``x`` when the previous layer computed it.
        ``ring`` = (the ring, this layer's index among the sliding layers): K/V go to the ring, not to ``kv``
        (then the cache output is None: the ring keeps or records the rows itself)."""
        attn = self.self_attn
        kvh, dim = kv.shape[2], kv.shape[4]
        h = self.input_layernorm(x) if normed is None else normed
        if ring is not None and isinstance(ring[0], RingInPlace):
            assert positions is not None
            window, kv = ring[0], ring[0].ring[ring[1]]
            slots = window.slots(positions)
            if self.qkv_kernel is not None and attn.qkv is not None:
                q = self.qkv_kernel(attn.linear(h, attn.qkv), cos, sin, slots, attn.q_norm.weight,
                                    attn.k_norm.weight, attn.q_norm.eps, attn.num_heads, attn.num_kv_heads, kv)
            else:
                q, k, v = attn.query_key_value(h, cos, sin)
                write_rows(kv[0], k, slots)
                write_rows(kv[1], v, slots)
            mask = window.mask(positions, attention, attn.num_heads // attn.num_kv_heads, q.dtype)
            x, normed = self.finish_and_norm(x, attention(q, kv[0], kv[1], mask, attn.scale), per_layer_input,
                                             next_norm)
            return x, None, normed
        if self.qkv_kernel is not None and attn.qkv is not None and cache.in_place and ring is None:
            assert positions is not None and isinstance(cache, InPlaceCache)
            q = self.qkv_kernel(attn.linear(h, attn.qkv), cos, sin, positions, attn.q_norm.weight,
                                attn.k_norm.weight, attn.q_norm.eps, attn.num_heads, attn.num_kv_heads, kv)
            keys, values = (corner(kv[i][:, :, : cache.window], attn.num_kv_heads, attn.head_dim) for i in (0, 1))
            x, normed = self.finish_and_norm(x, attention(q, keys, values, mask, attn.scale), per_layer_input,
                                             next_norm)
            return x, None, normed
        q, k, v = attn.query_key_value(h, cos, sin)
        if ring is not None:
            assert positions is not None
            attended = ring[0].attend_and_write(ring[1], q, k, v, cache_len, positions,
                                                attention, attn.scale, attn.num_heads // attn.num_kv_heads)
            return self.finish(x, attended, per_layer_input), None, None
        k, v = pad_heads(k, kvh, dim), pad_heads(v, kvh, dim)
        keys, values, out = cache.write(kv, k, v, cache_len, positions)
        keys, values = corner(keys, attn.num_kv_heads, attn.head_dim), corner(values, attn.num_kv_heads, attn.head_dim)
        x, normed = self.finish_and_norm(x, attention(q, keys, values, mask, attn.scale), per_layer_input, next_norm)
        return x, out, normed

    def fuse(self) -> None:
        """q|k|v and gate|up as one matrix product each (the CUDA-graph target; cuBLAS reads each weight once)."""
        self.self_attn.fuse()
        self.gate_up = fuse_linears([self.mlp.gate_proj, self.mlp.up_proj])

    def finish(self, x: torch.Tensor, attended: torch.Tensor,
               per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """Sandwich-normed attention and MLP residuals, the per-layer input, then ``layer_scalar``."""
        return self.finish_and_norm(x, attended, per_layer_input)[0]

    def finish_and_norm(self, x: torch.Tensor, attended: torch.Tensor, per_layer_input: torch.Tensor | None = None,
                        next_norm: GemmaRMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`finish`, and ``next_norm`` of its output when the fused kernels take it with the last residual
        add (one launch instead of two; else None: the next layer normalises)."""
        o_proj, down_proj = self.self_attn.o_proj, self.mlp.down_proj
        attended = o_proj(attended) if self.linear is None else self.linear(attended, o_proj.weight)
        post, pre = self.post_attention_layernorm, self.pre_feedforward_layernorm
        if self.add_norm_kernel is not None:
            x, h = self.add_norm_kernel(x, attended, (post.weight, post.eps), (pre.weight, pre.eps))
        else:
            x = post.add_to(x, attended)
            h = pre(x)
        if self.gate_up is None:
            mlp = self.mlp(h)
        else:
            if self.glu_kernel is not None:
                act = self.glu_kernel(h, self.gate_up)
            else:
                gate, up = (self.linear or nn.functional.linear)(h, self.gate_up).chunk(2, -1)
                act = gelu_tanh(gate) * up
            mlp = down_proj(act) if self.linear is None else self.linear(act, down_proj.weight)
        post = self.post_feedforward_layernorm
        if not self.per_layer:
            if next_norm is not None and self.add_norm_kernel is not None:
                return self.add_norm_kernel(x, mlp, (post.weight, post.eps), (next_norm.weight, next_norm.eps),
                                            self.layer_scalar)
            return post.add_to(x, mlp, self.layer_scalar), None
        x = post.add_to(x, mlp)
        gate = gelu_tanh(self.per_layer_input_gate(x))
        return self.post_per_layer_input_norm.add_to(x, self.per_layer_projection(gate * per_layer_input),
                                                     self.layer_scalar), None


def visibility(positions: torch.Tensor, slots: int, window: int | None) -> torch.Tensor:
    """Query (b, t) at ``positions[b, t]`` sees slot s (= position s) iff s <= its position and, for a sliding
    layer, s > position - window (transformers' sliding-window causal mask). -> bool [B, 1, T, slots]."""
    s = torch.arange(slots, device=positions.device).view(1, 1, slots)
    pos = positions.unsqueeze(-1)
    visible = s <= pos
    if window is not None:
        visible = visible & (s > pos - window)
    return visible.unsqueeze(1)


class RingWindow:
    """Sliding layers keep only a ring of R = window + G slots (G = the most rows one call may leave beyond the
    committed length: a verify block's rejected drafts). Position p lives in slot p mod R.

    A call attends over the ring as it was (slot s then holds the latest position <= cache_len - 1 congruent to
    s, or nothing when that is negative) plus its own new rows, and only then are its last min(T, R) rows
    written into the ring. Stale rejected rows (positions >= the committed length) overwrote positions older
    than any later window, and are rewritten by the call that re-covers their positions; R >= window + G is
    what makes both true. Which slot holds what is arithmetic on ``cache_len``, so the form exports as it is.

    ``write=True`` (the PyTorch reference's functional form) writes the rows in place; ``write=False`` (the
    graphs) only records each layer's rows (:meth:`new_rows`) and the executor writes them
    (``runtime.executor.write_ring``), as the KV contract has it for every other cache."""

    def __init__(self, ring: torch.Tensor, window: int, *, write: bool = True) -> None:
        self.ring = ring  # [sliding layers, 2, B, KV_sliding, R, D_sliding]
        self.window = window
        self.write = write
        self.rows: list[torch.Tensor] = []  # write=False: each sliding layer's [2, B, KV, T, D], in layer order

    def attend_and_write(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cache_len: torch.Tensor, positions: torch.Tensor,
                         attention: ReferenceAttention, scale: float, group: int) -> torch.Tensor:
        kv = self.ring[layer]
        r = kv.shape[-2]
        bsz, t = positions.shape
        held = ring_positions(cache_len - 1, r)
        pos = positions.unsqueeze(-1)
        old = (held >= 0) & (held > pos - self.window)  # held <= cache_len - 1 < pos always
        new = _chunk_visibility(positions, self.window)
        mask = attention.prepare(torch.cat((old, new), dim=-1).unsqueeze(1), None, group, q.dtype)
        k, v = k.to(kv.dtype), v.to(kv.dtype)
        out = attention(q, torch.cat((kv[0], k), dim=2), torch.cat((kv[1], v), dim=2), mask, scale)
        if not self.write:
            self.rows.append(torch.stack((k, v)))
            return out
        keep = min(t, r)
        slots = (positions[:, t - keep:] % r).view(bsz, 1, keep, 1).expand(bsz, kv.shape[2], keep, kv.shape[4])
        kv[0].scatter_(2, slots, k[:, :, t - keep:])
        kv[1].scatter_(2, slots, v[:, :, t - keep:])
        return out

    def new_rows(self) -> torch.Tensor:
        """[sliding layers, 2, B, KV, T, D]: the rows the sliding layers computed (``write=False``)."""
        return torch.stack(self.rows)


def _chunk_visibility(positions: torch.Tensor, window: int) -> torch.Tensor:
    """[B, T, T]: row t sees the chunk's rows u <= t within the window."""
    t = positions.shape[1]
    u = torch.arange(t, device=positions.device)
    return ((u.view(1, t) <= u.view(t, 1)) & (u.view(1, t) > u.view(t, 1) - window)).expand(positions.shape[0], t, t)


class RingInPlace:
    """The CUDA-graph target's ring, for calls of T <= R - window + 1 = G + 1 rows (its rounds and steps): a call
    writes its rows first, at slot p mod R, then attends over the ring alone, each slot masked by the position
    it then holds (``top - ((top - s) mod R)``, top = the call's last position). R = W + G keeps every position
    a query's window needs; rejected rows are stale and rewritten as in :class:`RingWindow`. One write, no
    concatenated copy of the ring per layer, and the split-K kernel reads the ring in place."""

    def __init__(self, ring: torch.Tensor, window: int) -> None:
        self.ring = ring
        self.window = window
        self._masks: dict[int, torch.Tensor] = {}  # per group: every sliding layer shares one mask
        self._slots: torch.Tensor | None = None  # ... and one slot per row

    @staticmethod
    def fits(ring: torch.Tensor, window: int, t: int) -> bool:
        return t <= ring.shape[-2] - window + 1

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """The slot each row is written at (position mod R), computed once per forward for every sliding layer."""
        if self._slots is None:
            self._slots = positions % self.ring.shape[-2]
        return self._slots

    def mask(self, positions: torch.Tensor, attention: ReferenceAttention, group: int,
             dtype: torch.dtype) -> torch.Tensor:
        if group not in self._masks:
            self._masks[group] = attention.prepare_ring(positions, self.ring.shape[-2], self.window, group, dtype)
        return self._masks[group]


@dataclass(frozen=True)
class RingCache:
    """A Gemma4 cache for in-place strategies (the CUDA-graph target): the global layers' ``full``
    [Lg, 2, B, KV_g, S, D_g] and the sliding layers' ``ring`` [Ls, 2, B, KV_s, R, D_s], indexed, copied and
    row-selected together (the batch is axis 2 of both). ``count`` [B]: the rows' real lengths in a
    right-padded prefill, so that padding never reaches the ring (:func:`~dspark_compile.runtime.executor
    .write_ring`)."""

    full: torch.Tensor
    ring: torch.Tensor
    count: torch.Tensor | None = None

    def __getitem__(self, index: Any) -> RingCache:
        return RingCache(self.full[index], self.ring[index])

    def __setitem__(self, index: Any, value: RingCache) -> None:
        self.full[index] = value.full
        self.ring[index] = value.ring

    def copy_(self, other: RingCache) -> RingCache:
        self.full.copy_(other.full)
        self.ring.copy_(other.ring)
        return self

    def index_select(self, dim: int, index: torch.Tensor) -> RingCache:
        return RingCache(self.full.index_select(dim, index), self.ring.index_select(dim, index))

    def with_count(self, count: torch.Tensor) -> RingCache:
        return RingCache(self.full, self.ring, count)

    @property
    def nbytes(self) -> int:
        return self.full.nbytes + self.ring.nbytes


class Gemma4Target(CausalTarget):
    """Gemma4ForCausalLM's text forward over a static cache: slot = absolute position (docs/PROGRAM.md)."""

    fused_kernels = False  # the CUDA-graph target runs these modules (its norm kernel and fuse(): static_forward.py)

    def __init__(self, cfg: Gemma4Config, tap_layer_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tap_layer_ids = tuple(int(i) for i in tap_layer_ids)
        h, layers = cfg.hidden_size, cfg.num_hidden_layers
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, h, h**0.5)
        self.layers = nn.ModuleList(Gemma4Layer(cfg, i) for i in range(layers))
        self.norm = GemmaRMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = SoftcappedHead(h, cfg.vocab_size, cfg.final_logit_softcapping)
        p = cfg.hidden_size_per_layer_input
        if p:
            self.embed_tokens_per_layer = ScaledEmbedding(cfg.vocab_size_per_layer_input, layers * p, p**0.5)
            self.per_layer_model_projection = nn.Linear(h, layers * p, bias=False)
            self.per_layer_projection_norm = GemmaRMSNorm(p, cfg.rms_norm_eps)
        self.init_buffers()

    def init_buffers(self) -> None:
        """The RoPE tables and embedding scales (non-persistent: rebuilt after loading on the meta device)."""
        c = self.cfg
        self.rotary = RotaryEmbedding(c.global_head_dim, c.rope)
        self.sliding_rotary = RotaryEmbedding(c.sliding_head_dim, c.sliding_rope)
        self.embed_tokens.init_buffers()
        if c.hidden_size_per_layer_input:
            self.embed_tokens_per_layer.init_buffers()

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """[B, T, L, P]: (token embedding + norm(projection of the input embedding)) / sqrt(2)."""
        p = self.cfg.hidden_size_per_layer_input
        if not p:
            return None
        shape = (*input_ids.shape, self.cfg.num_hidden_layers, p)
        tokens = self.embed_tokens_per_layer(input_ids).reshape(shape)
        proj = self.per_layer_model_projection(x) * self.cfg.hidden_size**-0.5
        return (self.per_layer_projection_norm(proj.reshape(shape)) + tokens) * 2.0**-0.5

    def forward(
        self, input_ids: torch.Tensor, cache_len: torch.Tensor, kv_cache: torch.Tensor | RingCache, *,
        cache: CacheWrite = FUNCTIONAL, attention: ReferenceAttention = REFERENCE,
        ring: torch.Tensor | RingWindow | RingInPlace | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As :meth:`Qwen3Target.forward`: (hidden after the final norm, taps, the cache strategy's output).

        ``ring`` (:meth:`new_ring`, or a :class:`RingWindow` over it; not with an in-place cache): the sliding
        layers keep just their window there, and ``kv_cache`` holds the global layers only, unpadded
        (:meth:`new_global_cache`); the cache output is then the global layers'. A bare tensor is written in
        place; a ``RingWindow(write=False)`` records the sliding rows for the caller.
        With an in-place cache, ``kv_cache`` may be a :class:`RingCache` (:meth:`new_static_cache`): a call of
        at most G + 1 rows goes through :class:`RingInPlace`, a longer one (a prefill) records its sliding rows
        and writes them with the rows' ``count`` afterwards."""
        c = self.cfg
        bsz, t = input_ids.shape
        if isinstance(kv_cache, RingCache):
            assert cache.in_place and ring is None
            if RingInPlace.fits(kv_cache.ring, c.sliding_window, t):
                ring = RingInPlace(kv_cache.ring, c.sliding_window)
                return self.forward(input_ids, cache_len, kv_cache.full, cache=cache, attention=attention,
                                    ring=ring)
            from dspark_compile.runtime.executor import write_ring

            # A prefill (admit: cache_len 0, the ring holds nothing yet), so the mask over [ring | rows] is a
            # band, which is what the split-K attention's bounds express.
            capturing = cache_len.is_cuda and torch.cuda.is_current_stream_capturing()
            assert capturing or not bool(cache_len.any()), "a ring prefill starts at position 0"
            record = RingWindow(kv_cache.ring, c.sliding_window, write=False)
            out = self.forward(input_ids, cache_len, kv_cache.full, cache=cache, attention=attention, ring=record)
            count = kv_cache.count if kv_cache.count is not None else torch.full_like(cache_len, t)
            write_ring(kv_cache.ring, record.new_rows(), cache_len, count)
            return out
        assert ring is None or not cache.in_place or isinstance(ring, RingInPlace | RingWindow)
        positions = cache_len.view(bsz, 1) + torch.arange(t, device=input_ids.device).view(1, t)
        x = self.embed_tokens(input_ids)
        ple = self.per_layer_inputs(input_ids, x)
        slots = cache.window if cache.in_place else kv_cache.shape[-2]
        ropes, masks = {}, {}
        for sliding in set(map(c.is_sliding, range(c.num_hidden_layers))):
            rotary = self.sliding_rotary if sliding else self.rotary
            kv_heads = c.sliding_kv_heads if sliding else c.global_kv_heads
            ropes[sliding] = rotary(positions, x.dtype)
            if sliding and isinstance(ring, RingInPlace):
                continue  # its mask is the ring's (RingInPlace.mask)
            visible = visibility(positions, slots, c.sliding_window if sliding else None)
            masks[sliding] = attention.prepare(visible, None, c.num_attention_heads // kv_heads, x.dtype)
        taps: dict[int, torch.Tensor] = {-1: x}
        outs = []
        window: RingWindow | RingInPlace | None = (RingWindow(ring, c.sliding_window)
                                                   if isinstance(ring, torch.Tensor) else ring)
        sliding_index = global_index = 0
        normed = None  # the next layer's input norm, when the fused kernels computed it with the residual add
        for i, layer in enumerate(self.layers):
            in_ring = (window, sliding_index) if window is not None and layer.sliding else None
            if window is None:
                kv = kv_cache[i]
            elif in_ring is not None:
                kv = window.ring[sliding_index]  # read for its shape only: the ring is this layer's cache
            else:
                kv = kv_cache[global_index]
                global_index += 1
            sliding_index += layer.sliding
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else None
            x, out, normed = layer(x, *ropes[layer.sliding], kv, cache_len, masks.get(layer.sliding),
                                   positions=positions, per_layer_input=None if ple is None else ple[:, :, i],
                                   cache=cache, attention=attention, ring=in_ring, normed=normed, next_norm=nxt)
            if in_ring is None:
                outs.append(out)
            taps[i] = x
        if not outs and not cache.in_place:  # every layer slides: no global layer, an empty cache output
            hidden, tapped, _ = self.outputs(x, taps, outs, True)
            empty = kv_cache.new_zeros(0, 2, bsz, kv_cache.shape[3], t, kv_cache.shape[5])
            return hidden, tapped, empty if isinstance(cache, RowsCache) else kv_cache
        return self.outputs(x, taps, outs, cache.in_place)

    @property
    def sliding_layers(self) -> int:
        return sum(map(self.cfg.is_sliding, range(self.cfg.num_hidden_layers)))

    def ring_slots(self, block: int) -> int:
        """R = window + G (:class:`RingWindow`)."""
        return self.cfg.sliding_window + block

    def new_ring(self, batch: int, block: int) -> torch.Tensor:
        """The sliding layers' ring [sliding layers, 2, B, KV, window + block, D] (:class:`RingWindow`)."""
        c = self.cfg
        w = self.embed_tokens.weight
        return torch.zeros(self.sliding_layers, 2, batch, c.sliding_kv_heads, self.ring_slots(block),
                           c.sliding_head_dim, dtype=w.dtype, device=w.device)

    def new_static_cache(self, batch: int, slots: int, block: int) -> torch.Tensor | RingCache:
        """The global layers' cache and the sliding layers' ring (:class:`RingCache`), or the padded cache
        when no layer slides."""
        if not self.sliding_layers:
            return self.new_cache(batch, slots)
        return RingCache(self.new_global_cache(batch, slots), self.new_ring(batch, block))

    def new_global_cache(self, batch: int, slots: int) -> torch.Tensor:
        """The global layers' cache beside a ring [global layers, 2, B, KV_global, slots, D_global], unpadded."""
        c = self.cfg
        w = self.embed_tokens.weight
        return torch.zeros(c.num_hidden_layers - self.sliding_layers, 2, batch, c.global_kv_heads, slots,
                           c.global_head_dim, dtype=w.dtype, device=w.device)

    @classmethod
    def from_weights(cls, cfg: Gemma4Config, get: Callable[[str], torch.Tensor], *,
                     tap_layer_ids: Sequence[int] = (), dtype: torch.dtype = torch.float32) -> Gemma4Target:
        """Build from Hugging Face tensor names (``cfg.weight_prefix`` + module path; tied LM head)."""
        return load_hf_target(cls, cfg, get, tap_layer_ids, dtype)


def uses_ring(target: nn.Module) -> bool:
    """Whether the graphs keep the target's sliding layers in a ring (a Gemma4 target with sliding layers)."""
    return isinstance(target, Gemma4Target) and target.sliding_layers > 0
