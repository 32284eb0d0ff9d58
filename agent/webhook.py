"""`cpupool webhook`: the mutating admission webhook, an aiohttp HTTPS server.

``POST /mutate`` answers AdmissionReview ``admission.k8s.io/v1`` for pod CREATE with the JSONPatch of
`agent.mutation`; ``GET /healthz`` is for probes, ``GET /metrics`` for Prometheus. The certificate and key
are read again whenever their content changes (a renewed Secret volume), without a restart: every TLS
handshake picks the context loaded last, through the SNI callback that OpenSSL runs for each ClientHello, with
or without a server name. The pool config (a file, or every file of a per-node-group directory) is followed
the same way: an edit is in force for the next review; a bad edit keeps the last good config and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent.config import (
    ConfigError,
    Problem,
    merged_pools,
    parse_config,
    read_config_dir,
)
from agent.mutation import MutationSettings, PodRejected, mutate_pod

log = structlog.get_logger(__name__)

ADMISSION_API_VERSION = "admission.k8s.io/v1"
MAX_BODY_BYTES = 1024 * 1024
# How often the certificate files are compared even when no file event came (lost or unsupported events).
CERT_RECHECK_SECONDS = 30.0
EXIT_OK = 0
EXIT_USAGE = 2


class BadRequest(Exception):
    """A request that is not a usable AdmissionReview; answered with HTTP 400 and this reason."""


class CertificateError(Exception):
    """The certificate or key cannot be loaded; names the files and the reason."""


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where} must be a non-empty string")
    return value


def review_response(
    uid: str,
    *,
    allowed: bool = True,
    patch: list[dict[str, Any]] | None = None,
    warnings: tuple[str, ...] = (),
    message: str | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode("ascii")
    if warnings:
        response["warnings"] = list(warnings)
    if message is not None:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": message}
    return {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


def review(body: bytes, settings: MutationSettings) -> dict[str, Any]:
    """The AdmissionReview answer to a request body. Raises BadRequest for requests it cannot answer."""
    try:
        data: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object (an AdmissionReview)")
    if data.get("kind") != "AdmissionReview":
        raise BadRequest(f"kind must be AdmissionReview, got {data.get('kind')!r}")
    if data.get("apiVersion") != ADMISSION_API_VERSION:
        raise BadRequest(f"apiVersion must be {ADMISSION_API_VERSION}, got {data.get('apiVersion')!r}")
    request = data.get("request")
    if not isinstance(request, dict):
        raise BadRequest("the AdmissionReview has no request object")
    uid = _string(request.get("uid"), "request.uid")
    kind = request.get("kind")
    resource = request.get("resource")
    is_pod = not request.get("subResource") and (
        (isinstance(kind, dict) and kind.get("kind") == "Pod" and kind.get("group", "") == "")
        or (isinstance(resource, dict) and resource.get("resource") == "pods")
    )
    if not is_pod or request.get("operation") != "CREATE":
        # The webhook configuration sends pod creations only; anything else passes untouched.
        return review_response(uid)
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise BadRequest("request.object must be the pod being created")
    namespace = request.get("namespace") or ""
    metadata = pod.get("metadata")
    name = (metadata.get("name") or metadata.get("generateName")) if isinstance(metadata, dict) else None
    try:
        mutation = mutate_pod(pod, settings)
    except PodRejected as exc:
        log.info("webhook.denied", namespace=namespace, pod=name, uid=uid, reason=str(exc))
        return review_response(uid, allowed=False, message=f"cpupool: {exc}")
    if mutation.patch:
        log.info("webhook.mutated", namespace=namespace, pod=name, uid=uid, containers=list(mutation.wrapped))
    for warning in mutation.warnings:
        log.info("webhook.warning", namespace=namespace, pod=name, uid=uid, warning=warning)
    return review_response(uid, patch=mutation.patch, warnings=mutation.warnings)


# --- TLS ----------------------------------------------------------------------------------------


def _context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"cannot load certificate {cert} with key {key}: {exc}") from exc
    return context


class CertificateStore:
    """The serving certificate: the context of the last good pair of files, reloaded on change."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._cert = cert
        self._key = key
        # Digest first: a change between the two reads then shows up on the next check.
        self._digest = self._read_digest()
        self._current = _context(cert, key)
        self.reloads = 0
        self._server = _context(cert, key)
        self._server.sni_callback = self._choose

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        connection.context = self._current

    @property
    def server_context(self) -> ssl.SSLContext:
        """The context to serve with; each handshake switches to the latest certificate."""
        return self._server

    def _read_digest(self) -> bytes:
        digest = hashlib.sha256()
        for path in (self._cert, self._key):
            try:
                digest.update(path.read_bytes())
            except OSError:
                return b""
            digest.update(b"\0")
        return digest.digest()

    def reload_if_changed(self) -> bool:
        """Load the files again when their content changed; keep the old pair when the new one is bad."""
        digest = self._read_digest()
        if not digest or digest == self._digest:
            return False
        try:
            context = _context(self._cert, self._key)
        except CertificateError as exc:
            # Often a half-written pair (certificate updated, key not yet): the next event retries.
            log.warning("webhook.certificate_reload_failed", reason=str(exc))
            return False
        self._current = context
        self._digest = digest
        self.reloads += 1
        log.info("webhook.certificate_reloaded", cert=str(self._cert), reloads=self.reloads)
        return True

    async def watch(self, recheck_seconds: float = CERT_RECHECK_SECONDS) -> None:
        """Reload on changes until cancelled. Watches the directories: Secret volumes swap a symlink."""
        from watchfiles import awatch  # noqa: PLC0415 - only the server needs it

        directories = sorted({str(self._cert.parent), str(self._key.parent)})
        try:
            async for _ in awatch(
                *directories,
                debounce=200,
                rust_timeout=int(recheck_seconds * 1000),
                yield_on_timeout=True,
                recursive=False,
            ):
                self.reload_if_changed()
        except (OSError, RuntimeError) as exc:
            log.warning("webhook.certificate_watch_failed", reason=str(exc), fallback_seconds=recheck_seconds)
        # Without file events, comparing the content now and then still catches every renewal.
        while True:
            await asyncio.sleep(recheck_seconds)
            self.reload_if_changed()


