"""Lane DLQs: a job whose message exhausted its receives fails as `worker_crashed` (unless an
earlier attempt parked a paid result, which it ends with: `llmq.offload`).

Its webhook still goes out, and each job failed here counts once as `JobDeadLettered`: the
function drains the DLQs within seconds, so their depth never shows it. A body that names no
job is logged and reported as failed, so it stays in the DLQ for an operator; it never
crashes the batch. A batch's expand message is sent once more, then its batch is given up
on (`llmq.batch_runs.dead_lettered`).
"""

from __future__ import annotations

import gc

gc.disable()  # for the imports below (llmq.startup)

from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from llmq import aws, startup
from llmq.batches import BatchRepository
from llmq.config import MAX_VISIBILITY_SECONDS, DeadLetterEnvironment
from llmq.execution import lane_job_id, mark_dead_letter
from llmq.job_record import JobRecord
from llmq.jobs import JobRepository
from llmq.offload import Offload
from llmq.payloads import payload_store
from llmq.queues import QueueRepository
from llmq.sqs_edge import QueueEdge
from llmq.telemetry import MetricName, emit_job_metric, logger, metrics

ENV = DeadLetterEnvironment.load(function_name="dead_letter")
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@cache
def repositories() -> tuple[JobRepository, QueueRepository]:
    return JobRepository(ENV.jobs_table, ENV.config, dynamodb=aws.client("dynamodb")), QueueRepository(
        ENV.lane_queue_urls, ENV.webhook_queue_url, sqs=aws.lazy_client("sqs")
    )


@cache
def offload() -> Offload:
    return Offload(payload_store(ENV.payload_bucket, s3=aws.lazy_client("s3")), ENV.config)


@cache
def batches() -> BatchRepository:
    return BatchRepository(ENV.jobs_table, ENV.config, dynamodb=aws.client("dynamodb"))


# Kept for an operator, but not re-read every few seconds: hidden as long as SQS allows
# (queues.redelivery_visibility clamps it to what SQS accepts after the receive).
EDGE = QueueEdge(
    queues=lambda: repositories()[1], job_of=lane_job_id, poison_visibility_seconds=MAX_VISIBILITY_SECONDS
)


def record_handler(record: SQSRecord) -> None:
    jobs, queues = repositories()
    with EDGE.settling(record):
        job = mark_dead_letter(
            jobs,
            queues,
            record.body,
            record.message_id,
            (batches(), ENV.config),
            crashed=_count_failed,
            offload=offload(),
        )
    if job is not None:
        logger.info("dead letter settled", extra={"job_id": job.id, "status": job.status.value})


def _count_failed(job: JobRecord) -> None:
    """Each job this function's own write failed counts once: a copy of its message handled
    at the same time, or later, finds it failed already and counts nothing."""
    emit_job_metric(MetricName.JOB_DEAD_LETTERED, 1, job.lane)


@metrics.log_metrics(raise_on_empty_metrics=False)
@logger.inject_lambda_context(log_event=False)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )


startup.imports_done()
