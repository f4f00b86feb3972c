"""moto's DynamoDB, as patched by llmq_sandbox.moto_fidelity, refuses and keeps what AWS refuses and keeps.

A test that passes against a lenient moto and fails on AWS hides a bug; a test refused by a
stricter moto hides a working feature. These pin the item-size limit and all-or-nothing writes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from llmq import aws
from llmq.item_size import MAX_ITEM_BYTES, item_size_bytes
from llmq.job_index import SWEEP_INDEX, TENANT_INDEX
from llmq_sandbox.moto_fidelity import MAX_EXPRESSION_BYTES
from tests.conftest import REGION, MotoStack
from tests.support.index_lag import IndexClock, lagging_indexes_on_a_test_clock


@pytest.fixture
def ddb(moto_stack: MotoStack) -> Any:
    return aws.client("dynamodb")


def _get(ddb: Any, table: str, pk: str) -> dict[str, Any] | None:
    item: dict[str, Any] | None = ddb.get_item(
        TableName=table, Key={"pk": {"S": pk}}, ConsistentRead=True
    ).get("Item")
    return item


def _padded_to(size: int, **attributes: dict[str, Any]) -> dict[str, Any]:
    """An item of exactly `size` bytes as DynamoDB counts them: the attributes plus an ASCII pad."""
    item = {**attributes, "pad": {"S": ""}}
    item["pad"] = {"S": "x" * (size - item_size_bytes(item))}
    assert item_size_bytes(item) == size
    return item


def test_an_update_past_400_kb_is_refused_and_changes_nothing(ddb: Any, moto_stack: MotoStack) -> None:
    """UpdateItem, https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_UpdateItem.html:
    an update that fails (its condition, or the item-size limit) leaves the item as it was."""
    # Given a running job
    table = moto_stack.jobs_table
    ddb.put_item(
        TableName=table,
        Item={"pk": {"S": "job_big"}, "status": {"S": "running"}, "attempts": {"N": "1"}},
    )
    before = _get(ddb, table, "job_big")

    # When it completes with a result that takes the item past 400 KB (status first, result last,
    # the order in which moto used to apply and keep them)
    with pytest.raises(ClientError) as refused:
        ddb.update_item(
            TableName=table,
            Key={"pk": {"S": "job_big"}},
            UpdateExpression="SET #s = :done, finished_ms = :now, #r = :result",
            ExpressionAttributeNames={"#s": "status", "#r": "result"},
            ExpressionAttributeValues={
                ":done": {"S": "succeeded"},
                ":now": {"N": "1700000000000"},
                ":result": {"S": "y" * MAX_ITEM_BYTES},
            },
        )

    # Then DynamoDB's error, and the stored job is exactly as it was: still running, no finish time
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert "Item size to update has exceeded the maximum allowed size" in str(refused.value)
    assert _get(ddb, table, "job_big") == before


def test_an_oversized_update_of_an_absent_item_creates_nothing(ddb: Any, moto_stack: MotoStack) -> None:
    """UpdateItem, https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_UpdateItem.html:
    an update that fails (its condition, or the item-size limit) leaves the item as it was."""
    # When an update that would create an item is refused for its size
    with pytest.raises(ClientError) as refused:
        ddb.update_item(
            TableName=moto_stack.jobs_table,
            Key={"pk": {"S": "job_ghost"}},
            UpdateExpression="SET #r = :result",
            ExpressionAttributeNames={"#r": "result"},
            ExpressionAttributeValues={":result": {"S": "y" * MAX_ITEM_BYTES}},
        )
    # Then no key-only item is left behind
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert _get(ddb, moto_stack.jobs_table, "job_ghost") is None


def test_a_cjk_item_under_the_limit_in_characters_but_over_in_utf8_bytes_is_refused(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """DynamoDB item sizes and formats, https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html:
    an item is at most 400 KB, counted as names plus values (UTF-8), numbers by their digits,
    3 bytes per list or map and 1 per element."""
    # Given an output of 140,000 CJK characters: 420,000 UTF-8 bytes
    output = "漢" * 140_000
    assert len(output) < MAX_ITEM_BYTES < len(output.encode())
    # When it is put, Then it is refused, and nothing is stored
    with pytest.raises(ClientError) as refused:
        ddb.put_item(TableName=moto_stack.jobs_table, Item={"pk": {"S": "job_cjk"}, "output": {"S": output}})
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert "Item size has exceeded the maximum allowed size" in str(refused.value)
    assert _get(ddb, moto_stack.jobs_table, "job_cjk") is None


def test_an_item_of_exactly_400_kb_is_accepted_and_one_byte_more_is_not(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """DynamoDB item sizes and formats, https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html:
    an item is at most 400 KB, counted as names plus values (UTF-8), numbers by their digits,
    3 bytes per list or map and 1 per element."""
    # Given items sized to the byte, with emoji, a number and a map in them
    attributes: dict[str, dict[str, Any]] = {
        "pk": {"S": "job_edge"},
        "note": {"S": "😀 日本語"},
        "created_ms": {"N": "1700000000123"},
        "metadata": {"M": {"k": {"S": "v"}}},
    }
    at_limit = _padded_to(MAX_ITEM_BYTES, **attributes)

    # Then 409,600 bytes is stored whole (moto alone refused anything over 405,000)
    ddb.put_item(TableName=moto_stack.jobs_table, Item=at_limit)
    assert _get(ddb, moto_stack.jobs_table, "job_edge") == at_limit

    # And an update that adds one byte is refused, leaving the item as it was
    with pytest.raises(ClientError):
        ddb.update_item(
            TableName=moto_stack.jobs_table,
            Key={"pk": {"S": "job_edge"}},
            UpdateExpression="SET pad = :longer",
            ExpressionAttributeValues={":longer": {"S": at_limit["pad"]["S"] + "x"}},
        )
    assert _get(ddb, moto_stack.jobs_table, "job_edge") == at_limit


def test_list_overhead_counts_so_a_list_heavy_item_over_the_limit_is_refused(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """DynamoDB item sizes and formats, https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html:
    an item is at most 400 KB, counted as names plus values (UTF-8), numbers by their digits,
    3 bytes per list or map and 1 per element."""
    # Given 10,000 chunks of 40 bytes: 400,000 bytes of text, but 410,003 with the list's overhead
    chunks: dict[str, Any] = {"L": [{"S": "c" * 40}] * 10_000}
    item = {"pk": {"S": "job_chunks"}, "c": chunks}
    assert item_size_bytes(item) > MAX_ITEM_BYTES
    # When it is put, Then it is refused, as AWS would
    with pytest.raises(ClientError) as refused:
        ddb.put_item(TableName=moto_stack.jobs_table, Item=item)
    assert refused.value.response["Error"]["Code"] == "ValidationException"


def test_a_transaction_with_one_oversized_write_changes_no_item(ddb: Any, moto_stack: MotoStack) -> None:
    """TransactWriteItems, https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_TransactWriteItems.html:
    the writes of a transaction succeed or fail together."""
    # Given two jobs
    table = moto_stack.jobs_table
    for pk in ("job_a", "job_b"):
        ddb.put_item(TableName=table, Item={"pk": {"S": pk}, "status": {"S": "queued"}})
    before = {pk: _get(ddb, table, pk) for pk in ("job_a", "job_b")}

    # When one transaction updates both, and the second update is too large
    def update(pk: str, result: str) -> dict[str, Any]:
        return {
            "Update": {
                "TableName": table,
                "Key": {"pk": {"S": pk}},
                "UpdateExpression": "SET #s = :s, #r = :r",
                "ExpressionAttributeNames": {"#s": "status", "#r": "result"},
                "ExpressionAttributeValues": {":s": {"S": "succeeded"}, ":r": {"S": result}},
            }
        }

    with pytest.raises(ClientError) as refused:
        ddb.transact_write_items(TransactItems=[update("job_a", "ok"), update("job_b", "y" * MAX_ITEM_BYTES)])

    # Then neither job changed
    assert refused.value.response["Error"]["Code"] in {"ValidationException", "TransactionCanceledException"}
    assert {pk: _get(ddb, table, pk) for pk in ("job_a", "job_b")} == before


def test_a_transaction_of_more_than_4_mb_of_items_is_refused_and_writes_nothing(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """TransactWriteItems: "the aggregate size of the items in the transaction cannot exceed 4 MB"
    (hunt 299: moto wrote one; a batch chunk at a config's limit with a non-ASCII webhook URL was one)."""
    table = moto_stack.jobs_table

    def puts(count: int, size: int) -> list[dict[str, Any]]:
        return [
            {"Put": {"TableName": table, "Item": _padded_to(size, pk={"S": f"job_t{n:02d}"})}}
            for n in range(count)
        ]

    # Given eleven items of 390,000 bytes (4.29 MB together), each within the item limit
    with pytest.raises(ClientError) as refused:
        ddb.transact_write_items(TransactItems=puts(11, 390_000))
    # Then the transaction is refused, and no item written
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert "4 MB" in refused.value.response["Error"]["Message"]
    assert _get(ddb, table, "job_t00") is None
    # And ten of them (3.9 MB) are written
    ddb.transact_write_items(TransactItems=puts(10, 390_000))
    assert _get(ddb, table, "job_t09") is not None


def test_a_transaction_whose_second_condition_fails_leaves_the_first_item_as_it_was(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """moto applies a transaction's writes in order and rolls back on a failed condition; the
    sandbox rolls back the items the transaction names (not a copy of the whole table, which
    made each transaction cost seconds once the table held a few hundred jobs)."""
    # Given a tenant's share and a job that is no longer queued, and a job outside it all
    table = moto_stack.jobs_table
    ddb.put_item(TableName=table, Item={"pk": {"S": "share#t"}, "active": {"N": "1"}})
    ddb.put_item(TableName=table, Item={"pk": {"S": "job_a"}, "status": {"S": "running"}})
    ddb.put_item(TableName=table, Item={"pk": {"S": "job_other"}, "status": {"S": "queued"}})
    before = {pk: _get(ddb, table, pk) for pk in ("share#t", "job_a", "job_other")}
    # When one transaction counts the share and then claims the job as if queued
    with pytest.raises(ClientError) as refused:
        ddb.transact_write_items(
            TransactItems=[
                {
                    "Update": {
                        "TableName": table,
                        "Key": {"pk": {"S": "share#t"}},
                        "UpdateExpression": "ADD active :one",
                        "ExpressionAttributeValues": {":one": {"N": "1"}},
                    }
                },
                {
                    "Update": {
                        "TableName": table,
                        "Key": {"pk": {"S": "job_a"}},
                        "UpdateExpression": "SET #s = :running",
                        "ConditionExpression": "#s = :queued",
                        "ExpressionAttributeNames": {"#s": "status"},
                        "ExpressionAttributeValues": {
                            ":running": {"S": "running"},
                            ":queued": {"S": "queued"},
                        },
                    }
                },
            ]
        )
    # Then it is canceled, and every item is as it was
    assert refused.value.response["Error"]["Code"] == "TransactionCanceledException"
    assert [reason["Code"] for reason in refused.value.response["CancellationReasons"]] == [
        "None",
        "ConditionalCheckFailed",
    ]
    assert {pk: _get(ddb, table, pk) for pk in ("share#t", "job_a", "job_other")} == before


# ---- SQS: ChangeMessageVisibility ("Amazon SQS visibility timeout", SQS developer guide) ----


def _received(sqs: Any, url: str) -> dict[str, Any]:
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    message: dict[str, Any] = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=30)[
        "Messages"
    ][0]
    return message


def _refused(call: Any) -> str:
    with pytest.raises(ClientError) as refused:
        call()
    return str(refused.value.response["Error"]["Code"])


def test_visibility_past_12_hours_from_the_receive_is_refused(moto_stack: MotoStack) -> None:
    """Amazon SQS visibility timeout, https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-visibility-timeout.html:
    a message's visibility ends at most 12 hours after the receive that returned it."""
    # Given a message just received
    sqs = aws.client("sqs")
    url = moto_stack.lane_queue_urls["high"]
    message = _received(sqs, url)
    # When a handler asks for the whole 43,200 s a moment after the receive, Then SQS refuses
    # (the 12 hours run from the receive), and a value within them is accepted
    assert (
        _refused(
            lambda: sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=43_200 + 1
            )
        )
        == "InvalidParameterValue"
    )
    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=42_000
    )


