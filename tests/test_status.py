"""`cpupool status` against a running agent and the emulated kubelet's PodResources API."""

from __future__ import annotations

from pathlib import Path

from agent.status import collect, render
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
