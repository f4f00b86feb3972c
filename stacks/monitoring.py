"""Alarms on every DLQ, each lane's backlog age and every function's errors; one dashboard."""

from __future__ import annotations

from collections.abc import Mapping

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq.config import LlmqConfig
from llmq.telemetry import (
    JOB_OUTCOME_METRICS,
    METRICS_NAMESPACE,
    SERVICE_NAME,
    WEBHOOK_OUTCOME_METRICS,
    MetricName,
)
from stacks.lanes import LanesConstruct, pascal

ONE_MINUTE = cdk.Duration.minutes(1)
FIVE_MINUTES = cdk.Duration.minutes(5)


def oldest_message_alarm_seconds(config: LlmqConfig) -> int:
    """A lane message older than this waited longer than any run or retry backoff explains."""
    return max(config.lane_visibility_timeout_seconds, 2 * int(config.retry.max_seconds))


def llmq_metric(name: MetricName, statistic: str, lane: str | None = None) -> cloudwatch.Metric:
    # Powertools adds the `service` dimension to every metric; job metrics add `lane`.
    dimensions = {"service": SERVICE_NAME} | ({"lane": lane} if lane is not None else {})
    return cloudwatch.Metric(
        namespace=METRICS_NAMESPACE,
        metric_name=name.value,
        dimensions_map=dimensions,
        statistic=statistic,
        period=FIVE_MINUTES,
        label=f"{name} {lane}" if lane else name,
    )


class MonitoringConstruct(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: LlmqConfig,
        lanes: LanesConstruct,
        webhook_queue: sqs.IQueue,
        webhook_dlq: sqs.IQueue,
        functions: Mapping[str, lambda_.IFunction],
        alarm_email: str | None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.topic = sns.Topic(self, "AlarmTopic", display_name="llmq alarms", enforce_ssl=True)
        if alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(alarm_email))
        self._action = cw_actions.SnsAction(self.topic)
        self.alarms: list[cloudwatch.Alarm] = []

        for name, lane in lanes.lanes.items():
            self._alarm_on_dlq(f"Lane{pascal(name)}Dlq", lane.dlq, f"lane {name}")
            self._alarm(
                f"Lane{pascal(name)}OldestMessage",
                lane.queue.metric_approximate_age_of_oldest_message(period=FIVE_MINUTES, statistic="Maximum"),
                threshold=oldest_message_alarm_seconds(config),
                description=f"llmq: lane {name} has a message waiting longer than expected (backlog)",
            )
        self._alarm_on_dlq("WebhooksDlq", webhook_dlq, "webhooks")
        for name, function in functions.items():
            self._alarm(
                f"{pascal(name)}Errors",
                function.metric_errors(period=FIVE_MINUTES, statistic="Sum"),
                threshold=0,
                description=f"llmq: the {name} function raised errors",
            )
        self.dashboard = self._build_dashboard(lanes, webhook_queue, functions)

    def _alarm_on_dlq(self, construct_id: str, dlq: sqs.IQueue, what: str) -> None:
        self._alarm(
            construct_id,
            dlq.metric_approximate_number_of_messages_visible(period=ONE_MINUTE, statistic="Maximum"),
            threshold=0,
            description=f"llmq: the {what} DLQ holds messages (a crash or a poison message)",
        )

    def _alarm(
        self, construct_id: str, metric: cloudwatch.IMetric, threshold: float, description: str
    ) -> None:
        alarm = cloudwatch.Alarm(
            self,
            construct_id,
            metric=metric,
            threshold=threshold,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=description,
        )
        alarm.add_alarm_action(self._action)
        self.alarms.append(alarm)

    def _build_dashboard(
        self, lanes: LanesConstruct, webhook_queue: sqs.IQueue, functions: Mapping[str, lambda_.IFunction]
    ) -> cloudwatch.Dashboard:
        names = list(lanes.lanes)
        depth: list[cloudwatch.IMetric] = []
        for name, lane in lanes.lanes.items():
            depth.append(lane.queue.metric_approximate_number_of_messages_visible(label=f"{name} waiting"))
            depth.append(
                lane.queue.metric_approximate_number_of_messages_not_visible(label=f"{name} in flight")
            )
            depth.append(lane.dlq.metric_approximate_number_of_messages_visible(label=f"{name} DLQ"))
        widgets: list[cloudwatch.IWidget] = [
            cloudwatch.GraphWidget(title="Lane depth", left=depth, width=12),
            cloudwatch.GraphWidget(
                title="Queue wait (ms, p50 / p90)",
                left=[
                    llmq_metric(MetricName.QUEUE_WAIT_MS, stat, lane)
                    for lane in names
                    for stat in ("p50", "p90")
                ],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Run time (ms, p50 / p90)",
                left=[
                    llmq_metric(MetricName.RUN_TIME_MS, stat, lane)
                    for lane in names
                    for stat in ("p50", "p90")
                ],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Job outcomes",
                left=[
                    llmq_metric(outcome, "Sum", lane)
                    for lane in names
                    for outcome in JOB_OUTCOME_METRICS.values()
                ],
                stacked=True,
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Webhook outcomes",
                left=[llmq_metric(outcome, "Sum") for outcome in WEBHOOK_OUTCOME_METRICS],
                right=[webhook_queue.metric_approximate_number_of_messages_visible(label="webhooks waiting")],
                width=12,
            ),
            # Errors rather than an alarm-status widget: the dashboard then refers to no alarm,
            # which keeps it deployable where alarms are not modelled (the moto sandbox).
            cloudwatch.GraphWidget(
                title="Function errors",
                left=[
                    function.metric_errors(period=FIVE_MINUTES, statistic="Sum", label=name)
                    for name, function in functions.items()
                ],
                width=12,
            ),
        ]
        dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=f"{cdk.Stack.of(self).stack_name}-llmq",
            default_interval=cdk.Duration.hours(3),
        )
        for row_start in range(0, len(widgets), 2):
            dashboard.add_widgets(*widgets[row_start : row_start + 2])
        return dashboard
