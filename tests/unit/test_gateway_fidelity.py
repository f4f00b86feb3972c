"""The sandbox's API Gateway keeps time, and passes authorizer context, as API Gateway does.

"Amazon API Gateway quotas": the integration timeout of a REST API is 29 s by default; the
client then gets 504 (INTEGRATION_TIMEOUT). The Lambda invocation is not stopped: it runs to
its own timeout ("Lambda function timeout" in the Lambda developer guide), so it may still
write. A Lambda error, its own timeout included, is a 502 to the client
("Handle Lambda errors in API Gateway").

"Output from an Amazon API Gateway Lambda authorizer": context values may be strings, numbers
or booleans, and reach the integration as strings; a JSON object or array fails the request
with a 500.

"Binary media types for REST APIs in API Gateway" and "Content type conversions in API
Gateway": with a Lambda proxy integration a request body is base64 (isBase64Encoded true) only
when its Content-Type matches one of the API's binaryMediaTypes, else it is passed as UTF-8
text; a base64 response is turned back into bytes only when the first Accept media type of the
request matches one of them.

"Gateway response types for API Gateway", "Throttle requests to your REST APIs for better
throughput in API Gateway": a method or resource the API does not have is a 403
MISSING_AUTHENTICATION_TOKEN; the stage's method throttling is a token bucket, and past it the
client gets THROTTLED (429), customisable like every gateway response.

The functions here are a stand-in for the sandbox's Lambda service (only `invoke` and the
invocation log), so the gateway's clock can be shrunk to a fraction of a second.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmq.config import LlmqConfig
from llmq_sandbox.config import RunnerSettings
from llmq_sandbox.gateway import ApiGateway, HttpRequest
from llmq_sandbox.lambda_service import InvocationResult, Outcome
from llmq_sandbox.topology import (
    ApiSpec,
    AuthorizerSpec,
    GatewayResponseSpec,
    RouteSpec,
    TemplateReader,
    ThrottleSpec,
)
from tests.support.tables import default_app_template

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

    def invoke(
        self, name: str, event: Any, timeout_seconds: float | None = None, *, throttle: bool = False
    ) -> InvocationResult:
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

    def invoke(
        self, name: str, event: Any, timeout_seconds: float | None = None, *, throttle: bool = False
    ) -> InvocationResult:
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


# ---- binary media types -----------------------------------------------------------------------


@dataclass
class EchoFunctions:
    """An api function that records its event and answers `reply`."""

    reply: dict[str, Any] = field(default_factory=lambda: dict(OK_REPLY))
    seen: list[dict[str, Any]] = field(default_factory=list)
    invocations: _Log = field(default_factory=_Log)

    def invoke(
        self, name: str, event: Any, timeout_seconds: float | None = None, *, throttle: bool = False
    ) -> InvocationResult:
        self.seen.append(event)
        return InvocationResult(function=name, request_id="r", outcome=Outcome.OK, payload=self.reply)


def _api(**fields: Any) -> ApiSpec:
    routes = [
        RouteSpec("/v1/openapi.json", "res2", "GET", "api", None),
        RouteSpec("/v1/{proxy+}", "res1", "ANY", "api", None),
    ]
    return ApiSpec(
        **{
            "rest_api_id": "abc123",
            "stage": "prod",
            "routes": routes,
            "authorizers": {},
            "gateway_responses": {},
        }
        | fields
    )


def _send(
    gateway: ApiGateway, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> Any:
    header_list = [("Host", "127.0.0.1"), *(headers or {}).items()]
    return gateway.handle(HttpRequest(method, f"/prod{path}", "", header_list, body, "127.0.0.1"))


def _plain(api: ApiSpec, functions: Any) -> ApiGateway:
    return ApiGateway(api, functions, "123456789012", "us-east-1", RunnerSettings())


PNG = b"\x89PNG\r\n\x1a\n\xff\x00"


@pytest.mark.parametrize("body", [PNG, b"GIF89a;"], ids=["not UTF-8", "UTF-8 too"])
def test_a_body_of_a_binary_media_type_reaches_the_function_in_base64(body: bytes) -> None:
    """Binary media types for REST APIs in API Gateway (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-payload-encodings.html):
    a body whose Content-Type matches binaryMediaTypes reaches a Lambda proxy base64-encoded."""
    # Given an API whose binary media types include image/*
    functions = EchoFunctions()
    gateway = _plain(_api(binary_media_types=["image/*"]), functions)
    # When an image is posted, whether or not its bytes happen to be UTF-8
    assert _send(gateway, "POST", "/v1/jobs", body, {"Content-Type": "image/png"}).status == 200
    # Then the function gets it base64-encoded, flagged so
    event = functions.seen[0]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == body


@pytest.mark.parametrize("name", ["Content-Type", "CONTENT-TYPE", "content-type"])
def test_the_content_type_is_read_whatever_the_case_of_its_name(name: str) -> None:
    # Given an API whose binary media types include image/* (header names are case-insensitive)
    functions = EchoFunctions()
    gateway = _plain(_api(binary_media_types=["image/*"]), functions)
    # When an image is posted with its Content-Type's name in any case
    assert _send(gateway, "POST", "/v1/jobs", PNG, {name: "image/png"}).status == 200
    # Then it is the binary media type it names: the function gets it base64-encoded
    assert functions.seen[0]["isBase64Encoded"] is True


@pytest.mark.parametrize("binary_media_types", [[], ["image/*"]], ids=["none", "image/*"])
def test_a_body_of_any_other_type_is_text_even_when_it_is_not_utf8(binary_media_types: list[str]) -> None:
    """Content type conversions in API Gateway (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-payload-encodings-workflow.html):
    without a matching binary media type the payload is handled as a UTF-8 string, so bytes
    that are not UTF-8 do not survive; they are never switched to base64."""
    # Given an API that does not list application/json as binary
    functions = EchoFunctions()
    gateway = _plain(_api(binary_media_types=binary_media_types), functions)
    # When a JSON body with a byte that is not UTF-8 (Latin-1 "é") is posted
    body = '{"prompt": "caf\u00e9"}'.encode("latin-1")
    assert _send(gateway, "POST", "/v1/jobs", body, {"Content-Type": "application/json"}).status == 200
    # Then it reaches the function as text, the bad byte replaced, not as base64
    event = functions.seen[0]
    assert event["isBase64Encoded"] is False
    assert event["body"] == '{"prompt": "caf\ufffd"}'


PNG_BASE64 = base64.b64encode(PNG).decode()
BASE64_REPLY = {
    "statusCode": 200,
    "headers": {"Content-Type": "image/png"},
    "body": PNG_BASE64,
    "isBase64Encoded": True,
}


@pytest.mark.parametrize(
    ("binary_media_types", "accept", "expected"),
    [
        (["image/*"], "image/png", PNG),
        (["*/*"], "application/json", PNG),
        (["image/*"], "application/json, image/png", PNG_BASE64.encode()),
        (["image/*"], None, PNG_BASE64.encode()),
        ([], "image/png", PNG_BASE64.encode()),
    ],
    ids=["accept matches", "*/* matches all", "only the first Accept counts", "no Accept", "no binary types"],
)
def test_a_base64_response_is_decoded_only_for_a_binary_accept(
    binary_media_types: list[str], accept: str | None, expected: bytes
) -> None:
    """Binary media types for REST APIs in API Gateway (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-payload-encodings.html)
    and Return binary media from a Lambda proxy integration (https://docs.aws.amazon.com/apigateway/latest/developerguide/lambda-proxy-binary-media.html):
    the first Accept media type decides whether a base64 response goes out as binary."""
    # Given a function that answers a PNG in base64
    gateway = _plain(_api(binary_media_types=binary_media_types), EchoFunctions(reply=BASE64_REPLY))
    # When a client asks for it with this Accept header
    reply = _send(gateway, "GET", "/v1/jobs", headers={"Accept": accept} if accept else None)
    # Then it gets the bytes only when that media type is binary, else the base64 text itself
    assert (reply.status, reply.body) == (200, expected)


def test_a_base64_response_that_does_not_decode_is_a_500() -> None:
    """Gateway response types for API Gateway (https://docs.aws.amazon.com/apigateway/latest/developerguide/supported-gateway-response-types.html):
    API_CONFIGURATION_ERROR (500) covers base64 decoding failing on binary data."""
    # Given a function that flags a body as base64 that is not
    reply_payload = {**BASE64_REPLY, "body": "not base64!"}
    gateway = _plain(_api(binary_media_types=["image/*"]), EchoFunctions(reply=reply_payload))
    # When a client asks for binary, Then API Gateway's configuration error
    reply = _send(gateway, "GET", "/v1/jobs", headers={"Accept": "image/png"})
    assert reply.status == 500
    assert json.loads(reply.body) == {"message": "Internal server error"}


# ---- unmatched methods and paths --------------------------------------------------------------

MISSING_TOKEN = GatewayResponseSpec(
    "MISSING_AUTHENTICATION_TOKEN",
    404,
    {"Content-Type": "application/problem+json"},
    {"application/json": '{"code": "route_not_found", "detail": $context.error.messageString}'},
)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/openapi.json"), ("DELETE", "/v1/openapi.json"), ("GET", "/v1"), ("GET", "/v2/jobs")],
    ids=["POST on a GET-only resource", "DELETE on it", "a resource without methods", "no resource"],
)
def test_an_unmatched_method_or_path_is_403_missing_authentication_token(method: str, path: str) -> None:
    """How do I resolve API Gateway REST API 'Missing Authentication Token' errors?
    (https://repost.aws/knowledge-center/api-gateway-authentication-token-errors): a request to
    a method or resource that does not exist is a 403 "Missing Authentication Token"."""
    # Given /v1/openapi.json (GET) beside /v1/{proxy+} (ANY)
    functions = EchoFunctions()
    gateway = _plain(_api(), functions)
    # When a request names a method the matched resource lacks, or no resource at all
    reply = _send(gateway, method, path)
    # Then API Gateway's 403, and the greedy parent's function is not asked
    assert reply.status == 403
    assert json.loads(reply.body) == {"message": "Missing Authentication Token"}
    assert functions.seen == []


def test_the_missing_authentication_token_response_follows_the_template() -> None:
    """Gateway response types for API Gateway (https://docs.aws.amazon.com/apigateway/latest/developerguide/supported-gateway-response-types.html):
    MISSING_AUTHENTICATION_TOKEN is customisable like every gateway response."""
    # Given a template that customises MISSING_AUTHENTICATION_TOKEN
    gateway = _plain(_api(gateway_responses={"MISSING_AUTHENTICATION_TOKEN": MISSING_TOKEN}), EchoFunctions())
    # When no method matches, Then its status, headers and template
    reply = _send(gateway, "POST", "/v1/openapi.json")
    assert reply.status == 404
    assert dict(reply.headers)["Content-Type"] == "application/problem+json"
    assert json.loads(reply.body) == {"code": "route_not_found", "detail": "Missing Authentication Token"}


# ---- stage throttling -------------------------------------------------------------------------


def _template_api(
    burst: int | None = None,
    method_settings: list[dict[str, Any]] | None = None,
    binary_media_types: list[str] | None = None,
) -> ApiSpec:
    """The API of the app's synthesized template: its stage burst lowered to `burst`, more
    MethodSettings, or BinaryMediaTypes, as CloudFormation spells them."""
    template = copy.deepcopy(default_app_template().template)
    for resource in template["Resources"].values():
        properties = resource["Properties"]
        if resource["Type"] == "AWS::ApiGateway::Stage":
            for setting in properties["MethodSettings"]:
                if burst is not None:
                    # A refill too slow to matter while the test runs.
                    setting.update(ThrottlingBurstLimit=burst, ThrottlingRateLimit=0.001)
            properties["MethodSettings"] += method_settings or []
        if resource["Type"] == "AWS::ApiGateway::RestApi" and binary_media_types:
            properties["BinaryMediaTypes"] = binary_media_types
    reader = TemplateReader(
        template, {key: key for key in template["Resources"]}, "123456789012", "us-east-1"
    )
    return reader.api(reader.function_names())


def test_the_sandbox_throttles_the_stage_as_the_template_says() -> None:
    """AWS::ApiGateway::Stage MethodSetting (https://docs.aws.amazon.com/AWSCloudFormation/latest/
    TemplateReference/aws-properties-apigateway-stage-methodsetting.html): ResourcePath "/*" with
    HttpMethod "*" sets ThrottlingRateLimit and ThrottlingBurstLimit for every method."""
    # Given the app's template: one stage throttle for every method, and */* binary
    config = LlmqConfig()
    api = _template_api()
    # Then the sandbox reads the stage's rate and burst, and hands the api every body as bytes
    proxy = next(route for route in api.routes if route.resource_path == "/v1/{proxy+}")
    throttle = api.throttle_for(proxy)
    assert throttle is not None
    assert (throttle.rate_per_second, throttle.burst) == (
        config.limits.stage_rate_per_second,
        config.limits.stage_burst,
    )
    assert api.binary_media_types == ["*/*"]


def test_a_method_setting_and_binary_media_types_are_read_as_cloudformation_spells_them() -> None:
    """AWS::ApiGateway::Stage MethodSetting (https://docs.aws.amazon.com/AWSCloudFormation/latest/
    TemplateReference/aws-properties-apigateway-stage-methodsetting.html): a resource path's
    slashes are written ~1 (/~1v1~1openapi.json); AWS::ApiGateway::RestApi BinaryMediaTypes
    write the slash of a media type the same way (image~1png)."""
    # Given a template that throttles GET /v1/openapi.json on its own and lists image/png
    setting = {"ResourcePath": "/~1v1~1openapi.json", "HttpMethod": "GET", "ThrottlingBurstLimit": 1}
    api = _template_api(method_settings=[setting], binary_media_types=["image~1png"])
    # Then that method has its own limit, the others the stage's, and image/png is binary
    by_path = {route.resource_path: api.throttle_for(route) for route in api.routes}
    assert [(t.burst if t else None) for t in by_path.values()] == [1, LlmqConfig().limits.stage_burst]
    assert api.binary_media_types == ["image/png"]


def test_past_the_stage_burst_the_client_gets_the_templates_throttled_response() -> None:
    """Throttle requests to your REST APIs for better throughput in API Gateway
    (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-request-throttling.html): a token bucket per method; past the burst the
    client gets 429, the THROTTLED gateway response (https://docs.aws.amazon.com/apigateway/latest/developerguide/supported-gateway-response-types.html)."""
    # Given the app's API with a stage burst of 3 and no refill to speak of
    functions = EchoFunctions()
    gateway = _plain(_template_api(burst=3), functions)
    # When four requests come in at once
    replies = [_send(gateway, "GET", "/v1/openapi.json") for _ in range(4)]
    # Then the fourth gets the template's THROTTLED response: 429, problem+json
    assert [reply.status for reply in replies] == [200, 200, 200, 429]
    assert dict(replies[3].headers)["Content-Type"] == "application/problem+json"
    problem = json.loads(replies[3].body)
    assert (problem["status"], problem["code"], problem["detail"]) == (
        429,
        "rate_limited",
        "Too Many Requests",
    )
    # And it reached no function
    assert len(functions.seen) == 3


def test_each_method_has_its_own_bucket_and_a_method_setting_beats_the_stage_default() -> None:
    """Throttle requests to your REST APIs for better throughput in API Gateway
    (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-request-throttling.html): per-stage limits apply at the method level, the
    same for all methods or set per method."""
    # Given a stage default of 2 and a setting of 1 for GET /v1/openapi.json
    throttles = [
        ThrottleSpec("/v1/openapi.json", "GET", rate_per_second=0.001, burst=1),
        ThrottleSpec("/*", "*", rate_per_second=0.001, burst=2),
    ]
    functions = EchoFunctions()
    gateway = _plain(_api(throttles=throttles), functions)
    # When each method is called three times
    document = [_send(gateway, "GET", "/v1/openapi.json").status for _ in range(3)]
    jobs = [_send(gateway, "GET", "/v1/jobs").status for _ in range(3)]
    # Then each runs out at its own limit, with API Gateway's default answer
    assert (document, jobs) == ([200, 429, 429], [200, 200, 429])
    assert json.loads(_send(gateway, "GET", "/v1/jobs").body) == {"message": "Too Many Requests"}
    assert len(functions.seen) == 3


def test_a_throttled_invoke_of_the_function_is_a_500() -> None:
    """How do I troubleshoot 500 errors from API Gateway with a Lambda integration?
    (https://repost.aws/knowledge-center/api-gateway-internal-server-error): a throttled
    backend (Lambda's 429 TooManyRequestsException) is an Internal server error to the client."""

    # Given a function whose invoke Lambda refuses with 429 (TooManyRequestsException)
    class Throttled(EchoFunctions):
        def invoke(
            self, name: str, event: Any, timeout_seconds: float | None = None, *, throttle: bool = False
        ) -> InvocationResult:
            self.seen.append(event)
            return InvocationResult(function=name, request_id="r", outcome=Outcome.THROTTLED)

    # When a request comes in, Then API Gateway's 500, not a 429 the client would retry on its own
    reply = _send(_plain(_api(), Throttled()), "GET", "/v1/jobs")
    assert reply.status == 500
    assert json.loads(reply.body) == {"message": "Internal server error"}


@pytest.mark.parametrize(
    "reply",
    [
        {"statusCode": 200, "body": {"id": "job_1"}},
        {"statusCode": 200, "body": "{}", "multiValueHeaders": {"Retry-After": "30"}},
        {"statusCode": 200, "body": "{}", "headers": {"X-Ids": ["a", "b"]}},
    ],
    ids=["a body that is not a string", "multi-value headers that are not a list", "a header that is a list"],
)
def test_a_malformed_proxy_response_is_a_502(reply: dict[str, Any]) -> None:
    """Handling Lambda errors with an API Gateway API: a proxy response whose body is not a string
    or whose headers are not of their documented shapes is "Malformed Lambda proxy response", a
    502 to the client (hunt 226: the sandbox sent a body's Python repr, a string split into one
    header per character)."""
    reply = _send(_plain(_api(), EchoFunctions(reply=reply)), "GET", "/v1/jobs")
    assert reply.status == 502
