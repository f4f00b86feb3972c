"""Webhook signing, payloads, the retry schedule and the delivery rules, with fakes only."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import socket
import threading
import time
from collections import deque
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from llmq.config import MAX_REDELIVERY_DELAY_SECONDS, MAX_VISIBILITY_SECONDS, LlmqConfig, WebhookPolicy
from llmq.job_record import JobInput, JobRecord
from llmq.models import (
    TERMINAL_EVENTS,
    ChatMessage,
    DeliveryStatus,
    JobOutputEvent,
    JobResult,
    JobStatus,
    WebhookEvent,
    WebhookMessage,
)
from llmq.queues import WEBHOOK_SNAPSHOT_MAX_BYTES, announce_terminal, job_snapshot, webhook_message_body
from llmq.retry_after import parse_retry_after
from llmq.sqs_edge import PoisonMessage, RetryLater
from llmq.ssrf import PinnedTarget
from llmq.tenants import Tenant, new_webhook_secret
from llmq.webhooks import (
    EARLY_TOLERANCE_SECONDS,
    USER_AGENT,
    DeliveryOutcome,
    OutcomeKind,
    WebhookDispatcher,
    WebhookSchedule,
    build_payload,
    receive_id,
    record_webhook_id,
    sign,
    webhook_id,
)
from tests.support.stores import InMemoryJobs, InMemoryQueues, InMemoryTenants

NOW = 1_790_000_000.0
HOOK_URL = "https://hooks.example.com/llmq?token=abc"
PUBLIC_IP = "93.184.215.14"
SCHEDULE = [5, 300, 1800]
# A status the fake receiver takes as "answer after 5 s".
SLOW = 599


# ---- fakes ----------------------------------------------------------------------------


class FakeReceiver:
    """An httpx MockTransport handler: answers in order, then 200; records every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers: deque[httpx.Response | Exception] = deque(answers)
        self.requests: list[httpx.Request] = []
        self.targets: list[PinnedTarget] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.popleft() if self.answers else httpx.Response(200)
        if isinstance(answer, Exception):
            raise answer
        if answer.status_code == SLOW:
            await asyncio.sleep(5)
        return answer

    def transport(self, target: PinnedTarget) -> httpx.AsyncBaseTransport:
        self.targets.append(target)
        return httpx.MockTransport(self)


def make_job(
    job_id: str = "job_1",
    status: JobStatus = JobStatus.SUCCEEDED,
    events: list[WebhookEvent] | None = None,
    delivery: DeliveryStatus | None = DeliveryStatus.PENDING,
    output: str = "a short answer",
) -> JobRecord:
    return JobRecord(
        id=job_id,
        tenant_id="ten_acme",
        status=status,
        lane="high",
        model="gpt-4o-mini",
        input=JobInput(messages=[ChatMessage(role="user", content="a secret prompt")]),
        request_hash="h",
        created_ms=int(NOW * 1000) - 60_000,
        started_ms=int(NOW * 1000) - 30_000,
        finished_ms=int(NOW * 1000) - 1_000 if status.is_terminal else None,
        result=JobResult(output=output) if status is JobStatus.SUCCEEDED else None,
        webhook_url=HOOK_URL,
        webhook_events=list(TERMINAL_EVENTS) if events is None else events,
        delivery_status=delivery if status.is_terminal else None,
        expires_at=int(NOW) + 86_400,
    )


class World:
    def __init__(
        self,
        *answers: httpx.Response | Exception,
        secrets: list[str] | None = None,
        timeout_seconds: float = 15,
    ) -> None:
        self.config = LlmqConfig(
            webhooks=WebhookPolicy(
                schedule_seconds=SCHEDULE,
                jitter_fraction=0,
                timeout_seconds=timeout_seconds,
                trust_carried_job=True,
            )
        )
        self.jobs = InMemoryJobs(self.config, clock=lambda: NOW)
        self.secrets = secrets if secrets is not None else [new_webhook_secret()]
        tenants = self.tenants = InMemoryTenants()
        tenants.add("ten_acme", secrets=self.secrets)
        self.receiver = FakeReceiver(*answers)
        self.dns: dict[str, list[str]] = {"hooks.example.com": [PUBLIC_IP]}
        self.now = time.time()
        self.dispatcher = WebhookDispatcher(
            self.jobs,
            tenants,
            self.config,
            "https://api.llmq.test",
            transport_factory=self.receiver.transport,
            resolver=lambda host, port: self.dns[host],
            clock=lambda: self.now,
        )

    def add(self, job: JobRecord) -> JobRecord:
        self.jobs.records[job.id] = job
        return job

    async def deliver(
        self, job_id: str = "job_1", event: WebhookEvent = WebhookEvent.SUCCEEDED, attempt: int = 1
    ) -> DeliveryOutcome:
        return await self.dispatcher.deliver(WebhookMessage(job_id=job_id, event=event), attempt=attempt)


# ---- signing ----------------------------------------------------------------------------


def test_a_signature_verifies_with_the_reference_package() -> None:
    # Given a tenant secret and a signed body
    secret = new_webhook_secret()
    body = b'{"type":"job.succeeded","data":{"id":"job_1"}}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([secret], "msg_1", timestamp, body),
    }
    # When the receiver verifies it with standardwebhooks
    payload = Webhook(secret).verify(body, headers)
    # Then it is accepted and parsed
    assert payload["data"]["id"] == "job_1"
    assert headers["webhook-signature"].startswith("v1,")


def test_a_tampered_body_or_wrong_secret_fails_verification() -> None:
    secret = new_webhook_secret()
    body = b'{"type":"job.succeeded"}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([secret], "msg_1", timestamp, body),
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(b'{"type":"job.failed"}', headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(body, headers)


@pytest.mark.parametrize("form", ["{}", "{}.0", " {}", "+{}"])
def test_the_cli_verifier_says_a_stale_delivery_is_old_in_every_form_the_reference_reads(form: str) -> None:
    # (review 275: the check of a forged timestamp took these for "not a Unix time")
    from llmq_cli.signatures import verify_delivery

    secret = new_webhook_secret()
    body = b'{"a": 1}'
    then = int(time.time()) - 3600
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": form.format(then),
        "webhook-signature": sign([secret], "msg_1", then, body),
    }
    found = verify_delivery(body, headers, [secret])
    assert not found.verified and "s old" in found.reason, found.reason


def test_the_cli_verifier_refuses_a_body_that_is_not_utf8_as_the_reference_package_does() -> None:
    """Hunt 225: `llmq_cli.signatures.verify_delivery` decoded bytes with replacement, so a body
    whose bytes are not UTF-8 verified against the signature of the text they decode to."""
    from llmq_cli.signatures import verify_delivery

    secret = new_webhook_secret()
    signed = '{"x":"\ufffd"}'.encode()
    timestamp = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([secret], "msg_1", timestamp, signed),
    }
    assert verify_delivery(signed, headers, [secret]).verified
    other = verify_delivery(b'{"x":"\xff"}', headers, [secret])
    assert (other.verified, other.reason) == (False, "the body is not UTF-8")


def test_during_rotation_one_header_carries_a_signature_per_secret() -> None:
    # Given the new and the previous secret
    new, old = new_webhook_secret(), new_webhook_secret()
    body = b"{}"
    timestamp = int(time.time())
    signature = sign([new, old], "msg_1", timestamp, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(timestamp), "webhook-signature": signature}
    # Then both secrets verify the same delivery, and the header holds two space-separated signatures
    assert len(signature.split(" ")) == 2
    Webhook(new).verify(body, headers)
    Webhook(old).verify(body, headers)


def test_signing_without_a_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        sign([], "msg_1", 1, b"{}")


