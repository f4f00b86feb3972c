"""Make moto's DynamoDB as strict, and as atomic, as the real one; and SQS's visibility rules.

These differences between moto (5.x) and DynamoDB would let a test pass that fails on AWS,
or fail a test that AWS would pass:

- **Concurrency.** DynamoDB evaluates a ConditionExpression and applies the write atomically.
  moto checks and writes in plain Python, so two threads (a worker's concurrent batch, or the
  sandbox's threaded server) can both pass the same condition and report double claims that
  real DynamoDB never allows. Every write goes through one lock.
- **All or nothing.** DynamoDB applies an UpdateItem entirely or not at all. moto applies the
  update expression one attribute at a time and checks the item size at each step, so an
  update that overflows 400 KB raised ValidationException with some attributes already set
  (seen: `status` and `finished_ms` written, `result` missing), and an update of an absent
  item left a key-only item behind. Here the stored item is snapshotted and restored when the
  update raises.
- **Torn reads.** moto's get_item, query and scan return the stored Item objects, serialized
  only after the call, while an update changes them in place; a reader could see half an
  update. Reads take the same lock and return copies.
- **Item size.** moto refuses items above 405,000 bytes (DynamoDB: 400 KB = 409,600), counts a
  number as the length of its text (DynamoDB: about a byte per two digits), and counts no
  overhead for lists and maps (DynamoDB: 3 bytes each, plus 1 per element), which lets a
  map-heavy item through that AWS refuses. It also checks intermediate states of an update,
  where DynamoDB checks the result. Here the size is `llmq.item_size.item_size_bytes`, the
  same count the domain uses to decide what goes to S3, checked on the whole new item.
  moto already counts strings and names in UTF-8 bytes, so non-ASCII text was never the gap.
- **A transaction's size.** "The aggregate size of the items in the transaction cannot exceed
  4 MB" (TransactWriteItems, DynamoDB API reference): DynamoDB refuses a larger one with a
  ValidationException, and moto writes it. Here the items a transaction puts are counted
  (`item_size_bytes`) and more than 4 MB is refused before anything is written (hunt 299: a
  batch's expansion chunk could pass it, and only AWS would have said so).

- **Eventually consistent indexes.** A Query or Scan of a global secondary index reads an
  asynchronously updated copy of the table ("DynamoDB read consistency",
  https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html:
  every GSI read is eventually consistent, none strongly; a write usually reaches the index
  within a second). moto reads the table itself, so code that reads its own write
  through an index passed here and failed on AWS now and then. Here an index answers from the
  table as it was `index_lag` seconds ago (`set_index_lag`; 0, the default in-process, keeps
  moto's behaviour): each write keeps the item's previous version, with its time, for that
  long, and an index read runs moto's own query over the lagged view. Base-table reads stay
  strongly consistent; ConsistentRead on a GSI is refused by moto already, as by DynamoDB.

- **A start key outside the query.** DynamoDB refuses a Query whose ExclusiveStartKey the key
  condition excludes (a ValidationException); moto starts from it anyway.
- **Numbers DynamoDB cannot store.** A number has at most 38 significant digits, and a magnitude
  from 1E-130 to below 1E+126 ("Supported data types", DynamoDB developer guide); anything else
  in a request (an item, a key, an expression's value) or made by an update (an ADD, a SET's
  sum) is refused with a ValidationException. moto checks the range of a PutItem's values
  only, as floats, and takes 39 digits or more anywhere, and any number an update makes.

SQS (ChangeMessageVisibility, "Amazon SQS visibility timeout" in the SQS developer guide):

- **12 hours from the receive.** A message's visibility may reach at most 12 hours after the
  ReceiveMessage that returned it; asking for more is refused with InvalidParameterValue.
  moto counts from when the message was sent, so a message received late got too little,
  and one received early could be asked for more than AWS gives from its receive.
- **The latest receipt handle, of a message in flight.** moto accepts any receipt handle the
  message ever had, and changes a message that is not in flight. AWS refuses a handle from
  an earlier receive (ReceiptHandleIsInvalid) and a message not in flight
  (AWS.SimpleQueueService.MessageNotInflight).
- **A long poll returns a message as it becomes available.** A ReceiveMessage with
  WaitTimeSeconds returns as soon as a message is available ("Amazon SQS short and long
  polling"), including one whose delay or visibility timeout just ran out. moto's long poll
  wakes on a new send only, and otherwise looks again once a second, so a delayed message (a
  deferred job, a retry) waited up to a second more in the sandbox than on AWS. Here the wait
  also ends when the queue's next delayed or invisible message is due.
- **Message attributes count toward the size limit.** SendMessage refuses a message whose
  body and attributes (each one's name, data type and value) together pass the queue's
  MaximumMessageSize; moto counts the body alone.
- **No negative seconds.** SQS refuses a DelaySeconds below 0 (SendMessage, and each entry of
  SendMessageBatch) and a VisibilityTimeout below 0 (ReceiveMessage, ChangeMessageVisibility and
  each entry of its batch) with InvalidParameterValue. moto takes them, a negative delay as
  none, so a delay or a timeout worked out below zero passed here and failed on AWS.

S3:

- **A PUT's body is the object, whatever its Content-Type.** S3 stores the bytes of a
  PutObject or UploadPart as sent; a Content-Type header is only the object's metadata. moto's
  server reads a body sent as `application/x-www-form-urlencoded` or `multipart/form-data` as
  a form, and stored an empty object with a 200: `curl --data-binary @rows.jsonl` (curl's
  default type) to a batch upload URL uploaded nothing, in the sandbox only. Here a PUT's body
  is read raw first and never parsed as a form (no S3 call llmq makes is a form; a browser's
  POST upload is one, and keeps moto's parsing).
- **A part for an upload that is no more.** S3 answers UploadPart for an upload that was
  completed or aborted with NoSuchUpload ("UploadPart", S3 API reference). moto 5.x looks the
  upload up in a dict and raises a bare KeyError, which surfaces as an internal error: the
  code that recognises a completed upload (a batch's results file, `llmq.batch_results`)
  could not be exercised. Here it answers NoSuchUpload.

SQS fair queues (emulated; off by default in-process, on in the sandbox: `set_fair_queues`):

- **What AWS does.** On a standard queue a message's MessageGroupId names its tenant; a message
  without one is a tenant of its own. SQS marks a tenant as a noisy neighbour when it holds more
  than 10% of the queue's in-flight messages and at least 30 of them, or more than 10% of the
  consumers' recent processing time (approximate thresholds). While one is, a ReceiveMessage
  returns quiet tenants' messages first whenever there are any; among noisy tenants, the one
  with the fewest messages in flight first. Nothing is dropped or throttled: with no quiet
  message waiting, noisy tenants' messages come as usual. A tenant is quiet again once its
  backlog is drained or after 5 minutes without a send. There is no ordering guarantee
  ("How Amazon SQS fair queues work",
  https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-fair-queues-detailed.html;
  https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-fair-queues.html).
- **What moto 5.2.5 does.** It accepts MessageGroupId on a standard queue and returns it on
  ReceiveMessage (AttributeNames or MessageSystemAttributeNames with MessageGroupId or All), and
  ignores it otherwise: every receive returns the oldest visible messages first, whatever their
  group. It does not check the id either (AWS: up to 128 alphanumeric and punctuation characters).
- **What this emulation does.** A ReceiveMessage on a standard queue whose visible messages carry
  a MessageGroupId picks them in the order above, with the documented thresholds. In flight means
  received, not deleted and not visible. "Recent processing time" is the tenant's in-flight
  message-seconds, sampled at each receive and decaying with a 60 s time constant (AWS publishes
  no window). The 5-minute rule counts from the tenant's last send. A MessageGroupId longer than
  128 characters or with other characters is refused, as AWS refuses it.
- **Not emulated:** the fair-queue CloudWatch metrics; detection lag and the approximation of a
  distributed system (here the thresholds are exact and act on the next receive); FIFO queues
  keep moto's behaviour.

transact_write_items needs no patch for atomicity: moto restores the tables it touched when
one of its writes raises a validation error, and its writes go through the patched methods.
"""

