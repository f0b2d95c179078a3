"""validate_pair / check_pair: one line per problem naming the file and field; shared-weight warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dspark_compile.checkpoint import (
    check_pair,
    draft_weight_name,
    load_draft,
    load_target,
    shared_weights_differ,
    target_weight_name,
    validate_pair,
)
from dspark_compile.errors import ValidationError


def _problems(target_dir: Path, draft_dir: Path) -> list[str]:
    return validate_pair(load_target(target_dir), load_draft(draft_dir))


def _one_problem(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"
    return hits[0]


def test_weight_names() -> None:
    assert target_weight_name("q_proj", 3) == "model.layers.3.self_attn.q_proj.weight"
    assert target_weight_name("down_proj", 0) == "model.layers.0.mlp.down_proj.weight"
    assert target_weight_name("embed_tokens") == "model.embed_tokens.weight"
    assert target_weight_name("lm_head") == "lm_head.weight"
    assert draft_weight_name("input_layernorm", 1) == "layers.1.input_layernorm.weight"
    assert draft_weight_name("markov_joint", suffix="bias") == "markov_head.joint_proj.bias"
    assert draft_weight_name("confidence") == "confidence_head.proj.weight"
    with pytest.raises(ValueError):
        target_weight_name("q_proj")
    with pytest.raises(ValueError):
        draft_weight_name("fc", 0)
    with pytest.raises(ValueError):
        draft_weight_name("nope")


def test_wrong_tensor_shape(tiny_pair, edit_weights) -> None:
    target_dir, draft_dir = tiny_pair
    edit_weights(draft_dir, lambda t: t.update({"fc.weight": torch.zeros(64, 128)}))
    line = _one_problem(_problems(target_dir, draft_dir), "fc.weight", "[64, 128]", "[64, 192]")
    assert str(draft_dir / "model.safetensors") in line and "target_layer_ids" in line


def test_missing_tensor(tiny_pair, edit_weights) -> None:
    target_dir, draft_dir = tiny_pair
    edit_weights(target_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    line = _one_problem(_problems(target_dir, draft_dir), "model.layers.1.mlp.up_proj.weight", "missing")
    assert str(target_dir / "model.safetensors") in line and "[128, 64]" in line


def test_missing_lm_head_of_untied_target(tiny_pair, edit_weights) -> None:
    target_dir, draft_dir = tiny_pair
    edit_weights(target_dir, lambda t: t.pop("lm_head.weight"))
    _one_problem(_problems(target_dir, draft_dir), "lm_head.weight", "missing")


def test_extra_tensor(tiny_pair, edit_weights) -> None:
    target_dir, draft_dir = tiny_pair
    edit_weights(draft_dir, lambda t: t.update({"markov_head.gate_proj.weight": torch.zeros(16, 80)}))
    line = _one_problem(_problems(target_dir, draft_dir), "unexpected", "markov_head.gate_proj.weight")
    assert "markov_head_type" in line


def test_missing_markov_tensors_for_declared_head(tiny_pair, edit_config) -> None:
    target_dir, draft_dir = tiny_pair
    edit_config(draft_dir, markov_head_type="rnn")
    problems = _problems(target_dir, draft_dir)
    _one_problem(problems, "markov_head.joint_proj.weight", "missing", "[48, 96]")
    _one_problem(problems, "markov_head.joint_proj.bias", "missing")


def test_markov_rank_mismatch(tiny_pair, edit_config) -> None:
    target_dir, draft_dir = tiny_pair
    edit_config(draft_dir, markov_rank=8)
    problems = _problems(target_dir, draft_dir)
    _one_problem(problems, "markov_head.markov_w1.weight", "[384, 16]", "markov_rank=8")
    _one_problem(problems, "confidence_head.proj.weight", "[1, 80]", "[1, 72]")


def test_markov_tensors_with_rank_zero(tiny_pair, edit_config) -> None:
    target_dir, draft_dir = tiny_pair
    edit_config(draft_dir, markov_rank=0, confidence_head_with_markov=False)
    problems = _problems(target_dir, draft_dir)
    _one_problem(problems, "unexpected", "markov_head.markov_w1.weight", "markov_rank")


def test_confidence_tensors_without_head(tiny_pair, edit_config) -> None:
    target_dir, draft_dir = tiny_pair
    edit_config(draft_dir, enable_confidence_head=False)
    _one_problem(_problems(target_dir, draft_dir), "unexpected", "confidence_head.proj.bias",
                 "enable_confidence_head")


def test_vocab_mismatch(make_pair) -> None:
    target_dir, _ = make_pair()
    _, draft_dir = make_pair(vocab_size=512)
    problems = _problems(target_dir, draft_dir)
    line = _one_problem(problems, "`vocab_size` is 512", "expected 384")
    assert str(draft_dir / "config.json") in line and str(target_dir / "config.json") in line
    _one_problem(problems, "mask_token_id", "511")


def test_hidden_mismatch(make_pair) -> None:
    target_dir, _ = make_pair()
    _, draft_dir = make_pair(hidden_size=96)
    _one_problem(_problems(target_dir, draft_dir), "`hidden_size` is 96", "expected 64")


def test_head_layout_mismatch(make_pair) -> None:
    target_dir, _ = make_pair()
    _, draft_dir = make_pair(num_kv_heads=4, head_dim=8, num_heads=8)
    problems = _problems(target_dir, draft_dir)
    _one_problem(problems, "`num_key_value_heads` is 4", "expected 2")
    _one_problem(problems, "`head_dim` is 8", "expected 16")
    _one_problem(problems, "`num_attention_heads` is 8", "expected 4")


@pytest.mark.parametrize(
    ("ids", "needles"),
    [
        ([0, 1, 7], ("contains 7", "[0, 3]")),
        ([-2, 0, 1], ("contains -2",)),
        ([0, 1, 3], ("contains 3", "last layer")),
        ([2, 1, 0], ("strictly increasing",)),
        ([1, 1, 2], ("strictly increasing",)),
    ],
)
def test_bad_target_layer_ids(tiny_pair, edit_config, ids: list[int], needles: tuple[str, ...]) -> None:
    target_dir, draft_dir = tiny_pair
    edit_config(draft_dir, target_layer_ids=ids)
    line = _one_problem(_problems(target_dir, draft_dir), "target_layer_ids", *needles)
    assert str(draft_dir / "config.json") in line


def test_num_target_layers_mismatch(tiny_pair, edit_config) -> None:
    target_dir, draft_dir = tiny_pair
    edit_config(draft_dir, num_target_layers=36)
    _one_problem(_problems(target_dir, draft_dir), "num_target_layers", "36", "expected 4")


def test_mask_token_out_of_range(tiny_pair, edit_config) -> None:
    target_dir, draft_dir = tiny_pair
    edit_config(draft_dir, mask_token_id=384)
    _one_problem(_problems(target_dir, draft_dir), "mask_token_id", "384", "[0, 384)")


def test_unsupported_weight_dtype(tiny_pair, edit_weights) -> None:
    target_dir, draft_dir = tiny_pair
    edit_weights(draft_dir, lambda t: t.update({"norm.weight": t["norm.weight"].double()}))
    _one_problem(_problems(target_dir, draft_dir), "norm.weight", "dtype F64", "BF16")


def test_check_pair_raises_with_every_problem(tiny_pair, edit_config) -> None:
    target_dir, draft_dir = tiny_pair
    edit_config(draft_dir, target_layer_ids=[0, 3], num_target_layers=5)
    target, draft = load_target(target_dir), load_draft(draft_dir)
    with pytest.raises(ValidationError) as info:
        check_pair(target, draft)
    assert info.value.problems == validate_pair(target, draft)
    assert len(info.value.problems) >= 3  # last layer, num_target_layers, fc.weight shape
    assert "more problem" in info.value.one_line()


def test_check_pair_accepts_good_pair(tiny_pair) -> None:
    check_pair(load_target(tiny_pair[0]), load_draft(tiny_pair[1]))


def test_shared_weights_differ_is_not_a_problem(tiny_pair, edit_weights) -> None:
    target_dir, draft_dir = tiny_pair

    def nudge(tensors: dict[str, torch.Tensor]) -> None:
        tensors["embed_tokens.weight"][7, :3] += 0.5

    edit_weights(draft_dir, nudge)
    target, draft = load_target(target_dir), load_draft(draft_dir)
    differ = shared_weights_differ(target, draft)
    assert len(differ) == 1 and "embed_tokens.weight" in differ[0] and "3 of 24576" in differ[0]
    assert "max |diff| 0.5" in differ[0] and str(draft_dir / "model.safetensors") in differ[0]
    assert validate_pair(target, draft) == []


def test_shared_weights_compared_with_tied_target(make_pair, edit_weights) -> None:
    target_dir, draft_dir = make_pair(tie_word_embeddings=True)
    edit_weights(draft_dir, lambda t: t["lm_head.weight"].mul_(2))
    differ = shared_weights_differ(load_target(target_dir), load_draft(draft_dir))
    assert len(differ) == 1
    assert "`lm_head.weight` differs from the target's `model.embed_tokens.weight`" in differ[0]


def test_shared_weights_of_other_dtype(make_pair) -> None:
    target_dir, _ = make_pair()
    _, draft_dir = make_pair(dtype=torch.bfloat16)
    differ = shared_weights_differ(load_target(target_dir), load_draft(draft_dir))
    assert len(differ) == 2 and "draft BF16 vs target F32" in differ[0]


def test_draft_without_shared_copies_is_fine(tiny_pair, edit_weights) -> None:
    target_dir, draft_dir = tiny_pair

    def strip(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["embed_tokens.weight"], tensors["lm_head.weight"]

    edit_weights(draft_dir, strip)
    target, draft = load_target(target_dir), load_draft(draft_dir)
    assert validate_pair(target, draft) == [] and shared_weights_differ(target, draft) == []
