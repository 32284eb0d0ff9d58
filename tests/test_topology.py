"""Host topology discovery against fake sysfs trees, the kernel command line rules, and this machine."""

from __future__ import annotations

import filecmp
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import topology as topology_module
from agent.cpuset import CpuSet
from agent.topology import (
    CoreKey,
    Topology,
    TopologyError,
    discover,
    inspect_cmdline,
    kernel_params,
    parse_cmdline_isolation,
    parse_kernel_cpulist,
    render_table,
    topology_to_json,
)
from tests.fixtures.make_sysfs import SYSFS_DIR, TREES, TreeSpec, dual32, plain4, regenerate, write_tree

CPU = Path("sys/devices/system/cpu")
NODE = Path("sys/devices/system/node")


def cs(text: str) -> CpuSet:
    return CpuSet.parse(text)


class RecordingLog:
    """Stands in for the module's structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.records.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.records.append(("info", event, fields))

    def warnings(self) -> list[tuple[str, dict[str, Any]]]:
        return [(event, fields) for level, event, fields in self.records if level == "warning"]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordingLog:
    recorder = RecordingLog()
    monkeypatch.setattr(topology_module, "log", recorder)
    return recorder


def build(tmp_path: Path, spec: TreeSpec) -> Path:
    return write_tree(spec, tmp_path / "root")


# -- the committed trees --------------------------------------------------------------------------------


def test_plain4() -> None:
    t = discover(SYSFS_DIR / "plain4")
    assert t.online == cs("0-3")
    assert t.present == cs("0-3")
    assert sorted(t.cpus) == [0, 1, 2, 3]
    assert t.isolated == CpuSet()
    assert t.isolated_source == "sysfs"
    assert t.isolcpus_other == CpuSet()
    assert t.nohz_full == CpuSet()
    # No node directories: a kernel without NUMA, so everything is node 0.
    assert t.numa_nodes() == {0: cs("0-3")}
    assert not t.hyperthreaded
    assert len(t.cores()) == 4
    assert all(cpu.siblings == CpuSet([cpu.id]) and cpu.l3 is None for cpu in t.cpus.values())
    assert t.warnings == ()


def test_dual32() -> None:
    t = discover(str(SYSFS_DIR / "dual32"))
    assert t.online == cs("0-31")
    assert sorted(t.cpus) == list(range(32))
    assert t.numa_nodes() == {0: cs("0-7,16-23"), 1: cs("8-15,24-31")}
    assert t.hyperthreaded
    assert t.cpus[3].siblings == cs("3,19")
    assert t.cpus[19].siblings == cs("3,19")
    # core_id repeats across sockets and has gaps: the package is part of a core's identity.
    assert t.cpus[5].core == CoreKey(package=0, core_id=8)
    assert t.cpus[8].core == CoreKey(package=1, core_id=0)
    assert t.cpus[0].core != t.cpus[8].core
    assert len(t.cores()) == 16
    assert all(len(threads) == 2 for threads in t.cores().values())
    assert {cpu.l3 for cpu in t.cpus.values() if cpu.package == 0} == {0}
    assert {cpu.l3 for cpu in t.cpus.values() if cpu.package == 1} == {1}
    assert t.cpus[20].package == 0
    assert t.cpus[24].numa_node == 1
    assert t.isolated == cs("2-7,18-23")
    assert t.isolated_source == "sysfs"
    assert t.nohz_full == cs("2-7,18-23")
    assert t.isolcpus_other == CpuSet()
    assert t.warnings == ()


def test_offline_cpus_are_left_out_even_where_their_files_remain() -> None:
    t = discover(SYSFS_DIR / "offline")
    assert t.online == cs("0-4,6")
    assert t.present == cs("0-7")
    assert sorted(t.cpus) == [0, 1, 2, 3, 4, 6]
    # CPU 5's stale files claim core 99 and a cache of its own; nothing of it may show.
    assert all(cpu.core.core_id != 99 for cpu in t.cpus.values())
    assert {cpu.l3 for cpu in t.cpus.values()} == {0}
    assert t.cpus[1].siblings == cs("1")
    assert t.cpus[4].siblings == cs("0,4")
    assert t.numa_nodes() == {0: cs("0,1,4"), 1: cs("2,3,6")}
    # The kernel reports isolation for possible CPUs; users of `isolated` intersect with online.
    assert t.isolated == cs("4-7")
    assert t.isolated & t.online == cs("4,6")
    assert t.warnings == ()


def test_multi_die_package_reusing_core_ids_keeps_two_thread_cores() -> None:
    # One package, two dies; core_id restarts on each die, so (package, core_id) alone would make
    # CPUs 0, 4, 8 and 12 one 4-thread "core". The kernel's sibling lists say otherwise, and win.
    t = discover(SYSFS_DIR / "multidie")
    assert t.cpus[0].siblings == cs("0,8")
    assert t.cpus[4].siblings == cs("4,12")
    assert t.cpus[0].core != t.cpus[4].core
    assert t.cpus[0].core == t.cpus[8].core
    assert t.cpus[4].core == t.cpus[12].core
    cores = t.cores()
    assert len(cores) == 8
    assert sorted(cores.values(), key=lambda threads: threads.first) == [
        cs(f"{first},{first + 8}") for first in range(8)
    ]
    # The kernel's own numbering stays visible; the key only gains the lowest thread where core_id repeats.
    assert t.cpus[4].core.core_id == 0 and t.cpus[4].core.package == 0
    assert t.cpus[4].core == CoreKey(package=0, core_id=0, first_thread=4)
    # A reused core_id is how such hosts are built, not a fault worth a warning.
    assert t.warnings == ()


def test_multi_die_table_keeps_each_core_together() -> None:
    table = render_table(discover(SYSFS_DIR / "multidie"))
    firsts = [line.split()[0] for line in table.splitlines() if line.strip()]
    ids = [int(first) for first in firsts if first.isdigit()]
    assert ids[:4] == [0, 8, 1, 9]
    assert _row(table, 12) == ["12", "0", "0", "4,12", "1"]
    assert _row(table, 14) == ["14", "0", "2", "6,14", "1", "isolated"]


def test_cores_are_unique_whatever_core_ids_say(tmp_path: Path) -> None:
    # Every CPU claims core 0: only the sibling lists tell the 16 cores of dual32 apart.
    root = build(tmp_path, dual32())
    for cpu in range(32):
        (root / CPU / f"cpu{cpu}/topology/core_id").write_text("0\n")
    t = discover(root)
    assert len(t.cores()) == 16
    assert all(len(threads) == 2 for threads in t.cores().values())
    assert len({cpu.core for cpu in t.cpus.values()}) == 16


def test_disagreeing_isolation_trusts_sysfs_and_says_so(recorded: RecordingLog) -> None:
    root = SYSFS_DIR / "disagree"
    t = discover(root)
    assert t.isolated == cs("2,3")
    assert t.isolated_source == "sysfs"
    assert t.nohz_full == cs("2-5")
    assert len(t.warnings) == 1
    warning = t.warnings[0]
    assert str(root / CPU / "isolated") in warning
    assert "2,3" in warning
    assert "2-5" in warning
    assert "trusting sysfs" in warning
    assert recorded.warnings() == [
        ("topology.isolation_disagrees", {"detail": warning, "sysfs": "2,3", "cmdline": "2-5"})
    ]


def test_committed_trees_match_their_generator(tmp_path: Path) -> None:
    regenerate(tmp_path)
    for name in TREES:
        fresh, committed = tmp_path / name, SYSFS_DIR / name
        files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file()), name
        _match, mismatch, errors = filecmp.cmpfiles(fresh, committed, [str(f) for f in files], shallow=False)
        assert (mismatch, errors) == ([], []), f"{name}: run python -m tests.fixtures.make_sysfs"
        # Like the kernel's, every file ends with a newline.
        assert all((committed / f).read_text().endswith("\n") for f in files)


# -- the kernel command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "isolated", "other", "nohz_full"),
    [
        ("", "", "", ""),
        ("root=/dev/sda1 ro quiet", "", "", ""),
        ("isolcpus=2-7", "2-7", "", ""),
        ("isolcpus=domain,2-7", "2-7", "", ""),
        ("isolcpus=nohz,domain,managed_irq,2-7", "2-7", "", ""),
        ("isolcpus=managed_irq,domain,2-7,18-23", "2-7,18-23", "", ""),
        ("isolcpus=nohz,2-7", "", "2-7", ""),
        ("isolcpus=managed_irq,2-7", "", "2-7", ""),
        ("isolcpus=nohz,managed_irq,2-7", "", "2-7", ""),
        # An unknown flag is skipped; with no known flag left, the kernel isolates from scheduling.
        ("isolcpus=future_flag,2-3", "2,3", "", ""),
        ("isolcpus=nohz,2-3 isolcpus=domain,5", "5", "2,3", ""),
        ("isolcpus=domain,2-3 isolcpus=nohz,2-4", "2,3", "4", ""),
        ("nohz_full=2-7", "", "", "2-7"),
        ("nohz-full=1-3 isolcpus=1-3", "1-3", "", "1-3"),
        ("isolcpus=0-7:2/4", "0,1,4,5", "", ""),
        ('root=/dev/sda1 "isolcpus=1-2" quiet', "1,2", "", ""),
        ('acpi_osi="Windows 2015" isolcpus=3', "3", "", ""),
        ("isolcpus=1\tnohz_full=1\n", "1", "", "1"),
        # After "--" the words belong to init.
        ("ro -- isolcpus=2-7 nohz_full=2-7", "", "", ""),
        ("isolcpus=1 -- isolcpus=2-7", "1", "", ""),
        # Not the same parameter.
        ("my_isolcpus=2-7 isolcpus_x=3", "", "", ""),
    ],
)
def test_cmdline_isolation(cmdline: str, isolated: str, other: str, nohz_full: str) -> None:
    assert parse_cmdline_isolation(cmdline) == (cs(isolated), cs(other), cs(nohz_full))


@pytest.mark.parametrize(
    ("cmdline", "isolated", "warning"),
    [
        ("isolcpus", "", "isolcpus without a value is ignored"),
        ("isolcpus=", "", "no CPU list"),
        ("isolcpus=nohz", "", "no CPU list"),
        ("isolcpus=3-1", "", "runs backwards"),
        ("isolcpus=2-x", "", "is not N or N-M"),
        ("isolcpus=bad!,2", "", "invalid flag 'bad!'"),
        ("isolcpus=future_flag,2", "2", "unknown flag 'future_flag' skipped"),
        ("isolcpus=2-3 isolcpus=4-5", "2,3", "an earlier isolcpus= isolated 2,3"),
        ("isolcpus=0-999999", "", "above the limit"),
        ("isolcpus=0-7:5/4", "", "0 < used <= group"),
        ("isolcpus=0-7:1/0", "", "0 < used <= group"),
        ("nohz_full=1 nohz_full=2", "", "an earlier nohz_full= gave 1"),
    ],
)
def test_cmdline_oddities_become_warnings(cmdline: str, isolated: str, warning: str) -> None:
    found = inspect_cmdline(cmdline)
    assert found.isolated == cs(isolated)
    assert any(warning in w for w in found.warnings), found.warnings


def test_kernel_params_split_like_the_kernel() -> None:
    assert kernel_params('a=1 b "c=x y" d=' + '"q r"' + " -- e=2") == [
        ("a", "1"),
        ("b", None),
        ("c", "x y"),
        ("d", "q r"),
    ]


def test_kernel_cpulist_strides_and_plain_parts_mix() -> None:
    assert parse_kernel_cpulist("0-11:1/4,20") == cs("0,4,8,20")
    assert parse_kernel_cpulist("2-7") == cs("2-7")


cmdline_words = st.sampled_from(
    ["isolcpus=", "nohz_full=", "nohz,", "domain,", "managed_irq,", "-", ",", ":", "/", '"', " ", "--", "\t"]
)
cmdline_pieces = cmdline_words | st.integers(0, 70000).map(str) | st.text(max_size=5)
cmdline_texts = st.lists(cmdline_pieces, max_size=20).map("".join)


@given(cmdline_texts | st.text())
def test_any_cmdline_gives_cpusets_and_never_raises(cmdline: str) -> None:
    isolated, other, nohz_full = parse_cmdline_isolation(cmdline)
    assert isinstance(isolated, CpuSet)
    assert isinstance(nohz_full, CpuSet)
    assert isolated.isdisjoint(other)
    assert all(isinstance(w, str) for w in inspect_cmdline(cmdline).warnings)


# -- degraded hosts --------------------------------------------------------------------------------------


def test_cmdline_is_the_fallback_without_an_isolated_file(tmp_path: Path) -> None:
    spec = replace(dual32(), isolated=None, cmdline="isolcpus=nohz,managed_irq,1 isolcpus=domain,2-7,18-23")
    t = discover(build(tmp_path, spec))
    assert t.isolated == cs("2-7,18-23")
    assert t.isolated_source == "cmdline"
    assert t.isolcpus_other == cs("1")
    assert t.warnings == ()


def test_unparsable_isolated_file_falls_back_to_cmdline(tmp_path: Path, recorded: RecordingLog) -> None:
    root = build(tmp_path, replace(dual32(), isolated="two to seven"))
    t = discover(root)
    assert t.isolated == cs("2-7,18-23")
    assert t.isolated_source == "cmdline"
    assert any(str(root / CPU / "isolated") in w and "two to seven" in w for w in t.warnings)
    assert [event for event, _ in recorded.warnings()] == ["topology.isolated_unreadable"]


def test_no_isolation_source_at_all_is_reported(tmp_path: Path) -> None:
    root = build(tmp_path, replace(plain4(), isolated=None))
    (root / "proc" / "cmdline").unlink()
    t = discover(root)
    assert t.isolated == CpuSet()
    assert t.isolated_source == "unknown"
    assert any("proc/cmdline missing" in w for w in t.warnings)


def test_online_falls_back_to_present(tmp_path: Path) -> None:
    root = build(tmp_path, plain4())
    (root / CPU / "online").unlink()
    t = discover(root)
    assert t.online == cs("0-3")
    assert sorted(t.cpus) == [0, 1, 2, 3]
    assert any(str(root / CPU / "online") in w and "missing" in w for w in t.warnings)


@pytest.mark.parametrize(("online", "present"), [(None, None), ("zero", None), ("", ""), ("0-x", "a")])
def test_no_usable_online_list_raises_naming_the_file(
    tmp_path: Path, online: str | None, present: str | None
) -> None:
    root = build(tmp_path, plain4())
    for name, text in (("online", online), ("present", present)):
        if text is None:
            (root / CPU / name).unlink()
        else:
            (root / CPU / name).write_text(text + "\n")
    with pytest.raises(TopologyError) as info:
        discover(root)
    assert str(root / CPU / "online") in str(info.value)
    assert str(root / CPU / "present") in str(info.value)


def test_an_empty_directory_is_not_a_host(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="online"):
        discover(tmp_path)


# Each file of dual32 that discovery reads, with what breaking it costs.
BREAKABLE = [
    (CPU / "present", "present"),
    (CPU / "isolated", "isolated"),
    (Path("proc/cmdline"), "cmdline"),
    (CPU / "cpu3/topology/core_id", "core_id"),
    (CPU / "cpu3/topology/physical_package_id", "physical_package_id"),
    (CPU / "cpu3/cache/index1/level", "cache/indexM/level"),
    (CPU / "cpu3/cache/index1/id", "cache/indexM/id"),
    (NODE / "node1/cpulist", "node1/cpulist"),
]


@pytest.mark.parametrize(("rel", "named"), BREAKABLE)
@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_broken_files_degrade_with_a_warning(tmp_path: Path, rel: Path, named: str, damage: str) -> None:
    root = build(tmp_path, dual32())
    path = root / rel
    path.unlink()
    if damage == "garbage":
        path.write_bytes(b"\xff\xfe\x00 not sysfs\n")
    else:
        # Reading a directory fails with an OSError other than "missing".
        path.mkdir()
    t = discover(root)
    assert sorted(t.cpus) == list(range(32))
    assert any(named in w for w in t.warnings), t.warnings


@pytest.mark.parametrize(
    ("rel", "warns"),
    [
        (CPU / "present", True),
        (Path("proc/cmdline"), True),
        (CPU / "cpu3/topology/core_id", True),
        (CPU / "cpu3/topology/physical_package_id", True),
        (CPU / "cpu3/cache/index1/level", True),
        (NODE / "node1/cpulist", True),
        # Normal on older kernels: no warning.
        (CPU / "isolated", False),
        (CPU / "cpu3/cache/index1/id", False),
        (CPU / "cpu3/topology/thread_siblings_list", False),
        (CPU / "cpu3/cache", False),
    ],
)
def test_missing_files_degrade(tmp_path: Path, rel: Path, warns: bool) -> None:
    root = build(tmp_path, dual32())
    path = root / rel
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()
    else:
        path.unlink()
    t = discover(root)
    assert sorted(t.cpus) == list(range(32))
    assert t.cpus[3].siblings == cs("3,19")
    assert bool(t.warnings) == warns, t.warnings


def test_missing_per_cpu_files_make_one_warning_for_all_cpus(tmp_path: Path, recorded: RecordingLog) -> None:
    root = build(tmp_path, dual32())
    for cpu in range(32):
        (root / CPU / f"cpu{cpu}/topology/core_id").unlink()
    t = discover(root)
    assert len(t.warnings) == 1
    assert "core_id missing for CPUs 0-31" in t.warnings[0]
    assert [event for event, _ in recorded.warnings()] == ["topology.cpu_file"]
    # Threads listed together stay one core, numbered after the lowest thread.
    assert t.cpus[19].core == CoreKey(package=0, core_id=3)
    assert t.cores()[CoreKey(package=1, core_id=8)] == cs("8,24")
    assert len(t.cores()) == 16


def test_unknown_ids_from_the_kernel_are_not_trusted(tmp_path: Path) -> None:
    # Some arm64 kernels report -1 when the firmware does not describe the topology.
    root = build(tmp_path, plain4())
    for cpu in range(4):
        (root / CPU / f"cpu{cpu}/topology/core_id").write_text("-1\n")
        (root / CPU / f"cpu{cpu}/topology/physical_package_id").write_text("-1\n")
    t = discover(root)
    assert len(t.cores()) == 4
    assert {cpu.package for cpu in t.cpus.values()} == {0}
    assert len(t.warnings) == 2


def test_siblings_without_any_list_come_from_core_ids(tmp_path: Path) -> None:
    root = build(tmp_path, dual32())
    for cpu in range(32):
        for name in ("thread_siblings_list", "core_cpus_list"):
            (root / CPU / f"cpu{cpu}/topology/{name}").unlink()
    t = discover(root)
    assert t.cpus[5].siblings == cs("5,21")
    assert t.cpus[9].siblings == cs("9,25")
    assert len(t.warnings) == 1
    assert "thread_siblings_list missing for CPUs 0-31" in t.warnings[0]


def test_sibling_lists_naming_offline_cpus_are_cut_to_online(tmp_path: Path) -> None:
    root = build(tmp_path, dual32())
    (root / CPU / "online").write_text("0-15\n")
    t = discover(root)
    assert t.cpus[3].siblings == cs("3")
    assert not t.hyperthreaded
    assert t.numa_nodes() == {0: cs("0-7"), 1: cs("8-15")}


def test_sibling_list_disagreeing_with_core_ids_is_reported(tmp_path: Path) -> None:
    root = build(tmp_path, dual32())
    (root / CPU / "cpu3/topology/core_id").write_text("2\n")
    t = discover(root)
    # The kernel's list wins for siblings and for the core; the mismatch is there for the user to see,
    # named on the CPUs whose listed siblings carry another core_id.
    assert t.cpus[3].siblings == cs("3,19")
    assert t.cores()[t.cpus[3].core] == cs("3,19")
    assert t.cores()[t.cpus[2].core] == cs("2,18")
    assert any("disagrees with core_id" in w and "CPUs 3,19:" in w for w in t.warnings), t.warnings


def test_cpus_outside_every_node_default_to_node_0(tmp_path: Path) -> None:
    root = build(tmp_path, dual32())
    (root / NODE / "node1/cpulist").write_text("8-15\n")
    t = discover(root)
    assert t.numa_nodes() == {0: cs("0-7,16-31"), 1: cs("8-15")}
    assert any("names no node for CPUs 24-31" in w for w in t.warnings)


# -- this machine ----------------------------------------------------------------------------------------


def test_this_machine() -> None:
    if not Path("/sys/devices/system/cpu/online").exists():
        pytest.skip("no sysfs on this machine")
    t = discover("/")
    assert t.online
    assert set(t.cpus) == set(t.online)
    for cpu_id, cpu in t.cpus.items():
        assert cpu.id == cpu_id
        assert cpu_id in cpu.siblings
        assert cpu.siblings.issubset(t.online)
    assert CpuSet().union(*t.numa_nodes().values()) == t.online
    assert t.online.issubset(t.present)
    assert t.isolated_source in ("sysfs", "cmdline")


# -- presenting ------------------------------------------------------------------------------------------


def test_json_view_round_trips_through_json() -> None:
    t = discover(SYSFS_DIR / "dual32")
    data = json.loads(json.dumps(topology_to_json(t)))
    assert data["online"] == "0-31"
    assert data["isolated"] == "2-7,18-23"
    assert data["isolated_source"] == "sysfs"
    assert data["hyperthreaded"] is True
    assert data["numa_nodes"] == [{"node": 0, "cpus": "0-7,16-23"}, {"node": 1, "cpus": "8-15,24-31"}]
    assert [cpu["id"] for cpu in data["cpus"]] == list(range(32))
    assert data["cpus"][18] == {
        "id": 18,
        "package": 0,
        "core_id": 2,
        "numa_node": 0,
        "siblings": "2,18",
        "l3": 0,
        "isolated": True,
        "nohz_full": True,
        "isolcpus_other": False,
    }
    assert data["warnings"] == []


def _row(table: str, cpu: int) -> list[str]:
    rows = [line.split() for line in table.splitlines() if line.split()[:1] == [str(cpu)]]
    assert len(rows) == 1, table
    return rows[0]


def test_table_groups_cpus_by_node_and_core() -> None:
    table = render_table(discover(SYSFS_DIR / "dual32"))
    assert "NUMA node 0: CPUs 0-7,16-23" in table
    assert "NUMA node 1: CPUs 8-15,24-31" in table
    assert _row(table, 2) == ["2", "0", "2", "2,18", "0", "isolated", "nohz_full"]
    assert _row(table, 0) == ["0", "0", "0", "0,16", "0"]
    assert _row(table, 24) == ["24", "1", "0", "8,24", "1"]
    firsts = [line.split()[0] for line in table.splitlines() if line.strip()]
    ids = [int(first) for first in firsts if first.isdigit()]
    # Threads of one core sit together, node 0 before node 1.
    assert ids[:4] == [0, 16, 1, 17]
    assert ids.index(8) > ids.index(23)
    assert "warnings" not in table


def test_table_shows_isolcpus_other_and_warnings(tmp_path: Path) -> None:
    spec = replace(plain4(), isolated=None, cmdline="isolcpus=nohz,1 isolcpus=bogus!,2")
    table = render_table(discover(build(tmp_path, spec)))
    assert _row(table, 1)[-1] == "isolcpus-other"
    assert "warnings:" in table
    assert "invalid flag 'bogus!'" in table


def test_table_for_a_hand_built_topology() -> None:
    t = Topology(
        online=cs("0"),
        present=cs("0"),
        isolated=CpuSet(),
        isolcpus_other=CpuSet(),
        nohz_full=CpuSet(),
        cpus={},
    )
    table = render_table(t)
    assert "online 0" in table
    assert "NUMA" not in table