def test_a_stale_receipt_handle_and_a_message_not_in_flight_are_refused(moto_stack: MotoStack) -> None:
    """Amazon SQS visibility timeout, https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-visibility-timeout.html,
    and ChangeMessageVisibility (API reference): only the latest receive's handle, of a message
    in flight, changes its visibility."""
    # Given a message received twice (its first visibility ended)
    sqs = aws.client("sqs")
    url = moto_stack.lane_queue_urls["high"]
    first = _received(sqs, url)
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=0)
    # When the first receive's handle changes the visibility of a message back in the queue
    not_in_flight = _refused(
        lambda: sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=5
        )
    )
    second = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=30)["Messages"][0]
    stale = _refused(
        lambda: sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=5
        )
    )
    # Then SQS refuses both, and the latest handle works
    assert not_in_flight == "AWS.SimpleQueueService.MessageNotInflight"
    assert stale == "ReceiptHandleIsInvalid"
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=second["ReceiptHandle"], VisibilityTimeout=5)


def test_a_delete_with_a_stale_receipt_handle_succeeds_and_leaves_the_message(moto_stack: MotoStack) -> None:
    """DeleteMessage (API reference): "you must provide the most recently received receipt handle
    for the message (otherwise, the request succeeds, but the message will not be deleted)"."""
    # Given a message received twice (its first visibility ended)
    sqs = aws.client("sqs")
    url = moto_stack.lane_queue_urls["high"]
    first = _received(sqs, url)
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=0)
    second = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=30)["Messages"][0]
    assert second["MessageId"] == first["MessageId"]
    # When a late acknowledgement of the first receive deletes it, alone and in a batch
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    batch = sqs.delete_message_batch(
        QueueUrl=url, Entries=[{"Id": "a", "ReceiptHandle": first["ReceiptHandle"]}]
    )
    # Then both succeed, and the message is still in flight under its latest receive
    assert [entry["Id"] for entry in batch.get("Successful", [])] == ["a"] and not batch.get("Failed")
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=second["ReceiptHandle"], VisibilityTimeout=0)
    again = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=30)["Messages"]
    assert [message["MessageId"] for message in again] == [first["MessageId"]]
    # And the latest handle deletes it
    sqs.delete_message(QueueUrl=url, ReceiptHandle=again[0]["ReceiptHandle"])
    assert sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1).get("Messages", []) == []


