"""The CUDA-graph target's step by kernel, on the GPU: the target-only step (T = 1) and a verify block (T = γ + 1)
of a random pair (``--shape``; ``--quantize fp8``: the target's layers in e4m3 first), each through
``bench.profile_kernels`` (kernel time per call, by kind, and the top kernels). JSON on stdout.

    PYTHONPATH=. python benchmarks/profile_step.py [--shape gemma4-12b] [--quantize fp8] [--context 1024]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dspark_compile.passes.quantize import quantize_module
from dspark_compile.targets.torch.bench import SHAPES, profile_kernels, random_pair
from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma4-12b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--quantize", choices=("fp8",), default=None)
    args = ap.parse_args()
    target, draft = random_pair(SHAPES[args.shape], device=args.device)
    if args.quantize:
        quantize_module(target.layers)
    be = CudaGraphBackend(target, draft)
    be.start(1, args.context + 16)
    cache_len = np.full(1, args.context, dtype=np.int64)
    out = {}
    for t in (1, draft.block_size + 1):
        tokens = np.ones((1, t), dtype=np.int64)

        def step(tokens: np.ndarray = tokens, t: int = t) -> object:
            return be.verify_step(tokens, cache_len, np.full(1, t - 1, dtype=np.int64))

        for _ in range(3):
            step()
        out[f"verify_T{t}"] = profile_kernels(step)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
