"""The host's CPU topology, read from sysfs and procfs under a configurable root.

`discover` only reads files; every path hangs off `root` so tests point it at a fake tree. Odd or missing
files degrade to a documented default and a warning (logged and kept in `Topology.warnings`); only a host
with no usable online CPU list raises `TopologyError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from agent.cpuset import CpuSet, CpuSetError

log = structlog.get_logger(__name__)

CPU_DIR = "sys/devices/system/cpu"
NODE_DIR = "sys/devices/system/node"
CMDLINE = "proc/cmdline"


class TopologyError(Exception):
    """The host's CPU description cannot be read at all (no usable online CPU list)."""


class CoreKey(NamedTuple):
    """A physical core, unique on the host.

    The kernel's core_id is only unique within a package, and on multi-die packages only within a die; the
    kernel's sibling lists decide which threads form a core. Where one (package, core_id) still names several
    cores, each of them is told apart by its lowest online thread.

    A NamedTuple, not a dataclass: GetPreferredAllocation hashes and compares core keys hundreds of times per
    call, and a tuple does both in C (a frozen dataclass's generated __hash__ was a tenth of that call).
    """

    package: int
    core_id: int
    # -1 where (package, core_id) names one core; else the core's lowest online thread.
    first_thread: int = -1


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
    # Where `isolated` came from: "sysfs", "cmdline", "unknown" (neither readable), "" (built by hand).
    isolated_source: str = ""

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


# -- the kernel command line ------------------------------------------------------------------------------

# isolcpus= flags the kernel knows (kernel/sched/isolation.c); only "domain" removes CPUs from load balancing.
_ISOLCPUS_FLAGS = ("nohz", "domain", "managed_irq")
# The kernel's isspace(): ASCII whitespace only.
_KERNEL_SPACE = frozenset(" \t\n\v\f\r")
# The kernel's cpulist syntax adds "first-last:used/group" strides to the sysfs "N" and "N-M" forms.
_STRIDE = re.compile(r"^([0-9]+)-([0-9]+):([0-9]+)/([0-9]+)$")
_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class CmdlineIsolation:
    """What the kernel command line asks for, as the kernel would read it."""

    # isolcpus= CPUs with the domain flag (or no known flag at all): out of load balancing.
    isolated: CpuSet = field(default_factory=CpuSet)
    # isolcpus= CPUs with only nohz and/or managed_irq: still scheduled normally.
    other: CpuSet = field(default_factory=CpuSet)
    nohz_full: CpuSet = field(default_factory=CpuSet)
    # Parameters the kernel would ignore or only partly apply, in words.
    warnings: tuple[str, ...] = ()


def kernel_params(cmdline: str) -> list[tuple[str, str | None]]:
    """Split a command line as the kernel does: names with '-' read as '_', quotes group, '--' ends it."""
    params: list[tuple[str, str | None]] = []
    for token in _kernel_tokens(cmdline):
        if token == "--":
            # Everything after "--" belongs to init, not to the kernel.
            break
        name, sep, value = token.partition("=")
        params.append((name.replace("-", "_"), value if sep else None))
    return params


def _kernel_tokens(cmdline: str) -> list[str]:
    tokens: list[str] = []
    current: list[str] = []
    started = in_quote = False
    for char in cmdline:
        if char == '"':
            in_quote = not in_quote
            started = True
        elif char in _KERNEL_SPACE and not in_quote:
            if started:
                tokens.append("".join(current))
                current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        tokens.append("".join(current))
    return tokens


