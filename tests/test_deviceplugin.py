"""The servicer's Allocate answers and its socket writes, in process.

A shared pool's Allocate checks hundreds of millicpu IDs in one pass and skips the per-ID grant when every ID
is a millicpu of the pool as it is now; these tests hold those shortcuts to the per-ID rules. The answer's
bytes are written by hand (agent.wire), and a unary answer leaves in one socket write."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
from grpclib import GRPCError
from grpclib.const import Status
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import agent.deviceplugin
from agent.allocation import ExclusiveDevice
from agent.config import parse_config, validate
from agent.connection import CoalescingTransport, answer_has_sequel
from agent.cpuset import CpuSet
from agent.deviceplugin import ResourceServicer
from agent.idset import shared_device_id, shared_device_index
from agent.kubeletapi.v1beta1 import AllocateRequest, AllocateResponse, ContainerAllocateRequest
from agent.metrics import Metrics
from agent.plan import Resource, SharedGroup, build_plan
from agent.topology import CoreKey
from tests.topologies import make_topology

TOPO = make_topology(isolated="2-7,10-15")
CONFIG = """\
resourceBaseName: cpupool.io
pools:
  fast: {cpus: "2-5", pooltype: exclusive}
  shared: {cpus: "6-7,14-15", pooltype: shared}
