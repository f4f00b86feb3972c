"""API Gateway (REST, Lambda proxy) on 127.0.0.1, played from the template's API model.

For each request it does what API Gateway does with the resources, methods, authorizer,
binary media types, stage throttling and gateway responses the template declares:
- picks the resource (literal path parts before `{var}`, before `{proxy+}`), then the method
  on that resource (its own, else its ANY); no resource, or no such method on the chosen
  resource (a greedy parent is not asked), -> 403 "Missing Authentication Token";
- throttles each method with a token bucket at the stage's MethodSettings rate and burst:
  past them -> 429 (THROTTLED), after the authorizer and the client's usage plan (a request
  they refuse takes nothing from the stage's bucket), before the function runs;
- with a CUSTOM authorizer: a missing identity source -> 401 without invoking it; otherwise
  the REQUEST authorizer gets its event and methodArn, its policy is cached per identity
  source for the authorizer's TTL and evaluated against each
  methodArn; "Unauthorized" -> 401, a deny -> 403, any other failure -> 500;
- for a method that requires an API key (ApiKeyRequired): takes the key from the authorizer's
  usageIdentifierKey (key source AUTHORIZER) or the x-api-key header (HEADER), finds it and
  its usage plan on this stage in API Gateway (moto, read again after USAGE_PLAN_CACHE_SECONDS,
  and at once for a key not seen yet)
  and takes a token from that key's bucket at the plan's rate and burst: no key, a disabled
  key or a key in no plan of the stage -> 403 (INVALID_API_KEY), past the plan's throttle ->
  429 (THROTTLED), before the function runs;
- builds the proxy event (stage, resource, path parameters, headers and multiValueHeaders,
  query strings, requestContext with requestId, identity.sourceIp and the authorizer's
  context) and writes the function's proxy response back; a malformed response or a
  function error -> 502, a throttled invoke -> 500, an answer later than the integration
  timeout -> 504;
- a body is base64 in the event only when its Content-Type is one of the binary media types,
  else it is UTF-8 text (bytes that are not UTF-8 become U+FFFD); a base64 response is decoded
  only when the request's first Accept media type is one of them, else sent as the base64 text.
Error bodies are the template's gateway responses when it has them, else API Gateway's defaults.

Requests are served only under the stage (`/prod/v1/jobs`), as on the execute-api URL.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
import queue
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from llmq_sandbox.config import RunnerSettings
from llmq_sandbox.lambda_service import InvocationResult, LambdaService, Outcome
from llmq_sandbox.topology import ApiSpec, AuthorizerSpec, RouteSpec

log = logging.getLogger("llmq.sandbox")
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
_DEFAULT_STATUS = {
    "UNAUTHORIZED": 401,
    "ACCESS_DENIED": 403,
    "MISSING_AUTHENTICATION_TOKEN": 403,
    "REQUEST_TOO_LARGE": 413,
    "THROTTLED": 429,
    "INVALID_API_KEY": 403,
    "API_CONFIGURATION_ERROR": 500,
    "AUTHORIZER_FAILURE": 500,
    "AUTHORIZER_CONFIGURATION_ERROR": 500,
    "DEFAULT_5XX": 502,
    "INTEGRATION_TIMEOUT": 504,
}
# The methods an `ANY` method stands for; API Gateway routes no other (TRACE, CONNECT, ...).
ANY_METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"})
_ERROR_TYPE = {
    "UNAUTHORIZED": "UnauthorizedException",
    "ACCESS_DENIED": "AccessDeniedException",
    "MISSING_AUTHENTICATION_TOKEN": "MissingAuthenticationTokenException",
    "AUTHORIZER_FAILURE": "AuthorizerFailureException",
    "THROTTLED": "TooManyRequestsException",
    "INVALID_API_KEY": "ForbiddenException",
    "DEFAULT_5XX": "InternalServerErrorException",
    "INTEGRATION_TIMEOUT": "InternalServerErrorException",
}


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    source_ip: str


@dataclass
class HttpReply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class _CachedPolicy:
    expires: float
    policy: dict[str, Any]
    context: dict[str, Any]
    principal_id: str
    usage_key: str | None = None


@dataclass
class _TokenBucket:
    """API Gateway's throttle: `burst` tokens, refilled at `rate` a second; a request takes one."""

    rate: float
    burst: int
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class _Authorized:
    context: dict[str, Any] = field(default_factory=dict)
    latency_ms: int = 0
    usage_key: str | None = None


