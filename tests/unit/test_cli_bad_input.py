"""The job CLI's bad input: one `llmq: ...` line and a failing exit status, never a traceback,
and nothing sent to the API. JSON's NaN, Infinity and numbers past a double's range (1e400,
which json.loads reads as infinity) are refused where they are read: httpx writes JSON with
allow_nan=False, so such a request could not be sent at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmq_cli.client import LlmqClient, Reply
from llmq_cli.main import main

# (nothing listens there, and unit tests open no socket anyway)
API = ["--api-url", "http://127.0.0.1:9", "--api-key", "llmq_sk_test"]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, Any]]:
    """Every request the CLI's client makes, answered as the API accepts one."""
    requests: list[tuple[str, str, Any]] = []

    def request(self: LlmqClient, method: str, path: str, **kwargs: Any) -> Reply:
        # (encoded as the real client's httpx does: a NaN or an infinity raises ValueError)
        httpx.Request(method, f"{self.base_url}{path}", json=kwargs.get("json"))
        requests.append((method, path, kwargs.get("json")))
        if path == "/v1/batches":
            return Reply(202, httpx.Headers(), {"id": "bat_1", "status": "validating"})
        return Reply(202, httpx.Headers(), {"id": "job_1", "status": "queued"})

    monkeypatch.setattr(LlmqClient, "request", request)
    return requests


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_INPUTS = {
    "param past a double's range": lambda tmp: ["submit", "hi", "--param", "temperature=1e400"],
    "param NaN": lambda tmp: ["submit", "hi", "--param", "temperature=NaN"],
    "param nested infinity": lambda tmp: ["submit", "hi", "--param", "stop=[-1e999]"],
    "file holding 1e400": lambda tmp: ["submit", "--file", _write(tmp, "f.json", "1e400")],
    "file holding NaN": lambda tmp: [
        "submit",
        "--file",
        _write(tmp, "f.json", '{"prompt": "hi", "params": {"temperature": NaN}}'),
    ],
    "file holding Infinity": lambda tmp: [
        "submit",
        "--file",
        _write(tmp, "f.json", '{"prompt": "hi", "params": {"top_p": -Infinity}}'),
    ],
    "file not JSON": lambda tmp: ["submit", "--file", _write(tmp, "f.json", "{prompt: hi}")],
    "file not an object": lambda tmp: ["submit", "--file", _write(tmp, "f.json", '["hi"]')],
    "file missing": lambda tmp: ["submit", "--file", str(tmp / "missing.json")],
    "file a directory": lambda tmp: ["submit", "--file", str(tmp)],
    "batch line holding NaN": lambda tmp: [
        "batches",
        "submit",
        _write(
            tmp,
            "f.jsonl",
            '{"custom_id": "a", "body": {"prompt": "hi"}}\n'
            '{"custom_id": "b", "body": {"prompt": "hi", "params": {"temperature": NaN}}}\n',
        ),
    ],
    "batch line holding 1e400": lambda tmp: [
        "batches",
        "submit",
        _write(tmp, "f.jsonl", '{"custom_id": "a", "body": {"prompt": "hi", "params": {"seed": 1e400}}}\n'),
    ],
    "batch line holding a lone surrogate": lambda tmp: [
        "batches",
        "submit",
        _write(tmp, "f.jsonl", '{"custom_id": "a", "body": {"prompt": "caf\\ud800"}}\n'),
    ],
    "file holding a lone surrogate": lambda tmp: [
        "submit",
        "--file",
        _write(tmp, "f.json", '{"prompt": "hi", "metadata": {"\\udc00": "x"}}'),
    ],
    "param holding a lone surrogate": lambda tmp: ["submit", "hi", "--param", 'stop=["\\udc00"]'],
    # (bytes that are not UTF-8 in an argument: Python's argv holds them as lone surrogates)
    "prompt not UTF-8": lambda tmp: ["submit", "caf\udce9"],
    "metadata not UTF-8": lambda tmp: ["submit", "hi", "--metadata", "k=\udce9"],
    # (past Python's parser's recursion limit, and past the API's depth but within that limit)
    "file nested 5,000 deep": lambda tmp: [
        "submit",
        "--file",
        _write(tmp, "f.json", '{"prompt": "x", "metadata": {"a": ' + _nested(5000) + "}}"),
    ],
    "file nested 985 deep": lambda tmp: [
        "submit",
        "--file",
        _write(tmp, "f.json", '{"prompt": "x", "metadata": {"a": ' + _nested(985) + "}}"),
    ],
    "param nested 5,000 deep": lambda tmp: ["submit", "hi", "--param", "stop=" + _nested(5000)],
    "batch line nested 5,000 deep": lambda tmp: [
        "batches",
        "submit",
        _write(
            tmp, "f.jsonl", '{"custom_id": "a", "body": {"prompt": "x", "metadata": ' + _nested(5000) + "}}\n"
        ),
    ],
    "batch file missing": lambda tmp: ["batches", "submit", str(tmp / "missing.jsonl")],
    "batch file missing, uploaded": lambda tmp: ["batches", "submit", "--upload", str(tmp / "missing.jsonl")],
    "batch file a directory, uploaded": lambda tmp: ["batches", "submit", "--upload", str(tmp)],
    # (an id the HTTP client would resolve into another resource's path: hunt 309, where
    # `llmq cancel ../batches/bat_x` canceled the batch)
    "cancel of a batch's path": lambda tmp: ["cancel", "../batches/bat_01a24c35281b5d28a2b3aa04d3"],
    "cancel of another job's path": lambda tmp: ["cancel", "job_a/../job_b"],
    "batch cancel of a job's path": lambda tmp: [
        "batches",
        "cancel",
        "../jobs/job_01a24c3529d78ddb7741ecdd2c",
    ],
    "get of a query": lambda tmp: ["get", "job_a?status=queued"],
    "get waiting, of a path": lambda tmp: ["get", "../jobs/job_a", "--wait"],
    "batch get of a path": lambda tmp: ["batches", "get", "bat_a/../bat_b"],
    "batch results of a path": lambda tmp: ["batches", "results", "bat_a/.."],
    "attempts of a path": lambda tmp: ["webhooks", "attempts", "bat_a/../../jobs/job_b"],
    "id with a newline": lambda tmp: ["cancel", "job_a\n"],
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_job_input_is_one_line_and_nothing_is_sent(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], sent: list[Any]
) -> None:
    argv = BAD_INPUTS[case](tmp_path)
    # When the CLI is given the bad input (main returns: nothing escapes it as a traceback)
    code = main([*argv, *API])
    err = capsys.readouterr().err
    # Then it fails with one `llmq: ...` line, and the API is never asked
    assert code != 0
    assert err.startswith("llmq: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert sent == []


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("param past a double's range", "--param temperature=1e400: 1e400 is past a double's range"),
        ("param NaN", "--param temperature=NaN: NaN is not a JSON number"),
        ("file holding NaN", "f.json: NaN is not a JSON number"),
        ("file missing", "missing.json: No such file or directory"),
        ("batch line holding NaN", "f.jsonl:2: NaN is not a JSON number"),
        ("batch line holding 1e400", "f.jsonl:1: 1e400 is past a double's range"),
        ("batch line holding a lone surrogate", 'f.jsonl:1: a string holds a lone surrogate ("\\ud800")'),
        ("file holding a lone surrogate", 'f.json: a string holds a lone surrogate ("\\udc00")'),
        ("prompt not UTF-8", "an argument is not UTF-8 text ('\\udce9')"),
        ("batch file missing", "missing.jsonl: No such file or directory"),
        (
            "cancel of another job's path",
            "'job_a/../job_b' is not a job id (job_ and lowercase letters and digits)",
        ),
        ("batch cancel of a job's path", "'../jobs/job_01a24c3529d78ddb7741ecdd2c' is not a batch id"),
        ("file nested 985 deep", "f.json: it nests deeper than 100 levels"),
        ("batch line nested 5,000 deep", "f.jsonl:1: it nests deeper than 100 levels"),
    ],
)
def test_the_line_names_the_file_the_line_and_the_number(
    case: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], sent: list[Any]
) -> None:
    main([*BAD_INPUTS[case](tmp_path), *API])
    assert said in capsys.readouterr().err


