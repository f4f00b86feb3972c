"""`llmq dlq list|redrive`: the stack's dead-letter queues, found from its outputs.

The poison queue is listed with them: lane dead letters no function can settle, which the
dead-letter function set aside. Nothing can process them, so they are never redriven; an
operator reads them (`--peek`) and purges the queue.

Redrive uses SQS's StartMessageMoveTask where the service has it (AWS), and falls back to
receive, send to the source queue, delete (moto has no message move tasks). The fallback
keeps each message's body and attributes; the receive count starts again at zero, as it
does after a move task.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError

# What a service without message move tasks answers (moto: a 500 "not implemented").
_UNSUPPORTED_CODES = {
    "UnsupportedOperation",
    "InvalidAction",
    "NotImplemented",
    "AWS.SimpleQueueService.UnsupportedOperation",
}
POISON = "poison"
# The reconciler's failed runs (their event and error, Lambda's on-failure destination): read,
# never redriven (the next tick is the retry).
RECONCILER_FAILURES = "reconciler-failures"
_NO_RETRY = Config(retries={"max_attempts": 1, "mode": "standard"})
_LONG_POLL_SECONDS = 1


@dataclass(frozen=True)
class DeadLetterQueue:
    name: str  # the lane, "webhooks", "poison" or "reconciler-failures"
    dlq_url: str
    source_url: str | None  # None: the poison queue or the reconciler's failures, which redrive nowhere


@dataclass(frozen=True)
class QueueDepth:
    visible: int
    in_flight: int
    delayed: int


@dataclass(frozen=True)
class RedriveResult:
    queue: str
    method: str  # "StartMessageMoveTask" or "receive-and-send"
    moved: int | None  # None while a move task runs asynchronously
    task_handle: str | None = None


def stack_dead_letter_queues(outputs: dict[str, str]) -> list[DeadLetterQueue]:
    """Pairs every DLQ output (LaneDlqUrl<Lane>, WebhookDlqUrl) with its source queue output."""
    queues = []
    # The lanes' own names (`short-batch`), from the lane-to-URL map: the outputs' keys hold
    # them PascalCased (`ShortBatch`).
    try:
        names = {
            str(url): str(name) for name, url in json.loads(outputs.get("LaneQueueUrls") or "{}").items()
        }
    except (ValueError, AttributeError):
        names = {}
    for key, url in sorted(outputs.items()):
        if key.startswith("LaneDlqUrl"):
            lane = key.removeprefix("LaneDlqUrl")
            source = outputs.get(f"LaneQueueUrl{lane}")
            if source:
                queues.append(DeadLetterQueue(names.get(source, lane.lower()), url, source))
    if outputs.get("WebhookDlqUrl") and outputs.get("WebhookQueueUrl"):
        queues.append(DeadLetterQueue("webhooks", outputs["WebhookDlqUrl"], outputs["WebhookQueueUrl"]))
    if outputs.get("PoisonQueueUrl"):
        queues.append(DeadLetterQueue(POISON, outputs["PoisonQueueUrl"], None))
    if outputs.get("ReconcilerFailuresUrl"):
        queues.append(DeadLetterQueue(RECONCILER_FAILURES, outputs["ReconcilerFailuresUrl"], None))
    return queues


def stack_outputs(cloudformation: Any, stack_name: str) -> dict[str, str]:
    stack = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
    return {output["OutputKey"]: str(output.get("OutputValue", "")) for output in stack.get("Outputs", [])}


def depth(sqs: Any, url: str) -> QueueDepth:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    )["Attributes"]
    return QueueDepth(
        visible=int(attributes.get("ApproximateNumberOfMessages", 0)),
        in_flight=int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
        delayed=int(attributes.get("ApproximateNumberOfMessagesDelayed", 0)),
    )


def _arn(sqs: Any, url: str) -> str:
    return str(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"])


def _unsupported(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return error.get("Code") in _UNSUPPORTED_CODES or status in (500, 501)


def redrive(session_client: Any, queue: DeadLetterQueue, max_messages: int | None = None) -> RedriveResult:
    """Move `queue`'s dead letters back to its source queue. `session_client(service, config)`."""
    if queue.source_url is None:
        raise ValueError(f"{queue.name}: nothing can process these messages, so they are never redriven")
    sqs = session_client("sqs", None)
    if max_messages is None:
        try:
            task = session_client("sqs", _NO_RETRY).start_message_move_task(
                SourceArn=_arn(sqs, queue.dlq_url), DestinationArn=_arn(sqs, queue.source_url)
            )
            return RedriveResult(queue.name, "StartMessageMoveTask", None, task.get("TaskHandle"))
        except ClientError as exc:
            if not _unsupported(exc):
                raise
    return RedriveResult(queue.name, "receive-and-send", _receive_and_send(sqs, queue, max_messages))


