"""A job as stored, and its mapping to the API's Job. No AWS here: the codec stores it."""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import UTC, datetime
from typing import Protocol

from pydantic import Field

from llmq.model_base import Model
from llmq.models import (
    EVENT_FOR_STATUS,
    ChatMessage,
    DeliveryAttempt,
    DeliveryStatus,
    EventDeliveries,
    GenerationParams,
    Job,
    JobError,
    JobProgress,
    JobResult,
    JobStatus,
    JobWebhook,
    WebhookDelivery,
    WebhookEvent,
    WebhookLog,
)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_job_id(job_id: str) -> bool:
    """An id llmq gives a job (`new_job_id`, or a batch's item): never another item's key of
    the table (a tenant's share, a batch), which a message sent by hand could name."""
    return job_id.startswith("job_") and "#" not in job_id


def new_job_id(tenant_id: str, idempotency_key: str | None, now_ms: int) -> str:
    """Derived from (tenant, key) when a key is given, so a replay hits the same PutItem condition."""
    if idempotency_key is not None:
        digest = hashlib.sha256(f"{tenant_id}\x00{idempotency_key}".encode()).digest()
        return "job_" + base64.b32encode(digest).decode().lower().rstrip("=")[:26]
    return f"job_{now_ms:012x}{secrets.token_hex(7)}"


class JobInput(Model):
    """What the worker sends to the provider. Stored with the job, never in a queue message."""

    messages: list[ChatMessage]
    params: GenerationParams = Field(default_factory=GenerationParams)


class _Delivered(Protocol):
    delivery_status: DeliveryStatus | None
    delivery_attempts: int
    delivery_last_status_code: int | None
    delivered_ms: int | None


def delivery_view(record: _Delivered) -> WebhookDelivery:
    """What the API shows of a delivery, a job's or a batch's."""
    return WebhookDelivery(
        status=record.delivery_status,
        attempts=record.delivery_attempts,
        last_status_code=record.delivery_last_status_code,
        delivered_at=iso(record.delivered_ms) if record.delivered_ms else None,
    )


class _Rounded(Protocol):
    created_ms: int
    delivery_round: int


def a_later_round(found: _Rounded | None, read: _Rounded) -> bool:
    """Whether `found` is the record `read` was (the same creation) with a delivery round past
    `read`'s: a redelivery's write applied, perhaps with its answer lost (a job's or a batch's)."""
    return (
        found is not None
        and found.created_ms == read.created_ms
        and found.delivery_round > read.delivery_round
    )


