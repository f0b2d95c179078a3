"""The compiler, as an ordered table of passes, each a function ``run(state: BuildState) -> None`` in its own
file under `passes/`. `PassManager` times them, can stop or dump after one, and writes into a temporary
directory beside the output that is renamed into place only when every pass succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_compile.artifacts import replace_dir
from dspark_compile.build_spec import BuildSpec, save_spec
from dspark_compile.build_state import BuildState
from dspark_compile.errors import UsageError
from dspark_compile.passes import (
    build_tensorrt,
    check_acceptance,
    check_onnx,
    decompose_spec_verify,
    export_onnx,
    graft,
    load,
    manifest,
    optimize_onnx,
    package_triton,
    partition,
    quantize,
    segment_target,
    share_weights,
    validate,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[BuildState], None]
    enabled: Callable[[BuildSpec], bool] = lambda spec: True
    artifacts: str | None = None  # what --dump-after writes: a subdirectory of the build


PIPELINE: tuple[Step, ...] = (
    Step("load", load.run),
    Step("validate", validate.run),
    Step("graft", graft.run),
    Step("quantize", quantize.run),
    Step("partition", partition.run),
    Step("export_onnx", export_onnx.run, artifacts="onnx"),
    Step("decompose_spec_verify", decompose_spec_verify.run, artifacts="onnx"),
    Step("optimize_onnx", optimize_onnx.run, artifacts="onnx"),
    Step("share_weights", share_weights.run, artifacts="onnx"),
    Step("check_onnx", check_onnx.run),
    Step("segment_target", segment_target.run, lambda spec: "tensorrt" in spec.targets, artifacts="onnx"),
    Step("build_tensorrt", build_tensorrt.run, lambda spec: "tensorrt" in spec.targets, artifacts="engines"),
    Step("package_triton", package_triton.run, lambda spec: "triton" in spec.targets, artifacts="triton"),
    Step("check_acceptance", check_acceptance.run, lambda spec: spec.check_acceptance is not None),
    Step("manifest", manifest.run),
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

    def run(self, spec: BuildSpec, *, stop_after: str | None = None, dump_after: tuple[str, ...] = ()) -> BuildResult:
        asked = [("--stop-after", stop_after)] if stop_after is not None else []
        for flag, name in [*asked, *(("--dump-after", n) for n in dump_after)]:
            if name not in PASS_NAMES:
                raise UsageError(f"{flag} {name}: unknown pass; passes: {', '.join(PASS_NAMES)}")
        out = spec.out.resolve()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        steps = [s for s in self.steps if s.enabled(spec)]
        names = [s.name for s in steps]
        if stop_after in names:
            steps = steps[: names.index(stop_after) + 1]
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
            self._run_steps(steps, state, dump_after)
            replace_dir(work, out)
        except BaseException:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        assert state.manifest is not None
        return BuildResult(out, state.manifest, tuple(state.timings), stop_after)

    def _run_steps(self, steps: list[Step], state: BuildState, dump_after: tuple[str, ...]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        # On stderr, and only on a terminal: stdout stays the command's output (a non-terminal rich progress
        # still writes a blank line there), and logs and CI output get no bars.
        console = Console(stderr=True)
        progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.completed}/"
                            "{task.total}"), TimeElapsedColumn(), console=console, transient=True,
                            disable=not (self.progress and console.is_terminal))
        with progress:
            task = progress.add_task("build", total=len(steps))
            for step in steps:
                progress.update(task, description=step.name)
                if step.name == "manifest" and state.onnx is not None and not _graphs_written(state):
                    state.written.update(state.onnx.save(state.onnx.directory))  # stopped before share_weights
                t0 = time.perf_counter()
                state.timings.append((step.name, 0.0))  # the manifest pass records its own entry too
                step.run(state)
                state.timings[-1] = (step.name, time.perf_counter() - t0)
                log.info("pass %-22s %.2fs %s", step.name, state.timings[-1][1], memory_line())
                if step.name in dump_after and step.artifacts:
                    dump = state.workdir / "dump" / f"after_{step.name}" / step.artifacts
                    if step.artifacts == "onnx" and state.onnx is not None and not _graphs_written(state):
                        state.written.update(state.onnx.save(dump))
                    elif (state.workdir / step.artifacts).exists():
                        shutil.copytree(state.workdir / step.artifacts, dump)
                progress.advance(task)


def memory_line() -> str:
    """This process's resident bytes now (anonymous: copies it made; file: checkpoint pages it read through a
    memory map) and at its high-water mark: logged after each pass, so a build's peak RSS can be put on the pass
    that reached it (``benchmarks/export_memory.py`` reads these lines). Linux; elsewhere what it can read."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    fields = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                fields[keys[key]] = int(value.split()[0]) * 1024  # kB
    with contextlib.suppress(ImportError):  # no `resource` on Windows
        import resource

        fields["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _graphs_written(state: BuildState) -> bool:
    """Whether `share_weights` has written the graphs (before it, they exist only in memory)."""
    assert state.onnx is not None
    return any(path.parent == state.onnx.directory for path in state.written)


class BuildTerminated(KeyboardInterrupt):
    """SIGTERM during a build, raised like Ctrl-C so that the same cleanup runs.

    A subclass on purpose: a plain KeyboardInterrupt passing through an ``eval`` of source text (torch's exporter
    runs some) makes CPython end the process by SIGINT at exit, overriding the CLI's exit code 130.
    """


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise BuildTerminated(f"signal {signum}")


def _make_workdir(out: Path) -> Path:
    """``.<out>.partial-<pid>-<random>`` beside ``out``, created with ``mkdir`` so that the umask applies: the
    renamed build must be as readable as any directory (``tempfile.mkdtemp`` would make it owner-only, 0700)."""
    work = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    work.mkdir()
    return work
