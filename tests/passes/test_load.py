"""Pass `load`: opens both checkpoints as the spec says, and refuses missing or non-finite ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_compile.build_spec import BuildSpec
from dspark_compile.errors import CheckpointError
from dspark_compile.program import CheckpointPair


def test_load_opens_the_golden_pair(golden_pair: tuple[Path, Path], tmp_path: Path,
                                    loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    target_dir, draft_dir = golden_pair
    pair = loaded(BuildSpec(target_dir, draft_dir, tmp_path / "out"))
    tc, dc = pair.target.config, pair.draft.config
    assert (tc.vocab_size, tc.hidden_size, tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim) == (
        384, 64, 4, 2, 16)
    assert (dc.block_size, tuple(dc.target_layer_ids), dc.mask_token_id, dc.markov_rank) == (7, (0, 1, 2), 383, 16)
    assert {f.name for f in pair.target.files} == {"config.json", "generation_config.json", "model.safetensors"}
    assert {f.name for f in pair.draft.files} == {"config.json", "model.safetensors"}
    on_disk = load_file(str(target_dir / "model.safetensors"))
    assert torch.equal(pair.target.weights.get("model.embed_tokens.weight"), on_disk["model.embed_tokens.weight"])
    assert tuple(pair.draft.weights.shape("fc.weight")) == (64, 192)


def test_missing_checkpoint_names_the_directory(golden_pair: tuple[Path, Path], tmp_path: Path,
                                                loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    target_dir, _ = golden_pair
    missing = tmp_path / "no-such-draft"
    with pytest.raises(CheckpointError, match=r"no-such-draft: draft checkpoint directory does not exist"):
        loaded(BuildSpec(target_dir, missing, tmp_path / "out"))


def test_nonfinite_weights_are_refused_unless_allowed(make_pair, tmp_path: Path,
                                                      loaded: Callable[[BuildSpec], CheckpointPair]) -> None:
    target_dir, draft_dir = make_pair()
    path = target_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor `model\.norm\.weight` holds 1 NaN"):
        loaded(BuildSpec(target_dir, draft_dir, tmp_path / "out"))
    pair = loaded(BuildSpec(target_dir, draft_dir, tmp_path / "out", allow_nonfinite=True))
    assert torch.isnan(pair.target.weights.get("model.norm.weight")[3])
