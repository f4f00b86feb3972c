"""The API handler against moto: what an integrator sees when submitting, reading and canceling."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from botocore.exceptions import ClientError

from llmq import aws
from llmq.job_index import TENANT_INDEX
from llmq.telemetry import METRICS_NAMESPACE, SERVICE_NAME, MetricName
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from llmq_sandbox.doubles.receiver import WebhookReceiver
from tests.conftest import MotoStack
from tests.integration.harness import ENTERPRISE, FREE, ApiReply, Harness, emitted_metrics


def _nothing_changed(harness: Harness) -> None:
    assert harness.item_count() == 0
    for url in harness.stack.lane_queue_urls.values():
        assert harness.total_count(url) == 0


def test_submit_returns_202_stores_queued_and_enqueues_ids_only(harness: Harness) -> None:
    # Given an enterprise tenant
    # When it submits a job
    reply = harness.submit(prompt="Secret plan: [[tokens:4]]", metadata={"ref": "po-1"})
    # Then it gets 202 with a Location and the queued job
    assert reply.status == 202
    job_id = reply.body["id"]
    # (absolute, with the stage: on AWS a path without it is a 403)
    assert (
        reply.headers["location"]
        == f"https://abc123.execute-api.us-east-1.amazonaws.com/prod/v1/jobs/{job_id}"
    )
    assert reply.body["status"] == "queued"
    assert reply.body["lane"] == "high"
    assert reply.body["metadata"] == {"ref": "po-1"}
    # And exactly one message sits in the high lane, carrying ids only
    messages = harness.receive(harness.stack.lane_queue_urls["high"])
    assert len(messages) == 1
    # (the tenant is the message group too: SQS fair queues)
    assert json.loads(messages[0]["Body"]) == {"job_id": job_id, "lane": "high", "tenant_id": "ten_acme"}
    assert "Secret plan" not in messages[0]["Body"]
    assert harness.total_count(harness.stack.lane_queue_urls["low"]) == 0
    # And the job reads back as queued
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "queued"


def test_a_retry_of_an_accepted_submit_is_its_replay_even_if_a_check_now_refuses_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit accepted but answered 5xx (its answer lost) is retried; by then the webhook host
    may have stopped resolving (or the operator changed a limit). The job exists and will run:
    the retry must get it, not a 422 that reads as "refused" and invites a second, paid job."""
    resolves = {"now": True}

    def resolver(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if resolves["now"]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    body = {"prompt": "hello", "webhook": {"url": "https://hooks.example.com/llmq"}}
    first = harness.submit(key="order-9", **body)
    assert first.status == 202, first.body
    # When the webhook host stops resolving, and the client retries
    resolves["now"] = False
    retry = harness.submit(key="order-9", **body)
    # Then the retry is the replay of the accepted job
    assert retry.status == 202, retry.body
    assert retry.body["id"] == first.body["id"]
    assert retry.headers.get("idempotent-replayed") == "true"
    # And a new submit to that host is refused as before, writing nothing
    refused = harness.submit(key="order-10", **body)
    assert (refused.status, refused.code) == (422, "invalid_webhook_url")
    assert harness.item_count() == 1


def test_free_tier_goes_to_the_low_lane(harness: Harness) -> None:
    reply = harness.submit(tenant=FREE)
    assert reply.body["lane"] == "low"
    assert harness.total_count(harness.stack.lane_queue_urls["low"]) == 1
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0


def test_same_idempotency_key_and_body_replays_the_original(harness: Harness) -> None:
    # Given a job submitted with an Idempotency-Key
    first = harness.submit(key="order-1", prompt="same")
    # When the client retries with the same key and body
    second = harness.submit(key="order-1", prompt="same")
    # Then it gets the same job, marked as replayed, and nothing new is enqueued
    assert second.status == first.status == 202
    assert second.body["id"] == first.body["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    assert "idempotent-replayed" not in first.headers
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 1
    assert harness.item_count() == 1


def test_a_retry_that_writes_the_default_model_out_or_leaves_it_is_the_same_body(harness: Harness) -> None:
    # Given jobs submitted with the model left to the default, and named as the default
    default = harness.config.provider.default_model
    other = next(model for model in harness.config.provider.models if model != default)
    left = harness.submit(key="order-left", prompt="same")
    named = harness.submit(key="order-named", prompt="same", model=default)
    # When each is retried with the model spelled the other way (an SDK writing defaults out)
    retries = [
        harness.submit(key="order-left", prompt="same", model=default),
        harness.submit(key="order-named", prompt="same"),
    ]
    # Then each retry is its job's replay: the same job, which runs the same model
    assert [(reply.status, reply.headers.get("idempotent-replayed")) for reply in retries] == [
        (202, "true")
    ] * 2
    assert [reply.body["id"] for reply in retries] == [left.body["id"], named.body["id"]]
    # And a retry naming another model is another body
    reply = harness.submit(key="order-left", prompt="same", model=other)
    assert (reply.status, reply.code) == (422, "idempotency_key_reused")
    assert harness.item_count() == 2


def test_same_idempotency_key_with_another_body_is_422_and_writes_nothing(harness: Harness) -> None:
    first = harness.submit(key="order-2", prompt="one body")
    reply = harness.submit(key="order-2", prompt="another body")
    assert reply.status == 422
    assert reply.code == "idempotency_key_reused"
    assert reply.headers["content-type"] == "application/problem+json"
    assert harness.item_count() == 1
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 1
    stored = harness.api("GET", f"/v1/jobs/{first.body['id']}", tenant=ENTERPRISE)
    assert stored.status == 200


def test_the_same_key_for_another_tenant_is_independent(harness: Harness) -> None:
    mine = harness.submit(tenant=ENTERPRISE, key="shared-key", prompt="a")
    theirs = harness.submit(tenant=FREE, key="shared-key", prompt="b")
    assert theirs.status == 202
    assert theirs.body["id"] != mine.body["id"]
    assert "idempotent-replayed" not in theirs.headers
    assert harness.item_count() == 2


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"params": {"max_tokens": 5}}, 422, "invalid_request"),
        ({"prompt": "x", "params": {"max_tokens": -1}}, 422, "invalid_request"),
        ({"prompt": "x", "params": {"max_tokens": "many"}}, 422, "invalid_request"),
        ({"prompt": "x", "model": "gpt-unknown"}, 422, "model_not_allowed"),
        ({"prompt": "x" * 5001}, 413, "prompt_too_large"),
        ({"prompt": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, 422, "invalid_request"),
        ({"prompt": "x", "webhook": {"url": "https://10.1.2.3/hook"}}, 422, "invalid_webhook_url"),
        (
            {"prompt": "x", "webhook": {"url": "http://169.254.169.254/latest/meta-data/"}},
            422,
            "invalid_webhook_url",
        ),
        ({"prompt": "x", "webhook": {"url": "https://93.184.216.34:65536/hook"}}, 422, "invalid_webhook_url"),
        ({"prompt": "x", "surprise": True}, 422, "invalid_request"),
        ({"prompt": "x", "deadline_seconds": 0}, 422, "invalid_request"),
        (
            {"prompt": "x", "webhook": {"url": "https://example.com/h", "events": ["job.exploded"]}},
            422,
            "invalid_request",
        ),
    ],
    ids=[
        "no-messages-or-prompt",
        "negative-max-tokens",
        "wrong-type",
        "unknown-model",
        "prompt-over-limit",
        "17-metadata-keys",
        "private-webhook",
        "metadata-endpoint-webhook",
        "webhook-port-out-of-range",
        "unknown-field",
        "zero-deadline",
        "unknown-event",
    ],
)
def test_bad_input_is_a_problem_and_changes_nothing(
    harness: Harness, body: dict, status: int, code: str
) -> None:
    reply = harness.api("POST", "/v1/jobs", body=body, tenant=ENTERPRISE)
    assert reply.status == status
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.code == code
    assert reply.body["status"] == status
    assert {"type", "title", "status", "code"} <= set(reply.body)
    _nothing_changed(harness)


def test_a_non_json_body_is_400_malformed_json(harness: Harness) -> None:
    reply = harness.api("POST", "/v1/jobs", raw_body="{not json", tenant=ENTERPRISE)
    assert (reply.status, reply.code) == (400, "malformed_json")
    _nothing_changed(harness)


