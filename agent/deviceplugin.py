"""The device plugin API v1beta1 for one resource: the grpclib servicer, its server socket, registration."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol
from grpclib.server import Server

from agent.allocation import AllocationError, preferred_allocation
from agent.claim import ClaimKey
from agent.claim import annotation_key as claim_annotation_key
from agent.config import pool_env_name
from agent.cpuset import CpuSet
from agent.idset import SHARED_ID_PATTERN, shared_device_id, shared_device_index
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


# From this many IDs on, a shared pool's Allocate checks them in one pass (_all_shared_ids) rather than one by
# one: 500 millicpus took about 0.5 ms ID by ID.
_BATCH_MIN = 16
_SHARED_IDS = re.compile(f"(?:{SHARED_ID_PATTERN})(?:,(?:{SHARED_ID_PATTERN}))*")


def _all_shared_ids(ids: Sequence[str]) -> bool:
    """Whether every ID is of a millicpu's form (what shared_device_index accepts).

    One regular expression over the joined IDs replaces one match per ID; an ID holding a comma would pass
    as two, so the comma count must be exactly the separators'."""
    joined = ",".join(ids)
    return joined.count(",") == len(ids) - 1 and _SHARED_IDS.fullmatch(joined) is not None


def _all_below(ids: Sequence[str], limit: int) -> bool:
    """Whether every ID of a millicpu's form is below millicpu `limit`. Base 36 without leading zeros orders
    as (length, text): IDs shorter than the limit's are below it, and only when the longest is as long does
    max() (in C) pick the largest."""
    longest = max(map(len, ids))
    bound = len(shared_device_id(limit))
    if longest != bound:
        return longest < bound
    return int(max(zip(map(len, ids), ids, strict=True))[1], 36) < limit


def _after_answer(call: Callable[[], object]) -> None:
    """Run `call` once the answer being made has been sent: a log line's rendering and write stay off the
    admission's path. (A servicer driven without an event loop, as some tests do, runs it at once.)"""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        call()
        return
    loop.call_soon(call)


def _check_ids(ids: Sequence[object], where: str) -> None:
    # map() keeps the check in C: a generator expression cost ~0.1 µs per ID, 50 µs for 500 millicpus.
    if not all(map(isinstance, ids, itertools.repeat(str))):
        raise RequestError(f"{where}: device IDs must be strings (malformed message)")


