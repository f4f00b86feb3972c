"""`make soak`: N jobs through a detached sandbox under faults; nothing lost, nothing run twice.

    python -m bench.soak [--jobs 2000] [--seed 7] [--timeout SECONDS] [--keep]

The sandbox is started with `llmq sandbox up --detach` in a temporary directory, with two
more tenants than it seeds (four in all, both tiers). Each job is submitted over HTTP with a
webhook to the sandbox's receiver, and its prompt carries the fault it is dealt:
- 5% transient provider failures: `[[fail:503x1]]`, or `[[fail:429x1]][[retry_after:1]]`;
- 1% crashes (llmq_sandbox/doubles/faults.py): `[[crash:1]]` (the environment is killed after the first
  claim), `[[overrun:1]]` (the first invocation overruns its timeout and is killed), or
  `[[overrun]]` (every one does, so the job ends `worker_crashed`); a crash takes the other
  jobs of its batch down with it;
- 1% hangs: `[[hang]]` (the provider never answers; the job fails `provider_timeout`, once);
- 1% broken 200 answers: an error event mid-stream or a cut stream, on the first call only;
- 1% non-ASCII jobs: 48k CJK, Hangul and emoji characters in, echoed back out;
- 10% of webhooks go to `/hooks/fail-1`, which fails the first attempt of each delivery;
- 10% of jobs get 1 to 3 copies of their lane message sent straight into the lane queue, at
  random moments from submit to well after the job finished;
- and the sandbox runs with LLMQ_SANDBOX_CHAOS=on (seeded by --seed): its pollers deliver
  some messages of every queue twice, shuffle batches, hold messages back for a later batch
  and hand over partial batches, as a standard queue may.

Once every job is terminal, every webhook settled and every queue empty (or the timeout
passes), it prints the figures and writes them to bench/soak.md. The exit status is 1 if a
job was lost or completed twice.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from llmq.models import TERMINAL_STATUSES

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "bench" / "soak.md"
SETTLED_DELIVERY = {"delivered", "failed", "disabled"}

# The sandbox's own numbers (LLMQ_SANDBOX_CONFIG merges over them): its short retry and
# webhook schedules, and a worker timeout that still fits cold starts on a loaded laptop. A
# shorter one settles crashes sooner but turns slow batches into crashes of their own.
SOAK_CONFIG: dict[str, Any] = {}
EXTRA_TENANTS = [("Soak Industries", "enterprise"), ("Soak Weekend Project", "free")]


# ---- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    directive: str


NO_FAULT = Fault("none", "")
TRANSIENT = [
    Fault("transient 503", "[[fail:503x1]]"),
    Fault("transient 429", "[[fail:429x1]][[retry_after:1]]"),
]
CRASHES = [
    Fault("crash (killed once)", "[[crash:1]]"),
    Fault("crash (overrun once)", "[[overrun:1]]"),
    Fault("crash (overrun always)", "[[overrun]]"),
]
HANG = Fault("hang", "[[hang]]")
BROKEN_STREAMS = [
    Fault("stream error once", "[[stream_error:503x1]]"),
    Fault("stream cut once", "[[stream_cut:x1]]"),
]
# Non-ASCII text, echoed back: CJK at 3 bytes a character and emoji at 4, each job's input
# and result together near the item's budget, so some results go to S3.
UNICODE = Fault("unicode echo", "[[echo]]")
_UNICODE_TEXT = "漢字かな한글😀" * 6_000


@dataclass(frozen=True)
class PlannedJob:
    index: int
    tenant: int
    fault: Fault
    failing_receiver: bool
    duplicates: tuple[float, ...]  # seconds after submit at which a copy is sent

    def prompt(self) -> str:
        text = _UNICODE_TEXT if self.fault is UNICODE else ""
        return f"Soak job {self.index}: summarise ticket {self.index * 7919 % 100_003} {text}{self.fault.directive}"


def plan(jobs: int, tenants: int, rng: random.Random) -> list[PlannedJob]:
    planned = []
    for index in range(jobs):
        roll = rng.random()
        if roll < 0.05:
            fault = rng.choice(TRANSIENT)
        elif roll < 0.06:
            fault = rng.choice(CRASHES)
        elif roll < 0.07:
            fault = HANG
        elif roll < 0.08:
            fault = rng.choice(BROKEN_STREAMS)
        elif roll < 0.09:
            fault = UNICODE
        else:
            fault = NO_FAULT
        copies = rng.randint(1, 3) if rng.random() < 0.10 else 0
        planned.append(
            PlannedJob(
                index=index,
                tenant=rng.randrange(tenants),
                fault=fault,
                failing_receiver=rng.random() < 0.10,
                duplicates=tuple(sorted(rng.uniform(0, 90) for _ in range(copies))),
            )
        )
    return planned


# ---- the sandbox ------------------------------------------------------------------------------


def _llmq(directory: Path, *args: str, env: dict[str, str] | None = None) -> str:
    environment = {**os.environ, **(env or {})}
    # jsii needs node 22 from the venv, whatever the caller's PATH holds.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
    environment.setdefault("CDK_DISABLE_CLI_TELEMETRY", "true")
    script = Path(sys.executable).parent / "llmq"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "llmq_cli"]
    done = subprocess.run(
        [*command, *args], cwd=directory, env=environment, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"llmq {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


@dataclass
class Sandbox:
    directory: Path
    state: dict[str, Any]

    def aws(self, service: str) -> Any:
        import boto3

        # The operator's key when the sandbox enforces IAM (moto refuses any other), else any.
        credentials = self.state.get("aws_credentials") or {
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        session = boto3.session.Session(region_name=self.state["region"], **credentials)
        return session.client(service, endpoint_url=self.state["aws_endpoint_url"])  # type: ignore[call-overload]

    def outputs(self) -> dict[str, str]:
        stack = self.aws("cloudformation").describe_stacks(StackName="Llmq")["Stacks"][0]
        return {output["OutputKey"]: output["OutputValue"] for output in stack["Outputs"]}


@contextmanager
def running_sandbox(keep: bool, seed: int = 7) -> Iterator[Sandbox]:
    directory = Path(tempfile.mkdtemp(prefix="llmq-soak-"))
    print(f"starting a sandbox in {directory} ...", flush=True)
    try:
        overrides = {"LLMQ_SANDBOX_CONFIG": json.dumps(SOAK_CONFIG)} if SOAK_CONFIG else {}
        # At-least-once for real: the pollers duplicate, reorder and split batches.
        overrides |= {"LLMQ_SANDBOX_CHAOS": "on", "LLMQ_SANDBOX_CHAOS_SEED": str(seed)}
        _llmq(directory, "sandbox", "up", "--detach", env=overrides)
        for name, tier in EXTRA_TENANTS:
            _llmq(directory, "tenants", "create", "--name", name, "--tier", tier)
        state = json.loads((directory / ".llmq" / "sandbox.json").read_text())
        yield Sandbox(directory, state)
    finally:
        try:
            _llmq(directory, "sandbox", "down")
        finally:
            if keep:
                print(f"kept {directory} (logs in .llmq/)")
            else:
                shutil.rmtree(directory, ignore_errors=True)


# ---- load -------------------------------------------------------------------------------------


class DuplicateInjector:
    """Sends copies of lane messages straight into the lane queues, each at its planned moment."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sqs = sandbox.aws("sqs")
        self._queues: dict[str, str] = json.loads(sandbox.outputs()["LaneQueueUrls"])
        self._due: list[tuple[float, str, str]] = []
        self._lock = threading.Condition()
        self._closed = False
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="duplicates", daemon=True)
        self._thread.start()

    def schedule(self, job_id: str, lane: str, after: tuple[float, ...]) -> None:
        now = time.monotonic()
        with self._lock:
            for delay in after:
                heapq.heappush(self._due, (now + delay, job_id, lane))
            self._lock.notify()

    def close(self) -> None:
        """Wait until every planned copy is sent."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _run(self) -> None:
        from llmq.models import LaneMessage

        while True:
            with self._lock:
                while not self._due or self._due[0][0] > time.monotonic():
                    if self._closed and not self._due:
                        return
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._lock.wait(timeout)
                _, job_id, lane = heapq.heappop(self._due)
            # The very body the API sends: ids only.
            body = LaneMessage(job_id=job_id, lane=lane).model_dump_json()
            self._sqs.send_message(QueueUrl=self._queues[lane], MessageBody=body)
            self.sent += 1


@dataclass
class Submitted:
    ids: dict[int, str] = field(default_factory=dict)  # plan index -> job id
    tenant_of: dict[str, str] = field(default_factory=dict)  # job id -> api key
    refused: Counter[int] = field(default_factory=Counter)  # status -> count
    seconds: float = 0.0


def submit_all(sandbox: Sandbox, planned: list[PlannedJob], injector: DuplicateInjector) -> Submitted:
    keys = [tenant["api_key"] for tenant in sandbox.state["tenants"]]
    receiver = sandbox.state["receiver_url"]
    submitted = Submitted()
    lock = threading.Lock()
    local = threading.local()

    def one(job: PlannedJob) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=sandbox.state["api_url"], timeout=60)
        key = keys[job.tenant]
        hook = f"{receiver}/hooks/{'fail-1' if job.failing_receiver else 'soak'}"
        reply = local.client.post(
            "/v1/jobs",
            json={"prompt": job.prompt(), "webhook": {"url": hook}, "metadata": {"soak": str(job.index)}},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": f"soak-{job.index}"},
        )
        with lock:
            if reply.status_code != 202:
                submitted.refused[reply.status_code] += 1
                return
            body = reply.json()
            submitted.ids[job.index] = body["id"]
            submitted.tenant_of[body["id"]] = key
        if job.duplicates:
            injector.schedule(body["id"], body["lane"], job.duplicates)

    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, planned))
    submitted.seconds = time.monotonic() - began
    return submitted


# ---- observation ------------------------------------------------------------------------------


def list_jobs(sandbox: Sandbox, api_key: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    with httpx.Client(
        base_url=sandbox.state["api_url"], headers={"Authorization": f"Bearer {api_key}"}, timeout=60
    ) as client:
        while True:
            page = client.get("/v1/jobs", params=params)
            page.raise_for_status()
            jobs += page.json()["data"]
            cursor = page.json().get("next_cursor")
            if not cursor:
                return jobs
            params["cursor"] = cursor


def queue_depths(sandbox: Sandbox) -> dict[str, int]:
    """Messages left in every queue and DLQ: visible + in flight + delayed."""
    outputs = sandbox.outputs()
    urls = {f"lane {lane}": url for lane, url in json.loads(outputs["LaneQueueUrls"]).items()}
    urls |= {
        f"lane {key.removeprefix('LaneDlqUrl').lower()} DLQ": url
        for key, url in outputs.items()
        if key.startswith("LaneDlqUrl")
    }
    urls |= {"webhooks": outputs["WebhookQueueUrl"], "webhooks DLQ": outputs["WebhookDlqUrl"]}
    sqs = sandbox.aws("sqs")
    names = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    depths = {}
    for name, url in urls.items():
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        depths[name] = sum(int(attributes.get(attribute, 0)) for attribute in names)
    return depths


def wait_until_settled(
    sandbox: Sandbox, submitted: Submitted, timeout: float
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Poll the tenants' lists until every job is terminal, its webhook settled, the queues empty."""
    keys = sorted(set(submitted.tenant_of.values()))
    wanted = set(submitted.tenant_of)
    deadline = time.monotonic() + timeout
    while True:
        jobs = {job["id"]: job for key in keys for job in list_jobs(sandbox, key) if job["id"] in wanted}
        open_jobs = [job for job in jobs.values() if job["status"] not in TERMINAL_STATUSES]
        unsettled = [
            job
            for job in jobs.values()
            if (job.get("webhook") or {}).get("delivery", {}).get("status") not in SETTLED_DELIVERY
        ]
        depths = queue_depths(sandbox)
        busy = sum(depths.values())
        print(
            f"  {len(jobs) - len(open_jobs)}/{len(wanted)} terminal, {len(unsettled)} webhooks unsettled, "
            f"{busy} messages in queues",
            flush=True,
        )
        if (not open_jobs and not unsettled and not busy and len(jobs) == len(wanted)) or (
            time.monotonic() > deadline
        ):
            return jobs, depths
        time.sleep(5)


