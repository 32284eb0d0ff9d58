"""What the kubelet allocated to each container, from its PodResources API: the one source trusted here.

Environment variables and pod annotations are written by pod authors, so they never count; the kubelet's own
record of which device IDs it handed to which container does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import structlog
from grpclib.client import Channel

from agent.podresources import Assignment, PodResourcesError, get_assignments, list_assignments

log = structlog.get_logger(__name__)

# resource name -> device IDs, for one container
Devices = dict[str, tuple[str, ...]]
# (namespace, pod, container) -> its devices
ContainerKey = tuple[str, str, str]


class AllocationsUnknown(Exception):
    """The kubelet could not say what a container holds; the message says why."""


class AllocationSource(Protocol):
    async def of_pod(self, namespace: str, pod: str) -> dict[str, Devices] | None:
        """Container name -> devices, for one pod; None when the kubelet does not know the pod (it holds
        nothing, but may be known later); raises AllocationsUnknown."""

    async def of_all(self) -> dict[ContainerKey, Devices]:
        """Every container's devices; raises AllocationsUnknown."""


def _group(assignments: list[Assignment]) -> dict[ContainerKey, Devices]:
    found: dict[ContainerKey, dict[str, list[str]]] = {}
    for item in assignments:
        per = found.setdefault((item.namespace, item.pod, item.container), {})
        per.setdefault(item.resource, []).extend(item.device_ids)
    return {key: {name: tuple(ids) for name, ids in per.items()} for key, per in found.items()}


class PodResourcesAllocations:
    """AllocationSource over the kubelet's PodResources socket: `Get` per pod, `List` where Get is missing."""

    def __init__(self, socket: Path, timeout_s: float = 0.5) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        self._get_available = True
        # One HTTP/2 connection for every Get: setting one up per container would cost a millisecond.
        self._channel: Channel | None = None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def of_pod(self, namespace: str, pod: str) -> dict[str, Devices] | None:
        if self._get_available:
            if self._channel is None:
                self._channel = Channel(path=str(self.socket))
            try:
                assignments = await get_assignments(
                    self.socket, namespace, pod, self.timeout_s, channel=self._channel
                )
            except PodResourcesError as exc:
                if exc.status is None:
                    # A transport failure (a kubelet restart): dial afresh next time.
                    self.close()
                if exc.status == "UNIMPLEMENTED" or (exc.status is not None and "disabled" in str(exc)):
                    self._get_available = False
                    log.info("podresources.get_unavailable", reason=str(exc), using="List")
                elif exc.status is not None and "not found" in str(exc):
                    # The kubelet does not know the pod (a sandbox made outside Kubernetes): it holds nothing.
                    return None
                else:
                    raise AllocationsUnknown(str(exc)) from exc
            else:
                return {key[2]: devices for key, devices in _group(assignments).items()}
        everything = await self.of_all()
        return {key[2]: devices for key, devices in everything.items() if key[:2] == (namespace, pod)}

    async def of_all(self) -> dict[ContainerKey, Devices]:
        try:
            assignments = await list_assignments(self.socket, self.timeout_s)
        except PodResourcesError as exc:
            raise AllocationsUnknown(str(exc)) from exc
        return _group(assignments)
