"""A small device plugin on grpcio (sync, its own threads), to drive kubelet peers without the agent.

Used by tests/test_emulator.py and tests/test_kubeletpeer.py: the same plugin against the emulator and the
kubelet's own device manager shows where the two differ.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from .protos import DEVICEPLUGIN

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