"""
SHARED = "cpupool.io/shared"


def shared_resource() -> Resource:
    plan = build_plan(validate(parse_config(CONFIG, "test.yaml"), TOPO), TOPO)
    return plan.resources[SHARED]


def known(resource: Resource, device_id: str) -> bool:
    """The per-ID rule: a device the resource lists, or a millicpu the kubelet may still see from the list
    before (below shared_recent, not withheld)."""
    if resource.has_device(device_id):
        return True
    index = shared_device_index(device_id)
    return (
        index is not None
        and bool(resource.configured and resource.cpus)
        and index < resource.shared_recent
        and index not in resource.shared_withheld
    )


def allocate(servicer: ResourceServicer, ids: list[str]) -> AllocateResponse:
    return servicer.allocate_now(
        AllocateRequest(container_requests=[ContainerAllocateRequest(devices_ids=ids)])
    )


FOREIGN = ExclusiveDevice("7", CpuSet([7]), 0, CoreKey(0, 3), 0)

resources = st.builds(
    lambda withheld, retained, recent, foreign, grouped, configured: replace(
        shared_resource(),
        shared_withheld=frozenset(withheld),
        shared_retained=frozenset(retained),
        shared_recent=recent,
        exclusive={FOREIGN.id: FOREIGN} if foreign else {},
        shared_groups=(SharedGroup(CpuSet([14, 15]), frozenset(grouped)),) if grouped else (),
        configured=configured,
    ),
    withheld=st.sets(st.integers(0, 4100), max_size=3),
    retained=st.sets(st.integers(4000, 4100), max_size=3),
    recent=st.sampled_from([0, 4000, 4050]),
    foreign=st.booleans(),
    grouped=st.sets(st.sampled_from([shared_device_id(i) for i in (1, 2, 3999)]), max_size=2),
    configured=st.booleans(),
)
# Runs of millicpus near the pool's end (4,000 devices), plus odd IDs: texts that are not ours, a comma.
odd = st.sampled_from(["7", "-1", "00", "A", "1,2", "", "zzzzzzzzz", shared_device_id(4099)])
requests = st.builds(
    lambda start, length, extra: list(
        dict.fromkeys([shared_device_id(i) for i in range(start, start + length)] + extra)
    ),
    start=st.integers(0, 4080),
    length=st.integers(1, 40),
    extra=st.lists(odd, max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resource=resources, ids=requests)
def test_shared_allocate_accepts_exactly_what_the_per_id_rules_accept(
    resource: Resource, ids: list[str]
) -> None:
    servicer = ResourceServicer(resource, CpuSet(), Metrics())
    expected_ok = all(known(resource, i) for i in ids) and not any(i in resource.blocked for i in ids)
    if not expected_ok or not resource.grant(ids).cpus:
        with pytest.raises(GRPCError) as info:
            allocate(servicer, ids)
        assert info.value.status is Status.INVALID_ARGUMENT
        if not expected_ok:
            assert "unknown device IDs" in str(info.value.message)
        return
    answer = allocate(servicer, ids).container_responses[0]
    # The CPUs are what the per-ID grant gives: a grouped ID its old CPUs, the foreign device its own.
    assert answer.envs["CPUPOOL_SHARED_CPUS"] == resource.grant(ids).cpus.comma_list()


# Base 36 changes width at 36, 1,296 and 46,656: the one-pass range check compares IDs by (length, text), so
# counts and requests around those widths, and a count of 0 (a drained pool the kubelet still asks about).
_WIDTHS = [0, 1, 35, 36, 37, 1295, 1296, 1297, 46655, 46656, 46657]
edge_resources = st.builds(
    lambda count, recent, withheld: replace(
        shared_resource(),
        shared_count=count,
        shared_recent=recent,
        shared_withheld=frozenset(i for i in withheld if i < count),
    ),
    count=st.sampled_from(_WIDTHS),
    recent=st.sampled_from(_WIDTHS),
    withheld=st.sets(st.sampled_from(_WIDTHS), max_size=2),
)
edge_requests = st.builds(
    lambda end, length: [shared_device_id(i) for i in range(max(0, end - length), end)],
    end=st.sampled_from([w + d for w in _WIDTHS for d in (-1, 0, 1) if w + d >= 16]),
    length=st.integers(16, 40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resource=edge_resources, ids=edge_requests)
def test_shared_allocate_at_the_id_width_boundaries_accepts_what_the_per_id_rules_accept(
    resource: Resource, ids: list[str]
) -> None:
    servicer = ResourceServicer(resource, CpuSet(), Metrics())
    # A request for more IDs than the pool has now is refused before any ID is looked at.
    fits = len(ids) <= max(resource.device_count, resource.shared_count)
    if fits and all(known(resource, i) for i in ids):
        assert allocate(servicer, ids).container_responses[0].envs["CPUPOOL_SHARED_CPUS"] == "6,7,14,15"
    else:
        with pytest.raises(GRPCError) as info:
            allocate(servicer, ids)
        assert info.value.status is Status.INVALID_ARGUMENT


# The batch check of a shared Allocate's IDs against the per-ID rule, on inputs beyond the pool tests' above:
# canonical IDs across base 36's widths, shuffled, and texts near a millicpu's form (leading zeros, "0"
# twice, nine characters, upper case, non-ASCII, commas, empty).
near_ids = st.text(alphabet="0019azZé,", max_size=10)


def millicpu_below(device_id: str, limit: int) -> bool:
    index = shared_device_index(device_id)
    return index is not None and index < limit


@settings(max_examples=500, deadline=None)
@given(
    canonical=st.lists(st.integers(0, 36**5), min_size=1, max_size=60, unique=True),
    odd=st.lists(near_ids, max_size=3),
    limit=st.sampled_from([0, 1, 36, 1296, 1297, 46656, 36**5, 36**8, 2 * 36**9]),
    shuffle=st.randoms(use_true_random=False),
)
# Nine characters and more are not a millicpu's, even below a limit that long.
@example(canonical=[1], odd=["1000000000"], limit=2 * 36**9, shuffle=random.Random(0))
def test_the_batch_millicpu_check_never_accepts_what_the_per_id_rule_refuses(
    canonical: list[int], odd: list[str], limit: int, shuffle: random.Random
) -> None:
    ids = [shared_device_id(i) for i in canonical] + odd
    shuffle.shuffle(ids)
    expected = all(millicpu_below(i, limit) for i in ids)
    batch = agent.deviceplugin._millicpu_ids_below(ids, limit)
    assert not batch or expected, f"accepted {ids!r} below {limit}"
    if not odd:
        # Distinct canonical IDs: the batch check decides alone, the per-ID fallback is never needed.
        assert batch == expected


def test_an_unknown_millicpu_among_five_hundred_is_named() -> None:
    resource = replace(shared_resource(), shared_withheld=frozenset({250}))
    servicer = ResourceServicer(resource, CpuSet(), Metrics())
    ids = [shared_device_id(i) for i in range(500)]
    with pytest.raises(GRPCError) as info:
        allocate(servicer, ids)
    assert f"unknown device IDs for {SHARED}: '{shared_device_id(250)}'" in str(info.value.message)
    assert allocate(servicer, ids[:250]).container_responses[0].envs["CPUPOOL_SHARED_CPUS"] == "6,7,14,15"


class _Recorder:
    """The socket transport under a CoalescingTransport: records each write as the kernel would see it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_writes_of_one_loop_turn_leave_in_one_send_in_order() -> None:
    recorder = _Recorder()
    transport = CoalescingTransport(recorder)  # type: ignore[arg-type]
    transport.write(b"headers")
    transport.write(b"data")
    transport.write(b"trailers")
    assert recorder.writes == []
    await asyncio.sleep(0)
    assert recorder.writes == [b"headersdatatrailers"]
    transport.write(b"ping-ack")
    await asyncio.sleep(0)
    assert recorder.writes == [b"headersdatatrailers", b"ping-ack"]


