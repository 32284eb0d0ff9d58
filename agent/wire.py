"""Hand-encoded ListAndWatchResponse bytes.

A 200-CPU shared pool lists 200,000 devices; the generic protobuf encoder takes seconds for that, far over
the 250 ms budget, so the agent encodes this one message itself, once per change, and every stream sends the
same bytes. Field numbers follow the device plugin API v1beta1: ListAndWatchResponse.devices = 1;
Device.ID = 1, health = 2, topology = 3; TopologyInfo.nodes = 1; NUMANode.ID = 1.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from agent.idset import IdSet, IdSetBuilder, shared_device_id
from agent.kubeletapi.v1beta1 import (
    AllocateRequest,
    AllocateResponse,
    ContainerAllocateRequest,
    ContainerAllocateResponse,
    ContainerPreferredAllocationRequest,
    ListAndWatchResponse,
    PreferredAllocationRequest,
    PreferredAllocationResponse,
)
from agent.plan import (
    HEALTHY,
    UNHEALTHY,
    DeviceView,
    Resource,
    device_numa,
    shared_entry_size,
)
from agent.protowire import field, fields, read_varint, varint

_BASE36 = b"0123456789abcdefghijklmnopqrstuvwxyz"
_DIGITS = [bytes((digit,)) for digit in _BASE36]

_LEN = 2  # wire type of length-delimited fields


def _topology(numa_node: int) -> bytes:
    # proto3 does not write a zero ID: node 0 is an empty NUMANode message, which still says "node 0".
    node = b"" if numa_node == 0 else b"\x08" + varint(numa_node)
    return field(3, field(1, node))


def encode_devices(devices: Iterable[DeviceView]) -> bytes:
    """The serialized ListAndWatchResponse listing `devices`, byte for byte what protobuf would write."""
    health_fields: dict[str, bytes] = {}
    topology_fields: dict[int, bytes] = {}
    parts: list[bytes] = []
    for device in devices:
        health = health_fields.get(device.health)
        if health is None:
            health = health_fields[device.health] = field(2, device.health.encode())
        body = field(1, device.id.encode()) + health
        if device.numa_node is not None:
            topology = topology_fields.get(device.numa_node)
            if topology is None:
                topology = topology_fields[device.numa_node] = _topology(device.numa_node)
            body += topology
        parts.append(field(1, body))
    return b"".join(parts)


@functools.cache
def _tails(width: int) -> list[bytes]:
    """Every base-36 digit string of `width` characters, in order (36**3 = 46,656 at most in practice).

    Built a digit at a time by concatenation: bytes() of each of itertools.product's tuples took 14 ms for
    width 3 on a small VM, on the event loop before a 200,000-device pool's first Register (this: 5.5 ms)."""
    if width == 0:
        return [b""]
    return [head + digit for head in _tails(width - 1) for digit in _DIGITS]


def encode_shared(count: int, retained: Iterable[int]) -> bytes:
    """The list of a shared pool: `count` healthy millicpu devices, then the retained (unhealthy) ones.

    The IDs 0 .. count-1 in base 36 come in runs that share their length and first digit; within a run
    every device differs only by its last digits, so one bytes.join per run writes the whole run. That is
    a few milliseconds for 200,000 devices, where a loop over device objects takes seconds.
    """
    health = field(2, HEALTHY.encode())
    parts: list[bytes] = []
    left = count
    width = 1
    while left > 0:
        heads = _BASE36 if width == 1 else _BASE36[1:]
        tails = _tails(width - 1)
        framing = varint(1 << 3 | _LEN) + varint(width + 2 + len(health)) + b"\x0a" + varint(width)
        for head in heads:
            if left <= 0:
                break
            run = tails[:left] if left < len(tails) else tails
            prefix = framing + bytes((head,))
            parts.append(prefix + (health + prefix).join(run) + health)
            left -= len(run)
        width += 1
    parts.append(encode_devices(DeviceView(shared_device_id(i), UNHEALTHY, None) for i in sorted(retained)))
    return b"".join(parts)


