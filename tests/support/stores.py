"""In-memory stores behind the Protocols of `llmq.ports`, for fast unit tests of the use cases.

Each write applies only under the condition its DynamoDB counterpart states (`llmq.jobs`),
and recognises its own earlier success the same way (the write token, or the lease owner):
a claim of a running job with a live lease is refused, a terminal job never moves, a
cancel of a queued job ends it canceled. `tests/integration/test_store_contract.py` runs the same
assertions against these fakes and the real repositories under moto.

A name in a fake's `unavailable` set makes that method raise StoreUnavailable, as a
throttle or a 5xx that outlasted botocore's retries does.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from llmq.batches import batch_of
from llmq.config import LlmqConfig
from llmq.errors import (
    CancelRequested,
    ItemTooLarge,
    JobNotFound,
    LeaseLost,
    QuotaExceeded,
    ReadCutShort,
    StoreUnavailable,
)
from llmq.item_size import MAX_ITEM_BYTES, item_size_bytes
from llmq.job_codec import to_item
from llmq.job_record import JobInput, JobRecord
from llmq.jobs import (
    SWEEP_CANCEL_ASKED_MS,
    SWEEP_RECOVERED_MS,
    Admission,
    Created,
    RetentionDue,
    SweepEntry,
    SweepPass,
)
from llmq.live_output import OUTPUT_PAGE, OutputChunk, OutputHead
from llmq.models import (
    EVENT_FOR_STATUS,
    ChatMessage,
    DeliveryAttempt,
    DeliveryStatus,
    JobError,
    JobOutputEvent,
    JobResult,
    JobStatus,
    LaneMessage,
    OutputDelta,
    WebhookEvent,
)
from llmq.payloads import RESULT_URL_SECONDS, ObjectStat, PresignedUrl
from llmq.policy import Claim
from llmq.queues import redelivery_visibility
from llmq.shares import ShareState
from llmq.tenants import Tenant, TenantIdentity, UnknownTenant, hash_api_key, new_api_key, new_webhook_secret

F = TypeVar("F", bound=Callable[..., Any])


def _throttleable(method: F) -> F:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if method.__name__ in self.unavailable:
            raise StoreUnavailable(f"{method.__name__}: ThrottlingException after retries")
        return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


# An accept's admission for tests that create jobs directly: caps and quota out of the way.
ROOMY = Admission(caps=(1000, 1000), max_active_jobs=1_000_000)


class Clock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Refused(Exception):
    """A write whose condition did not hold."""


class _Share:
    """A tenant's share item (`llmq.shares`): active jobs, slot holders per lane, caps."""

    def __init__(self) -> None:
        self.active = 0
        self.holders: defaultdict[str, dict[str, int]] = defaultdict(dict)
        self.caps: dict[str, int] = {}
        self.max_concurrency: int | None = None
        self.max_active_jobs: int | None = None

    def state(self, tenant_id: str) -> ShareState:
        return ShareState(
            tenant_id=tenant_id,
            active=self.active,
            holders={lane: dict(jobs) for lane, jobs in self.holders.items()},
            default_caps=dict(self.caps),
            max_concurrency=self.max_concurrency,
            max_active_jobs=self.max_active_jobs,
        )

    def leave(self, job: JobRecord, ends: bool) -> None:
        self.holders[job.lane].pop(job.id, None)
        if ends:
            self.active -= 1


def counted_after(stored: int, status: DeliveryStatus, attempt: DeliveryAttempt | None) -> int:
    """The delivery's count after a recorded outcome, as the repository counts it: a final
    answer (a success, a 410) counts its own attempt once (the count is its number, unless a
    later attempt was counted, or a redelivery's round began since: then one more), and a 410
    with no attempt made counts none; any other outcome counts one."""
    if status not in (DeliveryStatus.DELIVERED, DeliveryStatus.DISABLED):
        return stored + 1
    if attempt is None:
        return stored if status is DeliveryStatus.DISABLED else stored + 1
    if attempt.attempt - 1 <= stored <= attempt.attempt:
        return attempt.attempt
    return stored if stored > attempt.attempt else stored + 1


