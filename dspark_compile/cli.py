"""`dspark-compile`: a thin click shell over :mod:`dspark_compile.api`.

Exit codes: 0 success; 1 internal error (a bug: traceback printed); 2 bad input (one line on stderr);
3 a build step rejected its input; 4 an optional backend (TensorRT, onnxruntime, tritonserver, GPU) is
unavailable; 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dspark_compile.errors import DsparkError, UsageError
from dspark_compile.runtime.decode import build_tokenizer, read_prompt_file

F = TypeVar("F", bound=Callable[..., Any])
DRAFT_ROWS_HELP = ("Rounds with more live requests than this are plain decoding steps (nothing verified, the draft's "
                   "context kept); fewer speculate. Default: always speculate.")
DRAFT_ROWS_AUTO_HELP = DRAFT_ROWS_HELP + (" auto: the number `bench BUILD --plain-rounds --prompt-file P` measured "
                                          "(BUILD/draft_rows.json).")


class DraftRows(click.ParamType):
    """``--draft-rows``: a number of rows >= 0, or ``auto`` (the build's measured draft_rows.json)."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str | None:
        from dspark_compile.runtime.decode import parse_draft_rows

        try:
            return parse_draft_rows(value)
        except UsageError as e:
            self.fail(str(e), param, ctx)


log = logging.getLogger("dspark_compile")


def parse_prompt_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UsageError(f"--prompt-ids {text!r}: give comma-separated token ids, e.g. --prompt-ids 1,2,3")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--prompt-ids {text!r}: token ids must be integers, e.g. --prompt-ids 1,2,3") from None


def prompts_from(prompt_ids: tuple[str, ...], prompt_file: Path | None, tokenizer: Path | None) -> list[list[int]]:
    """The prompts of ``--prompt-ids`` or ``--prompt-file`` (text lines encoded with ``tokenizer``'s)."""
    if bool(prompt_ids) == bool(prompt_file):
        raise UsageError("give exactly one of --prompt-ids (repeatable) or --prompt-file")
    if prompt_file is not None:
        return read_prompt_file(prompt_file, tokenizer)
    return [parse_prompt_ids(p) for p in prompt_ids]


def emit(obj: Any, as_json: bool, human: Callable[[Any], None] | None = None) -> None:
    if as_json:
        click.echo(json.dumps(obj, separators=(",", ":")))
    elif human is not None:
        human(obj)
    else:
        click.echo(json.dumps(obj, indent=2))


def common(fn: F) -> F:
    @click.option("--debug", is_flag=True, help="Show tracebacks for user errors too.")
    @click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
    @click.option("-q", "--quiet", is_flag=True, help="Only errors.")
    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool, verbose: int, quiet: bool, **kwargs: Any) -> Any:
        del debug  # read by main() from argv: it decides before click parses whether errors get a traceback
        level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dspark-compile")
def cli() -> None:
    """Compile a Qwen3 or Gemma4 target + DSpark draft head into speculative-decoding engines."""


