"""The hand-written request decoders agree with the generic protobuf decoder and fail cleanly on garbage."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.kubeletapi.v1beta1 import (
    AllocateRequest,
    ContainerAllocateRequest,
    ContainerPreferredAllocationRequest,
    PreferredAllocationRequest,
)
from agent.wire import AllocateRequestDecoder, PreferredAllocationRequestDecoder

ids = st.lists(st.text(max_size=12), max_size=20)


@given(st.lists(ids, max_size=4))
def test_allocate_requests_round_trip(containers: list[list[str]]) -> None:
    message = AllocateRequest(
        container_requests=[ContainerAllocateRequest(devices_ids=c) for c in containers]
    )
    assert AllocateRequestDecoder.FromString(bytes(message)) == message


@given(st.lists(st.tuples(ids, ids, st.integers(-(2**31), 2**31 - 1)), max_size=4))
def test_preferred_requests_round_trip(containers: list[tuple[list[str], list[str], int]]) -> None:
    message = PreferredAllocationRequest(
        container_requests=[
            ContainerPreferredAllocationRequest(
                available_deviceIDs=a, must_include_deviceIDs=m, allocation_size=n
            )
            for a, m, n in containers
        ]
    )
    assert PreferredAllocationRequestDecoder.FromString(bytes(message)) == message


def test_unknown_fields_are_skipped() -> None:
    known = bytes(AllocateRequest(container_requests=[ContainerAllocateRequest(devices_ids=["1", "2"])]))
    # field 9 varint, field 10 fixed64, field 11 fixed32, field 12 bytes: all unknown to the decoder.
    extra = b"\x48\x05" + b"\x51" + b"\x00" * 8 + b"\x5d" + b"\x00" * 4 + b"\x62\x02hi"
    decoded = AllocateRequestDecoder.FromString(extra + known)
    assert decoded.container_requests[0].devices_ids == ["1", "2"]


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_decodes_or_raises_value_error(data: bytes) -> None:
    for decoder in (AllocateRequestDecoder, PreferredAllocationRequestDecoder):
        with contextlib.suppress(ValueError):
            decoder.FromString(data)
