"""SpecVerify Triton kernel on a GPU: correctness against reference.py, time against the memory floor.

    python benchmarks/spec_verify_gpu.py --out benchmarks/results --max-seconds 100   # on the H100, < 100 s
    python benchmarks/spec_verify_gpu.py --cpu-interpret --out /tmp/sv       # smoke test, no GPU

Sweep: B ∈ {1, 8, 64}, γ ∈ {1, 4, 7, 15}, V ∈ {384, 32000, 151936}, logits fp16/bf16/fp32, greedy and
sampling, fresh random inputs per configuration (``reference.random_inputs``). "The kernel" is
``spec_verify_triton``'s default split path (phase 1 over (request, row, vocabulary chunk), then the combine /
acceptance walk and the chunk-located draw); the single-program kernel the TensorRT plugin embeds is timed
beside it (``single_all_accepted_us``) for comparison. Per configuration:

* correctness — the kernel's ``(accepted, next_token)`` against ``spec_verify_reference`` (NumPy) on the first
  ``--reference-rows`` requests and against ``spec_verify_torch`` (same GPU) on all requests. Greedy must be
  identical. Sampling uses the same uniforms, so results must be identical too except at near-ties: a
  disagreement counts as explained when ``decision_margin`` < ``--tie-tol`` (float32 rounding of sums over
  V can move a decision by that much), otherwise as a failure.
* time — CUDA-event median of the kernel (all its launches) on the random inputs and on an all-accepted
  variant (every row read; the draw from p_ℓ needs no second read), beside ``spec_verify_torch`` and the
  single-program kernel for context. ``vs_floor`` = all-accepted time / floor (the goal: ≤ 1.3 at B=64, γ=7,
  V=151936); ``kernel_all_accepted_gpu_us`` / ``vs_floor_gpu``: the same call timed with the GPU kept busy
  while Python enqueues it, i.e. without host launch overhead (what the CUDA-graph backend pays). The memory
  floor is the logits' bytes read once divided by the device-to-device copy bandwidth measured in the same
  run (2 × bytes / time of a large ``torch`` copy: read + write).

Plus the split kernel's time for a few (chunk, num_warps) choices at the largest V (``tuning``), and a chi-square
test of losslessness: with drafts drawn from q, the first committed token (the first draft
if accepted, else the next token) must follow p_0 = softmax(logits_0 / T) exactly.

Writes ``<out>/<name>.json`` and ``<out>/<name>.png``. Exit status 1 when a check fails. Self-contained: torch,
triton, numpy, matplotlib and dspark_compile only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dspark_compile.plugins.spec_verify.reference import (
    decision_margin,
    random_inputs,
    spec_verify_reference,
    spec_verify_torch,
)

BATCHES = (1, 8, 64)
GAMMAS = (1, 4, 7, 15)
VOCABS = (384, 32000, 151936)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("greedy", "sampling")
Inputs = dict[str, torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    parser.add_argument("--name", default=None, help="file stem (default spec_verify_h100, or _cpu_interpret)")
    parser.add_argument("--cpu-interpret", action="store_true",
                        help="run on the CPU through TRITON_INTERPRET=1 with a tiny sweep (tests the script)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--gammas", type=int, nargs="+", default=None)
    parser.add_argument("--vocabs", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement")
    parser.add_argument("--reference-rows", type=int, default=4, help="requests checked with the NumPy reference")
    parser.add_argument("--tie-tol", type=float, default=1e-4, help="decision margin below which a sampling "
                        "disagreement counts as a float near-tie")
    parser.add_argument("--chi2-samples", type=int, default=200_000)
    parser.add_argument("--max-seconds", type=float, default=210.0,
                        help="stop starting new configurations after this long (the rest is listed as skipped)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.cpu_interpret
    args.batches = args.batches or ([3] if small else list(BATCHES))
    args.gammas = args.gammas or ([1, 4] if small else list(GAMMAS))
    args.vocabs = args.vocabs or ([40, 300] if small else list(VOCABS))
    args.dtypes = args.dtypes or list(DTYPES)
    args.name = args.name or ("spec_verify_cpu_interpret" if small else "spec_verify_h100")
    if small:
        args.reps, args.chi2_samples = min(args.reps, 2), min(args.chi2_samples, 3000)
    return args


def measure_us(fn: Callable[[], Any], device: torch.device, reps: int, gpu_only: bool = False) -> float:
    """Median wall time of ``fn`` in microseconds (CUDA events on a GPU, perf_counter otherwise).

    ``gpu_only``: keep the GPU busy (``torch.cuda._sleep``) while the host enqueues the start event and ``fn``'s
    launches, so the events time the GPU work alone (with its inter-kernel gaps) and not Python's launch
    overhead — what a CUDA-graph replay of the call costs.
    """
    for _ in range(2):  # compile / warm caches
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if gpu_only:
                torch.cuda._sleep(2_000_000)  # about 1 ms: longer than enqueuing a few launches
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return float(np.median(times))


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (measure_us(lambda: dst.copy_(src), device, 10) * 1e-6)


def all_accepted(inputs: Inputs, mode: str) -> Inputs:
    """Every draft accepted, so the kernel reads every row: the worst case for time."""
    x = dict(inputs)
    gamma = x["draft_tokens"].shape[1]
    x["verify_len"] = torch.full_like(x["verify_len"], gamma)
    if mode == "greedy":
        x["draft_tokens"] = x["target_logits"].float().argmax(-1)[:, :gamma]
    else:
        x["temperature"] = x["temperature"].clamp(min=0.5)
        x["uniforms"] = x["uniforms"].clone()
        x["uniforms"][:, :gamma] = 0.0
    return x


def _rows(inputs: Inputs, rows: torch.Tensor) -> Inputs:
    return {k: v[rows] for k, v in inputs.items()}


def compare(inputs: Inputs, mode: str, got: tuple[torch.Tensor, torch.Tensor],
            want: tuple[Any, Any], tie_tol: float) -> dict[str, int]:
    """Disagreements between two results, split into near-ties (explained) and the rest."""
    got_a, got_n = (np.asarray(t.cpu()) for t in got)
    want_a, want_n = (np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t) for t in want)
    bad = np.nonzero((got_a != want_a) | (got_n != want_n))[0]
    near = 0
    if bad.size and mode == "sampling":
        subset = _rows(inputs, torch.as_tensor(bad, device=inputs["verify_len"].device))
        near = int((decision_margin(**subset, mode=mode) < tie_tol).sum())
    return {"compared": int(got_a.size), "mismatches": int(bad.size), "near_ties": near,
            "unexplained": int(bad.size) - near}


def split_config(batch: int, gamma: int, vocab: int) -> dict[str, int]:
    # Imported late: kernel.py must be first imported after main() has set TRITON_INTERPRET.
    from dspark_compile.plugins.spec_verify.kernel import split_config as config

    return config(batch, gamma, vocab)


def run_config(kernel: Callable, mode: str, dtype: str, batch: int, gamma: int, vocab: int,
               args: argparse.Namespace, device: torch.device, bandwidth: float, seed: int) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = random_inputs(batch, gamma, vocab, mode=mode, generator=gen, device=device,
                           logits_dtype=DTYPES[dtype], greedy_row_prob=0.1)
    got = kernel(**inputs, mode=mode)
    rows = torch.arange(min(batch, args.reference_rows), device=device)
    sub = _rows(inputs, rows)
    vs_reference = compare(sub, mode, (got[0][rows], got[1][rows]),
                           spec_verify_reference(**sub, mode=mode), args.tie_tol)
    vs_torch = compare(inputs, mode, got, spec_verify_torch(**inputs, mode=mode), args.tie_tol)

    worst = all_accepted(inputs, mode)
    worst_got = kernel(**worst, mode=mode)
    single_got = kernel(**worst, mode=mode, single_program=True)
    vs_single = compare(worst, mode, single_got, worst_got, args.tie_tol)
    vs_torch_worst = compare(worst, mode, worst_got, spec_verify_torch(**worst, mode=mode), args.tie_tol)
    logits_bytes = inputs["target_logits"].numel() * inputs["target_logits"].element_size()
    kernel_all_us = measure_us(lambda: kernel(**worst, mode=mode), device, args.reps)
    kernel_gpu_us = measure_us(lambda: kernel(**worst, mode=mode), device, args.reps, gpu_only=device.type == "cuda")
    floor_us = logits_bytes / bandwidth * 1e6
    ok = all(c["unexplained"] == 0 for c in (vs_reference, vs_torch, vs_torch_worst, vs_single))
    return {
        "mode": mode, "dtype": dtype, "batch": batch, "gamma": gamma, "vocab": vocab,
        "logits_bytes": logits_bytes, "split": split_config(batch, gamma, vocab),
        "mean_accepted": float(got[0].float().mean()),
        "kernel_us": measure_us(lambda: kernel(**inputs, mode=mode), device, args.reps),
        "kernel_all_accepted_us": kernel_all_us,
        "kernel_all_accepted_gpu_us": kernel_gpu_us,
        "torch_all_accepted_us": measure_us(lambda: spec_verify_torch(**worst, mode=mode), device,
                                            max(2, args.reps // 4)),
        "single_all_accepted_us": measure_us(lambda: kernel(**worst, mode=mode, single_program=True), device,
                                             max(2, args.reps // 2)),
        "floor_us": floor_us,
        "floor_fraction": floor_us / kernel_all_us,
        "vs_floor": kernel_all_us / floor_us,
        "vs_floor_gpu": kernel_gpu_us / floor_us,
        "vs_reference": vs_reference, "vs_torch": vs_torch, "vs_torch_all_accepted": vs_torch_worst,
        "vs_single_program_all_accepted": vs_single,
        "ok": ok,
    }


def tune(kernel: Callable, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Split-kernel GPU time per (chunk, num_warps) at the largest vocabulary: data for choosing the defaults."""
    options = [(16, 4)] if args.cpu_interpret else [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8),
                                                    (8192, 16)]
    vocab, gamma, rows = max(args.vocabs), 7, []
    for mode in args.modes:
        for batch in sorted({min(args.batches), max(args.batches)}):
            for dtype in ("bf16", "fp32"):
                gen = torch.Generator(device=device).manual_seed(args.seed)
                inputs = all_accepted(random_inputs(batch, gamma, vocab, mode=mode, generator=gen, device=device,
                                                    logits_dtype=DTYPES[dtype]), mode)
                for chunk, num_warps in options:
                    us = measure_us(lambda: kernel(**inputs, mode=mode, chunk=chunk, num_warps=num_warps),  # noqa: B023
                                    device, args.reps, gpu_only=device.type == "cuda")
                    rows.append({"mode": mode, "batch": batch, "gamma": gamma, "vocab": vocab, "dtype": dtype,
                                 "chunk": chunk, "num_warps": num_warps, "all_accepted_gpu_us": us,
                                 "default_chunk": split_config(batch, gamma, vocab)["chunk"]})
    return rows


