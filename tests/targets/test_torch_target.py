"""The torch target (dspark_compile/targets/torch): CudaGraphBackend, its kernels and its benchmark.

On the CPU: the fallback of ``CudaGraphBackend.create`` decodes the golden pairs exactly; the static-cache code
(in-place writes, attention windows, padded batch buckets, rows leaving the batch) run eagerly equals the
TorchBackend reference, greedy and sampling; the fused Triton kernels and fused layers, through Triton's
interpreter, equal the module ops; the benchmark's bookkeeping against hand-computed numbers; gpu_bench.py
imports without click/rich, answers --help and runs its smoke configuration end to end; the CLI command.
On a GPU (marker ``gpu``): CUDA graphs equal TorchBackend on the golden pairs and on a random pair at batch 3.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dspark_compile.errors import BackendUnavailableError
from dspark_compile.program import build_program
from dspark_compile.runtime.decode import GenerationParams, GenerationResult, VerifyPolicy, generate
from dspark_compile.runtime.torch_backend import TorchBackend
from dspark_compile.targets.torch import CudaGraphBackend, attention_window, batch_bucket, slot_capacity
from dspark_compile.targets.torch.bench import (
    PairShape,
    byte_floor_ms,
    copy_bandwidth,
    draft_read_bytes,
    overhead_ratio,
    random_pair,
    run_bench,
    speedup_over_tau,
    suggest_draft_rows,
    target_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
GPU_BENCH = ROOT / "benchmarks" / "gpu_bench.py"
PAIRS = ("dspark_tiny", "dspark_tiny_random")
MAX_NEW = 48
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def _golden(golden_dir: Path, pair: str) -> dict[str, Any]:
    return json.loads((golden_dir / pair / "decode_greedy.json").read_text())


def _decode(backend: Any, prompts: list[list[int]], **kw: Any) -> list[GenerationResult]:
    return generate(backend, prompts, GenerationParams(**{"max_new_tokens": MAX_NEW, **kw}))


def _same(a: list[GenerationResult], b: list[GenerationResult]) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.tokens == y.tokens, f"prompt {i}: tokens differ"
        assert [r["draft"] for r in x.rounds] == [r["draft"] for r in y.rounds], f"prompt {i}: drafts differ"
        assert [r["accepted"] for r in x.rounds] == [r["accepted"] for r in y.rounds], f"prompt {i}: accepted"


# ------------------------------------------------------------------------------------------------ CPU fallback
@no_cuda
def test_create_falls_back_to_eager_torch_backend_and_decodes_golden(golden_dir: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    for pair in PAIRS:
        with caplog.at_level("WARNING"):
            be = CudaGraphBackend.create(golden_dir / pair / "target", golden_dir / pair / "draft", device="auto")
        assert isinstance(be, TorchBackend)
        assert "no CUDA GPU" in caplog.text
        gold = _golden(golden_dir, pair)["greedy"]
        got = _decode(be, [g["prompt"] for g in gold])
        assert [r.tokens for r in got] == [g["tokens"] for g in gold]
        assert [[x["accepted"] for x in r.rounds] for r in got] == [g["acceptance_lengths"] for g in gold]


@no_cuda
def test_create_with_explicit_cuda_raises_without_gpu(golden_dir: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        CudaGraphBackend.create(golden_dir / "dspark_tiny" / "target", golden_dir / "dspark_tiny" / "draft",
                                device="cuda")


# ------------------------------------------------------------------------------------ static caches, eagerly
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("mode", ["greedy", "threshold_0.5"])
def test_static_cache_path_reproduces_golden(golden_dir: Path, pair: str, mode: str) -> None:
    prog = build_program(golden_dir / pair / "target", golden_dir / pair / "draft")
    be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids)
    assert not be.graphs and be.program.attention == "reference"
    gold = _golden(golden_dir, pair)[mode]
    policy = VerifyPolicy("threshold", threshold=0.5) if mode != "greedy" else VerifyPolicy()
    got = _decode(be, [g["prompt"] for g in gold], policy=policy)
    worst = 0.0
    for r, g in zip(got, gold, strict=True):
        assert r.tokens == g["tokens"]
        assert [x["accepted"] for x in r.rounds] == g["acceptance_lengths"]
        assert [x["draft"] for x in r.rounds] == [y["draft"] for y in g["rounds"]]
        for x, y in zip(r.rounds, g["rounds"], strict=True):
            want = y["confidence_logits"] or []
            assert len(x["confidence_logits"]) == len(want)
            worst = max([worst, *(abs(a - b) for a, b in zip(x["confidence_logits"], want, strict=True))])
    assert worst < 1e-4
    assert be._alloc[0] == 4  # 4 prompts: bucket 4


def test_static_cache_path_equals_torch_backend_batch3(make_pair: Any) -> None:
    """Batch 3 runs in bucket 4 (one padding row); greedy and sampling; EOS makes rows leave the batch."""
    target_dir, draft_dir = make_pair(seed=3)
    prompts = [[5, 9, 17, 33, 2], list(range(40, 71)), [300, 301, 302, 7, 7, 7, 12, 99]]
    ref = TorchBackend.from_pair(target_dir, draft_dir)
    prog = build_program(target_dir, draft_dir)
    be = CudaGraphBackend(prog.target, prog.draft)
    for kw in ({}, {"temperature": 0.8, "seed": 11}):
        _same(_decode(be, prompts, **kw), _decode(ref, prompts, **kw))
    assert be._alloc[0] == 4
    # An EOS from the middle of one continuation: that row finishes early and select() compacts the caches.
    baseline = _decode(ref, prompts)
    eos = baseline[1].tokens[5]
    ref_eos = TorchBackend(ref.target_model, ref.draft_model, eos_token_ids=(eos,))
    be_eos = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=(eos,))
    a, b = _decode(be_eos, prompts), _decode(ref_eos, prompts)
    _same(a, b)
    assert len({len(r.tokens) for r in a}) > 1, "no row finished early: select() was not exercised"


def test_wide_context_draft_runs_eagerly_then_graph_shapes_are_reused(golden_dir: Path) -> None:
    prog = build_program(golden_dir / "dspark_tiny" / "target", golden_dir / "dspark_tiny" / "draft")
    be = CudaGraphBackend(prog.target, prog.draft)
    gold = _golden(golden_dir, "dspark_tiny")["greedy"]
    _decode(be, [gold[3]["prompt"]])
    # The wide first context is drafted eagerly at admit; then one round graph per (rows, window, greedy/
    # sampling, replay, G, plain, width): one window bucket for this short decode, every round drafting, G + 1 wide.
    assert list(be._rounds) == [(1, be._rounds and next(iter(be._rounds))[1], False, False, 7, False, 8)]
    assert be.stats["eager_calls"] > 1 and not be._steps


# ---------------------------------------------------------------------------------- fused kernels (interpreter)
INTERPRET_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from torch.nn import functional as F
    from dspark_compile.model_config import RopeConfig
    from dspark_compile.models.layers import RMSNorm, RotaryEmbedding, apply_rope
    from dspark_compile.program import build_program
    from dspark_compile.models.layers import Fp8Linear, attend
    from dspark_compile.targets.torch.kernels import (add_rmsnorm, decode_attention, markov_greedy, qk_norm_rope,
                                                      silu_mul)
    from dspark_compile.targets.torch.static_forward import StaticProgram

    torch.manual_seed(0)
    def close(name, a, b, tol=2e-5):  # float32 sums in other orders: 2e-5 of the values' scale (at least 1)
        err, scale = (a.float() - b.float()).abs().max().item(), max(1.0, b.float().abs().max().item())
        assert err < tol * scale, f"{name}: max abs error {err} at scale {scale}"

    m, h = 5, 96
    x, d = torch.randn(m, h), torch.randn(m, h)
    norm = RMSNorm(h, 1e-6)
    norm.weight.data = 1 + 0.1 * torch.randn(h)
    xx, tap = x.clone(), torch.zeros(m, 3 * h)
    out = add_rmsnorm(xx, d, norm.weight.data, 1e-6, tap[:, h:2 * h])
    close("add_rmsnorm", out, norm(x + d)); close("residual", xx, x + d); close("tap", tap[:, h:2 * h], x + d)
    assert not tap[:, :h].any() and not tap[:, 2 * h:].any()
    gu = torch.randn(m, 2 * h)
    close("silu_mul", silu_mul(gu), F.silu(gu[:, :h]) * gu[:, h:])

    b, t, hq, kv, dh, s = 2, 3, 4, 2, 32, 64
    qkv = torch.randn(b * t, (hq + 2 * kv) * dh)
    pos = torch.tensor([[0, 1, 2], [40, 41, 42]])
    slots = pos.clone(); slots[1, 0] = -1  # a row whose k/v must not be written
    cos, sin = RotaryEmbedding(dh, RopeConfig(1e6))(pos, torch.float32)
    w = 1 + 0.1 * torch.randn(dh)
    q, kc, vc = torch.zeros(b, hq, t - 1, dh), torch.zeros(b, kv, s, dh), torch.zeros(b, kv, s, dh)
    qk_norm_rope(qkv, cos.reshape(b * t, dh), sin.reshape(b * t, dh), slots.reshape(-1), w, w, 1e-6, q, kc, vc,
                 rows=t, q_start=1)
    n = RMSNorm(dh, 1e-6); n.weight.data = w
    xv = qkv.view(b, t, -1)
    q_ref = apply_rope(n(xv[..., :hq * dh].view(b, t, hq, dh)).transpose(1, 2), cos, sin)
    k_ref = apply_rope(n(xv[..., hq * dh:(hq + kv) * dh].view(b, t, kv, dh)).transpose(1, 2), cos, sin)
    v_ref = xv[..., (hq + kv) * dh:].view(b, t, kv, dh).transpose(1, 2)
    close("q (query rows only)", q, q_ref[:, :, 1:])
    for bi in range(b):
        for ti in range(t):
            if slots[bi, ti] >= 0:
                close("k", kc[bi, :, pos[bi, ti]], k_ref[bi, :, ti])
                close("v", vc[bi, :, pos[bi, ti]], v_ref[bi, :, ti])
    assert not kc[1, :, 40].any() and not vc[1, :, 40].any(), "slot -1 was written"

    for bsz, hq, kvh, t, dh, w in ((2, 4, 2, 3, 16, 256), (1, 8, 2, 8, 32, 512), (3, 4, 4, 1, 64, 100)):
        q, kc, vc = torch.randn(bsz, hq, t, dh), torch.randn(bsz, kvh, w + 40, dh), torch.randn(bsz, kvh, w + 40, dh)
        limit = torch.randint(1, w + 1, (bsz, t))
        mask = (torch.arange(w).view(1, 1, w) < limit.unsqueeze(-1)).unsqueeze(1)
        out = decode_attention(q, kc[:, :, :w], vc[:, :, :w], limit, 0.3).transpose(1, 2).reshape(bsz, t, -1)
        close("decode_attention", out, attend(q, kc[:, :, :w], vc[:, :, :w], mask, 0.3))
        two_tiles = decode_attention(q, kc[:, :, :w], vc[:, :, :w], limit, 0.3, chunk=128)  # two key tiles a split
        close("decode_attention, 128-slot splits", two_tiles.transpose(1, 2).reshape(bsz, t, -1), out)
        tokens = decode_attention(q, kc[:, :, :w], vc[:, :, :w], limit, 0.3, token_major=True)
        assert tokens.is_contiguous() and torch.equal(tokens.view(bsz, t, -1), out), "token-major layout"

    golden = Path(sys.argv[1])
    for attention in ("sdpa", "reference", "triton"):
        ref = build_program(golden / "target", golden / "draft")
        fus = build_program(golden / "target", golden / "draft")
        pr = StaticProgram(ref.target, ref.draft, fused=False, attention="reference")
        pf = StaticProgram(fus.target, fus.draft, fused=True, attention=attention)
        ids = torch.randint(0, 384, (3, 5)); cl = torch.tensor([0, 7, 30])
        k1 = ref.target.new_cache(3, 256); k2 = k1.clone()
        (h1, t1), (h2, t2) = pr.target_step(ids, cl, k1, 128), pf.target_step(ids, cl, k2, 128)
        close("target hidden", h1, h2); close("target taps", t1, t2); close("target cache", k1, k2)
        taps = torch.randn(3, 8, 192); count = torch.tensor([8, 3, 1]); dl = torch.tensor([0, 5, 20])
        d1 = ref.draft.new_cache(3, 256); d2 = d1.clone()
        anchor = torch.tensor([4, 5, 6])
        g1, g2 = pr.draft_step(anchor, taps, count, dl, d1, 128), pf.draft_step(anchor, taps, count, dl, d2, 128)
        close("draft hidden", g1, g2)
        for row, c in enumerate(count.tolist()):  # committed context slots agree (block slots are scratch)
            close("draft cache", d1[:, :, row, :, : dl[row] + c], d2[:, :, row, :, : dl[row] + c])
        # greedy Markov sampling: the module's loop against markov_greedy (one kernel per position)
        (t1, c1, _), (t2, c2, p2) = (p.propose(g1, anchor, None, None, distributions=False) for p in (pr, pf))
        assert torch.equal(t1, t2) and p2.shape == (3, 7, 0), (t1, t2)
        close("confidence logits", c1, c2)
    for p in (ref, fus):  # --quantize-draft's W2 (e4m3, per-channel scales) through the kernel
        p.draft.markov_head.markov_w2 = Fp8Linear.quantize(p.draft.markov_head.markov_w2)
    (t1, c1, _), (t2, c2, _) = (p.propose(g1, anchor, None, None, distributions=False) for p in (pr, pf))
    assert torch.equal(t1, t2), ("e4m3 W2", t1, t2)
    close("confidence logits, e4m3 W2", c1, c2)
    # first maximum on ties, as argmax: logits 1 at columns 300 and 70 of every position, no transition bias
    h = torch.randn(2, 7, 64); w1 = torch.randn(384, 16); base = torch.zeros(2, 7, 384); base[..., [70, 300]] = 1
    tok, conf = markov_greedy(base, h, torch.tensor([5, 9]), w1, torch.zeros(384, 16), None, None, False)
    assert tok.eq(70).all() and not conf.any()
    base = torch.zeros(16, 1, 33000); base[..., [100, 32900]] = 1  # the second past 256 blocks of 128: at 16 rows
    tok, _ = markov_greedy(base, torch.randn(16, 1, 64), torch.arange(16), torch.randn(33000, 16),
                           torch.zeros(33000, 16), None, None, False, block_v=128)  # the final reduction's 2nd chunk
    assert tok.eq(100).all(), tok
    w1, w2, base = torch.randn(384, 32), torch.randn(384, 32) * 0.3, torch.randn(2, 7, 384)  # W2 steps of 16 or 32
    runs = [markov_greedy(base, h, torch.tensor([5, 9]), w1, w2, None, None, False, block_r=r)[0] for r in (16, 32)]
    prev, want = torch.tensor([5, 9]), []
    for k in range(7):  # the module's loop in float32
        prev = (base[:, k] + w1[prev] @ w2.T).argmax(-1)
        want.append(prev)
    assert torch.equal(runs[0], torch.stack(want, 1)) and torch.equal(runs[1], runs[0]), (runs, want)
    # counter-based uniforms in one launch: the bits of runtime.sampling's torch ops (int64 products wrap)
    from dspark_compile.runtime.sampling import counter_uniforms as uniforms_ops
    from dspark_compile.targets.torch.kernels import counter_uniforms
    seeds = torch.tensor([0, 1, -5, 2**62, -2**63, 123456789], dtype=torch.int64)
    ctr = torch.tensor([0, 15, 2**40, 7, 3, -1], dtype=torch.int64)
    for n in (1, 7, 15):
        assert torch.equal(counter_uniforms(seeds, ctr, n), uniforms_ops(seeds, ctr, n)), n
    print("kernels ok")
    """
)


