"""The agent as an NRI plugin: every container's cpuset set at creation, kept through updates and reloads.

The runtime calls the Plugin service (Configure, Synchronize, CreateContainer, UpdateContainer,
StopContainer, RemoveContainer); the plugin calls RegisterPlugin and, after a pool change, UpdateContainers.
An error from CreateContainer would fail the container, so every fault answers "no adjustment", with a log
line and a metric; every answer comes well inside the runtime's request timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.claim import Claim, ClaimKey, read_claims
from agent.cpuset import CpuSet
from agent.dirwatch import entry_created
from agent.metrics import Metrics
from agent.nri.allocations import AllocationSource, AllocationsUnknown, Devices
from agent.nri.policy import Decision, Kind, Policy, PoolView, decide, parse_runtime_cpus
from agent.nri.transport import (
    CODE_UNIMPLEMENTED,
    ConnectionLost,
    MuxConnection,
    ProtocolError,
    TtrpcError,
)
from agent.nri.wire import (
    ContainerEvent,
    ContainerRef,
    PodRef,
    TtrpcRequest,
    WireError,
    decode_container_event,
    decode_pod_event,
    decode_synchronize,
    encode_adjustment,
    encode_update,
    encode_updates,
)
from agent.nriapi.nri.pkg.api.v1alpha1 import (
    ConfigureRequest,
    ConfigureResponse,
    ContainerState,
    Event,
    RegisterPluginRequest,
    UpdateContainersResponse,
)

log = structlog.get_logger(__name__)

DEFAULT_SOCKET = Path("/var/run/nri/nri.sock")
PLUGIN_NAME = "cpupool"
# Plugins run in ascending index order; cpuset plugins (NRI's topology-aware, balloons) default to 90, so
# ours runs before them and a conflicting cpuset fails loudly there rather than silently here.
DEFAULT_INDEX = "50"
PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
NRI_VERSION = "v0.12.5"
EVENTS = (
    Event.RUN_POD_SANDBOX,
    Event.REMOVE_POD_SANDBOX,
    Event.CREATE_CONTAINER,
    Event.UPDATE_CONTAINER,
    Event.STOP_CONTAINER,
    Event.REMOVE_CONTAINER,
)
# Never come near the runtime's own request timeout (2 s by default): answer "no adjustment" by then.
ANSWER_BUDGET_S = 0.5
# Pods whose allocation is remembered by UID (a few hundred bytes each).
POD_CACHE_SIZE = 4096
CALL_TIMEOUT_S = 2.0
# A claimed container is checked against the kubelet's record after its answer: again after a failure or
# while the kubelet does not list the pod yet (a restarted kubelet lists pods once its sources synced),
# from the first to the last delay, doubling; then a pod still unlisted holds nothing.
CONFIRM_RETRY_START_S = 0.25
CONFIRM_RETRY_MAX_S = 8.0
CONFIRM_GIVE_UP_S = 60.0
# Claim nonces remembered with the container that first showed them (a few hundred bytes each).
BOUND_NONCES = 65536
BACKOFF_START_S = 0.02
BACKOFF_MAX_S = 2.0
# With no socket, its creation is watched; a look this often anyway costs nothing worth counting.
ABSENT_RECHECK_S = 60.0


@dataclass(frozen=True)
class NriSettings:
    socket: Path = DEFAULT_SOCKET
    index: str = DEFAULT_INDEX
    policy: Policy = Policy.STRICT


@dataclass
class Tracked:
    """What the plugin knows of one live container."""

    id: str
    namespace: str
    pod: str
    name: str
    # The cpuset the kubelet asked for (None: unset, all online CPUs) and the kubelet's device allocation.
    kubelet_cpus: CpuSet | None
    devices: Devices | None
    kind: Kind = Kind.OTHER
    # What the plugin last enforced; None: the runtime's own cpuset stands.
    enforced: CpuSet | None = None
    mems: CpuSet | None = None
    # The CPUs its exclusive devices stand for (the replay check compares claims against these).
    exclusive: CpuSet | None = None
    # Running while its devices come from its claims (or from having none) and the kubelet's record has
    # not confirmed them yet.
    confirming: asyncio.Task[None] | None = None
    # True when it showed at least one verified claim.
    claimed: bool = False


@dataclass
class _SyncState:
    pods: dict[str, PodRef] = field(default_factory=dict)
    containers: list[ContainerRef] = field(default_factory=list)


@functools.lru_cache(maxsize=1024)
def _text(cpus: CpuSet | None) -> str:
    # A node's containers share a handful of cpusets: format each once.
    return cpus.format() if cpus else ""


def _cpu_update(container_id: str, cpus: CpuSet, mems: CpuSet | None) -> bytes:
    # ignore_failure: another plugin's claim on the same container must not fail the runtime's request.
    return encode_update(container_id, _text(cpus), _text(mems), ignore_failure=True)


class NriPlugin:
    """Owns the connection to the runtime (dialled again after every loss) and the per-container record."""

    def __init__(
        self,
        settings: NriSettings,
        view: PoolView,
        allocations: AllocationSource,
        metrics: Metrics | None = None,
        start_after: asyncio.Event | None = None,
        claims: ClaimKey | None = None,
    ) -> None:
        self.settings = settings
        # Verifies Allocate claims (agent/claim.py); None: every new pod waits for the kubelet's record.
        self._claims = claims
        # Until a container holding pool devices comes without a claim, a container without one holds
        # none: the runtime passes the kubelet's container annotations on (docs/enforcement.md).
        self._unclaimed_means_none = True
        self._bound: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._confirms: set[asyncio.Task[None]] = set()
        # Updates that correct a claimed container, by container ID, sent by the push loop.
        self._corrections: dict[str, bytes] = {}
        self._reload_pending = False
        self._start_after = start_after
        self.view = view
        self.allocations = allocations
        self.metrics = metrics or Metrics()
        self.containers: dict[str, Tracked] = {}
        self.connected = False
        self.runtime = ""
        self.last_error: str | None = None
        self._conn: MuxConnection | None = None
        self._sync = _SyncState()
        self._synced = asyncio.Event()
        self._plan_changed = asyncio.Event()
        self._budget_s = ANSWER_BUDGET_S
        self._absent_reported = False
        self._pod_devices: OrderedDict[str, dict[str, Devices]] = OrderedDict()
        # PodResources Gets started at RunPodSandbox, by pod UID; each task removes itself when done.
        self._fetching: dict[str, asyncio.Task[dict[str, Devices] | None]] = {}
        self._handlers: dict[str, Callable[[bytes], Awaitable[bytes]]] = {
            "Configure": self._configure,
            "Synchronize": self._synchronize,
            "CreateContainer": self._create,
            "UpdateContainer": self._update,
            "StopContainer": self._stop,
            "RemoveContainer": self._remove,
            "RunPodSandbox": self._run_pod,
            "RemovePodSandbox": self._remove_pod,
            "Shutdown": self._shutdown,
        }

    # --- public view, for /readyz, status and tests

    def report(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "socket": str(self.settings.socket),
            "policy": str(self.settings.policy),
            "runtime": self.runtime,
            "containers": len(self.containers),
            "last_error": self.last_error,
        }

    def enforced(self) -> list[dict[str, object]]:
        """Per live container: the cpuset the agent enforced (None: left as the runtime had it)."""
        return [
            {
                "id": t.id,
                "pod": f"{t.namespace}/{t.pod}",
                "container": t.name,
                "kind": str(t.kind),
                "cpus": t.enforced.format() if t.enforced is not None else None,
                "mems": t.mems.format() if t.mems else None,
            }
            for t in sorted(self.containers.values(), key=lambda t: (t.namespace, t.pod, t.name))
        ]

    def plan_changed(self) -> None:
        """The pools changed: push the cpusets that must change to the runtime (from the run loop)."""
        self._reload_pending = True
        self._plan_changed.set()

    # --- connection lifecycle

    async def run(self) -> None:
        """Connect, register and serve; after any loss dial again with backoff. Runs until cancelled."""
        if self._start_after is not None:
            await self._start_after.wait()
        delay = BACKOFF_START_S
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.settings.socket))
            except OSError as exc:
                self._absent(exc)
                await self._socket_appears(exc, delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            delay = BACKOFF_START_S
            self._absent_reported = False
            conn = MuxConnection(reader, writer, self._dispatch)
            self._conn = conn
            try:
                await self._session(conn)
            finally:
                self._conn = None
                self.connected = False
                self.metrics.nri_connected.set(0)
                await conn.close()

    async def _socket_appears(self, exc: OSError, backoff_s: float) -> None:
        """Return when the runtime may be listening now. No socket (ENOENT): once it exists, which a watch
        reports the moment it is created (nothing runs meanwhile: a node without NRI costs no wake-ups);
        ABSENT_RECHECK_S at most. Otherwise after `backoff_s`, or sooner when the socket is created anew (a
        refused connection: a stale socket that a restarted runtime replaces, or one not listening yet)."""
        absent = exc.errno == errno.ENOENT
        try:
            await entry_created(
                self.settings.socket, ABSENT_RECHECK_S if absent else backoff_s, anew=not absent
            )
        except OSError:
            # No watch can be had here (no inotify, a file where a directory should be): plain backoff.
            await asyncio.sleep(backoff_s)

    def _absent(self, exc: OSError) -> None:
        self.metrics.nri_connected.set(0)
        self.last_error = f"{self.settings.socket}: {exc.strerror or exc}"
        if not self._absent_reported:
            # Once per outage: a runtime without NRI keeps the agent retrying quietly.
            self._absent_reported = True
            self.metrics.nri_connections.inc(result="absent")
            log.warning(
                "nri.unavailable",
                socket=str(self.settings.socket),
                reason=exc.strerror or str(exc),
                effect="cpusets not enforced; the device plugin keeps serving",
                hint="enable NRI in the runtime (docs/enforcement.md) or run with --no-nri",
            )

    async def _session(self, conn: MuxConnection) -> None:
        self._synced.clear()
        reading = asyncio.create_task(conn.run(), name="nri:read")
        pushing: asyncio.Task[None] | None = None
        try:
            request = RegisterPluginRequest(
                plugin_name=PLUGIN_NAME, plugin_idx=self.settings.index, NRI_version=NRI_VERSION
            )
            await conn.call(RUNTIME_SERVICE, "RegisterPlugin", bytes(request), CALL_TIMEOUT_S)
            pushing = asyncio.create_task(self._push_loop(conn), name="nri:push")
            await reading
            reason, result = "the runtime closed the connection", "closed"
        except ProtocolError as exc:
            reason, result = f"protocol error: {exc}", "protocol_error"
        except (TtrpcError, ConnectionLost, TimeoutError) as exc:
            reason, result = f"registration failed: {exc!r}", "error"
            failure = _failure(reading)
            if failure is not None:
                reason, result = f"protocol error: {failure}", "protocol_error"
        finally:
            await _stop(pushing)
            await _stop(reading)
            for task in list(self._fetching.values()):
                await _stop_fetch(task)
            self._fetching.clear()
            # The next Synchronize reads every container afresh.
            for confirm in list(self._confirms):
                await _stop(confirm)
            self._corrections.clear()
        self.metrics.nri_connections.inc(result=result)
        self.last_error = reason
        log.warning("nri.disconnected", reason=reason, action="dialling the runtime again")

    async def _push_loop(self, conn: MuxConnection) -> None:
        """After a pool change, send the runtime the cpusets that change (never before the first sync)."""
        await self._synced.wait()
        while True:
            await self._plan_changed.wait()
            self._plan_changed.clear()
            if self._reload_pending:
                self._reload_pending = False
                await self._send(conn, self._reconcile_all(), "reload")
            if self._corrections:
                corrections, self._corrections = self._corrections, {}
                await self._send(conn, list(corrections.values()), "claim")

    async def _send(self, conn: MuxConnection, updates: list[bytes], event: str) -> None:
        if not updates:
            return
        try:
            reply = UpdateContainersResponse.parse(
                await conn.call(RUNTIME_SERVICE, "UpdateContainers", encode_updates(updates), CALL_TIMEOUT_S)
            )
        except (TtrpcError, TimeoutError) as exc:
            self.metrics.nri_adjustments.inc(event=event, outcome="error")
            log.warning("nri.update_failed", containers=len(updates), trigger=event, reason=str(exc))
            return
        failed = {u.container_id for u in reply.failed}
        self.metrics.nri_adjustments.inc(len(updates) - len(failed), event=event, outcome="adjusted")
        if failed:
            self.metrics.nri_adjustments.inc(len(failed), event=event, outcome="error")
        updated = len(updates) - len(failed)
        log.info("nri.cpusets_pushed", trigger=event, updated=updated, failed=sorted(failed))

    # --- request dispatch

    async def _dispatch(self, request: TtrpcRequest) -> bytes:
        handler = self._handlers.get(request.method) if request.service == PLUGIN_SERVICE else None
        if handler is None:
            raise TtrpcError(CODE_UNIMPLEMENTED, f"{request.service}/{request.method} is not implemented")
        started = time.perf_counter()
        try:
            return await handler(request.payload)
        finally:
            self.metrics.nri_seconds.observe(time.perf_counter() - started, method=request.method)

    async def _configure(self, payload: bytes) -> bytes:
        request = ConfigureRequest.parse(payload)
        self.runtime = f"{request.runtime_name} {request.runtime_version}".strip()
        if request.request_timeout > 0:
            self._budget_s = min(ANSWER_BUDGET_S, request.request_timeout / 4000)
        mask = 0
        for event in EVENTS:
            mask |= 1 << (int(event) - 1)
        log.info(
            "nri.configured", runtime=self.runtime, nri=request.NRI_version, answer_budget_s=self._budget_s
        )
        return bytes(ConfigureResponse(events=mask))

    async def _shutdown(self, _: bytes) -> bytes:
        log.info("nri.shutdown_requested", runtime=self.runtime)
        return b""

    async def _synchronize(self, payload: bytes) -> bytes:
        batch = decode_synchronize(payload)
        self._sync.pods.update((p.id, p) for p in batch.pods)
        self._sync.containers += batch.containers
        if batch.more:
            return encode_updates([], more=True)
        pods, containers, self._sync = self._sync.pods, self._sync.containers, _SyncState()
        updates = await self._synchronized(pods, containers)
        self.connected = True
        self.last_error = None
        self.metrics.nri_connected.set(1)
        self.metrics.nri_connections.inc(result="ok")
        self._synced.set()
        log.info("nri.synchronized", runtime=self.runtime, containers=len(containers), updates=len(updates))
        return encode_updates(updates)

    async def _synchronized(self, pods: dict[str, PodRef], containers: list[ContainerRef]) -> list[bytes]:
        live = [
            c
            for c in containers
            if c.state in (ContainerState.CONTAINER_CREATED, ContainerState.CONTAINER_RUNNING)
        ]
        listed: dict[tuple[str, str], dict[str, Devices]] | None = {}
        # One List for the pods the record does not hold yet (all of them at the agent's start; none
        # after a runtime restart).
        if any(pods.get(c.pod_sandbox_id, PodRef()).uid not in self._pod_devices for c in live):
            try:
                async with asyncio.timeout(self._budget_s):
                    listed = await self.allocations.of_all()
            except (AllocationsUnknown, TimeoutError) as exc:
                listed = None
                log.warning(
                    "nri.sync_unmapped", reason=str(exc) or "PodResources timed out", effect="no adjustment"
                )
        self.containers = {}
        self._corrections.clear()
        updates: list[bytes] = []
        unpooled = self.view.online_cpus() - self.view.exclusive_cpus()
        for ref in live:
            pod = pods.get(ref.pod_sandbox_id, PodRef())
            per_container = self._pod_devices.get(pod.uid) if pod.uid else None
            if per_container is None and listed is not None:
                per_container = listed.get((pod.namespace, pod.name))
                if per_container is not None:
                    # Only pods the kubelet listed: one it does not list (yet) is not remembered as empty.
                    self._remember(pod.uid, per_container)
            if per_container is not None:
                devices: Devices | None = per_container.get(ref.name, {})
            else:
                devices = None if listed is None else {}
            current = kubelet_cpus = parse_runtime_cpus(ref.cpus)
            if kubelet_cpus is not None and kubelet_cpus == unpooled:
                # What strict gave an unset cpuset last time: keep it unset, so a CPU that leaves an
                # exclusive pool later is given back to this container too.
                kubelet_cpus = None
            tracked = Tracked(ref.id, pod.namespace, pod.name, ref.name, kubelet_cpus, devices)
            self.containers[ref.id] = tracked
            decision = self._decide(tracked, "synchronize")
            if decision is not None and decision.cpus is not None and decision.cpus != current:
                updates.append(_cpu_update(ref.id, decision.cpus, decision.mems))
        return updates

    async def _create(self, payload: bytes) -> bytes:
        try:
            event = decode_container_event(payload, claims=self._claims is not None)
            async with asyncio.timeout(self._budget_s):
                tracked = await self._claimed(event) or await self._learn(event)
        except Exception as exc:
            self.metrics.nri_adjustments.inc(event="create", outcome="error")
            log.warning("nri.create_unadjusted", reason=repr(exc), effect="no adjustment")
            return b""
        decision = self._decide(tracked, "create")
        if decision is None or decision.cpus is None or decision.cpus == tracked.kubelet_cpus:
            return b""
        return encode_adjustment(_text(decision.cpus), _text(decision.mems))

    async def _learn(self, event: ContainerEvent) -> Tracked:
        pod, ref = event.pod, event.container
        try:
            per_container = await self._record_of(pod)
            devices: Devices | None = (per_container or {}).get(ref.name, {})
        except AllocationsUnknown as exc:
            devices = None
            log.warning(
                "nri.unmapped", pod=f"{pod.namespace}/{pod.name}", container=ref.name, reason=str(exc)
            )
        tracked = Tracked(ref.id, pod.namespace, pod.name, ref.name, parse_runtime_cpus(ref.cpus), devices)
        self.containers[ref.id] = tracked
        return tracked

    async def _record_of(self, pod: PodRef, share: bool = False) -> dict[str, Devices] | None:
        """The kubelet's record of a pod (container name -> devices): remembered, being read since its
        sandbox was made, or read now (with `share`, in a read the pod's other containers can join).
        None when the kubelet does not list the pod; raises AllocationsUnknown."""
        per_container = self._pod_devices.get(pod.uid) if pod.uid else None
        fetching = self._fetching.get(pod.uid) if per_container is None and pod.uid else None
        if fetching is None and per_container is None and share:
            fetching = self._start_fetch(pod)
        if fetching is not None:
            # Started when the sandbox was made: usually done by now. Shielded, so that our own
            # timeout never cancels it for another container of the pod.
            per_container = await _shared_result(fetching)
        if per_container is None:
            per_container = await self.allocations.of_pod(pod.namespace, pod.name)
            if per_container is not None:
                self._remember(pod.uid, per_container)
        return per_container

    # --- claims: a new pod's devices without waiting for the kubelet

    async def _claimed(self, event: ContainerEvent) -> Tracked | None:
        """A new pod's container, decided from its claims (or from having none) and checked against the
        kubelet's record after the answer; None when it must wait for the record instead: a pod already
        known, an invalid claim, a claim another container showed first, or CPUs another container holds.
        """
        pod, ref = event.pod, event.container
        if self._claims is None or not pod.uid:
            return None
        where = f"{pod.namespace}/{pod.name}"
        found = read_claims(self._claims, ref.claims)
        owner = (pod.uid, ref.name)
        replayed = [c for c in found.claims if self._bound.get(c.nonce, owner) != owner]
        if not replayed:
            # Whichever path answers, a claim belongs to the first container that showed it.
            self._bind(found.claims, owner)
        if pod.uid in self._pod_devices:
            return None  # the kubelet's record of the pod is at hand
        if found.invalid:
            self.metrics.nri_adjustments.inc(event="claim", outcome="invalid")
            log.warning("nri.claim_invalid", pod=where, container=ref.name, reasons=list(found.invalid))
            return None
        if not found.claims and not self._unclaimed_means_none:
            return None
        for claim in replayed:
            first = self._bound[claim.nonce]
            self.metrics.nri_adjustments.inc(event="claim", outcome="replayed")
            log.warning(
                "nri.claim_replayed",
                pod=where,
                container=ref.name,
                resource=claim.resource,
                first_shown_by_pod_uid=first[0],
                first_shown_by_container=first[1],
                effect="waiting for the kubelet's record",
            )
            return None
        devices = found.devices()
        exclusive = self.view.cpus_for({n: ids for n, ids in devices.items() if self.view.owns(n)})[0]
        if exclusive:
            holders = [
                t for t in self.containers.values() if t.exclusive and not t.exclusive.isdisjoint(exclusive)
            ]
            if holders:
                # A replay, or a restarted container racing its predecessor: the record decides. A holder
                # whose own claim is unconfirmed is checked first, so that the record's answer never
                # leaves a CPU in two containers.
                self.metrics.nri_adjustments.inc(event="claim", outcome="held_elsewhere")
                log.info(
                    "nri.claim_cpus_held",
                    pod=where,
                    container=ref.name,
                    cpus=(exclusive & CpuSet().union(*(t.exclusive or CpuSet() for t in holders))).format(),
                    holders=[f"{t.namespace}/{t.pod}/{t.name}" for t in holders],
                    effect="waiting for the kubelet's record",
                )
                pending = {h.confirming for h in holders if h.confirming is not None}
                if pending:
                    # Half the budget at most: the record must still be read for this container.
                    await asyncio.wait(pending, timeout=self._budget_s / 2)
                return None
        if found.claims:
            self._unclaimed_means_none = True
        self.metrics.nri_adjustments.inc(event="claim", outcome="claimed" if found.claims else "none")
        tracked = Tracked(
            ref.id,
            pod.namespace,
            pod.name,
            ref.name,
            parse_runtime_cpus(ref.cpus),
            devices,
            claimed=bool(found.claims),
        )
        self.containers[ref.id] = tracked
        task = asyncio.create_task(self._confirm(tracked, pod), name=f"nri:confirm:{ref.id}")
        tracked.confirming = task
        self._confirms.add(task)
        task.add_done_callback(self._confirms.discard)
        return tracked

    def _bind(self, claims: Sequence[Claim], owner: tuple[str, str]) -> None:
        for claim in claims:
            self._bound[claim.nonce] = owner
            self._bound.move_to_end(claim.nonce)
        while len(self._bound) > BOUND_NONCES:
            self._bound.popitem(last=False)

    async def _confirm(self, tracked: Tracked, pod: PodRef) -> None:
        """Compare a claimed container with the kubelet's record (after its answer) and correct it."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CONFIRM_GIVE_UP_S
        delay = CONFIRM_RETRY_START_S
        while True:
            if self.containers.get(tracked.id) is not tracked:
                return  # stopped or removed meanwhile: nothing to correct
            try:
                per_container = await self._record_of(pod, share=True)
            except AllocationsUnknown as exc:
                if loop.time() + delay > give_up:
                    # The claim stands: it verified, and nothing said otherwise.
                    tracked.confirming = None
                    self.metrics.nri_adjustments.inc(event="claim", outcome="unconfirmed")
                    log.warning("nri.claim_unconfirmed", pod=f"{pod.namespace}/{pod.name}", reason=str(exc))
                    return
            else:
                if per_container is not None or loop.time() + delay > give_up:
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONFIRM_RETRY_MAX_S)
        tracked.confirming = None
        self._settle(tracked, (per_container or {}).get(tracked.name, {}))

    def _settle(self, tracked: Tracked, recorded: Devices) -> None:
        """The kubelet's record of a claimed container is in: keep the answer, or queue its correction."""
        if self.containers.get(tracked.id) is not tracked:
            return
        if _ours(self.view, tracked.devices or {}) == _ours(self.view, recorded):
            self.metrics.nri_adjustments.inc(event="claim", outcome="confirmed")
            return
        self.metrics.nri_adjustments.inc(event="claim", outcome="corrected")
        log.warning(
            "nri.claim_corrected",
            pod=f"{tracked.namespace}/{tracked.pod}",
            container=tracked.name,
            claimed=_ours(self.view, tracked.devices or {}),
            kubelet=_ours(self.view, recorded),
        )
        if not tracked.claimed and _ours(self.view, recorded) and self._unclaimed_means_none:
            self._unclaimed_means_none = False
            log.warning(
                "nri.claims_missing",
                pod=f"{tracked.namespace}/{tracked.pod}",
                container=tracked.name,
                reason="a container holding pool devices came without its claim annotation: a runtime "
                "that does not pass the kubelet's container annotations to NRI, or an Allocate answered "
                "by an agent without claims",
                effect="containers without a claim wait for the kubelet's record",
            )
        before = tracked.enforced
        tracked.devices = dict(recorded)
        decision = self._decide(tracked, None)
        if decision is None:
            return
        cpus, mems = decision.cpus, decision.mems
        if cpus is None and before is not None:
            # Nothing to enforce any more, but the claim's CPUs must go: back to the kubelet's cpuset.
            cpus = tracked.kubelet_cpus or self.view.online_cpus()
            mems = None
        if cpus is not None and cpus != before:
            self._corrections[tracked.id] = _cpu_update(tracked.id, cpus, mems)
            self._plan_changed.set()

    def _remember(self, uid: str, per_container: dict[str, Devices]) -> None:
        """Keep a pod's allocation by UID. The kubelet allocates devices to every container of a pod at
        admission, before its first container is created, and a UID is never reused: the record stays
        true for the pod's life, so its other containers and their restarts need no PodResources call."""
        if not uid:
            return
        self._pod_devices[uid] = per_container
        self._pod_devices.move_to_end(uid)
        while len(self._pod_devices) > POD_CACHE_SIZE:
            self._pod_devices.popitem(last=False)

    def _decide(self, tracked: Tracked, event: str | None) -> Decision | None:
        """Apply the policy to a tracked container; None: its devices are unknown. The outcome is logged
        and counted under `event`; a reload (event None) re-decides every container and counts only what
        it pushes."""
        if tracked.devices is None:
            # Without the kubelet's word a pool container could be narrowed off its own CPUs: leave it.
            tracked.enforced = None
            if event is not None:
                self.metrics.nri_adjustments.inc(event=event, outcome="unmapped")
            return None
        decision = decide(self.view, self.settings.policy, tracked.devices, tracked.kubelet_cpus)
        tracked.kind = decision.kind
        tracked.enforced, tracked.mems = decision.cpus, decision.mems
        tracked.exclusive = decision.exclusive
        if event is None:
            return decision
        if decision.cpus is None:
            outcome = (
                "conflict"
                if decision.kind is Kind.OTHER and self.settings.policy is Policy.STRICT
                else "unchanged"
            )
            if outcome == "conflict" or decision.kind is not Kind.OTHER:
                log.warning(
                    "nri.not_enforced",
                    pod=f"{tracked.namespace}/{tracked.pod}",
                    container=tracked.name,
                    reason=decision.reason,
                )
        elif decision.cpus == tracked.kubelet_cpus:
            outcome = "unchanged"
        else:
            outcome = "adjusted"
        self.metrics.nri_adjustments.inc(event=event, outcome=outcome, kind=str(decision.kind))
        return decision

    async def _update(self, payload: bytes) -> bytes:
        """The kubelet (CPU manager) updates a container: keep our cpuset inside the same update, so the
        kubelet's loop, which compares against its own record, never sees a reason to try again."""
        try:
            event = decode_container_event(payload)
            tracked = self.containers.get(event.container.id)
            if tracked is None:
                async with asyncio.timeout(self._budget_s):
                    tracked = await self._learn(event)
            if event.update_cpus:
                tracked.kubelet_cpus = parse_runtime_cpus(event.update_cpus)
            decision = self._decide(tracked, "update")
        except Exception as exc:
            self.metrics.nri_adjustments.inc(event="update", outcome="error")
            log.warning("nri.update_unadjusted", reason=repr(exc), effect="no adjustment")
            return b""
        if decision is None or decision.cpus is None:
            return b""
        if event.update_cpus and parse_runtime_cpus(event.update_cpus) == decision.cpus:
            return b""
        return encode_updates([_cpu_update(tracked.id, decision.cpus, decision.mems)])

    async def _stop(self, payload: bytes) -> bytes:
        try:
            event = decode_container_event(payload)
            self.containers.pop(event.container.id, None)
        except Exception as exc:
            log.warning("nri.stop_undecodable", reason=repr(exc))
        return b""

    async def _run_pod(self, payload: bytes) -> bytes:
        """A pod sandbox is made: its devices were allocated at admission, so read them now, while the
        runtime sets the sandbox up, and CreateContainer finds them without waiting for the kubelet."""
        try:
            pod = decode_pod_event(payload)
        except WireError as exc:
            log.warning("nri.run_pod_undecodable", reason=str(exc))
            return b""
        if self._claims is not None and self._unclaimed_means_none:
            # Its containers will be answered from their claims; reading the record now would only
            # compete with those answers for the loop. It is read after the first answer instead.
            return b""
        self._start_fetch(pod)
        return b""

    def _start_fetch(self, pod: PodRef) -> asyncio.Task[dict[str, Devices] | None] | None:
        """The read of a pod's record, shared by whoever needs it until it is done; None if there is
        nothing to read (no UID, or the record is at hand)."""
        if not pod.uid or pod.uid in self._pod_devices:
            return None
        task = self._fetching.get(pod.uid)
        if task is None:
            task = asyncio.create_task(self._fetch(pod), name=f"nri:fetch:{pod.uid}")
            self._fetching[pod.uid] = task
            task.add_done_callback(lambda done: self._fetched(pod.uid, done))
        return task

    async def _fetch(self, pod: PodRef) -> dict[str, Devices] | None:
        """The pod's allocation, remembered; None when it cannot be had now (CreateContainer asks again)."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                per_container = await self.allocations.of_pod(pod.namespace, pod.name)
        except (AllocationsUnknown, TimeoutError) as exc:
            log.debug("nri.prefetch_failed", pod=f"{pod.namespace}/{pod.name}", reason=str(exc))
            return None
        if per_container is not None:
            self._remember(pod.uid, per_container)
        return per_container

    def _fetched(self, uid: str, task: asyncio.Task[dict[str, Devices] | None]) -> None:
        if self._fetching.get(uid) is task:
            del self._fetching[uid]

    async def _remove_pod(self, payload: bytes) -> bytes:
        try:
            pod = decode_pod_event(payload)
        except WireError as exc:
            log.warning("nri.remove_pod_undecodable", reason=str(exc))
            return b""
        self._pod_devices.pop(pod.uid, None)
        fetching = self._fetching.pop(pod.uid, None)
        if fetching is not None:
            fetching.cancel()
        return b""

    async def _remove(self, payload: bytes) -> bytes:
        return await self._stop(payload)

    # --- pool reloads

    def _reconcile_all(self) -> list[bytes]:
        """Updates for every live container whose cpuset must change under the current plan."""
        updates: list[bytes] = []
        for tracked in self.containers.values():
            before = tracked.enforced
            decision = self._decide(tracked, None)
            if decision is None or decision.cpus is None:
                continue
            if decision.cpus != before:
                updates.append(_cpu_update(tracked.id, decision.cpus, decision.mems))
        return updates


def _ours(view: PoolView, devices: Devices) -> dict[str, list[str]]:
    """The devices of the agent's resources, in a form two sources can be compared in."""
    return {name: sorted(ids) for name, ids in devices.items() if ids and view.owns(name)}


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    if not task.done() or task.cancelled():
        return None
    return task.exception()


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ProtocolError, ConnectionLost):
        await task


async def _stop_fetch(task: asyncio.Task[dict[str, Devices] | None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _shared_result(task: asyncio.Task[dict[str, Devices] | None]) -> dict[str, Devices] | None:
    """The result of a fetch several containers may wait for; None if it was cancelled (its pod removed)
    while this caller was not."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        return None
