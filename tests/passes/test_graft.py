"""Pass `graft`: one program in which the draft uses the target's embedding and LM head modules; on the golden
pair it reproduces the authors' first draft round (tests/data/golden/dspark_tiny/unit_round0.safetensors)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_compile.build_spec import BuildSpec
from dspark_compile.program import DecodeProgram

ATOL = 1e-4  # float32 tolerance of tests/data/golden/README.md


@pytest.fixture(scope="module")
def program(golden_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
            grafted: Callable[[BuildSpec], DecodeProgram]) -> DecodeProgram:
    spec = BuildSpec(*golden_pair, tmp_path_factory.mktemp("graft") / "out")
    return grafted(spec)


def test_draft_shares_the_target_modules(program: DecodeProgram, golden_pair: tuple[Path, Path]) -> None:
    assert program.draft is not None
    assert program.draft.embed_tokens is program.target.embed_tokens
    assert program.draft.lm_head is program.target.lm_head
    on_disk = load_file(str(golden_pair[0] / "model.safetensors"))
    assert torch.equal(program.target.embed_tokens.weight, on_disk["model.embed_tokens.weight"])
    assert torch.equal(program.target.lm_head.weight, on_disk["lm_head.weight"])


@torch.inference_mode()
def test_first_round_matches_the_golden_vectors(program: DecodeProgram, golden_dir: Path) -> None:
    gold = load_file(str(golden_dir / "dspark_tiny" / "unit_round0.safetensors"))
    target, draft = program.target, program.draft
    prompt = gold["prompt_ids"].long()
    n = prompt.shape[1]
    hidden, taps, _ = target(prompt, torch.zeros(1, dtype=torch.int64), target.new_cache(1, 64))
    assert (taps - gold["target_taps"]).abs().max() < ATOL
    anchor = target.logits(hidden[:, -1]).argmax(-1)
    assert anchor.tolist() == gold["anchor"].tolist()

    block, _ = draft.backbone(anchor, taps, torch.tensor([n]), torch.zeros(1, dtype=torch.int64),
                              draft.new_cache(1, 64))
    tokens, confidence, markov_logits = draft.propose(block, anchor, None, None)
    assert (block - gold["draft_hidden"]).abs().max() < ATOL
    assert (markov_logits - gold["markov_logits"]).abs().max() < ATOL
    assert (confidence - gold["confidence_logits"]).abs().max() < ATOL
    assert tokens.tolist() == gold["greedy_draft_tokens"].long().tolist()


def test_differing_draft_copy_warns_and_the_target_copy_wins(make_pair, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             grafted: Callable[[BuildSpec], DecodeProgram]) -> None:
    target_dir, draft_dir = make_pair()
    path = draft_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["embed_tokens.weight"][5] += 0.5  # 64 values of row 5 differ from the target's copy
    save_file(tensors, str(path), metadata={"format": "pt"})
    spec = BuildSpec(target_dir, draft_dir, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="dspark_compile"):
        program = grafted(spec)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "`embed_tokens.weight` differs from the target's `model.embed_tokens.weight` (64 of 24576 values" in (
        warnings[0])
    assert "the graft uses the target's copy" in warnings[0]
    target_copy = load_file(str(target_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(program.draft.embed_tokens.weight, target_copy)


def test_dtype_comes_from_the_spec(golden_pair: tuple[Path, Path], tmp_path: Path,
                                   grafted: Callable[[BuildSpec], DecodeProgram]) -> None:
    spec = BuildSpec(*golden_pair, tmp_path / "out", dtype="fp16")
    program = grafted(spec)
    assert program.dtype == "fp16"
    assert {p.dtype for p in program.target.parameters()} == {torch.float16}
    assert {p.dtype for p in program.draft.parameters()} == {torch.float16}
