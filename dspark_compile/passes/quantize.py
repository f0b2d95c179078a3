"""Pass `quantize`: FP8 (e4m3) weights with per-output-channel scales for the target's linear layers.

Decode at small batch reads every weight once per step, so e4m3 weights halve the target's step (docs/BENCH.md).
Each decoder linear layer becomes an :class:`~dspark_compile.models.layers.Fp8Linear` (scale[n] =
max|W[n]| / 448, round-to-nearest e4m3); the LM head (Gemma4's soft-capped one too) joins with
``quantize_lm_head``, the draft's layers and ``fc`` with ``quantize_draft``, and the Markov head's W2 (its [V, r]
projection, read once per drafted position: the draft's largest matrix after its layers; its inputs stay in the
model dtype); embeddings, norms and the confidence head keep their dtype.
Layers a pre-quantized checkpoint already holds in FP8 are kept as they are. ``fp8-dynamic`` also quantizes
every FP8 layer's input dynamically, e4m3 per row and group of 128 columns (W8A8, the activation scheme HF
"-FP8" checkpoints declare): on Hopper the decode GEMM then multiplies e4m3 by e4m3 on the tensor cores and
streams its weights with no widening (docs/BENCH.md). The manifest records the method
and, per quantized layer, its scales' shape, range and sha256. Each weight quantized gives its checkpoint pages
back (they would otherwise stay resident next to the e4m3 copy: docs/BENCH.md, build memory).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from torch import nn

from dspark_compile.build_state import BuildState
from dspark_compile.checkpoint.store import MappedPages
from dspark_compile.errors import UsageError
from dspark_compile.models.gemma4 import SoftcappedHead
from dspark_compile.models.layers import Fp8Linear, replace_module
from dspark_compile.program import DecodeProgram

SCHEMES = {
    "fp8": "e4m3 weights, float32 per-output-channel scale max|W[n]|/448; activations in the model dtype",
    "fp8-dynamic": "e4m3 weights, float32 per-output-channel scale max|W[n]|/448; activations e4m3 per row and "
                   "group of gcd(K, 128) columns, scale amax/448, product in float32",
}


DRAFT_KEPT = ("lm_head", "confidence_head", "markov_head.gate_proj", "markov_head.joint_proj")
"""The draft's linear layers that ``quantize_draft`` leaves in their dtype: the LM head (the target's, shared:
``quantize_lm_head`` decides), the confidence head (one output) and the gated and recurrent Markov heads' small
projections."""


def quantize_module(root: nn.Module, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace every ``nn.Linear`` under ``root`` (names not starting with a ``skip`` prefix) by its FP8 form;
    returns the names replaced. Each full-precision weight read from a memory-mapped checkpoint has its pages
    released once quantized (``checkpoint.store.MappedPages``: otherwise every page read stays resident on top
    of the e4m3 copies for as long as the file is mapped)."""
    names = [n for n, m in root.named_modules() if type(m) is nn.Linear and not n.startswith(skip)]
    pages = MappedPages()
    for name in names:
        linear = root.get_submodule(name)
        replace_module(root, name, Fp8Linear.quantize(linear))
        pages.drop(linear.weight)
    return names


def scale_summary(root: nn.Module, prefix: str, skip: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per FP8 layer of ``root`` (but ``skip``): its scale's shape, min, max and sha256 (float32 bytes)."""
    out = {}
    for name, m in root.named_modules():
        if isinstance(m, Fp8Linear) and not name.startswith(skip):
            s = m.weight_scale.detach().to(torch.float32).contiguous()
            out[f"{prefix}{name}"] = {"shape": list(s.shape), "min": float(s.min()), "max": float(s.max()),
                                      "input_scale": None if m.input_scale is None else float(m.input_scale),
                                      "activation_group": m.act_group or None,
                                      "sha256": hashlib.sha256(s.numpy().tobytes()).hexdigest()}
    return out


def quantize_inputs(model: nn.Module) -> None:
    """``fp8-dynamic``: every FP8 layer under ``model`` quantizes its input too (e4m3 per row and group), but the
    Markov head's: W2's input, a row of W1, stays in the model dtype (the Markov kernel reads it so)."""
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear) and not m.act_group and not name.startswith("markov_head"):
            m.quantize_activations()


