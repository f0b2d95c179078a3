"""Pass `manifest`: what went in (sha256 of every checkpoint file), the versions used, the passes with their
durations, and every artifact with size, sha256 and its I/O signature."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import onnx
import pytest

from dspark_compile.build_spec import BuildSpec
from dspark_compile.build_state import BuildState
from dspark_compile.passes import manifest as manifest_pass
from dspark_compile.runtime.backend import ProgramInfo

PASSES = ["load", "validate", "graft", "quantize", "partition", "export_onnx", "decompose_spec_verify", "optimize_onnx",
          "share_weights", "check_onnx", "manifest"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def manifest(golden_build: Path) -> dict[str, Any]:
    return json.loads((golden_build / "manifest.json").read_text())


def test_sections(manifest: dict[str, Any], golden_pair: tuple[Path, Path]) -> None:
    assert list(manifest) == ["format", "spec", "inputs", "versions", "passes", "program", "graphs",
                              "weight_inputs", "engines", "quantization", "acceptance", "triton", "artifacts",
                              "memory"]
    assert manifest["format"] == 1
    assert (manifest["spec"]["target"], manifest["spec"]["draft"]) == tuple(str(p) for p in golden_pair)
    assert manifest["program"] == {
        "vocab_size": 384, "hidden_size": 64, "target_layers": 4, "draft_layers": 2, "kv_heads": 2, "head_dim": 16,
        "draft_kv_heads": 2, "draft_head_dim": 16, "block_size": 7, "tap_layer_ids": [0, 1, 2], "tap_width": 192,
        "has_confidence": True, "markov_head": "vanilla", "eos_token_ids": [], "dtype": "fp32", "max_slots": 2048,
        "sampling": True, "family": "qwen3"}
    assert ProgramInfo.from_json(manifest["program"]).to_json() == manifest["program"]
    assert manifest["graphs"] == {"verify_mode": "sampling", "block_size": 7,
                                  "variants": {"target_step": ["portable", "plugin"]},
                                  "repeated_constant_bytes": 0}  # no constant is held by both graphs
    # The graphs' weight inputs: the golden pair's embedding and LM head (untied), each stored once.
    records = manifest["weight_inputs"]
    assert sorted(records) == ["embed_tokens", "lm_head"] and records["embed_tokens"]["offset"] != records[
        "lm_head"]["offset"]
    assert all(r["file"] == "onnx/weights.bin" and r["shape"] == [384, 64] and r["dtype"] == "float32"
               and r["bytes"] == 384 * 64 * 4 for r in records.values())
    assert manifest["engines"] is None and manifest["triton"] is None
    assert manifest["quantization"] is None and manifest["acceptance"] is None  # no --quantize, no gate


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
    assert seconds["export_onnx"] > 0  # two torch.onnx exports cannot round to 0.0000 s


def test_artifacts_with_size_hash_and_signature(manifest: dict[str, Any], golden_build: Path) -> None:
    on_disk = sorted(p.relative_to(golden_build).as_posix() for p in golden_build.rglob("*") if p.is_file())
    assert [a["path"] for a in manifest["artifacts"]] == [p for p in on_disk if p != "manifest.json"]
    for a in manifest["artifacts"]:
        path = golden_build / a["path"]
        assert (a["bytes"], a["sha256"]) == (path.stat().st_size, _sha256(path)), a["path"]
        assert ("signature" in a) == a["path"].endswith(".onnx")
    graphs = {a["path"]: a["signature"] for a in manifest["artifacts"] if a["path"].startswith("onnx/")
              and a["path"].endswith(".onnx")}
    verify = graphs["onnx/target_step.onnx"]
    assert verify["inputs"][:4] == [
        {"name": "tokens", "dtype": "int64", "shape": ["batch", "step_len"]},
        {"name": "cache_len", "dtype": "int64", "shape": ["batch"]},
        {"name": "kv_cache", "dtype": "float", "shape": [4, 2, "batch", 2, "cache_slots", 16]},
        {"name": "logit_rows", "dtype": "int64", "shape": ["batch", "decide_len"]}]
    assert [i["name"] for i in verify["inputs"]] == ["tokens", "cache_len", "kv_cache", "logit_rows", "verify_len",
                                                     "embed_tokens", "lm_head", "draft_probs", "temperature",
                                                     "uniforms"]
    assert verify["outputs"][:2] == [{"name": "accepted", "dtype": "int64", "shape": ["batch"]},
                                     {"name": "next_token", "dtype": "int64", "shape": ["batch"]}]
    assert verify["opset"] == {"ai.onnx": 18}
    assert graphs["onnx/target_step.plugin.onnx"]["opset"] == {"ai.onnx": 18, "dspark": 1}
    for path, signature in graphs.items():
        model = onnx.load(str(golden_build / path), load_external_data=False)
        assert signature["nodes"] == len(model.graph.node)


def test_server_memory_at_the_built_batch_and_context(manifest: dict[str, Any], golden_build: Path) -> None:
    """Without engines: the weights file, and both full KV caches at max_batch x max_context (8 x 2048)."""
    memory = manifest["memory"]
    assert (memory["max_batch"], memory["max_context"]) == (8, 2048)
    assert memory["weight_bytes"] == (golden_build / "onnx" / "weights.bin").stat().st_size
    assert memory["kv_cache_bytes"] == 8 * 2048 * 2 * 4 * (4 * 2 * 16 + 2 * 2 * 16)
    assert memory["buffer_bytes"] == 8 * 2048 * 192 * 4 + 2 * 8 * 7 * 384 * 4
    assert memory["activation_bytes"] == 0 and memory["activation_source"] == ["unknown (no engines)"]
    assert memory["total_bytes"] == sum(memory[k] for k in ("weight_bytes", "kv_cache_bytes", "activation_bytes",
                                                            "buffer_bytes"))


def test_over_the_gpu_memory_budget_is_a_build_error(manifest: dict[str, Any], golden_build: Path,
                                                    tmp_path: Path) -> None:
    """The manifest pass of a build whose server would not fit --gpu-memory fails (exit 3) and writes nothing."""
    from dspark_compile.errors import BuildError
    from dspark_compile.passes.manifest import server_memory

    program = ProgramInfo.from_json(manifest["program"])
    total = server_memory(manifest)["total_bytes"]
    for budget, fits in ((f"{total / 2**20 - 0.5}MiB", False), (f"{total / 2**20 + 0.5}MiB", True)):
        work = tmp_path / budget
        (work / "onnx").mkdir(parents=True)
        (work / "onnx" / "weights.bin").write_bytes((golden_build / "onnx" / "weights.bin").read_bytes())
        state = BuildState(spec=BuildSpec(Path("t"), Path("d"), work / "out", gpu_memory=budget), workdir=work,
                           info=program, onnx=_graphs(work))
        if fits:
            manifest_pass.run(state)
            assert state.manifest["memory"]["total_bytes"] == total
        else:
            with pytest.raises(BuildError, match=rf"^--gpu-memory {budget}: a server of this build needs .* GiB "
                                                 r"\(.* weights, .* KV caches, .* activations at batch 8 and 2048 "
                                                 r"slots\); lower --max-batch or --max-context"):
                manifest_pass.run(state)
            assert not (work / "manifest.json").exists()


def _graphs(directory: Path) -> Any:
    from dspark_compile.artifacts import OnnxGraphs

    return OnnxGraphs(directory / "onnx", "sampling", 7, {})


def test_early_stopped_state(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    state = BuildState(spec=BuildSpec(Path("t"), Path("d"), tmp_path / "out"), workdir=tmp_path,
                       timings=[("load", 0.5)])
    manifest_pass.run(state)
    assert json.loads((tmp_path / "manifest.json").read_text()) == state.manifest
    written = state.manifest
    assert written["inputs"] == [] and written["program"] is None and written["graphs"] is None
    assert written["passes"] == [{"name": "load", "seconds": 0.5}]
    assert written["artifacts"] == [{"path": "notes.txt", "bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}]
