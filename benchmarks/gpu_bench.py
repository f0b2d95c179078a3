"""Torch target on a GPU (issue 7): CUDA-graph decode speed of a Qwen3-8B-shaped pair and of the trained tiny pair.

    python benchmarks/gpu_bench.py --out $OUT --trained runs/tiny       # on the H100, one command, < 9 minutes
    python benchmarks/gpu_bench.py --out /tmp/gb --smoke                 # any machine (CPU too), seconds

Sections, in this order; once ``--max-seconds`` have passed no new section (or batch) starts and the rest is
listed under ``skipped``:

1. ``8b`` — Qwen3-8B-shaped random bf16 weights built on the GPU (γ = 7, 5-layer draft, Markov rank 256):
   T_target(1), T_verify(γ+1), T_draft, overhead ratio and T_target over its byte floor, per batch.
2. ``trained`` (with ``--trained DIR``: DIR/target, DIR/draft, DIR/draft_nomarkov, DIR/heldout.jsonl from
   examples/tiny_pair/train.py) — the same step times plus greedy decoding of the held-out prompts: τ,
   tokens/s speculative vs target-only, their ratio over τ; for the Markov draft and its no-Markov ablation.
3. ``sps`` — SPS(B) of the 8B-shaped verify graph, B = 1..γ+1 tokens then multiples of γ+1 up to
   ``--sps-max-batch`` requests (the scheduler's cost table, ``profile_sps`` format).
4. ``e2e`` — the 8B shape decoding a ``--context``-token random prompt at batch 1 through the host loop,
   target-only and speculative (random weights: τ ≈ 1, so this shows the round's real overhead).
5. ``variants`` — T_target(1) at batch 1 for each implementation choice: attention (SDPA, the split-K
   Triton kernel, float32 reference), fused Triton kernels vs module ops, attention window bucketed vs the
   whole cache, CUDA graphs vs eager.

Writes into ``--out`` (flat): summary.json (everything, goals, skipped sections, errors), bench_8b.json,
trained.json, sps_8b.json, sps_8b.png, bench.png. Exit status 1 when a section failed. Needs torch (+ triton
on CUDA), numpy, safetensors; matplotlib for the plots (skipped without it). Imports neither click nor rich.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dspark_compile.program import build_program
from dspark_compile.runtime.decode import GenerationParams, generate, read_prompt_file
from dspark_compile.targets.torch.bench import (
    QWEN3_8B,
    SMOKE,
    byte_floor_ms,
    measure_copy_bandwidth,
    profile_kernels,
    random_pair,
    rounds_bench,
    run_bench,
    step_times,
    target_bytes,
)
from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend
from dspark_compile.tools.profile_sps import SpsProfile, plot_profile, profile_sps

GOALS = {  # issue 10; key -> (section, batch, path in that batch's numbers, op, bound)
    "overhead_ratio_b1": ("rounds", 1, ("overhead_ratio_round",), "<=", 1.30),
    "overhead_ratio_b16": ("rounds", 16, ("overhead_ratio_round",), "<=", 1.45),
    "overhead_ratio_b64": ("rounds", 64, ("overhead_ratio_round",), "<=", 2.0),
    "target_vs_floor_b1": ("rounds", 1, ("target_vs_floor_round",), "<=", 1.20),
    "host_ms_per_round_b1": ("rounds", 1, ("speculative", "host_ms_per_round"), "<=", 0.15),
    "host_ms_per_round_b64": ("rounds", 64, ("speculative", "host_ms_per_round"), "<=", 0.5),
    "replay_b_speedup_b1": ("rounds", 1, ("replay_b", "speedup"), ">=", 3.3),
    "replay_a_speedup_b1": ("rounds", 1, ("replay_a", "speedup"), ">=", 4.3),
    "replay_b_speedup_b64": ("rounds", 64, ("replay_b", "speedup"), ">=", 1.6),
    "lossless_b1": ("rounds", 1, ("speculative", "identical_to_target_only"), ">=", 1.0),
    "lossless_b16": ("rounds", 16, ("speculative", "identical_to_target_only"), ">=", 1.0),
    "lossless_b64": ("rounds", 64, ("speculative", "identical_to_target_only"), ">=", 1.0),
    "trained_speedup_b1": ("trained", 1, ("speedup",), ">=", 1.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory (created)")
    ap.add_argument("--trained", type=Path, help="examples/tiny_pair/train.py output directory")
    ap.add_argument("--skip-8b", action="store_true", help="skip the 8B-shaped sections (8b, sps, e2e, variants)")
    ap.add_argument("--smoke", action="store_true", help="a small random shape instead of Qwen3-8B (tests the script)")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,4,16,64; smoke 1,2)")
    ap.add_argument("--context", type=int, default=None, help="cached tokens for step times (default 1024)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 20)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sps-max-batch", type=int, default=None, help="requests for the SPS curve (default 64)")
    ap.add_argument("--max-seconds", type=float, default=480.0, help="start no new section/batch after this")
    ap.add_argument("--sections", default="8b,rounds,trained,profile,sps,e2e,variants", help="which sections to run")
    ap.add_argument("--replay", default="a,b,c", help="acceptance replay profiles for the rounds section")
    ap.add_argument("--rounds-new-tokens", type=int, default=128, help="tokens per request in the rounds section")
    args = ap.parse_args(argv)
    small = args.smoke
    args.batches = [int(b) for b in (args.batch or ("1,2" if small else "1,16,64")).split(",")]
    args.replay = tuple(r for r in args.replay.split(",") if r)
    args.context = args.context or (128 if small else 1024)
    args.repeats = args.repeats or (3 if small else 20)
    args.sps_max_batch = args.sps_max_batch or (2 if small else 64)
    return args


class Clock:
    def __init__(self, limit: float) -> None:
        self.t0 = time.monotonic()
        self.limit = limit

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over(self) -> bool:
        return self.elapsed() > self.limit


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Greedy:
    """The backend with ``info.sampling`` off, so ``profile_sps`` times the greedy verify graph."""

    def __init__(self, backend: CudaGraphBackend) -> None:
        self._backend = backend
        self.info = dataclasses.replace(backend.info, sampling=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def bench_8b(ctx: dict[str, Any], args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    be = ctx["backend_8b"]
    rep = run_bench(lambda: be, batches=args.batches, repeats=args.repeats, context=args.context, decode=False,
                    bandwidth=ctx["bandwidth"], should_stop=clock.over)
    rep["shape"] = dataclasses.asdict(ctx["shape"])
    _write(args.out / "bench_8b.json", rep)
    return rep


def bench_trained(ctx: dict[str, Any], args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """The trained tiny pair: step times, and greedy decoding of the held-out prompts through the round graph
    (τ, tokens/s speculative vs target-only, losslessness) per batch."""
    root = args.trained
    prompts = read_prompt_file(root / "heldout.jsonl")
    out: dict[str, Any] = {"dir": str(root), "heldout_prompts": len(prompts)}
    for name in ("draft", "draft_nomarkov"):
        if not (root / name).is_dir():
            out[name] = {"missing": str(root / name)}
            continue
        if clock.over():
            out[name] = {"skipped": "time"}
            continue
        say(f"trained pair: {name}")
        if ctx["device"] == "cuda":
            be = CudaGraphBackend.create(root / "target", root / name, dtype="bf16", device="cuda")
        else:  # the same class eagerly (create() would hand back the reference TorchBackend)
            prog = build_program(root / "target", root / name, dtype="fp32", device="cpu")
            be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids)
        rep = run_bench(lambda be=be: be, batches=args.batches, repeats=args.repeats, context=args.context,
                        decode=False, bandwidth=ctx["bandwidth"], should_stop=clock.over)
        for row in rep["batches"]:
            chosen = [prompts[i % len(prompts)] for i in range(max(row["batch"], 8 if row["batch"] == 1 else 0))]
            runs = [rounds_bench(be, chosen[i : i + row["batch"]], max_new_tokens=args.max_new_tokens, replays=())
                    for i in range(0, len(chosen), row["batch"])]
            row["decode"] = runs
            for key in ("target_only", "speculative"):  # decode phase (after admit), as the rounds section
                toks = sum(r[key]["tokens"] - len(chosen[: row["batch"]]) for r in runs)
                row[f"{key}_tokens_per_s"] = toks / sum(r[key]["seconds"] - r[key]["admit_seconds"] for r in runs)
            row["tau"] = float(np.mean([r["speculative"]["tau"] for r in runs]))
            row["speedup"] = row["speculative_tokens_per_s"] / row["target_only_tokens_per_s"]
            row["identical_to_target_only"] = float(np.mean([r["speculative"]["identical_to_target_only"]
                                                             for r in runs]))
            say(f"  {name} B={row['batch']}: tau {row['tau']:.3f} speedup {row['speedup']:.3f} "
                f"lossless {row['identical_to_target_only']:.3f}")
        if ctx["device"] == "cuda":  # which kernels a round costs over a target-only step, batch 1
            prompt = np.array([prompts[0]])
            prof = {}
            for spec in (False, True):
                be.start(1, prompt.shape[1] + 64, speculative=spec)
                be.admit(prompt, np.array([prompt.shape[1]]), np.zeros(1, np.float32), np.zeros(1, np.int64))
                vlen = np.full(1, be.info.block_size if spec else 0, dtype=np.int64)
                be.round(vlen)
                be.round(vlen)
                key = "round_speculative" if spec else "round_target_only"
                prof[key] = profile_kernels(lambda v=vlen, b=be: b.round(v))
            rep["profile_b1"] = prof
            say(f"  {name} kernels B=1: " + json.dumps({k: (round(v["kernel_ms_per_call"], 4), v["by_kind_ms"])
                                                        for k, v in prof.items()}))
        out[name] = rep
        del be
        free_memory()
    _write(args.out / "trained.json", out)
    return out


def bench_sps(ctx: dict[str, Any], args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    be = ctx["backend_8b"]
    prof = profile_sps(_Greedy(be), max_batch=args.sps_max_batch, context=args.context, repeats=5,
                       backend_name="torch-cuda-graph", device=ctx["device_name"])
    data = prof.to_json()
    _write(args.out / "sps_8b.json", data)
    try:
        plot_profile(SpsProfile(**{**data, "batch_sizes": tuple(data["batch_sizes"]),
                                   "steps_per_second": tuple(data["steps_per_second"])}), args.out / "sps_8b.png")
    except ImportError:
        say("matplotlib missing: no sps_8b.png")
    return data


def bench_e2e(ctx: dict[str, Any], args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    be = ctx["backend_8b"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, be.info.vocab_size - 1, size=args.context).tolist()
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    out: dict[str, Any] = {"prompt_tokens": args.context, "max_new_tokens": args.max_new_tokens}
    for speculative in (False, True):
        generate(be, [prompt], params, speculative=speculative)  # captures the graphs
        if ctx["device"] == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = generate(be, [prompt], params, speculative=speculative)[0]
        seconds = time.perf_counter() - t0
        key = "speculative" if speculative else "target_only"
        out[key] = {"seconds_incl_prefill": seconds, "tokens": len(res.tokens),
                    "tokens_per_s": len(res.tokens) / seconds, "tau": res.mean_accepted if speculative else 1.0}
    return out


def bench_variants(ctx: dict[str, Any], args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """T_target(1) at batch 1 per implementation choice, all over the same weights."""
    target, draft = ctx["pair_8b"]
    cuda = ctx["device"] == "cuda"
    variants = {
        "default (graphs, fused, split-K attention, window 256)": {},
        "attention SDPA (memory-efficient kernel)": {"attention": "sdpa"},
        "attention reference (fp32 matmuls)": {"attention": "reference"},
        "unfused module ops": {"fused": False},
        "whole cache (no window), S=4096": {"kv_bucket": None, "slots": 4096},
        "window 256, S=4096": {"slots": 4096},
        "eager (no CUDA graphs)": {"graphs": False},
    }
    out = {}
    ctx["backend_8b"] = None  # one backend (caches + graphs) at a time
    free_memory()
    for name, opts in variants.items():
        if clock.over():
            out[name] = "skipped (time)"
            continue
        opts = dict(opts)
        slots = opts.pop("slots", None)
        if not cuda:
            opts.pop("graphs", None)
        be = CudaGraphBackend(target, draft, **opts)
        times = step_times(be, 1, context=args.context, repeats=args.repeats, slots=slots)
        out[name] = {"t_target_ms": times["t_target_ms"], "t_verify_ms": times.get("t_verify_ms"),
                     "t_draft_ms": times.get("t_draft_ms")}
        say(f"variant {name}: {out[name]}")
        del be
        free_memory()
    return out


def bench_rounds(ctx: dict[str, Any], args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """Issue 10: per batch, target-only vs speculative vs replayed decoding through the one-graph round."""
    be = ctx["backend_8b"] or CudaGraphBackend(*ctx["pair_8b"])
    ctx["backend_8b"] = be
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"prompt_tokens": args.context, "max_new_tokens": args.rounds_new_tokens,
                           "replays": args.replay}
    for b in args.batches:
        if clock.over():
            out[str(b)] = "skipped (time)"
            continue
        prompts = [rng.integers(0, be.info.vocab_size - 1, size=args.context).tolist() for _ in range(b)]
        row = rounds_bench(be, prompts, max_new_tokens=args.rounds_new_tokens, replays=args.replay)
        floor = byte_floor_ms(target_bytes(be.target_model), ctx["bandwidth"])
        row["target_floor_ms"] = floor
        if row["target_only"]["round_graph_ms"]:
            row["target_vs_floor_round"] = row["target_only"]["round_graph_ms"] / floor
        say(f"rounds B={b}: " + json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items()
                                                 if kk in ("tokens_per_s", "tau", "speedup", "host_ms_per_round",
                                                           "round_graph_ms", "identical_to_target_only",
                                                           "launch_ms_per_round", "speedup_with_prefill")}
                                             for k, v in row.items() if isinstance(v, dict)}))
        out[str(b)] = row
        _write(args.out / "rounds_8b.json", out)
    return out


def bench_profile(ctx: dict[str, Any], args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """torch.profiler kernel breakdown of T_target(1), T_verify(γ+1) and T_draft per batch (graph replays)."""
    if ctx["device"] != "cuda":
        return {"skipped": "the kernel profile needs CUDA"}
    be = ctx["backend_8b"] or CudaGraphBackend(*ctx["pair_8b"])
    ctx["backend_8b"] = be
    info = be.info
    g = info.block_size
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for b in args.batches:
        if clock.over():
            out[str(b)] = "skipped (time)"
            continue
        be.start(b, args.context + g + 2)
        cache_len = np.full(b, args.context, dtype=np.int64)
        calls: dict[str, Callable[[], Any]] = {}
        for t, name in ((1, "target_1"), (g + 1, "verify_g1")):
            tokens = rng.integers(0, info.vocab_size, size=(b, t), dtype=np.int64)
            vlen = np.full(b, t - 1, dtype=np.int64)
            calls[name] = lambda tokens=tokens, vlen=vlen, cl=cache_len: be.verify_step(tokens, cl, vlen)
        anchor = rng.integers(0, info.vocab_size, size=b, dtype=np.int64)
        taps = rng.standard_normal((b, g + 1, info.tap_width), dtype=np.float32)
        count = np.full(b, g + 1, dtype=np.int64)
        dlen = np.full(b, args.context - g - 1, dtype=np.int64)
        calls["draft"] = lambda a=anchor, x=taps, c=count, d=dlen: be.draft_step(a, x, c, d)
        row = {}
        for name, fn in calls.items():
            fn()
            fn()
            row[name] = profile_kernels(fn)
            say(f"profile B={b} {name}: {row[name]['kernel_ms_per_call']:.3f} ms {row[name]['by_kind_ms']}")
        prompts = rng.integers(0, info.vocab_size - 1, size=(b, args.context))
        for spec in (False, True):  # the round graph itself (DecodeBackend): target-only and speculative
            be.start(b, args.context + 64, speculative=spec)
            be.admit(prompts, np.full(b, args.context), np.zeros(b, np.float32), np.arange(b))
            vlen = np.full(b, g if spec else 0, dtype=np.int64)
            name = "round_speculative" if spec else "round_target_only"
            be.round(vlen)
            be.round(vlen)
            row[name] = profile_kernels(lambda v=vlen: be.round(v))
            say(f"profile B={b} {name}: {row[name]['kernel_ms_per_call']:.3f} ms {row[name]['by_kind_ms']}")
        out[str(b)] = row
    _write(args.out / "profile_8b.json", out)
    return out


def _write(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def plot(summary: dict[str, Any], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib missing: no bench.png")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    b8 = summary.get("sections", {}).get("8b")
    if isinstance(b8, dict) and b8.get("batches"):
        rows = b8["batches"]
        xs = [r["batch"] for r in rows]
        for key in ("t_target_ms", "t_verify_ms", "t_draft_ms"):
            axes[0].plot(xs, [r.get(key) for r in rows], marker="o", label=key)
        axes[0].axhline(b8["target_floor_ms"], ls="--", c="gray", label="target byte floor")
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("batch (requests)")
        axes[0].set_ylabel("ms")
        axes[0].set_title(f"{summary['shape_name']} step times ({summary['device_name']})")
        axes[0].legend(fontsize=8)
    rd = summary.get("sections", {}).get("rounds")
    if isinstance(rd, dict):
        rows = {int(b): r for b, r in rd.items() if isinstance(r, dict) and "target_only" in r}
        xs = sorted(rows)
        for mode in ("target_only", "speculative", "replay_a", "replay_b", "replay_c"):
            ys = [rows[b].get(mode, {}).get("tokens_per_s") for b in xs]
            if any(y is not None for y in ys):
                label = mode + (" (replayed)" if mode.startswith("replay") else "")
                axes[1].plot(xs, ys, marker="o", label=label)
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("batch (requests)")
        axes[1].set_ylabel("tokens / s (end to end, greedy)")
        axes[1].set_title(f"{summary['shape_name']} decoding, one graph per round")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _batch_row(summary: dict[str, Any], section: str, batch: int) -> dict[str, Any] | None:
    sec = summary["sections"].get(section)
    if not isinstance(sec, dict):
        return None
    if section == "8b":
        return next((r for r in sec.get("batches", []) if r["batch"] == batch), None)
    if section == "trained":
        rows = (sec.get("draft") or {}).get("batches", [])
        return next((r for r in rows if r["batch"] == batch), None)
    row = sec.get(str(batch))
    return row if isinstance(row, dict) else None


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (section, batch, path, op, bound) in GOALS.items():
        v: Any = _batch_row(summary, section, batch)
        for part in path:
            v = v.get(part) if isinstance(v, dict) else None
        met = None if v is None else (v <= bound if op == "<=" else v >= bound)
        out[key] = {"value": v, "goal": f"{op} {bound}", "met": met}
    return out


def print_table(summary: dict[str, Any]) -> None:
    say("---- summary ----")
    b8 = summary["sections"].get("8b")
    if isinstance(b8, dict):
        say(f"{summary['shape_name']}: floor {b8.get('target_floor_ms', 0):.2f} ms "
            f"(bw {b8.get('copy_bandwidth_gb_s', 0):.0f} GB/s), overhead floor {b8.get('overhead_floor', 0):.3f}")
        for r in b8.get("batches", []):
            say(f"  B={r['batch']:3d}  T_target {r['t_target_ms']:7.2f} ms ({r['target_vs_floor']:.2f}x floor)  "
                f"T_verify {r.get('t_verify_ms', 0):7.2f}  T_draft {r.get('t_draft_ms', 0):6.2f}  "
                f"ratio {r.get('overhead_ratio', 0):.3f}")
    rd = summary["sections"].get("rounds")
    if isinstance(rd, dict):
        for b, row in rd.items():
            if not isinstance(row, dict) or "target_only" not in row:
                continue
            for mode, r in row.items():
                if isinstance(r, dict):
                    say(f"  rounds B={b:>3s} {mode:17s} {r['tokens_per_s']:9.1f} tok/s  tau {r['tau']:.2f}  "
                        f"speedup {r.get('speedup', 1.0):.2f}  graph {r['round_graph_ms'] or 0:.2f} ms  "
                        f"host {r['host_ms_per_round'] or 0:.3f} ms  same {r.get('identical_to_target_only', 1.0)}")
    for k, g in summary["goals"].items():
        say(f"  goal {k}: {g['value']} ({g['goal']}) met={g['met']}")
    if summary["skipped"]:
        say(f"  skipped: {summary['skipped']}")
    if summary["errors"]:
        say(f"  errors: {list(summary['errors'])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[%(asctime)s] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.max_seconds)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    shape = SMOKE if args.smoke else QWEN3_8B
    say(f"device {device_name}, torch {torch.__version__}, shape {'SMOKE' if args.smoke else 'QWEN3_8B'}, "
        f"batches {args.batches}, context {args.context}, budget {args.max_seconds:.0f} s")
    bandwidth = measure_copy_bandwidth(device, nbytes=(1 << 30) if cuda else (1 << 26))
    say(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    ctx: dict[str, Any] = {"device": device, "device_name": device_name, "bandwidth": bandwidth, "shape": shape}
    summary: dict[str, Any] = {"device_name": device_name, "torch": torch.__version__, "args": vars(args),
                               "shape_name": "smoke" if args.smoke else "qwen3-8b", "copy_bandwidth_gb_s":
                               bandwidth / 1e9, "sections": {}, "skipped": [], "errors": {}}
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    needs_8b = {"8b", "sps", "e2e", "variants", "profile", "rounds"}
    if args.skip_8b:
        wanted = [s for s in wanted if s not in needs_8b]
    if not args.trained:
        wanted = [s for s in wanted if s != "trained"]
    if any(s in needs_8b for s in wanted):
        t0 = time.perf_counter()
        dtype = torch.bfloat16 if cuda else torch.float32
        ctx["pair_8b"] = random_pair(shape, device=device, dtype=dtype)
        ctx["backend_8b"] = CudaGraphBackend(*ctx["pair_8b"])
        say(f"random {summary['shape_name']} pair on {device} in {time.perf_counter() - t0:.1f} s "
            f"({torch.cuda.memory_allocated() / 2**30 if cuda else 0:.1f} GiB allocated)")
    sections: dict[str, Callable[[dict[str, Any], argparse.Namespace, Clock], dict[str, Any]]] = {
        "8b": bench_8b, "trained": bench_trained, "sps": bench_sps, "e2e": bench_e2e, "variants": bench_variants,
        "profile": bench_profile, "rounds": bench_rounds}
    for name in wanted:
        if clock.over():
            summary["skipped"].append(name)
            say(f"skip {name}: past {args.max_seconds:.0f} s")
            continue
        say(f"section {name} (at {clock.elapsed():.0f} s)")
        try:
            summary["sections"][name] = sections[name](ctx, args, clock)
        except Exception as exc:  # report and go on with the next section
            traceback.print_exc()
            summary["errors"][name] = f"{type(exc).__name__}: {exc}"
        _write(args.out / "summary.json", summary)
    summary["goals"] = goals(summary)
    summary["seconds"] = clock.elapsed()
    _write(args.out / "summary.json", summary)
    plot(summary, args.out / "bench.png")
    print_table(summary)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