def parse_kernel_cpulist(text: str) -> CpuSet:
    """Parse a cpu list as the kernel's command line accepts it, strides (``0-7:2/4``) included."""
    plain: list[str] = []
    cpus: set[int] = set()
    for part in text.split(","):
        stride = _STRIDE.match(part.strip())
        if stride is None:
            plain.append(part)
            continue
        first_last = CpuSet.parse(f"{stride.group(1)}-{stride.group(2)}")
        used_text, group_text = stride.group(3), stride.group(4)
        if len(used_text) > 5 or len(group_text) > 5:
            raise CpuSetError(f"invalid cpu list {text!r}: stride {part!r} is out of range")
        used, group = int(used_text), int(group_text)
        if group == 0 or used == 0 or used > group:
            raise CpuSetError(f"invalid cpu list {text!r}: stride {part!r} needs 0 < used <= group")
        first = first_last.first
        cpus.update(cpu for cpu in first_last if (cpu - first) % group < used)
    if plain:
        try:
            cpus.update(CpuSet.parse(",".join(plain)))
        except CpuSetError as err:
            # Quote the whole parameter value, not the rejoined remainder.
            fault = str(err).partition(": ")[2]
            raise CpuSetError(f"invalid cpu list {text!r}: {fault}") from None
    return CpuSet(cpus)


def inspect_cmdline(cmdline: str) -> CmdlineIsolation:
    """Read isolcpus= and nohz_full= from a kernel command line; never raises, oddities become warnings."""
    warnings: list[str] = []
    isolated: CpuSet | None = None
    other = CpuSet()
    nohz_full: CpuSet | None = None
    for name, value in kernel_params(cmdline):
        if name not in ("isolcpus", "nohz_full"):
            continue
        if value is None:
            warnings.append(f"{name} without a value is ignored")
            continue
        if name == "nohz_full":
            cpus = _cpulist_param(name, value, warnings)
            if cpus is None:
                continue
            if nohz_full is not None and cpus != nohz_full:
                # The kernel keeps the first mask and refuses a different one.
                warnings.append(f"nohz_full={value} ignored: an earlier nohz_full= gave {nohz_full.format()}")
                continue
            nohz_full = cpus
            continue
        parsed = _isolcpus(value, warnings)
        if parsed is None:
            continue
        flags, cpus = parsed
        if "domain" in flags:
            if isolated is not None and cpus != isolated:
                warnings.append(
                    f"isolcpus={value} ignored: an earlier isolcpus= isolated {isolated.format()}"
                )
                continue
            isolated = cpus
        else:
            other |= cpus
    isolated = isolated or CpuSet()
    return CmdlineIsolation(
        isolated=isolated,
        other=other - isolated,
        nohz_full=nohz_full or CpuSet(),
        warnings=tuple(warnings),
    )


def parse_cmdline_isolation(cmdline: str) -> tuple[CpuSet, CpuSet, CpuSet]:
    """(isolated, isolcpus_other, nohz_full) from a kernel command line; any text gives a result."""
    found = inspect_cmdline(cmdline)
    return found.isolated, found.other, found.nohz_full


def _isolcpus(value: str, warnings: list[str]) -> tuple[frozenset[str], CpuSet] | None:
    """The flags and CPUs of one isolcpus= value, following housekeeping_isolcpus_setup()."""
    flags: set[str] = set()
    rest = value
    while rest and rest[0] in _ASCII_LETTERS:
        word, comma, tail = rest.partition(",")
        if word in _ISOLCPUS_FLAGS and comma:
            flags.add(word)
        elif all(char in _ASCII_LETTERS or char == "_" for char in word):
            warnings.append(f"isolcpus={value}: unknown flag {word!r} skipped")
        else:
            warnings.append(f"isolcpus={value} ignored: invalid flag {word!r}")
            return None
        rest = tail
    cpus = _cpulist_param("isolcpus", value, warnings, rest)
    if cpus is None:
        return None
    # With no known flag the kernel isolates from the scheduler domains, as the original isolcpus= did.
    return frozenset(flags or {"domain"}), cpus


def _cpulist_param(name: str, value: str, warnings: list[str], cpulist: str | None = None) -> CpuSet | None:
    text = value if cpulist is None else cpulist
    if not text.strip():
        warnings.append(f"{name}={value} ignored: no CPU list")
        return None
    try:
        return parse_kernel_cpulist(text)
    except CpuSetError as err:
        warnings.append(f"{name}={value} ignored: {err}")
        return None


# -- reading the host ----------------------------------------------------------------------------------------

