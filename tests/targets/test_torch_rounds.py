"""CudaGraphBackend's DecodeBackend protocol (admit / one graph per round / select) and the acceptance replay.

CPU (graphs=False, the same static-cache code eagerly): the golden traces through admit/round reproduce
exactly, greedy speculative tokens equal target-only, a sampling row's output does not depend on its batch,
select() keeps rows' state, and a replay with a full profile commits the reference in G+1-token rounds.
GPU (marker ``gpu``): the same through captured round graphs in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dspark_compile.program import build_program
from dspark_compile.runtime.decode import GenerationParams, VerifyPolicy, generate
from dspark_compile.targets.torch import CudaGraphBackend
from dspark_compile.targets.torch.bench import (
    GEMMA4_SMOKE,
    SMOKE,
    conditional_profile,
    decode_rounds,
    random_pair,
    replay_reference,
    rounds_bench,
    survival_profile,
)

PAIRS = ("dspark_tiny", "dspark_tiny_random")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check_golden(be: CudaGraphBackend, golden_dir: Path, pair: str, mode: str) -> None:
    gold = json.loads((golden_dir / pair / "decode_greedy.json").read_text())[mode]
    policy = VerifyPolicy("threshold", threshold=0.5) if mode != "greedy" else VerifyPolicy()
    run = decode_rounds(be, [g["prompt"] for g in gold], max_new_tokens=48, policy=policy)
    worst = 0.0
    for toks, rounds, g in zip(run.tokens, run.rounds, gold, strict=True):
        assert toks == g["tokens"]
        assert [r["accepted"] for r in rounds] == g["acceptance_lengths"]
        assert [r["draft"] for r in rounds] == [y["draft"] for y in g["rounds"]]
        for x, y in zip(rounds, g["rounds"], strict=True):
            want = y["confidence_logits"] or []
            worst = max([worst, *(abs(a - b) for a, b in zip(x["confidence_logits"], want, strict=True))])
    assert worst < 1e-4
    target_only = decode_rounds(be, [g["prompt"] for g in gold], max_new_tokens=48, speculative=False)
    if mode == "greedy":
        assert target_only.tokens == [g["tokens"] for g in gold]


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("mode", ["greedy", "threshold_0.5"])
def test_rounds_reproduce_golden_traces(golden_dir: Path, pair: str, mode: str) -> None:
    prog = build_program(golden_dir / pair / "target", golden_dir / pair / "draft")
    be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids)
    _check_golden(be, golden_dir, pair, mode)


@pytest.fixture(scope="module")
def smoke_backend() -> CudaGraphBackend:
    target, draft = random_pair(SMOKE, device="cpu", dtype=torch.float32)
    return CudaGraphBackend(target, draft)


PROMPTS = [list(range(3, 23)), list(range(100, 133)), [7, 8, 9, 1000, 5, 6, 2047, 12, 13]]


def test_sampling_rows_do_not_depend_on_their_batch(smoke_backend: CudaGraphBackend) -> None:
    together = decode_rounds(smoke_backend, PROMPTS, max_new_tokens=16, temperature=0.9, seed=5)
    alone = decode_rounds(smoke_backend, PROMPTS[1:2], max_new_tokens=16, temperature=0.9, seed=6)
    assert together.tokens[1] == alone.tokens[0]
    again = decode_rounds(smoke_backend, PROMPTS, max_new_tokens=16, temperature=0.9, seed=5)
    assert again.tokens == together.tokens and again.rounds == together.rounds
    other = decode_rounds(smoke_backend, PROMPTS, max_new_tokens=16, temperature=0.9, seed=50)
    assert other.tokens != together.tokens


def _both_loops(be: CudaGraphBackend) -> dict[tuple[bool, float], tuple[Any, list[Any]]]:
    """The benchmark's loop and runtime.generate over PROMPTS (20 new tokens), speculative and target-only, greedy
    and sampling: {(speculative, temperature): (decode_rounds' run, generate's results)}."""
    out = {}
    for spec in (True, False):
        for temp in (0.0, 0.9):
            out[spec, temp] = (
                decode_rounds(be, PROMPTS, max_new_tokens=20, speculative=spec, temperature=temp, seed=3),
                generate(be, PROMPTS, GenerationParams(max_new_tokens=20, temperature=temp, seed=3),
                         speculative=spec, seeds=[3, 4, 5]))
    return out


def test_a_round_launched_behind_the_running_one_decodes_the_same(smoke_backend: CudaGraphBackend) -> None:
    """Rounds queued behind the one running (rounds_in_flight = 2, the CUDA-graph backend's) give the tokens and
    rounds of rounds launched and collected in turn, through runtime.generate and the benchmark's loop, greedy
    and sampling, speculative and target-only: a request that ends (by its length, or by an EOS) drops what the
    round behind it computed for it, and only rounds sure to run are queued."""
    base = decode_rounds(smoke_backend, PROMPTS, max_new_tokens=20)
    eos = base.tokens[1][6]
    be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model, eos_token_ids=(eos,))
    queued: list[int] = []
    launch = be.launch

    def counted(verify_len: np.ndarray, *, draft: bool = True) -> None:
        launch(verify_len, draft=draft)
        queued.append(len(be._inflight))

    be.launch = counted  # type: ignore[method-assign]
    runs = {}
    for ahead in (1, 2):
        be.rounds_in_flight = ahead
        queued.clear()
        for key, (a, b) in _both_loops(be).items():
            runs[(ahead, *key)] = (a.tokens, a.rounds, [r.tokens for r in b], [r.rounds for r in b])
        assert max(queued) == ahead  # rounds in flight at once
    for key in ((True, 0.0), (True, 0.9), (False, 0.0), (False, 0.9)):
        one, two = runs[(1, *key)], runs[(2, *key)]
        assert one[0] == two[0] and one[2] == two[2] and one[0] == one[2], key  # tokens; the two loops agree
        for rounds_one, rounds_two in ((one[1], two[1]), (one[3], two[3])):
            for r1, r2 in zip(rounds_one, rounds_two, strict=True):  # drafts and acceptance equal; confidences
                assert [(r["draft"], r["accepted"]) for r in r1] == [(r["draft"], r["accepted"]) for r in r2], key
                c1, c2 = ([c for r in rr for c in r.get("confidence_logits", [])] for rr in (r1, r2))
                # within 1e-5: a round run behind an ending request has one row more, and the CPU's float32
                # products round differently at another row count (tokens never moved here)
                assert np.allclose(c1, c2, atol=1e-5), key
    tokens = runs[1, True, 0.0][0]
    assert tokens[1][-1] == eos and len(tokens[1]) < 20 and any(len(t) == 20 for t in tokens)


def test_rounds_queued_behind_the_admission_decode_the_same(smoke_backend: CudaGraphBackend,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """DSPARK_ADMIT_AHEAD=1: the rounds sure to run are launched behind the admission, before its sync
    (RoundQueue.admit), through runtime.generate and the benchmark's loop. Tokens, drafts and acceptance equal those
    of rounds launched after it, greedy and sampling, speculative and target-only, also where a request's first
    token is its EOS (the rounds queued behind run it for nothing, and it commits only that token)."""
    base = decode_rounds(smoke_backend, PROMPTS, max_new_tokens=20)
    behind: list[bool] = []
    for eos in ((), (base.tokens[0][0],)):
        be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model, eos_token_ids=eos)
        launch = be.launch

        def counted(verify_len: np.ndarray, *, draft: bool = True, _launch: Any = launch, _be: Any = be) -> None:
            behind.append(_be._admitting is not None)  # launched before admitted() waited
            _launch(verify_len, draft=draft)

        be.launch = counted  # type: ignore[method-assign]
        monkeypatch.delenv("DSPARK_ADMIT_AHEAD", raising=False)
        assert be.queues_admission  # on by default
        runs = {}
        for on in ("0", "1"):
            monkeypatch.setenv("DSPARK_ADMIT_AHEAD", on)
            assert be.queues_admission == (on == "1")
            behind.clear()
            for key, (a, b) in _both_loops(be).items():
                runs[(on, *key)] = (a.tokens, [r.tokens for r in b],
                                    [[(r["draft"], r["accepted"]) for r in rr] for rr in a.rounds],
                                    [[(r["draft"], r["accepted"]) for r in x.rounds] for x in b])
            # two rounds queued behind each of the 8 admissions (1 + 8 tokens <= 20: both sure to run), else none
            assert sum(behind) == (16 if on == "1" else 0), (eos, on)
        for key in ((True, 0.0), (True, 0.9), (False, 0.0), (False, 0.9)):
            assert runs[("0", *key)] == runs[("1", *key)], (eos, key)
            assert runs["1", *key][0] == runs["1", *key][1], (eos, key)  # the two loops agree
        if eos:
            assert runs["1", True, 0.0][0][0] == [eos[0]]


def test_both_loops_plan_a_whole_block_round_as_the_batcher_does(smoke_backend: CudaGraphBackend) -> None:
    """The round graph verifies every row's G + 1 positions whatever ℓ is, so under the confidence scheduler a
    shorter ℓ saves nothing: runtime.generate and the benchmark's loop plan with the backend's round shape
    (decode.verify_shape), as the serving batcher does, and verify all G drafts even where SPS falls steeply with
    the verified tokens (where a round's cost grows with ℓ the scheduler verifies none there:
    tests/runtime/test_scheduler.py::test_inverse_curve_admits_nothing)."""
    steep = VerifyPolicy("schedule", sps={b: 1000.0 / b for b in range(1, 65)})
    g = smoke_backend.info.block_size
    target_only = decode_rounds(smoke_backend, PROMPTS, max_new_tokens=20, speculative=False).tokens
    results = generate(smoke_backend, PROMPTS, GenerationParams(max_new_tokens=20, policy=steep))
    run = decode_rounds(smoke_backend, PROMPTS, max_new_tokens=20, policy=steep)
    for rounds in ([x.rounds for x in results], run.rounds):
        assert {len(r["draft"]) for rr in rounds for r in rr} == {g}
    assert [x.tokens for x in results] == run.tokens == target_only


def test_select_keeps_the_remaining_rows_state(smoke_backend: CudaGraphBackend) -> None:
    be = smoke_backend
    full = decode_rounds(be, PROMPTS, max_new_tokens=20)
    be.start(3, 64)
    lengths = np.array([len(p) for p in PROMPTS])
    ids = np.zeros((3, lengths.max()), dtype=np.int64)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = p
    first = be.admit(ids, lengths, np.zeros(3, np.float32), np.arange(3))
    be.round(np.full(3, 7))
    be.select(np.array([0, 2]))  # row 1 leaves; rows 0 and 2 go on as rows 0 and 1
    tokens = {0: [int(first.next_token[0])], 2: [int(first.next_token[2])]}
    assert tokens[0][0] == full.tokens[0][0]
    # Replaying the committed stream from the full run: rows 0 and 2 keep producing the same tokens.
    for _ in range(2):
        p = be.round(np.full(2, 7))
        for k, row in enumerate((0, 2)):
            assert int(p.next_token[k]) in full.tokens[row]


def test_replay_with_full_profile_commits_the_reference_g_plus_1_at_a_time(smoke_backend: CudaGraphBackend) -> None:
    be = smoke_backend
    g = be.info.block_size
    base = decode_rounds(be, PROMPTS, max_new_tokens=48, speculative=False)  # the reference runs past 24
    width = max(len(p) for p in PROMPTS) + 24 + 2 * g + 3
    be.set_replay(replay_reference(PROMPTS, base.tokens, width), np.ones(g, dtype=np.float32))
    run = decode_rounds(be, PROMPTS, max_new_tokens=24)
    be.set_replay(None, None)
    assert run.tokens == [t[:24] for t in base.tokens]
    assert all(r["accepted"] == g + 1 for rs in run.rounds for r in rs[:-1])
    be.set_replay(replay_reference(PROMPTS, base.tokens, width), np.zeros(g, dtype=np.float32))
    none = decode_rounds(be, PROMPTS, max_new_tokens=24)
    be.set_replay(None, None)
    assert none.tokens == [t[:24] for t in base.tokens] and none.tau == 1.0


def test_forced_replay_commits_the_reference_whatever_the_target_says(smoke_backend: CudaGraphBackend) -> None:
    """Timing-only forced replay: a reference the target would not produce is committed g+1 tokens a round
    (profile 1) or one a round (profile 0), where plain replay of it is refused by verification."""
    be = smoke_backend
    g = be.info.block_size
    base = decode_rounds(be, PROMPTS, max_new_tokens=24, speculative=False)
    vocab = be.info.vocab_size
    fake = [[t[0], *((x + 7) % vocab for x in t[1:])] for t in base.tokens]  # admit's first token is the target's
    width = max(len(p) for p in PROMPTS) + 24 + 2 * g + 3
    ref = replay_reference(PROMPTS, fake, width)
    be.set_replay(ref, np.ones(g, dtype=np.float32), forced=True)
    run = decode_rounds(be, PROMPTS, max_new_tokens=16)
    be.set_replay(ref, np.zeros(g, dtype=np.float32), forced=True)
    slow = decode_rounds(be, PROMPTS, max_new_tokens=16)
    be.set_replay(ref, np.ones(g, dtype=np.float32))
    plain = decode_rounds(be, PROMPTS, max_new_tokens=16)
    be.set_replay(None, None)
    assert run.tokens == slow.tokens == [t[:16] for t in fake]
    assert all(r["accepted"] == g + 1 for rs in run.rounds for r in rs[:-1])
    assert slow.tau == 1.0
    assert plain.tokens == [t[:16] for t in base.tokens] and plain.tau < 1.5  # verification refuses the fake


def _padded_prompts() -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(p) for p in PROMPTS])
    ids = np.zeros((len(PROMPTS), lengths.max()), dtype=np.int64)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = p
    return ids, lengths


def _check_narrow_rounds(be: CudaGraphBackend) -> None:
    """Rounds of chosen verify lengths with drafts replayed from the target's own continuation: every verified
    draft is accepted and every row commits exactly its target-only greedy tokens, at widths 1, 4 and 8."""
    g = be.info.block_size
    base = decode_rounds(be, PROMPTS, max_new_tokens=60, speculative=False)
    be.set_replay(replay_reference(PROMPTS, base.tokens, max(len(p) for p in PROMPTS) + 60 + 2 * g + 3),
                  np.ones(g, dtype=np.float32))
    be.start(3, 128)
    ids, lengths = _padded_prompts()
    prop = be.admit(ids, lengths, np.zeros(3, np.float32), np.arange(3))
    tokens = [[int(t)] for t in prop.next_token]
    for vl in ([0, 0, 0], [1, 0, 2], [7, 3, 0], [3, 3, 3], [2, 7, 1], [1, 2, 3]):
        new = be.round(np.array(vl))
        assert new.accepted.tolist() == vl
        for i in range(3):
            tokens[i] += [*prop.drafts[i, : vl[i]].tolist(), int(new.next_token[i])]
        prop = new
    be.set_replay(None, None)
    assert tokens == [t[: len(tokens[i])] for i, t in enumerate(base.tokens)]
    assert sorted({key[-1] for key in be._rounds}) == [1, 4, 8]


def test_narrow_rounds_verify_as_wide_as_the_longest_length_and_commit_the_same_tokens(
        smoke_backend: CudaGraphBackend) -> None:
    """``narrow_rounds``: a round runs the target over round_width(max ℓ) positions (1, 2, 4 or G+1 = 8: one graph
    each), and every row commits its target-only tokens whatever width its batch chose (_check_narrow_rounds)."""
    be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model, narrow_rounds=True)
    assert be.verifies_widest and not be.verifies_whole_block
    _check_narrow_rounds(be)


def test_capped_replays_verify_at_most_the_cap_in_narrow_rounds_and_commit_the_same_tokens(
        smoke_backend: CudaGraphBackend) -> None:
    """rounds_bench's ``caps`` (fp8_bench --verify-caps): replay b again with policy fixed=K on narrow rounds. Each
    capped run commits the target-only tokens, accepts at most K drafts a round (τ <= K + 1, above 1 with the
    profile's 0.85 first survival), and runs rounds of round_width(K) positions: 2 for K = 1, 4 for K = 3."""
    be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model, narrow_rounds=True)
    res = rounds_bench(be, PROMPTS, max_new_tokens=24, replays=("b",), warmup=False, caps=(1, 3))
    for cap in (1, 3):
        row = res[f"replay_b_cap{cap}"]
        assert row["identical_to_target_only"] == 1.0
        assert 1.0 < row["tau"] <= cap + 1
    assert res["replay_b_cap1"]["tau"] < res["replay_b_cap3"]["tau"]
    assert {2, 4, 8} <= {key[-1] for key in be._rounds}


def test_a_sampling_row_does_not_depend_on_the_round_width(smoke_backend: CudaGraphBackend) -> None:
    """The same verify lengths through whole-block and narrow rounds: every row accepts, draws and drafts the
    same (uniform j tests draft j, uniform G draws the next token, whatever the width)."""
    narrow = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model, narrow_rounds=True)
    ids, lengths = _padded_prompts()
    runs = []
    for be in (smoke_backend, narrow):
        be.start(3, 128)
        out = [be.admit(ids, lengths, np.full(3, 0.9, np.float32), np.array([4, 5, 6]))]
        out += [be.round(np.array(vl)) for vl in ([1, 0, 2], [0, 0, 0], [3, 1, 2], [7, 7, 7])]
        runs.append([(p.accepted.tolist(), p.next_token.tolist(), p.drafts.tolist()) for p in out])
    assert runs[0] == runs[1]


