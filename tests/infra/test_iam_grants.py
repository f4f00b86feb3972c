"""The grant checker, on hand-written templates: it must refuse what IAM would refuse, and
flag what a role allows beyond what its function calls. Then the real stack, both ways.

test_stack.py checks that every recorded call is granted; here, that nothing else is: each
action a role allows on each resource is a recorded call's (tests/aws_calls.json) or one the
Lambda service makes with the role (its log group, tracing, its on-failure destination).
"""

from __future__ import annotations

import copy
import fnmatch
from pathlib import Path
from typing import Any

import pytest

from llmq.config import LlmqConfig
from stacks.functions import FUNCTION_NAMES
from stacks.template import FUNCTION_TAG, StackTemplate
from tests.aws_calls import AwsCall, iam_actions, load_catalogue
from tests.infra.iam_grants import canonical, excess_grants, missing_grants
from tests.infra.synthesis import SynthesizedApp, synthesize

JOBS_ARN = {"Fn::GetAtt": ["Jobs", "Arn"]}


def _template(statements: list[dict[str, Any]], variables: dict[str, Any] | None = None) -> StackTemplate:
    """One function `worker` with its role, one policy, a table, a bucket and a queue it consumes."""
    return StackTemplate(
        {
            "Resources": {
                "Jobs": {"Type": "AWS::DynamoDB::Table", "Properties": {}},
                "Payloads": {"Type": "AWS::S3::Bucket", "Properties": {}},
                "Lane": {"Type": "AWS::SQS::Queue", "Properties": {}},
                "Role": {"Type": "AWS::IAM::Role", "Properties": {}},
                "Policy": {
                    "Type": "AWS::IAM::Policy",
                    "Properties": {
                        "Roles": [{"Ref": "Role"}],
                        "PolicyDocument": {"Statement": statements},
                    },
                },
                "Fn": {
                    "Type": "AWS::Lambda::Function",
                    "Properties": {
                        "Role": {"Fn::GetAtt": ["Role", "Arn"]},
                        "Tags": [{"Key": FUNCTION_TAG, "Value": "worker"}],
                        "Environment": {
                            "Variables": variables
                            if variables is not None
                            else {
                                "LLMQ_JOBS_TABLE": {"Ref": "Jobs"},
                                "LLMQ_PAYLOAD_BUCKET": {"Ref": "Payloads"},
                            }
                        },
                    },
                },
                "Mapping": {
                    "Type": "AWS::Lambda::EventSourceMapping",
                    "Properties": {
                        "FunctionName": {"Ref": "Fn"},
                        "EventSourceArn": {"Fn::GetAtt": ["Lane", "Arn"]},
                    },
                },
            }
        }
    )


def _allow(actions: list[str], resources: list[Any]) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": actions, "Resource": resources}


CONSUME = _allow(
    ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:ChangeMessageVisibility"],
    [{"Fn::GetAtt": ["Lane", "Arn"]}],
)


def test_intrinsics_read_as_logical_ids() -> None:
    template = _template([])
    assert canonical(template, {"Fn::Join": ["", [JOBS_ARN, "/index/*"]]}) == "<Jobs>/index/*"
    assert canonical(template, {"Fn::Sub": "${Payloads.Arn}/*"}) == "<Payloads>/*"
    # A table's Ref is its name, not an ARN: a statement naming it grants nothing.
    assert canonical(template, {"Ref": "Jobs"}) == "<Jobs.Ref>"


def test_a_granted_call_passes_and_the_same_call_without_its_grant_fails() -> None:
    call = AwsCall("worker", "dynamodb:UpdateItem", "env:LLMQ_JOBS_TABLE")
    granted = _template([_allow(["dynamodb:GetItem", "dynamodb:UpdateItem"], [JOBS_ARN]), CONSUME])
    assert missing_grants(granted, "worker", [call]) == []
    ungranted = _template([_allow(["dynamodb:GetItem"], [JOBS_ARN]), CONSUME])
    assert missing_grants(ungranted, "worker", [call]) == [
        "dynamodb:UpdateItem on <Jobs> (for worker: dynamodb:UpdateItem on env:LLMQ_JOBS_TABLE)"
    ]


