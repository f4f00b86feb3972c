"""The webhook dispatcher handler against moto and a real receiver on 127.0.0.1.

The receiver is addressed as http://receiver.test:<port>, a name only the injected resolver
knows: every delivery that arrives proves the connection went to the pinned address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from llmq import aws
from llmq.config import LlmqConfig, WebhookPolicy
from llmq.job_record import JobInput, JobRecord
from llmq.jobs import JobRepository
from llmq.models import (
    EVENT_FOR_STATUS,
    TERMINAL_EVENTS,
    ChatMessage,
    DeliveryAttempt,
    DeliveryStatus,
    JobOutputEvent,
    JobResult,
    JobStatus,
    WebhookEvent,
    WebhookMessage,
)
from llmq.queues import QueueRepository, job_snapshot, webhook_message_body
from llmq.ssrf import PinnedTransport, check_webhook_url
from llmq.telemetry import MetricName
from llmq.tenants import TenantRepository, UnknownTenant, new_webhook_secret
from llmq.webhooks import WebhookDispatcher, record_webhook_id, webhook_id
from llmq_sandbox.doubles.receiver import Answer, WebhookReceiver
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import REGION, MotoStack
from tests.integration.harness import LambdaContextStub, emitted_metrics, load_handler, sqs_event
from tests.support.dns import FakeDns
from tests.support.stores import ROOMY

SCHEDULE = [5, 300, 1800]
TENANT_ID = "ten_acme"


# ---- the world around the handler -------------------------------------------------------


@dataclass
class FakeClock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


class Stage:
    """Jobs and tenants in moto, the dispatcher handler, and SQS played by hand.

    `dispatch()` is one event source mapping poll: receive, invoke, delete what succeeded.
    `let_time_pass()` is the retry delay elapsing: the clock moves and the message is visible.
    """

    def __init__(
        self,
        stack: MotoStack,
        handler: ModuleType,
        config: LlmqConfig,
        receiver: WebhookReceiver,
        dns: FakeDns,
        clock: FakeClock,
    ) -> None:
        self.stack = stack
        self.handler = handler
        self.config = config
        self.receiver = receiver
        self.dns = dns
        self.clock = clock
        self.jobs = JobRepository(stack.jobs_table, config, dynamodb=aws.client("dynamodb"))
        self.tenants = TenantRepository(stack.tenants_table, dynamodb=aws.client("dynamodb"))
        self.tenant = self.tenants.create("Acme", "enterprise", tenant_id=TENANT_ID).tenant
        self.queues = QueueRepository({}, stack.webhook_queue_url, sqs=aws.client("sqs"))
        # The test's own client: its calls are not the handler's, and are not spied on.
        self.sqs: Any = boto3.client("sqs", region_name=REGION)
        self.visibility_changes: list[int] = []
        aws.client("sqs").meta.events.register(
            "before-parameter-build.sqs.ChangeMessageVisibility", self._spy_visibility
        )
        self.in_flight: list[dict[str, Any]] = []

    def _spy_visibility(self, params: dict[str, Any], **_: Any) -> None:
        self.visibility_changes.append(int(params["VisibilityTimeout"]))

    def job(
        self,
        path: str,
        job_id: str = "job_hooked",
        events: list[WebhookEvent] | None = None,
        status: JobStatus = JobStatus.SUCCEEDED,
        *,
        carry: bool = False,
    ) -> JobRecord:
        """A finished job whose terminal event is queued; `carry`: its message carries the
        job, as the worker's does after the terminal write."""
        url = self.receiver.url(path)
        # As at submit: the URL passes the guard before the job is stored.
        check_webhook_url(url, self.config.webhooks.allow_loopback_http, self.dns)
        now_ms = int(time.time() * 1000)
        record = JobRecord(
            id=job_id,
            tenant_id=TENANT_ID,
            status=status,
            lane="high",
            model="gpt-4o-mini",
            input=JobInput(messages=[ChatMessage(role="user", content="a prompt")]),
            request_hash="h",
            created_ms=now_ms - 2_000,
            started_ms=now_ms - 1_000,
            finished_ms=now_ms,
            result=JobResult(output="the answer"),
            webhook_url=url,
            webhook_events=list(TERMINAL_EVENTS) if events is None else events,
            delivery_status=DeliveryStatus.PENDING,
            expires_at=int(time.time()) + 86_400,
        )
        self.jobs.create(record, ROOMY)
        stored = self.jobs.find(record.id)
        assert stored is not None
        snapshot = job_snapshot(stored) if carry else None
        self.queues.enqueue_webhook(record.id, EVENT_FOR_STATUS[status], snapshot=snapshot)
        return record

    def delivery(self, job_id: str = "job_hooked") -> Any:
        record = self.jobs.find(job_id)
        assert record is not None, "the job must stay retrievable"
        webhook = record.to_job().webhook
        assert webhook is not None
        return webhook.delivery

    def queued(self) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.stack.webhook_queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )

    def receivable(self) -> int:
        response = self.sqs.receive_message(QueueUrl=self.stack.webhook_queue_url, VisibilityTimeout=0)
        return len(response.get("Messages", []))

    def dispatch(self) -> dict[str, Any]:
        messages = self.sqs.receive_message(
            QueueUrl=self.stack.webhook_queue_url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=60,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        assert messages, "nothing to dispatch"
        response: dict[str, Any] = self.handler.handler(
            sqs_event(self.sqs, self.stack.webhook_queue_url, messages), LambdaContextStub()
        )
        failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        for message in messages:
            if message["MessageId"] not in failed:
                self.sqs.delete_message(
                    QueueUrl=self.stack.webhook_queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
        self.in_flight = [message for message in messages if message["MessageId"] in failed]
        return response

    def let_time_pass(self, seconds: float) -> None:
        self.clock.now += seconds
        for message in self.in_flight:
            self.sqs.change_message_visibility(
                QueueUrl=self.stack.webhook_queue_url,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=0,
            )


@pytest.fixture
def stage(moto_stack: MotoStack, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> Stage:
    config = LlmqConfig(
        webhooks=WebhookPolicy(
            schedule_seconds=SCHEDULE,
            jitter_fraction=0,
            timeout_seconds=5,
            allow_loopback_http=True,
            trust_carried_job=True,
        )
    )
    for key, value in moto_stack.environ(config.model_dump_json()).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LLMQ_PUBLIC_API_URL", "https://api.llmq.test")
    handler = load_handler("webhook_dispatcher")
    dns = FakeDns({WebhookReceiver.HOSTNAME: ["127.0.0.1"]})
    clock = FakeClock()
    built = Stage(moto_stack, handler, config, receiver, dns, clock)
    dispatcher = WebhookDispatcher(
        JobRepository(handler.ENV.jobs_table, handler.ENV.config, dynamodb=aws.client("dynamodb")),
        TenantRepository(handler.ENV.tenants_table, dynamodb=aws.client("dynamodb")),
        handler.ENV.config,
        handler.ENV.public_api_url,
        resolver=dns,
        clock=clock,
    )
    monkeypatch.setattr(handler, "dispatcher", lambda: dispatcher)
    return built


# ---- signatures -------------------------------------------------------------------------


def test_a_delivered_webhook_verifies_with_the_reference_package(stage: Stage) -> None:
    # Given a succeeded job subscribed to its terminal event
    stage.job("/hooks/acme")
    # When the dispatcher runs
    response = stage.dispatch()
    # Then the receiver holds one POST that verifies with the tenant's secret
    assert response == {"batchItemFailures": []}
    [request] = stage.receiver.requests_to("/hooks/acme")
    payload = Webhook(stage.tenant.webhook_secrets[0]).verify(request.body, request.headers)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == "job_hooked"
    assert payload["data"]["result"]["output"] == "the answer"
    assert request.headers["host"] == f"{WebhookReceiver.HOSTNAME}:{stage.receiver.port}"
    assert request.headers["user-agent"] == "llmq-webhooks/1"
    # and the job shows the delivery
    delivery = stage.delivery()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)
    assert delivery.delivered_at is not None
    assert stage.queued() == 0


@pytest.mark.parametrize("root_level", [logging.INFO, logging.DEBUG])
def test_a_webhook_url_and_payload_never_reach_the_logs_whatever_the_root_level(
    stage: Stage, caplog: pytest.LogCaptureFixture, root_level: int
) -> None:
    # Given the root logger below WARNING, as Lambda sets it for a function whose application
    # log level is INFO or DEBUG, and a webhook URL carrying the integrator's token
    caplog.set_level(root_level)
    stage.job("/hooks/acme?token=integrator-secret-5521")
    # When the dispatcher delivers it
    assert stage.dispatch() == {"batchItemFailures": []}
    assert len(stage.receiver.requests_to("/hooks/acme?token=integrator-secret-5521")) == 1
    # Then no log holds the token (httpx logs each request's URL at INFO) nor the output
    assert caplog.records
    assert "integrator-secret-5521" not in caplog.text
    assert "the answer" not in caplog.text


def test_tampering_a_wrong_secret_or_an_old_timestamp_fail_verification(stage: Stage) -> None:
    stage.clock.now = time.time() - 600
    stage.job("/hooks/acme")
    stage.dispatch()
    [request] = stage.receiver.requests_to("/hooks/acme")
    secret = stage.tenant.webhook_secrets[0]
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(request.body, request.headers)
    fresh = dict(request.headers, **{"webhook-timestamp": str(int(time.time()))})
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(request.body, fresh)  # the timestamp is signed too
    stage.clock.now = time.time()
    stage.job("/hooks/other", job_id="job_other")
    stage.dispatch()
    [request] = stage.receiver.requests_to("/hooks/other")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(request.body.replace(b"the answer", b"the ANSWER"), request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(request.body, request.headers)


def test_during_rotation_each_secret_verifies_the_same_delivery(stage: Stage) -> None:
    # Given a tenant that rotated its secret, keeping the previous one in its grace period
    previous = stage.tenant.webhook_secrets[0]
    rotated = stage.tenants.rotate_webhook_secret(TENANT_ID)
    assert rotated.webhook_secrets[1] == previous
    # When a webhook goes out
    stage.job("/hooks/acme")
    stage.dispatch()
    # Then the old and the new secret each verify it
    [request] = stage.receiver.requests_to("/hooks/acme")
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in rotated.webhook_secrets:
        Webhook(secret).verify(request.body, request.headers)


def test_the_dispatcher_reads_a_tenants_secrets_as_last_written(stage: Stage) -> None:
    """A read of the tenant a moment after a rotation must see it: the secrets read are kept for
    `webhooks.secrets_cache_seconds`, so an eventually consistent read of the ones before could
    sign with a dropped secret for a whole cache time more (hunt 249). moto answers every read
    consistently, so what is checked is what the dispatcher asks DynamoDB for."""
    asked: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if params.get("TableName") == stage.stack.tenants_table:
            asked.append(params)

    events = aws.client("dynamodb").meta.events
    events.register("provide-client-params.dynamodb.GetItem", record)
    try:
        stage.job("/hooks/acme")
        stage.dispatch()
    finally:
        events.unregister("provide-client-params.dynamodb.GetItem", record)
    assert len(stage.receiver.requests_to("/hooks/acme")) == 1
    assert [params.get("ConsistentRead") for params in asked] == [True]


def test_a_rotation_is_used_within_the_cache_time_of_when_the_read_began(stage: Stage) -> None:
    # Given the dispatcher's read of a tenant's secrets that takes most of the cache time
    # (throttled, and retried by botocore)
    ttl = stage.config.webhooks.secrets_cache_seconds
    slowed: list[bool] = []

    def slow(params: dict[str, Any], **_: Any) -> None:
        if params.get("TableName") == stage.stack.tenants_table and not slowed:
            slowed.append(True)
            stage.clock.now += ttl - 5

    events = aws.client("dynamodb").meta.events
    events.register("provide-client-params.dynamodb.GetItem", slow)
    try:
        stage.job("/hooks/before", job_id="job_before")
        stage.dispatch()
    finally:
        events.unregister("provide-client-params.dynamodb.GetItem", slow)
    assert slowed and len(stage.receiver.requests_to("/hooks/before")) == 1
    # When the tenant rotates, dropping the previous secret, and the cache time since the read
    # began has passed
    rotated = stage.tenants.rotate_webhook_secret(TENANT_ID, keep_previous=False)
    stage.clock.now += 10
    stage.job("/hooks/after", job_id="job_after")
    stage.dispatch()
    # Then the next webhook is signed with the new secret (hunt 321: the cache was stamped when
    # the read returned, and the dropped secret signed alone for the read's time more)
    [request] = stage.receiver.requests_to("/hooks/after")
    Webhook(rotated.webhook_secrets[0]).verify(request.body, request.headers)


@pytest.mark.parametrize("a_keeps_previous", [True, False], ids=["rotate", "rotate --drop-previous"])
def test_two_rotations_at_once_both_keep_signing_and_an_unknown_tenant_is_refused(
    stage: Stage, monkeypatch: pytest.MonkeyPatch, a_keeps_previous: bool
) -> None:
    # Given operator A who has read the tenant's secrets, and operator B who rotates meanwhile
    tenants = stage.tenants
    read_by_a = tenants.get(TENANT_ID)
    rotated_by_b = tenants.rotate_webhook_secret(TENANT_ID)
    reads = iter([read_by_a])
    real_get = tenants.get
    monkeypatch.setattr(tenants, "get", lambda tenant_id: next(reads, None) or real_get(tenant_id))
    # When A's rotation writes what it read (dropping the previous secret, or not)
    rotated_by_a = tenants.rotate_webhook_secret(TENANT_ID, keep_previous=a_keeps_previous)
    # Then it rotated on top of B's: A's secret signs first, and B's, which B handed out, still
    # signs (hunt 263: a --drop-previous dropped it unseen); the secret both replaced does not
    stored = real_get(TENANT_ID).webhook_secrets
    assert (
        stored
        == rotated_by_a.webhook_secrets
        == [rotated_by_a.webhook_secrets[0], rotated_by_b.webhook_secrets[0]]
    )
    assert read_by_a.webhook_secrets[0] not in stored
    stage.job("/hooks/acme")
    stage.dispatch()
    [request] = stage.receiver.requests_to("/hooks/acme")
    Webhook(rotated_by_b.webhook_secrets[0]).verify(request.body, request.headers)
    # And a tenant that does not exist is refused, not created
    monkeypatch.setattr(tenants, "get", lambda tenant_id: dataclasses.replace(read_by_a, id="ten_gone"))
    with pytest.raises(UnknownTenant):
        tenants.rotate_webhook_secret("ten_gone")


def test_a_rotation_whose_write_was_applied_unanswered_rotates_once(stage: Stage) -> None:
    # Given a tenant's secret, which receivers verify with
    previous = stage.tenants.get(TENANT_ID).webhook_secrets[0]
    faults = AwsFaults()
    faults.arm(FaultKind.APPLIED_RETRIED, "dynamodb.UpdateItem")
    # When a rotation's write is applied by DynamoDB, its answer lost, and sent again by botocore
    try:
        rotated = stage.tenants.rotate_webhook_secret(TENANT_ID)
    finally:
        faults.disarm()
    # Then the rotation happened once: the new secret the operator was told signs first, and the
    # previous one, still in the receivers' hands, keeps signing
    assert [fired.fault.operation for fired in faults.fired] == ["dynamodb.UpdateItem"]
    assert stage.tenants.get(TENANT_ID).webhook_secrets == rotated.webhook_secrets
    assert rotated.webhook_secrets[1] == previous


# ---- retries ----------------------------------------------------------------------------


def test_500_500_200_is_delivered_on_the_third_attempt_on_schedule(stage: Stage) -> None:
    # Given a receiver that fails twice, then accepts
    stage.receiver.script("/hooks/flaky", 500, 500, 200)
    stage.job("/hooks/flaky")
    start = stage.clock.now
    # When SQS brings the message back after each delay
    first = stage.dispatch()
    assert len(first["batchItemFailures"]) == 1
    assert stage.visibility_changes == [SCHEDULE[0]]
    assert stage.receivable() == 0, "the message waits out its retry delay"
    assert (stage.delivery().status, stage.delivery().attempts, stage.delivery().last_status_code) == (
        "pending",
        1,
        500,
    )
    stage.let_time_pass(SCHEDULE[0])
    stage.dispatch()
    assert stage.visibility_changes == SCHEDULE[:2]
    stage.let_time_pass(SCHEDULE[1])
    last = stage.dispatch()
    # Then the third attempt is delivered, and the message is gone
    assert last == {"batchItemFailures": []}
    delivery = stage.delivery()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 3, 200)
    assert stage.queued() == 0
    # and every attempt carried the same id, signed afresh with a new timestamp
    requests = stage.receiver.requests_to("/hooks/flaky")
    assert {request.headers["webhook-id"] for request in requests} == {
        webhook_id("job_hooked", WebhookEvent.SUCCEEDED)
    }
    assert [int(request.headers["webhook-timestamp"]) for request in requests] == [
        int(start),
        int(start + SCHEDULE[0]),
        int(start + SCHEDULE[0] + SCHEDULE[1]),
    ]
    assert len({request.headers["webhook-signature"] for request in requests}) == 3


def test_when_the_schedule_is_exhausted_the_delivery_fails_and_the_job_stays(stage: Stage) -> None:
    stage.receiver.script("/hooks/down", *[503] * (len(SCHEDULE) + 1))
    stage.job("/hooks/down")
    for delay in SCHEDULE:
        stage.dispatch()
        stage.let_time_pass(delay)
    final = stage.dispatch()
    # Then the last attempt is acknowledged, not retried
    assert final == {"batchItemFailures": []}
    assert stage.queued() == 0
    assert stage.visibility_changes == SCHEDULE
    assert len(stage.receiver.requests_to("/hooks/down")) == len(SCHEDULE) + 1
    # and the job, still retrievable, says the delivery failed
    delivery = stage.delivery()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("failed", 4, 503)
    job = stage.jobs.find("job_hooked")
    assert job is not None and job.status is JobStatus.SUCCEEDED


@pytest.mark.parametrize("carry", [False, True], ids=["read", "carried"])
def test_410_to_a_jobs_started_event_stops_its_later_events_until_a_redelivery(
    stage: Stage, carry: bool
) -> None:
    # Given a job subscribed to job.started and job.succeeded, whose receiver answers 410 Gone
    stage.receiver.script("/hooks/gone-early", 410)
    stage.job("/hooks/gone-early", events=[WebhookEvent.STARTED, WebhookEvent.SUCCEEDED])
    stage.sqs.purge_queue(QueueUrl=stage.stack.webhook_queue_url)
    as_claimed = stage.jobs.find("job_hooked")
    assert as_claimed is not None
    # When its job.started event is answered 410
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.STARTED)
    assert stage.dispatch() == {"batchItemFailures": []}
    # Then its terminal event is not POSTed, even from a message carrying the job as the worker
    # read it before the 410, and its delivery says delivery was disabled
    snapshot = job_snapshot(as_claimed) if carry else None
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED, snapshot=snapshot)
    assert stage.dispatch() == {"batchItemFailures": []}
    assert len(stage.receiver.requests_to("/hooks/gone-early")) == 1
    assert stage.delivery().status == "disabled"
    assert stage.queued() == 0
    # And once the integrator fixed the endpoint, a redelivery sends it
    stored = stage.jobs.find("job_hooked")
    assert stored is not None
    pending = stage.jobs.mark_delivery_pending("job_hooked", TENANT_ID, read=stored)
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED, delivery_round=pending.delivery_round)
    stage.dispatch()
    assert [request.path for request in stage.receiver.requests] == ["/hooks/gone-early"] * 2
    assert stage.delivery().status == "delivered"


