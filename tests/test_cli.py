"""The `cpupool` command line: discover, check-config and their exit codes, and the log formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import config_path_problem, main
from tests.fixtures.make_sysfs import CpuSpec, TreeSpec, write_tree
from tests.harness import FIXTURES, POOLS

DUAL32 = str(FIXTURES / "dual32")


def cpupool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_discover_prints_the_topology_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["discover", "--root", DUAL32]) == 0
    out = capsys.readouterr().out
    assert "NUMA node 1: CPUs 8-15,24-31" in out
    assert "isolated 2-7,18-23" in out


def test_discover_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["discover", "--root", DUAL32, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["online"] == "0-31" and data["isolated"] == "2-7,18-23"


def test_discover_of_a_root_without_sysfs_is_a_usage_error(tmp_path: Path) -> None:
    result = cpupool("discover", "--root", str(tmp_path))
    assert result.returncode == 2
    assert "online" in result.stderr


def test_check_config_valid_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "poolconfig.yaml"
    config.write_text(POOLS)
    assert main(["check-config", str(config), "--root", DUAL32]) == 0
    out = capsys.readouterr().out
    assert f"{config}: valid, 3 resource(s)" in out
    assert "cpupool.io/shared" in out and "2000" in out
    assert "warning:" in out and "not isolated" in out


def test_check_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "poolconfig.yaml"
    config.write_text(POOLS)
    assert main(["check-config", str(config), "--root", DUAL32, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {r["resource"]: r for r in data["resources"]}
    assert by_name["cpupool.io/multi"]["devices"] == 4
    assert by_name["cpupool.io/multi"]["hyperThreadingPolicy"] == "multiThreaded"
    assert 0 < by_name["cpupool.io/shared"]["list_message_bytes"] < 4 * 1024 * 1024


def test_check_config_invalid_exits_1_with_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "poolconfig.yaml"
    config.write_text('pools:\n  a: {cpus: "40-41", pooltype: exclusive}\n  b: {cpus: "1", pooltype: nope}\n')
    assert main(["check-config", str(config), "--root", DUAL32]) == 1
    err = capsys.readouterr().err
    assert f"{config}: pool 'b': unknown pooltype 'nope'" in err


def test_check_config_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "missing.yaml"), "--root", DUAL32]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_logs_are_json_when_not_on_a_terminal(tmp_path: Path) -> None:
    config = tmp_path / "poolconfig.yaml"
    config.write_text(POOLS)
    result = cpupool("check-config", str(config), "--root", DUAL32)
    assert result.returncode == 0
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "topology.discovered" and e["level"] == "info" for e in events)


def test_console_log_format_is_readable(tmp_path: Path) -> None:
    result = cpupool("discover", "--root", DUAL32, "--log-format", "console")
    assert "topology.discovered" in result.stderr and not result.stderr.lstrip().startswith("{")


def test_usage_errors_exit_2() -> None:
    assert cpupool("no-such-command").returncode == 2
    assert cpupool("agent", "--log-level", "loud").returncode == 2


def start_agent(config: Path, plugin_dir: Path) -> subprocess.CompletedProcess[str]:
    """The agent as a user starts it; one that wrongly keeps running is cut off by the timeout."""
    command = ["agent", "--config", str(config), "--root", DUAL32, "--plugin-dir", str(plugin_dir)]
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *command, "--health-port", "0", "--no-pin-self"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_agent_with_a_config_path_that_does_not_exist_exits_2_naming_it(tmp_path: Path) -> None:
    # Serving the built-in isolated-CPU pool instead would hand out CPUs the user never pooled.
    missing = tmp_path / "etc" / "poolconfig.yaml"
    result = start_agent(missing, tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"cpupool agent: config file {missing} does not exist" in result.stderr
    assert not list(tmp_path.glob("*.sock"))


def test_agent_accepts_a_config_directory_of_per_node_group_files(tmp_path: Path) -> None:
    # A directory is the per-node-group form (tests/test_poolconfigs.py); one that is missing still exits 2.
    assert config_path_problem(tmp_path) is None
    assert "does not exist" in (config_path_problem(tmp_path / "missing") or "")


# One problem of each kind check-config finds: schema, host, overlap, whole cores, the kubelet's size limit.
EVERY_KIND = """
pools:
  typo:   {cpus: "1", pooltype: nope}
  far:    {cpus: "0,300-301", pooltype: exclusive}
  left:   {cpus: "2-3", pooltype: exclusive}
  right:  {cpus: "3-4", pooltype: exclusive}
  big:    {cpus: "5-255", pooltype: shared}
  cores:  {cpus: "256-259", pooltype: exclusive, hyperThreadingPolicy: multiThreaded}