def _inspect_build(build_dir: Path, as_json: bool) -> None:
    """The GPU memory a server of the build needs at its max batch and context (manifest ``memory``)."""
    from dspark_compile.passes.manifest import gib, server_memory
    from dspark_compile.runtime.onnxruntime_backend import read_manifest

    manifest = read_manifest(build_dir)
    memory = server_memory(manifest)
    assert memory is not None  # read_manifest refuses a build without a program
    engines = [{k: p[k] for k in ("graph", "segment", "segments", "plan_bytes", "weight_bytes", "activation_bytes",
                                  "activation_source") if k in p}
               for p in (manifest.get("engines") or {}).get("plans") or []]
    q = manifest.get("quantization")
    quantized = None if q is None else {"method": q["method"], "lm_head": q["lm_head"], "draft": q["draft"],
                                        "fp8_products": len(q["layers"])}
    report = {"build": str(build_dir), "memory": memory, "engines": engines, "quantization": quantized}

    def human(r: dict[str, Any]) -> None:
        m = r["memory"]
        lines = [f"GPU memory of a server of {r['build']} at batch {m['max_batch']}, {m['max_context']} slots:",
                 f"  weights      {gib(m['weight_bytes'])} (every engine's, and the shared embedding / LM head once)",
                 f"  KV caches    {gib(m['kv_cache_bytes'])}",
                 f"  activations  {gib(m['activation_bytes'])} ({', '.join(m['activation_source'])})",
                 f"  buffers      {gib(m['buffer_bytes'])}",
                 f"  total        {gib(m['total_bytes'])}"]
        if (fp8 := r["quantization"]) is not None:
            parts = ["the target's layers"] + ["the LM head"] * fp8["lm_head"] + ["the draft"] * fp8["draft"]
            lines.append(f"  e4m3 weights ({fp8['method']}, {fp8['fp8_products']} products): {', '.join(parts)}")
        for e in r["engines"]:
            part = f" segment {e['segment']}/{e['segments']}" if "segment" in e else ""
            lines.append(f"  engine {e['graph']}{part}: plan {gib(e['plan_bytes'])}, weights {gib(e['weight_bytes'])}, "
                         f"activations per profile {[round(a / 2**30, 2) for a in e['activation_bytes']]} GiB")
        click.echo("\n".join(lines))

    emit(report, as_json, human)


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.argument("draft", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf weights.")
@common
def inspect(target: Path, draft: Path | None, as_json: bool, allow_nonfinite: bool) -> None:
    """Describe a (TARGET, DRAFT) pair and say whether it is compatible; or, given one BUILD directory, the GPU
    memory a server of it needs (weights, KV caches, activations at the built max batch and context)."""
    from dspark_compile import api

    if draft is None:
        if not (target / "manifest.json").is_file():
            raise UsageError(f"{target}: not a build directory (no manifest.json); pass a build directory, or "
                             "TARGET DRAFT checkpoint directories")
        _inspect_build(target, as_json)
        return
    report = api.inspect_pair(target, draft, allow_nonfinite=allow_nonfinite)

    def human(r: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="dspark-compile inspect", show_header=True)
        t.add_column("")
        t.add_column("target")
        t.add_column("draft")
        tg, dr = r["target"], r["draft"]
        t.add_row("path", tg["path"], dr["path"])
        t.add_row("family", tg["family"], dr["family"])
        t.add_row("architecture", tg["architecture"], dr["architecture"])
        t.add_row("parameters", f"{tg['parameters']:,}", f"{dr['parameters_excluding_shared']:,} (+ shared)")
        t.add_row("layers", str(tg["layers"]), str(dr["layers"]))
        if tg["quantization"] is not None:  # a pre-quantized FP8 checkpoint
            q = tg["quantization"]
            t.add_row("quantization", f"{q['method']}, {q['weights']} e4m3 weights", "")
        t.add_row("taps / block", "", f"{dr['target_layer_ids']} / γ={dr['block_size']}")
        t.add_row("markov", "", f"{dr['markov_head_type']} r={dr['markov_rank']}")
        t.add_row("confidence head", "", str(dr["confidence_head"]))
        con = Console()
        con.print(t)
        for k, v in r["memory_bytes"].items():
            con.print(f"memory {k}: {v / 2**20:.1f} MiB")
        con.print("[green]compatible[/green]" if r["compatible"] else "[red]NOT compatible[/red]")
        for p in r["problems"]:
            con.print(f"  - {p}")

    emit(report, as_json, human)
    if not report["compatible"]:
        sys.exit(2)


@cli.command()
@click.option("--target", required=True, type=click.Path(path_type=Path), help="Target checkpoint directory.")
@click.option("--draft", type=click.Path(path_type=Path), help="DSpark draft checkpoint directory.")
@click.option("--prompt-ids", multiple=True, help="Comma-separated token ids; repeat for a batch.")
@click.option("--prompt-file", type=click.Path(path_type=Path),
              help="JSON Lines file of prompts: id lists, or text (the target's tokenizer.json).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--block-size", type=int, help="Draft block γ (default: the draft's block_size).")
@click.option("--confidence-threshold", type=float, help="Static confidence threshold for the verify length.")
@click.option("--verify", default="fixed", show_default=True, help="fixed | fixed=K | threshold=X | schedule")
@click.option("--draft-rows", type=int, help=DRAFT_ROWS_HELP)
@click.option("--baseline", is_flag=True, help="Target-only decoding.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option("--device", default="cpu", show_default=True)
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf weights.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one object per prompt.")
@common
def generate(target: Path, draft: Path | None, prompt_ids: tuple[str, ...], prompt_file: Path | None,
             max_new_tokens: int, temperature: float, seed: int, block_size: int | None,
             confidence_threshold: float | None, verify: str, draft_rows: int | None, baseline: bool, dtype: str,
             device: str, allow_nonfinite: bool, as_json: bool) -> None:
    """Decode with the PyTorch reference program."""
    from dspark_compile import api

    if draft is None and not baseline:
        raise UsageError("--draft is required unless --baseline is given")
    prompts = prompts_from(prompt_ids, prompt_file, target)
    results = api.generate(target, draft, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           seed=seed, block_size=block_size, verify=verify,
                           confidence_threshold=confidence_threshold, baseline=baseline, dtype=dtype,
                           device=device, allow_nonfinite=allow_nonfinite, draft_rows=draft_rows)
    _print_results(results, as_json)


@cli.command()
@click.option("--spec", "spec_file", type=click.Path(path_type=Path), help="TOML/YAML build spec.")
@click.option("--target", type=click.Path(path_type=Path), help="Target checkpoint directory.")
@click.option("--draft", type=click.Path(path_type=Path), help="DSpark draft checkpoint directory.")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (replaced atomically).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option("--block-size", type=int, help="Drafts per round γ (≤ the draft's trained block size).")
@click.option("--max-batch", type=int)
@click.option("--max-context", type=int, help="Cache slots the engines are profiled for.")
@click.option("--verify-mode", type=click.Choice(["greedy", "sampling"]))
@click.option("--targets", help="Comma-separated: onnx, tensorrt, triton.")
@click.option("--trt-flavor", type=click.Choice(["auto", "full", "rtx"]))
@click.option("--triton-mode", type=click.Choice(["bls", "onnxruntime_inprocess"]),
              help="How the Triton orchestrator runs the graphs.")
@click.option("--kv-buckets", help="Comma-separated cache-slot bucket edges for TensorRT profiles.")
@click.option("--gpu-memory", help="GPU memory of the server (e.g. 80GiB): fail (exit 3) when the build needs more.")
@click.option("--max-engine-gb", type=float,
              help="Most constant weights (GB) per TensorRT engine (default 6): a larger target is split by layer "
                   "range into chained engines, since the builder holds ~2.2x an engine's weights while building.")
@click.option("--no-plugin", is_flag=True, default=None, help="Decompose SpecVerify even for full TensorRT.")
@click.option("--allow-nonfinite", is_flag=True, default=None, help="Accept NaN/Inf weights.")
@click.option("--quantize", type=click.Choice(["fp8", "fp8-dynamic"]),
              help="FP8 (e4m3) target linear weights, per-channel scales; fp8-dynamic: their inputs too (W8A8, "
                   "dynamic scales per row and 128 columns).")
@click.option("--quantize-lm-head", is_flag=True, default=None,
              help="With --quantize or an FP8 target checkpoint: the LM head too.")
@click.option("--quantize-draft", is_flag=True, default=None,
              help="With --quantize or an FP8 target checkpoint: the draft's layers, fc and Markov W2 too.")
@click.option("--check-acceptance", type=click.Path(path_type=Path),
              help="Prompts (JSON Lines): decode with the build and the full-precision reference; exit 3 on a τ drop.")
@click.option("--max-tau-drop", type=float, help="Largest relative τ drop --check-acceptance accepts (default 0.03).")
@click.option("--stop-after", help="Stop after this pass (the build is still finalised).")
@click.option("--dump-after", multiple=True, help="Copy the artifacts as they are after this pass into dump/.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@common
def build(spec_file: Path | None, as_json: bool, stop_after: str | None, dump_after: tuple[str, ...],
          **fields: Any) -> None:
    """Compile TARGET + DRAFT into ONNX graphs, TensorRT engines and a Triton repository."""
    from dspark_compile import api

    res = api.build(spec_file, stop_after=stop_after, dump_after=dump_after, progress=not as_json, **fields)
    summary = {
        "out": str(res.out),
        "stopped_after": res.stopped_after,
        "passes": res.manifest["passes"],
        "artifacts": [{k: a[k] for k in ("path", "bytes", "sha256")} for a in res.manifest["artifacts"]],
        "engines": res.manifest.get("engines"),
    }
    if as_json:
        click.echo(json.dumps(summary, separators=(",", ":")))
        return
    click.echo(f"built {res.out}")
    for p in summary["passes"]:
        click.echo(f"  {p['name']:<24} {p['seconds']:8.2f}s")
    total = sum(a["bytes"] for a in summary["artifacts"])
    click.echo(f"  {len(summary['artifacts'])} artifacts, {total / 2**20:.1f} MiB; see manifest.json")


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--prompt-ids", multiple=True, help="Comma-separated token ids; repeat for a batch.")
@click.option("--prompt-file", type=click.Path(path_type=Path),
              help="JSON Lines file of prompts: id lists, or text (the target's tokenizer.json).")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "torch"]))
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--verify", default="auto", show_default=True,
              help="fixed | fixed=K | threshold=X | schedule | auto (schedule when the build has an SPS profile and "
                   "the draft a confidence head, else fixed)")
