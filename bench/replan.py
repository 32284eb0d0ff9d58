"""Replanning with 200,000 shared millicpus held: the plan build, the kubelet's record read, and how long the
event loop can go without a turn while a replan runs beside it."""

from __future__ import annotations

import asyncio
import gc
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.config import parse_config, validate
from agent.idset import IdSet
from agent.kubeletapi.v1 import ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources
from agent.ledger import dumps as ledger_dumps
from agent.ledger import write as ledger_write
from agent.plan import build_plan, shared_device_id
from agent.supervisor import run_in_slices
from agent.wire import HeldReader, held_device_ids
from bench.report import Figure, Target
from bench.stats import summary_ms
from tests.topologies import make_topology

# 460 CPUs: 256 exclusive, 200 shared (200,000 millicpu devices).
_TOPOLOGY = make_topology(nodes=2, cores_per_node=115, threads=2)
_CONFIG = (
    "pools:\n  fast: {cpus: '0-255', pooltype: exclusive}\n  shared: {cpus: '256-455', pooltype: shared}\n"
)
_SHRUNK = (
    "pools:\n  fast: {cpus: '0-260', pooltype: exclusive}\n  shared: {cpus: '261-455', pooltype: shared}\n"
)


def _record(pods_changed: int = 0) -> bytes:
    """The kubelet's List answer: 400 pods of 500 millicpus each, and 128 exclusive CPUs; the first
    `pods_changed` pods under other names (pods replaced since the last read)."""
    pods = [
        PodResources(
            name=f"p{i}" if i >= pods_changed else f"q{i}",
            namespace="bench",
            containers=[
                ContainerResources(
                    name="c",
                    devices=[
                        ContainerDevices(
                            resource_name="cpupool.io/shared",
                            device_ids=[shared_device_id(j) for j in range(i * 500, (i + 1) * 500)],
                        ),
                        ContainerDevices(
                            resource_name="cpupool.io/fast", device_ids=[str(i)] if i < 128 else []
                        ),
                    ],
                )
            ],
        )
        for i in range(400)
    ]
    return bytes(ListPodResourcesResponse(pod_resources=pods))


