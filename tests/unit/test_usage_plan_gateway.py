"""The sandbox's gateway plays the usage plans of the app's template, key by key.

"Choose an API key source in API Gateway"
(https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-api-key-source.html):
with key source AUTHORIZER the key is the authorizer's usageIdentifierKey; a method that
requires a key refuses with 403 a request whose key is in no usage plan of the stage.
"Throttle requests to your REST APIs"
(https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-request-throttling.html):
a usage plan's throttle is a token bucket per key, `burst` deep, refilled at `rate`.
The API (routes, key source, gateway responses) is the synthesized template's; the plans are
what API Gateway's API answers, here from a stub of it.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmq_sandbox.config import RunnerSettings
from llmq_sandbox.gateway import ApiGateway, HttpRequest, UsagePlans
from llmq_sandbox.lambda_service import InvocationResult, Outcome
from llmq_sandbox.topology import ApiSpec, TemplateReader
from tests.support.tables import default_app_template

ALLOW = {
    "Version": "2012-10-17",
    "Statement": [{"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": "*"}],
}
OK_REPLY = {"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": "{}"}
STAGE = "prod"


@dataclass
class _Log:
    records: list[Any] = field(default_factory=list)

    def add(self, record: Any) -> None:
        self.records.append(record)


@dataclass
class Functions:
    """The authorizer maps `Bearer <token>` to usage key `usage_keys[token]` (none if absent)."""

    usage_keys: dict[str, str]
    api_outcome: Outcome = Outcome.OK
    api_calls: int = 0
    invocations: _Log = field(default_factory=_Log)

    def invoke(
        self, name: str, event: Any, timeout_seconds: float | None = None, *, throttle: bool = False
    ) -> InvocationResult:
        if name == "authorizer":
            token = event["headers"]["Authorization"].removeprefix("Bearer ")
            payload: dict[str, Any] = {"principalId": token, "policyDocument": ALLOW, "context": {}}
            if token in self.usage_keys:
                payload["usageIdentifierKey"] = self.usage_keys[token]
            return InvocationResult(function=name, request_id="a", outcome=Outcome.OK, payload=payload)
        self.api_calls += 1
        return InvocationResult(function=name, request_id="r", outcome=self.api_outcome, payload=OK_REPLY)


@dataclass
class ApiGatewayStub:
    """API Gateway's GetApiKeys, GetUsagePlans and GetUsagePlanKeys over fixed plans."""

    # plan id -> (rate, burst, [(key id, key value, enabled)])
    plans: dict[str, tuple[float, int, list[tuple[str, str, bool]]]]
    reads: int = 0
    api_id: str = ""  # the plans' API stage: the template's RestApi

    def get_api_keys(self, **_: Any) -> dict[str, Any]:
        self.reads += 1
        keys = [{"id": k, "enabled": on} for _, _, members in self.plans.values() for k, _, on in members]
        return {"items": keys}

    def get_usage_plans(self, **_: Any) -> dict[str, Any]:
        stage = [{"apiId": self.api_id, "stage": STAGE}]
        return {
            "items": [
                {"id": plan, "apiStages": stage, "throttle": {"rateLimit": rate, "burstLimit": burst}}
                for plan, (rate, burst, _) in self.plans.items()
            ]
        }

    def get_usage_plan_keys(self, usagePlanId: str, **_: Any) -> dict[str, Any]:
        members = self.plans[usagePlanId][2]
        return {"items": [{"id": key, "value": value, "type": "API_KEY"} for key, value, _ in members]}


def template_api() -> ApiSpec:
    template = copy.deepcopy(default_app_template().template)
    reader = TemplateReader(
        template, {key: key for key in template["Resources"]}, "123456789012", "us-east-1"
    )
    return reader.api(reader.function_names())


def gateway(functions: Any, stub: ApiGatewayStub) -> ApiGateway:
    api = template_api()
    stub.api_id = api.rest_api_id
    plans = UsagePlans(lambda: stub, api.rest_api_id, api.stage, cache_seconds=60)
    return ApiGateway(api, functions, "123456789012", "us-east-1", RunnerSettings(), usage_plans=plans)


