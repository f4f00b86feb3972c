"""moto in a process of its own (llmq_sandbox/moto_process.py): it serves AWS with the sandbox's
fidelity patches, answers the one sandbox path, and never outlives the sandbox."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time
import urllib.error
import weakref
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from llmq_cli.sandbox_state import pid_alive
from llmq_sandbox.moto_process import MotoProcess, MotoSettings
from llmq_sandbox.settling import settle


@pytest.fixture
def moto() -> Iterator[MotoProcess]:
    process = MotoProcess(MotoSettings(index_lag_seconds=0, fair_queues=True, enforce_iam=False))
    process.start()
    yield process
    process.stop()


def _client(moto: MotoProcess, service: str) -> object:
    return boto3.client(
        service,
        endpoint_url=moto.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_it_serves_aws_with_the_sandboxs_patches(moto: MotoProcess) -> None:
    # Given moto in its own process, addressed by name (CloudFormation's TemplateURL needs it)
    assert moto.endpoint_url.startswith("http://localhost:")
    assert moto.pid != 0 and pid_alive(moto.pid)
    sqs = _client(moto, "sqs")
    url = sqs.create_queue(QueueName="patched")["QueueUrl"]  # type: ignore[attr-defined]
    sqs.send_message(QueueUrl=url, MessageBody="x")  # type: ignore[attr-defined]
    first = sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)["Messages"][0]  # type: ignore[attr-defined]
    sqs.receive_message(QueueUrl=url, VisibilityTimeout=30)  # type: ignore[attr-defined]
    # When the receipt handle of the earlier receive is used (moto alone accepts any it gave)
    with pytest.raises(ClientError) as refused:
        sqs.change_message_visibility(  # type: ignore[attr-defined]
            QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=60
        )
    # Then it is refused, as on AWS: the child applied the fidelity patches before serving
    assert refused.value.response["Error"]["Code"] == "ReceiptHandleIsInvalid"


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/x-ndjson"],
)
def test_a_presigned_put_stores_its_body_whatever_its_content_type(
    moto: MotoProcess, content_type: str
) -> None:
    # Given a presigned PUT URL, as POST /v1/uploads answers one
    s3 = _client(moto, "s3")
    s3.create_bucket(Bucket="uploads")  # type: ignore[attr-defined]
    url = s3.generate_presigned_url(  # type: ignore[attr-defined]
        "put_object", Params={"Bucket": "uploads", "Key": "rows.jsonl"}, ExpiresIn=60
    )
    body = b'{"body": {"prompt": "a=b&key=c"}}\n{"body": {"prompt": "caf\xc3\xa9"}}\n'
    # When a file is PUT with the type curl gives `--data-binary` (a form), or another
    put = httpx.put(url, content=body, headers={"Content-Type": content_type}, timeout=10)
    # Then S3 keeps the bytes as sent, and the type as the object's metadata
    assert put.status_code == 200, put.text
    stored = s3.get_object(Bucket="uploads", Key="rows.jsonl")  # type: ignore[attr-defined]
    assert stored["Body"].read() == body
    assert stored["ContentType"] == content_type


def test_keeping_an_unknown_session_alive_is_refused(moto: MotoProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        moto.outlive(["ASIANOSUCHSESSION000"], years=1)
    assert refused.value.code == 404


def test_it_exits_when_the_sandbox_that_started_it_dies() -> None:
    # Given a sandbox process that started moto, then died without stopping it (a SIGKILL)
    script = textwrap.dedent(
        """
        import os
        from llmq_sandbox.moto_process import MotoProcess, MotoSettings
        moto = MotoProcess(MotoSettings(index_lag_seconds=0, fair_queues=False, enforce_iam=False))
        moto.start()
        print(moto.pid, flush=True)
        os._exit(0)
        """
    )
    died = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    child = int(died.stdout.split()[0])
    # Then moto's process goes too, within a second or two
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whoever adopted it, maybe late)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settling_collects_the_garbage_since_the_last_time_and_freezes_what_lives() -> None:
    """What keeps moto's full collections short (llmq_sandbox/settling.py): the cycles that
    died are reclaimed first, and what is alive leaves the collector's sight."""
    dead = _Cycle()
    dead_ref = weakref.ref(dead)
    del dead
    alive = _Cycle()
    frozen_before = gc.get_freeze_count()
    try:
        settle()
        assert dead_ref() is None
        assert gc.get_freeze_count() > frozen_before
        assert all(tracked is not alive for tracked in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()


def test_a_whole_settle_reclaims_a_cycle_that_died_after_it_was_frozen() -> None:
    """A cycle alive at a freeze and dropped later is out of the collector's sight until the
    next whole settle, which every Settler runs every `full_every` settles."""
    lingering = _Cycle()
    lingering_ref = weakref.ref(lingering)
    try:
        settle()
        del lingering
        settle()
        assert lingering_ref() is not None  # frozen: a plain settle cannot see it
        settle(full=True)
        assert lingering_ref() is None
    finally:
        gc.unfreeze()


def test_a_stopped_settler_gives_the_collector_back_what_it_froze() -> None:
    # Given a settler that froze a process's objects (an in-process sandbox, a benchmark's): in
    # a process of its own, whose collections no other test's objects or finalizers slow
    script = textwrap.dedent(
        """
        import gc, time
        from llmq_sandbox.settling import Settler
        settler = Settler(seconds=0.01).start()
        deadline = time.monotonic() + 30
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        frozen = gc.get_freeze_count()
        settler.stop()
        print(frozen > 0, gc.get_freeze_count())
        """
    )
    ran = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    # When it stops, then nothing stays frozen: the process collects as usual again
    assert ran.stdout.split() == ["True", "0"], ran.stderr
