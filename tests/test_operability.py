"""Health, readiness and metrics over HTTP, and the agent keeping itself off the CPUs it hands out."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import parse_config, validate
from agent.cpuset import CpuSet
from agent.health import serve_health
from agent.metrics import CounterMetric, GaugeMetric, HistogramMetric, MetricLabelError, Metrics
from agent.plan import build_plan
from agent.supervisor import housekeeping_cpus
from tests.emulator import KubeletEmulator
from tests.harness import running_agent
from tests.topologies import make_topology

FAST = "cpupool.io/fast"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_get(port: int, path: str) -> tuple[int, str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    raw = (await reader.read()).decode()
    writer.close()
    head, _, body = raw.partition("\r\n\r\n")
    status = int(head.split()[1])
    content_type = next(
        (h.split(":", 1)[1].strip() for h in head.splitlines() if h.lower().startswith("content-type")), ""
    )
    return status, content_type, body


async def test_health_endpoints(tmp_path: Path) -> None:
    port = free_port()
    async with running_agent(tmp_path, kubelet=False) as run:
        server = asyncio.create_task(serve_health(run.supervisor, "127.0.0.1", port))
        try:
            await asyncio.wait_for(run.supervisor.started.wait(), 5)
            await run.emu.wait_for(lambda: _port_open(port), what="the health port")
            status, _, body = await http_get(port, "/readyz")
            assert status == 503
            assert json.loads(body)["resources"][FAST]["registered"] is False

            await run.emu.start()
            await run.emu.wait_for(lambda: run.supervisor.ready, what="the agent to be ready")
            status, _, body = await http_get(port, "/readyz")
            assert status == 200 and json.loads(body)["ready"] is True

            # Ready is the agent's view (registered, stream open); the kubelet may not have read the list yet.
            await run.emu.wait_devices(FAST)
            await run.emu.allocate(FAST, 2)
            run.configmap.write('pools:\n  fast: {cpus: "99", pooltype: exclusive}\n')
            await run.emu.wait_for(
                lambda: run.supervisor.last_config_error is not None, what="the config error"
            )
            status, _, body = await http_get(port, "/healthz")
            health = json.loads(body)
            assert status == 200
            assert health["config_generation"] == 1 and health["config_reload_errors"] == 1
            assert "CPUs 99 are not online" in health["last_config_error"]

            status, content_type, metrics = await http_get(port, "/metrics")
            assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
            values = samples(metrics)
            assert values["cpupool_resource_registered", (("resource", FAST),)] == 1
            assert values["cpupool_devices", (("health", "healthy"), ("resource", FAST))] == 12
            assert values["cpupool_listandwatch_streams", (("resource", FAST),)] == 1
            assert values["cpupool_config_reloads_total", (("result", "error"),)] == 1
            assert values["cpupool_config_generation", ()] == 1
            allocate = (("method", "Allocate"), ("resource", FAST))
            assert values["cpupool_allocation_duration_seconds_count", allocate] >= 1
            preferred = (("method", "GetPreferredAllocation"), ("resource", FAST), ("result", "ok"))
            assert values["cpupool_allocations_total", preferred] == 1
            assert "# TYPE cpupool_allocation_duration_seconds histogram" in metrics.splitlines()
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics answer by (name, sorted labels), parsed as Prometheus would."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def thread_masks(pid: int) -> set[CpuSet]:
    """The CPU affinity of every thread of a process."""
    return {
        CpuSet.parse(line.split(":", 1)[1])
        for task in Path(f"/proc/{pid}/task").iterdir()
        for line in (task / "status").read_text().splitlines()
        if line.startswith("Cpus_allowed_list")
    }


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_housekeeping_cpus_are_those_of_no_exclusive_pool() -> None:
    topology = make_topology(isolated="2-7,10-15")
    config = parse_config(
        'pools:\n  a: {cpus: "2-5", pooltype: exclusive}\n  s: {cpus: "6-7", pooltype: shared}\n', "x.yaml"
    )
    plan = build_plan(validate(config, topology), topology)
    assert housekeeping_cpus(plan, topology) == CpuSet.parse("0-1,6-15")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to hand one out")
async def test_agent_pins_itself_to_housekeeping_cpus(tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    exclusive = allowed[-1]
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    config = tmp_path / "poolconfig.yaml"
    config.write_text(f'pools:\n  mine: {{cpus: "{exclusive}", pooltype: exclusive}}\n')
    async with KubeletEmulator(plugin_dir) as emu:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a separate process, as in production
            [sys.executable, "-m", "agent.cli", "agent", "--config", str(config),
             "--plugin-dir", str(plugin_dir), "--pod-resources-socket", str(tmp_path / "none.sock"),
             "--state-dir", str(tmp_path / "state"),
             "--health-port", "0", "--log-format", "json"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            await emu.wait_registered("cpupool.io/mine", timeout=15)
            masks = await asyncio.to_thread(thread_masks, proc.pid)
            assert masks == {CpuSet(c for c in allowed if c != exclusive)}
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.to_thread(proc.communicate, timeout=15)
        assert '"event": "affinity.pinned"' in stderr


README = Path(__file__).parent.parent / "README.md"


def documented_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The README's metric table: name -> (type, label names)."""
    table = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`cpupool_"):
            labels = tuple(sorted(label.strip() for label in cells[2].split(",") if label.strip()))
            table[cells[0].strip("`")] = (cells[1], labels)
    return table