def _guarded(
    path: str, func: Callable[[Any], Awaitable[None]], calls: set[asyncio.Task[Any]]
) -> Callable[[Any], Awaitable[None]]:
    """Any failure other than a gRPC status becomes one, logged: a bad request never surfaces as a crash.

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
            _answer_has_sequel.set(True)
        try:
            await func(stream)
        except (GRPCError, asyncio.CancelledError):
            raise
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            log.warning("request.malformed", method=path, reason=repr(exc))
            raise GRPCError(Status.INVALID_ARGUMENT, f"{path}: malformed request: {exc}") from None
        except Exception as exc:
            log.exception("request.failed", method=path)
            raise GRPCError(Status.INTERNAL, f"{path}: {exc!r}") from None

    return handler


_PREFERRED_PATH = "/v1beta1.DevicePlugin/GetPreferredAllocation"
_DECODERS: dict[str, type] = {
    "/v1beta1.DevicePlugin/Allocate": AllocateRequestDecoder,
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

    async def get_preferred_allocation(
        self, message: PreferredAllocationRequest
    ) -> PreferredAllocationResponse:
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
        _after_answer(lambda: log.info("allocate", resource=resource.name, devices=count, cpus=cpus.format()))
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
        if _all_shared_ids(ids):
            limit = resource.shared_count
            if resource.configured and resource.cpus:
                limit = max(limit, resource.shared_recent)
            withheld = resource.shared_withheld
            # Below the limit and not withheld is what _knows accepts for an ID that is a millicpu's.
            if _all_below(ids, limit) and (
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
        name = self._resource.name
        self._metrics.allocation_seconds.observe(time.perf_counter() - started, resource=name, method=method)
        self._metrics.allocations.inc(resource=name, method=method, result="ok" if ok else "error")


async def _socket_answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout=1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# The one grpclib internal the agent relies on (docs/lifecycle.md): grpclib has no public hook for the
# connections it accepts, and one left open after close() would let the kubelet call a servicer whose plan
# is gone. A grpclib without it stops the agent at import; tests/test_hardening.py checks it is still called.
if not callable(getattr(Server, "_protocol_factory", None)):
    raise ImportError(
        "grpclib.server.Server._protocol_factory no longer exists: ResourceServer.close() could not drop "
        "the kubelet's connections; see docs/lifecycle.md"
    )


# A write at least this big goes out at once (with whatever is pending before it) instead of waiting for the
# end of the loop turn: the kernel's socket buffer takes it in pieces anyway, and the transport's own buffer
# limits must keep telling grpclib to pause a big ListAndWatch list.
_COALESCE_MAX = 64 * 1024

# A PING's acknowledgement as h2 writes it when nothing else is due: the 9-byte frame header (length 8,
# type PING, flag ACK, stream 0) and the 8 bytes of the PING it answers.
_PING_ACK_HEADER = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00"
_PING_ACK_SIZE = len(_PING_ACK_HEADER) + 8
# A HEADERS frame with END_STREAM: a call's trailers (or its whole answer when it fails at once).
_HEADERS = 0x1
_END_STREAM = 0x1
# The longest a PING's acknowledgement waits for the answer it rides with. The kubelet sends Allocate within
# a millisecond or two of the GetPreferredAllocation answer; this only bounds a kubelet that does not.
ACK_HOLD_S = 0.1

# Set in the task that answers a GetPreferredAllocation: that answer's writes tell the connection's
# transport that an Allocate follows on it.
_answer_has_sequel: contextvars.ContextVar[bool] = contextvars.ContextVar("answer_has_sequel", default=False)


class _CoalescingTransport(asyncio.Transport):
    """A socket transport whose writes of one loop turn leave in a single send.

    grpclib writes a unary answer as three frames, each straight to the socket: HEADERS, DATA, then the
    trailers' HEADERS. Each send is a system call of its own (about 0.15 ms on a 2-vCPU VM) and wakes the
    kubelet's reader, which can do nothing until the trailers are in. Writes made while one handler step
    runs are kept and sent together once that step is over (loop.call_soon), in order.

    A PING acknowledged after a GetPreferredAllocation answer rides with the Allocate answer that follows
    (ACK_HOLD_S at most). The kubelet's gRPC client sends a PING (its bandwidth probe) whenever an answer's
    DATA arrives and no PING of its is unanswered: acknowledged at once, each admission cost two PINGs, each
    a wake-up of the agent and a send. Acknowledged after the Allocate answer's frames, the Allocate answer
    finds its PING still out and starts none: one PING per admission, and no send of its own. HTTP/2 asks
    for a prompt acknowledgement (a SHOULD, RFC 9113 6.7); the kubelet uses these PINGs only to size its
    flow-control windows, and a PING sent while data flows is acknowledged with that data."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._pending: list[bytes] = []
        self._size = 0
        self._loop = asyncio.get_running_loop()
        # Acknowledgements held for the next answer, and the timer that sends them if none comes.
        self._acks: list[bytes] = []
        self._ack_timer: asyncio.TimerHandle | None = None
        # The last answer written was a GetPreferredAllocation's: its Allocate comes next.
        self._sequel_due = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        data = bytes(data)
        if self._sequel_due and len(data) == _PING_ACK_SIZE and data.startswith(_PING_ACK_HEADER):
            self._acks.append(data)
            if self._ack_timer is None:
                self._ack_timer = self._loop.call_later(ACK_HOLD_S, self._flush)
            return
        self._sequel_due = _answer_has_sequel.get()
        self._pending.append(data)
        self._size += len(data)
        if self._size >= _COALESCE_MAX or (len(data) >= 9 and data[3] == _HEADERS and data[4] & _END_STREAM):
            # A call's trailers end its answer: nothing of it is left to wait for.
            self._flush()
        elif len(self._pending) == 1:
            self._loop.call_soon(self._flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        pending, self._pending, self._size = self._pending, [], 0
        if self._acks:
            # After the answer's frames: its DATA must reach the kubelet while its PING is still out.
            pending += self._acks
            self._acks = []
            self._sequel_due = False
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        # What grpclib wrote before closing (an answer's trailers, a GOAWAY) still goes out first.
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending, self._size, self._acks = [], 0, []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class _CoalescingProtocol(asyncio.Protocol):
    """Hands grpclib's protocol a _CoalescingTransport; everything else passes straight through."""

    def __init__(self, inner: H2Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            transport = _CoalescingTransport(transport)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _TrackingServer(Server):
    """grpclib's Server, remembering its connections so that close() can end them.

    grpclib's own close() cancels in-flight calls without answering them and leaves the connections open:
    a client then waits forever. The agent lets calls finish first and closes the connections after, so a
    client sees either its answer or a closed connection it can redial at once. Each connection's writes are
    coalesced per loop turn (_CoalescingTransport).
    """

    def __init__(self, handlers: list[Any]) -> None:
        super().__init__(handlers)
        self.protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        self.protocols.add(protocol)
        # grpclib hands this factory to loop.create_unix_server, which only needs an asyncio protocol.
        return _CoalescingProtocol(protocol)  # type: ignore[return-value]

    def open_connections(self) -> list[H2Protocol]:
        # `connection` is set once the transport is made; Connection.is_closing() is grpclib's public test.
        return [p for p in list(self.protocols) if hasattr(p, "connection") and not p.connection.is_closing()]

    def drop_connections(self) -> None:
        for protocol in self.open_connections():
            protocol.connection.close()


class ResourceServer:
    """One resource's grpclib server on its own unix socket. Owns the socket file while it runs."""

    def __init__(self, servicer: ResourceServicer, path: Path) -> None:
        self.servicer = servicer
        self.path = path
        self._server: _TrackingServer | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        # grpclib would silently replace a socket another process still serves: refuse instead, and clear a
        # dead file left by a crash.
        if self.path.exists() or self.path.is_symlink():
            if await _socket_answers(self.path):
                raise SocketInUseError(f"{self.path}: another process already serves this socket")
            log.info("socket.stale_removed", path=str(self.path))
            self.path.unlink(missing_ok=True)
        server = _TrackingServer([self.servicer])
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
            in_flight = self.servicer.in_flight()
            if in_flight:
                await asyncio.wait(in_flight, timeout=grace_s)
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