def _cut(payload: bytes, count: int, withheld: Iterable[int]) -> bytes:
    """`payload` (encode_shared of `count` healthy devices) without the entries of the `withheld` indexes.

    Every healthy entry of one ID width has the same size, so an entry's offset is arithmetic."""
    holes = sorted(i for i in withheld if i < count)
    if not holes:
        return payload
    starts = [0]
    width = 1
    while 36 ** (width - 1) <= count:
        low, high = (0 if width == 1 else 36 ** (width - 1)), min(36**width, count)
        starts.append(starts[-1] + max(0, high - low) * shared_entry_size(low))
        width += 1

    def offset(index: int) -> int:
        w = len(shared_device_id(index))
        low = 0 if w == 1 else 36 ** (w - 1)
        return starts[w - 1] + (index - low) * shared_entry_size(low)

    parts, pos = [], 0
    for index in holes:
        start = offset(index)
        parts.append(payload[pos:start])
        pos = start + shared_entry_size(index)
    parts.append(payload[pos:])
    return b"".join(parts)


def encode_resource(resource: Resource) -> EncodedListAndWatchResponse:
    if resource.exclusive_pool:
        payload = encode_devices(resource.devices())
    else:
        healthy = _cut(
            encode_shared(resource.shared_count, ()), resource.shared_count, resource.shared_withheld
        )
        retained = encode_devices(
            DeviceView(shared_device_id(i), UNHEALTHY, None) for i in sorted(resource.shared_retained)
        )
        foreign = encode_devices(
            DeviceView(d.id, UNHEALTHY, device_numa(d)) for d in resource.exclusive.values()
        )
        payload = healthy + retained + foreign
    return EncodedListAndWatchResponse(payload, resource.device_count)


class EncodedListAndWatchResponse(ListAndWatchResponse):
    """A ListAndWatchResponse whose bytes were computed once; grpclib's codec calls SerializeToString."""

    def __init__(self, payload: bytes, device_count: int) -> None:
        super().__init__()
        self._payload = payload
        self.device_count = device_count

    def SerializeToString(self) -> bytes:
        return self._payload

    def __bytes__(self) -> bytes:
        return self._payload


