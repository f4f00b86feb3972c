"""A wiring or grant mistake in the CDK app breaks the sandbox as it would break AWS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ROOT, SandboxUnderTest, wait_until

pytestmark = pytest.mark.e2e
WIRING_FAULT = ROOT / "tests" / "e2e" / "wiring_fault.py"


def _environment() -> dict[str, str]:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    environment.pop("LLMQ_SANDBOX_IAM", None)  # IAM on, whatever the shell says
    return environment


def test_a_variable_missing_from_the_template_fails_the_sandbox_at_start_naming_the_function(
    tmp_path: Path,
) -> None:
    # Given a CDK app whose worker function lost LLMQ_JOBS_TABLE from its environment
    state = tmp_path / ".llmq" / "sandbox.json"
    # When the sandbox starts (in the foreground, as `make dev` runs it)
    started = subprocess.run(
        [sys.executable, str(WIRING_FAULT), "missing-variable", str(state)],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    # Then it fails loudly, saying which function and which variable
    assert started.returncode == 1, started.stdout + started.stderr
    message = next(line for line in started.stderr.splitlines() if line.startswith("llmq:"))
    assert "function worker (" in message
    assert "failed its cold start" in message
    assert "LLMQ_JOBS_TABLE" in message
    # And the other functions are not blamed, and no state file claims a running sandbox
    assert "function api (" not in message
    assert not state.exists()


@contextmanager
def sandbox_with_fault(fault: str, directory: Path) -> Iterator[SandboxUnderTest]:
    """A foreground sandbox of a faulty CDK app, in its own process group, stopped at the end."""
    state = directory / ".llmq" / "sandbox.json"
    output = (directory / "sandbox.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(WIRING_FAULT), fault, str(state)],
        cwd=directory,
        env=_environment(),
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield wait_until(lambda: _answering(process, state), timeout=180) or pytest.fail(
            f"the sandbox did not answer within 180 s:\n{(directory / 'sandbox.out').read_text()}"
        )
    finally:
        # What `llmq sandbox down` does, without starting the command line for it.
        process.terminate()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever it left in its group
        process.wait(timeout=30)
        output.close()


def _answering(process: subprocess.Popen[bytes], state: Path) -> SandboxUnderTest | None:
    if process.poll() is not None:
        output = (state.parent.parent / "sandbox.out").read_text()
        pytest.fail(f"the sandbox exited ({process.returncode}) before it answered:\n{output}")
    if not state.exists():
        return None
    sandbox = SandboxUnderTest(directory=state.parent.parent, state=json.loads(state.read_text()))
    with suppress(httpx.HTTPError):
        if httpx.get(f"{sandbox.api_url}/_sandbox/health", timeout=5).status_code == 200:
            return sandbox
    return None


def test_a_grant_missing_from_the_template_fails_the_calls_that_need_it_as_on_aws(tmp_path: Path) -> None:
    # Given a CDK app whose worker role lost dynamodb:UpdateItem on the jobs table (the claim),
    # running in a sandbox where every function acts with its own role
    with sandbox_with_fault("missing-grant", tmp_path) as sandbox:
        # When a tenant submits a job
        with sandbox.api() as client:
            accepted = client.post("/v1/jobs", json={"prompt": "Hello"})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        # Then the worker receives it and fails it back to its queue
        failed = wait_until(
            lambda: [
                record
                for record in sandbox.invocations(function="worker", job_id=job_id)
                if record["outcome"] != "ok" or record["failed_message_ids"]
            ],
            timeout=60,
        )
        assert failed, sandbox.invocations(function="worker")
        # And the job is still queued, unclaimed, and the provider never called
        with sandbox.api() as client:
            job = client.get(f"/v1/jobs/{job_id}").json()
        assert (job["status"], job["attempts"]) == ("queued", 0)
        assert sandbox.provider_calls(job_id) == 0
        # And the worker's log says that AWS refused the call, for that job, as CloudWatch would
        assert wait_until(
            lambda: job_id in refused_jobs(tmp_path / ".llmq" / "logs" / "worker.log"), timeout=10
        )


def refused_jobs(log: Path) -> set[str]:
    """The job ids of the worker's log records whose AWS call was denied."""
    refused = set()
    for line in log.read_text().splitlines():
        with suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("error_code") == "AccessDeniedException":
                refused.add(str(record.get("job_id")))
    return refused
