"""What the kubelet allocated to each container, from its PodResources API: the one source trusted here.

Environment variables and pod annotations are written by pod authors, so they never count; the kubelet's own
record of which device IDs it handed to which container does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import structlog
from grpclib import GRPCError
from grpclib.client import Channel

from agent.kubeletapi.v1 import ContainerResources, ListPodResourcesRequest, PodResourcesListerStub
from agent.podresources import PodResourcesError, get_assignments

log = structlog.get_logger(__name__)

# resource name -> device IDs, for one container
Devices = dict[str, tuple[str, ...]]
# (namespace, pod)
PodKey = tuple[str, str]


class AllocationsUnknown(Exception):
    """The kubelet could not say what a container holds; the message says why."""


class _RateLimited(Exception):
    """The kubelet's PodResources rate limit refused a call: worth another try shortly."""


T = TypeVar("T")
RATE_LIMIT_RETRY_START_S = 0.01
RATE_LIMIT_RETRY_MAX_S = 0.1


class AllocationSource(Protocol):
    async def of_pod(self, namespace: str, pod: str) -> dict[str, Devices] | None:
        """Container name -> devices, for one pod; None when the kubelet does not know the pod (it holds
        nothing, but may be known later); raises AllocationsUnknown."""

    async def of_all(self) -> dict[PodKey, dict[str, Devices]]:
        """Every pod the kubelet lists, with its containers' devices (empty for a container holding none);
        raises AllocationsUnknown."""


def _devices(container: ContainerResources) -> Devices:
    found: dict[str, list[str]] = {}
    for devices in container.devices:
        found.setdefault(devices.resource_name, []).extend(devices.device_ids)
    return {name: tuple(ids) for name, ids in found.items()}


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
        return await self._retrying(lambda: self._of_pod_once(namespace, pod))

    async def of_all(self) -> dict[PodKey, dict[str, Devices]]:
        return await self._retrying(self._of_all_once)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, again after a short wait while the kubelet's PodResources rate limit (100 calls/s, burst
        10) refuses it, until `timeout_s` has passed: a burst of new pods must not leave some unmapped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        delay = RATE_LIMIT_RETRY_START_S
        while True:
            try:
                return await call()
            except _RateLimited as exc:
                if loop.time() + delay > deadline:
                    raise AllocationsUnknown(f"{exc} (still after {self.timeout_s} s of retries)") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, RATE_LIMIT_RETRY_MAX_S)

    async def _of_pod_once(self, namespace: str, pod: str) -> dict[str, Devices] | None:
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
                if exc.status == "RESOURCE_EXHAUSTED":
                    raise _RateLimited(str(exc)) from exc
                if exc.status == "UNIMPLEMENTED" or (exc.status is not None and "disabled" in str(exc)):
                    self._get_available = False
                    log.info("podresources.get_unavailable", reason=str(exc), using="List")
                elif exc.status is not None and "not found" in str(exc):
                    # The kubelet does not know the pod (a sandbox made outside Kubernetes): it holds nothing.
                    return None
                else:
                    raise AllocationsUnknown(str(exc)) from exc
            else:
                per_container: dict[str, dict[str, list[str]]] = {}
                for item in assignments:
                    per_container.setdefault(item.container, {}).setdefault(item.resource, []).extend(
                        item.device_ids
                    )
                return {name: {r: tuple(ids) for r, ids in d.items()} for name, d in per_container.items()}
        return (await self._of_all_once()).get((namespace, pod))

    async def _of_all_once(self) -> dict[PodKey, dict[str, Devices]]:
        channel = Channel(path=str(self.socket))
        try:
            reply = await PodResourcesListerStub(channel).list(
                ListPodResourcesRequest(), timeout=self.timeout_s
            )
        except GRPCError as exc:
            message = f"{self.socket}: List failed: {exc.status.name} {exc.message}"
            if exc.status.name == "RESOURCE_EXHAUSTED":
                raise _RateLimited(message) from exc
            raise AllocationsUnknown(message) from exc
        except (OSError, TimeoutError) as exc:
            raise AllocationsUnknown(f"{self.socket}: cannot connect: {exc!r}") from exc
        finally:
            channel.close()
        return {
            (pod.namespace, pod.name): {c.name: _devices(c) for c in pod.containers}
            for pod in reply.pod_resources
        }
