"""Batches as stored: their ids, their item, their counts and every write of theirs.

A batch lives in the jobs table beside its items:
- `batch#<id>`: the batch (who, where, how many, the expansion checkpoint, cancel, the end);
- `batch#<id>#<k>`, k < `count_shards`: how many of its items ended in each terminal status,
  added to in the same transaction as the item's own terminal write, so the counts are exact
  and no item is hot (a hundred items ending a second make a few writes a second per shard);
- its items are ordinary jobs whose ids derive from (batch, index): `item_job_id`.

How many items run is read from the tenant's share (`llmq.shares`): its holders in the lane
are job ids, and an item's id names its batch. Queued is what is left of the total.
"""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from pydantic import Field, TypeAdapter

from llmq import aws, shares
from llmq import job_codec as codec
from llmq.config import MIN_RETENTION_DAYS, LlmqConfig
from llmq.errors import (
    BatchExceedsQuota,
    BatchNotEnded,
    BatchNotFound,
    QuotaExceeded,
    ReadCutShort,
    StoreContended,
    StoreUnavailable,
)
from llmq.item_size import MAX_ITEM_BYTES, item_size_bytes
from llmq.job_index import BATCH_SORT_PREFIX, TENANT_INDEX, batch_sort_key, sweep_attributes
from llmq.job_record import JobRecord, a_later_round, delivery_view, iso
from llmq.model_base import Model
from llmq.models import (
    BATCH_EVENT_FOR_STATUS,
    MAX_LINE_ERROR_BYTES,
    TERMINAL_STATUSES,
    Batch,
    BatchEvent,
    BatchEventDeliveries,
    BatchLineError,
    BatchRequestCounts,
    BatchStatus,
    BatchWebhookLog,
    BatchWebhookState,
    DeliveryAttempt,
    DeliveryStatus,
    JobStatus,
    WebhookEvent,
)
from llmq.offload import BOOKKEEPING_BYTES, ITEM_HEADROOM_BYTES
from llmq.payloads import PresignedUrl
from llmq.policy import COUNTED_LETTERS, fresh_letter_condition
from llmq.shares import ShareState, holders_of, share_key
from llmq.telemetry import error_fields, logger

if TYPE_CHECKING:
    from llmq.ports import QueueStore

BATCH_PREFIX = "batch#"
BATCH_ID_PREFIX = "bat_"
# An item's id: "job_" + the batch id's 26 characters + "n" + its index. Every other job id has
# exactly 26 characters after "job_", so the two never meet.
_CORE = 26
_ITEM_MARK = "n"
TERMINAL_COUNTS = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED)
Clock = Callable[[], float]


def new_batch_id(tenant_id: str, idempotency_key: str | None, now_ms: int) -> str:
    """Derived from (tenant, key) when a key is given, so a replay meets the same put condition."""
    if idempotency_key is not None:
        digest = hashlib.sha256(f"{tenant_id}\x00batch\x00{idempotency_key}".encode()).digest()
        return BATCH_ID_PREFIX + base64.b32encode(digest).decode().lower().rstrip("=")[:_CORE]
    return f"{BATCH_ID_PREFIX}{now_ms:012x}{secrets.token_hex(7)}"


def item_job_id(batch_id: str, index: int) -> str:
    return f"job_{batch_id[len(BATCH_ID_PREFIX) :]}{_ITEM_MARK}{index}"


def batch_of(job_id: str) -> tuple[str, int] | None:
    """(batch id, index) of an item's job id; None for any other job."""
    rest = job_id[len("job_") :]
    digits = rest[_CORE + 1 :]
    if not job_id.startswith("job_") or rest[_CORE : _CORE + 1] != _ITEM_MARK or not digits.isdigit():
        return None
    return BATCH_ID_PREFIX + rest[:_CORE], int(digits)


def is_batch_id(batch_id: str) -> bool:
    """An id llmq gives a batch (`new_batch_id`): never the key of another item of the table."""
    return batch_id.startswith(BATCH_ID_PREFIX) and "#" not in batch_id


def is_batch_key(pk: str) -> bool:
    return pk.startswith(BATCH_PREFIX)


def batch_key(batch_id: str) -> dict[str, Any]:
    return {"pk": {"S": BATCH_PREFIX + batch_id}}


def shard_key(batch_id: str, expires_at: int, shard: int) -> dict[str, Any]:
    """A count shard of the batch that expires at `expires_at`: a batch created again under the
    same id (an Idempotency-Key reused after retention) counts on shards of its own."""
    return {"pk": {"S": f"{BATCH_PREFIX}{batch_id}#{expires_at}#{shard}"}}


def count_end(table: str, job: JobRecord, status: JobStatus, shards: int) -> dict[str, Any] | None:
    """A transaction item: the item `job` ended in `status`, counted on its shard. None for a
    job that is no batch's item."""
    found = batch_of(job.id)
    if found is None or job.batch_id is None:
        return None
    batch_id, index = found
    return {
        "Update": {
            "TableName": table,
            "Key": shard_key(batch_id, job.expires_at, index % shards),
            # The shard goes with its batch: an item's expiry is its batch's.
            "UpdateExpression": "SET expires_at = :expires ADD #status :one",
            "ExpressionAttributeNames": {"#status": status.value},
            "ExpressionAttributeValues": {":one": {"N": "1"}, ":expires": {"N": str(job.expires_at)}},
        }
    }


def not_canceled(table: str, batch_id: str) -> dict[str, Any]:
    """A transaction item: the batch was not asked to cancel (an item's claim checks it)."""
    return {
        "ConditionCheck": {
            "TableName": table,
            "Key": batch_key(batch_id),
            "ConditionExpression": "attribute_exists(pk) AND cancel_requested = :false",
            "ExpressionAttributeValues": {":false": {"BOOL": False}},
        }
    }


