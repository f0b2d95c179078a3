"""CI runs the README's test command (the fast tier) and the slow tier, and together they run the whole suite:
the fast tier deselects exactly the slow tests, the slow tier selects exactly them, and nothing else (no
keyword, path or --deselect) leaves a test out."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest_argv(line: str) -> list[str]:
    """The arguments after ``pytest`` in the last command of a ``a && b && c`` line."""
    argv = shlex.split(line.split("&&")[-1])
    return argv[argv.index("pytest") + 1:]


def _marker(argv: list[str]) -> str | None:
    """The marker expression pytest applies: the last ``-m`` wins."""
    values = [argv[i + 1] for i, a in enumerate(argv) if a == "-m"]
    return values[-1] if values else None


def _ci_lines() -> list[str]:
    return [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "-m pytest" in ln]


def test_ci_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = [ln for ln in readme.split("## Using it")[0].splitlines() if "-m pytest" in ln]
    assert len(quick_start) == 1
    first, slow = _ci_lines()
    assert first == quick_start[0]
    assert shlex.split(first.split("&&")[-1]) == shlex.split(slow.split("#")[0])[:-2]  # the same + `-m slow`
    assert f"\n{slow}" in readme.split("## Tests")[1]


def test_the_two_tiers_together_run_every_test() -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    addopts = shlex.split(options.get("addopts", ""))
    markers = []
    for line in _ci_lines():
        argv = addopts + _pytest_argv(line)  # addopts come first: the command line overrides them
        assert not {"-k", "--deselect", "--ignore", "--lf", "--last-failed"} & set(argv), argv
        assert not [a for a in argv if not a.startswith("-") and a not in ("not slow", "slow")], "testpaths decides"
        markers.append(_marker(argv))
    assert markers == ["not slow", "slow"]
    assert options["testpaths"] == ["tests"]
