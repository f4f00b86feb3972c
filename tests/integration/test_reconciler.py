"""The reconciler and redelivery: nothing a crash or a lost message leaves behind stays lost."""

from __future__ import annotations

import json
import time as _time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from botocore.exceptions import ClientError
from standardwebhooks.webhooks import Webhook

from llmq import aws
from llmq import jobs as jobs_module
from llmq.batches import BatchRepository
from llmq.errors import StoreUnavailable
from llmq.execution import mark_dead_letter
from llmq.job_index import sweep_partition, sweep_partitions
from llmq.jobs import JobRepository, SweepPass
from llmq.models import DeliveryStatus, ErrorCode, JobStatus
from llmq.policy import ClaimOutcome, retention_error
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler, ReconcileReport
from llmq.shares import ShareRepository, ShareState
from llmq.telemetry import MetricName
from llmq.tenants import TenantRepository
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from llmq_sandbox.doubles.receiver import WebhookReceiver
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import (
    ENTERPRISE,
    FREE,
    Harness,
    LambdaContextStub,
    emitted_metrics,
    load_handler,
    webhook_message,
)


class LaterClock:
    """Real time, shifted forward: the reconciler sees the job as old as the test needs."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset


@pytest.fixture
def clock() -> LaterClock:
    return LaterClock()


@pytest.fixture
def reconciler(harness: Harness, clock: LaterClock) -> Reconciler:
    stack = harness.stack
    return Reconciler(
        JobRepository(stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock),
        QueueRepository(stack.lane_queue_urls, stack.webhook_queue_url, sqs=aws.client("sqs")),
        harness.config,
    )


@pytest.fixture
def secret(harness: Harness) -> str:
    created = TenantRepository(harness.stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise", tenant_id="ten_acme"
    )
    return created.tenant.webhook_secrets[0]


def _dispatch_all(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("LLMQ_PUBLIC_API_URL", "http://127.0.0.1")
    dispatcher = load_handler("webhook_dispatcher")
    url = harness.stack.webhook_queue_url
    messages = harness.receive(url)
    assert messages, "no webhook message to dispatch"
    response: dict[str, Any] = dispatcher.handler(harness.sqs_event(url, messages), LambdaContextStub())
    failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
    for message in messages:
        if message["MessageId"] not in failed:
            harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return response


def _purge(harness: Harness, url: str) -> None:
    for message in harness.receive(url):
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def _count_writes() -> list[str]:
    calls: list[str] = []

    def count(event_name: str, **_: Any) -> None:
        operation = event_name.split(".")[-1]
        if operation in {"PutItem", "UpdateItem", "DeleteItem", "SendMessage"}:
            calls.append(operation)

    for service in ("dynamodb", "sqs"):
        aws.client(service).meta.events.register("before-call.*.*", count)
    return calls


def test_a_message_the_reconciler_sends_after_a_dead_letter_carries_its_round(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    """A queued job's message dead-lettered once, and the one sent again was lost: the
    reconciler's replacement is of the second round, so when it dead-letters too the job
    fails as crashed. Sent as of the first round, its letter would pass for a copy of an
    answered round, and the job would go round the DLQ and the reconciler for ever."""
    # Given a queued job whose message dead-lettered once, and its message sent again lost
    job_id = harness.submit().body["id"]
    url = harness.stack.lane_queue_urls["high"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    (submitted,) = harness.receive(url)
    harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=submitted["ReceiptHandle"])
    mark_dead_letter(jobs, queues, submitted["Body"], "dlq-message-1")
    _purge(harness, url)
    # When the reconciler finds the lane short of the job's message
    clock.offset = harness.config.reconciler.stale_queued_seconds + 1
    assert reconciler.run().requeued == [job_id]
    # Then its message is of the second round
    (replacement,) = harness.receive(url)
    assert json.loads(replacement["Body"])["redrive_round"] == 1
    # And when it dead-letters too, the job fails as crashed
    mark_dead_letter(jobs, queues, replacement["Body"], "dlq-message-2")
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")


def test_a_job_whose_enqueue_was_lost_is_enqueued_by_the_reconciler_and_completes_once(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, provider: FakeProviderServer
) -> None:
    # Given SendMessage fails right after the PutItem
    def lose_the_message(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "injected"}}, "SendMessage")

    sqs = aws.client("sqs")
    sqs.meta.events.register("before-call.sqs.SendMessage", lose_the_message, unique_id="lose")
    reply = harness.submit(prompt="lost in transit")
    sqs.meta.events.unregister("before-call.sqs.SendMessage", unique_id="lose")
    # Then the client still gets its 202, and nothing is queued
    assert reply.status == 202
    job_id = reply.body["id"]
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0
    # When the reconciler runs next: the job, known to have lost its message, is first in line
    report = reconciler.run()
    assert report.requeued == [job_id]
    # Then the job runs once and succeeds
    assert harness.drain("high") == {"batchItemFailures": []}
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "succeeded"
    assert provider.calls_for(job_id) == 1
    # And a later run finds nothing to do
    assert reconciler.run().examined == 0


def test_a_lost_enqueue_behind_a_backlog_gets_the_missing_message_not_the_backlogs_oldest(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given a backlog older than the staleness threshold (three jobs, each with its message)
    backlog = [harness.submit(prompt=f"waiting {n}").body["id"] for n in range(3)]
    # And a job whose message was lost (SendMessage failed after the PutItem)
    faults = AwsFaults()
    try:
        faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", times=1)
        lost = harness.submit(prompt="lost in transit").body["id"]
        assert faults.fired
    finally:
        faults.disarm()
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 3
    # When the reconciler runs, the backlog now stale
    clock.offset = harness.config.reconciler.stale_queued_seconds + 60
    report = reconciler.run()
    # Then the lane's one missing message goes to the job that lost it, not to the oldest job
    assert report.requeued == [lost]
    sent = [json.loads(m["Body"])["job_id"] for m in harness.receive(harness.stack.lane_queue_urls["high"])]
    assert sorted(sent) == sorted([*backlog, lost])


def test_a_lost_enqueue_replayed_with_its_key_never_creates_a_second_job(harness: Harness) -> None:
    sqs = aws.client("sqs")

    def fail(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "injected"}}, "SendMessage")

    sqs.meta.events.register("before-call.sqs.SendMessage", fail, unique_id="lose")
    first = harness.submit(key="retry-me", prompt="p")
    sqs.meta.events.unregister("before-call.sqs.SendMessage", unique_id="lose")
    second = harness.submit(key="retry-me", prompt="p")
    assert second.body["id"] == first.body["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    assert harness.item_count() == 1


def test_a_terminal_job_with_a_pending_webhook_gets_it_delivered_once(
    harness: Harness,
    reconciler: Reconciler,
    clock: LaterClock,
    receiver: WebhookReceiver,
    secret: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a job that succeeded, whose webhook message was lost
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    job_id = harness.submit(webhook={"url": hook}).body["id"]
    harness.drain("high")
    _purge(harness, harness.stack.webhook_queue_url)
    # When the reconciler runs after the webhook threshold
    clock.offset = harness.config.reconciler.stale_webhook_seconds + 1
    assert reconciler.run().webhooks == [job_id]
    # Then the dispatcher delivers it once, verified
    assert _dispatch_all(harness, monkeypatch) == {"batchItemFailures": []}
    delivered = receiver.requests_to("/hook")
    assert len(delivered) == 1
    payload = Webhook(secret).verify(delivered[0].body, delivered[0].headers)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job_id
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert job["webhook"]["delivery"]["status"] == "delivered"
    # And the reconciler has nothing left to do for it
    clock.offset += harness.config.reconciler.stale_webhook_seconds + 1
    assert reconciler.run().examined == 0


def test_a_reconciler_run_with_nothing_to_do_makes_no_write(harness: Harness, reconciler: Reconciler) -> None:
    harness.submit()
    harness.drain("high")
    writes = _count_writes()
    report = reconciler.run()
    assert report.examined == 0
    assert writes == []


def test_a_queued_job_past_its_deadline_is_expired_by_the_reconciler(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, provider: FakeProviderServer
) -> None:
    job_id = harness.submit(deadline_seconds=5).body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    assert reconciler.run().expired == [job_id]
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"]) == ("expired", "deadline_exceeded")
    assert provider.calls_for(job_id) == 0


def test_a_queued_job_past_its_deadline_found_only_after_its_retention_still_ends(
    harness: Harness,
    reconciler: Reconciler,
    clock: LaterClock,
    provider: FakeProviderServer,
    receiver: WebhookReceiver,
) -> None:
    # Given a queued job with a deadline whose message was lost, which the reconciler first
    # reaches after the job's retention ended (an outage; TTL has not deleted it yet)
    hooks = {"url": f"http://127.0.0.1:{receiver.port}/hooks"}
    job_id = harness.submit(deadline_seconds=60, webhook=hooks).body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    clock.offset = harness.config.retention_seconds + 60
    # When it runs, then the job ends expired and its tenant's quota comes back: once TTL
    # deleted the item, nothing could give it back
    assert reconciler.run().expired == [job_id]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    stored = jobs.find(job_id, past_retention=True)
    assert stored is not None and stored.status is JobStatus.EXPIRED
    assert _tenant_share(harness).active == 0
    assert {"job_id": job_id, "event": "job.expired"} in _terminal_events(harness)
    assert provider.calls_for(job_id) == 0


def test_a_lapsed_lease_is_recovered_before_the_lane_counts_are_read(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given a crashed worker's job and a stale queued job whose message was lost
    tenant = (ENTERPRISE["tenant_id"], "high")
    crashed_id = harness.submit().body["id"]
    stale_id = harness.submit().body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    crashed = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert crashed.claim(crashed_id, "dead-worker", 1, tenant).outcome is ClaimOutcome.CLAIMED
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    # And the counts of the lane's unfinished jobs (a read of the whole sweep index) fail
    recovered_first: list[bool] = []

    def counted(stop: Any = None) -> Any:
        recovered_first.append(_tenant_share(harness).running == 0)
        raise StoreUnavailable("throttled", retry_after=1)

    reconciler.jobs.count_unfinished = counted  # type: ignore[method-assign]
    # When the reconciler runs
    report = reconciler.run()
    # Then the lapsed lease was recovered (its slot back) before the counts were asked for,
    # and the stale queued job waits for the next run
    assert report.recovered == [crashed_id]
    assert recovered_first == [True]
    assert stale_id in report.waiting


def test_a_recovered_leases_new_message_does_not_hide_a_lost_one(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given a worker that took two jobs' messages and crashed on one (its message still in
    # flight), and the other job's message lost
    tenant = (ENTERPRISE["tenant_id"], "high")
    url = harness.stack.lane_queue_urls["high"]
    crashed_id = harness.submit().body["id"]
    lost_id = harness.submit().body["id"]
    for message in harness.receive(url, visibility=1800):
        if lost_id in message["Body"]:
            harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(crashed_id, "dead-worker", 1, tenant).outcome is ClaimOutcome.CLAIMED
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    # When the reconciler recovers the lease (sending the crashed job a message) and then
    # counts the lane's messages
    report = reconciler.run()
    # Then the lost job is sent its message too: the one the recovery sent is not taken for it
    assert report.recovered == [crashed_id]
    assert report.requeued == [lost_id]


def test_a_running_job_whose_worker_vanished_is_recovered(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, provider: FakeProviderServer
) -> None:
    # Given a worker that claimed the job and died, and its message was lost too
    job_id = harness.submit().body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    crashed = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert crashed.claim(job_id, "dead-worker", lease_seconds=1).outcome.value == "claimed"
    # When the reconciler runs long after the lease lapsed
    clock.offset = 1 + harness.config.reconciler.expired_lease_grace_seconds + 1
    assert reconciler.run().recovered == [job_id]
    # Then a worker takes the job over: attempt 2, succeeded, one provider call
    import time

    time.sleep(1.1)  # the lease itself is judged by the worker's real clock
    assert harness.drain("high") == {"batchItemFailures": []}
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    assert provider.calls_for(job_id) == 1


def _tenant_share(harness: Harness) -> ShareState:
    return ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )


def _terminal_events(harness: Harness) -> list[dict[str, Any]]:
    return [webhook_message(message) for message in harness.receive(harness.stack.webhook_queue_url)]


@pytest.mark.parametrize("late", [False, True], ids=["within-the-margin", "past-the-retention"])
def test_a_crashed_job_at_the_end_of_its_retention_ends_expired_and_gives_its_slot_back(
    harness: Harness,
    reconciler: Reconciler,
    clock: LaterClock,
    provider: FakeProviderServer,
    receiver: WebhookReceiver,
    late: bool,
) -> None:
    # Given a tenant capped at one job, whose slot a job (with a webhook) of a worker that died holds
    tenant = (ENTERPRISE["tenant_id"], "high")
    ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).set_limits(
        tenant[0], max_concurrency=1
    )
    job_id = harness.submit(webhook={"url": f"http://127.0.0.1:{receiver.port}/hooks"}).body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "dead-worker", 1, tenant).outcome is ClaimOutcome.CLAIMED
    # When the reconciler comes to it only as its retention runs out, or after it (the item
    # not yet deleted by DynamoDB's TTL, which would leave the slot and the quota counted)
    margin = harness.config.reconciler.retention_margin_seconds
    clock.offset = harness.config.retention_seconds + (60 if late else -margin // 2)
    report = reconciler.run()
    # Then the job ended expired, not run again, and gave back its slot and its quota
    assert (report.expired, report.recovered) == ([job_id], [])
    stored = jobs.find(job_id, past_retention=True)
    assert stored is not None and stored.status is JobStatus.EXPIRED
    assert stored.error is not None and stored.error.code is ErrorCode.DEADLINE_EXCEEDED
    share = _tenant_share(harness)
    assert (share.running, share.active) == (0, 0)
    # And its job.expired event went out; within the margin the item is kept for as long as
    # the event's retries take, and past its retention it is not brought back (its id may be
    # taken again: `test_a_stale_message_past_the_retention_leaves_the_key_free_for_a_new_job`)
    assert {"job_id": job_id, "event": "job.expired"} in _terminal_events(harness)
    kept = stored.expires_at >= clock() + sum(harness.config.webhooks.schedule_seconds)
    assert kept is not late
    # And the tenant's next job takes the slot
    other = harness.submit().body["id"]
    assert jobs.claim(other, "worker", 60, tenant).outcome is ClaimOutcome.CLAIMED
    assert provider.calls_for(job_id) == 0


def test_a_job_a_worker_ends_near_its_retention_is_kept_for_its_webhooks_retries(
    harness: Harness, clock: LaterClock, receiver: WebhookReceiver
) -> None:
    # Given a job a worker claimed a minute before the retention margin, by the store's clock
    # (a claim within the margin is refused: `test_a_claim_within_the_retention_margin_...`)
    tenant = (ENTERPRISE["tenant_id"], "high")
    job_id = harness.submit(webhook={"url": f"http://127.0.0.1:{receiver.port}/hooks"}).body["id"]
    margin = harness.config.reconciler.retention_margin_seconds
    clock.offset = harness.config.retention_seconds - margin - 60
    jobs = JobRepository(
        harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock
    )
    claimed = jobs.claim(job_id, "worker", 600, tenant)
    assert claimed.outcome is ClaimOutcome.CLAIMED and claimed.job is not None
    # When its generation ends a minute before the retention
    clock.offset += margin
    done = jobs.fail_leased(claimed.job, "worker", retention_error(claimed.job))
    # Then the item outlives its terminal event's retries: the dispatcher and a poll find it
    assert done.expires_at >= clock() + sum(harness.config.webhooks.schedule_seconds)
    stored = jobs.find(job_id)
    assert stored is not None and stored.status is JobStatus.FAILED
    assert _tenant_share(harness).active == 0


@pytest.mark.parametrize("late", [False, True], ids=["within-the-margin", "past-the-retention"])
def test_a_claim_within_the_retention_margin_is_refused_and_says_the_retention_is_due(
    harness: Harness, clock: LaterClock, late: bool
) -> None:
    # Given a queued job whose message comes only as its retention runs out (or after it)
    tenant = (ENTERPRISE["tenant_id"], "high")
    job_id = harness.submit().body["id"]
    margin = harness.config.reconciler.retention_margin_seconds
    clock.offset = harness.config.retention_seconds + (60 if late else -margin // 2)
    jobs = JobRepository(
        harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock
    )
    # When a worker claims it, then it is refused, not started: its retention is due
    claim = jobs.claim(job_id, "worker", 600, tenant)
    assert claim.outcome is ClaimOutcome.RETENTION_DUE and claim.job is not None
    assert _tenant_share(harness).running == 0
    # And the worker's write ends it expired, its quota given back
    expired = jobs.expire_at_retention(claim.job, retention_error(claim.job))
    assert expired is not None and expired.status is JobStatus.EXPIRED
    assert _tenant_share(harness).active == 0
    # And one past its retention keeps it: nothing comes back to life to stand in the way of
    # a job submitted again under its id
    assert (expired.expires_at > clock()) is not late


def test_a_crashed_job_asked_to_cancel_ends_canceled_at_the_end_of_its_retention(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, receiver: WebhookReceiver
) -> None:
    # Given a job whose worker died after its client asked to cancel it
    tenant = (ENTERPRISE["tenant_id"], "high")
    job_id = harness.submit(webhook={"url": f"http://127.0.0.1:{receiver.port}/hooks"}).body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "dead-worker", 1, tenant).outcome is ClaimOutcome.CLAIMED
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 202
    # When the reconciler comes to it only as its retention runs out
    clock.offset = harness.config.retention_seconds - harness.config.reconciler.retention_margin_seconds // 2
    report = reconciler.run()
    # Then it ends as its client asked, canceled, and gives back its slot and quota
    assert (report.canceled, report.expired) == ([job_id], [])
    assert jobs.find(job_id, past_retention=True).status is JobStatus.CANCELED  # type: ignore[union-attr]
    share = _tenant_share(harness)
    assert (share.running, share.active) == (0, 0)
    assert {"job_id": job_id, "event": "job.canceled"} in _terminal_events(harness)


def test_a_queued_job_ends_expired_only_as_its_retention_runs_out_and_frees_its_quota(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, receiver: WebhookReceiver
) -> None:
    # Given a queued job (with a webhook) that waits, counted active on its tenant's share
    job_id = harness.submit(webhook={"url": f"http://127.0.0.1:{receiver.port}/hooks"}).body["id"]
    assert _tenant_share(harness).active == 1
    # When the reconciler looks at it while it is merely stale, it is only looked at later
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    assert reconciler.run().expired == []
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "queued"
    # When it looks as the retention runs out
    clock.offset = harness.config.retention_seconds - harness.config.reconciler.retention_margin_seconds // 2
    assert reconciler.run().expired == [job_id]
    # Then it ended expired, its quota given back, and its terminal event went out
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"]) == ("expired", "deadline_exceeded")
    assert _tenant_share(harness).active == 0
    assert {"job_id": job_id, "event": "job.expired"} in _terminal_events(harness)


def _past_its_retention(harness: Harness, job_id: str) -> None:
    """The job's retention ended a minute ago, its item not yet deleted by DynamoDB's TTL."""
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET expires_at = :at",
        ExpressionAttributeValues={":at": {"N": str(int(_time.time()) - 60)}},
    )


@pytest.mark.parametrize("body", ["same", "another"])
def test_a_key_reused_over_a_job_the_reconciler_never_ended_ends_it_and_frees_its_quota(
    harness: Harness, provider: FakeProviderServer, body: str
) -> None:
    # Given a job under an Idempotency-Key still queued past its retention: the reconciler,
    # which ends such a job, was down all that time
    first = harness.submit(key="weekly-report", prompt="last week")
    assert first.status == 202 and _tenant_share(harness).active == 1
    _past_its_retention(harness, first.body["id"])
    # When the client uses the key again, as the retention allows
    again = harness.submit(key="weekly-report", prompt="last week" if body == "same" else "this week")
    # Then it is a new job, and the old one ended and gave its quota back, not held for good
    assert again.status == 202 and "idempotent-replayed" not in again.headers
    assert again.body["id"] == first.body["id"] and again.body["status"] == "queued"
    assert _tenant_share(harness).active == 1
    # and the new job runs once, whichever of the two messages comes first
    harness.drain("high")
    assert provider.calls_for(again.body["id"]) == 1
    assert harness.api("GET", f"/v1/jobs/{again.body['id']}", tenant=ENTERPRISE).body["status"] == "succeeded"
    assert (_tenant_share(harness).active, _tenant_share(harness).running) == (0, 0)


@pytest.mark.parametrize("prompt", ["short", "stored apart"])
def test_a_key_reused_at_the_quota_over_the_job_the_reconciler_never_ended_is_accepted(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch, prompt: str
) -> None:
    # Given a tenant at its quota of one, held by a job under an Idempotency-Key still queued
    # past its retention (the reconciler down), and a prompt that is, or is not, stored in S3
    limits = {"max_item_payload_bytes": 1024, "max_prompt_chars": 50_000, "max_body_bytes": 200_000}
    harness = Harness(
        moto_stack,
        integration_config(provider, **({} if prompt == "short" else {"limits": limits})),
        monkeypatch,
    )
    text = "hello" if prompt == "short" else "lorem ipsum " * 400
    ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).set_limits(
        ENTERPRISE["tenant_id"], max_active_jobs=1
    )
    first = harness.submit(key="weekly", prompt=text)
    assert first.status == 202, first.body
    _past_its_retention(harness, first.body["id"])
    # When the key is used again
    again = harness.submit(key="weekly", prompt=text)
    # Then the old job ends first, and the quota it held takes the new one (review 234: the
    # input stored apart looked at the quota before the old job was ended: a 429)
    assert again.status == 202, again.body
    assert "idempotent-replayed" not in again.headers
    assert _tenant_share(harness).active == 1


def test_a_key_reused_over_a_job_a_live_worker_holds_past_its_retention_is_a_503(harness: Harness) -> None:
    # Given a job under an Idempotency-Key running past its retention with a live lease
    first = harness.submit(key="weekly-report", prompt="last week")
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": first.body["id"]}},
        UpdateExpression="SET #st = :running, lease_expires_ms = :later",
        ExpressionAttributeNames={"#st": "status"},
        ExpressionAttributeValues={
            ":running": {"S": "running"},
            ":later": {"N": str(int(_time.time() * 1000) + 600_000)},
        },
    )
    _past_its_retention(harness, first.body["id"])
    before = aws.client("dynamodb").get_item(
        TableName=harness.stack.jobs_table, Key={"pk": {"S": first.body["id"]}}
    )
    # When the key is used again
    again = harness.submit(key="weekly-report", prompt="this week")
    # Then the client is told to come back (its worker's job is neither overwritten nor ended)
    assert again.status == 503 and int(again.headers["retry-after"]) > 0
    assert again.body["code"] == "service_unavailable"
    after = aws.client("dynamodb").get_item(
        TableName=harness.stack.jobs_table, Key={"pk": {"S": first.body["id"]}}
    )
    assert after["Item"] == before["Item"]
    assert _tenant_share(harness).active == 1


def test_redeliver_queues_the_terminal_event_again(
    harness: Harness, receiver: WebhookReceiver, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    job_id = harness.submit(webhook={"url": hook}).body["id"]
    harness.drain("high")
    _dispatch_all(harness, monkeypatch)
    # When the integrator asks for the webhook again
    reply = harness.api("POST", f"/v1/jobs/{job_id}/webhook/redeliver", tenant=ENTERPRISE)
    assert reply.status == 202
    assert reply.body["webhook"]["delivery"]["status"] == "pending"
    received = harness.receive(harness.stack.webhook_queue_url, visibility=0)
    assert [webhook_message(m) for m in received] == [
        {"job_id": job_id, "event": "job.succeeded", "delivery_round": 1}
    ]
    # (its round in a message attribute: the body is what a dispatcher before rounds reads, which
    # refuses a field it does not know)
    assert [json.loads(m["Body"]) for m in received] == [{"job_id": job_id, "event": "job.succeeded"}]
    _dispatch_all(harness, monkeypatch)
    # Then it arrives a second time with the same webhook-id, freshly signed
    first, second = receiver.requests_to("/hook")
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert Webhook(secret).verify(second.body, second.headers)["data"]["id"] == job_id


@pytest.mark.parametrize("read", ["answered", "throttled"])
def test_a_lost_redelivery_message_is_sent_again_in_its_round(
    harness: Harness,
    reconciler: Reconciler,
    clock: LaterClock,
    receiver: WebhookReceiver,
    secret: str,
    monkeypatch: pytest.MonkeyPatch,
    read: str,
) -> None:
    """The dispatcher drops a message of a round before the job's latest redelivery (hunt 211):
    the reconciler's resend of a lost redelivery message must carry the job's round, or it
    would be dropped at every resend, and the redelivery never made. Its read of the job for
    the round, throttled past botocore's retries, sends nothing that run and leaves the job
    due for the next."""
    # Given a delivered job whose redelivery's message was lost
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    job_id = harness.submit(webhook={"url": hook}).body["id"]
    harness.drain("high")
    _dispatch_all(harness, monkeypatch)
    assert harness.api("POST", f"/v1/jobs/{job_id}/webhook/redeliver", tenant=ENTERPRISE).status == 202
    _purge(harness, harness.stack.webhook_queue_url)
    # When the reconciler runs after the webhook threshold
    clock.offset = harness.config.reconciler.stale_webhook_seconds + 1
    if read == "throttled":
        faults = AwsFaults()
        faults.arm(FaultKind.THROTTLE, "dynamodb.GetItem", times=1)
        try:
            assert reconciler.run().webhooks == []
        finally:
            faults.disarm()
        assert len(faults.fired) == 1
        assert harness.total_count(harness.stack.webhook_queue_url) == 0
    assert reconciler.run().webhooks == [job_id]
    # Then its message carries the redelivery's round, and the event is delivered again
    messages = [webhook_message(m) for m in harness.receive(harness.stack.webhook_queue_url, visibility=0)]
    assert messages == [{"job_id": job_id, "event": "job.succeeded", "delivery_round": 1}]
    assert _dispatch_all(harness, monkeypatch) == {"batchItemFailures": []}
    _, again = receiver.requests_to("/hook")
    assert Webhook(secret).verify(again.body, again.headers)["data"]["id"] == job_id
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["webhook"]["delivery"]["status"], job["webhook"]["delivery"]["attempts"]) == ("delivered", 1)


def test_redeliver_is_409_before_the_end_and_404_for_another_tenant(harness: Harness) -> None:
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/h"}).body["id"]
    early = harness.api("POST", f"/v1/jobs/{job_id}/webhook/redeliver", tenant=ENTERPRISE)
    assert (early.status, early.code) == (409, "job_not_terminal")
    foreign = harness.api("POST", f"/v1/jobs/{job_id}/webhook/redeliver", tenant=FREE)
    assert (foreign.status, foreign.code) == (404, "job_not_found")
    assert harness.total_count(harness.stack.webhook_queue_url) == 0


# ---- what the reconciler finds with no live worker honours a cancel ------------------------------


@pytest.mark.parametrize("attempts_left", [True, False], ids=["attempts-left", "last-attempt"])
def test_a_crashed_job_asked_to_cancel_ends_canceled_not_run_again_nor_failed(
    harness: Harness,
    reconciler: Reconciler,
    clock: LaterClock,
    provider: FakeProviderServer,
    receiver: WebhookReceiver,
    attempts_left: bool,
) -> None:
    # Given a job whose client asked to cancel it while it ran, and whose worker then died
    # (with attempts left, or on its last one)
    tenant = (ENTERPRISE["tenant_id"], "high")
    job_id = harness.submit(webhook={"url": f"http://127.0.0.1:{receiver.port}/hooks"}).body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    crashes = 1 if attempts_left else harness.config.max_attempts
    for n in range(crashes):
        lease = 600 if n == crashes - 1 else 0.001
        if n:
            import time

            time.sleep(0.01)
        assert jobs.claim(job_id, f"dead-{n}", lease, tenant).outcome is ClaimOutcome.CLAIMED
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 202
    # When the reconciler runs after its lease lapsed
    clock.offset = 600 + harness.config.reconciler.expired_lease_grace_seconds + 1
    report = reconciler.run()
    # Then it ends as its client asked: canceled, announced as such, its slot and quota back,
    # never sent to the provider again
    assert (report.canceled, report.recovered) == ([job_id], [])
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert job["status"] == "canceled"
    assert {"job_id": job_id, "event": "job.canceled"} in _terminal_events(harness)
    share = _tenant_share(harness)
    assert (share.running, share.active) == (0, 0)
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0
    assert provider.calls_for(job_id) == 0


def test_a_queued_job_asked_to_cancel_whose_deadline_passed_ends_canceled_not_expired(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, receiver: WebhookReceiver
) -> None:
    # Given a job with a deadline, asked to cancel while it ran, put back in the queue after
    # its worker died (the cancel still to be honoured by its next claim)
    tenant = (ENTERPRISE["tenant_id"], "high")
    hooks = {"url": f"http://127.0.0.1:{receiver.port}/hooks"}
    job_id = harness.submit(deadline_seconds=60, webhook=hooks).body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claimed = jobs.claim(job_id, "dead-worker", 0.001, tenant)
    assert claimed.outcome is ClaimOutcome.CLAIMED and claimed.job is not None
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 202
    import time

    time.sleep(0.01)
    found = jobs.find(job_id)
    assert found is not None and jobs.recover(found) is not None
    _purge(harness, harness.stack.lane_queue_urls["high"])
    # When the reconciler comes to it after its deadline
    clock.offset = harness.config.reconciler.stale_queued_seconds + 61
    report = reconciler.run()
    # Then it ends canceled, as asked, not expired
    assert (report.canceled, report.expired) == ([job_id], [])
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "canceled"
    assert {"job_id": job_id, "event": "job.canceled"} in _terminal_events(harness)


# ---- the sweep's bookkeeping never delays a crash's recovery -------------------------------------


def test_a_job_claimed_while_the_reconciler_ran_keeps_its_leases_sweep_time(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given a stale queued job, claimed by a worker with a short lease between the sweep's read
    # and the reconciler's postponing of it; that worker then dies
    tenant = (ENTERPRISE["tenant_id"], "high")
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    postpone = reconciler.jobs.postpone_sweep

    def claimed_meanwhile(*args: Any, **kwargs: Any) -> bool:
        assert jobs.claim(job_id, "worker-late", 20, tenant).outcome is ClaimOutcome.CLAIMED
        return postpone(*args, **kwargs)

    reconciler.jobs.postpone_sweep = claimed_meanwhile  # type: ignore[method-assign]
    clock.offset = harness.config.reconciler.stale_queued_seconds + 1
    assert reconciler.run().waiting == [job_id]
    reconciler.jobs.postpone_sweep = postpone  # type: ignore[method-assign]
    # When the reconciler runs once the lease (20 s) and its grace have passed
    clock.offset += 20 + harness.config.reconciler.expired_lease_grace_seconds + 1
    report = reconciler.run()
    # Then the crashed attempt is recovered then, its slot given back: not a period later
    assert report.recovered == [job_id]
    assert _tenant_share(harness).running == 0


def test_a_job_the_reconciler_cannot_settle_does_not_stop_the_run_and_is_counted_as_a_fault(
    harness: Harness,
    reconciler: Reconciler,
    clock: LaterClock,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given two crashed jobs, one of them of a lane this deployment no longer has
    tenant = (ENTERPRISE["tenant_id"], "high")
    crashed, orphan = harness.submit().body["id"], harness.submit().body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    for job_id in (orphan, crashed):
        assert jobs.claim(job_id, "dead-worker", 1, tenant).outcome is ClaimOutcome.CLAIMED
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": orphan}},
        UpdateExpression="SET lane = :retired",
        ExpressionAttributeValues={":retired": {"S": "retired"}},
    )
    # When the reconciler runs after the leases lapsed
    clock.offset = 1 + harness.config.reconciler.expired_lease_grace_seconds + 1
    capsys.readouterr()
    report = reconciler.run()
    # Then the other crashed job is recovered all the same, and the orphan is left
    assert (report.recovered, report.skipped) == ([crashed], [orphan])
    assert harness.api("GET", f"/v1/jobs/{crashed}", tenant=ENTERPRISE).body["status"] == "queued"
    # And counted as a handled fault, which has an alarm (the run itself raised nothing), with
    # the error's class in the log and never its text
    out = capsys.readouterr().out
    (record,) = emitted_metrics(out, MetricName.RECONCILE_ENTRY_FAILED)
    assert record[MetricName.RECONCILE_ENTRY_FAILED] == [1.0]
    (logged,) = [record for record in caplog.records if record.getMessage().startswith("not settled")]
    assert (logged.what, logged.error_class) == (orphan, "KeyError")  # type: ignore[attr-defined]
    assert not [name for name, value in vars(logged).items() if "retired" in str(value)]


def test_the_lapsed_leases_behind_a_long_backlog_of_stale_queued_jobs_are_read_in_one_request(
    harness: Harness,
) -> None:
    # Given one sweep partition holding 250 stale queued jobs, due first, and a lapsed lease
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    partition = sweep_partitions(harness.config.reconciler.sweep_shards)[1]
    now = jobs.now_ms()
    entries = [("queued", f"job_stale{n:04d}", now - 600_000 + n) for n in range(250)]
    entries.append(("running", "job_crashed", now - 1_000))
    client = aws.client("dynamodb")
    for start in range(0, len(entries), 25):
        client.batch_write_item(
            RequestItems={
                harness.stack.jobs_table: [
                    {
                        "PutRequest": {
                            "Item": {
                                "pk": {"S": job_id},
                                "status": {"S": status},
                                "lane": {"S": "high"},
                                "sweep_pk": {"S": partition},
                                "sweep_at": {"N": str(due)},
                            }
                        }
                    }
                    for status, job_id, due in entries[start : start + 25]
                ]
            }
        )
    queries: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if params.get("IndexName") and params["ExpressionAttributeValues"][":p"]["S"] == partition:
            queries.append(partition)

    client.meta.events.register("provide-client-params.dynamodb.Query", record)
    try:
        # When the reconciler's first pass looks for lapsed leases
        found = list(jobs.sweep(now, harness.config.reconciler.max_items_per_run, SweepPass.LAPSED))
    finally:
        client.meta.events.unregister("provide-client-params.dynamodb.Query", record)
    # Then it finds the crashed job, reading that partition's 251 due entries in one request
    assert [entry.job_id for entry in found] == ["job_crashed"]
    assert len(queries) == 1


def _crashed_job(harness: Harness) -> str:
    """A job whose worker claimed it (a lease of 1 s) and died, its message gone with it."""
    crashed: str = harness.submit().body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(crashed, "dead-worker", 1, (ENTERPRISE["tenant_id"], "high")).claimed
    return crashed


def test_a_shard_of_the_sweep_throttled_past_its_retries_does_not_hide_the_others(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a crashed job, and the sweep's first query (of its first shard, which holds no new
    # job: the run starts from the first shard here, not from a random one) throttled past
    # botocore's retries (the fault is the throttle the caller finally sees)
    crashed = _crashed_job(harness)
    partitions = sweep_partitions(harness.config.reconciler.sweep_shards)
    assert sweep_partition(crashed, harness.config.reconciler.sweep_shards) != partitions[0]
    monkeypatch.setattr(jobs_module.random, "randrange", lambda _: 0)
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "dynamodb.Query", times=1)
    clock.offset = 1 + harness.config.reconciler.expired_lease_grace_seconds + 1
    try:
        # When the reconciler runs after the lease lapsed
        report = reconciler.run()
    finally:
        faults.disarm()
    # Then the crashed job is recovered all the same
    assert len(faults.fired) == 1
    assert report.recovered == [crashed], report.as_log()


def test_an_index_entry_this_version_cannot_read_is_skipped_and_counted_not_a_stop(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a crashed job, and a due index entry in a status a newer version wrote (read by
    # this one after a rollback)
    crashed = _crashed_job(harness)
    aws.client("dynamodb").put_item(
        TableName=harness.stack.jobs_table,
        Item={
            "pk": {"S": "job_from_the_future"},
            "status": {"S": "paused"},
            "lane": {"S": "high"},
            "sweep_pk": {"S": sweep_partition("job_from_the_future", harness.config.reconciler.sweep_shards)},
            "sweep_at": {"N": "1"},
        },
    )
    # When the reconciler runs after the lease lapsed
    clock.offset = 1 + harness.config.reconciler.expired_lease_grace_seconds + 1
    capsys.readouterr()
    report = reconciler.run()
    # Then the crashed job is recovered all the same, and the unreadable entry is a fault
    assert report.recovered == [crashed], report.as_log()
    assert "job_from_the_future" not in report.skipped + report.waiting
    (record,) = emitted_metrics(capsys.readouterr().out, MetricName.RECONCILE_ENTRY_FAILED)
    assert record[MetricName.RECONCILE_ENTRY_FAILED] == [1.0]


def test_a_resent_webhook_whose_delivery_was_attempted_meanwhile_waits_for_that_attempts_next(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given a job that succeeded, whose webhook message was lost
    job_id = _succeeded_with_its_webhook_message_lost(harness)
    later = JobRepository(
        harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock
    )

    def attempted_meanwhile(**_: Any) -> None:
        # A copy of the message the dispatcher got after all, as the reconciler resends
        _attempt_failed_for_two_hours(later, job_id)

    sqs = aws.client("sqs")
    sqs.meta.events.register_first("before-call.sqs.SendMessage", attempted_meanwhile)
    clock.offset = harness.config.reconciler.stale_webhook_seconds + 1
    assert reconciler.run().webhooks == [job_id]
    sqs.meta.events.unregister("before-call.sqs.SendMessage", attempted_meanwhile)
    # When the reconciler runs again after its webhook threshold, the next attempt not yet due
    clock.offset += harness.config.reconciler.stale_webhook_seconds + 1
    # Then it sends no third copy: one would POST the next attempt twice
    assert reconciler.run().webhooks == []
    # And once that attempt is long overdue, it does
    clock.offset += 7200
    assert reconciler.run().webhooks == [job_id]


@pytest.mark.parametrize(
    ("attempted", "resent"), [(True, 0), (False, 1)], ids=["attempted", "never attempted"]
)
def test_a_dead_letter_of_an_ended_job_sends_its_event_again_only_if_it_may_be_lost(
    harness: Harness, attempted: bool, resent: int
) -> None:
    # Given a job that succeeded a while ago, whose webhook delivery was attempted (its
    # message hidden for a two-hour backoff) or never was (its message lost)
    job_id = _succeeded_with_its_webhook_message_lost(harness)
    if attempted:
        jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
        _attempt_failed_for_two_hours(jobs, job_id)
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET finished_ms = finished_ms - :hour",
        ExpressionAttributeValues={":hour": {"N": "3600000"}},
    )
    # When a stale copy of its lane message exhausts its receives
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    queues.enqueue_job(job_id, "high", ENTERPRISE["tenant_id"])
    harness.dead_letter("high", harness.receive(harness.stack.lane_queue_urls["high"]))
    # Then the event is sent again only when it may have been lost: a second message beside
    # the attempted delivery's would POST its next attempt twice
    webhooks = [webhook_message(m) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert webhooks == [{"job_id": job_id, "event": "job.succeeded"}] * resent


def test_a_cancel_accepted_as_the_reconciler_fails_a_crashed_job_ends_it_canceled(harness: Harness) -> None:
    # Given a job whose workers crashed on each of its 3 attempts (its last lease lapsed)
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    for n in range(harness.config.max_attempts):
        assert jobs.claim(job_id, f"vanished-{n}", lease_seconds=-1).outcome is ClaimOutcome.CLAIMED
    harness.receive(harness.stack.lane_queue_urls["high"])
    later = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: _time.time() + harness.config.reconciler.expired_lease_grace_seconds + 60,
    )
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    # When the client cancels it just after the reconciler read it
    with _cancel_before_the_next_transaction(harness, job_id) as replies:
        report = Reconciler(later, queues, harness.config).run()
    assert replies == [202]
    # Then the cancel, accepted, is honoured: no call was in flight
    _ended_canceled_as_asked(harness, job_id)
    assert (report.recovered, report.canceled) == ([], [job_id])


def test_a_cancel_accepted_as_the_dead_letter_function_fails_a_crashed_job_ends_it_canceled(
    harness: Harness,
) -> None:
    # Given a running job whose worker vanished (its lease lapsed), its message dead-lettered
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "vanished-worker", lease_seconds=-1).outcome is ClaimOutcome.CLAIMED
    harness.receive(harness.stack.lane_queue_urls["high"])
    dlq = harness.stack.lane_dlq_urls["high"]
    harness.sqs.send_message(QueueUrl=dlq, MessageBody=json.dumps({"job_id": job_id, "lane": "high"}))
    messages = harness.receive(dlq)
    handler = load_handler("dead_letter")
    # When the client cancels it just after the dead-letter function read it
    with _cancel_before_the_next_transaction(harness, job_id) as replies:
        handler.handler(harness.sqs_event(dlq, messages), LambdaContextStub())
    assert replies == [202]
    # Then it ends canceled, as a dead-lettered job asked to cancel does
    _ended_canceled_as_asked(harness, job_id)


def test_a_cancel_only_flagged_as_the_reconciler_expires_a_job_queued_again_ends_it_canceled(
    harness: Harness,
) -> None:
    # Given a job with a deadline that ran once (its worker died, the job queued again), found
    # by the reconciler past its deadline
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}, deadline_seconds=60).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "vanished-worker", lease_seconds=-1).outcome is ClaimOutcome.CLAIMED
    found = jobs.find(job_id)
    assert found is not None and jobs.recover(found) is not None
    _purge(harness, harness.stack.lane_queue_urls["high"])
    later = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: _time.time() + 120,
    )
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    # When the client cancels it just after the reconciler read it, while S3 cannot say whether
    # its attempt parked a result: the cancel is then asked (202), not done
    faults = AwsFaults()
    faults.arm("throttle", "s3.HeadObject", times=50)
    try:
        with _cancel_before_the_next_transaction(harness, job_id) as replies:
            report = Reconciler(later, queues, harness.config).run()
    finally:
        faults.disarm()
    assert replies == [202] and faults.fired
    # Then the expiry does not write over the cancel the client was told was taken
    _ended_canceled_as_asked(harness, job_id)
    assert (report.canceled, report.expired) == ([job_id], [])


@contextmanager
def _cancel_before_the_next_transaction(harness: Harness, job_id: str) -> Iterator[list[int]]:
    """The client's cancel of `job_id`, made as the first DynamoDB transaction inside the block
    is about to be sent: the statuses it was answered (one)."""
    replies: list[int] = []

    def cancel_now(**_: Any) -> None:
        if not replies:
            replies.append(harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status)

    ddb = aws.client("dynamodb")
    ddb.meta.events.register("before-call.dynamodb.TransactWriteItems", cancel_now)
    try:
        yield replies
    finally:
        ddb.meta.events.unregister("before-call.dynamodb.TransactWriteItems", cancel_now)


def _ended_canceled_as_asked(harness: Harness, job_id: str) -> None:
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    events = [webhook_message(m)["event"] for m in harness.receive(harness.stack.webhook_queue_url)]
    assert (job["status"], job["cancel_requested"], events) == ("canceled", True, ["job.canceled"])


def _succeeded_with_its_webhook_message_lost(harness: Harness) -> str:
    job_id: str = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    harness.drain("high")
    _purge(harness, harness.stack.webhook_queue_url)
    return job_id


def _attempt_failed_for_two_hours(jobs: JobRepository, job_id: str) -> None:
    """A delivery attempt of the job's event that failed, its next due in two hours (a
    receiver's Retry-After)."""
    jobs.record_delivery(
        job_id, DeliveryStatus.PENDING, 503, next_attempt_in_seconds=7200, previous_attempts=0
    )


