"""A handler's cold start runs its imports without the garbage collector, and leaves it on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.cold_start import ENV, FUNCTIONS

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter, as a cold start is: count the collections that run while the handler's
# module runs (its frame on the stack), then report what the handler left behind. What comes
# before its first statement is the runtime's: finding the module, and `__future__`, which
# its first line imports and Lambda's runtime has imported already.
_PROBE = """
import __future__, gc, importlib, json, sys
handler = f"functions/{sys.argv[1]}/handler.py"
collections = []

def within_handler(phase, info):
    frame = sys._getframe(1)
    while phase == "start" and frame is not None:
        if frame.f_code.co_filename.endswith(handler):
            collections.append(info["generation"])
            return
        frame = frame.f_back

gc.callbacks.append(within_handler)
importlib.import_module(f"functions.{sys.argv[1]}.handler")
print(json.dumps({
    "during_imports": len(collections),
    "enabled": gc.isenabled(),
    "frozen": gc.get_freeze_count(),
    "modules": sorted(sys.modules),
}))
"""


def _cold_import(function: str, *flags: str) -> dict[str, Any]:
    path = [str(ROOT / "layers" / "llmq" / "python"), str(ROOT)]
    command = [sys.executable, "-I", *flags, "-c", f"import sys; sys.path[:0] = {path!r}\n{_PROBE}", function]
    out = subprocess.run(command, env=ENV, capture_output=True, text=True, check=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_a_cold_start_collects_nothing_while_importing_and_leaves_the_collector_on(function: str) -> None:
    seen = _cold_import(function)
    # Without the pause, importing any handler runs dozens of collections over what it built.
    assert seen["during_imports"] == 0
    # A warm environment still collects its cycles, and skips what the imports built.
    assert seen["enabled"] == 1
    assert seen["frozen"] > 10_000


def test_the_api_leaves_the_openapi_document_models_to_the_routes_that_serve_them() -> None:
    # Powertools' OpenAPI document models were a third of the api's imports; only the docs and
    # the document need them (functions/api/handler.py `enable_docs`), and they import them.
    modules = _cold_import("api")["modules"]
    assert "functions.api.handler" in modules
    assert "aws_lambda_powertools.event_handler.openapi.models" not in modules
