"""The device plugin API v1beta1 for one resource: the grpclib servicer, its server socket, registration."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import ProtocolError, StreamTerminatedError

from agent.allocation import AllocationError, preferred_allocation
from agent.claim import ClaimKey
from agent.claim import annotation_key as claim_annotation_key
from agent.config import pool_env_name
from agent.connection import Direct, TrackingServer, after_send, answer_has_sequel
from agent.cpuset import CpuSet
from agent.idset import shared_device_id, shared_device_index
from agent.kubeletapi.v1beta1 import (
    AllocateRequest,
    AllocateResponse,
    ContainerAllocateRequest,
    ContainerAllocateResponse,
    ContainerPreferredAllocationRequest,
    ContainerPreferredAllocationResponse,
    DevicePluginBase,
    DevicePluginOptions,
    DeviceSpec,
    Empty,
    ListAndWatchResponse,
    PreferredAllocationRequest,
    PreferredAllocationResponse,
    PreStartContainerRequest,
    PreStartContainerResponse,
    RegisterRequest,
    RegistrationStub,
)
from agent.metrics import Metrics
from agent.plan import Grant, Resource
from agent.statusapi import DESCRIBE_PATH, DescribeReply, DescribeRequest, describe
from agent.wire import (
    AllocateRequestDecoder,
    EncodedAllocateResponse,
    EncodedListAndWatchResponse,
    EncodedPreferredAllocationResponse,
    PreferredAllocationRequestDecoder,
    encode_resource,
)

log = structlog.get_logger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
# How many offending IDs an error message quotes before it only counts them.
_QUOTED_IDS = 10


class RequestError(ValueError):
    """A request the agent answers with INVALID_ARGUMENT; the message names what is wrong."""


class SocketInUseError(RuntimeError):
    """Another live server already answers on the socket path the agent wants."""


def _quote(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_QUOTED_IDS])
    more = f" and {len(ids) - _QUOTED_IDS} more" if len(ids) > _QUOTED_IDS else ""
    return f"{shown}{more}"


@dataclass(eq=False)
class _Stream:
    """One open ListAndWatch stream: the epoch it was opened in and the list it sent last."""

    epoch: int
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    sent: EncodedListAndWatchResponse | None = None


_Req = TypeVar("_Req")


def _requests(items: Sequence[object], kind: type[_Req]) -> list[_Req]:
    """The container requests, checked: a malformed message can decode into values of the wrong type."""
    checked = []
    for index, item in enumerate(items):
        if not isinstance(item, kind):
            raise RequestError(f"container request {index} is not a {kind.__name__} (malformed message)")
        checked.append(item)
    return checked


# From this many IDs on, a shared pool's Allocate checks them at once (_millicpu_ids_below) rather than one
# by one: 500 millicpus took about 0.5 ms ID by ID.
_BATCH_MIN = 16
# The characters of a millicpu's ID (agent.idset.SHARED_ID_PATTERN: lower-case base 36).
_MILLICPU_CHARS = b"0123456789abcdefghijklmnopqrstuvwxyz"
_MILLICPU_MAX_LEN = 8


def _millicpu_ids_below(ids: Sequence[str], limit: int) -> bool:
    """Whether every ID is of a millicpu's form (what shared_device_index accepts: lower-case base 36, no
    leading zero, 1 to 8 characters) and below millicpu `limit`. False may also mean "not sure": the
    caller then checks ID by ID.

    The form is checked with a few string operations in C over the IDs joined with commas, where one regular
    expression over them cost four times as much; with the bound, 500 millicpus of a 4,000-millicpu pool
    took 73-102 µs on a 2-vCPU VM, 98-148 µs before. tests/test_deviceplugin.py holds it to the ID by ID
    rule."""
    joined = ",".join(ids)
    # An ID holding a comma, or a character no millicpu has.
    if joined.count(",") != len(ids) - 1 or not joined.isascii():
        return False
    if joined.encode().translate(None, _MILLICPU_CHARS + b","):
        return False
    framed = f",{joined},"
    if ",," in framed:  # an empty ID
        return False
    # ",0" starts either the ID "0" (",0,") or one with a leading zero. Counted without overlaps, a run of
    # "0" IDs is under-counted, never over: equal counts mean no leading zero.
    if framed.count(",0") != framed.count(",0,"):
        return False
    # Base 36 without leading zeros orders as (length, text): IDs shorter than the limit's are below it, and
    # only when the longest is as long does max() (in C) pick the largest.
    longest = max(map(len, ids))
    bound = len(shared_device_id(limit))
    if longest > _MILLICPU_MAX_LEN or longest != bound:
        return longest < bound and longest <= _MILLICPU_MAX_LEN
    return int(max(zip(map(len, ids), ids, strict=True))[1], 36) < limit


def _check_ids(ids: Sequence[object], where: str) -> None:
    # map() keeps the check in C: a generator expression cost ~0.1 µs per ID, 50 µs for 500 millicpus.
    if not all(map(isinstance, ids, itertools.repeat(str))):
        raise RequestError(f"{where}: device IDs must be strings (malformed message)")


def _as_status(path: str, exc: Exception) -> GRPCError:
    """A failure other than a gRPC status, as one (logged): a bad request never surfaces as a crash."""
    if isinstance(exc, GRPCError):
        return exc
    if isinstance(exc, (ValueError, TypeError, AttributeError, IndexError, KeyError)):
        log.warning("request.malformed", method=path, reason=repr(exc))
        return GRPCError(Status.INVALID_ARGUMENT, f"{path}: malformed request: {exc}")
    log.exception("request.failed", method=path)
    return GRPCError(Status.INTERNAL, f"{path}: {exc!r}")


def _guarded(
    path: str, func: Callable[[Any], Awaitable[None]], calls: set[asyncio.Task[Any]]
) -> Callable[[Any], Awaitable[None]]:
    """Any failure other than a gRPC status becomes one (_as_status).

    Each call's task stays in `calls` until it has ended (its answer sent), for ResourceServer.close()."""

    has_sequel = path == _PREFERRED_PATH

    async def handler(stream: Any) -> None:
        task = asyncio.current_task()
        if task is not None and task not in calls:
            calls.add(task)
            task.add_done_callback(calls.discard)
        if has_sequel:
            # This task's context only (grpclib runs each call in a task of its own): its answer's writes,
            # trailers included, tell the transport that an Allocate follows.
            answer_has_sequel.set(True)
        try:
            await func(stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _as_status(path, exc) from None

    return handler


def _direct(path: str, decode: Callable[[bytes], _Req], answer: Callable[[_Req], bytes]) -> Direct:
    """`answer` as a direct method of the connection (agent.connection.ServerProtocol)."""

    def call(data: bytes) -> bytes:
        try:
            return answer(decode(data))
        except Exception as exc:
            raise _as_status(path, exc) from None

    return Direct(call, has_sequel=path == _PREFERRED_PATH)


_PREFERRED_PATH = "/v1beta1.DevicePlugin/GetPreferredAllocation"
# The admission path's methods, as the metrics name them.
_METHODS = ("Allocate", "GetPreferredAllocation")
_ALLOCATE_PATH = "/v1beta1.DevicePlugin/Allocate"
_DECODERS: dict[str, type] = {
    _ALLOCATE_PATH: AllocateRequestDecoder,
    _PREFERRED_PATH: PreferredAllocationRequestDecoder,
}


class ResourceServicer(DevicePluginBase):
    """Answers the kubelet for one resource. All RPCs are synchronous computations on in-memory data."""

    def __init__(
        self,
        resource: Resource,
        cpuid_cpus: CpuSet,
        metrics: Metrics,
        on_streams_closed: Callable[[str], None] | None = None,
        on_allocated: Callable[[str, Sequence[str]], None] | None = None,
        claims: ClaimKey | None = None,
    ) -> None:
        self._resource = resource
        # Signs what each Allocate gave, for the NRI plugin (agent/claim.py); None: no claims.
        self._claims = claims
        # Told of every Allocate answered: the supervisor counts those IDs as held until the kubelet's
        # own record (PodResources) has caught up.
        self._on_allocated = on_allocated
        # Called when the last ListAndWatch stream ends: the kubelet stopped watching this resource.
        self._on_streams_closed = on_streams_closed
        self._listing = encode_resource(resource)
        # CPUs whose /dev/cpu/<n>/cpuid exists on the host, checked once: Allocate does no file IO.
        self._cpuid_cpus = cpuid_cpus
        self._metrics = metrics
        # The admission path's series, resolved once (the resource's name is the servicer's for good).
        name = resource.name
        self._timed = {m: metrics.allocation_seconds.series(resource=name, method=m) for m in _METHODS}
        self._counted = {
            (m, ok): metrics.allocations.series(resource=name, method=m, result="ok" if ok else "error")
            for m in _METHODS
            for ok in (True, False)
        }
        self._streams: set[_Stream] = set()
        # Every call being answered (ListAndWatch streams too), tracked by our own handler wrapper: grpclib
        # has no public list of them.
        self._calls: set[asyncio.Task[Any]] = set()
        self._progress = asyncio.Event()
        # end_streams() bumps the epoch: streams opened before it end, a server started after it serves anew.
        self._epoch = 0
        self._publish_device_metrics()

    @property
    def resource(self) -> Resource:
        return self._resource

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def in_flight(self) -> list[asyncio.Task[Any]]:
        """The calls being answered now (ListAndWatch streams included until they end)."""
        return [task for task in self._calls if not task.done()]

    def update(self, resource: Resource) -> bool:
        """Serve a new device list on every open stream; returns False when nothing changed."""
        if resource == self._resource:
            return False
        if resource.name != self._resource.name:
            # The metrics' series (and the kubelet's socket) are this name's.
            raise ValueError(f"servicer of {self._resource.name} cannot serve {resource.name}")
        self._resource = resource
        self._listing = encode_resource(resource)
        self._publish_device_metrics()
        for stream in self._streams:
            stream.wakeup.set()
        return True

    def end_streams(self) -> None:
        """End every ListAndWatch stream (grpclib's Server.close() would leave them hanging)."""
        self._epoch += 1
        for stream in self._streams:
            stream.wakeup.set()

    def _publish_device_metrics(self) -> None:
        name = self._resource.name
        healthy = self._resource.healthy_count
        self._metrics.devices.set(healthy, resource=name, health="healthy")
        self._metrics.devices.set(self._listing.device_count - healthy, resource=name, health="unhealthy")

    def __mapping__(self) -> dict[str, Handler]:
        mapping = {
            path: handler._replace(func=_guarded(path, handler.func, self._calls))
            for path, handler in super().__mapping__().items()
        }
        # The admission-path requests get dedicated decoders (see agent.wire).
        for path, decoder in _DECODERS.items():
            mapping[path] = mapping[path]._replace(request_type=decoder)
        mapping[DESCRIBE_PATH] = Handler(
            _guarded(DESCRIBE_PATH, self._describe, self._calls),
            Cardinality.UNARY_UNARY,
            DescribeRequest,
            DescribeReply,
        )
        return mapping

    async def _describe(self, stream: Any) -> None:
        """`cpupool status` (agent.statusapi): a summary that is neither a stream nor an allocation."""
        request = await stream.recv_message()
        await stream.send_message(
            await describe(self._resource, self._listing.device_count, len(self._streams), request)
        )

    async def get_device_plugin_options(self, message: Empty) -> DevicePluginOptions:
        return DevicePluginOptions(
            pre_start_required=False,
            get_preferred_allocation_available=self._resource.exclusive_pool,
        )

    async def list_and_watch(self, message: Empty) -> AsyncIterator[ListAndWatchResponse]:
        stream = _Stream(self._epoch)
        self._streams.add(stream)
        name = self._resource.name
        self._metrics.streams.set(len(self._streams), resource=name)
        log.info("listandwatch.opened", resource=name, devices=self._listing.device_count)
        try:
            # Each message is the full list: a slow reader skips intermediate lists, never gets a stale one.
            while True:
                listing = self._listing
                if listing is not stream.sent:
                    yield listing
                    # The generator resumes once grpclib has handed the message to the transport.
                    stream.sent = listing
                    self._progress.set()
                    log.debug("listandwatch.sent", resource=name, devices=listing.device_count)
                if stream.epoch != self._epoch:
                    return
                await stream.wakeup.wait()
                stream.wakeup.clear()
        finally:
            self._streams.discard(stream)
            self._metrics.streams.set(len(self._streams), resource=name)
            log.info("listandwatch.closed", resource=name)
            if not self._streams and stream.epoch == self._epoch and self._on_streams_closed is not None:
                self._on_streams_closed(name)

    async def flush(self, timeout_s: float = 1.0) -> bool:
        """Wait until every open stream has sent the current list (True), or `timeout_s` passed (False)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(s.sent is not self._listing for s in self._streams):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        return True

    def direct_answers(self) -> dict[str, Direct]:
        """The admission path's calls, answered by the connection as soon as a request is in whole."""
        return {
            _PREFERRED_PATH: _direct(
                _PREFERRED_PATH,
                PreferredAllocationRequestDecoder.FromString,
                lambda message: bytes(self.preferred(message)),
            ),
            _ALLOCATE_PATH: _direct(
                _ALLOCATE_PATH,
                AllocateRequestDecoder.FromString,
                lambda message: bytes(self.allocate_now(message)),
            ),
        }

    async def get_preferred_allocation(
        self, message: PreferredAllocationRequest
    ) -> PreferredAllocationResponse:
        return self.preferred(message)

    def preferred(self, message: PreferredAllocationRequest) -> PreferredAllocationResponse:
        started = time.perf_counter()
        try:
            responses = [
                ContainerPreferredAllocationResponse(
                    device_i_ds=self._prefer(
                        list(req.available_deviceIDs), list(req.must_include_deviceIDs), req.allocation_size
                    )
                )
                for req in _requests(message.container_requests, ContainerPreferredAllocationRequest)
            ]
        except (AllocationError, RequestError) as exc:
            self._count("GetPreferredAllocation", started, ok=False)
            log.warning("preferred_allocation.rejected", resource=self._resource.name, reason=str(exc))
            raise GRPCError(Status.INVALID_ARGUMENT, f"{self._resource.name}: {exc}") from None
        self._count("GetPreferredAllocation", started, ok=True)
        return EncodedPreferredAllocationResponse(container_responses=responses)

    def _prefer(self, available: list[str], must_include: list[str], size: int) -> list[str]:
        resource = self._resource
        _check_ids(available, "available_deviceIDs")
        _check_ids(must_include, "must_include_deviceIDs")
        if not isinstance(size, int):
            raise RequestError(f"allocation_size is not an integer: {size!r}")
        available = list(dict.fromkeys(available))
        if size < 0 or size > len(available):
            raise RequestError(f"cannot choose {size} of {len(available)} available IDs")
        # The kubelet's available list lags behind ListAndWatch (a reload just changed the devices): IDs
        # we do not know, or no longer offer, are left for last rather than failing a satisfiable pod.
        offers = resource.offers
        known: list[str] = []
        unknown: list[str] = []
        for device_id in available:
            (known if offers(device_id) else unknown).append(device_id)
        if unknown:
            log.info(
                "preferred_allocation.unknown_ids",
                resource=resource.name,
                ids=_quote(unknown),
                effect="answered from the rest",
            )
        must = list(dict.fromkeys(must_include))
        listed = set(available) if must else set()
        missing = [i for i in must if i not in listed]
        if missing:
            raise RequestError(f"must_include IDs not in available_deviceIDs: {_quote(missing)}")
        if len(must) > size:
            raise RequestError(f"{len(must)} must_include IDs do not fit an allocation of size {size}")
        must_known = [i for i in must if offers(i)]
        must_other = [i for i in must if not offers(i)]
        want = size - len(must_other)
        if resource.exclusive_pool:
            if want <= len(known):
                try:
                    # Every known ID is one of the pool's devices: no per-call copy of the mapping.
                    return must_other + preferred_allocation(resource.exclusive, known, must_known, want)
                except AllocationError as exc:
                    log.warning("preferred_allocation.fallback", resource=resource.name, reason=str(exc))
            chosen = list(dict.fromkeys(must + known + unknown))
            return chosen[:size]
        # Millicpus of one shared pool are interchangeable: the lowest indexes keep the list readable.
        taken = set(must)
        rest = sorted(
            (i for i in available if i not in taken),
            key=lambda i: (not resource.offers(i), shared_device_index(i) is None, len(i), i),
        )
        return must + rest[: size - len(must)]

    async def allocate(self, message: AllocateRequest) -> AllocateResponse:
        return self.allocate_now(message)

    def allocate_now(self, message: AllocateRequest) -> AllocateResponse:
        started = time.perf_counter()
        try:
            requests = _requests(message.container_requests, ContainerAllocateRequest)
            responses = [self._allocate_container(i, req.devices_ids) for i, req in enumerate(requests)]
        except RequestError as exc:
            self._count("Allocate", started, ok=False)
            log.warning("allocate.rejected", resource=self._resource.name, reason=str(exc))
            raise GRPCError(Status.INVALID_ARGUMENT, f"{self._resource.name}: {exc}") from None
        self._count("Allocate", started, ok=True)
        return EncodedAllocateResponse(responses)

    def _allocate_container(self, index: int, ids: Sequence[str]) -> ContainerAllocateResponse:
        resource = self._resource
        where = f"container request {index}"
        _check_ids(ids, where)
        if not ids:
            raise RequestError(f"{where} lists no device IDs")
        total = max(resource.device_count, resource.shared_count)
        if len(ids) > total:
            raise RequestError(f"{where} lists {len(ids)} device IDs; this resource has only {total} devices")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dups = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
            raise RequestError(f"{where} lists device IDs more than once: {_quote(dups)}")
        if not self._all_known(ids):
            unknown = [i for i in ids if not self._knows(i)]
            raise RequestError(f"{where}: unknown device IDs for {resource.name}: {_quote(unknown)}")
        blocked = resource.blocked
        if blocked and not blocked.keys().isdisjoint(ids):
            # The kubelet's view lags the list we sent: never hand a CPU that another container holds.
            refused = [f"{i!r}: {blocked[i]}" for i in ids if i in blocked]
            raise RequestError(f"{where}: devices not available: " + "; ".join(refused[:_QUOTED_IDS]))
        if (
            not resource.exclusive_pool
            and not resource.shared_groups
            and resource.exclusive.keys().isdisjoint(ids)
        ):
            # Millicpus of the pool as it is now, all of them: what Resource.grant would find ID by ID.
            grant = Grant(shared=resource.cpus)
        else:
            grant = resource.grant(ids)
        cpus = grant.cpus
        if not cpus:
            # A shared pool whose every CPU is held exclusively or offline right now.
            raise RequestError(f"{where}: {resource.name} has no CPU to give right now")
        # Held from here on (a refused request above holds nothing).
        if self._on_allocated is not None:
            self._on_allocated(resource.name, ids)
        cpu_list = cpus.comma_list()
        base = resource.name.split("/", 1)[0]
        envs = {pool_env_name(resource.pool): cpu_list}
        devices = []
        if grant.exclusive:
            envs["EXCLUSIVE_CPUS"] = grant.exclusive.comma_list()
            devices = [
                DeviceSpec(container_path=path, host_path=path, permissions="r")
                for path in (f"/dev/cpu/{cpu}/cpuid" for cpu in grant.exclusive if cpu in self._cpuid_cpus)
            ]
        if grant.shared:
            envs["SHARED_CPUS"] = grant.shared.comma_list()
        count = len(ids)
        after_send(lambda: log.info("allocate", resource=resource.name, devices=count, cpus=cpus.format()))
        annotations = {f"{base}/cpus-{resource.pool}": cpu_list}
        claim = self._claims.issue(resource.name, ids) if self._claims is not None else None
        if claim is not None:
            # The kubelet copies it into this container's CRI annotations, where the NRI plugin reads it.
            annotations[claim_annotation_key(resource.name)] = claim
        return ContainerAllocateResponse(envs=envs, annotations=annotations, devices=devices)

    def _all_known(self, ids: Sequence[str]) -> bool:
        """Whether `_knows` holds for every ID; a shared pool's hundreds of millicpus are checked at once."""
        resource = self._resource
        if resource.exclusive_pool or len(ids) < _BATCH_MIN:
            return all(self._knows(i) for i in ids)
        limit = resource.shared_count
        if resource.configured and resource.cpus:
            limit = max(limit, resource.shared_recent)
        withheld = resource.shared_withheld
        # Below the limit and not withheld is what _knows accepts for an ID that is a millicpu's.
        if _millicpu_ids_below(ids, limit) and (
            not withheld or withheld.isdisjoint(map(int, ids, itertools.repeat(36, len(ids))))
        ):
            return True
        return all(self._knows(i) for i in ids)

    def _knows(self, device_id: str) -> bool:
        resource = self._resource
        if resource.has_device(device_id):
            return True
        # A shared pool's millicpus are interchangeable: one beyond the count the kubelet saw a moment ago
        # still means "the shared CPUs".
        if resource.exclusive_pool or not resource.configured or not resource.cpus:
            return False
        index = shared_device_index(device_id)
        return index is not None and index < resource.shared_recent and index not in resource.shared_withheld

    async def pre_start_container(self, message: PreStartContainerRequest) -> PreStartContainerResponse:
        return PreStartContainerResponse()

    def _count(self, method: str, started: float, *, ok: bool) -> None:
        self._timed[method].observe(time.perf_counter() - started)
        self._counted[method, ok].inc()


async def _socket_answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout=1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class ResourceServer:
    """One resource's grpclib server on its own unix socket. Owns the socket file while it runs."""

    def __init__(self, servicer: ResourceServicer, path: Path) -> None:
        self.servicer = servicer
        self.path = path
        self._server: TrackingServer | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        # grpclib would silently replace a socket another process still serves: refuse instead, and clear a
        # dead file left by a crash.
        if self.path.exists() or self.path.is_symlink():
            if await _socket_answers(self.path):
                raise SocketInUseError(f"{self.path}: another process already serves this socket")
            log.info("socket.stale_removed", path=str(self.path))
            self.path.unlink(missing_ok=True)
        server = TrackingServer([self.servicer], self.servicer.direct_answers())
        # The socket is born 0600: only root (the kubelet) may call Allocate or ListAndWatch.
        previous_umask = os.umask(0o177)
        try:
            await server.start(path=str(self.path))
        finally:
            os.umask(previous_umask)
        self._server = server
        self._inode = self.path.stat().st_ino
        log.info("server.started", resource=self.servicer.resource.name, socket=str(self.path))

    async def end_streams_and_wait(self, timeout_s: float) -> bool:
        """End every ListAndWatch stream and wait until the clients that held them hang up (the kubelet
        closes a client's connection once its stream ends); False if some connection is still open."""
        server = self._server
        self.servicer.end_streams()
        if server is None:
            return True
        waiting = server.open_connections()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(not p.connection.is_closing() for p in waiting):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def relocate(self, path: Path) -> None:
        """Serve on another socket path (the kubelet refuses the old one until it restarts)."""
        await self.close()
        self.path = path
        await self.start()

    def socket_present(self) -> bool:
        """False when our socket file is gone or replaced (a starting kubelet deletes every socket)."""
        try:
            return self._inode is not None and self.path.stat().st_ino == self._inode
        except OSError:
            return False

    async def close(self, grace_s: float = 1.0) -> None:
        """End the streams, let in-flight calls answer (they take milliseconds), then close everything."""
        self.servicer.end_streams()
        server, self._server = self._server, None
        if server is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace_s
            in_flight = self.servicer.in_flight()
            if in_flight:
                await asyncio.wait(in_flight, timeout=grace_s)
            # A direct answer (agent.connection) whose message waits for the kubelet's flow-control window:
            # within the same grace. Waited for only when there is one: each loop turn spent here is one in
            # which the kubelet could still call a servicer whose resource is gone.
            waiting = server.answers_waiting()
            if waiting:
                sent = [asyncio.ensure_future(event.wait()) for event in waiting]
                _, unsent = await asyncio.wait(sent, timeout=max(0.0, deadline - loop.time()))
                for task in unsent:
                    task.cancel()
            server.close()
            server.drop_connections()
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=5.0)
            except TimeoutError:
                log.warning("server.close_timeout", resource=self.servicer.resource.name)
        if self.socket_present():
            self.path.unlink(missing_ok=True)
        self._inode = None
        log.info("server.stopped", resource=self.servicer.resource.name, socket=str(self.path))


