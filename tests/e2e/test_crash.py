"""Worker crashes, injected by the runner, with the worker's timeout cut to 5 s (its lanes'
visibility timeout is then 30 s).

The crash directives of llmq_sandbox/doubles/faults.py act in the worker environment that claimed the job:
- `[[crash:1]]`: the environment is killed right after its first claim. The lease expires,
  SQS brings the message back after the visibility timeout, and the job is claimed again and
  completes: the provider was called once.
- `[[crash_before_complete:1]]`: killed after the provider answered, before the result was
  written. The second attempt calls the provider again: twice in all, never at the same time.
- `[[crash]]`: killed after every claim. Once the claims are used up, the next receive fails
  the job as `worker_crashed`, and the client hears of it.
- `[[overrun]]`: frozen after every claim, so each invocation overruns its 5 s and the runner
  kills it as Lambda does; the same end.

A provider that never finishes (`[[hang]]`, `[[stall]]`) no longer overruns anything: the
provider call has a total deadline inside the invocation (tests/e2e/test_faults.py).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmq_cli.client import LlmqClient
from llmq_cli.sandbox_state import pid_alive
from tests.e2e.conftest import SandboxUnderTest, wait_until
from tests.e2e.figures import Figures, invocations_once_logged, overlapping, settle

pytestmark = pytest.mark.e2e
# Five seconds: short enough that each crash plays out in under a minute, long enough that a
# busy two-core machine does not time out an attempt that should have finished (with tracing
# active as deployed, a second attempt in a fresh environment took more than 4 s under load).
WORKER_TIMEOUT_SECONDS = 5
# A crash takes its whole batch down, as it would on Lambda, so no two of these may share one:
# they come in pairs, one per lane (each lane has its own poller), and a pair's messages come
# back from their visibility timeout well after the previous pair's.
PAIRS = [
    {
        "crash_once": "Crash once [[crash:1]]",
        "crash_before_complete": "Paid and lost [[crash_before_complete:1]]",
    },
    {"crash_always": "Crash always [[crash]]", "overrun_always": "Overrun always [[overrun]]"},
]
PAIR_SPACING_SECONDS = 3.0
TIERS = ("enterprise", "free")


# The reconciler would also rescue a crashed job (a new message once its lease lapsed long
# ago); kept out of the way here so that the redelivery shown is SQS's own.
SANDBOX_CONFIG: dict[str, Any] = {
    "worker": {"timeout_seconds": WORKER_TIMEOUT_SECONDS},
    "reconciler": {"expired_lease_grace_seconds": 600},
}


@pytest.fixture(scope="module")
def sandbox(sandbox_factory: Any) -> SandboxUnderTest:
    started: SandboxUnderTest = sandbox_factory(SANDBOX_CONFIG)
    return started


@dataclass(frozen=True)
class Submitted:
    id: str
    tier: str


@pytest.fixture(scope="module")
def jobs(figures: Figures) -> dict[str, Submitted]:
    hook = {"url": figures.sandbox.state["receiver_url"] + "/hooks/crashes"}
    submitted = {}
    for pair in PAIRS:
        began = time.monotonic()
        for tier, (name, prompt) in zip(TIERS, pair.items(), strict=True):
            job_id = figures.submit(tier, {"prompt": prompt, "webhook": hook}).json()["id"]
            submitted[name] = Submitted(job_id, tier)
        for name in pair:
            assert figures.wait_status(submitted[name].id, {"running"}, submitted[name].tier) == "running"
        time.sleep(max(0.0, began + PAIR_SPACING_SECONDS - time.monotonic()))
    return submitted


def test_a_worker_killed_after_its_claim_is_reclaimed_after_the_visibility_timeout_and_completes(
    figures: Figures, jobs: dict[str, Submitted], config: dict[str, Any]
) -> None:
    job_id, tier = jobs["crash_once"].id, jobs["crash_once"].tier
    # When the worker dies right after its first claim
    job = figures.sandbox.wait_terminal(job_id, tier, timeout=90)
    # Then the second claim completed it, and the provider was called once
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    assert [call.status for call in figures.provider_calls(job_id)] == [200]
    # And the first invocation died without deleting its message, which came back after the
    # visibility timeout, once the lease had lapsed
    records = invocations_once_logged(figures.sandbox, 2, function="worker", job_id=job_id)
    assert [record["outcome"] for record in records] == ["error", "ok"]
    assert "exited" in records[0]["error"]
    assert not records[0]["deleted_message_ids"] and records[1]["deleted_message_ids"]
    assert [record["receive_counts"] for record in records] == [[1], [2]]
    assert records[1]["started_at"] - records[0]["started_at"] >= lane_visibility(config) - 1
    # And the client heard of the success once
    assert wait_succeeded_once(figures, job_id, "job.succeeded")


def test_a_worker_killed_before_writing_its_result_costs_one_more_call_never_two_at_once(
    figures: Figures, jobs: dict[str, Submitted]
) -> None:
    job_id, tier = jobs["crash_before_complete"].id, jobs["crash_before_complete"].tier
    # When the worker dies after the provider answered, before the result was written
    job = figures.sandbox.wait_terminal(job_id, tier, timeout=90)
    # Then the job succeeded on its second attempt, with a result
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    assert job["result"]["output"]
    # And the provider was called twice, one call after the other
    calls = figures.provider_calls(job_id)
    assert [call.status for call in calls] == [200, 200]
    assert overlapping(calls) == []
    # And only the completed attempt announced it
    assert wait_succeeded_once(figures, job_id, "job.succeeded")


@pytest.mark.parametrize(("name", "outcome"), [("crash_always", "error"), ("overrun_always", "timeout")])
def test_a_job_crashed_on_every_attempt_fails_as_worker_crashed(
    figures: Figures, jobs: dict[str, Submitted], config: dict[str, Any], name: str, outcome: str
) -> None:
    job_id, tier = jobs[name].id, jobs[name].tier
    visibility = lane_visibility(config)
    # When every invocation that claims the job dies (killed, or overrunning its timeout)
    job = figures.sandbox.wait_terminal(job_id, tier, timeout=120)
    # Then the job ends failed as worker_crashed, after one claim per allowed attempt
    assert (job["status"], job["error"]["code"]) == ("failed", "worker_crashed")
    assert job["attempts"] == config["max_attempts"] == 2
    # And the provider was never called: every crash came right after the claim
    assert figures.sandbox.provider_calls(job_id) == 0
    # And each attempt was an invocation that died with its message kept; the third receive
    # found the claims used up, failed the job and deleted the message
    records = invocations_once_logged(figures.sandbox, 3, function="worker", job_id=job_id)
    assert [record["outcome"] for record in records] == [outcome, outcome, "ok"]
    assert [record["receive_counts"] for record in records] == [[1], [2], [3]]
    assert all(not record["deleted_message_ids"] for record in records[:2])
    assert records[2]["deleted_message_ids"]
    if outcome == "timeout":
        # (killed at its timeout: not before it, and long before its message came back)
        for overran in records[:2]:
            assert WORKER_TIMEOUT_SECONDS - 0.5 <= overran["duration_seconds"] < visibility
    # And the message came back only after its visibility timeout each time, not at once.
    # An invocation starts after its receive by the environment's start-up, which on a loaded
    # 2-core machine takes seconds, so the gap between starts may fall short of the full
    # timeout; a message released early would be back within a second of the kill.
    starts = [record["started_at"] for record in records]
    assert all(later - earlier >= visibility / 2 for earlier, later in itertools.pairwise(starts))
    # And the client heard of the failure once
    assert wait_succeeded_once(figures, job_id, "job.failed")


# After the pairs (on its own, so its crash takes no other job down): two output writes in,
# the worker dies; the retry streams the output again from the start.
MID_STREAM_PROMPT = "Stream, then crash [[crash_mid_stream:1]] [[latency:2]] [[tokens:40]]"


@pytest.fixture(scope="module")
def mid_stream(figures: Figures, jobs: dict[str, Submitted]) -> Submitted:
    job_id = figures.submit("enterprise", {"prompt": MID_STREAM_PROMPT, "stream": True}).json()["id"]
    return Submitted(job_id, "enterprise")


def test_a_worker_killed_mid_stream_is_retried_and_its_reader_sees_the_new_attempt_start_over(
    figures: Figures, mid_stream: Submitted
) -> None:
    # When the worker dies after two output writes of a stream: true job
    job = figures.sandbox.wait_terminal(mid_stream.id, mid_stream.tier, timeout=120)
    # Then the job succeeded on its second attempt, which called the provider again
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    assert figures.sandbox.provider_calls(mid_stream.id) == 2
    # And a reader of its events sees the first attempt's deltas, then the second attempt's,
    # the first of which says to drop what came before
    key = figures.sandbox.tenant(mid_stream.tier)["api_key"]
    events = list(LlmqClient(figures.sandbox.api_url, key).follow(mid_stream.id, timeout=60))
    deltas = [json.loads(event.data) for event in events if event.event == "output.delta"]
    assert [delta["seq"] for delta in deltas] == list(range(1, len(deltas) + 1))
    first = [delta for delta in deltas if delta["attempt"] == 1]
    second = [delta for delta in deltas if delta["attempt"] == 2]
    assert len(first) == 2 and not any(delta["reset"] for delta in first)
    assert second and second[0]["reset"] and not any(delta["reset"] for delta in second[1:])
    assert deltas == first + second
    # And the second attempt's deltas alone are the result; the done event says so too
    assert "".join(delta["delta"] for delta in second) == job["result"]["output"]
    assert events[-1].event == "done" and json.loads(events[-1].data)["status"] == "succeeded"


def test_nothing_stays_running_and_no_message_is_left(figures: Figures, jobs: dict[str, Submitted]) -> None:
    for job in jobs.values():
        assert figures.sandbox.wait_terminal(job.id, job.tier, timeout=120)["status"] in {
            "succeeded",
            "failed",
        }
    # The list reads an index that may lag the last completions by a moment (DynamoDB GSI)
    for tier in TIERS:
        assert wait_until(lambda: figures.running(tier) == [], timeout=10), figures.running(tier)  # noqa: B023
    # Crashes never reach a DLQ: max_receive_count is above the receives a crashing job needs
    queues = [*figures.working_queues(), figures.webhook_dlq, *figures.lane_dlqs.values()]
    depths = figures.wait_drained(queues)
    assert set(depths.values()) == {0}, depths


def lane_visibility(config: dict[str, Any]) -> int:
    """The lanes' visibility timeout: six times the worker's timeout (DESIGN §5)."""
    return 6 * int(config["worker"]["timeout_seconds"])


def wait_succeeded_once(figures: Figures, job_id: str, event_type: str) -> bool:
    """The receiver got `event_type` for the job once as a success, and nothing else."""
    if not wait_until(lambda: figures.successes(job_id).get(event_type), timeout=20):
        return False
    settle(1)
    return figures.successes(job_id) == {event_type: 1}


def test_a_sandbox_whose_moto_dies_stops_instead_of_failing_every_call(sandbox: SandboxUnderTest) -> None:
    """Last in this module: it ends the module's sandbox. moto holds every table and queue, in a
    process of its own (llmq_sandbox/moto_process.py), which the OOM killer could take alone."""
    leader = int(sandbox.state["pid"])
    [moto] = [pid for pid in _children(leader) if b"llmq_sandbox.moto_process" in _cmdline(pid)]
    # When moto's process is killed
    os.kill(moto, signal.SIGKILL)
    try:
        # Then the sandbox stops and removes its state, instead of answering on with a gateway
        # whose every call fails
        assert wait_until(lambda: not (sandbox.directory / ".llmq" / "sandbox.json").exists(), timeout=30)
        assert wait_until(lambda: not pid_alive(leader), timeout=30)
        log = (sandbox.directory / ".llmq" / "sandbox.log").read_text()
        assert "moto process exited; stopping the sandbox" in log
    finally:
        if pid_alive(leader, or_group=True):  # failed: leave nothing behind
            os.killpg(leader, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()