def test_an_index_needs_the_index_arn_not_only_the_table() -> None:
    query = AwsCall("worker", "dynamodb:Query", "env:LLMQ_JOBS_TABLE/index/by_sweep")
    table_only = _template([_allow(["dynamodb:Query"], [JOBS_ARN]), CONSUME])
    assert missing_grants(table_only, "worker", [query])
    with_indexes = _template(
        [_allow(["dynamodb:Query"], [{"Fn::Join": ["", [JOBS_ARN, "/index/*"]]}]), CONSUME]
    )
    assert missing_grants(with_indexes, "worker", [query]) == []


def test_a_deny_wins_and_a_wildcard_action_counts() -> None:
    call = AwsCall("worker", "s3:HeadObject", "env:LLMQ_PAYLOAD_BUCKET/*")
    objects = {"Fn::Join": ["", [{"Fn::GetAtt": ["Payloads", "Arn"]}, "/*"]]}
    # HeadObject is authorised as s3:GetObject
    assert iam_actions(call.operation) == ("s3:GetObject",)
    assert missing_grants(_template([_allow(["s3:Get*"], [objects]), CONSUME]), "worker", [call]) == []
    denied = _template(
        [_allow(["s3:*"], [objects]), {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "*"}, CONSUME]
    )
    assert missing_grants(denied, "worker", [call])
    # The bucket itself is not its objects
    assert missing_grants(
        _template([_allow(["s3:GetObject"], [{"Fn::GetAtt": ["Payloads", "Arn"]}]), CONSUME]),
        "worker",
        [call],
    )


def test_the_event_source_mapping_needs_receive_and_delete_on_its_queue() -> None:
    no_consume = _template([_allow(["sqs:ChangeMessageVisibility"], [{"Fn::GetAtt": ["Lane", "Arn"]}])])
    missing = missing_grants(no_consume, "worker", [])
    assert "sqs:ReceiveMessage on <Lane> (for worker: the event source mapping on <Lane>)" in missing
    assert "sqs:DeleteMessage on <Lane> (for worker: the event source mapping on <Lane>)" in missing


def test_an_event_source_call_is_checked_on_the_mapped_queue() -> None:
    call = AwsCall("worker", "sqs:ChangeMessageVisibility", "event_source")
    assert missing_grants(_template([CONSUME]), "worker", [call]) == []
    other_queue = _allow(["sqs:*"], [{"Fn::GetAtt": ["Other", "Arn"]}])
    assert missing_grants(_template([other_queue]), "worker", [call])


@pytest.mark.parametrize(
    ("variables", "reason"),
    [
        ({}, "the template gives worker no LLMQ_JOBS_TABLE"),
        ({"LLMQ_JOBS_TABLE": "imported-table"}, "names no resource of this stack"),
    ],
)
def test_a_call_whose_resource_cannot_be_followed_fails(variables: dict[str, Any], reason: str) -> None:
    call = AwsCall("worker", "dynamodb:GetItem", "env:LLMQ_JOBS_TABLE")
    (problem,) = missing_grants(
        _template([_allow(["dynamodb:*"], ["*"]), CONSUME], variables), "worker", [call]
    )
    assert reason in problem


# ---- the other way: a grant no call needs ----------------------------------------------

MAPPING = _allow(
    ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"], [{"Fn::GetAtt": ["Lane", "Arn"]}]
)
QUERY_TENANTS = AwsCall("worker", "dynamodb:Query", "env:LLMQ_JOBS_TABLE/index/by_tenant")


def test_a_grant_on_every_index_is_excess_when_one_index_is_queried() -> None:
    every_index = _allow(["dynamodb:Query"], [{"Fn::Join": ["", [JOBS_ARN, "/index/*"]]}])
    one_index = _allow(["dynamodb:Query"], [{"Fn::Join": ["", [JOBS_ARN, "/index/by_tenant"]]}])
    assert excess_grants(_template([every_index, MAPPING]), "worker", [QUERY_TENANTS]) == [
        "dynamodb:Query on <Jobs>/index/*"
    ]
    assert excess_grants(_template([one_index, MAPPING]), "worker", [QUERY_TENANTS]) == []