def _check_admission_chunks(be: CudaGraphBackend, prompts: list[list[int]]) -> list[list[int]]:
    """Prompts admitted into a live batch (3, then the rest in one call: chunks of up to ADMIT_ROWS, one graph
    each, copied into rows 3 and on) commit their solo target-only greedy tokens, drafts accepted or not."""
    solo = [decode_rounds(be, [p], max_new_tokens=24, speculative=False).tokens[0] for p in prompts]
    n = len(prompts)
    be.start(n, max(len(p) for p in prompts) + 24 + 2 * be.info.block_size + 3)
    tokens: list[list[int]] = [[] for _ in prompts]
    pending = []
    for rows in (range(3), range(3, n)):
        lengths = np.array([len(prompts[i]) for i in rows])
        ids = np.zeros((len(rows), lengths.max()), dtype=np.int64)
        for j, i in enumerate(rows):
            ids[j, : lengths[j]] = prompts[i]
        first = be.admit(ids, lengths, np.zeros(len(rows), np.float32), np.arange(len(rows)))
        pending += [first.drafts[j] for j in range(len(rows))]
        for j, i in enumerate(rows):
            tokens[i].append(int(first.next_token[j]))
        for _ in range(2):
            live = len(pending)
            out = be.round(np.full(live, be.info.block_size))
            for i in range(live):
                tokens[i] += [*pending[i][: out.accepted[i]].tolist(), int(out.next_token[i])]
            pending = list(out.drafts)
    for i in range(n):
        assert tokens[i] == solo[i][: len(tokens[i])], f"row {i}"
    assert min(len(t) for t in tokens) >= 3
    return solo


