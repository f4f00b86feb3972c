"""Batches (issue 15) through the real handlers against moto and a loopback provider: accept,
expansion into item jobs (crash-safe, exactly once per item), counts, results, cancel, the
batch's one webhook, and the tenant's cap over its items."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from standardwebhooks import Webhook

from llmq import aws
from llmq.batch_runs import stop
from llmq.batches import (
    BATCH_PREFIX,
    BatchRecord,
    BatchRepository,
    batch_key,
    batch_of,
    item_job_id,
    send_expand,
)
from llmq.jobs import JobRepository
from llmq.models import (
    BatchEvent,
    BatchRequestCounts,
    BatchStatus,
    DeliveryAttempt,
    DeliveryStatus,
    JobStatus,
)
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.shares import ShareRepository
from llmq.sqs_edge import RetryLater
from llmq.telemetry import MetricName
from llmq.tenants import TenantRepository
from llmq.webhooks import EARLY_TOLERANCE_SECONDS, copy_lag_seconds
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from llmq_sandbox.doubles.receiver import Answer, WebhookReceiver
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import (
    ENTERPRISE,
    FREE,
    ApiReply,
    Harness,
    LambdaContextStub,
    emitted_metrics,
    hidden_for_each_receive,
    load_handler,
    observing_sqs,
    on_aws_call,
    webhook_message,
)

HIGH = "high"


@pytest.fixture
def harness(moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Harness:
    # Chunks of two items, so a batch of five is three transactions and a crash can fall between;
    # webhook POSTs of at most 5 s, so a copy of a message waits 10 s for its carrier's.
    webhooks = {"allow_loopback_http": True, "schedule_seconds": [1, 2, 4], "timeout_seconds": 5}
    config = integration_config(provider, batches={"expand_chunk": 2}, webhooks=webhooks)
    return Harness(moto_stack, config, monkeypatch)


@pytest.fixture
def faults(harness: Harness) -> Iterator[AwsFaults]:
    injected = AwsFaults()
    injected.wrap_handler("worker", harness.worker())
    injected.wrap_handler("api", harness.api_module)
    yield injected
    injected.disarm()


def _requests(count: int, prefix: str = "item") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{index}", "body": {"prompt": f"say {index}"}} for index in range(count)]


def _submit(
    harness: Harness, tenant: dict[str, str] = ENTERPRISE, key: str | None = None, **body: Any
) -> ApiReply:
    headers = {"Idempotency-Key": key} if key else {}
    return harness.api("POST", "/v1/batches", body=body, headers=headers, tenant=tenant)


def _expanded(harness: Harness, count: int, **submit: Any) -> tuple[str, str]:
    """A batch of `count` items, submitted and expanded by a worker: (its id, its lane's URL)."""
    batch_id: str = _submit(harness, requests=_requests(count), **submit).body["id"]
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    return batch_id, url


def _get(harness: Harness, batch_id: str, tenant: dict[str, str] = ENTERPRISE) -> ApiReply:
    return harness.api("GET", f"/v1/batches/{batch_id}", tenant=tenant)


def _results(harness: Harness, batch_id: str, **query: str) -> tuple[list[dict[str, Any]], str | None]:
    reply = harness.api("GET", f"/v1/batches/{batch_id}/results", tenant=ENTERPRISE, query=query or None)
    assert reply.status == 200, reply.body
    text = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    return lines, reply.headers.get("llmq-next-cursor")


def _run_lane(harness: Harness, lane: str = HIGH, seconds: float = 30) -> int:
    """Run the lane's worker until its queue is empty (waiting out delays and visibility
    timeouts, as the event source mapping would): the number of worker invocations."""
    url = harness.stack.lane_queue_urls[lane]
    invocations = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        messages = harness.receive(url, visibility=1)
        if messages:
            harness.run_worker(url, messages)
            invocations += 1
            continue
        if _held(harness, url) == 0:
            return invocations
        harness.let_backoffs_pass()
        time.sleep(0.2)
    raise AssertionError(f"lane {lane} still holds messages after {seconds} s")


def _held(harness: Harness, url: str) -> int:
    """Messages waiting, in flight or delayed. One GetQueueAttributes is not one moment: moto
    reads each count at its own instant (as SQS's counts are approximate), so a message coming
    due in between is counted by none of them. It cannot come due twice, so a queue is empty
    only when two reads, one after the other, both find nothing."""
    names = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    held = 0
    for _ in range(2):
        attributes = harness.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        held = sum(int(attributes[name]) for name in names)
        if held:
            return held
        time.sleep(0.01)
    return held


def _item_jobs(harness: Harness) -> list[dict[str, Any]]:
    items = harness.ddb.scan(TableName=harness.stack.jobs_table)["Items"]
    return [item for item in items if batch_of(item["pk"]["S"])]


def _stored(harness: Harness, batch_id: str) -> BatchRecord:
    """The batch as stored, read without the API (whose GET may end a batch itself)."""
    found = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).find(
        batch_id
    )
    assert found is not None
    return found


def _reconciler_later(harness: Harness) -> Reconciler:
    """The reconciler, run past the stale-queued threshold (its clock a while ahead)."""
    later = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + harness.config.reconciler.stale_queued_seconds + 60,
    )
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    return Reconciler(later, queues, harness.config, batches=batches)


def _provider_calls(provider: FakeProviderServer) -> int:
    return len(provider.state.snapshot()["log"])


# ---- accept -------------------------------------------------------------------------------------


def test_a_batch_is_accepted_at_once_and_its_items_run_as_jobs_with_results_by_custom_id(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # When a tenant submits a batch of five
    reply = _submit(harness, requests=_requests(5), metadata={"run": "nightly"})
    # Then it is accepted at once: nothing written as a job yet, one expand message queued
    assert reply.status == 202, reply.body
    batch = reply.body
    assert batch["object"] == "batch"
    assert batch["status"] == "validating"
    assert batch["request_counts"] == {
        "total": 5,
        "queued": 5,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert reply.headers["location"].endswith(f"/v1/batches/{batch['id']}")
    assert _item_jobs(harness) == []
    # When the lane's workers run: the expansion, then the items
    _run_lane(harness)
    # Then each item ran once at the provider and the worker of the last one ended the batch
    assert _provider_calls(provider) == 5
    assert _stored(harness, batch["id"]).status is BatchStatus.COMPLETED
    done = _get(harness, batch["id"])
    assert done.status == 200
    assert done.body["status"] == "completed"
    assert done.body["request_counts"]["succeeded"] == 5
    assert done.body["request_counts"]["queued"] == 0
    assert done.body["finished_at"] is not None
    # And the results name every item by its custom_id, in order, with its output
    lines, cursor = _results(harness, batch["id"])
    assert cursor is None
    assert [line["custom_id"] for line in lines] == [f"item-{index}" for index in range(5)]
    assert all(line["status"] == "succeeded" and line["result"]["output"] for line in lines)
    assert [line["job_id"] for line in lines] == [item_job_id(batch["id"], index) for index in range(5)]
    # And each item is an ordinary job, readable as one, with its batch and custom_id
    job = harness.api("GET", f"/v1/jobs/{lines[2]['job_id']}", tenant=ENTERPRISE)
    assert job.status == 200
    assert (job.body["batch_id"], job.body["custom_id"], job.body["status"]) == (
        batch["id"],
        "item-2",
        "succeeded",
    )


def test_a_batchs_items_are_active_jobs_until_they_end_and_the_quota_refuses_a_batch_whole(
    harness: Harness,
) -> None:
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    shares.set_limits(FREE["tenant_id"], max_active_jobs=5)
    # A batch of three fits a quota of five: three active jobs
    first = _submit(harness, tenant=FREE, requests=_requests(3))
    assert first.status == 202
    assert shares.get(FREE["tenant_id"]).active == 3
    # (all three a batch's, which a refused job of the tenant's own does not wait behind)
    assert shares.get(FREE["tenant_id"]).batch_active == 3
    # Three more would pass it: refused whole, with Retry-After, and nothing written or queued
    refused = _submit(harness, tenant=FREE, requests=_requests(3, prefix="more"))
    assert (refused.status, refused.code) == (429, "quota_exceeded")
    assert int(refused.headers["retry-after"]) >= 1
    assert shares.get(FREE["tenant_id"]).active == 3
    assert harness.total_count(harness.stack.lane_queue_urls["low"]) == 1  # the first batch's expand
    # A batch larger than the whole quota could never be admitted: a 422, not a 429 to retry
    whole = _submit(harness, tenant=FREE, requests=_requests(6, prefix="whole"))
    assert (whole.status, whole.code) == (422, "batch_exceeds_quota")
    assert "retry-after" not in whole.headers
    assert shares.get(FREE["tenant_id"]).active == 3
    # When the first batch has run, its items are no longer active
    _run_lane(harness, lane="low")
    assert _stored(harness, first.body["id"]).status is BatchStatus.COMPLETED
    share = shares.get(FREE["tenant_id"])
    assert (share.active, share.batch_active, share.running) == (0, 0, 0)


@pytest.mark.parametrize(
    ("requests", "code", "where"),
    [
        (
            [*_requests(2), {"custom_id": "item-0", "body": {"prompt": "again"}}],
            "invalid_request",
            "requests[2].custom_id",
        ),
        (
            [*_requests(2), {"custom_id": "x", "body": {"prompt": "p", "params": {"max_tokens": 0}}}],
            "invalid_request",
            "max_tokens",
        ),
        ([{"custom_id": "bad id", "body": {"prompt": "p"}}], "invalid_request", "custom_id"),
        (
            [{"custom_id": "w", "body": {"prompt": "p", "webhook": {"url": "https://example.com/h"}}}],
            "invalid_request",
            "requests[0].body.webhook",
        ),
        (
            [*_requests(1), {"custom_id": "live", "body": {"prompt": "p", "stream": True}}],
            "invalid_request",
            "requests[1].body.stream",
        ),
        ([], "invalid_request", "requests"),
    ],
)
def test_a_bad_item_is_a_problem_naming_it_and_nothing_is_written_or_queued(
    harness: Harness, requests: list[dict[str, Any]], code: str, where: str
) -> None:
    reply = _submit(harness, requests=requests)
    assert (reply.status, reply.code) == (422, code)
    assert where in json.dumps(reply.body)
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 0


@pytest.mark.parametrize("deadline", [True, "3600"])
def test_a_batch_deadline_that_is_not_a_number_is_refused_and_nothing_is_written(
    harness: Harness, deadline: object
) -> None:
    """Lax validation would read `true` as a deadline of one second (found for jobs by the
    schema fuzzer)."""
    reply = _submit(harness, requests=_requests(2), deadline_seconds=deadline)
    assert (reply.status, reply.code) == (422, "invalid_request")
    assert "deadline_seconds" in json.dumps(reply.body)
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 0


def test_a_batch_asking_for_its_items_live_output_is_refused_and_nothing_is_written(harness: Harness) -> None:
    """A batch's items never stream, so job.output would never be sent: refused at once, as
    a job that does not stream is (hunt 218: it was accepted)."""
    reply = _submit(
        harness,
        requests=_requests(2),
        webhook={"url": "https://hooks.example.com/b", "item_events": ["job.succeeded", "job.output"]},
    )
    assert (reply.status, reply.code) == (422, "invalid_request")
    assert "job.output" in reply.body["detail"]
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 0


def test_metadata_too_large_for_the_batchs_record_is_a_413_and_nothing_is_written(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hunt 218: with max_metadata_keys raised, metadata a job's record refuses (413) made a
    batch's TransactWriteItems fail on the 400 KB item limit: a 500, its requests file already
    in S3. Now the same 413 as a job's, before anything is written."""
    # Given a deployment that takes 200 metadata keys, and metadata of 4-byte characters
    limits = {"max_prompt_chars": 5000, "max_body_bytes": 2_000_000, "max_metadata_keys": 200}
    harness = Harness(moto_stack, integration_config(provider, limits=limits), monkeypatch)
    emoji = "\U0001f642"
    metadata = {f"{index:03d}" + emoji * 61: emoji * 512 for index in range(200)}
    # When it is a job's, and a batch's
    job = harness.submit(metadata=metadata)
    batch = _submit(harness, requests=_requests(1), metadata=metadata)
    # Then both are refused alike, and nothing is written: no item, no message, no S3 object
    assert (job.status, job.code) == (413, "payload_too_large")
    assert (batch.status, batch.code) == (413, "payload_too_large"), batch.body
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 0
    assert aws.client("s3").list_objects_v2(Bucket=harness.stack.payload_bucket).get("KeyCount") == 0
    # And metadata a job's record takes, a batch's takes too (an inline batch keeps room for
    # one line error, its batch_crashed: its items were checked here; review 223)
    fits = dict(list(metadata.items())[:165])
    assert harness.submit(metadata=fits).status == 202
    assert _submit(harness, requests=_requests(1), metadata=fits).status == 202


def test_an_item_with_a_model_the_deployment_does_not_allow_is_refused_with_the_jobs_code(
    harness: Harness,
) -> None:
    # Past the schema (a deployment's models are a schema enum), the same refusal as for a job:
    # its code, and the item named
    reply = _submit(
        harness, requests=[*_requests(1), {"custom_id": "m", "body": {"prompt": "p", "model": "gpt-x"}}]
    )
    assert (reply.status, reply.code) == (422, "model_not_allowed")
    assert "requests[1]" in reply.body["detail"]
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 0


@pytest.mark.parametrize(
    "body",
    [{"prompt": "x" * 5_001}, {"messages": [{"role": "user", "content": "x" * 5_001}]}],
    ids=["prompt", "message"],
)
def test_an_item_whose_prompt_is_over_the_limit_is_refused_with_the_jobs_code(
    harness: Harness, body: dict[str, Any]
) -> None:
    reply = _submit(harness, requests=[*_requests(1), {"custom_id": "big", "body": body}])
    assert (reply.status, reply.code) == (413, "prompt_too_large")
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 0


def test_a_replay_whose_json_is_written_differently_is_the_same_batch(harness: Harness) -> None:
    # Given a batch submitted under a key
    webhook = {
        "url": "https://93.184.216.34/hooks",
        "events": ["batch.completed"],
        "item_events": ["job.failed", "job.succeeded"],
    }
    first = harness.api(
        "POST",
        "/v1/batches",
        raw_body=json.dumps(
            {
                "requests": [
                    {"custom_id": "a", "body": {"prompt": "x", "metadata": {"run": "n", "team": "t"}}}
                ],
                "metadata": {"run": "n", "team": "t"},
                "webhook": webhook,
            }
        ),
        headers={"Idempotency-Key": "nightly-1"},
        tenant=ENTERPRISE,
    )
    assert first.status == 202
    # When the client's retry writes the same request otherwise: keys in another order, the
    # prompt as its one message, the item events in another order and repeated
    again = harness.api(
        "POST",
        "/v1/batches",
        raw_body=json.dumps(
            {
                "webhook": {**webhook, "item_events": ["job.succeeded", "job.failed", "job.failed"]},
                "metadata": {"team": "t", "run": "n"},
                "requests": [
                    {
                        "body": {
                            "metadata": {"team": "t", "run": "n"},
                            "messages": [{"role": "user", "content": "x"}],
                        },
                        "custom_id": "a",
                    }
                ],
            }
        ),
        headers={"Idempotency-Key": "nightly-1"},
        tenant=ENTERPRISE,
    )
    # Then it is the same batch, replayed, as for a job
    assert (again.status, again.body["id"], again.headers.get("idempotent-replayed")) == (
        202,
        first.body["id"],
        "true",
    )


def test_a_replayed_key_returns_the_same_batch_and_writes_nothing_more(harness: Harness) -> None:
    first = _submit(harness, key="nightly-1", requests=_requests(3))
    again = _submit(harness, key="nightly-1", requests=_requests(3))
    assert (first.status, again.status) == (202, 202)
    assert again.body["id"] == first.body["id"]
    assert again.headers["idempotent-replayed"] == "true"
    _run_lane(harness)
    # Two expand messages (the replay's is harmless), one job per item.
    assert sorted(item["pk"]["S"] for item in _item_jobs(harness)) == sorted(
        item_job_id(first.body["id"], index) for index in range(3)
    )
    other = _submit(harness, key="nightly-1", requests=_requests(4))
    assert other.status == 422
    assert other.code == "idempotency_key_reused"


def test_a_retry_of_an_accepted_batch_is_its_replay_even_if_a_check_now_refuses_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch accepted under a key, with a webhook whose host resolves now
    resolves = [True]

    def resolver(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if resolves[0]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    webhook = {"url": "https://hooks.example.com/llmq"}
    first = _submit(harness, key="nightly-7", requests=_requests(3), webhook=webhook)
    assert first.status == 202, first.body
    # When its answer was lost and, by the client's retry, the webhook host stopped resolving
    resolves[0] = False
    retry = _submit(harness, key="nightly-7", requests=_requests(3), webhook=webhook)
    # Then the retry is the batch's replay, not a 422 inviting a second, paid batch
    assert (retry.status, retry.body["id"]) == (202, first.body["id"])
    assert retry.headers["idempotent-replayed"] == "true"
    # And the same key with another body is still refused as such, with nothing written
    other = _submit(harness, key="nightly-7", requests=_requests(4), webhook=webhook)
    assert (other.status, other.code) == (422, "idempotency_key_reused")
    # And a first submit the check refuses is refused as before
    fresh = _submit(harness, key="nightly-8", requests=_requests(3), webhook=webhook)
    assert (fresh.status, fresh.code) == (422, "invalid_webhook_url")
    assert [batch["id"] for batch in harness.api("GET", "/v1/batches", tenant=ENTERPRISE).body["data"]] == [
        first.body["id"]
    ]


def test_another_tenants_batch_is_not_found(harness: Harness) -> None:
    reply = _submit(harness, requests=_requests(1))
    for path in ("", "/results"):
        foreign = harness.api("GET", f"/v1/batches/{reply.body['id']}{path}", tenant=FREE)
        assert (foreign.status, foreign.code) == (404, "batch_not_found")
    canceled = harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=FREE)
    assert (canceled.status, canceled.code) == (404, "batch_not_found")


def test_the_batch_list_pages_newest_first_with_counts_and_shows_no_job_and_no_foreign_batch(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given three batches of the tenant (the first run to its end), a job of its own, and a
    # batch of another tenant
    ids = []
    for size in (2, 3, 1):
        ids.append(_submit(harness, requests=_requests(size)).body["id"])
        if len(ids) == 1:
            _run_lane(harness)
        time.sleep(0.002)
    job = harness.submit().body["id"]
    harness.submit()
    _submit(harness, tenant=FREE, requests=_requests(1))
    # When the tenant lists its batches two to a page
    first = harness.api("GET", "/v1/batches", tenant=ENTERPRISE, query={"limit": "2"})
    assert first.status == 200, first.body
    assert [batch["id"] for batch in first.body["data"]] == ids[:0:-1]
    second = harness.api(
        "GET", "/v1/batches", tenant=ENTERPRISE, query={"limit": "2", "cursor": first.body["next_cursor"]}
    )
    assert second.status == 200, second.body
    # Then it sees its own batches only, newest first, each with its counts
    assert [batch["id"] for batch in second.body["data"]] == ids[:1]
    assert second.body["next_cursor"] is None
    ended = second.body["data"][0]
    assert (ended["status"], ended["request_counts"]["succeeded"]) == ("completed", 2)
    assert first.body["data"][0]["request_counts"]["total"] == 1
    # And the job list shows jobs only, never a batch
    jobs = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"limit": "100"}).body["data"]
    assert job in {listed["id"] for listed in jobs}
    assert not any(listed["id"].startswith("bat_") for listed in jobs)
    # And a cursor of one list is refused by the other, and another tenant's is refused
    jobs_page = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"limit": "1"}).body
    for cursor, tenant in (
        (jobs_page["next_cursor"], ENTERPRISE),
        (first.body["next_cursor"], FREE),
    ):
        refused = harness.api("GET", "/v1/batches", tenant=tenant, query={"cursor": cursor})
        assert (refused.status, refused.code) == (400, "invalid_cursor"), refused.body
    refused = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE, query={"cursor": first.body["next_cursor"]})
    assert (refused.status, refused.code) == (400, "invalid_cursor"), refused.body


