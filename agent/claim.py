"""Signed claims: what the agent's Allocate gave a container, in a form only the agent can write.

Allocate never says which pod it serves, and the kubelet's record (PodResources) costs the NRI plugin a
round trip while the runtime waits. So every Allocate answer carries, as a container annotation, the
resource name, the device IDs and a nonce, with an HMAC under a key only the agent holds. The kubelet
copies a device plugin's annotations into the container's CRI annotations (never into the pod, never into
the environment), and the runtime hands them to NRI at CreateContainer: a claim that verifies there is the
kubelet's own allocation, available without asking anyone.

A pod author cannot write a container's CRI annotations, and a forged value fails the MAC; a copied value
is a replay, which the NRI plugin guards against (see docs/enforcement.md). Pure: no IO here; the key file
lives in `agent.ledger`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Annotation key `<base>/claim-<pool>`: one per resource, as the kubelet merges the annotations of every
# resource a container holds into one map.
KEY_PREFIX = "claim-"
VERSION = "1"
KEY_BYTES = 32
# 128 bits of HMAC-SHA256 and of nonce: far beyond guessing, short enough for an annotation.
_MAC_BYTES = 16
_NONCE_BYTES = 12
# The MAC covers this label too, so that the key could never sign anything else by accident.
_DOMAIN = b"cpupool-claim\x00"
# A gapless ascending run of base-36 numbers (the IDs of a shared pool's millicpus, as GetPreferredAllocation
# orders them) travels as one index range: a container may hold thousands. Allocate runs this for every
# container, so the run is recognised by one comparison of texts, not by parsing every ID.
_CANONICAL = re.compile(r"0|[1-9a-z][0-9a-z]*")
_MAX_TEXT = 64 * 1024


class ClaimError(ValueError):
    """A claim that does not verify; the message says why (never the key)."""


@dataclass(frozen=True)
class Claim:
    resource: str
    device_ids: tuple[str, ...]
    # Unique per Allocate answer: a container restart shows the same claim again, another container never.
    nonce: str


def annotation_key(resource: str) -> str:
    """`cpupool.io/fast` -> `cpupool.io/claim-fast`."""
    base, _, pool = resource.partition("/")
    return f"{base}/{KEY_PREFIX}{pool}"


def is_claim_key(key: str) -> bool:
    return key.partition("/")[2].startswith(KEY_PREFIX)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _base36(index: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        index, digit = divmod(index, 36)
        out = digits[digit] + out
        if not index:
            return out


# Base-36 texts of 0, 1, 2, ...: a range of millicpus is expanded by slicing this, not digit by digit.
_NAMES: list[str] = []


def _names(first: int, last: int) -> list[str]:
    if len(_NAMES) <= last:
        _NAMES.extend(_base36(i) for i in range(len(_NAMES), last + 1))
    return _NAMES[first : last + 1]


def _encode_ids(ids: Sequence[str]) -> str | None:
    """`r<first>-<last>` for a gapless run of base-36 IDs, else `l<id,id,...>`; None for IDs that cannot
    travel (empty, or holding the separators)."""
    first, last = (ids[0], ids[-1]) if ids else ("", "")
    if _CANONICAL.fullmatch(first) and _CANONICAL.fullmatch(last):
        low, high = int(first, 36), int(last, 36)
        listed = ids if isinstance(ids, list) else list(ids)
        if high - low + 1 == len(ids) and listed == _names(low, high):
            return f"r{low}" if high == low else f"r{low}-{high}"
    joined = ",".join(ids)
    if (
        not joined
        or ";" in joined
        or joined.count(",") != len(ids) - 1
        or ",," in joined
        or joined[0] == ","
        or joined[-1] == ","
    ):
        return None
    return "l" + joined


def _decode_ids(text: str) -> tuple[str, ...]:
    kind, body = text[:1], text[1:]
    if kind == "l":
        return tuple(body.split(","))
    if kind != "r":
        raise ClaimError(f"unknown device list form {kind!r}")
    out: list[str] = []
    for part in body.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ClaimError(f"bad range {part!r}")
        first, last = int(low), int(high or low)
        if last < first or last - first > 1 << 20:
            raise ClaimError(f"bad range {part!r}")
        out.extend(_names(first, last))
    return tuple(out)


class ClaimKey:
    """Issues and verifies claims under one secret key."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError(f"a claim key has {KEY_BYTES} bytes, got {len(secret)}")
        self._secret = secret

    @classmethod
    def ephemeral(cls) -> ClaimKey:
        """A key for an agent without a state directory: its claims die with the process."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._secret, _DOMAIN + body.encode(), hashlib.sha256).digest()
        return _b64(digest[:_MAC_BYTES])

    def issue(self, resource: str, device_ids: Sequence[str]) -> str | None:
        """The annotation value for an Allocate of `device_ids`; None if the IDs cannot be carried."""
        if not device_ids or ";" in resource:
            return None
        ids = _encode_ids(device_ids)
        if ids is None:
            return None
        body = f"{VERSION};{resource};{_b64(secrets.token_bytes(_NONCE_BYTES))};{ids}"
        return f"{body};{self._mac(body)}"

    def verify(self, text: str) -> Claim:
        """The claim `text` stands for; ClaimError if it was not issued under this key."""
        if len(text) > _MAX_TEXT:
            raise ClaimError(f"{len(text)} characters, more than any claim the agent writes")
        body, _, mac = text.rpartition(";")
        if not hmac.compare_digest(self._mac(body), mac):
            raise ClaimError("the MAC does not match: not issued under this agent's key")
        version, resource, nonce, ids = [*body.split(";"), "", "", ""][:4]
        if version != VERSION or not resource or not nonce or not ids:
            raise ClaimError(f"signed but unreadable (version {version!r})")
        return Claim(resource, _decode_ids(ids), nonce)


@dataclass(frozen=True)
class Verified:
    """The claims found among a container's annotations."""

    claims: tuple[Claim, ...]
    # Claim-shaped annotations that did not verify, as "key: reason".
    invalid: tuple[str, ...]

    def devices(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for claim in self.claims:
            out.setdefault(claim.resource, []).extend(claim.device_ids)
        return {name: tuple(ids) for name, ids in out.items()}


def read_claims(key: ClaimKey, annotations: Mapping[str, str] | Iterable[tuple[str, str]]) -> Verified:
    """Verify every claim annotation of a container. A claim must sit under its own resource's key, so
    that one resource's claim cannot stand in for another's."""
    pairs = annotations.items() if isinstance(annotations, Mapping) else annotations
    claims: list[Claim] = []
    invalid: list[str] = []
    for name, value in pairs:
        if not is_claim_key(name):
            continue
        try:
            claim = key.verify(value)
        except ClaimError as exc:
            invalid.append(f"{name}: {exc}")
            continue
        if annotation_key(claim.resource) != name:
            invalid.append(f"{name}: a claim on {claim.resource} under another resource's key")
            continue
        claims.append(claim)
    return Verified(tuple(claims), tuple(invalid))
