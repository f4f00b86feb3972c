"""The public API fuzzed with schemathesis from its own `/v1/openapi.json`, on a sandbox.

Every generated request, valid or not, must get a status the document declares for its
operation, never a 5xx, with the declared content type and a body matching the declared
schema. Requests carry the enterprise tenant's key; `ignored_auth` also replays successes
without it and with a made-up one.

Budget: LLMQ_FUZZ_EXAMPLES examples per operation and phase (25 in `make test`, 300 in
`make fuzz`); LLMQ_FUZZ_SEED replays the per-operation run of a given seed.

Each bug the fuzzer found has a test of its own below, so that it is caught on every run
rather than when the generator happens upon it again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from stacks.template import StackTemplate
from tests.e2e.conftest import SandboxUnderTest

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("LLMQ_FUZZ_EXAMPLES", "25"))
SEED = os.environ.get("LLMQ_FUZZ_SEED")
PROBLEM_JSON = "application/problem+json"

# `positive_data_acceptance` is left out on purpose: a list cursor is an opaque token, so a
# schema-valid string the API never issued is rightly refused with 400 `invalid_cursor`.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    missing_required_header,
    unsupported_method,
    ignored_auth,
]
# Methods sent to every path to see that undeclared ones are refused. TRACE and CONNECT are
# not API Gateway methods (an `ANY` method does not route them), so they say nothing about llmq.
UNEXPECTED_METHODS = ["get", "put", "post", "delete", "patch", "options"]
# Schemathesis' default rejections, and 413: a prompt over the stated maxLength is refused as
# `prompt_too_large`, the status DESIGN §2 gives a request that is too large.
NEGATIVE_DATA_REJECTED_WITH = [
    "400",
    "401",
    "403",
    "404",
    "405",
    "406",
    "409",
    "413",
    "415",
    "422",
    "428",
    "429",
    "5xx",
]


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def _config(api_key: str) -> schemathesis.Config:
    generation: dict[str, Any] = {"max-examples": EXAMPLES, "mode": "all", "database": "none"}
    return schemathesis.Config.from_dict(
        {
            **({"seed": int(SEED)} if SEED else {}),
            "auth": {"openapi": {"bearer": {"bearer": api_key}}},
            "generation": generation,
            "phases": {"coverage": {"unexpected-methods": UNEXPECTED_METHODS}},
            "checks": {"negative_data_rejection": {"expected-statuses": NEGATIVE_DATA_REJECTED_WITH}},
            "request-timeout": 40,
            "warnings": False,
        }
    )


def _submittable(case: Case, receiver_url: str) -> Case:
    """Steer a schema-valid submit past the rules the published document does not state.

    JobRequest's schema does not say that `prompt` and `messages` exclude each other (the
    API refuses both with a declared 422). Left alone, almost no positive submit would be
    accepted, and the accept path would go unfuzzed. Every other limit is in the schema.
    """
    meta = case.meta
    body = case.body
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE or not isinstance(body, dict):
        return case
    if "prompt" in body and "messages" in body:
        body.pop("messages" if len(str(body["prompt"])) % 2 else "prompt")
    if body.get("prompt") is None and body.get("messages") is None:
        body.pop("messages", None)
        body["prompt"] = "fuzzed prompt"
    # A fuzzed webhook host would make the SSRF guard resolve names beyond loopback.
    webhook = body.get("webhook")
    if isinstance(webhook, dict) and "url" in webhook:
        webhook["url"] = f"{receiver_url}/hooks/fuzz"
    return case


# A body past this never reaches llmq: base64-encoded in the event (a third larger), it passes
# Lambda's 6 MB invoke limit, and API Gateway answers 502 itself, on AWS as in the sandbox
# (docs/sandbox.md). Up to it, llmq answers (a 413 past `max_body_bytes`). A submit reaches it
# too: a prompt at its 2,000,000-character maxLength is 6 MB in a three-byte character.
INVOKABLE_BODY_BYTES = 4_600_000


def _invokable(body: Any) -> Any:
    """A generated body that could not be handed to the function, cut to one that can: its
    longest strings shortened, then a batch's requests fewer, until it fits. (Measured as JSON
    with non-ASCII escaped, which is never smaller than the UTF-8 a client sends.)"""

    def too_large(value: Any) -> bool:
        return len(json.dumps(value).encode()) > INVOKABLE_BODY_BYTES

    def shorten(value: Any) -> Any:
        if isinstance(value, str):
            return value[:50_000]
        if isinstance(value, list):
            return [shorten(item) for item in value]
        if isinstance(value, dict):
            return {key: shorten(item) for key, item in value.items()}
        return value

    if not isinstance(body, dict | list | str) or not too_large(body):
        return body
    body = shorten(body)
    requests = body.get("requests") if isinstance(body, dict) else None
    while isinstance(requests, list) and len(requests) > 1 and too_large(body):
        del requests[len(requests) // 2 :]
    return body


def test_a_generated_body_too_large_to_invoke_is_cut_to_one_that_fits() -> None:
    # Given the bodies that got the gateway's 502 from a CI run: a submit whose prompt is at
    # its maxLength in a three-byte character, and a batch of many large requests
    prompt = {"prompt": "\u20ac" * 2_000_000, "model": "fake-model"}
    batch = {"requests": [{"prompt": "x" * 40_000} for _ in range(200)]}
    for body in (prompt, batch, ["\u20ac" * 2_000_000]):
        # When the fuzz hook fits it for the invoke
        fitted = _invokable(body)
        # Then it fits with room for base64, and keeps its shape
        assert len(json.dumps(fitted, ensure_ascii=False).encode()) <= INVOKABLE_BODY_BYTES
        assert type(fitted) is type(body)
    assert _invokable(prompt)["prompt"] == "\u20ac" * 50_000
    assert len(_invokable(batch)["requests"]) < 200
    # And a body that fits is left exactly as generated
    small = {"prompt": "\u20ac" * 1000}
    assert _invokable(small) is small


@pytest.fixture(scope="module")
def api_schema(sandbox: SandboxUnderTest) -> BaseSchema:
    """The document the API serves, loaded as published; requests carry the enterprise key."""
    schema = schemathesis.openapi.from_url(
        f"{sandbox.api_url}/v1/openapi.json", config=_config(sandbox.tenant("enterprise")["api_key"])
    )

    @schema.hook("map_case")
    def submittable(context: schemathesis.HookContext, case: Case) -> Case:
        operation = context.operation
        if operation is not None and (operation.method.upper(), operation.path) == ("POST", "/v1/jobs"):
            case = _submittable(case, sandbox.state["receiver_url"])
        case.body = _invokable(case.body)
        return case

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis' lazy schemas read `node._nodeid`, which pytest 9 no longer has.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.mark.timeout(120 + 6 * EXAMPLES)
@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_every_generated_request_gets_a_documented_answer_that_matches_the_schema(case: Case) -> None:
    # When schemathesis sends a generated request, valid or not, with the tenant's key
    # Then the answer is declared for the operation, is not a 5xx, and matches its schema
    case.call_and_validate(checks=CHECKS)


def _enterprise_job_ids(sandbox: SandboxUnderTest) -> set[str]:
    with sandbox.api("enterprise") as client:
        listed = client.get("/v1/jobs", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    return {job["id"] for job in listed.json()["data"]}


@pytest.fixture(scope="module", autouse=True)
def jobs_before_fuzzing(sandbox: SandboxUnderTest) -> set[str]:
    """The tenant's jobs before this module ran: other modules may share the sandbox."""
    return _enterprise_job_ids(sandbox)


