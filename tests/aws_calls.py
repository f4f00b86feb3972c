"""The catalogue of AWS calls each Lambda function makes, and the IAM action each call needs.

Two suites share it, so that a call and its grant cannot drift apart:

- `tests/integration` *observes*. Every handler the integration tests invoke (through
  `tests.integration.harness.load_handler`) runs with a botocore hook that records each API
  call (and each presigned URL) as (function, `service:Operation`, resource). The resource is
  named by where the function learnt it, not by its value: `env:LLMQ_JOBS_TABLE` (a variable
  of the function's environment, `/index/<name>` for an index, `/*` for an object in a
  bucket), or `event_source` (the queue the triggering event came from). A call missing from
  `tests/aws_calls.json` fails the test that made it, at teardown, with the line to add; run
  `make aws-calls` (LLMQ_RECORD_AWS_CALLS=1) to add what the suite observed.
- `tests/infra` *checks*. For every catalogued call it resolves the resource in the
  synthesized template (the variable's Ref, or the function's event source mappings) and
  requires an Allow statement, attached to that function's role, whose action and resource
  cover it.

So a new call cannot silently go unchecked: it either is in the catalogue, and then its
grant is checked, or it fails the integration suite. An entry for a call that is no longer
made only demands a grant that is no longer needed; remove it by hand when you remove the
call. A code path no integration test drives is not observed at all: every function must
at least appear in the catalogue (the infra test checks that), and tests/integration/
test_entry_points.py drives the paths the other suites reach only below the handler.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATALOGUE_PATH = Path(__file__).resolve().with_name("aws_calls.json")
RECORD_ENV_VAR = "LLMQ_RECORD_AWS_CALLS"
EVENT_SOURCE = "event_source"
ENV_PREFIX = "env:"
ANY_RESOURCE = "*"

# Where the IAM action differs from `service:Operation`. Transactions are authorised per item,
# by the action of the single-item operation each one performs.
_IAM_ACTIONS: dict[str, tuple[str, ...]] = {
    "s3:HeadObject": ("s3:GetObject",),
    "s3:ListObjectsV2": ("s3:ListBucket",),
    "s3:ListObjects": ("s3:ListBucket",),
    "s3:HeadBucket": ("s3:ListBucket",),
    "s3:DeleteObjects": ("s3:DeleteObject",),
    "s3:CopyObject": ("s3:PutObject",),
    "s3:CreateMultipartUpload": ("s3:PutObject",),
    "s3:UploadPart": ("s3:PutObject",),
    "s3:CompleteMultipartUpload": ("s3:PutObject",),
    "sqs:SendMessageBatch": ("sqs:SendMessage",),
    "sqs:DeleteMessageBatch": ("sqs:DeleteMessage",),
    "sqs:ChangeMessageVisibilityBatch": ("sqs:ChangeMessageVisibility",),
    "dynamodb:TransactWriteItems/Put": ("dynamodb:PutItem",),
    "dynamodb:TransactWriteItems/Update": ("dynamodb:UpdateItem",),
    "dynamodb:TransactWriteItems/Delete": ("dynamodb:DeleteItem",),
    "dynamodb:TransactWriteItems/ConditionCheck": ("dynamodb:ConditionCheckItem",),
    "dynamodb:TransactGetItems/Get": ("dynamodb:GetItem",),
}

# What an SQS event source mapping does with the function's role on its queue, whether or not
# the handler calls SQS itself (Lambda developer guide, "Using Lambda with Amazon SQS").
EVENT_SOURCE_MAPPING_ACTIONS = ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")


@dataclass(frozen=True, order=True)
class AwsCall:
    function: str
    operation: str
    resource: str

    def __str__(self) -> str:
        return f"{self.function}: {self.operation} on {self.resource}"


def iam_actions(operation: str) -> tuple[str, ...]:
    """The IAM actions a call needs: `s3:HeadObject` needs `s3:GetObject`."""
    return _IAM_ACTIONS.get(operation, (operation,))


def load_catalogue(path: Path = CATALOGUE_PATH) -> set[AwsCall]:
    """{function: {operation: [resource, ...]}} from the JSON file, as a set of calls."""
    text = path.read_text() if path.exists() else ""
    document = json.loads(text) if text.strip() else {}
    return {
        AwsCall(function, operation, resource)
        for function, operations in document.items()
        if not function.startswith("_")
        for operation, resources in operations.items()
        for resource in resources
    }


def render_catalogue(calls: Iterable[AwsCall]) -> str:
    document: dict[str, Any] = {
        "_about": "See tests/aws_calls.py; `make aws-calls` adds what the suite observes."
    }
    for call in sorted(set(calls)):
        document.setdefault(call.function, {}).setdefault(call.operation, []).append(call.resource)
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
