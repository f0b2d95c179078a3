"""Where an e4m3 decode product's time goes, alone on the GPU: each Qwen3-8B product (q|k|v, o, gate|up, down, LM
head) against its byte floor, a plain read of the same bytes (the least any kernel pays to stream them), the timed
choice's configuration, a sweep of configurations (fp16 product, TMA and per-thread copies), the product with its
split-K partials left to a consumer (``handoff``: no last-program reduction) against the product summing them
itself, and bf16 cuBLAS. µs per launch in a CUDA graph, each launch on its own copy of the weight (cold in L2), as
``decode_gemm.candidate_ms`` ranks candidates.

    PYTHONPATH=. python benchmarks/gemm_sweep.py OUT.json [--shapes qkv,o] [--budget-s 330]
    PYTHONPATH=. python benchmarks/gemm_sweep.py OUT.json --rows 128,512,64   # the 17-1024-row class instead

``--rows``: the products at verify-block and batch row counts (B = 16's verify: 128, B = 64's: 512, its step: 64),
each candidate of a wider set of larger-row configurations (:func:`large_sweep_configs`: 256-row tiles, K tiles of
64, the fp16 product) against the timed choice among today's ``LARGE_CONFIGS`` and bf16 cuBLAS. The candidates
are compiled first in worker processes (one per CPU core), so the budget goes to timing them.

Results: ``benchmarks/results/gemm_sweep_h200.json`` and ``gemm_tail_h200.json`` (the two probes this script was
written from; the second also timed PDL off and a stand-in without activation loads, which are not kept here, and
their copy bandwidth was the mean of ten copies where this script takes ``bench.measure_copy_bandwidth``'s median);
docs/BENCH.md, "Where an e4m3 product's time goes".
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

import torch
import triton
import triton.language as tl
from torch.nn import functional as F
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from dspark_compile.targets.torch import decode_gemm as dg
from dspark_compile.targets.torch.bench import byte_floor_ms, measure_copy_bandwidth

PRODUCTS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
            "lm_head": (151936, 4096)}


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _stream_kernel(w_ptr, o_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Reads CHUNK int32 words per program and keeps one word: the bytes streamed, nothing else."""
    base = w_ptr + tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), tl.int32)
    for off in range(0, CHUNK, BLOCK):
        acc ^= tl.load(base + off + tl.arange(0, BLOCK))
    tl.store(o_ptr + tl.program_id(0), tl.reduce(acc, 0, _xor))


