"""The benchmark-only replayed backend the GPU serving benchmark serves (SMOKE shape, eagerly on the CPU): through
continuous batching its output is exactly the target-only output and drafts are accepted,
and the word-level tokenizer round-trips generated ids through text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dspark_compile.runtime.decode import GenerationParams, VerifyPolicy, generate
from dspark_compile.serving.batcher import ContinuousBatcher
from dspark_compile.serving.replay import PairSpec, replayed_random, write_word_tokenizer
from dspark_compile.serving.text import TextCodec, TextStream


@pytest.mark.parametrize(("forced", "narrow"), [(False, False), (True, False), (False, True)])
def test_replayed_serving_is_lossless_and_accepts_drafts(tmp_path: Path, drive: Any, forced: bool,
                                                         narrow: bool) -> None:
    """Forced (timing-only) replay commits the reference, which on this fp32 CPU pair is the target's output;
    narrow rounds under a compute-bound curve verify fewer drafts and commit the same tokens."""
    PairSpec(shape="smoke", replay="b", max_slots=128, forced=forced, narrow_rounds=narrow).write(tmp_path)
    backend: Any = replayed_random(tmp_path)
    assert backend.inner.replay_forced is False  # set by start()
    assert backend.verifies_widest is narrow and backend.verifies_whole_block is not narrow
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 2000, size=12).tolist() for _ in range(3)] * 2  # repeats hit the reference cache
    knee = {b: 100.0 if b <= 16 else 1600.0 / b for b in range(1, 33)}  # 4 rows: width 4 pays, 8 does not
    policy = {"policy": VerifyPolicy("schedule", sps=knee)} if narrow else {}
    batcher = ContinuousBatcher(backend, rows=4, slots=128, **policy)
    jobs = drive(batcher, prompts, 40)
    assert backend.inner.replay_forced is forced
    want = generate(backend.side, prompts, GenerationParams(max_new_tokens=40), speculative=False)
    assert [j.tokens for j in jobs] == [r.tokens for r in want]
    assert len(backend.references) == 3
    c = batcher.counters
    tau = 1 + c["accepted_drafts"] / c["row_rounds"]
    assert tau > 2.0, c  # drafts are accepted (the SMOKE pair's degenerate greedy text repeats, so τ runs high)
    if narrow:  # 4 live rows verify 3 drafts each (width 4), fewer rows more
        assert c["verified_drafts"] < backend.info.block_size * c["row_rounds"], c


def test_word_tokenizer_round_trips_generated_text(tmp_path: Path) -> None:
    codec = TextCodec.load(write_word_tokenizer(1000, tmp_path))
    ids = [5, 999, 17, 1, 42]
    stream = TextStream(codec)
    text = "".join(stream.push([t]) for t in ids) + stream.close()
    assert text == "w5 w999 w17 w1 w42" and codec.encode(text) == ids
    assert codec.encode("some words [UNK] here") == [0, 0, 0, 0]


def test_the_narrow_factory_asks_for_narrow_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``backend_factory: dspark_compile.serving.replay:narrow_cuda_graph_backend`` for a real build: no GPU here,
    so CudaGraphBackend.create is stubbed to see the options it gets."""
    from dspark_compile.serving import replay
    from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(CudaGraphBackend, "create", classmethod(lambda cls, *a, **kw: seen.append(kw)))
    (tmp_path / "build_spec.json").write_text('{"target": "t", "draft": "d"}')
    replay.cuda_graph_backend(tmp_path)
    replay.narrow_cuda_graph_backend(tmp_path)
    assert seen == [{"allow_nonfinite": False}, {"allow_nonfinite": False, "narrow_rounds": True}]
