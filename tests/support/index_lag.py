"""Global secondary indexes that lag their table (llmq_sandbox/moto_fidelity.py), on a clock the test moves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


class IndexClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def lagging_indexes_on_a_test_clock(
    monkeypatch: pytest.MonkeyPatch, lag_seconds: float
) -> Iterator[IndexClock]:
    from llmq_sandbox import moto_fidelity

    clock = IndexClock()
    monkeypatch.setattr(moto_fidelity, "clock", clock)
    with moto_fidelity.lagging_indexes(lag_seconds):
        yield clock
