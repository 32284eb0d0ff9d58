"""The agent's memory across restarts: what every device ID it served means, for every resource name.

The kubelet's record (PodResources) says which IDs are held, never what they mean: "7" of a pool that was
exclusive is CPU 7, of a pool that became shared it is millicpu #7. The plan is that meaning; this module
writes it to a small JSON file before each changed plan is served and reads it back at start, so an agent
restarted with another config still knows which CPUs the held IDs stand for.

The file lives on the host (a hostPath the chart mounts), not in the kubelet's device-plugins directory,
which the kubelet empties when it starts. `write` replaces it atomically (temporary file, rename) and is
fast enough for the event loop; `sync` (fsync of the file and the directory) follows in a worker thread.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from agent.allocation import ExclusiveDevice
from agent.config import HtPolicy, PoolType
from agent.cpuset import CpuSet
from agent.idset import IdSet, shared_device_index
from agent.plan import Plan, Resource, SharedGroup
from agent.topology import CoreKey

# 2: ID sets packed as bitmaps (`_packed`); version 1 files (ranges) are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATE_FILE = "state.json"


class LedgerError(Exception):
    """The state file exists but cannot be used; the message names the file and the fault."""


def _packed(ids: IdSet) -> dict[str, Any]:
    """The millicpu indexes of `ids`, packed: the bitmap from its first set byte on, base64 of its bytes
    (little-endian). 200,000 IDs are at most 33 KB of text and take one C call whatever their pattern;
    held IDs are fragmented in the normal case (a kubelet picks shared millicpus in map order), where
    "0-4,7"-style ranges cost a Python step per run and grew the file to 0.7 MB. Indexes too high for the
    bitmap are listed."""
    bits = ids.bits
    start = ((bits & -bits).bit_length() - 1) // 8 if bits else 0
    shifted = bits >> (start * 8)
    data = shifted.to_bytes((shifted.bit_length() + 7) // 8, "little")
    beyond = sorted(i for i in map(shared_device_index, ids.other) if i is not None)
    return {"from": start * 8, "bits": base64.b64encode(data).decode("ascii"), "beyond": beyond}


def _packed_ints(values: Collection[int]) -> dict[str, Any]:
    return _packed(IdSet.from_indexes(values))


def _unpacked(value: Any) -> IdSet:
    """The IDs of a `_packed` value, or of "0-4,7" ranges (the format of version 1)."""
    if isinstance(value, str):
        return IdSet.from_indexes(_parse_ranges(value))
    bits = int.from_bytes(base64.b64decode(value["bits"], validate=True), "little") << int(value["from"])
    return IdSet(bits) | IdSet.from_indexes(int(i) for i in value["beyond"])


def _parse_ranges(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def _device(device: ExclusiveDevice) -> list[Any]:
    core = device.core
    where = [core.package, core.core_id, core.first_thread]
    return [device.cpus.format(), device.numa_node, where, device.l3]


def _resource(resource: Resource) -> dict[str, Any]:
    groups = []
    for group in resource.shared_groups:
        groups.append({"cpus": group.cpus.format(), "ids": _packed(IdSet.of(group.ids))})
    return {
        "pool": resource.pool,
        "type": str(resource.pool_type),
        "ht": str(resource.ht_policy) if resource.ht_policy is not None else None,
        "cpus": resource.cpus.format(),
        "configCpus": resource.config_cpus.format(),
        "socket": resource.socket_name,
        "configured": resource.configured,
        "exclusive": {i: _device(d) for i, d in resource.exclusive.items()},
        "sharedCount": resource.shared_count,
        "sharedRetained": _packed_ints(resource.shared_retained),
        "sharedWithheld": _packed_ints(resource.shared_withheld),
        "groups": groups,
        "unhealthy": sorted(resource.unhealthy),
        "blocked": dict(sorted(resource.blocked.items())),
    }


def dumps(plan: Plan) -> str:
    """The state file's text for `plan` (stable: equal plans give equal text)."""
    body = {
        "version": FORMAT_VERSION,
        "resourceBaseName": plan.resource_base_name,
        "resources": {name: _resource(r) for name, r in sorted(plan.resources.items())},
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"


# What a plan says about devices' health, not about what an ID means (which CPUs, exclusive or shared).
_HEALTH_KEYS = ("unhealthy", "blocked", "sharedWithheld")


def meanings(text: str) -> str:
    """The part of a state file's text that says what each device ID means: two plans with equal meanings
    differ only in which devices are listed Healthy."""
    body = json.loads(text)
    for resource in body["resources"].values():
        for key in _HEALTH_KEYS:
            resource.pop(key, None)
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def loads(text: str, source: str = STATE_FILE) -> Plan:
    """Read a state file back into the plan it was written from."""
    try:
        body = json.loads(text)
        if body.get("version") not in READABLE_VERSIONS:
            raise LedgerError(f"{source}: unsupported state format {body.get('version')!r}")
        resources: dict[str, Resource] = {}
        for name, raw in body["resources"].items():
            exclusive = {
                device_id: ExclusiveDevice(
                    device_id, CpuSet.parse(cpus), int(numa), CoreKey(*(int(x) for x in core)), l3
                )
                for device_id, (cpus, numa, core, l3) in raw["exclusive"].items()
            }
            groups = tuple(
                SharedGroup(
                    CpuSet.parse(g["cpus"]),
                    _unpacked(g["ids"]),
                )
                for g in raw["groups"]
            )
            resources[name] = Resource(
                name,
                raw["pool"],
                PoolType(raw["type"]),
                HtPolicy(raw["ht"]) if raw["ht"] is not None else None,
                CpuSet.parse(raw["cpus"]),
                exclusive=exclusive,
                shared_count=int(raw["sharedCount"]),
                shared_retained=frozenset(_unpacked(raw["sharedRetained"]).indexes()),
                shared_withheld=frozenset(_unpacked(raw["sharedWithheld"]).indexes()),
                shared_groups=groups,
                config_cpus=CpuSet.parse(raw["configCpus"]),
                socket=raw["socket"],
                configured=bool(raw["configured"]),
                shared_recent=int(raw["sharedCount"]),
                unhealthy=frozenset(str(i) for i in raw.get("unhealthy", ())),
                blocked={str(k): str(v) for k, v in raw.get("blocked", {}).items()},
            )
        return Plan(str(body["resourceBaseName"]), resources)
    except LedgerError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"{source}: unreadable state ({type(exc).__name__}: {exc})") from exc