def test_admission_in_chunks_into_a_live_batch_commits_the_solo_tokens(smoke_backend: CudaGraphBackend,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the admission step on a scratch cache (11 prompts: chunks of 8 and 1 after 3 live rows), and with a
    scratch too small for the longer prompts (the same step eagerly into the rows): the same tokens."""
    import dspark_compile.targets.torch.cuda_graph_backend as cgb

    prompts = [list(range(5 + i, 12 + 3 * i)) for i in range(11)]  # 7 to 27 tokens
    _check_admission_chunks(CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model), prompts)
    monkeypatch.setattr(cgb, "ADMIT_SLOTS", 24)  # prompts of up to 15 tokens: the others admit eagerly
    be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model)
    _check_admission_chunks(be, prompts)
    widths = {key[1] for key in be._admits}  # at most the scratch's 24 slots less G + 1: 27 tokens had none
    assert widths == {24 - be.info.block_size - 1}


def test_replay_profiles() -> None:
    a, b, c = (survival_profile(n) for n in "abc")
    assert abs(1 + sum(a) - 6.48) < 1e-6 and abs(a[0] - 0.947) < 1e-9 and abs(a[6] - 0.628) < 1e-9
    assert abs(1 + sum(b) - 4.81) < 1e-6
    assert abs(1 + sum(c) - 2.5787) < 1e-3
    cond = conditional_profile(a)
    assert abs(np.prod(cond) - a[-1]) < 1e-9 and all(0 < x <= 1 for x in cond)


@pytest.mark.parametrize("shape", [SMOKE, GEMMA4_SMOKE], ids=["qwen3", "gemma4"])
def test_decisive_pair_decodes_the_same_tokens_in_bf16_and_fp32(shape: object) -> None:
    """The benchmark pair whose acceptance replay must hold under load: bf16 (other kernels, other rounding)
    decodes exactly fp32's greedy tokens, and the untied head makes them a permutation walk, not one token."""
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        target, draft = random_pair(shape, device="cpu", dtype=dtype, decisive=True)
        runs.append(decode_rounds(CudaGraphBackend(target, draft), PROMPTS[:2], max_new_tokens=12,
                                  speculative=False).tokens)
    assert runs[0] == runs[1]
    if shape is SMOKE:
        assert all(len(set(t)) == 12 for t in runs[0])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pair", PAIRS)
def test_round_graphs_reproduce_golden_on_gpu(golden_dir: Path, pair: str) -> None:
    prog = build_program(golden_dir / pair / "target", golden_dir / pair / "draft", device="cuda")
    be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids)
    assert be.graphs and be.program.fused and be.spec_verify == "triton"
    _check_golden(be, golden_dir, pair, "greedy")
    assert be._rounds and all(s.graph is not None for s in be._rounds.values())


