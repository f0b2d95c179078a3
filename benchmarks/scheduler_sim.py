"""Simulated throughput of verify-length policies versus concurrency, from recorded decoding rounds.

    python benchmarks/scheduler_sim.py [--rounds FILE] [--sps FILE] [--calibration FILE] [--out DIR]

Input rounds: a decode JSON in the golden format (``greedy`` entries, each with ``rounds`` holding the 7
``confidence_logits`` and ``accepted_draft`` of a full-block γ = 7 verification); by default the golden pair's
``tests/data/golden/dspark_tiny/decode_greedy.json``. Because every recorded round verified the whole block,
a policy that verifies ℓ ≤ 7 drafts would have accepted min(accepted_draft, ℓ) — the first rejection does
not move when the block is cut later — so the simulation replays real acceptances, not the confidences.

At concurrency R each simulated step draws R recorded rounds at random (with replacement), asks the policy
for ℓ_r, and books τ = Σ_r (1 + min(accepted_r, ℓ_r)) committed tokens for one verify step of
B = Σ_r (1 + ℓ_r) tokens taking 1/SPS(B) seconds. Reported tokens/s = Σ τ / Σ step time over all steps
(long-run throughput; draft time is left out, it is the same for every policy).

Confidence-driven policies run twice: on raw confidences sigmoid(logit) (what DeepSpec's threshold uses) and
on STS-calibrated ones (what Algorithm 1 assumes). The calibration comes from --calibration, else it is
cross-fitted here: the rounds are split in two random halves and each half is calibrated with temperatures
fitted on the other, so no round is scored with temperatures fitted on itself.

SPS: from --sps (JSON: ``{"batch_sizes": [...], "steps_per_second": [...]}`` or ``{"<B>": sps, ...}``),
else the built-in H100-like model below.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dspark_compile.calibration import StsCalibration, fit_sts, sigmoid
from dspark_compile.runtime.scheduler import (
    SpsCurve,
    fixed_lengths,
    schedule,
    schedule_smoothed,
    threshold_lengths,
)

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROUNDS = REPO / "tests" / "data" / "golden" / "dspark_tiny" / "decode_greedy.json"
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
GAMMA = 7

# Built-in verify-step model: Qwen3-8B bf16 target on one H100 SXM. Weight streaming (16.4 GB at ~2.7 TB/s
# effective, plus launch overhead) costs ~6 ms whatever the batch; GEMM compute is ~16.4 GFLOP per token at
# ~550 TFLOP/s effective (0.030 ms/token) and is paid per 64-row M tile, so the step time is flat while
# memory-bound, then rises in 64-token steps; attention/KV reads add a small per-token term.
MODEL_T_MEMORY_MS = 6.0
MODEL_T_TOKEN_MS = 0.030
MODEL_TILE = 64
MODEL_T_ATTENTION_MS = 0.004


def model_step_ms(batch: int) -> float:
    tiles = math.ceil(batch / MODEL_TILE)
    return max(MODEL_T_MEMORY_MS, MODEL_T_TOKEN_MS * MODEL_TILE * tiles) + MODEL_T_ATTENTION_MS * batch


def builtin_sps(max_batch: int = max(CONCURRENCY) * (1 + GAMMA)) -> SpsCurve:
    batches = range(1, max_batch + 1)  # every B, so interpolation never smooths the tile steps away
    return SpsCurve(tuple(batches), tuple(1000.0 / model_step_ms(b) for b in batches))


def load_sps(path: Path) -> SpsCurve:
    data = json.loads(path.read_text())
    if "batch_sizes" in data:
        batches, rates = data["batch_sizes"], data["steps_per_second"]
        return SpsCurve(tuple(int(b) for b in batches), tuple(float(s) for s in rates))
    return SpsCurve.from_mapping({int(b): float(s) for b, s in data.items()})


@dataclass(frozen=True)
class Rounds:
    """Recorded full-block rounds: confidence logits [N, γ] and drafts accepted [N]."""

    logits: np.ndarray
    accepted: np.ndarray


def load_rounds(path: Path) -> Rounds:
    prompts = json.loads(path.read_text())["greedy"]
    rounds = [r for p in prompts for r in p["rounds"]]
    return Rounds(
        np.array([r["confidence_logits"] for r in rounds], dtype=np.float64),
        np.array([r["accepted_draft"] for r in rounds], dtype=np.int64),
    )


def cross_fitted(rounds: Rounds, seed: int) -> tuple[np.ndarray, list[list[float]]]:
    """STS-calibrated confidences, each half of the rounds scored with temperatures fitted on the other."""
    order = np.random.default_rng(seed).permutation(len(rounds.accepted))
    halves = (order[::2], order[1::2])
    confidences = np.empty_like(rounds.logits)
    temperatures = []
    for fit_on, score in (halves, halves[::-1]):
        cal = fit_sts(rounds.logits[fit_on], rounds.accepted[fit_on])
        confidences[score] = cal.apply(rounds.logits[score])
        temperatures.append([round(t, 4) for t in cal.temperatures])
    return confidences, temperatures


Policy = Callable[[Sequence[Sequence[float]]], list[int]]
SCHEDULERS = (
    "schedule (raw c)", "schedule (STS c)", "schedule_smoothed (raw c)", "schedule_smoothed (STS c)",
)


def policies(
    curve: SpsCurve, raw: np.ndarray, calibrated: np.ndarray
) -> dict[str, tuple[Policy, np.ndarray]]:
    """Each policy with the confidences it reads."""
    return {
        "fixed γ=3": (lambda c: fixed_lengths(c, 3), raw),
        "fixed γ=7": (lambda c: fixed_lengths(c, 7), raw),
        "threshold 0.5 (raw c)": (lambda c: threshold_lengths(c, 0.5), raw),
        SCHEDULERS[0]: (lambda c: schedule(c, curve), raw),
        SCHEDULERS[1]: (lambda c: schedule(c, curve), calibrated),
        SCHEDULERS[2]: (lambda c: schedule_smoothed(c, curve), raw),
        SCHEDULERS[3]: (lambda c: schedule_smoothed(c, curve), calibrated),
    }


def simulate(rounds: Rounds, named: dict[str, tuple[Policy, np.ndarray]], curve: SpsCurve, steps: int,
             seed: int) -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(seed)
    metrics = ("tokens_per_s", "tokens_per_request_step", "verify_drafts_per_request")
    result: dict[str, dict[str, list[float]]] = {name: {m: [] for m in metrics} for name in named}
    for n_req in CONCURRENCY:
        picks = rng.integers(0, len(rounds.accepted), size=(steps, n_req))  # same draws for every policy
        for name, (policy, confidences) in named.items():
            tokens = seconds = drafts = 0.0
            for pick in picks:
                lengths = np.asarray(policy(confidences[pick]))
                tokens += float(np.sum(1 + np.minimum(rounds.accepted[pick], lengths)))
                seconds += 1.0 / float(curve(n_req + lengths.sum()))
                drafts += float(lengths.sum())
            result[name]["tokens_per_s"].append(tokens / seconds)
            result[name]["tokens_per_request_step"].append(tokens / (steps * n_req))
            result[name]["verify_drafts_per_request"].append(drafts / (steps * n_req))
    return result


def ratios(result: dict, at: Sequence[int] = (1, 16, 64)) -> dict[str, dict[str, float]]:
    out = {}
    for name in SCHEDULERS:
        out[name] = {}
        for n_req in at:
            i = CONCURRENCY.index(n_req)
            best_fixed = max(result[f"fixed γ={g}"]["tokens_per_s"][i] for g in (3, 7))
            out[name][str(n_req)] = round(result[name]["tokens_per_s"][i] / best_fixed, 4)
    return out


def plot(result: dict, curve: SpsCurve, sps_label: str, png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.8), dpi=100)
    ax_tps, ax_ratio, ax_sps = fig.subplots(1, 3)
    # One colour per policy in both panels; the smoothed variants dashed, as they often coincide.
    style = {
        name: {"color": f"C{i}", "marker": "o", "linestyle": "--" if "smoothed" in name else "-"}
        for i, name in enumerate(result)
    }
    for name, series in result.items():
        ax_tps.plot(CONCURRENCY, series["tokens_per_s"], label=name, **style[name])
    ax_tps.set(xscale="log", yscale="log", xlabel="concurrent requests R", ylabel="committed tokens / s",
               title="Simulated verify throughput")
    best_fixed = np.maximum(result["fixed γ=3"]["tokens_per_s"], result["fixed γ=7"]["tokens_per_s"])
    for name in ("threshold 0.5 (raw c)", *SCHEDULERS):
        gain = np.asarray(result[name]["tokens_per_s"]) / best_fixed
        ax_ratio.plot(CONCURRENCY, gain, label=name, **style[name])
    ax_ratio.axhline(1.0, color="0.6", linestyle=":", linewidth=1)
    ax_ratio.set(xscale="log", xlabel="concurrent requests R", ylabel="tokens/s ÷ best of fixed γ=3, 7",
                 title="Gain over the best fixed verify length")
    batches = np.arange(1, max(CONCURRENCY) * (1 + GAMMA) + 1)
    ax_sps.plot(batches, curve(batches))
    ax_sps.set(xlabel="verify batch B (tokens)", ylabel="verify steps / s", title="SPS curve")
    ax_sps.text(0.98, 0.98, sps_label, transform=ax_sps.transAxes, ha="right", va="top", fontsize=8)
    for ax in (ax_tps, ax_ratio):
        ax.set_xticks(CONCURRENCY, [str(r) for r in CONCURRENCY])
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomically(png, buf.getvalue())


def write_atomically(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=Path, default=GOLDEN_ROUNDS, help="decode JSON with recorded rounds")
    parser.add_argument("--sps", type=Path, help="profiled SPS curve JSON (default: built-in H100 model)")
    parser.add_argument("--calibration", type=Path, help="calibration.json (default: cross-fitted STS)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--steps", type=int, default=1000, help="simulated verify steps per concurrency")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rounds = load_rounds(args.rounds)
    curve = load_sps(args.sps) if args.sps else builtin_sps()
    sps_label = str(args.sps) if args.sps else "built-in H100 model (Qwen3-8B bf16, 64-token tiles)"
    if args.calibration:
        cal = StsCalibration.from_json(args.calibration)
        calibrated, temperatures = cal.apply(rounds.logits), [list(cal.temperatures)]
    else:
        calibrated, temperatures = cross_fitted(rounds, args.seed)
    named = policies(curve, sigmoid(rounds.logits), calibrated)
    result = simulate(rounds, named, curve, args.steps, args.seed)
    report = {
        "inputs": {
            "rounds": os.path.relpath(args.rounds.resolve(), REPO),
            "n_rounds": len(rounds.accepted),
            "mean_accepted_draft": round(float(rounds.accepted.mean()), 4),
            "sps": sps_label,
            "calibration": str(args.calibration) if args.calibration else "STS cross-fitted on 2 halves",
            "sts_temperatures": temperatures,
            "steps_per_concurrency": args.steps,
            "seed": args.seed,
        },
        "model_step_ms": None if args.sps else {
            "memory": MODEL_T_MEMORY_MS, "per_token": MODEL_T_TOKEN_MS, "tile": MODEL_TILE,
            "attention_per_token": MODEL_T_ATTENTION_MS,
        },
        "concurrency": list(CONCURRENCY),
        "policies": {n: {m: [round(v, 4) for v in vs] for m, vs in ms.items()} for n, ms in result.items()},
        "ratio_vs_best_fixed": ratios(result),
        "sps_curve": {
            "batch_sizes": list(curve.batch_sizes),
            "steps_per_second": [round(v, 4) for v in curve.steps_per_second],
        },
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    # Numeric lists on one line each, so the file stays readable next to the 512-point SPS table.
    text = re.sub(r"\[\s+([-0-9.,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m[1]) + "]", text)
    payload = text.encode() + b"\n"
    write_atomically(args.out / "scheduler_sim.json", payload)
    plot(result, curve, sps_label, args.out / "scheduler_sim.png")
    print(f"{'tokens/s at R =':<28}" + "".join(f"{n:>9}" for n in CONCURRENCY))
    for name, series in result.items():
        print(f"{name:<28}" + "".join(f"{v:>9.0f}" for v in series["tokens_per_s"]))
    print("ratio vs best fixed:", json.dumps(report["ratio_vs_best_fixed"], ensure_ascii=False))
    print(f"wrote {args.out}/scheduler_sim.{{json,png}} in {time.perf_counter() - start:.1f} s")
    return report


if __name__ == "__main__":
    main()