async def test_close_sends_what_was_written_first_and_big_writes_go_at_once() -> None:
    recorder = _Recorder()
    transport = CoalescingTransport(recorder)  # type: ignore[arg-type]
    transport.write(b"small")
    big = b"x" * (64 * 1024)
    transport.write(big)
    # A big list goes out at once, with what was pending before it, so the transport's own buffer limits
    # still pause grpclib.
    assert recorder.writes == [b"small" + big]
    transport.write(b"goaway")
    transport.close()
    assert recorder.writes[-1] == b"goaway" and recorder.closed
    transport.write(b"late")
    await asyncio.sleep(0)
    assert recorder.writes[-1] == b"goaway"


# A PING's acknowledgement as h2 writes it: length 8, type PING, flag ACK, stream 0, then the PING's 8 bytes.
PING_ACK = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + bytes([2, 4, 16, 16, 9, 14, 7, 7])


async def _answer(transport: CoalescingTransport, data: bytes, *, preferred: bool) -> None:
    """A write made by a call's own task, as grpclib makes it (a GetPreferredAllocation's if `preferred`)."""

    async def call() -> None:
        if preferred:
            answer_has_sequel.set(True)
        transport.write(data)

    await asyncio.create_task(call())


async def test_a_ping_after_a_preferred_answer_is_acknowledged_with_the_allocate_answer() -> None:
    recorder = _Recorder()
    transport = CoalescingTransport(recorder)  # type: ignore[arg-type]
    await _answer(transport, b"preferred", preferred=True)
    await asyncio.sleep(0)
    assert recorder.writes == [b"preferred"]
    # The kubelet's bandwidth PING arrives; its acknowledgement waits for the Allocate answer.
    transport.write(PING_ACK)
    await asyncio.sleep(0.01)
    assert recorder.writes == [b"preferred"]
    await _answer(transport, b"allocate", preferred=False)
    await asyncio.sleep(0)
    # One send, the acknowledgement after the answer: its DATA reaches the kubelet while the PING is out.
    assert recorder.writes == [b"preferred", b"allocate" + PING_ACK]
    # The next PING (after an Allocate answer) is acknowledged at once.
    transport.write(PING_ACK)
    await asyncio.sleep(0)
    assert recorder.writes[-1] == PING_ACK


async def test_a_held_acknowledgement_goes_out_alone_when_no_answer_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent.connection, "ACK_HOLD_S", 0.02)
    recorder = _Recorder()
    transport = CoalescingTransport(recorder)  # type: ignore[arg-type]
    await _answer(transport, b"preferred", preferred=True)
    transport.write(PING_ACK)
    transport.write(PING_ACK)
    await asyncio.sleep(0)
    assert recorder.writes == [b"preferred"]
    await asyncio.sleep(0.1)
    assert recorder.writes == [b"preferred", PING_ACK + PING_ACK]


async def test_closing_sends_held_acknowledgements_and_other_frames_are_never_held() -> None:
    recorder = _Recorder()
    transport = CoalescingTransport(recorder)  # type: ignore[arg-type]
    await _answer(transport, b"preferred", preferred=True)
    # A PING acknowledgement together with other frames (a WINDOW_UPDATE) is not a lone acknowledgement.
    window_update = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x10\x00"
    transport.write(PING_ACK + window_update)
    await asyncio.sleep(0)
    assert recorder.writes[-1] == PING_ACK + window_update
    await _answer(transport, b"preferred", preferred=True)
    transport.write(PING_ACK)
    transport.write(b"goaway")
    transport.close()
    assert recorder.writes[-2:] == [b"preferred", b"goaway" + PING_ACK] and recorder.closed


async def test_an_answers_trailers_send_it_at_once() -> None:
    recorder = _Recorder()
    transport = CoalescingTransport(recorder)  # type: ignore[arg-type]
    headers = b"\x00\x00\x01\x01\x04\x00\x00\x00\x01" + b"\x88"  # HEADERS, END_HEADERS, stream 1
    data = b"\x00\x00\x02\x00\x00\x00\x00\x00\x01" + b"\x00\x00"  # DATA, stream 1
    trailers = b"\x00\x00\x01\x01\x05\x00\x00\x00\x01" + b"\xbe"  # HEADERS, END_STREAM | END_HEADERS
    transport.write(headers)
    transport.write(data)
    assert recorder.writes == []
    # The trailers end the call's answer: it leaves in the same loop turn, in one send.
    transport.write(trailers)
    assert recorder.writes == [headers + data + trailers]
    await asyncio.sleep(0)
    assert recorder.writes == [headers + data + trailers]