def test_negative_delays_and_visibility_timeouts_are_refused(moto_stack: MotoStack) -> None:
    """SendMessage, SendMessageBatch, ReceiveMessage, ChangeMessageVisibility(Batch) (API
    reference): DelaySeconds is 0 to 900 and VisibilityTimeout 0 to 43,200; below 0 is
    InvalidParameterValue (moto took a negative delay as none), a batch entry failing alone."""
    sqs = aws.client("sqs")
    url = moto_stack.lane_queue_urls["high"]
    assert _refused(lambda: sqs.send_message(QueueUrl=url, MessageBody="x", DelaySeconds=-1)) == (
        "InvalidParameterValue"
    )
    sent = sqs.send_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "late", "MessageBody": "late", "DelaySeconds": -5},
            {"Id": "now", "MessageBody": "now", "DelaySeconds": 0},
        ],
    )
    assert [entry["Id"] for entry in sent["Successful"]] == ["now"]
    assert [(entry["Id"], entry["Code"]) for entry in sent["Failed"]] == [("late", "InvalidParameterValue")]
    assert (
        _refused(lambda: sqs.receive_message(QueueUrl=url, VisibilityTimeout=-1)) == "InvalidParameterValue"
    )
    message = _received(sqs, url)
    assert message["Body"] == "now"
    handle = message["ReceiptHandle"]
    assert (
        _refused(
            lambda: sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=-1)
        )
        == "InvalidParameterValue"
    )
    changed = sqs.change_message_visibility_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "back", "ReceiptHandle": handle, "VisibilityTimeout": -2},
            {"Id": "hold", "ReceiptHandle": handle, "VisibilityTimeout": 60},
        ],
    )
    assert [entry["Id"] for entry in changed["Successful"]] == ["hold"]
    assert [(entry["Id"], entry["Code"]) for entry in changed["Failed"]] == [
        ("back", "InvalidParameterValue")
    ]
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=0)


@pytest.mark.parametrize(
    ("number", "stored"),
    [
        ("1" * 38, True),
        ("1" * 39, False),
        ("0.000" + "1" * 38 + "000", True),
        ("1" * 38 + "0" * 80, True),
        ("9.9999999999999999999999999999999999999E+125", True),
        ("1E+126", False),
        ("-1E+126", False),
        ("1E-130", True),
        ("1E-131", False),
    ],
)
def test_a_number_dynamodb_cannot_store_is_refused_wherever_it_is_written(
    ddb: Any, moto_stack: MotoStack, number: str, stored: bool
) -> None:
    """Supported data types (DynamoDB developer guide): a number has at most 38 significant
    digits (leading and trailing zeroes trimmed), magnitude 1E-130 to 9.99...E+125. moto took
    39 digits anywhere, and any number in an update."""
    table = moto_stack.jobs_table
    ddb.put_item(TableName=table, Item={"pk": {"S": "counted"}, "n": {"N": "1"}})
    writes: list[Callable[[], Any]] = [
        lambda: ddb.put_item(TableName=table, Item={"pk": {"S": "put"}, "n": {"N": number}}),
        lambda: ddb.update_item(
            TableName=table,
            Key={"pk": {"S": "set"}},
            UpdateExpression="SET n = :n",
            ExpressionAttributeValues={":n": {"N": number}},
        ),
        lambda: ddb.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": table, "Item": {"pk": {"S": "tx"}, "n": {"NS": [number, "2"]}}}}
            ]
        ),
    ]
    for write in writes:
        if stored:
            write()
        else:
            assert _refused(write) == "ValidationException"
    assert (_get(ddb, table, "put") is not None) == stored


