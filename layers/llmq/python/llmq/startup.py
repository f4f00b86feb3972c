"""A cold start's imports, run without the cyclic garbage collector.

Importing a handler builds tens of thousands of objects (modules, classes, pydantic's and
botocore's tables) and frees almost none, yet each allocation past the collector's threshold
runs a collection over everything built so far: a tenth or more of the init, for nothing. Each
handler turns the collector off as its first statement and calls `imports_done` as its last:
what the imports built is then frozen out of every later collection, which the warm
invocations also pay less for, and the collector runs again as usual.
"""

from __future__ import annotations

import gc


def imports_done() -> None:
    """The handler's imports are done: keep what they built out of later collections."""
    gc.freeze()
    gc.enable()
