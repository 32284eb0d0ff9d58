"""The node's labels, for choosing its pool config in a config directory (see `agent.config.select_config`).

Two sources: labels given on the command line (`--node-labels k=v,...`), fixed for the agent's life; or the
agent's own Node object in the Kubernetes API, read and then watched, so that a relabel reaches the agent
within the watch's latency. The API client (lightkube) is imported only once labels are actually asked for:
an agent whose config needs no labels never loads it. It costs the agent 13.3 MiB of RSS (4.8 of them
OpenSSL's libraries) and 65 ms of import; `load_client_modules` says what it leaves out, and
docs/nodeconfig.md ("What the label client costs") where the rest goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import sys
import types
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog

from agent import leanstart
from agent.leanstart import dist_info_version

if TYPE_CHECKING:
    from lightkube import AsyncClient
    from lightkube.generic_resource import GenericGlobalResource

log = structlog.get_logger(__name__)

# The environment variable the chart fills from `spec.nodeName` (downward API).
NODE_NAME_ENV = "NODE_NAME"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
# One watch request lasts this long on the server; then the agent watches again from the last
# resourceVersion it saw. A client-side limit slightly above it catches a connection that died silently
# (lightkube sets no read timeout on watches).
WATCH_SERVER_TIMEOUT_S = 240
WATCH_CLIENT_GRACE_S = 30.0

# Label keys: an optional DNS-subdomain prefix and a name part (k8s.io/apimachinery's qualified name).
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


class LabelSource(Protocol):
    """Where the supervisor gets the node's labels from."""

    def labels(self) -> Mapping[str, str] | None:
        """The labels now; None while they are not known (`unknown_reason` says why).

        Asking is also what starts an API source: it loads its client on the first call."""

    @property
    def unknown_reason(self) -> str: ...

    async def wait_first(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) for the source's first answer, labels or a failure: at start the
        labels are usually milliseconds away, and choosing without them would mean serving nothing."""


class NodeLabelsError(ValueError):
    """A `--node-labels` text that is not `key=value,...`; says which part is wrong."""


def parse_node_labels(text: str) -> dict[str, str]:
    """`key=value,key2=value2` (kubectl's form) into a mapping. An empty text is no labels."""
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise NodeLabelsError(f"--node-labels: {part!r} is not key=value")
        prefix, slash, name = key.rpartition("/")
        if len(name) > 63 or not name or not _LABEL_NAME.match(name) or (slash and not prefix):
            raise NodeLabelsError(f"--node-labels: {key!r} is not a valid label key")
        if key in labels:
            raise NodeLabelsError(f"--node-labels: {key!r} is given twice")
        labels[key] = value.strip()
    return labels


class StaticLabels:
    """Labels given on the command line: the API is never asked."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self._labels = dict(labels)

    def labels(self) -> Mapping[str, str]:
        return self._labels

    @property
    def unknown_reason(self) -> str:
        return ""

    async def wait_first(self, timeout_s: float) -> None:
        return None


class NodeLabelWatch:
    """The labels of this node's Node object, followed live through a watch.

    `run` is the one task (owned by whoever runs the agent's helpers); it waits until `labels()` is first
    called, then gets the Node, watches it from that resourceVersion, and calls `on_change` whenever the
    labels differ from the last ones seen. Without API access it logs why, keeps the last labels it had,
    and tries again with backoff."""

    def __init__(
        self,
        node_name: str | None,
        on_change: Callable[[], None],
        *,
        client_factory: Callable[[], AsyncClient] | None = None,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
        backoff_start_s: float = BACKOFF_START_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.node_name = node_name
        self._on_change = on_change
        self._client_factory = client_factory
        self._service_account_dir = service_account_dir
        self._backoff_start_s = backoff_start_s
        self._backoff_max_s = backoff_max_s
        self._labels: dict[str, str] | None = None
        self._wanted = asyncio.Event()
        self._reason = "the Node has not been read from the Kubernetes API yet"
        # Set by the first answer, good or bad (see wait_first).
        self._answered = asyncio.Event()
        # Whether the current attempt got the Node at all (a later failure then starts the backoff anew).
        self._read_ok = False
        # For tests and /healthz-style reports: how many times the labels were (re)read and changed.
        self.changes = 0
        self.connected = asyncio.Event()

    def labels(self) -> Mapping[str, str] | None:
        self._wanted.set()
        return self._labels

    @property
    def unknown_reason(self) -> str:
        return self._reason

    async def wait_first(self, timeout_s: float) -> None:
        self._wanted.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._answered.wait()

    async def run(self) -> None:
        """Follow the Node's labels until cancelled (starts only once they are asked for)."""
        await self._wanted.wait()
        if not self.node_name:
            self._reason = (
                f"{NODE_NAME_ENV} is not set, so the agent does not know its Node (the chart sets it from "
                "spec.nodeName); pass --node-labels instead"
            )
            log.error("nodelabels.no_node_name", reason=self._reason)
            self._answered.set()
            return
        log.info("nodelabels.starting", node=self.node_name, source="kubernetes api")
        backoff = self._backoff_start_s
        client: AsyncClient | None = None
        try:
            while True:
                self._read_ok = False
                try:
                    if client is None:
                        client = self._make_client()
                    await self._follow(client)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # every failure of the API path means "retry later"
                    if self._read_ok:
                        # This attempt read the Node: the failure is new, not the last one again.
                        backoff = self._backoff_start_s
                    self._failed(exc, backoff)
                    if _client_unusable(exc) and client is not None:
                        await _close(client)
                        client = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._backoff_max_s)
        finally:
            if client is not None:
                await _close(client)

    def _make_client(self) -> AsyncClient:
        if self._client_factory is not None:
            return self._client_factory()
        load_client_modules()
        from lightkube import AsyncClient  # noqa: PLC0415 - loaded only when labels are needed
        from lightkube.config.kubeconfig import KubeConfig  # noqa: PLC0415

        # In the cluster: the pod's service account (token, CA, KUBERNETES_SERVICE_HOST); outside it,
        # KUBECONFIG or ~/.kube/config, as kubectl would.
        config = KubeConfig.from_env(service_account=self._service_account_dir)
        return AsyncClient(config=config, trust_env=False)

    async def _follow(self, client: AsyncClient) -> None:
        """One get, then watches from its resourceVersion until one fails (returns only by raising)."""
        from lightkube.core.exceptions import ApiError  # noqa: PLC0415

        assert self.node_name is not None
        Node = node_resource()
        node = await client.get(Node, self.node_name)
        version = node.metadata.resourceVersion if node.metadata is not None else None
        self._seen(node, "get")
        self._read_ok = True
        self.connected.set()
        loop = asyncio.get_running_loop()
        while True:
            # Typed as an AsyncIterable, made by an async generator (lightkube's GenericAsyncClient.watch).
            events = cast(
                "AsyncGenerator[tuple[str, GenericGlobalResource], None]",
                client.watch(
                    Node,
                    fields={"metadata.name": self.node_name},
                    resource_version=version,
                    server_timeout=WATCH_SERVER_TIMEOUT_S,
                ),
            )
            try:
                # aclosing: a watch left by the timeout or an error closes its HTTP stream now, not at GC.
                async with (
                    asyncio.timeout(WATCH_SERVER_TIMEOUT_S + WATCH_CLIENT_GRACE_S) as deadline,
                    contextlib.aclosing(events),
                ):
                    async for kind, obj in events:
                        deadline.reschedule(loop.time() + WATCH_SERVER_TIMEOUT_S + WATCH_CLIENT_GRACE_S)
                        if obj.metadata is not None and obj.metadata.resourceVersion:
                            version = obj.metadata.resourceVersion
                        if kind == "DELETED":
                            log.warning(
                                "nodelabels.node_deleted",
                                node=self.node_name,
                                keeping=self._labels,
                                reason="the Node object was deleted; its labels are kept until it is back",
                            )
                        elif kind in ("ADDED", "MODIFIED"):
                            self._seen(obj, kind.lower())
            except TimeoutError:
                # A watch that said nothing for longer than the server's own timeout: the connection
                # is gone without a word. Watch again from the last version seen.
                log.debug("nodelabels.watch_renewed", node=self.node_name, resource_version=version)
            except ApiError as exc:
                if exc.status.code != 410:
                    raise
                # The version is too old for the server's watch cache: read the Node again and go on.
                log.info("nodelabels.watch_expired", node=self.node_name, reason=exc.status.message)
                node = await client.get(Node, self.node_name)
                version = node.metadata.resourceVersion if node.metadata is not None else None
                self._seen(node, "get")

    def _seen(self, node: Any, how: str) -> None:
        self._answered.set()
        labels = dict(node.metadata.labels or {}) if node.metadata is not None else {}
        if labels == self._labels:
            return
        before, self._labels = self._labels, labels
        self._reason = ""
        self.changes += 1
        log.info(
            "nodelabels.changed" if before is not None else "nodelabels.known",
            node=self.node_name,
            via=how,
            added={k: v for k, v in labels.items() if before is None or before.get(k) != v},
            removed=sorted(set(before or {}) - set(labels)),
        )
        self._on_change()

    def _failed(self, exc: BaseException, retry_in_s: float) -> None:
        self._answered.set()
        reason = describe_api_failure(exc, self.node_name or "")
        keeping = "the labels read last" if self._labels is not None else "nothing (labels still unknown)"
        if self._labels is None:
            self._reason = reason
        log.warning(
            "nodelabels.unavailable",
            node=self.node_name,
            reason=reason,
            keeping=keeping,
            retry_in_s=retry_in_s,
        )


def describe_api_failure(exc: BaseException, node: str) -> str:
    """What went wrong on the way to the Node object, in words an operator can act on."""
    leanstart.allow_tls()
    from lightkube.core.exceptions import ApiError  # noqa: PLC0415
    from lightkube.core.exceptions import ConfigError as ClientConfigError  # noqa: PLC0415

    if isinstance(exc, ApiError):
        code = exc.status.code
        message = exc.status.message or ""
        if code == 401:
            return f"the API server refused the service account token (401): {message}"
        if code == 403:
            return (
                f"the service account may not read Node {node!r} (403: {message}); the agent needs get and "
                "watch on nodes (the chart's ClusterRole)"
            )
        if code == 404:
            return f"there is no Node named {node!r} (404); check {NODE_NAME_ENV}"
        return f"the API server answered {code}: {message}"
    if isinstance(exc, ClientConfigError | KeyError | FileNotFoundError):
        return (
            "no Kubernetes API access: no service account token or API address in the pod, and no kubeconfig "
            f"({type(exc).__name__}: {exc}); mount the service account token or pass --node-labels"
        )
    return f"cannot reach the Kubernetes API: {type(exc).__name__}: {exc}"


def _client_unusable(exc: BaseException) -> bool:
    # An API answer came through a working client; anything else (no token yet, a broken connection) gets
    # a fresh one, which also reads the service account files again.
    leanstart.allow_tls()
    from lightkube.core.exceptions import ApiError  # noqa: PLC0415

    return not isinstance(exc, ApiError)


async def _close(client: AsyncClient) -> None:
    try:
        await client.close()
    except Exception as exc:  # closing a broken client must not end the watch task
        log.debug("nodelabels.client_close_failed", reason=str(exc))


def node_name_from_env() -> str | None:
    return os.environ.get(NODE_NAME_ENV) or None


# What the label client's import leaves out, each measured in the agent process (docs/nodeconfig.md,
# "What the label client costs"): lightkube's generated core/v1 models and resources (every core type's
# dataclass, 1.7 MiB; the agent reads one Node's metadata, which a generic resource decodes as well), and
# `importlib.metadata` (0.7 MiB with zipfile, csv and importlib.resources), which httpx2 and httpcore2
# import only to read their own version.
_DEFERRED_LIGHTKUBE_PACKAGES = ("models", "resources")
_DEFERRED_MODULES = ("core_v1", "apiextensions_v1")
_METADATA_MODULE = "importlib.metadata"


def load_client_modules() -> None:
    """Import lightkube and its HTTP stack for the agent's one Node watch, as lean as the agent can.

    TLS is let in first (agent.leanstart keeps OpenSSL out until now). In a process that has not imported
    lightkube yet, its two core/v1 modules are registered as lazy modules (importlib's LazyLoader):
    lightkube imports them at its own import but uses them only in calls the agent never makes (pod logs,
    evictions), and any attribute read loads them in full, so a lightkube that does use them only costs the
    memory again. And `importlib.metadata` is stood in for while the client's libraries import, by one that
    reads versions from the dist-info directories' names (falling back to the real module where a name is
    not found once)."""
    leanstart.allow_tls()
    if "lightkube" in sys.modules:
        return
    _defer_core_models()
    with _versions_from_dist_info():
        import httpcore2  # noqa: F401, PLC0415 - imported by httpx2 only when the client is made
        import lightkube  # noqa: PLC0415
    # The import system names a package's children on it when it loads them itself; these it did not.
    for package_name in _DEFERRED_LIGHTKUBE_PACKAGES:
        package = sys.modules.get(f"lightkube.{package_name}")
        if package is not None and not hasattr(lightkube, package_name):
            setattr(lightkube, package_name, package)


def _defer_core_models() -> None:
    spec = importlib.util.find_spec("lightkube")
    if spec is None or spec.origin is None:
        return
    base = Path(spec.origin).parent
    for package_name in _DEFERRED_LIGHTKUBE_PACKAGES:
        name = f"lightkube.{package_name}"
        init = base / package_name / "__init__.py"
        if name in sys.modules or not init.is_file():
            return
        # The package itself is loaded in full (both hold only a version string); its lazy children are set
        # as its attributes so that `from ..models import core_v1` takes them without looking into them (on
        # Python 3.11 the import system's own look at a module's __spec__ would load a lazy module).
        package_spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)]
        )
        if package_spec is None or package_spec.loader is None:
            return
        package = importlib.util.module_from_spec(package_spec)
        sys.modules[name] = package
        package_spec.loader.exec_module(package)
        for module_name in _DEFERRED_MODULES:
            module_file = base / package_name / f"{module_name}.py"
            child_spec = importlib.util.spec_from_file_location(f"{name}.{module_name}", module_file)
            if not module_file.is_file() or child_spec is None or child_spec.loader is None:
                continue  # not in this lightkube: it imports what it has, as it would anyway
            lazy_loader = importlib.util.LazyLoader(child_spec.loader)
            child_spec.loader = lazy_loader
            child = importlib.util.module_from_spec(child_spec)
            sys.modules[child_spec.name] = child
            lazy_loader.exec_module(child)
            setattr(package, module_name, child)
            log.debug("nodelabels.deferred_module", module=child_spec.name)


