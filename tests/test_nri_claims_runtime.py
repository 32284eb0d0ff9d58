"""Claims at CreateContainer, against upstream NRI's runtime side (tests/nripeer) and the kubelet emulator.

A new pod's container is decided from the signed claim the agent's Allocate put in its annotations (the
kubelet copies them into the container's CRI annotations, as the emulator's `annotations` stand for here),
with the kubelet's PodResources record shut: what the runtime gets was decided without it. The record is
then opened and the plugin checks the claim against it, correcting with UpdateContainers where it differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.claim import annotation_key
from agent.cpuset import CpuSet
from agent.ledger import CLAIM_KEY_FILE
from agent.nri import plugin as plugin_module
from agent.nri.allocations import AllocationsUnknown, Devices, PodResourcesAllocations
from agent.nri.policy import Policy
from tests.harness import POOLS, running_agent
from tests.nriruntime import NriRuntime
from tests.test_nri import EXCLUSIVE, FAST, MULTI, OTHERS, SHARED, Node, cpus_of, make_plugin, plugin_task

CLAIM = annotation_key(FAST)


class ShutRecord(PodResourcesAllocations):
    """The kubelet's PodResources `Get`, held shut until `gate` is set; `answered` lists the pods it
    answered for, so a test can tell what was decided without it."""

    def __init__(self, socket: Path) -> None:
        super().__init__(socket)
        self.gate = asyncio.Event()
        self.answered: list[str] = []

    async def of_pod(self, namespace: str, pod: str) -> dict[str, Devices] | None:
        await self.gate.wait()
        found = await super().of_pod(namespace, pod)
        self.answered.append(pod)
        return found


class UnreadableRecord(ShutRecord):
    """A kubelet whose PodResources `Get` fails (its socket gone, say) for as long as the test runs."""

    async def of_pod(self, namespace: str, pod: str) -> dict[str, Devices] | None:
        raise AllocationsUnknown("PodResources: connection refused (the test's kubelet record is down)")


@contextlib.asynccontextmanager
async def claims_node(
    tmp_path: Path,
    policy: Policy = Policy.STRICT,
    peer: str = "emulator",
    record_type: type[ShutRecord] = ShutRecord,
) -> AsyncIterator[tuple[Node, ShutRecord]]:
    async with running_agent(tmp_path, peer=peer) as agent:
        for name in (FAST, MULTI, SHARED):
            await agent.emu.wait_devices(name)
        socket = tmp_path / "nri.sock"
        record = record_type(agent.pod_resources)
        plugin = make_plugin(agent, socket, policy, claims=True, allocations=record)
        async with NriRuntime(socket) as runtime, plugin_task(plugin):
            await runtime.start()
            await runtime.wait_plugin()
            yield Node(agent, plugin, runtime, socket), record


def claims(n: Node, outcome: str) -> int:
    return int(n.agent.supervisor.metrics.nri_adjustments.get(event="claim", outcome=outcome))


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    # The plugin's metrics have no event to wait on: a short poll, bounded.
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_verified_claim_sets_the_cpuset_while_the_kubelets_record_is_shut(tmp_path: Path) -> None:
    async with claims_node(tmp_path) as (n, record):
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        created = await n.runtime.create("p1", "c1", annotations=fast.annotations)
        assert CpuSet.parse(created["cpus"]) == cpus_of(fast.device_ids)
        assert created["mems"] == "0"
        assert record.answered == []
        # The record agrees once it can be read: nothing is pushed.
        mark = len(n.runtime.events)
        record.gate.set()
        await until(lambda: claims(n, "confirmed") == 1)
        assert not [e for e in n.runtime.events[mark:] if e["event"] == "updates"]
        assert (await n.runtime.cpusets())["c1"] == created["cpus"]


async def test_a_claim_stands_when_the_kubelets_record_never_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check after the answer gives up after CONFIRM_GIVE_UP_S (60 s; shortened here): the container
    # keeps the CPUs its verified claim gave it, nothing is pushed, and the outcome is counted and logged.
    monkeypatch.setattr(plugin_module, "CONFIRM_GIVE_UP_S", 0.6)
    monkeypatch.setattr(plugin_module, "CONFIRM_RETRY_START_S", 0.05)
    async with claims_node(tmp_path, record_type=UnreadableRecord) as (n, _):
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        mark = len(n.runtime.events)
        created = await n.runtime.create("p1", "c1", annotations=fast.annotations)
        assert CpuSet.parse(created["cpus"]) == cpus_of(fast.device_ids)
        await until(lambda: claims(n, "unconfirmed") == 1)
        assert claims(n, "confirmed") == 0 and claims(n, "corrected") == 0
        assert not [e for e in n.runtime.events[mark:] if e["event"] == "updates"]
        assert (await n.runtime.cpusets())["c1"] == created["cpus"]
        # A second container of another pod still gets its own claim's CPUs, never the first one's.
        other = await n.agent.emu.allocate(FAST, 2, pod="cache")
        await n.pod("p2", "cache")
        second = await n.runtime.create("p2", "c2", annotations=other.annotations)
        assert CpuSet.parse(second["cpus"]).isdisjoint(CpuSet.parse(created["cpus"]))


async def test_a_new_pod_without_claims_is_kept_off_the_pools_while_the_record_is_shut(
    tmp_path: Path,
) -> None:
    async with claims_node(tmp_path) as (n, record):
        shared = await n.agent.emu.allocate(SHARED, 100, pod="web", container="sidecar")
        await n.pod("p1", "web")
        plain = await n.runtime.create("p1", "c1", name="app")
        sidecar = await n.runtime.create("p1", "c2", name="sidecar", annotations=shared.annotations)
        assert CpuSet.parse(plain["cpus"]) == OTHERS
        assert CpuSet.parse(sidecar["cpus"]) == CpuSet.parse("12-13")
        assert record.answered == []
        record.gate.set()
        await until(lambda: claims(n, "confirmed") == 2)


async def test_a_forged_claim_gets_no_pool_cpus(tmp_path: Path) -> None:
    async with claims_node(tmp_path) as (n, record):
        record.gate.set()
        await n.pod("p1", "mallory")
        forged = await n.runtime.create(
            "p1", "c1", annotations={CLAIM: "1;cpupool.io/fast;bm9uY2U;r2-7;AAAAAAAAAAAAAAAAAAAAAA"}
        )
        assert CpuSet.parse(forged["cpus"]) == OTHERS
        assert claims(n, "invalid") == 1


async def test_a_claim_the_pod_author_copied_into_pod_annotations_or_env_counts_for_nothing(
    tmp_path: Path,
) -> None:
    async with claims_node(tmp_path) as (n, record):
        record.gate.set()
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        owner = await n.runtime.create("p1", "c1", annotations=fast.annotations)
        copied = fast.annotations[CLAIM]
        await n.pod("p2", "mallory", annotations={CLAIM: copied})
        thief = await n.runtime.create(
            "p2", "c2", env=[f"CPUPOOL_CLAIM={copied}", f"EXCLUSIVE_CPUS={owner['cpus']}"]
        )
        assert CpuSet.parse(thief["cpus"]) == OTHERS
        assert CpuSet.parse(owner["cpus"]) == cpus_of(fast.device_ids)


async def test_a_claim_replayed_in_another_container_while_its_owner_lives_takes_the_record(
    tmp_path: Path,
) -> None:
    async with claims_node(tmp_path) as (n, record):
        record.gate.set()
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        owner = await n.runtime.create("p1", "c1", annotations=fast.annotations)
        # As if a runtime passed the pod's annotations through to its containers.
        await n.pod("p2", "mallory")
        thief = await n.runtime.create("p2", "c2", annotations={CLAIM: fast.annotations[CLAIM]})
        assert claims(n, "replayed") == 1
        assert CpuSet.parse(thief["cpus"]) == OTHERS
        cpusets = await n.runtime.cpusets()
        assert CpuSet.parse(cpusets["c1"]) == cpus_of(fast.device_ids) == CpuSet.parse(owner["cpus"])
        assert CpuSet.parse(cpusets["c1"]).isdisjoint(CpuSet.parse(cpusets["c2"]))


async def test_a_leaked_claim_on_cpus_a_live_container_holds_takes_the_record(tmp_path: Path) -> None:
    async with claims_node(tmp_path) as (n, record):
        record.gate.set()
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        await n.runtime.create("p1", "c1", annotations=fast.annotations)
        # A claim from an earlier Allocate of the same devices (another nonce: never shown before).
        leaked = n.agent.supervisor.claims.issue(FAST, fast.device_ids)
        assert leaked is not None
        await n.pod("p2", "mallory")
        thief = await n.runtime.create("p2", "c2", annotations={CLAIM: leaked})
        assert claims(n, "held_elsewhere") == 1
        assert CpuSet.parse(thief["cpus"]) == OTHERS


async def test_a_claim_the_kubelets_record_contradicts_is_corrected_with_an_update(tmp_path: Path) -> None:
    async with claims_node(tmp_path) as (n, record):
        # Signed by the agent, but the kubelet never gave these devices to this pod.
        stale = n.agent.supervisor.claims.issue(FAST, ["4", "5"])
        assert stale is not None
        await n.agent.emu.allocate(SHARED, 1, pod="batch", container="sidecar")
        await n.pod("p1", "batch")
        created = await n.runtime.create("p1", "c1", annotations={CLAIM: stale})
        assert CpuSet.parse(created["cpus"]) == CpuSet([4, 5])
        mark = len(n.runtime.events)
        record.gate.set()
        pushed = await n.runtime.wait_event("updates", after=mark)
        assert claims(n, "corrected") == 1
        assert [u["id"] for u in pushed["updates"]] == ["c1"]
        assert CpuSet.parse((await n.runtime.cpusets())["c1"]) == OTHERS
        assert n.plugin.enforced()[0]["kind"] == "other"


async def test_a_restarted_container_shows_the_same_claim_and_keeps_its_cpus(tmp_path: Path) -> None:
    async with claims_node(tmp_path) as (n, record):
        fast = await n.agent.emu.allocate(FAST, 1, pod="db")
        await n.pod("p1", "db")
        first = await n.runtime.create("p1", "c1", annotations=fast.annotations)
        await n.runtime.remove("c1")
        again = await n.runtime.create("p1", "c2", annotations=fast.annotations)
        assert first["cpus"] == again["cpus"] == fast.device_ids[0]
        assert record.answered == []
        record.gate.set()
        # The next restart races its predecessor (still live): the record decides, with the same answer.
        racing = await n.runtime.create("p1", "c3", annotations=fast.annotations)
        assert racing["cpus"] == fast.device_ids[0]


async def test_a_pool_container_without_its_claim_is_corrected_and_later_ones_wait_for_the_record(
    tmp_path: Path,
) -> None:
    async with claims_node(tmp_path) as (n, record):
        # A runtime that does not pass the kubelet's container annotations on to NRI.
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        created = await n.runtime.create("p1", "c1")
        assert CpuSet.parse(created["cpus"]) == OTHERS
        mark = len(n.runtime.events)
        record.gate.set()
        await n.runtime.wait_event("updates", after=mark)
        assert CpuSet.parse((await n.runtime.cpusets())["c1"]) == cpus_of(fast.device_ids)
        multi = await n.agent.emu.allocate(MULTI, 1, pod="cache")
        await n.pod("p2", "cache")
        waited = await n.runtime.create("p2", "c2")
        # multiThreaded: the device is a core, both of its threads.
        core = CpuSet([int(multi.device_ids[0]), int(multi.device_ids[0]) + 16])
        assert CpuSet.parse(waited["cpus"]) == core


async def test_claims_signed_before_an_agent_restart_still_verify(tmp_path: Path) -> None:
    (tmp_path / "before").mkdir()
    async with running_agent(tmp_path / "before") as before:
        await before.emu.wait_devices(FAST)
        fast = await before.emu.allocate(FAST, 1, pod="db")
    # The next agent on the node finds the same state directory (a hostPath): here, its key file.
    (tmp_path / "after" / "state").mkdir(parents=True)
    shutil.copy2(tmp_path / "before" / "state" / CLAIM_KEY_FILE, tmp_path / "after" / "state")
    async with claims_node(tmp_path / "after") as (n, record):
        await n.pod("p1", "db")
        created = await n.runtime.create("p1", "c1", annotations=fast.annotations)
        assert created["cpus"] == fast.device_ids[0]
        assert claims(n, "claimed") == 1 and record.answered == []


async def test_a_claim_for_a_pod_the_kubelet_never_lists_loses_its_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugin_module, "CONFIRM_GIVE_UP_S", 0.5)
    async with claims_node(tmp_path) as (n, record):
        record.gate.set()
        signed = n.agent.supervisor.claims.issue(FAST, ["6"])
        assert signed is not None
        # A sandbox made outside Kubernetes: the kubelet does not know the pod at all.
        await n.pod("p1", "outsider")
        created = await n.runtime.create("p1", "c1", annotations={CLAIM: signed})
        assert created["cpus"] == "6"
        mark = len(n.runtime.events)
        await n.runtime.wait_event("updates", after=mark)
        assert CpuSet.parse((await n.runtime.cpusets())["c1"]) == OTHERS
        assert claims(n, "corrected") == 1


async def test_the_real_kubelets_run_options_carry_the_claim_to_the_plugin(
    tmp_path: Path, kubelet_peer_binary: Path
) -> None:
    """The kubelet's own device manager (tests/kubeletpeer): the annotations its GetDeviceRunContainerOptions
    returns for the container, which the kubelet puts in the CRI config, carry a claim that verifies."""
    async with claims_node(tmp_path, peer="kubelet") as (n, record):
        fast = await n.agent.emu.allocate(FAST, 2, pod="db")
        await n.pod("p1", "db")
        created = await n.runtime.create("p1", "c1", annotations=fast.annotations)
        assert CpuSet.parse(created["cpus"]) == cpus_of(fast.device_ids)
        assert claims(n, "claimed") == 1 and record.answered == []
        record.gate.set()
        await until(lambda: claims(n, "confirmed") == 1)


async def test_pods_come_and_go_on_claims_while_pools_reload_and_no_cpu_is_in_two_containers(
    tmp_path: Path,
) -> None:
    async with claims_node(tmp_path) as (n, record):
        record.gate.set()
        configs = [POOLS, POOLS.replace('cpus: "12-13", pooltype: shared', 'cpus: "12-15", pooltype: shared')]

        async def reload_many() -> None:
            for i in range(10):
                n.agent.configmap.write(configs[i % 2])
                await asyncio.sleep(0.1)

        reloading = asyncio.create_task(reload_many())
        live: list[int] = []
        for i in range(150):
            if len(live) == 5:
                gone = live.pop(0)
                await n.runtime.remove(f"c{gone}")
                n.agent.emu.release(f"q{gone}")
            held = await n.agent.emu.allocate(FAST, 2, pod=f"q{i}")
            await n.pod(f"p{i}", f"q{i}")
            created = await n.runtime.create(f"p{i}", f"c{i}", annotations=held.annotations)
            assert CpuSet.parse(created["cpus"]) == cpus_of(held.device_ids)
            plain = await n.runtime.create(f"p{i}", f"d{i}", name="plain")
            assert plain["cpus"] and CpuSet.parse(plain["cpus"]).isdisjoint(EXCLUSIVE)
            await n.runtime.remove(f"d{i}")
            live.append(i)
            cpusets = await n.runtime.cpusets()
            pooled = [CpuSet.parse(cpusets[f"c{j}"]) for j in live]
            assert sum(len(c) for c in pooled) == len(CpuSet().union(*pooled)), cpusets
        await reloading
        metrics = n.agent.supervisor.metrics.nri_adjustments
        assert metrics.get(event="create", outcome="error") == 0
        assert claims(n, "claimed") == 150 and claims(n, "corrected") == 0
