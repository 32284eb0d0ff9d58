"""The status method: what `cpupool status` asks each resource's socket, beside the kubelet's own calls.

The kubelet calls only the DevicePlugin service. `cpupool status` calls DESCRIBE_PATH on the same socket
(root-only, like Allocate) instead of opening a ListAndWatch stream and calling Allocate, as it once did:
those counted as a kubelet stream and as allocations in the metrics, made every ID they named count as held,
and a 200,000-device list took seconds to decode. The reply is a summary, and the work for the holders' IDs
runs in slices so that an Allocate arriving meanwhile waits at most about a millisecond.

The messages are hand-encoded protobuf (proto3 rules), spoken only between the agent and its own CLI:

    DescribeRequest { repeated IdList holders = 1; }
    IdList          { repeated string device_ids = 1; }
    DescribeReply   { string resource = 1; bool preferred_allocation = 2; uint64 devices = 3;
                      uint64 healthy = 4; string cpus = 5; repeated Resolved holders = 6;
                      uint64 streams = 7; }
    Resolved        { string cpus = 1; uint64 unknown = 2; }

`holders[i]` of the reply answers `holders[i]` of the request: the CPUs those IDs mean to the agent, and how
many of them it does not know.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from agent.cpuset import CpuSet
from agent.plan import Resource
from agent.protowire import LEN, fields, string_batches, varint
from agent.protowire import field as len_field

DESCRIBE_PATH = "/cpupool.status.v1.Status/Describe"
# Long work on the agent's loop gives it a turn this often (an Allocate may be waiting).
SLICE_S = 0.001
# IDs handed to Resource.grant at once; the loop's clock is read once per batch.
_BATCH = 256


def _strings(number: int, values: Sequence[str]) -> bytes:
    # IDs are short: one tag byte and one length byte each, written without a call per ID.
    tag = bytes((number << 3 | LEN,))
    raws = [v.encode() for v in values]
    if all(len(r) < 0x80 for r in raws):
        return b"".join(tag + bytes((len(r),)) + r for r in raws)
    return b"".join(len_field(number, r) for r in raws)


def _string(value: int | bytes, what: str) -> str:
    if not isinstance(value, bytes):
        raise ValueError(f"{what} must be a string")
    return value.decode("utf-8")


def _uint(value: int | bytes, what: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"{what} must be an integer")
    return value


class DescribeRequest:
    """The holders' device ID lists. Kept as bytes: the agent reads them in slices (see `holders`)."""

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload

    @classmethod
    def of(cls, holders: Sequence[Sequence[str]]) -> DescribeRequest:
        return cls(b"".join(len_field(1, _strings(1, ids)) for ids in holders))

    @classmethod
    def FromString(cls, data: bytes) -> DescribeRequest:  # grpclib's codec decodes with this
        return cls(data)

    def SerializeToString(self) -> bytes:  # and encodes with this
        return self.payload

    def holders(self) -> Iterator[Iterator[list[str]]]:
        """Each holder's device IDs, in batches (see `describe`)."""
        for number, value in fields(self.payload):
            if number == 1:
                if not isinstance(value, bytes):
                    raise ValueError("DescribeRequest.holders must be messages")
                yield string_batches(value, 1, _BATCH)


@dataclass(frozen=True)
class Resolved:
    cpus: str
    unknown: int = 0


@dataclass(frozen=True)
class DescribeReply:
    resource: str
    preferred_allocation: bool
    devices: int
    healthy: int
    cpus: str
    holders: tuple[Resolved, ...] = field(default=())
    streams: int = 0

    def SerializeToString(self) -> bytes:
        parts = [
            len_field(1, self.resource.encode()),
            b"\x10" + varint(int(self.preferred_allocation)),
            b"\x18" + varint(self.devices),
            b"\x20" + varint(self.healthy),
            len_field(5, self.cpus.encode()),
        ]
        for resolved in self.holders:
            parts.append(
                len_field(6, len_field(1, resolved.cpus.encode()) + b"\x10" + varint(resolved.unknown))
            )
        parts.append(b"\x38" + varint(self.streams))
        return b"".join(parts)

    @classmethod
    def FromString(cls, data: bytes) -> DescribeReply:
        resource = cpus = ""
        preferred = False
        devices = healthy = streams = 0
        holders: list[Resolved] = []
        for number, value in fields(data):
            if number == 1:
                resource = _string(value, "resource")
            elif number == 2:
                preferred = bool(_uint(value, "preferred_allocation"))
            elif number == 3:
                devices = _uint(value, "devices")
            elif number == 4:
                healthy = _uint(value, "healthy")
            elif number == 5:
                cpus = _string(value, "cpus")
            elif number == 6:
                if not isinstance(value, bytes):
                    raise ValueError("holders must be messages")
                holder_cpus, unknown = "", 0
                for inner, item in fields(value):
                    if inner == 1:
                        holder_cpus = _string(item, "Resolved.cpus")
                    elif inner == 2:
                        unknown = _uint(item, "Resolved.unknown")
                holders.append(Resolved(holder_cpus, unknown))
            elif number == 7:
                streams = _uint(value, "streams")
        return cls(resource, preferred, devices, healthy, cpus, tuple(holders), streams)


async def describe(resource: Resource, devices: int, streams: int, request: DescribeRequest) -> DescribeReply:
    """The agent's answer for one resource: nothing is counted, held or changed by it."""
    resolved = []
    deadline = time.perf_counter() + SLICE_S
    for batches in request.holders():
        found: list[CpuSet] = []
        unknown = 0
        for batch in batches:
            known = [device_id for device_id in batch if resource.has_device(device_id)]
            unknown += len(batch) - len(known)
            found.append(resource.grant(known).cpus)
            if time.perf_counter() >= deadline:
                await asyncio.sleep(0)
                deadline = time.perf_counter() + SLICE_S
        resolved.append(Resolved(CpuSet().union(*set(found)).comma_list(), unknown))
    return DescribeReply(
        resource=resource.name,
        preferred_allocation=resource.exclusive_pool,
        devices=devices,
        healthy=resource.healthy_count,
        cpus=resource.cpus.comma_list(),
        holders=tuple(resolved),
        streams=streams,
    )
