"""The CUDA-graph torch target with Gemma4: its static-cache path (the models' forward with ``InPlaceCache``,
module ops: no fused Gemma4 kernels) decodes the golden gemma4 pair exactly; ``dspark-compile bench
--random-shape`` builds a Gemma4 pair of a published shape on the device.

On a GPU (marker ``gpu``): CUDA graphs reproduce the golden tokens (fp32) with SDPA and the split-K attention, and
small random Gemma4 pairs (one with the 12B's head shapes) decode target-only == speculative in bf16.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from dspark_compile.families import family_of
from dspark_compile.program import build_program
from dspark_compile.runtime.decode import GenerationParams, GenerationResult, VerifyPolicy, generate
from dspark_compile.targets.torch.bench import GEMMA4_12B, GEMMA4_SMOKE, random_pair
from dspark_compile.targets.torch.cuda_graph_backend import CudaGraphBackend

PAIR = "dspark_tiny_gemma4"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gold(golden_dir: Path, mode: str) -> list[dict[str, Any]]:
    return json.loads((golden_dir / PAIR / "decode_greedy.json").read_text())[mode]


def _decode(be: Any, prompts: list[list[int]], mode: str = "greedy", **kw: Any) -> list[GenerationResult]:
    policy = VerifyPolicy("threshold", threshold=0.5) if mode == "threshold_0.5" else VerifyPolicy()
    return generate(be, prompts, GenerationParams(max_new_tokens=48, policy=policy, **kw))


def _assert_golden(got: list[GenerationResult], gold: list[dict[str, Any]]) -> None:
    for r, g in zip(got, gold, strict=True):
        assert r.tokens == g["tokens"]
        assert [x["accepted"] for x in r.rounds] == g["acceptance_lengths"]
        assert [x["draft"] for x in r.rounds] == [y["draft"] for y in g["rounds"]]


@pytest.mark.parametrize("mode", ["greedy", "threshold_0.5"])
def test_static_cache_path_reproduces_gemma4_golden(golden_dir: Path, mode: str) -> None:
    prog = build_program(golden_dir / PAIR / "target", golden_dir / PAIR / "draft")
    be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids)
    assert not be.program.fused  # no fused Gemma4 kernels: the module ops over the static caches
    gold = _gold(golden_dir, mode)
    _assert_golden(_decode(be, [g["prompt"] for g in gold], mode), gold)


def test_random_gemma4_shapes() -> None:
    """The published 12B shape's configs (meta device: no memory) and a smoke pair decoding losslessly."""
    tcfg, dcfg = GEMMA4_12B.configs()
    assert (tcfg.num_key_value_heads, tcfg.head_dim, dcfg.base.num_key_value_heads, dcfg.base.head_dim) == (
        8, 512, 1, 512)
    with torch.device("meta"):
        target = family_of(tcfg).target(tcfg, dcfg.target_layer_ids)
    target.lm_head.weight = target.embed_tokens.weight  # tied, as random_pair ties them
    params = {id(p): p.numel() for p in target.parameters()}
    assert 11.5e9 < sum(params.values()) < 12.5e9  # ~11.95B published, tied embeddings counted once
    target, draft = random_pair(GEMMA4_SMOKE, device="cpu", dtype=torch.float32, std=0.15)
    be = CudaGraphBackend(target, draft)
    prompts = [[5, 9, 17, 33, 2] * 8, list(range(40, 71))]
    spec = _decode(be, prompts)
    base = generate(be, prompts, GenerationParams(max_new_tokens=48), speculative=False)
    assert [r.tokens for r in spec] == [r.tokens for r in base]


def _greedy_without_cache(target: Any, prompt: list[int], n: int) -> list[int]:
    """Cache-free greedy decoding: the whole sequence through the functional forward at every step."""
    ids = list(prompt)
    for _ in range(n):
        x = torch.tensor([ids])
        hidden, _, _ = target(x, torch.zeros(1, dtype=torch.int64), target.new_cache(1, len(ids)))
        ids.append(int(target.logits(hidden)[0, -1].argmax()))
    return ids[len(prompt):]


def test_sliding_layers_keep_a_ring_in_the_static_cache() -> None:
    """The CUDA-graph target keeps each sliding layer's window + G slots (models.gemma4.RingCache), not the
    context: right-padded prompts longer than the ring, then verify blocks whose drafts are partly rejected,
    decode exactly what cache-free greedy decoding gives."""
    target, draft = random_pair(GEMMA4_SMOKE, device="cpu", dtype=torch.float32, std=0.15)
    be = CudaGraphBackend(target, draft)
    prompts = [list(range(3, 60)), [5, 9, 17, 33, 2] * 4, list(range(100, 141))]  # 57, 20, 41 > R = 32 + 7
    spec = _decode(be, prompts)
    cfg, g = target.cfg, draft.block_size
    kv = be._kv
    assert kv.ring.shape == (target.sliding_layers, 2, kv.full.shape[2], cfg.sliding_kv_heads,
                             cfg.sliding_window + g, cfg.sliding_head_dim)
    assert kv.full.shape[0] == cfg.num_hidden_layers - target.sliding_layers  # only the global layers' slots
    assert kv.nbytes < target.new_cache(kv.full.shape[2], kv.full.shape[4]).nbytes / 2
    accepted = [r["accepted"] for res in spec for r in res.rounds]
    assert accepted and max(accepted) < g + 1  # every verify block left rejected (stale) rows in the ring
    for res, prompt in zip(spec, prompts, strict=True):
        assert res.tokens == _greedy_without_cache(target, prompt, len(res.tokens))


