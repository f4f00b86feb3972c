"""Active tracing must never fail a request: llmq's Tracer under concurrent asyncio HTTP.

"Instrumenting Python code in AWS Lambda" (https://docs.aws.amazon.com/lambda/latest/dg/python-tracing.html):
with Active tracing Lambda passes the trace header in _X_AMZN_TRACE_ID and the X-Ray SDK records
subsegments under the function's segment. The SDK keeps the current subsegment per thread, so
concurrent asyncio requests on one thread must not be instrumented; the worker and the
dispatcher make exactly such requests (the sandbox runs tracing as deployed since issue 12).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from llmq.telemetry import TRACED_MODULES

ROOT = Path(__file__).resolve().parents[2]
# A handler traced like the worker's, making concurrent httpx requests on the event loop, as
# a batch of streaming jobs does; run in a fresh process because X-Ray's patches are global.
SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(0.04 if "slow" in self.path else 0.01)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import httpx
    from aws_lambda_powertools import Tracer
    import llmq.telemetry as telemetry

    tracer = telemetry.tracer() if sys.argv[1] == "llmq" else Tracer(service="llmq")
    url = f"http://127.0.0.1:{server.server_port}"

    @tracer.capture_lambda_handler(capture_response=False)
    def handler(event, context):
        async def batch():
            async with httpx.AsyncClient() as client:
                async def job(path):
                    for _ in range(4):
                        (await client.get(url + path)).raise_for_status()
                await asyncio.gather(job("/slow"), job("/fast"), job("/slow/2"), job("/fast/2"))
        asyncio.run(batch())
        return "ok"

    class Context:
        function_name = "worker"
        memory_limit_in_mb = 256
        invoked_function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:worker"
        aws_request_id = "request"

    for invocation in range(3):
        try:
            print(handler({}, Context()))
        except Exception as exc:
            print(type(exc).__name__)
    """
)


def _run(which: str) -> list[str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("POWERTOOLS_", "AWS_XRAY"))
    }
    environment.update(
        {
            "LAMBDA_TASK_ROOT": str(ROOT / "functions" / "worker"),
            "_X_AMZN_TRACE_ID": "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
            "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
            # Segments go to a UDP port nobody reads, as with no daemon.
            "AWS_XRAY_DAEMON_ADDRESS": "127.0.0.1:9",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "layers" / "llmq" / "python"), str(ROOT)]),
        }
    )
    finished = subprocess.run(
        [sys.executable, "-c", SCRIPT, which], env=environment, capture_output=True, text=True, timeout=120
    )
    return finished.stdout.split()


def test_concurrent_requests_in_a_traced_invocation_all_succeed() -> None:
    assert TRACED_MODULES == ("botocore",)
    assert _run("llmq") == ["ok", "ok", "ok"]


def test_patching_every_module_would_fail_them() -> None:
    # The failure the restriction prevents (Powertools' default patches httpx too): the X-Ray
    # SDK's own exception out of a request, which in the worker failed a claimed job's record
    assert "AlreadyEndedException" in _run("default")
