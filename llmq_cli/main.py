"""`llmq`: the sandbox, the API, tenants, dead letters and webhook checks from one command.

    llmq sandbox up [--detach] | down | status
    llmq submit "prompt" [--webhook URL] [--wait N] ...     llmq get JOB [--wait]
    llmq cancel JOB                                          llmq jobs [--status S] [--wide | --json]
    llmq tenants create --name N --tier T | rotate-secret TENANT | show TENANT
    llmq tenants issue-key TENANT | keys TENANT | revoke-key TENANT KEY_ID
    llmq tenants set-limits TENANT [--max-concurrency N] [--max-active N] [--rate R --burst B] [--clear L]
    llmq tenants attach-usage-keys [TENANT ...] | refresh-caps [TENANT ...]
    llmq dlq list | redrive [--queue NAME]
    llmq webhooks verify --secret whsec_... --file saved_request.json
    llmq demo

API commands use the running sandbox (`.llmq/sandbox.json`, first tenant or --tenant), or a
deployed API with --api-url and --api-key. AWS commands (tenants, dlq) use the sandbox's
moto when one is running, else your AWS credentials (or --endpoint-url).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

import httpx
from httpx_sse import ServerSentEvent

from llmq.models import MAX_JSON_DEPTH, TERMINAL_STATUSES, blank_line
from llmq_cli.sandbox_state import (
    SandboxState,
    TenantCredentials,
    lock_holder,
    pid_alive,
    read_state,
    remove_state,
    sandbox_alive,
    state_file,
    state_pid,
    take_lock,
    write_state,
)

DETACH_TIMEOUT_SECONDS = 240.0
STOP_TIMEOUT_SECONDS = 20.0


class CliError(Exception):
    """Printed as `llmq: <message>`; exit status 1."""


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ---- sandbox up / down / status -------------------------------------------------------------


def _running_state(path: Path) -> SandboxState | None:
    try:
        state = read_state(path)
    except (FileNotFoundError, ValueError):
        return None
    return state if sandbox_alive(state.pid, path) else None


def _api_answers(state: SandboxState) -> bool:
    try:
        return httpx.get(f"{state.api_url}/v1/openapi.json", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


# What the emulator needs beyond `pip install .[cli]`, by import name.
SANDBOX_EXTRA_MODULES = ("moto", "aws_cdk", "cdk_nag", "rich")


def require_sandbox_extra() -> None:
    """The emulator is an extra: say how to get it rather than fail deep inside an import."""
    from importlib.util import find_spec

    missing = [name for name in SANDBOX_EXTRA_MODULES if find_spec(name) is None]
    if missing:
        raise CliError(
            f"the sandbox needs the `sandbox` extra (missing: {', '.join(missing)}); "
            "from a checkout run `pip install -e '.[sandbox]'` or `make install`"
        )


def cmd_sandbox_up(args: argparse.Namespace) -> int:
    require_sandbox_extra()
    path = state_file(args.state_file)
    running = _running_state(path)
    if running is not None and running.pid != os.getpid():
        raise CliError(f"a sandbox is already running (pid {running.pid}, {path}); `llmq sandbox down` first")
    if args.no_iam:
        from llmq_sandbox.config import IAM_VAR

        os.environ[IAM_VAR] = "off"  # read by the sandbox, here or in the detached child
    if args.detach:
        starting = lock_holder(path)
        if starting is not None:
            raise CliError(_already(starting, path))
        return _up_detached(path, args.timeout)
    # Held for the sandbox's life: two `up`s at once both booted, and the second's state file
    # hid the first from `down` for good (hunt 320).
    lock = take_lock(path)
    if lock is None:
        raise CliError(_already(lock_holder(path), path))
    try:
        return _up_foreground(path, announce=not args.serve)
    finally:
        os.close(lock)


def _already(pid: int | None, path: Path) -> str:
    return (
        f"a sandbox is already starting or running (pid {pid or 'not known yet'}, {path}); "
        "`llmq sandbox down` first"
    )


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _up_foreground(path: Path, announce: bool) -> int:
    import logging

    from llmq_sandbox.launcher import Sandbox, SandboxStartError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # Ctrl-C and `llmq sandbox down` (SIGTERM) both stop it cleanly; SIGINT is set explicitly
    # because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    sandbox = Sandbox(log_dir=path.parent / "logs")
    pid = os.getpid()
    try:
        if announce:
            print("starting the sandbox: synthesizing the CDK app and deploying it into moto ...", flush=True)
        try:
            state = sandbox.start(pid)
        except SandboxStartError as exc:
            print(f"llmq: the sandbox did not start: {exc}", file=sys.stderr)
            return 1
        write_state(path, state)
        if announce:
            print(_banner(state, path), flush=True)
        else:
            print(f"sandbox ready: {state.api_url}", flush=True)
        _serve_while_aws_runs(sandbox)
        print(
            f"llmq: {sandbox.down_part() or 'a part of the sandbox exited'}; stopping the sandbox",
            file=sys.stderr,
        )
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        # Stopping is under way: a second Ctrl-C or `llmq sandbox down` must not cut it short
        # (`down` escalates to SIGKILL if it takes too long).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sandbox.stop()
        remove_state(path, pid)
    if announce:
        print("sandbox stopped")
    return code


def _serve_while_aws_runs(sandbox: Any) -> None:
    """Until interrupted, or until moto's process is gone (its state with it), or the Lambda
    service's runtime (no function could run): a sandbox that answered on without either would
    fail every call behind a healthy-looking gateway."""
    while sandbox.aws_alive:
        time.sleep(1.0)


def _banner(state: SandboxState, path: Path) -> str:
    enterprise = state.tenant("enterprise")
    free = state.tenant("free")
    api, hook = state.api_url, f"{state.receiver_url}/hooks/demo"
    return f"""
llmq sandbox is up (pid {state.pid}). State: {path}  Function logs: {path.parent / "logs"}/

  API        {api}
  AWS (moto) {state.aws_endpoint_url}   region {state.region}
  provider   {state.provider_url}
  receiver   {state.receiver_url}   (GET /_deliveries)

Try it (enterprise tenant {enterprise.id}; the free tenant is {free.id}, key {free.api_key}):

  export LLMQ_API={api}
  export LLMQ_KEY={enterprise.api_key}

  # submit; the fake provider obeys directives in the prompt: [[latency:S]] [[tokens:N]]
  # [[fail:503x1]] [[fail:429x2]] [[fail:400:context_length_exceeded]] [[hang]] [[stall]]
  curl -s $LLMQ_API/v1/jobs -H "Authorization: Bearer $LLMQ_KEY" -H 'Content-Type: application/json' \\
       -H 'Idempotency-Key: try-1' \\
       -d '{{"prompt": "Say hello [[latency:1]]", "webhook": {{"url": "{hook}"}}}}'

  # poll it (long-poll up to 20 s), list, cancel
  curl -s "$LLMQ_API/v1/jobs/JOB_ID?wait=10" -H "Authorization: Bearer $LLMQ_KEY"
  curl -s "$LLMQ_API/v1/jobs?limit=5" -H "Authorization: Bearer $LLMQ_KEY"
  curl -s -X POST $LLMQ_API/v1/jobs/JOB_ID/cancel -H "Authorization: Bearer $LLMQ_KEY"

  # what the receiver got (verified with the reference standardwebhooks library)
  curl -s {state.receiver_url}/_deliveries

  # or the CLI: llmq submit "Say hello" --wait 10 ; llmq jobs ; llmq dlq list

