"""Directory watching: inotify on the event loop, and the watchfiles fallback, give the same batches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent import dirwatch
from tests.harness import ConfigMapDir


@pytest.fixture(params=["inotify", "watchfiles"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "watchfiles":

        def unavailable(_directories: object) -> None:
            raise OSError(38, "inotify is not available here")

        monkeypatch.setattr(dirwatch, "_Inotify", unavailable)
    return str(request.param)


@contextlib.asynccontextmanager
async def watching(directories: list[Path], quiet_s: float = 30.0) -> AsyncIterator[asyncio.Queue[set[Path]]]:
    batches: asyncio.Queue[set[Path]] = asyncio.Queue()
    stop = asyncio.Event()

    async def run() -> None:
        async for batch in dirwatch.watch_directories(
            directories, accept=lambda p: not p.name.endswith(".ignored"), stop=stop, quiet_s=quiet_s
        ):
            await batches.put(batch)

    task = asyncio.create_task(run())
    await asyncio.sleep(0.2)  # the watch is set up (watchfiles starts a thread)
    try:
        yield batches
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def collect(batches: asyncio.Queue[set[Path]], until: Path) -> set[Path]:
    seen: set[Path] = set()
    while until not in seen:
        seen |= await asyncio.wait_for(batches.get(), 5)
    return seen


async def test_configmap_swap_is_seen_in_the_directory(tmp_path: Path, backend: str) -> None:
    configmap = ConfigMapDir(tmp_path / "cfg")
    configmap.write("a: 1\n")
    async with watching([configmap.path]) as batches:
        configmap.write("a: 2\n")
        seen = await collect(batches, configmap.path / "..data")
        assert all(p.parent == configmap.path for p in seen)


async def test_two_directories_and_the_filter(tmp_path: Path, backend: str) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    async with watching([first, second]) as batches:
        (first / "x.ignored").write_text("")
        (second / "kubelet.sock").write_text("")
        seen = await collect(batches, second / "kubelet.sock")
        assert first / "x.ignored" not in seen
        (first / "kubelet.sock").write_text("")
        (first / "kubelet.sock").unlink()
        assert first / "kubelet.sock" in await collect(batches, first / "kubelet.sock")


async def test_quiet_period_yields_an_empty_batch(tmp_path: Path, backend: str) -> None:
    async with watching([tmp_path], quiet_s=0.3) as batches:
        assert await asyncio.wait_for(batches.get(), 5) == set()


async def test_removed_directory_is_reported(tmp_path: Path) -> None:
    watched = tmp_path / "gone"
    watched.mkdir()
    stop = asyncio.Event()

    async def run() -> None:
        async for _ in dirwatch.watch_directories([watched], accept=lambda p: True, stop=stop, quiet_s=30):
            pass

    task = asyncio.create_task(run())
    await asyncio.sleep(0.05)
    watched.rmdir()
    with pytest.raises(dirwatch.WatchLost):
        await asyncio.wait_for(task, 5)


async def test_missing_directory_is_reported_not_degraded(tmp_path: Path) -> None:
    with pytest.raises(dirwatch.WatchLost):
        async for _ in dirwatch.watch_directories(
            [tmp_path / "absent"], accept=lambda p: True, stop=asyncio.Event(), quiet_s=30
        ):
            pass


async def test_deletions_only_directory_ignores_creations_until_its_socket_goes(tmp_path: Path) -> None:
    """The plugin directory while kubelet.sock is there: the kubelet's checkpoint rewrites (a temporary file
    created, then renamed over the checkpoint) reach no one; a deleted socket does, and after it the
    directory is watched whole again, so the new kubelet.sock is seen."""
    plugins = tmp_path / "device-plugins"
    plugins.mkdir()
    kubelet_sock = plugins / "kubelet.sock"
    kubelet_sock.write_text("")
    batches: asyncio.Queue[set[Path]] = asyncio.Queue()
    stop = asyncio.Event()
    deletions_only_asked: list[Path] = []

    def deletions_only(directory: Path) -> bool:
        deletions_only_asked.append(directory)
        return kubelet_sock.exists()

    async def run() -> None:
        async for batch in dirwatch.watch_directories(
            [plugins], accept=lambda p: True, stop=stop, quiet_s=30, deletions_only=deletions_only
        ):
            await batches.put(batch)

    task = asyncio.create_task(run())
    await asyncio.sleep(0.1)
    try:
        for _ in range(3):
            tmp = plugins / ".kubelet_internal_checkpoint123"
            tmp.write_text("{}")
            tmp.rename(plugins / "kubelet_internal_checkpoint")
        await asyncio.sleep(0.2)
        assert batches.empty(), "a checkpoint rewrite was reported in a deletions-only directory"
        kubelet_sock.unlink()
        assert await collect(batches, kubelet_sock) == {kubelet_sock}
        kubelet_sock.write_text("")
        assert kubelet_sock in await collect(batches, kubelet_sock)
        assert deletions_only_asked and set(deletions_only_asked) == {plugins}
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_entry_created_follows_directories_that_do_not_exist_yet(tmp_path: Path) -> None:
    # As a runtime that turns NRI on: /var/run/nri is made first, then nri.sock in it.
    socket = tmp_path / "run" / "nri" / "nri.sock"
    waiting = asyncio.create_task(dirwatch.entry_created(socket, timeout_s=30))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "unrelated").write_text("")
    (tmp_path / "run" / "nri").mkdir()
    await asyncio.sleep(0.05)
    assert not waiting.done()
    socket.write_text("")
    assert await waiting is True


async def test_entry_created_waits_for_a_present_entry_to_be_made_anew(tmp_path: Path) -> None:
    stale = tmp_path / "nri.sock"
    stale.write_text("")
    # Without `anew` it is there, which is all that is asked.
    assert await dirwatch.entry_created(stale, timeout_s=30) is True
    assert await dirwatch.entry_created(stale, timeout_s=0.05, anew=True) is False
    waiting = asyncio.create_task(dirwatch.entry_created(stale, timeout_s=30, anew=True))
    await asyncio.sleep(0.05)
    stale.unlink()
    await asyncio.sleep(0.05)
    assert not waiting.done()
    stale.write_text("")
    assert await waiting is True


async def test_entry_created_refuses_a_way_blocked_by_a_file(tmp_path: Path) -> None:
    (tmp_path / "nri").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        await dirwatch.entry_created(tmp_path / "nri" / "nri.sock", timeout_s=30)
