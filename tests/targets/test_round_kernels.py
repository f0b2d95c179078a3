"""round_kernels: a round's bookkeeping in a few launches, the same bits as the torch ops it replaces.

Through the Triton interpreter on the CPU (a subprocess: TRITON_INTERPRET must be set before Triton is imported):
- each kernel against the torch expressions it replaces, on random rows (dead rows, clamped lengths, replay cuts);
- rounds of the fused program with the kernels against the same program with torch ops: tokens, drafts,
  acceptance, confidences and the device state all equal, greedy, sampling and replayed, and rounds that draft
  nothing (the fused ``draft_context``), whose context a drafting round then reads as it reads its own;
- the launches a greedy or sampling round issues besides the model's (the embeddings only): counted with a
  TorchDispatchMode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

KERNELS_SCRIPT = r"""
import sys
import torch
from dspark_compile.runtime.sampling import counter_uniforms
from dspark_compile.targets.torch import round_kernels as rk

torch.manual_seed(0)
for rows, g, width in ((1, 7, 8), (5, 7, 4), (3, 3, 1), (9, 15, 16)):
    anchor = torch.randint(0, 1000, (rows,))
    drafts = torch.randint(0, 1000, (rows, g))
    vin = torch.randint(-3, g + 5, (rows,))
    live = torch.rand(rows) < 0.7
    tokens, vlen = rk.round_inputs(anchor, drafts, vin, live, width)
    assert torch.equal(tokens, torch.cat((anchor[:, None], drafts[:, : width - 1]), dim=1)), (rows, g, width)
    assert torch.equal(vlen, torch.where(live, vin.clamp(0, width - 1), 0)), (vin, vlen)

    length = torch.randint(0, 500, (rows,))
    pos, limit = rk.positions(length, width)
    want = length[:, None] + torch.arange(width)
    assert torch.equal(pos, want) and torch.equal(limit, want + 1)

    c = g + 1
    count = torch.randint(0, c + 1, (rows,))
    ids, dpos, slots, dlimit = rk.draft_inputs(anchor, count, length, c, g, 77)
    ctx_pos = length[:, None] + torch.arange(c)
    blk_pos = (length + count)[:, None] + torch.arange(g)
    want_ids = torch.full((rows, g), 77); want_ids[:, 0] = anchor
    assert torch.equal(ids, want_ids)
    assert torch.equal(dpos, torch.cat((ctx_pos, blk_pos), dim=1))
    assert torch.equal(slots, torch.cat((torch.where(torch.arange(c) < count[:, None], ctx_pos, -1), blk_pos), 1))
    assert torch.equal(dlimit, (length + count + g)[:, None].expand(rows, g))
    _, cpos, cslots, _ = rk.draft_inputs(None, count, length, c, 0, 77)  # the context rows only: no anchor read
    assert torch.equal(cpos, ctx_pos) and torch.equal(cslots, slots[:, :c]), "context only"

    acc = torch.randint(0, g + 1, (rows,)); nxt = torch.randint(0, 1000, (rows,))
    state = [torch.randint(0, 100, (rows,)) for _ in range(4)]  # length, anchor, counter, count
    ref_state = [t.clone() for t in state]
    rk.commit(acc, nxt, live, *state, g + 2)
    step = torch.where(live, acc + 1, 0)
    ref_state[0] += step; ref_state[1].copy_(nxt); ref_state[2] += torch.where(live, g + 2, 0); ref_state[3].copy_(step)
    assert all(torch.equal(a, b) for a, b in zip(state, ref_state)), "commit"

    conf = torch.randn(rows, g)
    for replay in (False, True):
        new = torch.randint(0, 1000, (rows, g))
        dl, pend = torch.randint(0, 100, (rows,)), torch.zeros(rows, g, dtype=torch.int64)
        dl0 = dl.clone()
        seed, ctr = torch.randint(-2**40, 2**40, (rows,)), torch.randint(0, 2**20, (rows,))
        ref = torch.randint(0, 1000, (rows, 64)); prof = torch.rand(g)
        args = (length, seed, ctr, ref, prof, 1000, 0x5EED) if replay else None
        out = rk.finish(acc, nxt, step, dl, new, pend, conf, replay=args)
        want_new = new
        if replay:  # CudaGraphBackend._replayed's ops
            at = (length[:, None] + 1 + torch.arange(g)).clamp(max=63)
            right = ref.gather(1, at)
            kept = torch.cumprod((counter_uniforms(seed ^ 0x5EED, ctr, g) < prof).to(torch.int64), 1).bool()
            want_new = torch.where(kept, right, (right + 1) % 1000)
            assert 0 < kept.sum() < kept.numel() or rows == 1, "the cut is exercised"
        assert torch.equal(pend, want_new) and torch.equal(dl, dl0 + step), replay
        want = torch.cat((torch.cat((acc[:, None], nxt[:, None], want_new), 1).to(torch.float32), conf), 1)
        assert torch.equal(out, want), replay
    pend = torch.arange(rows * g).view(rows, g); pend0, dl0 = pend.clone(), dl.clone()  # no draw: the seed's cuts stay
    out = rk.finish(acc, nxt, step, dl, None, pend, torch.zeros(rows, g), plain=True)  # a round that drafted nothing
    assert torch.equal(pend, pend0) and torch.equal(dl, dl0 + step), "plain: the drafts stay, the context grew"
    want = torch.cat((acc[:, None].float(), nxt[:, None].float(), torch.full((rows, g), -1.0), torch.zeros(rows, g)), 1)
    assert torch.equal(out, want), "plain"
    out = rk.finish(acc, nxt, step, dl, None, torch.zeros(rows, 0, dtype=torch.int64), torch.zeros(rows, 0))
    assert torch.equal(out, torch.stack((acc, nxt), 1).to(torch.float32)), "target-only"