_INT = re.compile(r"^-?[0-9]{1,9}$")
_NODE = re.compile(r"^node([0-9]{1,5})$")
# sysfs hands a file out in one read of a page; /proc/cmdline is at most a few pages.
_READ_SIZE = 65536
_INDEX = re.compile(r"^index([0-9]{1,3})$")


class _Host:
    """File access under one root; collects warnings, each logged once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Reads go through os with string paths: a 128-CPU host is about 900 small files, and pathlib's
        # path objects and text wrappers made discovery 15 ms of the agent's start on a small VM (now 5).
        self._prefix = os.path.join(os.fspath(root), "")
        self.warnings: list[str] = []

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> tuple[str | None, str]:
        """The file's text, or None and why not ("missing" or the OS error)."""
        try:
            fd = os.open(self._prefix + rel, os.O_RDONLY | os.O_CLOEXEC)
            try:
                chunks = []
                while chunk := os.read(fd, _READ_SIZE):
                    chunks.append(chunk)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None, "missing"
        except OSError as err:
            return None, f"unreadable ({err.strerror or err})"
        return b"".join(chunks).decode("utf-8", errors="replace"), ""

    def cpulist(self, rel: str) -> tuple[CpuSet | None, str]:
        text, why = self.read(rel)
        if text is None:
            return None, why
        try:
            return CpuSet.parse(text), ""
        except CpuSetError as err:
            return None, f"unparsable ({err})"

    def integer(self, rel: str) -> tuple[int | None, str]:
        text, why = self.read(rel)
        if text is None:
            return None, why
        if not _INT.match(text.strip()):
            return None, f"not an integer ({text.strip()[:40]!r})"
        return int(text.strip()), ""

    def listdir(self, rel: str) -> tuple[list[str] | None, str]:
        try:
            return sorted(os.listdir(self._prefix + rel)), ""
        except FileNotFoundError:
            return None, "missing"
        except OSError as err:
            return None, f"unreadable ({err.strerror or err})"

    def warn(self, event: str, message: str, **fields: object) -> None:
        log.warning(event, detail=message, **fields)
        self.warnings.append(message)


class _PerCpuProblems:
    """Per-CPU file problems, folded into one warning per file and fault instead of one per CPU."""

    def __init__(self) -> None:
        self._cpus: dict[tuple[str, str, str], set[int]] = {}

    def add(self, cpu: int, file: str, fault: str, consequence: str) -> None:
        self._cpus.setdefault((file, fault, consequence), set()).add(cpu)

    def report(self, host: _Host) -> None:
        for (file, fault, consequence), cpus in self._cpus.items():
            where = CpuSet(cpus).format()
            host.warn(
                "topology.cpu_file",
                f"{host.path(file)} {fault} for CPUs {where}: {consequence}",
                file=file,
                cpus=where,
                fault=fault,
            )


def discover(root: Path | str = "/") -> Topology:
    """Read the CPU topology of the host whose filesystem is mounted at `root`."""
    host = _Host(Path(root))
    online, present = _online_and_present(host)

    cmdline_text, why = host.read(CMDLINE)
    if cmdline_text is None:
        host.warn(
            "topology.cmdline_unreadable",
            f"{host.path(CMDLINE)} {why}: isolcpus= and nohz_full= unknown",
            path=str(host.path(CMDLINE)),
        )
        cmdline = CmdlineIsolation()
    else:
        cmdline = inspect_cmdline(cmdline_text)
        for warning in cmdline.warnings:
            host.warn("topology.cmdline", f"{host.path(CMDLINE)}: {warning}", path=str(host.path(CMDLINE)))

    isolated, source = _isolated(host, cmdline, cmdline_read=cmdline_text is not None)
    cpus = _cpus(host, online)
    topology = Topology(
        online=online,
        present=present,
        isolated=isolated,
        isolcpus_other=cmdline.other - isolated,
        nohz_full=cmdline.nohz_full,
        cpus=cpus,
        warnings=tuple(host.warnings),
        isolated_source=source,
    )
    log.info(
        "topology.discovered",
        root=str(host.root),
        online=online.format(),
        isolated=isolated.format(),
        isolated_source=source,
        numa_nodes=len(topology.numa_nodes()),
        warnings=len(host.warnings),
    )
    return topology


