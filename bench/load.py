"""1,000 concurrent Allocate and GetPreferredAllocation calls during a config reload and a kubelet restart."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc

from agent.plan import shared_device_id
from bench.client import PluginClient, allocate_request, preferred_request
from bench.hosts import DUAL64_CONFIG_EDITED
from bench.node import Node
from bench.report import Figure, Target
from bench.stats import summary_ms

DEDICATED, WHOLE_CORES, SHARED = "cpupool.io/dedicated", "cpupool.io/dedicated-ht", "cpupool.io/shared"
EXCLUSIVE_IDS = [str(c) for c in [*range(8, 32), *range(72, 96)]]
CORE_IDS = [str(c) for c in range(32, 64)]
SHARED_AFTER_EDIT = 13000
# Load continues this long after the last disturbance settled, so calls also run against the new state.
TAIL_S = 0.5
# The kubelet sets no deadline; here a call unanswered this long counts as hung (normal: under a second).
CALL_DEADLINE_S = 5.0


@dataclass
class Call:
    resource: str
    method: str
    request: Any
    issued: float = 0.0
    done: float = 0.0
    error: str | None = None


def make_call(i: int) -> Call:
    """What pod admissions send: Allocate on each pool, GetPreferredAllocation on the exclusive ones. The IDs
    stay valid across the reload (it only grows the shared pool), so any error is the agent's."""
    kind = i % 5
    if kind == 0:
        pair = EXCLUSIVE_IDS[(2 * i) % 48 : (2 * i) % 48 + 2]
        return Call(DEDICATED, "Allocate", allocate_request(pair))
    if kind == 1:
        return Call(WHOLE_CORES, "Allocate", allocate_request([CORE_IDS[i % 32]]))
    if kind == 2:
        start = (i * 100) % 11000
        return Call(
            SHARED, "Allocate", allocate_request([shared_device_id(n) for n in range(start, start + 250)])
        )
    if kind == 3:
        return Call(DEDICATED, "GetPreferredAllocation", preferred_request(EXCLUSIVE_IDS, [], 4))
    return Call(WHOLE_CORES, "GetPreferredAllocation", preferred_request(CORE_IDS, [], 2))


class ClosedLoop:
    """Keeps `concurrency` calls in flight as grpcio futures: each completion issues the next call, from the
    event loop, until stop(); then drained() resolves once the last one is back."""

    def __init__(self, clients: dict[str, PluginClient], concurrency: int) -> None:
        self._clients = clients
        self._concurrency = concurrency
        self._numbers = itertools.count()
        self._loop = asyncio.get_running_loop()
        self._in_flight = 0
        self._stopping = False
        self._drained = asyncio.Event()
        self.calls: list[Call] = []

    def start(self) -> None:
        for _ in range(self._concurrency):
            self._issue()

    def _issue(self) -> None:
        call = make_call(next(self._numbers))
        self.calls.append(call)
        self._in_flight += 1
        rpc = getattr(self._clients[call.resource].stub, call.method)
        call.issued = time.monotonic()
        future = rpc.future(call.request, timeout=CALL_DEADLINE_S)
        future.add_done_callback(lambda f, c=call: self._on_done(c, f))

    def _on_done(self, call: Call, future: Any) -> None:
        # grpcio's thread: stamp, then hand over to the loop, which owns every counter.
        call.done = time.monotonic()
        error = future.exception()
        if error is not None:
            code = error.code() if isinstance(error, grpc.Call) else None
            call.error = code.name if code is not None else repr(error)
        self._loop.call_soon_threadsafe(self._next)

    def _next(self) -> None:
        self._in_flight -= 1
        if not self._stopping:
            self._issue()
        elif self._in_flight == 0:
            self._drained.set()

    async def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping = True
        if self._in_flight:
            await asyncio.wait_for(self._drained.wait(), timeout_s)


