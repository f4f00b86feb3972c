"""A batch whose worker crashes on it every time (issue 15): its expand message dead-letters,
is sent once more, and when that one dead-letters too, llmq gives up on what it was for and
says so in the batch's `errors` (`batch_crashed`), instead of the reconciler sending it again
for ever. Through the real worker, dead-letter and reconciler handlers against moto."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from llmq import aws
from llmq.batch_requests import StoredRequests
from llmq.batch_results import ResultsCompiler, ResultsFileStalled
from llmq.batch_uploads import UploadScanner
from llmq.batches import BatchRepository, batch_key, item_job_id
from llmq.errors import StoreContended
from llmq.jobs import JobRepository
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.shares import ShareRepository
from llmq.telemetry import MetricName
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, Harness, LambdaContextStub, emitted_metrics, load_handler
from tests.integration.test_batch_uploads import _upload
from tests.integration.test_batches import _reconciler_later

HIGH = "high"


@pytest.fixture
def harness(moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Harness:
    # Chunks of two items: a batch of five is three transactions, and a crash can fall between.
    return Harness(moto_stack, integration_config(provider, batches={"expand_chunk": 2}), monkeypatch)


def _submit(harness: Harness, count: int = 5) -> str:
    requests = [{"custom_id": f"c{n}", "body": {"prompt": f"say {n}"}} for n in range(count)]
    reply = harness.api("POST", "/v1/batches", body={"requests": requests}, tenant=ENTERPRISE)
    assert reply.status == 202, reply.body
    return str(reply.body["id"])


def _batch(harness: Harness, batch_id: str) -> dict[str, Any]:
    reply = harness.api("GET", f"/v1/batches/{batch_id}", tenant=ENTERPRISE)
    assert reply.status == 200
    return dict(reply.body)


def _expand_messages(harness: Harness) -> list[dict[str, Any]]:
    url = harness.stack.lane_queue_urls[HIGH]
    messages = harness.receive(url, visibility=0)
    return [message for message in messages if json.loads(message["Body"]).get("kind") == "expand"]


def _run_items(harness: Harness) -> None:
    """Every item message in the lane, through the worker (expand messages left alone)."""
    url = harness.stack.lane_queue_urls[HIGH]
    for _ in range(5):
        items = [
            m for m in harness.receive(url, visibility=0) if json.loads(m["Body"]).get("kind") != "expand"
        ]
        if not items:
            return
        harness.run_worker(url, items)


def _crash_then_dead_letter(harness: Harness) -> dict[str, Any]:
    """The batch's expand messages crash the worker, and (their receives exhausted, as SQS's
    redrive would move them) go to the lane's DLQ, where the dead-letter function handles
    them: the function's answer."""
    url, dlq = harness.stack.lane_queue_urls[HIGH], harness.stack.lane_dlq_urls[HIGH]
    messages = _expand_messages(harness)
    assert messages
    response = harness.run_worker(url, messages)
    failed = {failure["itemIdentifier"] for failure in response["batchItemFailures"]}
    assert failed == {message["MessageId"] for message in messages}
    for message in messages:
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        harness.sqs.send_message(QueueUrl=dlq, MessageBody=message["Body"])
    letters = harness.receive(dlq)
    answer: dict[str, Any] = load_handler("dead_letter").handler(
        harness.sqs_event(dlq, letters), LambdaContextStub()
    )
    # (what it reports failed would stay in the DLQ: the answer says so; the next call starts clean)
    for letter in letters:
        harness.sqs.delete_message(QueueUrl=dlq, ReceiptHandle=letter["ReceiptHandle"])
    return answer


def _crash(monkeypatch: pytest.MonkeyPatch, target: Any, name: str, when: Any = None) -> None:
    """`target.name` raises as an out-of-memory worker would stop, (where `when` says so)."""
    original = getattr(target, name)

    def crashing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if when is None or when(*args):
            raise RuntimeError("the worker died here")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(target, name, crashing)


def _crashed(batch: dict[str, Any]) -> bool:
    return [error["code"] for error in batch.get("errors") or []] == ["batch_crashed"]


def _dead_lettered(capsys: pytest.CaptureFixture[str]) -> list[str | None]:
    """The lanes of the JobDeadLettered counts the functions emitted since the last look."""
    return [
        record.get("lane")
        for record in emitted_metrics(capsys.readouterr().out, MetricName.JOB_DEAD_LETTERED)
    ]


