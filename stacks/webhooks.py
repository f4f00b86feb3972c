"""The webhooks queue, its DLQ and the dispatcher that POSTs signed events to integrators."""

from __future__ import annotations

from aws_cdk import aws_dynamodb as dynamodb
from constructs import Construct

from llmq.config import DispatcherEnvironment, LlmqConfig
from stacks.functions import FunctionDefaults, build_function, env_var, function_environment
from stacks.jobs_table import grant_item_actions
from stacks.lanes import build_queue_pair, consume

PUBLIC_API_URL_VAR = env_var(DispatcherEnvironment, "public_api_url")
# llmq.tenants keys a tenant's item (name, tier, webhook secrets) `tenant#<id>`: the
# dispatcher reads those, never the API-key items.
TENANT_ITEM_PREFIX = "tenant#"


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
        grant_item_actions(jobs_table, self.dispatcher, "dynamodb:GetItem", "dynamodb:UpdateItem")
        grant_item_actions(
            tenants_table, self.dispatcher, "dynamodb:GetItem", leading_key_prefix=TENANT_ITEM_PREFIX
        )
        # Bounded, so a backlog after a receiver outage cannot throttle the API and the worker.
        consume(
            self.dispatcher,
            self.queue,
            batch_size=10,
            max_concurrency=config.webhooks.max_concurrency,
            # The retry schedule: a failed delivery's message comes back when its next attempt is due.
            also=("sqs:ChangeMessageVisibility",),
        )

    def link_public_api(self, url: str) -> None:
        """Result links in webhook bodies point at the API, which is built after this construct."""
        self.dispatcher.add_environment(PUBLIC_API_URL_VAR, url)
