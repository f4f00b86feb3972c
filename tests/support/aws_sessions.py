"""Clients that act as a given principal against a moto server, for the IAM fidelity tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import httpx

from llmq_sandbox.iam import AwsCredentials, make_moto_authorize_like_iam, set_enforcement
from tests.conftest import REGION

TRUSTS_LAMBDA = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ],
}


def client_as(credentials: AwsCredentials, service: str, endpoint_url: str, **kwargs: Any) -> Any:
    session = boto3.session.Session(
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        aws_session_token=credentials.session_token,
        region_name=REGION,
    )
    return session.client(service, endpoint_url=endpoint_url, **kwargs)  # type: ignore[call-overload]


@contextmanager
def iam_checking_moto_server() -> Iterator[str]:
    """A moto server of this process, with IAM checked once the test says so (`set_enforcement`).

    Its state starts and ends empty: moto's backends are this process's, so under xdist a
    module that ran before in the same worker would otherwise leave its users and roles behind
    (CreateUser of the operator then fails with EntityAlreadyExists).
    """
    from moto.server import ThreadedMotoServer

    make_moto_authorize_like_iam()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://localhost:{port}"
    httpx.post(f"{endpoint}/moto-api/reset")
    set_enforcement(endpoint, enforced=False)
    try:
        yield endpoint
    finally:
        set_enforcement(endpoint, enforced=False)  # moto's settings are this process's
        httpx.post(f"{endpoint}/moto-api/reset")
        server.stop()