@pytest.mark.gpu
@needs_cuda
def test_rounds_queued_behind_the_admission_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The captured round graphs launched behind a queued admission (DSPARK_ADMIT_AHEAD=1) read the admitted rows'
    state in stream order: tokens and rounds equal those launched after admitted(), greedy and sampling, replayed."""
    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16)
    be = CudaGraphBackend(target, draft)
    g = be.info.block_size
    base = decode_rounds(be, PROMPTS, max_new_tokens=48, speculative=False)
    width = max(len(p) for p in PROMPTS) + 48 + 2 * g + 3
    runs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("DSPARK_ADMIT_AHEAD", on)
        be.set_replay(None, None)
        plain = [decode_rounds(be, PROMPTS, max_new_tokens=48, speculative=s, temperature=t, seed=3)
                 for s in (True, False) for t in (0.0, 0.9)]
        be.set_replay(replay_reference(PROMPTS, base.tokens, width), np.full(g, 0.85, dtype=np.float32))
        replayed = decode_rounds(be, PROMPTS, max_new_tokens=48)
        runs[on] = [(r.tokens, r.rounds) for r in (*plain, replayed)]
    be.set_replay(None, None)
    assert runs["0"] == runs["1"]  # the same bits: the same graphs and inputs, only the host's timing moved
    assert runs["1"][2][0] == base.tokens  # target-only greedy, queued behind its admission


@pytest.mark.gpu
@needs_cuda
def test_round_graphs_sampling_and_replay_on_gpu() -> None:
    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16)
    be = CudaGraphBackend(target, draft)
    together = decode_rounds(be, PROMPTS, max_new_tokens=16, temperature=0.9, seed=5)
    alone = decode_rounds(be, PROMPTS[1:2], max_new_tokens=16, temperature=0.9, seed=6)
    assert together.tokens[1] == alone.tokens[0]
    g = be.info.block_size
    base = decode_rounds(be, PROMPTS, max_new_tokens=48, speculative=False)
    width = max(len(p) for p in PROMPTS) + 48 + 2 * g + 3
    be.set_replay(replay_reference(PROMPTS, base.tokens, width), np.zeros(g, dtype=np.float32))
    ref = decode_rounds(be, PROMPTS, max_new_tokens=48)
    be.set_replay(replay_reference(PROMPTS, ref.tokens, width), np.ones(g, dtype=np.float32))
    full = decode_rounds(be, PROMPTS, max_new_tokens=24)
    assert full.tokens == [t[:24] for t in ref.tokens]
    assert all(r["accepted"] == g + 1 for rs in full.rounds for r in rs[:-1])


@pytest.mark.gpu
@needs_cuda
def test_decisive_pair_holds_replayed_acceptance_at_any_batch_on_gpu() -> None:
    """bf16 CUDA graphs: each row's tokens at batch 3 (T = 1 and T = G+1 graphs) equal its batch-1 run, so a
    batch-1 reference replays with the profile's acceptance, not less."""
    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    be = CudaGraphBackend(target, draft)
    g = be.info.block_size
    alone = [decode_rounds(be, [p], max_new_tokens=40, speculative=False).tokens[0] for p in PROMPTS]
    assert decode_rounds(be, PROMPTS, max_new_tokens=40, speculative=False).tokens == alone
    assert decode_rounds(be, PROMPTS, max_new_tokens=40).tokens == alone
    width = max(len(p) for p in PROMPTS) + 40 + 2 * g + 3
    be.set_replay(replay_reference(PROMPTS, alone, width), np.ones(g, dtype=np.float32))
    full = decode_rounds(be, PROMPTS, max_new_tokens=32)
    be.set_replay(None, None)
    assert full.tokens == [t[:32] for t in alone]
    assert all(r["accepted"] == g + 1 for rs in full.rounds for r in rs[:-1])


