"""What the admission webhook does to a pod: check it against its pinning annotation, build the JSONPatch.

Pure: a pod (the JSON the API server sends) and settings in, a patch (RFC 6902) out. The patch must apply
to any valid pod, so every object or array it writes into may be missing: then the whole object is added,
never a member of something that is not there (the API server rejects such a patch and the pod with it).

The webhook cannot see the node (the pod is not scheduled yet). It checks what holds on every node and
leaves what depends on the node's shape (threads per core, which CPUs make a core) to the process-starter,
which reads the node's topology when the container starts.

Regular containers, init containers and native sidecars (init containers with restartPolicy Always) are
treated alike. Ephemeral containers cannot request resources, so they are never wrapped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.annotation import AnnotationError, ContainerSpec, PodAnnotation, annotation_key, parse_annotation
from agent.claim import KEY_PREFIX as CLAIM_KEY_PREFIX
from agent.config import DEFAULT_RESOURCE_BASE_NAME, HtPolicy, PoolConfig, PoolSpec, PoolType
from agent.starter.contract import (
    ANNOTATIONS_FILE,
    ENV_ANNOTATION,
    ENV_ANNOTATIONS_FILE,
    ENV_CONTAINER_NAME,
    ENV_POOLS,
    PODINFO_DIR,
    STARTER_DIR,
    STARTER_PATH,
    is_reserved_env,
)

__all__ = [
    "ANNOTATIONS_FILE",
    "MAX_THREADS_PER_CORE",
    "PODINFO_DIR",
    "STARTER_DIR",
    "STARTER_PATH",
    "Mutation",
    "MutationSettings",
    "PodRejected",
    "cpu_limit_milli",
    "escape_pointer",
    "mutate_pod",
    "parse_quantity",
    "pointer",
]

# Where the one-file starter of earlier versions was installed: pods it wrapped are left alone.
LEGACY_STARTER_PATH = "/opt/bin/process-starter"

VOLUME_STARTER = "cpupool-process-starter"
VOLUME_PODINFO = "cpupool-podinfo"

# Added to the pod: which containers start through the process-starter.
WRAPPED_SUFFIX = "process-starter"

# Exclusive-only containers get this on top of their CPUs, so the starter and short helpers do not
# throttle the pinned processes.
EXCLUSIVE_HEADROOM_MILLI = 100
# Under multiThreaded one device is a whole core, whose thread count only the node knows: 1 with SMT
# off, 2 on most x86, 4 or 8 on POWER. The webhook accepts any of them; the starter checks the node's.
MAX_THREADS_PER_CORE = 8

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
    # "containers" or "initContainers": where the container sits in the pod spec.
    section: str
    index: int
    raw: Mapping[str, Any]
    name: str
    where: str
    pools: Mapping[str, int]

    @property
    def path(self) -> tuple[str | int, ...]:
        return ("spec", self.section, self.index)


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


def _kind(section: str, container: Mapping[str, Any]) -> str:
    if section == "containers":
        return "container"
    # A native sidecar: started before the containers and kept running beside them.
    return "sidecar container" if container.get("restartPolicy") == "Always" else "init container"


def _read_containers(pod: Mapping[str, Any], base: str) -> tuple[list[_Container], set[str]]:
    """The containers that may be wrapped (init containers first, in start order), and ephemeral names."""
    spec = _mapping(pod.get("spec"), "spec")
    containers: list[_Container] = []
    for section in ("initContainers", "containers"):
        for index, raw in enumerate(_list(spec.get(section), f"spec.{section}")):
            where = f"spec.{section}[{index}]"
            container = _mapping(raw, where)
            name = container.get("name")
            if not isinstance(name, str) or not name:
                raise PodRejected([f"{where}.name must be a non-empty string"])
            pools = _pool_requests(container, base, where)
            label = f"{_kind(section, container)} {name!r}"
            containers.append(_Container(section, index, container, name, label, pools))
    ephemeral = {
        str(_mapping(c, "spec.ephemeralContainers[]").get("name"))
        for c in _list(spec.get("ephemeralContainers"), "spec.ephemeralContainers")
    }
    return containers, ephemeral


def _reserved_env_problems(pod: Mapping[str, Any]) -> list[str]:
    """Containers that set a variable only the agent may set: a forged claim on CPUs they were not given."""
    spec = _mapping(pod.get("spec"), "spec")
    problems: list[str] = []
    for section in ("initContainers", "containers", "ephemeralContainers"):
        for index, raw in enumerate(_list(spec.get(section), f"spec.{section}")):
            container = _mapping(raw, f"spec.{section}[{index}]")
            env = _list(container.get("env"), f"spec.{section}[{index}].env")
            names = sorted(
                {
                    name
                    for name in (e.get("name") for e in env if isinstance(e, Mapping))
                    if isinstance(name, str) and is_reserved_env(name)
                }
            )
            if names:
                kind = (
                    "ephemeral container" if section == "ephemeralContainers" else _kind(section, container)
                )
                problems.append(
                    f"{kind} {container.get('name')!r} sets {', '.join(names)}: only the cpupool agent sets "
                    "these, to tell a container the pool CPUs the kubelet gave it; remove them from env"
                )
    return problems


def _claim_annotation_problems(annotations: Mapping[str, Any], base: str) -> list[str]:
    """Pod annotations named like an Allocate claim. CRI-O copies a pod's annotations into each of its
    containers', where the NRI plugin reads claims: a forged one fails its signature anyway, but no pod
    has a reason to carry one."""
    prefix = f"{base}/{CLAIM_KEY_PREFIX}"
    names = sorted(k for k in annotations if isinstance(k, str) and k.startswith(prefix))
    if not names:
        return []
    return [
        f"annotation {', '.join(names)}: only the kubelet sets {base}/{CLAIM_KEY_PREFIX}* annotations, on "
        "containers, from the cpupool agent's Allocate answers; remove it from the pod"
    ]


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
            got = exclusive_sum.get(pool, 0)
            if spec.ht_policy is HtPolicy.MULTI:
                # Whole cores: the right sum is `amount` times the node's threads per core, which only
                # the node knows. Any whole number of threads per core passes here; the starter checks.
                threads, rest = divmod(got, amount)
                if rest or not 1 <= threads <= MAX_THREADS_PER_CORE:
                    problems.append(
                        f"{container.where}: its processes on exclusive pool {pool!r} take {got} CPUs, "
                        f"but the container requests {amount} {base}/{pool}, {amount} whole cores "
                        f"(multiThreaded): the 'cpus' of those processes must add up to {amount} times the "
                        f"node's threads per core ({amount} with SMT off, {2 * amount} with 2 threads per "
                        f"core, {4 * amount} with 4)"
                    )
            elif got != amount:
                problems.append(
                    f"{container.where}: its processes on exclusive pool {pool!r} take {got} CPUs, but the "
                    f"container requests {amount} {base}/{pool} = {amount} CPUs; the 'cpus' of those "
                    f"processes must add up to {amount}"
                )
        else:
            got = shared_sum.get(pool, 0)
            if got > amount:
                problems.append(
                    f"{container.where}: its processes on shared pool {pool!r} ask for {got} millicpus, more "
                    f"than the container's request of {amount} {base}/{pool}"
                )


def _validate(
    annotation: PodAnnotation,
    containers: list[_Container],
    ephemeral: set[str],
    settings: MutationSettings,
    problems: list[str],
) -> None:
    by_name = {c.name: c for c in containers}
    for entry in annotation.containers:
        container = by_name.get(entry.container)
        if container is None:
            if entry.container in ephemeral:
                problems.append(
                    f"annotation {settings.annotation}: {entry.container!r} is an ephemeral container; they "
                    "cannot request pool resources, so they cannot be pinned"
                )
            else:
                names = ", ".join(repr(c.name) for c in containers) or "none"
                problems.append(
                    f"annotation {settings.annotation}: the pod has no container {entry.container!r} "
                    f"(containers: {names})"
                )
            continue
        _check_entry(entry, container, settings, problems)


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
        # The starter bundle, laid out once per node by the agent's DaemonSet: nothing is unpacked at start.
        {"name": VOLUME_STARTER, "hostPath": {"path": STARTER_DIR, "type": "Directory"}},
        {
            "name": VOLUME_PODINFO,
            "downwardAPI": {
                "items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
            },
        },
    ]


_OUR_MOUNTS = (
    {"name": VOLUME_STARTER, "mountPath": STARTER_DIR, "readOnly": True},
    {"name": VOLUME_PODINFO, "mountPath": PODINFO_DIR, "readOnly": True},
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
    patch.append((*container.path, "volumeMounts"), raw, missing)


def _patch_env(container: _Container, patch: _Patch, values: list[tuple[str, str]]) -> None:
    raw = container.raw.get("env")
    env = _list(raw, f"{container.where}.env")
    # The last definition of a name wins in the kubelet, so that is the one to overwrite.
    index = {item.get("name"): i for i, item in enumerate(env) if isinstance(item, Mapping)}
    added: list[dict[str, Any]] = []
    for name, value in values:
        if name in index:
            patch.replace(pointer(*container.path, "env", index[name]), {"name": name, "value": value})
        else:
            added.append({"name": name, "value": value})
    patch.append((*container.path, "env"), raw, added)


def _pool_list(container: _Container, settings: MutationSettings) -> str:
    pools = settings.pools
    parts = []
    for pool in sorted(container.pools):
        if pools is not None and pool in pools:
            parts.append(f"{pool}={pools[pool].type}")
        else:
            parts.append(pool)
    return ",".join(parts)


@dataclass(frozen=True)
class CpuShare:
    """What a container holds, as far as the webhook can tell without the node."""

    # CPUs of exclusive pools; for multiThreaded pools without an annotation entry, one per core (a floor).
    exclusive_cpus: int = 0
    shared_milli: int = 0
    shared_pool_cpus: int = 0
    # multiThreaded pools whose CPU count only the node knows (no annotation entry to count them).
    unknown: tuple[str, ...] = ()

    def request_milli(self) -> int:
        return 1000 * self.exclusive_cpus + self.shared_milli


def _cpu_share(
    container: _Container, entry: ContainerSpec | None, settings: MutationSettings, warnings: list[str]
) -> CpuShare:
    pools = settings.pools
    if pools is None:
        return CpuShare()
    exclusive = shared_milli = shared_pool_cpus = 0
    unknown: list[str] = []
    for pool, amount in sorted(container.pools.items()):
        spec = pools.get(pool)
        if spec is None:
            continue
        if spec.type is PoolType.EXCLUSIVE:
            if spec.ht_policy is HtPolicy.MULTI:
                counted = sum(p.cpus for p in entry.processes if p.pool == pool) if entry is not None else 0
                if counted:
                    # The annotation's count, which the starter holds to the node's CPUs.
                    exclusive += counted
                else:
                    exclusive += amount
                    unknown.append(pool)
            else:
                exclusive += amount
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
    return CpuShare(exclusive, shared_milli, shared_pool_cpus, tuple(unknown))


def _patch_cpu(
    container: _Container,
    entry: ContainerSpec | None,
    patch: _Patch,
    settings: MutationSettings,
    warnings: list[str],
) -> None:
    share = _cpu_share(container, entry, settings, warnings)
    if not share.exclusive_cpus and not share.shared_milli:
        return
    limit_milli: int | None = None
    if share.unknown:
        warnings.append(
            f"{container.where}: the CPUs of multiThreaded pool(s) {', '.join(share.unknown)} depend on the "
            "node's threads per core, so the webhook sets no cpu limit (no CFS quota); list the container's "
            f"processes in the {settings.annotation} annotation to have it counted"
        )
    elif settings.exclusive_quota or not share.exclusive_cpus:
        limit_milli = cpu_limit_milli(share.exclusive_cpus, share.shared_milli, share.shared_pool_cpus)
    # The request gives the pinned processes the CFS weight of what they hold (a request of 0 would give
    # them the lowest weight on CPUs they share). It stays below the limit: a container whose request
    # equals its limit can make the pod Guaranteed, and the kubelet's static CPU manager would then pin a
    # whole-CPU request to CPUs of its own choosing, outside the pool.
    request_milli = share.request_milli()
    if limit_milli is not None and request_milli >= limit_milli:
        request_milli = limit_milli - 1
    request = f"{request_milli}m"
    base = (*container.path, "resources")
    resources = container.raw.get("resources")
    if not isinstance(resources, Mapping):
        resources = None
    limits = resources.get("limits") if resources is not None else None
    requests = resources.get("requests") if resources is not None else None
    limit = f"{limit_milli}m" if limit_milli is not None else None
    if resources is None:
        value: dict[str, Any] = {"requests": {"cpu": request}}
        if limit is not None:
            value["limits"] = {"cpu": limit}
        patch.add(pointer(*base), value)
        return
    if limit is not None:
        patch.set_member((*base, "limits"), limits, "cpu", limit)
    elif isinstance(limits, Mapping) and "cpu" in limits:
        patch.remove(pointer(*base, "limits", "cpu"))
    patch.set_member((*base, "requests"), requests, "cpu", request)


def mutate_pod(pod: Mapping[str, Any], settings: MutationSettings) -> Mutation:
    """The patch for a pod, or no patch when nothing in it is pooled. Raises PodRejected."""
    base = settings.resource_base_name
    metadata = _mapping(pod.get("metadata"), "metadata")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    containers, ephemeral = _read_containers(pod, base)

    problems = _reserved_env_problems(pod) + _claim_annotation_problems(annotations, base)
    annotation: PodAnnotation | None = None
    text = annotations.get(settings.annotation)
    if text is not None:
        if not isinstance(text, str):
            raise PodRejected([*problems, f"annotation {settings.annotation} must be a string"])
        try:
            annotation = parse_annotation(text, settings.annotation)
        except AnnotationError as exc:
            raise PodRejected([*problems, str(exc)]) from exc
        _validate(annotation, containers, ephemeral, settings, problems)
    if problems:
        raise PodRejected(problems)

    patch = _Patch()
    warnings: list[str] = []
    wrapped: list[str] = []
    for container in containers:
        command = _strings(container.raw.get("command"), f"{container.where}.command")
        args = _strings(container.raw.get("args"), f"{container.where}.args")
        entry = annotation.for_container(container.name) if annotation is not None else None
        if command == [LEGACY_STARTER_PATH]:
            # Wrapped by an earlier version, whose one-file starter stays on the nodes: left as it is.
            continue
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
        if not already:
            if command:
                # The starter runs its arguments when the annotation has no entry for the container.
                patch.add(pointer(*container.path, "args"), [*command, *(args or [])])
            patch.add(pointer(*container.path, "command"), [STARTER_PATH])
        _patch_mounts(container, patch)
        _patch_env(
            container,
            patch,
            [
                (ENV_CONTAINER_NAME, container.name),
                (ENV_POOLS, _pool_list(container, settings)),
                (ENV_ANNOTATION, settings.annotation),
                (ENV_ANNOTATIONS_FILE, ANNOTATIONS_FILE),
            ],
        )
        _patch_cpu(container, entry, patch, settings, warnings)
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
