"""Structured logging, set up once per process: JSON in the cluster, readable on a terminal."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


class _Writer:
    """structlog's last step for the agent's own events: one write of the rendered line to the stderr of
    the moment (tests swap it). It carries the name the module gave get_logger(), which `_logger_name` puts
    in the line."""

    _lock = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        with self._lock:
            try:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                # A closed or broken stderr: as with the standard library's handlers, a log line never
                # takes the agent down.
                pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _writer(*args: Any) -> _Writer:
    return _Writer(str(args[0]) if args else "")


class _UtcClock:
    """ISO 8601 UTC times to the microsecond ("2026-12-03T21:01:52.990480Z"), the date and time of day made
    once a second. structlog's TimeStamper builds a datetime and formats it whole for every line."""

    def __init__(self) -> None:
        # (second, its text), swapped as one: lines come from worker threads too.
        self._second: tuple[int, str] = (-1, "")

    def now(self) -> str:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        cached, text = self._second
        if second != cached:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{nanos // 1000:06d}Z"


_clock = _UtcClock()


def _stamp(logger: Any, method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """A line's level, logger name and time, in one step. structlog's bound loggers name the level they
    log at (`warn` logs as "warning", `exception` as "error")."""
    event["level"] = method
    name = getattr(logger, "name", None)
    if name:
        event["logger"] = name
    event["timestamp"] = _clock.now()
    return event


def _timestamp(logger: Any, method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    event["timestamp"] = _clock.now()
    return event


# One encoder for every line: structlog's JSONRenderer passes its fallback to json.dumps, which then builds
# a new JSONEncoder per line. Values JSON has no type for are written as their repr(), as structlog does.
_JSON = json.JSONEncoder(default=repr)


def _render_json(logger: Any, method: str, event: structlog.types.EventDict) -> str:
    return _JSON.encode(event)


def setup_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    """structlog's events and the standard library's records (grpclib, asyncio) go to one renderer on
    stderr.

    The agent's own events are rendered and written by structlog directly. Through the standard library
    (a LogRecord, a formatter, the handler's lock and flush) a line cost about 0.1 ms of CPU on a small VM,
    and the admission path logs one per Allocate. For the same reason the chain is short. Measured in the
    agent on the real path (docs/benchmarks.md), an Allocate line cost 100-113 µs of CPU with structlog's
    context-variable, level, logger-name and ISO-timestamp steps and its JSONRenderer, 73-83 µs with
    `_stamp` and `_render_json`. The agent binds no context variables, so none are merged."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        _render_json if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[_stamp, structlog.processors.format_exc_info, renderer],
        logger_factory=_writer,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                _timestamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
