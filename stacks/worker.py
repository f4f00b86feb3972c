"""The worker (one event source mapping per lane) and the dead-letter function on the lane DLQs."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq.config import DeadLetterEnvironment, LlmqConfig, WorkerEnvironment
from stacks.functions import FunctionDefaults, build_function, function_environment
from stacks.lanes import LanesConstruct

# Explicit, so that the worker can neither delete jobs nor scan the table, and cannot
# overwrite a whole job with PutItem: it only claims, completes and reads.
WORKER_TABLE_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:UpdateItem",
    "dynamodb:Query",
    "dynamodb:ConditionCheckItem",
)
DEAD_LETTER_TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:UpdateItem")
# Lambda's lower bound for MaximumConcurrency: the DLQs see crashes only, so keep them slow.
DEAD_LETTER_MAX_CONCURRENCY = 2


class WorkerConstruct(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: LlmqConfig,
        defaults: FunctionDefaults,
        jobs_table: dynamodb.ITable,
        lanes: LanesConstruct,
        webhook_queue: sqs.IQueue,
        provider_secret: secretsmanager.ISecret,
    ) -> None:
        super().__init__(scope, construct_id)
        self.worker = build_function(
            self,
            "Worker",
            name="worker",
            description="llmq: claims a job, calls the provider, completes it (one batch per lane)",
            sizing=config.worker,
            defaults=defaults,
            environment=function_environment(
                WorkerEnvironment,
                jobs_table=jobs_table.table_name,
                lane_queue_urls=lanes.queue_urls_json(),
                webhook_queue_url=webhook_queue.queue_url,
                provider_secret_id=provider_secret.secret_arn,
            ),
            # The sum of the lanes' MaximumConcurrency: each lane keeps its own floor, and the
            # total that can hit the provider (and the GPU budget) is bounded.
            reserved_concurrency=config.total_lane_concurrency,
        )
        jobs_table.grant(self.worker, *WORKER_TABLE_ACTIONS)
        for queue in lanes.queues:
            queue.grant_send_messages(self.worker)
        webhook_queue.grant_send_messages(self.worker)
        provider_secret.grant_read(self.worker)
        for lane in lanes.lanes.values():
            self.worker.add_event_source(
                event_sources.SqsEventSource(
                    lane.queue,
                    batch_size=lane.config.batch_size,
                    max_batching_window=_batching_window(lane.config.batching_window_seconds),
                    max_concurrency=lane.config.max_concurrency,
                    report_batch_item_failures=True,
                )
            )

        self.dead_letter = build_function(
            self,
            "DeadLetter",
            name="dead_letter",
            description="llmq: settles a job whose message reached a lane DLQ (failed, canceled or sent again)",
            sizing=config.api,
            defaults=defaults,
            environment=function_environment(
                DeadLetterEnvironment,
                jobs_table=jobs_table.table_name,
                lane_queue_urls=lanes.queue_urls_json(),
                webhook_queue_url=webhook_queue.queue_url,
            ),
        )
        jobs_table.grant(self.dead_letter, *DEAD_LETTER_TABLE_ACTIONS)
        webhook_queue.grant_send_messages(self.dead_letter)
        # A queued job whose message dead-lettered before any claim is sent to its lane again.
        for queue in lanes.queues:
            queue.grant_send_messages(self.dead_letter)
        for dlq in lanes.dlqs:
            self.dead_letter.add_event_source(
                event_sources.SqsEventSource(
                    dlq,
                    batch_size=10,
                    max_concurrency=DEAD_LETTER_MAX_CONCURRENCY,
                    report_batch_item_failures=True,
                )
            )


def _batching_window(seconds: int) -> cdk.Duration | None:
    return cdk.Duration.seconds(seconds) if seconds > 0 else None
