"""GraphExecutor: a request's output depends only on its prompt, temperature and seed (batch vs solo), rows
admitted into a live batch keep the others' caches, and the K/V rows land where the graphs expect them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def test_plain_rounds_hold_their_taps_for_the_next_draft_call(backend: TorchBackend) -> None:
    """Plain rounds (``round(..., draft=False)``) run no draft graph: their taps wait for the next draft call, which
    reads them before its own, or, after G + 1 plain rounds in a row, one draft call whose drafts are dropped. A row
    admitted or dropped while taps wait keeps the others' waiting. Against rounds that draft and verify nothing
    (the same committed tokens): every round's next tokens equal; at every drafting round the same drafts and
    confidences (float32, within 1e-4, as the golden traces), and the draft's cache the same over every committed
    position (within 1e-5: a context of several positions in one call rounds differently). The draft graph runs
    at the drafting rounds and once in the stretch of G + 1 = 8 plain rounds; a drafting round after plain ones
    verifies nothing, even when asked to (its drafts were stale), and returns drafts; plain rounds return −1."""
    g = backend.info.block_size
    # (action, argument): plain rounds or drafting rounds (count), a new row, rows kept
    script = [("plain", 2), ("admit", 3), ("plain", 2), ("select", [0, 2]), ("draft", 1), ("plain", 9),
              ("draft", 2)]
    runs = []
    flushes: list[int] = []
    verified: list[list[int]] = []
    for hold in (True, False):
        calls: list[str] = []
        run = backend.transport.run

        def counted(graph: str, feeds: Any, outputs: Any, run: Any = run, calls: list[str] = calls) -> None:
            calls.append(graph)
            if graph == "target_step":
                verified.append(feeds["verify_len"].tolist())
            run(graph, feeds, outputs)

        backend.transport.run = counted  # type: ignore[method-assign]
        try:
            backend.start(3, 128)
            outs = [backend.admit(np.array([PROMPTS[0] + [0] * 4, PROMPTS[2]]), np.array([4, 8]),
                                  np.zeros(2, np.float32), np.array([0, 2]))]
            drafting: list[int] = []
            for action, arg in script:
                if action == "admit":
                    outs.append(backend.admit(np.array([PROMPTS[arg]]), np.array([len(PROMPTS[arg])]),
                                              np.zeros(1, np.float32), np.array([arg])))
                elif action == "select":
                    backend.select(np.array(arg))
                else:
                    for _ in range(arg):
                        plain = hold and action == "plain"
                        before = calls.count("draft_propose")
                        # the first drafting round after plain ones is asked for every draft: the held rows' drafts
                        # are stale, so it verifies none (as the rounds that verify nothing)
                        ask = g if hold and action == "draft" and (outs[-1].drafts == -1).all() else 0
                        outs.append(backend.round(np.full(backend.rows, ask), draft=not plain))
                        assert verified[-1] == [0] * backend.rows  # what target_step was given
                        assert outs[-1].accepted.tolist() == [0] * backend.rows
                        assert (outs[-1].drafts == -1).all() == plain
                        if action == "draft":
                            drafting.append(len(outs) - 1)
                        elif hold:  # draft calls in each plain round
                            flushes.append(calls.count("draft_propose") - before)
            n = backend.rows
            lengths = backend.cache_len.tolist()
            dkv = [backend.draft_kv[:, :, r, :, : lengths[r]].clone() for r in range(n)]
            runs.append((outs, drafting, dkv, calls.count("draft_propose")))
        finally:
            del backend.transport.run
    (a, drafting, kv_a, drafts_a), (b, drafting_b, kv_b, drafts_b) = runs
    assert drafting == drafting_b
    assert [p.next_token.tolist() for p in a] == [p.next_token.tolist() for p in b]
    for i in drafting:
        assert a[i].drafts.tolist() == b[i].drafts.tolist(), i
        np.testing.assert_allclose(a[i].confidence_logits, b[i].confidence_logits, atol=1e-4)
    for x, y in zip(kv_a, kv_b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # draft calls: 2 admissions + 3 drafting rounds, and one for the 8th of 9 plain rounds in a row (4 + 9 + 2
    # rounds draft each without holding)
    assert (drafts_a, drafts_b) == (2 + 3 + 1, 2 + 4 + 1 + 9 + 2) and g == 7
    assert flushes == [0] * 4 + [0] * g + [1, 0]  # a row held G + 1 taps at the stretch's 8th round
