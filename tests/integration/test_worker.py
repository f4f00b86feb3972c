"""The worker against moto and a real loopback provider: what happens to a job once queued."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from llmq import aws
from llmq.config import LlmqConfig
from llmq.errors import LeaseLost
from llmq.jobs import JobRepository
from llmq.models import JobResult
from llmq.policy import ClaimOutcome
from llmq.read_gathering import GatheredReads
from llmq.telemetry import MetricName
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, Harness, LambdaContextStub, load_handler, webhook_message


def _job(harness: Harness, job_id: str) -> dict[str, Any]:
    reply = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE)
    assert reply.status == 200
    return reply.body


def _run_until_settled(harness: Harness, lane: str, rounds: int) -> None:
    """Run the lane's messages; stand in for the clock by showing retried ones again at once."""
    url = harness.stack.lane_queue_urls[lane]
    for _ in range(rounds):
        messages = harness.receive(url)
        if not messages:
            return
        response = harness.run_worker(url, messages)
        harness.let_backoffs_pass()
        failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
        for message in (m for m in messages if m["MessageId"] in failed):
            harness.sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
            )


class VisibilitySpy:
    """Records ChangeMessageVisibility calls through botocore's event hooks on the real client."""

    def __init__(self) -> None:
        self.timeouts: list[int] = []
        aws.client("sqs").meta.events.register(
            "provide-client-params.sqs.ChangeMessageVisibility", self._record
        )

    def _record(self, params: dict[str, Any], **_: Any) -> None:
        self.timeouts.append(int(params["VisibilityTimeout"]))


def test_a_batch_of_ten_runs_concurrently(harness: Harness, provider: FakeProviderServer) -> None:
    # Given ten queued jobs that each take 2 s at the provider (1 s leaves too little slack for
    # ten claims on a loaded two-core machine; the assertion is the in-flight count, not time)
    ids = [harness.submit(prompt=f"job {i} [[latency:2]]").body["id"] for i in range(10)]
    # When the worker receives them as one batch
    response = harness.drain("high")
    # Then all ten were in flight at the provider at once, and all succeeded
    assert response == {"batchItemFailures": []}
    assert provider.state.max_in_flight == 10
    assert {_job(harness, job_id)["status"] for job_id in ids} == {"succeeded"}


def test_streaming_answers_are_assembled(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch
) -> None:
    settings = integration_config(provider).provider.model_dump(mode="json")
    config = integration_config(provider, provider={**settings, "stream": True})
    harness = Harness(moto_stack, config, monkeypatch)
    job_id = harness.submit(prompt="[[tokens:5]]").body["id"]
    harness.drain("high")
    job = _job(harness, job_id)
    assert job["status"] == "succeeded"
    assert len(job["result"]["output"].split()) == 5
    assert job["result"]["usage"]["output_tokens"] == 5
    assert provider.state.log[0].stream is True


def test_the_same_message_twice_in_one_batch_calls_the_provider_once(
    harness: Harness, provider: FakeProviderServer
) -> None:
    job_id = harness.submit(prompt="[[latency:0.3]]").body["id"]
    url = harness.stack.lane_queue_urls["high"]
    body = json.dumps({"job_id": job_id, "lane": "high"})
    harness.sqs.send_message(QueueUrl=url, MessageBody=body)
    harness.sqs.send_message(QueueUrl=url, MessageBody=body)
    messages: list[dict[str, Any]] = []
    while len(messages) < 3:
        messages += harness.receive(url)
    response = harness.run_worker(url, messages)
    assert response == {"batchItemFailures": []}
    assert provider.calls_for(job_id) == 1
    assert _job(harness, job_id)["status"] == "succeeded"


def test_a_duplicate_in_a_later_batch_calls_the_provider_once(
    harness: Harness, provider: FakeProviderServer
) -> None:
    job_id = harness.submit().body["id"]
    url = harness.stack.lane_queue_urls["high"]
    harness.drain("high")
    harness.sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"job_id": job_id, "lane": "high"}))
    assert harness.drain("high") == {"batchItemFailures": []}
    assert provider.calls_for(job_id) == 1
    assert harness.total_count(url) == 0
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("succeeded", 1)


