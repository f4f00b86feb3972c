"""The cost model: batching generations into one invocation is where the money is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.run import measured_per_job
from llmq_cli.cost import PRICES, CallsPerJob, Streaming, Workload, cost_per_million, total
from llmq_cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_clis_figures_are_what_the_benchmark_measured() -> None:
    # `llmq cost` prices what `make bench` last measured (hunt 302: the CLI priced three
    # writes of one unit each, BENCHMARKS §6 the calls it counted, and neither the units)
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    assert CallsPerJob() == measured_per_job(results["calls"], results["write_units"])


def test_dynamodb_is_priced_by_the_units_its_transactions_take_not_by_calls() -> None:
    # Given a small job's measured transactions: 14 write units for 3 calls (BENCHMARKS §2)
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    small = next(row for row in results["write_units"]["rows"] if row["job"] == "small")
    lines = {line.item: line.per_million_jobs for line in cost_per_million(Workload(1_000_000, 10.0), 10)}
    # Then a million of them cost at least those units
    assert (
        lines["DynamoDB"] >= small["transactional_write_units"] * PRICES["dynamodb_write_request_unit"] * 1e6
    )


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


def test_streaming_adds_one_output_write_per_interval_and_following_costs_more() -> None:
    plain = Workload(jobs=1_000_000, latency_seconds=60)
    streamed = Workload(jobs=1_000_000, latency_seconds=60, stream=Streaming(interval_seconds=1.0))
    followed = Workload(
        jobs=1_000_000, latency_seconds=60, stream=Streaming(interval_seconds=1.0, followed=True)
    )
    slower = Workload(jobs=1_000_000, latency_seconds=60, stream=Streaming(interval_seconds=5.0))
    lines = {line.item: line.per_million_jobs for line in cost_per_million(streamed, 10)}
    # 61 writes (one a second, and the last) of 2 x (2 KB job + 1 KB chunk) = 6 units each
    assert lines["DynamoDB output writes"] == pytest.approx(61 * 6 * 0.625)
    assert "DynamoDB output writes" not in {line.item for line in cost_per_million(plain, 10)}
    costs = [total(cost_per_million(workload, 10)) for workload in (plain, slower, streamed, followed)]
    assert costs == sorted(costs) and len(set(costs)) == 4


def test_following_a_job_pays_for_each_responses_long_poll_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a 60 s job followed as events: 61 responses (one per output write)
    from llmq_cli import cost

    followed = Workload(
        jobs=1_000_000, latency_seconds=60, stream=Streaming(interval_seconds=1.0, followed=True)
    )

    def following() -> float:
        lines = {line.item: line.per_million_jobs for line in cost_per_million(followed, 10)}
        return lines["Following the events"]

    priced = following()
    monkeypatch.setitem(cost.PRICES, "dynamodb_write_request_unit", 0.0)
    # Then each response's place, taken and given back (two small writes), is in the price
    assert priced - following() == pytest.approx(61 * 2 * 0.625)


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch", "0"],
        ["--latency", "-5"],
        ["--latency", "nan"],
        ["--latency", "inf"],
        ["--jobs", "-1"],
        ["--stream", "--interval", "0"],
        ["--stream", "--interval", "-1"],
        # (hunt 314: the writes of a job went to infinity, and a traceback)
        ["--stream", "--interval", "1e-320"],
        ["--stream", "--interval", "61"],
        ["--latency", "1e308"],
        ["--memory", "1000000"],
        ["--jobs", "1" + "0" * 400],
        ["--batch", "1" + "0" * 400],
    ],
)
def test_llmq_cost_refuses_a_workload_that_cannot_be(argv: list[str], capsys) -> None:
    # (a batch of 0 divided by zero; a negative latency printed a negative cost)
    with pytest.raises(SystemExit) as refused:
        main(["cost", *argv])
    assert refused.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_the_streaming_docs_price_what_llmq_cost_prices() -> None:
    # docs/streaming.md's table is `llmq cost --latency 60 --follow`, line by line (review 268:
    # its base figure was two cost models old)
    docs = (ROOT / "docs" / "streaming.md").read_text(encoding="utf-8")
    stated = [float(figure) for figure in re.findall(r"^\| [^|]+ \| \+?([0-9.]+) \|$", docs, re.M)]
    followed = Workload(
        jobs=1_000_000, latency_seconds=60, stream=Streaming(interval_seconds=1.0, followed=True)
    )
    lines = {line.item: line.per_million_jobs for line in cost_per_million(followed, 10)}
    base = sum(
        value
        for item, value in lines.items()
        if item not in ("DynamoDB output writes", "Following the events")
    )
    assert stated == [
        round(base, 2),
        round(lines["DynamoDB output writes"], 2),
        round(lines["Following the events"], 2),
    ]
