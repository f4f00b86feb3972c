"""Batches end to end over real HTTP in the shared sandbox: a batch runs, its results and its
one signed webhook; a replayed key; a cancel mid-batch that spares the provider."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e.conftest import SandboxUnderTest, run_llmq, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def _requests(count: int, prompt: str) -> list[dict[str, Any]]:
    return [{"custom_id": f"row-{index}", "body": {"prompt": f"{prompt} {index}"}} for index in range(count)]


def _batch(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    reply = client.get(f"/v1/batches/{batch_id}")
    assert reply.status_code == 200, reply.text
    found: dict[str, Any] = reply.json()
    return found


def _wait_ended(client: httpx.Client, batch_id: str, timeout: float = 120) -> dict[str, Any]:
    ended: dict[str, Any] = wait_until(
        lambda: (
            (batch := _batch(client, batch_id))["status"] in ("completed", "canceled", "expired", "failed")
            and batch
        ),
        timeout=timeout,
        interval=0.5,
    )
    assert ended, f"batch {batch_id} did not end: {_batch(client, batch_id)}"
    return ended


def _results(client: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    cursor: str | None = "0"
    while cursor is not None:
        reply = client.get(f"/v1/batches/{batch_id}/results", params={"cursor": cursor})
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/jsonl")
        lines += [json.loads(line) for line in reply.text.splitlines() if line]
        cursor = reply.headers.get("llmq-next-cursor")
    return lines


def test_a_batch_runs_its_items_once_and_sends_one_verified_webhook(sandbox: SandboxUnderTest) -> None:
    tenant = sandbox.tenant("enterprise")
    hook = f"{sandbox.state['receiver_url']}/hooks/batch"
    with sandbox.api("enterprise") as client:
        accepted = client.post(
            "/v1/batches",
            json={"requests": _requests(12, "Summarise [[latency:0.2]]"), "webhook": {"url": hook}},
            headers={"Idempotency-Key": "e2e-batch-1"},
        )
        assert accepted.status_code == 202, accepted.text
        batch_id = accepted.json()["id"]
        assert accepted.headers["location"] == f"{sandbox.api_url}/v1/batches/{batch_id}"
        # A replay of the key is the same batch
        replay = client.post(
            "/v1/batches",
            json={"requests": _requests(12, "Summarise [[latency:0.2]]"), "webhook": {"url": hook}},
            headers={"Idempotency-Key": "e2e-batch-1"},
        )
        assert (replay.status_code, replay.json()["id"]) == (202, batch_id)
        ended = _wait_ended(client, batch_id)
        assert ended["status"] == "completed"
        assert ended["request_counts"]["succeeded"] == 12
        lines = _results(client, batch_id)
    # Every item once, named by its custom_id, each run once at the provider
    assert [line["custom_id"] for line in lines] == [f"row-{index}" for index in range(12)]
    assert {line["status"] for line in lines} == {"succeeded"}
    assert [sandbox.provider_calls(line["job_id"]) for line in lines] == [1] * 12
    # And the whole file, from the presigned URL the ended batch answers (the sandbox's S3)
    file = httpx.get(ended["results_file_url"], timeout=30)
    assert file.status_code == 200, file.text
    assert [json.loads(line)["job_id"] for line in file.text.splitlines()] == [
        line["job_id"] for line in lines
    ]
    # One batch.completed, verified with the tenant's secret
    assert wait_until(lambda: sandbox.deliveries(batch_id), timeout=30)
    time.sleep(2)  # room for a duplicate to show up, if there were one
    deliveries = sandbox.deliveries(batch_id)
    assert [(d["type"], d["verified"], d["status"]) for d in deliveries] == [("batch.completed", True, 200)]
    request = deliveries[0]["request"]
    payload = Webhook(tenant["webhook_secret"]).verify(request["body"], request["headers"])
    assert payload["data"]["request_counts"]["succeeded"] == 12
    # Whose results link is the one GET answers, and answers (hunt 296: it named the
    # execute-api host of the template, which does not resolve in the sandbox)
    assert payload["data"]["results_url"] == ended["results_url"]
    with sandbox.api("enterprise") as client:
        assert client.get(payload["data"]["results_url"]).status_code == 200


def test_a_batch_canceled_mid_run_calls_the_provider_for_no_queued_item(sandbox: SandboxUnderTest) -> None:
    with sandbox.api("enterprise") as client:
        # Half again the tenant's cap (40 in the sandbox's high lane): a third wait when it is canceled
        accepted = client.post("/v1/batches", json={"requests": _requests(60, "Slow [[latency:2]]")})
        assert accepted.status_code == 202
        batch_id = accepted.json()["id"]
        assert wait_until(lambda: _batch(client, batch_id)["request_counts"]["running"] > 0, timeout=60)
        canceled = client.post(f"/v1/batches/{batch_id}/cancel")
        assert canceled.status_code in (200, 202)
        ended = _wait_ended(client, batch_id)
        lines = _results(client, batch_id)
        stopped = [line for line in lines if line["status"] == "canceled"]
        replies = {line["job_id"]: client.get(f"/v1/jobs/{line['job_id']}") for line in stopped}
    counts = ended["request_counts"]
    assert ended["status"] == "canceled"
    assert counts["succeeded"] + counts["canceled"] + counts["failed"] == 60
    assert len(stopped) == counts["canceled"]
    # Items still queued at the cancel ended canceled without ever starting; items not yet
    # written never were (404). None of them reached the provider.
    assert {reply.status_code for reply in replies.values()} <= {200, 404}
    never_started = [
        job_id
        for job_id, reply in replies.items()
        if reply.status_code == 404 or reply.json()["attempts"] == 0
    ]
    assert len(never_started) >= 10
    assert [sandbox.provider_calls(job_id) for job_id in never_started] == [0] * len(never_started)


def test_a_bad_item_is_refused_whole_over_http(sandbox: SandboxUnderTest) -> None:
    with sandbox.api("enterprise") as client:
        reply = client.post(
            "/v1/batches",
            json={"requests": [*_requests(2, "ok"), {"custom_id": "row-0", "body": {"prompt": "dup"}}]},
        )
    assert reply.status_code == 422
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["code"] == "invalid_request"
    assert "requests[2].custom_id" in reply.json()["detail"]


def test_the_cli_submits_a_jsonl_file_shows_progress_and_prints_the_results(
    sandbox: SandboxUnderTest,
) -> None:
    rows = sandbox.directory / "rows.jsonl"
    rows.write_text(
        "\n".join(json.dumps(request) for request in _requests(5, "Tag [[latency:0.1]]")) + "\n",
        encoding="utf-8",
    )
    submitted = run_llmq(
        sandbox.directory, "batches", "submit", str(rows), "--wait", "--tenant", "enterprise"
    )
    assert submitted.returncode == 0, submitted.stderr
    batch = json.loads(submitted.stdout)
    assert (batch["status"], batch["request_counts"]["succeeded"]) == ("completed", 5)
    # The progress, one line per change when stderr is not a terminal, ending at 5/5
    assert "] 5/5" in submitted.stderr.splitlines()[-1]
    results = run_llmq(sandbox.directory, "batches", "results", batch["id"], "--tenant", "enterprise")
    assert results.returncode == 0, results.stderr
    lines = [json.loads(line) for line in results.stdout.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"row-{index}" for index in range(5)]
    # The list shows it, newest first, with its progress
    listed = run_llmq(sandbox.directory, "batches", "list", "--tenant", "enterprise")
    assert listed.returncode == 0, listed.stderr
    header, *rows_shown = listed.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "ENDED/TOTAL"]
    assert rows_shown[0].split()[:3] == [batch["id"], "completed", "5/5"]
    # A line that is not JSON is named by the CLI, and nothing is sent
    rows.write_text('{"custom_id": "a", "body": {"prompt": "p"}}\n{not json\n', encoding="utf-8")
    refused = run_llmq(sandbox.directory, "batches", "submit", str(rows), "--tenant", "enterprise")
    assert refused.returncode != 0
    assert "rows.jsonl:2: not a JSON line" in refused.stderr


def test_a_file_put_to_its_upload_url_over_http_runs_as_a_batch_and_a_bad_file_fails_naming_its_line(
    sandbox: SandboxUnderTest,
) -> None:
    # Given a file PUT over HTTP to the URL POST /v1/uploads answers (the sandbox's S3)
    lines = [json.dumps(request) for request in _requests(3, "Upload [[latency:0.1]]")]
    content = "\n".join(lines).encode()
    with sandbox.api("enterprise") as client:
        upload = client.post("/v1/uploads", json={"size_bytes": len(content)})
        assert upload.status_code == 201, upload.text
        put = httpx.put(upload.json()["upload_url"], content=content, timeout=30)
        assert put.status_code == 200, put.text
        # When a batch names it, it is accepted at once and validated after
        reply = client.post("/v1/batches", json={"upload_id": upload.json()["id"]})
        assert reply.status_code == 202, reply.text
        assert reply.json()["status"] == "validating"
        # Then every line runs, once
        ended = _wait_ended(client, reply.json()["id"])
    assert (ended["status"], ended["request_counts"]["succeeded"]) == ("completed", 3)
    # And the CLI sends a file by the upload form too; one with a bad line fails, naming it
    rows = sandbox.directory / "upload.jsonl"
    rows.write_text(
        lines[0] + "\n" + json.dumps({"custom_id": "bad", "body": {"prompt": "p", "model": "nope"}}) + "\n",
        encoding="utf-8",
    )
    refused = run_llmq(
        sandbox.directory, "batches", "submit", str(rows), "--upload", "--wait", "--tenant", "enterprise"
    )
    assert refused.returncode == 1, refused.stderr
    assert json.loads(refused.stdout)["status"] == "failed"
    assert "upload.jsonl:2: model_not_allowed" in refused.stderr
