"""Where a job's input and result live: in its DynamoDB item while the item fits, else in S3.

The decision is sized as DynamoDB sizes an item (names plus UTF-8 values, input and result
together), with room kept for what later writes add, so no write can fail on the 400 KB limit.
"""

from __future__ import annotations

import hashlib
import json

from llmq.config import LlmqConfig
from llmq.errors import ItemTooLarge, JobResultExpired, PayloadTooLarge, StoreUnavailable
from llmq.item_size import MAX_ITEM_BYTES
from llmq.job_codec import record_size
from llmq.job_record import JobInput, JobRecord
from llmq.models import JobError, JobResult, JobStatus
from llmq.ports import BlobStore, JobStore
from llmq.telemetry import error_fields, logger

# Room kept under the item budget for the attributes a later write adds to the item: the
# error of a retry, the delivery record, the write tokens (4 KB), and the delivery log's ten
# entries of up to about 400 bytes each (a 256-byte answer head and the rest of the attempt).
ITEM_HEADROOM_BYTES = 4096 + 10 * 400
# What the store adds to every item beyond the record, sized generously: the index
# attributes (`tenant_created`, `sweep_pk`, `sweep_at`, about 100 bytes) and a write token.
BOOKKEEPING_BYTES = 256
# Where a paid result waits whose write to its job failed (`Offload.park_result`): the worker
# puts and gets objects here (stacks/llmq_stack.py), and nothing else does.
PARKED_PREFIX = "results/parked/"
# The member of a parked object that holds a billed failure rather than a result.
_FAILED = "failed"


