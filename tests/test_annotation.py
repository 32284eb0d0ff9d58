"""The pinning annotation: its schema, the errors a user sees, and the kubelet's downward API file format."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.annotation import (
    ANNOTATION_SCHEMA,
    AnnotationError,
    ContainerSpec,
    DownwardFileError,
    ProcessSpec,
    annotation_key,
    format_downward_annotations,
    parse_annotation,
    parse_downward_annotations,
)

KEY = "cpupool.io/cpus"

EXAMPLE = [
    {
        "container": "app",
        "processes": [
            {"process": "/bin/worker", "args": ["-n", "1"], "pool": "dedicated", "cpus": 2},
            {"process": "housekeeper", "pool": "shared", "cpus": 200},
        ],
    },
    {
        "container": "sidecar",
        "processes": [{"process": "/bin/proxy", "args": [], "pool": "shared", "cpus": 100}],
    },
]


def test_example_parses_into_the_model() -> None:
    annotation = parse_annotation(json.dumps(EXAMPLE), KEY)
    app = annotation.for_container("app")
    assert app == ContainerSpec(
        "app",
        (
            ProcessSpec("/bin/worker", ("-n", "1"), "dedicated", 2),
            ProcessSpec("housekeeper", (), "shared", 200),
        ),
    )
    assert annotation.for_container("sidecar") is not None
    assert annotation.for_container("other") is None


def test_key_follows_the_resource_base_name() -> None:
    assert annotation_key("example.com") == "example.com/cpus"


def _problems(value: object) -> list[str]:
    text = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(AnnotationError) as info:
        parse_annotation(text, KEY)
    assert str(info.value).startswith(f"annotation {KEY}: ")
    return info.value.problems


def _with_process(**fields: object) -> list[dict[str, object]]:
    process: dict[str, object] = {"process": "/bin/x", "pool": "p", "cpus": 1, **fields}
    return [{"container": "app", "processes": [{k: v for k, v in process.items() if v is not None}]}]


@pytest.mark.parametrize(
    ("value", "where", "says"),
    [
        ("{not json", "", "not valid JSON"),
        ({"container": "app"}, "$", "is not of type 'array'"),
        ([{"processes": []}], "$[0]", "'container' is a required property"),
        ([{"container": "app", "processes": []}], "$[0].processes", "should be non-empty"),
        ([{"container": "", "processes": [{"process": "x", "pool": "p", "cpus": 1}]}], "$[0].container", ""),
        (_with_process(cpus=0), "$[0].processes[0].cpus", "less than the minimum of 1"),
        (_with_process(cpus="2"), "$[0].processes[0].cpus", "is not of type 'integer'"),
        (_with_process(cpus=1.5), "$[0].processes[0].cpus", "is not of type 'integer'"),
        (_with_process(cpus=True), "$[0].processes[0].cpus", "is not of type 'integer'"),
        (_with_process(pool=None), "$[0].processes[0]", "'pool' is a required property"),
        (_with_process(args="-v"), "$[0].processes[0].args", "is not of type 'array'"),
        (_with_process(args=["-v", 3]), "$[0].processes[0].args[1]", "is not of type 'string'"),
        (_with_process(proces="typo"), "$[0].processes[0]", "'proces' was unexpected"),
    ],
)
def test_each_schema_fault_is_named_with_its_place(value: object, where: str, says: str) -> None:
    problems = _problems(value)
    assert any(p.startswith(where) and says in p for p in problems), problems


def test_every_fault_is_reported_at_once() -> None:
    value = [
        {"container": "a", "processes": [{"process": "x", "pool": "p", "cpus": 0}]},
        {"container": "b", "processes": [{"pool": "p", "cpus": 1}]},
    ]
    problems = _problems(value)
    assert len(problems) == 2
    assert problems[0].startswith("$[0].processes[0].cpus") and problems[1].startswith("$[1].processes[0]")


def test_a_container_listed_twice_is_refused() -> None:
    entry = {"container": "app", "processes": [{"process": "x", "pool": "p", "cpus": 1}]}
    (problem,) = _problems([entry, entry])
    assert problem == "$[1].container: container 'app' is listed twice (first at $[0])"


def test_whole_float_cpus_are_accepted_as_integers() -> None:
    annotation = parse_annotation(json.dumps(_with_process(cpus=2.0)), KEY)
    assert annotation.containers[0].processes[0].cpus == 2


# --- the downward API file ------------------------------------------------------------------------


def test_reads_the_kubelets_file_with_a_json_annotation() -> None:
    value = json.dumps(EXAMPLE)
    # What the kubelet writes: sorted keys, Go-quoted values, no newline after the last line.
    text = f'a.example/first="1"\n{KEY}={json.dumps(value)}\nkubernetes.io/config.seen="2024-01-01T00:00:00Z"'
    annotations = parse_downward_annotations(text)
    assert annotations[KEY] == value
    assert parse_annotation(annotations[KEY], KEY).for_container("app") is not None
    assert annotations["a.example/first"] == "1"


@pytest.mark.parametrize(
    ("quoted", "value"),
    [
        (r'"tab\there"', "tab\there"),
        (r'"bell\a nul\x00 del\x7f"', "bell\a nul\x00 del\x7f"),
        (r'"caf\u00e9 and café"', "café and café"),
        (r'"\U0001F600"', "\U0001f600"),
        (r'"octal \101"', "octal A"),
        (r'"bytes \xc3\xa9"', "bytes é"),
        (r'"quote \" backslash \\"', 'quote " backslash \\'),
        ('""', ""),
    ],
)
def test_go_escapes_are_undone(quoted: str, value: str) -> None:
    assert parse_downward_annotations(f"k={quoted}") == {"k": value}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("no equals sign", 'expected key="value"'),
        ("k=unquoted", "not a double-quoted string"),
        ('k="open', "not a double-quoted string"),
        ('k="a"b"', "unescaped quote"),
        (r'k="bad \q"', r"bad escape sequence \q"),
        (r'k="short \x4"', r"bad escape sequence \x"),
        (r'k="bad \xff"', "not UTF-8"),
        ('k="ends \\"', "ends inside an escape"),
    ],
)
def test_a_malformed_file_is_refused_with_the_line(text: str, says: str) -> None:
    with pytest.raises(DownwardFileError) as info:
        parse_downward_annotations(f'ok="1"\n{text}')
    assert str(info.value).startswith("line 2: ") and says in str(info.value)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}/)?[a-z0-9]{1,10}", fullmatch=True),
        st.text(st.characters(exclude_categories=("Cs",))),
        max_size=6,
    )
)
def test_any_annotations_survive_the_file_format(annotations: dict[str, str]) -> None:
    assert parse_downward_annotations(format_downward_annotations(annotations)) == annotations


# --- the checks are the schema ---------------------------------------------------------------------

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3),
    st.sampled_from([0.5, 2.0]),
    st.sampled_from(["", "x", "/bin/a"]),
)
_args = st.one_of(st.lists(st.one_of(st.text(max_size=3), st.integers(0, 1)), max_size=2), _leaf)
_process = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "process": st.one_of(st.sampled_from(["/bin/a", ""]), _leaf),
            "args": _args,
            "pool": st.one_of(st.sampled_from(["p", ""]), _leaf),
            "cpus": st.one_of(st.integers(-1, 3), _leaf),
            "extra": _leaf,
        },
    ),
    _leaf,
)
_entry = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "container": st.one_of(st.sampled_from(["app", "b", ""]), _leaf),
            "processes": st.one_of(st.lists(_process, max_size=3), _leaf),
            "proces": _leaf,
        },
    ),
    _leaf,
)


@given(st.one_of(st.lists(_entry, max_size=3), _entry))
def test_the_checks_agree_with_the_published_json_schema(value: object) -> None:
    # The starter cannot bundle jsonschema: the hand-written checks must accept and refuse exactly what
    # the schema does, at the same places.
    import jsonschema  # noqa: PLC0415 - a test dependency only

    validator = jsonschema.Draft202012Validator(ANNOTATION_SCHEMA)
    expected = sorted({_place(e.absolute_path) for e in validator.iter_errors(value)})
    try:
        parse_annotation(json.dumps(value), KEY)
        problems: list[str] = []
    except AnnotationError as exc:
        problems = [p for p in exc.problems if "is listed twice" not in p]
    assert sorted({p.split(": ", 1)[0] for p in problems}) == expected


def _place(path: object) -> str:
    text = "$"
    for part in path:  # type: ignore[attr-defined]
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text
