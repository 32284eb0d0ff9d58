"""`make bench`: every figure, its target and a pass/fail, as JSON in bench/report.json and a summary.

Run with ``python -m bench.run`` (``--quick`` for a short smoke run that is not written over the report).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.logs import setup_logging
from bench.hosts import DUAL64_ALL_EXCLUSIVE, DUAL64_CONFIG, dual64
from bench.lifecycle import idle_figure, memory_figure, reload_figure, reregistration_figure
from bench.listing import shared_list
from bench.load import load_figure
from bench.node import running_node
from bench.nodeconfig import labels_rss_figure, relabel_figure, webhook_reload_figure
from bench.nri import QUICK as NRI_QUICK
from bench.nri import NriSizes, nri_figures
from bench.realpath import REAL_QUICK, RealSizes, real_path_figures
from bench.replan import replan_figures
from bench.report import Figure, build_report, render, write_report
from bench.rpc import allocate_round_trip, preferred_pure, preferred_rpc
from bench.starter import starter_startup

REPORT = Path(__file__).parent / "report.json"
NODE_RESOURCES = ("cpupool.io/dedicated", "cpupool.io/dedicated-ht", "cpupool.io/shared")


@dataclass(frozen=True)
class Sizes:
    """How much of each measurement a run takes."""

    allocate_calls: int = 2000
    preferred_iterations: int = 500
    pure_iterations: int = 2000
    list_repeats: int = 5
    idle_s: float = 30.0
    edits: int = 50
    restarts: int = 50
    concurrency: int = 1000
    emulator_list: bool = True
    starter_runs: int = 30
    replan_repeats: int = 20


QUICK = Sizes(
    allocate_calls=100,
    preferred_iterations=20,
    pure_iterations=50,
    list_repeats=2,
    idle_s=2.0,
    edits=4,
    restarts=3,
    concurrency=100,
    emulator_list=False,
    starter_runs=3,
    replan_repeats=2,
)


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def _step(name: str, run: Callable[[], Awaitable[list[Figure]]], figures: list[Figure]) -> None:
    _progress(f"{name} ...")
    started = time.monotonic()
    figures.extend(await run())
    _progress(f"{name} done in {time.monotonic() - started:.1f} s")


async def run_all(workdir: Path, sizes: Sizes) -> list[Figure]:
    figures: list[Figure] = []

    async def pure() -> list[Figure]:
        return [preferred_pure(dual64(workdir / "pure-host"), sizes.pure_iterations)]

    async def listing() -> list[Figure]:
        return await shared_list(workdir / "list", sizes.list_repeats, sizes.emulator_list)

    async def starter() -> list[Figure]:
        return [await asyncio.to_thread(starter_startup, workdir / "starter", sizes.starter_runs)]

    async def replan() -> list[Figure]:
        return await replan_figures(sizes.replan_repeats)

    await _step("preferred allocation, pure function", pure, figures)
    await _step("replan with 200,000 held devices", replan, figures)
    await _step("process-starter start-up", starter, figures)
    await _step("200,000-device shared list", listing, figures)

    async with running_node(workdir / "node", dual64, DUAL64_CONFIG, NODE_RESOURCES) as node:

        async def process() -> list[Figure]:
            return [memory_figure(node), await idle_figure(node, sizes.idle_s)]

        async def allocate() -> list[Figure]:
            return await allocate_round_trip(
                node.socket("cpupool.io/dedicated"), node.socket("cpupool.io/shared"), sizes.allocate_calls
            )

        async def reload() -> list[Figure]:
            return [await reload_figure(node, sizes.edits)]

        async def restarts() -> list[Figure]:
            return await reregistration_figure(node, sizes.restarts)

        async def load() -> list[Figure]:
            return [await load_figure(node, sizes.concurrency)]

        await _step("agent process: RSS and idle CPU", process, figures)
        await _step("Allocate round trips", allocate, figures)
        await _step("config reloads", reload, figures)
        await _step("kubelet restarts", restarts, figures)
        await _step("load", load, figures)
    figures.append(
        Figure(
            "agent_stop",
            "Agent exit status after SIGTERM at the end of the node benchmarks",
            {"exit_status": node.agent.exit_status},
            [],
            ["0 is a clean shutdown; run with --keep to read the agent's log (node/agent.log)"],
        )
    )

    cores = ("cpupool.io/cores",)
    async with running_node(workdir / "cores", dual64, DUAL64_ALL_EXCLUSIVE, cores) as node:

        async def preferred() -> list[Figure]:
            return [await preferred_rpc(node.socket("cpupool.io/cores"), sizes.preferred_iterations)]

        await _step("GetPreferredAllocation round trips", preferred, figures)

    async def nri() -> list[Figure]:
        return await nri_figures(workdir / "nri", NRI_QUICK if sizes is QUICK else NriSizes())

    await _step("NRI plugin", nri, figures)

    async def nodeconfig() -> list[Figure]:
        return [
            await webhook_reload_figure(workdir / "webhook-config", sizes.edits),
            await relabel_figure(workdir / "relabel", sizes.edits),
            await labels_rss_figure(workdir / "labels-rss"),
        ]

    await _step("per-node configs: webhook config edits, node relabels", nodeconfig, figures)

    async def real_path() -> list[Figure]:
        return await real_path_figures(workdir / "real", REAL_QUICK if sizes is QUICK else RealSizes())

    await _step("real path: the kubelet's own device manager (tests/kubeletpeer)", real_path, figures)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the harness (about 30 s)")
    parser.add_argument("--out", type=Path, default=None, help=f"report path (default {REPORT}; quick: none)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (agent logs, fake hosts)"
    )
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    # The in-process agent and the emulator log at info; only trouble belongs in the benchmark's output.
    setup_logging("error", "console")
    sizes = QUICK if args.quick else Sizes()
    out = args.out if args.out is not None else (None if args.quick else REPORT)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.monotonic()
    # Unix socket paths are limited to 107 bytes: keep the work directory short.
    workdir = Path(tempfile.mkdtemp(prefix="cpupool-bench-", dir="/tmp"))
    figures = asyncio.run(run_all(workdir, sizes))
    report = build_report(figures, started_at, time.monotonic() - started, args.quick)
    print(render(figures))
    print(
        f"\n{len(figures)} figures in {report['duration_s']} s; targets missed: {report['missed'] or 'none'}"
    )
    if out is not None:
        write_report(report, out)
        print(f"report: {out}")
    if args.keep:
        print(f"work directory kept: {workdir}")
    else:
        import shutil  # noqa: PLC0415

        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if args.check and report["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
