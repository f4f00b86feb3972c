"""The SQS repository: lane messages, webhook messages and visibility changes.

Messages carry ids only (DESIGN §1); the job itself lives in DynamoDB.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from llmq import aws
from llmq.config import MAX_REDELIVERY_DELAY_SECONDS
from llmq.job_record import JobRecord
from llmq.models import BatchEvent, DeliveryStatus, JobOutputEvent, LaneMessage, WebhookEvent, WebhookMessage

if TYPE_CHECKING:
    from llmq.ports import QueueStore

_DEPTH_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


# SendMessage's DelaySeconds: 0 to 900.
MAX_SEND_DELAY_SECONDS = 900
# The job a terminal webhook message may carry (`job_snapshot`): well under SQS's default
# 256 KiB message limit, the rest of the message included.
WEBHOOK_SNAPSHOT_MAX_BYTES = 200_000


def redelivery_visibility(seconds: float) -> int:
    """The VisibilityTimeout to ask for: whole seconds, rounded up so a fractional Retry-After
    never comes early, and within what SQS accepts for a message received a while ago."""
    return max(0, min(math.ceil(seconds), MAX_REDELIVERY_DELAY_SECONDS))


# What SQS answers a message whose body and attributes together pass the queue's
# MaximumMessageSize (the query and JSON protocols' codes).
_TOO_LONG_CODES = {"InvalidParameterValue", "MessageTooLong", "AWS.SimpleQueueService.MessageTooLong"}
# A poison reason kept on its message (a message attribute's value may be 256 KiB; this is a note).
_POISON_REASON_CHARS = 256


class QueueRepository:
    def __init__(
        self,
        lane_queue_urls: dict[str, str],
        webhook_queue_url: str,
        *,
        sqs: Any,
        poison_queue_url: str | None = None,
    ) -> None:
        self.lane_queue_urls = lane_queue_urls
        self.webhook_queue_url = webhook_queue_url
        self.poison_queue_url = poison_queue_url
        # (bounded: a request answers in time whatever SQS does; every send it makes is one
        # the reconciler makes too, should it fail: `aws.answering_by`)
        self._sqs = aws.TranslatedClient(sqs, bounded=True)

    def enqueue_job(
        self,
        job_id: str,
        lane: str,
        tenant_id: str,
        delay_seconds: int = 0,
        not_before_ms: int | None = None,
        *,
        redrive_round: int = 0,
        spoken_for: bool = False,
    ) -> None:
        """The tenant is the message group: SQS fair queues (standard queues, July 2025) then
        keep one tenant's backlog from lengthening every other tenant's dwell time.
        https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-fair-queues.html
        `redrive_round`: the dead letters the job had counted (`LaneMessage.redrive_round`);
        `spoken_for`: a copy deferred without a claim of its own (`LaneMessage.spoken_for`).
        """
        body = LaneMessage(
            job_id=job_id,
            lane=lane,
            tenant_id=tenant_id,
            not_before_ms=not_before_ms,
            redrive_round=redrive_round,
            spoken_for=spoken_for,
        ).model_dump_json(exclude_defaults=True)
        self._sqs.send_message(
            QueueUrl=self.lane_queue_urls[lane],
            MessageBody=body,
            MessageGroupId=tenant_id,
            DelaySeconds=min(delay_seconds, MAX_SEND_DELAY_SECONDS),
        )

    def send_again(self, body: str, *, source_arn: str, delay_seconds: float) -> None:
        """A lane message, as received from the queue `source_arn`, sent to it again after
        `delay_seconds` (`QueueEdge.send_again`), under its tenant's group."""
        message = LaneMessage.model_validate_json(body)
        extra: dict[str, Any] = {"MessageGroupId": message.tenant_id} if message.tenant_id else {}
        self._sqs.send_message(
            QueueUrl=self.queue_url_for_arn(source_arn) or self._url_from_arn(source_arn),
            MessageBody=body,
            DelaySeconds=min(math.ceil(delay_seconds), MAX_SEND_DELAY_SECONDS),
            **extra,
        )

    def enqueue_jobs(self, job_ids: list[str], lane: str, tenant_id: str) -> None:
        """Lane messages for many jobs, ten to a SendMessageBatch; entries SQS failed are sent
        again, and StoreUnavailable if some still fail (their jobs wait for the reconciler)."""
        for start in range(0, len(job_ids), 10):
            entries = [
                {
                    "Id": str(index),
                    "MessageBody": LaneMessage(job_id=job_id, lane=lane, tenant_id=tenant_id).model_dump_json(
                        exclude_defaults=True
                    ),
                    "MessageGroupId": tenant_id,
                }
                for index, job_id in enumerate(job_ids[start : start + 10])
            ]
            for _ in range(3):
                response = self._sqs.send_message_batch(QueueUrl=self.lane_queue_urls[lane], Entries=entries)
                failed = {entry["Id"] for entry in response.get("Failed") or []}
                entries = [entry for entry in entries if entry["Id"] in failed]
                if not entries:
                    break
            else:
                from llmq.errors import StoreUnavailable

                raise StoreUnavailable(f"sqs.SendMessageBatch: {len(entries)} entries failed")

    def enqueue_expand(
        self, batch_id: str, lane: str, tenant_id: str, delay_seconds: int = 0, *, redrive_round: int = 0
    ) -> None:
        """The message that has a worker write a batch's items (`llmq.batch_runs`)."""
        body = LaneMessage(
            job_id=batch_id, kind="expand", lane=lane, tenant_id=tenant_id, redrive_round=redrive_round
        )
        self._sqs.send_message(
            QueueUrl=self.lane_queue_urls[lane],
            MessageBody=body.model_dump_json(exclude_defaults=True),
            MessageGroupId=tenant_id,
            DelaySeconds=min(delay_seconds, MAX_SEND_DELAY_SECONDS),
        )

    def enqueue_webhook(
        self,
        job_id: str,
        event: WebhookEvent | BatchEvent,
        output: JobOutputEvent | None = None,
        snapshot: dict[str, Any] | None = None,
        *,
        tenant_id: str | None = None,
        delivery_round: int = 0,
    ) -> None:
        """A webhook message. One queue and one dispatcher serve every tenant: the message
        carries its tenant as MessageGroupId, so SQS fair queues keep a tenant whose receiver
        is slow (or whose events are many) from lengthening every other tenant's wait, as the
        lanes do (`enqueue_job`). A resend that does not know the tenant sends none.
        A terminal event's message carries its round (`WebhookMessage.delivery_round`)."""
        body = webhook_message_body(WebhookMessage(job_id=job_id, event=event, output=output, job=snapshot))
        extra: dict[str, Any] = {"MessageGroupId": tenant_id} if tenant_id else {}
        if delivery_round:
            extra["MessageAttributes"] = {
                DELIVERY_ROUND_ATTRIBUTE: {"DataType": "Number", "StringValue": str(delivery_round)}
            }
        self._sqs.send_message(QueueUrl=self.webhook_queue_url, MessageBody=body, **extra)

    def lane_depth(self, lane: str) -> int:
        """Messages in the lane's queue: waiting, in flight and delayed (approximate)."""
        response = self._sqs.get_queue_attributes(
            QueueUrl=self.lane_queue_urls[lane], AttributeNames=list(_DEPTH_ATTRIBUTES)
        )
        attributes = response.get("Attributes", {})
        return sum(int(attributes.get(name, 0)) for name in _DEPTH_ATTRIBUTES)

    def queue_url_for_arn(self, queue_arn: str) -> str | None:
        """The URL of one of our queues from an event record's eventSourceARN."""
        name = queue_arn.rsplit(":", 1)[-1]
        for url in [*self.lane_queue_urls.values(), self.webhook_queue_url]:
            if url.rstrip("/").rsplit("/", 1)[-1] == name:
                return url
        return None

    def _url_from_arn(self, queue_arn: str) -> str:
        # arn:aws:sqs:<region>:<account>:<name>; DLQs are not in our environment by URL.
        *_, account, name = queue_arn.split(":")
        response = self._sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)
        return str(response["QueueUrl"])

    def set_aside_poison(self, body: str, *, source_arn: str, message_id: str, why: str) -> None:
        """A copy of a dead letter no function can settle, in the poison queue, where it waits
        visibly for an operator (`llmq dlq list --queue poison --peek N`) and alarms once
        (`PoisonMessages`), instead of coming back to the dead-letter function. Where it came
        from, its message id there and why it is poison travel as message attributes, or, when
        they would take the copy past the queue's size limit, in the function's log alone."""
        if self.poison_queue_url is None:
            raise LookupError("no poison queue in this environment")
        notes = {
            "llmq-source": _sendable(source_arn),
            "llmq-message-id": _sendable(message_id),
            "llmq-why": _sendable(why[:_POISON_REASON_CHARS]),
        }
        attributes = {name: {"DataType": "String", "StringValue": value} for name, value in notes.items()}
        try:
            self._sqs.send_message(
                QueueUrl=self.poison_queue_url, MessageBody=body, MessageAttributes=attributes
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in _TOO_LONG_CODES:
                raise
            self._sqs.send_message(QueueUrl=self.poison_queue_url, MessageBody=body)

    def delay_redelivery(self, queue_arn: str, receipt_handle: str, seconds: float) -> None:
        """Make a message we report as failed come back after `seconds`, not the queue default."""
        url = self.queue_url_for_arn(queue_arn) or self._url_from_arn(queue_arn)
        self._sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=receipt_handle, VisibilityTimeout=redelivery_visibility(seconds)
        )


