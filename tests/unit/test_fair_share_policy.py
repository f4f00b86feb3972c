"""The fair-share policy: default caps, and how long a message of a capped tenant waits."""

from __future__ import annotations

import random
import statistics

import pytest
from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import strategies as st

from llmq.config import FairShareConfig, LlmqConfig, batch_cap
from llmq.job_codec import missing_path
from llmq.shares import ShareState, deferral_seconds

POLICY = FairShareConfig()
NOW = 1_800_000_000_000


def _state(
    running_ages_s: list[float],
    queued: int,
    cap: int = 4,
    lane: str = "high",
    last_run_s: float | None = None,
) -> ShareState:
    holders = {f"job_{n}": NOW - int(age * 1000) for n, age in enumerate(running_ages_s)}
    return ShareState(
        tenant_id="ten_a",
        active=len(holders) + queued,
        holders={lane: holders},
        default_caps={lane: cap},
        last_runs={} if last_run_s is None else {lane: int(last_run_s * 1000)},
    )


def _mean_delay(state: ShareState, seed: int = 5, live_for_s: float | None = None) -> float:
    rng = random.Random(seed)
    live_for_ms = None if live_for_s is None else int(live_for_s * 1000)
    return statistics.mean(
        deferral_seconds(state, "high", NOW, POLICY, rng, live_for_ms=live_for_ms) for _ in range(2000)
    )


def test_the_default_cap_is_half_the_lanes_job_capacity() -> None:
    config = LlmqConfig()
    high = config.lanes_by_name["high"]
    # An invocation runs a whole batch at once: capacity is concurrency x batch size
    assert config.concurrency_cap("enterprise") == high.max_concurrency * high.batch_size // 2
    low = config.lanes_by_name["low"]
    assert config.concurrency_cap("free") == low.max_concurrency * low.batch_size // 2
    # An unknown tier goes to the default lane, with that lane's default cap
    assert config.concurrency_cap("mystery") == config.concurrency_cap("free")


def test_a_tier_may_set_its_own_cap() -> None:
    config = LlmqConfig.model_validate({"fair_share": {"tiers": {"enterprise": {"max_concurrency": 3}}}})
    assert config.concurrency_cap("enterprise") == 3


@given(cap=st.integers(min_value=1, max_value=10_000), reserve=st.floats(min_value=0, max_value=0.99))
def test_a_batch_cap_keeps_a_reserve_below_the_cap_but_never_stops_batches(cap: int, reserve: float) -> None:
    batches = batch_cap(cap, reserve)
    assert 1 <= batches <= cap
    # The reserve rounds up: at least the configured share of the cap is kept, when it can be
    if reserve > 0 and cap > 1:
        assert cap - batches >= min(cap - 1, round(cap * reserve, 9))
    if reserve == 0:
        assert batches == cap


