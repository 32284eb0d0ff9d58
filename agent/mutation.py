"""What the admission webhook does to a pod: check it against its pinning annotation, build the JSONPatch.

Pure: a pod (the JSON the API server sends) and settings in, a patch (RFC 6902) out. The patch must apply
to any valid pod, so every object or array it writes into may be missing: then the whole object is added,
never a member of something that is not there (the API server rejects such a patch and the pod with it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.annotation import AnnotationError, ContainerSpec, PodAnnotation, annotation_key, parse_annotation
from agent.config import DEFAULT_RESOURCE_BASE_NAME, HtPolicy, PoolConfig, PoolSpec, PoolType

# Where the agent's DaemonSet installs the static process-starter on every node, and where the
# container sees it (the same path, so a pod spec reads the same on the node and in the container).
STARTER_PATH = "/opt/bin/process-starter"
PODINFO_DIR = "/opt/cpupool/podinfo"
ANNOTATIONS_FILE = f"{PODINFO_DIR}/annotations"
# The one-file starter unpacks itself into TMPDIR before it runs: it needs a writable, exec-allowed
# directory even when the root filesystem is read-only.
SCRATCH_DIR = "/opt/cpupool/tmp"

VOLUME_STARTER = "cpupool-process-starter"
VOLUME_PODINFO = "cpupool-podinfo"
VOLUME_SCRATCH = "cpupool-scratch"

ENV_CONTAINER_NAME = "CONTAINER_NAME"
ENV_POOLS = "CPUPOOL_POOLS"
ENV_ANNOTATION = "CPUPOOL_ANNOTATION"
ENV_ANNOTATIONS_FILE = "CPUPOOL_ANNOTATIONS_FILE"
ENV_TMPDIR = "TMPDIR"

# Added to the pod: which containers start through the process-starter.
WRAPPED_SUFFIX = "process-starter"

# Exclusive-only containers get this on top of their CPUs, so the starter and short helpers do not
# throttle the pinned processes.
EXCLUSIVE_HEADROOM_MILLI = 100
# Under multiThreaded one device is a whole core; the webhook does not see the node, so it counts the
# two hardware threads of the usual SMT2 core.
THREADS_PER_CORE = 2

_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE](?P<exp>[+-]?[0-9]+))?$"
)
_SUFFIX = {
    None: Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


class PodRejected(Exception):
    """The pod cannot be admitted as it is; each problem says what to change."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class MutationSettings:
    resource_base_name: str = DEFAULT_RESOURCE_BASE_NAME
    # None: no pool config, so pool types (and with them the CPU sums and the CPU limit) are unknown.
    pools: Mapping[str, PoolSpec] | None = None
    # False: containers with exclusive CPUs get no CFS quota at all (their cpu limit is removed).
    exclusive_quota: bool = True

    @classmethod
    def from_config(cls, config: PoolConfig, *, exclusive_quota: bool = True) -> MutationSettings:
        return cls(config.resource_base_name, config.pools, exclusive_quota)

    @property
    def annotation(self) -> str:
        return annotation_key(self.resource_base_name)


@dataclass(frozen=True)
class Mutation:
    patch: list[dict[str, Any]]
    # Told to the user by kubectl (AdmissionResponse.warnings): things the webhook could not do.
    warnings: tuple[str, ...] = ()
    wrapped: tuple[str, ...] = field(default=())


def escape_pointer(part: str | int) -> str:
    """One reference token of a JSON pointer (RFC 6901): ``~`` and ``/`` escaped."""
    return str(part).replace("~", "~0").replace("/", "~1")


def pointer(*parts: str | int) -> str:
    return "".join("/" + escape_pointer(p) for p in parts)


