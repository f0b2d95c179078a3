"""Which decode GEMM candidates ptxas compiles with their K loop's wgmma serialized, found on the CPU: each
candidate compiled for sm_90a as a launch specializes it (16-byte-aligned arguments, per-channel scales, fragment
order, split K where the candidate asks for one), then Triton's own ``ptxas -v``, whose C7515 note says "wgmma.mma_async
instructions are serialized": each wgmma then waits for the one before (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after every
``HGMMA`` in the SASS), so the tensor cores never overlap the weight's widening. With and without
``KEEP_ASYNC`` (``DSPARK_GEMM_KEEP_ASYNC``: the accumulator stored through a select).

    PYTHONPATH=. python benchmarks/wgmma_serialization.py OUT.json

Result: ``benchmarks/results/wgmma_serialization_cpu.json``; docs/BENCH.md, "wgmma serialized by ptxas".
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dspark_compile.targets.torch import decode_gemm as dg
from dspark_compile.targets.torch.ptxas import SERIALIZED, ptxas_notes

SIGNATURE = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "w_desc": "*fp8e4nv", "s_ptr": "*fp32", "part_ptr": "*fp32",
             "count_ptr": "*i32", "out_ptr": "*bf16", "norm_ptr": "*fp32", "xs_ptr": "*fp32", "M": "i32",
             "N": "i32", "K": "i32", "KB": "i32", "GROUP": "i32", "K_SPLIT": "i32", "SPLITS": "i32", "stride_xm": "i32",
             "norm_w": "i32", "norm_eps": "fp32"}
UNALIGNED = ("M", "KB", "GROUP", "SPLITS", "w_desc", "norm_w", "norm_eps")


def ptxas_report(cfg: dg.Config, keep_async: bool) -> dict[str, Any]:
    """Whether ptxas serializes ``cfg``'s wgmma, and its registers per thread."""
    bm, bn, bk, per_sm, warps, _, conv = cfg[:7]
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PER_CHANNEL": True, "EVEN": True, "PRECISION": None,
              "FAST_CVT": conv, "WIDE": False, "ASM": True, "TMA": False, "SPLIT_K": per_sm > 0, "FRAGMENT": True,
              "KEEP_ASYNC": keep_async}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(SIGNATURE) if name not in UNALIGNED}
    src = ASTSource(dg._decode_gemm_kernel, SIGNATURE | {name: "constexpr" for name in consts}, constexprs=consts,
                    attrs=attrs)
    text = ptxas_notes(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"])
    registers = re.search(r"Used (\d+) registers", text)
    return {"serialized": SERIALIZED in text, "registers": int(registers.group(1)) if registers else None}


def main() -> int:
    candidates = [(16, bn, bk, ps, w, st, f) for bn, bk, ps, w, st, f in dg.SMALL_CONFIGS]
    candidates += [(bm, bn, bk, ps, w, st, f) for bn, bm, bk, ps, w, st, f in dg.LARGE_CONFIGS + dg.WIDE_CONFIGS]
    out: dict[str, Any] = {"triton": triton.__version__, "candidates": {}}
    for cfg in dict.fromkeys(candidates):
        row = {"as_stored": ptxas_report(cfg, False), "keep_async": ptxas_report(cfg, True)}
        out["candidates"][str(cfg)] = row
        print(cfg, row, flush=True)
    rows = out["candidates"].values()
    out["serialized"] = {mode: sum(r[mode]["serialized"] for r in rows) for mode in ("as_stored", "keep_async")}
    out["count"] = len(out["candidates"])
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")
    print(out["serialized"], "of", out["count"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
