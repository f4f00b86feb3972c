"""Scale on paper: which documented limit binds first as llmq grows (docs/scale.md).

No AWS here: the per-job costs come from this bench run's own counts (§2: calls and write
units per job; the deferral model: claim attempts per job under a cap), and the limits from
AWS's and the providers' documentation (`LIMITS`, each with its source). For a target load,
each limit gives the most that it allows of what it bounds, and its headroom: allowed ÷
needed. The first to bind is the one with the least headroom.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from llmq.config import MAX_TENANT_SLOTS, LlmqConfig
from llmq.item_size import item_size_bytes


@dataclass(frozen=True)
class Limit:
    name: str
    value: float
    unit: str
    adjustable: bool
    source: str


LIMITS: dict[str, Limit] = {
    limit.name: limit
    for limit in (
        Limit(
            "api_gateway_account_rps",
            10_000,
            "requests/s per account and Region (5,000 burst)",
            True,
            "https://docs.aws.amazon.com/apigateway/latest/developerguide/limits.html",
        ),
        Limit(
            "lambda_account_concurrency",
            1_000,
            "concurrent executions per account and Region",
            True,
            "https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html",
        ),
        Limit(
            "lambda_scaling_rate",
            1_000,
            "more concurrent executions per function every 10 s",
            False,
            "https://docs.aws.amazon.com/lambda/latest/dg/scaling-behavior.html",
        ),
        Limit(
            "sqs_mapping_scale_rate",
            300,
            "more concurrent invocations per minute per SQS event source mapping, from 5 "
            "(standard mode; provisioned mode: up to 1,000 a minute)",
            False,
            "https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-scaling.html",
        ),
        Limit(
            "sqs_mapping_max_concurrency",
            1_000,
            "concurrent invocations per SQS event source mapping (MaximumConcurrency)",
            False,
            "https://docs.aws.amazon.com/lambda/latest/dg/services-sqs-scaling.html",
        ),
        Limit(
            "sqs_in_flight",
            120_000,
            "in-flight messages per standard queue",
            True,
            "https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html",
        ),
        Limit(
            "dynamodb_partition_wcu",
            1_000,
            "write units/s per partition (one item is in one partition)",
            False,
            "https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/bp-partition-key-design.html",
        ),
        Limit(
            "dynamodb_table_wru",
            40_000,
            "on-demand write request units/s per table (default table quota)",
            True,
            "https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/ServiceQuotas.html",
        ),
        Limit(
            "provider_rps",
            30_000 / 60,
            "requests/s for one provider key (about 30,000 RPM for gpt-4o-mini at OpenAI's tier 5; "
            "about 10,000 for gpt-4o; Anthropic's top standard tier about 4,000)",
            True,
            "https://platform.openai.com/docs/guides/rate-limits",
        ),
    )
}


@dataclass(frozen=True)
class PerJob:
    """What one job costs, as this bench run counted it."""

    share_write_units: float  # on its tenant's share item: accept, claim and complete
    job_write_units: float  # on its own item, the same three writes
    claim_attempts: float  # lane messages per job run under a capped backlog (SQS requests)
    batch_size: int = 10  # jobs one worker invocation runs at once
    api_seconds: float = 0.05  # one warm submit in the api function (an assumption, not measured)
    dispatcher_seconds: float = 0.2  # one warm delivery: a signed POST and one write (assumed)
    # Each of a job's three writes changes what the tenant index projects, under 1 KB: one
    # unit each in the partition of the tenant's id (an estimate; moto does not meter GSIs).
    tenant_index_write_units: float = 3
    # The share item as §2 measured it (the tenant's one job running), and what each more of
    # the tenant's jobs running adds to it: its id in the holders map (hunt 287: DynamoDB
    # charges a write by the item's size, so the share's writes grow with the tenant's jobs
    # running, and §2's six units hold for a tenant with one).
    share_item_bytes: int = 0
    holder_bytes: int = 0

    def share_units(self, running: float) -> float:
        """A job's units on its tenant's share item with `running` of the tenant's jobs held
        there: three transactional writes, each charged twice per KB of the item."""
        if not self.share_item_bytes:
            return self.share_write_units
        size = self.share_item_bytes + self.holder_bytes * max(0.0, running - 1)
        return 3 * 2 * math.ceil(size / 1024)


@dataclass(frozen=True)
class Load:
    submits_per_second: float
    in_flight: int  # generations running at once
    generation_seconds: float
    biggest_tenant_share: float  # of the submits, the busiest tenant's
    shards_per_share: int = 1  # share items per tenant (today: one)
    lanes: int = 2


@dataclass(frozen=True)
class Row:
    limit: str
    bounds: str
    needed: float
    allowed: float
    headroom: float
    adjustable: bool
    change: str


def per_job_from(results: dict[str, Any]) -> PerJob:
    """The per-job costs from this run's §2 write units and the deferral model."""
    small = next(row for row in results["write_units"]["rows"] if row["job"] == "small")
    share_units = 3 * 2 * math.ceil(small["share_item_bytes"] / 1024)  # three transactional writes
    attempts = max(row["claim_attempts_per_job"] for row in results["deferral"]["rows"])
    return PerJob(
        share_write_units=share_units,
        job_write_units=small["transactional_write_units"] - share_units,
        claim_attempts=attempts,
        share_item_bytes=small["share_item_bytes"],
        holder_bytes=HOLDER_BYTES,
    )


