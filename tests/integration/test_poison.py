"""Lane dead letters that name no job: the dead-letter function sets them aside in the poison
queue, visible to an operator, and nothing takes them again (they used to hide in their DLQ
for 12 hours at a time, come back, and page once more, for the DLQ's 14 days)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from llmq import aws
from llmq.jobs import JobRepository
from llmq.models import JobResult
from llmq.policy import ClaimOutcome
from llmq.shares import ShareRepository
from tests.aws_faults import AwsFaults, FaultKind
from tests.integration.harness import (
    ENTERPRISE,
    FREE,
    Harness,
    LambdaContextStub,
    emitted_metrics,
    load_handler,
)

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


def _handled(harness: Harness, letters: list[dict[str, Any]]) -> Any:
    """`letters`, received from the high lane's DLQ, handled by the dead-letter function (one
    invocation): its answer."""
    dlq = harness.stack.lane_dlq_urls["high"]
    return load_handler("dead_letter").handler(harness.sqs_event(dlq, letters), LambdaContextStub())


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
    answer = _handled(harness, letters)
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
    # When the dead-letter function takes it
    answer = _handled(harness, letters)
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
    assert _handled(harness, letters) == {"batchItemFailures": []}
    (shown,) = peek(harness.sqs, harness.stack.poison_queue_url, 5)
    assert isinstance(shown, dict)
    assert (shown["body"], shown["llmq-message-id"]) == (NOT_JSON, letters[0]["MessageId"])
    assert shown["llmq-why"] == "the message is not a lane message"
    # (peeking leaves it there, visible)
    assert harness.visible_count(harness.stack.poison_queue_url) == 1


def _share_key(harness: Harness) -> str:
    """The key of a tenant's share item (any accepted job makes one): a table key no job has."""
    harness.submit()
    return next(
        item["pk"]["S"]
        for item in harness.ddb.scan(TableName=harness.stack.jobs_table)["Items"]
        if item["pk"]["S"].startswith("share#")
    )


def _emptied(harness: Harness, queue_url: str) -> None:
    for message in harness.receive(queue_url):
        harness.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def test_a_dead_letter_naming_an_item_that_is_no_job_is_set_aside(harness: Harness) -> None:
    # Given a dead letter whose job id is a tenant's share item's key (sent by hand, mis-wired)
    body = json.dumps({"job_id": _share_key(harness)})
    letters = _letters(harness, [body])
    # When the dead-letter function takes it
    answer = _handled(harness, letters)
    # Then it is poison, set aside: not failed back into the DLQ to come back for 14 days
    assert answer["batchItemFailures"] == []
    assert [message["Body"] for message in _poison(harness)] == [body]


@pytest.mark.parametrize("with_tenant", [False, True], ids=["bare", "with-its-tenant-and-lane"])
def test_a_lane_message_naming_an_item_that_is_no_job_is_poison_in_the_worker(
    harness: Harness, with_tenant: bool
) -> None:
    # Given a lane message naming a tenant's share item (with the tenant and lane every
    # message llmq sends carries, or without), and nothing else in the lane
    key = _share_key(harness)
    named = {"tenant_id": ENTERPRISE["tenant_id"], "lane": "high"} if with_tenant else {}
    body = json.dumps({"job_id": key, **named})
    lane = harness.stack.lane_queue_urls["high"]
    _emptied(harness, lane)
    harness.sqs.send_message(QueueUrl=lane, MessageBody=body, MessageGroupId="x")
    # When a worker takes it
    answer = harness.run_worker(lane, harness.receive(lane))
    # Then it is poison: reported failed and visible at once, its receives carrying it to the
    # DLQ (not hidden for the lane's visibility timeout at each, as a transient failure is)
    assert len(answer["batchItemFailures"]) == 1
    assert harness.visible_count(lane) == 1


def test_a_lane_message_due_further_ahead_than_any_deferral_is_not_passed_on_for_ever(
    harness: Harness,
) -> None:
    # Given a tenant with a share, and a lane message of it naming no job, "due" in 300,000
    # years (sent by hand, or corrupted)
    _share_key(harness)
    lane = harness.stack.lane_queue_urls["high"]
    _emptied(harness, lane)
    body = json.loads(UNKNOWN_JOB) | {"tenant_id": ENTERPRISE["tenant_id"], "not_before_ms": 10**16}
    harness.sqs.send_message(QueueUrl=lane, MessageBody=json.dumps(body), MessageGroupId="x")
    (message,) = harness.receive(lane)
    # When a worker takes it
    answer = harness.run_worker(lane, [message])
    # Then it was claimed (no job: poison), not passed on as a fresh copy every 15 minutes,
    # whose receive count would start again at each hop and never reach the DLQ
    assert answer["batchItemFailures"] == [{"itemIdentifier": message["MessageId"]}]
    assert [m["MessageId"] for m in harness.receive(lane)] == [message["MessageId"]]