def test_410_to_a_jobs_started_event_whose_write_is_throttled_still_stops_its_terminal_event(
    stage: Stage,
) -> None:
    # Given a job subscribed to job.started and job.succeeded, whose receiver answers 410 Gone,
    # and DynamoDB throttling the write that records it, once (botocore's own tries included)
    stage.receiver.script("/hooks/gone-throttled", 410, 200)
    stage.job("/hooks/gone-throttled", events=[WebhookEvent.STARTED, WebhookEvent.SUCCEEDED])
    stage.sqs.purge_queue(QueueUrl=stage.stack.webhook_queue_url)
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "dynamodb.UpdateItem")
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.STARTED)
    try:
        # When its job.started event is answered 410
        assert stage.dispatch() == {"batchItemFailures": []}
    finally:
        faults.disarm()
    assert [fired.fault.operation for fired in faults.fired] == ["dynamodb.UpdateItem"]
    # Then the 410 is written all the same (hunt 321: the message came back once the job had
    # ended, was skipped, and the 410 was never written), and the terminal event is not POSTed
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED)
    assert stage.dispatch() == {"batchItemFailures": []}
    assert len(stage.receiver.requests_to("/hooks/gone-throttled")) == 1
    assert stage.delivery().status == "disabled"


@pytest.mark.parametrize("kind", [FaultKind.APPLIED_LOST, FaultKind.APPLIED_RETRIED])
def test_a_redelivery_applied_with_its_answer_lost_is_read_back_as_the_round_stored(
    stage: Stage, kind: FaultKind
) -> None:
    # Given a delivered job, and a redelivery's write DynamoDB applies while every answer is
    # lost, or applies twice (botocore's resend of a write whose answer was lost)
    stage.receiver.script("/hooks/again", 200, 200)
    stage.job("/hooks/again")
    stage.dispatch()
    assert stage.delivery().status == "delivered"
    stored = stage.jobs.find("job_hooked")
    assert stored is not None
    faults = AwsFaults()
    faults.arm(kind, "dynamodb.UpdateItem")
    try:
        pending = stage.jobs.mark_delivery_pending("job_hooked", TENANT_ID, read=stored)
    finally:
        faults.disarm()
    assert [fired.fault.operation for fired in faults.fired] == ["dynamodb.UpdateItem"]
    # Then it is the round stored, read back (hunt 321: a 503 whose retry started another)
    found = stage.jobs.find("job_hooked")
    assert found is not None and found.delivery_round > stored.delivery_round
    assert (pending.delivery_round, pending.delivery_status) == (found.delivery_round, DeliveryStatus.PENDING)
    # And its message is delivered, under the job's one webhook-id
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED, delivery_round=pending.delivery_round)
    stage.dispatch()
    posts = stage.receiver.requests_to("/hooks/again")
    assert len(posts) == 2 and len({post.headers["webhook-id"] for post in posts}) == 1
    assert stage.delivery().status == "delivered"


