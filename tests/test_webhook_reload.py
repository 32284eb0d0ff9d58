"""The webhook follows the pool config live: an edit of the ConfigMap (one file or a per-node-group directory)
is in force for the next review without a restart; a bad edit keeps the last good config and says so in the
log, /healthz and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import cli, webhook
from agent.webhook import CertificateStore, ConfigStore, Webhook
from tests.test_nodeconfig_agent import ConfigMapFiles, captured_logs
from tests.test_webhook import Server, _one, container, encode, make_cert, pod, process, review, secret_volume

BIG = """\
nodeSelector: {node-group: big}
pools:
  dedicated: {cpus: "2-7", pooltype: exclusive}
  shared: {cpus: "8-11", pooltype: shared}
"""
FALLBACK = 'pools:\n  dedicated: {cpus: "2", pooltype: exclusive}\n'


@dataclass
class Running:
    server: Server
    config: ConfigMapFiles
    store: ConfigStore

    async def get(self, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.server.url}{path}", ssl=self.server.client_ssl) as response,
        ):
            assert response.status == 200
            return await response.json() if path == "/healthz" else await response.text()

    async def wait(self, predicate: Callable[[], bool], what: str) -> None:
        # The watch reports an edit within ~0.2 s; the bound only keeps a broken watch from hanging the run.
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.02)
        pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    config = ConfigMapFiles(tmp_path / "config")
    config.write({"poolconfig.yaml": FALLBACK})
    root = secret_volume(tmp_path / "tls", "v1")
    certificates = CertificateStore(root / "tls.crt", root / "tls.key")
    store = ConfigStore(config.path)
    webhook = Webhook(store, certificates, "127.0.0.1", 0)
    # A long recheck: every reload these tests see comes from a file event, as in a cluster.
    await webhook.start(recheck_seconds=30)
    try:
        yield Running(Server(webhook, certificates, root / "tls.crt"), config, store)
    finally:
        await webhook.close()


def shared_pod() -> dict[str, Any]:
    return pod(
        container("app", command=["/bin/app"], pools={"shared": "500"}),
        annotation=_one(process("/bin/a", "shared", 500)),
    )


async def verdict(run: Running, p: dict[str, Any]) -> dict[str, Any]:
    status, answer = await run.server.post(encode(review(p)))
    assert status == 200
    response: dict[str, Any] = answer["response"]
    return response


async def test_an_edit_adds_a_pool_without_a_restart(running: Running) -> None:
    # Before: the config has no pool "shared", so the annotation naming it is refused.
    before = await verdict(running, shared_pod())
    assert before["allowed"] is False and "'shared' is not in the pool config" in before["status"]["message"]
    running.config.write({"poolconfig.yaml": FALLBACK, "poolconfig-big.yaml": BIG})
    await running.wait(lambda: running.store.generation == 2, "the edit to be loaded")
    after = await verdict(running, shared_pod())
    assert after["allowed"] is True and after.get("patch")
    health = await running.get("/healthz")
    assert health["config"]["generation"] == 2 and health["config"]["last_error"] is None


async def test_a_bad_edit_keeps_the_last_good_config_and_says_so(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    running.config.write({"poolconfig.yaml": FALLBACK, "poolconfig-big.yaml": BIG})
    await running.wait(lambda: running.store.generation == 2, "the first edit")
    with captured_logs(monkeypatch, webhook) as logs:
        # The big group's pool "dedicated" turns shared here: a pool name keeps one type in every file.
        running.config.write(
            {"poolconfig.yaml": FALLBACK, "poolconfig-big.yaml": BIG.replace("exclusive", "shared")}
        )
        await running.wait(lambda: running.store.last_error is not None, "the bad edit to be refused")
    refused = [e for e in logs if e["event"] == "webhook.config_invalid"]
    assert refused and refused[0]["keeping"] == "the last good config (generation 2)"
    assert any("keeps one pool type" in line for line in refused[0]["problems"])
    # The last good rules are still in force: the shared pool is known.
    assert (await verdict(running, shared_pod()))["allowed"] is True
    health = await running.get("/healthz")
    assert health["status"] == "ok" and "keeps one pool type" in health["config"]["last_error"]
    metrics = await running.get("/metrics")
    assert 'cpupool_webhook_config_reloads_total{result="error"} 1' in metrics
    assert "cpupool_webhook_config_valid 0" in metrics
    # Fixed: the error clears, with no new generation (the content is the one in force).
    running.config.write({"poolconfig.yaml": FALLBACK, "poolconfig-big.yaml": BIG})
    await running.wait(lambda: running.store.last_error is None, "the error to clear")
    assert running.store.generation == 2
    assert "cpupool_webhook_config_valid 1" in await running.get("/metrics")


async def test_a_single_config_file_is_followed_too(tmp_path: Path) -> None:
    config = ConfigMapFiles(tmp_path / "config")
    config.write({"poolconfig.yaml": FALLBACK})
    store = ConfigStore(config.path / "poolconfig.yaml")
    assert store.current.pools is not None and sorted(store.current.pools) == ["dedicated"]
    config.write({"poolconfig.yaml": FALLBACK + '  shared: {cpus: "3", pooltype: shared}\n'})
    assert store.reload_if_changed() is True
    assert sorted(store.current.pools or {}) == ["dedicated", "shared"]
    # The file removed from the ConfigMap: refused, the last good kept.
    config.write({})
    assert store.reload_if_changed() is False
    assert "cannot read the file" in (store.last_error or "")
    assert sorted(store.current.pools or {}) == ["dedicated", "shared"]


def test_the_webhook_takes_every_files_pools(tmp_path: Path) -> None:
    config = ConfigMapFiles(tmp_path / "config")
    config.write({"poolconfig.yaml": FALLBACK, "poolconfig-big.yaml": BIG})
    settings = ConfigStore(config.path).current
    assert settings.pools is not None and sorted(settings.pools) == ["dedicated", "shared"]


def test_cli_refuses_to_start_on_a_bad_config_directory(tmp_path: Path) -> None:
    cert, key, _ = make_cert(tmp_path / "tls", "cli")
    config = ConfigMapFiles(tmp_path / "config")
    config.write({"poolconfig-big.yaml": BIG.replace("nodeSelector: {node-group: big}\n", "")})
    assert cli.main(["webhook", "--cert", str(cert), "--key", str(key), "--config", str(config.path)]) == 2
