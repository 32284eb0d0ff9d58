"""The pool config (``poolconfig.yaml``, or a directory of per-node-group files): schema, parsing, selection
by node labels, and validation against the host topology.

Parsing (`parse_config`, `read_config_dir`) needs no topology, so the webhook can use it; `select_config`
picks the file a node with given labels gets; `validate` checks a parsed config against a `Topology` and
returns the pools' CPUs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from agent.cpuset import CpuSet, CpuSetError
from agent.topology import Topology

DEFAULT_RESOURCE_BASE_NAME = "cpupool.io"
# Served when there is no config file: the kernel's isolated CPUs, as the isolcpus device plugin does.
DEFAULT_POOL_NAME = "isolcpus"
ISOLATED = "isolated"

_TOP_KEYS = frozenset({"resourceBaseName", "pools", "nodeSelector"})
# In a config directory: the fallback file, and the per-node-group files `poolconfig-<name>.yaml`.
FALLBACK_FILE = "poolconfig.yaml"
_GROUP_FILE = re.compile(r"^poolconfig-(?P<name>.+)\.yaml$")
_POOL_KEYS = frozenset({"cpus", "pooltype", "hyperThreadingPolicy"})

# Kubernetes' qualified-name rules (k8s.io/apimachinery validation): a name part of at most 63 characters,
# and a DNS-1123 subdomain prefix of at most 253.
_NAME_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class PoolType(StrEnum):
    EXCLUSIVE = "exclusive"
    SHARED = "shared"


class HtPolicy(StrEnum):
    # One device per core with only its first thread usable: the sibling stays idle.
    SINGLE = "singleThreaded"
    # One device per core that brings every hyper-thread of the core along.
    MULTI = "multiThreaded"


@dataclass(frozen=True)
class Problem:
    """One fault in a config: which pool (None for the file as a whole) and what is wrong.

    `file` names the file when the problem is reported for a whole directory of them."""

    pool: str | None
    message: str
    file: str | None = None

    def describe(self, source: str) -> str:
        source = self.file or source
        where = f"{source}: pool {self.pool!r}" if self.pool is not None else source
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config that cannot be served. Carries every problem found, each naming the file and pool."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.describe(source) for p in problems))


@dataclass(frozen=True)
class PoolSpec:
    name: str
    type: PoolType
    # The text as written, for messages and for `cpus: isolated`.
    cpus_text: str
    # None means "the kernel's isolated CPUs", resolved against the topology.
    cpus: CpuSet | None
    ht_policy: HtPolicy | None = None


@dataclass(frozen=True)
class PoolConfig:
    resource_base_name: str
    pools: Mapping[str, PoolSpec]
    # Where the config came from (a path, or a description of the default).
    source: str
    # label -> value, all of which a node must carry to get this config (per-node-group files only).
    node_selector: Mapping[str, str] | None = None

    def resource_name(self, pool: str) -> str:
        return f"{self.resource_base_name}/{pool}"


@dataclass(frozen=True)
class ValidatedConfig:
    """A config checked against a topology: every pool's CPUs are present and disjoint."""

    config: PoolConfig
    # Every pool's CPUs as configured (`isolated` resolved), offline ones included.
    cpus: Mapping[str, CpuSet]
    warnings: tuple[str, ...] = field(default=())
    # Per pool (every pool has an entry): its CPUs that are present but offline now. The topology has no
    # `Cpu` for them (no siblings, NUMA node or core); the plan must not hand them out until they are online.
    offline: Mapping[str, CpuSet] = field(default_factory=dict)


def pool_env_name(pool: str) -> str:
    """The per-pool environment variable a container receives: ``CPUPOOL_<POOL>_CPUS``."""
    return "CPUPOOL_" + re.sub(r"[^A-Z0-9]", "_", pool.upper()) + "_CPUS"


def default_config() -> PoolConfig:
    """What the agent serves with no config file: one exclusive pool of the kernel's isolated CPUs."""
    spec = PoolSpec(DEFAULT_POOL_NAME, PoolType.EXCLUSIVE, ISOLATED, None)
    source = "<no config file: isolated CPUs>"
    return PoolConfig(DEFAULT_RESOURCE_BASE_NAME, {DEFAULT_POOL_NAME: spec}, source)


