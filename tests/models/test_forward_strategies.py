"""The cache-write and attention strategies of models/ (docs/PROGRAM.md, "Model-family seams").

One forward per model, three cache writes: the functional cache returns the whole updated cache (today's
ONNX form), ``RowsCache`` the new rows only — exactly the rows the functional cache wrote — and
``InPlaceCache`` writes a static cache and attends over a window, agreeing with the functional forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dspark_compile.models.layers import FUNCTIONAL, InPlaceCache, RowsCache, SdpaAttention
from dspark_compile.program import DecodeProgram, build_program


@pytest.fixture(scope="module")
def pair(golden_dir: Path) -> DecodeProgram:
    torch.set_num_threads(1)
    return build_program(golden_dir / "dspark_tiny" / "target", golden_dir / "dspark_tiny" / "draft")


def test_target_cache_strategies_agree(pair: DecodeProgram) -> None:
    tgt = pair.target
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tgt.cfg.vocab_size, (2, 5), generator=gen)
    cache_len = torch.tensor([3, 7])
    kv = torch.randn(tgt.new_cache(2, 32).shape, generator=gen)
    h_f, taps_f, kv_f = tgt(ids, cache_len, kv.clone())
    h_r, taps_r, rows = tgt(ids, cache_len, kv.clone(), cache=RowsCache())
    assert torch.equal(h_f, h_r) and torch.equal(taps_f, taps_r)
    assert rows.shape == (*kv.shape[:-2], 5, kv.shape[-1])  # [L, 2, B, KV, T, D]: never a whole cache
    for b, start in enumerate(cache_len.tolist()):
        assert torch.equal(rows[:, :, b], kv_f[:, :, b, :, start : start + 5])
        untouched = torch.ones(32, dtype=torch.bool)
        untouched[start : start + 5] = False
        assert torch.equal(kv_f[:, :, b, :, untouched], kv[:, :, b, :, untouched])
    static = kv.clone()
    h_i, _, none = tgt(ids, cache_len, static, cache=InPlaceCache(16))
    assert none is None
    assert torch.equal(static, kv_f)  # the same rows, written in place
    torch.testing.assert_close(h_i, h_f, rtol=1e-5, atol=1e-5)
    h_s, _, _ = tgt(ids, cache_len, kv.clone(), cache=InPlaceCache(16), attention=SdpaAttention())
    torch.testing.assert_close(h_s, h_f, rtol=1e-4, atol=1e-4)
    assert FUNCTIONAL.in_place is False


def test_draft_cache_strategies_agree(pair: DecodeProgram) -> None:
    d = pair.draft
    gen = torch.Generator().manual_seed(1)
    feat = d.fc.weight.shape[1]
    taps = torch.randn(2, 4, feat, generator=gen)
    count = torch.tensor([4, 2])
    cache_len = torch.tensor([5, 9])
    anchor = torch.tensor([11, 12])
    kv = torch.randn(d.new_cache(2, 32).shape, generator=gen)
    h_f, kv_f = d.backbone(anchor, taps, count, cache_len, kv.clone())
    h_r, rows = d.backbone(anchor, taps, count, cache_len, kv.clone(), cache=RowsCache())
    assert torch.equal(h_f, h_r)
    for b, start in enumerate(cache_len.tolist()):
        assert torch.equal(rows[:, :, b], kv_f[:, :, b, :, start : start + 4])
    static = kv.clone()
    h_i, none = d.backbone(anchor, taps, count, cache_len, static, cache=InPlaceCache(24))
    assert none is None
    torch.testing.assert_close(h_i, h_f, rtol=1e-5, atol=1e-5)
    for b, start in enumerate(cache_len.tolist()):  # the context rows that count, written in place
        n = int(count[b])
        assert torch.equal(static[:, :, b, :, start : start + n], kv_f[:, :, b, :, start : start + n])
