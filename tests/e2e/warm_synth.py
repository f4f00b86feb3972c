"""Synthesize the e2e suite's sandbox apps into the synth cache ahead of the suite.

A sandbox boot whose app was synthesized before restores it from LLMQ_SYNTH_CACHE (a copy);
otherwise it waits 10-30 s for jsii and cdk-nag, on the suite's clock. `make test` runs this
beside the unit and integration suites, whose two workers leave a core partly idle, so the
e2e suite that follows boots from the cache. It synthesizes exactly what a boot would: the
sandbox's config with each module's overrides (`SANDBOX_CONFIG`), in sandbox mode, with the
fake provider's URL as the run value the cache keeps a placeholder for (its port is new each
boot). Nothing here is needed for correctness: a miss only costs the boot its synth.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

# A fake provider's URL as a boot has it (`FakeProviderServer.base_url`): only its port differs,
# and the cache key holds a placeholder in its place.
_PROVIDER_URL = "http://127.0.0.1:1/v1"


def configs() -> dict[str, dict[str, Any] | None]:
    """Each sandbox the e2e suite boots with a config known before it runs (the down
    provider's in test_faults.py has a port of its run, and test_wiring.py's faulted apps
    are never cached)."""
    from tests.e2e import test_crash, test_faults, test_security

    return {
        "default": None,
        "test_crash": test_crash.SANDBOX_CONFIG,
        "test_faults": test_faults.MAIN_CONFIG,
        "test_security": test_security.SANDBOX_CONFIG,
    }


def main() -> int:
    if not os.environ.get("LLMQ_SYNTH_CACHE"):
        print("warm_synth: LLMQ_SYNTH_CACHE is not set; nothing to warm")
        return 0
    from llmq_sandbox.config import CONFIG_OVERRIDES_VAR, ProviderChoice, sandbox_config
    from stacks.context import CONTEXT_SANDBOX
    from stacks.synthesis import synthesize

    # As a boot under the suite: the fake provider, and no overrides from the caller's shell.
    os.environ.pop(CONFIG_OVERRIDES_VAR, None)
    choice = ProviderChoice.from_environment()
    for name, overrides in configs().items():
        began = time.monotonic()
        config = sandbox_config(_PROVIDER_URL, choice, overrides)
        synthesize(config, {CONTEXT_SANDBOX: True}, run_values={"fake_provider_url": _PROVIDER_URL})
        print(f"warm_synth: {name} ready in {time.monotonic() - began:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
