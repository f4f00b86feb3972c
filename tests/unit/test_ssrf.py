"""The SSRF guard: which webhook URLs are refused, and where a pinned connection goes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpcore
import httpx
import pytest

from llmq import ssrf
from llmq.errors import InvalidWebhookUrl, WebhookHostUnavailable
from llmq.ssrf import PinnedTarget, PinnedTransport, check_webhook_url
from tests.support.dns import FakeDns

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


def refusal(url: str, dns: FakeDns | None = None, allow_loopback_http: bool = False) -> str:
    with pytest.raises(InvalidWebhookUrl) as caught:
        check_webhook_url(url, allow_loopback_http, dns or FakeDns())
    assert caught.value.code == "invalid_webhook_url"
    return caught.value.detail


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1/", "https"),
        ("https://127.0.0.1/", "loopback"),
        ("https://10.1.2.3/", "private"),
        ("https://172.16.0.1/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://[::1]/", "loopback"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[::ffff:169.254.169.254]/", "link-local"),
        ("https://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 of 169.254.169.254
        ("https://[2002:a01:203::1]/", "private"),  # 6to4 of 10.1.2.3
        ("https://100.64.0.1/", "non-public"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://[::]/", "unspecified"),
        ("https://[fd00::1]/", "non-public"),
        ("https://[fe80::1]/", "link-local"),
        ("https://224.0.0.1/", "multicast"),
        ("https://[ff02::1]/", "multicast"),
        ("https://240.0.0.1/", "reserved"),
    ],
)
def test_non_public_destinations_are_refused(url: str, why: str) -> None:
    assert why in refusal(url)


@pytest.mark.parametrize("port", ["0", "65536", "-1", "99999999"])
def test_a_port_outside_tcps_range_is_refused_not_left_to_fail_at_every_send(port: str) -> None:
    # (an IP literal is never resolved: nothing else would look at the port before a connect)
    assert "port" in refusal(f"https://{PUBLIC_V4}:{port}/hook")
    assert "port" in refusal(f"https://hooks.example.com:{port}/hook", FakeDns(hooks_example_com=[PUBLIC_V4]))


@pytest.mark.parametrize("port", [1, 443, 8443, 65535])
def test_a_port_within_tcps_range_is_kept(port: int) -> None:
    assert check_webhook_url(f"https://{PUBLIC_V4}:{port}/hook", False, FakeDns()).port == port


def test_a_hostname_that_resolves_to_a_private_address_is_refused() -> None:
    detail = refusal("https://internal.example.com/hook", FakeDns(internal_example_com=["10.0.0.5"]))
    assert "internal.example.com" in detail
    assert "private" in detail


def test_one_private_answer_among_public_ones_is_enough_to_refuse() -> None:
    dns = FakeDns(mixed_example_com=[PUBLIC_V4, "192.168.0.10"])
    assert "private" in refusal("https://mixed.example.com/", dns)


def test_a_host_that_does_not_resolve_is_refused() -> None:
    assert "does not resolve" in refusal("https://nowhere.example.com/")


@pytest.mark.parametrize("errno", [socket.EAI_AGAIN, socket.EAI_FAIL], ids=["EAI_AGAIN", "EAI_FAIL"])
def test_a_lookup_that_failed_is_not_a_bad_url_but_a_retry(errno: int) -> None:
    # Given a resolver that timed out, or a DNS server that failed (SERVFAIL)
    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(errno, "Temporary failure in name resolution")

    # Then the URL is not refused as bad (a 422 a client would not retry), but unavailable
    with pytest.raises(WebhookHostUnavailable):
        check_webhook_url("https://hooks.example.com/", allow_loopback_http=False, resolver=failing)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example.com/", "https"),
        ("https://user:secret@hooks.example.com/", "credentials"),
        ("https:///hook", "host"),
        ("not a url at all", "https"),
        # (a zone names an interface of one machine: a public address with one was accepted,
        # and every attempt failed to connect; hunt 308)
        ("https://[2606:4700::1111%25eth0]/h", "zone"),
        ("https://[2606:4700::1111%eth0]/h", "zone"),
    ],
)
def test_malformed_or_unsafe_urls_are_refused(url: str, why: str) -> None:
    assert why in refusal(url, FakeDns(hooks_example_com=[PUBLIC_V4]))


def test_a_public_https_url_is_pinned_to_its_addresses() -> None:
    # Given a hostname with public A and AAAA records
    dns = FakeDns(hooks_example_com=[PUBLIC_V4, PUBLIC_V6])
    # When it is checked
    target = check_webhook_url("https://hooks.example.com:8443/in?x=1", False, dns)
    # Then the target keeps the hostname and pins the checked addresses
    assert target == PinnedTarget(
        url="https://hooks.example.com:8443/in?x=1",
        scheme="https",
        host="hooks.example.com",
        port=8443,
        addresses=(PUBLIC_V4, PUBLIC_V6),
    )
    assert dns.asked == [("hooks.example.com", 8443)]


def test_http_is_refused_in_deployed_stacks_even_for_public_hosts() -> None:
    assert "https" in refusal("http://hooks.example.com/", FakeDns(hooks_example_com=[PUBLIC_V4]))


def test_the_sandbox_may_use_http_on_loopback_only() -> None:
    dns = FakeDns(receiver_test=["127.0.0.1"], public_example_com=[PUBLIC_V4])
    target = check_webhook_url("http://receiver.test:8080/hooks", True, dns)
    assert (target.scheme, target.addresses) == ("http", ("127.0.0.1",))
    assert "https" in refusal("http://public.example.com/", dns, allow_loopback_http=True)
    assert "private" in refusal("http://10.0.0.1/", dns, allow_loopback_http=True)


# ---- the pinned connection --------------------------------------------------------------


class RecordingBackend(httpcore.AsyncMockBackend):
    """Answers 204 to anything and remembers where it was asked to connect."""

    def __init__(self) -> None:
        super().__init__([b"HTTP/1.1 204 No Content\r\n", b"\r\n"])
        self.connected: list[tuple[str, int]] = []

    async def connect_tcp(
        self, host: str, port: int, *args: Any, **kwargs: Any
    ) -> httpcore.AsyncNetworkStream:
        self.connected.append((host, port))
        return await super().connect_tcp(host, port, *args, **kwargs)


async def test_the_pinned_transport_connects_to_the_checked_address_not_the_hostname() -> None:
    # Given a checked target for a hostname
    target = check_webhook_url("https://hooks.example.com/in", False, FakeDns(hooks_example_com=[PUBLIC_V4]))
    backend = RecordingBackend()
    # When a request is sent through the pinned transport
    async with httpx.AsyncClient(transport=PinnedTransport(target, network_backend=backend)) as client:
        response = await client.post(target.url, content=b"{}")
    # Then the TCP connection went to the checked IP, while the request kept the hostname
    assert response.status_code == 204
    assert backend.connected == [(PUBLIC_V4, 443)]
    assert response.request.headers["host"] == "hooks.example.com"


async def test_the_pinned_transport_refuses_any_other_destination() -> None:
    target = check_webhook_url("https://hooks.example.com/in", False, FakeDns(hooks_example_com=[PUBLIC_V4]))
    backend = RecordingBackend()
    async with httpx.AsyncClient(transport=PinnedTransport(target, network_backend=backend)) as client:
        with pytest.raises(httpx.ConnectError, match="not checked"):
            await client.post("https://169.254.169.254/latest/meta-data/", content=b"{}")
    assert backend.connected == []


class _Dripping:
    """A receiver's stream: an interim response's ~100 KB head with no end, then byte by byte."""

    def __init__(self, drips: int) -> None:
        self.chunks = [b"HTTP/1.1 103 Early Hints\r\n" + b"Link: </a.css>; rel=preload\r\n" * 3300]
        self.chunks += [b"X"] * drips

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_an_interim_head_read_a_byte_at_a_time_is_not_parsed_again_at_each_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a receiver that sends an unfinished 103 of about 100 KB, then one byte per read
    scans: list[int] = []
    pattern = ssrf._INTERIM

    class Counted:
        def match(self, data: bytearray) -> Any:
            scans.append(len(data))
            return pattern.match(data)

    monkeypatch.setattr(ssrf, "_INTERIM", Counted())
    stream = ssrf._FirstBytes(_Dripping(2000), bytearray())  # type: ignore[arg-type]

    async def read_all() -> None:
        for _ in range(2001):
            await stream.read(65536)

    asyncio.run(read_all())
    # Then the head is never parsed for a blank line no read brought (review 256: the whole
    # kept head was matched at every byte, CPU growing with the square of its length)
    assert scans == []