@pytest.mark.parametrize(
    ("path", "body", "kind"),
    [
        ("/v1/jobs", [{"prompt": "first"}, {"prompt": "second"}], "an array"),
        ("/v1/jobs", [{"prompt": "only"}, "junk", 7], "an array"),
        ("/v1/jobs/", [{"prompt": "only"}], "an array"),
        ("/v1/jobs", "hi", "a string"),
        ("/v1/jobs", None, "null"),
        ("/v1/batches", [{"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}], "an array"),
        ("/v1/uploads", [{"size_bytes": 5}], "an array"),
    ],
    ids=["two-jobs", "job-then-junk", "trailing-slash", "string", "null", "batch", "upload"],
)
def test_a_body_that_is_not_one_object_is_refused_and_writes_nothing(
    harness: Harness, path: str, body: Any, kind: str
) -> None:
    # Given a JSON value where the API takes one object, as API Gateway hands it over (binary
    # media types */*: the body base64 in the event). Hunt 310: validation took an array as its
    # first element, a job was written and queued (202) and the rest dropped unsaid.
    reply = harness.api("POST", path, raw_body=json.dumps(body), tenant=ENTERPRISE, base64_body=True)
    # Then it is refused, saying what it was, and nothing is stored, queued or presigned
    assert (reply.status, reply.code) == (422, "invalid_request"), reply.body
    assert f"the body must be a JSON object, not {kind}" in reply.body["detail"]
    _nothing_changed(harness)


def test_a_retry_of_an_array_an_earlier_release_accepted_is_its_replay(harness: Harness) -> None:
    # Given a job accepted under a key from `[{"prompt": "hello"}]` by a release before hunt 310
    # (it took the array's first object: this very job), its answer lost
    first = harness.submit(key="order-array", prompt="hello")
    assert first.status == 202, first.body

    def sent(body: list[Any], key: str) -> ApiReply:
        return _sent_as_an_array(harness, "/v1/jobs", body, key)

    # When the client retries the same bytes after the upgrade
    retry = sent([{"prompt": "hello"}], "order-array")
    # Then it is the accepted job's replay, not a refusal that reads as "not accepted" (review 273)
    assert (retry.status, retry.body["id"]) == (202, first.body["id"]), retry.body
    assert retry.headers.get("idempotent-replayed") == "true"
    # and another body under the key is refused as such, as it was then
    other = sent([{"prompt": "something else"}], "order-array")
    assert (other.status, other.code) == (422, "idempotency_key_reused")
    # while an array under a key that made nothing is refused, and writes nothing
    assert harness.item_count() == 1
    fresh = sent([{"prompt": "hello"}], "never-used")
    assert (fresh.status, fresh.code) == (422, "invalid_request")
    assert harness.item_count() == 1


@pytest.mark.parametrize("value", ["1_0", "5.0", "+5", " 5", "5 ", "0x5", "\u0665"])
@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v1/jobs", "limit"),
        ("/v1/batches", "limit"),
        ("/v1/jobs/job_abc", "wait"),
        ("/v1/jobs/job_abc/events", "wait"),
        ("/v1/jobs/job_abc/events", "after"),
    ],
)
def test_a_query_number_not_written_in_ascii_digits_is_refused(
    harness: Harness, path: str, name: str, value: str
) -> None:
    # Given a number in a query written as Python would read it, not as the schema's integer
    # (hunt 311: `?wait=1_0` held a long poll ten seconds, `?limit=5.0` was a page of 5)
    reply = harness.api("GET", path, query={name: value}, tenant=ENTERPRISE)
    # Then it is refused, naming the parameter
    assert (reply.status, reply.code) == (422, "invalid_request"), reply.body
    assert reply.body["detail"] == f"the query parameter {name} must be a whole number in ASCII digits"


def test_every_integer_query_parameter_is_read_as_ascii_digits(harness: Harness) -> None:
    # The routes' integer query parameters, as the OpenAPI document states them, are those the
    # api reads as digits before validation (one list, held to the routes here)
    document = harness.api("GET", "/v1/openapi.json", tenant=ENTERPRISE).body
    stated = {
        (path, parameter["name"])
        for path, methods in document["paths"].items()
        for operation in methods.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query" and "integer" in json.dumps(parameter["schema"])
    }
    checked = {(path, name) for path, names in harness.api_module.INTEGER_QUERIES.items() for name in names}
    assert stated == checked


def test_a_query_number_in_ascii_digits_is_read(harness: Harness) -> None:
    for index in range(6):
        assert harness.submit(prompt=f"p{index}").status == 202
    reply = harness.api("GET", "/v1/jobs", query={"limit": "05"}, tenant=ENTERPRISE)
    assert reply.status == 200, reply.body
    assert len(reply.body["data"]) == 5


@pytest.mark.parametrize(
    "model", [5, ["fake-model"], {"id": "fake-model"}, True], ids=["number", "list", "object", "bool"]
)
def test_a_model_of_the_wrong_type_is_invalid_not_a_model_withdrawn(harness: Harness, model: Any) -> None:
    # Given a model that is no string, in a job and in an inline batch's item (hunt 311: both
    # said `model_not_allowed`, which a client reads as the deployment withdrawing a model,
    # where an uploaded batch's line said `invalid_request`)
    job = harness.api("POST", "/v1/jobs", body={"prompt": "x", "model": model}, tenant=ENTERPRISE)
    item = harness.api(
        "POST",
        "/v1/batches",
        body={"requests": [{"custom_id": "a", "body": {"prompt": "x", "model": model}}]},
        tenant=ENTERPRISE,
    )
    # Then each is just invalid, and nothing is written
    assert (job.status, job.code) == (422, "invalid_request"), job.body
    assert (item.status, item.code) == (422, "invalid_request"), item.body
    _nothing_changed(harness)
    # while a name off the list is still a model not available
    unknown = harness.api("POST", "/v1/jobs", body={"prompt": "x", "model": "gpt-unknown"}, tenant=ENTERPRISE)
    assert (unknown.status, unknown.code) == (422, "model_not_allowed")


def test_a_wrong_content_type_is_415(harness: Harness) -> None:
    reply = harness.api(
        "POST", "/v1/jobs", raw_body="prompt=hi", headers={"Content-Type": "text/plain"}, tenant=ENTERPRISE
    )
    assert (reply.status, reply.code) == (415, "unsupported_media_type")
    _nothing_changed(harness)


@pytest.mark.parametrize(
    "content_type",
    ["Application/JSON", "APPLICATION/JSON; charset=utf-8", "application/vnd.api+json", "application/json"],
)
def test_a_json_content_type_however_spelt_is_read_as_json(harness: Harness, content_type: str) -> None:
    # Given a job's body sent as JSON, its media type in any case (they are case-insensitive),
    # or a +json type
    body = json.dumps({"prompt": "hi"})
    reply = harness.api(
        "POST", "/v1/jobs", raw_body=body, headers={"Content-Type": content_type}, tenant=ENTERPRISE
    )
    # Then it is accepted as with application/json: never a 500 that pages the operator
    assert reply.status == 202, reply.body
    assert harness.api("GET", f"/v1/jobs/{reply.body['id']}", tenant=ENTERPRISE).body["status"] == "queued"


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches", "/v1/uploads"])
@pytest.mark.parametrize(("content_type", "raw"), [("text/plain", ""), ("application/octet-stream", " ")])
def test_a_post_without_a_body_is_a_4xx_whatever_its_content_type(
    harness: Harness, path: str, content_type: str, raw: str
) -> None:
    # Given a POST with no body, under a Content-Type that is not JSON
    reply = harness.api("POST", path, raw_body=raw, headers={"Content-Type": content_type}, tenant=ENTERPRISE)
    # Then it is refused as the same body sent as JSON is (a 4xx, never a 500), and nothing is written
    as_json = harness.api("POST", path, raw_body=raw, tenant=ENTERPRISE)
    assert (reply.status, reply.code) == (as_json.status, as_json.code), reply.body
    assert (reply.status, reply.code) in ((400, "malformed_json"), (422, "invalid_request"))
    _nothing_changed(harness)


def test_an_oversized_body_is_413(harness: Harness) -> None:
    reply = harness.api("POST", "/v1/jobs", body={"prompt": "x" * 70_000}, tenant=ENTERPRISE)
    assert (reply.status, reply.code) == (413, "payload_too_large")
    _nothing_changed(harness)


@pytest.mark.parametrize("key", ["k" * 256, ""], ids=["256-characters", "empty"])
def test_an_invalid_idempotency_key_is_400_invalid_idempotency_key(harness: Harness, key: str) -> None:
    # When a submit carries an Idempotency-Key outside the documented 1 to 255 characters
    reply = harness.api(
        "POST", "/v1/jobs", body={"prompt": "x"}, headers={"Idempotency-Key": key}, tenant=ENTERPRISE
    )
    # Then the domain's own code answers, whichever layer refused it, and nothing is written
    assert (reply.status, reply.code) == (400, "invalid_idempotency_key")
    assert reply.headers["content-type"] == "application/problem+json"
    _nothing_changed(harness)


def test_a_key_of_the_longest_documented_length_is_accepted(harness: Harness) -> None:
    assert harness.submit(key="k" * 255).status == 202


def test_another_tenants_job_is_404_for_get_and_cancel_and_stays_unchanged(harness: Harness) -> None:
    job_id = harness.submit(tenant=ENTERPRISE).body["id"]
    get = harness.api("GET", f"/v1/jobs/{job_id}", tenant=FREE)
    cancel = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=FREE)
    assert (get.status, get.code) == (404, "job_not_found")
    assert (cancel.status, cancel.code) == (404, "job_not_found")
    mine = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE)
    assert mine.body["status"] == "queued"


def test_without_a_tenant_in_the_context_the_api_answers_401(harness: Harness) -> None:
    reply = harness.api("GET", "/v1/jobs", tenant=None)
    assert (reply.status, reply.code) == (401, "unauthenticated")


def test_cancel_of_a_queued_job_is_immediate_and_again_answers_it_canceled(harness: Harness) -> None:
    job_id = harness.submit().body["id"]
    canceled = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    assert canceled.status == 200
    assert canceled.body["status"] == "canceled"
    # A cancel again (a client's retry of one whose answer it never had) is the outcome asked
    # for, not a 409 "already finished", which says the job ran (hunt 322); and sends no event
    # more
    again = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    assert (again.status, again.body["status"]) == (200, "canceled")
    assert again.body == canceled.body


def test_cancel_of_a_job_that_ended_otherwise_gets_409(harness: Harness) -> None:
    job_id = harness.submit().body["id"]
    harness.drain("high")
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    assert (reply.status, reply.code) == (409, "job_not_cancelable")
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "succeeded"


def test_list_is_newest_first_scoped_to_the_tenant_and_pages(harness: Harness) -> None:
    ids = [harness.submit(prompt=f"p{i}").body["id"] for i in range(3)]
    harness.submit(tenant=FREE)
    first = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"limit": "2"})
    assert first.status == 200
    assert [job["id"] for job in first.body["data"]] == [ids[2], ids[1]]
    second = harness.api(
        "GET", "/v1/jobs", tenant=ENTERPRISE, query={"limit": "2", "cursor": first.body["next_cursor"]}
    )
    assert [job["id"] for job in second.body["data"]] == [ids[0]]
    canceled = harness.api("POST", f"/v1/jobs/{ids[1]}/cancel", tenant=ENTERPRISE)
    assert canceled.status == 200
    only = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"status": "canceled"})
    assert [job["id"] for job in only.body["data"]] == [ids[1]]


def test_the_tenant_index_holds_no_input_and_the_list_shows_each_job_as_get_does(
    harness: Harness, provider: FakeProviderServer
) -> None:
    """The by_tenant index projects only what a listed Job shows (stacks/jobs_table.py): a
    GSI copies every projected attribute on every write, so an input of hundreds of KB would
    be written twice per claim and completion. The list must still show each job whole."""
    # Given a finished job with a large input, metadata and a webhook, and a queued one
    prompt = "x" * 4000
    done = harness.submit(prompt=prompt, metadata={"team": "a"}, webhook={"url": "http://127.0.0.1:9/hook"})
    assert harness.drain("high") == {"batchItemFailures": []}
    queued = harness.submit(prompt=prompt).body["id"]

    # When the tenant index is read as GET /v1/jobs reads it
    indexed = harness.ddb.query(
        TableName=harness.stack.jobs_table,
        IndexName=TENANT_INDEX,
        KeyConditionExpression="tenant_id = :t",
        ExpressionAttributeValues={":t": {"S": ENTERPRISE["tenant_id"]}},
    )["Items"]
    stored = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": queued}})["Item"]

    # Then the table holds the input and the index does not
    assert prompt in stored["input"]["S"]
    assert {item["pk"]["S"] for item in indexed} == {done.body["id"], queued}
    assert all("input" not in item for item in indexed)
    # And each listed job is the job GET answers (which alone places a queued job in line)
    listed = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE).body["data"]
    for job in listed:
        got = harness.api("GET", f"/v1/jobs/{job['id']}", tenant=ENTERPRISE).body
        assert got.pop("queue_position", None) == (1 if job["status"] == "queued" else None)
        assert job.pop("queue_position", None) is None
        # (less the live output, which the index does not hold: `test_the_list_never_says_...`)
        for live in ("stream", "progress", "output_partial", "output_partial_truncated"):
            got.pop(live, None)
        assert job == got
    finished = next(job for job in listed if job["id"] == done.body["id"])
    assert (finished["status"], finished["metadata"]) == ("succeeded", {"team": "a"})
    assert finished["result"]["output"] and finished["webhook"]["url"] == "http://127.0.0.1:9/hook"


