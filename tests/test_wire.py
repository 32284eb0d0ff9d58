"""The hand-written request decoders agree with the generic protobuf decoder and fail cleanly on garbage."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.kubeletapi.v1beta1 import (
    AllocateRequest,
    AllocateResponse,
    CdiDevice,
    ContainerAllocateRequest,
    ContainerAllocateResponse,
    ContainerPreferredAllocationRequest,
    ContainerPreferredAllocationResponse,
    DeviceSpec,
    Mount,
    PreferredAllocationRequest,
    PreferredAllocationResponse,
)
from agent.wire import (
    AllocateRequestDecoder,
    EncodedAllocateResponse,
    EncodedPreferredAllocationResponse,
    PreferredAllocationRequestDecoder,
)

ids = st.lists(st.text(max_size=12), max_size=20)


@given(st.lists(ids, max_size=4))
def test_allocate_requests_round_trip(containers: list[list[str]]) -> None:
    message = AllocateRequest(
        container_requests=[ContainerAllocateRequest(devices_ids=c) for c in containers]
    )
    assert AllocateRequestDecoder.FromString(bytes(message)) == message


# IDs past the one-byte length (128 bytes and more) and non-ASCII ones take the generic reader.
long_ids = st.lists(st.text(min_size=120, max_size=140) | st.text(max_size=3), max_size=5)


@given(st.lists(long_ids, max_size=3))
def test_long_and_non_ascii_ids_round_trip(containers: list[list[str]]) -> None:
    message = AllocateRequest(
        container_requests=[ContainerAllocateRequest(devices_ids=c) for c in containers]
    )
    assert AllocateRequestDecoder.FromString(bytes(message)) == message


# IDs of the agent's own form (base 36) take the one-pass reader; a wrong length byte must never read as
# anything but what protobuf reads.
base36 = st.text(alphabet="0123456789abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10)


@given(st.lists(st.lists(base36, max_size=30), max_size=3))
def test_ids_of_our_form_round_trip(containers: list[list[str]]) -> None:
    message = AllocateRequest(
        container_requests=[ContainerAllocateRequest(devices_ids=c) for c in containers]
    )
    assert AllocateRequestDecoder.FromString(bytes(message)) == message


@pytest.mark.parametrize(
    "ids",
    [
        ["a\nb", "c"],  # a newline inside an ID: the split sees three pieces
        ["0123456789", "7"],  # a length of 10 is the newline byte itself
        ["", "x", ""],  # empty IDs are pieces of their length byte alone
        ["\n", "\n\n"],
        ["y" * 127, "z"],  # the longest one-byte length
    ],
)
def test_ids_the_split_cannot_read_alone_still_read_as_protobuf_reads_them(ids: list[str]) -> None:
    message = AllocateRequest(container_requests=[ContainerAllocateRequest(devices_ids=ids)])
    assert AllocateRequestDecoder.FromString(bytes(message)) == message


def test_an_unknown_field_after_the_ids_is_skipped_as_protobuf_skips_it() -> None:
    # A field the kubelet's API may add later (here number 12, fixed64: key "a", 8 bytes) after an ID: no
    # newline in 270 ASCII bytes, more than a length byte can say. Protobuf skips it; so must the reader.
    container = b"\n\x05aaaaa" + b"a" * 9 * 30
    data = b"\n" + bytes((0x80 | len(container) & 0x7F, len(container) >> 7)) + container
    assert AllocateRequestDecoder.FromString(data) == AllocateRequest.parse(data)
    assert AllocateRequest.parse(data).container_requests[0].devices_ids == ["aaaaa"]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(1, 8), base36), min_size=1, max_size=6))
def test_wrong_length_bytes_read_as_protobuf_reads_them(fields: list[tuple[int, str]]) -> None:
    container = b"".join(b"\n" + bytes((length,)) + text.encode() for length, text in fields)
    data = b"\n" + bytes((len(container),)) + container
    # Ours refuses what it cannot read exactly (ValueError: INVALID_ARGUMENT; the generic decoder is more
    # lenient with a cut-short field), and what it reads, it reads as the generic decoder does.
    try:
        decoded = AllocateRequestDecoder.FromString(data)
    except ValueError:
        return
    assert decoded == AllocateRequest.parse(data)


texts = st.text(max_size=8)
specs = st.builds(DeviceSpec, container_path=texts, host_path=texts, permissions=texts)
answers = st.builds(
    ContainerAllocateResponse,
    envs=st.dictionaries(texts, texts, max_size=3),
    annotations=st.dictionaries(texts, st.text(max_size=300), max_size=3),
    devices=st.lists(specs, max_size=3),
)


@given(st.lists(answers, max_size=3))
def test_allocate_answers_encode_as_protobuf_does(containers: list[ContainerAllocateResponse]) -> None:
    assert bytes(EncodedAllocateResponse(containers)) == bytes(
        AllocateResponse(container_responses=containers)
    )
    assert EncodedAllocateResponse(containers).SerializeToString() == bytes(
        AllocateResponse(container_responses=containers)
    )


# IDs of any length and text, long ones past the one-byte length included.
preferred_ids = st.lists(st.text(max_size=3) | st.text(min_size=120, max_size=140), max_size=6)


@given(st.lists(preferred_ids, max_size=3))
def test_preferred_answers_encode_as_protobuf_does(containers: list[list[str]]) -> None:
    responses = [ContainerPreferredAllocationResponse(device_i_ds=ids) for ids in containers]
    expected = bytes(PreferredAllocationResponse(container_responses=responses))
    assert bytes(EncodedPreferredAllocationResponse(container_responses=responses)) == expected
    assert EncodedPreferredAllocationResponse(container_responses=responses).SerializeToString() == expected


def test_allocate_answers_with_mounts_or_cdi_devices_take_the_generic_encoder() -> None:
    containers = [
        ContainerAllocateResponse(envs={"A": "1"}, mounts=[Mount(container_path="/x", host_path="/y")]),
        ContainerAllocateResponse(cdi_devices=[CdiDevice(name="vendor.com/cpu=0")]),
    ]
    assert bytes(EncodedAllocateResponse(containers)) == bytes(
        AllocateResponse(container_responses=containers)
    )


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
