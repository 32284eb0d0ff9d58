"""What is held keeps its meaning: type changes, base-name changes, shared CPUs that move, offline CPUs,
the kubelet's record unknown, and the state file that carries meanings across agent restarts."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.allocation import ExclusiveDevice
from agent.config import PoolType, parse_config, validate
from agent.cpuset import CpuSet
from agent.idset import IdSet
from agent.ledger import dumps, loads
from agent.plan import (
    HEALTHY,
    UNHEALTHY,
    UNKNOWN,
    Held,
    Plan,
    Resource,
    build_plan,
    list_message_size,
    shared_device_id,
)
from agent.topology import CoreKey, Topology
from agent.wire import encode_devices, encode_resource
from tests.topologies import make_topology

# 2 NUMA nodes x 4 cores x 2 threads: CPUs 0-15, siblings n and n+8.
TOPO = make_topology(isolated="2-7,10-15")


def plan_of(
    text: str, previous: Plan | None = None, held: Held | None = None, topology: Topology = TOPO
) -> Plan:
    return build_plan(validate(parse_config(text, "test.yaml"), topology), topology, previous, held)


def offline(topology: Topology, cpus: str) -> Topology:
    gone = CpuSet.parse(cpus)
    return replace(
        topology,
        online=topology.online - gone,
        cpus={n: c for n, c in topology.cpus.items() if n not in gone},
    )


def health(resource: Resource) -> dict[str, str]:
    return {d.id: d.health for d in resource.devices()}


def assert_encodes_as_listed(resource: Resource) -> None:
    encoded = encode_resource(resource)
    assert bytes(encoded) == encode_devices(resource.devices())
    assert list_message_size(resource) == len(bytes(encoded))
    assert encoded.device_count == resource.device_count == len(resource.devices())
    ids = [d.id for d in resource.devices()]
    assert len(ids) == len(set(ids)), "a device ID is listed twice"


EXCL = "pools:\n  a: {cpus: '2-5', pooltype: exclusive}\n  s: {cpus: '6-7', pooltype: shared}\n"


def test_exclusive_to_shared_keeps_held_ids_exclusive_and_out_of_shared_cpus() -> None:
    old = plan_of(EXCL)
    new = plan_of(
        "pools:\n  a: {cpus: '2-5', pooltype: shared}\n",
        previous=old,
        held={"cpupool.io/a": frozenset({"2", "3"})},
    )
    a = new.resources["cpupool.io/a"]
    assert a.pool_type is PoolType.SHARED
    # A shared container never gets a CPU another container holds exclusively.
    assert a.cpus == CpuSet([4, 5])
    assert a.grant(["0"]).shared == CpuSet([4, 5])
    # The held IDs keep their exclusive meaning, listed Unhealthy; millicpus "2" and "3" wait for them.
    assert a.grant(["2"]).exclusive == CpuSet([2])
    assert health(a)["2"] == UNHEALTHY and health(a)["3"] == UNHEALTHY
    assert a.healthy_count == 2000 - 2
    assert_encodes_as_listed(a)
    # Freed: the whole pool is shared again and the IDs are millicpus.
    later = plan_of("pools:\n  a: {cpus: '2-5', pooltype: shared}\n", previous=new, held={})
    a = later.resources["cpupool.io/a"]
    assert a.cpus == CpuSet([2, 3, 4, 5]) and a.healthy_count == 4000 and not a.exclusive
    assert_encodes_as_listed(a)


def test_shared_to_exclusive_keeps_shared_holders_off_their_cpus() -> None:
    old = plan_of(EXCL)
    held = {"cpupool.io/s": frozenset({"7", shared_device_id(1500)})}
    new = plan_of(
        "pools:\n  a: {cpus: '2-5', pooltype: exclusive}\n  s: {cpus: '6-7', pooltype: exclusive}\n",
        previous=old,
        held=held,
    )
    s = new.resources["cpupool.io/s"]
    assert s.pool_type is PoolType.EXCLUSIVE
    # CPUs 6 and 7 still run shared containers: not one of them is offered, and Allocate refuses them.
    assert {d.id for d in s.devices() if d.health == HEALTHY} == set()
    assert "6" in s.blocked
    # Millicpu "7" is held: exclusive device "7" waits until it is free.
    assert "7" not in s.exclusive and s.grant(["7"]).shared == CpuSet([6, 7])
    assert_encodes_as_listed(s)
    freed = plan_of(
        "pools:\n  a: {cpus: '2-5', pooltype: exclusive}\n  s: {cpus: '6-7', pooltype: exclusive}\n",
        previous=new,
        held={},
    )
    assert health(freed.resources["cpupool.io/s"]) == {"6": HEALTHY, "7": HEALTHY}


def test_resource_base_name_change_keeps_old_names_draining_on_their_own_sockets() -> None:
    old = plan_of(EXCL)
    new = plan_of(
        "resourceBaseName: other.io\npools:\n  a: {cpus: '2-5', pooltype: exclusive}\n",
        previous=old,
        held={"cpupool.io/a": frozenset({"4"})},
    )
    assert set(new.resources) == {"other.io/a", "cpupool.io/a"}
    drained = new.resources["cpupool.io/a"]
    assert not drained.configured and health(drained) == {"4": UNHEALTHY}
    assert drained.socket_name != new.resources["other.io/a"].socket_name
    # The new name never offers the held CPU, and refuses it.
    other = new.resources["other.io/a"]
    assert health(other)["4"] == UNHEALTHY and "cpupool.io/a" in other.blocked["4"]


def test_shared_cpus_that_move_stay_unoffered_while_shared_containers_hold_them() -> None:
    old = plan_of(EXCL)
    # Shared containers hold millicpus handed out while the pool was 6-7; 7 moves to the exclusive pool.
    moved = "pools:\n  a: {cpus: '2-5,7', pooltype: exclusive}\n  s: {cpus: '6', pooltype: shared}\n"
    new = plan_of(moved, previous=old, held={"cpupool.io/s": frozenset({"0", "1"})})
    a, s = new.resources["cpupool.io/a"], new.resources["cpupool.io/s"]
    assert health(a)["7"] == UNHEALTHY and "shared" in a.blocked["7"]
    # New shared containers get CPU 6 only; the held millicpus keep the CPUs they were given.
    assert s.cpus == CpuSet([6]) and s.grant(["5"]).shared == CpuSet([6])
    assert s.grant(["0"]).shared == CpuSet([6, 7])
    # Still held at the next re-check: still kept. Then freed: offered.
    again = plan_of(moved, previous=new, held={"cpupool.io/s": frozenset({"1"})})
    assert health(again.resources["cpupool.io/a"])["7"] == UNHEALTHY
    freed = plan_of(moved, previous=again, held={"cpupool.io/s": frozenset({"5"})})
    assert health(freed.resources["cpupool.io/a"])["7"] == HEALTHY
    assert not freed.resources["cpupool.io/s"].shared_groups


def test_without_the_kubelets_record_nothing_moves() -> None:
    old = plan_of(EXCL)
    moved = (
        "pools:\n  a: {cpus: '2-4', pooltype: exclusive}\n  b: {cpus: '5', pooltype: exclusive}\n"
        "  s: {cpus: '6-7', pooltype: shared}\n"
    )
    new = plan_of(moved, previous=old, held=UNKNOWN)
    assert not new.held_known and new.pending
    assert health(new.resources["cpupool.io/a"])["5"] == UNHEALTHY
    assert health(new.resources["cpupool.io/b"]) == {"5": UNHEALTHY}
    assert "5" in new.resources["cpupool.io/b"].blocked
    # Known again, nothing held: the move happens.
    known = plan_of(moved, previous=new, held={})
    assert health(known.resources["cpupool.io/b"]) == {"5": HEALTHY}
    assert "5" not in known.resources["cpupool.io/a"].exclusive


def test_offline_cpus_are_unhealthy_and_come_back_healthy() -> None:
    old = plan_of(EXCL)
    down = offline(TOPO, "3,7")
    new = plan_of(EXCL, previous=old, held={}, topology=down)
    a, s = new.resources["cpupool.io/a"], new.resources["cpupool.io/s"]
    assert health(a) == {"2": HEALTHY, "3": UNHEALTHY, "4": HEALTHY, "5": HEALTHY}
    assert "offline" in a.blocked["3"]
    assert s.cpus == CpuSet([6]) and s.healthy_count == 1000
    assert_encodes_as_listed(s)
    up = plan_of(EXCL, previous=new, held={})
    assert health(up.resources["cpupool.io/a"])["3"] == HEALTHY
    assert up.resources["cpupool.io/s"].cpus == CpuSet([6, 7])


def test_held_device_of_an_offline_cpu_stays_listed_with_its_meaning() -> None:
    old = plan_of(EXCL)
    new = plan_of(EXCL, previous=old, held={"cpupool.io/a": frozenset({"3"})}, topology=offline(TOPO, "3"))
    a = new.resources["cpupool.io/a"]
    assert a.exclusive["3"].numa_node == 0 and health(a)["3"] == UNHEALTHY
    # It is the holder's own device: a re-admission may still Allocate it.
    assert "3" not in a.blocked


def test_state_file_round_trip_keeps_every_meaning() -> None:
    old = plan_of(EXCL)
    changed = plan_of(
        "pools:\n  a: {cpus: '2-5,7', pooltype: shared}\n",
        previous=old,
        held={"cpupool.io/a": frozenset({"2"}), "cpupool.io/s": frozenset({"0", "zz"})},
    )
    text = dumps(changed)
    restored = loads(text)
    assert dumps(restored) == text
    # Planning from the restored state gives what planning from memory gives.
    held = {"cpupool.io/a": frozenset({"2"}), "cpupool.io/s": frozenset({"0"})}
    assert plan_of(EXCL, previous=restored, held=held) == plan_of(EXCL, previous=changed, held=held)


def _v1_ranges(indexes: Iterable[int]) -> str:
    """Version 1's "0-4,7" form."""
    parts: list[str] = []
    for index in sorted(indexes):
        if parts and parts[-1].split("-")[-1] == str(index - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{index}"
        else:
            parts.append(str(index))
    return ",".join(parts)


def test_a_state_file_of_format_version_1_is_still_read() -> None:
    # Written by the agent before ID sets were packed as bitmaps: an upgrade must keep every meaning.
    old = plan_of("pools:\n  s: {cpus: '6-7', pooltype: shared}\n")
    held = {"cpupool.io/s": frozenset({"3", "4", shared_device_id(1500)})}
    # The shared pool shrinks under its holders: their IDs keep 6-7 (a group), 1500 is past the new count.
    changed = plan_of(
        "pools:\n  s: {cpus: '6', pooltype: shared}\n  e: {cpus: '7', pooltype: exclusive}\n",
        previous=old,
        held=held,
    )
    assert changed.resources["cpupool.io/s"].shared_retained == {1500}
    body = json.loads(dumps(changed))
    body["version"] = 1
    for name, raw in body["resources"].items():
        resource = changed.resources[name]
        raw["sharedRetained"] = _v1_ranges(resource.shared_retained)
        raw["sharedWithheld"] = _v1_ranges(resource.shared_withheld)
        for group, raw_group in zip(resource.shared_groups, raw["groups"], strict=True):
            raw_group["ids"] = _v1_ranges(IdSet.of(group.ids).indexes())
    assert any(raw["groups"] for raw in body["resources"].values())
    assert dumps(loads(json.dumps(body))) == dumps(changed)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(0, 50_000),
    holes=st.sets(st.integers(0, 50_000), max_size=6),
    retained=st.sets(st.integers(0, 60_000), max_size=4),
)
def test_listing_with_withheld_ids_encodes_like_the_device_list(
    count: int, holes: set[int], retained: set[int]
) -> None:
    withheld = frozenset(h for h in holes if h < count)
    foreign = {
        shared_device_id(h): ExclusiveDevice(shared_device_id(h), CpuSet([h % 16]), 0, CoreKey(0, 0), None)
        for h in withheld
        if shared_device_id(h).isdigit()
    }
    withheld = frozenset(h for h in withheld if shared_device_id(h) in foreign)
    resource = Resource(
        "cpupool.io/s",
        "s",
        PoolType.SHARED,
        None,
        CpuSet([1]),
        exclusive=foreign,
        shared_count=count,
        shared_retained=frozenset(r for r in retained if r >= count),
        shared_withheld=withheld,
        unhealthy=frozenset(foreign),
    )
    assert_encodes_as_listed(resource)


