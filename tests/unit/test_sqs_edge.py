"""The SQS edge protocol: how a record handler's outcome settles its message."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from llmq.config import MAX_VISIBILITY_SECONDS
from llmq.errors import StoreUnavailable
from llmq.queues import MAX_REDELIVERY_DELAY_SECONDS
from llmq.sqs_edge import PoisonMessage, QueueEdge, RetryLater
from tests.support.stores import InMemoryQueues


@dataclass(frozen=True)
class Record:
    message_id: str = "msg-1"
    receipt_handle: str = "receipt-1"
    body: str = '{"job_id": "job_1", "lane": "high"}'
    event_source_arn: str = "arn:aws:sqs:us-east-1:123456789012:llmq-lane-high"


def settle(edge: QueueEdge, error: Exception | None) -> Exception | None:
    """Run a record handler that raises `error` (or succeeds); what the batch processor sees."""
    try:
        with edge.settling(Record()):
            if error is not None:
                raise error
    except Exception as raised:
        return raised
    return None


@pytest.fixture
def queues() -> InMemoryQueues:
    return InMemoryQueues()


def edge_for(queues: InMemoryQueues, poison_visibility_seconds: float = 0) -> QueueEdge:
    return QueueEdge(
        queues=lambda: queues,
        job_of=lambda body: "job_1",
        poison_visibility_seconds=poison_visibility_seconds,
    )


def test_a_handled_message_is_acknowledged_untouched(queues: InMemoryQueues) -> None:
    assert settle(edge_for(queues), None) is None
    assert queues.visibility == []


def test_retry_later_hides_the_message_for_the_delay_and_reports_it_failed(queues: InMemoryQueues) -> None:
    retry = RetryLater("job_1", 42.5)
    assert settle(edge_for(queues), retry) is retry
    # Whole seconds, rounded up: a fractional Retry-After never comes early.
    assert queues.visibility == [("receipt-1", 43)]


def test_poison_comes_back_at_once_so_the_receive_count_carries_it_to_the_dlq(queues: InMemoryQueues) -> None:
    assert isinstance(settle(edge_for(queues), PoisonMessage("no job")), PoisonMessage)
    assert queues.visibility == [("receipt-1", 0)]


def test_poison_in_a_dlq_is_hidden_as_long_as_sqs_accepts_after_the_receive(queues: InMemoryQueues) -> None:
    # SQS refuses a visibility past 12 h from the receive (InvalidParameterValue), so asking
    # for the whole 43,200 s after the mapping received the batch would fail every time and
    # the message would come back after the queue's short timeout, for days.
    edge = edge_for(queues, poison_visibility_seconds=MAX_VISIBILITY_SECONDS)
    assert isinstance(settle(edge, PoisonMessage("no job")), PoisonMessage)
    assert queues.visibility == [("receipt-1", MAX_REDELIVERY_DELAY_SECONDS)]
    assert MAX_REDELIVERY_DELAY_SECONDS <= MAX_VISIBILITY_SECONDS - 900 - 300


class PoisonShelf:
    """A poison queue: what was set aside, or refusal with `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.set_aside: list[dict[str, str]] = []

    def __call__(self, body: str, *, source_arn: str, message_id: str, why: str) -> None:
        if self.error is not None:
            raise self.error
        self.set_aside.append({"body": body, "source_arn": source_arn, "message_id": message_id, "why": why})


def test_poison_set_aside_is_acknowledged_and_never_comes_back(queues: InMemoryQueues) -> None:
    shelf = PoisonShelf()
    edge = QueueEdge(
        queues=lambda: queues,
        job_of=lambda body: None,
        poison_visibility_seconds=300,
        set_aside=lambda: shelf,
    )
    # Acknowledged (nothing raised, so the mapping deletes it), its visibility untouched
    assert settle(edge, PoisonMessage("no job")) is None
    assert queues.visibility == []
    assert shelf.set_aside == [
        {
            "body": Record().body,
            "source_arn": Record().event_source_arn,
            "message_id": "msg-1",
            "why": "no job",
        }
    ]


def test_poison_that_cannot_be_set_aside_comes_back_after_the_poison_delay(queues: InMemoryQueues) -> None:
    shelf = PoisonShelf(StoreUnavailable("sqs.SendMessage: ThrottlingException after retries"))
    edge = QueueEdge(
        queues=lambda: queues,
        job_of=lambda body: None,
        poison_visibility_seconds=300,
        set_aside=lambda: shelf,
    )
    assert isinstance(settle(edge, PoisonMessage("no job")), PoisonMessage)
    assert queues.visibility == [("receipt-1", 300)]
    assert shelf.set_aside == []


def test_an_unexpected_error_is_reported_failed_and_returns_after_the_queue_timeout(
    queues: InMemoryQueues,
) -> None:
    assert isinstance(settle(edge_for(queues), KeyError("boom")), KeyError)
    assert queues.visibility == []


def test_a_throttled_visibility_change_still_reports_the_message_failed(queues: InMemoryQueues) -> None:
    queues.unavailable.add("delay_redelivery")
    retry = RetryLater("job_1", 10)
    assert settle(edge_for(queues), retry) is retry
    assert queues.visibility == []


class _SlowVisibility:
    """SQS that answers a visibility change only once `released` is set (or after 5 s)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.answered_after_release: list[bool] = []

    def delay_redelivery(self, queue_arn: str, receipt_handle: str, seconds: float) -> None:
        self.answered_after_release.append(self.released.wait(5.0))


def test_a_slow_visibility_change_of_one_record_never_stops_its_batchs_other_records() -> None:
    # Given a batch of two records on one loop: one is handed back (RetryLater), and SQS is
    # slow to answer its visibility change; the other still has work to do on the loop
    sqs = _SlowVisibility()
    edge = QueueEdge(queues=lambda: sqs, job_of=lambda body: "job_1")

    async def handed_back() -> None:
        async with edge.settling_async(Record(), lambda: 60.0):
            raise RetryLater("job_1", 30)

    async def still_working() -> None:
        for _ in range(3):
            await asyncio.sleep(0)  # (its answer read, its result write, ...)
        sqs.released.set()

    async def batch() -> list[BaseException | None]:
        return await asyncio.gather(handed_back(), still_working(), return_exceptions=True)

    # When the batch runs
    outcomes = asyncio.run(batch())
    # Then the other record went on while SQS took its time (SQS answered once it was done,
    # not after giving up on it), and the handed-back record is reported failed
    assert sqs.answered_after_release == [True]
    assert isinstance(outcomes[0], RetryLater) and outcomes[1] is None


def test_a_visibility_change_slower_than_the_invocation_is_given_up_and_the_record_reported_failed() -> None:
    # Given a record handed back with less than the invocation's last second left, and SQS slow
    sqs = _SlowVisibility()
    edge = QueueEdge(queues=lambda: sqs, job_of=lambda body: "job_1")

    answered_when_settled: list[list[bool]] = []

    async def handed_back() -> None:
        try:
            async with edge.settling_async(Record(), lambda: 0.5):
                raise RetryLater("job_1", 30)
        finally:
            answered_when_settled.append(list(sqs.answered_after_release))
            sqs.released.set()

    # When it settles, then it is reported failed while SQS has still not answered
    with pytest.raises(RetryLater):
        asyncio.run(handed_back())
    assert answered_when_settled == [[]]


class _HandleGone:
    """SQS whose message is gone (a copy's acknowledgement deleted it): visibility changes are
    refused as AWS refuses a receipt handle no longer in flight; sends are kept, or refused."""

    def __init__(self, refuse_sends: bool = False) -> None:
        self.sent: list[tuple[str, str, float]] = []
        self.refuse_sends = refuse_sends

    def delay_redelivery(self, queue_arn: str, receipt_handle: str, seconds: float) -> None:
        from botocore.exceptions import ClientError

        error = {"Error": {"Code": "ReceiptHandleIsInvalid", "Message": "gone"}}
        raise ClientError(error, "ChangeMessageVisibility")  # type: ignore[arg-type]

    def send_again(self, body: str, *, source_arn: str, delay_seconds: float) -> None:
        if self.refuse_sends:
            raise StoreUnavailable("sqs.SendMessage: throttled")
        self.sent.append((body, source_arn, delay_seconds))


@pytest.mark.parametrize("gave_back_slot", [True, False])
def test_a_job_handed_back_whose_message_is_gone_is_sent_again(gave_back_slot: bool) -> None:
    sqs = _HandleGone()
    edge = QueueEdge(queues=lambda: sqs, job_of=lambda body: "job_1", send_again=lambda: sqs.send_again)
    # When a record whose job was handed back to its queue (a retry's backoff) asks to come
    # back later, and its message is no longer there to delay
    retry = RetryLater("job_1", 7.5, gave_back_slot=gave_back_slot)
    assert settle(edge, retry) is retry
    # Then it is sent again, after the delay, to the queue it came from (hunt 331); a record
    # whose job was not handed back (a deferral: its job is someone else's now) is not
    expected = [(Record.body, Record.event_source_arn, 7.5)] if gave_back_slot else []
    assert sqs.sent == expected


def test_a_send_again_refused_leaves_the_job_to_the_reconciler_and_reports_the_record_failed() -> None:
    sqs = _HandleGone(refuse_sends=True)
    edge = QueueEdge(queues=lambda: sqs, job_of=lambda body: "job_1", send_again=lambda: sqs.send_again)
    retry = RetryLater("job_1", 7.5, gave_back_slot=True)
    assert settle(edge, retry) is retry
    assert sqs.sent == []
