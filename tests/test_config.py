"""The pool config: schema errors name the file, the pool and the fault; validation against the host."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import (
    ConfigError,
    HtPolicy,
    PoolType,
    default_config,
    load_config_file,
    parse_config,
    pool_env_name,
    validate,
    validate_partial,
)
from agent.cpuset import CpuSet
from agent.topology import discover
from tests.fixtures.make_sysfs import SYSFS_DIR
from tests.topologies import make_topology

SRC = "/etc/cpupool/poolconfig.yaml"
# 2 sockets x 4 cores x 2 threads: CPUs 0-15, siblings n and n+8, isolated 2-7,10-15.
TOPO = make_topology(isolated="2-7,10-15")

GOOD = """
resourceBaseName: cpupool.io
pools:
  lowlatency: {cpus: "2-5", pooltype: exclusive}
  shared:     {cpus: "6-7", pooltype: shared}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    return str(info.value).splitlines()


def test_parses_the_documented_example() -> None:
    config = parse_config(GOOD, SRC)
    assert config.resource_base_name == "cpupool.io"
    assert config.resource_name("lowlatency") == "cpupool.io/lowlatency"
    low, shared = config.pools["lowlatency"], config.pools["shared"]
    assert (low.type, low.cpus, low.ht_policy) == (PoolType.EXCLUSIVE, CpuSet.parse("2-5"), None)
    assert (shared.type, shared.cpus) == (PoolType.SHARED, CpuSet.parse("6-7"))


def test_isolated_keyword_and_ht_policy() -> None:
    config = parse_config(
        "pools:\n  fast: {cpus: isolated, pooltype: exclusive, hyperThreadingPolicy: multiThreaded}\n", SRC
    )
    fast = config.pools["fast"]
    assert fast.cpus is None and fast.cpus_text == "isolated"
    assert fast.ht_policy is HtPolicy.MULTI
    validated = validate(config, TOPO)
    assert validated.cpus["fast"] == CpuSet.parse("2-7,10-15")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pools: [1, 2]", "'pools' must map pool names to settings"),
        ("resourceBaseName: x.io\n", "missing 'pools'"),
        ("pools: {}\nextra: 1\n", "unknown key(s) extra"),
        ("pools:\n  a: {cpus: '1', pooltype: exclusive, colour: red}\n", "pool 'a': unknown key(s) colour"),
        ("pools:\n  a: {cpus: '1', pooltype: dedicated}\n", "pool 'a': unknown pooltype 'dedicated'"),
        ("pools:\n  a: {cpus: '1'}\n", "pool 'a': missing 'pooltype'"),
        ("pools:\n  a: {pooltype: shared}\n", "pool 'a': missing 'cpus'"),
        ("pools:\n  a: {cpus: '3-1', pooltype: shared}\n", "pool 'a': invalid cpu list '3-1'"),
        ("pools:\n  a: {cpus: '', pooltype: shared}\n", "pool 'a': cpus is empty"),
        ("pools:\n  a: {cpus: [1], pooltype: shared}\n", "pool 'a': cpus must be a cpu list string"),
        (
            "pools:\n  a: {cpus: '1', pooltype: shared, hyperThreadingPolicy: multiThreaded}\n",
            "hyperThreadingPolicy applies to exclusive pools only",
        ),
        (
            "pools:\n  a: {cpus: '1', pooltype: exclusive, hyperThreadingPolicy: both}\n",
            "unknown hyperThreadingPolicy 'both'",
        ),
        (
            "pools:\n  a: {cpus: '1', pooltype: shared}\n  b: {cpus: '2', pooltype: shared}\n",
            "at most one shared pool is allowed, found 2: a, b",
        ),
        ("resourceBaseName: kubernetes.io\npools: {}\n", "reserved for Kubernetes"),
        ("resourceBaseName: nodes.kubernetes.io\npools: {}\n", "reserved for Kubernetes"),
        ("resourceBaseName: Bad_Domain\npools:\n  a: {cpus: '1', pooltype: shared}\n", "not a DNS subdomain"),
        (
            "pools:\n  -bad-: {cpus: '1', pooltype: shared}\n",
            "pool '-bad-': pool name '-bad-' is not a valid",
        ),
        ("pools:\n  " + "p" * 64 + ": {cpus: '1', pooltype: shared}\n", "is not a valid resource name part"),
        ("pools:\n  a: {cpus: '1', pooltype: shared\n", "not valid YAML at line"),
        ("", "got an empty file"),
    ],
)
def test_schema_errors_name_file_pool_and_fault(text: str, expected: str) -> None:
    lines = errors(text)
    assert any(expected in line for line in lines), lines
    assert all(line.startswith(SRC) for line in lines)


def test_every_problem_is_reported_at_once() -> None:
    lines = errors("pools:\n  a: {cpus: 'x', pooltype: exclusive}\n  b: {cpus: '1', pooltype: nope}\n")
    assert len(lines) == 2
    assert "pool 'a'" in lines[0] and "pool 'b'" in lines[1]


