"""The agent choosing its node group's pools by its Node's labels, read from a real API server.

The chart is installed with `helm install` (node groups, so the agent's ServiceAccount gets the chart's
ClusterRole) into the kube-apiserver of tests/apiserver. The agent then runs as the DaemonSet would run it:
the real `cpupool agent` process, with the container's command line from the chart (its mounts pointed at
local stand-ins: the pool ConfigMap projected from the API server, a fake host's sysfs, the kubelet
emulator's directories), NODE_NAME as the downward API sets it, and a token of the chart's ServiceAccount
from the TokenRequest API. Relabels are made through the API server, as `kubectl label node` makes them;
what counts is the device list the kubelet gets.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.emulator import KubeletEmulator, ResourceSnapshot
from tests.harness import host_root
from tests.peers.apiserver import ControlPlane, Doc, HelmCLI, KubeAPI
from tests.peers.incluster import REPO, ProjectedVolume, localize_args

CHART = REPO / "charts" / "cpupool"
RELEASE = "agent"
NAMESPACE = "cpupool-agent"
DEDICATED = "cpupool.io/dedicated"
# Two node groups and a fallback, on the fake host's CPUs (tests/fixtures/sysfs/dual32).
VALUES: dict[str, Any] = {
    "pools": {"dedicated": {"cpus": "20", "pooltype": "exclusive"}, "isolcpus": None},
    "nodeGroups": {
        "big": {
            "nodeSelector": {"node-group": "big"},
            "pools": {"dedicated": {"cpus": "2-7", "pooltype": "exclusive"}},
        },
        "edge": {
            "nodeSelector": {"node-group": "edge"},
            "pools": {"dedicated": {"cpus": "18-19", "pooltype": "exclusive"}},
        },
    },
    # Only the agent here: no webhook configuration to reach other tests' pods, no runtime to talk to.
    "webhook": {"enabled": False},
    "nri": {"enabled": False},
}
BIG = {str(cpu) for cpu in range(2, 8)}
EDGE = {"18", "19"}
FALLBACK = {"20"}
# Bounds on waits for the agent, not speed claims (those are in `make bench`): the machine is shared.
WAIT_S = 30.0


@pytest.fixture(scope="module")
def cluster_helm(
    kube_apiserver: ControlPlane, helm_cli: str, tmp_path_factory: pytest.TempPathFactory
) -> HelmCLI:
    home = tmp_path_factory.mktemp("helm-agent")
    return HelmCLI(helm_cli, kube_apiserver.kubeconfig(home / "kubeconfig"), home)


@pytest.fixture(scope="module")
def manifest(cluster_helm: HelmCLI) -> Iterator[list[Doc]]:
    cluster_helm.install(RELEASE, CHART, NAMESPACE, VALUES)
    try:
        yield cluster_helm.manifest(RELEASE, NAMESPACE)
    finally:
        cluster_helm.uninstall(RELEASE, NAMESPACE)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths are limited to 107 bytes and pytest's directories can be long.
    path = Path(tempfile.mkdtemp(prefix="api-agent-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _one(docs: list[Doc], kind: str) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"the release has {len(found)} objects of kind {kind}, expected one"
    return found[0]


@dataclass
class Agent:
    emu: KubeletEmulator
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _environment(container: Doc, node: str, kubeconfig: Path) -> dict[str, str]:
    """The container's environment as the kubelet would give it, plus API access through a kubeconfig (a
    pod would use its projected token and the KUBERNETES_SERVICE_* variables instead)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE_")}
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if source == "spec.nodeName":
            env[entry["name"]] = node
        elif "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            pytest.fail(f"the agent's env entry {entry} has a source this test does not provide")
    env["KUBECONFIG"] = str(kubeconfig)
    return env


