"""Our Gemma4 target against transformers' Gemma4ForCausalLM (the oracle): prefill and cached decode logits.

Two checkpoints: the golden target (sliding window 16, [s, s, F, s, s, F], K = V on the global layers, soft-cap 30,
tied embeddings, ``layer_scalar``) and tiny random ones of other shapes written by transformers 5.24 itself (its
``per_layer_config`` spelling of the global head shape), with per-layer inputs, separate V on the global layers,
no soft-capping, untied embeddings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the oracle")

from dspark_compile.checkpoint import load_target  # noqa: E402
from dspark_compile.models.gemma4 import Gemma4Target  # noqa: E402
from dspark_compile.models.layers import RowsCache  # noqa: E402

TOL = 1e-4


def _random_gemma4(out: Path, seed: int, **overrides: object) -> Path:
    """A random Gemma4ForCausalLM saved by transformers; every weight (norms, ``layer_scalar``) perturbed."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    kwargs: dict[str, object] = dict(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=3, head_dim=8, global_head_dim=24, num_global_key_value_heads=2, attention_k_eq_v=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"],
        sliding_window=5, hidden_size_per_layer_input=4, vocab_size_per_layer_input=96,
        final_logit_softcapping=None, tie_word_embeddings=False, max_position_embeddings=256,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                            "rope_theta": 50000.0}},
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    ) | overrides
    cfg = Gemma4TextConfig(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.6, 1.4)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["golden", "random_ple_kv", "random_shared_kv_softcap"])
def checkpoint(request: pytest.FixtureRequest, golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "golden":
        return golden_dir / "dspark_tiny_gemma4" / "target"
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "random_ple_kv":  # separate v_proj on the global layers: their KV heads stay 3
        return _random_gemma4(out, 1, attention_k_eq_v=False)
    return _random_gemma4(out, 2, hidden_size_per_layer_input=0, final_logit_softcapping=20.0,
                          tie_word_embeddings=True, sliding_window=7)


def _models(path: Path) -> tuple[Gemma4Target, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    ckpt = load_target(path)
    ours = Gemma4Target.from_weights(ckpt.config, ckpt.weights.get)
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return ours, oracle


def test_config_reads_both_spellings(checkpoint: Path) -> None:
    """The global layers' head shape, whether config.json says global_head_dim (5.10) or per_layer_config (5.24)."""
    cfg = load_target(checkpoint).config
    want = {"golden": (1, 32), "random_ple_kv": (3, 24), "random_shared_kv_softcap": (2, 24)}[_label(checkpoint)]
    assert (cfg.global_kv_heads, cfg.global_head_dim) == want
    assert cfg.family == "gemma4"


def _label(path: Path) -> str:
    return "golden" if path.name == "target" else path.name.rstrip("0123456789")


@torch.inference_mode()
def test_prefill_and_cached_decode_match_transformers(checkpoint: Path) -> None:
    """Batch 2, prompt 23 tokens (past every window), then cached chunks of 1, 4 and 1 tokens: each chunk's
    logits equal the oracle's full-sequence logits at those positions, through the functional cache and through
    the rows cache with the rows written back by hand (what the executor does)."""
    ours, oracle = _models(checkpoint)
    vocab = ours.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 29), generator=gen)
    want = oracle(ids).logits
    worst = 0.0
    for strategy in ("functional", "rows"):
        kv = ours.new_cache(2, 40)
        start = 0
        for chunk in (23, 1, 4, 1):
            part = ids[:, start:start + chunk]
            cache_len = torch.full((2,), start)
            if strategy == "functional":
                hidden, _, kv = ours(part, cache_len, kv)
            else:
                hidden, _, rows = ours(part, cache_len, kv, cache=RowsCache())
                kv[..., start:start + chunk, :] = rows
            got = ours.logits(hidden)
            worst = max(worst, (got - want[:, start:start + chunk]).abs().max().item())
            start += chunk
    print(f"{_label(checkpoint)}: max |logit diff| vs transformers {worst:.2e}")
    assert worst <= TOL


