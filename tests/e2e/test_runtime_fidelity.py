"""Through the sandbox: an API answer that would not fit in a Lambda response."""

from __future__ import annotations

import pytest

from llmq.models import JobResult
from tests.e2e.conftest import SandboxUnderTest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def test_a_result_that_escapes_past_6_mb_is_not_a_502(sandbox: SandboxUnderTest) -> None:
    """Regression: a 3.9 MB S3-held result made of quotes (under the 4 MB inline limit) is
    7.8 MB once the runtime serializes the API's response, whose body is a JSON string; a
    Lambda response holds 6 MB, so API Gateway answered 502. The sandbox now enforces that
    limit, and GET answers with the presigned URL instead.
    AWS: "Lambda quotas" (Invocation payload, 6 MB each for request and response),
    https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html"""
    with sandbox.api() as client:
        job_id = client.post("/v1/jobs", json={"prompt": "hello"}).json()["id"]
    assert sandbox.wait_terminal(job_id)["status"] == "succeeded"
    # What a large result leaves behind: the item points at S3 (as the operator, who may).
    outputs = sandbox.stack_outputs()
    key = f"results/{job_id}/escaping.json"
    sandbox.aws("s3").put_object(
        Bucket=outputs["PayloadBucketName"], Key=key, Body=JobResult(output='"' * 1_950_000).model_dump_json()
    )
    sandbox.aws("dynamodb").update_item(
        TableName=outputs["JobsTableName"],
        Key={"pk": {"S": job_id}},
        UpdateExpression="REMOVE #result SET result_ref = :key",
        ExpressionAttributeNames={"#result": "result"},
        ExpressionAttributeValues={":key": {"S": key}},
    )
    with sandbox.api() as client:
        response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text[:500]
    job = response.json()
    assert job["result"] is None and "X-Amz-Signature" in job["result_url"]
