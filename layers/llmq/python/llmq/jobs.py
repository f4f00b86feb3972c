"""The job store: every write of DESIGN §3, each a single conditional DynamoDB call.

It writes and reads; it does not decide. Why a claim was refused, what a deadline says and
where a payload lives are the use cases' (`policy`, `offload`). Nothing above this module
sees botocore: `ClientError` codes become domain outcomes.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from botocore.exceptions import ClientError

from llmq import aws, batches, shares
from llmq import job_codec as codec
from llmq.config import LlmqConfig
from llmq.errors import (
    CancelRequested,
    ItemTooLarge,
    JobNotFound,
    LeaseLost,
    QuotaExceeded,
    ReadCutShort,
    StoreContended,
    StoreUnavailable,
)
from llmq.job_index import (
    BATCH_SORT_PREFIX,
    SWEEP_INDEX,
    TENANT_INDEX,
    sweep_attributes,
    sweep_clauses,
    sweep_partitions,
    tenant_sort_key,
)
from llmq.job_record import JobRecord, a_later_round, is_job_id
from llmq.live_output import OUTPUT_PAGE, OutputChunk, OutputHead, chunk_pk
from llmq.models import (
    EVENT_FOR_STATUS,
    TERMINAL_STATUSES,
    DeliveryAttempt,
    DeliveryStatus,
    JobError,
    JobResult,
    JobStatus,
    OutputDelta,
)
from llmq.policy import COUNTED_LETTERS, Claim, fresh_letter_condition
from llmq.read_gathering import GatheredReads
from llmq.shares import ShareState
from llmq.telemetry import error_fields, logger, reconcile_fault

Clock = Callable[[], float]

# A claim under shares also requires the job to have been accepted under them, by the tenant
# and in the lane whose slot it takes.
_SHARED_CLAIM = "#shared = :true AND tenant_id = :tenant AND lane = :lane AND "
# A claim takes a queued job that is due, or a running one whose lease lapsed and that has
# attempts left; never one past its deadline (a restart is a start: it fails as a retry that
# would cross the deadline does, `deadline_exceeded`), asked to cancel or within the reconciler's margin of the
# end of its retention (`:retire_s`), which ends it instead (`ClaimOutcome.RETENTION_DUE`).
_NOT_CANCELED = "(attribute_not_exists(cancel_requested) OR cancel_requested = :false)"
_CLAIM_CONDITION = (
    "attribute_exists(pk) AND expires_at > :retire_s AND "
    f"{_NOT_CANCELED} AND "
    "(attribute_not_exists(deadline_ms) OR deadline_ms > :now) AND ("
    "(#st = :queued AND (attribute_not_exists(not_before_ms) OR not_before_ms <= :now)) OR "
    "(#st = :running AND lease_expires_ms < :now AND attempts < :max))"
)
# GET of a queued job counts the tenant's queued jobs submitted before it among this many of
# its jobs, newest first: a bounded read (a few dozen read units at most) however large the
# tenant's history.
QUEUE_POSITION_WINDOW = 1000
# A transaction that met another on the same item (TransactionConflict: two claims of one
# tenant at once) or a throttle is tried again this many times, after a short random pause,
# before the caller hears StoreUnavailable.
_TRANSACTION_TRIES = 5
_CONFLICT_PAUSE_SECONDS = 0.05
# Index entries read per sweep request (`JobRepository._sweep_shard`).
_SWEEP_PAGE = 100
_SWEEP_PAGE_FILTERED = 1000


@dataclass(frozen=True)
class Admission:
    """What an accept checks and records on the tenant's share (`llmq.shares`)."""

    # The tier's default caps in the job's lane (all jobs, batch items), and its default quota
    # of active jobs.
    caps: tuple[int, int]
    max_active_jobs: int


@dataclass(frozen=True)
class Created:
    job: JobRecord
    replayed: bool


@dataclass(frozen=True)
class SweepEntry:
    job_id: str
    status: JobStatus
    lane: str
    sweep_at: int
    delivery_status: DeliveryStatus | None
    deadline_ms: int | None
    # A batch (`llmq.batches`) not yet ended, or whose webhook is not yet sent: `job_id` is its
    # item's key, and `status` stands for "queued" (the reconciler pokes it, `Reconciler._poke`).
    batch: bool = False


class SweepPass(StrEnum):
    """Which of the sweep index's due entries one pass of the reconciler reads: together, the
    three read each entry once."""

    # Running jobs: their leases, each holding its tenant's slot.
    LAPSED = "lapsed"
    # Every other entry but a queued job's within its deadline: a passed deadline, a webhook
    # to send again, a batch to look at. Few, however long the lanes' backlogs.
    URGENT = "urgent"
    # Queued jobs within their deadline: a lane's stale queued jobs, as many as its backlog.
    BACKLOG = "backlog"


# What each pass keeps of a page (the index projects status and deadline_ms).
_SWEEP_FILTERS = {
    SweepPass.LAPSED: "#st = :running",
    SweepPass.URGENT: "(#st <> :queued AND #st <> :running) OR (#st = :queued AND deadline_ms <= :due)",
    SweepPass.BACKLOG: "#st = :queued AND (attribute_not_exists(deadline_ms) OR deadline_ms > :due)",
}


# A sweep entry due before any other (`JobRepository.sweep_first`): a queued job whose message
# is known lost.
SWEEP_FIRST_MS = 1
# A recovered job's entry until the reconciler has sent its message and postponed it
# (`JobRepository.recover`): due as soon, but its message may have gone.
SWEEP_RECOVERED_MS = 2
# A queued job flagged for a cancel the API could not end (`request_cancel`): due as soon, for
# a message its claim ends it with, while its own may be hidden for a retry's backoff; it is not
# one of the lane's missing messages.
SWEEP_CANCEL_ASKED_MS = 3


class RetentionDue(Exception):
    """The job is still unfinished this close to the end of its retention: the reconciler ends
    it (`JobRepository.expire_at_retention`) instead of leaving it for another look. `job`: as
    stored."""

    def __init__(self, job: JobRecord) -> None:
        super().__init__(f"job {job.id} reaches the end of its retention")
        self.job = job


# Where a share update stands in a job's transaction: after the job's own write.
_SHARE_AT = 1


class _Foreign(Exception):
    """A claim's message named another tenant or lane than its job's."""

    def __init__(self, job: JobRecord) -> None:
        super().__init__(job.id)
        self.job = job


class _NoHolders(Exception):
    """A transaction refused because its share update writes inside a missing holders map."""


class _ConditionFailed(Exception):
    def __init__(self, old: JobRecord | None) -> None:
        super().__init__("condition failed")
        self.old = old


class _Canceled(Exception):
    """A transaction refused by a condition: which items' conditions failed, and what they held."""

    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        super().__init__("transaction canceled")
        self.reasons = reasons

    def failed(self, index: int) -> bool:
        return index < len(self.reasons) and self.reasons[index].get("Code") == "ConditionalCheckFailed"

    def item(self, index: int) -> dict[str, Any] | None:
        if index >= len(self.reasons):
            return None
        found: dict[str, Any] | None = self.reasons[index].get("Item")
        return found or None

    def job(self) -> JobRecord | None:
        """The job item (always the first of our transactions) as the failed condition found it."""
        item = self.item(0)
        return codec.from_item(item) if item else None


