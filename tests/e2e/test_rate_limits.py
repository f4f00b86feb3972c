"""Per-tenant request rates over HTTP: the tenant's usage plan, as the sandbox's gateway plays it.

"Throttle requests to your REST APIs" (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-request-throttling.html):
a usage plan throttles each of its API keys on a token bucket, `rate` tokens a second into a
bucket of `burst`; past it, API Gateway answers the THROTTLED gateway response (llmq's: 429
problem+json rate_limited with Retry-After). "Choose an API key source"
(https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-api-key-source.html):
a method that requires a key refuses with 403 a request whose key is in no usage plan.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SandboxUnderTest, llmq_json

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def burst(sandbox: SandboxUnderTest, api_key: str, requests: int) -> list[httpx.Response]:
    """`requests` GETs at once, as a client in a hurry sends them."""

    def get(_: int) -> httpx.Response:
        return httpx.get(
            f"{sandbox.api_url}/v1/jobs",
            params={"limit": 1},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=40,
        )

    with ThreadPoolExecutor(max_workers=requests) as pool:
        return list(pool.map(get, range(requests)))


def sandbox_limits(sandbox: SandboxUnderTest, tenant_id: str) -> dict[str, Any]:
    state = json.loads((sandbox.directory / ".llmq" / "sandbox.json").read_text())
    limits: dict[str, Any] = next(t for t in state["tenants"] if t["id"] == tenant_id)["limits"]
    return limits


def test_a_tenant_past_its_rate_gets_429_with_retry_after_and_another_tenant_does_not(
    sandbox: SandboxUnderTest,
) -> None:
    # Given two new tenants of the same tier; the operator limits one to 1 request a second, burst 2
    hasty = llmq_json(sandbox.directory, "tenants", "create", "--name", "Hasty", "--tier", "free")
    calm = llmq_json(sandbox.directory, "tenants", "create", "--name", "Calm", "--tier", "free")
    shown = llmq_json(sandbox.directory, "tenants", "set-limits", hasty["id"], "--rate", "1", "--burst", "2")
    assert shown["limits"]["rate_per_second"] == {"value": 1, "source": "override"}
    assert sandbox_limits(sandbox, hasty["id"])["rate_per_second"] == 1
    assert sandbox_limits(sandbox, hasty["id"])["burst"] == 2

    # When the limited tenant sends 8 GETs at once
    started = time.monotonic()
    answers = burst(sandbox, hasty["api_key"], 8)
    spread = time.monotonic() - started
    statuses = sorted(answer.status_code for answer in answers)
    # Then its full bucket of 2 lets 2 through, plus what the rate refilled while the burst
    # arrived (a loaded machine spreads "at once" over a second or more), and API Gateway
    # refuses the rest with 429
    served = statuses.count(200)
    assert 2 <= served <= 2 + int(spread) + 1, (statuses, spread)
    throttled = [answer for answer in answers if answer.status_code == 429]
    assert len(throttled) == 8 - served, statuses
    for answer in throttled:
        assert answer.headers["content-type"].startswith(PROBLEM_JSON)
        assert answer.json()["code"] == "rate_limited"
        assert int(answer.headers["retry-after"]) >= 1
    # And the other tenant of the same tier, on its own bucket of the tier's plan, is unaffected
    calm_statuses = [answer.status_code for answer in burst(sandbox, calm["api_key"], 5)]
    assert calm_statuses == [200] * 5, calm_statuses
    # And the limited tenant, after waiting as Retry-After says, is served again
    time.sleep(int(throttled[0].headers["retry-after"]))
    assert burst(sandbox, hasty["api_key"], 1)[0].status_code == 200


def test_clearing_the_override_brings_back_the_tiers_rate(sandbox: SandboxUnderTest) -> None:
    tenant = llmq_json(sandbox.directory, "tenants", "create", "--name", "Cleared", "--tier", "free")
    llmq_json(sandbox.directory, "tenants", "set-limits", tenant["id"], "--rate", "1", "--burst", "1")
    shown = llmq_json(sandbox.directory, "tenants", "set-limits", tenant["id"], "--clear", "rate")
    tier_burst = shown["limits"]["burst"]["value"]
    assert shown["limits"]["burst"]["source"] == "tier" and tier_burst > 3
    # The gateway reads the key's plan again within seconds, as API Gateway applies changes
    time.sleep(2.5)
    statuses = [answer.status_code for answer in burst(sandbox, tenant["api_key"], 3)]
    assert statuses == [200] * 3, statuses


def test_every_tenant_in_the_state_file_lists_its_limits(sandbox: SandboxUnderTest) -> None:
    state = json.loads((sandbox.directory / ".llmq" / "sandbox.json").read_text())
    for tenant in state["tenants"]:
        shown = llmq_json(sandbox.directory, "tenants", "show", tenant["id"])
        limits = shown["limits"]
        assert tenant["limits"] == {
            "max_concurrency": limits["max_concurrency"]["value"],
            "max_batch_concurrency": limits["max_batch_concurrency"]["value"],
            "max_active_jobs": limits["max_active_jobs"]["value"],
            "max_long_polls": limits["max_long_polls"]["value"],
            "rate_per_second": limits["rate_per_second"]["value"],
            "burst": limits["burst"]["value"],
        }


def test_a_tenant_whose_key_is_in_no_usage_plan_is_refused_403(sandbox: SandboxUnderTest) -> None:
    # Given a tenant written without API Gateway: the authorizer returns no usageIdentifierKey
    from llmq.tenants import TenantRepository

    tenants = TenantRepository(
        sandbox.stack_outputs()["TenantsTableName"], dynamodb=sandbox.aws("dynamodb"), usage_keys=None
    )
    created = tenants.create("Unmetered", "free")
    # Then API Gateway refuses its requests, before the api function runs
    before = len(sandbox.invocations(function="api"))
    (answer,) = burst(sandbox, created.api_key, 1)
    assert answer.status_code == 403, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM_JSON)
    assert len(sandbox.invocations(function="api")) == before


def test_a_tenant_past_its_long_polls_gets_429_with_retry_after_at_once(sandbox: SandboxUnderTest) -> None:
    """llmq.long_polls: a tenant's waiting requests each hold an api environment, so only
    `max_long_polls` of them wait at once; the others are refused at once."""
    # Given a new tenant whose operator allows it one waiting request, and a job that stays
    # unfinished for longer than the polls wait
    poller = llmq_json(sandbox.directory, "tenants", "create", "--name", "Poller", "--tier", "free")
    shown = llmq_json(sandbox.directory, "tenants", "set-limits", poller["id"], "--max-long-polls", "1")
    assert shown["limits"]["max_long_polls"] == {"value": 1, "source": "override"}
    headers = {"Authorization": f"Bearer {poller['api_key']}"}
    submitted = httpx.post(
        f"{sandbox.api_url}/v1/jobs", json={"prompt": "slow [[latency:5]]"}, headers=headers, timeout=40
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]

    # When it long-polls the job three times at once
    def poll(_: int) -> httpx.Response:
        return httpx.get(
            f"{sandbox.api_url}/v1/jobs/{job_id}", params={"wait": 4}, headers=headers, timeout=40
        )

    with ThreadPoolExecutor(max_workers=3) as pool:
        replies = list(pool.map(poll, range(3)))
    # Then one waits and answers the job; the two refused a place get a 429
    # problem with Retry-After
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [200, 429, 429], [reply.text for reply in replies]
    waited = next(reply for reply in replies if reply.status_code == 200)
    assert waited.json()["id"] == job_id
    for refused in (reply for reply in replies if reply.status_code == 429):
        assert refused.headers["content-type"].startswith(PROBLEM_JSON)
        assert refused.json()["code"] == "too_many_long_polls"
        assert int(refused.headers["retry-after"]) >= 1
    # And once the waits are over no place is held: each request gave its own back
    polls = sandbox.aws("dynamodb").get_item(
        TableName=sandbox.stack_outputs()["JobsTableName"], Key={"pk": {"S": f"polls#{poller['id']}"}}
    )["Item"]
    assert polls["waiting"]["M"] == {}
    httpx.post(f"{sandbox.api_url}/v1/jobs/{job_id}/cancel", headers=headers, timeout=40)