def test_a_batch_accept_applied_with_its_answer_lost_is_read_back_and_accepted(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a batch submitted without an Idempotency-Key, its accept applied with its answer lost
    faults.arm(FaultKind.APPLIED_LOST, "dynamodb.TransactWriteItems", function="api")
    reply = _submit(harness, requests=_requests(2))
    faults.disarm()
    assert faults.fired
    # Then the accept reads its own put back: a 202 with its expand message, so a client
    # never retries into a second batch it pays for twice
    assert reply.status == 202, reply.body
    listed = harness.api("GET", "/v1/batches", tenant=ENTERPRISE).body["data"]
    assert [batch["id"] for batch in listed] == [reply.body["id"]]
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 1


def test_a_redelivery_of_an_item_late_in_its_retention_never_keeps_it_past_its_batch(
    harness: Harness,
) -> None:
    # Given a batch with per-item webhooks that ran to its end, whose retention ends in a minute
    reply = _submit(
        harness,
        requests=_requests(1),
        webhook={"url": "http://127.0.0.1:9/b", "item_events": ["job.succeeded"]},
    )
    _run_lane(harness)
    item = item_job_id(reply.body["id"], 0)
    ends = int(time.time()) + 60
    _retention_ends_at(harness, reply.body["id"], ends)
    # When the client asks for the item's webhook again
    assert harness.api("POST", f"/v1/jobs/{item}/webhook/redeliver", tenant=ENTERPRISE).status == 202
    # Then the item is not kept past its batch: a new batch under the batch's reused key would
    # meet it as it writes its items, and never expand
    stored = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key={"pk": {"S": item}})["Item"]
    assert int(stored["expires_at"]["N"]) == ends


def test_a_batch_that_ends_after_its_retention_is_kept_as_its_items_are(harness: Harness) -> None:
    # Given an expanded batch whose retention ended a moment ago (its results came late), its
    # items ended
    batch_id, _ = _expanded(harness, 1)
    ended = int(time.time()) - 1
    _retention_ends_at(harness, batch_id, ended)
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    batch = batches.find(batch_id)
    assert batch is not None
    # When it ends
    done = batches.finish(batch, BatchRequestCounts(total=1, canceled=1))
    # Then it is kept for its event's retries, as an item ending then is: it outlives every item
    # its end kept, which a new batch under its reused key would otherwise meet as it writes its
    # items, and never expand
    assert done is not None and done.expires_at >= ended + harness.config.terminal_event_seconds


def test_an_old_batchs_late_end_never_lands_on_a_new_batch_under_its_reused_key(harness: Harness) -> None:
    # Given a batch read by a finisher while it was open, which another finisher then ended,
    # whose retention then passed, and a new batch the client submits under the same
    # Idempotency-Key (the key is free again: a batch not ended keeps it)
    old_id, _ = _expanded(harness, 1, key="weekly")
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    old = batches.find(old_id)
    assert old is not None
    assert batches.finish(old, BatchRequestCounts(total=1, succeeded=1)) is not None
    _retention_ends_at(harness, old_id, int(time.time()) - 1)
    new = _submit(harness, key="weekly", requests=_requests(3))
    assert (new.status, new.body["id"]) == (202, old_id) and "idempotent-replayed" not in new.headers
    # When the first finisher writes its end, late
    ended = batches.finish(old, BatchRequestCounts(total=1, succeeded=1))
    # Then it finds no batch of its own, and the new one keeps its status, total and retention
    assert ended is None
    stored = batches.find(old_id)
    assert stored is not None and (stored.status, stored.total) == (BatchStatus.VALIDATING, 3)
    assert stored.expires_at > int(time.time()) + harness.config.terminal_event_seconds


# ---- expansion under faults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "nth"),
    [
        # The first chunk's transaction throttled; the second chunk's applied but unanswered.
        (FaultKind.THROTTLE, 1),
        (FaultKind.APPLIED_LOST, 2),
        (FaultKind.APPLIED_RETRIED, 2),
        (FaultKind.SERVER_ERROR, 3),
    ],
)
def test_an_expansion_cut_by_an_aws_fault_resumes_and_writes_each_item_exactly_once(
    harness: Harness, provider: FakeProviderServer, faults: AwsFaults, kind: FaultKind, nth: int
) -> None:
    reply = _submit(harness, requests=_requests(5))
    faults.arm(kind, "dynamodb.TransactWriteItems", function="worker", nth=nth)
    _run_lane(harness)
    assert faults.fired, "the fault never fired"
    # One job per item, every item ran once, and the batch completed with exact counts.
    assert sorted(item["pk"]["S"] for item in _item_jobs(harness)) == sorted(
        item_job_id(reply.body["id"], index) for index in range(5)
    )
    assert sorted(call["job_id"] for call in provider.state.snapshot()["log"]) == sorted(
        item_job_id(reply.body["id"], index) for index in range(5)
    )
    assert _stored(harness, reply.body["id"]).status is BatchStatus.COMPLETED
    done = _get(harness, reply.body["id"]).body
    assert done["request_counts"]["succeeded"] == 5


def test_an_expansion_whose_sends_fail_after_its_write_queues_that_chunk_when_it_resumes(
    harness: Harness, provider: FakeProviderServer, faults: AwsFaults
) -> None:
    # The first chunk is written, then SQS refuses its messages (the worker's crash window)
    reply = _submit(harness, requests=_requests(5))
    faults.arm(FaultKind.SERVER_ERROR, "sqs.SendMessageBatch", function="worker", times=3)
    # (its retries wait out real visibility timeouts: about 17 s, longer on a loaded machine)
    _run_lane(harness, seconds=90)
    assert len(faults.fired) == 3
    # Then the resumed expansion queued it again: every item ran exactly once
    assert sorted(call["job_id"] for call in provider.state.snapshot()["log"]) == sorted(
        item_job_id(reply.body["id"], index) for index in range(5)
    )
    assert _get(harness, reply.body["id"]).body["status"] == "completed"


def test_a_chunk_whose_sends_failed_is_queued_whole_after_a_deploy_lowered_the_chunk(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch of eight in chunks of four, whose first chunk was written and whose sends
    # then failed (the worker's crash window between a chunk's write and its messages)
    before = Harness(moto_stack, integration_config(provider, batches={"expand_chunk": 4}), monkeypatch)
    batch_id = _submit(before, requests=_requests(8)).body["id"]
    faults = AwsFaults()
    faults.wrap_handler("worker", before.worker())
    faults.arm(FaultKind.SERVER_ERROR, "sqs.SendMessageBatch", function="worker", times=1)
    url = before.stack.lane_queue_urls[HIGH]
    try:
        before.run_worker(url, before.receive(url, visibility=1))
    finally:
        faults.disarm()
    assert len(faults.fired) == 1
    # When a deploy lowers expand_chunk to two before the expand message comes back
    after = Harness(moto_stack, integration_config(provider, batches={"expand_chunk": 2}), monkeypatch)
    _run_lane(after, seconds=90)
    # Then the resumed expansion queued the whole chunk its checkpoint says was not: every item
    # ran exactly once, and the batch ended
    assert sorted(call["job_id"] for call in provider.state.snapshot()["log"]) == sorted(
        item_job_id(batch_id, index) for index in range(8)
    )
    assert _get(after, batch_id).body["status"] == "completed"


def test_an_expansion_whose_last_chunks_sends_fail_queues_that_chunk_when_its_next_message_comes(
    harness: Harness, provider: FakeProviderServer, faults: AwsFaults
) -> None:
    # Given a batch of five in chunks of two, whose last chunk's SendMessageBatch fails after
    # the chunk was written (the expansion then over, by its checkpoint)
    batch_id = _submit(harness, requests=_requests(5)).body["id"]
    faults.arm(FaultKind.SERVER_ERROR, "sqs.SendMessageBatch", function="worker", nth=3)
    # When the lane runs, the expansion going on from a new message as it does after a fault
    _run_lane(harness, seconds=60)
    # Then that chunk's item was queued after all, and the batch ended with every item run once
    assert [fired.fault.operation for fired in faults.fired] == ["sqs.SendMessageBatch"]
    stored = _stored(harness, batch_id)
    assert (stored.status, stored.queued_to) == (BatchStatus.COMPLETED, 5)
    assert sorted(item["status"]["S"] for item in _item_jobs(harness)) == ["succeeded"] * 5
    assert _provider_calls(provider) == 5


def test_two_expansions_at_once_write_each_item_once(harness: Harness, provider: FakeProviderServer) -> None:
    # A duplicate expand message, delivered to two invocations at the same time
    reply = _submit(harness, requests=_requests(5))
    url = harness.stack.lane_queue_urls[HIGH]
    [message] = harness.receive(url, visibility=0)
    harness.sqs.send_message(QueueUrl=url, MessageBody=message["Body"])
    both = harness.receive(url)
    assert len(both) == 2
    harness.run_worker(url, both)
    _run_lane(harness)
    assert sorted(call["job_id"] for call in provider.state.snapshot()["log"]) == sorted(
        item_job_id(reply.body["id"], index) for index in range(5)
    )


# ---- cancel -------------------------------------------------------------------------------------


def _canceled_once_queued(harness: Harness, count: int) -> ApiReply:
    """A batch of `count` items, written and queued (none has run), then canceled by its client."""
    reply = _submit(harness, requests=_requests(count))
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))
    assert len(_item_jobs(harness)) == count
    canceled = harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=ENTERPRISE)
    assert (canceled.status, canceled.body["status"]) == (202, "canceling")
    return reply


