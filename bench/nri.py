"""NRI figures: CreateContainer and Synchronize as the runtime waits for them, reconnection, RSS.

`cpupool agent` runs as its own process (as on a node) with NRI on; upstream NRI's runtime side
(tests/nripeer) calls it and times each call from the runtime's side, transport included; the grpcio
kubelet emulator in this process answers the plugin's PodResources calls.
Run alone with ``python -m bench.nri [--quick]``; `make bench` includes it.
"""

from __future__ import annotations

import argparse
import asyncio
import socket as socket_module
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.logs import setup_logging
from bench.agentproc import AgentProcess
from bench.report import Figure, Target, render
from bench.stats import summary_ms
from tests.emulator import KubeletEmulator
from tests.harness import POOLS, ConfigMapDir, host_root
from tests.nriruntime import NriRuntime


@dataclass(frozen=True)
class NriSizes:
    running: int = 500
    creations: int = 1000
    restarts: int = 20
    rss_creations: int = 10000


QUICK = NriSizes(running=50, creations=100, restarts=3, rss_creations=300)


async def _create_remove(
    runtime: NriRuntime, pod: str, cid: str, annotations: dict[str, str] | None = None
) -> float:
    """One container created then removed; the runtime's wait for CreateContainer, in seconds.
    `annotations`: what the kubelet copies from the Allocate answers into the container's CRI annotations."""
    reply = await runtime.create(pod, cid, name=cid, annotations=annotations or {})
    await runtime.remove(cid)
    return int(reply["elapsed_us"]) / 1e6