@click.option("--draft-rows", type=DraftRows(), help=DRAFT_ROWS_AUTO_HELP)
@click.option("--baseline", is_flag=True, help="Target-only decoding.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one object per prompt.")
@common
def run(build_dir: Path, prompt_ids: tuple[str, ...], prompt_file: Path | None, backend: str, max_new_tokens: int,
        temperature: float, seed: int, verify: str, draft_rows: int | str | None, baseline: bool, device: str,
        as_json: bool) -> None:
    """Decode with a build's graphs; prints the same output as `generate`."""
    from dspark_compile import api

    prompts = prompts_from(prompt_ids, prompt_file, build_tokenizer(build_dir))
    results = api.run(build_dir, prompts, backend=backend, max_new_tokens=max_new_tokens, temperature=temperature,
                      seed=seed, verify=verify, baseline=baseline, device=device, draft_rows=draft_rows)
    _print_results(results, as_json)


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "torch"]))
@click.option("--max-batch", type=int, help="Requests to profile up to (default: the build's max_batch).")
@click.option("--context", default=256, show_default=True, type=int, help="Committed tokens in the cache.")
@click.option("--repeats", default=5, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@common
def profile(build_dir: Path, backend: str, max_batch: int | None, context: int, repeats: int, device: str,
            as_json: bool) -> None:
    """Measure SPS(B) of the verify graph (for --verify schedule); writes sps_profile.json/.png."""
    from dspark_compile import api

    prof = api.profile(build_dir, backend=backend, max_batch=max_batch, context=context, repeats=repeats,
                       device=device)
    if as_json:
        click.echo(json.dumps(prof, separators=(",", ":")))
    else:
        for b, s in zip(prof["batch_sizes"], prof["steps_per_second"], strict=True):
            click.echo(f"SPS({b:4d}) = {s:10.1f} steps/s")
        click.echo(f"wrote {build_dir / 'sps_profile.json'}")


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Held-out prompts (JSON Lines: id lists or text).")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "torch"]))
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@common
def calibrate(build_dir: Path, data: Path, backend: str, max_new_tokens: int, device: str, as_json: bool) -> None:
    """Sequential Temperature Scaling of the confidence head; writes calibration.json + reliability.png."""
    from dspark_compile import api

    res = api.calibrate(build_dir, read_prompt_file(data, build_tokenizer(build_dir)), backend=backend,
                        max_new_tokens=max_new_tokens, device=device)
    if as_json:
        click.echo(json.dumps(res, separators=(",", ":")))
    else:
        for k, (t, b, a) in enumerate(zip(res["temperatures"], res["ece_before"], res["ece_after"], strict=True), 1):
            click.echo(f"position {k}: T={t:.3f}  ECE {b} -> {a}")
        click.echo(f"wrote {build_dir / 'calibration.json'}")


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--http-port", default=0, type=int, help="HTTP port (default: a free one).")
@click.option("--grpc-port", default=0, type=int, help="gRPC port (default: a free one).")
@click.option("--verify", help="Override the build's verify policy: fixed | fixed=K | threshold=X | schedule | auto.")
@click.option("--draft-rows", type=DraftRows(), help=DRAFT_ROWS_AUTO_HELP)
@click.option("--target-only", is_flag=True, help="Decode target-only with the same graphs (a baseline).")
@click.option("--startup-timeout", default=180.0, show_default=True, type=float, help="Seconds to wait for ready.")
@click.option("--json", "as_json", is_flag=True, help="Print the endpoints as one JSON line once ready.")
@common
def serve(build_dir: Path, host: str, http_port: int, grpc_port: int, verify: str | None,
          draft_rows: int | str | None, target_only: bool, startup_timeout: float, as_json: bool) -> None:
    """Serve a build with the bundled tritonserver until Ctrl-C (exit 130) or SIGTERM (exit 0)."""
    import signal
    import time

    from dspark_compile import api
    from dspark_compile.errors import BackendUnavailableError

    stopped_by: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped_by.append(signum))
    previous_int = None
    server = None
    try:
        server = api.serve(build_dir, host=host, http_port=http_port, grpc_port=grpc_port, verify=verify,
                           target_only=target_only, startup_timeout_s=startup_timeout, draft_rows=draft_rows)
        ep = server.endpoints
        if as_json:
            click.echo(json.dumps(ep.to_json(), separators=(",", ":")))
        else:
            click.echo(f"serving {build_dir} (model `dspark`, {'text and ' if ep.text else ''}token ids)")
            click.echo(f"  HTTP  {ep.http}    gRPC  {ep.grpc}    log  {ep.log}")
            click.echo(f"  try:  {ep.example_curl()}")
            click.echo("Ctrl-C stops it.")
        # From here Ctrl-C is a flag, as SIGTERM is: a KeyboardInterrupt may land anywhere, also inside the
        # subprocess bookkeeping that the stop after it waits on (a once-seen stop that outlived 60 s under load).
        previous_int = signal.signal(signal.SIGINT, lambda signum, frame: stopped_by.append(signum))
        while not stopped_by and server.is_running():
            time.sleep(0.2)
        if not stopped_by:
            raise BackendUnavailableError(f"tritonserver exited by itself; its log {ep.log} (kept until exit):\n"
                                          + "\n".join(server.triton.read_log().splitlines()[-20:]))
        if stopped_by[0] == signal.SIGINT:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if server is not None:
            server.stop()
        click.echo("interrupted; server stopped", err=True)
        sys.exit(130)
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
    if not as_json:
        click.echo("server stopped")


