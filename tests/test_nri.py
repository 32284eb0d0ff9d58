"""The NRI plugin against upstream NRI's runtime side (tests/nripeer, pkg/adaptation v0.12.5).

The agent runs for real against the grpcio kubelet emulator: devices are allocated through the kubelet's
admission flow, so the PodResources API the plugin asks is the emulator's record, never the pod's own env.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cpuset import CpuSet
from agent.nri.allocations import AllocationSource, PodResourcesAllocations
from agent.nri.plugin import NriPlugin, NriSettings
from agent.nri.policy import Policy
from agent.nri.view import SupervisorPoolView
from tests.harness import POOLS, Running, running_agent
from tests.nriruntime import NriRuntime, PeerUnavailable, peer_binary

try:
    peer_binary()
except PeerUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

FAST, MULTI, SHARED = "cpupool.io/fast", "cpupool.io/multi", "cpupool.io/shared"
# dual32 with the harness pools: exclusive fast 2-7,18-23 and multi 8-11,24-27; shared 12-13.
EXCLUSIVE = CpuSet.parse("2-11,18-27")
EXCLUSIVE_FAST = CpuSet.parse("2-7,18-23")
ONLINE = CpuSet(range(32))
OTHERS = ONLINE - EXCLUSIVE


@dataclass
class Node:
    agent: Running
    plugin: NriPlugin
    runtime: NriRuntime
    socket: Path

    async def pod(self, pod_id: str, name: str, namespace: str = "default", **extra: object) -> None:
        await self.runtime.run_pod(pod_id, name, namespace, **extra)


@contextlib.asynccontextmanager
async def plugin_task(plugin: NriPlugin) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(plugin.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_plugin(
    agent: Running,
    socket: Path,
    policy: Policy = Policy.STRICT,
    claims: bool = False,
    allocations: AllocationSource | None = None,
) -> NriPlugin:
    """The plugin over the agent's plan; without `claims` every new pod waits for the kubelet's record
    (the path these tests cover; tests/test_nri_claims_runtime.py covers claims)."""
    plugin = NriPlugin(
        NriSettings(socket=socket, policy=policy),
        SupervisorPoolView(agent.supervisor),
        allocations or PodResourcesAllocations(agent.pod_resources),
        agent.supervisor.metrics,
        claims=agent.supervisor.claims if claims else None,
    )
    agent.supervisor.plan_listeners.append(plugin.plan_changed)
    return plugin


@contextlib.asynccontextmanager
async def node(tmp_path: Path, policy: Policy = Policy.STRICT, config: str = POOLS) -> AsyncIterator[Node]:
    """The agent, its NRI plugin and a started NRI runtime with the plugin registered and synchronized."""
    async with running_agent(tmp_path, config) as agent:
        for name in (FAST, MULTI, SHARED):
            await agent.emu.wait_registered(name)
            await agent.emu.wait_devices(name)
        socket = tmp_path / "nri.sock"
        plugin = make_plugin(agent, socket, policy)
        async with NriRuntime(socket) as runtime, plugin_task(plugin):
            await runtime.start()
            await runtime.wait_plugin()
            yield Node(agent, plugin, runtime, socket)


def cpus_of(ids: tuple[str, ...]) -> CpuSet:
    return CpuSet(int(i) for i in ids)


async def test_exclusive_container_gets_its_cpus_and_their_numa_node(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        created = await n.runtime.create("p1", "c1", cpus="0-31")
        assert created["adjusted"]
        assert CpuSet.parse(created["cpus"]) == cpus_of(fast.device_ids)
        assert created["mems"] == "0"
        assert n.plugin.enforced()[0]["kind"] == "exclusive"


async def test_shared_container_gets_the_shared_pool(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.agent.emu.allocate(SHARED, 500, pod="web")
        await n.pod("p1", "web")
        created = await n.runtime.create("p1", "c1")
        assert CpuSet.parse(created["cpus"]) == CpuSet.parse("12-13") and created["mems"] == "1"


async def test_exclusive_and_shared_devices_get_both(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        multi = await n.agent.emu.allocate(MULTI, 1, pod="mix")
        await n.agent.emu.allocate(SHARED, 100, pod="mix")
        await n.pod("p1", "mix")
        created = await n.runtime.create("p1", "c1")
        # multiThreaded: the device is a core, both of its threads.
        core = CpuSet([int(multi.device_ids[0]), int(multi.device_ids[0]) + 16])
        assert CpuSet.parse(created["cpus"]) == core | CpuSet.parse("12-13")
        assert created["mems"] == "1"


async def test_other_containers_are_kept_off_exclusive_pools_under_strict(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.pod("p1", "plain")
        unset = await n.runtime.create("p1", "c1", name="a")
        everything = await n.runtime.create("p1", "c2", name="b", cpus="0-31")
        narrowed = await n.runtime.create("p1", "c3", name="c", cpus="0-3")
        only_pooled = await n.runtime.create("p1", "c4", name="d", cpus="2-3")
        assert CpuSet.parse(unset["cpus"]) == OTHERS
        assert CpuSet.parse(everything["cpus"]) == OTHERS
        # The kubelet's own narrowing is kept; only pooled CPUs leave it.
        assert CpuSet.parse(narrowed["cpus"]) == CpuSet.parse("0-1")
        # Never an empty cpuset: left as it was, and counted as a conflict.
        assert only_pooled["cpus"] == "2-3" and not only_pooled["adjusted"]
        metrics = n.agent.supervisor.metrics
        assert metrics.nri_adjustments.get(event="create", outcome="conflict", kind="other") == 1


async def test_pools_policy_leaves_other_containers_alone(tmp_path: Path) -> None:
    async with node(tmp_path, Policy.POOLS) as n:
        fast = await n.agent.emu.allocate(FAST, 1, pod="db")
        await n.pod("p1", "db")
        await n.pod("p2", "plain")
        pooled = await n.runtime.create("p1", "c1")
        plain = await n.runtime.create("p2", "c2", cpus="0-31")
        assert CpuSet.parse(pooled["cpus"]) == cpus_of(fast.device_ids)
        assert plain["cpus"] == "0-31" and not plain["adjusted"]


async def test_forged_env_and_annotations_get_no_pool_cpus(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        forged = {"cpupool.io/cpus-fast": "2-3"}
        await n.pod("p1", "forger", annotations=forged)
        created = await n.runtime.create(
            "p1",
            "c1",
            env=["EXCLUSIVE_CPUS=2,3", "CPUPOOL_FAST_CPUS=2,3"],
            annotations=forged,
            cpus="0-31",
        )
        assert CpuSet.parse(created["cpus"]) == OTHERS
        assert not CpuSet.parse(created["cpus"]) & EXCLUSIVE


async def test_cpu_manager_updates_keep_our_cpusets(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        await n.pod("p2", "plain")
        await n.runtime.create("p1", "c1")
        await n.runtime.create("p2", "c2")
        # The kubelet's CPU manager reconciles every container to its default set, twice.
        for _ in range(2):
            pooled = await n.runtime.update("c1", "0-31")
            plain = await n.runtime.update("c2", "0-31")
            assert CpuSet.parse(pooled["cpus"]) == cpus_of(fast.device_ids)
            assert CpuSet.parse(plain["cpus"]) == OTHERS
        # A narrower set from the kubelet is taken, minus the pools.
        assert CpuSet.parse((await n.runtime.update("c2", "0-5"))["cpus"]) == CpuSet.parse("0-1")
        # No unsolicited update was sent back: nothing fights the kubelet's loop.
        assert not [e for e in n.runtime.events if e["event"] == "updates"]


async def test_synchronize_reconciles_running_containers(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        for name in (FAST, SHARED):
            await agent.emu.wait_devices(name)
        fast = await agent.emu.allocate(FAST, 3, pod="db")
        await agent.emu.allocate(SHARED, 200, pod="web")
        socket = tmp_path / "nri.sock"
        async with NriRuntime(socket) as runtime:
            await runtime.start()
            await runtime.run_pod("p1", "db")
            await runtime.run_pod("p2", "web")
            await runtime.run_pod("p3", "plain")
            for pod, cid in (("p1", "c1"), ("p2", "c2"), ("p3", "c3")):
                await runtime.create(pod, cid, cpus="0-31")
            plugin = make_plugin(agent, socket)
            mark = len(runtime.events)  # the runtime's own start synchronizes its (no) built-in plugins
            async with plugin_task(plugin):
                await runtime.wait_plugin()
                synced = await runtime.wait_event("synchronized", after=mark)
                assert synced["containers"] == 3 and len(synced["updates"]) == 3
                cpusets = await runtime.cpusets()
                assert CpuSet.parse(cpusets["c1"]) == cpus_of(fast.device_ids)
                assert CpuSet.parse(cpusets["c2"]) == CpuSet.parse("12-13")
                assert CpuSet.parse(cpusets["c3"]) == OTHERS


async def test_pool_reload_pushes_updates_to_running_containers(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.agent.emu.allocate(SHARED, 500, pod="web")
        await n.pod("p1", "web")
        await n.pod("p2", "plain")
        await n.runtime.create("p1", "c1")
        await n.runtime.create("p2", "c2")
        mark = len(n.runtime.events)
        # The multi pool goes away and the shared pool grows onto two of its CPUs.
        n.agent.configmap.write(
            """
