"""Topology + config + what is held -> the resources the agent should serve, and the diff between two plans.

Pure: equal inputs give equal plans. Device IDs are stable across plans: an exclusive device is named by its
(first) CPU number, a shared device by its millicpu index in base 36, so a reload never renames a device
that keeps its meaning.

The previous plan is also the agent's memory of what every device ID *meant* when it was handed out (the
supervisor persists it across restarts). A device the kubelet still holds keeps that meaning until it is
free, whatever the config says now: it stays listed (Unhealthy when the config no longer gives it), its CPUs
are kept out of every other resource, and an Allocate for it on re-admission answers its old CPUs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

from agent.allocation import ExclusiveDevice
from agent.config import DEFAULT_RESOURCE_BASE_NAME, ConfigError, HtPolicy, PoolType, Problem, ValidatedConfig
from agent.cpuset import CpuSet
from agent.idset import EMPTY, IdSet, shared_device_id, shared_device_index
from agent.topology import CoreKey, Topology

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
MILLICPUS_PER_CPU = 1000
# The kubelet's gRPC client keeps grpc-go's default receive limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class _Unknown:
    """What is held is not known (the PodResources API did not answer): assume every listed ID is held."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()
Held = Mapping[str, AbstractSet[str]] | _Unknown


@dataclass(frozen=True)
class DeviceView:
    """One device as the kubelet sees it in ListAndWatch."""

    id: str
    health: str
    numa_node: int | None


@dataclass(frozen=True)
class SharedGroup:
    """Shared device IDs handed out while the pool's CPUs were `cpus` (other than what it serves now)."""

    cpus: CpuSet
    ids: AbstractSet[str]


@dataclass(frozen=True)
class Grant:
    """What a set of device IDs of one resource gives a container."""

    exclusive: CpuSet = field(default_factory=CpuSet)
    shared: CpuSet = field(default_factory=CpuSet)

    @property
    def cpus(self) -> CpuSet:
        return self.exclusive | self.shared