def test_a_cursor_of_another_tenant_is_refused(harness: Harness) -> None:
    for i in range(2):
        harness.submit(prompt=f"p{i}")
    page = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"limit": "1"})
    stolen = harness.api("GET", "/v1/jobs", tenant=FREE, query={"cursor": page.body["next_cursor"]})
    assert (stolen.status, stolen.code) == (400, "invalid_cursor")


def test_unknown_job_and_route_are_problem_404s(harness: Harness) -> None:
    assert harness.api("GET", "/v1/jobs/job_doesnotexist", tenant=ENTERPRISE).code == "job_not_found"
    assert harness.api("GET", "/v1/nothing", tenant=ENTERPRISE).status == 404


def test_openapi_document_describes_the_job_routes(harness: Harness) -> None:
    reply = harness.api("GET", "/v1/openapi.json", tenant=ENTERPRISE)
    assert reply.status == 200
    paths = reply.body["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel"} <= set(paths)
    schemas = reply.body["components"]["schemas"]
    assert {"JobRequest", "Job", "Problem"} <= set(schemas)


@pytest.mark.parametrize("path", ["/v1/docs", "/v1/docs/"])
def test_the_swagger_ui_is_served_at_its_first_request(harness: Harness, path: str) -> None:
    page = harness.api("GET", path, tenant=ENTERPRISE)
    assert (page.status, page.headers["content-type"]) == (200, "text/html")
    assert "SwaggerUIBundle" in page.body
    spec = harness.api("GET", "/v1/docs", tenant=ENTERPRISE, query={"format": "json"})
    assert spec.status == 200
    assert "/v1/jobs/{job_id}" in spec.body["paths"]
    # The docs route is registered late, and still kept out of the document it shows.
    assert "/v1/docs" not in spec.body["paths"]
    document = harness.api("GET", "/v1/openapi.json", tenant=ENTERPRISE).body
    assert "/v1/docs" not in document["paths"]


def _operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return document["paths"][path][method]


def _parameter(operation: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in operation["parameters"] if p["name"].lower() == name.lower())["schema"]


def _submit_schema(document: dict[str, Any]) -> dict[str, Any]:
    body = _operation(document, "post", "/v1/jobs")["requestBody"]["content"]["application/json"]["schema"]
    return document["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return next(arm for arm in schema.get("anyOf", [schema]) if arm.get("type") != "null")


def test_openapi_document_states_every_limit_the_config_sets(harness: Harness) -> None:
    # Given the config the API was started with
    limits, provider = harness.config.limits, harness.config.provider
    # When an integrator reads the published document
    document = harness.api("GET", "/v1/openapi.json").body
    request = _submit_schema(document)["properties"]
    # Then the submit body states the allow-list, the deadline, the metadata and the prompt
    assert sorted(_nullable(request["model"])["enum"]) == sorted(provider.models)
    assert _nullable(request["deadline_seconds"])["maximum"] == limits.max_deadline_seconds
    assert request["metadata"]["maxProperties"] == limits.max_metadata_keys
    assert _nullable(request["prompt"])["maxLength"] == limits.max_prompt_chars
    # And the headers and queries state their own bounds and syntax
    submit = _operation(document, "post", "/v1/jobs")
    key = _nullable(_parameter(submit, "Idempotency-Key"))
    assert (key["minLength"], key["maxLength"]) == (1, 255)
    prefer = next(p for p in submit["parameters"] if p["name"].lower() == "prefer")
    assert "wait=N" in prefer["description"] and str(limits.max_submit_wait_seconds) in prefer["description"]
    wait = _parameter(_operation(document, "get", "/v1/jobs/{job_id}"), "wait")
    assert (wait["minimum"], wait["maximum"]) == (0, limits.max_get_wait_seconds)
    events_wait = _parameter(_operation(document, "get", "/v1/jobs/{job_id}/events"), "wait")
    assert (events_wait["minimum"], events_wait["maximum"]) == (0, harness.config.streaming.max_wait_seconds)
    listing = _operation(document, "get", "/v1/jobs")
    assert (_parameter(listing, "limit")["minimum"], _parameter(listing, "limit")["maximum"]) == (1, 100)
    cursor = _nullable(_parameter(listing, "cursor"))
    assert cursor["pattern"] == "^[A-Za-z0-9_-]{1,2048}$"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "model": "fake-large"},
        {"prompt": "x", "deadline_seconds": 86_400},
        {"prompt": "x", "metadata": {f"k{i}": "v" for i in range(16)}},
        {"prompt": "x" * 5000},
    ],
    ids=["allowed-model", "longest-deadline", "16-metadata-keys", "longest-prompt"],
)
def test_a_request_at_each_stated_limit_is_accepted(harness: Harness, body: dict[str, Any]) -> None:
    assert harness.api("POST", "/v1/jobs", body=body, tenant=ENTERPRISE).status == 202


def test_a_deadline_beyond_the_stated_maximum_is_422(harness: Harness) -> None:
    reply = harness.submit(deadline_seconds=harness.config.limits.max_deadline_seconds + 1)
    assert (reply.status, reply.code) == (422, "invalid_request")
    _nothing_changed(harness)


def test_a_cursor_outside_the_stated_format_is_422_and_a_well_formed_foreign_one_400(
    harness: Harness,
) -> None:
    malformed = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"cursor": "not a cursor!"})
    assert (malformed.status, malformed.code) == (422, "invalid_request")
    unknown = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"cursor": "abc"})
    assert (unknown.status, unknown.code) == (400, "invalid_cursor")


@pytest.mark.parametrize(
    "key",
    [
        {"pk": "job_x", "tenant_created": "c"},  # past the job list's range: AWS refuses it (500 before)
        {"pk": "", "tenant_created": "a"},
        {"pk": "job_x", "tenant_created": 7},
        {"pk": "job_x", "tenant_created": "a" * 1025},
    ],
    ids=["outside-the-range", "empty-key", "not-a-string", "too-long"],
)
def test_a_forged_cursor_of_the_tenants_own_is_400_never_a_query_aws_refuses(
    harness: Harness, key: dict[str, Any]
) -> None:
    import base64

    raw = json.dumps({"tenant_id": ENTERPRISE["tenant_id"], **key}).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    reply = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"cursor": cursor})
    assert (reply.status, reply.code) == (400, "invalid_cursor")


def test_the_list_never_says_a_stream_true_job_is_not_streaming(harness: Harness) -> None:
    # Given a job submitted with stream: true
    job_id = harness.submit(stream=True).body["id"]
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["stream"] is True
    # When the tenant lists its jobs (read from the tenant index, which holds no live output)
    [listed] = [
        job for job in harness.api("GET", "/v1/jobs", tenant=ENTERPRISE).body["data"] if job["id"] == job_id
    ]
    # Then the list says nothing of it rather than something false: a GET of the job does
    assert "stream" not in listed and "progress" not in listed and "output_partial" not in listed
    assert listed["status"] == "queued"


@pytest.mark.parametrize("kept_before", [False, True], ids=["first-round", "kept-for-a-round-already"])
def test_a_redelivery_late_in_the_retention_keeps_the_job_for_its_retries_once(
    harness: Harness, receiver: WebhookReceiver, kept_before: bool
) -> None:
    # Given a canceled job with a webhook whose retention ends in a minute; or one kept past
    # its retention for an earlier round already (created longer ago than the retention)
    job_id = harness.submit(webhook={"url": f"http://127.0.0.1:{receiver.port}/hooks"}).body["id"]
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 200
    ddb = aws.client("dynamodb")
    now = int(time.time())
    created_ms = (now - harness.config.retention_seconds - 86_400) * 1000 if kept_before else None
    ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET expires_at = :at" + (", created_ms = :created" if created_ms else ""),
        ExpressionAttributeValues={
            ":at": {"N": str(now + 60)},
            **({":created": {"N": str(created_ms)}} if created_ms else {}),
        },
    )
    # When the client asks for its webhook again
    asked = int(time.time())
    assert harness.api("POST", f"/v1/jobs/{job_id}/webhook/redeliver", tenant=ENTERPRISE).status == 202
    # Then the job outlives the new round's retries (each attempt, and a poll, still find it);
    # but a job is never kept past its retention for more than one round, however often asked
    item = ddb.get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": job_id}})["Item"]
    retries = (
        sum(harness.config.webhooks.schedule_seconds) + 3 * harness.config.reconciler.stale_webhook_seconds
    )
    if kept_before:
        assert int(item["expires_at"]["N"]) == now + 60
    else:
        # (counted from when it was asked: a slow machine's seconds in between are not the job's)
        assert int(item["expires_at"]["N"]) >= asked + retries