def _get(url: str) -> Any:
    response = httpx.get(url, timeout=120)
    response.raise_for_status()
    return response.json()


# ---- figures ----------------------------------------------------------------------------------


@dataclass
class Observed:
    """What the run left behind, for the submitted jobs only."""

    jobs: dict[str, dict[str, Any]]  # as polled, by id
    # Provider calls that may have been paid for, by job id: not those refused before generating
    # (a 429, 503 or 529 answer), whose attempts are refunded (`RetryPolicy.max_refusals`).
    calls: dict[str, int]
    deliveries: list[dict[str, Any]]  # every attempt the receiver saw
    worker_outcomes: Counter[str]
    depths: dict[str, int]


# What the fake provider answers when it refuses a call before generating (its faults' statuses).
REFUSAL_STATUSES = frozenset({429, 503, 529})


def observe(
    sandbox: Sandbox, submitted: Submitted, jobs: dict[str, dict[str, Any]], depths: dict[str, int]
) -> Observed:
    ids = set(submitted.tenant_of)
    provider = _get(f"{sandbox.state['provider_url']}/_calls")
    calls: Counter[str] = Counter(provider["calls"])
    calls.subtract(record["job_id"] for record in provider["log"] if record["status"] in REFUSAL_STATUSES)
    deliveries = _get(f"{sandbox.state['receiver_url']}/_deliveries")["data"]
    workers = _get(f"{sandbox.state['api_url']}/_sandbox/invocations?function=worker")["data"]
    return Observed(
        jobs=jobs,
        calls={job_id: calls.get(job_id, 0) for job_id in ids},
        deliveries=[delivery for delivery in deliveries if delivery["job_id"] in ids],
        worker_outcomes=Counter(record["outcome"] for record in workers),
        depths=depths,
    )


