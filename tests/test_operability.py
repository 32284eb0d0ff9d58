"""Health, readiness and metrics over HTTP, and the agent keeping itself off the CPUs it hands out."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import parse_config, validate
from agent.cpuset import CpuSet
from agent.health import serve_health
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
            lines = metrics.splitlines()
            assert 'cpupool_resource_registered{resource="cpupool.io/fast"} 1' in lines
            assert 'cpupool_devices{health="healthy",resource="cpupool.io/fast"} 12' in lines
            assert 'cpupool_listandwatch_streams{resource="cpupool.io/fast"} 1' in lines
            assert 'cpupool_config_reloads_total{result="error"} 1' in lines
            assert "cpupool_config_generation 1" in lines
            labels = 'method="Allocate",resource="cpupool.io/fast"'
            assert any(
                line.startswith(f"cpupool_allocation_duration_seconds_count{{{labels}}} ") for line in lines
            )
            labels = 'method="GetPreferredAllocation",resource="cpupool.io/fast",result="ok"'
            assert f"cpupool_allocations_total{{{labels}}} 1" in lines
            assert "# TYPE cpupool_allocation_duration_seconds histogram" in lines
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)


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
