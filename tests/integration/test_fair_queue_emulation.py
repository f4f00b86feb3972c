"""SQS fair queues, as the sandbox emulates them on moto (llmq_sandbox/moto_fidelity.py).

Every lane message carries its tenant as MessageGroupId (llmq.queues.QueueRepository). On a
standard queue that makes SQS a fair queue: while one tenant holds a disproportionate share of
the messages in flight (more than 10% and at least 30) or of the consumers' recent processing
time (more than 10%), a receive returns other tenants' messages first whenever there are any;
among noisy tenants, the one with the fewest in flight first; nothing is dropped, and there is
no ordering guarantee ("How Amazon SQS fair queues work",
https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-fair-queues-detailed.html).
moto 5.2.5 keeps the MessageGroupId of a standard queue's message and ignores it: it always
returns the oldest visible messages first. Real boto3 against moto, the real poller and the
real Lambda service; each order test runs with the emulation on and off, so it can fail.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from llmq_sandbox.config import RunnerSettings
from llmq_sandbox.event_sources import QueuePoller
from llmq_sandbox.lambda_service import AwsAccess, LambdaService
from llmq_sandbox.moto_fidelity import fair_queue_order
from llmq_sandbox.topology import FunctionSpec, MappingSpec, QueueSpec
from tests.conftest import REGION, MotoStack

ACCOUNT = "123456789012"
NOISY_BACKLOG = 200
QUIET_MESSAGES = 5


def _queue(name: str = "fair-lane") -> tuple[Any, str]:
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    return sqs, url


def _send(sqs: Any, url: str, bodies: list[str], group: str | None) -> None:
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(index), "MessageBody": body} | ({"MessageGroupId": group} if group else {})
            for index, body in enumerate(bodies[start : start + 10])
        ]
        assert not sqs.send_message_batch(QueueUrl=url, Entries=entries).get("Failed")


def _flood_then_quiet(sqs: Any, url: str) -> None:
    """Tenant A floods the lane, then tenant B sends a few."""
    _send(sqs, url, [f"A{index}" for index in range(NOISY_BACKLOG)], "tenant-a")
    _send(sqs, url, [f"B{index}" for index in range(QUIET_MESSAGES)], "tenant-b")


def _receive_and_hold(sqs: Any, url: str, receives: int) -> list[str]:
    """What consumers that keep every message in flight get, ten at a time."""
    bodies: list[str] = []
    for _ in range(receives):
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        bodies += [message["Body"] for message in messages]
        time.sleep(0.01)
    return bodies


def _positions(bodies: list[str], prefix: str) -> list[int]:
    return [position for position, body in enumerate(bodies, start=1) if body.startswith(prefix)]


# ---- what moto does with MessageGroupId on a standard queue --------------------------------


def test_a_standard_queue_keeps_a_message_group_id_and_returns_it(moto_stack: MotoStack) -> None:
    """SendMessage takes MessageGroupId on a standard queue (fair queues), and ReceiveMessage
    returns it when asked for (MessageSystemAttributeNames MessageGroupId, or All): SendMessage
    and ReceiveMessage, https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessage.html.
    llmq's sandbox pollers ask for All and copy it into the Lambda record."""
    sqs, url = _queue()
    sqs.send_message(QueueUrl=url, MessageBody="grouped", MessageGroupId="ten_0123")
    sqs.send_message(QueueUrl=url, MessageBody="plain")
    received = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["MessageGroupId"]
    )["Messages"]
    assert {message["Body"]: message.get("Attributes", {}) for message in received} == {
        "grouped": {"MessageGroupId": "ten_0123"},
        "plain": {},
    }


@pytest.mark.parametrize("group", ["x" * 129, "tenant a", "tenant\u00e9"])
def test_a_message_group_id_aws_refuses_is_refused(moto_stack: MotoStack, group: str) -> None:
    """MessageGroupId: at most 128 characters, alphanumeric or punctuation (SendMessage,
    https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessage.html).
    moto took any string; a tenant id AWS cannot carry as a group now fails here too."""
    sqs, url = _queue()
    with pytest.raises(ClientError) as refused:
        sqs.send_message(QueueUrl=url, MessageBody="m", MessageGroupId=group)
    assert refused.value.response["Error"]["Code"] == "InvalidParameterValue"
    with pytest.raises(ClientError):
        sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": "1", "MessageBody": "m", "MessageGroupId": group}]
        )
    sqs.send_message(QueueUrl=url, MessageBody="m", MessageGroupId="x" * 128)


# ---- the order of a receive ----------------------------------------------------------------


def test_a_quiet_tenant_is_received_ahead_of_a_noisy_backlog(moto_stack: MotoStack) -> None:
    """Tenant A has 200 messages waiting and its first ones in flight; tenant B's 5 messages,
    sent after all of A's, come within the first three receives of ten."""
    sqs, url = _queue()
    _flood_then_quiet(sqs, url)
    with fair_queue_order(True):
        received = _receive_and_hold(sqs, url, 4)
    assert len(_positions(received, "B")) == QUIET_MESSAGES
    assert max(_positions(received, "B")) <= 30


