"""A real Kubernetes control plane for the tests: etcd and kube-apiserver from tests/apiserver (Go).

`find_or_build_apiserver` finds (or, once per machine, builds) the binary; `ControlPlane.start` runs etcd and
kube-apiserver on loopback with certificates, a service-account signing key and an admin token made here,
RBAC authorization and the admission plugins a cluster has (ServiceAccount, MutatingAdmissionWebhook...);
`KubeAPI` is a small synchronous REST client over it (stdlib only: the tests need a handful of calls, and
the client under test must not also be the client that checks it). Typical use::

    with ControlPlane.start(binary, workdir) as cp:
        cp.admin.create_namespace("apps")
        cp.admin.apply({"apiVersion": "v1", "kind": "ConfigMap", ...})
        token = cp.admin.token_for("apps", "default")
        as_pod = cp.client(token)

No kube-controller-manager, scheduler or kubelet runs: objects are stored and admitted, never reconciled.
So namespaces get no `default` ServiceAccount by themselves (`create_namespace` makes one, or pods that use
it are refused by the ServiceAccount admission plugin), and nothing is ever scheduled.

Services get ClusterIPs from a loopback /16 picked at random per control plane (127.X.0.0/16): the API
server calls a webhook's Service at its ClusterIP and port, as kube-proxy would route it, so a webhook
started on that address on this machine is reached through the chart's own Service reference, with the TLS
server name `<service>.<namespace>.svc`.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .build import APISERVER_PEER

ADMIN_USER = "cpupool-test-admin"
FIELD_MANAGER = "cpupool-tests"
# The first start of a cold machine includes etcd's first fsyncs and the API server's bootstrap (RBAC
# roles, priority classes, the default ServiceCIDR): generous, since the machine is shared.
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0

Doc = dict[str, Any]


# --- the binary -----------------------------------------------------------------------------------

find_or_build_apiserver = APISERVER_PEER.find_or_build


# --- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files of the control plane's trust: a CA, the API server's serving pair, the service-account
    signing key and its public half."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certificates(directory: Path) -> Certificates:
    """A fresh CA, a serving certificate for 127.0.0.1 and localhost, and a service-account key (ES256)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cpupool-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(serving_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    files = Certificates(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.ca_key.write_bytes(_pem_key(ca_key))
    files.serving_cert.write_bytes(serving_cert.public_bytes(serialization.Encoding.PEM))
    files.serving_key.write_bytes(_pem_key(serving_key))
    files.sa_key.write_bytes(_pem_key(sa_key))
    files.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for key in (files.ca_key, files.serving_key, files.sa_key):
        key.chmod(0o600)
    return files


# --- the REST client ------------------------------------------------------------------------------


class ApiError(Exception):
    """The API server answered a request with an error status; carries the status and its Status message."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.body = body
        self.message = str(message)


@dataclass(frozen=True)
class Response:
    status: int
    body: Any
    warnings: tuple[str, ...] = ()
    """The `Warning` headers (RFC 7234 form: `299 - "text"`), text only: admission webhooks' warnings."""


def _warning_text(header: str) -> str:
    # `299 - "text"`: the API server quotes the text and escapes quotes and backslashes inside it.
    _, _, rest = header.partition(" - ")
    rest = rest.strip()
    if len(rest) >= 2 and rest[0] == rest[-1] == '"':
        rest = rest[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return rest


@dataclass
class KubeAPI:
    """One identity's view of the API server: its bearer token and the cluster's CA."""

    url: str
    ca_file: Path
    token: str
    _resources: dict[tuple[str, str], tuple[str, bool]] = field(default_factory=dict, repr=False)

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        parsed = urllib.parse.urlsplit(self.url)
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return http.client.HTTPSConnection(
            parsed.hostname or "", parsed.port, context=context, timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> Response:
        """The answer to one request, whatever its status (no exception for 4xx/5xx)."""
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        connection = self._connection(timeout)
        try:
            connection.request(method, target, body=payload, headers=headers)
            answer = connection.getresponse()
            raw = answer.read()
            warnings = tuple(_warning_text(value) for value in answer.headers.get_all("Warning") or ())
        finally:
            connection.close()
        try:
            decoded: Any = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            decoded = raw.decode(errors="replace")
        return Response(answer.status, decoded, warnings)

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        """`request`, raising ApiError unless the status is 2xx."""
        response = self.request(method, path, body, **kwargs)
        if not 200 <= response.status < 300:
            raise ApiError(method, path, response.status, response.body)
        return response

    def get(self, path: str, **query: str) -> Any:
        return self.call("GET", path, query=query or None).body

    # -- objects by kind ---------------------------------------------------------------------------

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(plural resource name, namespaced) of a kind, from the API server's discovery documents."""
        key = (api_version, kind)
        if key not in self._resources:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            for resource in self.get(base)["resources"]:
                if "/" not in resource["name"]:
                    self._resources[(api_version, resource["kind"])] = (
                        resource["name"],
                        bool(resource["namespaced"]),
                    )
        if key not in self._resources:
            raise KeyError(f"the API server serves no kind {kind} in {api_version}")
        return self._resources[key]

    def path_of(
        self, api_version: str, kind: str, name: str | None = None, namespace: str | None = None
    ) -> str:
        plural, namespaced = self._resource(api_version, kind)
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if namespaced:
            if not namespace:
                raise ValueError(f"{kind} {name} is namespaced: give its namespace")
            base += f"/namespaces/{namespace}"
        return f"{base}/{plural}" + (f"/{name}" if name else "")

    def path_for(self, doc: Mapping[str, Any], namespace: str | None = None) -> str:
        meta = doc["metadata"]
        return self.path_of(doc["apiVersion"], doc["kind"], meta["name"], meta.get("namespace") or namespace)

    def apply(self, doc: Mapping[str, Any], namespace: str | None = None) -> Doc:
        """Server-side apply of one object (created or updated); the stored object."""
        body: Doc = self.call(
            "PATCH",
            self.path_for(doc, namespace),
            dict(doc),
            content_type="application/apply-patch+yaml",
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
        ).body
        return body

    def create(
        self, doc: Mapping[str, Any], namespace: str | None = None, *, dry_run: bool = False
    ) -> Response:
        """POST one object; the raw answer (status, stored object or Status, admission warnings). A dry run
        goes through validation and admission (webhooks included) and stores nothing."""
        meta = doc["metadata"]
        path = self.path_of(doc["apiVersion"], doc["kind"], namespace=meta.get("namespace") or namespace)
        return self.request("POST", path, dict(doc), query={"dryRun": "All"} if dry_run else None)

    def read(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> Doc:
        body: Doc = self.get(self.path_of(api_version, kind, name, namespace))
        return body

    # -- helpers for tests ---------------------------------------------------------------------------

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """The namespace and its `default` ServiceAccount (no controller manager makes it here)."""
        meta: Doc = {"name": name, "labels": dict(labels or {})}
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        self.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, name)

    def create_node(self, name: str, labels: Mapping[str, str] | None = None) -> Doc:
        """A Node object (no kubelet behind it), labelled like a kubelet would label it plus `labels`."""
        all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}
        return self.apply(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}}
        )

    def label_node(self, name: str, labels: Mapping[str, str | None]) -> Doc:
        """Set (or, with None, remove) labels of a Node, as `kubectl label` does (a merge patch)."""
        body: Doc = self.call(
            "PATCH",
            f"/api/v1/nodes/{name}",
            {"metadata": {"labels": dict(labels)}},
            content_type="application/merge-patch+json",
        ).body
        return body

    def token_for(self, namespace: str, service_account: str, expiration_s: int = 3600) -> str:
        """A token for a ServiceAccount, from the TokenRequest API (as the kubelet gets a projected one)."""
        body = self.call(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_s},
            },
        ).body
        token: str = body["status"]["token"]
        return token

    def can_i(
        self, verb: str, resource: str, *, name: str = "", namespace: str = "", group: str = ""
    ) -> bool:
        """SelfSubjectAccessReview: what the authorizer says for this identity."""
        attributes = {"verb": verb, "resource": resource, "group": group}
        if name:
            attributes["name"] = name
        if namespace:
            attributes["namespace"] = namespace
        body = self.call(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attributes},
            },
        ).body
        return bool(body["status"].get("allowed"))


