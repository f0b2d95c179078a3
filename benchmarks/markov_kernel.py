"""Greedy Markov sampling (``kernels.markov_greedy``, the draft step's last γ launches) on the GPU, alone: GPU ms
per draft block (γ launches in one CUDA graph) for each (vocabulary rows per program, warps), at batches 1, 4
and 16, against the byte floor (the transition matrix W2 read once per position) and the module's loop
(``DSparkDraft.propose``'s ops, written out), whose tokens each configuration must equal, in the same run.
Above ``--chunk`` rows (default 16) each configuration runs in one launch and, as "…@16", on row chunks of that
many rows (W2 read once per chunk): how large rounds should take the kernel (``kernels.MARKOV_ROWS``).
``--temperature T`` times sampling instead (``kernels.markov_sample``, its distributions written into a
buffer, against the module's softmax and inverse CDF: the sums' order may move a draw in rare rows). JSON on
stdout.

    PYTHONPATH=. python benchmarks/markov_kernel.py [--shape qwen3-8b] [--batch 1,4,16,32,64] [--e4m3-w2]
        [--temperature 0.8] [--chunk 16] [--configs default,128x4,64x2x32,...] [--png OUT.png]
    python benchmarks/markov_kernel.py --plot RESULT.json [RESULT.json ...] --png OUT.png   (no GPU)
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from dspark_compile.models.layers import fp8_dequantize, quantize_fp8
from dspark_compile.plugins.spec_verify.reference import inverse_cdf_torch
from dspark_compile.targets.torch.bench import SHAPES, byte_floor_ms, measure_copy_bandwidth
from dspark_compile.targets.torch.decode_gemm import graph_ms
from dspark_compile.targets.torch.kernels import markov_greedy, markov_sample


def module_loop(base: torch.Tensor, hidden: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                wc: torch.Tensor, bc: torch.Tensor, temperature: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``DSparkDraft.propose`` with a vanilla Markov head and a confidence head over [h, W1]: argmax, or with
    ``temperature`` [B] and ``uniforms`` [B, G] the inverse CDF of softmax(logits / T)."""
    prev, tokens, confs = anchor, [], []
    for k in range(base.shape[1]):
        e = F.embedding(prev, w1)
        logits = base[:, k].float() + F.linear(e, w2).float()
        confs.append(F.linear(torch.cat((hidden[:, k], e), -1), wc.view(1, -1), bc).squeeze(-1).float())
        if temperature is None or uniforms is None:
            prev = logits.argmax(-1)
        else:
            prev = inverse_cdf_torch(torch.softmax(logits / temperature[:, None], -1), uniforms[:, k])
        tokens.append(prev)
    return torch.stack(tokens, 1), torch.stack(confs, 1)


ROW_ARGS = ("base", "hidden", "anchor", "temperature", "uniforms", "probs_out")
"""The kernels' batch-first arguments: a chunk of rows slices these and keeps the weights."""


def chunked(call: functools.partial, size: int) -> tuple[torch.Tensor, ...]:
    """``call`` (markov_greedy or markov_sample, every argument a keyword) on ``size`` rows at a time."""
    rows = {k: t for k, t in call.keywords.items() if k in ROW_ARGS}
    parts = [call(**{k: t[r:r + size] for k, t in rows.items()}) for r in range(0, rows["base"].shape[0], size)]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(2))


