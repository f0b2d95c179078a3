"""Bad inputs through the real entry point: one ``error:`` line on stderr naming the culprit, exit code 2.

Broken checkpoints are made from a good tiny pair with exactly one defect each. Every case runs the console
script's code path, ``sys.argv = ["dspark-compile", ...]; main()``, in its own process: a helper process
imports torch once and forks a child per case (a fresh interpreter per case would spend ~2 s of CPU each
importing torch), capturing the child's exit status and its stdout/stderr file descriptors. A sample of the
cases also runs as genuine ``python -m dspark_compile.cli`` and ``dspark-compile`` processes and must give
byte-identical results, which keeps the fork harness honest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from dspark_compile.examples import make_tiny_pair

FORK_RUNNER = r"""
import json, os, sys, tempfile, traceback
import click, torch  # the expensive imports, once, before forking
import dspark_compile.api, dspark_compile.program, dspark_compile.runtime.torch_backend  # noqa: F401
from dspark_compile.cli import main

results = []
for args in json.load(sys.stdin):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = 1
            try:
                sys.argv = ["dspark-compile", *args]
                main()  # what the console script does: sys.exit(main())
                code = 0
            except SystemExit as exc:
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        results.append({"code": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(),
                        "stderr": err.read().decode()})
json.dump(results, sys.stdout)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@dataclass(frozen=True)
class Case:
    args: list[str]
    needles: tuple[str, ...]  # substrings the error line must contain (the file/flag/field at fault)
    code: int = 2


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def _build_cases(root: Path, edit_config: Callable[..., Path], edit_weights: Callable[..., Path]) -> dict[str, Case]:
    good_t, good_d = make_tiny_pair(root / "good", vocab_size=64, hidden_size=32, intermediate_size=48,
                                    num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16, block_size=3,
                                    markov_rank=4)
    t, d = str(good_t), str(good_d)

    def copy(src: Path, name: str) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        return dst

    def gen(target: str = t, draft: str = d, *extra: str, prompt: tuple[str, ...] = ("--prompt-ids", "1,2,3"),
            ) -> list[str]:
        return ["generate", "--target", target, "--draft", draft, *prompt, "--max-new-tokens", "2", *extra]

    cases: dict[str, Case] = {}

    missing_config = copy(good_d, "missing_config")
    (missing_config / "config.json").unlink()
    cases["missing_config"] = Case(gen(draft=str(missing_config)), (str(missing_config / "config.json"), "missing"))

    bad_json = copy(good_t, "bad_json")
    (bad_json / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"], ')
    cases["bad_json_config"] = Case(gen(target=str(bad_json)), (str(bad_json / "config.json"), "JSON"))

    truncated = copy(good_d, "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases["truncated_safetensors"] = Case(gen(draft=str(truncated)), (str(weights), "truncated"))

    absurd = copy(good_t, "absurd_header")
    weights = absurd / "model.safetensors"
    weights.write_bytes((2**62).to_bytes(8, "little") + weights.read_bytes()[8:])
    cases["absurd_header_size"] = Case(gen(target=str(absurd)), (str(weights), "header too large"))

    wrong_shape = copy(good_d, "wrong_shape")
    path = edit_weights(wrong_shape, lambda w: w.update({"fc.weight": torch.zeros(32, 64)}))
    cases["wrong_tensor_shape"] = Case(gen(draft=str(wrong_shape)), (str(path), "`fc.weight`", "[32, 64]"))

    missing_tensor = copy(good_d, "missing_tensor")
    path = edit_weights(missing_tensor, lambda w: w.pop("layers.1.mlp.up_proj.weight"))
    cases["missing_tensor"] = Case(gen(draft=str(missing_tensor)), (str(path), "`layers.1.mlp.up_proj.weight`",
                                                                      "missing"))

    _, vocab_d = make_tiny_pair(root / "vocab", vocab_size=80, hidden_size=32, intermediate_size=48,
                                num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16, block_size=3, markov_rank=4)
    cases["vocab_mismatch"] = Case(gen(draft=str(vocab_d)), (str(vocab_d / "config.json"), "`vocab_size` is 80",
                                                             "expected 64"))

    _, hidden_d = make_tiny_pair(root / "hidden", vocab_size=64, hidden_size=48, intermediate_size=48,
                                 num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16, block_size=3, markov_rank=4)
    cases["hidden_size_mismatch"] = Case(gen(draft=str(hidden_d)), (str(hidden_d / "config.json"),
                                                                    "`hidden_size` is 48", "expected 32"))

    out_of_range = copy(good_d, "layer_out_of_range")
    path = edit_config(out_of_range, target_layer_ids=[0, 1, 7])
    cases["layer_id_out_of_range"] = Case(gen(draft=str(out_of_range)), (str(path), "`target_layer_ids`", "7"))

    last_layer = copy(good_d, "layer_is_last")
    path = edit_config(last_layer, target_layer_ids=[0, 1, 3])
    cases["layer_id_is_last"] = Case(gen(draft=str(last_layer)), (str(path), "last layer"))

    pickle_only = root / "pickle_only"
    pickle_only.mkdir()
    shutil.copy(good_t / "config.json", pickle_only / "config.json")
    torch.save({"model.norm.weight": torch.ones(32)}, pickle_only / "pytorch_model.bin")
    cases["pickle_only"] = Case(gen(target=str(pickle_only)), (str(pickle_only), "pickle", "pytorch_model.bin"))

    empty = root / "empty"
    empty.mkdir()
    cases["empty_directory"] = Case(gen(draft=str(empty)), (str(empty), "empty"))

    llama = copy(good_t, "llama")
    path = edit_config(llama, architectures=["LlamaForCausalLM"])
    cases["unknown_architecture"] = Case(gen(target=str(llama)), (str(path), "LlamaForCausalLM"))
    cases["draft_given_as_target"] = Case(gen(target=d, draft=t), (str(good_d / "config.json"), "Qwen3DSparkModel"))

    lstm = copy(good_d, "lstm")
    path = edit_config(lstm, markov_head_type="lstm")
    cases["unknown_markov_head"] = Case(gen(draft=str(lstm)), (str(path), "`markov_head_type`", "lstm"))

    nan = copy(good_d, "nan")
    path = edit_weights(nan, lambda w: w["fc.weight"].view(-1)[5:8].fill_(float("nan")))
    cases["nan_weights"] = Case(gen(draft=str(nan)), (str(path), "`fc.weight`", "3 NaN"))

    int_weights = copy(good_d, "int_weights")
    path = edit_weights(int_weights, lambda w: w.update({"norm.weight": w["norm.weight"].to(torch.int32)}))
    cases["integer_weights"] = Case(gen(draft=str(int_weights)), (str(path), "`norm.weight`", "I32"))

    missing = root / "does" / "not" / "exist"
    cases["nonexistent_target"] = Case(gen(target=str(missing)), (str(missing), "does not exist"))
    cases["path_is_a_file"] = Case(["inspect", t, str(good_d / "config.json")], (str(good_d / "config.json"),
                                                                                 "found a file"))

    cases["non_numeric_prompt_ids"] = Case(gen(prompt=("--prompt-ids", "1,a,3")), ("--prompt-ids", "1,a,3"))
    cases["empty_prompt_ids"] = Case(gen(prompt=("--prompt-ids", ",")), ("--prompt-ids",))
    cases["prompt_id_out_of_vocab"] = Case(gen(prompt=("--prompt-ids", "1,64")), ("token id 64", "[0, 64)"))
    empty_prompt_file = root / "empty_prompt.jsonl"
    empty_prompt_file.write_text("[1, 2]\n[]\n")
    cases["empty_prompt_in_file"] = Case(gen(prompt=("--prompt-file", str(empty_prompt_file))),
                                         ("prompt 1 is empty",))
    bad_prompt_file = root / "bad_prompt.jsonl"
    bad_prompt_file.write_text('[1, 2]\n{"prompt_ids": [1, "x"]}\n')
    cases["bad_prompt_file_line"] = Case(gen(prompt=("--prompt-file", str(bad_prompt_file))),
                                         (f"{bad_prompt_file}:2",))
    cases["missing_prompt_file"] = Case(gen(prompt=("--prompt-file", str(root / "nope.jsonl"))),
                                        (str(root / "nope.jsonl"), "not found"))
    cases["both_prompt_sources"] = Case(gen(prompt=("--prompt-ids", "1,2", "--prompt-file", str(bad_prompt_file))),
                                        ("--prompt-ids", "--prompt-file"))
    cases["no_prompt"] = Case(gen(prompt=()), ("--prompt-ids", "--prompt-file"))
    cases["block_size_zero"] = Case(gen(t, d, "--block-size", "0"), ("--block-size", "found 0"))
    cases["negative_temperature"] = Case(gen(t, d, "--temperature", "-0.5"), ("temperature", "-0.5"))
    cases["max_new_tokens_zero"] = Case(gen(t, d, "--max-new-tokens", "0"), ("max_new_tokens", "found 0"))
    cases["verify_bogus"] = Case(gen(t, d, "--verify", "bogus"), ("--verify", "bogus"))
    cases["verify_threshold_out_of_range"] = Case(gen(t, d, "--verify", "threshold=1.5"), ("--verify", "1.5"))
    cases["verify_fixed_cap_negative"] = Case(gen(t, d, "--verify", "fixed=-1"), ("--verify", "fixed=-1", "fixed=3"))
    cases["draft_rows_negative"] = Case(gen(t, d, "--draft-rows", "-3"), ("--draft-rows", "found -3"))
    # the message names --verify although --confidence-threshold was given (api.generate's range check)
    cases["confidence_threshold_out_of_range"] = Case(gen(t, d, "--confidence-threshold", "1.5"),
                                                      ("threshold", "1.5", "[0, 1]"))
    cases["unknown_flag"] = Case(gen(t, d, "--bogus-flag"), ("--bogus-flag",))
    cases["bad_dtype_choice"] = Case(gen(t, d, "--dtype", "fp8"), ("--dtype", "fp8"))
    cases["draft_missing_without_baseline"] = Case(["generate", "--target", t, "--prompt-ids", "1"], ("--draft",))
    return cases


def _run(args: list[str], entry: str = "module") -> Outcome:
    """One genuine process: ``python -m dspark_compile.cli`` or the installed ``dspark-compile`` script."""
    if entry == "module":
        command = [sys.executable, "-m", "dspark_compile.cli"]
    else:
        script = Path(sys.executable).with_name("dspark-compile")
        found = str(script) if script.is_file() else shutil.which("dspark-compile")
        if found is None:
            pytest.skip(reason="the dspark-compile console script is not installed")
        command = [found]
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=_env(), timeout=300, check=False)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def _run_forked(all_args: list[list[str]]) -> list[Outcome]:
    if not hasattr(os, "fork"):
        return [_run(args) for args in all_args]
    proc = subprocess.run([sys.executable, "-c", FORK_RUNNER], input=json.dumps(all_args), capture_output=True,
                          text=True, env=_env(), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return [Outcome(**o) for o in json.loads(proc.stdout)]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, edit_config: Callable[..., Path],
          edit_weights: Callable[..., Path]) -> dict[str, Case]:
    return _build_cases(tmp_path_factory.mktemp("bad_inputs"), edit_config, edit_weights)


@pytest.fixture(scope="module")
def outcomes(cases: dict[str, Case]) -> dict[str, Outcome]:
    """Every case run once, each in its own (forked) process; ``"good"`` is the undamaged pair."""
    runs = {**{name: case.args for name, case in cases.items()}, "good": _good_args(cases)}
    return dict(zip(runs, _run_forked(list(runs.values())), strict=True))


CASE_NAMES = [
    "missing_config", "bad_json_config", "truncated_safetensors", "absurd_header_size", "wrong_tensor_shape",
    "missing_tensor", "vocab_mismatch", "hidden_size_mismatch", "layer_id_out_of_range", "layer_id_is_last",
    "pickle_only", "empty_directory", "unknown_architecture", "draft_given_as_target", "unknown_markov_head",
    "nan_weights", "integer_weights", "nonexistent_target", "path_is_a_file", "non_numeric_prompt_ids",
    "empty_prompt_ids", "prompt_id_out_of_vocab", "empty_prompt_in_file", "bad_prompt_file_line",
    "missing_prompt_file", "both_prompt_sources", "no_prompt", "block_size_zero", "negative_temperature",
    "max_new_tokens_zero", "verify_bogus", "verify_threshold_out_of_range", "verify_fixed_cap_negative",
    "draft_rows_negative",
    "confidence_threshold_out_of_range",
    "unknown_flag", "bad_dtype_choice", "draft_missing_without_baseline",
]


def test_every_case_is_listed(cases: dict[str, Case]) -> None:
    assert sorted(cases) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gives_one_error_line(name: str, cases: dict[str, Case], outcomes: dict[str, Outcome]) -> None:
    case, out = cases[name], outcomes[name]
    assert "Traceback" not in out.stderr, out.stderr
    assert out.code == case.code, f"exit {out.code}, expected {case.code}; stderr:\n{out.stderr}"
    lines = out.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{out.stderr}"
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: ") + 10, line
    for needle in case.needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert out.stdout == "", f"nothing should reach stdout on an error: {out.stdout!r}"


def _good_args(cases: dict[str, Case]) -> list[str]:
    good = cases["missing_config"].args.copy()
    good[good.index("--draft") + 1] = str(Path(good[good.index("--target") + 1]).parent / "draft")
    return [*good, "--json"]


# Errors raised while loading a checkpoint, by click's parser and by the API; and the good pair.
GENUINE = [("truncated_safetensors", "module"), ("unknown_flag", "module"), ("block_size_zero", "script"),
           ("good", "script")]


def test_genuine_processes_match_the_fork_harness(cases: dict[str, Case], outcomes: dict[str, Outcome]) -> None:
    """Real ``python -m dspark_compile.cli`` / ``dspark-compile`` processes give the same code and bytes; and
    the undamaged pair succeeds through the same entry point (exit 0, a JSON line, a clean stderr)."""
    with ThreadPoolExecutor(max_workers=len(GENUINE)) as pool:
        futures = {(name, entry): pool.submit(_run, _good_args(cases) if name == "good" else cases[name].args, entry)
                   for name, entry in GENUINE}
        real = {job: f.result() for job, f in futures.items()}
    for (name, entry), out in real.items():
        assert asdict(out) == asdict(outcomes[name]), f"{name} via {entry}"
    good = outcomes["good"]
    assert good.code == 0, good.stderr
    assert good.stderr == ""
    obj = json.loads(good.stdout)
    assert set(obj) == {"tokens", "rounds", "mean_accepted"} and len(obj["tokens"]) == 2
