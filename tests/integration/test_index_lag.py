"""llmq on indexes that lag their table, as DynamoDB's global secondary indexes do.

Every read of a GSI is eventually consistent ("DynamoDB read consistency",
https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html),
so the reconciler's sweep (by_sweep) and GET /v1/jobs (by_tenant) can see a job as it was a
moment ago. Here the indexes lag by 5 s on a clock the test moves (llmq_sandbox.moto_fidelity),
so the stale view is certain, not a race.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from llmq import aws
from llmq.jobs import JobRepository
from llmq.models import JobStatus
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.integration.harness import ENTERPRISE, Harness
from tests.support.index_lag import IndexClock, lagging_indexes_on_a_test_clock

LAG_SECONDS = 5.0


@pytest.fixture
def index_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[IndexClock]:
    with lagging_indexes_on_a_test_clock(monkeypatch, LAG_SECONDS) as clock:
        yield clock


class _Later:
    """Real time shifted forward: the reconciler sees the job as old as the test needs."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _reconciler(harness: Harness, clock: _Later) -> tuple[Reconciler, JobRepository]:
    stack = harness.stack
    jobs = JobRepository(stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock)
    queues = QueueRepository(stack.lane_queue_urls, stack.webhook_queue_url, sqs=aws.client("sqs"))
    return Reconciler(jobs, queues, harness.config), jobs


def _purge(harness: Harness, url: str) -> None:
    for message in harness.receive(url):
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def _job(harness: Harness, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    return body


def test_a_sweep_that_still_sees_a_finished_job_queued_past_its_deadline_does_not_expire_it(
    harness: Harness, index_clock: IndexClock, provider: FakeProviderServer
) -> None:
    # Given a job with a deadline, indexed as queued, that then succeeds
    job_id = harness.submit(deadline_seconds=5).body["id"]
    index_clock.now += 2 * LAG_SECONDS
    assert harness.drain("high") == {"batchItemFailures": []}
    finished = _job(harness, job_id)
    assert finished["status"] == "succeeded"
    # When the reconciler runs past the deadline while the sweep index still shows it queued
    later = _Later()
    later.offset = harness.config.reconciler.stale_queued_seconds + 10
    reconciler, jobs = _reconciler(harness, later)
    stale = [entry for entry in jobs.sweep(jobs.now_ms(), 100) if entry.job_id == job_id]
    assert [entry.status for entry in stale] == [JobStatus.QUEUED]
    report = reconciler.run()
    # Then the job is not expired: it keeps its result, and the provider was called once
    assert report.expired == []
    assert _job(harness, job_id) == finished
    assert provider.calls_for(job_id) == 1


def test_a_sweep_that_still_sees_a_finished_job_running_never_runs_it_again(
    harness: Harness, index_clock: IndexClock, provider: FakeProviderServer
) -> None:
    # Given a worker that claimed the job and died (the index shows it running, lease lapsed)
    lane_url = harness.stack.lane_queue_urls["high"]
    job_id = harness.submit().body["id"]
    _purge(harness, lane_url)
    crashed = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert crashed.claim(job_id, "dead-worker", lease_seconds=1).outcome.value == "claimed"
    index_clock.now += 2 * LAG_SECONDS
    # And another worker then took it over and finished it
    time.sleep(1.1)  # the lease is judged by the worker's real clock
    QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=harness.sqs
    ).enqueue_job(job_id, "high", crashed.find(job_id).tenant_id)  # type: ignore[union-attr]
    assert harness.drain("high") == {"batchItemFailures": []}
    finished = _job(harness, job_id)
    assert (finished["status"], finished["attempts"]) == ("succeeded", 2)
    # When the reconciler runs while the sweep index still shows it running
    later = _Later()
    later.offset = 1 + harness.config.reconciler.expired_lease_grace_seconds + 1
    reconciler, _ = _reconciler(harness, later)
    report = reconciler.run()
    # Then it reads the job itself before recovering it, and leaves a finished job alone:
    # nothing is sent, the job keeps its result and attempts, the provider is not called again
    assert report.recovered == []
    assert harness.total_count(lane_url) == 0
    assert _job(harness, job_id) == finished
    assert provider.calls_for(job_id) == 1
    assert harness.total_count(lane_url) == 0


def test_the_job_list_may_lag_a_submit_and_catches_up(harness: Harness, index_clock: IndexClock) -> None:
    """GET /v1/jobs reads the by_tenant index: a job just submitted may be missing for a
    moment (the documented lag), while GET /v1/jobs/{id} has it at once."""
    job_id = harness.submit().body["id"]
    listed = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE).body["data"]
    assert job_id not in [job["id"] for job in listed]
    assert _job(harness, job_id)["id"] == job_id
    index_clock.now += LAG_SECONDS + 0.1
    listed = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE).body["data"]
    assert [job["id"] for job in listed] == [job_id]
