"""The batch upload form (issue 15): POST /v1/uploads, a file PUT to S3, POST /v1/batches with its
upload_id, and the worker's validation of the file before any item is written; against moto and
a loopback provider, through the real handlers."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from llmq import aws
from llmq.batch_intake import upload_key
from llmq.batch_runs import BatchExpander
from llmq.batches import BatchRepository, batch_of, item_job_id, part_key
from llmq.models import BatchItemRequest, BatchStatus
from llmq.payloads import PayloadStore
from llmq.queues import QueueRepository
from llmq.request_rules import item_bytes
from llmq.shares import ShareRepository
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, FREE, ApiReply, Harness
from tests.integration.test_batches import _item_jobs, _results, _run_lane, _stored


@pytest.fixture
def harness(moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Harness:
    # Parts of two lines, so a file of five is three parts and a validation can stop between.
    batches = {
        "expand_chunk": 2,
        "upload_part_requests": 2,
        "max_upload_bytes": 16384,
        "max_item_bytes": 1024,
        "upload_errors_shown": 3,
    }
    return Harness(moto_stack, integration_config(provider, batches=batches), monkeypatch)


def _line(custom_id: str, **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "body": {"prompt": f"say {custom_id}", **body}})


def _upload(
    harness: Harness, text: str, tenant: dict[str, str] = ENTERPRISE, declared: int | None = None
) -> str:
    """POST /v1/uploads, then the file PUT where it says (moto in process: as the same PUT).
    `declared`: the size asked for, when not the file's (a PUT S3 would refuse, made here to
    see what llmq does should a file of another size reach the bucket anyway)."""
    size = len(text.encode()) if declared is None else declared
    reply = harness.api("POST", "/v1/uploads", body={"size_bytes": size}, tenant=tenant)
    assert reply.status == 201, reply.body
    upload = reply.body
    url = urlsplit(upload["upload_url"])
    query = parse_qs(url.query)
    assert "X-Amz-Signature" in query and upload["method"] == "PUT"
    # Signed for exactly that Content-Length: S3 refuses a PUT of any other
    assert "content-length" in query["X-Amz-SignedHeaders"][0].split(";")
    assert upload["size_bytes"] == size
    bucket, key = _bucket_and_key(url.netloc, url.path)
    assert key.endswith(f"/{upload['id']}.jsonl") and tenant["tenant_id"] in key
    _s3().put_object(Bucket=bucket, Key=key, Body=text.encode())
    return str(upload["id"])


def _bucket_and_key(netloc: str, path: str) -> tuple[str, str]:
    if netloc.split(".")[0] not in ("s3", "localhost", "127"):  # virtual-hosted style
        return netloc.split(".")[0], unquote(path.lstrip("/"))
    bucket, key = unquote(path.lstrip("/")).split("/", 1)
    return bucket, key


def _submit(harness: Harness, upload_id: str, tenant: dict[str, str] = ENTERPRISE, **body: Any) -> ApiReply:
    return harness.api("POST", "/v1/batches", body={"upload_id": upload_id, **body}, tenant=tenant)


def test_an_uploaded_file_is_validated_then_runs_each_line_once_as_an_item(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a file of five requests (a blank line, CRLF endings and, as Windows tools save
    # UTF-8, a byte-order mark among them)
    lines = [_line(f"row-{index}") for index in range(5)]
    upload_id = _upload(harness, "\ufeff" + "\r\n".join(lines[:3]) + "\r\n\r\n" + "\n".join(lines[3:]))
    # When a batch names it
    reply = _submit(harness, upload_id)
    # Then it is accepted at once, validating, before its lines are read
    assert reply.status == 202, reply.body
    assert (reply.body["status"], reply.body["upload_id"]) == ("validating", upload_id)
    assert reply.body["request_counts"]["total"] == 0
    batch_id = reply.body["id"]
    # And once the worker has run it, every line ran once, as an item named by its custom_id
    _run_lane(harness)
    batch = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).body
    assert batch["status"] == "completed", batch
    assert (batch["request_counts"]["total"], batch["request_counts"]["succeeded"]) == (5, 5)
    results, _ = _results(harness, batch_id)
    assert [line["custom_id"] for line in results] == [f"row-{index}" for index in range(5)]
    assert sorted(item["pk"]["S"] for item in _item_jobs(harness)) == sorted(
        item_job_id(batch_id, index) for index in range(5)
    )
    assert sum(provider.calls_for(item_job_id(batch_id, index)) for index in range(5)) == 5
    # And the file was stored in parts of two lines, never as one object
    assert _stored(harness, batch_id).parts == [2, 4, 5]


def test_bad_lines_fail_the_batch_naming_each_and_no_item_is_written(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a file with an unknown model on line 2, a repeated custom_id on line 4 and a line
    # that is not JSON on line 5 (and a fine line between)
    text = "\n".join(
        [_line("a"), _line("b", model="no-such-model"), _line("c"), _line("a"), "{not json", _line("d")]
    )
    batch_id = _submit(harness, _upload(harness, text)).body["id"]
    # When the worker validates it
    _run_lane(harness)
    # Then the batch failed, naming the first three bad lines and what is wrong on each
    batch = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).body
    assert batch["status"] == "failed", batch
    errors = batch["errors"]
    assert [(error["line"], error["code"]) for error in errors] == [
        (2, "model_not_allowed"),
        (4, "invalid_request"),
        (5, "invalid_request"),
    ]
    assert "custom_id 'a' repeats line 1" in errors[1]["message"]
    assert "say" not in json.dumps(errors)  # no prompt text in what is reported
    # And no item was written, queued or run, and the tenant's quota was never charged
    assert _item_jobs(harness) == []
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0
    assert provider.calls_for(item_job_id(batch_id, 0)) == 0
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    assert shares.get(ENTERPRISE["tenant_id"]).active == 0


@pytest.mark.parametrize(
    ("text", "code", "line"),
    [
        ("", "invalid_request", 0),  # an empty file is refused by the api; this one holds a blank line
        ("x" * 7000 + "\n" + _line("ok"), "payload_too_large", 1),
    ],
)
def test_a_file_with_no_request_or_a_line_too_long_fails(
    harness: Harness, text: str, code: str, line: int
) -> None:
    batch_id = _submit(harness, _upload(harness, text or "\n\n")).body["id"]
    _run_lane(harness)
    batch = _stored(harness, batch_id)
    assert batch.status is BatchStatus.FAILED
    assert batch.errors is not None
    assert [(error.line, error.code) for error in batch.errors] == [(line, code)]


def test_an_upload_missing_foreign_too_large_or_empty_is_refused_and_nothing_is_written(
    harness: Harness,
) -> None:
    mine = _upload(harness, _line("a"))
    # (files of another size than their URL was signed for: S3 refuses their PUT, and should
    # one reach the bucket anyway, the batch is still refused)
    big = _upload(harness, _line("b") + "\n" + " " * 20000, declared=100)
    empty = _upload(harness, "", declared=1)
    cases = [
        (_submit(harness, "upl_" + "0" * 26), 422, "upload_not_found"),
        (_submit(harness, mine, tenant=FREE), 422, "upload_not_found"),
        (_submit(harness, big), 413, "payload_too_large"),
        (_submit(harness, empty), 422, "invalid_request"),
        (
            harness.api(
                "POST",
                "/v1/batches",
                body={"upload_id": mine, "requests": [json.loads(_line("c"))]},
                tenant=ENTERPRISE,
            ),
            422,
            "invalid_request",
        ),
        (harness.api("POST", "/v1/batches", body={}, tenant=ENTERPRISE), 422, "invalid_request"),
    ]
    for reply, status, code in cases:
        assert (reply.status, reply.code) == (status, code), reply.body
    # Nothing written, nothing queued
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0


def test_an_upload_url_is_refused_for_a_size_over_the_limit_or_not_a_size(harness: Harness) -> None:
    cases = [
        ({"size_bytes": 16385}, 413, "payload_too_large"),
        ({"size_bytes": 0}, 422, "invalid_request"),
        ({"size_bytes": "16"}, 422, "invalid_request"),
        ({"size_bytes": True}, 422, "invalid_request"),
        ({"size_bytes": 16.5}, 422, "invalid_request"),
        ({"size_bytes": 16, "kind": "jsonl"}, 422, "invalid_request"),
        ({}, 422, "invalid_request"),
        (None, 422, "invalid_request"),
    ]
    for body, status, code in cases:
        reply = harness.api("POST", "/v1/uploads", body=body, tenant=ENTERPRISE)
        assert (reply.status, reply.code) == (status, code), (body, reply.body)
        assert "upload_url" not in (reply.body or {})
    # At the limit, a URL
    at_limit = harness.api("POST", "/v1/uploads", body={"size_bytes": 16384}, tenant=ENTERPRISE)
    assert at_limit.status == 201, at_limit.body
    assert harness.item_count() == 0


def test_a_validation_cut_short_resumes_from_its_checkpoint_and_still_finds_a_repeat(
    harness: Harness, moto_stack: MotoStack
) -> None:
    # Given a file whose fifth line repeats the first line's custom_id (parts of two lines)
    text = "\n".join([_line("a"), _line("b"), _line("c"), _line("d"), _line("a")])
    batch_id = _submit(harness, _upload(harness, text)).body["id"]
    # When a first run has time for one part only (its Lambda's time running out)
    expander = _expander(harness)
    expander.expand(batch_id, lambda: 0.5)
    cut = _stored(harness, batch_id)
    assert (cut.status, cut.parts, cut.scan_lines) == (BatchStatus.VALIDATING, [2], 2)
    # Then the run it handed on to resumes there, reads back the stored custom_ids, and the
    # repeat on line 5 still fails the batch
    _run_lane(harness)
    failed = _stored(harness, batch_id)
    assert failed.status is BatchStatus.FAILED
    assert failed.errors is not None and [error.line for error in failed.errors] == [5]
    assert "repeats an earlier line" in failed.errors[0].message
    assert _item_jobs(harness) == []


def test_a_file_replaced_after_the_batch_was_made_fails_the_batch(harness: Harness) -> None:
    upload_id = _upload(harness, _line("a"))
    batch_id = _submit(harness, upload_id).body["id"]
    # The same URL PUT again, with other lines, before the worker read it
    key = _stored(harness, batch_id).upload_ref
    _s3().put_object(Bucket=harness.stack.payload_bucket, Key=key, Body=_line("z").encode())
    _run_lane(harness)
    failed = _stored(harness, batch_id)
    assert failed.status is BatchStatus.FAILED
    assert failed.errors is not None and failed.errors[0].code == "upload_changed"
    assert _item_jobs(harness) == []


@pytest.mark.parametrize(
    ("max_active", "active", "code"),
    [
        # over what is left of the quota: a wait may let it in
        (3, 1, "quota_exceeded"),
        # more requests than the quota at all: no wait does (as an inline batch's 422, hunt 259)
        (2, 0, "batch_exceeds_quota"),
    ],
)
def test_an_upload_over_the_tenants_quota_fails_and_charges_nothing(
    harness: Harness, max_active: int, active: int, code: str
) -> None:
    # Given a tenant with `active` jobs queued, of at most `max_active`
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    shares.set_limits(FREE["tenant_id"], max_active_jobs=max_active)
    for index in range(active):
        assert harness.submit(tenant=FREE, prompt=f"job {index}").status == 202
    url = harness.stack.lane_queue_urls["low"]
    # (their messages out of the worker's way: they stay queued while the batch is looked at)
    assert len(harness.receive(url, visibility=600)) == active
    # When it uploads a batch of three valid requests, and a worker reads its file
    text = "\n".join(_line(f"r{index}") for index in range(3))
    batch_id = _submit(harness, _upload(harness, text, tenant=FREE), tenant=FREE).body["id"]
    harness.run_worker(url, harness.receive(url))
    # Then the batch fails with the code that says whether to wait or to split, charging nothing
    failed = _stored(harness, batch_id)
    assert failed.status is BatchStatus.FAILED
    assert failed.errors is not None and failed.errors[0].code == code
    assert shares.get(FREE["tenant_id"]).active == active
    assert _item_jobs(harness) == []


def test_a_batch_canceled_while_its_file_is_unread_ends_canceled_with_no_item(harness: Harness) -> None:
    batch_id = _submit(harness, _upload(harness, _line("a") + "\n" + _line("b"))).body["id"]
    canceled = harness.api("POST", f"/v1/batches/{batch_id}/cancel", tenant=ENTERPRISE)
    assert canceled.status == 202, canceled.body
    _run_lane(harness)
    batch = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).body
    assert (batch["status"], batch["request_counts"]["total"]) == ("canceled", 0)
    assert _item_jobs(harness) == []
    assert not [
        key
        for key in _objects(harness)
        if key.startswith(part_key(_stored(harness, batch_id).requests_ref, 0))
    ]


def _objects(harness: Harness) -> list[str]:
    listed = _s3().list_objects_v2(Bucket=harness.stack.payload_bucket)
    return [entry["Key"] for entry in listed.get("Contents", [])]


def test_the_items_of_an_upload_are_named_in_results_before_they_are_written(harness: Harness) -> None:
    text = "\n".join(_line(f"row-{index}") for index in range(5))
    batch_id = _submit(harness, _upload(harness, text)).body["id"]
    expander = _expander(harness)
    # Validated and admitted, then the expansion cut after its first chunk
    expander.expand(batch_id, lambda: 0.5)
    expander.expand(batch_id, lambda: 0.5)
    expander.expand(batch_id, lambda: 0.5)
    batch = _stored(harness, batch_id)
    assert batch.validated and 0 < batch.expanded < 5
    results, _ = _results(harness, batch_id)
    assert [line["custom_id"] for line in results] == [f"row-{index}" for index in range(5)]
    assert {line["status"] for line in results[batch.expanded :]} == {"queued"}
    assert all(batch_of(line["job_id"]) for line in results)


def _expander(harness: Harness) -> BatchExpander:
    """The worker's expansion, called directly with the time left a test chooses."""
    return BatchExpander(
        BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")),
        QueueRepository(
            harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
        ),
        PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")),
        harness.config,
    )


