"""The process-starter, run for real: each child's CPUs read from /proc/<pid>/status and checked against
the cores of fake SMT-1, SMT-2 and SMT-4 nodes, every signal forwarded (to grandchildren in the child's
own process group too), zombies reaped, exit statuses, a refused sched_setaffinity, bad inputs refused
before anything starts, and the bundled binary in an empty read-only chroot (when `make process-starter`
has built it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.annotation import format_downward_annotations
from agent.cpuset import CpuSet
from agent.starter.contract import STARTER_DIR, STARTER_PATH
from agent.starter.cores import read_placement, split
from agent.starter.plan import StarterError, plan_launches
from tests.fixtures.make_sysfs import CpuSpec, TreeSpec, write_tree

REPO = Path(__file__).resolve().parent.parent
# The bundle (`make process-starter`): it runs only from the prefix its loader path names.
BUNDLE = REPO / "dist" / "process-starter"
BINARY = BUNDLE / "process-starter"
KEY = "cpupool.io/cpus"
ALLOWED = sorted(os.sched_getaffinity(0))
ALL = CpuSet(ALLOWED)
# Two exclusive CPUs and a shared one from what this machine lets us use (they may coincide on a
# one-CPU machine; tests that need them apart say so).
EXCL = CpuSet(ALLOWED[:2])
SHARED = CpuSet(ALLOWED[-1:])
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs to tell exclusive shares apart")
SLEEP = shutil.which("sleep") or "/bin/sleep"
SH = shutil.which("sh") or "/bin/sh"


def pool_env() -> dict[str, str]:
    return {
        "CPUPOOL_POOLS": "excl=exclusive,sh=shared",
        "CPUPOOL_EXCL_CPUS": EXCL.comma_list(),
        "CPUPOOL_SH_CPUS": SHARED.comma_list(),
        "EXCLUSIVE_CPUS": EXCL.comma_list(),
        "SHARED_CPUS": SHARED.comma_list(),
    }


def proc(process: str, pool: str, cpus: int, *args: str) -> dict[str, Any]:
    return {"process": process, "args": list(args), "pool": pool, "cpus": cpus}


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def stderr(self) -> str:
        return self.err.read_text()


class Starter:
    """Runs `python -m agent.starter` with an annotations file and an environment of our making."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runs: list[Run] = []

    def env(self, annotation: object = None, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "CONTAINER_NAME": "app",
            "CPUPOOL_LOG_LEVEL": "info",
        }
        if annotation is not None:
            text = annotation if isinstance(annotation, str) else json.dumps(annotation)
            path = self.tmp / "annotations"
            path.write_text(format_downward_annotations({KEY: text, "other/key": "x"}))
            env["CPUPOOL_ANNOTATIONS_FILE"] = str(path)
        env.update(pool_env())
        env.update(extra)
        return env

    def start(self, env: dict[str, str], *command: str, program: list[str] | None = None) -> Run:
        index = len(self.runs)
        out, err = self.tmp / f"out{index}", self.tmp / f"err{index}"
        argv = program or [sys.executable, "-m", "agent.starter"]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen([*argv, *command], env=env, stdout=stdout, stderr=stderr, cwd=self.tmp)
        run = Run(process, out, err)
        self.runs.append(run)
        return run

    def cleanup(self) -> None:
        for run in self.runs:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()


