"""One exclusive CPU is never in two live containers: the agent against a kubelet (the grpcio emulator and,
where Go is present, the kubelet's own device manager) through agent restarts, base-name and pool-type
changes, CPUs going offline, and a kubelet whose available list lags."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.cpuset import CpuSet
from agent.deviceplugin import ResourceServicer
from agent.ledger import STATE_FILE
from agent.ledger import loads as ledger_loads
from agent.plan import Resource
from agent.supervisor import Supervisor
from tests.emulator import KubeletEmulator, PluginCallError, ResourceSnapshot
from tests.harness import running_agent

FAST = "cpupool.io/fast"
FAST_ONLY = 'pools:\n  fast: {cpus: "2-7", pooltype: exclusive}\n'


def health(snap: ResourceSnapshot) -> dict[str, str]:
    return {d.id: d.health for d in snap.devices}


def registered_as(snap: ResourceSnapshot, pooltype: str) -> bool:
    """The kubelet's current endpoint is the registration made for `pooltype` and streams its list."""
    options = snap.options
    if options is None or not snap.stream_open:
        return False
    return options.get_preferred_allocation_available == (pooltype == "exclusive") and (
        (len(snap.devices) > 100) == (pooltype == "shared")
    )


async def test_agent_restart_remembers_what_is_held(tmp_path: Path, peer: str) -> None:
    async with running_agent(tmp_path, FAST_ONLY, recheck_interval_s=0.1, peer=peer) as run:
        await run.emu.wait_devices(FAST)
        (held,) = (await run.emu.allocate(FAST, 1, pod="first")).device_ids
        # A DaemonSet rollout: the agent stops, and meanwhile the operator moves the held CPU to another pool.
        await run.stop()
        rest = ",".join(c for c in ("2", "3", "4", "5", "6", "7") if c != held)
        run.configmap.write(
            f'pools:\n  fast: {{cpus: "{rest}", pooltype: exclusive}}\n'
            f'  other: {{cpus: "{held}", pooltype: exclusive}}\n'
        )
        run.supervisor = Supervisor(run.supervisor.settings)
        run.task = asyncio.create_task(run.supervisor.run())
        other = await run.emu.wait_devices("cpupool.io/other")
        assert health(other) == {held: "Unhealthy"}
        # Even asked directly, the agent refuses to hand the held CPU to a second container.
        if isinstance(run.emu, KubeletEmulator):
            with pytest.raises(PluginCallError, match="held exclusively"):
                await run.emu.call_allocate("cpupool.io/other", [held])
        fast = await run.emu.wait_devices(FAST)
        assert health(fast)[held] == "Unhealthy"
        await run.emu.remove_pod("first")
        await run.emu.wait_devices("cpupool.io/other", lambda s: health(s) == {held: "Healthy"})
        second = await run.emu.allocate("cpupool.io/other", 1, pod="second")
        assert second.envs["EXCLUSIVE_CPUS"] == held


async def test_base_name_change_keeps_held_cpus_out_of_the_new_names(tmp_path: Path, peer: str) -> None:
    async with running_agent(tmp_path, FAST_ONLY, recheck_interval_s=0.1, peer=peer) as run:
        await run.emu.wait_devices(FAST)
        (held,) = (await run.emu.allocate(FAST, 1, pod="first")).device_ids
        run.configmap.write(
            'resourceBaseName: other.io\npools:\n  fast: {cpus: "2-7", pooltype: exclusive}\n'
        )
        renamed = await run.emu.wait_devices("other.io/fast", lambda s: len(s.devices) == 6)
        assert health(renamed)[held] == "Unhealthy"
        # The old name stays served for its holder (a re-admission finds its device).
        old = await run.emu.wait_devices(FAST, lambda s: health(s) == {held: "Unhealthy"})
        assert old.registered
        taken = await run.emu.allocate("other.io/fast", 5, pod="second")
        assert held not in CpuSet.parse(taken.envs["EXCLUSIVE_CPUS"])
        await run.emu.remove_pod("first")
        await run.emu.wait_devices("other.io/fast", lambda s: health(s)[held] == "Healthy")


async def test_pool_type_change_never_puts_a_held_cpu_in_a_shared_set(tmp_path: Path, peer: str) -> None:
    async with running_agent(tmp_path, FAST_ONLY, recheck_interval_s=0.1, peer=peer) as run:
        await run.emu.wait_devices(FAST)
        held = CpuSet(int(i) for i in (await run.emu.allocate(FAST, 2, pod="first")).device_ids)
        run.configmap.write('pools:\n  fast: {cpus: "2-7", pooltype: shared}\n')
        await run.emu.wait_devices(FAST, lambda s: registered_as(s, "shared") and s.allocatable > 0)
        shared = await run.emu.allocate(FAST, 500, pod="second")
        cpus = CpuSet.parse(shared.envs["SHARED_CPUS"])
        assert cpus and cpus.isdisjoint(held)