class BatchRecord(Model):
    """A batch as stored. Its requests live in S3 (`requests_ref`) until they are written as items."""

    id: str
    tenant_id: str
    status: BatchStatus
    lane: str
    total: int
    requests_ref: str
    request_hash: str
    created_ms: int
    expires_at: int
    # The body's canonical digest (`llmq.batch_intake.batch_request_digest`), which a replay is
    # compared by; None on a batch stored before it (compared by `request_hash` then).
    request_digest: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    deadline_ms: int | None = None
    # Items written so far: items [0, expanded) exist. The expansion's checkpoint.
    expanded: int = 0
    # Items never written because the batch was canceled first: counted as canceled.
    unexpanded_canceled: int = 0
    cancel_requested: bool = False
    # The client asked for the cancel (not only llmq, giving up on a batch that crashes its
    # expansion, whose running items finish: `batch_runs.ask_running_items_to_stop`).
    client_canceled: bool = False
    finished_ms: int | None = None
    # The counts when the batch ended, so its webhook and later reads need no shard.
    final_counts: BatchRequestCounts | None = None
    webhook_url: str | None = None
    webhook_events: list[BatchEvent] = Field(default_factory=list)
    item_events: list[WebhookEvent] = Field(default_factory=list)
    delivery_status: DeliveryStatus | None = None
    # The ended batch's webhook message was sent (`batch_runs.settle` sends it until it is).
    webhook_sent: bool = False
    delivery_attempts: int = 0
    delivery_last_status_code: int | None = None
    delivered_ms: int | None = None
    # The delivery log, as a job's (`job_codec.delivery_log_slot`): the latest ten attempts,
    # each written in the dispatcher's delivery update, oldest first.
    delivery_log: list[DeliveryAttempt] = Field(default_factory=list)
    delivery_log_seq: int = 0
    # Redeliveries asked for, as a job's (`mark_redelivery` adds one).
    delivery_round: int = 0
    # Its webhook-ids hold `created_ms`, as a job's (`JobRecord.ids_by_creation`).
    ids_by_creation: bool = False
    # When the next attempt is due (a copy of the message that comes sooner waits for it).
    delivery_next_ms: int | None = None
    # The SQS message id of the copy that recorded the pending attempt, whose message carries
    # the next (as a job's `delivery_carrier`).
    delivery_carrier: str | None = None
    # When a redelivery was asked for: its message's sender has the grace from then.
    redelivered_ms: int | None = None
    # The upload form: the file (`upload_ref`, as it was when the batch was created: `upload_etag`)
    # is validated by the worker first (`llmq.batch_uploads`); until then `validated` is False and
    # `total` 0. Its requests are then stored in parts under `requests_ref`, part k holding items
    # [parts[k-1], parts[k]) (`part_key`); an inline batch's are one object at `requests_ref`.
    upload_id: str | None = None
    upload_ref: str | None = None
    # The tenant's tier when the batch was made: its items' cap and quota, admitted later.
    tier: str | None = None
    upload_etag: str | None = None
    # (and its size: with the ETag, what a replay's body hash counts of the file, which a replay
    # after the upload's own lifecycle removed it is answered from)
    upload_size: int | None = None
    validated: bool = True
    parts: list[int] | None = None
    # The validation's checkpoint: the file's bytes and lines stored in `parts` so far.
    scan_bytes: int = 0
    scan_lines: int = 0
    errors: list[BatchLineError] | None = None
    # The results file: written once every item has ended (status finalizing), as an S3
    # multipart upload whose progress (the next item, the parts' ETags) is checkpointed here.
    finalizing_ms: int | None = None
    # The message asking for the file was sent (`batch_runs.settle` sends it until it is).
    compile_queued: bool = False
    compile_upload_id: str | None = None
    compile_next: int = 0
    compile_parts: list[str] = Field(default_factory=list)
    # Runs of the results file that handed on with no part written since the checkpoint
    # (`note_compile_stall`): a part that no run has the time to read, at `MAX_COMPILE_STALLS`.
    compile_stalls: int = 0
    # The run that counted the last stall (a retry of its write counts nothing more).
    compile_stall_run: str | None = None
    results_key: str | None = None
    # The expand messages that exhausted their receives (DLQ message ids): the worker crashed
    # on the batch each time (`batch_runs.dead_lettered`).
    dead_letter_ids: set[str] = Field(default_factory=set)
    # The letters ever counted for it, never reset (the set above is, at each step it gets
    # past): the round its next expand message is sent in (`LaneMessage.redrive_round`).
    redrive_round: int = 0
    # The items before it have had their lane messages sent: after the last chunk's write, its
    # sends may have failed or the worker stopped between (`BatchExpander.expand` sends them
    # again). None on batches an earlier version expanded.
    queued_to: int | None = None
    # The run of the expansion that wrote the last chunk (`write_items`): a run refused by the
    # checkpoint tells its own write, whose answer was lost, from another run's.
    expand_writer: str | None = None

    @property
    def expansion_over(self) -> bool:
        return self.validated and self.expanded + self.unexpanded_canceled >= self.total

    @property
    def terminal_event(self) -> BatchEvent | None:
        return BATCH_EVENT_FOR_STATUS.get(self.status)

    def wants(self, event: BatchEvent) -> bool:
        return self.webhook_url is not None and event in self.webhook_events

    def webhook_log(self) -> BatchWebhookLog | None:
        if self.webhook_url is None:
            return None
        event = self.terminal_event
        deliveries = []
        if event is not None and event in self.webhook_events:
            deliveries.append(
                BatchEventDeliveries(event=event, status=self.delivery_status, attempts=self.delivery_log)
            )
        return BatchWebhookLog(
            batch_id=self.id, url=self.webhook_url, events=self.webhook_events, deliveries=deliveries
        )

    def to_batch(
        self, counts: BatchRequestCounts, api_base: str = "", results_file: PresignedUrl | None = None
    ) -> Batch:
        webhook = None
        if self.webhook_url is not None:
            webhook = BatchWebhookState(
                url=self.webhook_url,
                events=self.webhook_events,
                item_events=self.item_events,
                delivery=delivery_view(self),
            )
        return Batch(
            id=self.id,
            status=self.status,
            lane=self.lane,
            metadata=self.metadata,
            request_counts=counts,
            created_at=iso(self.created_ms),
            finished_at=iso(self.finished_ms) if self.finished_ms else None,
            cancel_requested=self.cancel_requested,
            results_url=f"{api_base.rstrip('/')}/v1/batches/{self.id}/results",
            webhook=webhook,
            upload_id=self.upload_id,
            results_file_url=results_file.url if results_file else None,
            results_file_expires_at=iso(results_file.expires_ms) if results_file else None,
            errors=self.errors,
        )


def part_key(requests_ref: str, part: int) -> str:
    """Part `part` of an uploaded batch's validated requests (`requests_ref` is their prefix)."""
    return f"{requests_ref}part-{part:05d}.jsonl"


_BATCH_JSON: dict[str, TypeAdapter[Any]] = {
    "final_counts": TypeAdapter(BatchRequestCounts),
    "errors": TypeAdapter(list[BatchLineError]),
}


# Room a batch's item keeps for what later writes add to it: its line errors (each up to
# MAX_LINE_ERROR_BYTES as stored, with its line and code), and the rest
# (ITEM_HEADROOM_BYTES for the delivery log and the write tokens, and as much again for the
# validation's parts, the results file's checkpoint and the counts).
_LINE_ERROR_BYTES = MAX_LINE_ERROR_BYTES + 64
_BATCH_HEADROOM_BYTES = 2 * ITEM_HEADROOM_BYTES + BOOKKEEPING_BYTES


def batch_fits(record: BatchRecord, errors_shown: int) -> bool:
    """Whether the batch's record, as accepted, leaves the room its later writes need in its
    DynamoDB item: its metadata and webhook stay there for its whole life. Only an upload's
    validation writes up to `errors_shown` line errors; an inline batch's items were checked
    at intake, and it can end with one (`batch_crashed`)."""
    lines = errors_shown if record.upload_id else 1
    room = _BATCH_HEADROOM_BYTES + lines * _LINE_ERROR_BYTES
    return item_size_bytes(_to_item(record)) + room <= MAX_ITEM_BYTES


