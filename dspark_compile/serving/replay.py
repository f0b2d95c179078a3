"""Serving the device-resident torch backend from a build directory, and its benchmark-only acceptance replay.

:func:`cuda_graph_backend` is the orchestrator's ``backend_factory`` for a build whose checkpoints the torch
program loads (``CudaGraphBackend.create``: CUDA graphs in bf16 on a GPU, the eager fp32 TorchBackend on a CPU).

:func:`replayed_random` serves a random-weight pair of a named shape (Qwen3-8B's, for the H200 benchmark)
described by ``BUILD/bench_pair.json`` instead of checkpoints: random weights accept nothing, so the drafts are
replaced on the device by the target's own greedy continuation, cut per a survival profile
(``targets/torch/bench.py``: ``set_replay``, profile ``b`` is τ = 4.81) — verification and commit stay real, so
the output is still exactly the target's. The pair is ``decisive`` by default: a bf16 batch is not bit-equal to
the batch-1 reference, and on plain random weights (near-tied logits) a row then leaves its reference under
load and replayed acceptance collapses (docs/SERVING.md). With ``forced`` (timing only) each round accepts the
replayed prefix whatever the verify says.
The continuation of each distinct prompt is decoded once, target-only, by a second backend over the same
weights when the prompt is first admitted, and cached. A word-level tokenizer over the whole vocabulary
(:func:`write_word_tokenizer`) gives such a pair text in and out, so NVIDIA's load generators can drive it; it
maps words it does not know to one id, so their synthetic prompts repeat.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dspark_compile.errors import UsageError
from dspark_compile.runtime.backend import Proposal

log = logging.getLogger(__name__)

PAIR_FILE = "bench_pair.json"
UNKNOWN = "<unk>"


def cuda_graph_backend(build_dir: Path, *, narrow_rounds: bool = False) -> Any:
    """The torch CUDA-graph backend for a build's checkpoints (its ``build_spec.json``)."""
    from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend

    spec = json.loads((Path(build_dir) / "build_spec.json").read_text())
    options = {"narrow_rounds": True} if narrow_rounds else {}
    return CudaGraphBackend.create(spec["target"], spec.get("draft"),
                                   allow_nonfinite=spec.get("allow_nonfinite", False), **options)


def narrow_cuda_graph_backend(build_dir: Path) -> Any:
    """:func:`cuda_graph_backend` with narrow rounds (docs/SERVING.md, "Load-adaptive verification"), for a
    config's ``backend_factory``: rounds verify as many positions as their longest ℓ needs, so the scheduler
    can trade drafts for time at high batch. Not yet measured on a GPU."""
    return cuda_graph_backend(build_dir, narrow_rounds=True)


