"""The agent's metrics in the Prometheus text exposition format (version 0.0.4).

Small on purpose: counters, gauges and one histogram kind, labelled, rendered on demand by the health server.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _render_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@dataclass
class Metric:
    name: str
    help: str
    kind: str  # counter | gauge
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        self.values[_labels(labels)] = value

    def get(self, **labels: str) -> float:
        return self.values.get(_labels(labels), 0.0)

    def forget(self, **labels: str) -> None:
        """Drop every series whose labels include these (a resource that is no longer served)."""
        wanted = set(labels.items())
        for key in [k for k in self.values if wanted <= set(k)]:
            del self.values[key]

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_render_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: dict[Labels, list[int]] = field(default_factory=dict)
    sums: dict[Labels, float] = field(default_factory=dict)

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(labels)
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[key] = self.sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self.counts.get(_labels(labels), []))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self.counts.items()):
            running = 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                running += count
                lines.append(f"{self.name}_bucket{_render_labels(key, [('le', _number(bound))])} {running}")
            lines.append(f"{self.name}_sum{_render_labels(key)} {_number(self.sums[key])}")
            lines.append(f"{self.name}_count{_render_labels(key)} {running}")
        return lines


class Metrics:
    """Every metric the agent exports; one instance per agent process."""

    def __init__(self) -> None:
        self.registered = Metric(
            "cpupool_resource_registered", "1 when the kubelet accepted the resource's registration.", "gauge"
        )
        self.devices = Metric("cpupool_devices", "Devices listed to the kubelet, by health.", "gauge")
        self.devices_in_use = Metric(
            "cpupool_devices_in_use", "Devices the kubelet reports as allocated (PodResources API).", "gauge"
        )
        self.streams = Metric("cpupool_listandwatch_streams", "Open ListAndWatch streams.", "gauge")
        self.registrations = Metric(
            "cpupool_registrations_total", "Registration attempts with the kubelet, by result.", "counter"
        )
        self.allocations = Metric(
            "cpupool_allocations_total", "Allocate and GetPreferredAllocation calls, by result.", "counter"
        )
        self.allocation_seconds = Histogram(
            "cpupool_allocation_duration_seconds",
            "Time to answer Allocate and GetPreferredAllocation.",
            (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
        )
        self.config_generation = Metric(
            "cpupool_config_generation", "Generation of the config being served (1 = first).", "gauge"
        )
        self.reloads = Metric("cpupool_config_reloads_total", "Config reloads, by result.", "counter")
        self.kubelet_restarts = Metric(
            "cpupool_kubelet_restarts_total", "Kubelet restarts seen (kubelet.sock created again).", "counter"
        )
        self.nri_connected = Metric(
            "cpupool_nri_connected", "1 while the agent is registered as the runtime's NRI plugin.", "gauge"
        )
        self.nri_connections = Metric(
            "cpupool_nri_connections_total", "NRI connection attempts, by result.", "counter"
        )
        self.nri_adjustments = Metric(
            "cpupool_nri_adjustments_total",
            "NRI container decisions, by event and outcome (adjusted, unchanged, unmapped, conflict, error).",
            "counter",
        )
        self.nri_seconds = Histogram(
            "cpupool_nri_request_duration_seconds",
            "Time to answer an NRI request, by method.",
            (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0),
        )
        self.kubelet_counts_pooled_cpus = Metric(
            "cpupool_kubelet_counts_pooled_cpus",
            "1 when the kubelet's config leaves pooled CPUs in allocatable cpu (-1: config unreadable).",
            "gauge",
        )
        self._all: list[Metric | Histogram] = [
            self.nri_connected,
            self.nri_connections,
            self.nri_adjustments,
            self.nri_seconds,
            self.kubelet_counts_pooled_cpus,
            self.registered,
            self.devices,
            self.devices_in_use,
            self.streams,
            self.registrations,
            self.allocations,
            self.allocation_seconds,
            self.config_generation,
            self.reloads,
            self.kubelet_restarts,
        ]

    def forget_resource(self, resource: str) -> None:
        for metric in (self.registered, self.devices, self.devices_in_use, self.streams):
            metric.forget(resource=resource)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._all:
            lines += metric.render()
        return "\n".join(lines) + "\n"
