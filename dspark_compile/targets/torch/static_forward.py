"""What the CUDA-graph target does differently from ``models/``: fused weights and Triton kernels.

The forward itself is the models' (``Qwen3Target.forward``, ``DSparkDraft.backbone``) with the in-place cache
strategy (``models.layers.InPlaceCache``: keys/values written into static caches, attention over a window of
slots ``[0, window)``) and an attention strategy: ``"reference"`` (float32), ``"sdpa"``, or ``"triton"``
(:class:`TritonAttention`: the split-K kernel for decode-sized queries, SDPA for prefill-sized chunks).

``fused=True`` (for targets whose ``fused_kernels`` is true: Qwen3) adds the one thing the modules cannot express:
q|k|v and gate|up weights concatenated (the modules' parameters become views of the fused tensors: same values, one
matrix product instead of three), the products through the decode GEMM of :mod:`.decode_gemm` (e4m3 weights of
``Fp8Linear`` instead of being dequantized; bf16 ones where it beats cuBLAS), and the Triton kernels of
:mod:`.kernels` for the elementwise work, with the residual add carried into the next layer's norm kernel.
Gemma4 (``fused=False``) keeps its module forward on CUDA with its own seams filled in: one Triton kernel per
norm (:mod:`.gemma4_kernels`), q|k|v and gate|up fused (``Gemma4Layer.fuse``, bf16/fp32 weights; e4m3 ones as
:meth:`_Linear.of` fuses Qwen3's, gate|up's store finishing GeGLU) and through the decode GEMM
(``Gemma4Layer.linear``, ``glu_kernel``), and its sliding layers' ring (``models.gemma4.RingCache``) through the split-K
attention's ring mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.gemma4 import Gemma4Layer, GemmaRMSNorm, SoftcappedFp8Head, SoftcappedHead, softcap
from dspark_compile.models.layers import (
    Fp8Linear,
    InPlaceCache,
    ReferenceAttention,
    SdpaAttention,
    fp8_quantize_dequantize,
    replace_module,
)
from dspark_compile.models.qwen3 import Qwen3Target

if TYPE_CHECKING:  # the kernels import Triton: only where the fused path runs
    from dspark_compile.targets.torch.kernels import Partials, RowNorm

TRITON_ATTENTION_ROWS = 64  # query rows per KV head (group · T) up to which "triton" uses the split-K kernel
TRITON_ATTENTION_T = 16  # ... and query rows (T) up to which it does so whatever the group (Gemma4: 16 per KV head)


class TritonAttention(SdpaAttention):
    """The split-K Triton kernel (kernels.decode_attention) for decode-sized queries, given as limits [B, T], or
    as a boolean visibility [B, 1, T, S] that is a band of slots per query (Gemma4's masks: slot = position, a
    sliding window's lower edge), turned into [low, limit) bounds [2, B, T] once per forward; SDPA for longer
    chunks (prefill). A verify block (T <= 16) takes the split-K kernel whatever the group, so a round's rows
    are computed as a target-only step computes them (the same tiles: :func:`~.kernels.decode_attention`)."""

    def prepare(self, visible: torch.Tensor, window: int | None, group: int, dtype: torch.dtype) -> torch.Tensor:
        t = visible.shape[2 if visible.dtype == torch.bool else 1]
        if group * t > TRITON_ATTENTION_ROWS and t > TRITON_ATTENTION_T:
            return super().prepare(visible, window, group, dtype)
        if visible.dtype != torch.bool:
            return visible.contiguous()
        rows = visible[:, 0]
        low = rows.to(torch.int32).argmax(-1)  # the first visible slot
        return torch.stack((low, low + rows.sum(-1)))

    def prepare_ring(self, positions: torch.Tensor, slots: int, window: int, group: int,
                     dtype: torch.dtype) -> torch.Tensor:
        """A ring's visibility (ReferenceAttention.prepare_ring) for the split-K kernel: position bounds
        [low, limit) and the row's last position, [3, B, T]."""
        t = positions.shape[1]
        if group * t > TRITON_ATTENTION_ROWS and t > TRITON_ATTENTION_T:
            return super().prepare_ring(positions, slots, window, group, dtype)
        return torch.stack((positions - window + 1, positions + 1, positions[:, -1:].expand_as(positions)))

    @staticmethod
    def split_k(mask: torch.Tensor) -> bool:
        """Whether a call with this mask (as :meth:`prepare` made it) runs the split-K kernel: decode-sized
        queries, given as bounds; longer chunks take SDPA."""
        return mask.dtype == torch.int64

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, *,
                 prescaled: bool = False) -> torch.Tensor:
        """``prescaled``: the output as the o projection's fp16 product reads it (:meth:`_Linear.takes_prescaled`),
        for decode-sized queries (the split-K kernel's merge writes it)."""
        if not self.split_k(mask):
            assert not prescaled, "a prescaled attention output is for decode-sized queries"
            return super().__call__(q, k, v, mask, scale)
        from dspark_compile.targets.torch.kernels import decode_attention

        bsz, hq, t, d = q.shape
        low, limit = (mask[0], mask[1]) if mask.dim() == 3 else (None, mask)
        top = mask[2].contiguous() if mask.dim() == 3 and mask.shape[0] == 3 else None
        out = decode_attention(q.contiguous(), k, v, limit.contiguous(), scale,
                               low=None if low is None else low.contiguous(), ring_top=top, token_major=True,
                               prescaled=prescaled)
        return out.view(bsz, t, hq * d)


