"""The S3 repository for job inputs and results too large for a DynamoDB item (400 KB)."""

from __future__ import annotations

from typing import Any

from llmq import aws


class PayloadStore:
    def __init__(self, bucket: str, *, s3: Any) -> None:
        self.bucket = bucket
        self._s3 = aws.TranslatedClient(s3)

    def put(self, key: str, data: bytes) -> str:
        self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json")
        return key

    def get(self, key: str) -> bytes:
        body: bytes = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def size(self, key: str) -> int:
        return int(self._s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str:
        url: str = self._s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_seconds
        )
        return url


def payload_store(bucket: str | None, s3: Any) -> PayloadStore | None:
    """The store of a deployment with a payload bucket, else None. Pass a lazy client
    (`aws.lazy_client("s3")`): a deployment whose payloads all fit inline never builds it."""
    return PayloadStore(bucket, s3=s3) if bucket else None