@cli.command()
@click.option("--out", default="dspark-demo-out", show_default=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object with the results.")
@common
def demo(out: Path, as_json: bool) -> None:
    """Build the shipped trained tiny pair (no files needed), decode text and check it is lossless."""
    from dspark_compile import api

    report = api.demo(out, progress=not as_json)
    ok = all(report["onnxruntime_equals_torch"]) and all(report["lossless_vs_target_only"])
    report["ok"] = ok
    if as_json:
        click.echo(json.dumps(report, separators=(",", ":")))
    else:
        click.echo(f"built {report['build']} (targets: {', '.join(report['targets'])})")
        for p in report["passes"]:
            click.echo(f"  {p['name']:<24} {p['seconds']:8.2f}s")
        click.echo(f"onnxruntime == PyTorch reference: {report['onnxruntime_equals_torch']}")
        click.echo(f"speculative == target-only (lossless): {report['lossless_vs_target_only']}")
        click.echo(f"mean accepted per round (bonus counted): {report['mean_accepted']}")
        for prompt, text in zip(report["prompts"], report["texts"], strict=True):
            click.echo(click.style(prompt, dim=True) + click.style(text, bold=True))
            click.echo("-" * 40)
        click.echo("demo OK" if ok else "demo FAILED")
    if not ok:
        sys.exit(1)


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path), required=False)
@click.option("--random-shape", type=click.Choice(["qwen3-8b", "gemma4-12b", "smoke", "gemma4-smoke"]),
              help="Instead of BUILD_DIR: a pair of this published shape with random weights built on the device "
              "(decisive ones: their tokens do not depend on the batch, so losslessness is checked at every batch).")
