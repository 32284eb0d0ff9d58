"""Allocate and GetPreferredAllocation: round trips over the agent's socket, and the pure function."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from agent.allocation import ExclusiveDevice, preferred_allocation, sort_ids
from agent.config import parse_config, validate
from agent.idset import shared_device_id
from agent.plan import build_plan
from agent.topology import discover
from bench.client import PluginClient, allocate_request, preferred_request
from bench.hosts import DUAL64_ALL_EXCLUSIVE
from bench.report import Figure, Target
from bench.stats import summary_ms

RPC_TARGET = Target("p99_ms", 2.0, "ms")
# Calls before timing starts: the first ones pay for connection setup and cold caches on both sides.
WARMUP_CALLS = 50


def _timed_loop(client: PluginClient, method: str, requests: Sequence[Any], calls: int) -> list[float]:
    for i in range(WARMUP_CALLS):
        client.timed(method, requests[i % len(requests)])
    return [client.timed(method, requests[i % len(requests)])[0] for i in range(calls)]


async def allocate_round_trip(
    dedicated: Path, shared: Path, calls: int, agent_cpu: Callable[[], float] | None = None
) -> list[Figure]:
    """Allocate for one container, over the socket, as the kubelet sends it at pod admission. With
    `agent_cpu` (the agent's CPU seconds so far), each figure also gives the agent's CPU per call."""
    figures = []
    exclusive_ids = [str(c) for c in [*range(8, 32), *range(72, 96)]]
    pairs = [exclusive_ids[i : i + 2] for i in range(0, len(exclusive_ids), 2)]
    # 500 millicpus: a container asking for half a shared CPU lists 500 device IDs.
    slices = [[shared_device_id(i) for i in range(start, start + 500)] for start in range(0, 12000, 500)]
    cases = [
        ("allocate_exclusive", "Allocate round trip, exclusive pool, 2 device IDs", dedicated, pairs),
        ("allocate_shared", "Allocate round trip, shared pool, 500 millicpu IDs", shared, slices),
    ]
    for key, title, socket, id_lists in cases:
        client = PluginClient(socket)
        try:
            await asyncio.to_thread(client.wait_ready)
            requests = [allocate_request(ids) for ids in id_lists]
            cpu_before = agent_cpu() if agent_cpu is not None else 0.0
            samples = await asyncio.to_thread(_timed_loop, client, "Allocate", requests, calls)
            # The warm-up calls are in it too: (calls + warm-up) answers.
            cpu_ms = (agent_cpu() - cpu_before) * 1000 / (calls + WARMUP_CALLS) if agent_cpu else None
        finally:
            client.close()
        values: dict[str, Any] = dict(summary_ms(samples))
        if cpu_ms is not None:
            values["agent_cpu_ms_per_call"] = round(cpu_ms, 3)
        figures.append(
            Figure(
                key,
                title,
                values,
                [RPC_TARGET],
                [
                    f"grpcio client in the benchmark process, agent in its own process; {WARMUP_CALLS} "
                    "warm-up calls not counted"
                ],
            )
        )
    return figures


def preferred_cases(ids: Sequence[str]) -> list[tuple[str, list[str], list[str], int]]:
    """(label, available, must_include, size): whole-pool requests of growing size, and a fragmented pool."""
    cases: list[tuple[str, list[str], list[str], int]] = [
        (f"size={size}", list(ids), [], size) for size in (1, 4, 16, 64)
    ]
    rng = random.Random(7)
    half = sort_ids(rng.sample(list(ids), len(ids) // 2))
    cases.append(("fragmented: 64 free, 2 must_include, size=16", half, half[10:12], 16))
    return cases


def cores_pool(root: Path) -> dict[str, ExclusiveDevice]:
    topology = discover(root)
    config = parse_config(DUAL64_ALL_EXCLUSIVE, "bench")
    plan = build_plan(validate(config, topology), topology)
    return dict(plan.resources["cpupool.io/cores"].exclusive)


def _repeat(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def preferred_pure(root: Path, iterations: int) -> Figure:
    devices = cores_pool(root)
    per_case: dict[str, Any] = {}
    worst = 0.0
    for label, available, must, size in preferred_cases(list(devices)):
        samples = _repeat(partial(preferred_allocation, devices, available, must, size), iterations)
        summary = summary_ms(samples)
        per_case[label] = summary
        worst = max(worst, summary["p99_ms"])
    return Figure(
        "preferred_pure",
        "GetPreferredAllocation, the pure function (agent.allocation.preferred_allocation), 128-device pool",
        {"p99_ms": worst, "cases": per_case},
        [RPC_TARGET],
        ["p99_ms is the worst case's p99; pool: every thread of a 2-socket 64-core host, one device each"],
    )


async def preferred_rpc(socket: Path, iterations: int) -> Figure:
    client = PluginClient(socket)
    per_case: dict[str, Any] = {}
    worst = 0.0
    try:
        await asyncio.to_thread(client.wait_ready)
        ids = [str(c) for c in range(128)]
        for label, available, must, size in preferred_cases(ids):
            request = preferred_request(available, must, size)
            samples = await asyncio.to_thread(
                _timed_loop, client, "GetPreferredAllocation", [request], iterations
            )
            summary = summary_ms(samples)
            per_case[label] = summary
            worst = max(worst, summary["p99_ms"])
    finally:
        client.close()
    return Figure(
        "preferred_rpc",
        "GetPreferredAllocation round trip over the socket, 128-device exclusive pool (64 cores)",
        {"p99_ms": worst, "cases": per_case},
        [RPC_TARGET],
        ["p99_ms is the worst case's p99; grpcio client, agent in its own process"],
    )


def main() -> int:
    """`python -m bench.rpc [--calls N]`: only the Allocate and GetPreferredAllocation round trips."""
    import argparse  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from agent.logs import setup_logging  # noqa: PLC0415
    from bench.hosts import DUAL64_CONFIG, dual64  # noqa: PLC0415
    from bench.node import running_node  # noqa: PLC0415
    from bench.report import render  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m bench.rpc", description=main.__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="Allocate calls per series (bench: 2000)")
    parser.add_argument("--preferred", type=int, default=500, help="calls per GetPreferredAllocation case")
    args = parser.parse_args()
    setup_logging("error", "console")

    async def run(workdir: Path) -> list[Figure]:
        resources = ("cpupool.io/dedicated", "cpupool.io/dedicated-ht", "cpupool.io/shared")
        async with running_node(workdir / "node", dual64, DUAL64_CONFIG, resources) as node:
            figures = await allocate_round_trip(
                node.socket("cpupool.io/dedicated"),
                node.socket("cpupool.io/shared"),
                args.calls,
                node.agent.cpu_seconds,
            )
        cores = ("cpupool.io/cores",)
        async with running_node(workdir / "cores", dual64, DUAL64_ALL_EXCLUSIVE, cores) as node:
            figures.append(await preferred_rpc(node.socket("cpupool.io/cores"), args.preferred))
        return figures

    with tempfile.TemporaryDirectory(prefix="cpupool-rpc-") as workdir:
        print(render(asyncio.run(run(Path(workdir)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