# --- the pool config -----------------------------------------------------------------------------


class ConfigStore:
    """The mutation settings of the last good pool config, reloaded when the files change.

    `path` is one config file, or the agent's config directory: the webhook does not know which node a pod
    will land on, so it takes every file's pools (`agent.config.merged_pools`; one pool type per name is a
    rule across files). A config that cannot be read or is invalid keeps the last good one: logged, counted
    (`reloads_error`) and shown as `last_error` until the files are good again."""

    def __init__(self, path: Path | None, *, exclusive_quota: bool = True) -> None:
        self.path = path
        self._quota = exclusive_quota
        self.generation = 0
        self.reloads_ok = 0
        self.reloads_error = 0
        self.last_error: str | None = None
        # Raises ConfigError: a webhook never starts on a config it cannot use.
        self._digest, self.current = self._load()
        self.generation = 1

    def _load(self) -> tuple[bytes, MutationSettings]:
        """The content's digest and the settings it gives. Raises ConfigError."""
        path = self.path
        if path is None:
            return b"", MutationSettings(exclusive_quota=self._quota)
        digest = hashlib.sha256()
        if path.is_dir():
            try:
                configs = read_config_dir(path)
            except OSError as exc:
                raise ConfigError(str(path), [Problem(None, f"cannot read the directory: {exc}")]) from exc
            for name, text in sorted(configs.texts.items()):
                digest.update(f"{name}\0{text}\0".encode())
            configs.raise_for_problems()
            if not configs.configs:
                # No file at all: pool types are unknown, as without --config.
                return digest.digest(), MutationSettings(exclusive_quota=self._quota)
            base = next(iter(configs.configs.values())).resource_base_name
            pools = merged_pools(configs)
            return digest.digest(), MutationSettings(base, pools, self._quota)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), [Problem(None, f"cannot read the file: {exc}")]) from exc
        digest.update(text.encode())
        config = parse_config(text, str(path))
        return digest.digest(), MutationSettings.from_config(config, exclusive_quota=self._quota)

    def reload_if_changed(self) -> bool:
        """Load the config again if its content changed; True when new settings are in force."""
        try:
            digest, settings = self._load()
        except ConfigError as exc:
            error = str(exc)
            if error != self.last_error:
                self.reloads_error += 1
                self.last_error = error
                log.error(
                    "webhook.config_invalid",
                    source=exc.source,
                    problems=[p.describe(exc.source) for p in exc.problems],
                    keeping=f"the last good config (generation {self.generation})",
                )
            return False
        if digest == self._digest:
            if self.last_error is not None:
                # Back to the content in force: the earlier error no longer applies.
                self.last_error = None
                log.info("webhook.config_error_cleared", reason="the files are back to the config in force")
            return False
        self._digest, self.current = digest, settings
        self.generation += 1
        self.reloads_ok += 1
        self.last_error = None
        log.info(
            "webhook.config_reloaded",
            source=str(self.path),
            generation=self.generation,
            resource_base_name=settings.resource_base_name,
            pools=sorted(settings.pools) if settings.pools is not None else None,
        )
        return True

    def _directory(self) -> Path | None:
        if self.path is None:
            return None
        return self.path if self.path.is_dir() else self.path.parent

    async def watch(self, recheck_seconds: float = CERT_RECHECK_SECONDS) -> None:
        """Reload on changes until cancelled. Watches the directory: a ConfigMap volume swaps `..data`."""
        directory = self._directory()
        if directory is None:
            return
        from watchfiles import awatch  # noqa: PLC0415 - only the server needs it

        try:
            async for _ in awatch(
                directory,
                debounce=100,
                step=20,
                rust_timeout=int(recheck_seconds * 1000),
                yield_on_timeout=True,
                recursive=False,
            ):
                self.reload_if_changed()
        except (OSError, RuntimeError) as exc:
            log.warning("webhook.config_watch_failed", reason=str(exc), fallback_seconds=recheck_seconds)
        while True:
            await asyncio.sleep(recheck_seconds)
            self.reload_if_changed()

    def report(self) -> dict[str, Any]:
        return {
            "source": str(self.path) if self.path is not None else None,
            "generation": self.generation,
            "reloads": self.reloads_ok,
            "reload_errors": self.reloads_error,
            # Set while the files on disk are refused and the last good config is in force.
            "last_error": self.last_error,
        }

    def metrics(self) -> str:
        valid = 0 if self.last_error is not None else 1
        return (
            "# HELP cpupool_webhook_config_generation Pool configs loaded since start (1: the first).\n"
            "# TYPE cpupool_webhook_config_generation gauge\n"
            f"cpupool_webhook_config_generation {self.generation}\n"
            "# HELP cpupool_webhook_config_reloads_total Config changes applied (ok) or refused (error).\n"
            "# TYPE cpupool_webhook_config_reloads_total counter\n"
            f'cpupool_webhook_config_reloads_total{{result="ok"}} {self.reloads_ok}\n'
            f'cpupool_webhook_config_reloads_total{{result="error"}} {self.reloads_error}\n'
            "# HELP cpupool_webhook_config_valid 0 while the files on disk are refused (last good in force)\n"
            "# TYPE cpupool_webhook_config_valid gauge\n"
            f"cpupool_webhook_config_valid {valid}\n"
        )