def test_an_action_no_call_makes_is_excess_even_beside_one_that_is_made() -> None:
    get = AwsCall("worker", "dynamodb:GetItem", "env:LLMQ_JOBS_TABLE")
    statements = [_allow(["dynamodb:GetItem", "dynamodb:ConditionCheckItem"], [JOBS_ARN]), MAPPING]
    assert excess_grants(_template(statements), "worker", [get]) == ["dynamodb:ConditionCheckItem on <Jobs>"]


def test_a_consumer_may_hold_what_its_event_source_mapping_needs_and_no_more() -> None:
    assert excess_grants(_template([CONSUME]), "worker", []) == ["sqs:ChangeMessageVisibility on <Lane>"]
    visibility = AwsCall("worker", "sqs:ChangeMessageVisibility", "event_source")
    assert excess_grants(_template([CONSUME]), "worker", [visibility]) == []


def test_a_managed_policy_or_a_wildcard_action_is_excess() -> None:
    template = _template([_allow(["s3:*"], [{"Fn::Sub": "${Payloads.Arn}/*"}]), MAPPING])
    template.resources["Role"]["Properties"]["ManagedPolicyArns"] = [
        "arn:aws:iam::aws:policy/AdministratorAccess"
    ]
    read = AwsCall("worker", "s3:GetObject", "env:LLMQ_PAYLOAD_BUCKET/*")
    excess = excess_grants(template, "worker", [read])
    assert excess == ['managed policy "arn:aws:iam::aws:policy/AdministratorAccess"', "s3:* on <Payloads>/*"]


def test_logs_are_the_service_s_need_only_on_the_function_s_own_log_group() -> None:
    logs = ["logs:CreateLogStream", "logs:PutLogEvents"]
    own = _template([_allow(logs, [{"Fn::GetAtt": ["Logs", "Arn"]}]), MAPPING])
    own.resources["Logs"] = {"Type": "AWS::Logs::LogGroup", "Properties": {}}
    own.resources["Fn"]["Properties"]["LoggingConfig"] = {"LogGroup": {"Ref": "Logs"}}
    assert excess_grants(own, "worker", []) == []
    anywhere = _template([_allow(logs, ["*"]), MAPPING])
    assert excess_grants(anywhere, "worker", []) == [
        "logs:CreateLogStream on *",
        "logs:PutLogEvents on *",
    ]


# ---- the real stack ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(LlmqConfig(), outdir=tmp_path_factory.mktemp("cdk-grants"))


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_a_role_allows_nothing_its_function_does_not_call(synthesized: SynthesizedApp, name: str) -> None:
    # Given the calls the function makes (tests/aws_calls.json) and what Lambda does with its role
    # When every action its role allows is compared with them, resource by resource
    excess = excess_grants(synthesized.template, name, load_catalogue())
    # Then there is nothing more: no unused action, no index or prefix wildcard, no managed policy
    assert excess == [], f"{name}'s role allows what it never calls:\n  " + "\n  ".join(excess)


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_a_function_writes_logs_only_to_its_own_log_group(synthesized: SynthesizedApp, name: str) -> None:
    template = synthesized.template
    _, function = template.function(name)
    own = canonical(
        template, {"Fn::GetAtt": [function["Properties"]["LoggingConfig"]["LogGroup"]["Ref"], "Arn"]}
    )
    log_statements = [s for s in template.statements(name) if any(a.startswith("logs:") for a in s.actions)]
    assert log_statements
    for statement in log_statements:
        assert [canonical(template, r) for r in statement.resources] == [own], statement.raw
    assert template.managed_policies(name) == []


