"""The Python API behind every CLI command, for users' own build scripts.

    from dspark_compile import api
    report = api.inspect_pair("qwen3-8b/", "dspark_qwen3_8b_block7/")
    results = api.generate("qwen3-8b/", "dspark.../", [[1, 2, 3]], max_new_tokens=64)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dspark_compile.checkpoint import load_draft, load_target, validate_pair
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.decode import GenerationParams, GenerationResult, VerifyPolicy
from dspark_compile.runtime.decode import generate as _generate

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _count(store: Any, names: Sequence[str]) -> int:
    return sum(math.prod(store.shape(n)) for n in names)


def inspect_pair(target_dir: str | Path, draft_dir: str | Path, *, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Architecture, parameter counts, taps, block size, Markov rank, memory per dtype and a verdict. A
    pre-quantized FP8 target's e4m3 weights count one byte in every dtype (a build keeps them so) and its scale
    tensors four (a build keeps them in float32); the scales are not parameters."""
    target = load_target(target_dir, allow_nonfinite=allow_nonfinite)
    draft = load_draft(draft_dir, allow_nonfinite=allow_nonfinite)
    problems = validate_pair(target, draft)
    tc, dc = target.config, draft.config
    scales = target.quant.extra_names() if target.quant is not None else set()
    e4m3 = _count(target.weights, list(target.quant.tensors)) if target.quant is not None else 0
    target_params = _count(target.weights, [n for n in target.weights.names() if n not in scales])
    scale_bytes = 4 * _count(target.weights, sorted(scales))
    shared = ("embed_tokens.weight", "lm_head.weight")
    draft_own = [n for n in draft.weights.names() if n not in shared]
    draft_params = _count(draft.weights, draft_own)
    return {
        "target": {
            "path": str(target.path), "family": tc.family, "architecture": tc.architecture,
            "parameters": target_params,
            "layers": tc.num_hidden_layers, "hidden_size": tc.hidden_size, "vocab_size": tc.vocab_size,
            "heads": tc.num_attention_heads, "kv_heads": tc.num_key_value_heads, "head_dim": tc.head_dim,
            "tied_embeddings": tc.tie_word_embeddings, "rope_theta": tc.rope.theta,
            "stored_dtypes": sorted({target.weights.dtype(n) for n in target.weights.names()}),
            "quantization": target.quant.to_json() if target.quant is not None else None,
        },
        "draft": {
            "path": str(draft.path), "family": dc.base.family, "architecture": dc.base.architecture,
            "parameters_excluding_shared": draft_params, "layers": dc.base.num_hidden_layers,
            "block_size": dc.block_size, "target_layer_ids": list(dc.target_layer_ids),
            "mask_token_id": dc.mask_token_id, "markov_rank": dc.markov_rank,
            "markov_head_type": dc.markov_head_type, "confidence_head": dc.enable_confidence_head,
            "confidence_head_with_markov": dc.confidence_head_with_markov,
            "stored_dtypes": sorted({draft.weights.dtype(n) for n in draft.weights.names()}),
        },
        "memory_bytes": {k: (target_params + draft_params - e4m3) * b + e4m3 + scale_bytes for k, b in BYTES.items()},
        "compatible": not problems,
        "problems": problems,
    }


def generate(target_dir: str | Path, draft_dir: str | Path | None, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0, block_size: int | None = None,
             verify: str = "fixed", confidence_threshold: float | None = None, baseline: bool = False,
             dtype: str = "fp32", device: str = "cpu", allow_nonfinite: bool = False,
             draft_rows: int | None = None) -> list[GenerationResult]:
    """Decode with the PyTorch reference program (speculative, or target-only with ``baseline=True``);
    ``draft_rows``: rounds over more rows are plain steps (VerifyPolicy.draft_rows)."""
    from dspark_compile.errors import UsageError
    from dspark_compile.runtime.torch_backend import TorchBackend

    if block_size is not None and block_size < 1:
        raise UsageError(f"--block-size must be >= 1, found {block_size}")
    policy = VerifyPolicy.parse(verify, draft_rows=draft_rows)
    if confidence_threshold is not None:
        if not 0.0 <= confidence_threshold <= 1.0:
            raise UsageError(f"--confidence-threshold must be in [0, 1], found {confidence_threshold}")
        policy = VerifyPolicy("threshold", threshold=confidence_threshold, draft_rows=draft_rows)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, policy=policy)
    backend = TorchBackend.from_pair(Path(target_dir), None if baseline or draft_dir is None else Path(draft_dir),
                                     dtype=dtype, device=device, block_size=block_size,
                                     allow_nonfinite=allow_nonfinite)
    return _generate(backend, prompts, params, speculative=not baseline)


