"""The cost model: batching generations into one invocation is where the money is."""

from __future__ import annotations

from llmq_cli.cost import Workload, cost_per_million, total
from llmq_cli.main import main


def test_one_invocation_per_job_pays_for_every_idle_second() -> None:
    workload = Workload(jobs=1_000_000, latency_seconds=60)
    batched = total(cost_per_million(workload, jobs_per_invocation=10))
    single = total(cost_per_million(workload, jobs_per_invocation=1))
    # Lambda duration dominates at 60 s: ten waits share one invocation, so the ratio nears 10
    assert 5 < single / batched < 10
    short = Workload(jobs=1_000_000, latency_seconds=1)
    assert total(cost_per_million(short, 1)) / total(cost_per_million(short, 10)) < single / batched


def test_llmq_cost_prints_both_designs(capsys) -> None:
    assert main(["cost", "--jobs", "2000000", "--latency", "10"]) == 0
    out = capsys.readouterr().out
    assert "one invocation/job" in out and "for 2,000,000 jobs" in out
