"""Batches' pure parts: item ids, the count aggregation, the final status, the stored requests."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.batch_runs import _blocked_chunk_wait, encode_requests, item_record, parse_requests
from llmq.batch_uploads import split_lines
from llmq.batches import BatchRecord, batch_of, final_status, item_job_id, new_batch_id, tally
from llmq.config import LlmqConfig
from llmq.job_record import new_job_id
from llmq.models import BatchItemRequest, BatchStatus, JobRequest, JobStatus, WebhookEvent
from llmq.payloads import PayloadStore

CONFIG = LlmqConfig()


def _batch(total: int = 10, **changes: object) -> BatchRecord:
    record = BatchRecord(
        id=new_batch_id("ten_a", None, 1_700_000_000_000),
        tenant_id="ten_a",
        status=BatchStatus.IN_PROGRESS,
        lane="high",
        total=total,
        requests_ref="inputs/batches/x.jsonl",
        request_hash="h",
        created_ms=1,
        expires_at=2,
        expanded=total,
    )
    return record.model_copy(update=changes)


def _shard(**counts: int) -> dict[str, dict[str, str]]:
    return {name: {"N": str(value)} for name, value in counts.items()}


@given(
    tenant=st.text(min_size=1, max_size=20),
    key=st.none() | st.text(min_size=1, max_size=40),
    index=st.integers(min_value=0, max_value=99_999),
)
def test_an_items_id_names_its_batch_and_index_and_no_other_job_id_does(
    tenant: str, key: str | None, index: int
) -> None:
    batch_id = new_batch_id(tenant, key, 1_700_000_000_000)
    job_id = item_job_id(batch_id, index)
    assert batch_of(job_id) == (batch_id, index)
    # Still a job id as the API's path pattern takes it
    assert job_id.startswith("job_") and job_id[4:].isalnum() and job_id == job_id.lower()
    # A job submitted alone is never taken for an item
    assert batch_of(new_job_id(tenant, key, 1_700_000_000_000)) is None


def test_keyed_batch_ids_are_stable_and_differ_from_keyed_job_ids() -> None:
    assert new_batch_id("ten_a", "k", 1) == new_batch_id("ten_a", "k", 2)
    assert new_batch_id("ten_a", "k", 1) != new_batch_id("ten_b", "k", 1)
    assert new_batch_id("ten_a", "k", 1)[4:] != new_job_id("ten_a", "k", 1)[4:]


def test_counts_sum_the_shards_and_what_runs_and_the_rest_is_queued() -> None:
    counts = tally(_batch(10), [_shard(succeeded=3, failed=1), _shard(succeeded=2, canceled=1)], running=2)
    assert counts.model_dump() == {
        "total": 10,
        "queued": 1,
        "running": 2,
        "succeeded": 5,
        "failed": 1,
        "canceled": 1,
        "expired": 0,
    }


def test_items_never_written_count_as_canceled_and_running_never_exceeds_what_is_left() -> None:
    batch = _batch(10, expanded=4, unexpanded_canceled=6, cancel_requested=True)
    counts = tally(batch, [_shard(canceled=3)], running=5)
    assert (counts.canceled, counts.running, counts.queued) == (9, 1, 0)


@given(
    st.lists(st.sampled_from(["succeeded", "failed", "canceled", "expired"]), max_size=50),
    st.integers(1, 16),
    st.integers(0, 50),
)
def test_counts_add_up_to_the_total_whatever_the_shards_hold(
    ended: list[str], shards: int, running: int
) -> None:
    # The ends spread over `shards` shards, as count_end spreads them by index
    spread: list[dict[str, int]] = [{} for _ in range(shards)]
    for index, status in enumerate(ended):
        spread[index % shards][status] = spread[index % shards].get(status, 0) + 1
    counts = tally(_batch(50), [_shard(**shard) for shard in spread], running=running)
    assert (
        counts.queued + counts.running + counts.succeeded + counts.failed + counts.canceled + counts.expired
        == 50
    )
    assert (counts.succeeded, counts.expired) == (ended.count("succeeded"), ended.count("expired"))
    assert counts.running == min(running, 50 - len(ended))


def test_the_final_status_is_canceled_then_expired_then_completed() -> None:
    ended = tally(_batch(2), [_shard(succeeded=1, expired=1)], running=0)
    assert final_status(_batch(2, cancel_requested=True), ended) is BatchStatus.CANCELED
    assert final_status(_batch(2), ended) is BatchStatus.EXPIRED
    assert (
        final_status(_batch(2), tally(_batch(2), [_shard(succeeded=1, failed=1)], 0)) is BatchStatus.COMPLETED
    )


@given(st.lists(st.text(min_size=1, max_size=50), min_size=1, max_size=5))
def test_stored_requests_read_back_as_written_whatever_their_text(prompts: list[str]) -> None:
    items = [
        BatchItemRequest(custom_id=f"c{index}", body=JobRequest(prompt=prompt))
        for index, prompt in enumerate(prompts)
    ]
    assert parse_requests(encode_requests(items)) == items


def test_an_item_becomes_a_queued_job_of_the_batch_with_only_the_item_events_asked() -> None:
    batch = _batch(3, webhook_url="https://h.example/x", item_events=[WebhookEvent.SUCCEEDED], deadline_ms=99)
    item = BatchItemRequest(custom_id="ticket-7", body=JobRequest(prompt="hi", metadata={"a": "b"}))
    job = item_record(batch, 2, item, CONFIG, now_ms=5)
    assert (job.id, job.batch_id, job.custom_id) == (item_job_id(batch.id, 2), batch.id, "ticket-7")
    assert (job.status, job.lane, job.tenant_id, job.shared) == (JobStatus.QUEUED, "high", "ten_a", True)
    assert (job.webhook_url, job.webhook_events, job.deadline_ms) == (
        "https://h.example/x",
        [WebhookEvent.SUCCEEDED],
        99,
    )
    assert job.metadata == {"a": "b"}
    quiet = item_record(_batch(3, webhook_url="https://h.example/x"), 0, item, CONFIG, now_ms=5)
    assert (quiet.webhook_url, quiet.webhook_events) == (None, [])


# ---- an uploaded file's lines, from S3 chunks ----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=12),
    trailing=st.booleans(),
)
def test_split_lines_reads_the_same_lines_however_the_stream_is_cut(
    lines: list[bytes], cuts: list[int], trailing: bool
) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing and lines else b"")
    chunks, at = [], 0
    for cut in cuts:
        chunks.append(data[at : at + cut])
        at += cut
    chunks.append(data[at:])
    limit = 20
    read = list(split_lines(chunks, limit))
    # Every byte is accounted for, and each line comes back whole, or as None past the limit
    assert sum(size for _, size in read) == len(data)
    expected = list(lines)
    if expected and not trailing and expected[-1] == b"":
        expected.pop()  # a final empty line without its newline is no line
    assert [line for line, _ in read] == [line if len(line) <= limit else None for line in expected]


def test_a_403_for_an_upload_is_no_such_upload() -> None:
    # The roles cannot list the bucket, so S3 answers a missing key 403, not 404
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(s3) as stub:
        stub.add_client_error("head_object", service_error_code="403", http_status_code=403)
        stub.add_client_error("head_object", service_error_code="404", http_status_code=404)
        store = PayloadStore("llmq-payloads", s3=s3)
        assert store.stat("inputs/uploads/ten_a/upl_x.jsonl") is None
        assert store.stat("inputs/uploads/ten_a/upl_y.jsonl") is None


def test_an_item_stored_under_a_looser_bound_is_still_read() -> None:
    # Given an inline batch stored by a version that took any number of stop sequences
    import json

    from llmq.batch_requests import StoredRequests
    from llmq.models import BatchItemRequest
    from tests.support.stores import InMemoryBlobs

    stops = [f"s{index}" for index in range(17)]
    line = json.dumps({"custom_id": "a", "body": {"prompt": "p", "params": {"stop": stops}}}).encode()
    blobs = InMemoryBlobs()
    blobs.put("inputs/batches/x.jsonl", line + b"\n")
    # When its expansion reads the item, then it is read as stored (a request today may not)
    assert StoredRequests(blobs, _batch(total=1)).item(0).body.params.stop == stops
    with pytest.raises(ValueError, match="at most 16"):
        BatchItemRequest.model_validate_json(line)


def test_a_refused_bodys_replay_look_builds_one_error_not_one_per_element() -> None:
    """The replay look reads a body the deployment refused with the bounds any release accepted
    (`StoredJobRequest`, `stored_batch_request_model`), where `stop` is unbounded. A list of
    half a million wrong elements (a 1 MiB body) must be one error, not one each: that many
    errors took about 300 MB, more than the api function has."""
    from pydantic import ValidationError

    from llmq.config import LlmqConfig
    from llmq.models import StoredJobRequest, stored_batch_request_model

    stops = "[" + ",".join(["1"] * 500_000) + "]"
    job = '{"prompt": "x", "params": {"stop": ' + stops + "}}"
    with pytest.raises(ValidationError) as refused:
        StoredJobRequest.model_validate_json(job)
    assert refused.value.error_count() <= 3
    batch_model = stored_batch_request_model(LlmqConfig().batches.max_requests)
    batch = '{"requests": [{"custom_id": "a", "body": ' + job + "}]}"
    with pytest.raises(ValidationError) as refused:
        batch_model.model_validate_json(batch)
    assert refused.value.error_count() <= 3
    # And more items than the deployment takes are refused by their count, as its own schema does
    many = '{"requests": [' + ",".join(['{"custom_id": "a", "body": {"prompt": "x"}}'] * 20_001) + "]}"
    with pytest.raises(ValidationError) as refused:
        batch_model.model_validate_json(many)
    assert [error["type"] for error in refused.value.errors()] == ["too_long"]
    # While a stored body's many stop sequences are still read as they were accepted
    assert (
        len(StoredJobRequest.model_validate_json(job.replace('"1"', '"s"').replace("1", '"s"')).params.stop)
        == 500_000
    )


@pytest.mark.parametrize(
    ("deadline_in_s", "wait"),
    [(None, 60), (600, 60), (10, 5), (1, 2), (-3600, 60)],
    ids=["none", "far", "near", "imminent", "passed"],
)
def test_a_blocked_chunk_is_looked_at_again_before_the_deadline_and_once_a_minute_after_it(
    deadline_in_s: int | None, wait: int
) -> None:
    # (hunt 304: past the deadline it looked every 2 s, for minutes, though its items expire
    # at their claims whatever it finds)
    now_ms = 1_700_000_000_000
    deadline_ms = None if deadline_in_s is None else now_ms + deadline_in_s * 1000
    assert _blocked_chunk_wait(_batch(1, deadline_ms=deadline_ms), now_ms) == wait