def build(spec_file: str | Path | None = None, *, stop_after: str | None = None, dump_after: tuple[str, ...] = (),
          progress: bool = True, **overrides: Any) -> Any:
    """Run the compiler pipeline; ``overrides`` are BuildSpec fields (target, draft, out, dtype, ...)."""
    from dspark_compile.build_spec import make_spec
    from dspark_compile.pipeline import PassManager

    spec = make_spec(Path(spec_file) if spec_file is not None else None, **overrides)
    return PassManager(progress=progress).run(spec, stop_after=stop_after, dump_after=dump_after)


def load_backend(build_dir: str | Path, backend: str = "onnxruntime", *, device: str = "cpu") -> Any:
    """The graph executor over a build: ``onnxruntime`` runs its graphs, ``torch`` re-grafts its checkpoints,
    ``tensorrt`` runs its engines (GPU; unverified)."""
    from dspark_compile.errors import UsageError
    from dspark_compile.runtime.onnxruntime_backend import load_onnxruntime, read_manifest

    build_dir = Path(build_dir)
    if backend == "onnxruntime":
        return load_onnxruntime(build_dir)
    if backend == "torch":
        from dspark_compile.runtime.torch_backend import TorchBackend

        manifest = read_manifest(build_dir)
        return TorchBackend.from_program(build_program_of(manifest, device=device),
                                         block_size=manifest["program"]["block_size"])
    if backend == "tensorrt":  # the engines in BUILD/engines on a GPU; unverified (targets/tensorrt/transport.py)
        from dspark_compile.targets.tensorrt.transport import load_tensorrt

        return load_tensorrt(build_dir)
    raise UsageError(f"--backend {backend!r}: use onnxruntime or torch")


def build_program_of(manifest: dict[str, Any], *, device: str = "cpu", dtype: str | None = None) -> Any:
    """The PyTorch program a build's manifest describes: its checkpoints, grafted, and quantized as the build
    was (``quantize``: passes/quantize.py); ``dtype`` overrides the build's."""
    from dspark_compile.passes.quantize import quantize_as_built
    from dspark_compile.program import build_program

    spec = manifest["spec"]
    info = ProgramInfo.from_json(manifest["program"])
    program = build_program(Path(spec["target"]), Path(spec["draft"]) if spec.get("draft") else None,
                            dtype=dtype or info.dtype, device="cpu", allow_nonfinite=spec.get("allow_nonfinite", False))
    if manifest.get("quantization"):  # older builds may record head/draft flags they never applied (quantization null)
        quantize_as_built(program, spec.get("quantize"), lm_head=spec.get("quantize_lm_head", False),
                          draft=spec.get("quantize_draft", False))
    program.target.to(device)
    if program.draft is not None:
        program.draft.to(device)
    return program


def run(build_dir: str | Path, prompts: Sequence[Sequence[int]], *, backend: str = "onnxruntime",
        max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0, verify: str = "auto",
        baseline: bool = False, device: str = "cpu", draft_rows: int | str | None = None) -> list[GenerationResult]:
    """Decode with a build's graphs (or its torch program), exactly like :func:`generate`; ``verify="auto"``
    schedules when the build has been profiled and the draft has a confidence head, else verifies every draft.
    ``draft_rows``: rounds over more rows are plain steps (VerifyPolicy.draft_rows); ``"auto"``: the build's
    measured draft_rows.json (`bench --plain-rounds`)."""
    be = load_backend(build_dir, backend, device=device)
    policy = VerifyPolicy.for_build(Path(build_dir), verify, has_confidence=be.info.has_confidence,
                                    draft_rows=draft_rows)
    policy.warn_if_measured_elsewhere(be)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, policy=policy)
    return _generate(be, prompts, params, speculative=not baseline)


DEMO_PROMPTS = ("import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n        self.",
                "    for i in range(len(", "def __repr__(self):\n        return ")


