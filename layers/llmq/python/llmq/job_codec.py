"""A JobRecord as a DynamoDB item and back; the listing cursor; what an AWS error means.

Text is stored as raw UTF-8, never \\u escapes: an escaped CJK character costs 6 bytes of the
item's 400 KB instead of 3, and an emoji 12 instead of 4.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from llmq.errors import InvalidCursor
from llmq.item_size import item_size_bytes
from llmq.job_index import BATCH_SORT_PREFIX, INDEX_ATTRIBUTES, batch_sort_key, tenant_sort_key
from llmq.job_record import JobRecord
from llmq.live_output import OutputChunk, chunk_pk
from llmq.models import DELIVERY_LOG_ATTEMPTS, OutputDelta

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()

# Stored as JSON text: one attribute each, sized as DynamoDB sizes a string.
_JSON_FIELDS = ("input", "result", "error")
# Written by the repository for its own bookkeeping; not part of a JobRecord.
_WRITE_ONLY = (*INDEX_ATTRIBUTES, "delivery_write")
# The delivery log: one attribute per slot, the n-th attempt logged (`delivery_log_seq`, never
# reset, across redeliveries) in slot n mod DELIVERY_LOG_ATTEMPTS, so each delivery write sets
# one top-level attribute, the newest ten survive, and the log never outgrows its slots.
DELIVERY_LOG_PREFIX = "delivery_log_"
DELIVERY_LOG_SEQ = "delivery_log_seq"


def delivery_log_slot(seq: int) -> str:
    return f"{DELIVERY_LOG_PREFIX}{seq % DELIVERY_LOG_ATTEMPTS}"


def stored_log_seq(old: Mapping[str, Any]) -> int:
    return int(old.get(DELIVERY_LOG_SEQ, {}).get("N", "0"))


def delivery_holds(old: Mapping[str, Any], statuses: Collection[str], low: int, high: int | None) -> bool:
    """Whether a delivery record's condition, but for the log's sequence, held on `old`: its
    status one of `statuses`, and the count of attempts from `low` to `high` (None: any)."""
    count = int(old.get("delivery_attempts", {}).get("N", "0"))
    status = old.get("delivery_status", {}).get("S")
    return status in statuses and low <= count and (high is None or count <= high)


def written_in_the_log(
    write: Callable[[list[str], str], Mapping[str, Any] | None],
    sets: list[str],
    condition: str,
    values: dict[str, Any],
    log_seq: int | None,
    holds: Callable[[Mapping[str, Any]], bool],
    at: int | None = None,
) -> Mapping[str, Any] | None:
    """A delivery record written with its log entry (`values["log"]`, set among `sets` in the
    slot of `log_seq`, the sequence the dispatcher read) in the slot of the log's stored latest,
    never over an entry logged since (another copy of the message's, or a redelivery's new
    round's, which a late answer of the old round would overwrite; review 209): the write also
    holds the sequence it logs at, and one refused while the sequence moved on is written again
    at the stored one if the rest of its condition (`holds`) held. Each try after the first
    follows an entry another writer logged meanwhile, so the tries end. `at`: the stored
    sequence, when a refused write just read it.
    `write(sets, condition)` answers None when applied, else the item as its condition found
    it; so does this. No entry (`log_seq` None): one write as it is."""
    if log_seq is None:
        return write(sets, condition)
    at = log_seq if at is None else at
    while True:
        if at != log_seq:
            values["log"] = {**values["log"], "seq": at}
            read_slot = f"{delivery_log_slot(log_seq)} = :log"
            sets = [f"{delivery_log_slot(at)} = :log" if clause == read_slot else clause for clause in sets]
            log_seq = at
        values["log_at"] = log_seq
        held = f"{DELIVERY_LOG_SEQ} = :log_at"
        # (a batch is written with its sequence at 0, a job without one)
        held = held if log_seq else f"(attribute_not_exists({DELIVERY_LOG_SEQ}) OR {held})"
        old = write(sets, f"{condition} AND {held}")
        if old is None:
            return None
        at = stored_log_seq(old)
        if at == log_seq or not holds(old):
            return old


def json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def to_item(record: JobRecord, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # The dead-letter set only ever grows through ADD (DynamoDB has no empty sets).
    data = record.model_dump(
        mode="json",
        exclude_none=True,
        # The delivery log is written slot by slot, by the dispatcher's delivery writes only.
        exclude={
            # (set only by `JobRepository.mark_webhook_gone`; a job is written without it)
            "webhook_gone",
            "result_url",
            "result_url_expires_ms",
            "queue_position",
            "dead_letter_ids",
            # (counted by `JobRepository.requeue`'s ADD alone)
            "refusals",
            "redrive_round",
            "delivery_log",
            "delivery_log_seq",
            "delivery_round",
        },
    )
    for name in _JSON_FIELDS:
        if name in data:
            data[name] = json_text(data[name])
    data["pk"] = data.pop("id")
    data.update(extra or {})
    return {key: _serializer.serialize(value) for key, value in data.items()}


def output_chunk_item(job: JobRecord, chunk: OutputChunk, expires_at: int) -> dict[str, Any]:
    """A chunk of a streaming job's output (`llmq.live_output`), deleted by TTL."""
    data: dict[str, Any] = {
        "pk": chunk_pk(job, chunk.seq),
        "seq": chunk.seq,
        "delta": chunk.delta,
        "attempt": chunk.attempt,
        "expires_at": expires_at,
    }
    if chunk.reset:
        data["reset"] = True
    return {key: _serializer.serialize(value) for key, value in data.items()}


def output_delta(item: dict[str, Any]) -> OutputDelta:
    data = plain(item)
    return OutputDelta(
        seq=int(data["seq"]),
        delta=str(data["delta"]),
        attempt=int(data["attempt"]),
        reset=bool(data.get("reset", False)),
    )


def from_item(item: dict[str, Any]) -> JobRecord:
    data = plain(item)
    data["id"] = data.pop("pk")
    for name in _JSON_FIELDS:
        if name in data:
            data[name] = json.loads(data[name])
    for name in _WRITE_ONLY:
        data.pop(name, None)
    data["delivery_log"] = pop_delivery_log(data)
    return JobRecord.model_validate(data)


def pop_delivery_log(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The delivery log's slots, taken out of a plain item: oldest first, as logged."""
    slots = [
        data.pop(name)
        for name in [key for key in data if key.startswith(DELIVERY_LOG_PREFIX) and key != DELIVERY_LOG_SEQ]
    ]
    return [
        {key: value for key, value in entry.items() if key != "seq"}
        for entry in sorted(slots, key=lambda entry: entry.get("seq", 0))
    ]


def plain(item: dict[str, Any]) -> dict[str, Any]:
    return {key: _deserializer.deserialize(value) for key, value in item.items()}


def record_size(record: JobRecord) -> int:
    """The record's size as DynamoDB counts it (names plus UTF-8 values), index attributes aside."""
    return item_size_bytes(to_item(record))


def named_values(values: dict[str, Any], *expressions: str) -> dict[str, Any]:
    """The `values` the expressions name, as `values` makes them (DynamoDB refuses a value
    none of them names)."""
    names = set(re.findall(r":(\w+)", " ".join(expressions)))
    return {name: value for name, value in values.items() if name in names}


def values(**named: Any) -> dict[str, Any]:
    return {f":{key}": _serializer.serialize(value) for key, value in named.items()}


def write_token(kind: str) -> str:
    """A fresh token naming one write, so a retry of it can recognise it was applied."""
    return f"{kind}#{uuid.uuid4().hex}"


# Why DynamoDB canceled a transaction that was not applied and may be tried again: another
# transaction held one of its items, or a throttle.
RETRYABLE_TRANSACTION_REASONS = frozenset(
    {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded", "RequestLimitExceeded"}
)


def condition_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def missing_path(exc: ClientError, at: int) -> bool:
    """A transaction refused because the update at index `at` writes inside a missing map: a
    ValidationError reason there (AWS, whatever its wording), or a ValidationException for
    the whole call naming a document path (moto, which validates before any condition)."""
    error = exc.response.get("Error", {})
    if error.get("Code") == "ValidationException":
        return "document path" in str(error.get("Message", ""))
    reasons: list[dict[str, Any]] = exc.response.get("CancellationReasons") or []  # type: ignore[assignment]
    return len(reasons) > at and str(reasons[at].get("Code", "")).startswith("Validation")


def too_large(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    return error.get("Code") == "ValidationException" and "size" in str(error.get("Message", "")).lower()


def old_item(exc: ClientError) -> JobRecord | None:
    """The item a failed condition found (ReturnValuesOnConditionCheckFailure=ALL_OLD)."""
    item: dict[str, Any] | None = exc.response.get("Item")  # type: ignore[assignment]
    return from_item(item) if item else None


# DynamoDB's key size limits: 2,048 bytes for a partition key value, 1,024 for a sort key's.
_MAX_PARTITION_KEY_BYTES = 2048
_MAX_SORT_KEY_BYTES = 1024


def encode_cursor(key: dict[str, Any]) -> str:
    raw = json.dumps(plain(key), default=str, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor_after(job: JobRecord) -> str:
    """The cursor of a job list page that ends at `job` (as its LastEvaluatedKey would)."""
    return _index_cursor(job.id, job.tenant_id, tenant_sort_key(job.created_ms, job.id))


def batch_cursor_after(batch_key: dict[str, Any], batch_id: str, tenant_id: str, created_ms: int) -> str:
    """The cursor of a batch list page that ends at this batch (`batch_key`: its table key)."""
    return _index_cursor(batch_key["pk"]["S"], tenant_id, batch_sort_key(created_ms, batch_id))


def _index_cursor(pk: str, tenant_id: str, tenant_created: str) -> str:
    return encode_cursor(
        {"pk": {"S": pk}, "tenant_id": {"S": tenant_id}, "tenant_created": {"S": tenant_created}}
    )


def decode_cursor(cursor: str, tenant_id: str, *, batches: bool = False) -> dict[str, Any]:
    """The index key a list page ended at; a job list's cursor is refused by the batch list
    and the other way round (each reads its own range of the tenant's partition)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(decoded, dict) or set(decoded) != {"pk", "tenant_id", "tenant_created"}:
            raise ValueError("unexpected cursor keys")
        if decoded["tenant_id"] != tenant_id:
            raise ValueError("cursor of another tenant")
        sort, pk = decoded["tenant_created"], decoded["pk"]
        if not isinstance(sort, str) or not isinstance(pk, str) or not sort or not pk:
            raise ValueError("cursor keys are not strings")
        if len(sort.encode()) > _MAX_SORT_KEY_BYTES or len(pk.encode()) > _MAX_PARTITION_KEY_BYTES:
            raise ValueError("cursor keys too long")
        # Within the list's own range of the partition, which DynamoDB requires of a start key
        # (a job list reads `tenant_created < "b#"`; a batch list those that begin with it).
        if sort.startswith(BATCH_SORT_PREFIX) != batches or (not batches and sort >= BATCH_SORT_PREFIX):
            raise ValueError("cursor of the other list")
        return {name: _serializer.serialize(str(value)) for name, value in decoded.items()}
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
        # (RecursionError: a forged cursor nested deeper than the JSON parser goes)
        raise InvalidCursor("the cursor is not one this API returned") from exc
