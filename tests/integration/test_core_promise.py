"""Regression tests for the core promise under real faults (issue #10).

Each test names the defect it pins: a paid generation run twice, a cancel ignored, a result
thrown away, a status moving backwards. AWS faults are injected with botocore's own event
hooks on the clients the code uses, so the code under test is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmq import aws
from llmq.config import LlmqConfig
from llmq.errors import StoreUnavailable
from llmq.execution import Invocation, JobRunner, lease_owner, mark_dead_letter
from llmq.item_size import MAX_ITEM_BYTES, item_size_bytes
from llmq.job_index import sweep_partitions
from llmq.job_record import JobRecord
from llmq.jobs import JobRepository
from llmq.models import DeliveryStatus, ErrorCode, JobError, JobResult, JobStatus, Usage
from llmq.offload import Offload
from llmq.payloads import PayloadStore
from llmq.policy import ClaimOutcome, deadline_error
from llmq.providers import GenerationRequest, PermanentProviderError, ProviderTimeout, TransientProviderError
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.shares import ShareRepository
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import (
    ENTERPRISE,
    FREE,
    Harness,
    LambdaContextStub,
    hidden_for_each_receive,
    load_handler,
    on_aws_call,
    reconciler_ahead,
    webhook_message,
)
from tests.support.stores import ROOMY

BACKLOG_JOBS = int(os.environ.get("LLMQ_BACKLOG_JOBS", "200"))
CJK = "漢"  # 3 bytes in UTF-8, 6 as a JSON \u escape
EMOJI = "😀"  # 4 bytes in UTF-8, 12 as a JSON surrogate-pair escape


# ---- fault hooks ------------------------------------------------------------------------


@pytest.fixture
def faults(harness: Harness) -> Iterator[AwsFaults]:
    injected = AwsFaults()
    yield injected
    injected.disarm()


def _kinds(faults: AwsFaults) -> list[str]:
    return [f"{fired.fault.name}:{fired.fault.kind.value}" for fired in faults.fired]


def _fail_unexpectedly(service: str, operation: str) -> None:
    """The next call fails with an error no code path expects (a ValidationException)."""
    left = [1]

    def raise_error(**_: Any) -> None:
        if left[0]:
            left[0] = 0
            error = {"Error": {"Code": "ValidationException", "Message": "injected"}}
            raise ClientError(error, operation)  # type: ignore[arg-type]

    aws.client(service).meta.events.register(f"before-call.{service}.{operation}", raise_error)


def _job(harness: Harness, job_id: str, tenant: dict[str, str] = ENTERPRISE) -> dict[str, Any]:
    reply = harness.api("GET", f"/v1/jobs/{job_id}", tenant=tenant)
    assert reply.status == 200, reply.body
    return reply.body


def _item(harness: Harness, job_id: str) -> dict[str, Any]:
    item: dict[str, Any] = harness.ddb.get_item(
        TableName=harness.stack.jobs_table, Key={"pk": {"S": job_id}}
    )["Item"]
    return item


def _big_harness(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> Harness:
    config = integration_config(
        provider,
        limits={"max_prompt_chars": 200_000, "max_body_bytes": 1024 * 1024, "wait_poll_seconds": 0.05},
    )
    return Harness(moto_stack, config, monkeypatch)


@pytest.fixture
def big(moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return _big_harness(moto_stack, provider, monkeypatch)


# ---- 1. item size: measured as DynamoDB measures it, input and result together ------------


def test_a_70k_character_cjk_prompt_is_accepted_and_run_once(
    big: Harness, provider: FakeProviderServer
) -> None:
    # Given a prompt well under max_prompt_chars whose \u-escaped JSON would pass 400 KB
    prompt = CJK * 70_000
    # When it is submitted and run
    reply = big.submit(prompt=prompt)
    # Then it is accepted (not a 500), fits its item, and completes with one provider call
    assert reply.status == 202, reply.body
    job_id = reply.body["id"]
    assert item_size_bytes(_item(big, job_id)) <= MAX_ITEM_BYTES
    big.drain("high")
    assert _job(big, job_id)["status"] == "succeeded"
    assert provider.calls_for(job_id) == 1


def test_60k_cjk_in_and_60k_out_succeeds_with_the_whole_result(big: Harness) -> None:
    # Given a 60k-character CJK job, claimed by a worker
    job_id = big.submit(prompt=CJK * 60_000).body["id"]
    jobs = JobRepository(big.stack.jobs_table, big.config, dynamodb=aws.client("dynamodb"))
    offload = Offload(PayloadStore(big.stack.payload_bucket, s3=aws.client("s3")), big.config)
    claim = jobs.claim(job_id, "worker-1", lease_seconds=60)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.job is not None
    # When the provider answers 60k CJK characters too
    output = CJK * 60_000
    done = offload.complete(jobs, claim.job, "worker-1", JobResult(output=output, finish_reason="stop"))
    # Then the job succeeded, its lease is gone, and the API returns the whole result
    assert done.status is JobStatus.SUCCEEDED
    item = _item(big, job_id)
    assert "lease_owner" not in item
    assert item_size_bytes(item) <= MAX_ITEM_BYTES
    job = _job(big, job_id)
    assert (job["status"], job["result"]["output"]) == ("succeeded", output)


def test_an_emoji_prompt_over_the_item_limit_keeps_its_input_in_s3_and_runs(
    big: Harness, provider: FakeProviderServer
) -> None:
    # Given 120k emoji, sent as raw UTF-8: 480 KB, more than any item holds
    body = json.dumps({"prompt": EMOJI * 120_000}, ensure_ascii=False)
    reply = big.api("POST", "/v1/jobs", raw_body=body, tenant=ENTERPRISE)
    assert reply.status == 202, reply.body
    job_id = reply.body["id"]
    # Then the item holds a reference, not the input, and the worker still runs it once
    item = _item(big, job_id)
    assert "input_ref" in item and "input" not in item
    big.drain("high")
    assert _job(big, job_id)["status"] == "succeeded"
    assert provider.calls_for(job_id) == 1


_PLANES = st.sampled_from(
    [
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),  # ASCII
        st.characters(min_codepoint=0x80, max_codepoint=0x7FF),  # 2-byte
        st.characters(min_codepoint=0x800, max_codepoint=0xFFFF, exclude_categories=("Cs",)),  # BMP
        st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),  # astral planes
    ]
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_prompt_under_the_limits_is_accepted_within_400_kb_or_refused_with_a_4xx(
    big: Harness, data: st.DataObject
) -> None:
    # Given text from any Unicode plane, sized around the item and offload limits
    alphabet = data.draw(_PLANES)
    unit = data.draw(st.text(alphabet=alphabet, min_size=1, max_size=8))
    target_bytes = data.draw(st.sampled_from([100_000, 170_000, 340_000, 350_000, 360_000, 400_000, 800_000]))
    repeat = max(1, target_bytes // len(unit.encode()))
    prompt = unit * repeat
    # When it is submitted as raw UTF-8 JSON
    body = json.dumps({"prompt": prompt}, ensure_ascii=False)
    reply = big.api("POST", "/v1/jobs", raw_body=body, tenant=ENTERPRISE)
    # Then it is never a 5xx: accepted and fitting its item, or a 4xx problem
    assert reply.status < 500, reply.body
    if reply.status == 202:
        assert item_size_bytes(_item(big, reply.body["id"])) <= MAX_ITEM_BYTES
    else:
        assert reply.status in (413, 422) and reply.body["code"]


# ---- 2. a cancel is never lost after a transient failure ---------------------------------


class ScriptedProvider:
    """An in-process provider: each call runs `before`, then answers or raises."""

    def __init__(
        self, answers: list[JobResult | Exception], before: Callable[[], None] | None = None
    ) -> None:
        self.answers = answers
        self.before = before
        self.calls = 0

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        self.calls += 1
        if self.before is not None:
            await asyncio.to_thread(self.before)
        await asyncio.sleep(0.2)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _queues(harness: Harness) -> QueueRepository:
    """The lanes and the webhooks queue, as the functions send to them."""
    return QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )


def _runner(harness: Harness, provider: ScriptedProvider, **config: Any) -> JobRunner:
    merged = harness.config.model_copy(update=config)
    jobs = JobRepository(harness.stack.jobs_table, merged, dynamodb=aws.client("dynamodb"))
    queues = _queues(harness)
    payloads = PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3"))
    return JobRunner(jobs, queues, provider, merged, payloads=payloads)  # type: ignore[arg-type]


def _run(
    runner: JobRunner,
    job_id: str,
    owner: str = "worker-1",
    seconds: float = 30.0,
    lag: list[float] | None = None,
) -> Exception | None:
    """Run the job's lane message in an invocation with `seconds` left; `lag` holds seconds the
    invocation's clock has lost besides (AWS's slow answers, played without waiting for them)."""
    started = time.monotonic()
    lost = lag if lag is not None else [0.0]
    invocation = Invocation(
        owner=owner, remaining_seconds=lambda: seconds - (time.monotonic() - started) - lost[0]
    )
    try:
        body = {"job_id": job_id, "lane": "high", "tenant_id": ENTERPRISE["tenant_id"]}
        asyncio.run(runner.run(json.dumps(body), invocation))
    except Exception as exc:
        return exc
    return None


OK = JobResult(output="fine", finish_reason="stop", usage=Usage(output_tokens=1))


@pytest.mark.parametrize(
    ("config", "submit"),
    [
        pytest.param({}, {}, id="attempts left"),
        pytest.param({"max_attempts": 1}, {}, id="the last attempt"),
        pytest.param({}, {"deadline_seconds": 2}, id="a retry would cross the deadline"),
    ],
)
def test_a_cancel_during_a_429_ends_canceled_and_the_provider_is_not_called_again(
    harness: Harness, config: dict[str, Any], submit: dict[str, Any]
) -> None:
    # Given a running job whose provider call fails with 429 after the client canceled it:
    # with attempts left, or none (its last attempt, or a retry that would start too late)
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}, **submit).body["id"]

    def client_cancels() -> None:
        assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 202

    provider = ScriptedProvider(
        [TransientProviderError("busy", 429, retry_after=5.0), OK], before=client_cancels
    )
    runner = _runner(harness, provider, cancel_check_seconds=60.0, **config)
    # When the worker handles the 429 (the cancel watcher never looked)
    outcome = _run(runner, job_id)
    # Then the job is canceled at once, never requeued nor failed, and announced
    assert outcome is None
    assert _job(harness, job_id)["status"] == "canceled"
    # And a duplicate message never reaches the provider again
    provider.before = None
    assert _run(runner, job_id, owner="worker-2") is None
    assert provider.calls == 1
    events = [json.loads(m["Body"])["event"] for m in harness.receive(harness.stack.webhook_queue_url)]
    assert events == ["job.canceled"]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(PermanentProviderError(ErrorCode.CONTENT_FILTERED, "refused"), id="a permanent error"),
        pytest.param(ProviderTimeout("slow"), id="a timeout"),
        pytest.param(TransientProviderError("busy", 429), id="a 429 on the last attempt"),
    ],
)
@pytest.mark.parametrize("cancel_at", ["during the call", "as the failure is written"])
def test_a_cancel_taken_before_the_failure_is_written_ends_canceled_when_the_call_fails_for_good(
    harness: Harness, answer: Exception, cancel_at: str
) -> None:
    # Given a running job on its last attempt that the client cancels (202) while its provider
    # call is in flight, or as the worker writes the failure the call ended with
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    replies: list[int] = []

    def client_cancels(**_: Any) -> None:
        if not replies:
            replies.append(harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status)

    ddb = aws.client("dynamodb").meta.events
    if cancel_at == "during the call":
        provider = ScriptedProvider([answer], before=client_cancels)
    else:
        provider = ScriptedProvider(
            [answer], before=lambda: ddb.register("before-send.dynamodb.TransactWriteItems", client_cancels)
        )
    runner = _runner(harness, provider, cancel_check_seconds=60.0, max_attempts=1)
    # When the call then fails for good (the cancel watcher never looked)
    try:
        assert _run(runner, job_id) is None
    finally:
        ddb.unregister("before-send.dynamodb.TransactWriteItems", client_cancels)
    # Then the job ends canceled, as the client was told, not failed over its cancel
    assert replies == [202]
    job = _job(harness, job_id)
    assert (job["status"], job["error"]) == ("canceled", None)
    events = [json.loads(m["Body"])["event"] for m in harness.receive(harness.stack.webhook_queue_url)]
    assert events == ["job.canceled"]


@pytest.mark.parametrize("next_look", ["claim", "reconciler"])
def test_a_cancel_taken_before_a_failure_that_had_to_be_parked_ends_canceled_at_the_next_look(
    harness: Harness, faults: AwsFaults, monkeypatch: pytest.MonkeyPatch, next_look: str
) -> None:
    # Given a running job the client cancels (202) while its provider call is in flight, the
    # call then timing out, and DynamoDB's transactions throttled for longer than the worker
    # can wait, so the failure is parked in S3
    job_id = harness.submit(webhook=HOOK).body["id"]
    replies: list[int] = []

    def client_cancels() -> None:
        replies.append(harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status)

    faults.arm("throttle", "dynamodb.TransactWriteItems", nth=2, times=1000)
    provider = ScriptedProvider([ProviderTimeout("slow"), OK], before=client_cancels)
    outcome = _run(_runner(harness, provider, cancel_check_seconds=60.0), job_id, seconds=8)
    faults.disarm()
    assert (replies, type(outcome).__name__) == ([202], "StoreUnavailable")
    # When its lease lapses and the next look comes (a claim of its message, or the reconciler)
    _lapse_lease(harness, job_id)
    provider.before = None
    if next_look == "claim":
        assert _run(_runner(harness, provider), job_id, owner="worker-2") is None
    else:
        later = (
            8 + harness.config.lease_margin_seconds + harness.config.reconciler.expired_lease_grace_seconds
        )
        _scheduled_reconciler(harness, monkeypatch, later + 1.0).handler(
            {"source": "aws.events"}, LambdaContextStub()
        )
    # Then the parked failure, which holds nothing paid for to deliver, yields to the cancel:
    # the job ends canceled, as the client was told, and the provider was called once
    assert provider.calls == 1
    job = _job(harness, job_id)
    assert (job["status"], job["error"]) == ("canceled", None)
    events = [json.loads(m["Body"])["event"] for m in harness.receive(harness.stack.webhook_queue_url)]
    assert events == ["job.canceled"]


def test_a_cancel_whose_flag_was_obeyed_before_its_write_was_retried_answers_canceled_not_409(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a running job, and a cancel whose flag write is applied with its answer lost; before
    # botocore tries it again, the worker sees the flag and ends the job canceled
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "worker-1", 900, (ENTERPRISE["tenant_id"], "high")).claimed
    harness.receive(harness.stack.webhook_queue_url)
    sends = [0]

    def worker_obeys_before_the_retry(**_: Any) -> None:
        sends[0] += 1
        if sends[0] == 2:
            found = jobs.find(job_id)
            assert found is not None and found.cancel_requested
            ended = jobs.cancel_leased(found, "worker-1")
            harness.sqs.send_message(
                QueueUrl=harness.stack.webhook_queue_url,
                MessageBody=json.dumps({"job_id": job_id, "event": ended.terminal_event.value}),
            )

    faults.arm("applied_retried", "dynamodb.UpdateItem")
    events = aws.client("dynamodb").meta.events
    events.register("before-send.dynamodb.UpdateItem", worker_obeys_before_the_retry)
    try:
        # When the client cancels
        reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    finally:
        events.unregister("before-send.dynamodb.UpdateItem", worker_obeys_before_the_retry)
    assert _kinds(faults) == ["UpdateItem:applied_retried"] and sends[0] == 2
    # Then it is told the job is canceled, as it asked, not that it could not be canceled
    assert (reply.status, reply.body["status"]) == (200, "canceled")
    # And the worker's event is the only one: the cancel that did not end it sends none
    sent = [json.loads(m["Body"])["event"] for m in harness.receive(harness.stack.webhook_queue_url)]
    assert sent == ["job.canceled"]


def test_a_cancel_accepted_while_job_started_is_sent_is_never_sent_to_the_provider(harness: Harness) -> None:
    # Given a job subscribed to job.started, its worker sending that event
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.started", "job.succeeded", "job.canceled"]}
    job_id = harness.submit(webhook=hook).body["id"]
    replies: list[int] = []

    def cancel_as_it_is_sent(params: dict[str, Any], **_: Any) -> None:
        if "job.started" in str(params.get("MessageBody", "")) and not replies:
            # When the client, seeing the job running, cancels it now
            replies.append(harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status)

    sqs = aws.client("sqs")
    sqs.meta.events.register("before-parameter-build.sqs.SendMessage", cancel_as_it_is_sent)
    provider = ScriptedProvider([OK])
    try:
        outcome = _run(_runner(harness, provider), job_id)
    finally:
        sqs.meta.events.unregister("before-parameter-build.sqs.SendMessage", cancel_as_it_is_sent)
    # Then the provider is never called, and the job ends canceled
    assert (outcome, replies, provider.calls) == (None, [202], 0)
    assert _job(harness, job_id)["status"] == "canceled"
    events = [json.loads(m["Body"])["event"] for m in harness.receive(harness.stack.webhook_queue_url)]
    assert events == ["job.started", "job.canceled"]


def test_a_queued_job_with_a_recorded_cancel_is_canceled_at_its_claim_without_a_provider_call(
    harness: Harness,
) -> None:
    # Given a queued job that carries cancel_requested (left by a requeue that raced a cancel)
    job_id = harness.submit().body["id"]
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET cancel_requested = :t",
        ExpressionAttributeValues={":t": {"BOOL": True}},
    )
    provider = ScriptedProvider([OK])
    # When a worker gets its message
    assert _run(_runner(harness, provider), job_id) is None
    # Then it ends canceled and the provider was never called
    assert _job(harness, job_id)["status"] == "canceled"
    assert provider.calls == 0


# ---- 3. a paid result survives transient AWS errors --------------------------------------


def test_a_failing_cancel_check_never_abandons_the_generation(harness: Harness, faults: AwsFaults) -> None:
    # Given the cancel watcher's reads are throttled
    job_id = harness.submit().body["id"]
    faults.arm("throttle", "dynamodb.GetItem", times=3)

    provider = ScriptedProvider([OK])
    runner = _runner(harness, provider, cancel_check_seconds=0.05)
    # When the generation runs past several checks
    outcome = _run(runner, job_id)
    # Then it still completes, once
    assert outcome is None
    assert len(faults.fired) == 3, "the watcher did not meet its throttles"
    assert _job(harness, job_id)["status"] == "succeeded"
    assert provider.calls == 1


@pytest.mark.parametrize(
    ("operation", "kind"),
    [
        ("dynamodb.TransactWriteItems", "throttle"),
        ("dynamodb.TransactWriteItems", "server_error"),
        ("s3.PutObject", "throttle"),
    ],
)
def test_a_throttled_write_back_is_retried_and_the_paid_result_is_kept(
    big: Harness, faults: AwsFaults, operation: str, kind: str
) -> None:
    # Given a claimed job (a big result goes to S3, so PutObject is on the path)
    job_id = big.submit(prompt="hello").body["id"]
    output = CJK * 130_000 if operation.startswith("s3") else "fine"
    provider = ScriptedProvider([JobResult(output=output, finish_reason="stop")])
    runner = _runner(big, provider)

    def arm_after_claim() -> None:
        faults.arm(kind, operation, times=2)

    provider.before = arm_after_claim
    # When the write-back is throttled twice after the provider answered
    outcome = _run(runner, job_id)
    # Then the worker retried it: one provider call, the whole result kept
    assert outcome is None
    assert len(faults.fired) == 2
    job = _job(big, job_id)
    assert (job["status"], job["result"]["output"]) == ("succeeded", output)
    assert provider.calls == 1


# ---- 5. a delivered webhook stays delivered -----------------------------------------------


def test_a_late_failure_of_a_duplicate_delivery_never_moves_delivered_back_to_pending(
    harness: Harness,
) -> None:
    # Given a job whose webhook was delivered
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    harness.drain("high")
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.record_delivery(job_id, DeliveryStatus.DELIVERED, 200)
    # When a duplicate message's POST times out, and another answers 409
    late_pending = jobs.record_delivery(job_id, DeliveryStatus.PENDING, None, 5)
    late_failed = jobs.record_delivery(job_id, DeliveryStatus.FAILED, 409)
    # Then neither outcome is recorded, and the delivery stays delivered
    assert (late_pending, late_failed) == (False, False)
    delivery = _job(harness, job_id)["webhook"]["delivery"]
    assert (delivery["status"], delivery["last_status_code"], delivery["attempts"]) == ("delivered", 200, 1)
    # And a redelivery request makes it pending again, on purpose
    assert harness.api("POST", f"/v1/jobs/{job_id}/webhook/redeliver", tenant=ENTERPRISE).status == 202
    assert jobs.record_delivery(job_id, DeliveryStatus.PENDING, 500, 5)


# ---- 6. ambiguous writes: a retried write recognises its own success ----------------------


def test_a_submit_whose_put_was_applied_but_unanswered_is_a_first_submit_and_is_enqueued(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given the accept's first answer is lost and botocore sends it again
    faults.arm("applied_retried", "dynamodb.TransactWriteItems")
    # When the client submits with an Idempotency-Key
    reply = harness.submit(key="first-try")
    # Then it is a first submit, enqueued once
    assert _kinds(faults) == ["TransactWriteItems:applied_retried"]
    assert reply.status == 202 and "idempotent-replayed" not in reply.headers
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 1


def test_a_claim_applied_but_unanswered_runs_the_job_now_and_once(
    harness: Harness, faults: AwsFaults, provider: FakeProviderServer
) -> None:
    # Given the claim's answer is lost and botocore retries it
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    faults.arm("applied_retried", "dynamodb.TransactWriteItems")
    # When the worker runs the message
    harness.drain("high")
    # Then it recognised its own lease: the job ran now, once, and its webhook is queued
    assert _kinds(faults) == ["TransactWriteItems:applied_retried"]
    assert _job(harness, job_id)["status"] == "succeeded"
    assert provider.calls_for(job_id) == 1
    assert harness.total_count(harness.stack.webhook_queue_url) == 1


def test_a_complete_applied_but_unanswered_sends_its_webhook_at_once(
    harness: Harness, faults: AwsFaults, provider: FakeProviderServer
) -> None:
    # Given the complete's answer is lost and botocore retries it
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    faults.arm("applied_retried", "dynamodb.TransactWriteItems", nth=2)
    # When the worker runs the message
    response = harness.drain("high")
    # Then the retry saw our own write, not a lost lease: the webhook goes out now
    assert _kinds(faults) == ["TransactWriteItems:applied_retried"]
    assert response == {"batchItemFailures": []}
    assert _job(harness, job_id)["status"] == "succeeded"
    webhooks = [webhook_message(m) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert webhooks == [{"job_id": job_id, "event": "job.succeeded"}]


def test_a_cancel_applied_but_unanswered_answers_canceled_not_409(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a queued job and a cancel whose write is applied but unanswered
    job_id = harness.submit().body["id"]
    faults.arm("applied_retried", "dynamodb.TransactWriteItems")
    # When the client cancels
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    # Then it is told the job is canceled
    assert _kinds(faults) == ["TransactWriteItems:applied_retried"]
    assert (reply.status, reply.body["status"]) == (200, "canceled")


def test_a_cancel_applied_with_every_answer_lost_reads_its_own_write_back(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a queued job with a webhook, and a cancel whose write DynamoDB applies while the
    # answer of every botocore try is lost
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    # When the client cancels
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    assert _kinds(faults) == ["TransactWriteItems:applied_lost"]
    # Then it is told the job is canceled (a 503 made its retry a 409 "already finished"),
    # and the job's event goes now, not at the reconciler's look at an unsent webhook
    assert (reply.status, reply.body["status"]) == (200, "canceled"), reply.body
    sent = [json.loads(m["Body"])["event"] for m in harness.receive(harness.stack.webhook_queue_url)]
    assert sent == ["job.canceled"]
    # And a retry of the cancel is answered canceled too, and sends no event more
    again = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    assert (again.status, again.body["status"]) == (200, "canceled"), again.body
    assert harness.receive(harness.stack.webhook_queue_url) == []


def test_a_cancel_answered_503_though_applied_is_answered_canceled_at_its_retry_not_409(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a queued job, and a cancel whose write DynamoDB applies while every answer is lost,
    # and whose look after it is throttled (as a gateway timeout or a dropped connection
    # leaves a client without the answer of a cancel that worked)
    job_id = harness.submit().body["id"]
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    faults.arm("throttle", "dynamodb.GetItem", nth=2, times=20)
    first = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    assert _kinds(faults)[0] == "TransactWriteItems:applied_lost"
    assert (first.status, first.code) == (503, "service_unavailable"), first.body
    # When the client retries, as a 503 asks
    again = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    # Then it is told the job is canceled: not a 409 "already finished", which says the job
    # ran and was paid for (hunt 322)
    assert (again.status, again.body["status"]) == (200, "canceled"), again.body


def test_a_running_jobs_cancel_whose_flag_answer_is_lost_is_accepted_not_503(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a running job, and a cancel whose flag DynamoDB applies while every answer is lost
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "worker-1", 900, (ENTERPRISE["tenant_id"], "high")).claimed
    faults.arm("applied_lost", "dynamodb.UpdateItem")
    # When the client cancels
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    assert _kinds(faults) == ["UpdateItem:applied_lost"]
    # Then it is told the cancel was asked (202), not to retry a cancel that worked
    assert (reply.status, reply.body["status"]) == (202, "running"), reply.body
    found = jobs.find(job_id)
    assert found is not None and found.cancel_requested


def test_a_cancel_that_dynamodb_keeps_refusing_is_a_503_and_changes_nothing(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a queued job, and DynamoDB throttling every try of the cancel's write
    job_id = harness.submit().body["id"]
    faults.arm("throttle", "dynamodb.TransactWriteItems", times=200)
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    # Then it is a 503 to retry (not a 409 saying the job changed state), and the job is queued
    assert (reply.status, reply.code) == (503, "service_unavailable"), reply.body
    assert _job(harness, job_id)["status"] == "queued"


def test_a_submit_applied_but_unanswered_is_read_back_and_accepted_with_its_message(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a submit whose write is applied with its answer lost
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    first = harness.submit(key="k-lost", prompt="one")
    faults.disarm()
    assert _kinds(faults) == ["TransactWriteItems:applied_lost"]
    # Then the accept reads its own write back: a 202, and the job has its message at once
    # (a 503 would leave it stored with none, and the client's replay sends none)
    assert (first.status, first.body["status"]) == (202, "queued"), first.body
    retry = harness.submit(key="k-lost", prompt="one")
    assert (retry.status, retry.headers["idempotent-replayed"]) == (202, "true")
    messages = harness.receive(harness.stack.lane_queue_urls["high"])
    assert [json.loads(m["Body"])["job_id"] for m in messages] == [first.body["id"]]


def _a_dead_message_hidden_in_the_lane(harness: Harness) -> None:
    """A message in the lane that no job needs: a job waiting out a provider's Retry-After of an
    hour (its message hidden that long), then canceled while queued. The lane's depth counts it."""
    first = harness.submit(key="dead", prompt="hello [[fail:503x1]] [[retry_after:3600]]")
    harness.drain("high")
    job = harness.api("GET", f"/v1/jobs/{first.body['id']}", tenant=ENTERPRISE).body
    assert (job["status"], job["attempts"]) == ("queued", 1), job
    canceled = harness.api("POST", f"/v1/jobs/{first.body['id']}/cancel", tenant=ENTERPRISE)
    assert canceled.body["status"] == "canceled", canceled.body
    url = harness.stack.lane_queue_urls["high"]
    assert (harness.total_count(url), harness.visible_count(url)) == (1, 0)