def _to_item(record: BatchRecord, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # The delivery log is written slot by slot, by the dispatcher's delivery updates only.
    # (dead_letter_ids: a string set, added to only; DynamoDB holds no empty set.)
    dumped = record.model_dump(
        mode="json",
        exclude_none=True,
        exclude={"delivery_log", "dead_letter_ids", "redrive_round", "delivery_round"},
    )
    data = {**dumped, **(extra or {})}
    for name in _BATCH_JSON:
        if name in data:
            data[name] = codec.json_text(data[name])
    data["pk"] = BATCH_PREFIX + data.pop("id")
    return {key: codec._serializer.serialize(value) for key, value in data.items()}


# What a result line reads of an item (`batch_results.result_line`, a job's required fields
# among them): never its input, which may be nearly the whole item (a prompt of 300 KB), so a
# page of results, or a part of the results file, reads about what it writes.
_RESULT_ATTRIBUTES = (
    *(name for name, field in JobRecord.model_fields.items() if field.is_required() and name != "id"),
    *("result", "result_ref", "result_url", "error", "custom_id", "batch_id", "started_ms", "finished_ms"),
)


# A step of the batch's work done (a chunk written, a part validated or of its results file
# uploaded, its finalizing begun): the dead letters counted so far were about a step it got
# past, and the next is counted afresh (`batch_runs.dead_lettered`), as a job's are at its claim.
_PROGRESSED = "REMOVE dead_letter_ids"


def _errors(errors: list[BatchLineError]) -> dict[str, str]:
    """The `errors` attribute's value, as an update SETs it."""
    return {"errors": _BATCH_JSON["errors"].dump_json(errors).decode()}


def _from_item(item: dict[str, Any]) -> BatchRecord:
    data = codec.plain(item)
    data["id"] = str(data.pop("pk"))[len(BATCH_PREFIX) :]
    data["delivery_log"] = codec.pop_delivery_log(data)
    data.pop("delivery_write", None)
    for name, adapter in _BATCH_JSON.items():
        if name in data:
            data[name] = adapter.validate_json(data[name])
    return BatchRecord.model_validate(data)


def tally(batch: BatchRecord, shard_items: list[dict[str, Any]], running: int) -> BatchRequestCounts:
    """The batch's counts from its shards (terminal), the share's holders (running) and the rest."""
    ended = dict.fromkeys(TERMINAL_COUNTS, 0)
    for item in shard_items:
        values = codec.plain(item)
        for status in TERMINAL_COUNTS:
            ended[status] += int(values.get(status.value, 0))
    ended[JobStatus.CANCELED] += batch.unexpanded_canceled
    done = sum(ended.values())
    running = max(0, min(running, batch.total - done))
    return BatchRequestCounts(
        total=batch.total,
        queued=max(0, batch.total - done - running),
        running=running,
        succeeded=ended[JobStatus.SUCCEEDED],
        failed=ended[JobStatus.FAILED],
        canceled=ended[JobStatus.CANCELED],
        expired=ended[JobStatus.EXPIRED],
    )


def final_status(batch: BatchRecord, counts: BatchRequestCounts) -> BatchStatus:
    if batch.cancel_requested:
        return BatchStatus.CANCELED
    if counts.expired:
        return BatchStatus.EXPIRED
    return BatchStatus.COMPLETED


class BatchRepository:
    def __init__(
        self, table_name: str, config: LlmqConfig, *, dynamodb: Any, clock: Clock = time.time
    ) -> None:
        self.table_name = table_name
        self.config = config
        self._ddb = aws.TranslatedClient(dynamodb)
        self._clock = clock

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _sweep(self, batch_id: str, from_ms: int) -> dict[str, Any]:
        """The attributes that put a batch in the reconciler's sweep index, due a stale-queued
        period after `from_ms`."""
        return sweep_attributes(
            BATCH_PREFIX + batch_id,
            from_ms + self.config.reconciler.stale_queued_seconds * 1000,
            self.config.reconciler.sweep_shards,
        )

    # ---- accept -------------------------------------------------------------------------

    def share(self, tenant_id: str) -> ShareState:
        response = self._ddb.get_item(
            TableName=self.table_name, Key=share_key(tenant_id), ConsistentRead=True
        )
        return ShareState.from_item(tenant_id, response.get("Item"))

    def create(
        self, record: BatchRecord, caps: tuple[int, int], state: ShareState, default_max_active: int
    ) -> tuple[BatchRecord, bool]:
        """One transaction: the batch's conditional put, and its items admitted as active jobs
        on the tenant's share (`shares.admit_many`, against the quota as `state` read it).
        (The batch, replayed) when its id exists already, whatever the quota; QuotaExceeded
        when the items do not fit, and nothing is written."""
        # In the reconciler's sweep index until it has ended and its webhook is sent: should its
        # expand message be lost (SQS refused it, a dead letter), the reconciler sends another.
        sweep = self._sweep(record.id, record.created_ms)
        # In the tenant's index too, after its jobs: GET /v1/batches lists from there.
        listed = {"tenant_created": batch_sort_key(record.created_ms, record.id)}
        put = {
            "Put": {
                "TableName": self.table_name,
                "Item": _to_item(record, {**sweep, **listed}),
                # Gone at its retention's end, as `get` and a replay's look see it, once it has
                # ended: one not ended still has items counted in its tenant's quota, which only
                # their own ends give back (a put over it would leave them counted for good).
                "ConditionExpression": "attribute_not_exists(pk) OR (expires_at <= :now_s AND #st IN "
                "(:completed, :canceled, :expired, :failed))",
                "ExpressionAttributeNames": {"#st": "status"},
                "ExpressionAttributeValues": codec.values(
                    now_s=int(self._clock()),
                    **{status.value: status.value for status in BatchStatus if status.is_terminal},
                ),
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        }
        # An upload's items are admitted when its file is validated (`admit_upload`).
        tries_left = _OVERRIDE_RACE_TRIES
        while True:
            tries_left -= 1
            share = (
                [
                    shares.admit_many(
                        self.table_name,
                        record.tenant_id,
                        record.lane,
                        caps,
                        record.total,
                        state,
                        default_max_active,
                        whole_lane=self._not_its_own_lane(record),
                    )
                ]
                if record.validated
                else []
            )
            try:
                # (the share item is in every claim and end of the tenant's jobs: a busy tenant's
                # put may meet one of them, and is tried again, as a job's is)
                _transact_through_conflicts(self._ddb, [put, *share])
            except ClientError as exc:
                reasons = _reasons(exc)
                if reasons and reasons[0].get("Code") == "ConditionalCheckFailed":
                    old = reasons[0].get("Item")
                    if not old:
                        raise StoreUnavailable("the batch's put was refused without its item") from exc
                    existing = _from_item(old)
                    # Our own put, applied on a try whose answer was lost: same stored body, same time.
                    mine = (
                        existing.request_hash == record.request_hash
                        and existing.created_ms == record.created_ms
                    )
                    return existing, not mine
                if len(reasons) > 1 and reasons[1].get("Code") == "ConditionalCheckFailed":
                    found = ShareState.from_item(record.tenant_id, reasons[1].get("Item"))
                    if tries_left and fits_quota(found, record.total, default_max_active):
                        state = found  # (the override moved: see `fits_quota`)
                        continue
                    raise over_quota(found, record.total, default_max_active, self.config) from exc
                _raise_retryable(exc, "the batch's put")
                raise
            except StoreContended:
                raise  # (canceled, try after try: known not to have been applied)
            except StoreUnavailable:
                # Perhaps applied with its answer lost: one consistent read says, as a job's accept
                # does (`JobRepository.create`). Stored, the batch is accepted (a 503 would have a
                # client without an Idempotency-Key pay for it twice); a read that fails as well
                # leaves the 503.
                stored = self._stored_as(record)
                if stored is None:
                    raise
                return stored, False
            return record, False

    def _stored_as(self, record: BatchRecord) -> BatchRecord | None:
        """The batch, if this put stored it (the same body at the same time, as the put's own
        refusal tells its own apart); None if not, or if the read fails."""
        try:
            found = self.find(record.id)
        except Exception as exc:
            logger.warning(
                "a batch accept's outcome could not be read",
                extra={"batch_id": record.id, **error_fields(exc)},
            )
            return None
        mine = found is not None and (found.request_hash, found.created_ms) == (
            record.request_hash,
            record.created_ms,
        )
        return found if mine else None

    def _not_its_own_lane(self, batch: BatchRecord) -> bool:
        """The batch runs in a lane of batches (`batches.lane`) that is not its tenant's own."""
        return batch.tier is not None and batch.lane != self.config.lane_for_tier(batch.tier).name

    # ---- read ---------------------------------------------------------------------------

    def find(self, batch_id: str) -> BatchRecord | None:
        """The batch; None for an id llmq never gives a batch (a message sent by hand naming
        another item of the table, a batch's count shard: hunt 266), as for one not found."""
        if not is_batch_id(batch_id):
            return None
        response = self._ddb.get_item(TableName=self.table_name, Key=batch_key(batch_id), ConsistentRead=True)
        item = response.get("Item")
        return _from_item(item) if item else None

    def get(self, batch_id: str, tenant_id: str) -> BatchRecord:
        """The tenant's batch; another tenant's is as missing as one that never was."""
        found = self.find(batch_id)
        if found is None or found.tenant_id != tenant_id or found.expires_at <= self._clock():
            raise BatchNotFound(f"no batch {batch_id}")
        return found

    def list_for_tenant(
        self, tenant_id: str, limit: int, cursor: str | None
    ) -> tuple[list[BatchRecord], str | None]:
        """The tenant's batches, newest first: a page of the tenant index's batch range, then
        the batches themselves (one BatchGetItem: the index projects a job's attributes)."""
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": TENANT_INDEX,
            "KeyConditionExpression": "tenant_id = :tenant AND begins_with(tenant_created, :batches)",
            "ExpressionAttributeValues": codec.values(tenant=tenant_id, batches=BATCH_SORT_PREFIX),
            "ScanIndexForward": False,
            "Limit": limit,
        }
        if cursor:
            kwargs["ExclusiveStartKey"] = codec.decode_cursor(cursor, tenant_id, batches=True)
        response = self._ddb.query(**kwargs)
        keys = [{"pk": item["pk"]} for item in response.get("Items", [])]
        found = self._get_many(keys) if keys else {}
        now_s = self._clock()
        records = [_from_item(found[key["pk"]["S"]]) for key in keys if key["pk"]["S"] in found]
        records = [record for record in records if record.expires_at > now_s]
        last = response.get("LastEvaluatedKey")
        return records, (codec.encode_cursor(last) if last else None)

    def counts(self, batch: BatchRecord) -> BatchRequestCounts:
        """Two reads: the shards (one BatchGetItem) and the tenant's share for what runs."""
        if batch.final_counts is not None:
            return batch.final_counts
        shards = self._get_many(self._shard_keys(batch))
        running = len(self.running_items(batch))
        return tally(batch, list(shards.values()), running)

    def _ended_counts(self, batch: BatchRecord) -> BatchRequestCounts:
        """The counts from the shards alone (one BatchGetItem): nothing counted as running."""
        return tally(batch, list(self._get_many(self._shard_keys(batch)).values()), 0)

    def _shard_keys(self, batch: BatchRecord) -> list[dict[str, Any]]:
        return [
            shard_key(batch.id, batch.expires_at, shard) for shard in range(self.config.batches.count_shards)
        ]

    def open_batches(self, stop: Callable[[], bool] | None = None) -> list[BatchRecord]:
        """Every batch in the sweep index (not yet ended, or its webhook not yet sent); `stop`, as
        `JobRepository.count_unfinished`'s, raises ReadCutShort between two reads."""
        from llmq.job_index import SWEEP_INDEX, sweep_partitions

        found: list[BatchRecord] = []
        for partition in sweep_partitions(self.config.reconciler.sweep_shards):
            kwargs: dict[str, Any] = {
                "TableName": self.table_name,
                "IndexName": SWEEP_INDEX,
                "KeyConditionExpression": "sweep_pk = :p",
                "FilterExpression": "begins_with(pk, :batch)",
                "ProjectionExpression": "pk",
                "ExpressionAttributeValues": codec.values(p=partition, batch=BATCH_PREFIX),
            }
            while True:
                if stop is not None and stop():
                    raise ReadCutShort("the open batches were not read in the time given")
                response = self._ddb.query(**kwargs)
                for item in response.get("Items", []):
                    if stop is not None and stop():
                        raise ReadCutShort("the open batches were not read in the time given")
                    batch = self.find(item["pk"]["S"][len(BATCH_PREFIX) :])
                    if batch is not None and not batch.status.is_terminal:
                        found.append(batch)
                if "LastEvaluatedKey" not in response:
                    break
                kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return found

    def unfinished_items(self, batch: BatchRecord) -> int:
        """How many of the batch's written items are not ended, each with a message in its lane
        (queued, or in flight while one runs). The sweep index's count leaves items out
        (`JobRepository.count_unfinished`): a requeued or recovered item is in both."""
        # (the shards alone: what runs makes no difference here, so the share is not read)
        counts = batch.final_counts or self._ended_counts(batch)
        ended = (
            counts.succeeded + counts.failed + counts.canceled + counts.expired - batch.unexpanded_canceled
        )
        return max(0, batch.expanded - ended)

    def running_items(self, batch: BatchRecord) -> list[str]:
        """The batch's items holding a slot now: its holders in the tenant's share (one read)."""
        share = self._ddb.get_item(
            TableName=self.table_name,
            Key=share_key(batch.tenant_id),
            ProjectionExpression="#h",
            ExpressionAttributeNames={"#h": holders_of(batch.lane)},
            ConsistentRead=True,
        ).get("Item", {})
        holders = codec.plain(share).get(holders_of(batch.lane), {}) or {}
        return [str(job_id) for job_id in holders if (batch_of(str(job_id)) or ("",))[0] == batch.id]

    def ended(self, batch: BatchRecord) -> BatchRequestCounts | None:
        """The counts when every item has ended (no share read: nothing runs then); else None."""
        if not batch.expansion_over:
            return None
        counts = self._ended_counts(batch)
        if counts.queued:
            return None
        return counts

    def items(self, batch: BatchRecord, start: int, count: int) -> list[tuple[int, JobRecord | None]]:
        """Items [start, start + count) of the batch, each with its job (None: not written yet,
        or gone), as a result line reads it: never its input (`_RESULT_ATTRIBUTES`).

        An item past its retention is gone, whether or not DynamoDB's TTL has deleted it yet
        (DESIGN §3.8), as GET /v1/jobs/{id} answers it: a kept batch's page listed such an
        item, with a link to its 404, until the TTL ran and then answered 410 (hunt 301)."""
        indexes = list(range(start, min(batch.total, start + count)))
        found = self._get_many(
            [{"pk": {"S": item_job_id(batch.id, index)}} for index in indexes], _RESULT_ATTRIBUTES
        )
        jobs = {key: codec.from_item(item) for key, item in found.items()}
        oldest_ms = self._own_items_since_ms(batch)
        now_s = self.now_ms() // 1000
        return [
            (
                index,
                job if job is not None and job.created_ms >= oldest_ms and job.expires_at > now_s else None,
            )
            for index, job in ((index, jobs.get(item_job_id(batch.id, index))) for index in indexes)
        ]

    def _own_items_since_ms(self, batch: BatchRecord) -> int:
        """An item created before this is an earlier batch's under the same id (an
        Idempotency-Key reused after its retention, the item not yet deleted by DynamoDB's TTL,
        or kept past its batch for its webhook's retries): this batch has not written its own
        yet. Such an item is a whole retention older, the earlier batch's: half of the
        shortest any deployment may have, not this deployment's (a deploy that raised it
        would take the earlier batch's items for this one's), is margin enough that the clocks
        of the api (the batch's) and the worker (its items') never mistake a batch's own item
        for an earlier one's."""
        return batch.created_ms - MIN_RETENTION_DAYS * 86_400 * 500

    def _get_many(
        self, keys: list[dict[str, Any]], attributes: tuple[str, ...] = ()
    ) -> dict[str, dict[str, Any]]:
        """Items of the table by pk (only `attributes` of them, if named), consistent."""
        return aws.get_items(self._ddb, self.table_name, keys, attributes)

    # ---- expansion ----------------------------------------------------------------------

    def write_items(
        self, batch: BatchRecord, start: int, jobs: list[JobRecord], writer: str | None = None
    ) -> bool:
        """One transaction: items [start, start + len(jobs)) put, each only if absent, and the
        checkpoint moved from `start` past them, naming the run that wrote them (`writer`);
        nothing if the checkpoint is elsewhere (another expansion wrote them) or the batch was
        asked to cancel. True when this call wrote them."""
        end = start + len(jobs)
        puts = [
            {
                "Put": {
                    "TableName": self.table_name,
                    # Not in the reconciler's sweep index while queued: the expansion queues its
                    # own items again after a crash, and a backlog of 100,000 items waiting for
                    # the tenant's cap would fill every sweep. A claim indexes the item (its lease).
                    "Item": codec.to_item(job),
                    # An item past its TTL but not yet deleted by DynamoDB counts as gone, and so
                    # does an earlier batch's under the same id, ended, however long it is kept
                    # (an earlier release kept items past their batch for their webhooks'
                    # retries). Never one running: its worker holds a lease and its tenant's
                    # slot under this id, and the chunk waits for it to end or be recovered.
                    "ConditionExpression": "attribute_not_exists(pk) OR (#st <> :running AND (expires_at <= :now_s "
                    "OR (created_ms < :earlier AND #st IN (:succeeded, :failed, :canceled, :expired))))",
                    "ExpressionAttributeNames": {"#st": "status"},
                    "ExpressionAttributeValues": codec.values(
                        now_s=int(self._clock()),
                        earlier=self._own_items_since_ms(batch),
                        running=JobStatus.RUNNING.value,
                        **{status.value: status.value for status in TERMINAL_STATUSES},
                    ),
                }
            }
            for job in jobs
        ]
        status = BatchStatus.IN_PROGRESS if end >= batch.total else BatchStatus.VALIDATING
        checkpoint = {
            "Update": {
                "TableName": self.table_name,
                "Key": batch_key(batch.id),
                # Every chunk before this one was queued first (`BatchExpander.expand`).
                "UpdateExpression": "SET expanded = :end, queued_to = :start, #st = :status, "
                f"expand_writer = :writer {_PROGRESSED}",
                "ConditionExpression": "expanded = :start AND cancel_requested = :false",
                "ExpressionAttributeNames": {"#st": "status"},
                "ExpressionAttributeValues": codec.values(
                    end=end, start=start, status=status.value, false=False, writer=writer or "-"
                ),
            }
        }
        # Item claims check the batch in their transactions: one may meet this chunk's on the
        # batch item (TransactionConflict, nothing applied). Tried again here, briefly.
        return _applied(
            lambda: _transact_through_conflicts(self._ddb, [checkpoint, *puts]), "an expansion chunk"
        )

    def mark_queued(self, batch_id: str, upto: int) -> None:
        """Every item before `upto` has had its lane message sent (`queued_to` only moves on)."""
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key=batch_key(batch_id),
                UpdateExpression="SET queued_to = :upto",
                ConditionExpression="attribute_exists(pk) AND (attribute_not_exists(queued_to) OR queued_to < :upto)",
                ExpressionAttributeValues=codec.values(upto=upto),
            )
        except ClientError as exc:
            if not codec.condition_failed(exc):
                raise

    def give_up_expansion(self, batch: BatchRecord) -> bool:
        """A canceled batch's items not written yet are canceled as never written, once: one
        transaction with the tenant's share, where they stop counting as active jobs."""
        rest = batch.total - batch.expanded
        update = {
            "Update": {
                "TableName": self.table_name,
                "Key": batch_key(batch.id),
                "UpdateExpression": "SET unexpanded_canceled = :rest",
                "ConditionExpression": "expanded = :expanded AND cancel_requested = :true "
                "AND (attribute_not_exists(unexpanded_canceled) OR unexpanded_canceled = :zero)",
                "ExpressionAttributeValues": codec.values(
                    rest=rest, expanded=batch.expanded, true=True, zero=0
                ),
            }
        }
        items = [update, shares.release_many(self.table_name, batch.tenant_id, rest)]
        return _applied(
            lambda: self._ddb.transact_write_items(TransactItems=items), "a canceled batch's unwritten items"
        )

    # ---- an upload's validation ----------------------------------------------------------

    def checkpoint_scan(
        self, batch: BatchRecord, parts: list[int], scan_bytes: int, scan_lines: int
    ) -> BatchRecord | None:
        """The validation stored one more part: its progress moves on, only from where `batch`
        had it (two runs of one validation race here, and only one moves it past). None
        otherwise."""
        # Also where it already stands: this very write, applied on a try whose answer was lost
        # (or a second run that stored the same part; parts are the same bytes either way).
        return self._update_while_open(
            batch.id,
            f"SET parts = :parts, scan_bytes = :bytes, scan_lines = :lines {_PROGRESSED}",
            {
                "parts": parts,
                "bytes": scan_bytes,
                "lines": scan_lines,
                "from": batch.scan_bytes,
                "false": False,
            },
            "validated = :false AND (scan_bytes = :from OR scan_bytes = :bytes)",
        )

    def admit_upload(
        self, batch: BatchRecord, total: int, parts: list[int], caps: tuple[int, int], default_max_active: int
    ) -> BatchRecord | None:
        """The file is valid: one transaction sets its count and parts and admits its items as
        the tenant's active jobs (`shares.admit_many`), as an inline batch's accept does. None
        when another run admitted it first, or it was canceled meanwhile; QuotaExceeded when
        its items do not fit, and nothing is written."""
        state = self.share(batch.tenant_id)
        limit = state.max_active_jobs or default_max_active
        if total > limit:
            raise exceeds_quota(total, limit)
        if state.active + total > limit:
            raise over_quota(state, total, default_max_active, self.config)
        update = {
            "Update": {
                "TableName": self.table_name,
                "Key": batch_key(batch.id),
                "UpdateExpression": "SET #total = :total, parts = :parts, validated = :true, scan_bytes = :bytes",
                "ConditionExpression": "#st = :validating AND validated = :false AND cancel_requested = :false",
                "ExpressionAttributeNames": {"#st": "status", "#total": "total"},
                "ExpressionAttributeValues": codec.values(
                    total=total,
                    parts=parts,
                    true=True,
                    false=False,
                    bytes=batch.scan_bytes,
                    validating=BatchStatus.VALIDATING.value,
                ),
            }
        }
        tries_left = _OVERRIDE_RACE_TRIES
        while True:
            tries_left -= 1
            admit = shares.admit_many(
                self.table_name,
                batch.tenant_id,
                batch.lane,
                caps,
                total,
                state,
                default_max_active,
                whole_lane=self._not_its_own_lane(batch),
            )
            try:
                # (the share item is in every claim and end of the tenant's jobs: a busy tenant's
                # admission may meet one, and is tried again, not left to a new expand message
                # whose run reads every stored part again)
                _transact_through_conflicts(self._ddb, [update, admit])
            except ClientError as exc:
                reasons = _reasons(exc)
                if reasons and reasons[0].get("Code") == "ConditionalCheckFailed":
                    return None
                if len(reasons) > 1 and reasons[1].get("Code") == "ConditionalCheckFailed":
                    found = ShareState.from_item(batch.tenant_id, reasons[1].get("Item"))
                    if tries_left and fits_quota(found, total, default_max_active):
                        state = found  # (the override moved: see `fits_quota`)
                        continue
                    raise over_quota(found, total, default_max_active, self.config) from exc
                _raise_retryable(exc, "an upload's admission")
                raise
            return batch.model_copy(update={"total": total, "parts": parts, "validated": True})

    def fail(self, batch: BatchRecord, errors: list[BatchLineError]) -> BatchRecord | None:
        """An upload refused before any item was written: the batch ends `failed` with the
        reasons, its webhook set pending when subscribed. None when it had ended already, or
        its client asked to cancel it meanwhile: then it ends `canceled`, as asked, not failed
        for a line the client no longer wanted read (`batch_runs.stop`, which a cancel's own
        message runs without reading the file)."""
        extra = {**_errors(errors), "false": False}
        condition = "validated = :false AND cancel_requested = :false"
        return self._end(batch, BatchStatus.FAILED, BatchRequestCounts(), extra, condition)

    def note_dead_letter(
        self, batch: BatchRecord, message_id: str, redrive_round: int = 0
    ) -> BatchRecord | None:
        """One of the batch's expand messages dead-lettered; idempotent per DLQ message. None
        when the batch has ended, or when the message was sent in a round already answered
        (`redrive_round`, from its body: `policy.fresh_letter_condition`): several expand
        messages in flight that dead-letter in one round are one crash, answered once, and
        the one conditional update that counts makes two letters handled at once count once."""
        counted = self._update_while_open(
            batch.id,
            f"ADD dead_letter_ids :ids, {COUNTED_LETTERS} :ids, redrive_round :one",
            {"ids": {message_id}, "round": redrive_round, "one": 1, "letter": message_id},
            fresh_letter_condition(redrive_round),
            finalizing=True,
        )
        if counted is not None:
            return counted
        # This letter handled again (its re-send cut short): it still counts, once.
        return self._update_while_open(
            batch.id,
            "ADD dead_letter_ids :ids",
            {"ids": {message_id}, "letter": message_id},
            "contains(dead_letter_ids, :letter)",
            finalizing=True,
        )

    def stop_sweeping(self, batch: BatchRecord) -> None:
        """The reconciler stops looking at the batch (not yet ended): its every look crashed a
        worker."""
        self._update_while_open(batch.id, "REMOVE sweep_pk, sweep_at", {}, finalizing=True)

    # ---- cancel and end -----------------------------------------------------------------

    def request_cancel(
        self, batch: BatchRecord, errors: list[BatchLineError] | None = None, *, by_client: bool = False
    ) -> BatchRecord | None:
        """Flag the batch canceling (with `errors`: why, when llmq cancels it; `by_client`: the
        client asked); None when it has ended (or is finalizing) meanwhile. Idempotent."""
        extra = _errors(errors) if errors else {}
        return self._update_while_open(
            batch.id,
            "SET cancel_requested = :true, #st = :canceling"
            + (", client_canceled = :true" if by_client else "")
            + "".join(f", {name} = :{name}" for name in extra),
            {"true": True, "canceling": BatchStatus.CANCELING.value, **extra},
        )

    def finish(
        self,
        batch: BatchRecord,
        counts: BatchRequestCounts,
        condition: str | None = None,
        results_key: str | None = None,
        errors: list[BatchLineError] | None = None,
    ) -> BatchRecord | None:
        """The batch's one terminal write, with its final counts (and its results file, or the
        `errors` why there is none); its webhook set pending when subscribed. None when another
        writer ended it first (or `condition` failed)."""
        extra: dict[str, Any] = {"false": False} if condition and ":false" in condition else {}
        if results_key is not None:
            extra["results_key"] = results_key
        if errors:
            extra |= _errors(errors)
        return self._end(batch, final_status(batch, counts), counts, extra, condition)

    # ---- the results file ---------------------------------------------------------------

    def begin_finalizing(self, batch: BatchRecord, counts: BatchRequestCounts) -> BatchRecord | None:
        """Every item has ended: the counts are final, and the results file is to be written
        before the terminal status. None when another caller began (or ended) it first."""
        return self._update_while_open(
            batch.id,
            f"SET #st = :finalizing, final_counts = :counts, compile_next = :zero, finalizing_ms = :now {_PROGRESSED}",
            {
                "finalizing": BatchStatus.FINALIZING.value,
                "counts": counts.model_dump_json(),
                "zero": 0,
                "now": self.now_ms(),
            },
        )

    def mark_compile_queued(self, batch_id: str) -> None:
        """The message that has a worker write the results file was sent."""
        self._ddb.update_item(
            TableName=self.table_name,
            Key=batch_key(batch_id),
            UpdateExpression="SET compile_queued = :true",
            ExpressionAttributeValues={":true": {"BOOL": True}},
        )

    def start_compile(self, batch: BatchRecord, upload_id: str) -> BatchRecord | None:
        """The results file's multipart upload, recorded once: None when another run's was."""
        return self._update_while_open(
            batch.id,
            "SET compile_upload_id = :upload",
            {"upload": upload_id},
            "attribute_not_exists(compile_upload_id)",
            finalizing=True,
        )

    def restart_compile(self, batch: BatchRecord) -> BatchRecord | None:
        """The results file's upload is gone unfinished (aborted): forget it, to begin again.
        None when another run did so, or moved on, first."""
        return self._update_while_open(
            batch.id,
            "SET compile_next = :zero, compile_parts = :none REMOVE compile_upload_id",
            {"zero": 0, "none": [], "upload": batch.compile_upload_id},
            "compile_upload_id = :upload",
            finalizing=True,
        )

    def checkpoint_compile(self, batch: BatchRecord, next_index: int, etags: list[str]) -> BatchRecord | None:
        """One more part of the results file uploaded: the compile moves on from where `batch`
        had it, or stands where this very write (its answer lost) already put it."""
        return self._update_while_open(
            batch.id,
            f"SET compile_next = :next, compile_parts = :parts, compile_stalls = :zero {_PROGRESSED}",
            {"next": next_index, "parts": etags, "from": batch.compile_next, "zero": 0},
            "(compile_next = :from OR compile_next = :next)",
            finalizing=True,
        )

    def note_compile_stall(self, batch: BatchRecord, run: str) -> BatchRecord | None:
        """A run of the results file handed on with no part written: counted once per `run`
        (botocore's retry of a write applied with its answer lost counts nothing more: review
        256), while the checkpoint stands where `batch` had it. None when it moved on (another
        run wrote a part), or this run was counted already."""
        written = self._update_while_open(
            batch.id,
            "SET compile_stalls = if_not_exists(compile_stalls, :zero) + :one, compile_stall_run = :run",
            {"zero": 0, "one": 1, "next": batch.compile_next, "run": run},
            "compile_next = :next AND (attribute_not_exists(compile_stall_run) OR compile_stall_run <> :run)",
            finalizing=True,
        )
        if written is None:
            # (refused: this run's own write, applied with its answer lost, is the batch as it
            # stands; review 257: the stall that ended the file went unseen, a run more spent)
            found = self.find(batch.id)
            if (
                found is not None
                and found.compile_stall_run == run
                and found.compile_next == batch.compile_next
            ):
                return found
        return written

    def _end(
        self,
        batch: BatchRecord,
        status: BatchStatus,
        counts: BatchRequestCounts,
        extra: dict[str, Any],
        condition: str | None,
    ) -> BatchRecord | None:
        """The terminal write: `extra` values are SET under their own names (a `false` is a
        condition's). A batch with no webhook due leaves the reconciler's sweep index here;
        one with a webhook due, once it is sent (`mark_webhook_sent`)."""
        sets = ["#st = :status", "finished_ms = :now", "final_counts = :counts"]
        sets += [f"{name} = :{name}" for name in extra if name != "false"]
        values: dict[str, Any] = {
            "status": status.value,
            "now": self.now_ms(),
            "counts": counts.model_dump_json(),
            **extra,
        }
        # Ended near the end of its retention (its items expired at their claims, say), or
        # after it (its results file, or its last item's message, came late): the batch, which
        # its webhook, GET and results read, is kept for its event's retries, as its items are
        # (`JobRepository._finish`), and so outlives every item it kept: a new batch under its
        # reused Idempotency-Key would otherwise meet a kept item as it writes its items, and
        # never expand. Its count shards, named by the old `expires_at`, are read no more: the
        # counts are final from here on.
        now_s = self.now_ms() // 1000
        outlive = now_s + self.config.terminal_event_seconds
        if batch.expires_at < outlive:
            sets.append("expires_at = :keep_until")
            values["keep_until"] = outlive
        expression = ""
        if batch.wants(BATCH_EVENT_FOR_STATUS[status]):
            sets.append("delivery_status = :pending")
            values["pending"] = DeliveryStatus.PENDING.value
        else:
            expression = " REMOVE sweep_pk, sweep_at"
        # Only the batch read: a new one under its id (its Idempotency-Key reused once its
        # retention passed) must never take an old batch's late end, counts and keep.
        values["read_created"] = batch.created_ms
        same = "created_ms = :read_created"
        return self._update_while_open(
            batch.id,
            f"SET {', '.join(sets)}{expression}",
            values,
            f"{condition} AND {same}" if condition else same,
            finalizing=True,
        )

    def _update_while_open(
        self,
        batch_id: str,
        expression: str,
        values: dict[str, Any],
        condition: str | None = None,
        *,
        finalizing: bool = False,
    ) -> BatchRecord | None:
        """One UpdateItem of a batch that has not ended (and meets `condition`); the batch as
        written, or None. A finalizing batch (its items all ended, its results file being
        written) is open only to the writes that finish it (`finalizing`)."""
        statuses = [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.CANCELING]
        if finalizing:
            statuses.append(BatchStatus.FINALIZING)
        status_in, named = _status_in(statuses)
        for attempt in range(_CHUNK_TRIES):
            try:
                response = self._ddb.update_item(
                    TableName=self.table_name,
                    Key=batch_key(batch_id),
                    UpdateExpression=expression,
                    ConditionExpression=status_in + (f" AND {condition}" if condition else ""),
                    ExpressionAttributeNames={"#st": "status"},
                    ExpressionAttributeValues=codec.values(**values, **named),
                    ReturnValues="ALL_NEW",
                )
                return _from_item(response["Attributes"])
            except ClientError as exc:
                if codec.condition_failed(exc):
                    return None
                raise
            except StoreUnavailable as exc:
                # Every claim of an item checks the batch in its transaction (`not_canceled`):
                # a write that meets one (TransactionConflictException, which botocore does not
                # retry) is tried again after a pause, rather than answered 503.
                cause = getattr(exc.__cause__, "response", None) or {}
                if (
                    cause.get("Error", {}).get("Code") != "TransactionConflictException"
                    or attempt + 1 == _CHUNK_TRIES
                ):
                    raise
                _conflict_pause(attempt)
        return None

    def mark_redelivery(self, batch: BatchRecord) -> BatchRecord:
        """Redelivery: the ended batch's event goes out again, a new round of attempts under the
        same webhook-id. Pending and unsent, and in the reconciler's sweep index until it is
        sent (should SQS refuse the message, the reconciler's poke sends it).

        Only the batch read (not one made since under its reused Idempotency-Key); and one whose
        retention ends before the new round's retries is kept for them, as its terminal write
        kept it (`_end`) and as a job's redelivery keeps the job
        (`JobRepository.mark_delivery_pending`): never past its retention, or its end if later,
        plus one round, however often it is redelivered (hunt 301: a redelivery accepted near
        the end found no batch at its first attempt, and was dropped, pending)."""
        now_ms = self.now_ms()
        now_s = now_ms // 1000
        sweep = self._sweep(batch.id, now_ms)
        status_in, named = _status_in([status for status in BatchStatus if status.is_terminal])
        sets = [
            "delivery_status = :pending",
            "delivery_attempts = :zero",
            "webhook_sent = :false",
            "redelivered_ms = :now",
            "sweep_pk = :sweep_pk",
            "sweep_at = :sweep_at",
        ]
        retained_s = max(
            batch.created_ms // 1000 + self.config.retention_seconds, (batch.finished_ms or 0) // 1000
        )
        outlive = min(now_s, retained_s) + self.config.terminal_event_seconds
        keep: dict[str, Any] = {}
        if now_s < batch.expires_at < outlive:
            sets.append("expires_at = :keep_until")
            keep["keep_until"] = outlive
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key=batch_key(batch.id),
                UpdateExpression=f"SET {', '.join(sets)} "
                "REMOVE delivery_next_ms, delivery_carrier ADD delivery_round :one",
                ConditionExpression=f"{status_in} AND created_ms = :read_created",
                ExpressionAttributeNames={"#st": "status"},
                ExpressionAttributeValues=codec.values(
                    pending=DeliveryStatus.PENDING.value,
                    zero=0,
                    one=1,
                    false=False,
                    now=now_ms,
                    read_created=batch.created_ms,
                    **keep,
                    **sweep,
                    **named,
                ),
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if codec.condition_failed(exc):
                raise BatchNotEnded(f"batch {batch.id} has not ended") from exc
            raise
        except StoreUnavailable:
            # Applied with every answer lost, perhaps: a round past the one read is there (this
            # request's or another's, unsent either way), answered as accepted, not a 503 whose
            # retry starts another round (review 277; `JobRepository.mark_delivery_pending`).
            try:
                found = self.find(batch.id)
            except StoreUnavailable:
                found = None
            if found is None or not a_later_round(found, batch):
                raise
            return found
        return _from_item(response["Attributes"])

    def mark_webhook_sent(self, batch_id: str, delivery_round: int) -> None:
        """The ended batch's webhook message of `delivery_round` went. Its first attempt not yet
        recorded, the batch stays in the reconciler's index a `stale_webhook_seconds` from now:
        should the message be lost before any attempt (the webhooks DLQ), the reconciler sends
        it again (`Reconciler._poke`), as a job's. An attempt recorded first (this write was
        slow) keeps the index entry it set (`record_delivery`), and a settled delivery stays out.
        A later round (a redelivery asked for meanwhile, whose own send may have failed and left
        it due in the index) is not this message's: it is left as it is (hunt 318)."""
        due = self.now_ms() + self.config.reconciler.stale_webhook_seconds * 1000
        sweep = sweep_attributes(BATCH_PREFIX + batch_id, due, self.config.reconciler.sweep_shards)
        # (round 0 is stored as no attribute: `mark_redelivery` ADDs to it)
        this_round = (
            "(attribute_not_exists(delivery_round) OR delivery_round = :round)"
            if delivery_round == 0
            else "delivery_round = :round"
        )
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key=batch_key(batch_id),
                UpdateExpression="SET webhook_sent = :true, sweep_pk = :sweep_pk, sweep_at = :sweep_at",
                ConditionExpression=f"{this_round} AND delivery_status = :pending"
                " AND attribute_not_exists(delivery_next_ms)",
                ExpressionAttributeValues=codec.values(
                    true=True, pending=DeliveryStatus.PENDING.value, round=delivery_round, **sweep
                ),
            )
        except ClientError as exc:
            if not codec.condition_failed(exc):
                raise
            try:
                self._ddb.update_item(
                    TableName=self.table_name,
                    Key=batch_key(batch_id),
                    UpdateExpression="SET webhook_sent = :true",
                    ConditionExpression=this_round,
                    ExpressionAttributeValues=codec.values(true=True, round=delivery_round),
                )
            except ClientError as later:
                if not codec.condition_failed(later):
                    raise

    def record_delivery(
        self,
        batch_id: str,
        status: DeliveryStatus,
        status_code: int | None,
        attempts: int,
        attempt: DeliveryAttempt | None = None,
        next_attempt_at_ms: int | None = None,
        log_seq: int = 0,
        expires_at: int | None = None,
        carrier: str | None = None,
        created_ms: int | None = None,
        ended_ms: int | None = None,
    ) -> bool:
        """What became of attempt `attempts` of the batch's event, counted only if it is the one
        after those the batch counted (another copy of the message may have counted it first),
        with the attempt in the delivery log (its slot: the attempt's own number in the
        batch's log, as a job's) and when the next is due: one update. False otherwise.

        With the batch's `expires_at` as read, a next attempt due after it (a receiver's long
        Retry-After near the end of the retention) keeps the batch until then, first, as a
        job's delivery does (`JobRepository.record_delivery`): the attempt would find no batch.
        With its `created_ms`, never past its retention (or its end, `ended_ms`, if later: review
        264) and `delivery_keep_seconds`."""
        if status is DeliveryStatus.PENDING and next_attempt_at_ms is not None and expires_at is not None:
            keep_until_s = next_attempt_at_ms // 1000 + 3 * self.config.reconciler.stale_webhook_seconds
            if created_ms is not None:
                keep_until_s = min(keep_until_s, self.config.kept_until_s(created_ms, ended_ms))
            if self.now_ms() // 1000 < expires_at < keep_until_s:
                self._keep_until(batch_id, keep_until_s)
        sets = ["delivery_status = :status"]
        values: dict[str, Any] = {
            "status": status.value,
            "attempts": attempts,
            "pending": "pending",
            "previous": attempts - 1,
        }
        removes = []
        if status is DeliveryStatus.PENDING and carrier is not None:
            sets.append("delivery_carrier = :carrier")
            values["carrier"] = carrier
        else:
            removes.append("delivery_carrier")
        if next_attempt_at_ms is None:
            removes.append("delivery_next_ms")
        else:
            sets.append("delivery_next_ms = :due")
            values["due"] = next_attempt_at_ms
        if attempt is not None:
            # `log_seq` as the dispatcher read it, or the stored latest if the log moved on
            # since (`job_codec.written_in_the_log`); the sequence only moves on (ADD).
            sets.append(f"{codec.delivery_log_slot(log_seq)} = :log")
            values["log"] = {**attempt.model_dump(mode="json", exclude_none=True), "seq": log_seq}
        if status_code is not None:
            sets.append("delivery_last_status_code = :code")
            values["code"] = status_code
        if status is DeliveryStatus.DELIVERED:
            sets.append("delivered_ms = :now")
            values["now"] = self.now_ms()
        # While an attempt is due, the batch is in the reconciler's sweep index, a while after
        # it is due: should its message be lost (the webhooks DLQ), the reconciler sends the
        # event again (`Reconciler._poke`), as it does for a job's. Settled, it leaves.
        if status is DeliveryStatus.PENDING:
            due = (next_attempt_at_ms or self.now_ms()) + self.config.reconciler.stale_webhook_seconds * 1000
            sweep = sweep_attributes(BATCH_PREFIX + batch_id, due, self.config.reconciler.sweep_shards)
            sets += ["sweep_pk = :sweep_pk", "sweep_at = :sweep_at"]
            values.update(sweep)
        else:
            removes += ["sweep_pk", "sweep_at"]
        # A fresh token per attempt: a retry of this write (its answer lost) that finds it was
        # applied already is told from another copy's, which counted the attempt first.
        token = codec.write_token("delivery")
        sets.append("delivery_write = :token")
        values["token"] = token

        def update(sets: list[str], count: str) -> str:
            written = f"SET {', '.join([*sets, f'delivery_attempts = {count}'])}"
            written += f" REMOVE {', '.join(removes)}" if removes else ""
            return written + (f" ADD {codec.DELIVERY_LOG_SEQ} :one" if attempt is not None else "")

        values["one"] = 1
        condition = "delivery_status = :pending AND delivery_attempts = :previous"
        final = status in (DeliveryStatus.DELIVERED, DeliveryStatus.DISABLED)
        if final:
            # A final answer (a success, a 410) counts its own attempt once, even after another
            # copy counted the same attempt failed (or gave up on it), as a job's does; and it
            # still counts after the delivery failed.
            values["failed"] = DeliveryStatus.FAILED.value
            condition = (
                "delivery_status IN (:pending, :failed) AND delivery_attempts BETWEEN :previous AND :attempts"
            )
        logged = log_seq if attempt is not None else None

        def written(
            count: str, condition: str, counts: tuple[int, int], at: int | None = None
        ) -> Mapping[str, Any] | None:
            def write(sets: list[str], condition: str) -> Mapping[str, Any] | None:
                return self._record_delivery_write(batch_id, update(sets, count), condition, values, token)

            def holds(old: Mapping[str, Any]) -> bool:
                return codec.delivery_holds(old, statuses, *counts)

            return codec.written_in_the_log(write, sets, condition, values, logged, holds, at)

        statuses = {values["pending"], values["failed"]} if final else {values["pending"]}
        old = written(":attempts", condition, (attempts - 1, attempts if final else attempts - 1))
        if old is None or not final:
            return old is None
        stored = int(old.get("delivery_attempts", {}).get("N", "0"))
        moves = old.get("delivery_status", {}).get("S") in statuses
        if not moves or attempts - 1 <= stored <= attempts:
            return False  # (refused on nothing it can follow: not a count that moved)
        # Another copy counted a later attempt since (the count stays its), or a redelivery
        # started a new round since this attempt was read (it counts as one of that round's):
        # the answer stands either way, while the count is still what was read; its log entry
        # goes after the stored latest, which may be the new round's.
        values["stored"] = stored
        values["next_count"] = stored if stored > attempts else stored + 1
        condition = "delivery_status IN (:pending, :failed) AND delivery_attempts = :stored"
        return written(":next_count", condition, (stored, stored), codec.stored_log_seq(old)) is None

    def _record_delivery_write(
        self, batch_id: str, update: str, condition: str, values: dict[str, Any], token: str
    ) -> Mapping[str, Any] | None:
        """One delivery record's UpdateItem: None when it was applied (or was this one's own
        write, applied with its answer lost), else the item as its condition found it."""
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key=batch_key(batch_id),
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

    def _keep_until(self, batch_id: str, until_s: int) -> None:
        """The batch is kept until `until_s` at least (its retention only ever moves out). Its
        count shards are read no more once it has ended (`final_counts`)."""
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key=batch_key(batch_id),
                UpdateExpression="SET expires_at = :until",
                ConditionExpression="attribute_exists(pk) AND expires_at < :until",
                ExpressionAttributeValues={":until": {"N": str(until_s)}},
            )
        except ClientError as exc:
            if not codec.condition_failed(exc):
                raise


