"""The compiler end to end on the golden pair.

* the onnxruntime graphs decode the authors' golden tokens and acceptance lengths (greedy and a confidence
  threshold, batch 1 and batch 4), and sample exactly what the PyTorch reference samples from the same uniforms;
* each graph's outputs are within 1e-4 of the PyTorch modules on random valid inputs (integer outputs equal);
* two builds of the same inputs are byte-identical; stop-after / dump-after; a failed, interrupted or killed
  build leaves no output directory, and a failed rebuild leaves the previous build untouched.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dspark_compile import api
from dspark_compile.build_spec import make_spec
from dspark_compile.errors import BuildError, UsageError
from dspark_compile.passes.partition import PartitionedProgram, partition
from dspark_compile.pipeline import PASS_NAMES
from dspark_compile.plugins.spec_verify.reference import spec_verify_reference
from dspark_compile.program import build_program
from dspark_compile.runtime.backend import DecodeBackend
from dspark_compile.runtime.decode import GenerationParams, GenerationResult, VerifyPolicy, generate
from dspark_compile.runtime.executor import GraphExecutor
from dspark_compile.runtime.torch_backend import TorchBackend

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4
GOLDEN_DUMPS = ("export_onnx",)
MAX_NEW = 48  # the golden traces' max_new_tokens



@pytest.fixture(scope="module")
def ort_backend(golden_build: Path) -> DecodeBackend:
    return api.load_backend(golden_build, "onnxruntime")


@pytest.fixture(scope="module")
def torch_backend(golden_build: Path) -> Iterator[TorchBackend]:
    # One intra-op thread: for these tiny matrices it is as fast, and it does not slow down tenfold when another
    # process holds one of the two cores (threads waiting at each op for a descheduled sibling).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield api.load_backend(golden_build, "torch")
    torch.set_num_threads(threads)


def _decode(backend: DecodeBackend, prompts: list[list[int]], **params: Any) -> list[GenerationResult]:
    return generate(backend, prompts, GenerationParams(max_new_tokens=MAX_NEW, **params))


# ---------------------------------------------------------------------------------------------- golden decoding


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("trace", ["greedy", "threshold_0.5"])
def test_onnxruntime_decodes_the_golden_tokens(ort_backend: DecodeBackend, golden_trace: dict[str, Any], trace: str,
                                               batch: int) -> None:
    policy = VerifyPolicy() if trace == "greedy" else VerifyPolicy("threshold", 0.5)
    expected = golden_trace[trace]
    prompts = [e["prompt"] for e in expected]
    if batch == 1:
        results = [_decode(ort_backend, [p], policy=policy)[0] for p in prompts]
    else:
        results = _decode(ort_backend, prompts, policy=policy)
    for got, want in zip(results, expected, strict=True):
        assert got.tokens == want["tokens"]
        assert [r["accepted"] for r in got.rounds] == want["acceptance_lengths"]
        assert [r["draft"] for r in got.rounds] == [r["draft"] for r in want["rounds"]]
        for r, w in zip(got.rounds, want["rounds"], strict=True):
            assert np.allclose(r["confidence_logits"], w["confidence_logits"] or [], atol=ATOL)
    if trace == "greedy":
        assert max(max(e["acceptance_lengths"]) for e in expected) == 8  # 7 drafts + bonus in one round


TIE = 1e-5  # a sampling decision this close to its threshold may go either way at float32 noise (~1e-6)


def _draw_margin(weights: np.ndarray, u: float, chosen: int) -> float:
    """How far u·sum(w) lies from the two CDF steps around the chosen index, relative to sum(w)."""
    cdf = np.cumsum(weights, dtype=np.float64)
    target = u * cdf[-1]
    low = cdf[chosen - 1] if chosen > 0 else 0.0
    return float(min(target - low, cdf[chosen] - target) / cdf[-1])


def _verify_margin(logits: np.ndarray, drafts: np.ndarray, ell: int, q: np.ndarray, temperature: float,
                   u: np.ndarray, accepted: int, next_token: int) -> float:
    """The decisions of plugins/spec_verify/README.md (sampling rules 1-4) on one request's reference path:
    every acceptance test made, then the final draw (only its two CDF steps, unlike the conservative
    reference.decision_margin, which takes the nearest of all V steps)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    gaps = [abs(u[k] - min(1.0, p[k, x] / max(q[k, x], 1e-8))) for k, x in enumerate(drafts[: min(accepted + 1,
                                                                                                  ell)])]
    w = p[accepted]
    if accepted < ell:
        residual = np.maximum(p[accepted] - q[accepted], 0.0)
        w = residual if residual.sum() > 1e-8 else w
    return min([*gaps, _draw_margin(w, float(u[-1]), next_token)])