def _reconciled_three_times(harness: Harness) -> list[str]:
    """What three reconciler runs, each a stale look later, sent a lane message for."""
    step = harness.config.reconciler.stale_queued_seconds + 60.0
    offset, requeued = [step], []
    for _ in range(3):
        requeued += reconciler_ahead(harness, offset).run().requeued
        offset[0] += step
    return requeued


def test_a_stored_job_without_its_message_is_sent_one_though_a_dead_message_fills_the_lanes_depth(
    harness: Harness, faults: AwsFaults
) -> None:
    """Hunt 252: a job stored without its lane message (its accept applied with the answer lost,
    and the read of it refused: a 503), in a lane whose depth counts a message no job needs, was
    never sent one by the reconciler (the lane looked full), and waited until that message came
    back (here an hour; up to 12) or expired unrun. The client's retry under its key puts it
    first in the reconciler's sweep."""
    _a_dead_message_hidden_in_the_lane(harness)
    url = harness.stack.lane_queue_urls["high"]
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    faults.arm("throttle", "dynamodb.GetItem", times=5)
    first = harness.submit(key="j", prompt="the paid one")
    faults.disarm()
    assert (first.status, first.code) == (503, "service_unavailable"), first.body
    kept = harness.submit(key="j", prompt="the paid one")
    assert (kept.status, kept.headers.get("idempotent-replayed")) == (202, "true")
    assert harness.item_count() == 2 and harness.total_count(url) == 1
    # Then the reconciler sends it its message at its first look, once
    assert _reconciled_three_times(harness) == [kept.body["id"]]
    assert harness.total_count(url) == 2


@pytest.mark.parametrize("deadline", [None, 250])
def test_replays_of_a_job_add_at_most_one_message_to_its_own(harness: Harness, deadline: int | None) -> None:
    """The mark a replay makes holds only until the reconciler's first look at the job: a client
    replaying in a loop never multiplies its job's messages (review 251), nor when a deadline
    before that look puts the look's postpone back where the accept did (review 252)."""
    body: dict[str, Any] = {"prompt": "hello"} | ({"deadline_seconds": deadline} if deadline else {})
    first = harness.submit(key="loop", **body)
    assert first.status == 202
    url = harness.stack.lane_queue_urls["high"]
    for ahead in (10.0, 60.0, 120.0, 200.0, 240.0):
        replay = harness.submit(key="loop", **body)
        assert (replay.status, replay.headers.get("idempotent-replayed")) == (202, "true")
        reconciler_ahead(harness, [ahead]).run()
    # (its own, and at most the one the reconciler's first look sent for the mark)
    assert harness.total_count(url) <= 2


def test_a_submit_whose_write_was_throttled_stores_nothing_and_sends_nothing(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a submit whose write DynamoDB throttles, try after try (never applied)
    faults.arm("throttle", "dynamodb.TransactWriteItems", times=50)
    first = harness.submit(key="k-throttled", prompt="one")
    faults.disarm()
    # Then it is a 503 to retry, and nothing is stored or sent: no message for a job that
    # does not exist, which a worker could only set aside as poison
    assert (first.status, first.code) == (503, "service_unavailable")
    assert harness.item_count() == 0
    assert harness.total_count(harness.stack.lane_queue_urls["high"]) == 0


def test_a_requeue_applied_but_unanswered_keeps_the_retry(harness: Harness, faults: AwsFaults) -> None:
    # Given a 503 from the provider and a requeue whose answer is lost
    job_id = harness.submit().body["id"]
    provider = ScriptedProvider([TransientProviderError("down", 503)])
    provider.before = lambda: faults.arm("applied_retried", "dynamodb.TransactWriteItems")
    # When the worker handles the 503
    outcome = _run(_runner(harness, provider), job_id)
    # Then the job waits for its retry (not a lost lease, not a crash)
    assert _kinds(faults) == ["TransactWriteItems:applied_retried"]
    assert type(outcome).__name__ == "RetryLater"
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("queued", "provider_unavailable")


# ---- 7. a retry that would cross the deadline says so ------------------------------------


def test_a_retry_past_the_deadline_fails_as_deadline_exceeded_and_says_it_ran(harness: Harness) -> None:
    # Given a job with a 2 s deadline whose first attempt gets a 503 with Retry-After 60
    job_id = harness.submit(deadline_seconds=2).body["id"]
    provider = ScriptedProvider([TransientProviderError("down", 503, retry_after=60)])
    # When the worker handles the 503
    outcome = _run(_runner(harness, provider), job_id)
    # Then the job ends now, saying it ran and why it will not run again
    assert outcome is None
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "deadline_exceeded", 1)
    assert "attempt 1 failed" in job["error"]["message"] and job["error"]["retryable"] is True