class JobRepository:
    def __init__(
        self, table_name: str, config: LlmqConfig, *, dynamodb: Any, clock: Clock = time.time
    ) -> None:
        self.table_name = table_name
        self.config = config
        self._clock = clock
        self._ddb = aws.TranslatedClient(dynamodb)
        # (a request's marks after a send it gave up end in time for its answer: `sweep_first`)
        self._marks = aws.TranslatedClient(dynamodb, bounded="marks")
        self._rng = random.Random()
        # The read after each claim, gathered with those of the batch's other claims.
        self.claimed_reads = GatheredReads(self._read_items)

    def _sweep(self, job_id: str, due_ms: int | None) -> tuple[list[str], list[str], dict[str, Any]]:
        return sweep_clauses(job_id, due_ms, self.config.reconciler.sweep_shards)

    def _queued_due(self, from_ms: int, deadline_ms: int | None) -> int:
        """When the reconciler next looks at a queued job: once it has been stale for
        `reconciler.stale_queued_seconds` from `from_ms`, or at its deadline if that comes
        first. A job waiting behind its lane's backlog or its tenant's cap (whose deferred
        message may come back an hour later) then ends `expired` within a reconciler period of
        its deadline, with its webhook, not whenever its message is next received."""
        due = from_ms + self.config.reconciler.stale_queued_seconds * 1000
        return due if deadline_ms is None else min(due, deadline_ms)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _job_update(
        self, job_id: str, expression: str, condition: str, names: dict[str, str], values: dict[str, Any]
    ) -> dict[str, Any]:
        """A conditional update of one job, as an item of a transaction."""
        return {
            "Update": {
                "TableName": self.table_name,
                "Key": {"pk": {"S": job_id}},
                "UpdateExpression": expression,
                "ConditionExpression": condition,
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": codec.values(**values),
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        }

    def _transact_leaving(
        self,
        job: JobRecord,
        update: dict[str, Any],
        *,
        ends: bool,
        status: JobStatus | None = None,
        timed: bool = True,
    ) -> None:
        """A job update in one transaction with its tenant's share: the job gives back its
        slot if it held one, and with `ends` is no longer active either. A batch's item's end,
        in `status`, is also counted on its batch (`llmq.batches`). An attempt that succeeded
        leaves its run time on the share, for the lane's deferrals (not one recorded unleased,
        `timed` False: its claim's age says nothing of how long a run takes).

        A job accepted before shares existed (`shared` unset) never counted in one: it is
        written alone, as before, and refused the same way (`_Canceled`).
        """
        if not job.shared:
            try:
                self._ddb.update_item(**update["Update"])
            except ClientError as exc:
                if codec.too_large(exc):
                    raise ItemTooLarge(f"job {job.id} does not fit in one item") from exc
                if not codec.condition_failed(exc):
                    raise
                item = exc.response.get("Item")
                raise _Canceled([{"Code": "ConditionalCheckFailed", "Item": item}]) from exc
            return
        item_of = batches.batch_of(job.id)
        # (the attempt's own claim: `started_ms` is the first's, before any release or backoff)
        ran = (
            timed
            and status is JobStatus.SUCCEEDED
            and job.status is JobStatus.RUNNING
            and job.claimed_ms is not None
        )
        leave = shares.leave(
            self.table_name,
            job.tenant_id,
            job.lane,
            job.id,
            ends=ends,
            batch_item=item_of is not None,
            ran_ms=self.now_ms() - job.claimed_ms if ran and job.claimed_ms is not None else None,
        )
        counted = (
            batches.count_end(self.table_name, job, status, self.config.batches.count_shards)
            if ends and status is not None
            else None
        )
        self._transact_sharing([update, leave, *([counted] if counted else [])], job.tenant_id, job.lane)

    def _transact_sharing(
        self,
        items: list[dict[str, Any]],
        tenant_id: str,
        lane: str,
        calling: Callable[[], AbstractContextManager[None]] = nullcontext,
        owned: Callable[[], None] | None = None,
    ) -> None:
        """`_transact`, whose share update writes inside the lane's holders maps: a share written
        before one of them existed has it added (`shares.ensure_holders`), then the same
        transaction is tried again. `owned` raises when the job is not the tenant's in that lane,
        before anything is added to the share."""
        try:
            self._transact(items, sharing=True, calling=calling)
        except _NoHolders:
            if owned is not None:
                owned()
            try:
                self._ddb.update_item(**shares.ensure_holders(self.table_name, tenant_id, lane))
            except ClientError as exc:
                if not codec.condition_failed(exc):
                    raise
                raise StoreUnavailable(f"tenant {tenant_id} has no share") from exc
            self._transact(items, calling=calling)

    def _transact(
        self,
        items: list[dict[str, Any]],
        *,
        sharing: bool = False,
        calling: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        """One TransactWriteItems: a job write (always the first item) and its tenant's share
        update, all or nothing.

        botocore gives the call an idempotency token and reuses it on its own retries, so a
        transaction applied but unanswered is not applied twice. Raises _Canceled when a
        condition failed, ItemTooLarge when the job's item would pass 400 KB, and, after a few
        tries, StoreContended for conflicts and throttles: a canceled transaction is known
        not to have been applied. `calling` is entered around each call (not the pauses
        between them).
        """
        for attempt in range(_TRANSACTION_TRIES):
            try:
                with calling():
                    self._ddb.transact_write_items(TransactItems=items)
                return
            except ClientError as exc:
                if codec.too_large(exc):
                    raise ItemTooLarge("the job does not fit in one item") from exc
                if sharing and codec.missing_path(exc, at=_SHARE_AT):
                    raise _NoHolders() from exc
                if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                    raise
                reasons: list[dict[str, Any]] = exc.response.get("CancellationReasons") or []  # type: ignore[assignment]
                codes = {reason.get("Code") for reason in reasons}
                if "ConditionalCheckFailed" in codes:
                    raise _Canceled(reasons) from exc
                # A reason says ValidationError on AWS (ValidationException in moto).
                job_reason = reasons[0] if reasons else {}
                if (
                    str(job_reason.get("Code", "")).startswith("Validation")
                    and "size" in str(job_reason.get("Message", "")).lower()
                ):
                    raise ItemTooLarge("the job does not fit in one item") from exc
                if not codes & codec.RETRYABLE_TRANSACTION_REASONS:
                    raise
                if attempt + 1 < _TRANSACTION_TRIES:
                    time.sleep(_CONFLICT_PAUSE_SECONDS * (1 + self._rng.random()) * (attempt + 1))
                    continue
                raise StoreContended(
                    f"dynamodb.TransactWriteItems: {sorted(c for c in codes if c)} after {attempt + 1} tries"
                ) from exc

    # ---- accept -------------------------------------------------------------------------

    def create(self, record: JobRecord, admission: Admission) -> Created:
        """One transaction: the conditional put of the job and one more active job on its
        tenant's share. A replay of the same id returns the stored job instead, whatever the
        quota; a new job over the quota raises QuotaExceeded and writes nothing.

        The put carries a fresh token: when a put applied but unanswered is tried again, the
        condition fails on our own item, and the token says so.
        The record comes placed (`Offload.store_input`): an input too large is already in S3.
        """
        token = codec.write_token("create")
        extra = {
            "tenant_created": tenant_sort_key(record.created_ms, record.id),
            **sweep_attributes(
                record.id,
                self._queued_due(record.created_ms, record.deadline_ms),
                self.config.reconciler.sweep_shards,
            ),
        }
        put = {
            "Put": {
                "TableName": self.table_name,
                "Item": codec.to_item(record.model_copy(update={"last_write": token, "shared": True}), extra),
                # An item past its TTL but not yet deleted by DynamoDB counts as gone (as
                # `find` sees it), once it has ended: one still queued or running holds its
                # tenant's quota and slot, which only its own end gives back (`JobIntake`
                # ends it first).
                "ConditionExpression": "attribute_not_exists(pk) OR "
                "(expires_at <= :now_s AND #st IN (:succeeded, :failed, :canceled, :expired))",
                "ExpressionAttributeNames": {"#st": "status"},
                "ExpressionAttributeValues": codec.values(
                    now_s=int(self._clock()), **{status.value: status.value for status in TERMINAL_STATUSES}
                ),
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        }
        share = shares.admit(
            self.table_name, record.tenant_id, record.lane, *admission.caps, admission.max_active_jobs
        )
        try:
            self._transact([put, share])
        except _Canceled as exc:
            if exc.failed(0):
                existing = exc.job()
                if existing is None:
                    raise StoreUnavailable("the job's put was refused without its item") from exc
                if existing.last_write == token:
                    return Created(job=existing, replayed=False)
                return Created(job=existing, replayed=True)
            raise self._over_quota(ShareState.from_item(record.tenant_id, exc.item(1)), admission) from exc
        except StoreContended:
            raise  # (canceled, try after try: known not to have been applied)
        except StoreUnavailable:
            # Perhaps applied with its answer lost (a timeout, a cut connection, a 500 after
            # DynamoDB took it): one consistent read says, by the put's token. Stored, the job
            # is accepted and gets its message now; a replay would find it and send none, and
            # it would wait for the reconciler's stale threshold. A read that fails as well
            # leaves the 503 (the reconciler then sends a stored job's message).
            stored = self._stored_by(record.id, token)
            if stored is None:
                raise
            return Created(job=stored, replayed=False)
        return Created(job=record.model_copy(update={"last_write": token, "shared": True}), replayed=False)

    def _stored_by(self, job_id: str, token: str) -> JobRecord | None:
        """The job, if a write carrying `token` stored it; None if not, or if the read fails."""
        try:
            found = self.find(job_id)
        except Exception as exc:
            logger.warning(
                "an accept's outcome could not be read", extra={"job_id": job_id, **error_fields(exc)}
            )
            return None
        return found if found is not None and found.last_write == token else None

    def check_quota(self, tenant_id: str, admission: Admission) -> None:
        """Raise QuotaExceeded if the tenant is at its quota now: one consistent GetItem, for a
        submit that must write elsewhere (S3) before its transaction could refuse it."""
        response = self._ddb.get_item(
            TableName=self.table_name, Key=shares.share_key(tenant_id), ConsistentRead=True
        )
        state = ShareState.from_item(tenant_id, response.get("Item"))
        if state.active >= (state.max_active_jobs or admission.max_active_jobs):
            raise self._over_quota(state, admission)

    def _over_quota(self, state: ShareState, admission: Admission) -> QuotaExceeded:
        limit = state.max_active_jobs or admission.max_active_jobs
        return QuotaExceeded(
            f"{state.active} jobs are queued or running; this tenant may have at most {limit}",
            retry_after=self.config.fair_share.quota_retry_after_seconds,
        )

    # ---- claim --------------------------------------------------------------------------

    def claim(
        self, job_id: str, owner: str, lease_seconds: float, tenant: tuple[str, str] | None = None
    ) -> Claim:
        claim = self._claim(job_id, owner, lease_seconds, tenant)
        if claim.share is not None and tenant is not None and batches.batch_of(job_id) is not None:
            # A batch's item refused: the share's batch slots may need a repair first.
            repair = shares.repair_batch_slots(
                self.table_name, claim.share, tenant[1], self.config.batches.interactive_reserve
            )
            if repair is not None:
                try:
                    self._ddb.update_item(**repair)
                except ClientError as exc:
                    if not codec.condition_failed(exc):
                        raise
                return self._claim(job_id, owner, lease_seconds, tenant)
        return claim

    def _claim(
        self, job_id: str, owner: str, lease_seconds: float, tenant: tuple[str, str] | None = None
    ) -> Claim:
        """One transaction: the job's conditional claim and a slot of its tenant's share in
        its lane, then one consistent read of the job as claimed, input included (gathered with the
        reads of the batch's other claims: `llmq.read_gathering`).

        `tenant` is (tenant id, lane) from the message; without it (a message from before
        shares) the job is read first to learn them. A job accepted before shares is claimed
        alone, as then. A refused claim reports the job as found; `Claim.outcome` says why.
        A tenant at its cap is `Claim.share`, the share as the refused condition found it.
        Our own claim, applied on a try whose answer was lost, is recognised by its lease owner.
        """
        now = self.now_ms()
        if tenant is None:
            found = self.find(job_id)
            if found is None:
                return Claim(claimed=False, job=None, at_ms=now)
            tenant = (found.tenant_id, found.lane)
        tenant_id, lane = tenant
        lease_until = now + int(lease_seconds * 1000)
        sets, _, sweep = self._sweep(
            job_id, lease_until + self.config.reconciler.expired_lease_grace_seconds * 1000
        )
        expression = (
            "SET #st = :running, lease_owner = :owner, lease_expires_ms = :lease, "
            f"started_ms = if_not_exists(started_ms, :now), claimed_ms = :now, {', '.join(sets)} "
            "ADD attempts :one "
            # Dead letters count only while no worker has claimed the job.
            "REMOVE dead_letter_ids"
        )
        values: dict[str, Any] = {
            "running": "running",
            "queued": "queued",
            "owner": owner,
            "lease": lease_until,
            "now": now,
            "retire_s": now // 1000 + self.config.reconciler.retention_margin_seconds,
            "one": 1,
            "max": self.config.max_attempts,
            "false": False,
            **sweep,
        }
        # Only a job accepted under shares, of the tenant and lane whose slot it takes
        # (SHARED is a DynamoDB reserved word).
        update = self._job_update(
            job_id,
            expression,
            _SHARED_CLAIM + _CLAIM_CONDITION,
            {"#st": "status", "#shared": "shared"},
            {**values, "true": True, "tenant": tenant_id, "lane": lane},
        )
        item_of = batches.batch_of(job_id)
        items = [
            update,
            shares.hold(self.table_name, tenant_id, lane, job_id, now, batch_item=item_of is not None),
        ]
        if item_of is not None:
            # A batch's item is claimed only while its batch is not canceling: no extra call.
            items.append(batches.not_canceled(self.table_name, item_of[0]))
        gathered = self.claimed_reads.claim(job_id)

        def owned() -> None:
            # (a share found without the lane's holders, or none at all: the job is read before
            # a share is repaired, so a message naming another tenant writes nothing to its)
            found = self.find(job_id)
            if found is not None and found.shared and (found.tenant_id, found.lane) != (tenant_id, lane):
                raise _Foreign(found)

        try:
            self._transact_sharing(items, tenant_id, lane, calling=gathered.calling, owned=owned)
        except _Foreign as exc:
            return Claim(claimed=False, job=exc.job, at_ms=now, foreign=True)
        except _Canceled as exc:
            if exc.failed(0):
                found = exc.job()
                if found is not None and not found.shared:
                    return self._claim_unshared(job_id, expression, values, owner, now)
                if found is not None and (found.tenant_id, found.lane) != (tenant_id, lane):
                    # The message named another tenant or lane than its job's: the condition
                    # refused it for that, not for the job's state (hunt 316: a crashed job
                    # with attempts left was failed as crashed for good, a due one retried
                    # every second into the DLQ).
                    return Claim(claimed=False, job=found, at_ms=now, foreign=True)
                if exc.failed(2) and found is not None and found.status is JobStatus.QUEUED:
                    # Its batch is canceling too (and it is, say, near its retention): it
                    # ends canceled, as its batch asked.
                    return Claim(claimed=False, job=found, at_ms=now, batch_canceled=True)
                ours = found is not None and found.status is JobStatus.RUNNING and found.lease_owner == owner
                return Claim(
                    claimed=ours,
                    job=found,
                    at_ms=now,
                    retention_margin_s=self.config.reconciler.retention_margin_seconds,
                )
            if exc.failed(2):
                return Claim(claimed=False, job=self.find(job_id), at_ms=now, batch_canceled=True)
            return Claim(
                claimed=False, job=None, at_ms=now, share=ShareState.from_item(tenant_id, exc.item(1))
            )
        try:
            item = gathered.read()
        except StoreUnavailable:
            # A gathered request failed: this job's own read, rather than its whole claim
            # again (which, for every job it carried at once, would meet on the share item).
            item = self._read_items([job_id]).get(job_id)
        claimed = self._live(item)
        if claimed is None or claimed.lease_owner != owner:
            # Taken over between the two calls: only possible once our lease lapsed.
            return Claim(claimed=False, job=claimed, at_ms=now)
        return Claim(claimed=True, job=claimed, at_ms=now)

    def _claim_unshared(
        self, job_id: str, expression: str, values: dict[str, Any], owner: str, now: int
    ) -> Claim:
        """A job accepted before shares existed: claimed alone, with no slot, as it was then."""
        try:
            response = self._ddb.update_item(
                **self._job_update(job_id, expression, _CLAIM_CONDITION, {"#st": "status"}, values)["Update"],
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if not codec.condition_failed(exc):
                raise
            old = codec.old_item(exc)
            ours = old is not None and old.status is JobStatus.RUNNING and old.lease_owner == owner
            return Claim(
                claimed=ours,
                job=old,
                at_ms=now,
                retention_margin_s=self.config.reconciler.retention_margin_seconds,
            )
        return Claim(claimed=True, job=codec.from_item(response["Attributes"]), at_ms=now)

    # ---- terminal and retry writes ------------------------------------------------------

    def complete(
        self,
        job: JobRecord,
        owner: str,
        *,
        result: JobResult | None = None,
        result_ref: str | None = None,
        timed: bool = True,
    ) -> JobRecord:
        """Fenced: only the worker holding the lease may record the result, inline or by reference.
        `timed` False: this attempt did not run the generation (a parked result), so its time is
        no run time for the tenant's deferrals."""
        return self._finish_leased(
            job, owner, JobStatus.SUCCEEDED, result=result, result_ref=result_ref, timed=timed
        )

    def fail_leased(self, job: JobRecord, owner: str, error: JobError) -> JobRecord:
        """Fenced as `complete`, and refused while the client has asked to cancel, with
        CancelRequested (the lease still ours): a failure (the call's, or one an earlier
        attempt parked) is never written over a cancel the client was answered 202 before it
        was recorded, even one that came while this write was retried through a throttle."""
        return self._finish_leased(job, owner, JobStatus.FAILED, error=error, unless_canceled=True)

    def cancel_leased(self, job: JobRecord, owner: str) -> JobRecord:
        return self._finish_leased(job, owner, JobStatus.CANCELED)

    def requeue(
        self, job: JobRecord, owner: str, error: JobError, delay_seconds: float, *, refused: bool = False
    ) -> JobRecord:
        """A transient failure: back to queued with the attempt count kept, lease released;
        `refused`: the provider refused the attempt before generating, which is refunded and
        counted as a refusal (`RetryPolicy.max_refusals`).

        Raises CancelRequested, with the lease still ours, when the client asked to cancel
        meanwhile: such a job must end canceled, never reach the provider again.
        """
        return self._back_to_queued(job, owner, delay_seconds, error=error, refused=refused)

    def release(self, job: JobRecord, owner: str, delay_seconds: float) -> JobRecord:
        """Hand a claimed job back before the provider was called: the attempt is refunded."""
        return self._back_to_queued(job, owner, delay_seconds, error=None)

    def _back_to_queued(
        self,
        job: JobRecord,
        owner: str,
        delay_seconds: float,
        error: JobError | None,
        *,
        refused: bool = False,
    ) -> JobRecord:
        now = self.now_ms()
        visible_at = now + int(delay_seconds * 1000)
        token = f"{owner}#{'release' if error is None else 'refused' if refused else 'requeue'}"
        sweep_sets, _, sweep = self._sweep(job.id, self._queued_due(visible_at, job.deadline_ms))
        sets = f"SET #st = :queued, {', '.join(sweep_sets)}, not_before_ms = :not_before, last_write = :token"
        values: dict[str, Any] = {
            "queued": "queued",
            "running": "running",
            "owner": owner,
            "not_before": visible_at,
            "token": token,
            "false": False,
            **sweep,
        }
        names = {"#st": "status"}
        expression = f"{sets} REMOVE lease_owner, lease_expires_ms ADD attempts :refund"
        values["refund"] = -1
        if error is not None:
            names["#err"] = "error"
            values["error"] = error.model_dump_json()
            expression = f"{sets}, #err = :error REMOVE lease_owner, lease_expires_ms"
            if refused:
                expression += " ADD attempts :refund, refusals :one"
                values["one"] = 1
            else:
                del values["refund"]
        update = self._job_update(
            job.id,
            expression,
            "lease_owner = :owner AND #st = :running AND "
            "(attribute_not_exists(cancel_requested) OR cancel_requested = :false)",
            names,
            values,
        )
        try:
            self._transact_leaving(job, update, ends=False)
        except _Canceled as exc:
            old = exc.job()
            if old is not None and old.last_write == token and old.status is JobStatus.QUEUED:
                return old
            if old is not None and old.lease_owner == owner and old.status is JobStatus.RUNNING:
                raise CancelRequested(job.id) from exc
            raise LeaseLost(job.id) from exc
        changes: dict[str, Any] = {
            "status": JobStatus.QUEUED,
            "not_before_ms": visible_at,
            "last_write": token,
            "lease_owner": None,
            "lease_expires_ms": None,
        }
        if error is not None:
            changes["error"] = error
        if error is None or refused:
            changes["attempts"] = job.attempts - 1
        if refused:
            changes["refusals"] = job.refusals + 1
        return job.model_copy(update=changes)

    def _finish_leased(
        self,
        job: JobRecord,
        owner: str,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        result_ref: str | None = None,
        timed: bool = True,
        unless_canceled: bool = False,
    ) -> JobRecord:
        condition = "lease_owner = :owner AND #st = :running"
        values: dict[str, Any] = {"owner": owner, "running": "running"}
        if unless_canceled:
            condition += f" AND {_NOT_CANCELED}"
            values["false"] = False
        try:
            return self._finish(
                job,
                status,
                condition=condition,
                values=values,
                # The lease owner is unique to this invocation and message, so it names the write.
                token=f"{owner}#{status.value}",
                result=result,
                error=error,
                result_ref=result_ref,
                timed=timed,
            )
        except _ConditionFailed as exc:
            old = exc.old
            if (
                unless_canceled
                and old is not None
                and old.lease_owner == owner
                and old.status is JobStatus.RUNNING
            ):
                raise CancelRequested(job.id) from exc
            raise LeaseLost(job.id) from exc

    def _finish(
        self,
        job: JobRecord,
        status: JobStatus,
        *,
        condition: str,
        values: dict[str, Any],
        token: str | None = None,
        result: JobResult | None = None,
        error: JobError | None = None,
        result_ref: str | None = None,
        timed: bool = True,
    ) -> JobRecord:
        """The one terminal write. It sets the delivery to pending when the event is subscribed.
        `timed` False: no run of this write's attempt produced what it records (a parked result).

        A retry of a write that was applied finds its own token and returns the job as written.
        """
        token = token or codec.write_token(status.value)
        now = self.now_ms()
        sets = ["#st = :status", "finished_ms = :now", "last_write = :token"]
        # Ended near the end of its retention: the item, which the dispatcher and a poll read,
        # outlives its terminal event's retries, or the event would find no job. Not one past
        # it (a stale message's look): its id may be taken again (an Idempotency-Key reused),
        # and a new job or batch item under it must not find the old one in its way.
        outlive = now // 1000 + self.config.terminal_event_seconds
        keep_until_s = outlive if now // 1000 < job.expires_at < outlive else None
        if keep_until_s is not None:
            sets.append("expires_at = :keep_until")
            values = {**values, "keep_until": keep_until_s}
        removes = ["lease_owner", "lease_expires_ms"]
        if job.stream:
            # What a poll shows of a running job; the result (or the error) says the rest, and
            # every later write of the item (the delivery records) stops paying for it.
            removes += ["output_partial", "output_partial_truncated", "progress_tokens", "progress_ms"]
            if not timed:
                # What an earlier attempt paid for and parked: the chunks, which may hold another
                # attempt's text, are no prefix of it, so a reader is served it whole, as a reset
                # (`live_output.tail_deltas`).
                removes.append("stream_attempt")
        all_values: dict[str, Any] = {"status": status.value, "now": now, "token": token, **values}
        names = {"#st": "status"}
        if result is not None:
            sets.append("#res = :result")
            names["#res"] = "result"
            all_values["result"] = codec.json_text(result.model_dump(mode="json"))
        if result_ref is not None:
            sets.append("result_ref = :result_ref")
            all_values["result_ref"] = result_ref
        if error is not None:
            sets.append("#err = :error")
            names["#err"] = "error"
            all_values["error"] = codec.json_text(error.model_dump(mode="json"))
        elif status is JobStatus.SUCCEEDED or status is JobStatus.CANCELED:
            removes.append("#err")
            names["#err"] = "error"
        if status is JobStatus.CANCELED:
            # Said in the write, so the job it returns (which the webhook message carries) is
            # the job stored, whoever asked for the cancel and whenever.
            sets.append("cancel_requested = :cancel_requested")
            all_values["cancel_requested"] = True
        # A subscribed event keeps the job in the sweep index until its delivery settles.
        wanted = job.wants(EVENT_FOR_STATUS[status])
        if wanted:
            sets.append("delivery_status = :pending")
            all_values["pending"] = DeliveryStatus.PENDING.value
        sweep_sets, sweep_removes, sweep = self._sweep(
            job.id, now + self.config.reconciler.stale_webhook_seconds * 1000 if wanted else None
        )
        sets += sweep_sets
        removes += sweep_removes
        all_values.update(sweep)
        expression = f"SET {', '.join(sets)} REMOVE {', '.join(removes)}"
        update = self._job_update(job.id, expression, condition, names, all_values)
        try:
            # The job is no longer active, and gives back its slot if it held one.
            self._transact_leaving(job, update, ends=True, status=status, timed=timed)
        except _Canceled as exc:
            old = exc.job()
            if old is not None and old.last_write == token and old.status is status:
                return old
            raise _ConditionFailed(old) from exc
        changes: dict[str, Any] = {
            "status": status,
            "finished_ms": now,
            "last_write": token,
            "lease_owner": None,
            "lease_expires_ms": None,
        }
        if keep_until_s is not None:
            changes["expires_at"] = keep_until_s
        if job.stream and not timed:
            changes["stream_attempt"] = None
        if result is not None:
            changes["result"] = result
        if result_ref is not None:
            changes["result_ref"] = result_ref
        if error is not None:
            changes["error"] = error
        elif status is JobStatus.SUCCEEDED or status is JobStatus.CANCELED:
            changes["error"] = None
        if status is JobStatus.CANCELED:
            changes["cancel_requested"] = True
        if wanted:
            changes["delivery_status"] = DeliveryStatus.PENDING
        return job.model_copy(update=changes)

    def _finish_if(self, job: JobRecord, status: JobStatus, **finish: Any) -> JobRecord | None:
        """A terminal write that may find the job moved on: None then, not an error."""
        try:
            return self._finish(job, status, **finish)
        except _ConditionFailed:
            return None

    def _update_if_status(
        self,
        job_id: str,
        status: JobStatus,
        expression: str,
        values: dict[str, Any],
        condition: str | None = None,
    ) -> JobRecord | None:
        """One UpdateItem that applies only while the job is in `status` (and `condition`
        holds); None otherwise."""
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression=expression,
                ConditionExpression="#st = :expected" + (f" AND {condition}" if condition else ""),
                ExpressionAttributeNames={"#st": "status"},
                ExpressionAttributeValues={":expected": {"S": status.value}, **values},
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if codec.condition_failed(exc):
                return None
            raise
        return codec.from_item(response["Attributes"])

    def expire(self, job: JobRecord, error: JobError) -> JobRecord | None:
        """A queued job whose deadline passed before a worker started (or restarted) it; one
        asked to cancel since `job` was read ends canceled instead (`_or_canceled`)."""
        return self._or_canceled(
            job,
            JobStatus.EXPIRED,
            condition="#st = :queued AND deadline_ms <= :now",
            values={"queued": "queued"},
            error=error,
        )

    def _or_canceled(self, job: JobRecord, status: JobStatus, **finish: Any) -> JobRecord | None:
        """A terminal write of a job no live worker holds, unless a cancel was asked since `job`
        was read (the client's cancel landed between that read and this write, with no provider
        call in flight): it then ends canceled, as asked, not failed or expired over the
        cancel. None when the job moved on otherwise."""
        finish["condition"] += f" AND {_NOT_CANCELED}"
        finish["values"] = {**finish["values"], "false": False}
        try:
            return self._finish(job, status, **finish)
        except _ConditionFailed as exc:
            if exc.old is not None and exc.old.cancel_requested and not exc.old.status.is_terminal:
                return self.cancel_unleased(job)
            return None

    def fail_unleased(self, job: JobRecord, error: JobError) -> JobRecord | None:
        """Fail a running job that no live worker holds (dead letters, exhausted crash recovery)."""
        return self._or_canceled(
            job,
            JobStatus.FAILED,
            condition="#st = :running AND "
            "(attribute_not_exists(lease_expires_ms) OR lease_expires_ms < :now)",
            values={"running": "running"},
            error=error,
        )

    def end_with_parked(
        self,
        job: JobRecord,
        *,
        result: JobResult | None = None,
        result_ref: str | None = None,
        error: JobError | None = None,
    ) -> JobRecord | None:
        """A job that ran before, no live worker holds (queued again, or running with its
        lease lapsed), whose earlier attempt paid and parked what it paid for
        (`Offload.record_parked`): it succeeds with that result, or fails with that billed
        `error`, and gives back its tenant's slot if it held one. The job read, not a new one
        under its id (an Idempotency-Key used again after its retention). A failure carries
        nothing paid for to deliver: asked to cancel meanwhile, the job ends canceled instead
        (`_or_canceled`), as `fail_leased` would leave it."""
        end = self._finish_if if error is None else self._or_canceled
        return end(
            job,
            JobStatus.FAILED if error is not None else JobStatus.SUCCEEDED,
            condition="created_ms = :created AND (#st = :queued OR (#st = :running AND "
            "(attribute_not_exists(lease_expires_ms) OR lease_expires_ms < :now)))",
            values={"queued": "queued", "running": "running", "created": job.created_ms},
            result=result,
            result_ref=result_ref,
            error=error,
            timed=False,
        )

    def cancel_unleased(self, job: JobRecord) -> JobRecord | None:
        """A job asked to cancel that no live worker holds: record it canceled."""
        return self._finish_if(
            job,
            JobStatus.CANCELED,
            condition="cancel_requested = :true AND (#st = :queued OR "
            "(#st = :running AND (attribute_not_exists(lease_expires_ms) OR lease_expires_ms < :now)))",
            values={"queued": "queued", "running": "running", "true": True},
        )

    def expire_at_retention(self, job: JobRecord, error: JobError) -> JobRecord | None:
        """A job still queued, or running with no live worker, within the reconciler's margin of
        the end of its retention (or past it, not yet deleted): it ends expired, and gives back
        its tenant's slot and quota in the same transaction, before DynamoDB's TTL deletes the
        item and leaves them counted for good. The item is then kept for as long as its
        webhook's retries take (`_finish`), so the `job.expired` event and a poll find it."""
        return self._or_canceled(
            job,
            JobStatus.EXPIRED,
            condition="expires_at <= :soon_s AND (#st = :queued OR (#st = :running AND "
            "(attribute_not_exists(lease_expires_ms) OR lease_expires_ms < :now)))",
            values={
                "queued": "queued",
                "running": "running",
                "soon_s": self.now_ms() // 1000 + self.config.reconciler.retention_margin_seconds,
            },
            error=error,
        )

    def recover(self, job: JobRecord) -> JobRecord | None:
        """A running job whose worker vanished (its lease lapsed) goes back to queued and gives
        its slot back; its attempt stays counted. None when it moved on meanwhile.

        Its sweep entry goes to the front (`SWEEP_RECOVERED_MS`) in the same write: it has no
        message until the caller sends one, and then postpones the entry (`postpone_sweep`), so
        no fault or cut in between leaves it queued with no message for the lane's deficit to
        hide."""
        now = self.now_ms()
        token = codec.write_token("recover")
        sets, _, sweep = self._sweep(job.id, SWEEP_RECOVERED_MS)
        update = self._job_update(
            job.id,
            f"SET #st = :queued, last_write = :token, {', '.join(sets)} "
            "REMOVE lease_owner, lease_expires_ms, not_before_ms",
            "#st = :running AND lease_expires_ms < :now",
            {"#st": "status"},
            {"queued": "queued", "running": "running", "token": token, "now": now, **sweep},
        )
        try:
            self._transact_leaving(job, update, ends=False)
        except _Canceled as exc:
            old = exc.job()
            if old is not None and old.last_write == token:
                return old
            return None
        return job.model_copy(
            update={
                "status": JobStatus.QUEUED,
                "last_write": token,
                "lease_owner": None,
                "lease_expires_ms": None,
                "not_before_ms": None,
            }
        )

    def note_dead_letter(self, job: JobRecord, message_id: str, redrive_round: int = 0) -> JobRecord | None:
        """A queued job whose message dead-lettered before any claim: note it, keep it queued.

        Idempotent per DLQ message: the same letter handled twice (a retry of this write, a
        redelivered DLQ record) counts once. None when the job is no longer queued, or when
        the message was sent in a round already answered (`redrive_round`, from its body:
        `policy.fresh_letter_condition`), in the one conditional update that counts.
        """
        ids = {":ids": {"SS": [message_id]}}
        counted = self._update_if_status(
            job.id,
            JobStatus.QUEUED,
            f"ADD dead_letter_ids :ids, {COUNTED_LETTERS} :ids, redrive_round :one",
            {
                **ids,
                ":round": {"N": str(redrive_round)},
                ":one": {"N": "1"},
                ":letter": {"S": message_id},
            },
            fresh_letter_condition(redrive_round),
        )
        if counted is not None:
            return counted
        # This letter handled again (its re-send cut short): it still counts, once.
        return self._update_if_status(
            job.id,
            JobStatus.QUEUED,
            "ADD dead_letter_ids :ids",
            {**ids, ":letter": {"S": message_id}},
            "contains(dead_letter_ids, :letter)",
        )

    def fail_queued_dead_letter(self, job: JobRecord, error: JobError) -> JobRecord | None:
        """A queued job whose every message dead-lettered: no worker can even claim it; one
        asked to cancel since `job` was read ends canceled instead (`_or_canceled`)."""
        return self._or_canceled(
            job,
            JobStatus.FAILED,
            condition="#st = :queued AND size(dead_letter_ids) >= :limit",
            values={"queued": "queued", "limit": len(job.dead_letter_ids)},
            error=error,
        )

    # ---- cancel (API) -------------------------------------------------------------------

    def cancel_queued(self, job: JobRecord, token: str) -> JobRecord | None:
        """A queued job canceled at once; None when it left queued meanwhile."""
        return self._finish_if(
            job, JobStatus.CANCELED, condition="#st = :queued", values={"queued": "queued"}, token=token
        )

    def request_cancel(self, job: JobRecord, status: JobStatus = JobStatus.RUNNING) -> JobRecord | None:
        """A running job flagged for its worker to stop; None when it is no longer running.
        (`status` queued: a queued job flagged for what ends it unrun, its next claim or the
        reconciler, when the API cannot end it at once: `JobIntake._cancel`. Its sweep entry
        goes to the front (`SWEEP_CANCEL_ASKED_MS`): its own message may be hidden for a
        retry's backoff, up to 12 hours, and the reconciler's next run sends it one its claim
        ends canceled.)

        Idempotent: a retried write finds the job running with the flag already set. A
        streaming job's output transaction holds the item for a moment every interval: a
        write that meets it is tried again at once, a few times, rather than answered 503.
        """
        for attempt in range(_TRANSACTION_TRIES):
            try:
                sets, values = "SET cancel_requested = :true", {":true": {"BOOL": True}}
                if status is JobStatus.QUEUED:
                    sets, values = (
                        f"{sets}, sweep_at = :first",
                        {**values, **codec.values(first=SWEEP_CANCEL_ASKED_MS)},
                    )
                return self._update_if_status(job.id, status, sets, values)
            except StoreUnavailable as exc:
                cause = getattr(exc.__cause__, "response", None) or {}
                conflict = cause.get("Error", {}).get("Code") == "TransactionConflictException"
                if not conflict or attempt + 1 == _TRANSACTION_TRIES:
                    raise
                time.sleep(_CONFLICT_PAUSE_SECONDS * (1 + self._rng.random()))
        return None

    def is_cancel_requested(self, job_id: str) -> bool:
        response = self._ddb.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": job_id}},
            ProjectionExpression="cancel_requested",
            ConsistentRead=True,
        )
        return bool(response.get("Item", {}).get("cancel_requested", {}).get("BOOL", False))

    # ---- live output (llmq.live_output) -------------------------------------------------

    def write_output(self, job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        """One transaction: chunk `chunk.seq` and the job's progress, fenced by our lease, the
        chunk before it, and (unless `final`: the generation is over and paid for) no cancel.
        So the write that keeps the output tells the worker of a cancel (CancelRequested) or a
        lost lease (LeaseLost) without a read of its own; a retry of a write that was applied
        but unanswered finds its chunk counted and returns.
        """
        now = self.now_ms()
        sets = [
            "stream_seq = :seq",
            "stream_attempt = :attempt",
            "stream_chars = :chars",
            "progress_tokens = :tokens",
            "progress_ms = :now",
            "output_partial = :partial",
            "output_partial_truncated = :truncated",
        ]
        condition = "lease_owner = :owner AND #st = :running AND " + (
            "(attribute_not_exists(stream_seq) OR stream_seq = :previous)"
        )
        if not final:
            condition += " AND (attribute_not_exists(cancel_requested) OR cancel_requested = :false)"
        values: dict[str, Any] = {
            "seq": chunk.seq,
            "previous": chunk.seq - 1,
            "attempt": chunk.attempt,
            "chars": chunk.chars,
            "tokens": chunk.tokens,
            "now": now,
            "partial": chunk.partial,
            "truncated": chunk.truncated,
            "owner": owner,
            "running": "running",
        }
        if not final:
            values["false"] = False
        if chunk.opens:
            sets.append("stream_from = :seq")
        update = self._job_update(job.id, "SET " + ", ".join(sets), condition, {"#st": "status"}, values)
        put = {
            "Put": {
                "TableName": self.table_name,
                "Item": codec.output_chunk_item(
                    job, chunk, now // 1000 + self.config.streaming.chunk_ttl_seconds
                ),
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        }
        try:
            self._transact([update, put])
        except _Canceled as exc:
            if not exc.failed(0):
                # Only the chunk's own condition failed: its key is taken (it names the job's
                # creation, so no earlier job of the same id can hold it). Not ours to judge.
                raise StoreUnavailable(f"chunk {chunk.seq} of job {job.id} exists") from exc
            old = exc.job()
            ours = old is not None and old.lease_owner == owner and old.status is JobStatus.RUNNING
            if ours and old is not None and (old.stream_seq or 0) >= chunk.seq:
                return
            if ours and old is not None and old.cancel_requested:
                raise CancelRequested(job.id) from exc
            raise LeaseLost(job.id) from exc

    def output_head(self, job_id: str) -> OutputHead | None:
        """A poll of a job's output: where the job stands and how far its output is. Strongly
        consistent, so a status never steps back (a projection does not make a read cheaper:
        it costs by the item's size, which `stream: true` keeps small)."""
        response = self._ddb.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": job_id}},
            ProjectionExpression="tenant_id, #st, stream_seq, expires_at",
            ExpressionAttributeNames={"#st": "status"},
            ConsistentRead=True,
        )
        item = response.get("Item")
        if not item:
            return None
        data = codec.plain(item)
        if int(data["expires_at"]) <= int(self._clock()):
            return None
        return OutputHead(
            tenant_id=str(data["tenant_id"]),
            status=JobStatus(data["status"]),
            stream_seq=int(data.get("stream_seq") or 0),
            expires_at=int(data["expires_at"]),
        )

    def read_output(
        self, job: JobRecord, first: int, last: int, *, limit: int = OUTPUT_PAGE
    ) -> list[OutputDelta]:
        """Chunks from `first` to `last`, in order, `limit` at most (a BatchGetItem's keys).

        Chunks expire (their TTL) in the order they were written, so those gone come first:
        an earlier attempt's, retried later than a chunk's TTL. They are skipped, a page at a
        time if need be, and what is read starts at the oldest chunk left; none left is [].
        The run ends at the first chunk a throttled read did not return (the client's next
        request reads on from there); when that is the first, StoreUnavailable."""
        # (the first page as large as what may be returned; the ones skipped past, whole pages)
        size = max(1, min(limit, OUTPUT_PAGE))
        start = first
        while start <= last:
            seqs = range(start, min(last, start + size - 1) + 1)
            size = OUTPUT_PAGE
            found, unread = self._read_chunks(job, seqs)
            deltas: list[OutputDelta] = []
            for seq in seqs:
                if seq in found:
                    deltas.append(found[seq])
                elif seq in unread or deltas:
                    break
            if deltas:
                return deltas[: max(1, limit)]
            if unread:
                raise StoreUnavailable("DynamoDB left the job's output unread (throttled)")
            start = seqs[-1] + 1
        return []

    def _read_chunks(self, job: JobRecord, seqs: range) -> tuple[dict[int, OutputDelta], set[int]]:
        """The chunks `seqs` still there, by seq, and the seqs a throttled read left unread."""
        keys = [{"pk": {"S": chunk_pk(job, seq)}} for seq in seqs]
        found: dict[int, OutputDelta] = {}
        request: dict[str, Any] = {self.table_name: {"Keys": keys, "ConsistentRead": True}}
        now_s = int(self._clock())
        for _ in range(3):
            response = self._ddb.batch_get_item(RequestItems=request)
            for item in response.get("Responses", {}).get(self.table_name, []):
                if int(item["expires_at"]["N"]) <= now_s:
                    continue  # past its TTL, not yet deleted: gone (DESIGN §3)
                delta = codec.output_delta(item)
                found[delta.seq] = delta
            request = response.get("UnprocessedKeys") or {}
            if not request:
                break
        pending = {key["pk"]["S"] for key in (request.get(self.table_name) or {}).get("Keys", [])}
        return found, {seq for seq in seqs if chunk_pk(job, seq) in pending}

    # ---- webhook delivery ---------------------------------------------------------------

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
        """One UpdateItem per delivery attempt. Pending keeps the job in the reconciler's index.
        With the job's `expires_at` as read, a next attempt due after it (a receiver's long
        Retry-After near the end of the retention) keeps the job until then, or that attempt
        would find no job; with its `created_ms`, never past its retention and
        `delivery_keep_seconds`.
        A pending one names the message that carries its next attempt (`carrier`), if known.

        `attempt` goes into the delivery log in the same write, in the slot of `log_seq` (the
        job's `delivery_log_seq` as the dispatcher read it) if the log has not moved on since,
        else after its stored latest (`job_codec.written_in_the_log`: another copy's entry, or a
        redelivery's new round's, which a late answer of the old round would overwrite; review
        209), and the sequence moves on: the item keeps the latest ten and no more.

        Only a pending delivery moves; `delivered`, `failed` and `disabled` are final until
        a redelivery sets pending again (a late success may still turn `failed` into
        `delivered`). False when the write was refused: a duplicate message's late outcome.
        With `previous_attempts`, a failed attempt (pending or failed) counts only if the job
        still shows that many: a copy of the message that counted the same attempt first wins.
        A pending delivery keeps when its next attempt is due, by the dispatcher's clock
        (`next_attempt_at_ms`) or else this store's.
        """
        now = self.now_ms()
        keep_for: int | None = None
        sets = ["delivery_status = :status", "delivery_last_status_code = :code"]
        values: dict[str, Any] = {
            "status": status.value,
            "code": status_code,
            "one": 1,
            "pending": DeliveryStatus.PENDING.value,
        }
        adds = ["delivery_attempts :one"]
        if attempt is not None:
            sets.append(f"{codec.delivery_log_slot(log_seq)} = :log")
            values["log"] = {**attempt.model_dump(mode="json", exclude_none=True), "seq": log_seq}
            adds.append(f"{codec.DELIVERY_LOG_SEQ} :one")
        # A fresh token per attempt: a retry of this write that finds it was applied already.
        token = codec.write_token("delivery")
        sets.append("delivery_write = :token")
        values["token"] = token
        condition = "delivery_status = :pending"
        # (the condition's statuses and count, but for the log's sequence, as read back)
        statuses: set[str] = {values["pending"]}
        counts: tuple[int, int | None] = (0, None)
        if previous_attempts is not None and status in (DeliveryStatus.PENDING, DeliveryStatus.FAILED):
            condition += " AND (delivery_attempts = :previous" + (
                " OR attribute_not_exists(delivery_attempts))" if previous_attempts == 0 else ")"
            )
            values["previous"] = previous_attempts
            counts = (previous_attempts, previous_attempts)
        # A final answer (a success, a 410) counts its own attempt once: the copy that POSTed it
        # beside this one (one receive handed over twice, the receiver failing the other POST)
        # may have counted it. One with no attempt (410 to an earlier event) counts none.
        final = status in (DeliveryStatus.DELIVERED, DeliveryStatus.DISABLED)
        counts_as = attempt.attempt if final and attempt is not None else None
        if status is DeliveryStatus.DELIVERED:
            sets.append("delivered_ms = :now")
            values["now"] = now
        if status is DeliveryStatus.DELIVERED or counts_as is not None:
            # (a late answer to an attempt still counts after the delivery failed: a success,
            # or a 410 to the last attempt beside its twin's 500)
            condition = "delivery_status IN (:pending, :failed)"
            values["failed"] = DeliveryStatus.FAILED.value
            statuses, counts = {values["pending"], values["failed"]}, (0, None)
        if counts_as is not None or (status is DeliveryStatus.DISABLED and attempt is None):
            adds.remove("delivery_attempts :one")
        if counts_as is not None:
            values["attempts"] = counts_as
            values["before"] = counts_as - 1
        due = None
        if status is DeliveryStatus.PENDING:
            wait_ms = int((next_attempt_in_seconds or 0) * 1000)
            due = now + wait_ms + self.config.reconciler.stale_webhook_seconds * 1000
            # When the next attempt is due: a copy of the message that comes sooner waits.
            sets.append("delivery_next_ms = :next")
            values["next"] = next_attempt_at_ms if next_attempt_at_ms is not None else now + wait_ms
            keep_until_s = values["next"] // 1000 + 3 * self.config.reconciler.stale_webhook_seconds
            if created_ms is not None:
                keep_until_s = min(keep_until_s, self.config.kept_until_s(created_ms))
            if (
                expires_at is not None
                and now // 1000 < expires_at < keep_until_s
                and not batches.batch_of(job_id)
            ):
                keep_for = keep_until_s
        sweep_sets, removes, sweep = self._sweep(job_id, due)
        if status is DeliveryStatus.PENDING and carrier is not None:
            sets.append("delivery_carrier = :carrier")
            values["carrier"] = carrier
        else:
            removes = [*removes, "delivery_carrier"]
        if status is not DeliveryStatus.PENDING:
            removes = [*removes, "delivery_next_ms"]
        sets += sweep_sets
        values.update(sweep)

        def expression(sets: list[str], adds: list[str]) -> str:
            update = f"SET {', '.join(sets)}" + (f" ADD {', '.join(adds)}" if adds else "")
            return update + (f" REMOVE {', '.join(removes)}" if removes else "")

        if keep_for is not None:
            # First: once the attempt is recorded its message hides until the attempt is due,
            # so a keep that failed after it (throttled, or the record's answer lost) would
            # never be written again, and the attempt would find no job. A keep whose record
            # then fails only keeps the job a while longer.
            self._keep_until(job_id, keep_for)
        # The token check also keeps a retried pending write from counting twice.
        condition = (
            f"attribute_exists(pk) AND {condition} AND "
            "(attribute_not_exists(delivery_write) OR delivery_write <> :token)"
        )
        logged = log_seq if attempt is not None else None

        def written(
            extra: list[str],
            adds: list[str],
            condition: str,
            counts: tuple[int, int | None],
            at: int | None = None,
        ) -> Mapping[str, Any] | None:
            def write(sets: list[str], condition: str) -> Mapping[str, Any] | None:
                update = expression([*sets, *extra], adds)
                return self._record_delivery_write(job_id, update, condition, values, token)

            def holds(old: Mapping[str, Any]) -> bool:
                return codec.delivery_holds(old, statuses, *counts)

            return codec.written_in_the_log(write, sets, condition, values, logged, holds, at)

        if counts_as is None:
            return written([], adds, condition, counts) is None
        # Its own attempt, or the one before it: the count is this attempt's number.
        counted = (
            condition
            + " AND (delivery_attempts BETWEEN :before AND :attempts"
            + (" OR attribute_not_exists(delivery_attempts))" if counts_as == 1 else ")")
        )
        old = written(["delivery_attempts = :attempts"], adds, counted, (counts_as - 1, counts_as))
        if old is None:
            return True
        if old.get("delivery_status", {}).get("S") not in statuses:
            return False
        stored = int(old.get("delivery_attempts", {}).get("N", "0"))
        if counts_as - 1 <= stored <= counts_as:
            return False  # (refused on nothing it can follow: not a count that moved)
        # Another copy counted a later attempt since (the count stays its), or a redelivery
        # started a new round since this attempt was read (it counts as one of that round's):
        # the answer stands either way, while the count is still what was read; its log entry
        # goes after the stored latest, which may be the new round's.
        values["stored"] = stored
        moved = adds if stored > counts_as else [*adds, "delivery_attempts :one"]
        held = condition + " AND delivery_attempts = :stored"
        return written([], moved, held, (stored, stored), codec.stored_log_seq(old)) is None

    def _record_delivery_write(
        self, job_id: str, update: str, condition: str, values: dict[str, Any], token: str
    ) -> Mapping[str, Any] | None:
        """One delivery record's UpdateItem: None when it was applied (or was this one's own
        write, applied with its answer lost), else the item as its condition found it."""
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeValues=codec.values(**codec.named_values(values, update, condition)),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if not codec.condition_failed(exc):
                raise
            old: dict[str, Any] = exc.response.get("Item") or {}  # type: ignore[assignment]
            return None if old.get("delivery_write", {}).get("S") == token else old
        return None

    def _keep_until(self, job_id: str, until_s: int) -> None:
        """The job is kept until `until_s` at least (its retention only ever moves out: a write
        of its own, never shortening what a redelivery just kept)."""
        self._set_if(job_id, "expires_at = :until", "expires_at < :until", {":until": {"N": str(until_s)}})

    def mark_webhook_gone(self, job_id: str) -> None:
        """The receiver answered 410 Gone to an event of the job that is not recorded (job.started,
        job.output): its later events, the terminal one included, are not POSTed."""
        self._set_if(job_id, "webhook_gone = :true", None, {":true": {"BOOL": True}})

    def _set_if(self, job_id: str, sets: str, condition: str | None, values: dict[str, Any]) -> None:
        """One UpdateItem of an existing job (and `condition`); none when it does not hold."""
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression=f"SET {sets}",
                ConditionExpression="attribute_exists(pk)" + (f" AND {condition}" if condition else ""),
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if not codec.condition_failed(exc):
                raise

    def mark_delivery_pending(
        self, job_id: str, tenant_id: str, *, read: JobRecord | None = None
    ) -> JobRecord:
        """Redelivery: the terminal event goes out again, so the delivery is pending once more,
        and a 410 Gone to an earlier event no longer holds it back.

        With the job as `read`, the write applies to that job only (not one submitted since
        under a reused Idempotency-Key), and a job whose retention ends before the new round's
        retries is kept for them, as a terminal write keeps it (`_finish`): never past its
        retention plus one round, however often it is redelivered. Not a batch's item, as
        `record_delivery` keeps none: kept past its batch, a new batch under the batch's reused
        Idempotency-Key would meet it as it writes its items, and never expand."""
        now = self.now_ms()
        sweep_sets, _, sweep = self._sweep(job_id, now + self.config.reconciler.stale_webhook_seconds * 1000)
        sets = ["delivery_status = :pending", "delivery_attempts = :zero", *sweep_sets]
        condition = "tenant_id = :tenant AND attribute_exists(webhook_url)"
        if read is not None:
            condition += " AND created_ms = :read_created"
            sweep = {**sweep, "read_created": read.created_ms}
            round_s = self.config.terminal_event_seconds
            outlive = min(now // 1000, read.created_ms // 1000 + self.config.retention_seconds) + round_s
            if now // 1000 < read.expires_at < outlive and not batches.batch_of(job_id):
                sets.append("expires_at = :keep_until")
                sweep["keep_until"] = outlive
        # (a new round: the messages of earlier ones are dropped, `WebhookMessage.delivery_round`)
        update = f"SET {', '.join(sets)} REMOVE delivery_next_ms, delivery_carrier, webhook_gone ADD delivery_round :one"
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeValues=codec.values(
                    pending=DeliveryStatus.PENDING.value, tenant=tenant_id, zero=0, one=1, **sweep
                ),
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if codec.condition_failed(exc):
                raise JobNotFound(job_id) from exc
            raise
        except StoreUnavailable:
            # Applied with every answer lost, perhaps: a round past the one read is there, this
            # request's or another redelivery's, and pending either way: answered as accepted,
            # not 503, whose retry starts another round (hunt 321). (No token of its own: the
            # item's `delivery_write` is the dispatcher's, whose record in flight it names; a
            # token there made a record resent across the redelivery land on the new round,
            # review 277.)
            newer = self._newer_round(job_id, read)
            if newer is None:
                raise
            return newer
        return codec.from_item(response["Attributes"])

    def _newer_round(self, job_id: str, read: JobRecord | None) -> JobRecord | None:
        """The job as stored, when a delivery round past `read`'s is there (the same job); None
        otherwise, or without `read`, or when the read fails too."""
        if read is None:
            return None
        try:
            found = self.find(job_id)
        except StoreUnavailable:
            return None
        return found if a_later_round(found, read) else None

    # ---- reads --------------------------------------------------------------------------

    def find(self, job_id: str, *, past_retention: bool = False) -> JobRecord | None:
        """Any tenant's job, for workers. Expired-but-not-deleted items count as gone, unless
        `past_retention` (the reconciler, which ends such a job to give its slot back). An id
        that is no job's (a message sent by hand naming another item) finds none."""
        if not is_job_id(job_id):
            return None
        response = self._ddb.get_item(
            TableName=self.table_name, Key={"pk": {"S": job_id}}, ConsistentRead=True
        )
        item = response.get("Item")
        if past_retention:
            return codec.from_item(item) if item else None
        return self._live(item)

    def _live(self, item: dict[str, Any] | None) -> JobRecord | None:
        if not item:
            return None
        record = codec.from_item(item)
        if record.expires_at <= int(self._clock()):
            return None
        return record

    def _read_items(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Consistent reads of jobs' items by id: a GetItem for one, else BatchGetItem."""
        if len(job_ids) == 1:
            response = self._ddb.get_item(
                TableName=self.table_name, Key={"pk": {"S": job_ids[0]}}, ConsistentRead=True
            )
            item = response.get("Item")
            return {job_ids[0]: item} if item else {}
        return aws.get_items(self._ddb, self.table_name, [{"pk": {"S": job_id}} for job_id in job_ids])

    def get(self, job_id: str, tenant_id: str) -> JobRecord:
        """A tenant's own job; another tenant's job is indistinguishable from a missing one."""
        record = self.find(job_id)
        if record is None or record.tenant_id != tenant_id:
            raise JobNotFound(f"no job {job_id}")
        return record

    def queued_ahead(self, job: JobRecord, limit: int = QUEUE_POSITION_WINDOW) -> int:
        """How many of the tenant's jobs in the job's lane, submitted before it, are still
        queued: one page of the tenant index, newest first, back from the job, at most `limit`
        entries read (the index's small projected entries, eventually consistent)."""
        response = self._ddb.query(
            TableName=self.table_name,
            IndexName=TENANT_INDEX,
            KeyConditionExpression="tenant_id = :tenant AND tenant_created < :mine",
            FilterExpression="#st = :queued AND lane = :lane",
            ExpressionAttributeNames={"#st": "status"},
            ExpressionAttributeValues=codec.values(
                tenant=job.tenant_id,
                mine=tenant_sort_key(job.created_ms, job.id),
                queued=JobStatus.QUEUED.value,
                lane=job.lane,
            ),
            ScanIndexForward=False,
            Select="COUNT",
            Limit=limit,
        )
        return int(response.get("Count", 0))

    def list_for_tenant(
        self, tenant_id: str, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first. With a status filter a page may hold fewer than `limit` jobs."""
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": TENANT_INDEX,
            # Jobs only: the tenant's batches sort after them (`job_index.BATCH_SORT_PREFIX`).
            "KeyConditionExpression": "tenant_id = :tenant AND tenant_created < :batches",
            "ScanIndexForward": False,
            "Limit": limit,
        }
        values: dict[str, Any] = {"tenant": tenant_id, "batches": BATCH_SORT_PREFIX}
        if status is not None:
            kwargs["FilterExpression"] = "#st = :status"
            kwargs["ExpressionAttributeNames"] = {"#st": "status"}
            values["status"] = status.value
        kwargs["ExpressionAttributeValues"] = codec.values(**values)
        if cursor:
            kwargs["ExclusiveStartKey"] = codec.decode_cursor(cursor, tenant_id)
        response = self._ddb.query(**kwargs)
        now_s = int(self._clock())
        records = [codec.from_item(item) for item in response.get("Items", [])]
        records = [record for record in records if record.expires_at > now_s]
        last = response.get("LastEvaluatedKey")
        return records, (codec.encode_cursor(last) if last else None)

    def sweep(
        self,
        due_before_ms: int,
        limit: int,
        only: SweepPass | None = None,
        *,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[SweepEntry]:
        """Jobs the reconciler should look at, from the sparse index: never a scan.

        Each shard is read lazily, a page at a time, and the shards are merged so the most
        overdue entries come first whatever shard they live in. With `only`, the entries of
        that pass (filtered after the read: the index's entries are small). `stop` is asked
        before each page: once it answers True, no shard reads on (the merge has read the first
        page of each shard it reached: what those hold is still yielded).
        """
        partitions = sweep_partitions(self.config.reconciler.sweep_shards)
        # (from a shard chosen at random: when `stop` cuts the reads short run after run, each
        # run reads other shards first, so none waits for good)
        start = random.randrange(len(partitions))
        shards = [
            self._sweep_shard(pk, due_before_ms, only, stop) for pk in partitions[start:] + partitions[:start]
        ]
        merged = heapq.merge(*shards, key=lambda entry: entry.sweep_at)
        for seen, entry in enumerate(merged):
            if seen >= limit:
                return
            yield entry

    def _sweep_shard(
        self, partition: str, due_before_ms: int, only: SweepPass | None, stop: Callable[[], bool] | None
    ) -> Iterator[SweepEntry]:
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": SWEEP_INDEX,
            "KeyConditionExpression": "sweep_pk = :p AND sweep_at <= :due",
            "ExpressionAttributeValues": codec.values(p=partition, due=due_before_ms),
            # The passes of the few filter after the read, so a page may hold none of theirs:
            # behind a long backlog of stale queued jobs, the lapsed leases are a few among
            # thousands. Their pages are ten times longer (index entries are small: 1,000 of
            # them about 100 KB, one request's worth), for the same read units in a tenth of the
            # requests; the backlog's pass reads only as far as the run's limit.
            "Limit": _SWEEP_PAGE if only in (None, SweepPass.BACKLOG) else _SWEEP_PAGE_FILTERED,
        }
        if only is not None:
            kwargs["FilterExpression"] = _SWEEP_FILTERS[only]
            kwargs["ExpressionAttributeNames"] = {"#st": "status"}
            named = {
                "p": partition,
                "due": due_before_ms,
                "running": JobStatus.RUNNING.value,
                "queued": JobStatus.QUEUED.value,
            }
            kwargs["ExpressionAttributeValues"] = codec.values(
                **codec.named_values(named, kwargs["KeyConditionExpression"], _SWEEP_FILTERS[only])
            )
        while stop is None or not stop():
            try:
                response = self._ddb.query(**kwargs)
            except StoreUnavailable:
                # One shard throttled past its retries: its entries stay due for the next run,
                # and the other shards' still merge (the merge reads every shard's first page
                # before it yields one entry: one failure would stop them all).
                logger.warning("sweep shard unreadable this run", extra={"partition": partition})
                return
            for item in response.get("Items", []):
                data = codec.plain(item)
                try:
                    entry = _sweep_entry(data)
                except (KeyError, TypeError, ValueError) as exc:
                    # An entry this version cannot read (a status a newer version wrote, before
                    # a rollback): left to a version that can, and counted as a fault (its alarm).
                    reconcile_fault(exc, str(data.get("pk")), "sweep entry unreadable")
                    continue
                yield entry
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def count_unfinished(self, stop: Callable[[], bool] | None = None) -> Counter[str]:
        """Queued and running jobs per lane, read from the sparse index's small entries; not a
        batch's items, which their batch counts (`BatchRepository.unfinished_items`).

        The reconciler compares this with each lane queue's depth to tell a backlog (every
        job still has its message) from a lost message. A read of the whole index, page after
        page: `stop` says when the caller's time is up, and the read then raises ReadCutShort
        between two pages (hunt 315: a large or throttled index read on past the reconciler's
        timeout, every run, and what it would have settled after the count never was).
        """
        counts: Counter[str] = Counter()
        for partition in sweep_partitions(self.config.reconciler.sweep_shards):
            kwargs: dict[str, Any] = {
                "TableName": self.table_name,
                "IndexName": SWEEP_INDEX,
                "KeyConditionExpression": "sweep_pk = :p",
                "FilterExpression": "#st IN (:queued, :running)",
                "ProjectionExpression": "pk, lane",
                "ExpressionAttributeNames": {"#st": "status"},
                "ExpressionAttributeValues": codec.values(p=partition, queued="queued", running="running"),
            }
            while True:
                if stop is not None and stop():
                    raise ReadCutShort("the lanes' unfinished jobs were not counted in the time given")
                response = self._ddb.query(**kwargs)
                for item in response.get("Items", []):
                    if batches.batch_of(item["pk"]["S"]) is None:
                        counts[item["lane"]["S"]] += 1
                if "LastEvaluatedKey" not in response:
                    break
                kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return counts

    def sweep_first(self, job_id: str, unlooked: JobRecord | None = None) -> None:
        """A queued job whose message is known lost (its send failed after the job was stored):
        its sweep entry goes to the front, so the reconciler's next run gives it the message the
        lane is short of, rather than to the oldest of a backlog, whose messages are only late.
        Nothing when the job is no longer queued (claimed after all: a duplicate got through).
        `unlooked`: the job as read, whose message may be lost: only while the reconciler has
        not looked at it yet (its entry where its accept put it), so it is sent one at most."""
        condition, values = "attribute_exists(sweep_pk) AND #st = :queued", {}
        if unlooked is not None:
            # (`looked_ms`: written by every look's postpone, which can put the entry back where
            # the accept did: a deadline before the first look clamps both to it)
            condition += " AND sweep_at = :accepted_at AND attribute_not_exists(looked_ms)"
            values["accepted_at"] = self._queued_due(unlooked.created_ms, unlooked.deadline_ms)
        try:
            # (bounded in a request: should DynamoDB stall, the job waits for its place in the
            # sweep, rather than the accepted submit be a 504 its client retries into a second)
            self._marks.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression="SET sweep_at = :first",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#st": "status"},
                ExpressionAttributeValues=codec.values(
                    first=SWEEP_FIRST_MS, queued=JobStatus.QUEUED.value, **values
                ),
            )
        except ClientError as exc:
            if not codec.condition_failed(exc):
                raise

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
        """After the reconciler re-enqueued something, leave the job alone for a while, but
        not past `not_after_ms` (a queued job's deadline: `_queued_due`).

        False when the job left the index meanwhile (it finished), or is no longer in `status`
        (a job claimed since the sweep read it keeps its lease's entry), or its entry is no
        longer due at `seen_at`, where the sweep read it (a delivery attempt made meanwhile
        moved it past its own next attempt): nothing to postpone.
        With `retention_margin_s`, a job whose retention ends within that margin is not
        postponed: `RetentionDue` brings it as stored, read by the refused write itself (no
        read of its own).
        """
        now = self.now_ms()
        due = now + int(seconds * 1000)
        sweep_sets, _, sweep = self._sweep(job_id, due if not_after_ms is None else min(due, not_after_ms))
        # (the reconciler has looked at it: a replay's mark no longer applies, `sweep_first`)
        sweep_sets = [*sweep_sets, "looked_ms = :looked"]
        sweep["looked"] = now
        # A job that left the index meanwhile stays out of it.
        condition = "attribute_exists(sweep_pk)"
        names: dict[str, str] = {}
        if status is not None:
            condition += " AND #st = :status"
            sweep["status"] = status.value
            names["#st"] = "status"
        if seen_at is not None:
            condition += " AND sweep_at = :seen_at"
            sweep["seen_at"] = seen_at
        if retention_margin_s is not None:
            condition += " AND expires_at > :soon_s"
            sweep["soon_s"] = now // 1000 + retention_margin_s
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression="SET " + ", ".join(sweep_sets),
                ConditionExpression=condition,
                ExpressionAttributeValues=codec.values(**sweep),
                **({"ExpressionAttributeNames": names} if names else {}),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if codec.condition_failed(exc):
                old: dict[str, Any] = exc.response.get("Item") or {}  # type: ignore[assignment]
                moved = status is not None and old.get("status", {}).get("S") != status.value
                # (refused for its retention, not only for an entry moved since `seen_at`)
                due = int(old.get("expires_at", {}).get("N", "0")) <= sweep.get("soon_s", 0)
                if retention_margin_s is not None and "sweep_pk" in old and not moved and due:
                    raise RetentionDue(codec.from_item(old)) from exc
                return False
            raise
        return True


def _sweep_entry(data: dict[str, Any]) -> SweepEntry:
    """An index entry as the reconciler reads it (a batch's entry stands for its batch)."""
    if batches.is_batch_key(str(data["pk"])):
        return SweepEntry(
            job_id=data["pk"],
            status=JobStatus.QUEUED,
            lane=data["lane"],
            sweep_at=int(data["sweep_at"]),
            delivery_status=None,
            deadline_ms=None,
            batch=True,
        )
    return SweepEntry(
        job_id=data["pk"],
        status=JobStatus(data["status"]),
        lane=data["lane"],
        sweep_at=int(data["sweep_at"]),
        delivery_status=DeliveryStatus(data["delivery_status"]) if "delivery_status" in data else None,
        deadline_ms=int(data["deadline_ms"]) if "deadline_ms" in data else None,
    )