@dataclass(frozen=True)
class PairSpec:
    """``bench_pair.json``: which random pair to serve and how its drafts are replayed."""

    shape: str = "qwen3_8b"  # qwen3_8b | smoke (targets/torch/bench.py)
    replay: str = "b"  # survival profile name
    seed: int = 0
    max_slots: int = 512
    forced: bool = False  # timing only: every round accepts the replayed prefix (CudaGraphBackend.set_replay)
    decisive: bool = True  # bench.random_pair: tokens that survive a batch's last-bit differences
    narrow_rounds: bool = False  # CudaGraphBackend(narrow_rounds=...): rounds as wide as their longest ℓ

    @classmethod
    def read(cls, build_dir: Path) -> PairSpec:
        path = Path(build_dir) / PAIR_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"{path}: not a benchmark pair description ({exc})") from None

    def write(self, build_dir: Path) -> None:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
        (Path(build_dir) / PAIR_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    def pair_shape(self) -> Any:
        from dspark_compile.targets.torch import bench

        shapes = {"qwen3_8b": bench.QWEN3_8B, "smoke": bench.SMOKE}
        if self.shape not in shapes:
            raise UsageError(f"{PAIR_FILE}: shape {self.shape!r}; expected one of {', '.join(shapes)}")
        return shapes[self.shape]


def replayed_random(build_dir: Path) -> ReplayedBackend:
    """The orchestrator's ``backend_factory`` for a benchmark build (``bench_pair.json``): the random pair on the
    GPU in bf16 (CUDA graphs), or eagerly on the CPU in fp32, with replayed acceptance."""
    import torch

    from dspark_compile.targets.torch.bench import conditional_profile, random_pair, survival_profile
    from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend

    spec = PairSpec.read(build_dir)
    cuda = torch.cuda.is_available()
    target, draft = random_pair(spec.pair_shape(), device="cuda" if cuda else "cpu",
                                dtype=torch.bfloat16 if cuda else torch.float32, seed=spec.seed,
                                decisive=spec.decisive)
    main = CudaGraphBackend(target, draft, narrow_rounds=spec.narrow_rounds)
    side = CudaGraphBackend(target, draft)  # target-only continuations, its own caches and graphs
    profile = np.array(conditional_profile(survival_profile(spec.replay, main.info.block_size)), dtype=np.float32)
    return ReplayedBackend(main, side, profile, spec.max_slots, forced=spec.forced)


class ReplayedBackend:
    """A CudaGraphBackend (DecodeBackend) whose new rows get their replay reference when admitted."""

    def __init__(self, inner: Any, side: Any, profile: np.ndarray, max_slots: int, *, forced: bool = False) -> None:
        from dataclasses import replace

        self.inner, self.side, self.profile, self.forced = inner, side, profile, forced
        self.info = replace(inner.info, max_slots=max_slots)
        self.verifies_whole_block = inner.verifies_whole_block
        self.verifies_widest = inner.verifies_widest
        self.takes_plain_rounds = inner.takes_plain_rounds
        self.references: dict[tuple[int, ...], np.ndarray] = {}
        self._width = 0
        self._speculative = True

    def start(self, rows: int, slots: int, *, speculative: bool = True) -> None:
        self.inner.start(rows, slots, speculative=speculative)
        self._speculative = speculative and self.info.block_size > 0
        self._width = slots
        if self._speculative:
            self.inner.set_replay(np.zeros((rows, slots), dtype=np.int64), self.profile, forced=self.forced)

    def reference(self, prompt: list[int]) -> np.ndarray:
        """Row ``prompt`` + its target-only greedy continuation by absolute position, ``width`` wide."""
        key = tuple(prompt)
        if key not in self.references:
            from dspark_compile.targets.torch.bench import decode_rounds, replay_reference

            new = self._width - len(prompt) - 2 * self.info.block_size - 3
            run = decode_rounds(self.side, [prompt], max_new_tokens=max(new, 1), speculative=False)
            self.references[key] = replay_reference([prompt], run.tokens, self._width)[0]
            log.info("replay reference for a prompt of %d tokens (%d cached)", len(prompt), len(self.references))
        return self.references[key]

    def admit(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray) -> Proposal:
        if self._speculative:
            import torch

            first = self.inner._live  # rows n..n+k-1 are the new ones (DecodeBackend.admit)
            refs = np.stack([self.reference(row[: int(n)].tolist()) for row, n in zip(input_ids, lengths,
                                                                                      strict=True)])
            self.inner.replay[0][first : first + len(refs)] = torch.from_numpy(refs).to(self.inner.device)
        return self.inner.admit(input_ids, lengths, temperature, seeds)

    def round(self, verify_len: np.ndarray, *, draft: bool = True) -> Proposal:
        return self.inner.round(verify_len, draft=draft)

    def launch(self, verify_len: np.ndarray, *, draft: bool = True) -> None:
        self.inner.launch(verify_len, draft=draft)

    def collect(self) -> Proposal:
        return self.inner.collect()

    def select(self, rows: np.ndarray) -> None:
        self.inner.select(rows)


def write_word_tokenizer(vocab_size: int, out_dir: Path) -> Path:
    """A word-level ``tokenizer.json`` (+ ``tokenizer_config.json`` for transformers' AutoTokenizer) with one word
    per id: id 0 is ``<unk>``, id i is ``w{i}``; words are split on whitespace and decoded joined by spaces, so
    re-encoding a generated text gives back its ids (load generators count output tokens that way)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {UNKNOWN: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNKNOWN, "model_max_length": 1 << 20}))
    return out_dir / "tokenizer.json"
