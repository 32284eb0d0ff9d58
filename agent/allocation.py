"""The preferred allocation for exclusive CPU devices, answered to the kubelet's GetPreferredAllocation.

Pure and deterministic: the same devices, the same request (in any input order) give the same answer.
The kubelet calls this during pod admission with no deadline and rejects the pod on error, so every
satisfiable request gets an answer and the work stays a few sorts over the available devices.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.cpuset import CpuSet
from agent.topology import CoreKey

# How many offending IDs an error message spells out before it only gives the count.
_MAX_NAMED = 10

_IdKey = tuple[int, int, str]


@dataclass(frozen=True)
class ExclusiveDevice:
    """One device of an exclusive pool: a CPU, or a core (its lowest thread or all its threads)."""

    id: str
    # The CPUs a container gets for this device.
    cpus: CpuSet
    numa_node: int
    core: CoreKey
    l3: int | None
    # id_key(id), computed once: the preferred allocation sorts and ranks by it many times per call.
    key: _IdKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", id_key(self.id))


class AllocationError(ValueError):
    """A request no allocation can satisfy; the message names the offending IDs or sizes."""


@functools.lru_cache(maxsize=8192)
def id_key(device_id: str) -> _IdKey:
    """Sort key: decimal IDs by value ("9" before "10"), any other ID after them, by text."""
    if device_id.isascii() and device_id.isdigit():
        return (0, int(device_id), device_id)
    return (1, 0, device_id)


def sort_ids(ids: Iterable[str]) -> list[str]:
    """IDs in numeric order, non-numeric IDs after the numeric ones in text order."""
    return sorted(ids, key=id_key)


def preferred_allocation(
    devices: Mapping[str, ExclusiveDevice],
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
) -> list[str]:
    """Pick ``size`` IDs from ``available``, ``must_include`` among them, sorted by ``sort_ids``.

    Preference, strongest first: fewest NUMA nodes (the must_include node when it can hold the
    request), fewest cores opened (hyper-threads of a core taken together, must_include cores
    filled first), fewest L3 caches, lowest IDs. Raises AllocationError only when no answer exists.
    """
    avail_ids = _unique(available)
    must_ids = _unique(must_include)
    _validate(devices, avail_ids, must_ids, size)

    chosen = set(must_ids)
    remaining = size - len(chosen)
    if remaining == 0:
        return sort_ids(chosen)
    free = sorted((devices[i] for i in avail_ids if i not in chosen), key=_device_key)
    if remaining == len(free):
        return sort_ids(avail_ids)

    free_by_node: dict[int, list[ExclusiveDevice]] = {}
    for device in free:
        free_by_node.setdefault(device.numa_node, []).append(device)
    anchors_by_node: dict[int, list[ExclusiveDevice]] = {}
    for device_id in sort_ids(must_ids):
        device = devices[device_id]
        anchors_by_node.setdefault(device.numa_node, []).append(device)

    picked: list[str] = []
    # The node that closes the request was picked while it was scored: the same pick, not made twice.
    scored: dict[tuple[int, int], list[ExclusiveDevice]] = {}
    for node, quota in _choose_nodes(free_by_node, anchors_by_node, remaining, scored):
        picks = scored.get((node, quota)) if node not in anchors_by_node else None
        if picks is None:
            picks = _pick_in_node(free_by_node.get(node, []), anchors_by_node.get(node, []), quota)
        picked.extend(device.id for device in picks)
    return sort_ids(chosen.union(picked))


def _unique(ids: Sequence[str]) -> list[str]:
    # The kubelet builds these lists from sets, but a duplicate must not double-count capacity.
    return list(dict.fromkeys(ids))


def _name_ids(ids: Iterable[str]) -> str:
    ordered = sort_ids(ids)
    named = ", ".join(repr(i) for i in ordered[:_MAX_NAMED])
    more = f" and {len(ordered) - _MAX_NAMED} more" if len(ordered) > _MAX_NAMED else ""
    return f"{len(ordered)} ID(s): {named}{more}"


def _validate(
    devices: Mapping[str, ExclusiveDevice], avail_ids: list[str], must_ids: list[str], size: int
) -> None:
    if size < 0:
        raise AllocationError(f"allocation size {size} is negative")
    unknown = [i for i in _unique([*avail_ids, *must_ids]) if i not in devices]
    if unknown:
        raise AllocationError(
            f"unknown device {_name_ids(unknown)}; this resource has {len(devices)} devices"
        )
    avail_set = set(avail_ids)
    missing = [i for i in must_ids if i not in avail_set]
    if missing:
        raise AllocationError(f"must-include {_name_ids(missing)} not among the available devices")
    if len(must_ids) > size:
        raise AllocationError(f"{len(must_ids)} must-include devices do not fit an allocation of size {size}")
    if size > len(avail_ids):
        raise AllocationError(f"allocation size {size} exceeds the {len(avail_ids)} available devices")


def _device_key(device: ExclusiveDevice) -> _IdKey:
    return device.key


def _choose_nodes(
    free_by_node: Mapping[int, list[ExclusiveDevice]],
    anchors_by_node: Mapping[int, list[ExclusiveDevice]],
    remaining: int,
    scored: dict[tuple[int, int], list[ExclusiveDevice]],
) -> list[tuple[int, int]]:
    """The NUMA nodes to draw from, in fill order, each with how many devices it gives. `scored` receives
    the pick of each node scored, by (node, quota), for nodes without must_include devices."""
    capacity = {node: len(devs) for node, devs in free_by_node.items()}
    # The must_include nodes are used in any case; the one holding most of them fills first.
    nodes = sorted(anchors_by_node, key=lambda n: (-len(anchors_by_node[n]), -capacity.get(n, 0), n))
    need = remaining - sum(capacity.get(n, 0) for n in nodes)
    others = sorted((n for n in capacity if n not in anchors_by_node), key=lambda n: (-capacity[n], n))
    while need > 0:
        fitting = [n for n in others if capacity[n] >= need]
        if fitting:
            # One more node closes the request: pick the one where it packs best.
            best = min(fitting, key=lambda n: _score(free_by_node[n], [], need, scored, n))
            nodes.append(best)
            break
        # Nothing closes it alone: the biggest node keeps the node count minimal.
        largest = others.pop(0)
        nodes.append(largest)
        need -= capacity[largest]

    plan: list[tuple[int, int]] = []
    left = remaining
    for node in nodes:
        quota = min(left, capacity.get(node, 0))
        if quota > 0:
            plan.append((node, quota))
            left -= quota
    return plan


def _score(
    free: list[ExclusiveDevice],
    anchors: list[ExclusiveDevice],
    quota: int,
    scored: dict[tuple[int, int], list[ExclusiveDevice]],
    node: int,
) -> tuple[int, int, int, list[_IdKey]]:
    """How well a node takes ``quota`` devices; lower is better. The pick is kept in ``scored``.

    New cores opened, then cores left half used, then L3 caches touched, then the IDs themselves.
    """
    picks = scored[(node, quota)] = _pick_in_node(free, anchors, quota)
    anchor_cores = {d.core for d in anchors}
    free_per_core: dict[CoreKey, int] = {}
    for device in free:
        free_per_core[device.core] = free_per_core.get(device.core, 0) + 1
    taken_per_core: dict[CoreKey, int] = {}
    for device in picks:
        taken_per_core[device.core] = taken_per_core.get(device.core, 0) + 1
    new_cores = taken_per_core.keys() - anchor_cores
    split = sum(1 for core in new_cores if taken_per_core[core] < free_per_core[core])
    l3s = {d.l3 for d in picks} | {d.l3 for d in anchors}
    return (len(new_cores), split, len(l3s), [_device_key(d) for d in picks])


def _pick_in_node(
    free: list[ExclusiveDevice], anchors: list[ExclusiveDevice], quota: int
) -> list[ExclusiveDevice]:
    """``quota`` devices of one node's free ones (sorted by ID), packed onto as few cores as possible."""
    if quota >= len(free):
        return list(free)
    anchor_cores = {d.core for d in anchors}
    anchor_l3 = {d.l3 for d in anchors}

    by_core: dict[CoreKey, list[ExclusiveDevice]] = {}
    for device in free:
        by_core.setdefault(device.core, []).append(device)

    picks: list[ExclusiveDevice] = []
    # Siblings of must_include devices cost no new core: they go first.
    for core in sorted(anchor_cores & by_core.keys(), key=lambda c: _device_key(by_core[c][0])):
        picks.extend(by_core.pop(core)[: quota - len(picks)])
        if len(picks) == quota:
            return picks
    need = quota - len(picks)

    l3_free: dict[int | None, int] = {}
    l3_first: dict[int | None, _IdKey] = {}
    for devs in by_core.values():
        l3, first = devs[0].l3, devs[0].key
        l3_free[l3] = l3_free.get(l3, 0) + len(devs)
        known = l3_first.get(l3)
        if known is None or first < known:
            l3_first[l3] = first

    def l3_rank(l3: int | None) -> tuple[bool, bool, int, _IdKey]:
        # The must_include caches first, then one that holds the rest alone, then the biggest.
        holds = l3_free[l3] >= need
        return (l3 not in anchor_l3, not holds, 0 if holds else -l3_free[l3], l3_first[l3])

    ranks = {l3: l3_rank(l3) for l3 in l3_free}
    # Each core's rank, once: the cache's rank, then its lowest ID.
    core_rank = {core: (ranks[devs[0].l3], devs[0].key) for core, devs in by_core.items()}

    # Most free threads first keeps the core count minimal; the cache and the IDs break ties.
    cores = sorted(by_core, key=lambda c: (-len(by_core[c]), core_rank[c]))
    for index, core in enumerate(cores):
        devs = by_core[core]
        if len(devs) <= need:
            picks.extend(devs)
            need -= len(devs)
        else:
            # The last core only needs part of its threads: the smallest core that still holds the
            # rest costs the same one core and leaves bigger ones whole for the next pod.
            last = min(
                (c for c in cores[index:] if len(by_core[c]) >= need),
                key=lambda c: (len(by_core[c]), core_rank[c]),
            )
            picks.extend(by_core[last][:need])
            need = 0
        if need == 0:
            break
    return picks
