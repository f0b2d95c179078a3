"""Pass `validate`: an inconsistent pair or a block size beyond the draft's training stops the build."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.errors import UsageError, ValidationError
from dspark_compile.passes import validate as validate_pass
from dspark_compile.program import CheckpointPair


def validate(pair: CheckpointPair, spec: BuildSpec) -> CheckpointPair:
    """Pass `validate` on a state holding ``pair``."""
    validate_pass.run(BuildState(spec=spec, workdir=spec.out.parent, pair=pair))
    return pair


def test_consistent_pair_passes_unchanged(golden_pair: tuple[Path, Path], tmp_path: Path,
                                          loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    spec = BuildSpec(*golden_pair, tmp_path / "out", block_size=7)
    pair = loaded(spec)
    assert validate(pair, spec) is pair


@pytest.mark.parametrize("block_size", [1, 4])
def test_smaller_block_size_is_allowed(golden_pair: tuple[Path, Path], tmp_path: Path, block_size: int,
                                       loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    spec = BuildSpec(*golden_pair, tmp_path / "out", block_size=block_size)
    validate(loaded(spec), spec)


def test_block_size_beyond_training_names_the_draft_config(golden_pair: tuple[Path, Path], tmp_path: Path,
                                                           loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    spec = BuildSpec(*golden_pair, tmp_path / "out", block_size=8)
    draft_config = golden_pair[1] / "config.json"
    with pytest.raises(UsageError) as info:
        validate(loaded(spec), spec)
    message = str(info.value)
    assert "--block-size 8 exceeds the draft's trained block_size 7" in message
    assert str(draft_config) in message
    assert "use a value in [1, 7]" in message


def test_tap_of_the_last_target_layer_is_refused(make_pair, tmp_path: Path,
                                                 loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    target_dir, draft_dir = make_pair(target_layer_ids=(0, 1, 3))  # 3 = the target's last layer
    spec = BuildSpec(target_dir, draft_dir, tmp_path / "out")
    with pytest.raises(ValidationError) as info:
        validate(loaded(spec), spec)
    assert info.value.problems == [info.value.problems[0]]
    assert str(draft_dir / "config.json") in info.value.problems[0]
    assert "`target_layer_ids` contains 3, the target's last layer" in info.value.problems[0]


def test_draft_of_another_target_lists_every_problem(make_pair, tmp_path: Path,
                                                     loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    target_dir, _ = make_pair()
    _, other_draft = make_pair(hidden_size=32, intermediate_size=64, vocab_size=256)
    spec = BuildSpec(target_dir, other_draft, tmp_path / "out")
    with pytest.raises(ValidationError) as info:
        validate(loaded(spec), spec)
    problems = info.value.problems
    assert any("`hidden_size` is 32, expected 64" in p for p in problems)
    assert any("`vocab_size` is 256, expected 384" in p for p in problems)
    assert f"(+{len(problems) - 1} more problem(s)" in str(info.value)


def test_acceptance_prompts_are_read_before_the_build_text_with_the_targets_tokenizer(
        golden_pair: tuple[Path, Path], tmp_path: Path, loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    """--check-acceptance's file is decoded after the build: validate reads it first, so a bad one costs seconds.
    Text lines are encoded with the target checkpoint's tokenizer.json, as the server encodes `text_input`."""
    import json
    import shutil

    from dspark_compile.serving.replay import write_word_tokenizer

    target = tmp_path / "target"
    shutil.copytree(golden_pair[0], target)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('[5, 17, 42]\n"w3 w9 w1"\n{"text": "w2 w2"}\n{"prompt": "w7"}\n{"prompt_ids": [8]}\n')
    spec = BuildSpec(target, golden_pair[1], tmp_path / "out", check_acceptance=prompts)
    state = BuildState(spec=spec, workdir=tmp_path, pair=loaded(spec))
    with pytest.raises(UsageError) as info:  # text, and the target has no tokenizer.json
        validate_pass.run(state)
    assert f"{prompts}:2: a text prompt, but {target / 'tokenizer.json'}: no tokenizer" in str(info.value)
    write_word_tokenizer(64, target)
    validate_pass.run(state)
    assert state.acceptance_prompts == [[5, 17, 42], [3, 9, 1], [2, 2], [7], [8]]

    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    prompts.write_text(f"[1, 2]\n[3, {vocab}]\n")
    with pytest.raises(UsageError) as info:
        validate_pass.run(state)
    assert str(info.value) == (f"--check-acceptance {prompts}: prompt 1: token id {vocab} is outside the "
                               f"vocabulary [0, {vocab})")

