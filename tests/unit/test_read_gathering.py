"""The reads after a worker batch's claims, gathered into one request (llmq.read_gathering)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from llmq.errors import StoreUnavailable
from llmq.read_gathering import MAX_KEYS, GatheredClaim, GatheredReads


class Store:
    """The items a fetch finds, and each request it was asked for."""

    def __init__(self, present: set[str], fails: bool = False) -> None:
        self.present = present
        self.fails = fails
        self.requests: list[list[str]] = []
        self._lock = threading.Lock()

    def fetch(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        with self._lock:
            self.requests.append(list(keys))
        if self.fails:
            raise StoreUnavailable("dynamodb.BatchGetItem: ThrottlingException after retries")
        return {key: {"pk": {"S": key}} for key in keys if key in self.present}


def _batch_of_claims(reads: GatheredReads, keys: list[str]) -> dict[str, Any]:
    """Each key claimed and then read on a thread of its own, as a worker batch's records are;
    every claim is in flight before any answers."""
    answers: dict[str, Any] = {}
    all_claiming = threading.Barrier(len(keys))

    def record(key: str) -> None:
        claim = reads.claim(key)
        with claim.calling():
            all_claiming.wait()
        try:
            answers[key] = claim.read()
        except BaseException as exc:
            answers[key] = exc

    threads = [threading.Thread(target=record, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return answers


def test_the_reads_of_a_batchs_claims_go_as_one_request() -> None:
    # Given ten claims in flight at once, with a long enough wait that only their answers decide
    store = Store({f"job_{n}" for n in range(10)})
    reads = GatheredReads(store.fetch, max_wait_seconds=30)
    # When each reads its job as its claim answers
    answers = _batch_of_claims(reads, [f"job_{n}" for n in range(10)])
    # Then one request read all ten, and each read got its own item
    assert len(store.requests) == 1
    assert sorted(store.requests[0]) == sorted(answers)
    assert all(item == {"pk": {"S": key}} for key, item in answers.items())
    assert (reads.requests, reads.reads) == (1, 10)


class NeverWaits(threading.Condition):
    """A gatherer's condition on which any wait fails the test: what must go at once, does."""

    def wait(self, timeout: float | None = None) -> bool:
        raise AssertionError("the read waited")


def _never_waiting(store: Store) -> GatheredReads:
    reads = GatheredReads(store.fetch, max_wait_seconds=30)
    reads._changed = NeverWaits()
    return reads


def _answered(reads: GatheredReads, key: str) -> GatheredClaim:
    """A claim whose one call has answered (applied)."""
    claim = reads.claim(key)
    with claim.calling():
        pass
    return claim


def test_a_read_with_no_claim_in_flight_goes_at_once_and_alone() -> None:
    store = Store({"job_a"})
    reads = _never_waiting(store)
    assert _answered(reads, "job_a").read() == {"pk": {"S": "job_a"}}
    assert store.requests == [["job_a"]]


def test_a_claim_pausing_between_its_tries_holds_no_read_back() -> None:
    # Given a claim whose first call was refused (a conflict) and which now pauses to retry
    store = Store({"job_a"})
    reads = _never_waiting(store)
    retrying = reads.claim("job_b")
    with pytest.raises(RuntimeError), retrying.calling():
        raise RuntimeError("TransactionConflict")
    # When another claim answers and reads, Then it goes at once
    assert _answered(reads, "job_a").read() == {"pk": {"S": "job_a"}}
    assert store.requests == [["job_a"]]