def test_the_webhook_id_is_stable_per_job_and_event_type() -> None:
    assert webhook_id("job_1", WebhookEvent.SUCCEEDED) == webhook_id("job_1", "job.succeeded")
    assert webhook_id("job_1", WebhookEvent.SUCCEEDED).startswith("msg_")
    assert webhook_id("job_1", WebhookEvent.SUCCEEDED) != webhook_id("job_1", WebhookEvent.STARTED)
    assert webhook_id("job_1", WebhookEvent.SUCCEEDED) != webhook_id("job_2", WebhookEvent.SUCCEEDED)


def test_a_job_id_given_again_gives_its_webhooks_new_ids_and_a_job_stored_before_keeps_its_own() -> None:
    # Given one job id given to two jobs (its Idempotency-Key reused after the retention),
    # created at different times, and a job stored before ids held the creation time
    old, new = make_job(), make_job()
    old.ids_by_creation = new.ids_by_creation = True
    old.created_ms, new.created_ms = 1_000, 8 * 86_400_000
    before = make_job()
    # Then each job's event has an id of its own, the same at every attempt (the record's),
    assert record_webhook_id(old, WebhookEvent.SUCCEEDED) != record_webhook_id(new, WebhookEvent.SUCCEEDED)
    assert record_webhook_id(new, WebhookEvent.SUCCEEDED) == webhook_id(
        new.id, WebhookEvent.SUCCEEDED, new.created_ms
    )
    # and the job stored before keeps the id its deliveries began with (hunt 308)
    assert not before.ids_by_creation
    assert record_webhook_id(before, WebhookEvent.SUCCEEDED) == webhook_id("job_1", WebhookEvent.SUCCEEDED)


# ---- payload ----------------------------------------------------------------------------


def test_the_payload_carries_the_event_its_time_and_the_job() -> None:
    job = make_job().to_job()
    payload = json.loads(build_payload(job, WebhookEvent.SUCCEEDED, "https://api.llmq.test", 1024))
    assert payload["type"] == "job.succeeded"
    assert payload["timestamp"] == job.finished_at
    assert payload["data"]["id"] == "job_1"
    assert payload["data"]["result"]["output"] == "a short answer"
    assert payload["data"]["result_url"] is None


def test_a_result_above_the_inline_limit_is_replaced_by_a_url() -> None:
    job = make_job(output="x" * 5000).to_job()
    payload = json.loads(build_payload(job, WebhookEvent.SUCCEEDED, "https://api.llmq.test/", 1024))
    assert payload["data"]["result"] is None
    assert payload["data"]["result_url"] == "https://api.llmq.test/v1/jobs/job_1"


# ---- schedule and Retry-After -----------------------------------------------------------


def test_the_schedule_gives_one_delay_per_retry_then_is_exhausted() -> None:
    schedule = WebhookSchedule((5, 300, 1800))
    assert [schedule.delay(n) for n in (1, 2, 3)] == [5, 300, 1800]
    assert not schedule.exhausted(3)
    assert schedule.exhausted(4)
    with pytest.raises(ValueError):
        schedule.delay(4)


def test_a_schedule_step_longer_than_a_retry_can_wait_is_refused_by_the_config() -> None:
    """A step past MAX_REDELIVERY_DELAY_SECONDS was taken, and retried about 20 minutes early
    (hunt 249): the dispatcher's delay is capped there."""
    assert WebhookPolicy(schedule_seconds=[MAX_REDELIVERY_DELAY_SECONDS]).schedule_seconds[0] == 42_000
    with pytest.raises(ValueError, match="less than or equal to 42000"):
        WebhookPolicy(schedule_seconds=[5, MAX_REDELIVERY_DELAY_SECONDS + 1])


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999])
def test_jitter_stays_within_its_fraction(draw: float) -> None:
    schedule = WebhookSchedule((300,), jitter_fraction=0.1, random=lambda: draw)
    assert 270 <= schedule.delay(1) <= 330


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    now = 1_790_000_000.0
    later = format_datetime(datetime.fromtimestamp(now + 90, tz=UTC), usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": "120"}), now) == 120
    assert parse_retry_after(httpx.Headers({"Retry-After": later}), now) == pytest.approx(90)
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"}), now) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After": " 2.5 "}), now) == 2.5
    for unreadable in (
        "soon",
        "inf",
        "nan",
        "",
        # What Python's float() reads, and RFC 9110's delay-seconds is not (hunt 269): each
        # held a webhook's next attempt for hours
        "1e4",
        "10_000",
        "+10000",
        "-5",
        "9" * 400,
        "Wed, 21 Oct 99999999999 07:28:00 GMT",
        "Wed, 21 Oct 2026 07:28:00 -99999999999999999999",
    ):
        assert parse_retry_after(httpx.Headers({"Retry-After": unreadable}), now) is None
    # Digits of another script, as a receiver's UTF-8 bytes on the wire
    arabic_indic = httpx.Headers([(b"Retry-After", "٣٠٠٠٠".encode())])
    assert parse_retry_after(arabic_indic, now) is None
    assert parse_retry_after(httpx.Headers([(b"retry-after-ms", "１５００".encode())]), now) is None
    assert parse_retry_after(httpx.Headers(), now) is None


# ---- delivery rules ---------------------------------------------------------------------


async def test_a_2xx_is_delivered_signed_and_recorded() -> None:
    # Given a succeeded job whose delivery is pending
    world = World(httpx.Response(204))
    world.add(make_job())
    # When its terminal event is delivered
    outcome = await world.deliver()
    # Then the receiver got one signed POST that verifies, and the delivery is recorded
    assert outcome.kind is OutcomeKind.DELIVERED
    [request] = world.receiver.requests
    assert request.method == "POST"
    assert request.headers["user-agent"] == USER_AGENT
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == webhook_id("job_1", WebhookEvent.SUCCEEDED)
    payload = Webhook(world.secrets[0]).verify(request.content, dict(request.headers))
    assert payload["type"] == "job.succeeded"
    assert world.jobs.deliveries == [(DeliveryStatus.DELIVERED, 204, None)]
    # and the POST went to the address the guard checked
    assert world.receiver.targets[0].addresses == (PUBLIC_IP,)


async def test_a_timestamp_ten_minutes_old_fails_verification() -> None:
    world = World()
    world.now = time.time() - 600
    world.add(make_job())
    await world.deliver()
    [request] = world.receiver.requests
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(world.secrets[0]).verify(request.content, dict(request.headers))


async def test_a_redirect_is_a_failure_and_is_not_followed() -> None:
    world = World(httpx.Response(301, headers={"Location": "https://hooks.example.com/elsewhere"}))
    world.add(make_job())
    outcome = await world.deliver()
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.retry_in == 5
    assert [request.url.path for request in world.receiver.requests] == ["/llmq"]
    assert world.jobs.deliveries == [(DeliveryStatus.PENDING, 301, 5)]


async def test_410_disables_delivery_and_a_later_message_is_not_sent() -> None:
    world = World(httpx.Response(410))
    world.add(make_job())
    assert (await world.deliver()).kind is OutcomeKind.DISABLED
    assert world.jobs.records["job_1"].delivery_status is DeliveryStatus.DISABLED
    # When the same message comes back
    again = await world.deliver(attempt=2)
    # Then nothing more is sent
    assert again.kind is OutcomeKind.SKIPPED
    assert len(world.receiver.requests) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_lengthens_the_delay(status: int) -> None:
    world = World(httpx.Response(status, headers={"Retry-After": "120"}))
    world.add(make_job())
    outcome = await world.deliver()
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.retry_in == 120


async def test_retry_after_never_shortens_the_schedule_and_is_capped() -> None:
    world = World(
        httpx.Response(429, headers={"Retry-After": "1"}),
        httpx.Response(429, headers={"Retry-After": str(7 * 86_400)}),
    )
    world.add(make_job())
    assert (await world.deliver(attempt=2)).retry_in == 300
    capped = await world.deliver(attempt=2)
    assert capped.retry_in is not None and capped.retry_in <= MAX_VISIBILITY_SECONDS


