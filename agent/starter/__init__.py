"""process-starter: a container's PID 1 that starts each process pinned to its share of the pooled CPUs.

The starter side of cpupool, kept apart from the webhook's code: it runs inside application containers,
bundled into a standalone executable, so it imports only the standard library and its own small modules
(`contract` is shared with the webhook, `annotation` parses the pod annotation):

- `contract`: paths and environment names the webhook, the agent and the starter agree on;
- `cores`: the node's cores and NUMA nodes from sysfs, and the split of a pool's CPUs between processes;
- `plan`: from the environment, the annotation and the node to the processes to start, checked up front;
- `supervise`: starting them pinned, forwarding signals, reaping, the exit status;
- `log`: JSON lines on stderr.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `process-starter` entry point (the import stays inside so `contract` users load nothing more)."""
    from agent.starter.run import main as run  # noqa: PLC0415

    return run(argv)
