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
- a job that ends leaves its run time as the last run, which the policy reads as the worker
  reads it from the share;
- a refused message whose batch runs jobs of the tenant waits for one of them, one per job
  (`llmq.slot_handoff`), and is visible again the moment that job ends: the handoff at its
  best, as every such end frees a slot here and its copy takes no time to send. When the
  tenant holds more slots than those jobs (others run in other invocations), the wait ends
  when its deferral is due, if that comes first, as the worker bounds it;
- a deferred message is visible again after its delay, rounded up to whole seconds as the
  worker rounds it for SQS's DelaySeconds;
- a batch's first claim of the tenant (its scout, `llmq.slot_handoff`), refused at the cap,
  speaks for the batch's other messages: they are deferred without a claim attempt of their
  own, unless they were spoken for last time (then they claim). A batch here is claimed in an
  instant, so they would all have been refused alike.

It reports claim attempts per job run (issue 14's target: at most 3 under a 2,000-job
backlog), the tenant's mean jobs in flight while it still had jobs waiting against its cap,
and the makespan against the ideal backlog x latency / cap. The 400-job sandbox run (§3b)
measures the same attempts figure on the real system, so the two can be compared.

`batch_beside_interactive` runs the same lane with the backlog as one batch's items (issue
15): the tenant's other jobs arrive one by one meanwhile, and their queue wait is measured
with the batch's items held to their batch cap (`llmq.config.batch_cap`) and without it.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmq.config import FairShareConfig, batch_cap
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
    *,
    arrivals: Sequence[float] = (),
    items_cap: int | None = None,
    handoff: bool = True,
    spread: float = 0.0,
    history: bool = False,
    scout: bool = True,
) -> dict[str, Any]:
    """`jobs` queued at time 0 (a batch's items when `items_cap` caps them), and one more
    job of the same tenant submitted at each of `arrivals` (seconds). Each job runs for
    `latency`, or with `spread` a time drawn uniformly within ± that share of it. `history`:
    the tenant ran a job before the burst, so its share holds a last run from the start."""
    policy = policy or FairShareConfig()
    rng = random.Random(seed)
    now = 0.0
    total = jobs + len(arrivals)
    visible: list[int] = list(range(jobs))
    delayed: list[tuple[float, int]] = [(at, jobs + n) for n, at in enumerate(arrivals)]  # (visible at, job)
    heapq.heapify(delayed)
    ends: list[tuple[float, int]] = []  # (ends at, job)
    free_at = [0.0] * lane.invocations
    holders: dict[str, int] = {}
    items_held: dict[str, int] = {}
    finished = attempts = 0
    spoken: set[int] = set()  # jobs whose copy was spoken for
    last_start = 0.0
    in_flight: list[tuple[float, int]] = []  # (time, jobs running from then on)
    waits: list[float] = []  # the arriving jobs' queue waits
    # How long the last job to end ran (ms), as the share keeps it.
    last_run = int(1000 * latency * (1 + spread * (2 * rng.random() - 1))) if history else None

    def record() -> None:
        in_flight.append((now, len(holders)))

    while finished < total:
        # Start batches on every free invocation while messages are visible.
        for index in range(lane.invocations):
            if free_at[index] > now or not visible:
                continue
            taken, visible = visible[: lane.batch], visible[lane.batch :]
            busy_until = now + lane.overhead
            # (kind -> jobs of that kind this batch claimed, refused ones waiting for them)
            siblings: dict[bool, list[float]] = {False: [], True: []}  # their ends, in order
            waiting = {False: 0, True: 0}
            # (kind -> whether the batch's first claim of it took a slot: refused, it speaks
            # for the batch's other messages of its kind, which claim nothing, `llmq.slot_handoff`)
            first: dict[bool, bool] = {}
            for job in taken:
                item = items_cap is not None and job < jobs
                # (a copy spoken for last time claims for itself: `LaneMessage.spoken_for`)
                spoken_for = scout and first.get(item) is False and job not in spoken
                if spoken_for:
                    spoken.add(job)
                else:
                    spoken.discard(job)
                attempts += 0 if spoken_for else 1
                if (
                    not spoken_for
                    and len(holders) < cap
                    and not (item and len(items_held) >= (items_cap or 0))
                ):
                    first.setdefault(item, True)
                    holders[str(job)] = int(now * 1000)
                    if item:
                        items_held[str(job)] = holders[str(job)]
                    else:
                        waits.extend([now - arrivals[job - jobs]] if job >= jobs else [])
                    run = latency * (1 + spread * (2 * rng.random() - 1))
                    heapq.heappush(ends, (now + run, job))
                    siblings[item].append(now + run)
                    busy_until = max(busy_until, now + run + lane.overhead)
                    last_start = now
                    record()
                else:
                    first.setdefault(item, False)
                    state = ShareState(
                        tenant_id=TENANT,
                        active=total - finished,
                        holders={LANE: dict(holders)},
                        default_caps={LANE: cap},
                        batch_holders={LANE: dict(items_held)},
                        default_batch_caps={LANE: items_cap or cap},
                        last_runs={} if last_run is None else {LANE: last_run},
                    )
                    delay = deferral_seconds(state, LANE, int(now * 1000), policy, rng, batch_item=item)
                    if handoff and waiting[item] < len(siblings[item]):
                        # (`llmq.slot_handoff`: it waits for one of the batch's own jobs, and
                        # is re-sent as that one ends; no longer than its deferral when slots
                        # are held outside the batch, which may free first)
                        sibling_ends = sorted(siblings[item])[waiting[item]]
                        batch_full = item and len(items_held) >= (items_cap or 0) > 0
                        held = len(items_held if batch_full else holders)
                        if held > len(siblings[item]):
                            sibling_ends = min(sibling_ends, now + delay)
                        heapq.heappush(delayed, (sibling_ends, job))
                        waiting[item] += 1
                    else:
                        heapq.heappush(delayed, (now + math.ceil(delay), job))
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
            last_run = int(now * 1000) - holders.pop(str(job))
            items_held.pop(str(job), None)
            finished += 1
            record()
        while delayed and delayed[0][0] <= now:
            visible.append(heapq.heappop(delayed)[1])
    return {
        "jobs": jobs,
        "cap": cap,
        "latency_s": latency,
        "claim_attempts_per_job": attempts / total,
        "mean_in_flight_while_backlogged": _time_weighted_mean(in_flight, last_start),
        "makespan_s": now,
        "ideal_makespan_s": jobs * latency / cap,
        "waits": waits,
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


# Run times: the sandbox benchmark's (every job 1 s), and a real generation's (60 s, each
# anywhere within ±50% of it).
RUN_PROFILES = ((1.0, 0.0), (60.0, 0.5))


def deferral_at_scale(quick: bool = False) -> dict[str, Any]:
    """The policy under backlogs of 400 (the sandbox run's) and 2,000 jobs at a cap of 20, and
    the sandbox's small-cap run (120 jobs, cap 4), three seeds each, in the benchmark's lane and
    in one with invocations to spare, for each run-time profile, of a new tenant; then real
    generations of a tenant with a last run, and without the same-batch handoff
    (`llmq.slot_handoff`)."""
    rows = []
    cases = [
        (latency, spread, lane, jobs, cap, True, False)
        for latency, spread in RUN_PROFILES
        for lane in (Lane(), UNBOUNDED)
        for jobs, cap in ((120, 4), (400, 20), (2000, 20))
    ]
    # A tenant that ran jobs before its burst (its last run known), and the same burst of a new
    # tenant without the same-batch handoff.
    cases += [
        (60.0, 0.5, lane, jobs, cap, True, True)
        for lane in (Lane(), UNBOUNDED)
        for jobs, cap in ((120, 4), (2000, 20))
    ]
    cases += [(60.0, 0.5, lane, 2000, 20, False, False) for lane in (Lane(), UNBOUNDED)]
    rows_scouted = [(*case, True) for case in cases]
    # And the same bursts with every message of a batch claiming for itself, as before the scout.
    rows_scouted += [
        (60.0, 0.5, lane, 2000, 20, True, history, False)
        for lane in (Lane(), UNBOUNDED)
        for history in (False, True)
    ]
    for latency, spread, lane, jobs, cap, handoff, history, scouted in rows_scouted:
        runs = [
            simulate(
                jobs,
                cap=cap,
                latency=latency,
                lane=lane,
                seed=seed,
                spread=spread,
                handoff=handoff,
                history=history,
                scout=scouted,
            )
            for seed in ((1,) if quick else (1, 2, 3))
        ]
        rows.append(
            {
                "latency_s": latency,
                "spread": spread,
                "handoff": handoff,
                "scout": scouted,
                "history": history,
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


def batch_beside_interactive(quick: bool = False) -> dict[str, Any]:
    """A 10,000-item batch (2,000 quick) of a tenant capped at 20, L = 1 s, while the same
    tenant submits one job of its own every 2 s for the first 300 s: those jobs' queue wait,
    with the batch held to its batch cap (the default reserve) and with no reserve."""
    items, cap, latency = (2_000 if quick else 10_000), 20, 1.0
    arrivals = [2.0 * n for n in range(1, 151)]
    rows = []
    for reserve in (0.25, 0.0):
        items_cap = batch_cap(cap, reserve)
        waits: list[float] = []
        attempts: list[float] = []
        for seed in (1,) if quick else (1, 2, 3):
            run = simulate(
                items,
                cap,
                latency,
                UNBOUNDED,
                seed=seed,
                arrivals=arrivals,
                items_cap=items_cap if reserve else None,
            )
            waits += run["waits"]
            attempts.append(run["claim_attempts_per_job"])
        ordered = sorted(waits)
        rows.append(
            {
                "reserve": reserve,
                "batch_cap": items_cap,
                "interactive_wait_p50_s": statistics.median(ordered),
                "interactive_wait_p95_s": ordered[int(0.95 * (len(ordered) - 1))],
                "claim_attempts_per_job": statistics.mean(attempts),
            }
        )
    return {
        "items": items,
        "cap": cap,
        "latency_s": latency,
        "interactive_every_s": 2.0,
        "jobs": len(arrivals),
        "rows": rows,
    }
