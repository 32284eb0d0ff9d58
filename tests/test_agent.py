"""The agent end to end: real unix sockets, real gRPC, the grpcio kubelet emulator as the other side."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from agent.cpuset import CpuSet
from tests.emulator import KubeletEmulator, PluginCallError
from tests.harness import POOLS, host_root, running_agent

FAST, MULTI, SHARED = "cpupool.io/fast", "cpupool.io/multi", "cpupool.io/shared"


async def registered(run, *names: str) -> None:  # type: ignore[no-untyped-def]
    for name in names:
        await run.emu.wait_registered(name)
        await run.emu.wait_devices(name)


async def test_every_pool_registers_with_its_devices(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as run:
        await registered(run, FAST, MULTI, SHARED)
        fast, multi, shared = (run.emu.resource(n) for n in (FAST, MULTI, SHARED))
        assert fast is not None and multi is not None and shared is not None
        # One device per CPU, named by the CPU, on its NUMA node.
        assert {d.id: d.numa_nodes for d in fast.devices} == {str(c): (0,) for c in CpuSet.parse("2-7,18-23")}
        # multiThreaded: one device per core, carrying its NUMA node.
        assert {d.id: d.numa_nodes for d in multi.devices} == {str(c): (1,) for c in range(8, 12)}
        # Shared: one device per millicpu, no NUMA affinity.
        assert shared.capacity == shared.allocatable == 2000
        assert all(d.numa_nodes is None for d in shared.devices)
        assert fast.options is not None and fast.options.get_preferred_allocation_available
        assert shared.options is not None and not shared.options.get_preferred_allocation_available
        assert not fast.options.pre_start_required
        # The sockets are the agent's alone.
        mode = stat.S_IMODE((run.plugin_dir / "cpupool-fast.sock").stat().st_mode)
        assert mode == 0o600


async def test_allocate_gives_the_container_its_cpus(tmp_path: Path) -> None:
    root = host_root(tmp_path, cpuid=tuple(range(32)))
    async with running_agent(tmp_path, root=root) as run:
        await registered(run, FAST, MULTI, SHARED)
        fast = await run.emu.allocate(FAST, 4)
        cpus = CpuSet(int(i) for i in fast.device_ids)
        assert fast.preferred_used
        assert fast.envs["EXCLUSIVE_CPUS"] == cpus.comma_list()
        assert fast.envs["CPUPOOL_FAST_CPUS"] == cpus.comma_list()
        # The CPU list, and the signed claim the NRI plugin reads (agent/claim.py).
        assert fast.annotations.keys() == {"cpupool.io/cpus-fast", "cpupool.io/claim-fast"}
        assert fast.annotations["cpupool.io/cpus-fast"] == cpus.comma_list()
        claim = run.supervisor.claims.verify(fast.annotations["cpupool.io/claim-fast"])
        assert sorted(claim.device_ids) == sorted(fast.device_ids)
        assert sorted(d.host_path for d in fast.devices) == sorted(f"/dev/cpu/{c}/cpuid" for c in cpus)
        assert all(d.permissions == "r" and d.container_path == d.host_path for d in fast.devices)

        multi = await run.emu.allocate(MULTI, 2)
        # A multiThreaded device brings the core's sibling along.
        cores = [int(i) for i in multi.device_ids]
        assert multi.envs["EXCLUSIVE_CPUS"] == CpuSet([*cores, *(c + 16 for c in cores)]).comma_list()

        shared = await run.emu.allocate(SHARED, 1500)
        assert not shared.preferred_used
        assert shared.envs == {"SHARED_CPUS": "12,13", "CPUPOOL_SHARED_CPUS": "12,13"}
        assert shared.annotations["cpupool.io/cpus-shared"] == "12,13"
        shared_claim = run.supervisor.claims.verify(shared.annotations["cpupool.io/claim-shared"])
        assert len(shared_claim.device_ids) == 1500
        assert shared.devices == []


async def test_preferred_allocation_packs_siblings_on_one_numa_node(tmp_path: Path) -> None:
    config = 'pools:\n  all: {cpus: "2-15,18-31", pooltype: exclusive}\n'
    async with running_agent(tmp_path, config) as run:
        await registered(run, "cpupool.io/all")
        first = await run.emu.allocate("cpupool.io/all", 4)
        cpus = CpuSet(int(i) for i in first.device_ids)
        # Two whole cores (n and n+16) on NUMA node 0 (CPUs 0-7,16-23).
        assert cpus.issubset(CpuSet.parse("0-7,16-23"))
        assert all(c + 16 in cpus for c in cpus if c < 16)
        # must_include on node 1 pulls the rest there.
        node1 = [str(c) for c in CpuSet.parse("8-15,24-31")]
        answer = await run.emu.call_preferred("cpupool.io/all", node1, ["9"], 3)
        assert "9" in answer and all(int(i) in CpuSet.parse("8-15,24-31") for i in answer)
        assert "25" in answer


async def test_allocate_is_idempotent(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as run:
        await registered(run, FAST)
        first = await run.emu.call_allocate(FAST, ["3", "19"])
        again = await run.emu.call_allocate(FAST, ["3", "19"])
        # The same answer but for the claim's nonce: every Allocate answer is a claim of its own, so that a
        # container reusing devices (a pod replaced on the same CPUs) is told apart from a replay.
        first_claim = first.annotations.pop("cpupool.io/claim-fast")
        again_claim = again.annotations.pop("cpupool.io/claim-fast")
        assert first == again
        assert first.envs["EXCLUSIVE_CPUS"] == "3,19"
        verify = run.supervisor.claims.verify
        assert verify(first_claim).device_ids == verify(again_claim).device_ids == ("3", "19")


@pytest.mark.parametrize(
    ("resource", "ids", "details"),
    [
        (FAST, ["3", "99"], "unknown device IDs for cpupool.io/fast: '99'"),
        (FAST, ["8"], "unknown device IDs for cpupool.io/fast: '8'"),
        (FAST, [], "lists no device IDs"),
        (FAST, ["3", "3"], "more than once: '3'"),
        (SHARED, ["zzzzzz"], "unknown device IDs for cpupool.io/shared: 'zzzzzz'"),
        (SHARED, [str(i) for i in range(100_000)], "lists 100000 device IDs; this resource has only 2000"),
    ],
)
async def test_bad_allocate_requests_get_invalid_argument(
    tmp_path: Path, resource: str, ids: list[str], details: str
) -> None:
    async with running_agent(tmp_path) as run:
        await registered(run, resource)
        with pytest.raises(PluginCallError) as info:
            await run.emu.call_allocate(resource, ids)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details in info.value.details
        # The agent keeps serving.
        ok = await run.emu.allocate(resource, 1)
        assert len(ok.device_ids) == 1


async def test_bad_preferred_requests_get_invalid_argument(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as run:
        await registered(run, FAST)
        with pytest.raises(PluginCallError) as info:
            await run.emu.call_preferred(FAST, ["2", "3"], [], 5)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(PluginCallError) as info:
            await run.emu.call_preferred(FAST, ["2", "3"], ["4"], 2)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "4" in info.value.details
        assert await run.emu.call_preferred(FAST, ["2", "3", "18"], ["3"], 2) in (
            ["3", "19"],
            ["2", "3"],
            ["3", "18"],
        )
        await run.emu.call_prestart(FAST, ["2"])


async def test_no_config_serves_the_isolated_cpus(tmp_path: Path) -> None:
    async with running_agent(tmp_path, config=None) as run:
        await registered(run, "cpupool.io/isolcpus")
        snap = run.emu.resource("cpupool.io/isolcpus")
        assert snap is not None
        assert snap.device_ids == frozenset(str(c) for c in CpuSet.parse("2-7,18-23"))


async def test_agent_started_before_the_kubelet_registers_when_it_comes(tmp_path: Path) -> None:
    async with running_agent(tmp_path, kubelet=False) as run:
        await asyncio.sleep(0.3)
        assert run.emu.registrations == ()
        await run.emu.start()
        await registered(run, FAST, MULTI, SHARED)


async def test_health_readiness_follows_registration(tmp_path: Path) -> None:
    async with running_agent(tmp_path, kubelet=False) as run:
        await asyncio.wait_for(run.supervisor.started.wait(), 5)
        assert not run.supervisor.ready
        await run.emu.start()
        await registered(run, FAST, MULTI, SHARED)
        await run.emu.wait_for(lambda: run.supervisor.ready, what="the agent to be ready")
        metrics = run.supervisor.metrics.render()
        assert 'cpupool_resource_registered{resource="cpupool.io/fast"} 1' in metrics
        assert 'cpupool_devices{health="healthy",resource="cpupool.io/shared"} 2000' in metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cli_agent_serves_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The real `cpupool agent` process: registers, answers health, removes its sockets on SIGTERM."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    config = tmp_path / "poolconfig.yaml"
    config.write_text(POOLS)
    port = _free_port()
    async with KubeletEmulator(plugin_dir) as emu:
        proc = subprocess.Popen(  # noqa: ASYNC220 - the agent runs beside the emulator's threads
            [
                sys.executable, "-m", "agent.cli", "agent",
                "--config", str(config),
                "--root", str(host_root(tmp_path)),
                "--plugin-dir", str(plugin_dir),
                "--pod-resources-socket", str(tmp_path / "none.sock"),
                "--state-dir", str(tmp_path / "state"),
                "--health-port", str(port), "--health-host", "127.0.0.1",
                "--no-pin-self", "--log-format", "json",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            for name in (FAST, MULTI, SHARED):
                await emu.wait_registered(name, timeout=15)
                await emu.wait_devices(name)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
            reply = (await reader.read()).decode()
            writer.close()
            assert " 200 " in reply.splitlines()[0] and '"ready": true' in reply
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.to_thread(proc.communicate, timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stderr[-2000:]
        assert sorted(p.name for p in plugin_dir.iterdir()) == ["kubelet.sock"]
        assert '"event": "agent.stopped"' in stderr


async def test_refuses_a_socket_another_server_answers_and_clears_a_stale_one(tmp_path: Path) -> None:
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir()
    live = plugin_dir / "cpupool-fast.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(live))
    listener.listen()
    stale = plugin_dir / "cpupool-shared.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody answers
    before = live.stat().st_ino
    try:
        # No kubelet yet: a starting kubelet would delete both files.
        async with running_agent(tmp_path, kubelet=False) as run:
            await asyncio.wait_for(run.supervisor.started.wait(), 5)
            assert FAST not in run.supervisor.states
            assert live.stat().st_ino == before
            assert run.supervisor.states[SHARED].server.socket_present()
            assert stale.stat().st_ino != before
            assert run.supervisor.readiness()[FAST] == {"served": False, "registered": False, "streams": 0}
            assert not run.supervisor.ready
            # Once the other server is gone, the next kubelet start brings the resource up.
            listener.close()
            await run.emu.start()
            await registered(run, FAST, MULTI, SHARED)
            await run.emu.wait_for(lambda: run.supervisor.ready, what="the agent to be ready")
    finally:
        listener.close()
