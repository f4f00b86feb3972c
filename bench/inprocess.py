"""Benchmarks that need no sandbox: in-process moto, a loopback provider, the real handlers.

- idle Lambda time per job: the worker's concurrent batch against a sequential baseline;
- AWS calls per job, per step, counted with botocore event hooks;
- cold start of each handler module against a boto3-only baseline, in fresh processes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "layers" / "llmq" / "python"), str(ROOT)]

from llmq import aws  # noqa: E402
from llmq.config import LlmqConfig  # noqa: E402
from llmq.read_gathering import GatheredReads  # noqa: E402
from llmq_sandbox.doubles.fake_provider import FakeProviderServer  # noqa: E402
from llmq_sandbox.event_sources import delete_messages  # noqa: E402
from llmq_sandbox.moto_fidelity import make_moto_strict  # noqa: E402

ENTERPRISE = {"tenant_id": "ten_bench", "tier": "enterprise"}


def _fake_credentials() -> None:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }.items():
        os.environ[key] = value
    os.environ.pop("AWS_ENDPOINT_URL", None)


@contextmanager
def _moto_server(added_ms: float) -> Iterator[None]:
    """moto in a process of its own (`python -m moto.server`), which this process's clients
    reach over loopback HTTP, each call first waiting `added_ms` as a round trip to AWS would
    (the wait releases the GIL, as a socket's does). moto's own work then runs on the other
    core instead of contending with the handler's threads for this process's GIL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto.server did not start") from None
                time.sleep(0.1)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        aws.reset_clients()
        if added_ms:
            for service in ("dynamodb", "sqs", "s3"):
                aws.client(service).meta.events.register(
                    "before-send", lambda **_: time.sleep(added_ms / 1000)
                )
        yield
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        aws.reset_clients()
        server.terminate()
        server.wait(timeout=10)


@contextmanager
def _stack(
    provider: FakeProviderServer, *, server_ms: float | None = None, **overrides: Any
) -> Iterator[Any]:
    """A moto stack plus the handler environment, as the integration tests build it: moto
    in-process, or (`server_ms` not None) a moto server with that added latency per call."""
    from moto import mock_aws

    from tests.conftest import create_llmq_resources
    from tests.integration.harness import Harness

    _fake_credentials()
    make_moto_strict()
    if server_ms is not None:
        with _moto_server(server_ms):
            stack = create_llmq_resources(["high", "low"])
            config = LlmqConfig.model_validate(_stack_config(provider, overrides))
            yield Harness(stack, config, _EnvPatch())  # type: ignore[arg-type]
        return
    config = LlmqConfig.model_validate(_stack_config(provider, overrides))
    with mock_aws():
        aws.reset_clients()
        stack = create_llmq_resources(["high", "low"])
        yield Harness(stack, config, _EnvPatch())  # type: ignore[arg-type]
    aws.reset_clients()


class _EnvPatch:
    def setenv(self, key: str, value: str) -> None:
        os.environ[key] = value


def _stack_config(provider: FakeProviderServer, overrides: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "provider": {
            "base_url": provider.base_url,
            "default_model": "fake-model",
            "models": ["fake-model"],
            "stream": False,
            "timeout_seconds": 120,
        },
        "webhooks": {"allow_loopback_http": True},
    }
    base.update(overrides)
    return base


# ---- 1. idle Lambda time per job -------------------------------------------------------


# Where moto runs for each row of §1: in this process (contending with the handler's threads
# for the GIL), or in a process of its own with a fixed latency added to each call, as a
# round trip to AWS in the same region would add (BENCHMARKS §1 says which is which).
IDLE_EMULATORS: dict[str, float | None] = {"in-process": None, "server": 0.0, "server +10 ms": 10.0}


def idle_time(
    latencies: tuple[float, ...] = (1.0, 5.0),
    batch: int = 10,
    emulators: tuple[str, ...] = tuple(IDLE_EMULATORS),
) -> list[dict[str, Any]]:
    from tests.integration.harness import LambdaContextStub

    results = []
    provider = FakeProviderServer().start()
    try:
        for emulator in emulators:
            with _stack(provider, server_ms=IDLE_EMULATORS[emulator]) as harness:
                url = harness.stack.lane_queue_urls["high"]
                worker = harness.worker()
                timer = _AwsCallTimer()
                # Only the in-process row at every L; the others at the first, where overhead shows.
                for latency, gathered in [
                    (each, gathered)
                    for each in (latencies if emulator == "in-process" else latencies[:1])
                    # At the first L, also with each claimed job read alone: the baseline of
                    # llmq.read_gathering, in the same run.
                    for gathered in ((True, False) if each == latencies[0] else (True,))
                ]:
                    jobs = worker.runner().jobs
                    jobs.claimed_reads = GatheredReads(jobs._read_items, gather=gathered)
                    concurrent = _timed_batch(
                        harness,
                        url,
                        latency,
                        batch,
                        lambda event, worker=worker: worker.handler(
                            event, LambdaContextStub(timeout_seconds=900)
                        ),
                        timer,
                    )
                    in_calls, cpu, calls = timer.seconds, timer.cpu_seconds, timer.calls
                    reads_done = timer.last_end("GetItem", "BatchGetItem")
                    # (the gatherer's own count: a long generation also reads the job to look
                    # for a cancel, which the calls' names do not tell apart)
                    read_requests = jobs.claimed_reads.requests
                    sequential = _timed_batch(
                        harness,
                        url,
                        latency,
                        batch,
                        lambda event, worker=worker: _sequential(worker, event),
                        timer,
                    )
                    results.append(
                        {
                            "emulator": emulator,
                            "latency_s": latency,
                            "batch": batch,
                            "concurrent_wall_s": round(concurrent, 3),
                            "sequential_wall_s": round(sequential, 3),
                            "lambda_s_per_job_concurrent": round(concurrent / batch, 3),
                            "lambda_s_per_job_sequential": round(sequential / batch, 3),
                            "aws_calls": calls,
                            "aws_call_s": round(in_calls, 3),
                            # A call's mean wall time among the batch's concurrent calls, and
                            # alone (the sequential run): their gap is the emulator's queue.
                            "call_ms_concurrent": round(in_calls / calls * 1000, 1),
                            "call_ms_alone": round(timer.seconds / timer.calls * 1000, 1),
                            # When the last job's input was read, so its generation could start.
                            "last_generation_start_s": round(reads_done, 3),
                            "read_requests": read_requests,
                            "reads_gathered": gathered,
                            # This process's CPU during the batch: the handler, botocore, httpx,
                            # and moto too when it runs in-process.
                            "cpu_s": round(cpu, 3),
                            "speedup": round(sequential / concurrent, 2),
                            "physical_limit": batch,
                        }
                    )
    finally:
        provider.stop()
    return results


class _AwsCallTimer:
    """The worker's AWS calls during one batch: how many, and their wall time summed over
    the threads that made them (botocore `before-call` to `after-call`)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.calls = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.started = 0.0
        self._ends: dict[str, float] = {}
        for service in ("dynamodb", "sqs", "s3"):
            events = aws.client(service).meta.events
            events.register("before-call", self._before)
            events.register("after-call", self._after)
        self.armed = False

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0
        self.started = time.perf_counter()
        self._ends = {}

    def last_end(self, *operations: str) -> float:
        """Seconds from the batch's start to the end of its last call of `operations`."""
        return max((self._ends.get(operation, 0.0) for operation in operations), default=0.0)

    def _before(self, **_: Any) -> None:
        self._local.started = time.perf_counter()

    def _after(self, model: Any, **_: Any) -> None:
        if self.armed:
            now = time.perf_counter()
            with self._lock:
                self.calls += 1
                self.seconds += now - self._local.started
                self._ends[model.name] = max(self._ends.get(model.name, 0.0), now - self.started)


def _sequential(worker: Any, event: dict[str, Any]) -> None:
    """The baseline: the same domain code, one record at a time."""
    from llmq.execution import Invocation
    from tests.integration.harness import LambdaContextStub

    context = LambdaContextStub(timeout_seconds=900)
    for record in event["Records"]:
        invocation = Invocation(
            owner=record["messageId"], remaining_seconds=lambda: context.get_remaining_time_in_millis() / 1000
        )
        asyncio.run(worker.runner().run(record["body"], invocation))


def _timed_batch(
    harness: Any, url: str, latency: float, batch: int, run: Any, timer: _AwsCallTimer | None = None
) -> float:
    for index in range(batch):
        harness.submit(tenant=ENTERPRISE, prompt=f"bench {index} {time.time()} [[latency:{latency}]]")
    messages: list[dict[str, Any]] = []
    while len(messages) < batch:
        messages += harness.receive(url)
    event = harness.sqs_event(url, messages)
    if timer is not None:
        timer.reset()
        timer.armed = True
    started, cpu = time.perf_counter(), time.process_time()
    run(event)
    elapsed = time.perf_counter() - started
    if timer is not None:
        timer.armed = False
        timer.cpu_seconds = time.process_time() - cpu
    delete_messages(harness.sqs, url, messages)
    return elapsed


# ---- 2. AWS calls per job --------------------------------------------------------------


class CallCounter:
    def __init__(self, services: tuple[str, ...] = ("dynamodb", "sqs")) -> None:
        self.calls: Counter[str] = Counter()
        for service in services:
            aws.client(service).meta.events.register("before-call.*.*", self._count)

    def _count(self, event_name: str, **_: Any) -> None:
        self.calls[event_name.split(".")[-1]] += 1

    def take(self) -> dict[str, int]:
        taken = dict(self.calls)
        self.calls.clear()
        return taken


def aws_calls() -> dict[str, Any]:
    """Calls per step for one job with a webhook, as the handlers make them."""
    from llmq.tenants import TenantRepository
    from llmq_sandbox.doubles.receiver import WebhookReceiver
    from tests.integration.harness import LambdaContextStub, load_handler

    provider = FakeProviderServer().start()
    receiver = WebhookReceiver().start()
    try:
        with _stack(provider) as harness:
            tenants = TenantRepository(harness.stack.tenants_table, dynamodb=aws.client("dynamodb"))
            tenants.create("Bench", "enterprise", tenant_id="ten_bench")
            os.environ["LLMQ_PUBLIC_API_URL"] = "http://127.0.0.1"
            dispatcher = load_handler("webhook_dispatcher")
            lane, hooks = harness.stack.lane_queue_urls["high"], harness.stack.webhook_queue_url
            counter = CallCounter()
            steps: dict[str, dict[str, int]] = {}
            harness.submit(tenant=ENTERPRISE, webhook={"url": f"http://127.0.0.1:{receiver.port}/hook"})
            steps["accept"] = counter.take()
            event = harness.sqs_event(lane, harness.receive(lane))
            counter.take()
            harness.worker().handler(event, LambdaContextStub())
            worker_calls = counter.take()
            event = harness.sqs_event(hooks, harness.receive(hooks))
            counter.take()
            dispatcher.handler(event, LambdaContextStub())
            steps["delivery"] = counter.take()
            steps["claim + complete + webhook enqueue (worker)"] = worker_calls
            # A second job of the same tenant, delivered by the same (now warm) environment.
            harness.submit(tenant=ENTERPRISE, webhook={"url": f"http://127.0.0.1:{receiver.port}/hook"})
            harness.worker().handler(harness.sqs_event(lane, harness.receive(lane)), LambdaContextStub())
            event = harness.sqs_event(hooks, harness.receive(hooks))
            counter.take()
            dispatcher.handler(event, LambdaContextStub())
            warm_delivery = counter.take()
            # A full lane batch: ten jobs (no webhook) in one worker invocation.
            for n in range(10):
                harness.submit(tenant=ENTERPRISE, prompt=f"batch job {n}")
            messages = harness.receive(lane)
            while len(messages) < 10:
                messages += harness.receive(lane)
            counter.take()
            harness.worker().handler(harness.sqs_event(lane, messages), LambdaContextStub())
            batch_of_ten = counter.take()
    finally:
        receiver.stop()
        provider.stop()
    ours = sum(sum(step.values()) for step in steps.values())
    writes = sum(
        count
        for step in steps.values()
        for name, count in step.items()
        if name in {"PutItem", "UpdateItem", "TransactWriteItems", "SendMessage"}
    )
    return {
        "steps": steps,
        "warm_delivery": warm_delivery,
        "worker_batch_of_ten": batch_of_ten,
        "total_calls": ours,
        "writes_and_sends": writes,
        "design_minimum_with_webhook": 6,
        "design_minimum_without_webhook": 4,
        # A worker that locks, reads the status, writes PROCESSING, saves the result, writes
        # COMPLETED and releases the lock: 6 calls, plus accept (2) = 8 without a webhook.
        "lock_pattern_without_webhook": 8,
        "lock_pattern_with_webhook": 8 + 2 + 1,
    }


def _write_units(size_bytes: int, transactional: bool) -> int:
    """DynamoDB's write units for one item write: 1 per KB (rounded up), doubled in a transaction.
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis.html#transaction-capacity-handling
    """
    units = max(1, -(-size_bytes // 1024))
    return 2 * units if transactional else units


def write_units() -> dict[str, Any]:
    """What a job's writes cost in write units with the tenant's share kept in transactions,
    against the same writes as plain single-item writes, for a small and a large job: item
    sizes measured on the real items in moto, as DynamoDB sizes them."""
    from llmq.item_size import item_size_bytes
    from llmq.shares import share_key

    provider = FakeProviderServer().start()
    rows = []
    try:
        with _stack(provider) as harness:
            for name, prompt, tokens in (("small", "hello", 200), ("large", "x" * 60_000, 4000)):
                ddb = aws.client("dynamodb")
                table = harness.stack.jobs_table
                job_id = harness.submit(tenant=ENTERPRISE, prompt=f"{prompt} [[tokens:{tokens}]]").body["id"]
                accepted = item_size_bytes(ddb.get_item(TableName=table, Key={"pk": {"S": job_id}})["Item"])
                harness.drain("high")
                finished = item_size_bytes(ddb.get_item(TableName=table, Key={"pk": {"S": job_id}})["Item"])
                share = item_size_bytes(
                    ddb.get_item(TableName=table, Key=share_key(ENTERPRISE["tenant_id"]))["Item"]
                )
                # accept (put), claim (the accepted item grows by a lease), complete (the result)
                sizes = (accepted, accepted + 100, finished)
                plain = sum(_write_units(size, False) for size in sizes)
                shared = sum(_write_units(size, True) + _write_units(share, True) for size in sizes)
                rows.append(
                    {
                        "job": name,
                        "item_bytes_accepted": accepted,
                        "item_bytes_finished": finished,
                        "share_item_bytes": share,
                        "plain_write_units": plain,
                        "transactional_write_units": shared,
                        "claim_read_units": max(1, -(-(accepted + 100) // 4096)),
                        "ratio": shared / plain,
                    }
                )
    finally:
        provider.stop()
    return {"rows": rows}


# ---- 2c. batches: accept and expansion -------------------------------------------------


def batch_intake(items: int = 2_000) -> dict[str, Any]:
    """A batch of `items` against the same items submitted one by one, in one run: AWS calls
    per item until every item is queued, the time that takes, and write units per item."""
    from llmq.item_size import item_size_bytes
    from tests.integration.harness import LambdaContextStub

    provider = FakeProviderServer().start()
    try:
        with _stack(
            provider, fair_share={"tiers": {"enterprise": {"max_active_jobs": 10 * items}}}
        ) as harness:
            counter = CallCounter(("dynamodb", "sqs", "s3"))
            lane = harness.stack.lane_queue_urls["high"]
            requests = [
                {"custom_id": f"row-{i}", "body": {"prompt": f"classify ticket {i}"}} for i in range(items)
            ]
            started = time.perf_counter()
            reply = harness.api("POST", "/v1/batches", body={"requests": requests}, tenant=ENTERPRISE)
            assert reply.status == 202, reply.body
            batch_calls = counter.take()
            queued = 0
            while queued < items:
                messages = harness.receive(lane)
                expands = [m for m in messages if '"kind":"expand"' in m["Body"]]
                queued += len(messages) - len(expands)
                counter.take()
                if expands:
                    harness.worker().handler(
                        harness.sqs_event(lane, expands), LambdaContextStub(timeout_seconds=300)
                    )
                    for name, count in counter.take().items():
                        batch_calls[name] = batch_calls.get(name, 0) + count
                delete_messages(harness.sqs, lane, messages)
                counter.take()
            batch_seconds = time.perf_counter() - started
            table = harness.stack.jobs_table
            sample = aws.client("dynamodb").get_item(
                TableName=table, Key={"pk": {"S": f"job_{reply.body['id'][4:]}n0"}}
            )["Item"]
            item_bytes = item_size_bytes(sample)
            started = time.perf_counter()
            for index in range(items):
                harness.submit(tenant=ENTERPRISE, prompt=f"classify ticket {index}")
            single_seconds = time.perf_counter() - started
            single_calls = counter.take()
    finally:
        provider.stop()
    chunk = LlmqConfig().batches.expand_chunk
    # A single job's accept: its put and the share's update, in one transaction (twice each).
    single_units = _write_units(item_bytes, True) + _write_units(200, True)
    # A batch item's: its put in the chunk's transaction, and the chunk's checkpoint, shared.
    batch_units = _write_units(item_bytes, True) + _write_units(600, True) / chunk
    return {
        "items": items,
        "expand_chunk": chunk,
        "batch_calls": batch_calls,
        "single_calls": single_calls,
        "batch_calls_per_item": sum(batch_calls.values()) / items,
        "single_calls_per_item": sum(single_calls.values()) / items,
        "batch_seconds": batch_seconds,
        "single_seconds": single_seconds,
        "item_bytes": item_bytes,
        "batch_write_units_per_item": batch_units,
        "single_write_units_per_item": single_units,
    }