@click.option("--batch", "batch", default="1,16,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--replay", default="", help="Acceptance replay profiles, comma-separated: a (Qwen3-8B GSM8K), "
              "b (macro τ 4.81), c (trained tiny pair); results are labelled replayed.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG of tokens/s and host time per batch.")
@click.option("--prompt-file", type=click.Path(path_type=Path),
              help="Held-out prompts (JSON Lines) for τ and tokens/s; default 8 random prompts.")
@click.option("--repeats", default=10, show_default=True, type=int, help="Timed calls per step time.")
@click.option("--context", default=1024, show_default=True, type=int, help="Cached tokens for the step times.")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option("--device", default="auto", show_default=True, help="auto | cuda | cpu (auto: CUDA when visible).")
@click.option("--plain-rounds", is_flag=True,
              help="Also time the rounds a batch over --draft-rows falls back to (nothing drafted), and suggest "
              "--draft-rows from them: the largest measured batch up to which speculation wins.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every number.")
@common
def bench(build_dir: Path | None, random_shape: str | None, batch: str, max_new_tokens: int, replay: str,
          plot: Path | None, prompt_file: Path | None, repeats: int, context: int, dtype: str, device: str,
          plain_rounds: bool, as_json: bool) -> None:
    """Decode speed with the torch target (one CUDA graph per round on a GPU): step times, overhead ratio, τ,
    tokens/s speculative vs target-only, host time per round, losslessness; optionally replayed acceptance."""
    from dspark_compile import api

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch {batch!r}: give comma-separated integers, e.g. --batch 1,4,16,64") from None
    if not batches or min(batches) < 1:
        raise UsageError(f"--batch {batch!r}: batch sizes must be >= 1")
    prompts = (read_prompt_file(prompt_file, build_tokenizer(build_dir) if build_dir is not None else None)
               if prompt_file is not None else None)
    replays = tuple(r.strip() for r in replay.split(",") if r.strip())
    if (build_dir is None) == (random_shape is None):
        raise UsageError("bench: give either BUILD_DIR or --random-shape (not both)")
    rep = api.bench(build_dir, batches=batches, max_new_tokens=max_new_tokens, prompts=prompts, repeats=repeats,
                    context=context, dtype=dtype, device=device, replay=replays, plot=plot, random_shape=random_shape,
                    plain_rounds=plain_rounds)
    if as_json:
        click.echo(json.dumps(rep, separators=(",", ":")))
        return
    be = rep["backend"]
    click.echo(f"{be['backend']} on {rep['device']} ({be['dtype']}), γ={rep['gamma']}, context {rep['context']}, "
               f"copy bandwidth {rep['copy_bandwidth_gb_s']:.0f} GB/s, target byte floor "
               f"{rep.get('target_floor_ms', float('nan')):.3f} ms")
    for r in rep["batches"]:
        line = (f"B={r['batch']:3d}  T_target {r['t_target_ms']:8.3f} ms  T_verify {r.get('t_verify_ms', 0):8.3f} ms  "
                f"T_draft {r.get('t_draft_ms', 0):8.3f} ms  overhead {r.get('overhead_ratio', 0):.3f}")
        if "tau" in r:
            line += (f"  tau {r['tau']:.3f}  spec {r['spec_tokens_per_s']:.1f} tok/s  target "
                     f"{r['target_tokens_per_s']:.1f} tok/s  speedup {r['speedup']:.3f}  host "
                     f"{r['host_ms_per_round'] or 0:.3f} ms/round  lossless {r['lossless_fraction']:.2f}")
        click.echo(line)
        if "target_round_vs_floor" in r:
            click.echo(f"       target-only round graph {r['decode']['target_only']['round_graph_ms']:.3f} ms "
                       f"({r['target_round_vs_floor']:.3f}x the byte floor; host step {r['target_vs_floor']:.3f}x)")
        for name in replays:
            d = r["decode"].get(f"replay_{name}")
            if d:
                click.echo(f"       replayed {name}: tau {d['tau']:.3f} (profile {d['profile_tau']:.2f})  "
                           f"{d['tokens_per_s']:.1f} tok/s  speedup {d['speedup']:.3f}")
        if "plain_tokens_per_s" in r:
            p = r["decode"]["plain_rounds"]
            click.echo(f"       plain rounds (nothing drafted): {p['tokens_per_s']:.1f} tok/s  lossless "
                       f"{p['identical_to_target_only']:.2f}")
    for mode, rows in rep.get("draft_rows", {}).items():
        basis = "the prompts' acceptance" if mode == "speculative" else f"replayed profile {mode[len('replay_'):]}"
        if rows is None:
            click.echo(f"--draft-rows ({basis}): leave unset; speculation beat plain rounds at every batch "
                       f"measured (up to {max(batches)})")
        else:
            click.echo(f"--draft-rows ({basis}): {rows}" + (" (never draft: plain rounds won at the smallest batch)"
                                                              if rows == 0 else ""))
    if "draft_rows_file" in rep:
        click.echo(f"wrote {rep['draft_rows_file']} (the prompts' acceptance): `serve`/`run --draft-rows auto` use it")
    elif rep.get("draft_rows") and rep.get("prompts") == "random":
        click.echo("no draft_rows.json written: random prompts say nothing of the traffic; pass --prompt-file")


def _print_results(results: list[Any], as_json: bool) -> None:
    for r in results:
        obj = r.to_json()
        if as_json:
            obj["rounds"] = [{"draft": x["draft"], "accepted": x["accepted"]} for x in obj["rounds"]]
            click.echo(json.dumps(obj, separators=(",", ":")))
        else:
            click.echo(f"tokens: {' '.join(map(str, obj['tokens']))}")
            if obj["rounds"]:
                click.echo(f"rounds: {len(obj['rounds'])}  mean accepted (bonus counted): {obj['mean_accepted']:.3f}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one stderr line and a documented exit code."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except DsparkError as e:
        if "--debug" in (argv if argv is not None else sys.argv):
            raise
        click.echo(f"error: {e.one_line()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()} (see --help)", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
