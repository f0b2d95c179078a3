"""The post-build passes of issue 6 on the golden build: `profile` (SPS curve), `calibrate` (STS) and
scheduled decoding from a build directory, through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dspark_compile.cli import cli
from dspark_compile.passes.profile_sps import shape_for, token_grid


@pytest.fixture(scope="module")
def build(golden_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("profiled") / "build"
    shutil.copytree(golden_build, dst)  # this module writes into the build; keep the shared one pristine
    return dst


def test_token_grid_and_shapes() -> None:
    assert token_grid(7, 3) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 24]
    assert shape_for(5, 7) == (1, 5) and shape_for(8, 7) == (1, 8) and shape_for(24, 7) == (3, 8)
    assert shape_for(20, 7) == (3, 8)  # rounds requests up


def test_profile_then_scheduled_run_is_lossless(build: Path, golden_dir: Path) -> None:
    res = CliRunner().invoke(cli, ["profile", str(build), "--max-batch", "2", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    prof = json.loads(res.output.strip().splitlines()[-1])
    assert prof["batch_sizes"] == [1, 2, 3, 4, 5, 6, 7, 8, 16]
    assert all(s > 0 for s in prof["steps_per_second"])
    assert json.loads((build / "sps_profile.json").read_text()) == prof
    assert (build / "sps_profile.png").stat().st_size > 1000
    trace = json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())
    args = ["run", str(build), "--max-new-tokens", "48", "--json"]  # --verify auto: the scheduler now
    for g in trace["baseline"]:
        args += ["--prompt-ids", ",".join(map(str, g["prompt"]))]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.output.strip().splitlines()]
    assert [x["tokens"] for x in lines] == [g["tokens"] for g in trace["baseline"]]


def test_calibrate_writes_temperatures_and_diagram(build: Path, golden_dir: Path, tmp_path: Path) -> None:
    trace = json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"prompt_ids": g["prompt"]}) + "\n" for g in trace["greedy"]))
    res = CliRunner().invoke(cli, ["calibrate", str(build), "--data", str(data), "--max-new-tokens", "48", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert len(out["temperatures"]) == 7 and all(t > 0 for t in out["temperatures"])
    cal = json.loads((build / "calibration.json").read_text())
    assert cal["temperatures"] == out["temperatures"]
    assert (build / "reliability.png").stat().st_size > 1000
    # Position 1 is observed in every round; its fitted ECE is no worse than before.
    assert out["ece_after"][0] <= out["ece_before"][0] + 1e-12