def stream_us(weight: torch.Tensor, programs: int, block: int, warps: int) -> float | None:
    """µs to read ``weight`` with ``programs`` programs of ``warps`` warps, ``block`` words per load; None where
    the words do not split evenly."""
    n = weight.numel() // 4
    chunk = -(-n // programs)
    chunk = -(-chunk // block) * block
    if n % chunk:
        return None
    words = [c.view(torch.int32).view(-1) for c in dg.weight_copies(weight)]
    out = torch.empty(n // chunk, dtype=torch.int32, device="cuda")
    return 1e3 * dg.rotated_ms([lambda w=w: _stream_kernel[(n // chunk,)](w, out, CHUNK=chunk, BLOCK=block,
                                                                           num_warps=warps) for w in words])


def sweep_configs() -> list[dg.Config]:
    """fp16-product configurations at up to 16 rows whose stages fit the kernel's shared memory budget."""
    out = []
    for bn, bk, per_sm, warps, stages, tma in itertools.product((64, 128, 256), (128, 256), (0, 1, 2, 3, 4, 6, 8),
                                                               (4, 8), (2, 3, 4, 6), (0, 1)):
        fits = (bn * bk + 16 * bk * 2) * stages <= dg.SMEM_BYTES and not (bk == 256 and stages > 4)
        if fits and (bn == 256) == (warps == 8):
            out.append((16, bn, bk, per_sm, warps, stages, 2, tma))
    return out


def large_sweep_configs() -> list[dg.Config]:
    """Configurations for 17-1024 rows beyond ``LARGE_CONFIGS``: (BLOCK_N, BLOCK_M, warps) tiles up to 256 rows,
    K tiles of 64 and 128, both widenings (1: bf16, 2: the fp16 product), TMA or per-thread copies, with the
    accumulator at most 128 float32 registers a thread and the stages fitted to shared memory."""
    out = []
    for (bn, bm, warps), bk, stages, conv, tma in itertools.product(
            ((128, 64, 4), (128, 128, 4), (128, 128, 8), (256, 64, 8), (64, 128, 4), (128, 256, 8), (256, 128, 8),
             (64, 256, 4)), (64, 128), (3, 4), (1, 2), (0, 1)):
        stages = max(2, min(stages, dg.SMEM_BYTES // (bn * bk + bm * bk * 2)))
        out.append((bm, bn, bk, 0, warps, stages, conv, tma))
    return list(dict.fromkeys(out))


def _warm(job: tuple[int, int, int, list[dg.Config]]) -> int:
    """Compiles ``job``'s configurations for an (M, N, K) product in a worker process (each launch compiles as the
    parent's will: the same specializations), so that the parent's timing finds them in Triton's cache."""
    m, n, k, cfgs = job
    w = dg.DecodeWeight.of(torch.zeros(n, k, device="cuda").to(torch.float8_e4m3fn),
                           torch.ones(n, device="cuda"), k, None)
    x = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
    done = 0
    for cfg in cfgs:
        for per_sm in (0, 1):
            try:
                dg._launch(x, w, (*cfg[:3], per_sm, *cfg[4:]))
                done += 1
            except (OutOfResources, CompilationError, RuntimeError):
                pass
    torch.cuda.synchronize()
    return done


def rows_sweep(rows: list[int], names: list[str], bandwidth: float, budget_s: float) -> dict[str, Any]:
    """µs per launch of each product at each row count: the timed choice (today's candidates), every
    :func:`large_sweep_configs` candidate at 0, 1 and 2 programs per SM (checked against the plain-conversion
    reference within 1 %), bf16 cuBLAS, and the byte and bf16-FLOP floors."""
    import multiprocessing as mp

    cfgs = large_sweep_configs()
    workers = max(1, (mp.cpu_count() or 2) - 1)
    jobs = [(rows[0], *PRODUCTS["qkv"], cfgs[i::workers]) for i in range(workers)]  # q|k|v splits at 1 per SM
    with mp.get_context("spawn").Pool(workers) as pool:
        compiled = sum(pool.map(_warm, jobs))
    out: dict[str, Any] = {"configs": len(cfgs), "compiled_in_workers": compiled}
    t0 = time.time()
    for m in rows:
        for name in names:
            n, k = PRODUCTS[name]
            torch.manual_seed(0)
            w = dg.DecodeWeight.of((torch.randn(n, k, device="cuda") * 0.05).to(torch.float8_e4m3fn),
                                   torch.rand(n, device="cuda") * 0.01 + 0.001, k, None)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row: dict[str, Any] = {"floor_us": byte_floor_ms(w.weight.nbytes, bandwidth) * 1e3,
                                   "bf16_flop_floor_us": 2 * m * n * k / 790e12 * 1e6}
            chosen = dg._config(x, w)
            row["chosen"], row["chosen_us"] = list(chosen), dg.candidate_ms(x, w, chosen) * 1e3
            wide = (torch.randn(n, k, device="cuda") * 0.05).to(torch.bfloat16)
            row["cublas_bf16_us"] = 1e3 * dg.rotated_ms([lambda b=b, x=x: F.linear(x, b)
                                                         for b in dg.weight_copies(wide)])
            reference = dg._launch(x, w, (64, 128, 128, 0, 4, 3, 0)).float()
            timed, seen = [], set()
            for cfg in cfgs:
                for per_sm in (0, 1, 2):
                    c = (*cfg[:3], per_sm, *cfg[4:])
                    splits = dg.split_k(n, k, k, c, torch.cuda.get_device_properties(0).multi_processor_count)
                    if time.time() - t0 > budget_s * (rows.index(m) + 1) / len(rows) or (cfg, splits) in seen:
                        continue  # each row count gets its share of the budget; equal splits are one kernel
                    seen.add((cfg, splits))
                    try:
                        got = dg._launch(x, w, c).float()
                    except (OutOfResources, CompilationError, RuntimeError):
                        continue
                    if float((got - reference).abs().max() / reference.abs().max()) <= 1e-2:
                        timed.append((round(dg.candidate_ms(x, w, c) * 1e3, 2), c))
            timed.sort()
            row["sweep_top"] = [(us, list(c)) for us, c in timed[:8]]
            row["sweep_all"] = [(us, list(c)) for us, c in timed]
            out[f"{name}_m{m}"] = row
            print(f"{name} M={m}: chosen {row['chosen_us']:.1f} us, best {timed[0] if timed else None}, cuBLAS bf16 "
                  f"{row['cublas_bf16_us']:.1f}, floors {row['floor_us']:.1f}/{row['bf16_flop_floor_us']:.1f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return out


def plot_rows(res: dict[str, Any], png: str) -> None:
    """µs per product and row count (``--rows``): the byte and bf16-FLOP floors, the timed choice, the sweep's best
    and bf16 cuBLAS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, v in res.items() if isinstance(v, dict) and "sweep_top" in v]
    series = {"byte floor": "floor_us", "bf16 FLOP floor": "bf16_flop_floor_us", "timed choice": "chosen_us",
              "sweep best": None, "bf16 cuBLAS": "cublas_bf16_us"}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.16
    for i, (label, field) in enumerate(series.items()):
        values = [res[k]["sweep_top"][0][0] if field is None else res[k][field] for k in keys]
        ax.bar([j + (i - 2) * width for j in range(len(keys))], values, width, label=label)
    ax.set_xticks(range(len(keys)), [k.replace("_m", "\nM=") for k in keys], fontsize=8)
    ax.set_ylabel("µs per launch (cold weight)")
    ax.set_title(f"Qwen3-8B e4m3 products, 17-1024-row class, {res.get('device', 'GPU')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot(res: dict[str, Any], png: str, tails: dict[str, Any] | None = None) -> None:
    """µs per product: floor, plain read, the timed choice, the sweep's best and that one handing off. Reads this
    script's fields, or the probes' (``chosen_us_M8``; ``tails``: ``gemm_tail_h200.json``'s ``best_handoff``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PRODUCTS if n in res and n != "lm_head"]
    series: dict[str, list[float]] = {"byte floor": [], "plain read": [], "timed choice": [], "sweep best": [],
                                      "sweep best, handed off": []}
    for n in names:
        row = res[n]
        series["byte floor"].append(row["floor_us"])
        series["plain read"].append(row["stream_best"][0][1] if row["stream_best"] else float("nan"))
        series["timed choice"].append(row.get("chosen_us_handoff0", row.get("chosen_us_M8", float("nan"))))
        series["sweep best"].append(row["sweep_top"][0][0])
        handed = row.get("best_handoff_us", (tails or {}).get(n, {}).get("best_handoff", float("nan")))
        series["sweep best, handed off"].append(handed)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.16
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + (i - 2) * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("µs per launch (8 rows, cold weight)")
    ax.set_title(f"Qwen3-8B e4m3 products, {res.get('device', 'GPU')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shapes", default=",".join(PRODUCTS))
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop sweeping once this much time has passed")
    ap.add_argument("--rows", default="", help="row counts over 16: sweep the larger-row class instead")
    args = ap.parse_args()
    bandwidth = measure_copy_bandwidth("cuda")
    if args.rows:
        names = [n for n in args.shapes.split(",") if n != "lm_head"]
        res = {"device": torch.cuda.get_device_name(), "copy_bw_GBs": bandwidth / 1e9,
               **rows_sweep([int(r) for r in args.rows.split(",")], names, bandwidth, args.budget_s)}
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        plot_rows(res, args.out.removesuffix(".json") + ".png")
        return 0
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_bw_GBs": bandwidth / 1e9}
    t0 = time.time()
    for name in args.shapes.split(","):
        n, k = PRODUCTS[name]
        torch.manual_seed(0)
        w = dg.DecodeWeight.of((torch.randn(n, k, device="cuda") * 0.05).to(torch.float8_e4m3fn),
                               torch.rand(n, device="cuda") * 0.01 + 0.001, k, None)
        weights = [dg.replace(w, weight=c) for c in dg.weight_copies(w.weight)]
        row: dict[str, Any] = {"floor_us": byte_floor_ms(w.weight.nbytes, bandwidth) * 1e3}
        x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
        for handoff in (False, True):
            cfg = dg._config(x, w, handoff)
            row[f"chosen_handoff{int(handoff)}"] = list(cfg)
            row[f"chosen_us_handoff{int(handoff)}"] = dg.candidate_ms(x, w, cfg, handoff) * 1e3
        reference = dg._launch(x, w, (16, 128, 128, 0, 4, 3, 0)).float()
        timed = []
        for cfg in sweep_configs()[:: 3 if name == "lm_head" else 1]:
            if time.time() - t0 > args.budget_s:
                break
            try:
                got = dg._launch(x, w, cfg).float()
            except (OutOfResources, CompilationError):
                continue
            if float((got - reference).abs().max() / reference.abs().max()) <= 1e-2:
                timed.append((dg.candidate_ms(x, w, cfg) * 1e3, cfg))
        timed.sort()
        row["sweep_top"] = [(round(us, 2), list(cfg)) for us, cfg in timed[:8]]
        row["sweep_n"] = len(timed)
        for _, cfg in timed[:1]:  # the sweep's best, its reduction left to a consumer
            row["best_handoff_us"] = 1e3 * dg.rotated_ms([lambda c=c, cfg=cfg, x=x: dg._launch(x, c, cfg, True)
                                                          for c in weights])
            row["best_programs"] = triton.cdiv(n, cfg[1]) * dg.split_k(n, k, k, cfg, sms)[1]
        streams = {f"{mult}x{block}w{warps}": stream_us(w.weight, sms * mult, block, warps)
                   for mult, block, warps in itertools.product((1, 2, 4, 8, 16), (2048, 4096, 8192), (4, 8))}
        row["stream_best"] = sorted(((key, round(v, 2)) for key, v in streams.items() if v is not None),
                                    key=lambda kv: kv[1])[:5]
        wide = (torch.randn(n, k, device="cuda") * 0.05).to(torch.bfloat16)
        row["cublas_bf16_us"] = 1e3 * dg.rotated_ms([lambda b=b, x=x: F.linear(x, b) for b in dg.weight_copies(wide)])
        row["bf16_floor_us"] = byte_floor_ms(wide.nbytes, bandwidth) * 1e3
        results[name] = row
        print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out.removesuffix(".json") + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
