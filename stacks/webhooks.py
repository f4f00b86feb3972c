"""The webhooks queue, its DLQ and the dispatcher that POSTs signed events to integrators."""

from __future__ import annotations

from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_lambda_event_sources as event_sources
from constructs import Construct

from llmq.config import DispatcherEnvironment, LlmqConfig
from stacks.functions import FunctionDefaults, build_function, env_var, function_environment
from stacks.lanes import build_queue_pair

PUBLIC_API_URL_VAR = env_var(DispatcherEnvironment, "public_api_url")


def webhook_max_receive_count(config: LlmqConfig) -> int:
    # The dispatcher retries by changing the message's visibility, so every scheduled attempt
    # is a receive: the redrive must allow the whole schedule plus the lanes' crash allowance.
    return 1 + len(config.webhooks.schedule_seconds) + config.max_receive_count


class WebhooksConstruct(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: LlmqConfig,
        defaults: FunctionDefaults,
        jobs_table: dynamodb.ITable,
        tenants_table: dynamodb.ITable,
    ) -> None:
        super().__init__(scope, construct_id)
        self.queue, self.dlq = build_queue_pair(
            self,
            "Queue",
            visibility_timeout_seconds=config.webhook_visibility_timeout_seconds,
            dlq_visibility_timeout_seconds=config.webhook_visibility_timeout_seconds,
            max_receive_count=webhook_max_receive_count(config),
            retention_seconds=config.retention_seconds,
        )
        self.dispatcher = build_function(
            self,
            "Dispatcher",
            name="webhook_dispatcher",
            description="llmq: POSTs signed Standard Webhooks events to integrators",
            sizing=config.dispatcher,
            defaults=defaults,
            # LLMQ_PUBLIC_API_URL is added by the stack once the API exists (see LlmqStack).
            environment=function_environment(
                DispatcherEnvironment,
                jobs_table=jobs_table.table_name,
                tenants_table=tenants_table.table_name,
                webhook_queue_url=self.queue.queue_url,
            ),
        )
        jobs_table.grant(self.dispatcher, "dynamodb:GetItem", "dynamodb:UpdateItem")
        tenants_table.grant(self.dispatcher, "dynamodb:GetItem")
        # The event source grants receive, delete and ChangeMessageVisibility (the retry schedule).
        # Bounded, so a backlog after a receiver outage cannot throttle the API and the worker.
        self.dispatcher.add_event_source(
            event_sources.SqsEventSource(
                self.queue,
                batch_size=10,
                max_concurrency=config.webhooks.max_concurrency,
                report_batch_item_failures=True,
            )
        )

    def link_public_api(self, url: str) -> None:
        """Result links in webhook bodies point at the API, which is built after this construct."""
        self.dispatcher.add_environment(PUBLIC_API_URL_VAR, url)