class _ResentAcrossARedelivery:
    """The dispatcher's DynamoDB client: its first delivery record is applied, its answer lost;
    a redelivery (the api's) lands; then botocore sends the same record again."""

    def __init__(self, real: Any, stage: Stage) -> None:
        self.real = real
        self._stage = stage
        self.rounds: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def update_item(self, **kwargs: Any) -> Any:
        token = kwargs.get("ExpressionAttributeValues", {}).get(":token", {}).get("S", "")
        if not self.rounds and token.startswith("delivery#"):
            self.real.update_item(**kwargs)  # applied; its answer lost
            stored = self._stage.jobs.find("job_hooked")
            assert stored is not None
            self.rounds.append(
                self._stage.jobs.mark_delivery_pending("job_hooked", TENANT_ID, read=stored).delivery_round
            )
        return self.real.update_item(**kwargs)


@pytest.mark.parametrize("first", [200, 500])
def test_an_attempts_record_resent_across_a_redelivery_never_lands_on_the_new_round(
    stage: Stage, first: int
) -> None:
    # Given a finished job whose first attempt is answered `first`
    stage.receiver.script("/hooks/resent", first, 200, 200)
    stage.job("/hooks/resent")
    jobs = stage.handler.dispatcher()._jobs
    spy = _ResentAcrossARedelivery(jobs._ddb, stage)
    jobs._ddb = spy
    try:
        # When the attempt's record is applied with its answer lost, a redelivery lands, and
        # botocore resends the record
        stage.dispatch()
    finally:
        jobs._ddb = spy.real
    assert spy.rounds == [1]
    # Then the new round has made no attempt yet (review 277: the resend, not knowing its own
    # write once the redelivery rewrote its token, landed on the new round: delivered, so the
    # redelivery was never POSTed, or waiting out the old round's backoff)
    after = stage.jobs.find("job_hooked")
    assert after is not None
    assert (after.delivery_status, after.delivery_attempts, after.delivery_next_ms) == (
        DeliveryStatus.PENDING,
        0,
        None,
    )
    # And the redelivery's message POSTs the event at once
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED, delivery_round=1)
    stage.dispatch()
    assert len(stage.receiver.requests_to("/hooks/resent")) == 2


@pytest.mark.parametrize("carry", [False, True], ids=["read", "carried"])
def test_a_message_of_the_round_before_a_redelivery_is_dropped_at_its_next_receive(
    stage: Stage, carry: bool
) -> None:
    """Hunt 211: the old round's message waited behind the new round's after every one of its
    attempts, each wait a receive, until it reached the webhooks DLQ (a false alarm), and one
    back while the new round's first POST was slow POSTed beside it."""
    # Given a job whose first attempt failed: its message m1 carries the next attempt
    stage.job("/hooks/fail-99", carry=carry)
    assert stage.dispatch()["batchItemFailures"]
    m1 = stage.in_flight
    # When the integrator asks for a redelivery (as `Intake.redeliver`), whose message m2 makes
    # the new round's first attempt
    stored = stage.jobs.find("job_hooked")
    assert stored is not None
    pending = stage.jobs.mark_delivery_pending("job_hooked", TENANT_ID, read=stored)
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED, delivery_round=pending.delivery_round)
    assert stage.dispatch()["batchItemFailures"]
    assert stage.delivery().attempts == 1
    # And m1 comes back for its attempt
    stage.in_flight = m1
    stage.let_time_pass(SCHEDULE[0] + 1)
    response = stage.dispatch()
    # Then it is acknowledged without a POST: the new round's message carries the event
    assert response == {"batchItemFailures": []}
    assert len(stage.receiver.requests_to("/hooks/fail-99")) == 2
    assert stage.delivery().attempts == 1
    assert stage.queued() == 1