def _job_of(message: dict[str, Any]) -> str:
    return str(json.loads(message["Body"])["job_id"])


def test_a_canceled_batch_runs_no_queued_item_and_ends_canceled_with_its_counts(
    harness: Harness, provider: FakeProviderServer
) -> None:
    reply = _canceled_once_queued(harness, 5)
    _run_lane(harness)
    # No item reached the provider; every one ended canceled; the batch is canceled
    assert _provider_calls(provider) == 0
    assert _stored(harness, reply.body["id"]).status is BatchStatus.CANCELED
    done = _get(harness, reply.body["id"]).body
    assert done["status"] == "canceled"
    assert done["request_counts"]["canceled"] == 5
    lines, _ = _results(harness, reply.body["id"])
    assert {line["status"] for line in lines} == {"canceled"}
    # And a cancel again (a retry of one whose answer was lost) is answered canceled, not 409
    again = harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=ENTERPRISE)
    assert (again.status, again.body["status"]) == (200, "canceled")


def test_a_canceled_batchs_queued_item_whose_messages_dead_letter_ends_canceled_not_crashed(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a batch whose items are written and queued, then canceled by its client
    reply = _canceled_once_queued(harness, 2)
    url = harness.stack.lane_queue_urls[HIGH]
    # When every message of its items exhausts its receives (a throttle kept each claim's end
    # from being written), and so does each the dead-letter function sends again
    letters = 0
    while items := [message for message in harness.receive(url, visibility=0) if batch_of(_job_of(message))]:
        harness.dead_letter(HIGH, items)
        letters += len(items)
    assert letters >= 2
    # Then each item ends canceled, as its batch asked, not failed as crashed; none ran
    statuses = {item["status"]["S"] for item in _item_jobs(harness)}
    assert statuses == {"canceled"}, statuses
    _run_lane(harness)
    assert _provider_calls(provider) == 0
    done = _get(harness, reply.body["id"]).body
    assert (done["status"], done["request_counts"]["canceled"], done["request_counts"]["failed"]) == (
        "canceled",
        2,
        0,
    )


@pytest.mark.parametrize("path", ["its claim", "its dead letter"])
def test_a_canceled_batchs_item_near_its_retention_ends_canceled_whichever_path_meets_it(
    harness: Harness, path: str
) -> None:
    # Given a canceled batch's queued item within the reconciler's margin of its retention
    _canceled_once_queued(harness, 1)
    for item in _item_jobs(harness):
        harness.ddb.update_item(
            TableName=harness.stack.jobs_table,
            Key={"pk": item["pk"]},
            UpdateExpression="SET expires_at = :at",
            ExpressionAttributeValues={":at": {"N": str(int(time.time()) + 600)}},
        )
    url = harness.stack.lane_queue_urls[HIGH]
    items = [message for message in harness.receive(url, visibility=0) if batch_of(_job_of(message))]
    assert items
    # When a worker claims it, or its messages exhaust their receives
    if path == "its claim":
        harness.run_worker(url, items)
    else:
        harness.dead_letter(HIGH, items)
    # Then it ends canceled either way, as its batch asked (review 258: expired, by its letter)
    assert {item["status"]["S"] for item in _item_jobs(harness)} == {"canceled"}


def test_a_cancel_or_a_submit_that_meets_a_claim_on_the_same_item_is_tried_again_not_answered_503(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a busy tenant: every claim of an item checks its batch in a transaction, and every
    # claim and end of the tenant's jobs writes its share item, so a write may meet one
    # (TransactionConflict, which botocore does not retry)
    faults.arm(FaultKind.TRANSACTION_CONFLICT, "dynamodb.TransactWriteItems", function="api")
    # When a batch's put meets one, it is tried again
    reply = _submit(harness, requests=_requests(3))
    assert reply.status == 202, reply.body
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))
    # And so is a cancel that meets one on the batch
    faults.arm(FaultKind.TRANSACTION_CONFLICT, "dynamodb.UpdateItem", function="api")
    canceled = harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=ENTERPRISE)
    assert (canceled.status, canceled.body["status"]) == (202, "canceling")
    assert [fired.fault.operation for fired in faults.fired] == [
        "dynamodb.TransactWriteItems",
        "dynamodb.UpdateItem",
    ]


def test_a_batch_cancel_whose_flag_answer_is_lost_is_accepted_not_503(
    harness: Harness, faults: AwsFaults, provider: FakeProviderServer
) -> None:
    # Given a batch whose items are queued, and a cancel whose flag DynamoDB applies while the
    # answer of every try is lost
    reply = _submit(harness, requests=_requests(3))
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))
    faults.arm(FaultKind.APPLIED_LOST, "dynamodb.UpdateItem", function="api")
    # When the client cancels
    canceled = harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    assert [fired.fault.kind for fired in faults.fired] == [FaultKind.APPLIED_LOST]
    # Then it is told the batch is canceling (a 503 invited a retry that could meet the batch
    # its own cancel ended, a 409), and the batch ends canceled with no item run
    assert (canceled.status, canceled.body["status"]) == (202, "canceling"), canceled.body
    _run_lane(harness)
    assert _provider_calls(provider) == 0
    assert _get(harness, reply.body["id"]).body["status"] == "canceled"


def test_a_batch_cancel_that_its_own_lost_answer_ended_before_the_retry_answers_canceled(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a batch not yet expanded, and a cancel whose flag is applied with its answer lost;
    # before botocore tries it again, the expansion's message stops the batch, which ends it
    reply = _submit(harness, requests=_requests(3))
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    queues = QueueRepository(harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=harness.sqs)
    sends = [0]

    def expansion_stops_it_before_the_retry(**_: Any) -> None:
        sends[0] += 1
        if sends[0] == 2:
            found = batches.find(reply.body["id"])
            assert found is not None and found.cancel_requested
            stop(batches, queues, harness.config, found)

    faults.arm(FaultKind.APPLIED_RETRIED, "dynamodb.UpdateItem", function="api")
    events = aws.client("dynamodb").meta.events
    events.register("before-send.dynamodb.UpdateItem", expansion_stops_it_before_the_retry)
    try:
        # When the client cancels
        canceled = harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=ENTERPRISE)
    finally:
        events.unregister("before-send.dynamodb.UpdateItem", expansion_stops_it_before_the_retry)
    assert _stored(harness, reply.body["id"]).status is BatchStatus.FINALIZING
    # Then it is told the batch is ending, as it asked, not that it could not be canceled
    assert (canceled.status, canceled.body["status"]) == (202, "finalizing"), canceled.body
    # And it ends canceled once its results file is written
    _run_lane(harness)
    assert _get(harness, reply.body["id"]).body["status"] == "canceled"


def test_a_cancel_of_a_batch_whose_lane_a_deploy_removed_is_taken_not_a_500(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a free tenant's batch accepted in lane "low", not yet expanded, and a deploy that
    # folds "low" into "high"
    before = Harness(moto_stack, integration_config(provider), monkeypatch)
    batch_id = _submit(before, tenant=FREE, requests=_requests(3)).body["id"]
    lanes = [{"name": "high", "tiers": ["enterprise", "free"], "max_concurrency": 8}]
    stack = dataclasses.replace(moto_stack, lane_queue_urls={"high": moto_stack.lane_queue_urls["high"]})
    after = Harness(stack, integration_config(provider, lanes=lanes, default_lane="high"), monkeypatch)
    # When the client cancels it
    reply = after.api("POST", f"/v1/batches/{batch_id}/cancel", tenant=FREE)
    # Then the cancel is taken (its expand message, which has no lane to go to, is left to the
    # reconciler), not a 500 for a cancel that was written
    assert (reply.status, reply.body["status"]) == (202, "canceling"), reply.body
    assert _stored(after, batch_id).cancel_requested


def test_a_batch_canceled_before_its_expansion_writes_no_item(
    harness: Harness, provider: FakeProviderServer
) -> None:
    reply = _submit(harness, requests=_requests(5))
    canceled = harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=ENTERPRISE)
    assert canceled.status in (200, 202)
    _run_lane(harness)
    assert _item_jobs(harness) == []
    assert _provider_calls(provider) == 0
    done = _get(harness, reply.body["id"]).body
    assert (done["status"], done["request_counts"]["canceled"]) == ("canceled", 5)
    # The results still name every item, each canceled
    lines, _ = _results(harness, reply.body["id"])
    assert [line["custom_id"] for line in lines] == [f"item-{index}" for index in range(5)]
    assert {line["status"] for line in lines} == {"canceled"}


# ---- results while it runs -----------------------------------------------------------------------


