"""llmq's models are built at their first use (llmq.model_base), and that is safe to rely on."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ConfigDict, ValidationError

from llmq.model_base import Model, build_all


def _fresh_models() -> tuple[type[Model], type[Model]]:
    class Parent(Model):
        model_config = ConfigDict(extra="forbid")
        kind: str

    class Child(Parent):
        prompt: str
        max_tokens: int = 16

    return Parent, Child


def test_a_model_is_built_at_its_first_use_not_when_defined() -> None:
    _, child = _fresh_models()
    assert not child.__pydantic_complete__
    assert child(kind="x", prompt="p").max_tokens == 16
    assert child.__pydantic_complete__


def test_threads_meeting_an_unbuilt_model_at_once_all_validate_with_its_own_fields() -> None:
    # Workers run AWS calls and their parsing in threads: the first uses may come together.
    # Before pydantic 2.14 a thread could validate with the parent's validator meanwhile, and
    # refuse the child's own fields as extra ones.
    for _ in range(5):
        _, child = _fresh_models()
        barrier = threading.Barrier(16)

        def first_use(child: type[Model] = child, barrier: threading.Barrier = barrier) -> int:
            barrier.wait()
            return int(child(kind="x", prompt="p", max_tokens=3).max_tokens)  # type: ignore[call-arg]

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(lambda _: first_use(), range(16))) == [3] * 16


def test_a_deferred_model_still_refuses_what_it_forbids() -> None:
    _, child = _fresh_models()
    with pytest.raises(ValidationError) as refused:
        child(kind="x", prompt="p", surprise=1)  # type: ignore[call-arg]
    assert refused.value.errors()[0]["type"] == "extra_forbidden"


def test_build_all_leaves_no_llmq_model_unbuilt() -> None:
    # The api's SnapStart warm-up: everything in the snapshot, nothing left for a first request
    _fresh_models()
    build_all()
    pending = [Model]
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        assert model is Model or model.__pydantic_complete__, model
