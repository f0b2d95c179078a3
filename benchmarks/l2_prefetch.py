"""Bulk L2 prefetch (``kernels.prefetch_l2``) ahead of the decode GEMM on the GPU, alone: for each of a layer's
products at one row (e4m3 weights, each launch on its own copy, cold in L2 as in a decode step), GPU µs per
[prefetch] → window → product in one CUDA graph, where the window is a spin kernel of a few microseconds standing
in for the small kernels between two products. The product's time is the iteration's less the same sequence
without the product. The outputs with and without the prefetch are compared bit for bit in the same run. JSON
on stdout.

    PYTHONPATH=. python benchmarks/l2_prefetch.py [--windows 0,3,6,10] [--programs 132,32,8]
"""

from __future__ import annotations

import argparse
import json

import torch

from dspark_compile.models.layers import quantize_fp8
from dspark_compile.targets.torch.bench import QWEN3_8B, byte_floor_ms, measure_copy_bandwidth
from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, graph_ms
from dspark_compile.targets.torch.kernels import prefetch_l2

ROTATION_BYTES = 512 << 20  # ten times the L2: every copy is cold when its turn comes


def cycles_per_us() -> float:
    """The spin kernel's clock, from its own duration in a graph."""
    n = 200_000
    return n / (graph_ms([lambda: torch.cuda._sleep(n)] * 4) * 1e3)


def window_us(copies: list[DecodeWeight], x: torch.Tensor, spin: int, args: argparse.Namespace) -> dict[str, float]:
    """µs of the product after a ``spin``-cycle window, with no prefetch and with each (programs, fraction)."""

    def seq(c: DecodeWeight, pf: tuple[int, float] | None, gemm: bool) -> None:
        if pf:
            prefetch_l2([(c.weight, int(c.weight.nbytes * pf[1]))], programs=pf[0])
        if spin:
            torch.cuda._sleep(spin)
        if gemm:
            decode_linear(x, c)

    def us(pf: tuple[int, float] | None, gemm: bool) -> float:
        return graph_ms([lambda c=c: seq(c, pf, gemm) for c in copies]) * 1e3

    cell = {"none": us(None, True) - us(None, False)}
    for programs in [int(v) for v in args.programs.split(",")]:
        for frac in [float(v) for v in args.fractions.split(",")]:
            pf = (programs, frac)
            cell[f"pf{programs}_{frac:g}"] = us(pf, True) - us(pf, False)
    return cell


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", default="0,3,6,10", help="µs of spin between the prefetch and the product")
    ap.add_argument("--programs", default="132,32,8", help="prefetch programs (one warp each)")
    ap.add_argument("--fractions", default="1,0.5", help="fractions of the weight prefetched")
    args = ap.parse_args()
    s = QWEN3_8B
    h, q, kv = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    shapes = {"o": (h, q), "qkv": (q + 2 * kv, h), "gate_up": (2 * s.intermediate_size, h),
              "down": (h, s.intermediate_size)}
    bandwidth = measure_copy_bandwidth("cuda")
    clock = cycles_per_us()
    out: dict[str, object] = {"device": torch.cuda.get_device_name(), "copy_gbps": bandwidth / 1e9,
                              "spin_cycles_per_us": clock, "products": {}}
    for name, (n, k) in shapes.items():
        w, scale = quantize_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        copies = [DecodeWeight.of(w.clone(), scale, 0, None) for _ in range(max(2, ROTATION_BYTES // w.nbytes))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = decode_linear(x, copies[0])
        same = all(torch.equal(decode_linear(x, c), ref) for c in copies[:2])
        row: dict[str, object] = {"mb": w.nbytes / 2**20, "floor_us": byte_floor_ms(w.nbytes, bandwidth) * 1e3}
        for win in [float(v) for v in args.windows.split(",")]:
            cell = window_us(copies, x, int(win * clock), args)
            row[f"window_{win:g}us"] = {key: round(v, 2) for key, v in cell.items()}
        prefetch_l2([(copies[1].weight, copies[1].weight.nbytes)])
        same = same and torch.equal(decode_linear(x, copies[1]), ref)
        row["identical_outputs"] = same
        out["products"][name] = row  # type: ignore[index]
        print(name, json.dumps(row), flush=True)
        del copies
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