@pytest.mark.gpu
@needs_cuda
def test_narrow_round_graphs_commit_the_target_tokens_on_gpu() -> None:
    """Narrow rounds captured as CUDA graphs (widths 1, 4 and 8), bf16 on the decisive pair (batch-invariant
    tokens): as on the CPU (_check_narrow_rounds)."""
    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    be = CudaGraphBackend(target, draft, narrow_rounds=True)
    _check_narrow_rounds(be)
    assert be.stats["replays"] > 0


@pytest.mark.gpu
@needs_cuda
def test_admission_graphs_commit_the_solo_tokens_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission graphs captured in bf16 on the decisive pair (batch-invariant tokens): as on the CPU, and the
    same tokens as eager admission."""
    import dspark_compile.targets.torch.cuda_graph_backend as cgb

    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    # 3 rows, then 25 in one call: chunks of 8, 8, 8 and 1, three of them through one graph whose inputs' pinned
    # twins are reused while earlier copies may still be queued (_Step.load).
    prompts = [list(range(5 + i, 12 + i + 3 * (i % 7))) for i in range(28)]  # 7 to 25 tokens
    be = CudaGraphBackend(target, draft)
    solo = _check_admission_chunks(be, prompts)
    assert be._admits and all(s.graph is not None for s in be._admits.values())
    monkeypatch.setattr(cgb, "ADMIT_SLOTS", 0)  # no scratch: every prompt prefills eagerly into its rows
    eager = CudaGraphBackend(target, draft)
    assert _check_admission_chunks(eager, prompts) == solo and not eager._admits


def test_replay_reference_follows_rows_through_select(smoke_backend: CudaGraphBackend) -> None:
    """A row that stops early (EOS) leaves the batch; the others keep replaying their own reference."""
    g = smoke_backend.info.block_size
    base = decode_rounds(smoke_backend, PROMPTS, max_new_tokens=60, speculative=False)
    be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model, eos_token_ids=(base.tokens[0][9],))
    plain = decode_rounds(be, PROMPTS, max_new_tokens=40, speculative=False)
    assert len(plain.tokens[0]) < 40 and len(plain.tokens[2]) == 40, "row 0 must stop early"
    width = max(len(p) for p in PROMPTS) + 40 + 2 * g + 3
    be.set_replay(replay_reference(PROMPTS, base.tokens, width), np.ones(g, dtype=np.float32))
    for _ in range(2):  # the second run starts from the reference as given, not as the first run left it
        run = decode_rounds(be, PROMPTS, max_new_tokens=40)
        assert run.tokens == plain.tokens
        assert all(r["accepted"] == g + 1 for rs in run.rounds[1:] for r in rs[:-1])


# ------------------------------------------------------------------------ rounds that draft nothing (draft_rows)
def _trained_pair(golden_dir: Path, name: str = "dspark_tiny") -> tuple[Any, list[list[int]]]:
    """A golden pair and three of its prompts (dspark_tiny drafts the second well: τ 3.7 in its trace)."""
    pair = golden_dir / name
    gold = json.loads((pair / "decode_greedy.json").read_text())["baseline"]
    return build_program(pair / "target", pair / "draft"), [gold[i]["prompt"] for i in (1, 3, 0)]


@pytest.mark.parametrize("pair", ["dspark_tiny", "dspark_tiny_gemma4"])
def test_a_plain_round_writes_the_context_a_drafting_round_writes(golden_dir: Path, pair: str) -> None:
    """``round(..., draft=False)``: one position per row, nothing verified, drafts reported −1, and the draft's
    cache written by ``DSparkDraft.write_context`` alone. After three such rounds a drafting round proposes what
    it proposes after four drafting rounds that verified nothing (the same committed tokens): the same drafts and
    confidences (float32, within 1e-4, as the golden traces), and the same context entries in the draft's cache
    (within 1e-5: a product over one row, not eight, rounds differently). Qwen3 and Gemma4 drafts."""
    prog, prompts = _trained_pair(golden_dir, pair)
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((3, lengths.max()), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    runs = []
    for plain in (True, False):
        be = CudaGraphBackend(prog.target, prog.draft)
        be.start(3, 128)
        out = [be.admit(ids, lengths, np.zeros(3, np.float32), np.arange(3))]
        for _ in range(3):
            out.append(be.round(np.zeros(3, np.int64), draft=not plain))
            assert out[-1].accepted.tolist() == [0, 0, 0]
            assert (out[-1].drafts == -1).all() == plain and (out[-1].drafts >= 0).all() != plain
        out.append(be.round(np.zeros(3, np.int64)))
        st = be._state.view(3)
        assert st["draft_len"].tolist() == st["length"].tolist()  # the context caught up with every commit
        kv = [be._draft_kv[:, :, r, :, : int(st["draft_len"][r])] for r in range(3)]
        runs.append((out, kv, {key[-2:] for key in be._rounds}))
    (a, kv_a, keys_a), (b, kv_b, keys_b) = runs
    assert keys_a == {(True, 1), (False, 8)} and keys_b == {(False, 8)}
    assert [p.next_token.tolist() for p in a] == [p.next_token.tolist() for p in b]  # target greedy both ways
    assert a[-1].drafts.tolist() == b[-1].drafts.tolist()
    np.testing.assert_allclose(a[-1].confidence_logits, b[-1].confidence_logits, atol=1e-4)
    for x, y in zip(kv_a, kv_b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_rounds_over_draft_rows_decode_plainly_and_speculation_resumes_below_it(golden_dir: Path) -> None:
    """VerifyPolicy(draft_rows=2) on three rows, the trained pair: while three rows are live every round verifies
    nothing (one token a round); once a row ends (an EOS) the other two speculate again (drafts accepted). Every
    row's tokens equal target-only greedy decoding, with rounds launched ahead and without."""
    prog, prompts = _trained_pair(golden_dir)
    base = decode_rounds(CudaGraphBackend(prog.target, prog.draft), prompts, max_new_tokens=40, speculative=False)
    eos = base.tokens[0][5]
    for ahead in (1, 2):
        be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=(eos,))
        be.rounds_in_flight = ahead
        want = decode_rounds(be, prompts, max_new_tokens=40, speculative=False)
        run = decode_rounds(be, prompts, max_new_tokens=40, policy=VerifyPolicy(draft_rows=2))
        assert run.tokens == want.tokens
        ended = len(run.rounds[0])  # row 0 ends at its EOS: the rounds until then had three live rows
        for rows in (run.rounds[1], run.rounds[2]):
            # plain until row 0 is dropped (a round launched behind its last one runs with three rows too)
            plain = [r["draft"] == [] and r["accepted"] == 1 for r in rows]
            assert all(plain[: ended + ahead - 1]) and not all(plain)
        later = run.rounds[1][ended + ahead :]  # the pair drafts row 1 well: τ 3.7 in its golden trace
        assert sum(r["accepted"] for r in later) > 2 * len(later), [r["accepted"] for r in later]
        assert {key[-2:] for key in be._rounds} >= {(True, 1), (False, 8)}


