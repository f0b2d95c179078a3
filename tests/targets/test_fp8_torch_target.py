"""The torch target's FP8 path: the weight-only FP8 GEMM (interpreter, float32) against the dequantizing
reference, and the fused FP8 program against the module path (``Fp8Linear``), target and draft."""

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
    from torch.nn import functional as F
    from dspark_compile.models.layers import Fp8Linear, fp8_dequantize, quantize_fp8
    from dspark_compile.passes.quantize import quantize_program
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, split_k
    from dspark_compile.targets.torch.static_forward import StaticProgram

    torch.manual_seed(0)
    def close(name, a, b, tol=2e-5):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err < tol, f"{name}: relative error {err}"

    # per-channel, per-tensor, 32-column groups; one row, a few, a GEMM-sized block; split K (K = 4096); with
    # K split 4 ways (the last program of a tile sums the float32 partials) and a row of M = 8 equal to M = 1
    for m, n, k, kind in ((1, 96, 256, "channel"), (5, 64, 4096, "channel"), (70, 80, 256, "tensor"),
                          (3, 64, 512, "group"), (2, 40, 4096, "group")):
        w = torch.randn(n, k)
        if kind == "channel":
            q, scale = quantize_fp8(w); group = 0
        elif kind == "tensor":
            scale = w.abs().max() / 448; q = (w / scale).to(torch.float8_e4m3fn); group = 0
        else:
            group = 32; scale = torch.rand(n, k // group) + 0.5
            q = (w / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
        bias = torch.randn(n)
        x = torch.randn(m, k + 8)[:, :k]  # a row stride larger than K
        ref = F.linear(x, fp8_dequantize(q, scale, group), bias)
        fw = DecodeWeight.of(q, scale, group, bias)
        close(f"decode_linear {m}x{n}x{k} {kind}", decode_linear(x, fw), ref)
        if m <= 16:
            cfg = (16, 32, 32 if group else 64, 8, 4, 3, 0)
            assert split_k(n, k, fw.group, cfg, 4)[1] > 1
            close(f"split K {m}x{n}x{k} {kind}", decode_linear(x, fw, cfg), ref)
            rows = torch.randn(8, k); rows[3] = x[0]
            assert torch.equal(decode_linear(rows, fw, cfg)[3], decode_linear(x[:1], fw, cfg)[0]), "row invariance"
            # the fp16 product (conversion 2): bf16 activations scaled into fp16 exactly, e4m3 -> f16
            xb = x.to(torch.bfloat16)
            ref16 = F.linear(xb.float(), fp8_dequantize(q, scale, group), bias)
            got16 = decode_linear(xb, fw, cfg[:6] + (2,))
            assert got16.dtype == torch.bfloat16
            close(f"fp16 product {m}x{n}x{k} {kind}", got16, ref16, 1e-2)
            big = xb * 4096  # beyond fp16's range unscaled (65504): the scale keeps it finite
            close(f"fp16 product, large activations {kind}", decode_linear(big, fw, cfg[:6] + (2,)),
                  F.linear(big.float(), fp8_dequantize(q, scale, group), bias), 1e-2)

    # the wide class's tiles (WIDE_CONFIGS: up to 256 rows) over 300 rows, the last row tile partial; the weight in
    # column and in fragment order (float32 activations, as above: the interpreter's bf16 loads are not the GPU's)
    from dspark_compile.targets.torch.decode_gemm import WIDE_CONFIGS

    w = torch.randn(256, 256); q, scale = quantize_fp8(w); x = torch.randn(300, 256)
    ref = F.linear(x, fp8_dequantize(q, scale, 0))
    for fw in (DecodeWeight.of(q, scale, 0, None), DecodeWeight.of(q, scale, 0, None).in_fragment_order()):
        for bn, bm, bk, per_sm, warps, stages, conv in WIDE_CONFIGS:
            cfg = (bm, bn, bk, per_sm, warps, stages, conv)
            close(f"wide {cfg} fragment order {fw.fragment_order}", decode_linear(x, fw, cfg), ref)

    # full-precision weights streamed by the same kernel (WIDE), split K and not
    for m, n, k in ((1, 96, 256), (7, 64, 4096)):
        w = torch.randn(n, k); bias = torch.randn(n); x = torch.randn(m, k)
        ref = F.linear(x, w, bias)
        for cfg in ((16, 32, 64, 8, 4, 3, 0), (16, 64, 64, 0, 4, 3, 0)):
            close(f"full {m}x{n}x{k} {cfg}", decode_linear(x, DecodeWeight.full(w, bias), cfg), ref)

    # dynamic e4m3 activations (conversion 3: W8A8) against the module's own forward, float32 inputs: per-channel
    # and 128-column weight groups, split K, a loud group in a row, a row of M = 8 equal to M = 1
    for m, n, k, group in ((1, 96, 256, 0), (5, 64, 1024, 0), (3, 64, 512, 128), (40, 64, 256, 0)):
        if group:
            lin = Fp8Linear((torch.randn(n, k) / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn),
                            torch.rand(n, k // group) + 0.5, torch.randn(n), group=group)
        else:
            lin = Fp8Linear.quantize(torch.nn.Linear(k, n))
        lin.quantize_activations()
        x = torch.randn(m, k); x[0, :64] *= 300
        fw = DecodeWeight.of(lin.weight, lin.weight_scale, lin.group, lin.bias, lin.act_group)
        assert fw.act_group == 128
        close(f"w8a8 {m}x{n}x{k} group {group}", decode_linear(x, fw), lin(x), 1e-5)
        if m <= 16:
            cfg = (16, 32, 128, 8, 4, 3, 3)
            assert split_k(n, k, fw.group, cfg, 4)[1] > 1
            close(f"w8a8 split K {m}x{n}x{k}", decode_linear(x, fw, cfg), lin(x), 1e-5)
            rows = torch.randn(8, k); rows[3] = x[0]
            assert torch.equal(decode_linear(rows, fw, cfg)[3], decode_linear(x[:1], fw, cfg)[0]), "w8a8 rows"

    golden = Path(sys.argv[1])
    # the fused target step of an fp8-dynamic program against its modules' forward
    dyn = [build_program(golden / "target", golden / "draft") for _ in range(2)]
    for p in dyn:
        quantize_program(p, activations=True)
    ids = torch.randint(0, 384, (3, 5)); cl = torch.tensor([0, 7, 30])
    k1 = dyn[0].target.new_cache(3, 256); k2 = k1.clone()
    h1, _ = StaticProgram(dyn[0].target, None, fused=False, attention="reference").target_step(ids, cl, k1, 128)
    h2, _ = StaticProgram(dyn[1].target, None, fused=True, attention="reference").target_step(ids, cl, k2, 128)
    close("w8a8 target hidden", h1, h2, 1e-4); close("w8a8 target cache", k1, k2, 1e-4)
    programs = []
    for _ in range(2):
        p = build_program(golden / "target", golden / "draft")
        quantize_program(p, lm_head=True, draft=True)
        programs.append(p)
    pr = StaticProgram(programs[0].target, programs[0].draft, fused=False, attention="reference")
    pf = StaticProgram(programs[1].target, programs[1].draft, fused=True, attention="reference")
    ids = torch.randint(0, 384, (3, 5)); cl = torch.tensor([0, 7, 30])
    k1 = programs[0].target.new_cache(3, 256); k2 = k1.clone()
    (h1, t1), (h2, t2) = pr.target_step(ids, cl, k1, 128), pf.target_step(ids, cl, k2, 128)
    close("target hidden", h1, h2, 1e-4); close("target taps", t1, t2, 1e-4); close("target cache", k1, k2, 1e-4)
    # the quantized LM head through the FP8 GEMM (the draft shares it)
    assert type(programs[1].target.lm_head).__name__ == "_KernelFp8Linear"
    assert programs[1].draft.lm_head is programs[1].target.lm_head
    close("lm head", programs[1].target.logits(h1), programs[0].target.logits(h1), 1e-4)
    taps = torch.randn(3, 8, 192); count = torch.tensor([8, 3, 1]); dl = torch.tensor([0, 5, 20])
    d1 = programs[0].draft.new_cache(3, 256); d2 = d1.clone()
    anchor = torch.tensor([4, 5, 6])
    g1, g2 = pr.draft_step(anchor, taps, count, dl, d1, 128), pf.draft_step(anchor, taps, count, dl, d2, 128)
    close("draft hidden", g1, g2, 1e-4)
    print("fp8 ok")
    """
)


@pytest.mark.slow  # the Triton interpreter runs every kernel on the CPU in a subprocess
def test_fp8_gemm_and_fused_fp8_program_match_the_reference_in_interpreter(golden_dir: Path,
                                                                          triton_interpreter: Any) -> None:
    proc = triton_interpreter(SCRIPT, golden_dir / "dspark_tiny", 900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fp8 ok" in proc.stdout


HANDOFF_SCRIPT = textwrap.dedent(
    """
    import torch
    from dspark_compile.models.layers import quantize_fp8
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, split_k
    from dspark_compile.targets.torch.kernels import Partials, qk_norm_rope, silu_mul

    torch.manual_seed(0)
    # per-channel e4m3 (plain, and the fp16 product, whose scale carries a power of two), 32-column groups, bf16
    hq, kvh, dh, m, k = 2, 1, 32, 3, 512
    n = (hq + 2 * kvh) * dh
    for kind, fast in (("channel", 0), ("channel", 2), ("group", 0), ("wide", 0)):
        w = torch.randn(n, k)
        if kind == "channel":
            fw = DecodeWeight.of(*quantize_fp8(w), 0, None)
        elif kind == "group":
            q = (w / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
            fw = DecodeWeight.of(q, torch.rand(n, k // 32) + 0.5, 32, None)
        else:
            fw = DecodeWeight.full(w.to(torch.bfloat16))
        x = torch.randn(m, k).to(torch.bfloat16)
        cfg = (16, 32, 32, 8, 4, 3, fast)
        assert split_k(n, k, fw.group, cfg, 4)[1] > 1
        whole, parts = decode_linear(x, fw, cfg), decode_linear(x, fw, cfg, handoff=True)
        assert isinstance(parts, Partials) and parts.shape == whole.shape, type(parts)
        nw = torch.rand(n) + 0.5
        assert torch.equal(silu_mul(whole), silu_mul(parts)), f"silu_mul {kind} {fast}"
        cos, sin = torch.randn(m, dh).to(torch.bfloat16), torch.randn(m, dh).to(torch.bfloat16)
        outs = []
        for src in (whole, parts):
            qo = torch.zeros(1, hq, m, dh, dtype=torch.bfloat16)
            kc, vc = (torch.zeros(1, kvh, 8, dh, dtype=torch.bfloat16) for _ in range(2))
            qk_norm_rope(src, cos, sin, torch.tensor([3, -1, 5]), nw[:dh], nw[dh:2 * dh], 1e-6, qo, kc, vc, rows=m,
                         q_start=0)
            outs.append((qo, kc, vc))
        for a, b in zip(*outs):
            assert a.abs().sum() > 0 and torch.equal(a, b), f"qk_norm_rope {kind} {fast}"
    # a product that does not split K is returned summed, as is one with a bias
    assert not isinstance(decode_linear(x, fw, (16, 32, 32, 0, 4, 3, 0), handoff=True), Partials)
    biased = DecodeWeight.of(*quantize_fp8(torch.randn(n, k)), 0, torch.randn(n))
    assert not isinstance(decode_linear(x.float(), biased, cfg, handoff=True), Partials)
    print("handoff ok")
    """
)


E4M3_INPUT_SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    from dspark_compile.models.layers import Fp8Linear, fp8_group_quantize_dequantize
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, e4m3_rows

    torch.manual_seed(0)
    # the activations quantized once (e4m3_rows) are the reference's values: e4m3 x scale per row and group
    # (float32 inputs: the interpreter's bf16 loads are not the GPU's; the GPU test takes bf16)
    x = torch.randn(37, 256); x[0, :128] *= 300; x[1, 128:] = 0; x[2, :5] = 1e-30
    q, s = e4m3_rows(x, 128)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (37, 2), (q.dtype, s.shape)
    deq = (q.float().view(37, 2, 128) * s.view(37, 2, 1)).view(37, 256)
    assert torch.equal(deq, fp8_group_quantize_dequantize(x, 128))
    assert torch.equal(s[1, 1], torch.tensor(1.0)), "a zero group is scaled by 1"
    # group-major scales (as cuBLAS's block-scaled product reads them): the same values, stored [K / 128, M]
    q2, s2 = e4m3_rows(x, 128, scales_by_group=True)
    assert s2.stride() == (1, 37) and torch.equal(s2, s) and torch.equal(q2.float(), q.float())
    # the W8A8 product above 16 rows: the same bits as quantizing in each K tile, for tiles of 32 and 64 rows
    # (the last partial), split K and not, per-channel and 128-column weight groups
    for group in (0, 128):
        n, k = 64, 512
        if group:
            lin = Fp8Linear((torch.randn(n, k) / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn),
                            torch.rand(n, k // group) + 0.5, None, group=group)
        else:
            lin = Fp8Linear.quantize(torch.nn.Linear(k, n, bias=False))
        lin.quantize_activations()
        fw = DecodeWeight.of(lin.weight, lin.weight_scale, lin.group, None, lin.act_group)
        x = torch.randn(70, k); x[3, :128] *= 300
        for cfg in ((32, 32, 128, 0, 4, 3, 3), (64, 32, 128, 2, 4, 3, 3)):
            outs = []
            for on in ("0", "1"):
                os.environ["DSPARK_E4M3_INPUT"] = on
                outs.append(decode_linear(x, fw, cfg))
            assert torch.equal(outs[0], outs[1]), (group, cfg)
            err = ((outs[1] - lin(x)).abs().max() / lin(x).abs().max()).item()
            assert err < 1e-5, (group, cfg, err)
    # a configuration whose K tile is not one activation group (passed in, or from a choices file) is refused
    try:
        decode_linear(x, fw, (32, 32, 64, 0, 4, 3, 3))
    except ValueError as exc:
        assert "activation group (128 columns), not 64" in str(exc), exc
    else:
        raise AssertionError("a 64-column K tile was taken for 128-column activation groups")
    print("e4m3 input ok")
    """
)


FRAGMENT_SCRIPT = textwrap.dedent(
    """
    import torch
    from dspark_compile.models.layers import Fp8Linear, from_fragment_order, quantize_fp8, to_fragment_order
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, split_k
    from dspark_compile.targets.torch.kernels import Partials

    torch.manual_seed(0)
    # the order itself: column 8j + 2c + e of each 64 goes to 16c + 2j + e, and back
    cols = torch.arange(128, dtype=torch.float32).repeat(3, 1)
    moved = to_fragment_order(cols)
    for j, c, e in ((0, 0, 1), (1, 0, 0), (0, 1, 0), (7, 3, 1)):
        assert moved[0, 64 + 16 * c + 2 * j + e] == 64 + 8 * j + 2 * c + e
    assert torch.equal(from_fragment_order(moved), cols)
    # the same bits from a weight in fragment order: per-channel and 64-column groups, the plain and the fp16
    # product, one row, a verify block and the larger row class, K split (summed, and handed over), and not
    n, k = 64, 256
    w = torch.randn(n, k)
    q64 = (w / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
    grouped = DecodeWeight.of(q64, torch.rand(n, k // 64) + 0.5, 64, None)
    for fw in (DecodeWeight.of(*quantize_fp8(w), 0, None), grouped):
        fo = fw.in_fragment_order()
        assert fo.fragment_order and not torch.equal(fo.weight.float(), fw.weight.float())
        for m, cfg in ((1, (16, 32, 64, 8, 4, 3, 0)), (8, (16, 32, 128, 0, 4, 3, 2)), (8, (16, 32, 64, 8, 4, 3, 2)),
                       (40, (32, 32, 64, 2, 4, 3, 0))):
            x = torch.randn(m, k).to(torch.bfloat16)
            for handoff in (False, True):
                a, b = decode_linear(x, fw, cfg, handoff=handoff), decode_linear(x, fo, cfg, handoff=handoff)
                if isinstance(a, Partials):
                    assert split_k(n, k, fw.group, cfg, 4)[1] > 1
                    a, b = a.part, b.part
                assert torch.equal(a, b), (m, cfg, handoff, fw.group)
    # the accumulator stored through a select (DSPARK_GEMM_KEEP_ASYNC) stores the same values, summed or handed over
    import os
    x = torch.randn(40, k).to(torch.bfloat16)
    for cfg in ((16, 32, 64, 8, 4, 3, 2), (32, 32, 64, 2, 4, 3, 0), (32, 32, 128, 0, 4, 3, 0)):
        rows = x[:5] if cfg[0] == 16 else x
        outs = []
        for keep in ("0", "1"):
            os.environ["DSPARK_GEMM_KEEP_ASYNC"] = keep
            got = [decode_linear(rows, fo, cfg), decode_linear(rows, fo, cfg, handoff=True)]
            outs.append([g.part if isinstance(g, Partials) else g for g in got])
        assert all(torch.equal(a, b) for a, b in zip(*outs)), cfg
    del os.environ["DSPARK_GEMM_KEEP_ASYNC"]
    # where the kernel does not take it, the weight stays as it is
    wide = DecodeWeight.full(torch.randn(n, k))
    dyn = DecodeWeight.of(*quantize_fp8(w), 0, None, act_group=128)
    odd = DecodeWeight.of(*quantize_fp8(torch.randn(n, 96)), 0, None)
    g32 = DecodeWeight.of(q64, torch.rand(n, k // 32) + 0.5, 32, None)
    assert all(d.in_fragment_order() is d for d in (wide, dyn, odd, g32))
    # a module whose weight is stored in fragment order still dequantizes (and multiplies) as before
    lin = Fp8Linear(*quantize_fp8(w))
    x = torch.randn(3, k)
    before = lin(x)
    lin.weight = torch.nn.Parameter(to_fragment_order(lin.weight.detach()), requires_grad=False)
    lin.fragment_order = True
    assert torch.equal(lin(x), before)
    print("fragment ok")
    """
)


def test_weights_in_fragment_order_give_the_same_bits(golden_dir: Path, triton_interpreter: Any) -> None:
    proc = triton_interpreter(FRAGMENT_SCRIPT, golden_dir / "dspark_tiny", 600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fragment ok" in proc.stdout


def test_w8a8_activations_quantized_once_give_the_same_bits(golden_dir: Path, triton_interpreter: Any) -> None:
    """W8A8 above 16 rows: the activations quantized once by ``e4m3_rows`` (the reference's e4m3 values and
    scales) and the product over them, bit for bit the product that quantizes in each K tile (interpreter)."""
    proc = triton_interpreter(E4M3_INPUT_SCRIPT, golden_dir / "dspark_tiny", 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "e4m3 input ok" in proc.stdout


def test_split_k_partials_handed_to_the_consumer_give_the_same_bits(golden_dir: Path, triton_interpreter: Any) -> None:
    """The decode GEMM's split-K partials summed by the consuming kernel (kernels.Partials) against the product
    the GEMM sums itself: the SwiGLU and q/k norm + RoPE outputs, bit for bit (interpreter)."""
    proc = triton_interpreter(HANDOFF_SCRIPT, golden_dir / "dspark_tiny", 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "handoff ok" in proc.stdout


PRESCALED_SCRIPT = textwrap.dedent(
    """
    import torch
    from dspark_compile.models.layers import quantize_fp8
    from dspark_compile.targets.torch import decode_gemm
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, split_k, takes_prescaled
    from dspark_compile.targets.torch.kernels import GEMM_IN_SCALE, Partials, add_rmsnorm, silu_mul

    torch.manual_seed(0)
    assert GEMM_IN_SCALE.value == decode_gemm.X_SCALE.value
    def scaled(t):  # what the fp16 product makes of a bf16 input in each K tile
        return (t.float() * GEMM_IN_SCALE.value).half()
    m, k, n = 3, 256, 64
    x = (torch.randn(m, k) * 3).to(torch.bfloat16); x[0, :8] *= 1e4; x[1, :8] *= 1e-4
    d = torch.randn(m, k).to(torch.bfloat16); nw = (torch.rand(k) + 0.5).to(torch.bfloat16)
    x1, x2 = x.clone(), x.clone()
    h, h16 = add_rmsnorm(x1, d, nw, 1e-6), add_rmsnorm(x2, d, nw, 1e-6, prescaled=True)
    assert h16.dtype == torch.float16 and torch.equal(h16, scaled(h)) and torch.equal(x1, x2), "add_rmsnorm"
    w = DecodeWeight.of(*quantize_fp8(torch.randn(2 * n, k)), 0, None)
    for cfg in ((16, 32, 64, 8, 4, 3, 2), (16, 32, 64, 0, 4, 3, 2)):
        assert (split_k(2 * n, k, w.group, cfg, 4)[1] > 1) == (cfg[3] > 0)
        ref = decode_linear(h, w, cfg)
        got = decode_linear(h16, w, cfg, prescaled=True)
        assert got.dtype == torch.bfloat16 and torch.equal(got, ref), f"product {cfg}"
        parts = decode_linear(h16, w, cfg, handoff=True, prescaled=True)
        if cfg[3]:
            assert isinstance(parts, Partials) and parts.dtype == torch.bfloat16
        for src in (ref, parts):
            act, act16 = silu_mul(ref), silu_mul(src, prescaled=True)
            assert act16.dtype == torch.float16 and torch.equal(act16, scaled(act)), f"silu_mul {cfg}"
    # the split-K attention's merge writing o's input (its partials made up here: the interpreter's bf16 dots in
    # the split kernel are not float32-exact, the merge has none)
    from dspark_compile.targets.torch.kernels import _attn_combine_kernel
    bh, splits, t, group, kvh, dh = 4, 3, 2, 2, 2, 16
    mq = group * t
    po, pm = torch.randn(bh, splits, mq, dh) * 4, torch.randn(bh, splits, mq); pl = torch.rand(bh, splits, mq) + 0.5
    pm[0, 1] = float("-inf"); pl[0, 1] = 0; po[0, 1] = 0  # a split with nothing visible
    outs = []
    for pre in (False, True):
        out = torch.empty(bh // kvh, t, kvh * group, dh, dtype=torch.float16 if pre else torch.bfloat16)
        _attn_combine_kernel[(bh * mq,)](po, pm, pl, out, mq, splits, t, group, kvh, D=dh, DP=dh, BLOCK_S=4,
                                         TOKEN_MAJOR=True, PRESCALED=pre, ASM=False)
        outs.append(out)
    assert outs[0].abs().sum() > 0 and torch.equal(outs[1], scaled(outs[0])), "attention merge"
    # only a product that runs the fp16 product on bf16 inputs takes them prescaled, and only on the GPU
    key = decode_gemm._key(m, w, torch.bfloat16)
    cuda = torch.device("cuda")
    for cfg, want in (((16, 32, 64, 8, 4, 3, 2), True), ((16, 32, 64, 8, 4, 3, 1), False)):
        decode_gemm._CHOSEN[key] = cfg
        assert takes_prescaled(m, w, torch.bfloat16, cuda) is want
    # a product whose consumer sums its partials has its own choice (timed without the GEMM's reduction)
    decode_gemm._CHOSEN[decode_gemm._key(m, w, torch.bfloat16, handoff=True)] = (16, 32, 64, 8, 4, 3, 2)
    assert takes_prescaled(m, w, torch.bfloat16, cuda, handoff=True)
    assert not takes_prescaled(m, w, torch.bfloat16, cuda)
    assert not takes_prescaled(m, w, torch.bfloat16, torch.device("cpu"))
    assert not takes_prescaled(m, w, torch.float16, cuda)
    assert not takes_prescaled(m, DecodeWeight.full(torch.randn(n, k).to(torch.bfloat16)), torch.bfloat16, cuda)
    print("prescaled ok")
    """
)


def test_gemm_inputs_written_prescaled_give_the_same_bits(golden_dir: Path, triton_interpreter: Any) -> None:
    """add_rmsnorm and silu_mul writing the decode GEMM's fp16-product input (bf16 times 2⁻⁸, in fp16), and the
    product reading it with no conversion in its K tiles: bit for bit the bf16 path, split K and not, partials
    handed over too (interpreter); which products take it."""
    proc = triton_interpreter(PRESCALED_SCRIPT, golden_dir / "dspark_tiny", 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prescaled ok" in proc.stdout


_PROGRAM_STEPS = textwrap.dedent(
    """
    import torch

    def program_steps(prog, p, calls):
        # a StaticProgram's target step and draft step on fixed inputs: hidden, taps, cache, draft block, draft
        # cache, then the launches of each step (recorded in ``calls`` by the caller's wrapper)
        torch.manual_seed(0)
        ids = torch.randint(0, 384, (2, 3)); cl = torch.tensor([0, 9])
        kv = p.target.new_cache(2, 64)
        calls.clear()
        hidden, taps = prog.target_step(ids, cl, kv, 32)
        target_calls = list(calls)
        dkv = p.draft.new_cache(2, 64)
        ctx = torch.randn(2, 4, taps.shape[-1]).to(taps.dtype)
        calls.clear()
        block = prog.draft_step(torch.tensor([4, 5]), ctx, torch.tensor([4, 2]), torch.tensor([0, 6]), dkv, 32)
        return hidden, taps, kv, block, dkv, target_calls, list(calls)
    """
)

PRESCALED_PROGRAM_SCRIPT = _PROGRAM_STEPS + textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from dspark_compile.passes.quantize import quantize_program
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch import decode_gemm
    from dspark_compile.targets.torch.static_forward import StaticProgram

    golden = Path(sys.argv[1])
    # every e4m3 product runs the fp16 product (as the H200's timed choice does at up to 16 rows); the CPU never
    # takes prescaled inputs by itself (no GPU), so the answer is forced here
    decode_gemm._config = lambda x, w, handoff=False: (16, 32, 64, 8, 4, 3, 2)
    calls = []
    launch = decode_gemm._launch
    def counted(x, w, cfg, handoff=False, out_dtype=None, row_norm=None, **kw):
        calls.append(out_dtype is not None)
        return launch(x, w, cfg, handoff, out_dtype, row_norm, **kw)
    decode_gemm._launch = counted
    outs = []
    for pre in (False, True):
        decode_gemm.takes_prescaled = lambda m, w, dtype, device, handoff=False, pre=pre: (
            pre and dtype == torch.bfloat16 and not w.wide)
        p = build_program(golden / "target", golden / "draft", dtype="bf16")
        quantize_program(p, lm_head=True, draft=True)
        prog = StaticProgram(p.target, p.draft, fused=True, attention="reference")
        outs.append(program_steps(prog, p, calls))
    (h0, t0, k0, b0, d0, tc0, dc0), (h1, t1, k1, b1, d1, tc1, dc1) = outs
    assert not any(tc0) and not any(dc0)
    layers = len(build_program(golden / "target", None).target.layers)
    # q|k|v, gate|up and down of every target layer; gate|up and down of every draft layer (its q|k|v reads context
    # rows too); o only behind the split-K attention, whose merge writes its input (below)
    assert sum(tc1) == 3 * layers and sum(dc1) == 2 * len(p.draft.layers), (tc1, dc1)
    prog = StaticProgram(p.target, p.draft, fused=True, attention="triton")  # the launches only: the interpreter's
    calls.clear()  # bf16 attention products are not exact (the merge's bits: PRESCALED_SCRIPT; values: the GPU tests)
    ids = torch.randint(0, 384, (2, 3)); cl = torch.tensor([0, 9]); ctx = torch.randn(2, 4, t0.shape[-1]).to(t0.dtype)
    prog.target_step(ids, cl, p.target.new_cache(2, 64), 32)
    assert sum(calls) == 4 * layers, calls
    calls.clear()
    prog.draft_step(torch.tensor([4, 5]), ctx, torch.tensor([4, 2]), torch.tensor([0, 6]), p.draft.new_cache(2, 64),
                    32)
    assert sum(calls) == 3 * len(p.draft.layers), calls
    for name, a, b in (("hidden", h0, h1), ("taps", t0, t1), ("cache", k0, k1), ("draft", b0, b1),
                       ("draft cache", d0, d1)):
        assert a.abs().sum() > 0 and torch.equal(a, b), name
    print("prescaled program ok")
    """
)


def test_fused_program_with_prescaled_inputs_gives_the_same_bits(golden_dir: Path, triton_interpreter: Any) -> None:
    """The fused FP8 program with its products' inputs written prescaled (forced on: the CPU never chooses them)
    against the same program without: target hidden states, taps and cache, draft block and cache bit for bit, and
    the prescaled launches where ``_fused_layer`` puts them (interpreter, bf16)."""
    proc = triton_interpreter(PRESCALED_PROGRAM_SCRIPT, golden_dir / "dspark_tiny", 900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prescaled program ok" in proc.stdout


DEFERRED_SCRIPT = _PROGRAM_STEPS + textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path
    import torch
    from torch.nn import functional as F
    from dspark_compile.models.layers import fp8_dequantize, quantize_fp8
    from dspark_compile.targets.torch import decode_gemm, kernels
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear, split_k
    from dspark_compile.targets.torch.kernels import (Partials, add_rmsnorm, add_rmsnorm_deferred, qk_norm_rope,
                                                      silu_mul)

    torch.manual_seed(0)
    def close(name, a, b, tol):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err < tol, f"{name}: relative error {err}"

    # the norm: residual rows and taps bit for bit add_rmsnorm's, weight * x, each chunk's sum of squares; its delta
    # as a split-K product's partials gives the bits of the product summed by its own last program
    m, k, n = 3, 512, 128
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(m, k) * 3).to(dtype); d = torch.randn(m, k).to(dtype); nw = (torch.rand(k) + 0.5).to(dtype)
        x1, x2 = x.clone(), x.clone()
        t1, t2 = torch.zeros(m, k, dtype=dtype), torch.zeros(m, k, dtype=dtype)
        h = add_rmsnorm(x1, d, nw, 1e-6, t1)
        y, norm = add_rmsnorm_deferred(x2, d, nw, 1e-6, t2, chunk=64)
        assert torch.equal(x1, x2) and torch.equal(t1, t2) and norm.sumsq.shape == (m, 8), dtype
        close(f"weight * x {dtype}", y, nw.float() * x1.float(), 2**-7)
        close(f"sums of squares {dtype}", norm.sumsq.view(m, 8, 1), x1.float().view(m, 8, 64).square().sum(-1, True),
              1e-6)
        o = DecodeWeight.of(*quantize_fp8(torch.randn(k, 256)), 0, None)
        a = torch.randn(m, 256).to(dtype)
        cfg = (16, 32, 64, 8, 4, 3, 2 if dtype == torch.bfloat16 else 0)
        whole, parts = decode_linear(a, o, cfg), decode_linear(a, o, cfg, handoff=True)
        assert isinstance(parts, Partials)
        x3, x4 = x.clone(), x.clone()
        y3, n3 = add_rmsnorm_deferred(x3, whole, nw, 1e-6, chunk=64)
        y4, n4 = add_rmsnorm_deferred(x4, parts, nw, 1e-6, chunk=64)
        assert torch.equal(x3, x4) and torch.equal(y3, y4) and torch.equal(n3.sumsq, n4.sumsq), f"partials {dtype}"

    # a row of 5 chunks has 8 (a power of two, for the product's tile load), the last three summing nothing
    x5 = torch.randn(m, 320)
    y5, n5 = add_rmsnorm_deferred(x5.clone(), None, torch.ones(320), 1e-6, chunk=64)
    assert n5.sumsq.shape == (m, 8) and not n5.sumsq[:, 5:].any() and n5.width == 320
    w5 = DecodeWeight.of(*quantize_fp8(torch.randn(64, 320)), 0, None)
    close("five chunks", decode_linear(y5, w5, (16, 32, 64, 0, 4, 3, 0), row_norm=n5),
          F.linear(y5, fp8_dequantize(w5.weight, w5.scale.view(-1), 0)) * torch.rsqrt(
              x5.square().mean(-1, keepdim=True) + 1e-6), 1e-5)

    # the product finishing the norm: W·(w ⊙ x)·rsqrt(mean(x²) + eps) against float32 arithmetic, split K and not,
    # per-channel and 32-column groups; a row of M = 8 equal to M = 1; its partials handed over carry the norm, and
    # the consumers give the bits of the product summed by its own last program
    hq, kvh, dh = 2, 1, 32
    nq = (hq + 2 * kvh) * dh
    for kind, dtype, fast in (("channel", torch.float32, 0), ("group", torch.float32, 0),
                              ("channel", torch.bfloat16, 2)):
        wt = torch.randn(nq, k)
        if kind == "channel":
            q, scale = quantize_fp8(wt); group = 0
        else:
            group = 32; scale = torch.rand(nq, k // group) + 0.5
            q = (wt / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
        w = DecodeWeight.of(q, scale, group, None)
        rows = (torch.randn(8, k) * 3).to(dtype); nw = (torch.rand(k) + 0.5).to(dtype)
        y8, norm8 = add_rmsnorm_deferred(rows.clone(), None, nw, 1e-6, chunk=64)
        y1, norm1 = add_rmsnorm_deferred(rows[3:4].clone(), None, nw, 1e-6, chunk=64)
        exact = F.linear(y8.float(), fp8_dequantize(q, scale, group)) * torch.rsqrt(
            rows.float().square().mean(-1, keepdim=True) + 1e-6)
        for splits in (8, 0):
            cfg = (16, 32, 32 if group else 64, splits, 4, 3, fast)
            assert (split_k(nq, k, w.group, cfg, 4)[1] > 1) == (splits > 0)
            got = decode_linear(y8, w, cfg, row_norm=norm8)
            close(f"finished norm {kind} {dtype} {cfg}", got, exact, 1e-5 if dtype == torch.float32 else 1e-2)
            assert torch.equal(got[3], decode_linear(y1, w, cfg, row_norm=norm1)[0]), f"row invariance {kind} {cfg}"
            parts = decode_linear(y8, w, cfg, handoff=True, row_norm=norm8)
            if not splits:
                assert not isinstance(parts, Partials)
                continue
            assert isinstance(parts, Partials) and parts.norm is norm8
            assert torch.equal(silu_mul(parts), silu_mul(got)), f"silu_mul {kind} {dtype}"
            cos, sin = torch.randn(8, dh).to(dtype), torch.randn(8, dh).to(dtype)
            outs = []
            for src in (got, parts):
                qo = torch.zeros(1, hq, 8, dh, dtype=dtype)
                kc, vc = (torch.zeros(1, kvh, 16, dh, dtype=dtype) for _ in range(2))
                qk_norm_rope(src, cos, sin, torch.arange(8) * 2 - 1, nw[:dh], nw[dh:2 * dh], 1e-6, qo, kc, vc,
                             rows=8, q_start=0)
                outs.append((qo, kc, vc))
            for a, b in zip(*outs):
                assert a.abs().sum() > 0 and torch.equal(a, b), f"qk_norm_rope {kind} {dtype}"

    # the fused program with the switch on: every target layer's q|k|v and gate|up finish their norms, every draft
    # layer's gate|up (its q|k|v also reads context rows); o and down hand their partials to the norm after them,
    # except the last target layer's down (the final norm); against the modules' forward and the switch off
    from dspark_compile.passes.quantize import quantize_program
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch.static_forward import StaticProgram

    golden = Path(sys.argv[1])
    kernels.NORM_CHUNK = 16  # several chunks at the tiny pair's 64 columns
    decode_gemm._config = lambda x, w, handoff=False: (16, 32, 32, 8, 4, 3, 0)  # K split on the tiny shapes
    os.environ["DSPARK_FRAGMENT_ORDER"] = "0"  # whose K tiles of 32 a weight in fragment order (64) cannot take
    calls = []
    launch = decode_gemm._launch
    def counted(x, w, cfg, handoff=False, out_dtype=None, row_norm=None, **kw):
        calls.append((row_norm is not None, handoff))
        return launch(x, w, cfg, handoff, out_dtype, row_norm, **kw)
    decode_gemm._launch = counted
    outs = []
    for switch in ("0", "1", None):
        p = build_program(golden / "target", golden / "draft")
        quantize_program(p, draft=True)
        if switch is None:
            prog = StaticProgram(p.target, p.draft, fused=False, attention="reference")
        else:
            os.environ["DSPARK_DEFERRED_NORM"] = switch
            prog = StaticProgram(p.target, p.draft, fused=True, attention="reference")
        outs.append(program_steps(prog, p, calls))
    (h0, t0, k0, b0, d0, tc0, dc0), (h1, t1, k1, b1, d1, tc1, dc1), (hr, tr, kr, br, dr, _, _) = outs
    layers, draft_layers = len(p.target.layers), len(p.draft.layers)
    assert not any(norm for norm, _ in tc0 + dc0)
    assert sum(norm for norm, _ in tc1) == 2 * layers and sum(norm for norm, _ in dc1) == draft_layers, (tc1, dc1)
    # per layer q|k|v, o, gate|up, down; handing over: q|k|v and gate|up always, o and down now too (not the last down)
    assert sum(h for _, h in tc0) == 2 * layers and sum(h for _, h in tc1) == 4 * layers - 1, (tc0, tc1)
    assert sum(h for _, h in dc1) == sum(h for _, h in dc0) + draft_layers, (dc0, dc1)
    for name, a, b, c in (("hidden", h1, h0, hr), ("taps", t1, t0, tr), ("cache", k1, k0, kr),
                          ("draft", b1, b0, br), ("draft cache", d1, d0, dr)):
        close(f"{name} against the switch off", a, b, 1e-5)
        close(f"{name} against the modules", a, c, 1e-4)
    print("deferred norm ok")
    """
)


@pytest.mark.slow  # the Triton interpreter runs every kernel on the CPU in a subprocess
def test_rmsnorm_finished_by_its_product_matches_the_norm_in_interpreter(golden_dir: Path,
                                                                       triton_interpreter: Any) -> None:
    """``add_rmsnorm_deferred`` (DSPARK_DEFERRED_NORM=1) and the decode GEMM finishing the norm: the residual rows
    and taps bit for bit add_rmsnorm's; the product within float32 summation order of W·(w ⊙ x)·rsqrt(mean(x²) + ε)
    and the same at one row and eight; partials handed over (o's and down's to the norm, the finishing product's to
    its consumers) bit for bit the GEMM's own sum; the fused program with it on against the modules (interpreter).
    Whether it is faster is for the H200 (docs/BENCH.md); it is off by default until measured."""
    proc = triton_interpreter(DEFERRED_SCRIPT, golden_dir / "dspark_tiny", 900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deferred norm ok" in proc.stdout


GLU_SCRIPT = _PROGRAM_STEPS + textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path
    import torch
    from torch.nn import functional as F
    from dspark_compile.models.layers import Fp8Linear, quantize_fp8
    from dspark_compile.passes.quantize import quantize_program
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch import decode_gemm
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, GluStore, decode_glu, decode_linear, split_k
    from dspark_compile.targets.torch.kernels import add_rmsnorm_deferred, gelu_tanh_mul, silu_mul
    from dspark_compile.targets.torch.static_forward import StaticProgram

    torch.manual_seed(0)
    calls = []
    launch = decode_gemm._launch
    def counted(x, w, cfg, handoff=False, out_dtype=None, row_norm=None, glu=None):
        calls.append(glu is not None)
        return launch(x, w, cfg, handoff, out_dtype, row_norm, glu)
    decode_gemm._launch = counted
    m, k, inter = 3, 256, 96
    for dtype in (torch.bfloat16, torch.float32):
        for kind in ("channel", "group", "w8a8"):
            if kind == "channel":
                w = DecodeWeight.of(*quantize_fp8(torch.randn(2 * inter, k)), 0, None)
            elif kind == "group":
                q = (torch.randn(2 * inter, k) / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
                w = DecodeWeight.of(q, torch.rand(2 * inter, k // 64) + 0.5, 64, None)
            else:
                lin = Fp8Linear.quantize(torch.nn.Linear(k, 2 * inter, bias=False)); lin.quantize_activations()
                w = DecodeWeight.of(lin.weight, lin.weight_scale, lin.group, None, lin.act_group)
            wp = w.in_pairs()
            assert wp.paired and not w.paired
            for a, b in ((wp.weight.view(torch.uint8), w.weight.view(torch.uint8)), (wp.scale, w.scale)):
                assert torch.equal(a[0::2], b[:inter]) and torch.equal(a[1::2], b[inter:]), kind
            x = (torch.randn(m, k) * 3).to(dtype); x[0, :8] *= 50
            nw = (torch.rand(k) + 0.5).to(dtype)
            bk = 128 if kind == "w8a8" else 64
            # bf16 through the fp16 product (the interpreter's bf16 dots are not exact)
            conv = 3 if kind == "w8a8" else 2 if dtype == torch.bfloat16 else 0
            gu = F.linear(x.float(), w.weight.float() * w.scale.repeat_interleave(w.group, 1)[:, :k])
            if kind == "w8a8":
                gu = lin(x.float())
            want = F.silu(gu[:, :inter]) * gu[:, inter:]
            want_gelu = F.gelu(gu[:, :inter], approximate="tanh") * gu[:, inter:]
            # one split (the store finishes SwiGLU), and K split 2 ways (the product, then silu_mul over pairs)
            for cfg in ((16, 32, bk, 0, 4, 3, conv), (16, 64, bk, 0, 4, 3, conv), (16, 32, bk, 8, 4, 3, conv)):
                fused = split_k(2 * inter, k, w.group, cfg, 4)[1] == 1
                assert fused == (cfg[3] == 0), cfg
                decode_gemm._CHOSEN[decode_gemm._key(m, wp, dtype, True)] = cfg
                name = f"{kind} {dtype} {cfg}"
                outs = [(silu_mul(decode_linear(x, w, cfg)), decode_glu(x, wp, handoff=True))]
                if dtype == torch.bfloat16:  # written as down's fp16 product reads it
                    outs.append((silu_mul(decode_linear(x, w, cfg), prescaled=True),
                                 decode_glu(x, wp, handoff=True, out_prescaled=True)))
                if kind != "w8a8":  # the input's RMSNorm finished by the product (as DSPARK_DEFERRED_NORM does)
                    y, norm = add_rmsnorm_deferred(x.clone(), None, nw, 1e-6, chunk=64)
                    outs.append((silu_mul(decode_linear(y, w, cfg, row_norm=norm)),
                                 decode_glu(y, wp, handoff=True, row_norm=norm)))
                if conv == 2:  # the input written prescaled by its norm (the fp16 product's), the output for down's
                    y, norm = add_rmsnorm_deferred(x.clone(), None, nw, 1e-6, prescaled=True, chunk=64)
                    assert y.dtype == torch.float16
                    product = decode_linear(y, w, cfg, prescaled=True, row_norm=norm)
                    outs.append((silu_mul(product), decode_glu(y, wp, handoff=True, prescaled=True, row_norm=norm)))
                    outs.append((silu_mul(product, prescaled=True),
                                 decode_glu(y, wp, handoff=True, prescaled=True, row_norm=norm, out_prescaled=True)))
                # a paired product's plain output (cuBLAS's, above 16 rows) through silu_mul over the pairs
                outs.append((outs[0][0], silu_mul(decode_linear(x, wp, cfg), paired=True)))
                # GeGLU (Gemma4): the store's, and the product's through gelu_tanh_mul over the pairs
                gelu = gelu_tanh_mul(decode_linear(x, w, cfg))
                outs.append((gelu, decode_glu(x, wp, handoff=True, gelu_tanh=True)))
                outs.append((gelu, gelu_tanh_mul(decode_linear(x, wp, cfg), paired=True)))
                calls.clear()
                for got, ref in ((outs[0][1], want), (outs[-2][1], want_gelu)):
                    err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
                    assert err < 2e-2, (name, err)
                for ref, got in outs:
                    assert got.shape == (m, inter) and got.dtype == ref.dtype, name
                    assert ref.abs().sum() > 0 and torch.equal(got, ref), name
                rows = torch.randn(8, k).to(dtype); rows[5] = x[1]
                assert torch.equal(decode_glu(rows, wp, handoff=True)[5], decode_glu(x, wp, handoff=True)[1]), name
                assert calls == [fused, fused], (name, calls)

    # an output of 2I = 160 columns in 64-column tiles: the last tile's pairs past I = 80 are not written
    w = DecodeWeight.of(*quantize_fp8(torch.randn(160, k)), 0, None); wp = w.in_pairs()
    x = torch.randn(m, k); cfg = (16, 64, 64, 0, 4, 3, 0)
    decode_gemm._CHOSEN[decode_gemm._key(m, wp, x.dtype, True)] = cfg
    buf = torch.full((m * 80 + 64,), 7.0)
    calls.clear()
    got = decode_gemm._launch(x, wp, cfg, glu=GluStore(buf[: m * 80].view(m, 80), False, False))
    assert calls == [True] and torch.equal(got, silu_mul(decode_linear(x, w, cfg))), "partial tile"
    assert torch.equal(buf[m * 80 :], torch.full((64,), 7.0)), "written past I"

    # the fused program: gate|up in pairs finishing SwiGLU in its store (no silu_mul launch), target and draft,
    # bit for bit the same program with DSPARK_GLU_STORE=0
    dequantized = []  # e4m3 weights a module's own forward dequantized (the seams should leave none in a step)
    module_dequantized = Fp8Linear.dequantized
    def counted_dequantized(self, dtype):
        dequantized.append(tuple(self.weight.shape))
        return module_dequantized(self, dtype)
    Fp8Linear.dequantized = counted_dequantized
    golden = Path(sys.argv[1])
    decode_gemm._config = lambda x, w, handoff=False: (16, 32, 32, 0, 4, 3, 0)  # one split: the store's case
    os.environ["DSPARK_FRAGMENT_ORDER"] = "0"  # whose K tiles of 32 a weight in fragment order (64) cannot take
    outs = []
    for switch in ("0", "1"):
        os.environ["DSPARK_GLU_STORE"] = switch
        p = build_program(golden / "target", golden / "draft")
        quantize_program(p, draft=True)
        prog = StaticProgram(p.target, p.draft, fused=True, attention="reference")
        assert prog._target_weights[0].gate_up.weight.paired == (switch == "1")
        dequantized.clear()
        outs.append(program_steps(prog, p, calls))
        assert not dequantized, (switch, dequantized)
    (h0, t0, k0, b0, d0, tc0, dc0), (h1, t1, k1, b1, d1, tc1, dc1) = outs
    assert not any(tc0 + dc0) and sum(tc1) == len(p.target.layers) and sum(dc1) == len(p.draft.layers), (tc1, dc1)
    for name, a, b in (("hidden", h0, h1), ("taps", t0, t1), ("cache", k0, k1), ("draft", b0, b1),
                       ("draft cache", d0, d1)):
        assert a.abs().sum() > 0 and torch.equal(a, b), name
    # the modules' own weights are views of the pairs: their forward is the reference's
    mlp = p.target.layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == prog._target_weights[0].gate_up.weight.weight.data_ptr()
    xs = torch.randn(2, 64)
    ref = build_program(golden / "target", golden / "draft")
    quantize_program(ref, draft=True)
    assert torch.equal(mlp(xs), ref.target.layers[0].mlp(xs)), "module forward"

    # Gemma4's e4m3 layers on the CUDA-graph target's seams: q|k(|v) one product (K = V layers: q|k), gate|up in
    # pairs with GeGLU finished in its store; bit for bit the same with DSPARK_GLU_STORE=0 (the product, then
    # gelu_tanh_mul) and after the seams were first set on the layers in full precision; within float32 summation
    # order of the modules' own forward (each weight dequantized), as is a layer whose gate|up mixes e4m3 and full
    # precision (run unfused). The draft's layers (e4m3 too) project q, k and v apart: each its own FP8 product.
    # The soft-capped LM head in e4m3 (--quantize-lm-head): the FP8 GEMM, then the cap, shared with the draft. The
    # draft's fc in e4m3 (--quantize-draft): the FP8 GEMM too.
    from dspark_compile.models.gemma4_draft import Gemma4DraftLayer
    from dspark_compile.passes.quantize import quantize_program
    from dspark_compile.targets.torch.static_forward import _KernelFp8Linear, _Linear, _use_gemma4_kernels

    g4 = golden.parent / "dspark_tiny_gemma4"
    outs = {}
    for case in ("0", "1", "again", "mixed", None):
        os.environ["DSPARK_GLU_STORE"] = "0" if case == "0" else "1"
        p = build_program(g4 / "target", g4 / "draft")
        if case == "again":  # the full-precision seams first (a bf16 run before an FP8 one on the same model)
            _use_gemma4_kernels(p.target, p.draft)
        quantize_program(p, draft=True, lm_head=True)
        layers, draft_layers = p.target.layers, p.draft.layers
        assert all(isinstance(layer, Gemma4DraftLayer) for layer in draft_layers)
        if case == "mixed":  # layer 0's up projection in full precision
            up = layers[0].mlp.up_proj
            layers[0].mlp.up_proj = torch.nn.Linear(up.in_features, up.out_features, bias=False)
            layers[0].mlp.up_proj.weight.data = up.dequantized(torch.float32)
        if case is not None:
            cap = p.target.lm_head.cap
            _use_gemma4_kernels(p.target, p.draft)
            head = p.target.lm_head
            assert type(head) is _KernelFp8Linear and head.cap == cap is not None and p.draft.lm_head is head, case
            assert type(p.draft.fc) is _KernelFp8Linear, case  # its module forward dequantizes at every block
            for layer in [*layers, *draft_layers]:
                attn, mlp = layer.self_attn, layer.mlp
                if layer in draft_layers:
                    assert attn.qkv is None and type(attn.q_proj) is _KernelFp8Linear, case
                else:
                    assert isinstance(attn.qkv, _Linear) and type(attn.q_proj) is Fp8Linear, case
                    assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.weight.data_ptr(), case  # a view
                if case == "mixed" and layer is layers[0]:
                    assert layer.gate_up is None and type(mlp.gate_proj) is _KernelFp8Linear, case
                    continue
                assert isinstance(layer.gate_up, _Linear) and layer.gate_up.weight.paired == (case != "0"), case
                assert mlp.gate_proj.weight.data_ptr() == layer.gate_up.weight.weight.data_ptr(), case
                assert type(attn.o_proj) is type(mlp.down_proj) is _KernelFp8Linear and layer.linear is None, case
        prog = StaticProgram(p.target, p.draft, fused=False, attention="reference")
        steps = []
        dequantized.clear()
        for t in (1, 8):
            torch.manual_seed(t)
            ids, cl = torch.randint(0, 384, (2, t)), torch.tensor([3, 40])
            kv = p.target.new_cache(2, 64)
            calls.clear()
            steps += [*prog.target_step(ids, cl, kv, 64), kv]
            if case in ("0", "1", "again"):  # per layer: q|k(|v), o, gate|up (its store finishing GeGLU), down
                assert calls == [False, False, case != "0", False] * len(layers), (case, calls)
        d = p.draft
        g, width = d.block_size, len(d.cfg.target_layer_ids) * d.cfg.base.hidden_size
        torch.manual_seed(9)
        anchor, ctx, count = torch.tensor([7, 9]), torch.randn(2, g + 1, width), torch.tensor([g + 1, 3])
        dkv = d.new_cache(2, 64)
        calls.clear()
        steps += [prog.draft_step(anchor, ctx, count, torch.tensor([3, 40]), dkv, 64), dkv]
        if case in ("1", "again"):
            assert sum(calls) == len(draft_layers), (case, calls)
        if case is not None:  # every product the FP8 GEMM: fc, then per layer (K = V) q, k of the context rows and
            # of the block's, o, gate|up, down
            assert all(layer.self_attn.v_proj is None for layer in draft_layers)
            assert len(calls) == 1 + 6 * len(draft_layers) and not calls[0], (case, calls)
            assert not dequantized, (case, dequantized)  # target and draft steps: no weight dequantized
        torch.manual_seed(5)
        steps.append(p.target.lm_head(torch.randn(3, p.target.cfg.hidden_size) * 8))  # beyond the cap unless capped
        outs[case] = steps
    for case in ("1", "again", "mixed"):
        for i, (a, b, c) in enumerate(zip(outs["0"], outs[case], outs[None], strict=True)):
            if case != "mixed":
                assert a.abs().sum() > 0 and torch.equal(a, b), f"gemma4 output {i}: {case} against the store off"
            err = ((b.float() - c.float()).abs().max() / c.float().abs().max()).item()
            assert err < 1e-4, (f"gemma4 output {i}, {case}, against the modules", err)
    print("glu ok")
    """
)


@pytest.mark.slow  # the Triton interpreter runs every kernel on the CPU in a subprocess
def test_swiglu_finished_by_the_gate_up_store_gives_the_same_bits(golden_dir: Path, triton_interpreter: Any) -> None:
    """gate|up in pairs (``DecodeWeight.in_pairs``) with SwiGLU finished in the product's store
    (``decode_gemm.decode_glu``): bit for bit the product then ``silu_mul``, per-channel and grouped scales, W8A8,
    bf16 and float32, prescaled output, a deferred norm, a row of 8 equal to 3; split K falls back to ``silu_mul``
    over the pairs; the fused program with it on against ``DSPARK_GLU_STORE=0``, one store launch per layer
    (interpreter)."""
    proc = triton_interpreter(GLU_SCRIPT, golden_dir / "dspark_tiny", 900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "glu ok" in proc.stdout


@pytest.mark.slow  # compiles Triton kernels (no GPU needed: ptxas ships with Triton)
@pytest.mark.parametrize(("block_m", "fast", "per_channel", "weight", "tma"),
                         [(16, 1, True, "fp8e4nv", False), (16, 1, False, "fp8e4nv", False),
                          (64, 1, True, "fp8e4nv", False), (16, 2, True, "fp8e4nv", False),
                          (16, 0, True, "bf16", False), (16, 3, True, "fp8e4nv", False),
                          (16, 3, False, "fp8e4nv", False), (64, 3, True, "fp8e4nv", False),
                          (16, 3, True, "fp8e4nv", True), (16, 2, True, "fp8e4nv", True), (16, 0, True, "bf16", True),
                          (64, 4, True, "fp8e4nv", False), (64, 4, False, "fp8e4nv", True)])
def test_decode_gemm_compiles_for_hopper_pipelined_with_wgmma_and_the_fast_conversion(
        block_m: int, fast: int, per_channel: bool, weight: str, tma: bool) -> None:
    """What the GPU runs, checked without one: the kernel lowers to sm_90 wgmma; its weight tiles stream through
    cp.async stages (software pipelining, which Triton applies only to loads it can prove 16-byte aligned: K,
    the split and the strides as the launch specializes them); with the fast conversion each pair of e4m3
    values costs one cvt.rn.f16x2.e4m3x2 and no per-value f16 -> bf16 conversion."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dspark_compile.targets.torch.decode_gemm import _decode_gemm_kernel

    x_e4m3 = fast == 4  # (the case list's 4): W8A8 over an input quantized once (e4m3_rows), conversion 3
    fast = 3 if x_e4m3 else fast
    desc = f"tensordesc<{weight}[128, 128]>" if tma else f"*{weight}"
    sig = {"x_ptr": "*bf16", "w_ptr": f"*{weight}", "w_desc": desc, "s_ptr": "*fp32", "part_ptr": "*fp32",
           "count_ptr": "*i32", "out_ptr": "*bf16", "norm_ptr": "*fp32", "xs_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "KB": "i32", "GROUP": "i32", "K_SPLIT": "i32", "SPLITS": "i32", "stride_xm": "i32",
           "norm_w": "i32", "norm_eps": "fp32"}
    consts = {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": 128, "PER_CHANNEL": per_channel, "EVEN": True,
              "PRECISION": None, "FAST_CVT": fast, "WIDE": weight == "bf16", "ASM": True, "TMA": tma, "SPLIT_K": True,
              "X_E4M3": x_e4m3}
    if x_e4m3:
        sig["x_ptr"] = "*fp8e4nv"
    unaligned = ("M", "KB", "GROUP", "SPLITS", "w_desc", "norm_w", "norm_eps")
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name not in unaligned}
    src = ASTSource(_decode_gemm_kernel, sig | {name: "constexpr" for name in consts}, constexprs=consts, attrs=aligned)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 4})
    except RuntimeError as exc:  # no ptxas in this Triton build
        pytest.skip(reason=f"Triton cannot compile for sm_90 here: {exc}")
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert "cp.async.cg.shared.global" in ptx and "ttg.async_copy_global_to_local" in kernel.asm["ttgir"]
    if fast == 2 and tma:  # an input its producer wrote prescaled (fp16): the same product, no conversion of x
        src = ASTSource(_decode_gemm_kernel, sig | {"x_ptr": "*fp16"} | {name: "constexpr" for name in consts},
                        constexprs=consts, attrs=aligned)
        pre = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 4})
        pre_ptx = pre.asm["ptx"]
        assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16" in pre_ptx
        assert "0f3B800000" in ptx and "0f3B800000" not in pre_ptx and "cvt.rn.f16x2.f32" not in pre_ptx
        assert pre_ptx.count("cvt.rn.f16x2.e4m3x2") == ptx.count("cvt.rn.f16x2.e4m3x2")
        # finishing its input's RMSNorm (kernels.RowNorm) adds to the store only: the same loop, one rsqrt per row,
        # the chunk sums loaded as one tile (sequential loads were replicated per accumulator layout: 320 per thread)
        normed = ASTSource(_decode_gemm_kernel, sig | {name: "constexpr" for name in consts} | {"NORM": "constexpr"},
                           constexprs=consts | {"NORM": 16}, attrs=aligned)
        norm_ptx = triton.compile(normed, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "num_stages": 4}).asm["ptx"]
        assert "rsqrt" not in ptx and "rsqrt.approx" in norm_ptx
        for op in ("wgmma.mma_async", "cvt.rn.f16x2.e4m3x2", "cp.async.bulk.tensor", "mbarrier.try_wait"):
            assert norm_ptx.count(op) == ptx.count(op), op
        assert norm_ptx.count("ld.global") <= ptx.count("ld.global") + 4
    if tma:  # the weight tiles by the tensor memory accelerator, pipelined (the activations stay cp.async)
        assert "cp.async.bulk.tensor.2d.shared::cluster.global" in ptx and "mbarrier.try_wait" in ptx
    if weight == "bf16":
        assert "cvt.rn.f16x2.e4m3x2" not in ptx
        return
    if x_e4m3:  # the activations arrive in e4m3: nothing is converted or divided in the loop
        assert f"wgmma.mma_async.sync.aligned.m64n{block_m}k32.f32.e4m3.e4m3" in ptx
        assert "cvt.rn.satfinite.e4m3x2.f32" not in ptx and "div.rn.f32" not in ptx and "cvt.rn.f16x2.e4m3x2" not in ptx
        return
    if fast == 3:  # W8A8: e4m3 x e4m3 tensor-core products; only the activations are converted (to e4m3)
        assert f"wgmma.mma_async.sync.aligned.m64n{block_m}k32.f32.e4m3.e4m3" in ptx
        assert "cvt.rn.f16x2.e4m3x2" not in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx
        assert "div.rn.f32" in ptx  # the scales 448/amax and amax/448 exactly (round to nearest)
        return
    assert ptx.count("cvt.rn.f16x2.e4m3x2") == 128 * 128 // (4 * 32 * 2)  # one per value pair of the tile
    assert "cvt.bf16.f16" not in ptx
    if fast == 2:  # the fp16 product: activations scaled in float32, never multiplied in fp16 (overflow)
        assert "mul.rn.f32" in ptx and "0f3B800000" in ptx and "cvt.rn.f16x2.f32" in ptx
        assert "mul.f16x2" not in ptx and "mul.rn.f16x2" not in ptx
        assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16" in ptx
        assert "shr.b32" not in ptx.split("cvt.rn.f16x2.e4m3x2")[1][:200]  # no bf16 bit shuffling


@pytest.mark.slow  # compiles Triton kernels (no GPU needed: ptxas ships with Triton)
@pytest.mark.parametrize("tma", [False, True])
def test_swiglu_store_compiles_for_hopper_with_the_same_loop(tma: bool) -> None:
    """The SwiGLU store (``GLU``) changes the decode GEMM after its loop only: the same wgmma, e4m3 conversions,
    copies and barrier waits, no more shared memory than the plain store, the exponential of silu added (sm_90, the
    H200's B = 1 choice for gate|up: 64 × 256 tiles, one split, the fp16 product, a deferred norm, prescaled in
    and out); Gemma4's GeGLU store (``GLU_GELU``) likewise."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dspark_compile.targets.torch.decode_gemm import _decode_gemm_kernel

    sig = {"x_ptr": "*fp16", "w_ptr": "*fp8e4nv", "w_desc": "tensordesc<fp8e4nv[64, 256]>" if tma else "*fp8e4nv",
           "s_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32", "out_ptr": "*fp16", "norm_ptr": "*fp32",
           "xs_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "KB": "i32", "GROUP": "i32", "K_SPLIT": "i32",
           "SPLITS": "i32", "stride_xm": "i32", "norm_w": "i32", "norm_eps": "fp32"}
    consts = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "PER_CHANNEL": True, "EVEN": True, "PRECISION": None,
              "FAST_CVT": 2, "WIDE": False, "ASM": True, "TMA": tma, "SPLIT_K": False, "NORM": 16, "PDL": True}
    unaligned = ("M", "KB", "GROUP", "SPLITS", "w_desc", "norm_w", "norm_eps")
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name not in unaligned}
    kernels = []
    # every switch named in every variant: ASTSource's cache key joins the constants' values without their names
    for glu in ({"GLU": False, "GLU_PRESCALED": False, "GLU_GELU": False},
                {"GLU": True, "GLU_PRESCALED": True, "GLU_GELU": False},
                {"GLU": True, "GLU_PRESCALED": False, "GLU_GELU": True}):
        src = ASTSource(_decode_gemm_kernel, sig | {name: "constexpr" for name in consts | glu},
                        constexprs=consts | glu, attrs=aligned)
        try:
            kernels.append(triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": 4, "num_stages": 3}))
        except RuntimeError as exc:  # no ptxas in this Triton build
            pytest.skip(reason=f"Triton cannot compile for sm_90 here: {exc}")
    plain, glu_kernel, gelu_kernel = (k.asm["ptx"] for k in kernels)
    for op in ("wgmma.mma_async", "cvt.rn.f16x2.e4m3x2", "cp.async.bulk.tensor", "cp.async.cg.shared.global",
               "mbarrier.try_wait", "griddepcontrol"):
        assert glu_kernel.count(op) == gelu_kernel.count(op) == plain.count(op), op
    assert "ex2.approx" not in plain and "ex2.approx" in glu_kernel and "ex2.approx" in gelu_kernel  # their exp
    assert "0f3B800000" in glu_kernel  # the output written as down's fp16 product reads it
    assert "0f3D372713" in gelu_kernel  # GELU-tanh's 0.044715
    assert kernels[1].metadata.shared <= kernels[0].metadata.shared
    assert kernels[2].metadata.shared <= kernels[0].metadata.shared


def _replay_is_exact(target: Any, draft: Any, prompts: list[list[int]]) -> None:
    """Through the round graphs: target-only greedy, then rounds replaying its continuation with a full profile,
    which must decode the same tokens and accept every draft."""
    import numpy as np

    from dspark_compile.targets.torch import CudaGraphBackend
    from dspark_compile.targets.torch.bench import decode_rounds, replay_reference

    backend = CudaGraphBackend(target, draft)
    target_only = decode_rounds(backend, prompts, max_new_tokens=48, speculative=False)
    g = backend.info.block_size
    backend.set_replay(replay_reference(prompts, target_only.tokens, 24 + 48 + 2 * g + 3), np.ones(g, np.float32))
    speculative = decode_rounds(backend, prompts, max_new_tokens=40)
    assert speculative.tokens == [t[:40] for t in target_only.tokens]
    assert all(r["accepted"] == g + 1 for rs in speculative.rounds for r in rs[:-1])


def _w8a8_replay_is_exact() -> None:
    """:func:`_replay_is_exact` for a W8A8 target (the decisive smoke pair, its layers' inputs in e4m3), 4 prompts:
    32-row verify and draft products above SMALL_M, 4-row steps below it."""
    import torch

    from dspark_compile.models.layers import Fp8Linear
    from dspark_compile.passes.quantize import quantize_module
    from dspark_compile.targets.torch.bench import SMOKE, random_pair

    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    quantize_module(target.layers)
    for module in target.modules():
        if isinstance(module, Fp8Linear):
            module.quantize_activations()
    _replay_is_exact(target, draft, [[int(t) for t in torch.randint(0, 300, (24,))] for _ in range(4)])


@pytest.mark.gpu
def test_fp8_gemm_bf16_on_gpu_and_fp8_round_graph_is_lossless() -> None:
    import torch
    from torch.nn import functional as F

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    from dspark_compile.models.layers import fp8_dequantize, quantize_fp8
    from dspark_compile.passes.quantize import quantize_program
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch import CudaGraphBackend
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, decode_linear

    torch.manual_seed(0)
    for m, n, k in ((1, 4096, 4096), (8, 6144, 4096), (512, 4096, 12288)):
        w = torch.randn(n, k, device="cuda") * 0.02
        q, scale = quantize_fp8(w)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), fp8_dequantize(q, scale, 0))
        fw = DecodeWeight.of(q, scale, 0, None)
        got = decode_linear(x, fw).float()
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2
        if m <= 16:  # one configuration (timed at M = 1) for every M <= 16: a row gets the same bits
            assert torch.equal(decode_linear(x[:1], fw), decode_linear(x, fw)[:1])
        full = DecodeWeight.full(w.to(torch.bfloat16))  # bf16 weights: the kernel or cuBLAS, whichever is faster
        ref = F.linear(x.float(), w.to(torch.bfloat16).float())
        assert float((decode_linear(x, full).float() - ref).abs().max() / ref.abs().max()) < 1e-2
        if m <= 16:
            assert torch.equal(decode_linear(x[:1], full), decode_linear(x, full)[:1])

    from dspark_compile.passes.quantize import quantize_module
    from dspark_compile.targets.torch.bench import SMOKE, decode_rounds, random_pair

    # Exact: the decisive pair's next token wins by a wide margin, so the FP8 GEMM configurations that differ with
    # M (4 rows at T = 1 in target-only steps, 32 at T = G + 1 in rounds) decode the same tokens; replay with a
    # full profile makes the rounds accept every draft.
    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    quantize_module(target.layers)
    prompts = [[int(t) for t in torch.randint(0, 300, (24,))] for _ in range(4)]
    _replay_is_exact(target, draft, prompts)

    # The trained pair: real drafts accepted through FP8 round graphs. Its logits can be near-tied, and there a
    # last-bit difference between M = 4 and M = 32 may pick the other token (it did once, after admission moved
    # to graphs of another prefill width): each row equals target-only, or first differs where the target's
    # own top two logits (the modules' forward, FP8 weights dequantized) are these two tokens, within 0.5.
    pair = ROOT / "dspark_compile" / "tiny_pair"
    program = build_program(pair / "target", pair / "draft", dtype="bf16", device="cuda")
    quantize_program(program)
    backend = CudaGraphBackend(program.target, program.draft, eos_token_ids=program.eos_token_ids)
    target_only = decode_rounds(backend, prompts, max_new_tokens=48, speculative=False)
    speculative = decode_rounds(backend, prompts, max_new_tokens=48)
    assert speculative.tau > 1.2
    for prompt, got, want in zip(prompts, speculative.tokens, target_only.tokens, strict=True):
        i = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        if i is None:
            assert got == want
            continue
        ids = torch.tensor([prompt + want[:i]], device="cuda")
        tgt = program.target
        with torch.inference_mode():
            hidden = tgt(ids, torch.zeros(1, dtype=torch.int64, device="cuda"), tgt.new_cache(1, ids.shape[1]))[0]
            top = tgt.logits(hidden[0, -1]).topk(2)
        assert set(top.indices.tolist()) == {got[i], want[i]}, (i, top)
        assert float(top.values[0] - top.values[1]) < 0.5, (i, top)


@pytest.mark.gpu
def test_fp8_norms_finished_by_their_products_on_gpu_and_round_graph_is_lossless(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``DSPARK_DEFERRED_NORM`` (on by default since the H200 measured it): the FP8 target's fused step within
    bf16 rounding of the step with it off, and its round graphs exact on the decisive pair."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    from dspark_compile.passes.quantize import quantize_module
    from dspark_compile.targets.torch.bench import SMOKE, random_pair
    from dspark_compile.targets.torch.static_forward import StaticProgram

    torch.manual_seed(0)
    target, draft = random_pair(SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    quantize_module(target.layers)
    program = StaticProgram(target, None, fused=True, attention="triton")
    ids = torch.randint(0, 300, (2, 8), device="cuda")
    steps = []
    for switch in ("0", "1"):
        monkeypatch.setenv("DSPARK_DEFERRED_NORM", switch)
        kv = target.new_cache(2, 64)
        steps.append((*program.target_step(ids, torch.tensor([0, 5], device="cuda"), kv, 32), kv))
    for off, on in zip(*steps, strict=True):
        assert float((on.float() - off.float()).abs().max() / off.float().abs().max()) < 2e-2
    prompts = [[int(t) for t in torch.randint(0, 300, (24,))] for _ in range(4)]
    _replay_is_exact(target, draft, prompts)


@pytest.mark.gpu
def test_gemma4_fp8_layers_run_the_fp8_gemm_and_their_round_graph_is_lossless() -> None:
    """Gemma4 layers with e4m3 weights on the CUDA-graph target: each product is the FP8 decode GEMM (the
    modules' own forward would dequantize every weight at every call), q|k(|v) one product and gate|up another in
    pairs (GeGLU finished in its store where it runs in one split), and speculative == target-only."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    from dspark_compile.passes.quantize import quantize_module
    from dspark_compile.targets.torch.bench import GEMMA4_SMOKE, random_pair

    target, draft = random_pair(GEMMA4_SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    quantize_module(target.layers)
    _replay_is_exact(target, draft, [[int(t) for t in torch.randint(0, 300, (24,))] for _ in range(4)])
    from dspark_compile.models.layers import Fp8Linear
    from dspark_compile.targets.torch.static_forward import _Linear

    for layer in target.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn.qkv, _Linear) and isinstance(layer.gate_up, _Linear) and layer.gate_up.weight.paired
        fused = {attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj} - {None}
        alone = {m for m in layer.modules() if type(m) is Fp8Linear}  # the fused products' members only
        assert alone == fused and type(attn.o_proj).__name__ == type(mlp.down_proj).__name__ == "_KernelFp8Linear"


@pytest.mark.gpu
def test_gemma4_e4m3_head_and_draft_round_graph_is_lossless() -> None:
    """Gemma4 with its soft-capped head and its draft in e4m3 too (``--quantize-lm-head --quantize-draft``): the
    head runs the FP8 decode GEMM and then the cap (within 1 % of the cap of the e4m3 module's output, for logits up
    to twice the cap, and far closer than the uncapped product), and speculative == target-only through the round
    graphs."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    from dspark_compile.models.gemma4 import SoftcappedFp8Head
    from dspark_compile.models.layers import Fp8Linear
    from dspark_compile.passes.quantize import DRAFT_KEPT, quantize_head, quantize_module
    from dspark_compile.targets.torch.bench import GEMMA4_SMOKE, random_pair

    target, draft = random_pair(GEMMA4_SMOKE, device="cuda", dtype=torch.bfloat16, decisive=True)
    quantize_module(target.layers)
    quantize_module(draft, skip=DRAFT_KEPT)
    head = target.lm_head = draft.lm_head = quantize_head(target.lm_head)
    assert type(head) is SoftcappedFp8Head
    _replay_is_exact(target, draft, [[int(t) for t in torch.randint(0, 300, (24,))] for _ in range(4)])
    kernel = target.lm_head
    assert type(kernel).__name__ == "_KernelFp8Linear" and draft.lm_head is kernel and kernel.cap == head.cap
    x = torch.randn(3, head.in_features, device="cuda", dtype=torch.bfloat16)
    x = x * (2 * head.cap / float(Fp8Linear.forward(head, x).float().abs().max()))  # logits up to 2x the cap
    got, ref, uncapped = kernel(x).float(), head(x).float(), Fp8Linear.forward(head, x).float()
    err = float((got - ref).abs().max())
    assert err < 1e-2 * head.cap and err < float((uncapped - ref).abs().max()) / 10 and got.abs().max() <= head.cap


@pytest.mark.gpu
def test_swiglu_store_gives_the_same_bits_on_gpu() -> None:
    """On the GPU (inline PTX conversions, TMA, the fast exponential): gate|up in pairs with SwiGLU (and Gemma4's
    GeGLU) finished in its store, bit for bit the product then ``silu_mul`` (``gelu_tanh_mul``), the Qwen3-8B gate|up
    shape at 1 and 8 rows (a row the same at both), fp16 and bf16 products, weights in fragment order, prescaled
    output and a deferred norm; and at 64 rows (the larger class's tiles, one split)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    from dspark_compile.targets.torch import decode_gemm as dg
    from dspark_compile.targets.torch.kernels import add_rmsnorm_deferred, gelu_tanh_mul, silu_mul

    torch.manual_seed(0)
    inter, k = 12288, 4096
    plain = dg.DecodeWeight.of((torch.randn(2 * inter, k, device="cuda") * 0.05).to(torch.float8_e4m3fn),
                               torch.rand(2 * inter, device="cuda") * 0.01 + 0.001, k, None)
    w = plain.in_fragment_order()
    wp = w.in_pairs()
    nw = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    for m, cfgs in ((8, [(16, 64, 256, 0, 4, 3, 2), (16, 64, 256, 0, 4, 3, 2, 1), (16, 128, 128, 0, 4, 4, 1, 1)]),
                    (64, [(128, 64, 128, 0, 4, 3, 1, 1), (64, 128, 128, 0, 4, 3, 1)])):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        gu = x.float() @ (plain.weight.float() * plain.scale).t()
        key = dg._key(m, wp, x.dtype, True)
        kept = dg._CHOSEN.get(key)
        for cfg in cfgs:
            dg._CHOSEN[key] = cfg
            product = dg.decode_linear(x, w, cfg)
            got = dg.decode_glu(x, wp, handoff=True)
            assert torch.equal(got, silu_mul(product)), (m, cfg)
            want = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
            assert float((got.float() - want).abs().max() / want.abs().max()) < 2e-2, (m, cfg)
            assert torch.equal(dg.decode_glu(x, wp, handoff=True, out_prescaled=True),
                               silu_mul(product, prescaled=True)), (m, cfg, "prescaled")
            assert torch.equal(dg.decode_glu(x, wp, handoff=True, gelu_tanh=True),
                               gelu_tanh_mul(product)), (m, cfg, "GeGLU")  # Gemma4's
            if m == 8:
                assert torch.equal(dg.decode_glu(x[3:4], wp, handoff=True)[0], got[3]), (cfg, "row")
                y, norm = add_rmsnorm_deferred(x.clone(), None, nw, 1e-6)
                assert torch.equal(dg.decode_glu(y, wp, handoff=True, row_norm=norm),
                                   silu_mul(dg.decode_linear(y, w, cfg, row_norm=norm))), (cfg, "norm")
        dg._CHOSEN.pop(key)
        if kept is not None:
            dg._CHOSEN[key] = kept


@pytest.mark.gpu
def test_weights_in_fragment_order_give_the_same_bits_on_gpu() -> None:
    """On the GPU, where the bf16 widening takes four values a register (inline PTX the interpreter never runs)
    and TMA loads the tiles: both widenings, TMA or not, the small and the larger row class; and the accumulator
    stored through a select (``DSPARK_GEMM_KEEP_ASYNC``)."""
    import os

    import torch

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    from dspark_compile.targets.torch import decode_gemm as dg

    torch.manual_seed(0)
    n, k = 6144, 4096
    w = dg.DecodeWeight.of((torch.randn(n, k, device="cuda") * 0.05).to(torch.float8_e4m3fn),
                           torch.rand(n, device="cuda") * 0.01 + 0.001, k, None)
    ordered = w.in_fragment_order()
    assert ordered.fragment_order
    for m, cfgs in ((8, [(16, 64, 256, 1, 4, 3, 2, 1), (16, 128, 128, 2, 4, 4, 1, 1), (16, 64, 128, 4, 4, 3, 1, 0)]),
                    (128, [(128, 64, 128, 0, 4, 3, 1, 1), (64, 128, 128, 1, 4, 4, 2, 1),
                           (128, 128, 128, 1, 8, 3, 1, 0)])):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ (w.weight.float() * w.scale).t()
        for cfg in cfgs:
            a, b = dg._launch(x, w, cfg), dg._launch(x, ordered, cfg)
            assert torch.equal(a, b), (m, cfg)
            assert float((b.float() - ref).abs().max() / ref.abs().max()) < 1e-2, (m, cfg)
            os.environ[dg.KEEP_ASYNC_ENV] = "1"  # the accumulator stored through a select: the same bits
            try:
                assert torch.equal(dg._launch(x, ordered, cfg), b), (m, cfg, "keep async")
            finally:
                del os.environ[dg.KEEP_ASYNC_ENV]


@pytest.mark.gpu
def test_w8a8_gemm_on_gpu_and_its_round_graph_is_lossless(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic e4m3 activations (``--quantize fp8-dynamic``): the e4m3 × e4m3 kernel against the modules'
    reference of the same model (quantize the activations per row and 128 columns, dequantize, float32
    product), one configuration for M = 1 and M = 8, and speculative == target-only through the round graphs. The
    kernel only: cuBLAS's e4m3 product, another candidate above SMALL_M rows, has its own test."""
    import torch
    from torch.nn import functional as F

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    monkeypatch.setenv("DSPARK_SCALED_MM", "0")

    from dspark_compile.models.layers import fp8_dequantize, fp8_group_quantize_dequantize, quantize_fp8
    from dspark_compile.targets.torch.decode_gemm import DecodeWeight, _config, decode_linear, e4m3_rows

    torch.manual_seed(0)
    for m, n, k in ((1, 4096, 4096), (8, 6144, 4096), (64, 4096, 12288), (512, 4096, 4096)):
        q, scale = quantize_fp8(torch.randn(n, k, device="cuda") * 0.02)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x[0, :128] *= 100  # one group far louder than the rest of its row: scales are per group
        fw = DecodeWeight.of(q, scale, 0, None, 128)
        xq, xs = e4m3_rows(x, 128)  # the kernels' activations are the reference's, bit for bit, on the GPU too
        assert torch.equal((xq.float().view(m, -1, 128) * xs[..., None]).view(m, k),
                           fp8_group_quantize_dequantize(x, 128))
        ref = F.linear(fp8_group_quantize_dequantize(x, 128), fp8_dequantize(q, scale, 0))
        got = decode_linear(x, fw).float()
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2
        if m <= 16:
            assert torch.equal(decode_linear(x[:1], fw), decode_linear(x, fw)[:1])
        else:  # activations quantized once (e4m3_rows) or in each K tile: the same bits
            with monkeypatch.context() as mp:
                mp.setenv("DSPARK_E4M3_INPUT", "0")
                assert torch.equal(decode_linear(x, fw, _config(x, fw)), got.to(torch.bfloat16))

    _w8a8_replay_is_exact()


@pytest.mark.gpu
def test_w8a8_through_cublas_on_gpu_and_its_round_graph_is_lossless(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SCALED_MM``: cuBLAS's block-scaled e4m3 product (``torch._scaled_mm``) against the reference of the same
    model and the kernel's conversion 3, per-channel and 128-column weight scales, at 30 rows (padded to 32), 64 and
    512; replayed in a CUDA graph; a candidate above SMALL_M rows on Hopper only, unless DSPARK_SCALED_MM=0; and
    rounds whose W8A8 products above SMALL_M rows all take it, speculative == target-only."""
    import torch
    from torch.nn import functional as F

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(reason="needs a Hopper GPU (cuBLAS's 1 x 128 block-scaled product is built for sm_90)")

    from dspark_compile.models.layers import fp8_dequantize, quantize_fp8
    from dspark_compile.targets.torch import decode_gemm as dg

    torch.manual_seed(0)
    n, k = 4096, 4096
    w = torch.randn(n, k, device="cuda") * 0.02
    q, scale = quantize_fp8(w)
    block = (torch.rand(n, k // 128, device="cuda") + 0.5) * scale[:, None]  # 128-column groups, as HF blocks
    for fw, deq in ((dg.DecodeWeight.of(q, scale, 0, None, 128), fp8_dequantize(q, scale, 0)),
                    (dg.DecodeWeight.of(q, block, 128, None, 128), q.float() * block.repeat_interleave(128, 1))):
        assert dg.with_scaled_mm([], 64, fw) == [dg.SCALED_MM] and dg.with_scaled_mm([], dg.SMALL_M, fw) == []
        inputs, eager = [], []
        for m in (30, 64, 512):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x[0, :128] *= 100  # one group far louder than the rest of its row: scales are per group
            # the product of the activations as e4m3_rows quantizes them (the reference's values: the other test)
            xq, xs = dg.e4m3_rows(x, 128)
            ref = F.linear(xq.float() * xs.repeat_interleave(128, 1), deq.float())
            got = dg.decode_linear(x, fw, dg.SCALED_MM)
            kernel = dg.decode_linear(x, fw, (64, 128, 128, 0, 4, 3, 3)).float()
            errors = [float((t.float() - r).abs().max() / r.abs().max()) for t, r in ((got, ref), (got, kernel))]
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            assert errors[0] < 1e-2 and errors[1] < 1e-2, (m, errors)  # the kernel: bf16 rounding apart
            inputs.append(x)
            eager.append(got)
        for x, got in zip(inputs, eager, strict=True):  # in a graph, and after it, the same bits
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = dg.decode_linear(x, fw, dg.SCALED_MM)
            graph.replay()
            assert torch.equal(replayed, got) and torch.equal(dg.decode_linear(x, fw, dg.SCALED_MM), got), len(x)
    with monkeypatch.context() as mp:
        mp.setenv(dg.SCALED_MM_ENV, "0")
        assert dg.with_scaled_mm([], 64, fw) == [] and "w8a8" not in dg._identity(torch.device("cuda"))

    # rounds at 4 prompts: the verify's and the draft's 32-row W8A8 products through cuBLAS, the 4-row steps through
    # the kernel (class 0); the decisive pair's tokens must not move
    least = dg.least_relative_time
    monkeypatch.setattr(dg, "_CHOSEN", {})
    monkeypatch.delenv(dg.CHOICES_ENV, raising=False)
    monkeypatch.setattr(dg, "least_relative_time",
                        lambda times: dg.SCALED_MM if dg.SCALED_MM in times else least(times))
    _w8a8_replay_is_exact()
    assert dg.SCALED_MM in dg._CHOSEN.values() and any(c != dg.SCALED_MM for c in dg._CHOSEN.values())


def test_w8a8_weights_are_never_in_fragment_order() -> None:
    """A module whose weight a W8A16 product stored in fragment order, then asked for dynamic e4m3 activations (the
    FP8 benchmark reuses its modules across kinds), goes back to column order with the same forward; cuBLAS's e4m3
    product, which reads columns in order, refuses a weight in fragment order (a configuration from a choices file)
    with one clear error instead of a wrong product."""
    pytest.importorskip("triton")
    import torch

    from dspark_compile.models.layers import Fp8Linear, quantize_fp8, to_fragment_order
    from dspark_compile.targets.torch import decode_gemm as dg

    torch.manual_seed(0)
    q, scale = quantize_fp8(torch.randn(64, 256))
    lin = Fp8Linear(to_fragment_order(q), scale, None)
    lin.fragment_order = True
    x = torch.randn(3, 256)
    before = lin(x)
    lin.quantize_activations()
    assert not lin.fragment_order and lin.act_group == 128 and torch.equal(lin.weight.float(), q.float())
    plain = Fp8Linear(q, scale, None)
    plain.quantize_activations()
    assert torch.equal(lin(x), plain(x)) and not torch.equal(lin(x), before)  # now its inputs are e4m3 too
    frag = dg.DecodeWeight.of(to_fragment_order(q), scale, 0, None, 128, fragment_order=True)
    with pytest.raises(ValueError, match="column order; this one is in the decode GEMM's fragment order"):
        dg.decode_linear(torch.randn(32, 256), frag, dg.SCALED_MM)


def test_decode_gemm_candidates() -> None:
    """Which configurations the timed choice may pick: e4m3 weights always run the kernel; full-precision ones
    weigh cuBLAS first (the reference) and use only cuBLAS beyond SMALL_M rows; every candidate's pipeline
    stages fit the shared-memory budget; block-wise scales keep K tiles inside one scale group."""
    pytest.importorskip("triton")
    from dspark_compile.targets.torch.decode_gemm import CUBLAS, SMALL_M, SMEM_BYTES, _candidates

    fp8 = _candidates(1, 4096, 4096, 1)
    assert CUBLAS not in fp8 and fp8[0][6] == 0  # the plain conversion is the reference
    assert {c[6] for c in fp8} == {0, 1, 2}
    wide = _candidates(8, 4096, 4096, 2)
    assert wide[0] == CUBLAS and all(c[6] == 0 for c in wide[1:]) and len(wide) > 1
    assert _candidates(SMALL_M + 1, 4096, 4096, 2) == [CUBLAS] and CUBLAS not in _candidates(SMALL_M + 1, 4096, 4096, 1)
    for m, weight_bytes in ((1, 1), (1, 2), (64, 1), (4096, 1)):
        for bm, bn, bk, _, _, stages, _ in _candidates(m, 4096, 4096, weight_bytes):
            if bm:
                assert stages >= 2 and (stages == 2 or stages * (bn * bk * weight_bytes + bm * bk * 2) <= SMEM_BYTES)
    assert all(128 % c[2] == 0 for c in _candidates(1, 4096, 128, 1))


def test_a_larger_row_configuration_is_chosen_over_the_row_counts_its_class_serves() -> None:
    """The 17-128-row class keeps one configuration for B = 16's verify and B = 64's step, the wide class (129-1024
    rows) one for B = 32's and 64's verifies, which alone may take the 256-row tiles: each choice weighs each row
    count's time against that row count's fastest, so the larger products' times do not decide alone."""
    pytest.importorskip("triton")
    from dspark_compile.targets.torch.decode_gemm import (
        SMALL_M,
        SPLIT_M,
        TIMED_ROWS,
        WIDE_CONFIGS,
        WIDE_M,
        _candidates,
        least_relative_time,
        row_class,
    )

    assert all(row_class(r) == 1 for r in TIMED_ROWS[1]) and all(row_class(r) == 3 for r in TIMED_ROWS[3])
    edges = (SMALL_M, SMALL_M + 1, WIDE_M, WIDE_M + 1, SPLIT_M, SPLIT_M + 1)
    assert [row_class(m) for m in edges] == [0, 1, 1, 3, 3, 2]

    def tiles(m: int) -> set[tuple[int, ...]]:  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, conversion): stages are fitted
        return {(c[0], c[1], c[2], c[4], c[6]) for c in _candidates(m, 4096, 4096, 1)}

    assert {(bm, bn, bk, w, f) for bn, bm, bk, _, w, _, f in WIDE_CONFIGS} <= tiles(512)
    assert {t[0] for t in tiles(512)} == {64, 128, 256}  # 256-row tiles in the wide class only
    assert {t[0] for t in tiles(64)} == {t[0] for t in tiles(4096)} == {64, 128}
    assert set(_candidates(64, 4096, 4096, 1)) < set(_candidates(512, 4096, 4096, 1))
    a, b, c = (64, 128, 128, 0, 4, 3, 1), (128, 64, 128, 1, 4, 3, 1), (64, 256, 64, 0, 8, 4, 2)
    # a: fastest at 64 and 128 rows, 1.8x at 512; b: 1.2x, 1.1x, fastest at 512; c: fastest nowhere
    times = {a: [20.0, 27.0, 104.0], b: [24.0, 29.7, 58.0], c: [22.0, 30.0, 70.0]}
    assert least_relative_time(times) == b  # 1.2 + 1.1 + 1.0 against 1 + 1 + 1.79 and 1.1 + 1.11 + 1.21
    assert least_relative_time({a: [3.0], b: [2.0]}) == b


def test_a_candidate_that_writes_nan_or_inf_strays_from_the_reference() -> None:
    """``relative_error``, by which timing drops a candidate over 1e-2: a NaN anywhere in its product is an infinite
    error (a bare comparison with NaN is false and would have kept it), as is an infinite value."""
    import math

    import torch

    pytest.importorskip("triton")
    from dspark_compile.targets.torch.decode_gemm import relative_error

    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert relative_error(ref + 0.01, ref) == pytest.approx(0.0025)
    for bad in (math.nan, math.inf):
        got = ref.clone()
        got[1, 0] = bad
        assert relative_error(got, ref) == math.inf


def test_a_candidate_whose_launches_disagree_is_dropped() -> None:
    """``candidate_error``: a candidate whose launches on one input give different bits has an infinite error (a
    race may leave one launch right: on the H100 a wide tile did, then wrote inf); one that repeats its bits has
    its first result's relative error."""
    import math

    import torch

    pytest.importorskip("triton")
    from dspark_compile.targets.torch.decode_gemm import candidate_error

    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    results = iter([ref + 0.01, ref + 0.01, ref + 0.01])
    assert candidate_error(lambda: next(results), ref) == pytest.approx(0.0025)
    raced = ref.clone()
    raced[0, 1] = 1e30
    for late in (0, 1):  # the second launch, or the third, goes wrong
        seq = [ref.clone(), ref.clone(), ref.clone()]
        seq[1 + late] = raced
        results = iter(seq)
        assert candidate_error(lambda results=results: next(results), ref) == math.inf
    nan = ref.clone()
    nan[1, 1] = math.nan
    assert candidate_error(lambda: nan, ref) == math.inf


def test_a_candidate_that_cannot_run_is_dropped_but_a_cuda_error_is_raised() -> None:
    """``runnable_error``: cuBLAS without the block-scaled product (a RuntimeError from ``torch._scaled_mm``, worded
    as torch's cuBLAS status check words it) and a kernel that does not compile are dropped (None); the same
    RuntimeError from any other candidate, or an error of the CUDA runtime from ``torch._scaled_mm``
    (``torch.AcceleratorError``: the context is gone), is raised where it happened."""
    import torch

    pytest.importorskip("triton")
    from triton.compiler.errors import CompilationError

    from dspark_compile.targets.torch import decode_gemm as dg

    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    other = dg._candidates(1, 256, 128, 1, 0)[0]

    def raising(exc: Exception):
        def launch() -> torch.Tensor:
            raise exc
        return launch

    assert dg.runnable_error(lambda: ref + 0.01, ref, other) == pytest.approx(0.0025)
    unsupported = RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul(...)`\nmore")
    assert dg.runnable_error(raising(unsupported), ref, dg.SCALED_MM) is None
    assert dg.runnable_error(raising(CompilationError("k.py", None, "out of shared memory")), ref, other) is None
    with pytest.raises(RuntimeError, match="CUBLAS"):
        dg.runnable_error(raising(unsupported), ref, other)
    with pytest.raises(RuntimeError, match="illegal memory"):
        dg.runnable_error(raising(torch.AcceleratorError("CUDA error: an illegal memory access was encountered")),
                          ref, dg.SCALED_MM)


@pytest.mark.gpu
def test_every_decode_gemm_candidate_is_right_and_repeats_its_bits_on_gpu() -> None:
    """Every candidate of the small, larger and wide row classes (TMA or not) on an e4m3 weight in fragment order,
    the q|k|v shape of Qwen3-8B: within 1e-2 of the dequantized product, the same bits on three launches. The wide
    tile dropped from :data:`WIDE_CONFIGS` failed exactly this on the H100 (docs/BENCH.md, "A wide tile that
    raced"); the timing drops such a candidate too, but only when its race shows in the launches it checks."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU")
    from dspark_compile.models.layers import quantize_fp8
    from dspark_compile.targets.torch import decode_gemm as dg

    torch.manual_seed(0)
    n, k = 6144, 4096
    q, scale = quantize_fp8(torch.randn(n, k, device="cuda") * 0.02)
    w = dg.DecodeWeight.of(q, scale, 0, None).in_fragment_order()
    dense = q.float() * scale.reshape(-1, 1).float()
    bad = {}
    for m in (8, 64, 512):  # classes 0, 1 and 3
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dense.t()
        for cfg in dg.with_tma(dg._candidates(m, k, w.group), w):
            err = dg.candidate_error(lambda x=x, cfg=cfg: dg._launch(x, w, cfg).float(), ref)
            if err > 1e-2:
                bad[(m, cfg)] = err
    assert not bad


def test_decode_gemm_choices_file_pins_configurations_for_its_gpu_only(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``DSPARK_GEMM_CHOICES``: a missing file is written as choices are made; a later process reads it and runs the
    same configurations without timing them; a file of another GPU (Triton version, candidate set) is neither read
    nor written; a file that is not a choices file is one error naming the variable, the file and the fix. On the
    CPU nothing is timed, so choices are made here with ``remember``, as ``_config`` makes them on a GPU."""
    pytest.importorskip("triton")
    import json

    import torch

    from dspark_compile.errors import UsageError
    from dspark_compile.models.layers import quantize_fp8
    from dspark_compile.targets.torch import decode_gemm as dg

    monkeypatch.setattr(dg, "_CHOSEN", {})
    monkeypatch.setattr(dg, "_LOADED", {})
    path = tmp_path / "choices.json"
    monkeypatch.setenv(dg.CHOICES_ENV, str(path))
    w = dg.DecodeWeight.of(*quantize_fp8(torch.randn(64, 256)), 0, None)
    x = torch.randn(3, 256)
    cpu = torch.device("cpu")
    key, pinned = dg._key(3, w, x.dtype), (16, 32, 64, 0, 4, 3, 2)
    first = dg._candidates(3, 256, w.group)[0]
    assert dg._config(x, w) == first and not path.exists()
    dg.remember(key, pinned, cpu)
    data = json.loads(path.read_text())
    assert data == {"identity": dg._identity(cpu), "choices": [{"key": list(key), "config": list(pinned)}]}
    assert data["identity"]["torch"] == torch.__version__  # with its CUDA build, e.g. 2.11.0+cu130
    dg._CHOSEN.clear()
    dg._LOADED.clear()  # a new process
    assert dg._config(x, w) == pinned
    # another GPU's file, or another torch build's (its cuBLAS, a candidate), is neither read nor written
    for field, theirs in (("gpu", "NVIDIA H200"), ("torch", "2.0.0+cu118")):
        path.write_text(json.dumps(data | {"identity": data["identity"] | {field: theirs}}))
        before = path.read_text()
        dg._CHOSEN.clear()
        dg._LOADED.clear()
        assert dg._config(x, w) == first and key not in dg._CHOSEN, field
        dg.remember(key, pinned, cpu)
        assert path.read_text() == before
    # A file from before the wide class (no "wide" in its identity) keeps its other classes, not a wide choice;
    # another set of wide candidates drops only the wide choices.
    wide_key = (3, *key[1:])
    for identity in ({k: v for k, v in dg._identity(cpu).items() if k != "wide"}, dg._identity(cpu) | {"wide": "0"}):
        path.write_text(json.dumps({"identity": identity, "choices": [{"key": list(k), "config": list(pinned)}
                                                                      for k in (key, wide_key)]}))
        dg._CHOSEN.clear()
        dg._LOADED.clear()
        assert dg._config(x, w) == pinned and wide_key not in dg._CHOSEN
    # W8A8 entries above SMALL_M rows hold only for the same "w8a8" (cuBLAS's e4m3 product among the candidates on
    # a Hopper GPU, unless DSPARK_SCALED_MM=0): a file from before it keeps them only where it is off
    w8 = dg.DecodeWeight.of(*quantize_fp8(torch.randn(64, 256)), 0, None, act_group=128)
    keys = [dg._key(m, w8, x.dtype) for m in (3, 64)] + [key]
    old = {k: v for k, v in dg._identity(cpu).items() if k != "w8a8"}
    for applies, kept in ((False, keys), (True, [keys[0], key])):
        with monkeypatch.context() as mp:
            mp.setattr(dg, "scaled_mm_applies", lambda device, applies=applies: applies)
            path.write_text(json.dumps({"identity": old, "choices": [{"key": list(k), "config": list(pinned)}
                                                                     for k in keys]}))
            dg._CHOSEN.clear()
            dg._LOADED.clear()
            assert dg._load_choices(cpu) and sorted(dg._CHOSEN) == sorted(kept), applies
    assert dg.with_scaled_mm([pinned], 64, w8) == [pinned], "not on the CPU"
    path.write_text("{")
    dg._CHOSEN.clear()
    dg._LOADED.clear()
    with pytest.raises(UsageError, match=r"DSPARK_GEMM_CHOICES=.*choices\.json: not a decode GEMM choices file.*"
                                         r"delete it"):
        dg._config(x, w)