ATTENTION: dict[str, ReferenceAttention] = {"sdpa": SdpaAttention(), "reference": ReferenceAttention(),
                                            "triton": TritonAttention()}


def _hands_off(handoff: bool) -> bool:
    """Whether a product called with ``handoff`` leaves its split-K partials to its consumer:
    ``DSPARK_GEMM_HANDOFF=0`` turns it off. The call and the prescaled question must agree, as the decode GEMM
    keeps one configuration per answer."""
    from dspark_compile.targets.torch.kernels import switched_on

    return handoff and switched_on("DSPARK_GEMM_HANDOFF")


@dataclass(frozen=True)
class _Linear:
    """One matrix product of the fused step through the decode GEMM (:mod:`.decode_gemm`: e4m3 weights, and
    full-precision CUDA weights where it beats cuBLAS), or ``F.linear`` on the CPU; a static input scale (W8A8
    checkpoints) is applied first."""

    weight: torch.Tensor | DecodeWeight  # type: ignore[name-defined]  # noqa: F821 (imported with Triton)
    bias: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, *, handoff: bool = False, prescaled: bool = False,
                 row_norm: RowNorm | None = None) -> torch.Tensor | Partials:
        """``handoff``: the consumer is one of the fused kernels, which take a split-K product's partials
        unsummed (``kernels.Partials``; ``DSPARK_GEMM_HANDOFF=0`` turns it off). ``prescaled``: ``x`` is the
        fp16 product's input, converted by its producer (:meth:`takes_prescaled`). ``row_norm``: ``x`` is an
        RMSNorm's output before its division by the RMS, which this product finishes (:meth:`finishes_norm`)."""
        if self.input_scale is not None:
            x = fp8_quantize_dequantize(x, self.input_scale)
        if not isinstance(self.weight, torch.Tensor):
            from dspark_compile.targets.torch.decode_gemm import decode_linear

            return decode_linear(x, self.weight, handoff=_hands_off(handoff), prescaled=prescaled, row_norm=row_norm)
        assert row_norm is None
        return F.linear(x, self.weight, self.bias)

    def glu(self, x: torch.Tensor, *, gelu_tanh: bool = False, prescaled: bool = False,
            row_norm: RowNorm | None = None, out_prescaled: bool = False) -> torch.Tensor:
        """silu(gate) · up (``gelu_tanh``: gelu_tanh(gate) · up) of this gate|up product (called with ``handoff``,
        as its consumer takes partials): finished by the product's own store where its weight is in pairs
        (``decode_gemm.decode_glu``), else by ``kernels.silu_mul`` (``gelu_tanh_mul``). ``out_prescaled``: written
        as the next product's fp16 product reads it."""
        from dspark_compile.targets.torch.kernels import glu_mul

        if not isinstance(self.weight, torch.Tensor) and self.weight.paired:  # (never with a static input scale)
            from dspark_compile.targets.torch.decode_gemm import decode_glu

            return decode_glu(x, self.weight, handoff=_hands_off(True), prescaled=prescaled, row_norm=row_norm,
                              out_prescaled=out_prescaled, gelu_tanh=gelu_tanh)
        return glu_mul(self(x, handoff=True, prescaled=prescaled, row_norm=row_norm), gelu_tanh=gelu_tanh,
                       prescaled=out_prescaled)

    def finishes_norm(self) -> bool:
        """Whether this product takes its input's RMSNorm unfinished (``kernels.add_rmsnorm_deferred``: the norm
        then runs many programs per row, so the product before it hands its split-K partials over instead of
        summing them in a last program; on by default, ``DSPARK_DEFERRED_NORM=0`` turns it off: the FP8 + head +
        draft round graph 3.758 -> 3.672 ms on the H200, docs/BENCH.md).
        e4m3 weights only, which always run the decode GEMM (a full-precision product may be timed to cuBLAS),
        with no input quantization (a static input scale is calibrated on normalised rows)."""
        from dspark_compile.targets.torch.kernels import switched_on

        return (not isinstance(self.weight, torch.Tensor) and self.input_scale is None and not self.weight.wide
                and not self.weight.act_group and switched_on("DSPARK_DEFERRED_NORM"))

    def takes_prescaled(self, x: torch.Tensor, *, handoff: bool = False) -> bool:
        """Whether this product of ``x``'s row count and dtype (bf16) runs the decode GEMM's fp16 product, so that the
        kernel producing its input writes it converted (``decode_gemm.takes_prescaled``: the same bits, no
        conversion in each K tile; ``handoff`` as the call passes it). ``DSPARK_PRESCALED=0`` turns it off."""
        if isinstance(self.weight, torch.Tensor) or self.input_scale is not None:
            return False
        from dspark_compile.targets.torch.decode_gemm import takes_prescaled
        from dspark_compile.targets.torch.kernels import switched_on

        return switched_on("DSPARK_PRESCALED") and takes_prescaled(x.shape[0], self.weight, x.dtype, x.device,
                                                                   _hands_off(handoff))

    @classmethod
    def of(cls, linears: list[nn.Module], *, glu: bool = False) -> _Linear:
        """``linears`` (sharing their input) as one product: their weights concatenated by rows, the modules'
        parameters re-pointed at views of the concatenation (same values, one copy), stored in the decode GEMM's
        fragment order where it takes it (``DecodeWeight.in_fragment_order``; ``DSPARK_FRAGMENT_ORDER=0`` turns it
        off), each module told so. ``glu`` (gate, up of equal size, e4m3 without a static input scale): their rows
        in pairs (``DecodeWeight.in_pairs``), so that :meth:`glu` ends in the product's store
        (``DSPARK_GLU_STORE=0`` turns it off: FP8 + head + draft replay b 982 -> 1002 tok/s at B = 1 on an H100,
        docs/BENCH.md)."""
        problem = _fusion_problem(linears)
        if problem:
            raise ValueError(problem)
        if all(isinstance(lin, Fp8Linear) for lin in linears):
            from dspark_compile.targets.torch.decode_gemm import DecodeWeight
            from dspark_compile.targets.torch.kernels import switched_on

            parts = [DecodeWeight.of(lin.weight.detach(), lin.weight_scale.detach(), lin.group,
                                  None if lin.bias is None else lin.bias.detach(), lin.act_group,
                                  fragment_order=lin.fragment_order)
                     for lin in linears]
            whole = DecodeWeight.cat(parts) if len(parts) > 1 else parts[0]
            if switched_on("DSPARK_FRAGMENT_ORDER"):
                whole = whole.in_fragment_order()
            paired = (glu and len(parts) == 2 and parts[0].weight.shape == parts[1].weight.shape
                      and not whole.wide and linears[0].input_scale is None and switched_on("DSPARK_GLU_STORE"))
            if paired:
                whole = whole.in_pairs()
            _repoint(linears, "weight", whole.weight, paired)
            for lin in linears:
                lin.fragment_order = whole.fragment_order
            return cls(whole, None, linears[0].input_scale)
        weight = _repoint(linears, "weight", torch.cat([lin.weight.detach() for lin in linears]))
        bias = None
        if linears[0].bias is not None:
            bias = _repoint(linears, "bias", torch.cat([lin.bias.detach() for lin in linears]))
        if weight.is_cuda:  # the decode GEMM where it beats cuBLAS (timed per shape)
            from dspark_compile.targets.torch.decode_gemm import DecodeWeight

            return cls(DecodeWeight.full(weight, bias))
        return cls(weight, bias)


