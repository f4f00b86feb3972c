"""The SSRF guard for webhook URLs (DESIGN §2 Webhooks).

One check serves both moments: the API calls `check_webhook_url` when a job is submitted, and
the dispatcher calls it again before every attempt. The dispatcher then connects through
`PinnedTransport`, which dials only the addresses that passed the check, so a DNS answer that
changes between the check and the connection (DNS rebinding) cannot redirect the request.
TLS still verifies the certificate against the hostname, and the Host header keeps it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import httpcore
import httpx

from llmq.errors import InvalidWebhookUrl, WebhookHostUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (host, port) -> the IP addresses the host resolves to, as strings.
Resolver = Callable[[str, int], Iterable[str]]

_DEFAULT_PORTS = {"https": 443, "http": 80}

# Ranges that `ipaddress`'s properties miss, or classify differently across Python versions.
_BLOCKED_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(network)
    for network in (
        "100.64.0.0/10",  # CGNAT (RFC 6598)
        "192.0.0.0/24",  # IETF protocol assignments
        "198.18.0.0/15",  # benchmarking
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "2001::/32",  # Teredo: tunnels to an address we cannot see
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
    )
)
# What getaddrinfo says when the lookup failed rather than found no such host: a temporary
# failure (the resolver timed out or was unreachable), or a server failure (SERVFAIL).
_RESOLVER_FAILED = frozenset({socket.EAI_AGAIN, socket.EAI_FAIL})
# Well-known NAT64 prefix: the last 32 bits are an IPv4 address that must itself be public.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def system_resolver(host: str, port: int) -> list[str]:
    """Every A/AAAA answer for `host`, in the order the system resolver gives them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# How long a submit waits for its webhook host's addresses. The host's name server is the
# tenant's to choose: unbounded (the system resolver retries for tens of seconds), a lookup
# held an api environment for as long, out of every tenant's concurrency, past the long-poll
# places that bound waiting requests.
SUBMIT_LOOKUP_SECONDS = 2.0


def resolver_answers(resolver: Resolver, host: str) -> bool:
    """Whether `resolver` answers for a name that always resolves (an AWS endpoint the function
    calls anyway): a webhook host's lookup failing while it does is the host's name servers',
    the tenant's to fix; while it does not, the resolver's, the operator's (review 266)."""
    try:
        return bool(resolver(host, 443))
    except (OSError, UnicodeError):
        return False


def bounded(resolver: Resolver, seconds: float) -> Resolver:
    """`resolver`, each lookup in a daemon thread of its own, given up after `seconds` as a
    lookup that failed for now (503 webhook_host_unavailable: the client retries). A lookup
    given up on ends on its own, its answer dropped; it holds only its thread."""

    def look_up(host: str, port: int) -> list[str]:
        answer: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                answer.append(list(resolver(host, port)))
            except BaseException as exc:  # handed to the waiting request, whatever it is
                answer.append(exc)
            done.set()

        threading.Thread(target=run, name="llmq-submit-dns", daemon=True).start()
        if not done.wait(seconds):
            raise socket.gaierror(socket.EAI_AGAIN, f"no answer within {seconds:g}s")
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return list(answer[0])

    return look_up


@dataclass(frozen=True)
class PinnedTarget:
    """A webhook URL that passed the guard, with the addresses a connection may use."""

    url: str
    scheme: str
    # The ASCII (IDNA) form, as httpcore asks the network backend to connect to it.
    host: str
    port: int
    addresses: tuple[str, ...]


def check_webhook_url(
    url: str, allow_loopback_http: bool, resolver: Resolver = system_resolver
) -> PinnedTarget:
    """Refuse anything but https to public addresses; raise InvalidWebhookUrl saying why.

    http is accepted only when `allow_loopback_http` (the sandbox) and every address is loopback.
    """
    parsed = _parse(url)
    scheme = parsed.scheme
    if scheme not in _DEFAULT_PORTS:
        raise InvalidWebhookUrl("the webhook URL must use https")
    if scheme == "http" and not allow_loopback_http:
        raise InvalidWebhookUrl("the webhook URL must use https")
    if parsed.userinfo:
        raise InvalidWebhookUrl("the webhook URL must not contain credentials")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise InvalidWebhookUrl("the webhook URL has no host")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        # (httpx parses any integer; an IP literal skips the resolver, and a socket refuses it
        # only at connect time, after the job was accepted)
        raise InvalidWebhookUrl("the webhook URL's port must be between 1 and 65535")
    port = parsed.port or _DEFAULT_PORTS[scheme]
    addresses = _addresses(host, port, resolver)
    for address in addresses:
        refusal = _refusal(address, allow_loopback_http)
        if refusal is None:
            continue
        if _ip(host) is not None:
            raise InvalidWebhookUrl(f"the webhook URL points to {refusal} address ({address})")
        raise InvalidWebhookUrl(f"the webhook host {host} resolves to {refusal} address ({address})")
    if scheme == "http" and not all(_unwrap(address).is_loopback for address in addresses):
        raise InvalidWebhookUrl("the webhook URL must use https")
    return PinnedTarget(
        url=str(parsed),
        scheme=scheme,
        host=host,
        port=port,
        addresses=tuple(str(address) for address in addresses),
    )


