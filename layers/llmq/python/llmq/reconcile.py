"""The reconciler: whatever a crash or a lost message left behind, found from the sparse index.

Every re-enqueue is safe to repeat: the claim is conditional and the webhook dispatcher
skips a delivery that already succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmq.config import LlmqConfig
from llmq.jobs import JobRepository, SweepEntry
from llmq.models import EVENT_FOR_STATUS, DeliveryStatus, JobStatus
from llmq.queues import QueueRepository
from llmq.telemetry import logger


@dataclass
class ReconcileReport:
    examined: int = 0
    requeued: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)

    def as_log(self) -> dict[str, int]:
        return {
            "examined": self.examined,
            "requeued": len(self.requeued),
            "recovered": len(self.recovered),
            "expired": len(self.expired),
            "webhooks": len(self.webhooks),
        }


class Reconciler:
    def __init__(self, jobs: JobRepository, queues: QueueRepository, config: LlmqConfig) -> None:
        self.jobs = jobs
        self.queues = queues
        self.config = config

    def run(self) -> ReconcileReport:
        report = ReconcileReport()
        now = self.jobs.now_ms()
        for entry in self.jobs.sweep(now, self.config.reconciler.max_items_per_run):
            report.examined += 1
            self._settle(entry, now, report)
        logger.info("reconciled", extra=report.as_log())
        return report

    def _settle(self, entry: SweepEntry, now: int, report: ReconcileReport) -> None:
        thresholds = self.config.reconciler
        if entry.status is JobStatus.QUEUED and entry.deadline_ms is not None and entry.deadline_ms <= now:
            self._expire(entry, report)
        elif entry.status is JobStatus.QUEUED:
            # Its message may have been lost between PutItem and SendMessage.
            self.queues.enqueue_job(entry.job_id, entry.lane)
            self.jobs.postpone_sweep(entry.job_id, thresholds.stale_queued_seconds)
            report.requeued.append(entry.job_id)
        elif entry.status is JobStatus.RUNNING:
            # Its lease lapsed long ago: the worker crashed. A new message lets a worker take over.
            self.queues.enqueue_job(entry.job_id, entry.lane)
            self.jobs.postpone_sweep(
                entry.job_id, thresholds.expired_lease_grace_seconds + thresholds.stale_queued_seconds
            )
            report.recovered.append(entry.job_id)
        elif entry.delivery_status is DeliveryStatus.PENDING:
            self.queues.enqueue_webhook(entry.job_id, EVENT_FOR_STATUS[entry.status])
            self.jobs.postpone_sweep(entry.job_id, thresholds.stale_webhook_seconds)
            report.webhooks.append(entry.job_id)

    def _expire(self, entry: SweepEntry, report: ReconcileReport) -> None:
        job = self.jobs.find(entry.job_id)
        expired = self.jobs.expire(job) if job is not None else None
        if expired is not None:
            self.queues.announce_terminal(expired)
            report.expired.append(entry.job_id)
