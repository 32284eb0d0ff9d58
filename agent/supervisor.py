"""The agent's lifecycle: the only module that owns servers, tasks and watchers.

One reconciler task applies every change in order (config edits, kubelet restarts, in-use re-checks), so the
running servers are never mutated from two places. Watchers only raise flags and wake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from agent.claim import ClaimKey
from agent.config import (
    ConfigError,
    PoolConfig,
    ValidatedConfig,
    default_config,
    parse_config,
    read_config_dir,
    select_config,
    validate,
)
from agent.cpuset import CpuSet
from agent.deviceplugin import (
    ALREADY_CONNECTED,
    KUBELET_SOCKET,
    RegistrationError,
    ResourceServer,
    ResourceServicer,
    register,
)
from agent.dirwatch import watch_directories
from agent.hotplug import cpu_dir, online_changes
from agent.idset import EMPTY, IdSet
from agent.ledger import STATE_FILE, LedgerError
from agent.ledger import claim_key as ledger_claim_key
from agent.ledger import dumps as ledger_dumps
from agent.ledger import load as ledger_load
from agent.ledger import meanings as ledger_meanings
from agent.ledger import sync as ledger_sync
from agent.ledger import write as ledger_write
from agent.metrics import Metrics
from agent.nodelabels import LabelSource
from agent.plan import UNKNOWN, Held, Plan, Resource, build_plan, diff_plans
from agent.podresources import PodResourcesError, list_raw
from agent.topology import Topology, discover
from agent.wire import HeldReader

log = structlog.get_logger(__name__)

# Without change events (some network file systems), a content check at this period catches every edit.
CONFIG_POLL_S = 30.0
# A watched directory that vanished (say, the config's) is watched again after this long.
WATCH_RETRY_S = 1.0
# While devices are held back for pods that still use them, ask the PodResources API this often.
IN_USE_RECHECK_S = 30.0
REGISTER_BACKOFF_START_S = 0.1
# How long a resource may go without a ListAndWatch stream before the agent registers it again.
STREAM_LOST_GRACE_S = 1.0
REGISTER_BACKOFF_MAX_S = 30.0
# How often the online CPU list is compared (one small sysfs read) when no hotplug event says so sooner.
HOTPLUG_POLL_S = 5.0
# After ending a resource's streams, how long to wait for the kubelet to drop the old connection before
# registering again (it disconnects whatever client is current when an old stream ends).
REREGISTER_WAIT_S = 2.0
REREGISTER_SETTLE_S = 0.1
# A restarted kubelet lists pods in PodResources only once its pod sources have synced.
KUBELET_SETTLE_S = 30.0
# An Allocate the kubelet's record never showed counts as held this long (see Supervisor._with_answered).
ANSWER_HOLD_S = 600.0
ANSWER_CONFIRM_S = 5.0
# Long pure work on the loop runs in slices this long, then lets the loop answer.
SLICE_S = 0.001
# While the kubelet's record cannot be read, ask again this often.
UNKNOWN_RECHECK_S = 1.0
# A plan held back because the state file cannot be written is tried again this often.
STATE_RETRY_S = 5.0
# Plans built while Allocates arrive are built again with them; after this many tries, on the loop.
PLAN_RETRIES = 3
# How long the first config read waits for the node's labels (per-node-group configs) before it gives up.
LABELS_FIRST_WAIT_S = 5.0


@dataclass(frozen=True)
class AgentSettings:
    config_path: Path | None
    root: Path = Path("/")
    plugin_dir: Path = Path("/var/lib/kubelet/device-plugins")
    pod_resources_socket: Path | None = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    # Pin the agent's own threads to the CPUs no exclusive pool hands out.
    pin_self: bool = True
    recheck_interval_s: float = IN_USE_RECHECK_S
    config_poll_s: float = CONFIG_POLL_S
    # Where the meaning of every served device ID is kept across restarts (None: not kept, say so).
    state_dir: Path | None = None
    hotplug_poll_s: float = HOTPLUG_POLL_S
    # After a kubelet restart, how long its PodResources answers are not trusted to shrink what is held.
    kubelet_settle_s: float = KUBELET_SETTLE_S
    # How long after a burst of Allocates the record is read to confirm them.
    answer_confirm_s: float = ANSWER_CONFIRM_S


@dataclass
class ResourceState:
    server: ResourceServer
    registration: asyncio.Task[None] | None = None
    registered: bool = False
    # Started when the kubelet's stream ends without a new kubelet.sock: register again if none reopens.
    watchdog: asyncio.Task[None] | None = None


def cpuid_cpus(root: Path, cpus: CpuSet) -> CpuSet:
    """CPUs whose ``/dev/cpu/<n>/cpuid`` exists under `root` (the cpuid driver is loaded)."""
    return CpuSet(cpu for cpu in cpus if (root / "dev" / "cpu" / str(cpu) / "cpuid").exists())


def load_claim_key(state_dir: Path | None) -> ClaimKey:
    """The key in `state_dir` (made there on first use); without one, a key for this process only: claims
    it signed do not verify after a restart, and those containers take the PodResources path."""
    if state_dir is None:
        return ClaimKey.ephemeral()
    try:
        return ClaimKey(ledger_claim_key(state_dir))
    except LedgerError as exc:
        log.error("claims.key_unusable", reason=str(exc), effect="a key for this run only")
        return ClaimKey.ephemeral()


def housekeeping_cpus(plan: Plan, topology: Topology) -> CpuSet:
    # Held exclusive devices count too, wherever their pool went.
    return CpuSet(topology.cpus) - plan.exclusive_cpus()


def pin_process(cpus: CpuSet) -> None:
    """Pin every thread of this process (threads made later inherit their creator's mask)."""
    for entry in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(entry), set(cpus))


