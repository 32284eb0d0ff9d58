"""`cpupool agent` as a process with NRI on: flags, /enforcement, /readyz, metrics and `cpupool status`."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cpuset import CpuSet
from tests.emulator import KubeletEmulator
from tests.harness import POOLS, host_root
from tests.nriruntime import NriRuntime, PeerUnavailable, peer_binary

try:
    peer_binary()
except PeerUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

FAST = "cpupool.io/fast"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_json(port: int, path: str) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    raw = (await reader.read()).decode()
    writer.close()
    head, _, body = raw.partition("\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.startswith("{") else {"text": body}


async def test_agent_enforces_and_reports_cpusets(tmp_path: Path) -> None:
    root = host_root(tmp_path)
    (root / "var" / "lib" / "kubelet").mkdir(parents=True)
    (root / "var" / "lib" / "kubelet" / "config.yaml").write_text("cpuManagerPolicy: static\n")
    config = tmp_path / "poolconfig.yaml"
    config.write_text(POOLS)
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    pod_resources = tmp_path / "pr.sock"
    nri_socket = tmp_path / "nri.sock"
    port = free_port()
    async with (
        KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as emu,
        NriRuntime(nri_socket) as runtime,
    ):
        await runtime.start()
        proc = subprocess.Popen(  # noqa: ASYNC220 - a separate process, as in production
            [sys.executable, "-m", "agent.cli", "agent", "--config", str(config), "--root", str(root),
             "--plugin-dir", str(plugin_dir), "--pod-resources-socket", str(pod_resources),
             "--state-dir", str(tmp_path / "state"),
             "--nri-socket", str(nri_socket), "--nri-index", "42", "--no-pin-self",
             "--health-host", "127.0.0.1", "--health-port", str(port), "--log-format", "json"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            await emu.wait_devices(FAST, timeout=15)
            await runtime.wait_plugin(timeout=15)
            fast = await emu.allocate(FAST, 2, pod="db")
            await runtime.run_pod("p1", "db")
            # As a kubelet does: the Allocate answer's annotations become the container's annotations.
            created = await runtime.create("p1", "c1", annotations=fast.annotations)
            assert CpuSet.parse(created["cpus"]) == CpuSet(int(i) for i in fast.device_ids)

            status, report = await http_json(port, "/enforcement")
            assert status == 200
            assert report["containers"] == [
                {"id": "c1", "pod": "default/db", "container": "main", "kind": "exclusive",
                 "cpus": created["cpus"], "mems": "0"}
            ]  # fmt: skip
            assert report["nri"]["connected"] is True  # type: ignore[index]
            # Nothing reserved: the kubelet still counts the 22 pooled CPUs in allocatable cpu.
            assert report["kubelet_accounting"]["verdict"] == "counts_pooled"  # type: ignore[index]
            _, ready = await http_json(port, "/readyz")
            assert ready["nri"]["connected"] is True  # type: ignore[index]
            _, metrics = await http_json(port, "/metrics")
            text = str(metrics["text"])
            assert "cpupool_nri_connected 1" in text
            assert "cpupool_kubelet_counts_pooled_cpus 1" in text
            adjusted = 'cpupool_nri_adjustments_total{event="create",kind="exclusive",outcome="adjusted"} 1'
            assert adjusted in text

            shown = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "agent.cli", "status", "--plugin-dir", str(plugin_dir),
                 "--pod-resources-socket", str(pod_resources), "--agent-url", f"http://127.0.0.1:{port}"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert "NRI: connected, policy strict" in shown.stdout
            assert "kubelet CPU accounting: counts_pooled" in shown.stdout
            enforced = shown.stdout.split("ENFORCED CPUSET", 1)[1].splitlines()
            row = next(line for line in enforced if line.startswith("default/db"))
            assert row.split()[-2:] == ["exclusive", created["cpus"]]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.to_thread(proc.communicate, timeout=15)
        assert '"event": "kubelet.counts_pooled_cpus"' in stderr
        assert '"event": "nri.synchronized"' in stderr


async def test_no_nri_serves_the_device_plugin_and_says_enforcement_is_off(tmp_path: Path) -> None:
    config = tmp_path / "poolconfig.yaml"
    config.write_text(POOLS)
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    port = free_port()
    async with KubeletEmulator(plugin_dir, pod_resources_socket=tmp_path / "pr.sock") as emu:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a separate process, as in production
            [sys.executable, "-m", "agent.cli", "agent", "--config", str(config),
             "--root", str(host_root(tmp_path)), "--plugin-dir", str(plugin_dir),
             "--pod-resources-socket", str(tmp_path / "pr.sock"), "--state-dir", str(tmp_path / "state"),
             "--no-nri", "--nri-socket", str(tmp_path / "nri.sock"), "--no-pin-self",
             "--health-host", "127.0.0.1", "--health-port", str(port), "--log-format", "json"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            await emu.wait_devices(FAST, timeout=15)
            await emu.wait_for(lambda: _answers(port), what="the health port")
            # The accounting check starts once the first lists have gone out, after the health port: wait
            # for its first report.
            async with asyncio.timeout(15):
                while True:
                    _, report = await http_json(port, "/enforcement")
                    if report["kubelet_accounting"] is not None:
                        break
                    await asyncio.sleep(0.05)
            assert report["nri"] == {"enabled": False} and report["containers"] == []
            # No kubelet config under this root: the accounting is unknown, with the file named.
            accounting = report["kubelet_accounting"]
            assert accounting["verdict"] == "unknown"  # type: ignore[index]
            assert "config.yaml" in accounting["detail"]  # type: ignore[index]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.to_thread(proc.communicate, timeout=15)
        assert '"event": "nri.disabled"' in stderr and "nri.unavailable" not in stderr


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