Ctrl-C stops it.
"""


def _up_detached(path: Path, timeout: float) -> int:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    log_path = path.parent / "sandbox.log"
    command = [sys.executable, "-m", "llmq_cli", "--state-file", str(path), "sandbox", "up", "--serve"]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise CliError(
                    f"the sandbox exited during start (status {process.returncode}):\n{_tail(log_path)}"
                )
            state = _running_state(path)
            if state is not None and state.pid == process.pid and _api_answers(state):
                print(f"sandbox up (pid {state.pid}): API {state.api_url}; state in {path}")
                return 0
            time.sleep(0.25)
    except KeyboardInterrupt:
        # Ctrl-C while it starts: it does not come up later behind the user's back, unseen by
        # `down` (hunt 320), and no traceback.
        _kill_group(process.pid)
        print("llmq: interrupted; the sandbox that was starting is stopped", file=sys.stderr)
        return 130
    _kill_group(process.pid)
    raise CliError(f"the sandbox did not answer within {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _kill_group(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def cmd_sandbox_down(args: argparse.Namespace) -> int:
    path = state_file(args.state_file)
    # The sandbox holding the lock, if any: perhaps still starting, with no state file yet, or
    # one that another's state file hides (hunt 320).
    holder = lock_holder(path)
    for _ in range(20):
        if holder != 0:
            break
        time.sleep(0.05)  # (its lock just taken, its pid not yet written: a moment)
        holder = lock_holder(path)
    try:
        pid: int | None = read_state(path).pid
    except FileNotFoundError:
        pid = None
    except ValueError:
        # (written by another llmq version, or cut short: its pid still says what to stop;
        # hunt 320: a traceback, and the sandbox could not be stopped)
        pid = state_pid(path)
    if holder and holder != pid:
        pid = holder
    if pid is None:
        path.unlink(missing_ok=True)  # (readable or not: its sandbox is gone)
        print("no sandbox is running")
        return 0
    if not sandbox_alive(pid, path):
        # (its pid gone, or the OS's since for another process: nothing of ours to stop)
        path.unlink(missing_ok=True)
        print(f"no sandbox is running (the state file named pid {pid}, which is not one); removed it")
        return 0
    # A detached sandbox leads its own process group (its function environments are in it);
    # a foreground one (`make dev`) shares the terminal's, which must not be signalled.
    leads_group = _process_group(pid) == pid
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    if leads_group:
        _kill_group(pid)
    path.unlink(missing_ok=True)
    print(f"sandbox stopped (pid {pid})")
    return 0


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def cmd_sandbox_status(args: argparse.Namespace) -> int:
    path = state_file(args.state_file)
    state = _running_state(path)
    if state is None:
        holder = lock_holder(path)
        if holder is not None:
            # (starting, or its state file is another version's: not "none", which `up` would
            # take for leave to start a second; hunt 320)
            print(
                f"a sandbox (pid {holder or 'not known yet'}) is starting, or its state file cannot be read"
            )
            return 1
        print("no sandbox is running")
        return 1
    _print_json({**state.model_dump(exclude_none=True), "api_answers": _api_answers(state)})
    return 0


# ---- the API --------------------------------------------------------------------------------


# An API key as a header carries it: printable ASCII, no spaces.
_PRINTABLE_KEY = re.compile(r"[\x21-\x7e]+")


def _client(args: argparse.Namespace) -> Any:
    from llmq_cli.client import LlmqClient

    api_url = args.api_url or os.environ.get("LLMQ_API_URL")
    api_key = args.api_key or os.environ.get("LLMQ_API_KEY")
    if api_key and not _PRINTABLE_KEY.fullmatch(api_key):
        # (httpx refuses such a header naming its value, the secret, in the error: hunt 293)
        raise CliError(
            "the API key holds whitespace or a character that cannot be sent in a header "
            "(read from a file with CRLF line ends?)"
        )
    if api_url and api_key:
        return LlmqClient(api_url, api_key)
    if api_url or api_key:
        raise CliError("give both --api-url and --api-key (or neither, to use the sandbox)")
    path = state_file(args.state_file)
    try:
        state = read_state(path)
    except FileNotFoundError as exc:
        raise CliError(f"{exc}, or pass --api-url and --api-key") from exc
    try:
        tenant = state.tenant(args.tenant)
    except LookupError as exc:
        raise CliError(str(exc)) from exc
    return LlmqClient(state.api_url, tenant.api_key)


def _pairs(values: Sequence[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        key, separator, rest = value.partition("=")
        if not separator:
            raise CliError(f"{what} must look like key=value, not {value!r}")
        pairs[key] = rest
    return pairs


class UnsendableJson(ValueError):
    """JSON that parses but that no request can carry."""


class NotFiniteNumber(UnsendableJson):
    """NaN, Infinity, or a number past a double's range (1e400): JSON (and the API) has none,
    and the request could not be sent (httpx writes JSON with allow_nan=False)."""


class LoneSurrogate(UnsendableJson):
    """A string escape of half a UTF-16 pair (`"\\ud800"`, text cut inside an emoji): no
    Unicode text, and the request could not be sent (httpx writes JSON as UTF-8)."""


class NestsTooDeep(UnsendableJson):
    """Arrays and objects inside one another past what the API reads (`MAX_JSON_DEPTH`): no
    request of the schema nests so; deep enough, Python's own parser gives up (RecursionError)."""