# ---- a queued job's deadline --------------------------------------------------------------------


@pytest.mark.parametrize("waiting", ["deferred-at-its-cap", "behind-the-lane"])
def test_a_queued_job_ends_expired_at_its_deadline_however_long_its_message_is_away(
    harness: Harness,
    reconciler: Reconciler,
    clock: LaterClock,
    provider: FakeProviderServer,
    waiting: str,
) -> None:
    # Given a job with a 60 s deadline whose message is away for longer than that: deferred at
    # its tenant's cap (a copy that comes back when the backlog's drain says), or still behind
    # the lane's backlog (its message not yet received)
    url = harness.stack.lane_queue_urls["high"]
    job_id = harness.submit(deadline_seconds=60).body["id"]
    if waiting == "deferred-at-its-cap":
        ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).set_limits(
            ENTERPRISE["tenant_id"], max_concurrency=1
        )
        jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
        busy = harness.submit().body["id"]
        assert jobs.claim(busy, "busy", 600).outcome is ClaimOutcome.CLAIMED
        messages = harness.receive(url)
        harness.run_worker(url, [m for m in messages if job_id in m["Body"]])
        assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "queued"
    # When the reconciler runs just after the deadline, well before the job would be stale
    clock.offset = 61
    assert clock.offset < harness.config.reconciler.stale_queued_seconds
    report = reconciler.run()
    # Then the job ended expired then, with its event, and never reached the provider
    assert report.expired == [job_id]
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"]) == ("expired", "deadline_exceeded")
    assert provider.calls_for(job_id) == 0


