"""The sandbox's API Gateway keeps time, and passes authorizer context, as API Gateway does.

"Amazon API Gateway quotas": the integration timeout of a REST API is 29 s by default; the
client then gets 504 (INTEGRATION_TIMEOUT). The Lambda invocation is not stopped: it runs to
its own timeout ("Lambda function timeout" in the Lambda developer guide), so it may still
write. A Lambda error, its own timeout included, is a 502 to the client
("Handle Lambda errors in API Gateway").

"Output from an Amazon API Gateway Lambda authorizer": context values may be strings, numbers
or booleans, and reach the integration as strings; a JSON object or array fails the request
with a 500.

The functions here are a stand-in for the sandbox's Lambda service (only `invoke` and the
invocation log), so the gateway's clock can be shrunk to a fraction of a second.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmq_sandbox.config import RunnerSettings
from llmq_sandbox.gateway import ApiGateway, HttpRequest
from llmq_sandbox.lambda_service import InvocationResult, Outcome
from llmq_sandbox.topology import ApiSpec, AuthorizerSpec, RouteSpec

OK_REPLY = {"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": "{}"}


@dataclass
class _Log:
    records: list[Any] = field(default_factory=list)

    def add(self, record: Any) -> None:
        self.records.append(record)


@dataclass
class SlowFunctions:
    """An api function that answers only when released, after the gateway gave up."""

    outcome: Outcome = Outcome.OK
    release: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    invocations: _Log = field(default_factory=_Log)

    def invoke(self, name: str, event: Any, timeout_seconds: float | None = None) -> InvocationResult:
        self.release.wait(timeout=10)
        self.finished.set()
        return InvocationResult(function=name, request_id="r", outcome=self.outcome, payload=OK_REPLY)


def _gateway(functions: Any, timeout_seconds: float) -> ApiGateway:
    api = ApiSpec(
        rest_api_id="abc123",
        stage="prod",
        routes=[RouteSpec("/v1/{proxy+}", "res1", "ANY", "api", None)],
        authorizers={},
        gateway_responses={},
    )
    settings = RunnerSettings(integration_timeout_seconds=timeout_seconds)
    return ApiGateway(api, functions, "123456789012", "us-east-1", settings)


def _get(gateway: ApiGateway) -> Any:
    return gateway.handle(HttpRequest("GET", "/prod/v1/jobs", "", [("Host", "127.0.0.1")], b"", "127.0.0.1"))


def test_past_the_integration_timeout_the_client_gets_504_and_the_function_runs_on() -> None:
    # Given an api function slower than the gateway's integration timeout
    functions = SlowFunctions()
    # When a request comes in
    reply = _get(_gateway(functions, timeout_seconds=0.2))
    # Then the gateway answers 504 on its own clock
    assert reply.status == 504
    assert b"Endpoint request timed out" in reply.body
    # And the invocation was not stopped: it finishes, and its outcome is logged
    assert not functions.finished.is_set()
    functions.release.set()
    assert functions.finished.wait(timeout=5)
    for _ in range(50):
        if functions.invocations.records:
            break
        threading.Event().wait(0.05)
    assert [record.outcome for record in functions.invocations.records] == ["ok"]


def test_a_function_that_times_out_on_its_own_is_a_502() -> None:
    # Given an api function that hits its own timeout before the gateway's
    functions = SlowFunctions(outcome=Outcome.TIMEOUT)
    functions.release.set()
    # When a request comes in, Then the client gets a Lambda error, not a gateway timeout
    assert _get(_gateway(functions, timeout_seconds=5)).status == 502


def test_an_answer_within_the_timeout_is_passed_through() -> None:
    functions = SlowFunctions()
    functions.release.set()
    assert _get(_gateway(functions, timeout_seconds=5)).status == 200


ALLOW = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "execute-api:Invoke", "Resource": "*"}],
}


@dataclass
class AuthorizedFunctions:
    """An authorizer answering `context`, and an api function that records its event."""

    context: dict[str, Any]
    seen: list[dict[str, Any]] = field(default_factory=list)
    invocations: _Log = field(default_factory=_Log)

    def invoke(self, name: str, event: Any, timeout_seconds: float | None = None) -> InvocationResult:
        if name == "authorizer":
            payload = {"principalId": "tenant_1", "policyDocument": ALLOW, "context": self.context}
            return InvocationResult(function=name, request_id="a", outcome=Outcome.OK, payload=payload)
        self.seen.append(event)
        return InvocationResult(function=name, request_id="r", outcome=Outcome.OK, payload=OK_REPLY)


def _authorized_gateway(functions: Any) -> ApiGateway:
    api = ApiSpec(
        rest_api_id="abc123",
        stage="prod",
        routes=[RouteSpec("/v1/{proxy+}", "res1", "ANY", "api", "Auth")],
        authorizers={"Auth": AuthorizerSpec("Auth", "authorizer", "REQUEST", ["Authorization"], 0)},
        gateway_responses={},
    )
    return ApiGateway(api, functions, "123456789012", "us-east-1", RunnerSettings())


def _authorized_get(gateway: ApiGateway) -> Any:
    headers = [("Host", "127.0.0.1"), ("Authorization", "Bearer k")]
    return gateway.handle(HttpRequest("GET", "/prod/v1/jobs", "", headers, b"", "127.0.0.1"))


def test_authorizer_context_reaches_the_function_as_strings() -> None:
    functions = AuthorizedFunctions(context={"tenant_id": "t1", "tier": "free", "weight": 3, "trial": True})
    assert _authorized_get(_authorized_gateway(functions)).status == 200
    context = functions.seen[0]["requestContext"]["authorizer"]
    assert (context["tenant_id"], context["weight"], context["trial"]) == ("t1", "3", "true")


@pytest.mark.parametrize("value", [{"nested": "x"}, ["a", "b"]])
def test_an_object_or_array_in_the_authorizer_context_is_a_500(value: Any) -> None:
    functions = AuthorizedFunctions(context={"tenant_id": "t1", "extra": value})
    assert _authorized_get(_authorized_gateway(functions)).status == 500
    assert functions.seen == []