@pytest.mark.parametrize(
    ("first", "second"), [("a-b", "a_b"), ("a_b", "A.B"), ("a-b", "A.B"), ("dpdk.rx", "DPDK-RX")]
)
def test_pool_names_sharing_an_environment_variable_are_refused(first: str, second: str) -> None:
    # A container holding both pools would get one CPUPOOL_A_B_CPUS: one pool's CPUs would vanish.
    pool = "{cpus: '%s', pooltype: exclusive}"
    lines = errors(f"pools:\n  {first}: {pool % 1}\n  {second}: {pool % 2}\n")
    env = pool_env_name(first)
    assert len(lines) == 1, lines
    assert repr(first) in lines[0] and repr(second) in lines[0] and env in lines[0], lines


def test_three_colliding_pool_names_are_one_problem_naming_all() -> None:
    lines = errors(
        "pools:\n  a-b: {cpus: '1', pooltype: exclusive}\n  a_b: {cpus: '2', pooltype: exclusive}\n"
        "  A.B: {cpus: '3', pooltype: exclusive}\n"
    )
    assert len(lines) == 1, lines
    assert all(name in lines[0] for name in ("'a-b'", "'a_b'", "'A.B'", "CPUPOOL_A_B_CPUS"))


def test_a_pool_given_twice_is_refused_not_silently_replaced() -> None:
    # YAML keeps only the last of two equal keys; the first pool would vanish without a word.
    lines = errors("pools:\n  a: {cpus: '1', pooltype: exclusive}\n  a: {cpus: '2', pooltype: shared}\n")
    assert any("pool 'a'" in line and "twice" in line and "lines 2 and 3" in line for line in lines), lines


def test_pool_names_that_are_one_string_are_refused() -> None:
    # 1 and "1" are two YAML keys but one pool name, one resource cpupool.io/1 and one socket cpupool-1.sock.
    lines = errors("pools:\n  1: {cpus: '1', pooltype: exclusive}\n  '1': {cpus: '2', pooltype: exclusive}\n")
    assert any("pool '1'" in line and "cpupool-1.sock" in line for line in lines), lines


def test_duplicate_top_level_keys_are_refused() -> None:
    lines = errors("resourceBaseName: a.io\nresourceBaseName: b.io\npools: {}\n")
    assert any("'resourceBaseName'" in line and "twice" in line for line in lines), lines


def test_cpus_may_be_a_single_number() -> None:
    config = parse_config("pools:\n  one: {cpus: 3, pooltype: exclusive}\n", SRC)
    assert config.pools["one"].cpus == CpuSet([3])