# API Gateway applies a change to a usage plan or an API key within seconds, not at once; the
# sandbox reads a key's plan again after this long.
USAGE_PLAN_CACHE_SECONDS = 2.0
# A key in no plan even by a read made after its request is not looked for again for this long.
MISS_CACHE_SECONDS = 1.0
_MISSING_KEPT = 10_000


@dataclass(frozen=True)
class PlanThrottle:
    """The usage plan an API key is in on the stage, and its throttle (None: unthrottled)."""

    key_id: str
    plan_id: str
    rate_per_second: float | None
    burst: int | None


class UsagePlans:
    """API keys and usage plans as API Gateway holds them (moto's API Gateway API).

    `client` makes an apigateway client of the sandbox's moto, acting as its operator.
    https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-api-usage-plans.html
    """

    def __init__(
        self,
        client: Callable[[], Any],
        rest_api_id: str,
        stage: str,
        cache_seconds: float = USAGE_PLAN_CACHE_SECONDS,
    ) -> None:
        self._client_factory = client
        self._client: Any = None
        self.rest_api_id = rest_api_id
        self.stage = stage
        self.cache_seconds = cache_seconds
        self._index: tuple[float, dict[str, PlanThrottle]] | None = None
        self._missing: dict[str, float] = {}  # key value -> until when it is answered 403 unread
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()

    def read_now(self) -> None:
        """Read the plans (and make the client) as the sandbox starts, so that its first
        requests wait for neither. After the cache period the first request to find the read
        stale reads them again, as before: what keeps a change to a plan or key seen in time."""
        with self._lock:
            self._index = (time.monotonic() + self.cache_seconds, self._read())

    def plan_for(self, key_value: str) -> PlanThrottle | None:
        """The key's plan on this API stage; None for an unknown or disabled key, or one in no
        plan of the stage (API Gateway answers those 403)."""
        now = time.monotonic()
        index = self._index
        if index is not None and key_value in index[1]:
            if index[0] > now:
                # A known key is answered without the lock: no request queues behind another's.
                return index[1][key_value]
            # Stale: the first request to see it reads the plans again and answers from them;
            # those that come meanwhile answer from the index it replaces, unless that is stale
            # by more than a cache period (a read that keeps failing), when they wait too.
            if index[0] + self.cache_seconds > now:
                if not self._refreshing.acquire(blocking=False):
                    return index[1][key_value]  # another request is reading them
                try:
                    with self._lock:
                        current = self._index
                        if current is index:  # not read again while this one waited
                            current = self._index = (time.monotonic() + self.cache_seconds, self._read())
                        return current[1].get(key_value) if current is not None else None
                except Exception:  # moto busy or stopping: the plan read last still stands
                    log.debug("reading the usage plans failed", exc_info=True)
                    return index[1][key_value]
                finally:
                    self._refreshing.release()
        # A key that a read made after its request still missed is answered 403 from memory for
        # MISS_CACHE_SECONDS, without waiting for the lock (a read may hold it): requests with
        # keys in no plan cost a read per key and period, not one each.
        if (
            index is not None
            and index[0] > now
            and key_value not in index[1]
            and self._missing.get(key_value, 0.0) > now
        ):
            return None
        with self._lock:
            current = self._index
            stale = current is None or current[0] <= now
            # A key not seen yet (a tenant just created) is looked for again, unless the plans
            # were read after this request came (misses that queued here share one read), so
            # that `llmq tenants create` then a request works however soon it follows.
            missing = (
                current is not None and key_value not in current[1] and current[0] - self.cache_seconds <= now
            )
            held_before = current is not None and key_value in current[1]
            if stale or missing:
                began = time.monotonic()
                current = self._index = (began + self.cache_seconds, self._read())
            assert current is not None
            found = current[1].get(key_value)
            # Not for a key the index before held: one moving between plans (`llmq tenants
            # set-limits`) is out of both for a moment, and is looked for again next time.
            if found is None and not held_before and current[0] - self.cache_seconds >= now:
                if len(self._missing) >= _MISSING_KEPT:
                    self._missing.clear()
                self._missing[key_value] = now + MISS_CACHE_SECONDS
            elif found is not None:
                self._missing.pop(key_value, None)
            return found

    def _read(self) -> dict[str, PlanThrottle]:
        """key value -> its plan on the stage, for every enabled key in a plan of the stage
        (a usage plan key carries the key's value): read whole, at most every cache period."""
        if self._client is None:
            self._client = self._client_factory()
        client = self._client
        enabled = {key["id"] for key in _all(client.get_api_keys) if key.get("enabled", False)}
        index: dict[str, PlanThrottle] = {}
        for plan in _all(client.get_usage_plans):
            stages = plan.get("apiStages") or []
            if not any(
                stage.get("apiId") == self.rest_api_id and stage.get("stage") == self.stage
                for stage in stages
            ):
                continue
            throttle = plan.get("throttle") or {}
            rate = throttle.get("rateLimit")
            burst = throttle.get("burstLimit")
            for key in _all(client.get_usage_plan_keys, usagePlanId=plan["id"]):
                if key["id"] in enabled and key.get("value"):
                    index[str(key["value"])] = PlanThrottle(
                        key_id=key["id"],
                        plan_id=plan["id"],
                        rate_per_second=float(rate) if rate is not None else None,
                        burst=int(burst) if burst is not None else None,
                    )
        return index


