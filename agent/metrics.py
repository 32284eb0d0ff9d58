"""The agent's metrics, kept here and rendered in Prometheus' text exposition format 0.0.4.

Callers name labels by keyword (``metrics.allocations.inc(resource=..., method=..., result=...)``); a label a
call leaves out is the empty string, which Prometheus treats as an absent label. A count on the admission path
is a dict lookup and a locked add: no task, no I/O, no wake-up. Its series are resolved once per servicer
(``.series(...)``): checking and ordering the labels on every call was about half of the count's cost.

prometheus_client kept and rendered them before; it cost the agent 1.9 MiB of RSS, and its exposition module
imports `ssl` unconditionally, which kept OpenSSL in the process (agent/leanstart.py keeps it out otherwise).
That is 3 of the 32 MiB target (docs/benchmarks.md, "RSS, start and idle: where they go"), so the format is
written here, as the library wrote it (labels in name order, `le` first, float values, no `_created` series);
tests parse it with prometheus_client's own parser.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Mapping, Sequence

_LabelKey = tuple[str, ...]


class MetricLabelError(ValueError):
    """A metric was given a label it was not declared with (a programming error, named in the message)."""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs) + "}"


class _Series:
    """A family: its declared label names and its series by label values.

    A family without labels renders only once it has a value, so that it is absent until then rather than
    a 0 that would claim something (a kubelet that does not count pooled CPUs, an NRI plugin never tried)."""

    kind = ""

    def __init__(self, registry: Registry, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(sorted(labelnames))
        self._names = frozenset(self.labelnames)
        # Counts come from the loop and from worker threads alike.
        self._lock = threading.Lock()
        registry.add(self)

    def _key(self, labels: Mapping[str, str]) -> _LabelKey:
        if not labels.keys() <= self._names:
            unknown = sorted(set(labels) - self._names)
            raise MetricLabelError(
                f"{self.name} has no label {', '.join(unknown)} (it has {self.labelnames})"
            )
        return tuple(labels.get(name, "") for name in self.labelnames)

    def _pairs(self, key: _LabelKey) -> list[tuple[str, str]]:
        return list(zip(self.labelnames, key, strict=True))

    def _keys(self) -> list[_LabelKey]:
        raise NotImplementedError

    def _drop(self, key: _LabelKey) -> None:
        raise NotImplementedError

    def forget(self, **labels: str) -> None:
        """Drop every series whose labels include these (a resource that is no longer served)."""
        self._key(labels)
        if not labels or not self.labelnames:
            return
        positions = {self.labelnames.index(k): v for k, v in labels.items()}
        with self._lock:
            for key in [k for k in self._keys() if all(k[p] == v for p, v in positions.items())]:
                self._drop(key)

    def render(self) -> list[str]:
        samples = self._samples()
        if not samples and not self.labelnames:
            return []
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}", *samples]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class _Valued(_Series):
    """Counters and gauges: one number per series."""

    def __init__(self, registry: Registry, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(registry, name, help_text, labelnames)
        self._values: dict[_LabelKey, float] = {}

    def get(self, **labels: str) -> float:
        """The value of one series (0 when it was never counted or set); for /healthz and tests."""
        return self._values.get(self._key(labels), 0.0)

    @property
    def values(self) -> dict[_LabelKey, float]:
        """Every series so far by its label values, for messages of failed checks."""
        return dict(self._values)

    def _keys(self) -> list[_LabelKey]:
        return list(self._values)

    def _drop(self, key: _LabelKey) -> None:
        del self._values[key]

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self._pairs(key))} {_number(value)}" for key, value in items]


class CounterMetric(_Valued):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(self._key(labels), amount)

    def series(self, **labels: str) -> CounterSeries:
        """One series with its labels checked and resolved once, for a count made on every call."""
        return CounterSeries(self, self._key(labels))

    def _add(self, key: _LabelKey, amount: float) -> None:
        if amount < 0:
            raise ValueError(f"{self.name} is a counter: it cannot go down by {amount}")
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class CounterSeries:
    """A counter's series of fixed labels (CounterMetric.series): it appears once first counted."""

    __slots__ = ("_family", "_key")

    def __init__(self, family: CounterMetric, key: _LabelKey) -> None:
        self._family = family
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        self._family._add(self._key, amount)


class GaugeMetric(_Valued):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class HistogramMetric(_Series):
    kind = "histogram"

    def __init__(
        self,
        registry: Registry,
        name: str,
        help_text: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
    ) -> None:
        super().__init__(registry, name, help_text, labelnames)
        if "le" in self._names:
            raise MetricLabelError(f"{name}: 'le' is the bucket label of a histogram")
        self.buckets = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        # Per series: the count in each bucket (the last one above every bound), and the sum.
        self._counts: dict[_LabelKey, list[int]] = {}
        self._sums: dict[_LabelKey, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        self._observe(self._key(labels), value)

    def series(self, **labels: str) -> HistogramSeries:
        """One series with its labels checked and resolved once, for a time taken on every call."""
        return HistogramSeries(self, self._key(labels))

    def _observe(self, key: _LabelKey, value: float) -> None:
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = [0] * (len(self.buckets) + 1)
                self._sums[key] = 0.0
            # A bucket counts values up to and including its bound.
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sums[key] += value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(self._key(labels), ()))

    @property
    def values(self) -> dict[_LabelKey, float]:
        """Every series so far (its count) by its label values, for messages of failed checks."""
        return {key: float(sum(counts)) for key, counts in self._counts.items()}

    def _keys(self) -> list[_LabelKey]:
        return list(self._counts)

    def _drop(self, key: _LabelKey) -> None:
        del self._counts[key]
        del self._sums[key]

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted((key, list(counts), self._sums[key]) for key, counts in self._counts.items())
        lines = []
        for key, counts, total in items:
            pairs = self._pairs(key)
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                lines.append(
                    f"{self.name}_bucket{_labels([('le', _number(bound)), *pairs])} {float(running)!r}"
                )
            lines.append(f"{self.name}_count{_labels(pairs)} {float(running)!r}")
            lines.append(f"{self.name}_sum{_labels(pairs)} {_number(total)}")
        return lines


class HistogramSeries:
    """A histogram's series of fixed labels (HistogramMetric.series): it appears once first observed."""

    __slots__ = ("_family", "_key")

    def __init__(self, family: HistogramMetric, key: _LabelKey) -> None:
        self._family = family
        self._key = key

    def observe(self, value: float) -> None:
        self._family._observe(self._key, value)


class Registry:
    """The families of one agent, in the order they render."""

    def __init__(self) -> None:
        self._families: list[_Series] = []

    def add(self, family: _Series) -> None:
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"a metric named {family.name} is already registered")
        self._families.append(family)

    def render(self) -> str:
        lines = [line for family in self._families for line in family.render()]
        return "\n".join(lines) + "\n" if lines else ""


class Metrics:
    """Every metric the agent exports; one instance (and one registry) per agent process."""

    def __init__(self) -> None:
        # Every family in the order they render; two agents in one test process keep theirs apart.
        self.registry = r = Registry()
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
        return self.registry.render()
