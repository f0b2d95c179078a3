"""Greedy losslessness with the confidence scheduler choosing the verify lengths (issue 6, item 4)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from dspark_compile.errors import UsageError
from dspark_compile.runtime.decode import GenerationParams, VerifyPolicy, generate
from dspark_compile.runtime.torch_backend import TorchBackend

FLAT = {1: 100.0, 64: 100.0}  # verifying more costs nothing: admit every prefix with a > 0
STEEP = {b: 1000.0 / b for b in range(1, 65)}  # SPS = k/B: no admission ever raises throughput
MIXED = {1: 100.0, 8: 95.0, 16: 60.0, 64: 20.0}


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> tuple[TorchBackend, dict]:
    pair = golden_dir / "dspark_tiny"
    backend = TorchBackend.from_pair(pair / "target", pair / "draft")
    return backend, json.loads((pair / "decode_greedy.json").read_text())


@pytest.mark.parametrize("sps", [FLAT, STEEP, MIXED], ids=["flat", "steep", "mixed"])
@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "smoothed"])
def test_scheduled_greedy_equals_target_only(golden: tuple[TorchBackend, dict], sps: dict, smoothed: bool) -> None:
    backend, data = golden
    prompts = [g["prompt"] for g in data["baseline"]]
    policy = VerifyPolicy("schedule", sps=sps, smoothed=smoothed)
    results = generate(backend, prompts, GenerationParams(max_new_tokens=48, policy=policy))
    for res, want in zip(results, data["baseline"], strict=True):
        assert res.tokens == want["tokens"]
    lengths = [len(r["draft"]) for res in results for r in res.rounds]
    if sps is FLAT or sps is STEEP:
        # Admission continues while Θ strictly grows; survival products below ~1e-12 of τ no longer count.
        # TorchBackend's round verifies every row's G+1 positions whatever ℓ is (verifies_whole_block), so a shorter
        # ℓ saves nothing there and even the steep curve admits (where a cost grows with ℓ it admits nothing:
        # test_scheduler.py::test_inverse_curve_admits_nothing)
        assert min(lengths) >= 1 and np.mean(lengths) > 3.0


def test_threshold_and_schedule_policies_from_a_build_dir(tmp_path: Path) -> None:
    (tmp_path / "sps_profile.json").write_text(json.dumps({"batch_sizes": [1, 8], "steps_per_second": [5.0, 4.0]}))
    (tmp_path / "calibration.json").write_text(json.dumps({"temperatures": [2.0] * 7}))
    pol = VerifyPolicy.for_build(tmp_path, "auto", has_confidence=True)
    assert pol.kind == "schedule" and pol.sps == {1: 5.0, 8: 4.0} and pol.temperatures == (2.0,) * 7
    assert VerifyPolicy.for_build(tmp_path, "auto", has_confidence=False).kind == "fixed"
    assert VerifyPolicy.for_build(tmp_path / "nope", "auto", has_confidence=True).kind == "fixed"
    # Calibration divides the logits by t_k before the sigmoid: logit 2 at T=2 is sigmoid(1).
    np.testing.assert_allclose(pol.probabilities(np.full((1, 7), 2.0)), 1 / (1 + np.exp(-1.0)))


def test_draft_rows_auto_reads_the_measured_number_from_the_build_dir(tmp_path: Path, golden: tuple[TorchBackend, dict],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """``draft_rows="auto"``: the build's draft_rows.json, with the schedule policy too; null (speculation won at every
    batch measured) is no limit; a negative or non-integer value is one error naming the file. Measured with this
    backend on another GPU: one warning naming both GPUs and the command that measures; on this one, none."""
    from dspark_compile.errors import UsageError

    (tmp_path / "sps_profile.json").write_text(json.dumps({"batch_sizes": [1, 8], "steps_per_second": [5.0, 4.0]}))
    (tmp_path / "draft_rows.json").write_text(json.dumps({"draft_rows": 16, "measured": []}))
    pol = VerifyPolicy.for_build(tmp_path, "auto", has_confidence=True, draft_rows="auto")
    assert pol.kind == "schedule" and pol.draft_rows == 16
    (tmp_path / "draft_rows.json").write_text(json.dumps({"draft_rows": None}))
    assert VerifyPolicy.for_build(tmp_path, "fixed", has_confidence=True, draft_rows="auto").draft_rows is None
    for bad in (-1, 2.5, True):
        (tmp_path / "draft_rows.json").write_text(json.dumps({"draft_rows": bad}))
        with pytest.raises(UsageError, match=f"{tmp_path / 'draft_rows.json'} holds draft_rows"):
            VerifyPolicy.for_build(tmp_path, "fixed", has_confidence=True, draft_rows="auto")
    backend = golden[0]
    for device, warned in (("NVIDIA H200", True), ("cpu", False)):
        (tmp_path / "draft_rows.json").write_text(json.dumps({"draft_rows": 16, "device": device,
                                                              "backend": {"backend": "TorchBackend"}}))
        pol = VerifyPolicy.for_build(tmp_path, "fixed", has_confidence=True, draft_rows="auto")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dspark_compile"):
            pol.warn_if_measured_elsewhere(backend)
        lines = [r.getMessage() for r in caplog.records]
        if warned:
            assert len(lines) == 1 and "TorchBackend on NVIDIA H200" in lines[0] and "TorchBackend on cpu" in lines[0]
            assert "measure on this GPU" in lines[0] and "--plain-rounds" in lines[0], lines[0]
        else:
            assert lines == [], lines


def test_a_fixed_cap_verifies_at_most_k_drafts_and_stays_lossless(golden: tuple[TorchBackend, dict]) -> None:
    """``--verify fixed=K``: every round verifies min(K, G) drafts, and greedy output is still the target's."""
    backend, data = golden
    prompts = [g["prompt"] for g in data["baseline"]]
    results = generate(backend, prompts, GenerationParams(max_new_tokens=48, policy=VerifyPolicy.parse("fixed=2")))
    for res, want in zip(results, data["baseline"], strict=True):
        assert res.tokens == want["tokens"]
    assert {len(r["draft"]) for res in results for r in res.rounds} == {2}
    assert VerifyPolicy.parse("fixed=0").lengths(np.zeros((3, 7)), 7).tolist() == [0, 0, 0]
    assert VerifyPolicy.parse("fixed=9").lengths(np.zeros((2, 7)), 7).tolist() == [7, 7]


@pytest.mark.parametrize("text", ["fixed=", "fixed=-1", "fixed=2.5", "fixed=x", "fixed=²"])
def test_a_bad_fixed_cap_is_one_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match=r"--verify .*whole number of drafts >= 0, e\.g\. fixed=3"):
        VerifyPolicy.parse(text)
