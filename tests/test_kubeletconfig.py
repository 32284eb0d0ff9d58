"""The scheduler-accounting check: does the kubelet still count pooled CPUs in allocatable cpu?"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from agent.cpuset import CpuSet
from agent.kubeletconfig import KubeletConfigError, Verdict, assess, check, cpu_quantity

POOLED = CpuSet.parse("2-7")


@pytest.mark.parametrize(("text", "cpus"), [("2", "2"), ("1500m", "1.5"), ("0.5", "0.5"), (3, "3")])
def test_cpu_quantities(text: object, cpus: str) -> None:
    assert cpu_quantity(text, "x") == Decimal(cpus)


def test_a_bad_quantity_names_the_field() -> None:
    with pytest.raises(KubeletConfigError, match=r"systemReserved.cpu: '2 cores'"):
        check({"systemReserved": {"cpu": "2 cores"}}, POOLED)


def test_reserved_system_cpus_covering_the_pools_is_ok() -> None:
    result = check({"cpuManagerPolicy": "static", "reservedSystemCPUs": "0-7"}, POOLED)
    assert result.verdict is Verdict.OK and result.reserved == "0-7"


def test_pooled_cpus_outside_reserved_system_cpus_are_counted_and_named() -> None:
    result = check({"cpuManagerPolicy": "static", "reservedSystemCPUs": "0-5"}, POOLED)
    assert result.verdict is Verdict.COUNTS_POOLED
    assert "6,7" in result.detail and "static CPU manager" in result.detail


def test_a_default_kubelet_counts_every_pooled_cpu() -> None:
    result = check({}, POOLED)
    assert result.verdict is Verdict.COUNTS_POOLED and "6 pooled CPUs" in result.detail


def test_reserved_quantities_cover_the_count_without_the_static_policy() -> None:
    config = {"systemReserved": {"cpu": "4"}, "kubeReserved": {"cpu": "2000m"}}
    assert check(config, POOLED).verdict is Verdict.OK
    assert check({**config, "cpuManagerPolicy": "static"}, POOLED).verdict is Verdict.COUNTS_POOLED


def test_nothing_pooled_is_ok() -> None:
    assert check({}, CpuSet()).verdict is Verdict.OK


def test_an_unreadable_file_is_unknown_with_the_reason(tmp_path: Path) -> None:
    missing = assess(tmp_path / "config.yaml", POOLED)
    assert missing.verdict is Verdict.UNKNOWN and "config.yaml" in missing.detail
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    assert "not a KubeletConfiguration" in assess(tmp_path / "bad.yaml", POOLED).detail
