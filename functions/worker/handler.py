"""The worker: a lane batch, run concurrently, answered as a partial batch response."""

from __future__ import annotations

import uuid
from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    AsyncBatchProcessor,
    EventType,
    async_process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.parameters import get_secret
from aws_lambda_powertools.utilities.typing import LambdaContext

from llmq.config import WorkerEnvironment
from llmq.errors import PoisonMessage, StoreUnavailable
from llmq.execution import Invocation, JobRunner, RetryLater, lane_job_id
from llmq.jobs import JobRepository
from llmq.payloads import payload_store
from llmq.providers import ChatCompletionsProvider
from llmq.queues import QueueRepository
from llmq.telemetry import log_record_failure, logger, metrics, tracer

ENV = WorkerEnvironment.load(function_name="worker")
# A batch whose every record is retried is normal here (a provider storm), not a function error.
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


def provider_api_key() -> str | None:
    if ENV.provider_api_key is not None:
        return ENV.provider_api_key
    if ENV.provider_secret_id:
        # Cached by Powertools for five minutes: one Secrets Manager call per warm container.
        return str(get_secret(ENV.provider_secret_id, max_age=300))
    return None


@cache
def queues() -> QueueRepository:
    return QueueRepository(ENV.lane_queue_urls, ENV.webhook_queue_url)


@cache
def runner() -> JobRunner:
    config = ENV.config
    provider = ChatCompletionsProvider(
        base_url=ENV.provider_base_url or str(config.provider.base_url),
        api_key=provider_api_key,
        stream=config.provider.stream,
        retry_timeouts=config.provider.retry_timeouts,
    )
    jobs = JobRepository(ENV.jobs_table, config, payloads=payload_store(ENV.payload_bucket))
    return JobRunner(jobs, queues(), provider, config)


async def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> None:
    invocation = Invocation(
        # Unique per handling, even for two copies of one message in a batch.
        owner=f"{lambda_context.aws_request_id}/{record.message_id}/{uuid.uuid4().hex[:8]}",
        remaining_seconds=lambda: lambda_context.get_remaining_time_in_millis() / 1000,
    )
    try:
        await runner().run(record.body, invocation)
    except RetryLater as retry:
        _delay(record, retry.delay_seconds)
        raise
    except PoisonMessage:
        logger.error("poison message; it goes to the DLQ", extra={"message_id": record.message_id})
        # Come back at once: the receive count, not the clock, should carry it to the DLQ.
        _delay(record, 0)
        raise
    except Exception as exc:
        log_record_failure(exc, record.message_id, lane_job_id(record.body))
        raise


def _delay(record: SQSRecord, seconds: float) -> None:
    try:
        queues().delay_redelivery(record.event_source_arn, record.receipt_handle, seconds)
    except StoreUnavailable:
        # The message still counts as failed; it just comes back after the queue's own timeout.
        logger.warning("could not shorten the message's visibility", extra={"message_id": record.message_id})


@metrics.log_metrics(raise_on_empty_metrics=False)
@logger.inject_lambda_context(log_event=False)
@tracer().capture_lambda_handler(capture_response=False)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return async_process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
