"""PodResources API v1 (`v1.PodResourcesLister`) served from the emulator's books.

In the real kubelet this socket lives in its own directory (/var/lib/kubelet/pod-resources), so it is not
touched by the device-plugin directory cleanup; the kubelet process serves it, so it is down while the
emulator restarts. Calls go through the kubelet's rate limiter.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import structlog

from .model import DeviceInfo, EmulatorError
from .protos import PODRESOURCES
from .state import DeviceManager

log = structlog.get_logger(__name__)

_pb = PODRESOURCES.pb2

UNIX_PATH_MAX = 107
"""Longest unix socket path (sun_path is 108 bytes including the terminating NUL)."""


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise EmulatorError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; unix sockets allow {UNIX_PATH_MAX}. "
            "Use a shorter directory (for example tempfile.mkdtemp())."
        )


def container_devices(resource: str, devices: Iterable[DeviceInfo]) -> list[Any]:
    """One ContainerDevices per device and NUMA node, as the kubelet emits them (clients must merge)."""
    out = []
    for d in sorted(devices, key=lambda d: d.id):
        if d.numa_nodes is None:
            out.append(_pb.ContainerDevices(resource_name=resource, device_ids=[d.id]))
            continue
        for node in d.numa_nodes:
            out.append(
                _pb.ContainerDevices(
                    resource_name=resource,
                    device_ids=[d.id],
                    topology=_pb.TopologyInfo(nodes=[_pb.NUMANode(ID=node)]),
                )
            )
    return out


RATE_LIMIT_QPS = 100
RATE_LIMIT_BURST = 10
"""The kubelet's PodResources limiter (podresources.DefaultQPS / DefaultBurstTokens): one token bucket for
every call on the socket; a call without a token fails with RESOURCE_EXHAUSTED "rejected by rate limit"."""


class TokenBucket:
    """golang.org/x/time/rate's Limiter.Allow: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class _PodResourcesService:
    """grpcio servicer for v1.PodResourcesLister."""

    def __init__(self, books: DeviceManager) -> None:
        self._books = books
        self._limiter = TokenBucket(RATE_LIMIT_QPS, RATE_LIMIT_BURST)

    def _limit(self, context: Any) -> None:
        if not self._limiter.allow():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected by rate limit")

    def _pod(
        self, namespace: str, name: str, containers: dict[str, dict[str, tuple[DeviceInfo, ...]]]
    ) -> Any:
        return _pb.PodResources(
            name=name,
            namespace=namespace,
            containers=[
                _pb.ContainerResources(
                    name=cname,
                    devices=[
                        cd for res, devs in sorted(by_res.items()) for cd in container_devices(res, devs)
                    ],
                )
                for cname, by_res in containers.items()
            ],
        )

    def List(self, request: Any, context: Any) -> Any:  # gRPC method names
        self._limit(context)
        pods = self._books.pods()
        return _pb.ListPodResourcesResponse(
            pod_resources=[self._pod(ns, name, containers) for (ns, name), containers in pods.items()]
        )

    def GetAllocatableResources(self, request: Any, context: Any) -> Any:
        self._limit(context)
        allocatable = self._books.allocatable()
        return _pb.AllocatableResourcesResponse(
            devices=[cd for res, devs in allocatable.items() for cd in container_devices(res, devs)]
        )

    def Get(self, request: Any, context: Any) -> Any:
        self._limit(context)
        containers = self._books.pods().get((request.pod_namespace, request.pod_name))
        if containers is None:
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
            )
        return _pb.GetPodResourcesResponse(
            pod_resources=self._pod(request.pod_namespace, request.pod_name, containers or {})
        )


class PodResourcesServer:
    """Owns the grpcio server on the PodResources socket."""

    def __init__(self, socket_path: Path, books: DeviceManager) -> None:
        self.socket_path = socket_path
        self._books = books
        self._server: Any = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        check_socket_path(self.socket_path)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pod-resources")
        server = grpc.server(executor)
        PODRESOURCES.grpc.add_PodResourcesListerServicer_to_server(_PodResourcesService(self._books), server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server, self._executor = server, executor
        log.info("podresources.serving", socket=str(self.socket_path))

    def stop(self) -> None:
        server, executor = self._server, self._executor
        self._server = self._executor = None
        if server is not None:
            server.stop(None).wait()
        if executor is not None:
            executor.shutdown(wait=True)


def query(socket_path: Path | str, method: str = "List", timeout: float = 5.0, **fields: str) -> Any:
    """Call one PodResourcesLister method with grpcio (blocking); returns the protobuf response.

    `method` is "List", "GetAllocatableResources" or "Get" (with pod_name=, pod_namespace=).
    """
    requests = {
        "List": _pb.ListPodResourcesRequest,
        "GetAllocatableResources": _pb.AllocatableResourcesRequest,
        "Get": _pb.GetPodResourcesRequest,
    }
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        stub = PODRESOURCES.grpc.PodResourcesListerStub(channel)
        return getattr(stub, method)(requests[method](**fields), timeout=timeout)


def device_ids_by_resource(entries: Iterable[Any]) -> dict[str, set[str]]:
    """Merge ContainerDevices entries (one per device and NUMA node) into resource -> device IDs."""
    merged: dict[str, set[str]] = {}
    for entry in entries:
        merged.setdefault(entry.resource_name, set()).update(entry.device_ids)
    return merged
