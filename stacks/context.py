"""The CDK context a synth starts from: cdk.json's, and the keys llmq reads from it.

Kept free of CDK imports so that a synth served from the cache (stacks/synthesis.py) never
starts jsii.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CDK_JSON = Path(__file__).resolve().parent.parent / "cdk.json"
# CDK context keys (cdk.json or `cdk -c key=value`).
CONTEXT_CONFIG = "llmq"
CONTEXT_ALARM_EMAIL = "alarm_email"
CONTEXT_SANDBOX = "llmq:sandbox"
CONTEXT_LOG_LEVEL = "llmq:log_level"
CONTEXT_STACK_NAME = "llmq:stack_name"
# Tests only, never a deploy: synthesize with the placeholder dependencies layer (whose
# functions would all fail with ImportModuleError) instead of failing without layers/deps.
CONTEXT_ALLOW_PLACEHOLDER_DEPS_LAYER = "llmq:allow_placeholder_deps_layer"
# On unless turned off: with a Python of the Lambda runtime's version on this machine, the
# llmq layer and the functions ship their bytecode (stacks/bytecode.py). Tests turn it off, so
# that what they check of the assets is the same on every machine.
CONTEXT_BYTECODE = "llmq:bytecode"
# Opt-in: the stack sets the region's account-level API Gateway CloudWatch role (replacing
# any other) and the stage logs to CloudWatch.
CONTEXT_APIGW_CLOUDWATCH_ROLE = "llmq:apigw_cloudwatch_role"
# Opt-in: the stage logs to CloudWatch through the role the account already has.
CONTEXT_APIGW_LOGGING = "llmq:apigw_logging"


# One address, by its shape: one @, nothing that separates addresses, and a dotted domain with
# no empty label. Several glued together (SNS refuses them: "Invalid parameter: Email address")
# never reach a template, where they would roll the whole deploy back.
_ONE_ADDRESS = re.compile(r"[^@\s,;<>\"]+@[^@\s,;<>\"'.]+(?:\.[^@\s,;<>\"'.]+)+")


def alarm_emails(value: Any) -> tuple[str, ...]:
    """The alarm topic's e-mail subscribers, from `-c alarm_email=...` or cdk.json: one address,
    several separated by commas or spaces, or (cdk.json) a list. Raises ValueError naming what
    is not one address."""
    if value is None or value == "":
        return ()
    pieces = value if isinstance(value, list) else re.split(r"[,;\s]+", str(value))
    found: list[str] = []
    for piece in (str(p).strip() for p in pieces):
        if not piece:
            continue
        if not _ONE_ADDRESS.fullmatch(piece):
            raise ValueError(
                f"alarm_email: {piece!r} is not one e-mail address (separate several with commas: "
                "ALARM_EMAIL=oncall@example.com,backup@example.com)"
            )
        if piece not in found:
            found.append(piece)
    return tuple(found)


def refuse_sandbox_only(config: Any, sandbox: bool) -> None:
    """A setting only the sandbox may have, in a deploy: ValueError naming it.
    `webhooks.allow_loopback_http` lets a webhook go to http://127.0.0.1: deployed, a tenant's
    receiver could be the Lambda's own loopback services (its Runtime API), answered into the
    tenant's delivery log."""
    if config.webhooks.allow_loopback_http and not sandbox:
        raise ValueError(
            "webhooks.allow_loopback_http is for the sandbox only (llmq:sandbox): a deployed "
            "stack would send tenants' webhooks to the Lambda's own loopback services"
        )


def context_flag(value: Any) -> bool:
    # `cdk -c llmq:sandbox=true` passes the string "true".
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def cdk_json_context() -> dict[str, Any]:
    """cdk.json's context: the feature flags and defaults every synth starts from.

    Read here rather than left to the CDK CLI so that `python app.py`, the tests and the
    sandbox synthesize exactly what `cdk synth` does. Under the CLI the same values arrive
    again through CDK_CONTEXT_JSON, together with any `-c` overrides, and win.
    """
    context: dict[str, Any] = json.loads(CDK_JSON.read_text()).get("context", {})
    return context
