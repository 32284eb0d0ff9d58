"""process-starter: a container's PID 1 that starts each process pinned to its share of the pooled CPUs.

Inputs (set by the webhook and the agent): the pod's annotations in a downward API file, ``CONTAINER_NAME``,
``CPUPOOL_POOLS`` (``pool=type,...``), the agent's ``CPUPOOL_<POOL>_CPUS``, ``EXCLUSIVE_CPUS`` and
``SHARED_CPUS``; its own arguments are the container's original command. Everything is checked before
anything starts: a wrong input exits 2 with a message on stderr.

Pinning: posix_spawn has no affinity attribute, so the starter sets its own affinity to the child's CPUs
just before each spawn (the child inherits it across exec) and restores it after. The starter is single
threaded and its signals are blocked at that point, so nothing else can run on the borrowed mask.

Supervision: signals are blocked and taken with sigwaitinfo, the way an init must (a PID 1 without a
handler would drop SIGTERM from the runtime). Termination signals go to every child; every zombie is
reaped, including orphans re-parented to the starter (it is a child subreaper even when not PID 1, e.g.
under the one-file bootloader). The first child to fail sets the exit status (its code, or 128 + signal)
and the others get SIGTERM, then SIGKILL after a grace period; when all succeed the starter exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.annotation import (
    AnnotationError,
    ContainerSpec,
    DownwardFileError,
    annotation_key,
    parse_annotation,
    parse_downward_annotations,
)
from agent.config import DEFAULT_RESOURCE_BASE_NAME, PoolType, pool_env_name
from agent.cpuset import CpuSet, CpuSetError
from agent.logs import setup_logging
from agent.mutation import (
    ANNOTATIONS_FILE,
    ENV_ANNOTATION,
    ENV_ANNOTATIONS_FILE,
    ENV_CONTAINER_NAME,
    ENV_POOLS,
)

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
ENV_EXCLUSIVE = "EXCLUSIVE_CPUS"
ENV_SHARED = "SHARED_CPUS"
ENV_GRACE = "CPUPOOL_STOP_GRACE_SECONDS"
ENV_LOG_LEVEL = "CPUPOOL_LOG_LEVEL"
DEFAULT_GRACE_SECONDS = 10.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER = 36


class StarterError(Exception):
    """An input the starter cannot work with; the message says which and why."""


@dataclass(frozen=True)
class Pool:
    name: str
    type: PoolType
    cpus: CpuSet
    # Where the CPUs came from, for messages.
    source: str


@dataclass(frozen=True)
class Launch:
    """One process to start: what, with which arguments, on which CPUs."""

    label: str
    executable: str
    argv: tuple[str, ...]
    cpus: CpuSet


def _cpu_list(env: Mapping[str, str], name: str) -> CpuSet | None:
    text = env.get(name)
    if text is None:
        return None
    try:
        return CpuSet.parse(text)
    except CpuSetError as exc:
        raise StarterError(f"{name}: {exc}") from exc


def _declared_pools(env: Mapping[str, str], entry: ContainerSpec | None) -> dict[str, PoolType | None]:
    """Pool name -> type (None: infer) from CPUPOOL_POOLS, or from the annotation entry without it."""
    text = env.get(ENV_POOLS)
    if text is None:
        return {p.pool: None for p in entry.processes} if entry is not None else {}
    pools: dict[str, PoolType | None] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, kind = item.partition("=")
        if not name:
            raise StarterError(f"{ENV_POOLS}={text!r}: empty pool name")
        try:
            pools[name] = PoolType(kind) if sep else None
        except ValueError as exc:
            raise StarterError(f"{ENV_POOLS}={text!r}: pool {name!r} has unknown type {kind!r}") from exc
    return pools


def read_pools(env: Mapping[str, str], entry: ContainerSpec | None) -> dict[str, Pool]:
    """The container's pools and their CPUs, from the variables the agent's Allocate sets."""
    declared = _declared_pools(env, entry)
    shared = _cpu_list(env, ENV_SHARED)
    exclusive = _cpu_list(env, ENV_EXCLUSIVE)
    found: dict[str, tuple[CpuSet | None, PoolType]] = {}
    for name, declared_type in declared.items():
        cpus = _cpu_list(env, pool_env_name(name))
        kind = declared_type
        if kind is None:
            # Only the shared pool's Allocate sets SHARED_CPUS, and there is one shared pool at most.
            kind = PoolType.SHARED if cpus is not None and cpus == shared else PoolType.EXCLUSIVE
        found[name] = (cpus, kind)
    # EXCLUSIVE_CPUS is whatever the last exclusive Allocate set: it speaks for one exclusive pool only.
    only_exclusive = sum(1 for _, kind in found.values() if kind is PoolType.EXCLUSIVE) == 1
    pools: dict[str, Pool] = {}
    for name, (pool_cpus, kind) in found.items():
        var = pool_env_name(name)
        cpus, source = pool_cpus, var
        if cpus is None:
            # An older agent or a hand-made environment: the generic variables, when unambiguous.
            if kind is PoolType.SHARED and shared is not None:
                cpus, source = shared, ENV_SHARED
            elif kind is PoolType.EXCLUSIVE and exclusive is not None and only_exclusive:
                cpus, source = exclusive, ENV_EXCLUSIVE
            else:
                raise StarterError(
                    f"the container has pool {name!r} but {var} is not set (the cpupool agent sets it "
                    "when it allocates the pool: does the container request the pool's resource?)"
                )
        if not cpus:
            raise StarterError(f"{source} is empty: pool {name!r} gave the container no CPUs")
        pools[name] = Pool(name, kind, cpus, source)
    return pools


def _resolve(program: str, env: Mapping[str, str], what: str) -> str:
    if "/" in program:
        if os.path.isfile(program) and os.access(program, os.X_OK):
            return program
        raise StarterError(f"{what}: {program} is not an executable file")
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise StarterError(f"{what}: {program!r} is not found in PATH={env.get('PATH', os.defpath)}")
    return found


def read_annotation_text(env: Mapping[str, str]) -> str | None:
    """The pinning annotation's value from the downward API file, None when the pod has none."""
    explicit = env.get(ENV_ANNOTATIONS_FILE)
    path = Path(explicit or ANNOTATIONS_FILE)
    if explicit is None and not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StarterError(f"cannot read the pod annotations file {path}: {exc}") from exc
    try:
        annotations = parse_downward_annotations(text)
    except DownwardFileError as exc:
        raise StarterError(f"{path}: {exc}") from exc
    return annotations.get(env.get(ENV_ANNOTATION) or annotation_key(DEFAULT_RESOURCE_BASE_NAME))