def load_config_file(path: Path | str) -> PoolConfig:
    """Read and parse a config file. IO errors become a ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [Problem(None, f"cannot read the file: {exc}")]) from exc
    return parse_config(text, source)


def base_name_problems(base: str) -> list[str]:
    """Why Kubernetes would reject `base` as the domain of extended resource names (empty when valid)."""
    if not base:
        return ["resourceBaseName is empty"]
    problems: list[str] = []
    # The apiserver also checks the quota form "requests.<name>", so the prefix gets 9 characters less.
    limit = 253 - len("requests.")
    if len(base) > limit:
        problems.append(f"resourceBaseName {base!r} is longer than {limit} characters")
    if not all(_DNS_LABEL.match(label) and len(label) <= 63 for label in base.split(".")):
        problems.append(
            f"resourceBaseName {base!r} is not a DNS subdomain (lower-case letters, digits, '-' and '.')"
        )
    if base == "kubernetes.io" or base.endswith(".kubernetes.io"):
        problems.append(f"resourceBaseName {base!r} is reserved for Kubernetes' own resources")
    return problems


def pool_name_problems(pool: str) -> list[str]:
    """Why `pool` cannot be the name part of an extended resource name (empty when valid)."""
    if len(pool) > 63 or not _NAME_PART.match(pool):
        return [
            f"pool name {pool!r} is not a valid resource name part "
            "(at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        ]
    return []


def parse_config(text: str, source: str) -> PoolConfig:
    """Parse and check the schema of a config text; no topology is needed. Raises ConfigError."""
    config, problems = parse_config_partial(text, source)
    if problems or config is None:
        raise ConfigError(source, problems)
    return config


def parse_config_partial(text: str, source: str) -> tuple[PoolConfig | None, list[Problem]]:
    """Every schema problem of a config text, and the config of the pools that have none.

    The config is None only when the text is not YAML or not a mapping: nothing further can be checked.
    `check-config` goes on to check the pools that parsed, so one run reports every problem."""
    problems: list[Problem] = []
    try:
        data: Any = _load_yaml(text, problems)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        return None, [Problem(None, f"not valid YAML{where}: {reason}")]
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        message = f"expected a mapping with 'resourceBaseName' and 'pools', got {got}"
        return None, [*problems, Problem(None, message)]

    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        allowed = "allowed: nodeSelector, pools, resourceBaseName"
        problems.append(Problem(None, f"unknown key(s) {', '.join(unknown)}; {allowed}"))

    base = data.get("resourceBaseName", DEFAULT_RESOURCE_BASE_NAME)
    if not isinstance(base, str):
        problems.append(Problem(None, f"resourceBaseName must be a string, got {base!r}"))
        base = DEFAULT_RESOURCE_BASE_NAME
    problems += [Problem(None, message) for message in base_name_problems(base)]

    selector = _parse_selector(data.get("nodeSelector"), problems) if "nodeSelector" in data else None

    raw_pools = data.get("pools")
    if raw_pools is None:
        problems.append(Problem(None, "missing 'pools': a mapping of pool name to {cpus, pooltype}"))
        raw_pools = {}
    elif not isinstance(raw_pools, dict):
        problems.append(Problem(None, f"'pools' must map pool names to settings, got {raw_pools!r}"))
        raw_pools = {}

    pools: dict[str, PoolSpec] = {}
    written_as: dict[str, Any] = {}
    for raw_name, settings in raw_pools.items():
        name = str(raw_name)
        if name in written_as:
            # Two YAML keys (1 and "1") that are one pool name, hence one resource and one socket.
            problems.append(
                Problem(
                    name,
                    f"given twice, as {written_as[name]!r} and {raw_name!r}: both name the resource "
                    f"{base}/{name} and the socket cpupool-{name}.sock; keep one",
                )
            )
            continue
        written_as[name] = raw_name
        spec = _parse_pool(name, settings, problems)
        for message in pool_name_problems(name):
            problems.append(Problem(name, message))
        if spec is not None:
            pools[name] = spec

    problems += _env_name_collisions(list(written_as))
    shared = [p.name for p in pools.values() if p.type is PoolType.SHARED]
    if len(shared) > 1:
        found = f"found {len(shared)}: {', '.join(shared)}"
        problems.append(Problem(None, f"at most one shared pool is allowed, {found}"))
    return PoolConfig(base, pools, source, selector), problems


def _parse_selector(raw: Any, problems: list[Problem]) -> dict[str, str]:
    """`nodeSelector: {label: value, ...}`: every pair must be on a node for the file to apply to it.

    A faulty selector parses as empty (never matched), not as absent: the file did name one."""
    if not isinstance(raw, dict) or not raw:
        why = (
            "; an empty one would match every node, which is what poolconfig.yaml is for" if raw == {} else ""
        )
        problems.append(Problem(None, f"nodeSelector must map node labels to values, got {raw!r}{why}"))
        return {}
    selector: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            problems.append(Problem(None, f"nodeSelector: label {key!r} must be a non-empty string"))
        elif not isinstance(value, str):
            # Labels are strings. YAML reads `true`, `1.10` or `010` as other types, whose text is no longer
            # what was written: refuse rather than guess.
            problems.append(
                Problem(None, f"nodeSelector: the value of {key!r} must be a string, got {value!r}; quote it")
            )
        else:
            selector[key] = value
    return selector


def _env_name_collisions(names: list[str]) -> list[Problem]:
    """Pool names that differ only in case or in '-', '_', '.' share one container variable."""
    by_env: dict[str, list[str]] = {}
    for name in names:
        by_env.setdefault(pool_env_name(name), []).append(name)
    problems: list[Problem] = []
    for env, group in by_env.items():
        if len(group) > 1:
            listed = ", ".join(repr(name) for name in group[:-1]) + f" and {group[-1]!r}"
            problems.append(
                Problem(
                    None,
                    f"pools {listed} all give containers the environment variable {env}, "
                    "so one would hide the other's CPUs; rename all but one",
                )
            )
    return problems


_YAML_MERGE = "tag:yaml.org,2002:merge"


def _load_yaml(text: str, problems: list[Problem]) -> Any:
    """yaml.safe_load, plus a problem for each key given twice in a mapping (YAML silently keeps the last)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _duplicate_keys(node, (), set(), problems)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _duplicate_keys(node: yaml.Node, path: tuple[str, ...], seen: set[int], problems: list[Problem]) -> None:
    if id(node) in seen:
        # Aliases may repeat or even contain a node: visit each once.
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _duplicate_keys(item, path, seen, problems)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _YAML_MERGE:
            line = key_node.start_mark.line + 1
            key = (key_node.tag, key_node.value)
            if key in first_line:
                lines = f"lines {first_line[key]} and {line}"
                if path == ("pools",):
                    message = f"given twice ({lines}): YAML keeps only the last; give each pool one entry"
                    problems.append(Problem(key_node.value, message))
                else:
                    pool = path[1] if len(path) >= 2 and path[0] == "pools" else None
                    message = f"key {key_node.value!r} given twice ({lines}): YAML keeps only the last"
                    problems.append(Problem(pool, message))
            else:
                first_line[key] = line
            _duplicate_keys(value_node, (*path, key_node.value), seen, problems)
        else:
            _duplicate_keys(value_node, path, seen, problems)


