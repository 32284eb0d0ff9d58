"""One device plugin, two kubelets: the grpcio emulator and the kubelet's device manager (tests/kubeletpeer).

Each scenario runs against both (the `kubelet` fixture is parametrised), so the emulator is held to what the
kubelet's code really does, including the parts of re-registration that surprise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from tests.emulator import (
    DEVICEPLUGIN,
    PODRESOURCES,
    AllocationError,
    KubeletEmulator,
    NotRegisteredError,
    device_ids_by_resource,
    query_pod_resources,
)
from tests.emulator.fakeplugin import RESOURCE, FakePlugin, dev, pb
from tests.peers import KubeletPeer

Kubelet = KubeletEmulator | KubeletPeer
ALREADY_CONNECTED = "device plugin already connected"


def clients(kubelet: Kubelet, resource: str = RESOURCE) -> tuple[str, ...]:
    """Endpoints whose streams the kubelet still watches for the resource."""
    if isinstance(kubelet, KubeletPeer):
        raw = kubelet.peer_resource(resource)
        return raw.clients if raw is not None else ()
    return kubelet.clients(resource)


async def stream_ended(kubelet: Kubelet, count: int) -> None:
    await kubelet.wait_for(
        lambda: len([e for e in kubelet.stream_ends if e.resource == RESOURCE]) >= count,
        what=f"{count} ended stream(s) of {RESOURCE}",
    )


async def test_register_allocate_list_and_remove(
    kubelet: Kubelet, make_plugin: Callable[..., FakePlugin], pod_resources_socket: Path
) -> None:
    plugin = make_plugin([dev("a", numa=[0]), dev("b", numa=[1]), dev("c", "Unhealthy", numa=[0])])
    await plugin.register(kubelet.socket_path)
    snap = await kubelet.wait_devices(RESOURCE)
    assert (snap.capacity, snap.allocatable) == (3, 2)
    assert snap.healthy_ids == {"a", "b"}

    result = await kubelet.allocate(RESOURCE, 1, pod="web")
    (held,) = result.device_ids
    assert held in {"a", "b"}
    assert result.envs == {"FAKE_IDS": held}
    assert result.annotations == {"fake.example.com/count": "1"}
    assert result.devices == [("/dev/fake", "/dev/null", "rw")]
    assert result.mounts == [("/etc/fake", "/tmp", True)]
    assert result.cdi_devices == ["example.com/fake=all"]
    assert plugin.allocate_requests == [[held]]

    listed = await asyncio.to_thread(query_pod_resources, pod_resources_socket)
    (pod,) = listed.pod_resources
    assert pod.name == "web"
    assert device_ids_by_resource(pod.containers[0].devices) == {RESOURCE: {held}}
    allocatable = await asyncio.to_thread(
        query_pod_resources, pod_resources_socket, "GetAllocatableResources"
    )
    assert device_ids_by_resource(allocatable.devices) == {RESOURCE: {"a", "b"}}

    status = await kubelet.node_status()
    assert (status.capacity[RESOURCE], status.allocatable[RESOURCE]) == (3, 2)

    other = await kubelet.allocate(RESOURCE, 1, pod="db")
    assert set(other.device_ids) == {"a", "b"} - {held}
    with pytest.raises(AllocationError, match="requested number of devices unavailable"):
        await kubelet.allocate(RESOURCE, 1, pod="late")

    assert await kubelet.remove_pod("web") == (held,)
    await kubelet.wait_devices(RESOURCE, lambda s: s.in_use == set(other.device_ids))
    again = await kubelet.allocate(RESOURCE, 1, pod="late")
    assert again.device_ids == (held,)


async def test_unknown_resource_is_not_registered(kubelet: Kubelet) -> None:
    with pytest.raises(NotRegisteredError):
        await kubelet.allocate("example.com/nothing", 1, pod="lost")


async def test_a_register_the_plugin_gave_up_on_leaves_nothing_behind(
    kubelet: Kubelet, make_plugin: Callable[..., FakePlugin]
) -> None:
    """The kubelet dials the plugin with the Register call's context: a plugin that stops waiting for the
    answer (here: its socket is not there yet, so the dial blocks) aborts the connect."""
    request = pb.RegisterRequest(version="v1beta1", endpoint="late.sock", resource_name=RESOURCE)

    def call() -> None:
        with grpc.insecure_channel(f"unix://{kubelet.socket_path}") as channel:
            DEVICEPLUGIN.grpc.RegistrationStub(channel).Register(request, timeout=0.5)

    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(call)
    # Either the plugin's deadline fires first, or the kubelet's copy of it ends the dial and answers.
    assert caught.value.code() in {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
    await kubelet.wait_for(lambda: len(kubelet.registrations) == 1, what="the abandoned Register to end")
    (record,) = kubelet.registrations
    assert not record.accepted and "failed to dial device plugin" in (record.error or "")
    assert kubelet.resource(RESOURCE) is None and clients(kubelet) == ()
    # Nothing stale is left: the socket registers normally once it is served.
    plugin = make_plugin([dev("a")], name="late.sock")
    await plugin.register(kubelet.socket_path)
    await kubelet.wait_devices(RESOURCE)


async def test_the_only_stream_ending_marks_every_device_unhealthy(
    kubelet: Kubelet, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = make_plugin([dev("a"), dev("b"), dev("c")])
    await plugin.register(kubelet.socket_path)
    await kubelet.wait_devices(RESOURCE)
    plugin.end_streams()
    snap = await kubelet.wait_devices(RESOURCE, lambda s: s.allocatable == 0)
    assert snap.capacity == 3 and not snap.registered and not snap.stream_open
    status = await kubelet.node_status()
    # Within the 5-minute grace period node status keeps the capacity; nothing is allocatable.
    assert (status.capacity[RESOURCE], status.allocatable[RESOURCE], status.removed) == (3, 0, ())
    with pytest.raises(AllocationError):
        await kubelet.allocate(RESOURCE, 1, pod="refused")
    # The kubelet never re-opens a stream; a new Register brings the devices back.
    await plugin.register(kubelet.socket_path)
    snap = await kubelet.wait_devices(RESOURCE, lambda s: s.stream_open and s.allocatable == 3)
    assert snap.registered


async def test_registering_a_connected_socket_again_is_refused_and_orphans_its_stream(
    kubelet: Kubelet, make_plugin: Callable[..., FakePlugin]
) -> None:
    """v1.37: a second Register for a socket path that is connected fails, and the kubelet stops watching
    the stream already running there: when it ends, nothing is marked unhealthy and nothing is disconnected,
    so that path cannot register again until the kubelet restarts."""
    plugin = make_plugin([dev("a"), dev("b")])
    await plugin.register(kubelet.socket_path)
    await kubelet.wait_devices(RESOURCE)
    assert clients(kubelet) == ("fake.sock",)

    with pytest.raises(grpc.RpcError) as caught:
        await plugin.register(kubelet.socket_path)
    assert ALREADY_CONNECTED in (caught.value.details() or "")
    await kubelet.wait_for(lambda: clients(kubelet) == (), what="the running client dropped from the list")
    # The running stream still feeds the device list.
    plugin.set_devices([dev("a"), dev("b"), dev("c")])
    await kubelet.wait_devices(RESOURCE, lambda s: s.capacity == 3 and s.allocatable == 3)

    plugin.end_streams()
    await stream_ended(kubelet, 1)
    snap = kubelet.resource(RESOURCE)
    assert snap is not None and snap.allocatable == 3  # still counted healthy: nobody disconnected it
    with pytest.raises(grpc.RpcError) as caught:
        await plugin.register(kubelet.socket_path)
    assert ALREADY_CONNECTED in (caught.value.details() or "")


async def test_a_second_endpoint_keeps_the_resource_when_the_first_stream_ends(
    kubelet: Kubelet, make_plugin: Callable[..., FakePlugin]
) -> None:
    first = make_plugin([dev("a"), dev("b")], name="first.sock")
    await first.register(kubelet.socket_path)
    await kubelet.wait_devices(RESOURCE)
    second = make_plugin([dev("x")], name="second.sock")
    await second.register(kubelet.socket_path)
    await kubelet.wait_devices(RESOURCE, lambda s: s.endpoint == "second.sock" and s.device_ids == {"x"})
    # Both streams stay open and both feed the one device list: the last message wins.
    assert clients(kubelet) == ("first.sock", "second.sock")
    first.set_devices([dev("a"), dev("b"), dev("c")])
    await kubelet.wait_devices(RESOURCE, lambda s: s.device_ids == {"a", "b", "c"})

    first.end_streams()
    await kubelet.wait_for(lambda: clients(kubelet) == ("second.sock",), what="first.sock disconnected")
    snap = kubelet.resource(RESOURCE)
    assert snap is not None and snap.registered and snap.endpoint == "second.sock"
    assert snap.allocatable == 3  # not marked unhealthy: another endpoint remains
    second.set_devices([dev("x"), dev("y")])
    await kubelet.wait_devices(RESOURCE, lambda s: s.device_ids == {"x", "y"} and s.allocatable == 2)


async def test_restart_keeps_allocations_and_waits_for_registration(
    kubelet: Kubelet, make_plugin: Callable[..., FakePlugin], plugin_dir: Path, pod_resources_socket: Path
) -> None:
    plugin = make_plugin([dev("a"), dev("b")])
    await plugin.register(kubelet.socket_path)
    await kubelet.wait_devices(RESOURCE)
    held = (await kubelet.allocate(RESOURCE, 1, pod="survivor")).device_ids
    await kubelet.restart()
    # Every socket in the directory is gone but the kubelet's own; its checkpoint stays.
    left = set(await asyncio.to_thread(os.listdir, plugin_dir))
    if isinstance(kubelet, KubeletPeer):
        assert left == {"kubelet.sock", "kubelet_internal_checkpoint"}
    else:
        assert left == {"kubelet.sock"}  # the emulator keeps its books in memory
    snap = kubelet.resource(RESOURCE)
    assert snap is not None and not snap.registered and snap.capacity == 0
    status = await kubelet.node_status()
    assert status.device_capacity[RESOURCE] == 0 and status.removed == ()
    listed = await asyncio.to_thread(query_pod_resources, pod_resources_socket)
    assert [(p.name, device_ids_by_resource(p.containers[0].devices)) for p in listed.pod_resources] == [
        ("survivor", {RESOURCE: set(held)})
    ]
    plugin.stop()
    plugin.start()
    await plugin.register(kubelet.socket_path)
    snap = await kubelet.wait_devices(RESOURCE)
    assert snap.free_ids == {"a", "b"} - set(held), kubelet.describe()


# -- what only the real kubelet does: topology, several resources per container ----------------------------


@pytest.fixture
async def real(
    kubelet_peer_binary: Path, plugin_dir: Path, pod_resources_socket: Path
) -> AsyncIterator[KubeletPeer]:
    async with KubeletPeer(plugin_dir, pod_resources_socket, binary=kubelet_peer_binary) as peer:
        yield peer


async def test_paused_snapshots_hold_records_back_until_resumed(
    real: KubeletPeer, make_plugin: Callable[..., FakePlugin]
) -> None:
    """bench.realpath times starts from the device manager's log lines with the peer's snapshots paused:
    the lines still come, nothing is snapshotted meanwhile, and resuming brings the records up to date."""
    await real.observe(False)
    plugin = make_plugin([dev("a", numa=[0]), dev("b", numa=[1])])
    await plugin.register(real.socket_path)
    await real.wait_for(
        lambda: any(
            line.get("msg") == "Processed device updates for resource"
            and (line.get("kv") or {}).get("resourceName") == RESOURCE
            for line in real.log_lines
        ),
        what="the device manager's log line for the first list",
    )
    # Two round trips: an unpaused peer would have sent the snapshot after that line by their replies.
    await real.node_status()
    await real.node_status()
    assert real.list_and_watch_messages == ()
    assert real.registrations == ()
    await real.observe(True)
    snap = await real.wait_devices(RESOURCE)
    assert snap.healthy_ids == {"a", "b"}
    assert [r.healthy_count for r in real.list_and_watch_messages if r.resource == RESOURCE] == [2]


async def test_topology_hints_and_numa_aligned_allocation(
    real: KubeletPeer, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = make_plugin([dev("a", numa=[0]), dev("b", numa=[1]), dev("c", numa=[0])])
    await plugin.register(real.socket_path)
    await real.wait_devices(RESOURCE)
    hints = await real.topology_hints({RESOURCE: 2})
    assert set(hints) == {RESOURCE}
    assert {(h.numa_nodes, h.preferred) for h in hints[RESOURCE]} == {((0,), True), ((0, 1), False)}
    # With the topology manager's decision for NUMA node 1, the device manager takes the device there.
    on_one = await real.allocate(RESOURCE, 1, pod="numa1", numa_affinity=[1])
    assert on_one.device_ids == ("b",)
    # Hints count only what is still free: two devices now fit on node 0 alone, and nowhere else.
    hints = await real.topology_hints({RESOURCE: 2})
    assert {(h.numa_nodes, h.preferred) for h in hints[RESOURCE]} == {((0,), True), ((0, 1), False)}
    assert (await real.topology_hints({RESOURCE: 3}))[RESOURCE] == []


async def test_one_container_with_two_resources(
    real: KubeletPeer, make_plugin: Callable[..., FakePlugin]
) -> None:
    cpus = make_plugin([dev("1"), dev("2")], name="cpus.sock")
    gpus = make_plugin([dev("g0")], name="gpus.sock")
    await cpus.register(real.socket_path, resource="example.com/cpu")
    await gpus.register(real.socket_path, resource="example.com/gpu")
    await real.wait_devices("example.com/cpu")
    await real.wait_devices("example.com/gpu")
    answer = await real.admit({"example.com/cpu": 2, "example.com/gpu": 1}, pod="both")
    assert answer["device_ids"] == {"example.com/cpu": ["1", "2"], "example.com/gpu": ["g0"]}
    # Each plugin's envs reach the container; the same key from two plugins would be one of them.
    assert answer["envs"]["FAKE_IDS"] in {"g0", "1,2", "2,1"}
    assert real.pods()[("default", "both")] == {
        "main": {"example.com/cpu": ("1", "2"), "example.com/gpu": ("g0",)}
    }
    # A pod that does not fit is rejected as a whole and leaves nothing behind.
    with pytest.raises(AllocationError):
        await real.admit({"example.com/cpu": 1, "example.com/gpu": 1}, pod="late")
    await real.refresh()
    assert ("default", "late") not in real.pods()


async def test_pod_resources_is_rate_limited(kubelet: Kubelet, pod_resources_socket: Path) -> None:
    """The kubelet serves PodResources through a token bucket (100 calls/s, bursts of 10)."""
    pb_pr = PODRESOURCES.pb2

    def burst() -> list[tuple[grpc.StatusCode, str]]:
        with grpc.insecure_channel(f"unix://{pod_resources_socket}") as channel:
            stub = PODRESOURCES.grpc.PodResourcesListerStub(channel)
            calls = [stub.List.future(pb_pr.ListPodResourcesRequest(), timeout=5) for _ in range(40)]
            outcomes = []
            for call in calls:
                try:
                    call.result()
                    outcomes.append((grpc.StatusCode.OK, ""))
                except grpc.RpcError as exc:
                    outcomes.append((exc.code(), exc.details() or ""))
            return outcomes

    outcomes = await asyncio.to_thread(burst)
    refused = {(grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected by rate limit")}
    assert set(outcomes) == {(grpc.StatusCode.OK, ""), *refused}
    assert outcomes.count((grpc.StatusCode.OK, "")) >= 10
