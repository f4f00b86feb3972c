"""Inputs and results too large for a DynamoDB item live in S3; the API still returns them."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from llmq import aws
from llmq.jobs import JobRepository
from llmq.models import JobResult
from llmq.offload import Offload
from llmq.payloads import RESULT_URL_SECONDS, PayloadStore
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, Harness, assert_catalogued


@pytest.fixture
def small_items(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> Harness:
    # Any payload over 1 KB goes to S3, so the test needs no megabyte prompts.
    config = integration_config(
        provider,
        limits={
            "max_prompt_chars": 50_000,
            "max_body_bytes": 200_000,
            "max_item_payload_bytes": 1024,
            "wait_poll_seconds": 0.05,
        },
    )
    return Harness(moto_stack, config, monkeypatch)


def _item(harness: Harness, job_id: str) -> dict:
    return aws.client("dynamodb").get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": job_id}})[
        "Item"
    ]


def test_a_large_prompt_and_result_round_trip_through_s3(
    small_items: Harness, provider: FakeProviderServer
) -> None:
    harness = small_items
    prompt = "lorem ipsum " * 400 + "[[tokens:600]]"
    job_id = harness.submit(prompt=prompt).body["id"]
    item = _item(harness, job_id)
    assert "input" not in item and item["input_ref"]["S"].startswith(f"inputs/{job_id}/")
    assert harness.drain("high") == {"batchItemFailures": []}
    item = _item(harness, job_id)
    assert "result" not in item and item["result_ref"]["S"].startswith(f"results/parked/{job_id}/")
    # GET inlines the result
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert job["status"] == "succeeded"
    assert len(job["result"]["output"].split()) == 600
    assert job["result_url"] is None
    # The list does not fetch it: it points at the job instead
    listed = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE).body["data"][0]
    assert (
        listed["result"] is None
        and listed["result_url"]
        == f"https://abc123.execute-api.us-east-1.amazonaws.com/prod/v1/jobs/{job_id}"
    )
    assert provider.calls_for(job_id) == 1


def test_a_job_whose_result_is_gone_from_s3_is_410_result_expired_not_a_500(
    small_items: Harness, provider: FakeProviderServer
) -> None:
    harness = small_items
    # Given a succeeded job whose result S3 holds, and a job with its result inline
    job_id = harness.submit(prompt="write [[tokens:600]]").body["id"]
    inline = harness.submit(prompt="short [[tokens:3]]").body["id"]
    assert harness.drain("high") == {"batchItemFailures": []}
    ref = _item(harness, job_id)["result_ref"]["S"]
    # When the bucket's lifecycle deletes the result before the job's record expires (a deploy
    # lowered retention_days: S3 applies the shorter rule to objects it holds already)
    aws.client("s3").delete_object(Bucket=harness.stack.payload_bucket, Key=ref)
    # Then reading the job, at once or after a wait, is a 410 that says so (hunt 328: a 500
    # at every read for the rest of the record's life)
    for query in (None, {"wait": "1"}):
        reply = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query=query)
        assert (reply.status, reply.code) == (410, "result_expired"), reply.body
        assert_catalogued(reply)
        assert "7 days" in reply.body["detail"]
    # And the list, which links the result without reading it, and the other job still answer
    listed = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE)
    assert listed.status == 200 and {job["id"] for job in listed.body["data"]} == {job_id, inline}
    kept = harness.api("GET", f"/v1/jobs/{inline}", tenant=ENTERPRISE)
    assert (kept.status, kept.body["status"]) == (200, "succeeded")
    assert provider.calls_for(job_id) == 1
    # And a streamed job's live output, read to its end after its result is gone, still ends
    # with its status and done events (the text came as deltas), not a 410
    streamed = harness.submit(prompt="write [[tokens:600]]", stream=True).body["id"]
    assert harness.drain("high") == {"batchItemFailures": []}
    gone = _item(harness, streamed)["result_ref"]["S"]
    aws.client("s3").delete_object(Bucket=harness.stack.payload_bucket, Key=gone)
    events = harness.api(
        "GET", f"/v1/jobs/{streamed}/events", tenant=ENTERPRISE, headers={"Last-Event-ID": "999999"}
    )
    assert events.status == 200 and "event: done" in str(events.body), events.body
    done = json.loads(str(events.body).rsplit("event: done", 1)[1].split("data: ", 1)[1].split("\n", 1)[0])
    # (its link the job's own, whose GET says the result is gone; never a presigned URL to
    # the object that is gone: review 283)
    assert (done["status"], done["result"]) == ("succeeded", None)
    assert done["result_url"].endswith(f"/v1/jobs/{streamed}") and "X-Amz-Signature" not in done["result_url"]
    # And the API document says GET may answer so
    document = harness.api("GET", "/v1/openapi.json").body
    assert "410" in document["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]


class _Died(BaseException):
    """The worker's process dies here (nothing in llmq catches a BaseException)."""


