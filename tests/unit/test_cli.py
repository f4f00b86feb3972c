"""The `llmq` job commands: ids that can be copied, output a script can read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import llmq_cli.client
import llmq_cli.main
from llmq_cli.client import LlmqClient as RealClient
from llmq_cli.main import CliError, build_parser, main

LONG_ID = "job_01JDQ8Z6W4M2X9V7K3N5P8R2T4"
JOBS = [
    {
        "id": LONG_ID,
        "status": "failed",
        "lane": "enterprise",
        "model": "gpt-4o-mini",
        "attempts": 3,
        "created_at": "2026-12-01T23:50:00.000Z",
        "error": {"code": "provider_unavailable", "message": "..."},
    },
    {
        "id": "job_01JDQ8Z6W4M2X9V7K3N5P8R2T5",
        "status": "queued",
        "lane": "free",
        "model": "gpt-4o-mini",
        "attempts": 0,
        "created_at": "2026-12-01T23:51:00.000Z",
        "error": None,
    },
]
API = ["--api-url", "https://api.example.test", "--api-key", "llmq_test"]


class FakeClient:
    """Stands in for llmq_cli.client.LlmqClient: the API answers from JOBS."""

    def __init__(self, api_url: str, api_key: str) -> None:
        self.api_url = api_url

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def page(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        return {"data": JOBS[:limit], "next_cursor": None}

    def all_jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        return JOBS

    def get(self, job_id: str, wait: int = 0) -> dict[str, Any]:
        return next(job for job in JOBS if job["id"] == job_id)


@pytest.fixture(autouse=True)
def _fake_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llmq_cli.client, "LlmqClient", FakeClient)


def test_jobs_prints_every_id_in_full_even_on_a_narrow_terminal(capsys, monkeypatch):
    # Given a terminal far narrower than a job id and its row
    monkeypatch.setenv("COLUMNS", "20")
    # When the operator lists jobs
    assert main(["jobs", *API]) == 0
    out = capsys.readouterr().out
    # Then each full id starts its row, ready to copy, with the default columns only
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "LANE", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == [job["id"] for job in JOBS]
    assert "…" not in out and "gpt-4o-mini" not in out


def test_jobs_wide_adds_the_model_attempts_and_error_code(capsys):
    assert main(["jobs", "--wide", *API]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "LANE", "CREATED", "MODEL", "ATTEMPTS", "ERROR"]
    assert lines[1].split()[-3:] == ["gpt-4o-mini", "3", "provider_unavailable"]
    # A job without an error leaves the cell empty rather than printing None
    assert lines[2].split()[-2:] == ["gpt-4o-mini", "0"]


def test_jobs_json_is_the_api_jobs_unchanged(capsys):
    assert main(["jobs", "--json", *API]) == 0
    assert json.loads(capsys.readouterr().out) == JOBS


def test_get_prints_the_job_a_listed_id_names(capsys):
    assert main(["get", LONG_ID, *API]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["id"] == LONG_ID
    assert captured.err == ""


def test_status_still_gets_a_job_but_says_it_is_deprecated(capsys):
    # Given a script written against the old spelling
    assert main(["status", LONG_ID, *API]) == 0
    captured = capsys.readouterr()
    # Then it still gets the job, and stderr names the new command
    assert json.loads(captured.out)["id"] == LONG_ID
    assert "deprecated" in captured.err and "llmq get" in captured.err


def test_help_lists_get_and_hides_the_old_status_spelling():
    help_text = build_parser().format_help()
    assert "get a job" in help_text
    assert "status" not in help_text.replace("--state-file", "")


def test_a_peeked_webhook_dead_letter_shows_its_job_by_id_and_status_only() -> None:
    from llmq_cli.dead_letters import shown_body

    carried = json.dumps(
        {
            "job_id": "job_1",
            "event": "job.succeeded",
            "job": {"id": "job_1", "status": "succeeded", "result": {"output": "the integrator's answer"}},
        }
    )
    shown = json.loads(shown_body(carried))
    assert shown == {
        "job_id": "job_1",
        "event": "job.succeeded",
        "job": {"id": "job_1", "status": "succeeded"},
    }
    # A lane message, or a body that is not JSON, is shown as it is
    assert shown_body('{"job_id": "job_2", "lane": "high"}') == '{"job_id": "job_2", "lane": "high"}'
    assert shown_body("not json") == "not json"
    # And so is a foreign body nested deeper than Python's parser goes (the poison queue's)
    nested = "[" * 5000 + "]" * 5000
    assert shown_body(nested) == nested
    # And a `job.output` event's generated text is shown by its place in the output only
    output = json.dumps(
        {
            "job_id": "job_3",
            "event": "job.output",
            "output": {
                "id": "job_3",
                "seq_from": 0,
                "seq_to": 3,
                "attempt": 1,
                "delta": "PATIENT NOTES: ...",
            },
        }
    )
    assert json.loads(shown_body(output)) == {
        "job_id": "job_3",
        "event": "job.output",
        "output": {"id": "job_3", "seq_from": 0, "seq_to": 3, "attempt": 1},
    }


def test_an_empty_batch_file_is_refused_before_anything_is_sent(tmp_path, capsys):
    # (the fake API has no upload: a call to it would fail the test with AttributeError)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert main(["batches", "submit", "--upload", str(empty), *API]) != 0
    assert "is empty" in capsys.readouterr().err


def test_a_batch_file_is_read_as_the_api_reads_an_upload(tmp_path: Path) -> None:
    """A BOM is ignored and lines end at "\\n" only: a prompt written raw with U+2028, U+2029 or
    U+0085 (json.dumps(..., ensure_ascii=False)) stays one line, as the API's upload reader keeps it."""
    from llmq_cli.main import read_batch_file

    rows = [
        {"custom_id": f"r{n}", "body": {"prompt": f"one{mark}two"}}
        for n, mark in enumerate("\u2028\u2029\u0085")
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\ufeff" + "\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\r\n", encoding="utf-8"
    )
    assert read_batch_file(path) == rows


