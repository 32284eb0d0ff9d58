"""pytest fixtures for the real API server (registered as a plugin in tests/conftest.py).

- `apiserver_binary` (session): the tests/apiserver binary (kube-apiserver and etcd), built once per machine
  and cached. Skips the test, with the reason, only where `go` is missing and nothing is cached; a failing
  build is an error.
- `kube_apiserver` (session): a started `ControlPlane` (etcd + kube-apiserver on loopback, RBAC, webhooks
  admitted) shared by every test of the run; tests give their objects names of their own.
- `helm_cli` (session): the Helm CLI the chart tests use (HELM, the venv's `make helm`, or helm on PATH).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .apiserver import ControlPlane, ControlPlaneError, find_or_build_apiserver
from .build import PeerBuildError, PeerUnavailable


@pytest.fixture(scope="session")
def apiserver_binary() -> Path:
    try:
        return find_or_build_apiserver()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    except PeerBuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kube_apiserver(
    apiserver_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("control-plane")
    try:
        with ControlPlane.start(apiserver_binary, workdir) as plane:
            yield plane
    except ControlPlaneError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def helm_cli() -> str:
    """The Helm CLI: $HELM, the venv's (`make helm` puts it there), else helm on PATH.

    `make test` installs it first; a bare pytest run without it fails here naming the fix, since a missing
    helm is a missing install step, not a reason to skip."""
    override = os.environ.get("HELM")
    if override:
        return override
    venv_helm = Path(sys.prefix) / "bin" / "helm"
    if venv_helm.is_file():
        return str(venv_helm)
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    pytest.fail("no helm: run `make helm` (installs it into the venv) or set HELM", pytrace=False)
