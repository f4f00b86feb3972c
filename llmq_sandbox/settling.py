"""Short garbage collections for the sandbox's long-lived processes.

moto's process holds the whole emulated account (its modules, the deployed stack, its IAM
policies, every item and message), and the sandbox's own process the synthesized CDK app and
the runner: millions of objects that live as long as the process. Each full collection walked
them all, a pause of 50 to 200 ms in which no request was served; the slow submits of a warm
sandbox came in bursts at those moments. A collection every few seconds walks only what came
since the last one, then freezes what survived it (`gc.freeze`): frozen objects still die when
their last reference goes, but a reference cycle that was alive at a freeze and dies later (a
client dropped after a few seconds, a request in flight at that moment) is out of the
collector's sight. So every `full_every` settles the freeze is undone and one whole collection
reclaims those: one full pause every ten minutes instead of every few seconds, and what such
cycles hold never outgrows ten minutes' worth.
"""

from __future__ import annotations

import gc
import threading

SETTLE_SECONDS = 5.0
# Settles between whole collections: ten minutes at the default pace.
FULL_EVERY = 120


def settle(full: bool = False) -> None:
    """Collect what came since the last freeze (everything, with `full`), then freeze the
    survivors."""
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


class Settler:
    """`settle()` every `seconds` on a daemon thread, a whole one every `full_every`, until
    `stop()`."""

    def __init__(self, seconds: float = SETTLE_SECONDS, full_every: int = FULL_EVERY) -> None:
        self._seconds = seconds
        self._full_every = full_every
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gc-settler", daemon=True)

    def start(self) -> Settler:
        self._thread.start()
        return self

    def _run(self) -> None:
        settles = 0
        while not self._stopped.wait(self._seconds):
            settles += 1
            settle(full=settles % self._full_every == 0)

    def stop(self) -> None:
        """Stop settling and give the collector back everything frozen: a process that goes
        on after its sandbox (a benchmark's) collects as usual again."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        gc.unfreeze()
