"""How long an HTTP answer asks us to wait: read the same way for providers and webhook receivers."""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from datetime import UTC


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
    """A non-negative finite number, or None: "inf" and "nan" parse as floats but are no delay."""
    try:
        number = float(value) if value else math.nan
    except ValueError:
        return None
    return max(0.0, number) if math.isfinite(number) else None
