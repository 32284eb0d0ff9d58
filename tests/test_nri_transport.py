"""The NRI transport against hostile bytes: every fault drops the connection, the plugin dials again.

A fake runtime written here speaks raw frames (the well-formed path is tested against upstream NRI in
test_nri.py); hypothesis feeds the frame parser arbitrary input.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cpuset import CpuSet
from agent.metrics import Metrics
from agent.nri.plugin import PLUGIN_SERVICE, NriPlugin, NriSettings
from agent.nri.transport import (
    CODE_UNIMPLEMENTED,
    MAX_MESSAGE,
    MUX_HEADER,
    PLUGIN_CONN,
    RUNTIME_CONN,
    TTRPC_HEADER,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    MuxConnection,
    ProtocolError,
    mux_frames,
    ttrpc_message,
)
from agent.nri.wire import TtrpcRequest, TtrpcResponse


class _Writer:
    """Enough of asyncio.StreamWriter for the parser: what was written is kept."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None


async def _feed(data: bytes) -> tuple[BaseException | None, _Writer]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    writer = _Writer()

    async def handler(request: TtrpcRequest) -> bytes:
        return b""

    conn = MuxConnection(reader, writer, handler)  # type: ignore[arg-type]
    try:
        await conn.run()
    except ProtocolError as exc:
        return exc, writer
    return None, writer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_end_in_a_clean_close_or_a_protocol_error(data: bytes) -> None:
    error, writer = asyncio.run(_feed(data))
    assert error is None or isinstance(error, ProtocolError)
    assert writer.closed


@settings(max_examples=200, deadline=None)
@given(
    conn=st.integers(0, 2**32 - 1),
    stream=st.integers(0, 2**32 - 1),
    kind=st.integers(0, 255),
    body=st.binary(max_size=200),
)
def test_framed_garbage_never_escapes_as_another_error(
    conn: int, stream: int, kind: int, body: bytes
) -> None:
    message = TTRPC_HEADER.pack(len(body), stream, kind, 0) + body
    error, _ = asyncio.run(_feed(MUX_HEADER.pack(conn, len(message)) + message))
    assert error is None or isinstance(error, ProtocolError)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (MUX_HEADER.pack(PLUGIN_CONN, MAX_MESSAGE + 11), "mux frame of"),
        (MUX_HEADER.pack(PLUGIN_CONN, 10) + TTRPC_HEADER.pack(MAX_MESSAGE + 1, 1, 1, 0), "ttrpc message of"),
        (mux_frames(7, ttrpc_message(1, TYPE_REQUEST, b"")), "unknown connection 7"),
        (mux_frames(RUNTIME_CONN, ttrpc_message(9, TYPE_RESPONSE, b"")), "no call of ours opened"),
        (mux_frames(PLUGIN_CONN, ttrpc_message(1, TYPE_REQUEST, b"\xff\xff\xff")), "undecodable request"),
        (mux_frames(PLUGIN_CONN, ttrpc_message(2, TYPE_REQUEST, b"")), "streams are odd"),
    ],
)
async def test_each_fault_is_named(frame: bytes, reason: str) -> None:
    error, _ = await _feed(frame)
    assert isinstance(error, ProtocolError) and reason in str(error)


# --- a fake runtime on a real socket