def _retry(clients: dict[str, PluginClient], calls: list[Call]) -> Counter[str]:
    errors: Counter[str] = Counter()
    for call in calls:
        try:
            clients[call.resource].timed(call.method, call.request)
        except grpc.RpcError as exc:
            errors[f"{call.method}: {exc.code().name}"] += 1
    return errors


async def load_figure(node: Node, concurrency: int) -> Figure:
    clients = {name: PluginClient(node.socket(name)) for name in (DEDICATED, WHOLE_CORES, SHARED)}
    try:
        for client in clients.values():
            await asyncio.to_thread(client.wait_ready)
        load = ClosedLoop(clients, concurrency)
        started = time.monotonic()
        load.start()
        await asyncio.sleep(0.1)
        disturbed = time.monotonic()
        node.configmap.write(DUAL64_CONFIG_EDITED)
        await node.emu.restart()
        await node.wait_ready(timeout_s=15, since=disturbed)
        await node.emu.wait_for(
            lambda: any(
                r.resource == SHARED and r.device_count == SHARED_AFTER_EDIT and r.at >= disturbed
                for r in node.emu.list_and_watch_messages
            ),
            timeout=15,
            what="the reloaded shared pool's list",
        )
        settled = time.monotonic()
        await asyncio.sleep(TAIL_S)
        await load.stop()
        wall = time.monotonic() - started
        calls = load.calls
        failed = [c for c in calls if c.error is not None]
        # A call that hit the restart window is retried once, now that every resource registered again,
        # and, as a kubelet reconnects before it admits a pod again, once each channel is connected: a
        # channel that failed during the restart is in grpcio's reconnect backoff (1 s), where every call
        # fails at once with UNAVAILABLE.
        for client in clients.values():
            await asyncio.to_thread(client.wait_ready)
        final = await asyncio.to_thread(_retry, clients, failed)
    finally:
        for client in clients.values():
            client.close()
    node.agent.check_alive()
    registrations = [r.at for r in node.emu.registrations if r.at >= disturbed and r.accepted]
    reregistered = min(registrations) if registrations else settled
    ok = [c.done - c.issued for c in calls if c.error is None]
    first_errors = Counter(f"{c.method}: {c.error}" for c in failed)
    hung = sum(1 for c in failed if c.error == "DEADLINE_EXCEEDED")
    return Figure(
        "load",
        f"Load: {concurrency} concurrent Allocate/GetPreferredAllocation on 3 pools during a reload and a "
        "kubelet restart",
        {
            "errors_after_retry": sum(final.values()),
            "hung_first_attempt": hung,
            "errors_first_attempt": sum(first_errors.values()),
            "first_attempt_errors_by_kind": dict(first_errors),
            "errors_after_retry_by_kind": dict(final),
            "calls": len(calls),
            "concurrency": concurrency,
            **summary_ms(ok),
            "calls_per_s": round(len(calls) / wall),
            "in_flight_when_reregistered": sum(1 for c in calls if c.issued <= reregistered < c.done),
            "disturbance_to_settled_ms": round((settled - disturbed) * 1000, 1),
        },
        [Target("errors_after_retry", 1, "errors"), Target("hung_first_attempt", 1, "calls")],
        [
            f"{concurrency} calls stay in flight as grpcio futures (one channel per resource, as the "
            "kubelet keeps one connection per plugin) from before the disturbances until "
            f"{TAIL_S:g} s after the restart and reload settled; latency is mostly queueing: "
            "in-flight calls / throughput",
            "the reload grows the shared pool 12 -> 13 CPUs; the emulator's restart deletes every socket",
            "calls that failed are retried once after every resource registered again (the kubelet would "
            "re-admit the pod); errors_after_retry counts those that failed twice",
            f"hung_first_attempt: calls with no answer within {CALL_DEADLINE_S:g} s; the kubelet sets no "
            "deadline, so such a call holds pod admission until the kubelet drops the connection",
        ],
    )
