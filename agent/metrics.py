"""The agent's metrics, kept and rendered by prometheus_client (text exposition format 0.0.4).

Callers name labels by keyword (``metrics.allocations.inc(resource=..., method=..., result=...)``); a label a
call leaves out is the empty string, which Prometheus treats as an absent label. Each labelled series is
looked up once and then cached here, so a count on the admission path is a dict lookup and a locked add: no
task, no I/O, no wake-up. Measured cost of the library (docs/benchmarks.md): +1.0 MiB of agent RSS and
11-17 ms of imports on top of what the agent already imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Counters and histograms would otherwise add a `<name>_created` series each, which no dashboard of ours
# reads and which doubles the scrape. The switch is process-wide; the agent is the only user in its process.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_LabelKey = tuple[str, ...]
_F = TypeVar("_F", Counter, Gauge, Histogram)


class MetricLabelError(ValueError):
    """A metric was given a label it was not declared with (a programming error, named in the message)."""


class _Series(Generic[_F]):
    """What the families share: declared label names, and the child series already looked up.

    A family without labels is registered on its first value, so that it is absent until then rather than
    a 0 that would claim something (a kubelet that does not count pooled CPUs, an NRI plugin never tried)."""

    def __init__(
        self, registry: CollectorRegistry, family: _F, name: str, labelnames: tuple[str, ...]
    ) -> None:
        self.name = name
        self.labelnames = labelnames
        self._names = frozenset(labelnames)
        self._registry = registry
        self._family: _F = family
        self._children: dict[_LabelKey, _F] = {}
        if labelnames:
            registry.register(family)

    def _key(self, labels: Mapping[str, str]) -> _LabelKey:
        if not labels.keys() <= self._names:
            unknown = sorted(set(labels) - self._names)
            raise MetricLabelError(
                f"{self.name} has no label {', '.join(unknown)} (it has {self.labelnames})"
            )
        return tuple(labels.get(name, "") for name in self.labelnames)

    def _child(self, labels: Mapping[str, str]) -> _F:
        key = self._key(labels)
        child = self._children.get(key)
        if child is None:
            if key:
                child = self._family.labels(*key)
            else:
                child = self._family
                self._registry.register(child)
            self._children[key] = child
        return child

    def _sample(self, suffix: str, labels: Mapping[str, str]) -> float:
        key = self._key(labels)
        value = self._registry.get_sample_value(
            self.name + suffix, dict(zip(self.labelnames, key, strict=True))
        )
        return 0.0 if value is None else value

    def forget(self, **labels: str) -> None:
        """Drop every series whose labels include these (a resource that is no longer served)."""
        self._key(labels)
        if not labels or not self.labelnames:
            return
        # Every series was made through _child, so the cache knows them all (remove_by_labels is too recent).
        positions = {self.labelnames.index(k): v for k, v in labels.items()}
        for key in [k for k in self._children if all(k[p] == v for p, v in positions.items())]:
            del self._children[key]
            self._family.remove(*key)

    @property
    def values(self) -> dict[_LabelKey, float]:
        """Every series touched so far by its label values, for messages of failed checks."""
        return {key: self._sample("", dict(zip(self.labelnames, key, strict=True))) for key in self._children}


def _counter(name: str, help_text: str, labelnames: tuple[str, ...]) -> Counter:
    # prometheus_client adds `_total` back to a counter's name when it renders it.
    return Counter(name.removesuffix("_total"), help_text, labelnames, registry=None)


class CounterMetric(_Series[Counter]):
    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, labelnames: Sequence[str] = ()
    ) -> None:
        names = tuple(sorted(labelnames))
        super().__init__(registry, _counter(name, help_text, names), name, names)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).inc(amount)

    def get(self, **labels: str) -> float:
        """The value of one series (0 when it was never counted); for /healthz and tests."""
        return self._sample("", labels)


class GaugeMetric(_Series[Gauge]):
    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, labelnames: Sequence[str] = ()
    ) -> None:
        names = tuple(sorted(labelnames))
        super().__init__(registry, Gauge(name, help_text, names, registry=None), name, names)

    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)

    def get(self, **labels: str) -> float:
        """The value of one series (0 when it was never set); for /healthz and tests."""
        return self._sample("", labels)


class HistogramMetric(_Series[Histogram]):
    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help_text: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
    ) -> None:
        names = tuple(sorted(labelnames))
        family = Histogram(name, help_text, names, registry=None, buckets=tuple(buckets))
        super().__init__(registry, family, name, names)

    def observe(self, value: float, **labels: str) -> None:
        self._child(labels).observe(value)

    def count(self, **labels: str) -> int:
        return int(self._sample("_count", labels))


class Metrics:
    """Every metric the agent exports; one instance (and one registry) per agent process."""

    def __init__(self) -> None:
        # A registry of our own: the library's global one would also export its process and GC collectors,
        # and two agents in one test process would clash in it.
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.nri_connected = GaugeMetric(
            r, "cpupool_nri_connected", "1 while the agent is registered as the runtime's NRI plugin."
        )
        self.nri_connections = CounterMetric(
            r, "cpupool_nri_connections_total", "NRI connection attempts, by result.", ["result"]
        )
        self.nri_adjustments = CounterMetric(
            r,
            "cpupool_nri_adjustments_total",
            "NRI container decisions, by event and outcome (adjusted, unchanged, unmapped, conflict, error).",
            ["event", "outcome", "kind"],
        )
        self.nri_seconds = HistogramMetric(
            r,
            "cpupool_nri_request_duration_seconds",
            "Time to answer an NRI request, by method.",
            (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0),
            ["method"],
        )
        self.kubelet_counts_pooled_cpus = GaugeMetric(
            r,
            "cpupool_kubelet_counts_pooled_cpus",
            "1 when the kubelet's config leaves pooled CPUs in allocatable cpu (-1: config unreadable).",
        )
        self.registered = GaugeMetric(
            r,
            "cpupool_resource_registered",
            "1 when the kubelet accepted the resource's registration.",
            ["resource"],
        )
        self.devices = GaugeMetric(
            r, "cpupool_devices", "Devices listed to the kubelet, by health.", ["resource", "health"]
        )
        self.devices_in_use = GaugeMetric(
            r,
            "cpupool_devices_in_use",
            "Devices the kubelet reports as allocated (PodResources API).",
            ["resource"],
        )
        self.streams = GaugeMetric(
            r, "cpupool_listandwatch_streams", "Open ListAndWatch streams.", ["resource"]
        )
        self.registrations = CounterMetric(
            r,
            "cpupool_registrations_total",
            "Registration attempts with the kubelet, by result.",
            ["resource", "result"],
        )
        self.allocations = CounterMetric(
            r,
            "cpupool_allocations_total",
            "Allocate and GetPreferredAllocation calls, by result.",
            ["resource", "method", "result"],
        )
        self.allocation_seconds = HistogramMetric(
            r,
            "cpupool_allocation_duration_seconds",
            "Time to answer Allocate and GetPreferredAllocation.",
            (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            ["resource", "method"],
        )
        self.config_generation = GaugeMetric(
            r, "cpupool_config_generation", "Generation of the config being served (1 = first)."
        )
        self.reloads = CounterMetric(
            r, "cpupool_config_reloads_total", "Config reloads, by result.", ["result"]
        )
        self.kubelet_restarts = CounterMetric(
            r, "cpupool_kubelet_restarts_total", "Kubelet restarts seen (kubelet.sock created again)."
        )

    def forget_resource(self, resource: str) -> None:
        for metric in (self.registered, self.devices, self.devices_in_use, self.streams):
            metric.forget(resource=resource)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