def _receive_and_send(sqs: Any, queue: DeadLetterQueue, max_messages: int | None) -> int:
    assert queue.source_url is not None
    moved = 0
    while max_messages is None or moved < max_messages:
        count = 10 if max_messages is None else max(1, min(10, max_messages - moved))
        messages = sqs.receive_message(
            QueueUrl=queue.dlq_url,
            MaxNumberOfMessages=count,
            # A long poll asks every SQS server: a short one samples some, and may answer
            # nothing while messages wait, which would end the redrive early.
            WaitTimeSeconds=_LONG_POLL_SECONDS,
            VisibilityTimeout=60,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["MessageGroupId"],
        ).get("Messages", [])
        if not messages:
            return moved
        for index, message in enumerate(messages):
            try:
                _move(sqs, queue, message)
            except BaseException:
                # Cut short (SQS refusing, Ctrl-C): the letters received and not moved are made
                # visible again, so a run again finds them, rather than hiding them for a minute
                # behind a "moved: 0" (one whose copy went may move twice, which the claim's
                # idempotency absorbs).
                _release(sqs, queue.dlq_url, messages[index:])
                print(f"llmq: {queue.name}: {moved} moved before the redrive was cut short", file=sys.stderr)
                raise
            moved += 1
    return moved


def _move(sqs: Any, queue: DeadLetterQueue, message: dict[str, Any]) -> None:
    extra: dict[str, Any] = {}
    if message.get("MessageAttributes"):
        extra["MessageAttributes"] = message["MessageAttributes"]
    # (a lane message's tenant, so fair queues still count it as that tenant's)
    group = message.get("Attributes", {}).get("MessageGroupId")
    if group:
        extra["MessageGroupId"] = group
    sqs.send_message(QueueUrl=queue.source_url, MessageBody=message["Body"], **extra)
    # Deleted only once the copy is safely in the source queue: a crash here duplicates,
    # which the claim's idempotency absorbs, and never loses a message.
    sqs.delete_message(QueueUrl=queue.dlq_url, ReceiptHandle=message["ReceiptHandle"])


def _release(sqs: Any, url: str, messages: list[dict[str, Any]]) -> None:
    for message in messages:
        try:
            sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
            )
        except Exception:
            return  # (SQS refusing this too: they come back on their own within the minute)


def peek(sqs: Any, url: str, count: int) -> list[str | dict[str, str]]:
    """Bodies of up to `count` visible dead letters; they become visible again at once. A
    message set aside in the poison queue comes with its notes (`llmq-source`,
    `llmq-message-id`, `llmq-why`): `{"body": ..., "llmq-...": ...}`."""
    messages = sqs.receive_message(
        QueueUrl=url,
        MaxNumberOfMessages=max(1, min(10, count)),
        WaitTimeSeconds=_LONG_POLL_SECONDS,
        VisibilityTimeout=0,
        MessageAttributeNames=["All"],
    ).get("Messages", [])
    shown: list[str | dict[str, str]] = []
    for message in messages:
        body = shown_body(str(message["Body"]))
        notes = {
            name: str(value.get("StringValue", ""))
            for name, value in (message.get("MessageAttributes") or {}).items()
            if name.startswith("llmq-")
        }
        shown.append({"body": body, **notes} if notes else body)
    return shown


def shown_body(body: str) -> str:
    """A dead letter's body as the operator sees it: a terminal webhook message carries the
    job, result included, which is the integrator's data, not the operator's; it is shown
    by its id and status only."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        # (RecursionError: a foreign poison body nested past Python's parser, hunt 241)
        return body
    if not isinstance(message, dict):
        return body
    job, output = message.get("job"), message.get("output")
    if not isinstance(job, dict) and not isinstance(output, dict):
        return body
    if isinstance(job, dict):
        message["job"] = {key: job[key] for key in ("id", "status") if key in job}
    if isinstance(output, dict):
        # (a `job.output` event's delta is generated text: the integrator's, shown by its place)
        message["output"] = {key: output[key] for key in _OUTPUT_SHOWN if key in output}
    return json.dumps(message, separators=(",", ":"))


_OUTPUT_SHOWN = ("id", "seq_from", "seq_to", "attempt")