def plan_launches(
    env: Mapping[str, str], command: Sequence[str], annotation_text: str | None, allowed: CpuSet
) -> list[Launch]:
    """What to start, in order. Pure; raises StarterError for any input it cannot use."""
    key = env.get(ENV_ANNOTATION) or annotation_key(DEFAULT_RESOURCE_BASE_NAME)
    entry: ContainerSpec | None = None
    if annotation_text is not None:
        try:
            annotation = parse_annotation(annotation_text, key)
        except AnnotationError as exc:
            raise StarterError(str(exc)) from exc
        container = env.get(ENV_CONTAINER_NAME)
        if not container:
            raise StarterError(f"{ENV_CONTAINER_NAME} is not set: cannot find this container in {key}")
        entry = annotation.for_container(container)
    pools = read_pools(env, entry)

    launches: list[Launch] = []
    if entry is not None:
        next_free: dict[str, int] = {}
        for number, process in enumerate(entry.processes):
            label = f"process {number} ({process.process}) on pool {process.pool!r}"
            pool = pools.get(process.pool)
            if pool is None:
                known = ", ".join(sorted(pools)) or "none"
                raise StarterError(f"{label}: the container has no such pool ({ENV_POOLS}: {known})")
            if pool.type is PoolType.SHARED:
                cpus = pool.cpus
            else:
                start = next_free.get(pool.name, 0)
                ordered = pool.cpus.to_list()
                if start + process.cpus > len(ordered):
                    wanted = start + process.cpus
                    raise StarterError(
                        f"{label}: the processes on pool {pool.name!r} want {wanted} CPUs by now, but "
                        f"{pool.source} has {len(ordered)} ({pool.cpus.format()})"
                    )
                cpus = CpuSet(ordered[start : start + process.cpus])
                next_free[pool.name] = start + process.cpus
            executable = _resolve(process.process, env, label)
            launches.append(Launch(label, executable, (process.process, *process.args), cpus))
    else:
        if not command:
            if annotation_text is None:
                where = f"the pod has no {key} annotation"
            else:
                where = f"{key} has no entry for container {env.get(ENV_CONTAINER_NAME)!r}"
            raise StarterError(f"nothing to start: {where} and no command was given as arguments")
        cpus = CpuSet().union(*(pool.cpus for pool in pools.values()))
        if not cpus:
            raise StarterError(
                f"no pooled CPUs to run {command[0]!r} on: {ENV_POOLS} lists no pool with CPUs "
                f"(set by the webhook; the agent sets {pool_env_name('<pool>')})"
            )
        label = f"command {command[0]}"
        launches.append(Launch(label, _resolve(command[0], env, label), tuple(command), cpus))

    for launch in launches:
        outside = launch.cpus - allowed
        if outside:
            raise StarterError(
                f"{launch.label}: CPUs {outside.format()} are not available to this container "
                f"(its CPUs: {allowed.format()})"
            )
    return launches


