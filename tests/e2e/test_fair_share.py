"""Tenant shares over real HTTP, in the sandbox: the active-jobs quota answered with 429 and
Retry-After to a client that obeys it, and the per-tenant concurrency cap as the fake provider
sees it (calls in flight), with a crash on the way."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SandboxUnderTest, llmq_json
from tests.e2e.figures import Figures

TERMINAL = {"succeeded", "failed", "canceled", "expired"}


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def _tenant(sandbox: SandboxUnderTest, name: str, *limits: str) -> httpx.Client:
    created = llmq_json(sandbox.directory, "tenants", "create", "--name", name, "--tier", "enterprise")
    if limits:
        llmq_json(sandbox.directory, "tenants", "set-limits", created["id"], *limits)
    return httpx.Client(
        base_url=sandbox.api_url, headers={"Authorization": f"Bearer {created['api_key']}"}, timeout=60
    )


def _wait_terminal(client: httpx.Client, job_ids: list[str], timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
        if all(job["status"] in TERMINAL for job in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def test_a_client_that_obeys_retry_after_gets_every_job_accepted_once(sandbox: SandboxUnderTest) -> None:
    # Given a tenant allowed 3 active jobs, and a client with 12 jobs to submit, each with its
    # own Idempotency-Key, that waits Retry-After (plus jitter) after a 429
    client = _tenant(sandbox, "Patient", "--max-active", "3")
    refused: list[httpx.Response] = []
    accepted: dict[str, str] = {}

    def submit(index: int) -> None:
        key = f"patient-{index}"
        while True:
            reply = client.post(
                "/v1/jobs", json={"prompt": f"job {index} [[latency:0.3]]"}, headers={"Idempotency-Key": key}
            )
            if reply.status_code != 429:
                assert reply.status_code == 202, reply.text
                accepted[key] = reply.json()["id"]
                return
            refused.append(reply)
            time.sleep(int(reply.headers["retry-after"]) * (1 + (index % 4) / 8))

    # When it submits them four at a time
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(submit, range(12)))
    # Then the quota refused some, each a problem with a stable code and a Retry-After
    assert refused, "the quota never refused anything: the test proves nothing"
    for reply in refused:
        assert reply.headers["content-type"].startswith("application/problem+json")
        assert reply.json()["code"] == "quota_exceeded"
        assert int(reply.headers["retry-after"]) >= 1
    # And every job was accepted exactly once and ran to success
    assert len(set(accepted.values())) == 12
    jobs = _wait_terminal(client, list(accepted.values()))
    assert [job["status"] for job in jobs] == ["succeeded"] * 12
    # And the tenant's list (an index, a second behind) holds those 12 and no other
    deadline = time.monotonic() + 10
    while True:
        listed = sorted(job["id"] for job in client.get("/v1/jobs", params={"limit": 100}).json()["data"])
        if listed == sorted(accepted.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert listed == sorted(accepted.values())


def test_a_capped_tenant_never_has_more_calls_in_flight_at_the_provider_than_its_cap(
    sandbox: SandboxUnderTest, figures: Figures
) -> None:
    # Given a tenant capped at 2 jobs at once, with 8 slow jobs, one of which crashes its
    # worker once right after its claim
    client = _tenant(sandbox, "Capped", "--max-concurrency", "2")
    prompts = [f"capped {index} [[latency:1]]" for index in range(7)] + [
        "capped crash [[crash:1]] [[latency:1]]"
    ]
    job_ids = [client.post("/v1/jobs", json={"prompt": prompt}).json()["id"] for prompt in prompts]
    # When they run
    jobs = _wait_terminal(client, job_ids, timeout=240)
    # Then all succeed, the crashed one on its second attempt (a crash takes its batch down
    # with it, so a batchmate may have needed a second attempt too)
    assert [job["status"] for job in jobs] == ["succeeded"] * 8
    assert jobs[-1]["attempts"] == 2
    # And the provider never saw more than 2 of this tenant's calls at once
    calls = [call for job_id in job_ids for call in figures.provider_calls(job_id)]
    assert len(calls) >= 8
    moments = sorted({call.started_at for call in calls})
    most = max(sum(1 for call in calls if call.started_at <= moment < call.ended_at) for moment in moments)
    assert most == 2, f"{most} of the tenant's calls overlapped"  # and 2 did: the cap was used
