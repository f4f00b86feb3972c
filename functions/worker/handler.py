"""The worker: a lane batch, run concurrently, answered as a partial batch response."""

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
from aws_lambda_powertools.utilities.parameters import SecretsProvider
from aws_lambda_powertools.utilities.typing import LambdaContext

from llmq import aws, startup
from llmq.batches import BatchRepository
from llmq.config import WorkerEnvironment
from llmq.execution import Invocation, JobRunner, enough_threads, lane_job_id, lease_owner
from llmq.jobs import JobRepository
from llmq.payloads import payload_store
from llmq.providers import ChatCompletionsProvider, ProviderKey
from llmq.queues import QueueRepository
from llmq.sqs_edge import QueueEdge
from llmq.telemetry import logger, metrics, tracer

ENV = WorkerEnvironment.load(function_name="worker")
# A batch whose every record is retried is normal here (a provider storm), not a function error.
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@cache
def secrets() -> SecretsProvider:
    """Powertools' provider on llmq's own client: a provider left to make its client makes a
    boto3 session of its own, which loads botocore's shared data again on a cold start."""
    return SecretsProvider(boto3_client=aws.client("secretsmanager"))


def read_provider_api_key(fresh: bool) -> str | None:
    if ENV.provider_api_key is not None:
        return ENV.provider_api_key
    if ENV.provider_secret_id:
        # Cached by Powertools for five minutes: one Secrets Manager call per warm container.
        # `fresh` (the provider refused the cached key) reads it again and refreshes the cache.
        return str(secrets().get(ENV.provider_secret_id, max_age=300, force_fetch=fresh))
    return None


# A refused key is read fresh at most once per invocation (ProviderKey).
PROVIDER_KEY = ProviderKey(read_provider_api_key)


@cache
def queues() -> QueueRepository:
    return QueueRepository(ENV.lane_queue_urls, ENV.webhook_queue_url, sqs=aws.lazy_client("sqs"))


@cache
def runner() -> JobRunner:
    config = ENV.config
    provider = ChatCompletionsProvider(
        base_url=ENV.provider_base_url or str(config.provider.base_url),
        api_key=PROVIDER_KEY,
        stream=config.provider.stream,
        retry_timeouts=config.provider.retry_timeouts,
        done_ends_answer=config.provider.done_ends_answer,
    )
    jobs = JobRepository(ENV.jobs_table, config, dynamodb=aws.client("dynamodb"))
    payloads = payload_store(ENV.payload_bucket, s3=aws.lazy_client("s3"))
    batches = BatchRepository(ENV.jobs_table, config, dynamodb=aws.client("dynamodb"))
    return JobRunner(jobs, queues(), provider, config, payloads=payloads, batches=batches)


EDGE = QueueEdge(queues=queues, job_of=lane_job_id, send_again=lambda: queues().send_again)


async def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> None:
    enough_threads()
    invocation = Invocation(
        owner=lease_owner(lambda_context.aws_request_id, record.message_id),
        remaining_seconds=lambda: lambda_context.get_remaining_time_in_millis() / 1000,
        hold_message=lambda seconds: EDGE.hold(record, seconds),
        receive_count=int(record.attributes.approximate_receive_count or 1),
    )
    async with EDGE.settling_async(record, invocation.remaining_seconds):
        await runner().run(record.body, invocation)


@metrics.log_metrics(raise_on_empty_metrics=False)
@logger.inject_lambda_context(log_event=False)
@tracer().capture_lambda_handler(capture_response=False)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    PROVIDER_KEY.new_invocation()
    return async_process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )


startup.imports_done()
