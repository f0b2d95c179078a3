"""FP8 weights on the torch CUDA-graph target (issue 12), Qwen3-8B shape (``--shape``) with random weights, in one run.

Sections: ``tune`` (every candidate configuration of the FP8 GEMM per product and row count), ``gemm`` (each
of the layer's matrix products at M rows: bf16 cuBLAS, the weight-only FP8 Triton GEMM, the same kernel with
dynamic e4m3 activations (W8A8, ``--quantize fp8-dynamic``), and ``torch._scaled_mm`` W8A8 rowwise for
comparison; each FP8 GEMM's error vs its dequantized reference), ``kl`` (next-token KL(bf16 ‖ FP8) of
the fused target step over random prompts), ``rounds`` (per batch and dtype: target-only and speculative
decoding through the round graph, replayed acceptance profile b, FP8 target step vs its byte floor,
speculative == target-only; ``--kinds`` picks the targets: bf16, fp8, fp8_dynamic, ...), ``head_draft`` (the
same rounds with the LM head and the draft quantized too: ``--quantize-lm-head --quantize-draft``; the LM head
then also runs one FP8 GEMM configuration for step and verify, where bf16 cuBLAS may pick different algorithms
for 64 and 512 rows).

    PYTHONPATH=. python benchmarks/fp8_bench.py --out OUT [--smoke] [--batch 1,64]
        [--sections tune,gemm,kl,rounds,head_draft] [--tune-shapes qwen3-8b,gemma4-12b]

``--shape gemma4-12b`` runs the rounds of another shape (Gemma4's e4m3 layers take the CUDA-graph target's own
seams: ``static_forward._use_gemma4_kernels``); its kinds are bf16, fp8 and fp8_head_draft (its soft-capped head
in e4m3 too: ``passes.quantize.quantize_head``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from dspark_compile.errors import UsageError
from dspark_compile.models.layers import (
    Fp8Linear,
    activation_group,
    fp8_dequantize,
    fp8_group_quantize_dequantize,
    quantize_fp8,
)
from dspark_compile.passes.quantize import DRAFT_KEPT, quantize_head, quantize_inputs, quantize_module
from dspark_compile.runtime.decode import VerifyPolicy
from dspark_compile.targets.torch import decode_gemm
from dspark_compile.targets.torch.bench import (
    SHAPES,
    SMOKE,
    Gemma4PairShape,
    byte_floor_ms,
    measure_copy_bandwidth,
    random_pair,
    rounds_bench,
    target_bytes,
)
from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend
from dspark_compile.targets.torch.decode_gemm import CUBLAS, DecodeWeight, candidate_ms, decode_linear, graph_ms
from dspark_compile.targets.torch.static_forward import StaticProgram


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cuda_ms(fn: Any, calls: int = 20) -> float:
    """Milliseconds per call, ``calls`` calls captured in one CUDA graph (the same weight each time: warm in L2
    where it fits, unlike a step; the tune section times candidates as a step runs them)."""
    return graph_ms([fn] * calls)


def bench_gemm(shape: Any, rows: list[int], bandwidth: float) -> dict[str, Any]:
    h, inter = shape.hidden_size, shape.intermediate_size
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    out: dict[str, Any] = {}
    for name, (n, k) in {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter)}.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, scale = quantize_fp8(w)
        fw = DecodeWeight.of(qw, scale, 0, None)
        ref_w = fp8_dequantize(qw, scale, 0)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            got = decode_linear(x, fw).float()
            ref = F.linear(x.float(), ref_w)
            fd = DecodeWeight.of(qw, scale, 0, None, activation_group(k))
            ref_dyn = F.linear(fp8_group_quantize_dequantize(x, fd.act_group), ref_w)
            row = {"bf16_ms": cuda_ms(lambda x=x, w=w: F.linear(x, w)),
                   "fp8_triton_ms": cuda_ms(lambda x=x, fw=fw: decode_linear(x, fw)),
                   "fp8_rel_err": float((got - ref).abs().max() / ref.abs().max()),
                   "w8a8_triton_ms": cuda_ms(lambda x=x, fd=fd: decode_linear(x, fd)),
                   "w8a8_rel_err": float((decode_linear(x, fd).float() - ref_dyn).abs().max()
                                         / ref_dyn.abs().max()),
                   "fp8_floor_ms": byte_floor_ms(n * k + 2 * m * (n + k), bandwidth),
                   "bf16_floor_ms": byte_floor_ms(2 * n * k + 2 * m * (n + k), bandwidth)}
            try:  # W8A8 rowwise: activations quantized per row (another model; timing only)
                wt = qw.t()
                sb = scale.view(1, -1)

                def scaled(x: torch.Tensor = x, wt: torch.Tensor = wt, sb: torch.Tensor = sb) -> torch.Tensor:
                    amax = x.abs().amax(1, keepdim=True).float().clamp_min(1e-12)
                    sa = amax / 448.0
                    xq = (x.float() / sa).to(torch.float8_e4m3fn)
                    return torch._scaled_mm(xq, wt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

                row["scaled_mm_w8a8_ms"] = cuda_ms(scaled)
            except Exception as exc:  # report, keep going
                row["scaled_mm_w8a8_ms"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            out[f"{name}_m{m}"] = row
            shown = {a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}
            say(f"gemm {name} {n}x{k} M={m}: {json.dumps(shown)}")
    return out


def layer_products(shape: Any) -> dict[str, tuple[int, int]]:
    """(N, K) of each matrix product of a decoder layer (q|k|v and gate|up fused) and of the LM head; Gemma4
    shapes: the sliding and the global layers' attention products (K = V on the global ones)."""
    h, inter = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    out = {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter),
           "lm_head": (shape.vocab_size, h)}
    if isinstance(shape, Gemma4PairShape):
        gq, gkv = shape.num_heads * shape.global_head_dim, shape.global_kv_heads * shape.global_head_dim
        out |= {"qkv_global": (gq + gkv, h), "o_global": (h, gq)}
    return out