def test_draft_rows_zero_never_drafts_and_a_backend_without_plain_rounds_refuses_it(
        smoke_backend: CudaGraphBackend) -> None:
    """draft_rows=0: every round of ``generate`` is a plain step, its tokens those of rounds that draft and verify
    nothing (``fixed=0``), greedy (also target-only's) and sampling (uniform G draws the next token whatever the
    round's width). A backend without ``takes_plain_rounds`` refuses the policy with one error; a negative count is
    a usage error."""
    from dspark_compile.errors import UsageError
    from dspark_compile.runtime.backend import Proposal

    be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model)
    for temp in (0.0, 0.9):
        want = decode_rounds(be, PROMPTS, max_new_tokens=12, temperature=temp, seed=3, policy=VerifyPolicy(cap=0))
        if temp == 0:
            assert decode_rounds(be, PROMPTS, max_new_tokens=12, speculative=False).tokens == want.tokens
        params = GenerationParams(max_new_tokens=12, temperature=temp, seed=3, policy=VerifyPolicy(draft_rows=0))
        plain_be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model)
        res = generate(plain_be, PROMPTS, params, seeds=[3, 4, 5])
        assert [r.tokens for r in res] == want.tokens, temp
        # the reference evaluator's accounting: rounds while generated <= 12, the first token from admission
        assert all(r["draft"] == [] for x in res for r in x.rounds) and all(len(x.rounds) == 12 for x in res)
        assert {key[-2:] for key in plain_be._rounds} == {(True, 1)}
    with pytest.raises(UsageError, match="Proposal takes no plain rounds"):  # any object without the attribute
        VerifyPolicy(draft_rows=1).check_backend(Proposal(*([np.zeros(0)] * 4)))
    with pytest.raises(UsageError, match=r"--draft-rows \(draft_rows\) must be a number of rows >= 0"):
        VerifyPolicy(draft_rows=-1)


