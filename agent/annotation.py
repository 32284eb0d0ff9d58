"""The pod annotation ``<resourceBaseName>/cpus``: which processes of which container run on which pool.

The value is JSON, the original CPU pooler's schema::

    [{"container": "app",
      "processes": [{"process": "/bin/worker", "args": ["-n", "1"], "pool": "dedicated", "cpus": 2},
                    {"process": "/bin/housekeeper", "args": [], "pool": "shared", "cpus": 200}]}]

`cpus` counts CPUs (hardware threads) for an exclusive pool and millicpus for a shared pool. This module
checks the shape only; checks against the pod live in `agent.mutation`, checks against the node in the
process-starter. It also reads the downward API file in which the kubelet writes a pod's annotations.

The process-starter parses the annotation too, and runs as PID 1 of application containers: this module
imports nothing beyond the standard library. `ANNOTATION_SCHEMA` is the published contract; the checks
below implement exactly it (with jsonschema's wording), which the tests verify against jsonschema itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from agent.starter.contract import ANNOTATION_SUFFIX, annotation_key

# Not typing.TYPE_CHECKING: importing typing would add to every start of the process-starter. Type
# checkers recognise the name; at run time the annotations are strings (postponed evaluation).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ANNOTATION_SCHEMA",
    "ANNOTATION_SUFFIX",
    "AnnotationError",
    "ContainerSpec",
    "DownwardFileError",
    "PodAnnotation",
    "ProcessSpec",
    "annotation_key",
    "format_downward_annotations",
    "parse_annotation",
    "parse_downward_annotations",
]

# additionalProperties false makes a typo such as "proces" an error instead of a silently ignored key.
ANNOTATION_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cpupool process pinning",
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["container", "processes"],
        "properties": {
            "container": {"type": "string", "minLength": 1},
            "processes": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["process", "pool", "cpus"],
                    "properties": {
                        "process": {"type": "string", "minLength": 1},
                        "args": {"type": "array", "items": {"type": "string"}},
                        "pool": {"type": "string", "minLength": 1},
                        "cpus": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
    },
}

_CONTAINER_KEYS = ("container", "processes")
_PROCESS_KEYS = ("process", "args", "pool", "cpus")


class AnnotationError(ValueError):
    """An annotation that cannot be used; every problem names where in the JSON it is."""

    def __init__(self, key: str, problems: list[str]) -> None:
        self.key = key
        self.problems = problems
        super().__init__(f"annotation {key}: " + "; ".join(problems))


class _Value:
    """Immutable value semantics for the model below, without dataclasses: the process-starter imports
    this module on every container start, and dataclasses (with inspect) would add to its start-up."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Value) and type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")


class ProcessSpec(_Value):
    __slots__ = ("args", "cpus", "pool", "process")
    _fields = ("process", "args", "pool", "cpus")

    def __init__(self, process: str, args: tuple[str, ...], pool: str, cpus: int) -> None:
        object.__setattr__(self, "process", process)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "pool", pool)
        # CPUs for an exclusive pool, millicpus for a shared one.
        object.__setattr__(self, "cpus", cpus)

    process: str
    args: tuple[str, ...]
    pool: str
    cpus: int


class ContainerSpec(_Value):
    __slots__ = ("container", "processes")
    _fields = ("container", "processes")

    def __init__(self, container: str, processes: tuple[ProcessSpec, ...]) -> None:
        object.__setattr__(self, "container", container)
        object.__setattr__(self, "processes", processes)

    container: str
    processes: tuple[ProcessSpec, ...]


class PodAnnotation(_Value):
    __slots__ = ("containers",)
    _fields = ("containers",)

    def __init__(self, containers: tuple[ContainerSpec, ...]) -> None:
        object.__setattr__(self, "containers", containers)

    containers: tuple[ContainerSpec, ...]

    def for_container(self, name: str) -> ContainerSpec | None:
        return next((c for c in self.containers if c.container == name), None)


def _where(path: tuple[str | int, ...]) -> str:
    """A JSON path such as ``$[0].processes[1].cpus`` for an error's location."""
    text = "$"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _is_integer(value: object) -> bool:
    # JSON Schema's integer: any number with a zero fractional part (2.0 counts), never a boolean.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _check_object(
    value: object, path: tuple[str | int, ...], keys: tuple[str, ...], required: tuple[str, ...]
) -> list[tuple[tuple[str | int, ...], str]]:
    if not isinstance(value, dict):
        return [(path, f"{value!r} is not of type 'object'")]
    faults: list[tuple[tuple[str | int, ...], str]] = []
    faults += [(path, f"{name!r} is a required property") for name in required if name not in value]
    extra = [name for name in value if name not in keys]
    if extra:
        listed = ", ".join(repr(name) for name in extra)
        verb = "was" if len(extra) == 1 else "were"
        faults.append((path, f"Additional properties are not allowed ({listed} {verb} unexpected)"))
    return faults


def _check_string(value: object, path: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str]]:
    if not isinstance(value, str):
        return [(path, f"{value!r} is not of type 'string'")]
    return [(path, f"{value!r} should be non-empty")] if not value else []