def test_an_update_that_makes_a_number_dynamodb_cannot_store_is_refused(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """An ADD (or a SET's sum) whose result has 39 significant digits is refused, and the item stays."""
    table = moto_stack.jobs_table
    ddb.put_item(TableName=table, Item={"pk": {"S": "counted"}, "n": {"N": "9" * 38}})
    assert (
        _refused(
            lambda: ddb.update_item(
                TableName=table,
                Key={"pk": {"S": "counted"}},
                UpdateExpression="ADD n :ten",
                ExpressionAttributeValues={":ten": {"N": "10"}},
            )
        )
        == "ValidationException"
    )
    assert _get(ddb, table, "counted") == {"pk": {"S": "counted"}, "n": {"N": "9" * 38}}


def test_reads_hand_back_copies_that_a_later_update_cannot_change(ddb: Any, moto_stack: MotoStack) -> None:
    """DynamoDB read consistency, https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html:
    reads return committed values of an item, never a view of a write in progress."""
    # moto serializes a read's Items after the call returns, while an UpdateItem changes the
    # stored Item in place: without copies, a reader racing a writer could answer half an
    # update, which DynamoDB (item-atomic reads) never does. A race is too rare to provoke
    # reliably, so this pins the mechanism: what a read returns is not the stored object.
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dynamodb.models import dynamodb_backends

    table = moto_stack.jobs_table
    ddb.put_item(TableName=table, Item={"pk": {"S": "copied"}, "a": {"N": "0"}})
    backend = dynamodb_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
    read = backend.get_item(table, {"pk": {"S": "copied"}})
    scanned = backend.scan(table, {}, None, None, None, None, None, None, False, None, (None, None))[0]  # type: ignore[arg-type]
    ddb.update_item(
        TableName=table,
        Key={"pk": {"S": "copied"}},
        UpdateExpression="SET a = :n",
        ExpressionAttributeValues={":n": {"N": "1"}},
    )
    # Then the earlier reads still show the item as it was when they were made
    assert read is not None and read.attrs["a"].value == "0"
    assert [item.attrs["a"].value for item in scanned if item.hash_key.value == "copied"] == ["0"]


def test_a_conditional_update_that_fails_changes_nothing(ddb: Any, moto_stack: MotoStack) -> None:
    """UpdateItem, https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_UpdateItem.html:
    when the ConditionExpression is false the update fails with ConditionalCheckFailedException
    and the item is left as it was; an update of an absent item whose condition fails creates
    nothing."""
    # Given a job another worker holds
    table = moto_stack.jobs_table
    ddb.put_item(
        TableName=table,
        Item={"pk": {"S": "job_held"}, "status": {"S": "running"}, "lease_owner": {"S": "w1"}},
    )
    before = _get(ddb, table, "job_held")

    # When a fenced-out worker completes it, and a claim targets a job that does not exist
    def complete(pk: str) -> None:
        ddb.update_item(
            TableName=table,
            Key={"pk": {"S": pk}},
            UpdateExpression="SET #s = :done, #r = :result, finished_ms = :now",
            ConditionExpression="lease_owner = :me",
            ExpressionAttributeNames={"#s": "status", "#r": "result"},
            ExpressionAttributeValues={
                ":done": {"S": "succeeded"},
                ":result": {"S": "stale output"},
                ":now": {"N": "1700000000000"},
                ":me": {"S": "w2"},
            },
        )

    # Then both are refused, the held job is exactly as it was, and no item is created
    assert _refused(lambda: complete("job_held")) == "ConditionalCheckFailedException"
    assert _refused(lambda: complete("job_absent")) == "ConditionalCheckFailedException"
    assert _get(ddb, table, "job_held") == before
    assert _get(ddb, table, "job_absent") is None


# ---- DynamoDB: global secondary indexes are eventually consistent ----


@pytest.fixture
def lagging(monkeypatch: pytest.MonkeyPatch) -> Iterator[IndexClock]:
    """Indexes that lag their table by 1 s, on a clock the test moves."""
    with lagging_indexes_on_a_test_clock(monkeypatch, 1.0) as clock:
        yield clock


def _listed(ddb: Any, table: str, tenant: str) -> dict[str, str]:
    """{job id: status} as the tenant index shows them."""
    items = ddb.query(
        TableName=table,
        IndexName=TENANT_INDEX,
        KeyConditionExpression="tenant_id = :t",
        ExpressionAttributeValues={":t": {"S": tenant}},
    )["Items"]
    return {item["pk"]["S"]: item["status"]["S"] for item in items}


def test_an_index_answers_from_a_view_up_to_the_lag_old(
    ddb: Any, moto_stack: MotoStack, lagging: IndexClock
) -> None:
    """DynamoDB read consistency, https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html:
    every read of a global secondary index is eventually consistent, so it may miss a write
    just completed; a repeated read a little later shows it. Writes usually reach a GSI within
    a second (re:Post knowledge center, "dynamodb-missing-table-items-gsi"). The table itself
    answers a strongly consistent read at once."""
    table = moto_stack.jobs_table
    job = {
        "pk": {"S": "job_lag"},
        "tenant_id": {"S": "ten_lag"},
        "tenant_created": {"S": "0000000000001#job_lag"},
        "status": {"S": "queued"},
    }
    # When a job is written, Then the table has it at once and the index not yet
    ddb.put_item(TableName=table, Item=job)
    lagging.now += 0.5
    assert _get(ddb, table, "job_lag") == job
    assert _listed(ddb, table, "ten_lag") == {}
    # And once the lag has passed, the index shows it
    lagging.now += 0.6
    assert _listed(ddb, table, "ten_lag") == {"job_lag": "queued"}

    # When it is updated, Then the index shows the old status for up to the lag
    ddb.update_item(
        TableName=table,
        Key={"pk": {"S": "job_lag"}},
        UpdateExpression="SET #s = :s",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":s": {"S": "succeeded"}},
    )
    lagging.now += 0.5
    assert _listed(ddb, table, "ten_lag") == {"job_lag": "queued"}
    lagging.now += 0.6
    assert _listed(ddb, table, "ten_lag") == {"job_lag": "succeeded"}

    # When it is deleted, Then the index still lists it for up to the lag, and a Scan of the
    # index lags the same way
    ddb.delete_item(TableName=table, Key={"pk": {"S": "job_lag"}})
    lagging.now += 0.5
    assert _listed(ddb, table, "ten_lag") == {"job_lag": "succeeded"}
    scanned = ddb.scan(TableName=table, IndexName=TENANT_INDEX)["Items"]
    assert [item["pk"]["S"] for item in scanned] == ["job_lag"]
    lagging.now += 0.6
    assert _listed(ddb, table, "ten_lag") == {}


