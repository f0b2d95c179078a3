"""Gemma4 on the CUDA-graph target's kernels, in the Triton interpreter (float32): the fused norm equals
GemmaRMSNorm (with its residual add and layer scalar, or followed by RoPE), the GELU product and the add + two
norms equal their torch ops; the split-K attention with a lower bound equals the reference over a sliding band,
also for a 128-row verify block and a head dim of 80, and over a ring (position bounds, wrapped slots); and the
golden gemma4 target's static step and verify block with all of them (norm kernel, fused q|k|v with q/k/v norms,
RoPE and cache writes in one kernel, gate|up and its GELU product, "triton" attention with band masks) equal the
module ops with the reference attention, and so does the draft's step (its norms, query RoPE, gate|up and GELU
product through the kernels), and the target's steps over a ring (``RingCache``: q|k|v written into it by the
kernel).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from dspark_compile.model_config import RopeConfig
    from dspark_compile.models.gemma4 import GemmaRMSNorm, RingCache, norm_rope, visibility
    from dspark_compile.models.layers import RotaryEmbedding, attend, gelu_tanh
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch.gemma4_kernels import add_norm_norm, gemma_rmsnorm
    from dspark_compile.targets.torch.kernels import decode_attention, gelu_tanh_mul
    from dspark_compile.targets.torch.static_forward import ATTENTION, StaticProgram, _use_gemma4_kernels

    torch.manual_seed(0)
    def close(name, a, b, tol=2e-5):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err}"

    rows = torch.randn(2, 3, 5 * 32)[..., 32:32 + 2 * 32].view(2, 3, 2, 32)  # heads of a q|k|v split view
    norm = GemmaRMSNorm(32, 1e-6)
    norm.weight.data = 1 + 0.1 * torch.randn(32)
    plain = norm(rows)
    norm.kernel = gemma_rmsnorm
    close("strided rows", plain, norm(rows))
    heads = torch.randn(2, 3, 4, 32)
    cos, sin = RotaryEmbedding(32, RopeConfig(1e4))(torch.tensor([[0, 5, 9], [30, 31, 32]]), torch.float32)
    norm.kernel = None
    plain = norm_rope(norm, heads, cos, sin)
    norm.kernel = gemma_rmsnorm
    close("norm + rope", plain, norm_rope(norm, heads, cos, sin))
    for n, with_scale in ((96, True), (64, False)):
        norm = GemmaRMSNorm(n, 1e-6, with_scale=with_scale)
        if with_scale:
            norm.weight.data = 1 + 0.1 * torch.randn(n)
        x, res, s = torch.randn(3, 4, n), torch.randn(3, 4, n), torch.tensor([0.7])
        plain = (norm(x), norm.add_to(res, x), norm.add_to(res, x, s))
        close("add_to", plain[2], (res + norm(x)) * s, 0.0)
        norm.kernel = gemma_rmsnorm
        for name, a, b in zip(("norm", "add", "add scale"), plain,
                              (norm(x), norm.add_to(res, x), norm.add_to(res, x, s))):
            close(name, a, b)

    gu = 3 * torch.randn(3, 2, 2 * 40)
    close("gelu product", gelu_tanh_mul(gu), gelu_tanh(gu[..., :40]) * gu[..., 40:], 1e-5)
    first, second = GemmaRMSNorm(96, 1e-6), GemmaRMSNorm(96, 1e-5)
    first.weight.data, second.weight.data = 1 + 0.1 * torch.randn(96), 1 + 0.1 * torch.randn(96)
    res, x = torch.randn(3, 96), torch.randn(3, 96)
    total, normed = add_norm_norm(res, x, (first.weight, first.eps), (second.weight, second.eps))
    close("add norm", total, first.add_to(res, x)); close("add norm norm", normed, second(first.add_to(res, x)))
    scale = torch.tensor([0.7])
    total, normed = add_norm_norm(res, x, (first.weight, first.eps), (second.weight, second.eps), scale)
    close("add norm scale", total, first.add_to(res, x, scale))
    close("add norm scale norm", normed, second(first.add_to(res, x, scale)))

    # A verify block of a global layer (16 query heads per KV head, T = 8: 128 rows in 16-row blocks) and a head
    # dim that is not a power of two.
    tri = ATTENTION["triton"]
    q, kc, vc = torch.randn(2, 16, 8, 80), torch.randn(2, 1, 100, 80), torch.randn(2, 1, 100, 80)
    visible = visibility(torch.tensor([list(range(10, 18)), list(range(60, 68))]), 100, 16)
    mask = tri.prepare(visible, None, 16, q.dtype)
    assert mask.dtype == torch.int64, mask.dtype
    close("128-row band attention, d = 80", tri(q, kc, vc, mask, 1.0), attend(q, kc, vc, visible, 1.0))

    bsz, hq, kvh, t, dh, w, window = 2, 4, 2, 3, 64, 300, 16
    q, kc, vc = torch.randn(bsz, hq, t, dh), torch.randn(bsz, kvh, w, dh), torch.randn(bsz, kvh, w, dh)
    pos = torch.tensor([[10, 11, 12], [260, 261, 262]])  # 64-slot tiles below 192 hold nothing row 2 sees
    visible = visibility(pos, w, window)
    mask = tri.prepare(visible, None, hq // kvh, q.dtype)
    assert mask.dtype == torch.int64 and mask.shape == (2, bsz, t), mask
    ref = attend(q, kc, vc, visible, 1.0)
    close("band attention", tri(q, kc, vc, mask, 1.0), ref)
    for chunk in (None, 128):
        out = decode_attention(q, kc, vc, mask[1].contiguous(), 1.0, low=mask[0].contiguous(), chunk=chunk)
        close("decode_attention low", out.transpose(1, 2).reshape(bsz, t, -1), ref)

    # A ring of R slots (models.gemma4.RingInPlace): a full cache's positions (top - R, top] at slot p mod R.
    r, full = 23, 80
    kf, vf = torch.randn(bsz, kvh, full, dh), torch.randn(bsz, kvh, full, dh)
    pos = torch.tensor([[5, 6, 7], [70, 71, 72]])  # row 0: fewer positions than slots; row 1: wrapped
    kr, vr = torch.randn(bsz, kvh, r, dh), torch.randn(bsz, kvh, r, dh)  # what no query may see
    for b in range(bsz):
        for p in range(max(0, int(pos[b, -1]) - r + 1), int(pos[b, -1]) + 1):
            kr[b, :, p % r], vr[b, :, p % r] = kf[b, :, p], vf[b, :, p]
    ref = attend(q, kf, vf, visibility(pos, full, window), 1.0)
    plain = ATTENTION["reference"]
    close("ring attention, reference", plain(q, kr, vr, plain.prepare_ring(pos, r, window, hq // kvh, q.dtype), 1.0),
          ref)
    mask = tri.prepare_ring(pos, r, window, hq // kvh, q.dtype)
    assert mask.dtype == torch.int64 and mask.shape == (3, bsz, t), mask
    close("ring attention", tri(q, kr, vr, mask, 1.0), ref)

    # Gemma4's widths take their own tiles: 512-wide global heads (32-slot tiles, a 4-warp combine), and a
    # 256-wide ring.
    q5, k5, v5 = torch.randn(1, 16, 8, 512), torch.randn(1, 1, 100, 512), torch.randn(1, 1, 100, 512)
    vis5 = visibility(torch.tensor([list(range(60, 68))]), 100, None)
    close("512-wide attention", tri(q5, k5, v5, tri.prepare(vis5, None, 16, q5.dtype), 1.0),
          attend(q5, k5, v5, vis5, 1.0), 1e-4)
    kf2, vf2, kr2, vr2 = (torch.randn(bsz, kvh, n, 256) for n in (full, full, r, r))
    for b in range(bsz):
        for p in range(max(0, int(pos[b, -1]) - r + 1), int(pos[b, -1]) + 1):
            kr2[b, :, p % r], vr2[b, :, p % r] = kf2[b, :, p], vf2[b, :, p]
    q2 = torch.randn(bsz, hq, t, 256)
    close("256-wide ring attention", tri(q2, kr2, vr2, mask, 1.0),
          attend(q2, kf2, vf2, visibility(pos, full, window), 1.0), 1e-4)

    golden = Path(sys.argv[1])
    ref, fus = (build_program(golden / "target", golden / "draft") for _ in range(2))
    _use_gemma4_kernels(fus.target, fus.draft)
    assert all(layer.gate_up is not None and layer.self_attn.qkv is not None for layer in fus.target.layers)
    calls = []
    def counted(fn):
        def run(*args, **kw):
            calls.append(fn.__name__)
            return fn(*args, **kw)
        return run
    for layer in fus.target.layers:
        layer.qkv_kernel, layer.glu_kernel, layer.add_norm_kernel = map(
            counted, (layer.qkv_kernel, layer.glu_kernel, layer.add_norm_kernel))
    pr = StaticProgram(ref.target, ref.draft, fused=False, attention="reference")
    pf = StaticProgram(fus.target, fus.draft, fused=False, attention="triton")
    for t in (1, 8):  # a target-only step and a verify block, both through the split-K attention
        ids = torch.randint(0, 256, (2, t)); cl = torch.tensor([3, 40])
        k1 = ref.target.new_cache(2, 64); k2 = k1.clone()
        (h1, t1), (h2, t2) = pr.target_step(ids, cl, k1, 64), pf.target_step(ids, cl, k2, 64)
        close("target hidden", h1, h2, 1e-4); close("target taps", t1, t2, 1e-4); close("target cache", k1, k2, 1e-4)
    d = ref.draft
    g, width = d.block_size, len(d.cfg.target_layer_ids) * d.cfg.base.hidden_size
    anchor, ctx, count, dl = torch.tensor([7, 9]), torch.randn(2, g + 1, width), torch.tensor([g + 1, 3]), cl
    d1 = d.new_cache(2, 64); d2 = d1.clone()
    close("draft hidden", pr.draft_step(anchor, ctx, count, dl, d1, 64), pf.draft_step(anchor, ctx, count, dl, d2, 64),
          1e-4)
    close("draft cache", d1, d2, 1e-4)
    # per step of 6 layers: 6 q|k|v kernels, 6 GELU products, 6 + 5 add-and-norms (the last layer has no next norm)
    counts = {name: calls.count(name) for name in set(calls)}
    assert counts == {"qkv_into_cache": 12, "gelu_glu": 12, "add_norm_norm": 22}, counts
    # The same steps over a ring (the CUDA-graph target's RingCache): q|k|v written into it by the kernel.
    for t in (1, 8):
        ids = torch.randint(0, 256, (2, t)); cl = torch.tensor([3, 40])
        c1 = RingCache(ref.target.new_global_cache(2, 64).normal_(), ref.target.new_ring(2, g).normal_())
        c2 = RingCache(c1.full.clone(), c1.ring.clone())
        (h1, t1), (h2, t2) = pr.target_step(ids, cl, c1, 64), pf.target_step(ids, cl, c2, 64)
        close("ring hidden", h1, h2, 1e-4); close("ring taps", t1, t2, 1e-4)
        close("ring", c1.ring, c2.ring, 1e-4); close("ring global cache", c1.full, c2.full, 1e-4)
    assert calls.count("qkv_into_cache") == 24, calls
    print("gemma4 kernels ok")
    """
)


