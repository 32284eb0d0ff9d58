"""From the environment, the pod annotation and the node to the processes to start. Pure but for reads.

Inputs (set by the webhook and the agent): ``CONTAINER_NAME``, ``CPUPOOL_POOLS`` (``pool=type,...``), the
agent's ``CPUPOOL_<POOL>_CPUS``, ``EXCLUSIVE_CPUS`` and ``SHARED_CPUS``, the pod's annotations in a downward
API file; the starter's own arguments are the container's original command. Everything is checked before
anything starts: a wrong input raises StarterError, which the starter reports and exits 2 on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from enum import StrEnum

from agent.annotation import (
    AnnotationError,
    ContainerSpec,
    DownwardFileError,
    parse_annotation,
    parse_downward_annotations,
)
from agent.cpuset import CpuSet, CpuSetError
from agent.starter.contract import (
    ANNOTATIONS_FILE,
    DEFAULT_RESOURCE_BASE_NAME,
    ENV_ANNOTATION,
    ENV_ANNOTATIONS_FILE,
    ENV_CONTAINER_NAME,
    ENV_EXCLUSIVE,
    ENV_POOLS,
    ENV_SHARED,
    annotation_key,
    pool_env_name,
)
from agent.starter.cores import Placement, read_placement, split


class StarterError(Exception):
    """An input the starter cannot work with; the message says which and why."""


class PoolKind(StrEnum):
    # The same words as the pool config's pooltype, which the webhook writes into CPUPOOL_POOLS.
    EXCLUSIVE = "exclusive"
    SHARED = "shared"


class Pool:
    __slots__ = ("cpus", "kind", "name", "source")

    def __init__(self, name: str, kind: PoolKind, cpus: CpuSet, source: str) -> None:
        self.name = name
        self.kind = kind
        self.cpus = cpus
        # Where the CPUs came from, for messages.
        self.source = source


class Launch:
    """One process to start: what, with which arguments, on which CPUs."""

    __slots__ = ("argv", "cpus", "executable", "label")

    def __init__(self, label: str, executable: str, argv: tuple[str, ...], cpus: CpuSet) -> None:
        self.label = label
        self.executable = executable
        self.argv = argv
        self.cpus = cpus

    def __repr__(self) -> str:
        return f"Launch({self.label!r}, {self.executable!r}, {self.argv!r}, {self.cpus!r})"


def _cpu_list(env: Mapping[str, str], name: str) -> CpuSet | None:
    text = env.get(name)
    if text is None:
        return None
    try:
        return CpuSet.parse(text)
    except CpuSetError as exc:
        raise StarterError(f"{name}: {exc}") from exc


def _declared_pools(env: Mapping[str, str], entry: ContainerSpec | None) -> dict[str, PoolKind | None]:
    """Pool name -> kind (None: infer) from CPUPOOL_POOLS, or from the annotation entry without it."""
    text = env.get(ENV_POOLS)
    if text is None:
        return {p.pool: None for p in entry.processes} if entry is not None else {}
    pools: dict[str, PoolKind | None] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, kind = item.partition("=")
        if not name:
            raise StarterError(f"{ENV_POOLS}={text!r}: empty pool name")
        try:
            pools[name] = PoolKind(kind) if sep else None
        except ValueError as exc:
            raise StarterError(f"{ENV_POOLS}={text!r}: pool {name!r} has unknown type {kind!r}") from exc
    return pools


def read_pools(env: Mapping[str, str], entry: ContainerSpec | None) -> dict[str, Pool]:
    """The container's pools and their CPUs, from the variables the agent's Allocate sets."""
    declared = _declared_pools(env, entry)
    shared = _cpu_list(env, ENV_SHARED)
    exclusive = _cpu_list(env, ENV_EXCLUSIVE)
    found: dict[str, tuple[CpuSet | None, PoolKind]] = {}
    for name, declared_kind in declared.items():
        cpus = _cpu_list(env, pool_env_name(name))
        kind = declared_kind
        if kind is None:
            # Only the shared pool's Allocate sets SHARED_CPUS, and there is one shared pool at most.
            kind = PoolKind.SHARED if cpus is not None and cpus == shared else PoolKind.EXCLUSIVE
        found[name] = (cpus, kind)
    # EXCLUSIVE_CPUS is whatever the last exclusive Allocate set: it speaks for one exclusive pool only.
    only_exclusive = sum(1 for _, kind in found.values() if kind is PoolKind.EXCLUSIVE) == 1
    pools: dict[str, Pool] = {}
    for name, (pool_cpus, kind) in found.items():
        var = pool_env_name(name)
        cpus, source = pool_cpus, var
        if cpus is None:
            # An older agent or a hand-made environment: the generic variables, when unambiguous.
            if kind is PoolKind.SHARED and shared is not None:
                cpus, source = shared, ENV_SHARED
            elif kind is PoolKind.EXCLUSIVE and exclusive is not None and only_exclusive:
                cpus, source = exclusive, ENV_EXCLUSIVE
            else:
                raise StarterError(
                    f"the container has pool {name!r} but {var} is not set (the cpupool agent sets it "
                    "when it allocates the pool: does the container request the pool's resource?)"
                )
        if not cpus:
            raise StarterError(f"{source} is empty: pool {name!r} gave the container no CPUs")
        pools[name] = Pool(name, kind, cpus, source)
    return pools


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _resolve(program: str, env: Mapping[str, str], what: str) -> str:
    if "/" in program:
        if _executable(program):
            return program
        raise StarterError(f"{what}: {program} is not an executable file")
    # PATH lookup as execvp does it (shutil.which would cost the starter's start-up its imports).
    search = env.get("PATH", os.defpath)
    for directory in search.split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if _executable(candidate):
            return candidate
    raise StarterError(f"{what}: {program!r} is not found in PATH={search}")


def read_annotation_text(env: Mapping[str, str]) -> str | None:
    """The pinning annotation's value from the downward API file, None when the pod has none."""
    explicit = env.get(ENV_ANNOTATIONS_FILE)
    path = explicit or ANNOTATIONS_FILE
    if explicit is None and not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise StarterError(f"cannot read the pod annotations file {path}: {exc}") from exc
    try:
        annotations = parse_downward_annotations(text)
    except DownwardFileError as exc:
        raise StarterError(f"{path}: {exc}") from exc
    return annotations.get(env.get(ENV_ANNOTATION) or annotation_key(DEFAULT_RESOURCE_BASE_NAME))