resourceBaseName: cpupool.io
pools:
  fast:   {cpus: "2-7,18-23", pooltype: exclusive}
  shared: {cpus: "8-9,12-13", pooltype: shared}
"""
        )
        pushed = await n.runtime.wait_event("updates", after=mark)
        assert {u["id"] for u in pushed["updates"]} == {"c2"}
        cpusets = await n.runtime.cpusets()
        # The running shared container keeps what its devices meant when they were handed out...
        assert CpuSet.parse(cpusets["c1"]) == CpuSet.parse("12-13")
        # ...and CPUs that left the exclusive pools are given back to everyone else.
        assert CpuSet.parse(cpusets["c2"]) == ONLINE - CpuSet.parse("2-7,18-23")
        # A shared container created now gets the grown pool.
        await n.agent.emu.allocate(SHARED, 100, pod="web2")
        await n.pod("p3", "web2")
        assert CpuSet.parse((await n.runtime.create("p3", "c3"))["cpus"]) == CpuSet.parse("8-9,12-13")


async def test_runtime_restarts_twenty_times(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        fast = await n.agent.emu.allocate(FAST, 1, pod="db")
        await n.pod("p1", "db")
        await n.runtime.create("p1", "c0")
        for round_ in range(1, 21):
            await n.runtime.stop()
            await n.runtime.start()
            await n.runtime.wait_plugin()
            created = await n.runtime.create("p1", f"c{round_}", name=f"main{round_}")
            # The new container holds no devices of its own: it is kept off the pools...
            assert CpuSet.parse(created["cpus"]) == OTHERS
        # ...and the first one kept its CPU through every re-synchronization.
        assert CpuSet.parse((await n.runtime.cpusets())["c0"]) == cpus_of(fast.device_ids)
        assert n.agent.supervisor.metrics.nri_connections.get(result="ok") == 21
        assert n.plugin.connected


async def test_absent_socket_is_reported_once_and_the_plugin_connects_when_it_appears(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        await agent.emu.wait_devices(FAST)
        socket = tmp_path / "nri.sock"
        plugin = make_plugin(agent, socket)
        metrics = agent.supervisor.metrics
        async with NriRuntime(socket) as runtime, plugin_task(plugin):
            await asyncio.sleep(0.3)
            assert not plugin.connected
            assert metrics.nri_connected.get() == 0
            assert metrics.nri_connections.get(result="absent") == 1
            assert "nri.sock" in (plugin.last_error or "")
            # The device plugin side is untouched.
            assert agent.supervisor.ready
            await runtime.start()
            await runtime.wait_plugin()
            assert plugin.connected and metrics.nri_connected.get() == 1


async def test_a_thousand_creations_while_pools_reload(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        # A pod the kubelet knows (it holds a device in another container): read once, then remembered.
        await n.agent.emu.allocate(SHARED, 1, pod="plain", container="sidecar")
        await n.pod("p1", "plain")
        configs = [
            POOLS,
            POOLS.replace('cpus: "12-13", pooltype: shared', 'cpus: "12-15", pooltype: shared'),
        ]

        async def reload_many() -> None:
            for i in range(10):
                n.agent.configmap.write(configs[i % 2])
                await asyncio.sleep(0.05)

        reloading = asyncio.create_task(reload_many())
        for i in range(1000):
            created = await n.runtime.create("p1", f"c{i}", name=f"m{i}")
            # Whatever the plan of the moment, never a pooled exclusive CPU, never an empty cpuset.
            assert created["cpus"] and not CpuSet.parse(created["cpus"]) & EXCLUSIVE, (
                i,
                n.agent.supervisor.metrics.nri_adjustments.values,
            )
        await reloading
        assert n.agent.supervisor.metrics.nri_adjustments.get(event="create", outcome="error") == 0


async def test_cpus_freed_by_a_reload_after_a_runtime_restart_reach_old_containers(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.pod("p1", "plain")
        await n.runtime.create("p1", "c1")
        await n.runtime.stop()
        await n.runtime.start()
        await n.runtime.wait_plugin()
        mark = len(n.runtime.events)
        n.agent.configmap.write(
            POOLS.replace(
                '  multi:  {cpus: "8-11,24-27", pooltype: exclusive, hyperThreadingPolicy: multiThreaded}\n',
                "",
            )
        )
        await n.runtime.wait_event("updates", after=mark)
        cpusets = await n.runtime.cpusets()
        assert CpuSet.parse(cpusets["c1"]) == ONLINE - CpuSet.parse("2-7,18-23")


async def test_a_pods_allocation_is_remembered_and_unknown_pods_get_no_adjustment(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        await n.runtime.create("p1", "c1")
        # The kubelet goes away (restarting): PodResources cannot be asked.
        await n.agent.emu.stop()
        # A restart of the same pod's container: its allocation, read at its first creation, still holds.
        again = await n.runtime.create("p1", "c2")
        assert CpuSet.parse(again["cpus"]) == cpus_of(fast.device_ids)
        # A new pod cannot be mapped: it is left exactly as the runtime had it, never failed.
        await n.pod("p2", "new")
        unknown = await n.runtime.create("p2", "c3", cpus="0-31")
        assert unknown["cpus"] == "0-31" and not unknown["adjusted"]
        metrics = n.agent.supervisor.metrics
        assert metrics.nri_adjustments.get(event="create", outcome="unmapped") == 1


async def test_a_burst_of_new_pods_outruns_the_kubelets_rate_limit_and_every_one_is_enforced(
    tmp_path: Path,
) -> None:
    async with node(tmp_path) as n:
        # The kubelet serves PodResources at 100 calls/s with a burst of 10: 40 new pods at once exceed it.
        for i in range(40):
            await n.agent.emu.allocate(SHARED, 1, pod=f"web{i}", container="sidecar")
        for i in range(40):
            await n.pod(f"p{i}", f"web{i}")
        created = await asyncio.gather(*(n.runtime.create(f"p{i}", f"c{i}") for i in range(40)))
        assert all(CpuSet.parse(c["cpus"]) == OTHERS for c in created)
        assert n.agent.supervisor.metrics.nri_adjustments.get(event="create", outcome="unmapped") == 0


async def test_a_held_cpu_a_reload_took_from_its_pool_stays_off_limits(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        fast = await n.agent.emu.allocate(FAST, 1, pod="db")
        held = int(fast.device_ids[0])
        await n.pod("p1", "db")
        await n.runtime.create("p1", "c1")
        generation = n.agent.supervisor.config_generation
        n.agent.configmap.write(
            POOLS.replace('"2-7,18-23"', f'"{(EXCLUSIVE_FAST - CpuSet([held])).format()}"')
        )
        await n.agent.emu.wait_for(
            lambda: n.agent.supervisor.config_generation > generation, what="the new config"
        )
        await n.pod("p2", "plain")
        plain = await n.runtime.create("p2", "c2")
        # The pod still runs on the CPU it holds; nobody else gets it until that pod is gone.
        assert held not in CpuSet.parse(plain["cpus"])
        assert CpuSet.parse((await n.runtime.cpusets())["c1"]) == CpuSet([held])