def test_a_requeued_job_claimed_after_its_deadline_is_expired_with_what_happened(harness: Harness) -> None:
    # Given a job that ran once, failed transiently and is waiting for its retry
    job_id = harness.submit(deadline_seconds=600).body["id"]
    provider = ScriptedProvider([TransientProviderError("down", 503)])
    assert type(_run(_runner(harness, provider), job_id)).__name__ == "RetryLater"
    # When its retry comes after the deadline
    later = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + 3600,
    )
    claim = later.claim(job_id, "worker-2", 60)
    assert claim.outcome is ClaimOutcome.DEADLINE_PASSED and claim.job is not None
    expired = later.expire(claim.job, deadline_error(claim.job))
    # Then it is expired, and the error says it ran and how it last failed
    assert expired is not None and expired.error is not None
    assert expired.status is JobStatus.EXPIRED
    assert "ran 1 time" in expired.error.message and "down" in expired.error.message


# ---- 8/9. the reconciler under a backlog, and its sharded index --------------------------


def _reconciler(harness: Harness, offset: list[float]) -> Reconciler:
    return reconciler_ahead(harness, offset)  # type: ignore[no-any-return]


def _count_sends(harness: Harness) -> list[str]:
    sent: list[str] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        sent.append(params["QueueUrl"])

    harness.sqs.meta.events.register("provide-client-params.sqs.SendMessage", count)
    return sent


def test_a_backlog_of_stale_queued_jobs_gets_no_extra_lane_messages(harness: Harness) -> None:
    # Given a backlog of free-tier jobs (200 here; LLMQ_BACKLOG_JOBS=2000 for the issue's
    # figure) waiting in their lane far longer than the stale threshold
    # (more than the free tier's quota of active jobs allows: lifted for this tenant)
    ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).set_limits(
        FREE["tenant_id"], max_active_jobs=BACKLOG_JOBS
    )
    jobs = [harness.submit(tenant=FREE).body["id"] for _ in range(BACKLOG_JOBS)]
    lane = harness.stack.lane_queue_urls["low"]
    sent = _count_sends(harness)
    offset = [0.0]
    reconciler = _reconciler(harness, offset)
    # When the reconciler runs six times while the backlog drains slowly
    for run in range(6):
        offset[0] = (run + 1) * 3600.0
        report = reconciler.run()
        assert report.examined > 0
        harness.drain("low")
    # Then lane messages stay at one per job (target: at most 1.05 x jobs)
    lane_messages = len(jobs) + sum(1 for url in sent if url == lane)
    print(f"reconciler under a backlog: {lane_messages} lane messages for {len(jobs)} jobs")
    assert lane_messages <= 1.05 * len(jobs), f"{lane_messages} messages for {len(jobs)} jobs"


def test_a_lost_message_among_steady_traffic_is_sent_again_at_the_next_run(harness: Harness) -> None:
    # Given a job whose message was lost, and fresh jobs still waiting in the same lane
    lost = harness.submit(tenant=FREE).body["id"]
    lane = harness.stack.lane_queue_urls["low"]
    for message in harness.receive(lane):
        harness.sqs.delete_message(QueueUrl=lane, ReceiptHandle=message["ReceiptHandle"])
    offset = [3600.0]
    reconciler = _reconciler(harness, offset)
    # fresh jobs, created "now" in the reconciler's clock, are not stale
    fresh = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + offset[0],
    )
    queues = _queues(harness)
    for index in range(20):
        record = JobRecord.model_validate(
            {**_record_of(harness, lost), "id": f"job_fresh{index}", "created_ms": fresh.now_ms()}
        )
        fresh.create(record, ROOMY)
        queues.enqueue_job(record.id, "low", record.tenant_id)
    # When the reconciler runs
    report = reconciler.run()
    # Then exactly the lost job got a new message
    assert report.requeued == [lost]


def _record_of(harness: Harness, job_id: str) -> dict[str, Any]:
    record = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).find(
        job_id
    )
    assert record is not None
    return record.model_dump(exclude={"last_write"})


def test_the_reconciler_index_spreads_jobs_over_its_shards(harness: Harness) -> None:
    # Given many jobs
    ids = [harness.submit().body["id"] for _ in range(64)]
    # Then their index keys spread over the configured shards, never one hot key
    keys = {_item(harness, job_id)["sweep_pk"]["S"] for job_id in ids}
    assert keys <= set(sweep_partitions(harness.config.reconciler.sweep_shards))
    assert len(keys) >= harness.config.reconciler.sweep_shards // 2


# ---- 12. a provider timeout is not retried like a 503 -------------------------------------


def test_a_provider_timeout_fails_retryable_after_one_call(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a generation longer than the worker can wait for
    job_id = harness.submit(prompt="slow [[latency:6]]").body["id"]
    url = harness.stack.lane_queue_urls["high"]
    # When the worker (with 4 s left) runs it
    response = harness.run_worker(url, harness.receive(url), timeout_seconds=4)
    # Then the job fails as provider_timeout, retryable, after exactly one call: no ghost re-run
    assert response == {"batchItemFailures": []}
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"], job["error"]["retryable"]) == (
        "failed",
        ErrorCode.PROVIDER_TIMEOUT.value,
        True,
    )
    assert provider.calls_for(job_id) == 1


def test_a_claim_with_too_little_lambda_time_left_hands_the_job_back_without_a_call(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a worker invocation that reaches the job with 1.5 s of its time left (a slow cold
    # start), in a deployment whose worker timeout leaves room for a generation
    job_id = harness.submit(prompt="hello [[latency:0.1]]").body["id"]
    url = harness.stack.lane_queue_urls["high"]
    response = harness.run_worker(url, harness.receive(url, visibility=1), timeout_seconds=1.5)
    # Then the provider was not called, the job is queued again with its attempt refunded, and
    # its message comes back
    assert provider.calls_for(job_id) == 0
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("queued", 0)
    assert len(response["batchItemFailures"]) == 1
    # And the next delivery, with time to spare, runs it once
    harness.let_backoffs_pass()
    messages = []
    deadline = time.monotonic() + 10
    while not messages and time.monotonic() < deadline:
        messages = harness.receive(url)
    harness.run_worker(url, messages)
    assert (_job(harness, job_id)["status"], provider.calls_for(job_id)) == ("succeeded", 1)


class _Timed(ScriptedProvider):
    """A scripted provider that keeps the time each call was given."""

    def __init__(self) -> None:
        super().__init__([OK])
        self.given: list[float] = []

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        self.given.append(timeout_seconds)
        return await super().generate(request, timeout_seconds)


def test_a_slow_job_started_send_never_leaves_the_provider_a_call_too_short_to_finish(
    harness: Harness,
) -> None:
    # Given a job subscribed to job.started, claimed with 12 s of its Lambda left, whose
    # job.started send SQS answers late (botocore's tries took 9.6 s of the invocation)
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.started", "job.succeeded", "job.failed"]}
    job_id = harness.submit(webhook=hook).body["id"]
    lag = [0.0]

    def slow_send(**_: Any) -> None:
        lag[0] += 9.6

    sqs = aws.client("sqs")
    sqs.meta.events.register("before-call.sqs.SendMessage", slow_send)
    provider = _Timed()
    try:
        outcome = _run(_runner(harness, provider), job_id, seconds=12.0, lag=lag)
    finally:
        sqs.meta.events.unregister("before-call.sqs.SendMessage", slow_send)
    # Then the provider is not called with too little time to finish (billed, then failed as
    # provider_timeout): the job is handed back, its attempt refunded, to run in full later
    assert provider.given == []
    assert type(outcome).__name__ == "RetryLater"
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("queued", 0)


def test_job_started_sends_that_hang_never_hold_the_threads_the_results_are_written_on(
    harness: Harness,
) -> None:
    # Given a batch of six jobs subscribed to job.started (the default executor's six threads
    # on a two-vCPU Lambda), claimed with 12 s of the Lambda left, and SQS not answering their
    # job.started sends for 14 s (botocore's tries: up to 3 x (3 s + 10 s))
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.started", "job.succeeded", "job.failed"]}
    job_ids = [harness.submit(webhook=hook).body["id"] for _ in range(6)]
    provider = ScriptedProvider(
        [JobResult(output=f"paid {n}", finish_reason="stop", usage=Usage(output_tokens=1)) for n in range(6)]
    )
    runner = _runner(harness, provider)

    released, hanging = threading.Event(), []

    def hang_started_send(params: dict[str, Any], **_: Any) -> None:
        if "job.started" in str(params.get("MessageBody", "")):
            hanging.append(threading.current_thread())
            released.wait(14.0)

    sqs = aws.client("sqs")
    sqs.meta.events.register("before-parameter-build.sqs.SendMessage", hang_started_send)
    started = time.monotonic()

    async def one(job_id: str) -> None:
        invocation = Invocation(
            owner=f"worker-{job_id}", remaining_seconds=lambda: 12.0 - (time.monotonic() - started)
        )
        body = {"job_id": job_id, "lane": "high", "tenant_id": ENTERPRISE["tenant_id"]}
        await runner.run(json.dumps(body), invocation)

    async def batch() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=6))
        await asyncio.gather(*(one(job_id) for job_id in job_ids))

    try:
        # When the worker runs them, giving up on each send after a second
        asyncio.run(batch())
    finally:
        # (the hanging sends end into this test's moto: left asleep, they sent into a later
        # test's queue of the same name, which found messages it never sent)
        released.set()
        for thread in hanging:
            thread.join(5.0)
        sqs.meta.events.unregister("before-parameter-build.sqs.SendMessage", hang_started_send)
    # Then every paid result is written (the sends still hanging hold no thread a write needs):
    # none is left for a next attempt to pay for again
    assert provider.calls == 6
    assert [_job(harness, job_id)["status"] for job_id in job_ids] == ["succeeded"] * 6


# ---- the worker logs what the batch processor would swallow -------------------------------


def test_an_unexpected_error_is_logged_with_the_job_and_class_but_never_the_prompt(
    harness: Harness, faults: AwsFaults, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a claim that fails with an error nobody expects
    job_id = harness.submit(prompt="top secret prompt").body["id"]
    _fail_unexpectedly("dynamodb", "TransactWriteItems")
    # When the worker runs the message
    response = harness.drain("high")
    # Then the message is reported failed and the log says which job and what class
    assert len(response["batchItemFailures"]) == 1
    failures = [r for r in caplog.records if r.getMessage().startswith("record failed unexpectedly")]
    assert [(r.job_id, r.error_class, r.error_code) for r in failures] == [  # type: ignore[attr-defined]
        (job_id, "ClientError", "ValidationException")
    ]
    assert not any("top secret" in str(r.__dict__) for r in caplog.records)


def test_config_default_provider_timeout_is_what_the_worker_can_afford() -> None:
    assert LlmqConfig().provider.timeout_seconds is None


# ---- found in review: more ways to run twice, hang or lose a cancel ------------------------


def test_a_claim_applied_then_lost_is_recognised_in_process_and_runs_now(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a claim whose write is applied but whose every answer is lost
    job_id = harness.submit().body["id"]
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    provider = ScriptedProvider([OK])
    # When the worker handles the message
    outcome = _run(_runner(harness, provider), job_id)
    # Then its retry with the same owner finds its own lease: the job runs now, once
    assert _kinds(faults) == ["TransactWriteItems:applied_lost"]
    _ran_once_on_its_first_attempt(harness, job_id, outcome, provider)


def test_a_claim_recognised_as_ours_that_carries_a_cancel_never_calls_the_provider(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a claim applied but unanswered, and the client's cancel landing before the retry
    job_id = harness.submit().body["id"]
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")

    def client_cancels(**_: Any) -> None:
        if _kinds(faults) == ["TransactWriteItems:applied_lost"] and not cancelled:
            cancelled.append(True)
            reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
            assert reply.status == 202

    cancelled: list[bool] = []
    aws.client("dynamodb").meta.events.register("before-call.dynamodb.TransactWriteItems", client_cancels)
    provider = ScriptedProvider([OK])
    # When the worker retries its claim and recognises its own lease
    assert _run(_runner(harness, provider), job_id) is None
    # Then it sees the cancel and stops: canceled, no provider call
    assert cancelled == [True]
    assert _job(harness, job_id)["status"] == "canceled"
    assert provider.calls == 0


def test_an_unreadable_provider_answer_fails_the_job_instead_of_re_running_it(harness: Harness) -> None:
    # Given a provider answer the client code cannot read (a shape no one expected)
    job_id = harness.submit().body["id"]
    provider = ScriptedProvider([TypeError("sequence item 0: expected str instance, list found")])  # type: ignore[list-item]
    # When the worker handles it
    assert _run(_runner(harness, provider), job_id) is None
    # Then the job fails, retryable, after that one (possibly billed) call: never a lease left to lapse
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"], job["error"]["retryable"]) == (
        "failed",
        "provider_error",
        True,
    )
    assert provider.calls == 1


def _lane_messages(harness: Harness, job_id: str) -> list[dict[str, Any]]:
    """The job's messages in the high lane, left visible."""
    messages = harness.receive(harness.stack.lane_queue_urls["high"], visibility=0)
    return [message for message in messages if json.loads(message["Body"])["job_id"] == job_id]


def test_the_same_dead_letter_handled_twice_counts_once(harness: Harness) -> None:
    # Given a queued job whose message dead-lettered
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    queues = _queues(harness)
    (submitted,) = _lane_messages(harness, job_id)
    # When the dead-letter function handles that same letter twice (its record was retried)
    mark_dead_letter(jobs, queues, submitted["Body"], "dlq-message-1")
    mark_dead_letter(jobs, queues, submitted["Body"], "dlq-message-1")
    # Then the job is still queued and waiting for its new message, not failed
    assert _job(harness, job_id)["status"] == "queued"
    # And only a second, different dead letter (of the message sent again) gives up on it
    resent = [m for m in _lane_messages(harness, job_id) if m["MessageId"] != submitted["MessageId"]]
    assert [json.loads(m["Body"]).get("redrive_round") for m in resent] == [1, 1]  # sent on each try
    mark_dead_letter(jobs, queues, resent[0]["Body"], "dlq-message-2")
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")


def test_a_dead_letter_record_redelivered_after_a_claim_counts_no_crash_again(harness: Harness) -> None:
    # Given a queued job whose message dead-lettered, counted and sent again, the DLQ record's
    # acknowledgement lost (the dead-letter function timed out on a later record of its batch)
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    queues = _queues(harness)
    (submitted,) = _lane_messages(harness, job_id)
    mark_dead_letter(jobs, queues, submitted["Body"], "dlq-message-1")
    # And a worker that then claimed it through the message sent again, and met a provider
    # error it may retry: queued again
    claim = jobs.claim(job_id, "worker-1", lease_seconds=60)
    assert claim.claimed and claim.job is not None
    error = JobError(code=ErrorCode.PROVIDER_UNAVAILABLE, message="503", retryable=True)
    assert jobs.requeue(claim.job, "worker-1", error, delay_seconds=0) is not None
    harness.sqs.purge_queue(QueueUrl=harness.stack.lane_queue_urls["high"])
    # When the same DLQ record comes back to the dead-letter function
    mark_dead_letter(jobs, queues, submitted["Body"], "dlq-message-1")
    # Then it counts nothing and sends nothing (hunt 241: it counted as the first letter since
    # the claim, and sent another message)
    assert _lane_messages(harness, job_id) == []
    # And the first real dead letter since the claim is answered with a message, not a give-up
    resent = json.dumps({**json.loads(submitted["Body"]), "redrive_round": 1})
    mark_dead_letter(jobs, queues, resent, "dlq-message-2")
    assert _job(harness, job_id)["status"] == "queued"
    assert len(_lane_messages(harness, job_id)) == 1


@pytest.mark.parametrize("letter", ["the-same-record-back", "a-copy-of-the-round-answered"])
def test_an_answered_rounds_letter_fails_no_job_claimed_since_and_crashed_once(
    harness: Harness, letter: str
) -> None:
    # Given a queued job whose message dead-lettered, counted and sent again (round 1), then
    # claimed through that message by a worker that crashed (its lease lapsed, one attempt)
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    queues = _queues(harness)
    (submitted,) = _lane_messages(harness, job_id)
    mark_dead_letter(jobs, queues, submitted["Body"], "dlq-message-1")
    assert jobs.claim(job_id, "worker-1", lease_seconds=-1).claimed
    # When that letter's record comes back (its acknowledgement lost), or another copy of the
    # round-0 message dead-letters
    again = "dlq-message-1" if letter == "the-same-record-back" else "dlq-copy-b"
    assert mark_dead_letter(jobs, queues, submitted["Body"], again) is None
    # Then the job is not failed (hunt 286: worker_crashed, not retryable, after one crash):
    # its round-1 message is alive, and the reconciler recovers its lease to run it again
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("running", 1), job.get("error")
    # And a letter of its own round still fails it, as its messages ran out
    resent = json.dumps({**json.loads(submitted["Body"]), "redrive_round": 1})
    mark_dead_letter(jobs, queues, resent, "dlq-message-2")
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")


def test_a_late_letter_of_a_message_that_never_claimed_the_job_fails_no_job_crashed_once(
    harness: Harness,
) -> None:
    # Given a job whose first message exhausted its receives without a claim (workers dying at
    # their init) and reached the lane's DLQ, where the dead-letter function could not settle it
    # yet (failing, or throttled)
    job_id = harness.submit().body["id"]
    lane, dlq = harness.stack.lane_queue_urls["high"], harness.stack.lane_dlq_urls["high"]
    (first,) = harness.receive(lane)
    harness.sqs.delete_message(QueueUrl=lane, ReceiptHandle=first["ReceiptHandle"])
    harness.sqs.send_message(QueueUrl=dlq, MessageBody=first["Body"])
    # And a message sent again in the same round (the reconciler's, for a job it took for one
    # whose message was lost), through which a worker claimed the job and crashed (one attempt,
    # its lease lapsed)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    job = jobs.find(job_id)
    assert job is not None
    _queues(harness).enqueue_job(job_id, job.lane, job.tenant_id, redrive_round=job.redrive_round)
    (resent,) = harness.receive(lane)
    owner = lease_owner("request-1", resent["MessageId"])
    assert jobs.claim(job_id, owner, lease_seconds=-1).claimed
    assert _job(harness, job_id)["attempts"] == 1 < harness.config.max_attempts
    # When the dead-letter function, fixed, settles the old letter at last
    letters = harness.receive(dlq)
    reply = load_handler("dead_letter").handler(harness.sqs_event(dlq, letters), LambdaContextStub())
    assert reply["batchItemFailures"] == []
    # Then the job is left to the reconciler's recovery, to run again while it has attempts left
    # (hunt 324: failed for good, worker_crashed, not retryable, after one crash)
    job_now = _job(harness, job_id)
    assert (job_now["status"], job_now["attempts"]) == ("running", 1), job_now.get("error")


def test_a_crashed_running_jobs_letter_past_its_deadline_fails_it_as_its_deadline_passed(
    harness: Harness,
) -> None:
    # Given a job with a deadline, claimed by a worker that crashed, its deadline since passed
    job_id = harness.submit(deadline_seconds=3600).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    queues = _queues(harness)
    (submitted,) = _lane_messages(harness, job_id)
    assert jobs.claim(job_id, "worker-1", lease_seconds=-1).claimed
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET deadline_ms = :past",
        ExpressionAttributeValues={":past": {"N": str(jobs.now_ms() - 1000)}},
    )
    # When its message dead-letters
    mark_dead_letter(jobs, queues, submitted["Body"], "dlq-message-1")
    # Then it fails as its claim or the reconciler would fail it (hunt 286: worker_crashed)
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"], job["error"]["retryable"]) == (
        "failed",
        "deadline_exceeded",
        True,
    )


