"""Pass `check_acceptance`: does the compiled model still speculate as well as the checkpoint it came from?

``--check-acceptance PROMPTS.jsonl`` decodes the prompts greedily, every draft verified, with the built ONNX
graphs (quantized or not) and with the float32 reference program, and reports both acceptances (τ, survival)
and their tokens' agreement. A τ drop over ``--max-tau-drop`` fails the build (exit 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.runtime.decode import GenerationParams, GenerationResult, VerifyPolicy, generate

NEW_TOKENS = 64


def decode(backend: Any, prompts: Sequence[Sequence[int]], *, new_tokens: int = NEW_TOKENS,
           speculative: bool = True) -> list[GenerationResult]:
    """Greedy decoding of every prompt, every draft verified, ``new_tokens`` each (EOS does not stop it)."""
    params = GenerationParams(max_new_tokens=new_tokens, policy=VerifyPolicy("fixed"), stop_on_eos=False)
    return generate(backend, prompts, params, speculative=speculative)


def acceptance(results: Sequence[GenerationResult], block_size: int) -> dict[str, Any]:
    """τ and survival s_k = P(accepted drafts > k) over every round of ``results``."""
    drafts = np.array([r["accepted"] - 1 for res in results for r in res.rounds], dtype=np.int64)
    survival = [float((drafts > k).mean()) if drafts.size else 0.0 for k in range(block_size)]
    return {"rounds": int(drafts.size), "tau": float(drafts.mean() + 1) if drafts.size else 0.0,
            "survival": survival}


def agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Position-wise equal tokens and the length of the common prefix, per prompt, averaged."""
    equal, prefix = [], []
    for a, b in zip(tokens, reference, strict=True):
        n = min(len(a), len(b))
        same = [x == y for x, y in zip(a[:n], b[:n], strict=True)]
        equal.append(sum(same) / max(n, 1))
        prefix.append(same.index(False) if False in same else n)
    return {"token_agreement": float(np.mean(equal)), "mean_common_prefix": float(np.mean(prefix)),
            "identical": float(np.mean([p == len(b) for p, b in zip(prefix, reference, strict=True)]))}


def compare(built: Sequence[GenerationResult], reference: Sequence[GenerationResult], block_size: int,
            max_tau_drop: float) -> dict[str, Any]:
    """The report of the pass (see the module docstring); ``passed`` is False when τ dropped too much."""
    b, r = acceptance(built, block_size), acceptance(reference, block_size)
    drop = (r["tau"] - b["tau"]) / r["tau"] if r["tau"] else 0.0
    return {"prompts": len(built), "new_tokens": len(reference[0].tokens) if reference else 0, "built": b,
            "reference": r, "tau_drop": drop, "max_tau_drop": max_tau_drop, "passed": drop <= max_tau_drop,
            "greedy_agreement": agreement([x.tokens for x in built], [x.tokens for x in reference])}


def built_backend(state: BuildState) -> tuple[str, Any]:
    """The executor over the graphs this build wrote: onnxruntime sessions on ``workdir/onnx``."""
    from dspark_compile.runtime.onnxruntime_backend import ort_executor

    assert state.info is not None
    return "onnxruntime", ort_executor(state.workdir, state.info, {"weight_inputs": state.weight_inputs or {}},
                                       providers=["CPUExecutionProvider"],
                                       what="--check-acceptance (runs the built graphs on onnxruntime)")


def run(state: BuildState) -> None:
    from dspark_compile.program import make_program
    from dspark_compile.runtime.torch_backend import TorchBackend

    spec = state.spec
    prompts = state.acceptance_prompts
    assert prompts is not None and state.pair is not None and state.info is not None
    g = state.info.block_size
    name, backend = built_backend(state)
    reference = TorchBackend.from_program(make_program(state.pair, dtype="fp32"), block_size=g)
    report = compare(decode(backend, prompts), decode(reference, prompts), g, spec.max_tau_drop)
    state.acceptance = {"backend": name, "prompts_file": str(spec.check_acceptance), **report}
    if not report["passed"]:
        raise BuildError(f"--check-acceptance {spec.check_acceptance}: τ dropped by {100 * report['tau_drop']:.1f}% "
                         f"(built {report['built']['tau']:.3f} vs reference {report['reference']['tau']:.3f}), more "
                         f"than --max-tau-drop {spec.max_tau_drop:g}; build without --quantize or raise --max-tau-drop")
