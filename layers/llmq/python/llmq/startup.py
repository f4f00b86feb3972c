"""A cold start's imports, run without the cyclic garbage collector.

Importing a handler builds tens of thousands of objects (modules, classes, pydantic's and
botocore's tables) and frees almost none, yet each allocation past the collector's threshold
runs a collection over everything built so far: a tenth or more of the init, for nothing. Each
handler turns the collector off as its first statement and calls `imports_done` as its last:
what the imports built is then frozen out of every later collection, which the warm
invocations also pay less for, and the collector runs again as usual.

An environment of provisioned concurrency (`LlmqConfig.api.provisioned_environments`) is
initialised ahead of any request, as Lambda says in AWS_LAMBDA_INITIALIZATION_TYPE: a handler's
`warm` (what its first request would otherwise build) then runs in the init too, off every
request's path. An environment started on demand leaves that to its first request, which
would wait for it either way, so its init stays as short as it can.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

# https://docs.aws.amazon.com/lambda/latest/dg/configuration-envvars.html (reserved variables)
INITIALIZATION_TYPE_VAR = "AWS_LAMBDA_INITIALIZATION_TYPE"
PROVISIONED = "provisioned-concurrency"


def imports_done(warm: Callable[[], object] | None = None) -> None:
    """The handler's imports are done: keep what they built (and, in a provisioned
    environment, what `warm` builds) out of later collections."""
    if warm is not None and os.environ.get(INITIALIZATION_TYPE_VAR) == PROVISIONED:
        warm()
    gc.freeze()
    gc.enable()
