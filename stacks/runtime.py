"""The Lambda runtime every llmq function and layer targets.

Kept free of CDK imports so that `layers/build.py` can read it without starting jsii.
"""

from __future__ import annotations

# The newest Lambda Python runtime that Powertools supports (aws-lambda-powertools 3.37
# declares 3.14, and every runtime dependency ships cp314 aarch64 wheels). The deps layer
# is built for this version, so change it here and nowhere else.
LAMBDA_PYTHON_VERSION = "3.14"
# Graviton: cheaper per GB-second than x86 for I/O-bound waiting on a provider. Every function,
# both layers and the deps build follow it, so change it here and nowhere else.
LAMBDA_ARCHITECTURE = "arm64"
# The manylinux platform tag that matches the Lambda image of that architecture (glibc 2.34 on AL2023).
LAYER_PLATFORM = {"arm64": "aarch64-manylinux2014", "x86_64": "x86_64-manylinux2014"}[LAMBDA_ARCHITECTURE]
# In the deps layer's build-info.json when layers/build.py compiled its bytecode with a Python
# of the runtime's version ("compiled", or "partial" when some module did not compile): the
# layer then ships its __pycache__ directories.
BYTECODE_KEY = "bytecode"
# Read by libraries as they import, the same in every function (`stacks/functions.py` sets
# it): pydantic otherwise looks for plugins in every installed distribution's entry points as
# the first model is built, part of each cold start (BENCHMARKS.md §4); llmq uses none.
LIBRARY_ENVIRONMENT = {"PYDANTIC_DISABLE_PLUGINS": "__all__"}
