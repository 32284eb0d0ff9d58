"""The device plugin server's connections to the kubelet: grpclib's HTTP/2 protocol, its writes coalesced
per loop turn, and the admission path's unary calls answered as soon as their request is in."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import structlog
from grpclib import GRPCError
from grpclib.metadata import Deadline, encode_grpc_message
from grpclib.protocol import H2Protocol
from grpclib.server import Server
from h2.connection import ConnectionState, H2Connection
from h2.events import DataReceived, PriorityUpdated, RequestReceived, StreamEnded, WindowUpdated
from h2.exceptions import ProtocolError as H2ProtocolError

log = structlog.get_logger(__name__)

# grpclib's request checks, and its reply's headers and OK trailers, as it writes them for a unary call.
_GRPC_CONTENT_TYPES = frozenset({"application/grpc", "application/grpc+proto"})
_REPLY_HEADERS = [(":status", "200"), ("content-type", "application/grpc+proto")]
_OK_TRAILERS = [("grpc-status", "0")]
# Events of a request's stream that change nothing of its call (h2 has applied them): gRPC's C core sends a
# WINDOW_UPDATE for its answer between a request's HEADERS and DATA.
_STREAM_NEWS = (WindowUpdated, PriorityUpdated)

# The one grpclib internal the agent relies on (docs/lifecycle.md): grpclib has no public hook for the
# connections it accepts, and one left open after close() would let the kubelet call a servicer whose plan
# is gone. A grpclib without it stops the agent at import; tests/test_hardening.py checks it is still called.
if not callable(getattr(Server, "_protocol_factory", None)):
    raise ImportError(
        "grpclib.server.Server._protocol_factory no longer exists: ResourceServer.close() could not drop "
        "the kubelet's connections; see docs/lifecycle.md"
    )


# What one read from a kubelet connection takes at most. The socket is read into one buffer per connection:
# asyncio's default read allocates 256 KiB for each recv and shrinks it to the bytes received, which for a
# request of a few hundred bytes costs glibc an mmap, an mremap and an munmap per read, three system calls
# of each read's five (docs/benchmarks.md). A longer burst just takes more reads.
READ_SIZE = 64 * 1024

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
answer_has_sequel: contextvars.ContextVar[bool] = contextvars.ContextVar("answer_has_sequel", default=False)


class _Deferred(threading.local):
    """The calls made while a connection answers one read, to run once that read's answers are sent: one
    list while ServerProtocol.data_received runs, none otherwise. Per thread: a worker thread's call is
    never queued on the loop thread's read."""

    def __init__(self) -> None:
        self.reads: list[list[Callable[[], object]]] = []


_after_send = _Deferred()


def after_send(call: Callable[[], object]) -> None:
    """Run `call` once the answer being made has been sent, keeping it (a log line's rendering and write) off
    the admission's path. Within a read a connection answers directly, it runs right after that read's send,
    in the same loop turn: a call_soon would cost each Allocate a loop turn of its own, an epoll_wait and
    the loop's bookkeeping. Otherwise it runs on the next loop turn (grpclib's path writes the answer's
    last frame as the handler returns), or at once without a running loop (tests drive servicers so)."""
    reads = _after_send.reads
    if reads:
        reads[-1].append(call)
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        call()
        return
    loop.call_soon(call)


def _run_after_send(calls: list[Callable[[], object]]) -> None:
    for call in calls:
        try:
            call()
        except Exception as exc:  # as the loop treats a failing callback: reported, the rest still run
            asyncio.get_running_loop().call_exception_handler(
                {"message": "a call made after an answer was sent failed", "exception": exc}
            )


