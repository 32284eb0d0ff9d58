"""The agent as a node runs it: memory, idle CPU, reload latency, re-registration after kubelet restarts."""

from __future__ import annotations

import asyncio
import random
import time

from bench.hosts import DUAL64_CONFIG
from bench.inotify import CreationWatch
from bench.node import Node
from bench.report import Figure, Target
from bench.stats import percentile, summary_ms
from tests.emulator import KUBELET_SOCKET

MIB = 1024
DEDICATED = "cpupool.io/dedicated"
# The reload edit: the dedicated pool gives up CPU 95 and takes it back (48 and 47 devices).
SHRUNK = DUAL64_CONFIG.replace('"8-31,72-95"', '"8-31,72-94"')


def memory_figure(node: Node) -> Figure:
    rss = node.agent.rss_kib()
    return Figure(
        "agent_rss",
        "Agent RSS after start (cpupool agent process, 3 pools, 12,080 devices)",
        {
            "rss_mib": round(rss / MIB, 1),
            "peak_rss_mib": round(node.agent.peak_rss_kib() / MIB, 1),
            "threads": node.agent.threads(),
            "spawn_to_ready_ms": round((node.ready_at - node.spawned_at) * 1000),
        },
        [Target("rss_mib", 60.0, "MiB")],
        [
            "VmRSS from /proc/<pid>/status once every resource registered and sent its list; "
            "spawn_to_ready includes the interpreter's start and imports"
        ],
    )


async def idle_figure(node: Node, seconds: float) -> Figure:
    await asyncio.sleep(1.0)  # start-up logging and garbage settle first
    cpu, wakeups, wall = node.agent.cpu_seconds(), node.agent.wakeups(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu = node.agent.cpu_seconds() - cpu
    wakeups = node.agent.wakeups() - wakeups
    wall = time.monotonic() - wall
    return Figure(
        "agent_idle_cpu",
        f"Agent idle CPU over {seconds:g} s (registered, streams open, nothing pending)",
        {
            "cpu_percent_of_one_core": round(cpu / wall * 100, 3),
            "cpu_ms": round(cpu * 1000),
            "context_switches_per_s": round(wakeups / wall, 1),
            "seconds": round(wall, 1),
        },
        [Target("cpu_percent_of_one_core", 0.2, "%")],
        ["utime+stime of every thread from /proc/<pid>/stat (10 ms ticks)"],
    )


async def reload_figure(node: Node, edits: int) -> Figure:
    """ConfigMap swap -> the changed pool's new list on the kubelet's stream (counted by its healthy devices:
    the benchmark's own Allocates, which no kubelet recorded, keep their CPUs listed, Unhealthy)."""
    rng = random.Random(4)
    samples, starts = [], []
    for i in range(edits):
        shrink = i % 2 == 0
        expected = 47 if shrink else 48
        started = time.monotonic()
        starts.append(started)
        node.configmap.write(SHRUNK if shrink else DUAL64_CONFIG)

        def arrived(since: float = started, count: int = expected) -> bool:
            return any(
                r.resource == DEDICATED and r.at >= since and r.healthy_count == count
                for r in node.emu.list_and_watch_messages[-5:]
            )

        await node.emu.wait_for(arrived, timeout=10, what=f"the {expected}-device list of {DEDICATED}")
        record = next(
            r
            for r in reversed(node.emu.list_and_watch_messages)
            if r.resource == DEDICATED and r.healthy_count == expected
        )
        samples.append(record.at - started)
        # Edits a human makes are seconds apart; a short random gap keeps them from merging into one event.
        await asyncio.sleep(0.05 + rng.random() * 0.05)
    node.agent.check_alive()
    return Figure(
        "reload_latency",
        f"Reload: ConfigMap ..data swap -> new list on the kubelet's stream ({edits} edits)",
        {**summary_ms(samples), "p50_breakdown_ms": reload_breakdown(node, starts, samples)},
        [Target("p99_ms", 100.0, "ms")],
        [
            "timed from just before ConfigMapDir.write (the kubelet's way: new data dir, ..data_tmp "
            "renamed over ..data) to the emulator's receive stamp; each edit moves one CPU in or out of a "
            "48-device pool",
            "p50_breakdown_ms: medians of each phase, from the agent's log timestamps: watch (swap -> "
            "watchfiles reports it), load (read, topology, PodResources, plan), apply_and_send (encode, "
            "send, the emulator's stamp)",
        ],
    )


def reload_breakdown(node: Node, starts: list[float], latencies: list[float]) -> dict[str, float]:
    """Median time of each reload phase, from the agent's log: until the file watch reports the change,
    until the new config is loaded (read, topology, PodResources, plan), until the kubelet has the list."""
    events = node.agent.log_events()
    watched = [at for at, event in events if event.endswith("changes detected")]
    loaded = [at for at, event in events if event == "config.loaded"]
    phases: dict[str, list[float]] = {"watch": [], "load": [], "apply_and_send": []}
    for start, latency in zip(starts, latencies, strict=True):
        seen = next((at for at in watched if at >= start), None)
        done = next((at for at in loaded if seen is not None and at >= seen), None)
        if seen is None or done is None or done > start + latency:
            continue
        phases["watch"].append(seen - start)
        phases["load"].append(done - seen)
        phases["apply_and_send"].append(start + latency - done)
    return {name: round(percentile(values, 50) * 1000, 1) for name, values in phases.items() if values}


async def reregistration_figure(node: Node, restarts: int) -> list[Figure]:
    """kubelet.sock created again -> the agent's Register arriving, for each restart of the emulator."""
    first, every = [], []
    async with CreationWatch(node.plugin_dir) as watch:
        for _ in range(restarts):
            since = time.monotonic()
            await node.emu.restart()
            created = await watch.created_after(KUBELET_SOCKET, since)
            arrivals = [
                (await node.emu.wait_registered(name, timeout=10, since=created)).at
                for name in node.resources
            ]
            first.append(min(arrivals) - created)
            every.append(max(arrivals) - created)
            await node.wait_ready(timeout_s=10, since=created)
            await asyncio.sleep(0.1)
    node.agent.check_alive()
    note = (
        "kubelet.sock's creation stamped from inotify in the benchmark process; Register stamped by the "
        "emulator on arrival"
    )
    return [
        Figure(
            "reregistration_latency",
            f"Re-registration: kubelet.sock re-created -> every resource's Register in ({restarts} restarts)",
            summary_ms(every),
            [Target("p99_ms", 100.0, "ms")],
            [note, f"{len(node.resources)} resources per restart; this is the last of them to arrive"],
        ),
        Figure(
            "reregistration_first",
            "Re-registration: kubelet.sock re-created -> first resource's Register arrived",
            summary_ms(first),
            [],
            [note],
        ),
    ]
