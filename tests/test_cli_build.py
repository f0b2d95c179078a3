"""`dspark-compile build` / `run` through the real entry point (`cli.main`): JSON output, spec files and their
precedence, and one clear stderr line with exit code 2 for every bad spec file or flag."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_compile.build_spec import FIELDS
from dspark_compile.cli import main


@pytest.fixture(scope="module")
def pair(golden_dir: Path) -> tuple[str, str]:
    return str(golden_dir / "dspark_tiny" / "target"), str(golden_dir / "dspark_tiny" / "draft")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the entry point in-process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_build_json_prints_one_line(pair: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "build"
    code, stdout, err = _cli(["build", "--target", pair[0], "--draft", pair[1], "--out", str(out), "--stop-after",
                              "graft", "--json"], capsys)
    assert (code, err) == (0, "")
    lines = stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["out"] == str(out.resolve())
    assert summary["stopped_after"] == "graft"
    assert [p["name"] for p in summary["passes"]] == ["load", "validate", "graft", "manifest"]
    spec_file = out / "build_spec.json"
    assert summary["artifacts"] == [{"path": "build_spec.json", "bytes": spec_file.stat().st_size,
                                     "sha256": hashlib.sha256(spec_file.read_bytes()).hexdigest()}]
    assert summary["engines"] is None


def _run_json(build: Path, prompts: list[list[int]], capsys: pytest.CaptureFixture[str], *flags: str) -> list[dict]:
    """`run BUILD --json FLAGS` over ``prompts``: one JSON row per prompt, after checking exit 0 and no stderr."""
    argv = ["run", str(build), *flags, "--json"]
    for prompt in prompts:
        argv += ["--prompt-ids", ",".join(map(str, prompt))]
    code, stdout, err = _cli(argv, capsys)
    assert (code, err) == (0, "")
    return [json.loads(line) for line in stdout.splitlines()]


def test_run_json_reproduces_the_golden_tokens(golden_build: Path, golden_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    golden = json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())["greedy"]
    rows = _run_json(golden_build, [e["prompt"] for e in golden], capsys, "--max-new-tokens", "48", "--verify", "fixed")
    assert len(rows) == len(golden)
    for row, want in zip(rows, golden, strict=True):
        assert row["tokens"] == want["tokens"]
        assert [r["accepted"] for r in row["rounds"]] == want["acceptance_lengths"]
        assert row["mean_accepted"] == pytest.approx(want["mean_accepted"])


def test_run_draft_rows(golden_build: Path, golden_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`run --draft-rows 1` over the four golden prompts: every round a plain step while more than one is live, the
    tokens the golden baseline's (greedy is lossless); `--draft-rows -1` is one error line naming the flag, exit 2."""
    base = json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())["baseline"]
    rows = _run_json(golden_build, [e["prompt"] for e in base], capsys, "--max-new-tokens", "24", "--draft-rows", "1")
    assert [r["tokens"] for r in rows] == [e["tokens"][:24] for e in base]
    assert all(r["draft"] == [] for row in rows for r in row["rounds"])  # four rows live to the end: all plain
    code, stdout, err = _cli(["run", str(golden_build), "--prompt-ids", "1,2", "--draft-rows", "-1"], capsys)
    assert (code, stdout) == (2, "")
    assert "--draft-rows" in _one_error_line(err)