class RegistrationError(RuntimeError):
    pass


# The kubelet (v1.37) keeps an endpoint per socket path and refuses a Register for a path it still holds.
ALREADY_CONNECTED = "already connected"


async def register(
    plugin_dir: Path, resource: Resource, timeout_s: float = 10.0, endpoint: str | None = None
) -> None:
    """Send one Register for `resource`; the kubelet calls GetDevicePluginOptions on us before it answers."""
    kubelet = plugin_dir / KUBELET_SOCKET
    if not kubelet.exists():
        raise RegistrationError(f"{kubelet} does not exist (is the kubelet running?)")
    channel = Channel(path=str(kubelet))
    try:
        request = RegisterRequest(
            version=API_VERSION,
            endpoint=endpoint or resource.socket_name,
            resource_name=resource.name,
            options=DevicePluginOptions(get_preferred_allocation_available=resource.exclusive_pool),
        )
        await RegistrationStub(channel).register(request, timeout=timeout_s)
    except GRPCError as exc:
        raise RegistrationError(f"kubelet refused {resource.name}: {exc.status.name} {exc.message}") from exc
    except (OSError, TimeoutError, StreamTerminatedError, ProtocolError) as exc:
        raise RegistrationError(f"cannot reach the kubelet at {kubelet}: {exc!r}") from exc
    finally:
        channel.close()