def test_the_last_claims_read_goes_with_the_others_however_late_it_asks() -> None:
    # Given a claim whose read waits for a second claim's call in flight
    store = Store({"job_a", "job_b"})
    fetching = threading.Event()
    fetch = store.fetch

    def fetch_and_say(keys: list[str]) -> dict[str, dict[str, Any]]:
        fetching.set()
        return fetch(keys)

    reads = GatheredReads(fetch_and_say, max_wait_seconds=30)
    late = reads.claim("job_b")
    answers: dict[str, Any] = {}
    with late.calling():
        first = reads.claim("job_a")
        with first.calling():
            pass
        waiting = threading.Thread(target=lambda: answers.update(job_a=first.read()))
        waiting.start()
    # When the second's call answers, and it asks for its read only after the first's request
    # has begun (a thread descheduled between the two)
    assert fetching.wait(timeout=30)
    answers["job_b"] = late.read()
    waiting.join(timeout=30)
    # Then its read went in that request all the same: one request for both
    assert store.requests == [["job_a", "job_b"]]
    assert answers == {"job_a": {"pk": {"S": "job_a"}}, "job_b": {"pk": {"S": "job_b"}}}


def test_a_failed_requests_botocore_error_keeps_its_modeled_class() -> None:
    import boto3

    client = boto3.client(
        "dynamodb", region_name="eu-west-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    missing = client.exceptions.ResourceNotFoundException(
        {"Error": {"Code": "ResourceNotFoundException", "Message": "no table"}}, "BatchGetItem"
    )

    def fails(keys: list[str]) -> dict[str, dict[str, Any]]:
        raise missing

    answers = _batch_of_claims(GatheredReads(fails, max_wait_seconds=30), ["job_a", "job_b"])
    for answer in answers.values():
        assert isinstance(answer, client.exceptions.ResourceNotFoundException) and answer is not missing
        assert answer.response["Error"]["Code"] == "ResourceNotFoundException"
        assert answer.__cause__ is missing


def test_a_read_waits_for_a_claim_in_flight_no_longer_than_its_limit() -> None:
    # Given a claim whose call stays in flight (botocore retrying it)
    store = Store({"job_a"})
    reads = GatheredReads(store.fetch, max_wait_seconds=0.05)
    stuck = threading.Event()
    release = threading.Event()

    def stuck_claim() -> None:
        with reads.claim("job_b").calling():
            stuck.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=stuck_claim)
    thread.start()
    assert stuck.wait(timeout=30)
    try:
        # When another job's claim has answered and it reads
        item = _answered(reads, "job_a").read()
        # Then it read alone while the other claim was still in flight
        assert item == {"pk": {"S": "job_a"}}
        assert store.requests == [["job_a"]]
        assert not release.is_set()
    finally:
        release.set()
        thread.join(timeout=30)


def test_a_missing_item_reads_as_none_among_found_ones() -> None:
    store = Store({"job_0", "job_2"})
    answers = _batch_of_claims(GatheredReads(store.fetch, max_wait_seconds=30), ["job_0", "job_1", "job_2"])
    assert answers == {"job_0": {"pk": {"S": "job_0"}}, "job_1": None, "job_2": {"pk": {"S": "job_2"}}}
    assert len(store.requests) == 1


def test_a_failed_request_fails_every_read_it_carried() -> None:
    # Given a store that throttles the gathered request past botocore's retries
    store = Store({f"job_{n}" for n in range(4)}, fails=True)
    answers = _batch_of_claims(
        GatheredReads(store.fetch, max_wait_seconds=30), [f"job_{n}" for n in range(4)]
    )
    # Then each claim's read raises as its own GetItem would have: none reads as a missing job,
    # and each has an exception of its own (one object raised on four threads would weave their
    # tracebacks together), caused by the request's
    assert len(store.requests) == 1
    assert all(isinstance(answer, StoreUnavailable) for answer in answers.values()), answers
    assert len({id(answer) for answer in answers.values()}) == 4
    causes = {id(answer.__cause__) for answer in answers.values()}
    assert len(causes) == 1 and None not in {answer.__cause__ for answer in answers.values()}


