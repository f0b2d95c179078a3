"""Pass `check_acceptance`: τ, survival and agreement arithmetic; the pass over a build's graphs against the
reference program (passes, in the manifest) and against a worse draft (exit 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.errors import BuildError
from dspark_compile.passes import check_acceptance
from dspark_compile.passes.check_acceptance import acceptance, agreement, compare
from dspark_compile.program import make_program
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.decode import GenerationResult
from dspark_compile.runtime.torch_backend import TorchBackend
from tests.passes.conftest import load_pair


def _result(tokens: list[int], accepted: list[int]) -> GenerationResult:
    return GenerationResult(prompt=[1], tokens=tokens, rounds=[{"accepted": a} for a in accepted])


def test_tau_survival_and_agreement_arithmetic() -> None:
    built = [_result([1, 2, 3, 4], [1, 3]), _result([5, 6, 7, 9], [2, 2])]
    ref = [_result([1, 2, 3, 4], [4]), _result([5, 6, 8, 9], [2, 2])]
    a = acceptance(built, 3)
    assert a["rounds"] == 4 and a["tau"] == pytest.approx(2.0)  # committed per round: 1, 3, 2, 2
    assert a["survival"] == pytest.approx([0.75, 0.25, 0.0])  # accepted drafts 0, 2, 1, 1
    g = agreement([r.tokens for r in built], [r.tokens for r in ref])
    assert g == {"token_agreement": pytest.approx(7 / 8), "mean_common_prefix": pytest.approx(3.0),
                 "identical": pytest.approx(0.5)}
    report = compare(built, ref, 3, 0.03)
    assert report["reference"]["tau"] == pytest.approx(8 / 3)
    assert report["tau_drop"] == pytest.approx(0.25) and not report["passed"]
    assert compare(ref, ref, 3, 0.0)["passed"]


PROMPTS = [[5, 17, 42, 99, 3, 8], [250, 7, 1, 2, 3, 4, 5, 6, 7], [31, 41, 59, 26, 53]]


def _state(golden_build: Path, golden_pair: tuple[Path, Path], tmp_path: Path, **spec: object) -> BuildState:
    """A state as the pipeline leaves it before check_acceptance: the golden build's graphs in the workdir."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    full = BuildSpec(*golden_pair, tmp_path / "out", check_acceptance=prompts, **spec)
    state = BuildState(spec=full, workdir=tmp_path / "work", pair=load_pair(full), acceptance_prompts=PROMPTS)
    state.workdir.mkdir()
    shutil.copytree(golden_build / "onnx", state.workdir / "onnx")
    manifest = json.loads((golden_build / "manifest.json").read_text())
    state.info = ProgramInfo.from_json({**manifest["program"], "sampling": True})
    state.weight_inputs = manifest["weight_inputs"]  # share_weights' record: the shared embedding / LM head
    return state


@pytest.mark.slow  # decodes 3 prompts x 64 tokens on onnxruntime and on the reference
def test_built_graphs_speculate_like_the_reference(golden_build: Path, golden_pair: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    state = _state(golden_build, golden_pair, tmp_path)
    check_acceptance.run(state)
    report = state.acceptance
    assert report["backend"] == "onnxruntime" and report["prompts"] == 3 and report["passed"]
    assert report["tau_drop"] == pytest.approx(0.0) and report["built"] == report["reference"]
    assert report["greedy_agreement"]["identical"] == 1.0 and report["new_tokens"] == 64
    assert len(report["built"]["survival"]) == 7


@pytest.mark.slow
def test_a_worse_build_fails_with_exit_3(golden_build: Path, golden_pair: tuple[Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The golden draft is barely trained (reference τ a little above 1), so any drop is asked to fail.
    state = _state(golden_build, golden_pair, tmp_path, max_tau_drop=0.0)
    program = make_program(state.pair, dtype="fp32")
    with torch.no_grad():  # the "built" draft's logits are all zero: it always proposes token 0
        program.draft.norm.weight.zero_()
        program.draft.markov_head.markov_w2.weight.zero_()
    worse = TorchBackend.from_program(program, block_size=state.info.block_size)
    monkeypatch.setattr(check_acceptance, "built_backend", lambda s: ("onnxruntime", worse))
    with pytest.raises(BuildError, match=r"τ dropped by .* more than --max-tau-drop 0") as err:
        check_acceptance.run(state)
    assert err.value.exit_code == 3 and state.acceptance is not None and not state.acceptance["passed"]
    assert state.acceptance["built"]["tau"] == 1.0 < state.acceptance["reference"]["tau"]