@pytest.mark.parametrize("blank", ["\u00a0", "\u3000", "\x1c", "\u2028"])
def test_a_batch_file_line_is_blank_only_as_the_worker_reads_an_upload(tmp_path: Path, blank: str) -> None:
    """ASCII whitespace alone is a blank line, skipped; a line of any other space is named as no
    JSON before anything is sent (hunt 271: the CLI skipped it inline, and the same file,
    uploaded, failed at its 202's validation)."""
    from llmq_cli.main import read_batch_file

    row, other = (json.dumps({"custom_id": name, "body": {"prompt": "hi"}}) for name in "ab")
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{row}\n \t\x0b\x0c\n{other}\n", encoding="utf-8")
    assert [request["custom_id"] for request in read_batch_file(path)] == ["a", "b"]
    path.write_text(f"{row}\n{blank}\n", encoding="utf-8")
    with pytest.raises(CliError, match=r"rows\.jsonl:2: not a JSON line"):
        read_batch_file(path)


def test_batch_results_lines_are_split_at_newlines_only() -> None:
    """A results page is JSON Lines; an output may hold U+2028 raw, which is not a line end."""
    import httpx

    lines = [
        json.dumps({"custom_id": "a", "result": {"output": "one\u2028two\u0085three"}}, ensure_ascii=False),
        '{"custom_id":"b"}',
    ]

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="\n".join(lines) + "\n")

    client = RealClient("http://127.0.0.1:9", "llmq_sk_test")  # (the fixture patches the module's)
    client._http = httpx.Client(transport=httpx.MockTransport(answer))
    assert list(client.batch_results("bat_1")) == lines


