"""Security over HTTP, on one sandbox configured like a deployed stack (DESIGN §2, §3.9).

- tenants are isolated: another tenant's job is invisible (404), to read, cancel, list or
  redeliver;
- a missing, malformed, unknown or revoked key gets 401 problem+json, and a revoked key stops
  working within the authorizer cache TTL (shortened to 1 s here);
- webhook URLs aimed at the cloud metadata endpoint, private, loopback, CGNAT or unspecified
  addresses are refused at submit with 422 `invalid_webhook_url`, and nothing is stored;
- oversized bodies get 413;
- prompts and outputs never reach a log: the sandbox's own log and every function's log are
  searched for the texts sent and received.

Loopback receivers are turned off (as outside the sandbox), so loopback URLs are refused too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from llmq.models import TERMINAL_STATUSES
from llmq.tenants import TenantRepository
from tests.e2e.conftest import SandboxUnderTest, wait_until

pytestmark = pytest.mark.e2e

AUTHORIZER_CACHE_SECONDS = 1
PROBLEM_JSON = "application/problem+json"
# Stands in for a job of someone else, and for one that never existed.
UNKNOWN_JOB = "job_0000000000000000000000000000"


SANDBOX_CONFIG: dict[str, Any] = {
    "limits": {"authorizer_cache_seconds": AUTHORIZER_CACHE_SECONDS},
    "webhooks": {"allow_loopback_http": False},
}


@pytest.fixture(scope="module")
def sandbox(sandbox_factory: Any) -> SandboxUnderTest:
    started: SandboxUnderTest = sandbox_factory(SANDBOX_CONFIG)
    return started


def submit(sandbox: SandboxUnderTest, tier: str, body: Any, **headers: str) -> httpx.Response:
    with sandbox.api(tier) as client:
        return client.post("/v1/jobs", json=body, headers=headers)


def all_job_ids(sandbox: SandboxUnderTest, tier: str, status: str | None = None) -> list[str]:
    """Every job the tenant can list, following the cursor."""
    ids: list[str] = []
    params: dict[str, Any] = {"limit": 100, **({"status": status} if status else {})}
    with sandbox.api(tier) as client:
        while True:
            page = client.get("/v1/jobs", params=params)
            assert page.status_code == 200, page.text
            ids += [job["id"] for job in page.json()["data"]]
            cursor = page.json().get("next_cursor")
            if not cursor:
                return ids
            params["cursor"] = cursor


# The list reads an index that follows writes within about a second, as DynamoDB's global
# secondary indexes do (the sandbox lags its indexes by 1 s, LLMQ_SANDBOX_INDEX_LAG): a check
# that nothing was stored lists before and after once earlier writes have reached it.
INDEX_SETTLE_SECONDS = 1.5


def settled_job_ids(sandbox: SandboxUnderTest, tier: str) -> list[str]:
    time.sleep(INDEX_SETTLE_SECONDS)
    return all_job_ids(sandbox, tier)


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == PROBLEM_JSON
    problem: dict[str, Any] = response.json()
    assert (problem["status"], problem["code"]) == (status, code)
    return problem


# ---- tenant isolation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enterprise_job(sandbox: SandboxUnderTest) -> str:
    """A job of the enterprise tenant, slow enough to still be in flight while others poke at it."""
    accepted = submit(sandbox, "enterprise", {"prompt": "Board minutes [[latency:5]]"})
    assert accepted.status_code == 202, accepted.text
    job_id: str = accepted.json()["id"]
    return job_id


def test_another_tenants_job_cannot_be_read_and_looks_like_no_job_at_all(
    sandbox: SandboxUnderTest, enterprise_job: str
) -> None:
    # When the free tenant asks for the enterprise tenant's job, and for a job that never existed
    with sandbox.api("free") as stranger:
        theirs = stranger.get(f"/v1/jobs/{enterprise_job}")
        waited = stranger.get(f"/v1/jobs/{enterprise_job}", params={"wait": 1})
        nowhere = stranger.get(f"/v1/jobs/{UNKNOWN_JOB}")
    # Then all three are 404 job_not_found, never 403, and alike but for the id
    for response in (theirs, waited, nowhere):
        assert_problem(response, 404, "job_not_found")
    assert {k: v for k, v in theirs.json().items() if k != "detail"} == {
        k: v for k, v in nowhere.json().items() if k != "detail"
    }
    # And the owner still sees it
    with sandbox.api("enterprise") as owner:
        assert owner.get(f"/v1/jobs/{enterprise_job}").status_code == 200


def test_another_tenant_cannot_cancel_a_job_and_the_job_runs_on(
    sandbox: SandboxUnderTest, enterprise_job: str
) -> None:
    # When the free tenant tries to cancel the enterprise tenant's job while it is in flight
    with sandbox.api("free") as stranger:
        refused = stranger.post(f"/v1/jobs/{enterprise_job}/cancel")
    # Then it is 404, and the job is neither canceled nor marked for cancellation
    assert_problem(refused, 404, "job_not_found")
    job = sandbox.wait_terminal(enterprise_job)
    assert (job["status"], job["cancel_requested"]) == ("succeeded", False)


def test_another_tenant_cannot_redeliver_a_jobs_webhook(
    sandbox: SandboxUnderTest, enterprise_job: str
) -> None:
    assert sandbox.wait_terminal(enterprise_job)["status"] in TERMINAL_STATUSES
    with sandbox.api("free") as stranger:
        refused = stranger.post(f"/v1/jobs/{enterprise_job}/webhook/redeliver")
    with sandbox.api("enterprise") as owner:
        owned = owner.post(f"/v1/jobs/{enterprise_job}/webhook/redeliver")
    # Then the stranger gets 404; the owner learns the job simply has no webhook
    assert_problem(refused, 404, "job_not_found")
    assert_problem(owned, 409, "no_webhook")


def test_each_tenant_lists_only_its_own_jobs(sandbox: SandboxUnderTest, enterprise_job: str) -> None:
    # Given a job of each tenant
    free_job = submit(sandbox, "free", {"prompt": "Hobby project [[latency:0.1]]"}).json()["id"]
    sandbox.wait_terminal(free_job, "free")
    # When each lists everything it can, unfiltered and by status, once the list (an index
    # that may lag a write by a moment, as DynamoDB's do) shows the free job's end
    assert wait_until(lambda: free_job in all_job_ids(sandbox, "free", status="succeeded"), timeout=10)
    enterprise_ids = all_job_ids(sandbox, "enterprise")
    free_ids = all_job_ids(sandbox, "free")
    free_succeeded = all_job_ids(sandbox, "free", status="succeeded")
    # Then each sees its own job and none of the other's
    assert enterprise_job in enterprise_ids and free_job not in enterprise_ids
    assert free_job in free_ids and enterprise_job not in free_ids
    assert free_job in free_succeeded and enterprise_job not in free_succeeded
    assert not set(enterprise_ids) & set(free_ids)


def test_a_cursor_of_another_tenant_does_not_open_its_list(sandbox: SandboxUnderTest) -> None:
    # Given a cursor into the enterprise tenant's list (at least two of its jobs exist)
    for n in range(2):
        submit(sandbox, "enterprise", {"prompt": f"Cursor probe {n}"})
    with sandbox.api("enterprise") as owner:
        # The list may lag the submits by a moment (an index, as DynamoDB's)
        cursor = wait_until(
            lambda: owner.get("/v1/jobs", params={"limit": 1}).json()["next_cursor"], timeout=10
        )
    assert cursor
    # When the free tenant pages with it
    with sandbox.api("free") as stranger:
        page = stranger.get("/v1/jobs", params={"limit": 100, "cursor": cursor})
    # Then it is refused, or shows only the free tenant's own jobs
    enterprise_ids = set(all_job_ids(sandbox, "enterprise"))
    if page.status_code == 200:
        assert not {job["id"] for job in page.json()["data"]} & enterprise_ids
    else:
        assert_problem(page, 400, "invalid_cursor")


# ---- authentication ---------------------------------------------------------------------------

ROUTES = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", f"/v1/jobs/{UNKNOWN_JOB}"),
    ("POST", f"/v1/jobs/{UNKNOWN_JOB}/cancel"),
    ("POST", f"/v1/jobs/{UNKNOWN_JOB}/webhook/redeliver"),
]


def _bad_authorizations(key: str) -> dict[str, str | None]:
    return {
        "missing": None,
        "empty": "",
        "scheme only": "Bearer",
        "basic": "Basic dXNlcjpwYXNzd29yZA==",
        "basic with the key": f"Basic {key}",
        "garbage": "garbage",
        "the key without a scheme": key,
        "another scheme": f"Token {key}",
        "unknown key": "Bearer llmq_sk_" + "A" * 43,
        "the key with a character more": f"Bearer {key}x",
        "the key with a character less": f"Bearer {key[:-1]}",
        "two keys": f"Bearer {key} {key}",
    }


def test_requests_without_a_valid_key_get_401_problem_json_on_every_route(
    sandbox: SandboxUnderTest,
) -> None:
    key = sandbox.tenant("enterprise")["api_key"]
    before = settled_job_ids(sandbox, "enterprise")
    not_refused: dict[str, str] = {}
    for name, authorization in _bad_authorizations(key).items():
        headers = {} if authorization is None else {"Authorization": authorization}
        for method, path in ROUTES:
            body = {"prompt": "Should never be stored"} if method == "POST" else None
            # When a request carries this Authorization header (or none)
            response = httpx.request(method, f"{sandbox.api_url}{path}", headers=headers, json=body)
            # Then API Gateway answers 401 with the problem+json gateway response
            answer = (response.status_code, response.headers.get("content-type"), response.json().get("code"))
            if answer != (401, PROBLEM_JSON, "unauthenticated"):
                not_refused[f"{name}: {method} {path}"] = str(answer)
    assert not_refused == {}, f"not refused with 401 unauthenticated: {not_refused}"
    # And no job was created on anybody's behalf
    assert settled_job_ids(sandbox, "enterprise") == before


@contextmanager
def tenants_of(sandbox: SandboxUnderTest) -> Iterator[TenantRepository]:
    """llmq's TenantRepository, with clients of the sandbox's moto acting as its operator; its
    tenants get their usage plan key, as `llmq tenants create` gives it (else API Gateway 403s)."""
    from llmq.usage_plans import ApiGatewayUsagePlans

    operator = sandbox.state["aws_credentials"]
    session = boto3.session.Session(
        region_name=sandbox.state["region"],
        aws_access_key_id=operator["aws_access_key_id"],
        aws_secret_access_key=operator["aws_secret_access_key"],
    )
    dynamodb = session.client("dynamodb", endpoint_url=sandbox.state["aws_endpoint_url"])
    apigateway = session.client("apigateway", endpoint_url=sandbox.state["aws_endpoint_url"])
    outputs = sandbox.stack_outputs()
    usage_plans = ApiGatewayUsagePlans(apigateway, json.loads(outputs["UsagePlanIds"]))
    try:
        yield TenantRepository(outputs["TenantsTableName"], dynamodb=dynamodb, usage_keys=usage_plans)
    finally:
        dynamodb.close()
        apigateway.close()


def test_a_revoked_key_gets_401_within_the_authorizer_cache_ttl(
    sandbox: SandboxUnderTest, config: dict[str, Any]
) -> None:
    ttl = config["limits"]["authorizer_cache_seconds"]
    assert ttl == AUTHORIZER_CACHE_SECONDS
    # Given a new tenant whose key works (and is now in the authorizer cache)
    with tenants_of(sandbox) as tenants:
        created = tenants.create("Short Lived Ltd", "enterprise")
    key = created.api_key
    url = f"{sandbox.api_url}/v1/jobs"
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(url, headers=headers).status_code == 200
    accepted = httpx.post(url, headers=headers, json={"prompt": "Before revocation"})
    assert accepted.status_code == 202, accepted.text
    # When its key is revoked
    with tenants_of(sandbox) as tenants:
        tenants.revoke_key(key)
    revoked_at = time.monotonic()
    # Then once the TTL has passed since the revocation (whatever the cache held was put there
    # before it), every route answers 401
    time.sleep(max(0.0, revoked_at + ttl + 0.1 - time.monotonic()))
    assert httpx.get(url, headers=headers).status_code == 401
    for method, path in ROUTES:
        body = {"prompt": "After revocation"} if method == "POST" else None
        response = httpx.request(method, f"{sandbox.api_url}{path}", headers=headers, json=body)
        assert_problem(response, 401, "unauthenticated")
    assert_problem(httpx.get(f"{url}/{accepted.json()['id']}", headers=headers), 401, "unauthenticated")
    # And the other tenants' keys still work
    assert httpx.get(url, headers={"Authorization": f"Bearer {sandbox.tenant('free')['api_key']}"}).is_success


# ---- SSRF -------------------------------------------------------------------------------------

SSRF_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://169.254.169.254/latest/meta-data/",
    "https://[fd00:ec2::254]/latest/meta-data/",
    "https://10.0.0.1/",
    "https://172.16.0.1/hook",
    "https://192.168.1.1/hook",
    "https://100.64.0.1/",
    "https://0.0.0.0/",
    "https://127.0.0.1/",
    "https://localhost/hook",
    "https://127.1/hook",
    "https://2130706433/hook",
    "https://[::1]/",
    "https://[::ffff:127.0.0.1]/",
    "https://[::ffff:169.254.169.254]/",
    "https://[64:ff9b::a9fe:a9fe]/",
    "https://[fe80::1]/",
    "https://224.0.0.1/",
    "https://user:pass@10.0.0.1/",
]


@pytest.mark.parametrize("url", SSRF_URLS)
def test_a_webhook_url_aimed_inside_is_refused_at_submit_and_nothing_is_stored(
    sandbox: SandboxUnderTest, url: str
) -> None:
    # When a job is submitted with this webhook URL (with an Idempotency-Key, so a stored
    # job would show on replay too)
    idempotency_key = f"ssrf-{uuid.uuid4().hex}"
    response = submit(
        sandbox,
        "enterprise",
        {"prompt": "Exfiltrate [[latency:0.1]]", "webhook": {"url": url}},
        **{"Idempotency-Key": idempotency_key},
    )
    # Then it is refused with 422 invalid_webhook_url
    assert_problem(response, 422, "invalid_webhook_url")
    # And no job was stored: the key is still free
    fresh = submit(
        sandbox, "enterprise", {"prompt": "Legit [[latency:0.1]]"}, **{"Idempotency-Key": idempotency_key}
    )
    assert fresh.status_code == 202 and "idempotent-replayed" not in fresh.headers
    # and, once the list (an index that follows writes within about a second, as DynamoDB's
    # do) shows the later job, it shows none with the refused URL
    assert wait_until(lambda: fresh.json()["id"] in all_job_ids(sandbox, "enterprise"), timeout=10)
    with sandbox.api("enterprise") as client:
        listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    assert not [job for job in listed if (job.get("webhook") or {}).get("url") == url]


# ---- oversized bodies -------------------------------------------------------------------------


def test_a_body_over_the_api_limit_gets_413_and_nothing_is_stored(
    sandbox: SandboxUnderTest, config: dict[str, Any]
) -> None:
    limit = config["limits"]["max_body_bytes"]
    before = settled_job_ids(sandbox, "enterprise")
    body = json.dumps({"prompt": "x" * limit})
    with sandbox.api("enterprise") as client:
        response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert_problem(response, 413, "payload_too_large")
    assert settled_job_ids(sandbox, "enterprise") == before


def test_a_prompt_over_the_character_limit_gets_413(
    sandbox: SandboxUnderTest, config: dict[str, Any]
) -> None:
    limit = config["limits"]["max_prompt_chars"]
    assert limit + 1 < config["limits"]["max_body_bytes"], "the prompt limit must be reachable"
    before = settled_job_ids(sandbox, "enterprise")
    response = submit(sandbox, "enterprise", {"messages": [{"role": "user", "content": "y" * (limit + 1)}]})
    assert_problem(response, 413, "prompt_too_large")
    assert settled_job_ids(sandbox, "enterprise") == before


def test_a_body_over_api_gateways_payload_limit_gets_413_problem_json(sandbox: SandboxUnderTest) -> None:
    # API Gateway refuses a payload over 10 MB itself, before the authorizer or the function
    body = b'{"prompt": "' + b"z" * (10 * 1024 * 1024) + b'"}'
    with sandbox.api("enterprise") as client:
        response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    # DESIGN §2: every error body is problem+json, the gateway's own included
    assert response.headers["content-type"].split(";")[0] == PROBLEM_JSON, response.text


# ---- privacy ----------------------------------------------------------------------------------


def sandbox_logs(sandbox: SandboxUnderTest) -> dict[Path, str]:
    """The sandbox's log (detached: .llmq/sandbox.log) and every function's (.llmq/logs/)."""
    root = sandbox.directory / ".llmq"
    files = [root / "sandbox.log", *sorted((root / "logs").glob("*.log"))]
    return {path: path.read_text(errors="replace") for path in files if path.exists()}


def test_prompts_and_outputs_never_appear_in_any_log(sandbox: SandboxUnderTest) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    prompts = {
        "succeeds": f"{secret}-a Tell me about the merger [[tokens:32]]",
        "retried": f"{secret}-b Summarise the audit [[fail:503x1]] [[tokens:32]]",
        "refused by the provider": f"{secret}-c Too long [[fail:400:context_length_exceeded]]",
        "canceled": f"{secret}-d Draft the layoffs memo [[latency:5]]",
    }
    # Given jobs whose prompts carry a secret: plain, as messages, retried, failed, canceled
    ids = {
        name: submit(sandbox, "enterprise", {"prompt": text}).json()["id"] for name, text in prompts.items()
    }
    messages = [
        {"role": "system", "content": f"{secret}-e You are the CFO"},
        {"role": "user", "content": f"{secret}-f Forecast Q3 [[tokens:32]]"},
    ]
    ids["messages"] = submit(sandbox, "free", {"messages": messages}).json()["id"]
    time.sleep(0.5)
    with sandbox.api("enterprise") as client:
        assert client.post(f"/v1/jobs/{ids['canceled']}/cancel").status_code in (200, 202)
    # And requests refused with the secret inside: invalid, too large, an idempotency conflict
    refusals = [
        submit(sandbox, "enterprise", {"messages": [{"role": "wizard", "content": f"{secret}-g"}]}),
        submit(sandbox, "enterprise", {"prompt": f"{secret}-h", "temperature": 9}),
        submit(sandbox, "enterprise", {"prompt": f"{secret}-i " + "w" * 200_001}),
        submit(sandbox, "enterprise", {"prompt": f"{secret}-j one"}, **{"Idempotency-Key": secret}),
        submit(sandbox, "enterprise", {"prompt": f"{secret}-k two"}, **{"Idempotency-Key": secret}),
    ]
    assert [response.status_code for response in refusals] == [422, 422, 413, 202, 422]
    # Then no refusal echoes the prompt back
    assert not [
        response.text for response in refusals if secret in response.text and response.status_code >= 400
    ]
    # When every job has finished
    tiers = {"messages": "free"}
    jobs = {
        name: sandbox.wait_terminal(job_id, tiers.get(name, "enterprise")) for name, job_id in ids.items()
    }
    jobs["idempotent"] = sandbox.wait_terminal(refusals[3].json()["id"])
    assert (
        jobs["succeeds"]["status"] == jobs["retried"]["status"] == jobs["messages"]["status"] == "succeeded"
    )
    assert jobs["refused by the provider"]["status"] == "failed"
    assert jobs["canceled"]["status"] == "canceled"
    outputs = [job["result"]["output"] for job in jobs.values() if job["status"] == "succeeded"]
    assert all(len(output.split()) >= 8 for output in outputs)
    time.sleep(2)  # the functions' last lines reach their log files
    logs = sandbox_logs(sandbox)
    # Then the logs are the right ones: they name every job
    everything = "\n".join(logs.values())
    assert {path.name for path in logs} >= {"sandbox.log", "api.log", "worker.log"}
    assert all(job_id in everything for job_id in ids.values())
    # And not one of them holds a prompt, or an output
    leaks = {
        f"{path.name}: {what}"
        for path, text in logs.items()
        for what, needle in [("a prompt", secret), *(("an output", output) for output in outputs)]
        if needle in text
    }
    assert leaks == set(), f"found in the logs: {sorted(leaks)}"
