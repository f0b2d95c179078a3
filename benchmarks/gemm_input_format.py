"""The decode GEMM's activation side, alone on the GPU: each Qwen3-8B e4m3 product at 1 and 8 rows, with its
input in bf16 (converted to fp16 × 2⁻⁸ in every K tile: conversion 2, as the timed choice runs it), already in
that fp16 form (no conversion in the loop: what ``kernels.as_gemm_input`` lets the product skip), and in bf16 with
Triton's own e4m3 → bf16 widening (conversion 0), at 4, 3 and 2 pipeline stages. The fp16 input runs the kernel's
conversion-0 path, whose instructions are those of a prescaled conversion 2 (one e4m3 → f16 per weight pair, no
activation conversion); its result times 2⁸ is checked against the bf16 input's, bit for bit
(``rel_err_f16_in``). µs per launch in a CUDA graph, each launch on its own copy of the weight (cold in L2).

    PYTHONPATH=. python benchmarks/gemm_input_format.py OUT.json [--repeats 2]

Results: ``benchmarks/results/gemm_f16_input_probe_h200.json``; docs/BENCH.md, "Products' inputs written in
their product's format".
"""

from __future__ import annotations

import argparse
import json

import torch

from dspark_compile.models.layers import quantize_fp8
from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, graph_ms

# (N, K) and the configuration the H200 rounds chose for one row (docs/BENCH.md)
PRODUCTS = {"qkv": ((6144, 4096), (16, 64, 128, 4, 4, 4, 2, 1)), "o": ((4096, 4096), (16, 64, 256, 2, 4, 4, 2, 1)),
            "gate_up": ((24576, 4096), (16, 64, 128, 2, 4, 4, 2, 1)),
            "down": ((4096, 12288), (16, 64, 128, 4, 4, 4, 2, 1))}


def _weight(n: int, k: int) -> DecodeWeight:
    q, scale = quantize_fp8(torch.randn(n, k, device="cuda") * 0.02)
    return DecodeWeight.of(q, scale, 0, None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict[str, dict[str, float]] = {}
    for rep in range(args.repeats):
        for m in (1, 8):
            for name, ((n, k), cfg) in PRODUCTS.items():
                weights = [_weight(n, k) for _ in range(max(1, min(16, (256 << 20) // (n * k))))]
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                x16 = (x.float() * 2**-8).half()
                row: dict[str, float] = {}
                for stages in (4, 3, 2):
                    conv2 = (*cfg[:5], stages, *cfg[6:])
                    conv0 = (*cfg[:5], stages, 0, *cfg[7:])
                    for label, inp, c in (("bf16_conv2", x, conv2), ("f16_in", x16, conv0), ("bf16_conv0", x, conv0)):
                        row[f"{label}_st{stages}"] = graph_ms(
                            [lambda w=w, inp=inp, c=c: decode_linear(inp, w, c) for w in weights] * 2) * 1e3
                ref = decode_linear(x, weights[0], cfg).float()
                got = decode_linear(x16, weights[0], (*cfg[:6], 0, *cfg[7:])).float() * 256
                row["rel_err_f16_in"] = float((got - ref).abs().max() / ref.abs().max())
                results[f"{name} M={m} rep{rep}"] = row
                print(name, m, {key: round(v, 2) for key, v in row.items()}, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
