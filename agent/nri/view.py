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
        # Per plan object (plans are immutable): asked once per container, computed once per plan.
        self._cached: tuple[object, CpuSet, CpuSet] | None = None
        self._online: tuple[object, CpuSet] | None = None

    def _sets(self) -> tuple[CpuSet, CpuSet]:
        plan = self._supervisor.plan
        if self._cached is not None and self._cached[0] is plan:
            return self._cached[1], self._cached[2]
        exclusive, shared = CpuSet(), CpuSet()
        if plan is not None:
            resources = list(plan.resources.values())
            # Every exclusive pool's CPUs, and every exclusive-kind device the plan keeps for a holder: a
            # reload may move a held CPU to another pool (or drop its pool), and it stays reserved until
            # the pod that holds it is gone.
            exclusive = CpuSet().union(
                *(r.cpus for r in resources if r.exclusive_pool),
                *(d.cpus for r in resources for d in r.exclusive.values()),
            )
            shared = CpuSet().union(*(r.cpus for r in resources if not r.exclusive_pool))
        self._cached = (plan, exclusive, shared)
        return exclusive, shared

    def online_cpus(self) -> CpuSet:
        topology = self._supervisor.topology
        if self._online is None or self._online[0] is not topology:
            self._online = (topology, CpuSet(topology.cpus) if topology is not None else CpuSet())
        return self._online[1]

    def exclusive_cpus(self) -> CpuSet:
        return self._sets()[0]

    def shared_cpus(self) -> CpuSet:
        return self._sets()[1]

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
            # By each ID's meaning when it was handed out: a held device keeps its CPUs through reloads.
            grant = resource.grant(known)
            exclusive |= grant.exclusive
            shared |= grant.shared
        return exclusive, shared

    def numa_nodes(self, cpus: CpuSet) -> CpuSet:
        topology = self._supervisor.topology
        if topology is None:
            return CpuSet()
        return CpuSet(topology.cpus[c].numa_node for c in cpus if c in topology.cpus)
