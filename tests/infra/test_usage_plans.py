"""Per-tenant request rates in the template: a usage plan per tier, keys from the authorizer.

API Gateway throttles a request on a usage plan only when its method requires an API key and
the key is in a plan on the stage; with key source AUTHORIZER the key is the authorizer's
usageIdentifierKey
(https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-api-key-source.html).
"""

from __future__ import annotations

import json

import pytest

from llmq.config import FairShareConfig, LlmqConfig, TenantLimits
from llmq.errors import PROBLEMS
from stacks.api import DEFAULT_USAGE_PLAN, STAGE_NAME
from tests.infra.synthesis import SynthesizedApp, synthesize

# Tiers and rates unlike the defaults, so nothing passes by coincidence.
CONFIG = LlmqConfig(
    fair_share=FairShareConfig(
        tiers={
            "enterprise": TenantLimits(rate_per_second=40.0, burst=80),
            "free": TenantLimits(rate_per_second=2.5, burst=3),
        },
        default=TenantLimits(rate_per_second=7.0, burst=9),
    )
)


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(CONFIG, outdir=tmp_path_factory.mktemp("cdk-usage-plans"))


def _plans_by_tier(synthesized: SynthesizedApp) -> dict[str, dict]:
    """tier -> the UsagePlan's properties, through the UsagePlanIds output the CLI reads."""
    parts = synthesized.template.template["Outputs"]["UsagePlanIds"]["Value"]["Fn::Join"][1]
    logical_ids = json.loads("".join(part if isinstance(part, str) else part["Ref"] for part in parts))
    plans = synthesized.template.of_type("AWS::ApiGateway::UsagePlan")
    return {tier: plans[logical_id]["Properties"] for tier, logical_id in logical_ids.items()}


def test_each_tier_and_the_default_has_a_usage_plan_throttled_as_the_config_says(synthesized):
    by_tier = _plans_by_tier(synthesized)
    assert set(by_tier) == {"enterprise", "free", DEFAULT_USAGE_PLAN}
    assert len(synthesized.template.of_type("AWS::ApiGateway::UsagePlan")) == 3
    for tier, properties in by_tier.items():
        limits = CONFIG.fair_share.default if tier == DEFAULT_USAGE_PLAN else CONFIG.tenant_limits(tier)
        assert properties["Throttle"] == {"RateLimit": limits.rate_per_second, "BurstLimit": limits.burst}
        # No quota: the active-jobs quota is the api's (429 quota_exceeded), not a request count.
        assert "Quota" not in properties


def test_every_usage_plan_is_on_the_apis_stage(synthesized):
    template = synthesized.template
    (api_id,) = template.of_type("AWS::ApiGateway::RestApi")
    (stage_id, stage), *_ = template.of_type("AWS::ApiGateway::Stage").items()
    assert stage["Properties"]["StageName"] == STAGE_NAME
    for properties in _plans_by_tier(synthesized).values():
        (api_stage,) = properties["ApiStages"]
        assert api_stage["ApiId"] == {"Ref": api_id}
        assert api_stage["Stage"] == {"Ref": stage_id}


def test_the_api_takes_its_keys_from_the_authorizer(synthesized):
    (api,) = synthesized.template.of_type("AWS::ApiGateway::RestApi").values()
    assert api["Properties"]["ApiKeySourceType"] == "AUTHORIZER"


def test_every_method_behind_the_authorizer_requires_a_key_and_no_public_one_does(synthesized):
    """A method that does not require a key is never throttled by a usage plan."""
    methods = [m["Properties"] for m in synthesized.template.of_type("AWS::ApiGateway::Method").values()]
    authorized = [m for m in methods if m["AuthorizationType"] == "CUSTOM"]
    public = [m for m in methods if m["AuthorizationType"] == "NONE"]
    assert authorized and public
    assert all(m.get("ApiKeyRequired") is True for m in authorized)
    # No key can be had without the authorizer, so a public method that required one would 403.
    assert not any(m.get("ApiKeyRequired") for m in public)


@pytest.mark.parametrize(
    ("response_type", "code"), [("THROTTLED", "rate_limited"), ("QUOTA_EXCEEDED", "rate_limited")]
)
def test_a_usage_plan_refusal_is_a_429_problem_with_retry_after(synthesized, response_type, code):
    responses = synthesized.template.of_type("AWS::ApiGateway::GatewayResponse").values()
    (properties,) = [r["Properties"] for r in responses if r["Properties"]["ResponseType"] == response_type]
    assert properties["StatusCode"] == "429"
    headers = properties["ResponseParameters"]
    assert headers["gatewayresponse.header.Content-Type"] == "'application/problem+json'"
    assert int(headers["gatewayresponse.header.Retry-After"].strip("'")) >= 1
    body = json.loads(
        properties["ResponseTemplates"]["application/json"].replace("$context.error.messageString", '"m"')
    )
    assert body["code"] == code == PROBLEMS[code].code and body["status"] == 429


@pytest.mark.parametrize(
    "response_type", ["DEFAULT_5XX", "AUTHORIZER_FAILURE", "AUTHORIZER_CONFIGURATION_ERROR"]
)
def test_a_5xx_from_api_gateway_says_when_to_retry(synthesized, response_type):
    """A Lambda invoke that Lambda throttles reaches the client as API Gateway's own 5xx
    (https://docs.aws.amazon.com/lambda/latest/dg/services-apigateway-errors.html): the
    DEFAULT_5XX answer tells the client to come back, as a 429 does; so do the answers for an
    authorizer that failed (its table throttled) or could not be invoked."""
    responses = synthesized.template.of_type("AWS::ApiGateway::GatewayResponse").values()
    (properties,) = [r["Properties"] for r in responses if r["Properties"]["ResponseType"] == response_type]
    assert properties["ResponseParameters"]["gatewayresponse.header.Retry-After"] == "'1'"
