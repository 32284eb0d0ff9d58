"""The kubelet's own device manager and PodResources server as a test peer (tests/kubeletpeer, Go).

`KubeletPeer` runs the peer binary and mirrors `tests.emulator.KubeletEmulator` closely enough that a test
can take either: waiting for registrations and device lists, admitting containers, removing pods, restarts,
PodResources. What the kubelet decides (which devices, health, node status) comes from the real code; the
driver only translates. Typical use::

    async with KubeletPeer(plugin_dir, pod_resources_socket=sock) as kubelet:
        await kubelet.wait_devices("cpupool.io/fast")
        result = await kubelet.allocate("cpupool.io/fast", 2, pod="web")
        await kubelet.remove_pod("web")

The peer writes one JSON object per line: replies to commands (with the command's id) and events (its log
lines, and a "state" snapshot of the device manager after each change). The driver keeps the latest state,
so `resource()` and friends are synchronous like the emulator's; waiters wake on every line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog

from tests.emulator.model import (
    HEALTHY,
    AllocationError,
    AllocationResult,
    DeviceInfo,
    DeviceSpec,
    EmulatorError,
    ListAndWatchRecord,
    Mount,
    NodeStatus,
    NotRegisteredError,
    PluginOptions,
    RegistrationRecord,
    ResourceSnapshot,
    StreamEndRecord,
)

from .build import find_or_build

log = structlog.get_logger(__name__)
T = TypeVar("T")

KUBELET_SOCKET = "kubelet.sock"
_LINE_LIMIT = 256 * 1024 * 1024
"""State snapshots list every device; a 200,000-device pool makes lines of some megabytes."""
_RECHECK_INTERVAL = 0.1
_START_TIMEOUT = 30.0
UNHEALTHY = "Unhealthy"
_STDERR_LINES = 200

# Log messages of the kubelet's device manager (k8s.io/kubernetes v1.37, plugin/v1beta1 and manager.go)
# that the driver turns into records. If a release rewords them, the record lists stay empty and the
# tests that use them fail loudly instead of passing on nothing.
_MSG_REGISTER = "Got registration request from device plugin with resource"
_MSG_BAD_REGISTER = "Bad registration request from device plugin"
_MSG_CONNECTED = "Connected to new client"
_MSG_CONNECT_FAILED = "Failed to connect to new client"
_MSG_PROCESSED = "Processed device updates for resource"
_MSG_STREAM_ENDED = "ListAndWatch ended unexpectedly for device plugin"
_UNREGISTERED = ("cannot allocate unregistered device", "is not a device plugin resource")
"""Admission errors meaning the kubelet has no plugin for the resource (the emulator's NotRegisteredError)."""


class PeerError(EmulatorError):
    """The peer process failed: it died, did not start, or answered a command with an error."""


@dataclass(frozen=True)
class EndpointInfo:
    """One endpoint as the device manager holds it (`endpoints` / `endpointStore`)."""

    socket: str
    """The plugin socket's file name ("" for the stopped placeholder the kubelet creates at start)."""
    stopped: bool
    stopped_for_s: float
    options: PluginOptions | None


@dataclass(frozen=True)
class PeerResource:
    """The device manager's raw view of one resource name."""

    name: str
    devices: tuple[DeviceInfo, ...]
    """Healthy and unhealthy devices as the kubelet counts them (health from its sets, not the plugin's)."""
    reported_health: Mapping[str, str]
    """Health as the plugin last reported it (differs once the kubelet marks the whole resource unhealthy)."""
    in_use: frozenset[str]
    endpoint: EndpointInfo | None
    """m.endpoints[name]: the endpoint used for Allocate and for the node-status grace period."""
    endpoints: tuple[EndpointInfo, ...]
    """m.endpointStore[name]: every connected endpoint for the name."""
    clients: tuple[str, ...]
    """Socket names of the registration server's clients for the name (streams it still watches)."""


@dataclass(frozen=True)
class TopologyHint:
    numa_nodes: tuple[int, ...] | None
    preferred: bool


def _natural(device_id: str) -> tuple[int, int | str]:
    return (0, int(device_id)) if device_id.isdigit() else (1, device_id)


def _options(view: Mapping[str, Any] | None) -> PluginOptions | None:
    if not view or not view.get("has_options"):
        return None
    return PluginOptions(
        pre_start_required=bool(view.get("pre_start_required")),
        get_preferred_allocation_available=bool(view.get("get_preferred_allocation_available")),
    )


def _endpoint(view: Mapping[str, Any]) -> EndpointInfo:
    return EndpointInfo(
        socket=view.get("socket", ""),
        stopped=bool(view.get("stopped")),
        stopped_for_s=float(view.get("stopped_for_s", 0.0)),
        options=_options(view),
    )


def _peer_resource(name: str, view: Mapping[str, Any]) -> PeerResource:
    numa: dict[str, list[int]] = {}
    for node, members in (view.get("numa") or {}).items():
        for device_id in members:
            numa.setdefault(device_id, []).append(int(node))
    health = dict.fromkeys(view.get("healthy") or (), HEALTHY)
    health.update(dict.fromkeys(view.get("unhealthy") or (), UNHEALTHY))
    devices = tuple(
        DeviceInfo(
            id=device_id,
            health=health[device_id],
            numa_nodes=tuple(sorted(numa[device_id])) if device_id in numa else None,
        )
        for device_id in sorted(health, key=_natural)
    )
    reported = view.get("reported_health") or {}
    endpoint = view.get("endpoint")
    return PeerResource(
        name=name,
        devices=devices,
        reported_health={d: reported.get(d, HEALTHY) for d in health},
        in_use=frozenset(view.get("in_use") or ()),
        endpoint=_endpoint(endpoint) if endpoint else None,
        endpoints=tuple(_endpoint(e) for e in view.get("endpoints") or ()),
        clients=tuple(view.get("clients") or ()),
    )


class KubeletPeer:
    """The real kubelet device manager (tests/kubeletpeer) behind the emulator's interface.

    `plugin_dir` is served as the kubelet's device-plugins directory (kubelet.sock and the checkpoint live
    there); the PodResources socket defaults to `<plugin_dir>/../pod-resources/kubelet.sock`; the peer's own
    pod list and node status (what the kubelet would learn from the API server) default to
    `<plugin_dir>/../kubelet-peer-state.json`. All of it survives `restart()`.
    """

    def __init__(
        self,
        plugin_dir: Path | str,
        pod_resources_socket: Path | str | None = None,
        *,
        binary: Path | str | None = None,
        state_file: Path | str | None = None,
        numa_nodes: Sequence[int] = (0, 1),
        autostart: bool = True,
        rpc_timeout: float = 30.0,
    ) -> None:
        self.plugin_dir = Path(plugin_dir).absolute()
        self.socket_path = self.plugin_dir / KUBELET_SOCKET
        self.pod_resources_socket = (
            Path(pod_resources_socket).absolute()
            if pod_resources_socket
            else self.plugin_dir.parent / "pod-resources" / "kubelet.sock"
        )
        self.state_file = (
            Path(state_file).absolute() if state_file else self.plugin_dir.parent / "kubelet-peer-state.json"
        )
        self.numa_nodes = tuple(numa_nodes)
        self.rpc_timeout = rpc_timeout
        self._binary = Path(binary) if binary is not None else None
        self._autostart = autostart
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stderr_reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._pod_numbers = itertools.count(1)
        self._uids: dict[tuple[str, str], str] = {}
        self._state: dict[str, Any] = {"resources": {}, "pods": []}
        self._state_error: str | None = None
        # "state" events received so far: the peer's own snapshots, taken after every reply and log line.
        self.state_events = 0
        self._unapplied: list[dict[str, Any]] = []
        self._kill_on: str | None = None
        self._waiters: set[asyncio.Event] = set()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._admission = asyncio.Lock()
        self._lifecycle = asyncio.Lock()
        # Records derived from the kubelet's log lines.
        self._pending: dict[str, list[float]] = {}
        self._lists_received: dict[str, int] = {}
        self._registrations: list[RegistrationRecord] = []
        self._lists: list[ListAndWatchRecord] = []
        self._stream_ends: list[StreamEndRecord] = []
        self.log_lines: list[dict[str, Any]] = []
        """Every log event of the peer (msg, kv, error, level, t): assertions on the kubelet's own words."""
        self.starts = 0

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> KubeletPeer:
        if self._autostart:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def serving(self) -> bool:
        """True while the peer process runs and has started its registration server."""
        return self._proc is not None and self._proc.returncode is None and self._ready_seen

    @property
    def _ready_seen(self) -> bool:
        return self._ready is not None and self._ready.done() and not self._ready.exception()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the peer: like a kubelet start it deletes every socket in the plugin dir, reads its
        checkpoint, and serves kubelet.sock and PodResources."""
        async with self._lifecycle:
            await self._start()

    async def _start(self) -> None:
        if self._proc is not None:
            raise PeerError(f"the kubelet peer already runs (pid {self._proc.pid})")
        binary = self._binary or await asyncio.to_thread(find_or_build)
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self._stderr.clear()
        # Register calls the previous process logged but never answered died with it.
        self._pending.clear()
        self._lists_received.clear()
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._proc = await asyncio.create_subprocess_exec(
            str(binary),
            "--plugin-dir",
            str(self.plugin_dir),
            "--pod-resources",
            str(self.pod_resources_socket),
            "--state",
            str(self.state_file),
            "--numa-nodes",
            ",".join(str(n) for n in self.numa_nodes),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        proc = self._proc
        self._reader = asyncio.create_task(self._read_stdout(proc), name="kubelet-peer-stdout")
        self._stderr_reader = asyncio.create_task(self._read_stderr(proc), name="kubelet-peer-stderr")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), _START_TIMEOUT)
        except (TimeoutError, PeerError) as exc:
            await self._stop(graceful=False)
            raise PeerError(f"the kubelet peer did not start: {exc}\n{self._stderr_tail()}") from None
        self.starts += 1
        with contextlib.suppress(PeerError):  # killed on purpose already (kill_on_log)
            await self.refresh()
        # Pods the state file brought back (another driver may have admitted them) keep their UIDs.
        for pod in self._state.get("pods") or ():
            self._uids.setdefault((pod["namespace"], pod["name"]), pod["uid"])
        log.info("kubelet_peer.started", pid=proc.pid, plugin_dir=str(self.plugin_dir))

    async def stop(self, *, graceful: bool = False) -> None:
        """Stop the peer. By default it is killed, as a kubelet that exits or crashes: its connections drop
        and kubelet.sock stays behind. `graceful` runs the device manager's Stop first (it disconnects every
        plugin client, which marks their resources unhealthy, and removes kubelet.sock)."""
        async with self._lifecycle:
            await self._stop(graceful=graceful)

    async def _stop(self, *, graceful: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            if graceful:
                with contextlib.suppress(PeerError, TimeoutError):
                    await self._command({"op": "quit"}, timeout=10.0)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    # The wrapper process dies and takes the namespaced child with it (PR_SET_PDEATHSIG).
                    os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
        for task in (self._reader, self._stderr_reader):
            if task is not None:
                # stdout closes once the namespaced child is gone too; do not wait on a stuck pipe forever.
                try:
                    await asyncio.wait_for(asyncio.shield(task), 10.0)
                except TimeoutError:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if proc.stdin is not None:
            proc.stdin.close()
        self._proc = self._reader = self._stderr_reader = None
        self._fail_pending(PeerError("the kubelet peer stopped"))
        self._changed()
        log.info("kubelet_peer.stopped", pid=proc.pid, returncode=proc.returncode)

    def kill_on_log(self, message: str | None) -> None:
        """Kill the peer (SIGKILL) the moment it logs `message`, once: a kubelet that dies in the middle of
        something, for example "Got registration request from device plugin with resource" while the plugin
        waits for its Register answer. None cancels. `stop()` or `restart()` cleans up afterwards."""
        self._kill_on = message

    def _kill_now(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            log.info("kubelet_peer.killed", pid=proc.pid)

    async def restart(self, downtime: float = 0.0, *, graceful: bool = False) -> None:
        """Stop and start again on the same directories: the device manager re-reads its checkpoint (pods
        keep their devices), deletes every socket in the plugin dir and waits for plugins to register."""
        async with self._lifecycle:
            await self._stop(graceful=graceful)
            if downtime > 0:
                await asyncio.sleep(downtime)
            await self._start()
        log.info("kubelet_peer.restarted", plugin_dir=str(self.plugin_dir))

    # -- the pipe -----------------------------------------------------------------------------------------

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                self._stderr.append(f"(stdout, not JSON) {line[:500]!r}")
                continue
            self._dispatch(message)
        for line in self._unapplied:
            self._on_log(line)
        self._unapplied = []
        error = PeerError(f"the kubelet peer exited (status {proc.returncode})\n{self._stderr_tail()}")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: start() reports it
        self._fail_pending(error)
        self._changed()

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            self._stderr.append(line.decode(errors="replace").rstrip())

    def _stderr_tail(self) -> str:
        return "peer stderr:\n  " + "\n  ".join(self._stderr) if self._stderr else "peer stderr: (empty)"

    def _fail_pending(self, error: Exception) -> None:
        replies, self._replies = self._replies, {}
        for future in replies.values():
            if not future.done():
                future.set_exception(error)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message and "event" not in message:
            future = self._replies.pop(int(message["id"]), None)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            kind = message.get("event")
            if kind == "state":
                self.state_events += 1
                self._set_state(message)
            elif kind == "state_error":
                self._state_error = str(message.get("error"))
            elif kind == "log":
                self.log_lines.append(message)
                self._unapplied.append(message)
                if self._kill_on is not None and message.get("msg") == self._kill_on:
                    self._kill_on = None
                    self._kill_now()
            elif kind == "ready" and self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
            elif kind == "fatal":
                self._stderr.append(f"fatal: {message.get('error')}")
        self._changed()

    def _set_state(self, state: dict[str, Any]) -> None:
        """Take a snapshot and the log lines it covers: records and counters derived from a log line appear
        together with the state that line reported, never before it."""
        self._state = state
        self._state_error = None
        covered = int(state.get("log_seq", 0))
        pending, self._unapplied = self._unapplied, []
        for line in pending:
            if int(line.get("seq", 0)) <= covered:
                self._on_log(line)
            else:
                self._unapplied.append(line)

    def _on_log(self, message: dict[str, Any]) -> None:
        msg = message.get("msg", "")
        kv = message.get("kv") or {}
        at = float(message.get("t", time.monotonic()))
        if msg == _MSG_REGISTER:
            self._pending.setdefault(kv.get("resourceName", ""), []).append(at)
        elif msg in (_MSG_CONNECTED, _MSG_CONNECT_FAILED):
            resource = kv.get("resource", "")
            accepted = msg == _MSG_CONNECTED
            self._record_registration(resource, kv.get("socketPath", ""), at, None if accepted else message)
            if accepted:
                self._lists_received[resource] = 0
        elif msg.startswith(_MSG_BAD_REGISTER):
            self._record_registration(kv.get("resourceName", ""), "", at, message)
        elif msg == _MSG_PROCESSED:
            # Logged after the device manager applied the list ("State pushed" comes before it).
            resource = kv.get("resourceName", "")
            self._lists_received[resource] = self._lists_received.get(resource, 0) + 1
            self._lists.append(
                ListAndWatchRecord(
                    resource=kv.get("resourceName", ""),
                    endpoint="",
                    at=at,
                    device_count=int(kv.get("totalCount", 0)),
                    healthy_count=int(kv.get("healthyCount", 0)),
                )
            )
        elif msg == _MSG_STREAM_ENDED:
            reason = str(message.get("error", ""))
            self._stream_ends.append(
                StreamEndRecord(
                    resource=kv.get("resource", ""),
                    endpoint="",
                    at=at,
                    reason=reason,
                    # The kubelet's own Disconnect closes the connection under a running stream.
                    by_kubelet="client connection is closing" in reason,
                )
            )

    def _record_registration(
        self, resource: str, socket_path: str, at: float, failure: dict[str, Any] | None
    ) -> None:
        pending = self._pending.get(resource)
        if not pending:  # a rejection logged without the resource name: take the oldest arrival
            pending = next((p for p in self._pending.values() if p), None)
        arrived = pending.pop(0) if pending else at
        self._registrations.append(
            RegistrationRecord(
                resource=resource,
                endpoint=os.path.basename(socket_path),
                version="v1beta1" if failure is None else "",
                at=arrived,
                answered_at=at,
                accepted=failure is None,
                error=None if failure is None else str(failure.get("error", failure.get("msg"))),
            )
        )

    async def _command(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            raise PeerError(f"the kubelet peer is not running ({request.get('op')})")
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[command_id] = future
        proc.stdin.write(json.dumps({**request, "id": command_id}).encode() + b"\n")
        try:
            await proc.stdin.drain()
            reply = await asyncio.wait_for(future, timeout or self.rpc_timeout)
        except (ConnectionError, TimeoutError) as exc:
            self._replies.pop(command_id, None)
            raise PeerError(f"{request.get('op')}: no answer from the kubelet peer: {exc!r}") from None
        if not reply.get("ok"):
            raise PeerError(str(reply.get("error")))
        result: dict[str, Any] = reply.get("result") or {}
        return result

    async def refresh(self) -> None:
        """Fetch the device manager's state now (waiters do this themselves before giving up)."""
        result = await self._command({"op": "devices"})
        self._set_state(result)
        self._changed()

    async def observe(self, on: bool) -> None:
        """Pause (False) or resume (True) the peer's state snapshots after changes; resuming takes one.

        For timing the device manager's own work from its log lines (`log_lines`, which keep coming): a
        snapshot of a large pool costs a walk, a sort and megabytes of JSON in both processes, CPU a kubelet
        does not spend. While paused, records derived from log lines (registrations, lists) wait for the next
        snapshot, and so do the waiters on them."""
        await self._command({"op": "observe", "on": on})

    # -- observing ----------------------------------------------------------------------------------------

    def peer_resource(self, name: str) -> PeerResource | None:
        view = (self._state.get("resources") or {}).get(name)
        return _peer_resource(name, view) if view is not None else None

    def peer_resources(self) -> dict[str, PeerResource]:
        return {n: _peer_resource(n, v) for n, v in sorted((self._state.get("resources") or {}).items())}

    def resource(self, name: str) -> ResourceSnapshot | None:
        """The kubelet's current view of one resource, in the emulator's terms (None if it never registered).

        registered: the resource's endpoint is live (not stopped); stream_open: that endpoint's client is
        still watched by the registration server."""
        raw = self.peer_resource(name)
        if raw is None:
            return None
        endpoint = raw.endpoint
        live = endpoint is not None and not endpoint.stopped and endpoint.socket != ""
        return ResourceSnapshot(
            name=name,
            registered=live,
            endpoint=endpoint.socket if endpoint is not None and endpoint.socket else None,
            options=endpoint.options if endpoint is not None else None,
            stream_open=live and endpoint is not None and endpoint.socket in raw.clients,
            devices=raw.devices,
            healthy_ids=frozenset(d.id for d in raw.devices if d.health == HEALTHY),
            lists_received=self._lists_received.get(name, 0),
            in_use=raw.in_use,
        )

    def resources(self) -> dict[str, ResourceSnapshot]:
        out = {}
        for name in sorted(self._state.get("resources") or {}):
            snap = self.resource(name)
            if snap is not None:
                out[name] = snap
        return out

    def capacity(self, resource: str) -> int:
        snap = self.resource(resource)
        return snap.capacity if snap else 0

    def allocatable(self, resource: str) -> int:
        snap = self.resource(resource)
        return snap.allocatable if snap else 0

    @property
    def registrations(self) -> tuple[RegistrationRecord, ...]:
        """Every Register the kubelet logged, accepted or not, in order (endpoint "" when rejected early)."""
        return tuple(self._registrations)

    @property
    def list_and_watch_messages(self) -> tuple[ListAndWatchRecord, ...]:
        """Every device list the device manager processed (endpoint unknown: the kubelet does not log it)."""
        return tuple(self._lists)

    @property
    def stream_ends(self) -> tuple[StreamEndRecord, ...]:
        """ListAndWatch streams that ended, as the kubelet logged them (endpoint unknown)."""
        return tuple(self._stream_ends)

    def pods(self) -> dict[tuple[str, str], dict[str, dict[str, tuple[str, ...]]]]:
        """(namespace, pod) -> container -> resource -> device IDs, for the peer's active pods."""
        out: dict[tuple[str, str], dict[str, dict[str, tuple[str, ...]]]] = {}
        for pod in self._state.get("pods") or ():
            out[(pod["namespace"], pod["name"])] = {
                container: {res: tuple(ids) for res, ids in by_res.items()}
                for container, by_res in (pod.get("containers") or {}).items()
            }
        return out

    def describe(self) -> str:
        running = "running" if self.serving else "not running"
        lines = [f"kubelet peer at {self.plugin_dir} ({running}, pid {self.pid})"]
        if self._state_error:
            lines.append(f"  state error: {self._state_error}")
        for name, raw in self.peer_resources().items():
            healthy = sum(1 for d in raw.devices if d.health == HEALTHY)
            ep = raw.endpoint
            lines.append(
                f"  {name}: endpoint={ep.socket if ep else None} stopped={ep.stopped if ep else None}"
                f" endpoints={[e.socket for e in raw.endpoints]} clients={list(raw.clients)}"
                f" capacity={len(raw.devices)} healthy={healthy} in_use={sorted(raw.in_use, key=_natural)}"
            )
        if not self._state.get("resources"):
            lines.append("  no resource registered yet")
        for rec in self._registrations[-5:]:
            outcome = "accepted" if rec.accepted else f"rejected: {rec.error}"
            lines.append(f"  register {rec.resource} endpoint={rec.endpoint}: {outcome}")
        for end in self._stream_ends[-3:]:
            lines.append(f"  stream end {end.resource}: {end.reason}")
        lines.append(self._stderr_tail())
        return "\n".join(lines)

    # -- waiting ------------------------------------------------------------------------------------------

    def _changed(self) -> None:
        for event in self._waiters:
            event.set()

    async def _wait(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self._waiters.add(event)
        try:
            deadline = loop.time() + timeout
            refreshed = False
            while True:
                event.clear()
                result = probe()
                if result is not None:
                    return result
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if not refreshed and self.serving:
                        # One explicit read before giving up, so a late state event cannot fail a test.
                        refreshed = True
                        with contextlib.suppress(PeerError):
                            await self.refresh()
                        continue
                    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}\n{self.describe()}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, _RECHECK_INTERVAL))
        finally:
            self._waiters.discard(event)

    async def wait_serving(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: True if self.serving else None, timeout, "the kubelet peer to serve")

    async def wait_registered(
        self,
        resource: str,
        timeout: float = 5.0,  # noqa: ASYNC109
        *,
        since: float | None = None,
    ) -> RegistrationRecord:
        """Wait until `resource` has a live endpoint from an accepted Register (that arrived at or after the
        time.monotonic() value `since`, if given); returns that registration."""

        def probe() -> RegistrationRecord | None:
            snap = self.resource(resource)
            if snap is None or not snap.registered:
                return None
            for rec in reversed(self._registrations):
                if rec.resource == resource and rec.accepted:
                    return rec if since is None or rec.at >= since else None
            return None

        what = f"{resource} to register" + (f" after t={since:.3f}" if since is not None else "")
        return await self._wait(probe, timeout, what)

    async def wait_devices(
        self,
        resource: str,
        predicate: Callable[[ResourceSnapshot], bool] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> ResourceSnapshot:
        """Wait until `predicate(snapshot)` holds (default: a device list arrived on an open stream)."""

        def probe() -> ResourceSnapshot | None:
            snap = self.resource(resource)
            if snap is None:
                return None
            if predicate is None:
                return snap if snap.stream_open and snap.lists_received > 0 else None
            return snap if predicate(snap) else None

        what = f"devices of {resource}" + (" to match the predicate" if predicate else " to arrive")
        return await self._wait(probe, timeout, what)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:  # noqa: ASYNC109
        """Wait until `predicate()` is true; it is re-checked on every line from the peer."""
        await self._wait(lambda: True if predicate() else None, timeout, what or "the predicate")

    # -- pods ---------------------------------------------------------------------------------------------

    def uid_of(self, pod: str, namespace: str = "default") -> str:
        """The pod's UID (made up on its first container, kept across restarts of the peer)."""
        key = (namespace, pod)
        if key not in self._uids:
            self._uids[key] = str(uuid.uuid4())
        return self._uids[key]

    async def admit(
        self,
        resources: Mapping[str, int],
        *,
        pod: str | None = None,
        container: str = "main",
        namespace: str = "default",
        numa_affinity: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Admit one container asking for `resources` (name -> count) and start it, as the kubelet does:
        the device manager's Allocate (GetPreferredAllocation and Allocate on the plugins), then
        GetDeviceRunContainerOptions. `numa_affinity` is what the topology manager would have decided.

        Returns the peer's answer: device_ids (resource -> IDs), envs, annotations, devices, mounts,
        cdi_devices. Raises AllocationError when the kubelet rejects the container."""
        name = pod or f"pod-{next(self._pod_numbers)}"
        request: dict[str, Any] = {
            "op": "allocate",
            "pod": f"{namespace}/{name}",
            "uid": self.uid_of(name, namespace),
            "container": container,
            "resources": dict(resources),
        }
        if numa_affinity is not None:
            request["numa_affinity"] = list(numa_affinity)
        async with self._admission:
            try:
                result = await self._command(request)
            except PeerError as exc:
                if not self.serving:
                    raise
                await self.refresh()
                if (namespace, name) not in self.pods():
                    self._uids.pop((namespace, name), None)  # rejected: a later pod of that name is a new pod
                message = f"the kubelet rejected {namespace}/{name} container {container}: {exc}"
                if any(marker in str(exc) for marker in _UNREGISTERED):
                    raise NotRegisteredError(message) from None
                raise AllocationError(message) from None
            # Like the emulator's books, the driver's view includes the admission when this returns.
            await self.refresh()
        result["pod"] = name
        return result

    def pod_entry(self, namespace: str, pod: str) -> dict[str, dict[str, tuple[str, ...]]] | None:
        return self.pods().get((namespace, pod))

    async def allocate(
        self,
        resource: str,
        n: int,
        must_include: Sequence[str] = (),
        *,
        pod: str | None = None,
        container: str = "main",
        namespace: str = "default",
        numa_affinity: Sequence[int] | None = None,
    ) -> AllocationResult:
        """Admit a container asking for `n` devices of `resource` (the emulator's signature).

        The kubelet chooses the devices; a container request has no way to name them, so `must_include`
        is refused. device_ids are sorted (the kubelet sends them to Allocate in map order)."""
        if must_include:
            raise ValueError(
                "a kubelet cannot be asked for particular devices: must_include is emulator-only"
            )
        if n < 1:
            raise ValueError(f"a container asks for at least one device, got n={n}")
        result = await self.admit(
            {resource: n}, pod=pod, container=container, namespace=namespace, numa_affinity=numa_affinity
        )
        ids = tuple(sorted(result.get("device_ids", {}).get(resource, ()), key=_natural))
        snap = self.resource(resource)
        return AllocationResult(
            resource=resource,
            namespace=namespace,
            pod=result["pod"],
            container=container,
            device_ids=ids,
            preferred_used=bool(snap and snap.options and snap.options.get_preferred_allocation_available),
            envs=dict(result.get("envs") or {}),
            annotations=dict(result.get("annotations") or {}),
            devices=[
                DeviceSpec(d["container_path"], d["host_path"], d["permissions"])
                for d in result.get("devices") or ()
            ],
            mounts=[
                Mount(m["container_path"], m["host_path"], bool(m["read_only"]))
                for m in result.get("mounts") or ()
            ],
            cdi_devices=list(result.get("cdi_devices") or ()),
        )

    async def remove_pod(self, pod: str, namespace: str = "default") -> tuple[str, ...]:
        """The pod is gone (deleted from the API): the kubelet frees its devices. Returns the freed IDs."""
        uid = self._uids.get((namespace, pod), "")
        result = await self._command({"op": "remove_pod", "pod": f"{namespace}/{pod}", "uid": uid})
        self._uids.pop((namespace, pod), None)
        await self.refresh()
        freed = [i for ids in (result.get("freed") or {}).values() for i in ids]
        return tuple(sorted(freed, key=_natural))

    async def node_status(self) -> NodeStatus:
        """Run the kubelet's node-status update once (GetCapacity) and return the extended resources."""
        result = await self._command({"op": "node_status"})
        return NodeStatus(
            capacity=dict(result.get("capacity") or {}),
            allocatable=dict(result.get("allocatable") or {}),
            removed=tuple(result.get("removed") or ()),
            device_capacity=dict(result.get("device_capacity") or {}),
            device_allocatable=dict(result.get("device_allocatable") or {}),
        )

    async def topology_hints(
        self,
        resources: Mapping[str, int],
        *,
        pod: str = "hints",
        container: str = "main",
        namespace: str = "default",
    ) -> dict[str, list[TopologyHint]]:
        """GetTopologyHints of the device manager for a container asking for `resources` (no allocation)."""
        result = await self._command(
            {
                "op": "topology_hints",
                "pod": f"{namespace}/{pod}",
                "uid": f"hints-{uuid.uuid4()}",
                "container": container,
                "resources": dict(resources),
            }
        )
        return {
            res: [
                TopologyHint(
                    numa_nodes=tuple(h["numa_nodes"]) if h.get("numa_nodes") is not None else None,
                    preferred=bool(h["preferred"]),
                )
                for h in hints
            ]
            for res, hints in (result.get("hints") or {}).items()
        }
