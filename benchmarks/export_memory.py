"""Wall time and peak RSS of `dspark-compile build`: ONNX only versus a plain `torch.onnx.export`, or the full
build (onnx, tensorrt, triton) with its engine bytes over the unique weight bytes.

For a Qwen3-0.6B-, 1.7B- or 8B-shaped random-weight bf16 target with a DSpark draft (5 layers, γ = 7, Markov
rank 256), or a Gemma4 pair (``gemma4-1.6b``, ``gemma4-3.5b``: the 12B's head shapes and layer mix on smaller
trunks; ours only, written to ``export_memory_gemma4.json``/``.png``). Each measurement runs in its own process;
peak RSS is the largest `ru_maxrss` of the build's processes (GNU time), and the build runs ``-v`` so that each
pass's seconds and resident bytes after it (and the high-water mark so far) are recorded under ``passes``. The
plain export loads the same checkpoint with `transformers` in bf16 and calls `torch.onnx.export(dynamo=True)` with
external data — what a user would write by hand.

    python benchmarks/export_memory.py --out benchmarks/results [--sizes 0.6b,1.7b] [--work /tmp/dspark-bench]
    python benchmarks/export_memory.py --sizes gemma4-1.6b,gemma4-3.5b   # Gemma4 (issue 15): ours only
    python benchmarks/export_memory.py --full --shape 0.6b [--out benchmarks/results]   # onnx,tensorrt,triton
    python benchmarks/export_memory.py --quantize-fp8 --shape 1.7b   # onnx with --quantize fp8

The full build writes ``full_build_<shape>.json`` and ``.png``: wall time, peak RSS, `export_onnx`'s seconds,
and (engine plan bytes + the weight inputs) / (the target's weights + the draft's own). An 8B-shaped pair needs
about 2 x 16 GB of disk (checkpoint, build) and the machine to itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

SHAPES = {
    # Qwen3-0.6B / 1.7B published shapes (tied embeddings).
    "0.6b": {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_layers": 28,
             "num_heads": 16, "num_kv_heads": 8, "head_dim": 128},
    "1.7b": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_layers": 28,
             "num_heads": 16, "num_kv_heads": 8, "head_dim": 128},
    # Qwen3-8B (untied embeddings).
    "8b": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_layers": 36,
           "num_heads": 32, "num_kv_heads": 8, "head_dim": 128},
}
TIED = {"0.6b": True, "1.7b": True, "8b": False}
GEMMA4_SHAPES = {
    # gemma-4-12B-it's head shapes (sliding 256-wide heads, global 1 x 512 with K = V, 5 sliding : 1 global, last
    # global) and a tied 131072-token vocabulary on a 12-layer, 1536-wide trunk: ~1.6 GB in bf16.
    "gemma4-1.6b": {"vocab_size": 131072, "hidden_size": 1536, "intermediate_size": 6144, "num_layers": 12,
                    "num_heads": 8, "num_kv_heads": 4, "head_dim": 256, "global_kv_heads": 1, "global_head_dim": 512,
                    "sliding_window": 512},
    # The same heads and layer mix on a 12-layer, 2560-wide trunk (intermediate 10240): ~3.5 GB loaded, the size
    # at which the Qwen3 goal was met (1.7B). Written by stream_gemma4_pair.
    "gemma4-3.5b": {"vocab_size": 131072, "hidden_size": 2560, "intermediate_size": 10240, "num_layers": 12,
                    "num_heads": 8, "num_kv_heads": 4, "head_dim": 256, "global_kv_heads": 1, "global_head_dim": 512,
                    "sliding_window": 512},
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


def _tree_memory(root: int) -> dict[str, int]:
    """Anonymous and file-backed resident MiB of the largest process under ``root`` (GNU time's %M is the largest
    process too), read from /proc; a process that ends mid-read is skipped."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    best = {"anon_mib": 0, "file_mib": 0}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith(("RssAnon", "RssFile")))
        except OSError:
            continue
        anon, file = (int(fields.get(k, "0 kB").split()[0]) >> 10 for k in ("RssAnon", "RssFile"))
        if anon + file > best["anon_mib"] + best["file_mib"]:
            best = {"anon_mib": anon, "file_mib": file}
    return best


