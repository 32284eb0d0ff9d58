"""Client of the kubelet's PodResources API v1: which device IDs are allocated to which containers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from grpclib import GRPCError
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.exceptions import ProtocolError, StreamTerminatedError

if TYPE_CHECKING:
    from agent.kubeletapi.v1 import PodResourcesListerStub

# The generated PodResources API (agent.kubeletapi.v1: 15 message classes, 3.5 ms to import on a small VM)
# is loaded by the first call that decodes an answer into its messages. The agent's start needs only
# list_raw, whose request is empty and whose answer is decoded by agent.wire.


def _stub(channel: Channel) -> PodResourcesListerStub:
    from agent.kubeletapi.v1 import PodResourcesListerStub  # noqa: PLC0415

    return PodResourcesListerStub(channel)


class PodResourcesError(RuntimeError):
    """The PodResources API could not be asked; the message says why."""

    # The gRPC status name when the kubelet answered with an error (UNIMPLEMENTED: no Get there).
    status: str | None = None


@dataclass(frozen=True)
class Assignment:
    """Devices of one resource held by one container."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: tuple[str, ...]


async def list_assignments(socket: Path, timeout_s: float = 5.0) -> list[Assignment]:
    """Every device assignment the kubelet knows of, for all resources."""
    channel = Channel(path=str(socket))
    try:
        from agent.kubeletapi.v1 import ListPodResourcesRequest  # noqa: PLC0415

        reply = await _stub(channel).list(ListPodResourcesRequest(), timeout=timeout_s)
    except GRPCError as exc:
        raise PodResourcesError(f"{socket}: List failed: {exc.status.name} {exc.message}") from exc
    except (OSError, TimeoutError) as exc:
        raise PodResourcesError(f"{socket}: cannot connect: {exc!r}") from exc
    finally:
        channel.close()
    return [
        Assignment(pod.namespace, pod.name, container.name, devices.resource_name, tuple(devices.device_ids))
        for pod in reply.pod_resources
        for container in pod.containers
        for devices in container.devices
    ]


async def get_assignments(
    socket: Path, namespace: str, pod: str, timeout_s: float = 5.0, channel: Channel | None = None
) -> list[Assignment]:
    """The device assignments of one pod (PodResources `Get`, behind the kubelet's KubeletPodResourcesGet
    feature gate); raises PodResourcesError, its `status` set when the kubelet answered with an error.

    With `channel` (kept open by the caller) no connection is set up per call; without, one is."""
    own = channel is None
    if channel is None:
        channel = Channel(path=str(socket))
    try:
        from agent.kubeletapi.v1 import GetPodResourcesRequest  # noqa: PLC0415

        reply = await _stub(channel).get(
            GetPodResourcesRequest(pod_name=pod, pod_namespace=namespace), timeout=timeout_s
        )
    except GRPCError as exc:
        error = PodResourcesError(f"{socket}: Get {namespace}/{pod} failed: {exc.status.name} {exc.message}")
        error.status = exc.status.name
        raise error from exc
    except (OSError, TimeoutError) as exc:
        raise PodResourcesError(f"{socket}: cannot connect: {exc!r}") from exc
    finally:
        if own:
            channel.close()
    found = reply.pod_resources
    if found is None:
        return []
    namespace, name = found.namespace, found.name
    return [
        Assignment(namespace, name, container.name, devices.resource_name, tuple(devices.device_ids))
        for container in found.containers
        for devices in container.devices
    ]


class _RawReply:
    """Stands in for the reply type: grpclib's codec only calls FromString; the bytes are decoded later,
    off the event loop, by agent.wire.held_device_ids."""

    @staticmethod
    def FromString(data: bytes) -> bytes:
        return data


class _ListRequest:
    """Stands in for ListPodResourcesRequest, a message without fields: its serialized form is empty."""

    def SerializeToString(self) -> bytes:
        return b""


async def list_raw(socket: Path, timeout_s: float = 5.0) -> bytes:
    """The kubelet's List answer, serialized (with 200,000 IDs in use, decoding is the expensive part)."""
    channel = Channel(path=str(socket))
    method: UnaryUnaryMethod[_ListRequest, bytes] = UnaryUnaryMethod(
        channel,
        "/v1.PodResourcesLister/List",
        _ListRequest,
        _RawReply,  # type: ignore[arg-type]
    )
    try:
        return await method(_ListRequest(), timeout=timeout_s)
    except GRPCError as exc:
        raise PodResourcesError(f"{socket}: List failed: {exc.status.name} {exc.message}") from exc
    except (OSError, TimeoutError, StreamTerminatedError, ProtocolError) as exc:
        raise PodResourcesError(f"{socket}: cannot connect: {exc!r}") from exc
    finally:
        channel.close()
