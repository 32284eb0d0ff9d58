"""The Helm chart against a real API server (kube-apiserver of tests/apiserver, RBAC on).

`helm install` must get every object past the real API server's validation and admission (the offline
schemas of tests/test_chart.py do not run CEL compilation, defaulting or RBAC escalation checks), and
`helm upgrade` must change the pools (the fallback file and the node groups' files, as the agent's own
directory reader chooses them for a node's labels) while the webhook's self-signed CA, found by the chart's
`lookup` in the live cluster, stays. The chart's RBAC, applied as rendered, must let the agent's
ServiceAccount read its Node and nothing it does not need. No kubelet or controller runs: objects are
stored, never run.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import read_config_dir, select_config
from tests.peers.apiserver import ControlPlane, Doc, HelmCLI, KubeAPI
from tests.peers.incluster import ProjectedVolume

CHART = Path(__file__).resolve().parent.parent / "charts" / "cpupool"
RELEASE = "install"
NAMESPACE = "cpupool-install"
# null drops the chart's default pool (isolcpus): the ConfigMap then holds exactly these.
POOLS: dict[str, Any] = {"fast": {"cpus": "2-3", "pooltype": "exclusive"}, "isolcpus": None}
# The release's webhook configuration must not reach other tests' pods in the same API server.
WEBHOOK_SCOPE = {"webhook": {"namespaceSelector": {"matchLabels": {"cpupool.test/webhook": RELEASE}}}}
RBAC_KINDS = ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
# With node groups the agent reads its Node's labels: the chart adds its token and RBAC.
NODE_GROUPS: dict[str, Any] = {
    "big": {
        "nodeSelector": {"node-group": "big"},
        "pools": {"fast": {"cpus": "2-7", "pooltype": "exclusive"}},
    },
}
BIG = {"node-group": "big"}


@pytest.fixture(scope="module")
def cluster_helm(
    kube_apiserver: ControlPlane, helm_cli: str, tmp_path_factory: pytest.TempPathFactory
) -> HelmCLI:
    home = tmp_path_factory.mktemp("helm-chart")
    return HelmCLI(helm_cli, kube_apiserver.kubeconfig(home / "kubeconfig"), home)


@pytest.fixture(scope="module")
def release(cluster_helm: HelmCLI) -> Iterator[str]:
    cluster_helm.install(
        RELEASE, CHART, NAMESPACE, {"pools": POOLS, "nodeGroups": NODE_GROUPS, **WEBHOOK_SCOPE}
    )
    try:
        yield RELEASE
    finally:
        cluster_helm.uninstall(RELEASE, NAMESPACE)


def _stored(api: KubeAPI, doc: Doc) -> Doc:
    return api.read(doc["apiVersion"], doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace"))


def _one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _pools_for(
    api: KubeAPI, manifest: list[Doc], labels: dict[str, str], volume: Path
) -> dict[str, tuple[str, str]]:
    """The pools a node with `labels` gets from the release's ConfigMap as stored: projected as the kubelet
    would, then read and chosen by the agent's own directory rules."""
    ProjectedVolume(volume).project_configmap(api, NAMESPACE, _one(manifest, "ConfigMap")["metadata"]["name"])
    configs = read_config_dir(volume)
    configs.raise_for_problems()
    chosen = select_config(configs, labels).config
    assert chosen is not None, f"no file for labels {labels}"
    return {name: (spec.cpus_text, str(spec.type)) for name, spec in chosen.pools.items()}


def _webhook_tls(api: KubeAPI, manifest: list[Doc]) -> tuple[dict[str, str], str]:
    """The data of the webhook's TLS Secret and the caBundle the API server will trust it by."""
    secret = _stored(api, _one(manifest, "Secret"))
    webhook = _stored(api, _one(manifest, "MutatingWebhookConfiguration"))["webhooks"][0]
    return secret["data"], webhook["clientConfig"]["caBundle"]


