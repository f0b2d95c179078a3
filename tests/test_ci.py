"""CI runs exactly the README's test command, and that command runs the whole suite: no marker or keyword
deselects tests (slow ones included), so it can never end in pytest's "no tests collected" (exit code 5)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pytest_argv(line: str) -> list[str]:
    """The arguments after ``pytest`` in the last command of a ``a && b && c`` line."""
    argv = shlex.split(line.split("&&")[-1])
    return argv[argv.index("pytest") + 1:]


def test_ci_runs_the_readme_test_command() -> None:
    readme = [ln for ln in (ROOT / "README.md").read_text().splitlines() if "-m pytest" in ln]
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "-m pytest" in ln]
    assert len(readme) == 1 and ci == readme


def test_the_command_deselects_nothing() -> None:
    (line,) = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "-m pytest" in ln]
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    argv = _pytest_argv(line) + shlex.split(options.get("addopts", ""))
    assert not {"-m", "-k", "--deselect", "--ignore", "--lf", "--last-failed"} & set(argv), argv
    assert not [a for a in argv if not a.startswith("-")], "no paths: testpaths decides"
    assert options["testpaths"] == ["tests"]