# the draft's q|k|v rows in one buffer: each layer's norm writes its block rows after the context rows
from dspark_compile.targets.torch.kernels import add_rmsnorm
x, w, buf = torch.randn(6, 64), torch.randn(64), torch.zeros(2, 5, 64)
plain = add_rmsnorm(x.clone(), None, w, 1e-6)
into = add_rmsnorm(x.clone(), None, w, 1e-6, out=buf[:, 2:])
assert into.data_ptr() == buf[:, 2:].data_ptr() and torch.equal(buf[:, 2:].reshape(6, 64), plain)
assert not buf[:, :2].any(), "rows outside the slice written"
print("round kernels ok")
"""

ROUNDS_SCRIPT = r"""
import collections, sys, traceback
from pathlib import Path
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from dspark_compile.program import build_program
from dspark_compile.targets.torch import CudaGraphBackend, cuda_graph_backend
from dspark_compile.targets.torch.bench import decode_rounds, replay_reference

cuda_graph_backend.ADMIT_SLOTS = 0  # prompts prefilled as they are: the interpreter's time goes to the rounds
pair = Path(sys.argv[1])
prog = build_program(pair / "target", pair / "draft")
prompts = [[7, 8, 9, 100, 5, 6, 200, 12, 13]]  # one row: the kernels' other rows are the unit test's
backends = [CudaGraphBackend(prog.target, prog.draft, fused=True, attention="triton", spec_verify="triton",
                             fused_bookkeeping=k) for k in (False, True)]
runs = []
for be in backends:
    greedy = decode_rounds(be, prompts, max_new_tokens=8)
    sampled = decode_rounds(be, prompts, max_new_tokens=6, temperature=0.8, seed=4)
    reference = replay_reference(prompts, greedy.tokens, 64)  # greedy speculative = target-only (lossless)
    be.set_replay(reference, np.array([0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2][: be.info.block_size], dtype=np.float32))
    replayed = decode_rounds(be, prompts, max_new_tokens=8)
    be.set_replay(None, None)
    state = {k: t.clone() for k, t in be._state.view(1).items()}
    runs.append((greedy, sampled, replayed, state))
for (a, b, name) in zip(runs[0][:3], runs[1][:3], ("greedy", "sampling", "replay")):
    assert a.tokens == b.tokens and a.rounds == b.rounds, name  # confidences too: the same floats

# rounds that draft nothing (VerifyPolicy.draft_rows): the fused draft_context, then a drafting round, proposes what
# a drafting round proposes after rounds that drafted and verified nothing; the same bits with kernels or torch ops
from dspark_compile.runtime.decode import VerifyPolicy
for be in backends:
    plain = decode_rounds(be, prompts, max_new_tokens=4, policy=VerifyPolicy(draft_rows=0))
    assert plain.tokens == [t[:4] for t in runs[0][0].tokens], "plain rounds: target greedy"
