"""The grant checker itself, on hand-written templates: it must refuse what IAM would refuse.

The real stack is checked in test_stack.py (which shares the synthesized app); these make sure
that check cannot pass by reading too generously.
"""

from __future__ import annotations

from typing import Any

import pytest

from stacks.template import FUNCTION_TAG, StackTemplate
from tests.aws_calls import AwsCall, iam_actions
from tests.infra.iam_grants import canonical, missing_grants

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
