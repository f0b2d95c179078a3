"""Plain rounds (``--draft-rows``) on the graph executor, through onnxruntime on this machine's CPU: what a round
that drafts nothing costs against target-only decoding's step and against a speculative round, and how many draft
graph calls it makes. The golden ``dspark_tiny`` pair compiled to ONNX (the build the tests use), 8 rows, greedy.
Every mode's tokens are checked against target-only's in the same run.

    PYTHONPATH=. python benchmarks/executor_plain_rounds.py OUT.json [--rows 8] [--new-tokens 64] [--repeats 5]
        [--before EARLIER.json]

For a before/after, run it with an earlier ``dspark_compile`` first on ``PYTHONPATH``, then pass that JSON
as ``--before``: OUT.png then draws both (docs/BENCH.md, "Plain rounds on the graph executor").
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

import dspark_compile
from dspark_compile import api
from dspark_compile.runtime.decode import GenerationParams, VerifyPolicy, generate
from dspark_compile.runtime.onnxruntime_backend import load_onnxruntime

PAIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "dspark_tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", type=Path, help="an earlier run's JSON, drawn beside this one")
    args = ap.parse_args()
    gold = json.loads((PAIR / "decode_greedy.json").read_text())["baseline"]
    prompts = [gold[i % len(gold)]["prompt"] for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "build"
        api.build(target=PAIR / "target", draft=PAIR / "draft", out=build, progress=False)
        be = load_onnxruntime(build)
        calls: dict[str, int] = {}
        run = be.transport.run

        def counted(graph: str, feeds: Any, outputs: Any) -> None:
            calls[graph] = calls.get(graph, 0) + 1
            run(graph, feeds, outputs)

        be.transport.run = counted  # type: ignore[method-assign]
        step = be.round

        def round_counted(*a: Any, **k: Any) -> Any:
            calls["rounds"] = calls.get("rounds", 0) + 1
            return step(*a, **k)

        be.round = round_counted  # type: ignore[method-assign]
        modes = {"target_only": ({"speculative": False}, GenerationParams(max_new_tokens=args.new_tokens)),
                 "plain_rounds": ({}, GenerationParams(max_new_tokens=args.new_tokens,
                                                       policy=VerifyPolicy(draft_rows=0))),
                 "speculative": ({}, GenerationParams(max_new_tokens=args.new_tokens))}
        report: dict[str, Any] = {
            "what": "graph executor on onnxruntime (CPU), golden dspark_tiny, greedy", "rows": args.rows,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "machine": platform.processor() or "cpu",
            "onnxruntime": onnxruntime.__version__, "dspark_compile": str(Path(dspark_compile.__file__).parent),
            "modes": {}}
        want = None
        for name, (kw, params) in modes.items():
            times = []
            for _ in range(args.repeats + 1):  # the first warms the sessions up
                calls.clear()
                t0 = time.perf_counter()
                res = generate(be, prompts, params, **kw)
                times.append(time.perf_counter() - t0)
            rounds = calls.pop("rounds")
            tokens = [r.tokens for r in res]
            want = want or tokens
            sec = statistics.median(times[1:])
            report["modes"][name] = {
                "s": sec, "ms_per_round": 1e3 * sec / rounds, "rounds": rounds,
                "tok_per_s": sum(len(t) for t in tokens) / sec, "graph_calls": dict(calls),
                "identical_to_target_only": float(np.mean([a == b for a, b in zip(tokens, want, strict=True)]))}
            print(name, json.dumps(report["modes"][name]), flush=True)
    m = report["modes"]
    report["plain_over_target_only_ms_per_round"] = m["plain_rounds"]["ms_per_round"] / m["target_only"][
        "ms_per_round"]
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("plain round / target-only step:", round(report["plain_over_target_only_ms_per_round"], 3))
    runs = ([("before", json.loads(args.before.read_text()))] if args.before else []) + [("now", report)]
    plot(runs, args.out.with_suffix(".png"))


def plot(runs: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """ms per round of each mode, one bar per run, the draft graph calls written on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(runs[-1][1]["modes"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(runs)
    for i, (label, rep) in enumerate(runs):
        xs = [j + i * width for j in range(len(modes))]
        ms = [rep["modes"][m]["ms_per_round"] for m in modes]
        ax.bar(xs, ms, width, label=label)
        for x, m, v in zip(xs, modes, ms, strict=True):
            drafts = rep["modes"][m]["graph_calls"].get("draft_propose", 0)
            ax.text(x, v, f"{v:.2f}\n{drafts} drafts", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], modes)
    ax.set_ylabel("ms per round (CPU, onnxruntime)")
    ax.set_title(f"graph executor, golden dspark_tiny, {runs[-1][1]['rows']} rows, greedy", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
