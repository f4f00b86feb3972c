"""The event source mappings and the schedule of the template, played against moto.

A poller per SQS mapping does what Lambda's pollers do:
- receives up to BatchSize messages, waiting up to MaximumBatchingWindowInSeconds to fill
  a batch, and never overrides the queue's own visibility timeout;
- runs at most MaximumConcurrency batches at once (one slot per concurrent invocation);
- after the invocation: with ReportBatchItemFailures it deletes every message except the
  reported failures (an invalid report fails the whole batch); a raised error or a timeout
  deletes nothing, so the messages come back after their visibility timeout;
- the redrive to the DLQ is SQS's own: moto moves a message whose receive count reached
  maxReceiveCount on the next receive, as SQS does.

A timer per EventBridge rule invokes its function with a scheduled event.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from llmq_sandbox.lambda_service import InvocationRecord, InvocationResult, LambdaService, Outcome
from llmq_sandbox.topology import MappingSpec, ScheduleSpec

log = logging.getLogger("llmq.sandbox")
# Long polling keeps an idle poller cheap and lets it notice a stop within about a second.
_WAIT_SECONDS = 1
# The message attributes Lambda copies into an SQS record.
_RECORD_ATTRIBUTES = (
    "ApproximateReceiveCount",
    "SentTimestamp",
    "SenderId",
    "ApproximateFirstReceiveTimestamp",
    "AWSTraceHeader",
    "MessageGroupId",
    "MessageDeduplicationId",
    "SequenceNumber",
)


def _attribute_value(value: dict[str, Any]) -> dict[str, Any]:
    """A message attribute as Lambda's SQS event spells it."""
    converted: dict[str, Any] = {
        "stringValue": value.get("StringValue"),
        "binaryValue": None,
        "stringListValues": list(value.get("StringListValues") or []),
        "binaryListValues": [base64.b64encode(item).decode() for item in value.get("BinaryListValues") or []],
        "dataType": value.get("DataType", "String"),
    }
    if value.get("BinaryValue") is not None:
        converted["binaryValue"] = base64.b64encode(value["BinaryValue"]).decode()
    return converted


def _job_id(body: str) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    job_id = data.get("job_id") if isinstance(data, dict) else None
    return str(job_id) if job_id else None


def batch_item_failures(payload: Any, message_ids: set[str]) -> set[str] | None:
    """The message ids the function reported as failed, or None if the report is invalid.

    Lambda treats an invalid report (not an object, an empty or unknown itemIdentifier) as
    the failure of the whole batch.
    """
    if payload is None:
        return set()
    if not isinstance(payload, dict):
        return None
    failures = payload.get("batchItemFailures")
    if failures is None:
        return set()
    if not isinstance(failures, list):
        return None
    reported: set[str] = set()
    for failure in failures:
        identifier = failure.get("itemIdentifier") if isinstance(failure, dict) else None
        if not identifier or identifier not in message_ids:
            return None
        reported.add(str(identifier))
    return reported


def sqs_record(message: dict[str, Any], queue_arn: str, region: str) -> dict[str, Any]:
    """A received message (ReceiveMessage with AttributeNames=All) as Lambda's SQS event spells it."""
    attributes = message.get("Attributes") or {}
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": {key: attributes[key] for key in _RECORD_ATTRIBUTES if key in attributes},
        "messageAttributes": {
            name: _attribute_value(value) for name, value in (message.get("MessageAttributes") or {}).items()
        },
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


def sqs_event(messages: list[dict[str, Any]], queue_arn: str, region: str) -> dict[str, Any]:
    return {"Records": [sqs_record(message, queue_arn, region) for message in messages]}


def failed_message_ids(
    messages: list[dict[str, Any]], payload: Any, *, completed: bool, report_batch_item_failures: bool
) -> set[str]:
    """The messages a mapping leaves on the queue after an invocation: all of them when it did
    not complete (an error, a timeout) or answered an invalid report, else those it reported."""
    every = {message["MessageId"] for message in messages}
    if not completed:
        return every
    if not report_batch_item_failures:
        return set()
    reported = batch_item_failures(payload, every)
    if reported is None:
        log.warning("an invalid batch response: the whole batch failed")
        return every
    return reported


def delete_messages(sqs: Any, queue_url: str, messages: list[dict[str, Any]]) -> None:
    for start in range(0, len(messages), 10):
        chunk = messages[start : start + 10]
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                for index, message in enumerate(chunk)
            ],
        )


