"""Every broken file raises one CheckpointError line that names the file, before anything crashes."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from dspark_compile.checkpoint import load_draft, load_target, read_header
from dspark_compile.errors import CheckpointError, DsparkError


def _raises(fn, path, *needles: str, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        fn(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, DsparkError) and info.value.exit_code == 2
    assert "\n" not in info.value.one_line()
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return info.value


def test_missing_path(tmp_path: Path) -> None:
    _raises(load_target, tmp_path / "nowhere", str(tmp_path / "nowhere"), "does not exist")


def test_path_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    _raises(load_draft, file, str(file), "found a file")


def test_empty_directory(tmp_path: Path) -> None:
    _raises(load_target, tmp_path, str(tmp_path), "empty")


def test_missing_config(tiny_pair) -> None:
    target_dir, _ = tiny_pair
    (target_dir / "config.json").unlink()
    _raises(load_target, target_dir, str(target_dir / "config.json"), "missing")


@pytest.mark.parametrize("text", ["{\"vocab_size\": 384,", "[1, 2]", "\xff\xfe"])
def test_bad_config_json(tiny_pair, text: str) -> None:
    _, draft_dir = tiny_pair
    (draft_dir / "config.json").write_bytes(text.encode("latin-1"))
    _raises(load_draft, draft_dir, str(draft_dir / "config.json"))


def test_unknown_architecture(tiny_pair, edit_config) -> None:
    target_dir, _ = tiny_pair
    edit_config(target_dir, architectures=["LlamaForCausalLM"])
    _raises(load_target, target_dir, str(target_dir / "config.json"), "LlamaForCausalLM", "not supported")


def test_draft_passed_as_target(tiny_pair) -> None:
    _, draft_dir = tiny_pair
    _raises(load_target, draft_dir, "Qwen3DSparkModel", "Qwen3ForCausalLM")


def test_unknown_markov_head_type(tiny_pair, edit_config) -> None:
    _, draft_dir = tiny_pair
    edit_config(draft_dir, markov_head_type="lstm")
    _raises(load_draft, draft_dir, str(draft_dir / "config.json"), "markov_head_type", "lstm")


def test_pruned_draft_vocab(tiny_pair, edit_config) -> None:
    _, draft_dir = tiny_pair
    edit_config(draft_dir, draft_vocab_size=128)
    _raises(load_draft, draft_dir, str(draft_dir / "config.json"), "draft_vocab_size", "not supported")


class _Booby:
    """Unpickling this creates a marker file: proof that a pickle was (wrongly) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_only_checkpoint_is_refused_unread(tiny_pair, tmp_path: Path, name: str) -> None:
    target_dir, _ = tiny_pair
    (target_dir / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (target_dir / name).write_bytes(pickle.dumps(_Booby(marker)))
    _raises(load_target, target_dir, str(target_dir), name, "pickle", "safetensors")
    assert not marker.exists()


def test_no_weights(tiny_pair) -> None:
    target_dir, _ = tiny_pair
    (target_dir / "model.safetensors").unlink()
    _raises(load_target, target_dir, str(target_dir), "no model.safetensors")


def test_other_safetensors_name(tiny_pair) -> None:
    _, draft_dir = tiny_pair
    (draft_dir / "model.safetensors").rename(draft_dir / "draft.safetensors")
    _raises(load_draft, draft_dir, "draft.safetensors", "model.safetensors")


def test_truncated_safetensors(tiny_pair) -> None:
    target_dir, _ = tiny_pair
    file = target_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _raises(load_target, target_dir, str(file), "truncated")


def test_truncated_inside_length_field(tiny_pair) -> None:
    target_dir, _ = tiny_pair
    file = target_dir / "model.safetensors"
    file.write_bytes(b"\x01\x02\x03")
    _raises(load_target, target_dir, str(file), "truncated", "header too small")


def test_truncated_inside_header(tiny_pair) -> None:
    target_dir, _ = tiny_pair
    file = target_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    _raises(load_target, target_dir, str(file), "truncated", "header")


def test_absurd_header_size(tiny_pair, write_raw) -> None:
    _, draft_dir = tiny_pair
    file = draft_dir / "model.safetensors"
    write_raw(file, {}, header_len=2**62)
    _raises(load_draft, draft_dir, str(file), "truncated or corrupt", "header too large")


def test_bad_json_header(tiny_pair, write_raw) -> None:
    _, draft_dir = tiny_pair
    file = draft_dir / "model.safetensors"
    write_raw(file, b"{not json", b"")
    _raises(load_draft, draft_dir, str(file), "corrupt safetensors file", "invalid JSON")


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 1600]}, "invalid shape, data type, or offset"),
        ({"dtype": "F32", "shape": [400], "data_offsets": [0, 1600]}, "not fully covered"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "invalid offset for tensor `w`"),
        ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "integer `-4`"),
        ({"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 16]}, "unknown variant `Q4_K`"),
        ({"shape": [4], "data_offsets": [0, 16]}, "missing field `dtype`"),
        ("oops", "invalid type: string"),
    ],
)
def test_bad_header_entries(tmp_path: Path, write_raw, entry, needle: str) -> None:
    file = tmp_path / "model.safetensors"
    write_raw(file, {"__metadata__": {"format": "pt"}, "w": entry}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=needle) as info:
        read_header(file)
    assert str(file) in str(info.value)