@pytest.mark.parametrize("base64_body", [False, True], ids=["text", "base64"])
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_a_body_nested_too_deeply_to_parse_is_a_400_and_writes_nothing(
    harness: Harness, path: str, base64_body: bool
) -> None:
    # Given a valid JSON body of about 2.4 KB whose metadata nests 1,200 levels deep
    nested = "[" * 1200 + "]" * 1200
    raw = '{"prompt": "x", "metadata": {"deep": ' + nested + "}}"
    if path == "/v1/batches":
        raw = '{"requests": [{"custom_id": "a", "body": ' + raw + "}]}"
    # When it is submitted, then it is refused as malformed JSON, not a 500
    reply = harness.api("POST", path, raw_body=raw, tenant=ENTERPRISE, base64_body=base64_body)
    assert (reply.status, reply.code) == (400, "malformed_json")
    assert harness.api("GET", "/v1/jobs", tenant=ENTERPRISE).body["data"] == []
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "x", "params": {"stop": [' + ",".join(["0"] * 20_000) + "]}}",
        '{"prompt": "x", ' + ",".join(f'"k{i}": 0' for i in range(900)) + "}",
        '{"prompt": "x", "webhook": {"url": "https://example.com/h", "events": ['
        + ",".join(['"job.nope"'] * 5_000)
        + "]}}",
        '{"prompt": "x", "' + "k" * 30_000 + '": 0}',
    ],
    ids=["stop-list", "unknown-fields", "event-list", "one-long-unknown-field"],
)
def test_a_small_body_with_thousands_of_errors_gets_a_small_problem_and_writes_nothing(
    harness: Harness, raw: str
) -> None:
    # Given a body within the size limit whose errors multiply (one per element or field)
    reply = harness.api("POST", "/v1/jobs", raw_body=raw, tenant=ENTERPRISE)
    # Then it is the ordinary 422, naming only the first errors, however many there are: an
    # answer of millions of errors would be over Lambda's 6 MB (a 502) or its memory
    assert (reply.status, reply.code) == (422, "invalid_request")
    assert 1 <= len(reply.body["errors"]) <= 20
    assert len(json.dumps(reply.body)) < 8_000
    _nothing_changed(harness)


def test_more_stop_sequences_than_a_request_may_give_are_refused_but_a_stored_job_with_them_still_runs(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given the bound on a request's stop sequences
    too_many = [f"s{index}" for index in range(17)]
    refused = harness.api(
        "POST", "/v1/jobs", body={"prompt": "x", "params": {"stop": too_many}}, tenant=ENTERPRISE
    )
    assert (refused.status, refused.code) == (422, "invalid_request")
    _nothing_changed(harness)
    # And a job a version before the bound accepted with 17 of them, still queued at the upgrade
    job_id = harness.submit().body["id"]
    item = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": job_id}})["Item"]
    stored = json.loads(item["input"]["S"])
    stored["params"]["stop"] = too_many
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET #input = :input",
        ExpressionAttributeNames={"#input": "input"},
        ExpressionAttributeValues={":input": {"S": json.dumps(stored)}},
    )
    # When the client reads it and a worker runs it, then both work as before the upgrade
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).status == 200
    assert harness.drain("high") == {"batchItemFailures": []}
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "succeeded"
    assert provider.calls_for(job_id) == 1


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_an_object_of_more_members_than_any_request_has_is_refused_before_validation(
    harness: Harness, path: str
) -> None:
    # Given a body with an object of 1,001 members (no object of a request has that many)
    members = ", ".join(f'"m{index}": "v"' for index in range(1001))
    raw = '{"prompt": "x", "metadata": {' + members + "}}"
    if path == "/v1/batches":
        raw = '{"requests": [{"custom_id": "a", "body": ' + raw + "}]}"
    # When it is submitted, then it is refused as such, and nothing is written
    reply = harness.api("POST", path, raw_body=raw, tenant=ENTERPRISE)
    assert (reply.status, reply.code) == (422, "invalid_request")
    assert "1001 members" in reply.body["detail"]
    _nothing_changed(harness)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_a_forged_cursor_nested_too_deeply_to_parse_is_a_400_not_a_500(harness: Harness, path: str) -> None:
    # Given a cursor of the API's format that decodes to JSON nested 1,200 levels deep
    import base64

    cursor = base64.urlsafe_b64encode(("[" * 1200).encode()).decode().rstrip("=")
    # When a list is asked for with it, then it is the client's bad cursor, not a server fault
    reply = harness.api("GET", path, tenant=ENTERPRISE, query={"cursor": cursor})
    assert (reply.status, reply.code) == (400, "invalid_cursor")


def test_a_compressed_body_is_415_and_writes_nothing(harness: Harness) -> None:
    # Given a body sent with a Content-Encoding the API does not take (it compresses nothing)
    reply = harness.api(
        "POST",
        "/v1/jobs",
        body={"prompt": "hi"},
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        tenant=ENTERPRISE,
    )
    # Then it is refused as such, not read as if it were plain
    assert (reply.status, reply.code) == (415, "unsupported_media_type")
    _nothing_changed(harness)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_a_list_page_too_large_for_lambdas_answer_ends_early_and_pages_on(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # Given ten jobs (or batches), and a response limit that holds about three of them
    # (Lambda's is 6 MB: a page of a hundred whose metadata is control characters, escaped,
    # can pass it; hunt 218 found the batch list had no such check)
    metadata = {"note": "\x01" * 200}
    if path == "/v1/jobs":
        ids = [harness.submit(metadata=metadata).body["id"] for _ in range(10)]
    else:
        ids = [
            harness.api(
                "POST",
                path,
                body={"requests": [{"custom_id": "a", "body": {"prompt": "hi"}}], "metadata": metadata},
                tenant=ENTERPRISE,
            ).body["id"]
            for _ in range(10)
        ]
    one = len(json.dumps(harness.api("GET", path, tenant=ENTERPRISE, query={"limit": "1"}).body))
    monkeypatch.setattr(harness.api_module, "MAX_RESPONSE_BODY_BYTES", 3 * one)
    # When the tenant lists them a page of ten at a time
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        query = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        reply = harness.api("GET", path, tenant=ENTERPRISE, query=query)
        assert reply.status == 200
        # Then each page is within the limit, and ends early with a cursor where it must
        assert len(json.dumps(reply.body)) <= 3 * one
        seen += [entry["id"] for entry in reply.body["data"]]
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    # And every one is listed once, newest first
    assert seen == list(reversed(ids))


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_a_number_too_long_to_read_is_a_400_and_writes_nothing(harness: Harness, path: str) -> None:
    # Given valid JSON whose integer has 5,000 digits: Python's parser refuses it with a plain
    # ValueError (its limit is 4,300), which validation never sees
    raw = '{"prompt": "x", "params": {"max_tokens": 1' + "0" * 5000 + "}}"
    if path == "/v1/batches":
        raw = '{"requests": [{"custom_id": "a", "body": ' + raw + "}]}"
    reply = harness.api("POST", path, raw_body=raw, tenant=ENTERPRISE)
    # Then it is malformed JSON, the client's, not a 500
    assert (reply.status, reply.code) == (400, "malformed_json")
    _nothing_changed(harness)


@pytest.mark.parametrize(
    ("path", "base_path"),
    [("/v1/batches/", ""), ("/v1/batches", "/llmq")],
    ids=["trailing slash", "base path"],
)
def test_a_batch_posted_with_a_trailing_slash_has_the_batch_body_limit(
    harness: Harness, path: str, base_path: str
) -> None:
    # Given a batch body larger than a job's body limit and well within a batch's
    requests = [{"custom_id": f"c{index}", "body": {"prompt": "x" * 900}} for index in range(100)]
    raw = json.dumps({"requests": requests})
    assert harness.config.limits.max_body_bytes < len(raw) < harness.config.batches.max_body_bytes
    # When it is posted to /v1/batches/, which routes as /v1/batches, or through a custom
    # domain's base path, which API Gateway leaves in the event's path (review 227)
    context = {"domainName": "api.example.com", "path": f"{base_path}{path}"} if base_path else None
    reply = harness.api(
        "POST", path, raw_body=raw, tenant=ENTERPRISE, request_context=context, base_path=base_path
    )
    # Then it is the batch it is, not a 413 by a job's limit
    assert reply.status == 202, reply.body


def test_prefer_wait_answers_202_when_the_job_is_still_running(harness: Harness) -> None:
    reply = harness.api(
        "POST", "/v1/jobs", body={"prompt": "x"}, headers={"Prefer": "wait=1"}, tenant=ENTERPRISE
    )
    assert reply.status == 202
    assert reply.headers["preference-applied"] == "wait=1"
    assert reply.body["status"] == "queued"


def test_prefer_header_lines_are_one_list_of_preferences(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a client that sends its preferences as two Prefer lines (RFC 7240 §2), which API
    # Gateway passes as two values
    real = harness.api_module.handler

    def two_lines(event: dict[str, Any], context: Any) -> Any:
        event["multiValueHeaders"]["Prefer"] = ["respond-async", "wait=1"]
        return real(event, context)

    monkeypatch.setattr(harness.api_module, "handler", two_lines)
    # When it submits a job
    reply = harness.api(
        "POST", "/v1/jobs", body={"prompt": "x"}, headers={"Prefer": "wait=1"}, tenant=ENTERPRISE
    )
    # Then the job is accepted, its wait applied (hunt 289: a 422 at header.prefer)
    assert (reply.status, reply.headers.get("preference-applied")) == (202, "wait=1"), reply.body


@pytest.mark.parametrize(
    ("prefer", "applied"),
    [
        ('respond-async, WAIT = "1"; x=y', "wait=1"),
        ("wait=\u0663", None),
        ("wait=\uff13", None),
        ("x-wait=3", None),
        ("wait=1e1", None),
        ("wait", None),
    ],
)
def test_only_a_wait_preference_rfc_7240_reads_as_one_is_applied(
    harness: Harness, prefer: str, applied: str | None
) -> None:
    # (hunt 273: Arabic-Indic or full-width digits, and a preference merely ending in "wait",
    # held a long-poll place and answered Preference-Applied for a wait never asked)
    reply = harness.api(
        "POST", "/v1/jobs", body={"prompt": "x"}, headers={"Prefer": prefer}, tenant=ENTERPRISE
    )
    assert (reply.status, reply.headers.get("preference-applied")) == (202, applied)


@pytest.mark.parametrize("trouble", ["wait of 4,301 digits", "throttled read while waiting"])
def test_a_submit_whose_wait_fails_is_still_its_one_accepted_job(harness: Harness, trouble: str) -> None:
    """The job is written and queued before the wait: any failure of the wait must answer the
    202, or a client retries the error into a second, paid job."""
    headers = {"Prefer": "wait=" + "9" * 4301 if trouble.startswith("wait") else "wait=2"}

    def throttle(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "injected"}}, "GetItem"
        )

    ddb = aws.client("dynamodb")
    if trouble.startswith("throttled"):
        ddb.meta.events.register("before-call.dynamodb.GetItem", throttle, unique_id="throttle-wait")
    try:
        # (received 26 s ago: no time is left to wait, so the long wait is read, not waited out)
        received = int((time.time() - 26) * 1000) if trouble.startswith("wait") else None
        reply = harness.api(
            "POST",
            "/v1/jobs",
            body={"prompt": "x"},
            headers=headers,
            tenant=ENTERPRISE,
            request_context={"requestTimeEpoch": received} if received else None,
        )
    finally:
        ddb.meta.events.unregister("before-call.dynamodb.GetItem", unique_id="throttle-wait")
    assert reply.status == 202, reply.body
    assert reply.body["status"] == "queued"
    assert "preference-applied" not in reply.headers
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 1
    listed = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE).body["data"]
    assert [job["id"] for job in listed] == [reply.body["id"]]


