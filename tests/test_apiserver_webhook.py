"""The chart's MutatingWebhookConfiguration in a real API server, calling a real `cpupool webhook`.

The chart is installed with `helm install` into the kube-apiserver of tests/apiserver. The webhook runs on
this machine with the chart's own TLS Secret and pool ConfigMap (projected as the kubelet would), bound to
the ClusterIP and port of the chart's Service: the API server reaches it through the configuration exactly
as installed (service reference, caBundle, server name `<service>.<namespace>.svc`, matchConditions,
namespaceSelector, failure policy). Pods are created through the API server, as `kubectl apply` would; what
it stores, refuses or warns about is what a user sees.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.starter.contract import ENV_EXCLUSIVE, STARTER_PATH
from tests.peers.apiserver import ControlPlane, Doc, HelmCLI, KubeAPI, Response, free_port
from tests.peers.incluster import LocalWebhook, ProjectedVolume, localize_args

CHART = Path(__file__).resolve().parent.parent / "charts" / "cpupool"
RELEASE = "hook"
NAMESPACE = "cpupool-hook"
# The release's webhook sees only namespaces with this label: other tests' namespaces in the same API
# server never reach it.
SCOPE_LABEL = "cpupool.test/webhook"
POOLS = {
    "fast": {"cpus": "2-3", "pooltype": "exclusive"},
    "common": {"cpus": "4-5", "pooltype": "shared"},
}
APP_IMAGE = "registry.example/app:1"
# A generous bound on the webhook noticing a ConfigMap volume update (it reacts to file events within a
# second): the shared machine may be slow, and the point is that no restart is needed.
CONFIG_RELOAD_WAIT_S = 30.0


@dataclass
class Installed:
    api: KubeAPI
    webhook: LocalWebhook
    config: ProjectedVolume
    """The webhook's pool-config volume; `project_configmap` again is the kubelet's sync after an edit."""
    configmap: str
    apps: str
    """A namespace the webhook serves."""
    values: dict[str, Any]


@pytest.fixture(scope="module")
def cluster_helm(
    kube_apiserver: ControlPlane, helm_cli: str, tmp_path_factory: pytest.TempPathFactory
) -> HelmCLI:
    home = tmp_path_factory.mktemp("helm-webhook")
    return HelmCLI(helm_cli, kube_apiserver.kubeconfig(home / "kubeconfig"), home)


@pytest.fixture(scope="module")
def installed(
    kube_apiserver: ControlPlane, cluster_helm: HelmCLI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    api = kube_apiserver.admin
    # Port 443 (the chart's default) needs root to bind; elsewhere the Service gets a free high port.
    service_port = 443 if os.geteuid() == 0 else free_port()
    values: dict[str, Any] = {
        "pools": POOLS,
        "webhook": {
            "namespaceSelector": {"matchLabels": {SCOPE_LABEL: "on"}},
            "service": {"port": service_port},
        },
    }
    cluster_helm.install(RELEASE, CHART, NAMESPACE, values)
    try:
        manifest = cluster_helm.manifest(RELEASE, NAMESPACE)
        yield from _serve(api, manifest, values, tmp_path_factory)
    finally:
        cluster_helm.uninstall(RELEASE, NAMESPACE)


def _one(manifest: list[Doc], kind: str) -> Doc:
    found = [doc for doc in manifest if doc["kind"] == kind]
    assert len(found) == 1, f"the release has {len(found)} objects of kind {kind}, expected one"
    return found[0]


def _serve(
    api: KubeAPI, manifest: list[Doc], values: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    """The release's webhook served from here: with what its Deployment mounts, where its
    MutatingWebhookConfiguration sends the API server."""
    # Pods in the release namespace use its default ServiceAccount, which no controller creates here.
    api.create_namespace(NAMESPACE)
    apps = f"apps-{secrets.token_hex(3)}"
    api.create_namespace(apps, {SCOPE_LABEL: "on"})

    deployment = _one(manifest, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in deployment["volumes"]}
    (container,) = deployment["containers"]
    target = _one(manifest, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["service"]
    service = api.read("v1", "Service", target["name"], target["namespace"])
    work = tmp_path_factory.mktemp("webhook")
    # The pod's volumes, as the kubelet would lay them out, where its mounts point.
    local: dict[str, Path] = {}
    projected: dict[str, ProjectedVolume] = {}
    secret: Doc = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        projected[mount["name"]] = ProjectedVolume(work / mount["name"])
        local[mount["mountPath"]] = projected[mount["name"]].path
        if "secret" in volume:
            secret = projected[mount["name"]].project_secret(api, NAMESPACE, volume["secret"]["secretName"])
        else:
            projected[mount["name"]].project_configmap(api, NAMESPACE, volume["configMap"]["name"])
    webhook = LocalWebhook(
        localize_args(container["args"], local),
        # Where kube-proxy would take the API server's connection to the Service.
        host=service["spec"]["clusterIP"],
        port=target["port"],
        server_name=f"{target['name']}.{target['namespace']}.svc",
        ca_pem=base64.b64decode(secret["data"]["ca.crt"]),
        log=work / "webhook.log",
    )
    with webhook:
        configmap = volumes["pool-config"]["configMap"]["name"]
        yield Installed(api, webhook, projected["pool-config"], configmap, apps, values)


def _pod(
    name: str,
    *,
    limits: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    command: list[str] | None = None,
) -> Doc:
    container: dict[str, Any] = {"name": "app", "image": APP_IMAGE}
    if command is not None:
        container["command"] = command
    if limits:
        container["resources"] = {"limits": dict(limits)}
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [container]},
    }


def _create(installed: Installed, pod: Doc, namespace: str | None = None) -> Response:
    return installed.api.create(pod, namespace or installed.apps)


def _container(stored: Doc) -> Doc:
    container: Doc = stored["spec"]["containers"][0]
    return container


def test_a_pool_pod_is_started_through_the_process_starter(installed: Installed) -> None:
    answer = _create(
        installed, _pod("fast-app", limits={"cpupool.io/fast": "2"}, command=["/app", "--serve"])
    )

    assert answer.status == 201, answer.body
    # What the API server stored is the pod after the webhook's patch.
    stored = installed.api.read("v1", "Pod", "fast-app", installed.apps)
    container = _container(stored)
    assert container["command"] == [STARTER_PATH]
    assert container["args"] == ["/app", "--serve"]
    assert stored["metadata"]["annotations"]["cpupool.io/process-starter"] == "app"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CPUPOOL_POOLS"]
    # Two exclusive CPUs, plus headroom for the starter: a limit the pool config's type decided.
    assert container["resources"]["limits"]["cpu"] == "2100m"
    volumes = {v["name"] for v in stored["spec"]["volumes"]}
    assert {"cpupool-process-starter", "cpupool-podinfo"} <= volumes
    assert answer.warnings == ()


def test_a_pod_forging_the_agents_variables_is_refused_with_the_reason(installed: Installed) -> None:
    answer = _create(
        installed,
        _pod("forger", limits={"cpupool.io/fast": "1"}, env={ENV_EXCLUSIVE: "0-63"}, command=["/app"]),
    )

    assert answer.status == 403, answer.body
    message = answer.body["message"]
    assert 'admission webhook "pods.cpupool.io" denied the request' in message
    assert ENV_EXCLUSIVE in message
    assert installed.api.request("GET", f"/api/v1/namespaces/{installed.apps}/pods/forger").status == 404


def test_a_forged_variable_is_refused_even_without_pool_resources(installed: Installed) -> None:
    # The matchCondition sends such a pod to the webhook although it asks for no pool.
    answer = _create(installed, _pod("sneaky", env={"CPUPOOL_FAST_CPUS": "0-3"}, command=["/app"]))

    assert answer.status == 403, answer.body
    assert "CPUPOOL_FAST_CPUS" in answer.body["message"]


def test_a_pod_carrying_a_claim_annotation_is_refused_even_without_pool_resources(
    installed: Installed,
) -> None:
    # Claims are the agent's Allocate answers, which the kubelet puts on containers; on a pod they can only
    # be forged. The matchCondition sends such a pod to the webhook, which refuses it.
    pod = _pod("claimer", command=["/app"])
    pod["metadata"]["annotations"] = {"cpupool.io/claim-fast": "1;cpupool.io/fast;bm9uY2U;r2-7;AAAA"}
    answer = _create(installed, pod)

    assert answer.status == 403, answer.body
    assert "cpupool.io/claim-fast" in answer.body["message"]


def test_a_pod_without_pools_is_stored_as_it_was_sent(installed: Installed) -> None:
    answer = _create(installed, _pod("plain", command=["/app"], limits={"cpu": "1"}))

    assert answer.status == 201, answer.body
    stored = installed.api.read("v1", "Pod", "plain", installed.apps)
    assert _container(stored)["command"] == ["/app"]
    assert "cpupool.io/process-starter" not in (stored["metadata"].get("annotations") or {})


def test_a_pool_that_the_config_does_not_define_is_admitted_with_a_warning(installed: Installed) -> None:
    answer = _create(installed, _pod("typo", limits={"cpupool.io/fsat": "1"}, command=["/app"]))

    assert answer.status == 201, answer.body
    assert any("cpupool.io/fsat" in w and "does not define" in w for w in answer.warnings), answer.warnings


def test_the_release_namespace_is_never_sent_to_the_webhook(installed: Installed) -> None:
    # Its own pods must start while no webhook pod serves yet: the chart excludes the namespace.
    answer = _create(installed, _pod("own", limits={"cpupool.io/fast": "1"}, command=["/app"]), NAMESPACE)

    assert answer.status == 201, answer.body
    assert _container(installed.api.read("v1", "Pod", "own", NAMESPACE))["command"] == ["/app"]


def test_a_helm_upgrade_adding_a_node_groups_pool_reaches_the_running_webhook(
    installed: Installed, cluster_helm: HelmCLI
) -> None:
    pod = _pod("batch-job", limits={"cpupool.io/batch": "1"}, command=["/job"])
    before = installed.api.create(pod, installed.apps, dry_run=True)
    assert before.status == 201, before.body
    assert any("cpupool.io/batch" in w for w in before.warnings), before.warnings
    # A pool of one node group only: the webhook cannot know the pod's node yet, so every file counts.
    group = {
        "nodeSelector": {"node-group": "batch"},
        "pools": {"batch": {"cpus": "6-7", "pooltype": "exclusive"}},
    }
    values = {**installed.values, "nodeGroups": {"batch": group}}

    cluster_helm.upgrade(RELEASE, CHART, NAMESPACE, values)
    # The kubelet's sync of the ConfigMap volume; the webhook process is not restarted.
    installed.config.project_configmap(installed.api, NAMESPACE, installed.configmap)

    deadline = time.monotonic() + CONFIG_RELOAD_WAIT_S
    while (after := installed.api.create(pod, installed.apps, dry_run=True)).warnings:
        assert time.monotonic() < deadline, f"the webhook still answers with the old pools: {after.warnings}"
        time.sleep(0.1)
    assert after.status == 201, after.body
    container = _container(after.body)
    assert container["command"] == [STARTER_PATH]
    # An exclusive pool now, known by type: one CPU plus the starter's headroom.
    assert container["resources"]["limits"]["cpu"] == "1100m"
    # The upgrade kept the chart's certificate (the webhook still serves the one it started with).
    assert installed.webhook.healthz() == 200


def test_a_bad_helm_upgrade_keeps_the_webhooks_last_good_rules(
    installed: Installed, cluster_helm: HelmCLI
) -> None:
    # A node group that makes "fast" shared while the fallback file has it exclusive: the directory as a
    # whole is refused (a pod's CPU limit cannot depend on a node it does not have yet).
    group = {"nodeSelector": {"node-group": "odd"}, "pools": {"fast": {"cpus": "8-9", "pooltype": "shared"}}}
    bad = {**installed.values, "nodeGroups": {"odd": group}}
    pod = _pod("still-fast", limits={"cpupool.io/fast": "1"}, command=["/app"])
    try:
        cluster_helm.upgrade(RELEASE, CHART, NAMESPACE, bad)
        installed.config.project_configmap(installed.api, NAMESPACE, installed.configmap)

        deadline = time.monotonic() + CONFIG_RELOAD_WAIT_S
        while not (report := installed.webhook.health()[1]["config"])["last_error"]:
            assert time.monotonic() < deadline, f"the bad files were not noticed: {report}"
            time.sleep(0.1)
        assert "fast" in report["last_error"]
        # Pods are still admitted by the last good rules: "fast" stays exclusive.
        answer = installed.api.create(pod, installed.apps, dry_run=True)
        assert answer.status == 201, answer.body
        assert _container(answer.body)["resources"]["limits"]["cpu"] == "1100m"
    finally:
        cluster_helm.upgrade(RELEASE, CHART, NAMESPACE, installed.values)
        installed.config.project_configmap(installed.api, NAMESPACE, installed.configmap)
    deadline = time.monotonic() + CONFIG_RELOAD_WAIT_S
    while installed.webhook.health()[1]["config"]["last_error"]:
        assert time.monotonic() < deadline, "the error stayed after the good files came back"
        time.sleep(0.1)


def test_without_a_serving_webhook_pool_pods_are_refused_not_admitted_unpinned(installed: Installed) -> None:
    installed.webhook.stop()
    try:
        pool_pod = _create(installed, _pod("orphan", limits={"cpupool.io/fast": "1"}, command=["/app"]))
        plain_pod = _create(installed, _pod("bystander", command=["/app"]))
    finally:
        installed.webhook.start()

    # failurePolicy Fail (chosen by the chart for a 1.28+ API server with matchConditions).
    assert pool_pod.status == 500, pool_pod.body
    assert 'failed calling webhook "pods.cpupool.io"' in pool_pod.body["message"]
    # Pods that ask for no pool never reach the webhook, so its outage does not stop them.
    assert plain_pod.status == 201, plain_pod.body