def _online_and_present(host: _Host) -> tuple[CpuSet, CpuSet]:
    online_file, present_file = f"{CPU_DIR}/online", f"{CPU_DIR}/present"
    online, online_why = host.cpulist(online_file)
    present, present_why = host.cpulist(present_file)
    if online is not None and not online:
        online, online_why = None, "empty"
    if online is None:
        if not present:
            present_why = present_why or "empty"
            raise TopologyError(
                f"cannot tell which CPUs are online: {host.path(online_file)} is {online_why}, "
                f"and {host.path(present_file)} is {present_why}; is {host.root} a Linux root with sysfs?"
            )
        host.warn(
            "topology.online_fallback",
            f"{host.path(online_file)} {online_why}: taking every present CPU ({present.format()}) as online",
            path=str(host.path(online_file)),
        )
        online = present
    if present is None:
        host.warn(
            "topology.present_fallback",
            f"{host.path(present_file)} {present_why}: taking the online CPUs as the present ones",
            path=str(host.path(present_file)),
        )
        present = online
    return online, present


def _isolated(host: _Host, cmdline: CmdlineIsolation, cmdline_read: bool) -> tuple[CpuSet, str]:
    """The kernel's own view (sysfs) wins: it shows what the kernel accepted, not what was asked."""
    rel = f"{CPU_DIR}/isolated"
    sysfs, why = host.cpulist(rel)
    if sysfs is not None:
        if cmdline_read and sysfs != cmdline.isolated:
            host.warn(
                "topology.isolation_disagrees",
                f"{host.path(rel)} lists {sysfs.format() or 'no CPUs'} but isolcpus= on {host.path(CMDLINE)} "
                f"gives {cmdline.isolated.format() or 'no CPUs'}: trusting sysfs",
                sysfs=sysfs.format(),
                cmdline=cmdline.isolated.format(),
            )
        return sysfs, "sysfs"
    if why != "missing":
        host.warn(
            "topology.isolated_unreadable",
            f"{host.path(rel)} {why}: using isolcpus= from the kernel command line",
            path=str(host.path(rel)),
        )
    return cmdline.isolated, "cmdline" if cmdline_read else "unknown"


def _cpus(host: _Host, online: CpuSet) -> dict[int, Cpu]:
    problems = _PerCpuProblems()
    nodes = _numa_nodes(host, online, problems)
    listed: dict[int, CpuSet | None] = {}
    keys: dict[int, CoreKey] = {}
    l3: dict[int, int | None] = {}
    for cpu in online:
        base = f"{CPU_DIR}/cpu{cpu}"
        listed[cpu] = _listed_siblings(host, cpu, online, problems)
        package, why = host.integer(f"{base}/topology/physical_package_id")
        if package is None or package < 0:
            problems.add(
                cpu,
                f"{CPU_DIR}/cpuN/topology/physical_package_id",
                why or f"is {package} (unknown)",
                "taken as package 0",
            )
            package = 0
        core_id, why = host.integer(f"{base}/topology/core_id")
        if core_id is None or core_id < 0:
            # The lowest thread of the core stands for it, so threads listed together stay one core.
            own = listed[cpu]
            core_id = own.first if own else cpu
            problems.add(
                cpu,
                f"{CPU_DIR}/cpuN/topology/core_id",
                why or "is negative (unknown)",
                "core numbered after its lowest listed thread",
            )
        keys[cpu] = CoreKey(package, core_id)
        l3[cpu] = _l3_id(host, cpu, problems)

    cores = _core_groups(online, listed, keys)
    cpus: dict[int, Cpu] = {}
    for cpu in online:
        siblings = listed[cpu]
        if siblings is None:
            siblings = cores[cpu][1]
        elif any(keys[sibling] != keys[cpu] for sibling in siblings):
            problems.add(
                cpu,
                f"{CPU_DIR}/cpuN/topology/thread_siblings_list",
                "disagrees with core_id/physical_package_id",
                "siblings taken from the list",
            )
        cpus[cpu] = Cpu(id=cpu, core=cores[cpu][0], numa_node=nodes[cpu], siblings=siblings, l3=l3[cpu])
    problems.report(host)
    return cpus