class CoalescingTransport(asyncio.Transport):
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
        # Between hold() and release(): writes wait for release(), which sends them in one go.
        self._held = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        data = bytes(data)
        if self._sequel_due and len(data) == _PING_ACK_SIZE and data.startswith(_PING_ACK_HEADER):
            self._acks.append(data)
            if self._ack_timer is None:
                self._ack_timer = self._loop.call_later(ACK_HOLD_S, self._flush)
            return
        self._sequel_due = answer_has_sequel.get()
        self._pending.append(data)
        self._size += len(data)
        if self._size >= _COALESCE_MAX:
            self._flush()
        elif self._held:
            return
        elif len(data) >= 9 and data[3] == _HEADERS and data[4] & _END_STREAM:
            # A call's trailers end its answer: nothing of it is left to wait for.
            self._flush()
        elif len(self._pending) == 1:
            self._loop.call_soon(self._flush)

    def hold(self) -> None:
        """Keep every write until release(): the protocol is handling one read from the socket."""
        self._held = True

    def release(self, *, sequel: bool = False) -> None:
        """Send what was written since hold(), in one send. `sequel`: the last answer written was a
        GetPreferredAllocation's, so an Allocate follows on this connection."""
        self._held = False
        if self._pending:
            # A PING's acknowledgement held for an answer still waits for one (write()).
            self._flush()
        if sequel:
            self._sequel_due = True

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


class Direct(NamedTuple):
    """A unary method answered from its request's bytes to its reply's bytes, synchronously: it raises
    GRPCError for a request it refuses."""

    answer: Callable[[bytes], bytes]
    # Its answer is a GetPreferredAllocation's: an Allocate follows on the connection (the PING hold above).
    has_sequel: bool = False


def _h2_of(protocol: H2Protocol) -> H2Connection | None:
    """The h2 connection under grpclib's protocol, if grpclib is still made as ServerProtocol expects: its
    h2 connection is private (`Connection._connection`), and its `Connection.feed()`/`flush()` and event
    processor's `process()`/`close()` are what its own data_received calls."""
    connection = getattr(protocol, "connection", None)
    processor = getattr(protocol, "processor", None)
    h2 = getattr(connection, "_connection", None)
    parts = [getattr(connection, "feed", None), getattr(connection, "flush", None)]
    parts += [getattr(processor, "process", None), getattr(processor, "close", None)]
    if not isinstance(h2, H2Connection) or not all(map(callable, parts)):
        return None
    return h2