def test_cli_bench_random_gemma4_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from dspark_compile.cli import main

    main(["bench", "--random-shape", "gemma4-smoke", "--device", "cpu", "--batch", "1", "--repeats", "1",
          "--context", "40", "--max-new-tokens", "4", "--json", "-q"])
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["family"] == "gemma4" and rep["build"] == "random gemma4-smoke"
    row = rep["batches"][0]
    assert row["lossless_fraction"] == 1.0 and row["t_target_ms"] > 0
    graph_ms = row["decode"]["target_only"]["round_graph_ms"]  # GPU time: none on the CPU
    assert row.get("target_round_vs_floor") == (graph_ms / rep["target_floor_ms"] if graph_ms else None)
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(tmp_path), "--random-shape", "gemma4-smoke"])
    assert exc.value.code == 2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_cuda_graphs_reproduce_gemma4_golden(golden_dir: Path, attention: str) -> None:
    prog = build_program(golden_dir / PAIR / "target", golden_dir / PAIR / "draft", device="cuda")
    be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids, attention=attention)
    assert be.graphs and not be.program.fused
    gold = _gold(golden_dir, "greedy")
    _assert_golden(_decode(be, [g["prompt"] for g in gold]), gold)
    assert be.stats["captures"] > 0 and be.stats["replays"] > 0


GEMMA4_12B_HEADS = replace(GEMMA4_SMOKE, num_heads=16, num_kv_heads=8, head_dim=256, global_kv_heads=1,
                           global_head_dim=512)
"""gemma-4-12B-it's attention geometry (16 query heads; sliding 8 x 256, global 1 x 512: a verify block of the
global layers is 16 x 8 query rows per KV head) on the smoke trunk: the 12B's attention tiles in seconds."""


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [GEMMA4_SMOKE, GEMMA4_12B_HEADS], ids=["smoke", "12b-heads"])
def test_cuda_graphs_gemma4_bf16_lossless_batch3(shape: Any) -> None:
    target, draft = random_pair(shape, device="cuda", dtype=torch.bfloat16, std=0.15)
    be = CudaGraphBackend(target, draft)
    from dspark_compile.targets.torch.decode_gemm import linear

    assert target.lm_head.linear is linear and draft.lm_head is target.lm_head  # the head's product: the kernel's
    prompts = [[5, 9, 17, 33, 2] * 8, list(range(40, 71)), [300, 301, 302, 7, 7, 7, 12, 99]]
    spec = _decode(be, prompts)
    base = generate(be, prompts, GenerationParams(max_new_tokens=48), speculative=False)
    assert [r.tokens for r in spec] == [r.tokens for r in base]
    assert be.stats["captures"] > 0


def test_linear_seam_reproduces_gemma4_golden(golden_dir: Path) -> None:
    """The seam the CUDA-graph target fills with its decode GEMM (``Gemma4Layer.linear`` and
    ``Gemma4Attention.linear``, over the fused q|k|v and gate|up products and o/down): with ``F.linear`` behind
    it, on the CPU, the golden pair decodes exactly and every projection of the layers goes through it."""
    from torch.nn import functional as F

    from dspark_compile.models.gemma4 import Gemma4Layer

    calls: list[tuple[int, ...]] = []

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(weight.shape))
        return F.linear(x, weight)

    prog = build_program(golden_dir / PAIR / "target", golden_dir / PAIR / "draft")
    layers = [m for model in (prog.target, prog.draft) for m in model.modules() if isinstance(m, Gemma4Layer)]
    for layer in layers:
        layer.fuse()
        layer.linear = layer.self_attn.linear = linear
    prog.target.lm_head.linear = linear  # the draft shares the head
    be = CudaGraphBackend(prog.target, prog.draft, eos_token_ids=prog.eos_token_ids)
    gold = _gold(golden_dir, "greedy")
    _assert_golden(_decode(be, [g["prompt"] for g in gold]), gold)
    target_layer = prog.target.layers[0]
    assert tuple(target_layer.gate_up.shape) in calls and tuple(target_layer.self_attn.qkv.shape) in calls
    assert tuple(target_layer.mlp.down_proj.weight.shape) in calls
    assert tuple(target_layer.self_attn.o_proj.weight.shape) in calls
    assert tuple(prog.target.lm_head.weight.shape) in calls