async def replan_figures(repeats: int) -> list[Figure]:
    topology = _TOPOLOGY
    validated = validate(parse_config(_CONFIG, "bench"), topology)
    shrunk = validate(parse_config(_SHRUNK, "bench"), topology)
    raw = _record()
    held = held_device_ids(raw, lambda name: name.startswith("cpupool.io/"))
    first = build_plan(validated, topology)
    base = build_plan(validated, topology, first, held)
    changed = _record(pods_changed=5)
    same: list[float] = []
    shrink: list[float] = []
    decode: list[float] = []
    reread: list[float] = []
    replan_total: list[float] = []
    accept = lambda name: name.startswith("cpupool.io/")  # noqa: E731
    for n in range(repeats):
        started = time.process_time()
        build_plan(validated, topology, base, held)
        same.append(time.process_time() - started)
        started = time.process_time()
        build_plan(shrunk, topology, base, held)
        shrink.append(time.process_time() - started)
        started = time.process_time()
        held_device_ids(raw, accept)
        decode.append(time.process_time() - started)
        # What the agent does on a re-plan: re-read the record (a reader that saw the last answer; five pods
        # replaced since), then build.
        reader = HeldReader()
        for _ in reader.read_in_steps(changed if n % 2 else raw, accept, {}):
            pass
        started = time.process_time()
        found: dict[str, IdSet] = {}
        for _ in reader.read_in_steps(raw if n % 2 else changed, accept, found):
            pass
        reread.append(time.process_time() - started)
        build_plan(validated, topology, base, found)
        replan_total.append(time.process_time() - started)

    # How long the event loop waits for a turn (it asks for one every millisecond) while the agent does what
    # it does for a re-plan: the record decoded on the loop in slices, then the build on the loop; and for a
    # new config: the same decode, then the build in a worker thread.
    async def longest_gap(work: Callable[[], Awaitable[None]]) -> float:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async def run() -> None:
            for _ in range(repeats):
                await work()
            done.set()

        await asyncio.gather(ticker(), run())
        return round(max(gaps) * 1000, 2)

    reader = HeldReader()
    answers = [raw, changed]

    async def decoded() -> dict[str, IdSet]:
        found: dict[str, IdSet] = {}
        answers.reverse()
        await run_in_slices(reader.read_in_steps(answers[0], accept, found))
        return found

    state_dir = Path(tempfile.mkdtemp(prefix="cpupool-bench-state-"))

    # Then, as Supervisor._apply does before serving it, the plan's state file written on the loop.
    async def replan() -> None:
        plan = build_plan(validated, topology, base, await decoded())
        ledger_write(state_dir, ledger_dumps(plan))

    async def reload() -> None:
        plan = await asyncio.to_thread(build_plan, shrunk, topology, base, await decoded())
        ledger_write(state_dir, ledger_dumps(plan))

    # As the agent does once it has started (agent.leanstart.started): what lives for good is frozen out of
    # the collector's generations, so a full collection during a replan walks only what came since.
    gc.collect()
    gc.freeze()
    try:
        replan_gap = await longest_gap(replan)
        reload_gap = await longest_gap(reload)
    finally:
        gc.unfreeze()
    # The state file's text when held millicpus are scattered (a kubelet picks them in map order) and the
    # shared pool shrinks under them: the costliest text, made on the loop before the plan is served.
    rng = random.Random(7)
    scattered = dict(held)
    scattered["cpupool.io/shared"] = IdSet.from_indexes(i for i in range(200_000) if rng.random() < 0.5)
    scattered_plan = build_plan(
        shrunk, topology, build_plan(validated, topology, first, scattered), scattered
    )
    state_text: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        text = ledger_dumps(scattered_plan)
        ledger_write(state_dir, text)
        state_text.append(time.perf_counter() - started)
    shutil.rmtree(state_dir, ignore_errors=True)
    state_ms = summary_ms(state_text)
    same_ms, shrink_ms, decode_ms = summary_ms(same), summary_ms(shrink), summary_ms(decode)
    reread_ms, total_ms = summary_ms(reread), summary_ms(replan_total)
    return [
        Figure(
            "replan_200k_held",
            "Replan with 200,000 shared millicpus and 128 exclusive CPUs held (CPU time of the pure build)",
            {
                "same_config_p50_ms": same_ms["p50_ms"],
                "same_config_max_ms": same_ms["max_ms"],
                "shared_pool_shrinks_p50_ms": shrink_ms["p50_ms"],
                "shared_pool_shrinks_max_ms": shrink_ms["max_ms"],
                "record_decode_p50_ms": decode_ms["p50_ms"],
                "record_reread_p50_ms": reread_ms["p50_ms"],
                "record_reread_max_ms": reread_ms["max_ms"],
                "replan_p50_ms": total_ms["p50_ms"],
                "replan_max_ms": total_ms["max_ms"],
                "record_bytes": len(raw),
                "replan_loop_longest_gap_ms": replan_gap,
                "new_config_loop_longest_gap_ms": reload_gap,
                "state_file_scattered_p50_ms": state_ms["p50_ms"],
                "state_file_scattered_max_ms": state_ms["max_ms"],
                "state_file_scattered_bytes": len(text),
            },
            [
                Target("replan_max_ms", 50, "ms"),
                Target("same_config_max_ms", 50, "ms"),
                Target("shared_pool_shrinks_max_ms", 50, "ms"),
                Target("replan_loop_longest_gap_ms", 10, "ms"),
                Target("state_file_scattered_max_ms", 10, "ms"),
            ],
            [
                "replan_* is CPU time of what the agent does on a re-plan: the record read again by a reader"
                " that decoded the previous answer (five of 400 pods replaced since), then the build."
                " record_decode is the first read (agent start), decoded on the loop in slices."
                " Build figures are CPU time of agent.plan.build_plan. The loop gaps are the longest wait"
                " for a turn of an event loop that asks for one every millisecond while the agent's own path"
                " runs: the PodResources answer decoded on the loop in 1 ms slices, then the build on the"
                " loop (a re-plan of the same config) or in a worker thread (a new config), then the state"
                " file written on the loop as the agent does before serving a plan. state_file_scattered is"
                " that text and write (wall time) with half the 200,000 millicpus held at random and the"
                " shared pool shrunk under them.",
            ],
        )
    ]