# --- Decoding the two requests on the admission path -------------------------------------------------------
# The generic decoder spends about 2 µs per repeated string: 1 ms for an Allocate of 500 millicpus, half of
# the round trip. These readers do the same work in a tenth of the time. Unknown fields are skipped as
# protobuf requires; anything malformed raises ValueError, which the servicer answers INVALID_ARGUMENT.


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: an int for varints, bytes for length-delimited fields."""
    return list(fields(data))


def _strings(fields: list[tuple[int, int | bytes]], number: int) -> list[str]:
    values = []
    for field_number, value in fields:
        if field_number == number:
            if not isinstance(value, bytes):
                raise ValueError(f"field {number} must be a string")
            values.append(value.decode("utf-8"))
    return values


def _messages(data: bytes, number: int) -> list[list[tuple[int, int | bytes]]]:
    out = []
    for field_number, value in _fields(data):
        if field_number == number:
            if not isinstance(value, bytes):
                raise ValueError(f"field {number} must be a message")
            out.append(_fields(value))
    return out


def _short_strings(data: bytes) -> list[str] | None:
    """Every field of `data` as text, when each one is field 1 (key 0x0a) with a one-byte length and the
    whole message is ASCII: how the kubelet lists device IDs. None for anything else, which the generic
    reader then decodes (or rejects).

    Split at each 0x0a and the byte after it, the message is (key, length byte, text) pieces; when every
    length byte is its text's length, the message is exactly the encoding of those texts, whatever they
    hold. Every step runs in C: a loop over the fields in Python cost about 0.2 ms for 500 millicpus on a
    small VM, this about 60 µs."""
    if not data.isascii():
        return None
    parts = _KEY_AND_LENGTH.split(data.decode("ascii"))
    if parts[0]:
        return None
    texts = parts[2::2]
    try:
        exact = "".join(parts[1::2]).encode("ascii") == bytes(map(len, texts))
    except ValueError:
        # A piece of 256 characters or more (bytes() refuses its length): no one-byte length says it, so
        # the message holds something else, such as an unknown field, which the generic reader skips.
        return None
    return texts if exact else None


_KEY_AND_LENGTH = re.compile("\n(.)", re.DOTALL)


def _device_ids_of(container: bytes) -> list[str]:
    ids = _short_strings(container)
    return ids if ids is not None else _strings(_fields(container), 1)


class AllocateRequestDecoder:
    """Stands in for AllocateRequest as a handler's request type: grpclib's codec only calls FromString."""

    @staticmethod
    def FromString(data: bytes) -> AllocateRequest:
        containers = []
        for field_number, value in _fields(data):
            if field_number == 1:
                if not isinstance(value, bytes):
                    raise ValueError("field 1 must be a message")
                containers.append(ContainerAllocateRequest(devices_ids=_device_ids_of(value)))
        return AllocateRequest(container_requests=containers)


# --- Writing the Allocate answer ----------------------------------------------------------------------------
# The generic encoder takes about 60 µs for one container's answer (its envs, annotations with the claim,
# device nodes); these few fields are written here in a tenth of that. ContainerAllocateResponse: envs = 1
# and annotations = 4 (maps: key = 1, value = 2, both always written), mounts = 2, devices = 3 (DeviceSpec:
# container_path = 1, host_path = 2, permissions = 3, empty strings left out), cdi_devices = 5.


def _text(number: int, value: str) -> bytes:
    return field(number, value.encode())


def _map(number: int, entries: Mapping[str, str]) -> list[bytes]:
    return [field(number, _text(1, key) + _text(2, value)) for key, value in entries.items()]


def encode_container_allocate(response: ContainerAllocateResponse) -> bytes | None:
    """One ContainerAllocateResponse as protobuf writes it; None when it uses a field written elsewhere."""
    if response.mounts or response.cdi_devices:
        return None
    parts = _map(1, response.envs)
    for device in response.devices:
        spec = b"".join(
            _text(number, value)
            for number, value in (
                (1, device.container_path),
                (2, device.host_path),
                (3, device.permissions),
            )
            if value
        )
        parts.append(field(3, spec))
    parts += _map(4, response.annotations)
    return b"".join(parts)


class EncodedAllocateResponse(AllocateResponse):
    """An AllocateResponse whose bytes are written by encode_container_allocate; the fields stay readable."""

    def __init__(self, container_responses: Sequence[ContainerAllocateResponse]) -> None:
        super().__init__(container_responses=list(container_responses))

    def __bytes__(self) -> bytes:
        parts = []
        for response in self.container_responses:
            body = encode_container_allocate(response)
            parts.append(field(1, body if body is not None else bytes(response)))
        return b"".join(parts)

    def SerializeToString(self) -> bytes:
        return self.__bytes__()


class EncodedPreferredAllocationResponse(PreferredAllocationResponse):
    """A PreferredAllocationResponse written by hand (container_responses = 1, each deviceIDs = 1): about
    a sixth of the generic encoder's time for the one-container answer of an admission."""

    def __bytes__(self) -> bytes:
        return b"".join(
            field(1, b"".join([field(1, i.encode()) for i in response.device_i_ds]))
            for response in self.container_responses
        )

    def SerializeToString(self) -> bytes:
        return self.__bytes__()


def _int32(fields: list[tuple[int, int | bytes]], number: int) -> int:
    value = 0
    for field_number, raw in fields:
        if field_number == number:
            if not isinstance(raw, int):
                raise ValueError(f"field {number} must be an integer")
            value = raw
    # int32 is sent as a 64-bit two's complement varint when negative.
    value &= 0xFFFFFFFFFFFFFFFF
    if value >= 1 << 63:
        value -= 1 << 64
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"field {number} is out of the int32 range")
    return value


class PreferredAllocationRequestDecoder:
    """Stands in for PreferredAllocationRequest as a handler's request type (see AllocateRequestDecoder)."""

    @staticmethod
    def FromString(data: bytes) -> PreferredAllocationRequest:
        return PreferredAllocationRequest(
            container_requests=[
                ContainerPreferredAllocationRequest(
                    available_deviceIDs=_strings(fields, 1),
                    must_include_deviceIDs=_strings(fields, 2),
                    allocation_size=_int32(fields, 3),
                )
                for fields in _messages(data, 1)
            ]
        )


# --- Reading the kubelet's record (PodResources List) -----------------------------------------------------
# With a 200,000-millicpu pool in use the List answer carries 200,000 device IDs: the generic decoder takes
# seconds for that. Only (resource name, device IDs) matter to the agent; this reader skips everything else.


