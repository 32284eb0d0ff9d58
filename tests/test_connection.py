"""The device plugin server's connections (agent.connection), driven by a raw HTTP/2 client.

GetPreferredAllocation and Allocate are answered by the connection itself when a request comes whole in one
read; a request split over reads goes through grpclib's own path. Both must give the kubelet the same bytes,
the same headers and the same status, for answers and refusals alike; an answer the kubelet's flow-control
window cannot take yet waits for it, and a call the kubelet gives up on costs nothing but that call."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.config import parse_config, validate
from agent.connection import after_send
from agent.cpuset import CpuSet
from agent.deviceplugin import ResourceServer, ResourceServicer
from agent.kubeletapi.v1beta1 import (
    AllocateRequest,
    AllocateResponse,
    ContainerAllocateRequest,
    ContainerPreferredAllocationRequest,
    PreferredAllocationRequest,
    PreferredAllocationResponse,
)
from agent.metrics import Metrics
from agent.plan import build_plan
from tests.rawh2 import RawClient
from tests.topologies import make_topology

TOPO = make_topology(isolated="2-7,10-15")
CONFIG = """\
resourceBaseName: cpupool.io
pools:
  fast: {cpus: "2-5,10-13", pooltype: exclusive}
"""
FAST = "cpupool.io/fast"
ALLOCATE = "/v1beta1.DevicePlugin/Allocate"
PREFERRED = "/v1beta1.DevicePlugin/GetPreferredAllocation"


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[ResourceServer]:
    plan = build_plan(validate(parse_config(CONFIG, "test.yaml"), TOPO), TOPO)
    server = ResourceServer(
        ResourceServicer(plan.resources[FAST], CpuSet(), Metrics()), tmp_path / "fast.sock"
    )
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def client(server: ResourceServer, window: int | None = None) -> AsyncIterator[RawClient]:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    raw = RawClient(reader, writer, window)
    try:
        yield raw
    finally:
        await raw.close()


def answered_directly(server: ResourceServer) -> int:
    assert server._server is not None
    return server._server.answered_directly()


def preferred(available: list[str], size: int, must: list[str] | None = None) -> bytes:
    return bytes(
        PreferredAllocationRequest(
            container_requests=[
                ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=must or [], allocation_size=size
                )
            ]
        )
    )


def allocate(*ids: str) -> bytes:
    return bytes(AllocateRequest(container_requests=[ContainerAllocateRequest(devices_ids=list(ids))]))


CALLS = [
    pytest.param(PREFERRED, preferred(["2", "3", "4", "5", "10", "11"], 2), "0", id="preferred"),
    pytest.param(ALLOCATE, allocate("3"), "0", id="allocate"),
    pytest.param(ALLOCATE, allocate("2", "10"), "0", id="allocate-two"),
    # Refusals: a trailers-only answer with the status and message grpclib would give.
    pytest.param(ALLOCATE, allocate("99"), "3", id="unknown-id"),
    pytest.param(ALLOCATE, allocate(), "3", id="no-ids"),
    pytest.param(PREFERRED, preferred(["2"], 2), "3", id="too-many"),
    pytest.param(ALLOCATE, b"\x0a\x05\x0a\x03\xff\xfe\x00", "3", id="malformed"),
]


@pytest.mark.parametrize(("path", "message", "status"), CALLS)
async def test_a_whole_request_is_answered_directly_with_grpclibs_own_bytes(
    tmp_path: Path, path: str, message: bytes, status: str
) -> None:
    async with serving(tmp_path) as server, client(server) as raw:
        before = answered_directly(server)
        direct = await raw.call(path, message)
        assert answered_directly(server) == before + 1
        through_grpclib = await raw.call(path, message, split=True)
        assert answered_directly(server) == before + 1, "a split request was answered directly"
    assert direct.status == status
    assert (direct.headers, direct.data, direct.trailers) == (
        through_grpclib.headers,
        through_grpclib.data,
        through_grpclib.trailers,
    )
    assert not direct.reset and not through_grpclib.reset


async def test_the_answers_are_the_servicers(tmp_path: Path) -> None:
    async with serving(tmp_path) as server, client(server) as raw:
        chosen = PreferredAllocationResponse.parse(
            (await raw.call(PREFERRED, preferred(["2", "10", "3", "11"], 2))).message()
        )
        ids = list(chosen.container_responses[0].device_i_ds)
        # Hyperthread siblings 2 and 10 (make_topology: sibling = cpu + 8) make one whole core.
        assert sorted(ids) == ["10", "2"]
        given = AllocateResponse.parse((await raw.call(ALLOCATE, allocate(*ids))).message())
        envs = given.container_responses[0].envs
        assert envs["EXCLUSIVE_CPUS"] == "2,10"


async def test_an_answer_waits_for_the_kubelets_flow_control_window(tmp_path: Path) -> None:
    """A kubelet whose stream window is 16 bytes gets the answer in pieces, as it gives window back; the
    server neither fails the call nor sends beyond the window."""
    async with serving(tmp_path) as server:
        async with client(server) as raw:
            expected = await raw.call(ALLOCATE, allocate("4"), split=True)
        async with client(server, window=16) as raw:
            await asyncio.sleep(0.05)  # the server has our SETTINGS
            answer = await raw.call(ALLOCATE, allocate("4"))
            assert answered_directly(server) == 1
    assert answer.data_frames > 1
    assert (answer.headers, answer.data, answer.trailers) == (
        expected.headers,
        expected.data,
        expected.trailers,
    )


async def test_close_lets_a_waiting_answer_go_out_first(tmp_path: Path) -> None:
    async with serving(tmp_path) as server, client(server, window=16) as raw:
        await asyncio.sleep(0.05)
        raw.acknowledge = False
        stream_id, headers, data = raw.request(ALLOCATE, allocate("5"))
        raw.writer.write(headers + data)
        await asyncio.sleep(0.1)
        assert not raw.ended[stream_id].is_set(), "the answer did not wait for the window"
        closing = asyncio.create_task(server.close(grace_s=2.0))
        await asyncio.sleep(0.1)
        assert not closing.done(), "close() did not wait for the answer still due"
        raw.acknowledge = True
        raw.give_window()
        await asyncio.wait_for(closing, 5)
        await asyncio.wait_for(raw.ended[stream_id].wait(), 5)
        answer = raw.answers[stream_id]
    assert answer.status == "0"
    assert AllocateResponse.parse(answer.message()).container_responses[0].envs["EXCLUSIVE_CPUS"] == "5"


async def test_a_call_reset_in_the_same_read_costs_only_that_call(tmp_path: Path) -> None:
    async with serving(tmp_path) as server, client(server) as raw:
        stream_id, headers, data = raw.request(ALLOCATE, allocate("2"))
        raw.h2.reset_stream(stream_id)
        raw.writer.write(headers + data + raw.h2.data_to_send())
        await raw.writer.drain()
        await asyncio.sleep(0.1)
        # The connection still serves, directly. The reset call went to grpclib, which cancels it unrun
        # (tests/test_connection_review.py: nothing allocated for it).
        answer = await raw.call(ALLOCATE, allocate("3"))
        assert answer.status == "0"
        assert answered_directly(server) == 1


async def test_a_request_trickling_in_byte_by_byte_gets_the_same_answer(tmp_path: Path) -> None:
    """The connection reads into one buffer it reuses: a request whose frames arrive a byte per read, each
    read overwriting the last, is answered as the same request sent whole."""
    async with serving(tmp_path) as server, client(server) as raw:
        whole = await raw.call(PREFERRED, preferred(["2", "3", "4", "5", "10", "11"], 2))
        stream_id, headers, data = raw.request(PREFERRED, preferred(["2", "3", "4", "5", "10", "11"], 2))
        for byte in headers + data:
            raw.writer.write(bytes([byte]))
            await raw.writer.drain()
            await asyncio.sleep(0.002)
        await asyncio.wait_for(raw.ended[stream_id].wait(), 5)
        trickled = raw.answers[stream_id]
    assert trickled.status == whole.status == "0"
    assert (trickled.headers, trickled.data, trickled.trailers) == (whole.headers, whole.data, whole.trailers)


async def test_a_failing_after_answer_step_costs_neither_the_answer_nor_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Allocate log line runs after the answer's send, in the same loop turn: if it fails, the kubelet
    still has its answer, the connection goes on answering, and the failure is reported as the loop reports a
    failing callback."""
    reported: list[BaseException | None] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context.get("exception")))

    class BrokenLog:
        def info(self, event: str, **kwargs: object) -> None:
            if event == "allocate":
                raise RuntimeError("stderr is gone")

    monkeypatch.setattr("agent.deviceplugin.log", BrokenLog())
    try:
        async with serving(tmp_path) as server, client(server) as raw:
            first = await raw.call(ALLOCATE, allocate("2"))
            second = await raw.call(ALLOCATE, allocate("3"))
            assert answered_directly(server) == 2
    finally:
        loop.set_exception_handler(None)
    assert [a.status for a in (first, second)] == ["0", "0"]
    envs = [AllocateResponse.parse(a.message()).container_responses[0].envs for a in (first, second)]
    assert [e["EXCLUSIVE_CPUS"] for e in envs] == ["2", "3"]
    assert [str(e) for e in reported] == ["stderr is gone", "stderr is gone"]


async def test_a_worker_threads_after_send_call_runs_in_that_thread_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the loop thread answers a read, a call another thread hands to after_send runs there and then
    (that thread has no loop): it is not queued on the loop thread's read."""
    ran_in: list[tuple[str, str]] = []

    def record(where: str) -> Callable[[], None]:
        return lambda: ran_in.append((where, threading.current_thread().name))

    answer = ResourceServicer.allocate_now

    def allocate_now(self: ResourceServicer, message: AllocateRequest) -> AllocateResponse:
        worker = threading.Thread(target=lambda: after_send(record("worker")), name="worker")
        worker.start()
        worker.join()
        ran_in.append(("answered", threading.current_thread().name))
        return answer(self, message)

    monkeypatch.setattr(ResourceServicer, "allocate_now", allocate_now)
    async with serving(tmp_path) as server, client(server) as raw:
        assert (await raw.call(ALLOCATE, allocate("2"))).status == "0"
        assert answered_directly(server) == 1
    loop_thread = threading.current_thread().name
    assert ran_in == [("worker", "worker"), ("answered", loop_thread)]