# --- the control plane ----------------------------------------------------------------------------


class ControlPlaneError(Exception):
    """etcd or kube-apiserver did not start or stopped; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def check(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ControlPlaneError(f"{self.name} exited with status {code}:\n{_tail(self.log)}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _spawn(name: str, argv: list[str], log: Path) -> _Process:
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return _Process(name, popen, log)


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver; `admin` is a cluster-admin client (group system:masters)."""

    url: str
    ca_file: Path
    admin_token: str
    service_cidr: ipaddress.IPv4Network
    workdir: Path
    certificates: Certificates
    admin: KubeAPI = field(init=False)

    def __post_init__(self) -> None:
        self.admin = KubeAPI(self.url, self.ca_file, self.admin_token)

    @property
    def ca_pem(self) -> bytes:
        return self.ca_file.read_bytes()

    def client(self, token: str) -> KubeAPI:
        """A client that authenticates with `token` (a ServiceAccount's, say)."""
        return KubeAPI(self.url, self.ca_file, token)

    def kubeconfig(self, path: Path, token: str | None = None, namespace: str = "default") -> Path:
        """A kubeconfig file for this cluster (admin unless `token` is given), for helm and the like."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}
            ],
            "users": [{"name": "test", "user": {"token": token or self.admin_token}}],
            "contexts": [
                {"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}
            ],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    @classmethod
    @contextlib.contextmanager
    def start(cls, binary: Path, workdir: Path) -> Iterator[ControlPlane]:
        """etcd and kube-apiserver in `workdir`, ready to serve; both stopped on exit."""
        workdir.mkdir(parents=True, exist_ok=True)
        certs = make_certificates(workdir / "pki")
        admin_token = secrets.token_hex(24)
        tokens = workdir / "tokens.csv"
        # user, uid, groups: system:masters is cluster-admin by the API server's own bootstrap binding.
        tokens.write_text(f'{admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        tokens.chmod(0o600)
        # A /16 of loopback per control plane: Services' ClusterIPs are reachable on this machine, and two
        # runs at once (engineers sharing a machine) do not hand out the same addresses.
        service_cidr = ipaddress.IPv4Network(f"127.{random.randint(100, 250)}.0.0/16")
        etcd_client, etcd_peer, secure_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_client}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        processes: list[_Process] = []
        try:
            processes.append(
                _spawn(
                    "etcd",
                    [
                        str(binary),
                        "etcd",
                        "--name=test",
                        f"--data-dir={workdir / 'etcd'}",
                        f"--listen-client-urls={etcd_url}",
                        f"--advertise-client-urls={etcd_url}",
                        f"--listen-peer-urls={peer_url}",
                        f"--initial-advertise-peer-urls={peer_url}",
                        f"--initial-cluster=test={peer_url}",
                        # A test cluster's data is thrown away: no fsync cost on a shared disk.
                        "--unsafe-no-fsync",
                        "--log-level=warn",
                    ],
                    workdir / "etcd.log",
                )
            )
            processes.append(
                _spawn(
                    "kube-apiserver",
                    [
                        str(binary),
                        "kube-apiserver",
                        f"--etcd-servers={etcd_url}",
                        "--bind-address=127.0.0.1",
                        "--advertise-address=127.0.0.1",
                        # The `kubernetes` Service's Endpoints would hold the loopback address, which
                        # validation refuses; nothing here needs them.
                        "--endpoint-reconciler-type=none",
                        f"--secure-port={secure_port}",
                        f"--tls-cert-file={certs.serving_cert}",
                        f"--tls-private-key-file={certs.serving_key}",
                        f"--client-ca-file={certs.ca_cert}",
                        f"--token-auth-file={tokens}",
                        "--authorization-mode=RBAC",
                        "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,Priority,"
                        "DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
                        "ValidatingAdmissionPolicy,ResourceQuota,LimitRanger",
                        "--allow-privileged=true",
                        f"--service-cluster-ip-range={service_cidr}",
                        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                        f"--service-account-key-file={certs.sa_pub}",
                        f"--service-account-signing-key-file={certs.sa_key}",
                        "--profiling=false",
                        "--v=1",
                    ],
                    workdir / "kube-apiserver.log",
                )
            )
            plane = cls(
                url=f"https://127.0.0.1:{secure_port}",
                ca_file=certs.ca_cert,
                admin_token=admin_token,
                service_cidr=service_cidr,
                workdir=workdir,
                certificates=certs,
            )
            plane._wait_ready(processes)
            yield plane
        finally:
            for process in reversed(processes):
                process.stop()
            # etcd preallocates 64 MB of WAL; pytest keeps the last runs' directories. The logs stay.
            shutil.rmtree(workdir / "etcd", ignore_errors=True)

    def _wait_ready(self, processes: list[_Process]) -> None:
        """Until /readyz says ok (etcd reached, RBAC bootstrap roles and the default ServiceCIDR in place)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            for process in processes:
                process.check()
            try:
                answer = self.admin.request("GET", "/readyz", timeout=5)
                if answer.status == 200:
                    # The namespace the API server makes at start: its bootstrap controllers have run.
                    if self.admin.request("GET", "/api/v1/namespaces/default").status == 200:
                        return
                    last = "namespace default not created yet"
                else:
                    last = f"/readyz: HTTP {answer.status}: {answer.body}"
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}:\n{_tail(p.log, 2000)}" for p in processes)
        raise ControlPlaneError(
            f"the API server was not ready after {START_TIMEOUT_S:.0f} s ({last})\n{logs}"
        )


