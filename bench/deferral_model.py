"""The deferral policy at scale: one capped tenant's backlog through one lane, simulated.

The sandbox runs about ten jobs a second end to end (BENCHMARKS.md §5), so a 2,000-job backlog
would take minutes there, and what it measured would be moto's pace as much as the policy's.
This runs llmq's own policy (`llmq.shares.deferral_seconds` on a `ShareState`, with the
deployment's `FairShareConfig`) in a discrete-event model of the lane, with no AWS:

- `invocations` worker invocations each take up to `batch` visible messages at a time, and
  stay busy until the longest job they started ends (plus `overhead` per batch), as the
  worker's concurrent batch does;
- each message is a claim attempt: below the cap it runs for `latency` seconds; at the cap it
  is deferred by `deferral_seconds`, computed from the slots' holders and the backlog as the
  worker computes it from the refused condition;
- a deferred message is visible again after its delay, rounded up to whole seconds as the
  worker rounds it for SQS's DelaySeconds.

It reports claim attempts per job run (issue 14's target: at most 3 under a 2,000-job
backlog), the tenant's mean jobs in flight while it still had jobs waiting against its cap,
and the makespan against the ideal backlog x latency / cap. The 400-job sandbox run (§3b)
measures the same attempts figure on the real system, so the two can be compared.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

from llmq.config import FairShareConfig
from llmq.shares import ShareState, deferral_seconds

LANE = "high"
TENANT = "ten_a"


@dataclass(frozen=True)
class Lane:
    invocations: int = 4
    batch: int = 10
    overhead: float = 0.05


def simulate(
    jobs: int,
    cap: int,
    latency: float,
    lane: Lane = Lane(),
    seed: int = 7,
    policy: FairShareConfig | None = None,
) -> dict[str, Any]:
    policy = policy or FairShareConfig()
    rng = random.Random(seed)
    now = 0.0
    visible: list[int] = list(range(jobs))
    delayed: list[tuple[float, int]] = []  # (visible at, job)
    ends: list[tuple[float, int]] = []  # (ends at, job)
    free_at = [0.0] * lane.invocations
    holders: dict[str, int] = {}
    finished = attempts = 0
    last_start = 0.0
    in_flight: list[tuple[float, int]] = []  # (time, jobs running from then on)

    def record() -> None:
        in_flight.append((now, len(holders)))

    while finished < jobs:
        # Start batches on every free invocation while messages are visible.
        for index in range(lane.invocations):
            if free_at[index] > now or not visible:
                continue
            taken, visible = visible[: lane.batch], visible[lane.batch :]
            busy_until = now + lane.overhead
            for job in taken:
                attempts += 1
                if len(holders) < cap:
                    holders[str(job)] = int(now * 1000)
                    heapq.heappush(ends, (now + latency, job))
                    busy_until = max(busy_until, now + latency + lane.overhead)
                    last_start = now
                    record()
                else:
                    state = ShareState(
                        tenant_id=TENANT,
                        active=jobs - finished,
                        holders={LANE: dict(holders)},
                        default_caps={LANE: cap},
                    )
                    delay = math.ceil(deferral_seconds(state, LANE, int(now * 1000), policy, rng))
                    heapq.heappush(delayed, (now + delay, job))
            free_at[index] = busy_until
        # Advance to the next event: a job ends, a deferred message returns, an invocation frees.
        upcoming = [time for time in free_at if time > now]
        if ends:
            upcoming.append(ends[0][0])
        if delayed:
            upcoming.append(delayed[0][0])
        now = min(upcoming)
        while ends and ends[0][0] <= now:
            _, job = heapq.heappop(ends)
            del holders[str(job)]
            finished += 1
            record()
        while delayed and delayed[0][0] <= now:
            visible.append(heapq.heappop(delayed)[1])
    return {
        "jobs": jobs,
        "cap": cap,
        "latency_s": latency,
        "claim_attempts_per_job": attempts / jobs,
        "mean_in_flight_while_backlogged": _time_weighted_mean(in_flight, last_start),
        "makespan_s": now,
        "ideal_makespan_s": jobs * latency / cap,
    }


def _time_weighted_mean(samples: list[tuple[float, int]], until: float) -> float:
    """Mean of a step function given as (time, value from then on), over [first time, until]."""
    if not samples or until <= samples[0][0]:
        return float(samples[-1][1]) if samples else 0.0
    total = 0.0
    for (start, value), (end, _) in zip(samples, [*samples[1:], (until, 0)], strict=True):
        span = min(end, until) - start
        if span > 0:
            total += value * span
    return total / (until - samples[0][0])


# Invocations enough that a returning message never waits for one: what the policy does alone.
UNBOUNDED = Lane(invocations=100)


def deferral_at_scale(quick: bool = False) -> dict[str, Any]:
    """The policy under backlogs of 400 (the sandbox run's) and 2,000 jobs at a cap of 20, and
    the sandbox's small-cap run (120 jobs, cap 4), three seeds each, in the benchmark's lane and
    in one with invocations to spare."""
    rows = []
    for lane in (Lane(), UNBOUNDED):
        for jobs, cap in ((120, 4), (400, 20), (2000, 20)):
            runs = [
                simulate(jobs, cap=cap, latency=1.0, lane=lane, seed=seed)
                for seed in ((1,) if quick else (1, 2, 3))
            ]
            rows.append(
                {
                    "invocations": lane.invocations,
                    "jobs": jobs,
                    "cap": cap,
                    "claim_attempts_per_job": statistics.mean(run["claim_attempts_per_job"] for run in runs),
                    "mean_in_flight_while_backlogged": statistics.mean(
                        run["mean_in_flight_while_backlogged"] for run in runs
                    ),
                    "makespan_over_ideal": statistics.mean(
                        run["makespan_s"] / run["ideal_makespan_s"] for run in runs
                    ),
                }
            )
    return {"lane": Lane().__dict__, "latency_s": 1.0, "rows": rows}