def _mem_available_mib() -> int:
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
    return int(line.split()[1]) >> 10


def measure(cmd: list[str], *, guard_mib: int = 0) -> dict[str, Any]:
    """Run ``cmd`` under GNU time: its wall time and peak RSS (``%M``, KiB), one child at a time; with a build run
    ``-v``, also each pass's seconds and memory from the pipeline's ``pass NAME 1.23s rss=… peak=…`` log lines.
    With ``guard_mib``, a sampler records the largest process's anonymous/file-backed memory every 5 s and kills
    the run when the machine's available memory falls below ``guard_mib`` (a shared box must not meet the OOM
    killer); the samples come back under ``samples``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "PEAK_RSS_KB=%M", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    samples: list[dict[str, Any]] = []
    if guard_mib:
        import threading

        def sample() -> None:
            while proc.poll() is None:
                avail = _mem_available_mib()
                samples.append({"t_s": round(time.perf_counter() - t0), "mem_available_mib": avail,
                                **_tree_memory(proc.pid)})
                if avail < guard_mib:
                    os.killpg(proc.pid, 9)
                    samples[-1]["killed"] = True
                    return
                time.sleep(5)

        threading.Thread(target=sample, daemon=True).start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        killed = " (killed by the memory guard)" if samples and samples[-1].get("killed") else ""
        raise SystemExit(f"command failed ({proc.returncode}){killed}: {' '.join(cmd)}\n{stderr[-3000:]}\n"
                         f"last samples: {samples[-3:]}")
    proc = subprocess.CompletedProcess(cmd, proc.returncode, "", stderr)
    peak_kb = int(proc.stderr.rsplit("PEAK_RSS_KB=", 1)[1].split()[0])
    passes = {}
    for line in proc.stderr.splitlines():
        if "dspark_compile.pipeline: pass " in line and "rss=" in line:
            name, seconds, *fields = line.split("pass ", 1)[1].split()
            passes[name] = {"seconds": float(seconds.rstrip("s")),
                            **{k + "_bytes": int(v) for k, v in (f.split("=") for f in fields)}}
    # What a user would see as a warning (the CLI's log lines at WARNING or above), for the "no warning that is
    # not actionable" goal; --json progress lines are not warnings.
    warnings = [line for line in proc.stderr.splitlines()
                if line.split(" ", 1)[0] in ("WARNING", "ERROR", "CRITICAL") or "Warning:" in line]
    return {"wall_s": round(wall, 2), "peak_rss_bytes": peak_kb * 1024, **({"passes": passes} if passes else {}),
            **({"samples": samples} if samples else {}), "warnings": warnings}


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


# make_tiny_pair holds every weight in float32 at once (32 GB at 8B, over 14 GB at 1.7B); pairs above this many
# parameters are written by `stream_pair` instead, one tensor at a time.
STREAM_PARAMS = 1_000_000_000
# The scaled-down dimensions stream_pair writes its configs and names with: all distinct, so each maps back to
# one real dimension (hidden, q = heads x head_dim, kv, intermediate, head_dim, vocab, Markov rank, taps, conf).
SMALL = {"vocab_size": 384, "hidden_size": 96, "intermediate_size": 160, "num_heads": 4, "num_kv_heads": 2,
         "head_dim": 16}
SMALL_RANK = 24
# make_tiny_gemma4_pair draws in float32 and keeps copies (its 1.6b pair, ~0.65 G parameters by the estimate in
# make_pair, fits); larger Gemma4 pairs are written by `stream_gemma4_pair`.
GEMMA4_STREAM_PARAMS = 1_000_000_000


def make_pair(name: str, work: Path) -> tuple[Path, Path]:
    """The random-weight bf16 pair of shape ``name`` under ``work`` (made once)."""
    import torch

    from dspark_compile.examples import make_tiny_pair

    shape = SHAPES.get(name) or GEMMA4_SHAPES[name]
    pair_dir = work / f"pair-{name}"
    layers = shape["num_layers"]
    params = shape["vocab_size"] * shape["hidden_size"] * (1 if TIED.get(name, True) else 2) + layers * (
        3 * shape["hidden_size"] * shape["intermediate_size"] + 2 * shape["num_heads"] * shape["head_dim"]
        * shape["hidden_size"] + 2 * shape["num_kv_heads"] * shape["head_dim"] * shape["hidden_size"])
    if name in GEMMA4_SHAPES and not (pair_dir / "draft" / "config.json").exists():
        from dspark_compile.examples_gemma4 import make_tiny_gemma4_pair

        taps = (1, layers // 2 - 1, layers - 2)
        if params <= GEMMA4_STREAM_PARAMS:
            make_tiny_gemma4_pair(pair_dir, **shape, draft_layers=2, block_size=7, target_layer_ids=taps,
                                  markov_rank=256, tie_word_embeddings=True, dtype=torch.bfloat16, seed=0)
        else:
            stream_gemma4_pair(pair_dir, shape, taps)
    elif not (pair_dir / "draft" / "config.json").exists():
        taps = (1, layers // 2 - 1, layers - 4)
        if params <= STREAM_PARAMS:
            make_tiny_pair(pair_dir, **shape, draft_layers=5, block_size=7, target_layer_ids=taps,
                           markov_rank=256, tie_word_embeddings=TIED[name], dtype=torch.bfloat16, seed=0)
        else:
            stream_pair(pair_dir, shape, taps, TIED[name])
    return pair_dir / "target", pair_dir / "draft"


def stream_pair(pair_dir: Path, shape: dict[str, int], taps: tuple[int, ...], tied: bool) -> None:
    """make_tiny_pair's pair (same names, configs and weight scales; other, partly repeated random values) at a
    shape too large to hold in memory: its configs and names come from a scaled-down make_tiny_pair, each weight is
    generated and written in row blocks. The draft's embedding and LM head equal the target's."""
    import torch

    from dspark_compile.checkpoint.names import draft_weight_name, target_weight_name
    from dspark_compile.checkpoint.store import read_header
    from dspark_compile.examples import DRAFT_STD, MARKOV_STD, NORM_NOISE, TARGET_STD, make_tiny_pair

    small = pair_dir.with_name(pair_dir.name + "-small")
    make_tiny_pair(small, **SMALL, num_layers=shape["num_layers"], draft_layers=5, block_size=7,
                   target_layer_ids=taps, markov_rank=SMALL_RANK, tie_word_embeddings=tied, dtype=torch.bfloat16)
    h, q, kv = shape["hidden_size"], shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    real = {SMALL["vocab_size"]: shape["vocab_size"], SMALL["hidden_size"]: h,
            SMALL["num_heads"] * SMALL["head_dim"]: q,
            SMALL["num_kv_heads"] * SMALL["head_dim"]: kv, SMALL["intermediate_size"]: shape["intermediate_size"],
            SMALL["head_dim"]: shape["head_dim"], SMALL_RANK: 256, len(taps) * SMALL["hidden_size"]: len(taps) * h,
            SMALL["hidden_size"] + SMALL_RANK: h + 256, 1: 1}
    embed = target_weight_name("embed_tokens")
    copies = {draft_weight_name("embed_tokens"): embed,
              draft_weight_name("lm_head"): embed if tied else target_weight_name("lm_head")}
    for role in ("target", "draft"):
        config = json.loads((small / role / "config.json").read_text())
        config.update({k: shape[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "head_dim")})
        config.update(num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"])
        if role == "draft":
            config["markov_rank"] = 256
        out = pair_dir / role
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        infos = read_header(small / role / "model.safetensors")
        tensors = {}
        for name, info in infos.items():
            dims = [real[d] for d in info.shape]
            norm = len(dims) == 1 and "norm" in name
            std = NORM_NOISE if norm else MARKOV_STD if "markov" in name else (
                TARGET_STD if role == "target" or name in copies else DRAFT_STD)
            seed = copies.get(name, name) if role == "draft" else name
            tensors[name] = RandomTensor(dims, seed, std, 1.0 if norm else 0.0)
        write_random_safetensors(out / "model.safetensors", tensors)
    shutil.rmtree(small)


@dataclasses.dataclass(frozen=True)
class RandomTensor:
    """A tensor to write: its shape, the name its values are seeded by (equal seeds, equal values: a tied
    copy), and the normal distribution they are drawn from."""

    dims: list[int]
    seed: str
    std: float
    mean: float = 0.0


def write_random_safetensors(path: Path, tensors: dict[str, RandomTensor]) -> None:
    """A bf16 safetensors file of ``tensors`` (sorted by name), written in blocks of 4 Mi values: memory stays at
    a few MB whatever the size, and the bytes depend only on the names, shapes and seeds."""
    import torch

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        nbytes = 2 * math.prod(tensors[name].dims)
        header[name] = {"dtype": "BF16", "shape": tensors[name].dims, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name in sorted(tensors):
            t = tensors[name]
            gen = torch.Generator().manual_seed(zlib.crc32(t.seed.encode()))  # distinct tensors, distinct values
            # One pool of 4 Mi normal values per tensor, written at a random rotation per block of rows:
            # drawing 10 G normals costs minutes on two cores; a build only needs the shapes and the scale.
            pool = (torch.randn(1 << 22, generator=gen) * t.std + t.mean).to(torch.bfloat16)
            pool = torch.cat((pool, pool))
            left = 2 * math.prod(t.dims)
            while left:
                start = int(torch.randint(1 << 22, (1,), generator=gen))
                n = min(left // 2, 1 << 22)
                f.write(pool[start:start + n].view(torch.uint8).numpy().tobytes())
                left -= 2 * n


def stream_gemma4_pair(pair_dir: Path, shape: dict[str, int], taps: tuple[int, ...]) -> None:
    """make_tiny_gemma4_pair's pair at a shape whose float32 draw would not fit (it holds every weight in float32
    and copies: an earlier ~3.5 GB attempt passed 14 GB RSS before it was stopped): its configs and tensor names
    come from a small-dimension make_tiny_gemma4_pair with the same layers, each tensor's shape from the real
    config's weight specs, and the values (make_tiny_gemma4_pair's scales; ``layer_scalar`` 1 + 0.2 N(0, 1)
    instead of uniform [0.6, 1.4]) are streamed by :func:`write_random_safetensors`. The draft's embedding and LM
    head equal the target's."""
    import torch

    from dspark_compile.checkpoint.names import draft_weight_specs, target_weight_specs
    from dspark_compile.checkpoint.store import read_header
    from dspark_compile.examples import DRAFT_STD, MARKOV_STD
    from dspark_compile.examples_gemma4 import NORM_NOISE, TARGET_STD, make_tiny_gemma4_pair
    from dspark_compile.model_config import parse_draft_config, parse_target_config

    small = pair_dir.with_name(pair_dir.name + "-small")
    make_tiny_gemma4_pair(small, num_layers=shape["num_layers"], draft_layers=2, block_size=7, target_layer_ids=taps,
                          markov_rank=SMALL_RANK, tie_word_embeddings=True, dtype=torch.bfloat16, seed=0)
    real = {"vocab_size": shape["vocab_size"], "vocab_size_per_layer_input": shape["vocab_size"],
            "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
            "num_attention_heads": shape["num_heads"], "num_key_value_heads": shape["num_kv_heads"],
            "head_dim": shape["head_dim"], "num_global_key_value_heads": shape["global_kv_heads"],
            "global_head_dim": shape["global_head_dim"], "sliding_window": shape["sliding_window"]}
    embed = "model.embed_tokens.weight"
    for role, specs_of, parse in (("target", target_weight_specs, parse_target_config),
                                  ("draft", draft_weight_specs, parse_draft_config)):
        out = pair_dir / role
        out.mkdir(parents=True, exist_ok=True)
        config = json.loads((small / role / "config.json").read_text()) | real
        if role == "draft":
            config["markov_rank"] = 256
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for extra in small.joinpath(role).glob("*.json"):
            if extra.name != "config.json":
                shutil.copy(extra, out / extra.name)
        specs = specs_of(parse(config, out))
        tensors = {}
        for name in read_header(small / role / "model.safetensors"):
            copy = role == "draft" and name in ("embed_tokens.weight", "lm_head.weight")
            norm = name.endswith("norm.weight") or name.endswith("layer_scalar")
            std = NORM_NOISE if norm else MARKOV_STD if name.startswith("markov_head.markov_w") else (
                TARGET_STD if role == "target" or copy else DRAFT_STD)
            mean = (4.0 if name == "model.norm.weight" else 1.0) if norm else 0.0  # golden recipe: x4 final norm
            tensors[name] = RandomTensor(list(specs[name].shape), embed if copy else name,
                                         std * (4.0 if name == "model.norm.weight" else 1.0), mean)
        write_random_safetensors(out / "model.safetensors", tensors)
    shutil.rmtree(small)


