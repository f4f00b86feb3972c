"""Every alarm llmq raises, each on the alarm topic, and one dashboard.

docs/operations.md says, per alarm, what it means and what to do; keep the two together.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq.config import LlmqConfig
from llmq.telemetry import (
    JOB_OUTCOMES,
    LIMIT_METRICS,
    METRICS_NAMESPACE,
    WEBHOOK_OUTCOME_METRICS,
    MetricName,
    stack_service_name,
)
from stacks.lanes import LanesConstruct, pascal

ONE_MINUTE = cdk.Duration.minutes(1)
FIVE_MINUTES = cdk.Duration.minutes(5)
FIFTEEN_MINUTES = cdk.Duration.minutes(15)
ONE_HOUR = cdk.Duration.hours(1)

# Failures a healthy deployment still has (a prompt over the model's context, a receiver that
# is gone): the failing alarms fire on a share of outcomes, failed / (succeeded + failed) in
# their period, above the rate AND with at least the count of failures, so one failed job of one
# at night does not page while six of six do. Metric math over the two counts
# (https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/using-metric-math.html);
# FILL(series, 0) stands for a count that had no data point (nothing of that outcome happened).
JOB_FAILURE_ALARM_PERCENT = 10  # per lane, in 15 minutes
JOB_FAILURE_ALARM_MIN_COUNT = 5
WEBHOOK_FAILURE_ALARM_PERCENT = 10  # in one hour
WEBHOOK_FAILURE_ALARM_MIN_COUNT = 5
# Webhook attempts that failed in 15 minutes while none was delivered: every receiver failing at
# once is the dispatcher's fault (a signature nobody verifies, a CA bundle, its DNS), which the
# share of given-up deliveries shows only after the whole retry schedule (about a day).
# (a terminal event makes three failed attempts in 15 minutes on the default schedule: 30 is
# about ten events of one integrator whose endpoint is down, alone at a quiet hour)
WEBHOOK_NONE_DELIVERED_MIN_ATTEMPTS = 30
WEBHOOK_NONE_DELIVERED_EXPRESSION = f"IF(FILL(delivered, 0) == 0 AND FILL(retried, 0) + FILL(failed, 0) >= {WEBHOOK_NONE_DELIVERED_MIN_ATTEMPTS}, 1, 0)"
# The DynamoDB operations llmq calls (tests/aws_calls.json): ThrottledRequests is reported per
# operation, with the TableName and Operation dimensions.
# https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/metrics-dimensions.html
# (Accept, claim and complete are transactions: their throttles are TransactWriteItems'.)
JOBS_TABLE_OPERATIONS = ("GetItem", "BatchGetItem", "UpdateItem", "Query", "TransactWriteItems")
TENANTS_TABLE_OPERATIONS = ("GetItem",)
# "Period multiplied by EvaluationPeriods can't be more than 604,800 seconds" (PutMetricAlarm,
# https://docs.aws.amazon.com/AmazonCloudWatch/latest/APIReference/API_PutMetricAlarm.html).
MAX_ALARM_WINDOW_MINUTES = 7 * 24 * 60


def _throttled_requests(
    table: dynamodb.ITable, operations: tuple[str, ...], label: str
) -> cloudwatch.MathExpression:
    """The table's throttled requests of every operation, summed. Each term is FILLed: an
    operation with no data point in a period (none throttled, or none called) would otherwise
    leave the sum with no value there, and the alarm could never fire."""
    terms = {
        f"t{index}": table.metric(
            "ThrottledRequests",
            dimensions_map={"TableName": table.table_name, "Operation": operation},
            period=FIVE_MINUTES,
            statistic="Sum",
        )
        for index, operation in enumerate(operations)
    }
    return cloudwatch.MathExpression(
        expression=" + ".join(f"FILL({name}, 0)" for name in terms),
        using_metrics=terms,
        period=FIVE_MINUTES,
        label=label,
    )


def oldest_message_alarm_seconds(config: LlmqConfig) -> int:
    """A lane message older than this waited longer than any run or retry backoff explains."""
    return max(config.lane_visibility_timeout_seconds, 2 * int(config.retry.max_seconds))


def webhook_oldest_message_alarm_seconds(config: LlmqConfig) -> int:
    """A webhook message older than this is not being delivered, whatever its receiver does.

    SQS leaves a message received three times or more out of ApproximateAgeOfOldestMessage
    (https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-available-cloudwatch-metrics.html),
    so a delivery retrying on the long schedule counts only until its third attempt: the first
    two delays, with their jitter, and a crashed attempt's visibility timeout. (A receiver's
    Retry-After can hide a message longer before its third receive: the alarm counts the age
    only while messages wait visible or records fail, `WEBHOOK_STALL_EXPRESSION`.)
    """
    first_two = sum(config.webhooks.schedule_seconds[:2]) * (1 + config.webhooks.jitter_fraction)
    return int(first_two) + config.webhook_visibility_timeout_seconds


# The oldest webhook message's age, counted only while messages wait visible the whole period
# or records fail. The age counts hidden messages too: one a receiver's Retry-After (up to
# about 12 hours) hides after its first or second receive ages past the threshold with nothing
# wrong. A stalled dispatcher leaves the queue's messages visible, unread (its mapping
# disabled: ApproximateNumberOfMessagesVisible, "Available CloudWatch metrics for Amazon SQS",
# the messages available for retrieval); one that runs but fails every record (a bug, a grant
# missing) keeps them in flight, and counts each failure (RecordFailed), which no Lambda error
# shows: the batch's invocation succeeds with every record reported failed.
WEBHOOK_STALL_EXPRESSION = "IF(FILL(visible, 0) > 0 OR FILL(failed, 0) > 0, age, 0)"


def reconciler_window_minutes(config: LlmqConfig) -> int:
    """Long enough that a running reconciler is invoked at least once in it, with a tick to spare."""
    return min(2 * config.reconciler.schedule_minutes, MAX_ALARM_WINDOW_MINUTES)


def failure_rate_expression(min_count: int) -> str:
    """The percentage of `failed` among `succeeded` + `failed`, or 0 while fewer than
    `min_count` failed (IF and FILL: the metric-math function table in the page above)."""
    failed = "FILL(failed, 0)"
    return f"IF({failed} >= {min_count}, 100 * {failed} / (FILL(succeeded, 0) + {failed}), 0)"


def llmq_metric(
    name: MetricName,
    statistic: str,
    lane: str | None = None,
    period: cdk.Duration = FIVE_MINUTES,
    labelled: bool = True,
    *,
    service: str,
    queue: str | None = None,
) -> cloudwatch.Metric:
    """One llmq metric of the stack whose `service` it is (`stack_service_name`). Alarms take it
    unlabelled: CDK writes a labelled metric as a metric-math query, where the alarm's console
    view and the template lose the plain MetricName."""
    # Powertools adds the `service` dimension to every metric; job metrics add `lane`.
    dimensions = (
        {"service": service}
        | ({"lane": lane} if lane is not None else {})
        | ({"queue": queue} if queue is not None else {})
    )
    return cloudwatch.Metric(
        namespace=METRICS_NAMESPACE,
        metric_name=name.value,
        dimensions_map=dimensions,
        statistic=statistic,
        period=period,
        label=(f"{name} {lane}" if lane else name) if labelled else None,
    )


def api_server_errors(api_name: str, stage_name: str, labelled: bool = True) -> cloudwatch.Metric:
    """API Gateway's 5XXError of the stage, by name: a reference to the Stage resource would
    not deploy into the moto sandbox, which does not model it.
    https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-metrics-and-dimensions.html
    """
    return cloudwatch.Metric(
        namespace="AWS/ApiGateway",
        metric_name="5XXError",
        dimensions_map={"ApiName": api_name, "Stage": stage_name},
        statistic="Sum",
        period=FIVE_MINUTES,
        label="API 5XX" if labelled else None,
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
        alarm_emails: tuple[str, ...] = (),
        api_name: str | None = None,
        stage_name: str | None = None,
        tables: Mapping[str, dynamodb.ITable] | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        # (this stack's metrics only: another llmq stack in the account emits the same names)
        self._metric = functools.partial(
            llmq_metric, service=stack_service_name(cdk.Stack.of(self).stack_name)
        )
        self.topic = sns.Topic(self, "AlarmTopic", display_name="llmq alarms", enforce_ssl=True)
        # The topic's policy (enforce_ssl writes one) replaces SNS's default policy, and an alarm
        # publishes as CloudWatch: without this grant every alarm action fails "not authorized
        # to perform SNS:Publish" and nobody hears of anything.
        stack = cdk.Stack.of(self)
        self.topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowThisAccountsAlarmsToPublish",
                actions=["sns:Publish"],
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                resources=[self.topic.topic_arn],
                conditions={
                    "StringEquals": {"aws:SourceAccount": stack.account},
                    "ArnLike": {
                        "aws:SourceArn": f"arn:{stack.partition}:cloudwatch:{stack.region}:{stack.account}:alarm:*"
                    },
                },
            )
        )
        for address in alarm_emails:
            self.topic.add_subscription(subscriptions.EmailSubscription(address))
        self._action = cw_actions.SnsAction(self.topic)
        self.alarms: list[cloudwatch.Alarm] = []

        self._alarm_on_lanes(config, lanes)
        self._alarm_on_webhooks(config, webhook_queue, webhook_dlq)
        self._alarm_on_functions(config, functions)
        self._alarm_on_api(api_name, stage_name)
        self._alarm_on_provider()
        for name, table in (tables or {}).items():
            operations = JOBS_TABLE_OPERATIONS if name == "jobs" else TENANTS_TABLE_OPERATIONS
            self._alarm(
                f"{pascal(name)}TableThrottles",
                _throttled_requests(table, operations, label=f"{name} throttled"),
                threshold=0,
                description=f"llmq: DynamoDB throttled requests to the {name} table",
            )
        self.dashboard = self._build_dashboard(lanes, webhook_queue, functions, api_name, stage_name)

    def _alarm_on_lanes(self, config: LlmqConfig, lanes: LanesConstruct) -> None:
        # Visible until an operator looks (nothing consumes it): the alarm stays raised, and
        # notifies once, while any poison waits.
        self._alarm(
            "PoisonMessages",
            lanes.poison.metric_approximate_number_of_messages_visible(
                period=FIVE_MINUTES, statistic="Maximum"
            ),
            threshold=0,
            description="llmq: a lane dead letter no function can settle was set aside in the poison queue",
        )
        for name, lane in lanes.lanes.items():
            lane_id = f"Lane{pascal(name)}"
            self._alarm_on_dlq(f"{lane_id}Dlq", lane.dlq, f"lane {name}")
            # The dead-letter function drains the DLQ within seconds, so its depth rarely shows
            # a message: its receives do. (NumberOfMessagesSent would not: a message that SQS
            # moves to a DLQ is not "sent" to it.)
            self._alarm(
                f"{lane_id}DlqReceived",
                lane.dlq.metric_number_of_messages_received(period=FIVE_MINUTES, statistic="Sum"),
                threshold=0,
                description=f"llmq: a lane {name} message exhausted its receives and reached the DLQ",
            )
            self._alarm(
                f"{lane_id}DeadLettered",
                self._metric(MetricName.JOB_DEAD_LETTERED, "Sum", name, labelled=False),
                threshold=0,
                description=f"llmq: the dead-letter function failed lane {name} jobs as worker_crashed",
            )
            self._alarm(
                f"{lane_id}OldestMessage",
                lane.queue.metric_approximate_age_of_oldest_message(period=FIVE_MINUTES, statistic="Maximum"),
                threshold=oldest_message_alarm_seconds(config),
                description=f"llmq: lane {name} has a message waiting longer than expected (backlog)",
            )
            self._alarm(
                f"{lane_id}JobsFailing",
                cloudwatch.MathExpression(
                    expression=failure_rate_expression(JOB_FAILURE_ALARM_MIN_COUNT),
                    using_metrics={
                        "failed": self._metric(MetricName.JOB_FAILED, "Sum", name, labelled=False),
                        "succeeded": self._metric(MetricName.JOB_SUCCEEDED, "Sum", name, labelled=False),
                    },
                    period=FIFTEEN_MINUTES,
                    label=f"% of lane {name} jobs failed",
                ),
                threshold=JOB_FAILURE_ALARM_PERCENT,
                description=(
                    f"llmq: more than {JOB_FAILURE_ALARM_PERCENT}% of lane {name} jobs failed in 15 minutes "
                    f"(and at least {JOB_FAILURE_ALARM_MIN_COUNT})"
                ),
            )
            # A worker that fails every record (a grant missing, a bug) succeeds as an
            # invocation: no Lambda error shows it, and each message comes back only after the
            # lane's visibility timeout (six times the worker's), so its age pages half an hour
            # late at best.
            self._alarm(
                f"{lane_id}RecordsFailing",
                self._records_failed(lane.queue, f"lane {name}"),
                threshold=0,
                description=f"llmq: lane {name} records failed unexpectedly in the worker (a grant, a bug)",
            )
            # The api stored the job but could not send its message: the client has its 202,
            # the job waits for the reconciler, and no error metric shows it.
            self._alarm(
                f"{lane_id}EnqueueFailed",
                self._metric(MetricName.JOB_ENQUEUE_FAILED, "Sum", name, labelled=False),
                threshold=0,
                description=f"llmq: the api could not enqueue lane {name} jobs; the reconciler will",
            )

    def _alarm_on_webhooks(self, config: LlmqConfig, queue: sqs.IQueue, dlq: sqs.IQueue) -> None:
        # Nothing consumes the webhooks DLQ, so its depth is the alarm.
        self._alarm_on_dlq("WebhooksDlq", dlq, "webhooks")
        self._alarm(
            "WebhooksOldestMessage",
            cloudwatch.MathExpression(
                expression=WEBHOOK_STALL_EXPRESSION,
                using_metrics={
                    "age": queue.metric_approximate_age_of_oldest_message(
                        period=FIVE_MINUTES, statistic="Maximum"
                    ),
                    "visible": queue.metric_approximate_number_of_messages_visible(
                        period=FIVE_MINUTES, statistic="Minimum"
                    ),
                    "failed": self._metric(
                        MetricName.RECORD_FAILED, "Sum", labelled=False, queue=queue.queue_name
                    ),
                },
                period=FIVE_MINUTES,
                label="age of the oldest webhook message, while messages wait unread or fail",
            ),
            threshold=webhook_oldest_message_alarm_seconds(config),
            description="llmq: a webhook waits longer than its first retries explain (dispatcher stalled)",
        )
        self._alarm(
            "WebhooksNoneDelivered",
            cloudwatch.MathExpression(
                expression=WEBHOOK_NONE_DELIVERED_EXPRESSION,
                using_metrics={
                    "delivered": self._metric(
                        MetricName.WEBHOOK_DELIVERED, "Sum", labelled=False, period=FIFTEEN_MINUTES
                    ),
                    "retried": self._metric(
                        MetricName.WEBHOOK_RETRIED, "Sum", labelled=False, period=FIFTEEN_MINUTES
                    ),
                    "failed": self._metric(
                        MetricName.WEBHOOK_FAILED, "Sum", labelled=False, period=FIFTEEN_MINUTES
                    ),
                },
                period=FIFTEEN_MINUTES,
                label="no webhook delivered while attempts failed",
            ),
            threshold=0,
            description=(
                f"llmq: no webhook was delivered in 15 minutes while at least "
                f"{WEBHOOK_NONE_DELIVERED_MIN_ATTEMPTS} attempts failed (every receiver failing: the dispatcher)"
            ),
        )
        self._alarm(
            "WebhooksFailing",
            cloudwatch.MathExpression(
                expression=failure_rate_expression(WEBHOOK_FAILURE_ALARM_MIN_COUNT),
                using_metrics={
                    "failed": self._metric(MetricName.WEBHOOK_FAILED, "Sum", labelled=False),
                    "succeeded": self._metric(MetricName.WEBHOOK_DELIVERED, "Sum", labelled=False),
                },
                period=ONE_HOUR,
                label="% of webhooks given up",
            ),
            threshold=WEBHOOK_FAILURE_ALARM_PERCENT,
            description=(
                f"llmq: more than {WEBHOOK_FAILURE_ALARM_PERCENT}% of webhooks given up in an hour "
                f"(and at least {WEBHOOK_FAILURE_ALARM_MIN_COUNT})"
            ),
        )

    def _alarm_on_functions(self, config: LlmqConfig, functions: Mapping[str, lambda_.IFunction]) -> None:
        for name, function in functions.items():
            errors: cloudwatch.IMetric = function.metric_errors(period=FIVE_MINUTES, statistic="Sum")
            if name == "authorizer":
                # A refused key is an error to Lambda (the authorizer raises "Unauthorized" for
                # API Gateway's 401): one wrong key would page. Its own count of the other
                # failures is the alarm (subtracting the refusals from Errors would page on a
                # refusal whose two data points fall in different periods); a timeout or a crash
                # is an API Gateway 5XX (Api5xx).
                errors = self._metric(MetricName.AUTHORIZER_FAILED, "Sum", labelled=False)
            self._alarm(
                f"{pascal(name)}Errors",
                errors,
                threshold=0,
                description=f"llmq: the {name} function raised errors",
            )
            self._alarm(
                f"{pascal(name)}Throttles",
                function.metric_throttles(period=FIVE_MINUTES, statistic="Sum"),
                threshold=0,
                description=f"llmq: Lambda throttled the {name} function (reserved concurrency or account quota)",
            )
        reconciler = functions.get("reconciler")
        if reconciler is not None:
            # What a run could not settle it logs and skips, going on with the rest: no Lambda
            # error shows it (`llmq.reconcile`).
            self._alarm(
                "ReconcilerEntryFailed",
                self._metric(MetricName.RECONCILE_ENTRY_FAILED, "Sum", labelled=False),
                threshold=0,
                description="llmq: the reconciler could not settle a swept job or the lanes' depths",
            )
            # A run with more to settle than its time stops and leaves the rest to the next:
            # a burst. Runs doing so three periods running (each holds a run at least) are a
            # backlog the reconciler does not keep up with (lapsed leases' slots come back
            # late: DESIGN §3.11).
            period_minutes = max(5, config.reconciler.schedule_minutes)
            self._alarm(
                "ReconcilerFallingBehind",
                self._metric(
                    MetricName.RECONCILE_LEFT,
                    "Sum",
                    labelled=False,
                    period=cdk.Duration.minutes(period_minutes),
                ),
                threshold=0,
                description="llmq: the reconciler's runs left swept entries for the next, three periods running",
                # (within CloudWatch's 7-day window, for a schedule of days)
                evaluation_periods=max(1, min(3, MAX_ALARM_WINDOW_MINUTES // period_minutes)),
            )
            window = reconciler_window_minutes(config)
            # No invocation at all reports no data point: missing data is the alarm here. It
            # fires once right after the first deploy, and no setting avoids that: a new alarm
            # whose metric was never reported has no real data point, so CloudWatch fills the
            # whole evaluation range with the missing-data treatment, and with `breaching` every
            # filled point breaches, whatever the evaluation periods or datapoints to alarm
            # ("How alarm state is evaluated when data is missing", and the note on data missing
            # soon after an alarm is created, which only helps a metric reported before it:
            # https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/AlarmThatSendsEmail.html).
            # `notBreaching` or `missing` would never fire on a stopped schedule. It clears at the
            # first evaluation after the first tick: docs/operations.md says so.
            self._alarm(
                "ReconcilerNotRunning",
                reconciler.metric_invocations(period=cdk.Duration.minutes(window), statistic="Sum"),
                threshold=1,
                comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                missing=cloudwatch.TreatMissingData.BREACHING,
                description=f"llmq: the reconciler did not run in {window} minutes (its schedule stopped)",
            )

    def _alarm_on_provider(self) -> None:
        # Its jobs are retried minutes apart (`retry.account_error_seconds`) and fail only once
        # their attempts have run out: the first refusal is the page, while there is time.
        self._alarm(
            "ProviderAccountRefused",
            self._metric(MetricName.PROVIDER_ACCOUNT_REFUSED, "Sum", labelled=False),
            threshold=0,
            description=(
                "llmq: the provider refused llmq's own key or account (401, 403, 402, out of credit), "
                "or answered 404 for its endpoint (provider.base_url)"
            ),
        )

    def _alarm_on_api(self, api_name: str | None, stage_name: str | None) -> None:
        # The api answers its own 500s rather than raising: its Errors alarm never sees them.
        self._alarm(
            "ApiUnexpectedErrors",
            self._metric(MetricName.API_UNEXPECTED_ERROR, "Sum", labelled=False),
            threshold=0,
            description="llmq: the api answered 500 (an AWS call failed unexpectedly, or a bug)",
        )
        if api_name is None or stage_name is None:
            return
        # (less the 503s a tenant's own webhook host causes, its name servers failing: one
        # tenant retrying paged every period, hunt 294; a resolver of the region's failing
        # fails the api's AWS calls too, which still count)
        self._alarm(
            "Api5xx",
            cloudwatch.MathExpression(
                expression="FILL(errors, 0) - FILL(hosts, 0)",
                using_metrics={
                    "errors": api_server_errors(api_name, stage_name, labelled=False),
                    "hosts": self._metric(MetricName.WEBHOOK_HOST_UNAVAILABLE, "Sum", labelled=False),
                },
                period=FIVE_MINUTES,
                label="API 5XX less webhook hosts unavailable",
            ),
            threshold=0,
            description="llmq: API Gateway answered 5XX (502 function crash, 504 timeout, 503 busy, 500)",
        )

    def _alarm_on_dlq(self, construct_id: str, dlq: sqs.IQueue, what: str) -> None:
        self._alarm(
            construct_id,
            dlq.metric_approximate_number_of_messages_visible(period=ONE_MINUTE, statistic="Maximum"),
            threshold=0,
            description=f"llmq: the {what} DLQ holds messages (a crash or a poison message)",
        )

    def _alarm(
        self,
        construct_id: str,
        metric: cloudwatch.IMetric,
        threshold: float,
        description: str,
        comparison: cloudwatch.ComparisonOperator = cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
        evaluation_periods: int = 1,
    ) -> None:
        alarm = cloudwatch.Alarm(
            self,
            construct_id,
            metric=metric,
            threshold=threshold,
            comparison_operator=comparison,
            evaluation_periods=evaluation_periods,
            treat_missing_data=missing,
            alarm_description=description,
        )
        alarm.add_alarm_action(self._action)
        self.alarms.append(alarm)

    def _records_failed(self, queue: sqs.IQueue, label: str) -> cloudwatch.IMetric:
        """RecordFailed of the records `queue` fed a function (`llmq.telemetry.log_record_failure`)."""
        return self._metric(MetricName.RECORD_FAILED, "Sum", labelled=False, queue=queue.queue_name).with_(
            label=f"{MetricName.RECORD_FAILED} {label}"
        )

    def _build_dashboard(
        self,
        lanes: LanesConstruct,
        webhook_queue: sqs.IQueue,
        functions: Mapping[str, lambda_.IFunction],
        api_name: str | None,
        stage_name: str | None,
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
                    self._metric(MetricName.QUEUE_WAIT_MS, stat, lane)
                    for lane in names
                    for stat in ("p50", "p90")
                ],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Run time (ms, p50 / p90)",
                left=[
                    self._metric(MetricName.RUN_TIME_MS, stat, lane)
                    for lane in names
                    for stat in ("p50", "p90")
                ],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Job outcomes",
                left=[self._metric(outcome, "Sum", lane) for lane in names for outcome in JOB_OUTCOMES],
                stacked=True,
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Webhook outcomes",
                left=[self._metric(outcome, "Sum") for outcome in WEBHOOK_OUTCOME_METRICS],
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
            cloudwatch.GraphWidget(
                title="Handled faults (api 500s, jobs failed by the dead-letter function, enqueues left to the "
                "reconciler, what the reconciler could not settle or left for its next run, authorizer "
                "failures, queue records failed unexpectedly, the provider refusing llmq's account)",
                left=[
                    self._metric(MetricName.API_UNEXPECTED_ERROR, "Sum"),
                    self._metric(MetricName.RECONCILE_ENTRY_FAILED, "Sum"),
                    self._metric(MetricName.RECONCILE_LEFT, "Sum"),
                    self._metric(MetricName.AUTHORIZER_FAILED, "Sum"),
                    self._metric(MetricName.PROVIDER_ACCOUNT_REFUSED, "Sum"),
                ]
                + [self._metric(MetricName.JOB_DEAD_LETTERED, "Sum", lane) for lane in names]
                + [self._metric(MetricName.JOB_ENQUEUE_FAILED, "Sum", lane) for lane in names]
                + [
                    self._records_failed(queue, label)
                    for label, queue in [
                        ("webhooks", webhook_queue),
                        *((name, lane.queue) for name, lane in lanes.lanes.items()),
                    ]
                ],
                right=(
                    [api_server_errors(api_name, stage_name)] if api_name is not None and stage_name else []
                ),
                width=12,
            ),
            cloudwatch.GraphWidget(
                title=(
                    "Lambda throttles; refusals: long-polls (a tenant at its max_long_polls), API keys "
                    "(401), webhook hosts a tenant's name servers fail (503)"
                ),
                left=[
                    function.metric_throttles(period=FIVE_MINUTES, statistic="Sum", label=name)
                    for name, function in functions.items()
                ],
                right=[self._metric(name, "Sum") for name in LIMIT_METRICS],
                width=12,
            ),
        ]
        dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            # (dashboard names are global to the account, not per region)
            dashboard_name=f"{cdk.Stack.of(self).stack_name}-{cdk.Stack.of(self).region}-llmq",
            default_interval=cdk.Duration.hours(3),
        )
        for row_start in range(0, len(widgets), 2):
            dashboard.add_widgets(*widgets[row_start : row_start + 2])
        return dashboard