def validation_errors(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(parse_config(text, SRC), TOPO)
    return str(info.value)


def test_cpus_that_are_not_even_present() -> None:
    message = validation_errors("pools:\n  big: {cpus: '14-17', pooltype: exclusive}\n")
    assert message == f"{SRC}: pool 'big': CPUs 16,17 are not online, nor even present (present: 0-15)"


# The `offline` tree: CPUs 0-7 present, 5 and 7 offline; siblings n and n+4; isolated 4-7.
OFFLINE = discover(SYSFS_DIR / "offline")


def test_present_but_offline_cpus_are_accepted_and_named() -> None:
    # A CPU taken offline must not make the whole config invalid: its devices go Unhealthy instead.
    validated = validate(parse_config("pools:\n  p: {cpus: '4-7', pooltype: exclusive}\n", SRC), OFFLINE)
    assert validated.cpus["p"] == CpuSet.parse("4-7")
    assert validated.offline == {"p": CpuSet.parse("5,7")}
    assert [w for w in validated.warnings if "offline" in w] == [
        f"{SRC}: pool 'p': CPUs 5,7 are present but offline: the pool keeps them, and they cannot be used "
        "until they are online"
    ]


def test_pools_without_offline_cpus_have_an_empty_offline_set() -> None:
    text = "pools:\n  p: {cpus: '4-5', pooltype: exclusive}\n  q: {cpus: '0-1', pooltype: shared}\n"
    validated = validate(parse_config(text, SRC), OFFLINE)
    assert validated.offline == {"p": CpuSet([5]), "q": CpuSet()}
    assert not any("pool 'q'" in w and "offline" in w for w in validated.warnings)


def test_offline_cpus_still_count_for_overlaps() -> None:
    config = parse_config(
        "pools:\n  a: {cpus: '5', pooltype: exclusive}\n  b: {cpus: '4-5', pooltype: shared}\n", SRC
    )
    with pytest.raises(ConfigError, match="pool 'a': CPUs 5 are also in pool 'b'"):
        validate(config, OFFLINE)


def test_cpus_not_present_stay_an_error_next_to_offline_ones() -> None:
    config = parse_config("pools:\n  p: {cpus: '5-9', pooltype: exclusive}\n", SRC)
    with pytest.raises(ConfigError, match=r"CPUs 8,9 are not online, nor even present \(present: 0-7\)"):
        validate(config, OFFLINE)


def test_isolated_keyword_keeps_offline_isolated_cpus() -> None:
    validated = validate(parse_config("pools:\n  p: {cpus: isolated, pooltype: exclusive}\n", SRC), OFFLINE)
    assert validated.cpus["p"] == CpuSet.parse("4-7")
    assert validated.offline["p"] == CpuSet.parse("5,7")


def test_ht_pool_with_offline_cpus_checks_whole_cores_among_online_ones() -> None:
    # sysfs shows no siblings for an offline CPU: its core is checked once it is back online.
    text = "pools:\n  p: {cpus: '0-7', pooltype: exclusive, hyperThreadingPolicy: multiThreaded}\n"
    validated = validate(parse_config(text, SRC), OFFLINE)
    assert validated.offline["p"] == CpuSet.parse("5,7")
    assert any("CPUs 5,7" in w and "cores cannot be checked" in w for w in validated.warnings), (
        validated.warnings
    )
    split = "pools:\n  p: {cpus: '0,5', pooltype: exclusive, hyperThreadingPolicy: multiThreaded}\n"
    with pytest.raises(ConfigError, match="CPU 0 is in the pool but its sibling"):
        validate(parse_config(split, SRC), OFFLINE)


def test_cpu_in_two_pools() -> None:
    message = validation_errors(
        "pools:\n  a: {cpus: '2-5', pooltype: exclusive}\n  b: {cpus: '5-6', pooltype: shared}\n"
    )
    assert message == f"{SRC}: pool 'a': CPUs 5 are also in pool 'b'"


def test_ht_policy_needs_whole_cores() -> None:
    message = validation_errors(
        "pools:\n  a: {cpus: '2-3', pooltype: exclusive, hyperThreadingPolicy: singleThreaded}\n"
    )
    # Every split core is named, not only the first.
    assert "CPUs 2,3 are in the pool but their sibling(s) 10,11 are not" in message
    one = validation_errors(
        "pools:\n  a: {cpus: '2-3,11', pooltype: exclusive, hyperThreadingPolicy: multiThreaded}\n"
    )
    assert "CPU 2 is in the pool but its sibling(s) 10 are not" in one


def test_partial_validation_keeps_the_good_pools_and_every_problem() -> None:
    config = parse_config(
        "pools:\n  a: {cpus: '2-5', pooltype: exclusive}\n  b: {cpus: '5-6', pooltype: exclusive}\n"
        "  c: {cpus: '20', pooltype: exclusive}\n  d: {cpus: '7', pooltype: shared}\n",
        SRC,
    )
    validated, problems = validate_partial(config, TOPO)
    assert [(p.pool, p.message.split(" are ")[0]) for p in problems] == [("c", "CPUs 20"), ("a", "CPUs 5")]
    # Both pools of an overlap are left out; only the faultless one remains.
    assert list(validated.config.pools) == ["d"] and dict(validated.cpus) == {"d": CpuSet([7])}


def test_isolated_pool_without_isolation_is_an_error() -> None:
    config = parse_config("pools:\n  a: {cpus: isolated, pooltype: exclusive}\n", SRC)
    with pytest.raises(ConfigError, match="the kernel isolates no present CPU"):
        validate(config, make_topology())


def test_exclusive_pool_on_scheduled_cpus_is_allowed_with_a_warning() -> None:
    validated = validate(parse_config("pools:\n  a: {cpus: '0-2', pooltype: exclusive}\n", SRC), TOPO)
    assert validated.cpus["a"] == CpuSet.parse("0-2")
    assert len(validated.warnings) == 1
    assert "exclusive CPUs 0,1 are not isolated" in validated.warnings[0]


def test_default_config_serves_the_isolated_cpus() -> None:
    config = default_config()
    assert config.resource_name("isolcpus") == "cpupool.io/isolcpus"
    assert validate(config, TOPO).cpus["isolcpus"] == CpuSet.parse("2-7,10-15")


def test_load_config_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: cannot read the file"):
        load_config_file(missing)
    good = tmp_path / "poolconfig.yaml"
    good.write_text(GOOD)
    assert load_config_file(good).source == str(good)


@pytest.mark.parametrize(
    ("pool", "env"), [("lowlatency", "CPUPOOL_LOWLATENCY_CPUS"), ("dpdk-rx.1", "CPUPOOL_DPDK_RX_1_CPUS")]
)
def test_pool_env_name(pool: str, env: str) -> None:
    assert pool_env_name(pool) == env


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    try:
        parse_config(text, SRC)
    except ConfigError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith(SRC)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["resourceBaseName", "pools", "x"]),
        yaml_values
        | st.dictionaries(
            st.text(max_size=6),
            st.dictionaries(st.sampled_from(["cpus", "pooltype", "hyperThreadingPolicy"]), yaml_values),
        ),
    )
)
def test_any_structure_gives_a_config_or_a_config_error(data: dict[str, object]) -> None:
    try:
        config = parse_config(yaml.safe_dump(data), SRC)
    except ConfigError:
        return
    with contextlib.suppress(ConfigError):
        validate(config, TOPO)
