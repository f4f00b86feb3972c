"""The event source mappings and the schedule of the template, played against moto.

A poller per SQS mapping does what Lambda's pollers do:
- receives up to BatchSize messages, waiting up to MaximumBatchingWindowInSeconds to fill
  a batch, and never overrides the queue's own visibility timeout;
- runs at most MaximumConcurrency batches at once; without it, starts with five and adds up
  to 300 a minute while messages keep coming, up to 1,000 (RunnerSettings);
- invokes without waiting for the function: when the function has no concurrency left
  (its reserved concurrency, or the runner's default for one without), the invocation is
  throttled, the batch is left as it is (neither deleted nor made visible) and comes back
  after the queue's visibility timeout with its receive count one higher, so throttles alone
  can carry a message to the DLQ, as on AWS; the poller then backs off a little;
- after the invocation: with ReportBatchItemFailures it deletes every message except the
  reported failures (an invalid report fails the whole batch); a raised error or a timeout
  deletes nothing, so the messages come back after their visibility timeout;
- the redrive to the DLQ is SQS's own: moto moves a message whose receive count reached
  maxReceiveCount on the next receive, as SQS does.

With `DeliveryChaos` (RunnerSettings.at_least_once_chaos) a poller also does what Lambda and a
standard queue may do and moto never does: it hands some received messages to the function a
second time, in a batch of their own, at once (two invocations at the same time) or a moment
later (after the first may have deleted them); it shuffles batches, holds some messages back
for the next batch, and hands over partial batches. A replay is the same receive (same
message id, receipt handle and receive count), so it adds nothing to the queue's depth or to
the DLQ: a late replay's ChangeMessageVisibility fails as it would on AWS, and its delete
succeeds and does nothing.

Fair queues (emulation): which messages a receive returns is SQS's choice, not the poller's. A
lane message carries its tenant as MessageGroupId, and with RunnerSettings.fair_queues (on
unless LLMQ_SANDBOX_FAIR_QUEUES=off) moto's ReceiveMessage returns quiet tenants' messages ahead
of a noisy tenant's backlog, as SQS fair queues do (llmq_sandbox/moto_fidelity.py, "SQS fair
queues"). The pollers receive exactly as without it: no extra calls, no message received and
put back, so no receive count grows on the way, and chaos, throttles and scaling are unchanged.

A timer per EventBridge rule invokes its function with a scheduled event.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmq_sandbox.lambda_service import InvocationRecord, InvocationResult, LambdaService, Outcome
from llmq_sandbox.topology import MappingSpec, ScheduleSpec

log = logging.getLogger("llmq.sandbox")
# Long polling keeps an idle poller cheap and lets it notice a stop within about a second.
_WAIT_SECONDS = 1
# After a throttled invoke the poller waits this long before its next receive, doubling up
# to the maximum while the throttles go on.
_THROTTLE_BACKOFF_SECONDS = 0.2
_THROTTLE_BACKOFF_MAX_SECONDS = 2.0
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


def _latest_receives(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per message, in the order first received: a message received again while
    its batch gathered (a window longer than the queue's visibility timeout) is in it once, as
    its latest receive, whose receipt handle is the one that deletes it. Lambda never puts one
    message twice in a batch."""
    latest: dict[str, dict[str, Any]] = {}
    for message in messages:
        latest[message["MessageId"]] = message
    return list(latest.values())