def test_an_index_query_pages_in_numeric_key_order_with_ties_in_table_key_order(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """Query, https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_Query.html:
    results come in sort key order, numerically for a Number. The sandbox sorts moto's items on
    their plain values (llmq_sandbox.moto_fidelity, for speed); the order, ties included, is
    moto's own, and a cursor resumes exactly where its page ended."""
    table = moto_stack.jobs_table
    # Numbers whose text order is not their order, and two items sharing a sort key
    due = {"job_a": "100", "job_b": "9", "job_c": "-5", "job_d": "2.5", "job_e": "10", "job_f": "9"}
    for job_id, when in due.items():
        ddb.put_item(
            TableName=table,
            Item={
                "pk": {"S": job_id},
                "sweep_pk": {"S": "s#0"},
                "sweep_at": {"N": when},
                "status": {"S": "queued"},
            },
        )

    def swept(forward: bool) -> list[str]:
        found: list[str] = []
        kwargs: dict[str, Any] = {
            "TableName": table,
            "IndexName": SWEEP_INDEX,
            "KeyConditionExpression": "sweep_pk = :p AND sweep_at <= :due",
            "ExpressionAttributeValues": {":p": {"S": "s#0"}, ":due": {"N": "1000"}},
            "ScanIndexForward": forward,
            "Limit": 2,
        }
        while True:
            page = ddb.query(**kwargs)
            found += [item["pk"]["S"] for item in page["Items"]]
            if "LastEvaluatedKey" not in page:
                return found
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    ascending = ["job_c", "job_d", "job_b", "job_f", "job_e", "job_a"]
    assert swept(forward=True) == ascending
    assert swept(forward=False) == ascending[::-1]


def test_an_attribute_that_keys_an_index_under_another_type_is_refused_and_nothing_changes(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """Global secondary indexes, https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/GSI.html:
    an index key attribute written with another type than the index's definition is refused
    ("Type mismatch for Index Key"), whether by PutItem, UpdateItem or in a transaction. moto's PutItem
    stored it and left it out of the index: a put that typed such a key wrong passed here and
    failed on AWS."""
    table = moto_stack.jobs_table
    ddb.put_item(
        TableName=table, Item={"pk": {"S": "job_typed"}, "sweep_pk": {"S": "s#0"}, "sweep_at": {"N": "5"}}
    )
    before = _get(ddb, table, "job_typed")

    def refused(call: Any) -> str:
        with pytest.raises(ClientError) as error:
            call()
        assert error.value.response["Error"]["Code"] == "ValidationException"
        return str(error.value)

    # When a put, an update and a transaction each write sweep_at (a Number in the index) as a String
    message = refused(
        lambda: ddb.put_item(
            TableName=table, Item={"pk": {"S": "job_new"}, "sweep_pk": {"S": "s#0"}, "sweep_at": {"S": "5"}}
        )
    )
    assert "Type mismatch for Index Key sweep_at Expected: N Actual: S" in message
    refused(
        lambda: ddb.update_item(
            TableName=table,
            Key={"pk": {"S": "job_typed"}},
            UpdateExpression="SET sweep_at = :due, #s = :s",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":due": {"S": "later"}, ":s": {"S": "running"}},
        )
    )
    refused(
        lambda: ddb.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": table, "Item": {"pk": {"S": "job_other"}, "status": {"S": "queued"}}}},
                {
                    "Update": {
                        "TableName": table,
                        "Key": {"pk": {"S": "job_typed"}},
                        "UpdateExpression": "SET tenant_id = :t, tenant_created = :c",
                        "ExpressionAttributeValues": {":t": {"S": "ten_x"}, ":c": {"N": "1"}},
                    }
                },
            ]
        )
    )
    # Then nothing was written
    assert _get(ddb, table, "job_typed") == before
    assert _get(ddb, table, "job_new") is None
    assert _get(ddb, table, "job_other") is None


def test_a_strongly_consistent_read_of_a_global_index_is_refused(ddb: Any, moto_stack: MotoStack) -> None:
    """DynamoDB read consistency, https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html:
    strongly consistent reads are not supported on global secondary indexes."""
    refused = _refused(
        lambda: ddb.query(
            TableName=moto_stack.jobs_table,
            IndexName=TENANT_INDEX,
            KeyConditionExpression="tenant_id = :t",
            ExpressionAttributeValues={":t": {"S": "ten_x"}},
            ConsistentRead=True,
        )
    )
    assert refused == "ValidationException"


