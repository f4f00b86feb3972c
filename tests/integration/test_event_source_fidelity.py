"""The sandbox's event source mappings against what Lambda documents, and what llmq must survive.

- A throttled batch (the function has no concurrency left) is not processed: it stays in
  flight, comes back after the queue's visibility timeout one receive older, and throttles
  alone can carry it to the DLQ. The pollers run the real Lambda service (execution
  environments in child processes) against moto's SQS.
- At-least-once for real (`DeliveryChaos`): a message delivered twice keeps its message id.
- The webhook dispatcher counts its attempts on the job, so neither throttles nor duplicates
  skip a step of the retry schedule.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from llmq.models import WebhookEvent
from llmq.webhooks import copy_lag_seconds
from llmq_sandbox.event_sources import DeliveryChaos, QueuePoller
from llmq_sandbox.lambda_service import AwsAccess, LambdaService
from llmq_sandbox.topology import FunctionSpec, MappingSpec, QueueSpec
from tests.conftest import REGION, MotoStack
from tests.integration.test_dispatcher import SCHEDULE, Stage, stage  # noqa: F401 (the fixture)

ACCOUNT = "123456789012"


def wait_until(condition: Callable[[], Any], timeout: float) -> None:
    """Poll until `condition` holds; fail the test if it never does within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


# Records each message it is handed, then waits while the file its body names does not exist.
HANDLER = """
import json, os, time

def handler(event, context):
    for record in event["Records"]:
        with open(os.environ["SEEN"], "a") as seen:
            seen.write(json.dumps({
                "id": record["messageId"],
                "body": record["body"],
                "count": int(record["attributes"]["ApproximateReceiveCount"]),
                "attributes": sorted(record["messageAttributes"]),
            }) + "\\n")
        deadline = time.time() + 20
        while record["body"] != "go" and not os.path.exists(record["body"]) and time.time() < deadline:
            time.sleep(0.02)
    return {"batchItemFailures": []}
"""


@dataclass
class Mapped:
    """One function behind one mapping: the real Lambda service, a poller, moto's queues."""

    service: LambdaService
    poller: QueuePoller
    sqs: Any
    queue_url: str
    dlq_url: str
    seen: Path

    def deliveries(self) -> list[dict[str, Any]]:
        if not self.seen.exists():
            return []
        return [json.loads(line) for line in self.seen.read_text().splitlines()]

    def records(self) -> list[dict[str, Any]]:
        return [record.as_dict() for record in self.service.invocations.records()]

    def occupy(self, gate: Path) -> threading.Thread:
        """Take the function's one unit of concurrency until `gate` exists (another caller's
        synchronous invoke, as the API or another mapping would)."""
        record = {"messageId": "busy", "body": str(gate), "attributes": {"ApproximateReceiveCount": "1"}}
        record["messageAttributes"] = {}
        busy = threading.Thread(target=self.service.invoke, args=("slow", {"Records": [record]}), daemon=True)
        busy.start()
        wait_until(lambda: len(self.deliveries()) == 1, timeout=30)
        return busy

    def dead_lettered(self) -> list[str]:
        response = self.sqs.receive_message(
            QueueUrl=self.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0
        )
        return [message["Body"] for message in response.get("Messages", [])]


def _queue(sqs: Any, name: str, visibility: int, max_receive_count: int) -> tuple[str, str]:
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)})
    url = sqs.create_queue(
        QueueName=name, Attributes={"VisibilityTimeout": str(visibility), "RedrivePolicy": redrive}
    )["QueueUrl"]
    return url, dlq_url


