"""The agent's small HTTP port: /healthz, /readyz, /metrics and /enforcement, on the agent's own event loop.

HTTP/1.1 is parsed by h11 (python-hyper's sans-I/O state machine, the HTTP/1 sibling of the h2 that grpclib
uses) over asyncio streams. aiohttp served this port before; importing it cost the agent 11 MiB of RSS and
about 135 ms of CPU (its client connector builds verified TLS contexts at import, reading the system's CA
certificates), a third of the agent's memory budget for four GET routes. h11 costs 0.2 MiB
(docs/benchmarks.md, "RSS, start and idle: where they go").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import structlog

if TYPE_CHECKING:
    # Types only: with --no-nri the agent never loads NRI's protocol.
    from agent.nri.accounting import AccountingMonitor
    from agent.nri.plugin import NriPlugin
    from agent.supervisor import Supervisor

log = structlog.get_logger(__name__)

# A client that sends nothing for this long (a keep-alive scraper gone quiet) is disconnected.
IDLE_TIMEOUT_S = 60.0
# Requests are a line and a few headers; h11 refuses heads larger than this.
MAX_HEAD_BYTES = 16 * 1024
READ_BYTES = 64 * 1024
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


def json_answer(body: object, status: int = 200) -> Answer:
    return Answer(status, "application/json; charset=utf-8", json.dumps(body).encode())


Routes = Mapping[str, Callable[[], Answer]]


def make_routes(
    supervisor: Supervisor, nri: NriPlugin | None = None, accounting: AccountingMonitor | None = None
) -> Routes:
    """Path -> what a GET of it answers."""

    def healthz() -> Answer:
        # Answering at all proves the loop is alive; the config state is there for operators.
        return json_answer(
            {
                "status": "ok",
                "config_generation": supervisor.config_generation,
                "config_reload_errors": int(supervisor.metrics.reloads.get(result="error")),
                "last_config_error": supervisor.last_config_error,
            }
        )

    def enforcement() -> dict[str, object]:
        # NRI is reported, never gating readiness: without it the device plugin still serves.
        return {
            "nri": nri.report() if nri is not None else {"enabled": False},
            "kubelet_accounting": accounting.report.as_dict()
            if accounting is not None and accounting.report is not None
            else None,
        }

    def readyz() -> Answer:
        body = {"ready": supervisor.ready, "resources": supervisor.readiness(), **enforcement()}
        return json_answer(body, 200 if supervisor.ready else 503)

    def enforced() -> Answer:
        """Per live container, the cpuset the NRI plugin enforced (for `cpupool status`)."""
        containers = nri.enforced() if nri is not None else []
        return json_answer({**enforcement(), "containers": containers})

    def metrics() -> Answer:
        return Answer(200, METRICS_TYPE, supervisor.metrics.render().encode())

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics, "/enforcement": enforced}


def answer(routes: Routes, request: h11.Request) -> Answer:
    """The answer to one request: its route's, or why there is none (unknown path, not a GET)."""
    path = request.target.decode("ascii", "replace").split("?", 1)[0]
    route = routes.get(path)
    if route is None:
        return json_answer({"error": f"no such path: {path}", "paths": sorted(routes)}, 404)
    if request.method not in (b"GET", b"HEAD"):
        return json_answer({"error": f"{request.method.decode('ascii', 'replace')} is not allowed"}, 405)
    try:
        return route()
    except Exception as exc:
        log.exception("health.answer_failed", path=path)
        return json_answer({"error": repr(exc)}, 500)


class HealthServer:
    """Serves `routes` on a listening socket; owns the task of every open connection."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self._connections: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket) -> None:
        """Serve until cancelled; then close the port and every connection."""
        server = await asyncio.start_server(self._connection, sock=sock, limit=READ_BYTES)
        try:
            await server.serve_forever()
        finally:
            server.close()
            connections = list(self._connections)
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            await self._exchange(conn, reader, writer)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                # A request h11 cannot parse still gets a status line saying why (400, 431, ...).
                status = exc.error_status_hint
                body = json.dumps({"error": str(exc)}).encode()
                with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                    writer.write(_response(conn, Answer(status, "application/json", body), head=False))
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # the client went away or went quiet
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _exchange(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests on one connection until either side ends it (keep-alive is honoured)."""
        while True:
            request = await _next_event(conn, reader)
            if not isinstance(request, h11.Request):
                return  # closed before a request
            # Bodies mean nothing here; read past them to the end of the request.
            while not isinstance(event := await _next_event(conn, reader), h11.EndOfMessage):
                if isinstance(event, h11.ConnectionClosed):
                    return
            writer.write(_response(conn, answer(self.routes, request), head=request.method == b"HEAD"))
            await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # HTTP/1.0 or Connection: close
            conn.start_next_cycle()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        # b"" at the end of the stream tells h11 the client closed its side.
        conn.receive_data(await asyncio.wait_for(reader.read(READ_BYTES), IDLE_TIMEOUT_S))


def _response(conn: h11.Connection, reply: Answer, *, head: bool) -> bytes:
    headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))]
    out = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
    if not head:
        out += conn.send(h11.Data(data=reply.body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


def listen(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on host and port (OSError when it cannot be had)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_health(
    supervisor: Supervisor,
    host: str,
    port: int,
    *,
    nri: NriPlugin | None = None,
    accounting: AccountingMonitor | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until cancelled; on `sock` when given (a listening socket bound to host and port)."""
    if sock is None:
        sock = listen(host, port)
    server = HealthServer(make_routes(supervisor, nri, accounting))
    log.info("health.listening", host=host, port=port)
    await server.serve(sock)