def _repoint(linears: list[nn.Module], attr: str, whole: torch.Tensor, paired: bool = False) -> torch.Tensor:
    """Each module's ``attr`` a view of its rows of ``whole``: consecutive, or (``paired``: two modules' rows
    alternating, ``DecodeWeight.in_pairs``) every other row."""
    if paired:
        for i, lin in enumerate(linears):
            setattr(lin, attr, nn.Parameter(whole[i::2], requires_grad=False))
        return whole
    start = 0
    for lin in linears:
        rows = getattr(lin, attr).shape[0]
        setattr(lin, attr, nn.Parameter(whole[start : start + rows], requires_grad=False))
        start += rows
    return whole


@dataclass(frozen=True)
class _Fused:
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear


class _KernelFp8Linear(Fp8Linear):
    """An ``Fp8Linear`` (the same parameters) whose forward is the FP8 GEMM (``--quantize-lm-head``; Gemma4's
    soft-capped head keeps its cap after the product)."""

    def __init__(self, lin: Fp8Linear) -> None:
        nn.Module.__init__(self)
        self.weight, self.weight_scale, self.bias, self.input_scale = (lin.weight, lin.weight_scale, lin.bias,
                                                                       lin.input_scale)
        self.group, self.act_group, self.fragment_order = lin.group, lin.act_group, lin.fragment_order
        self.cap = lin.cap if isinstance(lin, SoftcappedFp8Head) else None
        self.product = _Linear.of([self])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(_on_rows(x, self.product), self.cap)


