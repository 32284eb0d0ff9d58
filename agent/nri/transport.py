"""ttrpc over NRI's connection multiplexer, on asyncio streams.

NRI (github.com/containerd/nri pkg/net/multiplex) carries two logical connections on one unix socket: frames
of ``[conn id: u32 BE][length: u32 BE][payload]``; connection 1 carries the Plugin service (the runtime calls,
the plugin serves), connection 2 the Runtime service (the plugin calls). Each logical connection is a byte
stream of ttrpc messages: ``[length: u32 BE][stream id: u32 BE][type: u8][flags: u8][payload]`` where type 1
is a request, 2 a response, 3 stream data; a client numbers its streams 1, 3, 5, ...

Everything unexpected (oversize lengths, unknown connections or streams, undecodable messages) is a
ProtocolError: the connection is dropped and the owner dials again. Nothing is skipped and resynchronised,
because neither framing has a resync marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from agent.nri.wire import TtrpcRequest, TtrpcResponse, WireError

log = structlog.get_logger(__name__)

PLUGIN_CONN = 1
RUNTIME_CONN = 2

TTRPC_HEADER = struct.Struct(">IIBB")
MUX_HEADER = struct.Struct(">II")
# ttrpc's messageLengthMax; the mux allows a ttrpc header on top of it.
MAX_MESSAGE = 4 << 20
MAX_MUX_PAYLOAD = TTRPC_HEADER.size + MAX_MESSAGE
# Go's ttrpc writes through a 4 KiB bufio.Writer and its mux connection refuses a frame larger than the
# reader's buffer: frames of at most this size, one message never sharing a frame, read back safely there.
MUX_CHUNK = 4096

TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA = 1, 2, 3

# google.golang.org/grpc/codes
CODE_UNKNOWN = 2
CODE_DEADLINE_EXCEEDED = 4
CODE_UNIMPLEMENTED = 12
CODE_UNAVAILABLE = 14


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow; the connection cannot be trusted any more."""


class ConnectionLost(Exception):
    """The connection closed while a call was waiting for its answer."""


