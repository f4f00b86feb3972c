"""Every job ended is counted once among the job outcomes, whoever ends it (the reconciler, a
client's cancel, a dead letter whose write's answer was lost), and a recovered job always has a
message to run again by, however the recovery was cut short."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from llmq import aws
from llmq.jobs import JobRepository
from llmq.policy import ClaimOutcome
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.telemetry import MetricName
from tests.aws_faults import AwsFaults, FaultKind
from tests.integration.harness import ENTERPRISE, Harness, emitted_metrics, reconciler_ahead

TENANT = (ENTERPRISE["tenant_id"], "high")


def _reconciler(harness: Harness, offset: list[float]) -> Reconciler:
    return reconciler_ahead(harness, offset, offload=True)  # type: ignore[no-any-return]


def _purge(harness: Harness) -> None:
    url = harness.stack.lane_queue_urls["high"]
    for message in harness.receive(url):
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def _crashed(harness: Harness, job_id: str, attempts: int | None = None) -> None:
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "crashed-worker", 0.2, TENANT).outcome is ClaimOutcome.CLAIMED
    if attempts is not None:
        harness.ddb.update_item(
            TableName=harness.stack.jobs_table,
            Key={"pk": {"S": job_id}},
            UpdateExpression="SET attempts = :n",
            ExpressionAttributeValues={":n": {"N": str(attempts)}},
        )
    time.sleep(0.3)


def _status(harness: Harness, job_id: str) -> dict[str, Any]:
    return dict(harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body)


# ---- outcomes the reconciler and the api write ---------------------------------------------


def test_a_crashed_job_the_reconciler_fails_counts_as_failed(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a job whose worker crashed on its last attempt (its message gone)
    job_id = harness.submit().body["id"]
    _purge(harness)
    _crashed(harness, job_id, attempts=harness.config.max_attempts)
    capsys.readouterr()
    # When the reconciler finds its lease lapsed and fails it
    report = _reconciler(harness, [1.0]).run()
    assert report.recovered == [job_id]
    assert (_status(harness, job_id)["status"], _status(harness, job_id)["error"]["code"]) == (
        "failed",
        "worker_crashed",
    )
    # Then it is one JobFailed of its lane, as when a worker's claim or the dead-letter
    # function fails the same job (the JobsFailing alarm and the "Job outcomes" graph)
    assert len(emitted_metrics(capsys.readouterr().out, MetricName.JOB_FAILED)) == 1


def test_a_job_failed_for_what_its_request_asked_counts_as_refused_not_failed(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a job whose prompt the provider refuses as past the model's context
    job_id = harness.submit(prompt="[[fail:400:context_length_exceeded]]").body["id"]
    capsys.readouterr()
    # When a worker runs it
    harness.drain("high")
    assert _status(harness, job_id)["error"]["code"] == "context_length_exceeded"
    # Then it is one JobRefused, not a JobFailed: the client's to fix, which JobsFailing does
    # not page on (hunt 294: five such prompts of one tenant paged it)
    out = capsys.readouterr().out
    assert [record["lane"] for record in emitted_metrics(out, MetricName.JOB_REFUSED)] == ["high"]
    assert emitted_metrics(out, MetricName.JOB_FAILED) == []
    # And a provider's 400 with no such code, which every job meets when the provider stops
    # taking what llmq sends, still counts as failed (review 266: it paged nothing)
    other = harness.submit(prompt="[[fail:400:unsupported_parameter]]").body["id"]
    harness.drain("high")
    assert _status(harness, other)["error"]["code"] == "invalid_request"
    out = capsys.readouterr().out
    assert len(emitted_metrics(out, MetricName.JOB_FAILED)) == 1
    assert emitted_metrics(out, MetricName.JOB_REFUSED) == []


def test_a_queued_job_the_reconciler_expires_at_its_deadline_counts_as_expired(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a queued job with a 5 s deadline, behind a backlog
    job_id = harness.submit(deadline_seconds=5).body["id"]
    capsys.readouterr()
    # When the reconciler's run after the deadline ends it expired
    assert _reconciler(harness, [6.0]).run().expired == [job_id]
    # Then it is one JobExpired (a worker's claim that expires it counts one)
    assert len(emitted_metrics(capsys.readouterr().out, MetricName.JOB_EXPIRED)) == 1


def test_a_queued_job_the_client_cancels_counts_as_canceled(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = harness.submit().body["id"]
    capsys.readouterr()
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 200
    assert _status(harness, job_id)["status"] == "canceled"
    assert len(emitted_metrics(capsys.readouterr().out, MetricName.JOB_CANCELED)) == 1


# ---- a recovery whose answer was lost ------------------------------------------------------


def _crashed_behind_a_matched_lane(harness: Harness) -> str:
    """A crashed job whose own message is gone (acknowledged as leased elsewhere when it came back
    just before the lease lapsed), and another job of the lane with a second copy of its message
    on its way, so that the lane's depth equals its unfinished jobs: the crashed job's id."""
    crashed = harness.submit().body["id"]
    other = harness.submit().body["id"]
    _purge(harness)
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    queues.enqueue_job(other, "high", TENANT[0])
    queues.enqueue_job(other, "high", TENANT[0])
    _crashed(harness, crashed)
    return crashed


def _an_hour_of_runs(harness: Harness, reconciler: Reconciler, offset: list[float]) -> None:
    for _ in range(12):
        offset[0] += harness.config.reconciler.stale_queued_seconds + 1
        reconciler.run()


@pytest.mark.parametrize("fault", ["recover-answer-lost", "send-throttled"])
def test_a_recovered_job_gets_a_message_whatever_the_lane_depth_says(harness: Harness, fault: str) -> None:
    # Given a crashed job whose own message is gone, in a lane whose depth equals its unfinished jobs
    url = harness.stack.lane_queue_urls["high"]
    crashed = _crashed_behind_a_matched_lane(harness)
    offset = [1.0]
    reconciler = _reconciler(harness, offset)
    # When the reconciler's recovery of the lapsed lease is cut short: its transaction applied
    # and its answer lost (or, for comparison, the new message's send refused by SQS)
    faults = AwsFaults()
    if fault == "recover-answer-lost":
        armed = faults.arm(FaultKind.APPLIED_LOST, "dynamodb.TransactWriteItems")
    else:
        armed = faults.arm(FaultKind.THROTTLE, "sqs.SendMessage")
    try:
        reconciler.run()
    finally:
        faults.disarm()
    assert faults.fired_for(armed)
    assert _status(harness, crashed)["status"] == "queued"  # its slot is back, either way
    # And the reconciler runs on, an hour of runs
    _an_hour_of_runs(harness, reconciler, offset)
    # Then the crashed job has a message to be run again by (first in line for the next run's
    # missing messages, either way; never left to a deficit the lane's depth hides)
    bodies = [json.loads(message["Body"])["job_id"] for message in harness.receive(url)]
    assert crashed in bodies, bodies


class _LambdaTimedOut(BaseException):
    """The reconciler's invocation killed at its timeout (nothing in the process runs on)."""