async def test_a_500_does_not_honour_retry_after() -> None:
    world = World(httpx.Response(500, headers={"Retry-After": "3600"}))
    world.add(make_job())
    assert (await world.deliver()).retry_in == 5


async def test_a_connection_error_is_retried_with_no_status_code() -> None:
    world = World(httpx.ConnectError("connection refused"))
    world.add(make_job())
    outcome = await world.deliver(attempt=2)
    assert (outcome.kind, outcome.status_code, outcome.retry_in) == (OutcomeKind.RETRY, None, 300)
    assert world.jobs.deliveries == [(DeliveryStatus.PENDING, None, 300)]


async def test_a_receiver_slower_than_the_timeout_is_a_failure() -> None:
    world = World(httpx.Response(SLOW), timeout_seconds=0.1)
    world.add(make_job())
    outcome = await world.deliver()
    assert (outcome.kind, outcome.status_code, outcome.retry_in) == (OutcomeKind.RETRY, None, 5)
    assert world.jobs.deliveries == [(DeliveryStatus.PENDING, None, 5)]


async def test_when_the_schedule_is_exhausted_the_delivery_fails() -> None:
    world = World(httpx.Response(500))
    world.add(make_job())
    outcome = await world.deliver(attempt=len(SCHEDULE) + 1)
    assert outcome.kind is OutcomeKind.GAVE_UP
    assert world.jobs.deliveries == [(DeliveryStatus.FAILED, 500, None)]


async def test_a_duplicate_message_for_a_delivered_job_is_not_posted_again() -> None:
    world = World()
    world.add(make_job(delivery=DeliveryStatus.DELIVERED))
    outcome = await world.deliver()
    assert outcome.kind is OutcomeKind.SKIPPED
    assert world.receiver.requests == []
    assert world.jobs.deliveries == []


@pytest.mark.parametrize(
    ("job", "event"),
    [
        (None, WebhookEvent.SUCCEEDED),
        (make_job(events=[WebhookEvent.FAILED]), WebhookEvent.SUCCEEDED),
        (make_job(status=JobStatus.FAILED), WebhookEvent.SUCCEEDED),
        (make_job(delivery=DeliveryStatus.FAILED), WebhookEvent.SUCCEEDED),
    ],
    ids=["job gone", "not subscribed", "other terminal event", "already failed"],
)
async def test_messages_that_must_not_be_sent_are_skipped(job: JobRecord | None, event: WebhookEvent) -> None:
    world = World()
    if job is not None:
        world.add(job)
    outcome = await world.deliver(event=event)
    assert outcome.kind is OutcomeKind.SKIPPED
    assert world.receiver.requests == []


async def test_job_started_is_sent_but_leaves_the_terminal_delivery_record_alone() -> None:
    world = World(httpx.Response(500), httpx.Response(200))
    world.add(make_job(status=JobStatus.RUNNING, events=[WebhookEvent.STARTED, *TERMINAL_EVENTS]))
    assert (await world.deliver(event=WebhookEvent.STARTED)).kind is OutcomeKind.RETRY
    assert (await world.deliver(event=WebhookEvent.STARTED, attempt=2)).kind is OutcomeKind.DELIVERED
    assert world.jobs.deliveries == []
    [first, second] = world.receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert json.loads(second.content)["type"] == "job.started"


async def test_a_host_that_now_resolves_to_a_private_address_is_not_contacted() -> None:
    # Given a URL that passed the guard at submit, whose DNS answer then changed
    world = World()
    world.add(make_job())
    world.dns["hooks.example.com"] = ["10.0.0.7"]
    # When the delivery is attempted
    outcome = await world.deliver()
    # Then nothing is sent, and the delivery follows the failure path
    assert world.receiver.requests == []
    assert (outcome.kind, outcome.status_code, outcome.retry_in) == (OutcomeKind.RETRY, None, 5)
    assert "private" in outcome.reason


class _ResolverDown(dict[str, list[str]]):
    """A DNS that fails for now (EAI_AGAIN) whatever is asked."""

    def __getitem__(self, host: str) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


async def test_a_host_the_resolver_cannot_look_up_now_is_an_attempt_to_retry() -> None:
    # Given a delivery while the resolver fails for now
    world = World()
    world.add(make_job())
    world.dns = _ResolverDown()
    # When it is attempted
    outcome = await world.deliver()
    # Then nothing is sent, and it is retried on the schedule, like any failed attempt
    assert world.receiver.requests == []
    assert (outcome.kind, outcome.status_code, outcome.retry_in) == (OutcomeKind.RETRY, None, 5)
    assert "failed for now" in outcome.reason


async def test_a_tenant_without_secrets_cannot_be_sent_to() -> None:
    world = World(secrets=[])
    world.add(make_job())
    outcome = await world.deliver()
    assert outcome.kind is OutcomeKind.GAVE_UP
    assert world.receiver.requests == []
    assert world.jobs.deliveries == [(DeliveryStatus.FAILED, None, None)]


# ---- a webhooks-queue message -----------------------------------------------------------


async def test_a_delivery_to_retry_asks_for_its_message_back_after_the_schedules_delay() -> None:
    # Given a receiver that answers 503
    world = World(httpx.Response(503))
    world.add(make_job())
    body = WebhookMessage(job_id="job_1", event=WebhookEvent.SUCCEEDED).model_dump_json()
    # When the queue message is handled
    with pytest.raises(RetryLater) as retry:
        await world.dispatcher.handle(body, receive_count=1)
    # Then it comes back after the first delay of the schedule
    assert retry.value.delay_seconds == SCHEDULE[0]
    assert world.jobs.deliveries == [(DeliveryStatus.PENDING, 503, SCHEDULE[0])]


async def test_each_attempt_is_logged_with_its_host_and_error_class_never_its_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a receiver the dispatcher cannot reach
    world = World(httpx.ConnectError("connection refused"))
    world.add(make_job())
    body = WebhookMessage(job_id="job_1", event=WebhookEvent.SUCCEEDED).model_dump_json()
    # When its message is handled
    with pytest.raises(RetryLater):
        await world.dispatcher.handle(body, receive_count=1)
    # Then the log says which host failed, and how, as the runbook reads it to tell one dead
    # receiver from a broken dispatcher (hunt 275: neither was logged); never the URL's path
    # or query, which may carry the integrator's token
    [record] = [record for record in caplog.records if record.getMessage().startswith("webhook ")]
    assert (record.host, record.error_class) == ("hooks.example.com", "ConnectError")
    assert "token=abc" not in caplog.text


async def test_a_body_that_is_not_a_webhook_message_is_poison_and_never_sent() -> None:
    world = World()
    with pytest.raises(PoisonMessage):
        await world.dispatcher.handle('{"job": 1}', receive_count=1)
    assert world.receiver.requests == []


class GatedReceiver(FakeReceiver):
    """Answers nothing until `copies` requests are in flight: every copy has read the job.
    The copies may come from invocations in event loops of their own (threads)."""

    def __init__(self, copies: int, *answers: httpx.Response | Exception) -> None:
        super().__init__(*answers)
        self.copies = copies
        self.all_in = threading.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) >= self.copies:
            self.all_in.set()
        assert await asyncio.to_thread(self.all_in.wait, 10), "the other copies never came"
        self.requests.pop()
        return await super().__call__(request)


