"""The kubelet emulator itself, driven by a small device plugin written with grpcio in this file."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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

pb = DEVICEPLUGIN.pb2
RESOURCE = "example.com/cpu"

Answer = Callable[[Any], list[str]]


def dev(device_id: str, health: str = "Healthy", numa: Sequence[int] | None = None) -> Any:
    device = pb.Device(ID=device_id, health=health)
    if numa is not None:
        device.topology.nodes.extend(pb.NUMANode(ID=n) for n in numa)
    return device


def prefer_from_the_end(request: Any) -> list[str]:
    """A valid preference that differs from the kubelet's sorted fallback: must_include, then highest IDs."""
    must = list(request.must_include_deviceIDs)
    rest = [i for i in sorted(request.available_deviceIDs, reverse=True) if i not in must]
    return must + rest[: request.allocation_size - len(must)]


class FakePlugin:
    """Just enough of a device plugin (grpcio, sync) to exercise the emulator."""

    def __init__(
        self, plugin_dir: Path, name: str, devices: Sequence[Any], *, preferred: bool = False
    ) -> None:
        self.socket_path = plugin_dir / name
        self.endpoint = name
        self.options = pb.DevicePluginOptions(get_preferred_allocation_available=preferred)
        self.options_error: str | None = None
        self.allocate_error: str | None = None
        self.preferred_answer: Answer = prefer_from_the_end
        self.options_calls = 0
        self.list_and_watch_calls = 0
        self.preferred_requests: list[Any] = []
        self.allocate_requests: list[list[str]] = []
        self._cond = threading.Condition()
        self._devices = list(devices)
        self._version = 0
        self._stream_generation = 0
        self._server: Any = None
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=8)
        self._server = grpc.server(self._executor)
        DEVICEPLUGIN.grpc.add_DevicePluginServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(None).wait()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def set_devices(self, devices: Sequence[Any]) -> None:
        with self._cond:
            self._devices = list(devices)
            self._version += 1
            self._cond.notify_all()

    def end_streams(self) -> None:
        """Complete every open ListAndWatch stream (the server keeps running)."""
        with self._cond:
            self._stream_generation += 1
            self._cond.notify_all()

    async def register(
        self, kubelet_socket: Path, resource: str = RESOURCE, version: str = "v1beta1"
    ) -> None:
        request = pb.RegisterRequest(version=version, endpoint=self.endpoint, resource_name=resource)
        # Claims the opposite of GetDevicePluginOptions: the kubelet must ignore this field.
        request.options.get_preferred_allocation_available = (
            not self.options.get_preferred_allocation_available
        )

        def call() -> None:
            with grpc.insecure_channel(f"unix://{kubelet_socket}") as channel:
                DEVICEPLUGIN.grpc.RegistrationStub(channel).Register(request, timeout=10)

        await asyncio.to_thread(call)

    # -- DevicePlugin service (grpcio servicer methods) --

    def GetDevicePluginOptions(self, request: Any, context: Any) -> Any:
        self.options_calls += 1
        if self.options_error is not None:
            context.abort(grpc.StatusCode.INTERNAL, self.options_error)
        return self.options

    def ListAndWatch(self, request: Any, context: Any) -> Iterator[Any]:
        with self._cond:
            self.list_and_watch_calls += 1
            generation = self._stream_generation

        def wake() -> None:
            with self._cond:
                self._cond.notify_all()

        context.add_callback(wake)
        sent = -1
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda sent=sent: (  # type: ignore[misc]
                        self._stream_generation != generation
                        or self._version != sent
                        or not context.is_active()
                    )
                )
                if self._stream_generation != generation or not context.is_active():
                    return
                sent = self._version
                devices = list(self._devices)
            yield pb.ListAndWatchResponse(devices=devices)

    def GetPreferredAllocation(self, request: Any, context: Any) -> Any:
        self.preferred_requests.extend(request.container_requests)
        return pb.PreferredAllocationResponse(
            container_responses=[
                pb.ContainerPreferredAllocationResponse(deviceIDs=self.preferred_answer(r))
                for r in request.container_requests
            ]
        )

    def Allocate(self, request: Any, context: Any) -> Any:
        self.allocate_requests.extend(list(r.devices_ids) for r in request.container_requests)
        if self.allocate_error is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.allocate_error)
        return pb.AllocateResponse(
            container_responses=[
                pb.ContainerAllocateResponse(
                    envs={"FAKE_IDS": ",".join(r.devices_ids)},
                    annotations={"fake.example.com/count": str(len(r.devices_ids))},
                    devices=[
                        pb.DeviceSpec(container_path="/dev/fake", host_path="/dev/null", permissions="rw")
                    ],
                    mounts=[pb.Mount(container_path="/etc/fake", host_path="/tmp", read_only=True)],
                    cdi_devices=[pb.CDIDevice(name="example.com/fake=all")],
                )
                for r in request.container_requests
            ]
        )

    def PreStartContainer(self, request: Any, context: Any) -> Any:
        return pb.PreStartContainerResponse()


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths are limited to 107 bytes and pytest's directories can be long.
    path = Path(tempfile.mkdtemp(prefix="emu-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin_dir(base_dir: Path) -> Path:
    path = base_dir / "device-plugins"
    path.mkdir()
    return path


@pytest.fixture
def pod_resources_socket(base_dir: Path) -> Path:
    return base_dir / "pod-resources" / "kubelet.sock"


@pytest.fixture
async def emu(plugin_dir: Path, pod_resources_socket: Path) -> AsyncIterator[KubeletEmulator]:
    async with KubeletEmulator(
        plugin_dir, pod_resources_socket, dial_timeout=2.0, rpc_timeout=5.0
    ) as emulator:
        yield emulator


@pytest.fixture
def make_plugin(plugin_dir: Path) -> Iterator[Callable[..., FakePlugin]]:
    plugins: list[FakePlugin] = []

    def make(devices: Sequence[Any], name: str = "fake.sock", preferred: bool = False) -> FakePlugin:
        plugin = FakePlugin(plugin_dir, name, devices, preferred=preferred)
        plugin.start()
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        plugin.stop()


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


async def test_a_new_register_replaces_the_old_endpoint(
    emu: KubeletEmulator, make_plugin: Callable[..., FakePlugin]
) -> None:
    first = await registered(emu, make_plugin, [dev("a"), dev("b")], name="first.sock")
    second = make_plugin([dev("x")], name="second.sock")
    await second.register(emu.socket_path)
    snapshot = await emu.wait_devices(
        RESOURCE, lambda s: s.endpoint == "second.sock" and s.lists_received > 0
    )
    assert snapshot.device_ids == {"x"}
    await emu.wait_for(
        lambda: any(e.endpoint == "first.sock" for e in emu.stream_ends), what="old stream end"
    )
    (old_end,) = [e for e in emu.stream_ends if e.endpoint == "first.sock"]
    assert old_end.by_kubelet
    # The replaced stream ending must not mark the new endpoint's devices unhealthy.
    assert emu.allocatable(RESOURCE) == 1
    assert first.list_and_watch_calls == 1


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