def test_a_dead_letter_whose_resend_is_throttled_is_retried_and_counts_once(harness: Harness) -> None:
    """The letter is counted, then SQS throttles the message sent again: the DLQ record fails
    and comes back, and its retry sends the message without counting a second round."""
    # Given a queued job whose message dead-lettered, and SQS throttling the next SendMessage
    job_id = harness.submit().body["id"]
    url, dlq = harness.stack.lane_queue_urls["high"], harness.stack.lane_dlq_urls["high"]
    (submitted,) = _lane_messages(harness, job_id)
    harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=submitted["ReceiptHandle"])
    event = harness.sqs_event(dlq, [submitted])

    def throttle(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "injected"}}, "SendMessage")

    sqs = aws.client("sqs")
    sqs.meta.events.register("before-call.sqs.SendMessage", throttle, unique_id="throttle-resend")
    try:
        first = load_handler("dead_letter").handler(event, LambdaContextStub())
    finally:
        sqs.meta.events.unregister("before-call.sqs.SendMessage", unique_id="throttle-resend")
    # Then the record failed, to come back, and no message was sent
    assert [item["itemIdentifier"] for item in first["batchItemFailures"]] == [submitted["MessageId"]]
    assert _lane_messages(harness, job_id) == []
    # When the same record comes back
    again = load_handler("dead_letter").handler(event, LambdaContextStub())
    # Then the job is sent again, of the next round, still queued: one round, not two
    assert again["batchItemFailures"] == []
    (resent,) = _lane_messages(harness, job_id)
    assert json.loads(resent["Body"])["redrive_round"] == 1
    assert _job(harness, job_id)["status"] == "queued"


def test_two_messages_of_a_queued_job_that_dead_letter_in_one_round_send_it_once_more(
    harness: Harness,
) -> None:
    """The reconciler sends a queued job's message again while another may still be in flight;
    when both dead-letter, that is one round, answered once: each message carries the round
    it was sent in."""
    # Given a queued job, and a second message for it (as the reconciler sends one)
    job_id = harness.submit().body["id"]
    (submitted,) = _lane_messages(harness, job_id)
    harness.sqs.send_message(QueueUrl=harness.stack.lane_queue_urls["high"], MessageBody=submitted["Body"])
    copies = _lane_messages(harness, job_id)
    assert len(copies) == 2
    # When both dead-letter, one after the other
    harness.dead_letter("high", copies[:1])
    harness.dead_letter("high", copies[1:])
    # Then the job is still queued, waiting for the one message sent again for it
    assert _job(harness, job_id)["status"] == "queued"
    (resent,) = _lane_messages(harness, job_id)
    # And when the message sent again dead-letters too, the job fails
    harness.dead_letter("high", [resent])
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")


def test_a_message_of_the_round_before_a_claim_and_its_copy_count_once_after_it(harness: Harness) -> None:
    """A claim starts the give-up count afresh, not the rounds: the message sent again before
    it, still in flight (a worker handed the job back) and copied by SQS, is one round."""
    # Given a queued job whose message dead-lettered once and was sent again
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    (submitted,) = _lane_messages(harness, job_id)
    harness.dead_letter("high", [submitted])
    (resent,) = _lane_messages(harness, job_id)
    # And a worker claimed it through that message, then handed it back (the message lives on)
    claim = jobs.claim(job_id, "worker-1", lease_seconds=60)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.job is not None
    jobs.release(claim.job, "worker-1", 1)
    # When that message and a copy of it dead-letter, one after the other
    harness.dead_letter("high", [resent])
    harness.sqs.send_message(QueueUrl=harness.stack.lane_queue_urls["high"], MessageBody=resent["Body"])
    copy = [m for m in _lane_messages(harness, job_id) if m["Body"] == resent["Body"]]
    harness.dead_letter("high", copy)
    # Then the job is still queued: one round, answered by one message sent again
    assert _job(harness, job_id)["status"] == "queued"
    (again,) = _lane_messages(harness, job_id)
    assert json.loads(again["Body"])["redrive_round"] == 2


def test_a_stale_copy_that_is_all_a_claimed_job_has_left_still_counts(harness: Harness) -> None:
    """A claim through a stale copy deletes the message of the current round when it comes
    ("leased elsewhere"); handed back, the job has only the stale copy, whose letter must
    still count, or the job waits for the reconciler with no message at all."""
    # Given a queued job with an SQS duplicate of its first message, whose first message
    # dead-lettered and was sent again
    job_id = harness.submit().body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    url = harness.stack.lane_queue_urls["high"]
    (submitted,) = _lane_messages(harness, job_id)
    harness.sqs.send_message(QueueUrl=url, MessageBody=submitted["Body"])
    harness.dead_letter("high", [submitted])
    messages = _lane_messages(harness, job_id)
    (resent,) = [m for m in messages if json.loads(m["Body"]).get("redrive_round") == 1]
    # And a worker claimed it through the duplicate, another deleted the message sent again
    # (its job leased elsewhere), and the first handed the job back
    claim = jobs.claim(job_id, "worker-1", lease_seconds=60)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.job is not None
    harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=resent["ReceiptHandle"])
    jobs.release(claim.job, "worker-1", 1)
    # When the duplicate dead-letters
    (duplicate,) = _lane_messages(harness, job_id)
    harness.dead_letter("high", [duplicate])
    # Then the job is still queued, and has a message again
    assert _job(harness, job_id)["status"] == "queued"
    (again,) = _lane_messages(harness, job_id)
    assert json.loads(again["Body"])["redrive_round"] == 2


def test_a_job_stored_before_rounds_existed_is_of_the_first_round(harness: Harness) -> None:
    """An item written by a version before rounds has dead letters but no round: an untagged
    letter for it counts (it is given up on at most a round early), never dropped for ever
    while the reconciler sends message after message."""
    # Given a queued job as an earlier version left it: one dead letter counted, no round
    job_id = harness.submit().body["id"]
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="ADD dead_letter_ids :ids",
        ExpressionAttributeValues={":ids": {"SS": ["dlq-before-the-upgrade"]}},
    )
    # When its message, untagged, dead-letters
    harness.dead_letter("high", _lane_messages(harness, job_id))
    # Then that is its second round, and it fails as crashed
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")


@pytest.mark.parametrize("skew_ms", [-600_000, 600_000])
def test_a_dead_letter_counts_whatever_the_clocks_of_sqs_and_the_function_say(
    harness: Harness, skew_ms: int
) -> None:
    """SQS stamps SentTimestamp by its clock; the function runs by another. Whether a letter
    counts depends on neither: a queued job is sent once more, then fails, as without skew."""
    # Given a queued job, and SQS's clock ten minutes off the function's
    job_id = harness.submit().body["id"]
    # When its message dead-letters
    harness.dead_letter("high", _lane_messages(harness, job_id), skew_ms)
    # Then the job is sent once more
    assert _job(harness, job_id)["status"] == "queued"
    (resent,) = _lane_messages(harness, job_id)
    # And when that one dead-letters too, the job fails as crashed: two rounds, not one or three
    harness.dead_letter("high", [resent], skew_ms)
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")
    assert _lane_messages(harness, job_id) == []