def test_a_cpu_never_seen_online_is_listed_without_a_numa_node() -> None:
    # Found by the state machine: a pool naming an offline CPU the agent never saw could not be encoded.
    plan = plan_of(EXCL, topology=offline(TOPO, "4"))
    a = plan.resources["cpupool.io/a"]
    assert {d.id: (d.health, d.numa_node) for d in a.devices()}["4"] == (UNHEALTHY, None)
    assert_encodes_as_listed(a)


def test_two_resource_names_never_share_a_socket() -> None:
    # Found by the state machine: after a base-name change, a kubelet still routing Allocates for the old name
    # to its old path reached the new name's servicer, which answered with its own CPUs.
    old = plan_of(EXCL)
    new = plan_of(EXCL.replace("pools:", "resourceBaseName: other.io\npools:"), previous=old, held={})
    assert new.resources["other.io/a"].socket_name not in {r.socket_name for r in old.resources.values()}
    back = plan_of(EXCL, previous=new, held={"other.io/a": frozenset({"2"})})
    sockets = [r.socket_name for r in back.resources.values()]
    assert len(sockets) == len(set(sockets)) == 3
    assert back.resources["cpupool.io/a"].socket_name == "cpupool-a.sock"


def test_without_the_record_a_device_held_elsewhere_is_refused_even_if_it_may_be_ours() -> None:
    # Found in review: with the record unknown every device counts as its own holder's, which used to lift
    # every refusal; a kubelet allocating from a list two plans old then put a shared CPU in an exclusive set.
    p0 = plan_of("pools:\n  a: {cpus: '2-3', pooltype: exclusive}\n")
    p1 = plan_of(
        "pools:\n  a: {cpus: '2', pooltype: exclusive}\n  s: {cpus: '3-4', pooltype: shared}\n",
        previous=p0,
        held={},
    )
    back = "pools:\n  a: {cpus: '2-3', pooltype: exclusive}\n"
    p2 = plan_of(back, previous=p1, held={"cpupool.io/s": frozenset({"0"})})
    assert "3" in p2.resources["cpupool.io/a"].blocked
    p3 = plan_of(back, previous=p2, held=UNKNOWN)
    assert "3" in p3.resources["cpupool.io/a"].blocked


