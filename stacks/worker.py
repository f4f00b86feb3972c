"""The worker (one event source mapping per lane) and the dead-letter function on the lane DLQs."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq.config import DEAD_LETTER_MAX_CONCURRENCY, DeadLetterEnvironment, LlmqConfig, WorkerEnvironment
from stacks.functions import FunctionDefaults, build_function, function_environment
from stacks.jobs_table import grant_item_actions
from stacks.lanes import LanesConstruct, consume, grant_send

# Explicit, so that the worker can neither delete jobs nor scan the table, and cannot
# overwrite a whole job with PutItem: it only claims, completes and reads. No Query: the
# worker reads its job by key. A retry is the same message made visible again later
# (ChangeMessageVisibility); the lane SendMessage is for a job whose tenant is at its cap,
# which waits as a delayed copy of its message (`JobRunner._defer`). The claim, the retry
# and the terminal writes are transactions with the tenant's share item, authorised per item
# by UpdateItem. tests/infra checks these against the calls the worker makes
# (tests/aws_calls.json), both ways.
# A batch's expansion puts its items (each conditional on being absent) in transactions, an
# item's claim checks its batch is not canceling (ConditionCheckItem), and the end of an item
# reads its batch's count shards (BatchGetItem).
WORKER_TABLE_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:UpdateItem",
    "dynamodb:PutItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:BatchGetItem",
)
DEAD_LETTER_TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:UpdateItem")


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
            # Reserved concurrency: the sum of the lanes' MaximumConcurrency (build_function,
            # LlmqConfig.reserved_concurrency), so each lane keeps its own floor and the total
            # that can hit the provider (and the GPU budget) is bounded.
        )
        grant_item_actions(jobs_table, self.worker, *WORKER_TABLE_ACTIONS)
        grant_send(self.worker, webhook_queue, *lanes.queues)
        # GetSecretValue only: not the DescribeSecret of `grant_read`.
        self.worker.add_to_role_policy(
            iam.PolicyStatement(
                actions=["secretsmanager:GetSecretValue"], resources=[provider_secret.secret_arn]
            )
        )
        for lane in lanes.lanes.values():
            consume(
                self.worker,
                lane.queue,
                batch_size=lane.config.batch_size,
                max_batching_window=_batching_window(lane.config.batching_window_seconds),
                max_concurrency=lane.config.max_concurrency,
                # A failed attempt comes back after its backoff, not the queue's default.
                also=("sqs:ChangeMessageVisibility",),
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
                poison_queue_url=lanes.poison.queue_url,
            ),
        )
        grant_item_actions(jobs_table, self.dead_letter, *DEAD_LETTER_TABLE_ACTIONS)
        # A queued job whose message dead-lettered before any claim is sent to its lane again;
        # a dead letter that names no job is set aside in the poison queue.
        grant_send(self.dead_letter, webhook_queue, lanes.poison, *lanes.queues)
        for dlq in lanes.dlqs:
            consume(
                self.dead_letter,
                dlq,
                batch_size=10,
                max_concurrency=DEAD_LETTER_MAX_CONCURRENCY,
                # A DLQ is not in its environment by URL (GetQueueUrl), and a message it cannot
                # settle yet is put back for later (ChangeMessageVisibility).
                also=("sqs:GetQueueUrl", "sqs:ChangeMessageVisibility"),
            )


def _batching_window(seconds: int) -> cdk.Duration | None:
    return cdk.Duration.seconds(seconds) if seconds > 0 else None
