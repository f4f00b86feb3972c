"""REQUEST authorizer: the Bearer API key becomes the tenant id and tier in the context.

API Gateway answers 401 when this function raises "Unauthorized" (counted as
`AuthenticationRefused`); any other failure counts as `AuthorizerFailed`, which the error
alarm watches, since Lambda counts every refusal as an error too. The policy allows every
route of the API so that a cached decision holds for all of them. It also returns the
tenant's usage plan key as usageIdentifierKey (the API's key source is AUTHORIZER): API
Gateway throttles the tenant on that key's usage plan, and refuses with 403 a method that
requires a key when none is returned.
https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-lambda-authorizer-output.html
"""

from __future__ import annotations

import gc

gc.disable()  # for the imports below (llmq.startup)

from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.data_classes import event_source
from aws_lambda_powertools.utilities.data_classes.api_gateway_authorizer_event import (
    APIGatewayAuthorizerRequestEvent,
    APIGatewayAuthorizerResponse,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from llmq import aws, startup
from llmq.config import AuthorizerEnvironment
from llmq.telemetry import MetricName, emit_count, logger
from llmq.tenants import TenantRepository

ENV = AuthorizerEnvironment.load(function_name="authorizer")


@cache
def tenants() -> TenantRepository:
    return TenantRepository(ENV.tenants_table, dynamodb=aws.client("dynamodb"))


def warm() -> None:
    """What a first request builds, built ahead of it in a provisioned environment
    (`llmq.startup`): the tenants' repository and its client. No request reaches AWS."""
    tenants()


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@event_source(data_class=APIGatewayAuthorizerRequestEvent)
@logger.inject_lambda_context(log_event=False)
def handler(event: APIGatewayAuthorizerRequestEvent, context: LambdaContext) -> dict[str, Any]:
    headers = {key.lower(): value for key, value in (event.headers or {}).items()}
    token = bearer_token(headers.get("authorization"))
    try:
        identity = tenants().authenticate(token) if token else None
    except Exception:
        # Not a refusal: the error alarm's count (a refused key is an error to Lambda too).
        emit_count(MetricName.AUTHORIZER_FAILED)
        raise
    if identity is None:
        logger.info("authentication refused", extra={"has_token": token is not None})
        # (Lambda counts the refusal as an error: the error alarm is on AuthorizerFailed instead.)
        emit_count(MetricName.AUTHENTICATION_REFUSED)
        # The exact message API Gateway maps to 401.
        raise Exception("Unauthorized")
    arn = event.parsed_arn
    policy = APIGatewayAuthorizerResponse(
        principal_id=identity.tenant_id,
        context={"tenant_id": identity.tenant_id, "tier": identity.tier},
        region=arn.region,
        aws_account_id=arn.aws_account_id,
        api_id=arn.api_id,
        stage=arn.stage,
        usage_identifier_key=identity.usage_key,
    )
    policy.allow_all_routes()
    return policy.asdict()


startup.imports_done(warm)
