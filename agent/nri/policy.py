"""Which cpuset a container gets (pure): the kubelet's allocation, mapped through the agent's plan.

The inputs are what the kubelet allocated to the container (resource name -> device IDs, from the
PodResources API, never from env or annotations a pod author can write) and the cpuset the runtime was about
to give it. The PoolView protocol is all the plugin knows of the plan.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.cpuset import CpuSet, CpuSetError


class Policy(enum.StrEnum):
    # Every container without pool devices is kept off every exclusive pool's CPUs.
    STRICT = "strict"
    # Only containers with pool devices are touched.
    POOLS = "pools"


class PoolView(Protocol):
    """The plan as the NRI plugin sees it."""

    def online_cpus(self) -> CpuSet: ...

    def exclusive_cpus(self) -> CpuSet:
        """Every CPU an exclusive pool reserves, including CPUs still held by pods after a reload."""

    def shared_cpus(self) -> CpuSet: ...

    def owns(self, resource: str) -> bool:
        """True for a resource name the agent serves (or served: held devices keep their pool)."""

    def cpus_for(self, assignments: Mapping[str, Sequence[str]]) -> tuple[CpuSet, CpuSet]:
        """(exclusive CPUs, shared CPUs) for these devices; unknown resources or IDs count for nothing."""

    def numa_nodes(self, cpus: CpuSet) -> CpuSet:
        """The NUMA nodes of these CPUs, as a set of node numbers."""


class Kind(enum.StrEnum):
    EXCLUSIVE = "exclusive"
    SHARED = "shared"
    OTHER = "other"


@dataclass(frozen=True)
class Decision:
    """The cpuset to enforce; `cpus` None means leave the container as the runtime has it."""

    kind: Kind
    cpus: CpuSet | None
    mems: CpuSet | None = None
    # Why nothing was enforced, for the log and the outcome metric.
    reason: str = ""
    # The CPUs it holds exclusively (its exclusive devices): no claim may give them to another container.
    exclusive: CpuSet | None = None


@functools.lru_cache(maxsize=1024)
def parse_runtime_cpus(text: str) -> CpuSet | None:
    """The cpuset the runtime holds for a container; None when unset or unreadable.

    Cached: a node's containers share a handful of cpusets, and Synchronize parses hundreds."""
    if not text.strip():
        return None
    try:
        return CpuSet.parse(text)
    except CpuSetError:
        return None


def decide(
    view: PoolView,
    policy: Policy,
    assignments: Mapping[str, Sequence[str]],
    kubelet_cpus: CpuSet | None,
) -> Decision:
    """The cpuset for a container holding `assignments` whose cpuset from the kubelet is `kubelet_cpus`.

    A pool container gets its pool CPUs, whatever the kubelet set. Any other container under `strict`
    keeps the kubelet's cpuset (all online CPUs if unset) minus every exclusive pool's CPUs: never widened,
    and never emptied (a kubelet that placed a container only on pooled CPUs is reported instead).
    """
    ours = {name: ids for name, ids in assignments.items() if ids and view.owns(name)}
    if ours:
        exclusive, shared = view.cpus_for(ours)
        cpus = exclusive | shared
        kind = Kind.EXCLUSIVE if exclusive else Kind.SHARED
        if not cpus:
            return Decision(kind, None, reason="the allocated devices map to no CPU in the current plan")
        return Decision(kind, cpus, view.numa_nodes(cpus), exclusive=exclusive or None)
    if policy is Policy.POOLS:
        return Decision(Kind.OTHER, None, reason="policy pools leaves other containers alone")
    base = kubelet_cpus if kubelet_cpus is not None else view.online_cpus()
    narrowed = _without(base, view.exclusive_cpus())
    if not narrowed:
        return Decision(
            Kind.OTHER, None, reason=f"every CPU of its cpuset {base.format()} is in an exclusive pool"
        )
    return Decision(Kind.OTHER, narrowed)


@functools.lru_cache(maxsize=256)
def _without(base: CpuSet, exclusive: CpuSet) -> CpuSet:
    return base - exclusive