@asynccontextmanager
async def running_agent(
    plane: ControlPlane, manifest: list[Doc], node: str, directory: Path
) -> AsyncIterator[Agent]:
    """`cpupool agent` as the chart's DaemonSet runs it on `node`, against the kubelet emulator."""
    api = plane.admin
    pod = _one(manifest, "DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    account = pod["serviceAccountName"]
    assert pod.get("automountServiceAccountToken") is True, "the agent's pod gets no token to read its Node"
    config = ProjectedVolume(directory / "config")
    config.project_configmap(api, NAMESPACE, _one(manifest, "ConfigMap")["metadata"]["name"])
    plugin_dir = directory / "device-plugins"
    pod_resources = directory / "pod-resources"
    for path in (plugin_dir, pod_resources, directory / "state", directory / "nri"):
        path.mkdir()
    args = localize_args(
        container["args"],
        {
            "/etc/cpupool": config.path,
            "/host": host_root(directory),
            "/var/lib/kubelet/device-plugins": plugin_dir,
            "/var/lib/kubelet/pod-resources": pod_resources,
            "/var/lib/cpupool": directory / "state",
            "/var/run/nri": directory / "nri",
        },
    )
    token = await asyncio.to_thread(api.token_for, NAMESPACE, account)
    env = _environment(container, node, plane.kubeconfig(directory / "kubeconfig", token))
    log = directory / "agent.log"
    async with KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources / "kubelet.sock") as emu:
        with log.open("ab") as out:
            # Health on no port (the pod's would be on every interface) and no moving of this test process's
            # CPU affinity: the rest is the chart's command line.
            process = subprocess.Popen(  # noqa: ASYNC220 - the agent is its own process, as in the pod
                [sys.executable, "-m", "agent.cli", *args, "--health-port=0", "--no-pin-self"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            yield Agent(emu, process, log)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


def _lists(ids: set[str]) -> Any:
    def check(snap: ResourceSnapshot) -> bool:
        return snap.stream_open and {d.id for d in snap.devices} == ids

    return check


async def _wait_log(agent: Agent, *needles: str) -> str:
    """The first line of the agent's log holding every needle (the agent says why in its log)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        for line in agent.log_text().splitlines():
            if all(n in line for n in needles):
                return line
        code = agent.process.poll()
        assert code is None, f"the agent exited with {code}:\n{agent.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no log line with {needles}:\n{agent.log_text()[-3000:]}"
        await asyncio.sleep(0.1)


async def _node(api: KubeAPI, group: str) -> str:
    name = f"{group}-{secrets.token_hex(3)}"
    await asyncio.to_thread(api.create_node, name, {"node-group": group})
    return name


async def test_the_agent_serves_its_groups_pools_and_follows_a_relabel(
    kube_apiserver: ControlPlane, manifest: list[Doc], short_dir: Path
) -> None:
    api = kube_apiserver.admin
    node = await _node(api, "big")
    async with running_agent(kube_apiserver, manifest, node, short_dir) as agent:
        await agent.emu.wait_devices(DEDICATED, _lists(BIG), timeout=WAIT_S)
        registrations = len(agent.emu.registrations)

        await asyncio.to_thread(api.label_node, node, {"node-group": "edge"})
        await agent.emu.wait_devices(DEDICATED, _lists(EDGE), timeout=WAIT_S)
        # No group matches a node without the label: the fallback file.
        await asyncio.to_thread(api.label_node, node, {"node-group": None})
        await agent.emu.wait_devices(DEDICATED, _lists(FALLBACK), timeout=WAIT_S)

        # Every list went on the open stream: the kubelet never saw the resource go away.
        assert len(agent.emu.registrations) == registrations
        assert not [end for end in agent.emu.stream_ends if end.resource == DEDICATED]


async def test_without_the_charts_rbac_the_agent_says_why_and_recovers_once_it_is_applied(
    kube_apiserver: ControlPlane, manifest: list[Doc], short_dir: Path
) -> None:
    api = kube_apiserver.admin
    binding = _one(manifest, "ClusterRoleBinding")
    path = api.path_for(binding)
    await asyncio.to_thread(api.call, "DELETE", path)
    try:
        node = await _node(api, "big")
        async with running_agent(kube_apiserver, manifest, node, short_dir) as agent:
            line = await _wait_log(agent, "nodelabels.unavailable", "403")
            assert "get and watch on nodes" in line
            # Labels unknown: nothing served rather than the fallback, which may be the wrong node's CPUs.
            assert agent.emu.resource(DEDICATED) is None

            # Applied late, as a GitOps tool may order it: the agent retries and serves its group's pools.
            await asyncio.to_thread(api.apply, binding)
            await agent.emu.wait_devices(DEDICATED, _lists(BIG), timeout=WAIT_S)
    finally:
        await asyncio.to_thread(api.apply, binding)
