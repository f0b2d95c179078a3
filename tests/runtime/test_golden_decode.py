"""The authors' golden vectors (tests/data/golden, README there) reproduced by the PyTorch reference program.

Tolerances are the README's: float32 logits, hidden states and confidence logits within 1e-4 absolute; token
ids, drafts, accepted lengths and generated tokens identical. Every comparison reports its worst difference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dspark_compile import api
from dspark_compile.cli import cli
from dspark_compile.program import DecodeProgram, build_program
from dspark_compile.runtime.decode import GenerationParams, GenerationResult, VerifyPolicy, generate
from dspark_compile.runtime.torch_backend import TorchBackend

TOL = 1e-4
MAX_NEW = 48
PAIRS = ("dspark_tiny", "dspark_tiny_random", "dspark_tiny_gemma4")
MODES = ("greedy", "threshold_0.5")



@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, dict[str, Any]]:
    return {p: json.loads((golden_dir / p / "decode_greedy.json").read_text()) for p in PAIRS}


@pytest.fixture(scope="module")
def programs(golden_dir: Path) -> dict[str, DecodeProgram]:
    return {p: build_program(golden_dir / p / "target", golden_dir / p / "draft") for p in PAIRS}


@pytest.fixture(scope="module")
def batch1(golden: dict[str, dict[str, Any]], programs: dict[str, DecodeProgram],
           ) -> Callable[[str, str], list[GenerationResult]]:
    """``batch1(pair, mode)``: each golden prompt decoded alone, once per module."""
    done: dict[tuple[str, str], list[GenerationResult]] = {}

    def decode(pair: str, mode: str) -> list[GenerationResult]:
        if (pair, mode) not in done:
            done[pair, mode] = [_decode(programs[pair], [ref["prompt"]], mode)[0] for ref in golden[pair][mode]]
        return done[pair, mode]

    return decode


def _policy(mode: str) -> VerifyPolicy:
    return VerifyPolicy("threshold", threshold=0.5) if mode == "threshold_0.5" else VerifyPolicy("fixed")


def _decode(program: DecodeProgram, prompts: list[list[int]], mode: str) -> list[GenerationResult]:
    backend = TorchBackend(program.target, program.draft, eos_token_ids=program.eos_token_ids)
    return generate(backend, prompts, GenerationParams(max_new_tokens=MAX_NEW, policy=_policy(mode)))


def _assert_matches(results: list[GenerationResult], want: list[dict[str, Any]], label: str) -> float:
    """Tokens, per-round drafts and accepted lengths identical; returns the max confidence-logit difference."""
    worst = 0.0
    assert len(results) == len(want)
    for i, (got, ref) in enumerate(zip(results, want, strict=True)):
        where = f"{label} prompt {i} (len {len(ref['prompt'])})"
        assert got.prompt == ref["prompt"], where
        assert got.tokens == ref["tokens"], f"{where}: tokens differ"
        assert [r["accepted"] for r in got.rounds] == ref["acceptance_lengths"], f"{where}: accepted lengths"
        assert [r["accepted"] for r in got.rounds] == [r["accepted_draft"] + 1 for r in ref["rounds"]], where
        assert [r["draft"] for r in got.rounds] == [r["draft"] for r in ref["rounds"]], f"{where}: drafts"
        assert got.mean_accepted == pytest.approx(ref["mean_accepted"], abs=1e-9), where
        # The tokens are the prefill token, then per round the accepted drafts and the target's next token.
        rebuilt = ref["tokens"][:1] + [t for r in ref["rounds"] for t in [*r["draft"][: r["accepted_draft"]],
                                                                              r["next_token"]]]
        assert got.tokens == rebuilt[:MAX_NEW], f"{where}: tokens vs golden per-round next_token"
        for k, (g_round, r_round) in enumerate(zip(got.rounds, ref["rounds"], strict=True)):
            want_conf = r_round["confidence_logits"] or []
            assert len(g_round["confidence_logits"]) == len(want_conf), f"{where} round {k}"
            for a, b in zip(g_round["confidence_logits"], want_conf, strict=True):
                worst = max(worst, abs(a - b))
    return worst


# --- (a) the first draft round, tensor by tensor ---------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS)
def test_unit_round0_tensors(pair: str, golden_dir: Path, programs: dict[str, DecodeProgram]) -> None:
    ref = load_file(str(golden_dir / pair / "unit_round0.safetensors"))
    program = programs[pair]
    target, draft = program.target, program.draft
    assert draft is not None
    ids = ref["prompt_ids"].to(torch.int64)
    n = ids.shape[1]
    g = draft.block_size
    zero = torch.zeros(1, dtype=torch.int64)
    diffs: dict[str, float] = {}
    with torch.inference_mode():
        hidden, taps, _ = target(ids, zero, target.new_cache(1, n + g + 2))
        diffs["target_taps"] = (taps - ref["target_taps"]).abs().max().item()
        anchor = target.logits(hidden[:, -1]).argmax(-1)
        assert anchor.tolist() == ref["anchor"].tolist()

        mask_id = draft.cfg.mask_token_id
        assert ref["block_input_ids"].tolist() == [[int(anchor)] + [mask_id] * (g - 1)]

        count = torch.tensor([n])
        draft_hidden, _ = draft.backbone(anchor, taps, count, zero, draft.new_cache(1, n + g + 2))
        diffs["draft_hidden"] = (draft_hidden - ref["draft_hidden"]).abs().max().item()
        diffs["base_logits"] = (draft.lm_head(draft_hidden) - ref["base_logits"]).abs().max().item()

        tokens, conf, markov_logits, _ = draft(anchor, taps, count, zero, draft.new_cache(1, n + g + 2))
        diffs["markov_logits"] = (markov_logits - ref["markov_logits"]).abs().max().item()
        diffs["confidence_logits"] = (conf - ref["confidence_logits"]).abs().max().item()
        # The golden Markov logits are the base logits plus the bias of the previous *greedy* token: check
        # that the bias itself (not only the sum) is reproduced.
        bias_ref = ref["markov_logits"] - ref["base_logits"]
        diffs["markov_bias"] = ((markov_logits - draft.lm_head(draft_hidden)) - bias_ref).abs().max().item()
    assert bias_ref.abs().max().item() > 0.1, "golden Markov bias unexpectedly ~0"
    assert tokens.tolist() == ref["greedy_draft_tokens"].to(torch.int64).tolist()
    print(f"{pair} unit round 0 max |diff|: {diffs}")
    for name, d in diffs.items():
        assert d <= TOL, f"{pair} {name}: max |diff| {d:.3g} > {TOL} (all: {diffs})"


# --- (b, c) whole decodes: tokens, drafts, accepted lengths, confidence logits -----------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pair", PAIRS)
def test_decode_batch1_matches_golden(pair: str, mode: str, golden: dict[str, dict[str, Any]],
                                      batch1: Callable[[str, str], list[GenerationResult]]) -> None:
    want = golden[pair][mode]
    results = batch1(pair, mode)
    worst = _assert_matches(results, want, f"{pair}/{mode}/batch1")
    print(f"{pair}/{mode} batch 1: max |confidence logit diff| {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pair", PAIRS)
def test_api_generate_batch4_matches_golden(pair: str, mode: str, golden_dir: Path,
                                            golden: dict[str, dict[str, Any]]) -> None:
    """All four prompts (lengths 5, 12, 23, 40) in one batch through the public API."""
    want = golden[pair][mode]
    threshold = 0.5 if mode == "threshold_0.5" else None
    results = api.generate(golden_dir / pair / "target", golden_dir / pair / "draft", [r["prompt"] for r in want],
                           max_new_tokens=MAX_NEW, temperature=0.0, confidence_threshold=threshold)
    worst = _assert_matches(results, want, f"{pair}/{mode}/batch4")
    print(f"{pair}/{mode} batch 4: max |confidence logit diff| {worst:.2e}")
    assert worst <= TOL


def test_trained_draft_accepts_long_rounds_random_draft_none(
        batch1: Callable[[str, str], list[GenerationResult]]) -> None:
    """What the program decodes (not the fixture): the distilled draft reaches whole blocks (7 drafts + bonus)
    in several rounds, the random draft never gets a draft accepted."""
    trained = [r["accepted"] for res in batch1("dspark_tiny", "greedy") for r in res.rounds]
    assert max(trained) == 8
    assert sum(a > 1 for a in trained) >= 5
    random = [r["accepted"] for res in batch1("dspark_tiny_random", "greedy") for r in res.rounds]
    assert len(random) > 4 and set(random) == {1}


# --- (d) target-only decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS)
def test_baseline_matches_golden(pair: str, golden: dict[str, dict[str, Any]],
                                 programs: dict[str, DecodeProgram]) -> None:
    want = golden[pair]["baseline"]
    program = programs[pair]
    backend = TorchBackend(program.target, None, eos_token_ids=program.eos_token_ids)
    results = generate(backend, [r["prompt"] for r in want], GenerationParams(max_new_tokens=MAX_NEW),
                       speculative=False)
    for i, (got, ref) in enumerate(zip(results, want, strict=True)):
        assert got.tokens == ref["tokens"], f"{pair} baseline prompt {i}"
        assert got.rounds == [] and not got.speculative, f"{pair} baseline: no speculative rounds"
    # and the golden speculative traces equal the golden baseline (the losslessness the traces claim)
    for mode in MODES:
        assert [r["tokens"] for r in golden[pair][mode]] == [r["tokens"] for r in want]


# --- (e) the CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pair", "mode"), [("dspark_tiny", "greedy"), ("dspark_tiny", "threshold_0.5"),
                                            ("dspark_tiny_random", "greedy"), ("dspark_tiny_gemma4", "greedy"),
                                            ("dspark_tiny_gemma4", "threshold_0.5")])
def test_cli_generate_json_matches_golden(pair: str, mode: str, golden_dir: Path,
                                          golden: dict[str, dict[str, Any]]) -> None:
    want = golden[pair][mode]
    args = ["generate", "--target", str(golden_dir / pair / "target"), "--draft", str(golden_dir / pair / "draft"),
            "--max-new-tokens", str(MAX_NEW), "--temperature", "0", "--json"]
    for ref in want:
        args += ["--prompt-ids", ",".join(map(str, ref["prompt"]))]
    if mode == "threshold_0.5":
        args += ["--confidence-threshold", "0.5"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == len(want)
    for i, (got, ref) in enumerate(zip(lines, want, strict=True)):
        assert got["tokens"] == ref["tokens"], f"{pair}/{mode} CLI prompt {i}: tokens"
        assert [r["accepted"] for r in got["rounds"]] == ref["acceptance_lengths"], f"{pair}/{mode} prompt {i}"
        assert [r["draft"] for r in got["rounds"]] == [r["draft"] for r in ref["rounds"]], f"prompt {i}: drafts"
        assert got["mean_accepted"] == pytest.approx(ref["mean_accepted"], abs=1e-9)
