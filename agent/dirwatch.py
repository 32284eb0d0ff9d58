"""Watching directories for changed entries, as batches of paths.

On Linux the agent reads an inotify descriptor on its own event loop: nothing runs until the kernel reports
a change, so an idle agent costs no CPU and a change is seen within milliseconds. Where inotify cannot be
used (another OS, a file system without it, the per-user watch limit reached), watchfiles does the work; its
watcher thread wakes every WATCH_STEP_MS, the price of its portability (measured at about 0.3 % of a core at
20 ms on a small VM, see docs/benchmarks.md).

The kernel's events are read the moment they arrive (the descriptor is level-triggered: left unread, it would
make the loop spin until the batch is taken), and a change the caller does not care about wakes no task.
A directory where only deletions matter for now (the kubelet's device-plugins directory while kubelet.sock
is there) is watched for deletions only, so the checkpoint the kubelet rewrites there after every allocation
wakes nothing at all.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from errno import ENOENT, ENOTDIR
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# watchfiles: groups events until none arrives for STEP ms (a change is seen after one to two steps).
WATCH_STEP_MS = 20
WATCH_DEBOUNCE_MS = 200
# inotify: after the first event, wait this long for the rest of a burst (a ConfigMap swap is five
# operations within a millisecond or two; a kubelet start deletes sockets, then creates kubelet.sock).
SETTLE_S = 0.01

# inotify(7) event bits.
_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_MASK = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
) | (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
# Only entries going away, and the directory itself: a kubelet start deletes every socket first.
_DELETIONS_MASK = _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
# Only entries appearing, and the directory itself (entry_created: an ancestor such as /run is busy).
_CREATIONS_MASK = _IN_CREATE | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows


class WatchLost(OSError):
    """A watched directory was removed or moved away: the caller must set the watch up again."""


@functools.cache
def _libc() -> ctypes.CDLL:
    # The interpreter is linked with the C library: its functions are found in the process's own symbols
    # (dlopen(NULL)). Looking the library up instead (find_library, which imports ctypes.util and runs
    # `ldconfig -p` in a child process) was 2-3 ms of the agent's start; it stays for an interpreter whose
    # symbols lack inotify. Once per process either way (the NRI plugin sets up a watch on every
    # reconnection attempt).
    own = ctypes.CDLL(None, use_errno=True)
    if hasattr(own, "inotify_init1"):
        return own
    from ctypes.util import find_library  # noqa: PLC0415

    libc_name = find_library("c")
    if libc_name is None:
        raise OSError("no C library to call inotify through")
    return ctypes.CDLL(libc_name, use_errno=True)


class _Inotify:
    """An inotify descriptor watching some directories (not their subdirectories)."""

    def __init__(self, directories: Sequence[Path]) -> None:
        libc = _libc()
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd = fd
        self._libc = libc
        self._dirs: dict[int, Path] = {}
        try:
            for directory in directories:
                self.watch(directory)
        except BaseException:
            os.close(fd)
            raise

    def watch(self, directory: Path, *, deletions_only: bool = False, creations_only: bool = False) -> None:
        """Watch `directory` (again: the kernel replaces the mask of a directory already watched)."""
        mask = _DELETIONS_MASK if deletions_only else _CREATIONS_MASK if creations_only else _MASK
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask)
        if wd < 0:
            errno = ctypes.get_errno()
            kind = WatchLost if errno in (ENOENT, ENOTDIR) else OSError
            raise kind(errno, f"cannot watch {directory}: {os.strerror(errno)}")
        self._dirs[wd] = directory

    def read(self) -> set[Path]:
        """The paths named by the pending events; every watched directory when the queue overflowed."""
        changed: set[Path] = set()
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return changed
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0")
                offset = start + length
                if mask & _IN_Q_OVERFLOW:
                    # Events were lost: anything may have changed; a directory stands for all its entries.
                    changed.update(self._dirs.values())
                    continue
                directory = self._dirs.get(wd)
                if directory is None:
                    continue
                if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
                    raise WatchLost(f"{directory} was removed or moved")
                changed.add(directory / os.fsdecode(name) if name else directory)

    def close(self) -> None:
        os.close(self.fd)


async def watch_directories(
    directories: Sequence[Path],
    *,
    accept: Callable[[Path], bool],
    stop: asyncio.Event,
    quiet_s: float,
    deletions_only: Callable[[Path], bool] | None = None,
    portable_fallback: bool = True,
) -> AsyncIterator[set[Path]]:
    """Batches of changed paths in `directories` that `accept` keeps; an empty batch after `quiet_s`
    without any (callers use it for a slow content check). A directory itself in a batch means "anything
    in it may have changed". Ends when `stop` is set; raises WatchLost when a directory goes away.

    `deletions_only(directory)`, asked before every wait, says that only entries going away matter there
    until the next batch: such a directory is watched for deletions only (inotify; watchfiles reports all).
    Without `portable_fallback`, no inotify means OSError rather than watchfiles (whose thread wakes every
    WATCH_STEP_MS: a caller that can poll seldom does better)."""
    try:
        inotify = _Inotify(directories)
    except WatchLost:
        raise
    except OSError as exc:
        if not portable_fallback:
            raise
        log.warning("watch.inotify_unavailable", reason=str(exc), fallback="watchfiles")
        async for batch in _watchfiles(directories, accept=accept, stop=stop, quiet_s=quiet_s):
            yield batch
        return
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    pending: set[Path] = set()
    lost: list[WatchLost] = []

    def drain() -> None:
        # Called by the loop whenever the descriptor is readable: read it empty now, so that it stops
        # being readable, and wake the task only for a change it wants.
        try:
            pending.update(path for path in inotify.read() if accept(path))
        except WatchLost as exc:
            lost.append(exc)
            loop.remove_reader(inotify.fd)
        if pending or lost:
            ready.set()

    loop.add_reader(inotify.fd, drain)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            if deletions_only is not None:
                for directory in directories:
                    # Everything first, then narrow: an entry created between the two calls is either
                    # reported or seen by the caller's own look at the directory.
                    inotify.watch(directory)
                    if deletions_only(directory):
                        inotify.watch(directory, deletions_only=True)
            waiting = asyncio.ensure_future(ready.wait())
            done, _ = await asyncio.wait(
                {waiting, stopping}, timeout=quiet_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                waiting.cancel()
                yield set()
                continue
            if stopping in done:
                waiting.cancel()
                return
            # The rest of a burst arrives meanwhile; drain() gathers it.
            await asyncio.sleep(SETTLE_S)
            ready.clear()
            if lost:
                raise lost[0]
            batch = set(pending)
            pending.clear()
            if batch:
                yield batch
    finally:
        stopping.cancel()
        loop.remove_reader(inotify.fd)
        inotify.close()


def _lexists(path: Path) -> bool:
    # One lstat of a local path: cheap enough for the loop, and a socket counts (Path.exists follows links).
    return os.path.lexists(path)


def _way_to(path: Path) -> tuple[Path, Path]:
    """The deepest existing directory on the way to `path`, and the entry in it that leads there."""
    directory = path.parent
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    return directory, directory / path.relative_to(directory).parts[0]


async def entry_created(path: Path, timeout_s: float, *, anew: bool = False) -> bool:
    """Wait until an entry named `path` exists, at most `timeout_s`; True when it does.

    Nothing runs meanwhile: the deepest existing directory on the way to `path` is watched for entries
    appearing, so a runtime that creates /var/run/nri and then nri.sock in it is followed down. With `anew`,
    an entry that is there already counts only once it is created again (a stale socket is replaced by
    unlink and bind); one replaced before the watch was in place is missed, so bound `timeout_s` then.
    Raises OSError when no inotify watch can be had: the caller then waits out its timeout by itself."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    present = anew
    while True:
        directory, wanted = _way_to(path)
        inotify = _Inotify([])
        try:
            try:
                inotify.watch(directory, creations_only=True)
            except WatchLost:
                continue  # the directory went away meanwhile: find the deepest one again
            # Looked at once the watch is in place: an entry made before it is seen here, one made after
            # it is reported.
            if wanted != path and _lexists(wanted):
                if not wanted.is_dir():
                    raise NotADirectoryError(ENOTDIR, f"{wanted} is not a directory, so {path} cannot appear")
                continue
            if wanted == path and not present and _lexists(path):
                return True
            seen: asyncio.Future[None] = loop.create_future()

            def drain(
                inotify: _Inotify = inotify, seen: asyncio.Future[None] = seen, wanted: Path = wanted
            ) -> None:
                try:
                    changed = inotify.read()
                except WatchLost:
                    changed = {wanted}  # the directory went: look again from the top
                if wanted in changed and not seen.done():
                    seen.set_result(None)

            loop.add_reader(inotify.fd, drain)
            try:
                await asyncio.wait_for(seen, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return False
            finally:
                loop.remove_reader(inotify.fd)
            if wanted == path and _lexists(path):
                return True
            present = False  # a directory on the way appeared (or went): follow it
        finally:
            inotify.close()


async def _watchfiles(
    directories: Sequence[Path],
    *,
    accept: Callable[[Path], bool],
    stop: asyncio.Event,
    quiet_s: float,
) -> AsyncIterator[set[Path]]:
    # Loaded only here: the fallback's Rust extension costs start-up time and memory the inotify path skips.
    import watchfiles  # noqa: PLC0415

    async for changes in watchfiles.awatch(
        *directories,
        watch_filter=lambda _change, path: accept(Path(path)),
        step=WATCH_STEP_MS,
        debounce=WATCH_DEBOUNCE_MS,
        stop_event=stop,
        rust_timeout=int(quiet_s * 1000),
        yield_on_timeout=True,
        recursive=False,
        ignore_permission_denied=True,
    ):
        yield {Path(path) for _, path in changes}
