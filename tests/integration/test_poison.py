"""Lane dead letters that name no job: the dead-letter function sets them aside in the poison
queue, visible to an operator, and nothing takes them again (they used to hide in their DLQ
for 12 hours at a time, come back, and page once more, for the DLQ's 14 days)."""

from __future__ import annotations

import json
from typing import Any

from tests.aws_faults import AwsFaults, FaultKind
from tests.integration.harness import ENTERPRISE, Harness, LambdaContextStub, load_handler

NOT_JSON = "this is not a lane message"
UNKNOWN_JOB = json.dumps({"job_id": "job_01HZZZZZZZZZZZZZZZZZZZZZZZ", "lane": "high"})


def _letters(harness: Harness, bodies: list[str]) -> list[dict[str, Any]]:
    """`bodies` in the high lane's DLQ, received as the dead-letter function's mapping would."""
    dlq = harness.stack.lane_dlq_urls["high"]
    for body in bodies:
        harness.sqs.send_message(QueueUrl=dlq, MessageBody=body)
    letters = harness.receive(dlq, visibility=60)
    assert len(letters) == len(bodies)
    return letters


def _poison(harness: Harness) -> list[dict[str, Any]]:
    return list(
        harness.sqs.receive_message(
            QueueUrl=harness.stack.poison_queue_url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=0,
            MessageAttributeNames=["All"],
        ).get("Messages", [])
    )


def test_a_dead_letter_naming_no_job_is_set_aside_and_its_batchmate_settles(harness: Harness) -> None:
    # Given a crashed job's dead letter between two that name no job
    job_id = harness.submit().body["id"]
    (lane_message,) = harness.receive(harness.stack.lane_queue_urls["high"])
    letters = _letters(harness, [NOT_JSON, lane_message["Body"], UNKNOWN_JOB])
    dlq = harness.stack.lane_dlq_urls["high"]
    # When the dead-letter function takes the three
    answer = load_handler("dead_letter").handler(harness.sqs_event(dlq, letters), LambdaContextStub())
    # Then none is reported failed: the mapping deletes all three from the DLQ
    assert answer["batchItemFailures"] == []
    # And the job's letter settled it (never claimed: it is queued again, not failed)
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "queued"
    # And the two poison letters wait, visible, in the poison queue, each saying where it came
    # from, its message id there and why it is poison
    dlq_arn = harness.sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    shelved = {message["Body"]: message["MessageAttributes"] for message in _poison(harness)}
    assert set(shelved) == {NOT_JSON, UNKNOWN_JOB}
    for letter in (letters[0], letters[2]):
        notes = shelved[letter["Body"]]
        assert notes["llmq-source"]["StringValue"] == dlq_arn
        assert notes["llmq-message-id"]["StringValue"] == letter["MessageId"]
        assert notes["llmq-why"]["StringValue"]


def test_poison_at_the_size_limit_is_set_aside_without_its_notes(harness: Harness) -> None:
    # Given a dead letter as large as the queue takes, naming no job
    limit = int(
        harness.sqs.get_queue_attributes(
            QueueUrl=harness.stack.poison_queue_url, AttributeNames=["MaximumMessageSize"]
        )["Attributes"]["MaximumMessageSize"]
    )
    body = "x" * limit
    letters = _letters(harness, [body])
    dlq = harness.stack.lane_dlq_urls["high"]
    # When the dead-letter function takes it
    answer = load_handler("dead_letter").handler(harness.sqs_event(dlq, letters), LambdaContextStub())
    # Then it is set aside whole: its notes would not fit, so they are in the log alone
    assert answer["batchItemFailures"] == []
    (shelved,) = _poison(harness)
    assert shelved["Body"] == body
    assert "MessageAttributes" not in shelved


def test_poison_that_cannot_be_set_aside_stays_in_its_dlq_and_is_set_aside_later(harness: Harness) -> None:
    # Given a dead letter naming no job, and SQS throttling the dead-letter function's sends
    letters = _letters(harness, [NOT_JSON])
    dlq = harness.stack.lane_dlq_urls["high"]
    dead_letter = load_handler("dead_letter")
    faults = AwsFaults()
    faults.wrap_handler("dead_letter", dead_letter)
    try:
        faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", function="dead_letter", times=10)
        answer = dead_letter.handler(harness.sqs_event(dlq, letters), LambdaContextStub())
        assert faults.fired, "the fault never fired"
    finally:
        faults.disarm()
    # Then it is reported failed, hidden for the poison delay (not 12 hours), and not set aside
    assert [failure["itemIdentifier"] for failure in answer["batchItemFailures"]] == [letters[0]["MessageId"]]
    assert harness.visible_count(dlq) == 0 and harness.total_count(dlq) == 1
    assert _poison(harness) == []
    # And when it comes back with SQS answering, it is set aside
    again = harness.sqs.receive_message(QueueUrl=dlq, VisibilityTimeout=60).get("Messages", [])
    assert again == []  # (still hidden: the test hands the mapping's next receive over itself)
    answer = dead_letter.handler(harness.sqs_event(dlq, letters), LambdaContextStub())
    assert answer["batchItemFailures"] == []
    assert [message["Body"] for message in _poison(harness)] == [NOT_JSON]


def test_the_operators_peek_shows_each_poison_messages_notes(harness: Harness) -> None:
    from llmq_cli.dead_letters import peek

    letters = _letters(harness, [NOT_JSON])
    dlq = harness.stack.lane_dlq_urls["high"]
    assert load_handler("dead_letter").handler(harness.sqs_event(dlq, letters), LambdaContextStub()) == {
        "batchItemFailures": []
    }
    (shown,) = peek(harness.sqs, harness.stack.poison_queue_url, 5)
    assert isinstance(shown, dict)
    assert (shown["body"], shown["llmq-message-id"]) == (NOT_JSON, letters[0]["MessageId"])
    assert shown["llmq-why"] == "the message is not a lane message"
    # (peeking leaves it there, visible)
    assert harness.visible_count(harness.stack.poison_queue_url) == 1
