"""Serving benchmark of the device-resident torch backend under the bundled tritonserver, driven by AIPerf.

    python benchmarks/serving_gpu.py prepare --work WORK [--shape qwen3_8b] [--narrow-rounds] [--draft-rows N]
    python benchmarks/serving_gpu.py run --work WORK --aiperf "python3 -m aiperf" --out OUT [--numpy-path DIR]

``prepare`` (it needs tritonclient) writes WORK/build (``bench_pair.json``: a random-weight pair of the shape,
decisive by default — its tokens survive a batch's last-bit differences, so replayed acceptance holds at 64
streams — with drafts replayed with the survival profile ``b``, τ = 4.81, and a word-level tokenizer over its
vocabulary) and WORK/triton, three ``dspark`` orchestrators over that build in ``factory`` mode
(``serving.replay.replayed_random``: CUDA graphs in bf16 on a GPU, eager fp32 on a CPU): ``dspark_sched``
(confidence scheduler on the SPS profile measured by ``run``), ``dspark_fixed`` (every draft verified) and
``dspark_target`` (target-only decoding, no draft); with ``--draft-rows N`` a fourth, ``dspark_rowsN`` (every draft
verified up to N live rows, rounds that draft nothing above).

``run`` measures, in one process and one server: the SPS profile of the verify step; ``dspark-compile bench``'s
end-to-end figure for the same pair at batch 1 (``rounds_bench``, replay ``b``); then starts tritonserver on
WORK/triton, checks losslessness (each mode's text for the same prompts equals target-only's), and runs AIPerf
against each model at each concurrency and with Poisson arrivals. Writes OUT/serving_gpu.json (+ .png) as it goes.
The python-backend stub puts ``--numpy-path`` (numpy < 2 for that stub) first on its path.

On the device machine (Python 3.12, no network) everything travels in one carried folder of about 46 MB,
``.dev-serving`` (``benchmarks/serving_bundle.sh`` builds it from PyPI: the pytriton wheel without the other
Pythons' stubs, numpy 1.26.4 and AIPerf 0.13 with the packages the device lacks), plus WORK written here by
``prepare`` (the device has no tritonclient). ``benchmarks/device_serving.sh`` does the device side in one call
(unpack, stop what a cut call left on the GPU, run, stop the server's processes); by hand, from the repository
root:

    cd .dev-serving && for t in pytriton312:pt site_np:np site_ap:ap; do mkdir -p /tmp/${t#*:};
      tar xJf wheels/${t%:*}.tar.xz -C /tmp/${t#*:}; done && cd .. &&
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/pt python3 benchmarks/serving_gpu.py run --work .dev-serving/gpu_work \
      --out $OUT --aiperf "python3 -m aiperf" --aiperf-path /tmp/ap --numpy-path /tmp/np \
      --models dspark_sched,dspark_target,dspark_fixed --duration 4 --deadline 490 --whole-sweep

One AIPerf invocation covers a list of concurrencies. It cost 50–300 s on the H200 whatever the duration while
the request count was 100,000: AIPerf builds every request's prompt before a load (on this CPU box a two-load
invocation took 123.6 s with 100,000 requests and 25.5 s with 500), so the count is now sized to the duration
(``max(500, 20 · the largest concurrency)``). By default the sweep's ends (c1, c64) and its middle (c4, c16) are
two invocations per model, 9 with the Poisson runs; ``--whole-sweep`` makes the sweep one invocation per model.
What the deadline cuts is recorded under ``skipped``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving_bench import aiperf_version, plot, run_aiperf  # noqa: E402

log = logging.getLogger("serving_gpu")

MODELS = {"dspark_sched": {"verify": "schedule"}, "dspark_fixed": {"verify": "fixed"},
          "dspark_target": {"verify": "fixed", "speculative": "false"}}
FACTORY = "dspark_compile.serving.replay:replayed_random"
PYTHON_PATH = "@PYTHON_PATH@"


def prepare(work: Path, shape: str, max_batch: int, max_slots: int, forced: bool = False,
            narrow: bool = False, draft_rows: int | None = None) -> None:
    """``draft_rows``: also ``dspark_rows{N}``, every draft verified while at most N rows are live and rounds that
    draft nothing above (VerifyPolicy.draft_rows); a fourth copy of the weights on the GPU, so opt-in."""
    from dspark_compile.serving.replay import PairSpec
    from dspark_compile.targets.triton import pbtxt

    build, repo = work / "build", work / "triton"
    shutil.rmtree(work, ignore_errors=True)
    PairSpec(shape=shape, replay="b", max_slots=max_slots, forced=forced, narrow_rounds=narrow).write(build)
    models = dict(MODELS)
    if draft_rows is not None:
        models[f"dspark_rows{draft_rows}"] = {"verify": "fixed", "draft_rows": str(draft_rows)}
    for name, opts in models.items():
        model = repo / name
        (model / "1").mkdir(parents=True)
        shutil.copyfile(ROOT / "dspark_compile/targets/triton/orchestrator_model.py", model / "1" / "model.py")
        params = {"backend_mode": "factory", "backend_factory": FACTORY, "build_dir": "../build",
                  "python_path": PYTHON_PATH, "max_batch": max_batch, "max_context": max_slots,
                  "default_max_new_tokens": 64, "batching": "continuous", "speculative": "true", **opts}
        (model / "config.pbtxt").write_text(pbtxt.render(pbtxt.orchestrator_config(name, params)))


def finish_repository(work: Path, python_path: list[str]) -> None:
    """What ``prepare`` leaves to the serving machine: its python path, and the tokenizer (MBs for a large
    vocabulary: written here rather than carried) in the build and in each model."""
    from dspark_compile.serving.replay import PairSpec, write_word_tokenizer

    tokenizer = work / "build" / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        write_word_tokenizer(PairSpec.read(work / "build").pair_shape().vocab_size, tokenizer)
    for config in (work / "triton").glob("*/config.pbtxt"):
        config.write_text(config.read_text().replace(PYTHON_PATH, ":".join(python_path)))
        shutil.copyfile(tokenizer / "tokenizer.json", config.parent / "tokenizer.json")


def measure_in_process(build: Path, prompt: list[int], output_tokens: int, max_batch: int) -> dict[str, Any]:
    """SPS profile (written into the build for the scheduler), and the bench's figures at batch 1 and at
    ``max_batch`` (the tight loop's whole round, target-only and replayed, with no serving), same weights."""
    import torch

    from dspark_compile.serving.replay import replayed_random
    from dspark_compile.targets.torch.bench import rounds_bench
    from dspark_compile.tools.profile_sps import profile_sps, write_profile

    t0 = time.monotonic()
    backend = replayed_random(build)
    device = str(backend.inner.device)
    prof = profile_sps(backend.inner, max_batch=max_batch, context=256, repeats=3, backend_name="torch-cuda-graph",
                       device=device)
    write_profile(prof, build)
    t1 = time.monotonic()
    dec = rounds_bench(backend.inner, [prompt], max_new_tokens=output_tokens, replays=("b",))
    t2 = time.monotonic()
    wide = rounds_bench(backend.inner, [prompt] * max_batch, max_new_tokens=output_tokens, replays=("b",))
    keep = ("target_only", "replay_b")
    out = {"device": device, "sps_profile": prof.to_json(), "sps_seconds": round(t1 - t0, 1),
           "bench_batch1": {k: dec[k] for k in keep if k in dec}, "bench_seconds": round(t2 - t1, 1),
           f"bench_batch{max_batch}": {k: wide[k] for k in keep if k in wide},
           f"bench_batch{max_batch}_seconds": round(time.monotonic() - t2, 1)}
    del backend
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def generate_text(http: str, model: str, text: str, max_tokens: int, timeout_s: float = 300) -> str:
    body = json.dumps({"text_input": text, "max_tokens": max_tokens, "stream": True}).encode()
    req = urllib.request.Request(f"{http}/v2/models/{model}/generate_stream", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as reply:
        events = [json.loads(line[5:]) for line in reply.read().decode().splitlines() if line.startswith("data:")]
    errors = [e["error"] for e in events if "error" in e]
    if errors:
        raise RuntimeError(f"{model}: {errors[0]}")
    return "".join(e.get("text_output", "") for e in events)


def warm_up(http: str, model: str, prompt: str, max_tokens: int, concurrency: list[int]) -> None:
    """Capture the graphs of every batch bucket the loads reach (and compute the replay reference) first."""
    for c in concurrency:
        threads = [threading.Thread(target=generate_text, args=(http, model, prompt, max_tokens), daemon=True)
                   for _ in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)


def run(work: Path, out: Path, aiperf: list[str], aiperf_path: str | None, numpy_path: str | None, *,
        concurrency: list[int], input_tokens: int, output_tokens: int, duration_s: float, poisson_rate: float,
        max_batch: int, models: list[str], deadline_s: float, whole_sweep: bool = False) -> dict[str, Any]:
    from dspark_compile.serving.batcher import STATS_ENV
    from dspark_compile.serving.text import TextCodec
    from dspark_compile.targets.triton.server import TritonServer

    started = time.monotonic()
    work = work.resolve()  # the stubs run elsewhere: the paths they are given must be absolute
    build, repo = work / "build", work / "triton"
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "python": platform.python_version()},
                              "pair": json.loads((build / "bench_pair.json").read_text()),
                              "input_tokens": input_tokens, "output_tokens": output_tokens, "modes": {}}
    save = lambda: (out / "serving_gpu.json").write_text(json.dumps(report, indent=2) + "\n")  # noqa: E731
    paths = sysconfig.get_paths()  # as repository.default_python_path, without importing tritonclient's protobuf
    finish_repository(work, list(dict.fromkeys(p for p in (numpy_path, paths["purelib"], paths["platlib"], str(ROOT))
                                               if p)))
    codec = TextCodec.load(build / "tokenizer")
    prompt_text = " ".join(["<unk>"] * input_tokens)  # what AIPerf's synthetic prompts become (unknown words)
    prompt = codec.encode(prompt_text)
    report |= measure_in_process(build, prompt, output_tokens, max_batch)
    save()
    os.environ[STATS_ENV] = str(work / "stats-{model}.json")  # each orchestrator's counters (τ served)
    ap_env = {"PYTHONPATH": aiperf_path or ""}  # not HF_HUB_OFFLINE: AIPerf 0.13 then reads a path as a hub id
    report["load_generator"] = aiperf_version(aiperf, ap_env)
    with TritonServer(repo, startup_timeout_s=600, work_dir=work / "server") as server:
        http = f"http://{server.http_url}"
        report["server_startup_s"] = round(server.startup_s, 1)
        t0 = time.monotonic()
        texts = {}
        for model in models:
            warm_up(http, model, prompt_text, output_tokens, concurrency)
            texts[model] = generate_text(http, model, prompt_text, output_tokens)
        report["warmup_s"] = round(time.monotonic() - t0, 1)
        want = texts.get("dspark_target")
        report["lossless"] = {m: (t == want) for m, t in texts.items()} if want is not None else None
        report["sample_text"] = want[:200] if want else None
        save()
        # Enough requests to outlast --duration at every load, no more: AIPerf builds every request's prompt first
        # (100,000 of them cost about 50 s per load on the CPU box).
        requests = max(500, 20 * max(concurrency))
        for model, load in schedule_loads(models, concurrency, whole_sweep):
            if time.monotonic() - started > deadline_s:
                report.setdefault("skipped", []).append(f"{model} {load}: past the --deadline")
                continue
            name = "poisson" if load == "poisson" else "c" + "_".join(map(str, load))  # no commas: AIPerf splits
            try:
                rows = run_aiperf(aiperf, http, build / "tokenizer", work / "aiperf" / model / name,
                                  concurrency=None if load == "poisson" else load,
                                  rate=poisson_rate if load == "poisson" else None, requests=requests,
                                  input_tokens=input_tokens, output_tokens=output_tokens, timeout_s=300, seed=0,
                                  model=model, duration_s=duration_s, env=ap_env)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # keep what the other runs measure
                report.setdefault("failed", []).append(f"{model} {load}: {str(exc)[-2000:]}")
                save()
                continue
            stats_file = work / f"stats-{model}.json"
            counters = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
            if counters.get("row_rounds"):
                counters["tau_served"] = 1 + counters["accepted_drafts"] / counters["row_rounds"]
            if counters.get("rounds") and "host_seconds" in counters:  # where a round's wall time goes (batcher)
                counters["host_ms_per_round"] = {k: round(1e3 * v / counters["rounds"], 3)
                                                 for k, v in counters["host_seconds"].items()}
            mode = report["modes"].setdefault(model.removeprefix("dspark_"), [])
            mode += rows
            mode.sort(key=lambda r: (r["concurrency"] is None, r["concurrency"] or 0))
            report.setdefault("orchestrator_stats", {})[model] = counters
            report["summary"] = summarize(report)
            save()
            for r in rows:
                log.info("%s %s", model, json.dumps(r))
    report["summary"] = summarize(report)
    save()
    plot(report, out / "serving_gpu.png", title=f"{report['pair']['shape']} replayed τ 4.81, {report['device']}")
    return report


