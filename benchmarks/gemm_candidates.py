"""Every decode GEMM candidate on the GPU, checked as the timing checks it: within 1e-2 of the dequantized product
and the same bits on three launches (``decode_gemm.candidate_error``), on two inputs, for the Qwen3-8B products in
e4m3 (weights in fragment order, as the target stores them, and in column order), at 8-512 rows (the small, larger
and wide row classes). ``--variants``: instead, the tile that raced on the H100 (128 × 128 × 64, 8 warps, 4 stages)
and its neighbours, one knob changed each, at the products and row counts where it raced.

    PYTHONPATH=. python benchmarks/gemm_candidates.py OUT.json [--rows 256,512] [--variants]

docs/BENCH.md, "A wide tile that raced".
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch.nn import functional as F

from dspark_compile.models.layers import fp8_dequantize, quantize_fp8
from dspark_compile.targets.torch import decode_gemm as dg

PRODUCTS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
            "lm_head": (151936, 4096)}
RACED = (128, 128, 64, 0, 8, 4, 1)
VARIANTS = {"raced": RACED, "conversion 0": (128, 128, 64, 0, 8, 4, 0), "3 stages": (128, 128, 64, 0, 8, 3, 1),
            "2 stages": (128, 128, 64, 0, 8, 2, 1), "4 warps": (128, 128, 64, 0, 4, 4, 1), "TMA": (*RACED, 1),
            "K tile 128, 3 stages": (128, 128, 128, 0, 8, 3, 1), "256 rows": (256, 128, 64, 0, 8, 4, 1),
            "64 rows": (64, 128, 64, 0, 8, 4, 1), "256 columns": (128, 256, 64, 0, 8, 4, 1)}


def check(x: torch.Tensor, w: dg.DecodeWeight, cfg: dg.Config, ref: torch.Tensor) -> float | str:
    try:
        return dg.candidate_error(lambda: dg._launch(x, w, cfg).float(), ref)
    except Exception as exc:  # a candidate that does not compile here is reported, not fatal
        return type(exc).__name__


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--rows", default="8,16,64,128,256,512")
    ap.add_argument("--variants", action="store_true", help="The raced tile and its neighbours only.")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "rows": rows, "checked": 0, "failed": {}}
    start = time.monotonic()
    for name, (n, k) in PRODUCTS.items():
        torch.manual_seed(0)
        q, scale = quantize_fp8(torch.randn(n, k, device="cuda") * 0.02)
        dense = fp8_dequantize(q, scale, 0)
        for fragment in (True, False):
            w = dg.DecodeWeight.of(q, scale, 0, None)
            w = w.in_fragment_order() if fragment else w
            for m in rows:
                for x in (torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)):
                    ref = F.linear(x.float(), dense)
                    cands = VARIANTS.values() if args.variants else dg.with_tma(dg._candidates(m, k, w.group), w)
                    for cfg in cands:
                        err = check(x, w, cfg, ref)
                        out["checked"] += 1
                        if isinstance(err, str) or err > 1e-2:
                            key = f"{name} fragment={int(fragment)} m={m} {cfg}"
                            out["failed"].setdefault(key, []).append(err)
                            print("failed", key, err, flush=True)
            print(name, "fragment order" if fragment else "column order", out["checked"], "checked",
                  len(out["failed"]), "failed", f"{time.monotonic() - start:.0f} s", flush=True)
            with open(args.out, "w") as f:  # what is done so far survives a cut
                json.dump(out, f, indent=1)
        del q, scale, dense
        torch.cuda.empty_cache()
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
