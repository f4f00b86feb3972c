"""A recovered job whose entry stayed at the front after its message went (its postpone failed,
or the run was cut after the send) is sent one more message, and never takes the lane's
missing message from a job that really lost its own."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmq.errors import StoreUnavailable
from llmq.jobs import SWEEP_RECOVERED_MS
from tests.integration.harness import Harness
from tests.integration.test_jobs_ended import _crashed, _purge, _reconciler


class _LambdaTimedOut(BaseException):
    """The reconciler's invocation killed at its timeout."""


@pytest.mark.parametrize(
    "postpone_fails", [None, "throttled", "cut"], ids=["control", "postpone-throttled", "run-cut-after-send"]
)
def test_a_lost_message_is_not_hidden_by_a_recovered_jobs_failed_postpone(
    harness: Harness, postpone_fails: str | None
) -> None:
    url = harness.stack.lane_queue_urls["high"]
    # Given a job whose message was lost (SQS lost it / a worker acknowledged it unclaimed)
    lost = harness.submit(prompt="lost").body["id"]
    # And a crashed worker's job (its message consumed)
    crashed = harness.submit(prompt="crashed").body["id"]
    _purge(harness)
    _crashed(harness, crashed)
    offset = [1.0]
    reconciler = _reconciler(harness, offset)
    # When the reconciler recovers the crashed job and sends it its message, but the postpone
    # of its entry is throttled past its retries (logged, left first in line)
    real_postpone = reconciler.jobs.postpone_sweep

    def throttled(job_id: str, *args: Any, **kwargs: Any) -> bool:
        if postpone_fails and job_id == crashed and kwargs.get("seen_at") == SWEEP_RECOVERED_MS:
            if postpone_fails == "cut":
                raise _LambdaTimedOut()
            raise StoreUnavailable("throttled", retry_after=1)
        return real_postpone(job_id, *args, **kwargs)

    reconciler.jobs.postpone_sweep = throttled  # type: ignore[method-assign]
    if postpone_fails == "cut":
        with pytest.raises(_LambdaTimedOut):
            reconciler.run()
    else:
        assert reconciler.run().recovered == [crashed]
    reconciler.jobs.postpone_sweep = real_postpone  # type: ignore[method-assign]
    # And the reconciler runs on (the crashed job not yet claimed: its tenant at its cap, say)
    reports = []
    for _ in range(6):
        offset[0] += harness.config.reconciler.stale_queued_seconds + 1
        reports.append(reconciler.run())
    # Then the job that lost its message got one
    bodies = [json.loads(m["Body"])["job_id"] for m in harness.receive(url)]
    assert lost in bodies, (
        f"lost={lost} crashed={crashed} bodies={bodies} "
        f"requeued={[r.requeued for r in reports]} waiting={[r.waiting for r in reports]}"
    )