def exceeds_quota(count: int, limit: int) -> BatchExceedsQuota:
    """A batch of more requests than the tenant may have active at all: no wait lets it in."""
    return BatchExceedsQuota(
        f"this batch has {count} requests and this tenant may have at most {limit} jobs queued or "
        "running: split it into batches of at most that many"
    )


# Accepts of a batch tried against the quota in force, should an operator's override of it
# move between their read and their write (`fits_quota`).
_OVERRIDE_RACE_TRIES = 3


def fits_quota(found: ShareState, count: int, default_max_active: int) -> bool:
    """Whether `count` more active jobs fit the quota of the share as a refusal found it. A
    batch's accept holds the operator's override as it read it (`shares.admit_many`: a
    condition has no arithmetic), so an override set, raised or cleared meanwhile refuses a
    batch that fits (hunt 330: `set-limits --max-active` raised for a tenant's big batch failed
    it `quota_exceeded`, "2 queued ... adds 3; at most 500"): it is tried again against it."""
    return found.active + count <= (found.max_active_jobs or default_max_active)


def over_quota(state: ShareState, count: int, default_max_active: int, config: LlmqConfig) -> QuotaExceeded:
    limit = state.max_active_jobs or default_max_active
    return QuotaExceeded(
        f"{state.active} jobs are queued or running and this batch adds {count}; this tenant may have "
        f"at most {limit}",
        retry_after=config.fair_share.quota_retry_after_seconds,
    )


