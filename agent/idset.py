"""Device IDs, and a compact immutable set of them for the kubelet's record of what is held.

A shared pool of 200 CPUs has 200,000 millicpu devices, and all of them can be held. As Python strings in a
set that is 15 MB of small objects: freeing one such set holds the event loop for 15 ms, and a garbage
collection that meets it another 20 ms. Every ID this agent hands out is a number written in base 36 (a
shared device: its millicpu index; an exclusive one: its CPU number in decimal, which also reads as base
36), so an `IdSet` keeps each canonical base-36 ID as one bit of an integer: 25 KB for 200,000 IDs, set
operations in microseconds, nothing for the collector to walk. Anything else (another plugin's naming, an
ID from a hand-written test) is kept as a string beside the bits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
# Our shared IDs: lower-case base 36 without leading zeros, 8 digits at most.
SHARED_ID_PATTERN = "0|[1-9a-z][0-9a-z]{0,7}"
_SHARED_ID = re.compile(SHARED_ID_PATTERN)
_SHARED_ID_BYTES = re.compile(SHARED_ID_PATTERN.encode())
# An ID above this (4.7 million millicpus, far beyond what a kubelet message can list) is kept as a string:
# one odd ID must not turn the bitmap into megabytes.
MAX_BIT = 1 << 22
_ONE = re.compile("1")


def shared_device_id(index: int) -> str:
    """The ID of millicpu number `index` of a shared pool: base 36, 4 characters at most below 1.6 million."""
    if index == 0:
        return "0"
    out = []
    while index:
        index, digit = divmod(index, 36)
        out.append(_DIGITS[digit])
    return "".join(reversed(out))


def shared_device_index(device_id: str) -> int | None:
    """The millicpu index behind a shared device ID, None when the text is not one of ours."""
    if _SHARED_ID.fullmatch(device_id) is None:
        return None
    return int(device_id, 36)


def _bit_of(device_id: str) -> int | None:
    index = shared_device_index(device_id)
    return index if index is not None and index < MAX_BIT else None


class IdSetBuilder:
    """Collects IDs (as the kubelet's wire bytes, or as text) into an IdSet."""

    __slots__ = ("_indexes", "_other")

    def __init__(self) -> None:
        self._indexes: list[int] = []
        self._other: set[str] = set()

    def add_wire(self, raw: bytes) -> None:
        """One device ID as it appears on the wire (UTF-8)."""
        if _SHARED_ID_BYTES.fullmatch(raw) is not None:
            index = int(raw, 36)
            if index < MAX_BIT:
                self._indexes.append(index)
                return
        self._other.add(raw.decode("utf-8"))

    def add(self, device_id: str) -> None:
        index = _bit_of(device_id)
        if index is None:
            self._other.add(device_id)
        else:
            self._indexes.append(index)

    def build(self) -> IdSet:
        return IdSet(_bitmap(self._indexes), frozenset(self._other))


def _bitmap(indexes: list[int]) -> int:
    """The bitmap of these indexes: one ASCII '0'/'1' per index from the lowest to the highest, read as a
    binary number in one C call (a shift-and-or per index would copy the whole bitmap each time)."""
    if not indexes:
        return 0
    low, high = min(indexes), max(indexes)
    flags = bytearray(b"0") * (high - low + 1)
    for index in indexes:
        flags[index - low] = 0x31
    flags.reverse()
    return int(flags, 2) << low


class IdSet(AbstractSet[str]):
    """An immutable, hashable set of device IDs (see the module's docstring). Behaves as a set of strings;
    operations between two IdSets work on the bitmaps."""

    __slots__ = ("_bits", "_bytes", "_len", "_other")

    def __init__(self, bits: int = 0, other: frozenset[str] = frozenset()) -> None:
        self._bits = bits
        self._other = other
        self._len = bits.bit_count() + len(other)
        self._bytes: bytes | None = None

    @classmethod
    def of(cls, ids: Iterable[str]) -> IdSet:
        if isinstance(ids, IdSet):
            return ids
        builder = IdSetBuilder()
        for device_id in ids:
            builder.add(device_id)
        return builder.build()

    @classmethod
    def from_indexes(cls, indexes: Iterable[int]) -> IdSet:
        """The shared IDs of these millicpu indexes."""
        values = list(indexes)
        below = [i for i in values if i < MAX_BIT]
        other: frozenset[str] = frozenset()
        if len(below) != len(values):
            other = frozenset(shared_device_id(i) for i in values if i >= MAX_BIT)
        return cls(_bitmap(below), other)

    @classmethod
    def span(cls, start: int, stop: int) -> IdSet:
        """The shared IDs of millicpu indexes start .. stop-1."""
        if stop <= start:
            return EMPTY
        if stop > MAX_BIT:
            return cls.from_indexes(range(start, stop))
        return cls(((1 << (stop - start)) - 1) << start)

    @classmethod
    def _from_iterable(cls, it: Iterable[str]) -> IdSet:  # type: ignore[override]
        # What the Set mixins build their results with, for operations with other kinds of sets.
        return cls.of(it)

    # --- the set protocol -------------------------------------------------------------------------------

    def __contains__(self, device_id: object) -> bool:
        if not isinstance(device_id, str):
            return False
        index = _bit_of(device_id)
        if index is None:
            return device_id in self._other
        if index >= self._bits.bit_length():
            return False
        data = self._bytes
        if data is None:
            # Looked up per ID on the Allocate path: a bytes copy makes each lookup O(1), where a shift of
            # a 25 KB integer is not.
            data = self._bytes = self._bits.to_bytes((self._bits.bit_length() + 7) // 8, "little")
        return bool(data[index >> 3] >> (index & 7) & 1)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[str]:
        for index in self.indexes():
            yield shared_device_id(index)
        yield from sorted(self._other)

    def __hash__(self) -> int:
        return hash((self._bits, self._other))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IdSet):
            return self._bits == other._bits and self._other == other._other
        if isinstance(other, AbstractSet):
            return len(self) == len(other) and all(i in self for i in other)
        return NotImplemented

    def __repr__(self) -> str:
        shown = list(self.indexes(limit=8))
        more = "..." if self._bits.bit_count() > len(shown) else ""
        return f"IdSet(indexes={shown}{more}, other={sorted(self._other)})"

    def _coerce(self, other: Iterable[object]) -> IdSet:
        return other if isinstance(other, IdSet) else IdSet.of(i for i in other if isinstance(i, str))

    def __and__(self, other: Iterable[object]) -> IdSet:
        theirs = self._coerce(other)
        return IdSet(self._bits & theirs._bits, self._other & theirs._other)

    def __or__(self, other: Iterable[object]) -> IdSet:
        theirs = self._coerce(other)
        return IdSet(self._bits | theirs._bits, self._other | theirs._other)

    def __sub__(self, other: Iterable[object]) -> IdSet:
        theirs = self._coerce(other)
        return IdSet(self._bits & ~theirs._bits, self._other - theirs._other)

    __rand__ = __and__
    __ror__ = __or__

    def isdisjoint(self, other: Iterable[object]) -> bool:
        theirs = self._coerce(other)
        return not (self._bits & theirs._bits) and self._other.isdisjoint(theirs._other)

    # --- indexes ----------------------------------------------------------------------------------------

    def indexes(self, start: int = 0, stop: int | None = None, limit: int | None = None) -> Iterator[int]:
        """The millicpu indexes in the set, ascending, from `start` (below `stop` when given)."""
        bits = self._bits >> start if start > 0 else self._bits
        if stop is not None:
            bits &= (1 << max(stop - start, 0)) - 1
        if not bits:
            return
        text = format(bits, "b")[::-1]
        for n, match in enumerate(_ONE.finditer(text)):
            if limit is not None and n >= limit:
                return
            yield match.start() + start

    def count_from(self, start: int) -> int:
        """How many millicpu indexes at or above `start` the set holds."""
        return (self._bits >> start).bit_count() if start > 0 else self._bits.bit_count()

    @property
    def bits(self) -> int:
        """The bitmap: bit i set for the shared ID of index i."""
        return self._bits

    @property
    def other(self) -> frozenset[str]:
        """The IDs that are no index (not in our base-36 form)."""
        return self._other


EMPTY = IdSet()
