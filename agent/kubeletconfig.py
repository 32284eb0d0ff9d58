"""Does the kubelet still count pooled CPUs in the node's allocatable `cpu`? (pure, plus one file read)

Pooled CPUs are sold twice unless the kubelet reserves them: once as our extended resources, once as
ordinary `cpu` the scheduler books for every pod (and the static CPU manager may hand out exclusively).
`reservedSystemCPUs` takes named CPUs out of allocatable and out of the static CPU manager's exclusive
assignments; `systemReserved`/`kubeReserved` `cpu` take a quantity out of allocatable only.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from agent.cpuset import CpuSet, CpuSetError

DEFAULT_PATH = Path("var/lib/kubelet/config.yaml")  # under the host root

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m?)$")


class KubeletConfigError(ValueError):
    """The kubelet config cannot be read or understood; the message names the file and the field."""


class Verdict(enum.StrEnum):
    OK = "ok"
    # Allocatable `cpu` still includes pooled CPUs: the scheduler books them twice.
    COUNTS_POOLED = "counts_pooled"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Accounting:
    verdict: Verdict
    detail: str
    pooled: str = ""
    reserved: str = ""
    cpu_manager_policy: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "verdict": str(self.verdict),
            "detail": self.detail,
            "pooled_cpus": self.pooled,
            "reserved_system_cpus": self.reserved,
            "cpu_manager_policy": self.cpu_manager_policy,
        }


def cpu_quantity(text: object, where: str) -> Decimal:
    """A Kubernetes CPU quantity ("2", "1500m", "0.5") in CPUs."""
    match = _QUANTITY.match(str(text).strip())
    if match is None:
        raise KubeletConfigError(f"{where}: {text!r} is not a CPU quantity such as 2, 0.5 or 1500m")
    try:
        value = Decimal(match.group(1))
    except InvalidOperation as exc:
        raise KubeletConfigError(f"{where}: {text!r} is not a number") from exc
    return value / 1000 if match.group(2) else value


def read_config(path: Path) -> Mapping[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KubeletConfigError(f"{path}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise KubeletConfigError(f"{path}: not YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise KubeletConfigError(f"{path}: not a KubeletConfiguration mapping")
    return loaded


def check(config: Mapping[str, Any], pooled: CpuSet, source: str = "kubelet config") -> Accounting:
    """Whether `config` keeps every pooled CPU out of allocatable `cpu` (and away from the CPU manager)."""
    policy = str(config.get("cpuManagerPolicy") or "none")
    text = str(config.get("reservedSystemCPUs") or "")
    try:
        reserved = CpuSet.parse(text)
    except CpuSetError as exc:
        raise KubeletConfigError(f"{source}: reservedSystemCPUs: {exc}") from exc
    facts = {"pooled": pooled.format(), "reserved": reserved.format(), "cpu_manager_policy": policy}
    if not pooled:
        return Accounting(Verdict.OK, "no CPU is pooled", **facts)
    if reserved:
        # reservedSystemCPUs replaces the cpu quantities of systemReserved/kubeReserved.
        missing = pooled - reserved
        if not missing:
            return Accounting(
                Verdict.OK, "reservedSystemCPUs covers every pooled CPU: not in allocatable cpu", **facts
            )
        return Accounting(
            Verdict.COUNTS_POOLED,
            f"pooled CPUs {missing.format()} are not in reservedSystemCPUs: allocatable cpu still counts them"
            + (" and the static CPU manager may give them to Guaranteed pods" if policy == "static" else ""),
            **facts,
        )
    quantity = Decimal(0)
    for key in ("systemReserved", "kubeReserved"):
        section = config.get(key) or {}
        if isinstance(section, Mapping) and "cpu" in section:
            quantity += cpu_quantity(section["cpu"], f"{source}: {key}.cpu")
    if quantity >= len(pooled) and policy != "static":
        return Accounting(
            Verdict.OK,
            f"systemReserved+kubeReserved cpu ({quantity}) covers the {len(pooled)} pooled CPUs",
            **facts,
        )
    detail = (
        f"{len(pooled)} pooled CPUs but only {quantity} CPU reserved (systemReserved+kubeReserved): "
        f"allocatable cpu counts {max(Decimal(len(pooled)) - quantity, Decimal(0))} of them twice"
        if quantity < len(pooled)
        else "a reserved quantity without reservedSystemCPUs lets the static CPU manager use pooled CPUs"
    )
    return Accounting(Verdict.COUNTS_POOLED, detail, **facts)


def assess(path: Path, pooled: CpuSet) -> Accounting:
    """Read the kubelet's config file and check it; an unreadable file gives UNKNOWN with the reason."""
    try:
        return check(read_config(path), pooled, str(path))
    except KubeletConfigError as exc:
        return Accounting(Verdict.UNKNOWN, str(exc), pooled=pooled.format())
