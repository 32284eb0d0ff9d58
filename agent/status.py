"""`cpupool status`: what the agent serves, and which pods hold which CPUs.

Asks each of the agent's sockets its status method (agent.statusapi: a summary, and the CPUs of the IDs each
holder has; it is neither a ListAndWatch stream nor an Allocate, so nothing is counted or held for it) and the
kubelet's PodResources API (who holds which IDs).
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
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.exceptions import ProtocolError, StreamTerminatedError

from agent.podresources import Assignment, PodResourcesError, list_raw
from agent.protowire import LEN, fields
from agent.statusapi import DESCRIBE_PATH, DescribeReply, DescribeRequest

SOCKET_PREFIX = "cpupool-"
# Per call; a 200,000-device pool answers in a fraction of it.
CALL_TIMEOUT_S = 5.0


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
    # Open ListAndWatch streams: 1 while the kubelet watches the resource.
    streams: int = 0
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


async def _ask(socket: Path, holders: list[list[str]]) -> DescribeReply:
    channel = Channel(path=str(socket))
    try:
        method: UnaryUnaryMethod[DescribeRequest, DescribeReply] = UnaryUnaryMethod(
            channel, DESCRIBE_PATH, DescribeRequest, DescribeReply
        )
        return await method(DescribeRequest.of(holders), timeout=CALL_TIMEOUT_S)
    finally:
        channel.close()


async def _describe(socket: Path) -> ServedResource | None:
    try:
        reply = await _ask(socket, [])
    except (GRPCError, OSError, TimeoutError, StreamTerminatedError, ProtocolError, ValueError) as exc:
        print(f"cpupool status: {socket}: {exc!r}", file=sys.stderr)
        return None
    return ServedResource(
        resource=reply.resource,
        socket=socket.name,
        preferred_allocation=reply.preferred_allocation,
        devices=reply.devices,
        healthy=reply.healthy,
        cpus=reply.cpus,
        streams=reply.streams,
    )


def assignments(data: bytes) -> list[Assignment]:
    """Every container's device IDs per resource, from a serialized PodResources List answer.

    The generic decoder takes seconds when a pod holds 150,000 millicpus; this reads only what status shows.
    ListPodResourcesResponse.pod_resources = 1; PodResources: name = 1, namespace = 2, containers = 3;
    ContainerResources: name = 1, devices = 2; ContainerDevices: resource_name = 1, device_ids = 2."""
    found = []
    for number, pod in fields(data):
        if number != 1 or not isinstance(pod, bytes):
            continue
        name = namespace = ""
        containers = []
        for key, value in fields(pod):
            if isinstance(value, bytes):
                if key == 1:
                    name = value.decode()
                elif key == 2:
                    namespace = value.decode()
                elif key == 3:
                    containers.append(value)
        for container in containers:
            container_name = ""
            by_resource: dict[bytes, list[str]] = {}
            for key, value in fields(container):
                if key == 1 and isinstance(value, bytes):
                    container_name = value.decode()
                elif key == 2 and isinstance(value, bytes):
                    _device_entry(value, by_resource)
            found += [
                Assignment(namespace, name, container_name, resource.decode(), tuple(ids))
                for resource, ids in by_resource.items()
            ]
    return found


def _device_entry(entry: bytes, by_resource: dict[bytes, list[str]]) -> None:
    """One ContainerDevices message into `by_resource`. The kubelet sends one per device (each with its NUMA
    node), so this is the hot loop: one-byte keys and lengths are read inline, anything else by `fields`."""
    resource = b""
    ids: list[str] = []
    pos, end = 0, len(entry)
    while pos + 1 < end:
        key, length = entry[pos], entry[pos + 1]
        if key & 0x80 or length & 0x80 or key & 7 != LEN:
            break
        stop = pos + 2 + length
        if stop > end:
            raise ValueError("truncated ContainerDevices field")
        if key == 0x0A:
            resource = entry[pos + 2 : stop]
        elif key == 0x12:
            ids.append(entry[pos + 2 : stop].decode())
        pos = stop
    else:
        if pos == end:
            by_resource.setdefault(resource, []).extend(ids)
            return
    resource = b""
    ids = []
    for key, value in fields(entry):
        if key == 1 and isinstance(value, bytes):
            resource = value
        elif key == 2 and isinstance(value, bytes):
            ids.append(value.decode())
    by_resource.setdefault(resource, []).extend(ids)


async def _pod_assignments(socket: Path) -> list[Assignment]:
    try:
        return assignments(await list_raw(socket, timeout_s=CALL_TIMEOUT_S))
    except ValueError as exc:
        raise PodResourcesError(f"{socket}: List answer is malformed: {exc}") from exc


async def collect(plugin_dir: Path, pod_resources: Path) -> tuple[list[ServedResource], str | None]:
    sockets = await asyncio.to_thread(lambda: sorted(plugin_dir.glob(f"{SOCKET_PREFIX}*.sock")))
    # The agent's sockets and the kubelet's record are asked at once.
    describing = asyncio.gather(*(_describe(s) for s in sockets))
    try:
        held: list[Assignment] | str = await _pod_assignments(pod_resources)
    except PodResourcesError as exc:
        held = str(exc)
    finally:
        found = [r for r in await describing if r is not None]
    if isinstance(held, str):
        return found, held
    by_name = {r.resource: r for r in found}
    # The kubelet reports one entry per device (each with its own NUMA topology): group them per container.
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for item in held:
        if item.resource in by_name:
            key = (item.resource, f"{item.namespace}/{item.pod}", item.container)
            grouped.setdefault(key, []).extend(item.device_ids)
    per_resource: dict[str, list[tuple[str, str, list[str]]]] = {}
    for (name, pod, container), ids in grouped.items():
        per_resource.setdefault(name, []).append((pod, container, ids))
    await asyncio.gather(*(_resolve(plugin_dir, by_name[n], h) for n, h in per_resource.items()))
    return found, None


async def _resolve(
    plugin_dir: Path, resource: ServedResource, holders: list[tuple[str, str, list[str]]]
) -> None:
    """Ask the agent which CPUs each holder's IDs mean (one call for every holder of the resource)."""
    try:
        reply = await _ask(plugin_dir / resource.socket, [ids for _, _, ids in holders])
        answers = [
            r.cpus + (f" (+{r.unknown} IDs unknown to the agent)" if r.unknown else "") for r in reply.holders
        ]
        if len(answers) != len(holders):
            raise ValueError(f"{len(answers)} answers for {len(holders)} holders")
    except (GRPCError, OSError, TimeoutError, StreamTerminatedError, ProtocolError, ValueError) as exc:
        answers = [f"? ({exc!r})"] * len(holders)
    for (pod, container, ids), cpus in zip(holders, answers, strict=True):
        resource.holders.append(Holder(pod, container, ids, cpus))


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
