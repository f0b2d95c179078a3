"""The Triton kernels' logic against the reference on the CPU, through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so each check runs in a subprocess. They check the
algorithms (chunk partials and their combination, ties across chunks, the acceptance walk, the chunk-located
draw; for the single-program kernel tiling, early exit, online max/sum), not GPU numerics;
benchmarks/spec_verify_gpu.py checks those on an H100. Vocabularies are small (the interpreter is slow) and
chunks / tiles smaller still, so every row spans several chunks with a masked tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # each check is 15 s to 2 min of Triton's interpreter on 2 cores

CASES_FILE = Path(__file__).resolve().parents[1] / "passes" / "test_decompose_spec_verify.py"

PRELUDE = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np
    import torch
    spec = importlib.util.spec_from_file_location("spec_verify_cases", sys.argv[1])
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    from dspark_compile.plugins.spec_verify.kernel import spec_verify_triton
    from dspark_compile.plugins.spec_verify.reference import random_inputs, spec_verify_reference

    def check(label, mode, inputs, **kw):
        accepted, next_token = spec_verify_triton(**inputs, mode=mode, **kw)
        assert accepted.dtype == next_token.dtype == torch.int64
        try:
            cases.assert_matches_reference(mode, inputs, accepted.numpy(), next_token.numpy())
        except AssertionError as exc:
            raise SystemExit(f"{label} {kw}: {exc}")
        return accepted.numpy(), next_token.numpy()
    """
)

# The decomposition test's named edge cases (G = 0 and 1, clamped lengths, ties, fallback draw, fp16/bf16...).
NAMED_CASES = PRELUDE + textwrap.dedent(
    """
    kw = dict(single_program=True, block_v=16) if sys.argv[2] == "single" else dict(chunk=16)
    for name in sorted(cases.CASES):
        mode, inputs = cases.make_case(name)
        check(name, mode, inputs, **kw)
    print("checked", len(cases.CASES))
    """
)

# Split path: several chunk counts per vocabulary, every dtype, G = 0 / 1 / 4, greedy and sampling.
SPLIT_SWEEP = PRELUDE + textwrap.dedent(
    """
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    mode = sys.argv[2]
    n = 0
    residual_draws = 0
    for seed, (dtype, vocab, gamma, chunks) in enumerate([
        ("fp32", 96, 4, (32, 64)), ("fp16", 300, 1, (32, 64)), ("bf16", 300, 4, (64,)),
        ("fp32", 300, 0, (32,)), ("bf16", 96, 0, (64,)), ("fp16", 96, 7, (32,)),
    ]):
        inputs = random_inputs(12, gamma, vocab, mode=mode, generator=torch.Generator().manual_seed(seed),
                               logits_dtype=dtypes[dtype], greedy_row_prob=0.2)
        for chunk in chunks:
            accepted, _ = check(f"{dtype} V={vocab} G={gamma}", mode, inputs, chunk=chunk)
            lengths = inputs["verify_len"].clamp(0, gamma).numpy()
            residual_draws += int((accepted < lengths).sum())
            n += 1
    # A single chunk (chunk >= V) and the launcher's own choice.
    inputs = random_inputs(5, 3, 100, mode=mode, generator=torch.Generator().manual_seed(9))
    check("one chunk", mode, inputs, chunk=128)
    check("default chunk", mode, inputs)
    assert residual_draws > 0  # rejections happened: the residual / correction path ran
    print("checked", n + 2)
    """
)

# Maxima tied across chunk boundaries: the target token is the first maximum, wherever the chunks split the row.
TIES = PRELUDE + textwrap.dedent(
    """
    gen = torch.Generator().manual_seed(3)
    batch, gamma, vocab, chunk = 8, 5, 160, 32
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        logits = torch.randn(batch, gamma + 1, vocab, generator=gen)
        # Per row, the maximum at 2-4 positions around chunk boundaries (31/32, 63/64, 127/128, 159).
        spots = torch.tensor([31, 32, 63, 64, 95, 127, 128, 159])
        first = torch.empty(batch, gamma + 1, dtype=torch.int64)
        last = torch.empty_like(first)
        for b in range(batch):
            for k in range(gamma + 1):
                chosen = spots[torch.randperm(len(spots), generator=gen)[: 2 + (b + k) % 3]]
                logits[b, k, chosen] = 10.0
                first[b, k], last[b, k] = chosen.min(), chosen.max()
        logits = logits.to(dtype)
        drafts = torch.where(torch.rand(batch, gamma, generator=gen) < 0.8, first[:, :gamma], last[:, :gamma])
        inputs = {"target_logits": logits, "draft_tokens": drafts, "verify_len": torch.full((batch,), gamma)}
        accepted, next_token = check("greedy ties", "greedy", inputs, chunk=chunk)
        assert set(next_token.tolist()) <= set(spots.tolist())
        # Sampling mode with greedy rows (T <= 0) follows the greedy rule through the sampling kernels.
        sampling = inputs | {"draft_probs": torch.full((batch, gamma, vocab), 1.0 / vocab),
                             "temperature": torch.zeros(batch), "uniforms": torch.rand(batch, gamma + 1, generator=gen)}
        check("sampling greedy-row ties", "sampling", sampling, chunk=chunk)
        check("sampling greedy-row ties", "sampling", sampling, chunk=64)
    print("checked ties")
    """
)


def _run(script: str, *args: str) -> str:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", script, str(CASES_FILE), *args],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked" in result.stdout
    return result.stdout


@pytest.mark.parametrize("path", ["split", "single"])
def test_named_cases_match_reference_in_interpreter(path: str) -> None:
    _run(NAMED_CASES, path)


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_split_chunk_counts_dtypes_and_gammas(mode: str) -> None:
    _run(SPLIT_SWEEP, mode)


def test_split_ties_across_chunk_boundaries() -> None:
    _run(TIES)


# The op's CUDA kernel is spec_verify_triton (CUDA tensors dispatch to it; on the CPU its registered function is
# called directly): a few named cases, G = 0 included.
OP_CUDA_KERNEL = PRELUDE + textwrap.dedent(
    """
    from dspark_compile.plugins.spec_verify.op import spec_verify
    cuda_kernel = spec_verify._backend_fns["cuda"]
    names = ["greedy_ties", "greedy_gamma0", "sampling_random", "sampling_gamma0"]
    for name in names:
        mode, inputs = cases.make_case(name)
        accepted, next_token = cuda_kernel(**inputs, mode=mode)
        cases.assert_matches_reference(mode, inputs, accepted.numpy(), next_token.numpy())
    print("checked", len(names))
    """
)


def test_op_cuda_kernel_is_the_triton_kernel() -> None:
    _run(OP_CUDA_KERNEL)
