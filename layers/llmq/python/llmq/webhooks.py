"""Webhook delivery (DESIGN §2 Webhooks, §3.6): Standard Webhooks 1.0 signing, the payload,
the retry schedule, and one delivery attempt per webhooks-queue message.

The retry itself is SQS redelivery: an attempt that should be retried returns
`DeliveryOutcome.retry_in`, and the handler delays the message by that many seconds.

Which attempt a delivery is comes from the job, not from the message's receive count: a
throttled batch, a crash or a duplicate delivery each add a receive without an attempt, and
would skip steps of the schedule. The job counts its terminal event's attempts
(`delivery_attempts`, one per recorded outcome, read with the job anyway), and an attempt is
recorded only if the count is still the one it read, so two copies of a message count one
attempt once. `job.started` is recorded nowhere (it would overwrite the terminal event's
record), so it still counts by receives, and so does `job.output`, whose message carries
the text it delivers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from urllib.parse import urlsplit

import httpx
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import ValidationError

from llmq.batches import BatchRecord, BatchRepository
from llmq.config import WEBHOOK_OUTPUT_FIRST_SECONDS, LlmqConfig
from llmq.errors import InvalidWebhookUrl, StoreUnavailable, WebhookHostUnavailable
from llmq.job_record import JobRecord, iso
from llmq.model_base import Model
from llmq.models import (
    RESPONSE_HEAD_BYTES,
    TERMINAL_EVENTS,
    Batch,
    BatchEvent,
    BatchRequestCounts,
    DeliveryAttempt,
    DeliveryStatus,
    Job,
    JobOutputEvent,
    WebhookEvent,
    WebhookMessage,
)
from llmq.ports import JobStore, TenantStore
from llmq.queues import MAX_REDELIVERY_DELAY_SECONDS
from llmq.retry_after import parse_retry_after
from llmq.sqs_edge import PoisonMessage, RetryLater
from llmq.ssrf import PinnedTarget, PinnedTransport, Resolver, check_webhook_url, system_resolver
from llmq.telemetry import MetricName, error_fields, logger, metrics
from llmq.tenants import WEBHOOK_SECRET_PREFIX, UnknownTenant


def _in_a_thread_of_its_own(call: Callable[[], PinnedTarget]) -> asyncio.Future[PinnedTarget]:
    """`call` in a daemon thread of its own, started at once: a send-time DNS lookup that a
    receiver's name server holds keeps only its own thread, never one a lookup of another
    tenant waits for (a shared pool would fail their attempts unsent), nor one of the default
    pool's, which the dispatcher's AWS calls use, nor the invocation's end (`asyncio.run` waits
    for the default pool's threads). One given up on (its attempt timed out) ends on its own
    (the resolver's timeouts), its answer dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[PinnedTarget] = loop.create_future()

    def settle(result: PinnedTarget | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        elif result is not None:
            future.set_result(result)

    def run() -> None:
        result: PinnedTarget | None = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            error = exc
        with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile: nobody waits)
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="llmq-dns", daemon=True).start()
    return future


USER_AGENT = "llmq-webhooks/1"
SIGNATURE_VERSION = "v1"
GONE = 410
# A copy of a webhooks message this much before its attempt is due or less is let through.
EARLY_TOLERANCE_SECONDS = 1.0
# How early the message that carries an attempt may make it: its visibility is set in whole
# seconds, rounded up, after the attempt is recorded, so it comes back no earlier than due by
# the recording clock; this is for another environment's clock.
CARRIER_SKEW_SECONDS = 0.25
# How long after an attempt is due a copy that came early comes back: the message carrying
# the attempt (delayed to its due time, within the tolerance) goes first, and a copy at the
# same moment would POST the same attempt beside it. The carrier may itself come late (its
# invoke throttled, or waiting for an execution environment; the sandbox on two busy cores
# showed over 2 s): the longer the lag, the rarer a copy that POSTs beside it. A copy only
# ever acts on its own when the carrier is gone, which costs the attempt this much delay.
COPY_LAG_SECONDS = 5.0


def copy_lag_seconds(timeout_seconds: float) -> float:
    """How long after an attempt is due a copy of its message comes back: the carrier's
    lateness (COPY_LAG_SECONDS) and the whole of its POST (`webhooks.timeout_seconds`), so a
    copy never POSTs the attempt beside a carrier whose receiver is slow to answer."""
    return COPY_LAG_SECONDS + timeout_seconds


# Statuses whose Retry-After we honour; for any other failure the schedule alone decides.
RETRY_AFTER_STATUSES = frozenset({429, 503})
# A job.output event is tried this many times at most, retried only while its job runs, and
# waits this long at most for an answer: a receiver that hangs must not fill the dispatcher
# with a long job's stream of them (the terminal events share it).
OUTPUT_ATTEMPTS = 2
# The waits between tries of the write that says a receiver answered 410 Gone to an event not
# recorded (`WebhookDispatcher._mark_gone`), each after botocore's own retries.
# Once: a throttled dispatcher must not spend its invocation here (its other deliveries wait).
GONE_WRITE_RETRY_SECONDS = (1.0,)
OUTPUT_TIMEOUT_SECONDS = 5.0
# Why a terminal event's message of a round before a redelivery is dropped: the redelivery's
# own message carries the event (or, lost, the reconciler's resend of it).
_A_LATER_ROUND = "a redelivery's message carries this event now"
# Delivery states after which a terminal event is never sent again, whatever the queue holds.
SETTLED = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.DISABLED, DeliveryStatus.FAILED})

Clock = Callable[[], float]
TransportFactory = Callable[[PinnedTarget], httpx.AsyncBaseTransport]


# ---- signing (Standard Webhooks 1.0) ----------------------------------------------------------


def webhook_id(job_id: str, event: WebhookEvent | str, created_ms: int | None = None) -> str:
    """Stable per (job, event type) across every retry and redelivery, so receivers can de-duplicate.

    With `created_ms`, the id also holds when the job was created: a job id given again (its
    Idempotency-Key reused after the retention) then gives the new job's webhooks ids of their
    own. Without it, the new job's result came under an id its receiver may have seen an hour
    before, the old job's last attempt late in its retention, and was dropped as a duplicate
    (hunt 308)."""
    created = "" if created_ms is None else f"{created_ms}\x00"
    digest = hashlib.sha256(f"{job_id}\x00{created}{event}".encode()).digest()
    return "msg_" + base64.b32encode(digest).decode().lower().rstrip("=")[:32]