def test_an_interrupted_request_never_reads_as_missing_items() -> None:
    # Given two claims whose gathered request is interrupted (by what is no Exception)
    def interrupted(keys: list[str]) -> dict[str, dict[str, Any]]:
        raise KeyboardInterrupt

    reads = GatheredReads(interrupted, max_wait_seconds=30)
    answers = _batch_of_claims(reads, ["job_a", "job_b"])
    # Then the read that made it is interrupted, and the other fails: neither reads as no job
    kinds = sorted(type(answer).__name__ for answer in answers.values())
    assert kinds == ["KeyboardInterrupt", "RuntimeError"], answers
    # And the gatherer still serves the next read
    reads._fetch = Store({"job_c"}).fetch
    assert reads.read("job_c") == {"pk": {"S": "job_c"}}


def test_more_reads_than_one_request_holds_are_split() -> None:
    keys = [f"job_{n}" for n in range(MAX_KEYS + 5)]
    store = Store(set(keys))
    answers = _batch_of_claims(GatheredReads(store.fetch, max_wait_seconds=30), keys)
    assert all(len(request) <= MAX_KEYS for request in store.requests)
    assert sorted(key for request in store.requests for key in request) == sorted(keys)
    assert all(answers[key] == {"pk": {"S": key}} for key in keys)


def test_without_gathering_each_read_goes_alone_even_with_claims_in_flight() -> None:
    # (the benchmark's baseline: every claimed job read by a request of its own, as before)
    store = Store({f"job_{n}" for n in range(5)})
    answers = _batch_of_claims(
        GatheredReads(store.fetch, max_wait_seconds=30, gather=False), sorted(store.present)
    )
    assert sorted(store.requests) == [[key] for key in sorted(store.present)]
    assert all(answers[key] == {"pk": {"S": key}} for key in store.present)


@pytest.fixture
def stubbed_jobs(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A JobRepository on a real dynamodb client whose answers botocore's Stubber gives."""
    import boto3
    from botocore.stub import Stubber

    from llmq.config import LlmqConfig
    from llmq.jobs import JobRepository

    client = boto3.client(
        "dynamodb", region_name="eu-west-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    monkeypatch.setattr("llmq.jobs.time.sleep", lambda seconds: None)
    with Stubber(client) as stubber:
        yield JobRepository("jobs", LlmqConfig(), dynamodb=client), stubber
        stubber.assert_no_pending_responses()


def _keys(*job_ids: str) -> dict[str, Any]:
    return {"jobs": {"Keys": [{"pk": {"S": job_id}} for job_id in job_ids], "ConsistentRead": True}}


def test_one_key_is_read_by_getitem_and_many_by_batchgetitem_until_none_is_left(stubbed_jobs: Any) -> None:
    jobs, stubber = stubbed_jobs
    stubber.add_response(
        "get_item",
        {"Item": {"pk": {"S": "job_a"}}},
        {"TableName": "jobs", "Key": {"pk": {"S": "job_a"}}, "ConsistentRead": True},
    )
    # (DynamoDB leaves keys unprocessed past 16 MB of answer, or when throttled)
    stubber.add_response(
        "batch_get_item",
        {"Responses": {"jobs": [{"pk": {"S": "job_b"}}]}, "UnprocessedKeys": _keys("job_c")},
        {"RequestItems": _keys("job_b", "job_c")},
    )
    stubber.add_response(
        "batch_get_item", {"Responses": {"jobs": [{"pk": {"S": "job_c"}}]}}, {"RequestItems": _keys("job_c")}
    )
    assert jobs._read_items(["job_a"]) == {"job_a": {"pk": {"S": "job_a"}}}
    assert jobs._read_items(["job_b", "job_c"]) == {
        "job_b": {"pk": {"S": "job_b"}},
        "job_c": {"pk": {"S": "job_c"}},
    }


def test_keys_dynamodb_never_processes_are_a_store_fault_not_missing_jobs(stubbed_jobs: Any) -> None:
    jobs, stubber = stubbed_jobs
    for _ in range(8):
        stubber.add_response(
            "batch_get_item",
            {"Responses": {"jobs": []}, "UnprocessedKeys": _keys("job_a", "job_b")},
            {"RequestItems": _keys("job_a", "job_b")},
        )
    with pytest.raises(StoreUnavailable, match="unprocessed"):
        jobs._read_items(["job_a", "job_b"])
