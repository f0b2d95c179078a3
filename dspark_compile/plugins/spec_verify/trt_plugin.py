"""Full-TensorRT (>= 10.10) ahead-of-time Quick Deployable Plugin for ``dspark::SpecVerify``: the Triton
kernel's PTX (:func:`~.kernel.compile_ptx`, grid = B) embedded in the engine, so serving needs no Python.

Not executed here (no full TensorRT; TensorRT-RTX has no plugins): README.md lists what a first run must
confirm. A plugin has one input list, so a process registers it for one mode (3 inputs greedy, 6 sampling).
No ``from __future__ import annotations``: ``tensorrt.plugin`` inspects the live annotations and needs these
exact parameter lists (inputs, attributes, ``outputs``, then ``tactic`` for aot_impl).
"""

from typing import Any

from dspark_compile.errors import BackendUnavailableError, UsageError
from dspark_compile.plugins.spec_verify.kernel import compile_ptx
from dspark_compile.plugins.spec_verify.op_schema import GREEDY, MODES, SAMPLING, SPEC_VERIFY

_registered_mode: str | None = None

# TensorRT I/O types per input, "|" separating the logits dtype alternatives (position-aligned).
_TYPE_COMBINATION = {
    GREEDY: "FP32|FP16|BF16, INT64, INT64, INT64, INT64",
    SAMPLING: "FP32|FP16|BF16, INT64, INT64, FP32, FP32, FP32, INT64, INT64",
}


def _import_tensorrt() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise BackendUnavailableError(f"the SpecVerify TensorRT plugin needs full TensorRT >= 10.10 (`import "
                                      f"tensorrt.plugin` failed: {exc}); for TensorRT-RTX or onnxruntime run the "
                                      f"decompose_spec_verify pass instead") from exc
    return trt, trtp


def _aot_result(trt: Any, trtp: Any, mode: str, logits: Any, drafts: Any) -> tuple[bytes, bytes, Any, Any]:
    dtype_names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    compiled = compile_ptx(mode, dtype_names[logits.dtype])
    launch = trtp.KernelLaunchParams()
    launch.grid_x = logits.shape_expr[0]  # one program per request
    launch.block_x = compiled["num_warps"] * 32
    launch.shared_mem = compiled["shared"]
    # The kernel's scalar parameters G and V, between its input and output pointers.
    extra_args = trtp.SymIntExprs.from_tuple(
        [trtp.SymInt32(drafts.shape_expr[1]), trtp.SymInt32(logits.shape_expr[2])]
    )
    return compiled["name"].encode(), compiled["ptx"].encode(), launch, extra_args


def _outputs(trt: Any, trtp: Any, logits: Any) -> Any:
    batch = logits.shape_expr[0]
    return (trtp.from_shape_expr((batch,), dtype=trt.int64), trtp.from_shape_expr((batch,), dtype=trt.int64))


def _register_greedy(trt: Any, trtp: Any) -> None:
    @trtp.register(SPEC_VERIFY.plugin_id)
    def describe(
        target_logits: trtp.TensorDesc, draft_tokens: trtp.TensorDesc, verify_len: trtp.TensorDesc, mode: str
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs(trt, trtp, target_logits)

    @trtp.autotune(SPEC_VERIFY.plugin_id)
    def types(target_logits, draft_tokens, verify_len, outputs):
        return [trtp.AutoTuneCombination(_TYPE_COMBINATION[GREEDY])]

    @trtp.aot_impl(SPEC_VERIFY.plugin_id)
    def aot(
        target_logits: trtp.TensorDesc, draft_tokens: trtp.TensorDesc, verify_len: trtp.TensorDesc, mode: str,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int,
    ) -> tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _aot_result(trt, trtp, GREEDY, target_logits, draft_tokens)


def _register_sampling(trt: Any, trtp: Any) -> None:
    @trtp.register(SPEC_VERIFY.plugin_id)
    def describe(
        target_logits: trtp.TensorDesc, draft_tokens: trtp.TensorDesc, verify_len: trtp.TensorDesc,
        draft_probs: trtp.TensorDesc, temperature: trtp.TensorDesc, uniforms: trtp.TensorDesc, mode: str,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs(trt, trtp, target_logits)

    @trtp.autotune(SPEC_VERIFY.plugin_id)
    def types(target_logits, draft_tokens, verify_len, draft_probs, temperature, uniforms, outputs):
        return [trtp.AutoTuneCombination(_TYPE_COMBINATION[SAMPLING])]

    @trtp.aot_impl(SPEC_VERIFY.plugin_id)
    def aot(
        target_logits: trtp.TensorDesc, draft_tokens: trtp.TensorDesc, verify_len: trtp.TensorDesc,
        draft_probs: trtp.TensorDesc, temperature: trtp.TensorDesc, uniforms: trtp.TensorDesc, mode: str,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int,
    ) -> tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _aot_result(trt, trtp, SAMPLING, target_logits, draft_tokens)


def register_spec_verify_plugin(mode: str) -> None:
    """Register ``dspark::SpecVerify`` with TensorRT's plugin registry for ``mode`` (idempotent)."""
    global _registered_mode
    if mode not in MODES:
        raise UsageError(f"SpecVerify plugin mode must be one of {MODES}, found {mode!r}")
    if _registered_mode == mode:
        return
    if _registered_mode is not None:
        raise UsageError(f"the SpecVerify TensorRT plugin is registered for mode {_registered_mode!r} in this process; "
                         f"a plugin has one input list, so build {mode!r} engines in a separate process")
    trt, trtp = _import_tensorrt()
    (_register_greedy if mode == GREEDY else _register_sampling)(trt, trtp)
    _registered_mode = mode
