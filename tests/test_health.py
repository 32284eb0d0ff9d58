"""The health port's HTTP handling: keep-alive as scrapers use it, HEAD, and refusals that say why."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.health import Answer, HealthServer, json_answer, listen


def _boom() -> Answer:
    raise RuntimeError("the supervisor is gone")


ROUTES = {
    "/healthz": lambda: json_answer({"status": "ok"}),
    "/metrics": lambda: Answer(200, "text/plain", b"cpupool_up 1\n"),
    "/broken": _boom,
}


@asynccontextmanager
async def serving() -> AsyncIterator[int]:
    sock = listen("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    task = asyncio.create_task(HealthServer(ROUTES).serve(sock))
    try:
        yield port
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def test_two_requests_on_one_kept_alive_connection() -> None:
    async with serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["content-type"].startswith("application/json")
        assert json.loads(body) == {"status": "ok"}
        status, headers, body = await read_response(reader)
        assert status == 200 and body == b"cpupool_up 1\n"
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert await reader.read() == b""  # closed as asked
        writer.close()


async def test_head_has_the_length_but_no_body() -> None:
    async with serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /metrics HTTP/1.0\r\n\r\n")
        raw = await reader.read()
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 13" in raw and raw.endswith(b"\r\n\r\n")


async def test_unknown_path_wrong_method_failing_route_and_garbage_are_answered() -> None:
    async with serving() as port:

        async def ask(request: bytes) -> tuple[int, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            raw = await reader.read()
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            return int(head.split()[1]), body

        status, body = await ask(b"GET /nope HTTP/1.0\r\n\r\n")
        assert status == 404 and "/healthz" in json.loads(body)["paths"]
        status, body = await ask(b"POST /healthz HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        assert status == 405 and "POST" in json.loads(body)["error"]
        status, body = await ask(b"GET /broken HTTP/1.0\r\n\r\n")
        assert status == 500 and "the supervisor is gone" in json.loads(body)["error"]
        status, _ = await ask(b"this is not http\r\n\r\n")
        assert status == 400
