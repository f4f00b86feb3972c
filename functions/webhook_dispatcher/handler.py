"""The webhook dispatcher: a batch of webhooks-queue messages, delivered concurrently.

A delivery to retry is reported as a batch item failure after its visibility is set to the
retry delay, so SQS redelivery is the retry schedule. Poison goes to the webhooks DLQ.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    AsyncBatchProcessor,
    EventType,
    async_process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from llmq.config import DispatcherEnvironment
from llmq.errors import PoisonMessage, StoreUnavailable
from llmq.jobs import JobRepository
from llmq.models import WebhookMessage
from llmq.queues import QueueRepository
from llmq.telemetry import MetricName, log_record_failure, logger, metrics, tracer
from llmq.tenants import TenantRepository
from llmq.webhooks import DeliveryOutcome, OutcomeKind, WebhookDispatcher

ENV = DispatcherEnvironment.load(function_name="webhook_dispatcher")
# A batch whose every delivery is retried is a normal answer, not a function error.
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

_METRIC_FOR = {
    OutcomeKind.DELIVERED: MetricName.WEBHOOK_DELIVERED,
    OutcomeKind.RETRY: MetricName.WEBHOOK_RETRIED,
    OutcomeKind.GAVE_UP: MetricName.WEBHOOK_FAILED,
    OutcomeKind.DISABLED: MetricName.WEBHOOK_FAILED,
    # Duplicates and stale events: acknowledged without a POST.
    OutcomeKind.SKIPPED: MetricName.WEBHOOK_SKIPPED,
}


class DeliveryDeferred(Exception):
    """Reported as a batch item failure so SQS brings the message back after the retry delay."""


@cache
def dispatcher() -> WebhookDispatcher:
    return WebhookDispatcher(
        jobs=JobRepository(ENV.jobs_table, ENV.config),
        tenants=TenantRepository(ENV.tenants_table),
        config=ENV.config,
        public_api_url=ENV.public_api_url,
    )


@cache
def queues() -> QueueRepository:
    return QueueRepository({}, ENV.webhook_queue_url)


def _message(record: SQSRecord) -> WebhookMessage:
    try:
        return WebhookMessage.model_validate_json(record.body)
    except ValidationError as exc:
        # Never the body: log which message, not what it says.
        logger.error("malformed webhook message; it goes to the DLQ", extra={"message_id": record.message_id})
        raise PoisonMessage(record.message_id) from exc


async def record_handler(record: SQSRecord) -> None:
    try:
        message = _message(record)
    except PoisonMessage:
        # Come back at once: the receive count, not the clock, should carry it to the DLQ.
        queues().delay_redelivery(record.event_source_arn, record.receipt_handle, 0)
        raise
    attempt = int(record.attributes.approximate_receive_count or 1)
    try:
        outcome = await dispatcher().deliver(message, attempt=attempt)
    except Exception as exc:
        log_record_failure(exc, record.message_id, message.job_id)
        raise
    _observe(message, attempt, outcome)
    if outcome.kind is OutcomeKind.RETRY and outcome.retry_in is not None:
        try:
            queues().delay_redelivery(record.event_source_arn, record.receipt_handle, outcome.retry_in)
        except StoreUnavailable:
            # Still retried, after the queue's own visibility timeout instead of the schedule.
            logger.warning("could not set the retry delay", extra={"job_id": message.job_id})
        raise DeliveryDeferred(f"{message.job_id} {message.event}: retry in {outcome.retry_in:.0f}s")


def _observe(message: WebhookMessage, attempt: int, outcome: DeliveryOutcome) -> None:
    logger.info(
        f"webhook {outcome.kind}",
        extra={
            "job_id": message.job_id,
            "event": message.event.value,
            "attempt": attempt,
            "status_code": outcome.status_code,
            "retry_in": outcome.retry_in,
            "reason": outcome.reason,
        },
    )
    name = _METRIC_FOR.get(outcome.kind)
    if name is not None:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)


@metrics.log_metrics(raise_on_empty_metrics=False)
@logger.inject_lambda_context(log_event=False)
@tracer().capture_lambda_handler(capture_response=False)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return async_process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
