"""bench/scale.py: the arithmetic behind docs/scale.md's claims."""

from __future__ import annotations

import dataclasses

from bench.scale import LIMITS, STEPS, Load, PerJob, headroom, per_job_from, ramp_seconds

JOB = PerJob(share_write_units=6, job_write_units=8, claim_attempts=3.0)


def _row(load: Load, limit: str) -> float:
    return next(row.headroom for row in headroom(load, JOB) if row.limit == limit)


def test_the_busiest_tenants_share_item_binds_at_1000_write_units_a_second_until_it_is_sharded() -> None:
    # A tenant submitting 1,000 jobs/s writes 6,000 units/s to its one share item
    load = Load(submits_per_second=1_000, in_flight=1_000, generation_seconds=60, biggest_tenant_share=1.0)
    assert _row(load, "share_item_partition") == 1_000 / 6_000
    # Eight shards give it eight partitions' worth
    sharded = dataclasses.replace(load, shards_per_share=8)
    assert _row(sharded, "share_item_partition") == 8 * 1_000 / 6_000


def test_rows_come_least_headroom_first_and_the_default_lanes_bind_before_aws() -> None:
    rows = headroom(STEPS[0], JOB)
    assert [row.headroom for row in rows] == sorted(row.headroom for row in rows)
    # The deployed lanes (8 + 2 invocations of 10 jobs) hold 100 generations: 600 need more
    assert (rows[0].limit, rows[0].allowed) == ("llmq_lane_concurrency", 100)
    assert {row.limit for row in rows} == {*LIMITS} - {
        "lambda_scaling_rate",
        "sqs_mapping_scale_rate",
        "dynamodb_partition_wcu",
    } | {
        "llmq_lane_concurrency",
        "llmq_api_concurrency",
        "share_item_partition",
        "tenant_index_partition",
    }


def test_per_job_costs_come_from_the_runs_counts() -> None:
    results = {
        "write_units": {"rows": [{"job": "small", "share_item_bytes": 68, "transactional_write_units": 14}]},
        "deferral": {"rows": [{"claim_attempts_per_job": 2.5}, {"claim_attempts_per_job": 3.1}]},
    }
    job = per_job_from(results)
    assert (job.share_write_units, job.job_write_units, job.claim_attempts) == (6, 8, 3.1)


def test_the_mappings_not_the_function_set_the_pace_from_idle() -> None:
    # 1,000 invocations a lane: a mapping adds 300 a minute from 5, Lambda 1,000 per 10 s
    load = Load(submits_per_second=100, in_flight=20_000, generation_seconds=60, biggest_tenant_share=0.1)
    assert ramp_seconds(load, JOB) == 60 * 995 / 300


def test_the_share_items_writes_grow_with_the_tenants_jobs_running() -> None:
    from bench.scale import HOLDER_BYTES

    # Each running job is held by its id on the share item, and DynamoDB charges each of a
    # job's three transactional writes 2 units per KB of it (hunt 287: §2's six units hold
    # for a tenant with one job running)
    job = PerJob(
        share_write_units=6, job_write_units=8, claim_attempts=3.0, share_item_bytes=79, holder_bytes=39
    )
    assert HOLDER_BYTES == 39
    assert job.share_units(1) == 6
    assert job.share_units(300) == 3 * 2 * 12  # 79 + 39 x 299 bytes: 12 KB
    # A tenant of 100 submits/s (half of them) with 3,000 in flight, held to its 2,000 slots
    load = Load(submits_per_second=100, in_flight=6_000, generation_seconds=60, biggest_tenant_share=0.5)
    row = next(row for row in headroom(load, job) if row.limit == "share_item_partition")
    assert row.needed == 50 * job.share_units(2_000) and row.headroom < 0.05
    # Sharded eight ways, each shard holds an eighth: the units fall with the square
    sharded = next(
        row
        for row in headroom(dataclasses.replace(load, shards_per_share=8), job)
        if row.limit == "share_item_partition"
    )
    assert sharded.headroom > 40 * row.headroom
