"""What the kubelet's gRPC client makes the agent send per admission, against the kubelet's own device
manager (tests/kubeletpeer, grpc-go as the kubelet links it).

grpc-go sends a PING (its bandwidth probe) whenever an answer's DATA arrives and no PING of its is out. The
agent acknowledges a PING that follows a GetPreferredAllocation answer together with the Allocate answer:
an exclusive admission then costs one PING instead of two, and no send of its own for it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent.connection
from agent.connection import CoalescingTransport
from tests.harness import running_agent

FAST = "cpupool.io/fast"
FAST_ONLY = 'pools:\n  fast: {cpus: "2-7", pooltype: exclusive}\n'
ADMISSIONS = 12
_PING = 0x6
_ACK = 0x1


def frames(data: bytes) -> Iterator[tuple[int, int]]:
    """(type, flags) of each HTTP/2 frame in one send of the agent (sends hold whole frames)."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        yield data[pos + 3], data[pos + 4]
        pos += 9 + length


def ping_acks(data: bytes) -> int:
    return sum(1 for kind, flags in frames(data) if kind == _PING and flags & _ACK)


class _Tap:
    """The socket transport under the agent's CoalescingTransport: records every send."""

    def __init__(self, transport: asyncio.Transport, sends: list[bytes]) -> None:
        self._transport = transport
        self._sends = sends

    def write(self, data: bytes) -> None:
        self._sends.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def test_an_exclusive_admission_costs_one_ping_and_no_send_for_it(
    tmp_path: Path, kubelet_peer_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends: list[bytes] = []

    class Tapped(CoalescingTransport):
        def __init__(self, transport: asyncio.Transport) -> None:
            super().__init__(_Tap(transport, sends))  # type: ignore[arg-type]

    monkeypatch.setattr(agent.connection, "CoalescingTransport", Tapped)
    # On a loaded machine the kubelet's Allocate can follow its GetPreferredAllocation by more than the
    # usual 100 ms; the count must not depend on it.
    monkeypatch.setattr(agent.connection, "ACK_HOLD_S", 1.0)
    async with running_agent(tmp_path, FAST_ONLY, peer="kubelet") as run:
        await run.emu.wait_devices(FAST)
        # The connection's start (SETTINGS, the first list, the first PINGs) is not counted.
        await run.emu.allocate(FAST, 1, pod="warm-up")
        await run.emu.remove_pod("warm-up")
        await asyncio.sleep(0.3)
        sends.clear()
        for i in range(ADMISSIONS):
            result = await run.emu.allocate(FAST, 1, pod=f"p{i}")
            assert len(result.device_ids) == 1
            await run.emu.remove_pod(f"p{i}")
        server = run.supervisor.states[FAST].server._server
        assert server is not None
        # The kubelet's requests come whole: its calls are answered by the connection (agent.connection).
        assert server.answered_directly() >= 2 * ADMISSIONS
        # Every PING held is acknowledged by now (ACK_HOLD_S at most).
        await asyncio.sleep(agent.connection.ACK_HOLD_S * 1.5)
    acks = sum(ping_acks(s) for s in sends)
    alone = [s for s in sends if ping_acks(s) and all(kind == _PING for kind, _ in frames(s))]
    # Acknowledged at once, each admission cost two PINGs and two sends of an acknowledgement alone.
    assert acks <= ADMISSIONS + 1, f"{acks} PINGs acknowledged in {ADMISSIONS} admissions"
    assert len(alone) <= 1, f"{len(alone)} sends of a PING acknowledgement alone in {ADMISSIONS} admissions"
