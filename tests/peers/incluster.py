"""cpupool's pieces run on this machine as they would run in the cluster of `ControlPlane` (apiserver.py).

- `ProjectedVolume`: what the kubelet does for a ConfigMap or Secret volume, from the object in the API
  server: every key a file behind the `..data` symlink, updated by swapping that symlink.
- `localize_args`: a container's command line from the chart, with the paths it has in the pod (its volume
  mounts) pointed at the local directories that stand in for them.
- `LocalWebhook`: `cpupool webhook` (the real CLI, a subprocess) run with the chart's command line, TLS Secret
  and pool ConfigMap, bound to the ClusterIP and port of the chart's Service, where the API server calls it.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .apiserver import ControlPlaneError, Doc, KubeAPI

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_START_TIMEOUT_S = 60.0


class ProjectedVolume:
    """A directory laid out as the kubelet lays out a ConfigMap or Secret volume (no subPath)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def write(self, files: Mapping[str, bytes]) -> None:
        """Replace the volume's content at once: a new data directory, then one rename of `..data`."""
        # The kubelet's name: a timestamp and a random part (two writes in one second never collide).
        data_dir = self.path / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets.token_hex(5)}"
        data_dir.mkdir()
        for name, content in files.items():
            (data_dir / name).write_bytes(content)
        data = self.path / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.path / "..data_tmp"
        tmp.symlink_to(data_dir.name)
        os.replace(tmp, data)
        for name in files:
            visible = self.path / name
            if not visible.is_symlink():
                visible.symlink_to(f"..data/{name}")
        # Keys gone from the object disappear from the volume, as the kubelet removes them.
        for entry in self.path.iterdir():
            if not entry.name.startswith("..") and entry.name not in files:
                entry.unlink()
        if old is not None:
            shutil.rmtree(self.path / old)

    def project_configmap(self, api: KubeAPI, namespace: str, name: str) -> Doc:
        """The ConfigMap as it is in the API server now, written into the volume; the object."""
        configmap = api.read("v1", "ConfigMap", name, namespace)
        self.write({key: value.encode() for key, value in (configmap.get("data") or {}).items()})
        return configmap

    def project_secret(self, api: KubeAPI, namespace: str, name: str) -> Doc:
        secret = api.read("v1", "Secret", name, namespace)
        self.write({key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()})
        return secret


class UnmappedPath(Exception):
    """A container argument names a path in the pod that the test gave no local stand-in for."""


def localize_args(args: Sequence[str], paths: Mapping[str, Path]) -> list[str]:
    """`args` with every `--flag=/path` under a key of `paths` (a path in the pod) moved to its value (the
    local directory). An absolute path under none of them is an error: the chart grew a path this test
    does not provide, and running with the pod's path would touch this machine's real one."""
    prefixes = sorted(paths, key=len, reverse=True)
    local: list[str] = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if eq and value.startswith("/"):
            prefix = next((p for p in prefixes if value == p or value.startswith(p.rstrip("/") + "/")), None)
            if prefix is None:
                raise UnmappedPath(
                    f"{arg}: no local directory stands in for {value} (mapped: {sorted(paths)})"
                )
            local.append(f"{flag}={paths[prefix]}{value[len(prefix) :]}")
        else:
            local.append(arg)
    return local


class LocalWebhook:
    """`python -m agent.cli webhook` serving the chart's Service from this machine.

    `args` is the chart's command line for the webhook container, localized (its TLS and config volumes are
    projected directories here); `host`/`port` are the Service's ClusterIP and port, which the API server
    dials for a webhook's service reference, and replace the container's port. `server_name` is the name
    the API server checks the certificate against (`<service>.<namespace>.svc`)."""

    def __init__(
        self, args: Sequence[str], host: str, port: int, server_name: str, ca_pem: bytes, log: Path
    ) -> None:
        self.args = [a for a in args if not a.startswith(("--port=", "--host="))]
        self.host = host
        self.port = port
        self.server_name = server_name
        self.ca_pem = ca_pem
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalWebhook:
        self.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        argv = [sys.executable, "-m", "agent.cli", *self.args, f"--host={self.host}", f"--port={self.port}"]
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_healthy()

    def healthz(self) -> int:
        """The status of GET /healthz (see `health`)."""
        return self.health()[0]

    def health(self) -> tuple[int, Any]:
        """GET /healthz over TLS, the certificate checked as the API server checks it: against the chart's
        CA, for the Service's DNS name (while connecting to its ClusterIP). The status and the JSON body."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        with (
            socket.create_connection((self.host, self.port), timeout=5) as plain,
            context.wrap_socket(plain, server_hostname=self.server_name) as tls,
        ):
            request = f"GET /healthz HTTP/1.1\r\nHost: {self.server_name}\r\nConnection: close\r\n\r\n"
            tls.sendall(request.encode())
            answer = http.client.HTTPResponse(tls)
            answer.begin()
            raw = answer.read()
            try:
                return answer.status, json.loads(raw)
            except json.JSONDecodeError:
                return answer.status, raw.decode(errors="replace")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + WEBHOOK_START_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise ControlPlaneError(f"cpupool webhook exited with status {code}:\n{self._log_tail()}")
            try:
                if self.healthz() == 200:
                    return
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise ControlPlaneError(f"cpupool webhook not healthy after {WEBHOOK_START_TIMEOUT_S:.0f} s ({last})")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
