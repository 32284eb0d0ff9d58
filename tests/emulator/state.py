"""The emulated device manager's books, shared by gRPC threads and the test's event loop.

Everything here is guarded by one lock. gRPC threads (Register handler, ListAndWatch readers, PodResources)
write and read it; the event loop reads snapshots and waits for changes. Every change wakes the asyncio
waiters through their loop's call_soon_threadsafe, so waiting never polls the emulator.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from .endpoint import PluginEndpoint
from .model import (
    DeviceInfo,
    ListAndWatchRecord,
    PluginOptions,
    RegistrationRecord,
    ResourceSnapshot,
    StreamEndRecord,
)

PodKey = tuple[str, str]
"""(namespace, pod name)"""


class StaleRegistration(Exception):
    """The kubelet restarted or stopped while a Register was being handled."""


@dataclass
class _Resource:
    name: str
    endpoint: PluginEndpoint | None = None
    options: PluginOptions | None = None
    stream_open: bool = False
    devices: tuple[DeviceInfo, ...] = ()
    healthy: frozenset[str] = frozenset()
    lists_received: int = 0


@dataclass
class _Container:
    # resource -> devices (with the topology they had when allocated, as the kubelet's checkpoint keeps it)
    devices: dict[str, tuple[DeviceInfo, ...]] = field(default_factory=dict)


class DeviceManager:
    """Resources, endpoints, allocations and history of one emulated kubelet."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._epoch = 0
        self._serving = False
        self._resources: dict[str, _Resource] = {}
        self._dialing: set[PluginEndpoint] = set()
        self._pods: dict[PodKey, dict[str, _Container]] = {}
        self._registrations: list[RegistrationRecord] = []
        self._lists: list[ListAndWatchRecord] = []
        self._stream_ends: list[StreamEndRecord] = []
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # -- lifecycle (called by the emulator) ---------------------------------------------------------------

    def begin_serving(self) -> None:
        with self._lock:
            self._epoch += 1
            self._serving = True
        self._changed()

    def end_serving(self) -> list[PluginEndpoint]:
        """Forget every endpoint and device list, as a stopped kubelet does; allocations survive
        (the kubelet restores them from its checkpoint). Returns the endpoints for the caller to close."""
        with self._lock:
            self._epoch += 1
            self._serving = False
            endpoints = list(self._dialing)
            self._dialing.clear()
            for res in self._resources.values():
                if res.endpoint is not None:
                    endpoints.append(res.endpoint)
                self._resources[res.name] = _Resource(name=res.name)
        self._changed()
        return endpoints

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def epoch(self) -> int:
        return self._epoch

    # -- registration (called from the Register handler thread) -------------------------------------------

    def add_dialing(self, endpoint: PluginEndpoint, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                raise StaleRegistration
            self._dialing.add(endpoint)

    def discard_dialing(self, endpoint: PluginEndpoint) -> None:
        with self._lock:
            self._dialing.discard(endpoint)

    def install(self, endpoint: PluginEndpoint, options: PluginOptions, epoch: int) -> PluginEndpoint | None:
        """Make `endpoint` the resource's live endpoint; returns the one it replaces (to be closed)."""
        with self._lock:
            self._dialing.discard(endpoint)
            if epoch != self._epoch:
                raise StaleRegistration
            res = self._resources.setdefault(endpoint.resource, _Resource(name=endpoint.resource))
            old = res.endpoint
            # The device list stays until the new stream sends its first message, as in the kubelet.
            res.endpoint = endpoint
            res.options = options
            res.stream_open = False
            res.lists_received = 0
        self._changed()
        return old

    def record_registration(self, record: RegistrationRecord) -> None:
        with self._lock:
            self._registrations.append(record)
        self._changed()

    # -- ListAndWatch (called from reader threads) --------------------------------------------------------

    def on_list(self, endpoint: PluginEndpoint, devices: tuple[DeviceInfo, ...]) -> None:
        now = time.monotonic()
        with self._lock:
            res = self._resources.get(endpoint.resource)
            if res is None or res.endpoint is not endpoint:
                return  # a superseded endpoint's late message
            res.devices = devices
            res.healthy = frozenset(d.id for d in devices if d.healthy)
            res.stream_open = True
            res.lists_received += 1
            self._lists.append(
                ListAndWatchRecord(
                    resource=endpoint.resource,
                    endpoint=endpoint.endpoint,
                    at=now,
                    device_count=len(devices),
                    healthy_count=len(res.healthy),
                )
            )
        self._changed()

    def on_stream_end(self, endpoint: PluginEndpoint, reason: str, by_kubelet: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self._stream_ends.append(
                StreamEndRecord(
                    resource=endpoint.resource,
                    endpoint=endpoint.endpoint,
                    at=now,
                    reason=reason,
                    by_kubelet=by_kubelet,
                )
            )
            res = self._resources.get(endpoint.resource)
            if res is not None and res.endpoint is endpoint:
                # The kubelet marks every device unhealthy and never re-opens the stream: only a new
                # Register brings the resource back. Capacity (the device list) stays.
                res.stream_open = False
                res.healthy = frozenset()
        self._changed()

    # -- allocation ---------------------------------------------------------------------------------------

    def endpoint_of(self, resource: str) -> tuple[PluginEndpoint, PluginOptions] | None:
        with self._lock:
            res = self._resources.get(resource)
            if res is None or res.endpoint is None or res.options is None:
                return None
            return res.endpoint, res.options

    def in_use(self, resource: str) -> frozenset[str]:
        with self._lock:
            return frozenset(
                d.id
                for containers in self._pods.values()
                for c in containers.values()
                for d in c.devices.get(resource, ())
            )

    def holder_of(self, resource: str, device_id: str) -> PodKey | None:
        with self._lock:
            for key, containers in self._pods.items():
                for c in containers.values():
                    if any(d.id == device_id for d in c.devices.get(resource, ())):
                        return key
            return None

    def has_allocation(self, pod: PodKey, container: str, resource: str) -> bool:
        with self._lock:
            c = self._pods.get(pod, {}).get(container)
            return c is not None and resource in c.devices

    def commit(self, pod: PodKey, container: str, resource: str, device_ids: tuple[str, ...]) -> None:
        with self._lock:
            res = self._resources.get(resource)
            known = {d.id: d for d in res.devices} if res is not None else {}
            devices = tuple(known.get(i, DeviceInfo(id=i, health="", numa_nodes=None)) for i in device_ids)
            self._pods.setdefault(pod, {}).setdefault(container, _Container()).devices[resource] = devices
        self._changed()

    def release(self, pod: PodKey) -> tuple[str, ...]:
        with self._lock:
            containers = self._pods.pop(pod, {})
        freed = tuple(d.id for c in containers.values() for devs in c.devices.values() for d in devs)
        self._changed()
        return freed

    # -- reading ------------------------------------------------------------------------------------------

    def snapshot(self, resource: str) -> ResourceSnapshot | None:
        with self._lock:
            res = self._resources.get(resource)
            if res is None:
                return None
            return ResourceSnapshot(
                name=res.name,
                registered=res.endpoint is not None,
                endpoint=res.endpoint.endpoint if res.endpoint is not None else None,
                options=res.options,
                stream_open=res.stream_open,
                devices=res.devices,
                healthy_ids=res.healthy,
                lists_received=res.lists_received,
                in_use=self.in_use(resource),
            )

    def resource_names(self) -> list[str]:
        with self._lock:
            return sorted(self._resources)

    def pods(self) -> dict[PodKey, dict[str, dict[str, tuple[DeviceInfo, ...]]]]:
        """namespace/pod -> container -> resource -> devices, in allocation order."""
        with self._lock:
            return {
                key: {name: dict(c.devices) for name, c in containers.items()}
                for key, containers in self._pods.items()
            }

    def allocatable(self) -> dict[str, tuple[DeviceInfo, ...]]:
        """resource -> healthy devices, as PodResources GetAllocatableResources reports them."""
        with self._lock:
            return {
                name: tuple(d for d in res.devices if d.id in res.healthy)
                for name, res in sorted(self._resources.items())
            }

    @property
    def registrations(self) -> tuple[RegistrationRecord, ...]:
        with self._lock:
            return tuple(self._registrations)

    @property
    def list_and_watch_messages(self) -> tuple[ListAndWatchRecord, ...]:
        with self._lock:
            return tuple(self._lists)

    @property
    def stream_ends(self) -> tuple[StreamEndRecord, ...]:
        with self._lock:
            return tuple(self._stream_ends)

    # -- change notification ------------------------------------------------------------------------------

    def subscribe(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters.add((loop, event))

    def unsubscribe(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters.discard((loop, event))

    def notify(self) -> None:
        """Wake waiters; for changes the emulator does not see itself (for example a test's own state)."""
        self._changed()

    def _changed(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that test's loop is already closed
                self.unsubscribe(loop, event)
