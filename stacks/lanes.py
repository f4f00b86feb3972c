"""The priority lanes: for each configured lane an SQS queue and its dead-letter queue."""

from __future__ import annotations

from dataclasses import dataclass

import aws_cdk as cdk
import jsii
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from llmq.config import LaneConfig, LlmqConfig, id_part
from stacks.template import LANE_TAG

# The longest SQS allows; a DLQ message is evidence, kept as long as possible.
DLQ_RETENTION = cdk.Duration.days(14)
MAX_QUEUE_RETENTION_SECONDS = 14 * 86_400
# What an SQS event source mapping does with the function's role on its queue, whatever the
# handler calls itself (Lambda developer guide, "Using Lambda with Amazon SQS": the execution
# role needs ReceiveMessage, DeleteMessage and GetQueueAttributes).
EVENT_SOURCE_ACTIONS = ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")


def consume(
    function: lambda_.Function,
    queue: sqs.IQueue,
    *,
    batch_size: int,
    max_concurrency: int,
    max_batching_window: cdk.Duration | None = None,
    also: tuple[str, ...] = (),
) -> lambda_.EventSourceMapping:
    """An SQS event source mapping, and only the grants it needs plus the handler's own `also`.

    Not `SqsEventSource`: it grants GetQueueUrl and ChangeMessageVisibility to every consumer,
    whether or not its handler calls them.
    """
    queue.grant(function, *EVENT_SOURCE_ACTIONS, *also)
    return function.add_event_source_mapping(
        f"Source{queue.node.id}",
        event_source_arn=queue.queue_arn,
        batch_size=batch_size,
        max_batching_window=max_batching_window,
        max_concurrency=max_concurrency,
        report_batch_item_failures=True,
    )


def grant_send(grantee: iam.IGrantable, *queues: sqs.IQueue) -> None:
    """SendMessage only: not the GetQueueUrl and GetQueueAttributes of `grant_send_messages`."""
    for queue in queues:
        queue.grant(grantee, "sqs:SendMessage")


# A lane, tier or function name as a CloudFormation id part: `short-batch` -> `ShortBatch`.
pascal = id_part


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


@jsii.implements(lambda_.IDestination)
class SendOnlyQueueDestination:
    """An asynchronous invocation's destination queue, granted SendMessage only: what Lambda
    does with the function's role to deliver the record. CDK's SqsDestination also grants
    GetQueueUrl and GetQueueAttributes, which nothing calls."""

    def __init__(self, queue: sqs.IQueue) -> None:
        self.queue = queue

    def bind(
        self, _scope: Construct, fn: lambda_.IFunction, *, type: lambda_.DestinationType | None = None
    ) -> lambda_.DestinationConfig:
        grant_send(fn, self.queue)
        return lambda_.DestinationConfig(destination=self.queue.queue_arn)


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
        # Lane dead letters no function can settle (naming no job, or a batch that keeps crashing
        # its workers after llmq gave up on it): the dead-letter function sets them aside here,
        # where an operator sees them (`llmq dlq list --queue poison --peek N`) and nothing
        # takes them again, rather than hiding them in their DLQ for 12 hours at a time.
        self.poison = sqs.Queue(
            self,
            "Poison",
            retention_period=DLQ_RETENTION,
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
        cdk.Validations.of(self.poison).acknowledge(
            cdk.Acknowledgment(
                id="AwsSolutions::AwsSolutions-SQS3",
                reason="This queue is itself the dead end: lane dead letters that no function can "
                "settle wait here for an operator. Nothing consumes it, so nothing could redrive "
                "from it.",
            )
        )

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
