"""BENCHMARKS §4: each function's cold start, in an environment built like its Lambda layers.

The deps layer's requirements (`layers/build.py`: `[project].dependencies` from uv.lock, no
dev extras) are installed for this machine's Python and platform into a cache directory, and
the `llmq` layer and the handlers are copied beside them without bytecode. Each probe is a
fresh `python -I -S -B` whose path holds those three only, as /opt/python and /var/task do on
Lambda, so nothing of the dev environment (its httpx CLI extras, its compiled bytecode) counts.

Two cases per function, each against a baseline process that imports the same boto3 and
creates the same clients:
- **as shipped**: no bytecode. The deps layer is built for the Lambda runtime's Python
  (`stacks/runtime.py`), for which this machine has no interpreter to compile with, and /opt is
  read-only, so every cold start compiles what it imports;
- **compiled**: with bytecode, what a layer compiled by the runtime's own Python would give.

And the change of issue 17 measured in the same run: the same probe with every llmq model
built at import (`defer_build` off), as before.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from layers.build import export_requirements, find_uv  # noqa: E402

CACHE = ROOT / ".llmq" / "bench-layer"

# What each function builds at its first invocation, and the AWS clients it then uses.
FUNCTIONS: dict[str, tuple[list[str], list[str]]] = {
    "api": (["intake"], ["dynamodb", "sqs"]),
    "authorizer": (["tenants"], ["dynamodb"]),
    "worker": (["runner"], ["dynamodb", "sqs"]),
    "dead_letter": (["repositories"], ["dynamodb", "sqs"]),
    "webhook_dispatcher": (["dispatcher", "queues"], ["dynamodb", "sqs"]),
    "reconciler": (["reconciler"], ["dynamodb", "sqs"]),
}

ENV = {
    "LLMQ_CONFIG": "{}",
    "LLMQ_JOBS_TABLE": "jobs",
    "LLMQ_TENANTS_TABLE": "tenants",
    "LLMQ_LANE_QUEUE_URLS": json.dumps({"high": "https://sqs.us-east-1.amazonaws.com/1/high"}),
    "LLMQ_WEBHOOK_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/1/hooks",
    "LLMQ_PROVIDER_API_KEY": "sk-bench",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Nothing is traced outside Lambda; the long-running functions still import the X-Ray SDK,
    # as they do on Lambda (stacks/functions.py: active tracing).
    "POWERTOOLS_TRACE_DISABLED": "true",
    "PATH": "/usr/bin:/bin",
}

# sys.argv: path entries, function (or "baseline"), factories, services, "eager" to build
# every model at import (before the change), "first" to time one request the api answers
# without AWS (a submit that validation refuses), "warm" to run the SnapStart warm-up first.
_PROBE = r"""
import json, sys, time
started = time.perf_counter()
sys.path[:0] = sys.argv[1].split("|")
name, factories, services, flags = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
if "eager" in flags:
    from llmq.model_base import Model
    Model.model_config["defer_build"] = False
if name == "baseline":
    import boto3
    session = boto3.session.Session()
    clients = [session.client(s, region_name="us-east-1") for s in services.split(",")]
else:
    import importlib
    module = importlib.import_module(f"functions.{name}.handler")
    for factory in factories.split(","):
        getattr(module, factory)()
    from llmq import aws
    clients = [aws.client(s) for s in services.split(",")]
