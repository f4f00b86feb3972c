"""The running sandbox's SQS delivers as a fair queue by default (LLMQ_SANDBOX_FAIR_QUEUES=on).

On the session's shared sandbox, with a scratch queue of its own (the lanes are left alone):
what tests/integration/test_fair_queue_emulation.py proves in-process holds in the sandbox's
moto server, so the pollers of every lane get the fair order ("How Amazon SQS fair queues work",
https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-fair-queues-detailed.html).
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.e2e.conftest import SandboxUnderTest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def test_a_quiet_tenant_is_received_ahead_of_a_noisy_backlog_in_the_sandbox(
    sandbox: SandboxUnderTest,
) -> None:
    sqs = sandbox.aws("sqs")
    url = sqs.create_queue(QueueName=f"fair-check-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    try:
        # Given tenant A's 200-message backlog, then tenant B's 5 messages
        for group, count in (("ten_noisy", 200), ("ten_quiet", 5)):
            for start in range(0, count, 10):
                entries = [
                    {"Id": str(index), "MessageBody": f"{group}:{start + index}", "MessageGroupId": group}
                    for index in range(min(10, count - start))
                ]
                sqs.send_message_batch(QueueUrl=url, Entries=entries)
        # When consumers receive ten at a time and keep what they got in flight
        received: list[str] = []
        for _ in range(4):
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
            received += [message["Body"] for message in messages]
            time.sleep(0.01)
        # Then all of B's came within the first 30, not after A's 200
        quiet = [position for position, body in enumerate(received, 1) if body.startswith("ten_quiet")]
        assert len(quiet) == 5 and max(quiet) <= 30, quiet
    finally:
        sqs.delete_queue(QueueUrl=url)