def test_a_429_with_retry_after_requeues_then_the_redelivery_succeeds(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a job whose first provider call answers 429 with Retry-After: 7
    job_id = harness.submit(prompt="[[fail:429x1]] [[retry_after:7]]").body["id"]
    spy = VisibilitySpy()
    # When the worker runs it
    message = harness.receive(harness.stack.lane_queue_urls["high"])[0]
    response = harness.run_worker(harness.stack.lane_queue_urls["high"], [message])
    # Then the message is reported failed, hidden for at least 7 s, and the job is queued again
    assert response == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    assert spy.timeouts and spy.timeouts[-1] >= 7
    assert harness.receive(harness.stack.lane_queue_urls["high"]) == []
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("queued", 1)
    assert job["error"]["retryable"] is True
    # And a copy of the message arriving during the backoff does not run it early
    harness.sqs.send_message(
        QueueUrl=harness.stack.lane_queue_urls["high"],
        MessageBody=json.dumps({"job_id": job_id, "lane": "high"}),
    )
    early = harness.drain("high")
    assert len(early["batchItemFailures"]) == 1
    assert provider.calls_for(job_id) == 1
    assert spy.timeouts[-1] >= 6
    # And when the message comes back, the job succeeds on the second call
    harness.let_backoffs_pass()
    harness.sqs.change_message_visibility(
        QueueUrl=harness.stack.lane_queue_urls["high"],
        ReceiptHandle=message["ReceiptHandle"],
        VisibilityTimeout=0,
    )
    assert harness.drain("high") == {"batchItemFailures": []}
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"], job["error"]) == ("succeeded", 2, None)
    assert provider.calls_for(job_id) == 2


def test_a_provider_that_keeps_failing_ends_retries_exhausted_after_max_attempts(
    harness: Harness, provider: FakeProviderServer
) -> None:
    job_id = harness.submit(prompt="[[fail:503x99]]").body["id"]
    _run_until_settled(harness, "high", rounds=harness.config.max_attempts + 2)
    job = _job(harness, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "retries_exhausted"
    # (each call refused before generating: nothing paid for, the request may be sent later)
    assert job["error"]["retryable"] is True
    assert provider.calls_for(job_id) == harness.config.max_attempts
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0


@pytest.mark.parametrize("status", [504, 524])
def test_a_gateways_timeout_after_it_held_the_request_is_not_paid_for_again(
    harness: Harness, provider: FakeProviderServer, status: int
) -> None:
    # Given a job behind a gateway (nginx, an ALB, Cloudflare) that held the whole request while
    # the model generated, then gave up on it with its own timeout
    job_id = harness.submit(prompt=f"long essay [[latency:1.5]] [[fail:{status}x5]]").body["id"]
    # When the worker runs the lane until nothing is left
    _run_until_settled(harness, "high", rounds=harness.config.max_attempts + 2)
    # Then it is the timeout it is, the request sent once (hunt 303: retried as a 5xx, three
    # paid generations, and retries_exhausted all the same)
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"], job["error"]["retryable"]) == (
        "failed",
        "provider_timeout",
        True,
    )
    assert provider.calls_for(job_id) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whitespace", "sse-comments"])
def test_a_connection_cut_after_keep_alives_before_any_answer_is_not_paid_for_again(
    harness: Harness, provider: FakeProviderServer, stream: bool
) -> None:
    # Given a provider that answers 200 at once and sends keep-alives while it generates
    # (OpenRouter's whitespace, SSE comments), whose connection an idle timeout cuts
    job_id = harness.submit(prompt="long essay [[stall:1.5]]", stream=stream).body["id"]
    # When the worker runs the lane until nothing is left
    _run_until_settled(harness, "high", rounds=harness.config.max_attempts + 2)
    # Then it is a drop before any answer, a timeout, and the request is sent once (hunt 303:
    # retried as an answer cut part way, three paid generations)
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "provider_timeout")
    assert provider.calls_for(job_id) == 1


