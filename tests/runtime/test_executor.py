"""GraphExecutor: a request's output depends only on its prompt, temperature and seed (batch vs solo), rows
admitted into a live batch keep the others' caches, and the K/V rows land where the graphs expect them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dspark_compile.program import build_program
from dspark_compile.runtime.decode import GenerationParams, generate, request_seed
from dspark_compile.runtime.executor import write_rows
from dspark_compile.runtime.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def backend(golden_dir: Path) -> TorchBackend:
    program = build_program(golden_dir / "dspark_tiny" / "target", golden_dir / "dspark_tiny" / "draft")
    return TorchBackend(program.target, program.draft, eos_token_ids=program.eos_token_ids)


PROMPTS = [[5, 17, 200, 3], [42], [7, 7, 7, 7, 7, 7, 7, 9], [300, 12]]


@pytest.mark.parametrize("speculative", [True, False])
def test_sampling_batch_equals_solo_runs_with_the_derived_seeds(backend: TorchBackend, speculative: bool) -> None:
    params = GenerationParams(max_new_tokens=12, temperature=0.9, seed=3)
    batch = generate(backend, PROMPTS, params, speculative=speculative)
    for i, prompt in enumerate(PROMPTS):
        solo = generate(backend, [prompt], params, speculative=speculative, seeds=[request_seed(3, i)])[0]
        assert solo.tokens == batch[i].tokens, f"request {i}"
        assert [(r["draft"], r["accepted"]) for r in solo.rounds] == [
            (r["draft"], r["accepted"]) for r in batch[i].rounds], f"request {i}"
        for a, b in zip(solo.rounds, batch[i].rounds, strict=True):  # float noise of batch shape only
            assert np.allclose(a.get("confidence_logits", []), b.get("confidence_logits", []), atol=1e-4)
    assert len({tuple(r.tokens) for r in batch}) == len(PROMPTS)
    other = generate(backend, PROMPTS, GenerationParams(max_new_tokens=12, temperature=0.9, seed=4),
                     speculative=speculative)
    assert [r.tokens for r in other] != [r.tokens for r in batch]


def test_admit_into_a_live_batch_and_select(backend: TorchBackend) -> None:
    """Requests joining between rounds (continuous batching) decode exactly as when they run alone."""
    g = backend.info.block_size
    alone = [generate(backend, [p], GenerationParams(max_new_tokens=20))[0].tokens for p in PROMPTS[:3]]
    backend.start(3, 128)
    tokens: list[list[int]] = []
    pending = []
    for k, prompt in enumerate(PROMPTS[:3]):
        if k:  # one round for the live rows, then a new request joins
            out = backend.round(np.full(len(tokens), g))
            for row in range(len(tokens)):
                tokens[row] += [int(t) for t in pending[row][: out.accepted[row]]] + [int(out.next_token[row])]
            pending = [out.drafts[row] for row in range(len(tokens))]
        first = backend.admit(np.array([prompt]), np.array([len(prompt)]), np.zeros(1, np.float32),
                              np.array([k]))
        tokens.append([int(first.next_token[0])])
        pending.append(first.drafts[0])
    backend.select(np.array([0, 2]))  # the second request leaves
    tokens, pending = [tokens[0], tokens[2]], [pending[0], pending[2]]
    for _ in range(6):
        out = backend.round(np.full(2, g))
        for row in range(2):
            tokens[row] += [int(t) for t in pending[row][: out.accepted[row]]] + [int(out.next_token[row])]
        pending = [out.drafts[row] for row in range(2)]
    for row, request in enumerate([0, 2]):
        n = min(len(tokens[row]), 20)
        assert tokens[row][:n] == alone[request][:n] and n >= 7


def test_write_rows_puts_row_t_at_cache_len_plus_t() -> None:
    cache = torch.zeros(1, 2, 3, 1, 10, 2)
    rows = torch.arange(1, 1 + 2 * 3 * 4 * 2, dtype=torch.float32).view(1, 2, 3, 1, 4, 2)
    start = torch.tensor([0, 3, 6])
    write_rows(cache, rows, start)
    for b, s in enumerate(start.tolist()):
        assert torch.equal(cache[:, :, b, :, s : s + 4], rows[:, :, b])
        assert cache[:, :, b, :, :s].abs().sum() == 0 and cache[:, :, b, :, s + 4 :].abs().sum() == 0
