"""The agent's small HTTP port: /healthz, /readyz and /metrics, served on the agent's own event loop."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

if TYPE_CHECKING:
    # Types only: with --no-nri the agent never loads NRI's protocol.
    from agent.nri.accounting import AccountingMonitor
    from agent.nri.plugin import NriPlugin
    from agent.supervisor import Supervisor

log = structlog.get_logger(__name__)


def make_app(
    supervisor: Supervisor, nri: NriPlugin | None = None, accounting: AccountingMonitor | None = None
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the loop is alive; the config state is there for operators.
        return web.json_response(
            {
                "status": "ok",
                "config_generation": supervisor.config_generation,
                "config_reload_errors": int(supervisor.metrics.reloads.get(result="error")),
                "last_config_error": supervisor.last_config_error,
            }
        )

    def enforcement() -> dict[str, object]:
        # NRI is reported, never gating readiness: without it the device plugin still serves.
        return {
            "nri": nri.report() if nri is not None else {"enabled": False},
            "kubelet_accounting": accounting.report.as_dict()
            if accounting is not None and accounting.report is not None
            else None,
        }

    async def readyz(_: web.Request) -> web.Response:
        body = {"ready": supervisor.ready, "resources": supervisor.readiness(), **enforcement()}
        return web.json_response(body, status=200 if supervisor.ready else 503)

    async def enforced(_: web.Request) -> web.Response:
        """Per live container, the cpuset the NRI plugin enforced (for `cpupool status`)."""
        containers = nri.enforced() if nri is not None else []
        return web.json_response({**enforcement(), "containers": containers})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=supervisor.metrics.render().encode(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/enforcement", enforced)
    return app


async def serve_health(
    supervisor: Supervisor,
    host: str,
    port: int,
    *,
    nri: NriPlugin | None = None,
    accounting: AccountingMonitor | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until cancelled; on `sock` when given (a listening socket bound to host and port)."""
    runner = web.AppRunner(make_app(supervisor, nri, accounting), access_log=None)
    await runner.setup()
    site: web.BaseSite = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, host, port)
    await site.start()
    log.info("health.listening", host=host, port=port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
