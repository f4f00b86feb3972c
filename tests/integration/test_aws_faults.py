"""AWS faults at every call site (DESIGN §7, §3.10): the whole lifecycle once per site and fault.

Each case submits a job with a webhook through the api handler, runs the worker, the webhook
dispatcher and a loopback receiver, and injects one AWS fault (tests/aws_faults.py) at one
call site: a throttle, a 500, a write applied whose answer was lost and retried by botocore,
or a write applied whose answer was lost for good. The test stands in for the Lambda service
and for time: a message reported failed is shown again at once, a retry backoff passes, a
lease lapses, and when nothing is left in any queue the reconciler runs with its clock moved
forward. A client that gets a 5xx retries with its Idempotency-Key.

What a user would notice is asserted for every case: the job ends as it should (`succeeded`,
or `failed`/`canceled` where the case asks for it) and exactly one job exists; the provider
ran the generation once (never for a canceled job); the receiver got one webhook id, and every
POST verifies; the delivery is `delivered`; the API never answered 5xx for a submit it could
have known was stored; and a job waits for its lease to lapse only when the worker could not
know it held it.

Run with `-s` (and without `-n`) to print the table of outcomes for the README's figures:
`pytest -p no:cacheprovider -s tests/integration/test_aws_faults.py | grep '^|'`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError
from moto import mock_aws
from standardwebhooks.webhooks import Webhook

from llmq import aws
from llmq.job_codec import from_item
from llmq.job_record import new_job_id
from llmq.jobs import JobRepository
from llmq.models import EVENT_FOR_STATUS, JobStatus
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.shares import ShareRepository
from llmq.tenants import TenantRepository
from llmq.webhooks import record_webhook_id
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from llmq_sandbox.doubles.receiver import WebhookReceiver
from llmq_sandbox.moto_fidelity import make_moto_strict
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import REGION, MotoStack, create_llmq_resources
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, ApiReply, Harness, LambdaContextStub, load_handler

LANE = "high"
# Far enough for every reconciler threshold: stale queued, lapsed lease plus grace, stale webhook.
RECONCILER_STEP_SECONDS = 3600
# A webhook message sent back to wait (a retry not yet due, a copy behind the message that
# carries it) comes back at once here, and the dispatcher's clock moves on by this much: past
# any retry of the schedule ([1, 2, 4] s) and the lag a copy keeps behind its carrier.
WEBHOOK_WAIT_STEP_SECONDS = 10
MAX_ROUNDS = 12


@dataclass(frozen=True)
class Site:
    """One AWS call a function makes: the nth call of `operation` in one invocation."""

    function: str
    operation: str
    nth: int
    what: str
    prompt: str = "hello"
    # Failures the fake provider answers first, by the prompt's directive.
    provider_failures: int = 0
    # A small item budget, so the input and the result live in S3.
    offloaded: bool = False
    cancel_check_seconds: float | None = None
    # The client cancels the job while it is still queued.
    cancel: bool = False
    expect: JobStatus = JobStatus.SUCCEEDED
    # 503s the webhook receiver answers first.
    receiver_failures: int = 0

    @property
    def id(self) -> str:
        return f"{self.function}:{self.operation}#{self.nth}:{self.what.replace(' ', '-')}"

    @property
    def provider_calls(self) -> int:
        return 0 if self.cancel else 1 + self.provider_failures


LARGE = "hello [[tokens:2000]]"
SITES = [
    Site("api", "dynamodb.TransactWriteItems", 1, "accept write"),
    Site("api", "sqs.SendMessage", 1, "lane enqueue"),
    Site("api", "s3.PutObject", 1, "input offload", prompt=LARGE, offloaded=True),
    Site("api", "dynamodb.TransactWriteItems", 1, "cancel", cancel=True, expect=JobStatus.CANCELED),
    Site("worker", "dynamodb.TransactWriteItems", 1, "claim"),
    Site("worker", "dynamodb.GetItem", 1, "claim read"),
    Site("worker", "s3.GetObject", 1, "input load", prompt=LARGE, offloaded=True),
    # The provider takes four cancel checks' time, so the watcher reads while it generates.
    Site(
        "worker",
        "dynamodb.GetItem",
        2,
        "cancel check",
        prompt="hello [[latency:0.4]]",
        cancel_check_seconds=0.1,
    ),
    Site("worker", "dynamodb.TransactWriteItems", 2, "complete"),
    Site("worker", "s3.PutObject", 1, "result offload", prompt=LARGE, offloaded=True),
    Site(
        "worker",
        "dynamodb.TransactWriteItems",
        2,
        "fail",
        prompt="hello [[fail:400:context_length_exceeded]]",
        expect=JobStatus.FAILED,
    ),
    Site(
        "worker",
        "dynamodb.TransactWriteItems",
        2,
        "requeue",
        prompt="hello [[fail:503x1]]",
        provider_failures=1,
    ),
    Site(
        "worker",
        "sqs.ChangeMessageVisibility",
        1,
        "retry delay",
        prompt="hello [[fail:503x1]]",
        provider_failures=1,
    ),
    Site("worker", "sqs.SendMessage", 1, "webhook enqueue"),
    Site("webhook_dispatcher", "dynamodb.GetItem", 1, "job read"),
    Site("webhook_dispatcher", "dynamodb.UpdateItem", 1, "delivery record"),
    Site("webhook_dispatcher", "sqs.ChangeMessageVisibility", 1, "delivery retry delay", receiver_failures=1),
]
# Only a claim whose every answer was lost leaves the worker not knowing it holds the lease: then,
# and only then, may the job wait for its lease to lapse and the reconciler to hand it on.
LEASE_LAPSE_EXPECTED = {("worker", "dynamodb.TransactWriteItems", 1, FaultKind.APPLIED_LOST)}


# ---- the table of outcomes --------------------------------------------------------------------


@dataclass
class Row:
    site: Site
    kind: FaultKind
    client: str = ""
    outcome: str = ""
    recovery: str = ""
    provider_calls: int = 0
    webhook_posts: int = 0
    passed: bool = False


_TABLE: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table() -> Iterator[None]:
    yield
    if not _TABLE:
        return
    lines = [
        "",
        "| site | what | fault | client saw | outcome | recovery | provider calls | webhook POSTs | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in _TABLE:
        lines.append(
            f"| {row.site.function} {row.site.operation} #{row.site.nth} | {row.site.what} | {row.kind.value} | "
            f"{row.client} | {row.outcome} | "
            f"{row.recovery or '-'} | {row.provider_calls} | {row.webhook_posts} | "
            f"{'ok' if row.passed else 'FAILED'} |"
        )
    print("\n".join(lines))


# ---- the world around the functions -----------------------------------------------------------


class LaterClock:
    """Real time, shifted forward: what the reconciler sees when it runs later."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProviderServer]:
    """One fake provider for the module (stopping one takes ~0.5 s); it counts calls per job."""
    server = FakeProviderServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