def test_a_long_poll_wakes_when_a_delayed_or_invisible_message_comes_due(moto_stack: MotoStack) -> None:
    """ "Amazon SQS short and long polling" (SQS developer guide): a long poll returns as soon as
    a message is available. moto's wakes on a new send only, else once a second, so a delayed
    copy of a deferred job waited up to a second more than on AWS (llmq_sandbox.moto_fidelity)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.utils import unix_time_millis
    from moto.sqs.models import sqs_backends

    # Given a queue whose only message becomes visible again in 300 ms (its visibility timeout
    # running out, as a deferred or retried message's does)
    sqs = aws.client("sqs")
    url = moto_stack.lane_queue_urls["high"]
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    queue = sqs_backends[DEFAULT_ACCOUNT_ID][REGION].queues[url.rsplit("/", 1)[-1]]
    (message,) = queue._messages
    message.visible_at = unix_time_millis() + 300
    # When a long poll waits for messages, Then it sleeps until that message is due, not a second
    waits: list[float | None] = []
    condition: Any = queue._messages_lock
    original = condition.wait_for

    def recorded(predicate: Any, timeout: float | None = None) -> Any:
        waits.append(timeout)
        return original(predicate, timeout)

    condition.wait_for = recorded
    try:
        queue.wait_for_messages(1)
    finally:
        condition.wait_for = original
    assert len(waits) == 1 and waits[0] is not None and waits[0] <= 0.32, waits
    assert queue.messages == [message]


# ---- what the sandbox keeps per expression text answers as moto did ----


def test_one_update_expression_text_applies_each_calls_own_values_and_conditions(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """The parsed update expression and condition tokens are kept per text; each call still
    brings its own values, and a condition is judged with them."""
    table = moto_stack.jobs_table
    ddb.put_item(TableName=table, Item={"pk": {"S": "job_text"}, "owner": {"S": "a"}, "n": {"N": "0"}})
    update = {
        "TableName": table,
        "Key": {"pk": {"S": "job_text"}},
        "UpdateExpression": "SET #o = :next, n = n + :one",
        "ConditionExpression": "#o = :expected AND attribute_exists(pk)",
        "ExpressionAttributeNames": {"#o": "owner"},
    }
    # When the same texts run three times, with values that hold, hold, then fail the condition
    for expected, following in (("a", "b"), ("b", "c")):
        ddb.update_item(
            **update,
            ExpressionAttributeValues={
                ":next": {"S": following},
                ":one": {"N": "1"},
                ":expected": {"S": expected},
            },
        )
    with pytest.raises(ClientError) as refused:
        ddb.update_item(
            **update,
            ExpressionAttributeValues={":next": {"S": "z"}, ":one": {"N": "1"}, ":expected": {"S": "a"}},
        )
    # Then each call applied its own values, and the stale owner was refused
    assert refused.value.response["Error"]["Code"] == "ConditionalCheckFailedException"
    assert _get(ddb, table, "job_text") == {"pk": {"S": "job_text"}, "owner": {"S": "c"}, "n": {"N": "2"}}


@pytest.mark.parametrize(
    "expression",
    ["SET a = :v SET b = :v", "SET a = :v REMOVE c REMOVE d", "ADD n :one SET a = :v ADD m :one"],
)
def test_an_update_expression_with_a_clause_twice_is_refused_every_time(
    ddb: Any, moto_stack: MotoStack, expression: str
) -> None:
    """ "Each of these clauses can only appear once in an update expression" (UpdateExpression,
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Expressions.UpdateExpressions.html)."""
    table = moto_stack.jobs_table
    ddb.put_item(TableName=table, Item={"pk": {"S": "job_twice"}, "c": {"S": "x"}, "d": {"S": "y"}})
    values = {":v": {"S": "v"}, ":one": {"N": "1"}}
    used = {name: value for name, value in values.items() if name in expression}
    for _ in range(2):  # the second time from what was kept of the first
        with pytest.raises(ClientError) as refused:
            ddb.update_item(
                TableName=table,
                Key={"pk": {"S": "job_twice"}},
                UpdateExpression=expression,
                ExpressionAttributeValues=used,
            )
        assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert _get(ddb, table, "job_twice") == {"pk": {"S": "job_twice"}, "c": {"S": "x"}, "d": {"S": "y"}}


def test_a_condition_kept_from_an_identical_call_is_judged_again_and_its_names_count_as_used(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """A condition's parse is kept per expression, names and values: the same call again is
    judged against the item as it now is, and the names it uses still count as used (moto
    refuses a name the expressions leave unused)."""
    table = moto_stack.jobs_table
    put = {
        "TableName": table,
        "Item": {"pk": {"S": "job_kept"}, "owner": {"S": "a"}},
        "ConditionExpression": "attribute_not_exists(#k) OR #o = :mine",
        "ExpressionAttributeNames": {"#k": "pk", "#o": "owner"},
        "ExpressionAttributeValues": {":mine": {"S": "a"}},
    }
    # When the same conditional write runs twice: absent, then present and still a's
    ddb.put_item(**put)
    ddb.put_item(**put)
    # Then both hold; and once the owner changes, the same call again is refused
    ddb.update_item(
        TableName=table,
        Key={"pk": {"S": "job_kept"}},
        UpdateExpression="SET #o = :b",
        ExpressionAttributeNames={"#o": "owner"},
        ExpressionAttributeValues={":b": {"S": "b"}},
    )
    with pytest.raises(ClientError) as refused:
        ddb.put_item(**put)
    assert refused.value.response["Error"]["Code"] == "ConditionalCheckFailedException"
    # And a name left unused is still refused, kept parse or not
    for _ in range(2):
        with pytest.raises(ClientError) as unused:
            ddb.put_item(
                **{**put, "ExpressionAttributeNames": {**put["ExpressionAttributeNames"], "#x": "x"}}
            )
        assert unused.value.response["Error"]["Code"] == "ValidationException"
    assert _get(ddb, table, "job_kept") == {"pk": {"S": "job_kept"}, "owner": {"S": "b"}}


def test_a_kept_condition_shares_no_set_with_an_item_a_later_add_changes(
    ddb: Any, moto_stack: MotoStack
) -> None:
    """The kept parse of `tags <> :t` must not hold the very list that `SET tags = :t` stored:
    a later ADD to the item would change the condition's own value with it."""
    table = moto_stack.jobs_table
    set_if_other = {
        "TableName": table,
        "Key": {"pk": {"S": "job_tags"}},
        "UpdateExpression": "SET tags = :t",
        "ConditionExpression": "attribute_not_exists(tags) OR tags <> :t",
        "ExpressionAttributeValues": {":t": {"SS": ["a"]}},
    }
    ddb.update_item(**set_if_other)
    ddb.update_item(
        TableName=table,
        Key={"pk": {"S": "job_tags"}},
        UpdateExpression="ADD tags :more",
        ExpressionAttributeValues={":more": {"SS": ["b"]}},
    )
    # When the first call comes again: the item's {a, b} differs from {a}, so it holds
    ddb.update_item(**set_if_other)
    assert _get(ddb, table, "job_tags") == {"pk": {"S": "job_tags"}, "tags": {"SS": ["a"]}}