# --- the server ---------------------------------------------------------------------------------


def make_app(
    settings: MutationSettings | ConfigStore, store: CertificateStore | None = None
) -> web.Application:
    config = settings if isinstance(settings, ConfigStore) else None

    async def mutate(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _bad(f"the body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _bad(f"the body is larger than {MAX_BODY_BYTES} bytes")
        # The settings in force now: a config edit applies from the next review on.
        current = config.current if config is not None else settings
        assert isinstance(current, MutationSettings)
        try:
            answer = review(body, current)
        except BadRequest as exc:
            return _bad(str(exc))
        return web.json_response(answer)

    async def healthz(_: web.Request) -> web.Response:
        body: dict[str, Any] = {"status": "ok"}
        if store is not None:
            body["certificate_reloads"] = store.reloads
        if config is not None:
            body["config"] = config.report()
        return web.json_response(body)

    async def metrics(_: web.Request) -> web.Response:
        text = config.metrics() if config is not None else ""
        return web.Response(
            body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def _bad(reason: str) -> web.Response:
    log.info("webhook.bad_request", reason=reason)
    return web.json_response({"error": "bad request", "reason": reason}, status=400)


@dataclass(frozen=True)
class WebhookOptions:
    cert: Path
    key: Path
    port: int = 8443
    host: str = "0.0.0.0"
    config: Path | None = None
    exclusive_quota: bool = True


def load_settings(options: WebhookOptions) -> MutationSettings:
    """Mutation settings from the pool config as it is now. Raises ConfigError."""
    return ConfigStore(options.config, exclusive_quota=options.exclusive_quota).current


class Webhook:
    """The running server: owns the aiohttp runner and the certificate and config watcher tasks."""

    def __init__(
        self, settings: MutationSettings | ConfigStore, store: CertificateStore, host: str, port: int
    ) -> None:
        self._settings = settings
        self._store = store
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._config_watcher: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the webhook is not started")
        return int(self._runner.addresses[0][1])

    async def start(self, *, recheck_seconds: float = CERT_RECHECK_SECONDS) -> None:
        self._runner = web.AppRunner(make_app(self._settings, self._store), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._store.server_context)
        await site.start()
        self._watcher = asyncio.create_task(self._store.watch(recheck_seconds), name="webhook-cert-watch")
        if isinstance(self._settings, ConfigStore):
            self._config_watcher = asyncio.create_task(
                self._settings.watch(recheck_seconds), name="webhook-config-watch"
            )
        log.info("webhook.listening", host=self._host, port=self.port)

    async def close(self) -> None:
        for task in (self._watcher, self._config_watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._config_watcher = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve(options: WebhookOptions, settings: MutationSettings | ConfigStore) -> None:
    """Serve until SIGTERM or SIGINT."""
    store = CertificateStore(options.cert, options.key)
    webhook = Webhook(settings, store, options.host, options.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await webhook.start()
    try:
        await stop.wait()
    finally:
        log.info("webhook.stopping")
        await webhook.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cert", type=Path, required=True, help="PEM certificate (chain) to serve")
    parser.add_argument("--key", type=Path, required=True, help="PEM private key of the certificate")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="pool config file or directory (pool types), followed live; without it types are unknown",
    )
    parser.add_argument(
        "--no-exclusive-quota",
        dest="exclusive_quota",
        action="store_false",
        help="give containers with exclusive CPUs no CFS quota (their cpu limit is removed)",
    )


def options_from_args(args: argparse.Namespace) -> WebhookOptions:
    return WebhookOptions(args.cert, args.key, args.port, args.host, args.config, args.exclusive_quota)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    try:
        config = ConfigStore(options.config, exclusive_quota=options.exclusive_quota)
        CertificateStore(options.cert, options.key)
    except ConfigError as exc:
        log.error("webhook.config_invalid", reason=str(exc))
        return EXIT_USAGE
    except CertificateError as exc:
        log.error("webhook.certificate_invalid", reason=str(exc))
        return EXIT_USAGE
    settings = config.current
    log.info(
        "webhook.starting",
        config=str(options.config) if options.config else None,
        resource_base_name=settings.resource_base_name,
        pools=sorted(settings.pools) if settings.pools is not None else None,
        exclusive_quota=settings.exclusive_quota,
    )
    asyncio.run(serve(options, config))
    return EXIT_OK
