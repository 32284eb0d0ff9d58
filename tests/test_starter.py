"""The process-starter, run for real: each child's CPUs read from /proc/<pid>/status, signals forwarded,
zombies reaped, exit statuses, bad inputs refused before anything starts, and the static binary in an
empty chroot (when `make process-starter` has built it)."""

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
from agent.config import PoolType
from agent.cpuset import CpuSet
from agent.starter import StarterError, plan_launches

REPO = Path(__file__).resolve().parent.parent
BINARY = REPO / "dist" / "process-starter"
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
    # The starter lent its own mask to each spawn and took its own back.
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
            "want 11 CPUs by now, but CPUPOOL_EXCL_CPUS has",
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


def test_exclusive_cpus_are_taken_in_list_order_per_pool() -> None:
    env = {
        "PATH": os.defpath,
        "CONTAINER_NAME": "app",
        "CPUPOOL_POOLS": "a=exclusive,b=exclusive",
        "CPUPOOL_A_CPUS": "7,3,5",
        "CPUPOOL_B_CPUS": "10,11",
    }
    text = _annotation(proc(SH, "a", 2), proc(SH, "b", 1), proc(SH, "a", 1), proc(SH, "b", 1))
    launches = plan_launches(env, [], text, CpuSet(range(16)))
    # In ascending CPU order (the agent's lists are ascending anyway), each pool on its own.
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
    assert PoolType("shared") is PoolType.SHARED


# --- the static binary -------------------------------------------------------------------------------------

needs_binary = pytest.mark.skipif(
    not BINARY.exists(), reason="dist/process-starter not built (make process-starter)"
)

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


@needs_binary
def test_the_binary_runs_without_python_and_refuses_bad_input() -> None:
    result = subprocess.run([str(BINARY)], env={}, capture_output=True, check=False, timeout=60)
    assert result.returncode == 2
    assert b"process-starter: nothing to start" in result.stderr


def _chroot_problem() -> str | None:
    if not BINARY.exists():
        return "dist/process-starter not built (make process-starter)"
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
    (root / "tmp").mkdir()
    build = subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(root / "probe"), str(source)], capture_output=True, check=False
    )
    if build.returncode != 0:
        pytest.skip(f"cannot link a static test program: {build.stderr.decode()[-300:]}")
    shutil.copy2(BINARY, root / "process-starter")
    return root


def _in_empty_root(root: Path, env: dict[str, str]) -> list[str]:
    """A PID and mount namespace, the root bind-mounted read-only (readOnlyRootFilesystem) with /proc
    and a writable scratch TMPDIR (the webhook's emptyDir), the starter as PID 1 with only `env`."""
    assignments = " ".join(f"{k}={v}" for k, v in env.items())
    script = (
        f"set -e; mount --bind {root} {root}; mount -t proc proc {root}/proc; "
        f"mount -t tmpfs tmpfs {root}/tmp; mount -o remount,bind,ro {root}; "
        f"exec env -i TMPDIR=/tmp {assignments} {shutil.which('chroot')} {root} /process-starter"
    )
    return ["unshare", "--mount", "--pid", "--fork", "sh", "-c", script]


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