def test_a_dead_letter_with_a_redrive_round_no_table_can_hold_is_set_aside(harness: Harness) -> None:
    # Given a dead letter of a queued job whose redrive_round is out of any round llmq sends
    # (DynamoDB refuses numbers of 1e126 or more: its update would fail for good)
    job_id = harness.submit().body["id"]
    (message,) = harness.receive(harness.stack.lane_queue_urls["high"])
    body = json.dumps(json.loads(message["Body"]) | {"redrive_round": 10**130 + 7})
    letters = _letters(harness, [body])
    # When the dead-letter function takes it
    answer = _handled(harness, letters)
    # Then it is poison, set aside; the job itself is untouched
    assert answer["batchItemFailures"] == []
    assert [m["Body"] for m in _poison(harness)] == [body]
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "queued"


def test_a_redrive_cut_short_leaves_the_letters_it_did_not_move_for_a_run_again(harness: Harness) -> None:
    from botocore.exceptions import ClientError

    from llmq import aws
    from llmq_cli.dead_letters import DeadLetterQueue, redrive

    # Given five letters in a lane's DLQ, and SQS refusing the redrive's second send
    sqs = aws.client("sqs")
    source, dlq = harness.stack.lane_queue_urls["high"], harness.stack.lane_dlq_urls["high"]
    for n in range(5):
        sqs.send_message(QueueUrl=dlq, MessageBody=json.dumps({"job_id": f"job_{n}"}))
    sends = [0]

    class RefusingTheSecondSend:
        def __getattr__(self, name: str) -> Any:
            return getattr(sqs, name)

        def send_message(self, **kwargs: Any) -> Any:
            sends[0] += 1
            if sends[0] == 2:
                raise ClientError(
                    {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "SendMessage"
                )
            return sqs.send_message(**kwargs)

    queue = DeadLetterQueue("high", dlq, source)
    with pytest.raises(ClientError):
        redrive(lambda service, config: RefusingTheSecondSend(), queue, max_messages=10)
    # When the operator runs it again at once
    again = redrive(lambda service, config: sqs, queue, max_messages=10)
    # Then it moves the four left: none stays hidden behind a "moved: 0"
    assert again.moved == 4
    assert harness.total_count(dlq) == 0 and harness.total_count(source) == 5


@pytest.mark.parametrize("status", ["running", "succeeded"])
def test_a_dead_letter_of_a_job_past_its_retention_is_no_poison(harness: Harness, status: str) -> None:
    # Given a job past its retention that DynamoDB has not deleted yet: one whose worker
    # crashed, which the reconciler (fallen behind) has not retired, or one that ended
    tenant_id = ENTERPRISE["tenant_id"]
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claimed = jobs.claim(job_id, "dead-worker", 0.001, (tenant_id, "high"))
    assert claimed.outcome is ClaimOutcome.CLAIMED and claimed.job is not None
    if status == "succeeded":
        jobs.complete(claimed.job, "dead-worker", result=JobResult(output="hi", finish_reason="stop"))
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET expires_at = :at",
        ExpressionAttributeValues={":at": {"N": str(int(time.time()) - 60)}},
    )
    time.sleep(0.01)
    # When a message of it exhausts its receives
    harness.dead_letter("high", harness.receive(harness.stack.lane_queue_urls["high"]))
    # Then it is no poison (hunt 270: it was set aside, paging an operator, for a real job);
    # the crashed one ends expired and gives back its tenant's slot and quota
    assert _poison(harness) == []
    ended = jobs.find(job_id, past_retention=True)
    assert ended is not None and ended.status.value == ("expired" if status == "running" else "succeeded")
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(tenant_id)
    assert (share.active, share.running) == (0, 0)


def test_a_dead_letter_naming_a_job_id_sqs_cannot_carry_in_a_note_is_set_aside_with_it_escaped(
    harness: Harness,
) -> None:
    # Given a dead letter naming a "job" whose id holds a control character (escaped in its JSON
    # body, which SQS takes)
    body = json.dumps({"job_id": "job_\u0001x", "lane": "high"})
    letters = _letters(harness, [body])
    # When the dead-letter function takes it
    answer = _handled(harness, letters)
    # Then it is set aside with its notes, the reason's character escaped: SQS refuses it in an
    # attribute's value (hunt 276: the set-aside failed at every try, for the DLQ's 14 days)
    assert answer["batchItemFailures"] == []
    (shelved,) = _poison(harness)
    assert shelved["Body"] == body
    assert shelved["MessageAttributes"]["llmq-why"]["StringValue"] == "no job job_\\x01x"


# ---- lane messages that name another tenant or lane than their job's (hunt 316) ---------------


def _sent_by_hand(harness: Harness, lane_url: str, body: dict[str, Any]) -> dict[str, Any]:
    harness.sqs.send_message(QueueUrl=lane_url, MessageBody=json.dumps(body), MessageGroupId="by-hand")
    (message,) = harness.receive(lane_url)
    return message


