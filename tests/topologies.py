"""Topologies built in memory, for tests of the pure modules that need no sysfs tree."""

from __future__ import annotations

from agent.cpuset import CpuSet
from agent.topology import CoreKey, Cpu, Topology


def make_topology(
    nodes: int = 2,
    cores_per_node: int = 4,
    threads: int = 2,
    isolated: str = "",
) -> Topology:
    """`nodes` sockets, one NUMA node and one L3 each; CPU numbering as Linux does on x86: all first
    threads, then all second threads (siblings of CPU n are n + total_cores * k)."""
    total_cores = nodes * cores_per_node
    cpus: dict[int, Cpu] = {}
    for node in range(nodes):
        for core in range(cores_per_node):
            first = node * cores_per_node + core
            siblings = CpuSet(first + total_cores * t for t in range(threads))
            for cpu in siblings:
                cpus[cpu] = Cpu(cpu, CoreKey(node, core), node, siblings, l3=node)
    online = CpuSet(cpus)
    return Topology(
        online=online,
        present=online,
        isolated=CpuSet.parse(isolated),
        isolcpus_other=CpuSet(),
        nohz_full=CpuSet(),
        cpus=dict(sorted(cpus.items())),
    )
