"""Hotplug: the agent hears of CPUs going on- or offline from the kernel (or a test tree), not a poll."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent import hotplug

CPU5_OFFLINE = (
    b"offline@/devices/system/cpu/cpu5\0ACTION=offline\0DEVPATH=/devices/system/cpu/cpu5\0"
    b"SUBSYSTEM=cpu\0SEQNUM=4242\0"
)
VETH_ADD = b"add@/devices/virtual/net/veth1\0ACTION=add\0DEVPATH=/devices/virtual/net/veth1\0SUBSYSTEM=net\0"


def test_only_a_cpus_uevent_counts() -> None:
    assert hotplug.is_cpu_uevent(CPU5_OFFLINE)
    assert hotplug.is_cpu_uevent(CPU5_OFFLINE.replace(b"ACTION=offline", b"ACTION=online"))
    # A pod's network device coming and going is no reason to look.
    assert not hotplug.is_cpu_uevent(VETH_ADD)
    assert not hotplug.is_cpu_uevent(CPU5_OFFLINE.replace(b"ACTION=offline", b"ACTION=change"))


def test_a_test_tree_is_not_sysfs(tmp_path: Path) -> None:
    assert not hotplug.is_sysfs(tmp_path)
    if Path("/sys/devices/system/cpu/online").exists():
        assert hotplug.is_sysfs(Path("/sys/devices/system/cpu"))


async def first(changes: AsyncIterator[None]) -> asyncio.Task[None]:
    async def take() -> None:
        await anext(changes)

    task = asyncio.create_task(take())
    await asyncio.sleep(0.05)
    return task


async def test_on_a_test_tree_the_online_file_is_watched(tmp_path: Path) -> None:
    cpus = hotplug.cpu_dir(tmp_path)
    cpus.mkdir(parents=True)
    (cpus / "online").write_text("0-7\n")
    changes = hotplug.online_changes(tmp_path, poll_s=3600)
    waiting = await first(changes)
    (cpus / "possible").write_text("0-7\n")
    await asyncio.sleep(0.05)
    assert not waiting.done()
    (cpus / "online").write_text("0-4,6-7\n")
    await asyncio.wait_for(waiting, 10)
    await changes.aclose()


async def test_uevents_wake_only_for_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    changes = hotplug._uevents(ours)
    waiting = await first(changes)
    kernel.send(VETH_ADD)
    await asyncio.sleep(0.05)
    assert not waiting.done()
    kernel.send(CPU5_OFFLINE)
    await asyncio.wait_for(waiting, 10)
    await changes.aclose()
    kernel.close()


def test_the_kernels_uevent_socket_can_be_opened_unprivileged_here() -> None:
    try:
        sock = hotplug._uevent_socket()
    except OSError as exc:
        pytest.skip(f"no NETLINK_KOBJECT_UEVENT socket here ({exc}); the agent polls instead")
    sock.close()


async def test_without_a_watch_it_polls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def unavailable(_directory: Path) -> AsyncIterator[None]:
        raise OSError(38, "inotify is not available here")
        yield  # pragma: no cover - makes this an async generator

    monkeypatch.setattr(hotplug, "_file_changes", unavailable)
    changes = hotplug.online_changes(tmp_path, poll_s=0.01)
    await asyncio.wait_for(anext(changes), 10)
    await asyncio.wait_for(anext(changes), 10)
    await changes.aclose()
