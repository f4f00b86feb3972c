"""A small client of the public API v1, for the CLI and the demo (the same calls as curl)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, SSEError, connect_sse

from llmq.models import BATCH_ID_PATTERN, JOB_ID_PATTERN, TERMINAL_STATUSES
from llmq.retry_after import parse_retry_after


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json() if response.content else None
    except ValueError:
        return response.text


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        detail = (
            body.get("detail") or body.get("title") or body.get("message") if isinstance(body, dict) else body
        )
        code = body.get("code") if isinstance(body, dict) else None
        super().__init__(f"{status} {code or ''} {detail or ''}".strip())
        self.status = status
        self.body = body


class NotAnId(ValueError):
    """An id argument that is none the API gives: nothing is sent. In a path, the HTTP client
    resolves `..`, so `llmq cancel ../batches/bat_x` canceled the batch (hunt 309)."""


def _job(job_id: str) -> str:
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise NotAnId(f"{job_id!r} is not a job id (job_ and lowercase letters and digits)")
    return job_id


def _batch(batch_id: str) -> str:
    if not re.fullmatch(BATCH_ID_PATTERN, batch_id):
        raise NotAnId(f"{batch_id!r} is not a batch id (bat_ and lowercase letters and digits)")
    return batch_id


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: Any


class LlmqClient:
    def __init__(self, api_url: str, api_key: str, timeout: float = 40.0) -> None:
        # A deployed ApiUrl ends with the stage ("/prod/"); the sandbox's has none. Both take "v1/...".
        self.base_url = api_url.rstrip("/")
        self._http = httpx.Client(
            timeout=timeout, headers={"Authorization": f"Bearer {api_key}", "User-Agent": "llmq-cli/1"}
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LlmqClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        response = self._http.request(method, f"{self.base_url}{path}", **kwargs)
        return Reply(response.status_code, response.headers, _json_or_text(response))

    def _ok(self, reply: Reply) -> Any:
        if reply.status >= 400:
            raise ApiError(reply.status, reply.body)
        return reply.body

    def submit(
        self,
        body: dict[str, Any],
        idempotency_key: str | None = None,
        prefer_wait: int | None = None,
    ) -> Reply:
        headers = {}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if prefer_wait:
            headers["Prefer"] = f"wait={prefer_wait}"
        reply = self.request("POST", "/v1/jobs", json=body, headers=headers)
        self._ok(reply)
        return reply

    def get(self, job_id: str, wait: int = 0) -> dict[str, Any]:
        params = {"wait": str(wait)} if wait else None
        job: dict[str, Any] = self._ok(self.request("GET", f"/v1/jobs/{_job(job_id)}", params=params))
        return job

    def wait(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Long-poll (20 s at a time) until the job is terminal or `timeout` passes: the job
        as last read.

        A 429 (the tenant's long-polls all taken, or its request rate: docs/limits.md), a 5xx
        (the gateway, or the api busy for a moment) or a dropped connection is waited out for
        its Retry-After (a second without one), then the poll goes on; a GET reads nothing, so
        trying again is always safe. Only a refusal (another 4xx) ends the wait, or a poll
        that never answered by the deadline.
        """
        deadline = time.monotonic() + timeout
        job: dict[str, Any] | None = None
        failed: Exception | None = None
        while job is None or (job["status"] not in TERMINAL_STATUSES and time.monotonic() < deadline):
            wait = max(1, min(20, int(deadline - time.monotonic()))) if job is not None else 0
            params = {"wait": str(wait)} if wait else None
            pause = 1.0
            try:
                reply = self.request("GET", f"/v1/jobs/{_job(job_id)}", params=params)
            except httpx.TransportError as exc:
                failed = exc
            else:
                if reply.status != 429 and reply.status < 500:
                    read = self._ok(reply)
                    if not isinstance(read, dict) or "status" not in read:
                        # (a 204, an empty or a redirect's body: not a job, and no second try
                        # would make it one)
                        raise ApiError(reply.status, {"detail": f"the answer is not a job: {read!r:.200}"})
                    job = read
                    continue
                failed = ApiError(reply.status, reply.body)
                pause = parse_retry_after(reply.headers, time.time()) or 1.0
            if time.monotonic() >= deadline:
                if job is not None:
                    return job
                raise failed
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        return job

    def follow(self, job_id: str, timeout: float = 900.0, wait: int = 25) -> Iterator[ServerSentEvent]:
        """The job's events (GET /v1/jobs/{id}/events) until `done`, as EventSource reads them:
        each response ends with a `retry:` hint, and the next request resumes after the last
        delta read (`Last-Event-ID`). A dropped connection or a 429 is waited out and resumed
        the same way, so no delta is read twice or missed."""
        deadline = time.monotonic() + timeout
        last_id: str | None = None
        pause = 1.0
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(
                    self._http,
                    "GET",
                    f"{self.base_url}/v1/jobs/{_job(job_id)}/events",
                    params={"wait": str(wait)},
                    headers=headers,
                    timeout=httpx.Timeout(wait + 15.0),
                ) as source:
                    response = source.response
                    if response.status_code == 429 or response.status_code >= 500:
                        # Throttled, or a store or the gateway busy for a moment: wait, go on.
                        pause = parse_retry_after(response.headers, time.time()) or 1.0
                    elif response.status_code >= 400:
                        response.read()
                        self._ok(Reply(response.status_code, response.headers, _json_or_text(response)))
                    else:
                        for event in source.iter_sse():
                            if event.retry is not None:
                                pause = event.retry / 1000
                            if not event.data:
                                continue
                            if event.event == "output.delta" and event.id:
                                last_id = event.id
                            yield event
                            if event.event == "done":
                                return
            except (httpx.TransportError, SSEError):
                # Cut mid-response: what was read counts, the rest comes after the last id.
                pause = max(pause, 0.5)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    def webhook_log(self, job_id: str) -> dict[str, Any]:
        """A job's delivery log, or a batch's (its id starts with `bat_`)."""
        path = f"/v1/batches/{_batch(job_id)}" if job_id.startswith("bat_") else f"/v1/jobs/{_job(job_id)}"
        log: dict[str, Any] = self._ok(self.request("GET", f"{path}/webhook"))
        return log

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._ok(self.request("POST", f"/v1/jobs/{_job(job_id)}/cancel"))
        return job

    def page(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params = {"limit": str(limit)}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        page: dict[str, Any] = self._ok(self.request("GET", "/v1/jobs", params=params))
        return page

    def all_jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.page(status=status, limit=100, cursor=cursor)
            jobs.extend(page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return jobs

    # ---- batches ----

    def submit_batch(self, body: dict[str, Any], idempotency_key: str | None = None) -> Reply:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        reply = self.request("POST", "/v1/batches", json=body, headers=headers)
        self._ok(reply)
        return reply

    def batch(self, batch_id: str, patience: float = 0.0) -> dict[str, Any]:
        """The batch; with `patience`, a 429, a 5xx or a dropped connection is waited out for
        that many seconds (`_read_patiently`)."""
        response = self._read_patiently(f"/v1/batches/{_batch(batch_id)}", time.monotonic() + patience)
        found: dict[str, Any] = self._ok(
            Reply(response.status_code, response.headers, _json_or_text(response))
        )
        return found

    def _read_patiently(self, path: str, until: float, **kwargs: Any) -> httpx.Response:
        """A GET (which changes nothing, so trying again is always safe), tried again after a
        429 (the tenant's request rate), a 5xx (the api busy for a moment) or a dropped
        connection, for its Retry-After (a second without one), until `until`
        (`time.monotonic()`): then the last answer, or the connection's error."""
        while True:
            pause = 1.0
            try:
                response = self._http.get(f"{self.base_url}{path}", **kwargs)
            except httpx.TransportError:
                if time.monotonic() >= until:
                    raise
            else:
                if (response.status_code != 429 and response.status_code < 500) or time.monotonic() >= until:
                    return response
                pause = parse_retry_after(response.headers, time.time()) or 1.0
            time.sleep(max(0.0, min(pause, until - time.monotonic())))

    def upload(self, path: Path) -> str:
        """POST /v1/uploads, then the file PUT to the URL it answers (S3, not the API: no API
        key goes there). The upload's id, to name in POST /v1/batches."""
        size = path.stat().st_size
        # The size first: a file over the limit is refused (413) before it is read.
        upload: dict[str, Any] = self._ok(self.request("POST", "/v1/uploads", json={"size_bytes": size}))
        data = path.read_bytes()
        if len(data) != size:
            raise ApiError(0, {"detail": f"{path} changed while it was being uploaded; send it again"})
        # One PUT with the Content-Length the URL was signed for: S3 takes no chunked body on
        # a presigned PUT, and no other length.
        response = httpx.put(upload["upload_url"], content=data, timeout=600)
        if response.status_code >= 300:
            raise ApiError(
                response.status_code, {"detail": f"the upload's PUT answered {response.status_code}"}
            )
        return str(upload["id"])

    def result_output(self, url: str) -> str | None:
        """The output of a result held in S3, from its presigned `result_url` (S3, not the API:
        no API key goes there); None when it cannot be read (expired, S3 unreachable)."""
        try:
            response = httpx.get(url, timeout=600)
            output = response.json().get("output") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return output if isinstance(output, str) else None

    def batches(self, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        page: dict[str, Any] = self._ok(self.request("GET", "/v1/batches", params=params))
        return page

    def all_batches(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.batches(limit=100, cursor=cursor)
            found.extend(page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return found

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._ok(self.request("POST", f"/v1/batches/{_batch(batch_id)}/cancel"))
        return found

    def batch_results(
        self, batch_id: str, status: str | None = None, patience: float = 120.0
    ) -> Iterator[str]:
        """The results' JSON lines, page after page (`Llmq-Next-Cursor`), as the API wrote them.
        A page met by a 429 (a large batch's pages, read back to back, pass the tenant's request
        rate), a 5xx or a dropped connection is asked for again, for up to `patience` seconds
        (hunt 293: the first one ended the command, its file half written)."""
        cursor: str | None = "0"
        while cursor is not None:
            params = {"cursor": cursor, **({"status": status} if status else {})}
            path = f"/v1/batches/{_batch(batch_id)}/results"
            response = self._read_patiently(path, time.monotonic() + patience, params=params)
            if response.status_code >= 400:
                raise ApiError(response.status_code, _json_or_text(response))
            # JSON Lines end at "\n" only: a result may hold U+2028, U+2029 or U+0085 raw,
            # which str.splitlines() would also split on.
            yield from (line.removesuffix("\r") for line in response.text.split("\n") if line.strip())
            cursor = response.headers.get("llmq-next-cursor")
