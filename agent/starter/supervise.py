"""The starter's children: started pinned, signalled, reaped; the exit status.

Pinning: posix_spawn has no affinity attribute, so the starter sets its own affinity to the child's CPUs
just before each spawn (the child inherits it across exec) and restores it after. The starter is single
threaded and its signals are blocked at that point, so nothing else can run on the borrowed mask. A CPU
the kernel refuses (outside the container's cpuset) stops everything: the children already started are
stopped and the starter exits 2 with the reason, instead of running anything where it does not belong.

Signals: every signal a process can be sent is blocked and taken with sigwaitinfo, the way an init must
(a PID 1 without a handler would drop SIGTERM from the runtime, and SIGQUIT, nginx's stop signal, alike).
Each one goes on to every child, and to the child's process group when the child made one (a shell or a
server that leads its own group of workers). Left alone: SIGKILL and SIGSTOP (they cannot be caught), the
fault signals (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS: they concern the starter itself), and
SIGPIPE and SIGXFSZ (the starter's own writes can raise them).

Exit: every zombie is reaped, including orphans re-parented to the starter (it is a child subreaper even
when not PID 1). The first child to fail sets the exit status (its code, or 128 + signal) and the others
get SIGTERM, then SIGKILL after a grace period; when all succeed the starter exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence

from agent.cpuset import CpuSet
from agent.starter import log
from agent.starter.plan import Launch, StarterError

EXIT_OK = 0
EXIT_BAD_INPUT = 2
_PR_SET_CHILD_SUBREAPER = 36

_NOT_FORWARDED = {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGCHLD,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGPIPE,
    signal.SIGXFSZ,
}
FORWARDED: frozenset[int] = frozenset(int(s) for s in signal.valid_signals() if s not in _NOT_FORWARDED)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        # Real-time signals have no name of their own.
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


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
        self._signals = {int(signal.SIGCHLD), *FORWARDED}

    def run(self) -> int:
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        _become_subreaper()
        try:
            self._start_all(previous_mask)
        except StarterError as exc:
            print(f"process-starter: {exc}", file=sys.stderr, flush=True)
            self._status = EXIT_BAD_INPUT
            if self._live:
                log.info("starter.stopping_others", reason="start failed", grace_s=self._grace)
                self._begin_stop()
        self._wait()
        return self._status if self._status is not None else EXIT_OK

    def _start_all(self, child_mask: set[int | signal.Signals]) -> None:
        own = os.sched_getaffinity(0)
        # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec, so reset them for the child.
        defaults = {signal.SIGPIPE, signal.SIGXFSZ, *self._signals}
        try:
            for launch in self._launches:
                try:
                    os.sched_setaffinity(0, launch.cpus)
                except OSError as exc:
                    allowed = CpuSet(os.sched_getaffinity(0))
                    raise StarterError(
                        f"{launch.label}: cannot pin to CPUs {launch.cpus.format()} ({exc.strerror}); this "
                        f"container may run on CPUs {allowed.format()} only. Stopping what was started."
                    ) from exc
                try:
                    pid = os.posix_spawn(
                        launch.executable, launch.argv, self._env, setsigmask=child_mask, setsigdef=defaults
                    )
                except OSError as exc:
                    raise StarterError(f"{launch.label}: cannot start {launch.executable}: {exc}") from exc
                self._live[pid] = launch
                log.info("starter.started", pid=pid, process=launch.label, cpus=launch.cpus.format())
        finally:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, own)

    def _signal_all(self, signum: int) -> None:
        own_group = os.getpgrp()
        for pid in self._live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group == pid and group != own_group:
                    # The child leads a process group of its own: its workers there get the signal too.
                    os.killpg(group, signum)
                else:
                    os.kill(pid, signum)

    def _begin_stop(self) -> None:
        self._signal_all(signal.SIGTERM)
        self._deadline = time.monotonic() + self._grace

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
                self._begin_stop()

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
                    self._signal_all(signal.SIGKILL)
                    self._deadline = None
                    continue
                received = signal.sigtimedwait(self._signals, remaining)
                if received is None:
                    continue
                info = received
            if info.si_signo != signal.SIGCHLD:
                log.info("starter.forwarding", signal=signal_name(info.si_signo), pids=sorted(self._live))
                self._signal_all(info.si_signo)