def _parse(url: str) -> httpx.URL:
    # Parsed with httpx, the client that sends the request, so the host checked here is the
    # host it would connect to; a second URL parser could disagree on odd inputs.
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidWebhookUrl("the webhook URL is not a valid URL") from exc


def _addresses(host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    literal = _ip(host)
    if isinstance(literal, ipaddress.IPv6Address) and literal.scope_id is not None:
        # (`[…%eth0]`: an interface of one machine, which no function's network has)
        raise InvalidWebhookUrl(
            "the webhook URL's IPv6 address names a zone (%…), which no receiver can be reached by"
        )
    if literal is not None:
        return [literal]
    try:
        answers = list(resolver(host, port))
    except socket.gaierror as exc:
        if exc.errno in _RESOLVER_FAILED:
            raise WebhookHostUnavailable(f"looking up the webhook host {host} failed for now") from exc
        raise InvalidWebhookUrl(f"the webhook host {host} does not resolve") from exc
    except (OSError, UnicodeError, ValueError) as exc:
        raise InvalidWebhookUrl(f"the webhook host {host} does not resolve") from exc
    addresses = [_ip(answer) for answer in answers]
    if not addresses or any(address is None for address in addresses):
        raise InvalidWebhookUrl(f"the webhook host {host} does not resolve to IP addresses")
    return [address for address in addresses if address is not None]


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64), else the address itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _refusal(address: IPAddress, allow_loopback: bool) -> str | None:
    """Why a connection to `address` is refused ("a loopback", …), or None if it is public.

    An IPv6 form that carries an IPv4 address is judged by that IPv4 address: it is where the
    packets end up.
    """
    candidate = _unwrap(address)
    if candidate.is_loopback:
        return None if allow_loopback else "a loopback"
    return _non_public(candidate)


def _non_public(address: IPAddress) -> str | None:
    if address.is_unspecified:
        return "an unspecified"
    if address.is_link_local:
        return "a link-local"
    if address.is_multicast:
        return "a multicast"
    if any(address in network for network in _BLOCKED_NETWORKS if network.version == address.version):
        return "a non-public"
    if address.is_reserved:
        return "a reserved"
    if address.is_private or not address.is_global:
        return "a private"
    return None


# ---- the pinned connection ---------------------------------------------------------------


# An HTTP/1 response's final status line, after any interim (1xx) responses whole: a 100
# Continue or a 103 Early Hints comes before it, and httpcore reads past them.
# (Lines may end in a bare LF, and a status line may have no reason phrase, as h11 reads them.)
_STATUS_LINE = re.compile(
    rb"(?:HTTP/1\.[01] 1\d\d[^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*\r?\n)*HTTP/1\.[01] ([2-5]\d\d)[ \r\n]"
)
_STATUS_LINE_BYTES = 4096
# One whole interim response, dropped from the kept bytes as it comes (however many there are).
_INTERIM = re.compile(rb"HTTP/1\.[01] 1\d\d[^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*\r?\n")
# The start of one, and how much of one not yet whole is kept: as much as httpcore's parser
# takes of a response's head (`MAX_INCOMPLETE_EVENT_SIZE`, 100 KiB), so one that comes over
# several reads is dropped whole once it is, and the final status line after it is kept (hunt
# 258: it was cut at 4 KB, never whole again, and the 200 after it went unseen).
_INTERIM_START = re.compile(rb"HTTP/1\.[01] 1\d\d[ \r\n]")
_INTERIM_BYTES = 100 * 1024


def _kept_bytes(kept: bytearray) -> int:
    """How much of a response's start to keep: an interim response not yet whole, up to
    `_INTERIM_BYTES`; else the final status line's `_STATUS_LINE_BYTES`."""
    return _INTERIM_BYTES if _INTERIM_START.match(kept) else _STATUS_LINE_BYTES