def get(gateway: ApiGateway, token: str | None, path: str = "/v1/jobs") -> Any:
    headers = [("Host", "127.0.0.1")] + ([("Authorization", f"Bearer {token}")] if token else [])
    return gateway.handle(HttpRequest("GET", f"/prod{path}", "", headers, b"", "127.0.0.1"))


def test_the_template_requires_keys_from_the_authorizer_on_the_authorized_methods() -> None:
    api = template_api()
    assert api.api_key_source == "AUTHORIZER"
    assert {route.resource_path: route.api_key_required for route in api.routes} == {
        "/v1/openapi.json": False,
        "/v1/{proxy+}": True,
    }


def test_each_key_has_its_plans_bucket_and_past_it_gets_the_templates_429() -> None:
    # Given two tenants' keys in one plan: burst 2, a refill too slow to matter here
    stub = ApiGatewayStub({"plan_free": (0.001, 2, [("k1", "usage-one", True), ("k2", "usage-two", True)])})
    functions = Functions(usage_keys={"one": "usage-one", "two": "usage-two"})
    api_gateway = gateway(functions, stub)
    # When the first sends three requests
    replies = [get(api_gateway, "one") for _ in range(3)]
    # Then the third gets the template's THROTTLED answer, before the api function runs
    assert [reply.status for reply in replies] == [200, 200, 429]
    headers = dict(replies[2].headers)
    assert headers["Content-Type"] == "application/problem+json" and int(headers["Retry-After"]) >= 1
    assert json.loads(replies[2].body)["code"] == "rate_limited"
    assert functions.api_calls == 2
    # And the other key of the same plan still has its own full bucket
    assert [get(api_gateway, "two").status for _ in range(2)] == [200, 200]
    # And the plans were read once for all of it (cached)
    assert stub.reads == 1


def test_a_key_in_no_plan_or_disabled_or_none_at_all_is_403_and_public_routes_need_none() -> None:
    stub = ApiGatewayStub({"plan_free": (10, 10, [("k1", "usage-one", True), ("k3", "usage-off", False)])})
    functions = Functions(usage_keys={"one": "usage-one", "stray": "usage-nowhere", "off": "usage-off"})
    api_gateway = gateway(functions, stub)
    for token in ("none", "stray", "off"):
        reply = get(api_gateway, token)
        assert reply.status == 403, token
        assert dict(reply.headers)["Content-Type"] == "application/problem+json"
    assert functions.api_calls == 0
    assert get(api_gateway, "one").status == 200
    # GET /v1/openapi.json requires no key (nor authorizer)
    assert get(api_gateway, None, "/v1/openapi.json").status == 200


def test_a_throttled_lambda_invoke_tells_the_client_when_to_retry() -> None:
    """Lambda's guide (https://docs.aws.amazon.com/lambda/latest/dg/services-apigateway-errors.html):
    an invoke Lambda refuses is API Gateway's own 5xx; the template's DEFAULT_5XX adds Retry-After."""
    stub = ApiGatewayStub({"plan": (10, 10, [("k1", "usage-one", True)])})
    functions = Functions(usage_keys={"one": "usage-one"}, api_outcome=Outcome.THROTTLED)
    reply = get(gateway(functions, stub), "one")
    assert reply.status >= 500
    assert dict(reply.headers)["Retry-After"] == "1"


@dataclass
class FailingAuthorizer(Functions):
    """The authorizer fails (its table throttled past its retries), or Lambda refuses it."""

    authorizer_outcome: Outcome = Outcome.ERROR

    def invoke(
        self, name: str, event: Any, timeout_seconds: float | None = None, *, throttle: bool = False
    ) -> InvocationResult:
        if name != "authorizer":
            return super().invoke(name, event, timeout_seconds, throttle=throttle)
        error = {"errorType": "StoreUnavailable", "errorMessage": "dynamodb.GetItem: throttled"}
        return InvocationResult(function=name, request_id="a", outcome=self.authorizer_outcome, error=error)