# What SQS refuses in a message body, and in a String attribute's value: characters outside its
# allowed set (#x9, #xA, #xD, #x20 to #xD7FF, #xE000 to #xFFFD, #x10000 to #x10FFFF). The
# sandbox refuses by it too (llmq_sandbox.moto_fidelity).
SQS_REFUSED_CHARACTERS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _sendable(note: str) -> str:
    """A note SQS takes as a String attribute's value: never empty, its characters outside SQS's
    set escaped (hunt 276: a letter naming a job id with a control character, its reason
    quoting it, was refused, and never set aside)."""
    return (
        SQS_REFUSED_CHARACTERS.sub(lambda found: found.group().encode("unicode_escape").decode(), note) or "-"
    )


def announce_terminal(queues: QueueStore, job: JobRecord, *, carry: bool = False) -> bool:
    """Send the terminal event when the terminal write left the delivery pending. With `carry`
    (`webhooks.trust_carried_job`), `job` is what that write left and the message carries it,
    so the dispatcher's first try needs no read of the job."""
    event = job.terminal_event
    if job.delivery_status is not DeliveryStatus.PENDING or event is None or not job.wants(event):
        return False
    queues.enqueue_webhook(
        job.id,
        event,
        snapshot=job_snapshot(job) if carry else None,
        tenant_id=job.tenant_id,
        delivery_round=job.delivery_round,
    )
    return True


