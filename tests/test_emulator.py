"""The kubelet emulator itself, driven by a small grpcio device plugin (tests/emulator/fakeplugin.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.emulator import (
    DEVICEPLUGIN,
    AllocationError,
    ContractViolation,
    DeviceSpec,
    KubeletEmulator,
    Mount,
    NotRegisteredError,
    PluginCallError,
    device_ids_by_resource,
    extended_resource_name_problem,
    query_pod_resources,
)
from tests.emulator.fakeplugin import RESOURCE, Answer, FakePlugin, dev, pb


@pytest.fixture
async def emu(plugin_dir: Path, pod_resources_socket: Path) -> AsyncIterator[KubeletEmulator]:
    async with KubeletEmulator(
        plugin_dir, pod_resources_socket, dial_timeout=2.0, rpc_timeout=5.0
    ) as emulator:
        yield emulator


async def registered(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin], devices: Sequence[Any], **kwargs: Any
) -> FakePlugin:
    plugin = make_plugin(devices, **kwargs)
    await plugin.register(emu.socket_path)
    await emu.wait_devices(RESOURCE)
    return plugin


# -- resource names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["example.com/cpu", "cpupool.io/shared-pool_0", "a.b-c.example/x.y", "x/" + "n" * 63],
)
def test_extended_resource_names_accepted(name: str) -> None:
    assert extended_resource_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("cpu", "no domain prefix"),
        ("kubernetes.io/cpu", "kubernetes.io/"),
        ("node.kubernetes.io/cpu", "kubernetes.io/"),
        ("requests.example.com/cpu", "requests."),
        ("Example.com/cpu", "DNS subdomain"),
        ("example.com/", "empty name"),
        ("example.com/-cpu", "name part"),
        ("example.com/a/b", "more than one"),
        ("x/" + "n" * 64, "longer than 63"),
        ("d" * 245 + "/cpu", "domain longer than 244"),
    ],
)
def test_extended_resource_names_rejected(name: str, reason: str) -> None:
    problem = extended_resource_name_problem(name)
    assert problem is not None
    assert reason in problem


# -- Register -------------------------------------------------------------------------------------------


async def test_register_rejects_unsupported_version(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = make_plugin([dev("a")])
    with pytest.raises(grpc.RpcError) as caught:
        await plugin.register(emu.socket_path, version="v1beta2")
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert "'v1beta2'" in caught.value.details()
    assert plugin.options_calls == 0
    (record,) = emu.registrations
    assert (record.resource, record.accepted, record.version) == (RESOURCE, False, "v1beta2")
    assert emu.resource(RESOURCE) is None


@pytest.mark.parametrize("name", ["cpu", "kubernetes.io/cpu", "Example.com/cpu"])
async def test_register_rejects_non_extended_resource_names(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin], name: str
) -> None:
    plugin = make_plugin([dev("a")])
    with pytest.raises(grpc.RpcError) as caught:
        await plugin.register(emu.socket_path, resource=name)
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert repr(name) in caught.value.details()
    assert plugin.options_calls == 0
    assert emu.resource(name) is None


async def test_register_asks_the_plugin_for_options_before_answering(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = make_plugin([dev("a")], preferred=True)
    await plugin.register(emu.socket_path)
    # Register has returned: the options call must already have happened, not merely be scheduled.
    assert plugin.options_calls == 1
    snapshot = emu.resource(RESOURCE)
    assert snapshot is not None
    assert snapshot.registered
    assert snapshot.endpoint == "fake.sock"
    # What GetDevicePluginOptions said counts, not RegisterRequest.options (which claimed the opposite).
    assert snapshot.options is not None
    assert snapshot.options.get_preferred_allocation_available is True
    (record,) = emu.registrations
    assert record.accepted
    assert record.at <= record.answered_at


async def test_register_fails_when_options_call_fails(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = make_plugin([dev("a")])
    plugin.options_error = "options are broken"
    with pytest.raises(grpc.RpcError) as caught:
        await plugin.register(emu.socket_path)
    assert "failed to get device plugin options" in caught.value.details()
    assert "options are broken" in caught.value.details()
    assert emu.resource(RESOURCE) is None
    assert plugin.list_and_watch_calls == 0


async def test_register_fails_when_the_endpoint_socket_is_missing(plugin_dir: Path) -> None:
    async with KubeletEmulator(plugin_dir, dial_timeout=0.3) as emu:
        request = pb.RegisterRequest(version="v1beta1", endpoint="nobody.sock", resource_name=RESOURCE)

        def call() -> None:
            with grpc.insecure_channel(f"unix://{emu.socket_path}") as channel:
                DEVICEPLUGIN.grpc.RegistrationStub(channel).Register(request, timeout=10)

        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(call)
        assert "failed to dial device plugin" in caught.value.details()
        assert emu.resource(RESOURCE) is None


async def test_v137_a_new_register_leaves_the_old_stream_open(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    """The kubelet never closes an older stream when a resource registers again (both releases)."""
    first = await registered(emu, make_plugin, [dev("a"), dev("b")], name="first.sock")
    second = make_plugin([dev("x")], name="second.sock")
    await second.register(emu.socket_path)
    snapshot = await emu.wait_devices(
        RESOURCE, lambda s: s.endpoint == "second.sock" and s.lists_received > 0
    )
    assert snapshot.device_ids == {"x"}
    assert emu.clients(RESOURCE) == ("first.sock", "second.sock")
    assert emu.stream_ends == ()
    # The old stream still feeds the resource's one device list.
    first.set_devices([dev("a")])
    await emu.wait_devices(RESOURCE, lambda s: s.device_ids == {"a"})
    assert first.list_and_watch_calls == 1


async def v136_emulator(plugin_dir: Path, pod_resources_socket: Path) -> KubeletEmulator:
    return KubeletEmulator(
        plugin_dir, pod_resources_socket, dial_timeout=2.0, rpc_timeout=5.0, release="1.36"
    )


async def test_v136_an_old_stream_ending_disconnects_the_new_registration(
    plugin_dir: Path, pod_resources_socket: Path, make_plugin: Callable[..., FakePlugin]
) -> None:
    """Kubelets v1.34 to v1.36 keep one client per resource name: when an older stream of the name ends, they
    disconnect the current client (the new registration) and mark the whole resource unhealthy."""
    async with await v136_emulator(plugin_dir, pod_resources_socket) as emu:
        first = await registered(emu, make_plugin, [dev("a"), dev("b")], name="first.sock")
        second = make_plugin([dev("x"), dev("y")], name="second.sock")
        await second.register(emu.socket_path)
        await emu.wait_devices(RESOURCE, lambda s: s.endpoint == "second.sock" and s.device_ids == {"x", "y"})
        assert emu.clients(RESOURCE) == ("second.sock",)
        assert emu.stream_ends == ()
        first.end_streams()
        snapshot = await emu.wait_devices(RESOURCE, lambda s: not s.registered)
        assert (snapshot.capacity, snapshot.allocatable) == (2, 0)
        # The kubelet closed the new registration's connection itself.
        await emu.wait_for(lambda: len(emu.stream_ends) == 2, what="both streams ended")
        ends = {e.endpoint: e.by_kubelet for e in emu.stream_ends}
        assert ends == {"first.sock": False, "second.sock": True}
        assert emu.clients(RESOURCE) == ()
        with pytest.raises(AllocationError):
            await emu.allocate(RESOURCE, 1)
        # Only a new Register brings the resource back.
        await second.register(emu.socket_path)
        await emu.wait_devices(RESOURCE, lambda s: s.stream_open and s.allocatable == 2)


async def test_v136_registering_the_same_socket_again_is_accepted(
    plugin_dir: Path, pod_resources_socket: Path, make_plugin: Callable[..., FakePlugin]
) -> None:
    async with await v136_emulator(plugin_dir, pod_resources_socket) as emu:
        plugin = await registered(emu, make_plugin, [dev("a")])
        await plugin.register(emu.socket_path)
        await emu.wait_for(lambda: plugin.list_and_watch_calls == 2, what="a second stream")
        assert [r.accepted for r in emu.registrations] == [True, True]


async def test_node_status_drops_a_resource_stopped_longer_than_the_grace_period(
    plugin_dir: Path, pod_resources_socket: Path, make_plugin: Callable[..., FakePlugin]
) -> None:
    async with KubeletEmulator(plugin_dir, pod_resources_socket, stop_grace_s=0.2) as emu:
        plugin = await registered(emu, make_plugin, [dev("a"), dev("b")])
        status = await emu.node_status()
        assert (status.capacity, status.allocatable, status.removed) == ({RESOURCE: 2}, {RESOURCE: 2}, ())
        plugin.end_streams()
        await emu.wait_devices(RESOURCE, lambda s: not s.registered)
        status = await emu.node_status()
        assert (status.capacity, status.allocatable) == ({RESOURCE: 2}, {RESOURCE: 0})
        await asyncio.sleep(0.3)
        status = await emu.node_status()
        # Deleted from the device manager, but node status keeps the name at 0.
        assert status.removed == (RESOURCE,)
        assert (status.capacity, status.allocatable, status.device_capacity) == (
            {RESOURCE: 0},
            {RESOURCE: 0},
            {},
        )
        assert emu.resource(RESOURCE) is None or emu.capacity(RESOURCE) == 0
        assert (await emu.node_status()).removed == ()


async def test_restart_leaves_resources_at_zero_until_they_register(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    await registered(emu, make_plugin, [dev("a"), dev("b")])
    await emu.restart()
    status = await emu.node_status()
    # The kubelet restores the name from its checkpoint with a stopped endpoint: capacity 0, not removed.
    assert (status.device_capacity, status.removed) == ({RESOURCE: 0}, ())


# -- ListAndWatch ---------------------------------------------------------------------------------------


async def test_device_lists_set_capacity_and_only_exact_healthy_is_allocatable(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = await registered(emu, make_plugin, [dev("a"), dev("b", "Unhealthy"), dev("c", "healthy")])
    assert (emu.capacity(RESOURCE), emu.allocatable(RESOURCE)) == (3, 1)
    plugin.set_devices([dev("a"), dev("b"), dev("c"), dev("d")])
    snapshot = await emu.wait_devices(RESOURCE, lambda s: s.capacity == 4)
    assert snapshot.healthy_ids == {"a", "b", "c", "d"}
    counts = [(m.device_count, m.healthy_count) for m in emu.list_and_watch_messages]
    assert counts == [(3, 1), (4, 4)]
    # Each message is the full list: a shorter list drops devices.
    plugin.set_devices([dev("a")])
    snapshot = await emu.wait_devices(RESOURCE, lambda s: s.capacity == 1)
    assert snapshot.device_ids == {"a"}


async def test_stream_end_marks_devices_unhealthy_until_a_new_register(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = await registered(emu, make_plugin, [dev("a"), dev("b")])
    plugin.end_streams()
    snapshot = await emu.wait_devices(RESOURCE, lambda s: not s.stream_open)
    assert (snapshot.capacity, snapshot.allocatable) == (2, 0)
    assert not emu.stream_ends[-1].by_kubelet
    with pytest.raises(AllocationError):
        await emu.allocate(RESOURCE, 1)
    # The kubelet never re-opens the stream by itself.
    await asyncio.sleep(0.2)
    assert plugin.list_and_watch_calls == 1
    await plugin.register(emu.socket_path)
    snapshot = await emu.wait_devices(RESOURCE, lambda s: s.stream_open and s.allocatable == 2)
    assert plugin.list_and_watch_calls == 2


# -- allocation -----------------------------------------------------------------------------------------


async def test_allocate_without_preferred_takes_the_first_sorted_free_ids(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = await registered(
        emu, make_plugin, [dev("c3"), dev("a1"), dev("b2"), dev("d4"), dev("e5", "Unhealthy")]
    )
    first = await emu.allocate(RESOURCE, 2, pod="one")
    assert first.device_ids == ("a1", "b2")
    assert not first.preferred_used
    assert first.envs == {"FAKE_IDS": "a1,b2"}
    assert first.annotations == {"fake.example.com/count": "2"}
    assert first.devices == [("/dev/fake", "/dev/null", "rw")]
    assert first.devices == [DeviceSpec("/dev/fake", "/dev/null", "rw")]
    assert first.mounts == [Mount("/etc/fake", "/tmp", True)]
    assert first.cdi_devices == ["example.com/fake=all"]
    second = await emu.allocate(RESOURCE, 2)
    assert second.device_ids == ("c3", "d4")
    with pytest.raises(AllocationError, match="requested 1, available 0"):
        await emu.allocate(RESOURCE, 1)
    assert emu.release("one") == ("a1", "b2")
    third = await emu.allocate(RESOURCE, 1)
    assert third.device_ids == ("a1",)
    assert plugin.allocate_requests == [["a1", "b2"], ["c3", "d4"], ["a1"]]
    assert plugin.preferred_requests == []


async def test_allocate_with_preferred_uses_the_plugin_answer(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = await registered(emu, make_plugin, [dev(i) for i in "abcdef"], preferred=True)
    await emu.allocate(RESOURCE, 1, pod="holder")  # takes "f"
    result = await emu.allocate(RESOURCE, 3, must_include=["b"])
    assert result.preferred_used
    assert result.device_ids == ("b", "e", "d")
    request = plugin.preferred_requests[-1]
    assert sorted(request.available_deviceIDs) == ["a", "b", "c", "d", "e"]
    assert list(request.must_include_deviceIDs) == ["b"]
    assert request.allocation_size == 3
    assert plugin.allocate_requests[-1] == ["b", "e", "d"]


@pytest.mark.parametrize(
    ("answer", "complaint"),
    [
        (lambda r: ["a"], "returned 1 IDs"),
        (lambda r: ["a", "zz"], "not in available"),
        (lambda r: ["c", "d"], "must_include"),
        (lambda r: ["b", "b"], "repeated"),
    ],
)
async def test_preferred_answers_that_break_the_contract_are_rejected(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin], answer: Answer, complaint: str
) -> None:
    plugin = await registered(emu, make_plugin, [dev(i) for i in "abcd"], preferred=True)
    plugin.preferred_answer = answer
    with pytest.raises(ContractViolation, match=complaint):
        await emu.allocate(RESOURCE, 2, must_include=["b"])
    assert plugin.allocate_requests == []
    snapshot = emu.resource(RESOURCE)
    assert snapshot is not None
    assert snapshot.in_use == set()


async def test_plugin_errors_carry_grpc_status_and_nothing_is_allocated(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    plugin = await registered(emu, make_plugin, [dev("a"), dev("b")])
    plugin.allocate_error = "unknown device zz"
    with pytest.raises(PluginCallError) as caught:
        await emu.call_allocate(RESOURCE, ["zz"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == "unknown device zz"
    assert caught.value.method == "Allocate"
    with pytest.raises(PluginCallError):
        await emu.allocate(RESOURCE, 1)
    assert emu.pods() == {}
    options = await emu.call_options(RESOURCE)
    assert not options.get_preferred_allocation_available
    plugin.allocate_error = None
    both = await emu.call_allocate_containers(RESOURCE, [["a"], ["b"]])
    assert [a.envs["FAKE_IDS"] for a in both] == ["a", "b"]
    with pytest.raises(NotRegisteredError):
        await emu.call_options("example.com/other")


# -- restart and start-up -------------------------------------------------------------------------------


async def test_restart_deletes_every_socket_and_requires_new_registrations(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin], plugin_dir: Path, pod_resources_socket: Path
) -> None:
    plugin = await registered(emu, make_plugin, [dev("a"), dev("b")])
    await emu.allocate(RESOURCE, 1, pod="survivor")
    stray = socket.socket(socket.AF_UNIX)
    stray.bind(str(plugin_dir / "stray.sock"))
    checkpoint = plugin_dir / "kubelet_internal_checkpoint"
    checkpoint.write_text("{}")
    try:
        await emu.restart()
    finally:
        stray.close()
    left = sorted(await asyncio.to_thread(os.listdir, plugin_dir))
    assert left == ["kubelet.sock", "kubelet_internal_checkpoint"]
    snapshot = emu.resource(RESOURCE)
    assert snapshot is not None
    assert not snapshot.registered
    assert snapshot.capacity == 0
    # Allocations survive the restart, and PodResources kept serving.
    listed = await asyncio.to_thread(query_pod_resources, pod_resources_socket)
    assert [p.name for p in listed.pod_resources] == ["survivor"]
    # The plugin must serve its socket again and re-register.
    plugin.stop()
    plugin.start()
    since = emu.registrations[-1].at
    await plugin.register(emu.socket_path)
    await emu.wait_registered(RESOURCE, since=since)
    snapshot = await emu.wait_devices(RESOURCE)
    assert snapshot.free_ids == {"b"}


async def test_delayed_start_cleans_up_sockets_already_there(plugin_dir: Path) -> None:
    early = FakePlugin(plugin_dir, "early.sock", [dev("a")])
    early.start()
    try:
        async with KubeletEmulator(plugin_dir, start_delay=0.1) as emu:
            assert not emu.socket_path.exists()
            assert early.socket_path.exists()
            await emu.wait_serving()
            assert emu.socket_path.exists()
            assert not early.socket_path.exists()
    finally:
        early.stop()


async def test_wait_timeouts_describe_the_state(emu: KubeletEmulator) -> None:
    with pytest.raises(TimeoutError) as caught:
        await emu.wait_registered("example.com/nothing", timeout=0.1)
    message = str(caught.value)
    assert "example.com/nothing" in message
    assert "no resource registered yet" in message


# -- PodResources ---------------------------------------------------------------------------------------


async def test_pod_resources_lists_devices_in_use_and_allocatable_ones(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin], pod_resources_socket: Path
) -> None:
    devices = [dev("a", numa=[0]), dev("b", numa=[1]), dev("c"), dev("d", "Unhealthy", numa=[0])]
    await registered(emu, make_plugin, devices)
    await emu.allocate(RESOURCE, 2, pod="web", container="app", namespace="shop")

    listed = await asyncio.to_thread(query_pod_resources, pod_resources_socket)
    (pod,) = listed.pod_resources
    assert (pod.name, pod.namespace) == ("web", "shop")
    (container,) = pod.containers
    assert container.name == "app"
    assert device_ids_by_resource(container.devices) == {RESOURCE: {"a", "b"}}
    numa = {entry.device_ids[0]: [n.ID for n in entry.topology.nodes] for entry in container.devices}
    assert numa == {"a": [0], "b": [1]}

    allocatable = await asyncio.to_thread(
        query_pod_resources, pod_resources_socket, "GetAllocatableResources"
    )
    assert device_ids_by_resource(allocatable.devices) == {RESOURCE: {"a", "b", "c"}}

    one = await asyncio.to_thread(
        query_pod_resources, pod_resources_socket, "Get", pod_name="web", pod_namespace="shop"
    )
    assert one.pod_resources.name == "web"
    emu.release("web", namespace="shop")
    listed = await asyncio.to_thread(query_pod_resources, pod_resources_socket)
    assert list(listed.pod_resources) == []