def record_webhook_id(record: JobRecord | BatchRecord, event: WebhookEvent | str) -> str:
    """A job's or a batch's webhook-id for `event`: by its creation too where it was stored with
    that (`ids_by_creation`); one stored before keeps the ids its deliveries began with."""
    return webhook_id(record.id, event, record.created_ms if record.ids_by_creation else None)


def _secret_key(secret: str) -> bytes:
    encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4))


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` per secret, space separated: during a rotation both verify."""
    if not secrets:
        raise ValueError("signing needs at least one secret")
    content = f"{msg_id}.{timestamp}.".encode() + body
    signatures = (
        base64.b64encode(hmac.new(_secret_key(secret), content, hashlib.sha256).digest()).decode()
        for secret in secrets
    )
    return " ".join(f"{SIGNATURE_VERSION},{signature}" for signature in signatures)


# ---- the payload ------------------------------------------------------------------------------


class BatchWebhookPayload(Model):
    """The body of a batch's delivery: `{"type", "timestamp", "data": <Batch>}`."""

    type: BatchEvent
    timestamp: str
    data: Batch


class WebhookPayload(Model):
    """The body of every delivery: `{"type", "timestamp", "data": <Job>}`."""

    type: WebhookEvent
    timestamp: str
    data: Job


class OutputWebhookPayload(Model):
    """The body of a job.output delivery: `{"type", "timestamp", "data": <JobOutputEvent>}`."""

    type: WebhookEvent
    timestamp: str
    data: JobOutputEvent


def build_payload(
    job: Job,
    event: WebhookEvent,
    public_api_url: str,
    inline_limit_bytes: int,
    *,
    now: datetime | None = None,
) -> bytes:
    """The signed body. A result larger than the limit is replaced by a `result_url` to poll."""
    data = job
    if job.result is not None and len(job.result.model_dump_json().encode()) > inline_limit_bytes:
        data = job.model_copy(
            update={"result": None, "result_url": f"{public_api_url.rstrip('/')}/v1/jobs/{job.id}"}
        )
    # The timestamp is when the event happened, not when this attempt is sent.
    occurred = job.started_at if event is WebhookEvent.STARTED else job.finished_at
    timestamp = occurred or iso(int((now or datetime.now(UTC)).timestamp() * 1000))
    return WebhookPayload(type=event, timestamp=timestamp, data=data).model_dump_json().encode()


# ---- the retry schedule -----------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookSchedule:
    """The delays between attempts: retry n follows attempt n after `delay(n)` seconds."""

    delays_seconds: tuple[int, ...]
    jitter_fraction: float = 0.0
    random: Callable[[], float] = random.random

    def exhausted(self, attempts: int) -> bool:
        """True once `attempts` attempts have been made and no retry is left."""
        return attempts > len(self.delays_seconds)

    def delay(self, retry: int) -> float:
        """Seconds before retry `retry` (1-based), spread by ±jitter_fraction so retries do not align."""
        if retry < 1 or self.exhausted(retry):
            raise ValueError(f"the schedule has no retry {retry}")
        base = self.delays_seconds[retry - 1]
        spread = base * self.jitter_fraction
        return max(0.0, base - spread + 2 * spread * self.random())


# ---- delivery ---------------------------------------------------------------------------------


class OutcomeKind(StrEnum):
    DELIVERED = "delivered"
    DISABLED = "disabled"
    RETRY = "retry"
    GAVE_UP = "gave_up"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one delivery attempt came to. Only RETRY asks for the message to come back."""

    kind: OutcomeKind
    status_code: int | None = None
    retry_in: float | None = None
    reason: str = ""
    # Which attempt this was; None for a message skipped before any attempt.
    attempt: int | None = None
    # What the delivery log keeps of the attempt (`DeliveryAttempt`).
    latency_ms: int | None = None
    error_class: str | None = None
    response_head: str | None = None
    started_ms: int | None = None
    host: str | None = None

    @classmethod
    def skipped(cls, reason: str) -> DeliveryOutcome:
        return cls(OutcomeKind.SKIPPED, reason=reason)


@dataclass(frozen=True)
class _Response:
    """The part of the receiver's answer that matters: its status, and the head of its body
    for the delivery log (never logged)."""

    status_code: int | None
    retry_after: float | None = None
    error: str = ""
    error_class: str | None = None
    # None when no request was sent (the URL failed its check at send time).
    latency_ms: int | None = None
    started_ms: int | None = None
    head: str | None = None
    # The receiver's host name, for the dispatcher's log (never its path or query).
    host: str | None = None


class WebhookDispatcher:
    """Sends one signed POST for a webhooks-queue message and records what happened.

    Async so that a batch of deliveries to slow receivers waits concurrently (up to the 15 s
    timeout each) instead of one after another; the short DynamoDB calls and the blocking DNS
    lookup run in threads so they never stall the other deliveries.
    """

    def __init__(
        self,
        jobs: JobStore,
        tenants: TenantStore,
        config: LlmqConfig,
        public_api_url: str,
        *,
        transport_factory: TransportFactory = PinnedTransport,
        resolver: Resolver = system_resolver,
        clock: Clock = time.time,
        rng: Callable[[], float] = random.random,
        batches: BatchRepository | None = None,
    ) -> None:
        self._jobs = jobs
        self._tenants = tenants
        # None: no batch events here (tests of job webhooks).
        self._batches = batches
        self._policy = config.webhooks
        self.copy_lag_seconds = copy_lag_seconds(config.webhooks.timeout_seconds)
        self._public_api_url = public_api_url
        self._transport_factory = transport_factory
        self._resolver = resolver
        # How a send-time lookup runs: in a thread of its own (a test that runs every call
        # inline replaces it)
        self._look_up: Callable[[Callable[[], PinnedTarget]], Awaitable[PinnedTarget]] = (
            _in_a_thread_of_its_own
        )
        self._clock = clock
        self.schedule = WebhookSchedule(
            tuple(config.webhooks.schedule_seconds), config.webhooks.jitter_fraction, rng
        )
        # Each tenant's signing secrets, and when they were read (`_secrets`).
        self._secret_cache: dict[str, tuple[float, list[str]]] = {}
        # asyncio locks belong to one event loop, and each invocation runs its own loop
        self._secret_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
            weakref.WeakKeyDictionary()
        )
        # One job's terminal deliveries, one at a time in an event loop (`deliver`): each job's
        # lock and how many deliveries hold or wait for it.
        self._delivery_locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, tuple[asyncio.Lock, int]]
        ] = weakref.WeakKeyDictionary()
        # One job's job.started and job.output deliveries in flight in an event loop, and when
        # the last ended: its terminal delivery waits for them (`_after_the_job_events`).
        self._in_flight: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, tuple[int, asyncio.Event]]
        ] = weakref.WeakKeyDictionary()
        # SQS limits a message's visibility to 12 hours from its receipt: the longest the
        # message can be hidden for (`queues.redelivery_visibility` asks no more), so the next
        # attempt is never recorded due later than its message comes back (which would spend a
        # receive only to wait, and two a retry could carry it to the DLQ).
        self.max_delay_seconds = float(MAX_REDELIVERY_DELAY_SECONDS)

    async def handle(
        self,
        body: str,
        receive_count: int,
        message_id: str | None = None,
        receipt: str | None = None,
        delivery_round: int = 0,
    ) -> DeliveryOutcome:
        """One webhooks-queue message (SQS `message_id`), received `receive_count` times, this
        time with the receipt handle `receipt`, of round `delivery_round` (its message attribute,
        `queues.delivery_round_of`).

        Raises RetryLater when the delivery should be tried again after the schedule's
        delay, and PoisonMessage for a body that is not a webhook message.
        """
        message = parse_webhook_message(body)
        if delivery_round > message.delivery_round:
            message = message.model_copy(update={"delivery_round": delivery_round})
        receive = receive_id(message_id, receipt)
        if isinstance(message.event, BatchEvent):
            outcome = await self.deliver_batch(
                message.job_id,
                message.event,
                receive=receive,
                first_receive=receive_count == 1,
                delivery_round=message.delivery_round,
            )
            _observe(message, outcome)
            if outcome.kind is OutcomeKind.RETRY and outcome.retry_in is not None:
                raise RetryLater(f"{message.job_id} {message.event}", outcome.retry_in)
            return outcome
        # A terminal event's attempt is counted on the job; job.started has only its receives.
        attempt = receive_count if message.event not in TERMINAL_EVENTS else None
        outcome = await self.deliver(
            message, attempt=attempt, first_receive=receive_count == 1, receive=receive
        )
        _observe(message, outcome)
        if outcome.kind is OutcomeKind.RETRY and outcome.retry_in is not None:
            raise RetryLater(f"{message.job_id} {message.event}", outcome.retry_in)
        return outcome

    async def deliver_batch(
        self,
        batch_id: str,
        event: BatchEvent,
        receive: str | None = None,
        *,
        first_receive: bool = False,
        delivery_round: int | None = None,
    ) -> DeliveryOutcome:
        """The next attempt of a batch's event: `{"type", "timestamp", "data": <Batch>}`, signed
        and retried like a job's, and counted as a job's is: on the batch (the attempt after
        those it counted), recorded only if no other copy counted it first, and not made by a
        copy that comes before it is due. So a redelivery's round is its own, and a message of
        an earlier round (`delivery_round`, None: any) is dropped."""
        if self._batches is None:
            return DeliveryOutcome.skipped("this dispatcher sends no batch events")
        async with self._one_at_a_time(batch_id):
            return await self._deliver_batch(batch_id, event, receive, first_receive, delivery_round)

    async def _deliver_batch(
        self,
        batch_id: str,
        event: BatchEvent,
        receive: str | None,
        first_receive: bool,
        delivery_round: int | None,
    ) -> DeliveryOutcome:
        assert self._batches is not None
        batch = await asyncio.to_thread(self._batches.find, batch_id)
        reason = _why_not_deliver_batch(batch, event, self._clock(), delivery_round)
        if batch is None or reason:
            return DeliveryOutcome.skipped(reason)
        waits = self._waits_for_the_carrier(
            batch.delivery_next_ms, batch.delivery_carrier, receive, first_receive=first_receive
        )
        if waits is not None:
            return waits
        early = self._due_in(batch.delivery_next_ms)
        if early > 0:
            return DeliveryOutcome(
                OutcomeKind.RETRY,
                retry_in=self._behind(early),
                reason="the next attempt is not due yet",
            )
        attempt = batch.delivery_attempts + 1
        secrets = await self._secrets(batch.tenant_id)
        if not secrets:
            outcome = DeliveryOutcome(
                OutcomeKind.GAVE_UP, reason="the tenant has no webhook secret", error_class="NoWebhookSecret"
            )
        else:
            counts = batch.final_counts or BatchRequestCounts(total=batch.total)
            payload = BatchWebhookPayload(
                type=event,
                timestamp=iso(batch.finished_ms or int(self._clock() * 1000)),
                data=batch.to_batch(counts, self._public_api_url),
            )
            body = payload.model_dump_json().encode()
            response = await self._send_body(
                batch.webhook_url or "", record_webhook_id(batch, event), body, secrets
            )
            outcome = self._judge(response, attempt)
        outcome = replace(outcome, attempt=attempt)
        status = _RECORDED_STATUS[outcome.kind]
        due = None if outcome.retry_in is None else int((self._clock() + outcome.retry_in) * 1000)
        if not await asyncio.to_thread(
            self._batches.record_delivery,
            batch.id,
            status,
            outcome.status_code,
            attempt,
            self._logged(outcome),
            due,
            batch.delivery_log_seq,
            batch.expires_at,
            receive,
            batch.created_ms,
            batch.finished_ms,
        ):
            return await self._after_a_batch_copy_counted(batch_id, receive, delivery_round)
        return outcome

    async def _after_a_batch_copy_counted(
        self, batch_id: str, receive: str | None, delivery_round: int | None
    ) -> DeliveryOutcome:
        """Another copy counted this attempt of the batch's event, or settled the delivery: as
        for a job's (`_after_a_copy_counted`), a settled one is acknowledged, and a pending one
        keeps this message until the next attempt is due: the copies may be one SQS message
        received twice, whose deletion would drop the other's retry."""
        batch = await asyncio.to_thread(self._batches.find, batch_id) if self._batches else None
        if batch is None or batch.delivery_status is not DeliveryStatus.PENDING:
            return DeliveryOutcome.skipped("another copy of this delivery settled it first")
        if delivery_round is not None and batch.delivery_round > delivery_round:
            return DeliveryOutcome.skipped(_A_LATER_ROUND)
        return self._after_the_counting_copy(batch.delivery_next_ms, batch.delivery_carrier, receive)

    def _after_the_counting_copy(
        self, next_ms: int | None, carrier: str | None, receive: str | None
    ) -> DeliveryOutcome:
        """When a copy whose attempt another counted comes back: the copy lag after the next
        attempt is due, behind the message that carries it; or, when the copy that counted it
        was this very receive handed over twice (the carrier is this receive), when it is due:
        one SQS message, whose visibility this copy's change sets last."""
        due_in = (next_ms or 0) / 1000 - self._clock()
        if receive is not None and receive == carrier:
            wait = min(max(due_in, CARRIER_SKEW_SECONDS), self.max_delay_seconds)
        else:
            wait = max(self._behind(due_in), EARLY_TOLERANCE_SECONDS)
        return DeliveryOutcome(
            OutcomeKind.RETRY,
            retry_in=wait,
            reason="another copy counted this attempt; this one waits for the next",
        )

    def _behind(self, due_in: float) -> float:
        """How long a copy waits to come back after the carrier of an attempt due in `due_in`
        seconds: the copy lag after it is due; or, when SQS cannot hide the copy that long (a
        Retry-After of many hours), long before it is due, to wait behind it again then (a copy
        brought back by the cap would come beside the carrier and take itself for it)."""
        wait = due_in + self.copy_lag_seconds
        if wait <= self.max_delay_seconds:
            return wait
        return max(due_in - self.copy_lag_seconds, EARLY_TOLERANCE_SECONDS)

    async def deliver(
        self,
        message: WebhookMessage,
        attempt: int | None = None,
        *,
        first_receive: bool = False,
        receive: str | None = None,
    ) -> DeliveryOutcome:
        """Attempt `attempt` of delivering `message`; None: the one after those the job counted.

        The first receive of a message that carries the job (sent right after its terminal
        write) takes the job from it, with no read: the write that records the attempt is
        conditional on the count the job had, so a job that moved on since is read then.
        """
        event = message.event
        if isinstance(event, BatchEvent):
            return await self.deliver_batch(
                message.job_id,
                event,
                receive,
                first_receive=first_receive,
                delivery_round=message.delivery_round,
            )
        if event not in TERMINAL_EVENTS:
            with self._job_event_in_flight(message.job_id):
                return await self._deliver(message, attempt, first_receive, first_receive, receive)
        await self._after_the_job_events(message.job_id)
        async with self._one_at_a_time(message.job_id) as behind_a_copy:
            return await self._deliver(
                message, attempt, first_receive, first_receive and not behind_a_copy, receive
            )

    @contextlib.contextmanager
    def _job_event_in_flight(self, job_id: str) -> Iterator[None]:
        """A job.started or job.output delivery of `job_id` in flight in this event loop."""
        flights = self._in_flight.setdefault(asyncio.get_running_loop(), {})
        count, landed = flights.get(job_id, (0, asyncio.Event()))
        flights[job_id] = (count + 1, landed)
        try:
            yield
        finally:
            count, landed = flights[job_id]
            if count == 1:
                del flights[job_id]
                landed.set()
            else:
                flights[job_id] = (count - 1, landed)

    async def _after_the_job_events(self, job_id: str) -> None:
        """A job's terminal event goes after its job.started and job.output messages that came
        in the same batch of records (the last output is sent before the end: docs/streaming.md),
        which the processor runs at once and SQS gives in no order: it lets the batch's other
        records start first, then waits for the job's to land, for a second at most (a receiver
        that is down for them does not hold back the end, nor the dispatcher's time). (One in
        another batch finds the terminal event delivered and is not sent, or, sent at the same
        moment elsewhere, may arrive after it.)"""
        await asyncio.sleep(0)
        flight = self._in_flight.get(asyncio.get_running_loop(), {}).get(job_id)
        if flight is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flight[1].wait(), WEBHOOK_OUTPUT_FIRST_SECONDS)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, subject: str) -> AsyncIterator[bool]:
        """Copies of one job's terminal event, or of one batch's event, in this environment (one
        batch of records) go one at a time, and a copy that waited reads what the one before it
        recorded: otherwise both would POST the same attempt. Copies in other environments
        still can (webhooks are at least once, under one webhook-id), which the conditional
        record settles. Yields whether this copy came behind another."""
        locks = self._delivery_locks.setdefault(asyncio.get_running_loop(), {})
        lock, users = locks.get(subject, (asyncio.Lock(), 0))
        # Powertools keeps one event loop per warm environment: an entry lives while it is used.
        locks[subject] = (lock, users + 1)
        behind_a_copy = lock.locked()
        try:
            async with lock:
                yield behind_a_copy
        finally:
            lock, users = locks[subject]
            if users == 1:
                del locks[subject]
            else:
                locks[subject] = (lock, users - 1)

    async def _deliver(
        self,
        message: WebhookMessage,
        attempt: int | None,
        first_receive: bool,
        carried: bool,
        receive: str | None = None,
    ) -> DeliveryOutcome:
        event = message.event
        assert isinstance(event, WebhookEvent)
        job = _carried(message, self._clock()) if carried and self._policy.trust_carried_job else None
        if job is None:
            job = await asyncio.to_thread(self._jobs.find, message.job_id)
        reason = _why_not_deliver(job, event, message.delivery_round)
        # The receiver has the job's terminal event already: anything of the job running would
        # read as the job running again (a message redriven from the DLQ starts its count anew,
        # so its attempt says nothing).
        told_it_ended = (
            job is not None
            and job.terminal_event is not None
            and job.wants(job.terminal_event)
            and job.delivery_status is DeliveryStatus.DELIVERED
        )
        if event is WebhookEvent.OUTPUT and message.output is None:
            reason = "a job.output message without its output"
        elif (
            event is WebhookEvent.OUTPUT
            and job is not None
            and job.status.is_terminal
            and ((attempt or 1) > 1 or told_it_ended)
        ):
            # Live output is worth little once the job has ended: its result holds all of it.
            reason = "the job has ended; its result holds this output"
        elif (
            event is WebhookEvent.STARTED
            and job is not None
            and job.terminal_event is not None
            and job.wants(job.terminal_event)
            and ((attempt or 1) > 1 or told_it_ended)
        ):
            # A retry once the job has ended would read as the job running again to a receiver
            # that has its terminal event, or soon will. (A first send still goes, unless that
            # event was delivered: a job that subscribes to job.started alone, or ended before
            # its dispatcher looked, would otherwise never hear of its start.)
            reason = "the job has ended; its terminal event supersedes job.started"
        if job is None or reason:
            return DeliveryOutcome.skipped(reason)
        terminal = message.event in TERMINAL_EVENTS
        # Only a counted attempt is conditional on the count: an explicit one is taken as given.
        previous = job.delivery_attempts if attempt is None and terminal else None
        early = self._early_by(job) if previous is not None else 0.0
        if previous:
            waits = self._waits_for_the_carrier(
                job.delivery_next_ms, job.delivery_carrier, receive, first_receive=first_receive
            )
            if waits is not None:
                return waits
        if early > 0:
            # A copy of the message came before the attempt it would make is due: it waits
            # until after the message that carries that attempt, which it then finds settled.
            return DeliveryOutcome(
                OutcomeKind.RETRY,
                retry_in=self._behind(early),
                reason="the next attempt is not due yet",
            )
        attempt = attempt or (job.delivery_attempts + 1 if terminal else 1)
        if job.webhook_gone:
            # 410 Gone to an earlier event: nothing more is POSTed, and the terminal delivery says so.
            if not terminal:
                return DeliveryOutcome.skipped("the receiver answered 410 Gone to an earlier event")
            outcome = DeliveryOutcome(
                OutcomeKind.DISABLED, reason="the receiver answered 410 Gone to an earlier event"
            )
            recorded = await asyncio.to_thread(self._record, job, outcome, previous, receive)
            return outcome if recorded else await self._after_a_copy_counted(message, receive)
        secrets = await self._secrets(job.tenant_id)
        if not secrets:
            outcome = DeliveryOutcome(
                OutcomeKind.GAVE_UP, reason="the tenant has no webhook secret", error_class="NoWebhookSecret"
            )
        else:
            if message.output is not None and event is WebhookEvent.OUTPUT:
                response = await self._send_output(job, message.output, secrets)
            else:
                response = await self._send(job, event, secrets)
            outcome = self._judge(response, attempt)
            if (
                event is WebhookEvent.OUTPUT
                and outcome.kind is OutcomeKind.RETRY
                and attempt >= OUTPUT_ATTEMPTS
            ):
                # A receiver that is down must not fill the dispatcher with a job's stream of them.
                outcome = replace(
                    outcome,
                    kind=OutcomeKind.GAVE_UP,
                    retry_in=None,
                    reason=f"job.output is tried {OUTPUT_ATTEMPTS} times at most",
                )
        outcome = replace(outcome, attempt=attempt)
        # The delivery record on the job describes its terminal event; job.started is sent but
        # not recorded, or it would overwrite what the API shows for the terminal delivery.
        if terminal and not await asyncio.to_thread(self._record, job, outcome, previous, receive):
            return await self._after_a_copy_counted(message, receive)
        if not terminal and outcome.kind is OutcomeKind.DISABLED:
            # Said on the job, so its later events (the terminal one too) are not POSTed.
            await self._mark_gone(job.id)
        return outcome

    async def _mark_gone(self, job_id: str) -> None:
        """A 410 Gone to job.started or job.output, written on the job; a throttled write is
        tried again within the invocation (hunt 321): this message, back later, finds the job
        ended and is skipped, and the 410 was never written: the terminal event went to a
        receiver that had said it was gone."""
        for delay in (*GONE_WRITE_RETRY_SECONDS, None):
            try:
                await asyncio.to_thread(self._jobs.mark_webhook_gone, job_id)
                return
            except StoreUnavailable:
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def _after_a_copy_counted(self, message: WebhookMessage, receive: str | None) -> DeliveryOutcome:
        """Another copy of this message settled or counted this attempt first: its outcome stands.

        Settled, this copy is acknowledged. Still pending, this copy must keep its message until
        the next attempt is due instead: the copies may be one SQS message received twice, and
        acknowledging this one would delete the message that carries the other's retry, leaving
        the delivery to the reconciler's sweep many minutes late.
        """
        job = await asyncio.to_thread(self._jobs.find, message.job_id)
        reason = (
            _why_not_deliver(job, message.event, message.delivery_round)
            if isinstance(message.event, WebhookEvent)
            else "a batch event"
        )
        if job is None or reason:
            return DeliveryOutcome.skipped(reason or "another delivery of this event settled it first")
        # After the copy that counted it, whose message carries the attempt and comes back at it.
        return self._after_the_counting_copy(job.delivery_next_ms, job.delivery_carrier, receive)

    def _waits_for_the_carrier(
        self,
        next_ms: int | None,
        carrier: str | None,
        receive: str | None,
        *,
        first_receive: bool = False,
    ) -> DeliveryOutcome | None:
        """How a message waits while an attempt is scheduled (`next_ms`) and a receive of a
        message carries it (`carrier`, a `receive_id`); None: it may go on.

        - The carrier's own receive, handed over twice (or both copies came at once, and the
          other recorded the attempt moments ago), comes back when the attempt is due: one SQS
          message, whose visibility either copy sets, so no copy lag; the early tolerance is
          for a carrier back from its delay, never for a second POST beside the first.
        - The carrier's message back from its delay (a new receipt, received before) goes on
          once it is due.
        - Any other message (a copy SQS stored apart, with the carrier's id and a visibility of
          its own; a copy sent again for the ended job or batch) goes after the carrier, even
          within the tolerance or just past it.
        """
        if next_ms is None:
            return None
        early = self._due_in(next_ms, CARRIER_SKEW_SECONDS)
        if carrier is not None and receive is not None:
            with_receipt = _RECEIPT_MARK in receive
            if receive == carrier and (early > 0 or with_receipt):
                # (a receive never comes back by itself: this one is a copy of the receive
                # that made the attempt, handed over again, and never makes the next one; its
                # receipt still valid, the message comes back when the attempt is due)
                return DeliveryOutcome(
                    OutcomeKind.RETRY,
                    retry_in=min(max(early, CARRIER_SKEW_SECONDS), self.max_delay_seconds),
                    reason="this message's attempt is not due yet (it was received twice)",
                )
            if _message_of(receive) == _message_of(carrier) and not (first_receive and with_receipt):
                # The carrier back from its delay (received before; a first receive with the
                # carrier's id is a copy SQS stored apart): it goes on once the attempt is due,
                # and waits until then when another environment's clock brings it back a
                # little early (never the copy lag: it is the carrier).
                if early <= 0:
                    return None
                if early <= EARLY_TOLERANCE_SECONDS:
                    return DeliveryOutcome(
                        OutcomeKind.RETRY, retry_in=early, reason="the next attempt is not due yet"
                    )
        elif not first_receive:
            # (no carrier named: a record written before carriers were, or a caller without
            # ids; a message received before is taken for the carrier)
            return None
        due_in = next_ms / 1000 - self._clock()
        if due_in + self.copy_lag_seconds <= 0:
            return None
        return DeliveryOutcome(
            OutcomeKind.RETRY,
            retry_in=self._behind(due_in),
            reason="a copy waits for the message that carries the scheduled attempt",
        )

    def _early_by(self, job: JobRecord) -> float:
        """Seconds until the job's next attempt is due (by this dispatcher's clock, which set
        it), when a copy of its message comes more than a second before it; the original,
        delayed by exactly that, comes about on time."""
        return self._due_in(job.delivery_next_ms)

    def _due_in(self, next_ms: int | None, tolerance: float = EARLY_TOLERANCE_SECONDS) -> float:
        if next_ms is None:
            return 0.0
        early = next_ms / 1000 - self._clock()
        return early if early > tolerance else 0.0

    async def _secrets(self, tenant_id: str) -> list[str]:
        """The tenant's signing secrets, newest first, read at most once per
        `webhooks.secrets_cache_seconds` in this environment (concurrent deliveries to one
        tenant share the read). A tenant that is gone is not remembered."""
        ttl = self._policy.secrets_cache_seconds
        locks = self._secret_locks.setdefault(asyncio.get_running_loop(), {})
        async with locks.setdefault(tenant_id, asyncio.Lock()):
            cached = self._secret_cache.get(tenant_id)
            if cached is not None and ttl > 0 and self._clock() - cached[0] < ttl:
                return cached[1]
            # (kept from when the read began: a slow read, throttled and retried, holds secrets
            # as they were then, and a rotation since is used within the cache time of that)
            read_at = self._clock()
            try:
                tenant = await asyncio.to_thread(self._tenants.get, tenant_id)
            except UnknownTenant:
                self._secret_cache.pop(tenant_id, None)
                return []
            self._secret_cache[tenant_id] = (read_at, tenant.webhook_secrets)
            return tenant.webhook_secrets

    async def _send(self, job: JobRecord, event: WebhookEvent, secrets: list[str]) -> _Response:
        body = build_payload(
            job.to_job(api_base=self._public_api_url),
            event,
            self._public_api_url,
            self._policy.inline_result_limit_bytes,
        )
        return await self._send_body(job.webhook_url or "", record_webhook_id(job, event), body, secrets)

    async def _send_output(self, job: JobRecord, output: JobOutputEvent, secrets: list[str]) -> _Response:
        """A job.output event: the text its message carries. Its id names the output it holds,
        so each is de-duplicated on its own and a retry keeps its id."""
        payload = OutputWebhookPayload(
            type=WebhookEvent.OUTPUT, timestamp=iso(int(self._clock() * 1000)), data=output
        )
        msg_id = record_webhook_id(job, f"{WebhookEvent.OUTPUT}:{output.attempt}:{output.seq_to}")
        body = payload.model_dump_json().encode()
        timeout = min(self._policy.timeout_seconds, OUTPUT_TIMEOUT_SECONDS)
        return await self._send_body(job.webhook_url or "", msg_id, body, secrets, timeout=timeout)

    async def _send_body(
        self, url: str, msg_id: str, body: bytes, secrets: list[str], timeout: float | None = None
    ) -> _Response:
        # (the host is logged with the outcome: the runbook tells one dead receiver from a
        # broken dispatcher by it, hunt 275)
        response = await self._send_to(url, msg_id, body, secrets, timeout)
        return replace(response, host=_host_of(url))

    async def _send_to(
        self, url: str, msg_id: str, body: bytes, secrets: list[str], timeout: float | None
    ) -> _Response:
        timeout = timeout or self._policy.timeout_seconds
        began = time.monotonic()
        try:
            # Checked again at send time: the DNS answer may have changed since submit. Within
            # the attempt's time, as the POST is: a receiver's name server that answers slowly
            # must not hold a delivery past what the dispatcher budgets for it.
            async with asyncio.timeout(timeout):
                target = await self._look_up(
                    functools.partial(
                        check_webhook_url, url, self._policy.allow_loopback_http, self._resolver
                    )
                )
        except (InvalidWebhookUrl, WebhookHostUnavailable) as exc:
            return _Response(None, error=exc.detail, error_class=type(exc).__name__)
        except TimeoutError:
            return _Response(
                None,
                error=f"the receiver's host name did not resolve within {timeout:g}s",
                error_class="Timeout",
            )
        left = max(1.0, timeout - (time.monotonic() - began))
        return await self._post(target, body, self._headers(msg_id, body, secrets), left)

    def _headers(self, msg_id: str, body: bytes, secrets: list[str]) -> dict[str, str]:
        # Each attempt is signed afresh, so its timestamp is inside the receiver's tolerance.
        timestamp = int(self._clock())
        return {
            # The head of the answer is logged as sent: uncompressed, so it can be read.
            "accept-encoding": "identity",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secrets, msg_id, timestamp, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }

    async def _post(
        self, target: PinnedTarget, body: bytes, headers: dict[str, str], timeout: float | None = None
    ) -> _Response:
        timeout = timeout or self._policy.timeout_seconds
        began = time.monotonic()
        started_ms = int(self._clock() * 1000)
        # The verdict comes from the status line alone: once it is in, a body that stalls or is
        # cut off costs the delivery log its head, never the delivery.
        answered: _Response | None = None

        def elapsed_ms() -> int:
            return int((time.monotonic() - began) * 1000)

        transport: httpx.AsyncBaseTransport | None = None

        def status_line_only(error: str, error_class: str) -> _Response:
            # The status line came, and what followed it was refused (a header block httpx's
            # parser will not take, such as `Transfer-Encoding: chunked, chunked`) or did not
            # come in time: that line alone still decides the delivery, as the docs promise.
            code = transport.status_code() if isinstance(transport, PinnedTransport) else None
            return _Response(
                code, error=error, error_class=error_class, latency_ms=elapsed_ms(), started_ms=started_ms
            )

        try:
            # (made in here: one that cannot be made, its CA bundle unreadable, is a failed
            # attempt on the schedule too)
            transport = self._transport_factory(target)
            # httpx's timeout bounds each phase; this bounds the whole request, so a receiver
            # that drips its headers cannot hold a delivery past the timeout.
            async with (
                asyncio.timeout(timeout),
                httpx.AsyncClient(
                    transport=transport,
                    timeout=timeout,
                    follow_redirects=False,
                    trust_env=False,
                ) as client,
                # Streamed: the receiver's body could be anything, of any size, so only its
                # first bytes are read, raw (never decompressed), for the delivery log.
                client.stream("POST", target.url, content=body, headers=headers) as response,
            ):
                retry_after = parse_retry_after(response.headers, self._clock())
                answered = _Response(
                    response.status_code, retry_after, latency_ms=elapsed_ms(), started_ms=started_ms
                )
                budget = min(HEAD_READ_SECONDS, max(0.0, timeout - (time.monotonic() - began)))
                with contextlib.suppress(TimeoutError, httpx.HTTPError):
                    async with asyncio.timeout(budget):
                        answered = replace(answered, head=await _head(response))
                return answered
        except TimeoutError:
            if answered is not None:
                return answered
            return status_line_only(f"no answer within {timeout:g}s", "Timeout")
        except Exception as exc:
            # httpx's errors, and whatever else the connection raised (a socket refusing an
            # address, an ExceptionGroup from the transport): a failed attempt on the schedule,
            # never a crash that records nothing and sends the message round until the DLQ.
            if answered is not None:
                return answered
            if not isinstance(exc, httpx.HTTPError):
                logger.warning("webhook POST failed unexpectedly", extra=error_fields(exc))
            return status_line_only(type(exc).__name__, type(exc).__name__)

    def _judge(self, response: _Response, attempt: int) -> DeliveryOutcome:
        return replace(
            self._verdict(response, attempt),
            latency_ms=response.latency_ms,
            error_class=response.error_class,
            response_head=response.head,
            started_ms=response.started_ms,
            host=response.host,
        )

    def _verdict(self, response: _Response, attempt: int) -> DeliveryOutcome:
        code = response.status_code
        if code is not None and 200 <= code < 300:
            return DeliveryOutcome(OutcomeKind.DELIVERED, code)
        if code == GONE:
            return DeliveryOutcome(OutcomeKind.DISABLED, code, reason="the receiver answered 410 Gone")
        reason = response.error or f"the receiver answered {code}"
        if self.schedule.exhausted(attempt):
            return DeliveryOutcome(OutcomeKind.GAVE_UP, code, reason=reason)
        delay = self.schedule.delay(attempt)
        if code in RETRY_AFTER_STATUSES and response.retry_after is not None:
            delay = max(delay, response.retry_after)
        return DeliveryOutcome(OutcomeKind.RETRY, code, min(delay, self.max_delay_seconds), reason)

    def _logged(self, outcome: DeliveryOutcome) -> DeliveryAttempt | None:
        """The attempt as the delivery log shows it."""
        if outcome.attempt is None:
            return None
        return DeliveryAttempt(
            attempt=outcome.attempt,
            at=iso(outcome.started_ms if outcome.started_ms is not None else int(self._clock() * 1000)),
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            error_class=outcome.error_class,
            response_head=outcome.response_head,
        )

    def _record(
        self, job: JobRecord, outcome: DeliveryOutcome, previous_attempts: int | None, carrier: str | None
    ) -> bool:
        status = _RECORDED_STATUS[outcome.kind]
        due = None if outcome.retry_in is None else int((self._clock() + outcome.retry_in) * 1000)
        logged = self._logged(outcome)
        return self._jobs.record_delivery(
            job.id,
            status,
            outcome.status_code,
            outcome.retry_in,
            previous_attempts=previous_attempts,
            next_attempt_at_ms=due,
            attempt=logged,
            log_seq=job.delivery_log_seq,
            carrier=carrier,
            expires_at=job.expires_at,
            created_ms=job.created_ms,
        )


def receive_id(message_id: str | None, receipt: str | None) -> str | None:
    """One receive of an SQS message: its id, and a digest of the receipt handle SQS gave it
    (a new one each receive; one receive handed over twice keeps it). Without a receipt, the
    id alone."""
    if message_id is None or receipt is None:
        return message_id
    return f"{message_id}{_RECEIPT_MARK}{hashlib.sha256(receipt.encode()).hexdigest()[:16]}"


# (SQS message ids are UUIDs: never this character)
_RECEIPT_MARK = "#"


def _message_of(receive: str) -> str:
    return receive.split(_RECEIPT_MARK, 1)[0]


async def _head(response: httpx.Response) -> str | None:
    """The first RESPONSE_HEAD_BYTES of the answer's body, as UTF-8; None for an empty body."""
    head = b""
    if response.is_stream_consumed:  # a transport that read the body already (httpx's mock)
        head = response.content
    else:
        async for chunk in response.aiter_raw():
            head += chunk
            if len(head) >= RESPONSE_HEAD_BYTES:
                break
    if not head:
        return None
    # Undecodable bytes become U+FFFD (3 bytes each): cut again to the limit, at a character.
    text = head[:RESPONSE_HEAD_BYTES].decode("utf-8", errors="replace")
    return text.encode()[:RESPONSE_HEAD_BYTES].decode("utf-8", errors="ignore")


# How long the head of an answer may take once its status line is in.
HEAD_READ_SECONDS = 1.0


def _carried(message: WebhookMessage, now: float) -> JobRecord | None:
    """The job a terminal event's message carries, or None (then it is read). Only from a job
    that ended moments ago: a message redriven from the DLQ, whose receive count starts again,
    carries a job that has moved on since (delivered, failed, expired), and must read it."""
    if message.job is None or message.event not in TERMINAL_EVENTS:
        return None
    if "ids_by_creation" not in message.job:
        # (carried by a release before webhook-ids by creation, which could not say how the
        # stored job's ids are made: read, so an attempt and its retry sign under one id;
        # hunt 326)
        return None
    try:
        job = JobRecord.model_validate(message.job)
    except ValidationError:
        return None
    fresh = job.finished_ms is not None and now * 1000 - job.finished_ms <= CARRIED_JOB_FRESH_SECONDS * 1000
    # A job that subscribed to events before its end may have had one answered 410 Gone, which
    # only the stored job says (`webhook_gone`, set after the worker read the job it carries).
    earlier = any(event not in TERMINAL_EVENTS for event in job.webhook_events)
    return job if job.id == message.job_id and fresh and not earlier else None


# How long after its job ended a message's carried job is used instead of a read: the first
# attempt is due at once, and a message older than this has been somewhere (a backlog, a DLQ).
CARRIED_JOB_FRESH_SECONDS = 60


def parse_webhook_message(body: str) -> WebhookMessage:
    try:
        return WebhookMessage.model_validate_json(body)
    except ValidationError as exc:
        # Never the body: it is logged by message id, not by what it says.
        raise PoisonMessage("the message is not a webhook message") from exc


def webhook_job_id(body: str) -> str | None:
    """The job a webhooks-queue message names, or None: for logs about a message that failed."""
    try:
        return parse_webhook_message(body).job_id
    except PoisonMessage:
        return None


# How the dashboard counts each outcome.
_OUTCOME_METRICS = {
    OutcomeKind.DELIVERED: MetricName.WEBHOOK_DELIVERED,
    OutcomeKind.RETRY: MetricName.WEBHOOK_RETRIED,
    OutcomeKind.GAVE_UP: MetricName.WEBHOOK_FAILED,
    OutcomeKind.DISABLED: MetricName.WEBHOOK_FAILED,
    # Duplicates and stale events: acknowledged without a POST.
    OutcomeKind.SKIPPED: MetricName.WEBHOOK_SKIPPED,
}


def _observe(message: WebhookMessage, outcome: DeliveryOutcome) -> None:
    logger.info(
        f"webhook {outcome.kind}",
        extra={
            "job_id": message.job_id,
            "event": message.event.value,
            "attempt": outcome.attempt,
            "status_code": outcome.status_code,
            "error_class": outcome.error_class,
            "host": outcome.host,
            "retry_in": outcome.retry_in,
            "reason": outcome.reason,
        },
    )
    if message.event in _COURTESY_EVENTS:
        # job.started and job.output are tried briefly and given up without harm (the terminal
        # event carries the result): counted, a streaming tenant's slow receiver would page the
        # operator through WebhooksFailing, which means integrators losing results.
        return
    if outcome.kind is OutcomeKind.RETRY and outcome.attempt is None:
        # A copy that only waits (for the message carrying the attempt, or until it is due)
        # POSTed nothing: WebhookRetried counts failed attempts, which WebhooksNoneDelivered
        # weighs against deliveries (hunt 211: one redelivery's waits counted 15 for 11).
        return
    metrics.add_metric(name=_OUTCOME_METRICS[outcome.kind], unit=MetricUnit.Count, value=1)


def _host_of(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


_COURTESY_EVENTS = frozenset({WebhookEvent.STARTED, WebhookEvent.OUTPUT})
_RECORDED_STATUS = {
    OutcomeKind.DELIVERED: DeliveryStatus.DELIVERED,
    OutcomeKind.DISABLED: DeliveryStatus.DISABLED,
    OutcomeKind.RETRY: DeliveryStatus.PENDING,
    OutcomeKind.GAVE_UP: DeliveryStatus.FAILED,
}


def _why_not_deliver_batch(
    batch: BatchRecord | None, event: BatchEvent, now_s: float, delivery_round: int | None = None
) -> str:
    if batch is None or batch.expires_at <= now_s:
        # (past its retention it is gone, as GET answers, whenever DynamoDB's TTL deletes it)
        return "the batch no longer exists"
    if not batch.wants(event):
        return "the batch does not subscribe to this event"
    if batch.terminal_event is not event:
        return "the batch is not in this event's state"
    if batch.delivery_status is not DeliveryStatus.PENDING:
        return f"the delivery is already {batch.delivery_status}"
    if delivery_round is not None and batch.delivery_round > delivery_round:
        return _A_LATER_ROUND
    return ""


def _why_not_deliver(job: JobRecord | None, event: WebhookEvent, delivery_round: int = 0) -> str:
    """Why a message (of round `delivery_round`) must not be sent (a duplicate, a stale event,
    a gone job, a round a redelivery replaced), or ""."""
    if job is None:
        return "the job no longer exists"
    if not job.wants(event):
        return "the job does not subscribe to this event"
    if job.delivery_status is DeliveryStatus.DISABLED:
        return "the receiver disabled delivery for this job"
    if event not in TERMINAL_EVENTS:
        return ""
    if job.terminal_event is not event:
        return "the job is not in this event's state"
    if job.delivery_status in SETTLED:
        # A duplicate or late queue message: a redelivery from the API sets pending first.
        return f"the delivery is already {job.delivery_status}"
    if job.delivery_round > delivery_round:
        return _A_LATER_ROUND
    return ""
