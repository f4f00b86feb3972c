"""The metric catalogue: every name the functions emit is one MetricName; and what the logs
hold back."""

from __future__ import annotations

import logging

import pytest

from llmq.models import TERMINAL_STATUSES
from llmq.telemetry import (
    FAULT_METRICS,
    JOB_OUTCOME_METRICS,
    JOB_OUTCOMES,
    LIMIT_METRICS,
    WEBHOOK_OUTCOME_METRICS,
    MetricName,
)


def test_every_terminal_status_counts_under_its_own_outcome_metric() -> None:
    assert set(JOB_OUTCOME_METRICS) == set(TERMINAL_STATUSES)
    assert len(set(JOB_OUTCOME_METRICS.values())) == len(TERMINAL_STATUSES)


def test_outcome_timing_and_fault_metrics_together_are_the_whole_catalogue() -> None:
    timings = {MetricName.QUEUE_WAIT_MS, MetricName.RUN_TIME_MS}
    outcomes = set(JOB_OUTCOMES) | set(WEBHOOK_OUTCOME_METRICS)
    faults = set(FAULT_METRICS)
    limits = set(LIMIT_METRICS)
    assert timings | outcomes | faults | limits == set(MetricName)
    assert (
        not timings & outcomes
        and not faults & (timings | outcomes)
        and not limits & (timings | outcomes | faults)
    )


@pytest.mark.parametrize(
    "library",
    [
        "botocore.endpoint",
        "aws_lambda_powertools.event_handler.api_gateway",
        "httpx",
        "aws_xray_sdk.core.emitters.udp_emitter",
    ],
)
def test_libraries_that_quote_requests_log_nothing_below_warning_at_any_root_level(
    caplog: pytest.LogCaptureFixture, library: str
) -> None:
    # Given the root logger at DEBUG, as Lambda sets it for an application log level of DEBUG
    caplog.set_level(logging.DEBUG)
    # When a library logs what it sends below WARNING, and a warning
    logging.getLogger(library).debug("request body: the prompt")
    logging.getLogger(library).info("HTTP Request: POST https://hooks.example/x?token=secret")
    logging.getLogger(library).warning("a warning")
    # Then only the warning reaches a log
    assert [record.getMessage() for record in caplog.records if record.name == library] == ["a warning"]
