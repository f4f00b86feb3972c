"""The reconciler: on a schedule, re-enqueues what a crash or a lost message left behind."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq.config import LlmqConfig, ReconcilerEnvironment
from llmq.job_index import SWEEP_INDEX
from stacks.functions import FunctionDefaults, build_function, function_environment
from stacks.jobs_table import grant_index_query, grant_item_actions
from stacks.lanes import LanesConstruct, SendOnlyQueueDestination, grant_send

# Item actions on the table; Query only on the sparse sweep index, never Scan.
# BatchGetItem: an open batch's count shards, to count its queued items' messages in a lane.
RECONCILER_TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:BatchGetItem")
# SQS's longest retention: a failed sweep's record waits for an operator this long.
FAILURES_RETENTION = cdk.Duration.days(14)


class ReconcilerConstruct(Construct):
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
    ) -> None:
        super().__init__(scope, construct_id)
        self.function = build_function(
            self,
            "Reconciler",
            name="reconciler",
            description="llmq: re-enqueues stale queued jobs, expired leases and pending webhooks",
            sizing=config.api,
            defaults=defaults,
            environment=function_environment(
                ReconcilerEnvironment,
                jobs_table=jobs_table.table_name,
                lane_queue_urls=lanes.queue_urls_json(),
                webhook_queue_url=webhook_queue.queue_url,
            ),
            # Reserved concurrency 1 (LlmqConfig.reserved_concurrency): two overlapping sweeps
            # would only enqueue duplicates.
        )
        grant_item_actions(jobs_table, self.function, *RECONCILER_TABLE_ACTIONS)
        grant_index_query(jobs_table, self.function, SWEEP_INDEX)
        # A lane's depth (GetQueueAttributes) tells a lost message from one still waiting.
        for queue in lanes.queues:
            queue.grant(self.function, "sqs:SendMessage", "sqs:GetQueueAttributes")
        grant_send(self.function, webhook_queue)
        self.schedule = events.Rule(
            self,
            "Schedule",
            description="llmq: reconciler sweep",
            schedule=events.Schedule.rate(cdk.Duration.minutes(config.reconciler.schedule_minutes)),
            # The next tick is the retry.
            targets=[targets.LambdaFunction(self.function, retry_attempts=0)],
        )
        # EventBridge invokes asynchronously, and Lambda retries a failed asynchronous invoke
        # twice by default: no retries here either, the next tick is the retry. A failed run's
        # event and error go to this queue, where they wait for an operator.
        self.failures = sqs.Queue(
            self,
            "Failures",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=FAILURES_RETENTION,
        )
        cdk.Validations.of(self.failures).acknowledge(
            cdk.Acknowledgment(
                id="AwsSolutions::AwsSolutions-SQS3",
                reason="This queue is itself the dead end: the on-failure destination of the "
                "reconciler's asynchronous invocations. Nothing consumes it, so nothing could "
                "redrive from it.",
            )
        )
        self.function.configure_async_invoke(
            retry_attempts=0, on_failure=SendOnlyQueueDestination(self.failures)
        )
