"""Lane routing, backoff, config validation and request rules."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmq.config import MAX_REDELIVERY_DELAY_SECONDS, ConfigError, LlmqConfig, RetryPolicy, WorkerEnvironment
from llmq.intake import request_hash
from llmq.job_record import new_job_id
from llmq.lanes import lane_for_tier, retry_delay_seconds
from llmq.models import JobRequest, WebhookEvent

LAYER = str(Path(sys.modules["llmq"].__file__ or "").parents[1])


def _margin_after_a_run(margin_seconds: int) -> dict:
    """A day's retention whose margin is `margin_seconds`, after a worker's run of 900 s and
    its 30 s lease margin (every other bound on the margin met)."""
    return {
        "retention_days": 1,
        "reconciler": {
            "retention_margin_seconds": margin_seconds,
            "stale_queued_seconds": 100,
            "schedule_minutes": 1,
        },
        "fair_share": {"max_deferral_seconds": 200},
        "worker": {"timeout_seconds": 900},
    }


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
    # (above a stated wait, jittered: fifty jobs refused together come back spread out)
    waits = {round(retry_delay_seconds(policy, 1, 30.0, random.Random(seed)), 3) for seed in range(50)}
    assert len(waits) > 40 and min(waits) >= 30.0 and max(waits) <= 33.0
    assert retry_delay_seconds(policy, 30, None, rng) <= 60
    # (no later than its message can be hidden again, so it is due when the message is back)
    assert retry_delay_seconds(policy, 1, 1e9, rng) == MAX_REDELIVERY_DELAY_SECONDS


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
        {"retention_days": 1, "reconciler": {"retention_margin_seconds": 43_201}},
        # a batch's queued item is looked at only by its claims, at most two deferrals apart
        {"reconciler": {"retention_margin_seconds": 3600}, "fair_share": {"max_deferral_seconds": 3600}},
        # a receiver that hangs would time the dispatcher out, recording nothing
        {"webhooks": {"timeout_seconds": 60}},
        {
            "reconciler": {
                "retention_margin_seconds": 1000,
                "stale_queued_seconds": 300,
                "schedule_minutes": 5,
            }
        },
        {"provider": {"base_url": "api.openai.com/v1"}},
        {"provider": {"base_url": "ftp://files.example.com/v1"}},
        {"provider": {"base_url": "https://"}},
        {"provider": {"base_url": "http://127.0.0.1:99999/v1"}},
        {"provider": {"base_url": "http://[::1/v1"}},
        {"provider": {"base_url": "https://api.example.com/v1 "}},
        {"provider": {"base_url": "https://api.example.com/\nv1"}},
        {"provider": {"base_url": "https://api.example.com/" + "a" * 2100}},
        # (a job body past what Lambda takes base64-encoded: API Gateway's 502, never llmq's 413)
        {"limits": {"max_body_bytes": 8_000_000}},
        # (past what a message's content may hold: prompts within it would fail at the worker)
        {"limits": {"max_prompt_chars": 4_000_000}},
        # (names that would call two resources by one id, or take the default plan's: the
        # synth's construct clash, not a line naming the setting; hunt 238)
        {"fair_share": {"tiers": {"default": {}}}},
        {"fair_share": {"tiers": {"pro-plan": {}, "pro_plan": {}}}},
        {
            "lanes": [
                {"name": "a-b", "tiers": ["x"], "max_concurrency": 2},
                {"name": "a--b", "tiers": ["y"], "max_concurrency": 2},
            ],
            "default_lane": "a-b",
        },
        # (a margin a run outlasts: a job claimed just before it ends after its retention)
        _margin_after_a_run(930),
        # (a lane's queue id taken by another lane's DLQ, or by the poison queue: hunt 280)
        {
            "lanes": [
                {"name": "a", "tiers": ["x"], "max_concurrency": 2},
                {"name": "a-dlq", "tiers": ["y"], "max_concurrency": 2},
            ],
            "default_lane": "a",
        },
        {"lanes": [{"name": "poison", "tiers": ["x"], "max_concurrency": 2}], "default_lane": "poison"},
        # (a chunk of items at their limit, each with a webhook URL of 2,048 emoji, passes a
        # transaction's 4 MB: hunt 299)
        {"batches": {"expand_chunk": 99, "max_item_bytes": 35_000}},
        # (or the name `llmq dlq` gives the webhooks' DLQ: hunt 302)
        {"lanes": [{"name": "webhooks", "tiers": ["x"], "max_concurrency": 2}], "default_lane": "webhooks"},
        {
            "lanes": [{"name": "reconciler-failures", "tiers": ["x"], "max_concurrency": 2}],
            "default_lane": "reconciler-failures",
        },
        # (tiers no tenant can be made in: `llmq tenants create` refuses them; hunt 263)
        {"fair_share": {"tiers": {"pro plan": {}}}},
        {"fair_share": {"tiers": {"pró": {}}}},
        {
            "lanes": [{"name": "high", "tiers": ["enterprise/eu"], "max_concurrency": 2}],
            "default_lane": "high",
        },
    ],
)
def test_invalid_configs_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        LlmqConfig.model_validate(bad)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "http://127.0.0.1:8080/v1/",
        "http://[::1]:9000/v1",
        "https://llm.example.com",
    ],
)
def test_a_provider_base_url_is_kept_as_written(url: str) -> None:
    config = LlmqConfig.model_validate({"provider": {"base_url": url}})
    assert config.provider.base_url == url
    assert LlmqConfig.model_validate_json(config.model_dump_json()).provider.base_url == url


def test_a_retention_margin_just_longer_than_a_run_and_its_lease_is_accepted() -> None:
    # (a takeover after the lease is a claim of its own, refused within the margin: review 264;
    # a crashed run's lease lapses a lease margin after its timeout: review 265)
    config = LlmqConfig.model_validate(_margin_after_a_run(931))
    assert config.reconciler.retention_margin_seconds == 931


def test_the_config_module_does_not_import_pydantics_url_types() -> None:
    """Their module imports importlib.metadata: a cold-start cost for every function (BENCHMARKS §4)."""
    probe = "import sys, llmq.config, llmq.models; print('pydantic.networks' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": LAYER},
    )
    assert out.stdout.strip() == "False"


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


def test_no_tenant_may_hold_more_slots_in_a_lane_than_its_share_item_can_name() -> None:
    from llmq.config import MAX_TENANT_SLOTS

    # A lane of 1,000 invocations x 10 jobs: half of it would be 5,000 (hunt 287: the claims
    # past about 4,500 failed as ItemTooLarge on the share item)
    lanes = [{"name": "big", "tiers": ["enterprise"], "max_concurrency": 1000, "batch_size": 10}]
    config = LlmqConfig.model_validate({"lanes": lanes, "default_lane": "big"})
    assert config.concurrency_caps("enterprise")[0] == MAX_TENANT_SLOTS == 2_000
    with pytest.raises(ValidationError):
        LlmqConfig.model_validate({"fair_share": {"tiers": {"enterprise": {"max_concurrency": 2_001}}}})
    # And that many batch items, each in both maps of its own lane and of `batches.lane`, by
    # the longest ids items have, fit one item with room for the share's other attributes
    from llmq.item_size import MAX_ITEM_BYTES, item_size_bytes

    held = {f"job_{n:026d}n{100_000 + n}": {"N": "1796559989123"} for n in range(MAX_TENANT_SLOTS)}
    share = {
        "pk": {"S": "share#ten_" + "x" * 60},
        **{f"run{kind}_lane{n}": {"M": held} for kind in ("", "b") for n in (1, 2)},
    }
    assert item_size_bytes(share) < MAX_ITEM_BYTES - 32 * 1024
