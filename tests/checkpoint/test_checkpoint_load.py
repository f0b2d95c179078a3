"""Loading the golden checkpoints and every variant of the tiny example; the WeightStore API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dspark_compile.checkpoint import (
    WeightStore,
    draft_weight_name,
    draft_weight_specs,
    load_draft,
    load_target,
    shared_weights_differ,
    target_weight_name,
    target_weight_specs,
    validate_pair,
)
from dspark_compile.examples import make_tiny_pair

PAIRS = ("dspark_tiny", "dspark_tiny_random")


@pytest.mark.parametrize("pair", PAIRS)
def test_golden_pair_loads_and_validates(golden_dir: Path, pair: str) -> None:
    target = load_target(golden_dir / pair / "target")
    draft = load_draft(golden_dir / pair / "draft")

    t = target.config
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (384, 64, 128, 4)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (4, 2, 16)
    assert t.rope.theta == 1e4 and t.rms_norm_eps == 1e-6 and not t.tie_word_embeddings
    d = draft.config
    assert (d.block_size, d.base.num_hidden_layers, d.num_target_layers) == (7, 2, 4)
    assert d.target_layer_ids == (0, 1, 2) and d.mask_token_id == 383
    assert (d.markov_rank, d.markov_head_type) == (16, "vanilla")
    assert d.enable_confidence_head and d.confidence_head_with_markov

    target_specs, draft_specs = target_weight_specs(t), draft_weight_specs(d)
    assert set(target.weights.names()) == set(target_specs)
    assert set(draft.weights.names()) == set(draft_specs)
    for name, spec in [*target_specs.items()]:
        assert target.weights.shape(name) == spec.shape, name
    for name, spec in draft_specs.items():
        assert draft.weights.shape(name) == spec.shape, name
    assert draft.weights.shape("confidence_head.proj.weight") == (1, 80)
    assert draft.weights.shape("fc.weight") == (64, 192)

    assert validate_pair(target, draft) == []
    assert shared_weights_differ(target, draft) == []
    assert target.files[0] == golden_dir / pair / "target" / "config.json"
    assert draft.files[-1] == golden_dir / pair / "draft" / "model.safetensors"


def test_weight_store_matches_safetensors(golden_dir: Path) -> None:
    target = load_target(golden_dir / "dspark_tiny" / "target")
    store = target.weights
    file = golden_dir / "dspark_tiny" / "target" / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        assert store.names() == sorted(f.keys())
        name = "model.layers.2.self_attn.k_proj.weight"
        assert torch.equal(store.get(name), f.get_tensor(name))
    assert name in store and "nope" not in store
    assert store.dtype(name) == "F32" and store.shape(name) == (32, 64)
    assert store.get(name, torch.bfloat16).dtype == torch.bfloat16
    assert store.file_of(name) == file and store.path == file.parent
    assert store.nbytes() == sum(store.get(n).numel() * 4 for n in store.names())
    assert store.nbytes() < file.stat().st_size


def test_iter_row_chunks_covers_tensor(tiny_pair: tuple[Path, Path]) -> None:
    store = load_target(tiny_pair[0]).weights
    name = target_weight_name("embed_tokens")
    chunks = list(store.iter_row_chunks(name, max_bytes=64 * 4 * 50))
    assert len(chunks) == 8 and chunks[0].shape == (50, 64)
    assert torch.equal(torch.cat(chunks), store.get(name))
    assert torch.equal(store.get_rows(name, 10, 20), store.get(name)[10:20])
    one_d = target_weight_name("norm")
    assert torch.equal(next(store.iter_row_chunks(one_d, max_bytes=8)), store.get(one_d))


VARIANTS = {
    "default": {},
    "tied": {"tie_word_embeddings": True},
    "sharded": {"sharded": True},
    "bf16": {"dtype": torch.bfloat16},
    "fp16": {"dtype": torch.float16},
    "rope_theta": {"rope_spelling": "theta"},
    "rnn": {"markov_head_type": "rnn"},
    "gated": {"markov_head_type": "gated"},
    "no_markov": {"markov_rank": 0},
    "no_confidence": {"confidence_head": False},
    "confidence_without_markov": {"confidence_with_markov": False},
    "embedding_tap": {"target_layer_ids": (-1, 1)},
    "odd_shapes": {"vocab_size": 200, "hidden_size": 48, "num_heads": 6, "num_kv_heads": 3, "head_dim": 8,
                   "num_layers": 3, "target_layer_ids": (0, 1), "block_size": 3, "markov_rank": 4},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_pair_variants_validate(make_pair, variant: str) -> None:
    kwargs = VARIANTS[variant]
    target_dir, draft_dir = make_pair(**kwargs)
    target, draft = load_target(target_dir), load_draft(draft_dir)
    assert validate_pair(target, draft) == []
    assert shared_weights_differ(target, draft) == []
    assert set(draft.weights.names()) == set(draft_weight_specs(draft.config))
    target_specs = target_weight_specs(target.config)
    required = {n for n, s in target_specs.items() if s.required}
    assert required <= set(target.weights.names()) <= set(target_specs)
    d = draft.config
    assert d.target_layer_ids == tuple(kwargs.get("target_layer_ids", (0, 1, 2)))
    assert d.markov_rank == kwargs.get("markov_rank", 16)
    if d.markov_rank == 0:
        assert d.markov_head_type is None
        assert not any(n.startswith("markov_head.") for n in draft.weights.names())
    else:
        assert d.markov_head_type == kwargs.get("markov_head_type", "vanilla")
    if not kwargs.get("confidence_head", True):
        assert not any(n.startswith("confidence_head.") for n in draft.weights.names())
    if kwargs.get("tie_word_embeddings"):
        assert target.config.tie_word_embeddings and target_weight_name("lm_head") not in target.weights
        assert torch.equal(draft.weights.get(draft_weight_name("lm_head")),
                           target.weights.get(target_weight_name("embed_tokens")))
    if kwargs.get("sharded"):
        assert len({target.weights.file_of(n) for n in target.weights.names()}) == 2
        assert target.files[2].name == "model.safetensors.index.json"
    expected = {"F32"} if "dtype" not in kwargs else {"BF16" if kwargs["dtype"] == torch.bfloat16 else "F16"}
    assert {draft.weights.dtype(n) for n in draft.weights.names()} == expected


def test_tiny_pair_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = make_tiny_pair(tmp_path / "a", seed=3)
    b = make_tiny_pair(tmp_path / "b", seed=3)
    c = make_tiny_pair(tmp_path / "c", seed=4)
    for i in range(2):
        assert (a[i] / "model.safetensors").read_bytes() == (b[i] / "model.safetensors").read_bytes()
        assert (a[i] / "model.safetensors").read_bytes() != (c[i] / "model.safetensors").read_bytes()
    draft = json.loads((a[1] / "config.json").read_text())
    golden_keys = {"architectures", "block_size", "confidence_head_with_markov", "enable_confidence_head",
                   "layer_types", "markov_head_type", "markov_rank", "mask_token_id", "num_anchors",
                   "num_target_layers", "target_layer_ids", "tie_word_embeddings", "rope_parameters", "dtype"}
    assert golden_keys <= set(draft)
    assert draft["architectures"] == ["Qwen3DSparkModel"] and draft["mask_token_id"] == 383


def test_tiny_pair_rewrites_in_place(tmp_path: Path) -> None:
    make_tiny_pair(tmp_path)
    target_dir, draft_dir = make_tiny_pair(tmp_path, sharded=True)
    assert not (target_dir / "model.safetensors").exists()
    assert validate_pair(load_target(target_dir), load_draft(draft_dir)) == []


def test_tiny_pair_rejects_unknown_head(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="markov_head_type"):
        make_tiny_pair(tmp_path, markov_head_type="lstm")


def test_generation_config_eos_is_merged(tiny_pair: tuple[Path, Path]) -> None:
    target_dir, _ = tiny_pair
    (target_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert load_target(target_dir).config.eos_token_ids == (5, 7)


def test_safetensors_next_to_pickles_never_reads_pickles(tiny_pair: tuple[Path, Path]) -> None:
    target_dir, _ = tiny_pair
    (target_dir / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    target = load_target(target_dir)
    assert all(f.suffix != ".bin" for f in target.files)


@pytest.mark.parametrize("variant", ["default", "tied", "sharded", "rope_theta"])
def test_transformers_loads_tiny_target(make_pair, variant: str) -> None:
    transformers = pytest.importorskip("transformers")
    target_dir, _ = make_pair(**VARIANTS[variant])
    model, info = transformers.Qwen3ForCausalLM.from_pretrained(target_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    store = load_target(target_dir).weights
    state = model.state_dict()
    for name in store.names():
        assert torch.equal(state[name], store.get(name)), name
    assert model.config.rope_parameters["rope_theta"] == 1e4
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, 384) and torch.isfinite(logits).all()


def test_weight_store_from_files_reads_only_headers(tiny_pair: tuple[Path, Path]) -> None:
    file = tiny_pair[1] / "model.safetensors"
    store = WeightStore.from_files(file.parent, [file])
    assert store.shape("fc.weight") == (64, 192)
    assert repr(store).startswith("WeightStore(")