class _KernelLinear(nn.Linear):
    """A full-precision ``nn.Linear`` (the same parameters) whose product is the decode GEMM where it beats
    cuBLAS (``decode_gemm.linear``, timed per shape)."""

    def __init__(self, lin: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.weight, self.bias = lin.weight, lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dspark_compile.targets.torch.decode_gemm import linear

        return linear(x, self.weight, self.bias)


def _use_kernel_head(target: nn.Module, draft: nn.Module | None) -> None:
    """The target's LM head through :func:`_kernel_head`, and the draft's where it shares it (as the graft does)."""
    head = _kernel_head(target.lm_head)
    if draft is not None and draft.lm_head is target.lm_head:
        draft.lm_head = head
    target.lm_head = head


def _kernel_head(head: nn.Module) -> nn.Module:
    """The LM head, which the round calls as a module, with its product through the decode GEMM: an
    ``Fp8Linear``'s own forward would dequantize the whole vocabulary × hidden matrix at every call, and on the
    H200 cuBLAS streamed bf16 heads slower than the kernel (docs/BENCH.md, Gemma4 "Fifth pass")."""
    if type(head) in (Fp8Linear, SoftcappedFp8Head):
        return _KernelFp8Linear(head)
    if type(head) is nn.Linear and head.weight.is_cuda:
        return _KernelLinear(head)
    return head


def _fuse_layer(layer: nn.Module) -> _Fused:
    """q|k|v and gate|up as one product each; o and down as they are."""
    a, mlp = layer.self_attn, layer.mlp
    return _Fused(_Linear.of([a.q_proj, a.k_proj, a.v_proj]), _Linear.of([a.o_proj]),
                  _Linear.of([mlp.gate_proj, mlp.up_proj], glu=True), _Linear.of([mlp.down_proj]))


def _use_gemma4_kernels(target: nn.Module, draft: nn.Module | None) -> None:
    """Gemma4's norms (with their residual adds and layer scalars) as one Triton kernel each
    (:mod:`.gemma4_kernels`), the layers' q|k|v and gate|up as one matrix product each, and every product (the
    head's too) through the decode GEMM; the Qwen3 modules have none of these (their fused path is ``fused=True``).
    e4m3 layers fuse as Qwen3's do (:meth:`_Linear.of`: gate|up in pairs, GeGLU finished in its store); o, down,
    the draft layers' q/k/v (their forward projects them apart: ``Gemma4Layer.reads_fused_qkv``) and a group that
    :func:`_fusable` refuses run alone."""
    from dspark_compile.targets.torch.decode_gemm import linear
    from dspark_compile.targets.torch.gemma4_kernels import add_norm_norm, gemma_rmsnorm, qkv_into_cache

    if type(target.lm_head) is SoftcappedFp8Head:  # --quantize-lm-head: the FP8 GEMM, then the cap
        _use_kernel_head(target, draft)
    if draft is not None and type(draft.fc) is Fp8Linear:  # --quantize-draft: its own forward dequantizes
        draft.fc = _KernelFp8Linear(draft.fc)  # the whole taps x hidden matrix at every block
    for model in (target, draft):
        for module in list(model.modules()) if model is not None else ():
            if isinstance(module, GemmaRMSNorm):
                module.kernel = gemma_rmsnorm
            if isinstance(module, SoftcappedHead):  # the decode GEMM where it beats cuBLAS, as for the layers
                module.linear = linear
            if isinstance(module, Gemma4Layer):
                module.add_norm_kernel = add_norm_norm
                module.glu_kernel = gelu_glu
                module.qkv_kernel = qkv_into_cache  # used by the target layers' forward (the draft injects K/V)
                attn, mlp = module.self_attn, module.mlp
                if not any(isinstance(m, Fp8Linear) for m in module.modules()):
                    if module.gate_up is None:
                        module.fuse()
                    module.linear = attn.linear = linear  # the decode GEMM where it beats cuBLAS
                    continue
                # e4m3 layers: the FP8 decode GEMM (the modules' forward dequantizes at every call); what a call on
                # these layers before they were quantized set is replaced, not kept
                module.linear = None
                qkv = [attn.q_proj, attn.k_proj] + ([attn.v_proj] if attn.v_proj is not None else [])
                gate_up = [mlp.gate_proj, mlp.up_proj]
                fuse_qkv = module.reads_fused_qkv and _fusable(qkv)
                attn.qkv, attn.linear = (_Linear.of(qkv), through) if fuse_qkv else (None, F.linear)
                module.gate_up = _Linear.of(gate_up, glu=True) if _fusable(gate_up) else None
                fused = {id(lin) for lin in (qkv if fuse_qkv else []) + (gate_up if module.gate_up is not None else [])}
                for name, child in list(module.named_modules()):
                    if type(child) is Fp8Linear and id(child) not in fused:  # (a fused one's rows may be strided)
                        replace_module(module, name, _KernelFp8Linear(child))


def _fusion_problem(linears: list[nn.Module]) -> str | None:
    """Why ``linears`` (sharing their input) cannot be one product (:meth:`_Linear.of`), or None: e4m3 and full
    precision mixed, or e4m3 layers with more than one static input scale or activation quantization."""
    fp8 = [isinstance(lin, Fp8Linear) for lin in linears]
    if not all(fp8):
        return "cannot fuse FP8 and full-precision layers into one product" if any(fp8) else None
    scales = {None if lin.input_scale is None else float(lin.input_scale) for lin in linears}
    if len(scales) > 1:
        return f"fused FP8 layers need one static input scale; found {sorted(map(str, scales))}"
    if len({lin.act_group for lin in linears}) > 1:
        return "fused FP8 layers need one activation quantization"
    return None


def _fusable(linears: list[nn.Module]) -> bool:
    """Whether ``linears`` run as one e4m3 product: all ``Fp8Linear`` and no :func:`_fusion_problem`; else each runs
    alone."""
    return all(type(lin) is Fp8Linear for lin in linears) and _fusion_problem(linears) is None


def _on_rows(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` of ``x`` [..., K] as the decode GEMM takes it, rows [M, K] with a contiguous last axis, and its
    result viewed back to [..., N]."""
    rows = x.reshape(-1, x.shape[-1])
    return fn(rows if rows.stride(-1) == 1 else rows.contiguous()).view(*x.shape[:-1], -1)


def through(x: torch.Tensor, product: torch.Tensor | _Linear) -> torch.Tensor:
    """``x`` [..., K] through a fused product (Gemma4's ``linear(x, qkv)`` seam): a :class:`_Linear` on its rows,
    or a full-precision weight through ``decode_gemm.linear``."""
    if not isinstance(product, _Linear):
        from dspark_compile.targets.torch.decode_gemm import linear

        return linear(x, product)
    return _on_rows(x, product)


def gelu_glu(x: torch.Tensor, gate_up: torch.Tensor | _Linear) -> torch.Tensor:
    """gelu_tanh(gate) · up of ``x`` [..., K] (Gemma4's ``glu_kernel`` seam): an e4m3 gate|up in pairs finishes it
    in its product's store (:meth:`_Linear.glu`); a full-precision weight runs its product, then
    ``kernels.gelu_tanh_mul``."""
    if not isinstance(gate_up, _Linear):
        from dspark_compile.targets.torch.kernels import gelu_tanh_mul

        return gelu_tanh_mul(through(x, gate_up))
    return _on_rows(x, lambda rows: gate_up.glu(rows, gelu_tanh=True))


class StaticProgram:
    """Target step (embed → layers → final norm, taps) and draft backbone over in-place static caches."""

    def __init__(self, target: Qwen3Target, draft: DSparkDraft | None, *, fused: bool, attention: str) -> None:
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {tuple(ATTENTION)}, found {attention!r}")
        self.target = target
        self.draft = draft
        self.fused = fused and target.fused_kernels  # the fused kernels know Qwen3's layer only
        self.attention = attention
        self.attn = ATTENTION[attention]
        self._target_weights = [_fuse_layer(layer) for layer in target.layers] if self.fused else []
        self._draft_weights = [_fuse_layer(layer) for layer in draft.layers] if self.fused and draft is not None else []
        self._draft_fc = _Linear.of([draft.fc]) if self.fused and draft is not None else None
        if self.fused:
            _use_kernel_head(target, draft)
        if target.embed_tokens.weight.is_cuda:
            _use_gemma4_kernels(target, draft)
        cfg = target.cfg
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self._rope: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown tables: graphs may read them

    def rope_table(self, rotary: nn.Module, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, D] of positions 0 … P − 1 (P ≥ ``positions``, a power of two, at least 1024), by the rotary
        module's own forward: the bits a step computing its rows' rotary would get, read by ``qk_norm_rope`` at each
        row's position instead of 7 launches per step. Built outside graph capture (a step's warm-up runs build
        it first) and kept: a captured graph reads the table it was captured with."""
        key = (id(rotary), dtype)
        have = self._rope.get(key)
        if have is None or have[0].shape[0] < positions:
            dev = rotary.inv_freq.device
            assert not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()), "rope table in a capture"
            p = max(1024, 1 << (max(positions, 1) - 1).bit_length())
            cos, sin = rotary(torch.arange(p, device=dev).view(1, p), dtype)
            if have is not None:
                self._rope_kept.append(have)
            have = self._rope[key] = (cos.reshape(p, -1).contiguous(), sin.reshape(p, -1).contiguous())
        return have

    # ------------------------------------------------------------------------------------------------ shared
    def _mask(self, limit: torch.Tensor, window: int) -> torch.Tensor:
        """Query (b, t) sees slots < limit[b, t], in the attention strategy's form."""
        return self.attn.prepare(limit, window, self.group, self.target.embed_tokens.weight.dtype)

    @staticmethod
    def _norm(x: torch.Tensor, delta: torch.Tensor | Partials | None, norm: nn.Module, tap: torch.Tensor | None,
              *, prescaled: bool, deferred: bool, out: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, RowNorm | None]:
        """``add_rmsnorm`` (into ``out`` where given), or (``deferred``: its product finishes it,
        :meth:`_Linear.finishes_norm`) ``add_rmsnorm_deferred``."""
        from dspark_compile.targets.torch.kernels import add_rmsnorm, add_rmsnorm_deferred

        if deferred:
            assert out is None
            return add_rmsnorm_deferred(x, delta, norm.weight, norm.eps, tap, prescaled=prescaled)
        return add_rmsnorm(x, delta, norm.weight, norm.eps, tap, prescaled=prescaled, out=out), None

    def _fused_layer(self, layer: nn.Module, fw: _Fused, x: torch.Tensor, delta: torch.Tensor | Partials | None,
                     inputs: tuple[torch.Tensor, ...], kv: torch.Tensor, mask: torch.Tensor, window: int,
                     ctx: torch.Tensor | None, tap: torch.Tensor | None, *,
                     hand_down: bool = False) -> torch.Tensor | Partials:
        """One decoder layer; ``x`` [M, H] is the residual stream, updated in place. Returns the MLP output
        (added to ``x`` by the next layer's norm kernel; ``hand_down``: that kernel is ``add_rmsnorm_deferred``,
        which takes down's split-K partials). ``ctx`` [B, C + T, H] (draft): the rows q|k|v reads, the first C of
        each batch entry the context rows (whose k/v are written too: KV injection), the other T written here by
        the input norm (no concatenation per layer); queries are the block rows only."""
        from dspark_compile.targets.torch.kernels import qk_norm_rope

        cos, sin, positions, slots = inputs
        a = layer.self_attn
        bsz = kv.shape[1]
        t = x.shape[0] // bsz
        n_ctx = 0 if ctx is None else ctx.shape[1] - t
        # a product's input written as its fp16 product reads it (decode_gemm.takes_prescaled), where it is one
        pre = ctx is None and fw.qkv.takes_prescaled(x, handoff=True)
        defer = ctx is None and fw.qkv.finishes_norm()  # the draft's q|k|v also reads context rows, normalised
        h, norm = self._norm(x, delta, layer.input_layernorm, tap, prescaled=pre, deferred=defer,
                             out=None if ctx is None else ctx[:, n_ctx:])
        rows_in = h if ctx is None else ctx.view(-1, h.shape[-1])
        qkv = fw.qkv(rows_in, handoff=True, prescaled=pre, row_norm=norm)
        q = x.new_empty(bsz, a.num_heads, t, a.head_dim)
        qk_norm_rope(qkv, cos, sin, slots, a.q_norm.weight, a.k_norm.weight, a.q_norm.eps, q, kv[0], kv[1],
                     rows=t + n_ctx, q_start=n_ctx, positions=positions)
        # o and down hand their partials over only to add_rmsnorm_deferred: add_rmsnorm is one program per row,
        # which would read every partial of the row alone (measured slower on the H200, docs/BENCH.md)
        defer = fw.gate_up.finishes_norm()
        # the split-K attention's merge writes o's input (a strategy of another kind never takes it prescaled)
        pre = (isinstance(self.attn, TritonAttention) and self.attn.split_k(mask)
               and fw.o.takes_prescaled(x, handoff=defer))
        k, v = kv[0][:, :, :window], kv[1][:, :, :window]
        out = self.attn(q, k, v, mask, a.scale, prescaled=True) if pre else self.attn(q, k, v, mask, a.scale)
        o = fw.o(out.view(x.shape[0], -1), prescaled=pre, handoff=defer)
        pre = fw.gate_up.takes_prescaled(x, handoff=True)
        h, norm = self._norm(x, o, layer.post_attention_layernorm, None, prescaled=pre, deferred=defer)
        pre_down = fw.down.takes_prescaled(x, handoff=hand_down)  # x's rows and dtype: what down reads
        act = fw.gate_up.glu(h, prescaled=pre, row_norm=norm, out_prescaled=pre_down)
        return fw.down(act, prescaled=pre_down, handoff=hand_down)

    # ------------------------------------------------------------------------------------------------ target
    def target_step(self, tokens: torch.Tensor, cache_len: torch.Tensor, kv: torch.Tensor,
                    window: int, *, taps_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] at positions cache_len[b] + t; kv [L, 2, B, KV, S, D] written in place.

        Returns (hidden after the final norm [B, T, H], taps [B, T, NT·H]) like ``Qwen3Target.forward``; the fused
        program writes the taps into ``taps_out`` (contiguous, that shape) where given, and returns it.
        """
        tgt = self.target
        if not self.fused:
            hidden, taps, _ = tgt(tokens, cache_len, kv, cache=InPlaceCache(window), attention=self.attn)
            return hidden, taps
        from dspark_compile.targets.torch.round_kernels import positions

        pos, limit = positions(cache_len, tokens.shape[1])
        x = tgt.embed_tokens(tokens)
        mask = self._mask(limit, window)  # causal over the committed prefix and this chunk
        return self._target_fused(x, pos, self.rope_table(tgt.rotary, window, x.dtype), kv, mask, window, taps_out)

    def _target_fused(self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      kv: torch.Tensor, mask: torch.Tensor, window: int,
                      taps_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        from dspark_compile.targets.torch.kernels import add_rmsnorm

        tgt = self.target
        bsz, t, hid = x.shape
        m = bsz * t
        x = x.reshape(m, hid)
        ids = tgt.tap_layer_ids
        if taps_out is not None:
            assert taps_out.is_contiguous() and taps_out.shape == (bsz, t, len(ids) * hid), taps_out.shape
        taps = x.new_empty(m, len(ids) * hid) if taps_out is None else taps_out.view(m, -1)
        cols = {lid: taps[:, j * hid : (j + 1) * hid] for j, lid in enumerate(ids)}
        if -1 in cols:
            cols[-1].copy_(x)
        flat = pos.reshape(m)
        inputs = (*rope, flat, flat)
        delta: torch.Tensor | Partials | None = None
        weights = self._target_weights
        for i, (layer, fw) in enumerate(zip(tgt.layers, weights, strict=True)):
            hand = i + 1 < len(weights) and weights[i + 1].qkv.finishes_norm()  # the final norm sums its delta
            delta = self._fused_layer(layer, fw, x, delta, inputs, kv[i], mask, window, None, cols.get(i - 1),
                                      hand_down=hand)
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
        from dspark_compile.targets.torch.kernels import add_rmsnorm
        from dspark_compile.targets.torch.round_kernels import draft_inputs

        bsz, c, _ = ctx_taps.shape
        g = d.block_size
        # Rows per batch entry: the C context rows, then the G block rows (the queries).
        block_ids, pos, slots, limit = draft_inputs(anchor, ctx_count, cache_len, c, g, d.cfg.mask_token_id)
        x = d.embed_tokens(block_ids)
        mask = self._mask(limit, window)
        hid = x.shape[-1]
        x = x.reshape(bsz * g, hid)
        fc = self._draft_fc(ctx_taps.reshape(bsz * c, -1).to(d.embed_tokens.weight.dtype))
        rows = x.new_empty(bsz, c + g, hid)  # each layer's q|k|v rows: the context rows, then its block rows
        add_rmsnorm(fc, None, d.hidden_norm.weight, d.hidden_norm.eps, out=rows[:, :c])
        inputs = (*self.rope_table(d.rotary, window, x.dtype), pos.view(-1), slots.view(-1))
        delta: torch.Tensor | Partials | None = None
        for i, (layer, fw) in enumerate(zip(d.layers, self._draft_weights, strict=True)):
            delta = self._fused_layer(layer, fw, x, delta, inputs, kv[i], mask, window, rows, None)
        return add_rmsnorm(x, delta, d.norm.weight, d.norm.eps).view(bsz, g, hid)

    def draft_context(self, ctx_taps: torch.Tensor, ctx_count: torch.Tensor, cache_len: torch.Tensor,
                      kv: torch.Tensor, window: int) -> None:
        """Only :meth:`draft_step`'s context entries (``DSparkDraft.write_context``): each draft layer's k/v of
        the context rows ``c < ctx_count[b]`` at slot cache_len[b] + c, through the same products and
        ``qk_norm_rope`` as :meth:`draft_step` (no queries: q_start = C), and no block."""
        d = self.draft
        assert d is not None
        if not self.fused:
            d.write_context(ctx_taps, cache_len, kv, cache=InPlaceCache(window))
            return
        from dspark_compile.targets.torch.kernels import add_rmsnorm, qk_norm_rope
        from dspark_compile.targets.torch.round_kernels import draft_inputs

        bsz, c, _ = ctx_taps.shape
        dtype = d.embed_tokens.weight.dtype
        _, pos, slots, _ = draft_inputs(None, ctx_count, cache_len, c, 0, d.cfg.mask_token_id)
        fc = self._draft_fc(ctx_taps.reshape(bsz * c, -1).to(dtype))
        rows = add_rmsnorm(fc, None, d.hidden_norm.weight, d.hidden_norm.eps)
        cos, sin = self.rope_table(d.rotary, window, rows.dtype)
        for layer, fw, layer_kv in zip(d.layers, self._draft_weights, kv, strict=True):
            a = layer.self_attn
            qkv = fw.qkv(rows, handoff=True)
            q = rows.new_empty(bsz, a.num_heads, 0, a.head_dim)
            qk_norm_rope(qkv, cos, sin, slots.view(-1), a.q_norm.weight, a.k_norm.weight, a.q_norm.eps, q,
                         layer_kv[0], layer_kv[1], rows=c, q_start=c, positions=pos.view(-1))

    def propose(self, hidden: torch.Tensor, anchor: torch.Tensor, temperature: torch.Tensor | None,
                uniforms: torch.Tensor | None, *, distributions: bool = True, probs_out: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``DSparkDraft.propose``; a vanilla Markov head runs :func:`~.kernels.markov_greedy` (greedy rounds) or
        :func:`~.kernels.markov_sample` (sampling rounds, their distributions written into ``probs_out`` when
        given), one kernel per position, on the GPU and in the fused program, up to the batch they were measured
        faster at (``MARKOV_ROWS``); a W2 quantized by ``--quantize-draft`` (per-channel e4m3, model-dtype inputs)
        too."""
        from dspark_compile.targets.torch import kernels

        d = self.draft
        assert d is not None
        head, conf = d.markov_head, d.confidence_head
        bsz, g, _ = hidden.shape
        w2 = None if head is None else head.markov_w2
        fp8_w2 = type(w2) is Fp8Linear and w2.weight_scale.dim() == 1 and w2.input_scale is None and not w2.act_group
        sampling = temperature is not None and uniforms is not None
        if ((temperature is not None and not (sampling and distributions)) or not (self.fused or hidden.is_cuda)
                or not kernels.switched_on("DSPARK_FUSED_PROPOSE") or head is None or head.kind != "vanilla"
                or not (type(w2) is nn.Linear or fp8_w2)
                or d.cfg.markov_rank % 16 or bsz > kernels.MARKOV_ROWS):
            return d.propose(hidden, anchor, temperature, uniforms, distributions=distributions)
        args = (d.block_logits(hidden), hidden, anchor, head.markov_w1.weight, w2.weight,
                None if conf is None else conf.proj.weight.view(-1), None if conf is None else conf.proj.bias,
                d.cfg.confidence_head_with_markov)
        scale = w2.weight_scale if fp8_w2 else None
        if sampling:
            return kernels.markov_sample(*args, temperature, uniforms, probs_out=probs_out, w2_scale=scale)
        tokens, logits = kernels.markov_greedy(*args, w2_scale=scale)
        return tokens, logits, hidden.new_empty(bsz, g, 0, dtype=torch.float32)
