"""A canceling batch's crashed item, recovered by the reconciler, always ends or has a message to end
by: a worker that takes the recovery's message at once finds it queued, and ends it canceled."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from llmq import aws
from llmq.batch_runs import BATCH_CRASHED
from llmq.batches import BatchLineError, BatchRepository, item_job_id
from llmq.jobs import JobRepository
from llmq.models import JobStatus
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, Harness

HIGH = "high"
TENANT = (ENTERPRISE["tenant_id"], HIGH)


@pytest.fixture
def harness(moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Harness:
    config = integration_config(provider, batches={"expand_chunk": 2})
    return Harness(moto_stack, config, monkeypatch)


def _jobs(harness: Harness, offset: float = 0.0) -> JobRepository:
    return JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + offset,
    )


def _reconciler(harness: Harness, offset: float) -> Reconciler:
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    return Reconciler(_jobs(harness, offset), queues, harness.config, batches=batches)


def _messages_for(harness: Harness, url: str, job_id: str) -> list[dict[str, Any]]:
    return [m for m in harness.receive(url, visibility=0) if json.loads(m["Body"])["job_id"] == job_id]


@pytest.mark.parametrize("how", ["given_up", "client_cancel_cut_short"])
def test_a_canceling_batchs_crashed_item_recovered_while_a_worker_takes_its_message_still_ends(
    harness: Harness, how: str
) -> None:
    # Given a batch of two items, expanded; item 0 a worker took (its message with it) and died
    batch_id = harness.api(
        "POST",
        "/v1/batches",
        body={"requests": [{"custom_id": f"i{i}", "body": {"prompt": f"say {i}"}} for i in range(2)]},
        tenant=ENTERPRISE,
    ).body["id"]
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    crashed, other = item_job_id(batch_id, 0), item_job_id(batch_id, 1)
    for message in harness.receive(url):
        if json.loads(message["Body"])["job_id"] == crashed:
            harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert _jobs(harness).claim(crashed, "dead-worker", 0.2, TENANT).claimed
    # And the batch is canceling with its running item not flagged: llmq gave up on the batch
    # (its running items are left to finish), or the client's cancel was cut after the flag
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    batch = batches.find(batch_id)
    assert batch is not None
    if how == "given_up":
        errors = [BatchLineError(line=0, code=BATCH_CRASHED, message="gave up")]
        assert batches.request_cancel(batch, errors) is not None
    else:
        assert batches.request_cancel(batch, by_client=True) is not None
    # (and a second copy of item 1's message is on its way, so the lane's depth matches its
    # unfinished items, as in test_jobs_ended's own recovery test)
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    queues.enqueue_job(other, HIGH, TENANT[0])
    time.sleep(0.3)  # item 0's lease lapses
    # When the reconciler recovers the lapsed lease, and a worker receives its message at once
    reconciler = _reconciler(harness, 1.0)
    sends = reconciler.queues
    lanes = sends._queues  # type: ignore[attr-defined]
    real_enqueue = lanes.enqueue_job

    def enqueue_then_a_fast_worker(job_id: str, *args: Any, **kwargs: Any) -> None:
        real_enqueue(job_id, *args, **kwargs)
        if job_id == crashed:
            harness.run_worker(url, _messages_for(harness, url, crashed))

    lanes.enqueue_job = enqueue_then_a_fast_worker
    reconciler.run()
    # And the reconciler runs on, an hour of runs (the lane's depth is the same)
    for step in range(12):
        later = (step + 1) * (harness.config.reconciler.stale_queued_seconds + 1)
        _reconciler(harness, later).run()
    # Then the item has a message to end by (canceled, as its batch asked), or has ended
    found = _jobs(harness).find(crashed)
    assert found is not None
    has_message = bool(_messages_for(harness, url, crashed))
    assert found.status is not JobStatus.QUEUED or has_message, (found.status, has_message)
