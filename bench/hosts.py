"""The fake hosts the benchmarks run on, written with the test suite's sysfs generator, and their configs."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.make_sysfs import CpuSpec, TreeSpec, write_tree


def _two_socket(cores_per_socket: int, isolated: str) -> TreeSpec:
    """Two sockets (one NUMA node and one L3 each), two threads per core, numbered the Intel way: the first
    threads of every core come first (0 .. C-1), their siblings follow (C .. 2C-1)."""
    cores = 2 * cores_per_socket
    half = cores_per_socket
    package_cpus = {
        0: f"0-{half - 1},{cores}-{cores + half - 1}",
        1: f"{half}-{cores - 1},{cores + half}-{2 * cores - 1}",
    }
    cpus: dict[int, CpuSpec] = {}
    for cpu in range(2 * cores):
        core = cpu % cores
        package = core // half
        siblings = f"{core},{core + cores}"
        cpus[cpu] = CpuSpec(
            package=package,
            core_id=core % half,
            siblings=siblings,
            package_cpus=package_cpus[package],
            caches=((2, core, siblings), (3, package, package_cpus[package])),
        )
    last = 2 * cores - 1
    return TreeSpec(
        cpus=cpus,
        online=f"0-{last}",
        present=f"0-{last}",
        isolated=isolated,
        nodes={0: package_cpus[0], 1: package_cpus[1]},
        cmdline=f"BOOT_IMAGE=/vmlinuz-6.8.0 root=/dev/sda1 ro isolcpus=nohz,domain,managed_irq,{isolated}",
    )


def dual64(root: Path) -> Path:
    """2 sockets, 64 cores, 128 threads (siblings n and n+64); CPUs 0-3 and 64-67 stay for the system."""
    return write_tree(_two_socket(32, "4-63,68-127"), root)


def wide200(root: Path) -> Path:
    """2 sockets, 100 cores, 200 threads: the host whose 200 CPUs form one shared pool."""
    return write_tree(_two_socket(50, "1-99,101-199"), root)


# A production-like node: a per-thread exclusive pool, a whole-core pool and a shared pool, CPUs 0-1 and
# 64-65 left to the system.
DUAL64_CONFIG = """\
resourceBaseName: cpupool.io
pools:
  dedicated:    {cpus: "8-31,72-95", pooltype: exclusive}
  dedicated-ht: {cpus: "32-63,96-127", pooltype: exclusive, hyperThreadingPolicy: multiThreaded}
  shared:       {cpus: "2-7,66-71", pooltype: shared}
"""

# The same node after an operator edit: the shared pool takes two more CPUs from the system.
DUAL64_CONFIG_EDITED = DUAL64_CONFIG.replace('"2-7,66-71"', '"2-7,65-71"')

# GetPreferredAllocation's worst realistic case: one exclusive pool of every thread of the 64 cores.
DUAL64_ALL_EXCLUSIVE = """\
resourceBaseName: cpupool.io
pools:
  cores: {cpus: "0-127", pooltype: exclusive}
"""


def shared_pool_config(cpus: str) -> str:
    return f'resourceBaseName: cpupool.io\npools:\n  big: {{cpus: "{cpus}", pooltype: shared}}\n'