@torch.inference_mode()
def test_taps_are_transformers_hidden_states(checkpoint: Path) -> None:
    """Tap id i is the output of decoder layer i (hidden_states[i + 1]), -1 the scaled embedding."""
    ours, oracle = _models(checkpoint)
    ours.tap_layer_ids = (-1, 0, ours.cfg.num_hidden_layers - 2)
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 19), generator=torch.Generator().manual_seed(1))
    states = oracle(ids, output_hidden_states=True).hidden_states
    _, taps, _ = ours(ids, torch.zeros(1, dtype=torch.int64), ours.new_cache(1, 19))
    want = torch.cat([states[i + 1] for i in ours.tap_layer_ids], dim=-1)
    assert (taps - want).abs().max().item() <= TOL


@torch.inference_mode()
def test_ring_window_equals_full_cache(checkpoint: Path) -> None:
    """The sliding layers' ring of window + G slots (PyTorch reference) gives the oracle's logits through a
    prefill longer than the ring, single tokens, and verify blocks of G + 1 rows of which only some are kept
    (the rejected rows stay in the ring and the next call starts before them)."""
    ours, oracle = _models(checkpoint)
    g = 4
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 60), generator=torch.Generator().manual_seed(2))
    want = oracle(ids).logits
    kv, ring = ours.new_global_cache(2, 64), ours.new_ring(2, g)
    assert ring.shape[-2] < 23
    start, worst = 0, 0.0
    for chunk, keep in ((23, 23), (1, 1), (g + 1, 2), (g + 1, g + 1), (g + 1, 1), (1, 1), (g + 1, 3)):
        part = ids[:, start:start + chunk]
        hidden, _, kv = ours(part, torch.full((2,), start), kv, ring=ring)
        worst = max(worst, (ours.logits(hidden)[:, :keep] - want[:, start:start + keep]).abs().max().item())
        start += keep  # the rows after `keep` were "rejected": the next call rewrites their positions
    print(f"{_label(checkpoint)}: ring of {ring.shape[-2]} slots, max |logit diff| {worst:.2e}")
    assert worst <= TOL


@torch.inference_mode()
def test_ring_rows_written_by_the_executor(checkpoint: Path) -> None:
    """The graphs' form of the ring: the model only records the sliding rows (``RingWindow(write=False)``,
    as target_step's ``ring_new``) and the executor's :func:`write_ring` writes them. Batch 2 with prompts of
    37 and 9 tokens right-padded to 37 (a prefill longer than the ring, and padding further past the shorter
    prompt than G), then verify blocks of G + 1 rows partly rejected, each row keeping its own count: the
    kept rows' logits are the oracle's."""
    from dspark_compile.models.gemma4 import RingWindow
    from dspark_compile.runtime.executor import write_ring, write_rows

    ours, oracle = _models(checkpoint)
    g, vocab = 4, ours.cfg.vocab_size
    ids = torch.randint(0, vocab, (2, 90), generator=torch.Generator().manual_seed(3))
    want = oracle(ids).logits
    lens = torch.tensor([37, 9])
    kv, ring = ours.new_global_cache(2, 96), ours.new_ring(2, g)
    assert ring.shape[-2] == ours.cfg.sliding_window + g < 37
    prompt = ids[:, :37].clone()
    prompt[1, 9:] = 0  # right padding, as the executor's admit
    start = torch.zeros(2, dtype=torch.int64)
    worst = 0.0
    keeps = ((3, 1), (g + 1, 2), (1, g + 1), (2, 2), (g + 1, 1), (4, 3))
    for step in range(len(keeps) + 1):
        if step == 0:
            tokens, count, keep = prompt, lens, lens
        else:
            keep = torch.tensor(keeps[step - 1])
            tokens = torch.stack([ids[b, int(start[b]):int(start[b]) + g + 1] for b in range(2)])
            count = torch.full((2,), g + 1)
        window = RingWindow(ring, ours.cfg.sliding_window, write=False)
        hidden, _, rows = ours(tokens, start, kv, cache=RowsCache(), ring=window)
        write_rows(kv, rows, start)
        write_ring(ring, window.new_rows(), start, count)
        logits = ours.logits(hidden)
        for b in range(2):
            k, p = int(keep[b]), int(start[b])
            worst = max(worst, (logits[b, :k] - want[b, p:p + k]).abs().max().item())
        start = start + keep
    print(f"{_label(checkpoint)}: ring rows written by write_ring, max |logit diff| {worst:.2e}")
    assert worst <= TOL
