"""The agent on a config directory of per-node-group files: it serves the file its node's labels choose, and a
relabel or an edit of any file goes through the ConfigMap reload path (stream kept open, last good plan kept
on a fault). Labels come from a source the test changes; tests/test_apiserver_* follow a real Node."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import structlog

from agent import nodelabels
from agent.nodelabels import NodeLabelWatch
from agent.supervisor import AgentSettings, Supervisor
from tests.emulator import KubeletEmulator, ResourceSnapshot
from tests.harness import host_root

DEDICATED = "cpupool.io/dedicated"
BIG = 'nodeSelector: {node-group: big}\npools:\n  dedicated: {cpus: "2-7", pooltype: exclusive}\n'
EDGE = 'nodeSelector: {node-group: edge}\npools:\n  dedicated: {cpus: "18-19", pooltype: exclusive}\n'
FALLBACK = 'pools:\n  dedicated: {cpus: "20", pooltype: exclusive}\n'


@contextmanager
def captured_logs(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType
) -> Iterator[list[MutableMapping[str, Any]]]:
    """The events `module` logs meanwhile. Its module-level logger may have been cached by an earlier test's
    setup_logging (cache_logger_on_first_use), out of capture_logs' reach: a fresh one stands in for it."""
    with structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
        yield logs


