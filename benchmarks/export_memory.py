"""Wall time and peak RSS of `dspark-compile build --targets onnx` versus a plain `torch.onnx.export`.

For a Qwen3-0.6B-shaped (and optionally 1.7B-shaped) random-weight bf16 target with a DSpark draft
(5 layers, γ = 7, Markov rank 256). Each measurement runs in its own process; peak RSS is the child's
`ru_maxrss`. The plain export loads the same checkpoint with `transformers` in bf16 and calls
`torch.onnx.export(dynamo=True)` with external data — what a user would write by hand.

    python benchmarks/export_memory.py --out benchmarks/results [--sizes 0.6b,1.7b] [--work /tmp/dspark-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # Qwen3-0.6B / 1.7B published shapes (tied embeddings).
    "0.6b": {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_layers": 28,
             "num_heads": 16, "num_kv_heads": 8, "head_dim": 128},
    "1.7b": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_layers": 28,
             "num_heads": 16, "num_kv_heads": 8, "head_dim": 128},
}

PLAIN_EXPORT = r"""
import sys, torch, transformers
model = transformers.Qwen3ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
class Logits(torch.nn.Module):  # logits only: the plain baseline exports no cache
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits
ids = torch.ones(1, 8, dtype=torch.long)
with torch.no_grad():
    prog = torch.onnx.export(Logits(model), (ids,), input_names=["input_ids"],
                             dynamic_axes={"input_ids": {0: "b", 1: "t"}}, dynamo=True, opset_version=18)
prog.save(sys.argv[2], external_data=True)
"""


def measure(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd`` under GNU time: its wall time and peak RSS (``%M``, KiB), one child at a time."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB=%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.rsplit("PEAK_RSS_KB=", 1)[1].split()[0])
    return {"wall_s": round(wall, 2), "peak_rss_bytes": peak_kb * 1024}


def loaded_bytes(target: Path, draft: Path) -> tuple[int, int]:
    """Bytes of the weights a build actually loads: the target's, plus the draft's own (the graft shares the
    target's embedding and LM head instead of loading the draft's copies)."""
    from dspark_compile.checkpoint import load_draft, load_target

    t, d = load_target(target, allow_nonfinite=True), load_draft(draft, allow_nonfinite=True)
    tb = sum(t.weights.info(n).nbytes for n in t.weights.names())
    db = sum(d.weights.info(n).nbytes for n in d.weights.names() if n not in ("embed_tokens.weight", "lm_head.weight"))
    return tb, db


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run_size(name: str, work: Path) -> dict[str, object]:
    import torch

    from dspark_compile.examples import make_tiny_pair

    shape = SHAPES[name]
    pair_dir = work / f"pair-{name}"
    if not (pair_dir / "draft" / "config.json").exists():
        make_tiny_pair(pair_dir, **shape, draft_layers=5, block_size=7, target_layer_ids=(1, 13, 24),
                       markov_rank=256, tie_word_embeddings=True, dtype=torch.bfloat16, seed=0)
    target, draft = pair_dir / "target", pair_dir / "draft"
    tw, dw = loaded_bytes(target, draft)
    out = work / f"build-{name}"
    shutil.rmtree(out, ignore_errors=True)
    ours = measure([sys.executable, "-m", "dspark_compile.cli", "build", "--target", str(target), "--draft",
                    str(draft), "--out", str(out), "--dtype", "bf16", "--targets", "onnx", "--json", "-q"])
    build_bytes = sum(p.stat().st_size for p in (out / "onnx").iterdir())
    plain_out = work / f"plain-{name}"
    shutil.rmtree(plain_out, ignore_errors=True)
    plain_out.mkdir(parents=True)
    plain = measure([sys.executable, "-c", PLAIN_EXPORT, str(target), str(plain_out / "model.onnx")])
    plain_bytes = sum(p.stat().st_size for p in plain_out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(plain_out, ignore_errors=True)
    weights = tw + dw
    return {
        "shape": name, **shape,
        "target_weight_bytes": tw, "draft_own_weight_bytes": dw, "checkpoint_file_bytes": weight_bytes(target)
        + weight_bytes(draft),
        "dspark_build": {**ours, "onnx_dir_bytes": build_bytes,
                         "peak_rss_over_weights": round(ours["peak_rss_bytes"] / weights, 3)},
        "plain_torch_onnx_export_target_only": {**plain, "onnx_dir_bytes": plain_bytes,
                                                "peak_rss_over_target_weights": round(plain["peak_rss_bytes"] / tw, 3)},
        "ratio_wall_ours_over_plain": round(ours["wall_s"] / plain["wall_s"], 3),
        "ratio_rss_ours_over_plain": round(ours["peak_rss_bytes"] / plain["peak_rss_bytes"], 3),
    }


def plot(results: dict, png: Path) -> None:
    """Peak RSS and wall time per size, ours vs the plain export, with the weights as the reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(runs))
    gib = 2**30
    ours = [r["dspark_build"]["peak_rss_bytes"] / gib for r in runs]
    plain = [r["plain_torch_onnx_export_target_only"]["peak_rss_bytes"] / gib for r in runs]
    weights = [(r["target_weight_bytes"] + r["draft_own_weight_bytes"]) / gib for r in runs]
    axes[0].bar([i - 0.2 for i in x], ours, 0.4, label="dspark-compile build (target + draft)")
    axes[0].bar([i + 0.2 for i in x], plain, 0.4, label="plain torch.onnx.export (target only)")
    axes[0].scatter(list(x), [1.3 * w for w in weights], marker="_", s=600, color="k", label="goal 1.3 x weights")
    axes[0].set_ylabel("peak RSS (GiB)")
    axes[1].bar([i - 0.2 for i in x], [r["dspark_build"]["wall_s"] for r in runs], 0.4)
    axes[1].bar([i + 0.2 for i in x], [r["plain_torch_onnx_export_target_only"]["wall_s"] for r in runs], 0.4)
    axes[1].set_ylabel("wall time (s), 2 CPU cores")
    for ax in axes:
        ax.set_xticks(list(x), [r["shape"] for r in runs])
    axes[0].legend(fontsize=7)
    fig.suptitle("ONNX export of a random-weight bf16 Qwen3 target (+ DSpark draft)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sizes", default="0.6b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dspark-bench"))
    ap.add_argument("--plot-only", action="store_true", help="Redraw the PNG from an existing JSON.")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((args.out / "export_memory.json").read_text()), args.out / "export_memory.png")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "goal": "peak RSS of build <= 1.3 x weight bytes", "runs": []}
    for size in args.sizes.split(","):
        results["runs"].append(run_size(size.strip(), args.work))
        print(json.dumps(results["runs"][-1], indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "export_memory.png")


if __name__ == "__main__":
    main()
