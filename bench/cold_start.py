"""BENCHMARKS §4: each function's cold start, in an environment built like its Lambda layers.

The deps layer's requirements (`layers/build.py`: `[project].dependencies` from uv.lock, no
dev extras) are installed for this machine's Python and platform into a cache directory, and
the `llmq` layer and the handlers are copied beside them without bytecode. Each probe is a
fresh `python -I -S -B` whose path holds those three only, as /opt/python and /var/task do on
Lambda, so nothing of the dev environment (its httpx CLI extras, its compiled bytecode) counts.

Two cases per function, each against a baseline process that imports the same boto3 and
creates the function's own clients, interleaved run by run:
- **as shipped**: no bytecode. The deps layer is built for the Lambda runtime's Python
  (`stacks/runtime.py`), for which this machine has no interpreter to compile with, and /opt is
  read-only, so every cold start compiles what it imports;
- **compiled**: every module with its bytecode, as a deployment ships it where a Python of the
  runtime's version is at hand: the deps layer from `make layers`, the llmq layer and the
  function's folder staged by the synth (`stacks/bytecode.py`).

And the changes of issue 17 measured in the same run: the same probe with every llmq model
built at import (`defer_build` off), pydantic's plugin search on and the garbage collector on
through the imports, as before. A second baseline pauses its collector as the handlers do
(`llmq.startup`), so that what the pause takes off boto3's own imports can be told apart.
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

from layers.build import export_requirements, find_uv, install  # noqa: E402
from stacks.runtime import LIBRARY_ENVIRONMENT  # noqa: E402

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
    "LLMQ_POISON_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/1/poison",
    "LLMQ_PROVIDER_API_KEY": "sk-bench",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Nothing is traced outside Lambda; the long-running functions still import the X-Ray SDK,
    # as they do on Lambda (stacks/functions.py: active tracing).
    "POWERTOOLS_TRACE_DISABLED": "true",
    "PATH": "/usr/bin:/bin",
    # What the stack sets in every function for its libraries.
    **LIBRARY_ENVIRONMENT,
}

# sys.argv: path entries, function (or "baseline", or "libraries": the modules listed in place
# of the factories, imported with the collector paused, then boto3's clients), factories, services, "eager" to build
# every model at import (before the change), "plugins" to let pydantic look for plugins (the
# variable the stack sets left out), "collector" to keep the collector on through the imports
# (the handlers' pause undone), "docs" to register the api's docs route at import as before,
# "paused" for a baseline paused as the handlers are, "modules" to list what was imported (on
# stderr), "first" to time one request the api answers
# without AWS (a submit that validation refuses), "warm" to run the SnapStart warm-up first.
_PROBE = r"""
import json, sys, time
started = time.perf_counter()
sys.path[:0] = sys.argv[1].split("|")
name, factories, services, flags = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
if "eager" in flags:
    from llmq.model_base import Model
    Model.model_config["defer_build"] = False
if "collector" in flags:  # the collector left on through the imports
    import gc
    gc.disable = gc.freeze = lambda: None
if name in ("baseline", "libraries"):
    if "paused" in flags or name == "libraries":  # the same pause as the handlers (llmq.startup)
        import gc
        gc.disable()
    if name == "libraries":  # every library module a function imports, without llmq's code
        import importlib
        for library in factories.split(","):
            try:
                importlib.import_module(library)
            except Exception:  # a module a library imports only to find it missing, or on Windows
                pass
    import boto3
    session = boto3.session.Session()
    clients = [session.client(s, region_name="us-east-1") for s in services.split(",")]
    if "paused" in flags or name == "libraries":
        gc.freeze()
        gc.enable()
else:
    import importlib
    module = importlib.import_module(f"functions.{name}.handler")
    for factory in factories.split(","):
        getattr(module, factory)()
    if "docs" in flags and hasattr(module, "enable_docs"):  # the api's docs route, as registered before
        module.enable_docs()
    from llmq import aws
    clients = [aws.client(s) for s in services.split(",")]
init = time.perf_counter() - started
first = None
if "first" in flags:
    if "warm" in flags:  # the snapshot's warm-up, then what a restore runs
        module.warm()
        module.refresh()
    # A request the warm-up did not make: a batch that validation refuses (no AWS call).
    event = module._warm_event("POST", "/v1/batches", "/v1/{proxy+}", body="{}")
    began = time.perf_counter()
    module.app.resolve(event, None)
    first = time.perf_counter() - began
if "modules" in flags:
    print(json.dumps(list(sys.modules)), file=sys.stderr)
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
        install(uv, requirements, deps, _host_platform(), version)
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