def _status_in(statuses: list[BatchStatus]) -> tuple[str, dict[str, str]]:
    """A condition that the batch's status (`#st`) is one of `statuses`, and its values."""
    named = {f"status{index}": status.value for index, status in enumerate(statuses)}
    return f"#st IN ({', '.join(':' + name for name in named)})", named


def send_expand(queues: QueueStore, batch: BatchRecord) -> None:
    """The batch's expand message, of the batch's current round (`LaneMessage.redrive_round`):
    every sender holding the record goes through here, so none leaves the round out."""
    queues.enqueue_expand(batch.id, batch.lane, batch.tenant_id, redrive_round=batch.redrive_round)


def out_of_time(remaining_seconds: float, slowest: float) -> bool:
    """A batch's long work (its expansion, an upload's validation, its results file) hands the
    rest to a new message when its Lambda has less time left than three of its slowest steps so
    far, and at least two seconds: a large batch never spends its message's receives."""
    return remaining_seconds < max(2.0, 3 * slowest)


def _reasons(exc: ClientError) -> list[dict[str, Any]]:
    if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
        return []
    return list(exc.response.get("CancellationReasons") or [])  # type: ignore[arg-type]


_CHUNK_TRIES = 4


def _conflict_pause(attempt: int) -> None:
    time.sleep(_CONFLICT_PAUSE_SECONDS * (1 + random.random()) * (attempt + 1))


