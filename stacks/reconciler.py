"""The reconciler: on a schedule, re-enqueues what a crash or a lost message left behind."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq.config import LlmqConfig, ReconcilerEnvironment
from stacks.functions import FunctionDefaults, build_function, function_environment
from stacks.lanes import LanesConstruct

# Query covers the sparse sweep index (the grant includes the table's index ARNs); never Scan.
RECONCILER_TABLE_ACTIONS = ("dynamodb:Query", "dynamodb:GetItem", "dynamodb:UpdateItem")


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
            # Two overlapping sweeps would only enqueue duplicates; one at a time is enough.
            reserved_concurrency=1,
        )
        jobs_table.grant(self.function, *RECONCILER_TABLE_ACTIONS)
        for queue in lanes.queues:
            queue.grant_send_messages(self.function)
        webhook_queue.grant_send_messages(self.function)
        self.schedule = events.Rule(
            self,
            "Schedule",
            description="llmq: reconciler sweep",
            schedule=events.Schedule.rate(cdk.Duration.minutes(config.reconciler.schedule_minutes)),
            # The next tick is the retry.
            targets=[targets.LambdaFunction(self.function, retry_attempts=0)],
        )