def test_dead_letter_queues_are_named_as_their_lanes_are() -> None:
    """A lane's name may hold a hyphen (`short-batch`), which the stack's output keys drop
    (`LaneDlqUrlShortBatch`): `llmq dlq --queue short-batch` must find it."""
    from llmq_cli.dead_letters import stack_dead_letter_queues

    outputs = {
        "LaneQueueUrls": json.dumps({"high": "https://q/high", "short-batch": "https://q/short"}),
        "LaneQueueUrlHigh": "https://q/high",
        "LaneDlqUrlHigh": "https://q/high-dlq",
        "LaneQueueUrlShortBatch": "https://q/short",
        "LaneDlqUrlShortBatch": "https://q/short-dlq",
        "WebhookQueueUrl": "https://q/hooks",
        "WebhookDlqUrl": "https://q/hooks-dlq",
        "PoisonQueueUrl": "https://q/poison",
        "ReconcilerFailuresUrl": "https://q/reconciler-failures",
    }
    named = {queue.name: (queue.dlq_url, queue.source_url) for queue in stack_dead_letter_queues(outputs)}
    assert named == {
        "high": ("https://q/high-dlq", "https://q/high"),
        "short-batch": ("https://q/short-dlq", "https://q/short"),
        "webhooks": ("https://q/hooks-dlq", "https://q/hooks"),
        "poison": ("https://q/poison", None),
        # (the reconciler's failed runs, for an operator to read: hunt 305)
        "reconciler-failures": ("https://q/reconciler-failures", None),
    }


def _answering(answers: list[Any], seen: list[str]) -> RealClient:
    """A real client whose HTTP answers are `answers` in turn (an exception is raised instead)."""
    import httpx

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        next_answer = answers.pop(0)
        if isinstance(next_answer, Exception):
            raise next_answer
        return next_answer

    client = RealClient("http://127.0.0.1:9", "llmq_sk_test")  # (the fixture patches the module's)
    client._http = httpx.Client(transport=httpx.MockTransport(answer))
    return client


def _problem(status: int, code: str) -> Any:
    import httpx

    return httpx.Response(status, headers={"Retry-After": "2"}, json={"status": status, "code": code})


def test_wait_rides_out_throttles_busy_gateways_and_dropped_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx

    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    queued, done = {"id": "job_1", "status": "queued"}, {"id": "job_1", "status": "succeeded"}
    # Given a job whose first read is throttled (429), and whose long polls meet a busy gateway
    # (502, 503, 500) and a dropped connection before it ends
    answers = [
        _problem(429, "rate_limited"),
        httpx.Response(200, json=queued),
        _problem(502, "bad_gateway"),
        _problem(503, "service_unavailable"),
        httpx.ConnectError("connection reset"),
        _problem(500, "internal_error"),
        httpx.Response(200, json=done),
    ]
    seen: list[str] = []
    # When `llmq get --wait` (or `submit --follow`) waits for it
    job = _answering(answers, seen).wait("job_1", timeout=120)
    # Then it waits each out, for its Retry-After (a second without one), and gets the end
    assert job == done
    assert slept == [2.0, 2.0, 2.0, 1.0, 2.0]
    assert len(seen) == 7 and "wait=" not in seen[0] and "wait=" in seen[-1]


def test_wait_ends_on_a_refusal_and_says_so() -> None:
    from llmq_cli.client import ApiError

    seen: list[str] = []
    client = _answering([_problem(404, "job_not_found")], seen)
    with pytest.raises(ApiError, match="404 job_not_found"):
        client.wait("job_404", timeout=120)
    assert len(seen) == 1


