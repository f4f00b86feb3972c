"""The round a webhooks message carries in its message attribute (`llmq.queues.delivery_round_of`)."""

from __future__ import annotations

from typing import Any

import pytest

from llmq.models import WebhookEvent, WebhookMessage
from llmq.queues import DELIVERY_ROUND_ATTRIBUTE, delivery_round_of, webhook_message_body


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        # as ReceiveMessage spells it, and as Lambda's SQS event does
        ({DELIVERY_ROUND_ATTRIBUTE: {"DataType": "Number", "StringValue": "3"}}, 3),
        ({DELIVERY_ROUND_ATTRIBUTE: {"dataType": "Number", "stringValue": "2"}}, 2),
        # none, or one this version cannot read: the first round
        (None, 0),
        ({}, 0),
        ({"other": {"DataType": "String", "StringValue": "7"}}, 0),
        ({DELIVERY_ROUND_ATTRIBUTE: {"DataType": "Number", "StringValue": "-1"}}, 0),
        ({DELIVERY_ROUND_ATTRIBUTE: {"DataType": "Number", "StringValue": "1e3"}}, 0),
        ({DELIVERY_ROUND_ATTRIBUTE: {"DataType": "Number", "StringValue": "9" * 40}}, 0),
        ({DELIVERY_ROUND_ATTRIBUTE: "5"}, 0),
        # digits that are not ASCII (SQS takes them as a Number; int() refuses the first)
        ({DELIVERY_ROUND_ATTRIBUTE: {"DataType": "Number", "StringValue": "²"}}, 0),
        ({DELIVERY_ROUND_ATTRIBUTE: {"DataType": "Number", "StringValue": "١"}}, 0),
    ],
)
def test_a_messages_round_is_read_from_its_attribute(attributes: Any, expected: int) -> None:
    assert delivery_round_of(attributes) == expected


def test_the_body_never_carries_the_round() -> None:
    """A dispatcher before rounds refuses a body with a field it does not know (poison)."""
    message = WebhookMessage(job_id="job_1", event=WebhookEvent.SUCCEEDED, delivery_round=4)
    assert webhook_message_body(message) == '{"job_id":"job_1","event":"job.succeeded"}'


def test_a_body_with_a_field_this_version_does_not_know_is_read() -> None:
    """As a lane message: a newer version's message, or one in flight after a rollback."""
    body = '{"job_id":"job_1","event":"job.succeeded","added_later":{"x":1}}'
    assert WebhookMessage.model_validate_json(body).job_id == "job_1"