def test_without_the_emulation_a_quiet_tenant_waits_behind_the_whole_backlog(moto_stack: MotoStack) -> None:
    """moto's own order (oldest first, groups ignored), i.e. a standard queue with no fair-queue
    behaviour: none of B's messages in the first 100."""
    sqs, url = _queue()
    _flood_then_quiet(sqs, url)
    with fair_queue_order(False):
        received = _receive_and_hold(sqs, url, 10)
    assert len(received) == 100
    assert _positions(received, "B") == []


@pytest.mark.parametrize("fair", [True, False], ids=["fair", "moto-order"])
def test_two_flooding_tenants_share_the_receives(moto_stack: MotoStack, fair: bool) -> None:
    """A and then C each send 100. With the emulation, once both are noisy the one with fewer
    in flight goes first, so the first 80 received are shared; in moto's order C waits for
    all of A's."""
    sqs, url = _queue()
    _send(sqs, url, [f"A{index}" for index in range(100)], "tenant-a")
    _send(sqs, url, [f"C{index}" for index in range(100)], "tenant-c")
    with fair_queue_order(fair):
        received = _receive_and_hold(sqs, url, 8)
    shares = (len(_positions(received, "A")), len(_positions(received, "C")))
    if fair:
        assert shares[0] >= 20 and shares[1] >= 30, shares
    else:
        assert shares == (80, 0)


def test_messages_without_a_group_keep_moto_order(moto_stack: MotoStack) -> None:
    """A message without MessageGroupId is a tenant of its own: a queue of such messages comes
    oldest first, as before."""
    sqs, url = _queue()
    bodies = [f"M{index}" for index in range(30)]
    _send(sqs, url, bodies, None)
    with fair_queue_order(True):
        assert _receive_and_hold(sqs, url, 3) == bodies


# ---- through the sandbox's poller ----------------------------------------------------------

# Records each message it is handed, with its receive count and group.
HANDLER = """
import json, os, time

def handler(event, context):
    with open(os.environ["SEEN"], "a") as seen:
        for record in event["Records"]:
            seen.write(json.dumps({
                "body": record["body"],
                "count": int(record["attributes"]["ApproximateReceiveCount"]),
                "group": record["attributes"].get("MessageGroupId"),
            }) + "\\n")
    time.sleep(0.05)
    return {"batchItemFailures": []}
"""


@dataclass
class Lane:
    """A function behind a mapping (batch 10, MaximumConcurrency 2) on a lane-like queue."""

    sqs: Any
    url: str
    seen: Path
    receives: list[int]
    start: Callable[[], QueuePoller]

    def deliveries(self) -> list[dict[str, Any]]:
        if not self.seen.exists():
            return []
        return [json.loads(line) for line in self.seen.read_text().splitlines()]

    def delivered(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries()) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries())} of {count} delivered"
            time.sleep(0.05)
        return self.deliveries()


@pytest.fixture
def lane(moto_stack: MotoStack, tmp_path: Path) -> Iterator[Lane]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(HANDLER)
    seen = tmp_path / "seen.jsonl"
    spec = FunctionSpec(
        name="worker",
        logical_id="Worker",
        physical_name="llmq-worker",
        arn=f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:llmq-worker",
        handler="handler.handler",
        code_dir=code,
        timeout_seconds=30,
        memory_mb=128,
        reserved_concurrency=None,
        environment={"SEEN": str(seen)},
    )
    sqs, url = _queue()
    receives: list[int] = []
    sqs.meta.events.register("before-call.sqs.ReceiveMessage", lambda **_: receives.append(1))
    mapping = MappingSpec(
        logical_id="WorkerMapping",
        function="worker",
        queue=QueueSpec(
            logical_id="Lane", url=url, arn=f"arn:aws:sqs:{REGION}:{ACCOUNT}:fair-lane", lane="high"
        ),
        batch_size=10,
        batching_window_seconds=0,
        max_concurrency=2,
        report_batch_item_failures=True,
        enabled=True,
    )
    service = LambdaService(
        {"worker": spec}, AwsAccess("http://127.0.0.1:9", REGION), tmp_path / "logs", default_concurrency=4
    )
    pollers: list[QueuePoller] = []

    def start() -> QueuePoller:
        poller = QueuePoller(mapping, service, sqs, REGION, 2)
        pollers.append(poller)
        poller.start()
        return poller

    try:
        yield Lane(sqs, url, seen, receives, start)
    finally:
        for poller in pollers:
            poller.stop()
        service.close()


