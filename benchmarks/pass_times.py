"""Wall and CPU seconds of each compiler pass (CPU includes child processes: export workers, engine builders).

CPU seconds stay comparable on a shared machine, where wall time depends on who else holds the cores.

    python benchmarks/pass_times.py TARGET DRAFT OUT [--stop-after PASS] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any

from dspark_compile import pipeline
from dspark_compile.build_spec import make_spec


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", type=Path)
    ap.add_argument("draft", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--stop-after")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []

    def timed(step: pipeline.Step) -> pipeline.Step:
        def run(state: Any) -> None:
            wall, cpu = time.perf_counter(), cpu_seconds()
            step.run(state)
            rows.append({"pass": step.name, "wall_s": round(time.perf_counter() - wall, 2),
                         "cpu_s": round(cpu_seconds() - cpu, 2)})
            print(json.dumps(rows[-1]), flush=True)

        return dataclasses.replace(step, run=run)

    spec = make_spec(target=args.target, draft=args.draft, out=args.out, dtype=args.dtype)
    pipeline.PassManager(tuple(timed(s) for s in pipeline.PIPELINE), progress=False).run(
        spec, stop_after=args.stop_after)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"passes": rows, "peak_rss_bytes": peak}))


if __name__ == "__main__":
    main()