class ServerProtocol(asyncio.BufferedProtocol):
    """grpclib's HTTP/2 protocol for one kubelet connection, with the admission path's calls answered at once.

    Each read from the socket goes through h2 as grpclib would feed it. A call to one of the `direct` methods
    whose request came whole in that read (its HEADERS, its one message, its END_STREAM) is answered right
    there: the request's bytes go to the method and its reply goes out with the read's other writes. grpclib
    would start a task per call, wrap the request in its own stream objects and write the answer from that
    task, a loop turn or more later: about a fifth of the agent's CPU per admission (docs/benchmarks.md).
    Every other event, and any call that is not plain (split over reads, compressed, another content type, a
    malformed gRPC message), goes to grpclib exactly as before, which answers it (or its error) as it always
    did. The reply's frames, headers and status are grpclib's, byte for byte (tests/test_connection.py).

    h2 itself is reached through grpclib's Connection, one internal (docs/lifecycle.md): without it the
    protocol logs a warning and leaves every call to grpclib, and tests/test_hardening.py fails.

    The socket is read into a buffer the protocol keeps (READ_SIZE); each read's bytes are copied out of it
    before h2 sees them, so nothing h2 or grpclib keeps refers to the buffer the next read overwrites."""

    def __init__(self, inner: H2Protocol, direct: Mapping[str, Direct]) -> None:
        self.inner = inner
        self._direct = direct
        self._transport: CoalescingTransport | None = None
        self._h2: H2Connection | None = None
        # Answers whose message waits for the kubelet's flow-control window: (stream, bytes still to send).
        self._waiting: collections.deque[tuple[int, bytes]] = collections.deque()
        # Set while no answer waits (ResourceServer.close() lets them go out first).
        self.all_sent = asyncio.Event()
        self.all_sent.set()
        self.answered_directly = 0
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            transport = self._transport = CoalescingTransport(transport)
        self.inner.connection_made(transport)
        h2 = _h2_of(self.inner)
        if h2 is not None and self._transport is not None:
            self._h2 = h2
        elif self._direct:
            log.warning("grpclib.internals_moved", effect="every call answered by grpclib's own path")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._view[:nbytes]))

    def data_received(self, data: bytes) -> None:
        h2, transport = self._h2, self._transport
        if h2 is None or transport is None:
            self.inner.data_received(data)
            return
        inner = self.inner
        connection = inner.connection
        transport.hold()
        sequel = False
        deferred: list[Callable[[], object]] = []
        reads = _after_send.reads
        reads.append(deferred)
        try:
            # grpclib's own data_received, with the direct calls taken out of the event stream.
            try:
                events = connection.feed(data)
            except H2ProtocolError:
                log.debug("h2.protocol_error", exc_info=True)
                inner.processor.close("Protocol error")
                return
            connection.flush()
            process = inner.processor.process
            for index, event in enumerate(events):
                if event.__class__ is RequestReceived:
                    answered = self._answer(h2, event, events, index)
                    if answered is not None:
                        sequel = answered
                        continue
                process(event)
            if self._waiting:
                self._send_waiting(h2)
            connection.flush()
        finally:
            reads.pop()
            transport.release(sequel=sequel)
            if deferred:
                _run_after_send(deferred)

    def _answer(self, h2: H2Connection, event: RequestReceived, events: list[Any], index: int) -> bool | None:
        """Answer `event`'s call if it is a direct one that came whole; None leaves it to grpclib. True: the
        answer has a sequel (transport.release)."""
        # Text, not bytes: grpclib's h2 configuration decodes header fields as ASCII.
        headers: dict[str, str] = dict(cast(Any, event.headers) or ())
        direct = self._direct.get(headers.get(":path", ""))
        if (
            direct is None
            or headers.get(":method") != "POST"
            or headers.get("content-type") not in _GRPC_CONTENT_TYPES
            or headers.get("te") != "trailers"
            or headers.get("grpc-encoding", "identity") != "identity"
        ):
            return None
        if "grpc-timeout" in headers:
            # grpclib refuses a malformed one with its own error; a valid one cannot expire in a direct call.
            try:
                Deadline.from_headers(event.headers)  # type: ignore[arg-type]
            except ValueError:
                return None
        stream_id = event.stream_id
        stream = h2.streams.get(stream_id)
        if stream is None or stream.closed or h2.state_machine.state is ConnectionState.CLOSED:
            # The kubelet reset the call, or ended the connection, in this same read: nothing can be sent on
            # it. grpclib cancels such a call before it runs, so it is not answered here either (that would
            # count its IDs as held and issue a claim for an answer nobody receives). Nor is it handed to
            # grpclib, whose task, cancelled unstarted, never releases the call's stream nor gives its
            # request's bytes back to the connection's window: left out of grpclib's streams, the request's
            # DATA goes through grpclib's unknown-stream path, which gives them back.
            log.info(
                "call.abandoned",
                stream=stream_id,
                path=headers[":path"],
                reason="the client reset the stream or ended the connection in the same read",
            )
            return False
        body: list[bytes] = []
        for later in itertools.islice(events, index + 1, None):
            if getattr(later, "stream_id", None) != stream_id:
                continue
            if later.__class__ is DataReceived:
                body.append(later.data)
            elif later.__class__ is StreamEnded:
                break
            elif later.__class__ not in _STREAM_NEWS:
                return None  # a reset: grpclib's to handle
        else:
            return None  # the rest of the request comes in a later read
        message = body[0] if len(body) == 1 else b"".join(body)
        # One uncompressed gRPC message, exactly: anything else is grpclib's to refuse.
        if len(message) < 5 or message[0] != 0 or int.from_bytes(message[1:5], "big") != len(message) - 5:
            return None
        self.answered_directly += 1
        try:
            reply = direct.answer(message[5:])
        except GRPCError as exc:
            # A trailers-only answer, as grpclib makes it.
            trailers = [*_REPLY_HEADERS, ("grpc-status", str(exc.status.value))]
            if exc.message is not None:
                trailers.append(("grpc-message", encode_grpc_message(exc.message)))
            try:
                h2.send_headers(stream_id, trailers, end_stream=True)
            except H2ProtocolError as send_exc:
                log.info("answer.dropped", stream=stream_id, reason=repr(send_exc))
            return False
        try:
            h2.send_headers(stream_id, _REPLY_HEADERS)
        except H2ProtocolError as exc:
            # The kubelet reset the stream in this same read (it gave up on the call).
            log.info("answer.dropped", stream=stream_id, reason=repr(exc))
            return False
        self._waiting.append((stream_id, b"\0" + len(reply).to_bytes(4, "big") + reply))
        self.all_sent.clear()
        self._send_waiting(h2)
        # The DataReceived and StreamEnded events of this call still go to grpclib, which knows no stream of
        # that ID: it gives the request's bytes back to the connection's flow-control window, as it does for
        # a stream it has released.
        return direct.has_sequel

    def _send_waiting(self, h2: H2Connection) -> None:
        """Send the waiting answers as far as the kubelet's flow-control windows allow. Each stream has a
        window of its own, as each grpclib call sends on its own: one answer waiting for its stream's window
        does not hold back another's (the connection's window, shared, goes to the oldest answer first)."""
        still: collections.deque[tuple[int, bytes]] = collections.deque()
        for stream_id, unsent in self._waiting:
            rest = unsent
            stream = h2.streams.get(stream_id)
            if stream is None or stream.closed:
                # The kubelet reset the stream (it gave up on the call): nothing is left to send on it, and
                # its window may never open again.
                log.info("answer.dropped", stream=stream_id, reason="stream closed by the client")
                continue
            try:
                while rest:
                    size = min(len(rest), h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
                    if size <= 0:
                        # Sent on when a WINDOW_UPDATE (or new SETTINGS) comes in: data_received calls again.
                        break
                    h2.send_data(stream_id, rest if size == len(rest) else rest[:size])
                    rest = rest[size:]
                if not rest:
                    h2.send_headers(stream_id, _OK_TRAILERS, end_stream=True)
            except H2ProtocolError as exc:
                # The connection is closing: nothing is left to send on it.
                log.info("answer.dropped", stream=stream_id, reason=repr(exc))
                continue
            if rest:
                still.append((stream_id, rest))
        self._waiting = still
        if not still:
            self.all_sent.set()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting.clear()
        self.all_sent.set()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class TrackingServer(Server):
    """grpclib's Server, remembering its connections so that close() can end them.

    grpclib's own close() cancels in-flight calls without answering them and leaves the connections open:
    a client then waits forever. The agent lets calls finish first and closes the connections after, so a
    client sees either its answer or a closed connection it can redial at once. Each connection's writes are
    coalesced per loop turn (CoalescingTransport).
    """

    def __init__(self, handlers: list[Any], direct: Mapping[str, Direct] | None = None) -> None:
        super().__init__(handlers)
        self._direct: Mapping[str, Direct] = direct or {}
        self.connections: weakref.WeakSet[ServerProtocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        outer = ServerProtocol(super()._protocol_factory(), self._direct)
        self.connections.add(outer)
        # grpclib hands this factory to loop.create_unix_server, which only needs an asyncio protocol.
        return outer  # type: ignore[return-value]

    def answers_waiting(self) -> list[asyncio.Event]:
        """The connections' `all_sent` events not set yet: direct answers still wait for the kubelet's
        flow-control window there."""
        return [c.all_sent for c in list(self.connections) if not c.all_sent.is_set()]

    def answered_directly(self) -> int:
        return sum(c.answered_directly for c in self.connections)

    def open_connections(self) -> list[H2Protocol]:
        # `connection` is set once the transport is made; Connection.is_closing() is grpclib's public test.
        protocols = [c.inner for c in list(self.connections)]
        return [p for p in protocols if hasattr(p, "connection") and not p.connection.is_closing()]

    def drop_connections(self) -> None:
        for protocol in self.open_connections():
            protocol.connection.close()
