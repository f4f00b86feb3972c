"""What llmq costs on AWS per million jobs, from measured call counts and public unit prices.

The prices live in one table, with the date they were read. They are us-east-1 list prices
beyond the free tier; a quote for a real account should start from the AWS calculator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRICES_AS_OF = "2025-06 (us-east-1 public list prices)"
PRICES = {
    "lambda_gb_second_arm64": 0.0000133334,
    "lambda_request": 0.20 / 1e6,
    "api_gateway_rest_request": 3.50 / 1e6,
    "sqs_request": 0.40 / 1e6,
    # DynamoDB on-demand, after the November 2024 price reduction.
    "dynamodb_write_request_unit": 0.625 / 1e6,
    "dynamodb_read_request_unit": 0.125 / 1e6,
}


@dataclass(frozen=True)
class CallsPerJob:
    """What one job with a webhook takes from AWS, by kind. The defaults are what `make bench`
    measures for a small job (BENCHMARKS.md §2; `bench/run.py` `measured_per_job`, and a test
    keeps the two equal).

    DynamoDB bills units, not calls: accept, claim and complete each write the job and its
    tenant's share item in one transaction, which costs two units per KB of each item; the
    delivery's write of the job one per KB. A consistent read is a unit per 4 KB."""

    dynamodb_write_units: float = 16.0
    # The claim's read of the job; the delivery's of the job and of the tenant's secrets.
    dynamodb_read_units: float = 3.0
    # The lane's message and the webhook's.
    sqs_sends: float = 2.0
    # The event source mappings' ReceiveMessage and DeleteMessageBatch, shared by a batch of
    # ten, for the lane and the webhooks queue.
    sqs_polls: float = 0.4
    api_requests: float = 1.0


@dataclass(frozen=True)
class Streaming:
    """`stream: true` jobs (docs/streaming.md): an output write per interval, plus the last."""

    interval_seconds: float = 1.0
    # The job item the output write rewrites (its input inline), and a chunk's size.
    job_item_kb: float = 2.0
    chunk_kb: float = 1.0
    # A client follows each job's events: about one response per output write, each holding
    # an api environment until that write (and reading the job's head every 250 ms).
    followed: bool = False
    api_memory_mb: int = 256
    poll_seconds: float = 0.25

    def writes_per_job(self, latency_seconds: float) -> int:
        return math.ceil(latency_seconds / self.interval_seconds) + 1

    def write_units_per_write(self) -> float:
        # A transaction's write costs two units per KB of each item it writes.
        return 2 * (math.ceil(self.job_item_kb) + math.ceil(self.chunk_kb))


@dataclass(frozen=True)
class Workload:
    jobs: int
    latency_seconds: float
    worker_memory_mb: int = 256
    batch_size: int = 10
    # Time a worker spends around each batch besides waiting on the provider.
    overhead_seconds: float = 0.15
    calls: CallsPerJob = CallsPerJob()
    stream: Streaming | None = None


@dataclass(frozen=True)
class CostLine:
    item: str
    per_million_jobs: float


def cost_per_million(workload: Workload, jobs_per_invocation: float) -> list[CostLine]:
    """The AWS bill for a million jobs, line by line.

    `jobs_per_invocation` is how many generations one worker invocation waits on at once:
    up to the batch size for llmq, 1 for a design that makes one invocation per job.
    """
    million = 1e6
    invocations = million / jobs_per_invocation
    gb = workload.worker_memory_mb / 1024
    seconds_per_invocation = workload.latency_seconds + workload.overhead_seconds
    calls = workload.calls
    return [
        CostLine("API Gateway requests", million * calls.api_requests * PRICES["api_gateway_rest_request"]),
        CostLine(
            "Lambda worker duration",
            invocations * gb * seconds_per_invocation * PRICES["lambda_gb_second_arm64"],
        ),
        CostLine("Lambda requests", (invocations + million * 2) * PRICES["lambda_request"]),
        CostLine(
            "DynamoDB",
            million
            * (
                calls.dynamodb_write_units * PRICES["dynamodb_write_request_unit"]
                + calls.dynamodb_read_units * PRICES["dynamodb_read_request_unit"]
            ),
        ),
        CostLine("SQS", million * (calls.sqs_sends + calls.sqs_polls) * PRICES["sqs_request"]),
        *_streaming_lines(workload, million),
    ]


def _streaming_lines(workload: Workload, jobs: float) -> list[CostLine]:
    stream = workload.stream
    if stream is None:
        return []
    writes = stream.writes_per_job(workload.latency_seconds)
    lines = [
        CostLine(
            "DynamoDB output writes",
            jobs * writes * stream.write_units_per_write() * PRICES["dynamodb_write_request_unit"],
        )
    ]
    if stream.followed:
        gb = stream.api_memory_mb / 1024
        polls = workload.latency_seconds / stream.poll_seconds
        lines.append(
            CostLine(
                "Following the events",
                jobs
                * (
                    writes * (PRICES["api_gateway_rest_request"] + PRICES["lambda_request"])
                    + gb * workload.latency_seconds * PRICES["lambda_gb_second_arm64"]
                    # A strongly consistent look at a small item per poll, one per delta read.
                    + (polls + writes) * PRICES["dynamodb_read_request_unit"]
                    # Each response takes one of the tenant's long-poll places and gives it back
                    # (llmq.long_polls): two writes of a small item.
                    + writes * 2 * PRICES["dynamodb_write_request_unit"]
                ),
            )
        )
    return lines


def total(lines: list[CostLine]) -> float:
    return sum(line.per_million_jobs for line in lines)


def render(workload: Workload) -> str:
    batched = cost_per_million(workload, jobs_per_invocation=workload.batch_size)
    single = cost_per_million(workload, jobs_per_invocation=1)
    rows = [
        f"{'item':<24} {'llmq (batch of ' + str(workload.batch_size) + ')':>20} {'one invocation/job':>20}"
    ]
    for ours, theirs in zip(batched, single, strict=True):
        rows.append(f"{ours.item:<24} {ours.per_million_jobs:>20,.2f} {theirs.per_million_jobs:>20,.2f}")
    rows.append(f"{'total (USD / 1M jobs)':<24} {total(batched):>20,.2f} {total(single):>20,.2f}")
    scaled = workload.jobs / 1e6
    rows.append(
        f"{'for ' + format(workload.jobs, ',') + ' jobs':<24} {total(batched) * scaled:>20,.2f} {total(single) * scaled:>20,.2f}"
    )
    header = (
        f"{workload.latency_seconds:g} s generations, {workload.worker_memory_mb} MB arm64 worker; "
        f"prices {PRICES_AS_OF}; provider tokens not included"
    )
    if workload.stream is not None:
        stream = workload.stream
        header += (
            f"\nstream: true: {stream.writes_per_job(workload.latency_seconds)} output writes per job "
            f"(one per {stream.interval_seconds:g} s, and the last) of "
            f"{stream.write_units_per_write():g} write units each"
            + ("; a client follows every job's events" if stream.followed else "")
        )
    return "\n".join([header, *rows])
