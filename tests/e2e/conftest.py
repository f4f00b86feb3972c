"""The sandbox driven from outside, as a tool would: `llmq sandbox up --detach`, HTTP, `down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmq.models import TERMINAL_STATUSES

ROOT = Path(__file__).resolve().parents[2]
STATE_KEYS = {"api_url", "aws_endpoint_url", "region", "provider_url", "receiver_url", "pid", "tenants"}
# Present when the sandbox enforces IAM, as it always does under these tests.
OPERATOR_KEYS = {"aws_access_key_id", "aws_secret_access_key"}
TENANT_KEYS = {"id", "name", "tier", "api_key", "webhook_secret", "limits"}


def llmq_command() -> list[str]:
    """The installed console script, as a user runs it (python -m llmq_cli where it is missing)."""
    script = Path(sys.executable).parent / "llmq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmq_cli"]


def run_llmq(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    # The suite runs the functions with their own roles, whatever the developer's shell says.
    if "LLMQ_SANDBOX_IAM" not in (env or {}):
        environment.pop("LLMQ_SANDBOX_IAM", None)
    # jsii needs node 22 from the venv, whatever the caller's PATH holds.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
    environment.setdefault("CDK_DISABLE_CLI_TELEMETRY", "true")
    return subprocess.run(
        [*llmq_command(), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def llmq_json(cwd: Path, *args: str) -> Any:
    """An `llmq` command that must succeed, its JSON output parsed."""
    done = run_llmq(cwd, *args, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(interval)


@dataclass
class SandboxUnderTest:
    directory: Path
    state: dict[str, Any]
    up: subprocess.CompletedProcess[str] | None = None  # None: started otherwise (test_wiring)

    @property
    def api_url(self) -> str:
        return str(self.state["api_url"])

    def tenant(self, tier: str) -> dict[str, Any]:
        return next(tenant for tenant in self.state["tenants"] if tenant["tier"] == tier)

    def api(self, tier: str = "enterprise") -> httpx.Client:
        key = self.tenant(tier)["api_key"]
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=40)

    def wait_terminal(self, job_id: str, tier: str = "enterprise", timeout: float = 90) -> dict[str, Any]:
        """Long-poll with ?wait= until the job is terminal."""
        deadline = time.monotonic() + timeout
        with self.api(tier) as client:
            while True:
                reply = client.get(f"/v1/jobs/{job_id}", params={"wait": 20})
                if reply.status_code == 429:
                    # The tenant's long-polls are all taken, or its rate (docs/limits.md)
                    time.sleep(float(reply.headers.get("retry-after", "1")))
                    continue
                job: dict[str, Any] = reply.json()
                if job["status"] in TERMINAL_STATUSES or time.monotonic() > deadline:
                    return job

    def invocations(self, **query: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(
            f"{self.api_url}/_sandbox/invocations", params=query
        ).json()["data"]
        return records

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.state['receiver_url']}/_deliveries", params={"job_id": job_id})
        deliveries: list[dict[str, Any]] = response.json()["data"]
        return deliveries

    def provider_calls(self, job_id: str) -> int:
        calls = httpx.get(f"{self.state['provider_url']}/_calls").json()["calls"]
        return int(calls.get(job_id, 0))

    def aws(self, service: str) -> Any:
        """A client of the sandbox's moto, as its operator: with IAM on, moto refuses other keys."""
        return aws_client(self.state, service)

    def stack_outputs(self) -> dict[str, str]:
        stack = self.aws("cloudformation").describe_stacks(StackName="Llmq")["Stacks"][0]
        return {output["OutputKey"]: output["OutputValue"] for output in stack["Outputs"]}


def aws_client(state: dict[str, Any], service: str) -> Any:
    import boto3

    credentials = state.get("aws_credentials") or {
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    session = boto3.session.Session(region_name=state["region"], **credentials)
    return session.client(service, endpoint_url=state["aws_endpoint_url"])  # type: ignore[call-overload]


def start_sandbox(directory: Path, config: dict[str, Any] | None = None) -> SandboxUnderTest:
    env = {"LLMQ_SANDBOX_CONFIG": json.dumps(config)} if config else {}
    up = run_llmq(directory, "sandbox", "up", "--detach", env=env)
    if up.returncode != 0:
        log = directory / ".llmq" / "sandbox.log"
        tail = log.read_text()[-4000:] if log.exists() else ""
        pytest.fail(f"llmq sandbox up --detach failed ({up.returncode}):\n{up.stdout}\n{up.stderr}\n{tail}")
    state = json.loads((directory / ".llmq" / "sandbox.json").read_text())
    return SandboxUnderTest(directory=directory, state=state, up=up)


def stop_sandbox(sandbox: SandboxUnderTest) -> subprocess.CompletedProcess[str]:
    return run_llmq(sandbox.directory, "sandbox", "down", timeout=60)


class DefaultSandbox:
    """The session's sandbox of the default config (one per xdist worker), shared by every
    module whose tests leave it as they found it (each works on its own jobs): a boot is a
    moto deploy and six cold starts. Started when first asked for, and again if a test
    stopped it (test_sandbox.py's last test proves `llmq sandbox down` on it)."""

    def __init__(self, directory: Callable[[], Path]) -> None:
        self._directory = directory
        self._current: SandboxUnderTest | None = None

    def running(self) -> SandboxUnderTest:
        if self._current is None or not _is_up(self._current):
            self._current = start_sandbox(self._directory())
        return self._current

    def stop(self) -> None:
        if self._current is not None and _is_up(self._current):
            stop_sandbox(self._current)


def _is_up(sandbox: SandboxUnderTest) -> bool:
    return (sandbox.directory / ".llmq" / "sandbox.json").exists()


@pytest.fixture(scope="session")
def default_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultSandbox]:
    shared = DefaultSandbox(lambda: tmp_path_factory.mktemp("shared-sandbox"))
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def shared_sandbox(default_sandbox: DefaultSandbox) -> SandboxUnderTest:
    return default_sandbox.running()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stops_the_sandbox: run after every other test of the session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that stops the shared sandbox goes last, so that nothing boots it again in a plain
    # run. Under `make test-e2e` (`-n 2 --dist loadfile`) xdist keeps each file's place in
    # the queue, so it is only last within its file: a later module on the same worker finds
    # the sandbox stopped and boots it again (`shared_sandbox` restarts it), one boot more.
    items.sort(key=lambda item: item.get_closest_marker("stops_the_sandbox") is not None)


@pytest.fixture(scope="module")
def sandbox_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SandboxUnderTest]]:
    """Start detached sandboxes in fresh directories; whatever is still up at the end is stopped."""
    started: list[SandboxUnderTest] = []

    def start(config: dict[str, Any] | None = None) -> SandboxUnderTest:
        sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox"), config)
        started.append(sandbox)
        return sandbox

    yield start
    for sandbox in started:
        if _is_up(sandbox):
            stop_sandbox(sandbox)


# `figures` and `config` follow whichever `sandbox` the requesting module defines.
@pytest.fixture(scope="module")
def figures(sandbox: SandboxUnderTest) -> Any:
    from tests.e2e.figures import Figures  # figures.py imports this module

    return Figures(sandbox)


@pytest.fixture(scope="module")
def config(sandbox: SandboxUnderTest) -> dict[str, Any]:
    """The sandbox's effective LlmqConfig, as it reports it."""
    found: dict[str, Any] = httpx.get(f"{sandbox.api_url}/_sandbox/config").json()
    return found