"""


def wide_host(root: Path) -> Path:
    """260 online CPUs: 256 single-thread cores, then CPUs 256-263 as 4 cores of 2 threads (n, n+4)."""
    cpus = {
        cpu: CpuSpec(package=0, core_id=cpu, siblings=str(cpu), package_cpus="0-263") for cpu in range(256)
    }
    for cpu in range(256, 264):
        first = 256 + (cpu - 256) % 4
        cpus[cpu] = CpuSpec(package=0, core_id=first, siblings=f"{first},{first + 4}", package_cpus="0-263")
    return write_tree(TreeSpec(cpus=cpus, online="0-263", present="0-263", cmdline=""), root)


def test_check_config_reports_every_problem_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = wide_host(tmp_path / "host")
    config = tmp_path / "poolconfig.yaml"
    config.write_text(EVERY_KIND)
    assert main(["check-config", str(config), "--root", str(root)]) == 1
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    expected = [
        "pool 'typo': unknown pooltype 'nope'",
        "pool 'far': CPUs 300,301 are not online",
        "pool 'left': CPUs 3 are also in pool 'right'",
        "pool 'big': a shared pool of 251 CPUs lists 251000 millicpu devices",
        "pool 'cores': hyperThreadingPolicy multiThreaded needs whole cores: "
        "CPUs 256-259 are in the pool but their sibling(s) 260-263 are not",
    ]
    for fault in expected:
        assert sum(fault in line for line in problems) == 1, (fault, problems)
    assert len(problems) == len(expected), problems


def test_check_config_json_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = wide_host(tmp_path / "host")
    config = tmp_path / "poolconfig.yaml"
    config.write_text(EVERY_KIND)
    assert main(["check-config", str(config), "--root", str(root), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is False
    assert len(data["errors"]) == 5, data["errors"]
    assert all(error.startswith(f"{config}: pool '") for error in data["errors"])


def test_check_config_reports_schema_and_host_problems_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "poolconfig.yaml"
    config.write_text('pools:\n  a: {cpus: "40-41", pooltype: exclusive}\n  b: {cpus: "1", pooltype: nope}\n')
    assert main(["check-config", str(config), "--root", DUAL32]) == 1
    err = capsys.readouterr().err
    assert f"{config}: pool 'b': unknown pooltype 'nope'" in err
    assert f"{config}: pool 'a': CPUs 40,41 are not online, nor even present (present: 0-31)" in err


@pytest.mark.parametrize(
    "args",
    [
        ["discover", "--root", DUAL32],
        ["discover", "--root", DUAL32, "--json"],
        ["check-config", "POOLS", "--root", DUAL32],
    ],
)
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path, args: list[str]) -> None:
    # `cpupool discover | head -1`: the reader is gone before the command writes. The read end is closed
    # before the child starts writing, so the write always meets a broken pipe.
    config = tmp_path / "poolconfig.yaml"
    config.write_text(POOLS)
    args = [str(config) if arg == "POOLS" else arg for arg in args]
    child = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()
    stderr = child.stderr.read()
    child.stderr.close()
    assert child.wait(timeout=60) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


def test_check_config_accepts_present_but_offline_cpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The `offline` tree: CPUs 0-7 present, 5 and 7 offline. Offline CPUs are unusable, the config is fine.
    config = tmp_path / "poolconfig.yaml"
    config.write_text(
        'pools:\n  p: {cpus: "4-7", pooltype: exclusive}\n  s: {cpus: "0-1", pooltype: shared}\n'
    )
    assert main(["check-config", str(config), "--root", str(FIXTURES / "offline"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is True
    assert any("CPUs 5,7 are present but offline" in warning for warning in data["warnings"])


def test_agent_start_path_leaves_out_the_webhook_status_nri_and_http() -> None:
    """`cpupool agent` loads what the device plugin needs before its first registration; the webhook, the
    status client, NRI's generated protocol and aiohttp load later or never (they were half its start-up),
    and so do smaller things that together were 10 ms of it: NRI's policy module, the generated PodResources
    API (the start reads the kubelet's record as bytes), shutil (argparse's width), ctypes.util (the C
    library's lookup, which also ran `ldconfig` in a child process) and the IDNA codec (the health port's
    address)."""
    probe = (
        "import sys; sys.argv[1:] = ['agent']; from agent import cli; "
        "args = cli.build_parser(cli._command_of(['agent'])).parse_args(['agent']); "
        "import agent.supervisor; from agent.dirwatch import _libc; _libc(); "
        "cli._listen('127.0.0.1', 0).close(); "
        "late = ('agent.webhook', 'agent.status', 'agent.mutation', 'agent.nri.plugin', 'agent.nriapi', "
        "'aiohttp', 'watchfiles', 'agent.nri.policy', 'agent.kubeletapi.v1', 'shutil', 'ctypes.util', "
        "'agent.health', 'agent.nri.accounting', 'h11', 'encodings.idna'); "
        "print(sorted(m for m in late if sys.modules.get(m) is not None)); "
        "print(args.nri_socket, args.nri_index, args.nri_policy, *cli.NRI_POLICIES)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded, defaults = done.stdout.splitlines()
    assert loaded == "[]"
    from agent.nri.plugin import DEFAULT_INDEX, DEFAULT_SOCKET  # noqa: PLC0415
    from agent.nri.policy import Policy  # noqa: PLC0415

    # The command line's NRI defaults and policy names are NRI's own, though the agent does not import
    # the plugin or the policy module to parse them.
    policies = " ".join(str(p) for p in Policy)
    assert defaults == f"{DEFAULT_SOCKET} {DEFAULT_INDEX} {Policy.STRICT} {policies}"


def test_help_is_as_wide_as_argparse_makes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's help formatter finds the width without shutil, and finds the same one."""
    import argparse  # noqa: PLC0415

    from agent.cli import _HelpFormatter  # noqa: PLC0415

    for columns in ("120", "41", "0", "not a number"):
        monkeypatch.setenv("COLUMNS", columns)
        assert _HelpFormatter("cpupool")._width == argparse.HelpFormatter("cpupool")._width
    monkeypatch.delenv("COLUMNS")
    assert _HelpFormatter("cpupool")._width == argparse.HelpFormatter("cpupool")._width


def test_every_command_parses_its_own_options_when_named_first() -> None:
    from agent.cli import build_parser  # noqa: PLC0415

    full = build_parser()
    for argv in (["status", "--help"], ["webhook", "--help"]):
        with pytest.raises(SystemExit) as exited:
            build_parser(argv[0]).parse_args(argv)
        assert exited.value.code == 0
    argv = ["webhook", "--cert", "c", "--key", "k"]
    assert build_parser("webhook").parse_args(argv) == full.parse_args(argv)