# --- helm against the control plane ---------------------------------------------------------------


class HelmError(Exception):
    """A helm command failed; carries its command line and output."""


@dataclass(frozen=True)
class HelmCLI:
    """The Helm CLI pointed at one cluster, with its own config, cache and data directories (nothing of the
    user's ~/.config/helm is read or written)."""

    binary: str
    kubeconfig: Path
    home: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        done = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, env=env, check=False, timeout=300
        )
        if check and done.returncode != 0:
            raise HelmError(f"helm {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return done

    def _values(self, values: Mapping[str, Any]) -> list[str]:
        path = self.home / f"values-{secrets.token_hex(4)}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(dict(values)))
        return ["--values", str(path)]

    def install(self, release: str, chart: Path, namespace: str, values: Mapping[str, Any]) -> None:
        self.run(
            "install",
            release,
            str(chart),
            "--namespace",
            namespace,
            "--create-namespace",
            *self._values(values),
        )

    def upgrade(self, release: str, chart: Path, namespace: str, values: Mapping[str, Any]) -> None:
        self.run("upgrade", release, str(chart), "--namespace", namespace, *self._values(values))

    def uninstall(self, release: str, namespace: str) -> None:
        self.run("uninstall", release, "--namespace", namespace)

    def manifest(self, release: str, namespace: str) -> list[Doc]:
        """The objects of the release's current revision, as helm sent them."""
        text = self.run("get", "manifest", release, "--namespace", namespace).stdout
        return [doc for doc in yaml.safe_load_all(text) if doc]

    def template(self, release: str, chart: Path, namespace: str, values: Mapping[str, Any]) -> list[Doc]:
        """Rendered without a cluster (`helm template`), as a GitOps tool renders it."""
        text = self.run(
            "template", release, str(chart), "--namespace", namespace, *self._values(values)
        ).stdout
        return [doc for doc in yaml.safe_load_all(text) if doc]
