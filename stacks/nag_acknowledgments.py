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

from llmq.batch_results import RESULTS_FILE_PREFIX
from stacks.jobs_table import (
    BATCH_REQUESTS_PREFIX,
    INPUTS_PREFIX,
    PARKED_PREFIX,
    RESULTS_PREFIX,
    UPLOADS_PREFIX,
)

if TYPE_CHECKING:
    from stacks.llmq_stack import LlmqStack

PACK = "AwsSolutions"
API_GATEWAY_LOGS = (
    "Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs"
)


def _acknowledge(scope: IConstruct, rule: str, reason: str) -> None:
    cdk.Validations.of(scope).acknowledge(cdk.Acknowledgment(id=f"{PACK}::{PACK}-{rule}", reason=reason))


def acknowledge_findings(stack: LlmqStack) -> None:
    for function in stack.functions.values():
        _acknowledge_function(function)
    _acknowledge(
        stack.provider_secret.secret,
        "SMG4",
        "The provider API key is issued by an external LLM provider; no rotation Lambda can mint a "
        "new one. Operators rotate it with put-secret-value; the worker caches it for at most "
        "5 minutes (max_age=300) and reads it again at once when the provider refuses it.",
    )
    _acknowledge_api(stack.api.rest_api)
    bucket = cdk.Stack.of(stack).resolve(stack.tables.payloads.bucket_arn)["Fn::GetAtt"][0]
    for function in (stack.api.function, stack.worker.worker):
        for prefix in (INPUTS_PREFIX, RESULTS_PREFIX):
            _acknowledge(
                _role(function),
                f"IAM5[Resource::<{bucket}.Arn>/{prefix}*]",
                f"One object action on the payload bucket's {prefix} prefix: each job's objects have "
                f"their own key ({prefix}<job>/...), unknown until the job exists. The api puts "
                f"inputs and gets results, the worker the reverse; no list, no delete.",
            )
    for function in (stack.api.function, stack.worker.worker):
        _acknowledge(
            _role(function),
            f"IAM5[Resource::<{bucket}.Arn>/{BATCH_REQUESTS_PREFIX}*]",
            f"One object action on the payload bucket's {BATCH_REQUESTS_PREFIX} prefix: each batch's "
            f"requests have their own key ({BATCH_REQUESTS_PREFIX}<batch>/...), unknown until the batch "
            "exists. The worker stores an uploaded file's validated parts, the api reads them back to "
            "name a running batch's items not yet written; no list, no delete.",
        )
    _acknowledge(
        _role(stack.worker.worker),
        f"IAM5[Resource::<{bucket}.Arn>/{RESULTS_FILE_PREFIX}*]",
        f"GetObject on the payload bucket's {RESULTS_FILE_PREFIX} prefix, for HeadObject: each batch's "
        f"results file has its own key ({RESULTS_FILE_PREFIX}<batch>/...), unknown until the batch "
        "exists. The worker looks whether a file whose upload is gone was completed; no list, no delete.",
    )
    for function in (stack.worker.worker, stack.reconciler.function, stack.worker.dead_letter):
        _acknowledge(
            _role(function),
            f"IAM5[Resource::<{bucket}.Arn>/{PARKED_PREFIX}*]",
            f"GetObject on the payload bucket's {PARKED_PREFIX} prefix: a paid result whose write to its "
            f"job failed waits at {PARKED_PREFIX}<job>/..., unknown until the job exists, for the job's "
            "next attempt to record, or whatever ends the job without another run (the reconciler, "
            "the dead-letter function); no list, no delete.",
        )
    _acknowledge(
        _role(stack.api.function),
        f"IAM5[Resource::<{bucket}.Arn>/{UPLOADS_PREFIX}*]",
        f"GetObject on the payload bucket's {UPLOADS_PREFIX} prefix, for HeadObject: each upload has "
        f"its own key ({UPLOADS_PREFIX}<tenant>/<upload>), unknown until the tenant asks for it. The api "
        "checks an uploaded file's size and version before a batch names it; no list, no delete.",
    )
    _acknowledge(
        stack.tables.payloads,
        "S1",
        "The bucket holds only oversized job payloads, read and written by two function roles "
        "(api and worker), and parked results read by two more (reconciler and dead_letter); "
        "CloudTrail S3 data events are the audit trail where one is required, not access logs.",
    )


def _role(function: lambda_.Function) -> IConstruct:
    """The function's execution role: a sibling of the function (stacks/functions.py)."""
    if function.role is None:
        raise ValueError(f"{function.node.path} has no execution role")
    return function.role


def _acknowledge_function(function: lambda_.Function) -> None:
    _acknowledge(
        _role(function),
        "IAM5[Resource::*]",
        "X-Ray PutTraceSegments and PutTelemetryRecords (active tracing) support no resource-level "
        "permissions; no other action is granted on '*' (tests/infra checks it).",
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
        "bounds abuse instead: the stage throttle (limits.stage_rate_per_second and "
        "limits.stage_burst, one ceiling shared by every tenant, answered with 429), the API-key "
        "authorizer on every /v1 route but GET /v1/openapi.json, and the api function's request "
        "limits (limits.max_body_bytes, limits.max_prompt_chars). Attach a web ACL to the stage "
        "for a public production deployment.",
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
        "Only when the operator opts in to the account's API Gateway CloudWatch role "
        "(llmq:apigw_cloudwatch_role): the one role API Gateway uses to write logs, with the "
        "policy AWS maintains for exactly that purpose.",
    )
