"""Lane DLQs: a job whose message exhausted its receives fails as `worker_crashed` (unless an
earlier attempt parked a paid result, which it ends with: `llmq.offload`).

Its webhook still goes out, and each job failed here counts once as `JobDeadLettered`: the
function drains the DLQs within seconds, so their depth never shows it. A body that names no
job, or anything else no function can settle, is poison: it is set aside in the poison queue
for an operator (and never crashes the batch). A batch's expand message is sent once more, then its batch is given up
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
from llmq.config import DeadLetterEnvironment
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
        ENV.lane_queue_urls,
        ENV.webhook_queue_url,
        sqs=aws.lazy_client("sqs"),
        poison_queue_url=ENV.poison_queue_url,
    )


@cache
def offload() -> Offload:
    return Offload(payload_store(ENV.payload_bucket, s3=aws.lazy_client("s3")), ENV.config)


@cache
def batches() -> BatchRepository:
    return BatchRepository(ENV.jobs_table, ENV.config, dynamodb=aws.client("dynamodb"))


# A dead letter no function can settle (naming no job, say) is set aside in the poison queue,
# where an operator sees it and nothing takes it again; one that could not be set aside is
# tried again this much later.
POISON_RETRY_SECONDS = 300
EDGE = QueueEdge(
    queues=lambda: repositories()[1],
    job_of=lane_job_id,
    poison_visibility_seconds=POISON_RETRY_SECONDS,
    set_aside=lambda: repositories()[1].set_aside_poison,
)


def record_handler(record: SQSRecord) -> None:
    jobs, queues = repositories()
    job = None  # (poison set aside is settled with no job)
    with EDGE.settling(record):
        job = mark_dead_letter(
            jobs,
            queues,
            record.body,
            record.message_id,
            (batches(), ENV.config),
            crashed=_count_failed,
            offload=offload(),
            config=ENV.config,
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