def _submitted_with_its_message_lost(harness: Harness) -> str:
    """A job whose lane message SQS refused at accept: known lost, first for the sweep."""
    faults = AwsFaults()
    fault = faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", times=1)
    try:
        job_id: str = harness.submit().body["id"]
    finally:
        faults.disarm()
    assert faults.fired_for(fault)
    return job_id


def test_a_job_whose_message_is_known_lost_gets_one_though_the_lanes_depth_hides_the_loss(
    harness: Harness, reconciler: Reconciler
) -> None:
    # Given a job whose lane message SQS refused at accept (known lost: first for the sweep),
    # and another job of the lane with a second message on its way (a deferred record's
    # original, acknowledged only with its whole batch; a copy sent twice), so that the lane's
    # depth equals its unfinished jobs
    url = harness.stack.lane_queue_urls["high"]
    other = harness.submit().body["id"]
    lost = _submitted_with_its_message_lost(harness)
    QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    ).enqueue_job(other, "high", ENTERPRISE["tenant_id"])
    assert harness.total_count(url) == 2
    # When the reconciler runs
    report = reconciler.run()
    # Then the lost job got its message; the other, not yet stale, was left alone
    assert report.requeued == [lost]
    bodies = [json.loads(message["Body"])["job_id"] for message in harness.receive(url)]
    assert sorted(bodies) == sorted([other, other, lost])


