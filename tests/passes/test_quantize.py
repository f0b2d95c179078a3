"""Pass `quantize`: per-output-channel e4m3 weights for the target's linear layers, the LM head and the draft
only when asked; the manifest's record; the quantized program's logits stay close to full precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.errors import UsageError
from dspark_compile.models.layers import FP8_MAX, Fp8Linear, quantize_fp8
from dspark_compile.passes import graft, quantize
from tests.checkpoint.fp8_checkpoints import write_fp8_target
from tests.passes.conftest import load_pair


def test_quantize_fp8_is_per_channel_round_to_nearest() -> None:
    w = torch.randn(8, 32) * torch.logspace(-3, 1, 8).unsqueeze(1)
    w[3] = 0.0
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8,)
    torch.testing.assert_close(scale[[0, 7]], w[[0, 7]].abs().amax(1) / FP8_MAX)
    assert scale[3] == 1.0 and bool((q[3].float() == 0).all())
    assert q.float().abs().amax(1)[[0, 1, 2, 4, 5, 6, 7]].eq(FP8_MAX).all()  # each row's max maps to 448
    rel = (q.float() * scale.unsqueeze(1) - w).abs() / w.abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert float(rel.max()) <= 2.0**-4 * 1.0001 * 448 / 256  # half an e4m3 ulp at the top binade, relative to max


def _state(golden_pair: tuple[Path, Path], tmp_path: Path, **spec: object) -> BuildState:
    full = BuildSpec(*golden_pair, tmp_path / "out", **spec)
    state = BuildState(spec=full, workdir=tmp_path, pair=load_pair(full))
    graft.run(state)
    quantize.run(state)
    return state


def test_target_layers_only_by_default(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    plain = _state(golden_pair, tmp_path)
    assert plain.quantization is None and plain.spec.opset == 18
    state = _state(golden_pair, tmp_path, quantize="fp8")
    program = state.program
    linears = [m for m in program.target.layers.modules() if isinstance(m, (nn.Linear, Fp8Linear))]
    assert len(linears) == 4 * 7 and all(isinstance(m, Fp8Linear) for m in linears)
    assert type(program.target.lm_head) is nn.Linear and program.draft.lm_head is program.target.lm_head
    assert not any(isinstance(m, Fp8Linear) for m in program.draft.modules())
    q = state.quantization
    assert q["method"] == "fp8" and not q["lm_head"] and not q["draft"] and len(q["layers"]) == 28
    entry = q["layers"]["target.layers.0.self_attn.q_proj"]
    ref = plain.program.target.layers[0].self_attn.q_proj.weight.detach()
    assert entry["shape"] == [64] and entry["max"] == pytest.approx(float(ref.abs().amax(1).max()) / FP8_MAX)
    assert state.spec.opset == 19
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        logits = [s.program.target.logits(s.program.target(ids, torch.zeros(1, dtype=torch.int64),
                                                             s.program.target.new_cache(1, 8))[0])
                  for s in (plain, state)]
    assert not torch.equal(*logits)
    assert float(nn.functional.cosine_similarity(logits[0].flatten(), logits[1].flatten(), dim=0)) > 0.995


def test_lm_head_and_draft_when_asked(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    state = _state(golden_pair, tmp_path, quantize="fp8", quantize_lm_head=True, quantize_draft=True)
    program = state.program
    assert isinstance(program.target.lm_head, Fp8Linear) and program.draft.lm_head is program.target.lm_head
    assert isinstance(program.draft.fc, Fp8Linear) and isinstance(program.draft.layers[1].mlp.down_proj, Fp8Linear)
    assert isinstance(program.draft.markov_head.markov_w2, Fp8Linear)  # W2 too; W1 and the confidence head not
    assert type(program.draft.markov_head.markov_w1) is nn.Embedding
    assert type(program.draft.confidence_head.proj) is nn.Linear
    assert type(program.target.embed_tokens) is nn.Embedding
    q = state.quantization
    assert q["lm_head"] and q["draft"] and "target.lm_head" in q["layers"] and "draft.fc" in q["layers"]
    assert "draft.layers.1.mlp.down_proj" in q["layers"] and "draft.markov_head.markov_w2" in q["layers"]


def test_head_and_draft_of_an_fp8_checkpoint_without_quantize(golden_dir: Path, tmp_path: Path) -> None:
    """A pre-quantized FP8 target: ``--quantize-lm-head`` / ``--quantize-draft`` apply without ``--quantize`` (they
    were ignored), and the checkpoint's layers stay as it holds them (its block scales, [N, K / 32] here, not
    re-quantized per channel)."""
    pair = golden_dir / "dspark_tiny"
    write_fp8_target(pair / "target", tmp_path / "fp8", "hf_block", block=(32, 32))
    states = {}
    for flags in (False, True):
        (tmp_path / str(flags)).mkdir()
        states[flags] = _state((tmp_path / "fp8", pair / "draft"), tmp_path / str(flags), quantize_lm_head=flags,
                               quantize_draft=flags)
    kept, both = states[False].program, states[True].program
    assert type(kept.target.lm_head) is nn.Linear and not any(isinstance(m, Fp8Linear) for m in kept.draft.modules())
    assert isinstance(both.target.lm_head, Fp8Linear) and both.draft.lm_head is both.target.lm_head
    assert isinstance(both.draft.fc, Fp8Linear) and isinstance(both.draft.markov_head.markov_w2, Fp8Linear)
    q, q0 = states[True].quantization, states[False].quantization
    assert q["method"] == q0["method"] == "fp8_block" and q["scheme"] is None and q["lm_head"] and q["draft"]
    layers = {k: v for k, v in q["layers"].items() if k.startswith("target.layers.")}
    assert layers == q0["layers"] and len(layers) == 28
    assert layers["target.layers.0.self_attn.q_proj"]["shape"] == [64, 2]


def test_gemma4_softcapped_head_quantized_with_its_cap(golden_dir: Path, tmp_path: Path) -> None:
    """Gemma4's soft-capped LM head in e4m3 when asked (it was left in bf16 without a word): the cap applied after
    the e4m3 product, the draft sharing the head, the tied embedding keeping its full-precision rows; the manifest
    says so; logits within the cap and close to the full-precision head's."""
    from dspark_compile.models.gemma4 import SoftcappedFp8Head, SoftcappedHead, softcap

    pair = (golden_dir / "dspark_tiny_gemma4" / "target", golden_dir / "dspark_tiny_gemma4" / "draft")
    plain = _state(pair, tmp_path / "plain", quantize="fp8")
    state = _state(pair, tmp_path / "head", quantize="fp8", quantize_lm_head=True)
    assert type(plain.program.target.lm_head) is SoftcappedHead and not plain.quantization["lm_head"]
    target, draft = state.program.target, state.program.draft
    head = target.lm_head
    assert type(head) is SoftcappedFp8Head and draft.lm_head is head and state.quantization["lm_head"]
    assert head.cap == plain.program.target.lm_head.cap is not None and "target.lm_head" in state.quantization["layers"]
    embed = target.embed_tokens.weight
    assert embed.dtype != torch.float8_e4m3fn and torch.equal(embed, plain.program.target.embed_tokens.weight)
    x = torch.randn(3, head.in_features) * 4
    with torch.no_grad():
        got, full = head(x), plain.program.target.lm_head(x)
        assert torch.equal(got, softcap(Fp8Linear.forward(head, x), head.cap))
        assert float(got.abs().max()) <= head.cap and not torch.equal(got, full)
        assert float(nn.functional.cosine_similarity(got.flatten(), full.flatten(), dim=0)) > 0.995


