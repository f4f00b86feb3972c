"""Reconciler on in-memory stores: lost messages re-sent up to the lane's deficit, crashed
workers' jobs recovered, deadlines enforced, pending webhooks re-sent."""

from __future__ import annotations

from llmq.config import LlmqConfig
from llmq.models import DeliveryStatus, ErrorCode, JobStatus, WebhookEvent
from llmq.reconcile import Reconciler
from tests.support.stores import Clock, InMemoryJobs, InMemoryQueues, job_record

WEBHOOK = "https://hooks.example.com/llmq"
# Far enough past creation that every queued job is stale.
LATER_SECONDS = 3600


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.config = LlmqConfig()
        self.jobs = InMemoryJobs(self.config, self.clock)
        self.queues = InMemoryQueues()
        self.reconciler = Reconciler(self.jobs, self.queues, self.config)

    def queued(self, job_id: str, created_ago_seconds: int, **changes: object) -> None:
        now = self.jobs.now_ms()
        record = job_record(now, job_id, created_ms=now - created_ago_seconds * 1000, **changes)
        self.jobs.add(record, due_ms=record.created_ms + self.config.reconciler.stale_queued_seconds * 1000)


def test_stale_queued_jobs_are_re_sent_only_up_to_the_lanes_message_deficit() -> None:
    # Given three stale queued jobs in lane high, whose queue still holds one message
    world = World()
    for index, age in enumerate((900, 1200, 1500)):
        world.queued(f"job_{index}", age)
    world.queues.lanes["high"].append("job_0")
    # When the reconciler runs
    report = world.reconciler.run()
    # Then two messages were lost: the two most overdue jobs get one each, the third waits
    assert world.queues.lanes["high"] == ["job_0", "job_2", "job_1"]
    assert (report.requeued, report.waiting) == (["job_2", "job_1"], ["job_0"])


def test_a_backlog_is_left_alone() -> None:
    # Given stale queued jobs that each still have their message (a slow lane, not a loss)
    world = World()
    for index in range(3):
        world.queued(f"job_{index}", 900)
        world.queues.lanes["high"].append(f"job_{index}")
    # When the reconciler runs
    report = world.reconciler.run()
    # Then no message is added
    assert len(world.queues.lanes["high"]) == 3
    assert report.requeued == []


def test_a_re_sent_job_is_not_re_sent_again_at_the_next_run() -> None:
    # Given a stale queued job whose message was lost, re-sent by one run
    world = World()
    world.queued("job_1", 900)
    world.reconciler.run()
    world.queues.lanes["high"].clear()  # lost again
    # When the reconciler runs again a minute later
    world.clock.advance(60)
    report = world.reconciler.run()
    # Then it waits out the stale threshold before sending another
    assert (report.examined, world.queues.lanes["high"]) == (0, [])


def test_a_running_job_whose_lease_lapsed_long_ago_gets_a_new_message() -> None:
    # Given a job whose worker crashed: its lease lapsed and the grace has passed
    world = World()
    now = world.jobs.now_ms()
    world.jobs.add(
        job_record(
            now, status=JobStatus.RUNNING, attempts=1, lease_owner="crashed", lease_expires_ms=now - 600_000
        ),
        due_ms=now - 1,
    )
    # When the reconciler runs
    report = world.reconciler.run()
    # Then a new message lets a worker take it over
    assert report.recovered == ["job_1"]
    assert world.queues.lanes["high"] == ["job_1"]


def test_a_queued_job_past_its_deadline_is_expired_and_its_client_told() -> None:
    # Given a queued job whose deadline passed while it waited
    world = World()
    now = world.jobs.now_ms()
    world.queued(
        "job_1",
        900,
        deadline_ms=now - 1,
        webhook_url=WEBHOOK,
        webhook_events=[WebhookEvent.EXPIRED],
    )
    # When the reconciler runs
    report = world.reconciler.run()
    # Then the job is expired with deadline_exceeded and its webhook queued, not re-sent to a lane
    job = world.jobs.records["job_1"]
    assert report.expired == ["job_1"]
    assert job.status is JobStatus.EXPIRED
    assert job.error is not None and job.error.code is ErrorCode.DEADLINE_EXCEEDED
    assert world.queues.webhooks == [("job_1", WebhookEvent.EXPIRED)]
    assert world.queues.lanes["high"] == []


def test_a_pending_webhook_is_sent_again() -> None:
    # Given a finished job whose webhook message was lost
    world = World()
    now = world.jobs.now_ms()
    world.jobs.add(
        job_record(
            now,
            status=JobStatus.FAILED,
            webhook_url=WEBHOOK,
            webhook_events=[WebhookEvent.FAILED],
            delivery_status=DeliveryStatus.PENDING,
        ),
        due_ms=now - 1,
    )
    # When the reconciler runs
    report = world.reconciler.run()
    # Then the failed event goes out again
    assert report.webhooks == ["job_1"]
    assert world.queues.webhooks == [("job_1", WebhookEvent.FAILED)]


def test_unknown_lane_depths_hold_back_stale_queued_jobs_but_not_the_rest() -> None:
    # Given a stale queued job, a pending webhook, and a queue that will not say its depth
    world = World()
    world.queued("job_1", 900)
    now = world.jobs.now_ms()
    world.jobs.add(
        job_record(
            now,
            "job_2",
            status=JobStatus.SUCCEEDED,
            webhook_url=WEBHOOK,
            webhook_events=[WebhookEvent.SUCCEEDED],
            delivery_status=DeliveryStatus.PENDING,
        ),
        due_ms=now - 1,
    )
    world.queues.unavailable.add("lane_depth")
    # When the reconciler runs
    report = world.reconciler.run()
    # Then nothing is re-sent to the lane, while the webhook still goes out
    assert world.queues.lanes["high"] == []
    assert (report.waiting, report.webhooks) == (["job_1"], ["job_2"])


def test_a_lapsed_lease_is_recovered_in_the_next_run_whatever_the_backlog_of_stale_jobs() -> None:
    """DESIGN §3.11: a crashed worker's slot comes back within one run after its lease."""
    # Given more stale queued jobs than a run examines, all more overdue than a lapsed lease
    world = World()
    config = world.config.model_copy(
        update={"reconciler": world.config.reconciler.model_copy(update={"max_items_per_run": 5})}
    )
    reconciler = Reconciler(world.jobs, world.queues, config)
    for index in range(20):
        world.queued(f"job_q{index}", 3600)
        world.queues.lanes["high"].append(f"job_q{index}")
    now = world.jobs.now_ms()
    world.jobs.add(
        job_record(
            now,
            "job_crashed",
            status=JobStatus.RUNNING,
            attempts=1,
            lease_owner="gone",
            lease_expires_ms=now - 1,
        ),
        due_ms=now - 1,
    )
    # When the reconciler runs once
    report = reconciler.run()
    # Then the crashed job is recovered: queued again, its slot given back, a message sent
    assert report.recovered == ["job_crashed"]
    assert world.jobs.records["job_crashed"].status is JobStatus.QUEUED
    assert "job_crashed" not in world.jobs.shares["ten_acme"].holders["high"]
    assert report.examined == 5