async def test_two_type_changes_leave_one_live_registration(tmp_path: Path, peer: str) -> None:
    """The kubelet keeps an older client streaming after a re-registration, and when that old stream ends it
    disconnects the current client: the agent must end the old stream before it registers again."""
    async with running_agent(tmp_path, FAST_ONLY, peer=peer) as run:
        await run.emu.wait_devices(FAST)
        for pooltype in ("shared", "exclusive"):
            run.configmap.write(f'pools:\n  fast: {{cpus: "2-7", pooltype: {pooltype}}}\n')
            await run.emu.wait_devices(FAST, lambda s, t=pooltype: registered_as(s, t) and s.allocatable > 0)
        await asyncio.sleep(0.5)
        final = run.emu.resource(FAST)
        assert final is not None and final.registered and final.stream_open
        assert final.allocatable == 6
        allocation = await run.emu.allocate(FAST, 1, pod="after")
        assert allocation.envs["EXCLUSIVE_CPUS"]


async def test_cpu_going_offline_turns_its_device_unhealthy(tmp_path: Path, peer: str) -> None:
    async with running_agent(tmp_path, FAST_ONLY, peer=peer) as run:
        await run.emu.wait_devices(FAST)
        cpu_dir = run.root / "sys" / "devices" / "system" / "cpu"
        online = CpuSet.parse((cpu_dir / "online").read_text())
        (cpu_dir / "cpu5" / "online").write_text("0\n")
        (cpu_dir / "online").write_text((online - CpuSet([5])).format() + "\n")
        run.supervisor.notify("hotplug")
        fast = await run.emu.wait_devices(FAST, lambda s: health(s).get("5") == "Unhealthy")
        assert fast.allocatable == 5
        (cpu_dir / "cpu5" / "online").write_text("1\n")
        (cpu_dir / "online").write_text(online.format() + "\n")
        run.supervisor.notify("hotplug")
        await run.emu.wait_devices(FAST, lambda s: health(s).get("5") == "Healthy")


async def test_cpu_leaving_present_turns_its_device_unhealthy(tmp_path: Path) -> None:
    # A vCPU unplugged leaves `present` too: the applied config then names a CPU the host lacks, yet its
    # device must turn Unhealthy, not stay Healthy because the re-plan refused the config.
    async with running_agent(tmp_path, FAST_ONLY) as run:
        await run.emu.wait_devices(FAST)
        cpu_dir = run.root / "sys" / "devices" / "system" / "cpu"
        online = CpuSet.parse((cpu_dir / "online").read_text())
        present_file = cpu_dir / "present"
        present = CpuSet.parse(present_file.read_text()) if present_file.exists() else online
        (cpu_dir / "cpu5" / "online").write_text("0\n")
        (cpu_dir / "online").write_text((online - CpuSet([5])).format() + "\n")
        present_file.write_text((present - CpuSet([5])).format() + "\n")
        run.supervisor.notify("hotplug")
        fast = await run.emu.wait_devices(FAST, lambda s: health(s).get("5") == "Unhealthy")
        assert fast.allocatable == 5
        allocation = await run.emu.allocate(FAST, 5, pod="rest")
        assert 5 not in CpuSet.parse(allocation.envs["EXCLUSIVE_CPUS"])


async def test_preferred_allocation_passes_over_ids_it_does_not_offer(tmp_path: Path) -> None:
    async with running_agent(tmp_path, FAST_ONLY) as run:
        await run.emu.wait_devices(FAST)
        # Right after a reload the kubelet's available list may still name devices that are gone.
        answer = await run.emu.call_preferred(FAST, ["2", "3", "40", "41"], [], 2)
        assert sorted(answer) == ["2", "3"]
        answer = await run.emu.call_preferred(FAST, ["2", "40", "41"], ["41"], 2)
        assert set(answer) == {"2", "41"}


async def test_the_state_file_has_a_plans_meanings_before_anything_answers_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent killed at any instant leaves a state file that knows every meaning it may have answered in.
    Checked at each instant a servicer starts answering from a new plan: a pool's type changed, one added."""
    state_file = tmp_path / "state" / STATE_FILE
    seen: list[tuple[str, str, str | None]] = []

    def on_disk(resource: Resource) -> None:
        text = state_file.read_text() if state_file.exists() else None
        saved = ledger_loads(text).resources.get(resource.name) if text is not None else None
        seen.append((resource.name, str(resource.pool_type), str(saved.pool_type) if saved else None))

    update, init = ResourceServicer.update, ResourceServicer.__init__

    def spy_update(self: ResourceServicer, resource: Resource) -> bool:
        on_disk(resource)
        return update(self, resource)

    def spy_init(self: ResourceServicer, resource: Resource, *args: Any, **kwargs: Any) -> None:
        on_disk(resource)
        init(self, resource, *args, **kwargs)

    monkeypatch.setattr(ResourceServicer, "update", spy_update)
    monkeypatch.setattr(ResourceServicer, "__init__", spy_init)
    async with running_agent(tmp_path, FAST_ONLY) as run:
        await run.emu.wait_devices(FAST)
        await run.emu.allocate(FAST, 2, pod="first")
        run.configmap.write(
            'pools:\n  fast: {cpus: "2-7", pooltype: shared}\n  more: {cpus: "8-9", pooltype: exclusive}\n'
        )
        await run.emu.wait_devices(FAST, lambda s: registered_as(s, "shared") and s.allocatable > 0)
        await run.emu.wait_devices("cpupool.io/more")
    assert ("cpupool.io/fast", "shared", "shared") in seen
    assert ("cpupool.io/more", "exclusive", "exclusive") in seen
    assert all(serving == saved for _, serving, saved in seen), seen