def test_a_cancel_whose_webhook_enqueue_is_throttled_still_answers_canceled(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a queued job with a webhook, and SQS throttling the cancel's webhook message
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    faults.arm("throttle", "sqs.SendMessage")
    # When the client cancels
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    # Then it is told canceled (a 503 would make its retry a 409), and the delivery waits pending
    assert _kinds(faults) == ["SendMessage:throttle"]
    assert (reply.status, reply.body["status"]) == (200, "canceled")
    assert reply.body["webhook"]["delivery"]["status"] == "pending"


@pytest.fixture
def s3_held(moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Harness:
    """Inputs over 4 KB live in S3."""
    limits = {"max_prompt_chars": 50_000, "max_item_payload_bytes": 4096, "wait_poll_seconds": 0.05}
    return Harness(moto_stack, integration_config(provider, limits=limits), monkeypatch)


@pytest.fixture
def streams_held(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> Harness:
    """Streaming jobs' inputs live in S3, others' in their items."""
    config = integration_config(provider, streaming={"max_inline_input_bytes": 0})
    return Harness(moto_stack, config, monkeypatch)


def test_a_cancel_is_seen_while_the_invocations_other_jobs_wait_on_a_slow_s3(streams_held: Harness) -> None:
    # Given one invocation running a long job (its input in its item) and nine jobs whose
    # inputs live in S3, every read of which S3 answers only after 6 s (slow, not failing):
    # more reads than asyncio's default pool has threads on two vCPUs
    harness = streams_held
    long_job = harness.submit(prompt="long [[latency:20]]").body["id"]
    for n in range(9):
        assert harness.submit(prompt=f"other {n}", stream=True).status == 202
    main = threading.current_thread()
    order: list[str] = []

    def slow_s3(**_: Any) -> None:
        if threading.current_thread() is not main:
            time.sleep(6.0)
            order.append("an input read")

    s3 = aws.client("s3")
    s3.meta.events.register("before-call.s3.GetObject", slow_s3)
    url = harness.stack.lane_queue_urls["high"]
    messages = harness.receive(url)
    assert len(messages) == 10
    worker = threading.Thread(target=harness.run_worker, args=(url, messages))
    worker.start()
    try:
        while _job(harness, long_job)["status"] != "running":
            time.sleep(0.05)
        # When the client cancels the long job (its watcher looks every 0.2 s)
        assert harness.api("POST", f"/v1/jobs/{long_job}/cancel", tenant=ENTERPRISE).status == 202
        while _job(harness, long_job)["status"] == "running" and not order:
            time.sleep(0.05)
        order.append(_job(harness, long_job)["status"])
    finally:
        worker.join(timeout=60)
        s3.meta.events.unregister("before-call.s3.GetObject", slow_s3)
    # Then it ends canceled before any of those reads came back: neither its watcher's read
    # nor its cancel's write waited for their threads while its generation went on, billed
    assert order[0] == "canceled"


def test_an_input_s3_will_not_give_back_is_handed_back_with_its_attempt_refunded(
    s3_held: Harness, faults: AwsFaults
) -> None:
    # Given a job whose input lives in S3, and S3 refusing every read for a while
    harness = s3_held
    job_id = harness.submit(prompt="x" * 8000).body["id"]
    faults.arm("throttle", "s3.GetObject", times=1000)
    provider = ScriptedProvider([OK])
    # When a worker (with 8 s left) claims it
    outcome = _run(_runner(harness, provider), job_id, seconds=8)
    # Then the provider was never called and the job is queued again, its attempt refunded
    assert type(outcome).__name__ == "RetryLater"
    assert provider.calls == 0
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"], job["error"]) == ("queued", 0, None)


def test_an_input_s3_will_not_give_back_comes_back_later_at_each_receive(s3_held: Harness) -> None:
    # Given a job whose input lives in S3, and S3 refusing every read of the worker's for minutes
    harness = s3_held
    url = harness.stack.lane_queue_urls["high"]
    job_id = harness.submit(prompt="x" * 8000).body["id"]
    faults = AwsFaults()
    faults.wrap_handler("worker", harness.worker())
    faults.arm(FaultKind.THROTTLE, "s3.GetObject", function="worker", times=10_000)

    def due_again() -> None:  # (the job's hand-back wait over, as when SQS brings it back)
        harness.ddb.update_item(
            TableName=harness.stack.jobs_table,
            Key={"pk": {"S": job_id}},
            UpdateExpression="REMOVE not_before_ms",
        )

    try:
        # When the worker runs its message at each of the lane's receives
        hidden_for = hidden_for_each_receive(harness, url, harness.config.max_receive_count, due_again)
    finally:
        faults.disarm()
    # Then the job never ran, and its receives outlast an outage of a quarter of an hour, as a
    # refused claim's end does (hunt 304: a second each, into the lane's DLQ in three minutes,
    # which paged for a job that never ran, round after round)
    assert faults.fired
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("queued", 0)
    assert sum(hidden_for) >= 15 * 60, hidden_for


def test_an_input_whose_body_breaks_off_while_read_is_handed_back_with_its_attempt_refunded(
    s3_held: Harness, faults: AwsFaults
) -> None:
    # Given a job whose input lives in S3, and S3 answering its reads whose bodies break off
    # (botocore never retries a body read: it comes after the call)
    harness = s3_held
    job_id = harness.submit(prompt="x" * 8000).body["id"]
    faults.arm("body_cut", "s3.GetObject", times=1000)
    provider = ScriptedProvider([OK])
    # When a worker (with 8 s left) claims it
    outcome = _run(_runner(harness, provider), job_id, seconds=8)
    # Then it is S3 unavailable, as a refused read is: queued again, its attempt refunded
    assert faults.fired and {fired.answer for fired in faults.fired} == {"200"}
    assert type(outcome).__name__ == "RetryLater"
    assert provider.calls == 0
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"], job["error"]) == ("queued", 0, None)


def test_a_cancel_while_the_input_cannot_be_read_ends_canceled(s3_held: Harness, faults: AwsFaults) -> None:
    # Given an S3-held input that cannot be read, and the client canceling meanwhile
    harness = s3_held
    job_id = harness.submit(prompt="x" * 8000, webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]

    def client_cancels(**_: Any) -> None:
        if not cancelled:
            cancelled.append(True)
            assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 202

    cancelled: list[bool] = []
    # registered first, so it runs before the injector's hook on every read
    aws.client("s3").meta.events.register("before-call.s3.GetObject", client_cancels)
    faults.arm("throttle", "s3.GetObject", times=1000)
    provider = ScriptedProvider([OK])
    # When the worker gives up on the input
    assert _run(_runner(harness, provider), job_id, seconds=8) is None
    # Then the job is canceled now (not left leased to a worker that moved on), never run
    assert _job(harness, job_id)["status"] == "canceled"
    assert provider.calls == 0


def _ran_once_on_its_first_attempt(
    harness: Harness, job_id: str, outcome: Exception | None, provider: ScriptedProvider
) -> None:
    """The message was handled (no retry asked), the provider called once, and the job
    succeeded on attempt 1: a claim recognised as ours, not a lease left to lapse."""
    assert outcome is None
    assert provider.calls == 1
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("succeeded", 1)


def _slow_calls(operation: str, seconds: float, times: int) -> list[float]:
    """The first `times` calls of `operation` (on llmq's client) take `seconds` more of the
    invocation's time, as botocore's own tries and backoff do before a fault surfaces."""
    lag = [0.0]
    left = [times]

    def slow(**_: Any) -> None:
        if left[0]:
            left[0] -= 1
            lag[0] += seconds

    service, name = operation.split(".")
    # registered before the faults are armed, so it runs before their hook
    aws.client(service).meta.events.register(f"before-call.{service}.{name}", slow)
    return lag


def test_a_claim_applied_whose_answer_was_lost_after_seconds_is_still_recognised_as_ours(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a claim applied whose answer botocore lost only after 1.5 s of its own tries
    job_id = harness.submit().body["id"]
    lag = _slow_calls("dynamodb.TransactWriteItems", 1.5, times=1)
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    provider = ScriptedProvider([OK])
    # When the worker runs it
    outcome = _run(_runner(harness, provider), job_id, lag=lag)
    # Then its next try finds the claim its own, and the job runs now, on its first attempt
    # (not left leased to this worker until the lease lapses, then taken over on a second)
    assert [f.fault.kind.value for f in faults.fired] == ["applied_lost"]
    _ran_once_on_its_first_attempt(harness, job_id, outcome, provider)


def test_a_claim_whose_read_after_it_is_throttled_for_seconds_runs_the_job(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a claim that applied and was answered, and the read of the claimed job throttled
    # twice, each after 0.6 s of botocore's tries
    job_id = harness.submit().body["id"]
    lag = _slow_calls("dynamodb.GetItem", 0.6, times=2)
    faults.arm("throttle", "dynamodb.GetItem", times=2)
    provider = ScriptedProvider([OK])
    outcome = _run(_runner(harness, provider), job_id, lag=lag)
    # Then the claim is tried again, finds itself, and the job runs on its first attempt
    assert len(faults.fired) == 2
    _ran_once_on_its_first_attempt(harness, job_id, outcome, provider)


def test_a_claim_contended_after_a_try_that_applied_is_recognised_by_a_look_and_runs(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a claim applied with its answer lost, whose retries then meet other transactions
    # on the tenant's share every time
    job_id = harness.submit().body["id"]
    lane = harness.stack.lane_queue_urls["high"]
    messages = harness.total_count(lane)
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    faults.arm("transaction_conflict", "dynamodb.TransactWriteItems", nth=2, times=10_000)
    # (the conflicts end once the worker looks at the job, so that its result write goes in)
    aws.client("dynamodb").meta.events.register("before-call.dynamodb.GetItem", lambda **_: faults.disarm())
    provider = ScriptedProvider([OK])
    outcome = _run(_runner(harness, provider), job_id, seconds=20)
    # Then the refusals prove nothing about the first try: a look at the job finds it leased to
    # this worker, which runs it now, on its first attempt (not a copy that finds the job leased
    # and is dropped, leaving it running with nothing to run it)
    assert {f.fault.kind.value for f in faults.fired} == {"applied_lost", "transaction_conflict"}
    _ran_once_on_its_first_attempt(harness, job_id, outcome, provider)
    assert harness.total_count(lane) == messages


def test_a_claim_throttled_then_contended_comes_back_in_seconds_not_a_lease(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a claim throttled (nothing applied), whose retries then meet other transactions
    job_id = harness.submit().body["id"]
    lane = harness.stack.lane_queue_urls["high"]
    messages = harness.total_count(lane)
    faults.arm("throttle", "dynamodb.TransactWriteItems")
    faults.arm("transaction_conflict", "dynamodb.TransactWriteItems", nth=2, times=10_000)
    provider = ScriptedProvider([OK])
    outcome = _run(_runner(harness, provider), job_id, seconds=300)
    faults.disarm()
    # Then a look finds the job still queued: it comes back as a copy in a few seconds, not
    # after a lease it never took (five minutes here)
    assert {f.fault.kind.value for f in faults.fired} == {"throttle", "transaction_conflict"}
    assert outcome is None
    assert _with_delayed(harness, lane) == messages + 1
    assert provider.calls == 0
    assert _job(harness, job_id)["status"] == "queued"


def _claim_lost_then_throttled(faults: AwsFaults) -> None:
    """The next claim applied with its answer lost, and the worker's retries of it throttled
    past the claim's budget (a brown-out)."""
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    faults.arm("throttle", "dynamodb.TransactWriteItems", nth=2, times=6)


def test_a_claim_applied_with_its_answer_lost_then_throttled_is_given_back_unrun(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a job on its last attempt (two 503s spent the others)
    job_id = harness.submit().body["id"]
    provider = ScriptedProvider([TransientProviderError("busy", 503)] * 2 + [OK])
    for _ in range(2):
        assert type(_run(_runner(harness, provider), job_id)).__name__ == "RetryLater"
        harness.let_backoffs_pass()
    assert _job(harness, job_id)["attempts"] == 2
    # When its next claim is applied with its answer lost, and the worker's retries of it are
    # throttled past the claim's budget (a brown-out), then answered again
    _claim_lost_then_throttled(faults)
    lane = harness.stack.lane_queue_urls["high"]
    messages = _with_delayed(harness, lane)
    outcome = _run(_runner(harness, provider), job_id, seconds=300)
    assert [f.fault.kind.value for f in faults.fired][:2] == ["applied_lost", "throttle"]
    # Then the lease it may hold is given back unrun: the attempt refunded, its tenant's slot
    # freed, and a copy of its message sent (no receive spent on a job that never ran)
    assert outcome is None
    assert _with_delayed(harness, lane) == messages + 1
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("queued", 2)
    assert (
        ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
        .get(ENTERPRISE["tenant_id"])
        .running
        == 0
    )
    # And its next claim runs the provider's third try, which succeeds (hunt 256: the lease
    # counted as the third attempt, and the job failed worker_crashed after two calls)
    faults.disarm()
    harness.let_backoffs_pass()
    assert _run(_runner(harness, provider), job_id) is None
    assert (provider.calls, _job(harness, job_id)["status"]) == (3, "succeeded")


def _with_delayed(harness: Harness, url: str) -> int:
    """Messages on the queue, delayed ones too (a contended claim's copy waits a few seconds)."""
    delayed = harness.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesDelayed"]
    )
    return harness.total_count(url) + int(delayed["Attributes"]["ApproximateNumberOfMessagesDelayed"])


def test_a_slow_input_read_is_not_retried_past_its_budget(s3_held: Harness, faults: AwsFaults) -> None:
    # Given an S3-held input whose read is throttled after 20 s of botocore's own tries, in an
    # invocation with 30 s left (the read's budget is a quarter of that)
    harness = s3_held
    job_id = harness.submit(prompt="x" * 8000).body["id"]
    lag = _slow_calls("s3.GetObject", 20.0, times=2)
    faults.arm("throttle", "s3.GetObject", times=2)
    provider = ScriptedProvider([OK])
    outcome = _run(_runner(harness, provider), job_id, seconds=30, lag=lag)
    # Then it is not read again (a retry could outlast the Lambda): the job is handed back,
    # its attempt refunded
    assert len(faults.fired) == 1
    assert type(outcome).__name__ == "RetryLater"
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("queued", 0)


def _crashed_past_deadline(harness: Harness) -> str:
    """A job whose worker crashed holding it (a lease of 0.2 s), and whose deadline then passed."""
    job_id: str = harness.submit(deadline_seconds=60).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claimed = jobs.claim(
        job_id, "crashed-worker", lease_seconds=0.2, tenant=(ENTERPRISE["tenant_id"], "high")
    )
    assert claimed.outcome is ClaimOutcome.CLAIMED
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET deadline_ms = :past",
        ExpressionAttributeValues={":past": {"N": str(int(time.time() * 1000) - 1)}},
    )
    return job_id


def test_a_crashed_job_past_its_deadline_is_not_restarted(harness: Harness) -> None:
    # Given a job whose worker crashed holding its slot, and whose deadline then passed
    job_id = _crashed_past_deadline(harness)
    time.sleep(0.3)
    # When its message comes back to a worker
    provider = ScriptedProvider([OK])
    assert _run(_runner(harness, provider), job_id) is None
    # Then it fails as a retry that would cross the deadline does (it ran once): no second paid
    # call, and its slot given back
    assert provider.calls == 0
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "deadline_exceeded", 1)
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    assert job_id not in share.holders.get("high", {})


def test_the_reconciler_fails_a_crashed_job_past_its_deadline_as_a_worker_would(harness: Harness) -> None:
    # Given a job whose worker crashed holding it, and whose deadline then passed
    job_id = _crashed_past_deadline(harness)
    lane = harness.stack.lane_queue_urls["high"]
    messages = harness.total_count(lane)
    # When the reconciler finds its lease lapsed (a grace later)
    grace = harness.config.reconciler.expired_lease_grace_seconds
    report = _reconciler(harness, [grace + 1.0]).run()
    # Then it fails deadline_exceeded, as a worker's claim of it does, instead of queuing it
    # again (a message and a claim) only to end it expired
    assert job_id in report.recovered
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "deadline_exceeded")
    assert harness.total_count(lane) == messages


def _lapse_lease(harness: Harness, job_id: str) -> None:
    """The job's lease lapsed a moment ago, as a worker that gave up on its write leaves it."""
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET lease_expires_ms = :lapsed",
        ExpressionAttributeValues={":lapsed": {"N": str(int(time.time() * 1000) - 1)}},
    )


def test_a_paid_result_whose_write_fails_for_good_is_parked_and_recorded_by_the_next_attempt(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a job whose generation is paid for, and DynamoDB refusing its result write for
    # longer than the worker can wait (every try after the claim)
    job_id = harness.submit().body["id"]
    faults.arm("throttle", "dynamodb.TransactWriteItems", nth=2, times=1000)
    provider = ScriptedProvider([OK, JobResult(output="paid twice", finish_reason="stop", usage=Usage())])
    outcome = _run(_runner(harness, provider), job_id, seconds=8)
    faults.disarm()
    assert isinstance(outcome, StoreUnavailable)
    assert provider.calls == 1
    # When its lease lapses and the job's message comes back to another worker
    _lapse_lease(harness, job_id)
    # (with too little of its Lambda left to call the provider: recording needs none)
    assert _run(_runner(harness, provider), job_id, owner="worker-2", seconds=2.4) is None
    # Then the parked result is recorded: the generation is not paid for a second time
    assert provider.calls == 1
    job = _job(harness, job_id)
    assert (job["status"], job["result"]["output"], job["attempts"]) == ("succeeded", "fine", 2)


@pytest.mark.parametrize(
    "code", ["AccessDeniedException", "ExpiredTokenException", "KMSAccessDeniedException"]
)
def test_a_paid_result_whose_write_meets_an_error_no_retry_fixes_is_parked_and_recorded(
    harness: Harness, code: str
) -> None:
    # Given a job whose generation is paid for, and DynamoDB refusing its result write with an
    # error botocore does not retry (a grant removed, credentials expired, the table's key gone)
    job_id = harness.submit().body["id"]
    writes: list[str] = []

    def refuse_the_result_write(model: Any, **_: Any) -> None:
        if model.name == "TransactWriteItems":
            writes.append(model.name)
            if len(writes) == 2:
                error = {
                    "Error": {"Code": code, "Message": "refused"},
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                }
                raise ClientError(error, model.name)  # type: ignore[arg-type]

    provider = ScriptedProvider([OK, JobResult(output="paid twice", finish_reason="stop", usage=Usage())])
    with on_aws_call("dynamodb", "before-call.dynamodb", refuse_the_result_write):
        outcome = _run(_runner(harness, provider), job_id, seconds=8)
    assert isinstance(outcome, ClientError) and provider.calls == 1
    # When its lease lapses and the job's message comes back to another worker
    _lapse_lease(harness, job_id)
    assert _run(_runner(harness, provider), job_id, owner="worker-2", seconds=2.4) is None
    # Then the result parked in S3 is recorded, not paid for a second time (hunt 333: parked on
    # a throttle alone, it was lost, and the job ran again)
    assert provider.calls == 1
    job = _job(harness, job_id)
    assert (job["status"], job["result"]["output"], job["attempts"]) == ("succeeded", "fine", 2)


@pytest.mark.parametrize("next_look", ["claim", "reconciler"])
@pytest.mark.parametrize(
    ("billed", "code"),
    [
        (
            ProviderTimeout("the provider did not finish within 60.0s; it may still be generating"),
            "provider_timeout",
        ),
        (TypeError("sequence item 0: expected str instance, list found"), "provider_error"),
        # (an in-band error after tokens were streamed, and billed: the provider refused to go on)
        (
            PermanentProviderError(ErrorCode.CONTENT_FILTERED, "content_policy_violation after 20 tokens"),
            "content_filtered",
        ),
    ],
    ids=["timeout", "answer unreadable", "refused mid-stream"],
)
def test_a_billed_failure_whose_write_fails_for_good_is_never_sent_again(
    harness: Harness,
    faults: AwsFaults,
    monkeypatch: pytest.MonkeyPatch,
    next_look: str,
    billed: Exception,
    code: str,
) -> None:
    # Given a job whose provider call timed out (it may still be generating, and billing), or
    # answered what could not be read (billed), and DynamoDB refusing the failure's write for
    # longer than the worker can wait
    job_id = harness.submit(webhook=HOOK).body["id"]
    faults.arm("throttle", "dynamodb.TransactWriteItems", nth=2, times=1000)
    provider = ScriptedProvider([billed, OK])
    outcome = _run(_runner(harness, provider), job_id, seconds=8)
    faults.disarm()
    assert isinstance(outcome, StoreUnavailable)
    assert provider.calls == 1
    # When its lease lapses, and its message comes back to another worker, or the reconciler
    # comes to it
    _lapse_lease(harness, job_id)
    if next_look == "claim":
        assert _run(_runner(harness, provider), job_id, owner="worker-2") is None
    else:
        # (the sweep finds it a grace after the lease it took: 8 s and the margin)
        later = (
            8 + harness.config.lease_margin_seconds + harness.config.reconciler.expired_lease_grace_seconds
        )
        module = _scheduled_reconciler(harness, monkeypatch, later + 1.0)
        assert module.handler({"source": "aws.events"}, LambdaContextStub())["recovered"] == 1
    # Then the job fails as that attempt did, and the request is never sent again
    assert provider.calls == 1
    job = _job(harness, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", code)


@pytest.mark.parametrize("s3", ["answers", "cannot say"])
def test_a_claim_recognised_as_ours_that_carries_a_cancel_records_a_parked_result_first(
    harness: Harness, faults: AwsFaults, s3: str
) -> None:
    # Given a job whose attempt paid for its result, parked it and crashed, and whose next
    # claim is applied but unanswered, the client's cancel landing before the claim's retry
    # (and S3 throttling every look for the look's whole budget, or not)
    job_id = _parked(harness)
    faults.arm("applied_lost", "dynamodb.TransactWriteItems")
    if s3 == "cannot say":
        faults.arm("throttle", "s3.HeadObject", times=10_000)
    canceled: list[int] = []

    def client_cancels(**_: Any) -> None:
        if _kinds(faults) == ["TransactWriteItems:applied_lost"] and not canceled:
            canceled.append(harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status)

    ddb = aws.client("dynamodb")
    ddb.meta.events.register("before-call.dynamodb.TransactWriteItems", client_cancels)
    provider = ScriptedProvider([JobResult(output="paid twice", finish_reason="stop", usage=Usage())])
    try:
        # When the worker retries its claim and recognises its own lease, cancel and all
        outcome = _run(_runner(harness, provider), job_id, owner="worker-2", seconds=10)
    finally:
        ddb.meta.events.unregister("before-call.dynamodb.TransactWriteItems", client_cancels)
        faults.disarm()
    assert canceled == [202]
    if s3 == "cannot say":
        # (nothing written: the job ends once its lease lapses, looking again for what was paid)
        assert type(outcome).__name__ == "RetryLater"
        assert _job(harness, job_id)["status"] == "running"
        _lapse_lease(harness, job_id)
        outcome = _run(_runner(harness, provider), job_id, owner="worker-3")
    # Then what was paid for comes first, as wherever a job ends unrun: recorded, not thrown
    # away for the cancel, and the provider is not called
    assert outcome is None
    assert provider.calls == 0
    _succeeded_with_the_parked_result(harness, job_id)


def _parked_with_its_input_in_s3(harness: Harness) -> str:
    """A job whose input is held in S3 and whose attempt paid for its result, parked it and
    then crashed."""
    job_id: str = harness.submit(prompt="x" * 8000, webhook=HOOK).body["id"]
    job = _crashed(harness, job_id)
    Offload(PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")), harness.config).park_result(
        job, PAID
    )
    return job_id


def _run_reading_the_input(
    harness: Harness,
    faults: AwsFaults,
    provider: ScriptedProvider,
    job_id: str,
    as_it_is_read: Callable[..., None],
) -> Exception | None:
    """The job's next attempt (worker-2, 16 s of its Lambda), `as_it_is_read` called as its
    input is read from S3; the faults disarmed after."""
    s3 = aws.client("s3")
    # (first: before the faults armed on the same call refuse it)
    s3.meta.events.register_first("before-call.s3.GetObject", as_it_is_read)
    try:
        return _run(_runner(harness, provider), job_id, owner="worker-2", seconds=16)
    finally:
        s3.meta.events.unregister("before-call.s3.GetObject", as_it_is_read)
        faults.disarm()


def test_a_cancel_while_the_input_cannot_be_read_never_throws_away_a_parked_paid_result(
    s3_held: Harness, faults: AwsFaults
) -> None:
    harness = s3_held
    # Given a job with an S3-held input whose attempt paid for its result, parked it, crashed
    job_id = _parked_with_its_input_in_s3(harness)
    canceled: list[int] = []

    def client_cancels(**_: Any) -> None:
        if not canceled:
            canceled.append(harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status)

    # And S3 failing (the look for what was parked, then the input's read), the client
    # canceling while the worker reads the input (after the claim's own cancel check)
    faults.arm("throttle", "s3.HeadObject", times=10_000)
    faults.arm("throttle", "s3.GetObject", times=10_000)
    provider = ScriptedProvider([JobResult(output="paid twice", finish_reason="stop", usage=Usage())])
    outcome = _run_reading_the_input(harness, faults, provider, job_id, client_cancels)
    # Then nothing is written while S3 cannot say what was paid for: the job ends once the
    # lease lapses, looking again
    assert canceled == [202] and provider.calls == 0
    assert type(outcome).__name__ == "RetryLater"
    assert _job(harness, job_id)["status"] == "running"
    _lapse_lease(harness, job_id)
    assert _run(_runner(harness, provider), job_id, owner="worker-3") is None
    # And, S3 back, what was paid for is recorded: not thrown away for the cancel
    assert provider.calls == 0
    _succeeded_with_the_parked_result(harness, job_id)


def test_a_cancel_met_after_a_slow_input_read_looks_again_for_what_was_paid_for(
    s3_held: Harness, faults: AwsFaults
) -> None:
    harness = s3_held
    # Given a job with an S3-held input whose attempt paid for its result, parked it, crashed
    job_id = _parked_with_its_input_in_s3(harness)
    canceled: list[int] = []

    def s3_back_slowly_and_a_cancel(**_: Any) -> None:
        # (S3 answers again, slowly, as the input is read; the client cancels meanwhile)
        if not canceled:
            faults.disarm()
            time.sleep(1.1)
            canceled.append(harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status)

    # And S3 failing the look for what was parked
    faults.arm("throttle", "s3.HeadObject", times=10_000)
    provider = ScriptedProvider([JobResult(output="paid twice", finish_reason="stop", usage=Usage())])
    outcome = _run_reading_the_input(harness, faults, provider, job_id, s3_back_slowly_and_a_cancel)
    # Then, S3 answering again, the cancel looks once more and finds what was paid for: the job
    # succeeds with it now, not after its lease, and the provider is not called
    assert canceled == [202] and outcome is None
    assert provider.calls == 0
    _succeeded_with_the_parked_result(harness, job_id)


def test_a_claim_whose_look_for_a_parked_result_is_throttled_looks_again_before_running(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a job whose attempt paid for its result, parked it and crashed
    job_id = _parked(harness)
    # When its next claim's look is throttled past botocore's own tries, twice
    faults.arm("throttle", "s3.HeadObject", times=2)
    provider = ScriptedProvider([JobResult(output="paid twice", finish_reason="stop", usage=Usage())])
    outcome = _run(_runner(harness, provider), job_id, owner="worker-2", seconds=30)
    faults.disarm()
    # Then it looks again, finds what was paid for and records it: the provider is not called
    assert outcome is None
    assert provider.calls == 0
    _succeeded_with_the_parked_result(harness, job_id)


def test_a_cancel_that_comes_while_the_look_for_a_parked_result_is_slow_is_never_sent(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a crashed job (nothing parked) whose next claim's look at S3 is throttled, and a
    # client that cancels meanwhile
    job_id = harness.submit(webhook=HOOK).body["id"]
    _crashed(harness, job_id)
    canceled: list[int] = []

    def client_cancels(**_: Any) -> None:
        if not canceled:
            canceled.append(harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status)

    aws.client("s3").meta.events.register("before-call.s3.HeadObject", client_cancels)
    faults.arm("throttle", "s3.HeadObject", times=1000)
    provider = ScriptedProvider([OK])
    try:
        outcome = _run(_runner(harness, provider), job_id, owner="worker-2", seconds=20)
    finally:
        aws.client("s3").meta.events.unregister("before-call.s3.HeadObject", client_cancels)
        faults.disarm()
    # Then the provider is never called; S3 could not say whether anything was paid for, so
    # the job is left to end when its lease lapses (looking once more)
    assert canceled == [202]
    assert type(outcome).__name__ == "RetryLater" and provider.calls == 0
    _lapse_lease(harness, job_id)
    assert _run(_runner(harness, provider), job_id, owner="worker-3") is None
    # And it ends canceled, as its 202 said
    assert provider.calls == 0
    assert _job(harness, job_id)["status"] == "canceled"


def test_a_result_write_that_never_answers_is_cut_short_in_time_to_park_the_result(harness: Harness) -> None:
    # Given a paid result whose write DynamoDB takes and never answers: each of botocore's own
    # tries waits out its read timeout, together far longer than the Lambda has left
    from botocore.exceptions import ReadTimeoutError

    job_id = harness.submit().body["id"]
    writes = [0]
    answered = threading.Event()
    seconds = 8.0
    began = time.monotonic()
    left_when_parked: list[float] = []

    def never_answers(**_: Any) -> None:
        writes[0] += 1
        if writes[0] > 1:  # (the claim went in)
            answered.wait(30)
            raise ReadTimeoutError(endpoint_url="https://dynamodb")

    def parking(**_: Any) -> None:
        left_when_parked.append(seconds - (time.monotonic() - began))
        answered.set()  # (the hung write gives up at once now: the test need not wait for it)

    aws.client("dynamodb").meta.events.register("before-send.dynamodb.TransactWriteItems", never_answers)
    aws.client("s3").meta.events.register("before-call.s3.PutObject", parking)
    try:
        outcome = _run(_runner(harness, ScriptedProvider([OK])), job_id, seconds=seconds)
    finally:
        aws.client("dynamodb").meta.events.unregister(
            "before-send.dynamodb.TransactWriteItems", never_answers
        )
        aws.client("s3").meta.events.unregister("before-call.s3.PutObject", parking)
    # Then the worker stops waiting for it while the Lambda has time left to park the result,
    # and parks it: the next attempt records it instead of paying again
    assert isinstance(outcome, StoreUnavailable)
    assert len(left_when_parked) == 1 and left_when_parked[0] > 1.0
    stored = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb")).find(
        job_id
    )
    assert stored is not None
    payloads = PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3"))
    assert Offload(payloads, harness.config).parked_result(stored) == OK


def test_parking_a_result_waits_no_longer_than_the_lambda_has_left(
    harness: Harness, faults: AwsFaults, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a result write DynamoDB refuses for good, and S3 hanging on the park as well
    job_id = harness.submit().body["id"]
    lag = [0.0]
    writes = [0]

    def slow_refusals(**_: Any) -> None:
        writes[0] += 1
        if writes[0] > 1:  # (the claim went in; the result write's refusal took most of the time left)
            lag[0] = 7.5

    aws.client("dynamodb").meta.events.register("before-call.dynamodb.TransactWriteItems", slow_refusals)
    faults.arm("throttle", "dynamodb.TransactWriteItems", nth=2, times=1000)
    aws.client("s3").meta.events.register("before-call.s3.PutObject", lambda **_: time.sleep(1.0))
    outcome = _run(_runner(harness, ScriptedProvider([OK])), job_id, seconds=8, lag=lag)
    # Then the worker gives up on the park within what was left, and answers for its batch
    assert isinstance(outcome, StoreUnavailable)
    gave_up = [r for r in caplog.records if r.getMessage() == "outcome write failed, and parking it too"]
    assert [getattr(r, "error_class", None) for r in gave_up] == ["TimeoutError"]


def test_a_parked_result_belongs_to_its_own_job_only(s3_held: Harness) -> None:
    # Given a result parked for a job under an Idempotency-Key whose retention has ended
    harness = s3_held
    offload = Offload(PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")), harness.config)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    old = jobs.find(harness.submit(key="nightly").body["id"])
    assert old is not None
    offload.park_result(old, OK)
    # When a new job takes the same id (the key used again), Then it finds nothing parked
    reused = old.model_copy(update={"created_ms": old.created_ms + 8 * 86_400_000})
    assert offload.parked_result(reused) is None
    assert offload.parked_result(old) == OK


def test_a_throttled_claim_comes_back_after_its_possible_lease(harness: Harness, faults: AwsFaults) -> None:
    # Given a table that throttles every claim, and every read of the job
    job_id = harness.submit().body["id"]
    faults.arm("throttle", "dynamodb.TransactWriteItems", times=1000)
    faults.arm("throttle", "dynamodb.GetItem", times=1000)
    # When a worker with 20 s left tries
    outcome = _run(_runner(harness, ScriptedProvider([OK])), job_id, seconds=20)
    # Then the message comes back only once a lease it may have taken has lapsed
    lease = 20 + harness.config.lease_margin_seconds
    assert type(outcome).__name__ == "RetryLater"
    assert lease - 6 <= outcome.delay_seconds <= lease * 1.1  # type: ignore[union-attr]


def test_a_throttled_claim_that_a_read_shows_untaken_comes_back_as_a_copy_spending_no_receive(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a table that throttles every claim, but answers a read of the job
    job_id = harness.submit().body["id"]
    faults.arm("throttle", "dynamodb.TransactWriteItems", times=1000)
    lane = harness.stack.lane_queue_urls["high"]
    messages = _with_delayed(harness, lane)
    # When a worker with 300 s left tries
    outcome = _run(_runner(harness, ScriptedProvider([OK])), job_id, seconds=300)
    # Then the read shows no claim was applied: a copy of the message comes back after a lease
    # (throttled claims must not storm the table), and no receive is spent on it (review 256:
    # returning in seconds, a never-run job failed worker_crashed in a minute and a half)
    assert outcome is None
    assert _with_delayed(harness, lane) == messages + 1
    assert (_job(harness, job_id)["status"], _job(harness, job_id)["attempts"]) == ("queued", 0)


# ---- a parked result ends the job, whatever ends it ---------------------------------------

PAID = JobResult(output="paid once", finish_reason="stop", usage=Usage(output_tokens=2))
HOOK = {"url": "http://127.0.0.1:9/hook"}


def _crashed(harness: Harness, job_id: str, **changes: Any) -> JobRecord:
    """The job, claimed by a worker that then crashed: its lease of 0.2 s lapsed. `changes` are
    set on its item (attributes: values). The job as the claim took it."""
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claimed = jobs.claim(
        job_id, "crashed-worker", lease_seconds=0.2, tenant=(ENTERPRISE["tenant_id"], "high")
    )
    assert claimed.outcome is ClaimOutcome.CLAIMED and claimed.job is not None
    for name, value in changes.items():
        harness.ddb.update_item(
            TableName=harness.stack.jobs_table,
            Key={"pk": {"S": job_id}},
            UpdateExpression="SET #n = :v",
            ExpressionAttributeNames={"#n": name},
            ExpressionAttributeValues={":v": value},
        )
    time.sleep(0.3)
    return claimed.job


def _parked(harness: Harness, result: JobResult = PAID, key: str | None = None, **changes: Any) -> str:
    """A job whose attempt paid for `result`, parked it (its write refused), and then crashed
    (`_crashed`, with `changes`)."""
    job_id: str = harness.submit(webhook=HOOK, key=key).body["id"]
    job = _crashed(harness, job_id, **changes)
    Offload(PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")), harness.config).park_result(
        job, result
    )
    return job_id


def _slot_given_back(harness: Harness, job_id: str) -> bool:
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    return job_id not in share.holders.get("high", {})


def _succeeded_with_the_parked_result(harness: Harness, job_id: str) -> None:
    job = _job(harness, job_id)
    assert (job["status"], job["result"]["output"], job.get("error")) == ("succeeded", "paid once", None)
    assert _slot_given_back(harness, job_id)
    webhooks = [webhook_message(m) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert webhooks == [{"job_id": job_id, "event": "job.succeeded"}]


def _next_look_records_the_parked_result(harness: Harness, job_id: str) -> None:
    """The job's message, reaching a worker, ends it with what was paid for: never paid again."""
    provider = ScriptedProvider([OK])
    assert _run(_runner(harness, provider), job_id, owner="worker-2") is None
    assert provider.calls == 0
    _succeeded_with_the_parked_result(harness, job_id)


def _looked_at_before_and_after_s3_answers(
    harness: Harness, faults: AwsFaults, job_id: str
) -> ScriptedProvider:
    """The job's message reaches a worker while S3 still fails, and again once it answers."""
    provider = ScriptedProvider([OK])
    _run(_runner(harness, provider), job_id, owner="worker-2")
    faults.disarm()
    _run(_runner(harness, provider), job_id, owner="worker-3")
    return provider


def _past_ms() -> dict[str, str]:
    return {"N": str(int(time.time() * 1000) - 1)}


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"attempts": {"N": "3"}}, id="attempts used up"),
        pytest.param({"deadline_ms": _past_ms()}, id="deadline passed"),
        pytest.param({"cancel_requested": {"BOOL": True}}, id="cancel asked"),
    ],
)
def test_a_claim_that_would_end_a_crashed_job_records_its_parked_result_instead(
    harness: Harness, changes: dict[str, Any]
) -> None:
    # Given a job whose paid result was parked, then its worker crashed, and what would end it
    # without another run: its last attempt used, its deadline passed, or a cancel asked
    job_id = _parked(harness, **changes)
    harness.receive(harness.stack.webhook_queue_url, visibility=0)  # (none yet)
    # When its message comes back to a worker
    provider = ScriptedProvider([OK])
    assert _run(_runner(harness, provider), job_id, owner="worker-2") is None
    # Then the job succeeds with what was paid for, unpaid again, its slot given back and
    # its webhook sent: not failed worker_crashed, deadline_exceeded, or canceled
    assert provider.calls == 0
    _succeeded_with_the_parked_result(harness, job_id)


def test_a_never_run_job_ending_at_its_claim_looks_for_nothing_parked(harness: Harness) -> None:
    # Given a queued job that never ran, whose deadline passed
    job_id = harness.submit(deadline_seconds=60).body["id"]
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET deadline_ms = :past",
        ExpressionAttributeValues={":past": _past_ms()},
    )
    heads: list[str] = []
    aws.client("s3").meta.events.register(
        "before-parameter-build.s3.HeadObject", lambda params, **_: heads.append(params["Key"])
    )
    # When a copy of its message reaches a worker
    assert _run(_runner(harness, ScriptedProvider([OK])), job_id) is None
    # Then it ends expired, and no S3 request was spent looking for a result it cannot have
    assert _job(harness, job_id)["status"] == "expired"
    assert heads == []


def test_a_parked_result_is_not_lost_while_s3_cannot_say(harness: Harness, faults: AwsFaults) -> None:
    # Given a job with a parked result and no attempt left, and S3 failing the look for it
    job_id = _parked(harness, attempts={"N": "3"})
    faults.arm("server_error", "s3.HeadObject", times=10)
    # When its message comes back to a worker
    outcome = _run(_runner(harness, ScriptedProvider([OK])), job_id, owner="worker-2")
    # Then the message comes back soon at its first receive (later at each next: hunt 291),
    # the job not failed meanwhile
    assert type(outcome).__name__ == "RetryLater"
    assert outcome.delay_seconds <= 30  # type: ignore[union-attr]
    assert _job(harness, job_id)["status"] == "running"
    # And once S3 answers, the result is recorded
    faults.disarm()
    assert _run(_runner(harness, ScriptedProvider([OK])), job_id, owner="worker-3") is None
    _succeeded_with_the_parked_result(harness, job_id)


def _scheduled_reconciler(harness: Harness, monkeypatch: pytest.MonkeyPatch, offset: float) -> Any:
    """The reconciler's handler, its clock `offset` seconds ahead, its role's clients."""
    module = load_handler("reconciler")
    env = module.ENV
    later = Reconciler(
        JobRepository(
            env.jobs_table, env.config, dynamodb=aws.client("dynamodb"), clock=lambda: time.time() + offset
        ),
        QueueRepository(env.lane_queue_urls, env.webhook_queue_url, sqs=aws.client("sqs")),
        env.config,
        offload=Offload(PayloadStore(env.payload_bucket, s3=aws.client("s3")), env.config),
    )
    monkeypatch.setattr(module, "reconciler", lambda: later)
    return module


@pytest.mark.parametrize("attempts", [1, 3], ids=["attempts left", "attempts used up"])
def test_the_reconciler_records_a_crashed_jobs_parked_result_instead_of_running_or_failing_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, attempts: int
) -> None:
    # Given a job whose paid result was parked before its worker crashed
    job_id = _parked(harness, attempts={"N": str(attempts)})
    lane = harness.stack.lane_queue_urls["high"]
    messages = harness.total_count(lane)
    # When the scheduled reconciler finds its lease lapsed
    grace = harness.config.reconciler.expired_lease_grace_seconds
    module = _scheduled_reconciler(harness, monkeypatch, grace + 1.0)
    report = module.handler({"source": "aws.events"}, LambdaContextStub())
    # Then the job succeeds with it: not sent to run (and be paid for) again, nor failed
    assert report["recovered"] == 1
    assert harness.total_count(lane) == messages
    _succeeded_with_the_parked_result(harness, job_id)


def test_a_parked_result_too_large_for_the_item_is_served_from_where_it_was_parked(
    s3_held: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose parked result does not fit in its item (items hold 4 KB here)
    harness = s3_held
    large = PAID.model_copy(update={"output": "paid once " + "x" * 6000})
    job_id = _parked(harness, result=large)
    # When the reconciler records it
    grace = harness.config.reconciler.expired_lease_grace_seconds
    _scheduled_reconciler(harness, monkeypatch, grace + 1.0).handler({}, LambdaContextStub())
    # Then a poll serves the whole result, read where it was parked
    job = _job(harness, job_id)
    assert (job["status"], job["result"]["output"]) == ("succeeded", large.output)
    assert _item(harness, job_id)["result_ref"]["S"].startswith("results/parked/")


def test_a_dead_letter_of_a_job_with_a_parked_result_records_it_instead_of_failing_it(
    harness: Harness,
) -> None:
    # Given a job whose paid result was parked, whose message then exhausted its receives
    job_id = _parked(harness)
    letters = _lane_messages(harness, job_id)
    # When the dead-letter function handles the letter
    harness.dead_letter("high", letters)
    # Then the job succeeds with what was paid for, not worker_crashed
    _succeeded_with_the_parked_result(harness, job_id)


def _requeued_with_a_parked_result(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults, **changes: Any
) -> str:
    """A job whose attempt paid, parked its result and crashed, and which the reconciler then
    queued again because S3 could not say, at its look, what was parked."""
    job_id = _parked(harness, **changes)
    faults.arm("server_error", "s3.HeadObject", times=1000)
    grace = harness.config.reconciler.expired_lease_grace_seconds
    _scheduled_reconciler(harness, monkeypatch, grace + 1.0).handler({}, LambdaContextStub())
    faults.disarm()
    assert _job(harness, job_id)["status"] == "queued"
    harness.receive(harness.stack.webhook_queue_url, visibility=0)  # (none)
    return job_id


def test_a_cancel_of_a_job_queued_again_with_a_parked_result_ends_it_with_that_result(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults
) -> None:
    # Given a job queued again while its paid result waits in S3, unseen
    job_id = _requeued_with_a_parked_result(harness, monkeypatch, faults)
    # When the client cancels it
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    # Then the cancel finds it finished with what was paid for, as for any job that finished
    # first: not canceled with the paid result thrown away
    assert (reply.status, reply.body["code"]) == (409, "job_not_cancelable")
    _succeeded_with_the_parked_result(harness, job_id)
    # And its message, when it comes, runs nothing
    provider = ScriptedProvider([OK])
    _run(_runner(harness, provider), job_id, owner="worker-2")
    assert provider.calls == 0


def test_a_cancel_of_a_job_queued_again_while_s3_cannot_say_is_asked_and_the_claim_looks_first(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults
) -> None:
    # Given a job queued again while its paid result waits in S3, unseen, and S3 still failing
    job_id = _requeued_with_a_parked_result(harness, monkeypatch, faults)
    faults.arm("server_error", "s3.HeadObject", times=1000)
    # When the client cancels it
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    # Then the cancel is asked, not done: the job stays queued, flagged, and nothing is sent
    assert (reply.status, reply.body["status"], reply.body["cancel_requested"]) == (202, "queued", True)
    assert harness.receive(harness.stack.webhook_queue_url, visibility=0) == []
    # And its message, reaching a worker once S3 answers, ends it with what was paid for
    faults.disarm()
    _next_look_records_the_parked_result(harness, job_id)


def _backing_off_for_an_hour(harness: Harness) -> str:
    """A job whose first attempt met a 429 asking for an hour: queued again, its message hidden
    for that long."""
    job_id = harness.submit(webhook=HOOK).body["id"]
    assert len(harness.receive(harness.stack.lane_queue_urls["high"], visibility=3600)) == 1
    provider = ScriptedProvider([TransientProviderError("busy", 429, retry_after=3600.0), OK])
    assert type(_run(_runner(harness, provider), job_id)).__name__ == "RetryLater"
    assert (_job(harness, job_id)["status"], provider.calls) == ("queued", 1)
    return job_id


def _canceled_by_its_claim(harness: Harness, job_id: str) -> None:
    """The lane's visible message for the job is claimed, and the job ends canceled unrun."""
    lane = harness.stack.lane_queue_urls["high"]
    messages = [m for m in harness.receive(lane) if json.loads(m["Body"])["job_id"] == job_id]
    assert messages, "no message to end the canceled job"
    harness.run_worker(lane, messages)
    job = _job(harness, job_id)
    assert (job["status"], job["attempts"]) == ("canceled", 1)


def test_a_cancel_in_a_retry_backoff_that_s3_cannot_answer_ends_the_job_within_seconds(
    harness: Harness, faults: AwsFaults
) -> None:
    """Hunt 222: the cancel was asked, not done, and nothing ended the job until its message
    came back from the backoff (up to 12 hours), the job counting in the tenant's quota."""
    # Given a job backing off for an hour, and S3 failing as the client cancels it
    job_id = _backing_off_for_an_hour(harness)
    faults.arm("server_error", "s3.HeadObject", times=1000)
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    assert (reply.status, reply.body["status"], reply.body["cancel_requested"]) == (202, "queued", True)
    # Then a message for its claim is sent at once, and that claim ends it canceled unrun
    _canceled_by_its_claim(harness, job_id)


def test_a_cancel_in_a_retry_backoff_whose_message_sqs_refuses_is_ended_through_the_next_reconciler_run(
    harness: Harness, faults: AwsFaults, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job backing off for an hour, and S3 and SQS both failing as the client cancels it
    job_id = _backing_off_for_an_hour(harness)
    faults.arm("server_error", "s3.HeadObject", times=1000)
    faults.arm("throttle", "sqs.SendMessage", times=1000)
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    assert (reply.status, reply.body["status"], reply.body["cancel_requested"]) == (202, "queued", True)
    assert harness.receive(harness.stack.lane_queue_urls["high"], visibility=0) == []
    # When the reconciler runs next (its sweep put the flagged job first)
    _scheduled_reconciler(harness, monkeypatch, 60.0).handler({}, LambdaContextStub())
    # Then it sent the job a message, and that claim ends it canceled unrun
    _canceled_by_its_claim(harness, job_id)


def test_a_flagged_cancel_never_takes_the_message_another_job_lost(
    harness: Harness, faults: AwsFaults, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 224: the flagged job took the lane's one missing message (it has its own, hidden
    for its backoff), and the job that had lost its message waited another stale period."""
    # Given a job backing off, flagged for a cancel neither S3 nor SQS let the API finish
    lane = harness.stack.lane_queue_urls["high"]
    flagged = _backing_off_for_an_hour(harness)
    # And another job whose message was lost unseen
    lost = harness.submit(prompt="lost").body["id"]
    (message,) = harness.receive(lane)
    harness.sqs.delete_message(QueueUrl=lane, ReceiptHandle=message["ReceiptHandle"])
    faults.arm("server_error", "s3.HeadObject", times=1000)
    faults.arm("throttle", "sqs.SendMessage", times=1000)
    reply = harness.api("POST", f"/v1/jobs/{flagged}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    assert (reply.status, reply.body["cancel_requested"]) == (202, True)
    # When the reconciler runs once the lost one is stale
    stale = harness.config.reconciler.stale_queued_seconds + 60
    _scheduled_reconciler(harness, monkeypatch, stale).handler({}, LambdaContextStub())
    # Then both have a message: the lost job its missing one, the flagged job one of its own
    sent = sorted(json.loads(m["Body"])["job_id"] for m in harness.receive(lane, visibility=0))
    assert sent == sorted([flagged, lost])


def test_a_cancel_of_a_job_queued_again_with_nothing_parked_cancels_it_at_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose worker crashed before it paid for anything, queued again
    job_id = harness.submit(webhook=HOOK).body["id"]
    _crashed(harness, job_id)
    grace = harness.config.reconciler.expired_lease_grace_seconds
    _scheduled_reconciler(harness, monkeypatch, grace + 1.0).handler({}, LambdaContextStub())
    assert _job(harness, job_id)["status"] == "queued"
    # When the client cancels it
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    # Then it is canceled at once, as any queued job is
    assert (reply.status, reply.body["status"]) == (200, "canceled")


def test_the_reconciler_ends_a_job_queued_again_past_its_deadline_with_its_parked_result(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults
) -> None:
    # Given a job queued again while its paid result waits in S3, unseen, whose deadline then
    # passes before a worker claims it
    job_id = _requeued_with_a_parked_result(harness, monkeypatch, faults)
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET deadline_ms = :past",
        ExpressionAttributeValues={":past": _past_ms()},
    )
    # When the reconciler's next run sweeps it
    stale = harness.config.reconciler.stale_queued_seconds
    _scheduled_reconciler(harness, monkeypatch, stale + 1.0).handler({}, LambdaContextStub())
    # Then it succeeds with what was paid for: not expired
    _succeeded_with_the_parked_result(harness, job_id)


def test_a_parked_result_never_ends_a_new_job_that_took_its_id(harness: Harness) -> None:
    # Given a job (under an Idempotency-Key) that paid, parked its result and crashed, and whose
    # retention then ended, its item not yet deleted
    job_id = _parked(harness, key="nightly", expires_at={"N": str(int(time.time()) - 5)})
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    stale = jobs.find(job_id, past_retention=True)
    assert stale is not None

    # When, while its parked result is looked for, the client uses the key again for a new
    # request, which takes the id
    reused: list[str] = []

    def client_reuses_key(**_: Any) -> None:
        aws.client("s3").meta.events.unregister("before-call.s3.HeadObject", client_reuses_key)
        again = harness.submit(key="nightly", webhook=HOOK, prompt="a new question")
        reused.append(f"{again.body['id']} {again.body['status']}")

    aws.client("s3").meta.events.register("before-call.s3.HeadObject", client_reuses_key)
    offload = Offload(PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")), harness.config)
    assert offload.record_parked(jobs, stale, ends=True) is None
    assert reused == [f"{job_id} queued"]
    # Then the new job waits to run its own request: it never gets the old one's answer
    job = _job(harness, job_id)
    assert (job["status"], job.get("result")) == ("queued", None)


def test_a_parked_result_is_recorded_before_an_input_s3_will_not_give_back_now(
    s3_held: Harness, faults: AwsFaults
) -> None:
    # Given a job whose input lives in S3, whose first attempt paid, parked its result and
    # crashed, and S3 refusing to give back inputs for a while
    harness = s3_held
    job_id = harness.submit(prompt="x" * 8000).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claimed = jobs.claim(
        job_id, "crashed-worker", lease_seconds=0.2, tenant=(ENTERPRISE["tenant_id"], "high")
    )
    assert claimed.job is not None
    Offload(PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")), harness.config).park_result(
        claimed.job, PAID
    )
    time.sleep(0.3)

    def inputs_throttled(params: dict[str, Any], **_: Any) -> None:
        if params["Key"].startswith("inputs/"):
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "injected"}}, "GetObject")

    aws.client("s3").meta.events.register("before-parameter-build.s3.GetObject", inputs_throttled)
    # When the job's next attempt claims it
    provider = ScriptedProvider([OK])
    assert _run(_runner(harness, provider), job_id, owner="worker-2") is None
    # Then the parked result is recorded, unpaid again, without waiting for the input
    assert provider.calls == 0
    job = _job(harness, job_id)
    assert (job["status"], job["result"]["output"]) == ("succeeded", "paid once")


@pytest.mark.parametrize(
    ("attempts", "lapsed_for", "status"),
    [
        pytest.param(1, 1.0, "queued", id="attempts left: queued again, its next claim looks"),
        pytest.param(3, 1.0, "running", id="ending, lapsed just now: looked for again next run"),
        pytest.param(3, 400.0, "failed", id="ending, lapsed long ago: ended without the look"),
    ],
)
def test_s3_failing_never_holds_a_crashed_jobs_slot_for_good(
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
    faults: AwsFaults,
    attempts: int,
    lapsed_for: float,
    status: str,
) -> None:
    # Given a crashed job holding its tenant's slot, and S3 failing every look for a parked result
    job_id = harness.submit().body["id"]
    _crashed(harness, job_id, attempts={"N": str(attempts)})
    faults.arm("server_error", "s3.HeadObject", times=1000)
    # When the scheduled reconciler finds its lease lapsed, `lapsed_for` seconds ago
    grace = harness.config.reconciler.expired_lease_grace_seconds
    _scheduled_reconciler(harness, monkeypatch, grace + lapsed_for).handler({}, LambdaContextStub())
    # Then a job that runs again is queued again at once, its slot given back (its next claim
    # looks for a parked result); one that would end waits for S3, but only for a while
    assert _item(harness, job_id)["status"]["S"] == status
    assert _slot_given_back(harness, job_id) is (status != "running")


def test_a_parked_result_recorded_by_a_claim_leaves_no_run_time_for_the_tenants_deferrals(
    harness: Harness,
) -> None:
    # Given a crashed job with a parked result, and attempts left
    job_id = _parked(harness)
    # When its next attempt claims it and records the parked result, in milliseconds
    assert _run(_runner(harness, ScriptedProvider([OK])), job_id, owner="worker-2") is None
    assert _job(harness, job_id)["status"] == "succeeded"
    # Then the tenant's share keeps no run time from it: the deferrals of its capped backlog
    # would otherwise take a generation for a few milliseconds long, and spin
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    assert share.last_runs == {}


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"cancel_requested": {"BOOL": True}}, id="cancel asked"),
        pytest.param({"deadline_ms": {"N": str(int(time.time() * 1000) + 500)}}, id="deadline passed"),
    ],
)
def test_a_crashed_job_that_would_end_gives_its_slot_back_while_s3_cannot_say_what_it_parked(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults, changes: dict[str, Any]
) -> None:
    # Given a job that paid, parked its result and crashed, and would now end (a cancel asked,
    # its deadline passed), with S3 failing every look for what it parked
    job_id = _parked(harness, **changes)
    assert not _slot_given_back(harness, job_id)
    faults.arm("server_error", "s3.HeadObject", times=1000)
    # When the reconciler's next run finds its lease lapsed
    grace = harness.config.reconciler.expired_lease_grace_seconds
    _scheduled_reconciler(harness, monkeypatch, grace + 1.0).handler({}, LambdaContextStub())
    # Then its slot comes back within that run, the job queued again, neither ended nor lost
    assert _slot_given_back(harness, job_id)
    assert _job(harness, job_id)["status"] == "queued"
    # And once S3 answers, its message ends it with what was paid for, never paid again
    faults.disarm()
    _next_look_records_the_parked_result(harness, job_id)


def test_a_crashed_job_out_of_attempts_waits_for_s3_rather_than_run_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults
) -> None:
    # Given a job that paid, parked its result and crashed on its last attempt, S3 failing
    job_id = _parked(harness, attempts={"N": str(harness.config.max_attempts)})
    faults.arm("server_error", "s3.HeadObject", times=1000)
    # When the reconciler's next run finds its lease lapsed
    grace = harness.config.reconciler.expired_lease_grace_seconds
    report = _scheduled_reconciler(harness, monkeypatch, grace + 1.0).handler({}, LambdaContextStub())
    # Then it is left running for a later look (queued, it would be claimed a fourth time)
    assert report["skipped"] == 1
    assert _job(harness, job_id)["status"] == "running"


def test_a_cancel_that_finds_a_parked_result_answers_409_even_when_sqs_throttles_its_event(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults
) -> None:
    # Given a job queued again while its paid result waits in S3, unseen
    job_id = _requeued_with_a_parked_result(harness, monkeypatch, faults)
    # When the client cancels it while SQS throttles the event's send
    faults.arm("throttle", "sqs.SendMessage", times=50)
    reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    faults.disarm()
    # Then it answers as for any job that finished first, not a 503 to retry: the job has its
    # result, and its event is left pending for the reconciler
    assert (reply.status, reply.body["code"]) == (409, "job_not_cancelable")
    job = _job(harness, job_id)
    assert (job["status"], job["webhook"]["delivery"]["status"]) == ("succeeded", "pending")


def test_a_job_the_reconciler_retires_as_a_cancel_lands_ends_canceled_and_is_reported_so(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a queued job whose retention is about to end
    job_id = harness.submit(webhook=HOOK).body["id"]
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET expires_at = :soon",
        ExpressionAttributeValues={":soon": {"N": str(int(time.time()) + 60)}},
    )
    landed: list[str] = []

    def cancel_lands_first(params: dict[str, Any], **_: Any) -> None:
        if not landed and "expires_at <= :soon_s" in str(params):
            # When the client's cancel lands between the reconciler's read and its expiry
            landed.append(job_id)
            harness.ddb.update_item(
                TableName=harness.stack.jobs_table,
                Key={"pk": {"S": job_id}},
                UpdateExpression="SET cancel_requested = :t",
                ExpressionAttributeValues={":t": {"BOOL": True}},
            )

    ddb = aws.client("dynamodb")
    ddb.meta.events.register("before-parameter-build.dynamodb.TransactWriteItems", cancel_lands_first)
    try:
        stale = harness.config.reconciler.stale_queued_seconds
        report = _scheduled_reconciler(harness, monkeypatch, stale + 1.0).handler({}, LambdaContextStub())
    finally:
        ddb.meta.events.unregister("before-parameter-build.dynamodb.TransactWriteItems", cancel_lands_first)
    # Then it ends canceled, as asked, and the run reports it so
    assert landed == [job_id]
    assert _job(harness, job_id)["status"] == "canceled"
    assert (report["canceled"], report["expired"]) == (1, 0)
    webhooks = [webhook_message(m) for m in harness.receive(harness.stack.webhook_queue_url)]
    assert webhooks == [{"job_id": job_id, "event": "job.canceled"}]


def test_a_crashed_job_near_its_retention_keeps_its_parked_result_through_a_short_s3_outage(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults
) -> None:
    # Given a job that paid, parked its result and crashed, within the last half of the
    # reconciler's margin before its retention ends, attempts left
    margin = harness.config.reconciler.retention_margin_seconds
    job_id = _parked(harness, expires_at={"N": str(int(time.time()) + margin // 2 - 600)})
    # When S3 fails for a few seconds: the reconciler's run and the message's next look
    faults.arm("server_error", "s3.HeadObject", times=1000)
    grace = harness.config.reconciler.expired_lease_grace_seconds
    _scheduled_reconciler(harness, monkeypatch, grace + 1.0).handler({}, LambdaContextStub())
    provider = _looked_at_before_and_after_s3_answers(harness, faults, job_id)
    # Then what was paid for is recorded, not thrown away as the job expires
    assert provider.calls == 0
    _succeeded_with_the_parked_result(harness, job_id)


def test_a_crashed_job_early_in_its_retention_margin_keeps_its_parked_result_through_an_s3_outage(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, faults: AwsFaults
) -> None:
    # Given a job that paid, parked its result and crashed, early in the reconciler's margin
    # before its retention ends, attempts left
    margin = harness.config.reconciler.retention_margin_seconds
    job_id = _parked(harness, expires_at={"N": str(int(time.time()) + margin - 600)})
    # When S3 fails through two reconciler runs, past stale_queued_seconds after the lapse
    faults.arm("server_error", "s3.HeadObject", times=1000)
    grace = harness.config.reconciler.expired_lease_grace_seconds
    stale = harness.config.reconciler.stale_queued_seconds
    _scheduled_reconciler(harness, monkeypatch, grace + 1.0).handler({}, LambdaContextStub())
    _scheduled_reconciler(harness, monkeypatch, grace + stale + 60.0).handler({}, LambdaContextStub())
    provider = _looked_at_before_and_after_s3_answers(harness, faults, job_id)
    # Then what was paid for is recorded once S3 answers: not thrown away as the job expires
    assert provider.calls == 0
    _succeeded_with_the_parked_result(harness, job_id)


def test_a_cancel_pending_end_s3_cannot_answer_stays_away_longer_at_each_receive(
    harness: Harness, faults: AwsFaults
) -> None:
    from llmq.sqs_edge import RetryLater

    # Given a job queued again after a 503 (one attempt paid for), whose cancel, with S3 down,
    # was answered 202 and sent a message (its claim looks for a parked result first)
    job_id = harness.submit().body["id"]
    provider = ScriptedProvider([TransientProviderError("busy", 503), OK])
    assert type(_run(_runner(harness, provider), job_id)).__name__ == "RetryLater"
    harness.let_backoffs_pass()
    faults.arm("throttle", "s3.HeadObject", times=10_000)
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 202
    # When that message's claim, received for the fifth time with S3 still failing, finds the
    # cancel and cannot look for the parked result
    runner = _runner(harness, provider)
    started = time.monotonic()
    invocation = Invocation(
        owner="worker-9", remaining_seconds=lambda: 300 - (time.monotonic() - started), receive_count=5
    )
    body = json.dumps({"job_id": job_id, "lane": "high", "tenant_id": ENTERPRISE["tenant_id"]})
    with pytest.raises(RetryLater) as later:
        asyncio.run(runner.run(body, invocation))
    # Then the message stays away as a refused claim's end AWS keeps refusing does at its
    # fifth receive, not 2-4 s (hunt 291: every receive came back in seconds, into the lane's
    # DLQ within a minute, which paged for a job its client had canceled); nothing was called
    assert later.value.delay_seconds >= 240
    assert provider.calls == 1
    assert _job(harness, job_id)["status"] == "queued"


@pytest.mark.parametrize("brown_out", [False, True], ids=["aws-answers-again", "the-brown-out-goes-on"])
def test_a_cancel_met_by_a_claim_given_back_ends_the_job_now_not_after_its_lease(
    harness: Harness, faults: AwsFaults, brown_out: bool
) -> None:
    # Given a job whose claim was applied with its answer lost, then throttled past its budget,
    # so its worker gives it back
    job_id = harness.submit().body["id"]
    _claim_lost_then_throttled(faults)
    replies: list[int] = []

    def client_cancels(**_: Any) -> None:
        # (the client, seeing the job running, cancels just as the worker looks to give it back)
        if replies:
            return
        faults.disarm()
        replies.append(0)
        canceling = threading.Thread(
            target=lambda: replies.append(
                harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status
            )
        )
        canceling.start()
        canceling.join()
        if brown_out:
            # (and the throttling goes on: the cancel's own write is refused too)
            faults.arm("throttle", "dynamodb.TransactWriteItems", times=100_000)

    provider = ScriptedProvider([OK])
    try:
        with on_aws_call("dynamodb", "before-call.dynamodb.GetItem", client_cancels):
            outcome = _run(_runner(harness, provider), job_id, seconds=60 if brown_out else 300)
    finally:
        faults.disarm()
    assert replies == [0, 202]
    assert provider.calls == 0
    if brown_out:
        # Then, the cancel's write refused for good, the message comes back after the lease,
        # within the give-back's budget (review 267: retried to the Lambda's end, then failed
        # as an unexpected error), and the job waits there, never run
        assert type(outcome).__name__ == "RetryLater", outcome
        assert _job(harness, job_id)["status"] == "running"
        return
    # Then the job, held by this worker and never run, ends canceled now, its slot given back
    # (hunt 291: it stayed running, holding the slot, until its lease lapsed)
    assert _job(harness, job_id)["status"] == "canceled"
    share = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    assert share.running == 0, outcome


def test_a_retry_whose_message_a_losing_copy_deleted_is_sent_again(
    harness: Harness, provider: FakeProviderServer
) -> None:
    url = harness.stack.lane_queue_urls["high"]
    # Given a job whose first provider call is slow and fails with a 503 (a transient error)
    job_id = harness.submit(prompt="[[latency:1.5]][[fail:503x1]] hi").body["id"]
    # And its one message received twice (SQS's at-least-once; the second receive is the newest)
    first = harness.receive(url, visibility=60)
    harness.sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=first[0]["ReceiptHandle"], VisibilityTimeout=0
    )
    second = harness.receive(url, visibility=60)
    assert first[0]["MessageId"] == second[0]["MessageId"]
    # When the first receive's worker claims the job and calls the provider, while the second's
    # finds the job leased elsewhere and acknowledges its copy, which deletes the message
    answers: dict[str, Any] = {}
    winner = threading.Thread(target=lambda: answers.__setitem__("first", harness.run_worker(url, first)))
    winner.start()
    time.sleep(0.7)
    answers["second"] = harness.run_worker(url, second)
    winner.join(30)
    assert answers["second"] == {"batchItemFailures": []}
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    queued = jobs.find(job_id)
    assert queued is not None and (queued.status, queued.attempts) == (JobStatus.QUEUED, 1)
    # Then the job, back to queued for its retry, has a message to bring it back (hunt 331: none,
    # until the reconciler's stale-queued sweep minutes later)
    counts = harness.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert harness.total_count(url) + int(counts["ApproximateNumberOfMessagesDelayed"]) == 1
    # And the retry runs from it, once its backoff is over: the job succeeds on its second call
    messages: list[dict[str, Any]] = []
    waited = time.monotonic() + 15
    while not messages and time.monotonic() < waited:
        messages = harness.receive(url)
        time.sleep(0.2)
    assert harness.run_worker(url, messages) == {"batchItemFailures": []}
    done = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (done["status"], done["attempts"], provider.calls_for(job_id)) == ("succeeded", 2, 2)
