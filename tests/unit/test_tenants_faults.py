"""The tenants store under AWS faults: a throttle or 5xx that outlasts botocore's retries is the
domain's StoreUnavailable (as for every other store), never a raw botocore error."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from llmq.errors import StoreUnavailable
from llmq.tenants import TenantRepository


@pytest.mark.parametrize(("code", "status"), [("ThrottlingException", 400), ("InternalServerError", 500)])
def test_a_throttled_or_failing_lookup_is_store_unavailable(code: str, status: int) -> None:
    client = boto3.session.Session(
        aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    ).client("dynamodb")
    with Stubber(client) as stub:
        stub.add_client_error("get_item", service_error_code=code, http_status_code=status)
        with pytest.raises(StoreUnavailable):
            TenantRepository("tenants", dynamodb=client).authenticate("llmq_sk_anything")