def test_a_head_without_an_e4m3_form_is_refused() -> None:
    with pytest.raises(UsageError, match="--quantize-lm-head: no e4m3 form of a Identity LM head"):
        quantize.quantize_head(nn.Identity())


def test_fp8_dynamic_quantizes_the_inputs_of_every_fp8_layer(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """``--quantize fp8-dynamic``: the same e4m3 weights, and each FP8 layer's input e4m3 per row and group
    (gcd(K, 128) columns: 64 and 128 on the golden pair), which the layer's output shows: its input rounded to
    e4m3 per group, times the dequantized weight, equals the layer's output."""
    state = _state(golden_pair, tmp_path, quantize="fp8-dynamic", quantize_draft=True)
    program = state.program
    fp8 = [m for m in program.target.layers.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 28 and {m.act_group for m in fp8} == {64, 128}
    assert all(m.act_group == 128 for m in fp8 if m.in_features == 128)
    assert all(m.act_group for m in program.draft.layers.modules() if isinstance(m, Fp8Linear))
    assert not program.draft.markov_head.markov_w2.act_group  # its input, a row of W1, stays in the model dtype
    q = state.quantization
    assert q["method"] == "fp8-dynamic" and "activations e4m3 per row" in q["scheme"]
    assert q["layers"]["target.layers.0.mlp.down_proj"]["activation_group"] == 128
    lin = program.target.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    x[0, :64] *= 1000.0  # a loud group: the other group of that row keeps its own scale
    xg = x.reshape(3, -1, 128)
    scale = xg.abs().amax(-1, keepdim=True) / FP8_MAX
    xq = ((xg * (FP8_MAX / xg.abs().amax(-1, keepdim=True))).to(torch.float8_e4m3fn).float() * scale).reshape(3, -1)
    want = nn.functional.linear(xq, lin.dequantized(torch.float32))
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lin(x), nn.functional.linear(x, lin.dequantized(torch.float32)), rtol=1e-3)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux /proc/self/smaps")
def test_quantized_weights_give_back_their_checkpoint_pages(tmp_path: Path) -> None:
    """A weight read through the checkpoint's memory map leaves the build's resident set once quantized (the
    bytes stay readable from the file, unchanged); memory the process owns is never touched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    full = torch.randn(512, 4096).to(torch.bfloat16)  # 4 MiB: whole pages
    save_file({"w": full}, str(path))
    handle = safe_open(str(path), framework="pt")
    mapped = handle.get_tensor("w")

    def resident_kib() -> int:  # Rss of the file's mapping
        total, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if "-" in line.split(" ", 1)[0]:
                inside = line.endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    root = nn.Sequential(nn.Linear(4096, 512, bias=False), nn.Linear(4096, 512, bias=False))
    root[0].weight = nn.Parameter(mapped, requires_grad=False)
    owned = full.clone()
    root[1].weight = nn.Parameter(owned, requires_grad=False)
    assert torch.equal(mapped, full)  # reads every page
    before = resident_kib()
    assert quantize.quantize_module(root) == ["0", "1"]
    assert before >= 4000 and resident_kib() <= before - 4000
    assert torch.equal(mapped, full)  # read back from the file
    assert torch.equal(owned, full)  # memory the process owns is left alone


def test_dynamic_activation_scales_are_correctly_rounded_quotients() -> None:
    """The W8A8 reference's 448/amax and amax/448 are the correctly rounded float32 quotients, as the decode GEMM's
    ``div_rn`` computes them: torch's division by a Python number is a product with its reciprocal, an ulp off in
    about one group in five here, and bf16 inputs often fall on a tie between two e4m3 values, which that ulp
    decides (on an H100 it moved an output by 2.6 % of the largest, docs/BENCH.md, "W8A8 through cuBLAS")."""
    from dspark_compile.models.layers import fp8_group_quantize_dequantize

    torch.manual_seed(0)
    x = torch.randn(512, 4096).to(torch.bfloat16)
    x[0, :128] *= 100
    xg = x.float().reshape(512, 32, 128)
    amax = xg.abs().amax(-1, keepdim=True).double()
    inv, scale = (FP8_MAX / amax).float(), (amax / FP8_MAX).float()
    want = ((xg * inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).reshape(512, 4096)
    assert torch.equal(fp8_group_quantize_dequantize(x, 128), want)
    reciprocal = ((xg * (FP8_MAX / xg.abs().amax(-1, keepdim=True))).clamp(-FP8_MAX, FP8_MAX)
                  .to(torch.float8_e4m3fn).float() * scale).reshape(512, 4096)
    assert not torch.equal(reciprocal, want)  # the input has ties that an ulp of 448/amax decides


def test_readme_api_path_decodes_gemma4_with_e4m3_head_and_draft_losslessly(golden_dir: Path) -> None:
    """The README's way to the quantized head on the torch CUDA-graph target: ``quantize_program`` then
    ``CudaGraphBackend``; on the CPU its rounds run the modules, Gemma4's soft-capped e4m3 head shared by the draft,
    and speculative decoding gives the target-only tokens."""
    from dspark_compile.models.gemma4 import SoftcappedFp8Head
    from dspark_compile.program import build_program
    from dspark_compile.targets.torch import CudaGraphBackend
    from dspark_compile.targets.torch.bench import decode_rounds

    g = golden_dir / "dspark_tiny_gemma4"
    program = build_program(g / "target", g / "draft")
    quantize.quantize_program(program, lm_head=True, draft=True)
    assert type(program.target.lm_head) is SoftcappedFp8Head and program.draft.lm_head is program.target.lm_head
    backend = CudaGraphBackend(program.target, program.draft)
    prompts = [[1, 2, 3, 4], [40, 7, 300]]
    spec = decode_rounds(backend, prompts, max_new_tokens=12)
    alone = decode_rounds(backend, prompts, max_new_tokens=12, speculative=False)
    assert spec.tokens == alone.tokens and all(len(t) == 12 for t in spec.tokens)
