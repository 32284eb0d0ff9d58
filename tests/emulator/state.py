"""The emulated device manager's books, shared by gRPC threads and the test's event loop.

Everything here is guarded by one lock. gRPC threads (Register handler, ListAndWatch readers, PodResources)
write and read it; the event loop reads snapshots and waits for changes. Every change wakes the asyncio
waiters through their loop's call_soon_threadsafe, so waiting never polls the emulator.

Registration follows the kubelet's plugin/v1beta1 server and manager.go, in one of two releases:

- "1.37" (k8s.io/kubernetes v1.37): the registration server keeps a list of clients per resource name, and the
  manager one endpoint per (resource, socket path) (`endpointStore`), the latest being `endpoints[name]`.
  A Register for a socket path that is still connected fails ("device plugin already connected") and removes
  every client with that path from the server's list, the running one included: when that stream ends later,
  nobody disconnects it, the stale endpoint stays and every later Register at that path fails until the
  kubelet restarts. A stream that ends disconnects its own client; the resource is marked unhealthy only when
  that was its last endpoint, otherwise another endpoint is promoted.
- "1.36" (v1.34 to v1.36, and older): one client per resource name. A new Register replaces the client but
  leaves the old stream running; when ANY stream of the name ends, the kubelet disconnects the client that is
  current for the name (closing its connection) and marks the whole resource unhealthy.

In both, every stream of a name feeds the same device list (the last message wins, whoever sent it), a
disconnect stamps the endpoint's stop time, and node status drops a resource whose endpoint has been stopped
for longer than the grace period (5 minutes).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .endpoint import PluginEndpoint
from .model import (
    DeviceInfo,
    ListAndWatchRecord,
    NodeStatus,
    PluginOptions,
    RegistrationRecord,
    ResourceSnapshot,
    StreamEndRecord,
)

PodKey = tuple[str, str]
"""(namespace, pod name)"""

RELEASES = ("1.37", "1.36")
ENDPOINT_STOP_GRACE_S = 300.0
"""The kubelet's endpointStopGracePeriod."""


class StaleRegistration(Exception):
    """The kubelet restarted or stopped while a Register was being handled."""


class AlreadyConnected(Exception):
    """v1.37: the (resource, socket path) pair already has a connected endpoint."""


@dataclass
class _Resource:
    name: str
    endpoint: PluginEndpoint | None = None
    """endpoints[name]: used for Allocate and for the node-status grace period."""
    options: PluginOptions | None = None
    stopped_at: float | None = None
    """Stop time of `endpoint`; after a kubelet restart its start time (the stopped placeholder)."""
    store: dict[Path, tuple[PluginEndpoint, PluginOptions]] = field(default_factory=dict)
    """v1.37 endpointStore[name]: socket path -> connected endpoint."""
    clients: list[PluginEndpoint] = field(default_factory=list)
    """The registration server's clients for the name (v1.36: at most one)."""
    in_maps: bool = False
    """The name is in the kubelet's healthy/unhealthy device maps (a list arrived, or restored at start)."""
    devices: tuple[DeviceInfo, ...] = ()
    healthy: frozenset[str] = frozenset()
    lists_received: int = 0


@dataclass
class _Container:
    # resource -> devices (with the topology they had when allocated, as the kubelet's checkpoint keeps it)
    devices: dict[str, tuple[DeviceInfo, ...]] = field(default_factory=dict)


