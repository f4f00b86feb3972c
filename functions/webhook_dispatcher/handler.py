"""The webhook dispatcher: a batch of webhooks-queue messages, delivered concurrently.

A delivery to retry is reported as a batch item failure after its visibility is set to the
retry delay, so SQS redelivery is the retry schedule. Poison goes to the webhooks DLQ.
"""

from __future__ import annotations

import gc

gc.disable()  # for the imports below (llmq.startup)

from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    AsyncBatchProcessor,
    EventType,
    async_process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from llmq import aws, startup
from llmq.batches import BatchRepository
from llmq.config import DispatcherEnvironment
from llmq.jobs import JobRepository
from llmq.queues import QueueRepository, delivery_round_of
from llmq.sqs_edge import QueueEdge
from llmq.telemetry import logger, metrics, tracer
from llmq.tenants import TenantRepository
from llmq.webhooks import WebhookDispatcher, webhook_job_id

ENV = DispatcherEnvironment.load(function_name="webhook_dispatcher")
# A batch whose every delivery is retried is a normal answer, not a function error.
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@cache
def dispatcher() -> WebhookDispatcher:
    return WebhookDispatcher(
        jobs=JobRepository(ENV.jobs_table, ENV.config, dynamodb=aws.client("dynamodb")),
        tenants=TenantRepository(ENV.tenants_table, dynamodb=aws.client("dynamodb")),
        config=ENV.config,
        public_api_url=ENV.public_api_url,
        batches=BatchRepository(ENV.jobs_table, ENV.config, dynamodb=aws.client("dynamodb")),
    )


@cache
def queues() -> QueueRepository:
    return QueueRepository({}, ENV.webhook_queue_url, sqs=aws.lazy_client("sqs"))


EDGE = QueueEdge(queues=queues, job_of=webhook_job_id)


async def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> None:
    async with EDGE.settling_async(record, lambda: lambda_context.get_remaining_time_in_millis() / 1000):
        await dispatcher().handle(
            record.body,
            receive_count=int(record.attributes.approximate_receive_count or 1),
            message_id=record.message_id,
            receipt=record.receipt_handle,
            delivery_round=delivery_round_of(record.raw_event.get("messageAttributes")),
        )


@metrics.log_metrics(raise_on_empty_metrics=False)
@logger.inject_lambda_context(log_event=False)
@tracer().capture_lambda_handler(capture_response=False)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return async_process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )


startup.imports_done()