@pytest.mark.parametrize("outcome", [Outcome.ERROR, Outcome.THROTTLED])
def test_an_authorizer_that_fails_for_now_is_a_503_that_says_when_to_retry_not_a_401(
    outcome: Outcome,
) -> None:
    # Given a valid key, and the authorizer failing for now, When a request comes
    stub = ApiGatewayStub({"plan": (10, 10, [("k1", "usage-one", True)])})
    functions = FailingAuthorizer(usage_keys={"one": "usage-one"}, authorizer_outcome=outcome)
    reply = get(gateway(functions, stub), "one")
    # Then the client is told to come back shortly, as the template says, and the API never ran
    assert (reply.status, dict(reply.headers).get("Retry-After")) == (503, "1")
    assert json.loads(reply.body)["code"] == "service_unavailable"
    assert functions.api_calls == 0


def _one_plan(
    members: list[tuple[str, str, bool]], cache_seconds: float
) -> tuple[ApiGatewayStub, UsagePlans]:
    """One plan (rate 1/s, burst 2) on the template's API stage, with these keys in it."""
    stub = ApiGatewayStub({"plan_free": (1.0, 2, members)})
    api = template_api()
    stub.api_id = api.rest_api_id
    return stub, UsagePlans(lambda: stub, api.rest_api_id, api.stage, cache_seconds=cache_seconds)


def test_a_plan_changed_after_the_cache_period_applies_from_the_next_request() -> None:
    # Given a key whose plan was read (cached for 0.2 s)
    members = [("k1", "usage-one", True)]
    stub, plans = _one_plan(members, cache_seconds=0.2)
    first = plans.plan_for("usage-one")
    assert first is not None and (first.rate_per_second, first.burst) == (1.0, 2)
    # When the plan's throttle changes, and a request comes within, then after, the cache period
    stub.plans["plan_free"] = (5.0, 10, members)
    within = plans.plan_for("usage-one")
    time.sleep(0.25)
    after = plans.plan_for("usage-one")
    # Then the one within is answered from the cache, and the next one after from a new read
    assert within is not None and within.rate_per_second == 1.0
    assert after is not None and (after.rate_per_second, after.burst) == (5.0, 10)
    assert stub.reads == 2


def test_a_key_added_just_after_a_read_is_found_by_its_first_request() -> None:
    # Given plans read a moment ago (another tenant's request)
    members = [("k1", "usage-one", True)]
    stub, plans = _one_plan(members, cache_seconds=60)
    assert plans.plan_for("usage-one") is not None
    # When a tenant is created (its key put in the plan) and its first request follows at once
    members.append(("k2", "usage-new", True))
    found = plans.plan_for("usage-new")
    # Then its key is found, by reading the plans again, not answered 403 from the cache
    assert found is not None and found.burst == 2
    assert stub.reads == 2
    # And a known key is still answered from the cache
    assert plans.plan_for("usage-one") is not None and stub.reads == 2


def test_requests_with_a_key_in_no_plan_read_the_plans_once_a_period_not_once_each() -> None:
    # Given plans read a moment ago, and a key the authorizer accepts but no plan holds
    stub, plans = _one_plan([("k1", "usage-one", True)], cache_seconds=60)
    assert plans.plan_for("usage-one") is not None
    # When that key sends ten requests at once
    answers = [plans.plan_for("usage-nowhere") for _ in range(10)]
    # Then each is refused (403), and the plans were read again once for all of them
    assert answers == [None] * 10
    assert stub.reads == 2


def test_a_key_moving_between_plans_is_looked_for_again_at_once() -> None:
    # Given a key its plan held (`llmq tenants set-limits` moves it: out of one plan, into another)
    members = [("k1", "usage-one", True), ("k2", "usage-moving", True)]
    _, plans = _one_plan(members, cache_seconds=0.05)
    assert plans.plan_for("usage-moving") is not None
    # When the plans are read again mid-move, then it is in none (403)
    members.remove(("k2", "usage-moving", True))
    time.sleep(0.06)
    assert plans.plan_for("usage-moving") is None
    # And once the move is done its next request finds it, not a remembered 403
    members.append(("k2", "usage-moving", True))
    assert plans.plan_for("usage-moving") is not None