def _parse_pool(name: str, settings: Any, problems: list[Problem]) -> PoolSpec | None:
    if not isinstance(settings, dict):
        problems.append(Problem(name, f"settings must be a mapping with cpus and pooltype, got {settings!r}"))
        return None
    start = len(problems)
    unknown = sorted(str(k) for k in settings if k not in _POOL_KEYS)
    if unknown:
        problems.append(
            Problem(
                name, f"unknown key(s) {', '.join(unknown)}; allowed: cpus, hyperThreadingPolicy, pooltype"
            )
        )

    raw_type = settings.get("pooltype")
    pool_type: PoolType | None = None
    if raw_type is None:
        problems.append(Problem(name, "missing 'pooltype' (exclusive or shared)"))
    else:
        try:
            pool_type = PoolType(raw_type)
        except ValueError:
            problems.append(Problem(name, f"unknown pooltype {raw_type!r}: use exclusive or shared"))

    raw_cpus = settings.get("cpus")
    cpus: CpuSet | None = None
    cpus_text = ""
    if raw_cpus is None:
        problems.append(Problem(name, 'missing \'cpus\' (a cpu list such as "2-5,8", or "isolated")'))
    elif isinstance(raw_cpus, bool) or not isinstance(raw_cpus, str | int):
        problems.append(Problem(name, f"cpus must be a cpu list string, got {raw_cpus!r}"))
    else:
        cpus_text = str(raw_cpus).strip()
        if cpus_text != ISOLATED:
            try:
                cpus = CpuSet.parse(cpus_text)
            except CpuSetError as exc:
                problems.append(Problem(name, str(exc)))
            else:
                if not cpus:
                    problems.append(Problem(name, "cpus is empty: a pool needs at least one CPU"))

    raw_ht = settings.get("hyperThreadingPolicy")
    ht: HtPolicy | None = None
    if raw_ht is not None:
        try:
            ht = HtPolicy(raw_ht)
        except ValueError:
            problems.append(
                Problem(name, f"unknown hyperThreadingPolicy {raw_ht!r}: use singleThreaded or multiThreaded")
            )
        if pool_type is PoolType.SHARED:
            problems.append(Problem(name, "hyperThreadingPolicy applies to exclusive pools only"))

    if len(problems) > start or pool_type is None:
        return None
    return PoolSpec(name, pool_type, cpus_text, cpus, ht)