@pytest.mark.parametrize("fair", [True, False], ids=["fair", "moto-order"])
def test_the_poller_hands_a_quiet_tenant_its_turn_within_the_first_batches(lane: Lane, fair: bool) -> None:
    """Tenant A floods a lane with 200 messages, then tenant B sends 5. With the emulation the
    function sees all of B's within its first four batches of ten (A turns noisy once 30 of its
    messages are in flight, three batches, so B's may come in the fourth, depending on how fast
    the first batches finish); without it (moto's order,
    as before fair queues) after A's whole backlog. Either way every message is delivered once,
    on its first receive: the emulation receives nothing it then puts back."""
    _flood_then_quiet(lane.sqs, lane.url)
    with fair_queue_order(fair):
        lane.start()
        deliveries = lane.delivered(NOISY_BACKLOG + QUIET_MESSAGES)
    bodies = [delivery["body"] for delivery in deliveries]
    quiet = _positions(bodies, "B")
    if fair:
        assert max(quiet) <= 40, quiet
    else:
        assert min(quiet) > 150, quiet
    assert sorted(bodies) == sorted([f"A{i}" for i in range(NOISY_BACKLOG)] + [f"B{i}" for i in range(5)])
    assert {delivery["count"] for delivery in deliveries} == {1}
    assert {delivery["group"] for delivery in deliveries} == {"tenant-a", "tenant-b"}


def test_the_poller_still_delivers_messages_without_a_group(lane: Lane) -> None:
    """Messages without MessageGroupId (the webhooks queue's, or any sent before the lanes
    carried their tenant) are still delivered, each once, next to grouped ones."""
    _send(lane.sqs, lane.url, [f"A{index}" for index in range(40)], "tenant-a")
    _send(lane.sqs, lane.url, [f"P{index}" for index in range(25)], None)
    with fair_queue_order(True):
        lane.start()
        deliveries = lane.delivered(65)
    assert sorted(delivery["body"] for delivery in deliveries) == sorted(
        [f"A{index}" for index in range(40)] + [f"P{index}" for index in range(25)]
    )
    assert [delivery["group"] for delivery in deliveries if delivery["body"].startswith("P")] == [None] * 25
    assert {delivery["count"] for delivery in deliveries} == {1}


def test_the_sandbox_switch_comes_from_the_environment() -> None:
    assert RunnerSettings.from_environment({}).fair_queues is True
    assert RunnerSettings.from_environment({"LLMQ_SANDBOX_FAIR_QUEUES": "off"}).fair_queues is False
    with pytest.raises(ValueError):
        RunnerSettings.from_environment({"LLMQ_SANDBOX_FAIR_QUEUES": "maybe"})


# ---- webhook messages are grouped by tenant too ------------------------------------------------


def test_every_webhook_message_carries_its_tenant_as_its_group(harness: Any, receiver: Any) -> None:
    """One webhooks queue and one dispatcher serve every tenant, each delivery as long as its
    receiver takes (up to webhooks.timeout_seconds): a tenant whose receiver hangs, or whose
    events are many, must not lengthen every other tenant's wait. Each webhook message carries
    its tenant as MessageGroupId, so SQS fair queues apply to it as to the lanes: job.started,
    the terminal event, and a redelivery's."""
    from tests.integration.harness import ENTERPRISE, FREE

    events = ["job.started", "job.succeeded"]
    jobs = {
        tenant["tenant_id"]: harness.submit(
            tenant=tenant,
            prompt="hi",
            webhook={"url": f"http://127.0.0.1:{receiver.port}/h", "events": events},
        ).body["id"]
        for tenant in (ENTERPRISE, FREE)
    }
    for lane in ("high", "low"):
        harness.drain(lane)
    groups = _webhook_groups(harness)
    assert sorted(groups) == sorted((job_id, tenant) for tenant, job_id in jobs.items() for _ in events), (
        groups
    )
    # And a redelivery's message, once the first were handled
    harness.sqs.purge_queue(QueueUrl=harness.stack.webhook_queue_url)
    job_id = jobs[FREE["tenant_id"]]
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET delivery_status = :delivered",
        ExpressionAttributeValues={":delivered": {"S": "delivered"}},
    )
    reply = harness.api("POST", f"/v1/jobs/{job_id}/webhook/redeliver", tenant=FREE)
    assert reply.status == 202, reply.body
    assert _webhook_groups(harness) == [(job_id, FREE["tenant_id"])]


def _webhook_groups(harness: Any) -> list[tuple[str, str | None]]:
    """(job id, MessageGroupId) of every message in the webhooks queue."""
    found = []
    for _ in range(5):
        messages = harness.sqs.receive_message(
            QueueUrl=harness.stack.webhook_queue_url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=60,
            MessageSystemAttributeNames=["MessageGroupId"],
        ).get("Messages", [])
        found += [
            (json.loads(m["Body"])["job_id"], m.get("Attributes", {}).get("MessageGroupId")) for m in messages
        ]
    return found
