"""Hand-encoded ListAndWatchResponse bytes.

A 200-CPU shared pool lists 200,000 devices; the generic protobuf encoder takes seconds for that, far over
the 250 ms budget, so the agent encodes this one message itself, once per change, and every stream sends the
same bytes. Field numbers follow the device plugin API v1beta1: ListAndWatchResponse.devices = 1;
Device.ID = 1, health = 2, topology = 3; TopologyInfo.nodes = 1; NUMANode.ID = 1.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable

from agent.kubeletapi.v1beta1 import ListAndWatchResponse
from agent.plan import HEALTHY, UNHEALTHY, DeviceView, Resource, shared_device_id

_BASE36 = b"0123456789abcdefghijklmnopqrstuvwxyz"

_LEN = 2  # wire type of length-delimited fields


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _topology(numa_node: int) -> bytes:
    # proto3 does not write a zero ID: node 0 is an empty NUMANode message, which still says "node 0".
    node = b"" if numa_node == 0 else b"\x08" + _varint(numa_node)
    return _field(3, _field(1, node))


def encode_devices(devices: Iterable[DeviceView]) -> bytes:
    """The serialized ListAndWatchResponse listing `devices`, byte for byte what protobuf would write."""
    health_fields: dict[str, bytes] = {}
    topology_fields: dict[int, bytes] = {}
    parts: list[bytes] = []
    for device in devices:
        health = health_fields.get(device.health)
        if health is None:
            health = health_fields[device.health] = _field(2, device.health.encode())
        body = _field(1, device.id.encode()) + health
        if device.numa_node is not None:
            topology = topology_fields.get(device.numa_node)
            if topology is None:
                topology = topology_fields[device.numa_node] = _topology(device.numa_node)
            body += topology
        parts.append(_field(1, body))
    return b"".join(parts)


@functools.cache
def _tails(width: int) -> list[bytes]:
    """Every base-36 digit string of `width` characters, in order (36**3 = 46,656 at most in practice)."""
    return [bytes(t) for t in itertools.product(_BASE36, repeat=width)]


def encode_shared(count: int, retained: Iterable[int]) -> bytes:
    """The list of a shared pool: `count` healthy millicpu devices, then the retained (unhealthy) ones.

    The IDs 0 .. count-1 in base 36 come in runs that share their length and first digit; within a run
    every device differs only by its last digits, so one bytes.join per run writes the whole run. That is
    a few milliseconds for 200,000 devices, where a loop over device objects takes seconds.
    """
    health = _field(2, HEALTHY.encode())
    parts: list[bytes] = []
    left = count
    width = 1
    while left > 0:
        heads = _BASE36 if width == 1 else _BASE36[1:]
        tails = _tails(width - 1)
        framing = _varint(1 << 3 | _LEN) + _varint(width + 2 + len(health)) + b"\x0a" + _varint(width)
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


def encode_resource(resource: Resource) -> EncodedListAndWatchResponse:
    if resource.exclusive_pool:
        payload = encode_devices(resource.devices())
    else:
        payload = encode_shared(resource.shared_count, resource.shared_retained)
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