def _check_text(value: Any) -> None:
    """Every string in a parsed JSON value, its object keys too, is Unicode text; and the value
    nests no deeper than the API reads (walked without recursion: it may nest deeply)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                half = json.dumps(item[exc.start])
                raise LoneSurrogate(
                    f"a string holds a lone surrogate ({half}), half of a UTF-16 pair"
                ) from exc
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise NestsTooDeep(f"it nests deeper than {MAX_JSON_DEPTH} levels, which no request does")
            inner = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            pending.extend((part, depth + 1) for part in inner)


def _refuse_constant(constant: str) -> Any:
    raise NotFiniteNumber(f"{constant} is not a JSON number (JSON has no NaN or infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotFiniteNumber(f"{text} is past a double's range (it reads as infinity)")
    return value


def loads_finite(text: str) -> Any:
    """json.loads, but NaN, Infinity and numbers past a double's range (NotFiniteNumber), and
    lone surrogate escapes (LoneSurrogate), are refused rather than read as values no request
    can carry (both UnsendableJson, a ValueError)."""
    try:
        loaded = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError as exc:
        raise NestsTooDeep(f"it nests deeper than {MAX_JSON_DEPTH} levels, which no request does") from exc
    _check_text(loaded)
    return loaded


def _file_error(path: Path, exc: OSError) -> CliError:
    return CliError(f"{path}: {exc.strerror or exc}")


def _param_value(key: str, raw: str) -> Any:
    """A --param value: JSON when the whole value is JSON, else text; a whole value that is
    NaN, Infinity or a number past a double's range is refused (text that only begins like
    one, `Infinity War`, is text)."""
    try:
        json.loads(raw)
    except ValueError:
        return raw
    except RecursionError:
        pass  # (JSON too deep to read: refused as such below)
    try:
        return loads_finite(raw)
    except UnsendableJson as exc:
        as_text = shlex.quote(f"{key}={json.dumps(raw)}")
        raise CliError(
            f"--param {key}={raw}: {exc}; to send it as text, give it as a JSON string: {as_text}"
        ) from exc


def _submit_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        path = Path(args.file)
        try:
            # UTF-8 whatever the locale, a BOM ignored: as a batch file is read (hunt 299: a
            # Latin-1 or cp1252 locale sent "café" as "cafÃ©", and a BOM was refused).
            loaded = loads_finite(path.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            raise _file_error(path, exc) from exc
        except UnicodeDecodeError as exc:
            raise CliError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except UnsendableJson as exc:
            raise CliError(f"{path}: {exc}") from exc
        except ValueError as exc:
            raise CliError(f"{path}: not a JSON body ({exc})") from exc
        if not isinstance(loaded, dict):
            raise CliError(f"{path}: a request body is a JSON object, not {type(loaded).__name__}")
        body: dict[str, Any] = loaded
    elif args.prompt:
        body = {"prompt": args.prompt}
    else:
        raise CliError("give a prompt, or --file with a JSON body")
    if args.model:
        body["model"] = args.model
    params = {key: _param_value(key, value) for key, value in _pairs(args.param, "--param").items()}
    if params:
        if not isinstance(body.get("params", {}), dict):
            raise CliError(f"{args.file}: its params are not a JSON object, so --param cannot add to them")
        body["params"] = {**body.get("params", {}), **params}
    if args.webhook:
        body["webhook"] = {"url": args.webhook, **({"events": args.event} if args.event else {})}
    metadata = _pairs(args.metadata, "--metadata")
    if metadata:
        if not isinstance(body.get("metadata", {}), dict):
            raise CliError(f"{args.file}: its metadata is not a JSON object, so --metadata cannot add to it")
        body["metadata"] = {**body.get("metadata", {}), **metadata}
    if args.deadline is not None:
        # (0 too: the API's 422 says what a deadline may be, where dropping it sent, and paid
        # for, a job with none; hunt 304)
        body["deadline_seconds"] = args.deadline
    if getattr(args, "stream", False):
        body["stream"] = True
    return body


def print_stream(
    events: Iterable[ServerSentEvent],
    out: TextIO,
    err: TextIO,
    live: bool | None = None,
    fetch: Callable[[str], str | None] | None = None,
) -> dict[str, Any] | None:
    """A job's output to `out`; a retried attempt's restart and the end, to `err`. The
    terminal Job, or None if the events stopped before it.

    `live` (by default, when `out` is a terminal): each delta as it comes, so a person watches
    the generation; a retried attempt's text then follows the abandoned one's, which the
    restart's line on `err` tells apart. Otherwise (a file, a pipe) the output once it has
    ended, with what a retried attempt abandoned dropped (`"reset": true`, docs/streaming.md),
    so that what is written is the job's output: the result `done` carries (or, held in S3,
    what `fetch` reads from its `result_url`), else the joined deltas. Events that stop before
    `done` (a timeout, an interrupt) leave what was read so far."""
    live = out.isatty() if live is None else live
    text: list[str] = []
    attempt = None
    try:
        for event in events:
            data = json.loads(event.data)
            if event.event == "output.delta":
                if data.get("reset") and attempt is not None:
                    again = (
                        f"attempt {data['attempt']} starts again"
                        if data["attempt"] != attempt
                        else "the output starts again from its beginning"
                    )
                    print(f"\n[{again}]", file=err, flush=True)
                if data.get("reset"):
                    text.clear()
                attempt = data.get("attempt")
                if live:
                    out.write(data["delta"])
                    out.flush()
                else:
                    text.append(data["delta"])
            elif event.event == "done":
                result = data.get("result") or {}
                output = result.get("output")
                if not live and not isinstance(output, str) and data.get("result_url") and fetch:
                    output = fetch(str(data["result_url"]))
                if not live:
                    out.write(output if isinstance(output, str) else "".join(text))
                out.write("\n")
                out.flush()
                return dict(data)
    except BaseException:
        if not live:
            out.write("".join(text))
            out.flush()
        raise
    if not live:
        out.write("".join(text))
        out.flush()
    return None


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.submit(_submit_body(args), args.idempotency_key, args.wait)
        if reply.headers.get("idempotent-replayed"):
            print("Idempotent-Replayed: true (the original job; nothing was created)", file=sys.stderr)
        job = reply.body
        if args.stream:
            print(f"{job['id']} streaming:", file=sys.stderr)
            done = print_stream(
                client.follow(job["id"], args.timeout), sys.stdout, sys.stderr, fetch=client.result_output
            )
            if done is None:
                raise CliError(f"job {job['id']} did not end within {args.timeout:g} s")
            summary = f"{done['id']} {done['status']}"
            if done.get("error"):
                summary += f": {done['error']['code']}"
            print(summary, file=sys.stderr)
            return 0 if done["status"] == "succeeded" else 1
        if args.follow and job["status"] not in TERMINAL_STATUSES:
            # (the id first: a wait cut short must not leave the job unnamed, and a re-run of
            # the command, without a key, would pay for a second one)
            print(f"{job['id']} {job['status']}; following", file=sys.stderr)
            job = client.wait(job["id"], args.timeout)
    _print_json(job)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.wait(args.job_id, args.timeout) if args.wait else client.get(args.job_id)
    _print_json(job)
    return 0


def cmd_status_deprecated(args: argparse.Namespace) -> int:
    print("llmq: `llmq status JOB_ID` is deprecated; use `llmq get JOB_ID`", file=sys.stderr)
    return cmd_get(args)


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.cancel(args.job_id))
    return 0


# (heading, how to read it from a job); `--wide` adds the second group.
_JOB_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("ID", lambda job: job["id"]),
    ("STATUS", lambda job: job["status"]),
    ("LANE", lambda job: job["lane"]),
    ("CREATED", lambda job: job["created_at"]),
)
_WIDE_JOB_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("MODEL", lambda job: job["model"]),
    ("ATTEMPTS", lambda job: str(job["attempts"])),
    ("ERROR", lambda job: (job.get("error") or {}).get("code", "")),
)


def job_table(jobs: Sequence[dict[str, Any]], wide: bool = False) -> str:
    """Plain aligned columns, as kubectl prints them: a cell is never cut short, so an id
    can be copied into `llmq get` or `llmq cancel`, and the output reads well in awk."""
    columns = _JOB_COLUMNS + (_WIDE_JOB_COLUMNS if wide else ())
    rows = [[heading for heading, _ in columns]]
    rows += [[cell(job) or "" for _, cell in columns] for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "   ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.all_jobs(args.status) if args.all else client.page(args.status, args.limit)["data"]
    if args.json:
        _print_json(jobs)
    else:
        print(job_table(jobs, wide=args.wide))
    return 0


# ---- batches ----------------------------------------------------------------------------------

_BATCH_ENDED = ("completed", "canceled", "expired", "failed")


def read_batch_file(path: Path) -> list[dict[str, Any]]:
    """A JSONL file of requests, one `{"custom_id", "body"}` per line (blank lines skipped, by the
    rule the worker reads an upload with: `blank_line`). A
    line that is not JSON (or holds NaN, Infinity or 1e400, which no request can carry) is
    named here; the API names what is wrong inside a valid one."""
    requests = []
    # As the API reads an upload: a BOM is ignored, and lines end at "\n" (or "\r\n") only,
    # so a prompt holding U+2028, U+2029 or U+0085 raw (`ensure_ascii=False`) stays whole.
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise _file_error(path, exc) from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    for number, line in enumerate((line.removesuffix("\r") for line in text.split("\n")), start=1):
        if blank_line(line.encode()):
            continue
        try:
            requests.append(loads_finite(line))
        except UnsendableJson as exc:
            raise CliError(f"{path}:{number}: {exc}") from exc
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise CliError(f"{path}:{number}: not a JSON line ({reason})") from exc
    if not requests:
        raise CliError(f"{path}: no requests")
    return requests


def progress_line(batch: dict[str, Any], width: int = 30) -> str:
    """`[#######.......] 120/200  succeeded 118  failed 2  running 10  queued 70`."""
    counts = batch["request_counts"]
    total = max(1, counts["total"])
    ended = counts["succeeded"] + counts["failed"] + counts["canceled"] + counts["expired"]
    filled = width * ended // total
    parts = [
        f"{name} {counts[name]}"
        for name in ("succeeded", "failed", "canceled", "expired", "running", "queued")
    ]
    shown = [part for part in parts if not part.endswith(" 0") or part.startswith(("succeeded", "queued"))]
    return f"[{'#' * filled}{'.' * (width - filled)}] {ended}/{counts['total']}  " + "  ".join(shown)


def watch_batch(client: Any, batch_id: str, timeout: float, interval: float = 1.0) -> dict[str, Any]:
    """Poll the batch until it ends, its progress on stderr (one line, redrawn on a terminal)."""
    from llmq_cli.client import ApiError

    deadline = time.monotonic() + timeout
    redraw = sys.stderr.isatty()
    # (a poll met by a 429, a 5xx or a dropped connection is waited out, up to the watch's end:
    # the batch runs on; review 266: not two minutes past it)
    batch: dict[str, Any] = client.batch(batch_id, max(0.0, deadline - time.monotonic()))
    last = ""
    while True:
        line = progress_line(batch)
        if line != last:
            print(f"\r{line}" if redraw else line, end="" if redraw else "\n", file=sys.stderr, flush=True)
            last = line
        if batch["status"] in _BATCH_ENDED or time.monotonic() > deadline:
            if redraw:
                print(file=sys.stderr)
            return batch
        time.sleep(interval)
        try:
            batch = client.batch(batch_id, max(0.0, deadline - time.monotonic()))
        except httpx.TransportError:
            pass  # (no answer until the watch's end: the batch as last read, as `wait` answers)
        except ApiError as exc:
            if exc.status != 429 and exc.status < 500:
                raise


# Past this size a file goes by the upload form: an inline body holds 4.5 MB at most.
_INLINE_FILE_BYTES = 4_000_000


def cmd_batches_submit(args: argparse.Namespace) -> int:
    path = Path(args.file)
    # (a file missing or unreadable is said before anything is sent: an upload asks the API
    # for its URL before it reads the file)
    try:
        size = path.stat().st_size
        upload = args.upload or size > _INLINE_FILE_BYTES
        if upload and size > 0:
            with path.open("rb"):
                pass
    except OSError as exc:
        raise _file_error(path, exc) from exc
    from llmq_cli.client import ApiError

    body: dict[str, Any] = {} if upload else {"requests": read_batch_file(path)}
    if args.webhook:
        body["webhook"] = {"url": args.webhook}
    if args.lane:
        body["lane"] = args.lane
    with _client(args) as client:
        if upload:
            if size == 0:
                raise CliError(f"{path} is empty: no request to send")
            # The API validates the file's lines after its 202; a bad one fails the batch.
            body["upload_id"] = client.upload(path)
        try:
            reply = client.submit_batch(body, args.idempotency_key)
        except ApiError as exc:
            if upload or not (_too_big_to_send_inline(exc) or _sent_by_upload_before(exc, args)):
                raise
            # More lines (or bytes) than this deployment takes in one body, which its upload
            # form takes: nothing was written for the refused body, so the same key is free. Or
            # a run before this one under the same key went that way: its batch knows the file
            # by its upload (its size and digest), so the same file sent again is its replay.
            print(f"{exc}: sending {path} by the upload form", file=sys.stderr)
            del body["requests"]
            body["upload_id"] = client.upload(path)
            reply = client.submit_batch(body, args.idempotency_key)
        if reply.headers.get("idempotent-replayed"):
            print("Idempotent-Replayed: true (the original batch; nothing was created)", file=sys.stderr)
        batch = reply.body
        if args.wait:
            # (the id first: a wait cut short must not leave the batch unnamed, and a re-run of
            # the command, without a key, would pay for a second one: hunt 293)
            print(f"{batch['id']} {batch['status']}; watching", file=sys.stderr)
            batch = watch_batch(client, batch["id"], args.timeout)
    _print_json(batch)
    for error in batch.get("errors") or []:
        # An uploaded file refused: where, and why (no item ran).
        print(f"{path}:{error['line']}: {error['code']}: {error['message']}", file=sys.stderr)
    return 1 if batch["status"] == "failed" else 0


def _sent_by_upload_before(exc: Any, args: argparse.Namespace) -> bool:
    """The inline body refused as another under its Idempotency-Key: perhaps the same file,
    sent by the upload form by an earlier run (`_too_big_to_send_inline`)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return bool(args.idempotency_key) and exc.status == 422 and body.get("code") == "idempotency_key_reused"