class FakeRuntime:
    """Accepts plugin connections; each is handed to the test as (reader, writer) after RegisterPlugin."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.sessions: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeRuntime:
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.socket))
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn, stream, request = await read_message(reader)
        assert conn == RUNTIME_CONN and TtrpcRequest.decode(request).method == "RegisterPlugin"
        writer.write(mux_frames(RUNTIME_CONN, ttrpc_message(stream, TYPE_RESPONSE, TtrpcResponse().encode())))
        await self.sessions.put((reader, writer))


async def read_message(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """One whole ttrpc message (frames of one connection concatenated): (conn, stream id, payload)."""
    buffer = b""
    while True:
        conn, size = MUX_HEADER.unpack(await reader.readexactly(MUX_HEADER.size))
        buffer += await reader.readexactly(size)
        if len(buffer) >= TTRPC_HEADER.size:
            length, stream, _, _ = TTRPC_HEADER.unpack_from(buffer)
            if len(buffer) >= TTRPC_HEADER.size + length:
                return conn, stream, buffer[TTRPC_HEADER.size :]


async def call_plugin(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: int, method: str, payload: bytes
) -> TtrpcResponse:
    request = TtrpcRequest(PLUGIN_SERVICE, method, payload, 2_000_000_000)
    writer.write(mux_frames(PLUGIN_CONN, ttrpc_message(stream, TYPE_REQUEST, request.encode())))
    conn, answered, body = await read_message(reader)
    assert (conn, answered) == (PLUGIN_CONN, stream)
    return TtrpcResponse.decode(body)


class _View:
    def online_cpus(self) -> CpuSet:
        return CpuSet(range(8))

    def exclusive_cpus(self) -> CpuSet:
        return CpuSet([2, 3])

    def shared_cpus(self) -> CpuSet:
        return CpuSet()

    def owns(self, resource: str) -> bool:
        return False

    def cpus_for(self, assignments: Any) -> tuple[CpuSet, CpuSet]:
        return CpuSet(), CpuSet()

    def numa_nodes(self, cpus: CpuSet) -> CpuSet:
        return CpuSet([0])


class _NoDevices:
    async def of_pod(self, namespace: str, pod: str) -> dict[str, Any] | None:
        return {}

    async def of_all(self) -> dict[Any, Any]:
        return {}


@contextlib.asynccontextmanager
async def plugin_against(socket: Path) -> AsyncIterator[NriPlugin]:
    plugin = NriPlugin(NriSettings(socket=socket), _View(), _NoDevices(), Metrics())
    task = asyncio.create_task(plugin.run())
    try:
        yield plugin
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled(), "the plugin's run loop ended on its own"


async def test_malformed_frames_drop_the_connection_and_the_plugin_dials_again(tmp_path: Path) -> None:
    socket = tmp_path / "nri.sock"
    faults = [
        MUX_HEADER.pack(PLUGIN_CONN, 0xFFFFFFFF),
        mux_frames(5, b"x" * 20),
        mux_frames(RUNTIME_CONN, ttrpc_message(77, TYPE_RESPONSE, b"")),
        mux_frames(PLUGIN_CONN, ttrpc_message(1, TYPE_REQUEST, b"\x0a\xff")),
    ]
    async with FakeRuntime(socket) as runtime, plugin_against(socket) as plugin:
        for fault in faults:
            reader, writer = await asyncio.wait_for(runtime.sessions.get(), 10)
            writer.write(fault)
            # The plugin hangs up on us.
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
        reader, writer = await asyncio.wait_for(runtime.sessions.get(), 10)
        assert runtime.accepted == len(faults) + 1
        assert plugin.metrics.nri_connections.get(result="protocol_error") == len(faults)
        writer.close()


async def test_unknown_methods_get_unimplemented_and_garbage_requests_get_no_adjustment(
    tmp_path: Path,
) -> None:
    socket = tmp_path / "nri.sock"
    async with FakeRuntime(socket) as runtime, plugin_against(socket) as plugin:
        reader, writer = await asyncio.wait_for(runtime.sessions.get(), 10)
        unknown = await call_plugin(reader, writer, 1, "Frobnicate", b"")
        assert unknown.code == CODE_UNIMPLEMENTED and "Frobnicate" in unknown.message
        # A CreateContainer whose payload is not a CreateContainerRequest: answered OK, nothing adjusted.
        garbage = await call_plugin(reader, writer, 3, "CreateContainer", b"\x12\x05\x0a")
        assert (garbage.code, garbage.payload) == (0, b"")
        assert plugin.metrics.nri_adjustments.get(event="create", outcome="error") == 1
        # The connection survived both.
        assert runtime.accepted == 1
        # An empty request is a valid (all-default) message and still answers.
        assert (await call_plugin(reader, writer, 5, "StopContainer", b"")).code == 0
        writer.close()