def _grace(env: Mapping[str, str]) -> float:
    text = env.get(ENV_GRACE)
    if text is None:
        return DEFAULT_GRACE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise StarterError(f"{ENV_GRACE}={text!r} is not a number of seconds")
    return value


def _become_subreaper() -> None:
    """Orphans of our children come to us (not to an outer PID 1 that never reaps them)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("starter.no_subreaper", reason=str(exc))


class Supervisor:
    """Owns the children: starts them pinned, forwards signals, reaps, decides the exit status."""

    def __init__(self, launches: Sequence[Launch], env: Mapping[str, str], grace: float) -> None:
        self._launches = launches
        self._env = dict(env)
        self._grace = grace
        self._live: dict[int, Launch] = {}
        self._status: int | None = None
        self._deadline: float | None = None
        self._signals = {signal.SIGCHLD, *FORWARDED}

    def run(self) -> int:
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        _become_subreaper()
        try:
            self._start_all(previous_mask)
        except StarterError as exc:
            print(f"process-starter: {exc}", file=sys.stderr)
            self._status = EXIT_BAD_INPUT
            self._stop_all(signal.SIGKILL)
        self._wait()
        return self._status if self._status is not None else EXIT_OK

    def _start_all(self, child_mask: set[int | signal.Signals]) -> None:
        own = os.sched_getaffinity(0)
        # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec, so reset them for the child.
        defaults = {signal.SIGPIPE, signal.SIGXFSZ, *self._signals}
        try:
            for launch in self._launches:
                os.sched_setaffinity(0, launch.cpus)
                try:
                    pid = os.posix_spawn(
                        launch.executable, launch.argv, self._env, setsigmask=child_mask, setsigdef=defaults
                    )
                except OSError as exc:
                    raise StarterError(f"{launch.label}: cannot start {launch.executable}: {exc}") from exc
                self._live[pid] = launch
                log.info("starter.started", pid=pid, process=launch.label, cpus=launch.cpus.format())
        finally:
            os.sched_setaffinity(0, own)

    def _stop_all(self, signum: int) -> None:
        for pid in self._live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            launch = self._live.pop(pid, None)
            if launch is None:
                log.debug("starter.reaped_orphan", pid=pid)
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            status = code if code >= 0 else 128 - code
            log.info("starter.exited", pid=pid, process=launch.label, status=status)
            if status != 0 and self._status is None:
                self._status = status
                log.info("starter.stopping_others", failed=launch.label, status=status, grace_s=self._grace)
                self._stop_all(signal.SIGTERM)
                self._deadline = time.monotonic() + self._grace

    def _wait(self) -> None:
        while True:
            self._reap()
            if not self._live:
                return
            if self._deadline is None:
                info = signal.sigwaitinfo(self._signals)
            else:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    log.info("starter.killing", pids=sorted(self._live))
                    self._stop_all(signal.SIGKILL)
                    self._deadline = None
                    continue
                received = signal.sigtimedwait(self._signals, remaining)
                if received is None:
                    continue
                info = received
            if info.si_signo != signal.SIGCHLD:
                log.info(
                    "starter.forwarding", signal=signal.Signals(info.si_signo).name, pids=sorted(self._live)
                )
                self._stop_all(info.si_signo)


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    try:
        setup_logging(env.get(ENV_LOG_LEVEL, "info"))
    except ValueError:
        setup_logging("info")
    try:
        grace = _grace(env)
        allowed = CpuSet(os.sched_getaffinity(0))
        launches = plan_launches(env, command, read_annotation_text(env), allowed)
    except StarterError as exc:
        print(f"process-starter: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return Supervisor(launches, env, grace).run()


if __name__ == "__main__":
    sys.exit(main())