def test_a_gateways_timeout_answered_at_once_is_retried_as_a_5xx(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # A 504 that comes back at once never reached a model: retried, and the job runs
    job_id = harness.submit(prompt="[[fail:504x1]]").body["id"]
    _run_until_settled(harness, "high", rounds=3)
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    assert provider.calls_for(job_id) == 2


def test_a_context_length_error_fails_once_and_acknowledges(
    harness: Harness, provider: FakeProviderServer
) -> None:
    job_id = harness.submit(prompt="[[fail:400:context_length_exceeded]]").body["id"]
    assert harness.drain("high") == {"batchItemFailures": []}
    job = _job(harness, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "context_length_exceeded"
    assert job["error"]["retryable"] is False
    assert provider.calls_for(job_id) == 1
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0


def test_a_late_completion_after_a_lease_takeover_is_fenced(
    moto_stack: MotoStack, provider: FakeProviderServer
) -> None:
    # Given worker A holding a one-second lease, and a clock we control
    now = [1_800_000_000.0]
    config = integration_config(provider)
    jobs = JobRepository(moto_stack.jobs_table, config, dynamodb=aws.client("dynamodb"), clock=lambda: now[0])
    from llmq.intake import JobIntake
    from llmq.models import JobRequest
    from llmq.queues import QueueRepository
    from llmq.tenants import TenantIdentity

    intake = JobIntake(
        jobs,
        QueueRepository(moto_stack.lane_queue_urls, moto_stack.webhook_queue_url, sqs=aws.client("sqs")),
        config,
        lambda _: None,
    )
    job_id = intake.submit(TenantIdentity("ten_acme", "enterprise"), JobRequest(prompt="x"), None).job.id
    claim_a = jobs.claim(job_id, "worker-a", lease_seconds=1)
    assert claim_a.outcome is ClaimOutcome.CLAIMED
    # While the lease is live, B cannot claim
    assert jobs.claim(job_id, "worker-b", lease_seconds=60).outcome is ClaimOutcome.LEASED_ELSEWHERE
    # When A's lease expires, B claims and completes
    now[0] += 5
    claim_b = jobs.claim(job_id, "worker-b", lease_seconds=60)
    assert claim_b.outcome is ClaimOutcome.CLAIMED and claim_b.job is not None
    assert claim_b.job.attempts == 2
    jobs.complete(claim_b.job, "worker-b", result=JobResult(output="from B"))
    # Then A's late completion is rejected and B's result stands
    assert claim_a.job is not None
    with pytest.raises(LeaseLost):
        jobs.complete(claim_a.job, "worker-a", result=JobResult(output="from A"))
    stored = jobs.find(job_id)
    assert stored is not None and stored.result is not None
    assert (stored.status.value, stored.result.output) == ("succeeded", "from B")


def test_a_job_canceled_while_queued_is_skipped_without_a_provider_call(
    harness: Harness, provider: FakeProviderServer
) -> None:
    job_id = harness.submit().body["id"]
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 200
    assert harness.drain("high") == {"batchItemFailures": []}
    assert provider.calls_for(job_id) == 0
    assert _job(harness, job_id)["status"] == "canceled"
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0


def test_a_running_job_asked_to_cancel_ends_canceled(harness: Harness, provider: FakeProviderServer) -> None:
    # Given a job that takes 5 s at the provider, being run by the worker
    job_id = harness.submit(prompt="[[latency:5]]").body["id"]
    worker = threading.Thread(target=harness.drain, args=("high",))
    worker.start()
    for _ in range(100):
        if _job(harness, job_id)["status"] == "running":
            break
        time.sleep(0.05)
    # When the client cancels it
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    assert reply.status == 202
    assert reply.body["cancel_requested"] is True
    worker.join(timeout=10)
    # Then the worker stops it and records it canceled, without finishing the generation
    job = _job(harness, job_id)
    assert job["status"] == "canceled"
    assert job["result"] is None
    assert provider.calls_for(job_id) == 1


def test_a_retry_after_longer_than_sqs_can_hide_a_message_is_due_when_its_message_comes_back(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a job whose provider asks for a day (a daily quota's 429), longer than SQS can hide
    # its message again (12 hours from its receive)
    job_id = harness.submit(prompt="[[fail:429x1]] [[retry_after:86400]]").body["id"]
    spy = VisibilitySpy()
    # When the worker runs it
    message = harness.receive(harness.stack.lane_queue_urls["high"])[0]
    harness.run_worker(harness.stack.lane_queue_urls["high"], [message])
    # Then the job is due no later than its message comes back (hunt 237: 20 minutes later, so
    # the message's return spent a receive on a claim not yet due, toward the DLQ)
    item = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": job_id}})["Item"]
    due_in = int(item["not_before_ms"]["N"]) / 1000 - time.time()
    assert spy.timeouts and spy.timeouts[-1] >= due_in
    assert due_in > 11 * 3600


def test_a_retry_back_on_time_runs_under_a_clock_a_little_behind_the_one_that_set_it(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a job requeued after a 429 with Retry-After: 2 by one worker environment
    job_id = harness.submit(prompt="[[fail:429x1]] [[retry_after:2]]").body["id"]
    url = harness.stack.lane_queue_urls["high"]
    (message,) = harness.receive(url)
    harness.run_worker(url, [message])
    item = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": job_id}})["Item"]
    due_s = int(item["not_before_ms"]["N"]) / 1000
    # When its message comes back on time to another environment, whose clock is half a
    # second behind the first's (Lambda environments' clocks differ by up to about a second)
    behind = due_s - 0.5 - time.time()
    harness.worker().runner().jobs._clock = lambda: time.time() + behind
    due_by_that_clock = time.time() + 0.5
    harness.sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
    )
    response = harness.run_worker(url, harness.receive(url))
    # Then it runs once due by that clock, in the same invocation (hunt 237: refused as not yet
    # due, it spent a receive toward the DLQ), never before its Retry-After by the clock that
    # claims it
    assert response == {"batchItemFailures": []}
    assert provider.calls_for(job_id) == 2
    second = provider.state.snapshot()["log"][-1]
    assert second["job_id"] == job_id and second["started_at"] >= due_by_that_clock
    assert _job(harness, job_id)["status"] == "succeeded"


def test_a_retry_that_would_come_after_the_jobs_retention_ends_it_now_with_its_webhook(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a job near the end of its retention (it waited days behind its tenant's cap: its
    # expiry stands a little beyond the reconciler's margin), whose provider answers 429 with
    # a Retry-After of four hours
    from llmq.shares import ShareRepository

    job_id = harness.submit(
        prompt="[[fail:429x1]] [[retry_after:14400]]", webhook={"url": "http://127.0.0.1:9/hook"}
    ).body["id"]
    margin = harness.config.reconciler.retention_margin_seconds
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET expires_at = :soon",
        ExpressionAttributeValues={":soon": {"N": str(int(time.time()) + margin + 120)}},
    )
    # When the worker runs it
    assert harness.drain("high") == {"batchItemFailures": []}
    # Then it ends now, failed as a retry past its end would (it could not be looked at again
    # before its item is deleted), its quota back and its webhook on the way
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "deadline_exceeded")
    assert "retention" in job["error"]["message"]
    assert provider.calls_for(job_id) == 1
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    assert (share.active, share.running) == (0, 0)
    events = [webhook_message(message) for message in harness.receive(harness.stack.webhook_queue_url)]
    assert {"job_id": job_id, "event": "job.failed"} in events


def test_a_deadline_passed_before_the_claim_expires_the_job(
    harness: Harness, provider: FakeProviderServer
) -> None:
    job_id = harness.submit(deadline_seconds=1).body["id"]
    time.sleep(1.1)
    assert harness.drain("high") == {"batchItemFailures": []}
    job = _job(harness, job_id)
    assert job["status"] == "expired"
    assert job["error"]["code"] == "deadline_exceeded"
    assert provider.calls_for(job_id) == 0


def test_a_terminal_event_with_a_webhook_is_enqueued_once(harness: Harness) -> None:
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    harness.drain("high")
    job = _job(harness, job_id)
    assert job["webhook"]["delivery"]["status"] == "pending"
    messages = harness.receive(harness.stack.webhook_queue_url)
    assert [webhook_message(m) for m in messages] == [{"job_id": job_id, "event": "job.succeeded"}]


def test_a_late_duplicate_does_not_resend_a_webhook_the_dispatcher_is_already_retrying(
    harness: Harness,
) -> None:
    # Given a job that ended a while ago, whose webhook's first attempt failed: the dispatcher's
    # message, hidden for its backoff, carries the next attempt
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    harness.drain("high")
    assert len(harness.receive(harness.stack.webhook_queue_url, visibility=300)) == 1
    long_ago = int((time.time() - 3600) * 1000)
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET finished_ms = :then, delivery_attempts = :one",
        ExpressionAttributeValues={":then": {"N": str(long_ago)}, ":one": {"N": "1"}},
    )
    assert _job(harness, job_id)["webhook"]["delivery"]["status"] == "pending"
    # When a duplicate of its lane message arrives
    url = harness.stack.lane_queue_urls["high"]
    harness.sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"job_id": job_id, "lane": "high"}))
    assert harness.drain("high") == {"batchItemFailures": []}
    # Then no second webhook message is sent: two would race to POST the same retry
    assert harness.total_count(harness.stack.webhook_queue_url) == 1


