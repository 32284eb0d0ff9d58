"""PoolView over the running Supervisor: the only place the NRI side reads the plan and the topology."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from agent.cpuset import CpuSet

if TYPE_CHECKING:
    from agent.supervisor import Supervisor


class SupervisorPoolView:
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def online_cpus(self) -> CpuSet:
        topology = self._supervisor.topology
        return CpuSet(topology.cpus) if topology is not None else CpuSet()

    def exclusive_cpus(self) -> CpuSet:
        plan = self._supervisor.plan
        if plan is None:
            return CpuSet()
        # A resource's `cpus` include CPUs still held by pods after a reload took them from the config.
        return CpuSet().union(*(r.cpus for r in plan.resources.values() if r.exclusive_pool))

    def shared_cpus(self) -> CpuSet:
        plan = self._supervisor.plan
        if plan is None:
            return CpuSet()
        return CpuSet().union(*(r.cpus for r in plan.resources.values() if not r.exclusive_pool))

    def owns(self, resource: str) -> bool:
        plan = self._supervisor.plan
        return plan is not None and resource in plan.resources

    def cpus_for(self, assignments: Mapping[str, Sequence[str]]) -> tuple[CpuSet, CpuSet]:
        plan = self._supervisor.plan
        exclusive, shared = CpuSet(), CpuSet()
        if plan is None:
            return exclusive, shared
        for name, ids in assignments.items():
            resource = plan.resources.get(name)
            if resource is None:
                continue
            known = [i for i in ids if resource.has_device(i)]
            if not known:
                continue
            if resource.exclusive_pool:
                exclusive |= resource.cpus_of(known)
            else:
                shared |= resource.cpus
        return exclusive, shared

    def numa_nodes(self, cpus: CpuSet) -> CpuSet:
        topology = self._supervisor.topology
        if topology is None:
            return CpuSet()
        return CpuSet(topology.cpus[c].numa_node for c in cpus if c in topology.cpus)
