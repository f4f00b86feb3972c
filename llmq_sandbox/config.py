"""The sandbox's one LlmqConfig, and the few settings that only the local runner has.

Everything the functions read comes from `sandbox_config()`: it is handed to the real CDK
app, which puts it in every function's LLMQ_CONFIG, so the handlers see the sandbox's
numbers exactly as a deployed stack would pass them. The numbers are short so that a
retry, a webhook schedule or a crash plays out in seconds instead of hours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmq.config import GATEWAY_TIMEOUT_SECONDS, ConcurrencyConfig, LlmqConfig

PROVIDER_BASE_URL_VAR = "LLMQ_PROVIDER_BASE_URL"
PROVIDER_API_KEY_VAR = "LLMQ_PROVIDER_API_KEY"
# Optional with a real endpoint: the model it serves becomes the default and is allowed.
PROVIDER_MODEL_VAR = "LLMQ_PROVIDER_MODEL"
# A JSON object merged over the sandbox's config (tests and experiments), validated as LlmqConfig.
CONFIG_OVERRIDES_VAR = "LLMQ_SANDBOX_CONFIG"
# "off" runs the functions without IAM checks (to tell a grant problem from another while
# debugging); the e2e suite always runs with them.
IAM_VAR = "LLMQ_SANDBOX_IAM"
# "on" makes the pollers deliver at least once for real: duplicates, reordering, partial
# batches (llmq_sandbox/event_sources.py, DeliveryChaos), seeded by LLMQ_SANDBOX_CHAOS_SEED.
CHAOS_VAR = "LLMQ_SANDBOX_CHAOS"
CHAOS_SEED_VAR = "LLMQ_SANDBOX_CHAOS_SEED"
# Seconds a global secondary index lags its table (llmq_sandbox/moto_fidelity.py); 0 turns it off.
INDEX_LAG_VAR = "LLMQ_SANDBOX_INDEX_LAG"
# "off" makes SQS deliver oldest first, as moto does, instead of emulating fair queues
# (llmq_sandbox/moto_fidelity.py; docs/sandbox.md, "SQS fair queues (emulated)").
FAIR_QUEUES_VAR = "LLMQ_SANDBOX_FAIR_QUEUES"

FAKE_MODELS = ["fake-model", "fake-large"]
# Short enough that a crashed worker's message is back within a minute (its lane's
# visibility timeout is six times this), long enough that ten environments cold-starting at
# once on a two-core laptop do not time out. Crash tests shorten it with overrides.
FAKE_WORKER_TIMEOUT_SECONDS = 10
# Two of the api's and two of the authorizer's: a burst of 20 submits a second then rarely
# finds both busy, and the sandbox starts in about the same time.
SANDBOX_PROVISIONED_ENVIRONMENTS = 2
# A real model takes tens of seconds; the deployed default leaves it room.
REAL_WORKER_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class ProviderChoice:
    """The built-in fake provider, or an OpenAI-compatible endpoint from the environment."""

    base_url: str | None
    api_key: str | None
    model: str | None

    @property
    def is_fake(self) -> bool:
        return self.base_url is None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ProviderChoice:
        environ = os.environ if environ is None else environ
        base_url = environ.get(PROVIDER_BASE_URL_VAR) or None
        return cls(
            base_url=base_url,
            # Only for a real provider: the shell of an operator who just deployed holds the real
            # key in the same variable, which the fake provider must never be sent.
            api_key=(environ.get(PROVIDER_API_KEY_VAR) or None) if base_url else None,
            model=environ.get(PROVIDER_MODEL_VAR) or None,
        )


@dataclass(frozen=True)
class RunnerSettings:
    """How the local runner plays the AWS services; nothing here reaches a function."""

    # EventBridge's shortest rate is one minute; the sandbox sweeps more often so that what
    # the reconciler repairs is visible while you watch. None keeps the template's rate.
    reconciler_every_seconds: float | None = 10.0
    # A mapping without ScalingConfig starts with this many concurrent batches on AWS...
    default_mapping_concurrency: int = 5
    # ...adds up to this many a minute while messages wait...
    mapping_scale_per_minute: int = 300
    # ...and never runs more than this many at once (services-sqs-scaling.html).
    mapping_concurrency_limit: int = 1000
    # Execution environments per function when the template reserves no concurrency.
    default_function_concurrency: int = 16
    # API Gateway's integration timeout, counted from the request's arrival.
    integration_timeout_seconds: float = GATEWAY_TIMEOUT_SECONDS
    # Each function acts with its own execution role, and moto refuses what the role does not
    # allow (llmq_sandbox/iam.py), so a grant missing from the CDK app fails here as on AWS.
    enforce_iam: bool = True
    # At-least-once delivery for real: the pollers duplicate, reorder and split batches.
    at_least_once_chaos: bool = False
    chaos_seed: int = 0
    # A GSI answers from its table as it was this long ago, as DynamoDB's indexes lag their
    # table (usually well under a second): code that reads its own write through an index
    # meets it here.
    index_lag_seconds: float = 1.0
    # Standard queues deliver as SQS fair queues do: a noisy tenant's (MessageGroupId's)
    # backlog does not hold back quiet tenants' messages. Emulated on moto's receive.
    fair_queues: bool = True

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> RunnerSettings:
        environ = os.environ if environ is None else environ
        switch = environ.get(IAM_VAR, "on").strip().lower()
        if switch not in ("on", "off"):
            raise ValueError(f"{IAM_VAR} must be on or off, not {switch!r}")
        chaos = environ.get(CHAOS_VAR, "off").strip().lower()
        if chaos not in ("on", "off"):
            raise ValueError(f"{CHAOS_VAR} must be on or off, not {chaos!r}")
        fair = environ.get(FAIR_QUEUES_VAR, "on").strip().lower()
        if fair not in ("on", "off"):
            raise ValueError(f"{FAIR_QUEUES_VAR} must be on or off, not {fair!r}")
        return cls(
            enforce_iam=switch == "on",
            at_least_once_chaos=chaos == "on",
            chaos_seed=int(environ.get(CHAOS_SEED_VAR) or 0),
            index_lag_seconds=float(environ.get(INDEX_LAG_VAR) or 1.0),
            fair_queues=fair == "on",
        )


def _provider(choice: ProviderChoice, fake_url: str | None) -> dict[str, Any]:
    if choice.is_fake:
        return {
            "base_url": fake_url or "http://127.0.0.1:9/v1",
            "default_model": FAKE_MODELS[0],
            "models": FAKE_MODELS,
            "timeout_seconds": 60,
            "stream": True,
        }
    provider: dict[str, Any] = {"base_url": choice.base_url, "timeout_seconds": 120, "stream": True}
    if choice.model:
        provider["default_model"] = choice.model
        provider["models"] = [choice.model, *FAKE_MODELS]
    return provider


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def sandbox_config(
    fake_provider_url: str | None = None,
    choice: ProviderChoice | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LlmqConfig:
    """The sandbox's LlmqConfig. `overrides` (or LLMQ_SANDBOX_CONFIG) is merged over it."""
    choice = choice or ProviderChoice.from_environment()
    worker_timeout = FAKE_WORKER_TIMEOUT_SECONDS if choice.is_fake else REAL_WORKER_TIMEOUT_SECONDS
    base: dict[str, Any] = {
        # A transient failure is retried once: enough to watch a retry, short enough that a
        # crashing job is settled within two visibility timeouts.
        "max_attempts": 2,
        "max_receive_count": 5,
        "lease_margin_seconds": 1,
        "cancel_check_seconds": 0.5,
        "retry": {"base_seconds": 0.5, "max_seconds": 4},
        "webhooks": {
            "schedule_seconds": [1, 2, 4, 8],
            "jitter_fraction": 0.1,
            "timeout_seconds": 5,
            "allow_loopback_http": True,
        },
        "provider": _provider(choice, fake_provider_url),
        # A revoked key stops working within seconds (the authorizer cache TTL in the template).
        "limits": {"wait_poll_seconds": 0.2, "authorizer_cache_seconds": 5},
        "reconciler": {
            "schedule_minutes": 1,
            "stale_queued_seconds": 30,
            "expired_lease_grace_seconds": 5,
            "stale_webhook_seconds": 30,
        },
        "worker": {"memory_mb": 256, "timeout_seconds": worker_timeout},
        "dispatcher": {"memory_mb": 256, "timeout_seconds": 10},
    }
    extra = dict(overrides or {})
    raw = os.environ.get(CONFIG_OVERRIDES_VAR)
    if raw:
        extra = _merge(json.loads(raw), extra)
    merged = _merge(base, extra)
    # The front door starts warm, as a deployment that provisions it does: the first requests
    # after `llmq sandbox up` meet no cold start (BENCHMARKS.md §5). Its provisioned
    # environments give way to what an override asks for: SnapStart (which Lambda does not
    # combine with them), or reservations below them.
    api = merged.setdefault("api", {})
    if "provisioned_environments" not in api:
        concurrency = ConcurrencyConfig.model_validate(merged.get("concurrency", {}))
        api["provisioned_environments"] = (
            0
            if api.get("snap_start") or not concurrency.reserve
            else min(SANDBOX_PROVISIONED_ENVIRONMENTS, concurrency.api, concurrency.authorizer)
        )
    return LlmqConfig.model_validate(merged)
