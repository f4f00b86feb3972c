"""The S3 repository for job inputs and results too large for a DynamoDB item (400 KB)."""

from __future__ import annotations

from typing import Any

from llmq import aws


class PayloadStore:
    def __init__(self, bucket: str) -> None:
        self.bucket = bucket

    @property
    def _s3(self) -> Any:
        return aws.TranslatedClient("s3")

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


def payload_store(bucket: str | None) -> PayloadStore | None:
    return PayloadStore(bucket) if bucket else None