@dataclass(frozen=True)
class SharedAws:
    stack: MotoStack
    webhook_secret: str


@pytest.fixture(scope="module")
def shared_aws() -> Iterator[SharedAws]:
    """One moto, its tables, bucket and tenant for the module: creating the tables costs ~1 s."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }.items():
            env.setenv(name, value)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        make_moto_strict()
        with mock_aws():
            aws.reset_clients()
            stack = create_llmq_resources([LANE, "low"])
            tenant = TenantRepository(stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
                "Acme", "enterprise", tenant_id="ten_acme"
            )
            yield SharedAws(stack, tenant.tenant.webhook_secrets[0])
        aws.reset_clients()


@pytest.fixture
def stack(shared_aws: SharedAws) -> MotoStack:
    """The shared tables, emptied of jobs, and queues of this case's own (queues cost ~3 ms)."""
    jobs = shared_aws.stack.jobs_table
    ddb = aws.client("dynamodb")
    for item in ddb.scan(TableName=jobs, ProjectionExpression="pk")["Items"]:
        ddb.delete_item(TableName=jobs, Key={"pk": item["pk"]})
    suffix = uuid.uuid4().hex[:8]
    lane_url, lane_dlq = _queue_with_dlq(f"llmq-lane-{LANE}-{suffix}")
    webhook_url, webhook_dlq = _queue_with_dlq(f"llmq-webhooks-{suffix}")
    return dataclasses.replace(
        shared_aws.stack,
        lane_queue_urls={**shared_aws.stack.lane_queue_urls, LANE: lane_url},
        lane_dlq_urls={**shared_aws.stack.lane_dlq_urls, LANE: lane_dlq},
        webhook_queue_url=webhook_url,
        webhook_dlq_url=webhook_dlq,
    )


