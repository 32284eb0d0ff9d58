"""Per-node-group pool configs: a directory of poolconfig-<name>.yaml files with a nodeSelector each, and
poolconfig.yaml as the fallback. Which file a node gets, what is refused, and `check-config DIR`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cli import _label_source, build_parser, main
from agent.config import ConfigError, PoolType, merged_pools, read_config_dir, select_config
from agent.nodelabels import NodeLabelsError, NodeLabelWatch, StaticLabels, parse_node_labels
from agent.supervisor import AgentSettings, Supervisor
from tests.harness import FIXTURES

DUAL32 = str(FIXTURES / "dual32")

BIG = """\
nodeSelector: {node-group: big}
pools:
  dedicated: {cpus: "2-7", pooltype: exclusive}
  shared: {cpus: "8-11", pooltype: shared}
"""
EDGE = """\
nodeSelector: {node-group: edge, zone: a}
pools:
  dedicated: {cpus: "2-3", pooltype: exclusive}
  shared: {cpus: "4-5", pooltype: shared}
"""
FALLBACK = """\
pools:
  dedicated: {cpus: "2", pooltype: exclusive}
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def chosen_file(directory: Path, labels: dict[str, str]) -> str | None:
    configs = read_config_dir(directory)
    configs.raise_for_problems()
    selection = select_config(configs, labels)
    return Path(selection.source).name if selection.config is not None else None


# --- which file a node gets


