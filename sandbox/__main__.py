"""`python -m sandbox ...` is the `llmq` command (the detached sandbox runs this way)."""

import sys

from sandbox.cli import main

sys.exit(main())