async def test_a_copy_that_loses_the_count_keeps_its_message_for_the_retry() -> None:
    """SQS may hand one message to two invocations at once ("Amazon SQS at-least-once
    delivery", https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/standard-queues-at-least-once-delivery.html),
    and deleting either receipt deletes the message. The copy whose attempt was not counted
    must therefore not be acknowledged while the delivery is pending: its acknowledgment would
    delete the message that carries the other copy's retry."""
    # Given a receiver that fails both copies, which both read the job before either records
    world = World()
    world.receiver = GatedReceiver(2, httpx.Response(503), httpx.Response(503))
    world.dispatcher._transport_factory = world.receiver.transport
    world.add(make_job())
    body = WebhookMessage(job_id="job_1", event=WebhookEvent.SUCCEEDED).model_dump_json()

    # When the two copies are handled at once, by two invocations (each its own event loop)
    async def handled() -> DeliveryOutcome | BaseException:
        try:
            return await world.dispatcher.handle(body, receive_count=1)
        except RetryLater as exc:
            return exc

    outcomes = await asyncio.gather(*(asyncio.to_thread(asyncio.run, handled()) for _ in range(2)))
    # Then one attempt is counted, and neither copy is acknowledged: the one that counted it
    # comes back when the next attempt is due, the other just after, so the retry survives
    # whichever receipt the mapping deletes with
    assert [type(outcome) for outcome in outcomes] == [RetryLater, RetryLater], outcomes
    assert sorted(round(outcome.delay_seconds) for outcome in outcomes) == [
        SCHEDULE[0],
        SCHEDULE[0] + world.dispatcher.copy_lag_seconds,
    ]  # type: ignore[union-attr]
    assert world.jobs.deliveries == [(DeliveryStatus.PENDING, 503, SCHEDULE[0])]
    assert len(world.receiver.requests) == 2
    # And once the receiver is back, the next copy delivers it and later copies are acknowledged
    world.now += SCHEDULE[0]
    assert (await world.dispatcher.handle(body, receive_count=2)).kind is OutcomeKind.DELIVERED
    assert (await world.dispatcher.handle(body, receive_count=2)).kind is OutcomeKind.SKIPPED


@pytest.mark.parametrize(
    "api_base", ["https://abc.execute-api.eu-west-1.amazonaws.com/prod/", "https://api.llmq.test/prod"]
)
def test_an_s3_held_results_url_has_one_slash_before_v1(api_base: str) -> None:
    # Given a job whose result is in S3, and the stack's public URL, which API Gateway ends in "/"
    job = make_job().model_copy(update={"result": None, "result_ref": "results/job_1.json"})
    # When it is shown with that base
    shown = job.to_job(api_base=api_base)
    # Then its result_url is the job's URL under the stage, without "//"
    assert shown.result_url == f"{api_base.rstrip('/')}/v1/jobs/job_1"
    assert "//v1" not in (shown.result_url or "")


# ---- the signing secrets, cached per environment --------------------------------------------


class CountingTenants(InMemoryTenants):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get(self, tenant_id: str) -> Tenant:
        self.reads += 1
        return super().get(tenant_id)


def _signatures(request: httpx.Request) -> list[str]:
    return request.headers["webhook-signature"].split(" ")


async def test_a_rotated_secret_signs_within_the_cache_time_and_the_previous_one_meanwhile() -> None:
    # Given a dispatcher that keeps a tenant's secrets 60 s, and three finished jobs
    world = World()
    tenants = CountingTenants()
    old = world.secrets[0]
    tenants.add("ten_acme", secrets=[old])
    world.dispatcher._tenants = tenants
    assert world.config.webhooks.secrets_cache_seconds == 60
    for job_id in ("job_1", "job_2", "job_3"):
        world.add(make_job(job_id))
    await world.deliver("job_1")
    # When the operator rotates the tenant's secret (the previous one kept), and a delivery
    # comes 30 s later, then another 61 s after the first
    new = new_webhook_secret()
    tenants.tenants["ten_acme"] = dataclasses.replace(tenants.tenants["ten_acme"], webhook_secrets=[new, old])
    world.now += 30
    await world.deliver("job_2")
    world.now += 31
    await world.deliver("job_3")
    first, second, third = world.receiver.requests
    # Then the first two were signed with the previous secret alone, from one read of it
    for request in (first, second):
        assert len(_signatures(request)) == 1
        Webhook(old).verify(request.content, dict(request.headers))
    # And past the cache time the new secret signs, the previous one beside it: a receiver on
    # either verifies
    assert len(_signatures(third)) == 2
    Webhook(new).verify(third.content, dict(third.headers))
    Webhook(old).verify(third.content, dict(third.headers))
    assert tenants.reads == 2


def _counting_world(jobs: int) -> tuple[World, CountingTenants]:
    """A world whose tenant store counts its reads, with `jobs` finished jobs to deliver."""
    world = World()
    tenants = CountingTenants()
    tenants.add("ten_acme", secrets=world.secrets)
    world.dispatcher._tenants = tenants
    for index in range(jobs):
        world.add(make_job(f"job_{index}"))
    return world, tenants


async def test_concurrent_deliveries_to_one_tenant_read_its_secrets_once() -> None:
    world, tenants = _counting_world(5)
    outcomes = await asyncio.gather(*(world.deliver(f"job_{index}") for index in range(5)))
    assert {outcome.kind for outcome in outcomes} == {OutcomeKind.DELIVERED}
    assert tenants.reads == 1


def test_the_shared_read_works_in_each_invocation_s_own_event_loop() -> None:
    """The batch processor runs each invocation in a new event loop; a lock kept from an
    earlier one must not fail the deliveries of a later one."""
    world, tenants = _counting_world(6)

    async def three(start: int) -> set[OutcomeKind]:
        outcomes = await asyncio.gather(*(world.deliver(f"job_{index}") for index in range(start, start + 3)))
        return {outcome.kind for outcome in outcomes}

    # Given one invocation whose concurrent deliveries shared a read of the secrets
    assert asyncio.run(three(0)) == {OutcomeKind.DELIVERED}
    # When a later invocation, past the cache time, does the same in its own loop
    world.now += world.config.webhooks.secrets_cache_seconds + 1
    # Then its deliveries succeed too, from one more read
    assert asyncio.run(three(3)) == {OutcomeKind.DELIVERED}
    assert tenants.reads == 2
    assert len(world.receiver.requests) == 6


async def test_with_no_cache_time_every_delivery_reads_the_secrets() -> None:
    world = World()
    world.config = world.config.model_copy(
        update={"webhooks": world.config.webhooks.model_copy(update={"secrets_cache_seconds": 0})}
    )
    world.dispatcher._policy = world.config.webhooks
    tenants = CountingTenants()
    tenants.add("ten_acme", secrets=world.secrets)
    world.dispatcher._tenants = tenants
    world.add(make_job("job_1"))
    world.add(make_job("job_2"))
    await world.deliver("job_1")
    await world.deliver("job_2")
    assert tenants.reads == 2


async def test_a_job_output_event_is_tried_twice_at_most_and_not_again_once_the_job_ended() -> None:
    output = JobOutputEvent(id="job_1", seq_from=1, seq_to=2, attempt=1, delta="hello")
    world = World(httpx.Response(503), httpx.Response(503))
    world.add(make_job("job_1", status=JobStatus.RUNNING, events=[WebhookEvent.OUTPUT], delivery=None))
    message = WebhookMessage(job_id="job_1", event=WebhookEvent.OUTPUT, output=output)
    first = await world.dispatcher.deliver(message, attempt=1)
    second = await world.dispatcher.deliver(message, attempt=2)
    assert (first.kind, second.kind) == (OutcomeKind.RETRY, OutcomeKind.GAVE_UP)
    # And a retry of one whose job has ended is not sent: the result holds the output
    world.add(make_job("job_1", status=JobStatus.SUCCEEDED, events=[WebhookEvent.OUTPUT]))
    late = await world.dispatcher.deliver(message, attempt=2)
    assert late.kind is OutcomeKind.SKIPPED
    assert len(world.receiver.requests) == 2
    payload = Webhook(world.secrets[0]).verify(
        world.receiver.requests[0].content, dict(world.receiver.requests[0].headers)
    )
    assert (payload["type"], payload["data"]["delta"], payload["data"]["seq_to"]) == (
        "job.output",
        "hello",
        2,
    )


# ---- the job a terminal event's message carries ---------------------------------------------


