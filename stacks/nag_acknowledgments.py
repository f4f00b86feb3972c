"""The cdk-nag AwsSolutions findings llmq accepts, each acknowledged where it arises, with its reason.

Acknowledgments are scoped to the construct that causes them, never to the whole stack, so
a new finding elsewhere still fails the synth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aws_cdk as cdk
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_lambda as lambda_
from constructs import IConstruct

if TYPE_CHECKING:
    from stacks.llmq_stack import LlmqStack

PACK = "AwsSolutions"
LAMBDA_BASIC_EXECUTION = (
    "Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
)
API_GATEWAY_LOGS = (
    "Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs"
)


def _acknowledge(scope: IConstruct, rule: str, reason: str) -> None:
    cdk.Validations.of(scope).acknowledge(cdk.Acknowledgment(id=f"{PACK}::{PACK}-{rule}", reason=reason))


def acknowledge_findings(stack: LlmqStack) -> None:
    for function in stack.functions.values():
        _acknowledge_function(function, jobs_table_arn_token=stack.tables.jobs.table_arn)
    _acknowledge(
        stack.provider_secret.secret,
        "SMG4",
        "The provider API key is issued by an external LLM provider; no rotation Lambda can mint a "
        "new one. Operators rotate it with put-secret-value; the worker re-reads it every 5 minutes.",
    )
    _acknowledge_api(stack.api.rest_api)
    bucket = cdk.Stack.of(stack).resolve(stack.tables.payloads.bucket_arn)["Fn::GetAtt"][0]
    for function in (stack.api.function, stack.worker.worker):
        _acknowledge(
            function,
            f"IAM5[Resource::<{bucket}.Arn>/*]",
            "Get and Put on the payload bucket's objects: each job's input and result has its own key "
            "(inputs/<job>/, results/<job>/), unknown until the job exists; no list, no delete.",
        )
    _acknowledge(
        stack.tables.payloads,
        "S1",
        "The bucket holds only oversized job payloads, read and written by two function roles; "
        "CloudTrail S3 data events are the audit trail where one is required, not access logs.",
    )


def _acknowledge_function(function: lambda_.Function, jobs_table_arn_token: str) -> None:
    _acknowledge(
        function,
        f"IAM4[{LAMBDA_BASIC_EXECUTION}]",
        "AWSLambdaBasicExecutionRole grants only CreateLogGroup, CreateLogStream and PutLogEvents, "
        "which every function needs for its own log group.",
    )
    _acknowledge(
        function,
        "IAM5[Resource::*]",
        "X-Ray PutTraceSegments and PutTelemetryRecords support no resource-level permissions "
        "(tests/infra asserts no other action is granted on '*').",
    )
    resource = cdk.Stack.of(function).resolve(jobs_table_arn_token)["Fn::GetAtt"][0]
    _acknowledge(
        function,
        f"IAM5[Resource::<{resource}.Arn>/index/*]",
        "Query on the jobs table's own GSIs (by_tenant for listing, by_sweep for the reconciler); "
        "the wildcard is limited to this table's indexes and to the explicit actions granted.",
    )


def _acknowledge_api(rest_api: apigw.RestApi) -> None:
    _acknowledge(
        rest_api,
        "APIG2",
        "The api function validates every request with the pydantic models that also generate the "
        "OpenAPI document, and answers problem+json with stable error codes, which a request "
        "validator cannot produce.",
    )
    _acknowledge(
        rest_api,
        "APIG3",
        "No WAF web ACL by default: it costs money at rest and llmq must cost nothing idle. What "
        "bounds abuse today: the stage throttle (limits.stage_rate_per_second and stage_burst, one "
        "ceiling shared by every tenant, answered with 429), the API-key authorizer in front of "
        "every /v1 route, and the api function's body and prompt limits (limits.max_body_bytes, "
        "max_prompt_chars). There is no per-tenant quota, so one tenant can use the whole stage "
        "throttle; attach a web ACL to the stage for a public production deployment.",
    )
    _acknowledge(
        rest_api,
        "APIG4",
        "Only GET /v1/openapi.json is unauthenticated: the contract is public so that integrators can "
        "read it before they hold a key. Every other route uses the API-key authorizer.",
    )
    _acknowledge(
        rest_api,
        "COG4",
        "Integrators are B2B clients holding API keys, not Cognito users: a Lambda REQUEST "
        "authorizer maps the key (stored only as a hash) to the tenant. openapi.json is public.",
    )
    _acknowledge(
        rest_api,
        f"IAM4[{API_GATEWAY_LOGS}]",
        "The account-level role API Gateway needs to write access logs; AWS maintains this policy "
        "for exactly that purpose.",
    )
