"""`make demo`: the real agent on this machine's CPUs, against the grpcio kubelet emulator.

Runs `cpupool agent` as its own process with a sample config built from this host's topology, in a temporary
plugin directory, then shows what the kubelet sees and what a container would receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from agent.cpuset import CpuSet
from agent.logs import setup_logging
from agent.topology import discover
from tests.emulator import KubeletEmulator


def sample_config(online: CpuSet, isolated: CpuSet) -> tuple[str, dict[str, CpuSet]]:
    """Exclusive pool: the isolated CPUs, else the upper half; shared pool: what is left but CPU 0 where
    possible (CPU 0 stays for the system)."""
    cpus = online.to_list()
    exclusive = isolated & online if isolated else CpuSet(cpus[len(cpus) // 2 :])
    rest = [c for c in cpus if c not in exclusive]
    shared = CpuSet(rest[1:] or rest[:1])
    pools = {"dedicated": exclusive}
    lines = [
        "resourceBaseName: cpupool.io",
        "pools:",
        f'  dedicated: {{cpus: "{exclusive.format()}", pooltype: exclusive}}',
    ]
    if shared:
        pools["shared"] = shared
        lines.append(f'  shared: {{cpus: "{shared.format()}", pooltype: shared}}')
    return "\n".join(lines) + "\n", pools


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def say(text: str = "") -> None:
    print(text, flush=True)


async def demo(workdir: Path) -> int:
    topology = discover("/")
    config_text, pools = sample_config(topology.online, topology.isolated)
    say(
        f"This machine: CPUs {topology.online.format()}, NUMA nodes {len(topology.numa_nodes())}, "
        f"isolated {topology.isolated.format() or 'none'}, "
        f"hyper-threading {'yes' if topology.hyperthreaded else 'no'}"
    )
    say("\nSample pool config:")
    say("  " + config_text.strip().replace("\n", "\n  "))

    plugin_dir = workdir / "device-plugins"
    plugin_dir.mkdir()
    config = workdir / "poolconfig.yaml"
    config.write_text(config_text)
    pod_resources = workdir / "pod-resources.sock"
    log_file = workdir / "agent.log"
    port = free_port()
    async with KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as kubelet:
        say(f"\nKubelet emulator (grpcio) serving {plugin_dir / 'kubelet.sock'}")
        started = time.monotonic()
        with log_file.open("w") as log:
            agent = subprocess.Popen(  # noqa: ASYNC220 - the agent is a separate process on purpose
                [
                    sys.executable, "-m", "agent.cli", "agent",
                    "--config", str(config), "--root", "/",
                    "--plugin-dir", str(plugin_dir), "--pod-resources-socket", str(pod_resources),
                    "--state-dir", str(plugin_dir.parent / "state"),
                    "--health-port", str(port), "--health-host", "127.0.0.1", "--log-format", "json",
                ],
                stderr=log,
            )  # fmt: skip
        try:
            say(f"Agent started: cpupool agent (pid {agent.pid}), log in {log_file}\n")
            for pool in pools:
                name = f"cpupool.io/{pool}"
                await kubelet.wait_registered(name, timeout=15)
                snap = await kubelet.wait_devices(name, timeout=15)
                options = snap.options
                preferred = bool(options and options.get_preferred_allocation_available)
                numa = sorted({n for d in snap.devices for n in (d.numa_nodes or ())})
                say(
                    f"  registered {name:<22} devices {snap.capacity:>6} (allocatable {snap.allocatable})"
                    f"  NUMA {numa or '-'}  preferred allocation {'on' if preferred else 'off'}"
                )
            say(f"  all registered in {time.monotonic() - started:.2f} s")

            say("\nA pod asks for 1 dedicated CPU and 500m of the shared pool:")
            dedicated = await kubelet.allocate("cpupool.io/dedicated", 1, pod="demo")
            say(f"  dedicated device(s) {list(dedicated.device_ids)}")
            env = dict(dedicated.envs)
            annotations = dict(dedicated.annotations)
            if "shared" in pools:
                shared = await kubelet.allocate("cpupool.io/shared", 500, pod="demo", container="main-shared")
                say(f"  shared devices: {len(shared.device_ids)} millicpus")
                env.update(shared.envs)
                annotations.update(shared.annotations)
            say("  the container's environment:")
            for key, value in sorted(env.items()):
                say(f"    {key}={value}")
            for key, value in sorted(annotations.items()):
                say(f"    annotation {key}: {value}")
            for spec in dedicated.devices:
                say(f"    device {spec.host_path} ({spec.permissions})")

            ready = json.loads(get(f"http://127.0.0.1:{port}/readyz"))
            say(f"\nHealth: /readyz ready={ready['ready']}")
            metrics = [
                line
                for line in get(f"http://127.0.0.1:{port}/metrics").splitlines()
                if line.startswith("cpupool_devices{")
            ]
            for line in metrics:
                say(f"  {line}")

            say("\nStopping the agent (SIGTERM)...")
            agent.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(agent.wait, 15)
            left = sorted(p.name for p in plugin_dir.iterdir() if p.name != "kubelet.sock")
            say(f"  exit code {code}; agent sockets left behind: {left or 'none'}")
            return 0 if code == 0 and not left else 1
        finally:
            if agent.poll() is None:
                agent.kill()
            with contextlib.suppress(OSError):
                pinned = [
                    json.loads(line) for line in log_file.read_text().splitlines() if "affinity" in line
                ]
                for entry in pinned[:1]:
                    say(f"  (the agent kept itself on housekeeping CPUs {entry.get('housekeeping_cpus')})")


def main() -> int:
    setup_logging("warning", "console")
    with tempfile.TemporaryDirectory(prefix="cpupool-demo-") as tmp:
        return asyncio.run(demo(Path(tmp)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
