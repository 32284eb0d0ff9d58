"""Reports, at start and after every pool change, whether the kubelet still counts pooled CPUs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from agent.kubeletconfig import Accounting, Verdict, assess
from agent.metrics import Metrics
from agent.nri.policy import PoolView

log = structlog.get_logger(__name__)


class AccountingMonitor:
    def __init__(self, path: Path, view: PoolView, metrics: Metrics) -> None:
        self.path = path
        self.view = view
        self.metrics = metrics
        self.report: Accounting | None = None
        # The first applied plan wakes it: before that nothing is pooled.
        self._wake = asyncio.Event()

    def plan_changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Check whenever woken; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            pooled = self.view.exclusive_cpus() | self.view.shared_cpus()
            report = await asyncio.to_thread(assess, self.path, pooled)
            if report == self.report:
                continue
            self.report = report
            value = {Verdict.OK: 0, Verdict.COUNTS_POOLED: 1, Verdict.UNKNOWN: -1}[report.verdict]
            self.metrics.kubelet_counts_pooled_cpus.set(value)
            if report.verdict is Verdict.OK:
                log.info("kubelet.accounting_ok", detail=report.detail, pooled=report.pooled)
            else:
                log.warning(
                    "kubelet.counts_pooled_cpus"
                    if report.verdict is Verdict.COUNTS_POOLED
                    else "kubelet.config_unknown",
                    detail=report.detail,
                    pooled=report.pooled,
                    reserved=report.reserved,
                    cpu_manager_policy=report.cpu_manager_policy,
                    hint="set reservedSystemCPUs to include the pooled CPUs (docs/enforcement.md)",
                )
