"""The tenant index (GET /v1/jobs) projects what a listed Job shows, and not the input.

A global secondary index stores its own copy of every projected attribute and is written on
every write to the item (DynamoDB developer guide, "Using Global Secondary Indexes":
projections; provisioned and on-demand writes are charged per index). Projecting ALL copied
an input of up to the item's 350 KB on each claim, heartbeat and completion.
"""

from __future__ import annotations

from typing import Any

import pytest

from llmq import job_codec
from llmq.config import LlmqConfig
from llmq.job_index import TENANT_INDEX
from llmq.job_record import JobInput, JobRecord
from llmq.models import (
    ChatMessage,
    DeliveryStatus,
    ErrorCode,
    JobError,
    JobResult,
    JobStatus,
    WebhookEvent,
)
from stacks.jobs_table import TENANT_PROJECTION
from tests.infra.synthesis import SynthesizedApp, synthesize


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> SynthesizedApp:
    return synthesize(LlmqConfig(), outdir=tmp_path_factory.mktemp("cdk-index"))


def _tenant_index(synthesized: SynthesizedApp) -> dict[str, Any]:
    _, table = synthesized.template.output_resource("JobsTableName")
    (index,) = [i for i in table["Properties"]["GlobalSecondaryIndexes"] if i["IndexName"] == TENANT_INDEX]
    return index


def test_the_tenant_index_projects_the_listed_attributes_and_never_the_input(
    synthesized: SynthesizedApp,
) -> None:
    projection = _tenant_index(synthesized)["Projection"]
    assert projection["ProjectionType"] == "INCLUDE"
    assert sorted(projection["NonKeyAttributes"]) == sorted(TENANT_PROJECTION)
    assert not {"input", "input_ref", "lease_owner", "last_write"} & set(projection["NonKeyAttributes"])


def _every_field_set() -> JobRecord:
    return JobRecord(
        id="job_1",
        tenant_id="ten_1",
        status=JobStatus.FAILED,
        lane="high",
        model="m",
        input=JobInput(messages=[ChatMessage(role="user", content="x" * 1000)]),
        request_hash="h" * 64,
        metadata={"team": "a"},
        created_ms=1_700_000_000_000,
        started_ms=1_700_000_001_000,
        finished_ms=1_700_000_002_000,
        attempts=3,
        cancel_requested=True,
        lease_owner="w",
        lease_expires_ms=1_700_000_009_000,
        not_before_ms=1_700_000_003_000,
        deadline_ms=1_700_000_099_000,
        result=JobResult(output="partial"),
        result_ref="results/job_1/x.json",
        error=JobError(code=ErrorCode.PROVIDER_ERROR, message="boom", retryable=True),
        webhook_url="https://hooks.example.com/x",
        webhook_events=[WebhookEvent.FAILED],
        delivery_status=DeliveryStatus.DELIVERED,
        delivery_attempts=2,
        delivery_last_status_code=200,
        delivery_next_ms=1_700_000_004_000,
        delivered_ms=1_700_000_005_000,
        expires_at=1_800_000_000,
        last_write="w#1",
        dead_letter_ids={"m1"},
    )


@pytest.mark.parametrize("result_in_s3", [False, True])
def test_a_job_read_from_the_projection_lists_as_the_whole_item_shows(
    synthesized: SynthesizedApp, result_in_s3: bool
) -> None:
    # Given a stored job with every attribute set (its result inline, or only in S3, when the
    # listed Job links to it), and what of it the tenant index holds
    record = _every_field_set()
    if result_in_s3:
        record = record.model_copy(update={"result": None})
    item = job_codec.to_item(record, {"tenant_created": "0#job_1"})
    index = _tenant_index(synthesized)
    keys = {"pk"} | {key["AttributeName"] for key in index["KeySchema"]}
    projected = {name: value for name, value in item.items() if name in keys | set(TENANT_PROJECTION)}
    assert "input" in item and "input" not in projected

    # When it is read back as the list reads it, Then it shows as the Job GET shows
    listed = job_codec.from_item(projected)
    base = "https://api.example.com/prod/"
    assert listed.to_job(api_base=base) == record.to_job(api_base=base)
