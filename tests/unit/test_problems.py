"""The problem catalogue: one entry per code, with the status every layer answers it with."""

from __future__ import annotations

import pytest

from llmq import errors


@pytest.mark.parametrize("kind", errors.domain_error_types(), ids=lambda kind: kind.__name__)
def test_every_domain_error_is_a_catalogue_entry_with_its_own_status(kind: type[errors.DomainError]) -> None:
    # Given a domain exception, When the catalogue is read for its code
    entry = errors.PROBLEMS[kind.code]
    # Then the entry is the exception's own status and title, under its own type URI
    assert (entry.status, entry.title) == (kind.status, kind.title)
    assert entry.type == f"https://llmq.dev/problems/{kind.code}"


def test_no_two_domain_errors_share_a_code() -> None:
    codes = [kind.code for kind in errors.domain_error_types()]
    assert len(codes) == len(set(codes))


def test_an_invalid_idempotency_key_is_400_although_it_is_an_invalid_request() -> None:
    # The domain's word: a bad header is a 400, a body that breaks a rule is a 422.
    assert errors.PROBLEMS["invalid_idempotency_key"].status == 400
    assert errors.PROBLEMS["invalid_request"].status == 422