def test_an_expansion_that_crashes_every_time_is_tried_once_more_then_canceled_with_its_reason(
    harness: Harness,
    provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a batch of five whose expansion crashes its worker at the third item, every time
    _crash(monkeypatch, StoredRequests, "item", when=lambda index: index >= 2)
    batch_id = _submit(harness)
    # When its expand message dead-letters
    assert _crash_then_dead_letter(harness)["batchItemFailures"] == []
    # Then it is sent once more, and the batch still runs (an inline batch is `validating`
    # until its expansion has begun)
    assert _batch(harness, batch_id)["status"] in ("validating", "in_progress")
    assert len(_expand_messages(harness)) == 1
    # When that one dead-letters too
    capsys.readouterr()
    assert _crash_then_dead_letter(harness)["batchItemFailures"] == []
    # Then the batch is canceling with its reason, counted as a crash once for the alarm
    # (hunt 305); the worker's next look (the message sent for it) and the two items written
    # end it, and no item reached the provider
    assert _dead_lettered(capsys) == [HIGH]
    _run_items(harness)
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, _expand_messages(harness))
    assert _batch(harness, batch_id)["status"] == "finalizing"
    # (its results file names the items never written from their stored requests, which
    # crashes too: the two looks then in flight dead-letter as one round, its message is sent
    # once more, and when that one dead-letters too it ends without the file)
    _crash_then_dead_letter(harness)
    assert _batch(harness, batch_id)["status"] == "finalizing"
    (again,) = _expand_messages(harness)
    assert json.loads(again["Body"])["redrive_round"] == 3  # the third round counted (never reset)
    _crash_then_dead_letter(harness)
    ended = _batch(harness, batch_id)
    assert (ended["status"], ended["request_counts"]["canceled"], ended["request_counts"]["total"]) == (
        "canceled",
        5,
        5,
    )
    assert _crashed(ended) and ended.get("results_file_url") is None
    assert _dead_lettered(capsys) == []  # (its one give-up counted already)
    assert len(provider.state.snapshot()["log"]) == 0
    # And the tenant's five active jobs are given back
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    assert shares.get(ENTERPRISE["tenant_id"]).active == 0