@pytest.mark.parametrize(
    ("condition", "start", "refused"),
    [
        ("tenant_created < :end", "c", True),  # past the range's end
        ("tenant_created < :end", "a#1", False),
        ("begins_with(tenant_created, :end)", "a#1", True),
        ("begins_with(tenant_created, :end)", "b#1", False),
    ],
)
def test_a_start_key_outside_the_querys_key_condition_is_refused_as_dynamodb_does(
    ddb: Any, moto_stack: MotoStack, condition: str, start: str, refused: bool
) -> None:
    # Given a query of the tenant index that starts from a key the caller made up
    def query() -> Any:
        return ddb.query(
            TableName=moto_stack.jobs_table,
            IndexName=TENANT_INDEX,
            KeyConditionExpression=f"tenant_id = :tenant AND {condition}",
            ExpressionAttributeValues={":tenant": {"S": "ten_x"}, ":end": {"S": "b#"}},
            ExclusiveStartKey={
                "pk": {"S": "job_x"},
                "tenant_id": {"S": "ten_x"},
                "tenant_created": {"S": start},
            },
        )

    # Then a start key the condition excludes is refused with DynamoDB's error; one within it reads on
    if refused:
        with pytest.raises(ClientError) as caught:
            query()
        assert caught.value.response["Error"]["Code"] == "ValidationException"
        assert "outside query boundaries" in caught.value.response["Error"]["Message"]
    else:
        assert query()["Items"] == []


@pytest.mark.parametrize("call", ["update", "get", "batch get", "query", "transaction"])
def test_an_expression_over_4_kb_is_refused_as_dynamodb_refuses_it(
    ddb: Any, moto_stack: MotoStack, call: str
) -> None:
    """DynamoDB refuses any expression string over 4 KB; moto took any length, so an
    expression that grows with what it is given would pass every local test (hunt 312)."""
    table = moto_stack.jobs_table
    key = {"pk": {"S": "long-expression"}}

    def sent(condition: str, projection: str) -> Any:
        calls = {
            "update": lambda: ddb.update_item(
                TableName=table,
                Key=key,
                UpdateExpression="SET n = :n",
                ConditionExpression=condition,
                ExpressionAttributeValues={":n": {"N": "1"}},
            ),
            "get": lambda: ddb.get_item(TableName=table, Key=key, ProjectionExpression=projection),
            "batch get": lambda: ddb.batch_get_item(
                RequestItems={table: {"Keys": [key], "ProjectionExpression": projection}}
            ),
            "query": lambda: ddb.query(
                TableName=table,
                KeyConditionExpression="pk = :pk",
                ProjectionExpression=projection,
                ExpressionAttributeValues={":pk": {"S": "x"}},
            ),
            "transaction": lambda: ddb.transact_write_items(
                TransactItems=[
                    {
                        "Update": {
                            "TableName": table,
                            "Key": key,
                            "UpdateExpression": "SET n = :n",
                            "ConditionExpression": condition,
                            "ExpressionAttributeValues": {":n": {"N": "1"}},
                        }
                    }
                ]
            ),
        }
        return calls[call]()

    def padded(expression: str, size: int) -> str:
        # (with spaces, which DynamoDB counts as it counts every byte of an expression)
        return expression + " " * (size - len(expression))

    # Given an expression of exactly 4 KB, then one of a byte more
    sent(padded("attribute_not_exists(pk)", MAX_EXPRESSION_BYTES), padded("pk", MAX_EXPRESSION_BYTES))
    with pytest.raises(ClientError) as refused:
        sent(padded("attribute_not_exists(pk)", 4097), padded("pk", 4097))
    # Then the second is refused as DynamoDB refuses it
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert "Expression size has exceeded the maximum allowed size; expression size: 4097" in str(
        refused.value
    )


@pytest.mark.parametrize(
    "call",
    ["put", "delete", "query", "scan", "transaction"],
)
def test_a_value_no_expression_uses_is_refused_as_dynamodb_refuses_it(
    ddb: Any, moto_stack: MotoStack, call: str
) -> None:
    """DynamoDB refuses a request whose ExpressionAttributeValues holds a value its expressions
    do not use ("Value provided in ExpressionAttributeValues unused in expressions"); moto
    checks it for UpdateItem only, so llmq code sending one on any other call would pass
    every local test and fail on AWS."""
    table = moto_stack.jobs_table
    unused = {":unused": {"N": "1"}}
    calls = {
        "put": lambda: ddb.put_item(
            TableName=table,
            Item={"pk": {"S": "unused-put"}},
            ConditionExpression="attribute_not_exists(pk)",
            ExpressionAttributeValues=unused,
        ),
        "delete": lambda: ddb.delete_item(
            TableName=table,
            Key={"pk": {"S": "unused-delete"}},
            ConditionExpression="attribute_not_exists(pk)",
            ExpressionAttributeValues=unused,
        ),
        "query": lambda: ddb.query(
            TableName=table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": "x"}, **unused},
        ),
        "scan": lambda: ddb.scan(
            TableName=table, FilterExpression="attribute_exists(pk)", ExpressionAttributeValues=unused
        ),
        "transaction": lambda: ddb.transact_write_items(
            TransactItems=[
                {
                    "Update": {
                        "TableName": table,
                        "Key": {"pk": {"S": "unused-transaction"}},
                        "UpdateExpression": "SET n = :n",
                        "ExpressionAttributeValues": {":n": {"N": "1"}, **unused},
                    }
                }
            ]
        ),
    }
    assert _refused(calls[call]) == "ValidationException"
    # (and the same call with every value used goes through)
    ddb.put_item(
        TableName=table,
        Item={"pk": {"S": "used-put"}},
        ConditionExpression="attribute_not_exists(pk) OR n = :one",
        ExpressionAttributeValues={":one": {"N": "1"}},
    )


