"""The one factory for boto3 clients, and the wrapper repositories call AWS through.

Only composition roots (the handlers' cached builders) call `client`: repositories take
their clients in their constructors. Clients are created lazily, on first use, so that
importing a handler costs nothing for clients it never uses and tests that start moto after
import still get mocked clients.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, Literal

import boto3
from botocore.config import Config

_lock = threading.Lock()
_clients: dict[tuple[str, str | None, str | None], Any] = {}
# One session for every client: a session loads botocore's shared data (the endpoint rules of
# every partition, the retry and default settings) for its first client, so a session per client
# paid that load once per client. Sessions are not thread-safe; clients are made under _lock.
_session: boto3.session.Session | None = None

# Standard retry mode with a few attempts: throttles are retried by botocore, but a
# handler never stalls for long on a dead endpoint. Short socket timeouts (botocore's default
# is 60 s each) keep a worst-case write inside the worker's write-back reserve.
BOTO_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 3},
    max_pool_connections=32,
    connect_timeout=3,
    read_timeout=10,
)


def client(service: str) -> Any:
    """A cached client for `service`, from the Lambda's environment: AWS_ENDPOINT_URL (the
    sandbox) and the region."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    key = (service, region, endpoint)
    global _session
    with _lock:
        found = _clients.get(key)
        if found is None:
            if _session is None:
                _session = boto3.session.Session()
            found = _session.client(
                service,  # type: ignore[call-overload]
                region_name=region,
                endpoint_url=endpoint,
                config=BOTO_CONFIG.merge(_s3_config(endpoint)) if service == "s3" else BOTO_CONFIG,
            )
            _clients[key] = found
        return found


def _s3_config(endpoint: str | None) -> Config:
    """Presigned S3 URLs must be SigV4 (SigV2 is refused in newer regions), and name the
    bucket's region: botocore otherwise signs for the global endpoint (bucket.s3.amazonaws.com),
    which S3 answers with a 307 redirect for a day after a bucket is created outside
    us-east-1, and with IllegalLocationConstraintException in regions launched since 2019. An
    endpoint of our own (the sandbox's) keeps botocore's addressing: a bucket name cannot go in
    front of an IP address."""
    if endpoint:
        return Config(signature_version="s3v4")
    return Config(signature_version="s3v4", s3={"addressing_style": "virtual"})


class LazyClient:
    """`client(service)`, built on first use: a composition root can wire a repository with
    it, and a container that never calls the service (a GET-only API, a deployment whose
    results all fit inline) never pays the client's ~60 ms and ~5 MB."""

    def __init__(self, service: str) -> None:
        self._service = service

    def __getattr__(self, name: str) -> Any:
        return getattr(client(self._service), name)


def lazy_client(service: str) -> LazyClient:
    return LazyClient(service)


# What botocore may still answer after its own retries that a later try can fix. Anything
# else (validation, access denied, a failed condition) is deterministic.
_TRANSIENT_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "RequestThrottled",
        "SlowDown",
        "InternalServerError",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "TransactionInProgressException",
        # A single write that met a transaction on its item: refused, not applied.
        "TransactionConflictException",
        "RequestTimeout",
        "RequestTimeoutException",
        # S3: a conditional write that met another one on its key in flight; to try again.
        "ConditionalRequestConflict",
    }
)


def is_transient(exc: BaseException) -> bool:
    """A throttle, a 5xx or a lost connection: the call may succeed if tried again later.

    Lost connections are every error botocore raises for the connection rather than for the
    request: a timeout, a reset, a TLS failure, a proxy that refused, a response body cut off
    while it was read (which botocore never retries: the body is read after the call)."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotocoreConnectionError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return error.get("Code") in _TRANSIENT_CODES or status >= 500
    return isinstance(exc, (HTTPClientError, BotocoreConnectionError, IncompleteReadError))


def reset_clients() -> None:
    """Forget every cached client and their session (tests call this when a moto mock starts or
    stops: a session takes botocore's handlers, moto's among them, when it is made)."""
    global _session
    with _lock:
        _clients.clear()
        _session = None


# BatchGetItem's limit of keys per request.
BATCH_GET_KEYS = 100


def get_items(
    dynamodb: Any, table: str, keys: list[dict[str, Any]], attributes: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Items of `table` by pk (only `attributes` of them, if named), consistent, through
    BatchGetItem's 100-key pages and the keys it leaves unprocessed; StoreUnavailable when some
    stay unprocessed. Missing items are absent from the answer."""
    from llmq.errors import StoreUnavailable

    found: dict[str, dict[str, Any]] = {}
    projection: dict[str, Any] = {}
    if attributes:
        names = {f"#a{n}": name for n, name in enumerate(("pk", *attributes))}
        projection = {"ProjectionExpression": ", ".join(names), "ExpressionAttributeNames": names}
    for start in range(0, len(keys), BATCH_GET_KEYS):
        pending: dict[str, Any] = {
            table: {"Keys": keys[start : start + BATCH_GET_KEYS], "ConsistentRead": True, **projection}
        }
        for _ in range(8):
            response = dynamodb.batch_get_item(RequestItems=pending)
            for item in response.get("Responses", {}).get(table, []):
                found[item["pk"]["S"]] = item
            pending = response.get("UnprocessedKeys") or {}
            if not pending:
                break
            time.sleep(0.05)
        else:
            raise StoreUnavailable("dynamodb.BatchGetItem: keys left unprocessed")
    return found


