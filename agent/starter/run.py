"""The starter's main: read the inputs, plan, then hand over to the Supervisor."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from agent.cpuset import CpuSet
from agent.starter import log
from agent.starter.contract import ENV_GRACE, ENV_LOG_LEVEL, ENV_SYS_ROOT
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


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    log.set_level(env.get(ENV_LOG_LEVEL, "info"))
    sys_root = env.get(ENV_SYS_ROOT) or "/"
    try:
        grace = _grace(env)
        allowed = CpuSet(os.sched_getaffinity(0))
        warnings: list[str] = []
        launches = plan_launches(env, command, read_annotation_text(env), allowed, sys_root, warnings)
    except StarterError as exc:
        print(f"process-starter: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    for warning in warnings:
        log.warning("starter.topology", reason=warning)
    return Supervisor(launches, env, grace).run()