class Supervisor:
    def __init__(self, settings: AgentSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.plan: Plan | None = None
        self.topology: Topology | None = None
        self.states: dict[str, ResourceState] = {}
        self.config_generation = 0
        self.last_config_error: str | None = None
        self._config: PoolConfig | None = None
        self._config_text: str | None = None
        self._rejected: tuple[str | None, str] | None = None
        self._kubelet_socket: tuple[int, int] | None = None
        self._in_use_known = False
        self._wake = asyncio.Event()
        self._flags: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._cpuid: CpuSet = CpuSet()
        self.started = asyncio.Event()
        # The meanings of device IDs saved by an earlier run (used until this run has a plan of its own).
        self._memory: Plan | None = None
        # The state file's text as it is on disk (written or loaded by this run); None: no file yet.
        self._saved: str | None = None
        self._state_retry: asyncio.TimerHandle | None = None
        self.state_error: str | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_again = False
        # Allocates answered lately (resource -> ID -> when): the kubelet records an allocation only after
        # our answer reaches it, so a read of its record can miss the newest ones.
        self._answered: dict[str, dict[str, float]] = {}
        # Decodes the kubelet's record, keeping each pod's part for the next read.
        self._held_reader = HeldReader()
        self._kubelet_restarted_at: float | None = None
        self._confirm: asyncio.TimerHandle | None = None
        self._allocations = 0
        self._relocations = 0
        self._online: str | None = None
        self.held_known = False
        # Called after every applied plan (the NRI plugin pushes the cpusets that change).
        self.plan_listeners: list[Callable[[], None]] = []
        # The node's labels, for a config directory with per-node-group files; a label change calls
        # notify("config"), the same path as a ConfigMap edit.
        self.node_labels: LabelSource | None = None
        self._selected: str | None = None
        # Signs every Allocate's claim; the NRI plugin verifies them with the same key.
        self.claims = load_claim_key(settings.state_dir)

    # --- public view, for the health endpoints and tests

    def readiness(self) -> dict[str, dict[str, object]]:
        """Per resource: registered with the kubelet, and how many ListAndWatch streams are open."""
        report: dict[str, dict[str, object]] = {}
        for name in self.plan.resources if self.plan is not None else ():
            state = self.states.get(name)
            if state is None:
                report[name] = {"served": False, "registered": False, "streams": 0}
            else:
                streams = state.server.servicer.stream_count
                report[name] = {"served": True, "registered": state.registered, "streams": streams}
        return report

    @property
    def ready(self) -> bool:
        if self.plan is None:
            return False
        for name in self.plan.resources:
            state = self.states.get(name)
            if state is None or not state.registered or state.server.servicer.stream_count == 0:
                return False
        return True

    def notify(self, reason: str) -> None:
        """Ask the reconciler to look again (reasons: config, kubelet, recheck)."""
        self._flags.add(reason)
        self._wake.set()

    # --- lifecycle

    async def run(self) -> None:
        """Serve until stop() is called; then end streams, close servers and remove the sockets."""
        self.settings.plugin_dir.mkdir(parents=True, exist_ok=True)
        self._kubelet_socket = self._kubelet_socket_identity()
        await self._load_memory()
        # Watch before the first read: an edit made while the agent starts is then either read by it or
        # reported after it (the watch is in place once the task has run its first step).
        self._tasks = [asyncio.create_task(self._watch(), name="watch")]
        await asyncio.sleep(0)
        await self._reload(initial=True)
        self._tasks += [
            asyncio.create_task(self._recheck_loop(), name="in-use-recheck"),
            asyncio.create_task(self._hotplug_loop(), name="hotplug"),
        ]
        self.started.set()
        try:
            await self._reconcile_loop()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def _shutdown(self) -> None:
        if self._confirm is not None:
            self._confirm.cancel()
            self._confirm = None
        if self._state_retry is not None:
            self._state_retry.cancel()
            self._state_retry = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for name in list(self.states):
            await self._stop_resource(name)
        if self._sync_task is not None:
            # Written already; let the fsync finish so a node shut down next keeps it.
            await asyncio.gather(self._sync_task, return_exceptions=True)
        log.info("agent.stopped")

    async def _reconcile_loop(self) -> None:
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            flags, self._flags = self._flags, set()
            try:
                if "kubelet" in flags:
                    await self._check_kubelet()
                if "config" in flags:
                    await self._reload()
                elif "hotplug" in flags:
                    await self._topology_changed()
                elif "recheck" in flags:
                    await self._replan("in-use re-check")
            except Exception:
                # The reconciler must outlive any single failed step; the next event retries.
                log.exception("reconcile.failed", flags=sorted(flags))

    # --- config and plan

    def _read_config(self) -> str | None:
        """The config file's text now; None means "no config file": serve the built-in default."""
        path = self.settings.config_path
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            # Never fall back to the built-in pool for a file that was asked for: that would serve CPUs
            # the operator meant for something else.
            what = "does not exist" if self._config_text is None else "was removed"
            raise _Unreadable(f"{path} {what}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _Unreadable(f"{path}: {exc}") from exc

    async def _choose_config(self) -> tuple[str | None, str]:
        """The config text this node gets now and where it is from (text None: the built-in default).

        A file given as --config is read as it is. A directory is read whole, and its file for this node
        chosen by the node's labels (`agent.config.select_config`). Raises _Unreadable (keep the last good
        config) or ConfigError (a faulty directory, or two files matching the node)."""
        path = self.settings.config_path
        if path is None or not await asyncio.to_thread(path.is_dir):
            return await asyncio.to_thread(self._read_config), str(path)
        try:
            configs = await asyncio.to_thread(read_config_dir, path)
        except OSError as exc:
            raise _Unreadable(f"{path}: {exc}") from exc
        configs.raise_for_problems()
        labels = self.node_labels.labels() if self.node_labels is not None and configs.selective else {}
        if labels is None:
            assert self.node_labels is not None
            # At start the first answer is usually milliseconds away; later this returns at once.
            await self.node_labels.wait_first(LABELS_FIRST_WAIT_S)
            labels = self.node_labels.labels()
        if labels is None:
            assert self.node_labels is not None
            raise _Unreadable(
                f"{path} chooses pools by node labels, which are not known: {self.node_labels.unknown_reason}"
            )
        selection = select_config(configs, labels)
        if selection.source != self._selected:
            log.info("config.selected", file=selection.source, reason=selection.reason, labels=dict(labels))
            self._selected = selection.source
        return selection.text, selection.source

    async def _reload(self, *, initial: bool = False) -> None:
        """Re-read the config; apply it if it changed and is valid, else keep the last good one."""
        try:
            text, source = await self._choose_config()
        except ConfigError as exc:
            self._config_failed(exc, None)
            await self._serve_memory("the config directory is invalid")
            return
        except _Unreadable as exc:
            if self.plan is None:
                self.last_config_error = str(exc)
                log.error("config.unreadable", reason=str(exc), serving="the remembered plan, if any")
                await self._serve_memory("the config file cannot be read")
            else:
                log.warning("config.unreadable", reason=str(exc), keeping="last good config")
            return
        if not initial and text == self._config_text:
            if self._rejected is not None:
                # The file is back to the config being served: the earlier error no longer applies.
                self._rejected = self.last_config_error = None
                log.info("config.error_cleared", reason="the file is back to the config being served")
            return
        try:
            config = default_config() if text is None else parse_config(text, source)
            topology = await asyncio.to_thread(discover, self.settings.root)
            validated = validate(config, topology)
            # Read with the topology, off the loop: Allocate and re-plans then do no file IO. Read before the
            # plan: between a plan's last check for new Allocates and its servicers' swap, nothing may wait.
            cpuid = await asyncio.to_thread(cpuid_cpus, self.settings.root, CpuSet(topology.cpus))
            plan = await self._make_plan(validated, topology)
        except ConfigError as exc:
            self._config_failed(exc, text)
            await self._serve_memory("the config is invalid")
            return
        self._config, self._config_text, self.topology = config, text, topology
        self._online = topology.online.format()
        self._cpuid = cpuid
        self._rejected = None
        self.last_config_error = None
        self.config_generation += 1
        self.metrics.config_generation.set(self.config_generation)
        if not initial:
            self.metrics.reloads.inc(result="ok")
        for warning in plan.warnings:
            log.warning("config.warning", message=warning)
        log.info(
            "config.loaded",
            source=config.source,
            generation=self.config_generation,
            resources={r.name: r.healthy_count for r in plan.resources.values()},
        )
        if not plan.resources:
            log.warning("agent.nothing_to_serve", reason="the config has no pools, or no CPU is isolated")
        await self._apply(plan)

    async def _serve_memory(self, reason: str, until: str = "the config file is valid again") -> None:
        """At start, with no usable config: serve what the previous run served, as it served it, so that
        a bad edit followed by a restart does not take every resource away from the kubelet."""
        if self.plan is not None or self._memory is None:
            return
        log.warning(
            "config.serving_remembered_plan",
            reason=reason,
            resources=sorted(self._memory.resources),
            until=until,
        )
        await self._apply(self._memory)

    def _config_failed(self, exc: ConfigError, text: str | None) -> None:
        # The periodic content check retries a rejected config (a CPU may come online), but the same
        # text failing the same way is reported once.
        if (text, str(exc)) == self._rejected:
            return
        self._rejected = (text, str(exc))
        self.last_config_error = str(exc)
        self.metrics.reloads.inc(result="error")
        log.error(
            "config.invalid",
            source=exc.source,
            problems=[p.describe(exc.source) for p in exc.problems],
            keeping="last good config"
            if self.plan is not None
            else "nothing served until the config is fixed",
        )

    async def _replan(self, reason: str, topology: Topology | None = None) -> None:
        """Plan the applied config again with fresh held data (devices held back may be free now)."""
        if self._config is None or self.topology is None:
            return
        topology = topology or self.topology
        vanished = self.topology.present - topology.present
        if vanished:
            # CPUs gone from `present` (a vCPU unplugged) are offline to the config applied with them: their
            # devices stay listed, Unhealthy, rather than the re-plan failing and leaving them Healthy.
            log.warning(
                "topology.cpus_vanished",
                cpus=vanished.format(),
                effect="their devices are listed Unhealthy until they come back or the config drops them",
            )
            topology = replace(topology, present=topology.present | vanished)
        try:
            plan = await self._make_plan(validate(self._config, topology), topology, in_thread=False)
        except ConfigError as exc:
            log.warning("replan.skipped", reason=reason, error=str(exc))
            return
        self.topology = topology
        log.debug("replan", reason=reason)
        await self._apply(plan)

    async def _topology_changed(self) -> None:
        """CPUs went offline or came back: their devices turn Unhealthy or Healthy on the open streams."""
        topology = await asyncio.to_thread(discover, self.settings.root)
        online = topology.online.format()
        if online == self._online:
            return
        log.info("topology.online_changed", was=self._online, now=online)
        self._online = online
        if self._config is None:
            return
        self._cpuid = await asyncio.to_thread(cpuid_cpus, self.settings.root, CpuSet(topology.cpus))
        await self._replan("online CPUs changed", topology)

    async def _make_plan(
        self, validated: ValidatedConfig, topology: Topology, *, in_thread: bool = True
    ) -> Plan:
        """Build the plan from the kubelet's record; Allocates answered meanwhile count too.

        A re-plan of the same config takes a few milliseconds even with 200,000 held IDs: it runs on the loop,
        where nothing interleaves. A new config can take tens of milliseconds: a worker thread builds it, and
        builds it again if Allocates were answered meanwhile."""
        previous = self.plan or self._memory
        read_at = time.monotonic()
        held = await self._held(validated.config.resource_base_name)
        if in_thread:
            for _ in range(PLAN_RETRIES):
                seen = self._allocations
                merged = self._with_answered(held, read_at)
                plan = await asyncio.to_thread(build_plan, validated, topology, previous, merged)
                if seen == self._allocations:
                    return plan
        # On the loop, where no Allocate can interleave.
        return build_plan(validated, topology, previous, self._with_answered(held, read_at))

    def _with_answered(self, held: Held, read_at: float) -> Held:
        """`held` (the record, read from `read_at` on) plus the Allocates it does not show. An ID a record
        read after the answer shows is the record's from then on. One it never showed is held for
        ANSWER_HOLD_S after the answer: the kubelet records an allocation within milliseconds, but
        PodResources never lists the devices of a plain init container, which may run for minutes. A record
        read before the answer confirms nothing: an ID it shows may be the previous holder's."""
        if not isinstance(held, Mapping):
            return held  # UNKNOWN already counts every served ID as held
        expired = time.monotonic() - ANSWER_HOLD_S
        merged = dict(held)
        for name, answered in list(self._answered.items()):
            have = merged.get(name, EMPTY)
            missing = {i for i, at in answered.items() if at >= expired and (at >= read_at or i not in have)}
            if len(missing) != len(answered):
                if missing:
                    self._answered[name] = {i: answered[i] for i in missing}
                else:
                    del self._answered[name]
            if missing:
                merged[name] = IdSet.of(have) | IdSet.of(missing)
        return merged

    def allocated(self, name: str, ids: Sequence[str]) -> None:
        """An Allocate was answered: those IDs are held from now on, whatever the kubelet says yet.

        Kept per ID (its latest answer's time): bounded by the resource's devices however many pods come
        and go. One entry per answer instead kept every answer's own 500 strings until the next read of
        the record, 3 MiB of RSS at 50 admissions a second (measured), and checked each ID once per
        answer rather than once."""
        self._allocations += 1
        if self._confirm is None and not self._stopping.is_set():
            # One read of the record a little later, for a whole burst of Allocates: what it shows is the
            # record's from then on, so a short-lived pod's CPUs are not kept for ANSWER_HOLD_S.
            self._confirm = asyncio.get_running_loop().call_later(
                self.settings.answer_confirm_s, self._confirm_answers
            )
        self._answered.setdefault(name, {}).update(dict.fromkeys(ids, time.monotonic()))

    def _confirm_answers(self) -> None:
        self._confirm = None
        self.notify("recheck")

    async def _held(self, base: str) -> Held:
        """Device IDs held per resource name (the kubelet's record), UNKNOWN when it cannot be read."""
        socket = self.settings.pod_resources_socket
        restarted = self._kubelet_restarted_at
        if restarted is not None and time.monotonic() - restarted < self.settings.kubelet_settle_s:
            # A kubelet that just started answers List from its pod manager, which is empty until the pod
            # sources have synced: an empty answer now would free every held device.
            if self.held_known:
                log.info(
                    "podresources.settling",
                    reason="the kubelet restarted; its pod list may still be incomplete",
                    treating="every served device as held",
                    for_s=self.settings.kubelet_settle_s,
                )
            self.held_known = False
            return UNKNOWN
        known = set(self.plan.resources if self.plan is not None else ())
        known |= set(self._memory.resources if self._memory is not None else ())
        prefix = base + "/"
        if socket is None:
            self._held_unknown("no PodResources socket configured")
            return UNKNOWN
        try:
            raw = await list_raw(socket)
            found: dict[str, IdSet] = {}
            steps = self._held_reader.read_in_steps(
                raw, lambda name: name.startswith(prefix) or name in known, found
            )
            await run_in_slices(steps)
        except Exception as exc:
            # PodResourcesError, a malformed reply (ValueError), or whatever grpclib raises while the kubelet
            # dies mid-call: in every case the record is unknown for now, never a failed replan.
            self._held_unknown(str(exc) if isinstance(exc, PodResourcesError) else repr(exc))
            return UNKNOWN
        if not self.held_known:
            log.info("podresources.available", resources_held=len(found))
        self.held_known = True
        for name in self.states:
            self.metrics.devices_in_use.set(len(found.get(name, ())), resource=name)
        return found

    def _held_unknown(self, reason: str) -> None:
        if self.held_known or self.plan is None:
            log.error(
                "podresources.unavailable",
                reason=reason,
                effect="every device served before is treated as held: no CPU moves to another resource, "
                "nothing held is freed, until the kubelet's record can be read",
            )
        self.held_known = False

    async def _load_memory(self) -> None:
        state_dir = self.settings.state_dir
        if state_dir is None:
            log.warning(
                "state.not_kept",
                effect="after a restart, held devices whose pool changed meanwhile are known only by the "
                "new config (set --state-dir)",
            )
            return
        try:
            self._memory = await asyncio.to_thread(ledger_load, state_dir)
            if self._memory is not None:
                self._saved = ledger_dumps(self._memory)  # what the file holds: it round-trips exactly
        except LedgerError as exc:
            log.error("state.unreadable", reason=str(exc), effect="starting without the earlier meanings")
            return
        if self._memory is not None:
            log.info("state.loaded", path=str(state_dir), resources=sorted(self._memory.resources))
        else:
            log.info(
                "state.none",
                path=str(state_dir),
                effect="held IDs take the meanings the current config gives them (a first start)",
            )

    def _write_memory(self, plan: Plan) -> bool:
        """Write the meanings of `plan` to the state file BEFORE it is served: from the moment a servicer
        answers from it, the kubelet may hold IDs in its meanings, and an agent killed then must read them
        back so after its restart. So this runs on the loop, between the plan's last check for Allocates
        and the servicers' swap, where nothing may wait: the text and a rename of tens of KB at most (1-2 ms
        measured with 200,000 held millicpus). The fsync that makes it outlive a node crash follows in a
        worker thread: a crash of the node within those milliseconds can lose the newest file (docs/held.md).

        False: the plan must not be served. It could not be written, and it changes what IDs mean against
        the file a restarted agent would read, which would then read IDs handed out from it wrongly."""
        state_dir = self.settings.state_dir
        if state_dir is None:
            return True
        text = ledger_dumps(plan)
        if text == self._saved:
            return True
        try:
            ledger_write(state_dir, text)
        except OSError as exc:
            return self._write_failed(state_dir, text, exc)
        self._saved = text
        if self.state_error is not None:
            log.info("state.write_recovered", path=str(state_dir))
            if self.last_config_error == self.state_error:
                self.last_config_error = None
            self.state_error = None
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.create_task(self._sync_memory(state_dir), name="state-sync")
        else:
            self._sync_again = True
        return True

    def _write_failed(self, state_dir: Path, text: str, exc: OSError) -> bool:
        if self._saved is None or ledger_meanings(text) == ledger_meanings(self._saved):
            # No file to contradict (a first start: a restart would know nothing either way), or only
            # health changes: serving it loses nothing a restart needs.
            log.error(
                "state.write_failed",
                path=str(state_dir),
                reason=str(exc),
                effect="plan served: it changes no meaning the file holds"
                if self._saved is not None
                else "plan served without a state file: after a restart, held IDs take the config's meanings",
                retry="at the next plan",
            )
            return True
        self.state_error = (
            f"{state_dir / STATE_FILE} cannot be written ({exc.strerror or exc}): a plan that changes what "
            "device IDs mean is held back, the last one keeps serving"
        )
        self.last_config_error = self.state_error
        log.error(
            "state.write_failed",
            path=str(state_dir),
            reason=str(exc),
            effect="new plan NOT served: it changes what held device IDs mean, and an agent restarted now "
            "would read them in the older meanings the file holds; the last plan keeps serving",
            retry=f"every {STATE_RETRY_S:g} s",
        )
        if self._state_retry is None and not self._stopping.is_set():
            self._state_retry = asyncio.get_running_loop().call_later(STATE_RETRY_S, self._retry_state)
        return False

    def _retry_state(self) -> None:
        self._state_retry = None
        self.notify("recheck")

    async def _sync_memory(self, state_dir: Path) -> None:
        """fsync the state file until no write is left unsynced (one thread at a time, however many plans)."""
        while True:
            self._sync_again = False
            try:
                await asyncio.to_thread(ledger_sync, state_dir)
            except OSError as exc:
                log.warning("state.sync_failed", path=str(state_dir), reason=str(exc), retry="next write")
                return
            if not self._sync_again:
                return

    async def _apply(self, plan: Plan) -> None:
        old = self.plan
        diff = diff_plans(old, plan)
        # On disk before anything answers from it (no await from here to the servicers' swap below).
        if not self._write_memory(plan):
            if self.plan is None and self._memory is not None:
                # At start: serve what the file says (its meanings are on disk) rather than nothing.
                await self._serve_memory(
                    "the new plan cannot be written to the state file", until="the state file can be written"
                )
            return
        self.plan = plan
        # Every servicer answers from the new plan before anything here waits: an Allocate answered from the
        # old one after the plan was built would not be in it.
        for name in diff.removed:
            state = self.states.get(name)
            if state is not None:
                # An empty list first, so the kubelet drops the devices at once rather than on stream end.
                state.server.servicer.update(_emptied(state.server.servicer.resource))
        for name in diff.changed:
            state = self.states.get(name)
            new = plan.resources[name]
            if state is None:
                continue  # not served (socket taken): _start_missing tries again below
            before = state.server.servicer.resource
            state.server.servicer.update(new)
            log.info("resource.updated", resource=name, devices=new.device_count, healthy=new.healthy_count)
            if before.pool_type is not new.pool_type:
                # The kubelet reads the options only while registering.
                self._start_registration(name, replace_stream=True)
        for name in diff.removed:
            state = self.states.get(name)
            if state is not None:
                await state.server.servicer.flush()
                await self._stop_resource(name)
        for name in diff.added:
            await self._start_resource(plan.resources[name])
        await self._start_missing()
        if self.settings.pin_self and self.topology is not None:
            self._pin(plan, self.topology)
        for listener in self.plan_listeners:
            try:
                listener()
            except Exception:
                # A listener's fault (the NRI side) must never stop the device plugin side.
                log.exception("plan.listener_failed")

    def _pin(self, plan: Plan, topology: Topology) -> None:
        cpus = housekeeping_cpus(plan, topology)
        allowed = CpuSet(os.sched_getaffinity(0)) | cpus
        if not cpus:
            log.warning("affinity.unchanged", reason="every online CPU is in an exclusive pool")
            return
        try:
            pin_process(cpus)
        except OSError as exc:
            log.warning("affinity.failed", cpus=cpus.format(), reason=str(exc))
            return
        log.info("affinity.pinned", housekeeping_cpus=cpus.format(), was=allowed.format())

    # --- servers and registration

    async def _start_resource(self, resource: Resource) -> None:
        servicer = ResourceServicer(
            resource,
            self._cpuid,
            self.metrics,
            self._streams_closed,
            on_allocated=self.allocated,
            claims=self.claims,
        )
        server = ResourceServer(servicer, self.settings.plugin_dir / resource.socket_name)
        try:
            await server.start()
        except (OSError, RuntimeError) as exc:
            log.error("server.start_failed", resource=resource.name, socket=str(server.path), reason=str(exc))
            return
        self.states[resource.name] = ResourceState(server)
        self._start_registration(resource.name)

    async def _stop_resource(self, name: str) -> None:
        state = self.states.pop(name, None)
        if state is None:
            return
        await _cancel(state.registration)
        await _cancel(state.watchdog)
        await state.server.close()
        self.metrics.forget_resource(name)

    def _streams_closed(self, name: str) -> None:
        state = self.states.get(name)
        if state is None or self._stopping.is_set():
            return
        if state.watchdog is not None and not state.watchdog.done():
            # The grace counts from the latest loss: one counted from a stream that reopened and ended since
            # would register in the middle of a kubelet restart, racing the registration kubelet.sock starts.
            state.watchdog.cancel()
        state.watchdog = asyncio.create_task(self._stream_watchdog(name), name=f"watchdog:{name}")

    async def _stream_watchdog(self, name: str) -> None:
        # A kubelet restart is normally seen through kubelet.sock and handled at once; this covers a kubelet
        # that went away (or an event that was missed): without a stream the resource is not served.
        await asyncio.sleep(STREAM_LOST_GRACE_S)
        state = self.states.get(name)
        if state is None or state.server.servicer.stream_count > 0:
            return
        if state.registration is not None and not state.registration.done():
            return
        log.warning("listandwatch.lost", resource=name, action="registering again until the kubelet answers")
        self._start_registration(name)

    def _start_registration(self, name: str, *, replace_stream: bool = False, settle: bool = False) -> None:
        state = self.states[name]
        if state.registration is not None and not state.registration.done():
            state.registration.cancel()
        state.registered = False
        self.metrics.registered.set(0, resource=name)
        state.registration = asyncio.create_task(
            self._register_loop(name, replace_stream=replace_stream, settle=settle), name=f"register:{name}"
        )

    async def _register_loop(self, name: str, *, replace_stream: bool = False, settle: bool = False) -> None:
        if replace_stream:
            state = self.states.get(name)
            if state is not None:
                # The kubelet keeps an older client streaming after a new Register, and when that old stream
                # ends it disconnects the *current* client for the name. So end the old stream first and let
                # the kubelet drop that client; only then register again.
                dropped = await state.server.end_streams_and_wait(REREGISTER_WAIT_S)
                if not dropped:
                    log.warning(
                        "register.old_client_lingers",
                        resource=name,
                        waited_s=REREGISTER_WAIT_S,
                        action="registering anyway",
                    )
            settle = True
        if settle:
            # The kubelet closes the client's connection first and only then marks the old endpoint
            # disconnected: a registration that overtook that step would be the one marked (v1.34-1.36),
            # or be refused and leave the path unusable until the kubelet restarts (v1.37).
            await asyncio.sleep(REREGISTER_SETTLE_S)
        delay = REGISTER_BACKOFF_START_S
        attempt = 0
        while True:
            state = self.states.get(name)
            if state is None:
                return
            attempt += 1
            started = time.monotonic()
            try:
                await register(
                    self.settings.plugin_dir, state.server.servicer.resource, endpoint=state.server.path.name
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A kubelet dying mid-call makes grpclib raise what it likes (StreamTerminatedError, even
                # AttributeError from a torn-down connection), and may turn our own cancel into one of those:
                # the loop must neither die nor outlive its cancellation.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None
                if not isinstance(exc, RegistrationError):
                    exc = RegistrationError(f"Register failed: {exc!r}")
                self.metrics.registrations.inc(resource=name, result="error")
                if ALREADY_CONNECTED in str(exc):
                    await self._relocate(name, str(exc))
                    continue
                log.warning(
                    "register.retry", resource=name, attempt=attempt, reason=str(exc), retry_in_s=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, REGISTER_BACKOFF_MAX_S)
                continue
            state.registered = True
            self.metrics.registrations.inc(resource=name, result="ok")
            self.metrics.registered.set(1, resource=name)
            log.info(
                "registered",
                resource=name,
                endpoint=state.server.path.name,
                attempt=attempt,
                ms=round((time.monotonic() - started) * 1000, 1),
            )
            return

    async def _relocate(self, name: str, reason: str) -> None:
        """The kubelet holds a stale endpoint for our socket path and will refuse it until it restarts:
        serve the resource on a path of its own instead."""
        state = self.states.get(name)
        if state is None:
            return
        self._relocations += 1
        stem = Path(state.server.servicer.resource.socket_name).stem
        # '@' is in no pool name: this path can never be another resource's.
        path = self.settings.plugin_dir / f"{stem}@{self._relocations}.sock"
        log.warning("register.relocating", resource=name, reason=reason, socket=str(path))
        try:
            await state.server.relocate(path)
        except (OSError, RuntimeError) as exc:
            log.error("server.start_failed", resource=name, socket=str(path), reason=str(exc))

    # --- kubelet restarts

    def _kubelet_socket_identity(self) -> tuple[int, int] | None:
        """(inode, change time) of kubelet.sock: a re-created socket can get its old inode number back."""
        try:
            info = (self.settings.plugin_dir / KUBELET_SOCKET).stat()
        except OSError:
            return None
        return info.st_ino, info.st_ctime_ns

    async def _check_kubelet(self) -> None:
        """Look at the directory as it is now: a new kubelet.sock means serve anew and register again."""
        identity = self._kubelet_socket_identity()
        restarted = identity is not None and identity != self._kubelet_socket
        self._kubelet_socket = identity
        if restarted:
            self.metrics.kubelet_restarts.inc()
            self._kubelet_restarted_at = time.monotonic()
            log.info("kubelet.restarted", action="serving on fresh sockets and registering every resource")
            await self._replan("kubelet restart")
            names = list(self.states)
        else:
            names = [n for n, s in self.states.items() if not s.server.socket_present()]
            if names:
                log.warning("socket.vanished", resources=names, action="serving again and re-registering")
        for name in names:
            state = self.states.get(name)
            if state is None:
                continue
            await _cancel(state.registration)
            # A stream open now is with the new kubelet (a registration overtook the restart's event): it
            # must see this stream end before the same path registers again.
            connected = state.server.servicer.stream_count > 0
            await state.server.close()
            if restarted:
                # A new kubelet holds no endpoint: a relocated resource goes back to its own socket.
                state.server.path = self.settings.plugin_dir / state.server.servicer.resource.socket_name
            try:
                await state.server.start()
            except (OSError, RuntimeError) as exc:
                log.error("server.start_failed", resource=name, reason=str(exc), retry="on the next event")
                await self._stop_resource(name)
                continue
            if identity is None:
                # A kubelet mid-restart: it deleted the sockets and has not created kubelet.sock yet. Its
                # creation is watched and registers every resource; a Register retried meanwhile could
                # reach the new kubelet first, only to have its stream ended and settled by that event
                # (+100-200 ms).
                state.registered = False
                self.metrics.registered.set(0, resource=name)
                continue
            self._start_registration(name, settle=connected)
        await self._start_missing()

    async def _start_missing(self) -> None:
        """Serve every planned resource that has no server (its socket was taken when we last tried)."""
        if self.plan is None:
            return
        for name, resource in self.plan.resources.items():
            if name not in self.states:
                await self._start_resource(resource)

    # --- watchers: they only raise flags

    def _config_dir(self) -> Path | None:
        path = self.settings.config_path
        if path is None:
            return None
        # --config may name the ConfigMap's directory itself (per-node-group files) or one file in it.
        return path.absolute() if path.is_dir() else path.absolute().parent

    def _classify(self, changed: Path) -> str | None:
        """Which flag a changed path raises, None for files the agent does not care about."""
        config = self.settings.config_path
        config_dir = self._config_dir()
        plugin_dir = self.settings.plugin_dir.absolute()
        if changed == config_dir:
            return "config"
        if changed == plugin_dir:
            return "kubelet"
        # A ConfigMap update shows as `..data` / `..<timestamp>` entries, a plain file as itself.
        is_config = (
            config is not None
            and changed.parent == config_dir
            and (
                changed.name == config.name
                or changed.name.startswith("..")
                or config_dir == config.absolute()
            )
        )
        if is_config:
            return "config"
        if changed.parent == plugin_dir and changed.name.endswith(".sock"):
            return "kubelet"
        return None

    def _deletions_only(self, directory: Path) -> bool:
        """While kubelet.sock is there, only a deletion in the plugin directory can start a kubelet restart
        (the kubelet deletes every socket first): the checkpoint it rewrites after each allocation then wakes
        nothing."""
        plugin_dir = self.settings.plugin_dir.absolute()
        return (
            directory == plugin_dir
            and directory != self._config_dir()
            and (plugin_dir / KUBELET_SOCKET).exists()
        )

    async def _watch(self) -> None:
        """Watch the plugin directory and the config's directory (never the config file: a ConfigMap
        volume swaps its `..data` symlink, which a watch on the file sees once, then never)."""
        while not self._stopping.is_set():
            paths = [self.settings.plugin_dir.absolute()]
            config_dir = self._config_dir()
            if config_dir is not None and config_dir.is_dir() and config_dir not in paths:
                paths.append(config_dir)
            try:
                async for changes in watch_directories(
                    paths,
                    accept=lambda path: self._classify(path) is not None,
                    stop=self._stopping,
                    quiet_s=self.settings.config_poll_s,
                    deletions_only=self._deletions_only,
                ):
                    if not changes:
                        # Quiet for a while: check the config's content anyway (file systems that do not
                        # report changes), and watch its directory if it appeared since.
                        self.notify("config")
                        if config_dir is not None and config_dir not in paths and config_dir.is_dir():
                            break
                        continue
                    for flag in {self._classify(path) for path in changes}:
                        if flag is not None:
                            self.notify(flag)
            except (OSError, RuntimeError) as exc:
                log.warning(
                    "watch.failed",
                    paths=[str(p) for p in paths],
                    reason=str(exc),
                    retry_in_s=WATCH_RETRY_S,
                )
                await asyncio.sleep(WATCH_RETRY_S)
                self.notify("config")
                self.notify("kubelet")

    async def _recheck_loop(self) -> None:
        while True:
            # Without the kubelet's record (down while it restarts) every served ID counts as held: ask
            # again soon, so that freed devices come back within seconds.
            unknown = self.plan is not None and not self.plan.held_known
            await asyncio.sleep(
                min(self.settings.recheck_interval_s, UNKNOWN_RECHECK_S)
                if unknown
                else self.settings.recheck_interval_s
            )
            if self.plan is not None and self.plan.pending:
                self.notify("recheck")

    async def _hotplug_loop(self) -> None:
        """Compare the online CPU list whenever it may have changed (agent.hotplug: the kernel's uevents, or
        a poll every HOTPLUG_POLL_S where they cannot be had): one small read, no wake-up of anything else.

        The read is done on the loop: it takes about 11 us, where handing it to a worker thread took about
        130 us of CPU and woke a second thread (measured on this project's VM)."""
        path = cpu_dir(self.settings.root) / "online"
        async for _ in online_changes(self.settings.root, self.settings.hotplug_poll_s):
            try:
                online = CpuSet.parse(_read_small_file(path)).format()
            except (OSError, ValueError):
                continue
            if self._online is not None and online != self._online:
                self.notify("hotplug")


def _read_small_file(path: Path) -> str:
    # A sysfs attribute of a few bytes: no page cache miss, no disk; safe to read on the loop.
    return path.read_text()


class _Unreadable(Exception):
    """The config file cannot be read right now (removed, permissions): keep serving the last good one."""


def _emptied(resource: Resource) -> Resource:
    return replace(resource, exclusive={}, shared_count=0, shared_retained=frozenset(), unhealthy=frozenset())


async def run_in_slices(steps: Iterator[None], slice_s: float = SLICE_S) -> None:
    """Run a generator's steps on the loop, giving the loop a turn every `slice_s` seconds: long pure work
    (decoding 200,000 held IDs) must not hold an Allocate back, and a worker thread would (the GIL hands
    over only every few milliseconds, and then not reliably)."""
    deadline = time.perf_counter() + slice_s
    for _ in steps:
        if time.perf_counter() >= deadline:
            await asyncio.sleep(0)
            deadline = time.perf_counter() + slice_s
    # The generator's last step (it fills the result) ran in the last slice: a turn for the loop before
    # the caller's own work (a build, the state file) adds to it.
    await asyncio.sleep(0)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_until_signalled(
    supervisor: Supervisor, extra: list[Callable[[], Coroutine[Any, Any, None]]]
) -> None:
    """Run the supervisor (and helpers such as the health server) until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.stop)
    helpers = [asyncio.create_task(start()) for start in extra]
    try:
        await supervisor.run()
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