# When the request being served must be answered (`time.monotonic()`), set by the api around
# each request (`answering_by`): a bounded client's call AWS has not answered by then is
# given up (`TranslatedClient`).
_answer_by: contextvars.ContextVar[float | None] = contextvars.ContextVar("llmq_answer_by", default=None)
# When the marks after a send (`TranslatedClient(bounded="marks")`) must end: later than the
# sends, which leave them time.
_marks_by: contextvars.ContextVar[float | None] = contextvars.ContextVar("llmq_marks_by", default=None)


@contextmanager
def answering_by(deadline: float, marks_by: float | None = None) -> Iterator[None]:
    """Calls of bounded clients (`TranslatedClient(bounded=True)`) made inside end by
    `deadline` (`time.monotonic()`), answered or not; those of clients bounded for marks, by
    `marks_by`."""
    token = _answer_by.set(deadline)
    marks = _marks_by.set(marks_by)
    try:
        yield
    finally:
        _marks_by.reset(marks)
        _answer_by.reset(token)


def endpoint_host(service: str) -> str:
    """The host this environment's `service` client calls (the region's, in its partition:
    `.amazonaws.com.cn` in China; the sandbox's emulator)."""
    from urllib.parse import urlsplit

    return urlsplit(str(client(service).meta.endpoint_url)).hostname or ""


def _by_deadline(call: Callable[[], Any], deadline: float, what: str) -> Any:
    """`call`, on a thread of its own, given up at `deadline`: a stalled connection takes
    botocore's tries `read_timeout` each, 40 s for an SQS send, past any request's answer (hunt
    273). A thread per call, not a pool: a call given up still holds its thread, and a later
    call must never wait behind it (review 259: a healthy send queued behind four stalled ones
    took 24 s). The call given up may still go through later; the caller treats it as failed."""
    from llmq.errors import StoreUnavailable

    left = deadline - time.monotonic()
    if left <= 0:
        raise StoreUnavailable(f"{what}: not tried, the request has no time left")
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(run,), name="llmq-bounded", daemon=True).start()
    try:
        return future.result(timeout=left)
    except FutureTimeout:
        raise StoreUnavailable(f"{what}: no answer in the time the request had left") from None


class TranslatedClient:
    """A boto3 client whose transient failures surface as the domain's StoreUnavailable.

    Repositories call AWS through it, so nothing above them sees botocore for a throttle or a
    5xx; other ClientErrors (a failed condition, validation) pass through for the repository
    to interpret. A `bounded` one's calls inside `answering_by` end by its deadline, as
    StoreUnavailable if AWS has not answered: sends whose failure the caller survives (a lost
    lane message or event is the reconciler's to send), not writes it must know the fate of.
    One bounded for "marks" ends by the later deadline `answering_by` gives the marks that
    follow a send given up (a job put first for the reconciler's sweep), which the caller
    survives too: a stalled one made an accepted submit a 504 (review 263).
    """

    def __init__(self, boto_client: Any, *, bounded: bool | Literal["marks"] = False) -> None:
        self._client = boto_client
        self._bounded = bounded

    def __getattr__(self, operation: str) -> Any:
        method = getattr(self._client, operation)

        def call(*args: Any, **kwargs: Any) -> Any:
            deadline = (
                (_marks_by if self._bounded == "marks" else _answer_by).get() if self._bounded else None
            )
            try:
                if deadline is not None:
                    what = f"{_service_name(self._client)}.{operation}"
                    return _by_deadline(lambda: method(*args, **kwargs), deadline, what)
                return method(*args, **kwargs)
            except Exception as exc:
                if is_transient(exc):
                    from llmq.errors import StoreUnavailable

                    raise StoreUnavailable(
                        f"{_service_name(self._client)}.{operation}: {_error_code(exc)} after retries"
                    ) from exc
                raise

        return call


def _service_name(boto_client: Any) -> str:
    return str(boto_client.meta.service_model.service_name)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or type(exc).__name__)
    return type(exc).__name__