def _check_process(value: object, path: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str]]:
    faults = _check_object(value, path, _PROCESS_KEYS, ("process", "pool", "cpus"))
    if not isinstance(value, dict):
        return faults
    for name in ("process", "pool"):
        if name in value:
            faults += _check_string(value[name], (*path, name))
    if "args" in value:
        args = value["args"]
        if not isinstance(args, list):
            faults.append(((*path, "args"), f"{args!r} is not of type 'array'"))
        else:
            faults += [
                ((*path, "args", i), f"{arg!r} is not of type 'string'")
                for i, arg in enumerate(args)
                if not isinstance(arg, str)
            ]
    if "cpus" in value:
        cpus = value["cpus"]
        if not _is_integer(cpus):
            faults.append(((*path, "cpus"), f"{cpus!r} is not of type 'integer'"))
        elif cpus < 1:
            faults.append(((*path, "cpus"), f"{cpus!r} is less than the minimum of 1"))
    return faults


def _schema_faults(data: object) -> list[tuple[tuple[str | int, ...], str]]:
    """Every way `data` breaks ANNOTATION_SCHEMA, as (place, message)."""
    if not isinstance(data, list):
        return [((), f"{data!r} is not of type 'array'")]
    faults: list[tuple[tuple[str | int, ...], str]] = []
    for index, entry in enumerate(data):
        faults += _check_object(entry, (index,), _CONTAINER_KEYS, _CONTAINER_KEYS)
        if not isinstance(entry, dict):
            continue
        if "container" in entry:
            faults += _check_string(entry["container"], (index, "container"))
        if "processes" in entry:
            processes = entry["processes"]
            if not isinstance(processes, list):
                faults.append(((index, "processes"), f"{processes!r} is not of type 'array'"))
            elif not processes:
                faults.append(((index, "processes"), "[] should be non-empty"))
            else:
                for number, process in enumerate(processes):
                    faults += _check_process(process, (index, "processes", number))
    return faults


def parse_annotation(text: str, key: str = annotation_key("cpupool.io")) -> PodAnnotation:
    """Parse and check an annotation value. Raises AnnotationError listing every problem."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            key, [f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
        ) from exc
    faults = sorted(_schema_faults(data), key=lambda f: (list(map(str, f[0])), f[1]))
    if faults:
        raise AnnotationError(key, [f"{_where(place)}: {message}" for place, message in faults])

    containers: list[ContainerSpec] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    for index, entry in enumerate(data):
        name = entry["container"]
        if name in seen:
            problems.append(
                f"$[{index}].container: container {name!r} is listed twice (first at $[{seen[name]}])"
            )
            continue
        seen[name] = index
        processes = tuple(
            ProcessSpec(p["process"], tuple(p.get("args", ())), p["pool"], int(p["cpus"]))
            for p in entry["processes"]
        )
        containers.append(ContainerSpec(name, processes))
    if problems:
        raise AnnotationError(key, problems)
    return PodAnnotation(tuple(containers))


# --- the downward API annotations file ---------------------------------------------------------

_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34, "'": 39}


class DownwardFileError(ValueError):
    """A downward API file that is not in the kubelet's ``key="value"`` format."""


def _unquote_go(quoted: str, line_no: int) -> str:
    """Undo Go's strconv.Quote, which the kubelet applies to each annotation value."""
    if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
        raise DownwardFileError(f"line {line_no}: the value is not a double-quoted string")
    body = quoted[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            if char == '"':
                raise DownwardFileError(f"line {line_no}: unescaped quote inside the value")
            out += char.encode("utf-8")
            i += 1
            continue
        if i + 1 >= len(body):
            raise DownwardFileError(f"line {line_no}: the value ends inside an escape")
        code = body[i + 1]
        i += 2
        if code in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[code])
            continue
        width = {"x": 2, "u": 4, "U": 8}.get(code)
        try:
            if width is not None:
                digits = body[i : i + width]
                value = int(digits, 16) if len(digits) == width else -1
                i += width
                if value < 0:
                    raise ValueError(digits)
                # \x is one byte (Go strings are bytes); \u and \U are code points.
                out += bytes([value]) if code == "x" else chr(value).encode("utf-8")
            elif code in "01234567":
                digits = body[i - 1 : i + 2]
                if len(digits) != 3:
                    raise ValueError(digits)
                out.append(int(digits, 8))
                i += 2
            else:
                raise ValueError(code)
        except ValueError as exc:
            raise DownwardFileError(f"line {line_no}: bad escape sequence \\{code} in the value") from exc
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DownwardFileError(f"line {line_no}: the value is not UTF-8") from exc


def parse_downward_annotations(text: str) -> Mapping[str, str]:
    """The annotations in a downward API file: one ``key="go-quoted value"`` per line."""
    result: dict[str, str] = {}
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        if not sep or not key:
            raise DownwardFileError(f'line {line_no}: expected key="value", got {line[:80]!r}')
        result[key] = _unquote_go(quoted, line_no)
    return result


def format_downward_annotations(annotations: Mapping[str, str]) -> str:
    """The kubelet's format, for tests and tools: sorted keys, JSON-quoted values (a subset of Go's)."""
    return "\n".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(annotations.items()))