@pytest.fixture
def mapped(moto_stack: MotoStack, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mapped]:
    """A function with reserved concurrency 1 (unless the test asks otherwise) behind a mapping with MaximumConcurrency 5, batch
    size 1, on a queue whose visibility timeout is 1 s and whose redrive allows `max_receive_count`."""
    options: dict[str, Any] = getattr(request, "param", {})
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(HANDLER)
    seen = tmp_path / "seen.jsonl"
    spec = FunctionSpec(
        name="slow",
        logical_id="Slow",
        physical_name="llmq-slow",
        arn=f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:llmq-slow",
        handler="handler.handler",
        code_dir=code,
        timeout_seconds=30,
        memory_mb=128,
        reserved_concurrency=options.get("reserved_concurrency", 1),
        environment={"SEEN": str(seen)},
    )
    sqs = boto3.client("sqs", region_name=REGION)
    url, dlq_url = _queue(sqs, "slow-queue", 1, options.get("max_receive_count", 3))
    mapping = MappingSpec(
        logical_id="SlowMapping",
        function="slow",
        queue=QueueSpec(
            logical_id="SlowQueue", url=url, arn=f"arn:aws:sqs:{REGION}:{ACCOUNT}:slow-queue", lane=None
        ),
        batch_size=options.get("batch_size", 1),
        batching_window_seconds=options.get("batching_window_seconds", 0),
        max_concurrency=5,
        report_batch_item_failures=True,
        enabled=True,
    )
    service = LambdaService(
        {"slow": spec}, AwsAccess("http://127.0.0.1:9", REGION), tmp_path / "logs", default_concurrency=16
    )
    poller = QueuePoller(mapping, service, sqs, REGION, 5, chaos=options.get("chaos"))
    poller.start()
    try:
        yield Mapped(service, poller, sqs, url, dlq_url, seen)
    finally:
        poller.stop()
        service.close()


def test_a_batch_throttled_by_reserved_concurrency_stays_queued_and_throttles_alone_dead_letter_it(
    mapped: Mapped, tmp_path: Path
) -> None:
    """Lambda throttles a function at its reserved concurrency, and an event source mapping does
    not account for it: it keeps reading batches it cannot hand over. A throttled batch is not
    processed; its messages become visible again after the visibility timeout, each receive
    counts, and a message whose receive count reaches maxReceiveCount goes to the DLQ.

    - "Using Lambda with Amazon SQS" (function throttled, errors or times out: the messages
      become visible again): https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html
    - "How do I troubleshoot ... optimal concurrency for my SQS event source" (reserved
      concurrency throttles; mappings do not account for it):
      https://repost.aws/knowledge-center/lambda-sqs-scaling
    - "Using dead-letter queues in Amazon SQS" (maxReceiveCount):
      https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-dead-letter-queues.html
    """
    gate = tmp_path / "gate"
    # Given the function's one unit of concurrency busy
    busy = mapped.occupy(gate)
    # When a message arrives on its queue meanwhile
    mapped.sqs.send_message(QueueUrl=mapped.queue_url, MessageBody="go")
    # Then its batch is throttled, again after each visibility timeout, until the redrive
    # (maxReceiveCount 3) moves it to the DLQ without the function ever seeing it
    wait_until(lambda: mapped.dead_lettered() == ["go"], timeout=30)
    gate.touch()
    busy.join(timeout=30)
    assert [delivery["body"] for delivery in mapped.deliveries()] == [str(gate)]
    throttled = [record for record in mapped.records() if record["outcome"] == "throttled"]
    assert [record["receive_counts"] for record in throttled][:3] == [[1], [2], [3]]
    assert all(record["deleted_message_ids"] == [] for record in throttled)
    assert all(record["error"] == "Rate Exceeded." for record in throttled)


@pytest.mark.parametrize(
    "mapped", [{"batch_size": 10, "batching_window_seconds": 4, "max_receive_count": 9}], indirect=True
)
def test_a_message_received_again_while_its_batch_gathers_is_in_the_batch_once(mapped: Mapped) -> None:
    """Lambda never hands one message twice in a batch. A batching window longer than the
    queue's visibility timeout receives a lone message again while the batch gathers: the
    batch holds it once, as its latest receive, whose receipt handle deletes it (hunt 260: the
    sandbox handed the function each receive, three records of one message)."""
    # Given a quiet queue whose visibility timeout (1 s) is shorter than the mapping's window (4 s)
    # When one message arrives
    mapped.sqs.send_message(QueueUrl=mapped.queue_url, MessageBody="go")
    wait_until(lambda: mapped.records(), timeout=30)
    # Then the function is handed it once, in one batch, once the window is over
    (record,) = mapped.records()
    assert len(record["message_ids"]) == 1, record
    assert record["receive_counts"][0] >= 2, record
    assert [delivery["body"] for delivery in mapped.deliveries()] == ["go"]
    # And its acknowledgement deletes it: it is never delivered again, nor dead-lettered
    time.sleep(2)
    assert len(mapped.records()) == 1
    assert mapped.dead_lettered() == []


