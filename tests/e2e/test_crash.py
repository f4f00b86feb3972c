"""Crashes, with the worker's timeout cut to 3 s (its lanes' visibility timeout is then 18 s).

Two ways a provider can hold a worker, and what each comes to:
- `[[hang]]` never answers. The worker bounds its provider call by the Lambda's remaining
  time, so the call times out inside the invocation: a transient failure, retried, then
  `retries_exhausted`. No invocation overruns.
- `[[stall]]` answers 200 and then only sends keep-alives, so no read ever times out and the
  invocation overruns its 3 s. The runner kills it like Lambda does: its message is not
  deleted, comes back after the visibility timeout, and once the claims are used up the job
  fails as `worker_crashed`.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SandboxUnderTest

pytestmark = pytest.mark.e2e
WORKER_TIMEOUT_SECONDS = 3


@pytest.fixture(scope="module")
def sandbox(sandbox_factory: Any) -> SandboxUnderTest:
    # The reconciler would also rescue a crashed job (a new message once its lease lapsed long
    # ago); kept out of the way here so that the redelivery shown is SQS's own.
    started: SandboxUnderTest = sandbox_factory(
        {
            "worker": {"timeout_seconds": WORKER_TIMEOUT_SECONDS},
            "reconciler": {"expired_lease_grace_seconds": 600},
        }
    )
    return started


@pytest.fixture(scope="module")
def jobs(sandbox: SandboxUnderTest) -> dict[str, str]:
    """Both submitted at once, in different lanes so that neither shares the other's batch."""
    with sandbox.api("free") as free, sandbox.api("enterprise") as enterprise:
        hang = free.post("/v1/jobs", json={"prompt": "Think forever [[hang]]"}).json()["id"]
        stall = enterprise.post("/v1/jobs", json={"prompt": "Drip forever [[stall]]"}).json()["id"]
    return {"hang": hang, "stall": stall}


@pytest.fixture(scope="module")
def config(sandbox: SandboxUnderTest) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{sandbox.api_url}/_sandbox/config").json()
    return found


def test_a_hung_provider_call_is_bounded_by_the_worker_and_retried_until_exhausted(
    sandbox: SandboxUnderTest, jobs: dict[str, str], config: dict[str, Any]
) -> None:
    # When the provider never answers
    job = sandbox.wait_terminal(jobs["hang"], "free")
    # Then the job fails with retries_exhausted after max_attempts calls
    assert job["status"] == "failed"
    assert job["error"]["code"] == "retries_exhausted"
    assert job["attempts"] == config["max_attempts"] == 2
    assert sandbox.provider_calls(jobs["hang"]) == 2
    # And no invocation overran: the first reported a retry, the last deleted the message
    records = sandbox.invocations(function="worker", job_id=jobs["hang"])
    assert [record["outcome"] for record in records] == ["ok", "ok"]
    assert records[0]["failed_message_ids"] and records[-1]["deleted_message_ids"]


def test_an_invocation_that_overruns_its_timeout_is_a_crash_and_the_job_fails_as_worker_crashed(
    sandbox: SandboxUnderTest, jobs: dict[str, str], config: dict[str, Any]
) -> None:
    visibility = 6 * config["worker"]["timeout_seconds"]
    # When the provider keeps the connection alive without ever finishing
    job = sandbox.wait_terminal(jobs["stall"], "enterprise", timeout=120)
    # Then the job ends failed as worker_crashed, after one claim per allowed attempt
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_crashed"
    assert job["attempts"] == config["max_attempts"] == 2
    assert sandbox.provider_calls(jobs["stall"]) == 2
    # And each attempt was an invocation killed at the function's timeout, its message kept
    records = sandbox.invocations(function="worker", job_id=jobs["stall"])
    assert [record["outcome"] for record in records] == ["timeout", "timeout", "ok"]
    assert [record["receive_counts"] for record in records] == [[1], [2], [3]]
    assert all(not record["deleted_message_ids"] for record in records[:2])
    for crashed in records[:2]:
        assert crashed["duration_seconds"] == pytest.approx(WORKER_TIMEOUT_SECONDS, abs=0.5)
    # And the message came back only after its visibility timeout each time
    starts = [record["started_at"] for record in records]
    assert all(later - earlier >= visibility - 1 for earlier, later in itertools.pairwise(starts))
    # And the third receive settled it: the claim refused a third attempt, the message was deleted
    assert records[2]["deleted_message_ids"]


def test_nothing_stays_running(sandbox: SandboxUnderTest, jobs: dict[str, str]) -> None:
    for tier in ("enterprise", "free"):
        with sandbox.api(tier) as client:
            running = client.get("/v1/jobs", params={"status": "running"}).json()["data"]
        assert running == []
    for name, tier in (("hang", "free"), ("stall", "enterprise")):
        assert sandbox.wait_terminal(jobs[name], tier)["status"] == "failed"