def _too_big_to_send_inline(exc: Any) -> bool:
    """A batch body refused for its size alone: more requests than `batches.max_requests`, or
    more bytes than `batches.max_body_bytes` (both below what an upload may hold)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    if exc.status == 413:
        return body.get("code") == "payload_too_large"
    errors = body.get("errors") or []
    return (
        exc.status == 422
        and bool(errors)
        and all(
            error.get("loc") == ["body", "requests"] and error.get("type") == "too_long" for error in errors
        )
    )


def cmd_batches_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.batch(args.batch_id))
    return 0


def batch_table(batches: list[dict[str, Any]]) -> str:
    """One line per batch: id, status, its progress, when it was created."""
    if not batches:
        return "no batches"
    rows = [("ID", "STATUS", "ENDED/TOTAL", "SUCCEEDED", "FAILED", "CREATED")]
    for batch in batches:
        counts = batch["request_counts"]
        ended = counts["succeeded"] + counts["failed"] + counts["canceled"] + counts["expired"]
        rows.append(
            (
                batch["id"],
                batch["status"],
                f"{ended}/{counts['total']}",
                str(counts["succeeded"]),
                str(counts["failed"]),
                batch["created_at"],
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def cmd_batches_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        found = client.all_batches() if args.all else client.batches(args.limit)["data"]
    if args.json:
        _print_json(found)
    else:
        print(batch_table(found))
    return 0


def cmd_batches_results(args: argparse.Namespace) -> int:
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    with _client(args) as client:
        for line in client.batch_results(args.batch_id, args.status):
            print(_writable_line(line, encoding))
    return 0


def _writable_line(line: str, encoding: str) -> str:
    """A results line as is, or, where the output's encoding cannot write a character of it,
    the same JSON with that character escaped (hunt 299: a non-UTF-8 locale's file stopped at
    the first such line; a backslash escape of Python's would not be JSON)."""
    try:
        line.encode(encoding)
    except UnicodeEncodeError:
        return json.dumps(json.loads(line))
    return line


def cmd_batches_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.cancel_batch(args.batch_id))
    return 0


# ---- AWS: tenants and dead letters ----------------------------------------------------------