def _without(template: StackTemplate, function: str, actions: set[str]) -> StackTemplate:
    """The template with `actions` taken out of `function`'s role (a statement left with no
    action is dropped)."""
    raw = copy.deepcopy(template.template)
    changed = StackTemplate(raw)
    role_id = changed.role_of(function)
    for policy in changed.of_type("AWS::IAM::Policy").values():
        if {"Ref": role_id} not in policy["Properties"].get("Roles", []):
            continue
        document = policy["Properties"]["PolicyDocument"]
        kept_statements = []
        for statement in document["Statement"]:
            listed = statement["Action"]
            kept = [a for a in ([listed] if isinstance(listed, str) else listed) if a not in actions]
            if kept:
                kept_statements.append({**statement, "Action": kept})
        document["Statement"] = kept_statements
    return changed


@pytest.mark.parametrize(
    "actions",
    [{"xray:PutTraceSegments", "xray:PutTelemetryRecords"}, {"logs:PutLogEvents"}],
    ids=["tracing", "logs"],
)
def test_a_role_without_what_the_lambda_service_needs_is_missing_grants(
    synthesized: SynthesizedApp, actions: set[str]
) -> None:
    # Given the worker's role without what Lambda itself does with it (Lambda refuses a function
    # with active tracing whose role cannot PutTraceSegments; without PutLogEvents it runs unlogged)
    broken = _without(synthesized.template, "worker", actions)
    assert not [s for s in broken.statements("worker") for a in actions if s.allows(a)]
    # Then the grant check says what is missing, though no handler calls it
    missing = missing_grants(broken, "worker", load_catalogue())
    assert sorted(line.split()[0] for line in missing) == sorted(actions), missing
    assert missing_grants(synthesized.template, "worker", load_catalogue()) == []


def _tenant_item_keys() -> dict[str, str]:
    """{kind: pk} of the items llmq.tenants writes for one tenant and its API key, in moto."""
    import boto3
    from moto import mock_aws

    from llmq.tenants import TenantRepository

    with mock_aws():
        ddb = boto3.client("dynamodb", region_name="us-east-1")
        ddb.create_table(
            TableName="tenants",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        TenantRepository("tenants", dynamodb=ddb).create("acme", "enterprise")
        items = ddb.scan(TableName="tenants")["Items"]
    return {("secrets" if "webhook_secrets" in item else "key"): item["pk"]["S"] for item in items}


def test_the_authorizer_can_read_api_key_items_but_not_the_tenant_items_holding_webhook_secrets(
    synthesized: SynthesizedApp,
) -> None:
    """dynamodb:LeadingKeys is the partition key of the items a request reads; with
    ForAllValues:StringLike every one of them must match the pattern (DynamoDB developer guide,
    "Using IAM policy conditions for fine-grained access control")."""
    keys = _tenant_item_keys()
    statements = [s for s in synthesized.template.statements("authorizer") if s.allows("dynamodb:GetItem")]
    assert statements
    for statement in statements:
        (patterns,) = statement.raw["Condition"]["ForAllValues:StringLike"].values()
        assert list(statement.raw["Condition"]["ForAllValues:StringLike"]) == ["dynamodb:LeadingKeys"]
        assert any(fnmatch.fnmatchcase(keys["key"], p) for p in patterns), (keys, patterns)
        assert not any(fnmatch.fnmatchcase(keys["secrets"], p) for p in patterns), (keys, patterns)


def test_the_dispatcher_reads_tenant_items_but_no_api_key_item(synthesized: SynthesizedApp) -> None:
    keys = _tenant_item_keys()
    tenants = synthesized.template.output_resource("TenantsTableName")[0]
    statements = [
        s
        for s in synthesized.template.statements("webhook_dispatcher")
        if f"<{tenants}>" in [canonical(synthesized.template, r) for r in s.resources]
    ]
    assert statements
    for statement in statements:
        (patterns,) = statement.raw["Condition"]["ForAllValues:StringLike"].values()
        assert any(fnmatch.fnmatchcase(keys["secrets"], p) for p in patterns)
        assert not any(fnmatch.fnmatchcase(keys["key"], p) for p in patterns)


def test_the_catalogue_is_what_make_aws_calls_writes() -> None:
    from tests.aws_calls import CATALOGUE_PATH, render_catalogue

    assert Path(CATALOGUE_PATH).read_text() == render_catalogue(load_catalogue())