def test_a_large_paid_result_put_in_s3_is_recorded_not_paid_again_after_a_crash_before_its_write(
    small_items: Harness, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = small_items
    # Given a job whose answer is too large for its item
    job_id = harness.submit(prompt="write at length [[tokens:600]]").body["id"]
    url = harness.stack.lane_queue_urls["high"]
    # When its worker dies once S3 took the paid result, before the write that names it
    real_complete = JobRepository.complete

    def die_before_writing(self: JobRepository, *args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("result_ref"), "the result goes to S3"
        raise _Died("killed between PutObject and the complete write")

    monkeypatch.setattr(JobRepository, "complete", die_before_writing)
    messages = harness.receive(url)
    with pytest.raises(_Died):
        harness.run_worker(url, messages)
    monkeypatch.setattr(JobRepository, "complete", real_complete)
    assert provider.calls_for(job_id) == 1
    # And its lease lapses, and its message comes back, as AWS recovers it
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET lease_expires_ms = :lapsed",
        ExpressionAttributeValues={":lapsed": {"N": str(int(time.time() * 1000) - 1)}},
    )
    for message in messages:
        harness.sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )
    assert harness.drain("high") == {"batchItemFailures": []}
    # Then the next claim records the paid result: the job succeeds with it, the provider
    # called once (hunt 261: the result sat under a key nothing looked at, and was paid again)
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], len(job["result"]["output"].split())) == ("succeeded", 600)
    assert provider.calls_for(job_id) == 1


def test_a_result_a_job_names_in_s3_is_never_replaced_by_a_late_attempts_park(
    small_items: Harness, provider: FakeProviderServer
) -> None:
    harness = small_items
    # Given a job completed with a result too large for its item (it names the parked object)
    job_id = harness.submit(prompt="write at length [[tokens:600]]").body["id"]
    assert harness.drain("high") == {"batchItemFailures": []}
    before = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["result"]
    # When a fenced-out attempt of it, whose own write failed, parks the answer it paid for
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    job = jobs.find(job_id)
    assert job is not None
    offload = Offload(PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")), harness.config)
    offload.park_result(job, JobResult(output="a late attempt's answer", finish_reason="stop"))
    # Then the job's result is still the one it was completed with
    after = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["result"]
    assert after == before and len(after["output"].split()) == 600


def test_a_result_above_the_inline_limit_is_a_presigned_url(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = integration_config(
        provider,
        limits={"max_prompt_chars": 5000, "max_item_payload_bytes": 1024, "max_inline_result_bytes": 1024},
    )
    harness = Harness(moto_stack, config, monkeypatch)
    job_id = harness.submit(prompt="[[tokens:600]]").body["id"]
    harness.drain("high")
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert job["result"] is None
    assert "X-Amz-Signature" in job["result_url"] and job_id in job["result_url"]
    # And it says until when the URL works: a short while, and no later than the URL itself
    query = parse_qs(urlparse(job["result_url"]).query)
    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    stated = datetime.fromisoformat(job["result_url_expires_at"])
    assert stated <= signed + timedelta(seconds=int(query["X-Amz-Expires"][0]))
    assert stated <= datetime.fromtimestamp(time.time() + RESULT_URL_SECONDS, tz=UTC)
    # And the OpenAPI document declares it, and that the list may lag
    document = harness.api("GET", "/v1/openapi.json").body
    assert "result_url_expires_at" in document["components"]["schemas"]["Job"]["properties"]
    assert "about a second" in document["paths"]["/v1/jobs"]["get"]["description"]


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_a_presigned_urls_stated_expiry_is_never_later_than_the_url_signed_at_the_end_of_a_second(
    moto_stack: MotoStack, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Hunt 237: the upload URL's expiry was read from the clock after signing, a second late
    when the signing fell at the very end of a second."""
    import types

    import botocore.auth

    from llmq import payloads

    # Given one clock for the signer and llmq, 0.4 ms before a whole second, moving 0.5 ms a read
    clock = [1_800_000_000.9996]

    def tick() -> float:
        clock[0] += 0.0005
        return clock[0] - 0.0005

    def signer_now(remove_tzinfo: bool = True) -> datetime:
        now = datetime.fromtimestamp(tick(), tz=UTC)
        return now.replace(tzinfo=None) if remove_tzinfo else now

    monkeypatch.setattr(botocore.auth, "get_current_datetime", signer_now)
    monkeypatch.setattr(payloads, "time", types.SimpleNamespace(time=tick))
    store = payloads.PayloadStore(moto_stack.payload_bucket, s3=aws.client("s3"))
    # When a URL is signed
    signed = (
        store.presigned_url("results/job_x.json", 600)
        if method == "GET"
        else store.presigned_put("inputs/uploads/t/upl_x.jsonl", 600, 10)
    )
    # Then the expiry it states comes no later than the one S3 holds it to
    query = parse_qs(urlparse(signed.url).query)
    at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    works_until = at + timedelta(seconds=int(query["X-Amz-Expires"][0]))
    assert signed.expires_ms <= works_until.timestamp() * 1000