def demo(out: str | Path, *, progress: bool = True, max_new_tokens: int = 48) -> dict[str, Any]:
    """The built-in example end to end: build the shipped trained tiny pair (copied to ``out/example``) for every
    target this machine can build, decode text prompts with onnxruntime, and check the tokens against the PyTorch
    reference and target-only decoding (greedy speculative decoding is lossless)."""
    import importlib.util

    from dspark_compile.examples import trained_tiny_pair
    from dspark_compile.serving.text import TextCodec, TextStream

    out = Path(out)
    target_dir, draft_dir = trained_tiny_pair(copy_to=out / "example")
    targets = ["onnx", "triton"]
    if importlib.util.find_spec("tensorrt") or importlib.util.find_spec("tensorrt_rtx_bindings"):
        targets.insert(1, "tensorrt")
    res = build(target=target_dir, draft=draft_dir, out=out / "build", targets=",".join(targets), max_context=256,
                max_batch=4, progress=progress)
    codec = TextCodec.load(target_dir)
    prompts = [codec.encode(p) for p in DEMO_PROMPTS]
    spec_ort = run(res.out, prompts, backend="onnxruntime", max_new_tokens=max_new_tokens)
    spec_torch = run(res.out, prompts, backend="torch", max_new_tokens=max_new_tokens)
    baseline = run(res.out, prompts, backend="onnxruntime", max_new_tokens=max_new_tokens, baseline=True)
    eos = tuple((res.manifest.get("program") or {}).get("eos_token_ids", ()))
    texts = []
    for r in spec_ort:
        stream = TextStream(codec, eos_token_ids=eos)
        texts.append(stream.push(r.tokens) + stream.close())
    return {
        "build": str(res.out),
        "targets": targets,
        "passes": res.manifest["passes"],
        "onnxruntime_equals_torch": [a.tokens == b.tokens for a, b in zip(spec_ort, spec_torch, strict=True)],
        "lossless_vs_target_only": [a.tokens == b.tokens for a, b in zip(spec_ort, baseline, strict=True)],
        "mean_accepted": [round(r.mean_accepted, 3) for r in spec_ort],
        "prompts": list(DEMO_PROMPTS),
        "texts": texts,
        "tokens": [r.tokens for r in spec_ort],
    }


def serve(build_dir: str | Path, *, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
          verify: str | None = None, target_only: bool = False, startup_timeout_s: float = 180.0,
          draft_rows: int | str | None = None) -> Any:
    """A running :class:`dspark_compile.serving.serve.Server` (the bundled tritonserver) on a build's Triton
    repository, once ready; ports 0 pick free ones, ``verify``/``target_only``/``draft_rows`` override the build's
    settings."""
    from dspark_compile.serving.serve import Server

    return Server(build_dir, host=host, http_port=http_port, grpc_port=grpc_port, verify=verify,
                  target_only=target_only, startup_timeout_s=startup_timeout_s, draft_rows=draft_rows).start()


def profile(build_dir: str | Path, *, backend: str = "onnxruntime", max_batch: int | None = None,
            context: int = 256, repeats: int = 5, device: str = "cpu") -> dict[str, Any]:
    """Measure SPS(B) of the build's verify graph and write sps_profile.json / .png into the build."""
    from dspark_compile.runtime.onnxruntime_backend import read_manifest
    from dspark_compile.tools.profile_sps import profile_sps, write_profile

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    be = load_backend(build_dir, backend, device=device)
    prof = profile_sps(be, max_batch=max_batch or manifest["spec"]["max_batch"], context=context, repeats=repeats,
                       backend_name=backend, device=device)
    write_profile(prof, build_dir)
    _copy_into_triton(build_dir, "sps_profile.json")
    return prof.to_json()


def _copy_into_triton(build_dir: Path, name: str) -> None:
    """A bls-mode Triton orchestrator reads the profile/calibration from its own model directory."""
    import shutil

    model_dir = build_dir / "triton" / "dspark"
    if model_dir.is_dir():
        shutil.copy2(build_dir / name, model_dir / name)


def calibrate(build_dir: str | Path, prompts: Sequence[Sequence[int]], *, backend: str = "onnxruntime",
              max_new_tokens: int = 64, device: str = "cpu") -> dict[str, Any]:
    """Fit Sequential Temperature Scaling on held-out prompts; writes calibration.json + reliability.png."""
    from dspark_compile.tools.calibrate import calibrate_build

    cal = calibrate_build(load_backend(build_dir, backend, device=device), prompts, Path(build_dir),
                          max_new_tokens=max_new_tokens)
    _copy_into_triton(Path(build_dir), "calibration.json")
    return {"temperatures": list(cal.temperatures), "ece_before": list(cal.ece_before),
            "ece_after": list(cal.ece_after)}