def _lane_quiet(harness: Harness, lane_url: str) -> None:
    """Nothing visible, delayed or in flight: no copy of the message was passed on."""
    attributes = harness.sqs.get_queue_attributes(QueueUrl=lane_url, AttributeNames=["All"])["Attributes"]
    waiting = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed")
    assert [int(attributes[name]) for name in waiting] == [0, 0]


@pytest.mark.parametrize(
    "named",
    [{"tenant_id": FREE["tenant_id"], "lane": "high"}, {"tenant_id": ENTERPRISE["tenant_id"], "lane": "low"}],
    ids=["another-tenant", "another-lane"],
)
def test_a_message_naming_another_tenant_or_lane_leaves_a_crashed_job_to_its_recovery(
    harness: Harness, caplog: pytest.LogCaptureFixture, named: dict[str, str]
) -> None:
    # Given a job whose worker died (its lease lapsed, one attempt of three spent), and another
    # tenant with a share of its own
    assert harness.submit(tenant=FREE).status == 202
    _emptied(harness, harness.stack.lane_queue_urls["low"])
    job_id = harness.submit().body["id"]
    lane = harness.stack.lane_queue_urls["high"]
    _emptied(harness, lane)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert (
        jobs.claim(job_id, "dead-worker", 0.001, (ENTERPRISE["tenant_id"], "high")).outcome
        is ClaimOutcome.CLAIMED
    )
    time.sleep(0.05)
    before = jobs.find(job_id)
    # When a lane message naming the job with another tenant or lane is run
    message = _sent_by_hand(harness, lane, {"job_id": job_id, **named})
    answer = harness.run_worker(lane, [message])
    # Then it is acknowledged and nothing is written: the job is not failed as crashed (hunt 316:
    # `worker_crashed`, not retryable, with two attempts left); the reconciler recovers it
    assert answer == {"batchItemFailures": []}
    after = jobs.find(job_id)
    assert after is not None and before is not None
    assert (after.status.value, after.attempts, after.last_write) == ("running", 1, before.last_write)
    assert "lane message names another tenant or lane than its job's; dropped" in caplog.text
    _lane_quiet(harness, lane)


def test_a_message_naming_another_tenant_for_a_due_job_is_not_retried_into_the_dlq(harness: Harness) -> None:
    # Given a queued job, due now, and a message naming it with another tenant's id
    assert harness.submit(tenant=FREE).status == 202
    job_id = harness.submit().body["id"]
    lane = harness.stack.lane_queue_urls["high"]
    _emptied(harness, lane)
    message = _sent_by_hand(harness, lane, {"job_id": job_id, "tenant_id": FREE["tenant_id"], "lane": "high"})
    # When it is run
    answer = harness.run_worker(lane, [message])
    # Then it is acknowledged (hunt 316: judged not yet due, it came back every second and
    # reached the DLQ, paging), and the job still waits for its own message, unwritten
    assert answer == {"batchItemFailures": []}
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["attempts"]) == ("queued", 0)
    _lane_quiet(harness, lane)


def test_a_message_naming_a_tenant_with_no_share_is_dropped_not_passed_on_for_ever(harness: Harness) -> None:
    # Given a message naming a real job with a tenant that has no share
    job_id = harness.submit().body["id"]
    lane = harness.stack.lane_queue_urls["high"]
    _emptied(harness, lane)
    items = harness.item_count()
    message = _sent_by_hand(harness, lane, {"job_id": job_id, "tenant_id": "ten_nobody", "lane": "high"})
    # When it is run
    answer = harness.run_worker(lane, [message])
    # Then it is acknowledged, no fresh copy goes out (hunt 316: taken for a throttled claim, a
    # copy with a new receive count went out each lease, for ever, paging nothing), and no
    # share is made for the tenant
    assert answer == {"batchItemFailures": []}
    _lane_quiet(harness, lane)
    assert harness.item_count() == items
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "queued"


def test_a_deferral_naming_a_lane_not_deployed_is_dropped_not_an_unexpected_failure(
    harness: Harness, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a deferred copy naming a lane this deployment has not
    job_id = harness.submit().body["id"]
    lane = harness.stack.lane_queue_urls["high"]
    _emptied(harness, lane)
    due = int(time.time() * 1000) + 60_000
    body = {"job_id": job_id, "tenant_id": ENTERPRISE["tenant_id"], "lane": "gone", "not_before_ms": due}
    message = _sent_by_hand(harness, lane, body)
    capsys.readouterr()
    # When it is run
    answer = harness.run_worker(lane, [message])
    # Then it is acknowledged with a warning, not a record failed unexpectedly (a KeyError: back
    # after the visibility timeout each time, into the DLQ; hunt 316)
    out = capsys.readouterr().out
    assert answer == {"batchItemFailures": []}
    assert emitted_metrics(out, "RecordFailed") == []
    assert "lane message names a lane this deployment has not; dropped" in caplog.text
    _lane_quiet(harness, lane)
