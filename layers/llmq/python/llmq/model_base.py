"""The base of every llmq pydantic model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    """A pydantic model whose validator and serializer are built at its first use, not when its
    module is imported (`defer_build`): a function does not build the models its imports
    define and it never uses (the authorizer uses none of the job and batch models). BENCHMARKS
    §4 measures what it saves. Subclasses' own `model_config` merges with this one.
    """

    model_config = ConfigDict(defer_build=True)


def build_all() -> int:
    """Build every llmq model not built yet (those the functions define at runtime included),
    as if each had been used: the api's SnapStart warm-up, whose work is then in the snapshot.
    The number built."""
    built = 0
    pending: list[type[Model]] = [Model]
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if model is not Model and not model.__pydantic_complete__ and model.model_rebuild():
            built += 1
    return built