def test_the_same_dead_letter_handled_twice_is_sent_once_more_not_given_up(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose expansion crashes, and the dead-letter function that handles its
    # dead-lettered message twice (its own record retried)
    _crash(monkeypatch, StoredRequests, "item")
    batch_id = _submit(harness)
    url, dlq = harness.stack.lane_queue_urls[HIGH], harness.stack.lane_dlq_urls[HIGH]
    (message,) = _expand_messages(harness)
    harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    harness.sqs.send_message(QueueUrl=dlq, MessageBody=message["Body"])
    letters = harness.receive(dlq, visibility=0)
    for _ in range(2):
        load_handler("dead_letter").handler(harness.sqs_event(dlq, letters), LambdaContextStub())
    # Then it counts once: the batch runs on, with its message sent again (once per handling)
    running = _batch(harness, batch_id)
    assert running["status"] in ("validating", "in_progress") and not _crashed(running)
    assert len(_expand_messages(harness)) == 2


def test_two_copies_that_dead_letter_in_one_round_send_it_again_once_and_the_next_round_gives_up(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several expand messages of one batch can be in flight (a chunk's next, the reconciler's):
    when both crash and dead-letter, that is one round, answered once: each message carries
    the round it was sent in."""
    # Given a batch whose expansion crashes, with a second expand message in flight
    _crash(monkeypatch, StoredRequests, "item")
    batch_id = _submit(harness)
    url, dlq = harness.stack.lane_queue_urls[HIGH], harness.stack.lane_dlq_urls[HIGH]
    (original,) = _expand_messages(harness)
    harness.sqs.send_message(QueueUrl=url, MessageBody=original["Body"])
    copies = _expand_messages(harness)
    assert len(copies) == 2
    # When both dead-letter, one after the other
    for copy in copies:
        harness.dead_letter(HIGH, [copy])
    # Then the batch runs on, with its message sent again once
    running = _batch(harness, batch_id)
    assert running["status"] in ("validating", "in_progress") and not _crashed(running)
    (resent,) = _expand_messages(harness)
    assert json.loads(resent["Body"])["redrive_round"] == 1
    # And when the message sent again dead-letters too, llmq gives up on the batch
    harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=resent["ReceiptHandle"])
    load_handler("dead_letter").handler(harness.sqs_event(dlq, [resent]), LambdaContextStub())
    assert _crashed(_batch(harness, batch_id))


def test_a_message_of_the_round_before_a_step_and_its_copy_count_once_after_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step the batch gets past starts the give-up count afresh, not the rounds: the
    message sent again before it, still in flight, and a copy of it are one round."""
    # Given a batch whose expand message dead-lettered once and was sent again
    _crash(monkeypatch, StoredRequests, "item")
    batch_id = _submit(harness)
    url = harness.stack.lane_queue_urls[HIGH]
    assert _crash_then_dead_letter(harness)["batchItemFailures"] == []
    (resent,) = _expand_messages(harness)
    # And the batch got past a step meanwhile (as a chunk written does)
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key=batch_key(batch_id),
        UpdateExpression="REMOVE dead_letter_ids",
    )
    # When that message and a copy of it dead-letter, one after the other
    harness.sqs.send_message(QueueUrl=url, MessageBody=resent["Body"])
    copies = _expand_messages(harness)
    assert len(copies) == 2
    for copy in copies:
        harness.dead_letter(HIGH, [copy])
    # Then the batch runs on, with its message sent again once
    running = _batch(harness, batch_id)
    assert running["status"] in ("validating", "in_progress") and not _crashed(running)
    (again,) = _expand_messages(harness)
    assert json.loads(again["Body"])["redrive_round"] == 2


def test_an_upload_whose_validation_crashes_every_time_fails_and_admits_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an uploaded file whose validation crashes its worker every time
    _crash(monkeypatch, UploadScanner, "scan")
    upload_id = _upload(harness, '{"custom_id": "a", "body": {"prompt": "x"}}\n')
    reply = harness.api("POST", "/v1/batches", body={"upload_id": upload_id}, tenant=ENTERPRISE)
    assert reply.status == 202, reply.body
    batch_id = reply.body["id"]
    # When its expand message dead-letters twice
    _crash_then_dead_letter(harness)
    _crash_then_dead_letter(harness)
    # Then it failed with its reason, counted as a crash for the alarm (hunt 305), nothing was
    # admitted, and nothing more is asked of a worker
    failed = _batch(harness, batch_id)
    assert (failed["status"], failed["request_counts"]["total"]) == ("failed", 0)
    assert _crashed(failed)
    assert _dead_lettered(capsys) == [HIGH]
    assert (
        ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
        .get(ENTERPRISE["tenant_id"])
        .active
        == 0
    )
    assert _expand_messages(harness) == []


def test_a_results_file_that_crashes_every_time_ends_the_batch_without_it(
    harness: Harness,
    provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a batch of two whose items ran, and whose results file crashes its worker every time
    _crash(monkeypatch, ResultsCompiler, "compile")
    batch_id = _submit(harness, count=2)
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, _expand_messages(harness))  # the expansion
    _run_items(harness)
    assert _batch(harness, batch_id)["status"] == "finalizing"
    # When the message asking for the file dead-letters twice
    _crash_then_dead_letter(harness)
    assert _batch(harness, batch_id)["status"] == "finalizing"
    _crash_then_dead_letter(harness)
    # Then the batch ended with its counts, without a file, counted as a crash for the alarm
    # (hunt 305); its results stay readable by page
    ended = _batch(harness, batch_id)
    assert (ended["status"], ended["request_counts"]["succeeded"]) == ("completed", 2)
    assert ended.get("results_file_url") is None and _crashed(ended)
    assert _dead_lettered(capsys) == [HIGH]
    page = harness.api("GET", f"/v1/batches/{batch_id}/results", tenant=ENTERPRISE)
    assert page.status == 200


def test_a_give_up_cut_short_is_finished_when_its_dead_letter_is_retried(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch of five whose expansion crashes at its third item, dead-lettered once
    _crash(monkeypatch, StoredRequests, "item", when=lambda index: index >= 2)
    batch_id = _submit(harness)
    _crash_then_dead_letter(harness)
    # And a give-up whose share transaction conflicts (a claim of the tenant's at that moment)
    conflicts = iter([StoreContended("dynamodb.TransactWriteItems: TransactionConflict")])
    give_up = BatchRepository.give_up_expansion

    def conflicting(self: BatchRepository, batch: Any) -> bool:
        failure = next(conflicts, None)
        if failure is not None:
            raise failure
        return give_up(self, batch)

    monkeypatch.setattr(BatchRepository, "give_up_expansion", conflicting)
    # When the second dead letter's handling fails there, and SQS hands its record back
    url, dlq = harness.stack.lane_queue_urls[HIGH], harness.stack.lane_dlq_urls[HIGH]
    messages = _expand_messages(harness)
    harness.run_worker(url, messages)
    for message in messages:
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        harness.sqs.send_message(QueueUrl=dlq, MessageBody=message["Body"])
    letters = harness.receive(dlq, visibility=0)
    dead_letter = load_handler("dead_letter").handler
    assert dead_letter(harness.sqs_event(dlq, letters), LambdaContextStub())["batchItemFailures"]
    assert not dead_letter(harness.sqs_event(dlq, letters), LambdaContextStub())["batchItemFailures"]
    # Then the retry finished the give-up: the three items never written count as canceled,
    # and the tenant's active jobs are only the two written, which end canceled
    stored = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    batch = stored.find(batch_id)
    assert batch is not None and batch.cancel_requested and batch.unexpanded_canceled == 3
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    assert shares.get(ENTERPRISE["tenant_id"]).active == 2
    assert shares.get(ENTERPRISE["tenant_id"]).batch_active == 2
    _run_items(harness)
    harness.run_worker(url, _expand_messages(harness))
    assert _batch(harness, batch_id)["status"] in ("finalizing", "canceled")
    assert shares.get(ENTERPRISE["tenant_id"]).active == 0
    assert shares.get(ENTERPRISE["tenant_id"]).batch_active == 0


def test_the_count_starts_afresh_once_the_batch_gets_past_what_crashed(
    harness: Harness, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose expansion crashed once (a dead letter), then went through on its
    # message sent again
    crashing = {"expansion": True, "compile": True}
    _crash(monkeypatch, StoredRequests, "item", when=lambda index: crashing["expansion"])
    compile_file = ResultsCompiler.compile

    def compile_once_crashing(self: ResultsCompiler, *args: Any) -> Any:
        if crashing["compile"]:
            raise RuntimeError("the worker died here")
        return compile_file(self, *args)

    monkeypatch.setattr(ResultsCompiler, "compile", compile_once_crashing)
    batch_id = _submit(harness, count=2)
    _crash_then_dead_letter(harness)
    crashing["expansion"] = False
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, _expand_messages(harness))
    _run_items(harness)
    assert _batch(harness, batch_id)["status"] == "finalizing"
    # When its results file then crashes once too
    _crash_then_dead_letter(harness)
    # Then that is its first dead letter, not its second: sent again, not given up on
    assert _batch(harness, batch_id)["status"] == "finalizing"
    crashing["compile"] = False
    harness.run_worker(url, _expand_messages(harness))
    ended = _batch(harness, batch_id)
    assert ended["status"] == "completed" and ended["results_file_url"] and not ended.get("errors")


def test_a_batch_that_keeps_crashing_after_llmq_gave_up_leaves_the_reconcilers_sweep(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose expansion crashes, and whose winding down crashes too, every time
    _crash(monkeypatch, StoredRequests, "item")
    _crash(monkeypatch, BatchRepository, "give_up_expansion")
    batch_id = _submit(harness)
    assert not _crash_then_dead_letter(harness)["batchItemFailures"]  # sent again
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    stored = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    answers = []
    for _ in range(3):
        # (each time, another look at it: the reconciler's, which crashes a worker once more)
        answers.append(_crash_then_dead_letter(harness)["batchItemFailures"])
        if not _expand_messages(harness):
            letters = stored.find(batch_id)
            assert letters is not None
            queues.enqueue_expand(
                batch_id, HIGH, ENTERPRISE["tenant_id"], redrive_round=letters.redrive_round
            )
    # Then the give-up was tried at the second and third dead letters, and at the fourth the
    # message is set aside in the poison queue for an operator, and the reconciler stops looking
    assert answers[0] and answers[1] and not answers[2]
    (shelved,) = harness.sqs.receive_message(
        QueueUrl=harness.stack.poison_queue_url, MessageAttributeNames=["All"]
    )["Messages"]
    assert json.loads(shelved["Body"])["job_id"] == batch_id
    assert "keeps crashing" in shelved["MessageAttributes"]["llmq-why"]["StringValue"]
    batch = stored.find(batch_id)
    assert batch is not None and batch.cancel_requested and len(batch.dead_letter_ids) == 4
    hours_later = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + 3600,
    )
    assert batch_id not in Reconciler(hours_later, queues, harness.config, batches=stored).run().batches


def _given_up_with_an_item_running(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, JobRepository]:
    """A batch of five whose expansion crashes its worker at the third item, every time, and
    whose item 0 a worker runs, given up for crashing (canceling, batch_crashed): (its id, the
    running item's, the jobs)."""
    _crash(monkeypatch, StoredRequests, "item", when=lambda index: index >= 2)
    batch_id = _submit(harness)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert _crash_then_dead_letter(harness)["batchItemFailures"] == []
    running = item_job_id(batch_id, 0)
    assert jobs.claim(running, "worker-a", 900, (ENTERPRISE["tenant_id"], HIGH)).claimed
    assert _crash_then_dead_letter(harness)["batchItemFailures"] == []
    gave_up = _batch(harness, batch_id)
    assert _crashed(gave_up) and gave_up["status"] == "canceling"
    return batch_id, running, jobs


def test_a_batch_given_up_for_crashing_lets_its_running_items_finish_at_the_reconcilers_look(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch of five whose expansion crashes its worker at the third item, every time,
    # and whose item 0 (written before the crash) a worker is running: a long, paid generation
    # When the message sent once more dead-letters too: llmq gives up on the batch, which
    # docs/batches.md says cancels it with "running ones finish"
    batch_id, running, jobs = _given_up_with_an_item_running(harness, monkeypatch)
    assert not jobs.is_cancel_requested(running)
    # And the reconciler looks at the batch (it is overdue in the sweep index)
    report = _reconciler_later(harness).run()
    assert batch_id in report.batches
    # Then the running item is left to finish, as documented (not flagged: its worker's
    # watcher would stop the paid generation and end it canceled, its answer thrown away)
    assert not jobs.is_cancel_requested(running)


def test_a_client_cancel_of_a_batch_given_up_for_crashing_stops_its_running_items(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch llmq gave up on for crashing (canceling, batch_crashed), whose item 0 a
    # worker is running: left to finish, as documented
    batch_id, running, jobs = _given_up_with_an_item_running(harness, monkeypatch)
    # When the client then cancels the batch itself (accepted: it is not ended)
    canceled = harness.api("POST", f"/v1/batches/{batch_id}/cancel", tenant=ENTERPRISE)
    assert canceled.status == 202, canceled.body
    # Then its running item is asked to stop, as the cancel endpoint promises (each running
    # one is asked to stop as a job is): the client no longer wants to pay for it
    assert jobs.is_cancel_requested(running), "client's cancel ignored: the running item generates on, billed"
    # (nor does the reconciler's look at the canceling batch make up for it)


def test_a_client_cancel_cut_short_then_a_give_up_still_has_the_reconciler_stop_running_items(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose expansion crashes its worker at the third item, and whose item 0 a
    # worker is running
    _crash(monkeypatch, StoredRequests, "item", when=lambda index: index >= 2)
    batch_id = _submit(harness)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert _crash_then_dead_letter(harness)["batchItemFailures"] == []
    running = item_job_id(batch_id, 0)
    assert jobs.claim(running, "worker-a", 900, (ENTERPRISE["tenant_id"], HIGH)).claimed
    # And the client cancels it, the request cut short right after the batch's flag (hunt
    # 151: the reconciler's look is what then stops the running items)
    batch = batches.find(batch_id)
    assert batch is not None and batches.request_cancel(batch, by_client=True) is not None
    assert not jobs.is_cancel_requested(running)
    # (and the batch's winding down crashes a worker too, as its expansion did)
    _crash(monkeypatch, BatchRepository, "give_up_expansion")
    # When the expand message (sent once more) dead-letters too: llmq gives up, writing
    # batch_crashed into the client-canceled batch's errors
    # (its give-up's own winding down crashes as well: the letter stays, the errors are written)
    _crash_then_dead_letter(harness)
    assert _crashed(_batch(harness, batch_id))
    # And the reconciler looks at the canceling batch
    report = _reconciler_later(harness).run()
    assert batch_id in report.batches
    # Then the item the client asked to stop is asked to stop
    assert jobs.is_cancel_requested(running), "client's cancel lost: the give-up's errors hide it"


def test_one_unreadable_running_item_does_not_keep_the_reconciler_from_stopping_the_others(
    harness: Harness,
) -> None:
    # Given a batch of five, expanded, two of whose items workers are running
    batch_id = _submit(harness)
    url = harness.stack.lane_queue_urls[HIGH]
    for _ in range(5):
        messages = _expand_messages(harness)
        if not messages:
            break
        harness.run_worker(url, messages)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    batches = BatchRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    items = [item_job_id(batch_id, index) for index in (0, 1)]
    for item in items:
        assert jobs.claim(item, f"worker-{item}", 900, (ENTERPRISE["tenant_id"], HIGH)).claimed
    # And the client's cancel cut short after the batch's flag
    batch = batches.find(batch_id)
    assert batch is not None and batches.request_cancel(batch, by_client=True) is not None
    # When the reconciler looks at it, and the first running item it reads cannot be read (a
    # KeyError, as a record this version does not know would raise)
    original = JobRepository.find
    failed: list[str] = []

    def find(self: JobRepository, job_id: str, **kwargs: object) -> object:
        if job_id in items and not failed:
            failed.append(job_id)
            raise KeyError("an attribute this version does not know")
        return original(self, job_id, **kwargs)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(JobRepository, "find", find)
        _reconciler_later(harness).run()
    # Then the other running item is asked to stop all the same
    (other,) = [item for item in items if item not in failed]
    assert jobs.is_cancel_requested(other), "one unreadable item kept the others running, billed"


def test_a_foreign_expand_letter_naming_a_batchs_count_shard_is_set_aside_once(harness: Harness) -> None:
    from tests.integration.test_poison import _poison

    # Given a batch that ran, and so has count shards (items of the table keyed `batch#...#...`)
    requests = [{"custom_id": f"c{n}", "body": {"prompt": f"say {n}"}} for n in range(3)]
    assert harness.api("POST", "/v1/batches", body={"requests": requests}, tenant=ENTERPRISE).status == 202
    for _ in range(3):
        harness.drain("high")
    keys = [
        item["pk"]["S"] for item in aws.client("dynamodb").scan(TableName=harness.stack.jobs_table)["Items"]
    ]
    shard = next(key for key in keys if key.startswith("batch#") and key.count("#") == 3)
    # When a lane DLQ holds an expand letter naming that shard (a message sent by hand)
    dlq = harness.stack.lane_dlq_urls["high"]
    body = json.dumps({"job_id": shard.removeprefix("batch#"), "kind": "expand", "lane": "high"})
    harness.sqs.send_message(QueueUrl=dlq, MessageBody=body)
    letters = harness.receive(dlq, visibility=60)
    answer = load_handler("dead_letter").handler(harness.sqs_event(dlq, letters), LambdaContextStub())
    # Then it is set aside with the poison, once, not failed at every receive for 14 days (hunt
    # 266: the shard read as a batch failed validation, an unexpected error each time)
    assert answer["batchItemFailures"] == []
    assert [message["Body"] for message in _poison(harness)] == [body]


def test_a_batch_given_up_once_is_counted_once_whatever_ends_it(
    harness: Harness,
    provider: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a batch given up for crashing (counted for the alarm), canceling, its items ended
    _crash(monkeypatch, StoredRequests, "item", when=lambda index: index >= 2)
    batch_id = _submit(harness)
    _crash_then_dead_letter(harness)
    capsys.readouterr()
    _crash_then_dead_letter(harness)
    assert _dead_lettered(capsys) == [HIGH]
    _run_items(harness)
    url = harness.stack.lane_queue_urls[HIGH]
    harness.run_worker(url, _expand_messages(harness))
    assert _batch(harness, batch_id)["status"] == "finalizing"

    # When its results file runs out of time at every run (what compile raises after its stalls)
    def stalled(self: ResultsCompiler, batch: Any, remaining: Any) -> None:
        raise ResultsFileStalled(self.batches.find(batch.id))

    monkeypatch.setattr(ResultsCompiler, "compile", stalled)
    harness.run_worker(url, _expand_messages(harness))
    # Then it ends without the file, and is not counted again (review 272: twice)
    assert _batch(harness, batch_id)["status"] == "canceled"
    assert _dead_lettered(capsys) == []
