"""W8A8 products through cuBLAS (``decode_gemm.SCALED_MM``: ``torch._scaled_mm`` with 1 × 128 block scales on both
operands) against the decode GEMM's fastest W8A8 kernel configuration and bf16 cuBLAS, product by product, on a
Hopper GPU: the Qwen3-8B products at 32-512 rows, µs per launch as ``decode_gemm.candidate_ms`` ranks candidates (in
a CUDA graph, each launch on its own copy of the weight), the activations' quantization (``e4m3_rows``) included in
both e4m3 columns, each result's error against the product of the same e4m3 activations in float32. Rowwise
``_scaled_mm`` (one scale per row: other numerics, not a candidate) is timed beside them for scale. JSON and PNG.

    cp benchmarks/results/gemm_choices_h100.json /tmp/c.json
    DSPARK_GEMM_CHOICES=/tmp/c.json PYTHONPATH=. python benchmarks/w8a8_cublas.py OUT.json [--rows 64,512]
    python benchmarks/w8a8_cublas.py OUT.json --plot-only   # the PNG again from the JSON

docs/BENCH.md, "W8A8 through cuBLAS".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PRODUCTS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
            "lm_head": (151936, 4096)}
GROUP = 128


def product_rows(n: int, k: int, rows: list[int]) -> dict[str, dict[str, Any]]:
    """One product at each row count: cuBLAS's block-scaled e4m3 product, the kernel's timed W8A8 choice, rowwise
    ``_scaled_mm`` and bf16 cuBLAS, µs per launch, with the two block-scaled products' errors."""
    import torch
    from torch.nn import functional as F

    from dspark_compile.models.layers import quantize_fp8
    from dspark_compile.targets.torch import decode_gemm as dg

    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, scale = quantize_fp8(w)
    fw = dg.DecodeWeight.of(q, scale, 0, None, GROUP)
    dense = q.float() * scale[:, None]
    copies = dg.weight_copies(q)
    out = {}
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = dg.e4m3_rows(x, GROUP)
        ref = (xq.float() * xs.repeat_interleave(GROUP, 1)) @ dense.t()
        cfg = dg._config(x, fw)

        def err(t: torch.Tensor, ref: torch.Tensor = ref) -> float:
            return float((t.float() - ref).abs().max() / ref.abs().max())

        row: dict[str, Any] = {"choice": list(cfg), "scaled_mm_err": err(dg.decode_linear(x, fw, dg.SCALED_MM))}
        row["scaled_mm_us"] = 1e3 * dg.candidate_ms(x, fw, dg.SCALED_MM)
        kernel, best = None, float("inf")  # the kernel's fastest right candidate at this row count
        for c in dg.with_tma(dg._candidates(m, k, fw.group, 1, GROUP), fw):
            try:
                if err(dg.decode_linear(x, fw, c)) > 1e-2:
                    continue
                t = dg.candidate_ms(x, fw, c)
            except Exception:  # a configuration that does not compile here (shared memory)
                continue
            if t < best:
                kernel, best = c, t
        assert kernel is not None, "no kernel configuration compiled"
        row["kernel_config"] = list(kernel)
        row["kernel_err"] = err(dg.decode_linear(x, fw, kernel))
        row["kernel_us"] = 1e3 * best
        sa, sb = xs[:, :1].contiguous(), scale[None, :].contiguous()
        row["rowwise_scaled_mm_us"] = 1e3 * dg.rotated_ms(
            [lambda c=c, x=x, sa=sa, sb=sb: torch._scaled_mm(dg.e4m3_rows(x, GROUP)[0], c.t(), scale_a=sa, scale_b=sb,
                                                             out_dtype=torch.bfloat16) for c in copies])
        row["bf16_cublas_us"] = 1e3 * dg.rotated_ms([lambda c=c, x=x: F.linear(x, c) for c in dg.weight_copies(w)])
        out[str(m)] = row
        print(n, k, m, {a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}, flush=True)
    return out


def plot(data: dict[str, Any], path: Path) -> None:
    """Per row count, a layer's four products summed (and the LM head apart), µs, for each product form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({int(m) for p in data["products"].values() for m in p}, key=int)
    forms = (("scaled_mm_us", "cuBLAS e4m3, 1x128 blocks (SCALED_MM)"),
             ("kernel_us", "decode GEMM W8A8 (timed choice)"), ("bf16_cublas_us", "bf16 cuBLAS"),
             ("rowwise_scaled_mm_us", "cuBLAS e4m3 rowwise (other numerics)"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, names, title in ((axes[0], ("qkv", "o", "gate_up", "down"), "a layer (q|k|v + o + gate|up + down)"),
                             (axes[1], ("lm_head",), "LM head (151936 x 4096)")):
        for key, label in forms:
            ax.plot(rows, [sum(data["products"][p][str(m)][key] for p in names) for m in rows], marker="o",
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(rows, [str(m) for m in rows])
        ax.set_xlabel("rows")
        ax.set_ylabel("µs per launch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"W8A8 products, {data['gpu']}, torch {data['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", default="32,64,128,256,512")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if not args.plot_only:
        import torch

        data: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "products": {}}
        for name, (n, k) in PRODUCTS.items():
            data["products"][name] = product_rows(n, k, [int(r) for r in args.rows.split(",")])
            torch.cuda.empty_cache()
        args.out.write_text(json.dumps(data, indent=1) + "\n")
    plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
