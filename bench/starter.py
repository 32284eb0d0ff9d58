"""The process-starter's start-up cost: from exec of the starter to the exit of a pinned `true`.

Measured for `python -m agent.starter` and, when `make process-starter` has built it, for the bundle in
dist/process-starter/, against `true` run directly (a bare fork and exec). The bundle only runs from its
fixed prefix (/opt/cpupool/process-starter, where the agent lays it out on every node), so it is timed in
a private mount namespace that mounts it there, with the bare exec timed the same way beside it.
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
from agent.starter.contract import STARTER_DIR, STARTER_PATH
from bench.report import Figure, Target

BUNDLE = Path(__file__).resolve().parent.parent / "dist" / "process-starter"
# A container start takes seconds anyway, but the starter runs on every one of them.
PER_START_TARGET_MS = 100


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


def _environment(workdir: Path) -> dict[str, str]:
    true = shutil.which("true") or "/bin/true"
    cpus = CpuSet(os.sched_getaffinity(0))
    annotation = [{"container": "app", "processes": [{"process": true, "pool": "bench", "cpus": len(cpus)}]}]
    annotations = workdir / "annotations"
    annotations.write_text(format_downward_annotations({"cpupool.io/cpus": json.dumps(annotation)}))
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "CONTAINER_NAME": "app",
        "CPUPOOL_POOLS": "bench=exclusive",
        "CPUPOOL_BENCH_CPUS": cpus.comma_list(),
        "CPUPOOL_ANNOTATIONS_FILE": str(annotations),
        "CPUPOOL_LOG_LEVEL": "warning",
    }


def _bundle_problem() -> str | None:
    if not (BUNDLE / "process-starter").exists():
        return "bundle not measured: run `make process-starter` first"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "bundle not measured: needs root and unshare(1) to mount it at its prefix"
    return None


def _bundle_times(workdir: Path, runs: int) -> dict[str, list[float]]:
    """Bare exec and bundle, timed in a mount namespace where the bundle sits at its prefix."""
    top = "/" + STARTER_DIR.strip("/").split("/")[0]
    script = (
        f"set -e; mount -t tmpfs tmpfs {top}; mkdir -p {STARTER_DIR}; mount --bind {BUNDLE} {STARTER_DIR}; "
        f"exec {sys.executable} -m bench.starter {workdir} {runs}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if result.returncode != 0:
        raise RuntimeError(f"timing the bundle failed: {result.stderr[-1000:]}")
    times: dict[str, list[float]] = json.loads(result.stdout)
    return times


def starter_startup(workdir: Path, runs: int) -> Figure:
    workdir.mkdir(parents=True, exist_ok=True)
    env = _environment(workdir)
    true = shutil.which("true") or "/bin/true"
    values: dict[str, object] = {"runs": runs, **_summary("direct", _timed([true], env, runs))}
    values.update(_summary("python", _timed([sys.executable, "-m", "agent.starter"], env, runs)))
    notes = [
        "wall time from spawning the starter to its exit, one pinned `true` child; "
        "direct is `true` alone (fork and exec)",
    ]
    targets: list[Target] = []
    problem = _bundle_problem()
    if problem is None:
        times = _bundle_times(workdir, runs)
        values.update(_summary("bundle_direct", times["direct"]))
        values.update(_summary("bundle", times["bundle"]))
        values["bundle_per_start_ms"] = round(
            statistics.median(times["bundle"]) - statistics.median(times["direct"]), 2
        )
        notes.append(
            f"bundle: dist/process-starter/ mounted at {STARTER_DIR} (as on a node), nothing unpacked; "
            "bundle_per_start_ms is its median minus the bare exec's median in the same namespace"
        )
        targets.append(Target("bundle_per_start_ms", PER_START_TARGET_MS, "ms"))
    else:
        notes.append(problem)
    return Figure("starter_startup", "process-starter start-up cost", values, targets, notes)


def _measure_here(workdir: Path, runs: int) -> None:
    """Inside the namespace: print the bare exec's and the bundle's times as JSON."""
    env = _environment(workdir)
    true = shutil.which("true") or "/bin/true"
    direct = _timed([true], env, runs)
    bundle = _timed([STARTER_PATH], env, runs)
    print(json.dumps({"direct": direct, "bundle": bundle}))


if __name__ == "__main__":
    _measure_here(Path(sys.argv[1]), int(sys.argv[2]))