def test_the_graph_executor_takes_plain_rounds(golden_dir: Path) -> None:
    """The graph executor (the PyTorch reference transport): a plain round verifies the anchor alone and drafts
    nothing (its taps wait for a later draft call). With draft_rows=0 the golden pair's greedy output is the target's
    (its golden baseline), and greedy or sampled, every round commits what a round that drafts and verifies nothing
    (fixed=0) commits."""
    from dspark_compile.runtime.torch_backend import TorchBackend

    pair = golden_dir / "dspark_tiny"
    be = TorchBackend.from_pair(pair / "target", pair / "draft")
    gold = json.loads((pair / "decode_greedy.json").read_text())["baseline"]
    prompts = [g["prompt"] for g in gold]
    res = generate(be, prompts, GenerationParams(max_new_tokens=24, policy=VerifyPolicy(draft_rows=0)))
    assert [r.tokens for r in res] == [g["tokens"][:24] for g in gold]
    assert all(r["draft"] == [] for x in res for r in x.rounds)
    for temp in (0.0, 0.9):
        runs = [generate(be, prompts, GenerationParams(max_new_tokens=16, temperature=temp, seed=2, policy=policy))
                for policy in (VerifyPolicy(draft_rows=0), VerifyPolicy(cap=0))]
        assert [r.tokens for r in runs[0]] == [r.tokens for r in runs[1]], temp


