"""What the round graph gives at batch 64 when replayed acceptance holds (issue 11's concurrency-64 question).

Plain replay (``rounds_bench``'s ``replay_b``) needs the batch's bf16 target to reproduce its reference bit for
bit; once rows finish and the batch shrinks, numerics change and rows leave it, so acceptance collapses. Forced
replay (timing only) commits the reference at the profile's acceptance with the same kernels. One run: target-only,
speculative (τ 1, lossless check), plain replay b and forced replay b, at B = 1 (1024-token prompts) and B = 64
(64- and 1024-token prompts), Qwen3-8B shape, random bf16 weights, 128 new tokens.

    PYTHONPATH=. python benchmarks/forced_replay_bench.py h200 OUT.json     # on the GPU (h200-short: B = 64 only)
    PYTHONPATH=. python benchmarks/forced_replay_bench.py smoke OUT.json    # CPU smoke run (B = 4)
"""

import json
import sys
import time

import numpy as np
import torch

from dspark_compile.targets.torch.bench import QWEN3_8B, SMOKE, random_pair, rounds_bench
from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend

smoke = sys.argv[1] == "smoke"
out = sys.argv[2]
shape = SMOKE if smoke else QWEN3_8B
dev = "cpu" if smoke else "cuda"
target, draft = random_pair(shape, device=dev, dtype=torch.float32 if smoke else torch.bfloat16)
be = CudaGraphBackend(target, draft)
rng = np.random.default_rng(0)
res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "shape": "smoke" if smoke else "qwen3-8b"}
CASES = {"smoke": ((4, 16),), "h200": ((1, 1024), (64, 64), (64, 1024)), "h200-short": ((64, 64),)}
for b, ctx in CASES[sys.argv[1]]:
    t0 = time.time()
    prompts = [rng.integers(0, shape.vocab_size - 1, size=ctx).tolist() for _ in range(b)]
    r = rounds_bench(be, prompts, max_new_tokens=16 if smoke else 128, replays=("b",), forced=True)
    res[f"b{b}_ctx{ctx}"] = r
    modes = ("target_only", "speculative", "replay_b", "replay_b_forced")
    line = {m: (round(r[m]["tokens_per_s"]), round(r[m]["tau"], 2), r[m]["rounds"],
                r[m].get("identical_to_target_only"), round(r[m]["round_graph_ms"], 3)) for m in modes}
    print(b, ctx, json.dumps(line), f"{time.time() - t0:.0f}s", flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)

# What one admission costs a running batch: prefill + first draft run eagerly (no graph), here with 63 live rows
# and k new 64-token prompts; serving at concurrency 64 admits about one request per round.
be.start(64, 256)
zeros = np.zeros(63, dtype=np.float32)
be.admit(rng.integers(0, shape.vocab_size - 1, size=(63, 16)), np.full(63, 16), zeros, np.arange(63))
admit_ms: dict[str, list[float]] = {}
for k in (1, 1, 4, 8) if not smoke else (1, 1):
    ids = rng.integers(0, shape.vocab_size - 1, size=(k, 64))
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    be.admit(ids, np.full(k, 64), np.zeros(k, dtype=np.float32), np.arange(k))
    if dev == "cuda":
        torch.cuda.synchronize()
    admit_ms.setdefault(f"k{k}", []).append(1e3 * (time.perf_counter() - t0))
    be.select(np.arange(63))
res["admit_ms_with_63_live"] = admit_ms
print("admit ms", json.dumps(admit_ms), flush=True)
with open(out, "w") as f:
    json.dump(res, f, indent=1, default=str)
