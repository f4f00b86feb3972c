"""The one factory for boto3 clients.

Clients are created lazily, on first use, so that importing a handler costs nothing for
clients it never uses and tests that start moto after import still get mocked clients.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
from botocore.config import Config

_lock = threading.Lock()
_clients: dict[tuple[str, str | None, str | None], Any] = {}

# Standard retry mode with a few attempts: throttles are retried by botocore, but a
# handler never stalls for long on a dead endpoint.
_BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 3}, max_pool_connections=32)


def client(service: str) -> Any:
    """A cached client for `service`, honouring AWS_ENDPOINT_URL (the sandbox) and the region."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    key = (service, region, endpoint)
    with _lock:
        found = _clients.get(key)
        if found is None:
            found = boto3.session.Session().client(
                service,  # type: ignore[call-overload]
                region_name=region,
                endpoint_url=endpoint,
                # Presigned S3 URLs must be SigV4: SigV2 is refused in newer regions.
                config=_BOTO_CONFIG.merge(Config(signature_version="s3v4"))
                if service == "s3"
                else _BOTO_CONFIG,
            )
            _clients[key] = found
        return found


def reset_clients() -> None:
    """Forget every cached client (tests call this when a moto mock starts or stops)."""
    with _lock:
        _clients.clear()