@dataclass(frozen=True)
class Resource:
    """One extended resource served on one socket."""

    name: str
    pool: str
    pool_type: PoolType
    ht_policy: HtPolicy | None
    # Exclusive pools: the pool's CPUs. Shared pools: the CPUs a new shared container gets.
    cpus: CpuSet
    # Exclusive-kind devices by ID: the pool's devices, plus held ones kept with an older meaning (for a
    # shared resource: held devices from when it was exclusive).
    exclusive: Mapping[str, ExclusiveDevice] = field(default_factory=dict)
    # Shared pools: millicpu devices 0 .. count-1 (healthy), less `shared_withheld`.
    shared_count: int = 0
    # Held shared-kind IDs listed Unhealthy: beyond shared_count, of a drained pool, or (for an exclusive
    # resource) from when it was shared.
    shared_retained: frozenset[int] = frozenset()
    # Indexes below shared_count not listed as millicpus: their ID is a held exclusive-kind device.
    shared_withheld: frozenset[int] = frozenset()
    # Held shared IDs whose CPUs differ from `cpus` (handed out before the pool changed).
    shared_groups: tuple[SharedGroup, ...] = ()
    # Exclusive-kind devices listed Unhealthy (kept for a holder, held elsewhere, or offline).
    unhealthy: frozenset[str] = frozenset()
    # Unhealthy devices an Allocate must refuse: their CPUs belong to another holder, or are offline.
    blocked: Mapping[str, str] = field(default_factory=dict)
    # The CPUs the config gives the pool; differs from `cpus` while some are held elsewhere or offline.
    config_cpus: CpuSet = field(default_factory=CpuSet)
    socket: str = ""
    # False for a resource the config no longer has, served only until its held devices are free.
    configured: bool = True
    # Shared pools: millicpu indexes below this may still be in the kubelet's view (the previous count).
    shared_recent: int = 0

    @property
    def socket_name(self) -> str:
        return self.socket or socket_for(self.name, self.pool)

    @property
    def exclusive_pool(self) -> bool:
        return self.pool_type is PoolType.EXCLUSIVE

    def _shared_ids(self) -> list[int]:
        if self.shared_withheld:
            healthy = [i for i in range(self.shared_count) if i not in self.shared_withheld]
        else:
            healthy = list(range(self.shared_count))
        return healthy + sorted(self.shared_retained)

    def device_ids(self) -> list[str]:
        return [d.id for d in self.devices()]

    def has_device(self, device_id: str) -> bool:
        if device_id in self.exclusive:
            return True
        index = shared_device_index(device_id)
        if index is None:
            return False
        if index in self.shared_retained:
            return True
        return not self.exclusive_pool and index < self.shared_count and index not in self.shared_withheld

    def offers(self, device_id: str) -> bool:
        """True when `device_id` is listed Healthy: the kubelet may hand it out."""
        if device_id in self.exclusive:
            return self.exclusive_pool and device_id not in self.unhealthy
        if self.exclusive_pool:
            return False
        index = shared_device_index(device_id)
        return index is not None and index < self.shared_count and index not in self.shared_withheld

    def devices(self) -> list[DeviceView]:
        views = [
            DeviceView(d.id, UNHEALTHY if d.id in self.unhealthy else HEALTHY, device_numa(d))
            for d in self.exclusive.values()
        ]
        if self.exclusive_pool:
            return views + [
                DeviceView(shared_device_id(i), UNHEALTHY, None) for i in sorted(self.shared_retained)
            ]
        healthy = self.shared_count - len(self.shared_withheld)
        shared = self._shared_ids()
        return [
            DeviceView(shared_device_id(i), HEALTHY if n < healthy else UNHEALTHY, None)
            for n, i in enumerate(shared)
        ] + views

    def grant(self, device_ids: Iterable[str]) -> Grant:
        """What a container gets for these IDs (all known to this resource), by their meaning."""
        exclusive: list[CpuSet] = []
        shared: list[CpuSet] = []
        for device_id in device_ids:
            device = self.exclusive.get(device_id)
            if device is not None:
                exclusive.append(device.cpus)
                continue
            for group in self.shared_groups:
                if device_id in group.ids:
                    shared.append(group.cpus)
                    break
            else:
                shared.append(self.cpus)
        return Grant(CpuSet().union(*exclusive), CpuSet().union(*set(shared)))

    def cpus_of(self, device_ids: Iterable[str]) -> CpuSet:
        """The CPUs a container gets for these IDs (all known to this resource)."""
        return self.grant(device_ids).cpus

    @property
    def device_count(self) -> int:
        shared = self.shared_count - len(self.shared_withheld) if not self.exclusive_pool else 0
        return len(self.exclusive) + shared + len(self.shared_retained)

    @property
    def healthy_count(self) -> int:
        if self.exclusive_pool:
            return len(self.exclusive) - len(self.unhealthy)
        return self.shared_count - len(self.shared_withheld)

    @property
    def pending(self) -> bool:
        """True while something is held back for a holder that may be gone by now."""
        return bool(
            self.unhealthy
            or self.shared_retained
            or self.shared_withheld
            or self.shared_groups
            or self.cpus != self.config_cpus
            or not self.configured
        )


def device_numa(device: ExclusiveDevice) -> int | None:
    # A CPU that was offline since the agent started has no known NUMA node (-1): list it without one.
    return device.numa_node if device.numa_node >= 0 else None