class JobRecord(Model):
    """A job as stored, including what the public Job hides (tenant, lease, input)."""

    id: str
    tenant_id: str
    status: JobStatus
    lane: str
    model: str
    # None when the input lives in S3 under `input_ref` (a claim brings it back).
    input: JobInput | None = None
    input_ref: str | None = None
    # The body as written (`intake.request_hash`), and in its canonical form
    # (`intake.request_digest`; None on jobs stored before it): a replay matches either.
    request_hash: str
    request_digest: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    created_ms: int
    started_ms: int | None = None
    # When the current (or last) attempt was claimed: its run, when it ends, is the tenant's
    # last run (`llmq.shares`). None on items claimed before it was written.
    claimed_ms: int | None = None
    finished_ms: int | None = None
    attempts: int = 0
    # Attempts the provider refused before generating, refunded (`RetryPolicy.max_refusals`).
    refusals: int = 0
    cancel_requested: bool = False
    lease_owner: str | None = None
    lease_expires_ms: int | None = None
    # After a transient failure: no claim before this time, whichever copy of its message comes.
    not_before_ms: int | None = None
    deadline_ms: int | None = None
    result: JobResult | None = None
    # Set when the result lives in S3; the API inlines it or hands out a presigned URL.
    result_ref: str | None = None
    result_url: str | None = None
    # When a presigned result_url stops working (epoch ms); never stored, like result_url.
    result_url_expires_ms: int | None = None
    # A queued job's approximate place among its tenant's queued jobs in its lane (1: next);
    # never stored, like result_url: GET /v1/jobs/{id} counts it (`JobStore.queued_ahead`).
    queue_position: int | None = None
    error: JobError | None = None
    webhook_url: str | None = None
    webhook_events: list[WebhookEvent] = Field(default_factory=list)
    delivery_status: DeliveryStatus | None = None
    # The receiver answered 410 Gone to one of the job's earlier events (job.started, job.output):
    # nothing more is POSTed for the job, its terminal delivery is recorded disabled.
    webhook_gone: bool = False
    delivery_attempts: int = 0
    delivery_last_status_code: int | None = None
    # When a pending delivery's next attempt is due (epoch ms): an early copy of its message waits.
    delivery_next_ms: int | None = None
    # The webhooks-queue message that will carry that attempt (its SQS message id): any other
    # copy waits until just after it (`webhooks.WebhookDispatcher`).
    delivery_carrier: str | None = None
    delivered_ms: int | None = None
    # The latest attempts to deliver the terminal event, oldest first (`JobRepository.record_delivery`).
    delivery_log: list[DeliveryAttempt] = Field(default_factory=list)
    # Attempts logged so far, every round together: attempt k of the log goes in slot k mod 10.
    delivery_log_seq: int = 0
    # Redeliveries asked for (`JobRepository.mark_delivery_pending` adds one): a webhooks message
    # of an earlier round is dropped (`WebhookMessage.delivery_round`).
    delivery_round: int = 0
    # Its webhook-ids hold `created_ms` (`webhooks.record_webhook_id`): set on every job stored
    # from this version on; one stored before keeps the ids its deliveries began with.
    ids_by_creation: bool = False
    expires_at: int
    # The token of the last conditional write. A write retried after its response was lost
    # finds its own token in the item and knows it was applied (DESIGN §3.10).
    last_write: str | None = None
    # Accepted under tenant shares (`llmq.shares`): its writes keep its tenant's counts. A job
    # accepted before them is written alone, as then.
    shared: bool = False
    # The dead-lettered lane messages of a job no worker claimed, by message id: a set, so a
    # retried or repeated dead letter counts once.
    dead_letter_ids: set[str] = Field(default_factory=set)
    # The letters ever counted for it, never reset (the set above is, at each claim): the round
    # its next lane message is sent in (`LaneMessage.redrive_round`). Written by ADD only.
    redrive_round: int = 0
    # An item of a batch (`llmq.batches`): its batch and the name the batch gave it. Its id is
    # derived from the batch's and its index, and it counts in the batch's counts, not in the
    # tenant's active jobs (the batch is admitted as a whole).
    batch_id: str | None = None
    custom_id: str | None = None
    # `stream: true` (llmq.live_output): True, else unset, so a job without it is stored as
    # before. Its output so far is in chunk items (1..stream_seq); the job holds its progress
    # and the start of the current attempt's output, as of the last output write.
    stream: bool | None = None
    stream_seq: int | None = None
    stream_attempt: int | None = None
    # Characters of `stream_attempt`'s output its chunks hold, and the seq of its first chunk:
    # a follower whose next chunk is past its TTL reads on from there, without reading the
    # gone ones (an attempt ends long before its first chunk expires).
    stream_chars: int | None = None
    stream_from: int | None = None
    progress_tokens: int | None = None
    progress_ms: int | None = None
    output_partial: str | None = None
    output_partial_truncated: bool | None = None

    def webhook_log(self) -> WebhookLog | None:
        """The delivery log of the job's terminal event (job.started is sent, not recorded)."""
        if self.webhook_url is None:
            return None
        event = self.terminal_event
        deliveries = []
        if event is not None and event in self.webhook_events:
            deliveries.append(
                EventDeliveries(event=event, status=self.delivery_status, attempts=self.delivery_log)
            )
        return WebhookLog(
            job_id=self.id, url=self.webhook_url, events=self.webhook_events, deliveries=deliveries
        )

    def wants(self, event: WebhookEvent) -> bool:
        return self.webhook_url is not None and event in self.webhook_events

    @property
    def terminal_event(self) -> WebhookEvent | None:
        return EVENT_FOR_STATUS[self.status] if self.status.is_terminal else None

    def to_job(self, api_base: str = "") -> Job:
        webhook = None
        if self.webhook_url is not None:
            webhook = JobWebhook(
                url=self.webhook_url,
                events=self.webhook_events,
                delivery=delivery_view(self),
            )
        return Job(
            id=self.id,
            status=self.status,
            lane=self.lane,
            model=self.model,
            metadata=self.metadata,
            created_at=iso(self.created_ms),
            started_at=iso(self.started_ms) if self.started_ms else None,
            finished_at=iso(self.finished_ms) if self.finished_ms else None,
            attempts=self.attempts,
            cancel_requested=self.cancel_requested,
            result=self.result,
            result_url=self.result_url
            # The stack's public URL ends in a slash (API Gateway's RestApi.url): one, not two.
            or (
                f"{api_base.rstrip('/')}/v1/jobs/{self.id}"
                if self.result is None and self.result_ref
                else None
            ),
            result_url_expires_at=iso(self.result_url_expires_ms) if self.result_url_expires_ms else None,
            queue_position=self.queue_position if self.status is JobStatus.QUEUED else None,
            error=self.error,
            webhook=webhook,
            batch_id=self.batch_id,
            custom_id=self.custom_id,
            **self._live_output(),
        )

    def _live_output(self) -> dict[str, object]:
        if not self.stream:
            return {}
        # Shown while it runs, and only the current attempt's (a retry's claim leaves the last
        # attempt's in the item until its own first write).
        if (
            self.status is not JobStatus.RUNNING
            or self.progress_ms is None
            or self.stream_attempt != self.attempts
        ):
            return {"stream": True}
        return {
            "stream": True,
            "progress": JobProgress(
                output_tokens=self.progress_tokens or 0, updated_at=iso(self.progress_ms)
            ),
            "output_partial": self.output_partial or "",
            "output_partial_truncated": bool(self.output_partial_truncated),
        }
