"""Lane routing: the tenant's tier, from the tenant record, picks the lane. Never the request."""

from __future__ import annotations

import random

from llmq.config import MAX_REDELIVERY_DELAY_SECONDS, LaneConfig, LlmqConfig, RetryPolicy


def lane_for_tier(config: LlmqConfig, tier: str) -> LaneConfig:
    return config.lane_for_tier(tier)


# How far above a provider's stated wait a retry may come, as a share of that wait.
_ABOVE_THE_WAIT_SHARE = 0.1


def retry_delay_seconds(
    policy: RetryPolicy, attempt: int, retry_after: float | None, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter, never sooner than the provider's Retry-After, and
    never later than the job's message can be hidden (`MAX_REDELIVERY_DELAY_SECONDS`): a job
    due later than its message comes back would spend a receive on a claim that is not yet
    due, and enough of them reach the DLQ with nothing crashed (hunt 237).

    `attempt` is the number of the attempt that just failed, from 1.
    """
    ceiling = min(policy.max_seconds, policy.base_seconds * (2 ** max(0, attempt - 1)))
    random_source = rng or random
    jittered = random_source.uniform(ceiling / 2, ceiling)
    floor = retry_after or 0.0
    if floor > jittered:
        # Jittered above the wait the provider asked for, by up to a tenth of it: the jobs it
        # refused together come back spread out, not all at its second (hunt 335: a storm's
        # 429s sent every job back at once, to be refused together again).
        jittered = floor + random_source.uniform(0, floor * _ABOVE_THE_WAIT_SHARE)
    return min(jittered, float(MAX_REDELIVERY_DELAY_SECONDS))
