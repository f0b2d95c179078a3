"""Our Qwen3 target against transformers' Qwen3ForCausalLM (the independent oracle), fp32, max |Δlogit| ≤ 1e-4."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (pip install .[test])")

from dspark_compile.model_config import parse_target_config  # noqa: E402
from dspark_compile.models.qwen3 import Qwen3Target  # noqa: E402

TOL = 1e-4


def _pair(tie: bool, rope_theta: float = 10000.0) -> tuple[Qwen3Target, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rope_theta=rope_theta,
        tie_word_embeddings=tie, attn_implementation="eager",
    )
    ref = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms so the test sees them
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    raw = cfg.to_dict()
    raw["architectures"] = ["Qwen3ForCausalLM"]
    ours_cfg = parse_target_config(raw, __import__("pathlib").Path("config.json"))
    sd = ref.state_dict()
    ours = Qwen3Target.from_weights(ours_cfg, sd.__getitem__, tap_layer_ids=(-1, 0, 1))
    return ours, ref


@pytest.mark.parametrize("tie", [False, True])
def test_prefill_and_cached_decode_match_transformers(tie: bool) -> None:
    ours, ref = _pair(tie)
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        kv = ours.new_cache(2, 32)
        hidden, taps, kv = ours(ids, torch.zeros(2, dtype=torch.int64), kv)
        assert (ours.logits(hidden) - out.logits).abs().max().item() <= TOL
        want_taps = torch.cat([out.hidden_states[0], out.hidden_states[1], out.hidden_states[2]], dim=-1)
        assert (taps - want_taps).abs().max().item() <= TOL
        # Step-by-step decode with the cache: feed 5 more tokens one at a time (and one chunk of 3).
        seq = ids
        cache_len = torch.full((2,), ids.shape[1], dtype=torch.int64)
        for step in range(5):
            nxt = torch.randint(0, 96, (2, 1 if step != 2 else 3))
            seq = torch.cat([seq, nxt], dim=1)
            want = ref(seq).logits[:, -nxt.shape[1]:]
            hidden, _, kv = ours(nxt, cache_len, kv)
            assert (ours.logits(hidden) - want).abs().max().item() <= TOL, f"step {step}"
            cache_len = cache_len + nxt.shape[1]


def test_rollback_overwrites_stale_slots() -> None:
    """Writing rejected tokens and then re-decoding from a shorter length gives the uncached result."""
    ours, ref = _pair(False, rope_theta=1e6)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        kv = ours.new_cache(1, 24)
        _, _, kv = ours(ids[:, :6], torch.tensor([0]), kv)
        _, _, kv = ours(torch.randint(0, 96, (1, 4)), torch.tensor([6]), kv)  # rejected block
        hidden, _, _ = ours(ids[:, 6:], torch.tensor([6]), kv)
        want = ref(ids).logits[:, 6:]
        assert (ours.logits(hidden) - want).abs().max().item() <= TOL
