"""Broken provider answers end to end: error events and cut streams inside a 200, finish
reasons the client must see, and a provider that never finishes.

One sandbox with its own numbers (streaming on, 2 attempts, worker timeout 10 s). The faults
are the fake provider's directives (llmq_sandbox/doubles/fake_provider.py): `[[stream_error…]]` and
`[[stream_cut…]]` break the answer after half its deltas, `:x1` only on the job's first call;
`[[finish:…]]` sets the final finish_reason; `[[hang]]` never answers.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SandboxUnderTest, wait_until
from tests.e2e.figures import Figures

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def provider_faults(sandbox: SandboxUnderTest, job_id: str) -> list[str | None]:
    """Per provider call for the job, in order: the fault that broke its 200 answer, or None."""
    log = httpx.get(f"{sandbox.state['provider_url']}/_calls").json()["log"]
    calls = sorted((entry for entry in log if entry["job_id"] == job_id), key=lambda e: e["started_at"])
    return [entry.get("fault") for entry in calls]


def submit(figures: Figures, prompt: str, hook: str | None = None) -> str:
    body: dict[str, Any] = {"prompt": prompt}
    if hook is not None:
        body["webhook"] = {"url": figures.sandbox.state["receiver_url"] + hook}
    reply = figures.submit("enterprise", body)
    assert reply.status_code == 202, reply.text
    job_id: str = reply.json()["id"]
    return job_id


def test_the_sandbox_streams_so_the_directives_break_streams(config: dict[str, Any]) -> None:
    # The faults below are meant for the streaming path; the non-streaming one has its own
    # equivalents (tests/integration/test_provider_faults.py).
    assert config["provider"]["stream"] is True


def test_an_error_event_mid_stream_is_retried_and_the_retry_succeeds(
    figures: Figures, sandbox: SandboxUnderTest
) -> None:
    # Given a job whose first answer breaks with a 503 error event after some text
    job_id = submit(figures, "Flaky engine [[tokens:6]] [[stream_error:503x1]]")
    # When it runs
    job = sandbox.wait_terminal(job_id)
    # Then the broken answer was not its result: it was retried and succeeded on attempt 2
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    assert len(job["result"]["output"].split()) == 6
    assert job["result"]["finish_reason"] == "stop"
    assert job["error"] is None
    # And the provider was called twice, the first answer broken
    assert provider_faults(sandbox, job_id) == ["stream_error", None]


def test_a_permanent_error_event_fails_the_job_with_its_code_after_one_call(
    figures: Figures, sandbox: SandboxUnderTest
) -> None:
    # Given a job whose answer breaks with context_length_exceeded inside a 200 stream
    job_id = submit(
        figures, "Too long [[stream_error:400:context_length_exceeded]]", hook="/hooks/stream-too-long"
    )
    # When it runs
    job = sandbox.wait_terminal(job_id)
    # Then it failed at once with that code, not retryable, after one call
    assert (job["status"], job["attempts"]) == ("failed", 1)
    assert job["error"]["code"] == "context_length_exceeded"
    assert job["error"]["retryable"] is False
    assert job["result"] is None
    assert provider_faults(sandbox, job_id) == ["stream_error"]
    # And the client heard of the failure
    assert wait_until(lambda: figures.successes(job_id).get("job.failed"), timeout=30)


def test_a_stream_cut_mid_answer_is_retried_and_the_retry_succeeds(
    figures: Figures, sandbox: SandboxUnderTest
) -> None:
    # Given a job whose first answer's connection is closed after half the text, with
    # neither a finish_reason nor [DONE]
    job_id = submit(figures, "Dropped line [[tokens:6]] [[stream_cut:x1]]")
    # When it runs
    job = sandbox.wait_terminal(job_id)
    # Then half an answer was never its result: it succeeded with the whole one on attempt 2
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    assert len(job["result"]["output"].split()) == 6
    assert provider_faults(sandbox, job_id) == ["stream_cut", None]


def test_a_generation_cut_at_max_tokens_succeeds_and_says_length_in_the_webhook(
    figures: Figures, sandbox: SandboxUnderTest
) -> None:
    # Given a job the provider stops for running out of tokens
    job_id = submit(figures, "Long story [[tokens:5]] [[finish:length]]", hook="/hooks/finish-length")
    # When it runs
    job = sandbox.wait_terminal(job_id)
    # Then it succeeded after one call, and the client can see the output was cut
    assert (job["status"], job["attempts"]) == ("succeeded", 1)
    assert job["result"]["finish_reason"] == "length"
    assert len(job["result"]["output"].split()) == 5
    assert provider_faults(sandbox, job_id) == [None]
    # And the webhook says so too
    assert wait_until(lambda: figures.successes(job_id).get("job.succeeded"), timeout=30)
    (delivery,) = figures.deliveries(job_id, "job.succeeded")
    assert delivery["verified"] is True
    assert delivery["data"]["result"]["finish_reason"] == "length"


def test_a_filtered_generation_succeeds_with_content_filter_visible(
    figures: Figures, sandbox: SandboxUnderTest
) -> None:
    # Given a job whose answer the provider's filter stopped
    job_id = submit(figures, "Edgy [[tokens:3]] [[finish:content_filter]]")
    # When it runs
    job = sandbox.wait_terminal(job_id)
    # Then it is a result, not an error, and says why it ended
    assert (job["status"], job["attempts"]) == ("succeeded", 1)
    assert job["result"]["finish_reason"] == "content_filter"
    assert job["error"] is None
    assert provider_faults(sandbox, job_id) == [None]


def test_a_provider_that_never_finishes_fails_as_a_retryable_provider_timeout_without_a_retry(
    figures: Figures, sandbox: SandboxUnderTest
) -> None:
    # Given a job the provider accepts and never answers (it may be generating, and billing)
    job_id = submit(figures, "Think forever [[hang]]", hook="/hooks/provider-timeout")
    # When the worker's time for the call runs out
    job = sandbox.wait_terminal(job_id, timeout=60)
    # Then the job failed as provider_timeout, which the client may retry, after one call only
    assert (job["status"], job["attempts"]) == ("failed", 1)
    assert job["error"]["code"] == "provider_timeout"
    assert job["error"]["retryable"] is True
    assert sandbox.provider_calls(job_id) == 1
    # And the client heard of it
    assert wait_until(lambda: figures.successes(job_id).get("job.failed"), timeout=30)


def test_60k_cjk_characters_in_and_out_succeed_with_the_whole_result_after_one_call(
    figures: Figures, sandbox: SandboxUnderTest
) -> None:
    # Given what a new user tries first: 60k CJK characters in, the same 60k out
    # (as \u escapes the input alone would pass DynamoDB's 400 KB; as UTF-8 it is 180 KB)
    text = "漢字かな" * 15_000
    job_id = submit(figures, f"{text}[[echo]]")
    # When it runs
    job = sandbox.wait_terminal(job_id, timeout=60)
    # Then it succeeded once, with the whole result: never `result: {}`, never a re-run
    assert (job["status"], job["attempts"], job["error"]) == ("succeeded", 1, None)
    assert job["result"]["output"] == text
    assert len(provider_faults(sandbox, job_id)) == 1