def test_a_throttled_message_is_processed_once_the_function_has_room_one_receive_older(
    mapped: Mapped, tmp_path: Path
) -> None:
    """A throttled batch comes back after its visibility timeout, and its receive count says
    how often it was received: "Using Lambda with Amazon SQS",
    https://docs.aws.amazon.com/lambda/latest/dg/with-sqs.html, and ReceiveMessage's
    ApproximateReceiveCount, https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_ReceiveMessage.html
    """
    gate = tmp_path / "gate"
    mapped.occupy(gate)
    mapped.sqs.send_message(QueueUrl=mapped.queue_url, MessageBody="go")
    wait_until(lambda: any(record["outcome"] == "throttled" for record in mapped.records()), timeout=30)
    gate.touch()
    wait_until(lambda: len(mapped.deliveries()) == 2, timeout=30)
    late = mapped.deliveries()[1]
    assert late["body"] == "go" and late["count"] >= 2
    assert mapped.dead_lettered() == []


@pytest.mark.parametrize(
    "mapped",
    [
        {
            "chaos": DeliveryChaos(random.Random(3), duplicate_probability=1.0),
            "batch_size": 10,
            "max_receive_count": 10,
            # Room for a replay next to its original: a throttled replay is simply lost.
            "reserved_concurrency": 5,
        }
    ],
    indirect=True,
)
def test_a_message_delivered_twice_keeps_its_message_id(mapped: Mapped) -> None:
    """An event source mapping processes each message at least once, and may process one
    twice ("Lambda event source mappings", event processing at least once,
    https://docs.aws.amazon.com/lambda/latest/dg/invocation-eventsourcemapping.html; SQS
    standard queues deliver at least once,
    https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/standard-queues.html).
    With the chaos mode on the sandbox's pollers do it: the function sees the same message id
    again, and the queue holds no extra message."""
    sent = {
        mapped.sqs.send_message(QueueUrl=mapped.queue_url, MessageBody="go")["MessageId"] for _ in range(3)
    }

    def ids() -> list[str]:
        return [delivery["id"] for delivery in mapped.deliveries()]

    wait_until(lambda: all(ids().count(message_id) >= 2 for message_id in sent), timeout=30)
    assert set(ids()) == sent
    assert all(delivery["attributes"] == [] for delivery in mapped.deliveries())
    wait_until(
        lambda: (
            mapped.sqs.get_queue_attributes(
                QueueUrl=mapped.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
            )["Attributes"]["ApproximateNumberOfMessages"]
            == "0"
        ),
        timeout=30,
    )


def test_the_chaos_decisions_replay_from_their_seed() -> None:
    """The same seed and queue give the same duplicates, shuffles, hold-backs and batch sizes."""
    messages = [{"MessageId": str(index), "Body": "b"} for index in range(10)]

    def decisions(seed: int) -> list[Any]:
        chaos = DeliveryChaos.seeded(seed, "llmq-lane-high")
        made: list[Any] = []
        for _ in range(20):
            made.append(chaos.receive_size(10))
            batch, held = chaos.arrange(messages)
            made.append(([m["MessageId"] for m in batch], [m["MessageId"] for m in held]))
            made.append([(m["MessageId"], delay) for m, delay in chaos.replays(batch)])
        return made

    assert decisions(7) == decisions(7)
    assert decisions(7) != decisions(8)


# ---- the webhook schedule under throttles and duplicates ---------------------------------------


def _throttle(on: Stage) -> None:
    """What a throttled batch does to a message: a receive, and nothing else until it is visible."""
    received = on.sqs.receive_message(QueueUrl=on.stack.webhook_queue_url, VisibilityTimeout=0)
    assert received.get("Messages"), "nothing to throttle"


