"""``torch.ops.dspark.spec_verify``: the one definition of SpecVerify that programs call (README.md here):
fake kernel for ``torch.export``, the torch reference on every device, the Triton kernel on CUDA, and the ONNX
translation that emits the ``dspark::SpecVerify`` node.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from dspark_compile.plugins.spec_verify.op_schema import GREEDY, SPEC_VERIFY
from dspark_compile.plugins.spec_verify.reference import spec_verify_torch

Tensor = torch.Tensor


@torch.library.custom_op("dspark::spec_verify", mutates_args=())
def spec_verify(target_logits: Tensor, draft_tokens: Tensor, verify_len: Tensor, draft_probs: Tensor | None = None,
                temperature: Tensor | None = None, uniforms: Tensor | None = None,
                mode: str = GREEDY) -> tuple[Tensor, Tensor]:
    """``(accepted, next_token)``, int64 [B]; inputs as ``op_schema.SPEC_VERIFY`` orders them."""
    return spec_verify_torch(target_logits, draft_tokens, verify_len, mode=mode, draft_probs=draft_probs,
                             temperature=temperature, uniforms=uniforms)


@spec_verify.register_fake
def _(target_logits: Tensor, draft_tokens: Tensor, verify_len: Tensor, draft_probs: Tensor | None = None,
      temperature: Tensor | None = None, uniforms: Tensor | None = None,
      mode: str = GREEDY) -> tuple[Tensor, Tensor]:
    SPEC_VERIFY.inputs_for(mode)  # rejects an unknown mode at trace time
    batch = target_logits.shape[0]
    return draft_tokens.new_empty(batch, dtype=torch.int64), draft_tokens.new_empty(batch, dtype=torch.int64)


if importlib.util.find_spec("triton") is not None:  # without triton, CUDA tensors run the torch reference

    @spec_verify.register_kernel("cuda")
    def _(target_logits: Tensor, draft_tokens: Tensor, verify_len: Tensor, draft_probs: Tensor | None = None,
          temperature: Tensor | None = None, uniforms: Tensor | None = None,
          mode: str = GREEDY) -> tuple[Tensor, Tensor]:
        from dspark_compile.plugins.spec_verify.kernel import spec_verify_triton

        return spec_verify_triton(target_logits, draft_tokens, verify_len, mode=mode, draft_probs=draft_probs,
                                  temperature=temperature, uniforms=uniforms)


def onnx_translation() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the op becomes one SpecVerify node,
    everything about it from ``SPEC_VERIFY`` through an ``onnx.defs.OpSchema`` built here, never registered."""
    from onnxscript.values import Op, Opset

    node_op = Op(Opset(SPEC_VERIFY.domain, SPEC_VERIFY.opset_version), SPEC_VERIFY.name,
                 SPEC_VERIFY.onnx_op_schema())

    # The exporter reads these annotations: unannotated parameters are tensor inputs, ``str`` an attribute.
    def spec_verify_onnx(target_logits, draft_tokens, verify_len, draft_probs=None, temperature=None,
                         uniforms=None, mode: str = GREEDY):
        inputs = [target_logits, draft_tokens, verify_len, draft_probs, temperature, uniforms]
        return node_op(*inputs[: len(SPEC_VERIFY.inputs_for(mode))], mode=mode, **SPEC_VERIFY.tensorrt_lookup)

    return {torch.ops.dspark.spec_verify.default: spec_verify_onnx}
