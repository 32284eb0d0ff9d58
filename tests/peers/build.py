"""Finding (and, once per machine, building) the Go test peers that have their own build.sh: the kubelet
peer (tests/kubeletpeer/) and the API server peer (tests/apiserver/).

A binary lives outside the repository in ``${XDG_CACHE_HOME:-$HOME/.cache}/cpupool/<prefix><hash>/<name>``;
<hash> covers go.mod, go.sum, build.sh and the Go sources, computed exactly as the peer's build.sh does, so
``make`` and the tests agree on one cached build. An environment variable per peer (``CPUPOOL_KUBELET_PEER``,
``CPUPOOL_APISERVER_PEER``) names a binary to use instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]


class PeerUnavailable(Exception):
    """The peer cannot be had on this machine for a reason that is not a failure (no Go toolchain)."""


class PeerBuildError(Exception):
    """Go is there but building the peer failed; the message carries the compiler's output."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cpupool"


@dataclass(frozen=True)
class GoPeer:
    """One peer program: where its sources are and where its build.sh caches the binary."""

    title: str
    """What it is, for messages: "the kubelet peer (tests/kubeletpeer, ...)"."""
    source_dir: Path
    env_binary: str
    binary_name: str
    cache_prefix: str = ""

    @property
    def build_script(self) -> Path:
        return self.source_dir / "build.sh"

    def source_hash(self) -> str:
        """The cache key: sha256 of go.mod, go.sum, build.sh and the *.go files (byte order of names), 16
        hex digits; the same bytes in the same order as build.sh hashes them."""
        digest = hashlib.sha256()
        files = [self.source_dir / "go.mod", self.source_dir / "go.sum", self.build_script]
        files += sorted(self.source_dir.glob("*.go"), key=lambda p: os.fsencode(p.name))
        for path in files:
            digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    def cached_binary(self) -> Path:
        return cache_root() / f"{self.cache_prefix}{self.source_hash()}" / self.binary_name

    def find_or_build(self) -> Path:
        """The binary: the environment's override, else the cached build, else built now (minutes when cold).

        Raises PeerUnavailable when `go` is missing and nothing is cached, PeerBuildError when the build
        fails."""
        override = os.environ.get(self.env_binary)
        if override:
            path = Path(override)
            if not os.access(path, os.X_OK):
                raise PeerBuildError(f"{self.env_binary}={override} is not an executable file")
            return path
        binary = self.cached_binary()
        if os.access(binary, os.X_OK):
            return binary
        if shutil.which("go") is None:
            raise PeerUnavailable(
                f"`go` is not on PATH, so {self.title} cannot be built and none is cached at {binary}"
            )
        done = subprocess.run(["bash", str(self.build_script)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PeerBuildError(
                f"building {self.title} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
            )
        built = Path(done.stdout.strip().splitlines()[-1])
        if built != binary:
            raise PeerBuildError(
                f"build.sh produced {built}, but the tests expected {binary} (hash mismatch)"
            )
        return binary


KUBELET_PEER = GoPeer(
    "the kubelet peer (tests/kubeletpeer, the kubelet's own device manager)",
    _TESTS / "kubeletpeer",
    "CPUPOOL_KUBELET_PEER",
    "kubelet-peer",
)
APISERVER_PEER = GoPeer(
    "the API server peer (tests/apiserver: kube-apiserver and etcd)",
    _TESTS / "apiserver",
    "CPUPOOL_APISERVER_PEER",
    "apiserver-peer",
    cache_prefix="apiserver-",
)
# The kubelet peer's, under the names the tests and the bench import.
source_hash = KUBELET_PEER.source_hash
cached_binary = KUBELET_PEER.cached_binary
find_or_build = KUBELET_PEER.find_or_build