def test_throttled_receives_do_not_skip_a_step_of_the_webhook_schedule(stage: Stage) -> None:  # noqa: F811
    """Each throttle adds to a message's ApproximateReceiveCount without any attempt (see the
    throttling test above); a receiver that fails N <= len(schedule) times still gets the
    webhook on attempt N+1, each retry after its own step of the schedule."""
    # Given a receiver that fails as many times as the schedule has retries
    stage.receiver.script("/hooks/flaky", *[500] * len(SCHEDULE), 200)
    stage.job("/hooks/flaky")
    # When the message is throttled twice before its first attempt
    _throttle(stage)
    _throttle(stage)
    for delay in SCHEDULE:
        stage.dispatch()
        stage.let_time_pass(delay)
    last = stage.dispatch()
    # Then every step of the schedule was taken in order, and the last attempt delivered it
    assert stage.visibility_changes == SCHEDULE
    assert last == {"batchItemFailures": []}
    delivery = stage.delivery()
    assert (delivery.status, delivery.attempts) == ("delivered", len(SCHEDULE) + 1)
    assert len(stage.receiver.requests_to("/hooks/flaky")) == len(SCHEDULE) + 1


def test_a_duplicated_webhook_message_counts_its_attempt_once(stage: Stage) -> None:  # noqa: F811
    """Two copies of one webhooks-queue message (SQS delivers at least once: "Amazon SQS
    at-least-once delivery", https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/standard-queues-at-least-once-delivery.html)
    make one attempt of the schedule between them, not two; while the delivery is pending both
    keep their message (either may carry the retry), the second coming back just after the
    next attempt is due, and the delivery still follows the schedule step by step under one
    webhook-id. Handled by one invocation, the copies go one after the other: one POST per
    attempt, where both used to POST it side by side."""
    stage.receiver.script("/hooks/flaky", 500, 500, 500, 200)
    record = stage.job("/hooks/flaky")
    stage.queues.enqueue_webhook(record.id, WebhookEvent.SUCCEEDED)
    # When both copies are handled at once and the receiver fails them
    first = stage.dispatch()
    # Then one attempt is counted, and both copies come back: one when the next is due, one after
    assert len(first["batchItemFailures"]) == 2
    assert sorted(stage.visibility_changes) == [
        SCHEDULE[0],
        SCHEDULE[0] + copy_lag_seconds(stage.config.webhooks.timeout_seconds),
    ]
    assert stage.delivery().attempts == 1
    assert len(stage.receiver.requests_to("/hooks/flaky")) == 1
    stage.let_time_pass(SCHEDULE[0])
    stage.dispatch()
    assert stage.delivery().attempts == 2
    assert sorted(stage.visibility_changes[2:]) == [
        SCHEDULE[1],
        SCHEDULE[1] + copy_lag_seconds(stage.config.webhooks.timeout_seconds),
    ]
    delivery = stage.delivery()
    # When the receiver is back, the delivery is settled and both copies are acknowledged
    while delivery.status == "pending":
        stage.let_time_pass(SCHEDULE[delivery.attempts - 1])
        stage.dispatch()
        delivery = stage.delivery()
    assert delivery.status == "delivered"
    assert stage.queued() == 0
    # And each of the four attempts was POSTed once, all as the same webhook
    posts = stage.receiver.requests_to("/hooks/flaky")
    assert delivery.attempts == 4
    assert len(posts) == 4
    assert len({post.headers["webhook-id"] for post in posts}) == 1


def test_a_copy_that_comes_before_the_next_attempt_is_due_waits_for_it(stage: Stage) -> None:  # noqa: F811
    """A second copy of a webhooks-queue message received soon after the first (SQS delivers at
    least once) makes no attempt ahead of the schedule: it waits until just after the next one
    is due, when the message carrying that attempt has gone first."""
    stage.receiver.script("/hooks/flaky", 500, 200)
    record = stage.job("/hooks/flaky")
    # Given a first attempt that failed, with the retry due after the schedule's first delay
    stage.dispatch()
    # When another copy of the message comes at once
    stage.queues.enqueue_webhook(record.id, WebhookEvent.SUCCEEDED)
    early = stage.dispatch()
    # Then it is not sent, counts no attempt, and comes back the copy lag after the retry is due
    assert len(early["batchItemFailures"]) == 1
    assert len(stage.receiver.requests_to("/hooks/flaky")) == 1
    assert stage.delivery().attempts == 1
    assert stage.visibility_changes[0] == SCHEDULE[0]
    assert (
        SCHEDULE[0] + copy_lag_seconds(stage.config.webhooks.timeout_seconds) - 1
        <= stage.visibility_changes[1]
        <= SCHEDULE[0] + copy_lag_seconds(stage.config.webhooks.timeout_seconds)
    )