def load(state_dir: Path) -> Plan | None:
    """The plan saved in `state_dir`, None when there is none yet."""
    path = state_dir / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: {exc}") from exc
    return loads(text, str(path))


def write(state_dir: Path, text: str) -> None:
    """Replace the state file with `text` atomically (temporary file, rename): a crash of the agent leaves
    the old file or the new one. Fast enough to run before a plan is served (tens of KB at most into the page
    cache, a rename); that the file also survives a crash of the node is `sync`'s part."""
    # Made again if it was removed while the agent runs (one mkdir call when it is there).
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{STATE_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, state_dir / STATE_FILE)


def sync(state_dir: Path) -> None:
    """Make the last `write` durable: the file's data, then the directory entry the rename changed."""
    for path, flags in ((state_dir / STATE_FILE, os.O_RDONLY), (state_dir, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


CLAIM_KEY_FILE = "claim.key"
CLAIM_KEY_BYTES = 32


def _make_claim_key(state_dir: Path, path: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{CLAIM_KEY_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, os.urandom(CLAIM_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another agent made it first: use theirs
    finally:
        tmp.unlink()


def claim_key(state_dir: Path) -> bytes:
    """The secret that signs Allocate claims (agent.claim), made once and kept 0600 in `state_dir`: the
    claims of containers created after an agent restart must still verify. Two agents racing to make it
    both end up with the one that was linked into place first."""
    path = state_dir / CLAIM_KEY_FILE
    try:
        try:
            secret = path.read_bytes()
        except FileNotFoundError:
            _make_claim_key(state_dir, path)
            secret = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"{path}: {exc.strerror or exc}") from exc
    if len(secret) != CLAIM_KEY_BYTES:
        raise LedgerError(f"{path}: {len(secret)} bytes, a claim key has {CLAIM_KEY_BYTES}; remove the file")
    if path.stat().st_mode & 0o077:
        raise LedgerError(f"{path}: readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600")
    return secret
