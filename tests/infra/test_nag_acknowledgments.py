"""Every cdk-nag finding llmq acknowledges says something true of the synthesized template.

An acknowledgment is a claim made to a reviewer ("only X-Ray on '*'", "one action per
prefix", "logging is off unless opted in"). Each finding in the validation report is checked
here by its rule against the template; a rule with no check fails, so a new acknowledgment
needs one (or a place in UNCHECKABLE, saying why the template cannot show it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from llmq.batch_results import RESULTS_FILE_PREFIX
from llmq.config import LimitsConfig, LlmqConfig
from stacks.functions import FUNCTION_NAMES
from stacks.jobs_table import (
    BATCH_REQUESTS_PREFIX,
    INPUTS_PREFIX,
    PARKED_PREFIX,
    RESULTS_PREFIX,
    UPLOADS_PREFIX,
)
from stacks.template import StackTemplate
from tests.infra.iam_grants import LOG_ACTIONS, TRACING_ACTIONS, canonical, referenced_ids
from tests.infra.synthesis import SynthesizedApp, synthesize

Finding = dict[str, Any]

# Claims about code, not the template: the reason says where the code is.
UNCHECKABLE = {
    # "validates every request with the pydantic models": tests/integration/test_api.py.
    "AwsSolutions-APIG2",
}


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(LlmqConfig(), outdir=tmp_path_factory.mktemp("cdk-nag"))


def _findings(synthesized: SynthesizedApp) -> list[Finding]:
    (report,) = [
        r for r in synthesized.validation_report()["pluginReports"] if r["pluginName"] == "AwsSolutions"
    ]
    findings: list[Finding] = report["suppressedViolations"]
    return findings


def _granted(template: StackTemplate) -> list[tuple[str, str, str]]:
    """(function, action, canonical resource) for every Allow of every function's role."""
    return [
        (name, action, canonical(template, resource))
        for name in FUNCTION_NAMES
        for statement in template.statements(name)
        if statement.effect == "Allow"
        for action in statement.actions
        for resource in statement.resources
    ]


# ---- one check per rule ----------------------------------------------------------------


def _only_tracing_on_every_resource(template: StackTemplate, finding: Finding) -> None:
    on_any = {action for _, action, resource in _granted(template) if resource == "*"}
    assert on_any == set(TRACING_ACTIONS), on_any
    assert "X-Ray PutTraceSegments and PutTelemetryRecords" in finding["reason"]


def _one_action_per_payload_prefix(template: StackTemplate, finding: Finding) -> None:
    match = re.fullmatch(r"AwsSolutions-IAM5\[Resource::<(\w+)\.Arn>/((?:\w+/)+)\*\]", finding["ruleName"])
    assert match, finding["ruleName"]
    bucket, prefix = match.groups()
    assert template.resources[bucket]["Type"] == "AWS::S3::Bucket"
    owner = {
        BATCH_REQUESTS_PREFIX: "<batch>",
        UPLOADS_PREFIX: "<tenant>",
        RESULTS_FILE_PREFIX: "<batch>",
    }.get(prefix, "<job>")
    assert (
        prefix
        in (
            INPUTS_PREFIX,
            RESULTS_PREFIX,
            BATCH_REQUESTS_PREFIX,
            UPLOADS_PREFIX,
            RESULTS_FILE_PREFIX,
            PARKED_PREFIX,
        )
        and f"{prefix}{owner}" in finding["reason"]
    )
    on_prefix = {
        (name, action) for name, action, resource in _granted(template) if resource == f"<{bucket}>/{prefix}*"
    }
    # The reason: the api puts inputs and gets results, the worker the reverse.
    expected = {
        INPUTS_PREFIX: {("api", "s3:PutObject"), ("worker", "s3:GetObject")},
        RESULTS_PREFIX: {("api", "s3:GetObject"), ("worker", "s3:PutObject")},
        BATCH_REQUESTS_PREFIX: {("api", "s3:GetObject"), ("worker", "s3:PutObject")},
        UPLOADS_PREFIX: {("api", "s3:GetObject")},
        RESULTS_FILE_PREFIX: {("worker", "s3:GetObject")},
        PARKED_PREFIX: {
            ("worker", "s3:GetObject"),
            ("reconciler", "s3:GetObject"),
            ("dead_letter", "s3:GetObject"),
        },
    }[prefix]
    assert on_prefix == expected
    # no list, no delete, anywhere in the bucket
    on_bucket = {action for _, action, resource in _granted(template) if resource.startswith(f"<{bucket}>")}
    assert on_bucket <= {"s3:GetObject", "s3:PutObject"}


def _payload_bucket_used_by_two_roles(template: StackTemplate, finding: Finding) -> None:
    (bucket,) = template.of_type("AWS::S3::Bucket")
    granted = [
        (name, resource) for name, _, resource in _granted(template) if resource.startswith(f"<{bucket}>")
    ]
    assert {name for name, _ in granted} == {"api", "worker", "reconciler", "dead_letter"}
    readers = {name for name, resource in granted if resource != f"<{bucket}>/{PARKED_PREFIX}*"}
    assert readers == {"api", "worker"} and "two function roles (api and worker)" in finding["reason"]
    assert "parked results read by two more (reconciler and dead_letter)" in finding["reason"]


def _secret_cached_five_minutes(template: StackTemplate, finding: Finding) -> None:
    from stacks.functions import FUNCTIONS_DIR

    assert "max_age=300" in finding["reason"]
    assert "max_age=300" in (FUNCTIONS_DIR / "worker" / "handler.py").read_text()
    readers = {name for name, action, _ in _granted(template) if action == "secretsmanager:GetSecretValue"}
    assert readers == {"worker"}


