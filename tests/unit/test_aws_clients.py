"""The client factory: what a cold start pays for the clients a handler makes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import botocore.loaders
import pytest
from botocore import exceptions as botocore_errors

from llmq import aws


@pytest.fixture
def data_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """How often botocore reads each of its data files (not from a loader's cache)."""
    loads: Counter[str] = Counter()
    original = botocore.loaders.Loader.load_data_with_path

    def counted(self: Any, name: str) -> Any:
        loads[name] += 1
        return original(self, name)

    # Below the loader's per-instance cache: only a real read counts.
    monkeypatch.setattr(botocore.loaders.Loader, "load_data_with_path", counted)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    aws.reset_clients()
    yield loads
    aws.reset_clients()


def test_the_clients_of_one_environment_read_botocores_shared_data_once(data_loads: Counter[str]) -> None:
    # Given a cold environment, when it makes the clients a worker uses
    for service in ("dynamodb", "sqs", "s3", "secretsmanager"):
        aws.client(service)
    # Then the endpoint rules of every partition (about 1 MB of JSON) were read once, not per client
    assert data_loads["endpoints"] == 1
    # And each service's own model once
    assert data_loads["dynamodb/2012-08-10/service-2"] == 1


def test_forgetting_the_clients_forgets_their_session(data_loads: Counter[str]) -> None:
    # Given a client made before a mock started
    first = aws.client("sqs")
    # When the clients are reset (a test starting moto), then the next client is a new one on a
    # new session, which takes the handlers botocore has now
    aws.reset_clients()
    assert aws.client("sqs") is not first
    assert data_loads["endpoints"] == 2


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (botocore_errors.ReadTimeoutError(endpoint_url="https://x"), True),
        (botocore_errors.ConnectionClosedError(endpoint_url="https://x"), True),
        (botocore_errors.EndpointConnectionError(endpoint_url="https://x"), True),
        # A TLS failure and a proxy that refused are lost connections too, and a body cut off
        # while it is read, which botocore never retries.
        (botocore_errors.SSLError(endpoint_url="https://x", error="handshake"), True),
        (botocore_errors.ProxyConnectionError(proxy_url="http://proxy", error="refused"), True),
        (botocore_errors.ResponseStreamingError(error="IncompleteRead"), True),
        (botocore_errors.IncompleteReadError(actual_bytes=1, expected_bytes=2), True),
        # The request's own fault: sending it again changes nothing.
        (botocore_errors.ParamValidationError(report="bad"), False),
        (botocore_errors.NoCredentialsError(), False),
    ],
)
def test_a_lost_connection_is_transient_and_a_bad_request_is_not(error: Exception, transient: bool) -> None:
    assert aws.is_transient(error) is transient


@pytest.mark.parametrize("region", ["eu-west-1", "af-south-1", "us-east-1"])
def test_presigned_s3_urls_name_the_buckets_region(monkeypatch: pytest.MonkeyPatch, region: str) -> None:
    # A URL for the global endpoint is redirected (307) for a day after a bucket is created
    # outside us-east-1, and refused in regions launched since 2019: the integrator's upload or
    # download fails.
    monkeypatch.setenv("AWS_REGION", region)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    aws.reset_clients()
    try:
        s3 = aws.client("s3")
        for method in ("put_object", "get_object"):
            url = s3.generate_presigned_url(
                method, Params={"Bucket": "llmq-payloads-1x2y3z", "Key": "uploads/a"}
            )
            host = url.split("/")[2]
            expected = "s3.amazonaws.com" if region == "us-east-1" else f"s3.{region}.amazonaws.com"
            assert host == f"llmq-payloads-1x2y3z.{expected}", url
            assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    finally:
        aws.reset_clients()


def test_presigned_s3_urls_of_the_sandbox_point_at_its_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    aws.reset_clients()
    try:
        url = aws.client("s3").generate_presigned_url(
            "get_object", Params={"Bucket": "llmq-payloads", "Key": "results/a"}
        )
        assert url.startswith("http://127.0.0.1:4566/llmq-payloads/results/a?"), url
    finally:
        aws.reset_clients()
