"""The onnxruntime transport of the graph executor through `api.run`: the golden build decodes the authors'
tokens, and a missing or unfinished build is a UsageError that says what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dspark_compile import api
from dspark_compile.errors import UsageError
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.onnxruntime_backend import load_onnxruntime

pytest.importorskip("onnxruntime")




@pytest.fixture
def build_copy(golden_build: Path, tmp_path: Path) -> Path:
    """A private copy of the golden build (final graphs only), to damage."""
    copy = tmp_path / "build"
    shutil.copytree(golden_build, copy, ignore=shutil.ignore_patterns("dump"))
    return copy


def _assert_golden(results: list[Any], expected: list[dict[str, Any]]) -> None:
    for got, want in zip(results, expected, strict=True):
        assert got.tokens == want["tokens"]
        assert [r["accepted"] for r in got.rounds] == want["acceptance_lengths"]


@pytest.mark.parametrize(("verify", "trace"), [("fixed", "greedy"), ("auto", "greedy"),
                                               ("threshold=0.5", "threshold_0.5")])
def test_run_reproduces_the_golden_traces(golden_build: Path, golden_trace: dict[str, Any], verify: str,
                                          trace: str) -> None:
    prompts = [e["prompt"] for e in golden_trace[trace]]
    results = api.run(golden_build, prompts, backend="onnxruntime", max_new_tokens=48, verify=verify)
    _assert_golden(results, golden_trace[trace])


def test_plain_rounds_on_the_golden_graphs(golden_build: Path, golden_trace: dict[str, Any]) -> None:
    """VerifyPolicy(draft_rows=0) through onnxruntime: every round verifies the anchor alone (a target_step of one
    position a row), drafting nothing; the golden pair decodes its target-only baseline."""
    from dspark_compile.runtime.decode import GenerationParams, VerifyPolicy, generate

    prompts = [e["prompt"] for e in golden_trace["baseline"]]
    res = generate(load_onnxruntime(golden_build), prompts,
                   GenerationParams(max_new_tokens=24, policy=VerifyPolicy(draft_rows=0)))
    assert [r.tokens for r in res] == [e["tokens"][:24] for e in golden_trace["baseline"]]
    assert all(r["draft"] == [] and r["accepted"] == 1 for x in res for r in x.rounds)


def test_model_info_comes_from_the_manifest(golden_build: Path) -> None:
    backend = load_onnxruntime(golden_build)
    manifest = json.loads((golden_build / "manifest.json").read_text())
    assert backend.info == ProgramInfo.from_json(manifest["program"])
    assert (backend.info.vocab_size, backend.info.block_size, backend.info.tap_width) == (384, 7, 192)
    assert (backend.info.has_confidence, backend.info.eos_token_ids, backend.info.sampling) == (True, (), True)
    assert (backend.info.kv_heads, backend.info.head_dim, backend.info.draft_layers) == (2, 16, 2)
    assert backend.transport.provider == "CPUExecutionProvider"


def test_missing_build_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no-build: no such build directory; pass the --out directory"):
        api.run(tmp_path / "no-build", [[1, 2, 3]])


def test_missing_manifest(build_copy: Path) -> None:
    (build_copy / "manifest.json").unlink()
    with pytest.raises(UsageError, match=r"build: no manifest\.json; pass the output directory of `dspark-compile"):
        api.run(build_copy, [[1, 2, 3]])


def test_corrupt_manifest(build_copy: Path) -> None:
    (build_copy / "manifest.json").write_text('{"format": 1,')
    with pytest.raises(UsageError, match=r"manifest\.json: not valid JSON \(.*\); rebuild the directory"):
        api.run(build_copy, [[1, 2, 3]])


def test_missing_graph_file(build_copy: Path) -> None:
    (build_copy / "onnx" / "draft_propose.onnx").unlink()
    with pytest.raises(UsageError, match=r"onnx/draft_propose\.onnx: missing; rebuild with `dspark-compile build"):
        api.run(build_copy, [[1, 2, 3]])


def test_build_stopped_early(build_copy: Path) -> None:
    path = build_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    names = [p["name"] for p in manifest["passes"]]
    stop = names.index("export_onnx") + 1
    manifest["passes"] = manifest["passes"][:stop] + manifest["passes"][-1:]  # as --stop-after export_onnx writes it
    path.write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"stopped after pass `export_onnx`, before its graphs were final"):
        api.run(build_copy, [[1, 2, 3]])


@pytest.fixture(scope="module")
def greedy_build(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pair = golden_dir / "dspark_tiny"
    out = tmp_path_factory.mktemp("greedy") / "build"
    api.build(target=pair / "target", draft=pair / "draft", out=out, verify_mode="greedy", progress=False)
    return out


@pytest.mark.slow  # builds the greedy-mode graphs (~30 s)
def test_greedy_mode_build_reproduces_the_golden_tokens(greedy_build: Path, golden_trace: dict[str, Any]) -> None:
    prompts = [e["prompt"] for e in golden_trace["greedy"]]
    assert load_onnxruntime(greedy_build).info.sampling is False
    _assert_golden(api.run(greedy_build, prompts, max_new_tokens=48, verify="fixed"), golden_trace["greedy"])


@pytest.mark.slow  # uses the greedy-mode build
def test_temperature_on_a_greedy_build_is_a_usage_error(greedy_build: Path) -> None:
    with pytest.raises(UsageError, match=r"built for greedy verification only; rebuild with --verify-mode sampling"):
        api.run(greedy_build, [[1, 2, 3]], temperature=0.8)