def test_a_duplicate_of_a_job_whose_webhook_message_was_lost_sends_it_again(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a job that ended a while ago and whose webhook message never reached SQS
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    harness.drain("high")
    for message in harness.receive(harness.stack.webhook_queue_url):
        harness.sqs.delete_message(
            QueueUrl=harness.stack.webhook_queue_url, ReceiptHandle=message["ReceiptHandle"]
        )
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET finished_ms = :then",
        ExpressionAttributeValues={":then": {"N": str(int((time.time() - 3600) * 1000))}},
    )
    # When a duplicate of its lane message arrives
    url = harness.stack.lane_queue_urls["high"]
    harness.sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"job_id": job_id, "lane": "high"}))
    capsys.readouterr()
    assert harness.drain("high") == {"batchItemFailures": []}
    # Then its terminal event is sent once more
    messages = harness.receive(harness.stack.webhook_queue_url)
    assert [webhook_message(m) for m in messages] == [{"job_id": job_id, "event": "job.succeeded"}]
    # And the job, counted as succeeded when it ended, is not counted again
    assert MetricName.JOB_SUCCEEDED not in capsys.readouterr().out


def test_an_unsubscribed_event_sends_no_webhook(harness: Harness) -> None:
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook", "events": ["job.failed"]}).body["id"]
    harness.drain("high")
    assert _job(harness, job_id)["status"] == "succeeded"
    assert harness.total_count(harness.stack.webhook_queue_url) == 0