def successful_events(observed: Observed) -> dict[str, dict[str, set[str]]]:
    """job id -> event type -> the webhook-ids the receiver accepted (2xx) for it."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for delivery in observed.deliveries:
        if 200 <= delivery["status"] < 300:
            found[delivery["job_id"]][delivery["type"]].add(delivery["webhook_id"])
    return found


def completed_twice(observed: Observed) -> set[str]:
    """Jobs that ran or finished more than once.

    A provider call that no claim paid for (more calls than attempts), more than one terminal
    event accepted by the receiver, or an accepted event that disagrees with the final state.
    """
    events = successful_events(observed)
    unpaid = {job_id for job_id, job in observed.jobs.items() if observed.calls[job_id] > job["attempts"]}
    twice = {job_id for job_id, by_type in events.items() if len(by_type) > 1}
    contradicted = {
        job_id
        for job_id, job in observed.jobs.items()
        if set(events.get(job_id, {})) - {f"job.{job['status']}"}
    }
    return unpaid | twice | contradicted


def _counts(counter: Counter[Any]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counter.items(), key=str))


def _job_rows(planned: list[PlannedJob], submitted: Submitted, observed: Observed) -> list[tuple[str, str]]:
    dealt = [job for job in planned if job.index in submitted.ids]
    terminal = [job for job in observed.jobs.values() if job["status"] in TERMINAL_STATUSES]
    states = Counter(
        job["status"] + (f" ({job['error']['code']})" if job.get("error") else "") for job in terminal
    )
    calls = list(observed.calls.values())
    unpaid = sum(observed.calls[job_id] > job["attempts"] for job_id, job in observed.jobs.items())
    refused = sum(submitted.refused.values())
    return [
        (
            "jobs submitted (202) / refused",
            f"{len(submitted.ids)} / {refused} {dict(submitted.refused) or ''}".strip(),
        ),
        ("tenants", str(len(set(submitted.tenant_of.values())))),
        ("faults dealt", _counts(Counter(job.fault.name for job in dealt))),
        ("receiver failing the first attempt", str(sum(job.failing_receiver for job in dealt))),
        ("jobs terminal / lost", f"{len(terminal)} / {len(submitted.ids) - len(terminal)}"),
        ("final states", _counts(states)),
        (
            "provider calls per job: max / mean",
            f"{max(calls, default=0)} / {sum(calls) / max(1, len(calls)):.3f}",
        ),
        ("provider calls without a claim", str(unpaid)),
        ("duplicate completions", str(len(completed_twice(observed)))),
        ("worker invocations", _counts(observed.worker_outcomes)),
    ]


def _fault_rows(planned: list[PlannedJob], submitted: Submitted, observed: Observed) -> list[tuple[str, str]]:
    """How each kind of fault ended: a crash or a hang spills over to its batch-mates."""
    ended: dict[str, Counter[str]] = defaultdict(Counter)
    for job in planned:
        polled = observed.jobs.get(submitted.ids.get(job.index, ""))
        if polled is not None:
            error = f" ({polled['error']['code']})" if polled.get("error") else ""
            ended[job.fault.name][polled["status"] + error] += 1
    return [(f"final states, fault {name}", _counts(states)) for name, states in sorted(ended.items())]


def _webhook_rows(observed: Observed, injected: set[str]) -> list[tuple[str, str]]:
    accepted = [delivery for delivery in observed.deliveries if 200 <= delivery["status"] < 300]
    distinct = sum(len(ids) for by_type in successful_events(observed).values() for ids in by_type.values())
    repeated = Counter(delivery["webhook_id"] for delivery in accepted)
    repeated_jobs = {delivery["job_id"] for delivery in accepted if repeated[delivery["webhook_id"]] > 1}
    states = Counter(
        (job.get("webhook") or {}).get("delivery", {}).get("status") for job in observed.jobs.values()
    )
    return [
        ("webhooks delivered / expected", f"{distinct} / {len(observed.jobs)}"),
        ("webhook duplicates by webhook-id", str(len(accepted) - distinct)),
        ("  of jobs given injected lane copies", f"{len(repeated_jobs & injected)} of {len(repeated_jobs)}"),
        ("webhook attempts refused by the receiver", str(len(observed.deliveries) - len(accepted))),
        (
            "webhook signatures not verified",
            str(sum(not delivery["verified"] for delivery in observed.deliveries)),
        ),
        ("delivery states", _counts(states)),
    ]


@dataclass
class Figures:
    rows: list[tuple[str, str]]
    lost: int
    duplicate_completions: int


def figures(
    planned: list[PlannedJob],
    submitted: Submitted,
    observed: Observed,
    duplicates_sent: int,
    wall_seconds: float,
) -> Figures:
    terminal = sum(job["status"] in TERMINAL_STATUSES for job in observed.jobs.values())
    injected = {submitted.ids[job.index] for job in planned if job.duplicates and job.index in submitted.ids}
    rows = [
        *_job_rows(planned, submitted, observed),
        *_fault_rows(planned, submitted, observed),
        ("duplicate lane messages injected", str(duplicates_sent)),
        *_webhook_rows(observed, injected),
        ("messages left in queues and DLQs", _counts(Counter(observed.depths))),
        ("wall time: submit / total", f"{submitted.seconds:.0f} s / {wall_seconds:.0f} s"),
    ]
    return Figures(
        rows=rows, lost=len(submitted.ids) - terminal, duplicate_completions=len(completed_twice(observed))
    )


def render(found: Figures, jobs: int, seed: int) -> str:
    width = max(len(name) for name, _ in found.rows)
    lines = [
        f"llmq soak: {jobs} jobs, seed {seed}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "",
        f"| {'figure'.ljust(width)} | value |",
        f"| {'-' * width} | ----- |",
        *(f"| {name.ljust(width)} | {value} |" for name, value in found.rows),
    ]
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="how many jobs (default 2000)")
    parser.add_argument("--seed", type=int, default=7, help="seeds the faults, tenants and duplicates")
    parser.add_argument("--timeout", type=float, help="seconds to wait for everything to settle")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox directory (its logs)")
    parser.add_argument("--report", type=Path, default=REPORT, help=f"where to write the table ({REPORT})")
    args = parser.parse_args(argv)
    timeout = args.timeout or max(600.0, args.jobs * 0.6)
    rng = random.Random(args.seed)

    with running_sandbox(args.keep, args.seed) as sandbox:
        planned = plan(args.jobs, len(sandbox.state["tenants"]), rng)
        began = time.monotonic()
        injector = DuplicateInjector(sandbox)
        print(f"submitting {args.jobs} jobs ...", flush=True)
        submitted = submit_all(sandbox, planned, injector)
        print(
            f"submitted in {submitted.seconds:.0f} s; waiting for every job, webhook and queue ...",
            flush=True,
        )
        injector.close()
        jobs, depths = wait_until_settled(sandbox, submitted, timeout)
        wall = time.monotonic() - began
        observed = observe(sandbox, submitted, jobs, depths)
        found = figures(planned, submitted, observed, injector.sent, wall)

    table = render(found, args.jobs, args.seed)
    print("\n" + table)
    args.report.write_text(f"# Soak\n\n`python -m bench.soak --jobs {args.jobs}`\n\n{table}")
    print(f"written to {args.report}")
    if found.lost or found.duplicate_completions:
        print(
            f"FAILED: {found.lost} lost, {found.duplicate_completions} duplicate completions", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
