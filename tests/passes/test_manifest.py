"""Pass `manifest`: what went in (sha256 of every checkpoint file), the versions used, the passes with their
durations, and every artifact with size, sha256 and its I/O signature."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

from dspark_compile.passes.manifest import write_manifest
from dspark_compile.pipeline import BuildState
from dspark_compile.spec import BuildSpec

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PASSES = ["load", "validate", "graft", "partition", "export_onnx", "decompose_spec_verify", "optimize_onnx",
          "share_weights", "check_onnx", "manifest"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def manifest(golden_build: Path) -> dict[str, Any]:
    return json.loads((golden_build / "manifest.json").read_text())


def test_sections(manifest: dict[str, Any], golden_pair: tuple[Path, Path]) -> None:
    assert list(manifest) == ["format", "spec", "inputs", "versions", "passes", "program", "graphs", "engines",
                              "triton", "artifacts"]
    assert manifest["format"] == 1
    assert (manifest["spec"]["target"], manifest["spec"]["draft"]) == tuple(str(p) for p in golden_pair)
    assert manifest["program"] == {
        "vocab_size": 384, "hidden_size": 64, "target_layers": 4, "draft_layers": 2, "kv_heads": 2, "head_dim": 16,
        "draft_kv_heads": 2, "draft_head_dim": 16, "block_size": 7, "tap_layer_ids": [0, 1, 2], "tap_width": 192,
        "has_confidence": True, "markov_head": "vanilla", "eos_token_ids": [], "dtype": "fp32"}
    assert manifest["graphs"] == {"verify_mode": "sampling", "block_size": 7,
                                  "variants": {"target_verify": ["portable", "plugin"]}}
    assert manifest["engines"] is None and manifest["triton"] is None


def test_inputs_are_every_checkpoint_file_hashed(manifest: dict[str, Any], golden_pair: tuple[Path, Path]) -> None:
    want = [(role, f) for role, d in zip(("target", "draft"), golden_pair, strict=True) for f in sorted(d.iterdir())]
    got = sorted((i["role"], Path(i["path"])) for i in manifest["inputs"])
    assert got == sorted(want)
    for entry in manifest["inputs"]:
        path = Path(entry["path"])
        assert (entry["bytes"], entry["sha256"]) == (path.stat().st_size, _sha256(path))


def test_versions_of_the_dependencies_used(manifest: dict[str, Any]) -> None:
    """Checked against sources the pass does not read: each imported module's own ``__version__``, the
    interpreter's ``sys.version_info`` and the version in pyproject.toml."""
    import numpy
    import onnx_ir
    import onnxruntime
    import onnxscript
    import safetensors
    import torch

    versions = manifest["versions"]
    modules = {"torch": torch, "numpy": numpy, "safetensors": safetensors, "onnx": onnx, "onnxscript": onnxscript,
               "onnx-ir": onnx_ir, "onnxruntime": onnxruntime}
    assert {dist: versions[dist] for dist in modules} == {dist: m.__version__ for dist, m in modules.items()}
    assert versions["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert versions["dspark-compile"] == pyproject["project"]["version"]
    assert {"click", "rich"} <= set(versions)
    # optional dependencies are listed exactly when installed
    assert ("tensorrt-rtx-cu13-bindings" in versions) == (importlib.util.find_spec("tensorrt_rtx_bindings") is not None)
    assert ("tensorrt" in versions) == (importlib.util.find_spec("tensorrt") is not None)


def test_passes_in_order_with_durations(manifest: dict[str, Any]) -> None:
    assert [p["name"] for p in manifest["passes"]] == PASSES
    seconds = {p["name"]: p["seconds"] for p in manifest["passes"]}
    assert all(isinstance(s, float) and s >= 0 and round(s, 4) == s for s in seconds.values())
    assert seconds["export_onnx"] > 0  # three torch.onnx exports cannot round to 0.0000 s


def test_artifacts_with_size_hash_and_signature(manifest: dict[str, Any], golden_build: Path) -> None:
    on_disk = sorted(p.relative_to(golden_build).as_posix() for p in golden_build.rglob("*") if p.is_file())
    assert [a["path"] for a in manifest["artifacts"]] == [p for p in on_disk if p != "manifest.json"]
    for a in manifest["artifacts"]:
        path = golden_build / a["path"]
        assert (a["bytes"], a["sha256"]) == (path.stat().st_size, _sha256(path)), a["path"]
        assert ("signature" in a) == a["path"].endswith(".onnx")
    graphs = {a["path"]: a["signature"] for a in manifest["artifacts"] if a["path"].startswith("onnx/")
              and a["path"].endswith(".onnx")}
    assert graphs["onnx/target_prefill.onnx"]["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "prompt_len"]},
        {"name": "input_lengths", "dtype": "int64", "shape": ["batch"]},
        {"name": "kv_cache", "dtype": "float", "shape": [4, 2, "batch", 2, "cache_slots", 16]}]
    verify = graphs["onnx/target_verify.onnx"]
    assert [i["name"] for i in verify["inputs"]] == ["tokens", "cache_len", "kv_cache", "verify_len", "draft_probs",
                                                     "temperature", "uniforms"]
    assert verify["outputs"][:2] == [{"name": "accepted", "dtype": "int64", "shape": ["batch"]},
                                     {"name": "next_token", "dtype": "int64", "shape": ["batch"]}]
    assert verify["opset"] == {"ai.onnx": 18}
    assert graphs["onnx/target_verify.plugin.onnx"]["opset"] == {"ai.onnx": 18, "dspark": 1}
    for path, signature in graphs.items():
        model = onnx.load(str(golden_build / path), load_external_data=False)
        assert signature["nodes"] == len(model.graph.node)


def test_early_stopped_state(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    state = BuildState(spec=BuildSpec(Path("t"), Path("d"), tmp_path / "out"), workdir=tmp_path,
                       timings=[("load", 0.5)])
    manifest = json.loads(write_manifest(state).read_text())
    assert manifest["inputs"] == [] and manifest["program"] is None and manifest["graphs"] is None
    assert manifest["passes"] == [{"name": "load", "seconds": 0.5}]
    assert manifest["artifacts"] == [{"path": "notes.txt", "bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}]
