"""Speed of a backend, measured the way DSPARK.md §1 accounts for it: L = (T_draft + T_verify) / τ.

:func:`run_bench` measures per batch size B, through `CudaGraphBackend`'s ``verify_step`` / ``draft_step`` (host
transfers included): T_target(1) (verify with no drafts), T_verify(γ+1), T_draft, their overhead ratio
(T_draft + T_verify) / T_target, each against the byte floor (weights read over the measured copy bandwidth);
with ``decode=True``, τ and tokens/s of real greedy decoding, speculative and target-only. Field by field:
docs/BENCH.md. :func:`random_pair` builds a pair of any shape (:data:`SHAPES`: Qwen3-8B, gemma-4-12B-it) with
random weights on the device, for timing without checkpoints.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dspark_compile.errors import UsageError
from dspark_compile.families import family_of
from dspark_compile.model_config import DraftConfig, Gemma4Config, RopeConfig, TargetConfig
from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.runtime.backend import DecodeBackend, Proposal, backend_device, describe_backend
from dspark_compile.runtime.decode import GenerationParams, GenerationResult, RoundQueue, VerifyPolicy, generate

if TYPE_CHECKING:
    from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 4, 16, 64)


# ------------------------------------------------------------------------------------------------ bookkeeping
def copy_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes/s of a copy of ``nbytes``: it reads and writes them, so 2 · nbytes / seconds."""
    return 2.0 * nbytes / seconds


def byte_floor_ms(nbytes: int, bandwidth: float) -> float:
    """The fastest a step that reads ``nbytes`` can run at ``bandwidth`` bytes/s, in ms."""
    return 1e3 * nbytes / bandwidth


def overhead_ratio(t_draft: float, t_verify: float, t_target: float) -> float:
    """(T_draft + T_verify(γ+1)) / T_target(1)."""
    return (t_draft + t_verify) / t_target


def speedup_over_tau(spec_tps: float, target_tps: float, tau: float) -> float:
    """(speculative tokens/s ÷ target-only tokens/s) ÷ τ; 1 would be a free speculative round."""
    return spec_tps / target_tps / tau


def param_bytes(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def target_bytes(target: nn.Module) -> int:
    """All target weights (the issue's floor counts the embedding table too)."""
    return param_bytes(list({id(p): p for p in target.parameters()}.values()))


def draft_read_bytes(draft: DSparkDraft) -> int:
    """Bytes one draft proposal reads: its own weights, the shared LM head once, the Markov W2 once per
    drafted position; W1 and the embedding are gathered rows only (not counted)."""
    shared = {id(p) for p in (*draft.embed_tokens.parameters(), *draft.lm_head.parameters())}
    own = [p for p in {id(p): p for p in draft.parameters()}.values() if id(p) not in shared]
    total = param_bytes(own) + param_bytes(list(draft.lm_head.parameters()))
    if draft.markov_head is not None:
        total -= param_bytes([draft.markov_head.markov_w1.weight])
        total += (draft.block_size - 1) * param_bytes([draft.markov_head.markov_w2.weight])
    return total


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of ``repeats``."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return copy_bandwidth(nbytes, statistics.median(times))


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, *, warmup: int = 2) -> float:
    """Median wall time of ``repeats`` single calls after ``warmup`` calls; `torch.utils.benchmark`
    synchronises the accelerator around each call."""
    from torch.utils.benchmark import Timer

    for _ in range(warmup):
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn})
    return statistics.median(timer.timeit(1).median for _ in range(repeats))


# ------------------------------------------------------------------------------------------------ random pairs
@dataclass(frozen=True)
class PairShape:
    """Shapes of a (Qwen3 target, DSpark draft) pair, for random-weight timing."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    draft_layers: int
    block_size: int
    markov_rank: int
    target_layer_ids: tuple[int, ...]
    rope_theta: float = 1e6

    def configs(self) -> tuple[TargetConfig, DraftConfig]:
        base = TargetConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                            head_dim=self.head_dim, rms_norm_eps=1e-6, rope=RopeConfig(self.rope_theta))
        draft_base = replace(base, num_hidden_layers=self.draft_layers, architecture="Qwen3DSparkModel")
        return base, self.draft_config(draft_base, mask_token_id=self.vocab_size - 1)

    def draft_config(self, draft_base: TargetConfig, *, mask_token_id: int) -> DraftConfig:
        """The released drafts' heads: vanilla Markov head of ``markov_rank``, confidence head reading it."""
        return DraftConfig(base=draft_base, block_size=self.block_size, target_layer_ids=self.target_layer_ids,
                           num_target_layers=self.num_layers, mask_token_id=mask_token_id,
                           markov_rank=self.markov_rank, markov_head_type="vanilla" if self.markov_rank else None,
                           enable_confidence_head=True, confidence_head_with_markov=self.markov_rank > 0)


