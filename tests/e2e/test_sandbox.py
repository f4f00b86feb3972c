"""The sandbox end to end, over real HTTP, on the session's detached default sandbox.

The last test stops it with `llmq sandbox down` and proves nothing is left running; it runs
after every other test of the session (tests/e2e/conftest.py).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from llmq_cli.sandbox_state import pid_alive
from tests.e2e.conftest import (
    OPERATOR_KEYS,
    STATE_KEYS,
    TENANT_KEYS,
    SandboxUnderTest,
    llmq_json,
    stop_sandbox,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def submit(sandbox: SandboxUnderTest, tier: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    with sandbox.api(tier) as client:
        return client.post("/v1/jobs", json=body, headers=headers)


def test_up_detached_writes_the_state_file_of_the_scripting_interface(sandbox: SandboxUnderTest) -> None:
    # Given a sandbox started with `llmq sandbox up --detach`
    state = sandbox.state
    # Then its state file has exactly the documented keys (IAM is on), and one tenant per tier at least
    assert set(state) == STATE_KEYS | {"aws_credentials"}
    assert set(state["aws_credentials"]) == OPERATOR_KEYS
    assert all(set(tenant) == TENANT_KEYS for tenant in state["tenants"])
    assert {"enterprise", "free"} <= {tenant["tier"] for tenant in state["tenants"]}
    assert all(tenant["webhook_secret"].startswith("whsec_") for tenant in state["tenants"])
    assert state["aws_endpoint_url"].startswith("http://localhost:")
    # And the process it names is running and the API answers
    assert pid_alive(state["pid"], or_group=True)
    assert httpx.get(f"{sandbox.api_url}/v1/openapi.json").status_code == 200


def test_moto_enforces_iam_and_the_state_files_operator_may_do_anything(sandbox: SandboxUnderTest) -> None:
    import boto3
    from botocore.exceptions import ClientError

    # Given the sandbox's moto, and a key that no IAM user or role of it owns
    stranger = boto3.session.Session(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name=sandbox.state["region"],
    ).client("dynamodb", endpoint_url=sandbox.state["aws_endpoint_url"])
    # When that key and the operator's from the state file list the tables
    with pytest.raises(ClientError) as refused:
        stranger.list_tables()
    tables = sandbox.aws("dynamodb").list_tables()["TableNames"]
    # Then moto refuses the stranger, as AWS refuses an unknown key, and lets the operator in
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "InvalidClientTokenId" in str(refused.value)
    assert sandbox.stack_outputs()["JobsTableName"] in tables


def test_the_gateway_answers_like_api_gateway_before_any_function_runs(sandbox: SandboxUnderTest) -> None:
    # When a request has no key, a wrong key, or no route
    missing = httpx.get(f"{sandbox.api_url}/v1/jobs")
    wrong = httpx.get(f"{sandbox.api_url}/v1/jobs", headers={"Authorization": "Bearer llmq_sk_nope"})
    nowhere = httpx.get(f"{sandbox.api_url}/elsewhere")
    # Then 401 twice, with the template's problem+json gateway response, and 403 without a route
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["code"] == "unauthenticated"
    assert nowhere.status_code == 403
    assert nowhere.headers["content-type"] == "application/problem+json"
    assert nowhere.json()["code"] == "gateway_refused"
    assert nowhere.json()["detail"] == "Missing Authentication Token"


def test_the_api_lives_under_its_stage_and_links_keep_it(sandbox: SandboxUnderTest) -> None:
    """ "Invoke a REST API in API Gateway" (https://docs.aws.amazon.com/apigateway/latest/developerguide/how-to-call-api.html):
    the invoke URL is https://{api-id}.execute-api.{region}.amazonaws.com/{stage}/; a path without
    the stage answers 403 before any authorizer runs, so every link llmq gives must keep it."""
    # Given the API's URL, which ends in the stage as an execute-api URL does
    assert sandbox.api_url.endswith("/prod")
    root = sandbox.api_url.removesuffix("/prod")
    key = sandbox.tenant("enterprise")["api_key"]
    # When a client leaves the stage out
    stageless = httpx.get(f"{root}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    # Then API Gateway's answer for an unknown stage, before any authorizer runs
    assert stageless.status_code == 403
    assert stageless.json() == {"message": "Forbidden"}
    # When a job is submitted, its Location is absolute and keeps the stage, and it answers
    accepted = submit(sandbox, "enterprise", {"prompt": "Where am I [[latency:0.1]]"})
    assert accepted.status_code == 202
    location = accepted.headers["location"]
    assert location == f"{sandbox.api_url}/v1/jobs/{accepted.json()['id']}"
    followed = httpx.get(location, headers={"Authorization": f"Bearer {key}"})
    assert followed.status_code == 200
    assert followed.json()["id"] == accepted.json()["id"]


def test_happy_path_job_succeeds_and_exactly_one_verified_webhook_matches_it(
    sandbox: SandboxUnderTest,
) -> None:
    # Given the enterprise tenant and the demo receiver
    tenant = sandbox.tenant("enterprise")
    hook = f"{sandbox.state['receiver_url']}/hooks/happy"
    # When it submits a job with a webhook and long-polls it with ?wait=
    accepted = submit(sandbox, "enterprise", {"prompt": "Hello [[latency:0.3]]", "webhook": {"url": hook}})
    assert accepted.status_code == 202
    assert accepted.headers["location"] == f"{sandbox.api_url}/v1/jobs/{accepted.json()['id']}"
    job = sandbox.wait_terminal(accepted.json()["id"])
    # Then it succeeded with a result
    assert job["status"] == "succeeded"
    assert job["result"]["output"]
    # And the receiver got exactly one delivery: job.succeeded, verified, answered 200
    assert wait_until(lambda: sandbox.deliveries(job["id"]), timeout=20)
    time.sleep(2)  # room for a duplicate to show up, if there were one
    deliveries = sandbox.deliveries(job["id"])
    assert len(deliveries) == 1
    delivery = deliveries[0]
    assert (delivery["type"], delivery["verified"], delivery["status"]) == ("job.succeeded", True, 200)
    # And it verifies with the reference library and the tenant's secret from the state file
    request = delivery["request"]
    payload = Webhook(tenant["webhook_secret"]).verify(request["body"], request["headers"])
    # And its data is the polled job (the delivery record is the only part that moved on)
    polled = sandbox.wait_terminal(job["id"])
    assert {k: v for k, v in payload["data"].items() if k != "webhook"} == {
        k: v for k, v in polled.items() if k != "webhook"
    }
    assert polled["webhook"]["delivery"]["status"] == "delivered"


def test_the_delivery_log_shows_a_failed_attempt_and_the_one_that_delivered(
    sandbox: SandboxUnderTest,
) -> None:
    # Given a receiver that answers 500 to the first attempt of each webhook, then 200
    hook = f"{sandbox.state['receiver_url']}/hooks/logged/fail-1"
    accepted = submit(sandbox, "enterprise", {"prompt": "Hi [[latency:0.2]]", "webhook": {"url": hook}})
    job_id = accepted.json()["id"]
    assert sandbox.wait_terminal(job_id)["status"] == "succeeded"

    # When the integrator reads the job's delivery log once the retry went through
    def delivered() -> dict[str, Any] | None:
        with sandbox.api("enterprise") as client:
            log: dict[str, Any] = client.get(f"/v1/jobs/{job_id}/webhook").json()
        return log if log["deliveries"] and log["deliveries"][0]["status"] == "delivered" else None

    log = wait_until(delivered, timeout=30)
    assert log is not None
    # Then it shows both attempts as the receiver answered them, its own words included
    (delivery,) = log["deliveries"]
    assert delivery["event"] == "job.succeeded"
    attempts = delivery["attempts"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 200)]
    assert "error" in attempts[0]["response_head"] and "received" in attempts[1]["response_head"]
    assert all(a["latency_ms"] >= 0 and a["error_class"] is None for a in attempts)
    # And the receiver saw exactly those attempts
    assert [d["status"] for d in sandbox.deliveries(job_id)] == [500, 200]
    # And `llmq webhooks attempts` prints the same log
    assert (
        llmq_json(sandbox.directory, "webhooks", "attempts", job_id, "--tenant", "enterprise", "--json")
        == log
    )


def test_enterprise_jobs_run_in_the_high_lane_and_free_jobs_in_the_low_lane(
    sandbox: SandboxUnderTest,
) -> None:
    # Given the lane queues the stack created
    outputs = sandbox.stack_outputs()
    queue_names = {
        lane: outputs[f"LaneQueueUrl{lane.capitalize()}"].rsplit("/", 1)[-1] for lane in ("high", "low")
    }
    # When each tenant submits two jobs
    submitted = {
        tier: [
            submit(sandbox, tier, {"prompt": f"{tier} {n} [[latency:0.2]]"}).json()["id"] for n in range(2)
        ]
        for tier in ("enterprise", "free")
    }
    # Then every job succeeds in its tier's lane
    for tier, lane in (("enterprise", "high"), ("free", "low")):
        for job_id in submitted[tier]:
            job = sandbox.wait_terminal(job_id, tier)
            assert (job["status"], job["lane"]) == ("succeeded", lane)
            # And the worker got it from that lane's queue
            records = sandbox.invocations(function="worker", job_id=job_id)
            assert records, f"no worker invocation for {job_id}"
            assert {record["trigger"] for record in records} == {f"sqs:{queue_names[lane]}"}
            assert {record["lane"] for record in records} == {lane}


def test_a_transient_503_is_retried_once_and_succeeds(sandbox: SandboxUnderTest) -> None:
    # When a job's first provider call answers 503
    job_id = submit(sandbox, "enterprise", {"prompt": "Translate [[fail:503x1]]"}).json()["id"]
    job = sandbox.wait_terminal(job_id)
    # Then it succeeds on its first attempt (the 503 refused it before generating: refunded),
    # and the provider saw exactly two calls
    assert (job["status"], job["attempts"]) == ("succeeded", 1)
    assert sandbox.provider_calls(job_id) == 2
    # And each worker invocation settled its message: the first replaced it by a delayed copy
    # (so no receive counts toward the DLQ), the second ran the job
    records = sandbox.invocations(function="worker", job_id=job_id)
    assert [record["outcome"] for record in records] == ["ok", "ok"]
    assert all(record["deleted_message_ids"] and not record["failed_message_ids"] for record in records)


def test_a_context_length_error_fails_at_once_without_a_retry(sandbox: SandboxUnderTest) -> None:
    job_id = submit(sandbox, "free", {"prompt": "Huge [[fail:400:context_length_exceeded]]"}).json()["id"]
    job = sandbox.wait_terminal(job_id, "free")
    assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "context_length_exceeded", 1)
    assert sandbox.provider_calls(job_id) == 1


def test_an_idempotent_replay_returns_the_same_job(sandbox: SandboxUnderTest) -> None:
    body = {"prompt": "Invoice 7 [[latency:0.1]]"}
    first = submit(sandbox, "enterprise", body, **{"Idempotency-Key": "e2e-invoice-7"})
    again = submit(sandbox, "enterprise", body, **{"Idempotency-Key": "e2e-invoice-7"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"


@pytest.mark.stops_the_sandbox
def test_down_stops_the_sandbox_and_leaves_no_process_behind(sandbox: SandboxUnderTest) -> None:
    pid = sandbox.state["pid"]
    # When `llmq sandbox down` runs
    down = stop_sandbox(sandbox)
    # Then it succeeds, the sandbox process and every process of its group are gone
    assert down.returncode == 0, down.stderr
    assert wait_until(lambda: not pid_alive(pid, or_group=True), timeout=10), (
        "a sandbox process is still running"
    )
    # And the state file is removed, and the API no longer answers
    assert not (sandbox.directory / ".llmq" / "sandbox.json").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sandbox.api_url}/v1/openapi.json", timeout=2)