def _core_groups(
    online: CpuSet, listed: Mapping[int, CpuSet | None], keys: Mapping[int, CoreKey]
) -> dict[int, tuple[CoreKey, CpuSet]]:
    """Each CPU's core (key and threads): threads the kernel lists together form one core.

    Sibling lists win over (package, core_id), which repeats on multi-die packages whose core_id restarts
    per die; only CPUs without any list are grouped by (package, core_id).
    """
    parent = {cpu: cpu for cpu in online}

    def root(cpu: int) -> int:
        while parent[cpu] != cpu:
            parent[cpu] = parent[parent[cpu]]
            cpu = parent[cpu]
        return cpu

    def join(a: int, b: int) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    unlisted: dict[CoreKey, int] = {}
    for cpu in online:
        siblings = listed[cpu]
        if siblings is not None:
            for sibling in siblings:
                join(cpu, sibling)
        else:
            join(cpu, unlisted.setdefault(keys[cpu], cpu))
    groups: dict[int, set[int]] = {}
    for cpu in online:
        groups.setdefault(root(cpu), set()).add(cpu)
    # A core carries its lowest thread's numbers; a number that two cores share gains that thread.
    claims: dict[CoreKey, int] = {}
    for first in groups:
        claims[keys[first]] = claims.get(keys[first], 0) + 1
    result: dict[int, tuple[CoreKey, CpuSet]] = {}
    for first, members in groups.items():
        key = keys[first]
        if claims[key] > 1:
            key = CoreKey(key.package, key.core_id, first_thread=first)
        threads = CpuSet(members)
        for cpu in members:
            result[cpu] = (key, threads)
    return result


def _listed_siblings(host: _Host, cpu: int, online: CpuSet, problems: _PerCpuProblems) -> CpuSet | None:
    """The kernel's sibling list, online CPUs only and the CPU itself always in; None without one."""
    faults: list[tuple[str, str]] = []
    for name in ("thread_siblings_list", "core_cpus_list"):
        siblings, why = host.cpulist(f"{CPU_DIR}/cpu{cpu}/topology/{name}")
        if siblings is not None:
            return (siblings & online) | CpuSet([cpu])
        faults.append((name, why))
    # Report the most telling fault: a broken file over a missing one, the classic name over the new one.
    broken = [(name, why) for name, why in faults if why != "missing"]
    name, why = broken[0] if broken else faults[0]
    problems.add(cpu, f"{CPU_DIR}/cpuN/topology/{name}", why, "siblings taken from core_id")
    return None


def _l3_id(host: _Host, cpu: int, problems: _PerCpuProblems) -> int | None:
    """The id of the CPU's level-3 cache; None where sysfs has no cache or no id (older kernels)."""
    cache = f"{CPU_DIR}/cpu{cpu}/cache"
    entries, _why = host.listdir(cache)
    if entries is None:
        return None
    indexes = sorted(int(m.group(1)) for name in entries if (m := _INDEX.match(name)))
    for index in indexes:
        level, why = host.integer(f"{cache}/index{index}/level")
        if level is None:
            problems.add(cpu, f"{CPU_DIR}/cpuN/cache/indexM/level", why, "that cache is skipped")
            continue
        if level != 3:
            continue
        cache_id, why = host.integer(f"{cache}/index{index}/id")
        if cache_id is None and why != "missing":
            problems.add(cpu, f"{CPU_DIR}/cpuN/cache/indexM/id", why, "L3 unknown")
        return cache_id
    return None