async def nri_figures(workdir: Path, sizes: NriSizes) -> list[Figure]:
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up before anything runs
    plugin_dir = workdir / "device-plugins"
    plugin_dir.mkdir()
    pod_resources = workdir / "pod-resources.sock"
    socket = workdir / "nri.sock"
    configmap = ConfigMapDir(workdir / "config")
    configmap.write(POOLS)
    agent = AgentProcess(
        root=host_root(workdir),
        plugin_dir=plugin_dir,
        config=configmap.file,
        pod_resources=pod_resources,
        log_path=workdir / "agent.log",
    )
    port = _free_port()
    agent.argv[agent.argv.index("--health-port") + 1] = str(port)
    agent.argv += ["--nri-socket", str(socket), "--health-host", "127.0.0.1"]
    async with (
        KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as emu,
        NriRuntime(socket) as runtime,
    ):
        await runtime.start()
        async with agent:
            await emu.wait_devices("cpupool.io/fast", timeout=30)
            await runtime.wait_plugin(timeout=30)
            await emu.allocate("cpupool.io/fast", 2, pod="db")
            await runtime.run_pod("p0", "db")
            await runtime.create("p0", "db-main")
            await emu.allocate("cpupool.io/shared", 1, pod="plain", container="sidecar")
            await runtime.run_pod("p1", "plain")
            for i in range(sizes.running):
                await runtime.create("p1", f"r{i}", name=f"r{i}")
            # Each in a new pod the plugin has no record of (a pod's later containers and restarts are
            # answered from its record of the pod); one in ten holds shared CPUs and shows its claim.
            before_cold = _histogram_counts(await _metrics(port), "CreateContainer")
            creates = []
            for i in range(sizes.creations):
                # The emulator knows only pods it admitted with a device: a 1-millicpu sidecar makes every
                # pod known to it, as every pod is to a real kubelet; one in ten containers holds CPUs too.
                await emu.allocate("cpupool.io/shared", 1, pod=f"q{i}", container="sidecar")
                annotations: dict[str, str] = {}
                if i % 10 == 0:
                    held = await emu.allocate("cpupool.io/shared", 10, pod=f"q{i}", container=f"n{i}")
                    annotations = held.annotations
                # 20 new pods a second, well under the kubelet's PodResources limit (100 calls/s), which a
                # faster loop would measure instead of the plugin.
                await asyncio.sleep(0.05)
                await runtime.run_pod(f"q{i}", f"q{i}")
                creates.append(await _create_remove(runtime, f"q{i}", f"n{i}", annotations))
                emu.release(f"q{i}")
            inside = _p99_bound(_histogram_counts(await _metrics(port), "CreateContainer"), before_cold)

            # Containers of a pod whose allocation the plugin holds: a pod's other containers, restarts,
            # and any pod whose sandbox was made long enough before (the usual case: the image is pulled
            # in between). The histogram is read before and after to isolate these calls.
            before_known = _histogram_counts(await _metrics(port), "CreateContainer")
            known = [await _create_remove(runtime, "p1", f"k{i}") for i in range(sizes.creations)]
            known_inside = _p99_bound(
                _histogram_counts(await _metrics(port), "CreateContainer"), before_known
            )

            syncs: list[float] = []
            reconnects: list[float] = []
            for _ in range(sizes.restarts):
                await runtime.stop()
                mark = len(runtime.events)
                started = time.perf_counter()
                await runtime.start()
                await runtime.wait_plugin()
                reconnects.append(time.perf_counter() - started)
                # The first synchronization is the runtime's own start (no plugin yet); the plugin's follows.
                synced = [e for e in runtime.events[mark:] if e["event"] == "synchronized"][1:]
                syncs += [int(e["elapsed_us"]) / 1e6 for e in synced]

            for i in range(max(1, sizes.rss_creations // 10)):
                await _create_remove(runtime, "p1", f"w{i}")
            before = agent.rss_kib() / 1024
            for i in range(sizes.rss_creations):
                await _create_remove(runtime, "p1", f"m{i}")
            after = agent.rss_kib() / 1024
    return [
        Figure(
            "nri_create",
            f"CreateContainer of a new pod as the runtime waits for it, {sizes.running} containers running",
            {**summary_ms(creates), "inside_plugin_p99_ms_at_most": inside},
            [Target("inside_plugin_p99_ms_at_most", 2, "ms")],
            [
                "measured in upstream NRI's runtime side: ttrpc both ways, the plugin's check of the "
                "container's Allocate claim (HMAC) and its decision; the kubelet's record (PodResources Get, "
                "grpcio kubelet emulator, another process) is read after the answer and compared",
                "inside the plugin: the bucket of the agent's own request histogram that holds its p99 "
                "(from request to reply)",
                "worst case: each container is created the moment its sandbox is, so the Get started at "
                "RunPodSandbox is still in flight and competes for the loop",
            ],
        ),
        Figure(
            "nri_create_known_pod",
            f"CreateContainer in a pod the plugin knows, {sizes.running} containers running",
            {**summary_ms(known), "inside_plugin_p99_ms_at_most": known_inside},
            [Target("inside_plugin_p99_ms_at_most", 2, "ms")],
            ["the pod's allocation was read at its first container or when its sandbox was made"],
        ),
        Figure(
            "nri_synchronize",
            f"Synchronize of {sizes.running + 1} containers as the runtime waits for it",
            summary_ms(syncs),
            [Target("p99_ms", 50, "ms")],
            ["one PodResources List, then a decision per container"],
        ),
        Figure(
            "nri_reconnect",
            "Runtime restart: from its start until the plugin is registered, configured and synchronized",
            summary_ms(reconnects),
            [Target("p99_ms", 100, "ms")],
            ["includes the benchmark driver's JSON round trips to the Go runtime"],
        ),
        Figure(
            "nri_rss",
            f"Agent RSS over {sizes.rss_creations} container creations and removals (after a warm-up)",
            {
                "before_mib": round(before, 1),
                "after_mib": round(after, 1),
                "growth_mib": round(after - before, 1),
            },
            [Target("growth_mib", 2, "MiB")],
        ),
    ]


def _free_port() -> int:
    with socket_module.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    raw = (await reader.read()).decode()
    writer.close()
    return raw.partition("\r\n\r\n")[2]


def _histogram_counts(text: str, method: str) -> list[tuple[float, int]]:
    """(upper bound, cumulative count) of each bucket of `method`'s answer-time histogram."""
    # prometheus_client writes labels in name order: le first, then method.
    prefix = 'cpupool_nri_request_duration_seconds_bucket{le="'
    suffix = f'",method="{method}"}} '
    buckets = []
    for line in text.splitlines():
        if line.startswith(prefix) and suffix in line:
            bound, _, count = line[len(prefix) :].partition(suffix)
            buckets.append((float("inf") if bound == "+Inf" else float(bound), int(float(count))))
    return buckets


def _p99_bound(after: list[tuple[float, int]], before: list[tuple[float, int]] | None) -> float | None:
    """The upper bound, in ms, of the bucket holding the p99 of the answers counted between two readings."""
    counts = [(b, n - (before[i][1] if before else 0)) for i, (b, n) in enumerate(after)]
    if not counts or not counts[-1][1]:
        return None
    total = counts[-1][1]
    return round(next(b for b, cumulative in counts if cumulative >= 0.99 * total) * 1000, 3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nri", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the harness")
    args = parser.parse_args(argv)
    setup_logging("error", "console")
    with tempfile.TemporaryDirectory(prefix="cpupool-nri-", dir="/tmp") as workdir:
        figures = asyncio.run(nri_figures(Path(workdir), QUICK if args.quick else NriSizes()))
    print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
