"""Gemma4 checkpoints: the config spellings we read, the features we refuse (one line each, exit 2), the
multimodal layout, and validation of a pair across families."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dspark_compile.checkpoint import load_draft, load_target, validate_pair
from dspark_compile.cli import cli, main
from dspark_compile.errors import CheckpointError
from dspark_compile.model_config import Gemma4Config, parse_target_config
from dspark_compile.program import build_program
from dspark_compile.runtime.decode import GenerationParams, generate
from dspark_compile.runtime.torch_backend import TorchBackend

PAIR = "dspark_tiny_gemma4"

# google/gemma-4-12B-it's config.json as published (2026-05): the text model nested in a gemma4_unified wrapper
RELEASED_12B: dict[str, Any] = {
    "architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
    "tie_word_embeddings": True, "transformers_version": "5.10.0.dev0",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "attention_k_eq_v": True, "bos_token_id": 2,
        "enable_moe_block": False, "eos_token_id": 1, "final_logit_softcapping": 30.0, "global_head_dim": 512,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3840,
        "hidden_size_per_layer_input": 0, "intermediate_size": 15360,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 8, "max_position_embeddings": 262144,
        "model_type": "gemma4_unified_text", "num_attention_heads": 16, "num_global_key_value_heads": 1,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "num_kv_shared_layers": 0, "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                                               "rope_type": "proportional"},
                            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
        "sliding_window": 1024, "tie_word_embeddings": True, "use_bidirectional_attention": "vision",
        "use_double_wide_mlp": False, "vocab_size": 262144, "vocab_size_per_layer_input": 262144,
    },
}


def test_released_12b_config() -> None:
    cfg = parse_target_config(RELEASED_12B, Path("config.json"))
    assert isinstance(cfg, Gemma4Config) and cfg.family == "gemma4"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.sliding_window) == (48, 3840, 262144, 1024)
    assert (cfg.sliding_kv_heads, cfg.sliding_head_dim, cfg.global_kv_heads, cfg.global_head_dim) == (8, 256, 1, 512)
    assert (cfg.num_key_value_heads, cfg.head_dim) == (8, 512)  # the shared cache geometry
    assert cfg.weight_prefix == "model.language_model." and cfg.eos_token_ids == (1,)
    assert cfg.rope.rope_type == "proportional" and cfg.rope.partial_rotary_factor == 0.25
    assert cfg.final_logit_softcapping == 30.0 and cfg.attention_k_eq_v and cfg.tie_word_embeddings
    assert [cfg.is_sliding(i) for i in range(6)] == [True] * 5 + [False]


def _copy(golden_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(golden_dir / PAIR, tmp_path / PAIR)
    return tmp_path / PAIR / "target", tmp_path / PAIR / "draft"


@pytest.mark.parametrize(("role", "changes", "needle"), [
    ("target", {"enable_moe_block": True}, "`enable_moe_block`"),
    ("target", {"num_kv_shared_layers": 2}, "`num_kv_shared_layers`"),
    ("target", {"attention_bias": True}, "`attention_bias`"),
    ("target", {"use_bidirectional_attention": "all"}, "`use_bidirectional_attention`"),
    ("target", {"attn_logit_softcapping": 50.0}, "`attn_logit_softcapping`"),
    ("target", {"hidden_activation": "silu"}, "`hidden_activation`"),
    ("target", {"rope_parameters": {"sliding_attention": {"rope_theta": 1e4},
                                    "full_attention": {"rope_theta": 1e6, "rope_type": "yarn"}}}, "'yarn'"),
    ("target", {"layer_types": ["sliding_attention"] * 5 + ["chunked_attention"]}, "`layer_types`"),
    ("target", {"sliding_window": 0}, "`sliding_window`"),
    ("draft", {"hidden_size_per_layer_input": 4}, "`hidden_size_per_layer_input`"),
])
def test_unsupported_features_one_line_each(role: str, changes: dict[str, Any], needle: str, golden_dir: Path,
                                            tmp_path: Path, edit_config: Callable[..., Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    target, draft = _copy(golden_dir, tmp_path)
    directory = target if role == "target" else draft
    edit_config(directory, **changes)
    with pytest.raises(CheckpointError) as info:
        (load_target if role == "target" else load_draft)(directory)
    assert needle in str(info.value) and str(directory / "config.json") in str(info.value)
    with pytest.raises(SystemExit) as exited:
        main(["inspect", str(target), str(draft)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


@pytest.mark.parametrize(("model_type", "architecture"), [("gemma4", "Gemma4ForConditionalGeneration"),
                                                         ("gemma4_unified", "Gemma4UnifiedForConditionalGeneration")])
def test_multimodal_layout_loads_validates_and_decodes(model_type: str, architecture: str, golden_dir: Path,
                                                       tmp_path: Path) -> None:
    """The golden target as a multimodal checkpoint: text config nested, decoder tensors under
    model.language_model., a vision tower we ignore. Same baseline tokens as the golden."""
    target, draft = _copy(golden_dir, tmp_path)
    text = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({
        "architectures": [architecture], "model_type": model_type,
        "text_config": text | {"model_type": f"{model_type}_text"}, "tie_word_embeddings": True}))
    tensors = {f"model.language_model.{k.removeprefix('model.')}": v
               for k, v in load_file(str(target / "model.safetensors")).items()}
    tensors["model.vision_tower.patch_embedder.weight"] = tensors["model.language_model.norm.weight"].clone()
    save_file(tensors, str(target / "model.safetensors"))
    t, d = load_target(target), load_draft(draft)
    assert t.config.weight_prefix == "model.language_model."
    assert validate_pair(t, d) == []
    program = build_program(target, draft)
    want = json.loads((golden_dir / PAIR / "decode_greedy.json").read_text())["baseline"][0]
    got = generate(TorchBackend(program.target, None), [want["prompt"]], GenerationParams(max_new_tokens=48),
                   speculative=False)
    assert got[0].tokens == want["tokens"]


def test_qwen3_draft_for_a_gemma4_target_is_one_problem(golden_dir: Path) -> None:
    target, draft = load_target(golden_dir / PAIR / "target"), load_draft(golden_dir / "dspark_tiny" / "draft")
    problems = validate_pair(target, draft)
    assert len(problems) == 1 and "a qwen3 draft" in problems[0] and "gemma4 target" in problems[0]


def test_wrong_global_head_dim_in_draft_is_reported(golden_dir: Path, tmp_path: Path,
                                                    edit_config: Callable[..., Path]) -> None:
    target, draft = _copy(golden_dir, tmp_path)
    edit_config(draft, global_head_dim=16)
    problems = validate_pair(load_target(target), load_draft(draft))
    assert any("`global_head_dim` is 16, expected 32" in p for p in problems), problems
    assert any("layers.0.self_attn.q_proj.weight" in p and "[64, 64]" in p for p in problems), problems


def test_inspect_reports_the_family(golden_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(golden_dir / PAIR / "target"), str(golden_dir / PAIR / "draft"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["target"]["family"], report["draft"]["family"], report["compatible"]) == ("gemma4", "gemma4", True)
