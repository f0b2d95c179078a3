"""Serving benchmark: NVIDIA's AIPerf (PyPI ``aiperf``, unmodified) against `dspark-compile serve` on 127.0.0.1.

    python benchmarks/serving_bench.py --build BUILD --aiperf /work/lgvenv/bin/aiperf \
        --out benchmarks/results/serving_cpu

For each mode — speculative with the confidence scheduler (``--verify schedule``, needs `dspark-compile profile`),
speculative with every draft verified (``fixed``) and target-only, all from the same build — the script starts the
bundled tritonserver (``api.serve``), then runs AIPerf at each concurrency and once with Poisson arrivals. AIPerf
talks to Triton's HTTP ``generate_stream`` endpoint through its ``template`` endpoint type (request body in the
TensorRT-LLM ensemble convention, ``text_output`` read from each server-sent event) and counts tokens with the
build's own tokenizer. Install AIPerf in a separate environment (it pins its own dependencies):
``python -m venv /work/lgvenv && /work/lgvenv/bin/pip install aiperf``.

Writes OUT.json (per mode and load: output tokens/s, TTFT and inter-token latency p50/p99, request count, errors)
and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dspark_compile import api  # noqa: E402

log = logging.getLogger("serving_bench")

MODES = {"scheduled": {"verify": "schedule"}, "fixed": {"verify": "fixed"}, "target_only": {"target_only": True}}
TEMPLATE = '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}, "stream": true}'
METRICS = {"output_token_throughput": "output_tokens_per_s",
           "output_token_throughput_per_user": "per_user_tokens_per_s", "time_to_first_token": "ttft_ms",
           "inter_token_latency": "itl_ms", "request_latency": "request_latency_ms",
           "request_count": "requests", "error_request_count": "errors"}


def run_aiperf(aiperf: Sequence[str], http: str, tokenizer: Path, artifacts: Path, *, concurrency: list[int] | None,
               rate: float | None, requests: int, input_tokens: int, output_tokens: int, timeout_s: float,
               seed: int, model: str = "dspark", duration_s: float | None = None, warmup: int = 0,
               env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One AIPerf invocation (a sweep over ``concurrency``, or one Poisson run at ``rate``); returns one row of
    summary metrics (ms, tokens/s) per load, by our names. ``duration_s`` bounds each load's time as well as its
    ``requests``; ``warmup`` requests run first and are not counted."""
    artifacts.mkdir(parents=True, exist_ok=True)
    template = artifacts / "payload_template.json"  # a file: AIPerf splits inline --extra-inputs at commas
    template.write_text(TEMPLATE)
    cmd = [*aiperf, "profile", "--model", model, "--url", http, "--endpoint-type", "template",
           "--endpoint", f"/v2/models/{model}/generate_stream", "--streaming",
           "--extra-inputs", f"payload_template:{template}", "--extra-inputs", "response_field:text_output",
           "--tokenizer", str(tokenizer), "--synthetic-input-tokens-mean", str(input_tokens),
           "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(output_tokens),
           "--output-tokens-stddev", "0", "--request-count", str(requests), "--random-seed", str(seed),
           "--artifact-dir", str(artifacts), "--ui-type", "none"]
    if concurrency is not None:
        cmd += ["--concurrency", ",".join(map(str, concurrency))]
    if rate is not None:
        cmd += ["--request-rate", str(rate), "--arrival-pattern", "poisson"]
    if duration_s is not None:
        cmd += ["--benchmark-duration", str(duration_s), "--benchmark-grace-period", "30"]
    if warmup:
        cmd += ["--warmup-request-count", str(warmup)]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    wall = time.monotonic() - t0
    found = sorted(artifacts.rglob("profile_export_aiperf.json"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = []
    for path in found:
        raw = json.loads(path.read_text())
        phase = raw["input_config"]["phases"][0]
        c = phase.get("concurrency") if rate is None else None
        out: dict[str, Any] = {"load": f"c{c}" if c else "poisson", "concurrency": c, "request_rate": rate,
                               "aiperf_wall_s": round(wall, 1), "export": str(path.relative_to(artifacts))}
        for key, name in METRICS.items():
            value = raw.get(key)
            if isinstance(value, dict):
                if name in ("output_tokens_per_s", "per_user_tokens_per_s"):
                    out[name] = value.get("avg")
                    continue
                for stat in ("avg", "p50", "p99"):
                    if value.get(stat) is not None:
                        out[f"{name}_{stat}"] = value[stat]
            elif value is not None:
                out[name] = value
        rows.append(out)
    return sorted(rows, key=lambda r: (r["concurrency"] is None, r["concurrency"] or 0))


def bench(build: Path, aiperf: Sequence[str], out: Path, *, concurrency: list[int], poisson_rate: float,
          input_tokens: int, output_tokens: int, requests: int, poisson_requests: int, modes: list[str],
          timeout_s: float) -> dict[str, Any]:
    spec = json.loads((build / "build_spec.json").read_text())
    tokenizer = Path(spec["target"])
    report: dict[str, Any] = {
        "build": str(build), "target": spec["target"], "draft": spec["draft"], "max_batch": spec.get("max_batch"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_generator": aiperf_version(aiperf), "input_tokens": input_tokens, "output_tokens": output_tokens,
        "endpoint": "HTTP /v2/models/dspark/generate_stream (AIPerf endpoint type `template`)", "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch:
        for mode in modes:
            rows = []
            with api.serve(build, **MODES[mode]) as server:
                http = server.endpoints.http
                log.info("%s: concurrency sweep %s, %d requests each", mode, concurrency, requests)
                rows += run_aiperf(aiperf, http, tokenizer, Path(scratch) / mode / "sweep", concurrency=concurrency,
                                   rate=None, requests=requests, input_tokens=input_tokens,
                                   output_tokens=output_tokens, timeout_s=timeout_s, seed=0)
                log.info("%s: Poisson arrivals at %.2f requests/s, %d requests", mode, poisson_rate,
                         poisson_requests)
                rows += run_aiperf(aiperf, http, tokenizer, Path(scratch) / mode / "poisson", concurrency=None,
                                   rate=poisson_rate, requests=poisson_requests, input_tokens=input_tokens,
                                   output_tokens=output_tokens, timeout_s=timeout_s, seed=1)
                for r in rows:
                    log.info("  %s", json.dumps(r))
            report["modes"][mode] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    return report


def aiperf_version(aiperf: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run([*aiperf, "--version"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    return f"aiperf {done.stdout.strip() or done.stderr.strip()}"


def plot(report: dict[str, Any], path: Path, title: str = "tiny trained pair") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output_tokens_per_s", "output tokens/s"), ("ttft_ms_p50", "TTFT p50 (ms)"),
              ("itl_ms_p50", "inter-token latency p50 (ms)"), ("itl_ms_p99", "inter-token latency p99 (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for mode, rows in report["modes"].items():
            pts = [(r["concurrency"], r.get(key)) for r in rows if r["concurrency"] and r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
            poisson = next((r for r in rows if r["load"] == "poisson" and r.get(key) is not None), None)
            if poisson is not None:
                ax.axhline(poisson[key], ls=":", lw=1, color=ax.lines[-1].get_color() if ax.lines else None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (dotted: Poisson arrivals)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"dspark serve, {report['load_generator']}, {report['machine']['cpus']} CPUs, {title}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, required=True, help="a build directory (onnx graphs, sps_profile.json)")
    ap.add_argument("--aiperf", default="aiperf", help="the aiperf command (split at spaces)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving_cpu")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--poisson-rate", type=float, default=2.0, help="requests/s of the Poisson-arrival run")
    ap.add_argument("--input-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--poisson-requests", type=int, default=16)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per AIPerf run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bench(args.build, args.aiperf.split(), args.out, concurrency=[int(c) for c in args.concurrency.split(",")],
          poisson_rate=args.poisson_rate, input_tokens=args.input_tokens, output_tokens=args.output_tokens,
          requests=args.requests, poisson_requests=args.poisson_requests,
          modes=args.modes.split(","), timeout_s=args.timeout)


if __name__ == "__main__":
    main()