def run_full(name: str, work: Path) -> dict[str, object]:
    """`dspark-compile build --targets onnx,tensorrt,triton` (TensorRT-RTX), in its own process."""
    target, draft = make_pair(name, work)
    tw, dw = loaded_bytes(target, draft)
    out = work / f"full-{name}"
    shutil.rmtree(out, ignore_errors=True)
    ours = measure([sys.executable, "-m", "dspark_compile.cli", "build", "--target", str(target), "--draft",
                    str(draft), "--out", str(out), "--dtype", "bf16", "--targets", "onnx,tensorrt,triton",
                    "--trt-flavor", "rtx", "--max-batch", "8", "--max-context", "4096", "--json", "-v"],
                   guard_mib=400)
    manifest = json.loads((out / "manifest.json").read_text())
    plans = manifest["engines"]["plans"]
    inputs = {(r["file"], r["offset"]): r["bytes"] for r in manifest["weight_inputs"].values()}
    weights = tw + dw
    plan_bytes = sum(p["plan_bytes"] for p in plans)
    held = sum(p["weight_bytes"] for p in plans) + sum(inputs.values())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "shape": name, **SHAPES[name], "tied_embeddings": TIED[name],
        "target_weight_bytes": tw, "draft_own_weight_bytes": dw,
        "build": {**ours, "peak_rss_over_weights": round(ours["peak_rss_bytes"] / weights, 3),
                  "passes": {p["name"]: p["seconds"] for p in manifest["passes"]}},
        "engines": {p["plan"]: {k: p[k] for k in ("graph", "plan_bytes", "weight_bytes", "activation_bytes",
                                                  "activation_source", "segment", "segments") if k in p}
                    for p in plans},
        "weight_input_bytes": sum(inputs.values()),
        "engine_bytes_over_unique_weights": round((plan_bytes + sum(inputs.values())) / weights, 4),
        "engine_weights_over_unique_weights": round(held / weights, 4),
        "server_memory": manifest["memory"],
    }


