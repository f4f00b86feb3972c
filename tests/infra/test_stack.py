"""The default llmq stack: the properties that keep jobs safe, bounded and observable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmq.config import GATEWAY_TIMEOUT_SECONDS, DispatcherEnvironment, LlmqConfig, WorkerEnvironment
from llmq.errors import PROBLEMS
from llmq.job_index import SWEEP_INDEX, TENANT_INDEX
from llmq.telemetry import METRICS_NAMESPACE, MetricName
from stacks.functions import FUNCTION_NAMES, FUNCTIONS_DIR
from stacks.runtime import LAMBDA_ARCHITECTURE, LAMBDA_PYTHON_VERSION
from tests.aws_calls import load_catalogue
from tests.infra.api_permissions import unpermitted_routes
from tests.infra.iam_grants import missing_grants
from tests.infra.synthesis import ENV_MODELS, SynthesizedApp, function_concurrency_bounds, synthesize

BASE_VARIABLES = {
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    "LOG_LEVEL",
    "PYDANTIC_DISABLE_PLUGINS",
}


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(LlmqConfig(), outdir=tmp_path_factory.mktemp("cdk-default"))


@pytest.fixture(scope="module")
def config(synthesized: SynthesizedApp) -> LlmqConfig:
    return synthesized.config


# ---- lanes ---------------------------------------------------------------------------


def test_every_lane_has_a_queue_whose_visibility_timeout_outlasts_six_worker_runs(synthesized, config):
    # Given the default lanes, When synthesized
    lanes = synthesized.template.lane_queues()

    # Then each configured lane has a queue, and none can reappear while a worker still runs it
    assert set(lanes) == {lane.name for lane in config.lanes}
    worker_timeout = synthesized.template.function("worker")[1]["Properties"]["Timeout"]
    for _, queue in lanes.values():
        assert queue["Properties"]["VisibilityTimeout"] >= 6 * worker_timeout


def test_every_lane_queue_redrives_to_its_own_dlq_after_more_receives_than_attempts(synthesized, config):
    dlq_targets = []
    for lane, (_, queue) in synthesized.template.lane_queues().items():
        redrive = queue["Properties"]["RedrivePolicy"]
        assert redrive["maxReceiveCount"] == config.max_receive_count
        assert redrive["maxReceiveCount"] > config.max_attempts
        dlq_id = redrive["deadLetterTargetArn"]["Fn::GetAtt"][0]
        dlq = synthesized.template.resources[dlq_id]
        # The DLQ belongs to the same lane and keeps its evidence for the SQS maximum.
        assert synthesized.template.tag(dlq, "llmq:lane") == lane
        assert dlq["Properties"]["MessageRetentionPeriod"] == 14 * 86_400
        dlq_targets.append(dlq_id)
    assert len(set(dlq_targets)) == len(dlq_targets), "lanes must not share a DLQ"


def test_every_queue_is_encrypted_and_refuses_plain_http(synthesized):
    queues = synthesized.template.of_type("AWS::SQS::Queue")
    policies = synthesized.template.of_type("AWS::SQS::QueuePolicy").values()
    for logical_id, queue in queues.items():
        assert queue["Properties"]["SqsManagedSseEnabled"] is True
        denies_http = [
            statement
            for policy in policies
            if {"Ref": logical_id} in policy["Properties"]["Queues"]
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]
            if statement["Effect"] == "Deny"
            and statement.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
        ]
        assert denies_http, f"{logical_id} accepts requests without TLS"


# ---- worker --------------------------------------------------------------------------


def test_worker_has_one_mapping_per_lane_with_its_concurrency_and_partial_batch_responses(
    synthesized, config
):
    template = synthesized.template
    mappings = {
        mapping["EventSourceArn"]["Fn::GetAtt"][0]: mapping
        for mapping in template.event_source_mappings("worker")
    }
    for lane, (queue_id, _) in template.lane_queues().items():
        mapping = mappings[queue_id]
        lane_config = config.lanes_by_name[lane]
        assert mapping["ScalingConfig"]["MaximumConcurrency"] == lane_config.max_concurrency
        assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert mapping["BatchSize"] == lane_config.batch_size
    # The worker consumes the lanes and nothing else.
    assert set(mappings) == {queue_id for queue_id, _ in template.lane_queues().values()}


def test_worker_reserved_concurrency_covers_every_lane_at_once(synthesized, config):
    worker = synthesized.template.function("worker")[1]["Properties"]
    assert worker["ReservedConcurrentExecutions"] >= sum(lane.max_concurrency for lane in config.lanes)


def test_every_function_reserves_its_line_of_the_concurrency_budget(synthesized, config):
    """Reserved concurrency caps a function and sets that much of the account's quota aside;
    Lambda keeps 100 of the regional quota (1,000 by default) unreserved
    (https://docs.aws.amazon.com/lambda/latest/dg/configuration-concurrency.html)."""
    # Given the default config, When synthesized
    bounds = function_concurrency_bounds(synthesized.template)
    reserved = {
        name: synthesized.template.function(name)[1]["Properties"].get("ReservedConcurrentExecutions")
        for name in FUNCTION_NAMES
    }

    # Then no function can take more than its share, a flood of long-polls included
    assert all(bound is not None and bound > 0 for bound in bounds.values()), bounds
    # And each reservation is the config's budget, which fits the default quota beside the 100
    assert reserved == config.reserved_concurrency
    assert reserved["api"] >= 20 and reserved["authorizer"] >= 20
    assert sum(config.reserved_concurrency.values()) + 100 <= 1000


def test_the_api_function_ends_before_api_gateway_gives_up(synthesized):
    """API Gateway waits at most 29 s for a REST integration
    (https://docs.aws.amazon.com/apigateway/latest/developerguide/limits.html)."""
    api = synthesized.template.function("api")[1]["Properties"]
    assert api["Timeout"] <= GATEWAY_TIMEOUT_SECONDS


def test_by_default_api_gateway_invokes_the_api_function_itself_without_snap_start(synthesized):
    # SnapStart is opt-in (its cache and restores are billed): no version, no alias
    api_id, api = synthesized.template.function("api")
    assert "SnapStart" not in api["Properties"]
    assert not synthesized.template.of_type("AWS::Lambda::Alias")
    for method in synthesized.template.of_type("AWS::ApiGateway::Method").values():
        assert (
            synthesized.template.referenced(
                method["Properties"]["Integration"]["Uri"], "AWS::Lambda::Function"
            )
            == api_id
        )


def test_every_route_the_gateway_invokes_is_allowed_by_a_permission_of_its_target(synthesized):
    # (moto does not evaluate Lambda permissions: AWS would answer such a route 500)
    assert unpermitted_routes(synthesized.template) == []
    assert synthesized.template.of_type("AWS::ApiGateway::Method")


def test_a_config_cannot_give_the_api_more_time_than_api_gateway_waits():
    with pytest.raises(ValueError, match="integration timeout"):
        LlmqConfig.model_validate({"api": {"timeout_seconds": 30}})
    # A sizing that names only the memory keeps a timeout the gateway allows.
    assert (
        LlmqConfig.model_validate({"api": {"memory_mb": 512}}).api.timeout_seconds < GATEWAY_TIMEOUT_SECONDS
    )


def test_dead_letter_function_drains_every_lane_dlq_with_partial_batch_responses(synthesized):
    template = synthesized.template
    lane_dlqs = {
        queue["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
        for _, queue in template.lane_queues().values()
    }
    mappings = template.event_source_mappings("dead_letter")
    assert {mapping["EventSourceArn"]["Fn::GetAtt"][0] for mapping in mappings} == lane_dlqs
    assert all(mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"] for mapping in mappings)
    # Lambda rejects a mapping whose queue could reappear before the function times out.
    timeout = template.function("dead_letter")[1]["Properties"]["Timeout"]
    for dlq_id in lane_dlqs:
        assert template.resources[dlq_id]["Properties"]["VisibilityTimeout"] >= 6 * timeout


def test_dispatcher_consumes_the_webhook_queue_whose_redrive_outlasts_the_retry_schedule(synthesized, config):
    template = synthesized.template
    (mapping,) = template.event_source_mappings("webhook_dispatcher")
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    queue = template.resources[mapping["EventSourceArn"]["Fn::GetAtt"][0]]["Properties"]
    timeout = template.function("webhook_dispatcher")[1]["Properties"]["Timeout"]
    assert queue["VisibilityTimeout"] >= 6 * timeout
    # Every scheduled retry is one more receive: the DLQ must not cut the schedule short.
    assert queue["RedrivePolicy"]["maxReceiveCount"] > len(config.webhooks.schedule_seconds) + 1


def test_every_queue_mapping_is_bounded_so_a_backlog_cannot_take_the_account_concurrency(synthesized):
    # Given the default stack, When its SQS event source mappings are read
    mappings = synthesized.template.queue_event_source_mappings()

    # Then none is unbounded: each sets a MaximumConcurrency that Lambda accepts
    # (every mapping of this stack reads a queue: the filter must not hide one)
    assert set(mappings) == set(synthesized.template.of_type("AWS::Lambda::EventSourceMapping"))
    for logical_id, mapping in mappings.items():
        bound = mapping.get("ScalingConfig", {}).get("MaximumConcurrency")
        assert isinstance(bound, int) and 2 <= bound <= 1000, f"{logical_id}: MaximumConcurrency {bound!r}"


def test_dispatcher_concurrency_comes_from_the_webhook_config(synthesized, config):
    # Given a receiver outage that leaves a backlog of webhooks, the dispatcher drains it at most
    # this many batches at once
    (mapping,) = synthesized.template.event_source_mappings("webhook_dispatcher")
    assert mapping["ScalingConfig"]["MaximumConcurrency"] == config.webhooks.max_concurrency


# ---- tables --------------------------------------------------------------------------


def test_jobs_table_is_on_demand_with_ttl_pitr_and_both_indexes(synthesized):
    (table,) = [
        resource["Properties"]
        for resource in synthesized.template.of_type("AWS::DynamoDB::Table").values()
        if "GlobalSecondaryIndexes" in resource["Properties"]
    ]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert table["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    indexes = {index["IndexName"]: index for index in table["GlobalSecondaryIndexes"]}
    assert indexes[TENANT_INDEX]["KeySchema"] == [
        {"AttributeName": "tenant_id", "KeyType": "HASH"},
        {"AttributeName": "tenant_created", "KeyType": "RANGE"},
    ]
    # Only what a listed Job shows (tests/infra/test_tenant_index.py): never the input.
    assert indexes[TENANT_INDEX]["Projection"]["ProjectionType"] == "INCLUDE"
    assert "input" not in indexes[TENANT_INDEX]["Projection"]["NonKeyAttributes"]
    assert indexes[SWEEP_INDEX]["KeySchema"] == [
        {"AttributeName": "sweep_pk", "KeyType": "HASH"},
        {"AttributeName": "sweep_at", "KeyType": "RANGE"},
    ]
    # The reconciler reads these from the index without a GetItem per job.
    projection = indexes[SWEEP_INDEX]["Projection"]
    assert projection["ProjectionType"] == "INCLUDE"
    assert {"status", "lane", "delivery_status", "deadline_ms"} <= set(projection["NonKeyAttributes"])
    types = {item["AttributeName"]: item["AttributeType"] for item in table["AttributeDefinitions"]}
    assert types == {"pk": "S", "tenant_id": "S", "tenant_created": "S", "sweep_pk": "S", "sweep_at": "N"}


def test_tables_and_secret_survive_a_stack_deletion(synthesized):
    template = synthesized.template
    for logical_id, table in template.of_type("AWS::DynamoDB::Table").items():
        assert table["DeletionPolicy"] == "Retain", logical_id
        assert table["Properties"]["DeletionProtectionEnabled"] is True
        assert table["Properties"]["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    # The bucket and the secret too, except when the create that made them rolls back: a
    # failed first deploy leaves no stray secret or bucket in the account on each attempt.
    for kind in ("AWS::SecretsManager::Secret", "AWS::S3::Bucket"):
        for logical_id, resource in template.of_type(kind).items():
            assert resource["DeletionPolicy"] == "RetainExceptOnCreate", logical_id


# ---- functions -----------------------------------------------------------------------


def test_every_function_runs_on_arm64_with_the_powertools_runtime(synthesized):
    functions = synthesized.template.functions()
    assert set(functions) == set(FUNCTION_NAMES)
    for name, (_, resource) in functions.items():
        properties = resource["Properties"]
        assert properties["Architectures"] == [LAMBDA_ARCHITECTURE], name
        assert properties["Runtime"] == f"python{LAMBDA_PYTHON_VERSION}", name
        assert properties["Handler"] == "handler.handler", name
        assert len(properties["Layers"]) == 2, name
    layers = synthesized.template.of_type("AWS::Lambda::LayerVersion").values()
    assert [layer["Properties"]["CompatibleArchitectures"] for layer in layers] == [[LAMBDA_ARCHITECTURE]] * 2


def _longest(value: object) -> int:
    """A variable's value at its longest once deployed: a resource's name, URL or ARN counted
    at the config's bound for one (`llmq.config._RESOURCE_VALUE_BYTES`)."""
    from llmq.config import _RESOURCE_VALUE_BYTES

    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return len(separator) * max(0, len(parts) - 1) + sum(_longest(part) for part in parts)
    return _RESOURCE_VALUE_BYTES


@pytest.mark.parametrize(
    "context",
    [
        {},
        {
            "lanes": [
                {"name": "high", "tiers": ["enterprise"], "max_concurrency": 8},
                {"name": "standard", "tiers": ["pro", "team"], "max_concurrency": 4},
                {"name": "low", "tiers": ["free"], "max_concurrency": 2},
            ],
            "provider": {
                "default_model": "vendor/model-00",
                "models": [f"vendor/model-{index:02d}" for index in range(60)],
            },
        },
    ],
    ids=["defaults", "three lanes, sixty models"],
)
def test_every_functions_environment_fits_the_size_the_config_allows_for(tmp_path_factory, context):
    # Lambda refuses a function whose variables pass 4 KB (the sandbox's moto does not): the
    # config refuses one whose estimate does, and the estimate holds on the real template
    config = LlmqConfig.model_validate(context)
    app = synthesize(config, outdir=tmp_path_factory.mktemp("cdk-env"))
    for name, (_, resource) in app.template.functions().items():
        variables = resource["Properties"]["Environment"]["Variables"]
        size = sum(len(key) + _longest(value) for key, value in variables.items())
        assert size <= config.function_environment_bytes <= 4096, name


def test_a_config_too_large_for_lambdas_environment_is_refused_at_synth():
    models = [f"openrouter-vendor-{index:03d}/model-name-instruct-v{index}" for index in range(90)]
    with pytest.raises(ValueError, match="Lambda refuses more than 4096"):
        LlmqConfig.model_validate({"provider": {"default_model": models[0], "models": models}})


def test_every_function_logs_to_a_group_an_operator_can_name(synthesized):
    # docs/operations.md tells an operator to `aws logs tail /llmq/<stack>/<function>`: a
    # generated name would leave every command of the runbook pointing at nothing.
    groups = synthesized.template.of_type("AWS::Logs::LogGroup")
    for name, (_, resource) in synthesized.template.functions().items():
        group_id = resource["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
        assert groups[group_id]["Properties"]["LogGroupName"] == f"/llmq/Llmq/{name}", name
        # (an update that renames it keeps the old group's logs, to age out by their retention)
        assert (groups[group_id]["DeletionPolicy"], groups[group_id]["UpdateReplacePolicy"]) == (
            "Delete",
            "Retain",
        )


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_function_code_asset_is_only_its_own_folder(synthesized, name):
    code = synthesized.template.function(name)[1]["Properties"]["Code"]
    asset_dir = synthesized.assembly_dir / f"asset.{code['S3Key'].removesuffix('.zip')}"
    shipped = {path.relative_to(asset_dir) for path in asset_dir.rglob("*") if path.is_file()}
    source = FUNCTIONS_DIR / name
    expected = {
        path.relative_to(source)
        for path in source.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert shipped == expected


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_function_environment_parses_with_the_model_its_handler_loads(synthesized, config, name):
    # Given the environment the stack gives the function, with CloudFormation tokens filled in
    environ = synthesized.template.environment(name)
    model = ENV_MODELS[name]

    # When the handler loads it at cold start
    loaded = model.load(environ, function_name=name)

    # Then it validates, carries the stack's config, and holds no variable the model ignores
    assert loaded.config == config
    declared = {field.alias or field_name for field_name, field in model.model_fields.items()}
    assert set(environ) - BASE_VARIABLES <= declared
    assert environ["POWERTOOLS_SERVICE_NAME"] == synthesized.service
    assert environ["POWERTOOLS_METRICS_NAMESPACE"] == METRICS_NAMESPACE
    # (no cold start pays for pydantic's scan of every distribution for plugins)
    assert environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__"


def test_worker_and_dispatcher_get_their_optional_variables(synthesized, config):
    worker = WorkerEnvironment.load(synthesized.template.environment("worker"))
    assert worker.provider_secret_id
    assert set(worker.lane_queue_urls) == {lane.name for lane in config.lanes}
    dispatcher = DispatcherEnvironment.load(synthesized.template.environment("webhook_dispatcher"))
    assert dispatcher.public_api_url.startswith("https://")


def test_reconciler_runs_on_the_configured_schedule(synthesized, config):
    (rule,) = synthesized.template.of_type("AWS::Events::Rule").values()
    minutes = config.reconciler.schedule_minutes
    assert rule["Properties"]["ScheduleExpression"] == f"rate({minutes} minute{'s' if minutes > 1 else ''})"
    reconciler_id, _ = synthesized.template.function("reconciler")
    assert rule["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [reconciler_id, "Arn"]}


def test_a_failed_reconciler_run_is_not_retried_and_lands_in_an_encrypted_queue(synthesized):
    """EventBridge invokes the reconciler asynchronously, and Lambda retries a failed
    asynchronous invocation twice unless told otherwise
    (https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-error-handling.html)."""
    template = synthesized.template
    reconciler_id, _ = template.function("reconciler")
    (invoke_config,) = [
        c["Properties"]
        for c in template.of_type("AWS::Lambda::EventInvokeConfig").values()
        if c["Properties"]["FunctionName"] == {"Ref": reconciler_id}
    ]
    # Then no retry (the next tick is one), and a failed run's record waits in a queue
    assert invoke_config["MaximumRetryAttempts"] == 0
    destination = invoke_config["DestinationConfig"]["OnFailure"]["Destination"]
    queue_id = destination["Fn::GetAtt"][0]
    queue = template.resources[queue_id]
    assert queue["Type"] == "AWS::SQS::Queue"
    assert queue["Properties"]["SqsManagedSseEnabled"] is True
    # And the reconciler may send there
    sends = [
        statement
        for statement in template.statements("reconciler")
        if statement.allows("sqs:SendMessage") and queue_id in json.dumps(statement.resources)
    ]
    assert sends


# ---- least privilege -----------------------------------------------------------------


@pytest.mark.parametrize("action", ["dynamodb:DeleteItem", "dynamodb:Scan", "dynamodb:BatchWriteItem"])
def test_worker_can_neither_delete_nor_scan_jobs(synthesized, action):
    statements = synthesized.template.statements("worker")
    assert statements, "the worker has no policy at all"
    assert not [statement.raw for statement in statements if statement.allows(action)]
    assert not [statement.raw for statement in statements if "NotAction" in statement.raw]
    managed = synthesized.template.managed_policies("worker")
    assert all("AWSLambdaBasicExecutionRole" in arn for arn in managed)


@pytest.mark.parametrize("name", ["api", "authorizer", "reconciler", "dead_letter", "webhook_dispatcher"])
def test_no_other_function_can_delete_jobs_or_scan_a_table(synthesized, name):
    statements = synthesized.template.statements(name)
    for action in ("dynamodb:DeleteItem", "dynamodb:Scan"):
        assert not [statement.raw for statement in statements if statement.allows(action)], (name, action)


def test_api_cannot_receive_from_any_dlq(synthesized):
    template = synthesized.template
    dlqs = template.dlq_ids()
    assert dlqs
    for statement in template.statements("api"):
        if statement.allows("sqs:ReceiveMessage") or statement.allows("sqs:DeleteMessage"):
            targets = set(template.iter_arn_refs(statement.resources))
            assert "*" not in statement.resources
            assert not targets & dlqs, statement.raw


def test_api_can_send_to_every_lane_and_the_webhook_queue(synthesized):
    template = synthesized.template
    sendable = {
        logical_id
        for statement in template.statements("api")
        if statement.allows("sqs:SendMessage")
        for logical_id in template.iter_arn_refs(statement.resources)
    }
    lanes = {queue_id for queue_id, _ in template.lane_queues().values()}
    assert lanes <= sendable
    (dispatcher_mapping,) = template.event_source_mappings("webhook_dispatcher")
    assert dispatcher_mapping["EventSourceArn"]["Fn::GetAtt"][0] in sendable
    assert not sendable & template.dlq_ids()


def test_only_xray_is_granted_on_every_resource(synthesized):
    for name in FUNCTION_NAMES:
        for statement in synthesized.template.statements(name):
            if "*" in statement.resources:
                assert all(action.startswith("xray:") for action in statement.actions), (name, statement.raw)


def test_authorizer_reads_tenants_by_key_only(synthesized):
    actions = {
        action for statement in synthesized.template.statements("authorizer") for action in statement.actions
    }
    assert {action for action in actions if action.startswith("dynamodb:")} == {"dynamodb:GetItem"}


# ---- API -----------------------------------------------------------------------------


def test_api_routes_v1_through_a_cached_request_authorizer_on_the_authorization_header(synthesized):
    template = synthesized.template
    (authorizer_id, authorizer), *_ = template.of_type("AWS::ApiGateway::Authorizer").items()
    properties = authorizer["Properties"]
    assert properties["Type"] == "REQUEST"
    assert properties["IdentitySource"] == "method.request.header.Authorization"
    assert properties["AuthorizerResultTtlInSeconds"] > 0
    methods = template.of_type("AWS::ApiGateway::Method").values()
    proxy = [m["Properties"] for m in methods if m["Properties"]["HttpMethod"] == "ANY"]
    assert proxy and all(m["AuthorizationType"] == "CUSTOM" for m in proxy)
    assert all(m["AuthorizerId"] == {"Ref": authorizer_id} for m in proxy)
    assert all(m["Integration"]["Type"] == "AWS_PROXY" for m in proxy)
    resources = {r["Properties"]["PathPart"] for r in template.of_type("AWS::ApiGateway::Resource").values()}
    assert {"v1", "{proxy+}"} <= resources
    public = [m["Properties"] for m in methods if m["Properties"]["AuthorizationType"] == "NONE"]
    assert len(public) == 1, "only GET /v1/openapi.json is public"


def test_api_stage_is_throttled_and_never_logs_bodies(synthesized):
    (stage,) = synthesized.template.of_type("AWS::ApiGateway::Stage").values()
    properties = stage["Properties"]
    (settings,) = properties["MethodSettings"]
    assert settings["ThrottlingRateLimit"] > 0 and settings["ThrottlingBurstLimit"] > 0
    assert settings["DataTraceEnabled"] is False


def test_the_default_stack_changes_no_account_wide_setting(synthesized):
    """The API Gateway CloudWatch role is one per account and region: AWS::ApiGateway::Account
    replaces whatever role is set (https://docs.aws.amazon.com/apigateway/latest/developerguide/set-up-logging.html),
    and a stage that logs without one fails to deploy, so the default stage does not log."""
    template = synthesized.template
    assert template.of_type("AWS::ApiGateway::Account") == {}
    pushers = [
        logical_id
        for logical_id, role in template.of_type("AWS::IAM::Role").items()
        if "apigateway.amazonaws.com" in json.dumps(role["Properties"]["AssumeRolePolicyDocument"])
    ]
    assert pushers == []
    (stage,) = template.of_type("AWS::ApiGateway::Stage").values()
    assert "AccessLogSetting" not in stage["Properties"]
    (settings,) = stage["Properties"]["MethodSettings"]
    assert settings.get("LoggingLevel", "OFF") == "OFF"


@pytest.mark.parametrize(
    ("response_type", "code"),
    [
        ("UNAUTHORIZED", "unauthenticated"),
        ("ACCESS_DENIED", "forbidden"),
        ("THROTTLED", "rate_limited"),
        ("REQUEST_TOO_LARGE", "payload_too_large"),
        ("QUOTA_EXCEEDED", "rate_limited"),
        ("INTEGRATION_TIMEOUT", "gateway_timeout"),
        ("INTEGRATION_FAILURE", "bad_gateway"),
        ("AUTHORIZER_FAILURE", "service_unavailable"),
        ("AUTHORIZER_CONFIGURATION_ERROR", "service_unavailable"),
        ("DEFAULT_5XX", "bad_gateway"),
    ],
)
def test_gateway_errors_are_problem_json_from_the_catalogue(synthesized, response_type, code):
    # Given the answers API Gateway gives itself, before any function runs
    responses = synthesized.template.of_type("AWS::ApiGateway::GatewayResponse").values()
    by_type = {r["Properties"]["ResponseType"]: r["Properties"] for r in responses}
    properties = by_type[response_type]
    entry = PROBLEMS[code]
    # Then each is problem+json with the catalogue entry's status, code, title and type
    assert properties["StatusCode"] == str(entry.status)
    assert properties["ResponseParameters"]["gatewayresponse.header.Content-Type"] == (
        "'application/problem+json'"
    )
    # $context.error.messageString is a quoted string once API Gateway fills it in.
    body = json.loads(
        properties["ResponseTemplates"]["application/json"].replace("$context.error.messageString", '"m"')
    )
    assert body == {
        "type": entry.type,
        "title": entry.title,
        "status": entry.status,
        "code": entry.code,
        "detail": "m",
    }


def test_every_gateway_answer_is_problem_json_and_a_429_says_when_to_retry(synthesized):
    """API Gateway falls back to DEFAULT_4XX and DEFAULT_5XX for every type without its own
    response (https://docs.aws.amazon.com/apigateway/latest/developerguide/supported-gateway-response-types.html)."""
    responses = [
        r["Properties"] for r in synthesized.template.of_type("AWS::ApiGateway::GatewayResponse").values()
    ]
    by_type = {r["ResponseType"]: r for r in responses}
    # Then the two fallbacks exist, so no answer is API Gateway's {"message": ...}
    assert {"DEFAULT_4XX", "DEFAULT_5XX"} <= set(by_type)
    for properties in responses:
        headers = properties["ResponseParameters"]
        assert headers["gatewayresponse.header.Content-Type"] == "'application/problem+json'"
        body = json.loads(
            properties["ResponseTemplates"]["application/json"].replace("$context.error.messageString", '"m"')
        )
        assert {"type", "title", "code", "detail"} <= set(body)
        if "StatusCode" in properties:
            assert body["status"] == int(properties["StatusCode"])
        else:  # the status API Gateway chose, which the body cannot know
            assert "status" not in body
    # And a throttled client is told to come back, not to retry at once; so is one whose
    # request met an api Lambda would not run (its concurrency used up: a 5xx of either type,
    # DEFAULT_5XX or INTEGRATION_FAILURE, whichever API Gateway picks), or a failed authorizer
    for response_type in (
        "THROTTLED",
        "QUOTA_EXCEEDED",
        "DEFAULT_5XX",
        "INTEGRATION_FAILURE",
        "AUTHORIZER_FAILURE",
        "AUTHORIZER_CONFIGURATION_ERROR",
    ):
        retry_after = by_type[response_type]["ResponseParameters"]["gatewayresponse.header.Retry-After"]
        assert int(retry_after.strip("'")) >= 1


# ---- monitoring ----------------------------------------------------------------------


def _alarms(synthesized: SynthesizedApp) -> list[dict]:
    return [alarm["Properties"] for alarm in synthesized.template.of_type("AWS::CloudWatch::Alarm").values()]


def test_every_dlq_has_an_alarm_on_its_first_message(synthesized):
    dlq_alarms = {
        alarm["Dimensions"][0]["Value"]["Fn::GetAtt"][0]: alarm
        for alarm in _alarms(synthesized)
        if alarm.get("MetricName") == "ApproximateNumberOfMessagesVisible"
    }
    for dlq_id in synthesized.template.dlq_ids():
        alarm = dlq_alarms[dlq_id]
        assert alarm["Threshold"] == 0
        assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
        assert alarm["AlarmActions"], "an alarm nobody hears is no alarm"


def test_every_lane_has_an_oldest_message_age_alarm(synthesized):
    aged = {
        alarm["Dimensions"][0]["Value"]["Fn::GetAtt"][0]
        for alarm in _alarms(synthesized)
        if alarm.get("MetricName") == "ApproximateAgeOfOldestMessage"
    }
    assert {queue_id for queue_id, _ in synthesized.template.lane_queues().values()} <= aged


@pytest.mark.parametrize("name", ["worker", "webhook_dispatcher"])
def test_function_errors_raise_an_alarm(synthesized, name):
    logical_id, _ = synthesized.template.function(name)
    errors = [
        alarm
        for alarm in _alarms(synthesized)
        if alarm.get("MetricName") == "Errors" and alarm["Dimensions"][0]["Value"] == {"Ref": logical_id}
    ]
    assert errors and errors[0]["Threshold"] == 0


def _dashboard_body(synthesized: SynthesizedApp) -> str:
    (dashboard,) = synthesized.template.of_type("AWS::CloudWatch::Dashboard").values()
    return json.dumps(dashboard["Properties"]["DashboardBody"])


def test_dashboard_shows_depth_wait_run_time_and_outcomes(synthesized):
    body = _dashboard_body(synthesized)
    assert "ApproximateNumberOfMessagesVisible" in body
    for metric in MetricName:
        assert metric.value in body, metric


def test_dashboard_graphs_only_metrics_the_functions_emit(synthesized):
    # Given the custom metrics the dashboard graphs (namespace llmq, written ["llmq", name, ...])
    graphed = set(re.findall(rf'\[\\"{METRICS_NAMESPACE}\\",\\"(\w+)\\"', _dashboard_body(synthesized)))
    alarmed = {
        alarm["MetricName"] for alarm in _alarms(synthesized) if alarm.get("Namespace") == METRICS_NAMESPACE
    }
    # Then each one is a name the code emits, and every name the code emits is graphed
    assert graphed == {metric.value for metric in MetricName}
    assert alarmed <= graphed


# ---- outputs and checks --------------------------------------------------------------


def test_outputs_tell_the_sandbox_where_everything_is(synthesized):
    outputs = synthesized.template.template["Outputs"]
    for key in (
        "ApiUrl",
        "JobsTableName",
        "TenantsTableName",
        "LaneQueueUrls",
        "WebhookQueueUrl",
        "FunctionNames",
    ):
        assert key in outputs
    for lane in synthesized.config.lanes:
        assert f"LaneQueueUrl{lane.name.capitalize()}" in outputs


def test_cdk_nag_ran_and_every_acknowledged_finding_has_a_reason(synthesized):
    (report,) = [
        r for r in synthesized.validation_report()["pluginReports"] if r["pluginName"] == "AwsSolutions"
    ]
    assert report["conclusion"] == "success"
    assert report["violations"] == []
    assert report["suppressedViolations"], "the AwsSolutions pack did not run"
    for finding in report["suppressedViolations"]:
        assert len(finding["reason"]) > 40, finding["ruleName"]


def test_cfn_lint_finds_no_errors(synthesized):
    from cfnlint.api import lint_file

    matches = lint_file(Path(synthesized.template_path))
    # W3005 (a DependsOn already implied by a GetAtt) is how CDK writes templates.
    errors = [f"{m.rule.id} {m.message} at {m.path_string}" for m in matches if m.rule.id.startswith("E")]
    assert errors == []


def test_api_throttling_and_the_authorizer_cache_come_from_the_config(synthesized, config):
    (authorizer,) = synthesized.template.of_type("AWS::ApiGateway::Authorizer").values()
    assert authorizer["Properties"]["AuthorizerResultTtlInSeconds"] == config.limits.authorizer_cache_seconds
    assert authorizer["Properties"]["Type"] == "REQUEST"
    (stage,) = synthesized.template.of_type("AWS::ApiGateway::Stage").values()
    (settings,) = stage["Properties"]["MethodSettings"]
    assert settings["ThrottlingRateLimit"] == config.limits.stage_rate_per_second
    assert settings["ThrottlingBurstLimit"] == config.limits.stage_burst


@pytest.mark.parametrize("name", ["api", "worker"])
def test_large_payloads_go_to_an_encrypted_bucket_that_only_api_and_worker_write(synthesized, name):
    (bucket,) = synthesized.template.of_type("AWS::S3::Bucket").values()
    assert bucket["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert bucket["Properties"]["PublicAccessBlockConfiguration"]["BlockPublicAcls"] is True
    assert synthesized.template.environment(name)["LLMQ_PAYLOAD_BUCKET"]
    statements = synthesized.template.statements(name)
    assert [s for s in statements if s.allows("s3:PutObject")]
    assert not [s.raw for s in statements if s.allows("s3:DeleteObject") or s.allows("s3:ListBucket")]
    others = ["authorizer", "reconciler", "dead_letter", "webhook_dispatcher"]
    assert not [o for o in others for s in synthesized.template.statements(o) if s.allows("s3:PutObject")]


def test_payloads_outlive_the_longest_a_late_webhook_keeps_their_job(synthesized, config):
    """A redelivery near the end of the retention keeps the job's item for its terminal event's
    whole schedule past it; its S3-held input and result must still be there, or GET answers 500
    for a job the API lists as succeeded (S3 also rounds an expiry up to the next midnight UTC:
    the rule's last day is slack enough)."""
    (bucket,) = synthesized.template.of_type("AWS::S3::Bucket").values()
    rules = bucket["Properties"]["LifecycleConfiguration"]["Rules"]
    (general,) = [rule for rule in rules if "Prefix" not in rule and "Filter" not in rule]
    item_life = config.retention_seconds + config.delivery_keep_seconds
    assert general["ExpirationInDays"] * 86_400 >= item_life + 86_400


@pytest.mark.parametrize("name", ["reconciler", "dead_letter"])
def test_what_ends_a_job_without_a_worker_reads_parked_results_and_nothing_else_in_the_bucket(
    synthesized, name
):
    # A job's parked result (llmq.offload) is recorded by whatever ends the job
    assert synthesized.template.environment(name)["LLMQ_PAYLOAD_BUCKET"]
    s3 = [s.raw for s in synthesized.template.statements(name) if any("s3:" in a for a in s.actions)]
    assert [statement["Action"] for statement in s3] == ["s3:GetObject"]
    (resource,) = [statement["Resource"] for statement in s3]
    assert resource["Fn::Join"][1][-1] == "/results/parked/*"


# ---- every AWS call a function makes is granted to its role ---------------------------


def test_every_function_has_the_aws_calls_the_integration_suite_saw_it_make():
    # tests/aws_calls.json is kept complete by tests/integration; a function missing from it
    # was never driven through its handler there, so its grants would go unchecked.
    assert {call.function for call in load_catalogue()} == set(FUNCTION_NAMES)


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_every_aws_call_the_function_makes_is_granted_to_its_role(synthesized, name):
    # Given the calls the function makes (tests/aws_calls.json), When each is followed to its
    # table, index, queue, bucket or secret in the template
    missing = missing_grants(synthesized.template, name, load_catalogue())

    # Then a statement of the function's role allows it there, as do its event sources' needs
    assert missing == [], f"{name}'s role does not allow:\n  " + "\n  ".join(missing)


def test_a_deploy_updates_the_webhook_dispatcher_before_the_functions_that_store_jobs(synthesized):
    # Given the template, Then the api and the worker depend on the webhook dispatcher, so
    # CloudFormation updates it first: a dispatcher of the release before never signs a first
    # attempt of a job stored with webhook-ids by creation, whose retry the new one signs under
    # another id (hunt 326: one delivery, two webhook-ids, acted on twice)
    template = synthesized.template
    dispatcher, _ = template.function("webhook_dispatcher")
    for name in ("api", "worker"):
        _, function = template.function(name)
        assert dispatcher in function.get("DependsOn", []), name