def _shape(pool: Pool, placement: Placement) -> str:
    """How the pool's CPUs look on this node, for messages: '4 CPUs (2-3,18-19): 2 cores of 2 threads'."""
    cores = {placement.core_of.get(cpu, cpu) for cpu in pool.cpus}
    threads = sorted(placement.threads_per_core(pool.cpus))
    per_core = "/".join(str(t) for t in threads) or "1"
    return (
        f"{len(pool.cpus)} CPUs ({pool.cpus.format()}): {len(cores)} cores of {per_core} threads on this node"
    )


def _split_exclusive(pool: Pool, wants: list[tuple[str, int]], placement: Placement) -> dict[str, CpuSet]:
    total = sum(want for _, want in wants)
    if total != len(pool.cpus):
        # The webhook cannot know the node: under multiThreaded a device is a whole core, whose thread
        # count only the node tells. The counts must use every CPU the container holds, no more, no less.
        raise StarterError(
            f"the processes on exclusive pool {pool.name!r} take {total} CPUs, but {pool.source} gives the "
            f"container {_shape(pool, placement)}; their 'cpus' must add up to {len(pool.cpus)}"
        )
    shares = split(pool.cpus, [want for _, want in wants], placement)
    return {label: share for (label, _), share in zip(wants, shares, strict=True)}


def plan_launches(
    env: Mapping[str, str],
    command: Sequence[str],
    annotation_text: str | None,
    allowed: CpuSet,
    sys_root: str | os.PathLike[str] = "/",
    warnings: list[str] | None = None,
) -> list[Launch]:
    """What to start, in order. Raises StarterError for any input it cannot use.

    Odd topology files are not errors: what was assumed instead is appended to `warnings`.
    """
    key = env.get(ENV_ANNOTATION) or annotation_key(DEFAULT_RESOURCE_BASE_NAME)
    entry: ContainerSpec | None = None
    if annotation_text is not None:
        try:
            annotation = parse_annotation(annotation_text, key)
        except AnnotationError as exc:
            raise StarterError(str(exc)) from exc
        container = env.get(ENV_CONTAINER_NAME)
        if not container:
            raise StarterError(f"{ENV_CONTAINER_NAME} is not set: cannot find this container in {key}")
        entry = annotation.for_container(container)
    pools = read_pools(env, entry)

    launches: list[Launch] = []
    if entry is not None:
        # Only exclusive pools are split; a shared pool's processes all get the whole pool.
        exclusive = [p.cpus for p in pools.values() if p.kind is PoolKind.EXCLUSIVE]
        placement = read_placement(sys_root, CpuSet().union(*exclusive))
        if warnings is not None:
            warnings.extend(placement.warnings)
        labels: list[tuple[str, str, str, tuple[str, ...]]] = []
        wants: dict[str, list[tuple[str, int]]] = {}
        for number, process in enumerate(entry.processes):
            label = f"process {number} ({process.process}) on pool {process.pool!r}"
            pool = pools.get(process.pool)
            if pool is None:
                known = ", ".join(sorted(pools)) or "none"
                raise StarterError(f"{label}: the container has no such pool ({ENV_POOLS}: {known})")
            if pool.kind is PoolKind.EXCLUSIVE:
                wants.setdefault(pool.name, []).append((label, process.cpus))
            labels.append((label, pool.name, process.process, (process.process, *process.args)))
        shares: dict[str, CpuSet] = {}
        for name, pool_wants in wants.items():
            shares.update(_split_exclusive(pools[name], pool_wants, placement))
        for label, pool_name, program, argv in labels:
            # A shared pool's processes all run on the whole shared pool.
            cpus = shares.get(label, pools[pool_name].cpus)
            launches.append(Launch(label, _resolve(program, env, label), argv, cpus))
    else:
        if not command:
            if annotation_text is None:
                where = f"the pod has no {key} annotation"
            else:
                where = f"{key} has no entry for container {env.get(ENV_CONTAINER_NAME)!r}"
            raise StarterError(f"nothing to start: {where} and no command was given as arguments")
        cpus = CpuSet().union(*(pool.cpus for pool in pools.values()))
        if not cpus:
            raise StarterError(
                f"no pooled CPUs to run {command[0]!r} on: {ENV_POOLS} lists no pool with CPUs "
                f"(set by the webhook; the agent sets {pool_env_name('<pool>')})"
            )
        label = f"command {command[0]}"
        launches.append(Launch(label, _resolve(command[0], env, label), tuple(command), cpus))

    for launch in launches:
        outside = launch.cpus - allowed
        if outside:
            # The agent only ever hands out CPUs of the container's cpuset; CPUs outside it come from a
            # variable set by hand (a forged claim) or a cpuset that does not follow the pools.
            raise StarterError(
                f"{launch.label}: CPUs {outside.format()} are not available to this container (its CPUs: "
                f"{allowed.format()}); the pool variables name CPUs outside the container's cpuset"
            )
    return launches