def test_a_known_lost_job_of_a_lane_no_longer_deployed_still_ends_at_its_retention(harness: Harness) -> None:
    # Given a job whose lane message SQS refused at accept (known lost: first for the sweep)
    lost = _submitted_with_its_message_lost(harness)
    # And a deploy that since removed its lane, and a reconciler that first comes to it within
    # its retention margin
    offset = harness.config.retention_seconds - harness.config.reconciler.retention_margin_seconds // 2
    jobs = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: _time.time() + offset,
    )
    lanes = {lane: url for lane, url in harness.stack.lane_queue_urls.items() if lane != "high"}
    queues = QueueRepository(lanes, harness.stack.webhook_queue_url, sqs=aws.client("sqs"))
    # When the reconciler runs
    report = Reconciler(jobs, queues, harness.config).run()
    # Then the job ended expired at its retention (its quota given back), as its lane's other
    # jobs do, rather than failing its send in every run until TTL deletes it still counted
    stored = jobs.find(lost, past_retention=True)
    assert stored is not None and stored.status is JobStatus.EXPIRED, report
    assert _tenant_share(harness).active == 0


class _Budget:
    """An invocation's time left: `first` seconds as the run starts, less `per_write` at each
    write the run makes to the jobs table (the reads take no time)."""

    def __init__(self, first: float, per_write: float) -> None:
        self.left, self.per_write = first, per_write

    def __call__(self) -> float:
        return self.left

    def _spend(self, **_: Any) -> None:
        self.left -= self.per_write

    @contextmanager
    def spent_by_writes(self) -> Iterator[_Budget]:
        client = aws.client("dynamodb")
        events = [f"provide-client-params.dynamodb.{name}" for name in ("TransactWriteItems", "UpdateItem")]
        for event in events:
            client.meta.events.register(event, self._spend)
        try:
            yield self
        finally:
            for event in events:
                client.meta.events.unregister(event, self._spend)


