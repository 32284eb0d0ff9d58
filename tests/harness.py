"""Running the real agent (in this process, on its own tasks) against the grpcio kubelet emulator."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.supervisor import AgentSettings, Supervisor
from tests.emulator import KubeletEmulator
from tests.peers import KubeletPeer

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"

# dual32: 2 sockets / 2 NUMA nodes, 16 cores with 2 threads each (siblings n and n+16), isolated 2-7,18-23.
POOLS = """
resourceBaseName: cpupool.io
pools:
  fast:   {cpus: "2-7,18-23", pooltype: exclusive}
  multi:  {cpus: "8-11,24-27", pooltype: exclusive, hyperThreadingPolicy: multiThreaded}
  shared: {cpus: "12-13", pooltype: shared}
"""


class ConfigMapDir:
    """A directory written the way the kubelet writes a ConfigMap volume: a timestamped data directory,
    `..data` pointing at it, and the visible file a symlink through `..data`. Updates swap `..data`."""

    def __init__(self, path: Path, filename: str = "poolconfig.yaml") -> None:
        self.path = path
        self.filename = filename
        self._serial = 0
        path.mkdir(parents=True, exist_ok=True)

    @property
    def file(self) -> Path:
        return self.path / self.filename

    def write(self, text: str) -> None:
        self._serial += 1
        data_dir = self.path / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self._serial:06d}"
        data_dir.mkdir()
        (data_dir / self.filename).write_text(text)
        data = self.path / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.path / "..data_tmp"
        tmp.symlink_to(data_dir.name)
        os.replace(tmp, data)
        if not self.file.is_symlink():
            self.file.symlink_to(f"..data/{self.filename}")
        if old is not None:
            shutil.rmtree(self.path / old)


@dataclass
class Running:
    root: Path
    plugin_dir: Path
    pod_resources: Path
    configmap: ConfigMapDir
    emu: KubeletEmulator | KubeletPeer
    """The kubelet: the grpcio emulator or the real device manager (tests/kubeletpeer), as the test asked."""
    supervisor: Supervisor
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.supervisor.stop()
        await asyncio.wait_for(self.task, 10)


def host_root(tmp_path: Path, fixture: str = "dual32", cpuid: tuple[int, ...] = ()) -> Path:
    """A copy of a fake sysfs tree, with /dev/cpu/<n>/cpuid files for the listed CPUs."""
    root = tmp_path / "host"
    shutil.copytree(FIXTURES / fixture, root, symlinks=True)
    for cpu in cpuid:
        node = root / "dev" / "cpu" / str(cpu)
        node.mkdir(parents=True, exist_ok=True)
        (node / "cpuid").write_text("")
    return root


@asynccontextmanager
async def running_agent(
    tmp_path: Path,
    config: str | None = POOLS,
    *,
    root: Path | None = None,
    kubelet: bool = True,
    recheck_interval_s: float = 30.0,
    peer: str = "emulator",
) -> AsyncIterator[Running]:
    """The agent serving `config` (None: no config file) to a kubelet in tmp_path.

    `peer` picks the kubelet: "emulator" (grpcio, kubelet v1.37 behaviour), "emulator-1.36" (the emulator
    with the registration behaviour of kubelets v1.34 to v1.36) or "kubelet" (the kubelet's own device manager
    from tests/kubeletpeer; take the `kubelet_peer_binary` fixture too: it skips where Go is missing)."""
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir(exist_ok=True)
    pod_resources = tmp_path / "pod-resources" / "kubelet.sock"
    pod_resources.parent.mkdir(exist_ok=True)
    configmap = ConfigMapDir(tmp_path / "config")
    if config is not None:
        configmap.write(config)
    settings = AgentSettings(
        config_path=configmap.file if config is not None else None,
        root=root or host_root(tmp_path),
        plugin_dir=plugin_dir,
        pod_resources_socket=pod_resources,
        pin_self=False,
        recheck_interval_s=recheck_interval_s,
        state_dir=tmp_path / "state",
        # Our kubelets list their pods in PodResources at once after a restart; the settle time has its own
        # test.
        kubelet_settle_s=0.0,
        answer_confirm_s=0.1,
    )
    emu: KubeletEmulator | KubeletPeer
    if peer == "kubelet":
        emu = KubeletPeer(plugin_dir, pod_resources_socket=pod_resources, autostart=kubelet)
    elif peer in ("emulator", "emulator-1.36"):
        release = "1.36" if peer == "emulator-1.36" else "1.37"
        emu = KubeletEmulator(
            plugin_dir, pod_resources_socket=pod_resources, autostart=kubelet, release=release
        )
    else:
        raise ValueError(f"unknown kubelet peer {peer!r}: emulator, emulator-1.36 or kubelet")
    async with emu:
        supervisor = Supervisor(settings)
        task = asyncio.create_task(supervisor.run())
        running = Running(settings.root, plugin_dir, pod_resources, configmap, emu, supervisor, task)
        try:
            yield running
        finally:
            if not task.done():
                await running.stop()
            else:
                task.result()