def bench(build_dir: str | Path | None, *, batches: Sequence[int] = (1, 16, 64), max_new_tokens: int = 64,
          prompts: Sequence[Sequence[int]] | None = None, repeats: int = 10, context: int = 1024,
          dtype: str = "bf16", device: str = "auto", replay: Sequence[str] = (),
          plot: str | Path | None = None, random_shape: str | None = None, plain_rounds: bool = False,
          ) -> dict[str, Any]:
    """Speed of a build's program (or of a ``random_shape`` pair of ``targets.torch.bench.SHAPES``) with the torch
    target, per batch: step times and their overhead ratio, then greedy decoding target-only and speculative
    (tokens/s, τ, host time per round, losslessness, ``replay`` profiles). CUDA graphs in ``dtype`` on a GPU,
    else eagerly on the CPU in fp32. Without ``prompts``, 8 seeded random prompts of 64 tokens.
    ``plain_rounds``: also the rounds a batch over ``--draft-rows`` falls back to, and ``draft_rows``, the value
    these measurements suggest for each acceptance measured (the prompts' own, and each replay's): where a block
    costs more than it yields depends on the GPU, the engine and the acceptance, so it is measured, not guessed.
    With a build and ``prompts``, the prompts' own suggestion goes into BUILD/draft_rows.json for ``--draft-rows
    auto`` (random prompts say nothing of the traffic, so they write none)."""
    import numpy as np
    import torch

    from dspark_compile.errors import BackendUnavailableError, UsageError
    from dspark_compile.runtime.onnxruntime_backend import read_manifest
    from dspark_compile.targets.torch.bench import (
        SHAPES,
        plot_bench,
        random_pair,
        rounds_bench,
        run_bench,
        suggest_draft_rows,
        survival_profile,
    )
    from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend

    for name in replay:
        survival_profile(name)  # a bad name is a usage error before anything loads
    if random_shape is not None and random_shape not in SHAPES:
        raise UsageError(f"--random-shape {random_shape!r}: expected one of {', '.join(SHAPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} was asked for but torch sees no CUDA GPU "
                                      f"(torch {torch.__version__}); use --device auto or cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        logging.getLogger(__name__).warning("no CUDA GPU: benchmarking the torch target eagerly on the CPU in fp32")
        dtype = "fp32"
    from dspark_compile.program import torch_dtype

    if random_shape is not None:
        target, draft = random_pair(SHAPES[random_shape], device=device, dtype=torch_dtype(dtype), decisive=True)
        backend = CudaGraphBackend(target, draft)
        info = backend.info
    else:
        build_dir = Path(build_dir)
        manifest = read_manifest(build_dir)
        info = ProgramInfo.from_json(manifest["program"])
        program = build_program_of(manifest, device=device, dtype=dtype)
        backend = CudaGraphBackend(program.target, program.draft, block_size=info.block_size,
                                   eos_token_ids=program.eos_token_ids)
    source = "given"
    if prompts is None:
        prompts = np.random.default_rng(0).integers(0, info.vocab_size, size=(8, 64)).tolist()
        source = "random"
    report = run_bench(lambda: backend, batches=batches, repeats=repeats, context=context, decode=False)
    for row in report["batches"]:
        chosen = [list(prompts[i % len(prompts)]) for i in range(row["batch"])]
        dec = rounds_bench(backend, chosen, max_new_tokens=max_new_tokens, replays=tuple(replay), plain=plain_rounds)
        row["decode"] = dec
        graph_ms = dec["target_only"].get("round_graph_ms")
        if graph_ms and "target_floor_ms" in report:  # the target-only step as decoding runs it (GPU time)
            row["target_round_vs_floor"] = graph_ms / report["target_floor_ms"]
        spec_row = dec.get("speculative", dec["target_only"])
        row |= {"tau": spec_row["tau"], "spec_tokens_per_s": spec_row["tokens_per_s"],
                "target_tokens_per_s": dec["target_only"]["tokens_per_s"],
                "speedup": spec_row["tokens_per_s"] / dec["target_only"]["tokens_per_s"],
                "host_ms_per_round": spec_row["host_ms_per_round"],
                "lossless_fraction": spec_row.get("identical_to_target_only", 1.0)}
        if "plain_rounds" in dec:  # asked for, and the build has a draft
            row["plain_tokens_per_s"] = dec["plain_rounds"]["tokens_per_s"]
    if plain_rounds and info.block_size > 0:  # per acceptance measured: the prompts' own, each replayed profile's
        modes = ["speculative", *(f"replay_{name}" for name in replay)]
        report["draft_rows"] = {mode: suggest_draft_rows([(r["batch"], r["decode"][mode]["tokens_per_s"],
                                                           r["plain_tokens_per_s"]) for r in report["batches"]])
                                for mode in modes}
    report["build"] = str(build_dir) if random_shape is None else f"random {random_shape}"
    if "draft_rows" in report and random_shape is None and source == "given":  # for --draft-rows auto
        from dspark_compile.runtime.decode import DRAFT_ROWS_FILE, write_draft_rows

        report["draft_rows_file"] = str(write_draft_rows(Path(build_dir), report))
        _copy_into_triton(Path(build_dir), DRAFT_ROWS_FILE)
    report["family"] = info.family
    report["prompts"] = source
    if plot is not None:
        plot_bench(report, Path(plot))
    return report
