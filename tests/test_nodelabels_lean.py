"""The label client as an agent process loads it (agent/nodelabels.py, `load_client_modules`): lightkube's
core/v1 models stay unloaded, `importlib.metadata` stays out, and the Node's labels still arrive by get and by
watch from a real API server (tests/apiserver). Each of these is memory the agent's RSS budget counts
(docs/nodeconfig.md, "What the label client costs"); the figure itself is `agent_rss_node_labels` in bench."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import secrets
import sys
from pathlib import Path

import pytest

from agent.nodelabels import dist_info_version
from tests.peers.apiserver import ControlPlane

REPO = Path(__file__).resolve().parent.parent

# Run as `python -c` in a fresh interpreter that starts as `cpupool agent` does (agent.cli's lean start:
# no OpenSSL, no importlib.metadata), then follows its Node with the agent's own watch.
CHILD = """
import sys
sys.argv = ["cpupool", "agent"]
import agent.cli  # noqa: F401 - the agent process's lean start
import asyncio, json, types
from agent.nodelabels import NodeLabelWatch

def report(**values):
    print(json.dumps(values), flush=True)

async def main(node):
    changed = asyncio.Event()
    watch = NodeLabelWatch(node, changed.set)
    watch.labels()
    task = asyncio.create_task(watch.run())
    await asyncio.wait_for(changed.wait(), 60)
    changed.clear()
    models = sys.modules["lightkube.models.core_v1"]
    report(
        step="first",
        labels=dict(watch.labels() or {}),
        core_models_loaded=type(models) is types.ModuleType,
        metadata_loaded="importlib.metadata" in sys.modules,
    )
    await asyncio.wait_for(changed.wait(), 60)
    report(step="relabelled", labels=dict(watch.labels() or {}))
    # The deferred module still works for whoever reads it: it loads then.
    report(step="models", node_model=sys.modules["lightkube.models.core_v1"].Node.__name__)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

asyncio.run(main(sys.argv_node))
"""


async def _read_report(stream: asyncio.StreamReader, step: str) -> dict[str, object]:
    while True:
        line = await asyncio.wait_for(stream.readline(), 60)
        assert line, f"the child ended before its {step!r} report"
        if line.startswith(b"{"):
            report: dict[str, object] = json.loads(line)
            if report.get("step") == step:
                return report


async def test_an_agent_process_reads_and_follows_labels_without_the_core_models(
    kube_apiserver: ControlPlane, tmp_path: Path
) -> None:
    node = f"lean-{secrets.token_hex(4)}"
    kube_apiserver.admin.create_node(node, {"node-group": "edge"})
    env = dict(os.environ)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env["KUBECONFIG"] = str(kube_apiserver.kubeconfig(tmp_path / "kubeconfig"))
    env["PYTHONPATH"] = str(REPO)
    script = CHILD.replace("sys.argv_node", repr(node))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert child.stdout is not None
    try:
        first = await _read_report(child.stdout, "first")
        assert isinstance(first["labels"], dict) and first["labels"]["node-group"] == "edge"
        assert first["core_models_loaded"] is False
        assert first["metadata_loaded"] is False
        await asyncio.to_thread(kube_apiserver.admin.label_node, node, {"node-group": "big"})
        relabelled = await _read_report(child.stdout, "relabelled")
        assert isinstance(relabelled["labels"], dict) and relabelled["labels"]["node-group"] == "big"
        assert (await _read_report(child.stdout, "models"))["node_model"] == "Node"
        assert await asyncio.wait_for(child.wait(), 30) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        kube_apiserver.admin.call("DELETE", f"/api/v1/nodes/{node}")


@pytest.mark.parametrize("distribution", ["httpx2", "httpcore2", "lightkube"])
def test_versions_read_from_dist_info_names_match_importlib_metadata(distribution: str) -> None:
    assert dist_info_version(distribution) == importlib.metadata.version(distribution)


def test_a_distribution_without_dist_info_is_left_to_importlib_metadata() -> None:
    assert dist_info_version("no-such-distribution-cpupool") is None
