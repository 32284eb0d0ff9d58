"""Bad input on the wire: garbage bytes, wrong field types, empty and enormous requests get errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

import agent.connection
from tests.emulator import DEVICEPLUGIN, PluginCallError
from tests.harness import Running, running_agent

FAST, SHARED = "cpupool.io/fast", "cpupool.io/shared"


def raw_call(socket: Path, method: str, payload: bytes) -> tuple[grpc.StatusCode, str, bytes | None]:
    """Send `payload` as the request bytes, unchecked, with Google's gRPC."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(f"/v1beta1.DevicePlugin/{method}")
        try:
            reply = call(payload, timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", None
        return grpc.StatusCode.OK, "", reply


async def still_serving(run: Running) -> None:
    result = await run.emu.allocate(FAST, 1)
    assert len(result.device_ids) == 1
    run.emu.release(result.pod)


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("Allocate", b"\x08\x01"),  # field 1 as a varint: decodes to a list holding an int
        ("Allocate", b"\x0a\x03\x0a\x01\xff"),  # a device ID that is not UTF-8
        ("Allocate", b"\x0a\x02\x08\x05"),  # an ID field of the wrong wire type
        ("GetPreferredAllocation", b"\x08\x07"),
        ("GetPreferredAllocation", b"\x0a\x04\x0a\x02\xc3\x28"),
        ("GetPreferredAllocation", b"\x0a\x02\x18\x7f\x0a\x03\x0a\x01\x32"),
    ],
)
async def test_garbage_requests_get_an_error_and_the_agent_keeps_serving(
    tmp_path: Path, method: str, payload: bytes
) -> None:
    async with running_agent(tmp_path) as run:
        await run.emu.wait_devices(FAST)
        code, details, _ = await asyncio.to_thread(
            raw_call, run.plugin_dir / "cpupool-fast.sock", method, payload
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details
        await still_serving(run)


async def test_empty_requests_get_empty_answers(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as run:
        await run.emu.wait_devices(FAST)
        for method in ("Allocate", "GetPreferredAllocation", "PreStartContainer", "GetDevicePluginOptions"):
            code, details, reply = await asyncio.to_thread(
                raw_call, run.plugin_dir / "cpupool-fast.sock", method, b""
            )
            assert code == grpc.StatusCode.OK, (method, details)
        options = DEVICEPLUGIN.pb2.DevicePluginOptions.FromString(reply)
        assert options.get_preferred_allocation_available
        await still_serving(run)


async def test_enormous_requests_get_clear_errors(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as run:
        await run.emu.wait_devices(FAST)
        await run.emu.wait_devices(SHARED)
        many = [str(i) for i in range(100_000)]
        # IDs the agent does not offer are passed over (the kubelet's list may lag): the answer comes from
        # the pool's own devices.
        answer = await run.emu.call_preferred(FAST, many, [], 4)
        snapshot = run.emu.resource(FAST)
        assert snapshot is not None
        offered = snapshot.healthy_ids
        assert len(answer) == 4 and set(answer) <= offered
        with pytest.raises(PluginCallError) as info:
            await run.emu.call_allocate(SHARED, many)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "100000 device IDs" in info.value.details
        with pytest.raises(PluginCallError) as info:
            await run.emu.call_preferred(FAST, ["2", "3"], [], -1)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        await still_serving(run)


async def test_the_one_grpclib_internal_of_the_graceful_close_is_still_called(tmp_path: Path) -> None:
    """ResourceServer.close() finds the connections to drop through grpclib's Server._protocol_factory, the
    one grpclib internal the agent uses (in-flight calls are tracked by the servicer's own handler wrapper;
    docs/lifecycle.md). If a grpclib release stops calling it, close() would leave the kubelet connected to a
    servicer whose plan is gone: this test fails loudly instead."""
    async with running_agent(tmp_path) as run:
        await run.emu.wait_devices(FAST)
        resource_server = run.supervisor.states[FAST].server
        server = resource_server._server
        assert server is not None
        connections = server.open_connections()
        assert connections, "grpclib no longer makes connections through Server._protocol_factory"
        # The kubelet's open ListAndWatch stream is a call in flight.
        assert resource_server.servicer.in_flight()
        await resource_server.close()
        assert all(p.connection.is_closing() for p in connections), "close() left a connection open"
        assert not resource_server.servicer.in_flight()


async def test_the_admission_path_is_answered_by_the_connection(tmp_path: Path) -> None:
    """GetPreferredAllocation and Allocate are answered by agent.connection.ServerProtocol, which reaches h2
    through grpclib's `Connection._connection` (docs/lifecycle.md). If a grpclib release moves it, the agent
    leaves every call to grpclib (slower, still correct; test below) and this test fails loudly."""
    async with running_agent(tmp_path) as run:
        await run.emu.wait_devices(FAST)
        server = run.supervisor.states[FAST].server._server
        assert server is not None
        before = server.answered_directly()
        await still_serving(run)
        assert server.answered_directly() >= before + 2, "GetPreferredAllocation and Allocate went to grpclib"


async def test_without_the_h2_internal_every_call_goes_to_grpclib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As if a grpclib release had moved h2's connection object.
    monkeypatch.setattr(agent.connection, "_h2_of", lambda protocol: None)
    async with running_agent(tmp_path) as run:
        await run.emu.wait_devices(FAST)
        server = run.supervisor.states[FAST].server._server
        assert server is not None
        await still_serving(run)
        assert server.answered_directly() == 0
    captured = capsys.readouterr()
    assert "grpclib.internals_moved" in captured.out + captured.err