def test_valid_job_input_is_still_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sent: list[Any]
) -> None:
    # A prompt with JSON parameters (a large but finite number among them), and a text one
    assert (
        main(
            [
                "submit",
                "hi",
                "--param",
                "temperature=0.5",
                "--param",
                "seed=1e300",
                "--param",
                "stop=end",
                "--param",
                "suffix=Infinity War",
                "--param",
                "note=NaN-safe 1e999x",
                *API,
            ]
        )
        == 0
    )
    # A body from a file, with --param added to its own
    body = _write(tmp_path, "f.json", '{"prompt": "hi", "params": {"max_tokens": 5}}')
    assert main(["submit", "--file", body, "--param", "top_p=1", *API]) == 0
    # A batch file (a BOM, CRLF lines, a blank line)
    lines = "\ufeff" + '{"custom_id": "a", "body": {"prompt": "hi", "params": {"temperature": 1.5}}}\r\n\r\n'
    assert main(["batches", "submit", _write(tmp_path, "f.jsonl", lines), *API]) == 0
    assert sent == [
        (
            "POST",
            "/v1/jobs",
            {
                "prompt": "hi",
                # (text that only begins like NaN, Infinity or a number past a double is text)
                "params": {
                    "temperature": 0.5,
                    "seed": 1e300,
                    "stop": "end",
                    "suffix": "Infinity War",
                    "note": "NaN-safe 1e999x",
                },
            },
        ),
        ("POST", "/v1/jobs", {"prompt": "hi", "params": {"max_tokens": 5, "top_p": 1}}),
        (
            "POST",
            "/v1/batches",
            {"requests": [{"custom_id": "a", "body": {"prompt": "hi", "params": {"temperature": 1.5}}}]},
        ),
    ]
    # (each as httpx sends it: JSON without NaN or infinity)
    for _method, _path, sent_body in sent:
        json.dumps(sent_body, allow_nan=False)
    assert '"id": "job_1"' in capsys.readouterr().out


