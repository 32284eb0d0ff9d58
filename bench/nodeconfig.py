"""Per-node configs, live: a Node relabelled in a real API server -> the new list on the kubelet's stream,
and a webhook config edit -> the new rules in force."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from pathlib import Path

from agent.nodelabels import NodeLabelWatch
from agent.supervisor import AgentSettings, Supervisor
from agent.webhook import ConfigStore
from bench.agentproc import AgentProcess
from bench.report import Figure, Target
from bench.stats import summary_ms
from tests.emulator import KubeletEmulator
from tests.harness import host_root
from tests.peers.apiserver import ControlPlane, find_or_build_apiserver
from tests.peers.build import PeerBuildError, PeerUnavailable
from tests.test_nodeconfig_agent import BIG, EDGE, FALLBACK, ConfigMapFiles

DEDICATED = "cpupool.io/dedicated"
# Healthy devices of "dedicated" under each group's file (tests/test_nodeconfig_agent.py).
DEVICES = {"big": 6, "edge": 2}


async def relabel_figure(workdir: Path, relabels: int) -> Figure:
    """`kubectl label node` (a merge patch through the API server) -> the new list on the open stream."""
    key, title = (
        "relabel_latency",
        f"Relabel: Node label patched -> new list on the kubelet's stream ({relabels})",
    )
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    try:
        binary = await asyncio.to_thread(find_or_build_apiserver)
    except (PeerUnavailable, PeerBuildError) as exc:
        return Figure(key, title, {}, [Target("p99_ms", 1000.0, "ms")], [f"not measured: {exc}"])
    with ControlPlane.start(binary, workdir / "control-plane") as plane:
        node = f"bench-{secrets.token_hex(3)}"
        plane.admin.create_node(node, {"node-group": "edge"})
        samples = await _relabels(workdir, plane, node, relabels)
    return Figure(
        key,
        title,
        summary_ms(samples),
        [Target("p99_ms", 1000.0, "ms")],
        [
            "timed from just before the PATCH of the Node's labels (admin client, loopback kube-apiserver "
            "and etcd of tests/apiserver) to the emulator's receive stamp of the list; the agent runs in "
            "this process, reading the Node through lightkube (get, then a watch from its resourceVersion)",
            "each relabel switches the node between two groups' files (2 and 6 devices)",
        ],
    )


async def _relabels(workdir: Path, plane: ControlPlane, node: str, relabels: int) -> list[float]:
    plugin_dir = workdir / "device-plugins"
    plugin_dir.mkdir()
    pod_resources = workdir / "pod-resources" / "kubelet.sock"
    pod_resources.parent.mkdir()
    config = ConfigMapFiles(workdir / "config")
    config.write({"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE, "poolconfig.yaml": FALLBACK})
    kubeconfig = plane.kubeconfig(workdir / "kubeconfig")
    settings = AgentSettings(
        config_path=config.path,
        root=host_root(workdir),
        plugin_dir=plugin_dir,
        pod_resources_socket=pod_resources,
        pin_self=False,
        state_dir=workdir / "state",
        kubelet_settle_s=0.0,
    )
    rng = random.Random(12)
    samples: list[float] = []
    async with KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as emu:
        supervisor = Supervisor(settings)

        def client() -> object:
            from lightkube import AsyncClient  # noqa: PLC0415
            from lightkube.config.kubeconfig import KubeConfig  # noqa: PLC0415

            return AsyncClient(config=KubeConfig.from_file(kubeconfig), trust_env=False)

        watch = NodeLabelWatch(node, lambda: supervisor.notify("config"), client_factory=client)  # type: ignore[arg-type]
        supervisor.node_labels = watch
        tasks = [asyncio.create_task(supervisor.run()), asyncio.create_task(watch.run())]
        try:
            await emu.wait_devices(DEDICATED, lambda s: s.stream_open and len(s.healthy_ids) == 2, timeout=30)
            for i in range(relabels):
                group = "big" if i % 2 == 0 else "edge"
                started = time.monotonic()
                await asyncio.to_thread(plane.admin.label_node, node, {"node-group": group})

                def arrived(since: float = started, count: int = DEVICES[group]) -> bool:
                    return any(
                        r.resource == DEDICATED and r.at >= since and r.healthy_count == count
                        for r in emu.list_and_watch_messages[-5:]
                    )

                await emu.wait_for(arrived, timeout=10, what=f"the {group} list")
                record = next(
                    r
                    for r in reversed(emu.list_and_watch_messages)
                    if r.resource == DEDICATED and r.healthy_count == DEVICES[group]
                )
                samples.append(record.at - started)
                await asyncio.sleep(0.05 + rng.random() * 0.05)
        finally:
            supervisor.stop()
            tasks[1].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return samples


async def webhook_reload_figure(workdir: Path, edits: int) -> Figure:
    """A ConfigMap swap of the webhook's config directory -> the new settings in force for the next review."""
    config = ConfigMapFiles(workdir / "webhook-config")
    base = {"poolconfig.yaml": FALLBACK, "poolconfig-big.yaml": BIG}
    config.write(base)
    store = ConfigStore(config.path)
    watcher = asyncio.create_task(store.watch(recheck_seconds=30))
    await asyncio.sleep(0.2)  # the watch is in place
    rng = random.Random(13)
    samples: list[float] = []
    try:
        for i in range(edits):
            cpus = f"2-{3 + i % 4}"
            generation = store.generation
            started = time.monotonic()
            config.write(
                {**base, "poolconfig-big.yaml": BIG.replace('"2-7"', f'"{cpus}"') if i % 2 else BIG + "\n"}
            )
            while store.generation == generation:
                if time.monotonic() - started > 10:
                    raise TimeoutError(f"webhook edit {i} not loaded in 10 s")
                await asyncio.sleep(0.001)
            samples.append(time.monotonic() - started)
            await asyncio.sleep(0.05 + rng.random() * 0.05)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return Figure(
        "webhook_config_reload_latency",
        f"Webhook: ConfigMap ..data swap -> new rules in force ({edits} edits)",
        summary_ms(samples),
        [Target("p99_ms", 1000.0, "ms")],
        [
            "timed from just before the swap to the first moment the webhook's ConfigStore holds the new "
            "settings (polled every 1 ms); includes watchfiles' grouping of the swap's events (20 ms steps)"
        ],
    )