def test_get_with_wait_returns_at_once_for_a_terminal_job(harness: Harness) -> None:
    job_id = harness.submit().body["id"]
    harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    reply = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query={"wait": "20"})
    assert (reply.status, reply.body["status"]) == (200, "canceled")
    # A longer wait than the bound is cut to it (test_long_polls), a negative one refused
    too_long = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query={"wait": "21"})
    assert (too_long.status, too_long.body["status"]) == (200, "canceled")
    negative = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query={"wait": "-1"})
    assert (negative.status, negative.code) == (422, "invalid_request")


# The root logger's level: Python's default, and what Lambda sets for a function whose
# application log level (advanced logging controls) an operator turned to INFO or DEBUG.
@pytest.mark.parametrize("root_level", [None, logging.INFO, logging.DEBUG])
def test_prompts_and_outputs_never_reach_the_logs(
    harness: Harness,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    root_level: int | None,
) -> None:
    # Given the root logger at the level under test (hunt 325: at DEBUG, botocore logged every
    # request's body and Powertools' event handler the parsed request, the prompt in both)
    if root_level is not None:
        caplog.set_level(root_level)
    secret_prompt = "TOP-SECRET-merger-plan-7731"
    job_id = harness.submit(prompt=f"{secret_prompt} [[tokens:3]]").body["id"]
    harness.drain("high")
    output = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["result"]["output"]
    captured = capfd.readouterr()
    logs = captured.out + captured.err + caplog.text
    assert "job accepted" in logs and "job succeeded" in logs
    assert secret_prompt not in logs
    assert output not in logs


def test_a_known_path_with_another_method_is_405_with_allow(harness: Harness) -> None:
    reply = harness.api("PUT", "/v1/jobs", body={"prompt": "x"}, tenant=ENTERPRISE)
    assert (reply.status, reply.code) == (405, "method_not_allowed")
    assert reply.headers["allow"] == "GET, POST"
    _nothing_changed(harness)


def test_every_path_of_the_api_answers_another_method_405_with_what_it_allows(harness: Harness) -> None:
    # Given every path the API document lists, and the methods it lists for each
    paths = harness.api("GET", "/v1/openapi.json", tenant=ENTERPRISE).body["paths"]
    assert "/v1/jobs/{job_id}/events" in paths
    for template, operations in paths.items():
        path = re.sub(r"\{[^}]+\}", "job_0123456789abcdef0123456789", template)
        listed = sorted(method.upper() for method in operations if method in ("get", "post"))
        # When a client uses a method the path does not serve
        reply = harness.api("DELETE", path, tenant=ENTERPRISE)
        # Then it is a 405 naming the methods it does serve, never a 404 "no such route"
        assert (reply.status, reply.code) == (405, "method_not_allowed"), template
        assert sorted(reply.headers["allow"].split(", ")) == listed, template
    _nothing_changed(harness)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", '/v1/jobs/job_a"b'),
        ("GET", "/v1/jobs/job_a\\b/events"),
        ("POST", "/v1/jobs/job_a\x01b/cancel"),
        ("GET", '/v1/batches/bat_a"b/results'),
    ],
)
def test_an_id_with_a_character_the_router_takes_not_is_422_not_405_to_the_method_it_used(
    harness: Harness, method: str, path: str
) -> None:
    # When a client asks a route with the method it takes, an id holding a raw `"`, `\` or a
    # control character (the router's pattern has none of them)
    reply = harness.api(method, path, tenant=ENTERPRISE)
    # Then it is the 422 the same id percent-encoded gets, not a 405 "use GET" to a GET
    assert (reply.status, reply.code) == (422, "invalid_request"), reply.body
    _nothing_changed(harness)


@pytest.mark.parametrize(
    ("domain", "requested", "base"),
    [
        # The execute-api domain: the stage comes first (a path without it is a 403 on AWS)
        (
            "abc123.execute-api.us-east-1.amazonaws.com",
            "/prod/v1/jobs",
            "https://abc123.execute-api.us-east-1.amazonaws.com/prod",
        ),
        # A custom domain with a base path mapping, and one mapped at its root
        ("api.example.com", "/llmq/v1/jobs", "https://api.example.com/llmq"),
        ("api.example.com", "/v1/jobs", "https://api.example.com"),
    ],
)
@pytest.mark.parametrize("base_path_in_path", [False, True])
def test_links_point_where_the_client_reached_the_api(
    harness: Harness, domain: str, requested: str, base: str, base_path_in_path: bool
) -> None:
    # When a job is submitted through that domain and path (a custom domain's base path, which
    # API Gateway leaves in the event's `path` too: routed on the resource's own path, hunt 226)
    base_path = (
        requested.removesuffix("/v1/jobs") if base_path_in_path and "execute-api" not in domain else ""
    )
    reply = harness.api(
        "POST",
        "/v1/jobs",
        body={"prompt": "hello"},
        tenant=ENTERPRISE,
        request_context={"domainName": domain, "path": requested},
        base_path=base_path,
    )
    # Then it is routed, and its Location is that URL, so following it reaches the job
    assert reply.status == 202, reply.body
    assert reply.headers["location"] == f"{base}/v1/jobs/{reply.body['id']}"
    job = harness.api(
        "GET",
        f"/v1/jobs/{reply.body['id']}",
        tenant=ENTERPRISE,
        request_context={"domainName": domain, "path": f"{requested}/{reply.body['id']}"},
        base_path=base_path,
    )
    assert job.status == 200 and job.body["id"] == reply.body["id"]


def test_prefer_wait_is_cut_to_what_the_gateway_has_left(harness: Harness) -> None:
    """ "Amazon API Gateway quotas" (https://docs.aws.amazon.com/apigateway/latest/developerguide/limits.html):
    a REST API's integration timeout is 29 s, counted from when API Gateway received the request
    (requestContext.requestTimeEpoch), authorizer and cold start included."""
    # Given a request API Gateway received 26 s ago (an authorizer and a cold start took that
    # long): of its 29 s, less than the answer's reserve is left
    received = int((time.time() - 26) * 1000)
    # When the client asks to wait 25 s for a job that cannot finish that fast
    reply = harness.api(
        "POST",
        "/v1/jobs",
        body={"prompt": "slow [[latency:60]]"},
        headers={"Prefer": "wait=25"},
        tenant=ENTERPRISE,
        request_context={"requestTimeEpoch": received},
    )
    # Then the API answers 202 without waiting (no Preference-Applied), instead of a 504 for
    # a job that was accepted
    assert reply.status == 202, reply.body
    assert "preference-applied" not in reply.headers
    # And a GET with ?wait= on the same budget answers at once too, with the job still queued
    polled = harness.api(
        "GET",
        f"/v1/jobs/{reply.body['id']}",
        query={"wait": "20"},
        tenant=ENTERPRISE,
        request_context={"requestTimeEpoch": received},
    )
    assert polled.status == 200
    assert polled.body["status"] == "queued"


# ---- a 500 the api answers itself is counted, so an alarm sees it ----------------------


