"""The compiler, as an ordered table of passes (one file each under `passes/`).

    load → validate → graft → partition → export_onnx → decompose_spec_verify → optimize_onnx → share_weights
    → check_onnx → build_tensorrt → package_triton → manifest

`PassManager` runs the table for a `BuildSpec`: it times each pass, shows progress, can stop after or dump
after a named pass, and writes into a temporary directory beside the output that is renamed into place
only when every pass succeeded (an interrupted or failed build leaves no output directory behind).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark_compile.errors import UsageError
from dspark_compile.ir import Engines, OnnxGraphs, TritonRepository
from dspark_compile.program import CheckpointPair, DecodeProgram
from dspark_compile.spec import BuildSpec, save_spec

log = logging.getLogger(__name__)


@dataclass
class BuildState:
    """What the passes have produced so far; each field is written by exactly one pass."""

    spec: BuildSpec
    workdir: Path
    pair: CheckpointPair | None = None
    program: DecodeProgram | None = None
    parts: Any = None  # PartitionedProgram (torch modules; kept untyped to avoid importing torch.onnx early)
    onnx: OnnxGraphs | None = None
    engines: Engines | None = None
    triton: TritonRepository | None = None
    manifest: Path | None = None
    timings: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[BuildState], None]
    enabled: Callable[[BuildSpec], bool] = lambda spec: True
    artifacts: str | None = None  # what --dump-after copies: a subdirectory of the build


def _load(s: BuildState) -> None:
    from dspark_compile.passes.load import load

    s.pair = load(s.spec)


def _validate(s: BuildState) -> None:
    from dspark_compile.passes.validate import validate

    s.pair = validate(s.pair, s.spec)


def _graft(s: BuildState) -> None:
    from dspark_compile.passes.graft import graft

    s.program = graft(s.pair, s.spec)


def _partition(s: BuildState) -> None:
    from dspark_compile.passes.partition import partition

    s.parts = partition(s.program, s.spec)


def _export(s: BuildState) -> None:
    from dspark_compile.passes.export_onnx import export_onnx

    s.onnx = export_onnx(s.parts, s.spec, s.workdir / "onnx")


def _decompose(s: BuildState) -> None:
    from dspark_compile.passes.decompose_spec_verify import decompose_spec_verify_file

    # The plugin variant stays for full TensorRT; the portable one (standard ops) is what everything else runs.
    s.onnx = decompose_spec_verify_file(s.onnx)


def _optimize(s: BuildState) -> None:
    from dspark_compile.passes.optimize_onnx import optimize_onnx

    s.onnx = optimize_onnx(s.onnx)


def _share(s: BuildState) -> None:
    from dspark_compile.passes.share_weights import share_weights

    s.onnx = share_weights(s.onnx)


def _check(s: BuildState) -> None:
    from dspark_compile.passes.check_onnx import check_onnx

    s.onnx = check_onnx(s.onnx)


def _tensorrt(s: BuildState) -> None:
    from dspark_compile.passes.build_tensorrt import build_tensorrt

    s.engines = build_tensorrt(s.onnx, s.spec, s.workdir / "engines")


def _triton(s: BuildState) -> None:
    from dspark_compile.passes.package_triton import package_triton

    s.triton = package_triton(s.workdir, s.onnx, s.engines, s.spec)


def _manifest(s: BuildState) -> None:
    from dspark_compile.passes.manifest import write_manifest

    s.manifest = write_manifest(s)


PIPELINE: tuple[Step, ...] = (
    Step("load", _load),
    Step("validate", _validate),
    Step("graft", _graft),
    Step("partition", _partition),
    Step("export_onnx", _export, artifacts="onnx"),
    Step("decompose_spec_verify", _decompose, artifacts="onnx"),
    Step("optimize_onnx", _optimize, artifacts="onnx"),
    Step("share_weights", _share, artifacts="onnx"),
    Step("check_onnx", _check),
    Step("build_tensorrt", _tensorrt, lambda spec: "tensorrt" in spec.targets, artifacts="engines"),
    Step("package_triton", _triton, lambda spec: "triton" in spec.targets, artifacts="triton"),
    Step("manifest", _manifest),
)
PASS_NAMES = tuple(step.name for step in PIPELINE)


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    timings: tuple[tuple[str, float], ...]
    stopped_after: str | None


class PassManager:
    def __init__(self, steps: tuple[Step, ...] = PIPELINE, *, progress: bool = True) -> None:
        self.steps = steps
        self.progress = progress

    def run(self, spec: BuildSpec, *, stop_after: str | None = None, dump_after: tuple[str, ...] = (),
            on_pass: Callable[[str, float], None] | None = None) -> BuildResult:
        asked = [("--stop-after", stop_after)] if stop_after is not None else []
        for flag, name in [*asked, *(("--dump-after", n) for n in dump_after)]:
            if name not in PASS_NAMES:
                raise UsageError(f"{flag} {name}: unknown pass; passes: {', '.join(PASS_NAMES)}")
        out = spec.out.resolve()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        steps = [s for s in self.steps if s.enabled(spec)]
        if stop_after is not None:
            steps = steps[: [s.name for s in steps].index(stop_after) + 1] if stop_after in [
                s.name for s in steps] else steps
            if steps[-1].name != "manifest":
                steps.append(next(s for s in self.steps if s.name == "manifest"))
        # SIGTERM cleans up like Ctrl-C. The handler goes in before the temporary directory exists, so a
        # SIGTERM right after it appears still removes it; Python allows handlers only in the main thread.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
        work: Path | None = None
        try:
            work = _make_workdir(out)
            state = BuildState(spec=dataclasses.replace(spec, out=out), workdir=work)
            save_spec(state.spec, work / "build_spec.json")
            self._run_steps(steps, state, dump_after, on_pass)
            _replace_dir(work, out)
        except BaseException:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        import json

        manifest = json.loads((out / "manifest.json").read_text())
        return BuildResult(out, manifest, tuple(state.timings), stop_after)

    def _run_steps(self, steps: list[Step], state: BuildState, dump_after: tuple[str, ...],
                   on_pass: Callable[[str, float], None] | None) -> None:
        progress = None
        if self.progress:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            # On stderr, and only on a terminal: stdout stays the command's output (a non-terminal rich
            # progress still writes a blank line there), and logs and CI output get no bars.
            console = Console(stderr=True)
            progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.completed}/"
                                "{task.total}"), TimeElapsedColumn(), console=console, transient=True,
                                disable=not console.is_terminal)
            progress.start()
            task = progress.add_task("build", total=len(steps))
        try:
            for step in steps:
                if progress is not None:
                    progress.update(task, description=step.name)
                t0 = time.perf_counter()
                if step.name == "manifest":
                    state.timings.append((step.name, 0.0))
                step.run(state)
                dt = time.perf_counter() - t0
                if step.name == "manifest":
                    state.timings[-1] = (step.name, dt)
                else:
                    state.timings.append((step.name, dt))
                log.info("pass %-22s %.2fs", step.name, dt)
                if on_pass is not None:
                    on_pass(step.name, dt)
                if step.name in dump_after and step.artifacts:
                    src = state.workdir / step.artifacts
                    if src.exists():
                        shutil.copytree(src, state.workdir / "dump" / f"after_{step.name}" / step.artifacts)
                if progress is not None:
                    progress.advance(task)
        finally:
            if progress is not None:
                progress.stop()


class BuildTerminated(KeyboardInterrupt):
    """SIGTERM during a build, raised like Ctrl-C so that the same cleanup runs.

    A subclass on purpose: when a plain KeyboardInterrupt passes through an ``eval``/``exec`` of source text
    (torch's exporter runs some), CPython ends the process by SIGINT at exit even though the CLI handled it
    and asked for exit code 130; it checks for exactly KeyboardInterrupt, not subclasses.
    """


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise BuildTerminated(f"signal {signum}")


def _make_workdir(out: Path) -> Path:
    """``.<out>.partial-<pid>-<random>`` beside ``out``, created with ``mkdir`` so that the umask applies: the
    renamed build must be as readable as any directory (``tempfile.mkdtemp`` would make it owner-only, 0700)."""
    work = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    work.mkdir()
    return work


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished build into place; an existing output is swapped out, then removed."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)