def _s3() -> Any:
    return aws.client("s3")


# ---- the adversarial review's cases -------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", [FaultKind.APPLIED_LOST, FaultKind.APPLIED_RETRIED, FaultKind.THROTTLE, FaultKind.SERVER_ERROR]
)
def test_a_checkpoint_cut_by_an_aws_fault_still_validates_and_runs_each_line_once(
    harness: Harness, provider: FakeProviderServer, kind: FaultKind
) -> None:
    # Given a file of five lines, three parts, and the first checkpoint's UpdateItem failing
    # (applied with its answer lost, among others)
    faults = AwsFaults()
    faults.wrap_handler("worker", harness.worker())
    try:
        text = "\n".join(_line(f"row-{index}") for index in range(5))
        batch_id = _submit(harness, _upload(harness, text)).body["id"]
        faults.arm(kind, "dynamodb.UpdateItem", function="worker")
        _run_lane(harness)
        assert faults.fired, "the fault never fired"
    finally:
        faults.disarm()
    # Then the batch completed, each line run once
    batch = _stored(harness, batch_id)
    assert (batch.status, batch.total, batch.parts) == (BatchStatus.COMPLETED, 5, [2, 4, 5])
    assert sorted(call["job_id"] for call in provider.state.snapshot()["log"]) == sorted(
        item_job_id(batch_id, index) for index in range(5)
    )


