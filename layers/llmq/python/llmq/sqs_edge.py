"""How the queue-fed functions (worker, webhook dispatcher, dead letters) settle a message.

Each handler makes its one domain call per record inside `QueueEdge.settling(record)`,
which settles the message by what the call raised (DESIGN §3.4, §3.5):

- nothing: acknowledged; the event source mapping deletes it;
- `RetryLater`: its visibility becomes the delay and it is reported failed, so SQS
  redelivery is the retry schedule;
- `PoisonMessage`: logged, its visibility set to the edge's poison delay, and reported
  failed. On a source queue the delay is 0: the receive count, not the clock, carries it to
  the DLQ. On a lane DLQ the edge sets a copy aside in the poison queue and acknowledges it,
  so it waits there, visible, for an operator, and nothing takes it again; if the copy
  cannot be sent, it comes back after the poison delay to be set aside then;
- anything else: logged by class and AWS code only (an exception's text can quote the
  payload) and reported failed; it comes back after the queue's visibility timeout.

Reporting a record failed means raising: Powertools' batch processor turns the exception
into the record's entry of the partial batch response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from botocore.exceptions import ClientError

from llmq.errors import StoreUnavailable
from llmq.telemetry import log_record_failure, logger


class RetryLater(Exception):
    """The message should come back after `delay_seconds` (a requeued job, a delivery due later).
    `gave_back_slot`: the job was handed back to the queue first, its tenant's slot with it."""

    def __init__(self, subject: str, delay_seconds: float, *, gave_back_slot: bool = False) -> None:
        super().__init__(f"{subject} retries in {delay_seconds:.1f}s")
        self.subject = subject
        self.delay_seconds = delay_seconds
        self.gave_back_slot = gave_back_slot


class PoisonMessage(Exception):
    """A message that can never be processed: not the message expected, or naming no job."""


class QueueRecord(Protocol):
    """The parts of an SQS event record the edge reads (Powertools' SQSRecord has them)."""

    @property
    def message_id(self) -> str: ...
    @property
    def receipt_handle(self) -> str: ...
    @property
    def body(self) -> str: ...
    @property
    def event_source_arn(self) -> str: ...


class Visibility(Protocol):
    def delay_redelivery(self, queue_arn: str, receipt_handle: str, seconds: float) -> None: ...


class SetAside(Protocol):
    def __call__(self, body: str, *, source_arn: str, message_id: str, why: str) -> None: ...


class SendAgain(Protocol):
    def __call__(self, body: str, *, source_arn: str, delay_seconds: float) -> None: ...


# What `settling_async` leaves of the invocation for the batch's response.
_LAST_SECOND = 1.0
# What ChangeMessageVisibility answers for a receipt handle no longer in flight.
_HANDLE_GONE = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "MessageNotInflight",
        "AWS.SimpleQueueService.MessageNotInflight",
        "InvalidParameterValue",
    }
)