def _unique_ids(messages: list[dict[str, Any]], later: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with distinct ids; a second one with the same id (a held-back message that
    was received again) goes to `later`, since Lambda never puts one message twice in a batch."""
    seen: set[str] = set()
    unique = []
    for message in messages:
        if message["MessageId"] in seen:
            later.append(message)
        else:
            seen.add(message["MessageId"])
            unique.append(message)
    return unique


@dataclass
class DeliveryChaos:
    """What Lambda and a standard queue may do to a consumer, decided by a seeded generator.

    An event source mapping processes each message at least once and may hand one over twice;
    a standard queue keeps no order, and a receive may return fewer messages than are
    available. moto and a plain poller do none of that. One generator per poller, used only
    by the poller's receiving thread, so a seed replays the same decisions.
    """

    rng: random.Random
    duplicate_probability: float = 0.08
    # How long after its first delivery a message is delivered again (0: concurrently).
    duplicate_delay_seconds: tuple[float, ...] = (0, 0, 0.5, 2)
    partial_probability: float = 0.3
    shuffle_probability: float = 0.5
    hold_back_probability: float = 0.15

    @classmethod
    def seeded(cls, seed: int, name: str) -> DeliveryChaos:
        return cls(random.Random(f"{seed}:{name}"))

    def receive_size(self, size: int) -> int:
        """How many messages to ask for: sometimes fewer than a full batch."""
        if size > 1 and self.rng.random() < self.partial_probability:
            return self.rng.randint(1, size - 1)
        return size

    def arrange(
        self, messages: list[dict[str, Any]], may_hold: bool = True
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The batch to deliver now, shuffled or not, and the messages held back for the next
        one (only when `may_hold`: the mapping has room to start it at once)."""
        batch = list(messages)
        if len(batch) > 1 and self.rng.random() < self.shuffle_probability:
            self.rng.shuffle(batch)
        held: list[dict[str, Any]] = []
        if may_hold and len(batch) > 1 and self.rng.random() < self.hold_back_probability:
            for _ in range(self.rng.randint(1, len(batch) - 1)):
                held.append(batch.pop(self.rng.randrange(len(batch))))
        return batch, held

    def replays(self, messages: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
        """The messages to deliver a second time, each with its delay after the first."""
        return [
            (message, self.rng.choice(self.duplicate_delay_seconds))
            for message in messages
            if self.rng.random() < self.duplicate_probability
        ]


class QueuePoller:
    def __init__(
        self,
        mapping: MappingSpec,
        functions: LambdaService,
        sqs: Any,
        region: str,
        concurrency: int,
        *,
        scale_per_minute: int = 0,
        concurrency_limit: int | None = None,
        chaos: DeliveryChaos | None = None,
    ) -> None:
        """`concurrency`: the mapping's MaximumConcurrency, or where a mapping without one
        starts; it then grows by `scale_per_minute` while messages keep coming, up to
        `concurrency_limit`."""
        self.mapping = mapping
        self._functions = functions
        self._sqs = sqs
        self._region = region
        self._initial_concurrency = concurrency
        self._scale_per_minute = scale_per_minute
        self._concurrency_limit = max(concurrency, concurrency_limit or concurrency)
        self._chaos = chaos
        self._held: list[dict[str, Any]] = []
        # Messages to deliver again, each once its time (monotonic) has come.
        self._replays: list[tuple[float, dict[str, Any]]] = []
        self._in_flight = 0
        self._in_flight_changed = threading.Condition()
        # Scaling counts from when messages started to come; an empty receive resets it.
        self._busy_since: float | None = None
        self._backoff = 0.0
        self._resume_at = 0.0
        self.throttles = 0
        self._stopping = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"poller-{mapping.queue.name}", daemon=True)
        self._batches: set[threading.Thread] = set()
        self._batches_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stopping.set()
        with self._in_flight_changed:
            self._in_flight_changed.notify_all()

    def pause(self) -> None:
        """Stop receiving (batches in flight finish): lets a benchmark build a backlog at once."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def stop(self) -> None:
        self.request_stop()
        self._thread.join(timeout=_WAIT_SECONDS + 5)

    def concurrency(self) -> int:
        """How many batches the mapping may run at once now."""
        if self._busy_since is None or not self._scale_per_minute:
            return self._initial_concurrency
        grown = int((time.monotonic() - self._busy_since) / 60 * self._scale_per_minute)
        return min(self._concurrency_limit, self._initial_concurrency + grown)

    def _wait_for_room(self) -> bool:
        """Block until the mapping may start one more batch; False to look at the flags again."""
        backoff = self._resume_at - time.monotonic()
        if backoff > 0:
            self._stopping.wait(backoff)
            return False
        with self._in_flight_changed:
            if self._in_flight >= self.concurrency():
                self._in_flight_changed.wait(0.5)
                return False
            self._in_flight += 1
            return True

    def _batch_over(self) -> None:
        with self._in_flight_changed:
            self._in_flight -= 1
            self._in_flight_changed.notify_all()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._paused.wait(0) and not self._stopping.wait(0.1):
                continue
            if not self._wait_for_room():
                continue
            try:
                messages = self._next_batch()
            except Exception:
                if not self._stopping.is_set():
                    log.exception("receive from %s failed", self.mapping.queue.name)
                    time.sleep(1)
                self._batch_over()
                continue
            if not messages:
                self._batch_over()
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

    def _receive_batch(self, size: int, held: list[dict[str, Any]]) -> list[dict[str, Any]]:
        messages = held + (self._receive(size - len(held), _WAIT_SECONDS) if len(held) < size else [])
        window_ends = time.monotonic() + self.mapping.batching_window_seconds
        while messages and len(messages) < size and time.monotonic() < window_ends:
            if self._stopping.is_set():
                break
            messages = _latest_receives(messages + self._receive(size - len(messages), _WAIT_SECONDS))
        return messages

    def _next_batch(self) -> list[dict[str, Any]]:
        replayed = self._due_replays()
        if replayed:
            return replayed
        chaos = self._chaos
        size = chaos.receive_size(self.mapping.batch_size) if chaos else self.mapping.batch_size
        held, self._held = self._held, []
        messages = self._receive_batch(size, held)
        if not messages:
            self._busy_since = None
            return []
        if self._busy_since is None:
            self._busy_since = time.monotonic()
        if chaos is None:
            return messages
        with self._in_flight_changed:
            room = self._in_flight < self.concurrency()
        repeated: list[dict[str, Any]] = []
        batch, self._held = chaos.arrange(_unique_ids(messages, repeated), may_hold=room)
        self._held += repeated
        now = time.monotonic()
        self._replays += [(now + delay, message) for message, delay in chaos.replays(batch)]
        return batch

    def _due_replays(self) -> list[dict[str, Any]]:
        """The messages whose second delivery is due, as one batch (distinct ids, batch size)."""
        now = time.monotonic()
        due = [message for when, message in self._replays if when <= now]
        batch = _unique_ids(due, [])[: self.mapping.batch_size]
        chosen = {id(message) for message in batch}
        self._replays = [(when, message) for when, message in self._replays if id(message) not in chosen]
        return batch

    def _process(self, messages: list[dict[str, Any]]) -> None:
        try:
            event = sqs_event(messages, self.mapping.queue.arn, self._region)
            result = self._functions.invoke(self.mapping.function, event, throttle=True)
            if result.outcome is Outcome.THROTTLED:
                # Nothing ran: the batch stays in flight and comes back after its visibility
                # timeout, one receive older.
                self._throttled()
                every = {message["MessageId"] for message in messages}
                self._functions.invocations.add(self._describe(messages, result, every, []))
                return
            self._backoff = 0.0
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
            self._batch_over()
            with self._batches_lock:
                self._batches.discard(threading.current_thread())

    def _throttled(self) -> None:
        self.throttles += 1
        self._backoff = min(_THROTTLE_BACKOFF_MAX_SECONDS, max(_THROTTLE_BACKOFF_SECONDS, self._backoff * 2))
        self._resume_at = time.monotonic() + self._backoff

    def _describe(
        self,
        messages: list[dict[str, Any]],
        result: InvocationResult,
        failed: set[str],
        settled: list[dict[str, Any]],
    ) -> InvocationRecord:
        return result.record(
            f"sqs:{self.mapping.queue.name}",
            lane=self.mapping.queue.lane,
            message_ids=[message["MessageId"] for message in messages],
            job_ids=[job for job in (_job_id(message["Body"]) for message in messages) if job],
            receive_counts=[
                int((message.get("Attributes") or {}).get("ApproximateReceiveCount", 0))
                for message in messages
            ],
            failed_message_ids=sorted(failed),
            deleted_message_ids=[message["MessageId"] for message in settled],
        )


class ScheduleTimer:
    """Invokes a rule's target function every period, never two runs at once; a run that fails
    (raised, or timed out) sends Lambda's on-failure record to the function's OnFailure queue,
    as Lambda does for an asynchronous invocation whose retries (none: the stack sets 0) are
    spent ("Adding a destination", Lambda developer guide)."""

    def __init__(
        self,
        schedule: ScheduleSpec,
        functions: LambdaService,
        account: str,
        region: str,
        every_seconds: float,
        sqs: Any = None,
    ) -> None:
        self.schedule = schedule
        self._sqs = sqs
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

    def run_once(self) -> InvocationResult:
        """One tick: the run, recorded, and its failure's record sent."""
        event = self.event()
        result = self._functions.invoke(self.schedule.function, event)
        self._record(result)
        if result.outcome in (Outcome.ERROR, Outcome.TIMEOUT) and self.schedule.on_failure_url and self._sqs:
            try:
                self._sqs.send_message(
                    QueueUrl=self.schedule.on_failure_url,
                    MessageBody=json.dumps(self._failure_record(event, result)),
                )
            except Exception as exc:  # (Lambda drops a record it cannot deliver; the schedule goes on)
                log.warning("on-failure record not sent for %s: %s", self.schedule.function, exc)
        return result

    def _failure_record(self, event: dict[str, Any], result: InvocationResult) -> dict[str, Any]:
        """What Lambda sends an on-failure destination: the request, and how it failed."""
        function_arn = (
            f"arn:aws:lambda:{self._region}:{self._account}:function:{self.schedule.function}:$LATEST"
        )
        return {
            "version": "1.0",
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "requestContext": {
                "requestId": result.request_id,
                "functionArn": function_arn,
                "condition": "RetriesExhausted",
                "approximateInvokeCount": 1,
            },
            "requestPayload": event,
            "responseContext": {
                "statusCode": 200,
                "executedVersion": "$LATEST",
                "functionError": "Unhandled",
            },
            "responsePayload": result.error or {"errorMessage": result.outcome.value},
        }

    def _run(self) -> None:
        while not self._stopping.wait(self.every_seconds):
            self.run_once()

    def _record(self, result: InvocationResult) -> None:
        self._functions.invocations.add(result.record(f"schedule:{self.schedule.name}"))
