"""The dead-letter function counts each job it fails, so an alarm sees what the DLQ depth cannot.

It drains the lane DLQs within seconds: ApproximateNumberOfMessagesVisible stays at 0 and a
depth alarm never fires. JobDeadLettered (namespace llmq, dimensions service and lane) is what
the Lane<Name>DeadLettered alarm watches (stacks/monitoring.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmq import aws
from llmq.errors import StoreUnavailable
from llmq.jobs import JobRepository
from llmq.policy import ClaimOutcome
from llmq.queues import QueueRepository
from llmq.telemetry import METRICS_NAMESPACE, MetricName
from tests.integration.harness import ENTERPRISE, Harness, LambdaContextStub, load_handler


def _dead_letter(harness: Harness, job_id: str) -> None:
    """The lane message of `job_id` reaches the high lane's DLQ and the function handles it."""
    dlq = harness.stack.lane_dlq_urls["high"]
    harness.sqs.send_message(QueueUrl=dlq, MessageBody=json.dumps({"job_id": job_id, "lane": "high"}))
    messages = harness.receive(dlq)
    response = load_handler("dead_letter").handler(harness.sqs_event(dlq, messages), LambdaContextStub())
    assert response["batchItemFailures"] == []
    for message in messages:
        harness.sqs.delete_message(QueueUrl=dlq, ReceiptHandle=message["ReceiptHandle"])


def _dead_lettered(stdout: str) -> list[dict[str, Any]]:
    records = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        for directive in record.get("_aws", {}).get("CloudWatchMetrics", []):
            if any(metric["Name"] == MetricName.JOB_DEAD_LETTERED for metric in directive["Metrics"]):
                assert directive["Namespace"] == METRICS_NAMESPACE
                records.append(record)
    return records


def test_a_job_the_dead_letter_function_fails_is_counted_once_per_lane(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a running job whose worker vanished (its lease lapsed)
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "vanished-worker", lease_seconds=-1).outcome is ClaimOutcome.CLAIMED
    capsys.readouterr()
    # When its message dead-letters
    _dead_letter(harness, job_id)
    # Then the job failed as worker_crashed, and one JobDeadLettered was printed for its lane
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")
    (record,) = _dead_lettered(capsys.readouterr().out)
    assert (record["lane"], record[MetricName.JOB_DEAD_LETTERED]) == ("high", [1.0])
    # When a duplicate of that message dead-letters later
    _dead_letter(harness, job_id)
    # Then the job, already failed, is not counted again
    assert _dead_lettered(capsys.readouterr().out) == []


def test_a_queued_job_sent_again_is_not_counted_as_failed(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a queued job whose lane message dead-lettered before any claim
    job_id = harness.submit().body["id"]
    harness.receive(harness.stack.lane_queue_urls["high"])
    capsys.readouterr()
    # When the dead-letter function sees it the first time, it sends the job again
    _dead_letter(harness, job_id)
    # Then the job is still queued, and nothing counts it as dead-lettered
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "queued"
    assert _dead_lettered(capsys.readouterr().out) == []


def test_two_copies_of_a_message_handled_at_once_count_the_job_once(
    harness: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a running job whose worker vanished, and copy B of its message, whose invocation
    # started just before copy A, handled by another invocation, failed the job
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "vanished-worker", lease_seconds=-1).outcome is ClaimOutcome.CLAIMED
    b_started_ms = jobs.now_ms()
    capsys.readouterr()
    _dead_letter(harness, job_id)
    # When copy B goes on, as of when it started, and finds the job failed
    monkeypatch.setattr(JobRepository, "now_ms", lambda self: b_started_ms)
    _dead_letter(harness, job_id)
    # Then the job failed once, and was counted once
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")
    assert len(_dead_lettered(capsys.readouterr().out)) == 1


def test_a_job_failed_here_whose_webhook_send_fails_is_still_counted_once(
    harness: Harness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a running job with a webhook whose worker vanished, and a webhooks queue that
    # refuses the first send
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hooks"}).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "vanished-worker", lease_seconds=-1).outcome is ClaimOutcome.CLAIMED
    refusals = iter([StoreUnavailable("sqs.SendMessage: ThrottlingException")])
    send = QueueRepository.enqueue_webhook

    def refused_once(self: QueueRepository, *args: Any, **kwargs: Any) -> None:
        refusal = next(refusals, None)
        if refusal is not None:
            raise refusal
        send(self, *args, **kwargs)

    monkeypatch.setattr(QueueRepository, "enqueue_webhook", refused_once)
    capsys.readouterr()
    # When its message dead-letters, the record failing on the send and handled again
    dlq = harness.stack.lane_dlq_urls["high"]
    harness.sqs.send_message(QueueUrl=dlq, MessageBody=json.dumps({"job_id": job_id, "lane": "high"}))
    handler = load_handler("dead_letter").handler
    for expected_failures in (1, 0):
        messages = harness.receive(dlq, visibility=0)
        response = handler(harness.sqs_event(dlq, messages), LambdaContextStub())
        assert len(response["batchItemFailures"]) == expected_failures
    # Then the job failed once, and its JobDeadLettered was counted once, by the write that failed it
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")
    assert len(_dead_lettered(capsys.readouterr().out)) == 1