def test_a_held_single_threaded_core_keeps_its_idle_sibling() -> None:
    # Found in review: the held device's promise ("the sibling stays idle") was lost when the policy changed.
    single = "pools:\n  a: {cpus: '1-3,9-11', pooltype: exclusive, hyperThreadingPolicy: singleThreaded}\n"
    old = plan_of(single)
    new = plan_of(
        "pools:\n  a: {cpus: '1-3,9-11', pooltype: exclusive}\n",
        previous=old,
        held={"cpupool.io/a": frozenset({"1"})},
    )
    a = new.resources["cpupool.io/a"]
    assert health(a)["9"] == UNHEALTHY and "9" in a.blocked


def test_a_held_id_the_agent_has_no_meaning_for_keeps_its_cpu() -> None:
    # Found in review: an ID answered from a plan that was never kept (the plan changed between the answer
    # and the next read) lost its CPU, which another pool then offered.
    p0 = plan_of("pools:\n  a: {cpus: '2-5', pooltype: exclusive}\n  b: {cpus: '6', pooltype: exclusive}\n")
    p1 = plan_of(
        "pools:\n  a: {cpus: '2-4', pooltype: exclusive}\n  b: {cpus: '5-6', pooltype: exclusive}\n",
        previous=p0,
        held={},
    )
    p2 = plan_of(
        "pools:\n  a: {cpus: '2-4', pooltype: exclusive}\n  b: {cpus: '5-6', pooltype: exclusive}\n",
        previous=p1,
        held={"cpupool.io/a": frozenset({"5"})},
    )
    b = p2.resources["cpupool.io/b"]
    assert health(b)["5"] == UNHEALTHY and "5" in b.blocked


def test_a_millicpu_beyond_the_new_count_keeps_its_meaning() -> None:
    # Found in review: an ID accepted from the kubelet's lagging list, then held, vanished at the next plan.
    pools = "pools:\n  s: {cpus: '4-5', pooltype: shared}\n"
    p0 = plan_of(pools)
    p1 = plan_of(pools, previous=p0, held={}, topology=offline(TOPO, "4"))
    late = shared_device_id(1844)
    p2 = plan_of(pools, previous=p1, held={"cpupool.io/s": frozenset({late})}, topology=offline(TOPO, "4"))
    assert p2.resources["cpupool.io/s"].has_device(late)