def test_run_draft_rows_auto_reads_what_bench_measured(golden_build: Path, golden_dir: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """`--draft-rows auto`: the number in BUILD/draft_rows.json (`bench --plain-rounds` writes it), here 1, decodes
    as `--draft-rows 1` does; measured with another backend or GPU than this run's, one warning line naming the
    file, both backends and the fix; without the file, or with one that holds no row count, one error line naming
    the file and the command that writes it, exit 2."""
    base = json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())["baseline"]
    measured = golden_build / "draft_rows.json"
    code, stdout, err = _cli(["run", str(golden_build), "--prompt-ids", "1,2", "--draft-rows", "auto"], capsys)
    assert (code, stdout) == (2, "")
    line = _one_error_line(err)
    assert str(measured) in line and "dspark-compile bench" in line and "--plain-rounds" in line
    try:
        measured.write_text(json.dumps({"draft_rows": 1}))
        rows = _run_json(golden_build, [e["prompt"] for e in base], capsys, "--max-new-tokens", "24",
                         "--draft-rows", "auto")
        assert [r["tokens"] for r in rows] == [e["tokens"][:24] for e in base]
        assert all(r["draft"] == [] for row in rows for r in row["rounds"])  # four rows live: all plain, as with 1
        assert "measured with" not in caplog.text  # the file names no backend: nothing to compare
        measured.write_text(json.dumps({"draft_rows": 1, "device": "NVIDIA H200",
                                        "backend": {"backend": "torch-cuda-graph", "device": "cuda:0"}}))
        with caplog.at_level(logging.WARNING, logger="dspark_compile"):
            again = _run_json(golden_build, [e["prompt"] for e in base], capsys, "--max-new-tokens", "24",
                              "--draft-rows", "auto")
        assert [r["tokens"] for r in again] == [r["tokens"] for r in rows]
        warned = [r.getMessage() for r in caplog.records if "measured with" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert all(part in warned[0] for part in (str(measured), "torch-cuda-graph on NVIDIA H200", "on cpu",
                                                  "measures only the torch CUDA-graph backend",
                                                  "pass a number of rows")), warned[0]
        measured.write_text(json.dumps({"draft_rows": "many"}))
        code, stdout, err = _cli(["run", str(golden_build), "--prompt-ids", "1,2", "--draft-rows", "auto"], capsys)
        assert (code, stdout) == (2, "")
        assert "holds draft_rows 'many'" in _one_error_line(err)
    finally:
        measured.unlink(missing_ok=True)
    code, stdout, err = _cli(["run", str(golden_build), "--prompt-ids", "1,2", "--draft-rows", "most"], capsys)
    assert (code, stdout) == (2, "")
    assert "--draft-rows" in _one_error_line(err) and "or auto" in err


EVERY_FIELD = """\
[build]
target = "{target}"
draft = "{draft}"
out = "built"  # relative: resolved against this file's directory
dtype = "fp16"
block_size = 5
max_batch = 4
max_context = 512
verify_mode = "greedy"
targets = ["onnx", "triton"]
trt_flavor = "rtx"
no_plugin = true
opset = 19
allow_nonfinite = true
kv_buckets = [128, 512]
triton_mode = "onnxruntime_inprocess"
quantize = "fp8"
quantize_lm_head = true
quantize_draft = true
check_acceptance = "prompts.jsonl"  # relative: resolved like out
max_tau_drop = 0.05
gpu_memory = "80GiB"
max_engine_gb = 2.5
"""


def test_spec_file_with_every_field_and_flag_precedence(pair: tuple[str, str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(EVERY_FIELD.format(target=pair[0], draft=pair[1]))
    assert {line.split(" =")[0] for line in spec.read_text().splitlines()[1:]} == set(FIELDS)  # every field
    from_file = {"target": pair[0], "draft": pair[1], "dtype": "fp16", "block_size": 5, "max_batch": 4,
                 "max_context": 512, "verify_mode": "greedy", "targets": ["onnx", "triton"], "trt_flavor": "rtx",
                 "no_plugin": True, "opset": 19, "allow_nonfinite": True, "kv_buckets": [128, 512],
                 "triton_mode": "onnxruntime_inprocess", "quantize": "fp8", "quantize_lm_head": True,
                 "quantize_draft": True, "check_acceptance": str(tmp_path / "prompts.jsonl"), "max_tau_drop": 0.05,
                 "gpu_memory": "80GiB", "max_engine_gb": 2.5}

    code, _, err = _cli(["build", "--spec", str(spec), "--stop-after", "load", "--json"], capsys)
    assert (code, err) == (0, "")
    assert json.loads((tmp_path / "built" / "build_spec.json").read_text()) == from_file

    out = tmp_path / "flags-win"
    code, stdout, err = _cli(["build", "--spec", str(spec), "--out", str(out), "--dtype", "fp32", "--block-size", "3",
                              "--targets", "onnx", "--max-batch", "2", "--kv-buckets", "64", "--stop-after", "load",
                              "--json"], capsys)
    assert (code, err) == (0, "")
    assert json.loads(stdout)["out"] == str(out)
    flags = {"dtype": "fp32", "block_size": 3, "targets": ["onnx"], "max_batch": 2, "kv_buckets": [64]}
    assert json.loads((out / "build_spec.json").read_text()) == from_file | flags


BAD_SPECS: dict[str, tuple[str, str]] = {  # name -> (file content, expected error after "error: <file>: ")
    "unknown field": ('frobnicate = 1\n', "unknown field(s) frobnicate; known fields: target, draft, out, "),
    "invalid TOML": ('dtype = \n', "not a valid TOML build spec (Invalid value (at line 4, column 9))"),
    "dtype fp8": ('dtype = "fp8"\n', "build spec field `dtype`: expected fp32 | fp16 | bf16, found 'fp8'"),
    "gpu_memory": ('gpu_memory = "lots"\n',
                   "build spec field `gpu_memory`: expected a size such as 80GiB, 24G or 500MB, found 'lots'"),
    "max_engine_gb text": ('max_engine_gb = "big"\n',
                           "build spec field `max_engine_gb`: expected a number of GB > 0 (6 = 6e9 bytes), "
                           "found 'big'"),
    "targets foo": ('targets = ["foo"]\n',
                    "build spec field `targets`: expected a comma-separated subset of onnx, tensorrt, triton, "
                    "found 'foo'"),
    "block_size true": ("block_size = true\n", "build spec field `block_size`: expected an integer in [1, 64], "
                                               "found True"),
    "kv_buckets text": ('kv_buckets = ["big"]\n', "build spec field `kv_buckets`: invalid literal for int()"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_file_is_one_line_naming_the_file(pair: tuple[str, str], tmp_path: Path, case: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    content, expected = BAD_SPECS[case]
    spec = tmp_path / "spec.toml"
    spec.write_text(f'target = "{pair[0]}"\ndraft = "{pair[1]}"\nout = "o"\n{content}')
    code, stdout, err = _cli(["build", "--spec", str(spec)], capsys)
    assert (code, stdout) == (2, "")
    assert _one_error_line(err).startswith(f"error: {spec}: {expected}")
    assert list(tmp_path.iterdir()) == [spec]


@pytest.mark.parametrize(("content", "expected"), [
    ("", "error: `target` is required (flag --target or the spec file)"),
    (None, "error: {spec}: build spec file not found"),
])
def test_missing_target_or_spec_file(tmp_path: Path, content: str | None, expected: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.toml"
    if content is not None:
        spec.write_text(content)
    code, _, err = _cli(["build", "--spec", str(spec)], capsys)
    assert code == 2
    assert _one_error_line(err) == expected.format(spec=spec)


BAD_FLAGS: dict[str, tuple[list[str], str]] = {  # name -> (extra argv, start of the error line)
    "unknown flag": (["--frobnicate"], "error: No such option '--frobnicate'. (see --help)"),
    "targets foo": (["--targets", "foo"], "error: --targets: build spec field `targets`: expected a "),
    "block size 0": (["--block-size", "0"], "error: --block-size: build spec field `block_size`: expected an "
                                            "integer in [1, 64], found 0"),
    "dtype fp8": (["--dtype", "fp8"], "error: Invalid value for '--dtype': 'fp8' is not one of"),
    "max context": (["--max-context", "8"], "error: --max-context: build spec field `max_context`: expected an "
                                            "integer >= 16, found 8"),
    "stop after": (["--stop-after", "export"], "error: --stop-after export: unknown pass; passes: load, "),
    "dump after": (["--dump-after", "optimise"], "error: --dump-after optimise: unknown pass; passes: load, "),
    "block size too large": (["--block-size", "9"], "error: --block-size 9 exceeds the draft's trained block_size 7 "),
    "max engine gb 0": (["--max-engine-gb", "0"], "error: --max-engine-gb: build spec field `max_engine_gb`: "
                                                  "expected a number of GB > 0 (6 = 6e9 bytes), found 0.0"),
    "max engine gb negative": (["--max-engine-gb", "-2"], "error: --max-engine-gb: build spec field "
                                                          "`max_engine_gb`: expected a number of GB > 0 (6 = 6e9 "
                                                          "bytes), found -2.0"),
    "max engine gb text": (["--max-engine-gb", "big"], "error: Invalid value for '--max-engine-gb': 'big' is not a "
                                                       "valid float. (see --help)"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_is_one_line_naming_the_flag(pair: tuple[str, str], tmp_path: Path, case: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    extra, expected = BAD_FLAGS[case]
    argv = ["build", "--target", pair[0], "--draft", pair[1], "--out", str(tmp_path / "out"), *extra]
    code, stdout, err = _cli(argv, capsys)
    assert (code, stdout) == (2, "")
    assert _one_error_line(err).startswith(expected)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial directory


@pytest.mark.parametrize("argv", [["build", "--frobnicate"], ["build", "--spec", "{spec}"],
                                  ["run", "{missing}", "--prompt-ids", "1,2"]])
def test_process_exit_code_and_no_traceback(tmp_path: Path, argv: list[str]) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('target = "t"\ndraft = "d"\nout = "o"\ndtype = "fp8"\n')
    argv = [a.format(spec=spec, missing=tmp_path / "missing") for a in argv]
    proc = subprocess.run([sys.executable, "-m", "dspark_compile.cli", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = _one_error_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert ("--frobnicate" in line) or (str(spec) in line) or (str(tmp_path / "missing") in line)


def test_inspect_build_prints_the_server_memory(golden_build: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`inspect BUILD_DIR`: the manifest's memory (weights, KV caches at max batch x context, total)."""
    manifest = json.loads((golden_build / "manifest.json").read_text())
    code, out, err = _cli(["inspect", str(golden_build), "--json"], capsys)
    assert (code, err) == (0, "")
    assert json.loads(out)["memory"] == manifest["memory"] and json.loads(out)["quantization"] is None
    code, out, _ = _cli(["inspect", str(golden_build)], capsys)
    total = manifest["memory"]["total_bytes"] / 2**30
    assert code == 0 and "at batch 8, 2048 slots" in out and f"total        {total:.2f} GiB" in out
    code, _, err = _cli(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "not a build directory (no manifest.json)" in _one_error_line(err)