async def test_restart_with_an_invalid_config_serves_the_remembered_plan(tmp_path: Path) -> None:
    async with running_agent(tmp_path, FAST_ONLY) as run:
        await run.emu.wait_devices(FAST)
        (held,) = (await run.emu.allocate(FAST, 1, pod="first")).device_ids
        await run.stop()
        run.configmap.write('pools:\n  fast: {cpus: "2-7", pooltype: exclusive}\n  bad: {cpus: "7"}\n')
        run.supervisor = Supervisor(run.supervisor.settings)
        run.task = asyncio.create_task(run.supervisor.run())
        # The kubelet keeps the resource: the last good plan is served until the config is fixed.
        await run.emu.wait_for(lambda: run.supervisor.ready, 10, "the remembered plan to be served")
        assert run.supervisor.last_config_error is not None
        fast = await run.emu.wait_devices(FAST)
        assert len(fast.devices) == 6
        second = await run.emu.allocate(FAST, 1, pod="second")
        assert second.envs["EXCLUSIVE_CPUS"] != held


async def test_a_socket_path_the_kubelet_refuses_is_left_for_a_new_one(tmp_path: Path) -> None:
    """Found by the state machine: a kubelet v1.37 that was sent a Register for a socket path it still holds
    refuses that path until it restarts. The agent serves the resource on a new socket instead."""
    async with running_agent(tmp_path, FAST_ONLY) as run:
        await run.emu.wait_devices(FAST)
        # A second Register while the first client still streams (what a registration racing a kubelet
        # restart does): the kubelet refuses it and keeps refusing that path.
        run.supervisor._start_registration(FAST)
        await run.emu.wait_for(
            lambda: any(r.endpoint.endswith("@1.sock") and r.accepted for r in run.emu.registrations),
            10,
            "a registration on a new socket",
        )
        fast = await run.emu.wait_devices(FAST, lambda s: s.stream_open and s.allocatable == 6)
        assert fast.endpoint is not None and fast.endpoint.endswith("@1.sock")
        allocation = await run.emu.allocate(FAST, 1, pod="after")
        assert allocation.envs["EXCLUSIVE_CPUS"]


async def test_an_allocate_the_kubelet_has_not_recorded_counts_as_held(tmp_path: Path) -> None:
    async with running_agent(tmp_path, FAST_ONLY, recheck_interval_s=0.2) as run:
        await run.emu.wait_devices(FAST)
        # Answered, but not in the kubelet's record: a read made now may miss it, and PodResources never lists
        # the devices of a plain init container. The agent keeps such a CPU to its holder.
        await run.emu.call_allocate(FAST, ["7"])
        run.configmap.write(
            'pools:\n  fast: {cpus: "2-6", pooltype: exclusive}\n  other: {cpus: "7", pooltype: exclusive}\n'
        )
        other = await run.emu.wait_devices("cpupool.io/other")
        assert health(other) == {"7": "Unhealthy"}
        await asyncio.sleep(1.0)
        snapshot = run.emu.resource("cpupool.io/other")
        assert snapshot is not None and health(snapshot) == {"7": "Unhealthy"}
        with pytest.raises(PluginCallError, match="held exclusively"):
            await run.emu.call_allocate("cpupool.io/other", ["7"])


async def test_a_restarted_kubelets_record_is_trusted_only_after_it_settled(tmp_path: Path) -> None:
    """A kubelet that just started lists no pods in PodResources until its pod sources have synced: an answer
    read then must not free what running containers hold."""
    async with running_agent(tmp_path, FAST_ONLY, recheck_interval_s=0.2) as run:
        await run.stop()
        run.supervisor = Supervisor(replace(run.supervisor.settings, kubelet_settle_s=2.0))
        run.task = asyncio.create_task(run.supervisor.run())
        await run.emu.wait_devices(FAST)
        (held,) = (await run.emu.allocate(FAST, 1, pod="first")).device_ids
        # The agent reads the record shortly after the Allocate: from then on the record says what is held.
        await asyncio.sleep(0.5)
        await run.emu.restart()
        # The kubelet's record now says the pod is gone (as a kubelet still syncing its pods would).
        await run.emu.remove_pod("first")
        rest = ",".join(c for c in ("2", "3", "4", "5", "6", "7") if c != held)
        run.configmap.write(
            f'pools:\n  fast: {{cpus: "{rest}", pooltype: exclusive}}\n'
            f'  other: {{cpus: "{held}", pooltype: exclusive}}\n'
        )
        other = await run.emu.wait_devices("cpupool.io/other")
        assert health(other) == {held: "Unhealthy"}
        await run.emu.wait_devices("cpupool.io/other", lambda s: health(s) == {held: "Healthy"}, timeout=10)