def test_an_admission_that_meets_a_claim_on_the_share_item_is_tried_again_in_the_same_run(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a validated file whose admission (the batch and the tenant's share item, in one
    # transaction) meets another write of the share item: a claim or an end of the tenant's
    # jobs (TransactionConflict, which botocore does not retry)
    faults = AwsFaults()
    faults.wrap_handler("worker", harness.worker())
    try:
        text = "\n".join(_line(f"row-{index}") for index in range(3))
        batch_id = _submit(harness, _upload(harness, text)).body["id"]
        faults.arm(FaultKind.TRANSACTION_CONFLICT, "dynamodb.TransactWriteItems", function="worker")
        # When the worker runs its expand message once
        url = harness.stack.lane_queue_urls["high"]
        harness.run_worker(url, harness.receive(url))
        assert [fired.fault.operation for fired in faults.fired] == ["dynamodb.TransactWriteItems"]
    finally:
        faults.disarm()
    # Then that run admitted the batch and wrote its items, not a later one reading the file again
    batch = _stored(harness, batch_id)
    assert (batch.validated, batch.total, batch.expanded) == (True, 3, 3)
    _run_lane(harness)
    assert _stored(harness, batch_id).status is BatchStatus.COMPLETED
    assert sum(provider.calls_for(item_job_id(batch_id, index)) for index in range(3)) == 3


def test_a_line_of_json_dumps_escapes_is_measured_by_what_it_stores(harness: Harness) -> None:
    # Given a line as Python's json.dumps writes it (ensure_ascii): 400 Cyrillic characters,
    # 800 bytes stored, 2,400 bytes of \uXXXX escapes in the file (item limit 1,024 bytes)
    line = json.dumps({"custom_id": "ru", "body": {"prompt": "ж" * 400}})
    assert len(line.encode()) > 2 * 1024 and "\\u0436" in line
    batch_id = _submit(harness, _upload(harness, line)).body["id"]
    _run_lane(harness)
    # Then it runs, as the same item inline would
    assert _stored(harness, batch_id).status is BatchStatus.COMPLETED


def test_the_same_file_uploaded_again_under_a_new_id_replays_the_batch(harness: Harness) -> None:
    # Given a batch made from an upload under an Idempotency-Key, whose answer the client lost
    text = "\n".join(_line(f"row-{index}") for index in range(3))
    headers = {"Idempotency-Key": "nightly-7"}
    first = harness.api(
        "POST", "/v1/batches", body={"upload_id": _upload(harness, text)}, headers=headers, tenant=ENTERPRISE
    )
    assert first.status == 202, first.body
    # When it uploads the same file again (a new upload id) and retries with the same key
    again = harness.api(
        "POST", "/v1/batches", body={"upload_id": _upload(harness, text)}, headers=headers, tenant=ENTERPRISE
    )
    # Then it gets the same batch back, and one batch exists
    assert again.status == 202, again.body
    assert (again.body["id"], again.headers.get("idempotent-replayed")) == (first.body["id"], "true")
    # And another file under that key is a conflict
    other = harness.api(
        "POST",
        "/v1/batches",
        body={"upload_id": _upload(harness, _line("else"))},
        headers=headers,
        tenant=ENTERPRISE,
    )
    assert (other.status, other.code) == (422, "idempotency_key_reused")


def test_an_ended_batch_with_no_webhook_leaves_the_reconcilers_index(harness: Harness) -> None:
    # A batch leaves the sweep index when it ends (with a webhook, once that is sent): else the
    # reconciler would send it an expand message every few minutes for its whole retention
    done = _submit(harness, _upload(harness, _line("a"))).body["id"]
    failed = _submit(harness, _upload(harness, "{not json")).body["id"]
    _run_lane(harness)
    for batch_id, status in ((done, BatchStatus.COMPLETED), (failed, BatchStatus.FAILED)):
        assert _stored(harness, batch_id).status is status
        item = _batch_item(harness, batch_id)
        assert "sweep_pk" not in item and "sweep_at" not in item, item.keys()


def _batch_item(harness: Harness, batch_id: str) -> dict[str, Any]:
    item: dict[str, Any] = harness.ddb.get_item(
        TableName=harness.stack.jobs_table, Key={"pk": {"S": f"batch#{batch_id}"}}
    )["Item"]
    return item


def test_an_uploaded_items_limit_counts_utf8_bytes_exactly(harness: Harness) -> None:
    # Given two one-line files of non-ASCII prompts: one item of exactly the item limit (1,024
    # bytes as stored, UTF-8), one a byte over
    def line_of(stored_bytes: int) -> str:
        base = len(item_bytes(BatchItemRequest.model_validate({"custom_id": "x", "body": {"prompt": "a"}})))
        room = stored_bytes - base
        prompt = "a" + "é" * (room // 2) + "a" * (room % 2)
        line = json.dumps({"custom_id": "x", "body": {"prompt": prompt}}, ensure_ascii=False)
        assert len(item_bytes(BatchItemRequest.model_validate_json(line))) == stored_bytes
        return line

    fits = _submit(harness, _upload(harness, line_of(1024))).body["id"]
    over = _submit(harness, _upload(harness, line_of(1025))).body["id"]
    _run_lane(harness)
    # Then the one at the limit runs, and the one over it fails naming its line
    assert _stored(harness, fits).status is BatchStatus.COMPLETED
    failed = _stored(harness, over)
    assert failed.status is BatchStatus.FAILED
    assert failed.errors is not None and [(e.line, e.code) for e in failed.errors] == [
        (1, "payload_too_large")
    ]


def test_a_replay_of_an_upload_batch_whose_upload_is_gone_answers_the_batch_it_made(harness: Harness) -> None:
    # Given a batch made from an upload under an Idempotency-Key, and then the upload removed by
    # S3's lifecycle (two days), while the batch is kept (seven)
    upload_id = _upload(harness, "\n".join(_line(f"row-{index}") for index in range(3)))
    headers = {"Idempotency-Key": "nightly-9"}
    body = {"upload_id": upload_id, "metadata": {"run": "a"}}
    first = harness.api("POST", "/v1/batches", body=body, headers=headers, tenant=ENTERPRISE)
    assert first.status == 202, first.body
    aws.client("s3").delete_object(
        Bucket=harness.stack.payload_bucket, Key=upload_key(ENTERPRISE["tenant_id"], upload_id)
    )
    # When the client replays it (its answer lost), Then it gets that batch, not a 422
    again = harness.api("POST", "/v1/batches", body=body, headers=headers, tenant=ENTERPRISE)
    assert (again.status, again.body["id"], again.headers.get("idempotent-replayed")) == (
        202,
        first.body["id"],
        "true",
    )
    # And the same key with another body is still refused, and a new key still needs its upload
    other = harness.api(
        "POST", "/v1/batches", body={**body, "metadata": {"run": "b"}}, headers=headers, tenant=ENTERPRISE
    )
    assert (other.status, other.body["code"]) == (422, "idempotency_key_reused")
    fresh = harness.api(
        "POST", "/v1/batches", body=body, headers={"Idempotency-Key": "nightly-10"}, tenant=ENTERPRISE
    )
    assert (fresh.status, fresh.body["code"]) == (422, "upload_not_found")


def test_lines_whose_field_names_are_long_fail_the_batch_with_errors_that_fit(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file whose ten bad lines each carry an unknown field named by 45,000 characters
    # (a prompt written as a JSON key): each error names the field, and the ten once made the
    # batch's failure too large to write (400 KB), so the batch crashed its workers instead
    from llmq.models import MAX_LINE_ERROR_CHARS

    harness = Harness(moto_stack, integration_config(provider), monkeypatch)
    lines = [
        json.dumps({"custom_id": f"r{n}", "body": {"prompt": "hi", f"{n}" + "k" * 45_000: 1}})
        for n in range(10)
    ]
    batch_id = _submit(harness, _upload(harness, "\n".join(lines))).body["id"]
    # When the worker validates it
    _run_lane(harness)
    # Then the batch failed, naming each line, each error brief
    batch = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).body
    assert batch["status"] == "failed", batch
    assert [error["line"] for error in batch["errors"]] == list(range(1, 11))
    assert all(len(error["message"]) <= MAX_LINE_ERROR_CHARS for error in batch["errors"])


def test_a_batch_canceled_while_its_file_is_validated_ends_canceled_not_failed(harness: Harness) -> None:
    # Given a file of two parts whose second holds a line that is not JSON
    text = "\n".join([_line("a"), _line("b"), _line("c"), "{not json"])
    batch_id = _submit(harness, _upload(harness, text)).body["id"]
    # And the client's cancel landing as the validation has stored its first part
    canceled: list[ApiReply] = []

    def cancel_once(**_: Any) -> None:
        if not canceled:
            canceled.append(harness.api("POST", f"/v1/batches/{batch_id}/cancel", tenant=ENTERPRISE))

    s3 = aws.client("s3")
    s3.meta.events.register("after-call.s3.PutObject", cancel_once, unique_id="cancel-mid-scan")
    try:
        _run_lane(harness)
    finally:
        s3.meta.events.unregister("after-call.s3.PutObject", unique_id="cancel-mid-scan")
    # Then the cancel was accepted, and the batch ends as the client asked: canceled, not
    # failed for a line it no longer wanted read, with no item written
    assert [reply.status for reply in canceled] == [202]
    batch = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).body
    assert batch["status"] == "canceled", batch
    assert _item_jobs(harness) == []


@pytest.mark.parametrize("over", ["requests", "bytes"])
def test_the_cli_sends_a_file_over_the_inline_limits_by_the_upload_form(
    moto_stack: MotoStack,
    provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
    over: str,
) -> None:
    """`llmq batches submit` sends a small file inline; a deployment that takes fewer requests
    (or bytes) in one body than the file holds refuses it, writing nothing, and the CLI sends the
    same file by the upload form under the same Idempotency-Key: one batch, every line run once."""
    import httpx

    import llmq_cli.client
    from llmq_cli.main import main

    limits = {"max_requests": 2} if over == "requests" else {"max_body_bytes": 1024}
    harness = Harness(
        moto_stack,
        integration_config(provider, batches={"expand_chunk": 2, "max_upload_bytes": 16384, **limits}),
        monkeypatch,
    )
    lines = [_line(f"row-{index}", metadata={"pad": "x" * 250}) for index in range(5)]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def api(request: httpx.Request) -> httpx.Response:
        # The real api handler, as API Gateway would invoke it for the CLI's request.
        reply = harness.api(
            request.method,
            request.url.path,
            raw_body=request.content.decode() or None,
            headers={key: value for key, value in request.headers.items() if key == "idempotency-key"},
            tenant=ENTERPRISE,
        )
        return httpx.Response(reply.status, json=reply.body, headers=reply.headers)

    def put(url: str, content: bytes, timeout: float) -> httpx.Response:
        # The presigned PUT, to moto's S3 in this process.
        parts = urlsplit(url)
        bucket, key = _bucket_and_key(parts.netloc, parts.path)
        _s3().put_object(Bucket=bucket, Key=key, Body=content)
        return httpx.Response(200)

    class Client(llmq_cli.client.LlmqClient):
        def __init__(self, api_url: str, api_key: str) -> None:
            super().__init__(api_url, api_key)
            self._http = httpx.Client(transport=httpx.MockTransport(api))

    monkeypatch.setattr(llmq_cli.client, "LlmqClient", Client)
    monkeypatch.setattr(llmq_cli.client.httpx, "put", put)
    submit = ["batches", "submit", str(rows), "--idempotency-key", "k-1"]
    submit += ["--api-url", "http://api.test", "--api-key", "k"]
    # When the CLI submits the file (inline: it is far under 4 MB)
    code = main(submit)
    out, err = capsys.readouterr()
    # Then the inline body was refused and the file went by the upload form, accepted
    assert code == 0, err
    assert "by the upload form" in err
    batch = json.loads(out)
    assert batch["status"] == "validating" and batch["upload_id"]
    # And the one batch there is runs every line once
    _run_lane(harness)
    ended = harness.api("GET", f"/v1/batches/{batch['id']}", tenant=ENTERPRISE).body
    assert (ended["status"], ended["request_counts"]["succeeded"]) == ("completed", 5)
    assert sum(provider.calls_for(item_job_id(batch["id"], index)) for index in range(5)) == 5
    listed = harness.api("GET", "/v1/batches", tenant=ENTERPRISE).body
    assert [found["id"] for found in listed["data"]] == [batch["id"]]
    # And the same command run again (its answer lost, say) is the batch's replay, not a
    # 422 for "another body" under the key (review 250)
    code = main(submit)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Idempotent-Replayed: true" in err
    listed = harness.api("GET", "/v1/batches", tenant=ENTERPRISE).body
    assert [found["id"] for found in listed["data"]] == [batch["id"]]
    # While another file under that key is still refused as another body
    rows.write_text(lines[0] + "\n", encoding="utf-8")
    assert main(submit) == 1
    assert "idempotency_key_reused" in capsys.readouterr().err


@pytest.mark.parametrize("char", ["a", "\x01", '"'])
def test_line_errors_of_characters_json_escapes_long_still_fit_the_batch_item_they_fail(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch, char: str
) -> None:
    """An error names the field it found: one named by 1,000 control characters was 500 of them
    stored as 3,000 bytes of JSON, past the room the batch item keeps for an error (hunt 248:
    with 100 such errors shown the batch's failing write was refused as too large, and the
    batch stayed validating, its errors never shown)."""
    config = integration_config(
        provider, limits={"max_metadata_keys": 1000}, batches={"upload_errors_shown": 100}
    )
    harness = Harness(moto_stack, config, monkeypatch)
    bad = char * 1000
    text = (
        "\n".join(json.dumps({"custom_id": f"r{i}", "body": {"prompt": "x", bad: 1}}) for i in range(100))
        + "\n"
    )

    def post(keys: int, tail: int) -> ApiReply:
        metadata = {**{f"k{i:03d}": "\U0001f600" * 512 for i in range(keys)}, "z": "\U0001f600" * tail}
        body = {"upload_id": _upload(harness, text), "metadata": metadata}
        return harness.api(
            "POST", "/v1/batches", raw_body=json.dumps(body, ensure_ascii=False), tenant=ENTERPRISE
        )

    # Given a batch whose metadata is the most its record may hold (a 413 above it)
    keys = 120
    while post(keys, 0).status == 413:
        keys -= 1
    low, high, accepted = 0, 512, None
    while low < high:
        middle = (low + high + 1) // 2
        reply = post(keys, middle)
        assert reply.status in (202, 413), reply.body
        low, high, accepted = (middle, high, reply) if reply.status == 202 else (low, middle - 1, accepted)
    assert accepted is not None
    # When the worker validates its file of 100 bad lines
    _run_lane(harness, seconds=10)
    # Then the batch ends failed, showing the 100 errors, each cut to its stored size
    batch = harness.api("GET", f"/v1/batches/{accepted.body['id']}", tenant=ENTERPRISE).body
    assert (batch["status"], len(batch.get("errors") or [])) == ("failed", 100)
    assert all(
        len(json.dumps(error["message"], ensure_ascii=False).encode()) <= 2002 for error in batch["errors"]
    )


def _quota_set_after_the_read(monkeypatch: pytest.MonkeyPatch, harness: Harness, to: int | None) -> list[str]:
    """An operator's `tenants set-limits --max-active` (None: `--clear`) landing between a
    batch admission's read of the tenant's share and its write."""
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    read = BatchRepository.share
    landed: list[str] = []

    def share(self: BatchRepository, tenant_id: str) -> Any:
        state = read(self, tenant_id)
        if not landed:
            if to is None:
                shares.set_limits(tenant_id, clear=("max_active_jobs",))
            else:
                shares.set_limits(tenant_id, max_active_jobs=to)
            landed.append(tenant_id)
        return state

    monkeypatch.setattr(BatchRepository, "share", share)
    return landed


@pytest.mark.parametrize(("before", "after"), [(None, 500), (50, 500), (50, None), (500, 4)])
def test_a_quota_changed_while_a_batch_is_admitted_is_the_one_it_meets(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, before: int | None, after: int | None
) -> None:
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    tenant_id = FREE["tenant_id"]
    if before is not None:
        shares.set_limits(tenant_id, max_active_jobs=before)
    # Given a free tenant (tier quota 100) with 2 jobs queued, and a file of 3 lines
    for index in range(2):
        assert harness.submit(tenant=FREE, prompt=f"job {index}").status == 202
    url = harness.stack.lane_queue_urls["low"]
    assert len(harness.receive(url, visibility=600)) == 2
    text = "\n".join(_line(f"r{index}") for index in range(3))
    uploaded = _submit(harness, _upload(harness, text, tenant=FREE), tenant=FREE).body["id"]
    # When the operator changes its quota while a worker validates the file, and while the api
    # accepts an inline batch of 3
    landed = _quota_set_after_the_read(monkeypatch, harness, after)
    harness.run_worker(url, harness.receive(url))
    assert landed == [tenant_id]
    landed.clear()
    inline = harness.api(
        "POST",
        "/v1/batches",
        body={"requests": [{"custom_id": f"r{n}", "body": {"prompt": "hi"}} for n in range(3)]},
        tenant=FREE,
    )
    assert landed == [tenant_id]
    active = shares.get(tenant_id).active
    if after is None or after >= 8:
        # Then each is admitted under the quota in force (hunt 330: a raised or cleared
        # override failed the upload `quota_exceeded` "2 queued ... adds 3; at most 500", and
        # the inline batch 429)
        batch = _stored(harness, uploaded)
        assert batch.status is not BatchStatus.FAILED and batch.validated, batch.errors
        assert inline.status == 202, inline.body
        assert active == 8
    else:
        # Or refused by it, when it no longer fits: nothing charged
        assert _stored(harness, uploaded).status is BatchStatus.FAILED
        assert (inline.status, inline.code) == (429, "quota_exceeded")
        assert active == 2


@pytest.mark.parametrize(("ending", "bom"), [("\n", False), ("\r\n", False), ("\r\n", True)])
def test_a_line_at_the_raw_limit_is_read_whatever_its_ending_and_one_past_it_is_refused(
    harness: Harness, ending: str, bom: bool
) -> None:
    limit = harness.config.batches.max_item_bytes * 6  # (as written: `_RAW_LINE_SLACK`)

    def padded(custom_id: str, size: int) -> str:
        # (whitespace between tokens, as a pretty-printer writes it)
        line = _line(custom_id)
        return line[:-1] + " " * (size - len(line)) + "}"

    # Given files whose first line is exactly at the raw line limit, saved with LF or CRLF
    # endings, with a byte order mark or not
    lead = "\ufeff" if bom else ""
    at_limit = lead + padded("a", limit) + ending + _line("b") + ending
    over = lead + padded("a", limit + 1) + ending + _line("b") + ending
    accepted = _submit(harness, _upload(harness, at_limit)).body["id"]
    refused = _submit(harness, _upload(harness, over)).body["id"]
    _run_lane(harness)
    # Then the line at the limit is read as an LF file's is (hunt 336: refused with CRLF)
    batch = _stored(harness, accepted)
    assert (batch.errors, batch.total) == (None, 2)
    # And one byte more is refused, whatever the ending
    errors = _stored(harness, refused).errors
    assert errors is not None and [(error.line, error.code) for error in errors] == [(1, "payload_too_large")]
