"""The sandbox gateway's HTTP front frames every body as API Gateway's would: whole, or refused
once, never split into a second request on a kept-alive connection (hunt 240). Over a real
socket against the gateway alone, with a function that echoes what it was given."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmq_sandbox.config import RunnerSettings
from llmq_sandbox.gateway import MAX_PAYLOAD_BYTES, ApiGateway, GatewayServer
from llmq_sandbox.lambda_service import InvocationResult, Outcome
from llmq_sandbox.topology import ApiSpec, RouteSpec


@dataclass
class _Invocations:
    records: list[Any] = field(default_factory=list)

    def add(self, record: Any) -> None:
        self.records.append(record)


@dataclass
class Echo:
    """A function service whose one function answers 200 and keeps each event it was given."""

    events: list[dict[str, Any]] = field(default_factory=list)
    invocations: _Invocations = field(default_factory=_Invocations)

    def invoke(
        self,
        name: str,
        event: dict[str, Any],
        timeout_seconds: float | None = None,
        *,
        throttle: bool = False,
    ) -> InvocationResult:
        self.events.append(event)
        reply = {"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": "{}"}
        return InvocationResult(function=name, request_id="r", outcome=Outcome.OK, payload=reply)


@pytest.fixture
def echo() -> Echo:
    return Echo()


@pytest.fixture
def server(echo: Echo) -> Iterator[GatewayServer]:
    api = ApiSpec(
        rest_api_id="abc123",
        stage="prod",
        routes=[RouteSpec("/v1/{proxy+}", "res1", "ANY", "api", None)],
        authorizers={},
        gateway_responses={},
    )
    started = GatewayServer(ApiGateway(api, echo, "123456789012", "us-east-1", RunnerSettings())).start()
    try:
        yield started
    finally:
        started.stop()


def _exchange(server: GatewayServer, raw: bytes) -> bytes:
    """Everything the gateway writes back on one connection, until it closes it or goes quiet."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=1) as sock:
        sock.sendall(raw)
        answered = b""
        try:
            while chunk := sock.recv(65536):
                answered += chunk
        except TimeoutError:
            pass
        return answered


def test_a_chunked_body_reaches_the_function_whole_and_is_answered_once(
    server: GatewayServer, echo: Echo
) -> None:
    # Given a client that streams its body (no Content-Length), in two chunks, on a kept-alive connection
    raw = (
        b"POST /prod/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        b'a\r\n{"prompt":\r\n5;ext=1\r\n"hi"}\r\n0\r\n\r\n'
    )
    answered = _exchange(server, raw)
    # Then the function got the whole body, and the client one answer
    assert [event["body"] for event in echo.events] == ['{"prompt":"hi"}']
    assert answered.count(b"HTTP/1.1 ") == 1 and answered.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", "\u00b2".encode("latin-1")])
def test_a_content_length_that_is_not_a_size_is_a_400_at_once(
    server: GatewayServer, echo: Echo, length: bytes
) -> None:
    # (a superscript two, which the header's Latin-1 reads as "²": str.isdigit() takes it for a
    # digit, and int() refused it, which dropped the connection unanswered: hunt 260)
    answered = _exchange(
        server, b"POST /prod/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}"
    )
    assert answered.startswith(b"HTTP/1.1 400") and answered.count(b"HTTP/1.1 ") == 1
    assert echo.events == []


@pytest.mark.parametrize(
    "framing",
    [
        # a declared size past the limit: refused at once, its body never waited for
        f"Content-Length: {MAX_PAYLOAD_BYTES + 100}\r\n\r\n".encode(),
        # a chunk past it (review 241: the chunk's bytes were read as a second request on the
        # kept-alive connection)
        f"Transfer-Encoding: chunked\r\n\r\n{MAX_PAYLOAD_BYTES + 100:x}\r\n".encode(),
    ],
    ids=["content-length", "chunked"],
)
def test_an_oversized_body_is_one_413_and_its_bytes_are_never_a_request(
    server: GatewayServer, echo: Echo, framing: bytes
) -> None:
    # Given a body larger than API Gateway's payload limit, whose bytes sent look like a request
    smuggled = b"DELETE /prod/v1/jobs/job_smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    answered = _exchange(server, b"POST /prod/v1/jobs HTTP/1.1\r\nHost: x\r\n" + framing + smuggled)
    # Then it is refused once, and nothing reaches the function
    assert answered.startswith(b"HTTP/1.1 413") and answered.count(b"HTTP/1.1 ") == 1
    assert echo.events == []


@pytest.mark.parametrize("size", [b"zz", b"0x2", b"+2", b"0_2", b""])
def test_a_chunk_size_that_is_not_hex_digits_alone_is_a_400(
    server: GatewayServer, echo: Echo, size: bytes
) -> None:
    raw = (
        b"POST /prod/v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + size
        + b"\r\n{}\r\n0\r\n\r\n"
    )
    answered = _exchange(server, raw)
    assert answered.startswith(b"HTTP/1.1 400") and answered.count(b"HTTP/1.1 ") == 1
    assert echo.events == []