def _all(operation: Callable[..., dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
    """Every item of a paginated API Gateway list."""
    items: list[dict[str, Any]] = []
    position: str | None = None
    while True:
        page = operation(**kwargs, **({"position": position} if position else {}))
        items.extend(page.get("items", []))
        position = page.get("position")
        if not position:
            return items


def _statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    document = policy.get("policyDocument") or {}
    statements = document.get("Statement") or []
    return [statements] if isinstance(statements, dict) else list(statements)


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(item) for item in value or []]


def policy_allows(policy: dict[str, Any], method_arn: str) -> bool | None:
    """True if allowed, False if explicitly denied, None if no statement allows it."""
    allowed: bool | None = None
    for statement in _statements(policy):
        actions = _as_list(statement.get("Action"))
        if not any(fnmatch.fnmatchcase("execute-api:Invoke", action) for action in actions):
            continue
        if not any(
            fnmatch.fnmatchcase(method_arn, resource) for resource in _as_list(statement.get("Resource"))
        ):
            continue
        if str(statement.get("Effect", "")).lower() == "deny":
            return False
        if str(statement.get("Effect", "")).lower() == "allow":
            allowed = True
    return allowed


class ApiGateway:
    def __init__(
        self,
        api: ApiSpec,
        functions: LambdaService,
        account: str,
        region: str,
        settings: RunnerSettings,
        usage_plans: UsagePlans | None = None,
    ) -> None:
        self.api = api
        self._usage_plans = usage_plans
        self._functions = functions
        self._account = account
        self._region = region
        self._settings = settings
        self._cache: dict[tuple[str, tuple[str, ...]], _CachedPolicy] = {}
        self._cache_lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _TokenBucket] = {}
        self._buckets_lock = threading.Lock()
        # Per API key and usage plan: the plan's throttle applies to each key on its own.
        self._key_buckets: dict[tuple[str, str], _TokenBucket] = {}

    # ---- the request ----

    def handle(self, request: HttpRequest) -> HttpReply:
        # API Gateway's clock starts here: the authorizer and any cold start count against it.
        arrived = time.monotonic()
        request_id = str(uuid.uuid4())
        if len(request.body) > MAX_PAYLOAD_BYTES:
            return self._gateway_response("REQUEST_TOO_LARGE", "Request Too Long", request_id)
        path = self._without_stage(request.path)
        if path is None:
            # The execute-api URL names the stage first; a path without it names a stage that
            # does not exist, and API Gateway answers 403 before any route or authorizer.
            return HttpReply(403, [("Content-Type", "application/json")], b'{"message":"Forbidden"}')
        found = self._route(request.method, path)
        if found is None:
            return self._gateway_response(
                "MISSING_AUTHENTICATION_TOKEN", "Missing Authentication Token", request_id
            )
        route, path_parameters = found
        event = self._proxy_event(request, path, route, path_parameters, request_id)
        authorized = _Authorized()
        if route.authorizer is not None:
            outcome = self._authorize(self.api.authorizers[route.authorizer], event, request_id)
            if isinstance(outcome, HttpReply):
                return outcome
            authorized = outcome
        if route.api_key_required:
            refused = self._metered(request, route, authorized, request_id)
            if refused is not None:
                return refused
        # The client's usage plan first, then the stage's method limit: a tenant refused by its
        # own plan never takes from the stage's bucket ("Throttle requests to your REST APIs":
        # https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-request-throttling.html).
        if not self._admit(route):
            log.info("throttled %s %s: past the stage's rate and burst", request.method, route.resource_path)
            return self._gateway_response("THROTTLED", "Too Many Requests", request_id)
        if route.authorizer is not None:
            event["requestContext"]["authorizer"] = {
                **authorized.context,
                "integrationLatency": authorized.latency_ms,
            }
        return self._integrate(route, event, request_id, arrived)

    def _without_stage(self, path: str) -> str | None:
        """The resource path under the stage; None when the path does not start with it."""
        prefix = f"/{self.api.stage}"
        if path == prefix or path.startswith(prefix + "/"):
            return path[len(prefix) :] or "/"
        return None

    def _route(self, method: str, path: str) -> tuple[RouteSpec, dict[str, str]] | None:
        """The resource first (routes are sorted most specific first), then its method.

        A method the chosen resource does not have is not looked for on another resource that
        also matches (a `{proxy+}` parent): API Gateway answers that request with its 403.
        """
        for route in self.api.routes:
            parameters = route.matches(path)
            if parameters is None:
                continue
            methods = [
                candidate for candidate in self.api.routes if candidate.resource_path == route.resource_path
            ]
            exact = next((candidate for candidate in methods if candidate.http_method == method), None)
            any_method = next((candidate for candidate in methods if candidate.http_method == "ANY"), None)
            if exact is not None:
                return exact, parameters
            if any_method is not None and method in ANY_METHODS:
                return any_method, parameters
            return None
        return None

    def _admit(self, route: RouteSpec) -> bool:
        """Take a token from the method's bucket; False when the stage's throttle refuses it."""
        throttle = self.api.throttle_for(route)
        if throttle is None:
            return True
        key = (route.resource_path, route.http_method)
        return self._take(self._buckets, key, throttle.rate_per_second, throttle.burst)

    def _take(self, buckets: dict[Any, _TokenBucket], key: Any, rate: float, burst: int) -> bool:
        """A token from the bucket under `key`, made full on first use; it follows the limits
        it is given (a usage plan may have changed since)."""
        now = time.monotonic()
        with self._buckets_lock:
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _TokenBucket(rate, burst, float(burst), now)
            else:
                bucket.rate, bucket.burst = rate, burst
            return bucket.take(now)

    def _metered(
        self, request: HttpRequest, route: RouteSpec, authorized: _Authorized, request_id: str
    ) -> HttpReply | None:
        """A method that requires an API key: the key's usage plan admits the request, or not.

        Without a key that is in a usage plan of the stage API Gateway answers 403 Forbidden
        (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-api-key-source.html);
        past the plan's rate and burst, 429 (THROTTLED), the plan's token bucket per key
        (https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-request-throttling.html).
        Method-level throttles inside a plan and quotas are not played (llmq sets neither).
        """
        if self.api.api_key_source == "AUTHORIZER":
            key_value = authorized.usage_key
        else:
            key_value = next((value for name, value in request.headers if name.lower() == "x-api-key"), None)
        plan = self._usage_plans.plan_for(key_value) if key_value and self._usage_plans else None
        if plan is None:
            log.info(
                "refused %s %s: no API key in a usage plan of the stage", request.method, route.resource_path
            )
            return self._gateway_response("INVALID_API_KEY", "Forbidden", request_id)
        if plan.rate_per_second is None or plan.burst is None:
            return None
        admitted = self._take(
            self._key_buckets, (plan.key_id, plan.plan_id), plan.rate_per_second, plan.burst
        )
        if not admitted:
            log.info(
                "throttled %s %s: past its usage plan's rate and burst", request.method, route.resource_path
            )
            return self._gateway_response("THROTTLED", "Too Many Requests", request_id)
        return None

    def _is_binary(self, media_type: str | None) -> bool:
        """Whether a Content-Type or Accept media type is one of the API's binary media types."""
        media = (media_type or "").split(",")[0].split(";")[0].strip().lower()
        return bool(media) and any(
            fnmatch.fnmatchcase(media, pattern.strip().lower()) for pattern in self.api.binary_media_types
        )

    def _proxy_event(
        self,
        request: HttpRequest,
        path: str,
        route: RouteSpec,
        path_parameters: dict[str, str],
        request_id: str,
    ) -> dict[str, Any]:
        headers = [*request.headers, ("X-Forwarded-For", request.source_ip), ("X-Forwarded-Proto", "http")]
        single: dict[str, str] = {}
        multi: dict[str, list[str]] = {}
        for name, value in headers:
            single[name] = value
            multi.setdefault(name, []).append(value)
        query_pairs = parse_qsl(request.query, keep_blank_values=True)
        query_single = {name: value for name, value in query_pairs}
        query_multi: dict[str, list[str]] = {}
        for name, value in query_pairs:
            query_multi.setdefault(name, []).append(value)
        # (header names are case-insensitive: `CONTENT-TYPE` is the Content-Type)
        named = {name.lower(): value for name, value in single.items()}
        body, encoded = self._body(request.body, self._is_binary(named.get("content-type")))
        now = datetime.now(UTC)
        user_agent = named.get("user-agent")
        return {
            "resource": route.resource_path,
            "path": path,
            "httpMethod": request.method,
            "headers": single or None,
            "multiValueHeaders": multi or None,
            "queryStringParameters": query_single or None,
            "multiValueQueryStringParameters": query_multi or None,
            "pathParameters": path_parameters or None,
            "stageVariables": None,
            "requestContext": {
                "resourceId": route.resource_id,
                "resourcePath": route.resource_path,
                "httpMethod": request.method,
                "extendedRequestId": request_id,
                "requestTime": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "path": f"/{self.api.stage}{path}",
                "accountId": self._account,
                "protocol": "HTTP/1.1",
                "stage": self.api.stage,
                "domainPrefix": self.api.rest_api_id,
                "requestTimeEpoch": int(now.timestamp() * 1000),
                "requestId": request_id,
                "identity": {
                    "cognitoIdentityPoolId": None,
                    "accountId": None,
                    "cognitoIdentityId": None,
                    "caller": None,
                    "sourceIp": request.source_ip,
                    "principalOrgId": None,
                    "accessKey": None,
                    "cognitoAuthenticationType": None,
                    "cognitoAuthenticationProvider": None,
                    "userArn": None,
                    "userAgent": user_agent,
                    "user": None,
                },
                # The host the client reached, as on AWS (the execute-api or a custom domain):
                # the API builds its links from it.
                "domainName": named.get("host")
                or f"{self.api.rest_api_id}.execute-api.{self._region}.amazonaws.com",
                "apiId": self.api.rest_api_id,
            },
            "body": body,
            "isBase64Encoded": encoded,
        }

    @staticmethod
    def _body(raw: bytes, binary: bool) -> tuple[str | None, bool]:
        """A binary media type's body is base64; any other is text, whatever its bytes."""
        if not raw:
            return None, False
        if binary:
            return base64.b64encode(raw).decode(), True
        # Not UTF-8: API Gateway passes the text on with U+FFFD in place of the bad bytes.
        return raw.decode("utf-8", errors="replace"), False

    def _method_arn(self, event: dict[str, Any]) -> str:
        return (
            f"arn:aws:execute-api:{self._region}:{self._account}:{self.api.rest_api_id}/"
            f"{self.api.stage}/{event['httpMethod']}/{event['path'].lstrip('/')}"
        )

    # ---- the authorizer ----

    def _identity(self, authorizer: AuthorizerSpec, event: dict[str, Any]) -> tuple[str, ...] | None:
        headers = {name.lower(): value for name, value in (event["headers"] or {}).items()}
        values = tuple(headers.get(source.lower(), "") for source in authorizer.identity_sources)
        return values if all(values) else None

    def _authorize(
        self, authorizer: AuthorizerSpec, event: dict[str, Any], request_id: str
    ) -> _Authorized | HttpReply:
        identity = self._identity(authorizer, event)
        if identity is None:
            # API Gateway answers 401 itself, without invoking the authorizer.
            return self._gateway_response("UNAUTHORIZED", "Unauthorized", request_id)
        method_arn = self._method_arn(event)
        cached = self._cached(authorizer, identity)
        latency = 0
        if cached is None:
            started = time.monotonic()
            result = self._invoke_authorizer(authorizer, event, method_arn, identity)
            latency = round((time.monotonic() - started) * 1000)
            if isinstance(result, str):
                return self._authorizer_failure(result, request_id)
            cached = result
            self._remember(authorizer, identity, cached)
        verdict = policy_allows(cached.policy, method_arn)
        if verdict is not True:
            detail = "with an explicit deny" if verdict is False else ""
            message = f"User is not authorized to access this resource {detail}".strip()
            return self._gateway_response("ACCESS_DENIED", message, request_id)
        return _Authorized(
            context={**cached.context, "principalId": cached.principal_id},
            latency_ms=latency,
            usage_key=cached.usage_key,
        )

    def _invoke_authorizer(
        self, authorizer: AuthorizerSpec, event: dict[str, Any], method_arn: str, identity: tuple[str, ...]
    ) -> _CachedPolicy | str:
        if authorizer.type == "TOKEN":
            authorizer_event: dict[str, Any] = {
                "type": "TOKEN",
                "authorizationToken": identity[0],
                "methodArn": method_arn,
            }
        else:
            request_context = {
                key: value for key, value in event["requestContext"].items() if key != "authorizer"
            }
            authorizer_event = {
                "type": "REQUEST",
                "methodArn": method_arn,
                **{key: value for key, value in event.items() if key not in ("body", "isBase64Encoded")},
                "requestContext": request_context,
            }
        # Synchronous, as API Gateway invokes: with no environment free, Lambda throttles.
        result = self._functions.invoke(authorizer.function, authorizer_event, throttle=True)
        self._note(result, "authorizer")
        if result.outcome is not Outcome.OK:
            return "Unauthorized" if result.error_message == "Unauthorized" else "failure"
        payload = result.payload if isinstance(result.payload, dict) else {}
        if not payload.get("principalId") or not _statements(payload):
            return "failure"
        context: dict[str, str] = {}
        for key, value in (payload.get("context") or {}).items():
            if isinstance(value, (dict, list)):
                # Context values may be strings, numbers or booleans only; API Gateway fails
                # the request (AuthorizerConfigurationException, 500) on an object or array.
                return "failure"
            if value is not None:
                # ...and hands them to the integration as strings.
                context[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        expires = time.monotonic() + authorizer.ttl_seconds
        usage_key = payload.get("usageIdentifierKey")
        return _CachedPolicy(
            expires,
            payload,
            context,
            str(payload["principalId"]),
            usage_key=str(usage_key) if usage_key else None,
        )

    def _authorizer_failure(self, why: str, request_id: str) -> HttpReply:
        if why == "Unauthorized":
            return self._gateway_response("UNAUTHORIZED", "Unauthorized", request_id)
        return self._gateway_response("AUTHORIZER_FAILURE", None, request_id)

    def _cached(self, authorizer: AuthorizerSpec, identity: tuple[str, ...]) -> _CachedPolicy | None:
        with self._cache_lock:
            cached = self._cache.get((authorizer.logical_id, identity))
            if cached is not None and cached.expires > time.monotonic():
                return cached
            return None

    def _remember(self, authorizer: AuthorizerSpec, identity: tuple[str, ...], policy: _CachedPolicy) -> None:
        if policy.expires <= time.monotonic():
            return
        with self._cache_lock:
            self._cache[(authorizer.logical_id, identity)] = policy

    # ---- the integration ----

    def _integrate(
        self, route: RouteSpec, event: dict[str, Any], request_id: str, arrived: float
    ) -> HttpReply:
        """Invoke the function and wait for it as API Gateway does.

        The 29 s count from the request's arrival, cold start included. When they run out the
        client gets 504 and the function is not stopped: it runs on to its own timeout, as a
        Lambda invoked by API Gateway does, and may still write. A function that hits its own
        timeout first is a Lambda error: 502.
        """
        done: queue.Queue[InvocationResult] = queue.Queue(maxsize=1)

        def invoke() -> None:
            try:
                result = self._functions.invoke(route.function, event, throttle=True)
            except Exception as exc:  # the sandbox's own fault: a 500 now, not a 504 in 29 s
                log.exception("invoking %s failed in the sandbox", route.function)
                error = {"errorType": "Sandbox.InvokeError", "errorMessage": type(exc).__name__}
                result = InvocationResult(route.function, request_id, Outcome.ERROR, error=error)
            self._note(result, "api")
            done.put(result)

        threading.Thread(target=invoke, name=f"integration-{request_id[:8]}", daemon=True).start()
        left = arrived + self._settings.integration_timeout_seconds - time.monotonic()
        try:
            result = done.get(timeout=max(0.0, left))
        except queue.Empty:
            return self._gateway_response("INTEGRATION_TIMEOUT", "Endpoint request timed out", request_id)
        # Lambda's 429 (TooManyRequestsException) on the invoke: the client gets a 500.
        if result.outcome is Outcome.THROTTLED:
            return self._gateway_response("DEFAULT_5XX", "Internal server error", request_id, status=500)
        if result.outcome is not Outcome.OK:
            return self._gateway_response("DEFAULT_5XX", "Internal server error", request_id)
        headers = {name.lower(): value for name, value in (event.get("headers") or {}).items()}
        reply = self._proxy_reply(result.payload, binary=self._is_binary(headers.get("accept")))
        if reply is None:
            log.warning("%s returned a malformed proxy response", route.function)
            return self._gateway_response("DEFAULT_5XX", "Internal server error", request_id)
        if isinstance(reply, str):
            log.warning("%s returned isBase64Encoded with a body that is not base64", route.function)
            return self._gateway_response("API_CONFIGURATION_ERROR", "Internal server error", request_id)
        reply.headers.append(("x-amzn-RequestId", request_id))
        return reply

    @staticmethod
    def _proxy_reply(payload: Any, binary: bool) -> HttpReply | str | None:
        """The client's reply; None for a malformed response, a reason when base64 fails.

        A base64 body is decoded only for a client whose first Accept media type is binary;
        any other gets the base64 text itself.
        """
        if not isinstance(payload, dict) or not isinstance(payload.get("statusCode"), int):
            return None
        # A body that is not a string, a header value that is not a scalar, or multi-value
        # headers that are not lists: API Gateway's 502 "Malformed Lambda proxy response".
        single = payload.get("headers") or {}
        multi = payload.get("multiValueHeaders") or {}
        if (
            not isinstance(payload.get("body"), str | None)
            or not isinstance(single, dict)
            or not isinstance(multi, dict)
            or any(isinstance(value, dict | list) for value in single.values())
            or any(not isinstance(values, list | None) for values in multi.values())
        ):
            return None
        headers: list[tuple[str, str]] = []
        multi_names = {name.lower() for name in multi}
        for name, value in single.items():
            if name.lower() not in multi_names:
                headers.append((name, str(value)))
        for name, values in multi.items():
            headers.extend((name, str(value)) for value in values or [])
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        body = str(payload.get("body") or "")
        raw = body.encode()
        if payload.get("isBase64Encoded") and binary:
            try:
                raw = base64.b64decode(body, validate=True)
            except ValueError:
                return "not base64"
        return HttpReply(status=payload["statusCode"], headers=headers, body=raw)

    def _gateway_response(
        self, response_type: str, message: str | None, request_id: str, status: int | None = None
    ) -> HttpReply:
        status = status or _DEFAULT_STATUS.get(response_type, 500)
        family = "DEFAULT_4XX" if status < 500 else "DEFAULT_5XX"
        spec = self.api.gateway_responses.get(response_type) or self.api.gateway_responses.get(family)
        template = '{"message":$context.error.messageString}'
        headers: dict[str, str] = {"Content-Type": "application/json"}
        if spec is not None:
            status = spec.status_code or status
            template = spec.templates.get("application/json", template)
            headers.update(spec.headers)
        body = (
            template.replace("$context.error.messageString", json.dumps(message))
            .replace("$context.error.message", message or "")
            .replace("$context.requestId", request_id)
        )
        headers["x-amzn-RequestId"] = request_id
        headers["x-amzn-ErrorType"] = _ERROR_TYPE.get(response_type, "InternalServerErrorException")
        return HttpReply(status=status, headers=list(headers.items()), body=body.encode())

    def _note(self, result: InvocationResult, trigger: str) -> None:
        self._functions.invocations.add(result.record(trigger))


# ---- the HTTP server ------------------------------------------------------------------------

# (path, query, method, body) -> (status, JSON body), or None for "no such endpoint".
Introspection = Callable[[str, dict[str, str], str, bytes], tuple[int, Any] | None]


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _GatewayHandler(BaseHTTPRequestHandler):
    server: GatewayServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        body = self._body()
        if body is None:
            # (a body whose end cannot be told: answered once, and the connection closed, so
            # none of its bytes is read as a next request)
            self.close_connection = True
            self._write(HttpReply(400, [("Content-Type", "application/json")], b'{"message":"Bad Request"}'))
            return
        # The sandbox's own endpoints answer with or without the stage in front.
        stage_prefix = f"/{self.server.gateway.api.stage}"
        own = (
            parts.path.removeprefix(stage_prefix)
            if parts.path.startswith(stage_prefix + "/_sandbox/")
            else parts.path
        )
        if own.startswith("/_sandbox/"):
            self._introspect(own, dict(parse_qsl(parts.query)), body)
            return
        request = HttpRequest(
            method=self.command,
            path=parts.path or "/",
            query=parts.query,
            headers=[
                (name, value)
                for name, value in self.headers.items()
                if name.lower() not in ("connection", "transfer-encoding")
            ],
            body=body,
            source_ip=self.client_address[0],
        )
        try:
            reply = self.server.gateway.handle(request)
        except Exception:
            log.exception("the gateway failed on %s %s", self.command, parts.path)
            reply = HttpReply(
                500, [("Content-Type", "application/json")], b'{"message":"Internal server error"}'
            )
        self._write(reply)

    def _body(self) -> bytes | None:
        """The request's body, framed by its Content-Length or sent chunked (a client that
        streams its body); None when its framing is invalid. Past the payload limit a body is
        read no further than one byte over it (the gateway then answers 413)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._chunked()
        declared = self.headers.get("Content-Length") or "0"
        if not (declared.isascii() and declared.isdigit()):
            # (negative, or not a number, `²` among them, which isdigit() alone takes for one:
            # AWS's front answers 400)
            return None
        if int(declared) > MAX_PAYLOAD_BYTES:
            # Refused (413) unread, as a chunked body past the limit is.
            self.close_connection = True
            return b"\0" * (MAX_PAYLOAD_BYTES + 1)
        return self.rfile.read(int(declared)) if int(declared) else b""

    def _chunked(self) -> bytes | None:
        body = bytearray()
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_line):
                return None  # (RFC 9112: 1*HEXDIG; not `0x2`, `+2` or `1_0`, which int() reads)
            size = int(size_line, 16)
            if size == 0:
                break
            if len(body) + size > MAX_PAYLOAD_BYTES + 1:
                # Refused (413) unread: the rest of the body must never be read as a request.
                self.close_connection = True
                return bytes(body) + b"\0" * (MAX_PAYLOAD_BYTES + 1 - len(body))
            body += self.rfile.read(size)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                return None
        while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
            pass  # (trailers)
        return bytes(body)

    def _introspect(self, path: str, query: dict[str, str], body: bytes) -> None:
        introspection = self.server.introspection
        found = introspection(path, query, self.command, body) if introspection else None
        status, data = found if found is not None else (404, {"message": "no such sandbox endpoint"})
        body = json.dumps(data, default=str).encode()
        self._write(HttpReply(status, [("Content-Type", "application/json")], body))

    def _write(self, reply: HttpReply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def __getattr__(self, name: str) -> Any:
        # http.server answers a method without a `do_<METHOD>` with its own 501 HTML page;
        # API Gateway answers every method itself, so every method is served.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)


class GatewayServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request is normal (a timeout, Ctrl-C), not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def __init__(self, gateway: ApiGateway, introspection: Introspection | None = None, port: int = 0):
        super().__init__(("127.0.0.1", port), _GatewayHandler)
        self.gateway = gateway
        self.introspection = introspection
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> GatewayServer:
        self._thread = threading.Thread(target=self.serve_forever, name="gateway", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
