"""Kernel boundaries of the decode step in isolation, on the GPU: chains of the step's own kernels captured in
one CUDA graph, timed per launch, with programmatic dependent launch off and on (``DSPARK_PDL`` 0 and 1,
``kernels.pdl_options``).

Chains (Qwen3-8B shapes, one row): 256 RMSNorms (a kernel with almost no work: the launch gap itself), and 36
layers' four e4m3 products back to back (the decode GEMM's gap and ramp between streamed weights). JSON on
stdout: µs per launch for each chain and mode.

    PYTHONPATH=. python benchmarks/launch_chain.py [--modes 0,1]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from dspark_compile.targets.torch import kernels
from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, graph_ms

HIDDEN, INTER, QKV, LAYERS = 4096, 12288, 6144, 36


def _fp8(n: int, k: int) -> DecodeWeight:
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.float8_e4m3fn)
    return DecodeWeight.of(w, torch.full((n,), 0.01, device="cuda"), k, None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="0,1")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    xi = torch.randn(1, INTER, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    layers = [(_fp8(QKV, HIDDEN), _fp8(HIDDEN, HIDDEN), _fp8(2 * INTER, HIDDEN), _fp8(HIDDEN, INTER))
              for _ in range(LAYERS)]
    for w in layers[0]:  # the timed choice of each shape, outside capture
        decode_linear(xi if w.weight.shape[1] == INTER else x, w)
    out: dict[str, dict[str, float]] = {}
    for mode in (int(m) for m in args.modes.split(",")):
        os.environ["DSPARK_PDL"] = str(mode)
        kernels._pdl_on.cache_clear()
        norms = [lambda: kernels.add_rmsnorm(x, None, norm_w, 1e-6)] * 256
        products = [lambda w=w: decode_linear(xi if w.weight.shape[1] == INTER else x, w)
                    for layer in layers for w in layer]
        out[f"pdl{mode}"] = {"rmsnorm_us": 1e3 * graph_ms(norms), "fp8_products_us": 1e3 * graph_ms(products),
                             "fp8_step_products_ms": graph_ms(products) * len(products)}
        print(json.dumps({f"pdl{mode}": out[f"pdl{mode}"]}), flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
