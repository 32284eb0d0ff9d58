"""The agent follows its Node's labels in a real API server (tests/apiserver), authenticating as the chart's
ServiceAccount with only the chart's RBAC: a relabel changes the pools on the kubelet's open stream, through
the same reload path as a ConfigMap edit."""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.nodelabels import NodeLabelWatch
from agent.supervisor import AgentSettings, Supervisor
from tests.emulator import KubeletEmulator, ResourceSnapshot
from tests.harness import host_root
from tests.peers.apiserver import ControlPlane, Doc, HelmCLI, KubeAPI
from tests.test_nodeconfig_agent import BIG, EDGE, FALLBACK, ConfigMapFiles

CHART = Path(__file__).resolve().parent.parent / "charts" / "cpupool"
NAMESPACE = "cpupool-nodelabels"
RELEASE = "labels"
DEDICATED = "cpupool.io/dedicated"
NODE_GROUPS = {
    "big": {
        "nodeSelector": {"node-group": "big"},
        "pools": {"dedicated": {"cpus": "2-7", "pooltype": "exclusive"}},
    },
}


@dataclass
class Account:
    """The chart's ServiceAccount with the chart's RBAC applied, and a token of it."""

    kubeconfig: Path
    api: KubeAPI


@pytest.fixture(scope="module")
def agent_account(
    kube_apiserver: ControlPlane, helm_cli: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Account]:
    home = tmp_path_factory.mktemp("nodelabels")
    helm = HelmCLI(helm_cli, kube_apiserver.kubeconfig(home / "admin-kubeconfig"), home)
    admin = kube_apiserver.admin
    admin.create_namespace(NAMESPACE)
    rendered = helm.template(RELEASE, CHART, NAMESPACE, {"nodeGroups": NODE_GROUPS})
    rbac: list[Doc] = [
        d for d in rendered if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
    ]
    assert {d["kind"] for d in rbac} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for doc in rbac:
        admin.apply(doc, NAMESPACE if doc["kind"] == "ServiceAccount" else None)
    (account,) = [d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"]
    token = admin.token_for(NAMESPACE, account)
    yield Account(kube_apiserver.kubeconfig(home / "agent-kubeconfig", token), kube_apiserver.client(token))
    # Cluster-scoped grants outlive the namespace: remove them for the other tests of the run.
    for doc in rbac:
        if doc["kind"] != "ServiceAccount":
            admin.call("DELETE", admin.path_for(doc))


@pytest.fixture
def node(kube_apiserver: ControlPlane) -> Iterator[str]:
    name = f"node-{secrets.token_hex(4)}"
    kube_apiserver.admin.create_node(name, {"node-group": "edge"})
    yield name
    kube_apiserver.admin.call("DELETE", f"/api/v1/nodes/{name}")


def test_the_agents_account_reads_nodes_and_nothing_else(agent_account: Account, node: str) -> None:
    api = agent_account.api
    assert api.can_i("get", "nodes", name=node) and api.can_i("watch", "nodes", name=node)
    assert not api.can_i("update", "nodes", name=node) and not api.can_i("patch", "nodes", name=node)
    assert not api.can_i("list", "pods") and not api.can_i("get", "secrets", namespace=NAMESPACE)


@dataclass
class Agent:
    emu: KubeletEmulator
    supervisor: Supervisor
    watch: NodeLabelWatch


@asynccontextmanager
async def agent_following(
    tmp_path: Path, node: str, service_account_dir: Path | None = None
) -> AsyncIterator[Agent]:
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir()
    pod_resources = tmp_path / "pod-resources" / "kubelet.sock"
    pod_resources.parent.mkdir()
    config = ConfigMapFiles(tmp_path / "config")
    config.write({"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE, "poolconfig.yaml": FALLBACK})
    settings = AgentSettings(
        config_path=config.path,
        root=host_root(tmp_path),
        plugin_dir=plugin_dir,
        pod_resources_socket=pod_resources,
        pin_self=False,
        state_dir=tmp_path / "state",
        kubelet_settle_s=0.0,
    )
    async with KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as emu:
        supervisor = Supervisor(settings)
        watch = NodeLabelWatch(
            node,
            lambda: supervisor.notify("config"),
            service_account_dir=service_account_dir or tmp_path / "no-service-account",
        )
        supervisor.node_labels = watch
        tasks = [asyncio.create_task(supervisor.run()), asyncio.create_task(watch.run())]
        try:
            yield Agent(emu, supervisor, watch)
        finally:
            supervisor.stop()
            tasks[1].cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


def lists(snap: ResourceSnapshot, ids: set[str]) -> bool:
    return snap.stream_open and {d.id for d in snap.devices} == ids


async def test_a_relabel_in_the_api_changes_the_pools_on_the_open_stream(
    kube_apiserver: ControlPlane,
    agent_account: Account,
    node: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Outside a pod: the client finds the API through KUBECONFIG, with the agent's own token.
    monkeypatch.setenv("KUBECONFIG", str(agent_account.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    admin = kube_apiserver.admin
    async with agent_following(tmp_path, node) as agent:
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"18", "19"}), timeout=30)
        registrations = len(agent.emu.registrations)
        await asyncio.to_thread(admin.label_node, node, {"node-group": "big"})
        await agent.emu.wait_devices(
            DEDICATED, lambda s: lists(s, {"2", "3", "4", "5", "6", "7"}), timeout=10
        )
        # The label removed: no group matches, the fallback.
        await asyncio.to_thread(admin.label_node, node, {"node-group": None})
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"20"}), timeout=10)
        assert len(agent.emu.registrations) == registrations
        assert not [e for e in agent.emu.stream_ends if e.resource == DEDICATED]
        assert agent.watch.changes == 3


async def test_without_rights_the_agent_says_why_and_keeps_waiting(
    kube_apiserver: ControlPlane, node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A token of an account with no RBAC at all: 403, explained, retried; nothing served meanwhile.
    kube_apiserver.admin.create_namespace(NAMESPACE)
    token = kube_apiserver.admin.token_for(NAMESPACE, "default")
    monkeypatch.setenv("KUBECONFIG", str(kube_apiserver.kubeconfig(tmp_path / "kubeconfig", token)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with agent_following(tmp_path, node) as agent:
        await agent.emu.wait_for(
            lambda: (
                "may not read Node" in (agent.supervisor.last_config_error or "")
                or "may not read Node" in agent.watch.unknown_reason
            ),
            timeout=30,
            what="the 403 to be explained",
        )
        assert "get and watch on nodes" in agent.watch.unknown_reason
        assert agent.emu.resource(DEDICATED) is None


async def test_in_a_pod_the_agent_uses_its_service_account(
    kube_apiserver: ControlPlane,
    agent_account: Account,
    node: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount, and the Service's address
    # in the environment: the in-cluster path, no kubeconfig anywhere.
    account = tmp_path / "serviceaccount"
    account.mkdir()
    token = yaml.safe_load(agent_account.kubeconfig.read_text())["users"][0]["user"]["token"]
    (account / "token").write_text(token)
    (account / "ca.crt").write_bytes(kube_apiserver.ca_pem)
    (account / "namespace").write_text(NAMESPACE)
    address = urllib.parse.urlsplit(kube_apiserver.url)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", address.hostname or "")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(address.port))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    async with agent_following(tmp_path, node, account) as agent:
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"18", "19"}), timeout=30)
        await asyncio.to_thread(kube_apiserver.admin.label_node, node, {"node-group": "big"})
        await agent.emu.wait_devices(
            DEDICATED, lambda s: lists(s, {"2", "3", "4", "5", "6", "7"}), timeout=10
        )