def parse_quantity(value: object) -> int:
    """A whole-number Kubernetes quantity (extended resources allow no fractions). Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, str):
        match = _QUANTITY.match(value.strip())
        if match is None:
            raise ValueError(f"{value!r} is not a Kubernetes quantity")
        try:
            number = Decimal(match["num"]) * _SUFFIX[match["suffix"]]
            if match["exp"] is not None:
                number = number.scaleb(int(match["exp"]))
        except (InvalidOperation, OverflowError) as exc:
            raise ValueError(f"{value!r} is not a Kubernetes quantity") from exc
    else:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    if number != number.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PodRejected([f"{where} must be an object, got {type(value).__name__}"])
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PodRejected([f"{where} must be an array, got {type(value).__name__}"])
    return value


def _strings(value: object, where: str) -> list[str] | None:
    if value is None:
        return None
    items = _list(value, where)
    if not all(isinstance(item, str) for item in items):
        raise PodRejected([f"{where} must be an array of strings"])
    return items


@dataclass(frozen=True)
class _Container:
    index: int
    raw: Mapping[str, Any]
    name: str
    where: str
    pools: Mapping[str, int]


def _pool_requests(container: Mapping[str, Any], base: str, where: str) -> dict[str, int]:
    """Pool name -> amount this container asks for (devices, or millicpus for a shared pool)."""
    resources = _mapping(container.get("resources"), f"{where}.resources")
    amounts: dict[str, int] = {}
    problems: list[str] = []
    # Extended resources must have request == limit; a limit alone implies the request.
    for section in ("requests", "limits"):
        for name, raw in _mapping(resources.get(section), f"{where}.resources.{section}").items():
            if not name.startswith(base + "/"):
                continue
            try:
                amounts[name.removeprefix(base + "/")] = parse_quantity(raw)
            except ValueError as exc:
                problems.append(f"{where}.resources.{section}[{name}]: {exc}")
    if problems:
        raise PodRejected(problems)
    return {pool: amount for pool, amount in amounts.items() if amount > 0}


def _read_containers(pod: Mapping[str, Any], base: str) -> tuple[list[_Container], set[str]]:
    spec = _mapping(pod.get("spec"), "spec")
    containers: list[_Container] = []
    for index, raw in enumerate(_list(spec.get("containers"), "spec.containers")):
        where = f"spec.containers[{index}]"
        container = _mapping(raw, where)
        name = container.get("name")
        if not isinstance(name, str) or not name:
            raise PodRejected([f"{where}.name must be a non-empty string"])
        pools = _pool_requests(container, base, where)
        containers.append(_Container(index, container, name, f"container {name!r}", pools))
    init_names = {
        str(_mapping(c, "spec.initContainers[]").get("name"))
        for c in _list(spec.get("initContainers"), "spec.initContainers")
    }
    return containers, init_names


def _pool_cpus(spec: PoolSpec, amount: int) -> int:
    """How many CPUs `amount` devices of an exclusive pool are."""
    return amount * (THREADS_PER_CORE if spec.ht_policy is HtPolicy.MULTI else 1)


def _check_entry(
    entry: ContainerSpec, container: _Container, settings: MutationSettings, problems: list[str]
) -> None:
    base = settings.resource_base_name
    requested = container.pools
    listed = ", ".join(f"{base}/{p}" for p in sorted(requested)) or "no pool resources"
    pools = settings.pools
    exclusive_sum: dict[str, int] = {}
    shared_sum: dict[str, int] = {}
    for number, process in enumerate(entry.processes):
        what = f"{container.where}: process {number} ({process.process})"
        if pools is not None and process.pool not in pools:
            known = ", ".join(sorted(pools)) or "none"
            problems.append(f"{what}: pool {process.pool!r} is not in the pool config (pools: {known})")
            continue
        if process.pool not in requested:
            problems.append(
                f"{what} runs on pool {process.pool!r}, but the container does not request "
                f"{base}/{process.pool} (it requests: {listed})"
            )
            continue
        if pools is None:
            continue
        sums = exclusive_sum if pools[process.pool].type is PoolType.EXCLUSIVE else shared_sum
        sums[process.pool] = sums.get(process.pool, 0) + process.cpus
    if pools is None:
        return
    for pool, amount in sorted(requested.items()):
        spec = pools.get(pool)
        if spec is None:
            continue
        if spec.type is PoolType.EXCLUSIVE:
            want = _pool_cpus(spec, amount)
            got = exclusive_sum.get(pool, 0)
            if got != want:
                unit = f" ({THREADS_PER_CORE} CPUs per device under multiThreaded)" if want != amount else ""
                problems.append(
                    f"{container.where}: its processes on exclusive pool {pool!r} take {got} CPUs, but the "
                    f"container requests {amount} {base}/{pool} = {want} CPUs{unit}; the 'cpus' of those "
                    f"processes must add up to {want}"
                )
        else:
            got = shared_sum.get(pool, 0)
            if got > amount:
                problems.append(
                    f"{container.where}: its processes on shared pool {pool!r} ask for {got} millicpus, more "
                    f"than the container's request of {amount} {base}/{pool}"
                )


def _validate(
    annotation: PodAnnotation, containers: list[_Container], init_names: set[str], settings: MutationSettings
) -> None:
    by_name = {c.name: c for c in containers}
    problems: list[str] = []
    for entry in annotation.containers:
        container = by_name.get(entry.container)
        if container is None:
            if entry.container in init_names:
                problems.append(
                    f"annotation {settings.annotation}: {entry.container!r} is an init container; "
                    "only regular containers can be pinned"
                )
            else:
                names = ", ".join(repr(c.name) for c in containers) or "none"
                problems.append(
                    f"annotation {settings.annotation}: the pod has no container {entry.container!r} "
                    f"(containers: {names})"
                )
            continue
        _check_entry(entry, container, settings, problems)
    if problems:
        raise PodRejected(problems)


def cpu_limit_milli(exclusive_cpus: int, shared_milli: int, shared_pool_cpus: int) -> int:
    """The CFS quota rule of the original CPU pooler, in millicpus.

    Exclusive and shared: 1000 per exclusive CPU + 1000 per CPU of the shared pool (the shared processes
    may run on any of them). Exclusive only: 1000 per CPU + 100. Shared only: the shared millicpus.
    """
    if exclusive_cpus and shared_milli:
        return 1000 * exclusive_cpus + 1000 * shared_pool_cpus
    if exclusive_cpus:
        return 1000 * exclusive_cpus + EXCLUSIVE_HEADROOM_MILLI
    return shared_milli


@dataclass
class _Patch:
    ops: list[dict[str, Any]] = field(default_factory=list)

    def add(self, path: str, value: Any) -> None:
        # `add` on an existing member replaces it, so it serves both cases.
        self.ops.append({"op": "add", "path": path, "value": value})

    def replace(self, path: str, value: Any) -> None:
        self.ops.append({"op": "replace", "path": path, "value": value})

    def remove(self, path: str) -> None:
        self.ops.append({"op": "remove", "path": path})

    def set_member(self, parent: tuple[str | int, ...], current: object, key: str, value: Any) -> None:
        """Set parent[key]; adds the whole parent object when it is missing or null."""
        if isinstance(current, Mapping):
            self.add(pointer(*parent, key), value)
        else:
            self.add(pointer(*parent), {key: value})

    def append(self, parent: tuple[str | int, ...], current: object, items: list[Any]) -> None:
        """Append to the array at parent; adds the whole array when it is missing or null."""
        if not items:
            return
        if isinstance(current, list):
            for item in items:
                self.add(pointer(*parent, "-"), item)
        else:
            self.add(pointer(*parent), items)


def _our_volumes() -> list[dict[str, Any]]:
    return [
        {"name": VOLUME_STARTER, "hostPath": {"path": STARTER_PATH, "type": "File"}},
        {
            "name": VOLUME_PODINFO,
            "downwardAPI": {
                "items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
            },
        },
        {"name": VOLUME_SCRATCH, "emptyDir": {}},
    ]


_OUR_MOUNTS = (
    {"name": VOLUME_STARTER, "mountPath": STARTER_PATH, "readOnly": True},
    {"name": VOLUME_PODINFO, "mountPath": PODINFO_DIR, "readOnly": True},
    {"name": VOLUME_SCRATCH, "mountPath": SCRATCH_DIR},
)


def _volume_kind(volume: Mapping[str, Any]) -> set[str]:
    return set(volume) - {"name"}


def _patch_volumes(pod: Mapping[str, Any], patch: _Patch) -> None:
    spec = _mapping(pod.get("spec"), "spec")
    current = spec.get("volumes")
    existing = {
        v.get("name"): v for v in _list(current, "spec.volumes") if isinstance(v, Mapping) and "name" in v
    }
    missing: list[dict[str, Any]] = []
    for volume in _our_volumes():
        have = existing.get(volume["name"])
        if have is None:
            missing.append(volume)
        # Same name and same source type: ours from an earlier pass (the API server adds defaults).
        elif _volume_kind(have) != _volume_kind(volume):
            raise PodRejected(
                [
                    f"the pod already has a volume named {volume['name']!r} that the webhook did not add; "
                    "rename it"
                ]
            )
    patch.append(("spec", "volumes"), current, missing)


def _patch_mounts(container: _Container, patch: _Patch) -> None:
    raw = container.raw.get("volumeMounts")
    mounts = [m for m in _list(raw, f"{container.where}.volumeMounts") if isinstance(m, Mapping)]
    by_path = {m.get("mountPath"): m for m in mounts}
    missing: list[dict[str, Any]] = []
    for mount in _OUR_MOUNTS:
        have = by_path.get(mount["mountPath"])
        if have is None:
            missing.append(dict(mount))
        elif have.get("name") != mount["name"]:
            raise PodRejected(
                [
                    f"{container.where} already mounts volume {have.get('name')!r} at {mount['mountPath']}, "
                    "where the webhook mounts the process-starter's files"
                ]
            )
    patch.append(("spec", "containers", container.index, "volumeMounts"), raw, missing)


def _patch_env(container: _Container, patch: _Patch, values: list[tuple[str, str]]) -> None:
    raw = container.raw.get("env")
    env = _list(raw, f"{container.where}.env")
    # The last definition of a name wins in the kubelet, so that is the one to overwrite.
    index = {item.get("name"): i for i, item in enumerate(env) if isinstance(item, Mapping)}
    added: list[dict[str, Any]] = []
    for name, value in values:
        if name == ENV_TMPDIR and name in index:
            continue  # the container's own TMPDIR wins; it must then be writable and allow exec
        if name in index:
            patch.replace(
                pointer("spec", "containers", container.index, "env", index[name]),
                {"name": name, "value": value},
            )
        else:
            added.append({"name": name, "value": value})
    patch.append(("spec", "containers", container.index, "env"), raw, added)


def _pool_list(container: _Container, settings: MutationSettings) -> str:
    pools = settings.pools
    parts = []
    for pool in sorted(container.pools):
        if pools is not None and pool in pools:
            parts.append(f"{pool}={pools[pool].type}")
        else:
            parts.append(pool)
    return ",".join(parts)


def _patch_cpu(container: _Container, patch: _Patch, settings: MutationSettings, warnings: list[str]) -> None:
    pools = settings.pools
    if pools is None:
        return
    exclusive_cpus = 0
    shared_milli = 0
    shared_pool_cpus = 0
    for pool, amount in container.pools.items():
        spec = pools.get(pool)
        if spec is None:
            continue
        if spec.type is PoolType.EXCLUSIVE:
            exclusive_cpus += _pool_cpus(spec, amount)
        else:
            shared_milli += amount
            if spec.cpus is not None:
                shared_pool_cpus = len(spec.cpus)
            else:
                # `cpus: isolated` is only known on the node: count the CPUs the request covers.
                shared_pool_cpus = math.ceil(amount / 1000)
                warnings.append(
                    f"{container.where}: the size of shared pool {pool!r} is only known on the node; its cpu "
                    f"limit counts {shared_pool_cpus} shared CPU(s)"
                )
    if not exclusive_cpus and not shared_milli:
        return
    base = ("spec", "containers", container.index, "resources")
    resources = container.raw.get("resources")
    if not isinstance(resources, Mapping):
        resources = None
    limits = resources.get("limits") if resources is not None else None
    requests = resources.get("requests") if resources is not None else None
    limit: str | None = None
    if settings.exclusive_quota or not exclusive_cpus:
        limit = f"{cpu_limit_milli(exclusive_cpus, shared_milli, shared_pool_cpus)}m"
    if resources is None:
        value: dict[str, Any] = {"requests": {"cpu": "0"}}
        if limit is not None:
            value["limits"] = {"cpu": limit}
        patch.add(pointer(*base), value)
        return
    if limit is not None:
        patch.set_member((*base, "limits"), limits, "cpu", limit)
    elif isinstance(limits, Mapping) and "cpu" in limits:
        patch.remove(pointer(*base, "limits", "cpu"))
    # Pooled CPUs are accounted by the pool resources; a cpu request would count them twice.
    patch.set_member((*base, "requests"), requests, "cpu", "0")


def mutate_pod(pod: Mapping[str, Any], settings: MutationSettings) -> Mutation:
    """The patch for a pod, or no patch when nothing in it is pooled. Raises PodRejected."""
    base = settings.resource_base_name
    metadata = _mapping(pod.get("metadata"), "metadata")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    containers, init_names = _read_containers(pod, base)

    annotation: PodAnnotation | None = None
    text = annotations.get(settings.annotation)
    if text is not None:
        if not isinstance(text, str):
            raise PodRejected([f"annotation {settings.annotation} must be a string"])
        try:
            annotation = parse_annotation(text, settings.annotation)
        except AnnotationError as exc:
            raise PodRejected([str(exc)]) from exc
        _validate(annotation, containers, init_names, settings)

    patch = _Patch()
    warnings: list[str] = []
    wrapped: list[str] = []
    for container in containers:
        command = _strings(container.raw.get("command"), f"{container.where}.command")
        args = _strings(container.raw.get("args"), f"{container.where}.args")
        entry = annotation.for_container(container.name) if annotation is not None else None
        already = command == [STARTER_PATH]
        if entry is None and not already:
            if not container.pools:
                continue
            if not command:
                warnings.append(
                    f"{container.where} requests CPU pools but has no command, so its processes are not "
                    f"pinned: set its command, or list its processes in the {settings.annotation} annotation"
                )
                continue
        wrapped.append(container.name)
        where = ("spec", "containers", container.index)
        if not already:
            if command:
                # The starter runs its arguments when the annotation has no entry for the container.
                patch.add(pointer(*where, "args"), [*command, *(args or [])])
            patch.add(pointer(*where, "command"), [STARTER_PATH])
        _patch_mounts(container, patch)
        _patch_env(
            container,
            patch,
            [
                (ENV_CONTAINER_NAME, container.name),
                (ENV_POOLS, _pool_list(container, settings)),
                (ENV_ANNOTATION, settings.annotation),
                (ENV_ANNOTATIONS_FILE, ANNOTATIONS_FILE),
                (ENV_TMPDIR, SCRATCH_DIR),
            ],
        )
        _patch_cpu(container, patch, settings, warnings)
        unknown = sorted(p for p in container.pools if settings.pools is not None and p not in settings.pools)
        if unknown:
            warnings.append(
                f"{container.where} requests {', '.join(f'{base}/{p}' for p in unknown)}, which the pool "
                "config does not define"
            )

    if not wrapped:
        return Mutation([], tuple(warnings))
    _patch_volumes(pod, patch)
    key = f"{base}/{WRAPPED_SUFFIX}"
    value = ",".join(wrapped)
    if isinstance(pod.get("metadata"), Mapping):
        patch.set_member(("metadata", "annotations"), metadata.get("annotations"), key, value)
    else:
        patch.add(pointer("metadata"), {"annotations": {key: value}})
    return Mutation(patch.ops, tuple(warnings), tuple(wrapped))