@pytest.fixture
def starter(tmp_path: Path) -> Iterator[Starter]:
    s = Starter(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


def wait_until(check: Callable[[], Any], what: str) -> Any:
    # A deadline so a hang fails the test; it asserts nothing about speed.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"gave up waiting for {what}")


def status_field(pid: int, name: str) -> str | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def affinity(pid: int) -> CpuSet:
    text = status_field(pid, "Cpus_allowed_list")
    assert text is not None, f"process {pid} is gone"
    return CpuSet.parse(text)


def children(pid: int) -> dict[int, list[str]]:
    """Live (not zombie) children of pid and their command lines."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        child = int(entry.name)
        if status_field(child, "PPid") != str(pid) or (status_field(child, "State") or "Z").startswith("Z"):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found[child] = [part.decode() for part in cmdline if part]
    return found


def children_by_arg(pid: int, count: int) -> dict[str, int]:
    """The starter's children once `count` are up, keyed by their last argument."""

    def ready() -> dict[str, int] | None:
        kids = {argv[-1]: child for child, argv in children(pid).items() if argv}
        return kids if len(kids) >= count else None

    found: dict[str, int] = wait_until(ready, f"{count} children of {pid}")
    return found


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


# --- pinning ---------------------------------------------------------------------------------------


@needs_two_cpus
def test_each_process_runs_on_its_share_of_the_pool(starter: Starter) -> None:
    a, b = EXCL.to_list()
    annotation = [
        {"container": "other", "processes": [proc(SLEEP, "excl", 2, "999")]},
        {
            "container": "app",
            "processes": [
                proc(SLEEP, "excl", 1, "1001"),
                proc("sleep", "excl", 1, "1002"),
                proc(SLEEP, "sh", 50, "1003"),
            ],
        },
    ]
    run = starter.start(starter.env(annotation), "ignored", "because", "the", "annotation", "has", "app")
    kids = children_by_arg(run.pid, 3)
    assert set(kids) == {"1001", "1002", "1003"}
    assert affinity(kids["1001"]) == CpuSet([a])
    assert affinity(kids["1002"]) == CpuSet([b])
    assert affinity(kids["1003"]) == SHARED
    # The starter lent its own mask to each spawn and took its own back (right after its last spawn, which
    # the children's appearance can precede).
    deadline = time.monotonic() + 5
    while affinity(run.pid) != ALL and time.monotonic() < deadline:
        time.sleep(0.01)
    assert affinity(run.pid) == ALL

    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    assert all(gone(pid) for pid in kids.values())
    assert '"starter.forwarding"' in run.stderr() and "SIGTERM" in run.stderr()


def test_the_original_command_gets_all_the_containers_cpus(starter: Starter) -> None:
    # No annotation at all: the pod only asked for pools, the webhook kept the command as arguments.
    run = starter.start(starter.env(), SLEEP, "1004")
    (child,) = children_by_arg(run.pid, 1).values()
    assert affinity(child) == EXCL | SHARED
    run.process.send_signal(signal.SIGINT)
    assert run.wait() == 128 + signal.SIGINT
    assert gone(child)


def test_a_container_without_an_entry_runs_its_command(starter: Starter) -> None:
    annotation = [{"container": "someone-else", "processes": [proc(SLEEP, "excl", 1, "1")]}]
    env = starter.env(annotation, CPUPOOL_POOLS="sh=shared")
    run = starter.start(env, SLEEP, "1005")
    (child,) = children_by_arg(run.pid, 1).values()
    assert affinity(child) == SHARED
    run.process.send_signal(signal.SIGHUP)
    assert run.wait() == 128 + signal.SIGHUP


# --- cores and NUMA nodes of fake nodes ----------------------------------------------------------------


def smt_tree(cpus: Any, threads: int, *, numbering: str = "x86", nodes: int = 1) -> TreeSpec:
    """A fake node made of `cpus`, with cores of `threads` threads.

    x86 numbering puts a core's siblings one core-count apart (2 and 18 of 32 CPUs); power numbering
    puts them next to each other (4k..4k+3). The cores are spread evenly over `nodes` NUMA nodes.
    """
    ordered = sorted(cpus)
    count = -(-len(ordered) // threads)
    if numbering == "x86":
        cores = [ordered[k::count] for k in range(count)]
    else:
        cores = [ordered[k * threads : (k + 1) * threads] for k in range(count)]
    per_node = -(-count // nodes)
    specs: dict[int, CpuSpec] = {}
    node_cpus: dict[int, list[int]] = {}
    every = ",".join(map(str, ordered))
    for index, core in enumerate(cores):
        node_cpus.setdefault(index // per_node, []).extend(core)
        for cpu in core:
            siblings = ",".join(map(str, sorted(core)))
            specs[cpu] = CpuSpec(package=0, core_id=index, siblings=siblings, package_cpus=every)
    return TreeSpec(
        cpus=specs,
        online=every,
        present=every,
        cmdline="root=/dev/sda1",
        nodes={node: ",".join(map(str, sorted(members))) for node, members in node_cpus.items()},
    )


def _cores(tree: TreeSpec) -> list[CpuSet]:
    return sorted({CpuSet.parse(spec.siblings) for spec in tree.cpus.values()}, key=min)


def _node_of(tree: TreeSpec) -> dict[int, int]:
    assert tree.nodes is not None
    return {cpu: node for node, text in tree.nodes.items() for cpu in CpuSet.parse(text)}


def check_split(shares: list[CpuSet], pool: CpuSet, tree: TreeSpec) -> None:
    """What a user of the starter counts on, whatever the shape of the node."""
    assert CpuSet().union(*shares) == pool and sum(map(len, shares)) == len(pool), "disjoint, all used"
    nodes = _node_of(tree)
    cores = [core & pool for core in _cores(tree) if core & pool]
    for share in shares:
        partial = [core for core in cores if core & share and (core - share)]
        # Whole cores, but for at most one core to make up the count, and one NUMA node when one fits.
        assert len(partial) <= 1, (share.format(), [c.format() for c in partial])
        if len(share) <= max(sum(1 for c in pool if nodes[c] == n) for n in set(nodes.values())):
            assert len({nodes[cpu] for cpu in share}) == 1, share.format()


@pytest.mark.parametrize(
    ("tree", "pool", "wants", "expected"),
    [
        # x86 SMT-2 (siblings n, n+16): two processes of two CPUs each get a whole core each, where an
        # ascending split would give each process one thread of both cores.
        (smt_tree(range(32), 2, nodes=2), "2,3,18,19", [2, 2], ["2,18", "3,19"]),
        (smt_tree(range(32), 2, nodes=2), "2,3,18,19", [1, 2, 1], ["2", "3,19", "18"]),
        # Two NUMA nodes (0-7,16-23 and 8-15,24-31): each share stays on one node.
        (smt_tree(range(32), 2, nodes=2), "6,7,8,9,22,23,24,25", [4, 4], ["6,7,22,23", "8,9,24,25"]),
        (smt_tree(range(32), 2, nodes=2), "6,7,8,22,23,24", [2, 4], ["8,24", "6,7,22,23"]),
        # SMT off: every CPU is a core; the best-fitting node first.
        (smt_tree(range(16), 1, nodes=2), "0,1,8,9,10", [1, 3, 1], ["0", "8-10", "1"]),
        # POWER SMT-4 (threads 4k..4k+3): a whole core, then halves of one core.
        (smt_tree(range(16), 4, numbering="power"), "4-11", [2, 4, 2], ["4,5", "8-11", "6,7"]),
        (smt_tree(range(16), 4, numbering="power"), "0-7", [1, 1, 4, 2], ["0", "1", "4-7", "2,3"]),
    ],
)
def test_a_pool_is_split_by_core_and_numa_node(
    tmp_path: Path, tree: TreeSpec, pool: str, wants: list[int], expected: list[str]
) -> None:
    cpus = CpuSet.parse(pool)
    placement = read_placement(write_tree(tree, tmp_path), cpus)
    assert placement.warnings == ()
    shares = split(cpus, wants, placement)
    assert [share.format() for share in shares] == expected
    check_split(shares, cpus, tree)


def test_without_topology_files_each_cpu_is_a_core_of_its_own(tmp_path: Path) -> None:
    placement = read_placement(tmp_path, CpuSet([3, 5]))
    assert len(placement.warnings) == 2 and "taken as a core of its own" in placement.warnings[0]
    assert split(CpuSet([3, 5]), [1, 1], placement) == [CpuSet([3]), CpuSet([5])]


def test_a_node_without_topology_files_still_starts_with_a_warning(starter: Starter, tmp_path: Path) -> None:
    annotation = [{"container": "app", "processes": [proc(SLEEP, "excl", len(EXCL), "2100")]}]
    run = starter.start(starter.env(annotation, CPUPOOL_SYS_ROOT=str(tmp_path / "empty")))
    (child,) = children_by_arg(run.pid, 1).values()
    assert affinity(child) == EXCL
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    warnings = [json.loads(line) for line in run.stderr().splitlines() if '"starter.topology"' in line]
    assert warnings and "taken as a core of its own" in warnings[0]["reason"]


@pytest.mark.parametrize(
    ("threads", "numbering"), [(1, "x86"), (2, "x86"), (4, "power"), (4, "x86")], ids=str
)
def test_each_child_runs_on_whole_cores_of_the_node(
    starter: Starter, tmp_path: Path, threads: int, numbering: str
) -> None:
    # The fake node is made of this machine's own CPUs, so the affinity the kernel reports is real.
    tree = smt_tree(ALLOWED, threads, numbering=numbering, nodes=2 if len(ALLOWED) >= 4 else 1)
    root = write_tree(tree, tmp_path / "node")
    cores = [core for core in _cores(tree)]
    wants = [len(core) for core in reversed(cores)]
    processes = [proc(SLEEP, "excl", want, f"{2000 + i}") for i, want in enumerate(wants)]
    env = starter.env(
        [{"container": "app", "processes": processes}],
        CPUPOOL_POOLS="excl=exclusive",
        CPUPOOL_EXCL_CPUS=ALL.comma_list(),
        CPUPOOL_SYS_ROOT=str(root),
    )
    run = starter.start(env)
    kids = children_by_arg(run.pid, len(wants))
    shares = [affinity(kids[f"{2000 + i}"]) for i in range(len(wants))]
    check_split(shares, ALL, tree)
    # Every process asked for one core's worth of CPUs, so each got exactly one core.
    assert sorted(shares, key=min) == cores
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM


def test_multithreaded_counts_are_checked_against_the_node(tmp_path: Path) -> None:
    # Two multiThreaded devices are two cores: 8 CPUs on this SMT-4 node, where an annotation written
    # for SMT-2 (4 CPUs) must be refused before anything starts, with the node's shape in the message.
    root = write_tree(smt_tree(range(16), 4, numbering="power"), tmp_path)
    env = {
        "PATH": os.defpath,
        "CONTAINER_NAME": "app",
        "CPUPOOL_POOLS": "ht=exclusive",
        "CPUPOOL_HT_CPUS": "8-15",
    }
    with pytest.raises(StarterError) as info:
        plan_launches(env, [], _annotation(proc(SH, "ht", 3), proc(SH, "ht", 1)), CpuSet(range(16)), root)
    assert "take 4 CPUs, but CPUPOOL_HT_CPUS gives the container 8 CPUs (8-15): 2 cores of 4 threads" in str(
        info.value
    )
    assert "must add up to 8" in str(info.value)
    launches = plan_launches(
        env, [], _annotation(proc(SH, "ht", 6), proc(SH, "ht", 2)), CpuSet(range(16)), root
    )
    assert [launch.cpus.format() for launch in launches] == ["8-13", "14,15"]
    # The same pod on an SMT-off node: two devices are two CPUs.
    off = write_tree(smt_tree(range(16), 1), tmp_path / "off")
    env["CPUPOOL_HT_CPUS"] = "8,9"
    launches = plan_launches(
        env, [], _annotation(proc(SH, "ht", 1), proc(SH, "ht", 1)), CpuSet(range(16)), off
    )
    assert [launch.cpus.format() for launch in launches] == ["8", "9"]


# --- signals ------------------------------------------------------------------------------------------

GROUP_LEADER = r"""
import os, signal, subprocess, sys, time
out = sys.argv[1]
os.setpgid(0, 0)  # a process group of its own, like a server with workers or a shell job
for s in (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT):
    signal.signal(s, lambda signum, frame: None)  # the leader gets them too, and lives on
kids = [subprocess.Popen([sys.executable, "-c", sys.argv[2], out, f"worker{i}"]) for i in range(2)]
for kid in kids:
    kid.wait()
"""

WORKER = r"""
import os, signal, sys, time
out, name = sys.argv[1], sys.argv[2]
def record(signum, frame):
    with open(os.path.join(out, name), "a") as f:
        f.write(signal.Signals(signum).name + "\n")
for s in (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT):
    signal.signal(s, record)
open(os.path.join(out, name + ".ready"), "w").close()
while True:
    time.sleep(1)
"""

SENT = (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)


def test_every_signal_reaches_grandchildren_in_the_childs_process_group(starter: Starter) -> None:
    out = starter.tmp / "signals"
    out.mkdir()
    leader = proc(sys.executable, "sh", 10, "-c", GROUP_LEADER, str(out), WORKER)
    run = starter.start(starter.env([{"container": "app", "processes": [leader]}]))
    wait_until(lambda: len(list(out.glob("*.ready"))) == 2, "both workers to set their handlers")
    for signum in SENT:
        run.process.send_signal(signum)
        # One at a time: the same signal sent twice before it is taken counts once.
        wait_until(
            lambda signum=signum: all(
                (out / w).exists() and signum.name in (out / w).read_text().split()
                for w in ("worker0", "worker1")
            ),
            f"{signum.name} to reach both workers",
        )
    for worker in ("worker0", "worker1"):
        assert (out / worker).read_text().split() == [s.name for s in SENT]
    workers = [pid for pid in children(next(iter(children(run.pid)))) if pid]
    run.process.send_signal(signal.SIGTERM)
    # The leader dies of SIGTERM, and so do its workers: the whole group got it.
    assert run.wait() == 128 + signal.SIGTERM
    wait_until(lambda: all(gone(pid) for pid in workers), "the workers to be gone")
    forwarded = [
        json.loads(line)["signal"] for line in run.stderr().splitlines() if "starter.forwarding" in line
    ]
    assert forwarded == [*(s.name for s in SENT), "SIGTERM"]


def test_a_real_time_signal_is_forwarded(starter: Starter) -> None:
    mark, ready = starter.tmp / "rt", starter.tmp / "ready"
    trap = f"trap 'echo got > {mark}; exit 7' {int(signal.SIGRTMIN) + 3}"
    script = f"{trap}; touch {ready}; while :; do sleep 0.05; done"
    run = starter.start(starter.env([{"container": "app", "processes": [proc(SH, "sh", 10, "-c", script)]}]))
    wait_until(ready.exists, "the shell to set its trap")
    run.process.send_signal(signal.SIGRTMIN + 3)
    assert run.wait() == 7
    assert mark.read_text().strip() == "got"
    assert '"SIGRTMIN+3"' in run.stderr()


# --- a refused pinning ------------------------------------------------------------------------------------

SUPERVISE = r"""
import os, sys
from agent.cpuset import CpuSet
from agent.starter.plan import Launch
from agent.starter.supervise import Supervisor
ok = Launch("process 0 (sleep)", sys.argv[1], (sys.argv[1], "3000"), CpuSet(os.sched_getaffinity(0)))
bad = Launch("process 1 (sleep)", sys.argv[1], (sys.argv[1], "3001"), CpuSet([int(sys.argv[2])]))
sys.exit(Supervisor([ok, bad], dict(os.environ), 5.0).run())
"""


def test_a_refused_sched_setaffinity_stops_the_started_children_and_exits_2(starter: Starter) -> None:
    # The planning check sees the same mask, so only a cpuset that changes between planning and the
    # spawn (or a kernel that refuses for its own reasons) gets here: the supervisor is driven directly.
    run = starter.start(starter.env(), program=[sys.executable, "-c", SUPERVISE, SLEEP, str(NOT_HERE)])
    assert run.wait() == 2
    err = run.stderr()
    assert f"process-starter: process 1 (sleep): cannot pin to CPUs {NOT_HERE} (Invalid argument)" in err
    assert f"may run on CPUs {ALL.format()} only" in err
    started = [json.loads(line) for line in err.splitlines() if '"starter.started"' in line]
    assert [s["process"] for s in started] == ["process 0 (sleep)"]
    assert gone(started[0]["pid"]), "the child started before the failure must be stopped"


@needs_two_cpus
def test_cpus_outside_the_containers_cpuset_are_refused(starter: Starter) -> None:
    # A forged CPUPOOL_<POOL>_CPUS (or a pool the runtime does not enforce): the starter, restricted to
    # one CPU as a cpuset would, refuses to pin to the other one instead of running there.
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.skip("needs taskset(1)")
    a, b = EXCL.to_list()
    annotation = [{"container": "app", "processes": [proc(SLEEP, "excl", 2, "1")]}]
    run = starter.start(
        starter.env(annotation), program=[taskset, "-c", str(a), sys.executable, "-m", "agent.starter"]
    )
    assert run.wait() == 2
    assert f"CPUs {b} are not available to this container (its CPUs: {a})" in run.stderr()


def test_the_starter_imports_none_of_the_webhooks_code() -> None:
    code = (
        "import sys, agent.starter.run\n"
        "heavy = {'structlog', 'yaml', 'jsonschema', 'aiohttp', 'grpclib'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy "
        "or m in ('agent.mutation', 'agent.config', 'agent.webhook', 'agent.logs')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- exit status --------------------------------------------------------------------------------------


def test_exits_0_when_every_process_succeeds(starter: Starter) -> None:
    annotation = [
        {
            "container": "app",
            "processes": [proc("true", "sh", 10), proc(SH, "sh", 10, "-c", "sleep 0.2; exit 0")],
        }
    ]
    assert starter.start(starter.env(annotation)).wait() == 0


def test_the_first_failure_sets_the_status_and_stops_the_others(starter: Starter) -> None:
    pidfile = starter.tmp / "long.pid"
    annotation = [
        {
            "container": "app",
            "processes": [
                proc(SH, "sh", 10, "-c", f"echo $$ > {pidfile}; exec sleep 1000"),
                proc(SH, "sh", 10, "-c", f"while [ ! -s {pidfile} ]; do sleep 0.02; done; exit 3"),
            ],
        }
    ]
    run = starter.start(starter.env(annotation))
    assert run.wait() == 3
    assert gone(int(pidfile.read_text()))


def test_a_child_killed_by_a_signal_exits_128_plus_the_signal(starter: Starter) -> None:
    annotation = [{"container": "app", "processes": [proc(SH, "sh", 10, "-c", "kill -KILL $$")]}]
    assert starter.start(starter.env(annotation)).wait() == 128 + signal.SIGKILL


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(starter: Starter) -> None:
    pidfile = starter.tmp / "stubborn.pid"
    stubborn = f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done"
    annotation = [
        {
            "container": "app",
            "processes": [
                proc(SH, "sh", 10, "-c", stubborn),
                proc(SH, "sh", 10, "-c", f"while [ ! -s {pidfile} ]; do sleep 0.02; done; exit 5"),
            ],
        }
    ]
    run = starter.start(starter.env(annotation, CPUPOOL_STOP_GRACE_SECONDS="0.3"))
    assert run.wait() == 5
    assert gone(int(pidfile.read_text()))
    assert '"starter.killing"' in run.stderr()


# --- zombies --------------------------------------------------------------------------------------------


def test_orphans_are_adopted_and_reaped(starter: Starter) -> None:
    # A child that leaves a grandchild behind and exits: the grandchild is re-parented to the starter
    # (a child subreaper) and must be reaped when it exits, not left as a zombie.
    orphan_pid, go = starter.tmp / "orphan.pid", starter.tmp / "go"
    orphan = f"echo $$ > {orphan_pid}; while [ ! -e {go} ]; do sleep 0.02; done"
    annotation = [
        {
            "container": "app",
            "processes": [
                proc(SH, "sh", 10, "-c", f"{SH} -c '{orphan}' & exit 0"),
                proc(SLEEP, "sh", 10, "1006"),
            ],
        }
    ]
    run = starter.start(starter.env(annotation))
    pid = int(wait_until(lambda: orphan_pid.exists() and orphan_pid.read_text().strip(), "the orphan"))
    wait_until(lambda: status_field(pid, "PPid") == str(run.pid), "the orphan to be adopted by the starter")
    go.touch()
    wait_until(lambda: gone(pid), "the orphan to be reaped (a zombie stays in /proc)")
    assert run.process.poll() is None, "an orphan's exit is not a child's exit"
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM


def _can_unshare_pid() -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) for a PID namespace"
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, check=False)
    return None if probe.returncode == 0 else f"unshare --pid fails here: {probe.stderr.decode().strip()}"


UNSHARE_PROBLEM = _can_unshare_pid()


@pytest.mark.skipif(UNSHARE_PROBLEM is not None, reason=str(UNSHARE_PROBLEM))
def test_as_pid_1_it_takes_sigterm_forwards_it_and_reaps(starter: Starter) -> None:
    # PID 1 of a namespace drops signals it has no handler for; a runtime's SIGTERM must still work.
    orphan = f"{SH} -c 'sleep 0.1' & exit 0"
    annotation = [
        {"container": "app", "processes": [proc(SH, "sh", 10, "-c", orphan), proc(SLEEP, "sh", 10, "1007")]}
    ]
    program = ["unshare", "--pid", "--fork", sys.executable, "-m", "agent.starter"]
    run = starter.start(starter.env(annotation), program=program)
    init = wait_until(lambda: next(iter(children(run.pid)), None), "PID 1 of the namespace")
    sleeper = children_by_arg(init, 1)["1007"]
    # Its PID inside the namespace (the last NSpid column) is 1.
    assert (status_field(init, "NSpid") or "").split()[-1:] == ["1"]
    assert affinity(sleeper) == SHARED
    os.kill(init, signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    assert gone(sleeper)
    assert '"starter.exited"' in run.stderr()


# --- bad inputs -------------------------------------------------------------------------------------------


def _bad(**env: str | None) -> dict[str, str | None]:
    return env


MISSING = str(Path("/nonexistent/annotations"))
NOT_HERE = max(ALLOWED) + 1000


@pytest.mark.parametrize(
    ("annotation", "env", "command", "says"),
    [
        ("[{", {}, [], "annotation cpupool.io/cpus: not valid JSON"),
        ([{"container": "app", "processes": [proc(SLEEP, "excl", 0)]}], {}, [], "less than the minimum of 1"),
        (None, {}, [], "nothing to start: the pod has no cpupool.io/cpus annotation"),
        (
            [{"container": "x", "processes": [proc(SLEEP, "sh", 1)]}],
            {},
            [],
            "has no entry for container 'app'",
        ),
        (
            [{"container": "app", "processes": [proc(SLEEP, "sh", 1)]}],
            {"CONTAINER_NAME": None},
            [],
            "CONTAINER_NAME is not set",
        ),
        (
            [{"container": "app", "processes": [proc(SLEEP, "gpu", 1)]}],
            {},
            [],
            "the container has no such pool (CPUPOOL_POOLS: excl, sh)",
        ),
        (
            [{"container": "app", "processes": [proc(SLEEP, "excl", 2), proc(SLEEP, "excl", 9)]}],
            {},
            [],
            "the processes on exclusive pool 'excl' take 11 CPUs, but CPUPOOL_EXCL_CPUS gives",
        ),
        (
            [{"container": "app", "processes": [proc(SLEEP, "sh", 1)]}],
            {"CPUPOOL_SH_CPUS": None, "SHARED_CPUS": None},
            [],
            "the container has pool 'sh' but CPUPOOL_SH_CPUS is not set",
        ),
        (None, {"CPUPOOL_EXCL_CPUS": "3-1"}, [SLEEP], "CPUPOOL_EXCL_CPUS: invalid cpu list '3-1'"),
        (None, {"CPUPOOL_POOLS": "excl=dedicated"}, [SLEEP], "pool 'excl' has unknown type 'dedicated'"),
        (None, {"CPUPOOL_POOLS": ""}, [SLEEP], "no pooled CPUs to run"),
        (
            None,
            {"CPUPOOL_SH_CPUS": str(NOT_HERE), "SHARED_CPUS": str(NOT_HERE)},
            [SLEEP],
            f"CPUs {NOT_HERE} are not available",
        ),
        (None, {}, ["no-such-program-cpupool"], "'no-such-program-cpupool' is not found in PATH"),
        (None, {}, ["./not-executable"], "./not-executable is not an executable file"),
        (None, {"CPUPOOL_STOP_GRACE_SECONDS": "soon"}, [SLEEP], "CPUPOOL_STOP_GRACE_SECONDS='soon'"),
        (
            None,
            {"CPUPOOL_ANNOTATIONS_FILE": MISSING},
            [SLEEP],
            f"cannot read the pod annotations file {MISSING}",
        ),
    ],
)
def test_bad_inputs_exit_2_with_a_message_before_starting_anything(
    starter: Starter, annotation: object, env: dict[str, str | None], command: list[str], says: str
) -> None:
    marker = starter.tmp / "started"
    (starter.tmp / "not-executable").write_text("#!/bin/sh\n")
    environment = starter.env(annotation)
    for name, value in env.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    # Every case also lists a first process that would leave a mark if anything started.
    if isinstance(annotation, list) and annotation and annotation[0]["container"] == "app":
        first = proc(SH, "sh", 1, "-c", f"touch {marker}")
        annotation = [{"container": "app", "processes": [first, *annotation[0]["processes"]]}]
        environment = {
            **environment,
            **{k: v for k, v in starter.env(annotation).items() if k.startswith("CPUPOOL_ANN")},
        }
    run = starter.start(environment, *command)
    assert run.wait() == 2
    assert run.stderr().startswith("process-starter: ")
    assert says in run.stderr()
    assert not marker.exists()


def test_a_garbled_downward_file_is_refused(starter: Starter) -> None:
    path = starter.tmp / "annotations"
    path.write_text('cpupool.io/cpus="[unterminated\n')
    run = starter.start({**starter.env(), "CPUPOOL_ANNOTATIONS_FILE": str(path)}, SLEEP, "1")
    assert run.wait() == 2
    assert f"{path}: line 1: the value is not a double-quoted string" in run.stderr()


# --- how pools are resolved (pure) -------------------------------------------------------------------------


def _annotation(*processes: dict[str, Any]) -> str:
    return json.dumps([{"container": "app", "processes": list(processes)}])


def test_exclusive_cpus_are_split_per_pool_in_annotation_order(tmp_path: Path) -> None:
    env = {
        "PATH": os.defpath,
        "CONTAINER_NAME": "app",
        "CPUPOOL_POOLS": "a=exclusive,b=exclusive",
        "CPUPOOL_A_CPUS": "7,3,5",
        "CPUPOOL_B_CPUS": "10,11",
    }
    text = _annotation(proc(SH, "a", 2), proc(SH, "b", 1), proc(SH, "a", 1), proc(SH, "b", 1))
    # One thread per core, one NUMA node: each pool is handed out lowest CPUs first, pool by pool.
    root = write_tree(smt_tree(range(16), threads=1), tmp_path)
    launches = plan_launches(env, [], text, CpuSet(range(16)), root)
    assert [launch.cpus.format() for launch in launches] == ["3,5", "10", "7", "11"]
    assert launches[0].argv == (SH,) and launches[0].executable == SH


def test_without_a_pool_list_types_come_from_the_agents_variables() -> None:
    # SHARED_CPUS is set only by the shared pool's Allocate: a pool with the same CPUs is that pool.
    env = {
        "PATH": os.defpath,
        "CONTAINER_NAME": "app",
        "CPUPOOL_S_CPUS": "4-7",
        "SHARED_CPUS": "4,5,6,7",
        "EXCLUSIVE_CPUS": "1,2",
    }
    text = _annotation(proc(SH, "s", 300), proc(SH, "e", 2))
    shared, exclusive = plan_launches(env, [], text, CpuSet(range(16)))
    assert shared.cpus == CpuSet.parse("4-7")
    # No CPUPOOL_E_CPUS: the one exclusive pool falls back to EXCLUSIVE_CPUS.
    assert exclusive.cpus == CpuSet([1, 2])


def test_two_exclusive_pools_never_share_the_generic_variable() -> None:
    env = {
        "PATH": os.defpath,
        "CONTAINER_NAME": "app",
        "CPUPOOL_POOLS": "a=exclusive,b=exclusive",
        "CPUPOOL_A_CPUS": "1",
        "EXCLUSIVE_CPUS": "1",
    }
    with pytest.raises(StarterError, match="pool 'b' but CPUPOOL_B_CPUS is not set"):
        plan_launches(env, [], _annotation(proc(SH, "a", 1)), CpuSet(range(4)))


def test_pool_types_come_from_the_webhooks_list() -> None:
    env = {"PATH": os.defpath, "CPUPOOL_POOLS": "x=shared", "CPUPOOL_X_CPUS": "2,3"}
    (launch,) = plan_launches(env, [SH, "-c", "true"], None, CpuSet(range(4)))
    assert launch.cpus == CpuSet([2, 3]) and launch.argv == (SH, "-c", "true")


# --- the static binary -------------------------------------------------------------------------------------


PROBE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
/* Prints "<label> <Cpus_allowed_list>" from /proc/self/status, then sleeps argv[2] seconds. */
int main(int argc, char **argv) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[512];
    if (!f) { perror("/proc/self/status"); return 90; }
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "Cpus_allowed_list:", 18) == 0) {
            char *v = line + 18;
            while (*v == ' ' || *v == '\t') v++;
            printf("%s %s", argc > 1 ? argv[1] : "-", v);
        }
    }
    fflush(stdout);
    if (argc > 2) sleep(atoi(argv[2]));
    return 0;
}
"""


def _chroot_problem() -> str | None:
    if not BINARY.exists():
        return "dist/process-starter/ not built (make process-starter)"
    if UNSHARE_PROBLEM is not None:
        return UNSHARE_PROBLEM
    if shutil.which("gcc") is None or shutil.which("chroot") is None:
        return "needs gcc (static libc) and chroot(8)"
    with tempfile.TemporaryDirectory() as target:
        probe = subprocess.run(
            ["unshare", "--mount", "--pid", "--fork", "mount", "-t", "proc", "proc", target],
            capture_output=True,
            check=False,
        )
    if probe.returncode != 0:
        return f"cannot mount in a new mount namespace here: {probe.stderr.decode().strip()}"
    return None


@pytest.fixture
def chroot(tmp_path: Path) -> Path:
    problem = _chroot_problem()
    if problem is not None:
        pytest.skip(problem)
    source = tmp_path / "probe.c"
    source.write_text(PROBE_C)
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    build = subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(root / "probe"), str(source)], capture_output=True, check=False
    )
    if build.returncode != 0:
        pytest.skip(f"cannot link a static test program: {build.stderr.decode()[-300:]}")
    shutil.copytree(BUNDLE, root / STARTER_DIR.lstrip("/"), symlinks=True)
    return root


def _in_empty_root(root: Path, env: dict[str, str]) -> list[str]:
    """A PID and mount namespace, the root bind-mounted read-only (readOnlyRootFilesystem) with /proc,
    nothing writable, the bundle where the webhook mounts it, the starter as PID 1 with only `env`."""
    assignments = " ".join(f"{k}={v}" for k, v in env.items())
    script = (
        f"set -e; mount --bind {root} {root}; mount -t proc proc {root}/proc; "
        f"mount -o remount,bind,ro {root}; "
        f"exec env -i {assignments} {shutil.which('chroot')} {root} {STARTER_PATH}"
    )
    return ["unshare", "--mount", "--pid", "--fork", "sh", "-c", script]


def test_the_bundle_refuses_bad_input_in_an_empty_root(chroot: Path) -> None:
    result = subprocess.run(_in_empty_root(chroot, {}), capture_output=True, check=False, timeout=120)
    assert result.returncode == 2
    assert b"process-starter: nothing to start" in result.stderr


@needs_two_cpus
def test_the_binary_pins_in_an_empty_read_only_chroot(chroot: Path) -> None:
    a, b = EXCL.to_list()
    annotation = [
        {
            "container": "app",
            "processes": [proc("/probe", "excl", 1, "first"), proc("/probe", "excl", 1, "second")],
        }
    ]
    (chroot / "annotations").write_text(format_downward_annotations({KEY: json.dumps(annotation)}))
    env = {"CONTAINER_NAME": "app", "CPUPOOL_ANNOTATIONS_FILE": "/annotations", **pool_env()}
    result = subprocess.run(_in_empty_root(chroot, env), capture_output=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert sorted(result.stdout.decode().splitlines()) == [f"first {a}", f"second {b}"]


def test_the_binary_as_pid_1_forwards_sigterm(chroot: Path) -> None:
    annotation = [{"container": "app", "processes": [proc("/probe", "sh", 10, "sleeper", "1000")]}]
    (chroot / "annotations").write_text(format_downward_annotations({KEY: json.dumps(annotation)}))
    env = {"CONTAINER_NAME": "app", "CPUPOOL_ANNOTATIONS_FILE": "/annotations", **pool_env()}
    out = chroot.parent / "out"
    with out.open("wb") as stdout:
        process = subprocess.Popen(_in_empty_root(chroot, env), stdout=stdout, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: out.read_text().startswith("sleeper"), "the pinned probe to report")
        init = wait_until(lambda: next(iter(children(process.pid)), None), "PID 1 of the namespace")
        os.kill(init, signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert out.read_text().split() == ["sleeper", SHARED.format()]
