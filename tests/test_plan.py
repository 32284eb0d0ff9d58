"""The plan: devices per pool, stable IDs, message sizes, in-use devices kept safe, plan diffs."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, PoolType, parse_config, validate
from agent.cpuset import CpuSet
from agent.idset import IdSet
from agent.kubeletapi.v1beta1 import Device, ListAndWatchResponse, NumaNode, TopologyInfo
from agent.plan import (
    HEALTHY,
    MAX_MESSAGE_BYTES,
    UNHEALTHY,
    DeviceView,
    Plan,
    Resource,
    build_plan,
    diff_plans,
    list_message_size,
    shared_device_id,
    shared_device_index,
)
from agent.topology import Topology
from agent.wire import encode_devices, encode_resource, encode_shared
from tests.topologies import make_topology

TOPO = make_topology(isolated="2-7,10-15")


def plan_of(text: str, topology: Topology = TOPO, previous: Plan | None = None, in_use=None) -> Plan:  # type: ignore[no-untyped-def]
    validated = validate(parse_config(text, "test.yaml"), topology)
    return build_plan(validated, topology, previous, in_use)


BASE = """
pools:
  fast: {cpus: "2-5", pooltype: exclusive}
  shared: {cpus: "6-7", pooltype: shared}
"""


def test_exclusive_pool_has_one_device_per_cpu_with_its_numa_node() -> None:
    plan = plan_of(BASE)
    fast = plan.resources["cpupool.io/fast"]
    assert [(d.id, d.health, d.numa_node) for d in fast.devices()] == [
        ("2", HEALTHY, 0),
        ("3", HEALTHY, 0),
        ("4", HEALTHY, 1),
        ("5", HEALTHY, 1),
    ]
    assert fast.socket_name == "cpupool-fast.sock"
    assert fast.cpus_of(["2", "5"]) == CpuSet([2, 5])


def test_shared_pool_has_one_device_per_millicpu() -> None:
    shared = plan_of(BASE).resources["cpupool.io/shared"]
    ids = shared.device_ids()
    assert len(ids) == 2000 and len(set(ids)) == 2000
    assert all(d.numa_node is None and d.health == HEALTHY for d in shared.devices())
    # A container gets the whole shared pool whatever millicpus it holds.
    assert shared.cpus_of(ids[:300]) == CpuSet([6, 7])


def test_ht_policies_give_one_device_per_core() -> None:
    text = """
pools:
  single: {cpus: "2-3,10-11", pooltype: exclusive, hyperThreadingPolicy: singleThreaded}
  multi: {cpus: "4-5,12-13", pooltype: exclusive, hyperThreadingPolicy: multiThreaded}
