"""How many batches an SQS event source mapping runs at once, as Lambda documents it."""

from __future__ import annotations

import time
from typing import Any, cast

from llmq_sandbox.config import RunnerSettings
from llmq_sandbox.event_sources import QueuePoller
from llmq_sandbox.lambda_service import LambdaService
from llmq_sandbox.topology import MappingSpec, QueueSpec

QUEUE = QueueSpec(
    logical_id="Q", url="http://localhost/123456789012/q", arn="arn:aws:sqs:us-east-1:1:q", lane=None
)


def _poller(max_concurrency: int | None) -> QueuePoller:
    settings = RunnerSettings()
    mapping = MappingSpec(
        logical_id="M",
        function="f",
        queue=QUEUE,
        batch_size=10,
        batching_window_seconds=0,
        max_concurrency=max_concurrency,
        report_batch_item_failures=True,
        enabled=True,
    )
    # Never started: only its scaling rule is read.
    return QueuePoller(
        mapping,
        cast(LambdaService, None),
        cast(Any, None),
        "us-east-1",
        max_concurrency or settings.default_mapping_concurrency,
        scale_per_minute=0 if max_concurrency else settings.mapping_scale_per_minute,
        concurrency_limit=max_concurrency or settings.mapping_concurrency_limit,
    )


def _busy_for(poller: QueuePoller, seconds: float) -> int:
    poller._busy_since = time.monotonic() - seconds  # the clock of its backlog
    return poller.concurrency()


def test_a_mapping_without_maximum_concurrency_starts_at_five_and_scales_up_to_1000() -> None:
    """ "Configuring scaling behavior for SQS event source mappings" (Lambda starts with five
    concurrent batches, adds up to 300 a minute while messages remain, at most 1,000 at once):
    https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-scaling.html"""
    poller = _poller(None)
    assert poller.concurrency() == 5
    assert _busy_for(poller, 60) == 305
    assert _busy_for(poller, 3600) == 1000


def test_maximum_concurrency_caps_a_mapping_from_the_start() -> None:
    """ScalingConfig.MaximumConcurrency limits the concurrent invocations one SQS event source
    makes (AWS::Lambda::EventSourceMapping ScalingConfig,
    https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/aws-properties-lambda-eventsourcemapping-scalingconfig.html)."""
    poller = _poller(8)
    assert poller.concurrency() == 8
    assert _busy_for(poller, 3600) == 8


def test_the_chaos_switch_and_seed_come_from_the_environment() -> None:
    settings = RunnerSettings.from_environment({"LLMQ_SANDBOX_CHAOS": "on", "LLMQ_SANDBOX_CHAOS_SEED": "12"})
    assert (settings.at_least_once_chaos, settings.chaos_seed) == (True, 12)
    assert RunnerSettings.from_environment({}).at_least_once_chaos is False