def test_bad_header_metadata(tmp_path: Path, write_raw) -> None:
    file = tmp_path / "meta.safetensors"
    write_raw(file, {"__metadata__": {"format": 1}})
    with pytest.raises(CheckpointError, match="expected a string"):
        read_header(file)


def test_header_gap_and_trailing_bytes(tmp_path: Path, write_raw) -> None:
    file = tmp_path / "gap.safetensors"
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    write_raw(file, header, b"\0" * 8)
    with pytest.raises(CheckpointError, match="invalid offset for tensor `a`"):
        read_header(file)
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    write_raw(file, header, b"\0" * 8)
    with pytest.raises(CheckpointError, match="not fully covered"):
        read_header(file)


def test_index_names_missing_shard(make_pair) -> None:
    target_dir, _ = make_pair(sharded=True)
    (target_dir / "model-00002-of-00002.safetensors").unlink()
    _raises(load_target, target_dir, str(target_dir / "model.safetensors.index.json"),
            "model-00002-of-00002.safetensors", "does not exist")


@pytest.mark.parametrize(("shard", "named"), [
    ("model-00002-of-00002.safetensors", "fc.weight"),  # the tensor is not in that shard
    ("../target/model-00001-of-00002.safetensors", "plain file name"),  # a shard outside the directory
])
def test_index_maps_tensor_to_a_wrong_shard(make_pair, shard: str, named: str) -> None:
    _, draft_dir = make_pair(sharded=True)
    index = draft_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["fc.weight"] = shard
    index.write_text(json.dumps(data))
    _raises(load_draft, draft_dir, str(index), named)


def test_index_without_weight_map(make_pair) -> None:
    _, draft_dir = make_pair(sharded=True)
    index = draft_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    _raises(load_draft, draft_dir, str(index), "weight_map")


def test_tensor_in_two_shards(make_pair) -> None:
    _, draft_dir = make_pair(sharded=True)
    index = draft_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    os.link(draft_dir / "model-00001-of-00002.safetensors", draft_dir / "copy.safetensors")
    data["weight_map"]["extra.weight"] = "copy.safetensors"
    index.write_text(json.dumps(data))
    _raises(load_draft, draft_dir, "also stored in")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights(make_pair, edit_weights, dtype: torch.dtype, bad: float) -> None:
    _, draft_dir = make_pair(dtype=dtype)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["layers.1.mlp.down_proj.weight"][3, 5] = bad

    edit_weights(draft_dir, poison)
    error = _raises(load_draft, draft_dir, str(draft_dir / "model.safetensors"),
                    "layers.1.mlp.down_proj.weight", "allow_nonfinite")
    assert ("1 NaN" if bad != bad else "1 Inf") in str(error)
    draft = load_draft(draft_dir, allow_nonfinite=True)
    assert not torch.isfinite(draft.weights.get("layers.1.mlp.down_proj.weight")).all()


def test_nonfinite_target_in_shard(make_pair) -> None:
    target_dir, _ = make_pair(sharded=True)
    shard = target_dir / "model-00001-of-00002.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _raises(load_target, target_dir, str(shard), name)
    load_target(target_dir, allow_nonfinite=True)