def _device_ids(data: bytes, accept: Callable[[str], bool], out: dict[str, IdSetBuilder]) -> None:
    """One ContainerDevices message: resource_name = 1, device_ids = 2 (topology = 3 is skipped)."""
    name: str | None = None
    ids: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        key = data[pos]
        if key & 0x80:
            key, pos = read_varint(data, pos)
        else:
            pos += 1
        wire_type = key & 7
        if wire_type != _LEN:
            pos = _skip(data, pos, wire_type)
            continue
        length = data[pos]
        if length & 0x80:
            length, pos = read_varint(data, pos)
        else:
            pos += 1
        stop = pos + length
        if stop > end:
            raise ValueError("truncated length-delimited field")
        if key == 0x12:
            ids.append(data[pos:stop])
        elif key == 0x0A:
            name = data[pos:stop].decode("utf-8")
        pos = stop
    if name is not None and accept(name):
        builder = out.get(name)
        if builder is None:
            builder = out[name] = IdSetBuilder()
        for raw in ids:
            builder.add_wire(raw)


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return read_varint(data, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire_type}")


# One pod's devices per resource name: (lowest index, the bitmap shifted down to it, IDs that are no index).
_PodPart = dict[str, tuple[int, int, frozenset[str]]]


def _pod_part(pod: bytes) -> _PodPart:
    builders: dict[str, IdSetBuilder] = {}
    for number, container in _fields(pod):
        if number != 3 or not isinstance(container, bytes):
            continue
        for number2, devices in _fields(container):
            if number2 == 2 and isinstance(devices, bytes):
                _device_ids(devices, _everything, builders)
    part: _PodPart = {}
    for name, builder in builders.items():
        ids = builder.build()
        bits = ids.bits
        low = (bits & -bits).bit_length() - 1 if bits else 0
        part[name] = (low, bits >> low, ids.other)
    return part


def _everything(name: str) -> bool:
    return True


class HeldReader:
    """Reads the kubelet's List answers into device IDs per resource name, remembering each pod's part.

    The answer changes by a few pods between two reads while it can list 200,000 IDs: a pod whose bytes are
    the same as last time is not decoded again, so a re-read costs a few milliseconds once the first one is
    done. The memory is the last answer's pods, nothing older."""

    def __init__(self) -> None:
        self._pods: dict[bytes, _PodPart] = {}

    def read_in_steps(
        self, data: bytes, accept: Callable[[str], bool], out: dict[str, IdSet]
    ) -> Iterator[None]:
        """Fill `out` with the IDs per resource name `accept` takes, yielding after each pod decoded and
        every 64 pods known: the caller decides how much to do at a time (the agent runs it on its event
        loop in slices of a millisecond). `out` is filled at the end, all at once; on an error (a malformed
        answer, raised as ValueError) it stays empty.

        pod_resources = 1 -> PodResources.containers = 3 -> ContainerResources.devices = 2."""
        known = self._pods
        seen: dict[bytes, _PodPart] = {}
        bits: dict[str, int] = {}
        other: dict[str, set[str]] = {}
        for n, (number, pod) in enumerate(_fields(data)):
            if number != 1 or not isinstance(pod, bytes):
                continue
            part = known.get(pod)
            if part is None:
                part = _pod_part(pod)
                yield
            elif n % 64 == 63:
                yield
            seen[pod] = part
            for name, (low, pod_bits, pod_other) in part.items():
                if not accept(name):
                    continue
                bits[name] = bits.get(name, 0) | (pod_bits << low)
                if pod_other:
                    other.setdefault(name, set()).update(pod_other)
        self._pods = seen
        for name, name_bits in bits.items():
            out[name] = IdSet(name_bits, frozenset(other.get(name, ())))


def held_device_ids_in_steps(
    data: bytes, accept: Callable[[str], bool], out: dict[str, IdSet]
) -> Iterator[None]:
    """HeldReader.read_in_steps without a memory of earlier answers."""
    return HeldReader().read_in_steps(data, accept, out)


def held_device_ids(data: bytes, accept: Callable[[str], bool]) -> dict[str, IdSet]:
    """Device IDs per resource name in a serialized ListPodResourcesResponse, in one go."""
    out: dict[str, IdSet] = {}
    for _ in held_device_ids_in_steps(data, accept, out):
        pass
    return out
