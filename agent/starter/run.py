"""The starter's main: read the inputs, plan, then hand over to the Supervisor."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from agent.cpuset import CpuSet
from agent.starter import log
from agent.starter.contract import ENV_GRACE, ENV_LOG_LEVEL, ENV_SYS_ROOT
from agent.starter.cores import read_placement
from agent.starter.plan import StarterError, plan_launches, read_annotation_text
from agent.starter.supervise import EXIT_BAD_INPUT, Supervisor

DEFAULT_GRACE_SECONDS = 10.0


def _grace(env: Mapping[str, str]) -> float:
    text = env.get(ENV_GRACE)
    if text is None:
        return DEFAULT_GRACE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise StarterError(f"{ENV_GRACE}={text!r} is not a number of seconds")
    return value


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment the children get: ours, minus what a frozen bundle's bootloader changed."""
    result = dict(env)
    if getattr(sys, "frozen", False):
        # PyInstaller's bootloader points LD_LIBRARY_PATH at its own libraries and keeps the user's value
        # in LD_LIBRARY_PATH_ORIG: the application must see the user's.
        original = result.pop("LD_LIBRARY_PATH_ORIG", None)
        bundle = getattr(sys, "_MEIPASS", None)
        if original is not None:
            result["LD_LIBRARY_PATH"] = original
        elif bundle and result.get("LD_LIBRARY_PATH", "").startswith(str(bundle)):
            del result["LD_LIBRARY_PATH"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    log.set_level(env.get(ENV_LOG_LEVEL, "info"))
    sys_root = env.get(ENV_SYS_ROOT) or "/"
    try:
        grace = _grace(env)
        allowed = CpuSet(os.sched_getaffinity(0))
        launches = plan_launches(env, command, read_annotation_text(env), allowed, sys_root)
    except StarterError as exc:
        print(f"process-starter: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    for warning in read_placement(sys_root, CpuSet().union(*(launch.cpus for launch in launches))).warnings:
        log.warning("starter.topology", reason=warning)
    return Supervisor(launches, child_environment(env), grace).run()