@contextmanager
def _refused(operation: str, code: str, status: int = 400) -> Iterator[list[str]]:
    """llmq's own boto3 client fails `operation` with `code`, as AWS answers a call the role
    may not make (AccessDeniedException) or on a table that is gone; the request never
    reaches moto. The same botocore hook tests/aws_faults.py arms, with a code that is not
    transient."""
    service, name = operation.split(".")
    events = aws.client(service).meta.events
    refused: list[str] = []

    def refuse(**_: Any) -> None:
        refused.append(operation)
        error: Any = {
            "Error": {"Code": code, "Message": f"injected: {operation}"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        raise ClientError(error, name)

    events.register(f"before-call.{service}.{name}", refuse, unique_id="test-api-refused")
    try:
        yield refused
    finally:
        events.unregister(f"before-call.{service}.{name}", unique_id="test-api-refused")


@pytest.mark.parametrize(
    ("operation", "method", "path"),
    [
        ("dynamodb.TransactWriteItems", "POST", "/v1/jobs"),
        ("dynamodb.GetItem", "GET", "/v1/jobs/{job_id}"),
        ("dynamodb.Query", "GET", "/v1/jobs"),
    ],
)
def test_an_aws_call_failing_unexpectedly_is_a_500_problem_and_counts_for_the_alarm(
    harness: Harness, capsys: pytest.CaptureFixture[str], operation: str, method: str, path: str
) -> None:
    """The api catches the exception to answer problem+json, so Lambda's Errors metric never
    counts it; ApiUnexpectedError (namespace llmq, dimension service) is what the
    ApiUnexpectedErrors alarm watches (stacks/monitoring.py)."""
    # Given a job, and an AWS call the api's role is refused
    job_id = harness.submit().body["id"]
    capsys.readouterr()
    with _refused(operation, "AccessDeniedException") as refused:
        # When a client makes a request that needs it
        body = {"prompt": "hello"} if method == "POST" else None
        reply = harness.api(method, path.format(job_id=job_id), body=body, tenant=ENTERPRISE)
    # Then the call was refused, and the client gets a 500 problem, not a crash
    assert refused == [operation]
    assert (reply.status, reply.code) == (500, "internal_error")
    assert reply.headers["content-type"] == "application/problem+json"
    # And the function printed exactly one ApiUnexpectedError count for CloudWatch
    (record,) = emitted_metrics(capsys.readouterr().out, MetricName.API_UNEXPECTED_ERROR)
    (directive,) = record["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == METRICS_NAMESPACE
    assert directive["Dimensions"] == [["service"]]
    assert record["service"] == SERVICE_NAME
    assert record[MetricName.API_UNEXPECTED_ERROR] == [1.0]


def test_a_throttle_or_a_client_error_is_not_counted_as_unexpected(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a DynamoDB throttle that outlasted botocore's retries
    with _refused("dynamodb.TransactWriteItems", "ProvisionedThroughputExceededException") as refused:
        busy = harness.submit()
    # And a request the api refuses for the client's own mistake
    missing = harness.api("GET", "/v1/jobs/job_doesnotexist", tenant=ENTERPRISE)
    # Then they are a 503 to retry and a 404, and neither counts as an unexpected error
    assert refused == ["dynamodb.TransactWriteItems"]
    assert (busy.status, busy.code) == (503, "service_unavailable")
    assert missing.status == 404
    assert emitted_metrics(capsys.readouterr().out, MetricName.API_UNEXPECTED_ERROR) == []


def test_a_submit_whose_message_was_not_sent_is_accepted_and_counted_for_the_alarm(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job is stored before its message is sent: when SendMessage fails the client keeps
    its 202 and the reconciler enqueues the job later. No error metric sees that, so the api
    counts JobEnqueueFailed (namespace llmq, dimensions service and lane), which the
    Lane<Name>EnqueueFailed alarm watches (stacks/monitoring.py)."""
    capsys.readouterr()
    # Given SQS refusing the api's SendMessage
    with _refused("sqs.SendMessage", "AccessDeniedException") as refused:
        # When a client submits a job
        reply = harness.submit(prompt="hello")
    # Then the job is accepted and stored as queued, with no message on its lane
    assert refused == ["sqs.SendMessage"]
    assert reply.status == 202
    job = harness.api("GET", f"/v1/jobs/{reply.body['id']}", tenant=ENTERPRISE).body
    assert job["status"] == "queued"
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0
    # And the function printed exactly one JobEnqueueFailed count for the job's lane
    (record,) = emitted_metrics(capsys.readouterr().out, MetricName.JOB_ENQUEUE_FAILED)
    (directive,) = record["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == METRICS_NAMESPACE
    assert sorted(directive["Dimensions"][0]) == ["lane", "service"]
    assert (record["lane"], record["service"]) == ("high", SERVICE_NAME)
    assert record[MetricName.JOB_ENQUEUE_FAILED] == [1.0]


class _Released(Exception):
    """What a stalled send raises once its test is over (botocore retries no such error)."""


@contextmanager
def _stalled_sends(
    count: int | None = None, service: str = "sqs", operation: str = "SendMessage"
) -> Iterator[list[str]]:
    """SQS answering no SendMessage (a brownout: the connection open, no answer) while the block
    runs, or only its first `count`; each stalled call fails when it ends, so none sends
    anything afterwards. (Or another service's `operation`.)"""
    release, stalled, ended = threading.Event(), [], []

    def stall(**_: Any) -> None:
        if count is not None and len(stalled) >= count:
            return
        stalled.append(operation)
        release.wait(60)
        ended.append(operation)
        raise _Released

    events = aws.client(service).meta.events
    events.register(f"before-send.{service}.{operation}", stall, unique_id=f"stalled-{operation}")
    try:
        yield stalled
    finally:
        release.set()
        events.unregister(f"before-send.{service}.{operation}", unique_id=f"stalled-{operation}")
        deadline = time.monotonic() + 5
        while len(ended) < len(stalled) and time.monotonic() < deadline:
            time.sleep(0.01)


def test_a_submit_or_a_cancel_whose_send_stalls_still_answers_before_api_gateway_gives_up(
    harness: Harness,
) -> None:
    # Given a request API Gateway received 20 s ago (9 s of its 29 left), and SQS answering no
    # send: each try takes botocore's 10 s read timeout, three tries (hunt 273: 40 s)
    def context() -> dict[str, int]:
        return {"requestTimeEpoch": int((time.time() - 20.0) * 1000)}

    job_id = harness.submit(prompt="first", webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    with _stalled_sends() as stalled:
        # When a client submits a job, and cancels another
        started = time.monotonic()
        reply = harness.api(
            "POST", "/v1/jobs", body={"prompt": "hello"}, tenant=ENTERPRISE, request_context=context()
        )
        submitted = time.monotonic() - started
        started = time.monotonic()
        canceled = harness.api(
            "POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE, request_context=context()
        )
        cancel_took = time.monotonic() - started
    # Then each is answered, accepted and done, before API Gateway's 29 s: the sends are the
    # reconciler's to make (a 504 had a retry without a key pay for a second job, and a retried
    # cancel meet a 409 for the job it canceled)
    assert len(stalled) >= 2
    assert (reply.status, canceled.status, canceled.body["status"]) == (202, 200, "canceled")
    assert submitted < 9.0 and cancel_took < 9.0, (submitted, cancel_took)
    assert harness.api("GET", f"/v1/jobs/{reply.body['id']}", tenant=ENTERPRISE).body["status"] == "queued"


def test_a_submit_whose_send_and_its_mark_for_the_reconciler_stall_is_still_accepted_in_time(
    harness: Harness,
) -> None:
    # Given a request API Gateway received 20 s ago (9 s of its 29 left), SQS answering no
    # send, and DynamoDB then answering no write: the mark that puts the job first for the
    # reconciler takes botocore's three 10 s tries
    late = {"requestTimeEpoch": int((time.time() - 20.0) * 1000)}
    with _stalled_sends() as sends, _stalled_sends(service="dynamodb", operation="UpdateItem") as marks:
        # When a client submits a job
        started = time.monotonic()
        reply = harness.api(
            "POST", "/v1/jobs", body={"prompt": "hello"}, tenant=ENTERPRISE, request_context=late
        )
        took = time.monotonic() - started
    # Then it is accepted before API Gateway gives up (review 263: the mark ran past it, and
    # the accepted submit was a 504 its client retried into a second, paid job); the job
    # waits, queued, for the reconciler's sweep
    assert sends and marks
    assert reply.status == 202 and took < 9.0, (reply.status, took)
    assert harness.api("GET", f"/v1/jobs/{reply.body['id']}", tenant=ENTERPRISE).body["status"] == "queued"


def test_a_send_after_sends_given_up_in_the_same_environment_goes_at_once(harness: Harness) -> None:
    # Given four submits whose sends SQS never answered, given up (each request with 1.5 s to
    # spare), their calls still waiting on their connections
    lane = harness.stack.lane_queue_urls["high"]
    with _stalled_sends(count=4) as stalled:
        for _ in range(4):
            late = {"requestTimeEpoch": int((time.time() - 25.0) * 1000)}
            reply = harness.api(
                "POST", "/v1/jobs", body={"prompt": "x"}, tenant=ENTERPRISE, request_context=late
            )
            assert reply.status == 202
        assert len(stalled) == 4 and harness.total_count(lane) == 0
        # When the next submit comes, SQS answering again
        reply = harness.api("POST", "/v1/jobs", body={"prompt": "y"}, tenant=ENTERPRISE)
        # Then its message is sent with it, not queued behind the stalled calls (review 259: a
        # pool of four held it until its own deadline, 24 s, and it was given up)
        assert reply.status == 202
        assert harness.total_count(lane) == 1


def test_a_boolean_or_a_string_where_a_number_belongs_is_422_and_writes_nothing(harness: Harness) -> None:
    """Found by the schema fuzzer: lax validation took `"seed": true` as seed 1."""
    for params in ({"seed": True}, {"max_tokens": "5"}, {"temperature": False}):
        reply = harness.submit(prompt="hello", params=params)
        assert (reply.status, reply.code) == (422, "invalid_request"), params
    # (and `"deadline_seconds": true` as a deadline of 1 s, `"stream": 1` as true)
    for fields in ({"deadline_seconds": True}, {"deadline_seconds": "30"}, {"stream": 1}, {"stream": "true"}):
        reply = harness.submit(prompt="hello", **fields)
        assert (reply.status, reply.code) == (422, "invalid_request"), fields
    assert harness.item_count() == 0
    # And whole numbers are still numbers
    assert harness.submit(prompt="hello", params={"temperature": 1, "seed": 7}).status == 202


# ---- the delivery log ---------------------------------------------------------------------


def test_the_webhook_log_shows_each_attempt_of_the_terminal_event_to_its_tenant_only(
    harness: Harness,
) -> None:
    from llmq.jobs import JobRepository
    from llmq.models import DeliveryAttempt, DeliveryStatus

    # Given a finished job with a webhook, whose first delivery attempt met a 503
    job_id = harness.submit(prompt="hi", webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    harness.drain("high")
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    attempt = DeliveryAttempt(
        attempt=1, at="2026-12-02T10:00:00.000Z", status_code=503, latency_ms=42, response_head="busy"
    )
    assert jobs.record_delivery(
        job_id, DeliveryStatus.PENDING, 503, 1.0, previous_attempts=0, attempt=attempt
    )
    # When its tenant reads the log
    reply = harness.api("GET", f"/v1/jobs/{job_id}/webhook", tenant=ENTERPRISE)
    # Then it shows the terminal event, pending, with that attempt
    assert reply.status == 200, reply.body
    assert reply.body["object"] == "webhook_log" and reply.body["url"] == "http://127.0.0.1:9/hook"
    (delivery,) = reply.body["deliveries"]
    assert (delivery["event"], delivery["status"]) == ("job.succeeded", "pending")
    assert delivery["attempts"] == [attempt.model_dump(mode="json")]
    # And another tenant cannot see it, and a job without a webhook has no log
    assert harness.api("GET", f"/v1/jobs/{job_id}/webhook", tenant=FREE).code == "job_not_found"
    plain = harness.submit().body["id"]
    missing = harness.api("GET", f"/v1/jobs/{plain}/webhook", tenant=ENTERPRISE)
    assert (missing.status, missing.code) == (404, "webhook_not_found")
    # And the path takes GET only
    assert harness.api("DELETE", f"/v1/jobs/{job_id}/webhook", tenant=ENTERPRISE).status == 405


def test_a_cancel_whose_webhook_message_sqs_refuses_still_answers_canceled(harness: Harness) -> None:
    # Given a queued job with a webhook, and SQS refusing SendMessage with an error no retry fixes
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    with _refused("sqs.SendMessage", "AccessDenied", status=403) as refused:
        # When the client cancels it
        reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    # Then it is told canceled, as the cancel is written (an error would make its retry a
    # 409 for a canceled job), and the delivery waits pending for the reconciler
    assert refused == ["sqs.SendMessage"]
    assert (reply.status, reply.body["status"]) == (200, "canceled")
    assert reply.body["webhook"]["delivery"]["status"] == "pending"


def _job_and_batch_hooked_at(harness: Harness, host: str) -> tuple[ApiReply, ApiReply]:
    """A job's submit and a batch's, each naming a webhook on `host`."""
    job = harness.submit(webhook={"url": f"https://{host}/llmq"})
    body = {
        "requests": [{"custom_id": "a", "body": {"prompt": "x"}}],
        "webhook": {"url": f"https://{host}/b"},
    }
    return job, harness.api("POST", "/v1/batches", body=body, tenant=ENTERPRISE)


@pytest.mark.parametrize("failing", ["the host's name servers", "the resolver"])
def test_a_webhook_host_dns_cannot_look_up_now_is_a_503_and_writes_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failing: str
) -> None:
    # Given the lookup of a webhook host failing for now (EAI_AGAIN: timed out, or
    # unreachable): its own name servers' (the resolver answers for other names), or the
    # resolver's, for every name
    looked_up: list[str] = []

    def lookup(host: str, *_: Any, **__: Any) -> Any:
        looked_up.append(host)
        if failing == "the host's name servers" and host != "hooks.example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("52.94.0.1", 443))]
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    # When a job and a batch name a webhook on a public host
    job, batch = _job_and_batch_hooked_at(harness, "hooks.example.com")
    # Then each is a 503 to retry, with Retry-After, not a 422 calling the URL bad; nothing written
    assert [host for host in looked_up if host == "hooks.example.com"] == ["hooks.example.com"] * 2
    for reply in (job, batch):
        assert (reply.status, reply.code) == (503, "webhook_host_unavailable")
        assert int(reply.headers["retry-after"]) > 0
    _nothing_changed(harness)
    # And each is counted apart for Api5xx to leave out when the host's name servers fail
    # (hunt 294: one tenant retrying paged every period), never when the resolver fails for
    # every name (review 266: every tenant's webhook submits failed, and nothing paged)
    counted = emitted_metrics(capsys.readouterr().out, MetricName.WEBHOOK_HOST_UNAVAILABLE)
    expected = [[1.0], [1.0]] if failing == "the host's name servers" else []
    assert [record[MetricName.WEBHOOK_HOST_UNAVAILABLE] for record in counted] == expected


def test_a_webhook_host_whose_name_server_does_not_answer_in_time_is_a_503_and_writes_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a webhook host whose name server (the tenant's to choose) answers only after the
    # submit's lookup gave up: a public address, late (the bound is shortened for the test)
    answered = threading.Event()

    def late(host: str, *_: Any, **__: Any) -> Any:
        answered.wait(5)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", late)
    monkeypatch.setattr(harness.api_module, "SUBMIT_LOOKUP_SECONDS", 0.2)
    try:
        # When a job and a batch name a webhook on that host
        job, batch = _job_and_batch_hooked_at(harness, "slow-dns.example.com")
    finally:
        answered.set()
    # Then each is a 503 to retry (the request does not hold an api environment for as long as
    # the name server likes), and nothing is written
    for reply in (job, batch):
        assert (reply.status, reply.code) == (503, "webhook_host_unavailable"), reply.body
        assert int(reply.headers["retry-after"]) > 0
    _nothing_changed(harness)


def test_a_server_fault_on_a_request_without_a_body_is_a_500_not_the_clients(harness: Harness) -> None:
    # Given a job whose stored record this api cannot read (a status a newer version wrote)
    job_id = harness.submit().body["id"]
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET #st = :bad",
        ExpressionAttributeNames={"#st": "status"},
        ExpressionAttributeValues={":bad": {"S": "bogus"}},
    )
    # When a client reads or cancels it, Then it is the server's 500, not malformed JSON
    for method, path in (("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel")):
        reply = harness.api(method, path, tenant=ENTERPRISE)
        assert (reply.status, reply.code) == (500, "internal_error"), (method, reply.body)


def test_an_unexpected_validation_error_is_a_500_whose_log_quotes_none_of_the_request(
    harness: Harness,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a model check that fails where no client error was expected, quoting the prompt
    from llmq.models import ChatMessage

    def refuse(self: Any, tenant: Any, request: Any, key: Any) -> Any:
        return ChatMessage.model_validate({"role": "narrator", "content": request.prompt})

    monkeypatch.setattr(type(harness.api_module.intake()), "submit", refuse)
    capsys.readouterr()
    # When a client submits a job
    reply = harness.submit(prompt="SECRET-PLAN: merge with Initech")
    # Then it gets a 500 problem, and the log names the failure without the prompt
    assert (reply.status, reply.code) == (500, "internal_error")
    logged = [str(vars(record)) for record in caplog.records] + [capsys.readouterr().out]
    assert any("'error_class': 'ValidationError'" in entry for entry in logged)
    assert not [entry for entry in logged if "SECRET-PLAN" in entry]


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/batches"])
def test_an_unexpected_error_while_a_refused_body_is_replayed_logs_none_of_the_request(
    moto_stack: Any,
    provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    route: str,
) -> None:
    """Hunt 236: the error was raised while the schema's refusal (which quotes the refused
    values) was handled, and `logger.exception` wrote that chained refusal's text."""
    from tests.integration.conftest import integration_config

    # Given a submit accepted under a key (its answer lost), and a deploy since that lowers the
    # limit it passed
    secret = "SECRET-PLAN: merge with Initech " * 40
    body: dict[str, Any] = (
        {"prompt": secret}
        if route == "/v1/jobs"
        else {"requests": [{"custom_id": f"i{n}", "body": {"prompt": secret}} for n in range(3)]}
    )
    first = Harness(moto_stack, integration_config(provider), monkeypatch).api(
        "POST", route, body=body, headers={"Idempotency-Key": "k-1"}, tenant=ENTERPRISE
    )
    assert first.status == 202, first.body
    lowered = (
        {"limits": {"max_prompt_chars": 1000}} if route == "/v1/jobs" else {"batches": {"max_requests": 2}}
    )
    harness = Harness(moto_stack, integration_config(provider, **lowered), monkeypatch)
    capsys.readouterr()
    # When the retry's replay, past its first look (which found the key's job), meets an AWS
    # error no client causes
    events = aws.client("dynamodb").meta.events
    calls: list[str] = []

    def refuse_after_the_first(event_name: str, **_: Any) -> None:
        calls.append(event_name)
        if len(calls) > 1:
            error: Any = {
                "Error": {"Code": "AccessDeniedException"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(error, event_name.rsplit(".", 1)[-1])

    events.register("before-call.dynamodb", refuse_after_the_first, unique_id="test-api-refused-later")
    try:
        reply = harness.api("POST", route, body=body, headers={"Idempotency-Key": "k-1"}, tenant=ENTERPRISE)
    finally:
        events.unregister("before-call.dynamodb", unique_id="test-api-refused-later")
    # Then it is a 500, and the log names the failure and where, quoting none of the request
    assert len(calls) > 1 and (reply.status, reply.code) == (500, "internal_error"), reply.body
    logged = [str(vars(record)) for record in caplog.records] + [capsys.readouterr().out]
    assert any("AccessDeniedException" in entry and "RequestValidationError" in entry for entry in logged)
    assert not [entry for entry in logged if "SECRET-PLAN" in entry]


def test_metadata_that_leaves_no_room_in_the_item_is_refused_413_and_nothing_is_written(
    moto_stack: Any, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.conftest import integration_config

    # Given a deployment that allows 200 metadata keys
    config = integration_config(provider, limits={"max_metadata_keys": 200, "wait_poll_seconds": 0.05})
    harness = Harness(moto_stack, config, monkeypatch)
    # When a client sends 200 keys of 512 emoji each (2 KB each as DynamoDB counts them)
    metadata = {f"k{i:03d}".ljust(64, "x"): "\U0001f600" * 512 for i in range(200)}
    body = json.dumps({"prompt": "hello", "metadata": metadata}, ensure_ascii=False)
    reply = harness.api("POST", "/v1/jobs", raw_body=body, tenant=ENTERPRISE)
    # Then it is refused as too large, a client error, and nothing is written or sent
    assert (reply.status, reply.code) == (413, "payload_too_large")
    assert "metadata" in reply.body["detail"]
    assert harness.item_count() == 0
    assert aws.client("s3").list_objects_v2(Bucket=harness.stack.payload_bucket).get("KeyCount", 0) == 0
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0


def test_a_job_output_subscription_without_streaming_is_refused(harness: Harness) -> None:
    # When a client subscribes to job.output for a job that does not stream
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.output", "job.succeeded"]}
    reply = harness.submit(webhook=hook)
    # Then it is told at once, and nothing is written
    assert (reply.status, reply.code) == (422, "invalid_request")
    assert "stream" in reply.body["detail"]
    assert harness.item_count() == 0
    # And with stream: true it is accepted
    assert harness.submit(webhook=hook, stream=True).status == 202


# ---- a retry of an accepted submit is its replay, whatever changed since -------------------------


def _sent_as_an_array(api: Harness, path: str, body: list[Any], key: str) -> ApiReply:
    """`body`, a JSON array, POSTed under `key`."""
    return api.api(
        "POST", path, raw_body=json.dumps(body), headers={"Idempotency-Key": key}, tenant=ENTERPRISE
    )


def _redeployed(
    moto_stack: Any, server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> Harness:
    """The api as the operator's next deploy configures it, over the same table and queues."""
    from tests.integration.conftest import integration_config

    return Harness(moto_stack, integration_config(server, **overrides), monkeypatch)


@pytest.mark.parametrize("change", ["the model taken off the list", "the prompt limit lowered"])
def test_a_retry_the_next_deploy_would_refuse_is_the_replay_of_its_accepted_job(
    harness: Harness,
    moto_stack: Any,
    provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    # Given a job accepted under a key (its answer lost), then a deploy that would refuse it
    body = {"prompt": "x" * 3000, "model": "fake-large"}
    first = harness.submit(key="order-77", **body)
    assert first.status == 202, first.body
    if change == "the model taken off the list":
        models = {
            "default_model": "fake-model",
            "models": ["fake-model"],
            "timeout_seconds": 30,
            "stream": False,
        }
        api = _redeployed(
            moto_stack, provider, monkeypatch, provider={"base_url": provider.base_url, **models}
        )
    else:
        limits = {"max_prompt_chars": 1000, "max_body_bytes": 65536, "wait_poll_seconds": 0.05}
        api = _redeployed(moto_stack, provider, monkeypatch, limits=limits)
    # When the client retries with the same key and body, and with another body
    retry = api.submit(key="order-77", **body)
    other = api.submit(key="order-77", **{**body, "prompt": "y" * 3000})
    # Then the retry is the job's replay, not a refusal that invites a second, paid job; the
    # other body is refused as one, and nothing more is written or sent
    assert (retry.status, retry.body["id"], retry.headers["idempotent-replayed"]) == (
        202,
        first.body["id"],
        "true",
    )
    assert (other.status, other.code) == (422, "idempotency_key_reused")
    # and so is the same body sent as an array of it, which releases before hunt 310 took as
    # its first object (review 274: the schema's refusal of that object stood)
    as_array = _sent_as_an_array(api, "/v1/jobs", [body], "order-77")
    assert (as_array.status, as_array.body.get("id")) == (202, first.body["id"]), as_array.body
    assert harness.item_count() == 1
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 1
    # And a new key with the refused body is refused as before
    fresh = api.submit(key="order-78", **body)
    assert fresh.status in (413, 422) and fresh.code != "idempotency_key_reused"


def test_a_batch_retry_the_next_deploy_would_refuse_is_the_replay_of_its_accepted_batch(
    harness: Harness, moto_stack: Any, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"requests": [{"custom_id": "a", "body": {"prompt": "hi", "model": "fake-large"}}]}
    first = harness.api(
        "POST", "/v1/batches", body=body, headers={"Idempotency-Key": "b-77"}, tenant=ENTERPRISE
    )
    assert first.status == 202, first.body
    models = {"default_model": "fake-model", "models": ["fake-model"], "timeout_seconds": 30, "stream": False}
    api = _redeployed(moto_stack, provider, monkeypatch, provider={"base_url": provider.base_url, **models})
    retry = api.api("POST", "/v1/batches", body=body, headers={"Idempotency-Key": "b-77"}, tenant=ENTERPRISE)
    assert (retry.status, retry.body["id"]) == (202, first.body["id"]), retry.body


def test_a_batch_retry_after_max_requests_was_lowered_is_the_replay_of_its_accepted_batch(
    harness: Harness, moto_stack: Any, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch of three accepted under a key (its answer lost), then a deploy that takes
    # at most two items a batch
    body = {"requests": [{"custom_id": f"i{n}", "body": {"prompt": "hi"}} for n in range(3)]}
    first = harness.api(
        "POST", "/v1/batches", body=body, headers={"Idempotency-Key": "b-3"}, tenant=ENTERPRISE
    )
    assert first.status == 202, first.body
    api = _redeployed(moto_stack, provider, monkeypatch, batches={"max_requests": 2})
    # When the client retries with the same key and body
    retry = api.api("POST", "/v1/batches", body=body, headers={"Idempotency-Key": "b-3"}, tenant=ENTERPRISE)
    # Then it is the batch's replay, not a 422 inviting a second, paid batch, and so is the body
    # sent as an array of it (review 274)
    assert (retry.status, retry.body.get("id")) == (202, first.body["id"]), retry.body
    as_array = _sent_as_an_array(api, "/v1/batches", [body], "b-3")
    assert (as_array.status, as_array.body.get("id")) == (202, first.body["id"]), as_array.body
    # And the same body under a key that made nothing is refused for its size, as before
    fresh = api.api("POST", "/v1/batches", body=body, headers={"Idempotency-Key": "b-4"}, tenant=ENTERPRISE)
    assert fresh.status == 422 and fresh.code != "idempotency_key_reused", fresh.body
    # And a body of more items than the key's batch holds is no replay of it: refused as another
    # body under the key, its items beyond that count never read
    more = {"requests": [{"custom_id": f"i{n}", "body": {"prompt": "hi"}} for n in range(5)]}
    other = api.api("POST", "/v1/batches", body=more, headers={"Idempotency-Key": "b-3"}, tenant=ENTERPRISE)
    assert (other.status, other.code) == (422, "idempotency_key_reused"), other.body


def test_a_retry_of_a_job_an_earlier_release_accepted_past_todays_bounds_is_its_replay(
    harness: Harness,
) -> None:
    # Given a job an earlier release accepted under a key with a seed past int64 (it left the
    # seed unbounded), its answer lost: stored with its input and hashes as that release did
    from llmq.intake import request_digest, request_hash
    from llmq.models import StoredJobRequest

    body = {"prompt": "x", "params": {"seed": 2**64}}
    first = harness.submit(key="order-9", prompt="x", params={"seed": 1})
    assert first.status == 202, first.body
    as_accepted = StoredJobRequest.model_validate(body)
    key = {"pk": {"S": first.body["id"]}}
    item = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key=key)["Item"]
    stored = json.loads(item["input"]["S"])
    stored["params"]["seed"] = 2**64
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key=key,
        UpdateExpression="SET #input = :input, request_hash = :h, request_digest = :d",
        ExpressionAttributeNames={"#input": "input"},
        ExpressionAttributeValues={
            ":input": {"S": json.dumps(stored)},
            ":h": {"S": request_hash(as_accepted)},
            ":d": {"S": request_digest(as_accepted)},
        },
    )

    def submit(key: str) -> Any:
        raw = json.dumps(body)
        return harness.api(
            "POST", "/v1/jobs", raw_body=raw, headers={"Idempotency-Key": key}, tenant=ENTERPRISE
        )

    # When, after the deploy that bounded the seed, the client retries the same body and key
    retry = submit("order-9")
    # Then it is the job's replay, not a 422 telling the client its job was never accepted
    assert (retry.status, retry.body.get("id")) == (202, first.body["id"]), (retry.status, retry.body)
    assert harness.item_count() == 1
    # And the same body under a new key is refused, as today's bounds say
    fresh = submit("order-10")
    assert (fresh.status, fresh.code) == (422, "invalid_request"), fresh.body


def test_a_body_no_deployment_takes_under_a_key_is_refused_with_no_look_for_its_job(
    harness: Harness,
) -> None:
    # Given a body no deployment takes (an unknown field), under an Idempotency-Key, while
    # DynamoDB would refuse any read
    from tests.aws_faults import AwsFaults

    faults = AwsFaults()
    faults.arm("throttle", "dynamodb.GetItem", times=50)
    try:
        reply = harness.submit(key="k-bad", prompt="x", priority="high")
    finally:
        faults.disarm()
    # Then it is refused as it always was (422), with no read for a job under its key: not
    # answered 503, to be retried in vain
    assert not faults.fired
    assert (reply.status, reply.code) == (422, "invalid_request"), reply.body
    _nothing_changed(harness)


def test_a_seed_no_provider_takes_is_refused_at_submit_and_nothing_is_written(harness: Harness) -> None:
    reply = harness.api(
        "POST",
        "/v1/jobs",
        raw_body='{"prompt": "x", "params": {"seed": 1' + "0" * 60 + "}}",
        tenant=ENTERPRISE,
    )
    assert (reply.status, reply.code) == (422, "invalid_request"), reply.body
    _nothing_changed(harness)


def test_a_retry_the_next_deploy_would_refuse_is_answered_503_not_refused_while_its_look_is_throttled(
    harness: Harness, moto_stack: Any, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job accepted under a key, then a deploy that takes its model off the list
    from tests.aws_faults import AwsFaults

    first = harness.submit(key="order-79", model="fake-large")
    assert first.status == 202, first.body
    models = {"default_model": "fake-model", "models": ["fake-model"], "timeout_seconds": 30, "stream": False}
    api = _redeployed(moto_stack, provider, monkeypatch, provider={"base_url": provider.base_url, **models})
    # When the client retries while DynamoDB throttles the look for its job
    faults = AwsFaults()
    faults.arm("throttle", "dynamodb.GetItem", times=50)
    try:
        retry = api.submit(key="order-79", model="fake-large")
    finally:
        faults.disarm()
    # Then it is told to retry (503), not that its accepted job was refused
    assert faults.fired
    assert (retry.status, retry.code) == (503, "service_unavailable"), retry.body
    assert api.submit(key="order-79", model="fake-large").body["id"] == first.body["id"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_a_retry_of_an_accepted_submit_after_the_body_limit_was_lowered_is_its_replay(
    harness: Harness,
    moto_stack: MotoStack,
    provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """Hunt 231: the 413 came before the replay was looked for, and read as "not accepted"
    invites a second, paid submit under a new key."""
    from tests.integration.conftest import integration_config

    # Given a submit accepted under a key, its answer lost (a body of 24 KB: a Python client
    # writes each 'é' as 6 bytes)
    body: dict[str, Any] = {"prompt": "é" * 2000}
    if path == "/v1/batches":
        body = {"requests": [{"custom_id": "a", "body": body}]}
    raw = json.dumps(body)
    headers = {"Idempotency-Key": "big-1"}
    first = harness.api("POST", path, raw_body=raw, headers=headers, tenant=ENTERPRISE)
    assert first.status == 202, first.body
    # When the operator lowers the body limit below it, and the client retries
    limits = {"max_prompt_chars": 5000, "max_body_bytes": 4096, "wait_poll_seconds": 0.05}
    lowered = integration_config(provider, limits=limits, batches={"max_body_bytes": 4096})
    api = Harness(moto_stack, lowered, monkeypatch)
    retry = api.api("POST", path, raw_body=raw, headers=headers, tenant=ENTERPRISE)
    # Then it is the replay of what was accepted
    assert (retry.status, retry.headers.get("idempotent-replayed"), retry.body["id"]) == (
        202,
        "true",
        first.body["id"],
    )
    # And the same body under a new key is still refused by the lowered limit
    new = api.api("POST", path, raw_body=raw, headers={"Idempotency-Key": "big-2"}, tenant=ENTERPRISE)
    assert (new.status, new.code) == (413, "payload_too_large")


def test_a_throttled_look_for_an_oversized_retrys_key_is_a_503_with_retry_after(
    harness: Harness, moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 233: the answer before the route had no Retry-After, which README promises of a 503."""
    from tests.aws_faults import AwsFaults
    from tests.integration.conftest import integration_config

    raw = json.dumps({"prompt": "é" * 2000})
    headers = {"Idempotency-Key": "big-1"}
    assert harness.api("POST", "/v1/jobs", raw_body=raw, headers=headers, tenant=ENTERPRISE).status == 202
    limits = {"max_prompt_chars": 5000, "max_body_bytes": 4096, "wait_poll_seconds": 0.05}
    api = Harness(moto_stack, integration_config(provider, limits=limits), monkeypatch)
    faults = AwsFaults()
    faults.arm("throttle", "dynamodb.GetItem", times=50)
    try:
        retry = api.api("POST", "/v1/jobs", raw_body=raw, headers=headers, tenant=ENTERPRISE)
    finally:
        faults.disarm()
    assert faults.fired
    assert (retry.status, retry.code) == (503, "service_unavailable")
    assert int(retry.headers["retry-after"]) > 0
