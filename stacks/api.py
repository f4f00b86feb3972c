"""The public REST API: a cached REQUEST authorizer in front of the api function."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq import errors
from llmq.config import ApiEnvironment, AuthorizerEnvironment, LlmqConfig
from llmq.job_index import TENANT_INDEX
from llmq.usage_plans import DEFAULT_PLAN as DEFAULT_USAGE_PLAN
from stacks.functions import FunctionDefaults, build_function, function_environment
from stacks.jobs_table import grant_index_query, grant_item_actions
from stacks.lanes import LanesConstruct, grant_send, pascal

STAGE_NAME = "prod"
# The alias API Gateway invokes under SnapStart (the api's) or provisioned concurrency (the
# api's and the authorizer's): LlmqConfig.api.snap_start, api.provisioned_environments.
LIVE_ALIAS = "live"
# Item actions on the table only; its one Query is on the tenant index (GET /v1/jobs).
# BatchGetItem: a batch's count shards and a page of its items' results.
API_TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:BatchGetItem")
# llmq.tenants keys an API key's item `key#<sha256>`: the authorizer may read only those, not
# the `tenant#<id>` items that hold webhook secrets.
API_KEY_ITEM_PREFIX = "key#"
PROBLEM_JSON = "application/problem+json"


# The answers API Gateway gives itself (no function runs), each shaped like the API's own
# errors from the same catalogue entry. A 5xx API Gateway makes is the failure of something
# behind it (the authorizer, the function, its response): 502, or 504 when it was too slow.
# Types: https://docs.aws.amazon.com/apigateway/latest/developerguide/supported-gateway-response-types.html
GATEWAY_PROBLEMS: dict[apigw.ResponseType, errors.ProblemType] = {
    apigw.ResponseType.UNAUTHORIZED: errors.problem_type(errors.Unauthenticated),
    apigw.ResponseType.ACCESS_DENIED: errors.FORBIDDEN,
    apigw.ResponseType.THROTTLED: errors.RATE_LIMITED,
    apigw.ResponseType.QUOTA_EXCEEDED: errors.RATE_LIMITED,
    apigw.ResponseType.REQUEST_TOO_LARGE: errors.problem_type(errors.PayloadTooLarge),
    apigw.ResponseType.INTEGRATION_TIMEOUT: errors.GATEWAY_TIMEOUT,
    apigw.ResponseType.INTEGRATION_FAILURE: errors.BAD_GATEWAY,
    # (the authorizer failed or was throttled: the store behind it busy, its concurrency used up)
    apigw.ResponseType.AUTHORIZER_FAILURE: errors.problem_type(errors.StoreUnavailable),
    # (an authorizer that raised anything but "Unauthorized": on AWS, its table throttled)
    apigw.ResponseType.AUTHORIZER_CONFIGURATION_ERROR: errors.problem_type(errors.StoreUnavailable),
    apigw.ResponseType.DEFAULT_5_XX: errors.BAD_GATEWAY,
}
# Every other 4xx API Gateway makes (a route or method the API does not have is its 403
# "Missing Authentication Token") keeps API Gateway's status; the body names it by this code
# and carries API Gateway's message as `detail`, with no `status` member, which varies.
GATEWAY_REFUSED = errors.ProblemType("gateway_refused", 400, "API Gateway refused the request")
# What a 429 tells the client to wait: the stage's and the usage plans' token buckets refill
# every second.
RETRY_AFTER_SECONDS = 1
# The answers after which the client should come back later rather than at once:
# - THROTTLED and QUOTA_EXCEEDED: the stage's or the tenant's usage plan refused the request;
# - DEFAULT_5XX and INTEGRATION_FAILURE: among others, a Lambda invoke that Lambda refused (its
#   concurrency is used up), which API Gateway answers with a 5xx, never with a 429
#   (https://docs.aws.amazon.com/lambda/latest/dg/services-apigateway-errors.html): reported
#   as either type (an API that customises INTEGRATION_FAILURE, as llmq does, gets that one),
#   so both say when to come back;
# - AUTHORIZER_FAILURE and AUTHORIZER_CONFIGURATION_ERROR: the authorizer failed (its table
#   throttled past its retries) or could not be invoked (throttled at its concurrency).
RETRY_AFTER_RESPONSES = frozenset(
    response.response_type
    for response in (
        apigw.ResponseType.THROTTLED,
        apigw.ResponseType.QUOTA_EXCEEDED,
        apigw.ResponseType.DEFAULT_5_XX,
        apigw.ResponseType.INTEGRATION_FAILURE,
        apigw.ResponseType.AUTHORIZER_FAILURE,
        apigw.ResponseType.AUTHORIZER_CONFIGURATION_ERROR,
    )
)
# tier -> usage plan id, read by `llmq tenants` and the sandbox; "*" (DEFAULT_USAGE_PLAN) for
# the plan of tiers without one.
USAGE_PLAN_IDS_OUTPUT = "UsagePlanIds"


def _problem_template(entry: errors.ProblemType, *, with_status: bool = True) -> str:
    # $context.error.messageString is already a quoted JSON string.
    fields: dict[str, object] = {"type": entry.type, "title": entry.title}
    if with_status:
        fields["status"] = entry.status
    fields["code"] = entry.code
    return json.dumps(fields)[:-1] + ', "detail": $context.error.messageString}'


@dataclass(frozen=True)
class ApiLogging:
    """Whether the stage logs to CloudWatch, which needs the account's API Gateway CloudWatch role.

    `create_account_role` lets the stack set that role: an account-wide setting of the region
    (AWS::ApiGateway::Account) that replaces any role another team set, so it is opt-in.
    `enabled` alone turns logging on where the account already has the role.
    """

    enabled: bool = False
    create_account_role: bool = False

    @property
    def on(self) -> bool:
        return self.enabled or self.create_account_role


class ApiConstruct(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: LlmqConfig,
        defaults: FunctionDefaults,
        jobs_table: dynamodb.ITable,
        tenants_table: dynamodb.ITable,
        lanes: LanesConstruct,
        webhook_queue: sqs.IQueue,
        logging: ApiLogging,
    ) -> None:
        super().__init__(scope, construct_id)
        self.authorizer_function = build_function(
            self,
            "Authorizer",
            name="authorizer",
            description="llmq: maps a Bearer API key to its tenant and tier",
            sizing=config.api,
            defaults=defaults,
            environment=function_environment(AuthorizerEnvironment, tenants_table=tenants_table.table_name),
        )
        grant_item_actions(
            tenants_table,
            self.authorizer_function,
            "dynamodb:GetItem",
            leading_key_prefix=API_KEY_ITEM_PREFIX,
        )

        self.function = build_function(
            self,
            "Handler",
            name="api",
            description="llmq: the public API v1 (submit, get, list, cancel, redeliver)",
            sizing=config.api,
            defaults=defaults,
            snap_start=config.api.snap_start,
            environment=function_environment(
                ApiEnvironment,
                jobs_table=jobs_table.table_name,
                lane_queue_urls=lanes.queue_urls_json(),
                webhook_queue_url=webhook_queue.queue_url,
            ),
        )
        # No DeleteItem and no Scan: jobs leave only through their TTL.
        grant_item_actions(jobs_table, self.function, *API_TABLE_ACTIONS)
        grant_index_query(jobs_table, self.function, TENANT_INDEX)
        for queue in lanes.queues:
            grant_send(self.function, queue)
        grant_send(self.function, webhook_queue)
        # What API Gateway invokes. SnapStart applies to published versions only: an
        # unqualified ARN runs $LATEST, initialised from scratch. The alias follows each
        # deploy's new version (`current_version` changes with the code and configuration).
        # Provisioned concurrency (`api.provisioned_environments`) is configured on an alias
        # too, for the api and its authorizer alike: both are on every request's path.
        provisioned = config.api.provisioned_environments
        self.invoked: lambda_.IFunction = (
            self._live("HandlerLive", self.function, provisioned)
            if config.api.snap_start or provisioned
            else self.function
        )
        self.authorizer_invoked: lambda_.IFunction = (
            self._live("AuthorizerLive", self.authorizer_function, provisioned)
            if provisioned
            else self.authorizer_function
        )

        self.config = config
        self.logging = logging
        self.rest_api = self._build_rest_api(defaults)
        self._add_routes()
        self._add_problem_responses()
        self.usage_plans = self._add_usage_plans()

    def _live(self, construct_id: str, function: lambda_.Function, provisioned: int) -> lambda_.Alias:
        return lambda_.Alias(
            self,
            construct_id,
            alias_name=LIVE_ALIAS,
            version=function.current_version,
            provisioned_concurrent_executions=provisioned or None,
        )

    def _build_rest_api(self, defaults: FunctionDefaults) -> apigw.RestApi:
        rest_api = apigw.RestApi(
            self,
            "RestApi",
            rest_api_name=f"{cdk.Stack.of(self).stack_name}-api",
            description="llmq: asynchronous job gateway for long-running LLM requests",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            # Every body reaches the api function as the bytes the client sent (base64 in the
            # event). Without a binary media type API Gateway hands the function UTF-8 text
            # with each byte that is not UTF-8 replaced by U+FFFD: a Latin-1 "café" would be
            # accepted as "caf\ufffd", and llmq's "the body is not UTF-8" 400 could never fire.
            # llmq never answers base64, so Accept headers change nothing on the way back.
            binary_media_types=["*/*"],
            # Each tenant's requests are throttled by its usage plan, found through the API key
            # the authorizer returns as usageIdentifierKey: clients never see or send one.
            # https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-api-key-source.html
            api_key_source_type=apigw.ApiKeySourceType.AUTHORIZER,
            # The account-level role is the region's one setting for every API: opt-in only.
            cloud_watch_role=self.logging.create_account_role,
            deploy_options=apigw.StageOptions(
                stage_name=STAGE_NAME,
                # Stage-wide ceilings that protect the account.
                throttling_rate_limit=self.config.limits.stage_rate_per_second,
                throttling_burst_limit=self.config.limits.stage_burst,
                data_trace_enabled=False,
                metrics_enabled=True,
                tracing_enabled=True,
                **self._log_options(defaults),
            ),
        )
        if not self.logging.on:
            self._acknowledge_no_logs(rest_api)
        return rest_api

    def _log_options(self, defaults: FunctionDefaults) -> dict[str, Any]:
        """Access logs and error-level execution logs when logging is on. Either one without the
        account's CloudWatch role fails the stage's deployment, so with logging off neither is set.
        https://docs.aws.amazon.com/apigateway/latest/developerguide/set-up-logging.html
        """
        if not self.logging.on:
            return {"logging_level": apigw.MethodLoggingLevel.OFF}
        access_logs = logs.LogGroup(
            self, "AccessLogs", retention=defaults.log_retention, removal_policy=cdk.RemovalPolicy.DESTROY
        )
        return {
            "access_log_destination": apigw.LogGroupLogDestination(access_logs),
            "access_log_format": apigw.AccessLogFormat.json_with_standard_fields(
                caller=False,
                http_method=True,
                ip=True,
                protocol=True,
                request_time=True,
                resource_path=True,
                response_length=True,
                status=True,
                user=True,
            ),
            # Errors only, and never request or response bodies: they hold prompts and outputs.
            "logging_level": apigw.MethodLoggingLevel.ERROR,
        }

    @staticmethod
    def _acknowledge_no_logs(rest_api: apigw.RestApi) -> None:
        reason = (
            "API Gateway writes access and execution logs only through the account-level "
            "CloudWatch role of the region, and a stage that asks for logs without one fails to "
            "deploy. Setting that role replaces any other team's, so llmq leaves logging off "
            "unless the operator opts in (-c llmq:apigw_logging=true where the account has the "
            "role, -c llmq:apigw_cloudwatch_role=true to let the stack set it). Without them the "
            "API is watched through its CloudWatch metrics, X-Ray traces and the api function's "
            "own logs."
        )
        for rule in ("APIG1", "APIG6"):
            cdk.Validations.of(rest_api).acknowledge(
                cdk.Acknowledgment(id=f"AwsSolutions::AwsSolutions-{rule}", reason=reason)
            )

    def _add_routes(self) -> None:
        authorizer = apigw.RequestAuthorizer(
            self,
            "RequestAuthorizer",
            handler=self.authorizer_invoked,
            identity_sources=[apigw.IdentitySource.header("Authorization")],
            # A revoked key keeps working for at most this long; one GetItem per key per TTL.
            results_cache_ttl=cdk.Duration.seconds(self.config.limits.authorizer_cache_seconds),
        )
        integration = apigw.LambdaIntegration(self.invoked, allow_test_invoke=False)
        v1 = self.rest_api.root.add_resource("v1")
        v1.add_proxy(
            default_integration=integration,
            any_method=True,
            default_method_options=apigw.MethodOptions(
                authorizer=authorizer,
                authorization_type=apigw.AuthorizationType.CUSTOM,
                # Usage plans throttle only the methods that require an API key; the key comes
                # from the authorizer (key source AUTHORIZER), never from the client.
                api_key_required=True,
            ),
        )
        # The contract itself is public: an integrator reads it before holding a key.
        v1.add_resource("openapi.json").add_method(
            "GET", integration, authorization_type=apigw.AuthorizationType.NONE
        )

    def _add_problem_responses(self) -> None:
        headers = {"Content-Type": f"'{PROBLEM_JSON}'"}
        for response_type, entry in GATEWAY_PROBLEMS.items():
            extra = (
                {"Retry-After": f"'{RETRY_AFTER_SECONDS}'"}
                if response_type.response_type in RETRY_AFTER_RESPONSES
                else {}
            )
            self.rest_api.add_gateway_response(
                response_type.response_type,
                type=response_type,
                status_code=str(entry.status),
                response_headers={**headers, **extra},
                templates={"application/json": _problem_template(entry)},
            )
        self.rest_api.add_gateway_response(
            apigw.ResponseType.DEFAULT_4_XX.response_type,
            type=apigw.ResponseType.DEFAULT_4_XX,
            response_headers=headers,
            templates={"application/json": _problem_template(GATEWAY_REFUSED, with_status=False)},
        )

    def _add_usage_plans(self) -> dict[str, apigw.UsagePlan]:
        """One usage plan per tier, and one for tiers the config does not list, on the stage.

        Each throttles every tenant key in it on its own token bucket (rate a second, bucket
        of `burst`); `llmq tenants create` adds a tenant's key to its tier's plan and
        `llmq tenants set-limits --rate` moves it to a plan of its own. Changing a tier's
        limits in LlmqConfig and deploying changes its plan for every tenant in it.
        https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-api-usage-plans.html
        """
        stack = cdk.Stack.of(self)
        tiers: dict[str, Any] = {
            tier: self.config.tenant_limits(tier) for tier in self.config.fair_share.tiers
        }
        tiers[DEFAULT_USAGE_PLAN] = self.config.fair_share.default
        plans: dict[str, apigw.UsagePlan] = {}
        for tier, limits in tiers.items():
            label = "Default" if tier == DEFAULT_USAGE_PLAN else pascal(tier)
            plans[tier] = self.rest_api.add_usage_plan(
                f"UsagePlan{label}",
                name=f"{stack.stack_name}-{'default' if tier == DEFAULT_USAGE_PLAN else tier}",
                description=(
                    f"llmq: request rate of each {tier} tenant"
                    if tier != DEFAULT_USAGE_PLAN
                    else "llmq: request rate of each tenant of a tier without a plan of its own"
                ),
                throttle=apigw.ThrottleSettings(rate_limit=limits.rate_per_second, burst_limit=limits.burst),
                api_stages=[
                    apigw.UsagePlanPerApiStage(api=self.rest_api, stage=self.rest_api.deployment_stage)
                ],
            )
        cdk.CfnOutput(
            stack,
            USAGE_PLAN_IDS_OUTPUT,
            value=stack.to_json_string({tier: plan.usage_plan_id for tier, plan in plans.items()}),
            description="llmq: the usage plan id of each tier ('*': tiers without one), for llmq tenants",
        )
        return plans

    @property
    def url(self) -> str:
        """The stage URL, built without a reference to the Stage resource (moto does not create one)."""
        stack = cdk.Stack.of(self)
        return (
            f"https://{self.rest_api.rest_api_id}.execute-api.{stack.region}.{stack.url_suffix}/{STAGE_NAME}/"
        )