THREE_POOLS = """\
nodeSelector: {node-group: big}
pools:
  dedicated: {cpus: "2-7", pooltype: exclusive}
  multi: {cpus: "8-11,24-27", pooltype: exclusive, hyperThreadingPolicy: multiThreaded}
  shared: {cpus: "12-13", pooltype: shared}
"""
THREE_RESOURCES = ("cpupool.io/dedicated", "cpupool.io/multi", "cpupool.io/shared")


async def labels_rss_figure(workdir: Path) -> Figure:
    """RSS of the agent process serving three pools of a node group's file: labels from the API (lightkube
    loaded, the Node watched) against labels from --node-labels (no client)."""
    key, title = (
        "agent_rss_node_labels",
        "Agent RSS, 3 pools chosen by node labels: from the API vs --node-labels",
    )
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    try:
        binary = await asyncio.to_thread(find_or_build_apiserver)
    except (PeerUnavailable, PeerBuildError) as exc:
        return Figure(key, title, {}, [], [f"not measured: {exc}"])
    values: dict[str, float] = {}
    with ControlPlane.start(binary, workdir / "control-plane") as plane:
        node = f"bench-{secrets.token_hex(3)}"
        plane.admin.create_node(node, {"node-group": "big"})
        kubeconfig = plane.kubeconfig(workdir / "kubeconfig")
        for mode in ("api", "flag"):
            rss_mib, tls_mib = await _agent_rss(workdir / mode, node, kubeconfig, mode)
            values[f"rss_mib_{mode}"] = rss_mib
            if mode == "api":
                values["tls_libraries_mib_api"] = tls_mib
    values["client_mib"] = round(values["rss_mib_api"] - values["rss_mib_flag"], 1)
    return Figure(
        key,
        title,
        values,
        [],
        [
            "VmRSS of `cpupool agent` (separate process, dual32 fake host) once all three pools are "
            "registered; api: NODE_NAME and KUBECONFIG set, the agent reads and watches its Node through "
            "lightkube; flag: --node-labels node-group=big, the client never imported. The RSS target "
            "itself is issue 14's (agent_rss)",
            "tls_libraries_mib_api: the resident pages of libcrypto, libssl and _ssl in the api agent "
            "(/proc/PID/smaps; mostly shared clean text), a floor any TLS client in the process pays; "
            "docs/nodeconfig.md has the rest of client_mib item by item",
        ],
    )


def tls_libraries_kib(pid: int) -> int:
    """Resident KiB of OpenSSL's libraries and CPython's _ssl module in process `pid`."""
    total, counting = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if not first.endswith(":"):  # a mapping's header line: address range, perms, ..., path
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            name = path.rsplit("/", 1)[-1]
            counting = name.startswith(("libcrypto.so", "libssl.so", "_ssl."))
        elif counting and first == "Rss:":
            total += int(line.split()[1])
    return total


async def _agent_rss(workdir: Path, node: str, kubeconfig: Path, mode: str) -> tuple[float, float]:
    """The agent's VmRSS and its TLS libraries' share, both in MiB, once its three pools are served."""
    await asyncio.to_thread(workdir.mkdir, parents=True)
    plugin_dir = workdir / "device-plugins"
    await asyncio.to_thread(plugin_dir.mkdir)
    pod_resources = workdir / "pod-resources.sock"
    config = ConfigMapFiles(workdir / "config")
    config.write({"poolconfig-big.yaml": THREE_POOLS, "poolconfig.yaml": FALLBACK})
    agent = AgentProcess(
        root=host_root(workdir),
        plugin_dir=plugin_dir,
        config=config.path,
        pod_resources=pod_resources,
        log_path=workdir / "agent.log",
    )
    agent.argv += ["--no-nri"] + (["--node-labels", "node-group=big"] if mode == "flag" else [])
    saved = {name: os.environ.get(name) for name in ("NODE_NAME", "KUBECONFIG")}
    os.environ.update({"NODE_NAME": node, "KUBECONFIG": str(kubeconfig)})
    try:
        async with KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as emu, agent:
            for resource in THREE_RESOURCES:
                await emu.wait_devices(resource, timeout=60)
            await asyncio.sleep(1.0)  # start-up settles (the watch is open, logs written)
            tls_kib = await asyncio.to_thread(tls_libraries_kib, agent.pid)
            return round(agent.rss_kib() / 1024, 1), round(tls_kib / 1024, 1)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