class ConfigMapFiles:
    """A ConfigMap volume with several keys: `..data` swapped to a new timestamped directory on each write,
    every visible file a symlink through it (the kubelet's atomic writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._serial = 0
        path.mkdir(parents=True)

    def write(self, files: Mapping[str, str]) -> None:
        self._serial += 1
        data_dir = self.path / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self._serial:06d}"
        data_dir.mkdir()
        for name, text in files.items():
            (data_dir / name).write_text(text)
        data = self.path / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.path / "..data_tmp"
        tmp.symlink_to(data_dir.name)
        os.replace(tmp, data)
        for entry in self.path.iterdir():
            if not entry.name.startswith("..") and entry.name not in files:
                entry.unlink()
        for name in files:
            if not (self.path / name).is_symlink():
                (self.path / name).symlink_to(f"..data/{name}")
        if old is not None:
            shutil.rmtree(self.path / old)


class Labels:
    """Node labels a test changes; a change wakes the agent as the API watch does."""

    def __init__(self, labels: dict[str, str] | None) -> None:
        self.current = labels
        self.on_change = lambda: None
        self.asked = 0

    def labels(self) -> Mapping[str, str] | None:
        self.asked += 1
        return self.current

    @property
    def unknown_reason(self) -> str:
        return "the test has not set them yet"

    async def wait_first(self, timeout_s: float) -> None:
        # A source that has answered "unknown" already: the agent must not wait for it.
        return None

    def set(self, labels: dict[str, str]) -> None:
        self.current = labels
        self.on_change()


@dataclass
class Agent:
    emu: KubeletEmulator
    supervisor: Supervisor
    config: ConfigMapFiles
    labels: Labels


@asynccontextmanager
async def agent_on_dir(
    tmp_path: Path, files: Mapping[str, str], labels: dict[str, str] | None
) -> AsyncIterator[Agent]:
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir()
    pod_resources = tmp_path / "pod-resources" / "kubelet.sock"
    pod_resources.parent.mkdir()
    config = ConfigMapFiles(tmp_path / "config")
    config.write(files)
    settings = AgentSettings(
        config_path=config.path,
        root=host_root(tmp_path),
        plugin_dir=plugin_dir,
        pod_resources_socket=pod_resources,
        pin_self=False,
        state_dir=tmp_path / "state",
        kubelet_settle_s=0.0,
        answer_confirm_s=0.1,
    )
    source = Labels(labels)
    async with KubeletEmulator(plugin_dir, pod_resources_socket=pod_resources) as emu:
        supervisor = Supervisor(settings)
        supervisor.node_labels = source
        source.on_change = lambda: supervisor.notify("config")
        task = asyncio.create_task(supervisor.run())
        try:
            yield Agent(emu, supervisor, config, source)
        finally:
            supervisor.stop()
            await asyncio.wait_for(task, 10)


def device_ids(snap: ResourceSnapshot) -> set[str]:
    return {d.id for d in snap.devices}


def lists(snap: ResourceSnapshot, ids: set[str]) -> bool:
    return snap.stream_open and device_ids(snap) == ids


async def test_the_node_gets_the_file_its_labels_match(tmp_path: Path) -> None:
    files = {"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE, "poolconfig.yaml": FALLBACK}
    async with agent_on_dir(tmp_path, files, {"node-group": "edge"}) as agent:
        await agent.emu.wait_registered(DEDICATED)
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"18", "19"}))


async def test_a_relabel_changes_the_pools_on_the_open_stream(tmp_path: Path) -> None:
    files = {"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE, "poolconfig.yaml": FALLBACK}
    async with agent_on_dir(tmp_path, files, {"node-group": "edge"}) as agent:
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"18", "19"}))
        registrations = len(agent.emu.registrations)
        agent.labels.set({"node-group": "big"})
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"2", "3", "4", "5", "6", "7"}))
        # Labels that match no file: the fallback.
        agent.labels.set({"node-group": "small"})
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"20"}))
        # The same stream carried every list: the kubelet never saw the resource go away.
        assert len(agent.emu.registrations) == registrations
        assert not [e for e in agent.emu.stream_ends if e.resource == DEDICATED]


async def test_a_relabel_keeps_a_held_cpu_listed(tmp_path: Path) -> None:
    files = {"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE}
    async with agent_on_dir(tmp_path, files, {"node-group": "edge"}) as agent:
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"18", "19"}))
        allocation = await agent.emu.allocate(DEDICATED, 1, pod="pod-a")
        (held,) = allocation.device_ids
        agent.labels.set({"node-group": "big"})
        snap = await agent.emu.wait_devices(DEDICATED, lambda s: {"2", "7"} <= device_ids(s))
        # The pod's CPU stays listed, unhealthy, until the pod is gone; nothing else gets it.
        health = {d.id: d.health for d in snap.devices}
        assert health[held] == "Unhealthy"


async def test_two_matching_files_after_a_relabel_keep_the_last_good_plan(tmp_path: Path) -> None:
    zone = 'nodeSelector: {zone: a}\npools:\n  dedicated: {cpus: "8", pooltype: exclusive}\n'
    files = {"poolconfig-big.yaml": BIG, "poolconfig-zone.yaml": zone}
    async with agent_on_dir(tmp_path, files, {"node-group": "big"}) as agent:
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"2", "3", "4", "5", "6", "7"}))
        agent.labels.set({"node-group": "big", "zone": "a"})
        await agent.emu.wait_for(
            lambda: agent.supervisor.last_config_error is not None, what="a config error"
        )
        error = agent.supervisor.last_config_error or ""
        assert "poolconfig-big.yaml and" in error and "poolconfig-zone.yaml both match" in error
        assert device_ids(agent.emu.resource(DEDICATED) or pytest.fail("no resource")) == {
            "2",
            "3",
            "4",
            "5",
            "6",
            "7",
        }
        # Relabelled back: the error clears and the same pools go on.
        agent.labels.set({"node-group": "big"})
        await agent.emu.wait_for(
            lambda: agent.supervisor.last_config_error is None, what="the error to clear"
        )


async def test_a_bad_edit_of_another_groups_file_keeps_the_last_good_plan(tmp_path: Path) -> None:
    files = {"poolconfig-big.yaml": BIG, "poolconfig-edge.yaml": EDGE}
    async with agent_on_dir(tmp_path, files, {"node-group": "edge"}) as agent:
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"18", "19"}))
        generation = agent.supervisor.config_generation
        # The other group's file now gives the pool another type: the directory is refused as a whole.
        agent.config.write({**files, "poolconfig-big.yaml": BIG.replace("exclusive", "shared")})
        await agent.emu.wait_for(
            lambda: agent.supervisor.last_config_error is not None, what="a config error"
        )
        assert "a pool name keeps one pool type" in (agent.supervisor.last_config_error or "")
        assert agent.supervisor.config_generation == generation
        # Fixed, and the edge file edited in the same write: the edit is served.
        agent.config.write({**files, "poolconfig-edge.yaml": EDGE.replace("18-19", "18-20")})
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"18", "19", "20"}))
        assert agent.supervisor.last_config_error is None


async def test_labels_not_known_yet_serve_nothing_new_until_they_are(tmp_path: Path) -> None:
    files = {"poolconfig-big.yaml": BIG, "poolconfig.yaml": FALLBACK}
    async with agent_on_dir(tmp_path, files, None) as agent:
        await agent.emu.wait_for(lambda: agent.labels.asked > 0, what="the labels to be asked for")
        # Not the fallback: the node may well be a "big" one whose CPUs the fallback would hand out wrongly.
        assert agent.emu.resource(DEDICATED) is None
        assert "not known" in (agent.supervisor.last_config_error or "")
        agent.labels.set({"node-group": "big"})
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"2", "3", "4", "5", "6", "7"}))


async def test_a_directory_without_selectors_never_asks_for_labels(tmp_path: Path) -> None:
    async with agent_on_dir(tmp_path, {"poolconfig.yaml": FALLBACK}, None) as agent:
        await agent.emu.wait_devices(DEDICATED, lambda s: lists(s, {"20"}))
        assert agent.labels.asked == 0


# --- the API source without an API


async def test_without_node_name_the_watch_says_why_and_labels_stay_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    watch = NodeLabelWatch(None, lambda: None)
    assert watch.labels() is None
    with captured_logs(monkeypatch, nodelabels) as logs:
        await asyncio.wait_for(watch.run(), 5)
    assert "NODE_NAME is not set" in watch.unknown_reason
    assert any(entry["event"] == "nodelabels.no_node_name" for entry in logs)


async def test_an_unreachable_api_is_retried_with_backoff_and_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kubeconfig naming a port nothing listens on (outside a pod there is no service account).
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    watch = NodeLabelWatch(
        "node-1",
        lambda: None,
        service_account_dir=tmp_path / "no-service-account",
        backoff_start_s=0.01,
        backoff_max_s=0.04,
    )
    watch.labels()
    with captured_logs(monkeypatch, nodelabels) as logs:
        task = asyncio.create_task(watch.run())
        try:
            for _ in range(500):
                if sum(1 for e in logs if e["event"] == "nodelabels.unavailable") >= 4:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    failures = [e for e in logs if e["event"] == "nodelabels.unavailable"]
    assert len(failures) >= 4, logs
    assert [e["retry_in_s"] for e in failures[:4]] == [0.01, 0.02, 0.04, 0.04]
    assert "cannot reach the Kubernetes API" in failures[0]["reason"]
    assert watch.labels() is None and "cannot reach" in watch.unknown_reason


class ExpiringApi:
    """A stand-in for lightkube's AsyncClient whose first watch fails with 410 Gone (the resourceVersion is
    older than the server's watch cache), as after a long disconnection."""

    def __init__(self) -> None:
        self.gets = 0
        self.watched_from: list[str | None] = []

    async def get(self, _kind: Any, name: str) -> Any:
        from lightkube.models.meta_v1 import ObjectMeta  # noqa: PLC0415
        from lightkube.resources.core_v1 import Node  # noqa: PLC0415

        self.gets += 1
        group = "edge" if self.gets == 1 else "big"
        return Node(
            metadata=ObjectMeta(name=name, labels={"node-group": group}, resourceVersion=str(self.gets))
        )

    def watch(self, _kind: Any, **options: Any) -> AsyncIterator[tuple[str, Any]]:
        self.watched_from.append(options["resource_version"])
        return self._events(len(self.watched_from))

    async def _events(self, number: int) -> AsyncIterator[tuple[str, Any]]:
        from lightkube.core.exceptions import ApiError  # noqa: PLC0415
        from lightkube.models.meta_v1 import Status  # noqa: PLC0415

        if number == 1:
            raise ApiError(status=Status(code=410, message="too old resource version: 1 (50)"))
        await asyncio.Event().wait()
        yield ("MODIFIED", None)  # never reached: the test ends while the watch waits

    async def close(self) -> None:
        pass