def webhook_message_body(message: WebhookMessage) -> str:
    """A webhooks-queue message as SQS takes it: every non-ASCII character escaped, since SQS
    refuses some that JSON allows raw (U+FFFE, U+FFFF) and a job's output or metadata may hold
    them ("Amazon SQS message quotas": the allowed characters)."""
    body = message.model_dump(mode="json", exclude_none=True, exclude={"delivery_round"})
    return json.dumps(body, separators=(",", ":"))


# The SQS message attribute that carries a webhooks message's `delivery_round`. An attribute, not
# a field of the body: a dispatcher before rounds refuses a body with a field it does not know
# (as poison: the webhooks DLQ), and ignores an attribute, so a redelivery's message sent during a
# deploy's update window, or in flight after a rollback, is delivered by either version.
DELIVERY_ROUND_ATTRIBUTE = "delivery_round"


def delivery_round_of(attributes: Mapping[str, Any] | None) -> int:
    """The round a webhooks message carries, from its message attributes as ReceiveMessage
    (`StringValue`) or Lambda's SQS event (`stringValue`) spells them; 0 without one."""
    value = (attributes or {}).get(DELIVERY_ROUND_ATTRIBUTE) or {}
    text = value.get("StringValue", value.get("stringValue")) if isinstance(value, Mapping) else None
    # (ASCII digits only: str.isdigit also takes "²", which int() refuses)
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 9:
        return int(text)
    return 0


def job_snapshot(job: JobRecord) -> dict[str, Any] | None:
    """The job for a webhook message, without its input (the webhook never shows the prompt,
    and the message must not hold it), or None when it is too large to travel: SQS takes a
    message up to the queue's MaximumMessageSize, 256 KiB unless set (1 MiB at most), and the
    job's item can hold a larger result inline; such a job is read from the table instead."""
    snapshot = job.model_dump(mode="json", exclude={"input"}, exclude_none=True)
    if len(json.dumps(snapshot, separators=(",", ":")).encode()) > WEBHOOK_SNAPSHOT_MAX_BYTES:
        return None
    return snapshot