def tune_gemm(shape: Any, bandwidth: float, weights: str = "fp8",
              rows: tuple[int, ...] = (1, 8, 64, 512)) -> dict[str, Any]:
    """Every candidate configuration of the decode GEMM per product, timed as the kernel's own choice is
    (``decode_gemm.candidate_ms``: in a CUDA graph, over copies of the weight; for W8A8 above 16 rows on Hopper,
    cuBLAS's e4m3 product ``SCALED_MM`` too): µs at M = 1 and 8 (small class)
    or 64 and 512 (large class), against bf16 cuBLAS (and, for e4m3, dequantize-then-cuBLAS); whether M = 1 and
    a row of M = 8 agree bit for bit under one configuration. ``weights`` "bf16": the kernel streaming bf16
    weights; "w8a8": e4m3 weights with dynamic e4m3 activations (``--quantize fp8-dynamic``)."""
    from dspark_compile.targets.torch.decode_gemm import SMALL_M, _candidates, with_scaled_mm, with_tma

    out: dict[str, Any] = {}
    wide = weights == "bf16"
    rows = tuple(m for m in rows if m <= 16) if wide else rows
    for name, (n, k) in layer_products(shape).items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, scale = quantize_fp8(w)
        act = activation_group(k) if weights == "w8a8" else 0
        fw = DecodeWeight.full(w) if wide else DecodeWeight.of(qw, scale, 0, None, act)
        row: dict[str, Any] = {"floor_us": byte_floor_ms(n * k * (2 if wide else 1), bandwidth) * 1e3}
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row[f"bf16_m{m}_us"] = candidate_ms(x, DecodeWeight.full(w), CUBLAS) * 1e3
            if m >= 64:
                def dequant(x: torch.Tensor = x, qw: torch.Tensor = qw, s: torch.Tensor = scale) -> torch.Tensor:
                    return F.linear(x, qw.to(torch.bfloat16) * s.view(-1, 1).to(torch.bfloat16))

                row[f"dequant_cublas_m{m}_us"] = graph_ms([dequant]) * 1e3
            for cfg in with_scaled_mm(with_tma([c for c in _candidates(m, k, k, 2 if wide else 1, act)
                                                if c != CUBLAS], fw), m, fw):
                try:
                    us = candidate_ms(x, fw, cfg) * 1e3
                    row[f"{weights}_m{m}_{cfg}_us"] = us
                except Exception as exc:  # a configuration that does not compile (shared memory)
                    row[f"{weights}_m{m}_{cfg}_us"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                    continue
                if m == 8:
                    one = decode_linear(x[:1], fw, cfg)
                    row[f"invariant_{cfg}"] = bool(torch.equal(one, decode_linear(x, fw, cfg)[:1]))
                    xr = fp8_group_quantize_dequantize(x, act) if act else x.float()
                    ref = F.linear(xr, w.float() if wide else fp8_dequantize(qw, scale, 0))
                    row[f"rel_err_{cfg}"] = float((decode_linear(x, fw, cfg).float() - ref).abs().max()
                                                  / ref.abs().max())
        best = {m: min((v, key) for key, v in row.items()
                       if key.startswith(f"{weights}_m{m}_") and isinstance(v, float)) for m in rows}
        say(f"tune {weights} {name} {n}x{k} floor {row['floor_us']:.1f} us; bf16 cuBLAS " +
            " ".join(f"m{m} {row[f'bf16_m{m}_us']:.1f}" for m in rows) + "; best kernel " +
            " ".join(f"m{m} {v:.1f} ({row['floor_us'] / v:.2f} of floor) {key}" for m, (v, key) in best.items()))
        out[name] = row
    assert SMALL_M == 16
    return out


@torch.inference_mode()
def reference_logits(target: Any, ids: torch.Tensor) -> torch.Tensor:
    """The modules' own forward (``Fp8Linear`` dequantizes; float32 attention)."""
    hidden, _, _ = target(ids, torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device),
                          target.new_cache(ids.shape[0], ids.shape[1]))
    return target.logits(hidden)


