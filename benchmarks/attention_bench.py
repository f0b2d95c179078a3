"""The split-K decode attention (``targets/torch/kernels.decode_attention``) alone, per layer kind, on the GPU.

Each case is a layer kind of a benchmarked model at B = 1 and a 1024-token context (Qwen3-8B: 8 KV heads of 128;
gemma-4-12B: its sliding layers' ring, 8 KV heads of 256, and its global layers, 1 KV head of 512) for a
target-only step (T = 1) and a verify block (T = 8). A CUDA graph runs the kernel over ``--layers`` distinct
caches, as a step does (each layer's cache is cold in L2), and the time per call is its replay time over the
layer count. Variants: slots per split (``chunk``; 0: ``split_chunk``'s choice), each output checked against the
first's. (The results of 2026-12-03 also varied the kernel's tile, warps and load order through arguments since
folded into ``decode_attention``'s rule: docs/BENCH.md, "Decode attention".)

    PYTHONPATH=. python benchmarks/attention_bench.py --out OUT [--chunks 16,32,64,128] [--layers 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from dspark_compile.targets.torch.decode_gemm import graph_ms
from dspark_compile.targets.torch.kernels import decode_attention, split_chunk

CASES = {"qwen3_8b": (32, 8, 128, False), "gemma4_sliding": (16, 8, 256, True), "gemma4_global": (16, 1, 512, False)}
"""name: (query heads, KV heads, head dim, ring)."""


def run_case(name: str, t: int, args: argparse.Namespace, variants: list[dict[str, Any]]) -> dict[str, Any]:
    hq, kvh, d, ring = CASES[name]
    context = args.context
    slots = context + 8 if ring else context + 16
    dev = "cuda"
    gen = torch.Generator(dev).manual_seed(0)
    caches = [(torch.randn(1, kvh, slots, d, device=dev, generator=gen, dtype=torch.bfloat16),
               torch.randn(1, kvh, slots, d, device=dev, generator=gen, dtype=torch.bfloat16))
              for _ in range(args.layers)]
    q = torch.randn(1, hq, t, d, device=dev, generator=gen, dtype=torch.bfloat16)
    pos = torch.arange(context - t, context, device=dev).view(1, t)
    limit = (pos + 1).contiguous()
    low = (pos - 1024 + 1).contiguous() if ring else None
    top = pos[:, -1:].expand(1, t).contiguous() if ring else None
    scale = d ** -0.5
    out: dict[str, Any] = {"default_chunk": split_chunk(kvh, torch.cuda.get_device_properties(0).multi_processor_count),
                           "kv_mb_per_layer": 2 * kvh * slots * d * 2 / 2**20, "variants": {}}
    ref = None
    for v in variants:
        def call(v: dict[str, Any] = v) -> list[torch.Tensor]:
            return [decode_attention(q, k, vv, limit, scale, low=low, ring_top=top, **v) for k, vv in caches]
        try:
            got = call()[0].float()
        except Exception as exc:  # a variant that does not compile or fit is reported, not fatal
            out["variants"][json.dumps(v)] = {"error": str(exc)[:200]}
            continue
        if ref is None:
            ref = got
        err = float((got - ref).abs().max() / ref.abs().max())
        launches = [lambda k=k, vv=vv, v=v: decode_attention(q, k, vv, limit, scale, low=low, ring_top=top, **v)
                    for k, vv in caches]
        out["variants"][json.dumps(v)] = {"us_per_call": graph_ms(launches, args.repeats) * 1e3,
                                          "rel_err_vs_first": err}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rows", default="1,8", help="query rows per request (T)")
    ap.add_argument("--chunks", default="0,16,32,64,128", help="slots per split (0: split_chunk's choice)")
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [{"chunk": int(c) or None} for c in args.chunks.split(",")]
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "context": args.context, "layers": args.layers, "cases": {}}
    for name in args.cases.split(","):
        for t in map(int, args.rows.split(",")):
            t0 = time.perf_counter()
            row = res["cases"][f"{name}_T{t}"] = run_case(name, t, args, variants)
            best = min((v for v in row["variants"].items() if "us_per_call" in v[1]), key=lambda v: v[1]["us_per_call"])
            base = row["variants"][json.dumps(variants[0])].get("us_per_call")
            print(f"{name} T={t}: default {base} us; best {best[1]['us_per_call']:.2f} us {best[0]} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            (args.out / "attention_bench.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