def _transact_through_conflicts(ddb: Any, items: list[dict[str, Any]]) -> None:
    """One TransactWriteItems, tried again a few times when canceled only by a conflict or a
    throttle (nothing was applied); the last refusal is raised as DynamoDB gave it."""
    for attempt in range(_CHUNK_TRIES):
        try:
            ddb.transact_write_items(TransactItems=items)
            return
        except ClientError as exc:
            codes = {reason.get("Code") for reason in _reasons(exc)} - {None, "None"}
            if not codes or not codes <= codec.RETRYABLE_TRANSACTION_REASONS or attempt + 1 == _CHUNK_TRIES:
                raise
            _conflict_pause(attempt)


_CONFLICT_PAUSE_SECONDS = 0.05


def _applied(transact: Callable[[], object], what: str) -> bool:
    """True when the transaction was applied; False when a condition refused it. A conflict or
    a throttle is StoreContended (`_raise_retryable`); anything else as DynamoDB raised it."""
    try:
        transact()
    except ClientError as exc:
        if any(reason.get("Code") == "ConditionalCheckFailed" for reason in _reasons(exc)):
            return False
        _raise_retryable(exc, what)
        raise
    return True


def _raise_retryable(exc: ClientError, what: str) -> None:
    """A transaction canceled by a conflict or a throttle was not applied: StoreContended."""
    codes = {reason.get("Code") for reason in _reasons(exc)}
    if codes & codec.RETRYABLE_TRANSACTION_REASONS:
        raise StoreContended(f"{what}: {sorted(c for c in codes if c)}") from exc
