"""Finding (and, once per machine, building) the kubelet peer binary from tests/kubeletpeer/.

The binary lives outside the repository in ``${XDG_CACHE_HOME:-$HOME/.cache}/cpupool/<hash>/kubelet-peer``;
<hash> covers go.mod, go.sum, build.sh and the Go sources, computed exactly as tests/kubeletpeer/build.sh
does, so ``make kubelet-peer`` and the tests agree on one cached build. ``CPUPOOL_KUBELET_PEER`` names a
binary to use instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parents[1] / "kubeletpeer"
BUILD_SCRIPT = SOURCE_DIR / "build.sh"
ENV_BINARY = "CPUPOOL_KUBELET_PEER"


class PeerUnavailable(Exception):
    """The peer cannot be had on this machine for a reason that is not a failure (no Go toolchain)."""


class PeerBuildError(Exception):
    """Go is there but building the peer failed; the message carries the compiler's output."""


def source_hash() -> str:
    """The cache key: sha256 of go.mod, go.sum, build.sh and the *.go files (byte order of names), 16 hex
    digits; the same bytes in the same order as build.sh hashes them."""
    digest = hashlib.sha256()
    files = [SOURCE_DIR / "go.mod", SOURCE_DIR / "go.sum", BUILD_SCRIPT]
    files += sorted(SOURCE_DIR.glob("*.go"), key=lambda p: os.fsencode(p.name))
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cpupool"


def cached_binary() -> Path:
    return cache_root() / source_hash() / "kubelet-peer"


def find_or_build() -> Path:
    """The peer binary: $CPUPOOL_KUBELET_PEER, else the cached build, else built now (minutes when cold).

    Raises PeerUnavailable when `go` is missing and nothing is cached, PeerBuildError when the build fails.
    """
    override = os.environ.get(ENV_BINARY)
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise PeerBuildError(f"{ENV_BINARY}={override} is not an executable file")
        return path
    binary = cached_binary()
    if os.access(binary, os.X_OK):
        return binary
    if shutil.which("go") is None:
        raise PeerUnavailable(
            "`go` is not on PATH, so the kubelet peer (tests/kubeletpeer, the kubelet's own device manager) "
            f"cannot be built and none is cached at {binary}"
        )
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PeerBuildError(
            f"building the kubelet peer failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    built = Path(done.stdout.strip().splitlines()[-1])
    if built != binary:
        raise PeerBuildError(f"build.sh produced {built}, but the tests expected {binary} (hash mismatch)")
    return binary
