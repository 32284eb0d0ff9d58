"""grpcio clients of one plugin socket, playing the kubelet's side without the emulator's bookkeeping."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from tests.emulator import DEVICEPLUGIN

_pb: Any = DEVICEPLUGIN.pb2


def allocate_request(*containers: Sequence[str]) -> Any:
    return _pb.AllocateRequest(
        container_requests=[_pb.ContainerAllocateRequest(devices_ids=list(ids)) for ids in containers]
    )


def preferred_request(available: Sequence[str], must_include: Sequence[str], size: int) -> Any:
    return _pb.PreferredAllocationRequest(
        container_requests=[
            _pb.ContainerPreferredAllocationRequest(
                available_deviceIDs=list(available),
                must_include_deviceIDs=list(must_include),
                allocation_size=size,
            )
        ]
    )


# grpcio shares one connection between every channel of a process that dials the same target: without a
# pool of its own, a benchmark channel would share the emulator's connection, and a wedged connection
# (see the load benchmark) would stall the emulator's registration too.
# Each client keeps a connection of its own, and redials within a second after losing it: a kubelet dials
# each plugin again as soon as it registers, where grpcio's own backoff grows to 4 s and more after a few
# failed attempts during a restart (the load figure's channels once took over 10 s to be ready again).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_reconnect_backoff_ms", 1000)]


class PluginClient:
    """One connection to a plugin socket, as the kubelet keeps one per registered resource."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._channel = grpc.insecure_channel(f"unix://{socket}", options=OWN_CONNECTION)
        self.stub: Any = DEVICEPLUGIN.grpc.DevicePluginStub(self._channel)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def timed(self, method: str, request: Any, timeout_s: float = 10.0) -> tuple[float, Any]:
        """Call `method` once; (seconds from call to reply, reply)."""
        rpc = getattr(self.stub, method)
        started = time.perf_counter()
        reply = rpc(request, timeout=timeout_s)
        return time.perf_counter() - started, reply

    def close(self) -> None:
        self._channel.close()


class RawListWatch:
    """A ListAndWatch stream read as raw bytes on its own thread: each message is stamped with
    time.monotonic() as soon as grpcio hands it over, before any protobuf parsing (the emulator turns
    every device into a Python object first, which takes over half a second for 200,000 devices).

    grpcio keeps its 4 MiB default receive limit, as the kubelet does: a larger list fails the stream."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket}", options=OWN_CONNECTION)
        rpc = self._channel.unary_stream(
            "/v1beta1.DevicePlugin/ListAndWatch", request_serializer=None, response_deserializer=None
        )
        self._call: Any = rpc(b"")
        self.messages: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._read, name="bench-listandwatch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self.messages.put((time.monotonic(), message))
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"

    def next(self, timeout_s: float = 10.0) -> tuple[float, bytes]:
        """The next message: (monotonic arrival time, bytes)."""
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(
                f"no ListAndWatch message within {timeout_s:g}s" + (f" ({self.error})" if self.error else "")
            ) from None

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()
        self._thread.join(5.0)


def device_count(payload: bytes) -> int:
    """Devices in a serialized ListAndWatchResponse, parsed by Google's protobuf runtime."""
    return len(_pb.ListAndWatchResponse.FromString(payload).devices)