def _queue_with_dlq(name: str) -> tuple[str, str]:
    sqs = aws.client("sqs")
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "6"})
    attributes = {"RedrivePolicy": redrive, "VisibilityTimeout": "60"}
    return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"], dlq_url


@dataclass
class World:
    """The functions, their queues, the receiver, and whatever a fault leaves for the world to do."""

    harness: Harness
    provider: FakeProviderServer
    faults: AwsFaults
    dispatcher: Any
    reconciler: Reconciler
    clock: LaterClock
    # The dispatcher's: apart, so a webhook's signed timestamp stays within what a receiver
    # accepts (5 minutes) while the reconciler's clock leaps hours.
    webhook_clock: LaterClock
    receiver: WebhookReceiver
    secret: str
    hook_path: str
    recovery: list[str] = field(default_factory=list)

    @property
    def lane_url(self) -> str:
        return self.harness.stack.lane_queue_urls[LANE]

    @property
    def webhook_queue_url(self) -> str:
        return self.harness.stack.webhook_queue_url

    def submit(self, prompt: str, key: str) -> tuple[ApiReply, ApiReply]:
        """The client's first answer, and the one it keeps: a 5xx is retried with the same key."""
        body: dict[str, Any] = {
            "prompt": prompt,
            "webhook": {"url": f"http://127.0.0.1:{self.receiver.port}{self.hook_path}"},
        }
        first = self.harness.submit(key=key, **body)
        if first.status < 500:
            return first, first
        self.recovery.append(f"client retried its {first.status}")
        return first, self.harness.submit(key=key, **body)

    def cancel(self, job_id: str) -> tuple[ApiReply, ApiReply]:
        """The client cancels; a 5xx is retried, as with a submit."""
        first = self.harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
        if first.status < 500:
            return first, first
        self.recovery.append(f"client retried its cancel's {first.status}")
        return first, self.harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)

    def settle(self, job_id: str) -> None:
        """Play SQS, the clock and the schedule until the job is terminal and its webhook settled."""
        for _ in range(MAX_ROUNDS):
            if self._run(self.lane_url, lambda messages: self.harness.run_worker(self.lane_url, messages)):
                self.harness.let_backoffs_pass()
                continue
            if self._run(self.webhook_queue_url, self._dispatch):
                continue
            if self._settled(job_id):
                return
            self._run_reconciler(job_id)
        pytest.fail(f"job {job_id} did not settle in {MAX_ROUNDS} rounds: {self._item(job_id)}")

    def _run(self, queue_url: str, invoke: Any) -> bool:
        messages = self.harness.receive(queue_url)
        if not messages:
            return False
        response = invoke(messages)
        failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        for message in messages:
            if message["MessageId"] in failed:
                # Stand in for the visibility timeout or the retry delay: the message is back.
                self.harness.sqs.change_message_visibility(
                    QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                )
                self.recovery.append(f"{_queue_name(queue_url)} message redelivered")
        if failed and queue_url == self.webhook_queue_url:
            self.webhook_clock.offset += WEBHOOK_WAIT_STEP_SECONDS
        return True

    def _dispatch(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        url = self.webhook_queue_url
        response: dict[str, Any] = self.dispatcher.handler(
            self.harness.sqs_event(url, messages), LambdaContextStub()
        )
        failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        for message in messages:
            if message["MessageId"] not in failed:
                self.harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return response

    def _run_reconciler(self, job_id: str) -> None:
        item = self._item(job_id)
        if item.get("status") == JobStatus.RUNNING.value:
            # Stand in for time: the lease of the worker that lost the job lapses (the worker
            # judges leases by the real clock).
            self.harness.ddb.update_item(
                TableName=self.harness.stack.jobs_table,
                Key={"pk": {"S": job_id}},
                UpdateExpression="SET lease_expires_ms = :past",
                ExpressionAttributeValues={":past": {"N": str(int(time.time() * 1000) - 1)}},
            )
            self.recovery.append("lease lapsed")
        self.clock.offset += RECONCILER_STEP_SECONDS
        report = self.reconciler.run()
        did = [
            f"reconciler {name}"
            for name in ("requeued", "recovered", "expired", "webhooks")
            if job_id in getattr(report, name)
        ]
        assert did, f"nothing in any queue and the reconciler did nothing for {job_id}: {item}"
        self.recovery += did

    def _settled(self, job_id: str) -> bool:
        item = self._item(job_id)
        terminal = "status" in item and JobStatus(item["status"]).is_terminal
        return terminal and item.get("delivery_status") != "pending"

    def _item(self, job_id: str) -> dict[str, Any]:
        return {name: next(iter(value.values())) for name, value in self._stored_item(job_id).items()}

    def _stored_item(self, job_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.harness.ddb.get_item(
            TableName=self.harness.stack.jobs_table, Key={"pk": {"S": job_id}}, ConsistentRead=True
        ).get("Item", {})
        return found

    def stored(self, job_id: str) -> Any:
        return from_item(self._stored_item(job_id))

    def provider_log(self) -> list[Any]:
        with self.provider.state.lock:
            return list(self.provider.state.log)

    def recovery_summary(self) -> str:
        counted: dict[str, int] = {}
        for step in self.recovery:
            counted[step] = counted.get(step, 0) + 1
        return "; ".join(f"{step} ×{count}" if count > 1 else step for step, count in counted.items())


def _queue_name(url: str) -> str:
    return "lane" if "lane" in url.rsplit("/", 1)[-1] else "webhook"


@pytest.fixture
def faults(stack: MotoStack) -> Iterator[AwsFaults]:
    armed = AwsFaults()
    yield armed
    armed.disarm()


@pytest.fixture
def make_world(
    stack: MotoStack,
    shared_aws: SharedAws,
    faults: AwsFaults,
    provider: FakeProviderServer,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:

    def build(site: Site, kind: FaultKind) -> World:
        overrides: dict[str, Any] = {}
        if site.cancel_check_seconds is not None:
            overrides["cancel_check_seconds"] = site.cancel_check_seconds
        if site.offloaded:
            # Nothing fits beside the 4 KB headroom: the input and the result go to S3.
            overrides["limits"] = {
                "max_prompt_chars": 5000,
                "max_body_bytes": 65536,
                "wait_poll_seconds": 0.05,
                "max_item_payload_bytes": 4096,
            }
        config = integration_config(provider, **overrides)
        harness = Harness(stack, config, monkeypatch)
        monkeypatch.setenv("LLMQ_PUBLIC_API_URL", "http://127.0.0.1")
        dispatcher = load_handler("webhook_dispatcher")
        clock, webhook_clock = LaterClock(), LaterClock()
        # The dispatcher waits out retries by a clock the world moves on.
        monkeypatch.setattr(dispatcher.dispatcher(), "_clock", webhook_clock)
        faults.wrap_handler("api", harness.api_module)
        faults.wrap_handler("worker", harness.worker())
        faults.wrap_handler("webhook_dispatcher", dispatcher)
        hook_path = f"/hooks/{re.sub(r'[^A-Za-z0-9]+', '-', site.id)}/{kind.value}"
        reconciler = Reconciler(
            JobRepository(stack.jobs_table, config, dynamodb=aws.client("dynamodb"), clock=clock),
            QueueRepository(stack.lane_queue_urls, stack.webhook_queue_url, sqs=aws.client("sqs")),
            config,
        )
        receiver.script(hook_path, *[503] * site.receiver_failures)
        return World(
            harness=harness,
            provider=provider,
            faults=faults,
            dispatcher=dispatcher,
            reconciler=reconciler,
            clock=clock,
            webhook_clock=webhook_clock,
            receiver=receiver,
            secret=shared_aws.webhook_secret,
            hook_path=hook_path,
        )

    return build


# ---- the injector itself: each kind does to moto what its name says ---------------------------


def _put(table: str, pk: str) -> None:
    aws.client("dynamodb").put_item(
        TableName=table,
        Item={"pk": {"S": pk}},
        ConditionExpression="attribute_not_exists(pk)",
        ReturnValuesOnConditionCheckFailure="ALL_OLD",
    )


def _stored(table: str, pk: str) -> bool:
    return "Item" in aws.client("dynamodb").get_item(TableName=table, Key={"pk": {"S": pk}})


def test_a_throttle_and_a_500_never_reach_the_service(stack: MotoStack, faults: AwsFaults) -> None:
    throttle = faults.arm(FaultKind.THROTTLE, "dynamodb.PutItem")
    server_error = faults.arm(FaultKind.SERVER_ERROR, "dynamodb.PutItem")
    with pytest.raises(ClientError) as first:
        _put(stack.jobs_table, "job_throttled")
    with pytest.raises(ClientError) as second:
        _put(stack.jobs_table, "job_throttled")
    assert (
        first.value.response["Error"]["Code"],
        first.value.response["ResponseMetadata"]["HTTPStatusCode"],
    ) == (
        "ProvisionedThroughputExceededException",
        400,
    )
    assert (
        second.value.response["Error"]["Code"],
        second.value.response["ResponseMetadata"]["HTTPStatusCode"],
    ) == (
        "InternalServerError",
        500,
    )
    assert not _stored(stack.jobs_table, "job_throttled")
    assert [entry.fault for entry in faults.fired] == [throttle, server_error]
    _put(stack.jobs_table, "job_throttled")  # spent: the next call goes through
    assert faults.unfired() == []


def test_applied_retried_sends_the_same_request_twice_and_answers_the_retry(
    stack: MotoStack, faults: AwsFaults
) -> None:
    # A conditional put applied on the first try fails its condition on the retry, on its own item
    put = faults.arm(FaultKind.APPLIED_RETRIED, "dynamodb.PutItem")
    with pytest.raises(ClientError) as caught:
        _put(stack.jobs_table, "job_retried")
    assert caught.value.response["Error"]["Code"] == "ConditionalCheckFailedException"
    assert caught.value.response.get("Item") == {"pk": {"S": "job_retried"}}
    assert caught.value.response["ResponseMetadata"]["RetryAttempts"] == 1
    # And a message sent once by the caller is in the queue twice
    send = faults.arm(FaultKind.APPLIED_RETRIED, "sqs.SendMessage")
    aws.client("sqs").send_message(QueueUrl=stack.webhook_queue_url, MessageBody="{}")
    attributes = aws.client("sqs").get_queue_attributes(
        QueueUrl=stack.webhook_queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "2"
    assert [(entry.fault, entry.answer) for entry in faults.fired] == [
        (put, "ConditionalCheckFailedException"),
        (send, "200"),
    ]


def test_applied_lost_applies_the_write_then_loses_the_answer(stack: MotoStack, faults: AwsFaults) -> None:
    faults.arm(FaultKind.APPLIED_LOST, "dynamodb.PutItem")
    with pytest.raises(ConnectionClosedError):
        _put(stack.jobs_table, "job_lost")
    assert _stored(stack.jobs_table, "job_lost")
    assert [entry.answer for entry in faults.fired] == ["200"]


def test_nth_counts_calls_within_each_invocation_of_the_function_only(
    stack: MotoStack, faults: AwsFaults
) -> None:
    fault = faults.arm(FaultKind.THROTTLE, "dynamodb.PutItem", function="worker", nth=2)
    _put(stack.jobs_table, "job_a")  # outside any invocation: the test's own call
    with faults.invocation("api"):
        _put(stack.jobs_table, "job_b")
        _put(stack.jobs_table, "job_c")  # another function's second call
    assert faults.unfired() == [fault]
    with faults.invocation("worker"):
        _put(stack.jobs_table, "job_d")
        with pytest.raises(ClientError):
            _put(stack.jobs_table, "job_e")
    assert [(entry.function, entry.occurrence) for entry in faults.fired] == [("worker", 2)]
    assert not _stored(stack.jobs_table, "job_e")
    assert faults.unfired() == []


def test_a_key_reused_after_the_retention_gives_the_new_jobs_webhook_an_id_of_its_own(
    make_world: Any,
) -> None:
    """Hunt 308: the new job took the old one's id, and so its webhook-id, which the receiver
    may have seen an hour before (the old job's last attempt late in its retention): a receiver
    de-duplicating on it, as the README says, dropped the new job's result."""
    # Given a job with a webhook, submitted under a key, run and delivered
    [site] = [site for site in SITES if site.what == "accept write"]
    # (no fault armed; a path of its own, the receiver being the module's)
    world = dataclasses.replace(make_world(site, FaultKind.THROTTLE), hook_path="/hooks/reused-key")
    key = "reused-after-the-retention"
    job_id = new_job_id(ENTERPRISE["tenant_id"], key, 0)
    first, _ = world.submit("the first [[tokens:3]]", key)
    assert first.status == 202
    world.settle(job_id)
    [old] = world.receiver.requests_to(world.hook_path)
    # and its retention over (the item not yet deleted by TTL)
    world.harness.ddb.update_item(
        TableName=world.harness.stack.jobs_table,
        Key={"pk": {"S": job_id}},
        UpdateExpression="SET expires_at = :past",
        ExpressionAttributeValues={":past": {"N": str(int(time.time()) - 1)}},
    )
    # When the client reuses the key for a new job, which runs and is delivered
    second, _ = world.submit("the second [[tokens:3]]", key)
    assert (second.status, second.body["id"]) == (202, job_id)
    assert "idempotent-replayed" not in second.headers
    world.settle(job_id)
    # Then the receiver gets the new job's result under an id of its own, each verifying
    posts = world.receiver.requests_to(world.hook_path)
    assert len(posts) == 2
    new = posts[1]
    assert json.loads(new.body)["data"]["created_at"] != json.loads(old.body)["data"]["created_at"]
    assert new.headers["webhook-id"] != old.headers["webhook-id"]
    for post in (old, new):
        Webhook(world.secret).verify(post.body, post.headers)


# ---- the suite -------------------------------------------------------------------------------


# Every site meets the four faults any call can; a transaction (the tenant's share is written
# with the job) also meets conflicts with other transactions on the same items, and an object's
# read a body that breaks off.
_ONLY_AT = {
    FaultKind.TRANSACTION_CONFLICT: "dynamodb.TransactWriteItems",
    FaultKind.BODY_CUT: "s3.GetObject",
}
CASES = [
    (site, kind)
    for site in SITES
    for kind in FaultKind
    if _ONLY_AT.get(kind, site.operation) == site.operation
]


@pytest.mark.parametrize(("site", "kind"), CASES, ids=[f"{site.id}-{kind.value}" for site, kind in CASES])
def test_a_job_survives_an_aws_fault_at_every_call_site(site: Site, kind: FaultKind, make_world: Any) -> None:
    # Given one fault armed at one call site
    world: World = make_world(site, kind)

    def arm() -> Any:
        return world.faults.arm(kind, site.operation, function=site.function, nth=site.nth)

    # The cancel's write is the api's first transaction in its invocation, as the submit's is
    # in its own: armed once the submit is done.
    fault = None if site.cancel else arm()
    row = Row(site, kind)
    _TABLE.append(row)
    key = f"faults-{site.id}-{kind.value}"
    job_id = new_job_id(ENTERPRISE["tenant_id"], key, 0)
    event = EVENT_FOR_STATUS[site.expect]

    # When a client submits a job with a webhook (and cancels it, for the cancel site), and the
    # world plays on until the job and its webhook settle
    first, kept = world.submit(site.prompt, key)
    enqueued_at_submit = world.harness.total_count(world.lane_url)
    row.client = _summary(first, kept)
    if site.cancel:
        fault = arm()
        cancel_first, cancel_kept = world.cancel(job_id)
        row.client += f"; cancel {_summary(cancel_first, cancel_kept)}"
    world.settle(job_id)

    # (observed first, so the table holds the figures even when an assertion fails)
    job = world.harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE)
    provider_log = [call for call in world.provider_log() if call.job_id == job_id]
    posts = world.receiver.requests_to(world.hook_path)
    delivery = (job.body.get("webhook") or {}).get("delivery") or {}
    row.outcome = f"{job.body.get('status')}, webhook {delivery.get('status')}"
    row.recovery = world.recovery_summary()
    row.provider_calls = len(provider_log)
    row.webhook_posts = len(posts)

    # Then the fault really fired, once
    assert world.faults.still_attached(), "llmq's clients were replaced after arming"
    assert world.faults.unfired() == [], f"{fault.label} never fired: the case proves nothing"
    assert len(world.faults.fired_for(fault)) == fault.times

    # And the client got its job: 202, the id its key names, and one job exists
    assert kept.status == 202, kept.body
    assert kept.body["id"] == job_id
    assert world.harness.item_count() == 1
    if first.status >= 500:
        # Only a submit whose write was refused, or whose answer was lost for good, may fail:
        # a 503 problem with a stable code and Retry-After, and the client's retry found the job.
        assert (site.function, site.operation) in {
            ("api", "dynamodb.TransactWriteItems"),
            ("api", "s3.PutObject"),
        }
        assert kind is not FaultKind.APPLIED_RETRIED
        # (an accept applied with its answer lost is read back: it is the 202 below)
        assert not (site.operation == "dynamodb.TransactWriteItems" and kind is FaultKind.APPLIED_LOST)
        assert (first.status, first.code) == (503, "service_unavailable"), first.body
        assert "retry-after" in first.headers
    else:
        # The write was applied (or the enqueue alone failed): the first answer is the 202
        assert first.status == 202, first.body
        assert "idempotent-replayed" not in first.headers
    if site.function == "api" and kind in (FaultKind.APPLIED_RETRIED, FaultKind.APPLIED_LOST):
        assert enqueued_at_submit >= 1, "a submit answered 202 must have enqueued its job"
    if site.cancel:
        _assert_canceled_once(cancel_first, cancel_kept, kind)

    # And the job ended as it should, the provider called once (after any failures the prompt
    # asked for), and never for a canceled job
    assert job.status == 200
    assert job.body["status"] == site.expect.value, job.body
    if site.expect is JobStatus.SUCCEEDED:
        assert len(job.body["result"]["output"].split()) > 0
    assert len(provider_log) == site.provider_calls
    assert [call.status for call in provider_log].count(200) == (site.expect is JobStatus.SUCCEEDED)

    # And the receiver got one webhook id for the job, each POST verifying
    assert len(posts) >= 1 + site.receiver_failures, "the webhook did not reach the receiver"
    assert {post.headers["webhook-id"] for post in posts} == {record_webhook_id(world.stored(job_id), event)}
    for post in posts:
        payload = Webhook(world.secret).verify(post.body, post.headers)
        assert (payload["type"], payload["data"]["id"]) == (event.value, job_id)
    assert delivery.get("status") == "delivered"

    # And nothing is left behind in any queue, nor in the tenant's share: its one job ended,
    # so it holds no slot and no active job (a fault that gave either back twice or never
    # would show here)
    assert world.harness.total_count(world.lane_url) == 0
    assert world.harness.total_count(world.webhook_queue_url) == 0
    share = ShareRepository(world.harness.stack.jobs_table, dynamodb=aws.client("dynamodb")).get(
        ENTERPRISE["tenant_id"]
    )
    assert (share.running, share.active) == (0, 0), share

    # And a job waited for its lease to lapse only when the worker could not know it held it
    if "lease lapsed" in world.recovery:
        assert (site.function, site.operation, site.nth, kind) in LEASE_LAPSE_EXPECTED, (
            f"the worker knew it held the lease after {fault.label}, yet the job sat `running` "
            "until the lease lapsed and the reconciler handed it on"
        )
    row.passed = True


def _assert_canceled_once(first: ApiReply, kept: ApiReply, kind: FaultKind) -> None:
    """200 with the canceled job; after a lost answer the retry finds it canceled already, and
    is answered so too (hunt 322: not a 409 "already finished", which says the job ran)."""
    if first.status >= 500:
        assert kind is not FaultKind.APPLIED_RETRIED
        assert (first.status, first.code) == (503, "service_unavailable"), first.body
    assert kept.status == 200, kept.body
    assert kept.body["status"] == "canceled"


def _summary(first: ApiReply, kept: ApiReply) -> str:
    def one(reply: ApiReply) -> str:
        return f"{reply.status}{' replayed' if reply.headers.get('idempotent-replayed') else ''}"

    return one(first) if first is kept else f"{one(first)} → {one(kept)}"