class QueuePoller:
    def __init__(
        self,
        mapping: MappingSpec,
        functions: LambdaService,
        sqs: Any,
        region: str,
        concurrency: int,
    ) -> None:
        self.mapping = mapping
        self._functions = functions
        self._sqs = sqs
        self._region = region
        self._slots = threading.BoundedSemaphore(concurrency)
        self._stopping = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"poller-{mapping.queue.name}", daemon=True)
        self._batches: set[threading.Thread] = set()
        self._batches_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stopping.set()

    def pause(self) -> None:
        """Stop receiving (batches in flight finish): lets a benchmark build a backlog at once."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=_WAIT_SECONDS + 5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._paused.wait(0) and not self._stopping.wait(0.1):
                continue
            if not self._slots.acquire(timeout=0.5):
                continue
            try:
                messages = self._receive_batch()
            except Exception:
                if not self._stopping.is_set():
                    log.exception("receive from %s failed", self.mapping.queue.name)
                    time.sleep(1)
                self._slots.release()
                continue
            if not messages:
                self._slots.release()
                continue
            batch = threading.Thread(target=self._process, args=(messages,), daemon=True)
            with self._batches_lock:
                self._batches.add(batch)
            batch.start()

    def _receive(self, count: int, wait: int) -> list[dict[str, Any]]:
        response = self._sqs.receive_message(
            QueueUrl=self.mapping.queue.url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=wait,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return list(response.get("Messages") or [])

    def _receive_batch(self) -> list[dict[str, Any]]:
        size = self.mapping.batch_size
        messages = self._receive(size, _WAIT_SECONDS)
        window_ends = time.monotonic() + self.mapping.batching_window_seconds
        while messages and len(messages) < size and time.monotonic() < window_ends:
            if self._stopping.is_set():
                break
            messages += self._receive(size - len(messages), _WAIT_SECONDS)
        return messages

    def _process(self, messages: list[dict[str, Any]]) -> None:
        try:
            event = sqs_event(messages, self.mapping.queue.arn, self._region)
            result = self._functions.invoke(self.mapping.function, event)
            failed = failed_message_ids(
                messages,
                result.payload,
                completed=result.outcome is Outcome.OK,
                report_batch_item_failures=self.mapping.report_batch_item_failures,
            )
            settled = [message for message in messages if message["MessageId"] not in failed]
            delete_messages(self._sqs, self.mapping.queue.url, settled)
            self._functions.invocations.add(self._describe(messages, result, failed, settled))
        except Exception:
            log.exception("batch from %s could not be settled", self.mapping.queue.name)
        finally:
            self._slots.release()
            with self._batches_lock:
                self._batches.discard(threading.current_thread())

    def _describe(
        self,
        messages: list[dict[str, Any]],
        result: InvocationResult,
        failed: set[str],
        settled: list[dict[str, Any]],
    ) -> InvocationRecord:
        return InvocationRecord(
            function=result.function,
            request_id=result.request_id,
            outcome=result.outcome.value,
            trigger=f"sqs:{self.mapping.queue.name}",
            started_at=result.started_at,
            duration_seconds=result.duration_seconds,
            cold_start=result.cold_start,
            lane=self.mapping.queue.lane,
            message_ids=[message["MessageId"] for message in messages],
            job_ids=[job for job in (_job_id(message["Body"]) for message in messages) if job],
            receive_counts=[
                int((message.get("Attributes") or {}).get("ApproximateReceiveCount", 0))
                for message in messages
            ],
            failed_message_ids=sorted(failed),
            deleted_message_ids=[message["MessageId"] for message in settled],
            error=result.error_message or None,
        )


class ScheduleTimer:
    """Invokes a rule's target function every period, never two runs at once."""

    def __init__(
        self,
        schedule: ScheduleSpec,
        functions: LambdaService,
        account: str,
        region: str,
        every_seconds: float,
    ) -> None:
        self.schedule = schedule
        self._functions = functions
        self._account = account
        self._region = region
        self.every_seconds = every_seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"schedule-{schedule.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def event(self) -> dict[str, Any]:
        return {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": self._account,
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self._region,
            "resources": [self.schedule.arn],
            "detail": {},
        }

    def _run(self) -> None:
        while not self._stopping.wait(self.every_seconds):
            result = self._functions.invoke(self.schedule.function, self.event())
            self._functions.invocations.add(
                InvocationRecord(
                    function=result.function,
                    request_id=result.request_id,
                    outcome=result.outcome.value,
                    trigger=f"schedule:{self.schedule.name}",
                    started_at=result.started_at,
                    duration_seconds=result.duration_seconds,
                    cold_start=result.cold_start,
                    error=result.error_message or None,
                )
            )