def test_helm_install_stores_every_object_of_the_chart(
    kube_apiserver: ControlPlane, cluster_helm: HelmCLI, release: str, tmp_path: Path
) -> None:
    api = kube_apiserver.admin
    manifest = cluster_helm.manifest(release, NAMESPACE)

    kinds = {doc["kind"] for doc in manifest}
    assert {
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "Service",
        "Secret",
        "MutatingWebhookConfiguration",
    } <= kinds
    for doc in manifest:
        stored = _stored(api, doc)
        assert stored["metadata"]["labels"]["app.kubernetes.io/instance"] == release, doc["kind"]
    # Stored means compiled: the API server refuses a matchCondition whose CEL does not compile.
    webhook = _stored(api, _one(manifest, "MutatingWebhookConfiguration"))["webhooks"][0]
    assert webhook["matchConditions"][0]["name"] == "cpupool-pods"
    # helm asked the live API server its version (1.37): matchConditions are honoured, so Fail.
    assert webhook["failurePolicy"] == "Fail"
    assert _pools_for(api, manifest, {}, tmp_path / "config") == {"fast": ("2-3", "exclusive")}
    assert _pools_for(api, manifest, BIG, tmp_path / "config") == {"fast": ("2-7", "exclusive")}


def test_helm_upgrade_changes_the_pools_and_keeps_the_webhook_ca(
    kube_apiserver: ControlPlane, cluster_helm: HelmCLI, release: str, tmp_path: Path
) -> None:
    api = kube_apiserver.admin
    manifest = cluster_helm.manifest(release, NAMESPACE)
    before_secret, before_bundle = _webhook_tls(api, manifest)
    new_pools = {
        "fast": {"cpus": "2-4", "pooltype": "exclusive"},
        "common": {"cpus": "6-7", "pooltype": "shared"},
        "isolcpus": None,
    }
    new_groups = {
        **NODE_GROUPS,
        "edge": {
            "nodeSelector": {"node-group": "edge"},
            "pools": {"fast": {"cpus": "18-19", "pooltype": "exclusive"}},
        },
    }

    cluster_helm.upgrade(
        release, CHART, NAMESPACE, {"pools": new_pools, "nodeGroups": new_groups, **WEBHOOK_SCOPE}
    )

    manifest = cluster_helm.manifest(release, NAMESPACE)
    volume = tmp_path / "config"
    assert _pools_for(api, manifest, {}, volume) == {
        "fast": ("2-4", "exclusive"),
        "common": ("6-7", "shared"),
    }
    assert _pools_for(api, manifest, BIG, volume) == {"fast": ("2-7", "exclusive")}
    assert _pools_for(api, manifest, {"node-group": "edge"}, volume) == {"fast": ("18-19", "exclusive")}
    history = json.loads(
        cluster_helm.run("history", release, "--namespace", NAMESPACE, "--output", "json").stdout
    )
    assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")]
    # The chart's lookup found the Secret of the first install in the live cluster: a CA made anew would
    # leave the running webhook pods serving a certificate the new caBundle does not sign.
    after_secret, after_bundle = _webhook_tls(api, manifest)
    assert after_secret == before_secret
    assert after_bundle == before_bundle == before_secret["ca.crt"]


# --- RBAC ---------------------------------------------------------------------------------------------


def _service_account(workload: Doc) -> str:
    name: str = workload["spec"]["template"]["spec"].get("serviceAccountName") or "default"
    return name