QWEN3_8B = PairShape(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                     num_kv_heads=8, head_dim=128, draft_layers=5, block_size=7, markov_rank=256,
                     target_layer_ids=(1, 9, 17, 25, 33))
"""Qwen3-8B (untied, 16.4 GB in bf16) with the released draft's shape: 5 layers, γ = 7, Markov rank 256."""

@dataclass(frozen=True)
class Gemma4PairShape(PairShape):
    """A (Gemma4 target, Gemma4 DSpark draft) pair: ``num_kv_heads``/``head_dim`` are the sliding layers', 5
    sliding layers per global one, the last one global; K = V on the global layers, soft-capping 30, tied."""

    global_kv_heads: int = 1
    global_head_dim: int = 512
    sliding_window: int = 1024
    mask_token_id: int = 4

    def configs(self) -> tuple[Gemma4Config, DraftConfig]:  # type: ignore[override]
        types = tuple("full_attention" if (i + 1) % 6 == 0 or i == self.num_layers - 1 else "sliding_attention"
                      for i in range(self.num_layers))
        base = Gemma4Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=max(self.num_kv_heads, self.global_kv_heads),
            head_dim=max(self.head_dim, self.global_head_dim), rms_norm_eps=1e-6,
            rope=RopeConfig(1e6, "proportional", 1.0, 0.25), tie_word_embeddings=True,
            architecture="Gemma4ForCausalLM", family="gemma4", layer_types=types, sliding_window=self.sliding_window,
            sliding_kv_heads=self.num_kv_heads, sliding_head_dim=self.head_dim, global_kv_heads=self.global_kv_heads,
            global_head_dim=self.global_head_dim, sliding_rope=RopeConfig(1e4), attention_k_eq_v=True,
            final_logit_softcapping=30.0)
        draft_base = replace(base, num_hidden_layers=self.draft_layers, architecture="Gemma4DSparkModel",
                             layer_types=("full_attention",) * self.draft_layers, tie_word_embeddings=False,
                             num_key_value_heads=self.global_kv_heads, head_dim=self.global_head_dim)
        return base, self.draft_config(draft_base, mask_token_id=self.mask_token_id)


GEMMA4_12B = Gemma4PairShape(vocab_size=262144, hidden_size=3840, intermediate_size=15360, num_layers=48,
                             num_heads=16, num_kv_heads=8, head_dim=256, global_kv_heads=1, global_head_dim=512,
                             sliding_window=1024, draft_layers=5, block_size=7, markov_rank=256,
                             target_layer_ids=(5, 17, 29, 41, 46))
"""google/gemma-4-12B-it's text model as published (tied embeddings, 23.9 GB in bf16) with the DeepSpec
dspark_gemma4_12b draft's shape: 5 layers, γ = 7, taps [5, 17, 29, 41, 46], Markov rank 256."""

GEMMA4_SMOKE = Gemma4PairShape(vocab_size=2048, hidden_size=256, intermediate_size=512, num_layers=6, num_heads=4,
                               num_kv_heads=2, head_dim=64, global_kv_heads=1, global_head_dim=128,
                               sliding_window=32, draft_layers=2, block_size=7, markov_rank=32,
                               target_layer_ids=(0, 2, 4))

SMOKE = PairShape(vocab_size=2048, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64, draft_layers=2, block_size=7, markov_rank=32,
                  target_layer_ids=(0, 1, 2))
"""A small shape that exercises the same code paths in seconds (script smoke tests)."""

SHAPES: dict[str, PairShape] = {"qwen3-8b": QWEN3_8B, "gemma4-12b": GEMMA4_12B, "smoke": SMOKE,
                                                  "gemma4-smoke": GEMMA4_SMOKE}
"""Random-weight shapes by name (``dspark-compile bench --random-shape``)."""


