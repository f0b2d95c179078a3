"""Pass `validate`: refuse an inconsistent (target, draft) pair, or a spec the draft was not trained for,
before anything is built."""

from __future__ import annotations

from dspark_compile.build_state import BuildState
from dspark_compile.checkpoint import check_pair
from dspark_compile.errors import UsageError
from dspark_compile.runtime.decode import read_prompt_file, validate_prompts
from dspark_compile.runtime.onnxruntime_dtypes import check_onnxruntime_dtype


def run(state: BuildState) -> None:
    pair, spec = state.pair, state.spec
    assert pair is not None and pair.draft is not None
    check_pair(pair.target, pair.draft)
    trained = pair.draft.config.block_size
    if spec.block_size is not None and spec.block_size > trained:
        raise UsageError(f"--block-size {spec.block_size} exceeds the draft's trained block_size {trained} "
                         f"({pair.draft.path / 'config.json'}); use a value in [1, {trained}]")
    # A Triton repository without engines, or with the in-process orchestrator, runs the graphs on onnxruntime:
    # refuse a dtype it cannot run now, not after the export.
    if "triton" in spec.targets and ("tensorrt" not in spec.targets or spec.triton_mode == "onnxruntime_inprocess"):
        check_onnxruntime_dtype(spec.dtype, f"--targets {','.join(spec.targets)} --triton-mode {spec.triton_mode} "
                                      "(a Triton repository served by onnxruntime)")
    if spec.check_acceptance is not None:  # its prompts are decoded after the build: a bad file fails now instead
        prompts = read_prompt_file(spec.check_acceptance, spec.target)
        try:
            state.acceptance_prompts = validate_prompts(prompts, pair.target.config.vocab_size)
        except UsageError as exc:
            raise UsageError(f"--check-acceptance {spec.check_acceptance}: {exc}") from None