class InMemoryJobs:
    """The jobs table and its sparse reconciler index (`due`: job id → sweep_at)."""

    def __init__(self, config: LlmqConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self.records: dict[str, JobRecord] = {}
        self.due: dict[str, int] = {}
        # Jobs a reconciler's look postponed (`looked_ms`): a replay's mark no longer applies.
        self.looked: set[str] = set()
        # Every dead letter each job ever counted (the item's counted_letters), kept by claims.
        self.counted_letters: dict[str, set[str]] = {}
        self.unavailable: set[str] = set()
        # Every delivery outcome recorded: (status, the receiver's status code, retry in).
        self.deliveries: list[tuple[DeliveryStatus, int | None, float | None]] = []
        # The delivery log's slots per job: slot -> (its sequence number, the attempt).
        self.log_slots: dict[str, dict[int, tuple[int, DeliveryAttempt]]] = {}
        self.shares: defaultdict[str, _Share] = defaultdict(_Share)
        # Streaming jobs' output chunks: (job id, seq) -> the delta.
        self.chunks: dict[tuple[str, int], OutputDelta] = {}
        self.chunk_expiry: dict[tuple[str, int], int] = {}
        # Chunks a throttled BatchGetItem leaves unprocessed (UnprocessedKeys), however often asked.
        self.unread_chunks: set[tuple[str, int]] = set()

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def add(self, record: JobRecord, due_ms: int | None = None) -> JobRecord:
        """Put a job in any state, as a test's Given; unfinished jobs join the sweep index and
        count in their tenant's share, as if accepted (and claimed) through the store."""
        self.records[record.id] = record
        if due_ms is not None or not record.status.is_terminal:
            self.due[record.id] = due_ms if due_ms is not None else record.created_ms
        if not record.status.is_terminal:
            share = self.shares[record.tenant_id]
            share.active += 1
            share.holders[record.lane]
            if record.status is JobStatus.RUNNING:
                share.holders[record.lane][record.id] = record.started_ms or record.created_ms
        return record

    def _put(self, record: JobRecord, **changes: Any) -> JobRecord:
        updated = record.model_copy(update=changes)
        self.records[record.id] = updated
        return updated

    def _queued_due(self, from_ms: int, deadline_ms: int | None) -> int:
        due = from_ms + self.config.reconciler.stale_queued_seconds * 1000
        return due if deadline_ms is None else min(due, deadline_ms)

    def _in_seconds(self, seconds: float) -> int:
        return self.now_ms() + int(seconds * 1000)

    # ---- accept and read ----------------------------------------------------------------

    def _over_quota(self, tenant_id: str, admission: Admission) -> bool:
        share = self.shares[tenant_id]
        return share.active >= (share.max_active_jobs or admission.max_active_jobs)

    @_throttleable
    def check_quota(self, tenant_id: str, admission: Admission) -> None:
        if self._over_quota(tenant_id, admission):
            raise QuotaExceeded("over quota", retry_after=self.config.fair_share.quota_retry_after_seconds)

    @_throttleable
    def create(self, record: JobRecord, admission: Admission) -> Created:
        if item_size_bytes(to_item(record)) > MAX_ITEM_BYTES:
            raise ItemTooLarge("the job does not fit in one item")
        existing = self.records.get(record.id)
        if existing is not None and (
            existing.expires_at > int(self._clock()) or not existing.status.is_terminal
        ):
            return Created(job=existing, replayed=True)
        self.check_quota(record.tenant_id, admission)
        share = self.shares[record.tenant_id]
        share.active += 1
        share.caps[record.lane] = admission.caps[0]  # (no batch runs on this store)
        share.holders[record.lane]  # the map exists from the accept on, as in the table
        self.records[record.id] = record.model_copy(update={"last_write": f"create#{uuid.uuid4().hex}"})
        self.due[record.id] = self._queued_due(record.created_ms, record.deadline_ms)
        return Created(job=record, replayed=False)

    @_throttleable
    def find(self, job_id: str, *, past_retention: bool = False) -> JobRecord | None:
        """Past its TTL counts as gone, as the repository reads it (unless `past_retention`)."""
        record = self.records.get(job_id)
        if record is None or past_retention:
            return record
        return record if record.expires_at > int(self._clock()) else None

    def get(self, job_id: str, tenant_id: str) -> JobRecord:
        found = self.find(job_id)
        if found is not None and found.tenant_id == tenant_id:
            return found
        raise JobNotFound(f"no job {job_id}")

    @_throttleable
    def list_for_tenant(
        self, tenant_id: str, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]:
        now_s = int(self._clock())
        mine = sorted(
            (r for r in self.records.values() if r.tenant_id == tenant_id),
            key=lambda r: (r.created_ms, r.id),
            reverse=True,
        )
        start = next((i + 1 for i, r in enumerate(mine) if r.id == cursor), 0) if cursor else 0
        page = mine[start : start + limit]
        # DynamoDB answers a LastEvaluatedKey whenever the page is full, even if nothing follows.
        more = start + limit <= len(mine)
        # As DynamoDB filters: after the page is read, so a page may hold fewer than `limit`.
        shown = [r for r in page if r.expires_at > now_s and (status is None or r.status is status)]
        return shown, (page[-1].id if more and page else None)

    @_throttleable
    def queued_ahead(self, job: JobRecord, limit: int = 1000) -> int:
        mine = (job.created_ms, job.id)
        before = sorted(
            (
                r
                for r in self.records.values()
                if r.tenant_id == job.tenant_id and (r.created_ms, r.id) < mine
            ),
            key=lambda r: (r.created_ms, r.id),
            reverse=True,
        )[:limit]
        return sum(1 for r in before if r.status is JobStatus.QUEUED and r.lane == job.lane)

    @_throttleable
    def is_cancel_requested(self, job_id: str) -> bool:
        record = self.records.get(job_id)
        return record is not None and record.cancel_requested

    # ---- live output ----------------------------------------------------------------------

    @_throttleable
    def write_output(self, job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        old = self.records.get(job.id)
        ours = old is not None and old.lease_owner == owner and old.status is JobStatus.RUNNING
        if old is None or not ours:
            raise LeaseLost(job.id)
        if (old.stream_seq or 0) >= chunk.seq:
            return
        if old.cancel_requested and not final:
            raise CancelRequested(job.id)
        if (old.stream_seq or 0) != chunk.seq - 1:
            raise LeaseLost(job.id)
        self.chunks[(job.id, chunk.seq)] = chunk.as_delta()
        self.chunk_expiry[(job.id, chunk.seq)] = (
            self.now_ms() // 1000 + self.config.streaming.chunk_ttl_seconds
        )
        self._put(
            old,
            stream_seq=chunk.seq,
            stream_attempt=chunk.attempt,
            stream_chars=chunk.chars,
            stream_from=chunk.seq if chunk.opens else old.stream_from,
            progress_tokens=chunk.tokens,
            progress_ms=self.now_ms(),
            output_partial=chunk.partial,
            output_partial_truncated=chunk.truncated,
        )

    @_throttleable
    def output_head(self, job_id: str) -> OutputHead | None:
        record = self.find(job_id)
        if record is None:
            return None
        return OutputHead(record.tenant_id, record.status, record.stream_seq or 0, record.expires_at)

    @_throttleable
    def read_output(
        self, job: JobRecord, first: int, last: int, *, limit: int = OUTPUT_PAGE
    ) -> list[OutputDelta]:
        """As DynamoDB's: the chunks gone (expired) at the front are skipped, a page at a time;
        a chunk in `unread_chunks` is one a throttled read did not return."""
        job_id = job.id
        size = max(1, min(limit, OUTPUT_PAGE))
        start = first
        while start <= last:
            deltas: list[OutputDelta] = []
            page = range(start, min(last, start + size - 1) + 1)
            for seq in page:
                if (job_id, seq) in self.unread_chunks:
                    if deltas:
                        return deltas
                    raise StoreUnavailable("DynamoDB left the job's output unread (throttled)")
                if (job_id, seq) in self.chunks and self.chunk_expiry[(job_id, seq)] > self.now_ms() // 1000:
                    deltas.append(self.chunks[(job_id, seq)])
                elif deltas:
                    break
            if deltas:
                return deltas[: max(1, limit)]
            start, size = page[-1] + 1, OUTPUT_PAGE
        return []

    # ---- the lease ------------------------------------------------------------------------

    def _claimable(self, found: JobRecord, now: int) -> bool:
        retire_s = now // 1000 + self.config.reconciler.retention_margin_seconds
        if found.expires_at <= retire_s or found.cancel_requested:
            return False
        if found.status is JobStatus.QUEUED:
            return (found.deadline_ms is None or found.deadline_ms > now) and (
                found.not_before_ms is None or found.not_before_ms <= now
            )
        return (
            found.status is JobStatus.RUNNING
            and found.lease_expires_ms is not None
            and found.lease_expires_ms < now
            and found.attempts < self.config.max_attempts
        )

    @_throttleable
    def claim(
        self, job_id: str, owner: str, lease_seconds: float, tenant: tuple[str, str] | None = None
    ) -> Claim:
        now = self.now_ms()
        found = self.records.get(job_id)
        if found is not None and tenant is not None and (found.tenant_id, found.lane) != tenant:
            # (the message named another tenant or lane: the store's condition refuses it)
            return Claim(claimed=False, job=found, at_ms=now, foreign=True)
        if found is None or not self._claimable(found, now):
            ours = found is not None and found.status is JobStatus.RUNNING and found.lease_owner == owner
            margin = self.config.reconciler.retention_margin_seconds
            return Claim(claimed=ours, job=found, at_ms=now, retention_margin_s=margin)
        share = self.shares[found.tenant_id]
        held = share.holders[found.lane]
        cap = share.max_concurrency or share.caps.get(found.lane)
        if job_id not in held and cap is not None and len(held) >= cap:
            return Claim(claimed=False, job=None, at_ms=now, share=share.state(found.tenant_id))
        held[job_id] = now
        lease_until = self._in_seconds(lease_seconds)
        self.due[job_id] = lease_until + self.config.reconciler.expired_lease_grace_seconds * 1000
        claimed = self._put(
            found,
            status=JobStatus.RUNNING,
            lease_owner=owner,
            lease_expires_ms=lease_until,
            started_ms=found.started_ms if found.started_ms is not None else now,
            attempts=found.attempts + 1,
            dead_letter_ids=set(),
        )
        return Claim(claimed=True, job=claimed, at_ms=now)

    def _finish(
        self,
        job: JobRecord,
        status: JobStatus,
        allowed: Callable[[JobRecord], bool],
        token: str | None = None,
        **outcome: Any,
    ) -> JobRecord:
        """The terminal write; `outcome` holds result, result_ref or error."""
        token = token or f"{status.value}#{uuid.uuid4().hex}"
        old = self.records.get(job.id)
        if old is None or not allowed(old):
            if old is not None and old.last_write == token and old.status is status:
                return old
            raise _Refused(job.id)
        changes: dict[str, Any] = {
            "status": status,
            "finished_ms": self.now_ms(),
            "last_write": token,
            "lease_owner": None,
            "lease_expires_ms": None,
            **{name: value for name, value in outcome.items() if value is not None},
        }
        if outcome.get("error") is None and status in (JobStatus.SUCCEEDED, JobStatus.CANCELED):
            changes["error"] = None
        if status is JobStatus.CANCELED:
            changes["cancel_requested"] = True
        if old.stream:
            changes.update(
                output_partial=None, output_partial_truncated=None, progress_tokens=None, progress_ms=None
            )
        outlive = self.now_ms() // 1000 + self.config.terminal_event_seconds
        # (kept for its terminal event's retries, as the repository; not once past its retention)
        if self.now_ms() // 1000 < old.expires_at < outlive:
            changes["expires_at"] = outlive
        if job.wants(EVENT_FOR_STATUS[status]):
            changes["delivery_status"] = DeliveryStatus.PENDING
            self.due[job.id] = self._in_seconds(self.config.reconciler.stale_webhook_seconds)
        else:
            self.due.pop(job.id, None)
        self.shares[old.tenant_id].leave(old, ends=True)
        return self._put(old, **changes)

    def _finish_if(
        self, job: JobRecord, status: JobStatus, allowed: Callable[[JobRecord], bool], **outcome: Any
    ) -> JobRecord | None:
        try:
            return self._finish(job, status, allowed, **outcome)
        except _Refused:
            return None

    def _finish_leased(self, job: JobRecord, owner: str, status: JobStatus, **outcome: Any) -> JobRecord:
        def held(old: JobRecord) -> bool:
            return old.lease_owner == owner and old.status is JobStatus.RUNNING

        try:
            return self._finish(job, status, held, token=f"{owner}#{status.value}", **outcome)
        except _Refused as exc:
            raise LeaseLost(job.id) from exc

    @_throttleable
    def complete(
        self,
        job: JobRecord,
        owner: str,
        *,
        result: JobResult | None = None,
        result_ref: str | None = None,
        timed: bool = True,
    ) -> JobRecord:
        # (run times are not kept here)
        done = self._finish_leased(job, owner, JobStatus.SUCCEEDED, result=result, result_ref=result_ref)
        return done if timed else self._not_the_chunks(done)

    def _not_the_chunks(self, ended: JobRecord) -> JobRecord:
        """A parked result recorded: the chunks are no prefix of it (as the repository's `_finish`)."""
        return self._put(ended, stream_attempt=None) if ended.stream else ended

    @_throttleable
    def fail_leased(self, job: JobRecord, owner: str, error: JobError) -> JobRecord:
        old = self.records.get(job.id)
        held = old is not None and old.lease_owner == owner and old.status is JobStatus.RUNNING
        if held and old is not None and old.cancel_requested:
            raise CancelRequested(job.id)
        return self._finish_leased(job, owner, JobStatus.FAILED, error=error)

    @_throttleable
    def cancel_leased(self, job: JobRecord, owner: str) -> JobRecord:
        return self._finish_leased(job, owner, JobStatus.CANCELED)

    @_throttleable
    def requeue(
        self, job: JobRecord, owner: str, error: JobError, delay_seconds: float, *, refused: bool = False
    ) -> JobRecord:
        return self._back_to_queued(job, owner, delay_seconds, error, refused=refused)

    @_throttleable
    def release(self, job: JobRecord, owner: str, delay_seconds: float) -> JobRecord:
        return self._back_to_queued(job, owner, delay_seconds, None)

    def _back_to_queued(
        self,
        job: JobRecord,
        owner: str,
        delay_seconds: float,
        error: JobError | None,
        *,
        refused: bool = False,
    ) -> JobRecord:
        token = f"{owner}#{'release' if error is None else 'refused' if refused else 'requeue'}"
        old = self.records.get(job.id)
        if old is None or old.lease_owner != owner or old.status is not JobStatus.RUNNING:
            if old is not None and old.last_write == token and old.status is JobStatus.QUEUED:
                return old
            raise LeaseLost(job.id)
        if old.cancel_requested:
            raise CancelRequested(job.id)
        visible_at = self._in_seconds(delay_seconds)
        self.due[job.id] = self._queued_due(visible_at, job.deadline_ms)
        self.shares[old.tenant_id].leave(old, ends=False)
        changes: dict[str, Any] = {"error": error} if error else {"attempts": old.attempts - 1}
        if refused:
            changes |= {"attempts": old.attempts - 1, "refusals": old.refusals + 1}
        return self._put(
            old,
            status=JobStatus.QUEUED,
            not_before_ms=visible_at,
            last_write=token,
            lease_owner=None,
            lease_expires_ms=None,
            **changes,
        )

    # ---- jobs no live worker holds --------------------------------------------------------

    def _unleased(self, old: JobRecord) -> bool:
        return old.lease_expires_ms is None or old.lease_expires_ms < self.now_ms()

    @_throttleable
    def expire(self, job: JobRecord, error: JobError) -> JobRecord | None:
        def overdue(old: JobRecord) -> bool:
            return (
                old.status is JobStatus.QUEUED
                and old.deadline_ms is not None
                and old.deadline_ms <= self.now_ms()
            )

        return self._or_canceled(job, JobStatus.EXPIRED, overdue, error=error)

    def _or_canceled(
        self, job: JobRecord, status: JobStatus, allowed: Callable[[JobRecord], bool], **outcome: Any
    ) -> JobRecord | None:
        old = self.records.get(job.id)
        if old is not None and old.cancel_requested and not old.status.is_terminal:
            return self.cancel_unleased(job)
        return self._finish_if(job, status, allowed, **outcome)

    @_throttleable
    def fail_unleased(self, job: JobRecord, error: JobError) -> JobRecord | None:
        def abandoned(old: JobRecord) -> bool:
            return old.status is JobStatus.RUNNING and self._unleased(old)

        return self._or_canceled(job, JobStatus.FAILED, abandoned, error=error)

    @_throttleable
    def expire_at_retention(self, job: JobRecord, error: JobError) -> JobRecord | None:
        soon_s = self.now_ms() // 1000 + self.config.reconciler.retention_margin_seconds

        def retiring(old: JobRecord) -> bool:
            unfinished = old.status is JobStatus.QUEUED or (
                old.status is JobStatus.RUNNING and self._unleased(old)
            )
            return unfinished and old.expires_at <= soon_s

        return self._or_canceled(job, JobStatus.EXPIRED, retiring, error=error)

    @_throttleable
    def cancel_unleased(self, job: JobRecord) -> JobRecord | None:
        def asked(old: JobRecord) -> bool:
            return old.cancel_requested and (
                old.status is JobStatus.QUEUED or (old.status is JobStatus.RUNNING and self._unleased(old))
            )

        return self._finish_if(job, JobStatus.CANCELED, asked)

    @_throttleable
    def end_with_parked(
        self,
        job: JobRecord,
        *,
        result: JobResult | None = None,
        result_ref: str | None = None,
        error: JobError | None = None,
    ) -> JobRecord | None:
        def unheld(old: JobRecord) -> bool:
            return old.created_ms == job.created_ms and (
                old.status is JobStatus.QUEUED or (old.status is JobStatus.RUNNING and self._unleased(old))
            )

        if error is not None:
            ended = self._or_canceled(job, JobStatus.FAILED, unheld, error=error)
        else:
            ended = self._finish_if(job, JobStatus.SUCCEEDED, unheld, result=result, result_ref=result_ref)
        return None if ended is None else self._not_the_chunks(ended)

    @_throttleable
    def recover(self, job: JobRecord) -> JobRecord | None:
        old = self.records.get(job.id)
        if old is None or old.status is not JobStatus.RUNNING or not self._unleased(old):
            return None
        self.due[job.id] = SWEEP_RECOVERED_MS  # (to the front until its message is sent, as the repository)
        self.shares[old.tenant_id].leave(old, ends=False)
        return self._put(
            old,
            status=JobStatus.QUEUED,
            last_write=f"recover#{uuid.uuid4().hex}",
            lease_owner=None,
            lease_expires_ms=None,
            not_before_ms=None,
        )

    @_throttleable
    def note_dead_letter(self, job: JobRecord, message_id: str, redrive_round: int = 0) -> JobRecord | None:
        old = self.records.get(job.id)
        if old is None or old.status is not JobStatus.QUEUED:
            return None
        if message_id in old.dead_letter_ids:
            return old  # counted already: it still counts, once
        if message_id in self.counted_letters.get(job.id, set()):
            return None  # counted before the last claim: a DLQ record redelivered
        if old.dead_letter_ids and old.redrive_round != redrive_round:
            return None  # a copy from a round already answered
        self.counted_letters.setdefault(job.id, set()).add(message_id)
        return self._put(
            old, dead_letter_ids={*old.dead_letter_ids, message_id}, redrive_round=redrive_round + 1
        )

    @_throttleable
    def fail_queued_dead_letter(self, job: JobRecord, error: JobError) -> JobRecord | None:
        def undeliverable(old: JobRecord) -> bool:
            return old.status is JobStatus.QUEUED and len(old.dead_letter_ids) >= len(job.dead_letter_ids)

        return self._or_canceled(job, JobStatus.FAILED, undeliverable, error=error)

    # ---- cancel (API) -----------------------------------------------------------------------

    @_throttleable
    def cancel_queued(self, job: JobRecord, token: str) -> JobRecord | None:
        return self._finish_if(
            job, JobStatus.CANCELED, lambda old: old.status is JobStatus.QUEUED, token=token
        )

    @_throttleable
    def request_cancel(self, job: JobRecord, status: JobStatus = JobStatus.RUNNING) -> JobRecord | None:
        old = self.records.get(job.id)
        if old is None or old.status is not status:
            return None
        if status is JobStatus.QUEUED and job.id in self.due:
            self.due[job.id] = SWEEP_CANCEL_ASKED_MS
        return self._put(old, cancel_requested=True)

    # ---- webhook delivery -------------------------------------------------------------------

    @_throttleable
    def record_delivery(
        self,
        job_id: str,
        status: DeliveryStatus,
        status_code: int | None,
        next_attempt_in_seconds: float | None = None,
        previous_attempts: int | None = None,
        next_attempt_at_ms: int | None = None,
        attempt: DeliveryAttempt | None = None,
        log_seq: int = 0,
        carrier: str | None = None,
        expires_at: int | None = None,
        created_ms: int | None = None,
    ) -> bool:
        old = self.records.get(job_id)
        movable = {DeliveryStatus.PENDING}
        if status is DeliveryStatus.DELIVERED or (status is DeliveryStatus.DISABLED and attempt is not None):
            movable.add(DeliveryStatus.FAILED)  # a late answer to an attempt still counts
        if old is None or old.delivery_status not in movable:
            return False
        counted = status in (DeliveryStatus.PENDING, DeliveryStatus.FAILED)
        if counted and previous_attempts is not None and old.delivery_attempts != previous_attempts:
            return False
        changes: dict[str, Any] = {
            "delivery_status": status,
            "delivery_last_status_code": status_code,
            "delivery_attempts": counted_after(old.delivery_attempts, status, attempt),
            "delivery_next_ms": None,
            "delivery_carrier": carrier if status is DeliveryStatus.PENDING else None,
        }
        self.deliveries.append((status, status_code, next_attempt_in_seconds))
        if attempt is not None:
            # As the store: after the stored latest (the sequence read, unless the log moved on
            # since), in slot seq mod 10, the newest ten, oldest first.
            log_seq = old.delivery_log_seq
            slots = {**self.log_slots.get(job_id, {}), log_seq % 10: (log_seq, attempt)}
            self.log_slots[job_id] = slots
            changes["delivery_log"] = [entry for _, entry in sorted(slots.values(), key=lambda slot: slot[0])]
            changes["delivery_log_seq"] = old.delivery_log_seq + 1
        if status is DeliveryStatus.DELIVERED:
            changes["delivered_ms"] = self.now_ms()
        if status is DeliveryStatus.PENDING:
            wait = (next_attempt_in_seconds or 0) + self.config.reconciler.stale_webhook_seconds
            self.due[job_id] = self._in_seconds(wait)
            changes["delivery_next_ms"] = (
                next_attempt_at_ms
                if next_attempt_at_ms is not None
                else self._in_seconds(next_attempt_in_seconds or 0)
            )
            keep_until_s = (
                changes["delivery_next_ms"] // 1000 + 3 * self.config.reconciler.stale_webhook_seconds
            )
            if created_ms is not None:
                keep_until_s = min(keep_until_s, self.config.kept_until_s(created_ms))
            kept = expires_at is not None and self.now_ms() // 1000 < expires_at < keep_until_s
            # (as the repository: never for a batch's item, never shorter than stored)
            if kept and old.batch_id is None and old.expires_at < keep_until_s:
                changes["expires_at"] = keep_until_s
        else:
            self.due.pop(job_id, None)
        self._put(old, **changes)
        return True

    def mark_webhook_gone(self, job_id: str) -> None:
        old = self.records.get(job_id)
        if old is not None:
            self._put(old, webhook_gone=True)

    @_throttleable
    def mark_delivery_pending(
        self, job_id: str, tenant_id: str, *, read: JobRecord | None = None
    ) -> JobRecord:
        old = self.records.get(job_id)
        if old is None or old.tenant_id != tenant_id or old.webhook_url is None:
            raise JobNotFound(job_id)
        if read is not None and old.created_ms != read.created_ms:
            raise JobNotFound(job_id)
        self.due[job_id] = self._in_seconds(self.config.reconciler.stale_webhook_seconds)
        round_s = self.config.terminal_event_seconds
        now_s = self.now_ms() // 1000
        kept: dict[str, int] = {}
        if read is not None:
            outlive = min(now_s, read.created_ms // 1000 + self.config.retention_seconds) + round_s
            if now_s < read.expires_at < outlive and not batch_of(job_id):
                kept["expires_at"] = outlive
        return self._put(
            old,
            delivery_status=DeliveryStatus.PENDING,
            delivery_attempts=0,
            delivery_next_ms=None,
            delivery_carrier=None,
            webhook_gone=False,
            delivery_round=old.delivery_round + 1,
            **kept,
        )

    # ---- the reconciler's sparse index ------------------------------------------------------

    @_throttleable
    def sweep(
        self,
        due_before_ms: int,
        limit: int,
        only: SweepPass | None = None,
        *,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[SweepEntry]:
        if stop is not None and stop():
            return

        def chosen(record: JobRecord) -> bool:
            passed = record.deadline_ms is not None and record.deadline_ms <= due_before_ms
            if only is SweepPass.LAPSED:
                return record.status is JobStatus.RUNNING
            if only is SweepPass.URGENT:
                return record.status not in (JobStatus.QUEUED, JobStatus.RUNNING) or (
                    record.status is JobStatus.QUEUED and passed
                )
            if only is SweepPass.BACKLOG:
                return record.status is JobStatus.QUEUED and not passed
            return True

        due = sorted(
            (at, job_id)
            for job_id, at in self.due.items()
            if at <= due_before_ms and chosen(self.records[job_id])
        )
        for at, job_id in due[:limit]:
            record = self.records[job_id]
            yield SweepEntry(
                job_id=job_id,
                status=record.status,
                lane=record.lane,
                sweep_at=at,
                delivery_status=record.delivery_status,
                deadline_ms=record.deadline_ms,
            )

    @_throttleable
    def count_unfinished(self, stop: Callable[[], bool] | None = None) -> Counter[str]:
        if stop is not None and stop():
            raise ReadCutShort("the lanes' unfinished jobs were not counted in the time given")
        unfinished = (self.records[job_id] for job_id in self.due if batch_of(job_id) is None)
        return Counter(r.lane for r in unfinished if r.status in (JobStatus.QUEUED, JobStatus.RUNNING))

    @_throttleable
    def sweep_first(self, job_id: str, unlooked: JobRecord | None = None) -> None:
        if job_id in self.due and self.records[job_id].status is JobStatus.QUEUED:
            if unlooked is not None and (
                job_id in self.looked
                or self.due[job_id] != self._queued_due(unlooked.created_ms, unlooked.deadline_ms)
            ):
                return
            self.due[job_id] = 1

    @_throttleable
    def postpone_sweep(
        self,
        job_id: str,
        seconds: float,
        *,
        retention_margin_s: int | None = None,
        status: JobStatus | None = None,
        seen_at: int | None = None,
        not_after_ms: int | None = None,
    ) -> bool:
        if job_id not in self.due:
            return False
        record = self.records[job_id]
        if status is not None and record.status is not status:
            return False
        if seen_at is not None and self.due[job_id] != seen_at:
            return False
        if retention_margin_s is not None and record.expires_at <= self.now_ms() // 1000 + retention_margin_s:
            raise RetentionDue(record)
        due = self._in_seconds(seconds)
        self.due[job_id] = due if not_after_ms is None else min(due, not_after_ms)
        self.looked.add(job_id)
        return True


class InMemoryQueues:
    """The lane queues (job ids, in order) and the webhooks queue."""

    def __init__(self) -> None:
        self.lanes: defaultdict[str, list[str]] = defaultdict(list)
        self.delays: list[tuple[str, int]] = []
        # Copies sent as deferred without a claim of their own (`LaneMessage.spoken_for`).
        self.spoken_for: list[str] = []
        # Each lane message sent, as a worker would receive it, with its delay.
        self.sent: list[tuple[LaneMessage, int]] = []
        self.webhooks: list[tuple[str, WebhookEvent]] = []
        self.outputs: list[JobOutputEvent] = []
        # The job each webhook message carried (None: none), in the order of `webhooks`.
        self.snapshots: list[dict[str, Any] | None] = []
        self.rounds: list[int] = []
        self.visibility: list[tuple[str, float]] = []
        self.unavailable: set[str] = set()

    @_throttleable
    def enqueue_job(
        self,
        job_id: str,
        lane: str,
        tenant_id: str,
        delay_seconds: int = 0,
        not_before_ms: int | None = None,
        *,
        redrive_round: int = 0,
        spoken_for: bool = False,
    ) -> None:
        self.lanes[lane].append(job_id)
        self.delays.append((job_id, delay_seconds))
        message = LaneMessage(
            job_id=job_id, lane=lane, tenant_id=tenant_id, not_before_ms=not_before_ms, spoken_for=spoken_for
        )
        self.sent.append((message, delay_seconds))
        if spoken_for:
            self.spoken_for.append(job_id)

    @_throttleable
    def enqueue_webhook(
        self,
        job_id: str,
        event: WebhookEvent,
        output: JobOutputEvent | None = None,
        snapshot: dict[str, Any] | None = None,
        *,
        tenant_id: str | None = None,
        delivery_round: int = 0,
    ) -> None:
        self.webhooks.append((job_id, event))
        self.rounds.append(delivery_round)
        self.snapshots.append(snapshot)
        if output is not None:
            self.outputs.append(output)

    @_throttleable
    def lane_depth(self, lane: str) -> int:
        return len(self.lanes[lane])

    @_throttleable
    def delay_redelivery(self, queue_arn: str, receipt_handle: str, seconds: float) -> None:
        # What the real repository would ask SQS for, clamp included.
        self.visibility.append((receipt_handle, redelivery_visibility(seconds)))


class InMemoryBlobs:
    """The payload bucket."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.unavailable: set[str] = set()

    @_throttleable
    def put(self, key: str, data: bytes) -> str:
        self.objects[key] = data
        return key

    @_throttleable
    def put_new(self, key: str, data: bytes) -> bool:
        if key in self.objects:
            return False
        self.objects[key] = data
        return True

    @_throttleable
    def get(self, key: str) -> bytes:
        return self.objects[key]

    @_throttleable
    def stat(self, key: str) -> ObjectStat | None:
        data = self.objects.get(key)
        return None if data is None else ObjectStat(len(data), hashlib.md5(data).hexdigest())

    def presigned_url(self, key: str, expires_seconds: int = RESULT_URL_SECONDS) -> PresignedUrl:
        return PresignedUrl(f"https://payloads.example/{key}?expires={expires_seconds}", 1_700_000_000_000)


class InMemoryTenants:
    """Tenants by id, and API keys by their hash, as the tenants table keeps them."""

    def __init__(self) -> None:
        self.tenants: dict[str, Tenant] = {}
        self.keys: dict[str, TenantIdentity] = {}
        self.unavailable: set[str] = set()

    def add(self, tenant_id: str, tier: str = "enterprise", secrets: list[str] | None = None) -> str:
        """A tenant with one live API key, which is returned."""
        secrets = [new_webhook_secret()] if secrets is None else secrets
        self.tenants[tenant_id] = Tenant(id=tenant_id, name=tenant_id, tier=tier, webhook_secrets=secrets)
        api_key = new_api_key()
        self.keys[hash_api_key(api_key)] = TenantIdentity(tenant_id=tenant_id, tier=tier)
        return api_key

    @_throttleable
    def authenticate(self, api_key: str) -> TenantIdentity | None:
        return self.keys.get(hash_api_key(api_key)) if api_key else None

    @_throttleable
    def get(self, tenant_id: str) -> Tenant:
        if tenant_id not in self.tenants:
            raise UnknownTenant(tenant_id)
        return self.tenants[tenant_id]


def job_record(now_ms: int, job_id: str = "job_1", **changes: Any) -> JobRecord:
    """A queued job of `ten_acme` in lane `high`, created a second before `now_ms`."""
    fields: dict[str, Any] = {
        "id": job_id,
        "tenant_id": "ten_acme",
        "status": JobStatus.QUEUED,
        "lane": "high",
        "model": "gpt-4o-mini",
        "input": JobInput(messages=[ChatMessage(role="user", content="hello")]),
        "request_hash": "h",
        "created_ms": now_ms - 1000,
        "expires_at": now_ms // 1000 + 86_400,
        **changes,
    }
    return JobRecord(**fields)
