"""How long an HTTP answer asks us to wait: read the same way for providers and webhook receivers."""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from datetime import UTC

# A delay in seconds: ASCII digits, with an optional decimal fraction (`_seconds`).
_DELAY = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds from `now`: `retry-after-ms` (OpenAI's), else `Retry-After` as delta-seconds or an
    HTTP-date; None if absent or unreadable. Give httpx.Headers, whose keys ignore case."""
    millis = _seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now)
    # (a date past year 9999, or an offset of twenty digits, overflows: unreadable, like "soon")
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _seconds(value: str | None) -> float | None:
    """Delta-seconds as RFC 9110 writes them (ASCII digits), or with a decimal fraction as some
    providers send; None for anything else. Python's float() also reads exponents, signs,
    underscores and the digits of every script ("1e4", "+10000", "10_000", Arabic-Indic
    digits), each of which held a webhook's next attempt for hours (hunt 269); and "inf", which
    is no delay."""
    number = (value or "").strip()
    if not _DELAY.fullmatch(number):
        return None
    seconds = float(number)
    return seconds if math.isfinite(seconds) else None
