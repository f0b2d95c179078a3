"""Loads issued before the work that waits for them, checked in the sm_90 SASS without a GPU (Triton's wheel
ships ``cuobjdump``): each case was a memory round trip in series before (docs/BENCH.md, "Loads issued before the
work that waits for them"). Speed is the device's to measure; these hold the instruction order."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.targets.test_pdl import PARTS, _compile


def _sass(kernel: Any, consts: dict[str, Any], warps: int, **kw: Any) -> list[str]:
    """The opcodes of ``kernel``'s sm_90 SASS, as a launch of 16-byte-aligned arguments compiles it."""
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(reason=f"no cuobjdump in this Triton wheel ({tool})")
    cubin = _compile(kernel, consts, True, warps=warps, aligned=True, asm="cubin", **kw)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [m.group(2) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", text)]


def _first(ops: list[str], prefix: str) -> int:
    return next(i for i, op in enumerate(ops) if op.startswith(prefix))


def _last(ops: list[str], prefix: str) -> int:
    return max(i for i, op in enumerate(ops) if op.startswith(prefix))


def _plain_loads(ops: list[str]) -> list[int]:
    """Where the synchronous, weakly ordered global loads are (not cp.async's LDGSTS, not .cg partial reads)."""
    return [i for i, op in enumerate(ops) if op.startswith("LDG.") and "STRONG" not in op]


def test_decode_gemm_loads_its_column_scales_before_the_weight_stream() -> None:
    from dspark_compile.targets.torch.decode_gemm import _decode_gemm_kernel

    consts = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "PER_CHANNEL": True, "EVEN": True, "PRECISION": None,
              "FAST_CVT": 2, "WIDE": False, "ASM": True, "TMA": False, "SPLIT_K": False}
    ops = _sass(_decode_gemm_kernel, consts, 4, ptr="*fp16")
    assert _plain_loads(ops) and max(_plain_loads(ops)) < _first(ops, "HGMMA"), "the scales load after the loop"
    # a split product's last program: the scales with its partials, before it waits for any of them
    ops = _sass(_decode_gemm_kernel, consts | {"SPLIT_K": True}, 4, ptr="*fp16")
    tail = ops[_last(ops, "ATOMG.E.ADD"):]
    assert _plain_loads(tail) and max(_plain_loads(tail)) < _first(tail, "LDG.E.128.STRONG")


def test_markov_kernel_loads_the_base_logits_before_the_w2_loop() -> None:
    from dspark_compile.targets.torch import kernels as k

    consts = {"R": 256, "BLOCK_V": 128, "BLOCK_B": 16, "BLOCK_R": 64, "TAIL_ROWS": 1, "BLOCK_H": 4096,
              "BLOCK_C": 2048, "HAS_CONF": True, "CONF_MARKOV": True, "PRECISION": None, "W2_SCALED": True}
    ops = _sass(k._markov_greedy_kernel, consts, 4)
    loop_end = _last(ops, "HGMMA")
    late = [op for op in ops[loop_end:_first(ops, "ATOMG")] if op.startswith("LDG.")]
    assert not late, f"loads after the W2 loop: {late}"


@pytest.mark.parametrize("name,warps", [("qk_norm_rope", 1), ("act_mul", 4)])
def test_consumers_of_normed_partials_issue_their_loads_before_any_shuffle(name: str, warps: int) -> None:
    from dspark_compile.targets.torch import kernels as k

    kernel, consts = {"qk_norm_rope": (k._qk_norm_rope_kernel, {"BLOCK": 64}),
                      "act_mul": (k._act_mul_kernel, {"GELU_TANH": False, "BLOCK": 1024})}[name]
    ops = _sass(kernel, consts | {"NORM": 16} | PARTS, warps)
    first_partial = _first(ops, "LDG.")
    shuffles = [i for i, op in enumerate(ops) if op.startswith("SHFL")]
    partials = [i for i, op in enumerate(ops) if op.startswith("LDG") and "STRONG" in op]
    assert partials and not [i for i in shuffles if first_partial < i < partials[0]] and (
        not shuffles or shuffles[0] > partials[0]), "the row factor's reduction ran ahead of the partials' loads"


@pytest.mark.parametrize("fast,block_m", [(1, 16), (2, 16), (1, 128)])
def test_decode_gemm_reads_a_weight_in_fragment_order_16_bytes_at_a_time(fast: int, block_m: int) -> None:
    """A weight stored in fragment order (``layers.to_fragment_order``) reaches the wgmma register operand through
    128-bit shared loads, where column order took one 16-bit load per value pair; the bf16 widening then takes
    four values a register, at most one byte permute per two conversions (two values a register: two each)."""
    from dspark_compile.targets.torch.decode_gemm import _decode_gemm_kernel

    consts = {"BLOCK_M": block_m, "BLOCK_N": 128 if block_m == 16 else 64, "BLOCK_K": 128, "PER_CHANNEL": True,
              "EVEN": True, "PRECISION": None, "FAST_CVT": fast, "WIDE": False, "ASM": True, "TMA": False,
              "SPLIT_K": False}
    plain = _sass(_decode_gemm_kernel, consts, 4)
    ordered = _sass(_decode_gemm_kernel, consts | {"FRAGMENT": True}, 4)
    assert "LDS.U16" in plain and "LDS.U16" not in ordered
    assert ordered.count("LDS.128") > plain.count("LDS.128")
    cvt = ordered.count("F2FP.F16.E4M3.UNPACK_B")
    assert cvt == plain.count("F2FP.F16.E4M3.UNPACK_B") and ordered.count("PRMT") <= cvt // 2


def test_decode_gemm_stored_through_a_select_keeps_its_wgmma_asynchronous() -> None:
    """ptxas serializes the K loop's wgmma of this larger-row candidate (the H200's timed choice for three of the
    four Qwen3-8B products at B = 16) when the accumulator is stored as it leaves the loop (its note C7515), and
    not when it passes through a select first (``KEEP_ASYNC``; the same values stored)."""
    pytest.importorskip("triton")
    from dspark_compile.targets.torch.decode_gemm import _decode_gemm_kernel
    from dspark_compile.targets.torch.ptxas import SERIALIZED, ptxas_binary, ptxas_notes

    if not ptxas_binary().exists():
        pytest.skip(reason=f"no ptxas in this Triton wheel ({ptxas_binary()})")
    consts = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "PER_CHANNEL": True, "EVEN": True, "PRECISION": None,
              "FAST_CVT": 1, "WIDE": False, "ASM": True, "TMA": False, "SPLIT_K": True, "FRAGMENT": True}
    notes = [SERIALIZED in ptxas_notes(_compile(_decode_gemm_kernel, consts | {"KEEP_ASYNC": keep}, False, warps=4,
                                                aligned=True))
             for keep in (False, True)]
    assert notes == [True, False]