def test_a_run_whose_time_runs_out_leaves_the_rest_due_for_the_next_and_raises_nothing(
    harness: Harness,
    reconciler: Reconciler,
    clock: LaterClock,
    provider: FakeProviderServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given five queued jobs past their deadline, their messages lost
    job_ids = {harness.submit(deadline_seconds=5).body["id"] for _ in range(5)}
    _purge(harness, harness.stack.lane_queue_urls["high"])
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    # When a run's invocation has time for two of them
    capsys.readouterr()
    with _Budget(first=10.0, per_write=4.5).spent_by_writes() as budget:
        first = reconciler.run(remaining_seconds=budget)
    # Then it settled two, left three due (and did not read the stale queued jobs' pass), ended
    # normally, and counted what it left (an alarm watches that count)
    assert (first.examined, len(first.expired), first.left, first.unread_passes) == (2, 2, 3, 1)
    (record,) = emitted_metrics(capsys.readouterr().out, MetricName.RECONCILE_LEFT)
    assert record[MetricName.RECONCILE_LEFT] == [3.0]
    # And the next run, with time enough, settles the rest: every job ends expired, once
    second = reconciler.run(remaining_seconds=lambda: 60.0)
    assert (second.examined, second.left) == (3, 0)
    assert not emitted_metrics(capsys.readouterr().out, MetricName.RECONCILE_LEFT)
    assert set(first.expired) | set(second.expired) == job_ids
    assert not set(first.expired) & set(second.expired)
    for job_id in job_ids:
        job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
        assert (job["status"], job["error"]["code"]) == ("expired", "deadline_exceeded")
        assert provider.calls_for(job_id) == 0


def test_a_run_with_almost_no_time_still_settles_one_entry_the_lapsed_leases_first(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given two crashed jobs (their leases lapsed) and two queued jobs past their deadline
    tenant = (ENTERPRISE["tenant_id"], "high")
    crashed = [harness.submit().body["id"] for _ in range(2)]
    late = [harness.submit(deadline_seconds=5).body["id"] for _ in range(2)]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    for job_id in crashed:
        assert jobs.claim(job_id, "dead-worker", 1, tenant).outcome is ClaimOutcome.CLAIMED
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    # When the run's first write takes almost all of its invocation (10 s as it starts, 1 s after)
    with _Budget(first=10.0, per_write=9.0).spent_by_writes() as budget:
        report = reconciler.run(remaining_seconds=budget)
    # Then it still settled one entry, a lapsed lease, and left the other for the next, without
    # reading the passes after it (nor the lanes' depths, a read of the whole index)
    assert (report.examined, len(report.recovered), report.left, report.unread_passes) == (1, 1, 1, 2)
    assert set(report.recovered) <= set(crashed)
    # And the next run, with time, settles the rest
    second = reconciler.run()
    assert set(second.recovered) | set(report.recovered) == set(crashed)
    assert set(second.expired) == set(late)


@pytest.fixture
def backlogged(
    moto_stack: Any, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[Harness, Reconciler, LaterClock]:
    """A reconciler that reads 4 entries a run: a lane backlog of 7 stale queued jobs stands for
    one of a few thousand against the default 500."""
    harness = Harness(
        moto_stack, integration_config(provider, reconciler={"max_items_per_run": 4}), monkeypatch
    )
    clock = LaterClock()
    reconciler = Reconciler(
        JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock),
        QueueRepository(
            harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
        ),
        harness.config,
    )
    return harness, reconciler, clock


def test_a_passed_deadline_behind_a_backlog_longer_than_a_run_ends_expired_in_the_next_run(
    backlogged: tuple[Harness, Reconciler, LaterClock],
) -> None:
    """Hunt 200: a queued job ends `expired` within a period of its deadline, however long its
    lane's backlog; it used to wait behind every older stale queued job, a period per
    `max_items_per_run` of them (50 minutes behind 5,000), with nothing counted as left."""
    harness, reconciler, clock = backlogged
    # Given a lane backlog of 7 queued jobs (their messages in the queue: only waiting), and,
    # accepted just after them, a job whose deadline is 400 s away
    backlog = {harness.submit().body["id"] for _ in range(7)}
    late = harness.submit(deadline_seconds=400).body["id"]
    # When the reconciler runs just after its deadline
    clock.offset = 401
    report = reconciler.run(remaining_seconds=lambda: 28.0)
    # Then that run expires it, and reads the backlog with the room left
    assert report.expired == [late]
    assert len(report.waiting) == 3 and set(report.waiting) <= backlog
    job = harness.api("GET", f"/v1/jobs/{late}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"]) == ("expired", "deadline_exceeded")


def test_a_lost_webhook_behind_a_backlog_longer_than_a_run_goes_again_in_the_next_run(
    backlogged: tuple[Harness, Reconciler, LaterClock], receiver: WebhookReceiver
) -> None:
    """Hunt 200: a terminal job whose webhook message was lost gets it again once it is
    `stale_webhook_seconds` old (DESIGN §3.6), whatever backlog of older stale queued jobs fills
    the run's reads."""
    harness, reconciler, clock = backlogged
    # Given a job that succeeded, its webhook message lost, behind 7 queued jobs
    done = harness.submit(webhook={"url": f"http://127.0.0.1:{receiver.port}/hook"}).body["id"]
    harness.drain("high")
    _purge(harness, harness.stack.webhook_queue_url)
    backlog = {harness.submit().body["id"] for _ in range(7)}
    # When the reconciler runs after the webhook threshold (the backlog stale by then too)
    clock.offset = harness.config.reconciler.stale_webhook_seconds + 1
    report = reconciler.run(remaining_seconds=lambda: 28.0)
    # Then its webhook goes again in that run, and the backlog is read with the room left
    assert report.webhooks == [done]
    assert len(report.waiting) == 3 and set(report.waiting) <= backlog
    bodies = [
        json.loads(message["Body"])["job_id"] for message in harness.receive(harness.stack.webhook_queue_url)
    ]
    assert bodies == [done]


def _run_with_slow_reads(
    reconciler: Reconciler, per_query: float
) -> tuple[ReconcileReport, float, list[float]]:
    """One run in an invocation of 28 s in which each index Query takes `per_query` seconds (a
    throttled index, botocore retrying with backoff): its report, the time it had left as it
    ended, and the time left at each of its transactions."""
    spent = [0.0]
    at_transactions: list[float] = []

    def remaining() -> float:
        return 28.0 - spent[0]

    def slow(params: dict[str, Any], **_: Any) -> None:
        if params.get("IndexName"):
            spent[0] += per_query

    def transacting(params: dict[str, Any], **_: Any) -> None:
        at_transactions.append(remaining())

    client = aws.client("dynamodb")
    client.meta.events.register("provide-client-params.dynamodb.Query", slow)
    client.meta.events.register("provide-client-params.dynamodb.TransactWriteItems", transacting)
    try:
        report = reconciler.run(remaining_seconds=remaining)
    finally:
        client.meta.events.unregister("provide-client-params.dynamodb.Query", slow)
        client.meta.events.unregister("provide-client-params.dynamodb.TransactWriteItems", transacting)
    return report, remaining(), at_transactions


@pytest.mark.parametrize("per_query", [1.0, 2.0])
def test_a_lapsed_lease_is_recovered_in_time_though_the_sweeps_reads_are_slow(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, per_query: float
) -> None:
    """Hunt 200, review 202: the lapsed leases are settled after their own pass's reads, every
    pass stops reading when the run's time runs out, and each run reads the shards from another
    one first. Every index Query slowed to 1 s used to take a 28 s invocation past its end before
    a single lease was recovered, every run while it lasted."""
    # Given a crashed job (its lease lapsed)
    crashed = _crashed_job(harness)
    clock.offset = 1 + harness.config.reconciler.expired_lease_grace_seconds + 1
    # When the reconciler runs, every index Query slowed (at 2 s, a run reads 12 of the 18
    # partitions: its job's may be among the others, read first by a later run)
    recovered_with: list[float] = []
    for _ in range(10):
        report, left, at_transactions = _run_with_slow_reads(reconciler, per_query)
        # Then every run ends within its invocation, counting the passes it did not read to their end
        assert left > 0
        assert report.unread_passes >= 1
        if report.recovered:
            assert report.recovered == [crashed]
            recovered_with = at_transactions
            break
    # And one of them recovers the job with time to spare
    assert recovered_with and recovered_with[0] > 0


def test_a_run_with_no_lapsed_lease_ends_within_its_invocation_though_the_reads_are_slow(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    """Review 202: a run that finds nothing in its first passes stops reading the next when its
    time runs out (at 0.7 s a Query, three passes of 18 partitions take 38 s of its 28)."""
    for _ in range(3):
        harness.submit()
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    report, left, _ = _run_with_slow_reads(reconciler, 0.7)
    assert left > 0
    assert report.unread_passes >= 1


def test_a_known_lost_message_is_sent_though_more_urgent_entries_are_due_than_a_run_reads(
    backlogged: tuple[Harness, Reconciler, LaterClock],
) -> None:
    """Review 202: the urgent pass leaves a quarter of the run's room to the backlog's, whose
    first entries are the known-lost messages: a burst of passed deadlines does not hold them
    back, and the run says it left urgent entries."""
    harness, reconciler, clock = backlogged
    # Given a job whose message is known lost, and four jobs whose deadline passes at once
    lost = harness.submit().body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).sweep_first(lost)
    late = {harness.submit(deadline_seconds=400).body["id"] for _ in range(4)}
    # When a run that reads 4 entries runs after their deadline
    clock.offset = 401
    first = reconciler.run(remaining_seconds=lambda: 28.0)
    # Then it expires three, sends the lost job its message, and counts the urgent pass unread
    assert first.requeued == [lost]
    assert len(first.expired) == 3 and set(first.expired) <= late
    assert first.unread_passes == 1
    # And the next run expires the fourth
    second = reconciler.run(remaining_seconds=lambda: 28.0)
    assert set(first.expired) | set(second.expired) == late


def test_a_known_lost_message_is_sent_again_though_every_read_is_slow(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    """Review 206: each pass reads in a share of the run's time (half for the lapsed leases, half
    of the rest for the urgent entries, the rest for the backlog), so slow reads no longer spend
    every run on the first two passes' filtered reads while a known-lost message waits."""
    # Given a job whose message is known lost
    lost = harness.submit().body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).sweep_first(lost)
    clock.offset = 10
    # When the reconciler runs with every index Query taking 0.7 s (each run reads some of the
    # backlog's shards, from a random one: its job's among them, sooner or later)
    runs = []
    for _ in range(20):
        report, left, _ = _run_with_slow_reads(reconciler, 0.7)
        # Then every run ends within its invocation
        assert left > 0
        runs.append(report)
        if report.requeued:
            break
    # And one of them sends the job its message
    assert runs[-1].requeued == [lost], [run.as_log() for run in runs]


def test_a_run_that_settled_every_due_entry_counts_no_unread_pass(
    backlogged: tuple[Harness, Reconciler, LaterClock],
) -> None:
    """Review 206: a pass holding exactly its room was read to its end (no ReconcileLeft)."""
    harness, reconciler, clock = backlogged
    # Given exactly as many passed deadlines as the urgent pass has room for (3 of the run's 4)
    late = {harness.submit(deadline_seconds=400).body["id"] for _ in range(3)}
    clock.offset = 401
    report = reconciler.run(remaining_seconds=lambda: 28.0)
    # Then the run expires them and says it left nothing
    assert set(report.expired) == late
    assert (report.left, report.unread_passes) == (0, 0)


def test_a_cancel_flagged_while_the_run_looks_at_a_stale_queued_job_keeps_it_first_in_the_sweep(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    """A cancel the API could only ask for (S3 could not say whether a paid result was parked)
    puts the job first in the sweep, for the message its claim ends it at. A run that read the
    job as an ordinary stale one before that flag must not postpone it over the flag (hunt 251:
    the job then waited, canceled as asked, in the tenant's quota, until its own message came
    back from a retry's backoff, up to 12 hours)."""
    from llmq.jobs import SWEEP_CANCEL_ASKED_MS

    job_id = harness.submit().body["id"]
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    postpone = reconciler.jobs.postpone_sweep
    api_jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))

    def cancel_flagged_first(job: str, *args: Any, **kwargs: Any) -> bool:
        found = api_jobs.find(job)
        assert found is not None and api_jobs.request_cancel(found, JobStatus.QUEUED) is not None
        return postpone(job, *args, **kwargs)

    reconciler.jobs.postpone_sweep = cancel_flagged_first  # type: ignore[method-assign]
    report = reconciler.run()
    assert job_id in report.waiting
    item = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": job_id}})["Item"]
    assert int(item["sweep_at"]["N"]) == SWEEP_CANCEL_ASKED_MS
    # And the next run sends the message the job's claim ends it at
    reconciler.jobs.postpone_sweep = postpone  # type: ignore[method-assign]
    url = harness.stack.lane_queue_urls["high"]
    before = harness.total_count(url)
    assert job_id in reconciler.run().requeued
    assert harness.total_count(url) == before + 1