# One running job's entry in its tenant's holders map (its id, its claim's epoch ms), as
# DynamoDB sizes it.
HOLDER_BYTES = item_size_bytes(
    {"held": {"M": {f"job_{'0' * 26}": {"N": "1796559989123"}}}}
) - item_size_bytes({"held": {"M": {}}})


# Rows named for what they bound, and the limit each is held to: one DynamoDB partition's writes.
_LIMIT_OF_ROW = {
    "share_item_partition": "dynamodb_partition_wcu",
    "tenant_index_partition": "dynamodb_partition_wcu",
}


def headroom(load: Load, job: PerJob) -> list[Row]:
    """Each limit against the load, least headroom (the first to bind) first."""
    completions = load.in_flight / load.generation_seconds
    workers = math.ceil(load.in_flight / job.batch_size)
    lambdas = workers + load.submits_per_second * job.api_seconds + completions * job.dispatcher_seconds
    tenant_rate = load.submits_per_second * load.biggest_tenant_share
    # The busiest tenant's jobs running, each held on its share item (at most its cap), split
    # across the share's shards
    tenant_running = min(load.in_flight * load.biggest_tenant_share, MAX_TENANT_SLOTS) / load.shards_per_share
    # A running job's lane message is in flight until its job ends; a deferred job's is not
    # (the worker acknowledges it and sends a delayed copy, and delayed messages are not in
    # flight), so a capped tenant's backlog, however large, takes none of the quota.
    messages_in_flight = load.in_flight / load.lanes
    # Conservative: every write of a job at the faster of the two rates.
    table_units = (job.job_write_units + job.share_write_units) * max(load.submits_per_second, completions)
    rows = [
        (
            "api_gateway_account_rps",
            "submits/s",
            load.submits_per_second,
            LIMITS["api_gateway_account_rps"].value,
            "ask for a higher account rate; batches (one request per 100,000 jobs) cut it",
        ),
        (
            "lambda_account_concurrency",
            "concurrent Lambdas",
            lambdas,
            LIMITS["lambda_account_concurrency"].value,
            "ask for a higher quota; larger worker batches run more jobs per invocation",
        ),
        (
            "sqs_mapping_max_concurrency",
            "generations per lane",
            load.in_flight / load.lanes,
            LIMITS["sqs_mapping_max_concurrency"].value * job.batch_size,
            "more lanes (one mapping each), or larger batches per invocation",
        ),
        (
            "sqs_in_flight",
            "lane messages in flight per queue",
            messages_in_flight,
            LIMITS["sqs_in_flight"].value,
            "more lanes (a queue each)",
        ),
        (
            "share_item_partition",
            "write units/s on the busiest tenant's share item",
            tenant_rate * job.share_units(tenant_running),
            LIMITS["dynamodb_partition_wcu"].value * load.shards_per_share,
            "shard each tenant's share item, its cap split across the shards",
        ),
        (
            "tenant_index_partition",
            "write units/s in the tenant index's partition of the busiest tenant",
            tenant_rate * job.tenant_index_write_units,
            LIMITS["dynamodb_partition_wcu"].value,
            "a tenant index key with a shard suffix (its sort key only grows, so DynamoDB cannot split it for heat)",
        ),
        (
            "dynamodb_table_wru",
            "job writes/s",
            table_units,
            LIMITS["dynamodb_table_wru"].value,
            "ask for a higher table quota, or provisioned capacity with auto scaling",
        ),
        (
            "provider_rps",
            "generations started/s",
            completions,
            LIMITS["provider_rps"].value,
            "more provider keys or providers, one lane each",
        ),
    ]
    out = [
        Row(
            name,
            bounds,
            needed,
            allowed,
            allowed / needed if needed else math.inf,
            LIMITS[_LIMIT_OF_ROW.get(name, name)].adjustable,
            change,
        )
        for name, bounds, needed, allowed, change in rows
    ]
    # llmq's own setting, before any of AWS's: the lanes' MaximumConcurrency as deployed.
    lanes = sum(lane.max_concurrency for lane in LlmqConfig().lanes) * job.batch_size
    out.append(
        Row(
            "llmq_lane_concurrency",
            "generations at once, every lane",
            load.in_flight,
            lanes,
            lanes / load.in_flight,
            True,
            "raise lanes[].max_concurrency in LlmqConfig (up to 1,000 each)",
        )
    )
    # And the api function's reserved concurrency, which caps it there (long polls aside).
    api = LlmqConfig().concurrency.api
    out.append(
        Row(
            "llmq_api_concurrency",
            "api environments for submits",
            load.submits_per_second * job.api_seconds,
            api,
            api / (load.submits_per_second * job.api_seconds),
            True,
            "raise concurrency.api in LlmqConfig (its reservation counts against the account's)",
        )
    )
    return sorted(out, key=lambda row: row.headroom)