def test_a_poison_message_fails_alone_in_its_batch(harness: Harness, provider: FakeProviderServer) -> None:
    url = harness.stack.lane_queue_urls["high"]
    job_id = harness.submit().body["id"]
    harness.sqs.send_message(QueueUrl=url, MessageBody="not json at all")
    harness.sqs.send_message(
        QueueUrl=url, MessageBody=json.dumps({"job_id": "job_nosuchjob", "lane": "high"})
    )
    messages = harness.receive(url)
    assert len(messages) == 3
    response = harness.run_worker(url, messages)
    failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
    poison = {m["MessageId"] for m in messages if "not json" in m["Body"] or "nosuchjob" in m["Body"]}
    assert failed == poison
    assert _job(harness, job_id)["status"] == "succeeded"


def _dead_letter(harness: Harness, job_id: str, *bodies: str, letter: str | None = None) -> dict[str, Any]:
    """The job's lane message (`letter`: its body; by default one of the first round) and
    `bodies` beside it, moved to the DLQ and handled by the dead-letter function."""
    dlq = harness.stack.lane_dlq_urls["high"]
    for body in (letter or json.dumps({"job_id": job_id, "lane": "high"}), *bodies):
        harness.sqs.send_message(QueueUrl=dlq, MessageBody=body)
    messages = harness.receive(dlq)
    response: dict[str, Any] = load_handler("dead_letter").handler(
        harness.sqs_event(dlq, messages), LambdaContextStub()
    )
    for message in messages:
        harness.sqs.delete_message(QueueUrl=dlq, ReceiptHandle=message["ReceiptHandle"])
    # (a garbage letter beside it is set aside in the poison queue, not reported failed)
    assert response["batchItemFailures"] == []
    garbage = sorted(m["Body"] for m in messages if "garbage" in m["Body"])
    shelved = harness.sqs.receive_message(QueueUrl=harness.stack.poison_queue_url, MaxNumberOfMessages=10)
    assert sorted(m["Body"] for m in shelved.get("Messages", [])) == garbage
    return response