@pytest.mark.slow
def test_gemma4_kernels_match_module_ops_in_interpreter(golden_dir: Path, triton_interpreter: Any) -> None:
    proc = triton_interpreter(SCRIPT, golden_dir / "dspark_tiny_gemma4", 600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gemma4 kernels ok" in proc.stdout


@pytest.mark.slow  # compiles Triton kernels (no GPU needed: ptxas ships with Triton)
@pytest.mark.parametrize("ring", [False, True])
def test_split_attention_compiles_for_hopper_with_and_without_the_ring(ring: bool) -> None:
    """The split-K attention as a 12B sliding layer launches it (head dim 256, 16-row blocks), compiled for
    sm_90 on the CPU: the ring mode (position arithmetic, no tile skipping) lowers as the band mode does."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dspark_compile.targets.torch.kernels import _attn_split_kernel

    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "limit_ptr": "*i64", "low_ptr": "*i64",
           "top_ptr": "*i64", "part_o": "*fp32", "part_m": "*fp32", "part_l": "*fp32", "T": "i32", "GROUP": "i32",
           "KVH": "i32", "W": "i32", "CHUNK": "i32", "SPLITS": "i32", "c_sb": "i32", "c_sh": "i32", "c_ss": "i32",
           "scale": "fp32"}
    consts = {"D": 256, "DP": 256, "BLOCK_M": 16, "BLOCK_N": 32, "HAS_LOW": True, "RING": ring}
    src = ASTSource(_attn_split_kernel, sig | {name: "constexpr" for name in consts}, constexprs=consts)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except RuntimeError as exc:  # no ptxas in this Triton build
        pytest.skip(reason=f"Triton cannot compile for sm_90 here: {exc}")
    ptx = kernel.asm["ptx"]
    assert ".target sm_90" in ptx and "mma" in ptx
    assert ("arith.remsi %" in kernel.asm["ttir"].split("scf.for")[1]) == ring  # slot -> position, per key tile