def _forbidden_requests(namespace: str, node: str, docs: list[Doc]) -> list[tuple[str, str, Any]]:
    """What the agent never needs: other kinds, other namespaces' objects, and any write to its Node."""
    return [
        ("GET", f"/api/v1/namespaces/{namespace}/secrets", None),
        ("GET", "/api/v1/secrets", None),
        ("GET", f"/api/v1/namespaces/{namespace}/secrets/{_one(docs, 'Secret')['metadata']['name']}", None),
        (
            "GET",
            f"/api/v1/namespaces/{namespace}/configmaps/{_one(docs, 'ConfigMap')['metadata']['name']}",
            None,
        ),
        # Its own Node by name only: no list of every node (the chart grants get and watch).
        ("GET", "/api/v1/nodes", None),
        ("GET", "/api/v1/pods", None),
        ("GET", f"/api/v1/namespaces/{namespace}/pods", None),
        ("GET", "/api/v1/namespaces", None),
        ("GET", "/api/v1/serviceaccounts", None),
        ("GET", "/apis/apps/v1/daemonsets", None),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", None),
        ("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {"stolen": "yes"}}}),
        ("DELETE", f"/api/v1/nodes/{node}", None),
        ("POST", f"/api/v1/namespaces/{namespace}/pods", {"apiVersion": "v1", "kind": "Pod"}),
        ("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/default/token", {}),
    ]


def _status(client: KubeAPI, method: str, path: str, body: Any) -> int:
    content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
    return client.request(method, path, body, content_type=content_type).status


def test_the_agents_service_account_reads_its_node_and_nothing_else(
    kube_apiserver: ControlPlane, cluster_helm: HelmCLI
) -> None:
    # Rendered and applied object by object (as a GitOps tool applies `helm template` output), so that
    # the RBAC is tested apart from the install above.
    namespace = f"cpupool-rbac-{secrets.token_hex(3)}"
    release = "rbac"
    api = kube_apiserver.admin
    docs = cluster_helm.template(release, CHART, namespace, {"pools": POOLS, "nodeGroups": NODE_GROUPS})
    rbac = [doc for doc in docs if doc["kind"] in RBAC_KINDS]
    api.create_namespace(namespace)
    node = f"worker-{secrets.token_hex(3)}"
    try:
        for doc in rbac:
            api.apply(doc, namespace)
        api.create_node(node, {"cpupool.test/group": "big"})
        _check_agent_rights(kube_apiserver, docs, namespace, node)
    finally:
        # Cluster-scoped objects outlive the namespace: leave the shared API server as it was.
        for doc in rbac:
            if doc["kind"].startswith("Cluster"):
                api.request("DELETE", api.path_for(doc))
        api.request("DELETE", f"/api/v1/nodes/{node}")


def _check_agent_rights(plane: ControlPlane, docs: list[Doc], namespace: str, node: str) -> None:
    api = plane.admin
    rbac = [doc for doc in docs if doc["kind"] in RBAC_KINDS]
    agent_account = _service_account(_one(docs, "DaemonSet"))
    assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == agent_account for d in rbac), (
        f"the agent runs as ServiceAccount {agent_account}, which the chart does not create"
    )
    agent = plane.client(api.token_for(namespace, agent_account))

    # What the agent does: read its Node's labels, then watch it for relabels.
    read = agent.request("GET", f"/api/v1/nodes/{node}")
    assert read.status == 200, read.body
    watch = agent.request(
        "GET",
        "/api/v1/nodes",
        query={"fieldSelector": f"metadata.name={node}", "watch": "true", "timeoutSeconds": "1"},
    )
    assert watch.status == 200, watch.body
    refused = {
        (method, path): status
        for method, path, body in _forbidden_requests(namespace, node, docs)
        if (status := _status(agent, method, path, body)) != 403
    }
    assert refused == {}, f"the agent's account may do more than it needs: {refused}"
    assert api.read("v1", "Node", node)["metadata"]["labels"].get("stolen") is None

    # The webhook reads its config from a volume and never calls the API: sharing the agent's account, its
    # pods get no token of it; with an account of its own, that one may do nothing.
    webhook_pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    webhook_account = _service_account(_one(docs, "Deployment"))
    if webhook_account == agent_account:
        assert webhook_pod.get("automountServiceAccountToken") is False
    else:
        webhook = plane.client(api.token_for(namespace, webhook_account))
        assert webhook.request("GET", f"/api/v1/nodes/{node}").status == 403