def ramp_seconds(load: Load, job: PerJob) -> float:
    """From idle to the load's worker invocations (or a mapping's ceiling), every lane's mapping
    scaling at once: a mapping adds invocations more slowly than Lambda scales a function, so
    the mappings set the pace."""
    per_lane = min(
        math.ceil(load.in_flight / job.batch_size / load.lanes), LIMITS["sqs_mapping_max_concurrency"].value
    )
    per_minute = LIMITS["sqs_mapping_scale_rate"].value
    function_rate = LIMITS["lambda_scaling_rate"].value  # per 10 s, the whole function
    mappings = 60 * max(0, per_lane - 5) / per_minute
    function = 10 * math.ceil(per_lane * load.lanes / function_rate)
    return max(mappings, function)


STEPS = (
    Load(submits_per_second=10, in_flight=600, generation_seconds=60, biggest_tenant_share=0.5),
    Load(submits_per_second=100, in_flight=6_000, generation_seconds=60, biggest_tenant_share=0.5),
    Load(submits_per_second=1_000, in_flight=60_000, generation_seconds=60, biggest_tenant_share=0.2),
    Load(submits_per_second=10_000, in_flight=100_000, generation_seconds=60, biggest_tenant_share=0.1),
)


def scale_on_paper(results: dict[str, Any]) -> dict[str, Any]:
    job = per_job_from(results)
    steps = []
    for load in STEPS:
        rows = headroom(load, job)
        steps.append(
            {
                "load": asdict(load),
                "ramp_seconds": ramp_seconds(load, job),
                "rows": [asdict(row) for row in rows],
                # llmq's own settings bind first: they are configuration, not quotas.
                "first_to_bind": next(row.limit for row in rows if not row.limit.startswith("llmq_")),
            }
        )
    return {
        "per_job": asdict(job),
        "limits": {name: asdict(limit) for name, limit in LIMITS.items()},
        "steps": steps,
    }
