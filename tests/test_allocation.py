"""The preferred allocation: hand-built HT topologies, error messages, and properties over random ones."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.allocation import AllocationError, ExclusiveDevice, preferred_allocation, sort_ids
from agent.cpuset import CpuSet
from agent.topology import CoreKey

Devices = dict[str, ExclusiveDevice]


def build(
    nodes: int,
    cores_per_node: int,
    threads: int = 2,
    l3_per_node: int | None = 1,
    mode: str = "cpu",
) -> Devices:
    """A Linux-numbered HT host: CPU ``t * total_cores + core`` is thread ``t`` of ``core``.

    mode "cpu" gives one device per CPU; "single" one per core with its lowest thread; "multi" one per
    core with all its threads.
    """
    total = nodes * cores_per_node
    devices: Devices = {}
    for core in range(total):
        node, index = divmod(core, cores_per_node)
        l3 = None if l3_per_node is None else node * l3_per_node + index * l3_per_node // cores_per_node
        key = CoreKey(package=node, core_id=index)
        cpus = [t * total + core for t in range(threads)]
        if mode == "cpu":
            for cpu in cpus:
                devices[str(cpu)] = ExclusiveDevice(str(cpu), CpuSet([cpu]), node, key, l3)
        else:
            given_cpus = CpuSet(cpus[:1]) if mode == "single" else CpuSet(cpus)
            devices[str(cpus[0])] = ExclusiveDevice(str(cpus[0]), given_cpus, node, key, l3)
    return devices


def ids(*numbers: int) -> list[str]:
    return [str(n) for n in numbers]


def nodes_of(devices: Mapping[str, ExclusiveDevice], chosen: Sequence[str]) -> set[int]:
    return {devices[i].numa_node for i in chosen}


def cores_of(devices: Mapping[str, ExclusiveDevice], chosen: Sequence[str]) -> set[CoreKey]:
    return {devices[i].core for i in chosen}


# 2 NUMA nodes x 8 cores x 2 threads: node 0 is CPUs 0-7 and 16-23, node 1 is 8-15 and 24-31.
HOST = build(nodes=2, cores_per_node=8)
ALL = list(HOST)


class TestChoices:
    def test_small_request_fits_one_node_on_whole_cores(self) -> None:
        assert preferred_allocation(HOST, ALL, [], 4) == ids(0, 1, 16, 17)

    def test_whole_node_request_stays_on_that_node(self) -> None:
        chosen = preferred_allocation(HOST, ALL, [], 16)
        assert nodes_of(HOST, chosen) == {0}

    def test_siblings_are_taken_together(self) -> None:
        # CPU 0 belongs to someone else: its sibling 16 is a lone thread, core 1 is whole.
        available = [i for i in ALL if i != "0"]
        assert preferred_allocation(HOST, available, [], 2) == ids(1, 17)

    def test_odd_remainder_fills_a_lone_thread_before_breaking_a_whole_core(self) -> None:
        available = [i for i in ALL if i != "0"]
        assert preferred_allocation(HOST, available, [], 3) == ids(1, 16, 17)

    def test_must_include_pulls_to_its_node(self) -> None:
        # Node 1, the sibling of 9, then the lowest whole core of node 1.
        assert preferred_allocation(HOST, ALL, ["9"], 4) == ids(8, 9, 24, 25)

    def test_must_include_core_is_filled_first(self) -> None:
        assert preferred_allocation(HOST, ALL, ["3"], 2) == ids(3, 19)
        assert preferred_allocation(HOST, ALL, ["3"], 3) == ids(0, 3, 19)

    def test_must_include_on_a_full_node_spills_to_one_more(self) -> None:
        chosen = preferred_allocation(HOST, ALL, ["9"], 20)
        assert "9" in chosen
        assert nodes_of(HOST, chosen) == {0, 1}
        # The node of the must_include device is used up before the other is opened.
        assert sum(1 for i in chosen if HOST[i].numa_node == 1) == 16

    def test_spill_uses_fewest_nodes(self) -> None:
        host = build(nodes=3, cores_per_node=4)  # node n holds cores 4n..4n+3, siblings at +12
        # Node 0 offers one core (2 CPUs), nodes 1 and 2 three cores (6 CPUs) each. Taking the lowest
        # IDs would need all three nodes for 10 CPUs; nodes 1 and 2 hold them alone.
        available = [i for i in host if host[i].core.core_id < (1 if host[i].numa_node == 0 else 3)]
        chosen = preferred_allocation(host, available, [], 10)
        assert nodes_of(host, chosen) == {1, 2}

    def test_must_include_spanning_nodes_adds_no_third(self) -> None:
        host = build(nodes=3, cores_per_node=4)
        chosen = preferred_allocation(host, list(host), ["0", "4"], 6)
        assert nodes_of(host, chosen) == {0, 1}

    def test_same_l3_preferred_over_lower_ids(self) -> None:
        # One node, 8 cores, two L3 caches (cores 0-3 and 4-7); only core 0 is free in the first.
        host = build(nodes=1, cores_per_node=8, l3_per_node=2)
        available = ids(0, 8, 4, 5, 6, 7, 12, 13, 14, 15)
        assert preferred_allocation(host, available, [], 6) == ids(4, 5, 6, 12, 13, 14)

    def test_must_include_l3_preferred(self) -> None:
        host = build(nodes=1, cores_per_node=8, l3_per_node=2, mode="single")
        assert preferred_allocation(host, list(host), ["5"], 3) == ids(4, 5, 6)

    def test_ids_sort_numerically(self) -> None:
        # Per-core devices on one node and cache: only the ID order decides.
        host = build(nodes=1, cores_per_node=12, threads=1, mode="single")
        assert preferred_allocation(host, ids(10, 9, 11), [], 1) == ["9"]
        assert preferred_allocation(host, ids(10, 11, 9, 2), [], 3) == ids(2, 9, 10)

    def test_sort_ids_puts_non_numeric_after(self) -> None:
        assert sort_ids(["10", "b", "9", "a", "100", "2"]) == ["2", "9", "10", "100", "a", "b"]

    def test_multithreaded_devices_pack_on_must_node(self) -> None:
        host = build(nodes=2, cores_per_node=8, mode="multi")
        chosen = preferred_allocation(host, list(host), ["12"], 3)
        assert chosen == ids(8, 9, 12)

    def test_duplicates_are_tolerated(self) -> None:
        chosen = preferred_allocation(HOST, [*ALL, *ALL], ["3", "3"], 2)
        assert chosen == ids(3, 19)

    def test_zero_size(self) -> None:
        assert preferred_allocation(HOST, ALL, [], 0) == []

    def test_everything_available_is_taken(self) -> None:
        assert preferred_allocation(HOST, ids(5, 30), ["30"], 2) == ids(5, 30)

    def test_large_pool_answers(self) -> None:
        # 64 cores, 128 threads over 2 nodes: spread a few takes and allocate the rest in one go.
        host = build(nodes=2, cores_per_node=32)
        available = [i for i in host if int(i) % 7 != 0]
        chosen = preferred_allocation(host, available, ["1", "100"], len(available) - 3)
        assert len(set(chosen)) == len(available) - 3


class TestErrors:
    def test_negative_size(self) -> None:
        with pytest.raises(AllocationError, match=r"allocation size -1 is negative"):
            preferred_allocation(HOST, ALL, [], -1)

    def test_size_above_available(self) -> None:
        with pytest.raises(AllocationError, match=r"allocation size 3 exceeds the 2 available devices"):
            preferred_allocation(HOST, ids(1, 2, 2), [], 3)

    def test_must_include_not_available(self) -> None:
        with pytest.raises(AllocationError, match=r"must-include 1 ID\(s\): '7' not among the available"):
            preferred_allocation(HOST, ids(1, 2), ["7"], 1)

    def test_must_include_larger_than_size(self) -> None:
        expected = r"2 must-include devices do not fit an allocation of size 1"
        with pytest.raises(AllocationError, match=expected):
            preferred_allocation(HOST, ids(1, 2), ids(1, 2, 1), 1)

    def test_unknown_ids_are_named(self) -> None:
        with pytest.raises(AllocationError, match=r"unknown device 2 ID\(s\): '99', 'x'; .* 32 devices"):
            preferred_allocation(HOST, ["x", "1", "99"], [], 1)

    def test_many_unknown_ids_are_counted(self) -> None:
        unknown = [str(n) for n in range(100, 125)]
        with pytest.raises(AllocationError) as caught:
            preferred_allocation(HOST, unknown, [], 1)
        message = str(caught.value)
        assert "25 ID(s): '100'" in message
        assert "'109' and 15 more" in message
        assert "'110'" not in message


# --- properties over random topologies ------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    devices: Devices
    available: list[str]
    must_include: list[str]
    size: int


@st.composite
def topologies(draw: st.DrawFn) -> Devices:
    """Random nodes, cores, uneven hyper-threads, L3 groups (or none) and device mode."""
    nodes = draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["cpu", "single", "multi"]))
    l3_known = draw(st.booleans())
    devices: Devices = {}
    cpu = 0
    for node in range(nodes):
        l3_groups = draw(st.integers(1, 3))
        for core_id in range(draw(st.integers(1, 6))):
            threads = draw(st.integers(1, 3))
            cpus = list(range(cpu, cpu + threads))
            cpu += threads
            key = CoreKey(package=node, core_id=core_id)
            l3 = node * 10 + draw(st.integers(0, l3_groups - 1)) if l3_known else None
            if mode == "cpu":
                for c in cpus:
                    devices[str(c)] = ExclusiveDevice(str(c), CpuSet([c]), node, key, l3)
            else:
                given_cpus = CpuSet(cpus[:1]) if mode == "single" else CpuSet(cpus)
                devices[str(cpus[0])] = ExclusiveDevice(str(cpus[0]), given_cpus, node, key, l3)
    return devices


@st.composite
def requests(draw: st.DrawFn, with_must: bool = True) -> Request:
    devices = draw(topologies())
    everything = list(devices)
    available = [i for i in everything if draw(st.booleans())] or everything[:1]
    must = [i for i in available if draw(st.booleans())] if with_must and draw(st.booleans()) else []
    size = draw(st.integers(len(must), len(available)))
    # The kubelet's lists come from sets: any order, and duplicates must not matter.
    rng = random.Random(draw(st.integers(0, 2**32)))
    shuffled = available + available[: draw(st.integers(0, 2))]
    rng.shuffle(shuffled)
    must_shuffled = must + must[:1]
    rng.shuffle(must_shuffled)
    return Request(devices, shuffled, must_shuffled, size)


def min_cores(free_per_core: list[int], need: int) -> int:
    """The fewest cores whose free threads add up to ``need`` (the largest cores first)."""
    count = 0
    for free in sorted(free_per_core, reverse=True):
        if need <= 0:
            break
        need -= free
        count += 1
    return count


def free_per_core(req: Request, node: int, exclude: set[CoreKey]) -> list[int]:
    per_core: dict[CoreKey, int] = {}
    for i in set(req.available):
        device = req.devices[i]
        if device.numa_node == node and device.core not in exclude:
            per_core[device.core] = per_core.get(device.core, 0) + 1
    return list(per_core.values())


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TestProperties:
    @PROPERTY
    @given(requests())
    def test_contract(self, req: Request) -> None:
        chosen = preferred_allocation(req.devices, req.available, req.must_include, req.size)
        assert len(chosen) == req.size
        assert len(set(chosen)) == len(chosen)
        assert set(chosen) <= set(req.available)
        assert set(req.must_include) <= set(chosen)

    @PROPERTY
    @given(requests(), st.randoms(use_true_random=False))
    def test_input_order_does_not_matter(self, req: Request, rng: random.Random) -> None:
        first = preferred_allocation(req.devices, req.available, req.must_include, req.size)
        available = sorted(set(req.available))
        must = sorted(set(req.must_include))
        rng.shuffle(available)
        rng.shuffle(must)
        assert preferred_allocation(req.devices, available, must, req.size) == first

    @PROPERTY
    @given(requests())
    def test_one_node_when_one_node_can_hold_it(self, req: Request) -> None:
        must_nodes = nodes_of(req.devices, req.must_include)
        fits = [
            node
            for node in {d.numa_node for d in req.devices.values()}
            if must_nodes <= {node}
            and sum(1 for i in set(req.available) if req.devices[i].numa_node == node) >= req.size
        ]
        chosen = preferred_allocation(req.devices, req.available, req.must_include, req.size)
        if fits and req.size > 0:
            assert len(nodes_of(req.devices, chosen)) == 1
            if must_nodes:
                assert nodes_of(req.devices, chosen) == must_nodes

    @PROPERTY
    @given(requests())
    def test_fewest_nodes(self, req: Request) -> None:
        must_nodes = nodes_of(req.devices, req.must_include)
        capacity: dict[int, int] = {}
        for i in set(req.available):
            capacity[req.devices[i].numa_node] = capacity.get(req.devices[i].numa_node, 0) + 1
        need = req.size - sum(capacity[n] for n in must_nodes)
        extra = 0
        for cap in sorted((c for n, c in capacity.items() if n not in must_nodes), reverse=True):
            if need <= 0:
                break
            need -= cap
            extra += 1
        chosen = preferred_allocation(req.devices, req.available, req.must_include, req.size)
        assert len(nodes_of(req.devices, chosen)) == len(must_nodes) + extra

    @PROPERTY
    @given(requests(with_must=False))
    def test_siblings_packed_on_fewest_cores(self, req: Request) -> None:
        fitting = [
            node
            for node in {d.numa_node for d in req.devices.values()}
            if sum(1 for i in set(req.available) if req.devices[i].numa_node == node) >= req.size
        ]
        chosen = preferred_allocation(req.devices, req.available, req.must_include, req.size)
        if fitting:
            best = min(min_cores(free_per_core(req, node, set()), req.size) for node in fitting)
            assert len(cores_of(req.devices, chosen)) == best

    @PROPERTY
    @given(requests())
    def test_must_include_cores_filled_then_fewest_new_cores(self, req: Request) -> None:
        must_nodes = nodes_of(req.devices, req.must_include)
        if len(must_nodes) != 1:
            return
        (node,) = must_nodes
        node_free = sum(1 for i in set(req.available) if req.devices[i].numa_node == node)
        if node_free < req.size:
            return
        must_cores = cores_of(req.devices, req.must_include)
        siblings = sum(
            1 for i in set(req.available) - set(req.must_include) if req.devices[i].core in must_cores
        )
        rest = req.size - len(set(req.must_include)) - siblings
        expected = len(must_cores) + min_cores(free_per_core(req, node, must_cores), rest)
        chosen = preferred_allocation(req.devices, req.available, req.must_include, req.size)
        assert len(cores_of(req.devices, chosen)) == expected