def validate(config: PoolConfig, topology: Topology) -> ValidatedConfig:
    """Check a parsed config against the host: online CPUs, no overlap, whole cores for HT policies."""
    validated, problems = validate_partial(config, topology)
    if problems:
        raise ConfigError(config.source, problems)
    return validated


def validate_partial(config: PoolConfig, topology: Topology) -> tuple[ValidatedConfig, list[Problem]]:
    """Every problem of a config on this host, and the config of the pools that have none.

    `validate` refuses the config on any problem; `check-config` builds a plan from the good pools too, so
    plan-level problems (the kubelet's message limit) are reported along with the rest."""
    problems: list[Problem] = []
    warnings: list[str] = []
    resolved: dict[str, CpuSet] = {}
    offline: dict[str, CpuSet] = {}
    online = CpuSet(topology.cpus)
    # A present CPU may be offline now and online later (hotplug, a CPU taken out for a fault): the pool
    # keeps it and the plan serves it once it is online. CPUs that are not even present are typos.
    present = topology.present | online
    for spec in config.pools.values():
        if spec.cpus is None:
            # The kernel reports isolation for every possible CPU; the pool holds the present ones.
            cpus = topology.isolated & present
            if not cpus:
                problems.append(
                    Problem(
                        spec.name, "cpus: isolated, but the kernel isolates no present CPU (no isolcpus=)"
                    )
                )
                continue
        else:
            cpus = spec.cpus
            absent = cpus - present
            if absent:
                problems.append(
                    Problem(
                        spec.name,
                        f"CPUs {absent.format()} are not online, nor even present "
                        f"(present: {present.format()})",
                    )
                )
                continue
        resolved[spec.name] = cpus
        offline[spec.name] = cpus - online
        if offline[spec.name]:
            warnings.append(
                f"{config.source}: pool {spec.name!r}: CPUs {offline[spec.name].format()} are present but "
                "offline: the pool keeps them, and they cannot be used until they are online"
            )

    names = sorted(resolved)
    # Both pools of an overlap are faulty, though the problem is filed under the first.
    overlapping: set[str] = set()
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            both = resolved[first] & resolved[second]
            if both:
                problems.append(Problem(first, f"CPUs {both.format()} are also in pool {second!r}"))
                overlapping |= {first, second}

    for spec in config.pools.values():
        pool_cpus = resolved.get(spec.name)
        if pool_cpus is None or spec.type is not PoolType.EXCLUSIVE:
            continue
        cpus = pool_cpus
        if spec.ht_policy is not None:
            # sysfs describes no core for an offline CPU, and an online CPU's sibling list leaves offline
            # threads out: whole cores are checked among online CPUs, an offline CPU's core once it is back.
            if offline[spec.name]:
                warnings.append(
                    f"{config.source}: pool {spec.name!r}: offline CPUs {offline[spec.name].format()}: their "
                    f"cores cannot be checked for hyperThreadingPolicy {spec.ht_policy} until they are online"
                )
            split = CpuSet(
                cpu for cpu in cpus - offline[spec.name] if not topology.cpus[cpu].siblings.issubset(cpus)
            )
            if split:
                missing = CpuSet().union(*(topology.cpus[cpu].siblings for cpu in split)) - cpus
                one = len(split) == 1
                problems.append(
                    Problem(
                        spec.name,
                        f"hyperThreadingPolicy {spec.ht_policy} needs whole cores: "
                        f"{'CPU' if one else 'CPUs'} {split.format()} {'is' if one else 'are'} in the pool "
                        f"but {'its' if one else 'their'} sibling(s) {missing.format()} are not",
                    )
                )
        not_isolated = cpus - topology.isolated
        if not_isolated:
            warnings.append(
                f"{config.source}: pool {spec.name!r}: exclusive CPUs {not_isolated.format()} are not "
                "isolated from the kernel scheduler (isolcpus=); other tasks may run on them"
            )
    faulty = {problem.pool for problem in problems} | overlapping
    good = {name: spec for name, spec in config.pools.items() if name in resolved and name not in faulty}
    kept = replace(config, pools=good) if len(good) < len(config.pools) else config
    validated = ValidatedConfig(
        kept,
        {name: resolved[name] for name in good},
        tuple(warnings),
        offline={name: offline[name] for name in good},
    )
    return validated, problems