def plot_full(result: dict, png: Path) -> None:
    """Where the time went (passes), what the engines hold against the unique weights, and (when the memory
    guard sampled the run) the largest process's memory over time against the 1.3 x goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["build"].get("samples") or []
    fig, axes = plt.subplots(1, 3 if samples else 2, figsize=(15 if samples else 10, 3.8))
    passes = {k: v for k, v in result["build"]["passes"].items() if v >= 1}
    axes[0].barh(list(passes), list(passes.values()))
    axes[0].set_xlabel(f"seconds (wall {result['build']['wall_s']:.0f} s, 2 shared CPU cores)")
    gb = 1e9
    unique = (result["target_weight_bytes"] + result["draft_own_weight_bytes"]) / gb
    bars = {"unique weights": unique, "weight inputs": result["weight_input_bytes"] / gb,
            **{g.removesuffix(".plan"): e["plan_bytes"] / gb for g, e in result["engines"].items()}}
    axes[1].bar(list(bars), list(bars.values()), color=["k"] + ["C1"] * (len(bars) - 1))
    axes[1].tick_params(axis="x", labelrotation=30, labelsize=7)
    axes[1].axhline(1.10 * unique, ls="--", color="k", lw=0.8, label="goal: engines + inputs <= 1.10 x unique")
    axes[1].set_ylabel("GB")
    axes[1].legend(fontsize=7)
    axes[1].set_title(f"engines + inputs / unique = {result['engine_bytes_over_unique_weights']:.3f}", fontsize=9)
    if samples:
        t = [s["t_s"] for s in samples]
        anon, file = ([s[k] * 2**20 / gb for s in samples] for k in ("anon_mib", "file_mib"))
        axes[2].stackplot(t, anon, file, labels=["anonymous", "file-backed (mapped weights)"], colors=["C0", "C9"])
        axes[2].axhline(1.3 * unique, ls="--", color="k", lw=0.8, label="goal: peak RSS <= 1.3 x loaded weights")
        axes[2].set_xlabel("seconds (largest process of the build, every 5 s)")
        axes[2].set_ylabel("GB")
        axes[2].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Full build (onnx, tensorrt-rtx, triton) of a {result['shape']}-shaped bf16 pair; peak RSS "
                 f"{result['build']['peak_rss_bytes'] / 2**30:.1f} GiB")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run_size(name: str, work: Path) -> dict[str, object]:
    shape = SHAPES.get(name) or GEMMA4_SHAPES[name]
    target, draft = make_pair(name, work)
    tw, dw = loaded_bytes(target, draft)
    out = work / f"build-{name}"
    shutil.rmtree(out, ignore_errors=True)
    ours = measure([sys.executable, "-m", "dspark_compile.cli", "build", "--target", str(target), "--draft",
                    str(draft), "--out", str(out), "--dtype", "bf16", "--targets", "onnx", "--json", "-v"])
    build_bytes = sum(p.stat().st_size for p in (out / "onnx").iterdir())
    weights = tw + dw
    ours_part = {**ours, "onnx_dir_bytes": build_bytes,
                 "peak_rss_over_weights": round(ours["peak_rss_bytes"] / weights, 3)}
    if name in GEMMA4_SHAPES:  # no plain baseline: the question is our build's peak over what it loads
        shutil.rmtree(out, ignore_errors=True)
        return {"shape": name, "family": "gemma4", **shape, "target_weight_bytes": tw, "draft_own_weight_bytes": dw,
                "checkpoint_file_bytes": weight_bytes(target) + weight_bytes(draft), "dspark_build": ours_part}
    plain_out = work / f"plain-{name}"
    shutil.rmtree(plain_out, ignore_errors=True)
    plain_out.mkdir(parents=True)
    plain = measure([sys.executable, "-c", PLAIN_EXPORT, str(target), str(plain_out / "model.onnx")])
    plain_bytes = sum(p.stat().st_size for p in plain_out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(plain_out, ignore_errors=True)
    return {
        "shape": name, **shape,
        "target_weight_bytes": tw, "draft_own_weight_bytes": dw, "checkpoint_file_bytes": weight_bytes(target)
        + weight_bytes(draft),
        "dspark_build": ours_part,
        "plain_torch_onnx_export_target_only": {**plain, "onnx_dir_bytes": plain_bytes,
                                                "peak_rss_over_target_weights": round(plain["peak_rss_bytes"] / tw, 3)},
        "ratio_wall_ours_over_plain": round(ours["wall_s"] / plain["wall_s"], 3),
        "ratio_rss_ours_over_plain": round(ours["peak_rss_bytes"] / plain["peak_rss_bytes"], 3),
    }


def run_quantized(name: str, work: Path) -> dict[str, object]:
    """`dspark-compile build --targets onnx --quantize fp8` (issue 12's build-memory goal): peak RSS over the
    bytes the build loads (the bf16 checkpoint it quantizes)."""
    target, draft = make_pair(name, work)
    tw, dw = loaded_bytes(target, draft)
    out = work / f"fp8-{name}"
    shutil.rmtree(out, ignore_errors=True)
    ours = measure([sys.executable, "-m", "dspark_compile.cli", "build", "--target", str(target), "--draft",
                    str(draft), "--out", str(out), "--dtype", "bf16", "--targets", "onnx", "--quantize", "fp8",
                    "--json", "-q"])
    onnx_bytes = sum(p.stat().st_size for p in (out / "onnx").iterdir())
    shutil.rmtree(out, ignore_errors=True)
    return {"shape": name, **SHAPES[name], "target_weight_bytes": tw, "draft_own_weight_bytes": dw,
            "build": {**ours, "onnx_dir_bytes": onnx_bytes,
                      "peak_rss_over_loaded": round(ours["peak_rss_bytes"] / (tw + dw), 3)},
            "goal": "peak RSS <= 1.3 x the bytes loaded"}


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
    plain = [r.get("plain_torch_onnx_export_target_only") for r in runs]
    weights = [(r["target_weight_bytes"] + r["draft_own_weight_bytes"]) / gib for r in runs]
    axes[0].bar([i - 0.2 for i in x], ours, 0.4, label="dspark-compile build (target + draft)")
    axes[0].bar([i + 0.2 for i in x], weights, 0.4, color="0.7", label="weights loaded (target + draft's own)")
    if all(plain):
        axes[0].bar([i + 0.6 for i in x], [p["peak_rss_bytes"] / gib for p in plain], 0.4,
                    label="plain torch.onnx.export (target only)")
        axes[1].bar([i + 0.2 for i in x], [p["wall_s"] for p in plain], 0.4)
    axes[0].scatter(list(x), [1.3 * w for w in weights], marker="_", s=600, color="k", label="goal 1.3 x weights")
    axes[0].set_ylabel("peak RSS (GiB)")
    axes[1].bar([i - 0.2 for i in x], [r["dspark_build"]["wall_s"] for r in runs], 0.4)
    axes[1].set_ylabel("wall time (s), 2 CPU cores")
    for ax in axes:
        ax.set_xticks(list(x), [r["shape"] for r in runs])
    axes[0].legend(fontsize=7, loc="lower right")
    family = "Gemma4" if all(r.get("family") == "gemma4" for r in runs) else "Qwen3"
    fig.suptitle(f"ONNX export of a random-weight bf16 {family} target (+ DSpark draft)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sizes", default="0.6b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dspark-bench"))
    ap.add_argument("--plot-only", action="store_true", help="Redraw the PNG from an existing JSON.")
    ap.add_argument("--full", action="store_true", help="The full build (onnx, tensorrt, triton) of --shape.")
    ap.add_argument("--shape", default="0.6b", choices=sorted(SHAPES))
    ap.add_argument("--quantize-fp8", action="store_true", help="The ONNX build with --quantize fp8 of --shape.")
    args = ap.parse_args()
    if args.quantize_fp8:
        args.work.mkdir(parents=True, exist_ok=True)
        result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                  **run_quantized(args.shape, args.work)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"export_memory_fp8_{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    if args.full:
        path = args.out / f"full_build_{args.shape}.json"
        if not args.plot_only:
            args.work.mkdir(parents=True, exist_ok=True)
            result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                      **run_full(args.shape, args.work)}
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=2))
        plot_full(json.loads(path.read_text()), path.with_suffix(".png"))
        return
    sizes = [size.strip() for size in args.sizes.split(",")]
    stem = "export_memory_gemma4" if all(size in GEMMA4_SHAPES for size in sizes) else "export_memory"
    if args.plot_only:
        plot(json.loads((args.out / f"{stem}.json").read_text()), args.out / f"{stem}.png")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "goal": "peak RSS of build <= 1.3 x weight bytes", "runs": []}
    for size in sizes:
        results["runs"].append(run_size(size, args.work))
        print(json.dumps(results["runs"][-1], indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
