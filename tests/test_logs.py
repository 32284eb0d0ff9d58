"""The agent's log lines as an operator's log pipeline reads them: one JSON object per line on stderr, with
its event, level, logger and a UTC ISO 8601 time, for the agent's own events and the libraries' records."""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from agent.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test sets up the agent's logging as in the cluster (in its own body: pytest's captured stderr
    of the set-up phase is closed by then); the process's own set-up comes back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


def read(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_a_line_has_its_fields_level_logger_and_utc_time(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    before = datetime.datetime.now(datetime.UTC)
    structlog.get_logger("agent.deviceplugin").info("allocate", resource="cpupool.io/fast", devices=1)
    after = datetime.datetime.now(datetime.UTC)
    [line] = read(capsys)
    assert {k: line[k] for k in ("event", "level", "logger", "resource", "devices")} == {
        "event": "allocate",
        "level": "info",
        "logger": "agent.deviceplugin",
        "resource": "cpupool.io/fast",
        "devices": 1,
    }
    stamp = str(line["timestamp"])
    # Always to the microsecond and marked UTC, even on a whole second.
    assert len(stamp) == len("2026-12-03T21:01:52.990480Z") and stamp.endswith("Z")
    when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - datetime.timedelta(microseconds=1) <= when <= after


def test_the_time_keeps_six_digits_of_microseconds_and_its_second(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_logging("info", "json")
    log = structlog.get_logger("agent.x")
    whole = int(datetime.datetime(2026, 12, 3, 21, 1, 52, tzinfo=datetime.UTC).timestamp())
    for nanos in (5_000, 999_999_999, 1_000_000_000 + 42_000):
        monkeypatch.setattr("agent.logs.time.time_ns", lambda nanos=nanos: whole * 1_000_000_000 + nanos)
        log.info("tick")
    monkeypatch.undo()
    assert [line["timestamp"] for line in read(capsys)] == [
        "2026-12-03T21:01:52.000005Z",
        "2026-12-03T21:01:52.999999Z",
        "2026-12-03T21:01:53.000042Z",
    ]


def test_levels_follow_structlogs_names(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    log = structlog.get_logger("agent.x")
    log.warning("a")
    log.warn("b")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("c")
    log.debug("below the level")
    lines = read(capsys)
    assert [(line["event"], line["level"]) for line in lines] == [
        ("a", "warning"),
        ("b", "warning"),
        ("c", "error"),
    ]
    assert "ZeroDivisionError: division by zero" in str(lines[2]["exception"])


def test_a_value_json_has_no_type_for_is_written_as_its_repr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")

    class Pool:
        def __repr__(self) -> str:
            return "Pool('fast')"

        def __str__(self) -> str:
            return "fast"

    structlog.get_logger("agent.x").info("reloaded", pool=Pool(), cpus={3})
    [line] = read(capsys)
    assert line["pool"] == "Pool('fast')"
    assert line["cpus"] == "{3}"


def test_a_librarys_record_is_a_json_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    logging.getLogger("grpclib.protocol").warning("connection %s lost", "kubelet")
    [line] = read(capsys)
    assert (line["event"], line["level"], line["logger"]) == (
        "connection kubelet lost",
        "warning",
        "grpclib.protocol",
    )
    assert str(line["timestamp"]).endswith("Z")
