"""The priority lanes: for each configured lane an SQS queue and its dead-letter queue."""

from __future__ import annotations

from dataclasses import dataclass

import aws_cdk as cdk
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq.config import LaneConfig, LlmqConfig
from stacks.template import LANE_TAG

# The longest SQS allows; a DLQ message is evidence, kept as long as possible.
DLQ_RETENTION = cdk.Duration.days(14)
MAX_QUEUE_RETENTION_SECONDS = 14 * 86_400


def pascal(name: str) -> str:
    """A lane or function name as a CloudFormation-friendly id part: `short-batch` -> `ShortBatch`."""
    return "".join(part.capitalize() for part in name.replace("_", "-").split("-"))


def build_queue_pair(
    scope: Construct,
    construct_id: str,
    *,
    visibility_timeout_seconds: int,
    dlq_visibility_timeout_seconds: int,
    max_receive_count: int,
    retention_seconds: int,
) -> tuple[sqs.Queue, sqs.Queue]:
    """A queue that redrives to its own DLQ after `max_receive_count` receives."""
    dlq = sqs.Queue(
        scope,
        f"{construct_id}Dlq",
        retention_period=DLQ_RETENTION,
        visibility_timeout=cdk.Duration.seconds(dlq_visibility_timeout_seconds),
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
    )
    queue = sqs.Queue(
        scope,
        construct_id,
        visibility_timeout=cdk.Duration.seconds(visibility_timeout_seconds),
        retention_period=cdk.Duration.seconds(max(60, min(retention_seconds, MAX_QUEUE_RETENTION_SECONDS))),
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        dead_letter_queue=sqs.DeadLetterQueue(queue=dlq, max_receive_count=max_receive_count),
    )
    return queue, dlq


@dataclass(frozen=True)
class Lane:
    config: LaneConfig
    queue: sqs.Queue
    dlq: sqs.Queue


class LanesConstruct(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: LlmqConfig) -> None:
        super().__init__(scope, construct_id)
        self.lanes: dict[str, Lane] = {}
        for lane in config.lanes:
            queue, dlq = build_queue_pair(
                self,
                pascal(lane.name),
                # AWS guidance: at least six times the consuming function's timeout.
                visibility_timeout_seconds=config.lane_visibility_timeout_seconds,
                # The dead-letter function consumes the DLQs with the API's sizing.
                dlq_visibility_timeout_seconds=6 * config.api.timeout_seconds,
                max_receive_count=config.max_receive_count,
                # A message outliving its job's retention would only find the job gone.
                retention_seconds=config.retention_seconds,
            )
            # The sandbox and the tests find a lane's queues by this tag, not by logical id.
            cdk.Tags.of(queue).add(LANE_TAG, lane.name)
            cdk.Tags.of(dlq).add(LANE_TAG, lane.name)
            self.lanes[lane.name] = Lane(config=lane, queue=queue, dlq=dlq)

    @property
    def queues(self) -> list[sqs.Queue]:
        return [lane.queue for lane in self.lanes.values()]

    @property
    def dlqs(self) -> list[sqs.Queue]:
        return [lane.dlq for lane in self.lanes.values()]

    def queue_urls_json(self) -> str:
        """LLMQ_LANE_QUEUE_URLS: `{lane: queue_url}` as a JSON string built from tokens."""
        urls = {name: lane.queue.queue_url for name, lane in self.lanes.items()}
        return cdk.Stack.of(self).to_json_string(urls)
