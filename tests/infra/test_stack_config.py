"""A non-default config changes the template: lanes, timeouts, redrive and schedule follow it."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from llmq.config import (
    IN_FLIGHT_SETTINGS_METADATA,
    ApiSizing,
    ConcurrencyConfig,
    FunctionSizing,
    LaneConfig,
    LlmqConfig,
    ReconcilerConfig,
    WebhookPolicy,
    WorkerEnvironment,
)
from llmq_cli.doctor import in_flight_settings_in_template, reservations_from_template
from tests.infra.api_permissions import unpermitted_routes
from tests.infra.synthesis import SynthesizedApp, function_concurrency_bounds, synthesize

THREE_LANES = LlmqConfig(
    lanes=[
        LaneConfig(name="high", tiers=["enterprise"], max_concurrency=20, batch_size=5),
        LaneConfig(name="low", tiers=["free"], max_concurrency=3),
        LaneConfig(name="short-batch", tiers=["pro"], max_concurrency=6, batching_window_seconds=2),
    ],
    default_lane="low",
    max_attempts=4,
    max_receive_count=9,
    worker=FunctionSizing(memory_mb=512, timeout_seconds=120),
    reconciler=ReconcilerConfig(schedule_minutes=2),
    webhooks=WebhookPolicy(max_concurrency=12),
    api=ApiSizing(snap_start=True),
)


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(
        THREE_LANES, context={"alarm_email": "oncall@example.com"}, outdir=tmp_path_factory.mktemp("cdk-3")
    )


def test_each_configured_lane_gets_its_queue_with_the_configured_redrive_and_visibility(synthesized):
    lanes = synthesized.template.lane_queues()

    assert set(lanes) == {"high", "low", "short-batch"}
    for _, queue in lanes.values():
        # Six worker timeouts, and the longest batching window, which a message waits out in
        # flight (hunt 260: a window longer than the visibility timeout received it again and
        # again into the DLQ, untried)
        assert queue["Properties"]["VisibilityTimeout"] == 6 * 120 + 2
        assert queue["Properties"]["RedrivePolicy"]["maxReceiveCount"] == 9


def test_each_lane_mapping_follows_its_lane_config(synthesized):
    template = synthesized.template
    by_queue = {m["EventSourceArn"]["Fn::GetAtt"][0]: m for m in template.event_source_mappings("worker")}
    for lane, (queue_id, _) in template.lane_queues().items():
        mapping, lane_config = by_queue[queue_id], THREE_LANES.lanes_by_name[lane]
        assert mapping["ScalingConfig"]["MaximumConcurrency"] == lane_config.max_concurrency
        assert mapping["BatchSize"] == lane_config.batch_size
        assert mapping.get("MaximumBatchingWindowInSeconds", 0) == lane_config.batching_window_seconds
        assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_worker_sizing_and_reserved_concurrency_follow_the_config(synthesized):
    worker = synthesized.template.function("worker")[1]["Properties"]
    assert worker["Timeout"] == 120
    assert worker["MemorySize"] == 512
    assert worker["ReservedConcurrentExecutions"] == 20 + 3 + 6


def test_the_template_records_what_a_deploy_must_never_lower_for_the_next_preflight(synthesized):
    # (llmq doctor compares them with the next deploy's: values, whatever either version's
    # defaults, which LLMQ_CONFIG leaves out)
    recorded = synthesized.template.template["Metadata"][IN_FLIGHT_SETTINGS_METADATA]
    assert recorded == {
        "reconciler.sweep_shards": 16,
        "batches.count_shards": 16,
        "lanes": ["high", "low", "short-batch"],
    }
    assert in_flight_settings_in_template(synthesized.template.template) == recorded


def test_every_function_receives_the_same_config(synthesized):
    for name in synthesized.template.functions():
        environ = synthesized.template.environment(name)
        assert LlmqConfig.model_validate_json(environ["LLMQ_CONFIG"]) == THREE_LANES, name
    worker = WorkerEnvironment.load(synthesized.template.environment("worker"))
    assert set(worker.lane_queue_urls) == {"high", "low", "short-batch"}


def test_dispatcher_concurrency_follows_the_config(synthesized):
    # Given webhooks.max_concurrency = 12 (not the default), When synthesized
    (mapping,) = synthesized.template.event_source_mappings("webhook_dispatcher")

    # Then the dispatcher's mapping is bounded by it
    assert THREE_LANES.webhooks.max_concurrency != LlmqConfig().webhooks.max_concurrency
    assert mapping["ScalingConfig"]["MaximumConcurrency"] == 12


def test_reconciler_schedule_follows_the_config(synthesized):
    (rule,) = synthesized.template.of_type("AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "rate(2 minutes)"


def test_alarm_email_context_subscribes_to_the_alarm_topic(synthesized):
    (subscription,) = synthesized.template.of_type("AWS::SNS::Subscription").values()
    assert subscription["Properties"]["Protocol"] == "email"
    assert subscription["Properties"]["Endpoint"] == "oncall@example.com"
    # (what `llmq doctor` reads to tell whether a deploy keeps the deployed subscription)
    from llmq_cli.doctor import alarm_emails_in_template

    assert alarm_emails_in_template(synthesized.template.template) == {"oncall@example.com"}


def test_every_dlq_of_three_lanes_has_an_alarm(synthesized):
    alarmed = {
        alarm["Properties"]["Dimensions"][0]["Value"]["Fn::GetAtt"][0]
        for alarm in synthesized.template.of_type("AWS::CloudWatch::Alarm").values()
        if alarm["Properties"].get("MetricName") == "ApproximateNumberOfMessagesVisible"
    }
    assert synthesized.template.dlq_ids() <= alarmed
    assert len(synthesized.template.dlq_ids()) == 4  # three lanes and the webhooks queue


def test_a_synth_without_the_dependencies_layer_fails_and_says_what_to_run(tmp_path, monkeypatch):
    # Given no built layers/deps (a fresh checkout), When synthesized as `cdk synth` or
    # `cdk deploy` would, without the tests' escape hatch
    from stacks import layers

    monkeypatch.setattr(layers, "DEPS_LAYER_DIR", tmp_path / "deps")

    # Then the synth fails instead of deploying functions that cannot import their dependencies
    with pytest.raises(RuntimeError, match=r"layers/deps is not built: run `make layers`"):
        synthesize(
            LlmqConfig(), context={"llmq:allow_placeholder_deps_layer": False}, outdir=tmp_path / "cdk.out"
        )


def test_the_sandbox_synthesizes_without_the_dependencies_layer(tmp_path, monkeypatch):
    from stacks import layers

    monkeypatch.setattr(layers, "DEPS_LAYER_DIR", tmp_path / "deps")

    synthesized = synthesize(
        LlmqConfig(),
        context={"llmq:sandbox": True, "llmq:allow_placeholder_deps_layer": False},
        outdir=tmp_path / "cdk.out",
    )

    assert synthesized.template.of_type("AWS::Lambda::LayerVersion")


# ---- an account with a low concurrency quota, whose operator opted into API logging ----------

LOW_QUOTA = LlmqConfig(concurrency=ConcurrencyConfig(reserve=False))


@pytest.fixture(scope="module")
def low_quota(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(
        LOW_QUOTA,
        context={"llmq:apigw_cloudwatch_role": True},
        outdir=tmp_path_factory.mktemp("cdk-low-quota"),
    )


def test_with_reservations_off_no_function_reserves_and_the_queue_consumers_stay_bounded(low_quota):
    template = low_quota.template
    # Then nothing counts against the account's unreserved minimum
    for name in ("api", "authorizer", "worker", "dead_letter", "webhook_dispatcher", "reconciler"):
        assert "ReservedConcurrentExecutions" not in template.function(name)[1]["Properties"], name
    # And every queue consumer is still held to its mappings' MaximumConcurrency
    bounds = function_concurrency_bounds(template)
    assert bounds["worker"] == LOW_QUOTA.total_lane_concurrency
    assert bounds["dead_letter"] is not None
    assert bounds["webhook_dispatcher"] == LOW_QUOTA.webhooks.max_concurrency
    # And the api and the authorizer are bounded by the stage throttle only
    assert bounds["api"] is None and bounds["authorizer"] is None


def test_the_api_gateway_cloudwatch_role_is_set_only_when_opted_in_and_then_the_stage_logs(low_quota):
    template = low_quota.template
    (account,) = template.of_type("AWS::ApiGateway::Account").values()
    role_id = account["Properties"]["CloudWatchRoleArn"]["Fn::GetAtt"][0]
    role = template.resources[role_id]["Properties"]
    assert "apigateway.amazonaws.com" in str(role["AssumeRolePolicyDocument"])
    (stage,) = template.of_type("AWS::ApiGateway::Stage").values()
    assert stage["Properties"]["AccessLogSetting"]["DestinationArn"]
    (settings,) = stage["Properties"]["MethodSettings"]
    assert settings["LoggingLevel"] == "ERROR"
    assert settings["DataTraceEnabled"] is False


def test_a_function_environment_missing_a_required_variable_fails_the_synth() -> None:
    from llmq.config import WorkerEnvironment
    from stacks.functions import function_environment

    with pytest.raises(
        ValueError, match=r"WorkerEnvironment requires webhook_queue_url \(LLMQ_WEBHOOK_QUEUE_URL\)"
    ):
        function_environment(WorkerEnvironment, jobs_table="t", lane_queue_urls="{}")
    with pytest.raises(ValueError, match="no fields"):
        function_environment(
            WorkerEnvironment, jobs_table="t", lane_queue_urls="{}", webhook_queue_url="u", typo="x"
        )


def test_the_configs_mapped_concurrency_is_what_the_templates_mappings_can_run(synthesized):
    # (the doctor reads the config's figure when there is no template yet)
    mapped = reservations_from_template(synthesized.template.template, "test").mapped
    assert mapped == synthesized.config.mapped_concurrency == 20 + 3 + 6 + 3 * 2 + 12


def test_every_route_the_gateway_invokes_is_allowed_by_a_permission_of_its_target(synthesized):
    # (moto does not evaluate Lambda permissions: AWS would answer such a route 500)
    assert unpermitted_routes(synthesized.template) == []
    assert synthesized.template.of_type("AWS::ApiGateway::Method")


def test_snap_start_applies_to_the_api_alone_and_api_gateway_invokes_its_published_version(synthesized):
    template = synthesized.template
    api_id, api = template.function("api")
    # SnapStart on the api only, for published versions ($LATEST is never snapshotted)
    assert api["Properties"]["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    for name, (_, resource) in template.functions().items():
        if name != "api":
            assert "SnapStart" not in resource["Properties"], name
    # One alias, on a version of the api function, and every API method invokes it
    [(alias_id, alias)] = template.of_type("AWS::Lambda::Alias").items()
    version_id = template.referenced(alias["Properties"]["FunctionVersion"], "AWS::Lambda::Version")
    assert template.resources[version_id]["Properties"]["FunctionName"] == {"Ref": api_id}
    assert alias["Properties"]["Name"] == "live"
    for method in template.of_type("AWS::ApiGateway::Method").values():
        assert (
            template.referenced(method["Properties"]["Integration"]["Uri"], "AWS::Lambda::Alias") == alias_id
        )
    # API Gateway may invoke the alias, and nothing grants it the unqualified function
    invokable = [
        permission["Properties"]["FunctionName"]
        for permission in template.of_type("AWS::Lambda::Permission").values()
        if permission["Properties"]["Principal"] == "apigateway.amazonaws.com"
        and template.invoked_function(permission["Properties"]["FunctionName"]) == api_id
    ]
    assert invokable and all(name == {"Ref": alias_id} for name in invokable)


# ---- an operator who provisions the front door's environments


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(
        LlmqConfig(api=ApiSizing(provisioned_environments=3)),
        outdir=tmp_path_factory.mktemp("cdk-provisioned"),
    )


def test_provisioned_environments_sit_on_an_alias_of_the_api_and_of_its_authorizer_which_api_gateway_invokes(
    provisioned,
):
    template = provisioned.template
    aliases = {
        template.invoked_function(alias["Properties"]["FunctionName"]): (alias_id, alias)
        for alias_id, alias in template.of_type("AWS::Lambda::Alias").items()
    }
    api_id, api = template.function("api")
    authorizer_id, _ = template.function("authorizer")
    assert set(aliases) == {api_id, authorizer_id}
    for _, alias in aliases.values():
        assert alias["Properties"]["ProvisionedConcurrencyConfig"] == {"ProvisionedConcurrentExecutions": 3}
        assert alias["Properties"]["Name"] == "live"
    # No SnapStart: Lambda refuses it with provisioned concurrency
    assert "SnapStart" not in api["Properties"]
    # Every method invokes the api's alias, and the authorizer is its alias too
    api_alias, authorizer_alias = aliases[api_id][0], aliases[authorizer_id][0]
    for method in template.of_type("AWS::ApiGateway::Method").values():
        assert (
            template.referenced(method["Properties"]["Integration"]["Uri"], "AWS::Lambda::Alias") == api_alias
        )
    [authorizer] = template.of_type("AWS::ApiGateway::Authorizer").values()
    assert (
        template.referenced(authorizer["Properties"]["AuthorizerUri"], "AWS::Lambda::Alias")
        == authorizer_alias
    )
    # API Gateway may invoke both aliases, and neither unqualified function
    invokable = {
        json.dumps(permission["Properties"]["FunctionName"])
        for permission in template.of_type("AWS::Lambda::Permission").values()
        if permission["Properties"]["Principal"] == "apigateway.amazonaws.com"
    }
    assert invokable == {json.dumps({"Ref": api_alias}), json.dumps({"Ref": authorizer_alias})}
    assert unpermitted_routes(template) == []


@pytest.mark.parametrize(
    ("api", "concurrency", "refused"),
    [
        ({"provisioned_environments": 2, "snap_start": True}, {}, "exclude each other"),
        ({"provisioned_environments": 30}, {"authorizer": 20}, "authorizer's reserved concurrency"),
        ({"provisioned_environments": 60}, {"api": 50, "authorizer": 100}, "api's reserved concurrency"),
    ],
)
def test_the_config_refuses_provisioned_environments_lambda_would_refuse(api, concurrency, refused):
    with pytest.raises(ValidationError, match=refused):
        LlmqConfig.model_validate({"api": api, "concurrency": concurrency})


def test_provisioned_environments_are_refused_without_reservations_to_hold_them():
    # Unreserved, they would come out of the account's shared pool, which Lambda keeps at 100
    # or more: a deploy that nothing could check first
    with pytest.raises(ValidationError, match=r"needs concurrency\.reserve"):
        LlmqConfig.model_validate({"api": {"provisioned_environments": 2}, "concurrency": {"reserve": False}})
    assert LlmqConfig.model_validate({"concurrency": {"reserve": False}}).api.provisioned_environments == 0


# ---- an operator who opted into API logging where the account has the role, two on-call addresses


@pytest.fixture(scope="module")
def logging_to_two(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(
        LlmqConfig(),
        context={"llmq:apigw_logging": True, "alarm_email": "oncall@example.com, backup@example.com"},
        outdir=tmp_path_factory.mktemp("cdk-logging"),
    )


def test_each_alarm_address_gets_a_subscription_of_its_own(logging_to_two):
    from llmq_cli.doctor import alarm_emails_in_template

    endpoints = sorted(
        s["Properties"]["Endpoint"]
        for s in logging_to_two.template.of_type("AWS::SNS::Subscription").values()
    )
    assert endpoints == ["backup@example.com", "oncall@example.com"]
    assert alarm_emails_in_template(logging_to_two.template.template) == set(endpoints)


def test_the_doctor_asks_api_gateway_for_its_role_only_where_the_stage_logs_through_it(
    logging_to_two, low_quota, synthesized
):
    from llmq_cli.doctor import stage_logs_through_account_role

    # The stage logs, through the region's role (`llmq doctor` checks the region has one)
    assert stage_logs_through_account_role(logging_to_two.template.template)
    assert not logging_to_two.template.of_type("AWS::ApiGateway::Account")
    # The stack sets the role itself, or the stage does not log
    assert not stage_logs_through_account_role(low_quota.template.template)
    assert not stage_logs_through_account_role(synthesized.template.template)


@pytest.mark.parametrize(
    ("given", "subscribed"),
    [
        ("oncall@example.com", ("oncall@example.com",)),
        ("oncall@example.com,backup@example.com", ("oncall@example.com", "backup@example.com")),
        (
            " oncall@example.com ;  backup@example.com oncall@example.com",
            ("oncall@example.com", "backup@example.com"),
        ),
        (["oncall@example.com", "backup@example.com"], ("oncall@example.com", "backup@example.com")),
        ("o'brien+alarms@mail.example.co.uk", ("o'brien+alarms@mail.example.co.uk",)),
        ("", ()),
        (None, ()),
    ],
)
def test_alarm_email_takes_one_address_or_several(given, subscribed):
    from stacks.context import alarm_emails

    assert alarm_emails(given) == subscribed


@pytest.mark.parametrize(
    "given",
    [
        "oncall",
        "oncall@example",
        "on@call@example.com",
        "<oncall@example.com>",
        "a@example..com",
        "a@.example.com",
    ],
)
def test_an_alarm_email_sns_would_refuse_fails_the_synth_naming_it(given):
    # SNS refuses it ("Invalid parameter: Email address"), and the deploy would roll back there
    from stacks.context import alarm_emails

    with pytest.raises(ValueError, match="is not one e-mail address"):
        alarm_emails(given)


def test_a_deploy_that_lets_webhooks_reach_loopback_is_refused_and_the_sandbox_may():
    from llmq.config import WebhookPolicy
    from stacks.context import refuse_sandbox_only

    loopback = LlmqConfig(webhooks=WebhookPolicy(allow_loopback_http=True))
    with pytest.raises(ValueError, match="allow_loopback_http is for the sandbox only"):
        refuse_sandbox_only(loopback, sandbox=False)
    refuse_sandbox_only(loopback, sandbox=True)
    refuse_sandbox_only(LlmqConfig(), sandbox=False)
