"""The decode GEMM's wide row class (129-1024 rows: B = 32 and 64's verifies) against the configuration the
17-1024-row class ran there before it, product by product, on the GPU: the Qwen3-8B products in e4m3 (weights in
fragment order, as the target stores them), at 256 and 512 rows, µs per launch as ``decode_gemm.candidate_ms``
ranks candidates (in a CUDA graph, each launch on its own copy of the weight), each result checked against the
dequantized product, and bf16 cuBLAS beside them. The old configuration comes from ``DSPARK_GEMM_CHOICES`` (a
card's committed choices file: its class 1 entries); the wide one is timed here, as a decode run would time it.

    cp benchmarks/results/gemm_choices_h200.json /tmp/c.json
    DSPARK_GEMM_CHOICES=/tmp/c.json PYTHONPATH=. python benchmarks/wide_class.py OUT.json [--budget-s 120]

docs/BENCH.md, "Wide products".
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

PRODUCTS = {"gate_up": (24576, 4096), "down": (4096, 12288), "qkv": (6144, 4096), "o": (4096, 4096),
            "lm_head": (151936, 4096)}
ROWS = (256, 512)


def product_row(n: int, k: int) -> dict[str, Any]:
    """One product: the old class-1 configuration and the wide choice at each row count, with their errors."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    q, scale = quantize_fp8(w)
    fw = dg.DecodeWeight.of(q, scale, 0, None).in_fragment_order()
    full = dg.DecodeWeight.full(w.to(torch.bfloat16))
    dense = fp8_dequantize(q, scale, 0)
    row: dict[str, Any] = {"n": n, "k": k}
    for handoff in (True, False):  # the choices file's entry for this product (a round hands most over)
        old = dg._CHOSEN.get((1, *dg._key(1024, fw, torch.bfloat16, handoff)[1:]))
        if old is not None:
            break
    row["handoff"], row["old_config"] = handoff, old
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), dense)
        new = dg._config(x, fw, handoff)  # the wide class's choice, timed at its row counts on first use
        row[f"new_config_m{m}"] = new
        for label, cfg in (("new", new), ("old", old)):
            if cfg is None:
                continue
            got = dg.decode_linear(x, fw, cfg).float()
            row[f"{label}_rel_err_m{m}"] = float((got - ref).abs().max() / ref.abs().max())
            row[f"{label}_us_m{m}"] = dg.candidate_ms(x, fw, cfg, handoff) * 1e3
        row[f"cublas_bf16_us_m{m}"] = dg.candidate_ms(x, full, dg.CUBLAS) * 1e3
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--budget-s", type=float, default=1e9, help="Stop starting products after this many seconds.")
    args = ap.parse_args()
    start = time.monotonic()
    dg._load_choices(torch.device("cuda"))
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "rows": ROWS, "products": {}}
    for name, (n, k) in PRODUCTS.items():
        if time.monotonic() - start > args.budget_s:
            out["cut"] = f"budget of {args.budget_s} s spent before {name}"
            break
        row = out["products"][name] = product_row(n, k)
        print(name, json.dumps({key: v for key, v in row.items() if "us" in key or "config" in key}), flush=True)
        with open(args.out, "w") as f:  # what is done so far survives a cut
            json.dump(out, f, indent=1)
    for m in ROWS:  # per layer (the four decoder products), where every one ran both
        layer = [out["products"][p] for p in ("qkv", "o", "gate_up", "down") if p in out["products"]]
        if len(layer) == 4 and all(f"old_us_m{m}" in r for r in layer):
            out[f"layer_us_m{m}"] = {label: sum(r[f"{label}_us_m{m}"] for r in layer)
                                     for label in ("old", "new", "cublas_bf16")}
            print(f"layer at {m} rows (µs):", out[f"layer_us_m{m}"], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
