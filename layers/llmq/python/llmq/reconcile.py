"""The reconciler: whatever a crash or a lost message left behind, found from the sparse index.

Every re-enqueue is safe to repeat: the claim is conditional and the webhook dispatcher
skips a delivery that already succeeded. Still, a queued job gets a new message only when its
lane's queue holds fewer messages than the lane has unfinished jobs: under a backlog every
job is stale, and re-sending them all would multiply the lane's messages run after run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from llmq.batch_runs import ask_running_items_to_stop, item_ended
from llmq.batches import BATCH_PREFIX, BatchRepository, send_expand
from llmq.config import LlmqConfig
from llmq.errors import ReadCutShort, StoreUnavailable
from llmq.job_record import JobRecord
from llmq.jobs import (
    SWEEP_CANCEL_ASKED_MS,
    SWEEP_FIRST_MS,
    SWEEP_RECOVERED_MS,
    RetentionDue,
    SweepEntry,
    SweepPass,
)
from llmq.models import EVENT_FOR_STATUS, DeliveryStatus, ErrorCode, JobError, JobStatus
from llmq.offload import Offload
from llmq.policy import deadline_error, retention_error
from llmq.ports import JobStore, QueueStore
from llmq.queues import announce_terminal
from llmq.telemetry import MetricName, count_outcome, emit_count, error_fields, logger, reconcile_fault

# A run stops settling entries with this much of its invocation left (at most this share of
# what it had at its start): room for the settle in progress's calls, usually, and the report.
# botocore's retries of a throttled call (three tries, backoff, a read timeout of 10 s) can
# take longer: then the run is cut off mid-entry as before, which every entry survives.
_TIME_RESERVE_SECONDS = 5.0
_TIME_RESERVE_SHARE = 0.2


@dataclass
class ReconcileReport:
    examined: int = 0
    requeued: list[str] = field(default_factory=list)
    # Stale queued jobs left alone: the lane's queue still holds a message for each.
    waiting: list[str] = field(default_factory=list)
    # Entries a throttle or a 5xx interrupted; still due at the next run.
    skipped: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    # Jobs asked to cancel that the reconciler found with no live worker: a crashed attempt's,
    # one past its deadline, or one at the end of its retention (`Reconciler._cancel`).
    canceled: list[str] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)
    # Batches whose expand message went again (`Reconciler._poke`).
    batches: list[str] = field(default_factory=list)
    # Swept entries the run left for the next one, its time running out (still due: the next
    # run's sweep finds them, the most overdue first).
    left: int = 0
    # Passes of the sweep (`SweepPass`) the run had no time to read, or to read to their end:
    # their entries, if any are due, wait for the next run too.
    unread_passes: int = 0

    def as_log(self) -> dict[str, int]:
        return {
            "examined": self.examined,
            "requeued": len(self.requeued),
            "waiting": len(self.waiting),
            "skipped": len(self.skipped),
            "recovered": len(self.recovered),
            "expired": len(self.expired),
            "canceled": len(self.canceled),
            "webhooks": len(self.webhooks),
            "batches": len(self.batches),
            "left": self.left,
            "unread_passes": self.unread_passes,
        }


class Reconciler:
    def __init__(
        self,
        jobs: JobStore,
        queues: QueueStore,
        config: LlmqConfig,
        batches: BatchRepository | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.jobs = jobs
        # (counting what each run sends into the lanes: see `_message_deficits`)
        self._sends = _CountedSends(queues)
        self.queues: QueueStore = cast(QueueStore, self._sends)
        self.config = config
        # Reads a batch the sweep found (its tenant and lane); None: batches are not poked.
        self.batches = batches
        # Finds a result an earlier attempt parked (`Offload.record_parked`); None: not looked for.
        self.offload = offload
        self._remaining: Callable[[], float] | None = None
        self._reserve = 0.0

    def run(self, remaining_seconds: Callable[[], float] | None = None) -> ReconcileReport:
        """One sweep, in three passes (`SweepPass`), each read and then settled. `remaining_seconds`
        (the invocation's time left): the run reads and settles while more than its reserve is
        left (`_TIME_RESERVE_SECONDS`, or `_TIME_RESERVE_SHARE` of its time if that is less), and
        leaves the rest due for the next run, so a run with a large or throttled backlog ends
        within its timeout, reports what it did, and raises no Lambda error (its alarm) for work
        that was only late."""
        self._remaining = remaining_seconds
        self._reserve = (
            min(_TIME_RESERVE_SECONDS, _TIME_RESERVE_SHARE * remaining_seconds())
            if remaining_seconds is not None
            else 0.0
        )
        report = ReconcileReport()
        self._sends.sent.clear()
        now = self.jobs.now_ms()
        room = self.config.reconciler.max_items_per_run
        # Lapsed leases first, whatever the backlog of stale queued jobs: each holds a tenant's
        # slot until it is recovered (DESIGN §3.11: within one run of the lease). They are
        # settled before anything else is read, however long the other reads take.
        lapsed = self._read(SweepPass.LAPSED, now, room, report, set(), share=0.5)
        room -= len(lapsed)
        self._settle_each([entry for entry in lapsed if not entry.batch], now, Counter(), report)
        # Then what must not wait for the run to work through that backlog, which takes a
        # period per `max_items_per_run` stale queued jobs: a passed deadline (expired within a
        # period of it), a webhook to send again (DESIGN §3.6), a batch to look at.
        # (Each pass reads after the one before has written: what it settled is not settled
        # again from its new entry, a recovered job's among them, whose message went already.)
        # A quarter of the room is kept for the backlog's pass, whose first entries are the
        # known-lost messages (`sweep_first`) and the recovered jobs': a burst of urgent ones
        # (a mass of deadlines passing at once) does not hold those back either.
        settled = {entry.job_id for entry in lapsed}
        kept = (room + 3) // 4 if room > 1 else 0
        urgent = self._read(SweepPass.URGENT, now, room - kept, report, settled, share=0.5)
        room -= len(urgent)
        self._settle_each([entry for entry in lapsed if entry.batch] + urgent, now, Counter(), report)
        # Last the stale queued jobs, judged against their lanes' depths. (With its time short,
        # the depths, a read of the whole sweep index, are not read: stale queued jobs wait a
        # run, as when the depths are unavailable.)
        settled |= {entry.job_id for entry in urgent}
        backlog = self._read(SweepPass.BACKLOG, now, room, report, settled, share=1.0)
        # Those that need no depth first (a known-lost message, a recovered or cancel-asked
        # job's, a passed deadline): the depths, a read of the whole index, may take what the
        # run has left (review 275: behind a count cut short, one known-lost message a run).
        sure = [entry for entry in backlog if not _judged_by_depth(entry, now)]
        judged = [entry for entry in backlog if _judged_by_depth(entry, now)]
        self._settle_each(sure, now, Counter(), report)
        deficits = Counter[str]()
        if judged and not self._short_of_time():
            deficits = self._deficits_or_none(judged, now, report)
            # (a known-lost job the run did not end takes one the lane is short of, whether its
            # send went or SQS refused it: counted before its send, as it was; review 276)
            ended = {*report.expired, *report.canceled, *report.recovered}
            for entry in sure:
                if entry.sweep_at == SWEEP_FIRST_MS and entry.job_id not in ended:
                    deficits[entry.lane] = max(0, deficits[entry.lane] - 1)
        self._settle_each(judged, now, deficits, report)
        if report.left or report.unread_passes:
            # (at least one: a pass left unread may hold none, or many)
            emit_count(MetricName.RECONCILE_LEFT, max(report.left, 1))
            logger.warning("the run's time ran out; the rest is left for the next run", extra=report.as_log())
        else:
            logger.info("reconciled", extra=report.as_log())
        return report

    def _short_of_time(self) -> bool:
        return self._remaining is not None and self._remaining() < self._reserve

    def _read(
        self, only: SweepPass, now: int, room: int, report: ReconcileReport, settled: set[str], share: float
    ) -> list[SweepEntry]:
        """Up to `room` due entries of one pass, read in at most `share` of the time the run
        has left above its reserve (the lapsed leases half of it, the urgent entries half of
        the rest, the backlog what remains): when every read is slow (a throttled index), each
        pass still reads some of its shards, from a random one, and a run settles some of each
        instead of spending its time on the first passes' filtered reads. A pass stops between
        pages when its time is up (what the pages read so far hold is still settled), and one
        the run had no time or room to read to its end counts in `unread_passes` (the lanes'
        backlog filling its room is only a long backlog)."""
        if room <= 0 or self._short_of_time():
            report.unread_passes += 1
            return []
        remaining = self._remaining
        if remaining is not None:
            left = remaining()
            until = max(self._reserve, left - share * (left - self._reserve))

        def stop() -> bool:
            return remaining is not None and remaining() < until

        entries: list[SweepEntry] = []
        try:
            # (one more than the room: a pass that held exactly its room was read to its end)
            found = self.jobs.sweep(now, room + 1 + len(settled), only, stop=stop)
            entries.extend(entry for entry in found if entry.job_id not in settled)
        except StoreUnavailable:
            # A throttled read: settle what was read; the rest stays due for the next run.
            logger.warning("sweep interrupted", extra={"pass": only.value, "read": len(entries)})
        if stop() or (len(entries) > room and only is not SweepPass.BACKLOG):
            report.unread_passes += 1
        del entries[room:]
        return entries

    def _settle_each(
        self, entries: list[SweepEntry], now: int, deficits: Counter[str], report: ReconcileReport
    ) -> None:
        for index, entry in enumerate(entries):
            # (every run settles one entry at least, however long its reads took: a run that
            # could never settle any would stop the recoveries for good, and quietly)
            if report.examined and self._short_of_time():
                report.left += len(entries) - index
                return
            report.examined += 1
            try:
                self._settle(entry, now, deficits, report)
            except StoreUnavailable:
                # One throttled entry must not stop the run: it stays due for the next one.
                report.skipped.append(entry.job_id)
            except Exception as exc:
                # Nor one that cannot be settled at all (a lane no longer configured, an item
                # grown too large): the others are recovered, expired and announced, and it
                # is counted as a fault (its alarm) and looked at again next run.
                _not_settled(exc, entry.job_id)
                report.skipped.append(entry.job_id)

    def _deficits_or_none(self, entries: list[SweepEntry], now: int, report: ReconcileReport) -> Counter[str]:
        try:
            return self._message_deficits(entries, now)
        except ReadCutShort:
            # The run's time ran out within the count (a large or throttled index): the same,
            # and the run says it left work (hunt 315).
            logger.warning("lane depths not read in the run's time; stale queued jobs wait for the next run")
            report.unread_passes += 1
        except StoreUnavailable:
            # Unknown this run: send nothing new for stale queued jobs; the rest goes on.
            logger.warning("lane depths unavailable; stale queued jobs wait for the next run")
        except Exception as exc:
            # (an open batch this version cannot read, a queue it may not look at: the same)
            _not_settled(exc, "lane depths")
        return Counter()

    def _message_deficits(self, entries: list[SweepEntry], now: int) -> Counter[str]:
        """Per lane, how many unfinished jobs have no message in the lane's queue.

        A stale queued job is usually just waiting behind a backlog; only when the lane holds
        fewer messages than it has queued and running jobs can a message have been lost.
        Read only when there is a stale queued job to judge.
        """
        lanes = {entry.lane for entry in entries if _is_stale_queued(entry, now)}
        if not lanes:
            return Counter()
        # (ordinary jobs: a batch's items are counted from their batch, each once)
        # (within the run's time: a read of the whole index, which grows with the backlog)
        unfinished = self.jobs.count_unfinished(stop=self._short_of_time)
        if self.batches is not None:
            # A batch's unfinished items have messages in the lane: counted here, or their
            # messages would pass for ordinary jobs' and hide a lost one.
            for batch in self.batches.open_batches(stop=self._short_of_time):
                if batch.lane in lanes:
                    if self._short_of_time():
                        # (a read of its count shards each: many open batches, each slow)
                        raise ReadCutShort("the open batches' items were not counted in the run's time")
                    unfinished[batch.lane] += self.batches.unfinished_items(batch)
        deficits: Counter[str] = Counter()
        for lane in sorted(lanes):
            try:
                depth = self.queues.lane_depth(lane)
            except KeyError as exc:
                # Jobs of a lane no longer deployed: nothing can be sent to them.
                _not_settled(exc, f"lane {lane}")
                continue
            # What this run sent into the lane already (a recovered lease's message, a batch's
            # poke) is in its depth, and stands in for no lost message.
            deficits[lane] = max(0, unfinished[lane] - (depth - self._sends.sent[lane]))
        return deficits

    def _settle(self, entry: SweepEntry, now: int, deficits: Counter[str], report: ReconcileReport) -> None:
        thresholds = self.config.reconciler
        if entry.batch:
            self._poke(entry, report)
        elif entry.status is JobStatus.QUEUED and entry.deadline_ms is not None and entry.deadline_ms <= now:
            self._expire(entry, report)
        elif entry.status is JobStatus.QUEUED:
            # The most overdue jobs first take whatever messages the lane is short of; a job whose
            # message is known lost (`sweep_first`) takes one whatever the lane's depth says: a
            # depth that also counts messages on their way out (a deferred record's original,
            # acknowledged only with its whole batch) can hide the loss run after run.
            # A recovered job whose message may have gone (its postpone not written) takes one
            # too, but not one of the lane's missing messages: those are another job's, if its
            # message went. So does a job flagged for a cancel (its own message may be hidden
            # for a retry's backoff: it has one, which the lane's depth counts).
            known_lost = entry.sweep_at == SWEEP_FIRST_MS
            recovered = entry.sweep_at in (SWEEP_RECOVERED_MS, SWEEP_CANCEL_ASKED_MS)
            if deficits[entry.lane] > 0 or known_lost or recovered:
                if not recovered:
                    deficits[entry.lane] = max(0, deficits[entry.lane] - 1)
                job = self.jobs.find(entry.job_id)
                if job is not None and job.status is JobStatus.QUEUED:
                    try:
                        self.queues.enqueue_job(
                            job.id, job.lane, job.tenant_id, redrive_round=job.redrive_round
                        )
                        report.requeued.append(entry.job_id)
                    except KeyError as exc:
                        # A lane no longer deployed (only a known loss is sent without its
                        # depth): it waits, as its lane's other jobs do, for its retention.
                        _not_settled(exc, f"lane {job.lane}")
                        report.waiting.append(entry.job_id)
            else:
                report.waiting.append(entry.job_id)
            try:
                # (only while it is queued: one claimed meanwhile keeps its lease's entry; and
                # only from where it was read: a cancel flagged meanwhile put it first, for the
                # message its claim ends it at, which the next run sends)
                self.jobs.postpone_sweep(
                    entry.job_id,
                    thresholds.stale_queued_seconds,
                    retention_margin_s=thresholds.retention_margin_seconds,
                    status=JobStatus.QUEUED,
                    seen_at=entry.sweep_at,
                    not_after_ms=entry.deadline_ms,
                )
            except RetentionDue as due:
                # (a message just sent for it finds it ended, and is dropped)
                if not self._record_parked(due.job, report, ends=True):
                    self._retire(due.job, report)
        elif entry.status is JobStatus.RUNNING:
            self._recover(entry, now, report)
        elif entry.delivery_status is DeliveryStatus.PENDING:
            # Read for its round (the dispatcher drops a message of an earlier one) and tenant.
            job = self.jobs.find(entry.job_id)
            if job is not None:
                self.queues.enqueue_webhook(
                    entry.job_id,
                    EVENT_FOR_STATUS[entry.status],
                    tenant_id=job.tenant_id,
                    delivery_round=job.delivery_round,
                )
                report.webhooks.append(entry.job_id)
            # (unless the dispatcher attempted it meanwhile: its write put the entry after that
            # attempt's next one, which the message sent here then waits for)
            self.jobs.postpone_sweep(entry.job_id, thresholds.stale_webhook_seconds, seen_at=entry.sweep_at)

    def _poke(self, entry: SweepEntry, report: ReconcileReport) -> None:
        """A batch not yet ended (or its webhook not yet sent) that has not been looked at for a
        while: its expand message goes again. It resumes a lost expansion, ends a batch whose
        last item's worker stopped short, and sends an unsent webhook (`BatchExpander.expand`);
        for a batch simply running, it costs one message and one look. An ended batch whose
        sent webhook is still pending well after its next attempt was due lost that message
        (the webhooks DLQ): the event goes again, as a job's does."""
        if self.batches is None:
            return
        batch = self.batches.find(entry.job_id[len(BATCH_PREFIX) :])
        event = batch.terminal_event if batch is not None else None
        if batch is not None and event is not None and batch.webhook_sent:
            if batch.delivery_status is DeliveryStatus.PENDING:
                self.queues.enqueue_webhook(
                    batch.id, event, tenant_id=batch.tenant_id, delivery_round=batch.delivery_round
                )
                report.webhooks.append(batch.id)
            # (never sooner than its next attempt's due time allows: its own message carries it)
            wait_s = self.config.reconciler.stale_webhook_seconds
            if batch.delivery_next_ms is not None:
                wait_s += max(0, batch.delivery_next_ms - self.jobs.now_ms()) // 1000
            # (unless an attempt made since the read moved the entry past its own next one)
            self.jobs.postpone_sweep(entry.job_id, wait_s, seen_at=entry.sweep_at)
            return
        if batch is not None:
            send_expand(self.queues, batch)
            report.batches.append(batch.id)
        self.jobs.postpone_sweep(entry.job_id, self.config.reconciler.stale_queued_seconds)
        if batch is not None and batch.cancel_requested:
            # (the cancel request may have been cut short after its flag; a failure here is
            # only a look missed, made again at the batch's next look)
            try:
                ask_running_items_to_stop(self.batches, self.jobs, batch)
            except StoreUnavailable:
                logger.warning(
                    "canceling batch's running items not asked this run", extra={"batch_id": batch.id}
                )

    def _recover(self, entry: SweepEntry, now: int, report: ReconcileReport) -> None:
        """Its lease lapsed: the worker crashed. The job goes back to queued, which gives its
        tenant's slot back at once, and a new message lets a worker run it again; a job that
        used up its attempts fails instead, as `worker_crashed`, and one past its deadline as
        `deadline_exceeded`."""
        job = self.jobs.find(entry.job_id, past_retention=True)
        if job is None or job.status is not JobStatus.RUNNING:
            return
        if job.lease_expires_ms is not None and job.lease_expires_ms >= now:
            # Taken over since the index was read: a live worker holds it.
            return
        retiring = job.expires_at - self.config.reconciler.retention_margin_seconds <= now // 1000
        past_deadline = job.deadline_ms is not None and job.deadline_ms <= now
        ends = retiring or job.cancel_requested or past_deadline or job.attempts >= self.config.max_attempts
        try:
            if self._record_parked(job, report, ends=ends):
                # Its last attempt was paid for, and parked its result: recorded, not run again.
                return
        except StoreUnavailable:
            assert self.offload is not None  # (it raised)
            if job.attempts >= self.config.max_attempts or not self.offload.waits_when_queued(self.jobs, job):
                # It waits for S3, holding its slot (`Offload._waited_long`): out of attempts,
                # queued it would run again; too near its retention's end, queued it would end
                # at its next look without waiting for S3 at all.
                raise
            # S3 cannot say what an earlier attempt parked, and the job would end: it goes back
            # to queued, its slot given back now (DESIGN §3.11), where its cancel or deadline
            # ends it at its next look, which looks for that first.
            self._requeue(job, entry, report)
            return
        if retiring:
            # Too close to its retention to run again (or past it): ended, its slot given back.
            self._retire(job, report)
            return
        if job.cancel_requested:
            # Asked to cancel while it ran: it ends as asked, not run again nor failed.
            self._cancel(job, report)
            return
        error = None
        if past_deadline:
            # It ran, and its deadline passed before a restart: it fails as a retry that would
            # cross the deadline does (as a worker's claim of it would: `refused_claim`).
            error = deadline_error(job)
        elif job.attempts >= self.config.max_attempts:
            error = JobError(
                code=ErrorCode.WORKER_CRASHED,
                message=f"the worker stopped without an answer {job.attempts} times",
            )
        if error is not None:
            failed = self.jobs.fail_unleased(job, error)
            if failed is not None:
                self._ended(failed)
                # (canceled instead: a cancel asked since the job was read)
                ended = report.canceled if failed.status is JobStatus.CANCELED else report.recovered
                ended.append(entry.job_id)
            return
        self._requeue(job, entry, report)

    def _requeue(self, job: JobRecord, entry: SweepEntry, report: ReconcileReport) -> None:
        """The job, its lease lapsed, back to queued with its slot given back, and a message.

        The recovery leaves its sweep entry first in line, so that whatever keeps the message
        from going (SQS refusing it, the recovery's answer lost, the run cut in between) leaves
        it to the next run's missing messages rather than to a deficit the lane's depth may
        hide; once the message went, the entry waits as any queued job's does. (The message
        goes after the recovery: one that found the item of a canceling batch still running
        would be acknowledged unclaimed.)"""
        recovered = self.jobs.recover(job)
        if recovered is None:
            return
        self.queues.enqueue_job(job.id, job.lane, job.tenant_id, redrive_round=recovered.redrive_round)
        report.recovered.append(entry.job_id)
        try:
            self.jobs.postpone_sweep(
                job.id,
                self.config.reconciler.stale_queued_seconds,
                status=JobStatus.QUEUED,
                seen_at=SWEEP_RECOVERED_MS,
                not_after_ms=job.deadline_ms,
            )
        except Exception as exc:
            # (left first in line: the next run sends it one more message, which a claim absorbs)
            logger.warning(
                "recovered job's sweep entry not postponed", extra={"job_id": job.id, **error_fields(exc)}
            )

    def _ended(self, job: JobRecord) -> None:
        """A job this run ended: counted, its terminal event sent, its batch told."""
        count_outcome(job.status, job.lane, job.error.code if job.error else None)
        announce_terminal(self.queues, job, carry=self.config.webhooks.trust_carried_job)
        item_ended(None, self.queues, job)

    def _expire(self, entry: SweepEntry, report: ReconcileReport) -> None:
        # (one found only after its retention still ends, and frees its tenant's quota)
        job = self.jobs.find(entry.job_id, past_retention=True)
        if job is not None and self._record_parked(job, report, ends=True):
            # Queued again after a look S3 could not answer: what an attempt paid for comes first.
            return
        if job is not None and job.cancel_requested:
            # Asked to cancel before its deadline passed: it ends as asked.
            self._cancel(job, report)
            return
        ended = self.jobs.expire(job, deadline_error(job)) if job is not None else None
        if ended is not None:
            # (canceled instead when a cancel came since the read)
            self._ended(ended)
            (report.canceled if ended.status is JobStatus.CANCELED else report.expired).append(entry.job_id)

    def _record_parked(self, job: JobRecord, report: ReconcileReport, *, ends: bool) -> bool:
        """True when the job ended with a result an earlier attempt parked, instead of ending
        without it (`ends`) or running again (`Offload.record_parked`)."""
        if self.offload is None:
            return False
        recorded = self.offload.record_parked(self.jobs, job, ends=ends)
        if recorded is None:
            return False
        self._ended(recorded)
        report.recovered.append(job.id)
        return True

    def _retire(self, job: JobRecord, report: ReconcileReport) -> None:
        """A job still unfinished at the end of its retention ends expired, through the terminal
        write that gives back its tenant's slot and quota: left to DynamoDB's TTL, its item
        would go and they would stay counted for good."""
        if job.cancel_requested:
            # Asked to cancel before its retention ran out: it ends as asked.
            self._cancel(job, report)
            return
        expired = self.jobs.expire_at_retention(job, retention_error(job))
        if expired is not None:
            canceled = expired.status is JobStatus.CANCELED  # (a cancel asked since the read)
            if not canceled:
                logger.warning("job expired at the end of its retention", extra={"job_id": job.id})
            self._ended(expired)
            (report.canceled if canceled else report.expired).append(job.id)

    def _cancel(self, job: JobRecord, report: ReconcileReport) -> None:
        """A job asked to cancel that no live worker holds ends canceled, as the worker's claim
        and the dead-letter function would end it."""
        canceled = self.jobs.cancel_unleased(job)
        if canceled is not None:
            self._ended(canceled)
            report.canceled.append(job.id)


def _not_settled(exc: Exception, what: str) -> None:
    reconcile_fault(exc, what, "not settled; the reconciler goes on")


class _CountedSends:
    """The reconciler's queues, counting the messages sent into each lane."""

    def __init__(self, queues: QueueStore) -> None:
        self._queues = queues
        self.sent: Counter[str] = Counter()

    def enqueue_job(self, job_id: str, lane: str, tenant_id: str, *args: Any, **kwargs: Any) -> None:
        self._queues.enqueue_job(job_id, lane, tenant_id, *args, **kwargs)
        self.sent[lane] += 1

    def enqueue_expand(self, batch_id: str, lane: str, tenant_id: str, *args: Any, **kwargs: Any) -> None:
        self._queues.enqueue_expand(batch_id, lane, tenant_id, *args, **kwargs)
        self.sent[lane] += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queues, name)


def _judged_by_depth(entry: SweepEntry, now: int) -> bool:
    """A stale queued job whose message may be lost: sent one only if its lane is short."""
    return _is_stale_queued(entry, now) and entry.sweep_at not in (
        SWEEP_FIRST_MS,
        SWEEP_RECOVERED_MS,
        SWEEP_CANCEL_ASKED_MS,
    )


def _is_stale_queued(entry: SweepEntry, now: int) -> bool:
    return (
        not entry.batch
        and entry.status is JobStatus.QUEUED
        and (entry.deadline_ms is None or entry.deadline_ms > now)
    )