def test_webhooks_verify_names_a_missing_file_in_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["webhooks", "verify", "--secret", "whsec_x", "--file", str(tmp_path / "saved.json")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("llmq: ") and "saved.json: No such file or directory" in err


@pytest.mark.parametrize("timestamp", ["nan", "inf", "1e20", "99999999999999999999"])
def test_webhooks_verify_of_a_forged_timestamp_says_not_verified_in_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], timestamp: str
) -> None:
    # Given a saved delivery whose webhook-timestamp is no Unix time (a forged request's)
    saved = tmp_path / "delivery.json"
    headers = {"webhook-id": "msg_1", "webhook-timestamp": timestamp, "webhook-signature": "v1,abc"}
    saved.write_text(json.dumps({"headers": headers, "body": "{}"}))
    # When it is checked
    code = main(
        ["webhooks", "verify", "--secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "--file", str(saved)]
    )
    # Then it is not verified, saying why, not a traceback (hunt 314)
    out = capsys.readouterr()
    assert code == 1
    assert "webhook-timestamp is not a Unix time" in out.out + out.err


def test_a_deadline_of_zero_is_sent_for_the_api_to_refuse_not_dropped(sent: list[Any]) -> None:
    # (hunt 304: `if args.deadline` dropped 0, and a job with no deadline was sent and paid for)
    main(["submit", "hi", "--deadline", "0", *API])
    assert sent == [("POST", "/v1/jobs", {"prompt": "hi", "deadline_seconds": 0})]
