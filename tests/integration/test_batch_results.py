"""A batch's results file (issue 15): written by the worker once every item has ended, before
the batch's terminal status, as an S3 multipart upload that resumes from its checkpoint; then
GET /v1/batches/{id} answers a presigned URL to it. Against moto (which enforces S3's 5 MiB
minimum part) and a loopback provider."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from llmq import aws, batch_results
from llmq.batch_results import MAX_COMPILE_STALLS, ResultsCompiler
from llmq.batch_runs import BATCH_CRASHED, RESULTS_ASK_GRACE_SECONDS, settle
from llmq.batches import BatchRecord, BatchRepository, item_job_id
from llmq.errors import StoreUnavailable
from llmq.item_size import item_size_bytes
from llmq.job_record import JobRecord
from llmq.models import BatchStatus
from llmq.queues import QueueRepository
from llmq.telemetry import MetricName
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, Harness, emitted_metrics
from tests.integration.test_batch_uploads import _expander
from tests.integration.test_batches import (
    _requests,
    _results,
    _retention_ends_at,
    _run_lane,
    _stored,
    _submit,
)

MIB = 1024 * 1024


@pytest.fixture
def harness(moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(
        moto_stack,
        integration_config(provider, batches={"expand_chunk": 5, "results_part_bytes": 5 * MIB}),
        monkeypatch,
    )


def _file_lines(batch: BatchRecord) -> list[dict[str, Any]]:
    assert batch.results_key is not None
    body = aws.client("s3").get_object(Bucket="llmq-payloads", Key=batch.results_key)["Body"].read()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def test_an_ended_batch_answers_a_url_to_one_file_of_every_items_line(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a batch of five items, one of which fails for good
    requests = _requests(5)
    requests[3]["body"]["prompt"] = "boom [[fail:400]]"
    batch_id = _submit(harness, requests=requests).body["id"]
    # When it has run
    _run_lane(harness)
    # Then it ended only once its file was written, and GET answers a presigned URL to it
    batch = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).body
    assert batch["status"] == "completed", batch
    assert "X-Amz-Signature" in batch["results_file_url"] and batch["results_file_expires_at"]
    # And the file holds each item's line once, in order, as the paged results show it
    stored = _stored(harness, batch_id)
    paged, _ = _results(harness, batch_id)
    in_file = _file_lines(stored)
    assert [line["custom_id"] for line in in_file] == [f"item-{index}" for index in range(5)]
    assert [(line["job_id"], line["status"]) for line in in_file] == [
        (line["job_id"], line["status"]) for line in paged
    ]
    assert in_file[3]["error"]["code"] == paged[3]["error"]["code"]
    assert in_file[0]["result"] == paged[0]["result"]


def test_a_file_of_many_parts_cut_short_resumes_and_holds_each_line_once(
    harness: Harness, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given lines of 1 MiB each (S3's parts but the last are at least 5 MiB)
    def padded(batch: BatchRecord, index: int, job: JobRecord | None, names: dict[int, str]) -> bytes:
        return json.dumps({"job_id": item_job_id(batch.id, index), "pad": "x" * MIB}).encode()

    monkeypatch.setattr(ResultsCompiler, "line_bytes", staticmethod(padded))
    batch_id = _submit(harness, requests=_requests(12)).body["id"]
    # Run every item, but not the file: the expand message asking for it is held back
    url = harness.stack.lane_queue_urls["high"]
    _run_lane(harness)
    assert _stored(harness, batch_id).status in (BatchStatus.FINALIZING, BatchStatus.COMPLETED)
    _reset(harness, batch_id)
    # When a first run has time for one part only
    _expander(harness).expand(batch_id, lambda: 0.5)
    cut = _stored(harness, batch_id)
    assert (cut.status, cut.compile_next, len(cut.compile_parts)) == (BatchStatus.FINALIZING, 5, 1)
    # Then the run it handed on to writes the rest, and the batch ends
    _run_lane(harness)
    done = _stored(harness, batch_id)
    assert (done.status, len(done.compile_parts)) == (BatchStatus.COMPLETED, 2)
    in_file = _file_lines(done)
    assert [line["job_id"] for line in in_file] == [item_job_id(batch_id, index) for index in range(12)]
    assert url  # the lane the items ran in


@pytest.mark.parametrize(
    "retried_at", [1, MAX_COMPILE_STALLS], ids=["first stall retried", "last stall retried"]
)
def test_a_file_whose_part_no_run_has_the_time_to_read_ends_the_batch_without_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, retried_at: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a finalizing batch whose first part's reads take longer than a whole invocation
    # (scaled down: a page of one item costs 200 s of a run's 300; on AWS, tens of thousands
    # of items whose large results each read ~300 KB for a line that is a short URL)
    batch_id = _submit(harness, requests=_requests(3)).body["id"]
    real_compile = ResultsCompiler.compile
    monkeypatch.setattr(ResultsCompiler, "compile", lambda self, batch, remaining: None)
    _run_lane(harness)
    monkeypatch.setattr(ResultsCompiler, "compile", real_compile)
    _reset(harness, batch_id)
    monkeypatch.setattr(batch_results, "_READ_PAGE", 1)
    spent = [0.0]
    read_items = BatchRepository.items

    def slow_items(self: BatchRepository, batch: BatchRecord, start: int, count: int) -> Any:
        spent[0] += 200
        return read_items(self, batch, start, count)

    monkeypatch.setattr(BatchRepository, "items", slow_items)
    # (a stall's write applied with its answer lost, and retried by botocore: the first, or
    # the one that ends the file, which review 257 saw cost a run more)
    note = BatchRepository.note_compile_stall
    noted: list[int] = []

    def note_once_retried(self: BatchRepository, batch: BatchRecord, run: str) -> Any:
        noted.append(1)
        if len(noted) != retried_at:
            return note(self, batch, run)
        faults = AwsFaults()
        faults.arm(FaultKind.APPLIED_RETRIED, "dynamodb.UpdateItem")
        try:
            return note(self, batch, run)
        finally:
            faults.disarm()
            assert faults.fired

    monkeypatch.setattr(BatchRepository, "note_compile_stall", note_once_retried)
    capsys.readouterr()
    # When run after run hands on with no part written
    runs = 0
    while not _stored(harness, batch_id).status.is_terminal and runs < 10:
        spent[0] = 0.0
        _expander(harness).expand(batch_id, lambda: 300 - spent[0])
        runs += 1
    # Then after MAX_COMPILE_STALLS of them the batch ends without its file, saying why, as
    # one whose worker crashed every time does (hunt 264: it stayed finalizing for good, each
    # run handing on to the next)
    ended = _stored(harness, batch_id)
    assert runs == MAX_COMPILE_STALLS
    assert (ended.status, ended.results_key) == (BatchStatus.COMPLETED, None)
    assert ended.errors is not None and [error.code for error in ended.errors] == [BATCH_CRASHED]
    # ...counted for the lane's alarm once, as a crash is (hunt 275: nothing paged)
    (counted,) = emitted_metrics(capsys.readouterr().out, MetricName.JOB_DEAD_LETTERED)
    assert (counted["lane"], counted[MetricName.JOB_DEAD_LETTERED]) == (ended.lane, [1.0])
    reply = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE).body
    assert (reply["status"], reply["request_counts"]["succeeded"]) == ("completed", 3)


def test_a_reused_keys_new_batch_never_takes_the_earlier_batchs_file_for_its_own(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch under a key, ended with its results file, whose retention then passed
    old_id = _submit(harness, key="weekly", requests=_requests(2, prefix="old")).body["id"]
    _run_lane(harness)
    old = _stored(harness, old_id)
    assert old.status is BatchStatus.COMPLETED and old.results_key
    _retention_ends_at(harness, old_id, 1)
    # And a new batch under the key (the same id), its items all ended, finalizing, whose
    # results file's upload S3's lifecycle rule aborted (left incomplete for a day)
    assert _submit(harness, key="weekly", requests=_requests(3, prefix="new")).body["id"] == old_id
    real_compile = ResultsCompiler.compile
    monkeypatch.setattr(ResultsCompiler, "compile", lambda self, batch, remaining: None)
    _run_lane(harness)
    monkeypatch.setattr(ResultsCompiler, "compile", real_compile)
    s3 = aws.client("s3")
    upload = s3.create_multipart_upload(Bucket="llmq-payloads", Key=old.results_key)["UploadId"]
    s3.abort_multipart_upload(Bucket="llmq-payloads", Key=old.results_key, UploadId=upload)
    _reset(harness, old_id, upload)
    # When a worker writes its file
    finalizing = _stored(harness, old_id)
    QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    ).enqueue_expand(old_id, finalizing.lane, finalizing.tenant_id)
    _run_lane(harness)
    # Then the new batch ends with a file of its own three items, not the earlier batch's two
    ended = _stored(harness, old_id)
    assert ended.status is BatchStatus.COMPLETED and ended.results_key != old.results_key
    assert [line["custom_id"] for line in _file_lines(ended)] == ["new-0", "new-1", "new-2"]


def _reset(harness: Harness, batch_id: str, upload_id: str | None = None) -> None:
    """Back to finalizing, its file not begun (as if the first expand message were only now
    due), or begun on `upload_id` with no part checkpointed."""
    values: dict[str, Any] = {":finalizing": {"S": "finalizing"}, ":zero": {"N": "0"}, ":none": {"L": []}}
    sets = "SET #st = :finalizing, compile_next = :zero, compile_parts = :none"
    removed = "REMOVE results_key, finished_ms"
    if upload_id is None:
        removed += ", compile_upload_id"
    else:
        sets += ", compile_upload_id = :upload"
        values[":upload"] = {"S": upload_id}
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": f"batch#{batch_id}"}},
        UpdateExpression=f"{sets} {removed}",
        ExpressionAttributeNames={"#st": "status"},
        ExpressionAttributeValues=values,
    )


def test_a_batch_canceled_before_its_items_were_written_names_them_in_its_file(harness: Harness) -> None:
    # Given a batch canceled at once: none of its items is ever written
    batch_id = _submit(harness, requests=_requests(5)).body["id"]
    assert harness.api("POST", f"/v1/batches/{batch_id}/cancel", tenant=ENTERPRISE).status == 202
    _run_lane(harness)
    batch = _stored(harness, batch_id)
    assert batch.status is BatchStatus.CANCELED
    # Then its file names each item by its custom_id, as the paged results do
    paged, _ = _results(harness, batch_id)
    in_file = _file_lines(batch)
    assert [(line["custom_id"], line["status"]) for line in in_file] == [
        (f"item-{index}", "canceled") for index in range(5)
    ]
    assert [line["custom_id"] for line in paged] == [line["custom_id"] for line in in_file]


@pytest.mark.parametrize("upload", ["completed", "aborted"])
def test_a_file_whose_upload_is_gone_ends_the_batch_with_a_file(harness: Harness, upload: str) -> None:
    # Given a batch whose file was written, then (as after a crash before its terminal write)
    # finalizing again on that same upload: completed already, or aborted by S3's lifecycle
    # rule with no file written
    batch_id = _submit(harness, requests=_requests(3)).body["id"]
    _run_lane(harness)
    done = _stored(harness, batch_id)
    assert done.results_key is not None and done.compile_upload_id is not None
    s3 = aws.client("s3")
    upload_id = done.compile_upload_id
    if upload == "aborted":
        s3.delete_object(Bucket="llmq-payloads", Key=done.results_key)
        upload_id = s3.create_multipart_upload(Bucket="llmq-payloads", Key=done.results_key)["UploadId"]
        s3.abort_multipart_upload(Bucket="llmq-payloads", Key=done.results_key, UploadId=upload_id)
    _reset(harness, batch_id, upload_id)
    # When the worker looks again (the reconciler's poke: an expand message)
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    queues.enqueue_expand(batch_id, done.lane, done.tenant_id)
    _run_lane(harness)
    # Then the batch ended with its file whole: the completed one kept, the aborted one rewritten
    ended = _stored(harness, batch_id)
    assert ended.status is BatchStatus.COMPLETED
    assert [line["custom_id"] for line in _file_lines(ended)] == [f"item-{index}" for index in range(3)]


def test_a_finalizing_batch_whose_file_was_never_asked_for_is_asked_for_after_the_grace(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose finalizing began just now, its expand message not (yet) sent
    batch_id = _submit(harness, requests=_requests(2)).body["id"]
    _run_lane(harness)
    _reset(harness, batch_id)
    clock = {"now": time.time()}
    batches = BatchRepository(
        harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=lambda: clock["now"]
    )
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": f"batch#{batch_id}"}},
        UpdateExpression="SET finalizing_ms = :now, compile_queued = :false",
        ExpressionAttributeValues={":now": {"N": str(int(clock["now"] * 1000))}, ":false": {"BOOL": False}},
    )
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    # When another item's worker looks within the grace, its message comes back after the rest of it
    with pytest.raises(StoreUnavailable) as early:
        settle(batches, queues, batch_id)
    assert early.value.retry_after is not None and 1 <= early.value.retry_after <= RESULTS_ASK_GRACE_SECONDS
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0
    # And after the grace, the look asks for the file itself, once
    clock["now"] += RESULTS_ASK_GRACE_SECONDS + 1
    assert settle(batches, queues, batch_id) is None
    assert _stored(harness, batch_id).compile_queued
    assert settle(batches, queues, batch_id) is None
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 1
    # And the worker writes the file and ends the batch
    _run_lane(harness)
    assert _stored(harness, batch_id).status is BatchStatus.COMPLETED


@pytest.mark.parametrize(
    ("kind", "operation"),
    [
        (FaultKind.SERVER_ERROR, "s3.UploadPart"),
        (FaultKind.THROTTLE, "s3.CompleteMultipartUpload"),
        (FaultKind.APPLIED_LOST, "dynamodb.UpdateItem"),
        (FaultKind.APPLIED_RETRIED, "dynamodb.UpdateItem"),
    ],
)
def test_a_file_cut_by_an_aws_fault_or_asked_for_twice_holds_each_line_once(
    harness: Harness,
    provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
    kind: FaultKind,
    operation: str,
) -> None:
    # Given a batch of twelve 1 MiB lines (three parts), finalizing, asked for twice (a
    # duplicate expand message), and one AWS fault on the way
    def padded(batch: BatchRecord, index: int, job: JobRecord | None, names: dict[int, str]) -> bytes:
        return json.dumps({"job_id": item_job_id(batch.id, index), "pad": "x" * MIB}).encode()

    monkeypatch.setattr(ResultsCompiler, "line_bytes", staticmethod(padded))
    batch_id = _submit(harness, requests=_requests(12)).body["id"]
    _run_lane(harness)
    _reset(harness, batch_id)
    done = _stored(harness, batch_id)
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    faults = AwsFaults()
    faults.wrap_handler("worker", harness.worker())
    try:
        faults.arm(kind, operation, function="worker")
        for _ in range(2):
            queues.enqueue_expand(batch_id, done.lane, done.tenant_id)
        _run_lane(harness)
        assert faults.fired, "the fault never fired"
    finally:
        faults.disarm()
    # Then the batch ended once, its file whole: each line once, in order
    ended = _stored(harness, batch_id)
    assert ended.status is BatchStatus.COMPLETED
    assert [line["job_id"] for line in _file_lines(ended)] == [
        item_job_id(batch_id, index) for index in range(12)
    ]


def test_result_lines_read_the_items_results_not_their_prompts(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = {"max_prompt_chars": 100_000, "max_body_bytes": 65536, "wait_poll_seconds": 0.05}
    harness = Harness(moto_stack, integration_config(provider, limits=limits), monkeypatch)
    # Given a batch of five items whose prompts are 90 KB each (most of each item)
    prompt = "p" * 90_000
    requests = [{"custom_id": f"c{n}", "body": {"prompt": f"{n} {prompt}"}} for n in range(5)]
    # And every item read for a result line weighed as DynamoDB returns it
    read: list[int] = []
    many = BatchRepository._get_many

    def weighed(self: BatchRepository, keys: list[dict[str, Any]], *args: Any) -> dict[str, dict[str, Any]]:
        found = many(self, keys, *args)
        read.extend(item_size_bytes(item) for pk, item in found.items() if pk.startswith("job_"))
        return found

    monkeypatch.setattr(BatchRepository, "_get_many", weighed)
    reply = _submit(harness, requests=requests)
    assert reply.status == 202, reply.body
    batch_id = reply.body["id"]
    # When it runs, its results file is written, and a client pages through its results
    _run_lane(harness)
    lines = _file_lines(_stored(harness, batch_id))
    paged, _ = _results(harness, batch_id)
    # Then each line is there, and no read carried a prompt: ten item reads of a few hundred bytes
    assert [line["status"] for line in lines] == ["succeeded"] * 5 == [line["status"] for line in paged]
    assert len(read) == 10 and max(read) < 2_000, read


def _item_gone(harness: Harness, batch_id: str, index: int, deleted: bool) -> None:
    """Item `index` past its own retention: deleted by DynamoDB's TTL, or not yet (which
    takes up to days, and reads must take for gone, DESIGN §3.8)."""
    key = {"pk": {"S": item_job_id(batch_id, index)}}
    if deleted:
        harness.ddb.delete_item(TableName=harness.stack.jobs_table, Key=key)
        return
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key=key,
        UpdateExpression="SET expires_at = :e",
        ExpressionAttributeValues={":e": {"N": str(int(time.time()) - 60)}},
    )


@pytest.mark.parametrize("deleted", [True, False], ids=["ttl-deleted", "expired-not-yet-deleted"])
def test_an_ended_batch_kept_past_its_items_answers_410_not_queued_lines_for_items_ttl_deleted(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch, deleted: bool
) -> None:
    """A batch that ends near its retention is kept for its webhook's retries, longer than an
    item that ended before it: once that item's retention has passed, a page cannot say what it
    was (hunt 253: its line read `queued` in a `completed` batch). The page says so, and where
    the line is, whether or not the TTL has deleted it yet (hunt 301: until then the page
    listed it, linking to its 404); a page of items still kept is answered as before."""
    harness = Harness(moto_stack, integration_config(provider, retention_days=1), monkeypatch)
    batch_id = _submit(harness, requests=_requests(2)).body["id"]
    _run_lane(harness)
    batch = _stored(harness, batch_id)
    assert batch.status is BatchStatus.COMPLETED and batch.results_key
    _item_gone(harness, batch_id, 0, deleted)
    assert harness.api("GET", f"/v1/jobs/{item_job_id(batch_id, 0)}", tenant=ENTERPRISE).status == 404
    got = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE)
    assert (got.status, got.body["request_counts"]["succeeded"]) == (200, 2)
    page = harness.api("GET", f"/v1/batches/{batch_id}/results", tenant=ENTERPRISE)
    assert (page.status, page.code) == (410, "batch_results_expired"), page.body
    assert "results_file_url" in page.body["detail"]
    # And a page of the items still kept is answered as before
    lines, _ = _results(harness, batch_id, cursor="1")
    assert [line["status"] for line in lines] == ["succeeded"]


@pytest.mark.parametrize("deleted", [True, False], ids=["ttl-deleted", "expired-not-yet-deleted"])
def test_a_file_written_after_an_items_ttl_deletion_says_it_ended_with_its_outcome_gone(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch, deleted: bool
) -> None:
    """A batch whose end came late, after DynamoDB's TTL deleted an item that had ended well
    before it, writes that item's line as ended with its outcome gone (hunt 282: `queued`, in
    a `completed` batch's file, which a client would have submitted again)."""
    harness = Harness(moto_stack, integration_config(provider, retention_days=1), monkeypatch)
    batch_id = _submit(harness, requests=_requests(2)).body["id"]
    # Given a batch whose items all ended, its file not yet written
    _run_lane(harness)
    _reset(harness, batch_id)
    assert _stored(harness, batch_id).status is BatchStatus.FINALIZING
    # (an item whose own retention ended before its batch's, deleted by the TTL or not yet)
    _item_gone(harness, batch_id, 0, deleted)
    # When a worker writes its file
    _expander(harness).expand(batch_id, lambda: 300)
    # Then the batch ends with both counted, and the deleted item's line says it expired,
    # its outcome gone, not that it waits to run
    ended = _stored(harness, batch_id)
    assert ended.status is BatchStatus.COMPLETED
    assert ended.final_counts is not None and ended.final_counts.succeeded == 2
    lines = _file_lines(ended)
    assert [(line["custom_id"], line["status"]) for line in lines] == [
        ("item-0", "expired"),
        ("item-1", "succeeded"),
    ]
    assert lines[0]["error"]["retryable"] is False
    assert "counts only" in lines[0]["error"]["message"]
