# maw — two commands on a fresh machine: `make up` runs the mesh, `make test` runs the whole suite.
# Both create .venv and install everything they need (pinned in requirements/) on their own.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where `buf breaking` looks for the previous contracts; skipped when that ref has no protos/.
BREAKING_AGAINST ?= .git\#branch=main
PYTEST_ARGS ?=

.PHONY: up dashboard chromium bubblewrap test lint typecheck protos-lint breaking generate unit integration bench bench-peers bench-dashboard clean help

help:
	@echo "make up        run the whole mesh (PostgreSQL, Redis, services, Envoy) until Ctrl-C"
	@echo "make test      ruff, mypy, buf lint/breaking, then every pytest test"
	@echo "make generate  regenerate gen/python from protos/ with buf"
	@echo "make bench     the core loop's throughput, idle latency and CPU per subtask (JSON last line; docs/benchmarks.md)"
	@echo "make bench-peers  the same, beside PgQueuer and Celery on the same servers (requirements/bench.txt)"
	@echo "make bench-dashboard  scheduler commit -> browser render latency of the dashboard (JSON last line)"
	@echo "make dashboard build the web dashboard into dashboard/dist (only when its sources changed)"

$(STAMP): requirements/agent.txt requirements/server.txt requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	# Our own packages are used in place: the repo root (services, deploy, tests), generated
	# contracts and the agent are put on the venv's path instead of being installed as copies.
	printf '%s\n' "$(CURDIR)" "$(CURDIR)/gen/python" "$(CURDIR)/agent" \
		> "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/maw-dev.pth"
	touch $(STAMP)

up: $(STAMP) dashboard
	$(BIN)/python -m deploy.local up

# npm ci (from the committed lock file), the TypeScript client from protos/, vite build; a no-op when
# nothing changed (deploy/local/dashboard.py).
dashboard: $(STAMP)
	$(BIN)/python -m deploy.local.dashboard build

# The agent's recommended sandbox (docs/sandbox.md); its tests are skipped where it cannot run.
bubblewrap:
	@command -v bwrap >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; fi; } || \
		echo "bubblewrap could not be installed; sandbox tests that need it will be skipped"

# The browser tests drive Debian's Chromium with playwright-core (docs/dashboard.md).
chromium:
	@test -x /usr/bin/chromium || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi; }

generate: $(STAMP)
	$(BIN)/buf generate

protos-lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

breaking: $(STAMP)
	@if git cat-file -e "$$(echo '$(BREAKING_AGAINST)' | sed 's/.*branch=//'):protos" 2>/dev/null; then \
		$(BIN)/buf breaking --against '$(BREAKING_AGAINST)'; \
	else echo "buf breaking: no earlier protos/ at $(BREAKING_AGAINST); nothing to compare"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck protos-lint breaking dashboard chromium bubblewrap
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP) dashboard chromium bubblewrap
	$(BIN)/python -m pytest tests/integration tests/e2e $(PYTEST_ARGS)

# Both modes (in-process no-op, SHELL subprocess in a git worktree), backlog and idle figures; BENCH_* knobs
# in docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench.throughput

# The same invocation plus the peers PgQueuer and Celery (Redis broker) on the same embedded servers.
bench-peers: $(VENV)/.bench-installed
	BENCH_PEERS=1 $(BIN)/python -m bench.throughput

$(VENV)/.bench-installed: requirements/bench.txt $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements/bench.txt
	touch $@

# Subtask state change committed in the scheduler -> shown in Chromium (bench/dashboard_latency.py).
bench-dashboard: $(STAMP) dashboard chromium
	$(BIN)/python -m bench.dashboard_latency

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