@torch.inference_mode()
def fused_logits(target: Any, ids: torch.Tensor) -> torch.Tensor:
    prog = StaticProgram(target, None, fused=True, attention="triton")
    kv = target.new_cache(ids.shape[0], 256)
    hidden, _ = prog.target_step(ids, torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device), kv, 256)
    return target.logits(hidden)


def kl_stats(p_logits: torch.Tensor, q_logits: torch.Tensor) -> dict[str, float]:
    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float((p_logits.argmax(-1) == q_logits.argmax(-1)).float().mean())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES), help="the rounds' and kl's pair")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--sections", default="gemm,kl,rounds")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0: the rounds section also times sampling rounds at this temperature")
    ap.add_argument("--verify-caps", default="",
                    help="e.g. 1,3: the rounds run narrow (a round verifies max ℓ + 1 positions, a power of two) and "
                         "replay b again with at most that many drafts verified a round")
    ap.add_argument("--plain-rounds", action="store_true",
                    help="the rounds also time rounds that draft nothing (VerifyPolicy draft_rows=0) against "
                         "target-only steps")
    ap.add_argument("--gemm-rows", default="1,8,64,512")
    ap.add_argument("--tune-shapes", default="qwen3-8b", help="shapes whose products the tune section times")
    ap.add_argument("--tune-rows", default="1,8,64,512", help="row counts the tune section times")
    ap.add_argument("--tune-weights", default="fp8,bf16,w8a8", help="weight kinds the tune section times")
    ap.add_argument("--kinds", default="bf16,fp8,fp8_dynamic,fp8_head_draft,fp8_dynamic_head_draft",
                    help="targets the rounds run, in this order (quantizing is one-way: head_draft kinds last); "
                         "_dynamic: --quantize fp8-dynamic, e4m3 activations too")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if "bf16" in kinds and any(k != "bf16" for k in kinds[: kinds.index("bf16")]):
        ap.error(f"--kinds {args.kinds}: bf16 must come first (the rounds quantize the one model in place, so a "
                 "bf16 run after a quantized kind would measure the quantized model)")
    try:  # the same caps `--verify fixed=K` takes, checked by the same parser
        caps = [VerifyPolicy.parse(f"fixed={c}").cap for c in args.verify_caps.split(",") if c]
    except UsageError as exc:
        ap.error(f"--verify-caps {args.verify_caps}: {exc}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke and args.shape != "qwen3-8b":
        ap.error(f"--smoke runs the smoke shape; leave out --shape {args.shape} or --smoke")
    shape = SMOKE if args.smoke else SHAPES[args.shape]
    sections = args.sections.split(",")
    if isinstance(shape, Gemma4PairShape) and (any(k not in ("bf16", "fp8", "fp8_head_draft") for k in kinds)
                                                or any(s not in ("tune", "rounds", "head_draft") for s in sections)):
        ap.error(f"--shape {args.shape}: --kinds bf16,fp8,fp8_head_draft and --sections rounds,head_draft (W8A8 is "
                 f"not measured there, and the gemm and kl sections measure Qwen3's layer); found --kinds "
                 f"{args.kinds} --sections {args.sections}")
    batches = [int(b) for b in args.batch.split(",")]
    bandwidth = measure_copy_bandwidth("cuda")
    if "tune" in sections:
        res_tune: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": bandwidth / 1e9}
        for name in args.tune_shapes.split(","):
            for weights in args.tune_weights.split(","):
                res_tune[f"{name}_{weights}"] = tune_gemm(SHAPES[name], bandwidth, weights,
                                                          tuple(int(m) for m in args.tune_rows.split(",")))
                (args.out / "fp8_tune.json").write_text(json.dumps(res_tune, indent=1, default=str))
        (args.out / "fp8_tune.json").write_text(json.dumps(res_tune, indent=1, default=str))
        if sections == ["tune"]:
            return 0
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "shape": "smoke" if args.smoke else args.shape, "copy_bandwidth_gb_s": bandwidth / 1e9,
                           "context": args.context, "new_tokens": args.new_tokens,
                           "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DSPARK_")}}
    say(f"{res['device']} bandwidth {bandwidth / 1e9:.0f} GB/s")

    def write() -> None:
        (args.out / "fp8_bench.json").write_text(json.dumps(res, indent=1, default=str))

    rng = np.random.default_rng(0)
    if "kl" in sections:  # the kernels' numerics on plain random weights (near-tied logits: the hard case)
        target, _ = random_pair(shape, device="cuda", dtype=torch.bfloat16)
        kl_ids = torch.tensor(rng.integers(0, shape.vocab_size - 1, size=(4, 128)), device="cuda")
        bf16_logits = fused_logits(target, kl_ids)
        res["kl_bf16_kernels_vs_bf16_reference"] = kl_stats(reference_logits(target, kl_ids), bf16_logits)
        quantize_module(target.layers)
        fp8_logits = fused_logits(target, kl_ids)
        res["kl_8b_random"] = kl_stats(bf16_logits, fp8_logits)
        res["kl_fp8_kernels_vs_fp8_reference"] = kl_stats(reference_logits(target, kl_ids), fp8_logits)
        say(f"KL bf16 || fp8: {res['kl_8b_random']}; fp8 reference || fp8 kernels: "
            f"{res['kl_fp8_kernels_vs_fp8_reference']}")
        write()
        del target, bf16_logits, fp8_logits
        gc.collect()
        torch.cuda.empty_cache()
    # Rounds on the decisive pair: same bytes, but its tokens survive last-bit differences, so replayed
    # acceptance and speculative == target-only hold at batch 64 too (bench.random_pair).
    target, draft = random_pair(shape, device="cuda", dtype=torch.bfloat16, decisive=True)
    rows: dict[str, Any] = {}
    res["rounds"] = rows
    head = target.lm_head
    for dtype in args.kinds.split(","):
        if "head_draft" in dtype and "head_draft" not in sections:
            continue
        if dtype != "bf16" and not any(isinstance(m, Fp8Linear) for m in target.layers.modules()):
            quantize_module(target.layers)
        if "head_draft" in dtype and not isinstance(head, Fp8Linear):  # every weight the round reads
            head = quantize_head(head)  # the module form: an earlier kind's backend wrapped target.lm_head
            quantize_module(draft, skip=DRAFT_KEPT)
        target.lm_head = draft.lm_head = head  # its module form: StaticProgram wraps it for this kind
        for model in (target, draft):  # the modules serve every kind: activations as this kind quantizes them
            for m in model.modules():
                if isinstance(m, Fp8Linear):
                    m.act_group = 0
            if "dynamic" in dtype:
                quantize_inputs(model)
        torch.cuda.empty_cache()
        if "rounds" not in sections:
            continue
        be = CudaGraphBackend(target, draft, narrow_rounds=bool(caps))
        floor = byte_floor_ms(target_bytes(target), bandwidth)
        for b in batches:
            prompts = [rng.integers(0, shape.vocab_size - 1, size=args.context).tolist() for _ in range(b)]
            t0 = time.perf_counter()
            row = rounds_bench(be, prompts, max_new_tokens=args.new_tokens, replays=("b",),
                               temperature=args.temperature, caps=caps, plain=args.plain_rounds)
            row["target_bytes"] = target_bytes(target)
            row["target_floor_ms"] = floor
            row["target_vs_floor"] = row["target_only"]["round_graph_ms"] / floor
            row["seconds"] = time.perf_counter() - t0
            row["gemm_choices"] = {str(key): cfg for key, cfg in decode_gemm._CHOSEN.items()}  # (class, N, K, ...)
            rows[f"{dtype}_b{b}"] = row
            say(f"{dtype} B={b}: target {row['target_only']['round_graph_ms']:.3f} ms (floor {floor:.3f}, "
                f"{row['target_vs_floor']:.3f}x), target tok/s {row['target_only']['tokens_per_s']:.0f}, "
                f"spec {row['speculative']['tokens_per_s']:.0f} identical "
                f"{row['speculative']['identical_to_target_only']}, replay b "
                f"{row['replay_b']['tokens_per_s']:.0f} tok/s tau {row['replay_b']['tau']:.2f} "
                f"identical {row['replay_b']['identical_to_target_only']} ({row['seconds']:.0f} s)")
            for cap in caps:
                capped = row[f"replay_b_cap{cap}"]
                say(f"{dtype} B={b} replay b, at most {cap} drafts: round graph {capped['round_graph_ms']:.3f} ms, "
                    f"{capped['tokens_per_s']:.0f} tok/s tau {capped['tau']:.2f} identical "
                    f"{capped['identical_to_target_only']}")
            if "plain_rounds" in row:
                pr = row["plain_rounds"]
                say(f"{dtype} B={b} drafting nothing: round graph {pr['round_graph_ms']:.3f} ms "
                    f"({pr.get('graph_vs_target_step', float('nan')):.3f}x the target step), "
                    f"{pr['tokens_per_s']:.0f} tok/s identical {pr['identical_to_target_only']}")
            if "sampling" in row:
                say(f"{dtype} B={b} T={args.temperature}: target {row['sampling_target_only']['round_graph_ms']:.3f} "
                    f"ms {row['sampling_target_only']['tokens_per_s']:.0f} tok/s, spec round "
                    f"{row['sampling']['round_graph_ms']:.3f} ms {row['sampling']['tokens_per_s']:.0f} tok/s "
                    f"tau {row['sampling']['tau']:.2f}")
            write()
        del be
        gc.collect()
        torch.cuda.empty_cache()
    del target, draft
    gc.collect()
    torch.cuda.empty_cache()
    if "gemm" in sections:  # last: the decoding numbers matter more if the run is cut short
        res["gemm"] = bench_gemm(shape, [int(m) for m in args.gemm_rows.split(",")], bandwidth)
        write()
    goals = {}
    for b in batches:
        if f"bf16_b{b}" not in rows:
            continue
        base = rows[f"bf16_b{b}"]["replay_b"]["tokens_per_s"]
        for kind in args.kinds.split(","):
            row = rows.get(f"{kind}_b{b}")
            if kind == "bf16" or row is None:
                continue
            goals[f"spec_speedup_{kind}_over_bf16_b{b}"] = row["replay_b"]["tokens_per_s"] / base
            goals[f"{kind}_target_vs_floor_b{b}"] = row["target_vs_floor"]
            goals[f"{kind}_lossless_b{b}"] = row["speculative"]["identical_to_target_only"]
            goals[f"{kind}_replay_lossless_b{b}"] = row["replay_b"]["identical_to_target_only"]
    res["goals"] = goals
    from dspark_compile.targets.torch.decode_gemm import _CHOSEN

    res["fp8_gemm_configs"] = {str(k): v for k, v in _CHOSEN.items()}
    say(f"goals {json.dumps(goals)}")
    write()
    plot(res, args.out / "fp8_bench.png")
    return 0


def plot(res: dict[str, Any], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = res.get("rounds", {})
    batches = sorted({int(k.rsplit("_b", 1)[1]) for k in rows})
    kinds = list(dict.fromkeys(k.rsplit("_b", 1)[0] for k in rows))
    if not batches:
        return
    fig, axes = plt.subplots(1, len(batches), figsize=(2 + 1.6 * len(kinds) * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        labels, values = [], []
        for dtype in kinds:
            row = rows.get(f"{dtype}_b{b}")
            if row is None:
                continue
            for mode in ("target_only", "replay_b"):
                labels.append(f"{dtype.replace('_', ' ')}\n{mode.replace('_', ' ')}")
                values.append(row[mode]["tokens_per_s"])
        ax.bar(labels, values, color=["#888", "#48c"] * len(kinds))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{res.get('shape', 'qwen3-8b')} shape, B = {b}\n(replay b: replayed acceptance, tau 4.81)")
        ax.set_ylabel("tokens/s")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
