"""The sandbox's API Gateway answers llmq's API as API Gateway would, from the deployed template.

"Content type conversions in API Gateway"
(https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-payload-encodings-workflow.html):
a body is base64 in the event only when its Content-Type matches one of the API's binary
media types, and UTF-8 text (bad bytes replaced) otherwise; llmq's API declares */*, so the
api function always sees the bytes the client sent.

"How do I resolve API Gateway REST API 'Missing Authentication Token' errors?"
(https://repost.aws/knowledge-center/api-gateway-authentication-token-errors): a method the
matched resource does not have is a 403 from API Gateway, not a request to the function.

"Throttle requests to your REST APIs for better throughput in API Gateway"
(https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-request-throttling.html):
the stage's rate and burst (limits.stage_rate_per_second and stage_burst in the template) are a
token bucket per method; past them, the template's THROTTLED gateway response.
(The burst itself is tested on the gateway built from the template, tests/unit/test_gateway_fidelity.py,
without a sandbox of its own.)
"""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import SandboxUnderTest

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def _post_job(sandbox: SandboxUnderTest, body: bytes, content_type: str) -> httpx.Response:
    key = sandbox.tenant("enterprise")["api_key"]
    return httpx.post(
        f"{sandbox.api_url}/v1/jobs",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
        timeout=40,
    )


def test_a_body_that_is_not_utf8_reaches_llmq_as_its_bytes_and_is_refused(
    sandbox: SandboxUnderTest,
) -> None:
    # Given a JSON body in Latin-1: one byte ("é") that is not UTF-8
    body = '{"prompt": "hello", "metadata": {"city": "caf\u00e9"}}'.encode("latin-1")
    # When it is submitted
    response = _post_job(sandbox, body, "application/json")
    # Then the api function saw the client's bytes (the API declares */* binary, so they came
    # base64-encoded instead of as text with U+FFFD in place of the byte) and refused them,
    # instead of accepting "caf\ufffd" as the user's data
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["code"] == "malformed_json"


@pytest.mark.parametrize(
    ("content_type", "status"), [("application/json", 400), ("image/png", 415)], ids=["as JSON", "as PNG"]
)
def test_a_binary_body_is_answered_with_a_problem_not_a_5xx(
    sandbox: SandboxUnderTest, content_type: str, status: int
) -> None:
    # When the bytes of a PNG are submitted
    response = _post_job(sandbox, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", content_type)
    # Then llmq refuses them with its problem+json: not JSON, or not a media type it takes
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_a_method_the_openapi_resource_lacks_is_api_gateways_403(
    sandbox: SandboxUnderTest, method: str
) -> None:
    # Given /v1/openapi.json, a resource of its own with GET only, beside /v1/{proxy+}
    key = sandbox.tenant("enterprise")["api_key"]
    before = len(sandbox.invocations(function="api"))
    # When another method is sent to it
    response = httpx.request(
        method, f"{sandbox.api_url}/v1/openapi.json", headers={"Authorization": f"Bearer {key}"}
    )
    # Then API Gateway's 403, and the proxy's function is not asked (it would say 405)
    assert response.status_code == 403
    assert response.json()["detail"] == "Missing Authentication Token"
    assert len(sandbox.invocations(function="api")) == before
