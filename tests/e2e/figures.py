"""End-state figures of a running sandbox, read from outside as an operator would.

- the queues, through boto3 against the sandbox's moto endpoint (lane DLQs are found through
  each lane queue's redrive policy, so a wiring mistake there shows up here);
- the fake provider's call log (`GET /_calls`): per call, the job, when it arrived, when it was
  answered and with which status;
- the webhook receiver's log (`GET /_deliveries`);
- the sandbox's switches: call faults (`/_sandbox/faults`) and event source mappings
  (`/_sandbox/mappings`), and the receiver's `/_heal`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmq_cli.dead_letters import depth as queue_depth
from tests.e2e.conftest import SandboxUnderTest, start_sandbox, stop_sandbox, wait_until

# Seconds of clock skew tolerated between the provider's and the SQS server's view of time
# (both are in the sandbox process, so this only covers the resolution of the log).
CLOCK_SLACK = 0.05


@dataclass(frozen=True)
class ProviderCall:
    job_id: str
    started_at: float
    ended_at: float
    status: int
    # Streamed: the content deltas the provider wrote before the answer ended or was hung up on.
    deltas_sent: int = 0


class Figures:
    """What a sandbox holds now: queue depths, provider calls, webhook deliveries."""

    def __init__(self, sandbox: SandboxUnderTest) -> None:
        self.sandbox = sandbox
        self.sqs = sandbox.aws("sqs")
        outputs = sandbox.stack_outputs()
        self.lane_queues: dict[str, str] = json.loads(outputs["LaneQueueUrls"])
        self.webhook_queue = outputs["WebhookQueueUrl"]
        self.webhook_dlq = outputs["WebhookDlqUrl"]
        self.lane_dlqs = {lane: self._dead_letter_queue(url) for lane, url in self.lane_queues.items()}

    def _dead_letter_queue(self, url: str) -> str:
        attributes = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
        target = json.loads(attributes["Attributes"]["RedrivePolicy"])["deadLetterTargetArn"]
        return str(self.sqs.get_queue_url(QueueName=target.rsplit(":", 1)[-1])["QueueUrl"])

    # ---- queues ----

    def depth(self, url: str) -> int:
        """Messages in the queue: visible, in flight and delayed (as `llmq dlq list` counts them)."""
        found = queue_depth(self.sqs, url)
        return found.visible + found.in_flight + found.delayed

    def working_queues(self) -> list[str]:
        return [*self.lane_queues.values(), self.webhook_queue]

    def wait_drained(self, urls: Iterable[str], timeout: float = 30) -> dict[str, int]:
        """Wait until every queue of `urls` is empty; the depths last seen."""
        urls = list(urls)
        wait_until(lambda: all(self.depth(url) == 0 for url in urls), timeout=timeout, interval=0.5)
        return {url: self.depth(url) for url in urls}

    def send_lane_messages(self, lane: str, bodies: list[str]) -> list[str]:
        """Bodies sent straight into a lane queue, in one SendMessageBatch; their message ids."""
        sent: list[str] = []
        for start in range(0, len(bodies), 10):
            response = self.sqs.send_message_batch(
                QueueUrl=self.lane_queues[lane],
                Entries=[
                    {"Id": str(index), "MessageBody": body}
                    for index, body in enumerate(bodies[start : start + 10])
                ],
            )
            assert not response.get("Failed"), response
            by_index = {int(entry["Id"]): entry["MessageId"] for entry in response["Successful"]}
            sent += [by_index[index] for index in sorted(by_index)]
        return sent

    # ---- the provider ----

    def provider_calls(self, job_id: str) -> list[ProviderCall]:
        """Every call for the job, in the order they arrived."""
        log = httpx.get(f"{self.sandbox.state['provider_url']}/_calls").json()["log"]
        calls = [
            ProviderCall(
                entry["job_id"],
                entry["started_at"],
                entry["at"],
                entry["status"],
                entry.get("deltas_sent", 0),
            )
            for entry in log
            if entry["job_id"] == job_id
        ]
        return sorted(calls, key=lambda call: call.started_at)

    def storm(self, rate: float, seconds: float, statuses: list[int], retry_after: float) -> None:
        body = {"rate": rate, "seconds": seconds, "statuses": statuses, "retry_after": retry_after}
        httpx.post(f"{self.sandbox.state['provider_url']}/_storm", json=body).raise_for_status()

    # ---- the receiver ----

    def deliveries(self, job_id: str, event_type: str | None = None) -> list[dict[str, Any]]:
        return [
            delivery
            for delivery in self.sandbox.deliveries(job_id)
            if event_type is None or delivery["type"] == event_type
        ]

    def successes(self, job_id: str) -> dict[str, int]:
        """Deliveries answered 2xx, per event type."""
        counts: dict[str, int] = {}
        for delivery in self.deliveries(job_id):
            if 200 <= delivery["status"] < 300:
                counts[delivery["type"]] = counts.get(delivery["type"], 0) + 1
        return counts

    def heal(self, path: str) -> None:
        httpx.post(f"{self.sandbox.state['receiver_url']}/_heal", json={"path": path}).raise_for_status()

    def set_mapping(self, function: str, lane: str, enabled: bool) -> None:
        """Pause or resume one event source mapping's poller (UpdateEventSourceMapping)."""
        body = {"function": function, "lane": lane, "enabled": enabled}
        httpx.post(f"{self.sandbox.api_url}/_sandbox/mappings", json=body).raise_for_status()

    # ---- faults ----

    def arm_call_fault(self, function: str, operation: str, times: int) -> str:
        body = {"function": function, "operation": operation, "times": times}
        response = httpx.post(f"{self.sandbox.api_url}/_sandbox/faults", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def call_fault(self, fault_id: str) -> dict[str, Any]:
        faults = httpx.get(f"{self.sandbox.api_url}/_sandbox/faults").json()["data"]
        found: dict[str, Any] = next(fault for fault in faults if fault["id"] == fault_id)
        return found

    # ---- jobs ----

    def submit(self, tier: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        with self.sandbox.api(tier) as client:
            return client.post("/v1/jobs", json=body, headers=headers)

    def job(self, job_id: str, tier: str = "enterprise") -> dict[str, Any]:
        with self.sandbox.api(tier) as client:
            found: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return found

    def wait_status(
        self, job_id: str, statuses: set[str], tier: str = "enterprise", timeout: float = 20
    ) -> str:
        found: str = wait_until(
            lambda: (status := self.job(job_id, tier)["status"]) in statuses and status,
            timeout=timeout,
            interval=0.05,
        )
        return found

    def wait_all_terminal(
        self, job_ids: Iterable[str], tier: str = "enterprise"
    ) -> dict[str, dict[str, Any]]:
        return {job_id: self.sandbox.wait_terminal(job_id, tier) for job_id in job_ids}

    def running(self, tier: str) -> list[dict[str, Any]]:
        with self.sandbox.api(tier) as client:
            jobs: list[dict[str, Any]] = client.get("/v1/jobs", params={"status": "running"}).json()["data"]
        return jobs


def invocations_once_logged(
    sandbox: SandboxUnderTest, count: int, timeout: float = 15, **query: str
) -> list[dict[str, Any]]:
    """The invocations matching `query`, once at least `count` are in the log.

    A record is added after its batch is settled, a moment after the job's state changed.
    """
    wait_until(lambda: len(sandbox.invocations(**query)) >= count, timeout=timeout)
    return sandbox.invocations(**query)


def overlapping(calls: list[ProviderCall]) -> list[tuple[ProviderCall, ProviderCall]]:
    """Pairs of calls that were in flight at the same time."""
    return [
        (earlier, later)
        for index, earlier in enumerate(calls)
        for later in calls[index + 1 :]
        if later.started_at < earlier.ended_at
    ]


def lane_message(job_id: str, lane: str) -> str:
    return json.dumps({"job_id": job_id, "lane": lane})


def start_sandboxes(
    directory: Callable[[], Path], configs: list[dict[str, Any] | None]
) -> list[SandboxUnderTest]:
    """Start several sandboxes at once: a start is mostly waiting, so two cost about one."""
    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        futures = [pool.submit(start_sandbox, directory(), config) for config in configs]
    started, failures = [], []
    for future in futures:
        try:
            started.append(future.result())
        except BaseException as exc:  # pytest.fail raises an Exception subclass of BaseException
            failures.append(exc)
    if failures:
        for sandbox in started:
            stop_sandbox(sandbox)
        pytest.fail(f"a sandbox did not start: {failures[0]}")
    return started


def settle(seconds: float) -> None:
    """Room for a late duplicate to show up, if there were one."""
    time.sleep(seconds)
