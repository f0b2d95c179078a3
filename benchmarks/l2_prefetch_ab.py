"""L2 prefetch of the next product's weight (``targets/torch/l2_prefetch.py``), A/B in one run on the GPU.

For each target (Qwen3-8B shape bf16, the same with ``--quantize fp8``, gemma-4-12B shape bf16; random decisive
weights), the rounds at B = 1 (target-only step ms vs its byte floor, replayed profile b tok/s, speculative ==
target-only) under each prefetch setting: ``off``, or ``MODE:MB[:evict_last]`` (MODE ``before``: alongside the
current product, ``after``: from its end; MB per product). Writes ``l2_prefetch_ab.json`` and a PNG.

    PYTHONPATH=. python benchmarks/l2_prefetch_ab.py --out OUT [--variants off,before:24,...] [--targets ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark_compile.passes.quantize import quantize_module
from dspark_compile.targets.torch.bench import (
    SHAPES,
    byte_floor_ms,
    measure_copy_bandwidth,
    random_pair,
    rounds_bench,
    target_bytes,
)
from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_variant(variant: str) -> None:
    """``off`` or ``MODE:MB[:evict_last]`` into the environment l2_prefetch reads at each product."""
    parts = variant.split(":")
    os.environ["DSPARK_L2_PREFETCH_MB"] = "0" if parts[0] == "off" else parts[1]
    os.environ["DSPARK_L2_PREFETCH_AT"] = parts[0] if parts[0] != "off" else "before"
    os.environ["DSPARK_L2_EVICT_LAST"] = "1" if parts[-1] == "evict_last" else "0"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="off,before:16,before:32,after:16,after:32,before:32:evict_last")
    ap.add_argument("--targets", default="qwen3-8b:bf16,qwen3-8b:fp8,gemma4-12b:bf16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (no prefetch there)")
    ap.add_argument("--deadline", type=float, default=520.0, help="start no new target after this many seconds")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bandwidth = measure_copy_bandwidth(args.device)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                           "copy_bandwidth_gb_s": bandwidth / 1e9, "context": args.context,
                           "new_tokens": args.new_tokens, "runs": {}}
    rng = np.random.default_rng(0)
    loaded: tuple[str, Any, Any] | None = None
    for spec in args.targets.split(","):
        if time.perf_counter() - start > args.deadline:
            say(f"deadline: {spec} skipped")
            break
        shape_name, kind = spec.split(":")
        shape = SHAPES[shape_name]
        if loaded is None or loaded[0] != shape_name:
            loaded = None
            gc.collect()
            torch.cuda.empty_cache()
            target, draft = random_pair(shape, device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
                                        decisive=True)
            loaded = (shape_name, target, draft)
        _, target, draft = loaded
        if kind == "fp8":
            quantize_module(target.layers)
        floor = byte_floor_ms(target_bytes(target), bandwidth)
        prompts = [rng.integers(0, shape.vocab_size - 1, size=args.context).tolist()]
        for variant in args.variants.split(","):
            set_variant(variant)
            be = CudaGraphBackend(target, draft)
            row = rounds_bench(be, prompts, max_new_tokens=args.new_tokens, replays=("b",))
            step = row["target_only"]["round_graph_ms"]
            out = {"step_ms": step, "floor_ms": floor, "step_vs_floor": step / floor,
                   "target_tok_s": row["target_only"]["tokens_per_s"],
                   "replay_b_tok_s": row["replay_b"]["tokens_per_s"], "replay_b_tau": row["replay_b"]["tau"],
                   "spec_identical": row["speculative"]["identical_to_target_only"],
                   "replay_identical": row["replay_b"]["identical_to_target_only"], "rounds": row}
            res["runs"][f"{spec}@{variant}"] = out
            say(f"{spec} {variant}: step {step:.3f} ms ({step / floor:.3f}x floor {floor:.3f}), replay b "
                f"{out['replay_b_tok_s']:.0f} tok/s, identical {out['spec_identical']}/{out['replay_identical']}")
            (args.out / "l2_prefetch_ab.json").write_text(json.dumps(res, indent=1, default=str))
            del be
            gc.collect()
    plot(res, args.out / "l2_prefetch_ab.png")
    return 0


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    targets = list(dict.fromkeys(k.split("@")[0] for k in runs))
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    for ax, spec in zip(axes[0], targets, strict=True):
        keys = [k for k in runs if k.startswith(spec + "@")]
        ax.bar(range(len(keys)), [runs[k]["step_vs_floor"] for k in keys])
        ax.set_xticks(range(len(keys)), [k.split("@")[1] for k in keys], rotation=30, fontsize=7)
        ax.axhline(1.3, color="red", linestyle="--", linewidth=1)
        ax.set_title(f"{spec}: target step / byte floor, B = 1", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
