"""The alarms of the default stack: each one watches the right metric and reaches the topic.

An alarm that names a metric nobody publishes, or a dimension the metric is not published
with, stays at OK forever; one without an action is heard by nobody. So each test checks the
namespace, the metric, its dimensions and the action, not that some alarm exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from llmq.config import MAX_RECONCILER_SCHEDULE_MINUTES, LlmqConfig
from llmq.telemetry import METRICS_NAMESPACE, MetricName
from stacks.monitoring import (
    JOB_FAILURE_ALARM_MIN_COUNT,
    JOB_FAILURE_ALARM_PERCENT,
    WEBHOOK_FAILURE_ALARM_MIN_COUNT,
    WEBHOOK_FAILURE_ALARM_PERCENT,
    WEBHOOK_NONE_DELIVERED_EXPRESSION,
    WEBHOOK_STALL_EXPRESSION,
    failure_rate_expression,
    webhook_oldest_message_alarm_seconds,
)
from tests.aws_calls import CATALOGUE_PATH
from tests.infra.synthesis import SynthesizedApp, synthesize

FUNCTIONS = ("api", "authorizer", "worker", "dead_letter", "webhook_dispatcher", "reconciler")


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(LlmqConfig(), outdir=tmp_path_factory.mktemp("cdk-alarms"))


@pytest.fixture(scope="module")
def alarms(synthesized: SynthesizedApp) -> list[dict[str, Any]]:
    return [
        _flattened(alarm["Properties"])
        for alarm in synthesized.template.of_type("AWS::CloudWatch::Alarm").values()
    ]


def _flattened(alarm: dict[str, Any]) -> dict[str, Any]:
    """A one-metric alarm in CloudFormation's plain form, however CDK wrote it (a metric with a
    label comes out as a one-entry `Metrics` list)."""
    queries = alarm.get("Metrics", [])
    if len(queries) != 1 or "MetricStat" not in queries[0]:
        return alarm
    stat = queries[0]["MetricStat"]
    flat = {key: value for key, value in alarm.items() if key != "Metrics"}
    return flat | {
        "Namespace": stat["Metric"]["Namespace"],
        "MetricName": stat["Metric"]["MetricName"],
        "Dimensions": stat["Metric"].get("Dimensions", []),
        "Statistic": stat["Stat"],
        "Period": stat["Period"],
    }


@pytest.fixture(scope="module")
def topic(synthesized: SynthesizedApp) -> dict[str, str]:
    (topic_id,) = synthesized.template.of_type("AWS::SNS::Topic")
    return {"Ref": topic_id}


def _dimensions(alarm: dict[str, Any]) -> dict[str, Any]:
    return {dimension["Name"]: dimension["Value"] for dimension in alarm.get("Dimensions", [])}


def _find(
    alarms: list[dict[str, Any]], namespace: str, metric: str, **dimensions: Any
) -> list[dict[str, Any]]:
    """The single-metric alarms on `namespace`/`metric` with exactly these dimensions."""
    return [
        alarm
        for alarm in alarms
        if alarm.get("Namespace") == namespace
        and alarm.get("MetricName") == metric
        and _dimensions(alarm) == dimensions
    ]


def _one(alarms: list[dict[str, Any]], namespace: str, metric: str, **dimensions: Any) -> dict[str, Any]:
    found = _find(alarms, namespace, metric, **dimensions)
    assert len(found) == 1, f"{namespace}/{metric} {dimensions}: {len(found)} alarms"
    return found[0]


def _fires_on_any(alarm: dict[str, Any]) -> None:
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)


def _ref(synthesized: SynthesizedApp, output: str) -> str:
    logical_id, _ = synthesized.template.output_resource(output)
    return logical_id


def test_every_alarm_notifies_the_alarm_topic(alarms, topic):
    # An alarm without an action changes colour on a console nobody watches.
    assert len(alarms) > 20
    for alarm in alarms:
        assert alarm["AlarmActions"] == [topic], alarm["AlarmDescription"]
        assert alarm["AlarmDescription"].startswith("llmq: ")


def test_an_api_500_the_function_answers_itself_raises_an_alarm(synthesized, alarms):
    # The api turns an unexpected exception into a 500 without raising: the metric it emits
    # (functions/api/handler.py) is the only thing that can see it.
    alarm = _one(
        alarms, METRICS_NAMESPACE, MetricName.API_UNEXPECTED_ERROR.value, service=synthesized.service
    )
    assert alarm["Statistic"] == "Sum"
    _fires_on_any(alarm)


def test_api_gateway_5xx_answers_raise_an_alarm_on_the_deployed_stage_less_tenants_webhook_hosts(
    synthesized, alarms
):
    (rest_api,) = synthesized.template.of_type("AWS::ApiGateway::RestApi").values()
    (stage,) = synthesized.template.of_type("AWS::ApiGateway::Stage").values()
    # API Gateway publishes 5XXError per ApiName and Stage, by name; the alarm takes out the
    # 503s a tenant's webhook host's failing name servers cause (hunt 294: one tenant
    # retrying paged every period)
    found = [
        alarm
        for alarm in alarms
        if {
            query.get("MetricStat", {}).get("Metric", {}).get("MetricName")
            for query in alarm.get("Metrics", [])
        }
        >= {"5XXError", MetricName.WEBHOOK_HOST_UNAVAILABLE.value}
    ]
    assert len(found) == 1
    (alarm,) = found
    queries = {query["Id"]: query for query in alarm["Metrics"]}
    errors, hosts = queries["errors"]["MetricStat"], queries["hosts"]["MetricStat"]
    assert (errors["Metric"]["Namespace"], errors["Stat"]) == ("AWS/ApiGateway", "Sum")
    assert _dimensions(errors["Metric"]) == {
        "ApiName": rest_api["Properties"]["Name"],
        "Stage": stage["Properties"]["StageName"],
    }
    assert (hosts["Metric"]["Namespace"], hosts["Stat"]) == (METRICS_NAMESPACE, "Sum")
    assert _dimensions(hosts["Metric"]) == {"service": synthesized.service}
    (expression,) = [query for query in queries.values() if "Expression" in query]
    assert expression["Expression"] == "FILL(errors, 0) - FILL(hosts, 0)"
    _fires_on_any(alarm)


def test_every_lane_dlq_alarms_on_each_message_it_receives(synthesized, alarms):
    # The dead-letter function empties the lane DLQs within seconds, so depth shows nothing;
    # each message it receives from them is what an operator must hear about.
    webhook_dlq = _ref(synthesized, "WebhookDlqUrl")
    lane_dlqs = synthesized.template.dlq_ids() - {webhook_dlq}
    assert len(lane_dlqs) == len(synthesized.config.lanes)
    for dlq_id in lane_dlqs:
        alarm = _one(
            alarms, "AWS/SQS", "NumberOfMessagesReceived", QueueName={"Fn::GetAtt": [dlq_id, "QueueName"]}
        )
        assert alarm["Statistic"] == "Sum"
        _fires_on_any(alarm)
    # The webhooks DLQ has no consumer: its depth is the alarm
    _fires_on_any(
        _one(
            alarms,
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            QueueName={"Fn::GetAtt": [webhook_dlq, "QueueName"]},
        )
    )


def test_poison_set_aside_raises_an_alarm_while_it_waits(synthesized, alarms):
    # Nothing consumes the poison queue: a message in it is visible until an operator purges it
    poison = _ref(synthesized, "PoisonQueueUrl")
    assert poison not in synthesized.template.dlq_ids()
    alarm = _one(
        alarms,
        "AWS/SQS",
        "ApproximateNumberOfMessagesVisible",
        QueueName={"Fn::GetAtt": [poison, "QueueName"]},
    )
    assert alarm["Statistic"] == "Maximum"
    _fires_on_any(alarm)


def test_the_reconcilers_failed_runs_are_where_llmq_dlq_lists_them(synthesized):
    # Lambda's on-failure destination of the reconciler's runs is an output the CLI lists, so
    # an operator paged by ReconcilerErrors finds the failed runs' events (hunt 305: no output,
    # not listed, not in the runbook)
    from llmq_cli.dead_letters import RECONCILER_FAILURES, stack_dead_letter_queues

    (invoke_config,) = synthesized.template.of_type("AWS::Lambda::EventInvokeConfig").values()
    failures = invoke_config["Properties"]["DestinationConfig"]["OnFailure"]["Destination"]["Fn::GetAtt"][0]
    assert _ref(synthesized, "ReconcilerFailuresUrl") == failures
    listed = stack_dead_letter_queues({"ReconcilerFailuresUrl": "https://q/failures"})
    assert [(queue.name, queue.source_url) for queue in listed] == [(RECONCILER_FAILURES, None)]


def test_every_lane_alarms_on_jobs_the_dead_letter_function_failed(synthesized, alarms):
    for lane in synthesized.config.lanes:
        alarm = _one(
            alarms,
            METRICS_NAMESPACE,
            MetricName.JOB_DEAD_LETTERED.value,
            service=synthesized.service,
            lane=lane.name,
        )
        _fires_on_any(alarm)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_function_alarms_on_its_errors_and_its_throttles(synthesized, alarms, name):
    logical_id, _ = synthesized.template.function(name)
    metrics = ("Throttles",) if name == "authorizer" else ("Errors", "Throttles")
    for metric in metrics:
        alarm = _one(alarms, "AWS/Lambda", metric, FunctionName={"Ref": logical_id})
        assert alarm["Statistic"] == "Sum"
        _fires_on_any(alarm)


def test_the_authorizer_alarms_on_its_failures_but_not_on_refused_keys(synthesized, alarms):
    # A refused key is a Lambda error (the authorizer raises "Unauthorized" for the 401), so a
    # plain Errors alarm would page for every wrong key; the alarm is on the authorizer's own
    # count of its other failures (a timeout or a crash is an API Gateway 5XX, alarmed apart).
    logical_id, _ = synthesized.template.function("authorizer")
    assert not _find(alarms, "AWS/Lambda", "Errors", FunctionName={"Ref": logical_id})
    alarm = _one(alarms, METRICS_NAMESPACE, MetricName.AUTHORIZER_FAILED.value, service=synthesized.service)
    assert alarm["Statistic"] == "Sum"
    _fires_on_any(alarm)


def _dynamodb_operations_on(variable: str) -> set[str]:
    """The DynamoDB operations llmq's functions call on the table named by `variable`, from the
    catalogue the integration suite keeps (tests/aws_calls.json)."""
    catalogue = json.loads(CATALOGUE_PATH.read_text())
    return {
        call.split(":")[1].split("/")[0]
        for function, calls in catalogue.items()
        if not function.startswith("_")
        for call, resources in calls.items()
        if call.startswith("dynamodb:")
        and any(resource.split("/")[0] == f"env:{variable}" for resource in resources)
    }


@pytest.mark.parametrize(
    ("output", "variable"),
    [("JobsTableName", "LLMQ_JOBS_TABLE"), ("TenantsTableName", "LLMQ_TENANTS_TABLE")],
)
def test_every_table_alarms_on_throttled_requests_of_each_operation_llmq_calls(
    synthesized, alarms, output, variable
):
    table = {"Ref": _ref(synthesized, output)}
    # ThrottledRequests is published per TableName and Operation: one series per operation,
    # summed by the alarm's expression.
    watched: set[str] = set()
    for alarm in alarms:
        queries = alarm.get("Metrics", [])
        stats = {query["Id"]: query["MetricStat"] for query in queries if "MetricStat" in query}
        for query_id, stat in stats.items():
            metric = stat["Metric"]
            dimensions = {d["Name"]: d["Value"] for d in metric["Dimensions"]}
            if (metric["Namespace"], metric["MetricName"]) == ("AWS/DynamoDB", "ThrottledRequests") and (
                dimensions["TableName"] == table
            ):
                watched.add(dimensions["Operation"])
                assert stat["Stat"] == "Sum"
                _fires_on_any(alarm)
                # A series with no data point in a period (no throttle of that operation) would
                # leave an unfilled sum without a value, and the alarm could never fire.
                (expression,) = [query["Expression"] for query in queries if "Expression" in query]
                assert f"FILL({query_id}, 0)" in expression
    assert watched == _dynamodb_operations_on(variable)


def test_cloudwatch_may_publish_this_accounts_alarms_to_the_alarm_topic(synthesized, topic):
    # The topic's policy replaces SNS's default one: an alarm's action publishes as CloudWatch,
    # which needs an Allow of its own, or every notification fails unheard.
    (policy,) = synthesized.template.of_type("AWS::SNS::TopicPolicy").values()
    assert topic in policy["Properties"]["Topics"]
    allowed = [
        statement
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if statement["Effect"] == "Allow"
        and statement.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
        and "sns:Publish" in json.dumps(statement["Action"])
    ]
    assert len(allowed) == 1
    # (only this account's alarms)
    assert allowed[0]["Condition"]["StringEquals"]["aws:SourceAccount"] == {"Ref": "AWS::AccountId"}
    assert "alarm:*" in json.dumps(allowed[0]["Condition"]["ArnLike"]["aws:SourceArn"])


def test_the_dashboard_name_is_unique_per_region(synthesized):
    # Dashboard names are global to an account: a second region's stack must not collide.
    (dashboard,) = synthesized.template.of_type("AWS::CloudWatch::Dashboard").values()
    assert "AWS::Region" in json.dumps(dashboard["Properties"]["DashboardName"])


def test_the_webhooks_queue_alarms_when_its_oldest_message_outlives_the_first_retries_unread(
    synthesized, alarms
):
    config = synthesized.config
    queue = {"Fn::GetAtt": [_ref(synthesized, "WebhookQueueUrl"), "QueueName"]}
    found = [
        alarm
        for alarm in alarms
        if {
            query["Id"]: query["MetricStat"]["Metric"]["MetricName"]
            for query in alarm.get("Metrics", [])
            if "MetricStat" in query
        }
        == {
            "age": "ApproximateAgeOfOldestMessage",
            "visible": "ApproximateNumberOfMessagesVisible",
            "failed": MetricName.RECORD_FAILED.value,
        }
    ]
    assert len(found) == 1
    (alarm,) = found
    queries = {query["Id"]: query for query in alarm["Metrics"]}
    for name, statistic in (("age", "Maximum"), ("visible", "Minimum")):
        stat = queries[name]["MetricStat"]
        assert (stat["Stat"], _dimensions(stat["Metric"])) == (statistic, {"QueueName": queue})
        assert queries[name]["ReturnData"] is False
    # (the dispatcher's records failing unexpectedly, counted for this stack and this queue)
    failed = queries["failed"]["MetricStat"]
    assert (failed["Stat"], failed["Metric"]["Namespace"]) == ("Sum", METRICS_NAMESPACE)
    assert _dimensions(failed["Metric"])["queue"] == queue
    # The age compared only while messages wait visible for the whole period, or records fail:
    # a stalled dispatcher leaves them unread or fails them, while a receiver's long Retry-After
    # only hides its own
    (expression,) = [query for query in alarm["Metrics"] if "Expression" in query]
    assert expression["Expression"] == WEBHOOK_STALL_EXPRESSION
    assert expression["Expression"] == "IF(FILL(visible, 0) > 0 OR FILL(failed, 0) > 0, age, 0)"
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["Threshold"] == webhook_oldest_message_alarm_seconds(config)
    # Longer than the first two retries of one delivery, far shorter than the whole schedule
    assert (
        sum(config.webhooks.schedule_seconds[:2]) < alarm["Threshold"] < sum(config.webhooks.schedule_seconds)
    )


def test_a_reconciler_that_stops_running_raises_an_alarm(synthesized, alarms):
    logical_id, _ = synthesized.template.function("reconciler")
    alarm = _one(alarms, "AWS/Lambda", "Invocations", FunctionName={"Ref": logical_id})
    # Fewer than one run over a window longer than the schedule; a stopped schedule publishes
    # no data point at all, so missing data must count as breaching.
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("LessThanThreshold", 1)
    assert alarm["TreatMissingData"] == "breaching"
    assert alarm["Statistic"] == "Sum"
    assert alarm["Period"] * alarm["EvaluationPeriods"] > synthesized.config.reconciler.schedule_minutes * 60


def _rate_alarm(
    alarms: list[dict[str, Any]], failed: MetricName, succeeded: MetricName, **dimensions: Any
) -> dict[str, Any]:
    """The metric-math alarm that reads `failed` and `succeeded` with exactly these dimensions."""
    wanted = {"failed": failed.value, "succeeded": succeeded.value}
    found = []
    for alarm in alarms:
        stats = {
            query["Id"]: query["MetricStat"] for query in alarm.get("Metrics", []) if "MetricStat" in query
        }
        if {key: stat["Metric"]["MetricName"] for key, stat in stats.items()} == wanted and all(
            _dimensions(stat["Metric"]) == dimensions for stat in stats.values()
        ):
            found.append(alarm)
    assert len(found) == 1, f"{wanted} {dimensions}: {len(found)} alarms"
    return found[0]


def _assert_failure_rate(alarm: dict[str, Any], percent: int, min_count: int, period: int) -> None:
    queries = {query["Id"]: query for query in alarm["Metrics"]}
    (expression,) = [query for query in queries.values() if "Expression" in query]
    # The one series the alarm compares: failed / (succeeded + failed) as a percentage, while at
    # least `min_count` failed in the period, else 0; a count with no data point counts as 0.
    assert expression["Expression"] == (
        f"IF(FILL(failed, 0) >= {min_count}, "
        "100 * FILL(failed, 0) / (FILL(succeeded, 0) + FILL(failed, 0)), 0)"
    )
    assert expression["Expression"] == failure_rate_expression(min_count)
    assert expression["ReturnData"] is True
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", percent)
    assert alarm["EvaluationPeriods"] == 1
    # An empty period (nothing failed, nothing succeeded) is not a breach
    assert alarm["TreatMissingData"] == "notBreaching"
    for name in ("failed", "succeeded"):
        stat = queries[name]
        assert stat["ReturnData"] is False
        assert stat["MetricStat"]["Metric"]["Namespace"] == METRICS_NAMESPACE
        assert (stat["MetricStat"]["Stat"], stat["MetricStat"]["Period"]) == ("Sum", period)


def test_job_failures_raise_an_alarm_on_their_share_of_outcomes_with_a_minimum_count(synthesized, alarms):
    # One failure of one at night must not page; six of six must
    assert 1 < JOB_FAILURE_ALARM_MIN_COUNT <= 6
    assert 0 < JOB_FAILURE_ALARM_PERCENT < 100
    for lane in synthesized.config.lanes:
        alarm = _rate_alarm(
            alarms,
            MetricName.JOB_FAILED,
            MetricName.JOB_SUCCEEDED,
            service=synthesized.service,
            lane=lane.name,
        )
        _assert_failure_rate(alarm, JOB_FAILURE_ALARM_PERCENT, JOB_FAILURE_ALARM_MIN_COUNT, period=900)
    # No count alarm on JobFailed is left
    assert not [alarm for alarm in alarms if alarm.get("MetricName") == MetricName.JOB_FAILED.value]


def test_webhook_failures_raise_an_alarm_on_their_share_of_deliveries_with_a_minimum_count(
    synthesized, alarms
):
    assert 1 < WEBHOOK_FAILURE_ALARM_MIN_COUNT <= 6
    alarm = _rate_alarm(
        alarms, MetricName.WEBHOOK_FAILED, MetricName.WEBHOOK_DELIVERED, service=synthesized.service
    )
    _assert_failure_rate(alarm, WEBHOOK_FAILURE_ALARM_PERCENT, WEBHOOK_FAILURE_ALARM_MIN_COUNT, period=3600)
    assert not [alarm for alarm in alarms if alarm.get("MetricName") == MetricName.WEBHOOK_FAILED.value]


def test_every_lane_alarms_on_jobs_the_api_could_not_enqueue(synthesized, alarms):
    # The api keeps the client's 202 and leaves the job to the reconciler: its JobEnqueueFailed
    # count (functions' POWERTOOLS_SERVICE_NAME, and the job's lane) is the only signal.
    for lane in synthesized.config.lanes:
        alarm = _one(
            alarms,
            METRICS_NAMESPACE,
            MetricName.JOB_ENQUEUE_FAILED.value,
            service=synthesized.service,
            lane=lane.name,
        )
        assert (alarm["Statistic"], alarm["Period"]) == ("Sum", 300)
        _fires_on_any(alarm)


def test_what_the_reconciler_could_not_settle_raises_an_alarm(synthesized, alarms):
    # A run logs and skips what it cannot settle, and goes on: its Errors alarm never sees it.
    alarm = _one(
        alarms, METRICS_NAMESPACE, MetricName.RECONCILE_ENTRY_FAILED.value, service=synthesized.service
    )
    assert (alarm["Statistic"], alarm["Period"]) == ("Sum", 300)
    _fires_on_any(alarm)


def test_a_reconciler_that_keeps_leaving_entries_for_the_next_run_raises_an_alarm(synthesized, alarms):
    # One run that stops short is a burst; three periods running, a backlog it does not keep up with
    alarm = _one(alarms, METRICS_NAMESPACE, MetricName.RECONCILE_LEFT.value, service=synthesized.service)
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Sum", 300, 3)
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)
    assert alarm["TreatMissingData"] == "notBreaching"


def test_every_alarm_is_described_in_the_operations_guide(synthesized):
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for logical_id in synthesized.template.of_type("AWS::CloudWatch::Alarm"):
        # Logical ids are MonitoringLane<Name>Dlq<hash>; the guide names each alarm's construct id.
        construct_id = logical_id.removeprefix("Monitoring")[:-8]
        generic = construct_id
        for lane in synthesized.config.lanes:
            generic = generic.replace(f"Lane{lane.name.capitalize()}", "Lane<Name>")
        for name in FUNCTIONS:
            pascal = "".join(part.capitalize() for part in name.split("_"))
            if generic.startswith(pascal) and generic[len(pascal) :] in ("Errors", "Throttles"):
                generic = f"<Function>{generic[len(pascal) :]}"
        assert f"`{generic}`" in guide, f"docs/operations.md does not describe {generic}"


# ---- two stacks in one account and region ---------------------------------------------


def _llmq_metrics_read(app: SynthesizedApp) -> dict[str, set[str]]:
    """Alarm logical id -> each llmq-namespace metric it reads, as (name, dimensions) text."""
    found: dict[str, set[str]] = {}
    for logical_id, alarm in app.template.of_type("AWS::CloudWatch::Alarm").items():
        properties = alarm["Properties"]
        metrics = [properties] + [
            q["MetricStat"]["Metric"] for q in properties.get("Metrics", []) if "MetricStat" in q
        ]
        for metric in metrics:
            if metric.get("Namespace") == METRICS_NAMESPACE:
                dimensions = sorted((d["Name"], d["Value"]) for d in metric.get("Dimensions", []))
                found.setdefault(logical_id, set()).add(json.dumps([metric["MetricName"], dimensions]))
    return found


def _emitted(app: SynthesizedApp, function: str) -> set[str]:
    """The metrics `function` of `app` emits (EMF, as its handler's import of llmq.telemetry
    sees its environment): a dead letter of the high lane, and an api 500."""
    environ = app.template.environment(function)
    script = (
        "from llmq.telemetry import MetricName, emit_count, emit_job_metric\n"
        "emit_job_metric(MetricName.JOB_DEAD_LETTERED, 1, 'high')\n"
        "emit_count(MetricName.API_UNEXPECTED_ERROR)\n"
    )
    env = {**os.environ, **{k: v for k, v in environ.items() if k.startswith("POWERTOOLS_")}}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    emitted = set()
    for line in out.splitlines():
        record = json.loads(line)
        for directive in record["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == METRICS_NAMESPACE
            for metric in directive["Metrics"]:
                dimensions = sorted((name, record[name]) for name in directive["Dimensions"][0])
                emitted.add(json.dumps([metric["Name"], dimensions]))
    return emitted


def test_two_stacks_in_one_account_never_alarm_on_each_others_metrics(
    synthesized: SynthesizedApp, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Given a second llmq stack in the same account and region (staging beside the default)
    staging = synthesize(
        LlmqConfig(), {"llmq:stack_name": "LlmqStaging"}, tmp_path_factory.mktemp("cdk-staging")
    )
    ours, theirs = _llmq_metrics_read(synthesized), _llmq_metrics_read(staging)
    # Then no alarm of one reads a metric an alarm of the other reads
    assert set().union(*ours.values()).isdisjoint(set().union(*theirs.values()))
    # And what one stack's functions emit reaches its own alarms only: a dead letter in staging
    # pages staging's on-call, not the default stack's
    for app, own, other in ((staging, theirs, ours), (synthesized, ours, theirs)):
        emitted = _emitted(app, "dead_letter") | _emitted(app, "api")
        assert len(emitted) == 2
        assert emitted <= set().union(*own.values())
        assert emitted.isdisjoint(set().union(*other.values()))


def test_every_lane_alarms_on_records_its_worker_fails(synthesized, alarms):
    # A worker that fails every record succeeds as an invocation (no Lambda error), and each
    # message comes back only after the lane's visibility timeout: its own count is the alarm
    for _, (queue_id, _) in synthesized.template.lane_queues().items():
        alarm = _one(
            alarms,
            METRICS_NAMESPACE,
            MetricName.RECORD_FAILED.value,
            service=synthesized.service,
            queue={"Fn::GetAtt": [queue_id, "QueueName"]},
        )
        assert alarm["Statistic"] == "Sum"
        _fires_on_any(alarm)


def test_the_providers_refusal_of_llmqs_own_account_pages_at_the_first(synthesized, alarms):
    alarm = _one(
        alarms, METRICS_NAMESPACE, MetricName.PROVIDER_ACCOUNT_REFUSED.value, service=synthesized.service
    )
    assert alarm["Statistic"] == "Sum"
    _fires_on_any(alarm)


def test_webhooks_that_no_receiver_gets_page_within_fifteen_minutes(synthesized, alarms):
    (alarm,) = [
        alarm
        for alarm in alarms
        if any(
            query.get("Expression") == WEBHOOK_NONE_DELIVERED_EXPRESSION for query in alarm.get("Metrics", [])
        )
    ]
    queries = {query["Id"]: query for query in alarm["Metrics"] if "MetricStat" in query}
    assert {name: query["MetricStat"]["Metric"]["MetricName"] for name, query in queries.items()} == {
        "delivered": MetricName.WEBHOOK_DELIVERED.value,
        "retried": MetricName.WEBHOOK_RETRIED.value,
        "failed": MetricName.WEBHOOK_FAILED.value,
    }
    for query in queries.values():
        stat = query["MetricStat"]
        assert (stat["Stat"], stat["Period"], stat["Metric"]["Namespace"]) == ("Sum", 900, METRICS_NAMESPACE)
        assert _dimensions(stat["Metric"]) == {"service": synthesized.service}
    # Attempts that failed (retried or given up) with none delivered: not one integrator's
    # failing receiver among others that answer
    assert WEBHOOK_NONE_DELIVERED_EXPRESSION.startswith("IF(FILL(delivered, 0) == 0 AND")
    _fires_on_any(alarm)


# PutMetricAlarm: "Period multiplied by EvaluationPeriods can't be more than 604,800 seconds.
# For alarms with a period of less than one hour (3,600 seconds), the total evaluation period
# can't be longer than one day (86,400 seconds)."
# https://docs.aws.amazon.com/AmazonCloudWatch/latest/APIReference/API_PutMetricAlarm.html
def _windows_cloudwatch_refuses(synthesized: SynthesizedApp) -> dict[str, tuple[int, int]]:
    refused = {}
    for logical_id, resource in synthesized.template.of_type("AWS::CloudWatch::Alarm").items():
        alarm = resource["Properties"]
        periods = [alarm["Period"]] if "Period" in alarm else []
        periods += [
            query["MetricStat"]["Period"] for query in alarm.get("Metrics", []) if "MetricStat" in query
        ]
        period = max(periods)
        window = period * alarm.get("EvaluationPeriods", 1)
        if window > 604_800 or (period < 3_600 and window > 86_400):
            refused[logical_id] = (period, window)
    return refused


def test_every_alarms_window_is_one_cloudwatch_accepts(synthesized):
    assert _windows_cloudwatch_refuses(synthesized) == {}


def test_the_longest_reconciler_schedule_still_gives_alarms_cloudwatch_accepts(tmp_path_factory):
    """Hunt 221: a schedule of days made ReconcilerFallingBehind's three periods pass the 7-day
    window, which CloudFormation refuses, rolling the whole deploy back."""
    config = LlmqConfig.model_validate(
        {
            "retention_days": 30,
            "reconciler": {
                "schedule_minutes": MAX_RECONCILER_SCHEDULE_MINUTES,
                "retention_margin_seconds": 200_000,
            },
        }
    )
    long = synthesize(config, outdir=tmp_path_factory.mktemp("cdk-long-schedule"))
    assert _windows_cloudwatch_refuses(long) == {}
    with pytest.raises(ValueError, match="schedule_minutes"):
        LlmqConfig.model_validate({"reconciler": {"schedule_minutes": MAX_RECONCILER_SCHEDULE_MINUTES + 1}})