def random_pair(shape: PairShape, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, std: float = 0.02, decisive: bool = False) -> tuple[nn.Module, DSparkDraft]:
    """A grafted pair of the shape's family with N(0, std) matrices, unit norms and layer scalars, allocated
    directly on ``device`` (no CPU copy).

    ``decisive``: the same bytes and FLOPs, but each target layer adds almost nothing to the residual (output
    projections, or a sandwich norm's post norms, scaled by 1e-4) and the LM head maps each token's embedding to
    one next token (a permutation; the token itself when tied). Its next token then wins by a wide margin, so
    kernels that differ in the last bits (row counts, bf16 vs fp32) decode the same tokens, and replayed
    acceptance holds at any batch. Plain random weights give near-tied logits, where they do not."""
    tcfg, dcfg = shape.configs()
    family = family_of(tcfg)
    device = torch.device(device)
    with torch.device("meta"):
        target = family.target(tcfg, dcfg.target_layer_ids).to(dtype)
        draft = family.draft(dcfg, nn.Embedding(1, 1), nn.Linear(1, 1, bias=False)).to(dtype)
    target = target.to_empty(device=device)
    draft = draft.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in (target, draft):
            for name, p in module.named_parameters():
                if name.endswith(("norm.weight", "layer_scalar")):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=gen)
        if decisive:
            _make_decisive(target, tcfg.tie_word_embeddings, gen)
    draft.embed_tokens = target.embed_tokens
    draft.lm_head = target.lm_head
    if tcfg.tie_word_embeddings:
        target.lm_head.weight = target.embed_tokens.weight
    with torch.device(device):
        target.init_buffers()
        draft.init_buffers()
    for p in (*target.parameters(), *draft.parameters()):
        p.requires_grad_(False)
    return target.eval(), draft.eval()


def _make_decisive(target: nn.Module, tied: bool, gen: torch.Generator) -> None:
    """See :func:`random_pair`: quiet every layer's residual update and make the head a permutation."""
    quiet = 1e-4
    for layer in target.layers:
        sandwich = hasattr(layer, "post_feedforward_layernorm")  # Gemma4: post norms set the update's size
        for name, p in layer.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) or (
                    sandwich and name.endswith(("post_attention_layernorm.weight",
                                                "post_feedforward_layernorm.weight"))):
                p.mul_(quiet)
    if not tied:
        embed = target.embed_tokens.weight
        perm = torch.randperm(embed.shape[0], generator=gen, device=embed.device)
        target.lm_head.weight.copy_(embed[perm])


# ------------------------------------------------------------------------------------------------- measuring
def step_times(backend: CudaGraphBackend, batch: int, *, context: int, repeats: int, slots: int | None = None,
               seed: int = 0) -> dict[str, float]:
    """T_target(1), T_verify(γ+1) and T_draft in ms at ``batch`` requests and ``context`` cached tokens
    (cache capacity ``slots``, default just enough)."""
    info = backend.info
    g = info.block_size
    rng = np.random.default_rng(seed)
    backend.start(batch, max(slots or 0, context + g + 2))
    cache_len = np.full(batch, context, dtype=np.int64)

    def verify(t: int) -> Callable[[], Any]:
        tokens = rng.integers(0, info.vocab_size, size=(batch, t), dtype=np.int64)
        vlen = np.full(batch, t - 1, dtype=np.int64)
        return lambda: backend.verify_step(tokens, cache_len, vlen)

    out = {"t_target_ms": 1e3 * median_seconds(verify(1), repeats)}
    if g > 0:
        out["t_verify_ms"] = 1e3 * median_seconds(verify(g + 1), repeats)
        anchor = rng.integers(0, info.vocab_size, size=batch, dtype=np.int64)
        ctx = rng.standard_normal((batch, g + 1, info.tap_width), dtype=np.float32)
        count = np.full(batch, g + 1, dtype=np.int64)
        draft_len = np.full(batch, context - g - 1, dtype=np.int64)
        out["t_draft_ms"] = 1e3 * median_seconds(
            lambda: backend.draft_step(anchor, ctx, count, draft_len), repeats)
        out["overhead_ratio"] = overhead_ratio(out["t_draft_ms"], out["t_verify_ms"], out["t_target_ms"])
    return out


def _decode_all(backend: DecodeBackend, prompts: list[list[int]], batch: int, params: GenerationParams,
                speculative: bool) -> tuple[list[GenerationResult], float]:
    results: list[GenerationResult] = []
    device = getattr(backend, "device", None)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        results += generate(backend, prompts[i : i + batch], params, speculative=speculative)
    return results, time.perf_counter() - t0


def decode_speed(backend: DecodeBackend, prompts: Sequence[Sequence[int]], batch: int, *, max_new_tokens: int,
                 min_prompts: int = 8) -> dict[str, Any]:
    """Greedy decoding of max(batch, min_prompts) prompts (cycled) in batches of ``batch``, speculative and
    target-only, each timed after an untimed pass that captures its graphs."""
    count = max(batch, min_prompts)
    chosen = [list(prompts[i % len(prompts)]) for i in range(count)]
    params = GenerationParams(max_new_tokens=max_new_tokens, policy=VerifyPolicy("fixed"))
    out: dict[str, Any] = {"prompts": count}
    results = {}
    for speculative in (True, False):
        _decode_all(backend, chosen, batch, params, speculative)  # warm-up: graph capture
        res, seconds = _decode_all(backend, chosen, batch, params, speculative)
        results[speculative] = res
        tokens = sum(len(r.tokens) for r in res)
        out["spec_tokens_per_s" if speculative else "target_tokens_per_s"] = tokens / seconds
    rounds = [r["accepted"] for res in results[True] for r in res.rounds]
    out["tau"] = float(np.mean(rounds)) if rounds else 0.0
    out["speedup"] = out["spec_tokens_per_s"] / out["target_tokens_per_s"]
    out["speedup_over_tau"] = speedup_over_tau(out["spec_tokens_per_s"], out["target_tokens_per_s"], out["tau"])
    same = [a.tokens == b.tokens for a, b in zip(results[True], results[False], strict=True)]
    out["lossless_fraction"] = sum(same) / len(same)
    return out