def test_a_recovered_job_whose_reconciler_run_was_cut_before_the_send_still_gets_a_message(
    harness: Harness,
) -> None:
    # Given the same crashed job and a lane whose depth equals its unfinished jobs
    url = harness.stack.lane_queue_urls["high"]
    crashed = _crashed_behind_a_matched_lane(harness)
    offset = [1.0]
    reconciler = _reconciler(harness, offset)
    # When the reconciler's invocation times out right after the recovery's transaction, before
    # the message is sent
    lanes = reconciler._sends._queues  # type: ignore[attr-defined]
    real_enqueue = lanes.enqueue_job

    def killed(job_id: str, *args: object, **kwargs: object) -> None:
        if job_id == crashed:
            lanes.enqueue_job = real_enqueue
            raise _LambdaTimedOut()
        real_enqueue(job_id, *args, **kwargs)

    lanes.enqueue_job = killed
    with pytest.raises(_LambdaTimedOut):
        reconciler.run()
    assert _status(harness, crashed)["status"] == "queued"
    # And the reconciler runs on, an hour of runs
    _an_hour_of_runs(harness, reconciler, offset)
    # Then the crashed job has a message to run again by (its entry was first in line)
    bodies = [json.loads(message["Body"])["job_id"] for message in harness.receive(url)]
    assert crashed in bodies, (crashed, bodies)