from __future__ import annotations

import copy
import decimal
import functools
import importlib
import inspect
import json
import math
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from llmq.config import MAX_VISIBILITY_SECONDS as MAX_SQS_VISIBILITY_SECONDS
from llmq.item_size import MAX_ITEM_BYTES, item_size_bytes
from llmq.queues import SQS_REFUSED_CHARACTERS

_LOCK = threading.RLock()
# TransactWriteItems: "the aggregate size of the items in the transaction cannot exceed 4 MB".
MAX_TRANSACTION_BYTES = 4 * 1024 * 1024
_WRITES = ("put_item", "update_item", "delete_item", "transact_write_items")
# Reads that hand back stored Item objects, which later writes mutate in place.
_READS = ("get_item", "query", "scan")
_applied = False
# How old a view of its table a global secondary index answers from (set_index_lag).
_index_lag_seconds = 0.0
# The clock of the index lag; a test may replace it to make a stale view deterministic.
clock: Callable[[], float] = time.monotonic
# On a moto Table: [(when, key, the item before that write, or None)], oldest first.
_HISTORY = "llmq_index_history"


def _serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return method(*args, **kwargs)

    return locked


def _snapshot_read(method: Callable[..., Any]) -> Callable[..., Any]:
    """A read under the write lock that returns copies: moto hands back the stored Item
    objects, which its responses serialize after the call, while a concurrent update may be
    changing them in place. DynamoDB never returns such a torn item."""

    @functools.wraps(method)
    def read(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return copy.deepcopy(method(*args, **kwargs))

    return read


def moto_item_size(item: Any) -> int:
    """The DynamoDB size of a stored moto Item (binary decoded to its raw bytes)."""
    return item_size_bytes({name: value.to_regular_json() for name, value in item.attrs.items()})


def _index_key_types_hold(table: Any, types: dict[str, str]) -> None:
    """An item (its attributes' types by name) whose attribute keys one of the table's indexes
    under another type than the index's is refused, as DynamoDB refuses it ("Type mismatch for
    Index Key"); moto's PutItem stores it, and leaves it out of the index (its UpdateItem
    refuses it)."""
    from moto.dynamodb.exceptions import MockValidationException

    defined = {definition["AttributeName"]: definition["AttributeType"] for definition in table.attr or []}
    for index in table.all_indexes():
        for key in index.schema:
            name = key["AttributeName"]
            actual = types.get(name)
            if actual is not None and name in defined and actual != defined[name]:
                raise MockValidationException(
                    "One or more parameter values were invalid: Type mismatch for Index Key "
                    f"{name} Expected: {defined[name]} Actual: {actual} IndexName: {index.name}"
                )


def _checked_put(put_item: Callable[..., Any]) -> Callable[..., Any]:
    """Table.put_item refuses a whole new item over 400 KB, or one that keys an index with an
    attribute of the wrong type, before anything is stored."""
    from moto.dynamodb.exceptions import ItemSizeTooLarge

    @functools.wraps(put_item)
    def put(self: Any, item_attrs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if item_size_bytes(item_attrs) > MAX_ITEM_BYTES:
            raise ItemSizeTooLarge()
        _index_key_types_hold(
            self,
            {
                name: next(iter(value))
                for name, value in item_attrs.items()
                if isinstance(value, dict) and value
            },
        )
        return put_item(self, item_attrs, *args, **kwargs)

    return put


def _all_or_nothing_update(update_item: Callable[..., Any]) -> Callable[..., Any]:
    """DynamoDBBackend.update_item: the stored item is as before unless the whole update holds."""
    from moto.dynamodb.exceptions import ItemSizeToUpdateTooLarge

    @functools.wraps(update_item)
    def update(self: Any, table_name: str, key: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        try:
            table = self.get_table(table_name)
            hash_key, range_key = self.get_keys_value(table, key)
        except Exception:
            # A missing table or a malformed key: moto raises the right error, having written nothing.
            return update_item(self, table_name, key, *args, **kwargs)
        before = copy.deepcopy(table.get_item(hash_key, range_key))
        try:
            updated = update_item(self, table_name, key, *args, **kwargs)
            if moto_item_size(updated) > MAX_ITEM_BYTES:
                raise ItemSizeToUpdateTooLarge()
        except BaseException:
            _restore(table, hash_key, range_key, before)
            raise
        return updated

    return update


def _restore(table: Any, hash_key: Any, range_key: Any, item: Any) -> None:
    """Put `item` back as the stored item for the key; None means there was none."""
    if range_key is None:
        if item is None:
            table.items.pop(hash_key, None)
        else:
            table.items[hash_key] = item
        return
    if item is None:
        table.items.get(hash_key, {}).pop(range_key, None)
    else:
        table.items[hash_key][range_key] = item


class _TablesNotCopied:
    """Stands in for the `copy` module inside moto's DynamoDB backend during a transaction:
    a Table is "copied" as itself (moto deep-copies every table a transaction touches, to roll
    it back: a cost that grows with the table, seconds per transaction once the sandbox holds a
    few hundred jobs). `_item_rollback_transaction` restores the touched items instead."""

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)

    @staticmethod
    def deepcopy(value: Any, memo: Any = None) -> Any:
        from moto.dynamodb.models.table import Table

        return value if isinstance(value, Table) else copy.deepcopy(value, memo)


def _item_rollback_transaction(transact: Callable[..., Any]) -> Callable[..., Any]:
    """DynamoDBBackend.transact_write_items, all or nothing by its items: each item it names
    is kept as it was and put back if the transaction fails, as DynamoDB's isolation promises."""
    import moto.dynamodb.models as backend_module

    @functools.wraps(transact)
    def transaction(self: Any, transact_items: list[dict[str, Any]]) -> Any:
        from moto.dynamodb.exceptions import MockValidationException

        put = sum(
            item_size_bytes(entry["Put"].get("Item") or {}) for entry in transact_items if "Put" in entry
        )
        if put > MAX_TRANSACTION_BYTES:
            raise MockValidationException("Transaction request cannot be larger than 4 MB")
        before: list[tuple[Any, Any, Any, Any]] = []
        for entry in transact_items:
            try:
                _, operation = next(iter(entry.items()))
                table = self.get_table(operation["TableName"])
                key = operation.get("Key") or {
                    name: operation["Item"][name]
                    for name in (table.hash_key_attr, table.range_key_attr)
                    if name is not None
                }
                hash_key, range_key = self.get_keys_value(table, key)
            except Exception:
                continue  # moto refuses such an entry before it writes anything
            before.append((table, hash_key, range_key, copy.deepcopy(table.get_item(hash_key, range_key))))
        backend_module.copy = _TablesNotCopied()  # type: ignore[assignment]
        try:
            return transact(self, transact_items)
        except BaseException:
            for table, hash_key, range_key, item in reversed(before):
                _restore(table, hash_key, range_key, item)
            raise
        finally:
            backend_module.copy = copy

    return transaction


def _size_checked_once_at_the_end(self: Any, key: str, value: Any) -> None:
    # moto's LimitedSizeDict checks the size on every attribute it sets, intermediate states
    # included; the whole item is checked in put_item and update_item instead.
    dict.__setitem__(self, key, value)


def set_index_lag(seconds: float) -> None:
    """From now on, a global secondary index answers from its table as of `seconds` ago."""
    global _index_lag_seconds
    if seconds < 0:
        raise ValueError("the index lag cannot be negative")
    with _LOCK:
        _index_lag_seconds = float(seconds)


def index_lag() -> float:
    return _index_lag_seconds


@contextmanager
def lagging_indexes(seconds: float) -> Iterator[None]:
    """The index lag set to `seconds` for the block, then back as it was (tests)."""
    before = _index_lag_seconds
    set_index_lag(seconds)
    try:
        yield
    finally:
        set_index_lag(before)


def _item_key(table: Any, attrs: dict[str, Any]) -> tuple[Any, Any] | None:
    """(hash, range) of a request's key or item, as moto stores it; None when malformed."""
    from moto.dynamodb.models.dynamo_type import DynamoType

    try:
        hash_key = DynamoType(attrs[table.hash_key_attr])
        range_key = DynamoType(attrs[table.range_key_attr]) if table.range_key_attr else None
    except (KeyError, TypeError):
        return None
    return hash_key, range_key


def _recorded(method: Callable[..., Any]) -> Callable[..., Any]:
    """A backend write (of an item, or by key) that, while indexes lag, remembers the item as
    it was before it."""

    @functools.wraps(method)
    def write(self: Any, table_name: str, attrs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if _index_lag_seconds <= 0:
            return method(self, table_name, attrs, *args, **kwargs)
        try:
            table = self.get_table(table_name)
        except Exception:
            return method(self, table_name, attrs, *args, **kwargs)
        key = _item_key(table, attrs)
        before = copy.deepcopy(table.get_item(*key)) if key is not None else None
        result = method(self, table_name, attrs, *args, **kwargs)
        if key is not None:
            now = clock()
            history = [entry for entry in getattr(table, _HISTORY, []) if entry[0] > now - _index_lag_seconds]
            history.append((now, key, before))
            setattr(table, _HISTORY, history)
        return result

    return write


def _lagged_items(table: Any, lag: float) -> Any:
    """`table.items` as a reader `lag` seconds ago saw it: each key written since then shows
    the version before its earliest write in that window."""
    cutoff = clock() - lag
    view: Any = {h: dict(r) for h, r in table.items.items()} if table.range_key_attr else dict(table.items)
    seen: set[tuple[Any, Any]] = set()
    for when, (hash_key, range_key), before in getattr(table, _HISTORY, []):
        if when <= cutoff or (hash_key, range_key) in seen:
            continue
        seen.add((hash_key, range_key))
        if range_key is None:
            if before is None:
                view.pop(hash_key, None)
            else:
                view[hash_key] = before
        elif before is None:
            view.get(hash_key, {}).pop(range_key, None)
        else:
            view.setdefault(hash_key, {})[range_key] = before
    return view


def _lagged_index_read(method: Callable[..., Any]) -> Callable[..., Any]:
    """DynamoDBBackend.query / scan: with an IndexName of a global secondary index, answered
    from the table as it was `index_lag` seconds ago."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        lag = _index_lag_seconds
        if lag <= 0:
            return method(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        index_name = bound.arguments.get("index_name")
        if not index_name:
            return method(self, *args, **kwargs)
        table = self.get_table(bound.arguments["table_name"])
        if index_name not in {index.name for index in table.global_indexes or []}:
            return method(self, *args, **kwargs)
        with _LOCK:
            current = table.items
            table.items = _lagged_items(table, lag)
            try:
                return method(self, *args, **kwargs)
            finally:
                table.items = current

    return read


def _start_key_within_the_query(query: Callable[..., Any]) -> Callable[..., Any]:
    """DynamoDBBackend.query: an ExclusiveStartKey whose sort key the query's key condition
    excludes is refused, as DynamoDB refuses it ("The provided starting key is outside query
    boundaries based on provided conditions", a ValidationException). moto starts from it
    anyway, so a cursor a client forged answered a page here and a 500 on AWS."""
    signature = inspect.signature(query)
    dynamo_type = importlib.import_module("moto.dynamodb.models.dynamo_type").DynamoType
    refused = importlib.import_module("moto.dynamodb.exceptions").MockValidationException

    @functools.wraps(query)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        start = bound.arguments.get("exclusive_start_key")
        comparison = bound.arguments.get("range_comparison")
        if start and comparison:
            table = self.get_table(bound.arguments["table_name"])
            name = _sort_key_name(table, bound.arguments.get("index_name"))
            if name in start:
                bounds = [dynamo_type(value) for value in bound.arguments.get("range_value_dicts") or []]
                if not dynamo_type(start[name]).compare(comparison, bounds):
                    raise refused(
                        "The provided starting key is outside query boundaries based on provided conditions"
                    )
        return query(self, *args, **kwargs)

    return checked


def _sort_key_name(table: Any, index_name: str | None) -> str | None:
    if not index_name:
        return table.range_key_attr
    for index in table.all_indexes():
        if index.name == index_name:
            return next((key["AttributeName"] for key in index.schema if key["KeyType"] == "RANGE"), None)
    return None


def _mark_received(mark_received: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(mark_received)
    def received(self: Any, *args: Any, **kwargs: Any) -> Any:
        from moto.core.utils import unix_time_millis

        self.llmq_received_ms = unix_time_millis()
        return mark_received(self, *args, **kwargs)

    return received


def _no_negative_seconds(value: Any, parameter: str) -> None:
    """SQS refuses DelaySeconds and VisibilityTimeout below 0 (moto takes them)."""
    if value is not None and int(value) < 0:
        from moto.sqs.exceptions import InvalidParameterValue

        raise InvalidParameterValue(
            f"Value {value} for parameter {parameter} is invalid. Reason: must be >= 0."
        )


def _strict_change_message_visibility(
    self: Any, queue_name: str, receipt_handle: str, visibility_timeout: int
) -> None:
    from moto.core.utils import unix_time_millis
    from moto.sqs.exceptions import InvalidParameterValue, ReceiptHandleIsInvalid, SQSException

    _no_negative_seconds(visibility_timeout, "VisibilityTimeout")
    queue = self.get_queue(queue_name)
    for message in queue._messages:
        if not message.had_receipt_handle(receipt_handle):
            continue
        if message.receipt_handle != receipt_handle:
            raise ReceiptHandleIsInvalid()  # a handle from an earlier receive
        if message.visible:
            raise SQSException("AWS.SimpleQueueService.MessageNotInflight", "The message is not in flight.")
        received = getattr(message, "llmq_received_ms", None) or unix_time_millis()
        if unix_time_millis() + int(visibility_timeout) * 1000 - received > MAX_SQS_VISIBILITY_SECONDS * 1000:
            raise InvalidParameterValue(
                f"Value {visibility_timeout} for parameter VisibilityTimeout is invalid. Reason: Total "
                f"VisibilityTimeout for the message is beyond the limit [{MAX_SQS_VISIBILITY_SECONDS} seconds]"
            )
        message.change_visibility(visibility_timeout)
        if message.visible and message in queue.pending_messages:
            queue.pending_messages.remove(message)
        return
    raise ReceiptHandleIsInvalid()


def _stale_handle_deletes_nothing(delete: Callable[..., Any]) -> Callable[..., Any]:
    """DeleteMessage (and each entry of DeleteMessageBatch) with a handle from an earlier receive
    of a message received again since: the request succeeds and the message stays (API
    reference: "you must provide the most recently received receipt handle ... otherwise, the
    request succeeds, but the message will not be deleted"). moto deleted it: a late
    acknowledgement of a first receive took the message from its second (hunt 254)."""

    @functools.wraps(delete)
    def deleted(self: Any, queue_name: str, receipt_handle: str) -> None:
        queue = self.get_queue(queue_name)
        for message in queue._messages:
            if message.had_receipt_handle(receipt_handle) and message.receipt_handle != receipt_handle:
                return
        delete(self, queue_name, receipt_handle)

    return deleted


def _negative_entries_fail_alone(change_batch: Callable[..., Any]) -> Callable[..., Any]:
    """ChangeMessageVisibilityBatch: an entry with a negative timeout fails on its own."""

    @functools.wraps(change_batch)
    def change(self: Any, queue_name: str, entries: list[dict[str, Any]]) -> Any:
        def negative(entry: dict[str, Any]) -> bool:
            try:
                return int(entry["VisibilityTimeout"]) < 0
            except (KeyError, TypeError, ValueError):
                return False  # moto's own check answers these

        refused = [
            {
                "Id": entry["Id"],
                "SenderFault": True,
                "Code": "InvalidParameterValue",
                "Message": "Visibility timeout invalid",
            }
            for entry in entries
            if negative(entry)
        ]
        changed, failed = change_batch(self, queue_name, [entry for entry in entries if not negative(entry)])
        return changed, [*failed, *refused]

    return change


# ---- SQS fair queues (emulated) -----------------------------------------------------------

# The documented noisy-neighbour thresholds (sqs-fair-queues-detailed.html).
FAIR_CONCURRENCY_SHARE = 0.10
FAIR_MIN_IN_FLIGHT = 30
FAIR_PROCESSING_TIME_SHARE = 0.10
FAIR_QUIET_AFTER_SECONDS = 300.0
# How long "recent" processing time is remembered: our choice, AWS publishes none.
FAIR_RECENT_SECONDS = 60.0
# AWS: up to 128 alphanumeric and punctuation characters (SendMessage, MessageGroupId).
_GROUP_ID = re.compile(r"[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}")
_FAIR_LOCK = threading.Lock()
_fair_queues = False
# Set while this thread runs a ReceiveMessage: how many messages it asked for.
_receiving = threading.local()
# On a moto Queue: its _FairState.
_FAIR_STATE = "llmq_fair_state"


class _FairState:
    """What a standard queue remembers about its tenants between receives."""

    def __init__(self) -> None:
        # Decayed in-flight message-seconds per message group: the recent processing time.
        self.busy: dict[str, float] = {}
        self.in_flight: dict[str, int] = {}
        self.sampled_at = time.monotonic()
        self.last_sent: dict[str, float] = {}

    def sample(self, in_flight: dict[str, int], now: float) -> None:
        """Add the in-flight message-seconds since the last sample, and forget old ones."""
        elapsed = max(0.0, now - self.sampled_at)
        decay = math.exp(-elapsed / FAIR_RECENT_SECONDS)
        busy = {group: value * decay for group, value in self.busy.items()}
        for group, count in self.in_flight.items():
            busy[group] = busy.get(group, 0.0) + count * elapsed
        self.busy = {group: value for group, value in busy.items() if value > 1e-6}
        self.in_flight = dict(in_flight)
        self.sampled_at = now


def set_fair_queues(on: bool) -> None:
    """From now on, standard queues deliver in fair-queue order (or, off, oldest first as moto)."""
    global _fair_queues
    with _FAIR_LOCK:
        _fair_queues = bool(on)


def fair_queues() -> bool:
    return _fair_queues


@contextmanager
def fair_queue_order(on: bool) -> Iterator[None]:
    """Fair-queue order on or off for the block, then back as it was (tests)."""
    before = _fair_queues
    set_fair_queues(on)
    try:
        yield
    finally:
        set_fair_queues(before)


def _fair_state(queue: Any) -> _FairState:
    state = getattr(queue, _FAIR_STATE, None)
    if state is None:
        state = _FairState()
        setattr(queue, _FAIR_STATE, state)
    return state


def _tenant(message: Any) -> str:
    # A message without a group is a tenant of its own.
    return f"g:{message.group_id}" if message.group_id else f"m:{message.id}"


def fair_order(queue: Any, visible: list[Any], count: int) -> list[Any]:
    """`visible` (oldest first) with the first `count` messages as a fair queue would return
    them: quiet tenants' oldest first, then the noisy tenant with the fewest in flight. The rest
    keep their order; the receive picks from the front and skips what it cannot return."""
    now = time.monotonic()
    in_flight: dict[str, int] = {}
    for message in queue._messages:
        if message.group_id and message.approximate_receive_count and not message.visible:
            in_flight[message.group_id] = in_flight.get(message.group_id, 0) + 1
    with _FAIR_LOCK:
        state = _fair_state(queue)
        state.sample(in_flight, now)
        busy = dict(state.busy)
        last_sent = dict(state.last_sent)
    total_busy = sum(busy.values())
    total_in_flight = sum(in_flight.values())
    waiting: dict[str, list[int]] = {}
    for index, message in enumerate(visible):
        waiting.setdefault(_tenant(message), []).append(index)

    picked: list[int] = []
    heads = {tenant: 0 for tenant in waiting}
    picks = {tenant: 0 for tenant in waiting}

    def rank(tenant: str) -> tuple[int, int, int]:
        """(0, 0, age) for a quiet tenant, (1, in flight, age) for a noisy one: lowest first."""
        oldest = waiting[tenant][heads[tenant]]
        group = tenant[2:]
        if not tenant.startswith("g:") or now - last_sent.get(group, now) > FAIR_QUIET_AFTER_SECONDS:
            return (0, 0, oldest)
        held = in_flight.get(group, 0) + picks[tenant]
        total = total_in_flight + len(picked)
        crowding = held >= FAIR_MIN_IN_FLIGHT and held > FAIR_CONCURRENCY_SHARE * total
        busiest = total_busy > 0 and busy.get(group, 0.0) > FAIR_PROCESSING_TIME_SHARE * total_busy
        return (1, held, oldest) if crowding or busiest else (0, 0, oldest)

    while len(picked) < count and heads:
        tenant = min(heads, key=rank)
        picked.append(waiting[tenant][heads[tenant]])
        picks[tenant] += 1
        heads[tenant] += 1
        if heads[tenant] == len(waiting[tenant]):
            del heads[tenant]
    chosen = set(picked)
    return [visible[index] for index in picked] + [
        message for index, message in enumerate(visible) if index not in chosen
    ]


def _fair_messages(messages: property) -> tuple[property, property]:
    """Queue.messages (its visible messages, oldest first), in fair order inside a receive; and
    Queue.approximate_number_of_messages, which only counts them."""
    plain = messages.fget
    assert plain is not None

    def visible(self: Any) -> list[Any]:
        found: list[Any] = plain(self)
        count = getattr(_receiving, "count", None)
        if count is None or not _fair_queues or self.fifo_queue:
            return found
        if not any(message.group_id for message in found):
            return found
        return fair_order(self, found, count)

    return property(visible), property(_count_visible)


# Speed only, same answers: moto computes every attribute of a queue for each message sent (it
# reads ContentBasedDeduplication from them), and its three counts read the clock once per
# message through a datetime; one clock reading per count makes a send O(backlog) cheap passes.
def _count_visible(queue: Any) -> int:
    from moto.core.utils import unix_time_millis

    now = unix_time_millis()
    return sum(1 for message in queue._messages if now > message.visible_at and now >= message.delayed_until)


def _count_delayed(queue: Any) -> int:
    from moto.core.utils import unix_time_millis

    now = unix_time_millis()
    return sum(1 for message in queue._messages if now < message.delayed_until)


def _count_not_visible(queue: Any) -> int:
    from moto.core.utils import unix_time_millis

    now = unix_time_millis()
    return sum(1 for message in queue._messages if now <= message.visible_at)


def _retained(self: Any, queue_name: str, message: Any) -> bool:
    """SQSBackend.is_message_valid_based_on_retention_period, reading the one attribute it needs.

    Speed only, same answer: moto computed every attribute of the queue (each a pass over all its
    messages) for each message a receive returns, so a receive cost O(batch x backlog): about
    0.4 s for 10 messages from a 200-message queue, and seconds from a 2,000-message backlog.
    """
    from moto.core.utils import unix_time

    queue = self.get_queue(queue_name)
    return bool(int(queue.message_retention_period) + message.sent_timestamp / 1000 > unix_time())


def _fair_receive(receive_message: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(receive_message)

    @functools.wraps(receive_message)
    def receive(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(self, *args, **kwargs).arguments
        _no_negative_seconds(arguments.get("visibility_timeout"), "VisibilityTimeout")
        _receiving.count = int(arguments["count"])
        try:
            return receive_message(self, *args, **kwargs)
        finally:
            _receiving.count = None

    return receive


def _checked_group_id(validate_message: Callable[..., Any]) -> Callable[..., Any]:
    """SendMessage (and each batch entry) refuses a MessageGroupId AWS would refuse, and a body
    AWS would: characters outside SQS's allowed set (InvalidMessageContents, SendMessage's
    error of that name), or over the queue's MaximumMessageSize counted in UTF-8 bytes (moto
    counts characters)."""
    signature = inspect.signature(validate_message)

    @functools.wraps(validate_message)
    def validate(self: Any, *args: Any, **kwargs: Any) -> Any:
        from moto.sqs.exceptions import InvalidParameterValue

        arguments = signature.bind(self, *args, **kwargs).arguments
        group_id = arguments.get("group_id")
        if group_id is not None and not _GROUP_ID.fullmatch(group_id):
            raise InvalidParameterValue(
                "Value for parameter MessageGroupId is invalid. Reason: it must be 1 to 128 "
                "alphanumeric or punctuation characters."
            )
        body = arguments.get("message_body")
        if isinstance(body, str):
            if SQS_REFUSED_CHARACTERS.search(body):
                from moto.sqs.exceptions import SQSException

                raise SQSException(
                    "InvalidMessageContents",
                    "The message contains characters outside the allowed set: #x9, #xA, #xD, "
                    "#x20 to #xD7FF, #xE000 to #xFFFD, #x10000 to #x10FFFF",
                )
            queue = arguments.get("queue")
            limit = int(getattr(queue, "maximum_message_size", None) or SQS_MAX_MESSAGE_BYTES)
            if len(body.encode("utf-8", "surrogatepass")) > limit:
                raise InvalidParameterValue(
                    f"One or more parameters are invalid. Reason: Message must be shorter than {limit} bytes."
                )
        return validate_message(self, *args, **kwargs)

    return validate


# The size limit, in UTF-8 bytes, of a queue that sets no MaximumMessageSize (what SQS refuses
# in a body is `llmq.queues.SQS_REFUSED_CHARACTERS`) (CreateQueue's documented default; moto 5.2.5 gives
# its queues 1 MiB, so this applies only to one whose attribute is missing).
SQS_MAX_MESSAGE_BYTES = 262_144


# A placeholder of ExpressionAttributeValues in an expression.
_VALUE_PLACEHOLDER = re.compile(r":[A-Za-z0-9_]+")
_EXPRESSIONS = ("ConditionExpression", "UpdateExpression", "KeyConditionExpression", "FilterExpression")


def _values_all_used(action: Callable[..., Any]) -> Callable[..., Any]:
    """A DynamoDB request (each of a transaction's entries) whose ExpressionAttributeValues
    holds a value no expression uses is refused, as DynamoDB refuses it ("Value provided in
    ExpressionAttributeValues unused in expressions"); moto checks this for UpdateItem only."""

    @functools.wraps(action)
    def checked(self: Any) -> Any:
        from moto.dynamodb.exceptions import MockValidationException

        body = self.body if isinstance(self.body, dict) else {}
        requests = [next(iter(entry.values())) for entry in body.get("TransactItems") or []] or [body]
        for request in requests:
            used = {
                found
                for name in _EXPRESSIONS
                for found in _VALUE_PLACEHOLDER.findall(request.get(name) or "")
            }
            unused = sorted(set(request.get("ExpressionAttributeValues") or {}) - used)
            if unused:
                raise MockValidationException(
                    f"Value provided in ExpressionAttributeValues unused in expressions: keys: {{{', '.join(unused)}}}"
                )
        return action(self)

    return checked


# DynamoDB's bound on any one expression string, in UTF-8 bytes ("the maximum length of any
# expression string is 4 KB").
MAX_EXPRESSION_BYTES = 4096
_ALL_EXPRESSIONS = (*_EXPRESSIONS, "ProjectionExpression")


def _expressions_within_4_kb(action: Callable[..., Any]) -> Callable[..., Any]:
    """A request (each of a transaction's entries, each table of a BatchGetItem) with an
    expression over 4 KB is refused, as DynamoDB refuses it; moto takes any length, so an
    expression that grows with its input (a list of names, of swept places) would pass every
    local test and fail on AWS (hunt 312)."""

    @functools.wraps(action)
    def checked(self: Any) -> Any:
        from moto.dynamodb.exceptions import MockValidationException

        body = self.body if isinstance(self.body, dict) else {}
        requests = [
            *(next(iter(entry.values())) for entry in body.get("TransactItems") or []),
            *(body.get("RequestItems") or {}).values(),
            body,
        ]
        for request in requests:
            for name in _ALL_EXPRESSIONS:
                size = len(str(request.get(name) or "").encode("utf-8", "surrogatepass"))
                if size > MAX_EXPRESSION_BYTES:
                    raise MockValidationException(
                        f"Invalid {name}: Expression size has exceeded the maximum allowed size; "
                        f"expression size: {size}"
                    )
        return action(self)

    return checked


def _sent_by_group(send_message: Callable[..., Any]) -> Callable[..., Any]:
    """Remembers when each message group last sent (a tenant silent for 5 minutes is quiet),
    and refuses a message whose body and attributes together pass the queue's size limit, as
    SQS counts them (each attribute's name, type and value); moto counts the body alone. A
    String attribute's value that is empty, or holds a character a body may not, is refused
    (moto takes it: hunt 276)."""
    signature = inspect.signature(send_message)

    @functools.wraps(send_message)
    def send(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(self, *args, **kwargs).arguments
        # Raised here, where moto raises a delay past 900: a batch entry fails alone, as there.
        _no_negative_seconds(arguments.get("delay_seconds"), "DelaySeconds")
        attributes = arguments.get("message_attributes") or {}
        for name, attribute in attributes.items():
            value = attribute.get("StringValue") if isinstance(attribute, dict) else None
            if isinstance(value, str) and (not value or SQS_REFUSED_CHARACTERS.search(value)):
                # (a String value has the body's rules, and is never empty: AWS's API reference,
                # MessageAttributeValue; it names no error code, so the body's is given)
                from moto.sqs.exceptions import SQSException

                raise SQSException(
                    "InvalidMessageContents",
                    f"Message attribute {name}'s value is empty or contains characters outside the allowed set",
                )
        body = arguments.get("message_body")
        if attributes and isinstance(body, str):
            from moto.sqs.exceptions import InvalidParameterValue

            queue = self.get_queue(arguments["queue_name"])
            limit = int(getattr(queue, "maximum_message_size", None) or SQS_MAX_MESSAGE_BYTES)
            if len(body.encode("utf-8", "surrogatepass")) + _attributes_bytes(attributes) > limit:
                raise InvalidParameterValue(
                    f"One or more parameters are invalid. Reason: Message must be shorter than {limit} bytes."
                )
        message = send_message(self, *args, **kwargs)
        group_id = arguments.get("group_id")
        if group_id:
            queue = self.get_queue(arguments["queue_name"])
            with _FAIR_LOCK:
                _fair_state(queue).last_sent[group_id] = time.monotonic()
        return message

    return send


def _attributes_bytes(attributes: dict[str, Any]) -> int:
    """Message attributes' share of a message's size: each one's name, data type and value."""
    size = 0
    for name, attribute in attributes.items():
        value = attribute.get("StringValue", attribute.get("BinaryValue", b""))
        encoded = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
        size += len(name.encode()) + len(str(attribute.get("DataType", "")).encode()) + len(encoded)
    return size


def _wakes_when_due(queue: Any, timeout: float) -> None:
    """Queue.wait_for_messages that also wakes when the next delayed or in-flight message is due."""
    from moto.core.utils import unix_time_millis

    with queue._messages_lock:
        now_ms = unix_time_millis()
        due = [
            max(message.visible_at, message.delayed_until)
            for message in queue._messages
            if max(message.visible_at, message.delayed_until) > now_ms
        ]
        if due:
            # `visible` holds strictly after visible_at: a millisecond past it.
            timeout = min(timeout, max(0.001, (min(due) - now_ms + 1) / 1000))
        queue._messages_lock.wait_for(lambda: queue.messages, timeout=timeout)


def _put_body_taken_raw(setup_class: Callable[..., Any]) -> Callable[..., Any]:
    """S3: a PUT's body as sent, never a form (module docstring)."""

    @functools.wraps(setup_class)
    def setup(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.method == "PUT":
            from werkzeug.datastructures import ImmutableMultiDict

            request.get_data(parse_form_data=False)  # cached: `request.data` answers these bytes
            # werkzeug parses no form once one is there.
            request.__dict__["form"] = ImmutableMultiDict()
            request.__dict__["files"] = ImmutableMultiDict()
        return setup_class(self, request, *args, **kwargs)

    return setup


def _upload_part_of_a_live_upload(upload_part: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(upload_part)
    def part(self: Any, bucket_name: str, multipart_id: str, *args: Any, **kwargs: Any) -> Any:
        from moto.s3.exceptions import NoSuchUpload

        if multipart_id not in self.get_bucket(bucket_name).multiparts:
            raise NoSuchUpload(upload_id=multipart_id)
        return upload_part(self, bucket_name, multipart_id, *args, **kwargs)

    return part


def _etag_read_under_the_keys_lock(etag: property) -> property:
    """moto works a key's ETag out lazily, the first time it is asked for, by seeking its buffer
    to the start and reading it through, without the key's lock. Two threads asking at once (a
    part's UploadPart answer, and a CompleteMultipartUpload naming it) interleave their seeks and
    reads, and one stores and answers the MD5 of nothing, or of the bytes twice: a results file
    whose checkpointed part ETag S3 never had fails InvalidPart at every Complete (helper 214
    found a batch stuck in `finalizing` so). S3 computes a part's ETag from the bytes as it
    stores them: the same bytes, the same ETag, whoever asks."""
    read = etag.fget
    assert read is not None

    def locked(self: Any) -> str:
        with self.lock:
            return str(read(self))

    return property(locked)


def _listed_once(list_of_moto_modules: Callable[[], Any]) -> Callable[[], tuple[str, ...]]:
    """moto.backends.list_of_moto_modules, read from disk once.

    Speed only, same answer: moto's server lists its package directory (a stat per entry, over
    a hundred) on every request to find its backend, under the one lock that every request
    takes, so the sandbox's AWS calls queued behind each other's directory listings.
    """
    names = tuple(list_of_moto_modules())
    return lambda: names


def _unlocked_when_present(getitem: Callable[..., Any]) -> Callable[..., Any]:
    """BackendDict.__getitem__ without moto's global lock for an account it already holds.

    Speed only, same answer: moto takes one process-wide lock on every backend lookup (several
    per request) to create the account's backend on first use, and under load the requests
    queued on it. An account present was created under that lock and registered for reset,
    and a reset empties the dict before it forgets the registration, so the lock is only
    needed for an account not yet present.
    """

    @functools.wraps(getitem)
    def lookup(self: Any, account_id: str) -> Any:
        try:
            return dict.__getitem__(self, account_id)
        except KeyError:
            return getitem(self, account_id)

    return lookup


# Speed only, same answers: moto parses every update and condition expression from scratch on
# each write (an update expression twice), and llmq's expressions are long (a claim or a
# finish sets a dozen attributes under a lease condition); under a steady 20 jobs a second
# this parsing was most of the sandbox's CPU. What depends only on an expression's text is
# kept per text: the update expression's syntax tree (moto's validator works on a deep copy
# of it, and nothing else writes to it) and the condition expression's tokens (fresh nodes
# each time, so no later step can share one). Values and names are still applied per call.
_PARSED_KEPT = 512


def _update_parsed_once(make: Callable[..., Any]) -> Any:
    cached = functools.lru_cache(maxsize=_PARSED_KEPT)(make.__func__)  # type: ignore[attr-defined]

    def parse(cls: Any, expression_str: str) -> Any:
        return cached(cls, expression_str)

    return classmethod(parse)


def _condition_lexed_once(lex: Callable[..., Any]) -> Callable[..., Any]:
    @functools.lru_cache(maxsize=_PARSED_KEPT)
    def tokens(parser_type: Any, expression: str) -> tuple[Any, ...]:
        parser = object.__new__(parser_type)
        parser.condition_expression = expression
        return tuple(lex(parser))

    @functools.wraps(lex)
    def lexed(self: Any) -> Any:
        parser_type: Any = type(self)
        return deque(node._replace(children=[]) for node in tokens(parser_type, self.condition_expression))

    return lexed


def _condition_parsed_once(parse: Callable[..., Any]) -> Callable[..., Any]:
    """ConditionExpressionParser.parse, kept per expression and the names and values it uses.

    Speed only, same answer: a write's condition is parsed again by each step that checks it
    (a transaction's item, then the update inside it), and most of llmq's conditions repeat
    their values exactly (a tenant's cap, a lane, a lease owner within one attempt). The tree
    parse returns holds the values it was given and is only read after (each node's `expr`
    reads the item and assigns nothing), so one tree can answer every call with the same
    inputs, with the names and values it found (which the callers check against those given:
    an unused one is a ValidationException). The key holds only the placeholders the text
    names, so a large value beside it (a job's result) is neither kept nor serialized for it;
    the tree is parsed from a copy of the values, so it shares no list with a stored item that
    a later ADD or DELETE could change. A parse that raises is not kept: it raises again."""
    kept: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
    lock = threading.Lock()

    @functools.wraps(parse)
    def parsed(self: Any) -> Any:
        expression = self.condition_expression
        if not expression:
            return parse(self)
        placeholders = sorted(set(_PLACEHOLDER.findall(expression)))
        names = self.expression_attribute_names or {}
        values = self.expression_attribute_values or {}
        key = (
            type(self),
            expression,
            tuple((name, names.get(name)) for name in placeholders if name.startswith("#")),
            json.dumps(
                {name: values.get(name) for name in placeholders if name.startswith(":")},
                sort_keys=True,
                default=repr,
            ),
        )
        with lock:
            found = kept.get(key)
            if found is not None:
                kept.move_to_end(key)
        if found is not None:
            tree, names_found, values_found = found
            self.expr_attr_names_found.extend(names_found)
            self.expr_attr_values_found.extend(values_found)
            return tree
        given = self.expression_attribute_values
        self.expression_attribute_values = copy.deepcopy(given)
        try:
            tree = parse(self)
        finally:
            self.expression_attribute_values = given
        with lock:
            kept[key] = (tree, tuple(self.expr_attr_names_found), tuple(self.expr_attr_values_found))
            if len(kept) > _PARSED_KEPT:
                kept.popitem(last=False)
        return tree

    return parsed


# An expression attribute name or value placeholder, as a condition's text names it.
_PLACEHOLDER = re.compile(r"[#:][A-Za-z0-9_]+")


def _action_counts_at_the_root(self: Any, node: Any) -> Any:
    """ActionCountValidator.traverse: moto checks the clause counts below every node of the
    update expression's chain, which costs the square of its length; the root's subtree holds
    every clause, so checking it alone refuses exactly the same expressions (when several
    clauses repeat, its message may name another of them than moto's would)."""
    if isinstance(node, importlib.import_module("moto.dynamodb.parsing.ast_nodes").UpdateExpression):
        self.verify_action_counts(node)
    return node


def _all_items_by_value(self: Any) -> list[Any]:
    """Table.all_items in moto's order (by hash key, then range key), sorted on the keys'
    plain values: moto compares DynamoType objects, a Python call per comparison, which every
    query and scan pays over the whole table. DynamoType orders by exactly these values
    (`cast_value`), and a table's key attributes have one type each, so the order is the same."""
    items: list[Any] = []
    for stored in self.items.values():
        if self.range_key_attr:
            items.extend(stored.values())
        else:
            items.append(stored)
    return sorted(
        items,
        key=lambda item: (
            (item.hash_key.cast_value, item.range_key.cast_value)
            if item.range_key
            else item.hash_key.cast_value
        ),
    )


def _sorted_items_by_value(
    self: Any, hash_key_attrs: list[str], range_key_attrs: list[Any], items: list[Any]
) -> list[Any]:
    """Table.sorted_items (an index query's matches, in the index's key order), on the keys'
    plain values as `_all_items_by_value` sorts: the same order at a fraction of the cost."""
    names = self._generate_attr_to_sort_by(hash_key_attrs, range_key_attrs)
    items.sort(key=lambda item: tuple(item.attrs[name].cast_value for name in names))
    return items


# DynamoDB's numbers ("Supported data types"): 38 significant digits, magnitude 1E-130 to <1E+126.
DYNAMODB_NUMBER_DIGITS = 38
_LARGEST_EXPONENT = 125
_SMALLEST_EXPONENT = -130


def dynamodb_refuses_number(text: str) -> str | None:
    """Why DynamoDB would refuse to store this number, in its own words; None if it stores it.
    Text that is no number is left to moto's own checks."""
    try:
        number = decimal.Decimal(text)
    except (decimal.InvalidOperation, TypeError, ValueError):
        return None
    if not number.is_finite() or number.is_zero():
        return None
    digits = "".join(map(str, number.as_tuple().digits)).strip("0")
    if len(digits) > DYNAMODB_NUMBER_DIGITS:
        return "Attempting to store more than 38 significant digits in a Number"
    if number.adjusted() > _LARGEST_EXPONENT:
        return "Number overflow. Attempting to store a number with magnitude larger than supported range"
    if number.adjusted() < _SMALLEST_EXPONENT:
        return "Number underflow. Attempting to store a number with magnitude smaller than supported range"
    return None


def _numbers_checked(init: Callable[..., Any]) -> Callable[..., Any]:
    """Every number moto takes from a request, or makes in an update, is one DynamoDB can store."""

    @functools.wraps(init)
    def checked(self: Any, type_as_dict: Any) -> None:
        init(self, type_as_dict)
        if self.type == "N":
            texts = [self.value]
        elif self.type == "NS":
            texts = list(self.value)
        else:
            return
        for text in texts:
            why = isinstance(text, str) and dynamodb_refuses_number(text)
            if why:
                from moto.dynamodb.exceptions import MockValidationException

                raise MockValidationException(why)

    return checked


# ---- API Gateway usage plan keys -------------------------------------------------------------


def _plan_key_deleted_once(original: Callable[..., Any]) -> Callable[..., Any]:
    """DeleteUsagePlanKey of a key not in the plan: API Gateway's NotFoundException, as the
    retry of a delete applied with its answer lost meets it (moto raised a bare KeyError: a 500)."""
    from moto.apigateway.exceptions import NotFoundException

    class PlanKeyNotFound(NotFoundException):
        code = 404

    def delete(self: Any, usage_plan_id: str, key_id: str) -> Any:
        if key_id not in self.usage_plan_keys.get(usage_plan_id, {}):
            raise PlanKeyNotFound("Invalid API Key identifier specified")
        return original(self, usage_plan_id, key_id)

    return delete


def _plan_key_added_once(original: Callable[..., Any]) -> Callable[..., Any]:
    """CreateUsagePlanKey of a key already in the plan: API Gateway's ConflictException, as the
    retry of an add applied with its answer lost meets it (moto added it again). And of a key
    in another plan of one of the plan's stages: a key references one plan per API stage, and
    API Gateway refuses the add (moto made it, and the sandbox's gateway then throttled the
    key by whichever plan it read last: hunt 263)."""
    from moto.apigateway.exceptions import ConflictException

    def create(self: Any, usage_plan_id: str, payload: dict[str, Any]) -> Any:
        key = payload.get("keyId")
        if key in self.usage_plan_keys.get(usage_plan_id, {}):
            raise ConflictException("the API key is already in this usage plan")
        stages = _stages_of(self.usage_plans.get(usage_plan_id))
        for other_id, keys in self.usage_plan_keys.items():
            shared = stages & _stages_of(self.usage_plans.get(other_id))
            if other_id != usage_plan_id and key in keys and shared:
                raise ConflictException(
                    f"Usage Plan {usage_plan_id} cannot be added because API Key {key} cannot reference "
                    f"multiple Usage Plans with the same API Stage: {min(shared)}"
                )
        return original(self, usage_plan_id, payload)

    return create


def _plan_deleted_once(original: Callable[..., Any]) -> Callable[..., Any]:
    """DeleteUsagePlan of a plan that is gone: API Gateway's NotFoundException, as the retry of
    a delete applied with its answer lost meets it (moto raised a bare KeyError: a 500)."""
    from moto.apigateway.exceptions import NotFoundException

    class PlanNotFound(NotFoundException):
        code = 404

    def delete(self: Any, usage_plan_id: str) -> Any:
        if usage_plan_id not in self.usage_plans:
            raise PlanNotFound("Invalid Usage Plan ID specified")
        return original(self, usage_plan_id)

    return delete


def _plan_stage_removed_once(original: Callable[..., Any]) -> Callable[..., Any]:
    """UpdateUsagePlan removing an API stage the plan does not have: API Gateway's
    BadRequestException ("Invalid API Stage specified"), as the retry of a detach applied with
    its answer lost meets it (moto raised a bare ValueError: a 500)."""
    from moto.apigateway.exceptions import BadRequestException

    def update(self: Any, usage_plan_id: str, patch_operations: Any) -> Any:
        stages = _stages_of(self.usage_plans.get(usage_plan_id))
        for operation in patch_operations or []:
            removed = operation.get("op") == "remove" and operation.get("path") == "/apiStages"
            if removed and operation.get("value") not in stages:
                raise BadRequestException("Invalid API Stage specified")
        return original(self, usage_plan_id, patch_operations)

    return update


def _stages_of(plan: Any) -> set[str]:
    """A moto usage plan's API stages, as `apiId:stage`."""
    return {f"{stage.get('apiId')}:{stage.get('stage')}" for stage in getattr(plan, "api_stages", None) or []}


def make_moto_strict() -> None:
    """Idempotent: patches moto's DynamoDB backend (and SQS's visibility rules and fair-queue
    order) once per process."""
    global _applied
    with _LOCK:
        if _applied:
            return
        from moto.dynamodb.models import DynamoDBBackend
        from moto.dynamodb.models.dynamo_type import DynamoType, LimitedSizeDict
        from moto.dynamodb.models.table import Table

        LimitedSizeDict.__setitem__ = _size_checked_once_at_the_end  # type: ignore[method-assign]
        DynamoType.__init__ = _numbers_checked(DynamoType.__init__)  # type: ignore[method-assign]
        Table.put_item = _checked_put(Table.put_item)  # type: ignore[method-assign]
        Table.all_items = _all_items_by_value  # type: ignore[method-assign]
        Table.sorted_items = _sorted_items_by_value  # type: ignore[method-assign]
        DynamoDBBackend.update_item = _all_or_nothing_update(DynamoDBBackend.update_item)  # type: ignore[method-assign]
        # Outside the all-or-nothing update, inside the lock: only a write that held is remembered.
        DynamoDBBackend.put_item = _recorded(DynamoDBBackend.put_item)  # type: ignore[method-assign]
        DynamoDBBackend.update_item = _recorded(DynamoDBBackend.update_item)  # type: ignore[method-assign]
        DynamoDBBackend.delete_item = _recorded(DynamoDBBackend.delete_item)  # type: ignore[method-assign]
        DynamoDBBackend.query = _lagged_index_read(DynamoDBBackend.query)  # type: ignore[method-assign]
        DynamoDBBackend.query = _start_key_within_the_query(DynamoDBBackend.query)  # type: ignore[method-assign]
        DynamoDBBackend.scan = _lagged_index_read(DynamoDBBackend.scan)  # type: ignore[method-assign]
        DynamoDBBackend.transact_write_items = _item_rollback_transaction(  # type: ignore[method-assign]
            DynamoDBBackend.transact_write_items
        )
        # The lock goes outside, so a snapshot and its restore are never interleaved with a write.
        for name in _WRITES:
            setattr(DynamoDBBackend, name, _serialized(getattr(DynamoDBBackend, name)))
        for name in _READS:
            setattr(DynamoDBBackend, name, _snapshot_read(getattr(DynamoDBBackend, name)))
        from moto.dynamodb.responses import DynamoHandler

        for name in ("put_item", "delete_item", "query", "scan", "transact_write_items"):
            setattr(DynamoHandler, name, _values_all_used(getattr(DynamoHandler, name)))
        for name in (
            "put_item",
            "delete_item",
            "update_item",
            "get_item",
            "batch_get_item",
            "query",
            "scan",
            "transact_write_items",
            "transact_get_items",
        ):
            setattr(DynamoHandler, name, _expressions_within_4_kb(getattr(DynamoHandler, name)))
        from moto.s3.models import S3Backend

        S3Backend.upload_part = _upload_part_of_a_live_upload(S3Backend.upload_part)  # type: ignore[method-assign]
        from moto.s3.models import FakeKey
        from moto.s3.responses import S3Response

        S3Response.setup_class = _put_body_taken_raw(S3Response.setup_class)  # type: ignore[method-assign]

        FakeKey.etag = _etag_read_under_the_keys_lock(FakeKey.etag)  # type: ignore[arg-type,assignment,method-assign]
        from moto.sqs.models import Message, SQSBackend

        Message.mark_received = _mark_received(Message.mark_received)  # type: ignore[method-assign]
        SQSBackend.change_message_visibility = _strict_change_message_visibility  # type: ignore[method-assign]
        SQSBackend.delete_message = _stale_handle_deletes_nothing(SQSBackend.delete_message)  # type: ignore[method-assign]
        SQSBackend.change_message_visibility_batch = _negative_entries_fail_alone(  # type: ignore[method-assign]
            SQSBackend.change_message_visibility_batch
        )
        from moto.sqs.models import Queue

        fair, counted = _fair_messages(vars(Queue)["messages"])
        Queue.messages = fair  # type: ignore[assignment,method-assign]
        Queue.approximate_number_of_messages = counted  # type: ignore[assignment,method-assign]
        Queue.approximate_number_of_messages_delayed = property(_count_delayed)  # type: ignore[assignment,method-assign]
        Queue.approximate_number_of_messages_not_visible = property(_count_not_visible)  # type: ignore[assignment,method-assign]
        SQSBackend.is_message_valid_based_on_retention_period = _retained  # type: ignore[method-assign]
        SQSBackend.receive_message = _fair_receive(SQSBackend.receive_message)  # type: ignore[method-assign]
        Queue.wait_for_messages = _wakes_when_due  # type: ignore[method-assign,assignment]
        SQSBackend._validate_message = _checked_group_id(SQSBackend._validate_message)  # type: ignore[method-assign]
        SQSBackend.send_message = _sent_by_group(SQSBackend.send_message)  # type: ignore[method-assign]
        from moto.apigateway.models import APIGatewayBackend

        plans = APIGatewayBackend
        plans.delete_usage_plan_key = _plan_key_deleted_once(plans.delete_usage_plan_key)  # type: ignore[method-assign]
        plans.create_usage_plan_key = _plan_key_added_once(plans.create_usage_plan_key)  # type: ignore[method-assign]
        plans.delete_usage_plan = _plan_deleted_once(plans.delete_usage_plan)  # type: ignore[method-assign]
        plans.update_usage_plan = _plan_stage_removed_once(plans.update_usage_plan)  # type: ignore[method-assign]
        from moto import backends

        backends.list_of_moto_modules = _listed_once(backends.list_of_moto_modules)
        from moto.core.base_backend import BackendDict

        BackendDict.__getitem__ = _unlocked_when_present(BackendDict.__getitem__)  # type: ignore[method-assign]
        # moto's parsing modules are untyped to mypy: reached through import_module.
        parsing = importlib.import_module("moto.dynamodb.parsing.expressions")
        validators = importlib.import_module("moto.dynamodb.parsing.validators")
        comparisons = importlib.import_module("moto.dynamodb.comparisons")
        parser = parsing.UpdateExpressionParser
        parser.make = _update_parsed_once(vars(parser)["make"])
        lexer = comparisons.ConditionExpressionParser
        lexer._lex_condition_expression = _condition_lexed_once(lexer._lex_condition_expression)
        lexer.parse = _condition_parsed_once(lexer.parse)
        validators.ActionCountValidator.traverse = _action_counts_at_the_root
        _applied = True