ids, lens = np.array(prompts), np.array([len(prompts[0])])
proposals = []
for be in backends:
    for draft in (False, True):
        be.start(1, 64)
        be.admit(ids, lens, np.zeros(1, np.float32), np.array([1]))
        for _ in range(2):
            be.round(np.zeros(1, np.int64), draft=draft)
        proposals.append(be.round(np.zeros(1, np.int64)))
assert all(p.drafts.tolist() == proposals[1].drafts.tolist() for p in proposals), [p.drafts for p in proposals]
assert all(np.abs(p.confidence_logits - proposals[1].confidence_logits).max() < 1e-4 for p in proposals)
assert proposals[0].confidence_logits.tolist() == proposals[2].confidence_logits.tolist(), "kernels = torch ops"
assert all(torch.equal(runs[0][3][k], runs[1][3][k]) for k in runs[0][3]), "device state"
assert any(r["accepted"] < len(r["draft"]) for rr in runs[1][2].rounds for r in rr), "a replay cut was taken"

SKIP = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "expand", "slice", "select", "as_strided", "alias",
        "detach", "permute", "squeeze", "_reshape_alias", "reshape", "empty", "new_empty", "empty_like",
        "empty_strided", "linear"}

class Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        same = name in ("to", "contiguous") and out.data_ptr() == args[0].data_ptr()  # no copy: no launch
        stack = traceback.extract_stack()
        in_graph = any(f.name == "fn" and "dspark_compile" in f.filename for f in stack)  # the round's function
        # the uniforms' torch ops are the CPU's stand-in for one kernel (kernels.counter_uniforms) on a GPU
        uniforms = any(f.name == "counter_uniforms" and f.filename.endswith("sampling.py") for f in stack)
        if name not in SKIP and not same and in_graph and not uniforms and not any("/triton/" in f.filename
                                                                                    for f in stack):
            self.ops[name] += 1
        return out

be = backends[1]
for temperature in (0.0, 0.8):  # greedy, then sampling (kernels.markov_sample)
    be.start(1, 64)
    be.admit(np.array([prompts[0]]), np.array([len(prompts[0])]), np.full(1, temperature, np.float32),
             np.array([1]))
    g = be.info.block_size
    be.round(np.full(1, g))
    count = Launches()
    with count:
        be.round(np.full(1, g))
    print("round ops", temperature, dict(count.ops))
    # what is left besides the model's kernels and products: the two embeddings
    assert dict(count.ops) == {"embedding": 2}, (temperature, dict(count.ops))
print("rounds ok")
"""


def test_round_kernels_give_the_torch_ops_bits(triton_interpreter: Any, golden_dir: Path) -> None:
    proc = triton_interpreter(KERNELS_SCRIPT, golden_dir, 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round kernels ok" in proc.stdout


@pytest.mark.slow  # the Triton interpreter runs every kernel of the fused program on the CPU
def test_rounds_with_round_kernels_equal_rounds_with_torch_ops(triton_interpreter: Any, golden_dir: Path) -> None:
    proc = triton_interpreter(ROUNDS_SCRIPT, golden_dir / "dspark_tiny", 1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rounds ok" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_round_graphs_with_round_kernels_equal_round_graphs_with_torch_ops_on_gpu() -> None:
    """Captured round graphs in bf16 (the smoke shape, 3 rows), greedy, sampling and replayed: the kernels and the
    torch ops give the same tokens, drafts, acceptance and confidences."""
    import numpy as np
    import torch

    from dspark_compile.targets.torch import CudaGraphBackend
    from dspark_compile.targets.torch.bench import SMOKE, decode_rounds, random_pair, replay_reference

    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    prompts = [list(range(3, 23)), list(range(100, 133)), [7, 8, 9, 1000, 5, 6, 2047, 12, 13]]
    runs = []
    for kernels in (False, True):
        be = CudaGraphBackend(target, draft, fused_bookkeeping=kernels)
        greedy = decode_rounds(be, prompts, max_new_tokens=24)
        sampled = decode_rounds(be, prompts, max_new_tokens=16, temperature=0.8, seed=4)
        be.set_replay(replay_reference(prompts, greedy.tokens, 96), np.linspace(0.9, 0.3, be.info.block_size,
                                                                               dtype=np.float32))
        replayed = decode_rounds(be, prompts, max_new_tokens=24)
        assert be.stats["replays"] > 0
        runs.append([(r.tokens, r.rounds) for r in (greedy, sampled, replayed)])
    assert runs[0] == runs[1]
