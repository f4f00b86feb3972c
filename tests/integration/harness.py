"""Drive the real handlers against moto: API events in, SQS batches through the worker."""

from __future__ import annotations

import base64
import copy
import gc
import importlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from llmq import aws
from llmq.config import LlmqConfig
from llmq.errors import PROBLEMS
from llmq.long_polls import POLLS_PREFIX
from llmq.models import EVENT_FOR_STATUS, JobStatus
from llmq.queues import delivery_round_of
from llmq.shares import SHARE_PREFIX
from llmq_sandbox import event_sources
from tests.conftest import REGION, MotoStack, load_event
from tests.integration.aws_call_recorder import attribute_calls

ENTERPRISE = {"tenant_id": "ten_acme", "tier": "enterprise"}
FREE = {"tenant_id": "ten_hobby", "tier": "free"}


@dataclass
class LambdaContextStub:
    """The context object the Lambda runtime passes; only its clock matters here."""

    timeout_seconds: float = 60.0
    function_name: str = "llmq-test"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:llmq-test"
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_seconds - (time.monotonic() - self.started)) * 1000))


@dataclass
class ApiReply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None


def assert_catalogued(reply: ApiReply) -> None:
    """Every problem the API answers is an entry of the catalogue, status, title and type alike."""
    assert reply.code in PROBLEMS, f"{reply.code!r} is not in llmq.errors.PROBLEMS"
    entry = PROBLEMS[reply.code]
    assert (reply.status, reply.body["status"]) == (entry.status, entry.status)
    assert (reply.body["type"], reply.body["title"]) == (entry.type, entry.title)


def webhook_message(message: dict[str, Any]) -> dict[str, Any]:
    """A received webhooks-queue message's body as {job_id, event}, and its `delivery_round`
    (a message attribute) when it has one: the job a terminal event's message may carry is
    checked to be that job, ended as the event says and without its input, then left out."""
    body: dict[str, Any] = json.loads(message["Body"])
    if delivery_round := delivery_round_of(message.get("MessageAttributes")):
        body["delivery_round"] = delivery_round
    carried = body.pop("job", None)
    if carried is not None:
        assert carried["id"] == body["job_id"] and "input" not in carried
        assert EVENT_FOR_STATUS[JobStatus(carried["status"])] == body["event"]
    return body