class TtrpcError(Exception):
    """A call answered with a non-OK status (or a handler that wants to answer with one)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"ttrpc status {code}: {message}")
        self.code = code
        self.message = message


Handler = Callable[[TtrpcRequest], Awaitable[bytes]]


@dataclass
class _Stream:
    """Bytes received on one logical connection that do not make a whole ttrpc message yet."""

    buffer: bytearray


def mux_frames(conn: int, message: bytes) -> bytes:
    """One ttrpc message as mux frames of at most MUX_CHUNK payload bytes."""
    parts = []
    for start in range(0, len(message), MUX_CHUNK):
        chunk = message[start : start + MUX_CHUNK]
        parts.append(MUX_HEADER.pack(conn, len(chunk)))
        parts.append(chunk)
    return b"".join(parts)


def ttrpc_message(stream_id: int, kind: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise ProtocolError(
            f"refusing to send a {len(payload)}-byte message (ttrpc's limit is {MAX_MESSAGE})"
        )
    return TTRPC_HEADER.pack(len(payload), stream_id, kind, flags) + payload


class MuxConnection:
    """One connection to the runtime: serves requests on PLUGIN_CONN and calls out on RUNTIME_CONN.

    Owns its handler tasks; `run()` returns when the peer closes and raises ProtocolError on bad input.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._streams = {PLUGIN_CONN: _Stream(bytearray()), RUNTIME_CONN: _Stream(bytearray())}
        self._pending: dict[int, asyncio.Future[TtrpcResponse]] = {}
        self._next_stream = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self) -> None:
        """Read frames until the peer closes; every fault closes the connection before it propagates."""
        try:
            while True:
                try:
                    header = await self._reader.readexactly(MUX_HEADER.size)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise ProtocolError("connection closed inside a mux header") from None
                    return
                conn, size = MUX_HEADER.unpack(header)
                if size > MAX_MUX_PAYLOAD:
                    raise ProtocolError(
                        f"mux frame of {size} bytes on connection {conn} (limit {MAX_MUX_PAYLOAD})"
                    )
                stream = self._streams.get(conn)
                if stream is None:
                    raise ProtocolError(f"mux frame for unknown connection {conn}")
                try:
                    payload = await self._reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    raise ProtocolError("connection closed inside a mux frame") from None
                stream.buffer += payload
                self._drain(conn, stream)
        finally:
            await self.close()

    def _drain(self, conn: int, stream: _Stream) -> None:
        buffer = stream.buffer
        while len(buffer) >= TTRPC_HEADER.size:
            length, stream_id, kind, _flags = TTRPC_HEADER.unpack_from(buffer)
            if length > MAX_MESSAGE:
                raise ProtocolError(
                    f"ttrpc message of {length} bytes on connection {conn} (limit {MAX_MESSAGE})"
                )
            end = TTRPC_HEADER.size + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[TTRPC_HEADER.size : end])
            del buffer[:end]
            if conn == PLUGIN_CONN:
                self._on_request(stream_id, kind, payload)
            else:
                self._on_response(stream_id, kind, payload)

    def _on_request(self, stream_id: int, kind: int, payload: bytes) -> None:
        if kind != TYPE_REQUEST:
            raise ProtocolError(f"message type {kind} on the plugin connection (only requests expected)")
        if stream_id % 2 != 1:
            raise ProtocolError(f"request on stream {stream_id}: a client's streams are odd")
        try:
            request = TtrpcRequest.decode(payload)
        except WireError as exc:
            raise ProtocolError(f"undecodable request on stream {stream_id}: {exc}") from exc
        task = asyncio.create_task(self._serve(stream_id, request), name=f"nri:{request.method}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream_id: int, request: TtrpcRequest) -> None:
        try:
            reply = TtrpcResponse(payload=await self._handler(request))
        except TtrpcError as exc:
            reply = TtrpcResponse(code=exc.code, message=exc.message)
        except Exception as exc:  # the handler's bug must not take the connection down
            log.exception("nri.handler_failed", method=request.method)
            reply = TtrpcResponse(code=CODE_UNKNOWN, message=f"{request.method}: {exc!r}")
        with contextlib.suppress(ConnectionLost, ConnectionError, RuntimeError):
            self._send(PLUGIN_CONN, ttrpc_message(stream_id, TYPE_RESPONSE, reply.encode()))
            await self._writer.drain()

    def _on_response(self, stream_id: int, kind: int, payload: bytes) -> None:
        if kind != TYPE_RESPONSE:
            raise ProtocolError(f"message type {kind} on the runtime connection (only responses expected)")
        future = self._pending.pop(stream_id, None)
        if future is None:
            raise ProtocolError(f"response on stream {stream_id}, which no call of ours opened")
        try:
            response = TtrpcResponse.decode(payload)
        except WireError as exc:
            raise ProtocolError(f"undecodable response on stream {stream_id}: {exc}") from exc
        if not future.done():
            future.set_result(response)

    def _send(self, conn: int, message: bytes) -> None:
        if self._closed:
            raise ConnectionLost("connection to the runtime is closed")
        self._writer.write(mux_frames(conn, message))

    async def call(self, service: str, method: str, payload: bytes, timeout_s: float) -> bytes:
        """Call the runtime; raises TtrpcError for a non-OK status, ConnectionLost, or TimeoutError."""
        stream_id = self._next_stream
        self._next_stream += 2
        future: asyncio.Future[TtrpcResponse] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        request = TtrpcRequest(service, method, payload, int(timeout_s * 1e9))
        try:
            self._send(RUNTIME_CONN, ttrpc_message(stream_id, TYPE_REQUEST, request.encode()))
            await self._writer.drain()
            async with asyncio.timeout(timeout_s):
                response = await future
        except (ConnectionError, RuntimeError) as exc:
            raise ConnectionLost(f"{method}: {exc!r}") from exc
        finally:
            self._pending.pop(stream_id, None)
        if response.code:
            raise TtrpcError(response.code, response.message)
        return response.payload

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost("connection to the runtime closed"))
        self._pending.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