def _probe(
    path: str,
    name: str,
    flags: str = "",
    *,
    services: list[str] | None = None,
    importtime: bool = False,
    modules: list[str] | None = None,
) -> dict[str, Any]:
    factories, own = FUNCTIONS.get(name, ([], ["dynamodb", "sqs"]))
    if modules is not None:
        factories = modules
    command = [sys.executable, "-I", "-S", "-B"]
    if importtime:
        command += ["-X", "importtime"]
    command += ["-c", _PROBE, path, name, ",".join(factories) or "-", ",".join(services or own), flags or "-"]
    # What Lambda sets in every environment, and libraries read as they import: the X-Ray SDK's
    # recorder, seeing LAMBDA_TASK_ROOT, samples as Lambda tells it; without it, it builds two
    # clients for centralized sampling (about 80 ms) that no function on Lambda pays.
    lambda_env = {
        "LAMBDA_TASK_ROOT": path.split("|")[-1],
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_EXECUTION_ENV": f"AWS_Lambda_python{sys.version_info.major}.{sys.version_info.minor}",
    }
    env = ENV | lambda_env
    if "plugins" in flags:  # (as before issue 17: pydantic looks for plugins)
        env = {name: value for name, value in env.items() if name not in LIBRARY_ENVIRONMENT}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if importtime:
        result["importtime"] = out.stderr
    if "modules" in flags:
        result["modules"] = json.loads(out.stderr.strip().splitlines()[-1])
    return result


def library_modules(path: str, name: str) -> list[str]:
    """What the function's cold start imports that is not llmq's (its layer or its folder), in
    the order it was imported: the libraries it stands on, which a lighter llmq cannot shed."""
    imported = _probe(path, name, "modules")["modules"]
    return [module for module in imported if module.split(".")[0] not in ("llmq", "functions", "__main__")]


def _compare(path: str, name: str, repeats: int) -> dict[str, Any]:
    """The function now, as before (every model built at import, the collector on through the
    imports) and its baseline (boto3 and the function's own clients), plain and with the
    handlers' collector pause, interleaved within each repeat so that the machine's drift falls
    on all four alike. Medians, and the spread of the per-repeat ratios."""
    services = FUNCTIONS[name][1]
    libraries = library_modules(path, name)
    runs: dict[str, list[dict[str, Any]]] = {
        "now": [],
        "before": [],
        "baseline": [],
        "paused": [],
        "libraries": [],
    }
    for _ in range(repeats):
        runs["baseline"].append(_probe(path, "baseline", services=services))
        runs["now"].append(_probe(path, name))
        runs["before"].append(_probe(path, name, "eager,plugins,collector,docs"))
        runs["paused"].append(_probe(path, "baseline", "paused", services=services))
        runs["libraries"].append(_probe(path, "libraries", services=services, modules=libraries))
    seconds = {key: statistics.median(run["seconds"] for run in values) for key, values in runs.items()}
    ratios = [
        now["seconds"] / base["seconds"] for now, base in zip(runs["now"], runs["baseline"], strict=True)
    ]
    return {
        "function": name,
        "init_s": round(seconds["now"], 3),
        "before_s": round(seconds["before"], 3),
        "baseline_s": round(seconds["baseline"], 3),
        "ratio": round(seconds["now"] / seconds["baseline"], 2),
        "before_ratio": round(seconds["before"] / seconds["baseline"], 2),
        # against a baseline that pauses its collector as the handlers do: llmq's own share
        "paused_ratio": round(seconds["now"] / seconds["paused"], 2),
        # the libraries alone (llmq's code left out), paused as the handlers are: a floor
        "libraries_ratio": round(seconds["libraries"] / seconds["baseline"], 2),
        "llmq_share": round((seconds["now"] - seconds["libraries"]) / seconds["baseline"], 2),
        "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "max_rss_mb": round(max(run["max_rss_mb"] for run in runs["now"]), 1),
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
            _drop_bytecode(deps, code)
            if case == "compiled":
                # What a build with the runtime's Python ships: every module's bytecode.
                _compile(deps, code)
            _probe(path, "baseline")  # the OS file cache, warmed once
            cases[case] = [_compare(path, name, repeats) for name in FUNCTIONS]
        # Where the compiled init goes, and what SnapStart's warm-up takes off a first request.
        imports = {
            name: top_import_costs(_probe(path, name, importtime=True)["importtime"]) for name in FUNCTIONS
        }
        lazy = [_probe(path, "api", "first")["first_s"] for _ in range(repeats)]
        warmed = [_probe(path, "api", "first,warm")["first_s"] for _ in range(repeats)]
        snap_start = {
            "first_request_s": round(statistics.median(lazy), 4),
            "first_request_warmed_s": round(statistics.median(warmed), 4),
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