class _ShadowTransport:
    """Runs every graph call on onnxruntime and, with the very same inputs (the executor's caches, taps, draft
    probabilities, uniforms), on the torch reference. It records each sampling decision's margin (how close the
    uniform came to its threshold) and every disagreement between the two."""

    def __init__(self, main: Any, ref: Any) -> None:
        self.main, self.ref, self.device = main, ref, main.device
        self.disagreements: list[tuple[str, float]] = []  # (graph, margin)
        self.ties = 0  # decisions closer than TIE to their threshold
        self.decisions = 0

    def has_graph(self, graph: str) -> bool:
        return self.main.has_graph(graph)

    def inputs(self, graph: str) -> tuple[str, ...]:
        return self.main.inputs(graph)

    def outputs(self, graph: str) -> tuple[str, ...]:
        return self.main.outputs(graph)

    def _note(self, graph: str, margin: float, agree: bool) -> None:
        self.decisions += 1
        self.ties += margin < TIE
        if not agree:
            self.disagreements.append((graph, margin))

    def run(self, graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        want = {n: torch.empty_like(t) for n, t in outputs.items()}
        self.ref.run(graph, feeds, want)
        self.main.run(graph, feeds, outputs)
        got = {n: t.numpy() for n, t in outputs.items()}
        ref = {n: t.numpy() for n, t in want.items()}
        x = {n: t.numpy() for n, t in feeds.items() if t is not None}
        if graph == "draft_propose":
            tokens, g = ref["draft_tokens"], ref["draft_tokens"].shape[1]
            for row in range(tokens.shape[0]):
                # Up to the first position where the runtimes differ: later ones are conditioned on other tokens.
                same = int(np.argmin(np.append(got["draft_tokens"][row] == tokens[row], False)))
                for k in range(min(same + 1, g)):
                    margin = _draw_margin(ref["draft_probs"][row, k], float(x["uniforms"][row, k]),
                                          int(tokens[row, k]))
                    self._note(graph, margin, k < same)
                if same == g:
                    assert np.abs(got["draft_probs"][row] - ref["draft_probs"][row]).max() < ATOL
                    assert np.abs(got["confidence_logits"][row] - ref["confidence_logits"][row]).max() < ATOL
        else:  # target_step: a prefill (one decided row) or a verification
            assert all(np.abs(got[n] - ref[n]).max() < ATOL for n in ("taps", "kv_new"))
            target = self.ref.graphs["target_step"].module.target  # the reference's logits, for the margins
            with torch.inference_mode():
                hidden, _, _ = target(feeds["tokens"], feeds["cache_len"], feeds["kv_cache"])
                rows = feeds["logit_rows"]
                logits = target.logits(torch.gather(hidden, 1, rows[..., None].expand(-1, -1, hidden.shape[-1])))
                logits = logits.numpy()
            drafts = np.take_along_axis(x["tokens"], x["logit_rows"][:, 1:], 1)
            for row in range(logits.shape[0]):
                margin = _verify_margin(logits[row], drafts[row], int(x["verify_len"][row]),
                                        x["draft_probs"][row], float(x["temperature"][row]), x["uniforms"][row],
                                        int(ref["accepted"][row]), int(ref["next_token"][row]))
                agree = (got["accepted"][row], got["next_token"][row]) == (ref["accepted"][row],
                                                                          ref["next_token"][row])
                self._note(graph, margin, agree)


@pytest.mark.parametrize("seed", [0, 1])
def test_onnxruntime_samples_what_torch_samples(golden_build: Path, torch_backend: TorchBackend,
                                                golden_trace: dict[str, Any], seed: int) -> None:
    prompts = [e["prompt"] for e in golden_trace["greedy"]]
    params = GenerationParams(temperature=0.8, seed=seed, max_new_tokens=32)
    ort_executor = api.load_backend(golden_build, "onnxruntime")
    shadow = _ShadowTransport(ort_executor.transport, torch_backend.transport)
    got = generate(GraphExecutor(ort_executor.info, shadow, ort_executor.weights), prompts, params)
    assert shadow.decisions > 400
    # Given the same inputs and uniforms, the two runtimes decide alike except on near-ties (README of the
    # plugin, "Numerical contract").
    assert all(margin < TIE for _, margin in shadow.disagreements), shadow.disagreements
    # End to end, each runtime on its own: the same tokens unless a near-tie was drawn on the way.
    want = generate(torch_backend, prompts, params)
    same = [a.tokens == b.tokens for a, b in zip(got, want, strict=True)]
    assert all(same) if not shadow.ties else sum(same) >= 2, (same, shadow.ties)
    assert max(r["accepted"] for res in got for r in res.rounds) > 1  # drafts were accepted along the way
    assert got[0].tokens != _decode(ort_executor, prompts[:1])[0].tokens[:32]  # and it did sample


# ------------------------------------------------------------------------------------------- per-graph numerics


@pytest.fixture(scope="module")
def reference(golden_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> PartitionedProgram:
    """The PyTorch modules of the two graphs, on the same checkpoint weights."""
    spec = make_spec(target=golden_pair[0], draft=golden_pair[1], out=tmp_path_factory.mktemp("ref") / "out")
    return partition(build_program(spec.target, spec.draft), spec)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _compare(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |difference| per output; integer outputs must be equal (reported as 0)."""
    diffs = {}
    for name, ref in want.items():
        ref_np = ref.numpy()
        assert got[name].shape == ref_np.shape, name
        if ref_np.dtype == np.int64:
            assert np.array_equal(got[name], ref_np), name
            diffs[name] = 0.0
        else:
            diffs[name] = float(np.abs(got[name] - ref_np).max())
    assert all(d <= ATOL for d in diffs.values()), diffs
    return diffs


B, SLOTS = 3, 24


def _t(feeds: dict[str, np.ndarray], *names: str) -> list[torch.Tensor]:
    return [torch.from_numpy(feeds[n]) for n in names]


def _weights(reference: PartitionedProgram) -> dict[str, np.ndarray]:
    target = reference.program.target
    return {"embed_tokens": target.embed_tokens.weight.numpy(), "lm_head": target.lm_head.weight.numpy()}


@torch.inference_mode()
def test_target_step_prefill_matches_torch(golden_build: Path, reference: PartitionedProgram) -> None:
    rng = np.random.default_rng(10)
    lengths = np.array([9, 4, 1])
    feeds = {"tokens": rng.integers(0, 384, (B, 9)), "cache_len": np.zeros(B, np.int64),
             "kv_cache": rng.normal(size=(4, 2, B, 2, SLOTS, 16)).astype(np.float32),
             "logit_rows": (lengths - 1)[:, None], "verify_len": np.zeros(B, np.int64), **_weights(reference),
             "draft_probs": np.zeros((B, 0, 384), np.float32), "temperature": np.array([0.0, 0.8, 1.5], np.float32),
             "uniforms": rng.random((B, 1)).astype(np.float32)}
    module = reference.graph("target_step").module
    want = module(*_t(feeds, *feeds))
    got = _run(golden_build / "onnx" / "target_step.onnx", feeds)
    _compare(got, dict(zip(("accepted", "next_token", "taps", "kv_new"), want, strict=True)))
    target = module.target  # row 0 is greedy: the argmax of its last prompt position's logits
    hidden, _, _ = target(torch.from_numpy(feeds["tokens"][:1]), torch.zeros(1, dtype=torch.int64),
                          target.new_cache(1, SLOTS))
    assert got["next_token"][0] == int(target.logits(hidden[0, 8]).argmax())


@torch.inference_mode()
def test_target_step_verify_matches_torch(golden_build: Path, reference: PartitionedProgram) -> None:
    rng = np.random.default_rng(11)
    module = reference.graph("target_step").module
    target = module.target
    tokens = rng.integers(0, 384, (B, 8))
    cache_len = np.array([0, 6, 13])
    kv = rng.normal(size=(4, 2, B, 2, SLOTS, 16)).astype(np.float32)

    def logits_of(tokens: np.ndarray) -> torch.Tensor:
        hidden, _, _ = target(*(torch.from_numpy(x) for x in (tokens, cache_len, kv)))
        return target.logits(hidden)

    for j in range(7):  # rows 0 and 1 draft the target's greedy choices (all 7 / the first 4), row 2 random ones
        logits = logits_of(tokens)
        tokens[0, j + 1] = int(logits[0, j].argmax())
        if j < 4:
            tokens[1, j + 1] = int(logits[1, j].argmax())
    q = rng.random((B, 7, 384)).astype(np.float32)
    feeds = {"tokens": tokens, "cache_len": cache_len, "kv_cache": kv, "logit_rows": np.tile(np.arange(8), (B, 1)),
             "verify_len": np.array([7, 6, 3]), **_weights(reference),
             "draft_probs": q / q.sum(-1, keepdims=True), "temperature": np.array([0.0, 0.8, 1.5], np.float32),
             "uniforms": rng.random((B, 8)).astype(np.float32)}
    accepted, next_token, taps, kv_out = module(*_t(feeds, *feeds))  # ends in the dspark::spec_verify op
    got = _run(golden_build / "onnx" / "target_step.onnx", feeds)
    _compare(got, {"accepted": accepted, "next_token": next_token, "taps": taps, "kv_new": kv_out})
    assert accepted[0] == 7  # greedy row: every draft is the target's choice
    want = spec_verify_reference(logits_of(tokens), tokens[:, 1:], feeds["verify_len"], mode="sampling",
                                 **{k: feeds[k] for k in ("draft_probs", "temperature", "uniforms")})
    assert [got["accepted"].tolist(), got["next_token"].tolist()] == [w.tolist() for w in want]


@torch.inference_mode()
def test_draft_propose_matches_torch(golden_build: Path, reference: PartitionedProgram) -> None:
    rng = np.random.default_rng(12)
    feeds = {"anchor": rng.integers(0, 384, B), "ctx_taps": rng.normal(size=(B, 5, 192)).astype(np.float32),
             "ctx_count": np.array([5, 1, 3]), "cache_len": np.array([0, 7, 12]),
             "draft_kv": rng.normal(size=(2, 2, B, 2, SLOTS, 16)).astype(np.float32),
             **_weights(reference), "temperature": np.array([0.0, 0.8, 1.5], np.float32),
             "uniforms": rng.random((B, 7)).astype(np.float32)}
    want = reference.graph("draft_propose").module(*_t(feeds, *feeds))
    got = _run(golden_build / "onnx" / "draft_propose.onnx", feeds)
    _compare(got, dict(zip(("draft_tokens", "confidence_logits", "draft_probs", "draft_kv_new"), want, strict=True)))


# ------------------------------------------------------------------------------------- reproducibility, stopping


@pytest.mark.slow  # a second full build of the golden pair (~30 s)
def test_rebuild_is_byte_identical(golden_build: Path, golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    first = json.loads((golden_build / "manifest.json").read_text())
    again = api.build(target=golden_pair[0], draft=golden_pair[1], out=tmp_path / "again", dump_after=GOLDEN_DUMPS,
                      progress=False).manifest
    assert len(again["artifacts"]) == 9
    assert again["artifacts"] == first["artifacts"]  # path, size, sha256 and signature of every file
    assert again["inputs"] == first["inputs"]
    assert {k: v for k, v in again["spec"].items() if k != "out"} == {
        k: v for k, v in first["spec"].items() if k != "out"}


@pytest.mark.slow  # exports the two graphs (~30 s)
def test_stop_after_export(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    res = api.build(target=golden_pair[0], draft=golden_pair[1], out=tmp_path / "early", stop_after="export_onnx",
                    progress=False)
    assert res.stopped_after == "export_onnx"
    assert [p["name"] for p in res.manifest["passes"]] == ["load", "validate", "graft", "quantize", "partition",
                                                           "export_onnx", "manifest"]
    names = [a["path"] for a in res.manifest["artifacts"]]
    assert names == ["build_spec.json"] + [f"onnx/{g}.onnx{s}" for g in ("draft_propose", "target_step")
                                           for s in ("", ".data")]
    verify = next(a for a in res.manifest["artifacts"] if a["path"] == "onnx/target_step.onnx")
    assert [o["name"] for o in verify["signature"]["outputs"]] == ["accepted", "next_token", "taps", "kv_new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["early"]


def test_dump_after_export(golden_build: Path) -> None:
    dump = golden_build / "dump" / "after_export_onnx" / "onnx"
    assert sorted(p.name for p in dump.iterdir()) == sorted(
        f"{g}.onnx{s}" for g in ("draft_propose", "target_step") for s in ("", ".data"))
    manifest = json.loads((golden_build / "manifest.json").read_text())
    outputs = {a["path"]: [o["name"] for o in a["signature"]["outputs"]] for a in manifest["artifacts"]
               if a["path"].endswith(".onnx")}
    assert outputs["dump/after_export_onnx/onnx/target_step.onnx"][:2] == ["accepted", "next_token"]  # as exported
    assert outputs["onnx/target_step.onnx"][:2] == ["accepted", "next_token"]  # as built


def test_unknown_pass_name_is_a_usage_error(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=rf"^--stop-after export: unknown pass; passes: {', '.join(PASS_NAMES)}$"):
        api.build(target=golden_pair[0], draft=golden_pair[1], out=tmp_path / "out", stop_after="export")
    with pytest.raises(UsageError, match=r"^--dump-after optimise: unknown pass; passes: load, "):
        api.build(target=golden_pair[0], draft=golden_pair[1], out=tmp_path / "out", dump_after=("optimise",))
    assert list(tmp_path.iterdir()) == []


def test_successful_rebuild_replaces_the_output(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older build")
    res = api.build(target=golden_pair[0], draft=golden_pair[1], out=out, stop_after="validate", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["build_spec.json", "manifest.json"]
    assert [p["name"] for p in res.manifest["passes"]] == ["load", "validate", "manifest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial-* or .old-* left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # as readable as a directory made by mkdir


# ------------------------------------------------------------------------------------ failures and interruptions


@pytest.fixture
def failing_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise BuildError("partition exploded")

    monkeypatch.setattr("dspark_compile.passes.partition.partition", explode)


@pytest.mark.usefixtures("failing_partition")
def test_failed_build_leaves_no_output(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="partition exploded"):
        api.build(target=golden_pair[0], draft=golden_pair[1], out=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("failing_partition")
def test_failed_rebuild_keeps_the_previous_build(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    (out / "manifest.json").write_text("previous")
    (out / "onnx" / "weights.bin").write_bytes(b"\1\2\3")
    with pytest.raises(BuildError, match="partition exploded"):
        api.build(target=golden_pair[0], draft=golden_pair[1], out=out, progress=False)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/manifest.json", "out/onnx", "out/onnx/weights.bin"]
    assert (out / "manifest.json").read_text() == "previous"
    assert (out / "onnx" / "weights.bin").read_bytes() == b"\1\2\3"


@pytest.mark.usefixtures("failing_partition")
def test_build_in_a_worker_thread(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Signal handlers can only be set in the main thread; a build from a thread pool must still clean up."""
    handler = signal.getsignal(signal.SIGTERM)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(api.build, target=golden_pair[0], draft=golden_pair[1], out=tmp_path / "out",
                             progress=False)
        with pytest.raises(BuildError, match="partition exploded"):
            future.result()
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler
    assert threading.current_thread() is threading.main_thread()


SIGTERM_INSIDE_EVAL = """
import sys
from pathlib import Path
from dspark_compile.pipeline import PIPELINE, PassManager, Step
from dspark_compile.build_spec import BuildSpec

def terminate(state):  # SIGTERM lands while eval() of source text runs, as inside torch's exporter
    eval("__import__('os').kill(__import__('os').getpid(), 15) or sum(range(10 ** 7))")

steps = (Step("load", terminate), PIPELINE[-1])
try:
    PassManager(steps, progress=False).run(BuildSpec(Path("t"), Path("d"), Path(sys.argv[1])))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_sigterm_exit_status_survives_eval(tmp_path: Path) -> None:
    """Run as ``python -m`` (like the CLI), CPython exits by SIGINT when a plain KeyboardInterrupt crossed an
    eval of source text; the SIGTERM handler raises a subclass, so the handled interrupt keeps exit code 130."""
    (tmp_path / "script").mkdir()
    (tmp_path / "script" / "sigterm_inside_eval.py").write_text(SIGTERM_INSIDE_EVAL)
    (tmp_path / "builds").mkdir()
    proc = subprocess.run([sys.executable, "-m", "sigterm_inside_eval", str(tmp_path / "builds" / "out")],
                          cwd=tmp_path / "script", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert list((tmp_path / "builds").iterdir()) == []


def _start_cli_build(pair: tuple[Path, Path], out: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "dspark_compile.cli", "build", "--target", str(pair[0]), "--draft", str(pair[1]),
           "--out", str(out), "--json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_exporting(proc: subprocess.Popen[str], parent: Path, timeout: float = 240) -> Path:
    """The partial directory once export_onnx has started writing into it (the build is mid-way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        partial = [p for p in parent.glob(".out.partial-*") if (p / "onnx").is_dir()]
        if partial:
            return partial[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the build never reached export_onnx")


def test_sigterm_mid_build_leaves_no_output(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    proc = _start_cli_build(golden_pair, tmp_path / "out")
    _wait_until_exporting(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert stdout == ""
    assert stderr.splitlines()[-1] == "error: interrupted"
    assert list(tmp_path.iterdir()) == []  # neither out/ nor .out.partial-*


def test_sigkill_mid_build_leaves_no_output_directory(golden_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL cannot be handled: no output directory appears, but the hidden partial directory stays behind
    (a later build neither needs nor reuses it; delete it by hand)."""
    proc = _start_cli_build(golden_pair, tmp_path / "out")
    partial = _wait_until_exporting(proc, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [partial.name]
    assert (partial / "build_spec.json").is_file()