def plot(results: list[dict[str, Any]], png: str) -> None:
    """ms per draft block against the batch: the module's loop, and each configuration in one launch and in
    chunks, one panel per result (bf16 / e4m3 W2, greedy / sampling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        batches = [int(b[1:]) for b in res["rows"]]
        names = dict.fromkeys(n for row in res["rows"].values() for n in row)
        for name in names:
            pts = [(b, row[name]["ms_per_block"]) for b, row in zip(batches, res["rows"].values(), strict=True)
                   if "ms_per_block" in row.get(name, {})]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name,
                    linestyle="--" if "@" in name else "-", linewidth=2.5 if name == "module_loop" else 1.2)
        ax.axhline(res["floor_ms_per_block"], color="grey", linestyle=":", label="W2 byte floor")
        mode = f"T = {res['temperature']:g}" if res.get("temperature") else "greedy"
        ax.set(xscale="log", xticks=batches, xticklabels=batches, xlabel="batch rows", ylabel="ms per draft block",
               title=f"{res['device']}: {'e4m3' if res['e4m3_w2'] else 'bf16'} W2, {mode}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--e4m3-w2", action="store_true", help="W2 per-channel e4m3, as --quantize-draft leaves it")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: time sampling at this temperature")
    ap.add_argument("--chunk", type=int, default=16, help="rows per launch of the chunked runs above it")
    ap.add_argument("--png", help="also draw the result (with --plot: the given results) here")
    ap.add_argument("--plot", nargs="+", metavar="RESULT.json", help="only draw these results (needs --png)")
    ap.add_argument("--configs", default="default,128x4,64x4,256x4,256x8",
                    help="vocabulary rows per program x warps [x rank columns per W2 step], or default")
    args = ap.parse_args()
    if args.plot:
        if not args.png:
            ap.error("--plot needs --png")
        missing = [f for f in args.plot if not Path(f).is_file()]
        if missing:
            ap.error(f"--plot: no such result file: {missing[0]}")
        plot([json.loads(Path(f).read_text()) for f in args.plot], args.png)
        return 0
    shape = SHAPES[args.shape]
    v, h, r, g = shape.vocab_size, shape.hidden_size, shape.markov_rank, shape.block_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device="cuda") * std).to(dt)

    w1, w2 = randn(v, r), randn(v, r, std=0.05)
    kernel_w2, w2_scale = w2, None
    if args.e4m3_w2:  # the kernel reads e4m3 and scales; the module loop the weight Fp8Linear dequantizes
        kernel_w2, w2_scale = quantize_fp8(w2)
        w2 = fp8_dequantize(kernel_w2, w2_scale, 0).to(dt)
    wc, bc = randn(h + r, std=0.02), randn(1)
    bandwidth = measure_copy_bandwidth("cuda")
    out: dict[str, object] = {"device": torch.cuda.get_device_name(), "shape": args.shape,
                              "copy_bandwidth_gb_s": bandwidth / 1e9,
                              "e4m3_w2": args.e4m3_w2, "temperature": args.temperature,
                              "floor_ms_per_block": byte_floor_ms(g * kernel_w2.nbytes, bandwidth), "rows": {}}
    for bsz in (int(b) for b in args.batch.split(",")):
        base, hidden = randn(bsz, g, v), randn(bsz, g, h)
        anchor = torch.randint(0, v, (bsz,), generator=gen, device="cuda")
        sampling: dict[str, torch.Tensor] = {}
        if args.temperature > 0:
            sampling = {"temperature": torch.full((bsz,), args.temperature, device="cuda"),
                        "uniforms": torch.rand(bsz, g, generator=gen, device="cuda")}
        loop = functools.partial(module_loop, base, hidden, anchor, w1, w2, wc, bc, **sampling)
        ref_tok, ref_conf = loop()
        row: dict[str, object] = {"module_loop": {"ms_per_block": graph_ms([loop] * 4)}}
        for cfg in args.configs.split(","):  # "default": no keywords (an earlier kernel, run from a copy)
            kw: dict[str, object] = {} if cfg == "default" else dict(
                zip(("block_v", "warps", "block_r"), map(int, cfg.split("x")), strict=False))
            if w2_scale is not None:
                kw["w2_scale"] = w2_scale
            if sampling:
                kw["probs_out"] = torch.empty(bsz, g, v, device="cuda")
            kernel = markov_sample if sampling else markov_greedy
            one = functools.partial(kernel, base=base, hidden=hidden, anchor=anchor, w1=w1, w2=kernel_w2, conf_w=wc,
                                    conf_b=bc, conf_markov=True, **sampling, **kw)
            runs = [(cfg, one)] + ([(f"{cfg}@{args.chunk}", functools.partial(chunked, one, args.chunk))]
                                   if bsz > args.chunk else [])
            for name, call in runs:
                try:
                    tok, conf = call()[:2]
                    row[name] = {"ms_per_block": graph_ms([call] * 4),
                                 "tokens_equal_module_loop": bool(torch.equal(tok, ref_tok)),
                                 "conf_max_abs_err": float((conf - ref_conf).abs().max())}
                except Exception as exc:  # e.g. a configuration out of shared memory: the sweep goes on
                    row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out["rows"][f"b{bsz}"] = row  # type: ignore[index]
    print(json.dumps(out, indent=1))
    if args.png:
        plot([out], args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
