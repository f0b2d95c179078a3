"""The training corpus every machine has: the Python standard library's own ``.py`` files.

Files are listed in sorted order and split by file: of every ``SPLIT_EVERY`` files, one goes to the validation
split (the loss that picks the best checkpoint), one to the held-out split (evaluation prompts and the final
numbers, never used for a training decision) and the rest to training, so the split is the same wherever the
same Python is installed. The tokenizer is a byte-level BPE trained with
Hugging Face ``tokenizers`` (a ``transformers`` dependency, so present wherever the target can be trained);
its two special tokens are ``<|endoftext|>`` (id 0, the EOS written between files) and ``<|mask|>`` (the last
id, the DSpark draft's mask token).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
SPLIT_EVERY = 20
VALID_SLOT, HELDOUT_SLOT = 9, 19  # file index mod SPLIT_EVERY
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class SourceFile:
    name: str  # path relative to the stdlib directory, '/'-separated
    text: str


@dataclass(frozen=True)
class Corpus:
    """The stdlib split by file; ``digest`` identifies the exact bytes read (the stdlib differs by Python)."""

    root: Path
    train: tuple[SourceFile, ...]
    valid: tuple[SourceFile, ...]
    heldout: tuple[SourceFile, ...]
    digest: str

    def splits(self) -> dict[str, tuple[SourceFile, ...]]:
        return {"train": self.train, "valid": self.valid, "heldout": self.heldout}

    def describe(self) -> dict[str, object]:
        return {
            "stdlib": str(self.root), "python": sys.version.split()[0], "sha256": self.digest,
            "split": f"file i -> valid if i % {SPLIT_EVERY} == {VALID_SLOT}, held-out if == {HELDOUT_SLOT}",
            **{f"{name}_files": len(files) for name, files in self.splits().items()},
            **{f"{name}_chars": sum(len(f.text) for f in files) for name, files in self.splits().items()},
        }


def load_corpus(max_train_chars: int | None = None, *, seed: int = 0) -> Corpus:
    """Read the stdlib sources; with ``max_train_chars``, keep a seeded random subset of the train files.

    Undecodable bytes (a few test files are deliberately mis-encoded) are replaced, not skipped, so the file
    list does not depend on the decoder.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if p.is_file() and not _SKIP_DIRS & set(p.relative_to(root).parts))
    if not paths:
        raise SystemExit(f"no .py files under {root}; this Python has no standard-library sources")
    digest = hashlib.sha256()
    files = []
    for path in paths:
        raw = path.read_bytes()
        name = path.relative_to(root).as_posix()
        digest.update(name.encode() + b"\0" + raw + b"\0")
        files.append(SourceFile(name, raw.decode("utf-8", errors="replace")))
    slot = [i % SPLIT_EVERY for i in range(len(files))]
    valid = tuple(f for f, s in zip(files, slot, strict=True) if s == VALID_SLOT)
    heldout = tuple(f for f, s in zip(files, slot, strict=True) if s == HELDOUT_SLOT)
    train = [f for f, s in zip(files, slot, strict=True) if s not in (VALID_SLOT, HELDOUT_SLOT)]
    if max_train_chars is not None:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        kept, total = [], 0
        for i in order:
            if total >= max_train_chars:
                break
            kept.append(i)
            total += len(train[i].text)
        train = [train[i] for i in sorted(kept)]
    return Corpus(root=root, train=tuple(train), valid=valid, heldout=heldout, digest=digest.hexdigest())


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` ids in all: EOS first, the merges, the mask token last."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([MASK_TOKEN])
    if tok.get_vocab_size() != vocab_size or tok.token_to_id(MASK_TOKEN) != vocab_size - 1:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} ids, expected {vocab_size}; the corpus sample is "
                         "too small for this vocabulary (raise --max-corpus-mb or lower the vocabulary)")
    return tok


def save_tokenizer(tok: Tokenizer, directory: Path, max_length: int) -> None:
    """``tokenizer.json`` (Hugging Face format) + ``tokenizer_config.json``: ``AutoTokenizer`` loads the target."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "mask_token": MASK_TOKEN,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(directory: Path) -> Tokenizer:
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def encode_files(tok: Tokenizer, files: Sequence[SourceFile]) -> list[list[int]]:
    """Token ids of each file, EOS appended."""
    eos = tok.token_to_id(EOS_TOKEN)
    return [[*enc.ids, eos] for enc in tok.encode_batch_fast([f.text for f in files])]


def token_stream(encoded: Sequence[Sequence[int]]) -> torch.Tensor:
    """All files concatenated into one int64 stream."""
    return torch.tensor([t for ids in encoded for t in ids], dtype=torch.int64)


def random_windows(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``length`` tokens at uniform random offsets of ``stream`` -> [batch, length]."""
    starts = torch.randint(0, stream.numel() - length, (batch,), generator=gen)
    return torch.stack([stream[s: s + length] for s in starts.tolist()])


def fixed_windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``count`` evenly spaced windows (the held-out evaluation set; the same every run)."""
    step = max((stream.numel() - length) // count, 1)
    return torch.stack([stream[i * step: i * step + length] for i in range(count)])


def heldout_prompts(tok: Tokenizer, files: Sequence[SourceFile], encoded: Sequence[Sequence[int]], count: int,
                    min_len: int, max_len: int, seed: int) -> list[dict[str, object]]:
    """``count`` prompts from held-out files: a seeded window of ``min_len``..``max_len`` tokens per file.

    Files are visited round-robin (one prompt per file before a second), windows never cross a file's EOS.
    """
    rng = random.Random(seed)
    usable = [(f, ids[:-1]) for f, ids in zip(files, encoded, strict=True) if len(ids) - 1 >= max_len]
    if not usable:
        raise SystemExit(f"no held-out file has {max_len} tokens; lower the prompt length")
    prompts = []
    for i in range(count):
        file, ids = usable[i % len(usable)]
        length = rng.randint(min_len, max_len)
        start = rng.randint(0, len(ids) - length)
        window = ids[start: start + length]
        prompts.append({"prompt_ids": window, "file": file.name, "text": tok.decode(window)})
    return prompts
