"""Short garbage collections for the sandbox's long-lived processes.

moto's process holds the whole emulated account (its modules, the deployed stack, its IAM
policies, every item and message), and the sandbox's own process the synthesized CDK app and
the runner: millions of objects that live as long as the process. Each full collection walked
them all, a pause of 50 to 200 ms in which no request was served; the slow submits of a warm
sandbox came in bursts at those moments. A collection every few seconds walks only what came
since the last one, then freezes what survived it (`gc.freeze`): objects still die when their
last reference goes, and only a cycle alive at a freeze that dies later is never reclaimed.
"""

from __future__ import annotations

import gc
import threading

SETTLE_SECONDS = 5.0


def settle() -> None:
    """Collect what came since the last freeze, then freeze the survivors."""
    gc.collect()
    gc.freeze()


class Settler:
    """`settle()` every `seconds` on a daemon thread, until `stop()`."""

    def __init__(self, seconds: float = SETTLE_SECONDS) -> None:
        self._seconds = seconds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gc-settler", daemon=True)

    def start(self) -> Settler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self._seconds):
            settle()

    def stop(self) -> None:
        self._stopped.set()
