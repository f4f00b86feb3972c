"""The public REST API: a cached REQUEST authorizer in front of the api function."""

from __future__ import annotations

import json

import aws_cdk as cdk
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq import errors
from llmq.config import ApiEnvironment, AuthorizerEnvironment, LlmqConfig
from stacks.functions import FunctionDefaults, build_function, function_environment
from stacks.lanes import LanesConstruct

STAGE_NAME = "prod"
API_TABLE_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:Query",
    "dynamodb:ConditionCheckItem",
)
PROBLEM_JSON = "application/problem+json"


# The answers API Gateway gives itself (no function runs), each shaped like the API's own
# errors from the same catalogue entry. DEFAULT_5XX takes one status: every 5xx API Gateway
# makes is the failure of something behind it (the authorizer, the function, its response).
GATEWAY_PROBLEMS: dict[apigw.ResponseType, errors.ProblemType] = {
    apigw.ResponseType.UNAUTHORIZED: errors.problem_type(errors.Unauthenticated),
    apigw.ResponseType.ACCESS_DENIED: errors.FORBIDDEN,
    apigw.ResponseType.THROTTLED: errors.RATE_LIMITED,
    apigw.ResponseType.REQUEST_TOO_LARGE: errors.problem_type(errors.PayloadTooLarge),
    apigw.ResponseType.INTEGRATION_TIMEOUT: errors.GATEWAY_TIMEOUT,
    apigw.ResponseType.DEFAULT_5_XX: errors.BAD_GATEWAY,
}


def _problem_template(entry: errors.ProblemType) -> str:
    # $context.error.messageString is already a quoted JSON string.
    body = json.dumps({"type": entry.type, "title": entry.title, "status": entry.status, "code": entry.code})
    return body[:-1] + ', "detail": $context.error.messageString}'


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
        tenants_table.grant(self.authorizer_function, "dynamodb:GetItem")

        self.function = build_function(
            self,
            "Handler",
            name="api",
            description="llmq: the public API v1 (submit, get, list, cancel, redeliver)",
            sizing=config.api,
            defaults=defaults,
            environment=function_environment(
                ApiEnvironment,
                jobs_table=jobs_table.table_name,
                lane_queue_urls=lanes.queue_urls_json(),
                webhook_queue_url=webhook_queue.queue_url,
            ),
        )
        # No DeleteItem and no Scan: jobs leave only through their TTL.
        jobs_table.grant(self.function, *API_TABLE_ACTIONS)
        for queue in lanes.queues:
            queue.grant_send_messages(self.function)
        webhook_queue.grant_send_messages(self.function)

        self.config = config
        self.rest_api = self._build_rest_api(defaults)
        self._add_routes()
        self._add_problem_responses()

    def _build_rest_api(self, defaults: FunctionDefaults) -> apigw.RestApi:
        access_logs = logs.LogGroup(
            self, "AccessLogs", retention=defaults.log_retention, removal_policy=cdk.RemovalPolicy.DESTROY
        )
        return apigw.RestApi(
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
            # Access logs need the account-level CloudWatch role for API Gateway.
            cloud_watch_role=True,
            deploy_options=apigw.StageOptions(
                stage_name=STAGE_NAME,
                # Stage-wide ceilings that protect the account (per-tenant quotas are not built yet).
                throttling_rate_limit=self.config.limits.stage_rate_per_second,
                throttling_burst_limit=self.config.limits.stage_burst,
                access_log_destination=apigw.LogGroupLogDestination(access_logs),
                access_log_format=apigw.AccessLogFormat.json_with_standard_fields(
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
                logging_level=apigw.MethodLoggingLevel.ERROR,
                data_trace_enabled=False,
                metrics_enabled=True,
                tracing_enabled=True,
            ),
        )

    def _add_routes(self) -> None:
        authorizer = apigw.RequestAuthorizer(
            self,
            "RequestAuthorizer",
            handler=self.authorizer_function,
            identity_sources=[apigw.IdentitySource.header("Authorization")],
            # A revoked key keeps working for at most this long; one GetItem per key per TTL.
            results_cache_ttl=cdk.Duration.seconds(self.config.limits.authorizer_cache_seconds),
        )
        integration = apigw.LambdaIntegration(self.function, allow_test_invoke=False)
        v1 = self.rest_api.root.add_resource("v1")
        v1.add_proxy(
            default_integration=integration,
            any_method=True,
            default_method_options=apigw.MethodOptions(
                authorizer=authorizer, authorization_type=apigw.AuthorizationType.CUSTOM
            ),
        )
        # The contract itself is public: an integrator reads it before holding a key.
        v1.add_resource("openapi.json").add_method(
            "GET", integration, authorization_type=apigw.AuthorizationType.NONE
        )

    def _add_problem_responses(self) -> None:
        headers = {"Content-Type": f"'{PROBLEM_JSON}'"}
        for response_type, entry in GATEWAY_PROBLEMS.items():
            self.rest_api.add_gateway_response(
                response_type.response_type,
                type=response_type,
                status_code=str(entry.status),
                response_headers=headers,
                templates={"application/json": _problem_template(entry)},
            )

    @property
    def url(self) -> str:
        """The stage URL, built without a reference to the Stage resource (moto does not create one)."""
        stack = cdk.Stack.of(self)
        return (
            f"https://{self.rest_api.rest_api_id}.execute-api.{stack.region}.{stack.url_suffix}/{STAGE_NAME}/"
        )
