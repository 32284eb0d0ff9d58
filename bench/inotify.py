"""When a file appears in a directory, to the event: inotify read on the event loop, stamped on arrival.

The agent learns of a kubelet restart from `kubelet.sock` being created; timing re-registration from that
moment needs the creation time, which neither the emulator nor the agent records.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
import time
from pathlib import Path
from types import TracebackType

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length

_libc = ctypes.CDLL(None, use_errno=True)


class CreationWatch:
    """Records time.monotonic() of every file created in (or moved into) one directory, by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd = -1
        self._created: dict[str, list[float]] = {}
        self._changed = asyncio.Event()

    def open(self) -> None:
        fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if _libc.inotify_add_watch(fd, os.fsencode(self.directory), IN_CREATE | IN_MOVED_TO) < 0:
            errno = ctypes.get_errno()
            os.close(fd)
            raise OSError(errno, f"cannot watch {self.directory}")
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._read)

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _read(self) -> None:
        at = time.monotonic()
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            _, _, _, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            name = data[start : start + length].rstrip(b"\0").decode(errors="replace")
            self._created.setdefault(name, []).append(at)
            offset = start + length
        self._changed.set()

    async def created_after(self, name: str, since: float, timeout_s: float = 10.0) -> float:
        """The first creation of `name` at or after the monotonic time `since`."""
        async with asyncio.timeout(timeout_s):
            while True:
                self._changed.clear()
                for at in self._created.get(name, ()):
                    if at >= since:
                        return at
                await self._changed.wait()

    async def __aenter__(self) -> CreationWatch:
        self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
