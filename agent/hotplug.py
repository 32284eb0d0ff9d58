"""When the host's online CPUs may have changed, without waking up for nothing.

sysfs sends no inotify event when a CPU goes on- or offline, so the agent used to read
`/sys/devices/system/cpu/online` every 5 s: four wake-ups in 20 s of idle, about 2.3 ms of CPU (measured with
schedstat on this project's VM; a wake-up after seconds of sleep costs about 0.5 ms with cold caches). The
kernel announces every CPU going on- or offline as a uevent (`ACTION=online`/`offline`, `SUBSYSTEM=cpu`) on
the NETLINK_KOBJECT_UEVENT socket, which an unprivileged process may listen to; that is what udev hears. On a
real sysfs the agent listens there; on a test tree of plain files (the fake hosts of the tests and benchmarks)
it watches the `online` file with inotify; where neither can be had it polls as before. In every mode a
look every BACKSTOP_S covers a missed event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from agent.dirwatch import watch_directories

log = structlog.get_logger(__name__)

# A look at the online list this often even when no event came (an event lost to a full socket buffer).
BACKSTOP_S = 60.0
NETLINK_KOBJECT_UEVENT = 15
# The kernel's own uevents (udev re-broadcasts them on group 2, in its own format).
KERNEL_GROUP = 1
_CPU_ACTIONS = (b"ACTION=online", b"ACTION=offline", b"ACTION=add", b"ACTION=remove")


def cpu_dir(root: Path) -> Path:
    return root / "sys" / "devices" / "system" / "cpu"


def is_sysfs(path: Path) -> bool:
    """Whether `path` is on a sysfs mount (the host's own, or mounted under --root), from mountinfo."""
    try:
        target = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                mount_point = fields[4].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fstype = mount_point, line.split(" - ", 1)[1].split()[0]
    except OSError:
        return False
    return fstype == "sysfs"


def is_cpu_uevent(message: bytes) -> bool:
    """A kernel uevent saying a CPU went on- or offline (or was added or removed)."""
    fields = message.split(b"\0")
    return b"SUBSYSTEM=cpu" in fields and any(action in fields for action in _CPU_ACTIONS)


def _uevent_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT)
    try:
        sock.bind((0, KERNEL_GROUP))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def online_changes(root: Path, poll_s: float) -> AsyncIterator[None]:
    """Yields whenever the online CPUs under `root` may have changed; the caller reads and compares them."""
    directory = cpu_dir(root)
    if is_sysfs(directory):
        try:
            sock = _uevent_socket()
        except OSError as exc:
            log.warning("hotplug.uevents_unavailable", reason=str(exc), fallback=f"a look every {poll_s:g} s")
        else:
            async for _ in _uevents(sock):
                yield None
            return
    else:
        try:
            async for _ in _file_changes(directory):
                yield None
            return
        except OSError as exc:
            log.warning("hotplug.watch_unavailable", reason=str(exc), fallback=f"a look every {poll_s:g} s")
    while True:
        await asyncio.sleep(poll_s)
        yield None


async def _uevents(sock: socket.socket) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def drain() -> None:
        # Read every pending message now (the descriptor is level-triggered); wake only for a CPU's.
        while True:
            try:
                message = sock.recv(64 * 1024)
            except BlockingIOError:
                return
            except OSError:
                # ENOBUFS: messages were dropped, one of them may have been a CPU's.
                changed.set()
                continue
            if is_cpu_uevent(message):
                changed.set()

    loop.add_reader(sock.fileno(), drain)
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), BACKSTOP_S)
            changed.clear()
            yield None
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


async def _file_changes(directory: Path) -> AsyncIterator[None]:
    """A test tree: its `online` file is rewritten when a test takes a CPU off- or online."""
    async for _ in watch_directories(
        [directory],
        accept=lambda path: path.name == "online",
        stop=asyncio.Event(),
        quiet_s=BACKSTOP_S,
        portable_fallback=False,
    ):
        yield None