def sqs_event(sqs: Any, queue_url: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The event an SQS event source mapping would hand a function for these received messages:
    the sandbox's own player builds it (llmq_sandbox.event_sources)."""
    return event_sources.sqs_event(messages, queue_arn(sqs, queue_url), REGION)


def queue_arn(sqs: Any, queue_url: str) -> str:
    arn: str = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return arn


def load_handler(name: str) -> ModuleType:
    """A fresh import of functions/<name>/handler.py, so its cold start reads the current env.

    The AWS calls its `handler` makes are recorded as `name`'s, for the IAM catalogue.
    """
    module_name = f"functions.{name}.handler"
    sys.modules.pop(module_name, None)
    try:
        module = importlib.import_module(module_name)
    finally:
        # A test process is no Lambda environment: it imports handlers test after test, and
        # the freeze that ends each import (llmq.startup) would keep every test's state for
        # good; an import that raised would leave the collector off.
        gc.unfreeze()
        gc.enable()
    attribute_calls(name, module)
    return module


class Harness:
    def __init__(self, stack: MotoStack, config: LlmqConfig, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stack = stack
        self.config = config
        for key, value in stack.environ(config.model_dump_json()).items():
            monkeypatch.setenv(key, value)
        self.api_module = load_handler("api")
        self._worker: ModuleType | None = None

    @property
    def sqs(self) -> Any:
        return aws.client("sqs")

    @property
    def ddb(self) -> Any:
        return aws.client("dynamodb")

    def worker(self) -> ModuleType:
        if self._worker is None:
            self._worker = load_handler("worker")
        return self._worker

    # ---- API --------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        tenant: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        raw_body: str | None = None,
        request_context: dict[str, Any] | None = None,
        base64_body: bool = False,
        base_path: str = "",
    ) -> ApiReply:
        """`base_path`: a custom domain's API mapping, which API Gateway leaves in `path`."""
        event = copy.deepcopy(load_event("api_submit"))
        event["httpMethod"] = method
        event["path"] = base_path + path
        event["requestContext"]["httpMethod"] = method
        # As API Gateway reports it: the path the client asked for, stage included.
        event["requestContext"]["path"] = f"/{event['requestContext']['stage']}{path}"
        # API Gateway received it just now (the API budgets its waits from this moment).
        event["requestContext"]["requestTimeEpoch"] = int(time.time() * 1000)
        event["pathParameters"] = {"proxy": path.removeprefix("/v1/")}
        event["headers"] = {"Accept": "application/json", **(headers or {})}
        if (body is not None or raw_body is not None) and "Content-Type" not in event["headers"]:
            event["headers"]["Content-Type"] = "application/json"
        event["multiValueHeaders"] = {key: [value] for key, value in event["headers"].items()}
        event["queryStringParameters"] = query
        event["multiValueQueryStringParameters"] = {k: [v] for k, v in query.items()} if query else None
        event["body"] = raw_body if raw_body is not None else (json.dumps(body) if body is not None else None)
        if base64_body and event["body"] is not None:
            # As API Gateway passes a body of a binary media type (the API's binaryMediaTypes).
            event["body"] = base64.b64encode(event["body"].encode("utf-8")).decode("ascii")
            event["isBase64Encoded"] = True
        authorizer = {"principalId": "x", "integrationLatency": 1}
        if tenant is not None:
            authorizer.update(tenant)
        event["requestContext"]["authorizer"] = authorizer
        event["requestContext"].update(request_context or {})
        response = self.api_module.handler(event, LambdaContextStub(timeout_seconds=29))
        text = response.get("body") or ""
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = text
        headers_out = {key.lower(): value for key, value in (response.get("headers") or {}).items()}
        for key, values in (response.get("multiValueHeaders") or {}).items():
            headers_out.setdefault(key.lower(), values[0])
        reply = ApiReply(status=response["statusCode"], headers=headers_out, body=parsed)
        if headers_out.get("content-type") == "application/problem+json":
            assert_catalogued(reply)
        return reply

    def submit(self, tenant: dict[str, str] = ENTERPRISE, key: str | None = None, **body: Any) -> ApiReply:
        body.setdefault("prompt", "hello")
        headers = {"Idempotency-Key": key} if key else {}
        return self.api("POST", "/v1/jobs", body=body, headers=headers, tenant=tenant)

    # ---- queues -----------------------------------------------------------------------

    def receive(self, queue_url: str, max_messages: int = 10, visibility: int = 60) -> list[dict[str, Any]]:
        response = self.sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=max_messages,
            VisibilityTimeout=visibility,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return list(response.get("Messages", []))

    def visible_count(self, queue_url: str) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"])

    def total_count(self, queue_url: str) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )

    def sqs_event(self, queue_url: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return sqs_event(self.sqs, queue_url, messages)

    def dead_letter(self, lane: str, messages: list[dict[str, Any]], skew_ms: int = 0) -> None:
        """These lane messages, their receives exhausted, handled by the dead-letter function
        (one invocation) as SQS's redrive hands them over: moved to the DLQ with the
        SentTimestamp they were sent with, here shifted by `skew_ms` (SQS's clock against the
        function's). Every record is settled."""
        url, dlq = self.stack.lane_queue_urls[lane], self.stack.lane_dlq_urls[lane]
        for message in messages:
            self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        event = self.sqs_event(dlq, messages)
        for record in event["Records"]:
            record["attributes"]["SentTimestamp"] = str(int(record["attributes"]["SentTimestamp"]) + skew_ms)
        answer = load_handler("dead_letter").handler(event, LambdaContextStub())
        assert answer["batchItemFailures"] == []

    def run_worker(
        self, queue_url: str, messages: list[dict[str, Any]], timeout_seconds: float = 60
    ) -> dict[str, Any]:
        """Invoke the worker as its event source mapping would (ReportBatchItemFailures), and
        delete what it settled, with the sandbox's own player."""
        event = self.sqs_event(queue_url, messages)
        response: dict[str, Any] = self.worker().handler(
            event, LambdaContextStub(timeout_seconds=timeout_seconds)
        )
        failed = event_sources.failed_message_ids(
            messages, response, completed=True, report_batch_item_failures=True
        )
        settled = [message for message in messages if message["MessageId"] not in failed]
        event_sources.delete_messages(self.sqs, queue_url, settled)
        return response

    def drain(self, lane: str, visibility: int = 60) -> dict[str, Any]:
        url = self.stack.lane_queue_urls[lane]
        messages = self.receive(url, visibility=visibility)
        assert messages, f"nothing to receive in lane {lane}"
        return self.run_worker(url, messages)

    # ---- table ------------------------------------------------------------------------

    def let_backoffs_pass(self) -> None:
        """Stand in for the clock: every job waiting out a retry backoff is due now."""
        for item in self.ddb.scan(TableName=self.stack.jobs_table)["Items"]:
            if "not_before_ms" in item:
                self.ddb.update_item(
                    TableName=self.stack.jobs_table,
                    Key={"pk": item["pk"]},
                    UpdateExpression="REMOVE not_before_ms",
                )

    def item_count(self) -> int:
        """Jobs stored (the tenants' share and long-poll items are not jobs)."""
        return int(
            self.ddb.scan(
                TableName=self.stack.jobs_table,
                Select="COUNT",
                FilterExpression="NOT begins_with(pk, :share) AND NOT begins_with(pk, :polls)",
                ExpressionAttributeValues={":share": {"S": SHARE_PREFIX}, ":polls": {"S": POLLS_PREFIX}},
            )["Count"]
        )


def emitted_metrics(stdout: str, name: str) -> list[dict[str, Any]]:
    """The CloudWatch embedded-metric-format records for `name` that a function printed."""
    records = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        directives = record.get("_aws", {}).get("CloudWatchMetrics", [])
        if any(metric["Name"] == name for directive in directives for metric in directive["Metrics"]):
            records.append(record)
    return records


@contextmanager
def observing_sqs(operation: str, record: Callable[..., None]) -> Iterator[None]:
    """`record(params)` for each call of the SQS `operation` the handlers make meanwhile."""
    with on_aws_call("sqs", f"provide-client-params.sqs.{operation}", record):
        yield


@contextmanager
def on_aws_call(service: str, event: str, hook: Callable[..., None]) -> Iterator[None]:
    """`hook` on botocore's `event` of the handlers' `service` client meanwhile (to watch, slow
    or stall its calls)."""
    events = aws.client(service).meta.events
    events.register(event, hook, unique_id=f"on-aws-call-{id(hook)}")
    try:
        yield
    finally:
        events.unregister(event, unique_id=f"on-aws-call-{id(hook)}")


def hidden_for_each_receive(
    harness: Harness, url: str, receives: int, waited: Callable[[], None] | None = None
) -> list[int]:
    """Run the worker on the lane's one message `receives` times, as SQS would bring it back,
    and say for how long each run sent it away (its ChangeMessageVisibility); the test itself
    makes it visible again at once after each, and `waited` makes what else that wait was for
    come true (a job's `not_before`)."""
    hidden_for: list[int] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        hidden_for.append(int(params["VisibilityTimeout"]))

    for _ in range(receives):
        (message,) = harness.receive(url)
        with observing_sqs("ChangeMessageVisibility", record):
            response = harness.run_worker(url, [message])
        assert len(response["batchItemFailures"]) == 1
        harness.sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )
        if waited is not None:
            waited()
    return hidden_for


def reconciler_ahead(harness: Harness, offset: list[float], *, offload: bool = False) -> Any:
    """A Reconciler on the harness's stack whose clock runs `offset[0]` seconds ahead (read at
    each look, so a test may move it); `offload`: it looks for parked results in S3."""
    from llmq.jobs import JobRepository
    from llmq.offload import Offload
    from llmq.payloads import PayloadStore
    from llmq.queues import QueueRepository
    from llmq.reconcile import Reconciler

    stack = harness.stack
    jobs = JobRepository(
        stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + offset[0],
    )
    queues = QueueRepository(stack.lane_queue_urls, stack.webhook_queue_url, sqs=aws.client("sqs"))
    payloads = (
        Offload(PayloadStore(stack.payload_bucket, s3=aws.client("s3")), harness.config) if offload else None
    )
    return Reconciler(jobs, queues, harness.config, offload=payloads)