@contextlib.contextmanager
def _versions_from_dist_info() -> Iterator[None]:
    # The stand-in is in sys.modules only while the client's libraries import, on the event loop's thread;
    # the agent's other threads (asyncio's workers for file reads) import nothing of importlib.metadata.
    if _METADATA_MODULE in sys.modules:
        yield
        return
    stand_in = types.ModuleType(_METADATA_MODULE, "versions from dist-info names, by agent.nodelabels")

    def version(distribution: str) -> str:
        found = dist_info_version(distribution)
        if found is not None:
            return found
        # Another kind of install, or stale dist-info beside the real one: the real module answers.
        if sys.modules.get(_METADATA_MODULE) is stand_in:
            del sys.modules[_METADATA_MODULE]
        import importlib.metadata  # noqa: PLC0415

        return importlib.metadata.version(distribution)

    stand_in.__dict__["version"] = version
    sys.modules[_METADATA_MODULE] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(_METADATA_MODULE) is stand_in:
            del sys.modules[_METADATA_MODULE]


_node_class: type[GenericGlobalResource] | None = None


def node_resource() -> type[GenericGlobalResource]:
    """lightkube's resource for core/v1 Node: its own where its core resources are loaded anyway (another
    part of the process uses them), else a generic one (metadata typed, the rest a dict), which decodes
    the labels without loading every core type's model. The generic one is registered in lightkube's
    resource registry, as `create_global_resource` does: the agent's process has no other lightkube user."""
    global _node_class  # noqa: PLW0603 - one class per process, as lightkube's registry keeps one
    if _node_class is None:
        loaded = sys.modules.get("lightkube.resources.core_v1")
        if type(loaded) is types.ModuleType:  # loaded in full (a lazy one is of LazyLoader's own type)
            _node_class = cast("type[GenericGlobalResource]", loaded.Node)
        else:
            from lightkube.generic_resource import create_global_resource  # noqa: PLC0415

            _node_class = create_global_resource("", "v1", "Node", "nodes")
    return _node_class
