"""The metric catalogue: every name the functions emit is one MetricName."""

from __future__ import annotations

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