def test_every_metric_is_documented_with_its_type_and_labels() -> None:
    metrics = Metrics()
    exported = {
        series.name: (kind, series.labelnames)
        for series, kind in (
            (
                value,
                {CounterMetric: "counter", GaugeMetric: "gauge", HistogramMetric: "histogram"}[type(value)],
            )
            for value in vars(metrics).values()
            if isinstance(value, CounterMetric | GaugeMetric | HistogramMetric)
        )
    }
    assert exported == documented_metrics()


def test_metrics_render_what_was_counted_and_nothing_it_was_not() -> None:
    metrics = Metrics()
    # A metric without labels claims nothing until it has a value (0 would say "the kubelet does not count
    # pooled CPUs" before anyone looked).
    assert "cpupool_kubelet_counts_pooled_cpus " not in metrics.render()
    metrics.kubelet_counts_pooled_cpus.set(-1)
    metrics.nri_adjustments.inc(event="create", outcome="unmapped")
    metrics.nri_adjustments.inc(2, event="create", outcome="adjusted", kind="exclusive")
    metrics.nri_seconds.observe(0.0004, method="CreateContainer")
    metrics.devices.set(12, resource=FAST, health="healthy")
    metrics.devices.set(2, resource="cpupool.io/other", health="healthy")
    values = samples(metrics.render())
    assert values["cpupool_kubelet_counts_pooled_cpus", ()] == -1
    assert (
        values["cpupool_nri_adjustments_total", (("event", "create"), ("kind", ""), ("outcome", "unmapped"))]
        == 1
    )
    adjusted = (("event", "create"), ("kind", "exclusive"), ("outcome", "adjusted"))
    assert values["cpupool_nri_adjustments_total", adjusted] == 2
    assert (
        values[
            "cpupool_nri_request_duration_seconds_bucket", (("le", "0.0005"), ("method", "CreateContainer"))
        ]
        == 1
    )
    assert (
        values[
            "cpupool_nri_request_duration_seconds_bucket", (("le", "0.00025"), ("method", "CreateContainer"))
        ]
        == 0
    )
    assert metrics.nri_adjustments.get(event="create", outcome="unmapped") == 1
    assert metrics.nri_seconds.count(method="CreateContainer") == 1
    assert not any(name.endswith("_created") for name, _ in values)

    # A resource no longer served takes its series along, and only its own.
    metrics.forget_resource(FAST)
    values = samples(metrics.render())
    assert ("cpupool_devices", (("health", "healthy"), ("resource", FAST))) not in values
    assert values["cpupool_devices", (("health", "healthy"), ("resource", "cpupool.io/other"))] == 2
    metrics.devices.set(3, resource=FAST, health="healthy")
    assert samples(metrics.render())["cpupool_devices", (("health", "healthy"), ("resource", FAST))] == 3


def test_a_label_a_metric_does_not_have_is_refused_by_name() -> None:
    with pytest.raises(MetricLabelError, match="cpupool_allocations_total has no label pod"):
        Metrics().allocations.inc(resource=FAST, method="Allocate", result="ok", pod="web")


def test_a_series_resolved_once_counts_as_the_labelled_calls_do() -> None:
    """The admission path counts through series resolved once per resource: the same series, rendered the
    same, absent until first counted; a label the metric lacks is refused when the series is made."""
    metrics = Metrics()
    counted = metrics.allocations.series(resource=FAST, method="Allocate", result="ok")
    timed = metrics.allocation_seconds.series(resource=FAST, method="Allocate")
    assert "cpupool_allocations_total{" not in metrics.render()
    counted.inc()
    metrics.allocations.inc(resource=FAST, method="Allocate", result="ok")
    timed.observe(0.0002)
    metrics.allocation_seconds.observe(0.2, resource=FAST, method="Allocate")
    values = samples(metrics.render())
    labels = (("method", "Allocate"), ("resource", FAST))
    assert values["cpupool_allocations_total", (*labels[:1], ("resource", FAST), ("result", "ok"))] == 2
    assert values["cpupool_allocation_duration_seconds_bucket", (("le", "0.00025"), *labels)] == 1
    assert values["cpupool_allocation_duration_seconds_count", labels] == 2
    with pytest.raises(MetricLabelError, match="cpupool_allocations_total has no label pod"):
        metrics.allocations.series(resource=FAST, pod="web")


async def test_counting_starts_no_task_and_no_thread() -> None:
    """Nothing the agent does for a metric may wake anything up per allocation."""
    metrics = Metrics()
    tasks, threads = len(asyncio.all_tasks()), threading.active_count()
    for _ in range(1000):
        metrics.allocations.inc(resource=FAST, method="Allocate", result="ok")
        metrics.allocation_seconds.observe(0.0002, resource=FAST, method="Allocate")
    assert (len(asyncio.all_tasks()), threading.active_count()) == (tasks, threads)
    assert metrics.allocations.get(resource=FAST, method="Allocate", result="ok") == 1000


def test_label_values_that_need_escaping_parse_back_as_they_were() -> None:
    metrics = Metrics()
    awkward = 'a "quoted" back\\slash\nnewline'
    metrics.registered.set(1, resource=awkward)
    metrics.allocation_seconds.observe(7.0, resource=awkward, method="Allocate")
    values = samples(metrics.render())
    assert values["cpupool_resource_registered", (("resource", awkward),)] == 1
    # Above every bound: only +Inf counts it, and the sum keeps the value.
    labels = (("method", "Allocate"), ("resource", awkward))
    assert values["cpupool_allocation_duration_seconds_bucket", (("le", "0.1"), *labels)] == 0
    assert values["cpupool_allocation_duration_seconds_bucket", (("le", "+Inf"), *labels)] == 1
    assert values["cpupool_allocation_duration_seconds_sum", labels] == 7.0