# --- a directory of per-node-group configs ---------------------------------------------------------------


@dataclass(frozen=True)
class ConfigDir:
    """Every config file of a directory, parsed, with every problem found in or across them.

    Keys of `configs` and `texts` are file names; `configs` holds the files that parsed (with their good
    pools), `texts` every file read. `problems` name their file."""

    source: str
    configs: Mapping[str, PoolConfig]
    texts: Mapping[str, str]
    problems: tuple[Problem, ...] = ()

    @property
    def selective(self) -> bool:
        """True when some file has a nodeSelector: only then does the choice depend on node labels."""
        return any(name != FALLBACK_FILE for name in self.texts)

    def raise_for_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.source, list(self.problems))


@dataclass(frozen=True)
class Selection:
    """The config a node gets: a file of the directory, or none (the built-in isolated-CPU pool)."""

    config: PoolConfig | None
    # The chosen file's text (None with no file): a reload compares it with what is served.
    text: str | None
    # Why this file (or none), for logs and check-config.
    reason: str

    @property
    def source(self) -> str:
        return self.config.source if self.config is not None else default_config().source


def config_file_names(directory: Path) -> list[str]:
    """The config files of a directory, sorted: poolconfig.yaml and poolconfig-<name>.yaml.

    A ConfigMap volume also holds `..data` and `..<timestamp>` entries: names starting with a dot are not
    configs."""
    names = []
    for entry in directory.iterdir():
        name = entry.name
        if name.startswith("."):
            continue
        if name == FALLBACK_FILE or _GROUP_FILE.match(name):
            names.append(name)
    return sorted(names)


def read_config_dir(directory: Path) -> ConfigDir:
    """Read and parse every config file of `directory`, and check the rules that span files.

    Raises OSError when the directory itself cannot be listed; a file that cannot be read is a problem."""
    source = str(directory)
    configs: dict[str, PoolConfig] = {}
    texts: dict[str, str] = {}
    problems: list[Problem] = []
    for name in config_file_names(directory):
        path = str(directory / name)
        try:
            text = (directory / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(None, f"cannot read the file: {exc}", path))
            continue
        texts[name] = text
        config, file_problems = parse_config_partial(text, path)
        problems += [replace(p, file=path) for p in file_problems]
        if config is None:
            continue
        if name == FALLBACK_FILE and config.node_selector is not None:
            message = (
                f"the fallback {FALLBACK_FILE} takes no nodeSelector (it serves the nodes no other file "
                "matches); move the pools to a poolconfig-<name>.yaml"
            )
            problems.append(Problem(None, message, path))
        elif name != FALLBACK_FILE and config.node_selector is None:
            message = (
                f"has no nodeSelector, so it would apply to no node; add one, or name it {FALLBACK_FILE}"
            )
            problems.append(Problem(None, message, path))
        configs[name] = config
    problems += _cross_file_problems(directory, configs)
    return ConfigDir(source, configs, texts, tuple(problems))


