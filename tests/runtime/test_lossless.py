"""Greedy losslessness: speculative decoding commits exactly the target's own greedy continuation.

The reference is independent of the decode loop and of the KV cache: every step re-runs the target on the
whole sequence from scratch and takes the argmax. Checkpoints of many shapes are built on the fly; random
drafts rarely agree with the target, so high acceptance is exercised twice: by the briefly trained golden
``dspark_tiny`` draft, and by an "oracle" draft that proposes the target's true continuation with planted
mistakes (which also fixes the exact accepted length every round must report).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.program import DecodeProgram, build_program
from dspark_compile.runtime.backend import Proposal
from dspark_compile.runtime.decode import GenerationParams, GenerationResult, VerifyPolicy, generate
from dspark_compile.runtime.torch_backend import TorchBackend

MAX_NEW = 20
PROMPT_LENGTHS = (3, 11, 30, 17)  # batch 4: different lengths, so padding and per-row positions matter


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 1, size=n).tolist() for n in lengths]


@torch.inference_mode()
def reference_greedy(target: Qwen3Target, prompt: list[int], n: int) -> list[int]:
    """Target-only greedy decoding without any cache reuse: a fresh full forward per token."""
    seq = list(prompt)
    zero = torch.zeros(1, dtype=torch.int64)
    for _ in range(n):
        ids = torch.tensor([seq])
        hidden, _, _ = target(ids, zero, target.new_cache(1, len(seq)))
        seq.append(int(target.logits(hidden[0, -1]).argmax()))
    return seq[len(prompt):]


def _backend(program: DecodeProgram, block_size: int | None) -> TorchBackend:
    assert program.draft is not None
    program.draft.block_size = program.draft.cfg.block_size  # TorchBackend sets it on the shared module
    return TorchBackend(program.target, program.draft, block_size=block_size, eos_token_ids=program.eos_token_ids)


def _check_lossless(program: DecodeProgram, prompts: list[list[int]], block_size: int | None,
                    want: list[list[int]], policy: VerifyPolicy | None = None,
                    max_new: int = MAX_NEW) -> list[GenerationResult]:
    params = GenerationParams(max_new_tokens=max_new, policy=policy or VerifyPolicy("fixed"))
    results = generate(_backend(program, block_size), prompts, params)
    g = program.draft.block_size if program.draft is not None else 0
    for i, (res, ref) in enumerate(zip(results, want, strict=True)):
        assert res.tokens == ref[:max_new], f"prompt {i} (len {len(prompts[i])}), block {g}: tokens differ"
        for rnd in res.rounds:
            assert 1 <= rnd["accepted"] <= len(rnd["draft"]) + 1
            assert len(rnd["draft"]) <= g
        # every token is accounted for by the rounds (prefill token + accepted drafts + one per round)
        assert 1 + sum(r["accepted"] for r in res.rounds) >= len(res.tokens)
    return results


SHAPES: dict[str, dict[str, Any]] = {
    "default_vanilla_r16_b7": {},
    "tied_rnn_r4_b3_taps_-1": {"tie_word_embeddings": True, "markov_head_type": "rnn", "markov_rank": 4,
                               "block_size": 3, "target_layer_ids": (-1, 1)},
    "no_markov_b1_no_confidence": {"markov_rank": 0, "block_size": 1, "confidence_head": False,
                                   "target_layer_ids": (-1,)},
    "gated_r16_b7_bf16_stored": {"markov_head_type": "gated", "target_layer_ids": (-1, 0, 2),
                                 "dtype": torch.bfloat16},
    "rnn_r16_b5_conf_no_markov_sharded": {"markov_head_type": "rnn", "block_size": 5,
                                          "confidence_with_markov": False, "sharded": True,
                                          "rope_spelling": "theta"},
    "gated_r4_b3_mqa_3layers": {"markov_head_type": "gated", "markov_rank": 4, "block_size": 3, "num_layers": 3,
                                "num_kv_heads": 1, "draft_layers": 1, "target_layer_ids": (0, 1),
                                "vocab_size": 200, "tie_word_embeddings": True},
    # Gemma4 (family "gemma4"): windows shorter than the prompts, so decoding slides every sliding layer's window
    "gemma4_golden_shape_w4": {"family": "gemma4", "sliding_window": 4},
    "gemma4_rnn_b3_separate_v_untied_w6": {"family": "gemma4", "markov_head_type": "rnn", "block_size": 3,
                                           "attention_k_eq_v": False, "tie_word_embeddings": False,
                                           "sliding_window": 6, "num_layers": 4, "target_layer_ids": (-1, 1),
                                           "final_logit_softcapping": None, "global_kv_heads": 2,
                                           "global_head_dim": 24, "head_dim": 8},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_random_pairs_greedy_lossless(shape: str, make_pair: Any, make_gemma4_pair: Any) -> None:
    kwargs = dict(SHAPES[shape])
    make = make_gemma4_pair if kwargs.pop("family", "qwen3") == "gemma4" else make_pair
    target_dir, draft_dir = make(seed=len(shape), **kwargs)
    program = build_program(Path(target_dir), Path(draft_dir), dtype="fp32")
    assert program.draft is not None
    vocab = program.target.cfg.vocab_size
    trained = program.draft.cfg.block_size
    prompts = _prompts(vocab, PROMPT_LENGTHS, seed=trained)
    want = [reference_greedy(program.target, p, MAX_NEW) for p in prompts]
    if not program.target.cfg.tie_word_embeddings:  # random tied targets repeat the last token forever
        # the target does not degenerate into one repeated token (which would make the check weak)
        assert all(len(set(w)) >= 2 for w in want), want
    for block in sorted({trained, max(1, trained - 2), 1}, reverse=True):
        size = None if block == trained else block
        batch = _check_lossless(program, prompts, size, want)
        single = _check_lossless(program, prompts[:1], size, want[:1])
        # batch 1 and batch 4 take the same decisions for the shared prompt
        assert [(r["draft"], r["accepted"]) for r in single[0].rounds] == [
            (r["draft"], r["accepted"]) for r in batch[0].rounds]
        assert all(len(r["draft"]) == block for res in batch for r in res.rounds)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_program_matches_its_target_only(dtype: str, make_pair: Any) -> None:
    """README: greedy equality holds within one precision; the program against its own target-only decode."""
    target_dir, draft_dir = make_pair(seed=3, markov_head_type="rnn", block_size=4)
    program = build_program(Path(target_dir), Path(draft_dir), dtype=dtype)
    assert program.target.embed_tokens.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    prompts = _prompts(program.target.cfg.vocab_size, PROMPT_LENGTHS, seed=5)
    params = GenerationParams(max_new_tokens=MAX_NEW)
    base = generate(TorchBackend(program.target, None), prompts, params, speculative=False)
    spec = generate(_backend(program, None), prompts, params)
    assert [r.tokens for r in spec] == [r.tokens for r in base]
    assert all(len(r.tokens) == MAX_NEW for r in spec)


# --- high acceptance: the briefly trained golden draft -----------------------------------------------------


@pytest.fixture(scope="module", params=["dspark_tiny", "dspark_tiny_gemma4"])
def golden_program(request: pytest.FixtureRequest, golden_dir: Path) -> DecodeProgram:
    return build_program(golden_dir / request.param / "target", golden_dir / request.param / "draft")


@pytest.mark.parametrize("block", [7, 4, 2])
@pytest.mark.parametrize("policy", ["fixed", "threshold=0.3"])
def test_trained_draft_accepts_long_prefixes_losslessly(block: int, policy: str, golden_dir: Path,
                                                        golden_program: DecodeProgram) -> None:
    program = golden_program
    # golden prompts 1 and 3 (the latter accepts long runs), a repeated pattern, and two random prompts
    golden = json.loads((program.pair.target.path.parent / "decode_greedy.json").read_text())["greedy"]
    prompts = [golden[3]["prompt"], golden[1]["prompt"], [17, 42, 99, 5] * 6, *_prompts(384, (8, 30), seed=0)]
    want = [reference_greedy(program.target, p, 48) for p in prompts]
    results = _check_lossless(program, prompts, None if block == 7 else block, want, VerifyPolicy.parse(policy),
                              max_new=48)
    accepted = [r["accepted"] for res in results for r in res.rounds]
    assert max(accepted) >= 3, f"expected multi-token rounds from the trained draft, got {accepted}"
    assert sum(a > 1 for a in accepted) >= 3
    assert max(accepted) <= block + 1


# --- high acceptance: an oracle draft with planted mistakes ------------------------------------------------


class OracleDraftBackend(TorchBackend):
    """Runs the real draft (so its caches advance as usual) but proposes the target's true continuation,
    cut at a random position by a wrong token. Records the accepted length each round must produce (a row's
    last block, drafted after its final round, is never verified)."""

    def __init__(self, program: DecodeProgram, truth: list[list[int]], seed: int) -> None:
        super().__init__(program.target, program.draft)
        self.truth = truth  # prompt + reference greedy continuation, per request
        self.rng = np.random.default_rng(seed)
        self.requests: list[int] = []  # live row -> request
        self.expected: dict[int, list[int]] = {}

    def admit(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray) -> Proposal:
        new = list(range(len(self.expected), len(self.expected) + len(lengths)))
        self.requests += new
        self.expected.update({i: [] for i in new})
        return super().admit(input_ids, lengths, temperature, seeds)

    def select(self, rows: np.ndarray) -> None:
        super().select(rows)
        self.requests = [self.requests[int(i)] for i in rows]

    def _draft(self, anchor: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor,
               cache_len: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out, conf, probs = super()._draft(anchor, ctx_taps, ctx_count, cache_len, *args)
        tokens = out.clone()
        g = tokens.shape[1]
        vocab = self.info.vocab_size
        # rows admitted now are the last len(anchor) requests
        for b, req in enumerate(self.requests[len(self.requests) - len(anchor):]):
            pos = int(cache_len[b] + ctx_count[b])  # the anchor's position
            seq = self.truth[req]
            assert seq[pos] == int(anchor[b]), "the anchor is not the committed greedy token"
            right = seq[pos + 1: pos + 1 + g]
            # mostly long runs: cut = g (all right) half of the time, else uniform in [0, g)
            cut = g if self.rng.random() < 0.5 else int(self.rng.integers(0, g))
            cut = min(cut, len(right))
            tokens[b, :cut] = torch.tensor(right[:cut])
            if cut < len(right):  # (past the truth only in a row's last block, which is never verified)
                tokens[b, cut] = (right[cut] + 1 + int(self.rng.integers(0, vocab - 1))) % vocab
            self.expected[req].append(cut + 1)
        return tokens, conf, probs


@pytest.mark.parametrize("block", [7, 3])
def test_oracle_draft_exact_acceptance_and_lossless(block: int, make_pair: Any) -> None:
    target_dir, draft_dir = make_pair(seed=21, block_size=7, markov_head_type="gated")
    program = build_program(Path(target_dir), Path(draft_dir))
    program.draft.block_size = block
    prompts = _prompts(program.target.cfg.vocab_size, PROMPT_LENGTHS, seed=block)
    longest = MAX_NEW + block + 2
    want = [reference_greedy(program.target, p, longest) for p in prompts]
    backend = OracleDraftBackend(program, [p + w for p, w in zip(prompts, want, strict=True)], seed=block)
    results = generate(backend, prompts, GenerationParams(max_new_tokens=MAX_NEW))
    for i, res in enumerate(results):
        assert res.tokens == want[i][:MAX_NEW], f"prompt {i}"
        assert [r["accepted"] for r in res.rounds] == backend.expected[i][: len(res.rounds)], f"prompt {i}"
        assert len(backend.expected[i]) == len(res.rounds) + 1, f"prompt {i}"
    accepted = [r["accepted"] for res in results for r in res.rounds]
    assert block + 1 in accepted and 1 in accepted
    # requests finished in different rounds, so the batch shrank (select) while others kept decoding
    assert len({len(res.rounds) for res in results}) > 1
