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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from agent.config import ConfigError, PoolConfig, default_config, parse_config, validate
from agent.cpuset import CpuSet
from agent.deviceplugin import (
    KUBELET_SOCKET,
    RegistrationError,
    ResourceServer,
    ResourceServicer,
    register,
)
from agent.dirwatch import watch_directories
from agent.metrics import Metrics
from agent.plan import Plan, Resource, build_plan, diff_plans
from agent.podresources import PodResourcesError, in_use_by_resource, list_assignments
from agent.topology import Topology, discover

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


def housekeeping_cpus(plan: Plan, topology: Topology) -> CpuSet:
    exclusive = CpuSet().union(*(r.cpus for r in plan.resources.values() if r.exclusive_pool))
    return CpuSet(topology.cpus) - exclusive


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
        # Called after every applied plan (the NRI plugin pushes the cpusets that change).
        self.plan_listeners: list[Callable[[], None]] = []

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
        await self._reload(initial=True)
        self._tasks = [
            asyncio.create_task(self._watch(), name="watch"),
            asyncio.create_task(self._recheck_loop(), name="in-use-recheck"),
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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for name in list(self.states):
            await self._stop_resource(name)
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
            if self._config_text is not None:
                raise _Unreadable(f"{path} was removed") from None
            log.warning("config.missing", path=str(path), serving="the kernel's isolated CPUs")
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise _Unreadable(f"{path}: {exc}") from exc

    async def _reload(self, *, initial: bool = False) -> None:
        """Re-read the config; apply it if it changed and is valid, else keep the last good one."""
        try:
            text = await asyncio.to_thread(self._read_config)
        except _Unreadable as exc:
            log.warning("config.unreadable", reason=str(exc), keeping="last good config")
            return
        if not initial and text == self._config_text:
            if self._rejected is not None:
                # The file is back to the config being served: the earlier error no longer applies.
                self._rejected = self.last_config_error = None
                log.info("config.error_cleared", reason="the file is back to the config being served")
            return
        try:
            config = default_config() if text is None else parse_config(text, str(self.settings.config_path))
            topology = await asyncio.to_thread(discover, self.settings.root)
            validated = validate(config, topology)
            in_use = await self._in_use(config.resource_base_name)
            plan = build_plan(validated, topology, self.plan, in_use or {})
        except ConfigError as exc:
            self._config_failed(exc, text)
            return
        self._config, self._config_text, self.topology = config, text, topology
        # Read with the topology, off the loop: Allocate and re-plans then do no file IO.
        self._cpuid = await asyncio.to_thread(cpuid_cpus, self.settings.root, CpuSet(topology.cpus))
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

    async def _replan(self, reason: str) -> None:
        """Plan the applied config again with fresh in-use data (devices held back may be free now)."""
        if self._config is None or self.topology is None:
            return
        in_use = await self._in_use(self._config.resource_base_name)
        if in_use is None:
            # Without in-use data, releasing held devices could hand one CPU to two pods: keep them.
            return
        try:
            plan = build_plan(validate(self._config, self.topology), self.topology, self.plan, in_use)
        except ConfigError as exc:
            log.warning("replan.skipped", reason=reason, error=str(exc))
            return
        log.debug("replan", reason=reason)
        await self._apply(plan)

    async def _in_use(self, base: str) -> dict[str, frozenset[str]] | None:
        """Device IDs in use per resource, None when the PodResources API cannot tell."""
        socket = self.settings.pod_resources_socket
        if socket is None:
            return None
        try:
            assignments = await list_assignments(socket)
        except PodResourcesError as exc:
            if self.plan is not None:
                log.warning("podresources.unavailable", reason=str(exc), effect="in-use devices unknown")
            return None
        in_use = in_use_by_resource(assignments, base + "/")
        for name in self.states:
            self.metrics.devices_in_use.set(len(in_use.get(name, ())), resource=name)
        return in_use

    async def _apply(self, plan: Plan) -> None:
        old = self.plan
        diff = diff_plans(old, plan)
        self.plan = plan
        for name in diff.removed:
            state = self.states.get(name)
            if state is not None:
                # An empty list first, so the kubelet drops the devices at once rather than on stream end.
                state.server.servicer.update(_emptied(state.server.servicer.resource))
                await state.server.servicer.flush()
                await self._stop_resource(name)
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
                self._start_registration(name)
        for name in diff.added:
            await self._start_resource(plan.resources[name])
        await self._start_missing()
        if self.settings.pin_self and self.topology is not None:
            self._pin(plan, self.topology)
        for listener in self.plan_listeners:
            listener()

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
        servicer = ResourceServicer(resource, self._cpuid, self.metrics, self._streams_closed)
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
        if state.watchdog is None or state.watchdog.done():
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

    def _start_registration(self, name: str) -> None:
        state = self.states[name]
        if state.registration is not None and not state.registration.done():
            state.registration.cancel()
        state.registered = False
        self.metrics.registered.set(0, resource=name)
        state.registration = asyncio.create_task(self._register_loop(name), name=f"register:{name}")

    async def _register_loop(self, name: str) -> None:
        delay = REGISTER_BACKOFF_START_S
        attempt = 0
        while True:
            state = self.states.get(name)
            if state is None:
                return
            attempt += 1
            started = time.monotonic()
            try:
                await register(self.settings.plugin_dir, state.server.servicer.resource)
            except RegistrationError as exc:
                self.metrics.registrations.inc(resource=name, result="error")
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
            await state.server.close()
            try:
                await state.server.start()
            except (OSError, RuntimeError) as exc:
                log.error("server.start_failed", resource=name, reason=str(exc), retry="on the next event")
                await self._stop_resource(name)
                continue
            self._start_registration(name)
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
        return path.absolute().parent if path is not None else None

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
            and (changed.name == config.name or changed.name.startswith(".."))
        )
        if is_config:
            return "config"
        if changed.parent == plugin_dir and changed.name.endswith(".sock"):
            return "kubelet"
        return None

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
            await asyncio.sleep(self.settings.recheck_interval_s)
            if self.plan is not None and self.plan.pending:
                self.notify("recheck")


class _Unreadable(Exception):
    """The config file cannot be read right now (removed, permissions): keep serving the last good one."""


def _emptied(resource: Resource) -> Resource:
    return replace(resource, exclusive={}, shared_count=0, shared_retained=frozenset(), unhealthy=frozenset())


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
