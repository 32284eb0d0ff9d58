"""The agent's CPU per exclusive admission's two calls, without the kubelet: a before/after tool.

A device plugin server for one exclusive pool runs in a child process, from the tree given (`--root`,
default this one: a git worktree of another commit compares two versions). A raw HTTP/2 client here makes
GetPreferredAllocation then Allocate, one call at a time, as the kubelet does, and the child's utime+stime
over the timed pairs is divided by their count. Without the kubelet peer and its checkpoint `fsync`, this
figure moves less with the machine than `real_agent_cpu_per_allocation` does; it is not part of `make bench`.

    python -m bench.pair [--root DIR] [--pairs 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.rawh2 import RawClient
from tests.test_connection import ALLOCATE, PREFERRED, allocate, preferred

_SERVER = """
import asyncio, pathlib, sys
from agent.config import parse_config, validate
from agent.cpuset import CpuSet
from agent.deviceplugin import ResourceServer, ResourceServicer
from agent.logs import setup_logging
from agent.metrics import Metrics
from agent.plan import build_plan
from tests.topologies import make_topology

setup_logging("warning", "json")
TOPO = make_topology(isolated="2-7,10-15")
CONFIG = 'resourceBaseName: cpupool.io\\npools:\\n  fast: {cpus: "2-5,10-13", pooltype: exclusive}\\n'

async def main() -> None:
    plan = build_plan(validate(parse_config(CONFIG, "pair.yaml"), TOPO), TOPO)
    servicer = ResourceServicer(plan.resources["cpupool.io/fast"], CpuSet(), Metrics())
    await ResourceServer(servicer, pathlib.Path(sys.argv[1])).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
WARMUP_PAIRS = 200


def _cpu_ms(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * 10.0  # clock ticks of 10 ms


async def server_cpu_per_pair(root: Path, pairs: int) -> tuple[float, float]:
    """(server CPU µs, wall µs) per GetPreferredAllocation + Allocate pair."""
    with tempfile.TemporaryDirectory(prefix="pair-") as tmp:
        socket = str(Path(tmp) / "fast.sock")
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SERVER,
            socket,
            stdout=subprocess.PIPE,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        try:
            assert child.stdout is not None
            if (await child.stdout.readline()).strip() != b"ready":
                raise RuntimeError(f"the server from {root} did not start")
            reader, writer = await asyncio.open_unix_connection(socket)
            client = RawClient(reader, writer, None)
            ask, take = preferred(["2", "3", "4", "5", "10", "11"], 1), allocate("3")
            for _ in range(WARMUP_PAIRS):
                await client.call(PREFERRED, ask)
                await client.call(ALLOCATE, take)
            cpu, wall = _cpu_ms(child.pid), time.perf_counter()
            for _ in range(pairs):
                await client.call(PREFERRED, ask)
                await client.call(ALLOCATE, take)
            cpu_us = (_cpu_ms(child.pid) - cpu) * 1000 / pairs
            wall_us = (time.perf_counter() - wall) * 1e6 / pairs
            await client.close()
            return cpu_us, wall_us
        finally:
            child.kill()
            await child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, action="append", help="a tree to measure (repeat to alternate)")
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    roots: list[Path] = args.root or [Path(__file__).resolve().parents[1]]
    for _ in range(args.rounds):
        for root in roots:
            cpu_us, wall_us = asyncio.run(server_cpu_per_pair(root.resolve(), args.pairs))
            print(f"{root}: server CPU {cpu_us:.0f} µs per pair, wall {wall_us:.0f} µs per pair", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
