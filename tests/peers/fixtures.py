"""pytest fixtures for kubelet peers (registered as a plugin in tests/conftest.py).

- `kubelet_peer_binary` (session): the tests/kubeletpeer binary, built once per machine and cached. Skips the
  test, with the reason, only where `go` is missing and nothing is cached; a failing build is an error.
- `peer` (parametrised "emulator" / "kubelet"): the name to hand to tests.harness.running_agent(peer=...);
  `any_peer` adds "emulator-1.36" (the registration behaviour of kubelets v1.34 to v1.36).
- `base_dir`, `plugin_dir`, `pod_resources_socket`: short temporary paths (unix sockets allow 107 bytes).
- `make_plugin`: started grpcio FakePlugins in `plugin_dir`, stopped after the test.
- `kubelet` (parametrised): a started KubeletEmulator or KubeletPeer on those paths.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.emulator import KubeletEmulator
from tests.emulator.fakeplugin import FakePlugin

from .build import PeerBuildError, PeerUnavailable, find_or_build
from .real import KubeletPeer

PEERS = ("emulator", "kubelet")


@pytest.fixture(scope="session")
def kubelet_peer_binary() -> Path:
    try:
        return find_or_build()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    except PeerBuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(params=PEERS)
def peer(request: pytest.FixtureRequest) -> str:
    """Which kubelet a test runs against; "kubelet" needs (and so may skip on) the peer binary."""
    name: str = request.param
    if name == "kubelet":
        request.getfixturevalue("kubelet_peer_binary")
    return name


@pytest.fixture(params=(*PEERS, "emulator-1.36"))
def any_peer(request: pytest.FixtureRequest) -> str:
    """`peer`, plus the emulator with the registration behaviour of kubelets v1.34 to v1.36: for scenarios
    where those releases differ from v1.37 (re-registration, stream ends)."""
    name: str = request.param
    if name == "kubelet":
        request.getfixturevalue("kubelet_peer_binary")
    return name


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths are limited to 107 bytes and pytest's directories can be long.
    path = Path(tempfile.mkdtemp(prefix="emu-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin_dir(base_dir: Path) -> Path:
    path = base_dir / "device-plugins"
    path.mkdir()
    return path


@pytest.fixture
def pod_resources_socket(base_dir: Path) -> Path:
    return base_dir / "pod-resources" / "kubelet.sock"


@pytest.fixture
def make_plugin(plugin_dir: Path) -> Iterator[Callable[..., FakePlugin]]:
    plugins: list[FakePlugin] = []

    def make(devices: Sequence[Any], name: str = "fake.sock", preferred: bool = False) -> FakePlugin:
        plugin = FakePlugin(plugin_dir, name, devices, preferred=preferred)
        plugin.start()
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        plugin.stop()


@pytest.fixture
async def kubelet(
    peer: str, plugin_dir: Path, pod_resources_socket: Path, request: pytest.FixtureRequest
) -> AsyncIterator[KubeletEmulator | KubeletPeer]:
    """A started kubelet of the parametrised kind on `plugin_dir` and `pod_resources_socket`."""
    instance: KubeletEmulator | KubeletPeer
    if peer == "kubelet":
        binary = request.getfixturevalue("kubelet_peer_binary")
        instance = KubeletPeer(plugin_dir, pod_resources_socket, binary=binary)
    else:
        instance = KubeletEmulator(plugin_dir, pod_resources_socket, dial_timeout=2.0, rpc_timeout=5.0)
    async with instance:
        yield instance