def _cross_file_problems(directory: Path, configs: Mapping[str, PoolConfig]) -> list[Problem]:
    """Rules between files: the webhook, which does not know the node a pod will land on, relies on them."""
    problems: list[Problem] = []
    bases = {config.resource_base_name: name for name, config in configs.items()}
    if len(bases) > 1:
        listed = ", ".join(f"{name} has {base!r}" for base, name in sorted(bases.items()))
        problems.append(
            Problem(
                None,
                f"every file must use one resourceBaseName ({listed}): the webhook matches a pod's requests "
                "by resource name before the pod has a node",
                str(directory),
            )
        )
    first: dict[str, tuple[str, PoolSpec]] = {}
    for name, config in sorted(configs.items()):
        for pool, spec in config.pools.items():
            if pool not in first:
                first[pool] = (name, spec)
                continue
            other, earlier = first[pool]
            if (earlier.type, earlier.ht_policy) != (spec.type, spec.ht_policy):
                problems.append(
                    Problem(
                        pool,
                        f"is {_kind(spec)} here but {_kind(earlier)} in {other}: a pool name keeps one "
                        "pool type (and hyperThreadingPolicy) in every file, since the webhook decides a "
                        "pod's CPU limit before the pod has a node",
                        str(directory / name),
                    )
                )
    return problems


def _kind(spec: PoolSpec) -> str:
    return f"{spec.type}" + (f" ({spec.ht_policy})" if spec.ht_policy is not None else "")


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every label of the selector is on the node with exactly that value."""
    return all(labels.get(key) == value for key, value in selector.items())


def select_config(configs: ConfigDir, labels: Mapping[str, str]) -> Selection:
    """The config a node with `labels` gets.

    The one poolconfig-<name>.yaml whose nodeSelector pairs all match; if none matches, poolconfig.yaml; if
    there is none, no config (the built-in isolated-CPU pool). Two matching files are an error naming both:
    which one was meant cannot be guessed, and taking either could hand out CPUs meant for something else."""
    matching = [
        name
        for name, config in sorted(configs.configs.items())
        # An empty selector only comes from a faulty one (reported): it matches nothing.
        if config.node_selector and selector_matches(config.node_selector, labels)
    ]
    if len(matching) > 1:
        files = " and ".join(str(Path(configs.source) / name) for name in matching)
        selectors = "; ".join(f"{name}: {_selector_text(configs.configs[name])}" for name in matching)
        raise ConfigError(
            configs.source,
            [
                Problem(
                    None,
                    f"{files} both match this node ({selectors}); exactly one file may match a node: narrow "
                    "a nodeSelector or relabel the node",
                )
            ],
        )
    if matching:
        name = matching[0]
        config = configs.configs[name]
        return Selection(config, configs.texts[name], f"its nodeSelector {_selector_text(config)} matches")
    fallback = configs.configs.get(FALLBACK_FILE)
    if fallback is not None:
        reason = "no poolconfig-<name>.yaml matches the node" if configs.selective else "the only file"
        return Selection(fallback, configs.texts[FALLBACK_FILE], f"{FALLBACK_FILE}: {reason}")
    return Selection(None, None, f"no file matches the node's labels and there is no {FALLBACK_FILE}")


def _selector_text(config: PoolConfig) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((config.node_selector or {}).items()))


def merged_pools(configs: ConfigDir) -> dict[str, PoolSpec]:
    """Every pool of every file, for the webhook, which does not know the node.

    Pool types agree across files (a checked rule). A shared pool's size may differ between node groups: the
    webhook counts the largest, so no node's containers get a CPU limit below their pool; with `isolated`
    in any file the size is only known on the node."""
    merged: dict[str, PoolSpec] = {}
    for _, config in sorted(configs.configs.items()):
        for pool, spec in config.pools.items():
            known = merged.get(pool)
            if known is None or (
                spec.type is PoolType.SHARED
                and known.cpus is not None
                and (spec.cpus is None or len(spec.cpus) > len(known.cpus))
            ):
                merged[pool] = spec
    return merged
