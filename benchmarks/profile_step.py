"""The CUDA-graph target's step by kernel, on the GPU: the target-only step (T = 1), a verify block (T = γ + 1)
and the draft step (backbone over γ + 1 context rows, Markov sampling) of a random pair (``--shape``;
``--quantize fp8``: the target's layers in e4m3 first; ``fp8-head-draft``: the LM head and the draft (layers,
fc, W2) too, as ``fp8_bench``'s head_draft kind; ``fp8-dynamic``/``fp8-dynamic-head-draft``: the same with e4m3
activations, W8A8), each through ``bench.profile_kernels`` (kernel time per call, by kind, and the top kernels),
at ``--batch`` requests (a B = 64 round spends its time elsewhere than a B = 1 one). ``--ops``: every step eager
(no CUDA graphs), with the torch operators that took the most device time by input shape, which is how a kernel
of the by-kind table is traced to its module (a dequantization in a module's own forward, say). JSON on stdout.

    PYTHONPATH=. python benchmarks/profile_step.py [--shape gemma4-12b] [--quantize fp8] [--context 1024] [--batch 64]
        [--ops]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from dspark_compile.passes.quantize import DRAFT_KEPT, quantize_head, quantize_inputs, quantize_module
from dspark_compile.targets.torch.bench import SHAPES, profile_kernels, random_pair
from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend


def main() -> int:
    os.environ.setdefault("DSPARK_PDL", "0")  # with programmatic dependent launch a kernel's time includes its wait
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma4-12b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--quantize", choices=("fp8", "fp8-head-draft", "fp8-dynamic", "fp8-dynamic-head-draft"),
                    default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ops", action="store_true", help="eager steps, with the torch operators by input shape")
    args = ap.parse_args()
    target, draft = random_pair(SHAPES[args.shape], device=args.device)
    if args.quantize:
        quantize_module(target.layers)
    if args.quantize and args.quantize.endswith("head-draft"):
        quantize_module(draft, skip=DRAFT_KEPT)
        target.lm_head = draft.lm_head = quantize_head(target.lm_head)
    if args.quantize and "dynamic" in args.quantize:
        for model in (target, draft):
            quantize_inputs(model)
    b = args.batch
    be = CudaGraphBackend(target, draft, graphs=not args.ops)
    be.start(b, args.context + 16)
    cache_len = np.full(b, args.context, dtype=np.int64)
    out = {"batch": b, "graphs": not args.ops}
    for t in (1, draft.block_size + 1):
        tokens = np.ones((b, t), dtype=np.int64)

        def step(tokens: np.ndarray = tokens, t: int = t) -> object:
            return be.verify_step(tokens, cache_len, np.full(b, t - 1, dtype=np.int64))

        for _ in range(3):
            step()
        out[f"verify_T{t}"] = profile_kernels(step, ops=args.ops)
    g = draft.block_size
    taps = np.zeros((b, g + 1, len(target.tap_layer_ids) * target.cfg.hidden_size), dtype=np.float32)

    def draft_step() -> object:  # the draft backbone over g + 1 context rows, then Markov sampling (greedy)
        return be.draft_step(np.ones(b, dtype=np.int64), taps, np.full(b, g + 1, dtype=np.int64), cache_len)

    for _ in range(3):
        draft_step()
    out["draft"] = profile_kernels(draft_step, ops=args.ops)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
