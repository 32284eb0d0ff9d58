"""Protobuf wire-format primitives shared by the hand-written encoders of both sides of the node
(agent.wire for the kubelet, agent.nri.wire for the runtime) and by the status method (agent.statusapi)."""

from __future__ import annotations

from collections.abc import Iterator

LEN = 2
"""Wire type of length-delimited fields (strings, bytes, messages, packed repeated)."""


def varint(value: int) -> bytes:
    """`value` as a base-128 varint; a negative int64 goes out as ten-byte two's complement."""
    out = bytearray()
    value &= (1 << 64) - 1
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    if number < 16 and len(payload) < 0x80:
        # Tag and length fit a byte each, the common case of the Allocate answers: no varint loop.
        return bytes((number << 3 | LEN, len(payload))) + payload
    return varint(number << 3 | LEN) + varint(len(payload)) + payload


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; ValueError when it is cut short or over-long."""
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or over-long varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field in order: an int for varints, bytes for length-delimited fields;
    fixed-size fields are skipped, as a reader that does not know them must. ValueError on malformed input."""
    pos, end = 0, len(data)
    while pos < end:
        # One-byte keys and lengths are the common case: read inline, without a call.
        key = data[pos]
        if key & 0x80:
            key, pos = read_varint(data, pos)
        else:
            pos += 1
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            value, pos = read_varint(data, pos)
            yield number, value
            continue
        if wire_type == LEN:
            if pos < end and not data[pos] & 0x80:
                length = data[pos]
                pos += 1
            else:
                length, pos = read_varint(data, pos)
            if pos + length > end:
                raise ValueError("truncated length-delimited field")
            yield number, data[pos : pos + length]
            pos += length
            continue
        if wire_type not in (1, 5):
            raise ValueError(f"unsupported wire type {wire_type}")
        pos += 8 if wire_type == 1 else 4
        if pos > end:
            raise ValueError("truncated fixed-size field")


def strings(data: bytes, number: int) -> list[str]:
    """The values of string field `number` of a message, other fields skipped; ValueError when malformed."""
    return [value for batch in string_batches(data, number) for value in batch]


def string_batches(data: bytes, number: int, size: int = 256) -> Iterator[list[str]]:
    """`strings` in lists of at most `size` values, so that a caller on the event loop can pause between.

    Device ID lists are long runs of short strings: one-byte keys and lengths are read without a call per
    field (a fifth of the time of `fields`); any other shape is read through `fields`."""
    want = number << 3 | LEN
    batch: list[str] = []
    pos, end = 0, len(data)
    while pos + 1 < end:
        key, length = data[pos], data[pos + 1]
        if key & 0x80 or length & 0x80 or key & 7 != LEN:
            break
        stop = pos + 2 + length
        if stop > end:
            raise ValueError("truncated length-delimited field")
        if key == want:
            batch.append(data[pos + 2 : stop].decode("utf-8"))
            if len(batch) >= size:
                yield batch
                batch = []
        pos = stop
    if pos < end:
        # Not the short shape from here on: the general reader takes over at this field.
        for found, value in fields(data[pos:]):
            if found == number:
                if not isinstance(value, bytes):
                    raise ValueError(f"field {number} must be a string")
                batch.append(value.decode("utf-8"))
                if len(batch) >= size:
                    yield batch
                    batch = []
    if batch:
        yield batch