def schedule_loads(models: list[str], concurrency: list[int], whole_sweep: bool = False) -> list[tuple[str, Any]]:
    """AIPerf runs, most needed first (the goals: c1 and c64, speculative vs target-only), so a run cut short by
    the deadline still answers them: the ends of the sweep, then the middle, then Poisson arrivals (each group in
    ``models`` order: list the model whose Poisson run matters least last). ``whole_sweep``: one invocation per
    model for every concurrency (AIPerf's start-up, about 50 s, is then paid once per model, not twice)."""
    ends = [c for c in concurrency if whole_sweep or c in (min(concurrency), max(concurrency))]
    middle = [c for c in concurrency if c not in ends]
    out: list[tuple[str, Any]] = []
    for group in ([ends], [middle] if middle else [], [["poisson"]]):
        for loads in group:
            out += [(m, load) for m in models for load in (loads if loads == ["poisson"] else [loads])]
    return out


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals from the rows: per-user tokens/s at c1 (AIPerf's, decode only), throughput ratios."""
    def row(mode: str, load: str) -> dict[str, Any]:
        return next((r for r in report["modes"].get(mode, []) if r["load"] == load), {})

    out: dict[str, Any] = {}
    for mode in report["modes"]:
        out[f"{mode}_per_user_tokens_per_s_c1"] = row(mode, "c1").get("per_user_tokens_per_s")
    t1 = out.get("target_per_user_tokens_per_s_c1")
    for mode in ("sched", "fixed"):
        s1 = out.get(f"{mode}_per_user_tokens_per_s_c1")
        if s1 and t1:
            out[f"{mode}_vs_target_c1"] = s1 / t1
        for load in ("c1", "c4", "c16", "c64", "poisson"):
            a, b = row(mode, load).get("output_tokens_per_s"), row("target", load).get("output_tokens_per_s")
            if a and b:
                out[f"{mode}_vs_target_throughput_{load}"] = a / b
    bench = report.get("bench_batch1", {}).get("replay_b", {}).get("tokens_per_s")
    if bench and out.get("sched_per_user_tokens_per_s_c1"):
        out["served_vs_bench_c1_sched"] = out["sched_per_user_tokens_per_s_c1"] / bench
    if bench and out.get("fixed_per_user_tokens_per_s_c1"):
        out["served_vs_bench_c1_fixed"] = out["fixed_per_user_tokens_per_s_c1"] / bench
    out["bench_replay_b_tokens_per_s_batch1"] = bench
    for key, value in report.items():  # the tight loop at the largest batch: what serving could reach there
        if key.startswith("bench_batch") and key != "bench_batch1" and isinstance(value, dict):
            for mode in ("target_only", "replay_b"):
                out[f"{key}_{mode}_tokens_per_s"] = value.get(mode, {}).get("tokens_per_s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("prepare", "run"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shape", default="qwen3_8b")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-slots", type=int, default=256)
    ap.add_argument("--forced-replay", action="store_true",
                    help="prepare: timing-only replay (every round accepts the replayed prefix; see "
                         "CudaGraphBackend.set_replay); the lossless check then compares with the reference")
    ap.add_argument("--narrow-rounds", action="store_true",
                    help="prepare: rounds verify as many positions as their longest ℓ needs (the scheduled model "
                         "then trades drafts for time at high batch; CudaGraphBackend narrow_rounds)")
    ap.add_argument("--draft-rows", type=int,
                    help="prepare: a fourth model, dspark_rowsN, whose rounds draft nothing above N live rows")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--aiperf", default="aiperf", help="the aiperf command (split at spaces)")
    ap.add_argument("--aiperf-path", help="PYTHONPATH for AIPerf (its wheels unpacked)")
    ap.add_argument("--numpy-path", help="a numpy<2 directory for the python-backend stub")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per AIPerf load")
    ap.add_argument("--poisson-rate", type=float, default=20.0)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--deadline", type=float, default=1e9, help="start no AIPerf run after this many seconds")
    ap.add_argument("--whole-sweep", action="store_true", help="one AIPerf invocation per model for every "
                    "concurrency (fewer start-ups; a deadline then cuts whole models)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.step == "prepare":
        prepare(args.work, args.shape, args.max_batch, args.max_slots, args.forced_replay, args.narrow_rounds,
                args.draft_rows)
        return
    if args.out is None:
        ap.error("run needs --out")
    # `timeout` sends SIGTERM: unwind, so the server and its GPU stubs stop with us (they outlived a cut run once)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(args.work, args.out, args.aiperf.split(), args.aiperf_path, args.numpy_path,
        concurrency=[int(c) for c in args.concurrency.split(",")], input_tokens=args.input_tokens,
        output_tokens=args.output_tokens, duration_s=args.duration, poisson_rate=args.poisson_rate,
        max_batch=args.max_batch, models=args.models.split(","), deadline_s=args.deadline,
        whole_sweep=args.whole_sweep)


if __name__ == "__main__":
    main()
