"""`make demo`: a scripted tour of llmq on one laptop, in about a minute, no AWS account.

It starts the sandbox (the real CDK app in moto, the handlers run by the local Lambda
service), submits a mixed load as two tenants over HTTP, shows it drain lane by lane,
replays a submission, cancels one, watches the signed webhooks arrive, prints a summary
per lane, prints one `stream: true` job's output as it is generated, runs a batch of 200 with
its progress and its one webhook, and stops everything. It exits 1 if anything is not as it
should be.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmq.models import TERMINAL_STATUSES, ErrorCode, JobStatus
from llmq_cli.client import LlmqClient
from llmq_cli.sandbox_state import SandboxState

DRAIN_TIMEOUT_SECONDS = 90.0
LOG_DIR = Path(".llmq") / "demo" / "logs"


@dataclass
class Planned:
    """A job the tour submits, and what must become of it."""

    label: str
    tenant: str  # tier of the submitting tenant
    prompt: str
    expect_status: JobStatus = JobStatus.SUCCEEDED
    expect_code: ErrorCode | None = None
    expect_attempts: int | None = None
    hook: str = "/hooks/demo"
    cancel: bool = False
    job_id: str = ""


@dataclass
class Tour:
    state: SandboxState
    console: Console
    planned: list[Planned] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    def client(self, tier: str) -> LlmqClient:
        return LlmqClient(self.state.api_url, self.state.tenant(tier).api_key)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    # ---- the load ----

    def plan(self) -> None:
        for index, latency in enumerate([0.3, 0.6, 0.9, 1.2, 0.4, 0.8]):
            self.planned.append(
                Planned(
                    f"report {index + 1}", "enterprise", f"Summarise report {index + 1} [[latency:{latency}]]"
                )
            )
        self.planned += [
            Planned(
                # (refused before generating: the attempt is refunded, `retry.max_refusals`)
                "transient 503",
                "enterprise",
                "Translate the contract [[fail:503x1]]",
                expect_attempts=1,
            ),
            Planned(
                "receiver fails twice", "enterprise", "Draft the reply [[latency:0.2]]", hook="/hooks/fail-2"
            ),
        ]
        for index, latency in enumerate([0.5, 1.0, 0.7, 1.4]):
            self.planned.append(
                Planned(f"hobby {index + 1}", "free", f"Write a haiku {index + 1} [[latency:{latency}]]")
            )
        self.planned += [
            Planned(
                "too long",
                "free",
                "An enormous prompt [[fail:400:context_length_exceeded]]",
                expect_status=JobStatus.FAILED,
                expect_code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            ),
            Planned(
                "canceled",
                "free",
                "A long essay [[latency:2.5]] [[tokens:50]]",
                expect_status=JobStatus.CANCELED,
                cancel=True,
            ),
        ]

    def submit(self) -> None:
        table = Table(
            "job", "tenant", "lane", "status", "what it does", title="Submitted over HTTP (202 Accepted)"
        )
        for planned in self.planned:
            with self.client(planned.tenant) as client:
                body = {
                    "prompt": planned.prompt,
                    "metadata": {"demo": planned.label},
                    "webhook": {"url": f"{self.state.receiver_url}{planned.hook}"},
                }
                job = client.submit(body).body
                planned.job_id = job["id"]
                if planned.cancel:
                    job = client.cancel(job["id"])
            table.add_row(job["id"], planned.tenant, job["lane"], job["status"], planned.label)
        self.console.print(table)

    # ---- idempotency ----

    def replay(self) -> None:
        self.console.rule("Idempotent replay")
        body = {"prompt": "Invoice 42 summary [[latency:0.2]]", "metadata": {"demo": "idempotent"}}
        with self.client("enterprise") as client:
            first = client.submit(body, idempotency_key="demo-invoice-42")
            again = client.submit(body, idempotency_key="demo-invoice-42")
            changed = client.request(
                "POST",
                "/v1/jobs",
                json={**body, "prompt": "something else"},
                headers={"Idempotency-Key": "demo-invoice-42"},
            )
        replayed = again.headers.get("idempotent-replayed")
        self.console.print(
            f"  first  POST Idempotency-Key: demo-invoice-42 -> {first.status} {first.body['id']}"
        )
        self.console.print(
            f"  replay POST same key, same body  -> {again.status} {again.body['id']}  Idempotent-Replayed: {replayed}"
        )
        code = changed.body.get("code") if isinstance(changed.body, dict) else changed.body
        self.console.print(f"  same key, different body          -> {changed.status} {code}")
        self.check(first.body["id"] == again.body["id"], "the replay created a second job")
        self.check(replayed == "true", "the replay did not say Idempotent-Replayed: true")
        self.check(
            changed.status == 422, f"a different body under the same key answered {changed.status}, not 422"
        )

    # ---- watching it drain ----

    def _poll(self) -> None:
        for tier in ("enterprise", "free"):
            with self.client(tier) as client:
                for job in client.all_jobs():
                    self.jobs[job["id"]] = job
        response = httpx.get(f"{self.state.receiver_url}/_deliveries", timeout=10)
        self.deliveries = response.json()["data"]

    def _delivered(self) -> set[str]:
        return {
            delivery["job_id"]
            for delivery in self.deliveries
            if delivery["status"] < 300 and delivery["verified"]
        }

    def watch(self) -> None:
        self.console.rule("Live: each lane drains at its own concurrency (high 8, low 2 batches)")
        mine = {planned.job_id: planned for planned in self.planned}
        lanes = {
            "high": [p for p in self.planned if p.tenant == "enterprise"],
            "low": [p for p in self.planned if p.tenant == "free"],
        }
        columns = (
            TextColumn("{task.description:<30}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        with Progress(*columns, console=self.console) as progress:
            bars = {lane: progress.add_task(f"lane {lane}", total=len(jobs)) for lane, jobs in lanes.items()}
            hooks = progress.add_task("webhooks delivered (verified)", total=len(mine))
            while time.monotonic() < deadline:
                self._poll()
                for lane, planned in lanes.items():
                    done = [self.jobs.get(p.job_id, {}).get("status") for p in planned]
                    finished = [status for status in done if status in TERMINAL_STATUSES]
                    summary = ", ".join(
                        f"{done.count(s)} {s}" for s in ("succeeded", "failed", "canceled") if done.count(s)
                    )
                    progress.update(
                        bars[lane], completed=len(finished), description=f"lane {lane}: {summary or 'queued'}"
                    )
                delivered = self._delivered() & set(mine)
                progress.update(hooks, completed=len(delivered))
                if all(
                    self.jobs.get(job_id, {}).get("status") in TERMINAL_STATUSES for job_id in mine
                ) and len(delivered) == len(mine):
                    break
                time.sleep(0.25)

    # ---- what happened ----

    def show_webhooks(self) -> None:
        table = Table(
            "webhook-id",
            "type",
            "job",
            "attempt",
            "answered",
            "verified",
            title="At the receiver (standardwebhooks)",
        )
        for delivery in self.deliveries[-12:]:
            table.add_row(
                delivery["webhook_id"][:20] + "...",
                delivery["type"] or "?",
                delivery["job_id"] or "?",
                str(delivery["attempt"]),
                str(delivery["status"]),
                "yes" if delivery["verified"] else f"NO: {delivery['reason']}",
            )
        self.console.print(table)

    def verify_outcomes(self) -> None:
        for planned in self.planned:
            job = self.jobs.get(planned.job_id)
            if job is None:
                self.problems.append(f"{planned.label}: {planned.job_id} is not listed")
                continue
            lane = "high" if planned.tenant == "enterprise" else "low"
            self.check(job["lane"] == lane, f"{planned.label}: ran in lane {job['lane']}, not {lane}")
            self.check(
                job["status"] == planned.expect_status,
                f"{planned.label}: {job['status']} (expected {planned.expect_status})",
            )
            if planned.expect_code:
                code = (job.get("error") or {}).get("code")
                self.check(
                    code == planned.expect_code, f"{planned.label}: error {code}, not {planned.expect_code}"
                )
            if planned.expect_attempts:
                self.check(
                    job["attempts"] == planned.expect_attempts,
                    f"{planned.label}: {job['attempts']} attempts, not {planned.expect_attempts}",
                )
        unverified = [d for d in self.deliveries if not d["verified"]]
        self.check(not unverified, f"{len(unverified)} webhook deliveries did not verify")
        missing = {p.job_id for p in self.planned} - self._delivered()
        self.check(not missing, f"no verified webhook for {sorted(missing)}")

    def summary(self) -> None:
        table = Table(
            "lane",
            "jobs",
            "succeeded",
            "failed",
            "canceled",
            "p50 queue wait",
            "p95 queue wait",
            "webhooks delivered",
            title="Summary per lane",
        )
        delivered = self._delivered()
        for lane, tier in (("high", "enterprise"), ("low", "free")):
            jobs = [self.jobs[p.job_id] for p in self.planned if p.tenant == tier and p.job_id in self.jobs]
            waits = [_queue_wait(job) for job in jobs]
            started = sorted(wait for wait in waits if wait is not None)
            table.add_row(
                lane,
                str(len(jobs)),
                *(
                    str(sum(job["status"] == status for job in jobs))
                    for status in ("succeeded", "failed", "canceled")
                ),
                _seconds(_percentile(started, 50)),
                _seconds(_percentile(started, 95)),
                str(sum(job["id"] in delivered for job in jobs)),
            )
        self.console.print(table)


STREAM_PROMPT = "Explain a queue in sixty words [[latency:4]] [[tokens:60]]"


def run_stream(tour: Tour) -> None:
    """One stream: true job, its output printed as it is generated (GET /v1/jobs/{id}/events)."""
    tour.console.rule("Live output: a stream: true job, read as it is generated")
    text: list[str] = []
    deltas = 0
    done: dict[str, Any] | None = None
    with tour.client("enterprise") as client:
        job = client.submit({"prompt": STREAM_PROMPT, "stream": True}).body
        for event in client.follow(job["id"], timeout=120):
            data = json.loads(event.data)
            if event.event == "output.delta":
                if data.get("reset"):
                    text.clear()
                text.append(data["delta"])
                deltas += 1
                tour.console.print(data["delta"], end="", markup=False, highlight=False, soft_wrap=True)
            elif event.event == "done":
                done = data
    tour.console.print()
    succeeded = done is not None and done["status"] == "succeeded"
    tour.check(succeeded, f"stream: job {job['id']} did not succeed")
    whole = succeeded and done is not None and "".join(text) == done["result"]["output"]
    tour.check(whole, f"stream: job {job['id']}'s deltas joined are not its result")
    tour.console.print(
        f"Job {job['id']}: {deltas} deltas read live; joined, they are its result: {whole}", soft_wrap=True
    )


BATCH_ITEMS = 200
# The tour waits for the batch's end (its results file included) at most this long: about
# 30 s on an idle laptop, two minutes on a loaded two-core CI machine.
BATCH_TIMEOUT_SECONDS = 300.0


def run_batch(tour: Tour) -> None:
    """A batch of 200 items as the enterprise tenant: its progress live, then its one webhook."""
    tour.console.rule(f"A batch: {BATCH_ITEMS} items in one request, run under the tenant's cap")
    requests = [
        {"custom_id": f"ticket-{index}", "body": {"prompt": f"Classify ticket {index} [[latency:0.1]]"}}
        for index in range(BATCH_ITEMS)
    ]
    columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with tour.client("enterprise") as client:
        body = {"requests": requests, "webhook": {"url": f"{tour.state.receiver_url}/hooks/batch"}}
        batch = client.submit_batch(body).body
        deadline = time.monotonic() + BATCH_TIMEOUT_SECONDS
        with Progress(*columns, console=tour.console) as progress:
            bar = progress.add_task(batch["id"], total=BATCH_ITEMS)
            while batch["status"] not in ("completed", "canceled", "expired") and time.monotonic() < deadline:
                time.sleep(0.5)
                batch = client.batch(batch["id"])
                counts = batch["request_counts"]
                ended = counts["succeeded"] + counts["failed"] + counts["canceled"] + counts["expired"]
                progress.update(
                    bar,
                    completed=ended,
                    description=f"{batch['status']}: {counts['running']} running, {counts['succeeded']} succeeded",
                )
        results = list(client.batch_results(batch["id"]))
    counts = batch["request_counts"]
    tour.check(batch["status"] == "completed", f"batch {batch['id']} is {batch['status']}, not completed")
    tour.check(counts["succeeded"] == BATCH_ITEMS, f"batch: {counts['succeeded']} of {BATCH_ITEMS} succeeded")
    tour.check(len(results) == BATCH_ITEMS, f"batch: {len(results)} result lines, not {BATCH_ITEMS}")
    deadline = time.monotonic() + 20
    deliveries: list[dict[str, Any]] = []
    while not deliveries and time.monotonic() < deadline:
        response = httpx.get(
            f"{tour.state.receiver_url}/_deliveries", params={"job_id": batch["id"]}, timeout=10
        )
        deliveries = response.json()["data"]
        time.sleep(0.25)
    verified = [d for d in deliveries if d["verified"] and d["type"] == "batch.completed"]
    tour.check(len(verified) == 1, f"batch: {len(verified)} verified batch.completed webhooks, not 1")
    tour.console.print(
        f"Batch {batch['id']}: {batch['status']}, {counts['succeeded']} succeeded; "
        f"{len(results)} result lines (GET .../results); batch.completed webhook verified: {len(verified) == 1}"
    )


def _queue_wait(job: dict[str, Any]) -> float | None:
    """started_at - created_at; None for a job that never started (canceled while queued)."""
    if not job.get("started_at"):
        return None
    return (
        datetime.fromisoformat(job["started_at"]) - datetime.fromisoformat(job["created_at"])
    ).total_seconds()


def _percentile(values: list[float], percent: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def main() -> int:
    from llmq_sandbox.launcher import Sandbox, SandboxStartError

    console = Console()
    console.rule("[bold]llmq demo[/bold]: the real CDK app, in moto, on this laptop")
    sandbox = Sandbox(log_dir=LOG_DIR)
    began = time.monotonic()
    try:
        with console.status(
            "Synthesizing the CDK app, deploying it into moto, cold-starting the functions..."
        ):
            state = sandbox.start()
        console.print(
            f"Sandbox up in {time.monotonic() - began:.0f}s: API {state.api_url}, "
            f"{len(sandbox.functions.pools)} functions, tenants "
            + ", ".join(f"{tenant.id} ({tenant.tier})" for tenant in state.tenants)
        )
        tour = Tour(state, console)
        tour.plan()
        tour.submit()
        tour.replay()
        tour.watch()
        tour.show_webhooks()
        tour.verify_outcomes()
        tour.summary()
        run_stream(tour)
        run_batch(tour)
    except SandboxStartError as exc:
        console.print(f"[red]The sandbox did not start:[/red] {exc}")
        return 1
    finally:
        with console.status("Stopping the sandbox..."):
            sandbox.stop()
    console.print(f"Function logs: {LOG_DIR}/  ({time.monotonic() - began:.0f}s in all)")
    if tour.problems:
        console.print("[red bold]Something is wrong:[/red bold]")
        for problem in tour.problems:
            console.print(f"  - {problem}")
        return 1
    console.print("[green bold]Every job is terminal, every webhook verified. Done.[/green bold]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
