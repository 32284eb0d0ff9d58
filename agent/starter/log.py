"""The starter's log: one JSON object per line on stderr, like the agent's JSON logs, without structlog."""

from __future__ import annotations

import json
import sys
import time

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_threshold = _LEVELS["info"]


def set_level(name: str) -> None:
    """Set the lowest level written; an unknown name keeps info."""
    global _threshold  # noqa: PLW0603 - one process, one log
    _threshold = _LEVELS.get(name.lower(), _LEVELS["info"])


def emit(level: str, event: str, **fields: object) -> None:
    if _LEVELS[level] < _threshold:
        return
    record = {"event": event, "level": level, "timestamp": round(time.time(), 3), **fields}
    try:
        sys.stderr.write(json.dumps(record, default=str) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        # A closed stderr (the runtime's log pipe went away) must never take PID 1 down.
        pass


def info(event: str, **fields: object) -> None:
    emit("info", event, **fields)


def warning(event: str, **fields: object) -> None:
    emit("warning", event, **fields)


def debug(event: str, **fields: object) -> None:
    emit("debug", event, **fields)
