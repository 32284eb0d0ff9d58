"""The ListAndWatch list of a 200-CPU shared pool (200,000 devices): build it, send it, its size."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent.config import parse_config, validate
from agent.plan import MAX_MESSAGE_BYTES, build_plan
from agent.topology import discover
from agent.wire import encode_resource
from bench.client import RawListWatch, device_count
from bench.hosts import shared_pool_config, wide200
from bench.report import Figure, Target
from bench.stats import percentile
from tests.emulator import DEVICEPLUGIN
from tests.emulator.endpoint import devices_from_response
from tests.harness import running_agent

RESOURCE = "cpupool.io/big"
SOCKET = "cpupool-big.sock"
FULL, SMALLER = "0-199", "0-198"
LIST_TARGET = Target("max_ms", 250.0, "ms")
SIZE_TARGET = Target("bytes", float(MAX_MESSAGE_BYTES), "bytes (4 MiB, the kubelet's gRPC receive limit)")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _spread(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": _ms(percentile(samples, 50)), "max_ms": _ms(max(samples))}


def build_figure(root: Path, repeats: int) -> Figure:
    """Plan and encode, the agent's pure work for the list, without IO."""
    discovered, planned, encoded = [], [], []
    size = devices = 0
    for _ in range(repeats):
        started = time.perf_counter()
        topology = discover(root)
        found = time.perf_counter()
        plan = build_plan(validate(parse_config(shared_pool_config(FULL), "bench"), topology), topology)
        built = time.perf_counter()
        listing = encode_resource(plan.resources[RESOURCE])
        done = time.perf_counter()
        discovered.append(found - started)
        planned.append(built - found)
        encoded.append(done - built)
        size, devices = len(listing.SerializeToString()), listing.device_count
    total = [p + e for p, e in zip(planned, encoded, strict=True)]
    return Figure(
        "shared_list_build",
        "200-CPU shared pool list: plan + encode (pure, in process)",
        {
            "max_ms": _ms(max(total)),
            "p50_ms": _ms(percentile(total, 50)),
            "plan_ms": _spread(planned),
            "encode_ms": _spread(encoded),
            "discover_ms": _spread(discovered),
            "bytes": size,
            "devices": devices,
            "n": repeats,
        },
        [LIST_TARGET, SIZE_TARGET],
        ["discover (reading the 200-CPU sysfs tree) is not in plan + encode; a reload runs it first"],
    )


async def send_figures(workdir: Path, root: Path, repeats: int) -> list[Figure]:
    """From supervisor start, and from a config update, to a kubelet-side client holding the bytes."""
    async with running_agent(workdir, shared_pool_config(FULL), root=root, kubelet=False) as run:
        started = time.monotonic()
        socket = run.plugin_dir / SOCKET
        # The agent runs on this loop: polling each millisecond sees the socket within one step of its bind.
        while not socket.exists():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        watch = RawListWatch(socket)
        try:
            at, payload = await asyncio.to_thread(watch.next)
            start_s = at - started
            first_devices = device_count(payload)
            updates: list[float] = []
            counts = set()
            for i in range(repeats):
                cpus = SMALLER if i % 2 == 0 else FULL
                edit = time.monotonic()
                run.configmap.write(shared_pool_config(cpus))
                # The watcher would see the edit some milliseconds later; the figure is the agent's work.
                run.supervisor.notify("config")
                at, payload = await asyncio.to_thread(watch.next)
                updates.append(at - edit)
                counts.add(device_count(payload))
        finally:
            watch.close()
    start = Figure(
        "shared_list_start",
        "200-CPU shared pool list: supervisor start -> list received (discover, plan, encode, serve, send)",
        {"max_ms": _ms(start_s), "devices": first_devices},
        [LIST_TARGET],
        [
            "received by a raw grpcio ListAndWatch client (4 MiB receive limit, as the kubelet) that "
            "opened the stream as soon as the socket existed; no kubelet registered"
        ],
    )
    update = Figure(
        "shared_list_update",
        "200-CPU shared pool list: config update -> new list received (read, discover, plan, encode, send)",
        {**_spread(updates), "n": repeats, "devices": sorted(counts)},
        [LIST_TARGET],
        [
            "the update alternates the pool between 199 and 200 CPUs; timed from just before the ConfigMap "
            "swap, with the reconciler woken at once (file watch latency is in the reload figure)"
        ],
    )
    return [start, update]


def _convert_seconds(payload: bytes) -> float:
    """What the emulator does with a list before stamping it: parse, then one Python object per device."""
    started = time.perf_counter()
    devices_from_response(DEVICEPLUGIN.pb2.ListAndWatchResponse.FromString(payload))
    return time.perf_counter() - started


async def emulator_figure(workdir: Path, root: Path) -> Figure:
    """The grpcio kubelet emulator registers the agent and accepts the 200,000-device list."""
    async with running_agent(workdir, shared_pool_config(FULL), root=root) as run:
        registered = await run.emu.wait_registered(RESOURCE, timeout=30)
        snap = await run.emu.wait_devices(RESOURCE, lambda s: s.capacity > 0, timeout=30)
        record = next(r for r in run.emu.list_and_watch_messages if r.resource == RESOURCE)
    topology = discover(root)
    plan = build_plan(validate(parse_config(shared_pool_config(FULL), "bench"), topology), topology)
    payload = encode_resource(plan.resources[RESOURCE]).SerializeToString()
    convert_s = min(_convert_seconds(payload) for _ in range(3))
    return Figure(
        "shared_list_emulator",
        "200-CPU shared pool list through the kubelet emulator",
        {
            "devices_received": snap.capacity,
            "register_to_recorded_ms": _ms(record.at - registered.at),
            "emulator_parse_and_convert_ms": _ms(convert_s),
        },
        [],
        [
            "the emulator stamps a list after turning every device into a Python object, "
            "emulator_parse_and_convert_ms of it; the Go kubelet has no such cost, so the send figures "
            "above use a raw client"
        ],
    )


async def shared_list(workdir: Path, repeats: int, with_emulator: bool) -> list[Figure]:
    for sub in ("send", "emulator"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    root = wide200(workdir / "wide200")
    figures = [build_figure(root, repeats)]
    figures += await send_figures(workdir / "send", root, repeats)
    if with_emulator:
        figures.append(await emulator_figure(workdir / "emulator", root))
    return figures
