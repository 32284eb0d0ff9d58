"""The host's CPU topology, read from sysfs and procfs under a configurable root."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.cpuset import CpuSet


class TopologyError(Exception):
    """The host's CPU description cannot be read at all (no usable online CPU list)."""


@dataclass(frozen=True, order=True)
class CoreKey:
    """A physical core: the kernel's core_id is only unique within its package."""

    package: int
    core_id: int


@dataclass(frozen=True)
class Cpu:
    """One online logical CPU."""

    id: int
    core: CoreKey
    numa_node: int
    # Every hyper-thread of this CPU's core, itself included.
    siblings: CpuSet
    # L3 cache id, None where sysfs does not describe it.
    l3: int | None = None

    @property
    def package(self) -> int:
        return self.core.package


@dataclass(frozen=True)
class Topology:
    """What the agent knows of the host's CPUs; every CpuSet holds CPU numbers."""

    online: CpuSet
    present: CpuSet
    # CPUs taken out of the scheduler's load balancing (isolcpus with the domain flag or none).
    isolated: CpuSet
    # CPUs named by isolcpus= with flags that leave them in scheduling (nohz, managed_irq only).
    isolcpus_other: CpuSet
    nohz_full: CpuSet
    # Online CPUs only, keyed by CPU number.
    cpus: Mapping[int, Cpu]
    # Human-readable notes about missing or odd files, already logged at discovery.
    warnings: tuple[str, ...] = field(default=())

    def numa_nodes(self) -> dict[int, CpuSet]:
        nodes: dict[int, set[int]] = {}
        for cpu in self.cpus.values():
            nodes.setdefault(cpu.numa_node, set()).add(cpu.id)
        return {node: CpuSet(ids) for node, ids in sorted(nodes.items())}

    def cores(self) -> dict[CoreKey, CpuSet]:
        cores: dict[CoreKey, set[int]] = {}
        for cpu in self.cpus.values():
            cores.setdefault(cpu.core, set()).add(cpu.id)
        return {core: CpuSet(ids) for core, ids in sorted(cores.items())}

    @property
    def hyperthreaded(self) -> bool:
        return any(len(cpu.siblings) > 1 for cpu in self.cpus.values())