class _LambdaTimedOut(BaseException):
    """Lambda ends the invocation at its timeout: nothing after it runs."""


@contextmanager
def _slowed_index(spent: list[float], per_page: Callable[[dict[str, Any]], float]) -> Iterator[None]:
    """Each Query of the sweep index costs `per_page(params)` seconds of the run's time, which
    ends (as Lambda ends it) at 28 s."""

    def slow(params: dict[str, Any], **_: Any) -> None:
        if params.get("IndexName"):
            spent[0] += per_page(params)
            if spent[0] >= 28.0:
                raise _LambdaTimedOut()

    client = aws.client("dynamodb")
    client.meta.events.register("provide-client-params.dynamodb.Query", slow)
    try:
        yield
    finally:
        client.meta.events.unregister("provide-client-params.dynamodb.Query", slow)


def _whole_index_pages_slow(params: dict[str, Any]) -> float:
    # (the depths' count reads every entry of every shard, a 1 MB page of about 10,000 at a
    # time; the passes read only what is due)
    return 1.7 if "sweep_at" not in params["KeyConditionExpression"] else 0.01


@pytest.mark.parametrize(
    "per_page",
    [lambda params: 0.45, _whole_index_pages_slow],
    ids=["every-query-slow", "the-whole-index-slow"],
)
def test_a_run_ends_within_its_time_however_long_the_lane_depths_take_to_count(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, per_page: Callable[[dict[str, Any]], float]
) -> None:
    """Hunt 315: the depths' count (a read of the whole sweep index, which grows with the
    backlog) had no bound: a throttled or large index ran every run past its timeout."""
    # Given stale queued jobs (whose judging needs the lanes' depths), and a slow index
    for _ in range(3):
        harness.submit()
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    spent = [0.0]
    # When the reconciler runs with 28 s
    with _slowed_index(spent, per_page):
        report = reconciler.run(remaining_seconds=lambda: 28.0 - spent[0])
    # Then it ends within them, and says it left work for the next run
    assert spent[0] < 28.0
    assert report.unread_passes >= 1