def run_bench(backend_factory: Callable[[], CudaGraphBackend], prompts: Sequence[Sequence[int]] | None = None, *,
              batches: Sequence[int] = DEFAULT_BATCHES, gamma: int | None = None, max_new_tokens: int = 64,
              repeats: int = 10, context: int = 1024, decode: bool = True, bandwidth: float | None = None,
              decode_prompts: int = 8, on_result: Callable[[dict[str, Any]], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Step times, overhead ratio, byte floors and (``decode`` with ``prompts``) τ and tokens/s per batch.

    ``gamma`` must equal the backend's block size when given (the factory decides γ). ``bandwidth`` skips the
    copy measurement (bytes/s). Decoding uses max(batch, ``decode_prompts``) prompts per batch size.
    ``on_result`` is called with each batch's numbers as they come; once ``should_stop()`` is true the
    remaining batch sizes are listed under ``skipped_batches``.
    """
    backend = backend_factory()
    info = backend.info
    if gamma is not None and gamma != info.block_size:
        raise UsageError(f"gamma={gamma} but the backend drafts {info.block_size} tokens per round; build the "
                         "backend with block_size=gamma")
    device = getattr(backend, "device", torch.device("cpu"))
    bw = bandwidth if bandwidth is not None else measure_copy_bandwidth(
        device, nbytes=(1 << 30) if torch.device(device).type == "cuda" else (1 << 26))
    report: dict[str, Any] = {
        "backend": describe_backend(backend),
        "device": backend_device(backend),
        "gamma": info.block_size, "context": context, "repeats": repeats, "max_new_tokens": max_new_tokens,
        "copy_bandwidth_gb_s": bw / 1e9,
    }
    target = getattr(backend, "target_model", None)
    draft = getattr(backend, "draft_model", None)
    if target is not None:
        tb = target_bytes(target)
        report |= {"target_weight_bytes": tb, "target_floor_ms": byte_floor_ms(tb, bw)}
        if draft is not None:
            db = draft_read_bytes(draft)
            report |= {"draft_read_bytes": db, "draft_floor_ms": byte_floor_ms(db, bw),
                       "overhead_floor": (tb + db) / tb}
    rows: list[dict[str, Any]] = []
    report["skipped_batches"] = []
    for b in batches:
        if should_stop is not None and should_stop():
            report["skipped_batches"].append(b)
            continue
        row: dict[str, Any] = {"batch": b, **step_times(backend, b, context=context, repeats=repeats)}
        if "target_floor_ms" in report:
            row["target_vs_floor"] = row["t_target_ms"] / report["target_floor_ms"]
        if decode and prompts and info.block_size > 0:
            row |= decode_speed(backend, prompts, b, max_new_tokens=max_new_tokens, min_prompts=decode_prompts)
        log.info("batch %d: %s", b, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        rows.append(row)
        if on_result is not None:
            on_result(row)
    report["batches"] = rows
    report["backend"] = describe_backend(backend)  # with the final capture/replay counts
    return report


# ------------------------------------------------------------------------------------- DecodeBackend rounds
@dataclass
class RoundsRun:
    """What :func:`decode_rounds` produced: per request its tokens and rounds; per round wall and graph time."""

    tokens: list[list[int]]
    rounds: list[list[dict[str, Any]]]
    seconds: float = 0.0
    round_wall_ms: list[float] = field(default_factory=list)
    round_graph_ms: list[float] = field(default_factory=list)
    admit_seconds: float = 0.0  # prefill + first token + first draft (inside ``seconds``)
    launch_ms: list[float] = field(default_factory=list)  # host time in the graph launch call, per round
    issue_ms: list[float] = field(default_factory=list)  # per round: host time launching what it queued
    collect_ms: list[float] = field(default_factory=list)  # per round: host time collecting it (its wait included)

    @property
    def tau(self) -> float:
        acc = [r["accepted"] for rs in self.rounds for r in rs]
        return float(np.mean(acc)) if acc else 1.0


def decode_rounds(backend: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  speculative: bool = True, temperature: float = 0.0, seed: int = 0,
                  policy: VerifyPolicy | None = None) -> RoundsRun:
    """Decode ``prompts`` as one batch over the DecodeBackend protocol (admit once, round, select).

    The round accounting of ``runtime/decode.generate`` (rounds while generated <= max_new_tokens, output cut
    there and after the first EOS), so traces compare with the golden ones. Row b's seed is ``seed + b``.
    The timed loop does only array work per round; per-request tokens and round records are rebuilt after.
    """
    info = backend.info
    g = info.block_size if speculative else 0
    policy = policy or VerifyPolicy()
    n = len(prompts)
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    ids = np.zeros((n, int(lengths.max())), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    device = getattr(backend, "device", None)
    eos = np.array(sorted(info.eos_token_ids), dtype=np.int64)
    queued = RoundQueue(backend, policy, g)
    backend.start(n, int(lengths.max()) + max_new_tokens + 2 * g + 3, speculative=speculative)
    _sync(device)
    t0 = time.perf_counter()
    active = np.arange(n)
    prop = queued.admit(active, ids, lengths, np.full(n, temperature, dtype=np.float32),
                        seed + np.arange(n, dtype=np.int64), max_new_tokens)
    admit_seconds = time.perf_counter() - t0  # the first token on the host (rounds queued behind it may run)
    first = prop.next_token.copy()
    generated = np.ones(n, dtype=np.int64)
    launches: list[float] = []
    done = (generated > max_new_tokens) | np.isin(first, eos)
    drafts, conf = prop.drafts, prop.confidence_logits
    records: list[tuple[np.ndarray, ...]] = []
    walls: list[float] = []
    graphs: list[float] = []
    issues: list[float] = []
    collects: list[float] = []
    positions = np.arange(g)
    w0 = time.perf_counter()
    while True:
        if not queued:
            keep = ~done[active]
            if not keep.any():
                break
            if not keep.all():
                backend.select(np.nonzero(keep)[0])
                active, drafts, conf = active[keep], drafts[keep], conf[keep]
            w0 = time.perf_counter()
        i0 = time.perf_counter()
        while queued.wants(generated[active], bool(done[active].any()), max_new_tokens):
            queued.launch(active, Proposal(np.zeros(0), np.zeros(0), drafts, conf))
        i1 = time.perf_counter()
        rows, vlen, prop = queued.collect()
        issues.append(1e3 * (i1 - i0))
        collects.append(1e3 * (time.perf_counter() - i1))
        live = ~done[rows]  # a row that ended in the round before was run once more: its outputs are dropped
        acc, nxt = prop.accepted[live], prop.next_token[live]
        records.append((rows[live], vlen[live], drafts[live], conf[live], acc, nxt))
        generated[rows[live]] += acc + 1
        over = generated[rows[live]] > max_new_tokens
        if eos.size:
            over |= np.isin(nxt, eos)
            if g > 0:
                over |= (np.isin(drafts[live], eos) & (positions < acc[:, None])).any(axis=1)
        done[rows[live]] |= over
        drafts, conf = prop.drafts, prop.confidence_logits
        w1 = time.perf_counter()
        walls.append(1e3 * (w1 - w0))  # with a round queued behind, from the last collect to this one
        w0 = w1
        graphs.append(float(getattr(backend, "last_graph_ms", 0.0)))
        launches.append(float(getattr(backend, "last_host_ms", {}).get("launch", 0.0)))
    seconds = time.perf_counter() - t0
    run = _rebuild(first, records, n, g, max_new_tokens, set(eos.tolist()), seconds, walls, graphs)
    run.admit_seconds = admit_seconds
    run.launch_ms, run.issue_ms, run.collect_ms = launches, issues, collects
    return run


def _rebuild(first: np.ndarray, records: list[tuple[np.ndarray, ...]], n: int, g: int, max_new_tokens: int,
             eos: set[int], seconds: float, walls: list[float], graphs: list[float]) -> RoundsRun:
    """Per-request tokens and round records from the round arrays (runtime/decode's commit rule)."""
    run = RoundsRun([[] for _ in range(n)], [[] for _ in range(n)], seconds, walls, graphs)

    def commit(i: int, new: list[int]) -> None:
        room = max_new_tokens - len(run.tokens[i])
        visible = new[: max(room, 0)]
        for k, t in enumerate(visible):
            if t in eos:
                visible = visible[: k + 1]
                break
        run.tokens[i].extend(visible)

    for i in range(n):
        commit(i, [int(first[i])])
    for active, vlen, drafts, conf, acc, nxt in records:
        for k, i in enumerate(active.tolist()):
            j, ell = int(acc[k]), int(vlen[k])
            if g > 0:
                run.rounds[i].append({"draft": [int(t) for t in drafts[k, :ell]], "accepted": j + 1,
                                      "confidence_logits": [round(float(c), 6) for c in conf[k, :ell]]})
            commit(i, [int(t) for t in drafts[k, :j]] + [int(nxt[k])])
    return run


# -------------------------------------------------------------------------------------- acceptance replay
def _bisect(f: Callable[[float], float], lo: float, hi: float) -> float:
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def survival_profile(name: str, g: int = 7) -> list[float]:
    """s_k = P(the first k+1 drafts are accepted), k < G, of a replay profile; τ = 1 + Σ s_k.

    * ``a`` — Qwen3-8B + DSpark, GSM8K, T = 0 (published): s_0 = 0.947, s_6 = 0.628, τ = 6.48. The published
      per-position acceptance is read as this survival (its conditional reading gives τ = 4.95, not 6.48);
      between the ends s_k = s_0 − (s_0 − s_6)(k/6)^p with p fitted to τ (p ≈ 0.93; linear, p = 1, gives
      6.51). Positions past 6 (G > 7) continue the curve.
    * ``b`` — the paper's macro average for Qwen3-8B, τ = 4.81: a constant conditional acceptance α
      (1 + Σ_{k=1..7} α^k = 4.81, α ≈ 0.847).
    * ``c`` — the trained tiny pair (benchmarks/results/trained_pair_rounds.json, 1621 greedy rounds): the
      measured survival, τ = 2.58.
    """
    if name == "a":
        s0, s6, tau = 0.947, 0.628, 6.48
        curve = lambda p: [max(0.0, s0 - (s0 - s6) * (k / 6) ** p) for k in range(g)]  # noqa: E731
        p = _bisect(lambda p: 1 + sum(curve(p)[:7]) - tau, 0.2, 5.0)
        return curve(p)
    if name == "b":
        alpha = _bisect(lambda a: sum(a**k for k in range(1, 8)) + 1 - 4.81, 0.01, 0.999)
        return [alpha ** (k + 1) for k in range(g)]
    if name == "c":
        s = [0.6977, 0.3646, 0.2381, 0.1333, 0.0753, 0.0426, 0.0271]
        return (s + [0.0] * g)[:g]
    raise UsageError(f"--replay {name!r}: choose a (Qwen3-8B GSM8K), b (macro τ 4.81) or c (trained tiny pair)")


def conditional_profile(survival: Sequence[float]) -> list[float]:
    """P(draft k accepted | drafts < k accepted), what the device draws per position."""
    out, prev = [], 1.0
    for s in survival:
        out.append(s / prev if prev > 0 else 0.0)
        prev = s
    return out


def replay_reference(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                     width: int) -> np.ndarray:
    """[B, width] tokens by absolute position: row b's prompt, then its continuation, zeros after."""
    ref = np.zeros((len(prompts), width), dtype=np.int64)
    for b, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
        seq = (list(p) + list(c))[:width]
        ref[b, : len(seq)] = seq
    return ref


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (over ``a``'s length), None when none does."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def rounds_bench(backend: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 replays: Sequence[str] = ("a", "b"), warmup: bool = True, forced: bool = False,
                 temperature: float = 0.0, caps: Sequence[int] = (), plain: bool = False) -> dict[str, Any]:
    """One batch, in one run: target-only and speculative greedy decoding through the round graph, τ,
    tokens/s, host time per round (wall minus graph), losslessness (speculative tokens == target-only), and
    the acceptance replays (labelled "replayed": the draft runs, its proposals are then overwritten on the
    device by the target's own greedy continuation, cut per the profile; verification and commit are real).

    The replay's continuation comes from a replay with an all-zero profile (every round commits exactly the
    target's next token through the same verify graph), so numerics cannot make the replay diverge from it;
    that run is checked against target-only decoding too. ``forced`` adds each profile again as forced replay
    (``replay_{name}_forced``, timing only: rounds commit the reference at the profile's acceptance whatever the
    verify says, for batches whose rows leave the reference once the batch shrinks; ``set_replay``). ``caps``
    adds each profile again with at most that many drafts verified a round (``replay_{name}_cap{K}``, policy
    ``fixed=K``): on a backend with narrow rounds, what a shorter verify saves against what it leaves unaccepted.
    ``plain`` adds the rounds of ``VerifyPolicy(draft_rows=0)`` (``plain_rounds``: one position a row, the draft's
    context only; on a backend that ``takes_plain_rounds``): what decoding without drafting costs against target-only
    steps, the floor a batch over ``draft_rows`` falls back to.
    ``temperature`` > 0 adds sampling rounds at that temperature, speculative (``sampling``, its τ as drawn) and
    target-only (``sampling_target_only``): their own streams, so no token comparison (the greedy rows' is it).
    """
    g = backend.info.block_size

    def timed(longer: int = 0, **kw: Any) -> RoundsRun:
        if warmup:  # captures this mode's graphs
            decode_rounds(backend, prompts, max_new_tokens=max_new_tokens + longer, **kw)
        return decode_rounds(backend, prompts, max_new_tokens=max_new_tokens + longer, **kw)

    def summary(run: RoundsRun, base: RoundsRun | None) -> dict[str, Any]:
        tokens = sum(len(t) for t in run.tokens)
        host = [w - gr for w, gr in zip(run.round_wall_ms, run.round_graph_ms, strict=True)]
        decode_s = run.seconds - run.admit_seconds
        out = {"tokens": tokens, "seconds": run.seconds, "admit_seconds": run.admit_seconds,
               "tokens_per_s_with_prefill": tokens / run.seconds,
               "tokens_per_s": (tokens - len(run.tokens)) / decode_s if decode_s > 0 else None,
               "launch_ms_per_round": float(np.median(run.launch_ms)) if run.launch_ms else None,
               "rounds": len(run.round_wall_ms), "tau": run.tau,
               "round_wall_ms": float(np.median(run.round_wall_ms)) if run.round_wall_ms else None,
               "round_graph_ms": float(np.median(run.round_graph_ms)) if run.round_graph_ms else None,
               "host_ms_per_round": float(np.median(host)) if host else None,
               # each round's, in order: tok/s counts every round, the medians above only the typical one
               "round_wall_ms_each": [round(x, 4) for x in run.round_wall_ms],
               "round_graph_ms_each": [round(x, 4) for x in run.round_graph_ms],
               # where a round's wall goes on the host: launching what it queued, collecting it (the wait), the rest
               "round_issue_ms_each": [round(x, 4) for x in run.issue_ms],
               "round_collect_ms_each": [round(x, 4) for x in run.collect_ms]}
        if base is not None:
            same = [a[: len(b)] == b[: len(a)] for a, b in zip(run.tokens, base.tokens, strict=True)]
            out["identical_to_target_only"] = sum(same) / len(same)
            out["first_divergence"] = [_first_difference(a, b) for a, b in zip(run.tokens, base.tokens, strict=True)]
            base_tps = (sum(len(t) for t in base.tokens) - len(base.tokens)) / (base.seconds - base.admit_seconds)
            out["speedup"] = out["tokens_per_s"] / base_tps
            out["speedup_with_prefill"] = out["tokens_per_s_with_prefill"] / (
                sum(len(t) for t in base.tokens) / base.seconds)
        return out

    backend.set_replay(None, None)
    target = timed(speculative=False)
    res: dict[str, Any] = {"batch": len(prompts), "target_only": summary(target, None)}
    if g == 0:
        return res
    res["speculative"] = summary(timed(), target)
    spec_ms, target_ms = res["speculative"]["round_graph_ms"], res["target_only"]["round_graph_ms"]
    if spec_ms and target_ms:  # a speculative round's graph over a target-only step's graph, one run
        res["overhead_ratio_round"] = spec_ms / target_ms
    if replays:
        width = max(len(p) for p in prompts) + max_new_tokens + 2 * g + 3
        zero = np.zeros(g, dtype=np.float32)
        backend.set_replay(replay_reference(prompts, target.tokens, width), zero)
        ref = timed(longer=2 * g + 2)  # the continuation must reach past the last round's block
        res["replay_reference"] = summary(ref, target)
        backend.set_replay(replay_reference(prompts, ref.tokens, width), zero)
        for name in replays:
            surv = survival_profile(name, g)
            reference, profile = replay_reference(prompts, ref.tokens, width), np.array(conditional_profile(surv))
            for force in (False, True) if forced else (False,):
                backend.set_replay(reference, profile, forced=force)
                row = summary(timed(), target)
                row |= {"label": "replayed, forced (timing only)" if force else "replayed",
                        "profile_tau": 1 + sum(surv[:g]), "survival": surv}
                res[f"replay_{name}_forced" if force else f"replay_{name}"] = row
            for cap in caps:
                backend.set_replay(reference, profile)
                row = summary(timed(policy=VerifyPolicy("fixed", cap=cap)), target)
                res[f"replay_{name}_cap{cap}"] = row | {"label": f"replayed, at most {cap} drafts verified",
                                                        "profile_tau": 1 + sum(surv[:cap]), "survival": surv}
        backend.set_replay(None, None)
    if plain:
        res["plain_rounds"] = summary(timed(policy=VerifyPolicy(draft_rows=0)), target) | {
            "label": "rounds that draft nothing (draft_rows=0)"}
        if res["plain_rounds"]["round_graph_ms"] and target_ms:
            res["plain_rounds"]["graph_vs_target_step"] = res["plain_rounds"]["round_graph_ms"] / target_ms
    if temperature > 0:
        alone = timed(speculative=False, temperature=temperature, seed=1)
        res["sampling_target_only"] = summary(alone, None) | {"temperature": temperature}
        drawn = summary(timed(temperature=temperature, seed=1), None) | {"temperature": temperature}
        drawn["speedup"] = drawn["tokens_per_s"] / res["sampling_target_only"]["tokens_per_s"]
        res["sampling"] = drawn
    return res


def suggest_draft_rows(points: Sequence[tuple[int, float, float]]) -> int | None:
    """``--draft-rows`` from measured (batch, speculative tok/s, plain-round tok/s) points: the largest measured
    batch up to which speculation beat plain rounds at every measured batch (0: it lost at the smallest, so never
    draft; None: it won at every one, so no limit within the batches measured). Rows between two measured batches
    are not measured, so the suggestion stops at the last batch that won rather than guessing where they cross."""
    best: int | None = None
    for batch, spec, plain in sorted(points):
        if not spec > plain:
            return best or 0
        best = batch
    return None


def plot_bench(report: dict[str, Any], png: Path) -> None:
    """Tokens/s per batch: target-only, speculative and each replayed profile; and the host ms per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["batches"]
    xs = [r["batch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    modes = [m for m in ("target_only", "speculative", "plain_rounds", "replay_a", "replay_b", "replay_c")
             if any(m in r.get("decode", {}) for r in rows)]
    for mode in modes:
        ys = [r["decode"].get(mode, {}).get("tokens_per_s") for r in rows]
        axes[0].plot(xs, ys, marker="o", label=mode + (" (replayed)" if mode.startswith("replay") else ""))
        host = [r["decode"].get(mode, {}).get("host_ms_per_round") for r in rows]
        axes[1].plot(xs, host, marker="o", label=mode)
    for ax, ylabel in zip(axes, ("tokens / s (greedy, end to end)", "host ms per round (wall - graph)"),
                          strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (requests)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_title(f"{report.get('device', '?')}, γ = {report.get('gamma')}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- profiling
KERNEL_KINDS = (  # (category, substrings of the kernel name), first match wins
    ("spec_verify", ("spec_verify",)),
    ("attention", ("decode_attention", "attn", "fmha", "flash")),
    ("fused_norm_rope_silu", ("add_rmsnorm", "qk_norm_rope", "act_mul", "gemma_norm", "qkv_cache", "add_norm_norm")),
    ("gemm", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitk")),
    ("softmax", ("softmax",)),
    ("reduce_argmax", ("reduce", "argmax", "argmin", "cumsum", "scan")),
    ("copy_index", ("copy", "memcpy", "memset", "index", "scatter", "gather", "cat", "fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "elementwise_other"


def profile_kernels(fn: Callable[[], Any], calls: int = 5, *, ops: bool = False) -> dict[str, Any]:
    """Device kernel time of ``fn`` (already warm) per call, by :func:`kernel_kind` and the top kernels. With
    programmatic dependent launch (``kernels.pdl_options``) a kernel's time includes its wait for the previous
    one: profile a process started with ``DSPARK_PDL=0`` to compare kernels. ``ops``: also the torch operators
    with the most device time, by input shapes (``fn`` run eagerly, not as a captured graph, has them): which
    module a kernel of the by-kind table came from."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if ops else [ProfilerActivity.CUDA]
    with profile(activities=activities, record_shapes=ops) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time
        kinds[kernel_kind(ev.name)] = kinds.get(kernel_kind(ev.name), 0.0) + us
        k = kernels.setdefault(ev.name[:90], [0.0, 0])
        k[0] += us
        k[1] += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    out = {"kernel_ms_per_call": sum(kinds.values()) / calls / 1e3,
           "by_kind_ms": {k: round(v / calls / 1e3, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
           "top_kernels": [{"name": n, "ms_per_call": round(v[0] / calls / 1e3, 4), "launches_per_call": v[1] / calls}
                           for n, v in top]}
    if ops:  # device time includes the operators' children (aten::to's copy_): read a row with those below it
        cpu = torch.autograd.DeviceType.CPU  # operators (aten::, dspark::): not kernels, nor runtime calls
        rows = [r for r in prof.key_averages(group_by_input_shape=True)
                if r.device_type == cpu and "::" in r.key and r.device_time_total > 0]
        out["top_ops"] = [{"op": r.key, "input_shapes": str(r.input_shapes), "calls_per_call": r.count / calls,
                           "ms_per_call": round(r.device_time_total / calls / 1e3, 4)}
                          for r in sorted(rows, key=lambda r: -r.device_time_total)[:20]]
    return out