def quantize_head(head: nn.Module) -> nn.Module:
    """The LM head in e4m3 (``--quantize-lm-head``): a plain linear head, or Gemma4's soft-capped one (its cap kept
    after the product); a head already in FP8 (a pre-quantized checkpoint's) as it is."""
    if isinstance(head, SoftcappedHead):
        return head.quantized()
    if type(head) is nn.Linear:
        return Fp8Linear.quantize(head)
    if isinstance(head, Fp8Linear):
        return head
    raise UsageError(f"--quantize-lm-head: no e4m3 form of a {type(head).__name__} LM head; drop --quantize-lm-head")


def quantize_program(program: DecodeProgram, *, layers: bool = True, lm_head: bool = False, draft: bool = False,
                     activations: bool = False) -> None:
    """FP8 weights in place: the target's decoder layers (``layers``), its LM head (``lm_head``; the draft shares
    it) and the draft's layers, ``fc`` and Markov W2 (``draft``); with ``activations`` every FP8 layer's input too
    (dynamic scales), W2's excepted."""
    target = program.target
    if layers:
        quantize_module(target.layers)
    if lm_head:
        target.lm_head = quantize_head(target.lm_head)
    if program.draft is not None:
        program.draft.lm_head = target.lm_head  # the graft shares the target's head, quantized or not
        if draft:
            quantize_module(program.draft, skip=DRAFT_KEPT)
    if activations:
        try:
            for model in (target, program.draft):
                if model is not None:
                    quantize_inputs(model)
        except ValueError as exc:  # static input scales (a W8A8 checkpoint), or an input width it can't split
            raise UsageError(f"--quantize fp8-dynamic: {exc}; use --quantize fp8 for this target") from exc


def quantize_as_built(program: DecodeProgram, quantize: str | None, *, lm_head: bool, draft: bool) -> None:
    """What a build's quantize options do to its program: the pass, and ``api.build_program_of`` rebuilding a
    build's torch reference from its manifest, must agree. ``--quantize`` quantizes the target's layers that are
    still in full precision; without it (a pre-quantized FP8 checkpoint, whose layers are kept as they are),
    ``--quantize-lm-head`` and ``--quantize-draft`` still quantize the head and the draft."""
    if quantize in SCHEMES or lm_head or draft:
        quantize_program(program, layers=quantize in SCHEMES, lm_head=lm_head, draft=draft,
                         activations=quantize == "fp8-dynamic")


def run(state: BuildState) -> None:
    spec, program = state.spec, state.program
    assert program is not None and state.pair is not None
    pre = state.pair.target.quant
    if spec.quantize is None and pre is None:
        if spec.quantize_lm_head or spec.quantize_draft:  # it would build in full precision without a word
            flag = "--quantize-lm-head" if spec.quantize_lm_head else "--quantize-draft"
            raise UsageError(f"{flag}: the target is not an FP8 checkpoint and --quantize is not set; add "
                             f"--quantize fp8 (or fp8-dynamic), or drop {flag}")
        return
    quantize_as_built(program, spec.quantize, lm_head=spec.quantize_lm_head, draft=spec.quantize_draft)
    target, draft = program.target, program.draft
    state.quantization = {
        "method": spec.quantize or pre.layout.method,  # type: ignore[union-attr]
        "scheme": SCHEMES[spec.quantize] if spec.quantize else None,
        "checkpoint": pre.to_json() if pre is not None else None,
        "lm_head": isinstance(target.lm_head, Fp8Linear),
        "draft": draft is not None and any(isinstance(m, Fp8Linear) for m in draft.layers.modules()),
        "layers": scale_summary(target, "target.", ()) | (
            scale_summary(draft, "draft.", ("lm_head", "embed_tokens")) if draft is not None else {}),
    }
    # DequantizeLinear reads FLOAT8E4M3FN from opset 19 on.
    state.spec = dataclasses.replace(spec, opset=max(spec.opset, 19))