async def test_an_expired_watch_reads_the_node_again_and_watches_from_there() -> None:
    api = ExpiringApi()
    changes: list[int] = []
    watch = NodeLabelWatch("n1", lambda: changes.append(1), client_factory=lambda: api)
    watch.labels()
    task = asyncio.create_task(watch.run())
    try:
        for _ in range(500):
            if len(api.watched_from) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # First from the get's version; after the 410, a new get and a watch from its version, not a retry with
    # backoff: the labels the second get brought are in force.
    assert api.watched_from[:2] == ["1", "2"]
    assert watch.labels() == {"node-group": "big"} and len(changes) == 2


class FailingWatchApi(ExpiringApi):
    """Reads the Node every time, then every watch fails with a server error."""

    async def _events(self, number: int) -> AsyncIterator[tuple[str, Any]]:
        from lightkube.core.exceptions import ApiError  # noqa: PLC0415
        from lightkube.models.meta_v1 import Status  # noqa: PLC0415

        raise ApiError(status=Status(code=500, message="etcd is gone"))
        yield ("MODIFIED", None)  # makes this an async generator, as lightkube's watch is


async def test_a_failure_after_a_good_read_starts_the_backoff_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    watch = NodeLabelWatch(
        "n1", lambda: None, client_factory=FailingWatchApi, backoff_start_s=0.01, backoff_max_s=1.0
    )
    watch.labels()
    with captured_logs(monkeypatch, nodelabels) as logs:
        task = asyncio.create_task(watch.run())
        try:
            for _ in range(500):
                if sum(1 for e in logs if e["event"] == "nodelabels.unavailable") >= 3:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    failures = [e for e in logs if e["event"] == "nodelabels.unavailable"]
    # Each attempt got the Node, so none waits longer than the first: an API that answers is retried soon.
    assert [e["retry_in_s"] for e in failures[:3]] == [0.01, 0.01, 0.01]
    assert "answered 500: etcd is gone" in failures[0]["reason"]
    assert failures[0]["keeping"] == "the labels read last"
