"""Drives tests/nripeer: the runtime side of upstream NRI (pkg/adaptation) with a fake runtime behind it.

The Go program is built once per machine by scripts/build-go-peer.sh (cached outside the repository); where
`go` is missing, `peer_binary()` says so and the NRI tests skip with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_built: list[Path] = []


class PeerUnavailable(Exception):
    """The Go peer cannot be built here; the message is the skip reason."""


def peer_binary() -> Path:
    if _built:
        return _built[0]
    if shutil.which("go") is None:
        raise PeerUnavailable("go is not installed: the NRI runtime peer (tests/nripeer) cannot be built")
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-go-peer.sh"), str(REPO / "tests" / "nripeer")],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building tests/nripeer failed:\n{done.stderr}")
    _built.append(Path(done.stdout.strip()))
    return _built[0]


class PeerError(Exception):
    """The peer answered a command with an error (from CreateContainer: the runtime fails the container)."""


class NriRuntime:
    """One nripeer process; `async with NriRuntime(socket) as rt:` starts it (the runtime not yet started)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> NriRuntime:
        self._proc = await asyncio.create_subprocess_exec(
            str(peer_binary()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=16 << 20,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            message = json.loads(line)
            if "event" in message:
                async with self._changed:
                    self.events.append(message)
                    self._changed.notify_all()
                continue
            future = self._waiting.pop(message.get("id", 0), None)
            if future is not None and not future.done():
                future.set_result(message)

    async def command(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        async with self._lock:
            self._proc.stdin.write(json.dumps({"id": ident, "op": op, **fields}).encode() + b"\n")
            await self._proc.stdin.drain()
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise PeerError(f"{op}: {reply['error']}")
        return reply

    async def wait_event(self, kind: str, after: int = 0, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The first event of `kind` at index >= after."""

        def find() -> dict[str, Any] | None:
            return next((e for e in self.events[after:] if e["event"] == kind), None)

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: find() is not None)
        found = find()
        assert found is not None
        return found

    # --- the runtime's operations

    async def start(self) -> None:
        await self.command("start", socket=str(self.socket))

    async def stop(self) -> None:
        await self.command("stop")

    async def wait_plugin(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        await self.command("wait_plugins", count=1, timeout_ms=int(timeout * 1000))

    async def run_pod(self, pod_id: str, name: str, namespace: str = "default", **extra: Any) -> None:
        await self.command(
            "run_pod", pod=pod_id, name=name, namespace=namespace, uid=f"uid-{pod_id}", **extra
        )

    async def create(
        self, pod_id: str, container_id: str, name: str = "main", **extra: Any
    ) -> dict[str, Any]:
        return await self.command("create", pod=pod_id, container=container_id, name=name, **extra)

    async def update(self, container_id: str, cpus: str, mems: str = "") -> dict[str, Any]:
        return await self.command("update", container=container_id, cpus=cpus, mems=mems)

    async def remove(self, container_id: str) -> None:
        await self.command("stop_container", container=container_id)
        await self.command("remove_container", container=container_id)

    async def cpusets(self) -> dict[str, str]:
        reply = await self.command("state")
        return {c["id"]: c["cpus"] for c in reply["containers"]}
