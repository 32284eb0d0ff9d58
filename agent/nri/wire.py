"""Protobuf on the NRI wire, by hand where speed matters.

The generated betterproto2 classes (agent.nriapi) take about a millisecond to parse one CreateContainerRequest
of a real pod (env, mounts, annotations), and Synchronize carries hundreds of containers. The plugin needs a
handful of fields from each, so it walks the bytes and keeps only those. Field numbers follow NRI's api.proto
(v0.12.5) and ttrpc's request.proto; replies are small and use the generated classes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from agent.claim import KEY_PREFIX
from agent.protowire import field, varint

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not the protobuf message they claim to be; the message says where it broke."""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 10 bytes")


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) for every field: an int for varints, bytes for the rest (fixed ones raw)."""
    out: list[tuple[int, int | bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if kind == _VARINT:
            value, pos = _read_varint(data, pos)
            out.append((number, value))
        elif kind == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > end:
                raise WireError(f"field {number}: {size} bytes announced, {end - pos} left")
            out.append((number, data[pos : pos + size]))
            pos += size
        elif kind == _I64:
            if pos + 8 > end:
                raise WireError(f"field {number}: truncated fixed64")
            out.append((number, data[pos : pos + 8]))
            pos += 8
        elif kind == _I32:
            if pos + 4 > end:
                raise WireError(f"field {number}: truncated fixed32")
            out.append((number, data[pos : pos + 4]))
            pos += 4
        else:
            raise WireError(f"field {number}: wire type {kind} is not used by proto3")
    return out


def select(data: bytes, wanted: frozenset[int]) -> dict[int, int | bytes]:
    """The `wanted` fields of a message (the last occurrence of each), skipping every other field without
    copying it: a container's env, mounts and annotations cost a few varint reads."""
    out: dict[int, int | bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        # Keys and most lengths are one byte: read those inline (this loop runs for every env entry).
        key = data[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if kind == _LEN:
            if pos < end and data[pos] < 0x80:
                size = data[pos]
                pos += 1
            else:
                size, pos = _read_varint(data, pos)
            if pos + size > end:
                raise WireError(f"field {number}: {size} bytes announced, {end - pos} left")
            if number in wanted:
                out[number] = data[pos : pos + size]
            pos += size
        elif kind == _VARINT:
            value, pos = _read_varint(data, pos)
            if number in wanted:
                out[number] = value
        elif kind == _I64:
            pos += 8
        elif kind == _I32:
            pos += 4
        else:
            raise WireError(f"field {number}: wire type {kind} is not used by proto3")
        if pos > end:
            raise WireError(f"field {number}: truncated")
    return out


def _text(value: int | bytes, what: str) -> str:
    if not isinstance(value, bytes):
        raise WireError(f"{what}: expected a string, got a varint")
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise WireError(f"{what}: not UTF-8") from exc


def _bytes(value: int | bytes, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise WireError(f"{what}: expected a message, got a varint")
    return value


def _int(value: int | bytes, what: str) -> int:
    if not isinstance(value, int):
        raise WireError(f"{what}: expected a varint")
    return value


# --- ttrpc's own messages (request.proto, proto/status.proto)


@dataclass(frozen=True)
class TtrpcRequest:
    service: str
    method: str
    payload: bytes
    timeout_nano: int = 0

    def encode(self) -> bytes:
        out = field(1, self.service.encode()) + field(2, self.method.encode())
        if self.payload:
            out += field(3, self.payload)
        if self.timeout_nano:
            out += varint(4 << 3 | _VARINT) + varint(self.timeout_nano)
        return out

    @classmethod
    def decode(cls, data: bytes) -> TtrpcRequest:
        service = method = ""
        payload = b""
        timeout = 0
        for number, value in fields(data):
            if number == 1:
                service = _text(value, "Request.service")
            elif number == 2:
                method = _text(value, "Request.method")
            elif number == 3:
                payload = _bytes(value, "Request.payload")
            elif number == 4:
                timeout = _int(value, "Request.timeout_nano")
            # 5 (metadata) carries nothing NRI uses
        return cls(service, method, payload, timeout)


@dataclass(frozen=True)
class TtrpcResponse:
    payload: bytes = b""
    # A google.rpc.Status code (0 = OK) and message.
    code: int = 0
    message: str = ""

    def encode(self) -> bytes:
        status = b""
        if self.code:
            status += varint(1 << 3 | _VARINT) + varint(self.code)
        if self.message:
            status += field(2, self.message.encode())
        out = field(1, status) if status else b""
        if self.payload:
            out += field(2, self.payload)
        return out

    @classmethod
    def decode(cls, data: bytes) -> TtrpcResponse:
        payload = b""
        code, message = 0, ""
        for number, value in fields(data):
            if number == 1:
                for inner, item in fields(_bytes(value, "Response.status")):
                    if inner == 1:
                        code = _int(item, "Status.code")
                    elif inner == 2:
                        message = _text(item, "Status.message")
            elif number == 2:
                payload = _bytes(value, "Response.payload")
        return cls(payload, code, message)


# --- the parts of NRI's messages the plugin reads


@dataclass(frozen=True)
class PodRef:
    id: str = ""
    name: str = ""
    uid: str = ""
    namespace: str = ""


@dataclass(frozen=True)
class ContainerRef:
    id: str = ""
    pod_sandbox_id: str = ""
    name: str = ""
    state: int = 0
    # linux.resources.cpu.cpus / .mems as the runtime has them ("" = not set).
    cpus: str = ""
    mems: str = ""
    # (key, value) of the annotations that look like Allocate claims (agent/claim.py); read at creation only.
    claims: tuple[tuple[str, str], ...] = ()


_POD_FIELDS = frozenset({1, 2, 3, 4})
_CONTAINER_FIELDS = frozenset({1, 2, 3, 4, 11})
_ONE, _TWO, _THREE = frozenset({1}), frozenset({2}), frozenset({3})
_CPU_FIELDS = frozenset({6, 7})
_KEY_VALUE = frozenset({1, 2})
# In every claim annotation's key (`<base>/claim-<pool>`): a byte search rules most containers out.
CLAIM_MARK = "/" + KEY_PREFIX
_CLAIM_MARK_BYTES = CLAIM_MARK.encode()


def decode_pod(data: bytes) -> PodRef:
    found = select(data, _POD_FIELDS)
    return PodRef(*(_text(found.get(n, b""), f"PodSandbox field {n}") for n in (1, 2, 3, 4)))


def decode_cpu(resources: bytes) -> tuple[str, str]:
    """(cpus, mems) of a LinuxResources message."""
    cpu = select(resources, _TWO).get(2)  # LinuxResources.cpu
    if cpu is None:
        return "", ""
    found = select(_bytes(cpu, "LinuxResources.cpu"), _CPU_FIELDS)
    return _text(found.get(6, b""), "LinuxCPU.cpus"), _text(found.get(7, b""), "LinuxCPU.mems")


def _claim_annotations(data: bytes) -> tuple[tuple[str, str], ...]:
    """The Container.annotations (field 6, map entries {1: key, 2: value}) whose key names a claim."""
    out: list[tuple[str, str]] = []
    for number, value in fields(data):
        if number != 6:
            continue
        entry = select(_bytes(value, "Container.annotations"), _KEY_VALUE)
        key = _text(entry.get(1, b""), "Container.annotations key")
        if CLAIM_MARK in key:
            out.append((key, _text(entry.get(2, b""), "Container.annotations value")))
    return tuple(out)


def decode_container(data: bytes, claims: bool = False) -> ContainerRef:
    """The fields the plugin reads; with `claims`, also the claim annotations (a second walk, taken only
    when the bytes hold a claim key at all)."""
    found = select(data, _CONTAINER_FIELDS)
    cpus = mems = ""
    linux = found.get(11)  # Container.linux
    if linux is not None:
        resources = select(_bytes(linux, "Container.linux"), _THREE).get(3)  # LinuxContainer.resources
        if resources is not None:
            cpus, mems = decode_cpu(_bytes(resources, "LinuxContainer.resources"))
    return ContainerRef(
        _text(found.get(1, b""), "Container.id"),
        _text(found.get(2, b""), "Container.pod_sandbox_id"),
        _text(found.get(3, b""), "Container.name"),
        _int(found.get(4, 0), "Container.state"),
        cpus,
        mems,
        _claim_annotations(data) if claims and _CLAIM_MARK_BYTES in data else (),
    )


def decode_pod_event(data: bytes) -> PodRef:
    """RunPodSandboxRequest, RemovePodSandboxRequest: pod = 1."""
    pod = select(data, _ONE).get(1)
    return PodRef() if pod is None else decode_pod(_bytes(pod, "request.pod"))


@dataclass(frozen=True)
class ContainerEvent:
    """CreateContainer, UpdateContainer, StopContainer, RemoveContainer: pod = 1, container = 2."""

    pod: PodRef
    container: ContainerRef
    # UpdateContainerRequest.linux_resources (field 3): the cpuset the kubelet asks for now, None if absent.
    update_cpus: str | None = None


def decode_container_event(data: bytes, claims: bool = False) -> ContainerEvent:
    pod = PodRef()
    container = ContainerRef()
    update: str | None = None
    for number, value in fields(data):
        if number == 1:
            pod = decode_pod(_bytes(value, "request.pod"))
        elif number == 2:
            container = decode_container(_bytes(value, "request.container"), claims)
        elif number == 3:
            update, _ = decode_cpu(_bytes(value, "UpdateContainerRequest.linux_resources"))
    return ContainerEvent(pod, container, update)


@dataclass(frozen=True)
class SyncBatch:
    pods: list[PodRef]
    containers: list[ContainerRef]
    more: bool


def decode_synchronize(data: bytes) -> SyncBatch:
    pods: list[PodRef] = []
    containers: list[ContainerRef] = []
    more = False
    for number, value in fields(data):
        if number == 1:
            pods.append(decode_pod(_bytes(value, "SynchronizeRequest.pods")))
        elif number == 2:
            containers.append(decode_container(_bytes(value, "SynchronizeRequest.containers")))
        elif number == 3:
            more = bool(_int(value, "SynchronizeRequest.more"))
    return SyncBatch(pods, containers, more)


# --- the plugin's replies: only cpusets, encoded by hand (the generic encoder costs ~0.1 ms per message)


@functools.lru_cache(maxsize=1024)
def _linux_resources_cpu(cpus: str, mems: str) -> bytes:
    cpu = (field(6, cpus.encode()) if cpus else b"") + (field(7, mems.encode()) if mems else b"")
    return field(2, cpu)  # LinuxResources.cpu


def encode_adjustment(cpus: str, mems: str) -> bytes:
    """CreateContainerResponse{adjust: {linux: {resources: {cpu: {cpus, mems}}}}}."""
    resources = field(2, _linux_resources_cpu(cpus, mems))  # LinuxContainerAdjustment.resources
    return field(1, field(6, resources))  # CreateContainerResponse.adjust, ContainerAdjustment.linux


def encode_update(container_id: str, cpus: str, mems: str, ignore_failure: bool = True) -> bytes:
    """One ContainerUpdate setting a container's cpuset (the body, without its field key)."""
    linux = field(1, _linux_resources_cpu(cpus, mems))  # LinuxContainerUpdate.resources
    out = field(1, container_id.encode()) + field(2, linux)
    if ignore_failure:
        out += b"\x18\x01"  # field 3, varint 1
    return out


def encode_updates(updates: list[bytes], more: bool = False) -> bytes:
    """The `repeated ContainerUpdate update = 1` of UpdateContainerResponse, SynchronizeResponse and
    UpdateContainersRequest; `more` is SynchronizeResponse.more (field 2)."""
    return b"".join(field(1, u) for u in updates) + (b"\x10\x01" if more else b"")
