"""`cpupool status` against a running agent and the emulated kubelet's PodResources API."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.metrics import Metrics
from agent.protowire import strings
from agent.status import _ask, collect, render
from agent.statusapi import DescribeReply, DescribeRequest, Resolved
from tests.fixtures.make_sysfs import CpuSpec, TreeSpec, write_tree
from tests.harness import running_agent


async def test_status_shows_resources_and_which_pod_holds_which_cpus(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as run:
        for name in ("cpupool.io/fast", "cpupool.io/multi", "cpupool.io/shared"):
            await run.emu.wait_devices(name)
        await run.emu.allocate("cpupool.io/multi", 1, must_include=["9"], pod="dpdk", container="fwd")
        await run.emu.allocate("cpupool.io/shared", 250, pod="web")
        resources, problem = await collect(run.plugin_dir, run.pod_resources)
        assert problem is None
        by_name = {r.resource: r for r in resources}
        assert set(by_name) == {"cpupool.io/fast", "cpupool.io/multi", "cpupool.io/shared"}
        assert (by_name["cpupool.io/fast"].devices, by_name["cpupool.io/fast"].cpus) == (
            12,
            "2,3,4,5,6,7,18,19,20,21,22,23",
        )
        multi = by_name["cpupool.io/multi"]
        assert multi.preferred_allocation and multi.devices == 4
        [holder] = multi.holders
        assert (holder.pod, holder.container, holder.device_ids, holder.cpus) == (
            "default/dpdk",
            "fwd",
            ["9"],
            "9,25",
        )
        [web] = by_name["cpupool.io/shared"].holders
        assert len(web.device_ids) == 250 and web.cpus == "12,13"
        table = render(resources, problem)
        assert "default/dpdk" in table and "9,25" in table


async def test_status_without_pod_resources_still_lists_resources(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as run:
        await run.emu.wait_devices("cpupool.io/fast")
        resources, problem = await collect(run.plugin_dir, tmp_path / "missing.sock")
        assert problem is not None and "missing.sock" in problem
        assert "cpupool.io/fast" in {r.resource for r in resources}
        assert "pods unknown" in render(resources, problem)


def wide(root: Path) -> Path:
    """One socket, 100 cores, 200 threads (siblings n and n+100): 200 CPUs for a 200,000-millicpu pool."""
    cpus = {
        cpu: CpuSpec(
            package=0, core_id=cpu % 100, siblings=f"{cpu % 100},{cpu % 100 + 100}", package_cpus="0-199"
        )
        for cpu in range(200)
    }
    return write_tree(
        TreeSpec(
            cpus=cpus, online="0-199", present="0-199", isolated="", cmdline="ro quiet", nodes={0: "0-199"}
        ),
        root,
    )


BIG = "cpupool.io/big"
BIG_POOL = 'resourceBaseName: cpupool.io\npools:\n  big: {cpus: "0-199", pooltype: shared}\n'


def counted(metrics: Metrics) -> tuple[float, float, int]:
    """What a status call must leave alone: open streams, allocations (both methods, both results)."""
    allocations = sum(
        metrics.allocations.get(resource=BIG, method=method, result=result)
        for method in ("Allocate", "GetPreferredAllocation")
        for result in ("ok", "error")
    )
    timed = metrics.allocation_seconds.count(resource=BIG, method="Allocate")
    return metrics.streams.get(resource=BIG), allocations, timed


async def test_status_of_a_200000_device_pool_held_by_pods_counts_nothing(tmp_path: Path) -> None:
    async with running_agent(tmp_path, BIG_POOL, root=wide(tmp_path / "wide")) as run:
        await run.emu.wait_devices(BIG, lambda s: s.capacity == 200_000, timeout=60)
        # 50,000 millicpus: large enough to need the agent's slicing, small enough that the Python
        # emulator's PodResources answer (one entry per device) stays well inside the CLI's 5 s on a
        # loaded machine; docs/benchmarks.md has the 150,000 figure.
        await run.emu.allocate(BIG, 50_000, pod="batch")
        await run.emu.allocate(BIG, 500, pod="web")
        metrics = run.supervisor.metrics
        before = counted(metrics)
        # The agent's record of answered Allocates empties once the kubelet's own record shows them.
        await run.emu.wait_for(
            lambda: not run.supervisor._answered.get(BIG),
            timeout=30,
            what="the answered Allocates to be confirmed",
        )

        resources, problem = await collect(run.plugin_dir, run.pod_resources)

        assert problem is None
        [big] = resources
        assert (big.resource, big.devices, big.healthy, big.streams) == (BIG, 200_000, 200_000, 1)
        assert big.cpus == ",".join(str(cpu) for cpu in range(200))
        holders = {h.pod: h for h in big.holders}
        assert set(holders) == {"default/batch", "default/web"}
        assert len(holders["default/batch"].device_ids) == 50_000
        assert holders["default/batch"].cpus == holders["default/web"].cpus == big.cpus
        # Not a kubelet stream, not an allocation: every figure the agent exports is as it was.
        assert counted(metrics) == before
        assert not run.supervisor._answered.get(BIG)


async def test_status_names_ids_the_agent_does_not_know(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as run:
        await run.emu.wait_devices("cpupool.io/multi")
        reply = await _ask(run.plugin_dir / "cpupool-multi.sock", [["9", "no-such-id"], []])
        assert reply.resource == "cpupool.io/multi" and reply.preferred_allocation
        assert [(r.cpus, r.unknown) for r in reply.holders] == [("9,25", 1), ("", 0)]


def test_status_messages_read_back_whatever_the_id_shape() -> None:
    long_id = "x" * 200  # a two-byte length: the readers' slow path
    holders = [["0", "zz", long_id, "1"], [], ["é"]]
    request = DescribeRequest.FromString(DescribeRequest.of(holders).SerializeToString())
    assert [[i for batch in ids for i in batch] for ids in request.holders()] == holders
    reply = DescribeReply("cpupool.io/a", True, 300_000, 2, "1-3", (Resolved("1,2", 3), Resolved("", 0)), 1)
    assert DescribeReply.FromString(reply.SerializeToString()) == reply
    # Fields a reader does not know (a varint, a fixed64) are skipped, as protobuf requires.
    assert strings(b"\x10\x96\x01" + b"\x0a\x01a" + b"\x11" + bytes(8) + b"\x0a\x01b", 1) == ["a", "b"]


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\x05ab", b"\x0a", b"\x0a\x01\xff", b"\x11\x00", b"\x00\x00", b"\x0b\x00"],
    ids=["cut-short", "no-length", "not-utf8", "cut-fixed64", "field-0", "group"],
)
def test_malformed_status_bytes_are_value_errors(payload: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the readers name what is wrong in the message
        strings(payload, 1)