class DeviceManager:
    """Resources, endpoints, allocations and history of one emulated kubelet."""

    def __init__(self, release: str = "1.37", stop_grace_s: float = ENDPOINT_STOP_GRACE_S) -> None:
        if release not in RELEASES:
            raise ValueError(f"unknown kubelet release {release!r}; the emulator models {RELEASES}")
        self.kubelet_release = release
        self.stop_grace_s = stop_grace_s
        self._lock = threading.RLock()
        self._epoch = 0
        self._serving = False
        self._resources: dict[str, _Resource] = {}
        self._dialing: set[PluginEndpoint] = set()
        self._abandoned: list[PluginEndpoint] = []
        self._pods: dict[PodKey, dict[str, _Container]] = {}
        self._registrations: list[RegistrationRecord] = []
        self._lists: list[ListAndWatchRecord] = []
        self._stream_ends: list[StreamEndRecord] = []
        self._node_capacity: dict[str, int] = {}
        self._node_allocatable: dict[str, int] = {}
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @property
    def per_endpoint(self) -> bool:
        return self.kubelet_release == "1.37"

    # -- lifecycle (called by the emulator) ---------------------------------------------------------------

    def begin_serving(self) -> None:
        with self._lock:
            self._epoch += 1
            self._serving = True
        self._changed()

    def end_serving(self) -> list[PluginEndpoint]:
        """Forget every endpoint and device list, as a stopped kubelet does; allocations survive. Resources
        that had device lists come back as the kubelet's checkpoint restores them: no devices, and a stopped
        placeholder endpoint whose stop time is now. Returns every connection for the caller to close."""
        now = time.monotonic()
        with self._lock:
            self._epoch += 1
            self._serving = False
            endpoints = set(self._dialing) | set(self._abandoned)
            self._dialing.clear()
            self._abandoned.clear()
            for res in self._resources.values():
                if res.endpoint is not None:
                    endpoints.add(res.endpoint)
                endpoints.update(res.clients)
                endpoints.update(ep for ep, _ in res.store.values())
                restored = res.in_maps
                self._resources[res.name] = _Resource(
                    name=res.name, in_maps=restored, stopped_at=now if restored else None
                )
        self._changed()
        return list(endpoints)

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def epoch(self) -> int:
        return self._epoch

    # -- registration (called from the Register handler thread) -------------------------------------------

    def add_client(self, endpoint: PluginEndpoint, epoch: int) -> None:
        """registerClient: the new client joins the server's list before it is dialed."""
        with self._lock:
            if epoch != self._epoch:
                raise StaleRegistration
            self._dialing.add(endpoint)
            res = self._resources.setdefault(endpoint.resource, _Resource(name=endpoint.resource))
            if self.per_endpoint:
                res.clients.append(endpoint)
            else:
                res.clients = [endpoint]

    def drop_client(self, endpoint: PluginEndpoint, *, abandoned: bool) -> None:
        """deregisterClient after a failed connect. v1.37 removes every client with the same socket path (a
        running one too); v1.36 removes whatever client the name has. `abandoned`: the kubelet leaves this
        connection open (it never closes it); the emulator closes it when it stops."""
        with self._lock:
            self._dialing.discard(endpoint)
            self._deregister(endpoint)
            if abandoned:
                self._abandoned.append(endpoint)
        self._changed()

    def _deregister(self, endpoint: PluginEndpoint) -> None:
        res = self._resources.get(endpoint.resource)
        if res is None:
            return
        if self.per_endpoint:
            res.clients = [c for c in res.clients if c.socket_path != endpoint.socket_path]
        else:
            res.clients = []

    def connect(self, endpoint: PluginEndpoint, options: PluginOptions, epoch: int) -> None:
        """PluginConnected: the endpoint becomes endpoints[name] (v1.37: and joins endpointStore, unless
        that socket path is connected already)."""
        with self._lock:
            self._dialing.discard(endpoint)
            if epoch != self._epoch:
                raise StaleRegistration
            res = self._resources.setdefault(endpoint.resource, _Resource(name=endpoint.resource))
            if self.per_endpoint:
                if endpoint.socket_path in res.store:
                    raise AlreadyConnected(f"device plugin already connected: {endpoint.socket_path}")
                res.store[endpoint.socket_path] = (endpoint, options)
            # The device list stays until some stream sends a message, as in the kubelet.
            res.endpoint = endpoint
            res.options = options
            res.stopped_at = None
            res.lists_received = 0
        self._changed()

    def record_registration(self, record: RegistrationRecord) -> None:
        with self._lock:
            self._registrations.append(record)
        self._changed()

    # -- ListAndWatch (called from reader threads) --------------------------------------------------------

    def on_list(self, endpoint: PluginEndpoint, devices: tuple[DeviceInfo, ...]) -> None:
        """Every stream of a name feeds its one device list: the kubelet does not check who sent it."""
        now = time.monotonic()
        with self._lock:
            res = self._resources.get(endpoint.resource)
            if res is None or endpoint.epoch != self._epoch or endpoint.closed:
                return  # a connection the kubelet closed, or one of a kubelet that has since restarted
            endpoint.streaming = True
            res.devices = devices
            res.healthy = frozenset(d.id for d in devices if d.healthy)
            res.in_maps = True
            if endpoint is res.endpoint:
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

    def on_stream_end(self, endpoint: PluginEndpoint, reason: str, by_kubelet: bool) -> PluginEndpoint | None:
        """runClient after Run returns: look the client up and disconnect it. Returns the client whose
        connection the caller must close (outside the lock: closing joins that client's reader thread)."""
        now = time.monotonic()
        with self._lock:
            endpoint.streaming = False
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
            if res is None or endpoint.epoch != self._epoch:
                victim = None
            elif self.per_endpoint:
                victim = next((c for c in res.clients if c.socket_path == endpoint.socket_path), None)
            else:
                # v1.36 looks the client up by name only: the current one, whichever stream ended.
                victim = res.clients[0] if res.clients else None
            if victim is not None:
                self._deregister(victim)
                # The kubelet closes the victim's connection first, then calls PluginDisconnected; both happen
                # here in one step so that no snapshot shows a disconnected client with healthy devices.
                self._plugin_disconnected(victim, now)
        self._changed()
        return victim

    def _plugin_disconnected(self, endpoint: PluginEndpoint, now: float) -> None:
        """PluginDisconnected for `endpoint` (the caller holds the lock)."""
        res = self._resources.get(endpoint.resource)
        if res is not None:
            if self.per_endpoint:
                entry = res.store.get(endpoint.socket_path)
                if entry is None:
                    return
                if res.endpoint is entry[0]:
                    res.stopped_at = now
                if len(res.store) == 1:
                    res.store.clear()
                    res.healthy = frozenset()  # markResourceUnhealthy
                else:
                    del res.store[endpoint.socket_path]
                    # Go promotes an arbitrary remaining endpoint; the emulator takes the newest.
                    promoted, options = list(res.store.values())[-1]
                    res.endpoint, res.options, res.stopped_at = promoted, options, None
            elif res.endpoint is not None:
                res.healthy = frozenset()  # markResourceUnhealthy
                res.stopped_at = now

    # -- node status ----------------------------------------------------------------------------------------

    def node_status(self) -> NodeStatus:
        """GetCapacity and the node-status setter: a resource whose endpoint is missing or stopped for longer
        than the grace period is deleted and stays in node status at 0; the others report capacity (all
        devices) and allocatable (healthy devices)."""
        now = time.monotonic()
        capacity: dict[str, int] = {}
        allocatable: dict[str, int] = {}
        removed: list[str] = []
        with self._lock:
            for name, res in sorted(self._resources.items()):
                if not res.in_maps:
                    continue
                expired = res.stopped_at is not None and now - res.stopped_at > self.stop_grace_s
                if (res.endpoint is None and res.stopped_at is None) or expired:
                    removed.append(name)
                    res.in_maps = False
                    res.endpoint, res.options, res.stopped_at = None, None, None
                    res.devices, res.healthy = (), frozenset()
                    continue
                capacity[name] = len(res.devices)
                allocatable[name] = len(res.healthy)
            self._node_capacity.update(capacity)
            for name in removed:
                self._node_capacity[name] = 0
            self._node_allocatable = dict(self._node_capacity) | allocatable
            status = NodeStatus(
                capacity=dict(self._node_capacity),
                allocatable=dict(self._node_allocatable),
                removed=tuple(removed),
                device_capacity=capacity,
                device_allocatable=allocatable,
            )
        self._changed()
        return status

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

    @staticmethod
    def _known(res: _Resource) -> bool:
        """The device manager knows the name (a client that never connected leaves no trace there)."""
        return res.endpoint is not None or res.in_maps or bool(res.store) or res.stopped_at is not None

    def snapshot(self, resource: str) -> ResourceSnapshot | None:
        with self._lock:
            res = self._resources.get(resource)
            if res is None or not self._known(res):
                return None
            live = res.endpoint is not None and res.stopped_at is None and not res.endpoint.closed
            return ResourceSnapshot(
                name=res.name,
                registered=live,
                endpoint=res.endpoint.endpoint if res.endpoint is not None else None,
                options=res.options,
                stream_open=live and res.endpoint is not None and res.endpoint.streaming,
                devices=res.devices,
                healthy_ids=res.healthy,
                lists_received=res.lists_received,
                in_use=self.in_use(resource),
            )

    def clients(self, resource: str) -> tuple[str, ...]:
        """Endpoint names of the registration server's clients for `resource` (streams it still watches)."""
        with self._lock:
            res = self._resources.get(resource)
            return tuple(c.endpoint for c in res.clients) if res is not None else ()

    def resource_names(self) -> list[str]:
        with self._lock:
            return sorted(name for name, res in self._resources.items() if self._known(res))

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
                if res.in_maps
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
