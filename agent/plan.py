"""Topology + config -> the resources the agent should serve, and the diff between two plans.

Pure: equal inputs give equal plans. Device IDs are stable across plans: an exclusive device is named by its
(first) CPU number, a shared device by its millicpu index in base 36, so a reload never renames a device
that keeps its meaning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from agent.allocation import ExclusiveDevice
from agent.config import ConfigError, HtPolicy, PoolType, Problem, ValidatedConfig
from agent.cpuset import CpuSet
from agent.topology import Topology

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
MILLICPUS_PER_CPU = 1000
# The kubelet's gRPC client keeps grpc-go's default receive limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
# Our shared IDs: lower-case base 36 without leading zeros, 8 digits at most.
_SHARED_ID = re.compile(r"0|[1-9a-z][0-9a-z]{0,7}")


def shared_device_id(index: int) -> str:
    """The ID of millicpu number `index` of a shared pool: base 36, 4 characters at most below 1.6 million."""
    if index == 0:
        return "0"
    out = []
    while index:
        index, digit = divmod(index, 36)
        out.append(_DIGITS[digit])
    return "".join(reversed(out))


def shared_device_index(device_id: str) -> int | None:
    """The millicpu index behind a shared device ID, None when the text is not one of ours."""
    if _SHARED_ID.fullmatch(device_id) is None:
        return None
    return int(device_id, 36)


@dataclass(frozen=True)
class DeviceView:
    """One device as the kubelet sees it in ListAndWatch."""

    id: str
    health: str
    numa_node: int | None


@dataclass(frozen=True)
class Resource:
    """One extended resource served on one socket."""

    name: str
    pool: str
    pool_type: PoolType
    ht_policy: HtPolicy | None
    # Every CPU of the pool (for a shared pool: the CPUs its containers share).
    cpus: CpuSet
    # Exclusive pools: every device by ID, including retained ones (see `unhealthy`).
    exclusive: Mapping[str, ExclusiveDevice] = field(default_factory=dict)
    # Shared pools: the number of healthy millicpu devices (IDs 0 .. count-1).
    shared_count: int = 0
    # Shared pools: in-use IDs beyond shared_count, kept listed until their pods are gone.
    shared_retained: frozenset[int] = frozenset()
    # Devices listed Unhealthy: in use while the config no longer gives them (or their CPUs) to this resource.
    unhealthy: frozenset[str] = frozenset()
    # The CPUs the config gives the pool; differs from `cpus` while some are still held by other pods.
    config_cpus: CpuSet = field(default_factory=CpuSet)

    @property
    def socket_name(self) -> str:
        return f"cpupool-{self.pool}.sock"

    @property
    def exclusive_pool(self) -> bool:
        return self.pool_type is PoolType.EXCLUSIVE

    def device_ids(self) -> list[str]:
        if self.exclusive_pool:
            return list(self.exclusive)
        indexes = list(range(self.shared_count)) + sorted(self.shared_retained)
        return [shared_device_id(i) for i in indexes]

    def has_device(self, device_id: str) -> bool:
        if self.exclusive_pool:
            return device_id in self.exclusive
        index = shared_device_index(device_id)
        return index is not None and (index < self.shared_count or index in self.shared_retained)

    def devices(self) -> list[DeviceView]:
        if self.exclusive_pool:
            return [
                DeviceView(d.id, UNHEALTHY if d.id in self.unhealthy else HEALTHY, d.numa_node)
                for d in self.exclusive.values()
            ]
        healthy = [DeviceView(shared_device_id(i), HEALTHY, None) for i in range(self.shared_count)]
        retained = [DeviceView(shared_device_id(i), UNHEALTHY, None) for i in sorted(self.shared_retained)]
        return healthy + retained

    def cpus_of(self, device_ids: Iterable[str]) -> CpuSet:
        """The CPUs a container gets for these IDs (all known to this resource)."""
        if not self.exclusive_pool:
            return self.cpus
        return CpuSet().union(*(self.exclusive[i].cpus for i in device_ids))

    @property
    def device_count(self) -> int:
        if self.exclusive_pool:
            return len(self.exclusive)
        return self.shared_count + len(self.shared_retained)

    @property
    def healthy_count(self) -> int:
        if self.exclusive_pool:
            return len(self.exclusive) - len(self.unhealthy)
        return self.shared_count


@dataclass(frozen=True)
class Plan:
    resource_base_name: str
    resources: Mapping[str, Resource]
    warnings: tuple[str, ...] = ()

    @property
    def pending(self) -> bool:
        """True while some device is held back for a pod that still uses it: worth re-checking."""
        return any(
            r.unhealthy or r.shared_retained or r.cpus != r.config_cpus for r in self.resources.values()
        )


@dataclass(frozen=True)
class PlanDiff:
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)


def exclusive_devices(
    cpus: CpuSet, policy: HtPolicy | None, topology: Topology
) -> dict[str, ExclusiveDevice]:
    """The devices of an exclusive pool: one per CPU, or one per core under a hyper-threading policy."""
    devices: dict[str, ExclusiveDevice] = {}
    for cpu_id in cpus:
        cpu = topology.cpus[cpu_id]
        if policy is None:
            device_cpus = CpuSet([cpu_id])
        else:
            core = cpu.siblings & cpus
            if core.first != cpu_id:
                continue
            device_cpus = core if policy is HtPolicy.MULTI else CpuSet([cpu_id])
        devices[str(cpu_id)] = ExclusiveDevice(str(cpu_id), device_cpus, cpu.numa_node, cpu.core, cpu.l3)
    return devices


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _field_size(payload: int) -> int:
    """Bytes of a length-delimited field with a one-byte tag."""
    return 1 + _varint_size(payload) + payload


def device_message_size(device: DeviceView) -> int:
    """Encoded size of one Device inside a ListAndWatchResponse (proto3: zero values are not written)."""
    size = _field_size(len(device.id)) + _field_size(len(device.health))
    if device.numa_node is not None:
        numa = 0 if device.numa_node == 0 else 1 + _varint_size(device.numa_node)
        size += _field_size(_field_size(numa))
    return _field_size(size)


def list_message_size(resource: Resource) -> int:
    """Encoded size of the ListAndWatchResponse that carries every device of `resource`."""
    if resource.exclusive_pool:
        return sum(device_message_size(d) for d in resource.devices())
    # Millicpu devices differ only by ID length: count IDs per length instead of visiting 200,000 of them.
    total = 0
    healthy = _field_size(len(HEALTHY))
    width, low = 1, 0
    while low < resource.shared_count:
        high = 36**width
        total += (min(high, resource.shared_count) - low) * _field_size(_field_size(width) + healthy)
        width, low = width + 1, high
    unhealthy = _field_size(len(UNHEALTHY))
    for index in resource.shared_retained:
        total += _field_size(_field_size(len(shared_device_id(index))) + unhealthy)
    return total


def _held_cpus(previous: Plan | None, in_use: Mapping[str, frozenset[str]]) -> dict[tuple[str, str], CpuSet]:
    """(resource, device ID) -> CPUs, for every device in use according to the previous plan."""
    held: dict[tuple[str, str], CpuSet] = {}
    if previous is None:
        return held
    for name, ids in in_use.items():
        old = previous.resources.get(name)
        if old is None:
            continue
        for device_id in ids:
            if old.has_device(device_id):
                held[(name, device_id)] = old.cpus_of([device_id])
    return held


def build_plan(
    validated: ValidatedConfig,
    topology: Topology,
    previous: Plan | None = None,
    in_use: Mapping[str, frozenset[str]] | None = None,
) -> Plan:
    """The resources to serve.

    Devices in use (by resource name, from the PodResources API) that the new config drops or whose CPUs it
    moves stay listed as Unhealthy until they are free, so the kubelet never hands one CPU to two containers
    and a re-admitted pod finds its IDs."""
    config = validated.config
    in_use = in_use or {}
    held = _held_cpus(previous, in_use)
    resources: dict[str, Resource] = {}
    problems: list[Problem] = []
    for spec in config.pools.values():
        name = config.resource_name(spec.name)
        cpus = validated.cpus[spec.name]
        if spec.type is PoolType.EXCLUSIVE:
            resource = _exclusive_resource(name, spec.name, spec.ht_policy, cpus, topology, previous, held)
        else:
            resource = _shared_resource(name, spec.name, cpus, previous, in_use, held)
            size = list_message_size(resource)
            if size >= MAX_MESSAGE_BYTES:
                per_cpu = size // max(1, len(cpus))
                problems.append(
                    Problem(
                        spec.name,
                        f"a shared pool of {len(cpus)} CPUs lists {resource.shared_count} millicpu devices, "
                        f"{size} bytes: over the kubelet's {MAX_MESSAGE_BYTES}-byte gRPC message limit "
                        f"(at most about {MAX_MESSAGE_BYTES // per_cpu} CPUs)",
                    )
                )
        resources[name] = resource
    if problems:
        raise ConfigError(config.source, problems)
    if previous is not None:
        for name, old in previous.resources.items():
            if name not in resources:
                draining = _draining_resource(old, in_use.get(name, frozenset()))
                if draining is not None:
                    resources[name] = draining
    return Plan(config.resource_base_name, resources, validated.warnings)


def _draining_resource(old: Resource, in_use: frozenset[str]) -> Resource | None:
    """A resource the config dropped, still listing its in-use devices (unhealthy) until they are free."""
    held = [i for i in in_use if old.has_device(i)]
    if not held:
        return None
    if old.exclusive_pool:
        devices = {i: old.exclusive[i] for i in sorted(held, key=int)}
        return replace(old, exclusive=devices, unhealthy=frozenset(devices))
    indexes = frozenset(i for i in (shared_device_index(d) for d in held) if i is not None)
    return replace(old, shared_count=0, shared_retained=indexes)


def _exclusive_resource(
    name: str,
    pool: str,
    policy: HtPolicy | None,
    cpus: CpuSet,
    topology: Topology,
    previous: Plan | None,
    held: Mapping[tuple[str, str], CpuSet],
) -> Resource:
    devices = exclusive_devices(cpus, policy, topology)
    old = previous.resources.get(name) if previous is not None else None
    unhealthy: set[str] = set()
    for (holder, device_id), held_cpus in held.items():
        if holder == name and old is not None and old.exclusive_pool:
            current = devices.get(device_id)
            if current is None or current.cpus != held_cpus:
                # Dropped or redefined while in use: keep its old meaning, unhealthy, until it is free.
                devices[device_id] = old.exclusive[device_id]
                unhealthy.add(device_id)
    for device in list(devices.values()):
        if device.id in unhealthy:
            continue
        for (holder, device_id), held_cpus in held.items():
            same = holder == name and device_id == device.id and old is not None and old.exclusive_pool
            if not same and not device.cpus.isdisjoint(held_cpus):
                unhealthy.add(device.id)
                break
    ordered = dict(sorted(devices.items(), key=lambda item: int(item[0])))
    return Resource(
        name,
        pool,
        PoolType.EXCLUSIVE,
        policy,
        cpus,
        exclusive=ordered,
        unhealthy=frozenset(unhealthy),
        config_cpus=cpus,
    )


def _shared_resource(
    name: str,
    pool: str,
    cpus: CpuSet,
    previous: Plan | None,
    in_use: Mapping[str, frozenset[str]],
    held: Mapping[tuple[str, str], CpuSet],
) -> Resource:
    # Shared CPUs that exclusive containers still hold: shared containers must not be sent there yet.
    held_elsewhere = CpuSet().union(*(c for (holder, _), c in held.items() if holder != name))
    serving = cpus - held_elsewhere
    count = len(serving) * MILLICPUS_PER_CPU
    retained: set[int] = set()
    old = previous.resources.get(name) if previous is not None else None
    if old is not None and not old.exclusive_pool:
        for device_id in in_use.get(name, frozenset()):
            index = shared_device_index(device_id)
            if index is not None and index >= count and old.has_device(device_id):
                retained.add(index)
    return Resource(
        name,
        pool,
        PoolType.SHARED,
        None,
        serving,
        shared_count=count,
        shared_retained=frozenset(retained),
        config_cpus=cpus,
    )


def diff_plans(old: Plan | None, new: Plan) -> PlanDiff:
    before = dict(old.resources) if old is not None else {}
    added = tuple(n for n in new.resources if n not in before)
    removed = tuple(n for n in before if n not in new.resources)
    changed = tuple(n for n in new.resources if n in before and before[n] != new.resources[n])
    return PlanDiff(added, changed, removed)