def test_partial_results_page_with_a_cursor_and_filter_by_status(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(
        moto_stack, integration_config(provider, batches={"expand_chunk": 2, "results_page": 2}), monkeypatch
    )
    reply = _submit(harness, requests=_requests(5))
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    # Two items run; three are still queued
    harness.run_worker(url, harness.receive(url, max_messages=2))
    pages, cursor = [], "0"
    while cursor is not None:
        lines, cursor = _results(harness, reply.body["id"], cursor=cursor)
        pages.append(lines)
    assert [len(page) for page in pages] == [2, 2, 1]
    every = [line for page in pages for line in page]
    assert [line["custom_id"] for line in every] == [f"item-{index}" for index in range(5)]
    assert sorted(line["status"] for line in every) == ["queued"] * 3 + ["succeeded"] * 2
    counts = _get(harness, reply.body["id"]).body["request_counts"]
    assert (counts["succeeded"], counts["queued"]) == (2, 3)


# ---- the batch's webhook -------------------------------------------------------------------------


def _dispatch_all(harness: Harness, dispatcher: Any) -> int:
    """Run the webhook dispatcher over what its queue holds now: the messages it handled."""
    url = harness.stack.webhook_queue_url
    handled = 0
    while messages := harness.receive(url, visibility=60):
        event = harness.sqs_event(url, messages)
        response = dispatcher.handler(event, LambdaContextStub())
        failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        for message in messages:
            if message["MessageId"] not in failed:
                harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        handled += len(messages)
    return handled


def test_the_batch_webhook_fires_once_signed_when_every_item_has_ended(
    harness: Harness, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a tenant with a webhook secret, and a receiver on loopback
    tenant = TenantRepository(harness.stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise", tenant_id=ENTERPRISE["tenant_id"]
    )
    monkeypatch.setenv("LLMQ_PUBLIC_API_URL", "https://api.llmq.test")
    dispatcher = load_handler("webhook_dispatcher")
    hook = f"http://127.0.0.1:{receiver.port}/batch"
    # When a batch with a webhook runs to its end, with a per-item event asked for too
    reply = _submit(harness, requests=_requests(3), webhook={"url": hook, "item_events": ["job.succeeded"]})
    assert reply.status == 202, reply.body
    _run_lane(harness)
    _dispatch_all(harness, dispatcher)
    # Then the batch's event came once, signed as every delivery is, with the final counts
    received = [json.loads(request.body) for request in receiver.requests_to("/batch")]
    batch_events = [body for body in received if body["type"].startswith("batch.")]
    assert [body["type"] for body in batch_events] == ["batch.completed"]
    [request] = [r for r in receiver.requests_to("/batch") if b"batch.completed" in r.body]
    verified = Webhook(tenant.tenant.webhook_secrets[0]).verify(request.body, dict(request.headers))
    assert verified["data"]["id"] == reply.body["id"]
    assert verified["data"]["request_counts"]["succeeded"] == 3
    # And each item's job.succeeded, which the batch asked for
    assert sorted(body["data"]["custom_id"] for body in received if body["type"] == "job.succeeded") == [
        "item-0",
        "item-1",
        "item-2",
    ]
    assert _get(harness, reply.body["id"]).body["webhook"]["delivery"]["status"] == "delivered"
    # A duplicate of the batch's message posts nothing more
    harness.sqs.send_message(
        QueueUrl=harness.stack.webhook_queue_url,
        MessageBody=json.dumps({"job_id": reply.body["id"], "event": "batch.completed"}),
    )
    _dispatch_all(harness, dispatcher)
    assert sum(b"batch.completed" in r.body for r in receiver.requests_to("/batch")) == 1


def test_a_batch_without_item_events_sends_no_job_webhooks(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    reply = _submit(harness, requests=_requests(2), webhook={"url": f"http://127.0.0.1:{receiver.port}/b"})
    _run_lane(harness)
    assert reply.status == 202
    # Only the batch's own event is queued
    messages = harness.receive(harness.stack.webhook_queue_url)
    assert [json.loads(message["Body"])["event"] for message in messages] == ["batch.completed"]


# ---- the tenant's cap ----------------------------------------------------------------------------


def test_a_batchs_items_count_against_the_tenants_cap(harness: Harness, provider: FakeProviderServer) -> None:
    ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).set_limits(
        ENTERPRISE["tenant_id"], max_concurrency=2
    )
    _submit(harness, requests=_requests(5))
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    # Five items in one invocation with a cap of two: two run, three are deferred
    harness.run_worker(url, harness.receive(url))
    assert _provider_calls(provider) == 2


def _capped(harness: Harness, cap: int) -> ShareRepository:
    """The enterprise tenant capped at `cap`, with the configured reserve for its own jobs."""
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    shares.set_limits(
        ENTERPRISE["tenant_id"], max_concurrency=cap, reserve=harness.config.batches.interactive_reserve
    )
    return shares


@pytest.mark.parametrize("override", ["set_limits", "before_batch_caps"])
def test_a_batch_leaves_the_reserved_part_of_the_cap_to_the_tenants_own_jobs(
    harness: Harness, provider: FakeProviderServer, override: str
) -> None:
    # Given a tenant capped at four, of which a quarter is kept for its jobs outside batches,
    # (or capped by a version without batch caps: no batch cap written with it, which the
    # first refused item writes), and a batch of six slow items already expanded in its lane
    _capped(harness, 4)
    if override == "before_batch_caps":
        harness.ddb.update_item(
            TableName=harness.stack.jobs_table,
            Key={"pk": {"S": f"share#{ENTERPRISE['tenant_id']}"}},
            UpdateExpression="REMOVE max_batch_concurrency",
        )
    batch_id = _submit(
        harness,
        requests=[{"custom_id": f"c{n}", "body": {"prompt": f"item {n} [[latency:0.5]]"}} for n in range(6)],
    ).body["id"]
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    # When the tenant then submits one job of its own, and one invocation gets all seven
    job_id = harness.submit(prompt="interactive [[latency:0.5]]").body["id"]
    messages = harness.receive(url)
    assert len(messages) == 7
    harness.run_worker(url, messages)
    # Then whatever the order of the claims, the batch took three slots and the job the fourth
    assert provider.state.max_in_flight == 4
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "succeeded"
    counts = _get(harness, batch_id).body["request_counts"]
    assert (counts["succeeded"], counts["queued"]) == (3, 3)
    # And the slots are all free again: the items gave back both of theirs
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    assert (share.running, share.batch_holders.get(HIGH)) == (0, {})


def test_a_batch_takes_the_whole_cap_when_no_reserve_is_configured(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the reserve turned off
    config = integration_config(provider, batches={"interactive_reserve": 0})
    harness = Harness(moto_stack, config, monkeypatch)
    _capped(harness, 4)
    _submit(
        harness,
        requests=[{"custom_id": f"c{n}", "body": {"prompt": f"item {n} [[latency:0.5]]"}} for n in range(6)],
    )
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    # When one invocation gets the six items
    harness.run_worker(url, harness.receive(url))
    # Then four run at once: the batch has the tenant's whole cap
    assert provider.state.max_in_flight == 4


def test_a_crashed_batch_items_slots_come_back_when_the_reconciler_recovers_it(harness: Harness) -> None:
    # Given a tenant capped at two (one for batch items), whose batch item's worker died
    # holding the batch's one slot
    shares = _capped(harness, 2)
    batch_id = _submit(harness, requests=_requests(2)).body["id"]
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    tenant = (ENTERPRISE["tenant_id"], HIGH)
    crashed, waiting = item_job_id(batch_id, 0), item_job_id(batch_id, 1)
    assert jobs.claim(crashed, "dead-worker", 1, tenant).claimed
    refused = jobs.claim(waiting, "w2", 60, tenant)
    assert not refused.claimed and refused.share is not None
    # When the reconciler recovers the item after its lease lapsed
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    later = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + 2,
    )
    assert Reconciler(later, queues, harness.config).run().recovered == [crashed]
    # Then its slot and its batch slot are free, and the other item can be claimed
    share = shares.get(ENTERPRISE["tenant_id"])
    assert (share.running, share.batch_holders[HIGH]) == (0, {})
    assert jobs.claim(waiting, "w2", 60, tenant).claimed


def test_a_recovered_batch_item_is_counted_once_against_its_lanes_messages(harness: Harness) -> None:
    # Given a 4-item batch, expanded, whose item 0 a worker took (its message with it) and died
    batch_id = _submit(harness, requests=_requests(4)).body["id"]
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    crashed = item_job_id(batch_id, 0)
    for message in harness.receive(url):
        if json.loads(message["Body"])["job_id"] == crashed:
            harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(crashed, "dead-worker", 1, (ENTERPRISE["tenant_id"], HIGH)).claimed
    # And the reconciler put it back in the queue, with a message of its own
    assert _reconciler_later(harness).run().recovered == [crashed]
    # When a job of the tenant waits too, and the reconciler looks at the lane's messages
    # (the batch's own expand message, which that run also sent, already done with)
    for message in harness.receive(url):
        if json.loads(message["Body"]).get("kind") == "expand":
            harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    waiting = harness.submit(prompt="waiting its turn").body["id"]
    assert harness.total_count(url) == 5  # the four items' and the job's
    report = _reconciler_later(harness).run()
    # Then every unfinished job has its message: none is sent again
    assert (report.waiting, report.requeued) == ([waiting], [])
    assert harness.total_count(url) == 5


def test_a_share_written_before_batch_slots_existed_gets_them_at_its_items_first_claim(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a batch accepted by a version without batch slots: its tenant's share has no map of them
    batch_id, _ = _expanded(harness, 2)
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": f"share#{ENTERPRISE['tenant_id']}"}},
        UpdateExpression="REMOVE runb_high, capb_high",
    )
    # When its items run
    _run_lane(harness)
    # Then both ran once, the map was added on the way, and every slot is free again
    assert _provider_calls(provider) == 2
    assert _get(harness, batch_id).body["request_counts"]["succeeded"] == 2
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    assert (share.running, share.batch_holders.get(HIGH)) == (0, {})


def test_batch_slots_left_held_by_a_version_without_them_are_given_back_at_the_next_refusal(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a tenant capped at four (three for batch items) whose batch slots are all held by
    # items that ended under a version that knew no batch slots (a rollback): their slots
    # were given back, their batch slots not
    shares = _capped(harness, 4)
    batch_id = _submit(harness, requests=_requests(2)).body["id"]
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    stale = {f"#s{n}": item_job_id("bat_" + "0" * 26, n) for n in range(3)}
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": f"share#{ENTERPRISE['tenant_id']}"}},
        UpdateExpression="SET " + ", ".join(f"runb_high.{name} = :t" for name in stale),
        ExpressionAttributeNames=stale,
        ExpressionAttributeValues={":t": {"N": "1"}},
    )
    # When the batch's items are tried
    _run_lane(harness)
    # Then the stale slots were given back at the first refusal, and both items ran once
    assert _provider_calls(provider) == 2
    assert _get(harness, batch_id).body["request_counts"]["succeeded"] == 2
    assert shares.get(ENTERPRISE["tenant_id"]).batch_holders[HIGH] == {}


# ---- items past their deadline, items canceled alone, a lost webhook -------------------------------


def test_items_past_the_batch_deadline_expire_at_their_claim_and_the_batch_ends_expired(
    harness: Harness, provider: FakeProviderServer
) -> None:
    reply = _submit(harness, requests=_requests(2), deadline_seconds=1)
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    time.sleep(1.2)
    _run_lane(harness)
    assert _provider_calls(provider) == 0
    assert _stored(harness, reply.body["id"]).status is BatchStatus.EXPIRED
    done = _get(harness, reply.body["id"]).body
    assert (done["status"], done["request_counts"]["expired"]) == ("expired", 2)


def test_the_last_item_canceled_through_the_jobs_api_ends_its_batch(harness: Harness) -> None:
    reply = _submit(harness, requests=_requests(2))
    batch_id = reply.body["id"]
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    messages = harness.receive(url)
    harness.run_worker(url, [m for m in messages if item_job_id(batch_id, 0) in m["Body"]])
    for message in messages:
        if item_job_id(batch_id, 1) in message["Body"]:
            harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    # The client cancels the last queued item as a job
    canceled = harness.api("POST", f"/v1/jobs/{item_job_id(batch_id, 1)}/cancel", tenant=ENTERPRISE)
    assert canceled.status == 200
    _run_lane(harness)
    stored = _stored(harness, batch_id)
    assert stored.status is BatchStatus.COMPLETED
    assert stored.final_counts is not None
    assert (stored.final_counts.succeeded, stored.final_counts.canceled) == (1, 1)


def test_a_batch_webhook_sqs_refused_is_sent_when_the_items_message_comes_back(
    harness: Harness, receiver: WebhookReceiver, faults: AwsFaults, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llmq.batch_runs.WEBHOOK_SEND_GRACE_SECONDS", 2)
    reply = _submit(harness, requests=_requests(2), webhook={"url": f"http://127.0.0.1:{receiver.port}/b"})
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    # The batch's webhook message is refused by SQS when the last item ends
    faults.arm(FaultKind.SERVER_ERROR, "sqs.SendMessage", function="worker", times=1)
    _run_lane(harness)
    assert len(faults.fired) == 1
    stored = _stored(harness, reply.body["id"])
    assert (stored.status, stored.webhook_sent) == (BatchStatus.COMPLETED, True)
    # Exactly one webhook message, sent when the item's message came back
    events = [json.loads(m["Body"]) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert events == [{"job_id": reply.body["id"], "event": "batch.completed"}]


def test_count_shards_expire_with_their_batch(harness: Harness) -> None:
    reply = _submit(harness, requests=_requests(2))
    _run_lane(harness)
    items = harness.ddb.scan(TableName=harness.stack.jobs_table)["Items"]
    shards = [item for item in items if item["pk"]["S"].startswith(f"batch#{reply.body['id']}#")]
    stored = _stored(harness, reply.body["id"])
    assert shards
    assert {int(shard["expires_at"]["N"]) for shard in shards} == {stored.expires_at}


def test_a_batch_whose_expand_message_sqs_refused_is_expanded_by_the_reconciler(
    harness: Harness, provider: FakeProviderServer, faults: AwsFaults
) -> None:
    # Given SQS refuses the batch's expand message at submit: the client still gets its 202
    faults.arm(FaultKind.SERVER_ERROR, "sqs.SendMessage", function="api", times=1)
    reply = _submit(harness, requests=_requests(3))
    assert len(faults.fired) == 1
    assert reply.status == 202
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 0
    # When the reconciler runs past the stale threshold, it sends the expand message again
    reconciler = _reconciler_later(harness)
    report = reconciler.run()
    assert report.batches == [reply.body["id"]]
    # Then the batch runs to its end, each item once, and its items are no longer active
    _run_lane(harness)
    assert _stored(harness, reply.body["id"]).status is BatchStatus.COMPLETED
    assert _provider_calls(provider) == 3
    assert (
        ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
        .get(ENTERPRISE["tenant_id"])
        .active
        == 0
    )
    # And an ended batch whose webhook is settled is out of the reconciler's index
    assert reconciler.run().batches == []


def test_a_canceled_batchs_webhook_sqs_refused_is_sent_by_the_next_look(
    harness: Harness, receiver: WebhookReceiver, faults: AwsFaults, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llmq.batch_runs.WEBHOOK_SEND_GRACE_SECONDS", 2)
    reply = _submit(harness, requests=_requests(3), webhook={"url": f"http://127.0.0.1:{receiver.port}/b"})
    assert harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=ENTERPRISE).status in (
        200,
        202,
    )
    # The worker that ends the canceled batch has its webhook message refused once
    faults.arm(FaultKind.SERVER_ERROR, "sqs.SendMessage", function="worker", times=1)
    _run_lane(harness)
    assert len(faults.fired) == 1
    stored = _stored(harness, reply.body["id"])
    assert (stored.status, stored.webhook_sent) == (BatchStatus.CANCELED, True)
    events = [json.loads(m["Body"]) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert events == [{"job_id": reply.body["id"], "event": "batch.canceled"}]


def test_queued_items_messages_do_not_hide_an_ordinary_jobs_lost_message(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a batch's five items queued in the lane, each with its message
    _submit(harness, requests=_requests(5))
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    # And an ordinary job accepted while SQS refused its message
    faults.arm(FaultKind.SERVER_ERROR, "sqs.SendMessage", function="api", times=1)
    job = harness.submit(key="lost-message")
    assert (job.status, len(faults.fired)) == (202, 1)
    # When the reconciler runs past the stale threshold
    reconciler = _reconciler_later(harness)
    report = reconciler.run()
    # Then the job's message is sent again: the items' messages are not taken for it
    assert report.requeued == [job.body["id"]]


def test_an_items_size_limit_counts_utf8_bytes_not_characters(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(moto_stack, integration_config(provider, batches={"max_item_bytes": 1024}), monkeypatch)
    # 400 characters: under the limit in ASCII, over it as 3-byte euro signs (1,200 bytes)
    accepted = _submit(harness, requests=[{"custom_id": "ascii", "body": {"prompt": "e" * 400}}])
    refused = _submit(harness, requests=[*_requests(1), {"custom_id": "euro", "body": {"prompt": "€" * 400}}])
    assert accepted.status == 202
    assert (refused.status, refused.code) == (413, "payload_too_large")
    assert "requests[1]" in refused.body["detail"]
    # The refused batch wrote and queued nothing
    assert len([item for item in _item_jobs(harness)]) == 0
    assert _held(harness, harness.stack.lane_queue_urls[HIGH]) == 1  # the accepted batch's expand


def test_a_batch_webhooks_attempts_are_logged_and_a_redelivery_sends_it_again_under_its_id(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    # Given a tenant with a webhook secret, and a receiver that fails the first attempt
    TenantRepository(harness.stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise", tenant_id=ENTERPRISE["tenant_id"]
    )
    dispatcher = load_handler("webhook_dispatcher")
    path = "/batch-log/fail-1"
    batch_id = _submit(
        harness, requests=_requests(2), webhook={"url": f"http://127.0.0.1:{receiver.port}{path}"}
    ).body["id"]
    # A batch still running has nothing to redeliver
    early = harness.api("POST", f"/v1/batches/{batch_id}/webhook/redeliver", tenant=ENTERPRISE)
    assert (early.status, early.code) == (409, "batch_not_ended")
    # When it ends and its event is delivered (500, then 200 on the retry)
    _run_lane(harness)
    deadline = time.monotonic() + 30
    while _stored(harness, batch_id).delivery_status is not DeliveryStatus.DELIVERED:
        assert time.monotonic() < deadline, "the batch's webhook was never delivered"
        _dispatch_all(harness, dispatcher)
        time.sleep(0.3)
    # Then its delivery log shows both attempts, as a job's does
    log = harness.api("GET", f"/v1/batches/{batch_id}/webhook", tenant=ENTERPRISE)
    assert log.status == 200, log.body
    (delivery,) = log.body["deliveries"]
    assert (delivery["event"], delivery["status"]) == ("batch.completed", "delivered")
    assert [attempt["status_code"] for attempt in delivery["attempts"]] == [500, 200]
    # And a redelivery sends it once more, a new round under the same webhook-id
    again = harness.api("POST", f"/v1/batches/{batch_id}/webhook/redeliver", tenant=ENTERPRISE)
    assert again.status == 202, again.body
    assert again.body["webhook"]["delivery"]["status"] == "pending"
    _dispatch_all(harness, dispatcher)
    requests = receiver.requests_to(path)
    assert len(requests) == 3
    assert len({request.headers["webhook-id"] for request in requests}) == 1
    attempts = harness.api("GET", f"/v1/batches/{batch_id}/webhook", tenant=ENTERPRISE).body["deliveries"][0]
    assert [(attempt["attempt"], attempt["status_code"]) for attempt in attempts["attempts"]] == [
        (1, 500),
        (2, 200),
        (1, 200),
    ]
    # A batch without a webhook has no log, and another tenant's batch is not found
    plain = _submit(harness, requests=_requests(1)).body["id"]
    assert harness.api("GET", f"/v1/batches/{plain}/webhook", tenant=ENTERPRISE).code == "webhook_not_found"
    assert harness.api("GET", f"/v1/batches/{batch_id}/webhook", tenant=FREE).code == "batch_not_found"


def _ended_batch_with_a_webhook(harness: Harness, receiver: WebhookReceiver, path: str) -> tuple[Any, str]:
    """(the dispatcher, a batch of one item, run to its end) for a tenant with a webhook secret,
    whose event goes to `path` on the receiver."""
    TenantRepository(harness.stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise", tenant_id=ENTERPRISE["tenant_id"]
    )
    dispatcher = load_handler("webhook_dispatcher")
    batch_id = _submit(
        harness, requests=_requests(1), webhook={"url": f"http://127.0.0.1:{receiver.port}{path}"}
    ).body["id"]
    _run_lane(harness)
    return dispatcher, batch_id


def test_a_batch_webhooks_attempt_whose_record_was_applied_unanswered_is_still_retried_on_schedule(
    harness: Harness, receiver: WebhookReceiver, faults: AwsFaults
) -> None:
    # Given a batch whose receiver fails the first attempt, and the write that records that
    # attempt applied by DynamoDB with its answer lost, which botocore sends again
    kind = FaultKind.APPLIED_RETRIED
    path = f"/batch-unanswered-{kind.value}/fail-1"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    faults.wrap_handler("webhook_dispatcher", dispatcher)
    faults.arm(kind, "dynamodb.UpdateItem", function="webhook_dispatcher")
    # When the dispatcher runs (the schedule's first retry is due 1 s after the first attempt)
    # (it comes back when the next attempt is due, and the copy lag after it)
    deadline = time.monotonic() + harness.config.webhooks.schedule_seconds[0] + copy_lag_seconds(5) + 10
    while _stored(harness, batch_id).delivery_status is not DeliveryStatus.DELIVERED:
        assert time.monotonic() < deadline, "the retry due after 1 s never came"
        _dispatch_all(harness, dispatcher)
        time.sleep(0.3)
    # Then the fault fired on the attempt's record, and the event came twice, 500 then 200,
    # counted once each (a write that recognised its own earlier success counts nothing twice)
    assert [fired.fault.operation for fired in faults.fired] == ["dynamodb.UpdateItem"]
    assert [delivery.status for delivery in receiver.deliveries() if delivery.path == path] == [500, 200]
    assert _stored(harness, batch_id).delivery_attempts == 2


def _batch_expires_in(harness: Harness, batch_id: str, seconds: int) -> None:
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key=batch_key(batch_id),
        UpdateExpression="SET expires_at = :at",
        ExpressionAttributeValues={":at": {"N": str(int(time.time()) + seconds)}},
    )


def test_two_copies_of_a_batch_event_in_one_invocation_post_once(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    # Given an ended batch whose event's message was sent twice (the reconciler's copy beside
    # the original), both received in one batch of records
    path = "/batch-two-copies"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    ).enqueue_webhook(batch_id, BatchEvent.COMPLETED)
    url = harness.stack.webhook_queue_url
    messages = harness.receive(url, visibility=60)
    assert len(messages) == 2
    # When the dispatcher takes them together
    response = dispatcher.handler(harness.sqs_event(url, messages), LambdaContextStub())
    # Then the receiver got the event once, and both messages are settled
    assert response["batchItemFailures"] == []
    assert [delivery.status for delivery in receiver.deliveries() if delivery.path == path] == [200]
    assert _stored(harness, batch_id).delivery_attempts == 1


def test_a_batch_past_its_retention_sends_no_webhook(harness: Harness, receiver: WebhookReceiver) -> None:
    # Given an ended batch whose retention ran out before its event went (DynamoDB's TTL has
    # not deleted it yet: GET answers 404 already)
    path = "/batch-expired"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    _batch_expires_in(harness, batch_id, -10)
    assert harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).status == 404
    # When the dispatcher takes its message
    _dispatch_all(harness, dispatcher)
    # Then nothing is posted of a batch the API says does not exist
    assert [delivery for delivery in receiver.deliveries() if delivery.path == path] == []


@pytest.mark.parametrize(
    "case", ["within-its-retention", "near-the-longest-keep", "ended-after-its-retention"]
)
def test_a_long_retry_after_near_the_end_of_a_batchs_retention_keeps_the_batch_for_that_attempt(
    harness: Harness, receiver: WebhookReceiver, case: str
) -> None:
    # Given an ended batch whose retention ends in a minute, and a receiver that asks for 2 h;
    # or one already kept past its retention by earlier rounds, within an hour of the longest
    # any batch is kept; or one that ended (its results file late) after its retention
    path = f"/batch-later-{case}"
    receiver.script(path, Answer(429, {"Retry-After": "7200"}))
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    _batch_expires_in(harness, batch_id, 60)
    config = harness.config
    now = int(time.time())
    created_ms = (now + 3600 - config.retention_seconds - config.delivery_keep_seconds) * 1000
    ended_s = now + 60 - config.terminal_event_seconds
    changes = {
        "within-its-retention": {},
        "near-the-longest-keep": {":created": created_ms, ":ended": created_ms + 60_000},
        "ended-after-its-retention": {":created": created_ms, ":ended": ended_s * 1000},
    }[case]
    if changes:
        assert ended_s > created_ms // 1000 + config.retention_seconds
        sets = ["created_ms = :created", "finished_ms = :ended"]
        aws.client("dynamodb").update_item(
            TableName=harness.stack.jobs_table,
            Key=batch_key(batch_id),
            UpdateExpression="SET " + ", ".join(sets),
            ExpressionAttributeValues={name: {"N": str(value)} for name, value in changes.items()},
        )
    # When the first attempt is answered so
    _dispatch_all(harness, dispatcher)
    assert [delivery.status for delivery in receiver.deliveries() if delivery.path == path] == [429]
    # Then the batch is kept until that attempt can still find it; but never past its
    # retention (or its late end: review 264) and the longest round (hunt 281: each round's
    # Retry-After kept it again, past its S3 objects' lifetime)
    batch = _stored(harness, batch_id)
    assert batch.delivery_status is DeliveryStatus.PENDING
    if case == "near-the-longest-keep":
        assert batch.expires_at == config.kept_until_s(created_ms) == now + 3600
    else:
        assert batch.expires_at >= time.time() + 7200


def test_a_copy_of_a_batch_webhook_message_that_lost_the_count_keeps_the_message_for_the_retry(
    harness: Harness, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose receiver fails the first attempt
    path = "/batch-copies/fail-1"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    # And another copy of its message (the same SQS message received twice) that counts the
    # same attempt just before this one records it
    batches = dispatcher.dispatcher()._batches
    record = batches.record_delivery

    def another_copy_first(*args: Any) -> bool:
        assert record(*args), "the other copy's count"
        return record(*args)

    monkeypatch.setattr(batches, "record_delivery", another_copy_first)
    url = harness.stack.webhook_queue_url
    [message] = harness.receive(url, visibility=60)
    response = dispatcher.handler(harness.sqs_event(url, [message]), LambdaContextStub())
    # Then this copy, refused, is not acknowledged: the message may be the one that carries
    # the retry, and stays queued until it is due
    assert [item["itemIdentifier"] for item in response["batchItemFailures"]] == [message["MessageId"]]
    monkeypatch.setattr(batches, "record_delivery", record)
    deadline = time.monotonic() + 20
    while _stored(harness, batch_id).delivery_status is not DeliveryStatus.DELIVERED:
        assert time.monotonic() < deadline, "the retry never came"
        _dispatch_all(harness, dispatcher)
        time.sleep(0.3)
    assert [delivery.status for delivery in receiver.deliveries() if delivery.path == path] == [500, 200]


def test_a_batch_webhook_message_received_twice_makes_its_next_attempt_once_when_it_is_due(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    # Given a batch whose receiver fails twice, and the dispatcher's clock in the test's hands
    path = "/batch-twice/fail-2"
    handler, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    dispatcher = handler.dispatcher()
    now = [time.time()]
    dispatcher._clock = lambda: now[0]
    [message] = harness.receive(harness.stack.webhook_queue_url, visibility=60)
    body, message_id = message["Body"], message["MessageId"]
    # And its first attempt, failed, made by one receipt of its message
    with pytest.raises(RetryLater):
        asyncio.run(dispatcher.handle(body, receive_count=1, message_id=message_id))
    due_s = (_stored(harness, batch_id).delivery_next_ms or 0) / 1000
    # When SQS handed that receive over twice, and the second copy is handled once the first
    # recorded its attempt, within the early tolerance of the next one
    now[0] = due_s - EARLY_TOLERANCE_SECONDS / 2
    with pytest.raises(RetryLater) as waited:
        asyncio.run(dispatcher.handle(body, receive_count=1, message_id=message_id))
    # Then it POSTs nothing and counts nothing: the message comes back when the attempt is due
    assert [delivery.status for delivery in receiver.deliveries() if delivery.path == path] == [500]
    assert _stored(harness, batch_id).delivery_attempts == 1
    assert waited.value.delay_seconds == pytest.approx(EARLY_TOLERANCE_SECONDS / 2, abs=0.01)
    # And back then it makes the second attempt, while another message (the event sent again)
    # waits for the one that carries the attempt
    now[0] = due_s
    with pytest.raises(RetryLater):
        asyncio.run(dispatcher.handle(body, receive_count=1, message_id="another-message"))
    with pytest.raises(RetryLater):
        asyncio.run(dispatcher.handle(body, receive_count=2, message_id=message_id))
    assert [delivery.status for delivery in receiver.deliveries() if delivery.path == path] == [500, 500]
    assert _stored(harness, batch_id).delivery_attempts == 2


def test_a_late_success_of_a_batch_webhook_counts_after_another_copy_counted_the_attempt_failed(
    harness: Harness, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose event's receiver answers 200
    path = "/batch-copies/ok"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    # And another copy of its message whose POST of the same attempt timed out, and which
    # counted that attempt failed just before this copy's 200 is recorded
    batches = dispatcher.dispatcher()._batches
    record = batches.record_delivery

    def another_copy_failed_first(batch_id: str, status: Any, code: Any, attempts: int, *rest: Any) -> bool:
        due = int((time.time() + 60) * 1000)
        assert record(batch_id, DeliveryStatus.PENDING, None, attempts, None, due), "the other copy's count"
        return record(batch_id, status, code, attempts, *rest)

    monkeypatch.setattr(batches, "record_delivery", another_copy_failed_first)
    _dispatch_all(harness, dispatcher)
    monkeypatch.setattr(batches, "record_delivery", record)
    # Then the receiver's 200 counts: the event is delivered, not POSTed again at the next attempt
    stored = _stored(harness, batch_id)
    assert (stored.delivery_status, stored.delivery_attempts) == (DeliveryStatus.DELIVERED, 1)
    assert [delivery.status for delivery in receiver.deliveries() if delivery.path == path] == [200]


def test_a_redelivery_during_a_retry_round_runs_its_own_round_of_attempts(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    # Given a batch whose receiver is down, its event's first attempt failed, its message now
    # waiting out the backoff
    path = "/batch-round/fail-99"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    _dispatch_all(harness, dispatcher)
    assert [a.status_code for a in _stored(harness, batch_id).delivery_log] == [500]
    # When the integrator asks for a redelivery meanwhile
    assert harness.api("POST", f"/v1/batches/{batch_id}/webhook/redeliver", tenant=ENTERPRISE).status == 202
    deadline = time.monotonic() + 40
    while _stored(harness, batch_id).delivery_status is not DeliveryStatus.FAILED:
        assert time.monotonic() < deadline, "the redelivered round never ended"
        _dispatch_all(harness, dispatcher)
        time.sleep(0.3)
    # Then the new round made every attempt of the schedule, numbered 1, 2, 3, 4, each once,
    # however the earlier round's message and the new one interleaved
    schedule = harness.config.webhooks.schedule_seconds
    logged = [attempt.attempt for attempt in _stored(harness, batch_id).delivery_log]
    assert logged == [1, *range(1, len(schedule) + 2)], logged
    # And no attempt was POSTed twice: the old round's message is acknowledged at its next
    # receive (the test below shows it message by message)
    posts = receiver.requests_to(path)
    assert len(posts) == len(logged)
    assert len({post.headers["webhook-id"] for post in posts}) == 1


def test_a_batch_message_of_the_round_before_a_redelivery_is_dropped_at_its_next_receive(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    """Hunt 211, as for a job's (test_dispatcher): the old round's message is acknowledged
    without a POST, not kept waiting behind the new round's after each of its attempts."""
    # Given a batch whose event's first attempt failed: its message m1 carries the next
    path = "/batch-old-round/fail-99"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    url = harness.stack.webhook_queue_url

    def dispatched() -> tuple[list[dict[str, Any]], set[str]]:
        messages = harness.receive(url, visibility=60)
        response = dispatcher.handler(harness.sqs_event(url, messages), LambdaContextStub())
        return messages, {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}

    (m1,), failed = dispatched()
    assert failed == {m1["MessageId"]}
    # When the integrator asks for a redelivery, whose message m2 makes the new round's first
    # attempt
    assert harness.api("POST", f"/v1/batches/{batch_id}/webhook/redeliver", tenant=ENTERPRISE).status == 202
    (m2,), failed = dispatched()
    assert m2["MessageId"] != m1["MessageId"] and failed == {m2["MessageId"]}
    # And m1 comes back for its attempt
    harness.sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=m1["ReceiptHandle"], VisibilityTimeout=0
    )
    (again,), failed = dispatched()
    # Then it is acknowledged without a POST: the new round's message carries the event
    assert again["MessageId"] == m1["MessageId"] and failed == set()
    assert len(receiver.requests_to(path)) == 2
    assert _stored(harness, batch_id).delivery_attempts == 1


def _retention_ends_at(harness: Harness, batch_id: str, expires_at: int) -> None:
    """The batch and its items as they are when their retention ends at `expires_at`: time
    passed, by their one clock (the items' counts are kept on shards named by it)."""
    ddb = aws.client("dynamodb")
    keys = [batch_key(batch_id)] + [
        {"pk": item["pk"]} for item in _item_jobs(harness) if batch_of(item["pk"]["S"])[0] == batch_id
    ]
    for key in keys:
        ddb.update_item(
            TableName=harness.stack.jobs_table,
            Key=key,
            UpdateExpression="SET expires_at = :at",
            ExpressionAttributeValues={":at": {"N": str(expires_at)}},
            ConditionExpression="attribute_exists(pk)",
        )


@pytest.mark.parametrize("late", [False, True], ids=["within-the-margin", "past-the-retention"])
def test_items_still_queued_as_the_retention_runs_out_end_expired_at_their_claim_and_free_the_quota(
    harness: Harness, provider: FakeProviderServer, late: bool
) -> None:
    # Given a batch of three whose items are queued (they have no sweep entry: nothing but
    # their own messages looks at them), counted active on the tenant's share
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    reply = _submit(harness, requests=_requests(3))
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    assert shares.get(ENTERPRISE["tenant_id"]).active == 3
    # When their messages come only as their retention runs out (or after it, the items not
    # yet deleted by DynamoDB's TTL)
    margin = harness.config.reconciler.retention_margin_seconds
    now_s = int(time.time())
    _retention_ends_at(harness, reply.body["id"], now_s - 60 if late else now_s + margin // 2)
    _run_lane(harness)
    # Then none ran: each ended expired, its quota given back, and the batch ended expired
    assert _provider_calls(provider) == 0
    items = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    ended = [items.find(item_job_id(reply.body["id"], index), past_retention=True) for index in range(3)]
    assert [(job.status.value, job.error.code.value) for job in ended if job and job.error] == [
        ("expired", "deadline_exceeded")
    ] * 3
    share = shares.get(ENTERPRISE["tenant_id"])
    assert (share.active, share.running) == (0, 0)
    batch = _stored(harness, reply.body["id"])
    assert batch.status is BatchStatus.EXPIRED
    assert batch.final_counts is not None and batch.final_counts.expired == 3
    if not late:
        # And the batch, ended within the margin, is kept for its webhook's retries as its items
        # are: its GET still answers while they may run
        assert batch.expires_at >= time.time() + harness.config.terminal_event_seconds - 60
        assert _get(harness, reply.body["id"]).status == 200


def test_a_key_reused_over_a_batch_past_its_retention_not_yet_ended_is_a_503_and_counts_nothing_twice(
    harness: Harness,
) -> None:
    # Given a batch under an Idempotency-Key, expanded, its items still queued past its
    # retention: their messages lost and the reconciler down all that time
    batch_id, url = _expanded(harness, 3, key="nightly-batch")
    harness.sqs.purge_queue(QueueUrl=url)
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    assert shares.get(ENTERPRISE["tenant_id"]).active == 3
    _retention_ends_at(harness, batch_id, int(time.time()) - 60)
    before = _item_jobs(harness)
    # When the client uses the key again, with another body
    again = _submit(harness, key="nightly-batch", requests=_requests(3, prefix="new"))
    # Then it is told to come back (review 234: a new batch took the old one's place, and its
    # items the old items', whose quota was never given back: 6 active for 3 jobs)
    assert (again.status, again.code) == (503, "service_unavailable"), again.body
    assert int(again.headers["retry-after"]) > 0
    assert shares.get(ENTERPRISE["tenant_id"]).active == 3
    assert _item_jobs(harness) == before
    assert _stored(harness, batch_id).status is BatchStatus.IN_PROGRESS


def test_in_the_second_a_batchs_retention_ends_a_get_a_replay_and_a_new_body_agree_it_is_gone(
    harness: Harness,
) -> None:
    # Given a batch under an Idempotency-Key, ended, and the api's clock in the second its
    # retention ends
    first = _submit(harness, key="nightly-9", requests=_requests(2))
    batch_id = first.body["id"]
    _run_lane(harness)
    assert _stored(harness, batch_id).status is BatchStatus.COMPLETED
    ends = int(time.time()) + 100
    _retention_ends_at(harness, batch_id, ends)
    harness.api_module.batch_intake().batches._clock = lambda: ends + 0.5
    # When it is read, and the key is used again with the same body, then with another
    got = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE)
    again = _submit(harness, key="nightly-9", requests=_requests(3))
    # Then all say it is gone (hunt 237: a 404 to GET, but a replay of it, or a conflict)
    assert got.status == 404
    assert again.status == 202 and "idempotent-replayed" not in again.headers, again.body
    assert again.body["request_counts"]["total"] == 3


def test_a_stale_message_past_the_retention_leaves_the_key_free_for_a_new_job(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a job submitted under an Idempotency-Key, still queued when its retention ended
    # (its item not yet deleted by DynamoDB's TTL), its message arriving only now
    first = harness.submit(key="weekly-report", prompt="last week")
    assert first.status == 202
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": first.body["id"]}},
        UpdateExpression="SET expires_at = :at",
        ExpressionAttributeValues={":at": {"N": str(int(time.time()) - 60)}},
    )
    _run_lane(harness)
    assert _provider_calls(provider) == 0
    # When the client uses the key again, as its retention allows
    again = harness.submit(key="weekly-report", prompt="this week")
    # Then it is a new job, which runs: the old one's end did not bring its item back to life
    assert again.status == 202 and "idempotent-replayed" not in again.headers
    _run_lane(harness)
    assert _provider_calls(provider) == 1
    job = harness.api("GET", f"/v1/jobs/{again.body['id']}", tenant=ENTERPRISE).body
    assert job["status"] == "succeeded"
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    assert (share.active, share.running) == (0, 0)


def test_an_item_of_a_canceling_batch_near_its_retention_ends_canceled_as_its_batch_asked(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a batch's queued items within the margin of their retention, and the batch canceled
    reply = _submit(harness, requests=_requests(2))
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    margin = harness.config.reconciler.retention_margin_seconds
    _retention_ends_at(harness, reply.body["id"], int(time.time()) + margin // 2)
    assert harness.api("POST", f"/v1/batches/{reply.body['id']}/cancel", tenant=ENTERPRISE).status == 202
    # When their messages come
    _run_lane(harness)
    # Then they end canceled, as the batch asked, not expired
    assert _provider_calls(provider) == 0
    batch = _stored(harness, reply.body["id"])
    assert batch.status is BatchStatus.CANCELED
    assert batch.final_counts is not None and (batch.final_counts.canceled, batch.final_counts.expired) == (
        2,
        0,
    )


def _objects(harness: Harness) -> list[str]:
    listed = aws.client("s3").list_objects_v2(Bucket=harness.stack.payload_bucket)
    return sorted(entry["Key"] for entry in listed.get("Contents", []))


def test_a_replay_with_another_body_is_refused_before_anything_is_written(harness: Harness) -> None:
    # Given a batch accepted under a key
    assert _submit(harness, key="nightly-2", requests=_requests(2)).status == 202
    objects = _objects(harness)
    # When the key comes again with another body
    other = _submit(harness, key="nightly-2", requests=_requests(3))
    # Then it is refused, and nothing was written for it (no requests file in S3 either)
    assert (other.status, other.code) == (422, "idempotency_key_reused")
    assert _objects(harness) == objects


def test_a_batch_whose_expand_message_sqs_refuses_is_still_accepted_once(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given SQS refusing the api's SendMessage with an error no retry fixes (a role changed)
    events = aws.client("sqs").meta.events
    refused: list[str] = []

    def refuse(**_: Any) -> None:
        refused.append("sqs.SendMessage")
        error: Any = {
            "Error": {"Code": "AccessDenied", "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        }
        raise ClientError(error, "SendMessage")

    events.register("before-call.sqs.SendMessage", refuse, unique_id="test-batches-refused")
    try:
        capsys.readouterr()
        reply = _submit(harness, requests=_requests(2))
    finally:
        events.unregister("before-call.sqs.SendMessage", unique_id="test-batches-refused")
    # Then the batch is accepted (a 500 would have the client's retry store and pay for a second
    # one), stored once, and the failed send is counted for the enqueue alarm; the reconciler
    # sends its expand message later
    assert refused == ["sqs.SendMessage"]
    assert reply.status == 202
    listed = harness.api("GET", "/v1/batches", tenant=ENTERPRISE).body["data"]
    assert [batch["id"] for batch in listed] == [reply.body["id"]]
    assert len(emitted_metrics(capsys.readouterr().out, MetricName.JOB_ENQUEUE_FAILED)) == 1


def _made_a_retention_ago(harness: Harness, batch_id: str, items: int, kept_item: int | None = None) -> None:
    """The batch and its items as a batch made a whole retention ago is: its retention ended
    (they are not yet deleted by DynamoDB's TTL), except `kept_item`'s, still kept for a day."""
    now = time.time()
    created = int((now - harness.config.retention_seconds - 60) * 1000)
    for index, key in [(None, batch_key(batch_id))] + [
        (i, {"pk": {"S": item_job_id(batch_id, i)}}) for i in range(items)
    ]:
        kept = index is not None and index == kept_item
        expires_at = int(now) + harness.config.terminal_event_seconds if kept else int(now) - 60
        aws.client("dynamodb").update_item(
            TableName=harness.stack.jobs_table,
            Key=key,
            UpdateExpression="SET expires_at = :at, created_ms = :created",
            ExpressionAttributeValues={":at": {"N": str(expires_at)}, ":created": {"N": str(created)}},
        )


def test_results_of_a_key_reused_after_its_retention_never_show_the_earlier_batchs_items(
    harness: Harness,
) -> None:
    # Given a batch run to its end under a key, whose retention then ended (its items not yet
    # deleted by DynamoDB's TTL)
    first = _submit(harness, key="weekly", requests=_requests(2, prefix="old"))
    _run_lane(harness)
    _made_a_retention_ago(harness, first.body["id"], items=2)
    # When the key is used again, as its retention allows, and the results read before any
    # worker has expanded the new batch
    again = _submit(harness, key="weekly", requests=_requests(2, prefix="new"))
    assert again.status == 202 and "idempotent-replayed" not in again.headers
    assert again.body["id"] == first.body["id"]
    lines, _ = _results(harness, again.body["id"])
    # Then none of the earlier run's items is shown as this batch's
    assert all(not line.get("custom_id", "").startswith("old") for line in lines)
    # And once it runs, its own are
    _run_lane(harness)
    lines, _ = _results(harness, again.body["id"])
    assert sorted(line["custom_id"] for line in lines) == ["new-0", "new-1"]


def test_results_of_a_key_reused_after_a_deploy_that_raised_the_retention_never_show_the_earlier_batchs_items(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch run to its end under a key with a retention of one day, which ended
    before = Harness(moto_stack, integration_config(provider, retention_days=1), monkeypatch)
    first = _submit(before, key="weekly", requests=_requests(2, prefix="old"))
    _run_lane(before)
    _made_a_retention_ago(before, first.body["id"], items=2)
    # When a deploy raised the retention to a week, and the key is used again
    after = Harness(moto_stack, integration_config(provider, retention_days=7), monkeypatch)
    again = _submit(after, key="weekly", requests=_requests(2, prefix="new"))
    assert again.status == 202 and "idempotent-replayed" not in again.headers
    assert again.body["id"] == first.body["id"]
    # Then the results read before the new batch expanded show none of the earlier one's
    lines, _ = _results(after, again.body["id"])
    assert [line["status"] for line in lines] == ["queued", "queued"], lines
    assert all(not line.get("custom_id", "").startswith("old") for line in lines)
    # And once it runs, its own are, each run once
    _run_lane(after)
    lines, _ = _results(after, again.body["id"])
    assert sorted((line["custom_id"], line["status"]) for line in lines) == [
        ("new-0", "succeeded"),
        ("new-1", "succeeded"),
    ]


def test_a_batch_redelivery_asked_as_its_retention_ends_is_kept_for_its_round_and_delivered(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    # Given a batch whose event was delivered, and whose retention ends in a second or two
    path = "/batch-late-redelivery"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    _dispatch_all(harness, dispatcher)
    assert len(receiver.requests_to(path)) == 1
    ends_s = int(time.time()) + 2
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key=batch_key(batch_id),
        UpdateExpression="SET expires_at = :e",
        ExpressionAttributeValues={":e": {"N": str(ends_s)}},
    )
    # When a redelivery is accepted, and its round's first attempt comes after that end (the
    # dispatcher behind, or its message re-sent by the reconciler)
    again = harness.api("POST", f"/v1/batches/{batch_id}/webhook/redeliver", tenant=ENTERPRISE)
    assert again.status == 202, again.body
    time.sleep(max(0.0, ends_s + 0.2 - time.time()))
    _dispatch_all(harness, dispatcher)
    # Then it is delivered, as a job's is (hunt 301: the batch was gone to the dispatcher, and
    # the redelivery stayed pending), and the batch kept no longer than one round
    assert len(receiver.requests_to(path)) == 2
    stored = _stored(harness, batch_id)
    assert stored.delivery_status is DeliveryStatus.DELIVERED
    assert stored.expires_at <= harness.config.kept_until_s(stored.created_ms, stored.finished_ms)


def test_an_earlier_batchs_item_kept_past_its_batch_never_blocks_a_new_batch_under_the_reused_key(
    harness: Harness,
) -> None:
    # Given a batch run to its end under a key a whole retention ago, whose retention ended,
    # while one of its items is still kept (an earlier release kept an item past its batch for
    # its webhook's retries, or for a redelivery asked in the batch's last day)
    first = _submit(harness, key="weekly", requests=_requests(2, prefix="old"))
    _run_lane(harness)
    _made_a_retention_ago(harness, first.body["id"], items=2, kept_item=0)
    # When the key is used again, as its retention allows, and the new batch runs
    again = _submit(harness, key="weekly", requests=_requests(3, prefix="new"))
    assert again.status == 202 and "idempotent-replayed" not in again.headers
    _run_lane(harness)
    # Then it expands over the kept item and runs every one of its own
    stored = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).find(
        again.body["id"]
    )
    assert stored is not None and stored.status is BatchStatus.COMPLETED, stored
    lines, _ = _results(harness, again.body["id"])
    assert sorted(line["custom_id"] for line in lines) == ["new-0", "new-1", "new-2"]
    assert all(line["status"] == "succeeded" for line in lines), lines


def test_an_earlier_batchs_item_still_running_is_never_replaced_by_a_new_batch_under_its_key(
    harness: Harness,
) -> None:
    # Given a batch under a key whose one item a worker is running (a live lease, its tenant's
    # slot held under the item's id), and whose retention has ended
    first = _submit(harness, key="weekly", requests=[{"custom_id": "a", "body": {"prompt": "old"}}])
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, harness.receive(url))  # the expansion
    harness.sqs.purge_queue(QueueUrl=url)
    item_id = item_job_id(first.body["id"], 0)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claimed = jobs.claim(item_id, "old-worker", lease_seconds=600, tenant=(ENTERPRISE["tenant_id"], HIGH))
    assert claimed.job is not None and claimed.job.status is JobStatus.RUNNING, claimed
    _made_a_retention_ago(harness, first.body["id"], items=1)
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    before = shares.get(ENTERPRISE["tenant_id"])
    # When the key is used again
    again = _submit(harness, key="weekly", requests=[{"custom_id": "a", "body": {"prompt": "new"}}])
    # Then the client is told to come back once the batch has ended (it ends with its item), and
    # nothing of it was replaced: the running item stays its worker's, its result and its slot
    # under this id
    assert (again.status, again.code) == (503, "service_unavailable"), again.body
    assert harness.receive(url) == []
    item = jobs.find(item_id, past_retention=True)
    assert item is not None and (item.status, item.lease_owner) == (JobStatus.RUNNING, "old-worker")
    assert shares.get(ENTERPRISE["tenant_id"]) == before


def _reconciler_ahead(harness: Harness, seconds: float) -> Reconciler:
    """The reconciler with its clock `seconds` ahead, its batches' too."""

    def clock() -> float:
        return time.time() + seconds

    jobs = JobRepository(
        harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock
    )
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    batches = BatchRepository(
        harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=clock
    )
    return Reconciler(jobs, queues, harness.config, batches=batches)


@pytest.mark.parametrize("kind", ["job", "batch"])
def test_a_pending_webhook_whose_message_was_lost_after_an_attempt_is_sent_again_by_the_reconciler(
    harness: Harness, receiver: WebhookReceiver, kind: str
) -> None:
    # Given a job or a batch whose first webhook attempt failed (500), its next one scheduled
    TenantRepository(harness.stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise", tenant_id=ENTERPRISE["tenant_id"]
    )
    dispatcher = load_handler("webhook_dispatcher")
    hook = {"url": f"http://127.0.0.1:{receiver.port}/lost-{kind}/fail-9"}
    reply = (
        _submit(harness, requests=_requests(1), webhook=hook)
        if kind == "batch"
        else harness.submit(webhook=hook)
    )
    assert reply.status == 202, reply.body
    _run_lane(harness)
    url = harness.stack.webhook_queue_url
    (message,) = harness.receive(url, visibility=60)
    response = dispatcher.handler(harness.sqs_event(url, [message]), LambdaContextStub())
    assert len(response["batchItemFailures"]) == 1
    assert [d.status for d in receiver.deliveries() if d.path.startswith(f"/lost-{kind}")] == [500]
    # When that message is lost from then on (the webhooks DLQ took it after its receives)
    harness.sqs.purge_queue(QueueUrl=url)
    # Then the reconciler, once that attempt is long overdue, sends the event again
    ahead = harness.config.reconciler.stale_webhook_seconds + 120
    report = _reconciler_ahead(harness, ahead).run()
    assert report.webhooks == [reply.body["id"]]
    (again,) = harness.receive(url)
    assert webhook_message(again)["job_id"] == reply.body["id"]


class _AppliedRetried:
    """The first UpdateItem whose request holds `marker` is applied, its answer lost, and
    botocore sends it again (AwsFaults' applied_retried, chosen by what the request says)."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.fired = 0
        aws.client("dynamodb").meta.events.register(
            "needs-retry.dynamodb.UpdateItem", self._retry, unique_id="applied-retried-by-content"
        )

    def _retry(self, attempts: int, request_dict: dict[str, Any], response: Any, **_: Any) -> int | None:
        body = request_dict.get("body") or b""
        body = body.encode() if isinstance(body, str) else body
        if not self.fired and attempts == 1 and response is not None and self.marker in body:
            self.fired += 1
            return 0
        return None

    def disarm(self) -> None:
        aws.client("dynamodb").meta.events.unregister(
            "needs-retry.dynamodb.UpdateItem", unique_id="applied-retried-by-content"
        )


def _one_item_whose_write_is_applied_unanswered(
    harness: Harness, marker: bytes, seconds: float, **submit: Any
) -> str:
    """A batch of one item, expanded, whose lane then runs for up to `seconds` while the first
    UpdateItem whose request holds `marker` is applied and its answer lost; its id."""
    batch_id, _ = _expanded(harness, 1, **submit)
    fault = _AppliedRetried(marker)
    try:
        _run_lane(harness, seconds=seconds)
    finally:
        fault.disarm()
    assert fault.fired == 1
    return batch_id


def test_a_batch_whose_finalizing_write_was_applied_unanswered_still_gets_its_results_file(
    harness: Harness,
) -> None:
    # Given a batch of one item, expanded; when its item ends, and the write that begins its
    # finalizing is applied, its answer lost (botocore's retry then finds it finalizing already)
    batch_id = _one_item_whose_write_is_applied_unanswered(harness, b":finalizing", seconds=20)
    # Then the batch still ends with its results file within seconds, not at the reconciler's
    # next look minutes later
    stored = _stored(harness, batch_id)
    assert (stored.status, stored.compile_queued) == (BatchStatus.COMPLETED, True)


def _acme(harness: Harness) -> None:
    TenantRepository(harness.stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise", tenant_id=ENTERPRISE["tenant_id"]
    )


@pytest.mark.parametrize("kind", ["job", "batch"])
def test_a_webhook_message_lost_before_its_first_attempt_is_sent_again_by_the_reconciler(
    harness: Harness, receiver: WebhookReceiver, kind: str
) -> None:
    # Given a job or a batch that ended with a webhook, whose message is lost before any
    # attempt (the dispatcher crashed on every receive, and the webhooks DLQ took it)
    _acme(harness)
    hook = {"url": f"http://127.0.0.1:{receiver.port}/first-{kind}"}
    reply = (
        _submit(harness, requests=_requests(1), webhook=hook)
        if kind == "batch"
        else harness.submit(webhook=hook)
    )
    _run_lane(harness)
    harness.sqs.purge_queue(QueueUrl=harness.stack.webhook_queue_url)
    # When the reconciler runs, once that message is long overdue
    report = _reconciler_ahead(harness, harness.config.reconciler.stale_webhook_seconds + 120).run()
    # Then the event is sent again
    assert report.webhooks == [reply.body["id"]]


def test_a_retry_recorded_before_the_sender_marks_the_webhook_sent_keeps_the_batch_in_the_index(
    harness: Harness, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose webhook sender's write saying so is slow (throttled, retried), while
    # the dispatcher already made the first attempt, which failed, and scheduled the next
    _acme(harness)
    dispatcher = load_handler("webhook_dispatcher")
    url = harness.stack.webhook_queue_url
    slow: list[tuple[BatchRepository, str, int]] = []
    mark = BatchRepository.mark_webhook_sent
    monkeypatch.setattr(
        BatchRepository,
        "mark_webhook_sent",
        lambda self, batch_id, delivery_round: slow.append((self, batch_id, delivery_round)),
    )
    hook = {"url": f"http://127.0.0.1:{receiver.port}/race/fail-9"}
    batch_id = _submit(harness, requests=_requests(1), webhook=hook).body["id"]
    _run_lane(harness)
    (message,) = harness.receive(url, visibility=60)
    assert (
        len(dispatcher.handler(harness.sqs_event(url, [message]), LambdaContextStub())["batchItemFailures"])
        == 1
    )
    # When the sender's write lands after it, and the retry's message is then lost
    for repository, sent, delivery_round in slow:
        mark(repository, sent, delivery_round)
    assert (_stored(harness, batch_id).delivery_attempts, _stored(harness, batch_id).webhook_sent) == (
        1,
        True,
    )
    harness.sqs.purge_queue(QueueUrl=url)
    # Then the reconciler still sends the event again, once the retry is long overdue
    report = _reconciler_ahead(harness, harness.config.reconciler.stale_webhook_seconds + 120).run()
    assert report.webhooks == [batch_id]


def test_a_batch_stored_before_digests_is_still_replayed_and_keeps_the_hash_a_rollback_reads(
    harness: Harness,
) -> None:
    # Given a batch, whose item keeps the body's hash as written (what a version rolled back to
    # compares) beside its canonical digest
    from llmq.batch_intake import batch_request_hash
    from llmq.batches import batch_key
    from llmq.models import BatchRequest

    body = {"requests": _requests(2), "metadata": {"run": "n"}}
    first = _submit(harness, key="nightly-1", **body)
    assert first.status == 202
    key = batch_key(first.body["id"])
    item = harness.ddb.get_item(TableName=harness.stack.jobs_table, Key=key)["Item"]
    assert item["request_hash"]["S"] == batch_request_hash(BatchRequest.model_validate(body))
    # And as a version before digests stored it: without one
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table, Key=key, UpdateExpression="REMOVE request_digest"
    )
    # When the client replays it after the upgrade, then it is the same batch
    again = _submit(harness, key="nightly-1", **body)
    assert (again.status, again.body["id"], again.headers.get("idempotent-replayed")) == (
        202,
        first.body["id"],
        "true",
    )
    # And another body under the key is still refused
    assert _submit(harness, key="nightly-1", requests=_requests(3)).code == "idempotency_key_reused"


def test_a_batch_of_many_bad_items_is_refused_at_its_first_without_an_error_for_each(
    harness: Harness,
) -> None:
    # Given a batch of 200 items, each with ten fields no item has
    bad = [
        {"custom_id": f"i{index}", "body": {"prompt": "p", **{f"x{field}": 0 for field in range(10)}}}
        for index in range(200)
    ]
    reply = _submit(harness, requests=bad)
    # Then it is refused naming the first bad item only: validation stops there, rather than
    # building 2,000 errors (a body of a few MB could hold hundreds of thousands)
    assert (reply.status, reply.code) == (422, "invalid_request")
    assert {tuple(error["loc"][:3]) for error in reply.body["errors"]} == {("body", "requests", 0)}
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls[HIGH]) == 0


def test_expansions_that_meet_at_the_checkpoint_go_on_as_one(harness: Harness) -> None:
    """Looks at a batch still expanding (the reconciler's poke, an item's end, a duplicate
    message) are expansion runs too; when two meet at the checkpoint, the one refused there stops
    (the other goes on), or every later item would be sent once per run, for the rest of the
    batch."""
    import threading

    from llmq.batch_runs import BatchExpander
    from llmq.payloads import PayloadStore

    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    expander = BatchExpander(
        BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")),
        queues,
        PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")),
        harness.config,
    )
    total = 80
    batch_id = _submit(harness, requests=_requests(total)).body["id"]
    url = harness.stack.lane_queue_urls[HIGH]
    sent: list[str] = []

    def drain_items() -> list[dict[str, Any]]:
        """The lane's expand messages; the item messages are counted and dropped."""
        expands = []
        while messages := harness.receive(url, visibility=60):
            for message in messages:
                body = json.loads(message["Body"])
                if body.get("kind") == "expand":
                    expands.append(message)
                else:
                    sent.append(body["job_id"])
                harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return expands

    # Given an expansion that wrote a few chunks and handed the rest on, and three looks at it
    drain_items()
    calls = iter(range(1_000_000))
    expander.expand(batch_id, lambda: 100.0 if next(calls) < 3 else 0.0)
    for _ in range(3):
        send_expand(queues, _stored(harness, batch_id))
    # When every expand message runs at once, each in an invocation of its own, round after round
    for _ in range(20):
        expands = drain_items()
        if not expands:
            break
        runs = [threading.Thread(target=expander.expand, args=(batch_id, lambda: 100.0)) for _ in expands]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
    drain_items()
    # Then every item was written, and sent about once: a run refused at the checkpoint sends
    # again only the chunk it met, and each run's start its last chunk (2 items each)
    assert _stored(harness, batch_id).expanded == total
    assert set(sent) == {item_job_id(batch_id, index) for index in range(total)}
    from collections import Counter

    assert len(sent) <= total + 2 * 2 * 8, str(
        sorted(Counter(int(j.rsplit("n", 1)[1]) for j in sent).items())
    )


def test_a_resent_batch_webhook_whose_delivery_was_attempted_meanwhile_waits_for_that_attempts_next(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    # Given a batch that ended with a webhook, whose message was lost before any attempt
    _acme(harness)
    hook = {"url": f"http://127.0.0.1:{receiver.port}/h142-batch"}
    batch_id = _submit(harness, requests=_requests(1), webhook=hook).body["id"]
    _run_lane(harness)
    url = harness.stack.webhook_queue_url
    harness.sqs.purge_queue(QueueUrl=url)
    stale = harness.config.reconciler.stale_webhook_seconds
    first = stale + 1
    ahead = BatchRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + first,
    )

    def attempted_meanwhile(**_: Any) -> None:
        # A late copy of the message reached the dispatcher after all: its attempt failed and
        # the receiver asked for two hours (Retry-After), just as the reconciler resends.
        assert ahead.record_delivery(
            batch_id, DeliveryStatus.PENDING, 503, 1, None, int((time.time() + first + 7200) * 1000), 0, None
        )

    sqs = aws.client("sqs")
    sqs.meta.events.register_first("before-call.sqs.SendMessage", attempted_meanwhile)
    assert _reconciler_ahead(harness, first).run().webhooks == [batch_id]
    sqs.meta.events.unregister("before-call.sqs.SendMessage", attempted_meanwhile)
    stored = _stored(harness, batch_id)
    assert stored.delivery_next_ms is not None
    # When the reconciler runs again after its webhook threshold, the next attempt not yet due
    second = first + stale + 1
    assert stored.delivery_next_ms > (time.time() + second) * 1000, "the next attempt is not due yet"
    # Then it sends no third copy (as for a job: test_reconciler's hunt-136 test)
    assert _reconciler_ahead(harness, second).run().webhooks == []


@pytest.mark.parametrize(
    ("new_round", "status", "code"),
    [
        (1, DeliveryStatus.DELIVERED, 200),
        (2, DeliveryStatus.DELIVERED, 200),
        (2, DeliveryStatus.PENDING, 500),
    ],
)
def test_a_late_answer_of_the_round_before_a_batch_redelivery_is_logged_after_the_new_rounds_attempts(
    harness: Harness,
    receiver: WebhookReceiver,
    faults: AwsFaults,
    new_round: int,
    status: DeliveryStatus,
    code: int,
) -> None:
    """Hunts 207 and 209, as for a job's (test_store_contract): the old round's late answer goes
    after the new round's attempts in the batch's delivery log, not over its first, whether
    its count fits the new round's (209: the first write took it) or not (207). The write after
    the refused first is applied and its answer lost (botocore sends it again): one entry."""
    # Given an ended batch with a webhook, whose message was lost before any attempt
    _acme(harness)
    hook = {"url": f"http://127.0.0.1:{receiver.port}/h207-batch"}
    batch_id = _submit(harness, requests=_requests(1), webhook=hook).body["id"]
    _run_lane(harness)
    harness.sqs.purge_queue(QueueUrl=harness.stack.webhook_queue_url)
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    later = int((time.time() + 60) * 1000)

    def record(status: DeliveryStatus, code: int, attempts: int, log_seq: int) -> bool:
        entry = DeliveryAttempt(
            attempt=attempts, at="2026-12-02T10:00:00.000Z", status_code=code, latency_ms=3
        )
        due = later if status is DeliveryStatus.PENDING else None
        return batches.record_delivery(batch_id, status, code, attempts, entry, due, log_seq, None)

    # And two failed attempts, and a third whose POST is slow to be answered (it read sequence 2)
    assert record(DeliveryStatus.PENDING, 500, 1, 0)
    assert record(DeliveryStatus.PENDING, 500, 2, 1)
    # When a redelivery's round fails meanwhile, once or twice
    batches.mark_redelivery(_stored(harness, batch_id))
    new_attempts = [(1, 502), (2, 503)][:new_round]
    for n, failure in new_attempts:
        assert record(DeliveryStatus.PENDING, failure, n, 1 + n)
    # And then the old third attempt is answered, its second write's answer lost
    faults.arm(FaultKind.APPLIED_RETRIED, "dynamodb.UpdateItem", nth=2)
    assert record(status, code, 3, 2)
    assert len(faults.fired) == 1
    # Then it counts as one more of the new round's, logged once after the new round's attempts
    stored = _stored(harness, batch_id)
    assert (stored.delivery_status, stored.delivery_attempts) == (status, new_round + 1)
    assert [(entry.attempt, entry.status_code) for entry in stored.delivery_log] == [
        (1, 500),
        (2, 500),
        *new_attempts,
        (3, code),
    ]


def test_a_batch_expansion_outlasts_an_sqs_send_outage_before_the_dlq(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a batch of five (chunks of two) whose expand message a worker receives
    reply = harness.api(
        "POST",
        "/v1/batches",
        body={"requests": [{"custom_id": f"i{n}", "body": {"prompt": f"say {n}"}} for n in range(5)]},
        tenant=ENTERPRISE,
    )
    assert reply.status == 202, reply.body
    url = harness.stack.lane_queue_urls[HIGH]
    # When SQS refuses every send of the worker, through each of the lane's receives
    faults.arm(FaultKind.THROTTLE, "sqs.SendMessageBatch", function="worker", times=1000)
    faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", function="worker", times=1000)
    receives = harness.config.max_receive_count
    hidden_for = hidden_for_each_receive(harness, url, receives)
    # Then the expand message's receives outlast a quarter of an hour of refused sends before
    # the DLQ (whose second round would give the whole batch up), as a deferred job's do
    assert faults.fired
    assert len(hidden_for) == receives, hidden_for
    assert sum(hidden_for) >= 15 * 60, hidden_for


def test_a_running_item_is_asked_to_stop_even_when_the_cancel_request_was_cut_after_its_flag(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a batch of two items, expanded, whose item 0 a worker is running (a long generation)
    batch_id, _ = _expanded(harness, 2)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    running = item_job_id(batch_id, 0)
    assert jobs.claim(running, "worker-a", 900, (ENTERPRISE["tenant_id"], HIGH)).claimed
    # When the client's cancel is cut right after the batch's flag was written (the api's read
    # of the tenant's running items fails; a Lambda timeout there is the same)
    fault = faults.arm(FaultKind.SERVER_ERROR, "dynamodb.GetItem", function="api", nth=2)
    reply = harness.api("POST", f"/v1/batches/{batch_id}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    assert faults.fired_for(fault) and reply.status >= 500, reply.body
    # (the client looks: the batch says it is canceling, so it has no reason to ask again)
    seen = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).body
    assert (seen["status"], seen["cancel_requested"]) == ("canceling", True)
    assert not jobs.is_cancel_requested(running)
    # And the reconciler comes to the batch
    _reconciler_later(harness).run()
    # Then the running item is asked to stop, as the cancel promised: its worker's cancel
    # watcher reads the job's flag
    assert jobs.is_cancel_requested(running)


def test_a_batch_without_a_results_file_whose_end_was_applied_unanswered_still_sends_its_webhook(
    moto_stack: MotoStack,
    provider: FakeProviderServer,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a deployment without results files, and a batch of one item with a webhook, expanded
    webhooks = {"allow_loopback_http": True, "schedule_seconds": [1, 2, 4], "timeout_seconds": 5}
    config = integration_config(
        provider, batches={"expand_chunk": 2, "results_file": False}, webhooks=webhooks
    )
    harness = Harness(moto_stack, config, monkeypatch)
    monkeypatch.setattr("llmq.batch_runs.WEBHOOK_SEND_GRACE_SECONDS", 2)
    hooks = {"url": f"http://127.0.0.1:{receiver.port}/b"}
    # When its item ends and the batch's terminal write is applied, its answer lost (botocore's
    # retry finds the batch ended already)
    batch_id = _one_item_whose_write_is_applied_unanswered(harness, b"finished_ms = :now", 30, webhook=hooks)
    url = harness.stack.lane_queue_urls[HIGH]
    stored = _stored(harness, batch_id)
    assert stored.status is BatchStatus.COMPLETED
    # Then its webhook message is sent by the item's message, back after the sender's grace,
    # not left for the reconciler's look minutes later
    assert _held(harness, url) == 0
    events = [json.loads(m["Body"]) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert (stored.webhook_sent, events) == (True, [{"job_id": batch_id, "event": "batch.completed"}])


def test_a_late_batch_success_after_a_later_attempt_was_counted_still_settles_the_delivery(
    harness: Harness, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose event's receiver answers 200
    path = "/r164-batch-late/ok"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    # And this copy's POST of attempt 1 slow to be answered: meanwhile its twin (the same receive
    # handed over twice) counted attempt 1 failed (a 500), and the carrier, back 5 s later,
    # counted attempt 2 failed too, before this copy's 200 is recorded
    batches = dispatcher.dispatcher()._batches
    record = batches.record_delivery

    def twin_and_carrier_first(batch_id: str, status: Any, code: Any, attempts: int, *rest: Any) -> bool:
        due = int((time.time() + 300) * 1000)
        assert record(batch_id, DeliveryStatus.PENDING, 500, attempts, None, due), "the twin's attempt 1"
        assert record(batch_id, DeliveryStatus.PENDING, 500, attempts + 1, None, due), (
            "the carrier's attempt 2"
        )
        return record(batch_id, status, code, attempts, *rest)

    monkeypatch.setattr(batches, "record_delivery", twin_and_carrier_first)
    _dispatch_all(harness, dispatcher)
    monkeypatch.setattr(batches, "record_delivery", record)
    # Then, as for a job, the receiver's 200 settles the delivery: it is not POSTed again at
    # attempt 3, nor failed at the end
    stored = _stored(harness, batch_id)
    assert [delivery.status for delivery in receiver.deliveries() if delivery.path == path] == [200]
    assert stored.delivery_status is DeliveryStatus.DELIVERED, (
        f"the batch's delivery is {stored.delivery_status} with {stored.delivery_attempts} attempts "
        "after the receiver answered 200"
    )


def test_a_canceled_batchs_item_whose_end_is_throttled_comes_back_soon_then_later(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a canceled batch whose one item is still queued
    batch_id, url = _expanded(harness, 1)
    assert harness.api("POST", f"/v1/batches/{batch_id}/cancel", tenant=ENTERPRISE).status == 202
    # When the item's claim is refused for the cancel, and its end (each invocation's second
    # transaction) is throttled past botocore's retries, receive after receive
    faults.arm(FaultKind.THROTTLE, "dynamodb.TransactWriteItems", function="worker", nth=2, times=1000)
    visibility: list[int] = []
    for _ in range(3):
        (message,) = harness.receive(url, visibility=600)
        with observing_sqs(
            "ChangeMessageVisibility", lambda params, **_: visibility.append(params["VisibilityTimeout"])
        ):
            response = harness.run_worker(url, [message])
        assert len(response["batchItemFailures"]) == 1
        harness.sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )
    # Then its message comes back soon, not after the lane's visibility timeout (hunt 265: an
    # unexpected failure, the batch canceling for a reconciler period), and later at each
    # receive, so a throttle of minutes never spends its receives into the DLQ, where the item
    # would fail as crashed (review 257: coming back in seconds, it did in 40 s)
    assert 0 < visibility[0] < 60 and visibility[0] < visibility[1] < visibility[2], visibility
    # And once AWS answers, the item ends canceled, and so does its batch
    faults.disarm()
    _run_lane(harness, seconds=20)
    assert _stored(harness, batch_id).status is BatchStatus.CANCELED


@pytest.mark.parametrize("of", ["job", "batch"])
def test_a_redelivery_whose_send_sqs_refuses_is_accepted_its_round_left_to_the_reconciler(
    harness: Harness, receiver: WebhookReceiver, faults: AwsFaults, of: str
) -> None:
    # Given an ended job or batch with a webhook, and SQS refusing the api's sends
    if of == "batch":
        _, ended_id = _ended_batch_with_a_webhook(harness, receiver, "/redeliver-unsent")
        path = f"/v1/batches/{ended_id}"
    else:
        ended_id = harness.submit(prompt="hi", webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
        harness.drain("high")
        path = f"/v1/jobs/{ended_id}"
    key = batch_key(ended_id) if of == "batch" else {"pk": {"S": ended_id}}

    def stored() -> dict[str, Any]:
        return harness.ddb.get_item(TableName=harness.stack.jobs_table, Key=key, ConsistentRead=True)["Item"]

    rounds_before = int(stored().get("delivery_round", {"N": "0"})["N"])
    fault = faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", function="api", times=10)
    # When the client asks for a redelivery
    reply = harness.api("POST", f"{path}/webhook/redeliver", tenant=ENTERPRISE)
    assert faults.fired_for(fault)
    # Then it is accepted (hunt 289: a 503, though the new round was written, whose retry
    # starts yet another), the round pending, and in the reconciler's sweep, which sends it
    assert reply.status == 202, reply.body
    assert reply.body["webhook"]["delivery"]["status"] == "pending"
    item = stored()
    assert "sweep_at" in item and int(item["delivery_round"]["N"]) == rounds_before + 1


def test_a_batch_items_end_near_the_invocations_end_never_outlasts_its_timeout(
    harness: Harness, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (as in Lambda, whose event loop lives on: outside it, Powertools' asyncio.run would wait
    # at its end for the call given up, which Lambda freezes with the environment instead)
    monkeypatch.setenv("LAMBDA_TASK_ROOT", "/var/task")
    # Given a batch of one item whose answer takes 3 s, run by a worker invocation with 8 s
    # to live (its write-back reserve is 2 s), and a DynamoDB connection that stalls 8 s on
    # the batch's read once the answer is in (one stalled read; botocore reads for 10 s)
    reply = harness.api(
        "POST",
        "/v1/batches",
        body={"requests": [{"custom_id": "a", "body": {"prompt": "a [[latency:3]]"}}]},
        tenant=ENTERPRISE,
    )
    assert reply.status in (200, 201, 202), reply.body
    batch_id = reply.body["id"]
    url = harness.stack.lane_queue_urls["high"]
    harness.run_worker(url, harness.receive(url))  # the expansion
    messages = harness.receive(url)
    assert len(messages) == 1
    started = time.monotonic()
    stalls: list[float] = []

    def stalled(params: dict[str, Any], **_: Any) -> None:
        key = params.get("Key", {}).get("pk", {}).get("S", "")
        if key == BATCH_PREFIX + batch_id and time.monotonic() - started > 2.5 and not stalls:
            stalls.append(time.monotonic() - started)
            time.sleep(8.0)

    with on_aws_call("dynamodb", "provide-client-params.dynamodb.GetItem", stalled):
        # When the worker runs the item
        response = harness.run_worker(url, messages, timeout_seconds=8)
    took = time.monotonic() - started
    item = json.loads(messages[0]["Body"])["job_id"]
    job = harness.api("GET", f"/v1/jobs/{item}", tenant=ENTERPRISE).body
    # Then the item succeeded, and the invocation answered within its 8 s, its batch's end
    # left for its message to look at again (hunt 295: past them, Lambda would have cut it off
    # and every record of its batch would come back, settled or not)
    assert stalls, "the stall never fired"
    assert job["status"] == "succeeded"
    assert took < 8.0, f"the invocation answered after {took:.1f} s, past its 8 s timeout"
    assert [failure["itemIdentifier"] for failure in response["batchItemFailures"]] == [
        messages[0]["MessageId"]
    ]


def test_a_redelivery_sent_while_a_later_one_failed_its_send_leaves_the_later_round_due(
    harness: Harness, receiver: WebhookReceiver, faults: AwsFaults
) -> None:
    # Given an ended batch whose webhook was delivered
    path = "/redeliver-overlap"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    _dispatch_all(harness, dispatcher)
    assert len(receiver.requests_to(path)) == 1
    queues = harness.api_module.batch_intake().queues
    send = queues.enqueue_webhook
    rounds: list[int] = []

    def overtaken(*args: Any, **kwargs: Any) -> Any:
        rounds.append(kwargs["delivery_round"])
        if len(rounds) == 1:
            # When a second redelivery comes in while the first's message is on its way, and
            # SQS refuses the second's send (it is accepted, its round left to the reconciler)
            fault = faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", function="api", times=10)
            second = harness.api("POST", f"/v1/batches/{batch_id}/webhook/redeliver", tenant=ENTERPRISE)
            assert second.status == 202, second.body
            assert faults.fired_for(fault)
            faults.disarm()
        return send(*args, **kwargs)

    queues.enqueue_webhook = overtaken  # type: ignore[method-assign]
    try:
        first = harness.api("POST", f"/v1/batches/{batch_id}/webhook/redeliver", tenant=ENTERPRISE)
    finally:
        queues.enqueue_webhook = send  # type: ignore[method-assign]
    assert first.status == 202, first.body
    # Then the first's "sent" does not mark the second's round, unsent, as sent (hunt 318: it
    # waited a stale_webhook_seconds in the index, and the first's message is dropped as an
    # earlier round's): the reconciler's next run pokes the batch, whose look sends it, and
    # the receiver gets it
    assert rounds == [1, 2]
    stored = _stored(harness, batch_id)
    assert (stored.delivery_round, stored.webhook_sent) == (2, False)
    report = _reconciler_ahead(harness, harness.config.reconciler.stale_queued_seconds + 60).run()
    assert report.batches == [batch_id]
    _run_lane(harness)
    _dispatch_all(harness, dispatcher)
    assert len(receiver.requests_to(path)) == 2


@pytest.mark.parametrize(
    ("kind", "nth"),
    [(FaultKind.THROTTLE, 2), (FaultKind.APPLIED_LOST, 1)],
    ids=["sent-mark-throttled", "round-applied-answer-lost"],
)
def test_a_batch_redelivery_whose_write_fails_after_it_applied_is_accepted_and_sent_once(
    harness: Harness, receiver: WebhookReceiver, faults: AwsFaults, kind: FaultKind, nth: int
) -> None:
    # Given an ended batch whose webhook was delivered
    path = f"/redeliver-{kind.value}"
    dispatcher, batch_id = _ended_batch_with_a_webhook(harness, receiver, path)
    _dispatch_all(harness, dispatcher)
    assert len(receiver.requests_to(path)) == 1
    # When a redelivery's write saying its message went is throttled (the api's second
    # UpdateItem, after the message), or its round's write (the first) is applied while every
    # answer is lost
    fault = faults.arm(kind, "dynamodb.UpdateItem", function="api", nth=nth, times=5)
    reply = harness.api("POST", f"/v1/batches/{batch_id}/webhook/redeliver", tenant=ENTERPRISE)
    assert faults.fired_for(fault)
    faults.disarm()
    # Then it is accepted, as a job's is (hunt 321, review 277: a 503 for a round written, whose
    # retry starts another round and sends its event again), and the receiver gets it once more
    assert reply.status == 202, reply.body
    assert _stored(harness, batch_id).delivery_round == 1
    _dispatch_all(harness, dispatcher)
    assert len(receiver.requests_to(path)) == 2
