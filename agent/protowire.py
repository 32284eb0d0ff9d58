"""Protobuf wire-format primitives shared by the hand-written encoders of both sides of the node
(agent.wire for the kubelet, agent.nri.wire for the runtime)."""

from __future__ import annotations

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
    return varint(number << 3 | LEN) + varint(len(payload)) + payload
