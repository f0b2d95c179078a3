"""Admission cost on the GPU: CudaGraphBackend.admit through admission graphs against the same step run eagerly.

Under continuous batching a round that admits pays ``admit`` in full before it launches, and on the 8B an eager
prefill costs about 20 ms of kernel launches whatever its size (docs/SERVING.md). This times ``admit`` of k
prompts into a batch that already holds ``live`` rows, both ways, on one decisive random pair, and checks that
both ways give the same first tokens (and, where the random draft's near ties allow, drafts).

    python benchmarks/admission_bench.py --out DIR [--shape qwen3-8b] [--prompt-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import dspark_compile.targets.torch.cuda_graph_backend as cgb
from dspark_compile.targets.torch import CudaGraphBackend
from dspark_compile.targets.torch.bench import SHAPES, random_pair


def time_admits(be: CudaGraphBackend, k: int, live: int, prompt_tokens: int, repeats: int) -> tuple[float, list]:
    """Median seconds of admitting ``k`` prompts after ``live`` rows, and the proposals (for the check)."""
    rng = np.random.default_rng(k)
    ids = rng.integers(3, be.info.vocab_size, size=(live + k, prompt_tokens))
    lengths = np.full(live + k, prompt_tokens, dtype=np.int64)
    times, props = [], []
    for _ in range(repeats + 1):  # the first captures this shape's graphs
        be.start(64, 256)
        if live:
            be.admit(ids[:live], lengths[:live], np.zeros(live, np.float32), np.arange(live))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        prop = be.admit(ids[live:], lengths[live:], np.zeros(k, np.float32), np.arange(live, live + k))
        times.append(time.perf_counter() - t0)  # admit returns host arrays: it has synchronized
        props.append((prop.next_token.tolist(), prop.drafts.tolist()))
    return statistics.median(times[1:]), props[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (nothing is captured)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    target, draft = random_pair(SHAPES[args.shape], device=args.device, dtype=dtype, decisive=True)
    rows = []
    for k, live in ((1, 0), (1, 32), (4, 32), (8, 32), (64, 0)):
        row = {"k": k, "live": live, "prompt_tokens": args.prompt_tokens}
        props = {}
        for mode, slots in (("graphs", cgb.ADMIT_SLOTS), ("eager", 0)):
            saved, cgb.ADMIT_SLOTS = cgb.ADMIT_SLOTS, slots
            try:
                be = CudaGraphBackend(target, draft)
                row[f"{mode}_ms"], props[mode] = time_admits(be, k, live, args.prompt_tokens, args.repeats)
                row[f"{mode}_ms"] *= 1e3
            finally:
                cgb.ADMIT_SLOTS = saved
            del be
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        # The first tokens are the target's (decisive: equal across kernels); the drafts come from a random draft
        # with near-tied logits, where prefill widths (chunks of 8 against one of 64) can flip a draft token.
        row["same_first_tokens"] = props["graphs"][0] == props["eager"][0]
        row["same_drafts"] = props["graphs"][1] == props["eager"][1]
        row["speedup"] = row["eager_ms"] / row["graphs_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    report = {"shape": args.shape, "device": name, "rows": rows,
              "all_same_first_tokens": all(r["same_first_tokens"] for r in rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "admission_bench.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