def chi2_pvalue(stat: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson–Hilferty normal approximation; no scipy here)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi_square_first_token(kernel: Callable, n: int, device: torch.device, seed: int,
                           vocab: int = 16, gamma: int = 4, temperature: float = 0.8) -> dict[str, Any]:
    """The first committed token of n independent rounds over one fixed set of logits must follow p_0."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(1, gamma + 1, vocab, generator=gen, device=device) * 1.5
    noisy = base[:, :gamma] + torch.randn(1, gamma, vocab, generator=gen, device=device)
    logits = base.expand(n, -1, -1).contiguous()
    q = torch.softmax(noisy / temperature, dim=-1).expand(n, -1, -1).contiguous()
    drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).reshape(n, gamma)
    temps = torch.full((n,), temperature, device=device)
    result = {}
    for ell in (gamma, 0):
        accepted, next_token = kernel(
            logits, drafts, torch.full((n,), ell, device=device), mode="sampling", draft_probs=q,
            temperature=temps, uniforms=torch.rand(n, gamma + 1, generator=gen, device=device))
        first = torch.where(accepted >= 1, drafts[:, 0], next_token)
        observed = torch.bincount(first, minlength=vocab).double().cpu().numpy()
        p0 = torch.softmax(logits[0, 0].double() / temperature, -1).cpu().numpy()
        stat = float(((observed - n * p0) ** 2 / (n * p0)).sum())
        result[f"verify_len_{ell}"] = {"chi2": stat, "dof": vocab - 1, "p_value": chi2_pvalue(stat, vocab - 1),
                                       "mean_accepted": float(accepted.float().mean())}
    result["ok"] = all(r["p_value"] > 1e-3 for r in result.values() if isinstance(r, dict))
    return result


def plot(records: list[dict[str, Any]], bandwidth: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colors = {"fp16": "tab:blue", "bf16": "tab:orange", "fp32": "tab:green"}
    for ax, mode in zip(axes, MODES, strict=True):
        rs = [r for r in records if r["mode"] == mode]
        for dtype, color in colors.items():
            sel = [r for r in rs if r["dtype"] == dtype]
            ax.scatter([r["logits_bytes"] / 1e6 for r in sel], [r["kernel_all_accepted_us"] for r in sel],
                       s=18, color=color, label=f"kernel {dtype}")
            ax.scatter([r["logits_bytes"] / 1e6 for r in sel], [r["torch_all_accepted_us"] for r in sel],
                       s=10, color=color, marker="x", alpha=0.4)
            ax.scatter([r["logits_bytes"] / 1e6 for r in sel], [r["single_all_accepted_us"] for r in sel],
                       s=14, color=color, marker="+", alpha=0.4)
        sizes = [r["logits_bytes"] / 1e6 for r in records]
        mb = np.geomspace(min(sizes), max(sizes), 50)
        ax.plot(mb, mb * 1e6 / bandwidth * 1e6, "k--", label=f"floor ({bandwidth / 1e9:.0f} GB/s copy)")
        ax.set(xscale="log", yscale="log", title=f"{mode} (all accepted; x = torch, + = single-program kernel)",
               xlabel="logits read (MB)", ylabel="time (µs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton's @jit runs, i.e. at kernel import below
    import triton

    from dspark_compile.plugins.spec_verify.kernel import spec_verify_triton

    device = torch.device("cpu" if args.cpu_interpret else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-interpret", file=sys.stderr)
        return 2
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device, (1 << 20) if args.cpu_interpret else (1 << 30))
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    configs = [(m, d, b, g, v) for m in args.modes for d in args.dtypes for v in args.vocabs
               for b in args.batches for g in args.gammas]
    for index, (mode, dtype, batch, gamma, vocab) in enumerate(configs):
        if time.perf_counter() - started > args.max_seconds:
            skipped.append({"mode": mode, "dtype": dtype, "batch": batch, "gamma": gamma, "vocab": vocab})
            continue
        record = run_config(spec_verify_triton, mode, dtype, batch, gamma, vocab, args, device, bandwidth,
                            args.seed + index)
        records.append(record)
        print(f"{mode:8s} {dtype} B={batch:3d} G={gamma:2d} V={vocab:6d}"
              f"  kernel {record['kernel_all_accepted_us']:8.1f} us  floor {record['floor_us']:7.1f} us"
              f" ({record['vs_floor']:5.2f}x, gpu {record['vs_floor_gpu']:5.2f}x)"
              f"  single {record['single_all_accepted_us']:8.1f} us"
              f"  torch {record['torch_all_accepted_us']:8.1f} us  {'ok' if record['ok'] else 'MISMATCH'}",
              flush=True)
    chi2 = chi_square_first_token(spec_verify_triton, args.chi2_samples, device, args.seed)
    tuning = tune(spec_verify_triton, args, device)
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "cpu_interpret": args.cpu_interpret,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "tie_tol": args.tie_tol,
        "seconds": time.perf_counter() - started,
        "chi_square_first_token": chi2,
        "tuning": tuning,
        "configs": records,
        "skipped": skipped,
        "all_ok": all(r["ok"] for r in records) and chi2["ok"] and not skipped,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.name}.json"
    json_path.write_text(json.dumps(summary, indent=1))
    plot(records, bandwidth, args.out / f"{args.name}.png")
    print(f"wrote {json_path} and {args.name}.png; all_ok={summary['all_ok']} in {summary['seconds']:.0f} s")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
