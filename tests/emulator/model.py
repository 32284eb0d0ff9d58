"""Plain data the emulator hands to tests: device lists, allocations, history records, errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

HEALTHY = "Healthy"
"""The only health string the kubelet counts as healthy (exact, case-sensitive)."""


class EmulatorError(Exception):
    """Base of every error the emulator raises on purpose."""


class NotRegisteredError(EmulatorError):
    """The resource has no live plugin endpoint (never registered, or the kubelet restarted since)."""


class AllocationError(EmulatorError):
    """The kubelet would reject the pod at admission (for example: not enough healthy free devices)."""


class ContractViolation(EmulatorError):
    """The plugin answered, but its answer breaks the device plugin API contract."""


class PluginCallError(EmulatorError):
    """A gRPC call to the plugin failed; `code` and `details` are the plugin's gRPC status."""

    def __init__(self, resource: str, method: str, code: Any, details: str) -> None:
        self.resource = resource
        self.method = method
        self.code = code  # grpc.StatusCode
        self.details = details
        name = getattr(code, "name", str(code))
        super().__init__(f"{method} on the plugin for {resource} failed: {name}: {details}")


@dataclass(frozen=True)
class PluginOptions:
    """What GetDevicePluginOptions returned (the kubelet ignores RegisterRequest.options)."""

    pre_start_required: bool
    get_preferred_allocation_available: bool


@dataclass(frozen=True)
class DeviceInfo:
    """One device as the plugin last reported it."""

    id: str
    health: str
    numa_nodes: tuple[int, ...] | None
    """None when the plugin sent no topology at all."""

    @property
    def healthy(self) -> bool:
        return self.health == HEALTHY


@dataclass(frozen=True)
class ResourceSnapshot:
    """The kubelet's view of one resource at one moment."""

    name: str
    registered: bool
    """A live endpoint from an accepted Register (false again after a kubelet restart)."""
    endpoint: str | None
    options: PluginOptions | None
    stream_open: bool
    devices: tuple[DeviceInfo, ...]
    """Capacity: the latest list, in the plugin's order."""
    healthy_ids: frozenset[str]
    """Allocatable: healthy devices (none after the stream ended)."""
    lists_received: int
    """ListAndWatch messages since the latest accepted registration."""
    in_use: frozenset[str]

    @property
    def capacity(self) -> int:
        return len(self.devices)

    @property
    def allocatable(self) -> int:
        return len(self.healthy_ids)

    @property
    def device_ids(self) -> frozenset[str]:
        return frozenset(d.id for d in self.devices)

    @property
    def free_ids(self) -> frozenset[str]:
        return self.healthy_ids - self.in_use


class DeviceSpec(NamedTuple):
    """A device node for the container; compares equal to a plain (container_path, host_path, permissions)."""

    container_path: str
    host_path: str
    permissions: str


class Mount(NamedTuple):
    """A bind mount for the container; compares equal to (container_path, host_path, read_only)."""

    container_path: str
    host_path: str
    read_only: bool


@dataclass(frozen=True)
class ContainerAllocation:
    """One ContainerAllocateResponse as plain Python data."""

    envs: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    devices: list[DeviceSpec] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    cdi_devices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AllocationResult:
    """Outcome of an emulated pod admission for one container and one resource."""

    resource: str
    namespace: str
    pod: str
    container: str
    device_ids: tuple[str, ...]
    """The IDs the kubelet chose and sent to Allocate, in that order."""
    preferred_used: bool
    """True if the choice came from GetPreferredAllocation."""
    envs: dict[str, str]
    annotations: dict[str, str]
    devices: list[DeviceSpec]
    mounts: list[Mount]
    cdi_devices: list[str]


@dataclass(frozen=True)
class RegistrationRecord:
    """One Register call as it reached the kubelet (accepted or not)."""

    resource: str
    endpoint: str
    version: str
    at: float
    """time.monotonic() when the request arrived."""
    answered_at: float
    accepted: bool
    error: str | None


@dataclass(frozen=True)
class ListAndWatchRecord:
    """One ListAndWatch message as the kubelet received it."""

    resource: str
    endpoint: str
    at: float
    """time.monotonic() when the message arrived."""
    device_count: int
    healthy_count: int


@dataclass(frozen=True)
class StreamEndRecord:
    """A ListAndWatch stream that ended; `by_kubelet` when the kubelet itself closed it."""

    resource: str
    endpoint: str
    at: float
    reason: str
    by_kubelet: bool


@dataclass(frozen=True)
class NodeStatus:
    """Extended resources in node status after one GetCapacity, as the kubelet's node-status setter keeps
    them: a removed resource stays at 0; allocatable is the device manager's count of healthy devices."""

    capacity: Mapping[str, int]
    allocatable: Mapping[str, int]
    removed: tuple[str, ...]
    """Resources this GetCapacity deleted (endpoint gone, or stopped for longer than the grace period)."""
    device_capacity: Mapping[str, int]
    """What GetCapacity itself returned (only resources still known to the device manager)."""
    device_allocatable: Mapping[str, int]
