"""A kubelet device manager emulator on grpcio, for tests and the demo.

It serves v1beta1.Registration on `<plugin_dir>/kubelet.sock` and behaves as the kubelet does: Register is
validated and, before it is answered, the plugin's socket is dialed and GetDevicePluginOptions called;
ListAndWatch then runs in the background and feeds capacity/allocatable; allocation follows the kubelet's
admission flow (GetPreferredAllocation when offered, then Allocate). gRPC runs on grpcio's own threads, so
the emulator never depends on the agent's event loop: an agent that blocks its loop shows up as a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import structlog

from .endpoint import DialError, PluginEndpoint
from .model import (
    AllocationError,
    AllocationResult,
    ContainerAllocation,
    ContractViolation,
    DeviceInfo,
    DeviceSpec,
    EmulatorError,
    ListAndWatchRecord,
    Mount,
    NodeStatus,
    NotRegisteredError,
    PluginCallError,
    PluginOptions,
    RegistrationRecord,
    ResourceSnapshot,
    StreamEndRecord,
)
from .podresources import PodResourcesServer, check_socket_path
from .protos import DEVICEPLUGIN
from .state import ENDPOINT_STOP_GRACE_S, AlreadyConnected, DeviceManager, PodKey, StaleRegistration
from .validation import extended_resource_name_problem

log = structlog.get_logger(__name__)

_pb = DEVICEPLUGIN.pb2
T = TypeVar("T")

SUPPORTED_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
_RECHECK_INTERVAL = 0.1
"""Waiters wake on every emulator change; this fallback only serves predicates about outside state."""


class _Rejected(Exception):
    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def remove_sockets(directory: Path, keep: Sequence[Path] = ()) -> list[str]:
    """Delete every unix socket directly in `directory` (the kubelet's start-up cleanup); returns names."""
    kept = {os.path.abspath(p) for p in keep}
    removed = []
    for entry in os.scandir(directory):
        path = os.path.abspath(entry.path)
        try:
            is_socket = stat.S_ISSOCK(os.lstat(path).st_mode)
        except FileNotFoundError:
            continue
        if is_socket and path not in kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(entry.name)
    return sorted(removed)


def allocation_from_response(response: Any) -> ContainerAllocation:
    """Convert one ContainerAllocateResponse into plain Python data."""
    return ContainerAllocation(
        envs=dict(response.envs),
        annotations=dict(response.annotations),
        devices=[DeviceSpec(d.container_path, d.host_path, d.permissions) for d in response.devices],
        mounts=[Mount(m.container_path, m.host_path, m.read_only) for m in response.mounts],
        cdi_devices=[c.name for c in response.cdi_devices],
    )


def check_preferred(
    answer: Sequence[str], available: Sequence[str], must_include: Sequence[str], size: int
) -> None:
    """Raise ContractViolation unless `answer` is `size` distinct `available` IDs with all `must_include`."""
    problems = []
    if len(answer) != size:
        problems.append(f"returned {len(answer)} IDs, allocation_size was {size}")
    duplicates = sorted({i for i in answer if answer.count(i) > 1})
    if duplicates:
        problems.append(f"repeated IDs {duplicates}")
    unknown = sorted(set(answer) - set(available))
    if unknown:
        problems.append(f"IDs not in available_deviceIDs: {unknown}")
    missing = sorted(set(must_include) - set(answer))
    if missing:
        problems.append(f"left out must_include_deviceIDs {missing}")
    if problems:
        raise ContractViolation(
            f"GetPreferredAllocation answer {list(answer)} breaks the contract: " + "; ".join(problems)
        )


class _RegistrationService:
    """grpcio servicer for v1beta1.Registration; the work happens in KubeletEmulator._register."""

    def __init__(self, kubelet: KubeletEmulator) -> None:
        self._kubelet = kubelet

    def Register(self, request: Any, context: Any) -> Any:  # gRPC method name
        return self._kubelet._register(request, context)


class KubeletEmulator:
    """An emulated kubelet: registration server, plugin clients, allocation and PodResources.

    Use as `async with KubeletEmulator(plugin_dir, pod_resources_socket=...) as emu:`.
    """

    def __init__(
        self,
        plugin_dir: Path | str,
        pod_resources_socket: Path | str | None = None,
        *,
        autostart: bool = True,
        start_delay: float | None = None,
        dial_timeout: float = 10.0,
        rpc_timeout: float | None = 10.0,
        release: str = "1.37",
        stop_grace_s: float = ENDPOINT_STOP_GRACE_S,
    ) -> None:
        """`autostart=False` leaves starting to `await emu.start()`; `start_delay` starts serving that many
        seconds after entering the context, in the background. `dial_timeout` is the kubelet's blocking
        dial limit (10 s there). `rpc_timeout` bounds each call to the plugin; the kubelet sets no deadline,
        but a test should fail rather than hang (None disables it). `release` picks the kubelet's
        registration behaviour: "1.37" (clients per socket path) or "1.36" (one client per resource name,
        as in v1.34 to v1.36; see state.py). `stop_grace_s` is the kubelet's 5-minute grace before node
        status drops a resource whose endpoint stopped (shorter only to test that rule)."""
        self.plugin_dir = Path(plugin_dir).absolute()
        self.socket_path = self.plugin_dir / KUBELET_SOCKET
        self.pod_resources_socket = Path(pod_resources_socket).absolute() if pod_resources_socket else None
        self.dial_timeout = dial_timeout
        self.rpc_timeout = rpc_timeout
        self._autostart = autostart
        self._start_delay = start_delay
        self._books = DeviceManager(release, stop_grace_s)
        self.kubelet_release = release
        self._server: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._pod_resources = (
            PodResourcesServer(self.pod_resources_socket, self._books) if self.pod_resources_socket else None
        )
        self._lifecycle = asyncio.Lock()
        self._admission = asyncio.Lock()  # the kubelet admits pods one at a time
        self._delayed_start: asyncio.Task[None] | None = None
        self._pod_numbers = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> KubeletEmulator:
        if self._start_delay is not None:
            self._delayed_start = asyncio.create_task(self._start_later(self._start_delay))
        elif self._autostart:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _start_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.start()

    @property
    def serving(self) -> bool:
        """True while kubelet.sock is served."""
        return self._books.serving

    async def start(self) -> None:
        """Start like a kubelet: delete every socket in the plugin dir, then serve kubelet.sock."""
        async with self._lifecycle:
            if self._server is not None:
                raise EmulatorError(f"the emulator already serves {self.socket_path}")
            await asyncio.to_thread(self._serve)

    async def stop(self) -> None:
        """Stop everything: registration server, plugin connections, PodResources. State stays readable."""
        task, self._delayed_start = self._delayed_start, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._lifecycle:
            await asyncio.to_thread(self._unserve)
            if self._pod_resources is not None:
                await asyncio.to_thread(self._pod_resources.stop)

    async def restart(self, downtime: float = 0.0) -> None:
        """Like a kubelet restart: stop serving, drop plugin connections and device lists (allocations
        survive, as from the checkpoint), delete every socket in the plugin dir, serve kubelet.sock again.
        Plugins must register again. PodResources is down meanwhile (the kubelet serves it), its socket
        file stays (it lives outside the plugin dir)."""
        async with self._lifecycle:
            await asyncio.to_thread(self._unserve)
            if self._pod_resources is not None:
                await asyncio.to_thread(self._pod_resources.stop)
            if downtime > 0:
                await asyncio.sleep(downtime)
            await asyncio.to_thread(self._serve)
        log.info("kubelet.restarted", plugin_dir=str(self.plugin_dir))

    def _serve(self) -> None:
        check_socket_path(self.socket_path)
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        keep = [self.pod_resources_socket] if self.pod_resources_socket else []
        removed = remove_sockets(self.plugin_dir, keep=keep)
        if self._pod_resources is not None:
            self._pod_resources.start()
        executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kubelet-registration")
        server = grpc.server(executor)
        DEVICEPLUGIN.grpc.add_RegistrationServicer_to_server(_RegistrationService(self), server)
        try:
            server.add_insecure_port(f"unix://{self.socket_path}")
        except RuntimeError as exc:
            executor.shutdown(wait=False)
            raise EmulatorError(f"cannot listen on {self.socket_path}: {exc}") from exc
        self._books.begin_serving()
        server.start()
        self._server, self._executor = server, executor
        log.info("kubelet.serving", socket=str(self.socket_path), removed_sockets=removed)

    def _unserve(self) -> None:
        server, executor = self._server, self._executor
        self._server = self._executor = None
        if server is None:
            return
        # Order matters: bump the epoch first so an in-flight Register cannot install an endpoint, then stop
        # the server, then close connections (which also unblocks handlers still dialing), then join handlers.
        endpoints = self._books.end_serving()
        server.stop(None).wait()
        for endpoint in endpoints:
            endpoint.close()
        if executor is not None:
            executor.shutdown(wait=True)
        log.info("kubelet.stopped", socket=str(self.socket_path), closed_endpoints=len(endpoints))

    # -- Register (runs on a grpcio thread) ---------------------------------------------------------------

    def _register(self, request: Any, context: Any) -> Any:
        arrived = time.monotonic()
        epoch = self._books.epoch
        error: str | None = None
        try:
            self._admit(request, epoch, context)
        except _Rejected as exc:
            error = exc.message
            code = exc.code
        self._books.record_registration(
            RegistrationRecord(
                resource=request.resource_name,
                endpoint=request.endpoint,
                version=request.version,
                at=arrived,
                answered_at=time.monotonic(),
                accepted=error is None,
                error=error,
            )
        )
        if error is not None:
            log.info(
                "register.rejected", resource=request.resource_name, endpoint=request.endpoint, error=error
            )
            # The kubelet returns plain Go errors, which gRPC sends as UNKNOWN with the text as details.
            context.abort(code, error)
        log.info("register.accepted", resource=request.resource_name, endpoint=request.endpoint)
        return _pb.Empty()

    def _admit(self, request: Any, epoch: int, context: Any) -> None:
        unknown = grpc.StatusCode.UNKNOWN
        if request.version != SUPPORTED_VERSION:
            raise _Rejected(
                unknown,
                f"requested API version {request.version!r} is not supported by kubelet; "
                f"supported versions: [{SUPPORTED_VERSION!r}]",
            )
        problem = extended_resource_name_problem(request.resource_name)
        if problem is not None:
            raise _Rejected(unknown, f"the resource name {request.resource_name!r} is invalid: it {problem}")
        # Go's filepath.Join: the endpoint is always relative to the plugin dir, even with a leading "/".
        socket_path = Path(os.path.normpath(f"{self.plugin_dir}/{request.endpoint}"))
        endpoint = PluginEndpoint(request.resource_name, request.endpoint, socket_path, epoch)
        # The kubelet dials and asks for the options with the Register call's context: a plugin that gives up
        # on its Register (cancels it) aborts the connect ("context canceled"). Once connected, it no longer
        # matters. grpcio runs this callback when the call ends, cancelled or answered.
        connecting = threading.Lock()
        state = {"connected": False}

        def caller_gone() -> None:
            with connecting:
                if not state["connected"]:
                    endpoint.close()

        context.add_callback(caller_gone)
        try:
            self._books.add_client(endpoint, epoch)
        except StaleRegistration:
            endpoint.close()
            raise _Rejected(grpc.StatusCode.UNAVAILABLE, "kubelet restarted during registration") from None
        try:
            endpoint.dial(self.dial_timeout)
            reply = endpoint.stub.GetDevicePluginOptions(_pb.Empty(), timeout=self.rpc_timeout)
            options = PluginOptions(
                pre_start_required=reply.pre_start_required,
                get_preferred_allocation_available=reply.get_preferred_allocation_available,
            )
            with connecting:
                if endpoint.closed:
                    raise DialError("context canceled")
                self._books.connect(endpoint, options, epoch)
                state["connected"] = True
        except StaleRegistration:
            self._books.drop_client(endpoint, abandoned=False)
            endpoint.close()
            raise _Rejected(grpc.StatusCode.UNAVAILABLE, "kubelet restarted during registration") from None
        except DialError as exc:
            self._books.drop_client(endpoint, abandoned=False)
            cause = "context canceled" if endpoint.closed else str(exc)
            endpoint.close()
            raise _Rejected(unknown, f"failed to dial device plugin: {cause}") from None
        except grpc.RpcError as exc:
            # The kubelet keeps this connection open (it never closes a client whose connect failed).
            self._books.drop_client(endpoint, abandoned=not endpoint.closed)
            raise _Rejected(
                unknown, f"failed to get device plugin options: {exc.code().name}: {exc.details()}"
            ) from None
        except AlreadyConnected as exc:
            # v1.37: this drops the running client of that path from the server's list too (see state.py).
            self._books.drop_client(endpoint, abandoned=True)
            raise _Rejected(unknown, str(exc)) from None
        # Opened right away, concurrently with the answer to Register, as the kubelet's client goroutine does.
        # An older stream of the same resource keeps running: the kubelet never closes it on a new Register.
        endpoint.start_stream(self._books.on_list, self._stream_ended)

    def _stream_ended(self, endpoint: PluginEndpoint, reason: str, by_kubelet: bool) -> None:
        """runClient once Run returns (on the ended stream's reader thread): disconnect the client the kubelet
        finds for it, which in v1.36 is the current client of the name, not necessarily this one."""
        victim = self._books.on_stream_end(endpoint, reason, by_kubelet)
        if victim is None:
            return
        victim.close()
        log.info(
            "kubelet.plugin_disconnected",
            resource=victim.resource,
            endpoint=victim.endpoint,
            ended_stream=endpoint.endpoint,
        )

    # -- observing ----------------------------------------------------------------------------------------

    def resource(self, name: str) -> ResourceSnapshot | None:
        """The kubelet's current view of one resource (None if it never registered)."""
        return self._books.snapshot(name)

    def resources(self) -> dict[str, ResourceSnapshot]:
        out = {}
        for name in self._books.resource_names():
            snap = self._books.snapshot(name)
            if snap is not None:
                out[name] = snap
        return out

    def clients(self, resource: str) -> tuple[str, ...]:
        """Endpoints whose streams the kubelet still watches for `resource` (its registration server's
        clients); a stream that ends for an endpoint not listed here is ignored by the kubelet."""
        return self._books.clients(resource)

    async def node_status(self) -> NodeStatus:
        """Run the kubelet's node-status update once (GetCapacity) and return the extended resources."""
        return self._books.node_status()

    def capacity(self, resource: str) -> int:
        snap = self._books.snapshot(resource)
        return snap.capacity if snap else 0

    def allocatable(self, resource: str) -> int:
        snap = self._books.snapshot(resource)
        return snap.allocatable if snap else 0

    @property
    def registrations(self) -> tuple[RegistrationRecord, ...]:
        """Every Register that reached the kubelet, accepted or not, in arrival order."""
        return self._books.registrations

    @property
    def list_and_watch_messages(self) -> tuple[ListAndWatchRecord, ...]:
        """Every ListAndWatch message received, across all resources."""
        return self._books.list_and_watch_messages

    @property
    def stream_ends(self) -> tuple[StreamEndRecord, ...]:
        return self._books.stream_ends

    def pods(self) -> dict[PodKey, dict[str, dict[str, tuple[DeviceInfo, ...]]]]:
        """(namespace, pod) -> container -> resource -> devices in use."""
        return self._books.pods()

    def describe(self) -> str:
        """Human-readable state, used in timeout errors."""
        lines = [f"kubelet emulator at {self.plugin_dir} ({'serving' if self.serving else 'not serving'})"]
        for name, snap in self.resources().items():
            opts = snap.options
            lines.append(
                f"  {name}: {'registered' if snap.registered else 'not registered'}"
                f" endpoint={snap.endpoint} stream={'open' if snap.stream_open else 'closed'}"
                f" lists={snap.lists_received} capacity={snap.capacity} allocatable={snap.allocatable}"
                f" in_use={sorted(snap.in_use)}"
                + (f" preferred={opts.get_preferred_allocation_available}" if opts else "")
            )
        if not self._books.resource_names():
            lines.append("  no resource registered yet")
        for rec in self.registrations[-5:]:
            outcome = "accepted" if rec.accepted else f"rejected: {rec.error}"
            lines.append(f"  register {rec.resource} endpoint={rec.endpoint} v={rec.version}: {outcome}")
        for end in self.stream_ends[-3:]:
            lines.append(f"  stream end {end.resource} ({end.endpoint}): {end.reason}")
        return "\n".join(lines)

    # -- waiting ------------------------------------------------------------------------------------------

    async def _wait(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self._books.subscribe(loop, event)
        try:
            deadline = loop.time() + timeout
            while True:
                event.clear()  # before probing, so a change during the probe is not lost
                result = probe()
                if result is not None:
                    return result
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}\n{self.describe()}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, _RECHECK_INTERVAL))
        finally:
            self._books.unsubscribe(loop, event)

    async def wait_serving(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: True if self.serving else None, timeout, "kubelet.sock to be served")

    async def wait_registered(
        self,
        resource: str,
        timeout: float = 5.0,  # noqa: ASYNC109 (a plain timeout argument is the waiters' public interface)
        *,
        since: float | None = None,
    ) -> RegistrationRecord:
        """Wait until `resource` has a live endpoint from an accepted Register (that arrived at or after the
        time.monotonic() value `since`, if given); returns that registration."""

        def probe() -> RegistrationRecord | None:
            snap = self._books.snapshot(resource)
            if snap is None or not snap.registered:
                return None
            for rec in reversed(self._books.registrations):
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
            snap = self._books.snapshot(resource)
            if snap is None:
                return None
            if predicate is None:
                return snap if snap.stream_open and snap.lists_received > 0 else None
            return snap if predicate(snap) else None

        what = f"devices of {resource}" + (" to match the predicate" if predicate else " to arrive")
        return await self._wait(probe, timeout, what)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:  # noqa: ASYNC109
        """Wait until `predicate()` is true; it is re-checked on every emulator change."""
        await self._wait(lambda: True if predicate() else None, timeout, what or "the predicate")

    # -- allocation (the kubelet's pod admission) ---------------------------------------------------------

    async def allocate(
        self,
        resource: str,
        n: int,
        must_include: Sequence[str] = (),
        *,
        pod: str | None = None,
        container: str = "main",
        namespace: str = "default",
    ) -> AllocationResult:
        """Admit a container asking for `n` devices of `resource`, choosing them as the kubelet does.

        Candidates are healthy devices not in use (plus `must_include`, which may be held by the same pod).
        With get_preferred_allocation_available the plugin's GetPreferredAllocation answer is used, after
        checking its contract; otherwise the first IDs in sorted order. Then Allocate is called and the
        devices are tracked as in use by namespace/pod/container until release(pod).
        """
        if n < 1:
            raise ValueError(f"a container asks for at least one device, got n={n}")
        must = tuple(dict.fromkeys(must_include))
        if len(must) > n:
            raise ValueError(f"must_include has {len(must)} IDs but only {n} devices are requested")
        async with self._admission:
            key = (namespace, pod or f"pod-{next(self._pod_numbers)}")
            if self._books.has_allocation(key, container, resource):
                raise AllocationError(f"{key[0]}/{key[1]} container {container} already holds {resource}")
            found = self._books.endpoint_of(resource)
            snap = self._books.snapshot(resource)
            if found is None or snap is None:
                raise NotRegisteredError(f"no plugin is registered for {resource}\n{self.describe()}")
            _, options = found
            for device_id in must:
                if device_id not in snap.healthy_ids:
                    raise AllocationError(f"must_include device {device_id} of {resource} is not healthy")
                holder = self._books.holder_of(resource, device_id)
                if holder is not None and holder != key:
                    raise AllocationError(
                        f"must_include device {device_id} is in use by {holder[0]}/{holder[1]}"
                    )
            free = sorted(snap.free_ids - set(must))
            if len(free) + len(must) < n:
                raise AllocationError(
                    f"requested number of devices unavailable for {resource}: "
                    f"requested {n}, available {len(free) + len(must)}"
                )
            if options.get_preferred_allocation_available:
                available = sorted({*free, *must})
                answer = await self.call_preferred(resource, available, must, n)
                check_preferred(answer, available, must, n)
                chosen = tuple(answer)
            else:
                chosen = must + tuple(free[: n - len(must)])
            allocation = await self.call_allocate(resource, chosen)
            self._books.commit(key, container, resource, chosen)
        log.info("allocate.done", resource=resource, pod="/".join(key), container=container, ids=chosen)
        return AllocationResult(
            resource=resource,
            namespace=key[0],
            pod=key[1],
            container=container,
            device_ids=chosen,
            preferred_used=options.get_preferred_allocation_available,
            envs=allocation.envs,
            annotations=allocation.annotations,
            devices=allocation.devices,
            mounts=allocation.mounts,
            cdi_devices=allocation.cdi_devices,
        )

    def release(self, pod: str, namespace: str = "default") -> tuple[str, ...]:
        """The pod is gone: free its devices (all containers, all resources); returns the freed IDs."""
        return self._books.release((namespace, pod))

    async def remove_pod(self, pod: str, namespace: str = "default") -> tuple[str, ...]:
        """`release` under the name and signature of the real-kubelet peer (tests.peers.KubeletPeer)."""
        return self.release(pod, namespace)

    # -- low-level calls to a registered plugin -----------------------------------------------------------

    async def _call(self, resource: str, method: str, request: Any) -> Any:
        found = self._books.endpoint_of(resource)
        if found is None:
            raise NotRegisteredError(f"no plugin is registered for {resource}")
        endpoint, _ = found
        rpc = getattr(endpoint.stub, method)
        try:
            return await asyncio.to_thread(rpc, request, timeout=self.rpc_timeout)
        except grpc.RpcError as exc:
            raise PluginCallError(resource, method, exc.code(), exc.details() or "") from None
        except ValueError as exc:  # grpcio: "Cannot invoke RPC on closed channel!"
            raise NotRegisteredError(
                f"the connection to the plugin for {resource} is closed: {exc}"
            ) from None

    async def call_options(self, resource: str) -> PluginOptions:
        reply = await self._call(resource, "GetDevicePluginOptions", _pb.Empty())
        return PluginOptions(
            pre_start_required=reply.pre_start_required,
            get_preferred_allocation_available=reply.get_preferred_allocation_available,
        )

    async def call_preferred(
        self, resource: str, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        """GetPreferredAllocation for one container; the plugin's IDs unchecked (see check_preferred)."""
        request = _pb.PreferredAllocationRequest(
            container_requests=[
                _pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available),
                    must_include_deviceIDs=list(must_include),
                    allocation_size=size,
                )
            ]
        )
        reply = await self._call(resource, "GetPreferredAllocation", request)
        if len(reply.container_responses) != 1:
            count = len(reply.container_responses)
            raise ContractViolation(f"GetPreferredAllocation for one container returned {count} responses")
        return list(reply.container_responses[0].deviceIDs)

    async def call_allocate_containers(
        self, resource: str, containers: Sequence[Sequence[str]]
    ) -> list[ContainerAllocation]:
        """Allocate with one container request per entry; checks one response per request."""
        request = _pb.AllocateRequest(
            container_requests=[_pb.ContainerAllocateRequest(devices_ids=list(ids)) for ids in containers]
        )
        reply = await self._call(resource, "Allocate", request)
        if len(reply.container_responses) != len(containers):
            count = len(reply.container_responses)
            raise ContractViolation(f"Allocate for {len(containers)} containers returned {count} responses")
        return [allocation_from_response(r) for r in reply.container_responses]

    async def call_allocate(self, resource: str, ids: Sequence[str]) -> ContainerAllocation:
        """Allocate for one container with exactly these IDs (no bookkeeping, no checks on the IDs)."""
        (allocation,) = await self.call_allocate_containers(resource, [ids])
        return allocation

    async def call_prestart(self, resource: str, ids: Sequence[str]) -> None:
        await self._call(resource, "PreStartContainer", _pb.PreStartContainerRequest(devices_ids=list(ids)))