@dataclass(frozen=True)
class Plan:
    resource_base_name: str
    resources: Mapping[str, Resource]
    warnings: tuple[str, ...] = ()
    # False when the plan was made without the kubelet's record (every listed ID was assumed held).
    held_known: bool = True

    @property
    def pending(self) -> bool:
        """True while some device is held back for a pod that still uses it: worth re-checking."""
        return not self.held_known or any(r.pending for r in self.resources.values())

    def exclusive_cpus(self) -> CpuSet:
        """Every CPU an exclusive pool gives, or that an exclusive-kind device still holds."""
        return CpuSet().union(
            *(r.cpus for r in self.resources.values() if r.exclusive_pool and r.configured),
            *(d.cpus for r in self.resources.values() for d in r.exclusive.values()),
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
    """The devices of an exclusive pool over its online CPUs: one per CPU, or one per core under an HT
    policy."""
    devices: dict[str, ExclusiveDevice] = {}
    for cpu_id in cpus:
        cpu = topology.cpus.get(cpu_id)
        if cpu is None:
            continue
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


def _id_width(index: int) -> int:
    width, limit = 1, 36
    while index >= limit:
        width, limit = width + 1, limit * 36
    return width


def shared_entry_size(index: int, health: str = HEALTHY) -> int:
    """Encoded size of the listing entry of millicpu `index`."""
    return _field_size(_field_size(_id_width(index)) + _field_size(len(health)))


def shared_list_bound(count: int, host_cpus: Collection[int]) -> int:
    """The largest list a resource that ever served `count` millicpus can need: every one of them listed
    Unhealthy (held millicpus keep their IDs, listed Unhealthy, while their pool drains or changes type) next
    to an exclusive device for each of the host's CPUs. Each ID is listed once per resource, so no later
    plan of that resource lists more."""
    total, width, low = 0, 1, 0
    while low < count:
        high = 36**width
        total += (min(high, count) - low) * shared_entry_size(low, UNHEALTHY)
        width, low = width + 1, high
    widest = DeviceView(str(max(host_cpus, default=0)), UNHEALTHY, 1 << 16)
    return total + len(host_cpus) * device_message_size(widest)


def list_message_size(resource: Resource) -> int:
    """Encoded size of the ListAndWatchResponse that carries every device of `resource`."""
    total = sum(
        device_message_size(
            DeviceView(d.id, UNHEALTHY if d.id in resource.unhealthy else HEALTHY, device_numa(d))
        )
        for d in resource.exclusive.values()
    )
    if not resource.exclusive_pool:
        # Millicpu devices differ only by ID length: count IDs per length instead of visiting 200,000 of them.
        healthy = _field_size(len(HEALTHY))
        width, low = 1, 0
        while low < resource.shared_count:
            high = 36**width
            total += (min(high, resource.shared_count) - low) * _field_size(_field_size(width) + healthy)
            width, low = width + 1, high
        total -= sum(shared_entry_size(i) for i in resource.shared_withheld)
    for index in resource.shared_retained:
        total += shared_entry_size(index, UNHEALTHY)
    return total


# --- what is held, and what it means ---------------------------------------------------------------------


@dataclass
class _Claims:
    """Every held device with its meaning: per CPU, who holds it."""

    # resource -> ID -> device, for held exclusive-kind IDs.
    exclusive: dict[str, dict[str, ExclusiveDevice]] = field(default_factory=dict)
    # resource -> held shared-kind IDs, grouped by the CPUs they were handed out with.
    shared: dict[str, list[SharedGroup]] = field(default_factory=dict)
    # CPU -> (resource, ID) of every exclusive-kind claim on it.
    exclusive_holders: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    # CPU -> resources with a shared claim on it.
    shared_holders: dict[int, set[str]] = field(default_factory=dict)

    def add_exclusive(self, name: str, device: ExclusiveDevice, reserved: CpuSet | None = None) -> None:
        """`reserved`: every CPU the holder keeps to itself (a singleThreaded device's idle siblings too)."""
        self.exclusive.setdefault(name, {})[device.id] = device
        for cpu in reserved if reserved is not None else device.cpus:
            self.exclusive_holders.setdefault(cpu, []).append((name, device.id))

    def add_shared(self, name: str, group: SharedGroup) -> None:
        if not group.ids:
            return
        self.shared.setdefault(name, []).append(group)
        for cpu in group.cpus:
            self.shared_holders.setdefault(cpu, set()).add(name)

    @property
    def exclusive_cpus(self) -> CpuSet:
        return CpuSet(self.exclusive_holders)

    def blocker(self, name: str, device: ExclusiveDevice) -> str | None:
        """Who else holds any CPU of `device` (None when nobody but the device itself does)."""
        for cpu in device.cpus:
            for holder in self.exclusive_holders.get(cpu, ()):
                if holder != (name, device.id):
                    return f"CPU {cpu} is held exclusively through {holder[0]} device {holder[1]!r}"
            sharers = self.shared_holders.get(cpu)
            if sharers:
                return f"CPU {cpu} is held by shared containers of {', '.join(sorted(sharers))}"
        return None


def _shared_listed(resource: Resource) -> IdSet:
    listed = IdSet.span(0, resource.shared_count)
    if resource.shared_withheld:
        listed = listed - IdSet.from_indexes(resource.shared_withheld)
    return listed | IdSet.from_indexes(resource.shared_retained)


def _reserved(old: Resource, device: ExclusiveDevice, topology: Topology) -> CpuSet:
    """The CPUs a held device keeps from everybody else: a singleThreaded device its idle siblings too."""
    if old.ht_policy is not HtPolicy.SINGLE:
        return device.cpus
    first = topology.cpus.get(device.cpus.first) if device.cpus else None
    return device.cpus | (first.siblings if first is not None else CpuSet())


def _unknown_exclusive(device_id: str, topology: Topology) -> ExclusiveDevice | None:
    """A held ID of an exclusive resource that the agent has no meaning for (handed out by a plan it never
    saved): assume the worst, the CPU of that number with every sibling."""
    if not (device_id.isascii() and device_id.isdigit()) or len(device_id) > 6:
        return None
    number = int(device_id)
    cpu = topology.cpus.get(number)
    if cpu is None:
        return ExclusiveDevice(device_id, CpuSet([number]), -1, CoreKey(-1, -1, number), None)
    return ExclusiveDevice(device_id, cpu.siblings, cpu.numa_node, cpu.core, cpu.l3)


def _claims(
    previous: Mapping[str, Resource],
    held: Held,
    configured: Callable[[str], Resource | None],
    topology: Topology,
) -> _Claims:
    """Resolve every held ID to its meaning: the previous plan's, else the new config's (no memory)."""
    claims = _Claims()
    names = set(previous) if isinstance(held, _Unknown) else set(previous) | set(held)
    for name in sorted(names):
        ids: IdSet | None = None if isinstance(held, _Unknown) else IdSet.of(held.get(name, EMPTY))
        if ids is not None and not ids:
            continue
        old = previous.get(name) or configured(name)
        if old is None:
            continue
        for device_id, device in old.exclusive.items():
            if ids is None or device_id in ids:
                claims.add_exclusive(name, device, _reserved(old, device, topology))
        grouped = EMPTY
        for group in old.shared_groups:
            kept = IdSet.of(group.ids) if ids is None else IdSet.of(group.ids) & ids
            grouped = grouped | kept
            claims.add_shared(name, SharedGroup(group.cpus, kept))
        if old.exclusive_pool:
            # Shared-kind IDs of an exclusive resource all live in groups; anything else held is an ID
            # handed out by a plan the agent no longer has: held it is, with the widest meaning.
            if ids is not None and len(ids) <= len(old.exclusive) + len(grouped) + 64:
                for device_id in ids:
                    if device_id in old.exclusive or device_id in grouped:
                        continue
                    unknown = _unknown_exclusive(device_id, topology)
                    if unknown is not None:
                        claims.add_exclusive(name, unknown)
            continue
        # IDs that are no shared ID at all are harmless here: they name no index and no CPU.
        rest = _shared_listed(old) if ids is None else ids
        rest = rest - grouped
        if old.exclusive and not rest.isdisjoint(old.exclusive):
            rest = rest - IdSet.of(old.exclusive)
        claims.add_shared(name, SharedGroup(old.cpus, rest))
    return claims


def build_plan(
    validated: ValidatedConfig,
    topology: Topology,
    previous: Plan | None = None,
    in_use: Held | None = None,
) -> Plan:
    """The resources to serve.

    `previous` says what each device ID meant; `in_use` which IDs the kubelet holds, per resource name
    (UNKNOWN: assume every ID the previous plan listed is held). A held device keeps its meaning, listed
    Unhealthy when the config no longer gives it; no CPU of a held device is offered by anything else."""
    config = validated.config
    held: Held = (
        in_use if isinstance(in_use, _Unknown) else {n: IdSet.of(i) for n, i in (in_use or {}).items()}
    )
    before = dict(previous.resources) if previous is not None else {}
    specs = {config.resource_name(spec.name): spec for spec in config.pools.values()}

    def fresh(name: str) -> Resource | None:
        # What the new config alone would serve: the meaning of held IDs the agent has no memory of.
        spec = specs.get(name)
        if spec is None:
            return None
        cpus = validated.cpus[spec.name]
        return _fresh_resource(name, spec.name, spec.type, spec.ht_policy, cpus, topology)

    claims = _claims(before, held, fresh, topology)
    online = topology.online
    resources: dict[str, Resource] = {}
    problems: list[Problem] = []
    for spec in config.pools.values():
        name = config.resource_name(spec.name)
        cpus = validated.cpus[spec.name]
        if spec.type is PoolType.EXCLUSIVE:
            resource = _exclusive_resource(
                name,
                spec.name,
                spec.ht_policy,
                cpus,
                topology,
                before.get(name),
                claims,
                held_known=not isinstance(held, _Unknown),
            )
        else:
            resource = _shared_resource(name, spec.name, cpus, online, before.get(name), held, claims)
            # Checked for the worst list this pool's IDs can ever need (all held, listed Unhealthy while the
            # pool drains or changes type, next to an exclusive device per CPU of the host), counted from the
            # pool's CPUs, not from what it serves now (fewer while some are held elsewhere or offline): a
            # config accepted once stays accepted whoever comes and goes, and never needs a list the kubelet
            # cannot receive.
            size = shared_list_bound(len(cpus) * MILLICPUS_PER_CPU, topology.cpus)
            if size >= MAX_MESSAGE_BYTES:
                per_cpu = size // max(1, len(cpus))
                problems.append(
                    Problem(
                        spec.name,
                        f"a shared pool of {len(cpus)} CPUs lists {resource.shared_count} millicpu devices, "
                        f"up to {size} bytes (held ones are listed Unhealthy while the pool drains or "
                        f"changes type): over the kubelet's {MAX_MESSAGE_BYTES}-byte gRPC message limit "
                        f"(at most about {MAX_MESSAGE_BYTES // per_cpu} CPUs)",
                    )
                )
        resources[name] = resource
    if problems:
        raise ConfigError(config.source, problems)
    for name in sorted(set(before) | set(claims.exclusive) | set(claims.shared)):
        if name in resources:
            continue
        old = before.get(name)
        if old is None:
            continue
        draining = _draining_resource(old, claims)
        if draining is not None:
            resources[name] = draining
    _assign_sockets(resources, before)
    return Plan(
        config.resource_base_name,
        resources,
        validated.warnings,
        held_known=not isinstance(held, _Unknown),
    )


def socket_for(name: str, pool: str) -> str:
    """The socket a resource is served on: one path per resource *name*, never shared by two names.

    The kubelet may keep an endpoint for a path after the agent stopped serving it there (v1.37 promotes a
    remaining endpoint when another disconnects): were a second name served on that path, Allocates meant for
    the first would reach the second's servicer, which would hand out its own CPUs under the first's IDs."""
    base = name.split("/", 1)[0]
    if base == DEFAULT_RESOURCE_BASE_NAME:
        return f"cpupool-{pool}.sock"
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"cpupool-{pool}-{digest}.sock"


def _assign_sockets(resources: dict[str, Resource], before: Mapping[str, Resource]) -> None:
    """Every resource keeps the socket it is served on; a new one takes `socket_for` its name."""
    for name, resource in list(resources.items()):
        old = before.get(name)
        socket = old.socket_name if old is not None else socket_for(name, resource.pool)
        if socket != resource.socket:
            resources[name] = replace(resource, socket=socket)


def _fresh_resource(
    name: str, pool: str, pool_type: PoolType, policy: HtPolicy | None, cpus: CpuSet, topology: Topology
) -> Resource:
    if pool_type is PoolType.EXCLUSIVE:
        return Resource(
            name, pool, pool_type, policy, cpus, exclusive=exclusive_devices(cpus, policy, topology)
        )
    serving = cpus & topology.online
    return Resource(name, pool, pool_type, None, serving, shared_count=len(serving) * MILLICPUS_PER_CPU)


def _offline_device(cpu: int, old: Resource | None) -> ExclusiveDevice:
    """A device for an offline CPU: its last known meaning, else the CPU alone (sysfs tells nothing more)."""
    if old is not None:
        known = old.exclusive.get(str(cpu))
        if known is not None:
            return known
    return ExclusiveDevice(str(cpu), CpuSet([cpu]), -1, CoreKey(-1, -1, cpu), None)


def _exclusive_resource(
    name: str,
    pool: str,
    policy: HtPolicy | None,
    cpus: CpuSet,
    topology: Topology,
    old: Resource | None,
    claims: _Claims,
    *,
    held_known: bool = True,
) -> Resource:
    devices = exclusive_devices(cpus, policy, topology)
    offline = cpus - topology.online
    covered = CpuSet().union(*(d.cpus for d in devices.values()))
    for cpu in offline:
        if cpu in covered:
            continue
        device = _offline_device(cpu, old)
        if str(cpu) not in devices:
            devices[device.id] = device
            covered |= device.cpus
    own = claims.exclusive.get(name, {})
    unhealthy: set[str] = set()
    blocked: dict[str, str] = {}
    for device_id, kept in own.items():
        current = devices.get(device_id)
        if current is None or current.cpus != kept.cpus:
            # Dropped or redefined while held: keep its old meaning, unhealthy, until it is free.
            devices[device_id] = kept
            unhealthy.add(device_id)
    for device in devices.values():
        reason = claims.blocker(name, device)
        if reason is None and not device.cpus.issubset(topology.online):
            reason = f"CPU {(device.cpus - topology.online).format()} is offline"
        if reason is not None:
            unhealthy.add(device.id)
            # A held device of our own may be Allocated again (re-admission); when what is held is
            # unknown, every device counts as held, so that says nothing: refuse.
            if device.id not in own or not held_known:
                blocked[device.id] = reason
    # Held shared-kind IDs from when this resource was shared: listed as they were, and an exclusive
    # device with the same ID waits until they are free.
    shared_groups = tuple(claims.shared.get(name, ()))
    held_shared = EMPTY
    for group in shared_groups:
        held_shared = held_shared | IdSet.of(group.ids)
    held_shared = held_shared - IdSet.of(own)
    retained = _indexes(held_shared)
    for device_id in [d for d in devices if d in held_shared]:
        del devices[device_id]
        unhealthy.discard(device_id)
        blocked.pop(device_id, None)
    ordered = dict(sorted(devices.items(), key=lambda item: int(item[0])))
    return Resource(
        name,
        pool,
        PoolType.EXCLUSIVE,
        policy,
        cpus,
        exclusive=ordered,
        shared_retained=frozenset(retained),
        shared_groups=shared_groups,
        unhealthy=frozenset(unhealthy),
        blocked=blocked,
        config_cpus=cpus,
    )


def _indexes(ids: Iterable[str]) -> set[int]:
    """The millicpu indexes of those IDs that are shared IDs."""
    return _indexes_from(ids, 0)


def _indexes_from(ids: Iterable[str], count: int, top: int | None = None) -> set[int]:
    """Indexes of the shared IDs in `ids` at or beyond `count` (and below `top` when that is given)."""
    compact = IdSet.of(ids)
    found = set(compact.indexes(max(count, 0), top))
    for device_id in compact.other:
        index = shared_device_index(device_id)
        if index is not None and index >= count and (top is None or index < top):
            found.add(index)
    return found


def _shared_resource(
    name: str,
    pool: str,
    cpus: CpuSet,
    online: CpuSet,
    old: Resource | None,
    held: Held,
    claims: _Claims,
) -> Resource:
    # Shared CPUs that exclusive devices still hold (or offline ones): shared containers must not get them.
    serving = (cpus & online) - claims.exclusive_cpus
    count = len(serving) * MILLICPUS_PER_CPU
    retained: set[int] = set()
    merged: dict[CpuSet, IdSet] = {}
    for group in claims.shared.get(name, ()):
        # Handed out with what the pool serves now: no different from a new millicpu.
        if group.cpus != serving:
            merged[group.cpus] = merged.get(group.cpus, EMPTY) | IdSet.of(group.ids)
    shared_groups = tuple(SharedGroup(c, ids) for c, ids in sorted(merged.items()))
    held_shared: list[AbstractSet[str]] = [g.ids for g in claims.shared.get(name, ())]
    old_top = 0
    if old is not None and not old.exclusive_pool:
        old_top = max([old.shared_count, old.shared_recent, *(i + 1 for i in old.shared_retained)])
    if count < old_top or isinstance(held, _Unknown):
        # Every held ID was listed by the old plan, below old_top.
        for ids in held_shared:
            retained |= _indexes_from(ids, count, old_top)
    else:
        # Only IDs listed beyond the old count can be beyond the new one.
        if old is not None and not isinstance(held, _Unknown):
            held_ids = held.get(name, EMPTY)
            for index in old.shared_retained:
                if index >= count and shared_device_id(index) in held_ids:
                    retained.add(index)
        for group in shared_groups:
            retained |= _indexes_from(group.ids, count)
    # Exclusive-kind devices from when this resource was exclusive: listed Unhealthy with their meaning.
    foreign = dict(sorted(claims.exclusive.get(name, {}).items(), key=lambda item: int(item[0])))
    foreign_indexes = _indexes(foreign)
    withheld = frozenset(i for i in foreign_indexes if i < count)
    retained -= foreign_indexes
    return Resource(
        name,
        pool,
        PoolType.SHARED,
        None,
        serving,
        exclusive=foreign,
        shared_count=count,
        shared_retained=frozenset(retained),
        shared_withheld=withheld,
        shared_groups=shared_groups,
        unhealthy=frozenset(foreign),
        config_cpus=cpus,
        shared_recent=max(count, old.shared_count if old is not None else 0),
    )


def _draining_resource(old: Resource, claims: _Claims) -> Resource | None:
    """A resource the config dropped, still listing its held devices (unhealthy) until they are free."""
    name = old.name
    exclusive = dict(sorted(claims.exclusive.get(name, {}).items(), key=lambda item: int(item[0])))
    groups = claims.shared.get(name, [])
    if not exclusive and not groups:
        return None
    retained: set[int] = set()
    for group in groups:
        retained |= _indexes(group.ids)
    retained -= _indexes(exclusive)
    # A shared ID outside every group means the resource's own CPUs, which it keeps while it drains.
    groups_out = tuple(g for g in groups if old.exclusive_pool or g.cpus != old.cpus)
    return replace(
        old,
        exclusive=exclusive,
        shared_count=0,
        shared_retained=frozenset(retained),
        shared_withheld=frozenset(),
        shared_groups=groups_out,
        unhealthy=frozenset(exclusive),
        blocked={},
        configured=False,
    )


def diff_plans(old: Plan | None, new: Plan) -> PlanDiff:
    before = dict(old.resources) if old is not None else {}
    added = tuple(n for n in new.resources if n not in before)
    removed = tuple(n for n in before if n not in new.resources)
    changed = tuple(n for n in new.resources if n in before and before[n] != new.resources[n])
    return PlanDiff(added, changed, removed)
