"""Train a small Qwen3 target on the Python standard library, then distil DSpark drafts from it.

    PYTHONPATH=. python examples/tiny_pair/train.py --out runs/tiny --preset gpu --both
    PYTHONPATH=. python examples/tiny_pair/train.py --out /tmp/tiny --preset cpu

Writes OUT/target (Hugging Face Qwen3ForCausalLM directory + tokenizer), OUT/draft (DeepSpec DSpark directory,
Markov + confidence heads), OUT/draft_nomarkov (with --no-markov or --both: the same draft without a Markov
head, the DFlash-style ablation), OUT/heldout.jsonl (prompts from held-out files) and OUT/train_log.json.
See README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import corpus as corpus_lib
import dspark_training as dt
import torch
import transformers

from dspark_compile.checkpoint import load_draft, load_target, validate_pair

log = logging.getLogger("tiny_pair")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Preset:
    """Model shapes and training settings of one size; every field can be overridden from the CLI."""

    # corpus and tokenizer
    vocab_size: int
    max_corpus_mb: float | None  # train files kept (seeded subset); None = the whole stdlib
    tokenizer_sample_mb: float  # train text the BPE merges are learnt from
    # target
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    seq_len: int
    batch: int
    lr: float
    minutes_target: float  # wall-time cap
    epochs_target: float | None  # passes over the training tokens (the schedule's length); None = time only
    # draft
    draft_layers: int
    block_size: int
    target_layer_ids: tuple[int, ...]
    markov_rank: int
    num_anchors: int
    draft_batch: int
    draft_lr: float
    minutes_draft: float
    epochs_draft: float | None
    # both
    save_dtype: str
    eval_windows: int
    log_every: int
    eval_every: int


PRESETS = {
    "gpu": Preset(  # H100, Debian's 10.7 MB stdlib (2.7 M train tokens): ~1 min target, ~3.5 min per draft
        vocab_size=4096, max_corpus_mb=None, tokenizer_sample_mb=8.0,
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536,
        seq_len=512, batch=32, lr=1e-3, minutes_target=8.0, epochs_target=6.0,
        draft_layers=2, block_size=7, target_layer_ids=(1, 3, 5), markov_rank=64, num_anchors=64,
        draft_batch=32, draft_lr=6e-4, minutes_draft=8.0, epochs_draft=30.0,
        save_dtype="bfloat16", eval_windows=128, log_every=50, eval_every=100,
    ),
    "cpu": Preset(  # 2 shared CPU cores, one thread: ~1000 target steps in 2 min, then ~700 per draft
        vocab_size=512, max_corpus_mb=4.0, tokenizer_sample_mb=2.0,
        hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=192,
        seq_len=128, batch=16, lr=3e-3, minutes_target=2.0, epochs_target=None,
        draft_layers=2, block_size=7, target_layer_ids=(0, 1, 2), markov_rank=16, num_anchors=16,
        draft_batch=16, draft_lr=3e-3, minutes_draft=2.0, epochs_draft=None,
        save_dtype="float32", eval_windows=32, log_every=50, eval_every=200,
    ),
}

PROMPTS = 64
PROMPT_TOKENS = (64, 128)
WARMUP = 0.04  # fraction of the budget with a linear learning-rate ramp (DeepSpec's warmup_ratio)
MIN_LR = 0.1  # cosine decay to this fraction of the peak


# ---------------------------------------------------------------------------------------------------- schedule
class Budget:
    """Training progress in [0, 1] from wall time (and a step cap when one is given)."""

    def __init__(self, minutes: float, steps: int | None) -> None:
        self.seconds = minutes * 60.0
        self.steps = steps
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        """The larger of the time and step fractions: a step cap is the schedule, the time a safety stop."""
        by_time = self.elapsed() / self.seconds if self.seconds > 0 else 1.0
        by_steps = step / self.steps if self.steps else 0.0
        return max(by_time, by_steps)


def epoch_steps(epochs: float | None, stream: torch.Tensor, batch: int, seq_len: int) -> int | None:
    """Steps for ``epochs`` passes over ``stream`` (None: the schedule follows wall time alone)."""
    return None if epochs is None else max(1, round(epochs * stream.numel() / (batch * seq_len)))


def learning_rate(peak: float, progress: float) -> float:
    if progress < WARMUP:
        return peak * max(progress / WARMUP, 0.01)
    cos = 0.5 * (1.0 + math.cos(math.pi * min((progress - WARMUP) / (1.0 - WARMUP), 1.0)))
    return peak * (MIN_LR + (1.0 - MIN_LR) * cos)


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- target
def target_config(p: Preset, eos_id: int) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        head_dim=p.head_dim, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=eos_id, bos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa",
    )


@torch.no_grad()
def eval_loss(model: transformers.PreTrainedModel, windows: torch.Tensor, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for chunk in windows.split(16):
        ids = chunk.to(device)
        with autocast(device):
            total += float(model(input_ids=ids, labels=ids).loss) * chunk.shape[0]
    model.train()
    return total / windows.shape[0]


class Best:
    """The parameters with the lowest validation loss seen so far (early stopping without a restart)."""

    def __init__(self, module: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
        self.names = {id(q): n for n, q in module.named_parameters()}
        self.params = params
        self.loss = math.inf
        self.step = 0
        self.state: list[torch.Tensor] = []

    def offer(self, loss: float, step: int) -> None:
        if loss < self.loss:
            self.loss, self.step = loss, step
            self.state = [q.detach().clone() for q in self.params]

    def restore(self) -> None:
        with torch.no_grad():
            for q, saved in zip(self.params, self.state, strict=True):
                q.copy_(saved)


def train_target(model: transformers.PreTrainedModel, data: dict[str, torch.Tensor], p: Preset, budget: Budget,
                 device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    """AdamW on next-token cross-entropy; returns the log. ``model`` ends at its best validation loss."""
    params = list(model.parameters())
    decay = [q for q in params if q.ndim >= 2]
    no_decay = [q for q in params if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=p.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    best = Best(model, params)
    model.train()
    history: list[dict[str, Any]] = []
    step = 0
    while (progress := budget.progress(step)) < 1.0:
        for group in opt.param_groups:
            group["lr"] = learning_rate(p.lr, progress)
        ids = corpus_lib.random_windows(data["train"], p.batch, p.seq_len, gen).to(device, non_blocking=True)
        with autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % p.log_every == 0 or step == 1:
            row: dict[str, Any] = {"step": step, "seconds": round(budget.elapsed(), 1),
                                   "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"]}
            if step % p.eval_every == 0:
                row["valid_loss"] = round(eval_loss(model, data["valid"], device), 4)
                best.offer(row["valid_loss"], step)
            history.append(row)
            log.info("target step %5d  %6.1fs  loss %.3f%s", step, row["seconds"], row["loss"],
                     f"  valid {row['valid_loss']:.3f}" if "valid_loss" in row else "")
    sync(device)
    seconds = budget.elapsed()
    best.offer(eval_loss(model, data["valid"], device), step)
    best.restore()
    final = {"step": best.step, "valid_loss": best.loss, "heldout_loss": eval_loss(model, data["heldout"], device),
             "train_loss": eval_loss(model, data["train_eval"], device)}
    log.info("target done: %d steps in %.0fs; kept step %d: held-out loss %.3f (valid %.3f, train %.3f)", step,
             seconds, best.step, final["heldout_loss"], best.loss, final["train_loss"])
    return {"parameters": sum(q.numel() for q in params), "steps": step, "seconds": round(seconds, 1),
            "steps_per_minute": round(step / seconds * 60.0, 1),
            "tokens_per_second": round(step * p.batch * p.seq_len / seconds), "final": final, "history": history}


# ---------------------------------------------------------------------------------------------------- draft
class TargetFeatures:
    """The frozen target's taps and logits for a batch of sequences (the draft's context and teacher)."""

    def __init__(self, model: transformers.PreTrainedModel, layer_ids: tuple[int, ...], device: torch.device):
        self.model = model.eval().requires_grad_(False)
        self.layer_ids = layer_ids
        self.device = device

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device):
            out = self.model(input_ids=ids, output_hidden_states=True)
        taps = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)  # HF index = layer id + 1
        return taps, out.logits


def draft_step(draft: torch.nn.Module, features: TargetFeatures, ids: torch.Tensor, anchors: torch.Tensor,
               decay: float) -> tuple[torch.Tensor, Callable[[], dict[str, float]]]:
    """The loss of one batch and a function computing its metrics (called on logging steps only: it syncs)."""
    taps, logits = features(ids)
    with autocast(features.device):
        out = dt.block_forward(draft, ids, taps, anchors)
    teacher = dt.gather_positions(logits, out.positions)
    terms = dt.dspark_loss(out, teacher, decay)
    return terms.loss, lambda: dt.block_metrics(out, teacher, terms)


@torch.no_grad()
def draft_eval(draft: torch.nn.Module, features: TargetFeatures, windows: torch.Tensor, p: Preset,
               decay: float) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1234)  # the same anchors every evaluation
    draft.eval()
    sums: dict[str, float] = {}
    for chunk in windows.split(16):
        anchors = dt.sample_anchors(chunk.shape[0], chunk.shape[1], p.num_anchors, gen).to(features.device)
        _, metrics = draft_step(draft, features, chunk.to(features.device), anchors, decay)
        for k, v in metrics().items():
            sums[k] = sums.get(k, 0.0) + v * chunk.shape[0]
    draft.train()
    return {k: round(v / windows.shape[0], 4) for k, v in sums.items()}


def train_draft(draft: torch.nn.Module, features: TargetFeatures, data: dict[str, torch.Tensor], p: Preset,
                budget: Budget, decay: float, gen: torch.Generator, label: str) -> dict[str, Any]:
    """AdamW on the DSpark objective against the frozen target; ``draft`` ends at its best validation loss."""
    device = features.device
    params = dt.trainable_parameters(draft)
    opt = torch.optim.AdamW(params, lr=p.draft_lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    best = Best(draft, params)
    draft.train()
    history: list[dict[str, Any]] = []
    step = 0
    while (progress := budget.progress(step)) < 1.0:
        for group in opt.param_groups:
            group["lr"] = learning_rate(p.draft_lr, progress)
        ids = corpus_lib.random_windows(data["train"], p.draft_batch, p.seq_len, gen).to(device, non_blocking=True)
        anchors = dt.sample_anchors(p.draft_batch, p.seq_len, p.num_anchors, gen).to(device, non_blocking=True)
        loss, metrics = draft_step(draft, features, ids, anchors, decay)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % p.log_every == 0 or step == 1:
            row: dict[str, Any] = {"step": step, "seconds": round(budget.elapsed(), 1),
                                   **{k: round(v, 4) for k, v in metrics().items()}}
            if step % p.eval_every == 0:
                row["valid"] = draft_eval(draft, features, data["valid"], p, decay)
                best.offer(row["valid"]["loss"], step)
            history.append(row)
            log.info("%s step %5d  %6.1fs  loss %.3f  ce %.3f  l1 %.3f  conf %.3f  tau_greedy %.2f  tau_prob %.2f",
                     label, step, row["seconds"], row["loss"], row["ce"], row["l1"], row["confidence"],
                     row["tau_greedy"], row["tau_prob"])
    sync(device)
    seconds = budget.elapsed()
    best.offer(draft_eval(draft, features, data["valid"], p, decay)["loss"], step)
    best.restore()
    final = draft_eval(draft, features, data["heldout"], p, decay)
    log.info("%s done: %d steps in %.0fs; kept step %d: held-out tau_greedy %.2f tau_prob %.2f (teacher-forced)",
             label, step, seconds, best.step, final["tau_greedy"], final["tau_prob"])
    return {"parameters_excluding_shared": sum(q.numel() for q in params), "steps": step,
            "seconds": round(seconds, 1), "steps_per_minute": round(step / seconds * 60.0, 1),
            "kept_step": best.step, "heldout": final, "history": history}


# ---------------------------------------------------------------------------------------------------- output
def write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write into a temporary sibling and rename it into place, so a stopped run leaves no half checkpoint."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def check_pair(target_dir: Path, draft_dir: Path) -> None:
    problems = validate_pair(load_target(target_dir), load_draft(draft_dir))
    if problems:
        raise SystemExit("the written pair does not validate:\n" + "\n".join(problems))


def parse_sets(p: Preset, items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` strings -> typed preset overrides (the type of the preset's current value)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in Preset.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(asdict(p))}")
        current = getattr(p, name)
        if text.lower() == "none":
            out[name] = None
        elif isinstance(current, tuple):
            out[name] = tuple(int(v) for v in text.split(",") if v)
        elif current is None:
            out[name] = float(text)
        else:
            out[name] = type(current)(text)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    ap.add_argument("--minutes-target", type=float, help="target training wall-time budget")
    ap.add_argument("--minutes-draft", type=float, help="wall-time budget of each draft")
    ap.add_argument("--steps-target", type=int,
                    help="schedule length of the target in steps (default: the preset's epochs; time-capped)")
    ap.add_argument("--steps-draft", type=int,
                    help="schedule length of each draft in steps (default: the preset's epochs; time-capped)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared few-core machine OpenMP's spinning makes 2 threads "
                         "several times slower than 1; raise it on an idle machine)")
    drafts = ap.add_mutually_exclusive_group()
    drafts.add_argument("--no-markov", action="store_true", help="train only OUT/draft_nomarkov (markov_rank 0)")
    drafts.add_argument("--both", action="store_true", help="train OUT/draft and OUT/draft_nomarkov")
    ap.add_argument("--reuse-target", action="store_true",
                    help="skip target training: load OUT/target and its tokenizer (same --preset)")
    ap.add_argument("--max-corpus-mb", type=float, help="keep a seeded subset of this many MB of train files")
    ap.add_argument("--loss-decay", type=float,
                    help="position weight exp(-(k-1)/decay); default the block size (DeepSpec's Qwen3 config: 4)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override one preset field, e.g. --set batch=32 (repeatable; fields: see Preset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    p = PRESETS[args.preset]
    overrides = {"minutes_target": args.minutes_target, "minutes_draft": args.minutes_draft,
                 "max_corpus_mb": args.max_corpus_mb}
    p = replace(p, **{k: v for k, v in overrides.items() if v is not None}, **parse_sets(p, args.set))
    decay = args.loss_decay or float(p.block_size)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    save_dtype = DTYPES[p.save_dtype]
    target_dir = out / "target"
    started = time.perf_counter()

    max_chars = None if p.max_corpus_mb is None else int(p.max_corpus_mb * 1e6)
    corpus = corpus_lib.load_corpus(max_chars, seed=args.seed)
    log.info("corpus: %d train files (%.1f MB), %d validation, %d held-out files, %s", len(corpus.train),
             sum(len(f.text) for f in corpus.train) / 1e6, len(corpus.valid), len(corpus.heldout), corpus.root)
    if args.reuse_target:
        tok = corpus_lib.load_tokenizer(target_dir)
    else:
        sample, size = [], 0
        for f in corpus.train:  # a prefix of the (already seeded-subset) train files
            if size >= p.tokenizer_sample_mb * 1e6:
                break
            sample.append(f.text)
            size += len(f.text)
        tok = corpus_lib.train_tokenizer(sample, p.vocab_size)
    eos_id, mask_id = tok.token_to_id(corpus_lib.EOS_TOKEN), tok.token_to_id(corpus_lib.MASK_TOKEN)
    encoded = {name: corpus_lib.encode_files(tok, files) for name, files in corpus.splits().items()}
    streams = {name: corpus_lib.token_stream(ids) for name, ids in encoded.items()}
    data = {
        "train": streams["train"],  # sampled at random offsets
        "train_eval": corpus_lib.fixed_windows(streams["train"], p.eval_windows, p.seq_len),
        "valid": corpus_lib.fixed_windows(streams["valid"], p.eval_windows, p.seq_len),
        "heldout": corpus_lib.fixed_windows(streams["heldout"], p.eval_windows, p.seq_len),
    }
    log.info("tokens: %s (vocab %d, %.2f chars/token)", ", ".join(f"{n} {s.numel()}" for n, s in streams.items()),
             tok.get_vocab_size(), sum(len(f.text) for f in corpus.train) / streams["train"].numel())
    prompts = corpus_lib.heldout_prompts(tok, corpus.heldout, encoded["heldout"], PROMPTS, *PROMPT_TOKENS,
                                         args.seed)
    with (out / "heldout.jsonl").open("w", encoding="utf-8") as fh:
        for row in prompts:
            fh.write(json.dumps(row) + "\n")

    report: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "preset": asdict(p), "loss_decay": decay, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "corpus": corpus.describe(),
        "tokens": {**{n: s.numel() for n, s in streams.items()}, "vocab_size": p.vocab_size,
                   "eos_token_id": eos_id, "mask_token_id": mask_id},
    }

    if args.reuse_target:
        model = transformers.Qwen3ForCausalLM.from_pretrained(target_dir, dtype=torch.float32).to(device)
        earlier = out / "train_log.json"
        if earlier.is_file():  # keep the log of the run that trained the target and its other drafts
            previous = json.loads(earlier.read_text(encoding="utf-8"))
            report["target"] = previous.get("target", {})
            report["drafts"] = previous.get("drafts", {})
        report.setdefault("target", {})["reused"] = str(target_dir)
    else:
        model = transformers.Qwen3ForCausalLM(target_config(p, eos_id)).to(device)
        log.info("target: %.2fM parameters on %s", sum(q.numel() for q in model.parameters()) / 1e6, device)
        steps = args.steps_target or epoch_steps(p.epochs_target, data["train"], p.batch, p.seq_len)
        report["target"] = train_target(model, data, p, Budget(p.minutes_target, steps), device, gen)
        model.generation_config.eos_token_id = eos_id

        def write_target(d: Path) -> None:
            model.to(save_dtype).save_pretrained(d)
            corpus_lib.save_tokenizer(tok, d, model.config.max_position_embeddings)

        write_dir(target_dir, write_target)
        model.float()  # rounded to save_dtype by the save: the drafts learn the target as written
    target_json = json.loads((target_dir / "config.json").read_text(encoding="utf-8"))
    features = TargetFeatures(model, p.target_layer_ids, device)

    names = ["draft_nomarkov"] if args.no_markov else ["draft", "draft_nomarkov"] if args.both else ["draft"]
    report.setdefault("drafts", {})
    for name in names:
        torch.manual_seed(args.seed + 1)
        cfg = dt.draft_config(target_json, layers=p.draft_layers, block_size=p.block_size,
                              target_layer_ids=list(p.target_layer_ids), mask_token_id=mask_id,
                              num_anchors=p.num_anchors, markov_rank=p.markov_rank if name == "draft" else 0)
        draft = dt.build_draft(cfg, model.model.embed_tokens, model.lm_head).to(device)
        log.info("%s: %.2fM trainable parameters", name, sum(q.numel() for q in dt.trainable_parameters(draft)) / 1e6)
        steps = args.steps_draft or epoch_steps(p.epochs_draft, data["train"], p.draft_batch, p.seq_len)
        report["drafts"][name] = train_draft(draft, features, data, p, Budget(p.minutes_draft, steps), decay,
                                             torch.Generator().manual_seed(args.seed + 2), name)
        write_dir(out / name, lambda d, draft=draft, cfg=cfg: dt.save_draft(draft, cfg, d, save_dtype))
        check_pair(target_dir, out / name)
        del draft

    report["total_seconds"] = round(time.perf_counter() - started, 1)
    if device.type == "cuda":
        report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    (out / "train_log.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s (%s) in %.0fs", out, ", ".join(["target", *names, "heldout.jsonl", "train_log.json"]),
             report["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