def test_a_node_gets_the_file_whose_selector_pairs_all_match(tmp_path: Path) -> None:
    write(tmp_path, {"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE, "poolconfig.yaml": FALLBACK})
    assert chosen_file(tmp_path, {"node-group": "big", "kubernetes.io/os": "linux"}) == "poolconfig-big.yaml"
    assert chosen_file(tmp_path, {"node-group": "edge", "zone": "a"}) == "poolconfig-edge.yaml"


def test_one_matching_pair_out_of_two_is_not_a_match(tmp_path: Path) -> None:
    # The original pooler took a file when ANY one pair matched; here every pair must.
    write(tmp_path, {"poolconfig-edge.yaml": EDGE, "poolconfig.yaml": FALLBACK})
    assert chosen_file(tmp_path, {"node-group": "edge", "zone": "b"}) == "poolconfig.yaml"
    assert chosen_file(tmp_path, {"node-group": "edge"}) == "poolconfig.yaml"


def test_no_match_and_no_fallback_means_the_built_in_isolated_pool(tmp_path: Path) -> None:
    write(tmp_path, {"poolconfig-big.yaml": BIG})
    configs = read_config_dir(tmp_path)
    selection = select_config(configs, {"node-group": "small"})
    assert selection.config is None and selection.text is None
    assert "no file matches" in selection.reason


def test_two_matching_files_are_an_error_naming_both(tmp_path: Path) -> None:
    other = BIG.replace("{node-group: big}", "{zone: a}")
    write(
        tmp_path, {"poolconfig-big.yaml": BIG, "poolconfig-zone-a.yaml": other, "poolconfig.yaml": FALLBACK}
    )
    configs = read_config_dir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        select_config(configs, {"node-group": "big", "zone": "a"})
    message = str(caught.value)
    assert "poolconfig-big.yaml" in message and "poolconfig-zone-a.yaml" in message
    # A node with only one of the two labels is fine.
    assert chosen_file(tmp_path, {"node-group": "big"}) == "poolconfig-big.yaml"


def test_a_label_value_must_match_exactly(tmp_path: Path) -> None:
    write(tmp_path, {"poolconfig-big.yaml": BIG})
    assert chosen_file(tmp_path, {"node-group": "Big"}) is None
    assert chosen_file(tmp_path, {"node-group": "big "}) is None


def test_files_other_than_poolconfig_yamls_are_ignored(tmp_path: Path) -> None:
    # A ConfigMap volume holds ..data and ..<timestamp> entries; an editor may leave backups.
    write(tmp_path, {"poolconfig.yaml": FALLBACK, "poolconfig-big.yaml~": "not: [yaml", "README": "x"})
    (tmp_path / "..data").mkdir()
    configs = read_config_dir(tmp_path)
    assert sorted(configs.texts) == ["poolconfig.yaml"] and not configs.problems


# --- what is refused


def problems_of(directory: Path) -> list[str]:
    configs = read_config_dir(directory)
    return [p.describe(configs.source) for p in configs.problems]


def test_a_pool_keeps_one_type_across_files(tmp_path: Path) -> None:
    shared_here = EDGE.replace(
        'dedicated: {cpus: "2-3", pooltype: exclusive}', 'dedicated: {cpus: "2-3", pooltype: shared}'
    )
    shared_here = shared_here.replace('  shared: {cpus: "4-5", pooltype: shared}\n', "")
    write(tmp_path, {"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": shared_here})
    (line,) = problems_of(tmp_path)
    assert "poolconfig-edge.yaml: pool 'dedicated'" in line
    assert "shared here but exclusive in poolconfig-big.yaml" in line


def test_a_pool_keeps_one_hyperthreading_policy_across_files(tmp_path: Path) -> None:
    multi = BIG.replace("pooltype: exclusive}", "pooltype: exclusive, hyperThreadingPolicy: multiThreaded}")
    write(tmp_path, {"poolconfig-big.yaml": multi, "poolconfig.yaml": FALLBACK})
    (line,) = problems_of(tmp_path)
    assert "pool 'dedicated'" in line and "multiThreaded" in line


def test_every_file_uses_one_resource_base_name(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"poolconfig-big.yaml": "resourceBaseName: example.com\n" + BIG, "poolconfig.yaml": FALLBACK},
    )
    (line,) = problems_of(tmp_path)
    assert "one resourceBaseName" in line and "'example.com'" in line and "'cpupool.io'" in line


def test_a_group_file_needs_a_selector_and_the_fallback_takes_none(tmp_path: Path) -> None:
    write(tmp_path, {"poolconfig-big.yaml": FALLBACK, "poolconfig.yaml": BIG})
    lines = problems_of(tmp_path)
    assert len(lines) == 2
    assert any("poolconfig-big.yaml: has no nodeSelector" in line for line in lines)
    assert any(
        "poolconfig.yaml: the fallback poolconfig.yaml takes no nodeSelector" in line for line in lines
    )


@pytest.mark.parametrize(
    ("selector", "fault"),
    [
        ("{}", "an empty one would match every node"),
        ("[a, b]", "must map node labels to values"),
        ("{fast: true}", "the value of 'fast' must be a string"),
        ("{version: 1.10}", "the value of 'version' must be a string"),
    ],
)
def test_a_faulty_selector_is_refused_and_matches_nothing(tmp_path: Path, selector: str, fault: str) -> None:
    write(tmp_path, {"poolconfig-x.yaml": f"nodeSelector: {selector}\n" + FALLBACK})
    configs = read_config_dir(tmp_path)
    (line,) = [p.describe(configs.source) for p in configs.problems]
    assert line.startswith(str(tmp_path / "poolconfig-x.yaml")) and fault in line
    assert select_config(configs, {"fast": "true", "version": "1.10"}).config is None


def test_each_problem_names_its_file(tmp_path: Path) -> None:
    write(
        tmp_path, {"poolconfig-big.yaml": BIG.replace("exclusive", "exclusiv"), "poolconfig.yaml": "pools: ["}
    )
    lines = problems_of(tmp_path)
    assert any(
        line.startswith(f"{tmp_path}/poolconfig-big.yaml: pool 'dedicated': unknown pooltype")
        for line in lines
    )
    assert any(line.startswith(f"{tmp_path}/poolconfig.yaml: not valid YAML") for line in lines)


# --- what the webhook sees: every file's pools


def test_the_webhook_sees_every_pool_and_the_largest_shared_pool(tmp_path: Path) -> None:
    write(tmp_path, {"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE, "poolconfig.yaml": FALLBACK})
    pools = merged_pools(read_config_dir(tmp_path))
    assert sorted(pools) == ["dedicated", "shared"]
    assert pools["dedicated"].type is PoolType.EXCLUSIVE
    # A container on the shared pool may land on either node group: its limit counts the larger pool.
    assert pools["shared"].cpus is not None and len(pools["shared"].cpus) == 4


# --- --node-labels


def test_node_labels_parse_like_kubectl() -> None:
    assert parse_node_labels("node-group=edge, zone=a,example.com/fast=") == {
        "node-group": "edge",
        "zone": "a",
        "example.com/fast": "",
    }
    assert parse_node_labels("") == {}


@pytest.mark.parametrize("text", ["node-group", "=x", "a=1,a=2", "bad key=1", "/x=1"])
def test_bad_node_labels_say_which_part_is_wrong(text: str) -> None:
    with pytest.raises(NodeLabelsError, match="--node-labels"):
        parse_node_labels(text)


# --- cpupool check-config DIR


def test_check_config_dir_shows_the_file_a_node_gets_and_its_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, {"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE, "poolconfig.yaml": FALLBACK})
    assert (
        main(["check-config", str(tmp_path), "--root", DUAL32, "--node-labels", "node-group=edge,zone=a"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"gets {tmp_path}/poolconfig-edge.yaml (its nodeSelector node-group=edge,zone=a matches)" in out
    assert "cpupool.io/shared" in out and " 2000 " in out  # 2 CPUs, one device per millicpu


def test_check_config_dir_without_labels_checks_every_schema_and_asks_for_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, {"poolconfig-big.yaml": BIG, "poolconfig.yaml": FALLBACK})
    assert main(["check-config", str(tmp_path), "--root", DUAL32]) == 0
    assert "pass --node-labels" in capsys.readouterr().out


def test_check_config_dir_reports_two_matching_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path,
        {"poolconfig-big.yaml": BIG, "poolconfig-zone.yaml": BIG.replace("node-group: big", "zone: a")},
    )
    assert (
        main(["check-config", str(tmp_path), "--root", DUAL32, "--node-labels", "node-group=big,zone=a"]) == 1
    )
    err = capsys.readouterr().err
    assert "poolconfig-big.yaml and" in err and "poolconfig-zone.yaml both match" in err


def test_check_config_dir_lists_problems_of_every_file_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The chosen file's host problem (CPU 99) and another file's schema problem, each on its own line.
    write(
        tmp_path,
        {
            "poolconfig-big.yaml": BIG.replace('"2-7"', '"2-7,99"'),
            "poolconfig-edge.yaml": EDGE.replace("pooltype: shared", "pooltype: sharred"),
        },
    )
    assert (
        main(["check-config", str(tmp_path), "--root", DUAL32, "--node-labels", "node-group=big", "--json"])
        == 1
    )
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert report["selected"]["file"] == str(tmp_path / "poolconfig-big.yaml")
    errors = report["errors"]
    assert any("poolconfig-edge.yaml: pool 'shared': unknown pooltype 'sharred'" in e for e in errors)
    assert any("poolconfig-big.yaml: pool 'dedicated': CPUs 99 are not online" in e for e in errors)
    assert len(errors) == 2


def test_check_config_dir_with_no_matching_file_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, {"poolconfig-big.yaml": BIG})
    assert main(["check-config", str(tmp_path), "--root", DUAL32, "--node-labels", "node-group=small"]) == 0
    assert "gets no file" in capsys.readouterr().out


# --- where `cpupool agent` gets its labels


def test_agent_labels_come_from_the_command_line_or_else_the_api(tmp_path: Path) -> None:
    supervisor = Supervisor(AgentSettings(config_path=tmp_path))
    parser = build_parser()

    extra: list[Any] = []
    args = parser.parse_args(["agent", "--config", str(tmp_path), "--node-labels", "node-group=edge"])
    source = _label_source(args, supervisor, extra)
    assert isinstance(source, StaticLabels) and source.labels() == {"node-group": "edge"}
    assert not extra, "with --node-labels the API is never asked"

    args = parser.parse_args(["agent", "--config", str(tmp_path)])
    source = _label_source(args, supervisor, extra)
    assert isinstance(source, NodeLabelWatch) and extra == [source.run]

    extra = []
    config_file = write(tmp_path, {"poolconfig.yaml": FALLBACK}) / "poolconfig.yaml"
    args = parser.parse_args(["agent", "--config", str(config_file)])
    assert _label_source(args, supervisor, extra) is None and not extra


def test_the_agent_loads_no_api_client_until_labels_are_needed() -> None:
    # lightkube costs MiBs of RSS (docs/nodeconfig.md): an agent that never reads labels never loads it.
    code = (
        "import sys, agent.cli, agent.supervisor, agent.nodelabels, agent.webhook; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightkube', 'httpx2', 'msgspec')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
