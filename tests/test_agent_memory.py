"""What keeps the agent's memory flat over months of allocations on the kubelet's long-lived connections."""

from __future__ import annotations

from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest

from agent import cli


@pytest.fixture
def bounded() -> Iterator[None]:
    default = h2.connection.H2Connection.MAX_CLOSED_STREAMS
    cli._bound_h2_memory()
    try:
        yield
    finally:
        h2.connection.H2Connection.MAX_CLOSED_STREAMS = default


def serve_calls(calls: int) -> h2.connection.H2Connection:
    """One HTTP/2 connection, in memory, carrying `calls` complete request/response exchanges (as each
    Allocate on the kubelet's connection to a resource is)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    for _ in range(calls):
        stream = client.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", "/v1beta1.DevicePlugin/Allocate"), (":scheme", "http"),
                   (":authority", "localhost")]  # fmt: skip
        client.send_headers(stream, headers, end_stream=True)
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, [(":status", "200")], end_stream=True)
        client.receive_data(server.data_to_send())
    return server


def test_a_connection_remembers_a_bounded_number_of_closed_streams(bounded: None) -> None:
    calls = cli.CLOSED_STREAMS_KEPT + 500
    server = serve_calls(calls)
    # Only the latest closed streams are remembered...
    assert len(server._closed_streams) == cli.CLOSED_STREAMS_KEPT


def test_h2_alone_remembers_every_closed_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    # ...where h2's default (65,536 per connection, about 8 MiB once full) keeps them all.
    monkeypatch.setattr(h2.connection.H2Connection, "MAX_CLOSED_STREAMS", 2**16)
    calls = cli.CLOSED_STREAMS_KEPT + 500
    assert len(serve_calls(calls)._closed_streams) >= calls - 1
