"""Where each CPU sits on this node (core and NUMA node), read from sysfs, and how a pool's CPUs are split.

The webhook cannot see the node (the pod is not scheduled yet), so everything that depends on the
node's shape is done here, at start: how many threads a core has, and which CPUs go together. A share
of whole cores on one NUMA node keeps a process off the caches and execution units of another.

Only the few files of the CPUs at hand are read, with plain os calls (the starter starts on every
container start, so it keeps its imports few). A missing or odd file is not fatal: that CPU counts as
a core of its own on node 0, and a warning says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from agent.cpuset import CpuSet, CpuSetError

CPU_DIR = "sys/devices/system/cpu"
NODE_DIR = "sys/devices/system/node"


class Placement:
    """The core (named by its lowest thread) and NUMA node of some CPUs, and the warnings of reading them."""

    __slots__ = ("core_of", "node_of", "threads_of", "warnings")

    def __init__(
        self,
        core_of: Mapping[int, int],
        node_of: Mapping[int, int],
        threads_of: Mapping[int, CpuSet],
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.core_of = core_of
        self.node_of = node_of
        # Every thread of each core, on the whole node (not only the CPUs asked about).
        self.threads_of = threads_of
        self.warnings = warnings

    def threads_per_core(self, cpus: Iterable[int]) -> set[int]:
        """The distinct thread counts of the cores holding `cpus` (one value on a uniform node)."""
        return {len(self.threads_of[self.core_of[cpu]]) for cpu in cpus if cpu in self.core_of}


def _read_list(path: str) -> CpuSet | None:
    try:
        with open(path, encoding="ascii") as file:
            return CpuSet.parse(file.read())
    except (OSError, UnicodeDecodeError, CpuSetError):
        return None


def _nodes(root: str) -> dict[int, CpuSet]:
    base = os.path.join(root, NODE_DIR)
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    nodes: dict[int, CpuSet] = {}
    for name in names:
        if name.startswith("node") and name[4:].isdigit():
            cpus = _read_list(os.path.join(base, name, "cpulist"))
            if cpus is not None:
                nodes[int(name[4:])] = cpus
    return nodes


def read_placement(root: str | os.PathLike[str], cpus: Iterable[int]) -> Placement:
    """Cores and NUMA nodes of `cpus` from the sysfs tree under `root` (``/`` on a real node)."""
    base = os.fspath(root)
    wanted = sorted(set(cpus))
    warnings: list[str] = []
    core_of: dict[int, int] = {}
    threads_of: dict[int, CpuSet] = {}
    for cpu in wanted:
        if cpu in core_of:
            continue
        topology = os.path.join(base, CPU_DIR, f"cpu{cpu}", "topology")
        siblings = _read_list(os.path.join(topology, "thread_siblings_list")) or _read_list(
            os.path.join(topology, "core_cpus_list")
        )
        if siblings is None or cpu not in siblings:
            warnings.append(f"CPU {cpu}: no thread siblings under {topology}; taken as a core of its own")
            siblings = CpuSet([cpu])
        core = min(siblings)
        threads_of[core] = siblings
        for thread in siblings:
            core_of[thread] = core
    nodes = _nodes(base)
    node_of: dict[int, int] = {}
    for cpu in wanted:
        found = [node for node, members in sorted(nodes.items()) if cpu in members]
        if not found and nodes:
            warnings.append(
                f"CPU {cpu} is in no NUMA node under {os.path.join(base, NODE_DIR)}; taken as node 0"
            )
        node_of[cpu] = found[0] if found else 0
    return Placement({cpu: core_of[cpu] for cpu in wanted}, node_of, threads_of, tuple(warnings))


def split(pool: CpuSet, wants: Sequence[int], placement: Placement) -> list[CpuSet]:
    """Give each want (a CPU count, in order) its CPUs of `pool`: whole cores and one NUMA node where it can.

    The counts must add up to at most the pool's size. Each want goes to the NUMA node that fits it most
    tightly (so a larger want later still finds a node with room), or, when none fits, spreads over the
    nodes with the most room first. Inside a node it takes untouched whole cores first, then finishes with
    threads of one core: a core already broken by an earlier want when that fits exactly, else the
    smallest core that covers the rest. Equal inputs give equal shares.
    """
    if sum(wants) > len(pool):
        raise ValueError(
            f"the wants add up to {sum(wants)}, more than the {len(pool)} CPUs of {pool.format()}"
        )
    # node -> core -> the core's free CPUs of the pool, ascending.
    free: dict[int, dict[int, list[int]]] = {}
    for cpu in pool:
        node = placement.node_of.get(cpu, 0)
        core = placement.core_of.get(cpu, cpu)
        free.setdefault(node, {}).setdefault(core, []).append(cpu)
    size = {core: len(threads) for cores in free.values() for core, threads in cores.items()}

    shares: list[CpuSet] = []
    for want in wants:
        room = {node: sum(len(t) for t in cores.values()) for node, cores in free.items()}
        fitting = [node for node in sorted(free) if room[node] >= want]
        if fitting:
            order = [min(fitting, key=lambda node: (room[node], node))]
        else:
            order = sorted(free, key=lambda node: (-room[node], node))
        taken: list[int] = []
        for node in order:
            if len(taken) == want:
                break
            taken += _take(free[node], size, want - len(taken))
        shares.append(CpuSet(taken))
    return shares


def _take(cores: dict[int, list[int]], size: Mapping[int, int], need: int) -> list[int]:
    """Up to `need` CPUs from one node's free cores (changed in place)."""
    taken: list[int] = []
    for core in sorted(cores):
        threads = cores[core]
        if threads and len(threads) == size[core] and len(threads) <= need:
            taken += threads
            need -= len(threads)
            cores[core] = []
    while need > 0:
        open_cores = [core for core in sorted(cores) if cores[core]]
        if not open_cores:
            break

        def broken_first(core: int) -> tuple[int, int]:
            return (0 if len(cores[core]) < size[core] else 1, core)

        exact = [core for core in open_cores if len(cores[core]) == need]
        larger = [core for core in open_cores if len(cores[core]) > need]
        if exact:
            pick = min(exact, key=broken_first)
        elif larger:
            pick = min(larger, key=lambda core: (len(cores[core]), *broken_first(core)))
        else:
            pick = max(open_cores, key=lambda core: (len(cores[core]), -core))
        count = min(need, len(cores[pick]))
        taken += cores[pick][:count]
        cores[pick] = cores[pick][count:]
        need -= count
    return taken
