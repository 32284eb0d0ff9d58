"""The process-starter's start-up cost: from exec of the starter to the exit of a pinned `true`.

Measured for `python -m agent.starter` and, when `make process-starter` has built it, for the static
dist/process-starter (which first unpacks itself into TMPDIR), against `true` run directly.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agent.annotation import format_downward_annotations
from agent.cpuset import CpuSet
from bench.report import Figure, Target

BINARY = Path(__file__).resolve().parent.parent / "dist" / "process-starter"


def _timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    times: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(argv, env=env, capture_output=True, check=False)
        times.append((time.perf_counter() - started) * 1000)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {result.returncode}: {result.stderr.decode()[-500:]}")
    return times


def _summary(name: str, times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {f"{name}_median_ms": round(statistics.median(ordered), 2), f"{name}_p95_ms": round(p95, 2)}


def starter_startup(workdir: Path, runs: int) -> Figure:
    workdir.mkdir(parents=True, exist_ok=True)
    true = shutil.which("true") or "/bin/true"
    cpus = CpuSet(os.sched_getaffinity(0))
    annotation = [{"container": "app", "processes": [{"process": true, "pool": "bench", "cpus": 1}]}]
    annotations = workdir / "annotations"
    annotations.write_text(format_downward_annotations({"cpupool.io/cpus": json.dumps(annotation)}))
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "TMPDIR": str(workdir),
        "CONTAINER_NAME": "app",
        "CPUPOOL_POOLS": "bench=exclusive",
        "CPUPOOL_BENCH_CPUS": cpus.comma_list(),
        "CPUPOOL_ANNOTATIONS_FILE": str(annotations),
        "CPUPOOL_LOG_LEVEL": "warning",
    }
    values: dict[str, object] = {"runs": runs, **_summary("direct", _timed([true], env, runs))}
    values.update(_summary("python", _timed([sys.executable, "-m", "agent.starter"], env, runs)))
    notes = [
        "wall time from spawning the starter to its exit, one pinned `true` child; "
        "direct is `true` alone (fork and exec)",
    ]
    targets: list[Target] = []
    if BINARY.exists():
        values.update(_summary("binary", _timed([str(BINARY)], env, runs)))
        notes.append("binary: dist/process-starter, which unpacks itself into TMPDIR on every start")
        # A container start takes seconds anyway; the starter should not add a second of its own.
        targets.append(Target("binary_median_ms", 1000, "ms"))
    else:
        notes.append("binary not measured: run `make process-starter` first")
    return Figure("starter_startup", "process-starter start-up cost", values, targets, notes)
