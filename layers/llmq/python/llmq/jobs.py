"""The job repository: every write of DESIGN §3, each a single conditional DynamoDB call.

Nothing above this module sees botocore: `ClientError` codes become domain outcomes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from llmq import aws
from llmq.config import LlmqConfig
from llmq.errors import (
    CancelRequested,
    InvalidCursor,
    ItemTooLarge,
    JobNotCancelable,
    JobNotFound,
    LeaseLost,
    PayloadTooLarge,
)
from llmq.item_size import item_size_bytes
from llmq.models import (
    EVENT_FOR_STATUS,
    ChatMessage,
    DeliveryStatus,
    ErrorCode,
    GenerationParams,
    Job,
    JobError,
    JobResult,
    JobStatus,
    JobWebhook,
    WebhookDelivery,
    WebhookEvent,
)
from llmq.payloads import PayloadStore

TENANT_INDEX = "by_tenant"
SWEEP_INDEX = "by_sweep"
# The sparse reconciler index is sharded: `sweep#<n>` by a hash of the job id, so job writes
# spread over the index's partitions instead of all landing on one hot key. Items written
# before sharding carry the bare prefix; the reconciler still reads that partition.
SWEEP_PREFIX = "sweep"
# Room kept under DynamoDB's 400 KB for the attributes a later write adds to the item
# (the error of a retry, the delivery record, the write token).
_ITEM_HEADROOM_BYTES = 4096

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()

Clock = Callable[[], float]


def sweep_partition(job_id: str, shards: int) -> str:
    digest = hashlib.sha256(job_id.encode()).digest()
    return f"{SWEEP_PREFIX}#{int.from_bytes(digest[:4], 'big') % shards}"


def sweep_partitions(shards: int) -> list[str]:
    return [SWEEP_PREFIX, *(f"{SWEEP_PREFIX}#{shard}" for shard in range(shards))]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id(tenant_id: str, idempotency_key: str | None, now_ms: int) -> str:
    """Derived from (tenant, key) when a key is given, so a replay hits the same PutItem condition."""
    if idempotency_key is not None:
        digest = hashlib.sha256(f"{tenant_id}\x00{idempotency_key}".encode()).digest()
        return "job_" + base64.b32encode(digest).decode().lower().rstrip("=")[:26]
    return f"job_{now_ms:012x}{secrets.token_hex(7)}"


class JobInput(BaseModel):
    """What the worker sends to the provider. Stored with the job, never in a queue message."""

    messages: list[ChatMessage]
    params: GenerationParams = Field(default_factory=GenerationParams)


class JobRecord(BaseModel):
    """A job as stored, including what the public Job hides (tenant, lease, input)."""

    id: str
    tenant_id: str
    status: JobStatus
    lane: str
    model: str
    # None when the input lives in S3 under `input_ref` (a claim brings it back).
    input: JobInput | None = None
    input_ref: str | None = None
    request_hash: str
    metadata: dict[str, str] = Field(default_factory=dict)
    created_ms: int
    started_ms: int | None = None
    finished_ms: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    lease_owner: str | None = None
    lease_expires_ms: int | None = None
    # After a transient failure: no claim before this time, whichever copy of its message comes.
    not_before_ms: int | None = None
    deadline_ms: int | None = None
    result: JobResult | None = None
    # Set when the result lives in S3; the API inlines it or hands out a presigned URL.
    result_ref: str | None = None
    result_url: str | None = None
    error: JobError | None = None
    webhook_url: str | None = None
    webhook_events: list[WebhookEvent] = Field(default_factory=list)
    delivery_status: DeliveryStatus | None = None
    delivery_attempts: int = 0
    delivery_last_status_code: int | None = None
    delivered_ms: int | None = None
    expires_at: int
    # The token of the last conditional write. A write retried after its response was lost
    # finds its own token in the item and knows it was applied (DESIGN §3.10).
    last_write: str | None = None
    # The dead-lettered lane messages of a job no worker claimed, by message id: a set, so a
    # retried or repeated dead letter counts once.
    dead_letter_ids: set[str] = Field(default_factory=set)

    def wants(self, event: WebhookEvent) -> bool:
        return self.webhook_url is not None and event in self.webhook_events

    @property
    def terminal_event(self) -> WebhookEvent | None:
        return EVENT_FOR_STATUS[self.status] if self.status.is_terminal else None

    def to_job(self, api_base: str = "") -> Job:
        webhook = None
        if self.webhook_url is not None:
            webhook = JobWebhook(
                url=self.webhook_url,
                events=self.webhook_events,
                delivery=WebhookDelivery(
                    status=self.delivery_status,
                    attempts=self.delivery_attempts,
                    last_status_code=self.delivery_last_status_code,
                    delivered_at=iso(self.delivered_ms) if self.delivered_ms else None,
                ),
            )
        return Job(
            id=self.id,
            status=self.status,
            lane=self.lane,
            model=self.model,
            metadata=self.metadata,
            created_at=iso(self.created_ms),
            started_at=iso(self.started_ms) if self.started_ms else None,
            finished_at=iso(self.finished_ms) if self.finished_ms else None,
            attempts=self.attempts,
            cancel_requested=self.cancel_requested,
            result=self.result,
            result_url=self.result_url
            or (f"{api_base}/v1/jobs/{self.id}" if self.result is None and self.result_ref else None),
            error=self.error,
            webhook=webhook,
        )


_JSON_FIELDS = ("input", "result", "error")


def _json_text(value: Any) -> str:
    # Raw UTF-8, never \u escapes: an escaped CJK character costs 6 bytes of the item's
    # 400 KB instead of 3, and an emoji 12 instead of 4.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _to_item(record: JobRecord, extra: dict[str, Any]) -> dict[str, Any]:
    # The dead-letter set only ever grows through ADD (DynamoDB has no empty sets).
    data = record.model_dump(mode="json", exclude_none=True, exclude={"result_url", "dead_letter_ids"})
    for name in _JSON_FIELDS:
        if name in data:
            data[name] = _json_text(data[name])
    data["pk"] = data.pop("id")
    data.update(extra)
    return {key: _serializer.serialize(value) for key, value in data.items()}


def _from_item(item: dict[str, Any]) -> JobRecord:
    data = {key: _deserializer.deserialize(value) for key, value in item.items()}
    data["id"] = data.pop("pk")
    for name in _JSON_FIELDS:
        if name in data:
            data[name] = json.loads(data[name])
    for name in ("sweep_pk", "sweep_at", "tenant_created", "delivery_write"):
        data.pop(name, None)
    return JobRecord.model_validate(data)


def _values(**values: Any) -> dict[str, Any]:
    return {f":{key}": _serializer.serialize(value) for key, value in values.items()}


def _condition_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def _too_large(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    return error.get("Code") == "ValidationException" and "size" in str(error.get("Message", "")).lower()


def _token(kind: str) -> str:
    return f"{kind}#{uuid.uuid4().hex}"


def _old_item(exc: ClientError) -> JobRecord | None:
    item: dict[str, Any] | None = exc.response.get("Item")  # type: ignore[assignment]
    return _from_item(item) if item else None


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    NOT_FOUND = "not_found"
    TERMINAL = "terminal"
    LEASED_ELSEWHERE = "leased_elsewhere"
    DEADLINE_PASSED = "deadline_passed"
    # Queued, waiting out its retry backoff: a duplicate message must not run it early.
    NOT_YET_DUE = "not_yet_due"
    CANCEL_PENDING = "cancel_pending"
    CRASHES_EXHAUSTED = "crashes_exhausted"


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    job: JobRecord | None


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


class JobRepository:
    def __init__(
        self,
        table_name: str,
        config: LlmqConfig,
        clock: Clock = time.time,
        payloads: PayloadStore | None = None,
    ) -> None:
        self.table_name = table_name
        self.config = config
        self._clock = clock
        self.payloads = payloads

    @property
    def _ddb(self) -> Any:
        return aws.TranslatedClient("dynamodb")

    @property
    def _item_budget(self) -> int:
        return self.config.limits.max_item_payload_bytes

    def _sweep_pk(self, job_id: str) -> str:
        return sweep_partition(job_id, self.config.reconciler.sweep_shards)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # ---- accept -------------------------------------------------------------------------

    def create(self, record: JobRecord) -> Created:
        """One conditional PutItem. A replay of the same id returns the stored job instead.

        The put carries a fresh token: when botocore retries a put whose first try was
        applied but unanswered, the condition fails on our own item, and the token says so.
        """
        token = _token("create")
        extra = {
            "tenant_created": f"{record.created_ms:013d}#{record.id}",
            "sweep_pk": self._sweep_pk(record.id),
            "sweep_at": record.created_ms + self.config.reconciler.stale_queued_seconds * 1000,
        }
        item = self._item_for_create(record.model_copy(update={"last_write": token}), extra)
        try:
            self._ddb.put_item(
                TableName=self.table_name,
                Item=item,
                # An item past its TTL but not yet deleted by DynamoDB counts as gone.
                ConditionExpression="attribute_not_exists(pk) OR expires_at < :now_s",
                ExpressionAttributeValues=_values(now_s=int(self._clock())),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if _too_large(exc):
                raise ItemTooLarge("the job does not fit in one item") from exc
            if not _condition_failed(exc):
                raise
            existing = _old_item(exc)
            if existing is None:
                raise
            if existing.last_write == token:
                return Created(job=record, replayed=False)
            return Created(job=existing, replayed=True)
        return Created(job=record, replayed=False)

    def _store(self) -> PayloadStore:
        if self.payloads is None:
            raise PayloadTooLarge("this job needs the payload bucket, which is not configured")
        return self.payloads

    def _item_fits(self, item: dict[str, Any]) -> bool:
        """Sized as DynamoDB sizes it (names plus UTF-8 values, input and result together)."""
        return item_size_bytes(item) + _ITEM_HEADROOM_BYTES <= self._item_budget

    def _item_for_create(self, record: JobRecord, extra: dict[str, Any]) -> dict[str, Any]:
        """The item to put: the input inline when the item fits, else in S3 by reference."""
        item = _to_item(record, extra)
        if record.input is None or self._item_fits(item):
            return item
        data = record.input.model_dump_json().encode()
        ref = self._store().put(f"inputs/{record.id}/{record.request_hash[:16]}.json", data)
        return _to_item(record.model_copy(update={"input": None, "input_ref": ref}), extra)

    def with_input(self, record: JobRecord) -> JobRecord:
        """The job with its input, read from S3 when the item holds only a reference."""
        if record.input is not None or record.input_ref is None:
            return record
        data = self._store().get(record.input_ref)
        return record.model_copy(update={"input": JobInput.model_validate_json(data)})

    def with_result(self, record: JobRecord) -> JobRecord:
        """The result of an S3-held job: inline up to the configured size, else a presigned URL."""
        if record.result is not None or record.result_ref is None:
            return record
        store = self._store()
        if store.size(record.result_ref) > self.config.limits.max_inline_result_bytes:
            return record.model_copy(update={"result_url": store.presigned_url(record.result_ref)})
        return record.model_copy(
            update={"result": JobResult.model_validate_json(store.get(record.result_ref))}
        )

    # ---- claim --------------------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease_seconds: float) -> Claim:
        """One conditional UpdateItem returning the whole job, input included when the item holds it.

        An S3-held input is not read here: a failed read must not look like a failed claim,
        because the lease is already ours (the runner loads it with `with_input`).
        """
        now = self.now_ms()
        lease_until = now + int(lease_seconds * 1000)
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression=(
                    "SET #st = :running, lease_owner = :owner, lease_expires_ms = :lease, "
                    "started_ms = if_not_exists(started_ms, :now), sweep_at = :sweep "
                    "ADD attempts :one "
                    # Dead letters count only while no worker has claimed the job.
                    "REMOVE dead_letter_ids"
                ),
                ConditionExpression=(
                    "attribute_exists(pk) AND expires_at > :now_s AND "
                    "(attribute_not_exists(cancel_requested) OR cancel_requested = :false) AND ("
                    "(#st = :queued AND (attribute_not_exists(deadline_ms) OR deadline_ms > :now) "
                    "AND (attribute_not_exists(not_before_ms) OR not_before_ms <= :now)) OR "
                    "(#st = :running AND lease_expires_ms < :now AND attempts < :max))"
                ),
                ExpressionAttributeNames={"#st": "status"},
                ExpressionAttributeValues=_values(
                    running="running",
                    queued="queued",
                    owner=owner,
                    lease=lease_until,
                    now=now,
                    now_s=now // 1000,
                    sweep=lease_until + self.config.reconciler.expired_lease_grace_seconds * 1000,
                    one=1,
                    max=self.config.max_attempts,
                    false=False,
                ),
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if not _condition_failed(exc):
                raise
            return self._why_not_claimed(_old_item(exc), owner, now)
        return Claim(ClaimOutcome.CLAIMED, _from_item(response["Attributes"]))

    def _why_not_claimed(self, old: JobRecord | None, owner: str, now: int) -> Claim:
        if old is None or old.expires_at * 1000 <= now:
            return Claim(ClaimOutcome.NOT_FOUND, old)
        if old.status is JobStatus.RUNNING and old.lease_owner == owner:
            # Our own claim, applied on a try whose answer was lost: carry on with it.
            return Claim(ClaimOutcome.CLAIMED, old)
        if old.status.is_terminal:
            return Claim(ClaimOutcome.TERMINAL, old)
        if old.status is JobStatus.QUEUED:
            if old.cancel_requested:
                return Claim(ClaimOutcome.CANCEL_PENDING, old)
            if old.deadline_ms is not None and old.deadline_ms <= now:
                return Claim(ClaimOutcome.DEADLINE_PASSED, old)
            return Claim(ClaimOutcome.NOT_YET_DUE, old)
        if old.lease_expires_ms is not None and old.lease_expires_ms >= now:
            return Claim(ClaimOutcome.LEASED_ELSEWHERE, old)
        if old.cancel_requested:
            return Claim(ClaimOutcome.CANCEL_PENDING, old)
        return Claim(ClaimOutcome.CRASHES_EXHAUSTED, old)

    # ---- terminal and retry writes ------------------------------------------------------

    def complete(self, job: JobRecord, owner: str, result: JobResult) -> JobRecord:
        """Fenced: only the worker holding the lease may record the result.

        The result stays in the item when the whole item, input included, fits; otherwise it
        goes to S3. Sized as DynamoDB sizes it, so the write cannot fail on the item limit.
        """
        as_stored = job.model_copy(
            update={"input": None if job.input_ref else job.input, "result": result, "last_write": owner}
        )
        if self._item_fits(_to_item(as_stored, {"sweep_pk": self._sweep_pk(job.id), "sweep_at": 0})):
            try:
                return self._finish_leased(job, owner, JobStatus.SUCCEEDED, result=result)
            except ItemTooLarge:
                pass  # measured wrong somehow: the result still has a home in S3
        # Keyed by owner too, so a fenced-out worker's upload never replaces the winner's.
        key = f"results/{job.id}/{hashlib.sha256(owner.encode()).hexdigest()[:16]}.json"
        ref = self._store().put(key, result.model_dump_json().encode())
        return self._finish_leased(job, owner, JobStatus.SUCCEEDED, result_ref=ref)

    def fail_leased(self, job: JobRecord, owner: str, error: JobError) -> JobRecord:
        return self._finish_leased(job, owner, JobStatus.FAILED, error=error)

    def cancel_leased(self, job: JobRecord, owner: str) -> JobRecord:
        return self._finish_leased(job, owner, JobStatus.CANCELED)

    def requeue(self, job: JobRecord, owner: str, error: JobError, delay_seconds: float) -> JobRecord:
        """A transient failure: back to queued with the attempt count kept, lease released.

        Raises CancelRequested, with the lease still ours, when the client asked to cancel
        meanwhile: such a job must end canceled, never reach the provider again.
        """
        return self._back_to_queued(job, owner, delay_seconds, error=error)

    def release(self, job: JobRecord, owner: str, delay_seconds: float) -> JobRecord:
        """Hand a claimed job back before the provider was called: the attempt is refunded."""
        return self._back_to_queued(job, owner, delay_seconds, error=None)

    def _back_to_queued(
        self, job: JobRecord, owner: str, delay_seconds: float, error: JobError | None
    ) -> JobRecord:
        now = self.now_ms()
        visible_at = now + int(delay_seconds * 1000)
        token = f"{owner}#{'requeue' if error else 'release'}"
        sets = "SET #st = :queued, sweep_at = :sweep, not_before_ms = :not_before, last_write = :token"
        values: dict[str, Any] = {
            "queued": "queued",
            "running": "running",
            "owner": owner,
            "sweep": visible_at + self.config.reconciler.stale_queued_seconds * 1000,
            "not_before": visible_at,
            "token": token,
            "false": False,
        }
        names = {"#st": "status"}
        expression = f"{sets} REMOVE lease_owner, lease_expires_ms ADD attempts :refund"
        values["refund"] = -1
        if error is not None:
            names["#err"] = "error"
            values["error"] = error.model_dump_json()
            expression = f"{sets}, #err = :error REMOVE lease_owner, lease_expires_ms"
            del values["refund"]
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job.id}},
                UpdateExpression=expression,
                ConditionExpression="lease_owner = :owner AND #st = :running AND "
                "(attribute_not_exists(cancel_requested) OR cancel_requested = :false)",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=_values(**values),
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if not _condition_failed(exc):
                raise
            old = _old_item(exc)
            if old is not None and old.last_write == token and old.status is JobStatus.QUEUED:
                return old
            if old is not None and old.lease_owner == owner and old.status is JobStatus.RUNNING:
                raise CancelRequested(job.id) from exc
            raise LeaseLost(job.id) from exc
        return _from_item(response["Attributes"])

    def _finish_leased(
        self,
        job: JobRecord,
        owner: str,
        status: JobStatus,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        result_ref: str | None = None,
    ) -> JobRecord:
        try:
            return self._finish(
                job,
                status,
                condition="lease_owner = :owner AND #st = :running",
                values={"owner": owner, "running": "running"},
                # The lease owner is unique to this invocation and message, so it names the write.
                token=f"{owner}#{status.value}",
                result=result,
                error=error,
                result_ref=result_ref,
            )
        except _ConditionFailed as exc:
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
    ) -> JobRecord:
        """The one terminal write. It sets the delivery to pending when the event is subscribed.

        A retry of a write that was applied finds its own token and returns the job as written.
        """
        token = token or _token(status.value)
        now = self.now_ms()
        sets = ["#st = :status", "finished_ms = :now", "last_write = :token"]
        removes = ["lease_owner", "lease_expires_ms"]
        all_values: dict[str, Any] = {"status": status.value, "now": now, "token": token, **values}
        names = {"#st": "status"}
        if result is not None:
            sets.append("#res = :result")
            names["#res"] = "result"
            all_values["result"] = _json_text(result.model_dump(mode="json"))
        if result_ref is not None:
            sets.append("result_ref = :result_ref")
            all_values["result_ref"] = result_ref
        if error is not None:
            sets.append("#err = :error")
            names["#err"] = "error"
            all_values["error"] = _json_text(error.model_dump(mode="json"))
        elif status is JobStatus.SUCCEEDED or status is JobStatus.CANCELED:
            removes.append("#err")
            names["#err"] = "error"
        if job.wants(EVENT_FOR_STATUS[status]):
            sets += ["delivery_status = :pending", "sweep_pk = :sweep_pk", "sweep_at = :sweep"]
            all_values["pending"] = DeliveryStatus.PENDING.value
            all_values["sweep_pk"] = self._sweep_pk(job.id)
            all_values["sweep"] = now + self.config.reconciler.stale_webhook_seconds * 1000
        else:
            removes += ["sweep_pk", "sweep_at"]
        expression = f"SET {', '.join(sets)} REMOVE {', '.join(removes)}"
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job.id}},
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=_values(**all_values),
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if _too_large(exc):
                raise ItemTooLarge(f"job {job.id} does not fit in one item") from exc
            if not _condition_failed(exc):
                raise
            old = _old_item(exc)
            if old is not None and old.last_write == token and old.status is status:
                return old
            raise _ConditionFailed(old) from exc
        return _from_item(response["Attributes"])

    def _finish_if(self, job: JobRecord, status: JobStatus, **finish: Any) -> JobRecord | None:
        """A terminal write that may find the job moved on: None then, not an error."""
        try:
            return self._finish(job, status, **finish)
        except _ConditionFailed:
            return None

    def _update_if_status(
        self, job_id: str, status: JobStatus, expression: str, values: dict[str, Any]
    ) -> JobRecord | None:
        """One UpdateItem that applies only while the job is in `status`; None otherwise."""
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression=expression,
                ConditionExpression="#st = :expected",
                ExpressionAttributeNames={"#st": "status"},
                ExpressionAttributeValues={":expected": {"S": status.value}, **values},
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _condition_failed(exc):
                return None
            raise
        return _from_item(response["Attributes"])

    def expire(self, job: JobRecord) -> JobRecord | None:
        """A queued job whose deadline passed before a worker started (or restarted) it."""
        return self._finish_if(
            job,
            JobStatus.EXPIRED,
            condition="#st = :queued AND deadline_ms <= :now",
            values={"queued": "queued"},
            error=_deadline_error(job),
        )

    def fail_unleased(self, job: JobRecord, error: JobError) -> JobRecord | None:
        """Fail a running job that no live worker holds (dead letters, exhausted crash recovery)."""
        return self._finish_if(
            job,
            JobStatus.FAILED,
            condition="#st = :running AND "
            "(attribute_not_exists(lease_expires_ms) OR lease_expires_ms < :now)",
            values={"running": "running"},
            error=error,
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

    def note_dead_letter(self, job: JobRecord, message_id: str) -> JobRecord | None:
        """A queued job whose message dead-lettered before any claim: note it, keep it queued.

        Idempotent per DLQ message: the same letter handled twice (a retry of this write, a
        redelivered DLQ record) counts once. None when the job is no longer queued.
        """
        return self._update_if_status(
            job.id, JobStatus.QUEUED, "ADD dead_letter_ids :ids", {":ids": {"SS": [message_id]}}
        )

    def fail_queued_dead_letter(self, job: JobRecord, error: JobError) -> JobRecord | None:
        """A queued job whose every message dead-lettered: no worker can even claim it."""
        return self._finish_if(
            job,
            JobStatus.FAILED,
            condition="#st = :queued AND size(dead_letter_ids) >= :limit",
            values={"queued": "queued", "limit": len(job.dead_letter_ids)},
            error=error,
        )

    # ---- cancel (API) -------------------------------------------------------------------

    def cancel(self, job_id: str, tenant_id: str) -> JobRecord:
        """Queued: canceled at once. Running: cancel_requested, the worker stops it. Else 409."""
        token = _token("cancel")
        for _ in range(3):
            job = self.get(job_id, tenant_id)
            if job.status is JobStatus.CANCELED and job.last_write == token:
                return job  # our own cancel, applied on a try whose answer was lost
            if job.status.is_terminal:
                raise JobNotCancelable(f"job {job_id} is {job.status.value}")
            if job.status is JobStatus.QUEUED:
                try:
                    return self._finish(
                        job,
                        JobStatus.CANCELED,
                        condition="#st = :queued",
                        values={"queued": "queued"},
                        token=token,
                    )
                except _ConditionFailed:
                    continue  # it started meanwhile: look again
            updated = self._request_cancel(job)
            if updated is not None:
                return updated
        raise JobNotCancelable(f"job {job_id} changed state while being canceled; retry")

    def _request_cancel(self, job: JobRecord) -> JobRecord | None:
        # Idempotent: a retried write finds the job running with the flag already set.
        return self._update_if_status(
            job.id, JobStatus.RUNNING, "SET cancel_requested = :true", {":true": {"BOOL": True}}
        )

    def is_cancel_requested(self, job_id: str) -> bool:
        response = self._ddb.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": job_id}},
            ProjectionExpression="cancel_requested",
            ConsistentRead=True,
        )
        return bool(response.get("Item", {}).get("cancel_requested", {}).get("BOOL", False))

    # ---- webhook delivery ---------------------------------------------------------------

    def record_delivery(
        self,
        job_id: str,
        status: DeliveryStatus,
        status_code: int | None,
        next_attempt_in_seconds: float | None = None,
    ) -> bool:
        """One UpdateItem per delivery attempt. Pending keeps the job in the reconciler's index.

        Only a pending delivery moves; `delivered`, `failed` and `disabled` are final until
        a redelivery sets pending again (a late success may still turn `failed` into
        `delivered`). False when the write was refused: a duplicate message's late outcome.
        """
        now = self.now_ms()
        sets = ["delivery_status = :status", "delivery_last_status_code = :code"]
        values: dict[str, Any] = {
            "status": status.value,
            "code": status_code,
            "one": 1,
            "pending": DeliveryStatus.PENDING.value,
        }
        removes: list[str] = []
        # A fresh token per attempt: a retry of this write that finds it was applied already.
        token = _token("delivery")
        sets.append("delivery_write = :token")
        values["token"] = token
        condition = "delivery_status = :pending"
        if status is DeliveryStatus.DELIVERED:
            sets.append("delivered_ms = :now")
            values["now"] = now
            condition = "delivery_status IN (:pending, :failed)"
            values["failed"] = DeliveryStatus.FAILED.value
        if status is DeliveryStatus.PENDING:
            wait_ms = int((next_attempt_in_seconds or 0) * 1000)
            sets += ["sweep_pk = :sweep_pk", "sweep_at = :sweep"]
            values["sweep_pk"] = self._sweep_pk(job_id)
            values["sweep"] = now + wait_ms + self.config.reconciler.stale_webhook_seconds * 1000
        else:
            removes += ["sweep_pk", "sweep_at"]
        expression = f"SET {', '.join(sets)} ADD delivery_attempts :one"
        if removes:
            expression += f" REMOVE {', '.join(removes)}"
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression=expression,
                # The token check also keeps a retried pending write from counting twice.
                ConditionExpression=f"attribute_exists(pk) AND {condition} AND "
                "(attribute_not_exists(delivery_write) OR delivery_write <> :token)",
                ExpressionAttributeValues=_values(**values),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if not _condition_failed(exc):
                raise
            old: dict[str, Any] = exc.response.get("Item") or {}  # type: ignore[assignment]
            return bool(old.get("delivery_write", {}).get("S") == token)
        return True

    def mark_delivery_pending(self, job_id: str, tenant_id: str) -> JobRecord:
        """Redelivery: the terminal event goes out again, so the delivery is pending once more."""
        now = self.now_ms()
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression="SET delivery_status = :pending, delivery_attempts = :zero, "
                "sweep_pk = :sweep_pk, sweep_at = :sweep",
                ConditionExpression="tenant_id = :tenant AND attribute_exists(webhook_url)",
                ExpressionAttributeValues=_values(
                    pending=DeliveryStatus.PENDING.value,
                    sweep_pk=self._sweep_pk(job_id),
                    sweep=now + self.config.reconciler.stale_webhook_seconds * 1000,
                    tenant=tenant_id,
                    zero=0,
                ),
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _condition_failed(exc):
                raise JobNotFound(job_id) from exc
            raise
        return _from_item(response["Attributes"])

    # ---- reads --------------------------------------------------------------------------

    def find(self, job_id: str) -> JobRecord | None:
        """Any tenant's job, for workers. Expired-but-not-deleted items count as gone."""
        response = self._ddb.get_item(
            TableName=self.table_name, Key={"pk": {"S": job_id}}, ConsistentRead=True
        )
        item = response.get("Item")
        if not item:
            return None
        record = _from_item(item)
        if record.expires_at <= int(self._clock()):
            return None
        return record

    def get(self, job_id: str, tenant_id: str) -> JobRecord:
        """A tenant's own job; another tenant's job is indistinguishable from a missing one."""
        record = self.find(job_id)
        if record is None or record.tenant_id != tenant_id:
            raise JobNotFound(f"no job {job_id}")
        return record

    def list_for_tenant(
        self, tenant_id: str, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first. With a status filter a page may hold fewer than `limit` jobs."""
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": TENANT_INDEX,
            "KeyConditionExpression": "tenant_id = :tenant",
            "ScanIndexForward": False,
            "Limit": limit,
        }
        values: dict[str, Any] = {"tenant": tenant_id}
        if status is not None:
            kwargs["FilterExpression"] = "#st = :status"
            kwargs["ExpressionAttributeNames"] = {"#st": "status"}
            values["status"] = status.value
        kwargs["ExpressionAttributeValues"] = _values(**values)
        if cursor:
            kwargs["ExclusiveStartKey"] = _decode_cursor(cursor, tenant_id)
        response = self._ddb.query(**kwargs)
        now_s = int(self._clock())
        records = [_from_item(item) for item in response.get("Items", [])]
        records = [record for record in records if record.expires_at > now_s]
        last = response.get("LastEvaluatedKey")
        return records, (_encode_cursor(last) if last else None)

    def sweep(self, due_before_ms: int, limit: int) -> Iterator[SweepEntry]:
        """Jobs the reconciler should look at, from the sparse index: never a scan.

        Each shard is read lazily, a page at a time, and the shards are merged so the most
        overdue entries come first whatever shard they live in.
        """
        shards = [
            self._sweep_shard(pk, due_before_ms)
            for pk in sweep_partitions(self.config.reconciler.sweep_shards)
        ]
        merged = heapq.merge(*shards, key=lambda entry: entry.sweep_at)
        for seen, entry in enumerate(merged):
            if seen >= limit:
                return
            yield entry

    def _sweep_shard(self, partition: str, due_before_ms: int) -> Iterator[SweepEntry]:
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": SWEEP_INDEX,
            "KeyConditionExpression": "sweep_pk = :p AND sweep_at <= :due",
            "ExpressionAttributeValues": _values(p=partition, due=due_before_ms),
            "Limit": 100,
        }
        while True:
            response = self._ddb.query(**kwargs)
            for item in response.get("Items", []):
                data = {key: _deserializer.deserialize(value) for key, value in item.items()}
                yield SweepEntry(
                    job_id=data["pk"],
                    status=JobStatus(data["status"]),
                    lane=data["lane"],
                    sweep_at=int(data["sweep_at"]),
                    delivery_status=DeliveryStatus(data["delivery_status"])
                    if "delivery_status" in data
                    else None,
                    deadline_ms=int(data["deadline_ms"]) if "deadline_ms" in data else None,
                )
            if "LastEvaluatedKey" not in response:
                return
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def count_unfinished(self) -> Counter[str]:
        """Queued and running jobs per lane, read from the sparse index's small entries.

        The reconciler compares this with each lane queue's depth to tell a backlog (every
        job still has its message) from a lost message.
        """
        counts: Counter[str] = Counter()
        for partition in sweep_partitions(self.config.reconciler.sweep_shards):
            kwargs: dict[str, Any] = {
                "TableName": self.table_name,
                "IndexName": SWEEP_INDEX,
                "KeyConditionExpression": "sweep_pk = :p",
                "FilterExpression": "#st IN (:queued, :running)",
                "ProjectionExpression": "lane",
                "ExpressionAttributeNames": {"#st": "status"},
                "ExpressionAttributeValues": _values(p=partition, queued="queued", running="running"),
            }
            while True:
                response = self._ddb.query(**kwargs)
                for item in response.get("Items", []):
                    counts[item["lane"]["S"]] += 1
                if "LastEvaluatedKey" not in response:
                    break
                kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return counts

    def postpone_sweep(self, job_id: str, seconds: float) -> bool:
        """After the reconciler re-enqueued something, leave the job alone for a while.

        False when the job left the index meanwhile (it finished): nothing to postpone.
        """
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": job_id}},
                UpdateExpression="SET sweep_at = :sweep",
                ConditionExpression="attribute_exists(sweep_pk)",
                ExpressionAttributeValues=_values(sweep=self.now_ms() + int(seconds * 1000)),
            )
        except ClientError as exc:
            if _condition_failed(exc):
                return False
            raise
        return True


def _deadline_error(job: JobRecord) -> JobError:
    """Say what happened: a job that never ran differs from one whose retry came too late."""
    if job.attempts == 0:
        return JobError(
            code=ErrorCode.DEADLINE_EXCEEDED,
            message="The job did not start before its deadline",
            retryable=False,
        )
    last = f"; its last attempt failed: {job.error.message}" if job.error else ""
    return JobError(
        code=ErrorCode.DEADLINE_EXCEEDED,
        message=f"The job ran {job.attempts} time(s) and its deadline passed before the next retry{last}",
        retryable=True,
    )


class _ConditionFailed(Exception):
    def __init__(self, old: JobRecord | None) -> None:
        super().__init__("condition failed")
        self.old = old


def _encode_cursor(key: dict[str, Any]) -> str:
    plain = {name: _deserializer.deserialize(value) for name, value in key.items()}
    raw = json.dumps(plain, default=str, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, tenant_id: str) -> dict[str, Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        plain = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(plain, dict) or set(plain) != {"pk", "tenant_id", "tenant_created"}:
            raise ValueError("unexpected cursor keys")
        if plain["tenant_id"] != tenant_id:
            raise ValueError("cursor of another tenant")
        return {name: _serializer.serialize(str(value)) for name, value in plain.items()}
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursor("the cursor is not one this API returned") from exc
