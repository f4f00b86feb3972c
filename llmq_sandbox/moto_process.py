"""moto in a process of its own: the sandbox's AWS, behind its HTTP endpoint.

Python runs one thread at a time per process. With moto's server in the sandbox's own process,
every request to AWS waited for the gateway, the pollers and the Lambda service, and they for
moto, whose DynamoDB transactions are most of the sandbox's CPU: at 20 submits a second that
process was full, and a submit waited its turn behind the workers' claims. In a process of its
own moto has a core, and the sandbox's process keeps its own for the requests it routes.

Nothing changes in what the sandbox emulates: the child applies the same fidelity patches
(`llmq_sandbox/moto_fidelity.py`, and IAM's in `llmq_sandbox/iam.py`) before it serves, and
everything reaches it over HTTP, as before. The one thing the sandbox did to moto's memory,
keeping the functions' role sessions valid past their 12 hours (`iam.outlive`), is a request
to the child (`/_llmq/outlive`), which is not an AWS path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llmq_sandbox.settling import Settler

# Where the sandbox's packages live (as for the fork server: llmq_sandbox/lambda_runtime.py).
RUNTIME_ROOT = Path(__file__).resolve().parent.parent
# A child that cannot bind or import within this is reported, not waited for.
_START_TIMEOUT_SECONDS = 60.0
_OUTLIVE_PATH = "/_llmq/outlive"


@dataclass(frozen=True)
class MotoSettings:
    """What the child patches into moto before it serves (RunnerSettings' share of it)."""

    index_lag_seconds: float
    fair_queues: bool
    enforce_iam: bool

    def arguments(self) -> list[str]:
        return [
            f"--index-lag={self.index_lag_seconds}",
            f"--fair-queues={'on' if self.fair_queues else 'off'}",
            f"--iam={'on' if self.enforce_iam else 'off'}",
        ]


class MotoProcess:
    """Start, address and stop the child; it exits by itself if this process goes away."""

    def __init__(self, settings: MotoSettings) -> None:
        self._settings = settings
        self._process: subprocess.Popen[str] | None = None
        self.endpoint_url = ""

    @property
    def pid(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.pid

    def start(self) -> str:
        """Start moto and return its endpoint, `http://localhost:PORT` (moto_deploy needs the name)."""
        self._process = subprocess.Popen(
            [sys.executable, "-m", "llmq_sandbox.moto_process", *self._settings.arguments()],
            # The repository's own packages, whatever directory the sandbox was started from.
            cwd=RUNTIME_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = _read_line(self._process.stdout, _START_TIMEOUT_SECONDS)
            if not line:
                exited = self._process.poll() is not None
                raise RuntimeError(
                    "moto's process exited before it served (its error is above)"
                    if exited
                    else f"moto's process did not serve within {_START_TIMEOUT_SECONDS:.0f}s"
                )
            port = int(json.loads(line)["port"])
        except BaseException:
            self.stop()
            raise
        self.endpoint_url = f"http://localhost:{port}"
        return self.endpoint_url

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def outlive(self, access_key_ids: Iterable[str], years: int) -> None:
        """Keep these role sessions valid for `years` (iam.outlive, in the child)."""
        body = json.dumps({"access_key_ids": list(access_key_ids), "years": years}).encode()
        request = urllib.request.Request(f"{self.endpoint_url}{_OUTLIVE_PATH}", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10):  # raises unless 2xx
            pass

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _read_line(stream: IO[str] | None, timeout: float) -> str:
    """The first line the child prints, or "" if it exits or says nothing in time."""
    assert stream is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


# ---- the child -----------------------------------------------------------------------------


def _with_outlive(app: Callable[..., Any]) -> Callable[..., Any]:
    """moto's WSGI app, plus the one sandbox path: POST /_llmq/outlive."""
    from llmq_sandbox.iam import outlive

    def serve(environ: Mapping[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != _OUTLIVE_PATH:
            return app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        request = json.loads(environ["wsgi.input"].read(length) or b"{}")
        try:
            outlive(request["access_key_ids"], years=int(request["years"]))
        except KeyError as exc:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [str(exc).encode()]
        start_response("204 No Content", [])
        return [b""]

    return serve


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(70)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmq_sandbox.moto_process")
    parser.add_argument("--index-lag", type=float, required=True)
    parser.add_argument("--fair-queues", choices=("on", "off"), required=True)
    parser.add_argument("--iam", choices=("on", "off"), required=True)
    args = parser.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    # The emulated account lives as long as this process: keep full collections to what is new.
    Settler().start()
    # Ctrl-C reaches the terminal's whole process group: the sandbox stops this process itself
    # (SIGTERM) once it has stopped what calls it, so an interrupt must not end moto first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    import logging
    import warnings

    from moto.moto_server.threaded_moto_server import MotoRequestHandler
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    from llmq_sandbox.iam import make_moto_authorize_like_iam
    from llmq_sandbox.moto_fidelity import make_moto_strict, set_fair_queues, set_index_lag

    # moto's server logs every request, and a traceback for each action it does not implement;
    # its CloudFormation warns about each resource type it skips (alarms, policies, API stages),
    # as expected here.
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    logging.getLogger("moto").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*not supported by moto.*")
    warnings.filterwarnings("ignore", message="No Moto CloudFormation support.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    make_moto_strict()
    set_index_lag(args.index_lag)
    set_fair_queues(args.fair_queues == "on")
    if args.iam == "on":
        make_moto_authorize_like_iam()
    app = _with_outlive(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    # Nobody reads the pipe after the port: what moto prints later goes to stderr instead of
    # filling the pipe and blocking the request that prints.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
