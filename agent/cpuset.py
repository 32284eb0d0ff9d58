"""An immutable set of CPU numbers and the Linux cpu-list syntax (``0-3,8,10-11``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# Linux caps NR_CPUS at 8192 on common configs; anything far beyond is a typo, and
# expanding "0-999999999" would eat memory before failing.
MAX_CPU = 65535

# ASCII digits only: int() would accept other scripts' digits, which the kernel does not.
_RANGE = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")
# Longer numbers are above MAX_CPU anyway, and int() refuses over 4300 digits with a bare ValueError.
_MAX_DIGITS = len(str(MAX_CPU))


class CpuSetError(ValueError):
    """A cpu-list text that cannot be parsed; the message quotes the text."""


class CpuSet:
    """An ordered, immutable, hashable set of CPU numbers."""

    __slots__ = ("_cpus", "_hash", "_members")

    def __init__(self, cpus: Iterable[int] = ()) -> None:
        members = frozenset(cpus)
        for cpu in members:
            if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu < 0 or cpu > MAX_CPU:
                raise CpuSetError(f"invalid CPU number {cpu!r}: must be an integer from 0 to {MAX_CPU}")
        self._members = members
        self._cpus: tuple[int, ...] = tuple(sorted(members))
        self._hash = hash(self._cpus)

    @classmethod
    def parse(cls, text: str) -> CpuSet:
        """Parse a cpu list such as ``"0-3,8,10-11\\n"``; an empty or blank text is the empty set."""
        stripped = text.strip()
        if not stripped:
            return cls()
        cpus: set[int] = set()
        for raw in stripped.split(","):
            part = raw.strip()
            match = _RANGE.match(part)
            if match is None:
                what = "empty element" if not part else f"element {part!r} is not N or N-M"
                raise CpuSetError(f"invalid cpu list {text!r}: {what}")
            for digits in match.groups():
                if digits is not None and len(digits.lstrip("0")) > _MAX_DIGITS:
                    raise CpuSetError(
                        f"invalid cpu list {text!r}: CPU {digits[:20]}... is above the limit {MAX_CPU}"
                    )
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if last < first:
                raise CpuSetError(f"invalid cpu list {text!r}: range {part!r} runs backwards")
            if last > MAX_CPU:
                raise CpuSetError(f"invalid cpu list {text!r}: CPU {last} is above the limit {MAX_CPU}")
            cpus.update(range(first, last + 1))
        return cls(cpus)

    def format(self) -> str:
        """The canonical cpu list: ascending, ranges of three or more folded (``0-3,5,7-8`` style)."""
        parts: list[str] = []
        cpus = self._cpus
        i = 0
        while i < len(cpus):
            j = i
            while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
                j += 1
            if j == i:
                parts.append(str(cpus[i]))
            elif j == i + 1:
                parts.append(f"{cpus[i]},{cpus[j]}")
            else:
                parts.append(f"{cpus[i]}-{cpus[j]}")
            i = j + 1
        return ",".join(parts)

    def to_list(self) -> list[int]:
        return list(self._cpus)

    def comma_list(self) -> str:
        """Every CPU spelled out, comma separated, as the CPU pooler's env vars carry them."""
        return ",".join(str(cpu) for cpu in self._cpus)

    def __iter__(self) -> Iterator[int]:
        return iter(self._cpus)

    def __len__(self) -> int:
        return len(self._cpus)

    def __bool__(self) -> bool:
        return bool(self._cpus)

    def __contains__(self, cpu: object) -> bool:
        return cpu in self._members

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CpuSet):
            return self._cpus == other._cpus
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: CpuSet) -> bool:
        """Ordered by their lowest CPUs, so lists of sets sort deterministically."""
        return self._cpus < other._cpus

    def __or__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._members | other._members)

    def __and__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._members & other._members)

    def __sub__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._members - other._members)

    def __xor__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._members ^ other._members)

    def union(self, *others: CpuSet) -> CpuSet:
        return CpuSet(self._members.union(*(other._members for other in others)))

    def isdisjoint(self, other: CpuSet) -> bool:
        return self._members.isdisjoint(other._members)

    def issubset(self, other: CpuSet) -> bool:
        return self._members.issubset(other._members)

    @property
    def first(self) -> int:
        if not self._cpus:
            raise ValueError("empty CpuSet has no first CPU")
        return self._cpus[0]

    def __repr__(self) -> str:
        return f"CpuSet({self.format()!r})"

    def __str__(self) -> str:
        return self.format()