@dataclass(frozen=True)
class QueueEdge:
    # Built on first need, so a handler whose messages all succeed never creates the client.
    queues: Callable[[], Visibility]
    # The job a body names, or None: logged with a failure, never the body itself.
    job_of: Callable[[str], str | None]
    poison_visibility_seconds: float = 0
    # Where poison goes instead of coming back (`QueueRepository.set_aside_poison`), if anywhere.
    set_aside: Callable[[], SetAside] | None = None
    # How a message whose job was handed back to its queue is sent again when its own is gone
    # (`QueueRepository.send_again`), if it can be.
    send_again: Callable[[], SendAgain] | None = None

    @contextmanager
    def settling(self, record: QueueRecord) -> Iterator[None]:
        try:
            yield
        except (RetryLater, PoisonMessage) as exc:
            if self._settle_failed(record, exc):
                return
            raise
        except Exception as exc:
            log_record_failure(exc, record.message_id, self.job_of(record.body), record.event_source_arn)
            raise

    @asynccontextmanager
    async def settling_async(
        self, record: QueueRecord, remaining_seconds: Callable[[], float] | None = None
    ) -> AsyncIterator[None]:
        """`settling` for a record that runs as a coroutine among its batch's others: what SQS
        is told runs on a thread, so that a slow answer (a stalled connection takes botocore
        seconds, tries after tries) never stops the other records' coroutines, whose paid
        answers and result writes wait on the same loop. With `remaining_seconds` (the
        Lambda's), it is waited for no longer than the invocation lasts: a record not settled
        in time is reported failed and comes back after its queue's visibility timeout."""
        try:
            yield
        except (RetryLater, PoisonMessage) as exc:
            settle = asyncio.to_thread(self._settle_failed, record, exc)
            if remaining_seconds is None:
                set_aside = await settle
            else:
                try:
                    set_aside = await asyncio.wait_for(settle, max(0.0, remaining_seconds() - _LAST_SECOND))
                except TimeoutError:
                    logger.warning(
                        "settling the message ran out of time", extra={"message_id": record.message_id}
                    )
                    set_aside = False
            if set_aside:
                return
            raise
        except Exception as exc:
            log_record_failure(exc, record.message_id, self.job_of(record.body), record.event_source_arn)
            raise

    def _settle_failed(self, record: QueueRecord, exc: RetryLater | PoisonMessage) -> bool:
        """Tell SQS when a record that raised comes back; True when it was poison set aside
        (the record is then acknowledged)."""
        if isinstance(exc, RetryLater):
            if not self._delay(record, exc.delay_seconds) and exc.gave_back_slot:
                self._send_again(record, exc)
            return False
        if self._set_aside(record, str(exc)):
            return True
        logger.error(
            "poison message",
            extra={
                "message_id": record.message_id,
                "why": str(exc),
                "visibility_seconds": self.poison_visibility_seconds,
            },
        )
        self._delay(record, self.poison_visibility_seconds)
        return False

    def hold(self, record: QueueRecord, seconds: float) -> bool:
        """Keep the record's message hidden for `seconds` from now, and no longer: what a
        record that waits inside its invocation does, so that a crash meanwhile brings it
        back then rather than after the queue's visibility timeout. False when SQS refused."""
        try:
            self.queues().delay_redelivery(record.event_source_arn, record.receipt_handle, seconds)
        except StoreUnavailable:
            return False
        except ClientError as exc:
            # A handle no longer in flight (the message received again elsewhere, or deleted):
            # the record does not wait, and settles as it would have.
            logger.warning(
                "could not hold the message",
                extra={
                    "message_id": record.message_id,
                    "error_code": exc.response.get("Error", {}).get("Code"),
                },
            )
            return False
        return True

    def _set_aside(self, record: QueueRecord, why: str) -> bool:
        """True once a copy is in the poison queue: the record is then acknowledged (deleted)."""
        if self.set_aside is None:
            return False
        try:
            self.set_aside()(
                record.body, source_arn=record.event_source_arn, message_id=record.message_id, why=why
            )
        except Exception as exc:
            log_record_failure(exc, record.message_id, None)
            return False
        logger.error("poison message set aside", extra={"message_id": record.message_id, "why": why})
        return True

    def _send_again(self, record: QueueRecord, exc: RetryLater) -> None:
        """The message of a job handed back to its queue (a retry's backoff, a hand-back) whose
        own is gone: a copy of it that lost the job's claim to this one was received after it,
        and its acknowledgement deleted it (SQS deletes by the newest receipt handle). Without
        one, the job waited for the reconciler's stale-queued sweep, minutes after its retry
        was due (hunt 331). A copy sent needlessly (the message received again elsewhere) is a
        duplicate, which a claim absorbs."""
        if self.send_again is None:
            return
        try:
            self.send_again()(
                record.body, source_arn=record.event_source_arn, delay_seconds=exc.delay_seconds
            )
        except Exception as error:
            # (the job is queued: the reconciler's sweep sends it one)
            log_record_failure(error, record.message_id, self.job_of(record.body), record.event_source_arn)
            return
        logger.info("message sent again: its own was gone", extra={"message_id": record.message_id})

    def _delay(self, record: QueueRecord, seconds: float) -> bool:
        """False when the message is no longer there to delay (its receipt handle gone)."""
        try:
            self.queues().delay_redelivery(record.event_source_arn, record.receipt_handle, seconds)
        except StoreUnavailable:
            # Still reported failed: it just comes back after the queue's own visibility timeout.
            logger.warning("could not set the message's visibility", extra={"message_id": record.message_id})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _HANDLE_GONE:
                # (a copy received again elsewhere, or deleted: nothing to delay)
                logger.warning("message no longer in flight", extra={"message_id": record.message_id})
                return False
            # A grant missing (AccessDenied), or a bug: every record that asks for a delay
            # comes back only after the queue's visibility timeout. Counted (RecordFailed), as
            # any unexpected failure of a record is, for its alarm.
            log_record_failure(exc, record.message_id, self.job_of(record.body), record.event_source_arn)
            raise
        return True
