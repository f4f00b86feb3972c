"""The S3 repository for job inputs and results too large for a DynamoDB item (400 KB)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple

from botocore.exceptions import ClientError

from llmq import aws
from llmq.errors import StoreUnavailable

# How long a result URL works at most. A presigned URL stops working when the credentials
# that signed it expire, whatever its ExpiresIn ("Download and upload objects with presigned
# URLs", S3 user guide): a Lambda signs with its execution role's temporary credentials, so
# llmq promises only a short life, bounded by those credentials' expiry when the SDK knows
# it, and states it in the Job (`result_url_expires_at`). A client that needs the result
# later GETs the job again for a fresh URL; webhooks point at the job, never at S3.
RESULT_URL_SECONDS = 900


_STREAM_CHUNK = 1024 * 1024
# What S3 answers for a key that is not there: 404, or 403 to a role that cannot list the bucket.
_MISSING_CODES = ("404", "NoSuchKey", "NotFound", "403", "AccessDenied", "Forbidden")


class ObjectStat(NamedTuple):
    size: int
    etag: str


class UploadDone(Exception):
    """A multipart upload's part came after the upload was completed."""


class ObjectChanged(Exception):
    """The object read is no longer the one named (replaced or deleted since)."""


class PresignedUrl(NamedTuple):
    url: str
    # Epoch milliseconds: the URL's own expiry, never later than its signer's credentials'.
    expires_ms: int


@contextmanager
def _broken_off(key: str) -> Iterator[None]:
    """An object's body is read after GetObject answered, outside botocore's retries and the
    TranslatedClient: a body cut off on the way (a reset, a read timeout, fewer bytes than its
    length) is S3 unavailable for now, as a failed call would be."""
    try:
        yield
    except Exception as exc:
        if aws.is_transient(exc):
            raise StoreUnavailable(f"s3.GetObject {key}: the body broke off") from exc
        raise


class PayloadStore:
    def __init__(self, bucket: str, *, s3: Any) -> None:
        self.bucket = bucket
        self._raw = s3
        self._s3 = aws.TranslatedClient(s3)

    def put(self, key: str, data: bytes) -> str:
        self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json")
        return key

    def put_new(self, key: str, data: bytes) -> bool:
        """The object written unless one is there already (S3's conditional write, If-None-Match
        `*`): False when one was, and nothing is written. (A retry whose first try S3 applied
        with its answer lost answers False too: the object is there, this one's.)"""
        try:
            self._s3.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType="application/json", IfNoneMatch="*"
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                return False
            raise
        return True

    def get(self, key: str) -> bytes:
        body = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        with _broken_off(key):
            try:
                data: bytes = body.read()
            finally:
                body.close()
        return data

    def stat(self, key: str) -> ObjectStat | None:
        """The object's size and ETag; None when there is none.

        The roles may read objects but never list the bucket, and S3 then answers a request
        for a missing key 403, not 404 ("HeadObject", S3 API reference: without
        s3:ListBucket, Amazon S3 returns 403 access denied): both mean "no such object"
        here, under a prefix the role is granted (`stacks.llmq_stack`)."""
        try:
            found = self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                return None
            raise
        return ObjectStat(int(found["ContentLength"]), str(found["ETag"]))

    def stream(self, key: str, start: int, etag: str) -> Iterator[bytes]:
        """The object's bytes from `start` on, in chunks, as long as it is still the object
        whose ETag is `etag`: ObjectChanged when it was replaced since."""
        try:
            response = self._s3.get_object(
                Bucket=self.bucket, Key=key, IfMatch=etag, **({"Range": f"bytes={start}-"} if start else {})
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412", *_MISSING_CODES):
                raise ObjectChanged(f"{key} was replaced or deleted") from exc
            if code in ("InvalidRange", "416"):
                return
            raise
        body = response["Body"]
        with _broken_off(key):
            try:
                yield from body.iter_chunks(_STREAM_CHUNK)
            finally:
                body.close()

    # ---- a multipart upload (a batch's results file) ----

    def start_multipart(self, key: str) -> str:
        response = self._s3.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType="application/jsonl"
        )
        return str(response["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """Part `number` (from 1); its ETag. Sending a part again replaces it. UploadDone when
        the upload was completed meanwhile (llmq never aborts one)."""
        try:
            response = self._s3.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                raise UploadDone(key) from exc
            raise
        return str(response["ETag"])

    def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        """The object assembled from its parts. Completed already (by another run of the same
        upload: llmq never aborts one), S3 answers NoSuchUpload, which is success here."""
        parts = [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, start=1)]
        try:
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise

    def presigned_put(self, key: str, expires_seconds: int, content_length: int) -> PresignedUrl:
        """A PUT URL for `key` of exactly `content_length` bytes, working as long as
        `presigned_url`'s GET would. The length is a signed header: S3 refuses a PUT of any
        other (SignatureDoesNotMatch), so nothing larger than was asked for reaches the bucket."""
        return self._signed(
            "put_object",
            {"Bucket": self.bucket, "Key": key, "ContentLength": content_length},
            expires_seconds,
        )

    def _url_seconds(self, expires_seconds: int) -> int:
        credentials_expire = credentials_expiry(self._raw)
        if credentials_expire is None:
            return expires_seconds
        return max(1, min(expires_seconds, int(credentials_expire - time.time())))

    def presigned_url(self, key: str, expires_seconds: int = RESULT_URL_SECONDS) -> PresignedUrl:
        """A GET URL for `key` that works for `expires_seconds`, or until the signing
        credentials expire if that is sooner."""
        return self._signed("get_object", {"Bucket": self.bucket, "Key": key}, expires_seconds)

    def _signed(self, operation: str, params: dict[str, Any], expires_seconds: int) -> PresignedUrl:
        now = time.time()
        seconds = self._url_seconds(expires_seconds)
        url: str = self._s3.generate_presigned_url(operation, Params=params, ExpiresIn=seconds)
        # The URL's life runs from its X-Amz-Date, the signing time in whole seconds, a moment
        # after `now`: stated from `now` rounded down, the expiry is never later than the URL's
        # (hunt 237: the PUT's, read after signing, could be a second later).
        return PresignedUrl(url, (int(now) + seconds) * 1000)


def credentials_expiry(s3: Any) -> float | None:
    """When the client's credentials expire (epoch seconds), if botocore knows: temporary
    credentials from STS, a container endpoint, or AWS_CREDENTIAL_EXPIRATION. None for keys
    that never expire and for credentials whose expiry is not exposed (Lambda's variables)."""
    signer = getattr(s3, "_request_signer", None)
    credentials = getattr(signer, "_credentials", None)
    if credentials is None:
        return None
    # Refreshing first (it is due near the expiry) makes the expiry the one the URL is signed with.
    credentials.get_frozen_credentials()
    expiry = getattr(credentials, "_expiry_time", None)
    return expiry.timestamp() if isinstance(expiry, datetime) else None


def payload_store(bucket: str | None, s3: Any) -> PayloadStore | None:
    """The store of a deployment with a payload bucket, else None. Pass a lazy client
    (`aws.lazy_client("s3")`): a deployment whose payloads all fit inline never builds it."""
    return PayloadStore(bucket, s3=s3) if bucket else None
