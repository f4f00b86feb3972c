"""Lane routing, backoff, config validation and request rules."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from llmq.config import MAX_VISIBILITY_SECONDS, ConfigError, LlmqConfig, RetryPolicy, WorkerEnvironment
from llmq.intake import request_hash
from llmq.job_record import new_job_id
from llmq.lanes import lane_for_tier, retry_delay_seconds
from llmq.models import JobRequest, WebhookEvent


def test_tiers_route_to_their_lane_and_unknown_tiers_to_the_default() -> None:
    config = LlmqConfig()
    assert lane_for_tier(config, "enterprise").name == "high"
    assert lane_for_tier(config, "free").name == "low"
    assert lane_for_tier(config, "mystery").name == config.default_lane


def test_backoff_grows_and_never_undercuts_retry_after() -> None:
    policy = RetryPolicy(base_seconds=2, max_seconds=60)
    rng = random.Random(1)
    delays = [retry_delay_seconds(policy, attempt, None, rng) for attempt in (1, 2, 3, 4)]
    ceilings = [2, 4, 8, 16]
    assert all(ceiling / 2 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True))
    assert retry_delay_seconds(policy, 1, 7.0, rng) >= 7.0
    assert retry_delay_seconds(policy, 30, None, rng) <= 60
    assert retry_delay_seconds(policy, 1, 1e9, rng) == MAX_VISIBILITY_SECONDS


@pytest.mark.parametrize(
    "bad",
    [
        {
            "lanes": [
                {"name": "a", "tiers": ["x"], "max_concurrency": 2},
                {"name": "a", "tiers": ["y"], "max_concurrency": 2},
            ]
        },
        {"lanes": [{"name": "a", "tiers": ["x"], "max_concurrency": 1}], "default_lane": "a"},
        {"default_lane": "nope"},
        {"max_attempts": 5, "max_receive_count": 5},
        {"provider": {"default_model": "x", "models": ["y"]}},
    ],
)
def test_invalid_configs_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        LlmqConfig.model_validate(bad)


def test_a_function_missing_an_env_var_fails_with_its_name() -> None:
    with pytest.raises(ConfigError, match=r"worker.*LLMQ_JOBS_TABLE"):
        WorkerEnvironment.load({"LLMQ_CONFIG": "{}"}, function_name="worker")


def test_job_ids_from_keys_are_stable_per_tenant() -> None:
    assert new_job_id("t1", "k", 0) == new_job_id("t1", "k", 999)
    assert new_job_id("t1", "k", 0) != new_job_id("t2", "k", 0)
    assert new_job_id("t1", None, 1) != new_job_id("t1", None, 1)


def test_prompt_shorthand_and_default_events() -> None:
    request = JobRequest.model_validate({"prompt": "hi", "webhook": {"url": "https://example.com/h"}})
    assert [m.role for m in request.chat_messages()] == ["user"]
    assert request.webhook is not None
    assert WebhookEvent.STARTED not in request.webhook.subscribed_events()
    assert request_hash(request) == request_hash(JobRequest.model_validate(request.model_dump()))
    assert request_hash(request) != request_hash(JobRequest.model_validate({"prompt": "hi!"}))