def test_a_copy_that_only_waits_counts_no_failed_attempt(
    stage: Stage, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hunt 211: WebhookRetried, which WebhooksNoneDelivered weighs against deliveries as
    failed attempts, counted every receive that only waited too."""
    # Given a job whose first attempt failed (one failed attempt counted)
    stage.job("/hooks/fail-99")
    capsys.readouterr()
    assert stage.dispatch()["batchItemFailures"]
    (record,) = emitted_metrics(capsys.readouterr().out, MetricName.WEBHOOK_RETRIED)
    assert record[MetricName.WEBHOOK_RETRIED] == [1.0]
    # When a copy of its message comes before the next attempt is due, and waits
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED)
    assert stage.dispatch()["batchItemFailures"]
    # Then it POSTed nothing and counts no failed attempt
    assert len(stage.receiver.requests_to("/hooks/fail-99")) == 1
    assert emitted_metrics(capsys.readouterr().out, MetricName.WEBHOOK_RETRIED) == []


def test_410_disables_delivery_after_one_attempt(stage: Stage) -> None:
    stage.receiver.script("/hooks/gone", 410)
    stage.job("/hooks/gone")
    assert stage.dispatch() == {"batchItemFailures": []}
    assert len(stage.receiver.requests_to("/hooks/gone")) == 1
    assert stage.delivery().status == "disabled"
    assert stage.queued() == 0


def test_a_redirect_is_a_failure_and_its_location_is_never_requested(stage: Stage) -> None:
    stage.receiver.script("/hooks/moved", Answer(301, {"Location": "/hooks/elsewhere"}))
    stage.job("/hooks/moved")
    response = stage.dispatch()
    assert len(response["batchItemFailures"]) == 1
    assert stage.receiver.requests_to("/hooks/elsewhere") == []
    assert [request.path for request in stage.receiver.requests] == ["/hooks/moved"]
    assert (stage.delivery().status, stage.delivery().last_status_code) == ("pending", 301)
    assert stage.visibility_changes == [SCHEDULE[0]]


def test_retry_after_on_429_sets_the_message_visibility(stage: Stage) -> None:
    stage.receiver.script("/hooks/busy", Answer(429, {"Retry-After": "120"}))
    stage.job("/hooks/busy")
    stage.dispatch()
    [visibility] = stage.visibility_changes
    assert visibility >= 120
    assert stage.receivable() == 0


def test_a_day_long_retry_after_brings_the_message_back_when_its_attempt_is_due(stage: Stage) -> None:
    # Given a receiver that asks for a day's pause, longer than SQS can hide a message
    stage.receiver.script("/hooks/tomorrow", Answer(429, {"Retry-After": "86400"}))
    stage.job("/hooks/tomorrow")
    # When the attempt is made
    stage.dispatch()
    # Then the next attempt is due when its message comes back, not later: a message that came
    # back early would spend a receive only to wait (two a retry, towards the DLQ)
    [visibility] = stage.visibility_changes
    job = stage.jobs.find("job_hooked")
    assert job is not None and job.delivery_next_ms is not None
    assert abs(job.delivery_next_ms / 1000 - stage.clock.now - visibility) <= 1


@pytest.mark.parametrize("status", [200, 429])
def test_a_retry_after_no_date_can_hold_is_ignored_not_a_crash(stage: Stage, status: int) -> None:
    # Given a receiver whose answer carries a Retry-After date past year 9999
    stage.receiver.script(
        "/hooks/odd", Answer(status, {"Retry-After": "Wed, 21 Oct 99999999999 07:28:00 GMT"})
    )
    stage.job("/hooks/odd")
    # When the event is delivered, then the answer is recorded as it was: delivered, or failed
    # and retried on the schedule alone
    stage.dispatch()
    assert stage.delivery().attempts == 1
    assert stage.delivery().last_status_code == status
    expected = "delivered" if status == 200 else "pending"
    assert stage.delivery().status == expected
    if status == 429:
        assert stage.visibility_changes == [SCHEDULE[0]]


def _job_asked_for_later_near_its_end(stage: Stage) -> None:
    """A job whose retention ends in a minute, and a receiver that asks to be tried in 2 h."""
    stage.receiver.script("/hooks/later", Answer(429, {"Retry-After": "7200"}))
    stage.job("/hooks/later")
    aws.client("dynamodb").update_item(
        TableName=stage.stack.jobs_table,
        Key={"pk": {"S": "job_hooked"}},
        UpdateExpression="SET expires_at = :at",
        ExpressionAttributeValues={":at": {"N": str(int(time.time()) + 60)}},
    )


def test_a_long_retry_after_near_the_end_of_the_retention_keeps_the_job_for_that_attempt(
    stage: Stage,
) -> None:
    # Given a job whose retention ends in a minute, and a receiver that asks to be tried in 2 h
    _job_asked_for_later_near_its_end(stage)
    # When the first attempt is answered so
    stage.dispatch()
    # Then the job is kept until that attempt (and a poll) can still find it
    assert stage.visibility_changes and stage.visibility_changes[0] >= 7200
    item = aws.client("dynamodb").get_item(TableName=stage.stack.jobs_table, Key={"pk": {"S": "job_hooked"}})[
        "Item"
    ]
    assert int(item["expires_at"]["N"]) >= time.time() + 7200
    assert stage.delivery().status == "pending"


def test_a_long_retry_after_never_keeps_the_job_past_its_retention_and_one_slowest_round(
    stage: Stage,
) -> None:
    """However often a tenant redelivers and its receiver asks for the longest wait, its job is
    kept no longer than its payloads are (hunt 281: each round's Retry-After kept it again, for
    good, past its S3 objects' lifetime, and GET then failed)."""
    # Given a job kept past its retention by earlier rounds, within an hour of the longest any
    # job is kept, and a receiver that asks to be tried in 2 h
    _job_asked_for_later_near_its_end(stage)
    bound = int(time.time()) + 3600
    created_ms = (bound - stage.config.retention_seconds - stage.config.delivery_keep_seconds) * 1000
    aws.client("dynamodb").update_item(
        TableName=stage.stack.jobs_table,
        Key={"pk": {"S": "job_hooked"}},
        UpdateExpression="SET created_ms = :created",
        ExpressionAttributeValues={":created": {"N": str(created_ms)}},
    )
    # When the attempt is answered so
    stage.dispatch()
    # Then the attempt is still scheduled as asked, and the job kept to the bound, not past it
    assert stage.visibility_changes and stage.visibility_changes[0] >= 7200
    item = aws.client("dynamodb").get_item(TableName=stage.stack.jobs_table, Key={"pk": {"S": "job_hooked"}})[
        "Item"
    ]
    assert int(item["expires_at"]["N"]) == stage.config.kept_until_s(created_ms) == bound


@pytest.mark.parametrize(
    ("kind", "nth"),
    [(FaultKind.APPLIED_LOST, 1), (FaultKind.THROTTLE, 2)],
    ids=["first-write-applied-answer-lost", "second-write-throttled"],
)
def test_a_long_retry_after_near_the_end_of_the_retention_keeps_the_job_whichever_write_fails(
    stage: Stage, kind: FaultKind, nth: int
) -> None:
    # Given a job whose retention ends in a minute, and a receiver that asks to be tried in 2 h
    _job_asked_for_later_near_its_end(stage)
    # When the attempt is answered so, and one of the dispatcher's two writes (keeping the job,
    # recording the attempt) fails: its answer lost, or throttled past botocore's retries
    faults = AwsFaults()
    try:
        faults.arm(kind, "dynamodb.UpdateItem", nth=nth)
        stage.dispatch()
        assert faults.fired, "the fault never fired"
    finally:
        faults.disarm()
    # Then the job is kept until the attempt the receiver asked for, whatever comes back for it
    item = aws.client("dynamodb").get_item(TableName=stage.stack.jobs_table, Key={"pk": {"S": "job_hooked"}})[
        "Item"
    ]
    assert int(item["expires_at"]["N"]) >= time.time() + 7200


def test_keeping_a_job_for_a_late_attempt_never_shortens_what_a_redelivery_kept(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose retention ends in a minute, a receiver that asks for 2 h, and a
    # redelivery that keeps the job for 10 days just after the dispatcher read it
    stage.receiver.script("/hooks/later-again", Answer(429, {"Retry-After": "7200"}))
    stage.job("/hooks/later-again")
    ddb = aws.client("dynamodb")
    ddb.update_item(
        TableName=stage.stack.jobs_table,
        Key={"pk": {"S": "job_hooked"}},
        UpdateExpression="SET expires_at = :at",
        ExpressionAttributeValues={":at": {"N": str(int(time.time()) + 60)}},
    )
    kept_by_redelivery = int(time.time()) + 10 * 86_400
    record = JobRepository.record_delivery

    def redelivered_meanwhile(self: Any, *args: Any, **kwargs: Any) -> bool:
        ddb.update_item(
            TableName=stage.stack.jobs_table,
            Key={"pk": {"S": "job_hooked"}},
            UpdateExpression="SET expires_at = :at",
            ExpressionAttributeValues={":at": {"N": str(kept_by_redelivery)}},
        )
        return record(self, *args, **kwargs)

    monkeypatch.setattr(JobRepository, "record_delivery", redelivered_meanwhile)
    # When the attempt is answered so and recorded
    stage.dispatch()
    # Then the job is kept as long as the redelivery asked, not cut back to the late attempt's
    item = ddb.get_item(TableName=stage.stack.jobs_table, Key={"pk": {"S": "job_hooked"}})["Item"]
    assert int(item["expires_at"]["N"]) == kept_by_redelivery


# ---- SSRF at send time, duplicates, poison ----------------------------------------------


def test_a_host_rebound_to_a_private_address_after_submit_is_not_contacted(stage: Stage) -> None:
    # Given a job whose URL passed the guard at submit
    stage.job("/hooks/acme")
    # When the receiver's DNS answer switches to a private address before the send
    stage.dns.answers[WebhookReceiver.HOSTNAME] = ["10.0.0.7"]
    response = stage.dispatch()
    # Then no request reaches anyone, and the delivery follows the failure path
    assert stage.receiver.requests == []
    assert len(response["batchItemFailures"]) == 1
    assert stage.visibility_changes == [SCHEDULE[0]]
    delivery = stage.delivery()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 1, None)


class _DroppingAddress:
    """A listener on 127.0.0.3 whose accept queue is full: the kernel drops SYNs to it, as a
    node down behind round-robin DNS, or a security group, does."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.3", port))
        self.sock.listen(0)
        self.queued: list[socket.socket] = []
        for _ in range(4):
            client = socket.socket()
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.3", port))
            self.queued.append(client)
        time.sleep(0.2)

    def close(self) -> None:
        for client in self.queued:
            client.close()
        self.sock.close()


def test_a_receiver_with_one_dead_address_among_its_own_is_reached_on_a_live_one(stage: Stage) -> None:
    # Given a receiver whose name resolves to two addresses, the first of which drops SYNs
    dead = _DroppingAddress(stage.receiver.port)
    stage.dns.answers[WebhookReceiver.HOSTNAME] = ["127.0.0.3", "127.0.0.1"]
    stage.job("/hooks/multi")
    # When the dispatcher delivers
    try:
        stage.dispatch()
    finally:
        dead.close()
    # Then the live address gets the event at this attempt (hunt 258: the dead one took the
    # whole attempt's timeout, the live one was never dialled, and every retry did the same)
    assert len(stage.receiver.requests_to("/hooks/multi")) == 1
    delivery = stage.delivery()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)


def test_a_first_job_started_is_posted_even_once_the_job_has_ended(stage: Stage) -> None:
    # Given jobs that ended before the dispatcher read them: one subscribed to job.started
    # alone, one to job.started and its terminal event
    stage.job("/hooks/started-only", job_id="job_started_only", events=[WebhookEvent.STARTED])
    stage.job("/hooks/short", job_id="job_short", events=[WebhookEvent.STARTED, WebhookEvent.SUCCEEDED])
    stage.sqs.purge_queue(QueueUrl=stage.stack.webhook_queue_url)
    for job_id in ("job_started_only", "job_short"):
        stage.queues.enqueue_webhook(job_id, WebhookEvent.STARTED)
    # When the dispatcher sends their job.started
    stage.dispatch()
    # Then each is posted: a receiver would otherwise never hear of a start it asked for
    assert sorted(request.path for request in stage.receiver.requests) == [
        "/hooks/short",
        "/hooks/started-only",
    ]


def _set_status(stage: Stage, status: JobStatus) -> None:
    aws.client("dynamodb").update_item(
        TableName=stage.stack.jobs_table,
        Key={"pk": {"S": "job_hooked"}},
        UpdateExpression="SET #st = :status",
        ExpressionAttributeNames={"#st": "status"},
        ExpressionAttributeValues={":status": {"S": status.value}},
    )


def test_a_job_started_retry_is_not_posted_once_the_job_has_ended(stage: Stage) -> None:
    # Given a job's job.started refused by the receiver (503), while the job runs
    stage.receiver.script("/hooks/order", 503, 200, 200)
    stage.job("/hooks/order", events=[WebhookEvent.STARTED, WebhookEvent.SUCCEEDED])
    stage.sqs.purge_queue(QueueUrl=stage.stack.webhook_queue_url)
    _set_status(stage, JobStatus.RUNNING)
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.STARTED)
    assert len(stage.dispatch()["batchItemFailures"]) == 1
    started = stage.in_flight
    # When the job ends and its job.succeeded is delivered, and then job.started's retry is due
    _set_status(stage, JobStatus.SUCCEEDED)
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED)
    stage.dispatch()
    assert stage.delivery().status == "delivered"
    stage.in_flight = started
    stage.let_time_pass(SCHEDULE[0])
    assert stage.dispatch()["batchItemFailures"] == []
    # Then the receiver never hears job.started after job.succeeded
    types = [json.loads(request.body)["type"] for request in stage.receiver.requests]
    assert types == ["job.started", "job.succeeded"]


@pytest.mark.parametrize("event", [WebhookEvent.STARTED, WebhookEvent.OUTPUT])
def test_a_running_event_sent_again_after_the_terminal_one_was_delivered_is_not_posted(
    stage: Stage, event: WebhookEvent
) -> None:
    # Given a job whose job.succeeded its receiver has (delivered)
    stage.job("/hooks/order", events=[WebhookEvent.STARTED, WebhookEvent.OUTPUT, WebhookEvent.SUCCEEDED])
    stage.dispatch()
    assert stage.delivery().status == "delivered"
    # When a job.started or job.output message comes as a first receive (an operator's redrive
    # from the webhooks DLQ starts its receive count anew)
    output = JobOutputEvent(id="job_hooked", seq_from=0, seq_to=1, attempt=1, delta="hi")
    stage.sqs.send_message(
        QueueUrl=stage.stack.webhook_queue_url,
        MessageBody=webhook_message_body(
            WebhookMessage(
                job_id="job_hooked", event=event, output=output if event is WebhookEvent.OUTPUT else None
            )
        ),
    )
    assert stage.dispatch()["batchItemFailures"] == []
    # Then the receiver never hears of the job running after it heard it ended
    types = [json.loads(request.body)["type"] for request in stage.receiver.requests]
    assert types == ["job.succeeded"]


def test_a_duplicate_message_for_a_delivered_job_is_not_posted_again(stage: Stage) -> None:
    stage.job("/hooks/acme")
    stage.dispatch()
    # When the same event is queued again (a duplicate send, a reconciler race)
    stage.queues.enqueue_webhook("job_hooked", WebhookEvent.SUCCEEDED)
    response = stage.dispatch()
    # Then it is acknowledged without a second POST
    assert response == {"batchItemFailures": []}
    assert len(stage.receiver.requests_to("/hooks/acme")) == 1
    assert stage.delivery().attempts == 1
    assert stage.queued() == 0


def test_a_malformed_message_is_reported_failed_without_any_request(stage: Stage) -> None:
    stage.sqs.send_message(QueueUrl=stage.stack.webhook_queue_url, MessageBody="not json")
    response = stage.dispatch()
    assert len(response["batchItemFailures"]) == 1
    assert stage.receiver.requests == []
    assert stage.visibility_changes == [0]


# ---- the pinned connection over real sockets ---------------------------------------------


async def test_the_pinned_transport_reaches_a_fake_hostname_on_its_checked_address(
    receiver: WebhookReceiver,
) -> None:
    # Given a hostname nothing but the injected resolver knows, checked to 127.0.0.1
    url = receiver.url("/hooks/pinned")
    target = check_webhook_url(url, True, FakeDns({WebhookReceiver.HOSTNAME: ["127.0.0.1"]}))
    # When a request is sent through the pinned transport
    async with httpx.AsyncClient(transport=PinnedTransport(target)) as client:
        response = await client.post(url, content=b"{}")
    # Then it reached the receiver, with the hostname as Host
    assert response.status_code == 200
    [request] = receiver.requests_to("/hooks/pinned")
    assert request.headers["host"] == f"{WebhookReceiver.HOSTNAME}:{receiver.port}"


def _self_signed(tmp_path: Path, hostname: str) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"{hostname}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        + certificate.public_bytes(serialization.Encoding.PEM)
    )
    return path


class _TlsServer:
    """An HTTPS server on 127.0.0.1 that records the SNI name each client sent."""

    def __init__(self, pem: Path) -> None:
        self.server_names: list[str | None] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pem)
        context.sni_callback = lambda _socket, name, _context: self.server_names.append(name)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


async def test_tls_verifies_the_certificate_and_sends_sni_for_the_hostname(tmp_path: Path) -> None:
    # Given an HTTPS receiver on 127.0.0.1 whose certificate names receiver.test
    pem = _self_signed(tmp_path, WebhookReceiver.HOSTNAME)
    server = _TlsServer(pem)
    trust = ssl.create_default_context(cafile=str(pem))
    dns = FakeDns({WebhookReceiver.HOSTNAME: ["127.0.0.1"], "impostor.test": ["127.0.0.1"]})
    try:
        # When a pinned request goes to https://receiver.test
        url = f"https://{WebhookReceiver.HOSTNAME}:{server.port}/hooks"
        target = check_webhook_url(url, True, dns)
        async with httpx.AsyncClient(transport=PinnedTransport(target, verify=trust)) as client:
            response = await client.post(url, content=b"{}")
        # Then the handshake named and verified the hostname, not the IP
        assert response.status_code == 204
        assert server.server_names == [WebhookReceiver.HOSTNAME]
        # and a hostname the certificate does not name is refused, though the IP is the same
        other = f"https://impostor.test:{server.port}/hooks"
        impostor = check_webhook_url(other, True, dns)
        async with httpx.AsyncClient(transport=PinnedTransport(impostor, verify=trust)) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.post(other, content=b"{}")
    finally:
        server.stop()


# ---- the delivery log -------------------------------------------------------------------


def test_each_attempt_is_logged_with_its_status_latency_and_the_head_of_the_answer(stage: Stage) -> None:
    # Given a receiver that fails with a long error page, times out... then accepts
    page = ("é" * 200 + "<html>" + "x" * 1000).encode()
    stage.receiver.script("/hooks/log", Answer(500, body=page), 503, Answer(200, body=b'{"ok":true}'))
    stage.job("/hooks/log")
    for delay in SCHEDULE[:2]:
        stage.dispatch()
        stage.let_time_pass(delay)
    assert stage.dispatch() == {"batchItemFailures": []}
    # When the integrator reads the job's delivery log
    job = stage.jobs.find("job_hooked")
    assert job is not None
    log = job.webhook_log()
    assert log is not None
    (deliveries,) = log.deliveries
    # Then it shows the terminal event delivered, and each attempt in order, with what the
    # receiver answered: its status and the first 256 bytes of its body (UTF-8, a character
    # cut at the limit replaced)
    assert (deliveries.event, deliveries.status) == (WebhookEvent.SUCCEEDED, DeliveryStatus.DELIVERED)
    attempts = deliveries.attempts
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 503), (3, 200)]
    assert attempts[0].response_head is not None
    assert attempts[0].response_head.encode("utf-8", "replace").startswith("é".encode() * 128)
    assert len(attempts[0].response_head.encode()) <= 256
    # and the receiver was asked for an answer it can be read from: uncompressed
    assert {
        request.headers.get("accept-encoding") for request in stage.receiver.requests_to("/hooks/log")
    } == {"identity"}
    assert attempts[1].response_head is None
    assert attempts[2].response_head == '{"ok":true}'
    assert all(a.latency_ms >= 0 and a.error_class is None for a in attempts)
    assert [a.at for a in attempts] == sorted(a.at for a in attempts)


def test_the_log_keeps_the_latest_ten_attempts_across_a_redelivery(stage: Stage) -> None:
    # Given a delivery that failed eight times, then a redelivery that failed once and succeeded
    stage.receiver.script("/hooks/many", *[500] * len(SCHEDULE), 410)
    stage.job("/hooks/many")

    def log_attempt(attempt: int, status: DeliveryStatus, code: int, previous: int) -> None:
        job = stage.jobs.find("job_hooked")
        assert job is not None
        entry = DeliveryAttempt(
            attempt=attempt, at="2026-12-02T10:00:00.000Z", status_code=code, latency_ms=1
        )
        assert stage.jobs.record_delivery(
            "job_hooked",
            status,
            code,
            1.0,
            previous_attempts=previous,
            attempt=entry,
            log_seq=job.delivery_log_seq,
        )

    for n in range(1, 9):
        log_attempt(n, DeliveryStatus.FAILED if n == 8 else DeliveryStatus.PENDING, 500, n - 1)
    stage.jobs.mark_delivery_pending("job_hooked", TENANT_ID)
    log_attempt(1, DeliveryStatus.PENDING, 503, 0)
    log_attempt(2, DeliveryStatus.DELIVERED, 200, 1)
    job = stage.jobs.find("job_hooked")
    assert job is not None
    # Then the log holds the latest ten attempts in the order they were made, each round's
    # numbers as they were: the first round's 1..8, then the redelivery's 1 and 2
    assert [(a.attempt, a.status_code) for a in job.delivery_log] == [
        *[(n, 500) for n in range(1, 9)],
        (1, 503),
        (2, 200),
    ]
    # And one more attempt pushes out the oldest
    stage.jobs.mark_delivery_pending("job_hooked", TENANT_ID)
    log_attempt(1, DeliveryStatus.DELIVERED, 204, 0)
    job = stage.jobs.find("job_hooked")
    assert job is not None
    assert [a.attempt for a in job.delivery_log] == [*range(2, 9), 1, 2, 1]


def test_a_2xx_whose_body_stalls_is_delivered_and_its_head_left_out(stage: Stage) -> None:
    # Given a receiver that answers 200 at once, then never sends the body it announced
    server = _StallingReceiver()
    stage.job("/hooks/stall")
    _point_webhook_at(stage, f"http://{WebhookReceiver.HOSTNAME}:{server.port}/hooks/stall")
    try:
        response = stage.dispatch()
    finally:
        server.close()
    # Then the delivery counts as delivered (its verdict is the status line's), the head empty
    assert response == {"batchItemFailures": []}
    job = stage.jobs.find("job_hooked")
    assert job is not None and job.delivery_status is DeliveryStatus.DELIVERED
    (attempt,) = job.delivery_log
    assert (attempt.status_code, attempt.error_class, attempt.response_head) == (200, None, None)


class _StallingReceiver:
    """Answers every request with a 200 status line announcing a body it never sends."""

    def __init__(self) -> None:
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen()
        self.port = int(self._socket.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._socket.settimeout(0.2)
        held = []
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:
                continue
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            held.append(connection)  # open, silent
        for connection in held:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


def _point_webhook_at(stage: Stage, url: str) -> None:
    """The job's webhook URL as if it had been submitted so."""
    aws.client("dynamodb").update_item(
        TableName=stage.stack.jobs_table,
        Key={"pk": {"S": "job_hooked"}},
        UpdateExpression="SET webhook_url = :url",
        ExpressionAttributeValues={":url": {"S": url}},
    )


def test_an_answer_that_never_comes_is_logged_with_its_error_class(stage: Stage) -> None:
    # Given a webhook URL on a port where nothing listens
    stage.job("/hooks/none")
    _point_webhook_at(stage, str(httpx.URL(stage.receiver.url("/hooks/none")).copy_with(port=_closed_port())))
    stage.dispatch()
    job = stage.jobs.find("job_hooked")
    assert job is not None
    (attempt,) = job.delivery_log
    assert (attempt.attempt, attempt.status_code, attempt.error_class) == (1, None, "ConnectError")
    assert attempt.response_head is None


def test_a_connection_that_fails_in_an_unforeseen_way_is_a_failed_attempt_not_a_crash(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a send whose transport fails with what no HTTP client error covers (a socket
    # refusing the address, raised as an ExceptionGroup)
    stage.job("/hooks/odd")

    class Refusing(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise ExceptionGroup("connect", [OverflowError("port must be 0-65535.")])

    dispatcher = stage.handler.dispatcher()
    monkeypatch.setattr(dispatcher, "_transport_factory", lambda target: Refusing())
    # When the dispatcher sends it
    response = stage.dispatch()
    # Then it is a failed attempt, recorded and retried on the schedule
    assert len(response["batchItemFailures"]) == 1
    assert stage.visibility_changes == [SCHEDULE[0]]
    delivery = stage.delivery()
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    job = stage.jobs.find("job_hooked")
    assert job is not None
    assert [attempt.error_class for attempt in job.delivery_log] == ["ExceptionGroup"]


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---- the job carried in its message ---------------------------------------------------------


def _dynamodb_calls() -> list[str]:
    """The names of the DynamoDB calls made through the shared client from now on."""
    calls: list[str] = []
    aws.client("dynamodb").meta.events.register(
        "before-call.dynamodb.*", lambda event_name, **_: calls.append(event_name.split(".")[-1])
    )
    return calls


def test_a_message_that_carries_its_job_is_delivered_with_one_write_and_no_read(stage: Stage) -> None:
    # Given two finished jobs whose messages carry them, as the worker sends them
    stage.job("/hooks/ok", job_id="job_first", carry=True)
    stage.dispatch()
    stage.job("/hooks/ok", job_id="job_second", carry=True)
    before = stage.jobs.find("job_second")
    assert before is not None
    calls = _dynamodb_calls()
    # When the second is dispatched (the tenant's secrets cached by the first)
    assert stage.dispatch() == {"batchItemFailures": []}
    # Then it made one AWS call, the write that records the delivery
    assert len(calls) == 1 and calls[0] in {"UpdateItem", "TransactWriteItems"}
    assert stage.delivery("job_second").status == "delivered"
    # And the receiver got the job as a read would have shown it, signed, without its prompt
    post = stage.receiver.requests_to("/hooks/ok")[-1]
    payload = Webhook(stage.tenant.webhook_secrets[0]).verify(post.body, dict(post.headers))
    assert payload["data"] == json.loads(before.to_job(api_base="https://api.llmq.test").model_dump_json())
    assert "a prompt" not in post.body.decode()


def test_a_job_carried_by_a_worker_of_the_release_before_signs_its_attempts_under_one_id(
    stage: Stage,
) -> None:
    # Given a job stored with webhook-ids by creation (as this release's api stores every job),
    # whose terminal message a worker of the release before sent: its carried job has no word
    # of how the ids are made
    stage.receiver.script("/hooks/mixed", 500, 200)
    record = stage.job("/hooks/mixed")
    stage.jobs._ddb.update_item(
        TableName=stage.jobs.table_name,
        Key={"pk": {"S": record.id}},
        UpdateExpression="SET ids_by_creation = :true",
        ExpressionAttributeValues={":true": {"BOOL": True}},
    )
    stage.sqs.purge_queue(QueueUrl=stage.stack.webhook_queue_url)
    stored = stage.jobs.find(record.id)
    assert stored is not None and stored.ids_by_creation
    earlier = {key: value for key, value in (job_snapshot(stored) or {}).items() if key != "ids_by_creation"}
    stage.queues.enqueue_webhook(record.id, WebhookEvent.SUCCEEDED, snapshot=earlier)
    # When its first attempt fails and its retry goes
    assert len(stage.dispatch()["batchItemFailures"]) == 1
    stage.let_time_pass(SCHEDULE[0])
    assert stage.dispatch() == {"batchItemFailures": []}
    # Then both came under the one webhook-id the stored job gives (hunt 326: the first under
    # the id the carried job gave, the retry, which reads the job, under another)
    posts = stage.receiver.requests_to("/hooks/mixed")
    assert len(posts) == 2
    assert {post.headers["webhook-id"] for post in posts} == {
        record_webhook_id(stored, WebhookEvent.SUCCEEDED)
    }


def test_a_carried_job_that_moved_on_keeps_the_delivery_on_its_schedule(stage: Stage) -> None:
    """A second message carrying the job as it ended (a send whose answer was lost and was
    sent again) comes after the first counted an attempt: its job is stale. It may POST once
    more under the same webhook-id, as SQS's own duplicates may, but it counts nothing and
    waits for the next attempt like any copy."""
    stage.receiver.script("/hooks/flaky", 500, 500, 200)
    record = stage.job("/hooks/flaky", carry=True)
    assert len(stage.dispatch()["batchItemFailures"]) == 1
    assert stage.delivery().attempts == 1
    first_copy = stage.in_flight
    # When the duplicate, carrying the job as it ended, is received for the first time
    stored = stage.jobs.find(record.id)
    assert stored is not None and stored.delivery_attempts == 1
    stage.queues.enqueue_webhook(
        record.id,
        WebhookEvent.SUCCEEDED,
        snapshot=job_snapshot(stored.model_copy(update={"delivery_attempts": 0})),
    )
    second = stage.dispatch()
    # Then the attempt count is unchanged, and the copy waits for the attempt that is due
    assert len(second["batchItemFailures"]) == 1
    assert stage.delivery().attempts == 1
    assert stage.visibility_changes[-1] >= SCHEDULE[0] - 1
    # And once due, the delivery goes on from attempt 2, under one webhook-id throughout
    stage.in_flight = first_copy + stage.in_flight
    stage.let_time_pass(SCHEDULE[0])
    while stage.delivery().status == "pending":
        stage.dispatch()
        stage.let_time_pass(SCHEDULE[stage.delivery().attempts - 1])
    delivery = stage.delivery()
    assert (delivery.status, delivery.attempts) == ("delivered", 3)
    posts = stage.receiver.requests_to("/hooks/flaky")
    assert len({post.headers["webhook-id"] for post in posts}) == 1


def test_a_slow_dns_answer_at_send_counts_in_the_deliverys_time(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmq.config import WEBHOOK_OVERHEAD_SECONDS

    # Given a receiver whose name server, by the time of the delivery, answers slower than the
    # webhook timeout plus the overhead the config budgets a delivery (it answered at submit)
    answers = type(stage.dns).__call__

    def slow(self: FakeDns, host: str, port: int) -> list[str]:
        time.sleep(WEBHOOK_OVERHEAD_SECONDS + stage.config.webhooks.timeout_seconds + 10)
        return answers(self, host, port)

    stage.job("/hooks/slow-dns")
    monkeypatch.setattr(type(stage.dns), "__call__", slow)
    # When the dispatcher delivers its webhook
    began = time.monotonic()
    stage.dispatch()
    took = time.monotonic() - began
    # Then the lookup counts in the attempt's time, as the POST does: the invocation ends within
    # what the config budgets (the dispatcher's timeout is checked against it), never held by
    # the name server, nor by its thread at the invocation's end
    assert took <= stage.config.webhooks.timeout_seconds + WEBHOOK_OVERHEAD_SECONDS, f"{took:.1f} s"


def test_a_slow_name_server_of_one_receiver_never_fails_anothers_delivery(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given four webhooks of a receiver whose name server has begun to hang (it answered at
    # submit), delivered by one invocation
    slow_host, hang = "slow.test", 12.0
    stage.dns.answers[slow_host] = ["127.0.0.1"]
    answers = type(stage.dns).__call__
    looked_up: list[str] = []

    def slow(self: FakeDns, host: str, port: int) -> list[str]:
        looked_up.append(host)
        if host == slow_host:
            time.sleep(hang)
        return answers(self, host, port)

    healthy_host = stage.receiver.HOSTNAME
    monkeypatch.setattr(stage.receiver, "HOSTNAME", slow_host)
    for n in range(4):
        stage.job(f"/hooks/bad{n}", job_id=f"job_bad{n}")
    monkeypatch.setattr(stage.receiver, "HOSTNAME", healthy_host)
    monkeypatch.setattr(type(stage.dns), "__call__", slow)
    began = time.monotonic()
    stage.dispatch()
    # When the next (warm) invocation delivers another receiver's webhook, the lookups of the
    # first still hanging
    stage.job("/hooks/healthy", job_id="job_healthy")
    stage.dispatch()
    try:
        # Then that receiver's host is looked up at once and the webhook delivered: no lookup of
        # another tenant's holds what its delivery needs
        assert len(stage.receiver.requests_to("/hooks/healthy")) == 1
        assert stage.delivery("job_healthy").status == "delivered"
    finally:
        time.sleep(max(0.0, hang - (time.monotonic() - began) + 0.5))  # (the hung lookups end)


@pytest.mark.parametrize("carry", [False, True])
def test_a_jobs_last_output_and_its_end_in_one_batch_reach_the_receiver_in_that_order(
    stage: Stage, carry: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a streaming job that just succeeded: its worker sent its last job.output, then its
    # job.succeeded, which the dispatcher receives in one batch (in no order: standard queue),
    # the output's POST slower to leave than the end's
    _output_posts_wait(monkeypatch, lambda: asyncio.sleep(0.3))
    record = _streaming_job_with_only_its_output_queued(stage, "/hooks/order")
    stored = stage.jobs.find(record.id)
    assert stored is not None
    stage.queues.enqueue_webhook(
        record.id, WebhookEvent.SUCCEEDED, snapshot=job_snapshot(stored) if carry else None
    )
    # When the dispatcher handles the batch
    stage.dispatch()
    # Then the receiver hears the output before the end (docs/streaming.md)
    types = [json.loads(request.body)["type"] for request in stage.receiver.requests]
    assert types == ["job.output", "job.succeeded"]


def test_a_jobs_end_is_not_held_back_by_its_output_to_a_receiver_that_hangs(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a streaming job's last job.output and its job.succeeded in one batch, the output's
    # POST hanging (a receiver that is down for it)
    released = threading.Event()

    async def until_released() -> None:
        while not released.is_set():
            await asyncio.sleep(0.05)

    _output_posts_wait(monkeypatch, until_released)
    record = _streaming_job_with_only_its_output_queued(stage, "/hooks/hang")
    stage.queues.enqueue_webhook(record.id, WebhookEvent.SUCCEEDED)
    # When the dispatcher handles the batch
    dispatching = threading.Thread(target=stage.dispatch)
    dispatching.start()
    try:
        for _ in range(200):
            if stage.receiver.requests_to("/hooks/hang"):
                break
            time.sleep(0.05)
        # Then the end is delivered while the output still hangs: it is not held back
        types = [json.loads(request.body)["type"] for request in stage.receiver.requests_to("/hooks/hang")]
        assert types == ["job.succeeded"]
    finally:
        released.set()
        dispatching.join(timeout=30)


def _output_posts_wait(monkeypatch: pytest.MonkeyPatch, wait: Callable[[], Awaitable[None]]) -> None:
    """Every job.output POST waits for `wait` before it leaves; other events go at once."""
    send = WebhookDispatcher._send_body

    async def output_waits(
        self: WebhookDispatcher, url: str, msg_id: str, body: bytes, *rest: Any, **named: Any
    ) -> Any:
        if b'"type":"job.output"' in body:
            await wait()
        return await send(self, url, msg_id, body, *rest, **named)

    monkeypatch.setattr(WebhookDispatcher, "_send_body", output_waits)


def _streaming_job_with_only_its_output_queued(stage: Stage, path: str) -> JobRecord:
    """A streaming job that succeeded, subscribed to job.output and job.succeeded, with its last
    job.output the only message in the webhooks queue."""
    record = stage.job(path, events=[WebhookEvent.OUTPUT, WebhookEvent.SUCCEEDED])
    stage.sqs.purge_queue(QueueUrl=stage.stack.webhook_queue_url)
    output = JobOutputEvent(id=record.id, seq_from=1, seq_to=3, attempt=1, delta="the answer")
    stage.queues.enqueue_webhook(record.id, WebhookEvent.OUTPUT, output)
    return record


def test_one_receive_of_the_carrier_in_two_environments_brings_the_message_back_when_due(
    stage: Stage,
) -> None:
    # Given a job whose first attempt failed: its message carries attempt 2, due in 5 s
    path = "/hooks/review159-down"
    stage.receiver.script(path, *[500] * 5)
    stage.job(path)
    stage.dispatch()
    stage.let_time_pass(SCHEDULE[0])
    # When the message's next receive is handed to two environments at once (two invocations,
    # one receipt handle), both reading the job before either records (the accepted duplicate)
    messages = stage.sqs.receive_message(
        QueueUrl=stage.stack.webhook_queue_url, VisibilityTimeout=60, AttributeNames=["All"]
    )["Messages"]
    event = sqs_event(stage.sqs, stage.stack.webhook_queue_url, messages)
    dispatcher = stage.handler.dispatcher()
    post, both_read = dispatcher._post, threading.Barrier(2, timeout=10)

    async def post_once_both_have_read(*args: Any, **kwargs: Any) -> Any:
        await asyncio.to_thread(both_read.wait)
        return await post(*args, **kwargs)

    dispatcher._post = post_once_both_have_read
    responses: list[Any] = []
    threads = [
        threading.Thread(target=lambda: responses.append(stage.handler.handler(event, LambdaContextStub())))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(responses) == 2
    assert stage.delivery().attempts == 2
    # Then the one message is hidden until attempt 3 is due (300 s), not the copy lag past it:
    # SQS keeps the visibility the last ChangeMessageVisibility set
    assert stage.visibility_changes[0] == SCHEDULE[0]
    assert stage.visibility_changes[-1] == SCHEDULE[1], stage.visibility_changes


def test_a_record_that_fails_unexpectedly_is_counted_for_its_queue(
    stage: Stage, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a dispatcher that fails every record (a bug, a grant missing): its invocation still
    # succeeds, each record reported failed, so no Lambda error shows it
    stage.job("/hooks")

    class Broken:
        async def handle(self, *_: Any, **__: Any) -> None:
            raise RuntimeError("a bug")

    monkeypatch.setattr(stage.handler, "dispatcher", Broken)
    capsys.readouterr()
    response = stage.dispatch()
    # Then the record comes back, and one RecordFailed is counted with the webhooks queue's
    # name, which the WebhooksOldestMessage alarm reads beside the queue's age
    assert len(response["batchItemFailures"]) == 1
    (record,) = emitted_metrics(capsys.readouterr().out, MetricName.RECORD_FAILED)
    (directive,) = record["_aws"]["CloudWatchMetrics"]
    assert "queue" in directive["Dimensions"][0]
    assert record["queue"] == stage.stack.webhook_queue_url.rsplit("/", 1)[-1]
    assert record[MetricName.RECORD_FAILED] == [1.0]


def test_a_record_failed_by_aws_unavailable_for_now_is_not_counted_as_a_fault(
    stage: Stage, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given DynamoDB throttling the dispatcher's read of the job past botocore's tries
    stage.job("/hooks")
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "dynamodb.GetItem", times=50)
    capsys.readouterr()
    try:
        response = stage.dispatch()
    finally:
        faults.disarm()
    # Then the record comes back to be tried again, but no RecordFailed is counted: a throttle
    # is no fault of the code's, and counted it could page WebhooksOldestMessage beside one
    # receiver's long Retry-After
    assert faults.fired and len(response["batchItemFailures"]) == 1
    assert emitted_metrics(capsys.readouterr().out, MetricName.RECORD_FAILED) == []


def test_a_transport_that_cannot_be_made_is_a_failed_attempt_not_a_crash(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 230: a transport factory that raised (a CA bundle that cannot be loaded) failed
    the record, unlogged, round until the webhooks DLQ, instead of an attempt on the schedule."""
    stage.job("/hooks/odd")

    def unmakeable(target: Any) -> httpx.AsyncBaseTransport:
        raise ssl.SSLError(336245134, "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found")

    monkeypatch.setattr(stage.handler.dispatcher(), "_transport_factory", unmakeable)
    stage.dispatch()
    job = stage.jobs.find("job_hooked")
    assert job is not None
    assert [attempt.error_class for attempt in job.delivery_log] == ["SSLError"]


class _RawReceiver:
    """A loopback receiver that reads the whole request, then writes `answer` byte strings (a
    pause of `pause` seconds between them), as some real servers answer: bytes httpx's parser
    refuses after a valid status line, or headers that trickle."""

    def __init__(self, answer: list[bytes], pause: float = 0.0) -> None:
        import socket

        self.answer, self.pause, self.requests = answer, pause, 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._server.accept()
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            while len(body) < length:
                body += connection.recv(65536)
            self.requests += 1
            for part in self.answer:
                with contextlib.suppress(OSError):
                    connection.sendall(part)
                time.sleep(self.pause)

    def close(self) -> None:
        self._server.close()
        self._thread.join(timeout=10)


# A CDN's 103 Early Hints preloading 130 scripts: about 7 KB.
_LONG_HINTS = (
    b"HTTP/1.1 103 Early Hints\r\n"
    + b"".join(b"Link: </assets/chunk-%04d.js>; rel=preload; as=script\r\n" % n for n in range(130))
    + b"\r\n"
)


def _in_pieces(data: bytes, count: int) -> list[bytes]:
    size = -(-len(data) // count)
    return [data[start : start + size] for start in range(0, len(data), size)]


@pytest.mark.parametrize(
    ("answer", "pause", "status", "code"),
    [
        # Workday's repeated chunked coding (encode/httpx#1862): h11 refuses the header block
        (
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
            0.0,
            "delivered",
            200,
        ),
        # A header name h11 will not take (encode/httpx#1561), under a 410
        ([b"HTTP/1.1 410 Gone\r\nbad/name: x\r\nContent-Length: 0\r\n\r\n"], 0.0, "disabled", 410),
        # The status line at once, then headers slower than the attempt's timeout
        (
            [b"HTTP/1.1 200 OK\r\n", *(bytes([byte]) for byte in b"Server: slow\r\n\r\n")],
            0.5,
            "delivered",
            200,
        ),
        # After interim responses, which httpcore reads past (review 230)
        (
            [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 410 Gone\r\nbad/name: x\r\nContent-Length: 0\r\n\r\n"],
            0.0,
            "disabled",
            410,
        ),
        # Bare LF line ends and a final line without a reason phrase, as h11 reads them (review 232)
        (
            [b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200\nTransfer-Encoding: chunked, chunked\n\n"],
            0.0,
            "delivered",
            200,
        ),
        # An interim response longer than the bytes kept of one
        (
            [
                b"HTTP/1.1 103 Early Hints\r\n"
                + b"".join(
                    b"Link: </assets/chunk-%04d.js>; rel=preload; as=script\r\n" % n for n in range(90)
                )
                + b"\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
            ],
            0.0,
            "delivered",
            200,
        ),
        # ... and one that comes in pieces, each read keeping less than the whole (hunt 258)
        (
            [*_in_pieces(_LONG_HINTS, 3), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"],
            0.2,
            "delivered",
            200,
        ),
        (
            [
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                b"HTTP/1.1 2",
                b"00 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            ],
            0.1,
            "delivered",
            200,
        ),
    ],
    ids=[
        "header block refused",
        "410 with a header refused",
        "headers slower than the timeout",
        "100 then a 410 refused",
        "LF line ends, no reason phrase",
        "a 103 of more than 4 KB",
        "a 103 of 7 KB in three reads",
        "103 then a split 200 refused",
    ],
)
def test_the_status_line_alone_decides_the_delivery(
    stage: Stage, answer: list[bytes], pause: float, status: str, code: int
) -> None:
    """Hunt 229: a 200 (or 410) whose header block httpx's parser refused, or that came slower
    than the timeout, was a failed attempt with no status, POSTed again on the schedule; the
    docs promise the status line alone decides the delivery."""
    # Given a receiver that answers so
    receiver = _RawReceiver(answer, pause)
    stage.job("/hooks/raw")
    _point_webhook_at(stage, f"http://{WebhookReceiver.HOSTNAME}:{receiver.port}/hooks/raw")
    # When the dispatcher sends the event
    try:
        stage.dispatch()
    finally:
        receiver.close()
    # Then its status line decides: delivered (or disabled) after one POST, the log saying why
    job = stage.jobs.find("job_hooked")
    assert job is not None and receiver.requests == 1
    assert job.delivery_status.value == status
    (attempt,) = job.delivery_log
    assert attempt.status_code == code and attempt.error_class in ("RemoteProtocolError", "Timeout")