def test_the_default_batch_cap_is_the_tier_cap_less_a_quarter() -> None:
    config = LlmqConfig()
    cap, batches = config.concurrency_caps("enterprise")
    assert batches == cap - -(-cap // 4)
    assert LlmqConfig.model_validate({"batches": {"interactive_reserve": 0}}).concurrency_caps(
        "enterprise"
    ) == (
        cap,
        cap,
    )


def test_a_reserve_is_a_share_of_the_cap_without_floating_point_surprises() -> None:
    # 100 x 0.07 is 7.000000000000001 in floating point: still 7 kept, not 8
    assert batch_cap(100, 0.07) == 93
    assert batch_cap(8, 0.25) == 6 and batch_cap(1, 0.25) == 1 and batch_cap(2, 0.25) == 1


def test_batches_in_a_lane_of_their_own_take_the_whole_cap_there() -> None:
    """No job of the tenant's runs in the batch lane (`batches.lane`) but batch items: a
    reserve there would only leave slots idle."""
    config = LlmqConfig.model_validate({"batches": {"lane": "low"}})
    cap = config.concurrency_cap("enterprise")
    assert config.concurrency_caps("enterprise", "low") == (cap, cap)
    assert config.concurrency_caps("enterprise", "high") == (cap, batch_cap(cap, 0.25))


def test_a_batch_item_at_its_batch_cap_waits_for_a_batch_slot() -> None:
    """Refused by the batch cap with the tenant's other slots free, an item waits for one of
    the batch's items to end, not for any of the tenant's jobs to end."""
    rng = random.Random(5)
    # Three batch items hold the batch's three slots, for a minute now; one quick job of the
    # tenant's own holds the fourth, since a second.
    holders = {"job_b0": NOW - 60_000, "job_b1": NOW - 60_000, "job_b2": NOW - 60_000, "job_i": NOW - 1000}
    state = ShareState(
        tenant_id="ten_a",
        active=4 + 30,
        batch_active=3 + 30,  # (the thirty queued are the batch's items)
        holders={"high": holders},
        default_caps={"high": 8},
        batch_holders={"high": {job: at for job, at in holders.items() if job != "job_i"}},
        default_batch_caps={"high": 3},
    )
    as_item = [deferral_seconds(state, "high", NOW, POLICY, rng, batch_item=True) for _ in range(200)]
    as_job = [deferral_seconds(state, "high", NOW, POLICY, rng) for _ in range(200)]
    # The item's wait follows its three slots of a minute each, not the cap of eight
    assert statistics.median(as_item) > 3 * statistics.median(as_job)


def test_a_tenants_own_job_does_not_wait_behind_its_batchs_backlog() -> None:
    """A batch's items can never take the slots kept for the tenant's own jobs: a refused job
    of the tenant's own waits for those slots to free, however many items are queued."""
    rng = random.Random(5)
    # Three batch items hold the batch's three slots of four for two minutes now; one job of
    # the tenant's own holds the fourth, since ten seconds; one more of its own waits.
    holders = {
        "job_b0": NOW - 120_000,
        "job_b1": NOW - 120_000,
        "job_b2": NOW - 120_000,
        "job_i": NOW - 10_000,
    }
    batch_holders = {job: at for job, at in holders.items() if job != "job_i"}

    def waits(queued_items: int) -> float:
        state = ShareState(
            tenant_id="ten_a",
            active=4 + 1 + queued_items,
            batch_active=3 + queued_items,
            holders={"high": holders},
            default_caps={"high": 4},
            batch_holders={"high": batch_holders},
            default_batch_caps={"high": 3},
        )
        return statistics.median(deferral_seconds(state, "high", NOW, POLICY, rng) for _ in range(400))

    # Then 400 queued items change nothing: the wait is about one run of a slot it can take
    assert waits(400) == pytest.approx(waits(0), rel=0.25)
    assert waits(400) < 120


def test_a_batch_items_deferral_does_not_read_the_batch_count_which_may_under_count() -> None:
    """`batch_active` under-counts for good on a share that had items in flight when it was
    introduced: a batch item's deferral must not shrink with it (every item would claim again
    every few seconds)."""
    holders = {f"job_b{n}": NOW - 60_000 for n in range(3)}

    def waits(batch_active: int) -> float:
        rng = random.Random(5)
        state = ShareState(
            tenant_id="ten_a",
            active=3 + 25,
            batch_active=batch_active,
            holders={"high": holders},
            default_caps={"high": 4},
            batch_holders={"high": holders},
            default_batch_caps={"high": 3},
        )
        return statistics.median(
            deferral_seconds(state, "high", NOW, POLICY, rng, batch_item=True) for _ in range(400)
        )

    assert waits(5) == waits(28)


def test_a_longer_backlog_waits_longer() -> None:
    rng = random.Random(1)
    short = [deferral_seconds(_state([10, 20, 30, 40], 8), "high", NOW, POLICY, rng) for _ in range(200)]
    long = [deferral_seconds(_state([10, 20, 30, 40], 400), "high", NOW, POLICY, rng) for _ in range(200)]
    assert statistics.median(long) > 10 * statistics.median(short)


def test_longer_runs_wait_longer() -> None:
    rng = random.Random(2)
    quick = [deferral_seconds(_state([1, 1, 1, 1], 40), "high", NOW, POLICY, rng) for _ in range(200)]
    slow = [deferral_seconds(_state([30, 30, 30, 30], 40), "high", NOW, POLICY, rng) for _ in range(200)]
    assert statistics.median(slow) > 10 * statistics.median(quick)


def test_deferrals_are_jittered_not_in_lock_step() -> None:
    rng = random.Random(3)
    delays = {round(deferral_seconds(_state([20] * 4, 100), "high", NOW, POLICY, rng), 3) for _ in range(50)}
    assert len(delays) > 40


def test_retries_come_back_a_little_faster_than_slots_free() -> None:
    """Across a backlog, deferred messages return at about `deferral_pressure` times the rate
    the tenant's slots free up: a freed slot is taken soon, with few refused claims per run."""
    rng = random.Random(4)
    cap, run_s, backlog = 4, 20.0, 200
    state = _state([run_s / 2] * cap, backlog, cap=cap)
    delays = [deferral_seconds(state, "high", NOW, POLICY, rng) for _ in range(2000)]
    # Spread evenly from now: the backlog comes back over a window twice the mean delay
    assert min(delays) < 0.05 * max(delays)
    returns_per_second = backlog / (2 * statistics.mean(delays))
    frees_per_second = cap / run_s
    assert 1.2 * frees_per_second < returns_per_second < 2.0 * frees_per_second


@given(
    ages=st.lists(st.floats(min_value=0, max_value=3600), min_size=1, max_size=50),
    queued=st.integers(min_value=0, max_value=100_000),
    cap=st.integers(min_value=1, max_value=500),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_a_deferral_is_always_within_its_bounds(ages: list[float], queued: int, cap: int, seed: int) -> None:
    delay = deferral_seconds(_state(ages, queued, cap=cap), "high", NOW, POLICY, random.Random(seed))
    assert POLICY.min_deferral_seconds <= delay <= POLICY.max_deferral_seconds


def test_a_tenants_last_run_sets_the_pace_where_its_holders_ages_mislead() -> None:
    # Given four holders that started together 55 s ago, of a tenant whose jobs run a minute
    synchronized = [55.0] * 4
    # Then with its last run known the backlog spreads over a minute's drain per slot, not the
    # 110 s that twice their mean age suggests
    known = _mean_delay(_state(synchronized, 40, last_run_s=60.0))
    guessed = _mean_delay(_state(synchronized, 40))
    assert 0.5 < known / guessed < 0.6
    # And right after a burst starts (the holders a second old), a known run still spreads the
    # backlog over the drain instead of bringing it back within seconds
    assert _mean_delay(_state([1.0] * 4, 40, last_run_s=60.0)) > 20 * _mean_delay(_state([1.0] * 4, 40))


def test_a_holder_older_than_the_last_run_stretches_the_estimate_but_a_stuck_one_does_not() -> None:
    baseline = _mean_delay(_state([10.0, 1.0, 1.0, 1.0], 40, last_run_s=10.0), live_for_s=330)
    # A last run of 10 s, but one holder has run 18 s already: runs now take at least that
    longer = _mean_delay(_state([18.0, 1.0, 1.0, 1.0], 40, last_run_s=10.0), live_for_s=330)
    assert 1.6 < longer / baseline < 2.0
    # One that has held its slot past any worker's time (its worker gone, its lease not yet
    # recovered) says nothing of how long runs take, and must not stall the backlog
    stuck = _mean_delay(_state([600.0, 1.0, 1.0, 1.0], 40, last_run_s=10.0), live_for_s=330)
    assert 0.9 < stuck / baseline < 1.1
    # And with every holder stuck, the backlog comes back over the time until the reconciler
    # recovers them (all together, within one of its periods), then drains as usual: not every
    # second before the recovery (a spin), nor as if each job took a worker's whole time after
    for last_run_s in (None, 2.0):
        state = _state([600.0] * 4, 40, last_run_s=last_run_s)
        rng = random.Random(5)
        delays = [
            deferral_seconds(state, "high", NOW, POLICY, rng, live_for_ms=330_000, recovered_within_s=300)
            for _ in range(2000)
        ]
        drain = 40 * (last_run_s or 1.0) / 4 / POLICY.deferral_pressure
        assert 0.8 * (150 + drain / 2) < statistics.mean(delays) < 1.2 * (150 + drain / 2), last_run_s
        assert max(delays) <= 300 + drain
    # Nor does one quick success make the running minute-long attempts look stuck
    quick = _mean_delay(_state([57.0, 30.0, 10.0, 1.0], 40, last_run_s=2.0), live_for_s=330)
    assert quick > 0.9 * _mean_delay(_state([57.0, 30.0, 10.0, 1.0], 40, last_run_s=57.0), live_for_s=330)


def test_the_default_policy_keeps_claim_attempts_within_three_per_job_under_a_2000_job_backlog() -> None:
    """Issue 14's target, on the discrete-event model of a lane (bench/deferral_model.py) that
    runs the real `deferral_seconds`: deferrals that return too eagerly would spin, too lazily
    would leave the tenant's slots idle for most of the drain."""
    from bench.deferral_model import simulate

    for seed in (1, 2):
        run = simulate(2000, cap=20, latency=1.0, seed=seed)
        assert run["claim_attempts_per_job"] <= 3.0, run
        assert run["mean_in_flight_while_backlogged"] >= 0.7 * 20, run
        assert run["makespan_s"] <= 1.5 * run["ideal_makespan_s"], run


def _canceled(reasons: list[dict[str, str]]) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "TransactionCanceledException", "Message": "Transaction cancelled"},
            "CancellationReasons": reasons,  # type: ignore[typeddict-unknown-key]
        },
        "TransactWriteItems",
    )


def test_a_share_update_inside_a_missing_map_is_recognised_in_the_shape_aws_reports_it() -> None:
    """On AWS a transaction's item whose update writes inside a missing map is its
    ValidationError reason (the wording varies); moto refuses the whole call instead."""
    for message in (
        "The document path provided in the update expression is invalid for update",
        "The provided expression refers to an attribute that does not exist in the item",
    ):
        assert missing_path(
            _canceled([{"Code": "None"}, {"Code": "ValidationError", "Message": message}]), at=1
        )
    # The job's own item too large is not the share's map
    too_large = {"Code": "ValidationError", "Message": "Item size has exceeded the maximum allowed size"}
    assert not missing_path(_canceled([too_large, {"Code": "None"}]), at=1)
    # A condition that failed is not either
    assert not missing_path(_canceled([{"Code": "None"}, {"Code": "ConditionalCheckFailed"}]), at=1)
    moto = ClientError(
        {
            "Error": {
                "Code": "ValidationException",
                "Message": "The document path provided in the update expression is invalid for update",
            }
        },
        "TransactWriteItems",
    )
    assert missing_path(moto, at=1)