def test_a_job_too_large_for_a_message_is_not_carried_and_is_read_instead() -> None:
    # Given a finished job whose inline result is larger than a webhook message may carry
    small = make_job("job_small")
    large = make_job("job_large", output="é" * (WEBHOOK_SNAPSHOT_MAX_BYTES // 2 + 1))
    # Then the small one travels without its input, and the large one does not travel at all
    snapshot = job_snapshot(small)
    assert snapshot is not None and "input" not in snapshot
    assert JobRecord.model_validate(snapshot) == small.model_copy(update={"input": None})
    assert job_snapshot(large) is None
    # And the queue's message for it names the job only, which the dispatcher reads
    queues = InMemoryQueues()
    assert announce_terminal(queues, large, carry=True)
    assert queues.snapshots == [None]
    # And by default (webhooks.trust_carried_job off) no message carries its job at all
    assert LlmqConfig().webhooks.trust_carried_job is False
    assert announce_terminal(queues, small)
    assert queues.snapshots == [None, None]


async def test_a_redriven_message_reads_its_job_rather_than_trust_the_one_it_carries() -> None:
    # Given a job whose webhook was delivered, and its first message, carrying the job as it
    # ended two minutes ago, back from the DLQ (a redrive starts its receive count again)
    world = World()
    ended = world.add(make_job())
    message = WebhookMessage(job_id=ended.id, event=WebhookEvent.SUCCEEDED, job=job_snapshot(ended))
    world.jobs.records[ended.id] = ended.model_copy(
        update={"delivery_status": DeliveryStatus.DELIVERED, "delivery_attempts": 1}
    )
    world.now = ended.finished_ms / 1000 + 120  # type: ignore[operator]
    # When it is received for the first time
    outcome = await world.dispatcher.deliver(message, first_receive=True)
    # Then the job was read, found delivered, and nothing was sent again
    assert outcome.kind is OutcomeKind.SKIPPED
    assert world.receiver.requests == []
    # While the same message moments after the job ended is sent from what it carries
    world.jobs.records[ended.id] = ended
    world.now = ended.finished_ms / 1000 + 1  # type: ignore[operator]
    assert (await world.dispatcher.deliver(message, first_receive=True)).kind is OutcomeKind.DELIVERED


def test_a_webhook_message_is_ascii_so_sqs_takes_any_output() -> None:
    # Given a job whose output holds characters SQS refuses raw, and others it takes
    job = make_job(output="ok \ufffe\uffff Grüße 🎉")
    body = webhook_message_body(
        WebhookMessage(job_id=job.id, event=WebhookEvent.SUCCEEDED, job=job_snapshot(job))
    )
    # Then the body is ASCII, and reads back to the same output
    assert body.isascii()
    carried = JobRecord.model_validate(json.loads(body)["job"])
    assert carried.result is not None and carried.result.output == "ok \ufffe\uffff Grüße 🎉"


async def test_by_default_a_carried_job_is_not_trusted_and_a_duplicate_waits_its_turn() -> None:
    # Given the default policy, a job whose first attempt failed and is due again later, and a
    # duplicate of its first message (carrying the job as it ended) received for the first time
    world = World()
    world.dispatcher._policy = LlmqConfig().webhooks.model_copy(update={"schedule_seconds": SCHEDULE})
    assert world.dispatcher._policy.trust_carried_job is False
    ended = world.add(make_job())
    message = WebhookMessage(job_id=ended.id, event=WebhookEvent.SUCCEEDED, job=job_snapshot(ended))
    world.jobs.records[ended.id] = ended.model_copy(
        update={"delivery_attempts": 1, "delivery_next_ms": int((world.now + SCHEDULE[0]) * 1000)}
    )
    world.now = ended.finished_ms / 1000 + 1  # type: ignore[operator]
    # When it is handled
    outcome = await world.dispatcher.deliver(message, first_receive=True)
    # Then the job was read: the copy waits for the attempt that is due, and nothing was POSTed
    assert outcome.kind is OutcomeKind.RETRY
    assert world.receiver.requests == []


def _pending_job_answered_by(*answers: httpx.Response) -> tuple[World, str]:
    """A world whose job_1 has its terminal delivery pending, a receiver that answers
    `answers` in order, and the body of job_1's succeeded message."""
    world = World()
    world.receiver = FakeReceiver(*answers)
    world.dispatcher._transport_factory = world.receiver.transport
    world.add(make_job())
    return world, WebhookMessage(job_id="job_1", event=WebhookEvent.SUCCEEDED).model_dump_json()


async def test_two_copies_in_one_invocation_post_once_and_the_second_finds_it_delivered() -> None:
    # Given a job whose terminal event is pending, and two copies of its message in one batch
    world, body = _pending_job_answered_by(httpx.Response(200), httpx.Response(200))
    # When the invocation handles both at once
    outcomes = await asyncio.gather(
        world.dispatcher.handle(body, receive_count=1), world.dispatcher.handle(body, receive_count=1)
    )
    # Then the receiver got one POST: the second copy waited, read the delivery, and skipped it
    assert sorted(outcome.kind for outcome in outcomes) == [OutcomeKind.DELIVERED, OutcomeKind.SKIPPED]
    assert len(world.receiver.requests) == 1
    assert world.jobs.deliveries == [(DeliveryStatus.DELIVERED, 200, None)]


async def test_a_copy_that_comes_early_comes_back_after_the_attempt_it_would_make() -> None:
    # Given a job whose first attempt failed, due again in SCHEDULE[0] seconds
    world = World()
    ended = world.add(make_job())
    world.jobs.records[ended.id] = ended.model_copy(
        update={"delivery_attempts": 1, "delivery_next_ms": int((world.now + SCHEDULE[0]) * 1000)}
    )
    # When a copy of its message comes now
    outcome = await world.dispatcher.deliver(WebhookMessage(job_id=ended.id, event=WebhookEvent.SUCCEEDED))
    # Then it waits until the copy lag after the attempt is due (the message carrying that attempt,
    # delayed to it, goes first), and nothing was POSTed
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.retry_in == pytest.approx(SCHEDULE[0] + world.dispatcher.copy_lag_seconds, abs=0.01)
    assert world.receiver.requests == []


async def test_a_copy_never_posts_beside_a_carrier_whose_receiver_is_still_answering() -> None:
    # Given a job whose second attempt came due almost a whole POST timeout ago: its carrier's
    # POST to a slow receiver may still be waiting for the answer, the attempt not yet recorded
    world = World()
    timeout = world.config.webhooks.timeout_seconds
    ended = world.add(make_job())
    world.jobs.records[ended.id] = ended.model_copy(
        update={"delivery_attempts": 1, "delivery_next_ms": int((world.now - timeout + 0.5) * 1000)}
    )
    body = WebhookMessage(job_id=ended.id, event=WebhookEvent.SUCCEEDED).model_dump_json()
    # When another message for it is received for the first time
    with pytest.raises(RetryLater) as waited:
        await world.dispatcher.handle(body, receive_count=1)
    # Then it waits for the carrier's POST to have ended, and POSTs nothing beside it
    assert waited.value.delay_seconds >= 0.5
    assert world.receiver.requests == []


async def test_a_new_copy_just_past_a_scheduled_attempt_waits_for_the_message_that_carries_it() -> None:
    # Given a job whose second attempt was due half a second ago (its message is on its way back)
    world = World()
    ended = world.add(make_job())
    world.jobs.records[ended.id] = ended.model_copy(
        update={"delivery_attempts": 1, "delivery_next_ms": int((world.now - 0.5) * 1000)}
    )
    body = WebhookMessage(job_id=ended.id, event=WebhookEvent.SUCCEEDED).model_dump_json()
    # When a new message for it (sent again for the terminal job) is received for the first time
    with pytest.raises(RetryLater) as waited:
        await world.dispatcher.handle(body, receive_count=1)
    # Then it comes back after the carrier's attempt, and nothing was POSTed
    assert waited.value.delay_seconds == pytest.approx(world.dispatcher.copy_lag_seconds - 0.5, abs=0.01)
    assert world.receiver.requests == []
    # While the carrier itself, back for its second receive, delivers at once
    assert (await world.dispatcher.handle(body, receive_count=2)).kind is OutcomeKind.DELIVERED


async def test_an_environment_keeps_no_lock_for_a_job_once_its_deliveries_are_done() -> None:
    # Given a dispatcher whose event loop lives as long as its environment (Powertools keeps one)
    world = World()
    for n in range(3):
        world.add(make_job(job_id=f"job_{n}"))
    bodies = [
        WebhookMessage(job_id=f"job_{n}", event=WebhookEvent.SUCCEEDED).model_dump_json() for n in range(3)
    ]
    # When it delivers three jobs' events, two copies each
    await asyncio.gather(*(world.dispatcher.handle(body, receive_count=1) for body in bodies * 2))
    # Then every job was POSTed once, and nothing of them stays behind in the environment
    assert len(world.receiver.requests) == 3
    assert world.dispatcher._delivery_locks[asyncio.get_running_loop()] == {}


async def test_a_copy_received_before_waits_for_the_message_named_to_carry_the_attempt() -> None:
    # Given a job whose first attempt, made by message m1, failed: m1 carries the next
    world, body = _pending_job_answered_by(httpx.Response(500), httpx.Response(200))
    with pytest.raises(RetryLater):
        await world.dispatcher.handle(body, receive_count=1, message_id="m1")
    assert world.jobs.records["job_1"].delivery_carrier == "m1"
    # When the attempt is due and a copy, m2, comes (its first receive lost to a throttled invoke)
    world.now += SCHEDULE[0]
    with pytest.raises(RetryLater) as waited:
        await world.dispatcher.handle(body, receive_count=2, message_id="m2")
    # Then the copy waits until after the carrier, which delivers at once
    assert waited.value.delay_seconds == pytest.approx(world.dispatcher.copy_lag_seconds, abs=0.01)
    assert (
        await world.dispatcher.handle(body, receive_count=2, message_id="m1")
    ).kind is OutcomeKind.DELIVERED
    assert len(world.receiver.requests) == 2
    # And the copy, back after it, finds it delivered and POSTs nothing
    world.now += world.dispatcher.copy_lag_seconds
    assert (await world.dispatcher.handle(body, receive_count=3, message_id="m2")).kind is OutcomeKind.SKIPPED
    assert len(world.receiver.requests) == 2


async def test_the_carriers_message_received_twice_makes_its_next_attempt_once_when_it_is_due() -> None:
    # Given a job whose first attempt, made by message m1, failed: m1 carries the next
    world, body = _pending_job_answered_by(httpx.Response(500), httpx.Response(500), httpx.Response(200))
    with pytest.raises(RetryLater):
        await world.dispatcher.handle(body, receive_count=1, message_id="m1")
    # When SQS handed that receive over twice, and the second copy is handled once the first
    # recorded its attempt, within the early tolerance of the next one
    world.now += SCHEDULE[0] - EARLY_TOLERANCE_SECONDS / 2
    with pytest.raises(RetryLater) as waited:
        await world.dispatcher.handle(body, receive_count=1, message_id="m1")
    # Then it POSTs nothing and counts nothing: the message comes back when the attempt is due
    assert len(world.receiver.requests) == 1
    assert world.jobs.records["job_1"].delivery_attempts == 1
    assert waited.value.delay_seconds == pytest.approx(EARLY_TOLERANCE_SECONDS / 2, abs=0.01)
    # And back then, it makes the second attempt
    world.now += waited.value.delay_seconds
    with pytest.raises(RetryLater):
        await world.dispatcher.handle(body, receive_count=2, message_id="m1")
    assert len(world.receiver.requests) == 2
    assert world.jobs.records["job_1"].delivery_attempts == 2


@pytest.mark.parametrize(
    ("event", "counted"),
    [
        (WebhookEvent.OUTPUT, False),
        (WebhookEvent.STARTED, False),
        (WebhookEvent.SUCCEEDED, True),
    ],
)
def test_only_results_count_toward_webhook_outcomes(event: WebhookEvent, counted: bool) -> None:
    """WebhooksFailing pages when integrators lose results; job.started and job.output are
    given up briefly and without harm, so a streaming tenant's slow receiver must not count."""
    from llmq.telemetry import metrics
    from llmq.webhooks import DeliveryOutcome, OutcomeKind, _observe

    output = JobOutputEvent(id="job_1", seq_from=0, seq_to=1, attempt=1, delta="hi")
    message = WebhookMessage(
        job_id="job_1", event=event, output=output if event is WebhookEvent.OUTPUT else None
    )
    metrics.clear_metrics()
    try:
        _observe(message, DeliveryOutcome(OutcomeKind.GAVE_UP, status_code=503, attempt=2))
        assert ("WebhookFailed" in metrics.metric_set) is counted
    finally:
        metrics.clear_metrics()


class _BothCopiesAtOnce(FakeReceiver):
    """Answers 500 to every POST, each only once two POSTs are in: both copies read the job
    before either records its attempt (two environments handed the same receive)."""

    def __init__(self) -> None:
        super().__init__()
        self.both_in = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) >= 3:  # the first attempt's POST, then the two copies'
            self.both_in.set()
        if len(self.requests) >= 2:
            await asyncio.wait_for(self.both_in.wait(), 5)
        return httpx.Response(500)


def _second_environment(world: World) -> WebhookDispatcher:
    return WebhookDispatcher(
        world.jobs,
        world.tenants,
        world.config,
        "https://api.llmq.test",
        transport_factory=world.receiver.transport,
        resolver=lambda host, port: world.dns[host],
        clock=lambda: world.now,
    )


async def test_one_receive_of_the_carrier_handed_to_two_environments_keeps_the_next_attempt_on_schedule() -> (
    None
):
    # Given a job whose first attempt, made by message m1, failed: m1 carries the next (due in 5 s)
    world, body = _pending_job_answered_by()
    world.receiver = _BothCopiesAtOnce()
    world.dispatcher._transport_factory = world.receiver.transport
    with pytest.raises(RetryLater):
        await world.dispatcher.handle(body, receive_count=1, message_id="m1", receipt="r1")
    # When m1 comes back when due, and SQS/Lambda hands that ONE receive (one receipt handle) to
    # two environments at once: both read the job before either records (the accepted duplicate
    # POST of attempt 2)
    world.now += SCHEDULE[0]
    other = _second_environment(world)
    results = await asyncio.gather(
        world.dispatcher.handle(body, receive_count=2, message_id="m1", receipt="r2"),
        other.handle(body, receive_count=2, message_id="m1", receipt="r2"),
        return_exceptions=True,
    )
    delays = sorted(result.delay_seconds for result in results if isinstance(result, RetryLater))
    assert len(world.receiver.requests) == 3
    assert world.jobs.records["job_1"].delivery_attempts == 2
    # Then the message (one SQS message: the LAST ChangeMessageVisibility on it wins, and the
    # copy that lost the count sets it after the winner's) comes back when attempt 3 is due
    assert delays[-1] <= SCHEDULE[1] + 1, (
        f"visibility asked by the two receipts: {delays}; the loser's pushes attempt 3 "
        f"{delays[-1] - SCHEDULE[1]:.0f} s past its schedule"
    )


class _Hangs(FakeReceiver):
    """500 to the first POST; every later POST hangs until released (a receiver slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) > 1:
            await self.release.wait()
        return httpx.Response(500)


async def _a_carrier_and_a_copy_stored_apart(
    receiver: FakeReceiver, copy_after: float
) -> tuple[World, str, WebhookDispatcher, float, float]:
    """A job whose first attempt, made by copy A of message m1 (receipt a1), failed, and a second
    copy B of m1 that SQS stored apart (same MessageId, its own receipt and visibility), first
    received `copy_after` seconds later in another environment: the world, the message's body,
    that environment, and when A and B come back (SQS hides a message for whole seconds, rounded
    up: queues.redelivery_visibility)."""
    world, body = _pending_job_answered_by()
    world.receiver = receiver
    world.dispatcher._transport_factory = world.receiver.transport
    other = _second_environment(world)
    start = world.now
    with pytest.raises(RetryLater) as a_waits:
        await world.dispatcher.handle(body, receive_count=1, message_id="m1", receipt="a1")
    world.now = start + copy_after
    with pytest.raises(RetryLater) as b_waits:
        await other.handle(body, receive_count=1, message_id="m1", receipt="b1")
    a_back = start + math.ceil(a_waits.value.delay_seconds)
    b_back = start + copy_after + math.ceil(b_waits.value.delay_seconds)
    return world, body, other, a_back, b_back


async def test_a_second_stored_copy_of_the_carrier_never_posts_beside_it_to_a_slow_receiver() -> None:
    # Given a job whose first attempt, made by copy A of message m1, failed (attempt 2 due in 5 s),
    # and a second stored copy B of m1 (SQS keeps copies on several servers; one that missed the
    # receive is delivered again with the same MessageId and its own visibility), received
    # 0.5 s later in another environment
    world, body, other, a_back, b_back = await _a_carrier_and_a_copy_stored_apart(_Hangs(), 0.5)
    # When A comes back for attempt 2 and its POST waits on a receiver slow to answer (< 15 s),
    # and B comes back when it asked to, meanwhile
    world.now = a_back
    a_task = asyncio.create_task(
        world.dispatcher.handle(body, receive_count=2, message_id="m1", receipt="a2")
    )
    await asyncio.sleep(0.05)
    timeout = world.config.webhooks.timeout_seconds
    if b_back >= a_back + timeout:  # A's POST has timed out and been recorded by then
        world.receiver.release.set()
        await asyncio.gather(a_task, return_exceptions=True)
    world.now = b_back
    b_task = asyncio.create_task(other.handle(body, receive_count=2, message_id="m1", receipt="b2"))
    await asyncio.sleep(0.05)
    world.receiver.release.set()
    await asyncio.gather(a_task, b_task, return_exceptions=True)
    posts_of_attempt_2 = len(world.receiver.requests) - 1
    # Then attempt 2 was POSTed once: B, not the carrier's receive, came back the copy lag after
    # it (a copy never POSTs the attempt beside a carrier whose receiver is slow to answer)
    assert posts_of_attempt_2 == 1, (
        f"B came back {b_back - a_back:.2f} s after A; {posts_of_attempt_2} POSTs of attempt 2"
    )


async def test_a_copy_stored_apart_first_received_once_its_attempt_is_due_waits_behind_the_carrier() -> None:
    # Given a job whose first attempt, made by copy A of message m1 (receipt a1), failed:
    # attempt 2 is due in 5 s, carried by m1
    world, body = _pending_job_answered_by()
    world.receiver = _Hangs()
    world.dispatcher._transport_factory = world.receiver.transport
    other = _second_environment(world)
    start = world.now
    with pytest.raises(RetryLater) as a_waits:
        await world.dispatcher.handle(body, receive_count=1, message_id="m1", receipt="a1")
    # When A comes back when due and POSTs attempt 2 to a receiver slow to answer
    world.now = start + math.ceil(a_waits.value.delay_seconds)
    a_task = asyncio.create_task(
        world.dispatcher.handle(body, receive_count=2, message_id="m1", receipt="a2")
    )
    await asyncio.sleep(0.05)
    # And a second stored copy B of m1 (same MessageId, its own receipt, its FIRST receive)
    # reaches another environment half a second later
    world.now += 0.5
    b_task = asyncio.create_task(other.handle(body, receive_count=1, message_id="m1", receipt="b1"))
    await asyncio.sleep(0.05)
    world.receiver.release.set()
    results = await asyncio.gather(a_task, b_task, return_exceptions=True)
    posts_of_attempt_2 = len(world.receiver.requests) - 1
    # Then B (a first receive: never the carrier back from its delay) waits behind the carrier
    assert posts_of_attempt_2 == 1, f"{posts_of_attempt_2} POSTs of attempt 2; outcomes {results}"


async def test_a_late_replay_of_the_carriers_receive_never_makes_an_attempt_nor_delays_the_next() -> None:
    # Given a job whose first attempt, made by m1's receive r1, failed (attempt 2 due in 5 s)
    world, body = _pending_job_answered_by()
    world.receiver = _Hangs()
    world.dispatcher._transport_factory = world.receiver.transport
    other = _second_environment(world)
    start = world.now
    with pytest.raises(RetryLater) as r1_waits:
        await world.dispatcher.handle(body, receive_count=1, message_id="m1", receipt="r1")
    # When m1 comes back when due (receipt r2) and POSTs attempt 2 to a slow receiver
    world.now = start + math.ceil(r1_waits.value.delay_seconds)
    r2_task = asyncio.create_task(
        world.dispatcher.handle(body, receive_count=2, message_id="m1", receipt="r2")
    )
    await asyncio.sleep(0.05)
    # And a late replay of the receive r1 (Lambda or the sandbox handing it over again; its
    # receipt is stale now) reaches another environment meanwhile
    world.now += 0.5
    with pytest.raises(RetryLater):
        await other.handle(body, receive_count=1, message_id="m1", receipt="r1")
    world.receiver.release.set()
    with pytest.raises(RetryLater) as r2_waits:
        await r2_task
    # Then the replay POSTed nothing: attempt 2 went once, and was counted by the live receive
    assert len(world.receiver.requests) == 2
    job = world.jobs.records["job_1"]
    assert (job.delivery_attempts, job.delivery_carrier) == (2, receive_id("m1", "r2"))
    # And that receive (the only one whose ChangeMessageVisibility SQS accepts) brings m1 back
    # when attempt 3 is due
    assert world.now + r2_waits.value.delay_seconds == pytest.approx(
        (job.delivery_next_ms or 0) / 1000, abs=0.01
    )


class _Twins(FakeReceiver):
    """500 to the first `alone` POSTs (earlier attempts). Then the two copies of one receive
    POST the next attempt, both in before either is answered: the first gets 500 at once, the
    second `second` a moment later (after the first recorded)."""

    def __init__(self, second: httpx.Response, alone: int = 0) -> None:
        super().__init__()
        self.second = second
        self.alone = alone
        self.both_in = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        n = len(self.requests)
        if n <= self.alone:
            return httpx.Response(500)
        if n >= self.alone + 2:
            self.both_in.set()
        await asyncio.wait_for(self.both_in.wait(), 5)
        if n == self.alone + 1:
            return httpx.Response(500)
        await asyncio.sleep(0.2)
        return self.second


async def _twins_answered(second: httpx.Response) -> tuple[World, list[Any]]:
    world, body = _pending_job_answered_by()
    world.receiver = _Twins(second, alone=1)
    world.dispatcher._transport_factory = world.receiver.transport
    with pytest.raises(RetryLater):
        await world.dispatcher.handle(body, receive_count=1, message_id="m1", receipt="r1")
    world.now += SCHEDULE[0]
    other = _second_environment(world)
    results = await asyncio.gather(
        world.dispatcher.handle(body, receive_count=2, message_id="m1", receipt="r2"),
        other.handle(body, receive_count=2, message_id="m1", receipt="r2"),
        return_exceptions=True,
    )
    return world, results


async def test_a_410_beside_its_twins_500_counts_the_attempt_once() -> None:
    # Given attempt 1 failed, and the one receive that carries attempt 2 handed to two
    # environments (the accepted duplicate POST of attempt 2): one answered 500 (recorded
    # first, count 2), the other 410 Gone a moment later
    world, _ = await _twins_answered(httpx.Response(410))
    job = world.jobs.records["job_1"]
    assert len(world.receiver.requests) == 3  # attempt 1, and attempt 2 twice
    assert job.delivery_status is DeliveryStatus.DISABLED
    # Then the receiver saw two attempts (1 and 2): the count says so, as it does for a 200
    assert job.delivery_attempts == 2, f"delivery.attempts = {job.delivery_attempts} after attempts 1 and 2"


async def test_a_200_beside_its_twins_500_counts_the_attempt_once() -> None:
    # Given the same twins, the second answered 200: the count is the receiver's too
    world, _ = await _twins_answered(httpx.Response(200))
    job = world.jobs.records["job_1"]
    assert job.delivery_status is DeliveryStatus.DELIVERED
    assert job.delivery_attempts == 2


class _RetryAfterThenHangs(FakeReceiver):
    """503 with a long Retry-After to the first POST; every later POST hangs until released."""

    def __init__(self, retry_after: str) -> None:
        super().__init__()
        self.retry_after = retry_after
        self.release = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) > 1:
            await self.release.wait()
        return httpx.Response(503, headers={"retry-after": self.retry_after})


async def test_a_stored_copy_never_posts_beside_the_carrier_after_a_long_retry_after() -> None:
    # Given a job whose first attempt, made by copy A of m1 (receipt a1), was answered 503 with
    # Retry-After: 86400 (a receiver down for a day of maintenance): attempt 2 is due after the
    # longest visibility the dispatcher asks for (42000 s), carried by m1
    # And a second stored copy B of m1 (same MessageId, its own receipt and visibility), first
    # received a second later in another environment: it waits behind the carrier
    world, body, other, a_back, b_back = await _a_carrier_and_a_copy_stored_apart(
        _RetryAfterThenHangs("86400"), 1
    )
    # When A comes back for attempt 2 and POSTs it to a receiver slow to answer (< 15 s), and B
    # comes back when it asked to
    world.now = a_back
    a_task = asyncio.create_task(
        world.dispatcher.handle(body, receive_count=2, message_id="m1", receipt="a2")
    )
    await asyncio.sleep(0.05)
    world.now = b_back
    b_task = asyncio.create_task(other.handle(body, receive_count=2, message_id="m1", receipt="b2"))
    await asyncio.sleep(0.05)
    world.receiver.release.set()
    await asyncio.gather(a_task, b_task, return_exceptions=True)
    # Then attempt 2 was POSTed once (B came back the copy lag after the carrier)
    posts_of_attempt_2 = len(world.receiver.requests) - 1
    assert posts_of_attempt_2 == 1, (
        f"A came back at {a_back:.0f}, B at {b_back:.0f} (its wait cut to the 12-hour cap): "
        f"{b_back - a_back:.0f} s after A and, a non-first receive of "
        f"the carrier's id at/after due, took itself for the carrier: {posts_of_attempt_2} POSTs of attempt 2"
    )


class _FirstHangsThen200(FakeReceiver):
    """The first POST hangs until released, then 200; every later POST is answered 500."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) == 1:
            await self.release.wait()
            return httpx.Response(200)
        return httpx.Response(500)


async def test_a_redelivery_mid_round_counts_its_own_round_not_the_old_rounds_late_success() -> None:
    # Given a job whose delivery counted 4 failed attempts; its carrier m1 is back for attempt 5
    # and POSTs it to a receiver slow to answer
    world, body = _pending_job_answered_by()
    world.receiver = _FirstHangsThen200()
    world.dispatcher._transport_factory = world.receiver.transport
    job = world.jobs.records["job_1"]
    world.jobs.records["job_1"] = job.model_copy(
        update={
            "delivery_attempts": 4,
            "delivery_next_ms": int(world.now * 1000),
            "delivery_carrier": receive_id("m1", "r4"),
        }
    )
    old = asyncio.create_task(world.dispatcher.handle(body, receive_count=5, message_id="m1", receipt="r5"))
    await asyncio.sleep(0.05)
    # When the integrator asks for a redelivery meanwhile (POST /v1/jobs/{id}/webhook/redeliver:
    # a new round, delivery.attempts 0), whose message m2 makes the new round's attempt 1 (500)
    pending = world.jobs.mark_delivery_pending("job_1", "ten_acme")
    other = _second_environment(world)
    with pytest.raises(RetryLater):
        await other.handle(
            body, receive_count=1, message_id="m2", receipt="q1", delivery_round=pending.delivery_round
        )
    assert world.jobs.records["job_1"].delivery_attempts == 1
    # And the old round's attempt 5 is then answered 200
    world.receiver.release.set()
    await asyncio.gather(old, return_exceptions=True)
    job = world.jobs.records["job_1"]
    assert job.delivery_status is DeliveryStatus.DELIVERED
    # Then the round's count is what the receiver saw in it (its attempt 1, and the 200), not
    # the old round's number
    assert job.delivery_attempts <= 2, (
        f"delivery.attempts = {job.delivery_attempts} for a redelivered round of 2 POSTs; "
        f"log: {[(a.attempt, a.status_code) for a in job.delivery_log]}"
    )


async def test_the_carrier_back_a_little_early_by_another_clock_waits_only_until_due() -> None:
    # Given a job whose first attempt, made by m1's receive r1, failed: attempt 2 due in 5 s
    world, body = _pending_job_answered_by(httpx.Response(500))
    with pytest.raises(RetryLater):
        await world.dispatcher.handle(body, receive_count=1, message_id="m1", receipt="r1")
    due_s = (world.jobs.records["job_1"].delivery_next_ms or 0) / 1000
    # When m1 comes back (receipt r2) to an environment whose clock reads half a second behind
    # the recording one (CARRIER_SKEW_SECONDS is 0.25 s)
    world.now = due_s - 0.5
    with pytest.raises(RetryLater) as waited:
        await world.dispatcher.handle(body, receive_count=2, message_id="m1", receipt="r2")
    # Then it waits until its attempt is due, not the copy lag behind itself
    assert waited.value.delay_seconds <= 1.0, (
        f"the carrier waited {waited.value.delay_seconds:.1f} s for an attempt due in 0.5 s "
        f"(copy lag {world.dispatcher.copy_lag_seconds:.0f} s)"
    )


@pytest.mark.parametrize("second", [200, 410])
async def test_a_final_answer_beside_its_twins_500_to_the_last_attempt_settles_the_delivery(
    second: int,
) -> None:
    # Given a job whose delivery counted attempts 1..3 (SCHEDULE has 3 retries: attempt 4 is
    # the last), its carrier m1 due now; that one receive is handed to two environments
    world, body = _pending_job_answered_by()
    world.receiver = _Twins(httpx.Response(second))
    world.dispatcher._transport_factory = world.receiver.transport
    last = len(SCHEDULE)
    job = world.jobs.records["job_1"]
    world.jobs.records["job_1"] = job.model_copy(
        update={
            "delivery_attempts": last,
            "delivery_next_ms": int(world.now * 1000),
            "delivery_carrier": receive_id("m1", "r3"),
        }
    )
    other = _second_environment(world)
    await asyncio.gather(
        world.dispatcher.handle(body, receive_count=4, message_id="m1", receipt="r4"),
        other.handle(body, receive_count=4, message_id="m1", receipt="r4"),
        return_exceptions=True,
    )
    assert len(world.receiver.requests) == 2
    job = world.jobs.records["job_1"]
    # Then the receiver's final answer settles the delivery, as a 200 does after its twin's
    # give-up (a 410 is as final as a 200: "stop sending")
    expected = DeliveryStatus.DELIVERED if second == 200 else DeliveryStatus.DISABLED
    assert (job.delivery_status, job.delivery_attempts) == (expected, last + 1), (
        f"the receiver answered {second} to attempt {last + 1}; the delivery shows "
        f"{job.delivery_status.value} after {job.delivery_attempts}"
    )