def _stage_throttle_and_limits_exist(template: StackTemplate, finding: Finding) -> None:
    # Every limit the reason names is a setting that exists, and the stage throttle is the config's.
    named = re.findall(r"limits\.(\w+)", finding["reason"])
    assert named and set(named) <= set(LimitsConfig.model_fields), named
    limits = LlmqConfig().limits
    (stage,) = template.of_type("AWS::ApiGateway::Stage").values()
    (settings,) = stage["Properties"]["MethodSettings"]
    assert (settings["ThrottlingRateLimit"], settings["ThrottlingBurstLimit"]) == (
        limits.stage_rate_per_second,
        limits.stage_burst,
    )
    _only_openapi_is_public(template, finding)


def _only_openapi_is_public(template: StackTemplate, finding: Finding) -> None:
    paths = _method_paths(template)
    public = {path for path, method in paths.items() if method["AuthorizationType"] == "NONE"}
    assert public == {"GET /v1/openapi.json"}
    others = [m for path, m in paths.items() if path not in public]
    assert others and all(m["AuthorizationType"] == "CUSTOM" for m in others)
    (authorizer,) = template.of_type("AWS::ApiGateway::Authorizer").values()
    assert authorizer["Properties"]["Type"] == "REQUEST"


def _method_paths(template: StackTemplate) -> dict[str, dict[str, Any]]:
    resources = template.of_type("AWS::ApiGateway::Resource")

    def path(resource_id: Any) -> str:
        if not isinstance(resource_id, dict) or "Ref" not in resource_id:
            return ""
        properties = resources[resource_id["Ref"]]["Properties"]
        return f"{path(properties['ParentId'])}/{properties['PathPart']}"

    return {
        f"{method['Properties']['HttpMethod']} {path(method['Properties']['ResourceId'])}": method[
            "Properties"
        ]
        for method in template.of_type("AWS::ApiGateway::Method").values()
    }


def _api_gateway_logging_is_opt_in(template: StackTemplate, finding: Finding) -> None:
    # Off by default: no account-level role, no access log, no execution logging on the stage.
    assert not template.of_type("AWS::ApiGateway::Account")
    (stage,) = template.of_type("AWS::ApiGateway::Stage").values()
    assert "AccessLogSetting" not in stage["Properties"]
    assert all(s.get("LoggingLevel", "OFF") == "OFF" for s in stage["Properties"].get("MethodSettings", []))
    assert "llmq:apigw_cloudwatch_role" in finding["reason"]


def _failures_queue_is_a_dead_end(template: StackTemplate, finding: Finding) -> None:
    (config,) = template.of_type("AWS::Lambda::EventInvokeConfig").values()
    reconciler_id, _ = template.function("reconciler")
    assert referenced_ids(template, config["Properties"]["FunctionName"]) == [reconciler_id]
    (queue,) = referenced_ids(template, config["Properties"]["DestinationConfig"]["OnFailure"]["Destination"])
    consumed = {
        referenced_ids(template, m["EventSourceArn"])[0]
        for m in template.queue_event_source_mappings().values()
    }
    assert queue not in consumed


CHECKS: dict[str, Callable[[StackTemplate, Finding], None]] = {
    "AwsSolutions-IAM5[Resource::*]": _only_tracing_on_every_resource,
    "AwsSolutions-IAM5[Resource::<": _one_action_per_payload_prefix,
    "AwsSolutions-S1": _payload_bucket_used_by_two_roles,
    "AwsSolutions-SMG4": _secret_cached_five_minutes,
    "AwsSolutions-APIG3": _stage_throttle_and_limits_exist,
    "AwsSolutions-APIG4": _only_openapi_is_public,
    "AwsSolutions-COG4": _only_openapi_is_public,
    "AwsSolutions-APIG1": _api_gateway_logging_is_opt_in,
    "AwsSolutions-APIG6": _api_gateway_logging_is_opt_in,
    "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs]": (
        _api_gateway_logging_is_opt_in
    ),
    "AwsSolutions-SQS3": _failures_queue_is_a_dead_end,
}


def _check_for(rule: str) -> Callable[[StackTemplate, Finding], None] | None:
    if rule in CHECKS:
        return CHECKS[rule]
    return next(
        (check for prefix, check in CHECKS.items() if prefix.endswith("<") and rule.startswith(prefix)), None
    )


def test_every_acknowledged_finding_has_a_check_of_its_claim(synthesized: SynthesizedApp) -> None:
    findings = _findings(synthesized)
    assert findings, "the AwsSolutions pack did not run"
    unchecked = sorted(
        {
            f["ruleName"]
            for f in findings
            if f["ruleName"] not in UNCHECKABLE and _check_for(f["ruleName"]) is None
        }
    )
    assert unchecked == [], "acknowledged with a reason nothing checks"


def test_every_acknowledgment_reason_is_true_of_the_template(synthesized: SynthesizedApp) -> None:
    for finding in _findings(synthesized):
        check = _check_for(finding["ruleName"])
        if check is not None:
            check(synthesized.template, finding)


def test_no_function_role_is_acknowledged_for_a_managed_policy_or_an_index_wildcard(
    synthesized: SynthesizedApp,
) -> None:
    # The causes are gone: roles write only to their own log group, and query named indexes.
    rules = {f["ruleName"] for f in _findings(synthesized)}
    assert not [rule for rule in rules if "AWSLambdaBasicExecutionRole" in rule or "/index/" in rule]
    for name in FUNCTION_NAMES:
        logs = {
            (action, resource)
            for n, action, resource in _granted(synthesized.template)
            if n == name and action in LOG_ACTIONS
        }
        assert len({resource for _, resource in logs}) == 1 and "*" not in {r for _, r in logs}