def test_a_known_lost_message_is_sent_while_the_index_is_too_large_to_count_in_a_run(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given a queued job whose message is known lost (its send failed after it was stored)
    lost = harness.submit().body["id"]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).sweep_first(lost)
    clock.offset = 10
    # When the reconciler runs while the whole index takes longer than a run to read
    spent = [0.0]
    with _slowed_index(spent, _whole_index_pages_slow):
        reconciler.run(remaining_seconds=lambda: 28.0 - spent[0])
    # Then the run was not cut off by its timeout, and the job has its message (hunt 315: every
    # run ended inside the count, and the job waited, queued with no message, for as long as
    # the index stayed that large)
    bodies = [message["Body"] for message in harness.receive(harness.stack.lane_queue_urls["high"])]
    assert any(lost in body for body in bodies)


def _known_lost(harness: Harness, count: int) -> list[str]:
    """Queued jobs whose messages are known lost (their sends failed after they were stored)."""
    ids = [harness.submit().body["id"] for _ in range(count)]
    _purge(harness, harness.stack.lane_queue_urls["high"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    for job_id in ids:
        jobs.sweep_first(job_id)
    return ids


@pytest.mark.parametrize("with_a_crash", [False, True], ids=["alone", "beside-a-crashed-worker"])
def test_every_known_lost_message_is_sent_while_the_index_is_too_large_to_count(
    harness: Harness, reconciler: Reconciler, clock: LaterClock, with_a_crash: bool
) -> None:
    # Given three jobs whose messages are known lost, and perhaps a crashed worker's lease
    crashed = _crashed_job(harness) if with_a_crash else None
    lost = _known_lost(harness, 3)
    clock.offset = 10
    # When a run meets an index too large to count in its time
    spent = [0.0]
    with _slowed_index(spent, _whole_index_pages_slow):
        reconciler.run(remaining_seconds=lambda: 28.0 - spent[0])
    # Then each has its message, and the crashed job its recovery (review 275: behind the count
    # cut short, one known-lost message a run, none in a run that also recovered a lease)
    sent = _messages_per_job(harness)
    assert [job_id for job_id in lost if job_id not in sent] == []
    assert crashed is None or crashed in sent


def test_a_run_ends_within_its_time_however_many_open_batches_it_counts(
    harness: Harness, clock: LaterClock
) -> None:
    # Given many open batches, the reconciler's look at them done, and a stale queued job
    stack = harness.stack
    reconciler = Reconciler(
        JobRepository(stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock),
        QueueRepository(stack.lane_queue_urls, stack.webhook_queue_url, sqs=aws.client("sqs")),
        harness.config,
        batches=BatchRepository(stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")),
    )
    for index in range(40):
        body = {"requests": [{"custom_id": "a", "body": {"prompt": f"say {index}"}}]}
        assert harness.api("POST", "/v1/batches", body=body, tenant=ENTERPRISE).status == 202
    harness.submit()
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    reconciler.run()
    harness.submit()
    clock.offset = harness.config.reconciler.stale_queued_seconds + 20
    # When each batch's count (a read of its count shards) is slow
    spent = [0.0]

    def slow(**_: Any) -> None:
        spent[0] += 1.0
        if spent[0] >= 28.0:
            raise _LambdaTimedOut()

    client = aws.client("dynamodb")
    client.meta.events.register("provide-client-params.dynamodb.BatchGetItem", slow)
    try:
        report = reconciler.run(remaining_seconds=lambda: 28.0 - spent[0])
    finally:
        client.meta.events.unregister("provide-client-params.dynamodb.BatchGetItem", slow)
    # Then it ends within its time, saying it left work (review 275: cut off by its timeout
    # inside the open batches' counts)
    assert spent[0] < 28.0
    assert report.unread_passes >= 1


def _lane_with_lost_messages(harness: Harness, count: int, lost: set[int]) -> list[str]:
    """`count` queued jobs in the high lane, the messages of those at the `lost` places gone."""
    url = harness.stack.lane_queue_urls["high"]
    ids = [harness.submit().body["id"] for _ in range(count)]
    messages: list[dict[str, Any]] = []
    while received := harness.receive(url):
        messages.extend(received)
    assert len(messages) == count
    for message in messages:
        if ids.index(json.loads(message["Body"])["job_id"]) in lost:
            harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        else:
            harness.sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
            )
    return ids


def _messages_per_job(harness: Harness) -> dict[str, int]:
    seen: dict[str, int] = {}
    while received := harness.receive(harness.stack.lane_queue_urls["high"]):
        for message in received:
            job_id = json.loads(message["Body"])["job_id"]
            seen[job_id] = seen.get(job_id, 0) + 1
    return seen


def test_a_known_lost_job_ended_at_its_retention_takes_no_other_lost_jobs_message(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given two jobs with no message, the first known lost and within its retention's margin
    ids = _lane_with_lost_messages(harness, 3, {0, 1})
    JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).sweep_first(
        ids[0]
    )
    thresholds = harness.config.reconciler
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": ids[0]}},
        UpdateExpression="SET expires_at = :at",
        ExpressionAttributeValues={
            ":at": {
                "N": str(
                    int(_time.time())
                    + thresholds.stale_queued_seconds
                    + 10
                    + thresholds.retention_margin_seconds // 2
                )
            }
        },
    )
    clock.offset = thresholds.stale_queued_seconds + 10
    # When the reconciler runs
    report = reconciler.run()
    # Then the first ends at its retention, and the second gets the message its lane is short
    # of (review 276: the first, resent then ended, took it)
    assert ids[0] in report.expired
    assert _messages_per_job(harness).get(ids[1]) == 1


def test_a_known_lost_send_sqs_refuses_gives_no_other_job_a_second_message(
    harness: Harness, reconciler: Reconciler, clock: LaterClock
) -> None:
    # Given a job whose message is known lost, beside two that have theirs
    ids = _lane_with_lost_messages(harness, 3, {0})
    JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).sweep_first(
        ids[0]
    )
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    # When the reconciler's send of its message is refused
    faults = AwsFaults()
    try:
        fault = faults.arm(FaultKind.THROTTLE, "sqs.SendMessage")
        report = reconciler.run()
    finally:
        faults.disarm()
    # Then it waits for the next run, and no other job is sent a second message (review 276)
    assert faults.fired_for(fault) and ids[0] in report.skipped
    assert _messages_per_job(harness) == {ids[1]: 1, ids[2]: 1}
