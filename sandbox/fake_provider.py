"""A deterministic OpenAI-compatible provider on loopback, steered by directives in the prompt.

Directives (DESIGN §6):
- `[[latency:2.5]]` answers after 2.5 s; `[[tokens:200]]` answers with 200 tokens;
- `[[fail:429x2]]` fails the first 2 calls for the job with 429 (any status works);
- `[[retry_after:3]]` adds `Retry-After: 3` to those failures;
- `[[fail:400:context_length_exceeded]]` fails every call with that 400 error code;
- `[[hang]]` never answers (until the server stops);
- `[[stall]]` answers 200 and then sends only keep-alives (SSE comments, or whitespace when not
  streaming) forever: every read succeeds, so only a total deadline ends the call.

The crash directives (`[[crash]]`, `[[crash_before_complete]]`, `[[overrun]]`) are not the
provider's: the worker environment acts on them (sandbox/faults.py), and this server ignores them.

Calls are counted per job (the `x-llmq-job-id` header, or the prompt's hash without it),
and the counts, the in-flight peak and the call log are readable over HTTP and in process.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DIRECTIVE = re.compile(r"\[\[(\w+)(?::([^\]]*))?\]\]")


@dataclass
class Directives:
    latency: float = 0.0
    tokens: int = 8
    fail_status: int | None = None
    fail_times: int = 0
    fail_code: str | None = None
    retry_after: float | None = None
    hang: bool = False
    stall: bool = False

    @classmethod
    def parse(cls, text: str) -> Directives:
        found = cls()
        for name, arg in _DIRECTIVE.findall(text):
            if name == "latency":
                found.latency = float(arg)
            elif name == "tokens":
                found.tokens = int(arg)
            elif name == "retry_after":
                found.retry_after = float(arg)
            elif name == "hang":
                found.hang = True
            elif name == "stall":
                found.stall = True
            elif name == "fail":
                found._parse_fail(arg)
        return found

    def _parse_fail(self, arg: str) -> None:
        if ":" in arg:
            status, code = arg.split(":", 1)
            self.fail_status, self.fail_code, self.fail_times = int(status), code, 1_000_000
            return
        status, _, times = arg.partition("x")
        self.fail_status, self.fail_times = int(status), int(times or 1)


@dataclass
class Storm:
    """A provider-wide fault: a share of calls answer `statuses` with Retry-After."""

    rate: float = 0.0
    statuses: tuple[int, ...] = (429, 503)
    retry_after: float = 1.0
    until: float = 0.0


@dataclass
class CallRecord:
    job_id: str
    at: float  # when the answer was finished
    status: int
    stream: bool
    started_at: float = 0.0  # when the request arrived: with `at`, shows calls that overlap


@dataclass
class ProviderState:
    calls: Counter[str] = field(default_factory=Counter)
    log: list[CallRecord] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    storm: Storm = field(default_factory=Storm)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "calls": dict(self.calls),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "log": [record.__dict__ for record in self.log],
            }


def _words(count: int, seed: str) -> list[str]:
    rng = random.Random(seed)
    vocabulary = ["queue", "lane", "job", "token", "lease", "hook", "retry", "result", "model", "batch"]
    return [rng.choice(vocabulary) for _ in range(count)]


class _Handler(BaseHTTPRequestHandler):
    server: FakeProviderServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
        return

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/_calls", "/v1/_calls"):
            self._json(200, self.server.state.snapshot())
        elif self.path.rstrip("/") in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found", "code": "not_found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        # Like /_calls, the controls answer under the base URL (…/v1) as well as at the root.
        if self.path.rstrip("/") in ("/_reset", "/v1/_reset"):
            self.server.reset()
            self._json(200, {"ok": True})
            return
        if self.path.rstrip("/") in ("/_storm", "/v1/_storm"):
            body = json.loads(raw or b"{}")
            self.server.storm(**body)
            self._json(200, {"ok": True})
            return
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": {"message": "not found", "code": "not_found"}})
            return
        self._chat(raw)

    def _chat(self, raw: bytes) -> None:
        state = self.server.state
        try:
            payload = json.loads(raw)
            prompt = "\n".join(str(message.get("content", "")) for message in payload["messages"])
        except (ValueError, KeyError, TypeError):
            self._json(400, {"error": {"message": "malformed request", "code": "invalid_request_error"}})
            return
        job_id = self.headers.get("x-llmq-job-id") or hashlib.sha256(prompt.encode()).hexdigest()[:16]
        directives = Directives.parse(prompt)
        stream = bool(payload.get("stream"))
        started_at = time.time()
        with state.lock:
            state.calls[job_id] += 1
            attempt = state.calls[job_id]
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            storm = state.storm
        status = 200
        try:
            status = self._answer(job_id, attempt, directives, storm, stream, payload)
        finally:
            with state.lock:
                state.in_flight -= 1
                state.log.append(
                    CallRecord(
                        job_id=job_id, at=time.time(), status=status, stream=stream, started_at=started_at
                    )
                )

    def _answer(
        self,
        job_id: str,
        attempt: int,
        directives: Directives,
        storm: Storm,
        stream: bool,
        payload: dict[str, Any],
    ) -> int:
        if directives.hang:
            self.server.state.stopping.wait()
            return 0
        if directives.stall:
            self._stall(stream)
            return 200
        if directives.latency and not stream:
            self.server.state.stopping.wait(directives.latency)
        if directives.fail_status is not None and attempt <= directives.fail_times:
            return self._fail(directives.fail_status, directives.fail_code, directives.retry_after)
        if storm.rate and time.time() < storm.until and self.server.rng.random() < storm.rate:
            return self._fail(self.server.rng.choice(storm.statuses), None, storm.retry_after)
        words = _words(directives.tokens, job_id)
        usage = {"prompt_tokens": len(json.dumps(payload["messages"])) // 4, "completion_tokens": len(words)}
        if stream:
            self._stream(words, usage, directives.latency)
        else:
            self._json(200, _completion(payload, " ".join(words), usage))
        return 200

    def _fail(self, status: int, code: str | None, retry_after: float | None) -> int:
        headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
        error_code = code or {429: "rate_limit_exceeded", 503: "overloaded"}.get(status, "server_error")
        self._json(status, {"error": {"message": f"fake {status}", "code": error_code}}, headers)
        return status

    def _stream(self, words: list[str], usage: dict[str, int], latency: float) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        pause = latency / max(1, len(words))
        for index, word in enumerate(words):
            if pause:
                self.server.state.stopping.wait(pause)
            text = word if index == 0 else " " + word
            self._chunk({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
        self._chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self._chunk({"choices": [], "usage": usage})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _stall(self, stream: bool) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream" if stream else "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        keep_alive = b": keep-alive\n\n" if stream else b" "
        try:
            while not self.server.state.stopping.wait(0.5):
                self._write_chunk(keep_alive)
        except OSError:  # the caller gave up and closed the connection
            return

    def _chunk(self, data: dict[str, Any]) -> None:
        self._write_chunk(f"data: {json.dumps(data)}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _completion(payload: dict[str, Any], text: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": payload.get("model", "fake-model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage,
    }


class FakeProviderServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller that times out and closes its connection is normal here, not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def __init__(self, host: str = "127.0.0.1", port: int = 0, seed: int = 7) -> None:
        super().__init__((host, port), _Handler)
        self.state = ProviderState()
        self.rng = random.Random(seed)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def calls_for(self, job_id: str) -> int:
        with self.state.lock:
            return self.state.calls[job_id]

    def reset(self) -> None:
        with self.state.lock:
            self.state.calls.clear()
            self.state.log.clear()
            self.state.max_in_flight = self.state.in_flight
            self.state.storm = Storm()

    def storm(
        self, rate: float, seconds: float, statuses: list[int] | None = None, retry_after: float = 1.0
    ) -> None:
        with self.state.lock:
            self.state.storm = Storm(
                rate=rate,
                statuses=tuple(statuses or (429, 503)),
                retry_after=retry_after,
                until=time.time() + seconds,
            )

    def start(self) -> FakeProviderServer:
        self._thread = threading.Thread(target=self.serve_forever, name="fake-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.stopping.set()
        self.shutdown()
        self.server_close()