def _numa_nodes(host: _Host, online: CpuSet, problems: _PerCpuProblems) -> dict[int, int]:
    """NUMA node of every online CPU; a kernel without NUMA has no node directories: all node 0."""
    entries, why = host.listdir(NODE_DIR)
    if entries is None and why != "missing":
        host.warn("topology.numa_unreadable", f"{host.path(NODE_DIR)} {why}: every CPU taken as node 0")
    nodes = sorted(int(m.group(1)) for name in entries or () if (m := _NODE.match(name)))
    if not nodes:
        return dict.fromkeys(online, 0)
    placed: dict[int, int] = {}
    for node in nodes:
        rel = f"{NODE_DIR}/node{node}/cpulist"
        cpus, why = host.cpulist(rel)
        if cpus is None:
            host.warn("topology.numa_cpulist", f"{host.path(rel)} {why}: its CPUs are not placed", path=rel)
            continue
        for cpu in cpus & online:
            if cpu in placed:
                problems.add(cpu, f"{NODE_DIR}/nodeM/cpulist", "lists the CPU twice", "lowest node kept")
            else:
                placed[cpu] = node
    for cpu in online:
        if cpu not in placed:
            problems.add(cpu, f"{NODE_DIR}/nodeM/cpulist", "names no node", "taken as node 0")
            placed[cpu] = 0
    return placed


# -- presenting ----------------------------------------------------------------------------------------------


def topology_to_json(topology: Topology) -> dict[str, Any]:
    """A JSON-ready description (cpu lists as text, as sysfs writes them) for `cpupool discover --json`."""
    return {
        "online": topology.online.format(),
        "present": topology.present.format(),
        "isolated": topology.isolated.format(),
        "isolated_source": topology.isolated_source,
        "isolcpus_other": topology.isolcpus_other.format(),
        "nohz_full": topology.nohz_full.format(),
        "hyperthreaded": topology.hyperthreaded,
        "numa_nodes": [{"node": node, "cpus": cpus.format()} for node, cpus in topology.numa_nodes().items()],
        "cpus": [
            {
                "id": cpu.id,
                "package": cpu.package,
                "core_id": cpu.core.core_id,
                "numa_node": cpu.numa_node,
                "siblings": cpu.siblings.format(),
                "l3": cpu.l3,
                "isolated": cpu.id in topology.isolated,
                "nohz_full": cpu.id in topology.nohz_full,
                "isolcpus_other": cpu.id in topology.isolcpus_other,
            }
            for cpu in sorted(topology.cpus.values(), key=lambda c: c.id)
        ],
        "warnings": list(topology.warnings),
    }


def _marks(topology: Topology, cpu: int) -> str:
    marks = []
    if cpu in topology.isolated:
        marks.append("isolated")
    if cpu in topology.isolcpus_other:
        marks.append("isolcpus-other")
    if cpu in topology.nohz_full:
        marks.append("nohz_full")
    return " ".join(marks)


def _none(cpus: CpuSet) -> str:
    return cpus.format() or "-"


def render_table(topology: Topology) -> str:
    """A readable table for `cpupool discover`: CPUs by NUMA node, then core, with isolation marks."""
    source = f" (from {topology.isolated_source})" if topology.isolated_source else ""
    lines = [
        f"online {_none(topology.online)}   present {_none(topology.present)}   "
        f"hyper-threading {'yes' if topology.hyperthreaded else 'no'}",
        f"isolated {_none(topology.isolated)}{source}   isolcpus-other {_none(topology.isolcpus_other)}   "
        f"nohz_full {_none(topology.nohz_full)}",
    ]
    header = ("CPU", "PACKAGE", "CORE", "SIBLINGS", "L3", "MARKS")
    for node, node_cpus in topology.numa_nodes().items():
        rows: list[tuple[str, ...]] = []
        ordered = sorted((topology.cpus[cpu] for cpu in node_cpus), key=lambda c: (c.core, c.id))
        for cpu in ordered:
            l3 = "-" if cpu.l3 is None else str(cpu.l3)
            rows.append(
                (
                    str(cpu.id),
                    str(cpu.package),
                    str(cpu.core.core_id),
                    cpu.siblings.format(),
                    l3,
                    _marks(topology, cpu.id),
                )
            )
        lines += ["", f"NUMA node {node}: CPUs {node_cpus.format()}", *_columns(header, rows)]
    if topology.warnings:
        lines += ["", "warnings:", *(f"  - {warning}" for warning in topology.warnings)]
    return "\n".join(lines)


def _columns(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
