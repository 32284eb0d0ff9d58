"""`cpupool status`: what the agent serves, and which pods hold which CPUs.

Asks the agent's own sockets (the first ListAndWatch list, and Allocate, which is side-effect free and
idempotent, to turn device IDs into CPUs) and the kubelet's PodResources API (who holds which IDs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grpclib import GRPCError
from grpclib.client import Channel

from agent.kubeletapi.v1beta1 import (
    AllocateRequest,
    ContainerAllocateRequest,
    DevicePluginStub,
    Empty,
)
from agent.podresources import PodResourcesError, list_assignments

SOCKET_PREFIX = "cpupool-"


@dataclass
class Holder:
    pod: str
    container: str
    device_ids: list[str]
    cpus: str


@dataclass
class ServedResource:
    resource: str
    socket: str
    preferred_allocation: bool
    devices: int
    healthy: int
    cpus: str
    holders: list[Holder] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin-dir", type=Path, default=Path("/var/lib/kubelet/device-plugins"))
    parser.add_argument(
        "--pod-resources-socket", type=Path, default=Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--agent-url",
        default="http://127.0.0.1:8081",
        help="the agent's health port, for the cpusets it enforced through NRI (its /enforcement)",
    )


async def _cpus_of(stub: DevicePluginStub, ids: list[str]) -> tuple[str, str]:
    """(resource name, CPU list) for these IDs, read from Allocate's annotation ``<base>/cpus-<pool>``."""
    reply = await stub.allocate(
        AllocateRequest(container_requests=[ContainerAllocateRequest(devices_ids=ids)]), timeout=5
    )
    for key, value in reply.container_responses[0].annotations.items():
        base, _, rest = key.partition("/")
        if rest.startswith("cpus-"):
            return f"{base}/{rest.removeprefix('cpus-')}", value
    return "", ""


async def _describe(socket: Path) -> ServedResource | None:
    channel = Channel(path=str(socket))
    try:
        stub = DevicePluginStub(channel)
        options = await stub.get_device_plugin_options(Empty(), timeout=5)
        devices = []
        stream = stub.list_and_watch(Empty(), timeout=5)
        try:
            async for first in stream:
                devices = list(first.devices)
                break
        finally:
            # The generated client returns an async generator: close it so the stream ends now.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        healthy = [d.id for d in devices if d.health == "Healthy"]
        ids = [d.id for d in devices]
        name, cpus = await _cpus_of(stub, ids) if ids else ("", "")
        return ServedResource(
            resource=name or socket.name,
            socket=socket.name,
            preferred_allocation=options.get_preferred_allocation_available,
            devices=len(devices),
            healthy=len(healthy),
            cpus=cpus,
        )
    except (GRPCError, OSError, TimeoutError) as exc:
        print(f"cpupool status: {socket}: {exc!r}", file=sys.stderr)
        return None
    finally:
        channel.close()


async def collect(plugin_dir: Path, pod_resources: Path) -> tuple[list[ServedResource], str | None]:
    sockets = await asyncio.to_thread(lambda: sorted(plugin_dir.glob(f"{SOCKET_PREFIX}*.sock")))
    found = [r for r in await asyncio.gather(*(_describe(s) for s in sockets)) if r is not None]
    try:
        assignments = await list_assignments(pod_resources)
    except PodResourcesError as exc:
        return found, str(exc)
    by_name = {r.resource: r for r in found}
    # The kubelet reports one entry per device (each with its own NUMA topology): group them per container.
    held: dict[tuple[str, str, str], list[str]] = {}
    for item in assignments:
        if item.resource in by_name:
            held.setdefault((item.resource, f"{item.namespace}/{item.pod}", item.container), []).extend(
                item.device_ids
            )
    for (name, pod, container), ids in held.items():
        resource = by_name[name]
        channel = Channel(path=str(plugin_dir / resource.socket))
        try:
            _, cpus = await _cpus_of(DevicePluginStub(channel), ids)
        except (GRPCError, OSError, TimeoutError) as exc:
            cpus = f"? ({exc!r})"
        finally:
            channel.close()
        resource.holders.append(Holder(pod, container, ids, cpus))
    return found, None


async def fetch_enforcement(agent_url: str) -> dict[str, Any]:
    """The agent's /enforcement report; {"error": reason} when it cannot be read."""
    from aiohttp import ClientError, ClientSession, ClientTimeout  # noqa: PLC0415

    try:
        async with (
            ClientSession(timeout=ClientTimeout(total=5)) as session,
            session.get(agent_url.rstrip("/") + "/enforcement") as reply,
        ):
            reply.raise_for_status()
            body = await reply.json()
    except (ClientError, OSError, TimeoutError, ValueError) as exc:
        return {"error": f"{agent_url}: {exc!r}"}
    return body if isinstance(body, dict) else {"error": f"{agent_url}: not a JSON object"}


def render_enforcement(report: dict[str, Any]) -> str:
    if "error" in report:
        return f"enforced cpusets unknown: {report['error']}"
    nri = report.get("nri") or {}
    if nri.get("enabled") is False:
        lines = ["NRI: disabled (--no-nri): cpusets are not enforced"]
    else:
        state = "connected" if nri.get("connected") else f"not connected ({nri.get('last_error')})"
        lines = [f"NRI: {state}, policy {nri.get('policy')}, runtime {nri.get('runtime') or '?'}"]
    accounting = report.get("kubelet_accounting")
    if accounting:
        lines.append(f"kubelet CPU accounting: {accounting['verdict']}: {accounting['detail']}")
    lines.append("")
    lines.append(f"{'POD':<36} {'CONTAINER':<16} {'KIND':<10} ENFORCED CPUSET")
    for c in report.get("containers") or []:
        cpus = c["cpus"] if c["cpus"] is not None else "(as the runtime set it)"
        lines.append(f"{c['pod']:<36} {c['container']:<16} {c['kind']:<10} {cpus}")
    return "\n".join(lines)


def render(resources: list[ServedResource], problem: str | None) -> str:
    lines = [f"{'RESOURCE':<28} {'DEVICES':>8} {'HEALTHY':>8} {'PREFERRED':<9}  CPUS"]
    for r in resources:
        preferred = "yes" if r.preferred_allocation else "no"
        lines.append(f"{r.resource:<28} {r.devices:>8} {r.healthy:>8} {preferred:<9}  {r.cpus}")
    lines.append("")
    lines.append(f"{'POD':<36} {'CONTAINER':<16} {'RESOURCE':<28} {'DEVICES':>8}  CPUS")
    holders = [(r, h) for r in resources for h in r.holders]
    for r, h in holders:
        lines.append(f"{h.pod:<36} {h.container:<16} {r.resource:<28} {len(h.device_ids):>8}  {h.cpus}")
    if not holders:
        lines.append("(no pod holds a device)" if problem is None else f"(pods unknown: {problem})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    resources, problem = asyncio.run(collect(args.plugin_dir, args.pod_resources_socket))
    enforcement = asyncio.run(fetch_enforcement(args.agent_url))
    if args.json:
        print(
            json.dumps(
                {
                    "resources": [asdict(r) for r in resources],
                    "pod_resources_error": problem,
                    "enforcement": enforcement,
                },
                indent=2,
            )
        )
    else:
        print(render(resources, problem))
        print()
        print(render_enforcement(enforcement))
    if not resources:
        print(
            f"cpupool status: no agent socket ({SOCKET_PREFIX}*.sock) answers in {args.plugin_dir}",
            file=sys.stderr,
        )
        return 1
    return 0
