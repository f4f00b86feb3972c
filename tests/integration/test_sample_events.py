"""The sample events in events/ are what API Gateway and SQS really send: the handlers accept them."""

from __future__ import annotations

import json

from tests.conftest import load_event
from tests.integration.harness import Harness, LambdaContextStub


def _call(harness: Harness, name: str, **changes: object) -> dict:
    event = load_event(name)
    event.update(changes)
    return harness.api_module.handler(event, LambdaContextStub())


def test_the_sample_submit_event_is_accepted(harness: Harness) -> None:
    response = _call(harness, "api_submit")
    assert response["statusCode"] == 202
    body = json.loads(response["body"])
    assert body["metadata"] == {"customer_ref": "po-4411"}
    assert body["lane"] == "high"


def test_the_sample_get_and_cancel_events_reach_their_routes(harness: Harness) -> None:
    job_id = json.loads(_call(harness, "api_submit")["body"])["id"]
    get = _call(harness, "api_get", path=f"/v1/jobs/{job_id}")
    assert (get["statusCode"], json.loads(get["body"])["id"]) == (200, job_id)
    cancel = _call(harness, "api_cancel", path=f"/v1/jobs/{job_id}/cancel")
    assert (cancel["statusCode"], json.loads(cancel["body"])["status"]) == (200, "canceled")
    listed = _call(harness, "api_list")
    assert [job["id"] for job in json.loads(listed["body"])["data"]] == [job_id]


def test_the_sample_sqs_batch_names_unknown_jobs_so_both_records_fail(harness: Harness) -> None:
    event = load_event("sqs_lane_batch")
    arn = harness.sqs.get_queue_attributes(
        QueueUrl=harness.stack.lane_queue_urls["high"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    for record in event["Records"]:
        record["eventSourceARN"] = arn
    # Receipt handles of the sample are not real, so their visibility cannot change: the
    # records still fail individually and the batch answer names both.
    response = harness.worker().handler(event, LambdaContextStub())
    assert sorted(item["itemIdentifier"] for item in response["batchItemFailures"]) == sorted(
        record["messageId"] for record in event["Records"]
    )