class Offload:
    def __init__(self, payloads: BlobStore | None, config: LlmqConfig) -> None:
        self.payloads = payloads
        self.config = config

    def fits(self, record: JobRecord) -> bool:
        needed = record_size(record) + BOOKKEEPING_BYTES + ITEM_HEADROOM_BYTES
        return needed <= self.config.limits.max_item_payload_bytes

    def _store(self) -> BlobStore:
        if self.payloads is None:
            raise PayloadTooLarge("this job needs the payload bucket, which is not configured")
        return self.payloads

    def goes_to_store(self, record: JobRecord) -> bool:
        """Whether the record's input goes to S3 (`store_input`) rather than into its item: too
        large for the item, or a `stream: true` job's input over
        `streaming.max_inline_input_bytes` (its item is rewritten by every output write, at two
        write units per KB of it)."""
        if record.input is None:
            return False
        small = not record.stream or (
            len(record.input.model_dump_json().encode()) <= self.config.streaming.max_inline_input_bytes
        )
        return not (small and self.fits(record))

    def store_input(self, record: JobRecord) -> JobRecord:
        """The record to create with its input in S3, by reference (`goes_to_store` said so)."""
        if record.input is None:
            return record
        data = record.input.model_dump_json().encode()
        ref = self._store().put(_input_key(record), data)
        return record.model_copy(update={"input": None, "input_ref": ref})

    def fits_by_reference(self, record: JobRecord) -> bool:
        """Whether the record fits DynamoDB's item with its input in S3: what stays in the item
        (its metadata, its webhook) must fit too, with room for the writes that follow. (Not
        the budget `fits` holds a prompt to, which a result counts in too: nothing that stays
        can move.)"""
        by_reference = record.model_copy(update={"input": None, "input_ref": _input_key(record)})
        return record_size(by_reference) + BOOKKEEPING_BYTES + ITEM_HEADROOM_BYTES <= MAX_ITEM_BYTES

    def load_input(self, record: JobRecord) -> JobRecord:
        """The job with its input, read from S3 when the item holds only a reference."""
        if record.input is not None or record.input_ref is None:
            return record
        data = self._store().get(record.input_ref)
        return record.model_copy(update={"input": JobInput.model_validate_json(data)})

    def result_fits(self, job: JobRecord, result: JobResult) -> bool:
        """Whether the completed item, input included, stays within the budget."""
        stored = job.model_copy(update={"input": None if job.input_ref else job.input, "result": result})
        return self.fits(stored)

    def complete(
        self, jobs: JobStore, job: JobRecord, owner: str, result: JobResult, *, timed: bool = True
    ) -> JobRecord:
        """Record the result inline when the whole item still fits, else in S3 by reference
        (`timed`: as `JobStore.complete`).

        By reference, the result is parked first, where the job's next look finds it (its claim,
        the reconciler, the dead-letter function: `record_parked`), and the job names that
        object: a worker that dies between the put and the write leaves a paid result that is
        recorded, not paid for again (hunt 261: under a key of its own, nothing looked for it).
        Unless an attempt parked one first: this one's then goes under a key of its own."""
        if self.result_fits(job, result):
            try:
                return jobs.complete(job, owner, result=result, timed=timed)
            except ItemTooLarge:
                pass  # measured wrong somehow: the result still has a home in S3
        data = result.model_dump_json().encode()
        ref = (
            _parked_key(job)
            if self._store().put_new(_parked_key(job), data)
            else self.put_result(job, owner, result)
        )
        return jobs.complete(job, owner, result_ref=ref, timed=timed)

    def put_result(self, job: JobRecord, owner: str, result: JobResult) -> str:
        # Keyed by owner too, so a fenced-out worker's upload never replaces the winner's.
        key = f"results/{job.id}/{hashlib.sha256(owner.encode()).hexdigest()[:16]}.json"
        return self._store().put(key, result.model_dump_json().encode())

    def park_result(self, job: JobRecord, result: JobResult) -> None:
        """A paid result whose write to the job failed for longer than the worker could wait (a
        DynamoDB outage): kept in S3, so the job's next attempt records it instead of paying
        for the generation again (`parked_result`)."""
        self._park(job, result.model_dump_json().encode())

    def park_failure(self, job: JobRecord, error: JobError) -> None:
        """A failure that may have been billed (a provider timeout: the provider may still be
        generating) whose write failed as a result's can: kept the same way, so that no later
        attempt sends the request again; the job fails with it instead."""
        self._park(job, json.dumps({_FAILED: error.model_dump(mode="json")}).encode())

    def _park(self, job: JobRecord, data: bytes) -> None:
        """Parked unless an attempt parked first (S3's conditional write): what is parked is
        never replaced, so a job that names its parked object as its result (`complete`) keeps
        it whatever a fenced-out worker parks later."""
        if not self._store().put_new(_parked_key(job), data):
            logger.info("an earlier attempt's outcome is parked already", extra={"job_id": job.id})

    def parked_result(self, job: JobRecord) -> JobResult | JobError | None:
        """What an earlier attempt of this job parked, if anything: its paid result, or its
        billed failure."""
        store = self._store()
        if store.stat(_parked_key(job)) is None:
            return None
        data = store.get(_parked_key(job))
        parked = json.loads(data)
        if isinstance(parked, dict) and _FAILED in parked:
            return JobError.model_validate(parked[_FAILED])
        return JobResult.model_validate_json(data)

    def record_parked(self, jobs: JobStore, job: JobRecord, *, ends: bool) -> JobRecord | None:
        """A job no live worker holds, about to be ended without another run (`ends`: its
        attempts used up, its deadline passed, a cancel asked, its retention due), or running
        with its lease lapsed and about to be queued to run again: the result an earlier
        attempt paid for and parked is recorded instead, and the job succeeds, since what was
        paid for is there to deliver (as a generation that ended as the cancel came stands);
        or the failure it parked (`park_failure`), and the job fails with it, never sent
        again. One HeadObject, only for a job that ran.

        A queued job that ran before is looked at only when it ends (`ends`): it was queued
        again after a look that S3 could not answer (a hand-back, a recovery), and its next
        claim looks otherwise.

        None when nothing is parked, the job never ran, or it moved on meanwhile (another
        writer ended it, a worker took it over, its id was taken again by a new job): the
        caller goes on as it would have. A parked object that cannot be read for good (a role
        without the grant) counts as nothing parked. S3 failing for now raises
        StoreUnavailable for a job about to end, so the caller looks again later rather than
        end it without its result; but not for ever (`_waited_long`)."""
        if self.payloads is None or job.attempts < 1:
            return None
        if job.status is not JobStatus.RUNNING and not (job.status is JobStatus.QUEUED and ends):
            return None
        try:
            result = self.parked_result(job)
        except StoreUnavailable:
            if ends and not self._waited_long(jobs, job):
                raise
            logger.warning("parked result not looked for: S3 unavailable", extra={"job_id": job.id})
            return None
        except Exception as exc:
            logger.warning("parked result not read", extra={"job_id": job.id, **error_fields(exc)})
            return None
        if result is None:
            return None
        if isinstance(result, JobError):
            logger.info("a parked failure ends the job", extra={"job_id": job.id, "attempt": job.attempts})
            return jobs.end_with_parked(job, error=result)
        logger.info("a parked result completes the job", extra={"job_id": job.id, "attempt": job.attempts})
        if self.result_fits(job, result):
            try:
                return jobs.end_with_parked(job, result=result)
            except ItemTooLarge:
                pass  # measured wrong somehow: it is served from where it was parked
        # (the parked object serves as the result's own: the api reads under results/)
        return jobs.end_with_parked(job, result_ref=_parked_key(job))

    def _waited_long(self, jobs: JobStore, job: JobRecord) -> bool:
        """How long a job about to end waits for S3 to say what was parked. A running one holds
        its tenant's slot (DESIGN §3.11): until its lease lapsed `reconciler.stale_queued_seconds`
        ago. A queued one holds none, and waits until its retention is nearly over, so that it
        still ends (and gives back its quota) before DynamoDB's TTL deletes it."""
        if job.status is JobStatus.QUEUED:
            return not self.waits_when_queued(jobs, job)
        lapsed = job.lease_expires_ms or 0
        return jobs.now_ms() - lapsed > self.config.reconciler.stale_queued_seconds * 1000

    def waits_when_queued(self, jobs: JobStore, job: JobRecord) -> bool:
        """Whether the job, queued and about to end, still waits for S3 to say what was parked:
        until half the reconciler's margin of its retention is left (`_waited_long`)."""
        margin = self.config.reconciler.retention_margin_seconds // 2
        return job.expires_at - jobs.now_ms() // 1000 > margin

    def link_result(self, record: JobRecord) -> JobRecord:
        """The job with its S3-held result as a presigned URL, not inline: for a response that
        would not fit in a Lambda response with the result in it."""
        if record.result_ref is None:
            return record
        url, expires_ms = self._store().presigned_url(record.result_ref)
        return record.model_copy(
            update={"result": None, "result_url": url, "result_url_expires_ms": expires_ms}
        )

    def load_result(self, record: JobRecord) -> JobRecord:
        """The result of an S3-held job: inline up to the configured size, else a presigned URL
        and the time it stops working."""
        if record.result is not None or record.result_ref is None:
            return record
        store = self._store()
        found = store.stat(record.result_ref)
        if found is None:
            # (hunt 328: a 500 at every read of the job for the rest of its record's life)
            raise JobResultExpired(
                f"job {record.id}'s result is no longer kept: results are kept "
                f"{self.config.retention_days} days"
            )
        if found.size > self.config.limits.max_inline_result_bytes:
            # Short-lived, and stated: see llmq.payloads.RESULT_URL_SECONDS.
            url, expires_ms = store.presigned_url(record.result_ref)
            return record.model_copy(update={"result_url": url, "result_url_expires_ms": expires_ms})
        return record.model_copy(
            update={"result": JobResult.model_validate_json(store.get(record.result_ref))}
        )


def _input_key(record: JobRecord) -> str:
    return f"inputs/{record.id}/{record.request_hash[:16]}.json"


def _parked_key(job: JobRecord) -> str:
    # The job's creation time too: a job id derived from an Idempotency-Key is used again
    # after its retention, and that new job must never find the old one's result.
    return f"{PARKED_PREFIX}{job.id}/{job.created_ms}.json"