class _FirstBytes(httpcore.AsyncNetworkStream):
    """A connection's stream that keeps the first bytes it reads (after TLS, the plaintext):
    the receiver's status line, whatever becomes of the header block after it."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, kept: bytearray) -> None:
        self._inner = inner
        self._kept = kept

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._inner.read(max_bytes, timeout)
        if len(self._kept) < _kept_bytes(self._kept):
            self._kept.extend(data)
            # (an interim response is whole only once a blank line came: looked for again only
            # when these bytes, with the two before them, may hold one; a read at a time of a
            # 100 KiB head would otherwise cost its whole length each: review 256)
            recent = self._kept[-(len(data) + 2) :]
            while (b"\n\n" in recent or b"\n\r\n" in recent) and (interim := _INTERIM.match(self._kept)):
                del self._kept[: interim.end()]
                recent = self._kept
            del self._kept[_kept_bytes(self._kept) :]
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _FirstBytes(await self._inner.start_tls(ssl_context, server_hostname, timeout), self._kept)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Dials the checked addresses in place of the hostname; refuses any other destination.
    Keeps the first bytes the receiver answered (`status_code`)."""

    def __init__(self, target: PinnedTarget, inner: httpcore.AsyncNetworkBackend) -> None:
        self._target = target
        self._inner = inner
        self.first_bytes = bytearray()

    def status_code(self) -> int | None:
        """The final status the receiver's status line gave, if one came (None otherwise)."""
        found = _STATUS_LINE.match(bytes(self.first_bytes))
        return int(found.group(1)) if found else None

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if (host.lower(), port) != (self._target.host.lower(), self._target.port):
            raise httpcore.ConnectError(f"refusing to connect to {host}:{port}, which was not checked")
        if not self._target.addresses:
            raise httpcore.ConnectError(f"no address to connect to for {host}")

        def dial(address: str) -> Callable[[], Awaitable[httpcore.AsyncNetworkStream]]:
            return lambda: self._inner.connect_tcp(
                address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
            )

        stream = await first_connected([dial(address) for address in self._target.addresses])
        return _FirstBytes(stream, self.first_bytes)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are never sent over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# RFC 8305's Connection Attempt Delay: how long one address is given before the next is dialled
# beside it (an unpinned httpx client's anyio does the same).
CONNECTION_ATTEMPT_DELAY_SECONDS = 0.25


async def first_connected(
    dials: list[Callable[[], Awaitable[httpcore.AsyncNetworkStream]]],
    stagger: float = CONNECTION_ATTEMPT_DELAY_SECONDS,
) -> httpcore.AsyncNetworkStream:
    """The first connection any of `dials` makes, each started `stagger` after the one before
    (at once when all before it failed), as Happy Eyeballs does: an address that drops SYNs (a
    node down behind round-robin DNS, a firewall that drops) costs a quarter of a second, not
    the attempt's whole connect timeout with the live address never tried (hunt 258). The
    others are canceled, and a second connection made meanwhile is closed. Every dial failing:
    the first one's error."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[httpcore.AsyncNetworkStream]] = []
    winner: asyncio.Task[httpcore.AsyncNetworkStream] | None = None
    try:
        for index, dial in enumerate(dials):
            tasks.append(asyncio.ensure_future(dial()))
            until = None if index == len(dials) - 1 else loop.time() + stagger
            while True:
                winner = next((task for task in tasks if _connected(task)), None)
                pending = {task for task in tasks if not task.done()}
                wait = None if until is None else until - loop.time()
                if winner is not None or not pending or (wait is not None and wait <= 0):
                    break
                await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if winner is not None:
                return winner.result()
        raise next(error for task in tasks if (error := task.exception()) is not None)
    finally:
        others = [task for task in tasks if task is not winner]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others)
        for task in others:
            if _connected(task):
                await task.result().aclose()


def _connected(task: asyncio.Task[httpcore.AsyncNetworkStream]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


@cache
def _default_ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle costs milliseconds; one verified context serves every delivery.
    return httpx.create_ssl_context(verify=True, trust_env=False)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport whose connections go only to `target.addresses`.

    The URL keeps the hostname, so httpx sends it as Host and httpcore uses it for SNI and
    certificate verification; only the TCP connect is redirected to the checked address.
    """

    def __init__(
        self,
        target: PinnedTarget,
        *,
        verify: ssl.SSLContext | bool = True,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        # httpx offers no public hook for the network backend, so this sets the one attribute
        # AsyncHTTPTransport.__init__ would (httpx is pinned below 0.29 in pyproject). Not calling
        # super().__init__ also keeps proxies from the environment out: they would defeat pinning.
        if verify is True:
            ssl_context = _default_ssl_context()
        else:
            ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        self._backend = _PinnedBackend(target, network_backend or httpcore.AnyIOBackend())
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=1,
            http1=True,
            http2=False,
            retries=0,
            network_backend=self._backend,
        )

    def status_code(self) -> int | None:
        """The final status the receiver's status line gave, even if what followed it was
        refused or never came (`_PinnedBackend.status_code`)."""
        return self._backend.status_code()
