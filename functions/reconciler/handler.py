"""The reconciler, on an EventBridge schedule: re-enqueue what a crash or lost message left."""

from __future__ import annotations

import gc

gc.disable()  # for the imports below (llmq.startup)

from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from llmq import aws, startup
from llmq.batches import BatchRepository
from llmq.config import ReconcilerEnvironment
from llmq.jobs import JobRepository
from llmq.offload import Offload
from llmq.payloads import payload_store
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.telemetry import logger, metrics

ENV = ReconcilerEnvironment.load(function_name="reconciler")


@cache
def reconciler() -> Reconciler:
    return Reconciler(
        JobRepository(ENV.jobs_table, ENV.config, dynamodb=aws.client("dynamodb")),
        QueueRepository(ENV.lane_queue_urls, ENV.webhook_queue_url, sqs=aws.lazy_client("sqs")),
        ENV.config,
        batches=BatchRepository(ENV.jobs_table, ENV.config, dynamodb=aws.client("dynamodb")),
        offload=Offload(payload_store(ENV.payload_bucket, s3=aws.lazy_client("s3")), ENV.config),
    )


@metrics.log_metrics(raise_on_empty_metrics=False)
@logger.inject_lambda_context(log_event=False)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    return reconciler().run(remaining_seconds=lambda: context.get_remaining_time_in_millis() / 1000).as_log()


startup.imports_done()