@pytest.mark.parametrize("body", ["a\x01b", "a\ufffeb", "over the queue's size in bytes"])
def test_a_body_sqs_refuses_is_refused(moto_stack: MotoStack, body: str) -> None:
    """SendMessage (API reference): a body may hold only #x9, #xA, #xD, #x20-#xD7FF,
    #xE000-#xFFFD and #x10000-#x10FFFF, and at most the queue's MaximumMessageSize counted in
    bytes (moto counts characters: each 'é' is two bytes)."""
    sqs = aws.client("sqs")
    url = moto_stack.lane_queue_urls["high"]
    limit = int(
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])["Attributes"][
            "MaximumMessageSize"
        ]
    )
    oversized = body == "over the queue's size in bytes"
    if oversized:
        body = "é" * (limit // 2 + 1)
    code = "InvalidParameterValue" if oversized else "InvalidMessageContents"
    assert _refused(lambda: sqs.send_message(QueueUrl=url, MessageBody=body)) == code
    sqs.send_message(QueueUrl=url, MessageBody="é" * (limit // 2))


@pytest.mark.parametrize("value", ["no job \x01", "", "a\ufffeb"])
def test_a_string_attribute_value_sqs_refuses_is_refused(moto_stack: MotoStack, value: str) -> None:
    """MessageAttributeValue (API reference): a String value has the body's restrictions on its
    characters, and is never empty (moto took both: hunt 276)."""
    sqs = aws.client("sqs")
    url = moto_stack.lane_queue_urls["high"]
    note = {"why": {"DataType": "String", "StringValue": value}}
    assert _refused(lambda: sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=note)) == (
        "InvalidMessageContents"
    )
    sqs.send_message(
        QueueUrl=url, MessageBody="x", MessageAttributes={"why": {"DataType": "String", "StringValue": "ok"}}
    )


def test_message_attributes_count_toward_the_size_limit(moto_stack: MotoStack) -> None:
    """SendMessage: a message's attributes (each one's name, data type and value) count toward
    the queue's MaximumMessageSize with its body (moto counts the body alone)."""
    sqs = aws.client("sqs")
    url = moto_stack.lane_queue_urls["high"]
    limit = int(
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])["Attributes"][
            "MaximumMessageSize"
        ]
    )
    note = {"why": {"DataType": "String", "StringValue": "né"}}  # 3 + 6 + 3 bytes
    assert (
        _refused(
            lambda: sqs.send_message(QueueUrl=url, MessageBody="x" * (limit - 11), MessageAttributes=note)
        )
        == "InvalidParameterValue"
    )
    sqs.send_message(QueueUrl=url, MessageBody="x" * (limit - 12), MessageAttributes=note)
    sqs.send_message(QueueUrl=url, MessageBody="x" * limit)


def test_a_dead_letter_moved_back_by_hand_keeps_its_tenant_for_fair_queues(moto_stack: MotoStack) -> None:
    """`llmq dlq redrive --max N` receives and sends each letter itself (StartMessageMoveTask
    moves them all): the copy keeps the letter's MessageGroupId, so fair queues still count it
    as its tenant's, not as a tenant of its own."""
    from llmq_cli.dead_letters import DeadLetterQueue, redrive

    sqs = aws.client("sqs")
    source, dlq = moto_stack.lane_queue_urls["high"], moto_stack.lane_dlq_urls["high"]
    sqs.send_message(QueueUrl=dlq, MessageBody='{"job_id": "job_x"}', MessageGroupId="ten_acme")
    result = redrive(lambda service, config: sqs, DeadLetterQueue("high", dlq, source), max_messages=1)
    assert (result.method, result.moved) == ("receive-and-send", 1)
    (moved,) = sqs.receive_message(QueueUrl=source, MessageSystemAttributeNames=["MessageGroupId"])[
        "Messages"
    ]
    assert moved["Attributes"]["MessageGroupId"] == "ten_acme"


class _PausedBeforeTheFirstRead:
    """A key's buffer whose first read waits while `meanwhile` runs (for half a second at most,
    since it may have to wait for the key's lock): another thread asking the same ETag then."""

    def __init__(self, real: Any, meanwhile: Callable[[], None]) -> None:
        self._real, self._meanwhile, self._paused = real, meanwhile, False

    def seek(self, *args: Any) -> Any:
        return self._real.seek(*args)

    def read(self, *args: Any) -> Any:
        if not self._paused:
            self._paused = True
            self._meanwhile()
        return self._real.read(*args)


def test_a_keys_etag_asked_by_two_threads_at_once_is_the_md5_of_its_bytes(moto_stack: MotoStack) -> None:
    """Helper 214: moto worked a key's ETag out by seeking and reading its buffer without the
    key's lock, so a part's UploadPart answer and a Complete naming it could store the MD5 of
    nothing, and every Complete after it failed InvalidPart."""
    from moto.s3.models import FakeKey

    data = b"a results file's part " * 1000
    key = FakeKey("part", data, account_id="123456789012", region_name=REGION)
    answers: list[str] = []
    other = threading.Thread(target=lambda: answers.append(key.etag))

    def another_thread_asks() -> None:
        other.start()
        other.join(0.5)

    key._value_buffer = _PausedBeforeTheFirstRead(key._value_buffer, another_thread_asks)
    # When one thread works the ETag out, and another asks for it just as it starts reading
    answers.append(key.etag)
    other.join(5)
    # Then both are the MD5 of the key's bytes, as S3 answers
    assert answers == [f'"{hashlib.md5(data).hexdigest()}"'] * 2