@pytest.mark.slow  # the Triton interpreter runs every kernel on the CPU in a subprocess
def test_fused_kernels_and_layers_match_module_ops_in_interpreter(golden_dir: Path, triton_interpreter: Any) -> None:
    proc = triton_interpreter(INTERPRET_SCRIPT, golden_dir / "dspark_tiny", 600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernels ok" in proc.stdout


SAMPLE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from dspark_compile.plugins.spec_verify.reference import inverse_cdf_torch
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch.kernels import markov_greedy, markov_sample
    from dspark_compile.targets.torch.static_forward import StaticProgram

    torch.manual_seed(0)
    pair = Path(sys.argv[1])
    prog = build_program(pair / "target", pair / "draft")
    plain = StaticProgram(prog.target, prog.draft, fused=False, attention="reference")
    fused = StaticProgram(prog.target, prog.draft, fused=True, attention="reference")
    g, hid = prog.draft.block_size, prog.target.cfg.hidden_size
    for rows, temps in ((1, [0.8]), (3, [0.8, 0.0, 1.7]), (5, [0.5, 1.0, -1.0, 2.0, 0.3])):
        hidden, anchor, temp = torch.randn(rows, g, hid), torch.randint(0, 300, (rows,)), torch.tensor(temps)
        u = torch.rand(rows, g + 3)[:, 2:]  # a strided slice, as a round passes it
        u[0, 0] = 0.99999994  # the far end of the inverse CDF
        t1, c1, p1 = plain.propose(hidden, anchor, temp, u, distributions=True)
        out = torch.full((rows, g, p1.shape[-1]), float("nan"))
        t2, c2, p2 = fused.propose(hidden, anchor, temp, u, distributions=True, probs_out=out)
        assert p2.data_ptr() == out.data_ptr() and torch.equal(t1, t2), (rows, t1, t2)
        assert (p1 - p2).abs().max() < 2e-6, (p1 - p2).abs().max()  # the sums' order: last bits
        assert (c1 - c2).abs().max() < 2e-5
    # 16 rows, 258 vocabulary blocks (more than the tail's chunk of 256): each draw is inverse_cdf of the
    # distribution the module computes; row 3 at T = 0 takes argmax
    rows, vocab, rank = 16, 33000, 16
    base, h = torch.randn(rows, 2, vocab) * 3, torch.randn(rows, 2, 64)
    w1, w2 = torch.randn(vocab, rank), torch.randn(vocab, rank) * 0.2
    temp, u = torch.rand(rows) + 0.2, torch.rand(rows, 2)
    temp[3] = 0.0
    tok, _, probs = markov_sample(base, h, torch.arange(rows), w1, w2, None, None, False, temp, u, block_v=128)
    prev = torch.arange(rows)
    for k in range(2):
        logits = base[:, k] + w1[prev] @ w2.T
        p = torch.softmax(logits * (1.0 / torch.where(temp > 0, temp, torch.ones_like(temp)))[:, None], -1)
        assert ((p - probs[:, k]).abs() / p.clamp_min(1e-30)).max() < 1e-4  # logits' sums: float32 order
        assert torch.equal(torch.where(temp > 0, inverse_cdf_torch(p, u[:, k]), logits.argmax(-1)), tok[:, k]), k
        prev = tok[:, k]
    # the draw's strict ">" across blocks: two equal logits in blocks 0 and 2, the rest −inf (block 1 all −inf);
    # u = 0.5 lands exactly on the first one's cumulative mass, so the module's inverse CDF takes the second
    base = torch.full((3, 1, 384), float("-inf")); base[..., [70, 300]] = 0.0
    u = torch.tensor([[0.5], [0.49999997], [0.0]])
    tok, _, probs = markov_sample(base, torch.randn(3, 1, 64), torch.zeros(3, dtype=torch.int64),
                                  torch.randn(384, 16), torch.zeros(384, 16), None, None, False, torch.ones(3), u,
                                  block_v=128)
    assert tok[:, 0].tolist() == [300, 70, 70] and torch.equal(tok[:, 0], inverse_cdf_torch(probs[:, 0], u[:, 0]))
    assert probs[:, 0, [70, 300]].eq(0.5).all() and probs.sum() == 3
    # 18 rows in one launch (rounds take up to MARKOV_ROWS): the module's loop, called directly, greedy and
    # sampling rows mixed
    rows, d = 18, prog.draft
    hidden, anchor = torch.randn(rows, g, hid), torch.randint(0, 300, (rows,))
    temp, u = torch.rand(rows) + 0.3, torch.rand(rows, g)
    temp[[2, 17]] = 0.0
    t1, c1, p1 = d.propose(hidden, anchor, temp, u, distributions=True)
    head, conf = d.markov_head, d.confidence_head
    args = (d.block_logits(hidden), hidden, anchor, head.markov_w1.weight, head.markov_w2.weight,
            conf.proj.weight.view(-1), conf.proj.bias, d.cfg.confidence_head_with_markov)
    t2, c2, p2 = markov_sample(*args, temp, u)
    assert torch.equal(t1, t2) and (p1 - p2).abs().max() < 2e-6 and (c1 - c2).abs().max() < 2e-5, (t1, t2)
    t1, c1, _ = d.propose(hidden, anchor, None, None, distributions=False)
    t2, c2 = markov_greedy(*args)
    assert torch.equal(t1, t2) and (c1 - c2).abs().max() < 2e-5, ("greedy", t1, t2)
    print("markov sample ok")
    """
)


def test_markov_sample_draws_the_module_tokens_in_interpreter(golden_dir: Path, triton_interpreter: Any) -> None:
    """kernels.markov_sample (a sampling round's Markov head, one launch per position) against the module's loop
    through StaticProgram.propose: the same tokens (greedy and sampling rows mixed, u at the CDF's far end), the
    distributions within 2e-6 and written into the round's buffer; on 16 rows of a 33000 vocabulary, each draw is
    the module's inverse CDF; 18 rows in one launch of either kernel give the module's tokens."""
    proc = triton_interpreter(SAMPLE_SCRIPT, golden_dir / "dspark_tiny", 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "markov sample ok" in proc.stdout


def test_propose_takes_the_markov_kernel_only_where_it_applies(golden_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Which drafts StaticProgram.propose hands to kernels.markov_greedy and markov_sample (stubbed here: their
    numerics are the interpreter tests'): rounds of a vanilla head, up to MARKOV_ROWS rows, in the fused program,
    W2 full precision or e4m3 (its scales passed on), greedy to the one and sampling (with its distributions'
    buffer) to the other; larger batches, the unfused program, a W2 with e4m3 inputs and DSPARK_FUSED_PROPOSE=0
    keep the module's loop."""
    import torch

    from dspark_compile.models.layers import Fp8Linear
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch import kernels
    from dspark_compile.targets.torch.static_forward import StaticProgram

    calls: list[int] = []

    scales: list[torch.Tensor | None] = []

    def stub(base: torch.Tensor, *args: Any, w2_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(base.shape[0])
        scales.append(w2_scale)
        return torch.zeros(base.shape[:2], dtype=torch.int64), torch.zeros(base.shape[:2])

    sampled: list[tuple[int, torch.Tensor | None]] = []

    def sample_stub(base: torch.Tensor, *args: Any, probs_out: torch.Tensor | None = None,
                    w2_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sampled.append((base.shape[0], probs_out))
        return torch.ones(base.shape[:2], dtype=torch.int64), torch.zeros(base.shape[:2]), torch.zeros(1)

    monkeypatch.setattr(kernels, "markov_greedy", stub)
    monkeypatch.setattr(kernels, "markov_sample", sample_stub)
    prog = build_program(golden_dir / "dspark_tiny" / "target", golden_dir / "dspark_tiny" / "draft")
    fused = StaticProgram(prog.target, prog.draft, fused=True, attention="reference")
    plain = StaticProgram(prog.target, prog.draft, fused=False, attention="reference")
    g = prog.draft.block_size

    def propose(program: StaticProgram, rows: int, temperature: torch.Tensor | None = None,
                probs_out: torch.Tensor | None = None) -> torch.Tensor:
        hidden = torch.randn(rows, g, prog.target.cfg.hidden_size)
        uniforms = None if temperature is None else torch.rand(rows, g)
        return program.propose(hidden, torch.zeros(rows, dtype=torch.int64), temperature, uniforms,
                               distributions=temperature is not None, probs_out=probs_out)[0]

    assert not propose(fused, 3).any() and calls == [3]  # the stub's zeros
    with torch.inference_mode():
        rows = kernels.MARKOV_ROWS + 1  # larger rounds keep the module's loop, greedy and sampling
        assert propose(fused, rows).shape == (rows, g)
        assert propose(fused, rows, torch.full((rows,), 0.7)).shape == (rows, g) and not sampled
        rows = kernels.MARKOV_ROWS  # the largest rounds the kernels take, greedy and sampling
        assert not propose(fused, rows).any() and calls == [3, rows]
        assert propose(fused, rows, torch.full((rows,), 0.7)).eq(1).all() and sampled[0][0] == rows
        sampled.clear()
        buffer = torch.empty(2, g, prog.target.cfg.vocab_size)
        assert propose(fused, 2, torch.full((2,), 0.7), buffer).eq(1).all()  # the sampling stub's ones
        assert sampled == [(2, buffer)]
        assert propose(plain, 2, torch.full((2,), 0.7)).shape == (2, g) and len(sampled) == 1
        propose(plain, 3)
        head = prog.draft.markov_head
        head.markov_w2 = Fp8Linear.quantize(head.markov_w2)  # --quantize-draft's W2: the kernel, with its scales
        propose(fused, 3)
        assert calls == [3, rows, 3] and scales[0] is None and scales[2] is head.markov_w2.weight_scale
        head.markov_w2.quantize_activations()  # e4m3 inputs: the module's loop
        propose(fused, 3)
        monkeypatch.setenv("DSPARK_FUSED_PROPOSE", "off")
        propose(fused, 3)
        propose(fused, 2, torch.full((2,), 0.7))
    assert calls == [3, rows, 3] and len(sampled) == 1


# --------------------------------------------------------------------------------------------- bookkeeping
def test_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 9, 17, 33, 64, 65, 130)] == [1, 2, 4, 4, 8, 16, 32, 64, 64,
                                                                                  128, 192]
    with pytest.raises(ValueError):
        batch_bucket(0)
    assert [slot_capacity(s) for s in (1, 256, 257, 1033)] == [256, 256, 512, 1280]
    assert attention_window(1025, 1280, 256) == 1280
    assert attention_window(1024, 1280, 256) == 1024
    assert attention_window(3, 4096, 256) == 256
    assert attention_window(3, 4096, None) == 4096
    assert attention_window(3000, 2048, 256) == 2048


def test_split_chunk() -> None:
    from dspark_compile.targets.torch.kernels import split_chunk

    # Qwen3-8B's 8 KV heads on 132 SMs: batch 1 at the floor, batch 8 at 128 slots, batch 64 whole 1024-slot windows
    assert [split_chunk(p, 132) for p in (8, 64, 512)] == [64, 128, 1024]


def test_floor_and_ratio_arithmetic() -> None:
    assert copy_bandwidth(10**9, 1e-3) == pytest.approx(2e12)  # 1 GB read + 1 GB written in 1 ms
    # The numbers: 16.4 GB of weights at 3.02 TB/s -> 5.43 ms.
    assert byte_floor_ms(16_400_000_000, 3.02e12) == pytest.approx(5.4305, abs=1e-4)
    assert overhead_ratio(t_draft=1.2, t_verify=5.6, t_target=5.5) == pytest.approx(6.8 / 5.5)
    assert speedup_over_tau(spec_tps=300.0, target_tps=100.0, tau=4.0) == pytest.approx(0.75)


def test_weight_bytes_by_hand() -> None:
    shape = PairShape(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=4, draft_layers=1, block_size=3, markov_rank=2, target_layer_ids=(0, 1))
    target, draft = random_pair(shape, device="cpu", dtype=torch.float32)
    # Per layer: q 8x8 + k 4x8 + v 4x8 + o 8x8 + q/k norms 4+4 + gate/up/down 3 x 16x8 + 2 norms of 8 = 600.
    # Target: embedding 32x8 + 2 layers + final norm 8 + LM head 32x8 = 256 + 1200 + 8 + 256 = 1720 fp32 values.
    assert target_bytes(target) == 1720 * 4
    # Draft own: 1 layer 600 + fc 8x16 + 2 norms of 8 + W1 32x2 + W2 32x2 + confidence (8+2)+1 = 883.
    # Read per proposal: own − W1 + LM head 256 + (γ−1) extra W2 reads 2 x 64 = 883 − 64 + 256 + 128 = 1203.
    assert draft_read_bytes(draft) == 1203 * 4


def test_run_bench_numbers_are_consistent(golden_dir: Path) -> None:
    prog = build_program(golden_dir / "dspark_tiny" / "target", golden_dir / "dspark_tiny" / "draft")
    gold = _golden(golden_dir, "dspark_tiny")["greedy"]
    rep = run_bench(lambda: CudaGraphBackend(prog.target, prog.draft), [g["prompt"] for g in gold], batches=(1, 2),
                    max_new_tokens=12, repeats=2, context=40, bandwidth=1e10, decode_prompts=4)
    assert rep["target_floor_ms"] == pytest.approx(1e3 * rep["target_weight_bytes"] / 1e10)
    assert rep["overhead_floor"] == pytest.approx(1 + rep["draft_read_bytes"] / rep["target_weight_bytes"])
    for row in rep["batches"]:
        assert row["overhead_ratio"] == pytest.approx((row["t_draft_ms"] + row["t_verify_ms"]) / row["t_target_ms"])
        assert row["target_vs_floor"] == pytest.approx(row["t_target_ms"] / rep["target_floor_ms"])
        assert row["speedup"] == pytest.approx(row["spec_tokens_per_s"] / row["target_tokens_per_s"])
        assert row["speedup_over_tau"] == pytest.approx(row["speedup"] / row["tau"])
        assert 1.0 <= row["tau"] <= 8.0 and row["lossless_fraction"] == 1.0
    stopped = run_bench(lambda: CudaGraphBackend(prog.target, prog.draft), batches=(1, 2), repeats=1, context=16,
                        decode=False, bandwidth=1e10, should_stop=lambda: True)
    assert stopped["batches"] == [] and stopped["skipped_batches"] == [1, 2]


# ------------------------------------------------------------------------------------------------ gpu_bench.py
BLOCK_CLICK_RICH = textwrap.dedent(
    """
    import runpy, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("click", "rich"):
                raise ImportError(f"{name} must not be imported by benchmarks/gpu_bench.py")
    sys.meta_path.insert(0, Block())
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__" if len(sys.argv) > 1 else "gpu_bench")
    """
)


def _gpu_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_CLICK_RICH, str(GPU_BENCH), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_gpu_bench_imports_without_click_or_rich_and_has_help() -> None:
    proc = _gpu_bench()
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, str(GPU_BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--out", "--trained", "--skip-8b", "--max-seconds"):
        assert flag in proc.stdout


@pytest.mark.slow  # every gpu_bench section eagerly on the CPU
def test_gpu_bench_smoke_run(tmp_path: Path, golden_dir: Path) -> None:
    trained = tmp_path / "trained"
    trained.mkdir()
    for name, src in (("target", "target"), ("draft", "draft")):
        (trained / name).symlink_to(golden_dir / "dspark_tiny" / src)
    gold = _golden(golden_dir, "dspark_tiny")["greedy"]
    (trained / "heldout.jsonl").write_text("".join(json.dumps({"prompt_ids": g["prompt"]}) + "\n" for g in gold))
    out = tmp_path / "out"
    proc = _gpu_bench("--out", str(out), "--smoke", "--sections", "8b,trained,sps", "--batch", "1", "--repeats", "1",
                      "--sps-max-batch", "1", "--context", "24", "--max-new-tokens", "6", "--trained", str(trained))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {} and summary["skipped"] == []
    b8 = json.loads((out / "bench_8b.json").read_text())
    assert b8["batches"][0]["batch"] == 1 and b8["batches"][0]["t_target_ms"] > 0
    trained_rep = json.loads((out / "trained.json").read_text())
    assert trained_rep["draft"]["batches"][0]["tau"] >= 1.0
    assert "missing" in trained_rep["draft_nomarkov"]
    sps = json.loads((out / "sps_8b.json").read_text())
    assert sps["backend"] == "torch-cuda-graph" and sps["context"] == 24
    assert sps["batch_sizes"] == list(range(1, 9)) and len(sps["steps_per_second"]) == 8
    assert {p.name for p in out.iterdir()} <= {"summary.json", "bench_8b.json", "trained.json", "sps_8b.json",
                                                "sps_8b.png", "bench.png"}


# ----------------------------------------------------------------------------------------------------- CLI
def _fake_build(tmp_path: Path, golden_dir: Path) -> Path:
    """A build directory as far as the torch target reads it: the manifest's spec and program fields."""
    from dspark_compile.program import build_program

    build = tmp_path / "build"
    build.mkdir()
    pair = golden_dir / "dspark_tiny"
    program = build_program(pair / "target", pair / "draft", dtype="fp32").info(sampling=True)
    manifest = {"spec": {"target": str(pair / "target"), "draft": str(pair / "draft"), "dtype": "fp32"},
                "program": program.to_json(),
                "passes": [{"name": n} for n in ("load", "export_onnx", "check_onnx", "manifest")]}
    (build / "manifest.json").write_text(json.dumps(manifest))
    return build


def test_cli_bench_json(tmp_path: Path, golden_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dspark_compile.cli import main

    build = _fake_build(tmp_path, golden_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("[1, 2, 3, 4]\n[9, 8, 7]\n")
    main(["bench", str(build), "--batch", "1,2", "--max-new-tokens", "5", "--repeats", "1", "--context", "16",
          "--prompt-file", str(prompts), "--replay", "b", "--plot", str(tmp_path / "b.png"), "--plain-rounds",
          "--json", "-q"])
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["batch"] for r in rep["batches"]] == [1, 2]
    assert rep["prompts"] == "given" and rep["gamma"] == 7
    assert all(np.isfinite(r["overhead_ratio"]) for r in rep["batches"])
    for r in rep["batches"]:  # greedy speculative == target-only, in the same run; the replay is labelled
        assert r["lossless_fraction"] == 1.0 and r["decode"]["replay_b"]["label"] == "replayed"
        assert r["speedup"] == pytest.approx(r["spec_tokens_per_s"] / r["target_tokens_per_s"])
        plain = r["decode"]["plain_rounds"]  # nothing drafted: one token a row a round, the target's own
        assert plain["identical_to_target_only"] == 1.0 and plain["tau"] == 1.0
        assert plain["rounds"] == r["decode"]["target_only"]["rounds"]
        assert r["plain_tokens_per_s"] == plain["tokens_per_s"]
        for run in r["decode"].values():  # every round's times, in order, beside their medians
            if isinstance(run, dict) and "rounds" in run:
                assert len(run["round_wall_ms_each"]) == len(run["round_graph_ms_each"]) == run["rounds"]
                assert run["round_wall_ms"] == pytest.approx(np.median(run["round_wall_ms_each"]), abs=1e-4)
                # launching and collecting happen inside the round's wall: their sum cannot pass it
                parts = zip(run["round_issue_ms_each"], run["round_collect_ms_each"], run["round_wall_ms_each"],
                            strict=True)
                assert all(i >= 0 and c >= 0 and i + c <= w + 2e-4 for i, c, w in parts)
    for mode in ("speculative", "replay_b"):  # the suggestion follows from this run's own numbers
        points = [(r["batch"], r["decode"][mode]["tokens_per_s"], r["plain_tokens_per_s"]) for r in rep["batches"]]
        assert rep["draft_rows"][mode] == suggest_draft_rows(points)
    assert (tmp_path / "b.png").stat().st_size > 1000
    # the prompts' own suggestion, kept in the build for --draft-rows auto, with what it was measured on
    measured = json.loads((build / "draft_rows.json").read_text())
    assert rep["draft_rows_file"] == str(build / "draft_rows.json")
    assert measured["draft_rows"] == rep["draft_rows"]["speculative"] and measured["device"] == rep["device"]
    assert [m["batch"] for m in measured["measured"]] == [1, 2]
    assert VerifyPolicy.for_build(build, "fixed", has_confidence=True, draft_rows="auto").draft_rows == \
        measured["draft_rows"]
    # random prompts say nothing of the traffic: the suggestion is printed, no file written
    (build / "draft_rows.json").unlink()
    main(["bench", str(build), "--batch", "1", "--max-new-tokens", "3", "--repeats", "1", "--context", "16",
          "--plain-rounds", "-q"])
    assert "no draft_rows.json written" in capsys.readouterr().out
    assert not (build / "draft_rows.json").exists()


def test_suggested_draft_rows_stop_at_the_last_batch_where_speculation_wins() -> None:
    assert suggest_draft_rows([(1, 300.0, 100.0), (16, 2000.0, 1500.0), (64, 7000.0, 8000.0)]) == 16
    assert suggest_draft_rows([(64, 7000.0, 8000.0), (1, 300.0, 100.0), (16, 2000.0, 1500.0)]) == 16  # any order
    assert suggest_draft_rows([(1, 300.0, 100.0), (16, 1400.0, 1500.0), (64, 9000.0, 8000.0)]) == 1  # first loss
    assert suggest_draft_rows([(1, 90.0, 100.0), (16, 2000.0, 1500.0)]) == 0  # lost at the smallest: never draft
    assert suggest_draft_rows([(1, 300.0, 100.0), (64, 9000.0, 8000.0)]) is None  # won everywhere: no limit
    assert suggest_draft_rows([(4, 100.0, 100.0)]) == 0  # a tie is no win: plain rounds cost nothing to verify


@no_cuda
def test_cli_bench_explicit_cuda_without_gpu_exits_4(tmp_path: Path, golden_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from dspark_compile.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", str(_fake_build(tmp_path, golden_dir)), "--device", "cuda"])
    assert exc.value.code == 4
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_bench_rejects_bad_batch(tmp_path: Path, golden_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dspark_compile.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", str(_fake_build(tmp_path, golden_dir)), "--batch", "1,x"])
    assert exc.value.code == 2
    assert "--batch" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_cuda_graphs_equal_torch_backend_on_golden(golden_dir: Path, pair: str, attention: str) -> None:
    ref_prog = build_program(golden_dir / pair / "target", golden_dir / pair / "draft", device="cuda")
    prog = build_program(golden_dir / pair / "target", golden_dir / pair / "draft", device="cuda")
    ref = TorchBackend(ref_prog.target, ref_prog.draft, eos_token_ids=ref_prog.eos_token_ids)
    be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids, attention=attention)
    assert be.graphs and be.program.fused and be.spec_verify == "triton"
    gold = _golden(golden_dir, pair)["greedy"]
    prompts = [g["prompt"] for g in gold]
    got = _decode(be, prompts)
    _same(got, _decode(ref, prompts))
    assert [r.tokens for r in got] == [g["tokens"] for g in gold]
    assert be.stats["captures"] > 0 and be.stats["replays"] > 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_equal_torch_backend_random_pair_batch3(make_pair: Any) -> None:
    target_dir, draft_dir = make_pair(seed=3)
    prompts = [[5, 9, 17, 33, 2], list(range(40, 71)), [300, 301, 302, 7, 7, 7, 12, 99]]
    ref = TorchBackend.from_pair(target_dir, draft_dir, device="cuda")
    prog = build_program(target_dir, draft_dir, device="cuda")
    be = CudaGraphBackend(prog.target, prog.draft)
    assert type(prog.target.lm_head).__name__ == "_KernelLinear" and prog.draft.lm_head is prog.target.lm_head
    for kw in ({}, {"temperature": 0.8, "seed": 11}):
        _same(_decode(be, prompts, **kw), _decode(ref, prompts, **kw))
    baseline = _decode(ref, prompts)
    eos = baseline[1].tokens[5]
    a = _decode(CudaGraphBackend(prog.target, prog.draft, eos_token_ids=(eos,)), prompts)
    _same(a, _decode(TorchBackend(ref.target_model, ref.draft_model, eos_token_ids=(eos,)), prompts))
    assert be.stats["replays"] > 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_equal_torch_backend_at_18_rows(make_pair: Any) -> None:
    """18 rows (batch bucket 32): rounds run kernels.markov_greedy and markov_sample on all rows in one launch
    inside the captured graphs; tokens, drafts and acceptance equal TorchBackend's (the module's loop), greedy and
    sampling."""
    target_dir, draft_dir = make_pair(seed=3)
    prompts = [[(7 * i + j) % 300 + 1 for j in range(3 + i % 7)] for i in range(18)]
    ref = TorchBackend.from_pair(target_dir, draft_dir, device="cuda")
    prog = build_program(target_dir, draft_dir, device="cuda")
    be = CudaGraphBackend(prog.target, prog.draft)
    for kw in ({}, {"temperature": 0.8, "seed": 5}):
        _same(_decode(be, prompts, **kw), _decode(ref, prompts, **kw))
    assert be.stats["replays"] > 0


@pytest.mark.gpu
@needs_cuda
def test_graphs_are_recaptured_after_the_batch_bucket_changes(golden_dir: Path) -> None:
    """start() with a new bucket drops the graphs; the next captures need a fresh pool (an H100 run once fell
    back to eager here: PyTorch's allocator asserts when capturing into a pool whose graphs are all gone)."""
    from dspark_compile.targets.torch.bench import step_times

    prog = build_program(golden_dir / "dspark_tiny" / "target", golden_dir / "dspark_tiny" / "draft", device="cuda")
    be = CudaGraphBackend(prog.target, prog.draft)
    for batch in (1, 4, 16, 1):
        step_times(be, batch, context=40, repeats=2)
        assert be._steps and all(s.graph is not None for s in be._steps.values()), f"batch {batch}: eager fallback"