def test_submit_follow_names_the_job_before_it_waits(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from llmq_cli.client import ApiError

    class Throttled(FakeClient):
        def submit(self, body: dict[str, Any], idempotency_key: str | None, wait: int | None) -> Any:
            import httpx

            from llmq_cli.client import Reply

            return Reply(202, httpx.Headers(), {"id": LONG_ID, "status": "queued"})

        def wait(self, job_id: str, timeout: float) -> dict[str, Any]:
            raise ApiError(403, {"code": "forbidden"})

    monkeypatch.setattr(llmq_cli.client, "LlmqClient", Throttled)
    # When a submit is accepted and the wait after it fails
    assert main(["submit", *API, "hello", "--follow"]) == 1
    # Then the accepted job was named first: re-running the command would pay for another
    assert f"{LONG_ID} queued; following" in capsys.readouterr().err


def test_batch_results_ride_out_a_throttled_page_and_a_busy_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    # Given a batch's results in two pages, the second first met by the tenant's request rate
    # (429), a busy gateway answering HTML (502) and a dropped connection
    page = {"llmq-next-cursor": "2"}
    answers = [
        httpx.Response(200, headers=page, text='{"custom_id":"a"}\n{"custom_id":"b"}\n'),
        _problem(429, "rate_limited"),
        httpx.Response(502, text="<html>Bad Gateway</html>"),
        httpx.ConnectError("connection reset"),
        httpx.Response(200, text='{"custom_id":"c"}\n'),
    ]
    seen: list[str] = []
    # When `llmq batches results` reads them
    lines = list(_answering(answers, seen).batch_results("bat_1"))
    # Then every line comes once, each failure waited out for its Retry-After (a second
    # without one), the same page asked for again (hunt 293: the first 429 ended the command)
    assert [json.loads(line)["custom_id"] for line in lines] == ["a", "b", "c"]
    assert slept == [2.0, 1.0, 1.0]
    assert [url.rsplit("cursor=", 1)[1] for url in seen] == ["0", "2", "2", "2", "2"]


def test_a_batch_watch_ends_at_its_timeout_with_the_batch_last_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from llmq_cli.main import watch_batch

    now = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    monkeypatch.setattr("time.sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    counts = {"total": 2, "succeeded": 1, "failed": 0, "canceled": 0, "expired": 0, "running": 1, "queued": 0}
    running = {"id": "bat_1", "status": "in_progress", "request_counts": counts}
    # Given a batch read once, then the API busy for good
    answers = [httpx.Response(200, json=running)] + [_problem(503, "service_unavailable")] * 500
    # When a watch of 10 s polls it
    batch = watch_batch(_answering(answers, []), "bat_1", timeout=10)
    # Then it ends at its timeout, with the batch as last read (review 266: two minutes past
    # it, with an error)
    assert batch == running
    assert now[0] - 1000.0 <= 12


def test_batch_results_say_a_refusal_whose_body_is_not_json() -> None:
    import httpx

    from llmq_cli.client import ApiError

    client = _answering([httpx.Response(403, text="<html>Forbidden</html>")], [])
    with pytest.raises(ApiError, match="403"):
        list(client.batch_results("bat_1"))


def test_batches_submit_wait_names_the_batch_before_it_watches(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from llmq_cli.client import ApiError

    class Busy(FakeClient):
        def submit_batch(self, body: dict[str, Any], idempotency_key: str | None) -> Any:
            import httpx

            from llmq_cli.client import Reply

            return Reply(202, httpx.Headers(), {"id": "bat_" + "1" * 26, "status": "validating"})

        def batch(self, batch_id: str, patience: float = 0.0) -> dict[str, Any]:
            raise ApiError(403, {"code": "forbidden"})

    monkeypatch.setattr(llmq_cli.client, "LlmqClient", Busy)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"custom_id": "a", "body": {"prompt": "hi"}}\n', encoding="utf-8")
    # When a batch is accepted and the watch after it fails
    assert main(["batches", "submit", str(rows), *API, "--wait"]) == 1
    # Then the accepted batch was named first: re-running the command would pay for another
    assert f"bat_{'1' * 26} validating; watching" in capsys.readouterr().err


@pytest.mark.parametrize("tail", ["\r", "\n", " "])
def test_an_api_key_that_cannot_be_a_header_is_refused_without_printing_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tail: str
) -> None:
    monkeypatch.setattr(llmq_cli.client, "LlmqClient", RealClient)
    secret = "llmq_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    # When the key ends in a CR, a line feed or a space (read from a CRLF file, or pasted)
    code = main(["get", "job_x", "--api-url", "http://127.0.0.1:9", "--api-key", secret + tail])
    # Then the command says so, never the key (hunt 293: httpx's refusal printed it)
    err = capsys.readouterr().err
    assert code == 1 and "CRLF" in err
    assert secret not in err


@pytest.mark.parametrize("command", [["tenants", "show", "ten_1"], ["doctor"], ["provider-key", "set"]])
def test_the_default_stack_is_the_one_make_deploy_deploys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # Given a checkout whose cdk.json names its stack (as `make deploy` reads it)
    (tmp_path / "cdk.json").write_text(json.dumps({"context": {"llmq:stack_name": "LlmqDev"}}))
    monkeypatch.chdir(tmp_path)
    # Then a command without --stack targets that stack, never another called Llmq
    assert build_parser().parse_args(command).stack == "LlmqDev"
    # And without a name there, the default is Llmq
    (tmp_path / "cdk.json").write_text(json.dumps({"context": {}}))
    assert build_parser().parse_args(command).stack == "Llmq"


@pytest.mark.parametrize(
    ("status", "body"),
    [(204, None), (200, None), (302, None), (200, "null")],
    ids=["204", "empty 200", "302 without a body", "JSON null"],
)
def test_wait_ends_at_once_on_an_answer_that_is_not_a_job(status: int, body: str | None) -> None:
    import httpx

    from llmq_cli.client import ApiError

    seen: list[str] = []
    headers = {"Content-Type": "application/json"} if body else {}
    answers = [httpx.Response(status, headers=headers, content=(body or "").encode())] * 3
    client = _answering(list(answers), seen)
    # (not a job, and no second try makes it one: said at once, never polled for ever)
    with pytest.raises(ApiError, match="not a job"):
        client.wait("job_1", timeout=60)
    assert len(seen) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "redrive", "--queue", "high", "--max", "0"],
        ["dlq", "redrive", "--max", "-1"],
        ["dlq", "list", "--peek", "-1"],
    ],
)
def test_a_dlq_count_that_moves_or_shows_nothing_is_refused_not_reported_as_done(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # (a redrive of at most 0 messages moved nothing and reported success)
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(args)
    assert refused.value.code == 2
    assert "must be at least" in capsys.readouterr().err


def test_webhooks_attempts_shows_a_status_beside_what_became_of_the_headers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A status line whose headers timed out is a 200 (the delivery) and a Timeout (review 230:
    the error was hidden behind the status)."""
    import argparse
    import contextlib

    import llmq_cli.main as cli

    attempt = {"attempt": 1, "at": "2026-12-05T00:00:00Z", "latency_ms": 5002}
    log = {
        "job_id": "job_x",
        "url": "https://r.example/h",
        "deliveries": [
            {
                "event": "job.succeeded",
                "status": "delivered",
                "attempts": [
                    {**attempt, "status_code": 200, "error_class": "Timeout"},
                    {**attempt, "attempt": 2, "status_code": None, "error_class": "ConnectError"},
                    {**attempt, "attempt": 3, "status_code": 500},
                ],
            }
        ],
    }

    class Client:
        def webhook_log(self, job_id: str) -> dict[str, Any]:
            return log

    monkeypatch.setattr(cli, "_client", lambda args: contextlib.nullcontext(Client()))
    cli.cmd_webhooks_attempts(argparse.Namespace(job_id="job_x", json=False))
    lines = capsys.readouterr().out.splitlines()
    assert "200 (Timeout)" in lines[2] and "ConnectError" in lines[3] and " 500 " in lines[4]


def test_a_receivers_control_bytes_are_shown_not_obeyed_by_the_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A receiver's answer that would rewrite the operator's screen (CR, ANSI escapes, a bidi
    override) to read as a delivery is shown escaped (hunt 233)."""
    import argparse
    import contextlib

    import llmq_cli.main as cli

    head = "oops\r\x1b[2K\x1b[1A  job.succeeded: delivered\u202e\r\nnext"
    attempt = {"attempt": 1, "at": "2026-12-05T00:00:00Z", "status_code": 500, "latency_ms": 3}
    log = {
        "job_id": "job_x",
        "url": "https://r.example/h",
        "deliveries": [
            {"event": "job.succeeded", "status": "failed", "attempts": [{**attempt, "response_head": head}]}
        ],
    }

    class Client:
        def webhook_log(self, job_id: str) -> dict[str, Any]:
            return log

    monkeypatch.setattr(cli, "_client", lambda args: contextlib.nullcontext(Client()))
    cli.cmd_webhooks_attempts(argparse.Namespace(job_id="job_x", json=False))
    out = capsys.readouterr().out
    assert not {"\x1b", "\r", "\u202e"} & set(out)
    assert out.splitlines()[2].endswith("oops\\r\\x1b[2K\\x1b[1A  job.succeeded: delivered\\u202e\\r next")


def test_make_deploy_is_drained_only_when_drained_says_so() -> None:
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def doctor_line(drained: str) -> str:
        dry = subprocess.run(
            ["make", "-n", "deploy", f"DRAINED={drained}", "STACK=Llmq"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        return next(line for line in dry.splitlines() if "llmq_cli doctor" in line)

    # (hunt 298: any value, DRAINED=0 exported in CI too, turned the lowered-settings guard off)
    assert "--drained" not in doctor_line("0") and "--drained" not in doctor_line("no")
    assert "--drained" in doctor_line("1")


def _stale_state(path: Path, pid: int) -> None:
    """A state file a sandbox left when it died (SIGKILL, OOM, a reboot), naming `pid`."""
    url = "http://127.0.0.1:9"
    path.write_text(
        json.dumps(
            {
                "api_url": url,
                "aws_endpoint_url": url,
                "region": "us-east-1",
                "provider_url": url,
                "receiver_url": url,
                "pid": pid,
                "tenants": [],
            }
        )
    )


def test_a_stale_state_whose_pid_the_os_gave_another_process_stops_nothing_and_blocks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    # Given a state file naming a pid the OS has since given one of the user's other processes
    # (a daemon leading its own session)
    unrelated = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        state = tmp_path / "sandbox.json"
        _stale_state(state, unrelated.pid)
        # When the user stops the sandbox
        assert main(["--state-file", str(state), "sandbox", "down"]) == 0
        time.sleep(0.2)
        # Then that process lives on, and the stale file is gone (hunt 298: it was killed)
        assert unrelated.poll() is None
        assert not state.exists()
        # And a sandbox can start over a stale file (hunt 298: refused, "already running")
        _stale_state(state, unrelated.pid)
        monkeypatch.setattr(llmq_cli.main, "_up_foreground", lambda path, announce: 0)
        assert main(["--state-file", str(state), "sandbox", "up"]) == 0
    finally:
        unrelated.kill()
        unrelated.wait()


def _sleeper(*argv: str) -> Any:
    """A process of the user's own whose command line holds `argv` (as `tail -f .llmq/sandbox.log`
    or another sandbox's function environment names llmq)."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", *argv], start_new_session=True
    )


def _reaped_when_it_ends(process: Any) -> None:
    """Reaped as soon as it ends, as a detached sandbox is by init: a zombie child of the test
    still counts as a live pid, which `down` waits for."""
    import threading

    threading.Thread(target=process.wait, daemon=True).start()


def test_a_stale_state_whose_pid_went_to_a_process_naming_llmq_stops_nothing(tmp_path: Path) -> None:
    # Given a state file naming a pid the OS has since given a process whose command line names
    # llmq and even `sandbox up`, and the sandbox's lock file, which no process holds
    unrelated = _sleeper("llmq_cli", "sandbox", "up", ".llmq/sandbox.log")
    try:
        state = tmp_path / "sandbox.json"
        _stale_state(state, unrelated.pid)
        (tmp_path / "sandbox.json.lock").write_text(str(unrelated.pid))
        # When the user asks, then stops the sandbox
        assert main(["--state-file", str(state), "sandbox", "status"]) == 1
        assert main(["--state-file", str(state), "sandbox", "down"]) == 0
        time.sleep(0.2)
        # Then that process lives on (hunt 320: `down` killed it), and the stale file is gone
        assert unrelated.poll() is None
        assert not state.exists()
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_sandbox_starting_holds_its_lock_so_no_second_starts_and_down_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from llmq_cli.sandbox_state import lock_holder

    # Given a sandbox starting (its lock taken, no state file written yet)
    state = tmp_path / "sandbox.json"
    code = (
        "import sys, time; from pathlib import Path; from llmq_cli.sandbox_state import take_lock; "
        "assert take_lock(Path(sys.argv[1])) is not None; print('held', flush=True); time.sleep(600)"
    )
    import subprocess

    starting = subprocess.Popen(
        [sys.executable, "-c", code, str(state), "sandbox", "up"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert starting.stdout is not None and starting.stdout.readline().strip() == "held"
        _reaped_when_it_ends(starting)
        assert lock_holder(state) == starting.pid
        monkeypatch.setattr(llmq_cli.main, "_up_foreground", lambda path, announce: 0)
        capsys.readouterr()
        # When a second `up` comes, in the foreground or detached, it is refused, naming the first
        # (hunt 320: both booted, and the first, hidden by the second's state file, ran on for good)
        for detach in ([], ["--detach"]):
            with pytest.raises(CliError, match=f"already starting or running \\(pid {starting.pid}"):
                llmq_cli.main.cmd_sandbox_up(
                    build_parser().parse_args(["--state-file", str(state), "sandbox", "up", *detach])
                )
        # And `status` does not say none runs
        assert main(["--state-file", str(state), "sandbox", "status"]) == 1
        assert "is starting" in capsys.readouterr().out
        # And `down` stops it, though it has no state file yet
        assert main(["--state-file", str(state), "sandbox", "down"]) == 0
        starting.wait(timeout=30)
        assert f"sandbox stopped (pid {starting.pid})" in capsys.readouterr().out
        # Then a sandbox can start
        assert lock_holder(state) is None
        assert main(["--state-file", str(state), "sandbox", "up"]) == 0
    finally:
        starting.kill()
        starting.wait()


def test_ctrl_c_while_a_detached_sandbox_starts_stops_it_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    # Given `up --detach` waiting for the sandbox it started (here a stand-in leading its group)
    started: list[Any] = []

    import subprocess
    import sys

    real = subprocess.Popen

    def popen(command: list[str], **kwargs: Any) -> Any:
        stand_in = [sys.executable, "-c", "import time; time.sleep(600)", "sandbox", "up"]
        started.append(real(stand_in, start_new_session=True))
        return started[-1]

    def interrupted(path: Path) -> None:
        if started:
            raise KeyboardInterrupt  # the user's Ctrl-C, as it waits

    monkeypatch.setattr(llmq_cli.main.subprocess, "Popen", popen)
    monkeypatch.setattr(llmq_cli.main, "_running_state", interrupted)
    try:
        # When the user presses Ctrl-C
        code = main(["--state-file", str(tmp_path / "sandbox.json"), "sandbox", "up", "--detach"])
        # Then the sandbox that was starting is stopped, said in a line (hunt 320: a traceback,
        # and the sandbox came up later, unseen by `down`)
        assert code == 130
        assert started[0].wait(timeout=10) == -signal.SIGKILL
        assert "the sandbox that was starting is stopped" in capsys.readouterr().err
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_a_state_file_of_another_llmq_version_still_lets_down_stop_its_sandbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a sandbox (here a stand-in holding its lock) whose state file this version cannot
    # validate: a key it does not know
    state = tmp_path / "sandbox.json"
    stand_in = _sleeper("sandbox", "up")
    _reaped_when_it_ends(stand_in)
    try:
        _stale_state(state, stand_in.pid)
        state.write_text(json.dumps({**json.loads(state.read_text()), "a_later_key": True}))
        # When the user stops it
        assert main(["--state-file", str(state), "sandbox", "down"]) == 0
        # Then it is stopped, in a line (hunt 320: a pydantic traceback, and it ran on)
        stand_in.wait(timeout=30)
        assert f"sandbox stopped (pid {stand_in.pid})" in capsys.readouterr().out
        assert not state.exists()
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_redrive_of_every_queue_goes_on_past_one_whose_move_still_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from botocore.exceptions import ClientError

    import llmq_cli.dead_letters
    from llmq_cli.dead_letters import DeadLetterQueue, RedriveResult

    queues = [
        DeadLetterQueue(name, f"https://q/{name}-dlq", f"https://q/{name}")
        for name in ("high", "low", "webhooks")
    ]
    started: list[str] = []

    def redrive(client: Any, queue: DeadLetterQueue, max_messages: int | None) -> RedriveResult:
        if queue.name == "high":
            # (AWS takes one move task a source queue: the high lane's earlier one still runs)
            error = {"Code": "InvalidParameterValue", "Message": "There is already a task running."}
            raise ClientError({"Error": error}, "StartMessageMoveTask")
        if queue.name == "low":
            raise ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "StartMessageMoveTask"
            )
        started.append(queue.name)
        return RedriveResult(queue.name, "StartMessageMoveTask", None, "handle-1")

    class Target:
        def __init__(self, args: Any) -> None:
            self.client = None

    monkeypatch.setattr(llmq_cli.main, "AwsTarget", Target)
    monkeypatch.setattr(llmq_cli.main, "_dead_letter_queues", lambda target, name: queues)
    monkeypatch.setattr(llmq_cli.dead_letters, "redrive", redrive)
    # When the operator redrives every queue while the high lane's earlier move runs on
    code = main(["dlq", "redrive", "--aws", "--stack", "Llmq"])
    out, err = capsys.readouterr()
    # Then the webhooks DLQ is redriven all the same, each queue says what became of it, and
    # the command fails naming the one AWS refused (hunt 298: it stopped at the high lane)
    assert started == ["webhooks"]
    results = {result["queue"]: result for result in json.loads(out)}
    assert results["high"].get("already_running") is True and "error" not in results["high"]
    assert "ThrottlingException" in results["low"]["error"]
    assert code == 1 and "not redriven: low" in err


@pytest.mark.parametrize("queue", ["poison", "reconciler-failures"])
def test_a_redrive_of_a_queue_nothing_can_process_is_refused_and_touches_no_aws(
    queue: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # (review 272: the reconciler's failures printed [] and exited 0, as if dealt with)
    import llmq_cli.main

    def no_aws(args: Any) -> None:
        raise AssertionError("a refused redrive reached AWS")

    monkeypatch.setattr(llmq_cli.main, "AwsTarget", no_aws)
    code = main(["dlq", "redrive", "--queue", queue, "--aws", "--stack", "Llmq"])
    assert code == 1
    assert "not redriven" in capsys.readouterr().err


@pytest.mark.parametrize(("api_concurrency", "shown"), [(20, 10), (100, 20)])
def test_tenants_show_names_the_long_poll_limit_the_api_enforces(api_concurrency: int, shown: int) -> None:
    from llmq.config import LlmqConfig
    from llmq.shares import ShareState
    from llmq.tenants import Tenant
    from llmq_cli.tenant_limits import describe

    # Given an api whose reserved concurrency bounds a tenant's waits below its tier's 20
    config = LlmqConfig.model_validate({"concurrency": {"api": api_concurrency}})
    assert config.tenant_limits("enterprise").max_long_polls == 20
    tenant = Tenant(id="ten_a", name="A", tier="enterprise", webhook_secrets=["whsec_x"])
    # When the operator reads the tenant's limits
    limits = describe(config, tenant, ShareState(tenant_id="ten_a"), None)["limits"]
    # Then they show the waits the api lets it hold at once (hunt 330: the tier's 20, where the
    # api refused the 11th wait 429 too_many_long_polls), and the override when there is one
    assert limits["max_long_polls"] == {"value": shown, "source": "tier"}
    overridden = describe(config, tenant, ShareState(tenant_id="ten_a"), None, max_long_polls=30)["limits"]
    assert overridden["max_long_polls"] == {"value": 30, "source": "override"}
