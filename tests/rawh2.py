"""A raw HTTP/2 client that makes gRPC calls the way the kubelet's client does, frame by frame: for tests and
benchmarks of the device plugin server's connections (agent/connection.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclass
class Answer:
    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    data_frames: int = 0
    reset: bool = False

    @property
    def status(self) -> str:
        return dict(self.trailers or self.headers).get("grpc-status", "")

    def message(self) -> bytes:
        assert self.data[0] == 0 and int.from_bytes(self.data[1:5], "big") == len(self.data) - 5
        return self.data[5:]


class RawClient:
    """One HTTP/2 connection to the server, as the kubelet's gRPC client makes its calls."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int | None
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="ascii")
        )
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.answers: dict[int, Answer] = {}
        self.ended: dict[int, asyncio.Event] = {}
        # Whether the client hands back flow-control window as it reads (a kubelet always does).
        self.acknowledge = True
        self.unacknowledged: list[tuple[int, int]] = []
        self.flush()
        self._reading = asyncio.create_task(self._read())

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def request(self, path: str, message: bytes) -> tuple[int, bytes, bytes]:
        """A call's HEADERS and its DATA (with END_STREAM), as bytes to write."""
        stream_id = self.h2.get_next_available_stream_id()
        self.answers[stream_id] = Answer()
        self.ended[stream_id] = asyncio.Event()
        self.h2.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("user-agent", "grpc-go/1.72.0"),
                ("te", "trailers"),
            ],
        )
        headers = self.h2.data_to_send()
        self.h2.send_data(stream_id, b"\0" + len(message).to_bytes(4, "big") + message, end_stream=True)
        return stream_id, headers, self.h2.data_to_send()

    async def call(self, path: str, message: bytes, *, split: bool = False) -> Answer:
        stream_id, headers, data = self.request(path, message)
        if split:
            # The server reads the HEADERS before the DATA exists: grpclib's path answers.
            self.writer.write(headers)
            await self.writer.drain()
            await asyncio.sleep(0.05)
            self.writer.write(data)
        else:
            self.writer.write(headers + data)
        await self.writer.drain()
        await asyncio.wait_for(self.ended[stream_id].wait(), 5)
        return self.answers[stream_id]

    def give_window(self) -> None:
        for stream_id, size in self.unacknowledged:
            self.h2.acknowledge_received_data(size, stream_id)
        self.unacknowledged.clear()
        self.flush()

    async def _read(self) -> None:
        while data := await self.reader.read(65536):
            self._dispatch(self.h2.receive_data(data))
            self.flush()

    def _dispatch(self, events: list[h2.events.Event]) -> None:
        """Record each event of one read on the answer of its stream."""
        for event in events:
            stream_id = getattr(event, "stream_id", 0)
            answer = self.answers.get(stream_id)
            if answer is None:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                answer.headers = list(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                answer.data += event.data
                answer.data_frames += 1
                self.unacknowledged.append((stream_id, event.flow_controlled_length))
                if self.acknowledge:
                    self.give_window()
            elif isinstance(event, h2.events.TrailersReceived):
                answer.trailers = list(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                answer.reset = isinstance(event, h2.events.StreamReset)
                self.ended[stream_id].set()

    async def close(self) -> None:
        self._reading.cancel()
        self.writer.close()
