"""`python -m llmq_cli ...` is the `llmq` command (the detached sandbox runs this way)."""

import sys

from llmq_cli.main import main

sys.exit(main())