def test_rounds_bench_times_rounds_that_draft_nothing(smoke_backend: CudaGraphBackend) -> None:
    """rounds_bench(plain=True) (fp8_bench --plain-rounds): the rounds of draft_rows=0 commit target-only's tokens,
    one a round (τ 1), through width-1 graphs that draft nothing."""
    be = CudaGraphBackend(smoke_backend.target_model, smoke_backend.draft_model)
    res = rounds_bench(be, PROMPTS, max_new_tokens=12, replays=(), warmup=False, plain=True)
    row = res["plain_rounds"]
    assert row["identical_to_target_only"] == 1.0 and row["tau"] == 1.0 and row["rounds"] == 12
    assert (True, 1) in {key[-2:] for key in be._rounds}


@pytest.mark.gpu
@needs_cuda
def test_round_graphs_that_draft_nothing_on_gpu() -> None:
    """Captured rounds that draft nothing (the fused ``draft_context``), bf16 on the decisive pair (batch-invariant
    greedy tokens): draft_rows=0 commits target-only's greedy tokens; after three such rounds a drafting round
    proposes what it proposes after drafting rounds that verified nothing, up to bf16's rounding (the target's taps
    and the draft's context come from products of other row counts: at least 90 % of the draft tokens equal; with
    no context written they would not be); and with draft_rows=2 over three rows (one ending at an EOS) every row's
    tokens are target-only's and the other two verify drafts again. Sampling's exact equality with fixed=0 rounds
    is the CPU test's (the same code in float32)."""
    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    be = CudaGraphBackend(target, draft)
    want = decode_rounds(be, PROMPTS, max_new_tokens=24, speculative=False)
    got = decode_rounds(be, PROMPTS, max_new_tokens=24, policy=VerifyPolicy(draft_rows=0))
    assert got.tokens == want.tokens
    ids, lengths = _padded_prompts()
    drafts = []
    for plain in (True, False):
        be.start(3, 128)
        be.admit(ids, lengths, np.zeros(3, np.float32), np.arange(3))
        for _ in range(3):
            be.round(np.zeros(3, np.int64), draft=not plain)
        drafts.append(be.round(np.zeros(3, np.int64)).drafts)
    assert (drafts[0] == drafts[1]).mean() >= 0.9, drafts
    base = decode_rounds(be, PROMPTS, max_new_tokens=40, speculative=False)
    eos = CudaGraphBackend(target, draft, eos_token_ids=(base.tokens[0][5],))
    want = decode_rounds(eos, PROMPTS, max_new_tokens=40, speculative=False)
    run = decode_rounds(eos, PROMPTS, max_new_tokens=40, policy=VerifyPolicy(draft_rows=2))
    assert run.tokens == want.tokens
    assert any(r["draft"] for r in run.rounds[1]), "speculation resumed (the random pair accepts few drafts)"
    assert eos.stats["replays"] > 0 and any(key[-2:] == (True, 1) for key in eos._rounds)
