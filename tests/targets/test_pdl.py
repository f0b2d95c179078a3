"""Programmatic dependent launch, checked without a GPU: every kernel of the CUDA-graph target's step, compiled
for sm_90 with ``PDL``, waits for its predecessor (``griddepcontrol.wait``) before any instruction that touches
global memory, and lets its successor be dispatched; the decode GEMM and the Markov kernel do so only after their
main loop. Without
``PDL`` no grid-dependency instruction is emitted. Speed is measured on the H200 (docs/BENCH.md, "Programmatic
dependent launch"); losslessness with PDL on is the GPU tests'."""

from __future__ import annotations

import re
from typing import Any

import pytest

MEMORY = re.compile(r"\b(ld\.global|st\.global|cp\.async|atom\.|red\.)")
INT_PTRS = ("slot", "limit", "low", "top", "count", "prev", "tok", "seed", "anchor", "drafts", "vlen", "len", "pos",
            "ids", "acc", "next", "new", "dlen", "ref")
PARTS = {"PARTS": 6, "SCALED": True, "SHIFT": 2.0**112}  # a product input as 6 split-K partials (kernels.Partials)


def _compile(kernel: Any, consts: dict[str, Any], pdl: bool, *, ptr: str = "*bf16", warps: int = 4,
             aligned: bool = False, asm: str = "ptx") -> Any:
    """sm_90 PTX of ``kernel`` (or ``asm``: "cubin"); a product input read as split-K partials (``PARTS``) is
    float32. ``aligned``: pointers and integers 16-divisible, as a launch specializes them (Triton vectorizes and
    pipelines loads only where it knows that)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig: dict[str, str] = {}
    for p in kernel.params:
        if p.is_constexpr:
            continue
        name = p.name
        if name == "w_desc":
            sig[name] = "*fp8e4nv"
        elif name.endswith("_ptr") or name.startswith("part"):
            kind = "*i32" if name.startswith("count") else "*i64" if name.startswith(INT_PTRS) else ptr
            if name == "part_i":  # markov_greedy's block argmaxes
                kind = "*i32"
            if name == "live_ptr":  # round_kernels: torch's bool
                kind = "*i1"
            fp32 = name.startswith(("part_o", "part_m", "part_l", "part_v", "part_ptr", "s_ptr")) or "scale" in name \
                or (consts.get("PARTS") and name in ("qkv_ptr", "gu_ptr", "d_ptr")) or name == "s2_ptr" \
                or "norm_ptr" in name or name == "sumsq_ptr" or name == "part_s" \
                or name in ("temp_ptr", "unif_ptr", "probs_ptr", "stats_ptr")  # markov_sample's float32
            e4m3 = name == "w_ptr" or (name == "w2_ptr" and consts.get("W2_SCALED"))
            sig[name] = "*fp32" if fp32 else "*fp8e4nv" if e4m3 else kind
        else:
            sig[name] = "fp32" if name in ("eps1", "eps2", "scale") or name.endswith("eps") else "i32"
    consts = consts | {"PDL": pdl}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if aligned and sig[name][0] in "*i"}
    src = ASTSource(kernel, sig | {name: "constexpr" for name in consts}, constexprs=consts, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "launch_pdl": pdl})
    except RuntimeError as exc:  # no ptxas in this Triton build
        pytest.skip(reason=f"Triton cannot compile for sm_90 here: {exc}")
    return compiled.asm[asm]


def _kernels() -> list[tuple[str, Any, dict[str, Any]]]:
    from dspark_compile.targets.torch import gemma4_kernels as g
    from dspark_compile.targets.torch import kernels as k
    from dspark_compile.targets.torch import round_kernels as r
    from dspark_compile.targets.torch.decode_gemm import _decode_gemm_kernel

    return [
        ("round_inputs", r._round_inputs_kernel, {"BLOCK": 8}),
        ("positions", r._positions_kernel, {"BLOCK": 8}),
        ("draft_inputs", r._draft_inputs_kernel, {"BLOCK": 16}),
        ("commit", r._commit_kernel, {"BLOCK": 128}),
        ("finish", r._finish_kernel, {"DRAFT": True, "REPLAY": True, "BLOCK": 8}),
        ("qk_norm_rope_table", k._qk_norm_rope_kernel, {"BLOCK": 64, "TABLE": True}),
        ("add_rmsnorm", k._add_rmsnorm_kernel, {"HAS_DELTA": True, "HAS_TAP": True, "BLOCK": 4096}),
        ("qk_norm_rope", k._qk_norm_rope_kernel, {"BLOCK": 64}),
        ("act_mul", k._act_mul_kernel, {"GELU_TANH": False, "BLOCK": 1024}),
        ("add_rmsnorm_prescaled", k._add_rmsnorm_kernel, {"HAS_DELTA": True, "HAS_TAP": False, "BLOCK": 4096,
                                                         "PRESCALED": True, "ASM": True}),
        ("act_mul_prescaled", k._act_mul_kernel, {"GELU_TANH": False, "BLOCK": 1024, "PRESCALED": True,
                                                  "ASM": True} | PARTS),
        ("qk_norm_rope_partials", k._qk_norm_rope_kernel, {"BLOCK": 64} | PARTS),
        ("act_mul_partials", k._act_mul_kernel, {"GELU_TANH": False, "BLOCK": 1024} | PARTS),
        ("add_rmsnorm_deferred", k._add_rmsnorm_kernel, {"HAS_DELTA": True, "HAS_TAP": True, "BLOCK": 256,
                                                         "DEFERRED": True} | PARTS),
        ("qk_norm_rope_partials_norm", k._qk_norm_rope_kernel, {"BLOCK": 64, "NORM": 16} | PARTS),
        ("act_mul_partials_norm", k._act_mul_kernel, {"GELU_TANH": False, "BLOCK": 1024, "NORM": 16} | PARTS),
        ("attn_split", k._attn_split_kernel, {"D": 128, "DP": 128, "BLOCK_M": 16, "BLOCK_N": 64, "HAS_LOW": False,
                                              "RING": False}),
        ("attn_combine", k._attn_combine_kernel, {"D": 128, "DP": 128, "BLOCK_S": 16, "TOKEN_MAJOR": True}),
        ("attn_combine_prescaled", k._attn_combine_kernel, {"D": 128, "DP": 128, "BLOCK_S": 16, "TOKEN_MAJOR": True,
                                                            "PRESCALED": True, "ASM": True}),
        ("counter_uniforms", k._counter_uniforms_kernel, {"BLOCK": 16}),
        ("gemma_norm", g._gemma_norm_kernel, {"HAS_W": True, "HAS_RES": True, "HAS_SCALE": True, "ROPE": True,
                                              "BLOCK": 256}),
        ("qkv_cache", g._qkv_cache_kernel, {"SHARED": False, "BLOCK": 256}),
        ("add_norm_norm", g._add_norm_norm_kernel, {"HAS_SCALE": True, "BLOCK": 4096}),
        ("markov_greedy", k._markov_greedy_kernel, {"R": 256, "BLOCK_V": 128, "BLOCK_B": 16, "BLOCK_R": 64,
                                                    "TAIL_ROWS": 1, "BLOCK_H": 4096, "BLOCK_C": 2048,
                                                    "HAS_CONF": True, "CONF_MARKOV": True, "PRECISION": None}),
        ("markov_greedy_e4m3", k._markov_greedy_kernel, {"R": 256, "BLOCK_V": 256, "BLOCK_B": 16, "BLOCK_R": 64,
                                                         "TAIL_ROWS": 4, "BLOCK_H": 1024, "BLOCK_C": 1024,
                                                         "HAS_CONF": True, "CONF_MARKOV": True, "PRECISION": None,
                                                         "W2_SCALED": True}),
        ("markov_sample", k._markov_sample_kernel, {"R": 256, "BLOCK_V": 128, "BLOCK_B": 16, "BLOCK_R": 64,
                                                    "TAIL_ROWS": 1, "BLOCK_H": 4096, "BLOCK_C": 2048,
                                                    "HAS_CONF": True, "CONF_MARKOV": True, "PRECISION": None}),
        ("softmax_rows", k._softmax_kernel, {"BLOCK_V": 128, "BLOCK_B": 16}),
        ("decode_gemm", _decode_gemm_kernel, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "PER_CHANNEL": True,
                                              "EVEN": True, "PRECISION": None, "FAST_CVT": 1, "WIDE": False,
                                              "ASM": True, "TMA": False, "SPLIT_K": True}),
        ("decode_gemm_handoff", _decode_gemm_kernel, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128,
                                                      "PER_CHANNEL": True, "EVEN": True, "PRECISION": None,
                                                      "FAST_CVT": 1, "WIDE": False, "ASM": True, "TMA": False,
                                                      "HANDOFF": True, "SPLIT_K": True}),
        ("decode_gemm_norm", _decode_gemm_kernel, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128,
                                                   "PER_CHANNEL": True, "EVEN": True, "PRECISION": None,
                                                   "FAST_CVT": 2, "WIDE": False, "ASM": True, "TMA": False,
                                                   "NORM": 16, "SPLIT_K": False}),
    ]


@pytest.mark.parametrize("name", [n for n, _, _ in _kernels()])
def test_step_kernels_wait_for_their_predecessor_before_touching_memory(name: str) -> None:
    _, kernel, consts = next(k for k in _kernels() if k[0] == name)
    ptx = _compile(kernel, consts, True)
    body = ptx[ptx.index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    assert MEMORY.search(body) is not None and MEMORY.search(body).start() > wait  # type: ignore[union-attr]
    assert body.count("griddepcontrol.wait") == 1 and "griddepcontrol.launch_dependents" in body
    if name.startswith(("decode_gemm", "markov")):  # the successor's blocks only once the weight stream is done
        assert body.index("griddepcontrol.launch_dependents") > body.rindex("mma")
    if name.endswith("_prescaled"):  # the GEMM's own conversion, through float32 (Triton's ops would scale in fp16)
        assert "mul.rn.f32" in body and "0f3B800000" in body and "mul.f16" not in body
    if name == "decode_gemm_handoff":  # its programs end at their partials: no arrival count
        assert "atom." not in body and "atom." in _compile(kernel, consts | {"HANDOFF": False}, True)
    assert "griddepcontrol" not in _compile(kernel, consts, False)


def test_pdl_is_for_decode_sized_launches_on_hopper_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch keywords, with the GPU query stubbed (this machine has none): on for at most PDL_TOKENS token
    rows on compute capability 9+, off beyond, before Hopper, on the CPU, and with DSPARK_PDL=0."""
    from types import SimpleNamespace

    import torch

    from dspark_compile.targets.torch import kernels

    gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[0])
    monkeypatch.delenv("DSPARK_PDL", raising=False)
    kernels._pdl_on.cache_clear()
    try:
        assert kernels.pdl_options(gpu, kernels.PDL_TOKENS) == {"PDL": True, "launch_pdl": True}  # type: ignore[arg-type]
        assert kernels.pdl_options(gpu, kernels.PDL_TOKENS + 1) == {}  # type: ignore[arg-type]
        assert kernels.pdl_options(torch.zeros(1), 1) == {}
        capability[0] = (8, 0)
        kernels._pdl_on.cache_clear()
        assert kernels.pdl_options(gpu, 1) == {}  # type: ignore[arg-type]
        capability[0] = (9, 0)
        for value in ("0", "off", "False"):
            monkeypatch.setenv("DSPARK_PDL", value)
            kernels._pdl_on.cache_clear()
            assert kernels.pdl_options(gpu, 1) == {}  # type: ignore[arg-type]
    finally:
        kernels._pdl_on.cache_clear()
