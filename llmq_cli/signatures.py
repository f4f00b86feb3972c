"""Webhook verification with the reference `standardwebhooks` package, and why one fails.

The demo receiver and `llmq webhooks verify` both use it: the verdict is always the
reference library's; the explanation only says which of its checks refused, so an
integrator knows whether to look at the secret, the body bytes or the clock.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

REQUIRED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
# The reference library's replay window.
TOLERANCE_SECONDS = 5 * 60


@dataclass(frozen=True)
class Verification:
    verified: bool
    reason: str = ""
    # Which of the given secrets verified it (0 is the first).
    secret_index: int | None = None
    payload: Any = None


def verify_delivery(body: bytes | str, headers: Mapping[str, str], secrets: Sequence[str]) -> Verification:
    """The reference library's verdict against each secret in turn; a reason when none verifies."""
    try:
        # (strictly, as the reference library does: two bodies that differ only in bytes that
        # are not UTF-8 must not both verify against one signature)
        text = body if isinstance(body, str) else body.decode("utf-8")
    except UnicodeDecodeError:
        return Verification(verified=False, reason="the body is not UTF-8")
    lowered = {name.lower(): value for name, value in headers.items()}
    for index, secret in enumerate(secrets):
        try:
            payload = Webhook(secret).verify(text, lowered)
        except WebhookVerificationError:
            continue
        except Exception:  # EmptyWebhookSecretError, or whatever a malformed secret raises
            continue
        return Verification(verified=True, secret_index=index, payload=payload)
    return Verification(verified=False, reason=explain_failure(text, lowered, secrets))


def explain_failure(
    body: str, headers: Mapping[str, str], secrets: Sequence[str], now: float | None = None
) -> str:
    missing = [name for name in REQUIRED_HEADERS if not headers.get(name)]
    if missing:
        return f"missing header(s): {', '.join(missing)}"
    if not secrets:
        return "no secret to verify with"
    stamp = headers["webhook-timestamp"]
    # (as the reference library reads it, a float; one no clock holds, `nan` or `1e20`, a
    # forged request's, ended the explanation in a traceback: hunt 314)
    try:
        timestamp = float(stamp)
        datetime.fromtimestamp(timestamp, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return f"webhook-timestamp is not a Unix time: {stamp!r}"
    passed = [
        entry.split(",", 1)[1] for entry in headers["webhook-signature"].split() if entry.startswith("v1,")
    ]
    if not passed:
        return "webhook-signature holds no v1 signature"
    usable = []
    for secret in secrets:
        try:
            usable.append(Webhook(secret))
        except Exception:
            continue
    if not usable:
        return "the secret is not a whsec_<base64> secret"
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    expected = {hook.sign(headers["webhook-id"], when, body).split(",", 1)[1] for hook in usable}
    if not expected.intersection(passed):
        return (
            "no signature matches: either the secret is not the one that signed (after a rotation "
            "the tenant's newest secret signs first), or the body is not the exact bytes received "
            "(verify the raw body, before any JSON parsing or re-serialization)"
        )
    age = (now if now is not None else time.time()) - timestamp
    if age > TOLERANCE_SECONDS:
        return (
            f"the signature matches, but webhook-timestamp is {age:.0f}s old: the reference library "
            f"refuses anything older than {TOLERANCE_SECONDS}s (replay protection); verify on receipt"
        )
    if age < -TOLERANCE_SECONDS:
        return f"the signature matches, but webhook-timestamp is {-age:.0f}s in the future: check the clock"
    return "the reference library refused it (unknown reason)"