init = time.perf_counter() - started
first = None
if "first" in flags:
    if "warm" in flags:
        module.warm()
    event = dict(module._WARM_EVENTS[1])
    began = time.perf_counter()
    module.app.resolve(event, None)
    first = time.perf_counter() - began
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": init, "first_s": first, "max_rss_mb": peak_kb / 1024}))
"""


def _host_platform() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "x86_64-manylinux2014", "amd64": "x86_64-manylinux2014"}.get(
        machine, "aarch64-manylinux2014"
    )


def build_environment() -> tuple[Path, Path]:
    """(deps dir, code dir), built like the layers for this machine; deps cached by uv.lock."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    lock = (ROOT / "uv.lock").read_bytes()
    stamp = f"{version}-{_host_platform()}-{hashlib.sha256(lock).hexdigest()}"
    deps = CACHE / "deps"
    built = (CACHE / "stamp").read_text() if (CACHE / "stamp").exists() else ""
    if built != stamp:
        shutil.rmtree(CACHE, ignore_errors=True)
        CACHE.mkdir(parents=True)
        uv = find_uv()
        requirements = CACHE / "requirements.txt"
        export_requirements(uv, requirements)
        subprocess.run(
            [
                uv, "pip", "install", "--quiet", "--requirement", str(requirements), "--target", str(deps),
                "--python-platform", _host_platform(), "--python-version", version,
                "--only-binary=:all:", "--no-compile",
            ],
            check=True,
        )  # fmt: skip
        (CACHE / "stamp").write_text(stamp)
    code = Path(tempfile.mkdtemp(prefix="llmq-cold-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "layers" / "llmq" / "python", code / "layer", ignore=ignore)
    shutil.copytree(ROOT / "functions", code / "task" / "functions", ignore=ignore)
    return deps, code


def _drop_bytecode(*roots: Path) -> None:
    for root in roots:
        for cache in root.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)


def _compile(*roots: Path) -> None:
    subprocess.run(
        [sys.executable, "-I", "-m", "compileall", "-q", "-j", "0", *map(str, roots)],
        check=True,
        capture_output=True,
    )


def _probe(path: str, name: str, flags: str = "", *, importtime: bool = False) -> dict[str, Any]:
    factories, services = FUNCTIONS.get(name, ([], ["dynamodb", "sqs"]))
    if name == "baseline":
        services = ["dynamodb", "sqs"]
    command = [sys.executable, "-I", "-S", "-B"]
    if importtime:
        command += ["-X", "importtime"]
    command += ["-c", _PROBE, path, name, ",".join(factories) or "-", ",".join(services), flags or "-"]
    out = subprocess.run(command, env=ENV, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if importtime:
        result["importtime"] = out.stderr
    return result


def _median(path: str, name: str, flags: str, repeats: int) -> dict[str, float]:
    runs = [_probe(path, name, flags) for _ in range(repeats)]
    return {
        "seconds": statistics.median(run["seconds"] for run in runs),
        "max_rss_mb": max(run["max_rss_mb"] for run in runs),
        **(
            {"first_s": statistics.median(run["first_s"] for run in runs)}
            if runs[0].get("first_s") is not None
            else {}
        ),
    }


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)")


def top_import_costs(importtime: str, top: int = 5) -> list[tuple[str, float]]:
    """Self time of each imported module, summed per distribution (Powertools per utility),
    in milliseconds, the largest first."""
    costs: Counter[str] = Counter()  # microseconds
    for match in _IMPORT_LINE.finditer(importtime):
        module = match.group(2)
        parts = module.split(".")
        key = ".".join(parts[:3]) if parts[0] == "aws_lambda_powertools" else parts[0]
        costs[key] += int(match.group(1))
    return [(name, round(us / 1000, 1)) for name, us in costs.most_common(top)]


def cold_start(repeats: int = 5) -> dict[str, Any]:
    deps, code = build_environment()
    path = "|".join(map(str, (code / "layer", deps, code / "task")))
    try:
        cases: dict[str, list[dict[str, Any]]] = {}
        for case in ("shipped", "compiled"):
            if case == "compiled":
                _compile(deps, code)
            else:
                _drop_bytecode(deps, code)
            _probe(path, "baseline")  # the OS file cache, warmed once
            base = _median(path, "baseline", "", repeats)
            rows = []
            for name in FUNCTIONS:
                now = _median(path, name, "", repeats)
                before = _median(path, name, "eager", repeats)
                rows.append(
                    {
                        "function": name,
                        "init_s": round(now["seconds"], 3),
                        "before_s": round(before["seconds"], 3),
                        "baseline_s": round(base["seconds"], 3),
                        "ratio": round(now["seconds"] / base["seconds"], 2),
                        "before_ratio": round(before["seconds"] / base["seconds"], 2),
                        "max_rss_mb": round(now["max_rss_mb"], 1),
                    }
                )
            cases[case] = rows
        # Where the compiled init goes, and what SnapStart's warm-up takes off the first request.
        imports = {
            name: top_import_costs(_probe(path, name, importtime=True)["importtime"]) for name in FUNCTIONS
        }
        lazy = _median(path, "api", "first", repeats)
        warmed = _median(path, "api", "first,warm", repeats)
        snap_start = {
            "first_request_s": round(lazy["first_s"], 4),
            "first_request_warmed_s": round(warmed["first_s"], 4),
        }
    finally:
        shutil.rmtree(code, ignore_errors=True)
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "platform": _host_platform(),
        "cases": cases,
        "imports": imports,
        "snap_start": snap_start,
    }
