"""FP8 vs bf16 targets on the shipped trained tiny pair (dspark_compile/tiny_pair), its held-out prompts (CPU).

The held-out prompts are rebuilt exactly as examples/tiny_pair/train.py wrote them (64 windows of 64-128 tokens
of the held-out standard-library files, seed 0; the corpus digest is checked against train_log.json). Both
targets run on the PyTorch reference in bf16 with the same bf16 draft: greedy token agreement over 64 new
tokens (target-only decoding), mean KL(bf16 ‖ FP8) of the next-token distributions along the bf16 greedy
continuation, and τ of speculative decoding (every draft verified) with each target.

    PYTHONPATH=. python benchmarks/fp8_accuracy.py --out benchmarks/results/fp8_accuracy_tiny_pair.json
        [--quantize fp8-dynamic]   # activations e4m3 too (per row and gcd(K, 128) columns: 64 on this pair)
        [--quantize-draft]         # the draft's layers, fc and Markov W2 in e4m3 too, for the FP8 row only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dspark_compile.passes.check_acceptance import acceptance, agreement, decode
from dspark_compile.passes.quantize import quantize_program
from dspark_compile.program import build_program
from dspark_compile.runtime.torch_backend import TorchBackend

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "dspark_compile" / "tiny_pair"


def heldout_prompts() -> list[list[int]]:
    sys.path.insert(0, str(ROOT / "examples" / "tiny_pair"))
    spec = importlib.util.spec_from_file_location("tiny_pair_corpus", ROOT / "examples" / "tiny_pair" / "corpus.py")
    corpus_lib = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = corpus_lib
    spec.loader.exec_module(corpus_lib)
    log = json.loads((PAIR / "train_log.json").read_text())
    corpus = corpus_lib.load_corpus()
    if corpus.digest != log["corpus"]["sha256"]:
        raise SystemExit(f"corpus digest {corpus.digest} != the training's {log['corpus']['sha256']}: this Python's "
                         "standard library differs from the one the pair was trained on")
    tok = corpus_lib.load_tokenizer(PAIR / "target")
    encoded = corpus_lib.encode_files(tok, corpus.heldout)
    rows = corpus_lib.heldout_prompts(tok, corpus.heldout, encoded, 64, 64, 128, log["args"]["seed"])
    return [list(r["prompt_ids"]) for r in rows]


@torch.inference_mode()
def next_token_kl(ref: Any, test: Any, prompts: list[list[int]], continuations: list[list[int]]) -> dict[str, float]:
    """KL(ref ‖ test) of the next-token distributions at each generated position (teacher-forced on ``ref``'s
    greedy continuation), and how often the argmax agrees."""
    kls, agree = [], []
    for prompt, cont in zip(prompts, continuations, strict=True):
        ids = torch.tensor([prompt + cont[:-1]])
        logits = []
        for program in (ref, test):
            hidden, _, _ = program.target(ids, torch.zeros(1, dtype=torch.int64),
                                          program.target.new_cache(1, ids.shape[1]))
            logits.append(program.target.logits(hidden)[0, len(prompt) - 1:].float())
        lp, lq = (torch.log_softmax(x, -1) for x in logits)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
        agree.append((logits[0].argmax(-1) == logits[1].argmax(-1)).float())
    kl = torch.cat(kls)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "top1_agreement": float(torch.cat(agree).mean())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--quantize", default="fp8", choices=("fp8", "fp8-dynamic"))
    ap.add_argument("--quantize-draft", action="store_true", help="the FP8 row's draft in e4m3 too (layers, fc, W2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    prompts = heldout_prompts()[: args.prompts]
    programs = {}
    for name in ("bf16", "fp8"):
        programs[name] = build_program(PAIR / "target", PAIR / "draft", dtype=args.dtype)
        if name == "fp8":
            quantize_program(programs[name], draft=args.quantize_draft, activations=args.quantize == "fp8-dynamic")
    g = programs["bf16"].draft.block_size
    res: dict[str, Any] = {"pair": "dspark_compile/tiny_pair", "prompts": len(prompts), "new_tokens": 64,
                           "activation_dtype": args.dtype, "quantize": args.quantize,
                           "quantized": "target decoder linear layers (e4m3, per-output-channel scales"
                           + ("; their inputs e4m3 per row and group" if args.quantize == "fp8-dynamic" else "")
                           + ("; the FP8 row's draft layers, fc and Markov W2 too" if args.quantize_draft else "")
                           + "); embeddings and LM head" + ("" if args.quantize_draft else " and draft")
                           + " in the activation dtype"}
    greedy, spec = {}, {}
    for name, program in programs.items():
        backend = TorchBackend.from_program(program)
        greedy[name] = [r.tokens for r in decode(backend, prompts, speculative=False)]
        spec[name] = decode(backend, prompts)
        res[f"tau_{name}"] = acceptance(spec[name], g)
        print(f"{name}: tau {res[f'tau_{name}']['tau']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    res["greedy_agreement_64"] = agreement(greedy["fp8"], greedy["bf16"])
    res["speculative_equals_own_greedy"] = {n: agreement([r.tokens for r in spec[n]], greedy[n])["identical"]
                                            for n in programs}
    res["kl_bf16_vs_fp8"] = next_token_kl(programs["bf16"], programs["fp8"], prompts, greedy["bf16"])
    res["tau_drop"] = (res["tau_bf16"]["tau"] - res["tau_fp8"]["tau"]) / res["tau_bf16"]["tau"]
    res["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("tau_bf16", "tau_fp8")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
