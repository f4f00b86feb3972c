"""A deterministic OpenAI-compatible provider on loopback, steered by directives in the prompt.

Directives (DESIGN §6):
- `[[latency:2.5]]` answers after 2.5 s; `[[tokens:200]]` answers with 200 tokens;
- `[[fail:429x2]]` fails the first 2 calls for the job with 429 (any status works);
- `[[retry_after:3]]` adds `Retry-After: 3` to those failures;
- `[[fail:400:context_length_exceeded]]` fails every call with that 400 error code;
- `[[hang]]` never answers (until the server stops);
- `[[stall]]` answers 200 and then sends only keep-alives (SSE comments, or whitespace when not
  streaming) forever: every read succeeds, so only a total deadline ends the call;
  `[[stall:1.5]]` closes the connection after 1.5 s of them, before any answer (an idle
  timeout in front of a model still generating);
- `[[echo]]` answers with the last message's text, directives removed (exact bytes, any
  script: the way to try a large or non-ASCII result);
- `[[finish:length]]` (or any reason: `content_filter`, …) ends the answer with that
  `finish_reason` instead of `stop`;
- `[[trailer_late:1.5]]` (streaming) holds the connection 1.5 s after the finish_reason chunk,
  before the usage chunk and `[DONE]`, as a gateway that is slow to close may;
  `[[trailer_late:1.5:1.5]]` holds it 1.5 s more between the usage chunk and `[DONE]`;
- `[[finish_mid:0.4]]` (streaming) sends a chunk with only a `finish_reason` after the first
  delta, pauses 0.4 s, and goes on with the answer, as a gateway that marks chunks early may.

Broken answers, which start with 200 and fail part-way (each takes an optional `:xN` at the
end, or `xN` glued to the status, to break only the first N calls for the job; without it
every call breaks):
- `[[stream_error]]` sends half the deltas, then the event
  `data: {"error": {"message": …, "type": "server_error", "code": 503}}` and `[DONE]`, as vLLM
  does; `[[stream_error:429]]` or `[[stream_error:503x1]]` pick the status, and
  `[[stream_error:400:context_length_exceeded:x1]]` sends that code with `"status": 400`.
  Not streaming, the whole 200 body is that `{"error": …}`.
- `[[stream_cut]]` (`[[stream_cut:x1]]`) sends half the deltas, then closes the connection
  with neither a finish_reason nor `[DONE]`. Not streaming, it sends half the JSON body it
  announced and closes.

The crash directives (`[[crash]]`, `[[crash_before_complete]]`, `[[overrun]]`) are not the
provider's: the worker environment acts on them (llmq_sandbox/doubles/faults.py), and this server ignores them.

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
_COUNT = re.compile(r"(\d*)x(\d+)")
_EVERY_CALL = 1_000_000


@dataclass
class StreamFault:
    """An answer that starts with 200 and breaks part-way: an error event, or a cut."""

    kind: str  # "stream_error" or "stream_cut"
    status: int = 503
    code: str | None = None
    times: int = _EVERY_CALL

    @classmethod
    def parse(cls, kind: str, arg: str) -> StreamFault:
        """`503`, `503x1`, `400:context_length_exceeded`, `x1`, `400:context_length_exceeded:x1`."""
        parts = [part for part in (arg or "").split(":") if part]
        fault = cls(kind)
        count = _COUNT.fullmatch(parts[-1]) if parts else None
        if count:
            fault.times = int(count[2])
            parts[-1] = count[1]
            parts = [part for part in parts if part]
        if parts:
            fault.status = int(parts[0])
        if len(parts) > 1:
            fault.code = parts[1]
        return fault

    def error(self) -> dict[str, Any]:
        """The error object, shaped as vLLM and OpenAI send it."""
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        if self.status == 429:
            kind = "rate_limit_error"
        error: dict[str, Any] = {
            "message": f"fake {self.status} during the answer",
            "type": kind,
            "code": self.code or self.status,
        }
        if self.code:
            error["status"] = self.status
        return {"error": error}


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
    # Seconds of keep-alives before the connection is closed; None: never.
    stall_cut: float | None = None
    echo: bool = False
    finish_reason: str = "stop"
    stream_fault: StreamFault | None = None
    trailer_late: float = 0.0
    done_late: float = 0.0
    finish_mid: float | None = None

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
                found.stall_cut = float(arg) if arg else None
            elif name == "echo":
                found.echo = True
            elif name == "fail":
                found._parse_fail(arg)
            elif name == "finish":
                found.finish_reason = arg
            elif name == "trailer_late":
                usage_after, _, done_after = arg.partition(":")
                found.trailer_late, found.done_late = float(usage_after), float(done_after or 0)
            elif name == "finish_mid":
                found.finish_mid = float(arg)
            elif name in ("stream_error", "stream_cut"):
                found.stream_fault = StreamFault.parse(name, arg)
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
    fault: str | None = None  # "stream_error" or "stream_cut" when a 200 answer broke part-way
    # Streamed: the content deltas written before the answer ended (or the caller hung up),
    # and when the first was written (its time to first token).
    deltas_sent: int = 0
    first_delta_at: float | None = None


@dataclass
class ProviderState:
    calls: Counter[str] = field(default_factory=Counter)
    log: list[CallRecord] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    storm: Storm = field(default_factory=Storm)
    # When set, a call without `Authorization: Bearer <api_key>` is answered 401, as a real
    # provider answers a wrong or rotated key.
    api_key: str | None = None
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
    # The current streamed answer's (CallRecord).
    deltas_sent: int = 0
    first_delta_at: float | None = None

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
        status, fault = 200, None
        # Set by _answer before it writes a broken answer: the client may hang up on reading
        # the error, and the write then raises before _answer could return what it broke.
        self.breaking: str | None = None
        self.deltas_sent, self.first_delta_at = 0, None
        try:
            status, fault = self._answer(job_id, attempt, directives, storm, stream, payload)
        finally:
            fault = fault or self.breaking
            with state.lock:
                state.in_flight -= 1
                state.log.append(
                    CallRecord(
                        job_id=job_id,
                        at=time.time(),
                        status=status,
                        stream=stream,
                        started_at=started_at,
                        fault=fault,
                        deltas_sent=self.deltas_sent,
                        first_delta_at=self.first_delta_at,
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
    ) -> tuple[int, str | None]:
        """The HTTP status answered, and the fault that broke a 200 answer, if any."""
        key = self.server.state.api_key
        if key is not None and self.headers.get("authorization") != f"Bearer {key}":
            return self._fail(401, "invalid_api_key", None), None
        if directives.hang:
            self.server.state.stopping.wait()
            return 0, None
        if directives.stall:
            self._stall(stream, directives.stall_cut)
            return 200, None
        if directives.latency and not stream:
            self.server.state.stopping.wait(directives.latency)
        if directives.fail_status is not None and attempt <= directives.fail_times:
            return self._fail(directives.fail_status, directives.fail_code, directives.retry_after), None
        if storm.rate and time.time() < storm.until and self.server.rng.random() < storm.rate:
            return self._fail(self.server.rng.choice(storm.statuses), None, storm.retry_after), None
        words, joiner = _words(directives.tokens, job_id), " "
        if directives.echo:
            words, joiner = _echo_chunks(payload), ""
        usage = {"prompt_tokens": len(json.dumps(payload["messages"])) // 4, "completion_tokens": len(words)}
        fault = directives.stream_fault
        if fault is not None and attempt > fault.times:
            fault = None
        self.breaking = fault.kind if fault else None
        if stream:
            self._stream(
                words,
                usage,
                directives.latency,
                directives.finish_reason,
                fault,
                joiner,
                (directives.trailer_late, directives.done_late),
                directives.finish_mid,
            )
        elif fault is not None and fault.kind == "stream_error":
            self._json(200, fault.error())
        else:
            body = _completion(payload, joiner.join(words), usage, directives.finish_reason)
            self._json(200, body, cut=fault is not None)
        return 200, fault.kind if fault else None

    def _fail(self, status: int, code: str | None, retry_after: float | None) -> int:
        headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
        error_code = code or {429: "rate_limit_exceeded", 503: "overloaded"}.get(status, "server_error")
        self._json(status, {"error": {"message": f"fake {status}", "code": error_code}}, headers)
        return status

    def _stream(
        self,
        words: list[str],
        usage: dict[str, int],
        latency: float,
        finish_reason: str,
        fault: StreamFault | None,
        joiner: str = " ",
        trailer_late: tuple[float, float] = (0.0, 0.0),
        finish_mid: float | None = None,
    ) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        pause = latency / max(1, len(words))
        # A broken answer breaks half-way, after at least one delta.
        sent = words if fault is None else words[: max(1, len(words) // 2)]
        for index, word in enumerate(sent):
            if pause:
                self.server.state.stopping.wait(pause)
            text = word if index == 0 else joiner + word
            self._chunk({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            if index == 0 and finish_mid is not None:
                self._chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
                self.server.state.stopping.wait(finish_mid)
            self.deltas_sent += 1
            if self.first_delta_at is None:
                self.first_delta_at = time.time()
        if fault is not None and fault.kind == "stream_cut":
            # No terminating chunk: the client sees the connection drop mid-body.
            self.close_connection = True
            return
        if fault is not None:
            self._chunk(fault.error())
        else:
            self._chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
            if trailer_late[0]:
                self.server.state.stopping.wait(trailer_late[0])
            self._chunk({"choices": [], "usage": usage})
            if trailer_late[1]:
                self.server.state.stopping.wait(trailer_late[1])
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _stall(self, stream: bool, cut_after: float | None = None) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream" if stream else "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        keep_alive = b": keep-alive\n\n" if stream else b" "
        until = None if cut_after is None else time.monotonic() + cut_after
        try:
            while not self.server.state.stopping.wait(
                0.5 if until is None else max(0.0, min(0.5, until - time.monotonic()))
            ):
                if until is not None and time.monotonic() >= until:
                    # No terminating chunk: the client sees the connection drop mid-body.
                    self.close_connection = True
                    return
                self._write_chunk(keep_alive)
        except OSError:  # the caller gave up and closed the connection
            return

    def _chunk(self, data: dict[str, Any]) -> None:
        self._write_chunk(f"data: {json.dumps(data)}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None, cut: bool = False
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if cut:
            # Half of the announced length, then the connection closes.
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)


def _echo_chunks(payload: dict[str, Any], size: int = 4096) -> list[str]:
    messages = payload.get("messages") or [{}]
    text = _DIRECTIVE.sub("", str(messages[-1].get("content") or ""))
    return [text[start : start + size] for start in range(0, len(text), size)] or [""]


def _completion(
    payload: dict[str, Any], text: str, usage: dict[str, int], finish_reason: str = "stop"
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": payload.get("model", "fake-model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
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
