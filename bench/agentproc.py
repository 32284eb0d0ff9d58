"""The real `cpupool agent` as a separate process, as it runs on a node, with its /proc figures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pycache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cpupool" / "bench-pycache"


_ROOT = Path(__file__).resolve().parents[1]


def agent_environment() -> dict[str, str]:
    """The agent's environment: this one, with compiled bytecode kept (outside the repository).

    A node runs the agent from an image whose pip install compiled every module; a development shell often
    sets PYTHONDONTWRITEBYTECODE, which would make every start compile the agent's sources again (a third
    of its start-up on this VM). The first start fills the cache; the benchmarks time later ones."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(_pycache())
    return env


def free_port() -> int:
    """A loopback TCP port free now (the agent binds it a moment later; nothing else here takes ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AgentExitedError(RuntimeError):
    """The agent process ended while the benchmark still needed it; the message points at its log."""


def proc_status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {field}")


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of `pid`: how often it woke up."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            lines = (task / "status").read_text().splitlines()
        except OSError:
            continue  # the thread ended meanwhile
        for line in lines:
            if "ctxt_switches:" in line:
                total += int(line.split()[1])
    return total


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of `pid` so far, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields are counted after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of the file, 12 and 13 after pid, comm and state are cut.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class AgentProcess:
    """Owns one `python -m agent.cli agent` process and its log file; stop() ends it with SIGTERM."""

    def __init__(
        self, *, root: Path, plugin_dir: Path, config: Path, pod_resources: Path, log_path: Path
    ) -> None:
        self.log_path = log_path
        self.argv = [
            sys.executable, "-m", "agent.cli", "agent",
            "--root", str(root),
            "--plugin-dir", str(plugin_dir),
            "--config", str(config),
            "--pod-resources-socket", str(pod_resources),
            "--state-dir", str(log_path.parent / "state"),
            # As on a node, the health port is served (its HTTP server is part of the agent's memory).
            "--health-port", str(free_port()),
            "--health-host", "127.0.0.1",
            "--no-pin-self",
            "--log-format", "json",
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None
        # The status stop() collected: 0 after a clean SIGTERM shutdown.
        self.exit_status: int | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise AgentExitedError("the agent was not started")
        return self._proc.pid

    def start(self) -> None:
        with self.log_path.open("wb") as log_file:
            # From this tree's root: `-m agent.cli` imports the agent of the directory it starts in, and a
            # benchmark of another checkout (a worktree, for a before/after) must run that checkout's agent.
            self._proc = subprocess.Popen(
                self.argv, stdout=log_file, stderr=subprocess.STDOUT, env=agent_environment(), cwd=_ROOT
            )
        log.info("agent_process.started", pid=self._proc.pid, log=str(self.log_path))

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise AgentExitedError(
                f"the agent exited with status {self._proc.returncode}; see {self.log_path}"
            )

    def rss_kib(self) -> int:
        self.check_alive()
        return proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        self.check_alive()
        return proc_status_kib(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        self.check_alive()
        return proc_cpu_seconds(self.pid)

    def wakeups(self) -> int:
        self.check_alive()
        return context_switches(self.pid)

    def threads(self) -> int:
        self.check_alive()
        return len(list(Path(f"/proc/{self.pid}/task").iterdir()))

    def log_events(self) -> list[tuple[float, str]]:
        """(time.monotonic() equivalent, event) of every JSON log line so far, to break a latency down.

        The log stamps wall-clock time; both clocks advance together on one machine over a benchmark."""
        offset = time.time() - time.monotonic()
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["timestamp"]).timestamp() - offset
            except (ValueError, KeyError, TypeError):
                continue
            events.append((at, str(entry.get("event", ""))))
        return events

    async def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then wait; a process that does not stop in time is killed (and says so)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                log.error("agent_process.kill", pid=proc.pid, reason=f"no exit {timeout_s:g}s after SIGTERM")
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self.exit_status = proc.returncode
        return proc.returncode

    async def __aenter__(self) -> AgentProcess:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