def test_the_fuzzer_reached_the_accept_path(sandbox: SandboxUnderTest, jobs_before_fuzzing: set[str]) -> None:
    # A fuzz run whose submits were all refused would prove little about the Job it returns
    fuzzed = _enterprise_job_ids(sandbox) - jobs_before_fuzzing
    assert len(fuzzed) >= 3


@pytest.mark.timeout(120 + 6 * EXAMPLES)
def test_stateful_sequences_follow_the_document(api_schema: BaseSchema) -> None:
    # Given the links schemathesis infers (a submitted job's id feeds get, cancel, redeliver)
    machine = api_schema.as_state_machine()

    class Machine(machine):  # type: ignore[valid-type,misc]
        def validate_response(self, response: Any, case: Case, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs or None)

    settings = hypothesis.settings(
        max_examples=max(5, EXAMPLES // 2),
        stateful_step_count=6,
        deadline=None,
        database=None,
        # As schemathesis' own runner: generate only, since a live API replays differently.
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    # When it runs sequences of calls; Then every answer conforms. The jobs change state as
    # they run, so Hypothesis may find that a sequence no longer draws the same rules and call
    # its strategy inconsistent; schemathesis' runner starts afresh then, and so does this.
    # A check that fails raises FailureGroup, which is never retried.
    for restart in range(3):
        try:
            Machine.run(settings=settings)
            return
        except hypothesis.errors.FlakyStrategyDefinition:
            if restart == 2:
                raise


def test_a_submit_that_prefer_wait_saw_finish_is_answered_as_documented(
    sandbox: SandboxUnderTest, api_schema: BaseSchema
) -> None:
    # Given a submit with `Prefer: wait=10` for a job that finishes in well under a second
    key = sandbox.tenant("enterprise")["api_key"]
    case = api_schema["/v1/jobs"]["POST"].Case(
        body={"prompt": "Quick one [[latency:0.1]]"},
        headers={"Prefer": "wait=10", "Authorization": f"Bearer {key}"},
    )
    # When the API answers after seeing it finish (obeying Retry-After if the tests before
    # it, the fuzzer's, have spent the tenant's request rate: a 429 is a documented answer)
    response = case.call()
    for _ in range(5):
        if response.status_code != 429:
            break
        retry_after = response.headers.get("Retry-After") or "1"
        time.sleep(float(retry_after if isinstance(retry_after, str) else retry_after[0]))
        response = case.call()
    assert response.status_code in (200, 202), response.text
    assert response.json()["status"] == "succeeded", "the job should finish within the wait"
    # Then that answer (200 with the finished Job, DESIGN §2) is one the document declares
    case.validate_response(response, checks=CHECKS)


def test_a_submit_with_an_empty_metadata_key_is_refused_or_stays_readable(
    sandbox: SandboxUnderTest, api_schema: BaseSchema
) -> None:
    # Found by the stateful run: the schema allows a metadata key of any length, "" included
    with sandbox.api("enterprise") as client:
        submitted = client.post("/v1/jobs", json={"prompt": "Tagged", "metadata": {"": "untitled"}})
        api_schema["/v1/jobs"]["POST"].Case(body={}).validate_response(submitted, checks=CHECKS)
        if submitted.status_code != 202:
            return
        # Then an accepted job can be read, and the tenant's list still answers
        job_id = submitted.json()["id"]
        read, listed = client.get(f"/v1/jobs/{job_id}"), client.get("/v1/jobs")
    assert (read.status_code, listed.status_code) == (200, 200), (read.text, listed.text)
    assert sandbox.wait_terminal(job_id)["status"] == "succeeded"


def test_a_submit_body_that_is_not_utf8_is_refused_as_documented(
    sandbox: SandboxUnderTest, api_schema: BaseSchema
) -> None:
    # Found by the fuzzer: one byte that is not UTF-8 in an otherwise ordinary JSON body
    key = sandbox.tenant("enterprise")["api_key"]
    response = httpx.post(
        f"{sandbox.api_url}/v1/jobs",
        content='{"prompt": "caf\u00e9"}'.encode("latin-1"),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    # Then it is a client error the document declares (the body is not JSON text), never a 5xx
    assert response.status_code < 500, response.text
    api_schema["/v1/jobs"]["POST"].Case(body={}).validate_response(response, checks=CHECKS)


def test_a_submit_too_large_for_the_invoke_gets_the_gateways_502_and_writes_nothing(
    sandbox: SandboxUnderTest, api_schema: BaseSchema
) -> None:
    # Found by the fuzzer (a CI run): a prompt at its maxLength, 2,000,000 three-byte characters,
    # sent under an Idempotency-Key of its own (the sandbox is shared: other tests' jobs come
    # and go, so "no job" is judged by the key, not by the tenant's list)
    body = json.dumps({"prompt": "\u20ac" * 2_000_000}, ensure_ascii=False).encode()
    key = sandbox.tenant("enterprise")["api_key"]
    idempotency_key = f"too-large-{uuid.uuid4().hex}"
    response = httpx.post(
        f"{sandbox.api_url}/v1/jobs",
        content=body,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key,
        },
        timeout=60,
    )
    # Then, base64-encoded past Lambda's 6 MB invoke limit, it is API Gateway's own 502 (on
    # AWS as here: docs/sandbox.md), in the documented problem shape, and no job exists
    assert len(body) > INVOKABLE_BODY_BYTES
    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["code"] == "bad_gateway"
    documented = [status_code_conformance, content_type_conformance, response_schema_conformance]
    api_schema["/v1/jobs"]["POST"].Case(body={}).validate_response(response, checks=documented)
    # And nothing was written under its key: a small submit under it is a new job, no replay
    with sandbox.api("enterprise") as client:
        fresh = client.post("/v1/jobs", json={"prompt": "hi"}, headers={"Idempotency-Key": idempotency_key})
    assert fresh.status_code == 202, fresh.text
    assert "idempotent-replayed" not in fresh.headers


@pytest.mark.parametrize("path", ["/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/webhook/redeliver"])
@pytest.mark.parametrize(
    "content_type, size",
    [("application/json", 2 * 1024 * 1024), ("text/plain", 16)],
    ids=["oversized JSON", "not JSON"],
)
def test_a_body_sent_to_an_operation_that_takes_none_is_answered_as_documented(
    sandbox: SandboxUnderTest, api_schema: BaseSchema, path: str, content_type: str, size: int
) -> None:
    # Given an operation whose document declares no request body
    case = api_schema[path]["POST"].Case(path_parameters={"job_id": "job_0"})
    # When a client sends one anyway (too large, or not JSON)
    body = b'"' + b"b" * (size - 2) + b'"' if content_type == "application/json" else b"b" * size
    key = sandbox.tenant("enterprise")["api_key"]
    response = httpx.post(
        f"{sandbox.api_url}{path.format(job_id='job_0')}",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
    )
    # Then whatever the API answers is declared for that operation, with its schema
    assert response.status_code < 500, response.text
    case.validate_response(response, checks=CHECKS)


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND"])
def test_a_method_api_gateway_does_not_route_gets_its_json_answer(
    sandbox: SandboxUnderTest, method: str
) -> None:
    # Found by schemathesis: TRACE got http.server's 501 HTML page. An `ANY` method routes only
    # the seven methods API Gateway knows, and a request no method takes is its 403.
    key = sandbox.tenant("enterprise")["api_key"]
    response = httpx.request(method, f"{sandbox.api_url}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == "Missing Authentication Token"


def _gateway_problem_statuses(sandbox: SandboxUnderTest) -> set[int]:
    """The statuses of the template's gateway responses that answer with problem+json.

    DEFAULT_4XX sets none: it keeps API Gateway's own status (a 403 for a path the API does not
    have), which belongs to no operation of the document."""
    template = StackTemplate(sandbox.aws("cloudformation").get_template(StackName="Llmq")["TemplateBody"])
    return {
        int(resource["Properties"]["StatusCode"])
        for resource in template.of_type("AWS::ApiGateway::GatewayResponse").values()
        if PROBLEM_JSON in str(resource["Properties"].get("ResponseParameters", {}))
        and "StatusCode" in resource["Properties"]
    }


def test_every_problem_the_gateway_can_answer_is_documented_on_every_operation(
    sandbox: SandboxUnderTest,
) -> None:
    # Given the statuses API Gateway itself answers with problem+json (before any function runs)
    statuses = _gateway_problem_statuses(sandbox)
    assert 401 in statuses
    document = httpx.get(f"{sandbox.api_url}/v1/openapi.json").json()
    # Then every operation declares each of them, as problem+json
    undocumented = sorted(
        f"{method.upper()} {path}: {status}"
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        for status in statuses
        if PROBLEM_JSON not in operation["responses"].get(str(status), {}).get("content", {})
    )
    assert undocumented == [], f"gateway answers missing from the OpenAPI document: {undocumented}"
