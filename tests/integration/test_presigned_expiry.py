"""Presigned result URLs live no longer than the credentials that signed them.

"Download and upload objects with presigned URLs" (S3 user guide,
https://docs.aws.amazon.com/AmazonS3/latest/userguide/using-presigned-url.html), expiration
section: a URL signed with temporary credentials (an IAM role's, as a Lambda function's) stops
working when those credentials expire, even if its ExpiresIn is later. moto, as the sandbox
corrects it (llmq_sandbox/iam.py), refuses it then, as S3 does; llmq promises only what holds:
a short life, never past the signer's credentials, stated in `result_url_expires_at`, and a
fresh URL on every GET of the job.

One moto server for the module, enforcing IAM: an operator, a role allowed to read the
payload bucket, and a result too large to inline.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from llmq.config import LlmqConfig
from llmq.models import JobStatus
from llmq.offload import Offload
from llmq.payloads import RESULT_URL_SECONDS, PayloadStore
from llmq_sandbox.iam import (
    UNCHECKED,
    AwsCredentials,
    assume_roles,
    create_operator,
    expire_session,
    set_enforcement,
)
from tests.support.aws_sessions import TRUSTS_LAMBDA, client_as, iam_checking_moto_server
from tests.support.stores import job_record

REGION = "us-east-1"
BUCKET = "payloads"
RESULT_KEY = "results/job_big/owner.json"
RESULT = {
    "output": "word " * 400,
    "finish_reason": "stop",
    "usage": {"input_tokens": 1, "output_tokens": 400},
}
READS_PAYLOADS = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:HeadObject"],
            "Resource": f"arn:aws:s3:::{BUCKET}/*",
        }
    ],
}


@dataclass
class Moto:
    endpoint_url: str
    operator: AwsCredentials
    role_arn: str

    def session(self, duration_seconds: int) -> AwsCredentials:
        """A new session of the role, as the Lambda service gives a new environment."""
        set_enforcement(self.endpoint_url, enforced=False)
        try:
            sts = _client(self.endpoint_url, "sts", self.operator)
            return assume_roles(sts, {"api": (self.role_arn, "Llmq-Api")}, duration_seconds)["api"]
        finally:
            set_enforcement(self.endpoint_url, enforced=True)


def _client(endpoint_url: str, service: str, credentials: AwsCredentials) -> Any:
    return client_as(credentials, service, endpoint_url, config=Config(signature_version="s3v4"))


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with iam_checking_moto_server() as endpoint:
        operator = create_operator(_client(endpoint, "iam", UNCHECKED))
        s3 = _client(endpoint, "s3", operator)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key=RESULT_KEY, Body=json.dumps(RESULT).encode())
        iam = _client(endpoint, "iam", operator)
        role = iam.create_role(RoleName="api", AssumeRolePolicyDocument=json.dumps(TRUSTS_LAMBDA))["Role"]
        iam.put_role_policy(RoleName="api", PolicyName="reads", PolicyDocument=json.dumps(READS_PAYLOADS))
        set_enforcement(endpoint, enforced=True)
        yield Moto(endpoint, operator, role["Arn"])


def _signer_client(moto: Moto, credentials: AwsCredentials, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An S3 client as a function whose runtime says when its credentials expire
    (AWS_CREDENTIAL_EXPIRATION, which botocore reads, as it reads a container endpoint's)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials.secret_access_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", credentials.session_token or "")
    assert credentials.expiration is not None
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", credentials.expiration.isoformat())
    return boto3.session.Session(region_name=REGION).client(
        "s3",
        endpoint_url=moto.endpoint_url,
        config=Config(signature_version="s3v4"),
    )


def _served(url: str) -> httpx.Response:
    # (httpx's default 5 s is too short for a moto server on a busy 2-core machine)
    return httpx.get(url, timeout=30)


def _s3_error_code(response: httpx.Response) -> str:
    start, end = response.text.find("<Code>"), response.text.find("</Code>")
    return response.text[start + len("<Code>") : end]


def _url_expiry(url: str) -> datetime.datetime:
    query = parse_qs(urlparse(url).query)
    signed = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    return signed + datetime.timedelta(seconds=int(query["X-Amz-Expires"][0]))


def test_a_presigned_url_stops_working_when_its_signers_session_expires(moto: Moto) -> None:
    """S3 user guide, "Download and upload objects with presigned URLs",
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/using-presigned-url.html: a URL signed
    with a role's temporary credentials expires with the role session, even if its own
    expiration is later; S3 then answers ExpiredToken (400), as to any request signed with them."""
    # Given a URL signed by a role session, promising an hour
    credentials = moto.session(duration_seconds=3600)
    s3 = _client(moto.endpoint_url, "s3", credentials)
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": RESULT_KEY}, ExpiresIn=3600
    )
    assert _served(url).status_code == 200
    # When the session expires
    expire_session(credentials.access_key_id)
    # Then the URL is refused with ExpiredToken, and so is a call signed with the same credentials
    refused = _served(url)
    assert (refused.status_code, _s3_error_code(refused)) == (400, "ExpiredToken")
    with pytest.raises(ClientError) as call:
        s3.get_object(Bucket=BUCKET, Key=RESULT_KEY)
    assert call.value.response["Error"]["Code"] == "ExpiredToken"
    # And a service of the JSON protocol refuses them as AWS's common errors say: 403
    # ExpiredTokenException (https://docs.aws.amazon.com/awsconsolehelpdocs/latest/gsg/common-errors.html)
    with pytest.raises(ClientError) as call:
        _client(moto.endpoint_url, "dynamodb", credentials).list_tables()
    error = call.value.response
    assert (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]) == (
        403,
        "ExpiredTokenException",
    )


def test_a_presigned_url_past_its_own_expiry_is_refused(moto: Moto) -> None:
    """S3 user guide, "Download and upload objects with presigned URLs",
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/using-presigned-url.html: a URL works
    up to its expiration date and time; after it S3 refuses it (403 AccessDenied, "Request has
    expired")."""
    credentials = moto.session(duration_seconds=3600)
    s3 = _client(moto.endpoint_url, "s3", credentials)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": RESULT_KEY}, ExpiresIn=3)
    assert _served(url).status_code == 200
    time.sleep(4.1)  # past X-Amz-Date (whole seconds) + 3 s
    refused = _served(url)
    assert (refused.status_code, _s3_error_code(refused)) == (403, "AccessDenied")
    assert "Request has expired" in refused.text


def test_a_result_url_promises_no_more_than_its_signers_credentials_and_a_fresh_get_gives_a_working_one(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose result is in S3 and too large to inline, read by a function whose
    # credentials expire in 15 minutes, sooner than a URL could otherwise live
    config = LlmqConfig.model_validate({"limits": {"max_inline_result_bytes": 1024}})
    now_ms = int(time.time() * 1000)
    record = job_record(now_ms, "job_big", status=JobStatus.SUCCEEDED, input=None, result_ref=RESULT_KEY)
    first = moto.session(duration_seconds=900)
    assert first.expiration is not None
    offload = Offload(PayloadStore(BUCKET, s3=_signer_client(moto, first, monkeypatch)), config)

    # When the API answers GET /v1/jobs/{id}
    job = offload.load_result(record).to_job()

    # Then it gives a presigned URL that works, and says until when: no later than the URL's
    # own expiry, nor than the signer's credentials'
    assert job.result is None and job.result_url is not None and job.result_url_expires_at is not None
    stated = datetime.datetime.fromisoformat(job.result_url_expires_at)
    assert stated <= _url_expiry(job.result_url)
    assert stated <= first.expiration
    assert _served(job.result_url).json() == RESULT

    # When the signer's credentials expire, Then the old URL stops working, as on AWS
    expire_session(first.access_key_id)
    assert _s3_error_code(_served(job.result_url)) == "ExpiredToken"

    # And a fresh GET, answered with the new credentials Lambda gives an environment, gives a
    # URL that works
    second = moto.session(duration_seconds=900)
    offload = Offload(PayloadStore(BUCKET, s3=_signer_client(moto, second, monkeypatch)), config)
    fresh = offload.load_result(record).to_job()
    assert fresh.result_url is not None and fresh.result_url != job.result_url
    assert _served(fresh.result_url).json() == RESULT


def test_without_a_known_credential_expiry_the_url_lives_the_short_default(moto: Moto) -> None:
    # Given a signer whose credentials do not say when they expire (as Lambda's variables)
    credentials = moto.session(duration_seconds=3600)
    store = PayloadStore(BUCKET, s3=_client(moto.endpoint_url, "s3", credentials))
    # When it presigns, Then the URL and the stated expiry are the short default
    before_ms = int(time.time() * 1000)
    url, expires_ms = store.presigned_url(RESULT_KEY)
    assert int(parse_qs(urlparse(url).query)["X-Amz-Expires"][0]) == RESULT_URL_SECONDS
    assert (
        before_ms - 1000 + RESULT_URL_SECONDS * 1000
        <= expires_ms
        <= int(time.time() * 1000) + RESULT_URL_SECONDS * 1000
    )


def test_an_upload_url_takes_a_put_of_the_size_it_was_signed_for_and_nothing_else(moto: Moto) -> None:
    """S3 checks a presigned URL's signature against the request, signed headers included
    (SigV4 query authentication, https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html):
    an upload URL signs its Content-Length, so the bucket never takes more than was asked for."""
    # Given an upload URL for a file of 19 bytes
    store = PayloadStore(BUCKET, s3=_client(moto.endpoint_url, "s3", moto.operator))
    data = b'{"custom_id": "a"}\n'
    key = "uploads/ten_a/upl_signed.jsonl"
    url = store.presigned_put(key, 600, len(data)).url
    # When a larger or a smaller file is PUT to it, Then S3 refuses it and stores nothing
    for body in (data + b" " * 4096, data[:-1]):
        refused = httpx.put(url, content=body)
        assert (refused.status_code, _s3_error_code(refused)) == (403, "SignatureDoesNotMatch")
        assert store.stat(key) is None
    # And the URL is good for that PUT only: not a GET, not with its query changed
    assert _served(url).status_code == 403
    assert httpx.put(url.replace("upl_signed", "upl_other"), content=data).status_code == 403
    # Nor without its signature (or any other of its query's parameters), nor with an x-amz-*
    # header it did not sign, nor as a chunked body whose length it cannot check
    for name in ("X-Amz-Signature", "X-Amz-Date", "X-Amz-Expires"):
        stripped = "&".join(part for part in url.split("&") if not part.startswith(f"{name}="))
        refused = httpx.put(stripped, content=data + b" " * 4096)
        assert (refused.status_code, _s3_error_code(refused)) == (400, "AuthorizationQueryParametersError"), (
            name
        )
    refused = httpx.put(url, content=data, headers={"x-amz-acl": "public-read"})
    assert (refused.status_code, _s3_error_code(refused)) == (403, "AccessDenied")
    refused = httpx.put(url, content=iter([data]))
    assert (refused.status_code, _s3_error_code(refused)) == (501, "NotImplemented")
    assert store.stat(key) is None
    # While the file it was signed for is stored
    assert httpx.put(url, content=data).status_code == 200
    assert store.get(key) == data


def test_a_presigned_url_for_a_key_with_non_ascii_and_reserved_characters_is_checked_and_served(
    moto: Moto,
) -> None:
    # The signature check reads the path as the client percent-encoded it: a key S3 would
    # serve must be served here too, and the same URL with another key refused.
    store = PayloadStore(BUCKET, s3=_client(moto.endpoint_url, "s3", moto.operator))
    key = "uploads/ten_é/a b+c~(1)=é.jsonl"
    data = "ligne é\n".encode()
    url = store.presigned_put(key, 600, len(data)).url
    assert httpx.put(url, content=data).status_code == 200
    assert store.get(key) == data
    refused = httpx.put(url.replace("a%20b", "a%20c"), content=data)
    assert (refused.status_code, _s3_error_code(refused)) == (403, "SignatureDoesNotMatch")