class AwsTarget:
    """The sandbox's moto, an explicit endpoint, or the account your credentials name."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.state: SandboxState | None = None
        self.endpoint_url: str | None = args.endpoint_url
        self.region: str | None = args.region
        self.stack = args.stack
        if self.endpoint_url is None and not args.aws:
            self.state = _running_state(state_file(args.state_file))
            if self.state is not None:
                self.endpoint_url = self.state.aws_endpoint_url
                self.region = self.region or self.state.region
        # botocore reads AWS_DEFAULT_REGION and the profile, not AWS_REGION, which llmq's own
        # clients honour first: take it here so both name the same region.
        self.region = self.region or os.environ.get("AWS_REGION") or None
        where = f"the sandbox ({self.endpoint_url})" if self.state else (self.endpoint_url or "AWS")
        # (the stack named too: a bare command in a shared account means the default one)
        region = f" in {self.region}" if self.region else ""
        print(f"llmq: using {where}, stack {self.stack}{region}", file=sys.stderr)

    def _sandbox_key(self) -> tuple[str, str] | None:
        """The sandbox's operator key when it enforces IAM, else any key moto takes; against
        AWS (no sandbox), None: the usual chain (profile, SSO, role) decides."""
        if self.state is None:
            return None
        if self.state.aws_credentials is not None:
            operator = self.state.aws_credentials
            return operator.aws_access_key_id, operator.aws_secret_access_key
        return "testing", "testing"

    def client(self, service: str, config: Any = None) -> Any:
        import boto3

        from llmq import aws

        key_id, secret = self._sandbox_key() or (None, None)
        session = boto3.session.Session(
            region_name=self.region, aws_access_key_id=key_id, aws_secret_access_key=secret
        )
        # llmq's own timeouts and retries unless the caller asks for others.
        return session.client(service, endpoint_url=self.endpoint_url, config=config or aws.BOTO_CONFIG)  # type: ignore[call-overload]

    def outputs(self) -> dict[str, str]:
        from llmq_cli.dead_letters import stack_outputs

        return stack_outputs(self.client("cloudformation"), self.stack)

    def output(self, name: str) -> str:
        """One of the stack's outputs, or a one-line refusal: a stack without it (another team's,
        named by a typo) is no llmq stack (hunt 314: a KeyError's traceback)."""
        value = self.outputs().get(name)
        if not value:
            raise CliError(f"stack {self.stack} has no {name} output: is it an llmq stack?")
        return value


def _tenants_repository(target: AwsTarget, table: str | None, usage_keys: Any = None) -> Any:
    from llmq.tenants import TenantRepository

    return TenantRepository(
        table or target.output("TenantsTableName"),
        dynamodb=target.client("dynamodb"),
        usage_keys=usage_keys,
    )


def _usage_plans(target: AwsTarget) -> Any:
    """The stack's usage plans (its UsagePlanIds output); None for a stack without them."""
    from llmq.usage_plans import ApiGatewayUsagePlans

    plan_ids = target.outputs().get("UsagePlanIds")
    if not plan_ids:
        print(
            f"llmq: stack {target.stack} has no UsagePlanIds output: no per-tenant rate limits",
            file=sys.stderr,
        )
        return None
    return ApiGatewayUsagePlans(target.client("apigateway"), json.loads(plan_ids))


def _llmq_config(target: AwsTarget) -> Any:
    """The config the stack was deployed with: the sandbox's own, else the deployed api
    function's (its LLMQ_CONFIG), else cdk.json's `llmq` context in this directory."""
    from llmq.config import LlmqConfig

    if target.state is not None:
        with suppress(httpx.HTTPError, ValueError):
            response = httpx.get(f"{target.state.api_url}/_sandbox/config", timeout=10)
            if response.status_code == 200:
                return LlmqConfig.model_validate(response.json())
    deployed = _deployed_config(target)
    if deployed is not None:
        return deployed
    cdk_json = Path("cdk.json")
    context = json.loads(cdk_json.read_text()).get("context", {}) if cdk_json.is_file() else {}
    return LlmqConfig.from_context(context.get("llmq"))


def _deployed_config(target: AwsTarget) -> Any:
    """The config the stack's api function runs with, or None where it cannot be read (a stack
    without the FunctionNames output, no lambda:GetFunctionConfiguration): a tier's default
    limits and the authorizer's cache time as deployed, wherever the CLI runs from."""
    from botocore.exceptions import BotoCoreError, ClientError
    from pydantic import ValidationError

    from llmq.config import CONFIG_ENV_VAR, LlmqConfig

    try:
        api = json.loads(target.outputs().get("FunctionNames") or "{}").get("api")
        if not api:
            return None
        variables = target.client("lambda").get_function_configuration(FunctionName=api)["Environment"][
            "Variables"
        ]
    except (BotoCoreError, ClientError, KeyError, ValueError):
        return None
    try:
        return LlmqConfig.model_validate_json(variables.get(CONFIG_ENV_VAR) or "{}")
    except ValidationError as exc:
        # (a stack another llmq version deployed: a setting this one does not know, or one it
        # now refuses; hunt 314: a traceback, mid-incident, after the key was revoked)
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CliError(
            f"the stack's api function runs a config this CLI cannot read ({where}: {first['msg']}): "
            "was it deployed by another llmq version? Use that version's CLI"
        ) from exc


def _tenant_limits(target: AwsTarget, table: str | None) -> Any:
    from llmq.long_polls import LongPolls
    from llmq.shares import ShareRepository
    from llmq_cli.tenant_limits import TenantLimits

    usage_plans = _usage_plans(target)
    outputs = target.outputs()
    jobs_table = target.output("JobsTableName")
    config = _llmq_config(target)
    return TenantLimits(
        tenants=_tenants_repository(target, table, usage_keys=usage_plans),
        shares=ShareRepository(jobs_table, dynamodb=target.client("dynamodb")),
        polls=LongPolls(jobs_table, dynamodb=target.client("dynamodb")),
        usage_plans=usage_plans,
        config=config,
        backlog=_deferred_backlog(outputs, jobs_table, config, target),
    )


def _deferred_backlog(outputs: dict[str, str], jobs_table: str, config: Any, target: AwsTarget) -> Any:
    """What wakes a tenant's deferred jobs when its cap is raised; None for a stack whose
    outputs name no lane queues (one deployed before they did)."""
    from llmq.jobs import JobRepository
    from llmq.queues import QueueRepository
    from llmq_cli.tenant_limits import DeferredBacklog

    try:
        lanes = {
            str(name): str(url) for name, url in json.loads(outputs.get("LaneQueueUrls") or "{}").items()
        }
    except (ValueError, AttributeError):
        lanes = {}
    if not lanes:
        return None
    return DeferredBacklog(
        jobs=JobRepository(jobs_table, config, dynamodb=target.client("dynamodb")),
        queues=QueueRepository(lanes, outputs.get("WebhookQueueUrl", ""), sqs=target.client("sqs")),
    )


def cmd_tenants_create(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from llmq.errors import StoreUnavailable
    from llmq.tenants import InvalidTenantId, NewTenant, TenantExists, new_tenant_id

    target = AwsTarget(args)
    limits = _tenant_limits(target, args.table)
    # Chosen here, so that a create cut short part-way can name the tenant it left behind.
    args.id = args.id or new_tenant_id()
    config = limits.config
    if args.tier not in config.fair_share.tiers and all(args.tier not in lane.tiers for lane in config.lanes):
        # (allowed: a tier the config names later; until then, the default lane and limits)
        print(
            f"llmq: tier {args.tier!r} is in neither fair_share.tiers nor any lane's tiers: the "
            f"tenant runs in lane {config.default_lane!r} with fair_share.default's limits",
            file=sys.stderr,
        )
    try:
        try:
            created = limits.tenants.create(args.name, args.tier, tenant_id=args.id)
        except TenantExists:
            existing = limits.tenants.get(args.id)
            if (existing.name, existing.tier) != (args.name, args.tier) or limits.tenants.list_keys(args.id):
                raise
            # This command's own tenant, left by a run cut short before its first API key (as
            # the recovery command below says): finished, its usage-plan key first.
            tenant = existing
            if limits.usage_plans is not None:
                tenant = limits.tenants.attach_usage_key(args.id)
            created = NewTenant(tenant=tenant, api_key=limits.tenants.issue_key(tenant))
    except InvalidTenantId as exc:
        raise CliError(str(exc)) from exc
    except (ClientError, BotoCoreError, StoreUnavailable) as exc:
        reason = aws_error_line(exc)
        # The command as the operator runs it again: the target they chose (only the options
        # they gave), and every word quoted for a shell.
        # (each value joined to its option: a name beginning with "-" stays a value)
        again = [
            "llmq",
            *([f"--state-file={args.state_file}"] if args.state_file else []),
            "tenants",
            "create",
        ]
        again += [f"--name={args.name}", f"--tier={args.tier}", f"--id={args.id}"]
        if args.table:
            again.append(f"--table={args.table}")
        if args.endpoint_url:
            again.append(f"--endpoint-url={args.endpoint_url}")
        # (the stack this run used, whether AWS was chosen by --aws or by no sandbox running)
        again.append(f"--stack={args.stack}")
        if args.aws:
            again.append("--aws")
        if args.region:
            again.append(f"--region={args.region}")
        raise CliError(
            f"creating tenant {args.id} stopped: {reason}. Run `{shlex.join(again)}` again to finish it"
        ) from exc
    except TenantExists as exc:
        existing = limits.tenants.get(args.id)
        if limits.usage_plans is not None and not existing.usage_key_id:
            # (a create cut short before its usage-plan key: API Gateway would refuse any key)
            raise CliError(
                f"{exc}, without its usage-plan key: `llmq tenants attach-usage-keys {args.id}`, "
                f"then `llmq tenants issue-key {args.id}` gives it an API key"
            ) from exc
        raise CliError(
            f"{exc}: `llmq tenants show {args.id}`; `llmq tenants issue-key {args.id}` gives it an API key"
        ) from exc
    credentials = TenantCredentials(
        id=created.tenant.id,
        name=created.tenant.name,
        tier=created.tenant.tier,
        api_key=created.api_key,
        webhook_secret=created.tenant.webhook_secrets[0],
    )
    if target.state is not None:
        stored = credentials.model_copy(update={"limits": limits.effective(created.tenant.id)})
        target.state.tenants.append(stored)
        write_state(state_file(args.state_file), target.state)
    print("The API key is shown once; llmq stores only its hash.", file=sys.stderr)
    _print_json(credentials.model_dump(exclude_none=True))
    return 0


def cmd_tenants_show(args: argparse.Namespace) -> int:
    from llmq.tenants import UnknownTenant

    target = AwsTarget(args)
    try:
        _print_json(_tenant_limits(target, args.table).show(args.tenant_id))
    except UnknownTenant as exc:
        raise CliError(f"no tenant {args.tenant_id}") from exc
    return 0


def cmd_tenants_attach_usage_keys(args: argparse.Namespace) -> int:
    """For tenants created before usage plans: without a key API Gateway refuses them (403).
    And for a deploy that added or removed a tier: keys left in another tier's plan, or in a
    plan since deleted (403), go to the plan their tier has now."""
    from llmq.tenants import UnknownTenant

    target = AwsTarget(args)
    limits = _tenant_limits(target, args.table)
    if limits.usage_plans is None:
        raise CliError(f"stack {target.stack} has no usage plans: deploy this version first")
    tenant_ids = args.tenant_id or limits.tenants.tenants_without_usage_key()
    attached = []
    for tenant_id in tenant_ids:
        try:
            tenant = limits.tenants.attach_usage_key(tenant_id)
        except UnknownTenant as exc:
            raise CliError(f"no tenant {tenant_id}") from exc
        attached.append({"id": tenant.id, "tier": tenant.tier, "usage_key_id": tenant.usage_key_id})
    # Then every key into the plan it belongs in as the deploy left the plans (a tier added or
    # removed), unless only named tenants were asked for.
    if not args.tenant_id:
        keys = limits.tenants.usage_keys_by_tenant()
        tiers = {tenant_id: (tier, key_id) for tenant_id, tier, key_id in keys}
        for tenant_id, plan in limits.usage_plans.rehome(keys):
            tier, key_id = tiers[tenant_id]
            attached.append({"id": tenant_id, "tier": tier, "usage_key_id": key_id, "moved_to_plan": plan})
    _print_json(attached)
    return 0


def cmd_tenants_refresh_caps(args: argparse.Namespace) -> int:
    """After a deploy that changed a tier's default caps (or moved a tier to another lane's
    size): every tenant's share holds the caps its claims are held to, written at its accepts;
    each is brought to the deployed config now, not at the tenant's next submit."""
    from llmq.tenants import UnknownTenant
    from llmq_cli.tenant_limits import WAKE_STOPPED

    target = AwsTarget(args)
    limits = _tenant_limits(target, args.table)
    tenants = []
    for tenant_id in args.tenant_id:
        try:
            tenants.append((tenant_id, limits.tenants.get(tenant_id).tier))
        except UnknownTenant as exc:
            raise CliError(f"no tenant {tenant_id}") from exc
    if not args.tenant_id:
        tenants = limits.tenants.tiers_by_tenant()
    refreshed = [shown for tenant_id, tier in tenants if (shown := limits.refresh_caps(tenant_id, tier))]
    _print_json(refreshed)
    stopped = [shown for shown in refreshed if WAKE_STOPPED in shown]
    if stopped:
        print(
            f"The caps are written, but starting the queued jobs of {len(stopped)} tenant(s) stopped "
            f"short ({stopped[0][WAKE_STOPPED]}). Run the command again to start the rest now; "
            "otherwise they start as their deferrals end.",
            file=sys.stderr,
        )
    return 0


def cmd_tenants_set_limits(args: argparse.Namespace) -> int:
    from llmq.tenants import UnknownTenant
    from llmq_cli.tenant_limits import WAKE_STOPPED, WOKEN, LimitsError, flat

    target = AwsTarget(args)
    try:
        shown = _tenant_limits(target, args.table).set_limits(
            args.tenant_id,
            max_concurrency=args.max_concurrency,
            max_active_jobs=args.max_active,
            max_long_polls=args.max_long_polls,
            rate=args.rate,
            burst=args.burst,
            clear=tuple(args.clear or ()),
        )
    except UnknownTenant as exc:
        raise CliError(f"no tenant {args.tenant_id}") from exc
    except LimitsError as exc:
        raise CliError(str(exc)) from exc
    if target.state is not None:
        for entry in target.state.tenants:
            if entry.id == args.tenant_id:
                entry.limits = flat(shown)
        write_state(state_file(args.state_file), target.state)
    if args.rate is not None or "rate" in (args.clear or ()):
        print("API Gateway applies a usage plan change within seconds.", file=sys.stderr)
    if WAKE_STOPPED in shown:
        print(
            f"The cap is set, but starting the tenant's queued jobs stopped after {shown[WOKEN]}: "
            f"{shown[WAKE_STOPPED]}. Run the command again to start the rest now; otherwise they "
            "start as their deferrals end.",
            file=sys.stderr,
        )
    elif shown.get(WOKEN):
        print(
            f"The cap starts {shown[WOKEN]} of the tenant's queued jobs now; the rest start as "
            "slots free up.",
            file=sys.stderr,
        )
    _print_json(shown)
    return 0


def cmd_tenants_rotate(args: argparse.Namespace) -> int:
    from llmq.tenants import UnknownTenant

    target = AwsTarget(args)
    try:
        tenant = _tenants_repository(target, args.table).rotate_webhook_secret(
            args.tenant_id, keep_previous=not args.drop_previous
        )
    except UnknownTenant as exc:
        raise CliError(f"no tenant {args.tenant_id}") from exc
    if target.state is not None:
        for entry in target.state.tenants:
            if entry.id == tenant.id:
                entry.webhook_secret = tenant.webhook_secrets[0]
        write_state(state_file(args.state_file), target.state)
    # (a dispatcher environment keeps a tenant's secrets that long)
    within = "within webhooks.secrets_cache_seconds (60 s by default)"
    note = (
        f"both sign until the next rotation; the new one signs {within}"
        if len(tenant.webhook_secrets) > 1
        else f"the new one signs alone {within} (until then the old one still signs, alone)"
    )
    print(f"New secret first; {note}.", file=sys.stderr)
    _print_json({"id": tenant.id, "webhook_secrets": tenant.webhook_secrets})
    return 0


def cmd_tenants_issue_key(args: argparse.Namespace) -> int:
    """Another API key for the tenant (a rotation's first step; revoke the old one after)."""
    from llmq.tenants import UnknownTenant, key_id_of

    target = AwsTarget(args)
    tenants = _tenants_repository(target, args.table)
    try:
        api_key = tenants.issue_key(tenants.get(args.tenant_id))
    except UnknownTenant as exc:
        raise CliError(f"no tenant {args.tenant_id}") from exc
    if target.state is not None:
        # The sandbox's commands use the newest key.
        for entry in target.state.tenants:
            if entry.id == args.tenant_id:
                entry.api_key = api_key
        write_state(state_file(args.state_file), target.state)
    print("The API key is shown once; llmq stores only its hash. Its other keys still work.", file=sys.stderr)
    _print_json({"id": args.tenant_id, "key_id": key_id_of(api_key), "api_key": api_key})
    return 0


def cmd_tenants_keys(args: argparse.Namespace) -> int:
    from llmq.tenants import UnknownTenant

    target = AwsTarget(args)
    try:
        keys = _tenants_repository(target, args.table).list_keys(args.tenant_id)
    except UnknownTenant as exc:
        raise CliError(f"no tenant {args.tenant_id}") from exc
    _print_json([dataclasses.asdict(key) for key in keys])
    return 0


def cmd_tenants_revoke_key(args: argparse.Namespace) -> int:
    from llmq.tenants import UnknownKey

    target = AwsTarget(args)
    try:
        revoked = _tenants_repository(target, args.table).revoke_key_id(args.tenant_id, args.key_id)
    except UnknownKey as exc:
        raise CliError(str(exc)) from exc
    try:
        within = f"{_llmq_config(target).limits.authorizer_cache_seconds} s"
    except CliError as exc:
        # (revoked all the same: what the deployed config says is only for this line)
        within = f"its cache time ({exc})"
    print(f"Revoked: API Gateway refuses it within {within} (its authorizer cache).", file=sys.stderr)
    if target.state is not None:
        from llmq.tenants import key_id_of

        if any(
            entry.id == args.tenant_id and key_id_of(entry.api_key) == args.key_id
            for entry in target.state.tenants
        ):
            print(
                f"The sandbox's commands used this key: `llmq tenants issue-key {args.tenant_id}` gives them another.",
                file=sys.stderr,
            )
    _print_json(dataclasses.asdict(revoked))
    return 0


def _dead_letter_queues(target: AwsTarget, selected: str | None) -> list[Any]:
    from llmq_cli.dead_letters import stack_dead_letter_queues

    queues = stack_dead_letter_queues(target.outputs())
    if selected:
        queues = [queue for queue in queues if queue.name == selected]
        if not queues:
            raise CliError(f"no dead-letter queue {selected!r}")
    return queues


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from llmq_cli.dead_letters import depth, peek

    target = AwsTarget(args)
    sqs = target.client("sqs")
    listing = []
    for queue in _dead_letter_queues(target, args.queue):
        found = depth(sqs, queue.dlq_url)
        entry: dict[str, Any] = {
            "queue": queue.name,
            "dlq_url": queue.dlq_url,
            "visible": found.visible,
            "in_flight": found.in_flight,
            "redrives_to": queue.source_url,
        }
        if args.peek:
            entry["peek"] = peek(sqs, queue.dlq_url, args.peek)
        listing.append(entry)
    _print_json(listing)
    return 0


def cmd_dlq_redrive(args: argparse.Namespace) -> int:
    from llmq_cli.dead_letters import POISON, RECONCILER_FAILURES, redrive

    if args.queue == POISON:
        raise CliError(
            "the poison queue holds lane dead letters no function can settle, so they are "
            "not redriven. Read them with `llmq dlq list --queue poison --peek 10`, then purge the "
            "queue (`aws sqs purge-queue --queue-url <its dlq_url>`)"
        )
    if args.queue == RECONCILER_FAILURES:
        # (review 272: it printed [] and exited 0, as if they had been dealt with)
        raise CliError(
            "the reconciler's failed runs are not redriven: its next tick is the retry. Read them "
            "with `llmq dlq list --queue reconciler-failures --peek 10`, then purge the queue"
        )
    from botocore.exceptions import BotoCoreError, ClientError

    target = AwsTarget(args)
    # Each queue's own result, whatever another's: one whose earlier move task still runs (AWS
    # takes one a queue), or that AWS refused, stopped the others (hunt 298: the webhooks DLQ
    # was never redriven while a lane's large move ran on)
    results: list[dict[str, Any]] = []
    for queue in _dead_letter_queues(target, args.queue):
        if queue.source_url is None:
            continue
        try:
            results.append(redrive(target.client, queue, args.max).__dict__)
        except (ClientError, BotoCoreError) as exc:
            running = isinstance(exc, ClientError) and "already a task running" in str(exc)
            method = {"method": "StartMessageMoveTask", "already_running": True} if running else {}
            results.append(
                {"queue": queue.name, **method, **({} if running else {"error": aws_error_line(exc)})}
            )
    _print_json(results)
    failed = [result["queue"] for result in results if "error" in result]
    if failed:
        raise CliError(f"not redriven: {', '.join(failed)} (the others were; run it again for these)")
    return 0


# ---- webhooks -------------------------------------------------------------------------------


def cmd_webhooks_verify(args: argparse.Namespace) -> int:
    from llmq_cli.signatures import verify_delivery

    path = Path(args.file)
    try:
        # (JSON is UTF-8, RFC 8259: a delivery's non-ASCII body read in the locale's encoding
        # would be other text than was signed, and "NOT verified")
        saved = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise _file_error(path, exc) from exc
    except ValueError as exc:
        raise CliError(f"{path}: not a saved request's JSON ({exc})") from exc
    if not isinstance(saved, dict):
        raise CliError(f"{path}: a saved request is a JSON object of headers and body")
    headers = {str(name).lower(): str(value) for name, value in (saved.get("headers") or {}).items()}
    body = saved.get("body")
    if not isinstance(body, str):
        print(
            "warning: the saved body is not a string; it is re-serialized, so the bytes may differ "
            "from what was signed. Save the raw body as a JSON string.",
            file=sys.stderr,
        )
        body = json.dumps(body, separators=(",", ":"))
    verdict = verify_delivery(body, headers, args.secret)
    if verdict.verified:
        which = f" (secret #{(verdict.secret_index or 0) + 1})" if len(args.secret) > 1 else ""
        print(f"verified{which}: webhook-id {headers.get('webhook-id')}")
        return 0
    print(f"NOT verified: {verdict.reason}")
    return 1


def _visible(text: str) -> str:
    """A receiver's bytes as text a terminal shows and does not obey: a control or format
    character (CR, ESC, a bidi override, U+2028) as its escape, a newline as a space."""
    return "".join(
        char if char.isprintable() else " " if char == "\n" else char.encode("unicode_escape").decode()
        for char in text
    )


def cmd_webhooks_attempts(args: argparse.Namespace) -> int:
    """The job's (or batch's) delivery log (GET /v1/jobs/{id}/webhook): JSON, or one line per
    attempt."""
    with _client(args) as client:
        log = client.webhook_log(args.job_id)
    if args.json:
        _print_json(log)
        return 0
    print(f"{log.get('job_id') or log.get('batch_id')} -> {log['url']}")
    if not log["deliveries"]:
        print("  no terminal event yet (job.started is sent but not logged)")
    for delivery in log["deliveries"]:
        print(f"  {delivery['event']}: {delivery['status']}")
        for attempt in delivery["attempts"]:
            code, error = attempt.get("status_code"), attempt.get("error_class")
            answer = f"{code} ({error})" if code and error else code or error or "-"
            latency = "-" if attempt.get("latency_ms") is None else f"{attempt['latency_ms']} ms"
            head = _visible((attempt.get("response_head") or "")[:80])
            print(f"    #{attempt['attempt']}  {attempt['at']}  {answer}  {latency}  {head}".rstrip())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    require_sandbox_extra()
    from llmq_sandbox.demo import main as demo_main

    return demo_main()


def cmd_doctor(args: argparse.Namespace) -> int:
    import boto3

    from llmq_cli.doctor import (
        Doctor,
        alarm_emails_in_template,
        bootstrap_version_parameter,
        exit_code,
        in_flight_settings_in_template,
        load_reservations,
        min_bootstrap_version,
        render,
        stage_logs_through_account_role,
    )

    # The operator's own chain (profile, SSO, role); AWS_REGION first, as llmq's clients read it.
    session = boto3.session.Session(region_name=args.region or os.environ.get("AWS_REGION") or None)
    reservations, template = load_reservations(
        args.stack, Path(args.template) if args.template else None, Path("cdk.json")
    )
    doctor = Doctor(
        client=lambda service: session.client(service),  # type: ignore[call-overload]
        region=session.region_name,
        available_regions=session.get_available_regions,
        stack=args.stack,
        reservations=reservations,
        min_bootstrap=min_bootstrap_version(template),
        alarm_emails=alarm_emails_in_template(template),
        bootstrap_parameter=bootstrap_version_parameter(template),
        stage_logs_through_account_role=stage_logs_through_account_role(template),
        settings=in_flight_settings_in_template(template),
        drained=args.drained,
    )
    findings = doctor.run()
    print(render(findings, f"llmq doctor: stack {args.stack} in {session.region_name or '(no region)'}"))
    return exit_code(findings)


def cmd_provider_key_set(args: argparse.Namespace) -> int:
    import boto3

    from llmq_cli.doctor import ProviderKeyError, set_provider_key

    session = boto3.session.Session(region_name=args.region or os.environ.get("AWS_REGION") or None)
    try:
        stored = set_provider_key(lambda service: session.client(service), args.stack, os.environ)  # type: ignore[call-overload]
    except ProviderKeyError as exc:
        raise CliError(str(exc)) from exc
    print(f"provider key stored in {stored.secret_arn} (version {stored.version_id})")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from llmq_cli.cost import Streaming, Workload, render

    stream = None
    if args.stream or args.follow:
        stream = Streaming(interval_seconds=args.interval, followed=args.follow)
    workload = Workload(
        jobs=args.jobs,
        latency_seconds=args.latency,
        worker_memory_mb=args.memory,
        batch_size=args.batch,
        stream=stream,
    )
    print(render(workload))
    return 0


# ---- the parser -----------------------------------------------------------------------------


def _api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tenant", help="sandbox tenant: free, enterprise, or a tenant id (default: the first)"
    )
    parser.add_argument("--api-url", help="a deployed API (its ApiUrl output); needs --api-key")
    parser.add_argument("--api-key", help="the tenant's API key for --api-url")


def _default_stack() -> str:
    """The stack `make deploy` deploys: ./cdk.json's `llmq:stack_name` (as the Makefile reads
    it), else Llmq. A stack of another name in the same account is never the default."""
    with suppress(OSError, ValueError, AttributeError):
        name = json.loads(Path("cdk.json").read_text()).get("context", {}).get("llmq:stack_name")
        if isinstance(name, str) and name:
            return name
    return "Llmq"


STACK_HELP = "the stack's name (default: cdk.json's llmq:stack_name, else Llmq)"


def _aws_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url", help="an AWS-compatible endpoint (default: the sandbox's, if running)"
    )
    parser.add_argument("--aws", action="store_true", help="use your AWS credentials even if a sandbox runs")
    parser.add_argument("--region", help="AWS region")
    parser.add_argument("--stack", default=_default_stack(), help=STACK_HELP)


def _get_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id")
    parser.add_argument("--wait", action="store_true", help="long-poll until it is terminal")
    parser.add_argument("--timeout", type=float, default=300.0)
    _api_options(parser)


def _hide_command(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    """argparse has no hidden subcommands: drop one from the help listing and the usage line."""
    commands._choices_actions = [action for action in commands._choices_actions if action.dest != name]
    commands.metavar = "{" + ",".join(choice for choice in commands.choices if choice != name) + "}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmq", description="llmq: sandbox, API, tenants, dead letters, webhooks"
    )
    parser.add_argument("--state-file", help=f"the sandbox state file (default: {state_file()})")
    commands = parser.add_subparsers(dest="command", required=True)

    sandbox = commands.add_parser("sandbox", help="the embedded sandbox").add_subparsers(
        dest="action", required=True
    )
    up = sandbox.add_parser("up", help="start it (foreground unless --detach)")
    up.add_argument(
        "--detach", action="store_true", help="run in the background; return once the API answers"
    )
    up.add_argument(
        "--timeout", type=float, default=DETACH_TIMEOUT_SECONDS, help="seconds to wait with --detach"
    )
    up.add_argument(
        "--no-iam",
        action="store_true",
        help="let every function do anything in moto (to debug; the e2e suite runs with IAM)",
    )
    up.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    up.set_defaults(handler=cmd_sandbox_up)
    sandbox.add_parser("down", help="stop it").set_defaults(handler=cmd_sandbox_down)
    sandbox.add_parser("status", help="print its state").set_defaults(handler=cmd_sandbox_status)

    submit = commands.add_parser("submit", help="submit a job")
    submit.add_argument("prompt", nargs="?")
    submit.add_argument("--file", help="a JSON request body instead of a prompt")
    submit.add_argument("--model")
    submit.add_argument("--param", action="append", help="generation parameter key=value (repeatable)")
    submit.add_argument("--webhook", help="webhook URL")
    submit.add_argument("--event", action="append", help="webhook event to subscribe (repeatable)")
    submit.add_argument("--metadata", action="append", help="metadata key=value (repeatable)")
    submit.add_argument("--deadline", type=int, help="deadline_seconds")
    submit.add_argument("--idempotency-key")
    submit.add_argument("--wait", type=int, help="Prefer: wait=N (N <= 25)")
    submit.add_argument("--follow", action="store_true", help="poll until the job is terminal")
    submit.add_argument(
        "--stream",
        action="store_true",
        help="stream: true, and print the output as it is generated (server-sent events, resumed "
        "after each reconnect); the end goes to stderr, the exit status says if it succeeded",
    )
    submit.add_argument("--timeout", type=float, default=300.0)
    _api_options(submit)
    submit.set_defaults(handler=cmd_submit)

    get = commands.add_parser("get", help="get a job")
    _get_options(get)
    get.set_defaults(handler=cmd_get)
    # The spelling before `get`, kept for one release; hidden from --help.
    old_get = commands.add_parser("status")
    _get_options(old_get)
    old_get.set_defaults(handler=cmd_status_deprecated)

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    _api_options(cancel)
    cancel.set_defaults(handler=cmd_cancel)

    jobs = commands.add_parser("jobs", help="list your jobs, newest first")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--all", action="store_true", help="every page")
    jobs.add_argument("--json", action="store_true", help="the jobs as the API returns them")
    jobs.add_argument("--wide", action="store_true", help="also the model, attempts and error code")
    _api_options(jobs)
    jobs.set_defaults(handler=cmd_jobs)

    batches = commands.add_parser("batches", help="many jobs in one request").add_subparsers(
        dest="action", required=True
    )
    batch_submit = batches.add_parser("submit", help='submit a JSONL file of {"custom_id", "body"} lines')
    batch_submit.add_argument("file")
    batch_submit.add_argument("--webhook", help="webhook URL for the batch's end")
    batch_submit.add_argument("--lane")
    batch_submit.add_argument("--idempotency-key")
    batch_submit.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    batch_submit.add_argument(
        "--upload", action="store_true", help="send the file by the upload form (always above 4 MB)"
    )
    batch_submit.add_argument("--timeout", type=float, default=3600.0)
    _api_options(batch_submit)
    batch_submit.set_defaults(handler=cmd_batches_submit)
    batch_get = batches.add_parser("get", help="a batch and its counts")
    batch_get.add_argument("batch_id")
    _api_options(batch_get)
    batch_get.set_defaults(handler=cmd_batches_get)
    batch_list = batches.add_parser("list", help="your batches, newest first")
    batch_list.add_argument("--limit", type=int, default=20)
    batch_list.add_argument("--all", action="store_true", help="every page")
    batch_list.add_argument("--json", action="store_true", help="the batches as the API returns them")
    _api_options(batch_list)
    batch_list.set_defaults(handler=cmd_batches_list)
    batch_results = batches.add_parser("results", help="its items' results as JSON Lines (while it runs too)")
    batch_results.add_argument("batch_id")
    batch_results.add_argument("--status", help="only the items in this status")
    _api_options(batch_results)
    batch_results.set_defaults(handler=cmd_batches_results)
    batch_cancel = batches.add_parser("cancel", help="cancel a batch")
    batch_cancel.add_argument("batch_id")
    _api_options(batch_cancel)
    batch_cancel.set_defaults(handler=cmd_batches_cancel)

    tenants = commands.add_parser("tenants", help="tenants and their secrets").add_subparsers(
        dest="action", required=True
    )
    create = tenants.add_parser("create", help="create a tenant and its first API key")
    create.add_argument("--name", required=True)
    create.add_argument("--tier", required=True, help="e.g. enterprise or free: it picks the lane")
    create.add_argument(
        "--id",
        help="tenant id: 1 to 64 of A-Z a-z 0-9 _ . : -, the first a letter or digit (default: generated)",
    )
    create.add_argument("--table", help="tenants table (default: the stack's TenantsTableName output)")
    _aws_options(create)
    create.set_defaults(handler=cmd_tenants_create)
    show = tenants.add_parser("show", help="a tenant's limits (and where each comes from) and its jobs")
    show.add_argument("tenant_id")
    show.add_argument("--table", help="tenants table (default: the stack's TenantsTableName output)")
    _aws_options(show)
    show.set_defaults(handler=cmd_tenants_show)
    limits = tenants.add_parser(
        "set-limits", help="override a tenant's tier limits (docs/limits.md); --clear goes back to the tier's"
    )
    limits.add_argument("tenant_id")
    limits.add_argument("--max-concurrency", type=int, help="jobs running at once in its lane")
    limits.add_argument("--max-active", type=int, help="queued plus running jobs (429 quota_exceeded above)")
    limits.add_argument(
        "--max-long-polls",
        type=int,
        help="requests waiting at once (?wait, Prefer: wait); more answer at once",
    )
    limits.add_argument("--rate", type=float, help="requests a second (its own usage plan); needs --burst")
    limits.add_argument("--burst", type=int, help="requests at once above the rate (the token bucket's size)")
    limits.add_argument(
        "--clear",
        action="append",
        choices=("max_concurrency", "max_active_jobs", "max_long_polls", "rate"),
        help="drop an override (repeatable); rate moves the tenant back to its tier's usage plan",
    )
    limits.add_argument("--table", help="tenants table (default: the stack's TenantsTableName output)")
    _aws_options(limits)
    limits.set_defaults(handler=cmd_tenants_set_limits)
    attach = tenants.add_parser(
        "attach-usage-keys",
        help="give tenants without an API Gateway key one, and move every key into the usage plan its "
        "tier now has (make deploy runs it; else API Gateway answers 403, or throttles at another plan's rate)",
    )
    attach.add_argument(
        "tenant_id", nargs="*", help="tenant ids (default: every tenant without one, then every key's plan)"
    )
    attach.add_argument("--table", help="tenants table (default: the stack's TenantsTableName output)")
    _aws_options(attach)
    attach.set_defaults(handler=cmd_tenants_attach_usage_keys)
    refresh = tenants.add_parser(
        "refresh-caps",
        help="write the deployed tier caps on every tenant's share (make deploy runs it)",
    )
    refresh.add_argument("tenant_id", nargs="*", help="tenant ids (default: every tenant)")
    refresh.add_argument("--table", help="tenants table (default: the stack's TenantsTableName output)")
    _aws_options(refresh)
    refresh.set_defaults(handler=cmd_tenants_refresh_caps)
    rotate = tenants.add_parser("rotate-secret", help="new webhook secret; the previous one keeps signing")
    rotate.add_argument("tenant_id")
    rotate.add_argument(
        "--drop-previous",
        action="store_true",
        help="stop signing with the previous secret (within webhooks.secrets_cache_seconds)",
    )
    rotate.add_argument("--table")
    _aws_options(rotate)
    rotate.set_defaults(handler=cmd_tenants_rotate)

    issue = tenants.add_parser("issue-key", help="another API key for the tenant, shown once")
    issue.add_argument("tenant_id")
    issue.add_argument("--table")
    _aws_options(issue)
    issue.set_defaults(handler=cmd_tenants_issue_key)

    keys = tenants.add_parser("keys", help="the tenant's API keys by key id, revoked or not (never the keys)")
    keys.add_argument("tenant_id")
    keys.add_argument("--table")
    _aws_options(keys)
    keys.set_defaults(handler=cmd_tenants_keys)

    revoke = tenants.add_parser("revoke-key", help="revoke one of the tenant's API keys by its key id")
    revoke.add_argument("tenant_id")
    revoke.add_argument("key_id", help="as `llmq tenants keys` lists it: key_ and 16 hex digits")
    revoke.add_argument("--table")
    _aws_options(revoke)
    revoke.set_defaults(handler=cmd_tenants_revoke_key)

    dlq = commands.add_parser("dlq", help="dead-letter queues").add_subparsers(dest="action", required=True)
    listing = dlq.add_parser("list", help="depth of every DLQ")
    listing.add_argument("--queue", help="a lane name, webhooks or poison")
    listing.add_argument("--peek", type=_at_least(0, int), default=0, help="show up to N message bodies")
    _aws_options(listing)
    listing.set_defaults(handler=cmd_dlq_list)
    again = dlq.add_parser("redrive", help="move dead letters back to their source queue")
    again.add_argument("--queue", help="a lane name or webhooks (default: all)")
    again.add_argument("--max", type=_at_least(1, int), help="at most N messages (uses receive-and-send)")
    _aws_options(again)
    again.set_defaults(handler=cmd_dlq_redrive)

    webhooks = commands.add_parser("webhooks", help="webhook tools").add_subparsers(
        dest="action", required=True
    )
    verify = webhooks.add_parser("verify", help="check a saved delivery's signature")
    verify.add_argument("--secret", action="append", required=True, help="whsec_... (repeatable)")
    verify.add_argument("--file", required=True, help='JSON: {"headers": {...}, "body": "<raw body>"}')
    verify.set_defaults(handler=cmd_webhooks_verify)
    attempts = webhooks.add_parser(
        "attempts", help="a job's or a batch's delivery log: each attempt and what the receiver said"
    )
    attempts.add_argument("job_id", help="a job id, or a batch id (bat_...)")
    attempts.add_argument("--json", action="store_true", help="the API's JSON as is")
    _api_options(attempts)
    attempts.set_defaults(handler=cmd_webhooks_attempts)

    commands.add_parser("demo", help="the scripted tour (make demo)").set_defaults(handler=cmd_demo)

    doctor = commands.add_parser(
        "doctor", help="before a deploy: quota, CDK bootstrap, provider key and region (exit 1 on a problem)"
    )
    doctor.add_argument("--region", help="AWS region (default: AWS_REGION, then your profile's)")
    doctor.add_argument("--stack", default=_default_stack(), help=STACK_HELP)
    doctor.add_argument(
        "--template",
        help="a synthesized template to count reservations from (default: cdk.out/<stack>.template.json)",
    )
    doctor.add_argument(
        "--drained",
        action="store_true",
        help="nothing is in flight (no job queued or running, no webhook pending, no batch open): "
        "a lowered reconciler.sweep_shards or batches.count_shards, or a removed lane, is only noted",
    )
    doctor.set_defaults(handler=cmd_doctor)
    key = commands.add_parser("provider-key", help="the deployed stack's provider API key")
    key_set = key.add_subparsers(dest="action", required=True).add_parser(
        "set", help="store $LLMQ_PROVIDER_API_KEY in the stack's provider secret (never from argv)"
    )
    key_set.add_argument("--region", help="AWS region (default: AWS_REGION, then your profile's)")
    key_set.add_argument("--stack", default=_default_stack(), help=STACK_HELP)
    key_set.set_defaults(handler=cmd_provider_key_set)

    cost = commands.add_parser("cost", help="AWS cost per million jobs, against one invocation per job")
    cost.add_argument(
        "--jobs",
        type=_at_least(0, int, at_most=10**15),
        default=1_000_000,
        help="how many jobs (default 1,000,000)",
    )
    cost.add_argument(
        # (at most a Lambda's 15 minutes, in which a worker's call must end)
        "--latency",
        type=_more_than(0.0, at_most=900.0),
        default=60.0,
        help="seconds per generation (default 60)",
    )
    cost.add_argument(
        "--memory",
        type=_at_least(128, int, at_most=10_240),
        default=256,
        help="worker memory in MB (default 256)",
    )
    cost.add_argument(
        # (at most SQS's largest batch for a Lambda's event source mapping)
        "--batch",
        type=_at_least(1, int, at_most=10_000),
        default=10,
        help="jobs per worker batch (default 10)",
    )
    cost.add_argument("--stream", action="store_true", help="stream: true jobs (their output writes)")
    cost.add_argument(
        "--interval",
        # (streaming.partial_interval_ms's bounds: 1e-320 took the writes a job to infinity, and
        # a traceback; hunt 314)
        type=_more_than(0.0, at_least=0.1, at_most=60.0),
        default=1.0,
        help="seconds between output writes (streaming.partial_interval_ms)",
    )
    cost.add_argument(
        "--follow", action="store_true", help="and a client follows each job's events (implies --stream)"
    )
    cost.set_defaults(handler=cmd_cost)
    _hide_command(commands, "status")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from llmq.errors import StoreUnavailable
    from llmq_cli.client import ApiError, NotAnId

    args = build_parser().parse_args(argv)
    # An output the terminal's encoding cannot write (an emoji in a cp1252 console) is escaped,
    # not an error after the job was sent and paid for (hunt 299).
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        code: int = args.handler(args)
    except (CliError, ApiError, NotAnId) as exc:
        print(f"llmq: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"llmq: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except UnicodeEncodeError as exc:
        # (an argument holding bytes that are not UTF-8, which Python reads as lone surrogates:
        # the request cannot be written, and nothing was sent)
        print(f"llmq: an argument is not UTF-8 text ({exc.object[exc.start : exc.end]!a})", file=sys.stderr)
        return 1
    except ClientError as exc:
        # (an operator's wrong region or stack, expired credentials, a missing permission: said
        # in a line, not a traceback)
        print(f"llmq: {aws_error_line(exc)}", file=sys.stderr)
        return 1
    except (BotoCoreError, StoreUnavailable) as exc:
        print(
            f"llmq: {aws_error_line(exc)}; that call may or may not have been applied, and nothing "
            "after it was done: look before running it again",
            file=sys.stderr,
        )
        return 1
    return code


def _at_least(low: int, kind: Callable[[str], int], at_most: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most}")
        return value

    return parse


def _more_than(
    low: float, *, at_least: float | None = None, at_most: float | None = None
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not (value > low and math.isfinite(value)):  # (NaN and infinity too)
            raise argparse.ArgumentTypeError(f"must be a number more than {low:g}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be at least {at_least:g}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most:g}")
        return value

    return parse


def aws_error_line(exc: Exception) -> str:
    """An AWS failure in one line: the call and the service's code and message, or the error."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"AWS refused {exc.operation_name}: {error.get('Code')}: {error.get('Message')}"
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