def test_a_queued_jobs_dead_letter_sends_it_again_once_then_fails_it_as_worker_crashed(
    harness: Harness,
) -> None:
    # Given a queued job whose lane message dead-lettered before any worker claimed it
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    lane = harness.stack.lane_queue_urls["high"]
    harness.receive(lane)  # the original message, now "lost" to the DLQ
    # When the dead-letter function sees it the first time, with a garbage letter beside it
    _dead_letter(harness, job_id, "}{ garbage")
    # Then the job is still queued and has a fresh lane message; nothing went to the webhook
    assert _job(harness, job_id)["status"] == "queued"
    (resent,) = harness.receive(lane)
    assert json.loads(resent["Body"])["job_id"] == job_id
    assert harness.total_count(harness.stack.webhook_queue_url) == 0
    # When that one dead-letters too, it fails as worker_crashed and its webhook goes out
    _dead_letter(harness, job_id, letter=resent["Body"])
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")
    webhooks = [webhook_message(m) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert webhooks == [{"job_id": job_id, "event": "job.failed"}]


def test_a_dead_lettered_job_asked_to_cancel_ends_canceled_not_failed(harness: Harness) -> None:
    # Given a running job asked to cancel whose worker vanished (its lease lapsed)
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "vanished-worker", lease_seconds=-1).outcome is ClaimOutcome.CLAIMED
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 202
    # When its message dead-letters
    _dead_letter(harness, job_id)
    # Then it ends canceled, and job.canceled is announced
    job = _job(harness, job_id)
    assert (job["status"], job["error"]) == ("canceled", None)
    webhooks = [webhook_message(m) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert webhooks == [{"job_id": job_id, "event": "job.canceled"}]


def test_accept_claim_and_complete_make_the_minimum_aws_calls(harness: Harness) -> None:
    calls: list[str] = []

    def count(event_name: str, **_: Any) -> None:
        calls.append(event_name.split(".")[-1])

    for service in ("dynamodb", "sqs"):
        aws.client(service).meta.events.register("before-call.*.*", count)
    job_id = harness.submit().body["id"]
    # The accept's put and its tenant's share count are one transaction (DESIGN §3.11)
    assert calls == ["TransactWriteItems", "SendMessage"]
    url = harness.stack.lane_queue_urls["high"]
    event = harness.sqs_event(url, harness.receive(url))
    calls.clear()
    response = harness.worker().handler(event, LambdaContextStub())
    assert response == {"batchItemFailures": []}
    # The claim takes a slot of the tenant's share in the same transaction; a transaction
    # returns no item, so one read brings the input. The complete gives the slot back.
    assert calls == ["TransactWriteItems", "GetItem", "TransactWriteItems"]
    assert _job(harness, job_id)["status"] == "succeeded"


def _batch_with_overlapping_claims(harness: Harness) -> tuple[set[str], dict[str, Any], list[str]]:
    """Ten queued jobs as one worker event, the runner's reads gathered with a long wait (what
    gathers is then the claims' overlap alone), and the first claim after the batch's first
    (which goes alone, `llmq.slot_handoff`) held until another is in flight: at least two always
    overlap, however slowly moto answers. Returns the job ids, the event, and the list the
    dynamodb calls are then counted into."""
    job_ids = {harness.submit(prompt=f"job {n}").body["id"] for n in range(10)}
    url = harness.stack.lane_queue_urls["high"]
    messages = harness.receive(url)
    while len(messages) < 10:
        messages += harness.receive(url)
    jobs = harness.worker().runner().jobs
    jobs.claimed_reads = GatheredReads(jobs._read_items, max_wait_seconds=30)
    claims = threading.Condition()
    started: list[int] = []

    def hold_the_first_claim(params: dict[str, Any], **_: Any) -> None:
        if ":owner" not in params["TransactItems"][0]["Update"].get("ExpressionAttributeValues", {}):
            return  # a completion, not a claim
        with claims:
            started.append(1)
            claims.notify_all()
            if len(started) > 1:  # (the scout's answer lets the others go)
                claims.wait_for(lambda: len(started) >= 3, timeout=2)

    calls: list[str] = []
    events = aws.client("dynamodb").meta.events
    events.register("before-parameter-build.dynamodb.TransactWriteItems", hold_the_first_claim)
    events.register("before-call.*.*", lambda event_name, **_: calls.append(event_name.split(".")[-1]))
    return job_ids, harness.sqs_event(url, messages), calls


def test_the_reads_after_a_batchs_claims_are_one_request_for_many_jobs(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given ten queued jobs delivered as one batch, whose claims overlap
    job_ids, event, calls = _batch_with_overlapping_claims(harness)
    # When the worker runs them
    response = harness.worker().handler(event, LambdaContextStub())
    made = list(calls)
    # Then every job succeeded with one generation, each after its own claim transaction; the
    # reads that bring their inputs were gathered: fewer requests than jobs (those of claims in
    # flight together went as one BatchGetItem), where each job used to make a GetItem of its own
    assert response == {"batchItemFailures": []}
    assert {job_id: _job(harness, job_id)["status"] for job_id in job_ids} == dict.fromkeys(
        job_ids, "succeeded"
    )
    assert [provider.calls_for(job_id) for job_id in job_ids] == [1] * 10
    # (a long generation also reads its job to look for a cancel: the gatherer counts its own)
    gathered = harness.worker().runner().jobs.claimed_reads
    assert made.count("BatchGetItem") >= 1
    assert gathered.reads == 10 and gathered.requests < 10, (gathered.requests, made)
    assert made.count("TransactWriteItems") == 20


@pytest.mark.parametrize("kind", [FaultKind.THROTTLE, FaultKind.SERVER_ERROR])
def test_a_failed_gathered_read_reads_each_job_alone_and_never_claims_it_again(
    harness: Harness, provider: FakeProviderServer, kind: FaultKind
) -> None:
    # Given a batch whose gathered read fails past botocore's retries
    job_ids, event, calls = _batch_with_overlapping_claims(harness)
    faults = AwsFaults()
    faults.arm(kind, "dynamodb.BatchGetItem")
    try:
        # When the worker runs it
        response = harness.worker().handler(event, LambdaContextStub())
    finally:
        faults.disarm()
    made = list(calls)
    # Then each job the failed request carried was read alone, once; no claim was made again
    # (ten claims, ten completions), and every job ran once and succeeded
    assert faults.fired, "the fault never took effect"
    assert response == {"batchItemFailures": []}
    assert made.count("TransactWriteItems") == 20, ", ".join(made)
    assert {job_id: _job(harness, job_id)["status"] for job_id in job_ids} == dict.fromkeys(
        job_ids, "succeeded"
    )
    assert [provider.calls_for(job_id) for job_id in job_ids] == [1] * 10


def test_config_rejects_a_receive_count_not_above_max_attempts() -> None:
    with pytest.raises(ValueError, match="max_receive_count"):
        LlmqConfig.model_validate({"max_attempts": 6, "max_receive_count": 6})


def test_job_started_is_sent_when_subscribed(harness: Harness) -> None:
    events = ["job.started", "job.succeeded"]
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook", "events": events}).body["id"]
    harness.drain("high")
    messages = [webhook_message(m) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert sorted(m["event"] for m in messages) == sorted(events)
    assert {m["job_id"] for m in messages} == {job_id}


def test_a_slow_visibility_change_of_one_record_never_costs_its_siblings_paid_answer(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a batch of two jobs in a worker invocation with 12 s to live: B answers after 5 s
    # (its call given about 9 s, the rest kept for its write), and A gets a 503 after 4 s, so
    # its message is handed back with a ChangeMessageVisibility that SQS answers only after
    # 9 s (one stalled connection; botocore reads for 10 s, and tries three times)
    job_a = harness.submit(prompt="a [[latency:4]] [[fail:503x1]]").body["id"]
    job_b = harness.submit(prompt="b [[latency:5]]").body["id"]
    url = harness.stack.lane_queue_urls["high"]
    messages: list[dict[str, Any]] = []
    while len(messages) < 2:
        messages += harness.receive(url)
    stalls = [1]

    def stalled(**_: Any) -> None:
        if stalls[0]:
            stalls[0] -= 1
            time.sleep(9.0)

    events = aws.client("sqs").meta.events
    events.register("before-call.sqs.ChangeMessageVisibility", stalled, unique_id="stalled-visibility")
    try:
        # When the worker runs the batch
        response = harness.run_worker(url, messages, timeout_seconds=12)
    finally:
        events.unregister("before-call.sqs.ChangeMessageVisibility", unique_id="stalled-visibility")
    # Then B's paid answer was read and recorded while SQS kept A's record waiting (on the
    # loop's own thread, it stopped B's read until B's provider deadline had passed: failed
    # as provider_timeout, or, with the Lambda killed first, paid again by the next attempt)
    assert stalls == [0]
    assert _job(harness, job_b)["status"] == "succeeded"
    assert provider.calls_for(job_b) == 1
    assert [failure["itemIdentifier"] for failure in response["batchItemFailures"]] == [
        m["MessageId"] for m in messages if job_a in m["Body"]
    ]


def test_a_provider_refusing_for_a_while_spends_no_attempt_and_counts_no_receive(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that refuses a job's first two calls before generating (529 overloaded),
    # and a deployment that refunds such refusals (the default)
    config = integration_config(provider, retry={"base_seconds": 0.2, "max_seconds": 1})
    assert config.retry.max_refusals == 10
    harness = Harness(moto_stack, config, monkeypatch)
    job_id = harness.submit(prompt="[[fail:529x2]]").body["id"]
    url = harness.stack.lane_queue_urls["high"]
    receive_counts: list[int] = []
    for _ in range(3):
        # When each message comes (a delayed copy after each refusal: SQS holds it a second)
        messages: list[dict[str, Any]] = []
        waited = time.monotonic() + 10
        while not messages and time.monotonic() < waited:
            messages = harness.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60, AttributeNames=["All"]
            ).get("Messages", [])
        receive_counts += [int(message["Attributes"]["ApproximateReceiveCount"]) for message in messages]
        # Then each is settled, none left to come back failed
        assert harness.run_worker(url, messages) == {"batchItemFailures": []}
    # And the job succeeds on its first attempt, the refusals refunded and counted (hunt 335:
    # each spent an attempt, and an outage of seconds failed the job retries_exhausted)
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"], provider.calls_for(job_id)) == ("succeeded", 1, 3)
    stored = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": job_id}})["Item"]
    assert stored["refusals"] == {"N": "2"}
    # And every message was a fresh copy, received once: refusals never count toward the DLQ
    assert receive_counts == [1, 1, 1]
