"""What the schema cannot say about a request: a job's (`check_job_request`), and a batch item's
whichever way it came, inline in POST /v1/batches (checked by the api) or as a line of an
uploaded file (checked by the worker as it streams the file)."""

from __future__ import annotations

from llmq.config import LlmqConfig
from llmq.errors import DomainError, InvalidRequest, PayloadTooLarge, PromptTooLarge, UnknownModel
from llmq.models import BatchItemRequest, JobRequest


def check_job_request(config: LlmqConfig, request: JobRequest) -> None:
    """What the schema cannot say about a generation: this deployment's models, prompt size,
    metadata and parameters. A job's submit and each batch item (inline or uploaded) pass here."""
    limits = config.limits
    model = request.model or config.provider.default_model
    if model not in config.provider.models:
        raise UnknownModel(f"model {model!r} is not one of {config.provider.models}")
    if request.prompt_chars() > limits.max_prompt_chars:
        raise PromptTooLarge(f"the prompt exceeds {limits.max_prompt_chars} characters")
    if len(request.metadata) > limits.max_metadata_keys:
        raise InvalidRequest(f"metadata holds at most {limits.max_metadata_keys} keys")
    params = request.params.model_dump(exclude_none=True)
    refused = sorted(set(params) - set(config.provider.allowed_params))
    if refused:
        raise InvalidRequest(f"parameters not allowed: {', '.join(refused)}")


def item_bytes(item: BatchItemRequest) -> bytes:
    """The item as it is stored (and counted against `max_item_bytes`): its UTF-8 JSON."""
    return item.model_dump_json(exclude_none=True).encode()


def check_item(config: LlmqConfig, where: str, item: BatchItemRequest, seen: dict[str, str]) -> bytes:
    """The item's stored bytes, or the DomainError naming `where` and what is wrong. `seen` maps
    each custom_id met so far to where it was (a repeat is refused, naming the first)."""
    first = seen.setdefault(item.custom_id, where)
    if first != where:
        raise InvalidRequest(f"{where}.custom_id {item.custom_id!r} repeats {first}")
    body = item.body
    if body.webhook is not None:
        raise InvalidRequest(f"{where}.body.webhook: a batch's items take the batch's webhook")
    if body.deadline_seconds is not None:
        raise InvalidRequest(f"{where}.body.deadline_seconds: a batch's items take the batch's deadline")
    if body.stream:
        raise InvalidRequest(
            f"{where}.body.stream: a batch's items have no live output; its results come per item"
        )
    stored = item_bytes(item)
    if len(stored) > config.batches.max_item_bytes:
        raise PayloadTooLarge(
            f"{where}: {len(stored)} bytes, over a batch item's {config.batches.max_item_bytes}; "
            "submit it as a job"
        )
    try:
        check_job_request(config, body)
    except DomainError as exc:
        raise type(exc)(f"{where}.body: {exc.detail}") from exc
    return stored
