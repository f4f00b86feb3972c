"""The webhook receiver of the sandbox and the tests: verifies, records and answers deliveries.

- `POST /hooks/<anything>` (or any other path): with a secrets source (the sandbox's seeded
  tenants), 200 when the signature verifies against one of their current secrets, 400 when
  it does not; without one (the integration tests), 200;
- `POST /hooks/fail-N`: answers 500 to the first N attempts of each webhook-id, then as above;
- `POST /_heal {"path": "/hooks/x/fail-99"}`: that path is back up: it answers as above from
  now on, however many attempts it has failed (a receiver outage that ends);
- `GET /_deliveries[?job_id=...&type=...]`: what arrived, oldest first, each with the saved
  request (headers and exact body) that `llmq webhooks verify --file` accepts;
- `POST /_reset`: forget every delivery.

Tests script it in-process: `script(path, 503, Answer(429, {"Retry-After": "120"}))` answers
the next requests to `path` in that order, and `requests` holds every request but the
controls above, whatever its method, so a test can also prove a request never came.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from llmq_cli.signatures import Verification, verify_delivery

# tenant id -> that tenant's webhook secrets, newest first.
SecretsSource = Callable[[], dict[str, list[str]]]
_FAIL_PATH = re.compile(r"/fail-(\d+)/?$")
_SAVED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "user-agent")


@dataclass(frozen=True)
class Answer:
    """A scripted answer: the status, headers and body (empty by default)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Delivery:
    webhook_id: str
    type: str | None
    job_id: str | None
    verified: bool
    reason: str
    tenant_id: str | None
    status: int
    attempt: int
    path: str
    received_at: float
    data: dict[str, Any] | None = None
    request: dict[str, Any] = field(default_factory=dict)


class WebhookReceiver(ThreadingHTTPServer):
    daemon_threads = True
    # A name only an injected resolver knows (the tests map it to 127.0.0.1): `url(path)`
    # reaches this receiver only through the resolver under test.
    HOSTNAME = "receiver.test"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request is normal (a timeout, Ctrl-C), not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def __init__(self, secrets: SecretsSource | None = None, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _ReceiverHandler)
        self._secrets = secrets
        self.requests: list[ReceivedRequest] = []
        self._scripts: dict[str, deque[Answer]] = defaultdict(deque)
        self._deliveries: list[Delivery] = []
        self._attempts: Counter[str] = Counter()
        self._healed: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "") -> str:
        return f"http://{self.HOSTNAME}:{self.port}{path}"

    # ---- scripted answers, for tests in the same process ----

    def script(self, path: str, *answers: Answer | int) -> None:
        with self._lock:
            for answer in answers:
                self._scripts[path].append(answer if isinstance(answer, Answer) else Answer(answer))

    def requests_to(self, path: str) -> list[ReceivedRequest]:
        with self._lock:
            return [request for request in self.requests if request.path == path]

    def record(self, request: ReceivedRequest) -> Answer | None:
        """Keep the request; its scripted answer, if one is left."""
        with self._lock:
            self.requests.append(request)
            script = self._scripts.get(request.path)
            return script.popleft() if script else None

    # ---- deliveries ----

    def receive(
        self, path: str, headers: dict[str, str], body: bytes, scripted: Answer | None = None
    ) -> tuple[int, dict[str, Any]]:
        lowered = {name.lower(): value for name, value in headers.items()}
        webhook_id = lowered.get("webhook-id", "")
        with self._lock:
            self._attempts[webhook_id] += 1
            attempt = self._attempts[webhook_id]
        verdict, tenant_id = self._verify(body, lowered)
        verified = verdict is not None and verdict.verified
        if self._secrets is None:
            reason = "not verified: the receiver has no secrets"
        else:
            reason = "" if verified else (verdict.reason if verdict else "no tenant secrets to verify with")
        status = (
            scripted.status if scripted else self._status(path, attempt, verified or self._secrets is None)
        )
        payload = verdict.payload if verified and verdict is not None else _parse(body)
        data = payload.get("data") if isinstance(payload, dict) else None
        delivery = Delivery(
            webhook_id=webhook_id,
            type=payload.get("type") if isinstance(payload, dict) else None,
            job_id=data.get("id") if isinstance(data, dict) else None,
            verified=verified,
            reason=reason,
            tenant_id=tenant_id,
            status=status,
            attempt=attempt,
            path=path,
            received_at=time.time(),
            data=data if isinstance(data, dict) else None,
            request={
                "headers": {name: lowered[name] for name in _SAVED_HEADERS if name in lowered},
                "body": body.decode("utf-8", errors="replace"),
            },
        )
        with self._lock:
            self._deliveries.append(delivery)
        answer = (
            {"received": webhook_id, "verified": verified} if status < 300 else {"error": reason or "failing"}
        )
        return status, answer

    def _verify(self, body: bytes, headers: dict[str, str]) -> tuple[Verification | None, str | None]:
        """The last verdict and the tenant whose secret verified the delivery, if any did."""
        verdict: Verification | None = None
        for tenant, secrets in (self._secrets() if self._secrets else {}).items():
            verdict = verify_delivery(body, headers, secrets)
            if verdict.verified:
                return verdict, tenant
        return verdict, None

    def _status(self, path: str, attempt: int, accepted: bool) -> int:
        failing = _FAIL_PATH.search(path)
        with self._lock:
            healed = path in self._healed
        if failing and not healed and attempt <= int(failing.group(1)):
            return 500
        return 200 if accepted else 400

    def deliveries(self, job_id: str | None = None, event_type: str | None = None) -> list[Delivery]:
        with self._lock:
            found = list(self._deliveries)
        return [
            delivery
            for delivery in found
            if (job_id is None or delivery.job_id == job_id)
            and (event_type is None or delivery.type == event_type)
        ]

    def heal(self, path: str) -> None:
        with self._lock:
            self._healed.add(path)

    def reset(self) -> None:
        with self._lock:
            self._deliveries.clear()
            self._attempts.clear()
            self._healed.clear()

    def start(self) -> WebhookReceiver:
        self._thread = threading.Thread(target=self.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: WebhookReceiver
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        if parts.path == "/_reset":
            self.server.reset()
            self._json(200, {"ok": True})
            return
        if parts.path == "/_heal":
            path = _parse(body)
            if not isinstance(path, dict) or not isinstance(path.get("path"), str):
                self._json(400, {"error": 'expected {"path": "/hooks/..."}'})
                return
            self.server.heal(path["path"])
            self._json(200, {"ok": True, "healed": path["path"]})
            return
        scripted = self._record(body)
        status, answer = self.server.receive(parts.path, dict(self.headers.items()), body, scripted)
        if scripted is not None:
            self._scripted(scripted)
            return
        self._json(status, answer)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path.rstrip("/") == "/_deliveries":
            query = dict(parse_qsl(parts.query))
            found = self.server.deliveries(query.get("job_id"), query.get("type"))
            self._json(200, {"data": [asdict(delivery) for delivery in found]})
            return
        scripted = self._record(b"")
        if scripted is not None:
            self._scripted(scripted)
            return
        self._json(
            200, {"receiver": "llmq sandbox", "post_to": "/hooks/<name>", "fail_first_n": "/hooks/fail-N"}
        )

    def _record(self, body: bytes) -> Answer | None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        return self.server.record(ReceivedRequest(self.command, self.path, headers, body))

    def _scripted(self, answer: Answer) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