"""
    plan = plan_of(text)
    single = plan.resources["cpupool.io/single"]
    multi = plan.resources["cpupool.io/multi"]
    assert {i: d.cpus.format() for i, d in single.exclusive.items()} == {"2": "2", "3": "3"}
    assert {i: d.cpus.format() for i, d in multi.exclusive.items()} == {"4": "4,12", "5": "5,13"}


def test_shared_ids_are_short_unique_and_invertible() -> None:
    ids = [shared_device_id(i) for i in range(200_000)]
    assert len(set(ids)) == 200_000
    assert max(len(i) for i in ids) == 4
    assert all(shared_device_index(i) == n for n, i in enumerate(ids[:5000]))
    assert shared_device_index("007") is None and shared_device_index("x!") is None


def test_200_cpu_shared_pool_fits_the_kubelet_message_limit() -> None:
    big = make_topology(nodes=2, cores_per_node=100, threads=1)
    shared = plan_of("pools:\n  s: {cpus: '0-199', pooltype: shared}\n", big).resources["cpupool.io/s"]
    size = list_message_size(shared)
    assert size < MAX_MESSAGE_BYTES
    assert len(encode_resource(shared).SerializeToString()) == size


def test_shared_pool_too_big_for_one_message_is_refused() -> None:
    huge = make_topology(nodes=2, cores_per_node=150, threads=1)
    with pytest.raises(ConfigError, match=r"pool 's': .* over the kubelet's 4194304-byte gRPC message limit"):
        plan_of("pools:\n  s: {cpus: '0-299', pooltype: shared}\n", huge)


def test_shared_pool_that_fits_only_while_healthy_is_refused() -> None:
    # 235,000 millicpus listed Healthy fit in 4 MiB; listed Unhealthy, as held ones are while the pool drains
    # or changes type, they do not: the config is refused up front rather than the list failing later.
    wide = make_topology(nodes=2, cores_per_node=120, threads=1)
    with pytest.raises(ConfigError, match=r"pool .s.: .* listed Unhealthy while the pool drains"):
        plan_of("pools:\n  s: {cpus: '0-234', pooltype: shared}\n", wide)


def test_largest_shared_pool_fully_held_still_fits_after_it_turns_exclusive() -> None:
    wide = make_topology(nodes=2, cores_per_node=120, threads=1)
    shared = plan_of("pools:\n  s: {cpus: '0-219', pooltype: shared}\n", wide)
    name = "cpupool.io/s"
    # Every millicpu held but those whose IDs read as the new exclusive devices' ("0" to "239").
    held = {name: IdSet.span(0, shared.resources[name].shared_count) - {str(cpu) for cpu in range(240)}}
    turned = plan_of("pools:\n  s: {cpus: '0-239', pooltype: exclusive}\n", wide, shared, held)
    resource = turned.resources[name]
    assert len(resource.shared_retained) == 220_000 - 240 and len(resource.exclusive) == 240
    size = list_message_size(resource)
    assert size < MAX_MESSAGE_BYTES
    assert len(encode_resource(resource).SerializeToString()) == size


def test_encoded_list_matches_the_generic_protobuf_encoder() -> None:
    fast = plan_of(BASE).resources["cpupool.io/fast"]
    reference = ListAndWatchResponse(
        devices=[
            Device(id=d.id, health=d.health, topology=TopologyInfo(nodes=[NumaNode(id=d.numa_node or 0)]))
            for d in fast.devices()
        ]
    )
    encoded = encode_resource(fast).SerializeToString()
    assert encoded == bytes(reference)
    assert len(encoded) == list_message_size(fast)
    decoded = ListAndWatchResponse.parse(encoded)
    assert [(d.id, d.topology.nodes[0].id if d.topology else None) for d in decoded.devices] == [
        ("2", 0),
        ("3", 0),
        ("4", 1),
        ("5", 1),
    ]


def test_equal_inputs_give_equal_plans_and_an_empty_diff() -> None:
    first, second = plan_of(BASE), plan_of(BASE)
    assert first == second
    assert diff_plans(first, second).empty


def test_diff_names_added_changed_and_removed() -> None:
    old = plan_of(BASE)
    new = plan_of(
        "pools:\n  fast: {cpus: '2-4', pooltype: exclusive}\n  other: {cpus: '10', pooltype: exclusive}\n"
    )
    diff = diff_plans(old, new)
    assert diff.added == ("cpupool.io/other",)
    assert diff.changed == ("cpupool.io/fast",)
    assert diff.removed == ("cpupool.io/shared",)


def test_shrinking_pool_keeps_in_use_devices_unhealthy() -> None:
    old = plan_of(BASE)
    in_use = {"cpupool.io/fast": frozenset({"5"})}
    new = plan_of(
        "pools:\n  fast: {cpus: '2-4', pooltype: exclusive}\n  shared: {cpus: '6-7', pooltype: shared}\n",
        previous=old,
        in_use=in_use,
    )
    fast = new.resources["cpupool.io/fast"]
    assert [(d.id, d.health) for d in fast.devices()] == [
        ("2", HEALTHY),
        ("3", HEALTHY),
        ("4", HEALTHY),
        ("5", UNHEALTHY),
    ]
    assert new.pending
    # Once the pod is gone, the device goes away.
    freed = plan_of(
        "pools:\n  fast: {cpus: '2-4', pooltype: exclusive}\n  shared: {cpus: '6-7', pooltype: shared}\n",
        previous=new,
        in_use={},
    )
    assert freed.resources["cpupool.io/fast"].device_ids() == ["2", "3", "4"]
    assert not freed.pending


def test_cpu_moved_to_another_pool_is_unhealthy_there_while_in_use() -> None:
    old = plan_of(BASE)
    in_use = {"cpupool.io/fast": frozenset({"5"})}
    new = plan_of(
        "pools:\n  fast: {cpus: '2-4', pooltype: exclusive}\n  other: {cpus: '5', pooltype: exclusive}\n",
        previous=old,
        in_use=in_use,
    )
    other = new.resources["cpupool.io/other"]
    assert [(d.id, d.health) for d in other.devices()] == [("5", UNHEALTHY)]


def test_redefined_device_in_use_keeps_its_old_cpus() -> None:
    old = plan_of("pools:\n  p: {cpus: '2-3,10-11', pooltype: exclusive}\n")
    new = plan_of(
        "pools:\n  p: {cpus: '2-3,10-11', pooltype: exclusive, hyperThreadingPolicy: multiThreaded}\n",
        previous=old,
        in_use={"cpupool.io/p": frozenset({"2"})},
    )
    p = new.resources["cpupool.io/p"]
    assert p.exclusive["2"].cpus == CpuSet([2])
    assert "2" in p.unhealthy
    assert p.exclusive["3"].cpus == CpuSet([3, 11]) and "3" not in p.unhealthy


def test_removed_pool_with_devices_in_use_drains() -> None:
    old = plan_of(BASE)
    new = plan_of(
        "pools:\n  fast: {cpus: '2-5', pooltype: exclusive}\n",
        previous=old,
        in_use={"cpupool.io/shared": frozenset({shared_device_id(1999), "0"})},
    )
    shared = new.resources["cpupool.io/shared"]
    assert [(d.id, d.health) for d in shared.devices()] == [
        ("0", UNHEALTHY),
        (shared_device_id(1999), UNHEALTHY),
    ]


def test_shared_pool_shrink_retains_high_ids_in_use() -> None:
    old = plan_of(BASE)
    high = shared_device_id(1500)
    new = plan_of(
        "pools:\n  fast: {cpus: '2-5', pooltype: exclusive}\n  shared: {cpus: '6', pooltype: shared}\n",
        previous=old,
        in_use={"cpupool.io/shared": frozenset({high, "3"})},
    )
    shared = new.resources["cpupool.io/shared"]
    assert shared.healthy_count == 1000
    assert shared.devices()[-1].id == high and shared.devices()[-1].health == UNHEALTHY
    assert shared.has_device(high) and shared.has_device("3")


@pytest.mark.parametrize(
    ("count", "retained"), [(0, ()), (1, ()), (36, ()), (37, (5000,)), (1297, ()), (46_693, (99_999,))]
)
def test_fast_shared_encoding_matches_device_by_device_encoding(
    count: int, retained: tuple[int, ...]
) -> None:
    views = [DeviceView(shared_device_id(i), HEALTHY, None) for i in range(count)]
    views += [DeviceView(shared_device_id(i), UNHEALTHY, None) for i in sorted(retained)]
    encoded = encode_shared(count, retained)
    assert encoded == encode_devices(views)
    resource = Resource(
        "cpupool.io/s",
        "s",
        PoolType.SHARED,
        None,
        CpuSet(),
        shared_count=count,
        shared_retained=frozenset(retained),
    )
    assert list_message_size(resource) == len(encoded)
    assert resource.device_count == count + len(retained)
