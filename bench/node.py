"""A benchmark node: the fake host, its ConfigMap volume, the kubelet emulator and the agent process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.agentproc import AgentProcess
from tests.emulator import KubeletEmulator
from tests.harness import ConfigMapDir


@dataclass
class Node:
    root: Path
    plugin_dir: Path
    configmap: ConfigMapDir
    emu: KubeletEmulator
    agent: AgentProcess
    resources: tuple[str, ...]
    # time.monotonic() at spawn, and when every resource had registered and sent its list.
    spawned_at: float
    ready_at: float

    def socket(self, resource: str) -> Path:
        return self.plugin_dir / f"cpupool-{resource.split('/', 1)[1]}.sock"

    def serving(self, resource: str, since: float | None = None) -> bool:
        """Registered (by a Register that arrived at or after `since`), stream open, a list received."""
        snap = self.emu.resource(resource)
        if snap is None or not (snap.registered and snap.stream_open and snap.lists_received > 0):
            return False
        if since is None:
            return True
        accepted = [r.at for r in self.emu.registrations if r.resource == resource and r.accepted]
        return bool(accepted) and accepted[-1] >= since

    async def wait_ready(self, timeout_s: float = 30.0, since: float | None = None) -> float:
        """Wait until every resource is served (see `serving`) and return when; fails if the agent dies."""

        def ready() -> bool:
            self.agent.check_alive()
            return all(self.serving(name, since) for name in self.resources)

        await self.emu.wait_for(ready, timeout=timeout_s, what="every resource registered, with its list")
        return time.monotonic()


@asynccontextmanager
async def running_node(
    workdir: Path,
    make_host: Callable[[Path], Path],
    config: str,
    resources: tuple[str, ...],
) -> AsyncIterator[Node]:
    """Spawn `cpupool agent` on a fake host against a kubelet emulator and wait until it serves."""
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up before anything runs
    root = make_host(workdir / "host")
    plugin_dir = workdir / "device-plugins"
    plugin_dir.mkdir()
    pod_resources = workdir / "pod-resources.sock"
    configmap = ConfigMapDir(workdir / "config")
    configmap.write(config)
    agent = AgentProcess(
        root=root,
        plugin_dir=plugin_dir,
        config=configmap.file,
        pod_resources=pod_resources,
        log_path=workdir / "agent.log",
    )
    async with KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as emu:
        spawned = time.monotonic()
        async with agent:
            node = Node(root, plugin_dir, configmap, emu, agent, resources, spawned, spawned)
            node.ready_at = await node.wait_ready()
            yield node
