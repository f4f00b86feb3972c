"""The CLI reads files as UTF-8 whatever the locale, and writes what a non-UTF-8 terminal or
file cannot hold escaped, never failing after a job was sent (hunt 299)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent

from llmq_cli.client import LlmqClient, Reply
from llmq_cli.main import main

API = ["--api-url", "http://127.0.0.1:9", "--api-key", "llmq_sk_test"]
SMILE = "\U0001f600"


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    bodies: list[Any] = []

    def request(self: LlmqClient, method: str, path: str, **kwargs: Any) -> Reply:
        bodies.append(kwargs.get("json"))
        return Reply(202, httpx.Headers(), {"id": "job_1", "status": "queued"})

    monkeypatch.setattr(LlmqClient, "request", request)
    return bodies


def _latin1_stdout(monkeypatch: pytest.MonkeyPatch) -> io.BytesIO:
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1"))
    return raw


def test_a_json_body_saved_with_a_bom_is_sent_as_written(tmp_path: Path, sent: list[Any]) -> None:
    # Given a body file saved by an editor that writes a BOM (Notepad, PowerShell's utf8BOM)
    body = tmp_path / "body.json"
    body.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "café"}, ensure_ascii=False).encode())
    # When it is submitted, then the prompt goes as written
    assert main(["submit", "--file", str(body), *API]) == 0
    assert sent == [{"prompt": "café"}]


def test_a_body_that_is_not_utf8_is_one_line_and_nothing_is_sent(
    tmp_path: Path, sent: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "body.json"
    body.write_bytes('{"prompt": "café"}'.encode("latin-1"))
    assert main(["submit", "--file", str(body), *API]) == 1
    assert (
        capsys.readouterr().err.strip() == f"llmq: {body}: not UTF-8 (invalid continuation byte at byte 15)"
    )
    assert sent == []


def test_a_streamed_output_the_terminal_cannot_show_is_escaped_not_an_error(
    monkeypatch: pytest.MonkeyPatch, sent: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a job whose output holds an emoji, followed on a Latin-1 terminal
    delta = {"seq": 1, "delta": f"ok {SMILE}", "attempt": 1, "reset": False}
    done = {"id": "job_1", "status": "succeeded", "result": {"output": f"ok {SMILE}"}}
    events = [
        ServerSentEvent(event="output.delta", data=json.dumps(delta), id="1"),
        ServerSentEvent(event="done", data=json.dumps(done), id="done"),
    ]
    monkeypatch.setattr(LlmqClient, "follow", lambda self, job_id, *_, **__: iter(events))
    raw = _latin1_stdout(monkeypatch)
    # When it is submitted and streamed
    code = main(["submit", "hi", "--stream", *API])
    sys.stdout.flush()
    # Then the output is written, the emoji escaped, and the command succeeds (it said "an
    # argument is not UTF-8 text" and failed, after the job was sent)
    assert code == 0, capsys.readouterr().err
    assert raw.getvalue().decode("latin-1") == "ok \\U0001f600\n"


def test_results_lines_the_output_cannot_hold_are_written_as_ascii_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = [
        json.dumps({"custom_id": "a", "result": {"output": "plain"}}),
        json.dumps({"custom_id": "b", "result": {"output": f"café {SMILE}"}}, ensure_ascii=False),
        json.dumps({"custom_id": "c", "result": {"output": "plain"}}),
    ]
    monkeypatch.setattr(LlmqClient, "batch_results", lambda self, batch_id, status=None: iter(lines))
    raw = _latin1_stdout(monkeypatch)
    # When a batch's results go to a file in a Latin-1 locale
    assert main(["batches", "results", "bat_1", *API]) == 0
    sys.stdout.flush()
    # Then every line is there, each the same JSON
    written = raw.getvalue().decode("latin-1").splitlines()
    assert [json.loads(line) for line in written] == [json.loads(line) for line in lines]
    assert written[0] == lines[0]
