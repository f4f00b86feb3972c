"""Entry points as Lambda calls them, for paths other tests drive below the handler.

Going through `handler` matters beyond the behaviour: the AWS calls made there are recorded
as the function's, and tests/infra checks that its role grants each of them.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llmq import aws
from llmq.jobs import JobRepository
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.integration.harness import ENTERPRISE, Harness, LambdaContextStub, load_handler


class KeyCheckingProvider:
    """An OpenAI-compatible endpoint that answers only `Authorization: Bearer <key>`."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.authorizations: list[str | None] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                authorization = self.headers.get("authorization")
                provider.authorizations.append(authorization)
                if authorization == f"Bearer {provider.key}":
                    status, body = 200, _completion("authenticated")
                else:
                    status, body = 401, {"error": {"message": "bad key", "code": "invalid_api_key"}}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> KeyCheckingProvider:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


@pytest.fixture
def provider_key(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyCheckingProvider]:
    # A fresh secret name: Powertools caches secrets by name for the life of the process.
    secret_id = f"llmq-provider-key-{uuid.uuid4().hex[:8]}"
    key = f"sk-{uuid.uuid4().hex}"
    aws.client("secretsmanager").create_secret(Name=secret_id, SecretString=key)
    with KeyCheckingProvider(key) as provider:
        monkeypatch.setenv("LLMQ_PROVIDER_SECRET_ID", secret_id)
        monkeypatch.setenv("LLMQ_PROVIDER_BASE_URL", provider.base_url)
        monkeypatch.delenv("LLMQ_PROVIDER_API_KEY", raising=False)
        yield provider


def test_the_worker_authenticates_to_the_provider_with_the_key_in_secrets_manager(
    harness: Harness, provider_key: KeyCheckingProvider
) -> None:
    # Given a worker whose provider key is only in Secrets Manager
    job_id = harness.submit(prompt="who am I").body["id"]

    # When it runs the job
    assert harness.drain("high") == {"batchItemFailures": []}

    # Then the provider saw the secret's key, and the job succeeded with its answer
    assert provider_key.authorizations == [f"Bearer {provider_key.key}"]
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["result"]["output"]) == ("succeeded", "authenticated")


class LaterClock:
    """Real time, shifted forward: the reconciler sees jobs as old as the test needs."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset


def test_the_scheduled_reconciler_requeues_lost_messages_and_expires_overdue_jobs(
    harness: Harness, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose message was lost, and one past its deadline whose message was lost too
    lost = harness.submit(prompt="lost").body["id"]
    overdue = harness.submit(prompt="late", deadline_seconds=5).body["id"]
    high = harness.stack.lane_queue_urls["high"]
    for message in harness.receive(high):
        harness.sqs.delete_message(QueueUrl=high, ReceiptHandle=message["ReceiptHandle"])

    # When the schedule invokes the reconciler after the staleness threshold
    reconciler = load_handler("reconciler")
    clock = LaterClock()
    clock.offset = harness.config.reconciler.stale_queued_seconds + 10
    env = reconciler.ENV
    later = Reconciler(
        JobRepository(env.jobs_table, env.config, dynamodb=aws.client("dynamodb"), clock=clock),
        QueueRepository(env.lane_queue_urls, env.webhook_queue_url, sqs=aws.client("sqs")),
        env.config,
    )
    monkeypatch.setattr(reconciler, "reconciler", lambda: later)
    report = reconciler.handler(
        {"source": "aws.events", "detail-type": "Scheduled Event"}, LambdaContextStub()
    )

    # Then the lost job is queued again and runs, and the overdue one expired without a provider call
    assert report["requeued"] == 1 and report["expired"] == 1
    assert harness.drain("high") == {"batchItemFailures": []}
    job = harness.api("GET", f"/v1/jobs/{lost}", tenant=ENTERPRISE).body
    assert job["status"] == "succeeded"
    expired = harness.api("GET", f"/v1/jobs/{overdue}", tenant=ENTERPRISE).body
    assert (expired["status"], expired["error"]["code"]) == ("expired", "deadline_exceeded")
    assert provider.calls_for(overdue) == 0


def test_the_scheduled_reconciler_sends_a_lost_webhook_again(
    harness: Harness, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job that succeeded, whose webhook message was lost
    job_id = harness.submit(webhook={"url": "http://127.0.0.1:9/hook"}).body["id"]
    assert harness.drain("high") == {"batchItemFailures": []}
    webhooks = harness.stack.webhook_queue_url
    for message in harness.receive(webhooks):
        harness.sqs.delete_message(QueueUrl=webhooks, ReceiptHandle=message["ReceiptHandle"])

    # When the schedule invokes the reconciler after the webhook threshold
    reconciler = load_handler("reconciler")
    clock = LaterClock()
    clock.offset = harness.config.reconciler.stale_webhook_seconds + 10
    env = reconciler.ENV
    later = Reconciler(
        JobRepository(env.jobs_table, env.config, dynamodb=aws.client("dynamodb"), clock=clock),
        QueueRepository(env.lane_queue_urls, env.webhook_queue_url, sqs=aws.client("sqs")),
        env.config,
    )
    monkeypatch.setattr(reconciler, "reconciler", lambda: later)
    report = reconciler.handler(
        {"source": "aws.events", "detail-type": "Scheduled Event"}, LambdaContextStub()
    )

    # Then its terminal event is on the webhooks queue again, sent by the reconciler's own role
    assert report["webhooks"] == 1
    (message,) = harness.receive(webhooks)
    assert json.loads(message["Body"])["job_id"] == job_id
