"""Building blocks shared by the Qwen3 target and the DSpark draft.

Written with plain tensor ops (no data-dependent Python control flow) so the same modules are the PyTorch
reference, the ONNX export source and the torch/CUDA-graph target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dspark_compile.model_config import RopeConfig, TargetConfig


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


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    """down(act(gate x) · up x): SwiGLU with silu (Qwen3), GeGLU with tanh-GELU (Gemma4)."""

    def __init__(self, hidden: int, intermediate: int, activation: Callable[[torch.Tensor], torch.Tensor] =
                 nn.functional.silu) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------------ linear-weight strategies
FP8_MAX = 448.0  # largest finite e4m3fn value
ACT_GROUP = 128  # columns per dynamic activation scale (HF "-FP8": per token and group of 128)


FRAGMENT_K = 64
"""Columns per block of :func:`to_fragment_order`."""


def to_fragment_order(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] (K a multiple of :data:`FRAGMENT_K`) with each block of 64 columns reordered, column
    8j + 2c + e to 16c + 2j + e, so that the columns one thread of a Hopper wgmma holds from a register operand
    (pairs 2c, 2c + 1 of every 8) lie in 16 contiguous bytes: the decode GEMM then reads its e4m3 weight tile
    from shared memory with one 128-bit load per thread and block instead of eight 16-bit ones, and multiplies
    the same values in the same order (docs/BENCH.md, "The weight in fragment order")."""
    n, k = weight.shape
    return weight.view(n, k // FRAGMENT_K, 8, 4, 2).transpose(2, 3).reshape(n, k)


def from_fragment_order(weight: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_fragment_order`."""
    n, k = weight.shape
    return weight.view(n, k // FRAGMENT_K, 4, 8, 2).transpose(2, 3).reshape(n, k)


@torch.library.custom_op("dspark::fp8_dequantize", mutates_args=())
def fp8_dequantize(weight: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """e4m3 weight [N, K] × scale -> float32 [N, K]. ``scale`` is 0-d (per tensor), [N] (per output channel) or
    [N, ceil(K/group)] (per row and group of ``group`` columns: block scales expanded over rows)."""
    w = weight.to(torch.float32)
    if scale.dim() == 0:
        return w * scale
    if scale.dim() == 1:
        return w * scale.unsqueeze(1)
    return w * scale.repeat_interleave(group, dim=1)[:, : w.shape[1]]


@fp8_dequantize.register_fake
def _(weight: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    return weight.new_empty(weight.shape, dtype=torch.float32)


@torch.library.custom_op("dspark::fp8_quantize_dequantize", mutates_args=())
def fp8_quantize_dequantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 activation quantization round trip: e4m3(x / scale) · scale, in x's dtype."""
    s = scale.to(x.dtype).to(torch.float32)
    q = (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.to(torch.float32) * s).to(x.dtype)


@fp8_quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def activation_group(k: int, weight_group: int = 0) -> int:
    """Columns per dynamic activation scale for an input width ``k``: gcd(k, 128) — 128, the HF "-FP8" scheme
    and one decode-GEMM K tile, wherever ``k`` allows (every published Qwen3 and Gemma4 width does) — and
    within one weight scale group (``weight_group`` columns, 0: none), as the GEMM applies both per K tile."""
    g = math.gcd(math.gcd(k, ACT_GROUP), weight_group or k)
    if g < 16:
        raise ValueError(f"dynamic FP8 activations need input widths that are multiples of 16; found {k}")
    return g


@torch.library.custom_op("dspark::fp8_group_quantize_dequantize", mutates_args=())
def fp8_group_quantize_dequantize(x: torch.Tensor, group: int) -> torch.Tensor:
    """Dynamic FP8 activations (W8A8): each row's groups of ``group`` columns as e4m3(x · 448/amax) · amax/448,
    float32. The scale comes from the row's own values, so a row's result never depends on the other rows
    (speculative and target-only give a row the same bits); multiplying by 448/amax (not dividing per element)
    is what the decode GEMM does too. Both quotients divide tensor by tensor: on a GPU torch divides by a Python
    number as a product with its reciprocal, a float32 ulp off the correctly rounded quotient that the kernels
    compute, and with bf16 inputs x·448/amax often falls on a tie between two e4m3 values, which that ulp decides
    (docs/BENCH.md, "W8A8 through cuBLAS")."""
    shape = x.shape
    xg = x.to(torch.float32).reshape(*shape[:-1], shape[-1] // group, group)
    amax = xg.abs().amax(dim=-1, keepdim=True)
    live = amax > 0
    fp8_max = torch.full_like(amax, FP8_MAX)
    inv = torch.where(live, fp8_max / amax, torch.ones_like(amax))
    s = torch.where(live, amax / fp8_max, torch.ones_like(amax))
    q = (xg * inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.to(torch.float32) * s).reshape(shape)


@fp8_group_quantize_dequantize.register_fake
def _(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3: scale[n] = max|w[n]| / 448 (1 for an all-zero row) -> (e4m3 [N, K], float32 [N])."""
    wf = w.to(torch.float32)
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (wf / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Fp8Linear(nn.Module):
    """A linear layer whose weight is e4m3 with a float32 dequantization scale (per tensor, per output channel,
    or per row × column group); the reference path dequantizes (:func:`fp8_dequantize`, one ONNX
    DequantizeLinear) and multiplies in the activations' dtype. With ``input_scale`` (static, per tensor) the
    input is quantized too (W8A8: the Q/DQ pair TensorRT fuses into an FP8 GEMM). With ``act_group`` the input
    is quantized dynamically, per row and group of columns (:func:`fp8_group_quantize_dequantize`), and the
    product runs in float32, as an FP8 tensor-core GEMM computes it (exact products, float32 sums)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                 group: int = 0, input_scale: torch.Tensor | None = None, act_group: int = 0) -> None:
        super().__init__()
        assert weight.dtype == torch.float8_e4m3fn and weight.dim() == 2
        assert not (act_group and input_scale is not None), "static and dynamic activation scales exclude each other"
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(torch.float32), requires_grad=False)
        self.group = group if scale.dim() == 2 else 0
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.input_scale = None if input_scale is None else nn.Parameter(input_scale.to(torch.float32).reshape(()),
                                                                         requires_grad=False)
        self.act_group = act_group
        self.fragment_order = False  # the weight stored in the decode GEMM's column order (to_fragment_order)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        weight = from_fragment_order(self.weight) if self.fragment_order else self.weight
        return fp8_dequantize(weight, self.weight_scale, self.group).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_group:
            out = nn.functional.linear(fp8_group_quantize_dequantize(x, self.act_group),
                                       self.dequantized(torch.float32))
            return (out if self.bias is None else out + self.bias.to(torch.float32)).to(x.dtype)
        if self.input_scale is not None:
            x = fp8_quantize_dequantize(x, self.input_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized(x.dtype), bias)

    def quantize_activations(self) -> None:
        """Dynamic e4m3 activations from now on (:func:`activation_group` columns per scale). A weight that a
        W8A16 product stored in fragment order goes back to column order (a module reused across kinds, as the
        FP8 benchmark does): W8A8 weights are never in fragment order, as cuBLAS's e4m3 product reads columns."""
        if self.input_scale is not None:
            raise ValueError("the checkpoint's layers have static input scales (Model Optimizer W8A8), which "
                             "exclude dynamic ones")
        if self.fragment_order:
            self.weight = nn.Parameter(from_fragment_order(self.weight.detach()), requires_grad=False)
            self.fragment_order = False
        self.act_group = activation_group(self.in_features, self.group)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Fp8Linear:
        """Per-output-channel quantization of a full-precision linear layer (:func:`quantize_fp8`)."""
        q, scale = quantize_fp8(linear.weight.detach())
        return cls(q, scale, None if linear.bias is None else linear.bias.detach())


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``root``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fp8_onnx_translation() -> dict[Any, Any]:
    """``custom_translation_table`` entries: the dequantization becomes one ``DequantizeLinear`` (FLOAT8E4M3FN
    input; ``axis=0`` for per-channel scales), the activation round trip a ``QuantizeLinear`` →
    ``DequantizeLinear`` pair (dynamic groups: the scale computed in the graph, the pair at scale 1 on the
    scaled input); block scales (HF "-FP8" checkpoints) a Cast and a Mul over the expanded grid."""
    import onnx
    from onnxscript import opset19 as op

    fp8_zero = onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0])

    def dequantize_onnx(weight, scale, group: int):
        if len(scale.shape) <= 1:
            return op.DequantizeLinear(weight, scale, axis=0)
        n, k = weight.shape
        expanded = op.Reshape(op.Expand(op.Unsqueeze(scale, [2]), op.Constant(value_ints=[n, scale.shape[1], group])),
                              op.Constant(value_ints=[n, scale.shape[1] * group]))
        return op.Mul(op.Cast(weight, to=onnx.TensorProto.FLOAT), op.Slice(expanded, [0], [k], [1]))

    def quantize_dequantize_onnx(x, scale):
        s = op.CastLike(scale, x)
        return op.DequantizeLinear(op.QuantizeLinear(x, s, op.Constant(value=fp8_zero)), s)

    def group_quantize_dequantize_onnx(x, group: int):
        xg = op.Reshape(op.Cast(x, to=onnx.TensorProto.FLOAT),
                        op.Concat(op.Slice(op.Shape(x), [0], [-1]), op.Constant(value_ints=[-1, group]), axis=0))
        amax = op.ReduceMax(op.Abs(xg), op.Constant(value_ints=[-1]), keepdims=1)
        live = op.Greater(amax, op.Constant(value_float=0.0))
        one = op.Constant(value_float=1.0)
        inv = op.Where(live, op.Div(op.Constant(value_float=FP8_MAX), amax), one)
        s = op.Where(live, op.Div(amax, op.Constant(value_float=FP8_MAX)), one)
        q = op.DequantizeLinear(op.QuantizeLinear(op.Mul(xg, inv), one, op.Constant(value=fp8_zero)), one)
        return op.Reshape(op.Mul(q, s), op.Shape(x))

    return {torch.ops.dspark.fp8_dequantize.default: dequantize_onnx,
            torch.ops.dspark.fp8_quantize_dequantize.default: quantize_dequantize_onnx,
            torch.ops.dspark.fp8_group_quantize_dequantize.default: group_quantize_dequantize_onnx}


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions; computed in float32 like transformers' default RoPE.

    "proportional" (Gemma4's global layers) rotates only the first ``partial_rotary_factor``·D/2 frequency pairs;
    the rest get frequency 0 (cos 1, sin 0: left as they are)."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        rotated = head_dim // 2
        if rope.rope_type == "proportional":
            rotated = int(rope.partial_rotary_factor * head_dim // 2)
        exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / head_dim
        inv_freq = torch.cat((1.0 / (rope.theta**exponents), torch.zeros(head_dim // 2 - rotated)))
        if rope.rope_type in ("linear", "proportional"):
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
def ring_positions(top: torch.Tensor, slots: int) -> torch.Tensor:
    """[B, 1, slots]: the position ring slot s holds when ``top`` [B] is the latest position written, position p
    living in slot p mod slots: top − ((top − s) mod slots); negative means empty (models.gemma4's rings)."""
    top = top.view(-1, 1, 1)
    return top - (top - torch.arange(slots, device=top.device).view(1, 1, slots)) % slots


class ReferenceAttention:
    """float32 scores and softmax (:func:`attend`); the exported graphs' and the golden vectors' form.

    ``prepare`` turns a visibility — a boolean mask [B, 1, T, S], or limits [B, T] (query (b, t) sees slots
    < limit[b, t]) with a window — into what ``__call__`` takes, once per forward."""

    def prepare(self, visible: torch.Tensor, window: int | None, group: int, dtype: torch.dtype) -> torch.Tensor:
        if visible.dtype == torch.bool:
            return visible
        assert window is not None
        return (torch.arange(window, device=visible.device).view(1, 1, window) < visible.unsqueeze(-1)).unsqueeze(1)

    def prepare_ring(self, positions: torch.Tensor, slots: int, window: int, group: int,
                     dtype: torch.dtype) -> torch.Tensor:
        """A ring of ``slots`` slots just written with ``positions`` [B, T] (``models.gemma4.RingInPlace``):
        slot s holds position top − ((top − s) mod slots), top = the row's last position; query (b, t) sees the
        held positions in its sliding window."""
        held = ring_positions(positions[:, -1], slots)
        pos = positions.unsqueeze(-1)
        visible = (held >= 0) & (held <= pos) & (held > pos - window)
        return self.prepare(visible.unsqueeze(1), None, group, dtype)

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
    """q/k/v/o projections and per-head q/k norms of one attention layer (Qwen3's by default; a family passes its
    head shape, its norm and whether the layer has a v_proj)."""

    def __init__(self, cfg: TargetConfig, kv_heads: int | None = None, head_dim: int | None = None, *,
                 norm: Callable[[int, float], nn.Module] = RMSNorm, shared_kv: bool = False) -> None:
        super().__init__()
        h, n = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads = n
        self.num_kv_heads = kv = kv_heads or cfg.num_key_value_heads
        self.head_dim = d = head_dim or cfg.head_dim
        self.scale = d**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(h, n * d, bias=bias)
        self.k_proj = nn.Linear(h, kv * d, bias=bias)
        self.v_proj = None if shared_kv else nn.Linear(h, kv * d, bias=bias)
        self.o_proj = nn.Linear(n * d, h, bias=bias)
        self.q_norm = norm(d, cfg.rms_norm_eps)
        self.k_norm = norm(d, cfg.rms_norm_eps)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        return apply_rope(q, cos, sin)

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v


class CausalTarget(nn.Module):
    """What every family's target does around its layers: taps, the final norm, logits and the cache tensor
    (attributes ``cfg``, ``tap_layer_ids``, ``embed_tokens``, ``norm``, ``lm_head``)."""

    def outputs(self, x: torch.Tensor, taps: dict[int, torch.Tensor], outs: list[torch.Tensor | None],
                in_place: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden after the final norm, the taps concatenated, the stacked cache outputs unless in place)."""
        tapped = [taps[i] for i in self.tap_layer_ids]
        tap_tensor = torch.cat(tapped, dim=-1) if tapped else x[..., :0]
        return self.norm(x), tap_tensor, None if in_place else torch.stack(outs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).to(torch.float32)

    def new_cache(self, batch: int, slots: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
        c = self.cfg
        w = self.embed_tokens.weight
        return torch.zeros(c.num_hidden_layers, 2, batch, c.num_key_value_heads, slots, c.head_dim,
                           dtype=dtype or w.dtype, device=device or w.device)

    def new_static_cache(self, batch: int, slots: int, block: int) -> Any:
        """The cache an in-place strategy (the CUDA-graph target) writes, for verify blocks of up to G + 1 =
        ``block`` + 1 rows: :meth:`new_cache` unless the family keeps some layers otherwise (Gemma4's ring)."""
        return self.new_cache(batch, slots)


def load_hf_target(cls: Callable[..., nn.Module], cfg: TargetConfig, get: Callable[[str], torch.Tensor],
                   tap_layer_ids: Sequence[int], dtype: torch.dtype) -> nn.Module:
    """A target class built on the meta device, its parameters assigned from Hugging Face tensor names
    (``cfg.weight_prefix`` + module path; ``lm_head`` loads the embedding when tied, sharing its storage)."""
    with torch.device("meta"):
        model = cls(cfg, tap_layer_ids)
    loaded: dict[str, torch.Tensor] = {}
    state = {}
    for name, _ in model.named_parameters():
        hf = "lm_head.weight" if name == "lm_head.weight" else f"{cfg.weight_prefix}{name}"
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            hf = f"{cfg.weight_prefix}embed_tokens.weight"
        if hf not in loaded:
            loaded[hf] = get(hf).to(dtype)
        state[name] = loaded[hf]
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers()
    return model.eval()
